"""mutmut's results kept in the repository, so that `make mutation` resumes on any checkout.

mutmut 3 records each mutant's outcome in `mutants/<source>.meta` (ignored by git), with a
hash of every mutated function: when it generates the mutants again, a function whose hash
is unchanged keeps its mutants' outcomes and only changed functions run again. `restore`
copies the committed results (tests/mutation/results/) into `mutants/` before a run, where
`mutants/` has none yet; `save` copies them back after it (also after an interrupted run:
mutmut writes each outcome as it comes). A fresh run from nothing: delete both.

Restored results forget "no tests" (mutmut's 33) and "skipped" (5): those verdicts belong to
the test map mutmut records at the start of a run, and tests written since may reach the
mutant now (it is checked again, at the cost of a lookup when still nothing reaches it).
`sample FRACTION SEED` prints a seeded random sample of the mutants not run yet, FRACTION of
each module's (at least 3), for `mutmut run $(...)` when a whole run does not fit the time
at hand: its kill rate estimates the rest's.
Run from the repository root: `python -m tests.mutation.results restore|save|sample`.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEPT = Path(__file__).with_name("results")
MUTANTS = ROOT / "mutants"
RECHECK = {33, 5}  # no test reached the mutant; skipped


def restore() -> None:
    for kept in sorted(KEPT.glob("**/*.meta")):
        target = MUTANTS / kept.relative_to(KEPT)
        if not target.exists():
            data = json.loads(kept.read_text())
            codes = data["exit_code_by_key"]
            data["exit_code_by_key"] = {k: None if v in RECHECK else v for k, v in codes.items()}
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(data, indent=4))
            print(f"restored {target.relative_to(ROOT)}")


def save() -> None:
    for meta in sorted(MUTANTS.glob("tursi/**/*.meta")):
        target = KEPT / meta.relative_to(MUTANTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(meta, target)
        print(f"saved {target.relative_to(ROOT)}")


def sample(fraction: str, seed: str) -> None:
    rng = random.Random(int(seed))
    for meta in sorted(MUTANTS.glob("tursi/**/*.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        pool = sorted(name for name, code in codes.items() if code is None)
        if pool:
            count = min(len(pool), max(3, round(len(pool) * float(fraction))))
            print("\n".join(rng.sample(pool, count)))


if __name__ == "__main__":
    {"restore": restore, "save": save, "sample": sample}[sys.argv[1]](*sys.argv[2:])

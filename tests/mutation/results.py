"""mutmut's results kept in the repository, so that `make mutation` resumes on any checkout.

mutmut 3 records each mutant's outcome in `mutants/<source>.meta` (ignored by git), with a
hash of every mutated function: when it generates the mutants again, a function whose hash
is unchanged keeps its mutants' outcomes and only changed functions run again. `restore`
copies the committed results (tests/mutation/results/) into `mutants/` before a run, where
`mutants/` has none yet; `save` copies them back after it (also after an interrupted run:
mutmut writes each outcome as it comes). A fresh run from nothing: delete both.
Run from the repository root: `python -m tests.mutation.results restore|save`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEPT = Path(__file__).with_name("results")
MUTANTS = ROOT / "mutants"


def restore() -> None:
    for kept in sorted(KEPT.glob("**/*.meta")):
        target = MUTANTS / kept.relative_to(KEPT)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(kept, target)
            print(f"restored {target.relative_to(ROOT)}")


def save() -> None:
    for meta in sorted(MUTANTS.glob("tursi/**/*.meta")):
        target = KEPT / meta.relative_to(MUTANTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(meta, target)
        print(f"saved {target.relative_to(ROOT)}")


if __name__ == "__main__":
    {"restore": restore, "save": save}[sys.argv[1]]()

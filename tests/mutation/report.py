"""The report of the last `make mutation` run, written into docs/testing.md.

Reads mutmut's results (mutants/**/*.py.meta) for the modules setup.cfg's [mutmut] section
mutates, and tests/mutation/equivalent.txt, the survivors a reviewer found equivalent (no
test can tell them from the original code), each with the reason. The kill rate counts only
the other mutants. Run from the repository root: `python -m tests.mutation.report`.
"""

from __future__ import annotations

import configparser
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.txt")
DOC = ROOT / "docs" / "testing.md"
BEGIN, END = "<!-- mutation report begins -->", "<!-- mutation report ends -->"
TARGET = 0.90

# mutmut's exit codes (mutmut/stats.py): 1 and 3 are test failures, 36 and the signals a
# timeout (the mutant made a test hang, which counts as caught); 0 is a survivor, and so are
# 5 and 33, a mutant no selected test reaches. -9 (SIGKILL) is a test that grew without bound
# until it was killed (seen: scheduler _send__mutmut_11 appends forever; checked by hand).
KILLED = {1, 3}
TIMEOUT = {36, 24, -24, 152, 255, -9}
SURVIVED = {0, 5, 33}


def mutated_modules() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config.get("mutmut", "only_mutate").split()


def equivalents() -> tuple[dict[str, str], set[str]]:
    """({mutant name: why it is equivalent}, the names under a "without a GPU" heading), from
    lines `name: reason`; a line starting with # is a comment or a heading. Mutants only a
    GPU could tell apart are listed but still count as survivors."""
    found, gpu_only, under_gpu = {}, set(), False
    for line in EQUIVALENT.read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            under_gpu = "without a GPU" in line
        elif line:
            name, _, reason = line.partition(": ")
            found[name.strip()] = reason.strip()
            if under_gpu:
                gpu_only.add(name.strip())
    return found, gpu_only


def outcome(code: int | None) -> str:
    if code in KILLED:
        return "killed"
    if code in TIMEOUT:
        return "timeout"
    if code in SURVIVED:
        return "survived"
    return "not run" if code is None else f"other ({code})"


def results(module: str) -> dict[str, str] | None:
    """{mutant: outcome} of `module`, None when mutmut has no results for it yet (a module
    added to setup.cfg since the last run)."""
    meta = ROOT / "mutants" / (module + ".meta")
    if not meta.exists():
        return None
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: outcome(code) for name, code in codes.items()}


def report() -> tuple[str, bool]:
    listed, gpu_only = equivalents()
    known = {name: reason for name, reason in listed.items() if name not in gpu_only}
    rows, unexplained, stale, missing, unchecked = [], [], [], [], []
    totals = Counter()
    for module in mutated_modules():
        outcomes = results(module)
        if outcomes is None:
            missing.append(module)
            continue
        count = Counter(outcomes.values())
        equivalent = sum(
            1 for name, result in outcomes.items() if result == "survived" and name in known
        )
        unexplained += [n for n, r in outcomes.items() if r == "survived" and n not in listed]
        # killed now (a mutant not run yet is neither)
        stale += [n for n in listed if outcomes.get(n) in ("killed", "timeout")]
        # listed, but their function changed since (or they have never run): mutmut numbers
        # a function's mutants in order, so a listed name may now be another mutant
        unchecked += [n for n in listed if outcomes.get(n) == "not run"]
        row = Counter(
            mutants=len(outcomes),
            killed=count["killed"] + count["timeout"],
            equivalent=equivalent,
            survived=count["survived"] - equivalent,
            other=len(outcomes) - count["killed"] - count["timeout"] - count["survived"],
        )
        totals.update(row)
        rows.append((module, row))
    rows.append(("**all**", totals))
    lines = [
        "| module | mutants | killed | equivalent | survived | not run | kill rate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for module, row in rows:
        scored = row["mutants"] - row["equivalent"] - row["other"]
        rate = row["killed"] / scored if scored else 1.0
        lines.append(
            f"| {module} | {row['mutants']} | {row['killed']} | {row['equivalent']} | "
            f"{row['survived']} | {row['other']} | {rate:.1%} |"
        )
    scored = totals["mutants"] - totals["equivalent"] - totals["other"]
    rate = totals["killed"] / scored if scored else 1.0
    lines += ["", f"Kill rate over non-equivalent mutants: **{rate:.1%}** (target {TARGET:.0%})."]
    if totals["other"]:
        lines.append(
            f"Incomplete: {totals['other']} mutants not run yet (`make mutation` resumes)."
        )
    if missing:
        names = ", ".join(f"`{module}`" for module in missing)
        lines.append(f"Not mutated yet (added since the last run): {names}.")
    if gpu_only:
        lines.append(f"Survivors only a GPU could kill (counted as survivors): {len(gpu_only)}.")
    if unexplained:
        lines += ["", "Survivors not yet explained (`mutmut show NAME` prints each):", ""]
        lines += [f"- `{name}`" for name in sorted(unexplained)]
    if stale:
        lines += ["", "Listed as equivalent but no longer surviving (remove from the list):", ""]
        lines += [f"- `{name}`" for name in sorted(stale)]
    if unchecked:
        lines.append(
            f"Listed as equivalent but not run since their function changed: {len(unchecked)} "
            "(check each name's diff, `mutmut show NAME`, against its reason when it runs)."
        )
    return "\n".join(lines), rate >= TARGET and not totals["other"] and not missing


def main() -> None:
    text, ok = report()
    doc = DOC.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

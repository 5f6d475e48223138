"""The mutation check: each mutant of tests/mutants.py breaks one line of a copy of fedsync (the hash check,
the finite check, the quorum rule, the staleness weight and cut-off, the lease refusal, the start order) and
runs the tests that guard it; each must fail. A control run of the same tests on an unbroken copy must pass.
Prints each mutant, whether it was caught and in how many seconds; exits 1 if any survived.
Usage: python benchmarks/mutants.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ holds the mutants and their harness

from tests.mutants import caught, mutant_runs  # noqa: E402


def main() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        control, results = mutant_runs(Path(tmp))
    if control.returncode != 0:
        sys.exit("the control run failed on an unbroken copy, so no mutant result means anything:\n"
                 + control.stdout[-3000:])
    for m, done, seconds in results:
        print(f"  {'caught  ' if caught(done) else 'SURVIVED'} {m.what} ({m.file}; {seconds:.1f} s)")
    survivors = [m for m, done, _ in results if not caught(done)]
    print(f"{len(results) - len(survivors)} of {len(results)} mutants caught in {time.monotonic() - started:.0f} s "
          "(control on an unbroken copy: passed)")
    if survivors:
        for m, done, _ in results:
            if not caught(done):
                print(f"--- {m.what}:\n{done.stdout[-1500:]}")
        sys.exit(1)


if __name__ == "__main__":
    main()

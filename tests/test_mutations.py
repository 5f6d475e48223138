"""Every mutant of tests/mutants.py still names a line that is in the code once and tests that exist, so the
mutation check (`make mutants`) keeps meaning something as code moves."""

from __future__ import annotations

import pytest

from .mutants import MUTANTS, ROOT, Mutant


@pytest.mark.parametrize("m", MUTANTS, ids=[m.what for m in MUTANTS])
def test_every_mutant_names_a_line_and_tests_that_exist(m: Mutant) -> None:
    assert (ROOT / m.file).read_text().count(m.line) == 1, f"move the mutant '{m.what}' with its line"
    for test in m.tests:
        file, _, name = test.partition("::")
        assert f"def {name.split('[')[0]}(" in (ROOT / file).read_text(), test

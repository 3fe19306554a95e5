"""docs/reliability.md names, for every bad input and fault, the tests that
show the behaviour it states. These tests keep that table current: every
name in it must exist, and every case of the suites that test bad inputs
and faults must be in it."""

import re

from conftest import REPO

RELIABILITY = REPO / "docs" / "reliability.md"
CPP_TESTS = REPO / "tests" / "cpp"
PY_TESTS = REPO / "python_tests"

# Every case of these GoogleTest suites belongs in the table.
LISTED_SUITES = ("BadInput", "MoeErrors", "CudaBackendErrors", "RankFailure",
                 "MoeSoak", "PeerProcess")

CPP_CASE = re.compile(r"\bTEST(?:_P|_F)?\(\s*(\w+),\s*(\w+)\s*\)")
PY_CASE = re.compile(r"^def (test_\w+)\(", re.MULTILINE)


def cpp_cases():
    cases = set()
    for path in CPP_TESTS.glob("*.cpp"):
        for suite, name in CPP_CASE.findall(path.read_text()):
            cases.add(f"{suite}.{name}")
    return cases


def py_cases():
    cases = set()
    for path in PY_TESTS.glob("test_*.py"):
        for name in PY_CASE.findall(path.read_text()):
            cases.add(f"{path.name}::{name}")
    return cases


def named_in_table(page=RELIABILITY):
    """The backquoted test names of the table rows (their last cell)."""
    names = []
    for line in page.read_text().splitlines():
        if not line.startswith("|") or line.startswith("| ---"):
            continue
        last_cell = line.rstrip().rstrip("|").split("|")[-1]
        names += re.findall(r"`([^`]+)`", last_cell)
    return names


def test_the_table_names_tests():
    names = named_in_table()
    assert len(names) > 50, names


def test_every_test_the_table_names_exists():
    known = cpp_cases() | py_cases()
    missing = [name for name in named_in_table() if name not in known]
    assert missing == [], (
        f"docs/reliability.md names tests that do not exist: {missing}")


def test_every_case_of_the_fault_suites_is_in_the_table():
    named = set(named_in_table())
    absent = sorted(case for case in cpp_cases()
                    if case.split(".")[0] in LISTED_SUITES
                    and case not in named)
    assert absent == [], (
        f"these tests of bad inputs and faults are not in "
        f"docs/reliability.md: {absent}")


def test_a_name_that_does_not_exist_is_caught(tmp_path):
    # The check itself must be able to fail.
    page = tmp_path / "reliability.md"
    page.write_text("| a | b `NotATest` | `BadInput.NoSuchCase` |\n")
    assert named_in_table(page) == ["BadInput.NoSuchCase"]
    assert "BadInput.NoSuchCase" not in cpp_cases()

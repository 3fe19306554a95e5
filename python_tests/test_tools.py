"""The scripts in tools/ that the tests themselves rely on.

tools/launch.sh, which bounds every multi-rank test's run: its timeout must
be a number of seconds in [0.001, 86400] like the library's.

tools/test_totals.py, on the JUnit files in samples/: ctest_junit.xml holds
one gtest case passed, one skipped and one failed (one ctest test each), a
2-rank test that ctest calls passed although 3 of its 5 cases skipped on
each rank, a 1-rank test whose 2 cases all skipped, a test without gtest
cases that passed and one whose executable was missing (ctest's JUnit marks
it "notrun" like a skip; ctest counts it failed). pytest_junit.xml holds 3
passed, a failure, a setup error, a skip and an xfail."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LAUNCH = REPO / "tools" / "launch.sh"
TOTALS = REPO / "tools" / "test_totals.py"
SAMPLES = REPO / "python_tests" / "samples"
CTEST = SAMPLES / "ctest_junit.xml"
PYTEST = SAMPLES / "pytest_junit.xml"


def totals(*args):
    done = subprocess.run([sys.executable, str(TOTALS), *map(str, args)],
                          capture_output=True, text=True)
    assert done.stderr == ""
    return done.returncode, done.stdout.splitlines()


def test_totals_count_the_gtest_cases_inside_ctest_tests_and_pytest():
    status, lines = totals("--ctest", CTEST, "--ctest-status", 8,
                           "--pytest", PYTEST, "--pytest-status", 1)
    assert status == 1
    assert lines[-1] == (
        "hostfuse tests: 9 passed, 4 failed, 11 skipped (ctest: 7 tests; "
        "gtest cases in 5 of them, every rank's: 5 passed, 1 failed, "
        "9 skipped; the other 2: 1 passed, 1 failed, 0 skipped; pytest: "
        "3 passed, 2 failed, 2 skipped)")
    assert lines[-2] == (
        "hostfuse tests failed: install_consumer, "
        "Options.RefusesValuesOutOfRange, "
        "python_tests.test_sample::test_fails, "
        "python_tests.test_sample::test_errors_in_setup")


def test_per_test_shows_every_rank_of_a_multi_rank_test():
    _, lines = totals("--ctest", CTEST, "--per-test")
    assert lines[0] == (
        "multidevice_np2: gtest cases on 2 ranks: 4 passed, 0 failed, "
        "6 skipped (rank 0: 2 passed, 0 failed, 3 skipped; rank 1: 2 passed, "
        "0 failed, 3 skipped)")
    assert lines[-1].endswith("pytest: not run)")


def test_a_green_run_still_shows_the_cases_that_skipped(tmp_path):
    # multidevice_np2 and graph_moe_np1 alone: ctest says passed and
    # skipped, nothing failed.
    text = CTEST.read_text()
    start = text.index('\t<testcase name="multidevice_np2"')
    end = text.index("</testsuite>")
    green = tmp_path / "ctest.xml"
    green.write_text(text[:text.index("\t<testcase")] + text[start:end] +
                     "</testsuite>\n")
    status, lines = totals("--ctest", green, "--ctest-status", 0)
    assert status == 0
    assert lines == [
        "hostfuse tests: 4 passed, 0 failed, 8 skipped (ctest: 2 tests; "
        "gtest cases in 2 of them, every rank's: 4 passed, 0 failed, "
        "8 skipped; the other 0: 0 passed, 0 failed, 0 skipped; pytest: "
        "not run)"]


def test_a_part_that_left_no_results_is_a_failure(tmp_path):
    status, lines = totals("--ctest", tmp_path / "missing.xml", "--pytest",
                           PYTEST, "--pytest-status", 1)
    assert status == 1
    assert lines[-1].startswith("hostfuse tests: 3 passed, 3 failed, 2 skipped")
    assert f"ctest: no results ({tmp_path / 'missing.xml'} is missing)" in lines[-1]


def test_a_failed_exit_status_counts_even_when_the_file_shows_none(tmp_path):
    clean = tmp_path / "pytest.xml"
    clean.write_text('<testsuites><testsuite name="pytest">'
                     '<testcase classname="t" name="a"/></testsuite>'
                     '</testsuites>')
    status, lines = totals("--pytest", clean, "--pytest-status", 5)
    assert status == 1
    assert lines[-1] == (
        "hostfuse tests: 1 passed, 1 failed, 0 skipped (ctest: not run; "
        "pytest: 1 passed, 0 failed, 0 skipped; pytest exited with 5)")


def test_a_rank_that_failed_after_its_cases_passed_is_a_failure(tmp_path):
    # A rank that crashed at shutdown: its counts say passed, ctest failed.
    text = CTEST.read_text().replace(
        'name="multidevice_np2" classname="multidevice_np2" time="11.78" '
        'status="run">',
        'name="multidevice_np2" classname="multidevice_np2" time="11.78" '
        'status="fail">\n\t\t<failure message=""/>')
    crashed = tmp_path / "ctest.xml"
    crashed.write_text(text)
    status, lines = totals("--ctest", crashed)
    assert status == 1
    assert "multidevice_np2 (outside its gtest cases)" in lines[-2]
    assert lines[-1].startswith("hostfuse tests: 6 passed, 3 failed, 9 skipped")
    assert "1 failed outside their gtest cases" in lines[-1]


def test_a_filter_that_matches_no_test_fails(tmp_path):
    # The suite's own build folder, run as it is: ctest finds no test named
    # NoSuchTest and the script must not call that a green run. Its JUnit
    # files go to tmp_path, so the suite running this test keeps its own.
    build = Path(os.environ.get("HOSTFUSE_BUILD_DIR", REPO / "build"))
    if not (build / "CTestTestfile.cmake").is_file():
        pytest.skip(f"needs a configured C++ build in {build}; there is none")
    env = dict(os.environ, HOSTFUSE_BUILD_DIR=str(build), HOSTFUSE_NO_BUILD="1",
               HOSTFUSE_SKIP_PYTHON="1", HOSTFUSE_TEST_RESULTS=str(tmp_path))
    # Whatever the suite running this test was told to leave out or add.
    for name in ["HOSTFUSE_SKIP_CTEST", "HOSTFUSE_SANITIZE"]:
        env.pop(name, None)
    done = subprocess.run(["bash", str(REPO / "tools" / "test.sh"), "-R",
                           "NoSuchTest"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "No tests were found" in done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("hostfuse tests: 0 passed")


def launch(timeout):
    # HOSTFUSE_TORCHRUN=true: no ranks start; only the timeout is at stake.
    env = dict(os.environ, HOSTFUSE_TORCHRUN="true",
               HOSTFUSE_LAUNCH_TIMEOUT=timeout)
    return subprocess.run([str(LAUNCH), "1", "true"], capture_output=True,
                          text=True, env=env)


def test_launch_refuses_a_timeout_that_is_not_a_positive_number_of_seconds():
    # 0 would make `timeout` wait forever, inf too.
    for bad in ["0", "-5", "inf", "1e3", "86401", "0.0001", "ten"]:
        done = launch(bad)
        assert done.returncode == 2, bad
        assert (f"HOSTFUSE_LAUNCH_TIMEOUT={bad} is not a timeout: it must be "
                "a number of seconds in [0.001, 86400]") in done.stderr
    for good in ["0.5", "600", "86400"]:
        done = launch(good)
        assert done.returncode == 0, done.stderr
        assert "passed on all 1 ranks" in done.stdout


def test_launch_names_a_missing_program_and_a_bad_rank_count(tmp_path):
    # torchrun reports a missing program only in the Python traceback that
    # launch.sh filters out: launch.sh checks the program first.
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    for args, message in ((["2", str(tmp_path / "nothing")],
                           f"no program file '{tmp_path / 'nothing'}'"),
                          (["1", str(plain)], f"'{plain}' is not executable"),
                          (["1", "hostfuse_no_such_command"],
                           "no command 'hostfuse_no_such_command' on PATH"),
                          # A shell builtin is no program torchrun can start.
                          (["1", "cd"], "no command 'cd' on PATH"),
                          (["1", str(tmp_path)], f"'{tmp_path}' is a folder, not a program"),
                          (["0", "true"], "N must be a whole number >= 1, got '0'"),
                          (["2"], "needs N and a PROGRAM")):
        done = subprocess.run([str(LAUNCH), *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2, (args, done)
        assert message in done.stderr, done.stderr


def test_every_tool_explains_itself_with_help():
    # A tool's --help says what it does (more than a usage line) and exits 0
    # before it builds or runs anything.
    tools = sorted((REPO / "tools").glob("*.sh")) + sorted((REPO / "tools").glob("*.py"))
    assert len(tools) >= 10
    for tool in tools:
        command = ([sys.executable] if tool.suffix == ".py" else ["bash"]) + [str(tool),
                                                                             "--help"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (tool, done.stderr)
        assert len(done.stdout.strip().splitlines()) >= 3, (tool, done.stdout)

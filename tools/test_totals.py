#!/usr/bin/env python3
"""Prints the totals of a test run over ctest and pytest as one line, from
their JUnit files, and exits 1 when anything failed:

  hostfuse tests: P passed, F failed, S skipped (ctest: N tests; gtest
  cases in G of them, every rank's: ...; the other N - G: ...; pytest: ...)

  tools/test_totals.py [--ctest JUNIT [--ctest-status N]]
                       [--pytest JUNIT [--pytest-status N]] [--per-test]

What counts as one test:
- A ctest test that runs GoogleTest cases counts as its cases, read from
  the output that ctest keeps in its JUnit file (ctest --output-junit, with
  --test-output-size-passed large enough and --test-output-truncation
  middle, so that the end of each output is kept). The multi-rank binaries
  (tests/cpp/multirank_main.cpp) end every rank with "[rank r of R] P
  passed, F failed, S skipped": every rank's cases count, so a case that
  ran on 3 ranks counts 3 times. Other gtest binaries print gtest's own
  "[  PASSED  ] N tests." and "[  SKIPPED ] / [  FAILED  ] N tests" lines.
- Any other ctest test counts as one, as ctest reports it: skipped when
  ctest skipped or disabled it, failed when it failed or could not run
  (ctest's JUnit marks a missing executable "notrun", like a skip).
- A ctest test that failed although none of its cases did (a crash after
  them, a rank that died or hung, a timeout) adds one failure.
- A pytest test counts as one: failed when it has a failure or an error,
  skipped when skipped (xfail included).
- A part that was to run (its JUnit file named) but left no readable file
  adds one failure, as does a nonzero exit status (--ctest-status,
  --pytest-status) that no failure in its file explains.

With --per-test, a line per ctest test with gtest counts of several ranks
comes first. When anything failed, a line naming the failed tests comes
right before the totals, which are always the last line. Python standard
library only.
"""

import argparse
import re
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

# multirank_main.cpp's last line on every rank, after launch.sh's prefix.
RANK_LINE = re.compile(
    r"\[rank (\d+) of (\d+)\] (\d+) passed, (\d+) failed, (\d+) skipped")
# gtest's summary at the end of a run: "[  PASSED  ] 3 tests.",
# "[  SKIPPED ] 1 test, listed below:", "[  FAILED  ] 2 tests, listed below:".
GTEST_LINE = re.compile(
    r"^\[  (PASSED|SKIPPED|FAILED) *\] (\d+) tests?[.,]", re.MULTILINE)
# ctest's reasons for a "notrun" test that are skips; any other (a missing
# executable, a failed fixture) is a failure for ctest.
CTEST_SKIPS = ("SKIP_REGULAR_EXPRESSION_MATCHED", "SKIP_RETURN_CODE")
# Failed tests named before the totals, at most.
MAX_NAMES = 20


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, other):
        self.passed += other.passed
        self.failed += other.failed
        self.skipped += other.skipped

    def total(self):
        return self.passed + self.failed + self.skipped

    def __str__(self):
        return (f"{self.passed} passed, {self.failed} failed, "
                f"{self.skipped} skipped")


@dataclass
class Part:
    """What one part of the run (ctest or pytest) adds to the totals."""
    name: str
    counts: Counts = field(default_factory=Counts)
    summary: str = "not run"
    failed_names: list = field(default_factory=list)
    details: list = field(default_factory=list)  # --per-test lines


def read_junit(path):
    """The root element of `path`, or None with the reason."""
    try:
        return ElementTree.parse(path).getroot(), None
    except FileNotFoundError:
        return None, f"no results ({path} is missing)"
    except (OSError, ElementTree.ParseError) as e:
        return None, f"no results ({path} is unreadable: {e})"


def ctest_status(case):
    """'passed', 'failed' or 'skipped', as ctest counts the test."""
    status = case.get("status")
    if status == "run":
        return "passed"
    if status == "disabled":
        return "skipped"
    if status == "notrun":
        skipped = case.find("skipped")
        reason = skipped.get("message", "") if skipped is not None else ""
        return "skipped" if reason.startswith(CTEST_SKIPS) else "failed"
    return "failed"


def gtest_counts(output):
    """The gtest cases in one ctest test's output: (Counts, per-rank Counts
    by rank, the world size), or (None, {}, 0) when it shows none."""
    ranks = {}
    world = 0
    for match in RANK_LINE.finditer(output):
        rank, world = int(match[1]), int(match[2])
        counts = ranks.setdefault(rank, Counts())
        counts.add(Counts(int(match[3]), int(match[4]), int(match[5])))
    if ranks:
        total = Counts()
        for counts in ranks.values():
            total.add(counts)
        return total, ranks, world
    total = Counts()
    for match in GTEST_LINE.finditer(output):
        n = int(match[2])
        if match[1] == "PASSED":
            total.passed += n
        elif match[1] == "FAILED":
            total.failed += n
        else:
            total.skipped += n
    if total.total() == 0:
        return None, {}, 0
    return total, {}, 0


def no_results(part, problem):
    """`part` without a results file: one failure, saying why."""
    part.counts.failed = 1
    part.summary = f"{part.name}: {problem}"
    part.failed_names.append(f"{part.name} (no results)")
    return part


def read_ctest(path, exit_status):
    part = Part("ctest")
    root, problem = read_junit(path)
    if root is None:
        return no_results(part, problem)
    tests = 0
    gtest_tests = 0
    gtest = Counts()
    other = Counts()
    outside = 0
    notes = []
    for case in root.iter("testcase"):
        tests += 1
        name = case.get("name", "?")
        status = ctest_status(case)
        output = case.findtext("system-out") or ""
        counts, ranks, world = gtest_counts(output)
        if counts is None:
            setattr(other, status, getattr(other, status) + 1)
            if status == "failed":
                part.failed_names.append(name)
            continue
        gtest_tests += 1
        gtest.add(counts)
        if status == "failed" and counts.failed == 0:
            outside += 1
            part.failed_names.append(f"{name} (outside its gtest cases)")
        elif counts.failed > 0:
            part.failed_names.append(name)
        missing = sorted(set(range(world)) - set(ranks))
        if missing:
            notes.append(f"{name} lacks the counts of rank(s) "
                         f"{', '.join(map(str, missing))} of {world}")
        if world > 1:
            per_rank = "; ".join(f"rank {r}: {c}" for r, c in sorted(ranks.items()))
            part.details.append(
                f"{name}: gtest cases on {world} ranks: {counts} ({per_rank})")
    part.counts.add(gtest)
    part.counts.add(other)
    part.counts.failed += outside
    pieces = [f"ctest: {tests} tests",
              f"gtest cases in {gtest_tests} of them, every rank's: {gtest}",
              f"the other {tests - gtest_tests}: {other}"]
    if outside:
        pieces.append(f"{outside} failed outside their gtest cases")
    if exit_status not in (None, 0) and part.counts.failed == 0:
        part.counts.failed = 1
        part.failed_names.append(f"ctest (exit status {exit_status})")
        pieces.append(f"ctest exited with {exit_status}")
    part.summary = "; ".join(pieces + notes)
    return part


def read_pytest(path, exit_status):
    part = Part("pytest")
    root, problem = read_junit(path)
    if root is None:
        return no_results(part, problem)
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            part.counts.failed += 1
            part.failed_names.append(
                f"{case.get('classname', '')}::{case.get('name', '?')}")
        elif "skipped" in kinds:
            part.counts.skipped += 1
        else:
            part.counts.passed += 1
    part.summary = f"pytest: {part.counts}"
    if exit_status not in (None, 0) and part.counts.failed == 0:
        part.counts.failed = 1
        part.failed_names.append(f"pytest (exit status {exit_status})")
        part.summary += f"; pytest exited with {exit_status}"
    return part


def main(argv):
    parser = argparse.ArgumentParser(
        description="Totals of a test run over ctest and pytest, one line.")
    parser.add_argument("--ctest", metavar="JUNIT",
                        help="ctest's --output-junit file (ctest ran)")
    parser.add_argument("--ctest-status", type=int, metavar="N",
                        help="ctest's exit status")
    parser.add_argument("--pytest", metavar="JUNIT",
                        help="pytest's --junitxml file (pytest ran)")
    parser.add_argument("--pytest-status", type=int, metavar="N",
                        help="pytest's exit status")
    parser.add_argument("--per-test", action="store_true",
                        help="first a line per multi-rank ctest test")
    args = parser.parse_args(argv)

    parts = [
        read_ctest(args.ctest, args.ctest_status) if args.ctest
        else Part("ctest", summary="ctest: not run"),
        read_pytest(args.pytest, args.pytest_status) if args.pytest
        else Part("pytest", summary="pytest: not run"),
    ]
    totals = Counts()
    for part in parts:
        totals.add(part.counts)
        if args.per_test:
            for line in part.details:
                print(line)
    failed_names = [n for part in parts for n in part.failed_names]
    if failed_names:
        shown = failed_names[:MAX_NAMES]
        if len(failed_names) > MAX_NAMES:
            shown.append(f"and {len(failed_names) - MAX_NAMES} more")
        print("hostfuse tests failed: " + ", ".join(shown))
    print(f"hostfuse tests: {totals} "
          f"({'; '.join(part.summary for part in parts)})")
    return 1 if totals.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run the test suite as N pytest processes at once, each on a group of test files.

Why not pytest-xdist: its workers talk to the controller from a real thread, and the
suite monkey-patches threading with gevent (conftest.py), so a worker never wakes up
(gevent LoopExit).  Plain pytest processes have no such thread: this script packs the test
files into N groups of even recorded duration (tests/test_durations.json, recorded with
pytest-split's --store-durations) and runs the groups side by side.  Most of a test's time is spent
waiting on servers and clients (processes of their own), so on 2 cores four groups take
well under half the serial time.

    python scripts/pytest_groups.py [-j N] [pytest args...]

Each group's output goes to a log file and is printed whole when the group ends, so the
lines of different groups are not mixed.  The exit status is the first failing group's;
when no group collected a test it is 1 (pytest's 5, "no tests", must not pass silently).
Record new durations after adding tests: ``scripts/test --store-durations`` (each group records
its own tests with pytest-split's --store-durations; the figures are merged into the file).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATIONS = os.path.join(ROOT, "tests", "test_durations.json")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-j", "--groups", type=int, default=int(os.environ.get("BOSHROSTER_TEST_GROUPS", "4")))
    parser.add_argument("--store-durations", action="store_true")
    ours, rest = parser.parse_known_args(argv)
    groups = max(1, ours.groups)
    # -c/--rootdir: pytest looks for its ini file from the paths on the command line, and the
    # value of --durations-path (a temporary file when recording) would count as one
    base = [sys.executable, "-m", "pytest", "-c", os.path.join(ROOT, "pytest.ini"), "--rootdir", ROOT,
            "-q", "-p", "no:cacheprovider", *rest]
    if groups == 1:
        return subprocess.call(base, cwd=ROOT)
    plan = pack_files(groups)
    started = time.monotonic()
    logdir = tempfile.mkdtemp(prefix="boshroster-tests-")
    running = []
    recorded = []
    for group in range(1, groups + 1):
        log_path = os.path.join(logdir, f"group{group}.log")
        log = open(log_path, "w")
        durations = DURATIONS
        if ours.store_durations:  # each group records into its own copy (same split), merged below
            durations = os.path.join(logdir, f"durations{group}.json")
            shutil.copy(DURATIONS, durations)
            recorded.append(durations)
        cmd = [*base, *plan[group - 1]]
        if ours.store_durations:
            cmd += ["--store-durations", "--durations-path", durations]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        running.append((group, proc, log, log_path))
    print(f"test: {groups} pytest groups running (logs in {logdir})", flush=True)
    codes = {}
    pending = list(running)
    while pending:
        for entry in list(pending):
            group, proc, log, log_path = entry
            if proc.poll() is None:
                continue
            pending.remove(entry)
            log.close()
            codes[group] = proc.returncode
            print(f"\n===== group {group}/{groups}: exit {proc.returncode} "
                  f"after {time.monotonic() - started:.0f} s =====", flush=True)
            with open(log_path, errors="replace") as f:
                sys.stdout.write(f.read())
            sys.stdout.flush()
        time.sleep(0.2)
    print(f"\ntest: all {groups} groups done in {time.monotonic() - started:.0f} s; exit codes {codes}")
    if recorded:
        merge_durations(recorded)
    failing = [code for code in codes.values() if code not in (0, 5)]
    if failing:
        return failing[0]
    if all(code == 5 for code in codes.values()):
        print("test: pytest collected no tests: that is a failure", file=sys.stderr)
        return 1
    return 0


def pack_files(groups: int) -> list[list[str]]:
    """Test files into ``groups`` lists of even recorded duration (longest first, each to the
    least loaded group).  Whole files, not single tests: a module-scoped fixture (a Node.js
    client run, a browser, a PostgreSQL) then runs once, not once per group."""
    with open(DURATIONS) as f:
        recorded = json.load(f)
    files = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    weight = dict.fromkeys(files, 0.0)
    for test, seconds in recorded.items():
        name = test.split("::", 1)[0]
        if name in weight:
            weight[name] += seconds
    known = [w for w in weight.values() if w > 0]
    default = sum(known) / len(known) if known else 1.0
    plan: list[list[str]] = [[] for _ in range(groups)]
    loads = [0.0] * groups
    for name in sorted(files, key=lambda n: -(weight[n] or default)):
        target = loads.index(min(loads))
        plan[target].append(name)
        loads[target] += weight[name] or default
    return [sorted(group) for group in plan]


def merge_durations(paths: list[str]) -> None:
    """What each group measured (new tests, changed figures) into tests/test_durations.json."""
    with open(DURATIONS) as f:
        before = json.load(f)
    merged = dict(before)
    for path in paths:
        with open(path) as f:
            for test, seconds in json.load(f).items():
                if before.get(test) != seconds:
                    merged[test] = seconds
    with open(DURATIONS, "w") as f:
        json.dump(dict(sorted(merged.items())), f, indent=2)
        f.write("\n")
    print(f"test: {len(merged) - len(before)} new and {sum(1 for t in before if merged[t] != before[t])} "
          f"updated durations in {DURATIONS}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""BENCH_SERVER_PATCH: the archive's own CPU inside the benchmarked server (issue 11).

Wraps ``MamService._on_accepted`` (the ``message-accepted`` hook: preferences, copies,
``store``, the stanza-id) and ``SqliteArchive._write`` (one commit) with ``time.thread_time``
and writes the running totals (µs per archived message, messages per commit) as one JSON
line to ``$ARCHIVE_CPU_OUT`` every 2,000 messages, so a quick messages run tells where its
archive CPU went without the run-to-run noise of the whole-process figure:

    ARCHIVE_CPU_OUT=/tmp/a.json BENCH_SERVER_PATCH=bench/experiments/archive_cpu_patch.py \\
        scripts/bench --quick --only messages --transport ws
"""

import json
import os
import time

from boshroster.im import archive_sqlite, mam

_out = os.environ.get("ARCHIVE_CPU_OUT", "/tmp/archive_cpu.json")
_t = {"hook_s": 0.0, "write_s": 0.0, "messages": 0, "commits": 0, "committed": 0}
_hook, _write = mam.MamService._on_accepted, archive_sqlite.SqliteArchive._write


def _dump():
    m = max(1, _t["messages"])
    line = dict(_t, hook_us=round(_t["hook_s"] / m * 1e6, 2), write_us=round(_t["write_s"] / max(1, _t["committed"]) * 1e6, 2),
                per_commit=round(_t["committed"] / max(1, _t["commits"]), 1))
    with open(_out, "w") as fh:
        json.dump(line, fh)


def on_accepted(self, event):
    t = time.thread_time()
    try:
        return _hook(self, event)
    finally:
        _t["hook_s"] += time.thread_time() - t
        _t["messages"] += 1
        if _t["messages"] % 2000 == 0:
            _dump()


def write(self, chunk):
    t = time.thread_time()
    try:
        return _write(self, chunk)
    finally:
        _t["write_s"] += time.thread_time() - t
        _t["commits"] += 1
        _t["committed"] += len(chunk)


mam.MamService._on_accepted = on_accepted
archive_sqlite.SqliteArchive._write = write

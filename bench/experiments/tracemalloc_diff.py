"""Experiment patch (BENCH_SERVER_PATCH): what new sessions hold, by allocation site.

tracemalloc with 6 frames runs in the server.  SIGUSR1 takes the baseline snapshot; SIGUSR2 writes
to $BENCH_TRACEMALLOC_OUT (default /tmp/boshroster-tracemalloc-diff.txt) the growth since the
baseline, by line and by traceback, divided by $BENCH_TRACEMALLOC_N (the sessions added) so each
line reads "bytes per session".  Driven by bench/experiments/session_memory.py.
"""
import os as _os
import signal as _signal
import tracemalloc as _tm

import gevent as _gevent

_tm.start(6)
_base = {}


def _snap():
    snap = _tm.take_snapshot()
    return snap.filter_traces((_tm.Filter(False, _tm.__file__), _tm.Filter(False, "<frozen importlib._bootstrap>"),
                               _tm.Filter(False, "<frozen importlib._bootstrap_external>")))


def _baseline():
    _base["snap"] = _snap()


def _dump():
    n = max(1, int(_os.environ.get("BENCH_TRACEMALLOC_N", "1")))
    snap = _snap()
    base = _base.get("snap")
    out = _os.environ.get("BENCH_TRACEMALLOC_OUT", "/tmp/boshroster-tracemalloc-diff.txt")
    with open(out, "w") as fh:
        lines = snap.compare_to(base, "lineno") if base else snap.statistics("lineno")
        total = sum(getattr(s, "size_diff", s.size) for s in lines)
        fh.write(f"growth {total / 1024:.0f} KiB = {total / n:.0f} B per session ({n} sessions)\n\nby line:\n")
        for st in lines[:45]:
            size = getattr(st, "size_diff", st.size)
            count = getattr(st, "count_diff", st.count)
            if size <= 0:
                continue
            frame = st.traceback[0]
            where = frame.filename.split("site-packages/")[-1].split("/work/")[-1]
            fh.write(f"{size / n:8.0f} B {count / n:6.2f} blocks  {where}:{frame.lineno}\n")
        fh.write("\nby traceback (innermost last):\n")
        tbs = snap.compare_to(base, "traceback") if base else snap.statistics("traceback")
        for st in tbs[:20]:
            size = getattr(st, "size_diff", st.size)
            if size <= 0:
                continue
            fh.write(f"\n{size / n:.0f} B per session, {getattr(st, 'count_diff', st.count) / n:.2f} blocks\n")
            for line in st.traceback.format()[-12:]:
                fh.write(line.replace("/work/", "") + "\n")


_gevent.signal_handler(_signal.SIGUSR1, lambda: _gevent.spawn(_baseline))
_gevent.signal_handler(_signal.SIGUSR2, lambda: _gevent.spawn(_dump))

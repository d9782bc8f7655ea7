"""Experiment: where a session's memory goes.  tracemalloc in the server; on SIGUSR2 it writes
the allocations grouped by their innermost boshroster/gevent frame to /tmp/boshroster-tracemalloc.txt.

    BENCH_SERVER_PATCH=bench/experiments/tracemalloc_dump.py scripts/bench --quick --only idle --transport ws
    kill -USR2 <boshroster pid, printed by the bench>   # while the last stage is idle
"""
import signal as _signal
import tracemalloc as _tm

import gevent as _gevent

_tm.start(30)


def _dump():
    snap = _tm.take_snapshot()
    stats = snap.statistics("traceback")
    total = sum(s.size for s in stats)
    by_site = {}
    for st in stats:
        frames = list(st.traceback)  # oldest frame first
        key = None
        for fr in reversed(frames):  # the innermost frame that is ours, gevent's or greenlet's
            if "boshroster/" in fr.filename or "gevent" in fr.filename or "greenlet" in fr.filename:
                key = f"{fr.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{fr.lineno}"
                break
        key = key or f"{frames[-1].filename}:{frames[-1].lineno}"
        by_site[key] = by_site.get(key, 0) + st.size
    with open("/tmp/boshroster-tracemalloc.txt", "w") as fh:
        fh.write(f"total traced {total / 1024:.0f} KiB\n")
        for key, size in sorted(by_site.items(), key=lambda kv: -kv[1])[:60]:
            fh.write(f"{size / 1024:10.0f} KiB  {key}\n")
        fh.write("\nby top frames of the traceback:\n")
        for st in sorted(stats, key=lambda s: -s.size)[:25]:
            fh.write(f"\n{st.size / 1024:.0f} KiB in {st.count} blocks\n")
            for line in st.traceback.format()[-16:]:
                fh.write(line + "\n")


_gevent.signal_handler(_signal.SIGUSR2, lambda: _gevent.spawn(_dump))

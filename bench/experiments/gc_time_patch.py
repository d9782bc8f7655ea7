"""BENCH_SERVER_PATCH: the cyclic GC's share of the server's CPU (bench/README.md, fourth pass).

Times every collection (``gc.callbacks``, ``time.thread_time``) from the moment the patch runs
(before ``serve`` imports the server and builds the Core) and, at exit, appends one line per
server process to ``$GC_PATCH_OUT`` (default ``bench-results/gc-time.txt`` under the server's
cwd, the repository): the run directory, the thresholds, process CPU, GC time and its share,
and per generation the number of collections and their time.
Collections run without yielding, so one start/stop pair never interleaves with another.
"""

import atexit
import gc
import os
import sys
import time

_started = {}
_per_gen = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_cpu0 = time.process_time()


def _on_gc(phase, info):
    if phase == "start":
        _started["t"] = time.thread_time()
    else:
        entry = _per_gen[info["generation"]]
        entry[0] += 1
        entry[1] += time.thread_time() - _started.pop("t", time.thread_time())


def _report():
    cpu = time.process_time() - _cpu0
    spent = sum(e[1] for e in _per_gen.values())
    gens = " ".join(f"g{g}:{e[0]}/{e[1] * 1e3:.0f}ms" for g, e in _per_gen.items())
    out = os.environ.get("GC_PATCH_OUT", os.path.join("bench-results", "gc-time.txt"))
    with open(out, "a") as fh:
        fh.write(f"{os.path.basename(os.path.dirname(sys.argv[-1]))} thresholds {gc.get_threshold()} "
                 f"cpu {cpu:.3f}s gc {spent:.3f}s ({100 * spent / max(cpu, 1e-9):.2f}%) {gens}\n")


gc.callbacks.append(_on_gc)
atexit.register(_report)

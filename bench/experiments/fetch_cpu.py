"""Experiment: client-side CPU per roster fetch (RosterBackend.fetch), the backend in a process of
its own (bench/backend.py), this process pinned to one CPU and the backend to the other.

    PYTHONPATH=. .venv/bin/python bench/experiments/fetch_cpu.py [--n 2000] [--conc 1] [--rounds 5]
        [--against OLD.py]   # e.g. git show HEAD~3:boshroster/roster/backend.py > /tmp/old.py

With ``--against`` the rounds alternate between that file's RosterBackend and the current one
(same process, same backend), so the machine's drift affects both alike.

Prints the CPU per fetch of each round and the minimum (the least disturbed round: this VM's CPU
time is not a stable unit) and the backend's new connections (keep-alive check).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from boshroster.roster.backend import RosterBackend  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--conc", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--against", default="", help="another backend.py to alternate with")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    env = dict(os.environ)

    def pre():
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[1]})

    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "backend.py"), "--ring", "2000"],
                            stdout=subprocess.PIPE, preexec_fn=pre, env=env)
    try:
        port = int(proc.stdout.readline().split()[1])
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})
        url = f"http://127.0.0.1:{port}/contacts/%s"
        backends = {"current": RosterBackend(url, max_concurrency=max(20, args.conc))}
        if args.against:
            import importlib.util
            spec = importlib.util.spec_from_file_location("other_backend", args.against)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            backends["against"] = mod.RosterBackend(url, max_concurrency=max(20, args.conc))
        users = [f"u{i}" for i in range(2000)]
        for b in backends.values():
            for u in users[:50]:
                b.fetch(u)
        per: dict[str, list[float]] = {name: [] for name in backends}
        for r in range(args.rounds * len(backends)):
            name = list(backends)[r % len(backends)]
            rb = backends[name]
            results = per[name]
            pool = gevent.pool.Pool(args.conc)
            t0, w0, o0 = time.process_time(), time.perf_counter(), os.times()
            for i in range(args.n):
                pool.spawn(rb.fetch, users[i % len(users)])
            pool.join()
            cpu = (time.process_time() - t0) / args.n
            o1 = os.times()
            results.append(cpu)
            print(f"round {r} {name}: {cpu * 1e6:.0f} µs CPU per fetch (user {(o1.user - o0.user) / args.n * 1e6:.0f}, system"
                  f" {(o1.system - o0.system) / args.n * 1e6:.0f}), {(time.perf_counter() - w0) / args.n * 1e6:.0f} µs wall",
                  flush=True)
        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/_ctl/stats").read())
        for name, results in per.items():
            print(f"{name}: min {min(results) * 1e6:.0f} µs, median {sorted(results)[len(results) // 2] * 1e6:.0f} µs"
                  " per fetch")
        print(f"backend: {stats}")
    finally:
        proc.terminate()
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Experiment: sequential login latency per step, and a syscall timeline of the server (issue 12).

    .venv/bin/python bench/experiments/login_steps.py [--transport ws|bosh] [--n 200] [--strace FILE]
        [--server-set key=value ...]

Starts the bench backend and boshroster as scripts/bench does (quick user set, pinned), runs
``--n`` sequential logins after 20 warm-up ones and prints each step's p50/p95 (bench/clients.py
LOGIN_STEPS) and the total.  With ``--strace FILE`` the last 5 logins run under
``strace -f -tt -T`` attached to the server (slow: only the gaps between syscalls matter), so a
wait that is not CPU (a timer, a delayed ACK, a loop turn) shows up as a gap.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import gevent  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from clients import LOGIN_STEPS, login  # noqa: E402
from context import Ctx  # noqa: E402
from core import PASSWORD, close_all, make_client, pct  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", default="ws", choices=("bosh", "ws"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--strace", default="")
    ap.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from run import PROFILES

    prof = dict(PROFILES["quick"])
    settings = {}
    for item in args.server_set:
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    fake = types.SimpleNamespace(no_pin=False, backend_validators="etag", backend_nagle=False, server_settings=settings,
                                 profile="", transport=args.transport)
    ctx = Ctx(fake, prof)
    clients: list = []
    try:
        ctx.prepare_users()
        if ctx.pin:
            os.sched_setaffinity(0, {ctx.gen_cpu})
        ctx.start_backend()
        srv = ctx.start_server()
        users = [f"l{i}" for i in range(args.n + 25)]
        steps: list[dict] = []
        totals: list[float] = []
        tracer = None
        for i, u in enumerate(users):
            if args.strace and i == len(users) - 5:
                tracer = subprocess.Popen(["strace", "-f", "-tt", "-T", "-p", str(srv.pid), "-o", args.strace],
                                          stderr=subprocess.DEVNULL)
                gevent.sleep(1.0)
            c = make_client(ctx, args.transport, 60)
            clients.append(c)
            t = time.perf_counter()
            login(c, u, PASSWORD, ctx.scram)
            dt = time.perf_counter() - t
            if 20 <= i < len(users) - 5:
                steps.append(dict(c.steps))
                totals.append(dt)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
        for step in LOGIN_STEPS:
            vals = [s[step] for s in steps]
            print(f"{step:9s} p50 {pct(vals, 50) * 1e3:6.2f} ms  p95 {pct(vals, 95) * 1e3:6.2f} ms")
        print(f"{'total':9s} p50 {pct(totals, 50) * 1e3:6.2f} ms  p95 {pct(totals, 95) * 1e3:6.2f} ms  (n={len(totals)})")
    finally:
        close_all(clients)
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

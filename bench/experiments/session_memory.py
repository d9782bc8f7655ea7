"""Experiment: what one idle session costs the server, by allocation site (issue 12 point 4).

    .venv/bin/python bench/experiments/session_memory.py [--transport bosh|ws] [--n 500] [--wait 60]
        [--tracemalloc] [--server-set key=value ...]

Starts the bench backend and boshroster (as scripts/bench does, quick user set), logs in ``--n``
sessions (BOSH: one parked request each, like a Strophe client between messages; WebSocket: an
open socket) after 10 warm-up logins, lets them settle, and prints the server's RSS growth per
session.  With ``--tracemalloc`` the server runs bench/experiments/tracemalloc_diff.py: the Python
allocations the sessions added, by line and by traceback, per session
(/tmp/boshroster-tracemalloc-diff.txt).  tracemalloc slows the server ~10x and adds its own
memory: compare its per-line figures with each other, and the RSS figure of a run without it.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import gevent  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from clients import login  # noqa: E402
from context import Ctx  # noqa: E402
from core import PASSWORD, close_all, make_client, proc_rss_kib, run_pool  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", default="bosh", choices=("bosh", "ws"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--wait", type=int, default=60, help="BOSH wait: how long a request stays parked")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    from run import PROFILES  # the quick profile's user set (its accounts are cached by scripts/bench --quick)

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
    if args.tracemalloc:
        os.environ["BENCH_SERVER_PATCH"] = os.path.join(HERE, "tracemalloc_diff.py")
        os.environ["BENCH_TRACEMALLOC_N"] = str(args.n)
    clients: list = []
    try:
        ctx.prepare_users()
        if ctx.pin:
            os.sched_setaffinity(0, {ctx.gen_cpu})
        ctx.start_backend()
        srv = ctx.start_server(bosh_max_wait=args.wait)
        warm = [make_client(ctx, args.transport, args.wait) for _ in range(10)]
        for i, c in enumerate(warm):
            login(c, f"u{prof['ring'] - 1 - i}", PASSWORD, ctx.scram)
        close_all(warm)
        gevent.sleep(1.0)
        gc.collect()
        base = proc_rss_kib(srv.pid)
        if args.tracemalloc:
            os.kill(srv.pid, signal.SIGUSR1)
            gevent.sleep(2.0)

        def one(i):
            c = make_client(ctx, args.transport, args.wait)
            login(c, f"u{i}", PASSWORD, ctx.scram)
            if args.transport == "bosh":
                c.single_conn = True
            c.start(poll=True)
            clients.append(c)

        run_pool(50, range(args.n), one)
        gevent.sleep(args.settle)
        rss = proc_rss_kib(srv.pid)
        print(f"{args.n} idle {args.transport} sessions: RSS {base} -> {rss} KiB, "
              f"{(rss - base) / args.n:.1f} KiB per session{' (under tracemalloc)' if args.tracemalloc else ''}")
        if args.tracemalloc:
            out = "/tmp/boshroster-tracemalloc-diff.txt"
            if os.path.exists(out):
                os.unlink(out)
            os.kill(srv.pid, signal.SIGUSR2)
            for _ in range(600):  # comparing snapshots takes a while
                gevent.sleep(0.5)
                if os.path.exists(out) and os.path.getsize(out) > 0:
                    gevent.sleep(2.0)
                    break
            with open(out) as fh:
                print(fh.read())
    finally:
        for c in clients:
            c.drop()
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

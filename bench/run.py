#!/usr/bin/env python3
"""boshroster benchmark (issues 5, 12): speed and memory, as ratios to this machine's ceilings
and, with ``--peer ejabberd``, to ejabberd measured in the same run with the same generator.

Run through ``scripts/bench`` (which prepares ``.venv``).  This process is the load generator
(gevent, raw sockets, minimal HTTP and WebSocket framing: bench/clients.py) and the runner: it
starts, each on 127.0.0.1 and as processes of their own, the roster backend (bench/backend.py),
boshroster (afresh for every workload and transport), the ceiling servers (bench/ceiling.py),
the CPU probe (bench/probe.py) and, with ``--peer``, the peer (bench/peer_ejabberd.py), then runs
the workloads of bench/workloads/ (one module each, ``run(ctx, transport)``) against boshroster
and then against the peer.

Modules: core.py (/proc, child processes, the CPU meter), context.py (users, processes, profiling),
results.py (rows, normalization, table, --compare), clients.py (the generator's clients).

Output: a table on stdout and JSON lines in ``bench-results/<timestamp>.jsonl``.
``--compare FILE...`` prints the spread of several result files (reproducibility).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import peer_ejabberd  # noqa: E402
from context import Ctx  # noqa: E402
from core import TRANSPORTS, raise_nofile  # noqa: E402
from results import Results, compare, print_table  # noqa: E402
from workloads import ceilings, cluster, idle, login, messages, presence, refresh  # noqa: E402

# name -> module with run(ctx, transport); "ceilings" always runs first (the ratios need it)
WORKLOADS = {"ceilings": ceilings, "login": login, "idle": idle, "messages": messages, "refresh": refresh,
             "presence": presence, "cluster": cluster}
# what runs without --only: the cluster workload (Redis, 1 vs 2 nodes) only when asked for
DEFAULT_WORKLOADS = [w for w in WORKLOADS if w != "cluster"]
PEERS = ("ejabberd",)

PROFILES = {
    "default": dict(
        ring=10000, hub=100, login_warm=10, login_seq=200, login_conc=1000, login_plain=200, login_phases="seq,conc,plain",
        idle_stages=[500, 5000, 10000], idle_window=10.0, idle_wait=10, idle_settle=2.0,
        messages=50000, messages_warm=2000, pairs=50, window=10, archive="on",
        refresh_users=200, refresh_singles=400, refresh_conc=20, refresh_reps=3,
        presence_rounds=100, ceiling_seconds=5.0, ceiling_conns=50,
        cluster_logins=400, cluster_messages=25000,
    ),
    "quick": dict(
        ring=2000, hub=100, login_warm=10, login_seq=150, login_conc=400, login_plain=200, login_phases="seq,conc,plain",
        idle_stages=[100, 500, 1000], idle_window=2.5, idle_wait=3, idle_settle=0.3,
        messages=25000, messages_warm=1000, pairs=50, window=10, archive="on",
        refresh_users=200, refresh_singles=400, refresh_conc=20, refresh_reps=3,
        presence_rounds=60, ceiling_seconds=2.0, ceiling_conns=50,
        cluster_logins=200, cluster_messages=10000,
    ),
}



# -- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts (under 2 minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated workloads of {', '.join(WORKLOADS)}"
                                                " (the ceilings always run, briefly, for the ratios)")
    ap.add_argument("--transport", default="bosh,ws", help="bosh, ws or bosh,ws (default)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and generator to separate CPUs")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"), help="folder for the JSON lines")
    ap.add_argument("--profile", metavar="DIR", default="",
                    help="record each measured phase with py-spy (raw collapsed stacks in DIR) and print top functions")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a count of the profile, e.g. --set messages=150000 (see PROFILES in bench/run.py)")
    ap.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra boshroster config for experiments, e.g. --server-set websocket_ping_interval=0 (TOML/JSON value)")
    ap.add_argument("--compare", nargs="+", metavar="FILE", help="print the spread of several .jsonl results and exit")
    ap.add_argument("--peer", default="", choices=("",) + PEERS,
                    help="also run the workloads against this server, in the same run (ratios to it in the table)")
    ap.add_argument("--peer-dir", default="", help="the ejabberd private-instance starter (start.sh, stop.sh,"
                                                   f" patches/); default $BENCH_EJABBERD_DIR or {peer_ejabberd.DEFAULT_DIR}")
    ap.add_argument("--peer-schedulers", type=int, default=1,
                    help="Erlang schedulers for ejabberd (default 1: pinned to the server's CPU like boshroster)")
    ap.add_argument("--backend-validators", default="etag", choices=("etag", "last-modified", "both", "none"),
                    help="what the roster backend's replies carry for conditional GETs (default etag)")
    ap.add_argument("--backend-nagle", action="store_true",
                    help="roster backend without TCP_NODELAY, like Python's http.server (shows delayed-ACK stalls)")
    args = ap.parse_args()
    if args.compare:
        return compare(args.compare)
    only = [w.strip() for w in args.only.split(",") if w.strip()] or list(DEFAULT_WORKLOADS)
    for w in only:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    for t in transports:
        if t not in TRANSPORTS:
            ap.error(f"unknown transport {t!r}")
    if args.profile:
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(spy):
            ap.error("--profile needs py-spy (pip install py-spy)")
        args.py_spy = spy
    args.server_settings = {}
    for item in args.server_set:
        key, _, value = item.partition("=")
        try:
            args.server_settings[key] = json.loads(value)
        except ValueError:
            args.server_settings[key] = value
    raise_nofile()
    # SIGTERM/SIGINT: stop our children (by PID) on the way out, like a normal end
    gevent.signal_handler(signal.SIGTERM, gevent.getcurrent().throw, KeyboardInterrupt)
    prof = dict(PROFILES["quick" if args.quick else "default"])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in prof:
            ap.error(f"--set: unknown key {key!r}; one of {', '.join(prof)}")
        prof[key] = json.loads(value) if not isinstance(prof[key], str) else value
    ctx = Ctx(args, prof)
    if args.peer:
        ctx.peer = peer_ejabberd.make_peer(args.peer, ctx, args)
    started = datetime.datetime.now()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "boshroster"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    meta = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} CPU {cpu_model}, {platform.system()} {platform.release()}, Python {platform.python_version()}",
        "profile": "quick" if args.quick else "default", "git": git + ("+dirty" if dirty else ""),
        "only": only, "transports": transports, "server_settings": args.server_settings,
        "server_patch": os.environ.get("BENCH_SERVER_PATCH", ""), "pinned": ctx.pin,
        "sasl": "SCRAM-SHA-1 (client keys cached); PLAIN row separate", "settings": prof,
        "backend": {"validators": args.backend_validators, "nagle": args.backend_nagle}, "peer": args.peer,
    }
    path = os.path.join(args.out, started.strftime("%Y%m%d-%H%M%S") + ".jsonl")
    t_start = time.perf_counter()
    try:
        if ctx.peer is not None:
            ctx.peer.check()  # installs the package if needed, before anything is measured
            meta["peer_version"] = ctx.peer.version
        ctx.prepare_users()
        if ctx.pin:
            os.sched_setaffinity(0, {ctx.gen_cpu})
        ctx.results = Results(path, meta)
        ctx.start_backend()
        ctx.start_probe()
        gevent.sleep(1.0)  # a few probe samples before the first measurement
        print(f"bench: server on CPU {ctx.server_cpu}, generator+backend on CPU {ctx.gen_cpu}" if ctx.pin
              else "bench: not pinned", flush=True)
        print("== ceilings", flush=True)
        ceilings.run(ctx, transports)
        if "idle" in only:
            ceilings.run_idle(ctx, transports)
        targets = ["boshroster"] + ([ctx.peer.name] if ctx.peer is not None else [])
        for w in only:
            if w == "ceilings":
                continue
            for t in transports:
                for target in targets:
                    run_one(ctx, w, t, target)
    finally:
        baseline = ctx.probe_baseline()
        ctx.close()
        if ctx.results is not None:
            ctx.results.finalize(baseline)
            ctx.results.close()
    meta["probe_baseline"] = baseline
    print_table(ctx.results.rows, meta)
    print(f"\nresults: {os.path.relpath(path, ROOT)}; total {time.perf_counter() - t_start:.0f} s")
    return 0


def run_one(ctx: Ctx, workload: str, transport: str, target: str) -> None:
    """One workload on one transport against boshroster or the peer; a failure is recorded, not fatal."""
    if target != "boshroster" and workload in peer_ejabberd.UNSUPPORTED:
        if transport == ctx.args.transport.split(",")[0]:
            print(f"== {workload} / {target}: skipped ({peer_ejabberd.UNSUPPORTED[workload]})", flush=True)
        return
    print(f"== {workload} / {transport}" + ("" if target == "boshroster" else f" / {target}"), flush=True)
    ctx.target = ctx.results.server = target
    t0 = time.perf_counter()
    try:
        WORKLOADS[workload].run(ctx, transport)
    except Exception as exc:  # noqa: BLE001 - one broken workload must not hide the others
        print(f"  {workload}/{transport}/{target} FAILED: {exc!r}", flush=True)
        ctx.results._write({"type": "error", "server": target, "workload": workload, "transport": transport,
                            "error": repr(exc)})
    finally:
        ctx.target = ctx.results.server = "boshroster"
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)


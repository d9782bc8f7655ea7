"""Workload "cluster" (issue 14): WebSocket logins/s and messages/s on 1 node vs 2 nodes on one Redis.

Three set-ups, each started afresh (Redis flushed) and measured the same way:

* ``single``: one process, no Redis (the default deployment: the baseline);
* ``1 node``: the same process with ``cluster_redis_url`` (what the cluster costs one node);
* ``2 nodes``: two processes on one Redis; logins alternate between the nodes and the
  message pairs are split (u<2k> on node A, u<2k+1> on node B), so *every* message crosses
  nodes (XADD to the peer's inbox stream, XREADGROUP, XACK).

The accounts need no PostgreSQL: each node gets a copy of the bench's accounts database
(logins only read it) and no message goes to offline storage (everyone is online).  Pinning
(``ctx.pin``): node A on the server CPU, node B on the other one, Redis, the roster backend and
the generator on the generator CPU, so on a 2-core machine node B shares its core with the
generator and Redis; the measured 2-node/1-node throughput is then a floor.  The figures:

* rates (logins/s, delivered messages/s) and their 2-node / single ratio (target >= 1.8x);
* CPU per operation summed over the nodes and Redis, and its ratio to the single process's
  (target <= 1.3x), with the nodes' and Redis's parts apart;
* the capacity ratio 2 x single / per-node cost: what 2 nodes carry when each has a core of
  its own and the generator is elsewhere (derived from the CPU figures, stated as such);
* Redis commands per operation (``INFO commandstats``), the main ones named: the round trips
  that bound N nodes (README, "A cluster beyond this machine").
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import time

import gevent
import gevent.event
import gevent.lock
import redis

from clients import WsClient, login
from core import (DOMAIN, PASSWORD, Child, CpuClock, close_all, free_port, machine_busy, pct, proc_cpu, run_pool,
                  self_cpu)

RE_BODY = re.compile(r"<body>(\d+) (\d+) ([\d.]+)</body>")
SETUPS = ("single", "1 node", "2 nodes")


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    return found or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)


class MultiMeter:
    """CPU of several processes (the nodes, Redis) over an interval, with the median CPU per
    operation over ``window``-second slices as bench/core.Meter does (robust to CPU theft)."""

    def __init__(self, ctx, pids: dict[str, int], ops, window: float = 0.25):
        self.ctx, self.pids, self.ops = ctx, pids, ops
        self.mono0, self.m0 = time.monotonic(), machine_busy()
        self.clocks = {name: CpuClock(pid) for name, pid in pids.items()}
        self.samples = [(self._cpu(), ops())]
        self.g0, self.t0 = self_cpu(), time.perf_counter()
        self.sampler = gevent.spawn(self._sample, window)

    def _cpu(self) -> float:
        return sum(proc_cpu(pid) for pid in self.pids.values())

    def _sample(self, window: float) -> None:
        while True:
            gevent.sleep(window)
            self.samples.append((self._cpu(), self.ops()))

    def stop(self) -> dict:
        self.sampler.kill()
        self.samples.append((self._cpu(), self.ops()))
        wall = time.perf_counter() - self.t0
        parts = {name: clock.delta()[0] for name, clock in self.clocks.items()}
        ops = self.samples[-1][1] - self.samples[0][1]
        slices = [(c1 - c0) / (n1 - n0) for (c0, n0), (c1, n1) in zip(self.samples, self.samples[1:])
                  if n1 - n0 >= max(3, ops / len(self.samples) / 4) and c1 >= c0]
        total = sum(parts.values())
        per_op = statistics.median(slices) if len(slices) >= 3 else (total / ops if ops else None)
        scale = per_op / (total / ops) if ops and total and per_op else 1.0  # median slice vs overall
        gen = self_cpu() - self.g0
        probe, _n = self.ctx.probe_mean(self.mono0, time.monotonic())
        return {"wall": wall, "ops": ops, "cpu_per_op": per_op, "parts": {k: v / ops * scale if ops else None
                                                                           for k, v in parts.items()},
                "gen_share": gen / wall, "shares": {k: v / wall for k, v in parts.items()},
                "server_share": total / wall, "probe": probe,
                # CPU the machine spent on processes not ours (the probe and the backend count as others)
                "other_share": max(0.0, machine_busy() - self.m0 - total - gen) / wall}


class Setup:
    """Redis (unless single) and the nodes of one set-up, each pinned as the module docstring says."""

    def __init__(self, ctx, kind: str):
        self.ctx, self.kind = ctx, kind
        self.redis_child = None
        self.nodes: list = []
        overrides: dict = {}
        if kind != "single":
            binary = redis_binary()
            if binary is None:
                raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
            port = free_port()
            rdir = os.path.join(ctx.work, f"redis-{port}")
            os.makedirs(rdir)
            self.redis_child = Child("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", rdir,
                                               "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                                     ctx.gen_cpu, os.path.join(rdir, "redis.log"), port=port)
            self.redis = redis.Redis(port=port)
            overrides["cluster_redis_url"] = f"redis://127.0.0.1:{port}/0"
        cpus = [ctx.server_cpu, ctx.gen_cpu] if ctx.pin else [None, None]
        for i in range(2 if kind == "2 nodes" else 1):
            extra = dict(overrides, node_id=f"bench{i}") if overrides else {}
            self.nodes.append(ctx.start_server(cpu=cpus[i], **extra))
            ctx.server = None  # stopped here, not by ctx.stop_server
        self.clients: list = []

    def pids(self) -> dict[str, int]:
        found = {f"node{i}": node.pid for i, node in enumerate(self.nodes)}
        if self.redis_child is not None:
            found["redis"] = self.redis_child.pid
        return found

    def commands(self) -> dict[str, int]:
        if self.redis_child is None:
            return {}
        return {k.partition("_")[2]: v["calls"] for k, v in self.redis.info("commandstats").items()}

    def client(self, i: int) -> WsClient:
        node = self.nodes[i % len(self.nodes)]
        c = WsClient(("127.0.0.1", node.port), DOMAIN)
        self.clients.append(c)
        return c

    def close(self) -> None:
        close_all(self.clients)
        for node in self.nodes:
            node.stop(timeout=15)
            log = node.tail(2000)
            if "Traceback" in log or "ERROR" in log:
                print(f"  (node log: {node.log_path})\n    " + log[-1200:].replace("\n", "\n    "), flush=True)
        if self.redis_child is not None:
            self.redis_child.stop()


def redis_per_op(before: dict, after: dict, ops: int) -> tuple[float, str]:
    calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    calls = {k: v for k, v in calls.items() if v > 0 and k not in ("info", "ping")}
    total = sum(calls.values())
    top = ", ".join(f"{k} {v / ops:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6])
    return (total / ops if ops else 0.0), top


def measure_logins(ctx, setup: Setup) -> dict:
    p = ctx.p
    users = [f"l{i}" for i in range(p["login_warm"], p["login_warm"] + p["cluster_logins"])]
    done = [0]

    def one(index_user):
        index, user = index_user
        c = setup.client(index)
        login(c, user, PASSWORD, ctx.scram)
        done[0] += 1

    run_pool(10, list(enumerate(f"l{i}" for i in range(p["login_warm"]))), one)  # warm-up, both nodes
    done[0] = 0
    before = setup.commands()
    ctx.spy_start(setup.nodes[0].pid, f"cluster-logins-{setup.kind.replace(' ', '')}-node0")
    meter = MultiMeter(ctx, setup.pids(), lambda: done[0], window=0.1)
    run_pool(20, list(enumerate(users)), one)
    d = meter.stop()
    ctx.spy_stop()
    d["rate"] = len(users) / d["wall"]
    d["redis_per_op"], d["redis_top"] = redis_per_op(before, setup.commands(), len(users))
    return d


def measure_messages(ctx, setup: Setup) -> dict:
    p = ctx.p
    pairs, window = p["pairs"], p["window"]
    n = 2 * pairs
    def one(i):
        c = setup.client(i)  # u<even> on node A, u<odd> on node B
        login(c, f"u{i}", PASSWORD, ctx.scram)
        return c

    clients = run_pool(20, range(n), one)
    gevent.sleep(0.5)
    state = {"received": 0, "target": 0, "total": 0, "dups": 0}
    done = gevent.event.Event()
    sems = [gevent.lock.Semaphore(window) for _ in range(n)]
    seen = [set() for _ in range(n)]
    lat: list[float] = []

    def on_text(c, text):
        got = 0
        now = time.perf_counter()
        for m in RE_BODY.finditer(text):
            sender, seq = int(m.group(1)), int(m.group(2))
            lat.append(now - float(m.group(3)))
            if seq in seen[sender]:
                state["dups"] += 1
                continue
            seen[sender].add(seq)
            sems[sender].release()
            got += 1
        if got:
            state["received"] += got
            state["total"] += got
            if state["received"] >= state["target"]:
                done.set()

    for c in clients:
        c.buf, c.handler = "", on_text

    def sender(i, start, count):
        c, peer, sem = clients[i], f"u{i ^ 1}@{DOMAIN}", sems[i]  # i and i^1 are on different nodes
        for seq in range(start, start + count):
            sem.acquire()
            c.send(f"<message xmlns='jabber:client' to='{peer}' type='chat' id='m{seq}'>"
                   f"<body>{i} {seq} {time.perf_counter():.6f}</body></message>")

    def round_(start, each):
        state["received"], state["target"] = 0, each * n
        done.clear()
        senders = [gevent.spawn(sender, i, start, each) for i in range(n)]
        done.wait(timeout=max(60.0, each * n / 100))
        gevent.joinall(senders, timeout=1)

    warm = max(1, p["messages_warm"] // n)
    round_(0, warm)
    each = p["cluster_messages"] // n
    before = setup.commands()
    del lat[:]
    ctx.spy_start(setup.nodes[0].pid, f"cluster-messages-{setup.kind.replace(' ', '')}-node0")
    meter = MultiMeter(ctx, setup.pids(), lambda: state["total"])
    round_(warm, each)
    d = meter.stop()
    ctx.spy_stop()
    d["latency_p50"] = pct(lat, 50)
    d["lost"] = each * n - state["received"]
    d["dups"] = state["dups"]
    d["rate"] = state["received"] / d["wall"]
    d["redis_per_op"], d["redis_top"] = redis_per_op(before, setup.commands(), max(1, state["received"]))
    return d


def run(ctx, transport: str) -> None:
    if transport != "ws":
        print("  (cluster: WebSocket only; BOSH forwarding between nodes is tested, not benchmarked)", flush=True)
        return
    r = ctx.results
    figures: dict[str, dict] = {}
    for kind in SETUPS:
        for what, measure in (("logins", measure_logins), ("messages", measure_messages)):
            setup = Setup(ctx, kind)
            try:
                d = measure(ctx, setup)
            finally:
                setup.close()
            figures[(kind, what)] = d
            shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in d["shares"].items())
            parts = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in d["parts"].items() if v is not None)
            unit = "logins" if what == "logins" else "messages"
            note = f"CPU busy: {shares}; per op: {parts}"
            if what == "messages":
                note += f"; latency p50 {d['latency_p50'] * 1e3:.3g} ms; lost {d['lost']}, duplicates {d['dups']}"
            meter = {k: d[k] for k in ("wall", "ops", "cpu_per_op", "gen_share", "server_share", "other_share",
                                       "probe")}
            r.add("cluster", transport, f"{kind.replace(' ', '')}_{what}_rate", d["rate"], "/s",
                  f"{kind}: {unit}/s", lower_is_better=False, note=note, meter=meter)
            r.add("cluster", transport, f"{kind.replace(' ', '')}_{what}_cpu_per_op", d["cpu_per_op"], "s",
                  f"{kind}: CPU per {unit[:-1]} (nodes+Redis)", meter=meter,
                  note=(f"Redis: {d['redis_per_op']:.2f} commands/op ({d['redis_top']})" if kind != "single" else ""))
    def speed(d):  # CPU figures compare at the same CPU speed: divided by the probe's time then
        return d["probe"] or 1.0

    for what in ("logins", "messages"):
        single, two = figures[("single", what)], figures[("2 nodes", what)]
        slow = speed(two) / speed(single)  # how much slower the CPU ran during the 2-node phase
        r.add("cluster", transport, f"{what}_rate_ratio", two["rate"] / single["rate"], "x",
              f"{what}/s: 2 nodes / single (>= 1.8)", lower_is_better=False,
              note="measured; on 2 shared cores node B shares its CPU with the generator and Redis")
        r.add("cluster", transport, f"{what}_cost_ratio", two["cpu_per_op"] / single["cpu_per_op"] / slow, "x",
              f"CPU/{what[:-1]}: 2 nodes / single (<= 1.3)",
              note=f"probe-corrected (raw {two['cpu_per_op'] / single['cpu_per_op']:.2f}x, CPU {slow:.2f}x slower"
                   " in the 2-node phase)")
        node_cost = sum(v for k, v in two["parts"].items() if k.startswith("node") and v) / slow
        r.add("cluster", transport, f"{what}_capacity_ratio", 2 * single["cpu_per_op"] / node_cost, "x",
              f"{what}: 2-node capacity, derived", lower_is_better=False,
              note="2 x single CPU/op / 2-node nodes' CPU/op (probe-corrected): one core per node, Redis < 1 core")

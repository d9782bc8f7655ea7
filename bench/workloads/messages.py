"""Workload 3, messages: 50 pairs with a window of unacknowledged messages.

``--set archive=on`` (default: the server's default config, MAM archive on), ``off``
(``archive_enabled = false``), or ``both``: off then on, each on a fresh server, in the
same run; the table then shows the archive's cost as ``cpu_per_1000_archive_off`` next
to ``cpu_per_1000`` and their ratio (issue 11: at most 1.3x)."""

from __future__ import annotations

import re
import time

import gevent
import gevent.event
import gevent.lock

from clients import login
from core import DOMAIN, PASSWORD, Meter, make_client, pct, run_pool

RE_BODY = re.compile(r"<body>(\d+) (\d+) ([\d.]+)</body>")


def run(ctx, transport: str) -> None:
    mode = ctx.p.get("archive", "on")
    if mode not in ("on", "off", "both"):
        raise ValueError(f"--set archive: on, off or both, not {mode!r}")
    if ctx.on_peer:
        mode = "on"  # the peer's own configuration
    if mode in ("off", "both"):
        _run(ctx, transport, archive=False, suffix="_archive_off" if mode == "both" else "")
    if mode in ("on", "both"):
        _run(ctx, transport, archive=True, suffix="")


def _run(ctx, transport: str, archive: bool, suffix: str) -> None:
    p = ctx.p
    r = ctx.results
    pairs, window = p["pairs"], p["window"]
    n_clients = 2 * pairs
    overrides = {} if ctx.on_peer or archive else {"archive_enabled": False}
    with ctx.serving(**overrides) as (srv, clients):
        def one(i):
            c = make_client(ctx, transport)
            login(c, f"u{i}", PASSWORD, ctx.scram)
            c.start(poll=True)
            return c

        clients.extend(run_pool(20, range(n_clients), one))
        gevent.sleep(0.5)
        state = {"received": 0, "target": 0, "dups": 0, "total": 0}
        lat: list[float] = []
        done = gevent.event.Event()
        sems = [gevent.lock.Semaphore(window) for _ in range(n_clients)]
        seen = [bytearray() for _ in range(n_clients)]

        def on_text(c, text):
            now = time.perf_counter()
            got = 0
            for m in RE_BODY.finditer(text):
                sender, seq, ts = int(m.group(1)), int(m.group(2)), float(m.group(3))
                s = seen[sender]
                if seq >= len(s):
                    s.extend(b"\0" * (seq + 1 - len(s)))
                if s[seq]:
                    state["dups"] += 1
                    continue
                s[seq] = 1
                lat.append(now - ts)
                sems[sender].release()
                got += 1
            if got:
                state["received"] += got
                state["total"] += got
                if state["received"] >= state["target"]:
                    done.set()

        for c in clients:
            c.buf = ""
            c.handler = on_text

        def sender(i, start, count):
            c = clients[i]
            peer = f"u{i ^ 1}@{DOMAIN}"
            sem = sems[i]
            for seq in range(start, start + count):
                sem.acquire()
                c.send(f"<message xmlns='jabber:client' to='{peer}' type='chat' id='m{seq}'>"
                       f"<body>{i} {seq} {time.perf_counter():.6f}</body></message>")

        def round_(start, per_client):
            state["received"] = 0
            state["target"] = per_client * n_clients
            done.clear()
            del lat[:]
            t0 = time.perf_counter()
            senders = [gevent.spawn(sender, i, start, per_client) for i in range(n_clients)]
            done.wait(timeout=max(60.0, per_client * n_clients / 200))
            gevent.joinall(senders, timeout=1)
            return time.perf_counter() - t0

        warm_each = max(1, p["messages_warm"] // n_clients)
        round_(0, warm_each)
        per_client = p["messages"] // n_clients
        ctx.spy_start(srv.pid, f"messages-{transport}")
        m = Meter(ctx, srv.pid, ops=lambda: state["total"])
        elapsed = round_(warm_each, per_client)
        d = m.stop()
        ctx.spy_stop()
        gevent.sleep(0.5)  # late or duplicate deliveries would show up now
        sent = per_client * n_clients
        got = state["received"]
        lost = sent - got
        cpu1000 = d["cpu_per_op"] * 1000 if got else None
        is_bosh = transport == "bosh"
        ceil_cpu = ctx.ceil.get("http_cpu" if is_bosh else "ws_cpu")
        ceil_rate = ctx.ceil.get("http_rate" if is_bosh else "ws_rate")
        ceil_p50 = ctx.ceil.get("http_rtt1" if is_bosh else "ws_rtt1")
        reqs = ""
        if is_bosh:
            reqs = f", {sum(c.requests_done for c in clients)} HTTP requests in all"
        if suffix:  # the archive-off figure of a --set archive=both run: one row, no ceiling target
            r.add("messages", transport, "cpu_per_1000" + suffix, cpu1000, "s", "server CPU per 1,000, archive off",
                  meter=d, note=f"{got} delivered, lost {lost}")
            return
        r.add("messages", transport, "cpu_per_1000", cpu1000, "s", "server CPU per 1,000 messages",
              ceiling=ceil_cpu * 1000 if ceil_cpu else None, ceiling_probe=ctx.ceil_probe.get("http" if is_bosh else "ws"),
              ceiling_label="1,000 bare requests" if is_bosh else "1,000 bare echo msgs", meter=d,
              note=f"{got} delivered, {pairs} pairs, window {window}/sender{reqs}")
        r.add("messages", transport, "delivered_rate", got / elapsed, "/s", "delivered messages/s", ceiling=ceil_rate,
              meter=d, lower_is_better=False)
        r.add("messages", transport, "latency_p50", pct(lat, 50), "s", "latency p50", ceiling=ceil_p50, meter=d)
        r.add("messages", transport, "latency_p99", pct(lat, 99), "s", "latency p99", ceiling=ceil_p50, meter=d)
        r.add("messages", transport, "lost", lost, "", "lost (must be 0)", meter=d,
              note=f"duplicates {state['dups']}; sessions closed {sum(1 for c in clients if c.closed)}")



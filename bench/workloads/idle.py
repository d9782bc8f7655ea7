"""Workload 2, idle: RSS and CPU of many logged-in idle sessions, then a ping to each."""

from __future__ import annotations

import contextlib
import gc
import re
import time

import gevent

from clients import BenchError, login
from core import PASSWORD, Meter, close_all, make_client, proc_rss_kib, run_pool


def _ping(c, i: int) -> bool:
    c.buf = ""
    c.send(f"<iq xmlns='jabber:client' type='get' id='ping{i}'><ping xmlns='urn:xmpp:ping'/></iq>")
    try:
        c.expect(re.compile(r'<iq\b[^>]*\bid=["\']ping%d["\']' % i), timeout=60)
    except BenchError:
        return False
    return True


@contextlib.contextmanager
def _dropped(clients: list):
    """Drop (not close) every client at the end: the server is stopped right after anyway."""
    try:
        yield
    finally:
        for c in clients:
            c.drop()


def run(ctx, transport: str) -> None:
    p = ctx.p
    wait = p["idle_wait"]
    r = ctx.results
    clients: list = []  # dropped, not closed, at the end: the server is stopped anyway
    mode = "http" if transport == "bosh" else "ws"
    with ctx.serving(bosh_max_wait=max(wait, 1)) as (srv, _closed_at_end), _dropped(clients):
        # warm-up: a few sessions in and out, so lazily imported code is in the baseline
        warm = [make_client(ctx, transport, wait) for _ in range(10)]
        for i, c in enumerate(warm):
            login(c, f"u{p['ring'] - 1 - i}", PASSWORD, ctx.scram)
        close_all(warm)
        gevent.sleep(1.0)
        gc.collect()
        base = proc_rss_kib(srv.pid)
        made = 0
        ping_round = 0
        for stage in p["idle_stages"]:
            def one(i):
                c = make_client(ctx, transport, wait)
                login(c, f"u{i}", PASSWORD, ctx.scram)
                if transport == "bosh":
                    c.single_conn = True
                c.start(poll=True)
                clients.append(c)

            m = Meter(ctx, srv.pid)
            run_pool(50, range(made, stage), one)
            d = m.stop()
            added = stage - made
            made = stage
            r.add("idle", transport, f"login_rate_{stage}", added / d["wall"], "/s", f"{stage}: logins/s to reach it",
                  meter=d, lower_is_better=False, note=f"50 concurrent; server CPU {d['server_cpu'] / added * 1e3:.2f} ms/login incl. re-polls of those already idle")
            gevent.sleep(p["idle_settle"])
            rss = proc_rss_kib(srv.pid)
            polls0 = sum(c.requests_done for c in clients) if transport == "bosh" else 0
            ctx.spy_start(srv.pid, f"idle-{stage}-{transport}")
            m = Meter(ctx, srv.pid)
            gevent.sleep(p["idle_window"])
            d = m.stop()
            ctx.spy_stop()
            polls = (sum(c.requests_done for c in clients) - polls0) if transport == "bosh" else 0
            per = (rss - base) / stage
            r.add("idle", transport, "rss_per_session" if stage == p["idle_stages"][-1] else f"rss_per_session_{stage}",
                  per, "KiB", f"{stage}: RSS per session", ceiling=ctx.ceil.get(f"{mode}_idle_rss"), meter=d,
                  note=f"RSS {rss / 1024:.0f} MiB, base {base / 1024:.0f} MiB", extra={"sessions": stage})
            ceil_idle = ctx.ceil.get(f"{mode}_idle_cpu")
            # the bare echo's idle sockets cost ~nothing: no ratio to a zero
            ceil_scaled = ceil_idle * stage / p["idle_stages"][-1] if ceil_idle and ceil_idle > 0.002 else None
            note = f"window {p['idle_window']:.0f}s"
            if transport == "bosh":
                note += f", wait={wait}s, {polls} re-polls"
                if polls:
                    note += f" ({d['server_cpu'] / polls * 1e6:.0f} µs each)"
            r.add("idle", transport, f"idle_cpu_{stage}", d["server_share"], "%core", f"{stage}: server CPU while idle",
                  ceiling=ceil_scaled, meter=d, note=note, ceiling_probe=ctx.ceil_probe.get(f"{mode}_idle"))
            t0 = time.perf_counter()
            ping_round += 1
            base_id = ping_round * 1_000_000
            ok = run_pool(200, range(len(clients)), lambda i: _ping(clients[i], base_id + i))
            took = time.perf_counter() - t0
            dead = sum(1 for c in clients if c.closed)
            r.add("idle", transport, f"ping_ok_{stage}", sum(ok), "", f"{stage}: sessions answering a ping",
                  lower_is_better=False, note=f"of {stage}; {dead} closed; pinged all in {took:.1f}s")



"""Workload 5, presence: one user with 100 online contacts changes presence."""

from __future__ import annotations

import re
import time

import gevent
import gevent.event

from clients import BenchError, login
from core import PASSWORD, Meter, make_client, pct, run_pool

RE_STATUS = re.compile(r"<status>r(\d+)</status>")


def run(ctx, transport: str) -> None:
    p = ctx.p
    r = ctx.results
    hub = p["hub"]
    with ctx.serving() as (srv, clients):
        def one(i):
            c = make_client(ctx, transport)
            login(c, f"h{i}", PASSWORD, ctx.scram)
            c.start(poll=True)
            return c

        contacts = run_pool(20, range(1, hub + 1), one)
        h0 = one(0)
        clients.extend(contacts + [h0])
        gevent.sleep(0.5)
        state = {"round": -1, "count": 0, "last": 0.0}
        done = gevent.event.Event()

        def on_text(c, text):
            for m in RE_STATUS.finditer(text):
                if int(m.group(1)) == state["round"]:
                    state["count"] += 1
                    state["last"] = time.perf_counter()
                    if state["count"] >= hub:
                        done.set()

        for c in contacts:
            c.buf = ""
            c.handler = on_text
        h0.handler = lambda c, text: None
        shows = ("away", "chat", "dnd", "xa")

        def fanout(k):
            state["round"], state["count"] = k, 0
            done.clear()
            t0 = time.perf_counter()
            h0.send(f"<presence xmlns='jabber:client'><show>{shows[k % 4]}</show><status>r{k}</status></presence>")
            if not done.wait(timeout=10):
                raise BenchError(f"round {k}: only {state['count']}/{hub} contacts got the presence")
            gevent.sleep(0.03)  # BOSH contacts re-park; counted in the CPU, not in the time
            return state["last"] - t0

        for k in range(3):
            fanout(k)
        rounds = p["presence_rounds"]
        ctx.spy_start(srv.pid, f"presence-{transport}")
        times: list[float] = []
        m = Meter(ctx, srv.pid, ops=lambda: len(times), window=1.0)
        for k in range(3, 3 + rounds):
            times.append(fanout(k))
        d = m.stop()
        ctx.spy_stop()
        is_bosh = transport == "bosh"
        ceil_cpu = ctx.ceil.get("http_cpu" if is_bosh else "ws_cpu")
        r.add("presence", transport, "cpu_per_fanout", d["cpu_per_op"], "s",
              f"fan-out to {hub}: server CPU", ceiling=ceil_cpu * hub if ceil_cpu else None, meter=d,
              ceiling_probe=ctx.ceil_probe.get("http" if is_bosh else "ws"),
              ceiling_label=f"{hub} bare requests" if is_bosh else f"{hub} bare echo msgs", note=f"{rounds} rounds")
        r.add("presence", transport, "time_p50", pct(times, 50), "s", f"fan-out to {hub}: until all received, p50", meter=d)
        r.add("presence", transport, "time_max", max(times), "s", f"fan-out to {hub}: until all received, max", meter=d)



"""Workload 1, login: sequential, 20 concurrent, PLAIN; latency per step of the sequential ones."""

from __future__ import annotations

import time

import gevent

from clients import LOGIN_STEPS, login
from core import PASSWORD, Meter, make_client, pct, run_pool
from results import fmt_value


def run(ctx, transport: str) -> None:
    p = ctx.p
    r = ctx.results
    names = [f"l{i}" for i in range(p["login_warm"] + p["login_seq"] + p["login_conc"] + p["login_plain"])]
    warm = names[:p["login_warm"]]
    seq = names[p["login_warm"]:p["login_warm"] + p["login_seq"]]
    conc = names[p["login_warm"] + p["login_seq"]:p["login_warm"] + p["login_seq"] + p["login_conc"]]
    plain = names[p["login_warm"] + p["login_seq"] + p["login_conc"]:]
    items_seen: list[int] = []
    step_times: list[dict] = []
    logged_in = [0]
    ceil_cpu = ctx.ceil.get("http_cpu" if transport == "bosh" else "ws_cpu")
    ceil_p50 = ctx.ceil.get("http_rtt1" if transport == "bosh" else "ws_rtt1")
    ceil_rate = ctx.ceil.get("http_rate" if transport == "bosh" else "ws_rate")
    what = "bare requests" if transport == "bosh" else "bare echo msgs"

    def one(user, mechanism="SCRAM-SHA-1"):
        c = make_client(ctx, transport)
        clients.append(c)
        t0 = time.perf_counter()
        items = login(c, user, PASSWORD, ctx.scram, mechanism)
        dt = time.perf_counter() - t0
        c.start(poll=True)
        items_seen.append(items)
        step_times.append(c.steps)
        logged_in[0] += 1
        return dt

    with ctx.serving() as (srv, clients):
        for u in warm:
            one(u)
        gevent.sleep(0.2)
        for phase, users, conc_n, mech in (("sequential", seq, 1, "SCRAM-SHA-1"), ("20 concurrent", conc, 20, "SCRAM-SHA-1"),
                                           ("20 concurrent PLAIN", plain, 20, "PLAIN")):
            tag = {"sequential": "seq", "20 concurrent": "conc", "20 concurrent PLAIN": "plain"}[phase]
            if not users or tag not in p["login_phases"].split(","):  # --set login_phases=seq: only that one
                continue
            ctx.spy_start(srv.pid, f"login-{tag}-{transport}")
            m = Meter(ctx, srv.pid, ops=lambda: logged_in[0], window=0.1)
            del step_times[:]
            if conc_n == 1:
                lat = [one(u, mech) for u in users]
            else:
                lat = run_pool(conc_n, users, lambda u, mech=mech: one(u, mech))
            d = m.stop()
            ctx.spy_stop()
            n = len(users)
            cpu = d["cpu_per_op"]
            note = f"{n} logins, {mech}"
            r.add("login", transport, f"{tag}_cpu_per_login", cpu, "s",
                  f"{phase}: server CPU per login", ceiling=(ceil_cpu or 0) or None, ceiling_label=what, meter=d, note=note,
                  ceiling_probe=ctx.ceil_probe.get("http" if transport == "bosh" else "ws"),
                  extra={"phase": tag})
            if tag == "plain":
                continue
            r.add("login", transport, f"{tag}_p50", pct(lat, 50), "s", f"{phase}: latency p50", ceiling=ceil_p50, meter=d)
            r.add("login", transport, f"{tag}_p95", pct(lat, 95), "s", f"{phase}: latency p95", ceiling=ceil_p50, meter=d)
            r.add("login", transport, f"{tag}_p99", pct(lat, 99), "s", f"{phase}: latency p99", ceiling=ceil_p50, meter=d)
            r.add("login", transport, f"{tag}_rate", n / d["wall"], "/s", f"{phase}: logins/s", ceiling=ceil_rate,
                  meter=d, lower_is_better=False)
            if not ctx.on_peer:  # the peer keeps rosters itself: no backend
                r.add("login", transport, f"{tag}_gets_per_login", d["backend_gets"] / n, "",
                      f"{phase}: backend GETs per login", meter=d,
                      note=f"roster items {min(items_seen)}..{max(items_seen)}; {d['backend_conditional']} conditional")
                r.add("login", transport, f"{tag}_backend_connections", d["backend_connections"], "",
                      f"{phase}: new backend connections", meter=d,
                      note=f"for {d['backend_gets']} GETs (keep-alive: at most roster_max_concurrency)")
            if tag == "seq":
                for step in LOGIN_STEPS:
                    vals = [st[step] for st in step_times if step in st]
                    r.add("login", transport, f"seq_step_{step}_p50", pct(vals, 50), "s",
                          f"sequential: step {step}, p50", meter=d, note=f"p95 {fmt_value(pct(vals, 95), 's')}")



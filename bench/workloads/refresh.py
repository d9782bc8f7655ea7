"""Workload 4, refresh: one POST naming 200 online users, 400 single POSTs, overlapping POSTs."""

from __future__ import annotations

import json
import re
import statistics
import time

import gevent
import gevent.event

from clients import HttpConn, login
from core import PASSWORD, Meter, make_client, pct, run_pool

RE_PUSH = re.compile(r'<iq\b[^>]*?\bid="([^"]+)"[^>]*><query xmlns="jabber:iq:roster"')


def run(ctx, transport: str) -> None:
    p = ctx.p
    r = ctx.results
    n = p["refresh_users"]
    names = [f"u{i}" for i in range(n)]
    refresh_prefix = ("POST /roster_admin/refresh HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      "Content-Type: application/json\r\nContent-Length: ").encode()
    with ctx.serving() as (srv, clients):
        def one(i):
            c = make_client(ctx, transport)
            login(c, names[i], PASSWORD, ctx.scram)
            c.start(poll=True)
            c.data["pushes"] = 0
            return c

        clients.extend(run_pool(20, range(n), one))
        gevent.sleep(0.5)
        state = {"pushes": 0, "target": 0, "last": 0.0}
        done = gevent.event.Event()

        def on_text(c, text):
            ids = RE_PUSH.findall(text)
            if not ids:
                return
            c.data["pushes"] += len(ids)
            for push_id in ids:
                c.send(f"<iq xmlns='jabber:client' type='result' id='{push_id}'/>")
            state["pushes"] += len(ids)
            state["last"] = time.perf_counter()
            if state["pushes"] >= state["target"]:
                done.set()

        for c in clients:
            c.buf = ""
            c.handler = on_text

        def refresh(conn, users):
            return json.loads(conn.request(json.dumps(users).encode(), prefix=refresh_prefix))

        # one POST naming all n, repeated (median): the backend changes all n rosters before each
        conn = HttpConn(("127.0.0.1", srv.port))
        reps = []
        for rep in range(p["refresh_reps"]):
            ctx.bump(names)
            before = {c.user: c.data["pushes"] for c in clients}
            state["target"] = state["pushes"] + n
            done.clear()
            if rep == 0:
                ctx.spy_start(srv.pid, f"refresh-{transport}")
            m = Meter(ctx, srv.pid)
            t0 = time.perf_counter()
            reply = refresh(conn, names)
            t_reply = time.perf_counter() - t0
            done.wait(timeout=60)
            t_all = state["last"] - t0
            d = m.stop()
            if rep == 0:
                ctx.spy_stop()
            missing = sum(1 for c in clients if c.data["pushes"] - before[c.user] < 1)
            extra = sum(max(0, c.data["pushes"] - before[c.user] - 1) for c in clients)  # one change: one push
            reps.append({"reply": t_reply, "all": t_all, "d": d, "missing": missing, "extra": extra, "answer": reply})
            gevent.sleep(0.2)
        med = lambda key: statistics.median(x[key] for x in reps)  # noqa: E731
        d = dict(reps[-1]["d"])
        d["server_cpu"] = statistics.median(x["d"]["server_cpu"] for x in reps)
        d["backend_gets"] = statistics.median(x["d"]["backend_gets"] for x in reps)
        d["backend_connections"] = statistics.median(x["d"]["backend_connections"] for x in reps)
        if all(x["d"].get("probe") for x in reps):
            d["probe"] = d["server_cpu"] / statistics.median(x["d"]["server_cpu"] / x["d"]["probe"] for x in reps)
        answers = "; ".join(f"updated={x['answer'].get('updated')} errors={x['answer'].get('errors')}" for x in reps)
        k = len(reps)
        r.add("refresh", transport, "reply_time", med("reply"), "s", f"one POST of {n}: time to reply", meter=d,
              note=f"median of {k}; {answers}")
        r.add("refresh", transport, "all_pushed_time", med("all"), "s", f"one POST of {n}: until every push arrived",
              meter=d, note=f"median of {k}; users without their push: {sum(x['missing'] for x in reps)},"
              f" pushes beyond one per user: {sum(x['extra'] for x in reps)}")
        r.add("refresh", transport, "backend_gets", d["backend_gets"], "", f"one POST of {n}: backend GETs", meter=d,
              note=f"median of {k}")
        r.add("refresh", transport, "backend_connections", d["backend_connections"], "",
              f"one POST of {n}: new backend conns", meter=d,
              note=f"median of {k}; {p['refresh_conc']} in flight at most: 0 when the pool keeps them all")
        r.add("refresh", transport, "server_cpu", d["server_cpu"], "s", f"one POST of {n}: server CPU", meter=d,
              note=f"median of {k}")
        r.add("refresh", transport, "cpu_per_user", d["server_cpu"] / n, "s", f"one POST of {n}: CPU per user",
              meter=d, note=f"median of {k}")

        # n_single POSTs of one user each, at concurrency c; the backend changes before each
        singles = [names[i % n] for i in range(p["refresh_singles"])]
        conc = p["refresh_conc"]
        conns = [HttpConn(("127.0.0.1", srv.port)) for _ in range(conc)]
        bconns = [HttpConn(("127.0.0.1", ctx.backend.port), path="/_ctl/bump", content_type="application/json")
                  for _ in range(conc)]
        free = list(range(conc))
        lat: list[float] = []
        state["target"] = state["pushes"] + len(singles)
        done.clear()

        def single(user):
            k = free.pop()
            try:
                ctx.bump([user], bconns[k])
                t = time.perf_counter()
                refresh(conns[k], [user])
                lat.append(time.perf_counter() - t)
            finally:
                free.append(k)

        m = Meter(ctx, srv.pid, ops=lambda: len(lat))
        t0 = time.perf_counter()
        run_pool(conc, singles, single)
        done.wait(timeout=60)
        t_all = time.perf_counter() - t0
        d = m.stop()
        got = state["pushes"] - (state["target"] - len(singles))
        r.add("refresh", transport, "single_total_time", t_all, "s", f"{len(singles)} single POSTs (conc {conc}): total",
              meter=d, note=f"{got}/{len(singles)} pushes")
        r.add("refresh", transport, "single_p50", pct(lat, 50), "s", f"{len(singles)} single POSTs: reply p50", meter=d)
        r.add("refresh", transport, "single_p99", pct(lat, 99), "s", f"{len(singles)} single POSTs: reply p99", meter=d)
        r.add("refresh", transport, "single_backend_gets", d["backend_gets"], "", f"{len(singles)} single POSTs: backend GETs",
              meter=d)
        r.add("refresh", transport, "single_cpu_per_post", d["cpu_per_op"], "s",
              f"{len(singles)} single POSTs: server CPU per POST", meter=d)

        # overlap: 3 POSTs for the same user at once, right after one change (single flight)
        state["target"] = state["pushes"] + n
        done.clear()
        before = {c.user: c.data["pushes"] for c in clients}

        def triple(user):
            k = free.pop()
            try:
                ctx.bump([user], bconns[k])
                extra = [HttpConn(("127.0.0.1", srv.port)) for _ in range(2)]
                jobs = [gevent.spawn(refresh, cn, [user]) for cn in (conns[k], *extra)]
                gevent.joinall(jobs, raise_error=True)
                for cn in extra:
                    cn.close()
            finally:
                free.append(k)

        m = Meter(ctx, srv.pid)
        run_pool(conc, names, triple)
        done.wait(timeout=30)
        gevent.sleep(0.3)
        d = m.stop()
        pushes = {c.user: c.data["pushes"] - before[c.user] for c in clients}
        wrong = sum(1 for v in pushes.values() if v != 1)
        r.add("refresh", transport, "overlap_backend_gets", d["backend_gets"], "",
              f"{n}x3 overlapping POSTs: backend GETs", meter=d,
              note=f"{sum(pushes.values())} pushes; users without exactly 1: {wrong}")
        for cn in conns + bconns:
            cn.close()
        conn.close()



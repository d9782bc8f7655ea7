"""The machine's ceilings: a bare pywsgi request, a bare gevent-websocket echo, idle connections on both."""

from __future__ import annotations

import os
import sys
import time

import gevent
import gevent.event

from clients import HttpConn, WsClient, ws_frame
from core import DOMAIN, HERE, Child, Meter, pct, proc_rss_kib, run_pool

TINY_POST = (b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1234567' sid='abcdefghijklmnopqrstuvwxyzABCDEF'>"
             b"<message xmlns='jabber:client' to='u1@localhost' type='chat' id='m1'><body>0 1 12345.678901</body>"
             b"</message></body>")
# Tiny, like the design notes' figure: gevent-websocket validates UTF-8 byte by byte in Python, so a
# stanza-sized echo (~130 B) costs it ~3x more; BENCH_ECHO_BYTES=130 shows that.
ECHO_MSG = "<message/>" if not os.environ.get("BENCH_ECHO_BYTES") else "<message>" + "x" * (
    int(os.environ["BENCH_ECHO_BYTES"]) - 19) + "</message>"


def run(ctx, transports) -> None:
    p = ctx.p
    seconds, conns = p["ceiling_seconds"], p["ceiling_conns"]
    if "bosh" in transports:
        srv = Child("ceiling-http", [sys.executable, os.path.join(HERE, "ceiling.py"), "http"], ctx.server_cpu,
                    os.path.join(ctx.work, "ceiling-http.log"))
        try:
            addr = ("127.0.0.1", srv.port)
            stop = [False]
            count = [0]
            lat: list[float] = []

            def loop(_):
                c = HttpConn(addr, path="/")
                while not stop[0]:
                    t0 = time.perf_counter()
                    c.request(TINY_POST)
                    lat.append(time.perf_counter() - t0)
                    count[0] += 1
                c.close()

            one = HttpConn(addr, path="/")
            rtt = []
            for _ in range(300):
                t0 = time.perf_counter()
                one.request(TINY_POST)
                rtt.append(time.perf_counter() - t0)
            one.close()
            ctx.ceil["http_rtt1"] = pct(rtt[50:], 50)
            workers = [gevent.spawn(loop, i) for i in range(conns)]
            gevent.sleep(min(1.0, seconds / 2))
            n0, lat_n0 = count[0], len(lat)
            ctx.spy_start(srv.pid, "ceiling-http")
            m = Meter(ctx, srv.pid, ops=lambda: count[0])
            gevent.sleep(seconds)
            d = m.stop()
            n = count[0] - n0
            ctx.spy_stop()
            stop[0] = True
            gevent.joinall(workers, timeout=5)
            cpu = d["cpu_per_op"]
            ctx.ceil_probe["http"] = d["probe"]
            ctx.ceil.update(http_cpu=cpu, http_rate=n / d["wall"], http_p50=pct(lat[lat_n0:], 50))
            r = ctx.results
            r.add("ceilings", "http", "cpu_per_request", cpu, "s", "bare pywsgi: server CPU per request", meter=d,
                  note=f"{conns} kept-alive conns, TCP_NODELAY")
            r.add("ceilings", "http", "rate", n / d["wall"], "/s", "bare pywsgi: requests/s", meter=d, lower_is_better=False)
            r.add("ceilings", "http", "latency_p50", ctx.ceil["http_p50"], "s", f"bare pywsgi: round trip p50, {conns} conns",
                  meter=d)
            r.add("ceilings", "http", "rtt1_p50", ctx.ceil["http_rtt1"], "s", "bare pywsgi: round trip p50, 1 conn")
        finally:
            srv.stop()
    if "ws" in transports:
        srv = Child("ceiling-ws", [sys.executable, os.path.join(HERE, "ceiling.py"), "ws"], ctx.server_cpu,
                    os.path.join(ctx.work, "ceiling-ws.log"))
        try:
            addr = ("127.0.0.1", srv.port)
            stop = [False]
            count = [0]
            lat: list[float] = []
            frame = ws_frame(ECHO_MSG)

            one = WsClient(addr, DOMAIN, path="/", subprotocol=None)
            got = gevent.event.Event()
            one.handler = lambda c, text: got.set()
            one.connect()
            rtt = []
            for _ in range(300):
                got.clear()
                t0 = time.perf_counter()
                one.sock.sendall(frame)
                got.wait(5)
                rtt.append(time.perf_counter() - t0)
            one.drop()
            ctx.ceil["ws_rtt1"] = pct(rtt[50:], 50)
            # The loaded phase: the tightest loop we can write (the echo frame has a known size), so that
            # the generator is not what limits a bare echo that costs the server only ~20-35 µs.
            reply_len = 2 + len(ECHO_MSG.encode())
            socks = []
            for _ in range(conns):
                c = WsClient(addr, DOMAIN, path="/", subprotocol=None)
                c.connect()
                c.reader.kill()  # this loop reads the socket itself
                socks.append(c)

            def echo_loop(c):
                sock = c.sock
                sendall, recv = sock.sendall, sock.recv
                while not stop[0]:
                    t0 = time.perf_counter()
                    sendall(frame)
                    got = 0
                    while got < reply_len:
                        chunk = recv(65536)
                        if not chunk:
                            return
                        got += len(chunk)
                    count[0] += 1
                    if count[0] % 16 == 0:
                        lat.append(time.perf_counter() - t0)

            workers = [gevent.spawn(echo_loop, c) for c in socks]
            gevent.sleep(min(1.0, seconds / 2))
            n0, lat_n0 = count[0], len(lat)
            ctx.spy_start(srv.pid, "ceiling-ws")
            m = Meter(ctx, srv.pid, ops=lambda: count[0])
            gevent.sleep(seconds)
            d = m.stop()
            n = count[0] - n0
            ctx.spy_stop()
            stop[0] = True
            gevent.joinall(workers, timeout=2)
            for c in socks:
                c.drop()
            cpu = d["cpu_per_op"]
            ctx.ceil_probe["ws"] = d["probe"]
            ctx.ceil.update(ws_cpu=cpu, ws_rate=n / d["wall"], ws_p50=pct(lat[lat_n0:], 50))
            r = ctx.results
            r.add("ceilings", "ws", "cpu_per_message", cpu, "s", "bare ws echo: server CPU per message", meter=d,
                  note=f"{conns} sockets, {len(ECHO_MSG)} B messages")
            r.add("ceilings", "ws", "rate", n / d["wall"], "/s", "bare ws echo: messages/s", meter=d, lower_is_better=False)
            r.add("ceilings", "ws", "latency_p50", ctx.ceil["ws_p50"], "s", f"bare ws echo: round trip p50, {conns} sockets",
                  meter=d)
            r.add("ceilings", "ws", "rtt1_p50", ctx.ceil["ws_rtt1"], "s", "bare ws echo: round trip p50, 1 socket")
        finally:
            srv.stop()


def run_idle(ctx, transports) -> None:
    """Idle connections on the bare servers: RSS and CPU per connection (the idle ceiling)."""
    p = ctx.p
    n = p["idle_stages"][-1]
    wait = p["idle_wait"]
    for transport in transports:
        mode = "http" if transport == "bosh" else "ws"
        srv = Child(f"ceiling-{mode}", [sys.executable, os.path.join(HERE, "ceiling.py"), mode], ctx.server_cpu,
                    os.path.join(ctx.work, f"ceiling-idle-{mode}.log"))
        conns: list = []
        stop = [False]
        polls = [0]
        try:
            addr = ("127.0.0.1", srv.port)
            gevent.sleep(0.3)
            base = proc_rss_kib(srv.pid)
            hold = f"POST /hold?s={wait - min(1.0, wait * 0.1)} HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: ".encode()

            def poller(c):
                while not stop[0]:
                    try:
                        c.request(TINY_POST, prefix=hold)
                    except Exception:  # noqa: BLE001
                        return
                    polls[0] += 1

            def connect(_):
                if mode == "http":
                    c = HttpConn(addr, path="/hold")
                    conns.append(c)
                    gevent.spawn(poller, c)
                else:
                    c = WsClient(addr, DOMAIN, path="/", subprotocol=None)
                    c.connect()
                    conns.append(c)

            run_pool(100, range(n), connect)
            gevent.sleep(p["idle_settle"])
            rss = proc_rss_kib(srv.pid)
            polls0 = polls[0]
            m = Meter(ctx, srv.pid)
            gevent.sleep(p["idle_window"])
            d = m.stop()
            per_conn = (rss - base) / n
            ctx.ceil[f"{mode}_idle_rss"] = per_conn
            ctx.ceil[f"{mode}_idle_cpu"] = d["server_share"]
            ctx.ceil_probe[f"{mode}_idle"] = d["probe"]
            label = "bare pywsgi: parked request" if mode == "http" else "bare ws echo: open socket"
            ctx.results.add("ceilings", mode, "idle_rss_per_conn", per_conn, "KiB", f"{label}, RSS per conn", meter=d,
                            note=f"{n} conns")
            ctx.results.add("ceilings", mode, "idle_cpu", d["server_share"], "%core", f"{label}, CPU while idle",
                            meter=d, note=(f"re-poll every {wait}s: {polls[0] - polls0} polls" if mode == "http" else ""))
        finally:
            stop[0] = True
            for c in conns:
                if isinstance(c, HttpConn):
                    c.close()
                else:
                    c.drop()
            srv.stop()



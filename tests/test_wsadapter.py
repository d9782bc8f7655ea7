"""boshroster.transports (http_handler + ws_connection) against a real pywsgi server and real clients (tests/conftest.py patches)."""

import base64
import gc
import http.client
import os
import socket
import struct
import time
import types
import xml.etree.ElementTree as ET

import gevent
import greenlet
import pytest
import websocket
from gevent.event import Event
from gevent.pywsgi import WSGIServer

from boshroster.config import Config
from boshroster.transports.http_handler import ServerHandler
from boshroster.transports.websocket import WebSocketStream
from boshroster.transports.ws_connection import MessageTooLarge, WsConnection, WsSettings
from boshroster.xmpp.stream import Peer
from boshroster.xmpp.xmlio import E

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# -- server side -----------------------------------------------------------------------------

class EchoApp:
    """Echoes text; a few commands let the tests drive the server side of the connection."""

    def __init__(self):
        self.conns = []
        self.events = []  # what receive() produced, per connection end
        self.finished = Event()
        self.http_requests = []
        self.delivery = []  # (index, ok) reported by send(..., delivered) of 'tracked:'

    def __call__(self, environ, start_response):
        conn = environ.get("boshroster.websocket")
        if conn is None:
            body = environ["wsgi.input"].read()
            self.http_requests.append(environ["PATH_INFO"])
            out = ("%s %s %s port=%s" % (environ["REQUEST_METHOD"], environ["PATH_INFO"],
                                         body.decode(), environ["REMOTE_PORT"])).encode()
            start_response("200 OK", [("Content-Type", "text/plain"),
                                      ("Content-Length", str(len(out)))])
            return [out]
        assert isinstance(conn, WsConnection)
        assert "wsgi.websocket" not in environ
        self.conns.append(conn)
        try:
            self.serve(conn)
        finally:
            self.finished.set()
        start_response("200 OK", [("Content-Type", "text/plain")])  # must not reach the wire
        return [b"stray HTTP body"]

    def serve(self, conn):
        while True:
            try:
                msg = conn.receive()
            except MessageTooLarge:
                self.events.append("too-large")
                conn.close(1009, "too big")
                return
            if msg is None:
                self.events.append("none")
                return
            cmd, _, arg = msg.partition(":")
            if cmd == "close":
                conn.close(int(arg), "bye")
                conn.close(1011, "second close is ignored")
            elif cmd == "send-then-close":
                for i in range(int(arg)):
                    conn.send("m%d" % i)
                conn.close(1000)
                conn.send("dropped after close")
            elif cmd == "burst":
                senders, count = (int(x) for x in arg.split(","))
                gevent.spawn(self.burst, conn, senders, count)
            elif cmd == "flood":  # flood:COUNT,SIZE as fast as the kernel takes them
                count, size = (int(x) for x in arg.split(","))
                for i in range(count):
                    conn.send("f%d:%s" % (i, "x" * size))
                    gevent.sleep(0)  # lets the pending write run
                    if conn.closed:
                        break
            elif cmd == "burst-now":  # COUNT sends without yielding
                for i in range(int(arg)):
                    conn.send("b%d" % i)
            elif cmd == "close-later":  # e.g. the session manager kicking this session
                gevent.spawn_later(0.1, conn.close, int(arg), "kicked")
            elif cmd == "whoami":
                conn.send(conn.remote_addr)
            elif cmd == "tracked":  # tracked:COUNT,SIZE with a delivery callback each
                count, size = (int(x) for x in arg.split(","))
                gevent.spawn(self.tracked, conn, count, size)
            elif cmd == "big":  # big:SIZE,COUNT one large message, then small ones, one turn
                size, count = (int(x) for x in arg.split(","))
                conn.send("B" * size)
                for i in range(count):
                    conn.send("s%d" % i)
            elif cmd == "fill":  # fill:SIZE until the connection is congested
                size = int(arg)
                while not conn.congested and not conn.closed:
                    conn.send("x" * size)
                    gevent.sleep(0)
            else:
                conn.send(msg)

    def tracked(self, conn, count, size):
        for i in range(count):
            conn.send("t%d:%s" % (i, "x" * size), lambda ok, i=i: self.delivery.append((i, ok)))
            gevent.sleep(0)

    @staticmethod
    def burst(conn, senders, count):
        def sender(s):
            for i in range(count):
                conn.send("s%d:%d:%s" % (s, i, "x" * (i % 50)))
                if i % 7 == 0:
                    gevent.sleep(0)
        gevent.joinall([gevent.spawn(sender, s) for s in range(senders)])
        conn.send("burst-done")


class SessionApp:
    """The XMPP layer's transport object (WebSocketStream) on the connection, driven through
    ClientSession.send(el, delivered) as the offline store does: each text message 'N' makes
    it send N messages of 64 KiB, recording what their callbacks report."""

    def __init__(self):
        self.delivery = []
        self.streams = []

    def __call__(self, environ, start_response):
        conn = environ["boshroster.websocket"]
        ctx = types.SimpleNamespace(config=Config(c2s_negotiation_timeout=0), domain="localhost", shaper=None, sm=None)
        stream = WebSocketStream(ctx, conn, Peer("127.0.0.1", False))
        self.streams.append(stream)
        while True:
            msg = conn.receive()
            if msg is None:
                return []
            for i in range(int(msg)):
                el = E("{jabber:client}message", {"id": str(i)}, E("{jabber:client}body", text="x" * 65536))
                stream.session.send(el, lambda ok, i=i: self.delivery.append((i, ok)))
                gevent.sleep(0)


class Running:
    def __init__(self, app=None, **attrs):
        self.app = app or EchoApp()
        settings = WsSettings(**{k.removeprefix("ws_"): v for k, v in attrs.items()})
        self.server = WSGIServer(("127.0.0.1", 0), self.app, handler_class=ServerHandler.with_settings(settings),
                                 log=None)
        self.server.start()
        self.port = self.server.server_port
        self.url = "ws://127.0.0.1:%d/xmpp-websocket" % self.port

    def stop(self):
        self.server.stop(timeout=3)


@pytest.fixture
def serve():
    started = []

    def start(**attrs):
        srv = Running(**attrs)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


# -- client helpers --------------------------------------------------------------------------

def ws_connect(srv, **kw):
    return websocket.create_connection(srv.url, subprotocols=["xmpp"], timeout=5, **kw)


def bye(ws):
    """Close a websocket-client connection and its socket (close() alone returns early, leaving
    the socket open, once the server's close frame was received)."""
    ws.close()
    ws.shutdown()


def close_status(frame_data):
    return struct.unpack("!H", frame_data[:2])[0], frame_data[2:]


class Raw:
    """A byte-level WebSocket client on a plain socket."""

    def __init__(self, port, protocols="xmpp", path="/ws", extra="", version="13", rcvbuf=None):
        self.sock = socket.socket()
        if rcvbuf:  # before connecting, so the TCP window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n" % (path, key))
        if version is not None:
            req += "Sec-WebSocket-Version: %s\r\n" % version
        if protocols is not None:
            req += "Sec-WebSocket-Protocol: %s\r\n" % protocols
        self.sock.sendall((req + extra + "\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers.setdefault(k.strip().lower(), []).append(v.strip())

    def send_frame(self, opcode, payload=b"", fin=True, mask=True, length=None):
        if isinstance(payload, str):
            payload = payload.encode()
        n = len(payload) if length is None else length
        first = (0x80 if fin else 0) | opcode
        if n < 126:
            head = struct.pack("!BB", first, (0x80 if mask else 0) | n)
        elif n < 65536:
            head = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
        else:
            head = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
        if mask:
            key = os.urandom(4)
            head += key
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + payload)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed with %r buffered" % self.buf)
            self.buf += chunk

    def recv_frame(self):
        self._need(2)
        b1, b2 = self.buf[0], self.buf[1]
        assert not b2 & 0x80, "server frames must not be masked"
        n, pos = b2 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._need(pos + n)
        payload, self.buf = self.buf[pos:pos + n], self.buf[pos + n:]
        return bool(b1 & 0x80), b1 & 0x0F, payload

    def recv_data(self):
        """Next text/close frame, skipping pings."""
        while True:
            fin, op, payload = self.recv_frame()
            if op != OP_PING:
                return op, payload

    def read_to_eof(self):
        rest = self.buf
        self.buf = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return rest
            rest += chunk

    def close(self):
        self.sock.close()


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        gevent.sleep(0.01)
    return pred()


# -- handshake -------------------------------------------------------------------------------

def test_subprotocol_echoed_in_101(serve):
    srv = serve()
    ws = ws_connect(srv)  # websocket-client fails the handshake if 'xmpp' is not echoed
    assert ws.getstatus() == 101
    assert ws.subprotocol == "xmpp"
    bye(ws)

    raw = Raw(srv.port, protocols="chat, xmpp")
    assert raw.status == 101
    assert raw.headers["sec-websocket-protocol"] == ["xmpp"]
    raw.close()


@pytest.mark.parametrize("protocols", [None, "chat", "xmpp-old, chatxmpp"])
def test_upgrade_without_xmpp_is_501(serve, protocols):
    srv = serve()
    raw = Raw(srv.port, protocols=protocols)
    assert raw.status == 501
    body = raw.read_to_eof()  # Connection: close
    assert b"xmpp" in body and b"subprotocol" in body
    assert "upgrade" not in raw.headers
    raw.close()
    assert srv.app.conns == []


def test_websocket_client_without_subprotocol_gets_501(serve):
    srv = serve()
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(srv.url, timeout=5)
    assert info.value.status_code == 501


def test_plain_http_requests_reach_the_app(serve):
    srv = serve()
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    c.request("GET", "/hello")
    r = c.getresponse()
    assert r.status == 200 and r.read().startswith(b"GET /hello ")
    c.request("POST", "/http-bind", body=b"<body/>")
    r = c.getresponse()
    assert r.status == 200 and r.read().startswith(b"POST /http-bind <body/>")
    c.close()
    assert srv.app.http_requests == ["/hello", "/http-bind"]


def test_keepalive_posts_do_not_stall_on_nagle(serve):
    """Design notes F: without TCP_NODELAY each kept-alive response waits ~40 ms."""
    srv = serve()
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    ports = set()
    t0 = time.monotonic()
    for i in range(50):
        c.request("POST", "/http-bind", body=b"<body rid='%d'/>" % i,
                  headers={"Content-Type": "text/xml"})
        r = c.getresponse()
        body = r.read()
        assert r.status == 200
        ports.add(body.rsplit(b"port=", 1)[1])
    elapsed = time.monotonic() - t0
    c.close()
    assert len(ports) == 1, "the requests must share one kept-alive connection"
    assert elapsed < 1.0, "50 kept-alive POSTs took %.2f s" % elapsed


# -- messages --------------------------------------------------------------------------------

def test_unicode_text_echo(serve):
    srv = serve()
    ws = ws_connect(srv)
    text = "<message to='jüliet@example.com'><body>héllo ☃ 𝄞 日本</body></message>"
    ws.send(text)
    assert ws.recv() == text
    ws.send("whoami")
    assert ws.recv() == "127.0.0.1"
    bye(ws)


def test_fragmented_message_reassembled_with_control_frame_inside(serve):
    srv = serve()
    raw = Raw(srv.port)
    data = "<message><body>snow ☃ man</body></message>".encode()
    cut = data.index("☃".encode()) + 1  # split inside a multi-byte character
    raw.send_frame(OP_TEXT, data[:cut], fin=False)
    raw.send_frame(OP_PING, b"mid", fin=True)
    raw.send_frame(OP_CONT, data[cut:cut + 5], fin=False)
    raw.send_frame(OP_CONT, data[cut + 5:], fin=True)
    assert raw.recv_data() == (OP_PONG, b"mid")
    assert raw.recv_data() == (OP_TEXT, data)
    raw.close()


def test_binary_messages_are_ignored(serve):
    srv = serve()
    ws = ws_connect(srv)
    ws.send_binary(b"\x00\x01binary")
    ws.send("<presence/>")
    assert ws.recv() == "<presence/>"
    bye(ws)

    raw = Raw(srv.port)
    raw.send_frame(OP_BINARY, b"\xff" * 300, fin=False)
    raw.send_frame(OP_CONT, b"\xfe" * 300, fin=True)
    raw.send_frame(OP_PONG, b"unsolicited")  # pongs are consumed silently too
    raw.send_frame(OP_TEXT, "<iq/>")
    assert raw.recv_data() == (OP_TEXT, b"<iq/>")
    raw.close()


def test_message_over_cap_raises_and_app_closes_1009(serve):
    srv = serve(ws_max_message=1000)
    ws = ws_connect(srv)
    ws.send("a" * 1000)  # exactly the cap is fine
    assert ws.recv() == "a" * 1000
    ws.send("b" * 1001)
    op, frame = ws.recv_data_frame(control_frame=True)
    assert op == OP_CLOSE
    assert close_status(frame.data) == (1009, b"too big")
    bye(ws)
    assert wait_for(lambda: srv.app.events == ["too-large"])


def test_over_cap_payload_is_skipped_and_close_handshake_completes(serve):
    srv = serve(ws_max_message=1000)
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, "é" * 20000)  # 40000 bytes, all of them sent
    op, payload = raw.recv_data()
    assert (op, close_status(payload)[0]) == (OP_CLOSE, 1009)
    raw.send_frame(OP_CLOSE, struct.pack("!H", 1009))
    t0 = time.monotonic()
    assert raw.read_to_eof() == b""
    # the server skipped the rest of the big frame, read our close frame and hung up at once
    assert time.monotonic() - t0 < 1.0
    raw.close()


def test_oversized_announcement_rejected_before_payload(serve):
    srv = serve(ws_max_message=1000, ws_close_grace=0.3)
    raw = Raw(srv.port)
    # announce 100 MB and send none of it: the server must answer at once, not wait for it
    raw.send_frame(OP_TEXT, b"", length=100 * 1024 * 1024)
    t0 = time.monotonic()
    op, payload = raw.recv_data()
    assert op == OP_CLOSE and close_status(payload)[0] == 1009
    assert time.monotonic() - t0 < 1.0
    assert raw.read_to_eof() == b""  # nothing after the close frame, no stray HTTP response
    raw.close()
    assert srv.app.events == ["too-large"]


def test_reassembly_over_cap_is_rejected(serve):
    srv = serve(ws_max_message=1000)
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, b"x" * 600, fin=False)
    raw.send_frame(OP_CONT, b"", fin=False, length=600)  # header only: payload never sent
    op, payload = raw.recv_data()
    assert (op, close_status(payload)[0]) == (OP_CLOSE, 1009)
    raw.close()
    assert wait_for(lambda: srv.app.events == ["too-large"])


def test_invalid_utf8_closes_1007_and_unmasked_frame_1002(serve):
    srv = serve()
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, b"\xc3\x28")
    op, payload = raw.recv_data()
    assert (op, close_status(payload)[0]) == (OP_CLOSE, 1007)
    raw.close()

    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, b"<iq/>", mask=False)
    op, payload = raw.recv_data()
    assert (op, close_status(payload)[0]) == (OP_CLOSE, 1002)
    raw.close()


# -- closing ---------------------------------------------------------------------------------

def test_server_close_carries_status_code_and_nothing_follows(serve):
    srv = serve()
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, "close:4000")
    op, payload = raw.recv_data()
    assert op == OP_CLOSE
    assert close_status(payload) == (4000, b"bye")  # one close frame: the second close() no-op
    raw.send_frame(OP_CLOSE, struct.pack("!H", 4000))
    t0 = time.monotonic()
    assert raw.read_to_eof() == b""  # the server then closes TCP; no stray HTTP response
    assert time.monotonic() - t0 < 1.0, "the close handshake must not wait for the grace"
    raw.close()
    assert wait_for(lambda: srv.app.events == ["none"])
    conn = srv.app.conns[0]
    assert conn.closed and conn.close_code == 4000 and conn.peer_close_code == 4000


def test_close_after_queued_messages_are_written(serve):
    srv = serve()
    ws = ws_connect(srv)
    ws.send("send-then-close:5")
    assert [ws.recv() for _ in range(5)] == ["m0", "m1", "m2", "m3", "m4"]
    op, frame = ws.recv_data_frame(control_frame=True)
    assert op == OP_CLOSE and close_status(frame.data)[0] == 1000
    bye(ws)


def test_server_close_to_silent_peer_ends_after_grace(serve):
    srv = serve(ws_close_grace=0.3)
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, "close:1001")
    t0 = time.monotonic()
    op, payload = raw.recv_data()
    assert (op, close_status(payload)[0]) == (OP_CLOSE, 1001)
    assert raw.read_to_eof() == b""  # we never answered: the server gives up after the grace
    assert 0.2 < time.monotonic() - t0 < 2.0
    raw.close()


def test_close_from_another_greenlet_ends_a_blocked_receive(serve):
    srv = serve(ws_close_grace=0.3)
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, "close-later:4002")
    op, payload = raw.recv_data()
    assert op == OP_CLOSE and close_status(payload) == (4002, b"kicked")
    raw.send_frame(OP_CLOSE, struct.pack("!H", 4002))
    assert raw.read_to_eof() == b""
    raw.close()
    assert wait_for(lambda: srv.app.events == ["none"])

    raw = Raw(srv.port)  # the peer never answers our close frame: the grace ends it
    raw.send_frame(OP_TEXT, "close-later:4003")
    op, payload = raw.recv_data()
    assert (op, close_status(payload)[0]) == (OP_CLOSE, 4003)
    t0 = time.monotonic()
    assert raw.read_to_eof() == b""
    assert time.monotonic() - t0 < 1.5
    assert wait_for(lambda: srv.app.events == ["none", "none"])
    raw.close()


def test_client_initiated_close_returns_none(serve):
    srv = serve()
    ws = ws_connect(srv)
    ws.send("<message/>")
    assert ws.recv() == "<message/>"
    ws.close(status=1000)
    ws.shutdown()
    assert wait_for(lambda: srv.app.events == ["none"])
    assert srv.app.conns[0].closed

    raw = Raw(srv.port)
    raw.send_frame(OP_CLOSE, struct.pack("!H", 4001) + b"going")
    op, payload = raw.recv_data()
    assert (op, close_status(payload)[0]) == (OP_CLOSE, 4001)  # echoed
    assert raw.read_to_eof() == b""
    raw.close()
    assert wait_for(lambda: srv.app.events == ["none", "none"])


def test_peer_vanishing_returns_none_and_server_keeps_serving(serve):
    srv = serve()
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, "<presence/>")
    assert raw.recv_data() == (OP_TEXT, b"<presence/>")
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST, no close frame
    assert wait_for(lambda: srv.app.events == ["none"])

    raw2 = Raw(srv.port)
    raw2.send_frame(OP_TEXT, b"<iq/>", fin=False)
    raw2.close()  # FIN in the middle of a message
    assert wait_for(lambda: srv.app.events == ["none", "none"])

    ws = ws_connect(srv)
    ws.send("still here")
    assert ws.recv() == "still here"
    bye(ws)


def test_send_queue_overflow_closes_1008(serve):
    srv = serve(ws_queue_size=10)
    ws = ws_connect(srv)
    # 2,000 x 64 KiB while the client reads nothing: the kernel buffers take the first few
    # MB, then a writer blocks on the full socket, 10 frames queue up behind it and the 11th
    # overflows. What was written arrives intact and in order, then the 1008 close frame.
    ws.send("flood:2000,65536")
    assert wait_for(lambda: srv.app.conns and srv.app.conns[0].close_code == 1008, timeout=10)
    received = 0
    while True:
        op, frame = ws.recv_data_frame(control_frame=True)
        if op == OP_CLOSE:
            break
        assert op == OP_TEXT
        index, _, pad = frame.data.partition(b":")
        assert index == b"f%d" % received and len(pad) == 65536
        received += 1
    assert close_status(frame.data)[0] == 1008
    assert 10 <= received < 2000
    bye(ws)


def test_a_burst_without_yielding_is_not_an_overflow(serve):
    # e.g. 1,000 offline messages delivered at once: queued within one loop turn, then written.
    srv = serve(ws_queue_size=10)
    ws = ws_connect(srv)
    ws.send("burst-now:500")
    for i in range(500):
        assert ws.recv() == "b%d" % i
    ws.send("still open")
    assert ws.recv() == "still open"
    bye(ws)


def test_no_writer_greenlet_when_nothing_is_backed_up(serve):
    srv = serve(ws_ping_interval=0.2)
    ws = ws_connect(srv)
    for i in range(20):
        ws.send("m%d" % i)
        assert ws.recv() == "m%d" % i
    conn = srv.app.conns[0]
    assert conn._writer is None and not conn._out
    bye(ws)


# -- ping and concurrency --------------------------------------------------------------------

def test_ping_frames_at_configured_interval(serve):
    srv = serve(ws_ping_interval=0.2)
    t0 = time.monotonic()
    raw = Raw(srv.port)
    for _ in range(3):  # Raw's socket timeout fails the test if they stop coming
        fin, op, payload = raw.recv_frame()
        assert op == OP_PING
        raw.send_frame(OP_PONG, payload)
    # The third ping left 3 intervals after the connection at the earliest: not too often.
    assert time.monotonic() - t0 >= 3 * 0.2 - 0.05
    raw.send_frame(OP_TEXT, "after pings")
    assert raw.recv_data() == (OP_TEXT, b"after pings")
    raw.close()


def test_one_server_timer_pings_every_connection(serve):
    srv = serve(ws_ping_interval=0.2)
    raws = [Raw(srv.port) for _ in range(3)]
    for raw in raws:
        for _ in range(2):
            fin, op, payload = raw.recv_frame()
            assert op == OP_PING
            raw.send_frame(OP_PONG, payload)
    for raw in raws:
        raw.close()
    assert wait_for(lambda: srv.server._boshroster_pinger._timer is None, timeout=3)


def test_no_ping_when_disabled(serve):
    srv = serve(ws_ping_interval=0)
    raw = Raw(srv.port)
    raw.sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        raw.recv_frame()
    raw.close()


def test_concurrent_senders_arrive_intact_and_in_order(serve):
    srv = serve()
    ws = ws_connect(srv)
    senders, count = 5, 150
    ws.send("burst:%d,%d" % (senders, count))
    got = {s: [] for s in range(senders)}
    while True:
        msg = ws.recv()
        if msg == "burst-done":
            break
        s, i, pad = msg.split(":")
        assert pad == "x" * (int(i) % 50)
        got[int(s[1:])].append(int(i))
    for s in range(senders):
        assert got[s] == list(range(count))
    bye(ws)


def _live_greenlets():
    gc.collect()
    return sum(1 for o in gc.get_objects()
               if isinstance(o, greenlet.greenlet) and not o.dead and o.parent is not None)


def test_no_greenlet_leak_per_connection(serve):
    srv = serve(ws_ping_interval=0.5)
    ws = ws_connect(srv)
    ws.send("warm-up")
    assert ws.recv() == "warm-up"
    bye(ws)
    assert wait_for(lambda: srv.app.events == ["none"])
    gevent.sleep(0.1)
    baseline = _live_greenlets()
    for i in range(10):
        ws = ws_connect(srv)
        ws.send("x%d" % i)
        assert ws.recv() == "x%d" % i
        if i % 2:
            ws.send("close:1000")
        bye(ws)
    assert wait_for(lambda: len(srv.app.events) == 11)
    assert wait_for(lambda: _live_greenlets() <= baseline, timeout=5), \
        "live greenlets: %d, baseline %d" % (_live_greenlets(), baseline)
    for conn in srv.app.conns:
        assert conn._writer is None and not conn._out
        assert conn not in srv.server._boshroster_pinger._conns
        assert conn._watchdog is None or conn._watchdog.dead


# -- handshake version (RFC 6455 §4.4) -----------------------------------------------------------

@pytest.mark.parametrize("version", ["8", "7", "12", "14", "13, 8", "abc"])
def test_other_websocket_versions_get_426_naming_13(serve, version):
    srv = serve()
    raw = Raw(srv.port, version=version)
    assert raw.status == 426
    assert raw.headers["sec-websocket-version"] == ["13"]
    assert b"13" in raw.read_to_eof()
    raw.close()
    assert srv.app.conns == []


def test_missing_websocket_version_gets_426_naming_13(serve):
    srv = serve()
    raw = Raw(srv.port, version=None)
    assert raw.status == 426
    assert raw.headers["sec-websocket-version"] == ["13"]
    raw.close()
    assert srv.app.conns == []


# -- tracked delivery ------------------------------------------------------------------------

def test_tracked_frames_are_reported_delivered_in_order(serve):
    srv = serve()
    ws = ws_connect(srv)
    ws.send("tracked:50,1000")
    for i in range(50):
        assert ws.recv().startswith("t%d:" % i)
    assert wait_for(lambda: len(srv.app.delivery) == 50)
    assert srv.app.delivery == [(i, True) for i in range(50)]
    bye(ws)


def _assert_prefix_delivered(delivery, attempted):
    indexes = [i for i, _ in delivery]
    assert sorted(indexes) == list(range(attempted)), "each callback exactly once"
    outcome = dict(delivery)
    written = sum(1 for i in range(attempted) if outcome[i])
    # what the kernel accepted is a prefix; everything after it was reported lost
    assert all(outcome[i] for i in range(written))
    assert not any(outcome[i] for i in range(written, attempted))
    return written


def test_tracked_frames_not_written_are_reported_lost_when_the_peer_vanishes(serve):
    # 300 x 64 KiB to a peer that never reads: the kernel takes a few MB, the rest waits in the
    # queue (the caps are high enough here). Then the peer resets the connection.
    srv = serve(ws_max_queue_bytes=64 * 1024 * 1024, ws_queue_size=100000)
    raw = Raw(srv.port, rcvbuf=4096)
    raw.send_frame(OP_TEXT, "tracked:300,65536")
    assert wait_for(lambda: srv.app.conns and srv.app.conns[0].queued_bytes > 8 * 1024 * 1024, 10)
    early = list(srv.app.delivery)
    assert all(ok for _, ok in early)
    assert len(early) < 300
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST
    assert wait_for(lambda: len(srv.app.delivery) == 300, 10)
    written = _assert_prefix_delivered(srv.app.delivery, 300)
    assert 0 < written < 300
    assert wait_for(lambda: srv.app.events == ["none"])


def test_tracked_frames_not_written_by_the_close_deadline_are_reported_lost(serve):
    srv = serve(ws_max_queue_bytes=64 * 1024 * 1024, ws_queue_size=100000,
                ws_flush_timeout=0.3, ws_close_grace=0.2)
    raw = Raw(srv.port, rcvbuf=4096)
    raw.send_frame(OP_TEXT, "tracked:200,65536")
    assert wait_for(lambda: len(srv.app.conns) == 1 and srv.app.conns[0].queued_bytes > 4 * 1024 * 1024, 10)
    gevent.sleep(0.5)  # all 200 sent
    srv.app.conns[0].close(1001, "going away")  # e.g. shutdown; the peer still does not read
    assert wait_for(lambda: len(srv.app.delivery) == 200, 5)
    written = _assert_prefix_delivered(srv.app.delivery, 200)
    assert 0 < written < 200
    conn = srv.app.conns[0]
    conn.send("after close", lambda ok: srv.app.delivery.append(("late", ok)))
    assert srv.app.delivery[-1] == ("late", False)  # refused at once, reported at once
    raw.close()


def test_byte_cap_overflow_drops_the_queue_reports_it_lost_and_closes_1008(serve):
    srv = serve(ws_max_queue_bytes=1024 * 1024, ws_queue_size=100000)
    raw = Raw(srv.port, rcvbuf=4096)
    raw.send_frame(OP_TEXT, "tracked:400,65536")
    assert wait_for(lambda: srv.app.conns and srv.app.conns[0].close_code == 1008, 10)
    conn = srv.app.conns[0]
    assert conn.overflowed and conn.queued_bytes <= 1024 * 1024
    # what was written arrives intact and in order, then the close frame
    raw.sock.settimeout(10)
    received = 0
    while True:
        fin, op, payload = raw.recv_frame()
        if op == OP_CLOSE:
            break
        if op == OP_TEXT:
            assert payload.startswith(b"t%d:" % received)
            received += 1
    assert close_status(payload)[0] == 1008
    # every send was reported: written (what the writer held when the queue was dropped
    # included), dropped, or refused after the close
    assert wait_for(lambda: len(srv.app.delivery) == 400, 5)
    written = _assert_prefix_delivered(srv.app.delivery, 400)
    assert received == written and 0 < written < 400
    raw.close()


def test_a_stanza_larger_than_the_byte_cap_goes_out_and_does_not_overflow_the_next(serve):
    # e.g. a roster result of several MB: a frame always fits an empty queue, and the cap
    # counts what waits behind the frame being written
    srv = serve(ws_max_queue_bytes=256 * 1024)
    ws = ws_connect(srv)
    ws.send("big:3000000,100")
    assert ws.recv() == "B" * 3000000
    for i in range(100):
        assert ws.recv() == "s%d" % i
    ws.send("still open")
    assert ws.recv() == "still open"
    assert not srv.app.conns[0].overflowed
    bye(ws)


def test_congested_above_half_the_byte_cap_and_clear_once_read(serve):
    srv = serve(ws_max_queue_bytes=2 * 1024 * 1024, ws_queue_size=100000)
    raw = Raw(srv.port, rcvbuf=4096)
    raw.send_frame(OP_TEXT, "fill:16384")
    assert wait_for(lambda: srv.app.conns and srv.app.conns[0].congested, 10)
    conn = srv.app.conns[0]
    assert conn.queued_bytes > 1024 * 1024 and not conn.closed
    raw.send_frame(OP_TEXT, "probe")
    raw.sock.settimeout(10)
    while True:  # read everything: the queue drains, the probe's echo comes last
        fin, op, payload = raw.recv_frame()
        if op == OP_TEXT and payload == b"probe":
            break
    assert not conn.congested and conn.queued_bytes == 0
    raw.close()


# -- pongs, frames per message ---------------------------------------------------------------

def test_pongs_to_a_peer_that_never_reads_do_not_pile_up(serve):
    srv = serve(ws_queue_size=100000)
    raw = Raw(srv.port, rcvbuf=4096)
    key = b"\0\0\0\0"  # zero mask: payload unchanged, quick to build
    pings = b"".join(b"\x89\x84" + key + b"%04d" % (i % 10000) for i in range(100000))
    raw.sock.sendall(pings + b"\x89\x84" + key + b"last")
    raw.send_frame(OP_TEXT, "done?")
    conn_ready = wait_for(lambda: srv.app.conns, 5)
    assert conn_ready
    conn = srv.app.conns[0]
    peak = 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        peak = max(peak, len(conn._out))
        gevent.sleep(0.005)
    assert peak <= 3, "at most one pong (and the echo) may wait"
    raw.sock.settimeout(10)
    pongs = 0
    while True:
        fin, op, payload = raw.recv_frame()
        if op == OP_PONG:
            pongs += 1
            last = payload
        elif op == OP_TEXT:
            assert payload == b"done?"
            break
    assert last == b"last"  # RFC 6455 §5.5.3: the most recent ping is the one answered
    assert pongs < 100001
    raw.close()


def test_frames_per_message_are_capped(serve):
    srv = serve(ws_max_frames=4)
    raw = Raw(srv.port)
    for part, fin in ((b"<a", False), (b">x", False), (b"</", False), (b"a>", True)):
        raw.send_frame(OP_CONT if part != b"<a" else OP_TEXT, part, fin=fin)
    assert raw.recv_data() == (OP_TEXT, b"<a>x</a>")
    raw.send_frame(OP_TEXT, b"<a", fin=False)
    for _ in range(4):
        raw.send_frame(OP_PING, b"counts")  # control frames inside the message count
    op, payload = raw.recv_data()
    while op == OP_PONG:
        op, payload = raw.recv_data()
    assert (op, close_status(payload)[0]) == (OP_CLOSE, 1009)  # EchoApp closes with 1009
    raw.close()
    assert wait_for(lambda: srv.app.events == ["too-large"])


def test_empty_continuation_flood_is_refused_at_once(serve):
    srv = serve(ws_close_grace=0.3)
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, b"<", fin=False)
    chunk = b"\x00\x80\0\0\0\0" * 100000  # 100,000 empty masked continuation frames

    def flood():
        try:
            for _ in range(30):
                raw.sock.sendall(chunk)
        except OSError:
            pass

    writer = gevent.spawn(flood)
    t0 = time.monotonic()
    op, payload = raw.recv_data()
    assert op == OP_CLOSE and time.monotonic() - t0 < 2
    writer.join(10)
    raw.close()
    assert wait_for(lambda: srv.app.events == ["too-large"])


def test_wire_bytes_per_message_are_capped(serve):
    srv = serve(ws_max_message=1000, ws_max_wire=4000, ws_max_frames=100000)
    raw = Raw(srv.port)
    raw.send_frame(OP_TEXT, b"<a", fin=False)
    for _ in range(40):  # 40 x 131 bytes on the wire, 2 bytes of payload
        raw.send_frame(OP_PING, b"p" * 125)
    raw.send_frame(OP_CONT, b"/>", fin=True)
    op, payload = raw.recv_data()
    while op == OP_PONG:
        op, payload = raw.recv_data()
    assert op == OP_CLOSE
    raw.close()
    assert wait_for(lambda: srv.app.events == ["too-large"])


# -- the XMPP transport object: ClientSession.send(el, delivered) over WebSocketStream ----------

def test_session_send_reports_delivery_through_the_websocket_stream(serve):
    srv = serve(app=SessionApp())
    ws = ws_connect(srv)
    ws.send("20")
    for i in range(20):
        assert ET.fromstring(ws.recv()).get("id") == str(i)
    assert wait_for(lambda: len(srv.app.delivery) == 20)
    assert srv.app.delivery == [(i, True) for i in range(20)]
    assert srv.app.streams[0].tracks_delivery and not srv.app.streams[0].congested
    bye(ws)


def test_session_send_to_a_reader_that_vanishes_reports_the_rest_lost(serve):
    srv = serve(app=SessionApp(), ws_max_queue_bytes=64 * 1024 * 1024, ws_queue_size=100000)
    raw = Raw(srv.port, rcvbuf=4096)
    raw.send_frame(OP_TEXT, "300")
    assert wait_for(lambda: srv.app.streams and srv.app.streams[0].conn.queued_bytes > 8 * 1024 * 1024, 10)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST: the session's next sends are refused (the stream ended)
    assert wait_for(lambda: len(srv.app.delivery) == 300, 10)
    written = _assert_prefix_delivered(srv.app.delivery, 300)
    assert 0 < written < 300


def test_overflow_ends_the_stream_with_resource_constraint(serve):
    srv = serve(app=SessionApp())  # default cap: 2 MiB
    raw = Raw(srv.port, rcvbuf=4096)
    raw.send_frame(OP_TEXT, "400")
    assert wait_for(lambda: srv.app.streams and srv.app.streams[0].session.ended, 10)
    assert srv.app.streams[0].conn.close_code == 1008
    raw.sock.settimeout(10)
    texts = []
    while True:
        fin, op, payload = raw.recv_frame()
        if op == OP_CLOSE:
            break
        if op == OP_TEXT:
            texts.append(ET.fromstring(payload))
    assert close_status(payload)[0] == 1008
    messages = [t for t in texts if t.tag == "{jabber:client}message"]
    tail = [t.tag for t in texts[len(messages):]]
    # the stream was never opened: RFC 6120 §4.9.1.2 opens it before the error (RFC 7395 §3.5)
    assert tail == ["{urn:ietf:params:xml:ns:xmpp-framing}open", "{http://etherx.jabber.org/streams}error",
                    "{urn:ietf:params:xml:ns:xmpp-framing}close"], tail
    error = texts[-2]
    assert error[0].tag == "{urn:ietf:params:xml:ns:xmpp-streams}resource-constraint"
    assert wait_for(lambda: len(srv.app.delivery) == 400, 5)
    written = _assert_prefix_delivered(srv.app.delivery, 400)
    assert written == len(messages)
    raw.close()


def test_access_log_lines_only_when_the_server_has_a_log():
    """pywsgi's access log: a line per request when the server was given a log; none (and the
    line is not even formatted) with ``log=None``, the server's setting."""
    import io

    class Sink(io.StringIO):
        pass

    for log in (Sink(), None):
        srv = WSGIServer(("127.0.0.1", 0), EchoApp(), handler_class=ServerHandler, log=log)
        srv.start()
        try:
            c = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=5)
            c.request("POST", "/plain", body=b"hi")
            assert c.getresponse().read().startswith(b"POST /plain hi")
            c.close()
        finally:
            srv.stop(timeout=3)
        if log is not None:
            assert '"POST /plain HTTP/1.1" 200' in log.getvalue()

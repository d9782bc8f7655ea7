"""Issue 10 (points 8, 9, 10, 11, 16) over real sockets against the real server subprocess:
one WebSocket client must not exhaust the server nor stall the others.

Memory figures are the server's resident set (``VmRSS`` in ``/proc/<pid>/status``) before and
after each attack; every attack test states its bound and prints what it measured (``-s``).
"""

import base64
import os
import socket
import struct
import time
import xml.etree.ElementTree as ET

import gevent
import gevent.event
import pytest
import websocket

from harness import NS_CLIENT, NS_FRAMING, NS_STREAM, WsClient, q

NS_STREAMS_ERR = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
OP_CONT, OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x8, 0x9, 0xA
OPEN_XML = f"<open xmlns='{NS_FRAMING}' to='localhost' version='1.0'/>"
MB = 1024 * 1024


# -- helpers ---------------------------------------------------------------------------------

def rss(server) -> int:
    """The server process's resident set size in bytes."""
    with open(f"/proc/{server.proc.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """A masked client frame. The key is zero (a valid mask that leaves the payload as is), so a
    test can build millions of frames quickly."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


class RawWs:
    """A byte-level WebSocket client on a plain socket: sends whatever it is told, reads only
    when asked (so it can play a client that never reads)."""

    def __init__(self, server, version="13", rcvbuf=None):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET /xmpp-websocket HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: xmpp\r\n")
        if version is not None:
            request += f"Sec-WebSocket-Version: {version}\r\n"
        self.sock.sendall((request + "\r\n").encode())
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
            key_, _, value = line.partition(":")
            self.headers[key_.strip().lower()] = value.strip()

    @classmethod
    def adopt(cls, sock: socket.socket) -> "RawWs":
        """Read an already upgraded socket (e.g. a harness client's) frame by frame."""
        raw = cls.__new__(cls)
        raw.sock, raw.buf, raw.status, raw.headers = sock, b"", 101, {}
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def text(self, xml: str) -> None:
        self.sock.sendall(frame(OP_TEXT, xml.encode()))

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed with {self.buf[:200]!r} buffered")
            self.buf += chunk

    def recv_frame(self) -> tuple[int, bytes]:
        self._need(2)
        n, pos = self.buf[1] & 0x7F, 2
        if n == 126:
            self._need(4)
            n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
        self._need(pos + n)
        op, payload = self.buf[0] & 0x0F, self.buf[pos:pos + n]
        self.buf = self.buf[pos + n:]
        return op, payload

    def until_close(self, timeout: float = 10.0) -> tuple[list[ET.Element], int | None]:
        """Text messages (parsed) up to the close frame, and the close frame's status code."""
        self.sock.settimeout(timeout)
        texts = []
        while True:
            op, payload = self.recv_frame()
            if op == OP_TEXT:
                texts.append(ET.fromstring(payload))
            elif op == OP_CLOSE:
                return texts, (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)

    def close(self) -> None:
        self.sock.close()


def stream_error_condition(elements: list[ET.Element]) -> str | None:
    for el in elements:
        if el.tag == q(NS_STREAM, "error"):
            return [c.tag.split("}")[1] for c in el if c.tag != q(NS_STREAMS_ERR, "text")][0]
    return None


def login(server, user, resource) -> WsClient:
    client = WsClient(server.ws_url)
    client.login(user, resource=resource)
    return client


def ping_ms(client, timeout: float = 10.0) -> float:
    t0 = time.perf_counter()
    reply = client.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost", timeout=timeout)
    assert reply.get("type") == "result"
    return (time.perf_counter() - t0) * 1000


def take_over(client: WsClient) -> socket.socket:
    """Stop the harness client's reader: from now on the test owns the raw socket."""
    client._reader.kill()
    return client.ws.sock


def discard_reader(sock: socket.socket, marker: bytes = b"") -> tuple[gevent.Greenlet, gevent.event.Event]:
    """Read and drop everything; the event is set once ``marker`` went by."""
    seen = gevent.event.Event()

    def run():
        tail = b""
        try:
            while True:
                chunk = sock.recv(262144)
                if not chunk:
                    return
                if marker and marker in tail + chunk:
                    seen.set()
                tail = chunk[-len(marker) - 1:] if marker else b""
        except OSError:
            pass
    return gevent.spawn(run), seen


@pytest.fixture
def clients():
    made = []
    yield made
    for client in made:
        try:
            client.stop()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


# -- point 9: a client that does not read ------------------------------------------------------

PING_FLOOD = 500_000
PING_FLOOD_RSS_BOUND = 16 * MB


def test_ping_flood_from_a_client_that_never_reads_keeps_memory_bounded(server, clients):
    """Before: +78 MB and growing (a pong queued per ping, never written). Now at most one pong
    waits (RFC 6455 §5.5.3 lets us answer only the latest ping); bound: +16 MB."""
    bystander = login(server, "dave", "bystander")
    clients.append(bystander)
    ping_ms(bystander)
    before = rss(server)
    raw = RawWs(server, rcvbuf=4096)
    raw.text(OPEN_XML)
    chunk = frame(OP_PING) * 10_000
    t0 = time.monotonic()
    for _ in range(PING_FLOOD // 10_000):
        raw.send(chunk)
    raw.send(frame(OP_PING, b"last"))
    peak = before
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the server may still be reading the flood
        peak = max(peak, rss(server))
        gevent.sleep(0.1)
    latency = ping_ms(bystander)  # before the fix this waited for the whole flood to be read
    elapsed = time.monotonic() - t0
    peak = max(peak, rss(server))
    print(f"\nping flood: {PING_FLOOD} pings, {elapsed:.1f}s; server RSS {before / MB:.1f} MB -> "
          f"peak {peak / MB:.1f} MB (+{(peak - before) / MB:.1f} MB, bound +{PING_FLOOD_RSS_BOUND / MB:.0f}); "
          f"bystander ping {latency:.1f} ms")
    assert peak - before < PING_FLOOD_RSS_BOUND
    # the client now reads: the pongs that were written, the latest ping's last, then it works
    raw.sock.settimeout(10)
    pongs = 0
    while True:
        op, payload = raw.recv_frame()
        if op == OP_PONG:
            pongs += 1
            if payload == b"last":
                break
    assert pongs < PING_FLOOD
    raw.text(f"<close xmlns='{NS_FRAMING}'/>")
    texts, code = raw.until_close()
    assert code == 1000 and texts[-1].tag == q(NS_FRAMING, "close")
    raw.close()
    assert server.alive()


SLOW_READER_RSS_BOUND = 16 * MB


def test_slow_reader_flooded_by_another_user_is_cut_off_with_memory_bounded(server, clients):
    """Before: +488 MB held, no disconnect (here: +126 MB after 2,000 x 64 KiB, bystander
    unanswered for 10 s). Now the victim's output queue is capped in bytes
    (``websocket_max_queue_bytes``, 2 MiB by default): once full the victim's stream ends with
    ``resource-constraint`` (RFC 6120 §4.9.3.17), close code 1008; bound: +16 MB (the cap,
    and the flood's own messages being parsed; the kernel's socket buffers are not in RSS).
    Once routing bounces stanzas to a congested recipient, the flooder gets those instead."""
    bystander = login(server, "dave", "bystander")
    watcher = login(server, "carol", "watcher")
    watcher.presence()
    victim = login(server, "bob", "slow")
    victim.presence()
    flooder = login(server, "alice", "flood")
    clients.extend([bystander, watcher, victim, flooder])
    watcher.recv_presence(sender="bob@localhost/slow")
    victim_sock = take_over(victim)  # bob never reads again
    ping_ms(bystander)
    before = rss(server)
    body = "x" * 65536
    sent = 0
    peak = before
    gone = bounced = None
    is_bounce = lambda e: e.tag == q(NS_CLIENT, "message") and e.get("type") == "error"  # noqa: E731
    t0 = time.monotonic()
    while sent < 2000 and gone is None and bounced is None:
        flooder.message("bob@localhost/slow", body)
        sent += 1
        if sent % 20 == 0:
            peak = max(peak, rss(server))
            try:
                gone = watcher.recv_presence(0.001, sender="bob@localhost/slow", type_="unavailable")
            except TimeoutError:
                pass
            try:
                bounced = flooder.recv(0.001, is_bounce)
            except TimeoutError:
                pass
    if gone is None and bounced is None:
        try:
            gone = watcher.recv_presence(15, sender="bob@localhost/slow", type_="unavailable")
        except TimeoutError:
            pass
    elapsed = time.monotonic() - t0
    peak = max(peak, rss(server))
    try:
        latency = ping_ms(bystander)
    except TimeoutError:
        latency = float("inf")
    outcome = "victim cut off" if gone is not None else "flooder bounced" if bounced is not None else "NOTHING"
    print(f"\nslow reader: {outcome} after {sent} x 64 KiB messages ({sent * 64 / 1024:.1f} MiB) in {elapsed:.1f}s; "
          f"server RSS {before / MB:.1f} MB -> peak {peak / MB:.1f} MB (+{(peak - before) / MB:.1f} MB, bound "
          f"+{SLOW_READER_RSS_BOUND / MB:.0f}); bystander ping {latency:.1f} ms")
    assert gone is not None or bounced is not None, "neither the victim cut off nor the sender told"
    assert latency < 1000
    assert peak - before < SLOW_READER_RSS_BOUND
    assert sent < 2000
    if bounced is not None:  # back-pressure: the sender is told, not the victim's memory
        assert bounced.find(f"{q(NS_CLIENT, 'error')}/{{{NS_STANZAS}}}resource-constraint") is not None
        return
    # bob reads again: what was written, then the stream error, </close> and the close frame
    texts, code = RawWs.adopt(victim_sock).until_close(timeout=15)
    texts = [t for t in texts if t.tag != q(NS_CLIENT, "message")]
    assert stream_error_condition(texts) == "resource-constraint", [ET.tostring(t)[:200] for t in texts]
    assert texts[-1].tag == q(NS_FRAMING, "close")
    assert code == 1008
    log = server.log()
    assert "WARNING boshroster.transports.ws_connection: websocket 127.0.0.1: output queue full" in log
    assert server.alive()


# -- point 10: fairness ------------------------------------------------------------------------

FLOOD_STANZAS = 40_000
FAIR_PING_BOUND_MS = 500
FAIR_PING_P95_MS = 100


def test_a_flooding_client_does_not_stall_a_bystander(make_server, clients):
    """Before: the flooder's greenlet never yielded while its socket had data; a bystander's ping
    stalled 2-6 s. Now the reader lets the event loop poll every 2 ms at most; the bystander's
    pings during the flood are answered within 100 ms (95% of them; all within 500 ms). Traffic
    shaping is off: this is the transport's fairness alone (shaping would slow the flooder)."""
    server = make_server(c2s_stanza_rate=0)
    bystander = login(server, "dave", "bystander")
    flooder = login(server, "alice", "flood")
    clients.extend([bystander, flooder])
    ping_ms(bystander)
    sock = take_over(flooder)
    reader, done = discard_reader(sock, marker=b'id="last"')
    iq = "<iq xmlns='{0}' type='get' id='{1}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    blob = frame(OP_TEXT, iq.format(NS_CLIENT, "f").encode()) * FLOOD_STANZAS
    writer = gevent.spawn(sock.sendall, blob + frame(OP_TEXT, iq.format(NS_CLIENT, "last").encode()))
    gevent.sleep(0.2)  # the server is now busy with the flood
    latencies = []
    t0 = time.monotonic()
    while not done.is_set():
        latencies.append(ping_ms(bystander))
        gevent.sleep(0.02)
    flood_time = time.monotonic() - t0
    writer.get()
    assert len(latencies) >= 5, "the flood was over too soon to measure anything"
    latencies.sort()
    print(f"\nfairness: {len(latencies)} bystander pings during a {FLOOD_STANZAS}-stanza flood ({flood_time:.1f}s): "
          f"median {latencies[len(latencies) // 2]:.1f} ms, 95% {latencies[int(len(latencies) * 0.95)]:.1f} ms, "
          f"max {latencies[-1]:.1f} ms (bounds {FAIR_PING_P95_MS} / {FAIR_PING_BOUND_MS} ms)")
    # 95% within the 100 ms, every one within 500 ms: on a quiet 2-core machine the
    # median is 5-7 ms and the worst 12-23 ms; the margin is for a suite run in parallel groups
    assert latencies[int(len(latencies) * 0.95)] < FAIR_PING_P95_MS, latencies
    assert latencies[-1] < FAIR_PING_BOUND_MS
    reader.kill()


# -- point 11: frames and wire bytes per message -----------------------------------------------

def test_millions_of_empty_continuation_frames_are_refused(server, clients):
    """Before: 3,000,000 empty continuation frames (18 MB on the wire, 0 payload) were all read.
    Now frames per message are capped (``websocket_max_message_frames``): policy-violation, 1008."""
    bystander = login(server, "dave", "bystander")
    clients.append(bystander)
    raw = RawWs(server)
    raw.text(OPEN_XML)
    raw.send(frame(OP_TEXT, b"<", fin=False))
    chunk = frame(OP_CONT, fin=False) * 100_000
    before = rss(server)

    def flood():
        try:
            for _ in range(30):
                raw.send(chunk)
        except OSError:
            pass  # the server hung up

    writer = gevent.spawn(flood)
    t0 = time.monotonic()
    texts, code = raw.until_close(timeout=20)
    elapsed = time.monotonic() - t0
    writer.join(20)
    peak = rss(server)
    print(f"\ncontinuation flood: refused after {elapsed:.2f}s with close code {code}; "
          f"server RSS {before / MB:.1f} -> {peak / MB:.1f} MB")
    assert stream_error_condition(texts) == "policy-violation"
    assert code in (1008, 1009)
    assert elapsed < 3
    assert "frames" in server.log()
    raw.close()
    ping_ms(bystander)


def test_pings_inside_a_fragmented_message_count_as_its_wire_bytes(make_server, clients):
    """Control frames interleaved in a message count towards its wire bytes (header bytes
    included): 2,000 pings of 125 bytes inside a 10-byte message exceed the wire cap."""
    server = make_server(stanza_size_limit=4096, websocket_max_message_frames=100_000,
                         websocket_max_message_wire_bytes=16384)
    raw = RawWs(server)
    raw.text(OPEN_XML)
    raw.send(frame(OP_TEXT, b"<iq", fin=False))
    try:
        raw.send(frame(OP_PING, b"p" * 125) * 2000 + frame(OP_CONT, b"/>", fin=True))
    except OSError:
        pass
    texts, code = raw.until_close()
    assert stream_error_condition(texts) == "policy-violation"
    assert code == 1009
    raw.close()


def test_a_fragmented_stanza_within_the_caps_is_accepted(make_server, clients):
    server = make_server(websocket_max_message_frames=8)
    client = login(server, "alice", "frag")
    clients.append(client)
    iq = f"<iq xmlns='{NS_CLIENT}' type='get' id='frag1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    size = len(iq) // 8 + 1
    parts = [iq[i:i + size] for i in range(0, len(iq), size)]
    assert len(parts) == 8
    for index, part in enumerate(parts):
        opcode = websocket.ABNF.OPCODE_TEXT if index == 0 else websocket.ABNF.OPCODE_CONT
        client.ws.send_frame(websocket.ABNF.create_frame(part, opcode, int(index == len(parts) - 1)))
    assert client.recv(match=lambda e: e.get("id") == "frag1").get("type") == "result"
    # one frame more than the cap is refused
    for index, part in enumerate(parts + ["<!-- -->"]):
        opcode = websocket.ABNF.OPCODE_TEXT if index == 0 else websocket.ABNF.OPCODE_CONT
        client.ws.send_frame(websocket.ABNF.create_frame(part, opcode, int(index == len(parts))))
    got = []
    while not got or got[-1].tag != "socket-closed":
        got.append(client.recv(10))
    assert stream_error_condition(got) == "policy-violation"
    assert client.close_status == 1008


# -- point 16 (part): handshake version --------------------------------------------------------

@pytest.mark.parametrize("version", ["8", "7", "12", "14", "13, 8", "abc"])
def test_handshake_with_another_version_is_426(server, version):
    """RFC 6455 §4.4: a version the server does not speak gets 426 and the versions it does."""
    raw = RawWs(server, version=version)
    assert raw.status == 426
    assert raw.headers["sec-websocket-version"] == "13"
    raw.close()


def test_handshake_without_a_version_is_426_naming_13(server):
    raw = RawWs(server, version=None)
    assert raw.status == 426
    assert raw.headers["sec-websocket-version"] == "13"
    raw.close()


# -- point 8 (part): connections that never negotiate a session ----------------------------------

def test_upgraded_socket_that_never_opens_a_stream_is_closed(make_server, clients):
    server = make_server(c2s_negotiation_timeout=1.0)
    raw = RawWs(server)
    t0 = time.monotonic()
    texts, code = raw.until_close(timeout=10)
    elapsed = time.monotonic() - t0
    assert 0.8 < elapsed < 4, elapsed
    assert [t.tag for t in texts] == [q(NS_FRAMING, "open"), q(NS_STREAM, "error"), q(NS_FRAMING, "close")]
    assert stream_error_condition(texts) == "connection-timeout"
    assert code == 1000
    raw.close()
    assert "WARNING" in server.log() and "negotiat" in server.log()


def test_stream_opened_but_never_authenticated_is_closed(make_server, clients):
    server = make_server(c2s_negotiation_timeout=1.0)
    raw = RawWs(server)
    raw.text(OPEN_XML)
    texts, code = raw.until_close(timeout=10)
    assert [t.tag for t in texts][:2] == [q(NS_FRAMING, "open"), q(NS_STREAM, "features")]
    assert stream_error_condition(texts) == "connection-timeout"
    raw.close()


def test_authenticated_but_never_bound_is_closed_and_a_bound_session_stays(make_server, clients):
    server = make_server(c2s_negotiation_timeout=1.5)
    bound = login(server, "dave", "stays")
    clients.append(bound)
    half = WsClient(server.ws_url)
    clients.append(half)
    half.wait_features()
    assert half.authenticate("alice", "password").tag.endswith("success")
    half.restart()
    got = []
    deadline = time.monotonic() + 10
    while not got or got[-1].tag != "socket-closed":
        assert time.monotonic() < deadline
        got.append(half.recv(10))
    assert stream_error_condition(got) == "connection-timeout"
    gevent.sleep(0.5)
    ping_ms(bound)  # bound before the timeout: never cut off

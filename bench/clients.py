"""Load-generator clients: raw sockets, minimal HTTP/1.1 keep-alive, minimal RFC 6455 frames.

Nothing here parses XML: a client's received text goes either to a ``handler(client, text)``
(hot paths: messages, pushes, presence) or into ``client.buf``, where ``expect(regex)`` finds
the next match.  That keeps the generator's CPU per operation well below the server's.

* ``HttpConn``  one kept-alive HTTP/1.1 connection (TCP_NODELAY), Content-Length bodies only.
* ``BoshClient`` XEP-0124/0206 like Strophe: at most ``requests`` (2) requests in flight, one
  parked when idle; outgoing stanzas queued while two are in flight go out together.
* ``WsClient``  RFC 7395 over hand-rolled frames; client frames use the all-zero mask key (legal,
  and the payload needs no XOR), pings are answered with pongs.
* ``login(client, user, ...)``: stream, SASL (SCRAM-SHA-1 with cached keys, or PLAIN), restart,
  bind, roster get, initial presence; returns when the server echoed the presence back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import struct
import time

import gevent
import gevent.event
import gevent.lock

NS_BOSH = "http://jabber.org/protocol/httpbind"
NS_FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"

RE_FEATURES = re.compile(r"</stream:features>|<stream:features[^>]*/>")
RE_SASL = re.compile(r"<(challenge|success|failure)\b[^>]*?(?:/>|>(.*?)</\1>)", re.S)
RE_JID = re.compile(r"<jid>([^<]+)</jid>")
RE_ITEM = re.compile(r"<item\b")
RE_SID = re.compile(rb"""\bsid=["']([^"']+)""")  # servers quote attributes either way
RE_ROSTER_RESULT = re.compile(r'<iq\b[^>]*\bid=["\']roster1["\'][^>]*?(?:/>|>(.*?)</iq>)', re.S)
RE_PRESENCE_SELF = None  # built per client (depends on its JID)


class BenchError(Exception):
    pass


# -- SCRAM-SHA-1 client keys, cached like Converse caches them ----------------------------

class ScramCache:
    """(user, salt, iterations) -> (ClientKey, ServerKey); persisted as JSON."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self.dirty = False
        if path and os.path.exists(path):
            with open(path) as fh:
                for k, (ck, sk) in json.load(fh).items():
                    self.keys[k] = (base64.b64decode(ck), base64.b64decode(sk))

    @staticmethod
    def key(user: str, salt_b64: str, iterations: int) -> str:
        return f"{user}\0{salt_b64}\0{iterations}"

    @staticmethod
    def derive(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
        salted = hashlib.pbkdf2_hmac("sha1", password.encode(), salt, iterations)
        return (hmac.new(salted, b"Client Key", "sha1").digest(), hmac.new(salted, b"Server Key", "sha1").digest())

    def get(self, user: str, password: str, salt_b64: str, iterations: int) -> tuple[bytes, bytes]:
        k = self.key(user, salt_b64, iterations)
        v = self.keys.get(k)
        if v is None:
            v = self.keys[k] = self.derive(password, base64.b64decode(salt_b64), iterations)
            self.dirty = True
        return v

    def save(self) -> None:
        if not self.path or not self.dirty:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({k: (base64.b64encode(ck).decode(), base64.b64encode(sk).decode())
                       for k, (ck, sk) in self.keys.items()}, fh)
        os.replace(tmp, self.path)
        self.dirty = False


# -- HTTP ------------------------------------------------------------------------------------

class HttpConn:
    __slots__ = ("sock", "buf", "prefix")

    def __init__(self, addr: tuple[str, int], path: str = "/http-bind", content_type: str = "text/xml; charset=utf-8"):
        self.sock = socket.create_connection(addr, timeout=None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.prefix = (f"POST {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\n"
                       f"Content-Type: {content_type}\r\nContent-Length: ").encode()

    def request(self, body: bytes, prefix: bytes | None = None) -> bytes:
        """POST ``body``; return the response body (raises BenchError for non-200)."""
        self.sock.sendall((prefix or self.prefix) + b"%d\r\n\r\n" % len(body) + body)
        status, data = self.read_response()
        if status != 200:
            raise BenchError(f"HTTP {status}: {data[:200]!r}")
        return data

    def get(self, path: str, host: str = "127.0.0.1") -> bytes:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status, data = self.read_response()
        if status != 200:
            raise BenchError(f"HTTP {status}: {data[:200]!r}")
        return data

    def read_response(self) -> tuple[int, bytes]:
        buf = self.buf
        recv = self.sock.recv
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = recv(65536)
            if not chunk:
                raise BenchError("connection closed by the server")
            buf += chunk
        head = buf[:end].lower()
        status = int(head[9:12])
        i = head.find(b"\ncontent-length:")
        if i < 0:
            raise BenchError("response without Content-Length")
        j = head.find(b"\r", i + 16)
        length = int(head[i + 16: j if j >= 0 else len(head)])
        start = end + 4
        while len(buf) < start + length:
            chunk = recv(65536)
            if not chunk:
                raise BenchError("connection closed mid-body")
            buf += chunk
        self.buf = buf[start + length:]
        return status, buf[start:start + length]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- the transport-independent part of a client ---------------------------------------------

class Client:
    kind = "?"

    def __init__(self, addr: tuple[str, int], domain: str = "localhost"):
        self.addr = addr
        self.domain = domain
        self.buf = ""
        self.event = gevent.event.Event()
        self.handler = None  # handler(client, text) instead of buffering
        self.jid = ""
        self.user = ""
        self.closed = False
        self.error: str | None = None
        self.data: dict = {}  # per-workload scratch space
        self.steps: dict[str, float] = {}  # seconds per login step (login())

    def _feed(self, text: str) -> None:
        if self.handler is not None:
            self.handler(self, text)
        else:
            self.buf += text
            self.event.set()

    def expect(self, regex: re.Pattern, timeout: float = 20.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.buf)
            if m is not None:
                self.buf = self.buf[m.end():]
                return m
            if self.closed:
                raise BenchError(f"{self.user}: stream closed ({self.error}) waiting for {regex.pattern!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.user}: timeout waiting for {regex.pattern!r}; have {self.buf[-300:]!r}")
            self.event.clear()
            self.event.wait(remaining)

    def send(self, xml: str) -> None:
        raise NotImplementedError


# -- BOSH ------------------------------------------------------------------------------------

class BoshClient(Client):
    kind = "bosh"

    def __init__(self, addr, domain="localhost", wait: int = 60):
        super().__init__(addr, domain)
        self.wait = wait
        self.rid = int.from_bytes(os.urandom(4), "big") % 1_000_000_000 + 1_000
        self.sid = ""
        self.out: list[str] = []
        self.idle_conns: list[HttpConn] = []
        self.in_flight = 0
        self.max_in_flight = 2
        self.polling = False
        self.single_conn = False  # idle mode: keep one socket per session when possible
        self.requests_done = 0

    def _conn(self) -> HttpConn:
        return self.idle_conns.pop() if self.idle_conns else HttpConn(self.addr)

    def _sync(self, payload: str = "", attrs: str = "") -> None:
        """Login phase: one request at a time on one connection, answer fed to the buffer."""
        self.rid += 1
        conn = self._conn()
        body = f"<body xmlns='{NS_BOSH}' rid='{self.rid}' sid='{self.sid}'{attrs}>{payload}</body>"
        data = conn.request(body.encode())
        self.idle_conns.append(conn)
        self._response(data)

    def _response(self, data: bytes) -> None:
        self.requests_done += 1
        if len(data) < 120 and data.endswith(b"/>") and b"terminate" not in data:
            return  # an empty body
        text = data.decode("utf-8")
        head = text[:400]
        if 'type="terminate"' in head or "type='terminate'" in head:
            self.closed = True
            self.error = "terminated: " + text[:300]
            self.event.set()
        self._feed(text)

    def open(self) -> None:
        self.rid += 1
        conn = self._conn()
        body = (f"<body xmlns='{NS_BOSH}' rid='{self.rid}' to='{self.domain}' wait='{self.wait}' hold='1' "
                f"ver='1.6' xml:lang='en' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>")
        data = conn.request(body.encode())
        self.idle_conns.append(conn)
        m = RE_SID.search(data)
        if m is None:
            raise BenchError(f"no sid in {data[:300]!r}")
        self.sid = m.group(1).decode()
        self._response(data)

    def restart(self) -> None:
        self._sync("", f" xmpp:restart='true' xmlns:xmpp='urn:xmpp:xbosh' to='{self.domain}'")

    def expect(self, regex: re.Pattern, timeout: float = 20.0) -> re.Match:
        """Login phase: if what is expected was not in the responses so far, poll for it with an
        empty request (the server holds it until it has something, XEP-0124 §8): a server may
        answer a request before the stanzas it causes are ready (ejabberd does, for the presence
        echo), and with no request in flight it could never deliver them."""
        if self.polling or self.handler is not None:
            return super().expect(regex, timeout)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.buf)
            if m is not None:
                self.buf = self.buf[m.end():]
                return m
            if self.closed:
                raise BenchError(f"{self.user}: stream closed ({self.error}) waiting for {regex.pattern!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.user}: timeout waiting for {regex.pattern!r}; have {self.buf[-300:]!r}")
            self._sync("")

    def login_send(self, xml: str) -> None:
        self._sync(xml)

    # -- after login: asynchronous, Strophe-like ------------------------------------------
    def start(self, poll: bool = True) -> None:
        self.polling = poll
        self._kick()

    def send(self, xml: str) -> None:
        self.out.append(xml)
        self._kick()

    def _kick(self) -> None:
        if self.closed:
            return
        if self.out and self.in_flight < self.max_in_flight:
            payload = "".join(self.out)
            self.out.clear()
            self._spawn(payload)
        elif self.in_flight == 0 and self.polling:
            self._spawn("")

    def _spawn(self, payload: str, extra: str = "") -> None:
        self.in_flight += 1
        self.rid += 1
        body = f"<body xmlns='{NS_BOSH}' rid='{self.rid}' sid='{self.sid}'{extra}>{payload}</body>".encode()
        gevent.spawn(self._do, body)

    def _do(self, body: bytes) -> None:
        conn = None
        try:
            conn = self._conn()
            data = conn.request(body)
        except Exception as exc:  # noqa: BLE001 - recorded, the workload counts it
            self.in_flight -= 1
            if conn is not None:
                conn.close()
            if not self.closed:
                self.closed = True
                self.error = repr(exc)
                self.event.set()
            return
        self.in_flight -= 1
        if self.closed or (self.single_conn and (self.in_flight > 0 or self.idle_conns)):
            conn.close()
        else:
            self.idle_conns.append(conn)
        self._response(data)
        self._kick()

    def close(self) -> None:
        """Terminate the session (one extra request), then drop the sockets."""
        if not self.closed and self.sid:
            self.closed = True
            self.rid += 1
            body = (f"<body xmlns='{NS_BOSH}' rid='{self.rid}' sid='{self.sid}' type='terminate'>"
                    f"<presence xmlns='jabber:client' type='unavailable'/></body>").encode()
            try:
                conn = HttpConn(self.addr)
                conn.request(body)
                conn.close()
            except Exception:  # noqa: BLE001
                pass
        self.drop()

    def drop(self) -> None:
        self.closed = True
        self.polling = False
        for conn in self.idle_conns:
            conn.close()
        self.idle_conns.clear()


# -- WebSocket -------------------------------------------------------------------------------

_PONG_EMPTY = b"\x8a\x80\x00\x00\x00\x00"


def ws_frame(text: str, opcode: int = 0x1) -> bytes:
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    return head + b"\0\0\0\0" + payload


class WsClient(Client):
    kind = "ws"

    def __init__(self, addr, domain="localhost", path="/xmpp-websocket", subprotocol="xmpp"):
        super().__init__(addr, domain)
        self.path = path
        self.subprotocol = subprotocol
        self.sock = None
        self.reader = None
        self.frames_in = 0
        # The sender and the reader (answering pings) both write: two greenlets waiting on
        # one socket's write at once is a gevent ConcurrentObjectUseError.
        self._wlock = gevent.lock.Semaphore()

    def connect(self) -> None:
        sock = socket.create_connection(self.addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        proto = f"Sec-WebSocket-Protocol: {self.subprotocol}\r\n" if self.subprotocol else ""
        sock.sendall((f"GET {self.path} HTTP/1.1\r\nHost: {self.addr[0]}:{self.addr[1]}\r\n"
                      f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n{proto}\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise BenchError("WebSocket handshake: connection closed")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise BenchError(f"WebSocket handshake refused: {head[:200]!r}")
        self.sock = sock
        self.reader = gevent.spawn(self._read, rest)

    def open(self) -> None:
        self.connect()
        self.send(f"<open xmlns='{NS_FRAMING}' to='{self.domain}' version='1.0'/>")

    def restart(self) -> None:
        self.send(f"<open xmlns='{NS_FRAMING}' to='{self.domain}' version='1.0'/>")

    def login_send(self, xml: str) -> None:
        self.send(xml)

    def start(self, poll: bool = True) -> None:
        pass

    def send(self, xml: str) -> None:
        try:
            with self._wlock:
                self.sock.sendall(ws_frame(xml))
        except OSError as exc:
            if not self.closed:
                self.closed = True
                self.error = repr(exc)
                self.event.set()

    def _read(self, buf: bytes) -> None:
        recv = self.sock.recv
        try:
            while True:
                pos = 0
                size = len(buf)
                texts = []
                while size - pos >= 2:
                    b0 = buf[pos]
                    n = buf[pos + 1] & 0x7F
                    hl = 2
                    if n == 126:
                        if size - pos < 4:
                            break
                        n = (buf[pos + 2] << 8) | buf[pos + 3]
                        hl = 4
                    elif n == 127:
                        if size - pos < 10:
                            break
                        n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                        hl = 10
                    if size - pos < hl + n:
                        break
                    op = b0 & 0x0F
                    if op == 0x1 or op == 0x0:
                        texts.append(buf[pos + hl:pos + hl + n])
                    elif op == 0x9:
                        payload = buf[pos + hl:pos + hl + n]
                        with self._wlock:
                            self.sock.sendall(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload
                                              if payload else _PONG_EMPTY)
                    elif op == 0x8:
                        self.closed = True
                        self.error = self.error or f"close frame {buf[pos + hl:pos + hl + n]!r}"
                    pos += hl + n
                if pos:
                    buf = buf[pos:]
                if texts:
                    self.frames_in += len(texts)
                    self._feed(b"".join(texts).decode("utf-8"))
                if self.closed:
                    self.event.set()
                    return
                chunk = recv(262144)
                if not chunk:
                    raise BenchError("EOF")
                buf += chunk
        except (OSError, BenchError) as exc:
            if not self.closed:
                self.closed = True
                self.error = repr(exc)
            self.event.set()

    def close(self) -> None:
        if not self.closed and self.sock is not None:
            try:
                with self._wlock:
                    self.sock.sendall(ws_frame(f"<close xmlns='{NS_FRAMING}'/>"))
            except OSError:
                pass
        self.drop()

    def drop(self) -> None:
        self.closed = True
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        if self.reader is not None:
            self.reader.kill(block=False)


# -- login -----------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


LOGIN_STEPS = ("open", "sasl", "restart", "bind", "roster", "presence")


def login(client: Client, user: str, password: str, scram: ScramCache | None, mechanism: str = "SCRAM-SHA-1",
          resource: str = "bench", roster: bool = True, presence: bool = True, timeout: float = 30.0) -> int:
    """Full login; returns the number of roster items received (-1 if no roster get).

    ``client.steps`` gets the seconds each step of LOGIN_STEPS took (open: connect + stream
    open until the features; sasl: auth until success; restart: until the new features; bind;
    roster; presence: until the server echoed it), so a stall shows up as one step."""
    client.user = user
    steps = client.steps = {}
    clock = time.perf_counter
    t = clock()
    client.open()
    client.expect(RE_FEATURES, timeout)
    steps["open"], t = clock() - t, clock()
    if mechanism == "PLAIN":
        token = _b64(("\0" + user + "\0" + password).encode())
        client.login_send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        m = client.expect(RE_SASL, timeout)
        if m.group(1) != "success":
            raise BenchError(f"{user}: PLAIN failed: {m.group(0)[:200]}")
    else:
        cnonce = _b64(os.urandom(18))
        first_bare = f"n={user},r={cnonce}"
        client.login_send(f"<auth xmlns='{NS_SASL}' mechanism='SCRAM-SHA-1'>{_b64(('n,,' + first_bare).encode())}</auth>")
        m = client.expect(RE_SASL, timeout)
        if m.group(1) != "challenge":
            raise BenchError(f"{user}: SCRAM: expected a challenge, got {m.group(0)[:200]}")
        server_first = base64.b64decode(m.group(2)).decode()
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        nonce, salt_b64, iterations = attrs["r"], attrs["s"], int(attrs["i"])
        if not nonce.startswith(cnonce):
            raise BenchError("SCRAM: server nonce does not extend ours")
        client_key, server_key = scram.get(user, password, salt_b64, iterations)
        final_bare = f"c=biws,r={nonce}"
        auth_message = f"{first_bare},{server_first},{final_bare}".encode()
        stored_key = hashlib.sha1(client_key).digest()
        signature = hmac.new(stored_key, auth_message, "sha1").digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        client.login_send(f"<response xmlns='{NS_SASL}'>{_b64(f'{final_bare},p={_b64(proof)}'.encode())}</response>")
        m = client.expect(RE_SASL, timeout)
        if m.group(1) != "success":
            raise BenchError(f"{user}: SCRAM failed: {m.group(0)[:200]}")
        verifier = base64.b64decode(m.group(2) or "").decode()
        expected = "v=" + _b64(hmac.new(server_key, auth_message, "sha1").digest())
        if verifier != expected:
            raise BenchError(f"{user}: SCRAM server signature mismatch")
    steps["sasl"], t = clock() - t, clock()
    client.restart()
    client.expect(RE_FEATURES, timeout)
    steps["restart"], t = clock() - t, clock()
    client.login_send(f"<iq xmlns='jabber:client' type='set' id='bind1'><bind xmlns='{NS_BIND}'>"
                      f"<resource>{resource}</resource></bind></iq>")
    client.jid = client.expect(RE_JID, timeout).group(1)
    steps["bind"], t = clock() - t, clock()
    items = -1
    if roster:
        client.login_send("<iq xmlns='jabber:client' type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>")
        m = client.expect(RE_ROSTER_RESULT, timeout)
        items = len(RE_ITEM.findall(m.group(1) or ""))
        steps["roster"], t = clock() - t, clock()
    if presence:
        client.login_send("<presence xmlns='jabber:client'/>")
        client.expect(re.compile(r'<presence\b[^>]*\bfrom=["\']' + re.escape(client.jid) + '["\']'), timeout)
        steps["presence"] = clock() - t
    return items

"""Drive the real WSGI app in-process: a small WSGI driver, a fake clock, a BOSH client.

``WebApp`` (the same object the server runs) is called with a synthesized
environ (``wsgiref.util.setup_testing_defaults``) through
``wsgiref.validate.validator``, the way bottle's test tools do (design
notes A.3): no sockets, so BOSH timing is driven by ``FakeClock`` instead
of real ``wait``/``inactivity`` sleeps.  Requests that the server holds run
in their own greenlet (``Bosh.spawn``); ``FakeClock.advance`` fires the
timers that are due and lets every greenlet they wake run.

    world = World(tmp_path, backend_url)          # Core + WebApp + FakeClock
    alice = world.client().login("alice")         # PLAIN, restart, bind
    poll = alice.spawn()                          # a parked request
    world.clock.advance(9.5)                      # 'wait' elapses
    body = poll.get()                             # the parsed <body/>
"""

from __future__ import annotations

import base64
import heapq
import io
import itertools
import xml.etree.ElementTree as ET
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import gevent

from boshroster.config import load
from boshroster.transports.bosh_manager import BoshManager
from boshroster.web.app import WebApp
from boshroster.wiring import Core

NS_BOSH = "http://jabber.org/protocol/httpbind"
NS_CLIENT = "jabber:client"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_STREAM = "http://etherx.jabber.org/streams"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XBOSH = "urn:xmpp:xbosh"
PASSWORD = "password"


def q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def settle() -> None:
    """Let every greenlet that is ready run (requests woken by a timer or a send)."""
    for _ in range(3):
        gevent.idle()


class FakeClock:
    """The clock BoshManager takes (``now``, ``call_later``, ``cancel``), moved by the test.

    Like GeventClock, a due timer runs its function in a new greenlet."""

    def __init__(self, start: float = 1000.0):
        self.t = start
        self._timers: list[list] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    def call_later(self, delay: float, fn, *args):
        handle = [self.t + max(0.0, delay), next(self._seq), fn, args, False]
        heapq.heappush(self._timers, handle)
        return handle

    def cancel(self, handle) -> None:
        if handle is not None:
            handle[4] = True

    def pending(self) -> list[float]:
        """Deadlines of the live timers, in seconds from now."""
        return sorted(h[0] - self.t for h in self._timers if not h[4])

    def advance(self, seconds: float) -> None:
        target = self.t + seconds
        settle()
        while self._timers and self._timers[0][0] <= target:
            deadline, _seq, fn, args, cancelled = heapq.heappop(self._timers)
            if cancelled:
                continue
            self.t = max(self.t, deadline)
            gevent.spawn(fn, *args).join()
            settle()
        self.t = target
        settle()


class Response:
    def __init__(self, status: str, headers: list, data: bytes):
        self.status = status
        self.headers = dict(headers)
        self.data = data

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    def body(self) -> ET.Element:
        return ET.fromstring(self.data)


class Wsgi:
    """Call a WSGI app the way a server would, checked by wsgiref's validator."""

    def __init__(self, app):
        self.app = validator(app)

    def request(self, method: str, path: str, data: bytes = b"", remote: str = "127.0.0.1",
                headers: dict | None = None) -> Response:
        environ: dict = {}
        setup_testing_defaults(environ)
        environ.update({
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": "",
            "REMOTE_ADDR": remote,
            "CONTENT_TYPE": "text/xml; charset=utf-8",
            "CONTENT_LENGTH": str(len(data)),
            "wsgi.input": io.BytesIO(data),
        })
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        started = []

        def start_response(status, response_headers, exc_info=None):
            started[:] = [status, response_headers]
            return lambda chunk: None

        result = self.app(environ, start_response)
        try:
            data = b"".join(result)
        finally:
            if hasattr(result, "close"):  # PEP 3333: the server calls close() when there is one
                result.close()
        return Response(started[0], started[1], data)

    def post_bosh(self, xml: str | bytes, remote: str = "127.0.0.1") -> Response:
        return self.request("POST", "/http-bind", xml.encode("utf-8") if isinstance(xml, str) else xml, remote)


class World:
    """One in-process server: a real Core (accounts, offline store, roster backend) and its WebApp,
    whose BoshManager runs on a FakeClock."""

    def __init__(self, tmp_path, roster_url: str, users=("alice", "bob", "carol", "dave"), **settings):
        settings.setdefault("bosh_max_wait", 10)
        settings.setdefault("bosh_max_inactivity", 30)
        self.config = load(None, env={}, data_dir=str(tmp_path / "data"), domain="localhost",
                           http_roster_url=roster_url, **settings)
        self.core = Core(self.config)
        for user in users:
            self.core.accounts.add(user, PASSWORD)
        self.app = WebApp(self.core)
        self.clock = FakeClock()
        self.app.bosh = BoshManager(self.core.stream_context, clock=self.clock)
        self.wsgi = Wsgi(self.app)
        self._rids = itertools.count(1_000_000, 1_000_000)

    def client(self, remote: str = "127.0.0.1") -> "Bosh":
        return Bosh(self, next(self._rids), remote)

    def session(self, client: "Bosh"):
        """The server's BoshSession of ``client`` (for the few checks of internal state)."""
        return self.app.bosh.sessions.get(client.sid)

    def close(self) -> None:
        self.core.shutdown()


class Bosh:
    """A BOSH client with explicit rids; each request returns the parsed <body/>."""

    def __init__(self, world: World, rid: int, remote: str):
        self.world = world
        self.rid = rid
        self.remote = remote
        self.sid: str | None = None
        self.creation: ET.Element | None = None

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def raw(self, xml: str) -> Response:
        return self.world.wsgi.post_bosh(xml, self.remote)

    def post(self, inner: str = "", rid: int | None = None, **attrs) -> ET.Element:
        return self.raw(self.body(inner, rid, **attrs)).body()

    def body(self, inner: str = "", rid: int | None = None, **attrs) -> str:
        rid = self.next_rid() if rid is None else rid
        attrs = {"rid": str(rid), "sid": self.sid, **attrs}
        attr = "".join(f" {k.replace('__', ':')}='{v}'" for k, v in attrs.items() if v is not None)
        return f"<body xmlns='{NS_BOSH}' xmlns:xmpp='{XBOSH}'{attr}>{inner}</body>"

    def spawn(self, inner: str = "", rid: int | None = None, **attrs) -> gevent.Greenlet:
        """Send a request that the server may hold; ``.get()`` the greenlet for its body."""
        xml = self.body(inner, rid, **attrs)
        greenlet = gevent.spawn(lambda: self.raw(xml).body())
        settle()
        return greenlet

    def create(self, wait: int = 10, hold: int = 1, **extra) -> ET.Element:
        attrs = {"to": "localhost", "wait": str(wait), "hold": str(hold), "ver": "1.11",
                 "xmpp__version": "1.0", **extra}
        self.sid = None
        body = self.post(**attrs)
        self.creation = body
        self.sid = body.get("sid")
        return body

    def login(self, user: str, resource: str = "r", wait: int = 10, presence: bool = False, **extra) -> "Bosh":
        self.create(wait=wait, **extra)
        token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
        reply = self.post(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        assert reply.find(q(NS_SASL, "success")) is not None, ET.tostring(reply)
        reply = self.post(xmpp__restart="true")
        assert reply.find(q(NS_STREAM, "features")) is not None, ET.tostring(reply)
        reply = self.post(f"<iq xmlns='{NS_CLIENT}' type='set' id='bind'><bind xmlns='{NS_BIND}'>"
                          f"<resource>{resource}</resource></bind></iq>")
        assert reply.find(q(NS_CLIENT, "iq")).get("type") == "result", ET.tostring(reply)
        self.jid = f"{user}@localhost/{resource}"
        if presence:
            self.presence_sent = self.spawn(f"<presence xmlns='{NS_CLIENT}'/>")
        return self

    def message(self, to: str, body: str, id_: str) -> str:
        return f"<message xmlns='{NS_CLIENT}' to='{to}' type='chat' id='{id_}'><body>{body}</body></message>"


def messages(*bodies: ET.Element) -> list[ET.Element]:
    return [el for body in bodies for el in body if el.tag == q(NS_CLIENT, "message")]


def error_condition(stanza: ET.Element) -> str | None:
    err = stanza.find(q(NS_CLIENT, "error"))
    if err is None:
        return None
    for child in err:
        if child.tag.startswith(f"{{{NS_STANZAS}}}") and not child.tag.endswith("}text"):
            return child.tag.rpartition("}")[2]
    return None

"""The bench's roster backend: tests/backend_app.TestBackend with generated contacts.

Run as a process of its own (so its CPU is neither the server's nor the load
generator's): ``python bench/backend.py --ring N --domain localhost``.  It prints
``PORT <n>`` once listening.

Contacts are computed per request, never stored (``gen`` per user is the only
state), so 10,000+ users cost nothing:

* ``u<i>``  (the ring, 0 <= i < N): 20 contacts ``u<i±1..10 mod N>`` (mutual);
* ``l<i>``  (login users): 20 contacts ``u<20i .. 20i+19 mod N>`` (never online
  during the login workload, so a login does its probes but no fan-out);
* ``h0``    (the presence hub): ``h1`` .. ``h<hub>``; ``h<k>``: ``h0``.

A "change at the backend" (``POST /_ctl/bump`` with a JSON array of usernames)
renames the user's first contact, so the next fetch differs by one item: one
roster push per refresh.  ``GET /_ctl/stats`` answers ``{"gets": total GETs,
"conditional": GETs with a validator, "not_modified": 304s, "connections": TCP
connections accepted}`` (a kept-alive client opens few; each new one is counted).

``--validators etag|last-modified|both|none`` (default etag): what the replies carry
for conditional GETs (tests/backend_app.py).  ``--nagle``: no TCP_NODELAY on accepted
sockets, like Python's http.server and the ejabberd peer's roster shim: pywsgi writes a
reply's headers and body apart, so a client that delays its ACK waits ~40 ms per reply
on a kept-alive connection (the WebSocket login stall of issue 12).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from backend_app import TestBackend, _RawPathHandler  # noqa: E402


class GeneratedContacts:
    """Looks like the ``contacts`` dict TestBackend reads (``.get(username, default)``)."""

    def __init__(self, ring: int, hub: int, domain: str):
        self.ring = ring
        self.hub = hub
        self.domain = domain
        self.gen: dict[str, int] = {}

    def _item(self, user: str, first: bool, gen: int) -> tuple[str, dict]:
        name = f"User {user}" + (f" v{gen}" if first and gen else "")
        return f"{user}@{self.domain}", {"name": name, "groups": ["Bench"]}

    def names(self, username: str) -> list[str] | None:
        kind, num = username[:1], username[1:]
        if not num.isdigit():
            return None
        i = int(num)
        if kind == "u" and i < self.ring:
            return [f"u{(i + k) % self.ring}" for k in (*range(1, 11), *range(-10, 0))]
        if kind == "l":
            return [f"u{(20 * i + k) % self.ring}" for k in range(20)]
        if kind == "h" and i == 0:
            return [f"h{k}" for k in range(1, self.hub + 1)]
        if kind == "h" and i <= self.hub:
            return ["h0"]
        return None

    def get(self, username: str, default=None):
        names = self.names(username)
        if names is None:
            return default if default is not None else {}
        gen = self.gen.get(username, 0)
        return dict(self._item(name, n == 0, gen) for n, name in enumerate(names))


class BenchBackend(TestBackend):
    __test__ = False

    def __init__(self, contacts: GeneratedContacts, nagle: bool = False):
        super().__init__()
        self.contacts = contacts  # duck-typed: only .get() is used
        self.nagle = nagle

    def start_on(self, port: int) -> "BenchBackend":
        handler = _RawPathHandler
        if self.nagle:
            handler = type("NagleHandler", (_RawPathHandler,), {"nodelay": False})
        self._server = WSGIServer(("127.0.0.1", port), self._ctl_app, handler_class=handler,
                                  spawn=Pool(), log=None, error_log=None, backlog=1024)
        self._server.owner = self
        self._server.start()
        return self

    def _ctl_app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/_ctl/"):
            return self._app(environ, start_response)
        if path == "/_ctl/bump" and environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            for user in json.loads(environ["wsgi.input"].read(length) or b"[]"):
                self.contacts.gen[user] = self.contacts.gen.get(user, 0) + 1
            body = b'{"ok": true}'
        elif path == "/_ctl/stats":
            body = json.dumps({"gets": sum(self._counts.values()), "conditional": sum(self._conditional.values()),
                               "not_modified": sum(self._not_modified.values()),
                               "connections": self.connections}).encode()
        else:
            start_response("404 Not Found", [("Content-Length", "0")])
            return [b""]
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ring", type=int, required=True)
    p.add_argument("--hub", type=int, default=100)
    p.add_argument("--domain", default="localhost")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--validators", default="etag", choices=("etag", "last-modified", "both", "none"))
    p.add_argument("--nagle", action="store_true", help="no TCP_NODELAY (like Python's http.server)")
    args = p.parse_args()
    backend = BenchBackend(GeneratedContacts(args.ring, args.hub, args.domain), nagle=args.nagle)
    backend.set_validators(None if args.validators == "none" else args.validators)
    backend.start_on(args.port)
    print(f"PORT {backend.port}", flush=True)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

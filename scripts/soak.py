"""Soak test: N mixed sessions (half BOSH, half WebSocket) chat for M minutes while one
more client attacks the server; every message is accounted for.

* The server (``python -m boshroster serve``) and the roster backend (bench/backend.py:
  user ``u<i>`` has the 20 contacts ``u<i±1..10>``) run as processes of their own, on
  loopback ports; nothing else is contacted.
* Each session sends a chat message with a unique id to a random contact every
  ``--interval`` seconds (on average); 2% of the sessions log out every minute and come
  back 5–20 s later (their messages are stored offline meanwhile).
* The attacker, every ``--attack-every`` seconds: idle TCP sockets, slowloris headers, a
  WebSocket ping flood without reading, a slow reader flooded by another user, poison
  stanzas (1,200 levels deep, ``<xml:foo/>``), an oversized stanza in a BOSH body, a BOSH
  body of 10,000 pings, ``rid='²'``, a WebSocket handshake of version 8, wrong passwords.
* A session whose client saw an error (a failed request, a closed stream) reconnects, as
  Converse's ``auto_reconnect`` does; the summary counts them by error.  BOSH clients keep a
  request parked (``start(poll=True)``), and what arrives during a login (offline messages
  follow the initial presence) is counted too.
* At the end every session is back online; each message must have arrived exactly once
  (live or from offline storage) or have been bounced to its sender with an error; the
  recipients of lost messages are listed.

Prints a line every 30 s (server RSS, sessions, sent, received), then the summary.
Exit code 0 only if lost = 0, duplicates = 0 and the server log has no ERROR/Traceback.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.clients import BenchError, BoshClient, HttpConn, ScramCache, WsClient, login, ws_frame  # noqa: E402

RE_MSG = re.compile(r'<message\b([^>]*)>')
RE_ID = re.compile(r'\bid="(s\d+-\d+)"')
PASSWORD = "soak-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Ledger:
    """Every message sent, and what became of it."""

    def __init__(self):
        self.sent: dict[str, str] = {}
        self.received: Counter = Counter()
        self.bounced: set[str] = set()

    def on_text(self, client, text: str) -> None:
        for match in RE_MSG.finditer(text):
            attrs = match.group(1)
            ident = RE_ID.search(attrs)
            if ident is None:
                continue
            if 'type="error"' in attrs:
                self.bounced.add(ident.group(1))
            else:
                self.received[ident.group(1)] += 1


class Soak:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="boshroster-soak-")
        self.ledger = Ledger()
        self.scram = ScramCache(os.path.join(self.work, "scram.json"))
        self.clients: dict[int, object] = {}
        self.seq = 0
        self.attacks: Counter = Counter()
        self.deaths: Counter = Counter()  # sessions that died under a client, by error
        self.stopping = False
        self.procs: list[subprocess.Popen] = []

    # -- processes ----------------------------------------------------------------------
    def start(self) -> None:
        n = self.args.sessions
        backend = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "backend.py"), "--ring", str(n)],
                                   stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.procs.append(backend)
        line = backend.stdout.readline()
        backend_port = int(line.split()[1])
        self.port = free_port()
        config = {
            "domain": "localhost", "http_interfaces": ["127.0.0.1"], "http_ports": [self.port],
            "data_dir": os.path.join(self.work, "data"), "log_level": "info", "scram_iterations": 4096,
            "http_roster_url": f"http://127.0.0.1:{backend_port}/contacts/%s",
            "max_connections": max(1000, 2 * n + 1000),
        }
        path = os.path.join(self.work, "boshroster.toml")
        with open(path, "w") as fh:
            for key, value in config.items():
                fh.write(f"{key} = {json.dumps(value)}\n")
        users = os.path.join(self.work, "users.txt")
        with open(users, "w") as fh:
            fh.writelines(f"u{i}:{PASSWORD}\n" for i in range(n))
            fh.write(f"victim:{PASSWORD}\nflooder:{PASSWORD}\n")
        subprocess.run([sys.executable, "-m", "boshroster", "user", "import", users, "--config", path],
                       check=True, cwd=ROOT, capture_output=True)
        self.log_path = os.path.join(self.work, "server.log")
        self.server = subprocess.Popen([sys.executable, "-m", "boshroster", "serve", "--config", path],
                                       stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(self.server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                gevent.sleep(0.1)
        raise SystemExit("the server did not start: see " + self.log_path)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

    # -- sessions --------------------------------------------------------------------------
    def connect(self, i: int) -> None:
        addr = ("127.0.0.1", self.port)
        client = BoshClient(addr, wait=30) if i % 2 else WsClient(addr)
        login(client, f"u{i}", PASSWORD, self.scram, resource="soak", timeout=60)
        self.ledger.on_text(client, client.buf)  # offline messages arrive right after the login's presence
        client.handler = self.ledger.on_text
        client.buf = ""
        if client.kind == "bosh":
            client.last_response = time.monotonic()
            respond = client._response

            def tracked(data, client=client, respond=respond):
                client.last_response = time.monotonic()
                respond(data)

            client._response = tracked
        client.start(poll=True)  # BOSH: keep a request parked, as Strophe does (else it only hears in the
        # responses to its own sends, and its queue waits for the inactivity timeout once it stops sending)
        self.clients[i] = client

    def chatter(self, i: int) -> None:
        n = self.args.sessions
        rng = random.Random(i)
        while not self.stopping:
            gevent.sleep(rng.uniform(0.5, 1.5) * self.args.interval)
            client = self.clients.get(i)
            if client is None or client.closed or self.stopping:
                continue
            self.seq += 1
            ident = f"s{i}-{self.seq}"
            peer = (i + rng.choice([-1, 1]) * rng.randint(1, 10)) % n
            self.ledger.sent[ident] = f"u{peer}"
            client.send(f"<message xmlns='jabber:client' type='chat' to='u{peer}@localhost' id='{ident}'>"
                        f"<body>soak {ident}</body></message>")

    def churn(self) -> None:
        rng = random.Random(7)
        while not self.stopping:
            gevent.sleep(60)
            for i in rng.sample(range(self.args.sessions), max(1, self.args.sessions // 50)):
                gevent.spawn(self.bounce_session, i, rng.uniform(5, 20))

    def bounce_session(self, i: int, away: float) -> None:
        client = self.clients.pop(i, None)
        if client is None:
            return
        client.close()
        gevent.sleep(away)
        self.reconnect(i)

    def watchdog(self) -> None:
        """A session whose client saw an error (a request failed, the stream was closed) comes
        back, as Converse's auto_reconnect does: what was queued for it meanwhile went to
        offline storage (requeue) and must arrive at the new login."""
        while not self.stopping:
            gevent.sleep(5)
            for i, client in list(self.clients.items()):
                if client.closed and self.clients.get(i) is client:
                    del self.clients[i]
                    self.deaths[f"{client.kind}: {str(client.error)[:80]}"] += 1
                    gevent.spawn(self.reconnect, i)

    def reconnect(self, i: int) -> None:
        for _attempt in range(5):
            try:
                self.connect(i)
                return
            except (BenchError, OSError) as exc:
                print(f"  reconnect u{i}: {exc}", flush=True)
                gevent.sleep(2)

    def report_stalled(self) -> None:
        """BOSH clients without a response for longer than 'wait' + 10 s: their polling stopped."""
        now = time.monotonic()
        stalled = [(i, c) for i, c in self.clients.items()
                   if c.kind == "bosh" and not c.closed and now - c.last_response > 40]
        if stalled:
            i, c = stalled[0]
            print(f"  {len(stalled)} BOSH client(s) stalled, e.g. u{i}: {now - c.last_response:.0f}s without a "
                  f"response, in_flight {c.in_flight}, out {len(c.out)}, idle conns {len(c.idle_conns)}", flush=True)

    # -- the attacker --------------------------------------------------------------------
    def attack(self) -> None:
        held = []
        while not self.stopping:
            for name in ("idle", "slowloris", "ping_flood", "slow_reader", "poison", "bosh_abuse", "bosh_ping_body",
                         "ws_version", "wrong_passwords"):
                try:
                    getattr(self, f"attack_{name}")(held)
                    self.attacks[name] += 1
                except Exception as exc:  # noqa: BLE001 - an attack may be cut off by the server: that's fine
                    self.attacks[f"{name} cut off ({type(exc).__name__})"] += 1
            gevent.sleep(self.args.attack_every)
            for sock in held:
                try:
                    sock.close()
                except OSError:
                    pass
            held.clear()

    def _sock(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def attack_idle(self, held) -> None:
        for _ in range(500):
            held.append(self._sock())

    def attack_slowloris(self, held) -> None:
        socks = [self._sock() for _ in range(20)]
        held.extend(socks)

        def drip(sock):
            try:
                sock.sendall(b"POST /http-bind HTTP/1.1\r\nHost: x\r\n")
                for n in range(int(self.args.attack_every // 5)):
                    gevent.sleep(5)
                    sock.sendall(f"X-{n}: y\r\n".encode())
            except OSError:
                pass

        for sock in socks:
            gevent.spawn(drip, sock)

    def _ws_login(self, user):
        client = WsClient(("127.0.0.1", self.port))
        login(client, user, PASSWORD, self.scram, resource="attack", timeout=30)
        return client

    def attack_ping_flood(self, held) -> None:
        client = self._ws_login("flooder")
        ping = bytes((0x89, 0x80)) + b"\0\0\0\0"
        client.reader.kill(block=False)  # never read again
        try:
            for _ in range(100):
                client.sock.sendall(ping * 1000)
        except OSError:
            pass
        held.append(client.sock)

    def attack_slow_reader(self, held) -> None:
        victim = self._ws_login("victim")
        victim.reader.kill(block=False)  # logged in, never reads
        flooder = self._ws_login("flooder")
        flooder.handler = lambda c, t: None
        body = "x" * 2000
        for n in range(5000):
            flooder.send(f"<message xmlns='jabber:client' type='chat' to='victim@localhost' id='f{n}'>"
                         f"<body>{body}</body></message>")
            if n % 100 == 0:
                gevent.sleep(0)
        flooder.close()
        held.append(victim.sock)

    def attack_poison(self, held) -> None:
        client = self._ws_login("flooder")
        client.handler = lambda c, t: None
        deep = "<b>" * 1200 + "</b>" * 1200
        client.send(f"<presence xmlns='jabber:client'><xml:foo/></presence>")
        client.send(f"<message xmlns='jabber:client' to='u0@localhost' type='chat'><body>x</body>{deep}</message>")
        gevent.sleep(1)
        client.drop()

    def attack_bosh_abuse(self, held) -> None:
        conn = HttpConn(("127.0.0.1", self.port))
        conn.request(b"<body xmlns='http://jabber.org/protocol/httpbind' rid='\xc2\xb2' to='localhost'/>")
        body = conn.request(b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1000' to='localhost' wait='5' hold='1'/>")
        sid = re.search(rb'sid="([^"]+)"', body)
        if sid:
            big = b"<message xmlns='jabber:client' to='u1@localhost'><body>" + b"y" * 300000 + b"</body></message>"
            conn.request(b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1001' sid='" + sid.group(1) + b"'>"
                         + big + b"</body>")
        pings = b"".join(b"<iq xmlns='jabber:client' type='get' id='p%d'><ping xmlns='urn:xmpp:ping'/></iq>" % n
                         for n in range(10000))
        conn2 = HttpConn(("127.0.0.1", self.port))
        conn2.request(b"<body xmlns='http://jabber.org/protocol/httpbind' rid='5' sid='nope'>" + pings + b"</body>")
        conn.close(), conn2.close()

    def attack_bosh_ping_body(self, held) -> None:
        """10,000 pings in one body of a logged-in BOSH session: over the shaper's rate, so the
        request must be answered at once (not held while the stanzas are paced: it was ~90 s)."""
        client = BoshClient(("127.0.0.1", self.port), wait=30)
        login(client, "flooder", PASSWORD, self.scram, resource="pings", timeout=30, roster=False, presence=False)
        pings = "".join(f"<iq xmlns='jabber:client' type='get' id='p{n}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
                        for n in range(10000))
        t0 = time.monotonic()
        client._sync(pings)
        took = time.monotonic() - t0
        self.slowest_ping_body = max(getattr(self, "slowest_ping_body", 0.0), took)
        client.close()

    def attack_ws_version(self, held) -> None:
        sock = self._sock()
        sock.sendall(b"GET /xmpp-websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n"
                     b"Sec-WebSocket-Protocol: xmpp\r\n\r\n")
        sock.recv(4096)
        sock.close()

    def attack_wrong_passwords(self, held) -> None:
        for n in range(10):
            client = WsClient(("127.0.0.1", self.port))
            try:
                login(client, f"u{n}", "wrong", ScramCache(), resource="x", timeout=10)
            except BenchError:
                pass
            client.drop()

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        self.start()
        print(f"soak: {args.sessions} sessions for {args.minutes} min, server pid {self.server.pid}, "
              f"port {self.port}, work dir {self.work}", flush=True)
        pool = Pool(50)
        for i in range(args.sessions):
            pool.spawn(self.reconnect, i)
        pool.join()
        print(f"  {len(self.clients)} sessions online, server RSS {rss_kib(self.server.pid) / 1024:.0f} MiB", flush=True)
        workers = [gevent.spawn(self.chatter, i) for i in range(args.sessions)]
        workers += [gevent.spawn(self.churn), gevent.spawn(self.attack), gevent.spawn(self.watchdog)]
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < args.minutes * 60:
            gevent.sleep(min(30, args.minutes * 60))
            if self.server.poll() is not None:
                print("  THE SERVER DIED", flush=True)
                break
            rss = rss_kib(self.server.pid)
            samples.append(rss)
            self.report_stalled()
            print(f"  t={time.monotonic() - started:5.0f}s RSS {rss / 1024:6.1f} MiB  online {len(self.clients):5d}  "
                  f"sent {len(self.ledger.sent):7d}  received {sum(self.ledger.received.values()):7d}", flush=True)
        self.stopping = True
        gevent.killall(workers, block=False)
        for i in range(args.sessions):  # everyone back, so offline messages are delivered
            client = self.clients.get(i)
            if client is not None and client.closed:
                del self.clients[i]
                self.deaths[f"{client.kind}: {str(client.error)[:80]}"] += 1
            if i not in self.clients:
                pool.spawn(self.reconnect, i)
        pool.join()
        deadline = time.monotonic() + 60
        self.report_stalled()
        while time.monotonic() < deadline:
            missing = set(self.ledger.sent) - set(self.ledger.received) - self.ledger.bounced
            if not missing:
                break
            gevent.sleep(1)
        sent = len(self.ledger.sent)
        received = len(set(self.ledger.received) & set(self.ledger.sent))
        duplicates = sum(1 for count in self.ledger.received.values() if count > 1)
        bounced = len(self.ledger.bounced - set(self.ledger.received))
        lost = len(set(self.ledger.sent) - set(self.ledger.received) - self.ledger.bounced)
        with open(self.log_path, errors="replace") as fh:
            log = fh.read()
        errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
        lost_to = Counter(self.ledger.sent[i] for i in set(self.ledger.sent) - set(self.ledger.received)
                          - self.ledger.bounced)
        if lost_to:
            print(f"  lost messages by recipient ({len(lost_to)} recipients): {lost_to.most_common(8)}")
            for user, _n in lost_to.most_common(3):
                c = self.clients.get(int(user[1:]))
                if c is not None:
                    print(f"    {user}: {c.kind}, closed {c.closed}, error {c.error}, "
                          f"in_flight {getattr(c, 'in_flight', '-')}, "
                          f"last response {time.monotonic() - getattr(c, 'last_response', time.monotonic()):.0f}s ago")
        alive = self.server.poll() is None
        print(f"\nsoak summary: sessions {args.sessions}, minutes {args.minutes}, server alive: {alive}")
        print(f"  messages: sent {sent}, delivered {received}, bounced {bounced}, duplicates {duplicates}, lost {lost}")
        if samples:
            print(f"  server RSS: start {samples[0] / 1024:.1f} MiB, max {max(samples) / 1024:.1f} MiB, "
                  f"end {samples[-1] / 1024:.1f} MiB")
        print(f"  attacks: {dict(self.attacks)}")
        if hasattr(self, "slowest_ping_body"):
            print(f"  BOSH body of 10,000 pings answered in {self.slowest_ping_body:.1f} s at most")
        print(f"  sessions that died under their client (reconnected): {sum(self.deaths.values())} {dict(self.deaths)}")
        print(f"  errors in the server log: {len(errors)}")
        for line in errors[:10]:
            print("    " + line[:200])
        for client in self.clients.values():
            client.drop()
        self.stop()
        if not args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return 0 if alive and lost == 0 and duplicates == 0 and not errors else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--interval", type=float, default=20.0, help="mean seconds between a session's messages")
    parser.add_argument("--attack-every", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server log, data)")
    soak = Soak(parser.parse_args())
    try:
        return soak.run()
    finally:
        soak.stop()


if __name__ == "__main__":
    sys.exit(main())

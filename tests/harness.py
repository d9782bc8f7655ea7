"""Test harness: run the real server as a subprocess, talk to it like a client would.

``ServerProcess`` writes a config, gives the server its users (an accounts database
made once per test session by the real CLI's ``user import``, then copied), starts the
server (``boshroster serve``, forked by forkserver.py, or ``python -m boshroster serve``
with ``fork=False``) on a free loopback port and stops it by PID.
``BoshClient`` and ``WsClient`` are small but honest XMPP clients: raw BOSH
bodies over HTTP (with one request always parked, as real clients do) and
raw RFC 7395 messages over websocket-client.  Both parse what arrives into
ElementTree elements kept in an inbox that tests wait on.
"""

from __future__ import annotations

import atexit
import base64
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
import xml.etree.ElementTree as ET

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import requests
import scramp
import websocket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NS_CLIENT = "jabber:client"
NS_BOSH = "http://jabber.org/protocol/httpbind"
NS_STREAM = "http://etherx.jabber.org/streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
NS_ROSTER = "jabber:iq:roster"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def wait_for(predicate, timeout: float = 5.0, what: str = "condition", interval: float = 0.01):
    """Poll ``predicate`` until it returns something true (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        gevent.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


class PortTaken(Exception):
    pass


# -- starting servers cheaply -------------------------------------------------------------

class ForkServer:
    """Client of tests/forkserver.py: one process that has imported boshroster and forks a
    real server per request (saves an interpreter start and the imports, ~0.4 s CPU each).
    One request at a time (``_lock``): greenlets of the test process may start servers."""

    def __init__(self):
        self._lock = gevent.lock.Semaphore()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)

    def _ask(self, **request) -> dict:
        with self._lock:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"forkserver died (exit status {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"forkserver: {reply['error']}")
        return reply

    def cli(self, argv: list[str], log_path: str) -> "ForkedProcess":
        """``boshroster ARGV...`` (e.g. ``serve --config F``), output appended to ``log_path``."""
        return ForkedProcess(self, self._ask(op="cli", argv=list(argv), log=log_path)["pid"])

    def run_script(self, path: str, argv: list[str], stdout_path: str, stderr_path: str,
                   env: dict | None = None) -> "ForkedProcess":
        """``python path argv...`` (as ``__main__``), output appended to the two files."""
        return ForkedProcess(self, self._ask(op="script", path=path, argv=list(argv), env=env,
                                             stdout=stdout_path, stderr=stderr_path)["pid"])

    def close(self) -> None:
        """EOF tells the fork server to kill what still runs and exit."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - at exit, best effort
            self.proc.kill()


class ForkedProcess:
    """The part of ``subprocess.Popen`` the harness uses, for a child of the fork server."""

    def __init__(self, forkserver: ForkServer, pid: int):
        self.forkserver = forkserver
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.forkserver._ask(op="poll", pid=self.pid)["code"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            gevent.sleep(delay)
            delay = min(delay * 2, 0.02)
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_forkserver: ForkServer | None = None


def forkserver() -> ForkServer:
    global _forkserver
    if _forkserver is None or _forkserver.proc.poll() is not None:
        _forkserver = ForkServer()
        atexit.register(_forkserver.close)
    return _forkserver


FORK = os.environ.get("BOSHROSTER_TEST_NO_FORK", "") in ("", "0")


ACCOUNTS_FILE = "accounts.sqlite3"  # AccountStore's file in data_dir (boshroster/wiring.py)
_account_templates: dict[tuple, str] = {}
_template_root: str | None = None
_templates_lock = gevent.lock.Semaphore()


def _remove_templates() -> None:
    if _template_root is not None:
        shutil.rmtree(_template_root, ignore_errors=True)


def run_cli(argv: list[str], log_path: str) -> str:
    """``boshroster ARGV...`` to completion (forked, or ``python -m boshroster`` when
    BOSHROSTER_TEST_NO_FORK=1); its output, which ``log_path`` keeps. Fails unless it exits 0."""
    if FORK:
        code = forkserver().cli(argv, log_path).wait(timeout=120)
        with open(log_path) as fh:
            output = fh.read()
    else:
        result = subprocess.run([sys.executable, "-m", "boshroster", *argv],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        code, output = result.returncode, result.stderr + result.stdout
        with open(log_path, "w") as fh:
            fh.write(output)
    assert code == 0, f"boshroster {' '.join(argv)} exited {code}:\n{output}"
    return output


def accounts_template(users: tuple[str, ...], password: str, iterations: int) -> str:
    """Path of an accounts database holding ``users``, made by the real CLI once per session.

    Deriving SCRAM keys in a ``boshroster user import`` subprocess cost every server start
    about half a second; copying a file costs nothing.  The CLI (``boshroster user import``,
    forked like the servers unless BOSHROSTER_TEST_NO_FORK) runs once per set of users.
    """
    with _templates_lock:  # greenlets may start servers at once; the CLI run yields
        return _accounts_template(tuple(users), password, iterations)


def _accounts_template(users: tuple[str, ...], password: str, iterations: int) -> str:
    global _template_root
    key = (users, password, iterations)
    path = _account_templates.get(key)
    if path is None:
        if _template_root is None:
            _template_root = tempfile.mkdtemp(prefix="boshroster-accounts-")
            atexit.register(_remove_templates)
        workdir = os.path.join(_template_root, str(len(_account_templates)))
        os.makedirs(workdir)
        config_path = os.path.join(workdir, "boshroster.toml")
        with open(config_path, "w") as fh:
            fh.write(f"data_dir = {toml_value(workdir)}\nscram_iterations = {iterations}\n")
        users_file = os.path.join(workdir, "users.txt")
        with open(users_file, "w") as fh:
            fh.writelines(f"{u}:{password}\n" for u in users)
        run_cli(["user", "import", users_file, "--config", config_path], os.path.join(workdir, "import.log"))
        path = os.path.join(workdir, ACCOUNTS_FILE)
        for leftover in ("-wal", "-shm"):  # the CLI closed the database: WAL checkpointed
            assert not os.path.exists(path + leftover), path + leftover
        _account_templates[key] = path
    return path


class ServerProcess:
    """The real server in a subprocess, with its own data dir and port."""

    def __init__(self, workdir, users=("alice", "bob", "carol", "dave"), password="password", fork=None,
                 **settings):
        self.workdir = str(workdir)
        self.fork = FORK if fork is None else fork  # False: `python -m boshroster serve`, as deployed
        self.port = free_port()
        self.settings = {
            "domain": "localhost",
            "http_interfaces": ["127.0.0.1"],
            "http_ports": [self.port],
            "data_dir": os.path.join(self.workdir, "data"),
            "log_level": "debug",
            "scram_iterations": 4096,
        }
        self.settings.update(settings)
        self.config_path = os.path.join(self.workdir, "boshroster.toml")
        self._write_config()
        self.log_path = os.path.join(self.workdir, "server.log")
        self.proc = None
        if self.fork:
            forkserver()  # starts importing now, alongside the first accounts_template's CLI run
        if users and self.settings.get("database_url"):
            # The accounts live in that database, not in data_dir: import them through the CLI.
            users_file = os.path.join(self.workdir, "users.txt")
            with open(users_file, "w") as fh:
                fh.writelines(f"{u}:{password}\n" for u in users)
            run_cli(["user", "import", users_file, "--config", self.config_path],
                    os.path.join(self.workdir, "import.log"))
        elif users:
            template = accounts_template(tuple(users), password, self.settings["scram_iterations"])
            os.makedirs(self.settings["data_dir"], exist_ok=True)
            shutil.copyfile(template, os.path.join(self.settings["data_dir"], ACCOUNTS_FILE))

    def _write_config(self) -> None:
        with open(self.config_path, "w") as fh:
            for key, value in self.settings.items():
                fh.write(f"{key} = {toml_value(value)}\n")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bosh_url(self) -> str:
        return self.base_url + "/http-bind"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/xmpp-websocket"

    def cli(self, *args, input_text=None) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "boshroster", *args, "--config", self.config_path],
            input=input_text, capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        return result

    def start(self) -> "ServerProcess":
        for _attempt in range(3):
            try:
                return self._start_once()
            except PortTaken:
                # free_port() closed its probe socket: someone else may have taken the port since.
                self.port = free_port()
                self.settings["http_ports"] = [self.port]
                self._write_config()
        raise RuntimeError("no free port after 3 attempts")

    def _start_once(self) -> "ServerProcess":
        self.log_file = open(self.log_path, "a")
        if self.fork:
            self.proc = forkserver().cli(["serve", "--config", self.config_path], self.log_path)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "boshroster", "serve", "--config", self.config_path],
                stdout=self.log_file, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                self.log_file.close()
                if "Address already in use" in self.log():
                    raise PortTaken()
                raise RuntimeError(f"server exited:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:  # refused at once until the server listens: poll often
                gevent.sleep(0.01)
        raise RuntimeError("server did not start:\n" + self.log())

    def stop(self, sig=signal.SIGTERM, timeout=5) -> int | None:
        """Signal the server by PID; SIGKILL if it has not exited ``timeout`` seconds later.

        Server.stop takes ``grace`` (1 s) at most, so a SIGKILL here means a stop that hangs.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"server pid {self.proc.pid} ignored {signal.Signals(sig).name} for {timeout}s: SIGKILL",
                      file=sys.stderr)
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self.log_file.close()
        return code

    def log(self) -> str:
        try:
            with open(self.log_path) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


_live_clients: "weakref.WeakSet[XmppClient]" = weakref.WeakSet()


def stop_clients(port: int | None = None) -> None:
    """Stop every client not yet stopped (of the server on ``port``, if given), closing
    its keep-alive connections, so that no server waits on a connection left open."""
    for client in list(_live_clients):
        if port is None or f"127.0.0.1:{port}/" in client.url:
            try:
                client.stop()
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass


class XmppClient:
    """Transport-independent client logic; subclasses move the bytes."""

    domain = "localhost"
    url = ""

    def __init__(self):
        _live_clients.add(self)
        self.inbox: gevent.queue.Queue = gevent.queue.Queue()
        self.seen: list[ET.Element] = []
        self.features: ET.Element | None = None
        self.jid: str | None = None
        self.closed_reason = None
        self._ids = itertools.count(1)

    # transport hooks
    def send_xml(self, *xml: str) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # helpers
    def new_id(self) -> str:
        return f"t{next(self._ids)}"

    def recv(self, timeout: float = 5.0, match=None) -> ET.Element:
        """Next element (matching ``match``), skipping and keeping others in ``seen``."""
        deadline = time.monotonic() + timeout
        for index, el in enumerate(self.seen):
            if match is None or match(el):
                return self.seen.pop(index)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"nothing matching within {timeout}s; unmatched: {[ET.tostring(e)[:200] for e in self.seen]}")
            try:
                el = self.inbox.get(timeout=remaining)
            except gevent.queue.Empty:
                continue
            if match is None or match(el):
                return el
            self.seen.append(el)

    def expect_nothing(self, seconds: float, match=None) -> None:
        try:
            el = self.recv(seconds, match)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected element: {ET.tostring(el)[:500]}")

    def sync(self, timeout: float = 5.0) -> None:
        """Ping the server and wait for the result: everything the server queued for this
        client before answering is then in ``seen`` (a session's stanzas are processed, and
        leave, in order; RFC 6120 §10.1)."""
        iq_id = self.new_id()
        self.send_xml(f"<iq xmlns='{NS_CLIENT}' type='get' id='{iq_id}' to='{self.domain}'><ping xmlns='urn:xmpp:ping'/></iq>")
        reply = self.recv(timeout, lambda e: e.tag == q(NS_CLIENT, "iq") and e.get("id") == iq_id)
        assert reply.get("type") == "result", ET.tostring(reply)
        gevent.sleep(0)  # BOSH: a response read in the same loop turn as the ping's is delivered too

    def expect_nothing_queued(self, match, after=()) -> None:
        """``expect_nothing`` without a sleep, for what the server would produce while handling
        stanzas already sent: each client in ``after`` (senders whose stanzas must be handled
        first), then this one, round-trips a ping; nothing matching may have arrived before."""
        for sender in after:
            sender.sync()
        self.sync()
        unexpected = [el for el in self.seen if match(el)]
        assert not unexpected, f"unexpected element: {ET.tostring(unexpected[0])[:500]}"

    def wait_features(self, timeout=5.0) -> ET.Element:
        self.features = self.recv(timeout, lambda e: e.tag == q(NS_STREAM, "features"))
        return self.features

    def mechanisms(self) -> list[str]:
        mechs = self.features.find(q(NS_SASL, "mechanisms"))
        return [m.text for m in mechs] if mechs is not None else []

    def authenticate(self, username: str, password: str, mechanism: str = "SCRAM-SHA-1") -> ET.Element:
        """Run SASL; return the <success/> or <failure/> element."""
        sasl_el = lambda e: e.tag.startswith(f"{{{NS_SASL}}}")  # noqa: E731
        if mechanism == "PLAIN":
            payload = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
            self.send_xml(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{payload}</auth>")
            return self.recv(match=sasl_el)
        client = scramp.ScramClient([mechanism], username, password)
        first = base64.b64encode(client.get_client_first().encode()).decode()
        self.send_xml(f"<auth xmlns='{NS_SASL}' mechanism='{mechanism}'>{first}</auth>")
        reply = self.recv(match=sasl_el)
        if reply.tag != q(NS_SASL, "challenge"):
            return reply
        client.set_server_first(base64.b64decode(reply.text).decode())
        final = base64.b64encode(client.get_client_final().encode()).decode()
        self.send_xml(f"<response xmlns='{NS_SASL}'>{final}</response>")
        reply = self.recv(match=sasl_el)
        if reply.tag == q(NS_SASL, "success"):
            client.set_server_final(base64.b64decode(reply.text).decode())  # verifies the server
        return reply

    def bind(self, resource: str | None = None) -> str:
        iq_id = self.new_id()
        res = f"<resource>{resource}</resource>" if resource else ""
        self.send_xml(f"<iq xmlns='{NS_CLIENT}' type='set' id='{iq_id}'><bind xmlns='{NS_BIND}'>{res}</bind></iq>")
        reply = self.recv(match=lambda e: e.get("id") == iq_id)
        assert reply.get("type") == "result", ET.tostring(reply)
        self.jid = reply.find(f"{q(NS_BIND, 'bind')}/{q(NS_BIND, 'jid')}").text
        return self.jid

    def login(self, username: str, password: str = "password", mechanism: str = "SCRAM-SHA-1", resource: str | None = "test") -> str:
        self.wait_features()
        result = self.authenticate(username, password, mechanism)
        assert result.tag == q(NS_SASL, "success"), ET.tostring(result)
        self.restart()
        feats = self.wait_features()
        assert feats.find(q(NS_BIND, "bind")) is not None
        return self.bind(resource)

    def iq(self, xml_body: str, type_: str = "get", to: str | None = None, timeout: float = 5.0) -> ET.Element:
        iq_id = self.new_id()
        to_attr = f" to='{to}'" if to else ""
        self.send_xml(f"<iq xmlns='{NS_CLIENT}' type='{type_}' id='{iq_id}'{to_attr}>{xml_body}</iq>")
        return self.recv(timeout, lambda e: e.tag == q(NS_CLIENT, "iq") and e.get("id") == iq_id)

    def get_roster(self, timeout: float = 5.0) -> ET.Element:
        return self.iq(f"<query xmlns='{NS_ROSTER}'/>", timeout=timeout)

    def presence(self, inner: str = "", **attrs) -> None:
        attr = "".join(f" {k}='{v}'" for k, v in attrs.items())
        self.send_xml(f"<presence xmlns='{NS_CLIENT}'{attr}>{inner}</presence>")

    def message(self, to: str, body: str, type_: str = "chat") -> None:
        from xml.sax.saxutils import escape

        self.send_xml(f"<message xmlns='{NS_CLIENT}' to='{to}' type='{type_}' id='{self.new_id()}'><body>{escape(body)}</body></message>")

    def recv_message(self, timeout: float = 5.0, sender: str | None = None) -> ET.Element:
        return self.recv(timeout, lambda e: e.tag == q(NS_CLIENT, "message") and e.find(q(NS_CLIENT, "body")) is not None
                         and (sender is None or (e.get("from") or "").startswith(sender)))

    def recv_presence(self, timeout: float = 5.0, sender: str | None = None, type_: str | None = None) -> ET.Element:
        return self.recv(timeout, lambda e: e.tag == q(NS_CLIENT, "presence")
                         and (sender is None or (e.get("from") or "").startswith(sender))
                         and e.get("type") == type_)


class BoshClient(XmppClient):
    """XEP-0124/0206 client keeping one request parked, like Strophe."""

    def __init__(self, url: str, wait: int = 10, to: str = "localhost", start: bool = True, **extra_attrs):
        super().__init__()
        self.url = url
        self.http = requests.Session()
        self.rid = random.randint(1_000_000, 9_000_000)
        self.wait = wait
        self.sid = None
        self.outgoing: list[str] = []
        self.restart_pending = False
        self.terminated: ET.Element | None = None
        self._wake = gevent.event.Event()
        self._loop = None
        self._requests: set[gevent.Greenlet] = set()  # in flight, one parked
        if start:
            self.create(to, **extra_attrs)

    def post(self, body: str, timeout: float | None = None) -> ET.Element:
        """As Strophe does: a request a proxy could not complete (502/503/504 — in a cluster, the
        node relaying it to the session's owner was killed) is sent again with the same rid
        (XEP-0124 §14: the owner answers a repeated rid); any other failure is the caller's."""
        for attempt in range(3):
            reply = self.http.post(self.url, data=body.encode("utf-8"),
                                   headers={"Content-Type": "text/xml; charset=utf-8"}, timeout=timeout or self.wait + 10)
            if reply.status_code not in (502, 503, 504) or attempt == 2:
                break
            gevent.sleep(0.1 * (attempt + 1))
        assert reply.status_code == 200, reply.status_code
        return ET.fromstring(reply.content)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def create(self, to="localhost", **extra):
        attrs = {"to": to, "rid": str(self.next_rid()), "wait": str(self.wait), "hold": "1", "ver": "1.6",
                 "xml:lang": "en", "xmpp:version": "1.0", "xmlns:xmpp": "urn:xmpp:xbosh"}
        attrs.update(extra)
        attr = "".join(f" {k}='{v}'" for k, v in attrs.items())
        body = self.post(f"<body xmlns='{NS_BOSH}'{attr}/>")
        self.creation = body
        if body.get("type") == "terminate":
            self.terminated = body
            return body
        self.sid = body.get("sid")
        self._deliver(body)
        self._loop = gevent.spawn(self._run)
        return body

    def _deliver(self, body: ET.Element) -> None:
        for child in body:
            self.inbox.put(child)
        if body.get("type") == "terminate":
            self.terminated = body
            self.inbox.put(body)

    def _run(self) -> None:
        # Like Strophe: never more than 'requests' (2) requests outstanding, one parked.
        while self.terminated is None:
            if (self.outgoing or self.restart_pending) and self._in_flight < 2:
                payload, self.outgoing = "".join(self.outgoing), []
                extra = ""
                if self.restart_pending:
                    extra, payload, self.restart_pending = " xmpp:restart='true' xmlns:xmpp='urn:xmpp:xbosh' to='localhost'", "", False
                self._spawn(f"<body xmlns='{NS_BOSH}' rid='{self.next_rid()}' sid='{self.sid}'{extra}>{payload}</body>")
            elif self._in_flight == 0:
                self._spawn(f"<body xmlns='{NS_BOSH}' rid='{self.next_rid()}' sid='{self.sid}'/>")
            self._wake.clear()
            self._wake.wait(0.5)

    _in_flight = 0

    def _spawn(self, body: str) -> None:
        self._in_flight += 1
        glet = gevent.spawn(self._request, body)
        self._requests.add(glet)
        glet.link(self._requests.discard)

    RETRIES = 3  # as Strophe (maxRetries)

    def _post_retrying(self, body: str) -> ET.Element:
        """XEP-0124 §14.3: a request whose connection broke is resent with the same rid
        (``post`` already resends on a proxy's 502-504)."""
        for attempt in range(self.RETRIES + 1):
            try:
                return self.post(body)
            except requests.ConnectionError:
                if attempt == self.RETRIES:
                    raise
                gevent.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _request(self, body: str) -> None:
        try:
            reply = self._post_retrying(body)
        except Exception as exc:  # noqa: BLE001 - surfaced through closed_reason
            self.closed_reason = repr(exc)
            self.terminated = ET.Element("error")
            return
        finally:
            self._in_flight -= 1
            self._wake.set()
        self._deliver(reply)

    def send_xml(self, *xml: str) -> None:
        self.outgoing.extend(xml)
        self._wake.set()

    def restart(self) -> None:
        self.restart_pending = True
        self._wake.set()

    def close(self) -> None:
        if self.sid and self.terminated is None:
            body = self.post(f"<body xmlns='{NS_BOSH}' rid='{self.next_rid()}' sid='{self.sid}' type='terminate'>"
                             f"<presence xmlns='{NS_CLIENT}' type='unavailable'/></body>")
            self.terminated = body
        self.stop()

    def stop(self) -> None:
        """Stop polling without telling the server (a vanished client); close its connections."""
        if self.terminated is None:
            self.terminated = ET.Element("stopped")
        if self._loop is not None:
            self._loop.kill()
        gevent.killall(list(self._requests))
        self.http.close()
        _live_clients.discard(self)


READ_TIMEOUT = 120.0  # seconds a WebSocket test client's socket waits for the next frame


class WsClient(XmppClient):
    """RFC 7395 client over websocket-client."""

    def __init__(self, url: str, to: str = "localhost", open_stream: bool = True, subprotocols=("xmpp",), sockopt=()):
        super().__init__()
        self.url = url
        self.ws = websocket.create_connection(url, subprotocols=list(subprotocols), timeout=10, sockopt=sockopt)
        # Connecting is bounded by 10 s; reading only by the tests' own deadlines (recv): a
        # server busy for over 10 s on a loaded machine is not a closed socket.
        self.ws.settimeout(READ_TIMEOUT)
        self.close_status = None
        self.raw: list[str] = []
        self._reader = gevent.spawn(self._read)
        if open_stream:
            self.open(to)

    def open(self, to: str = "localhost") -> None:
        self.ws.send(f"<open xmlns='{NS_FRAMING}' to='{to}' version='1.0'/>")

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except Exception as exc:  # noqa: BLE001
                self.closed_reason = repr(exc)
                self.inbox.put(ET.Element("socket-closed"))
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close_status = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                self.inbox.put(ET.Element("socket-closed"))
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                text = data.decode("utf-8")
                self.raw.append(text)
                self.inbox.put(ET.fromstring(text))

    def send_xml(self, *xml: str) -> None:
        for item in xml:
            self.ws.send(item)

    def restart(self) -> None:
        self.open()

    def close(self) -> None:
        try:
            self.ws.send(f"<close xmlns='{NS_FRAMING}'/>")
            self.recv(3, lambda e: e.tag in (q(NS_FRAMING, "close"), "socket-closed"))
        except Exception:  # noqa: BLE001
            pass
        self.stop()

    def stop(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        self._reader.kill()
        _live_clients.discard(self)

    def drop(self) -> None:
        """Vanish without a close frame."""
        self.ws.sock.shutdown(socket.SHUT_RDWR)
        self.ws.sock.close()
        self._reader.kill()
        _live_clients.discard(self)




"""Black-box tests of scripts/demo_backend.py, the demo web app that owns the contact lists.

The backend runs as a real subprocess on a free port with a temporary copy of
conf/demo-contacts.json. Its refresh URL points at RefreshRecorder, a real HTTP
server in this process that stands in for boshroster's /roster_admin/refresh:
it records each POST, checks the Bearer token, and (like the real server) calls
the backend's /contacts/<user> back before it answers, which also proves the
backend keeps serving while it waits for the refresh reply.
"""

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import harness

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "demo_backend.py"
DEMO_CONTACTS = ROOT / "conf" / "demo-contacts.json"
SECRET = "s3cret-for-tests"


# -- helpers ----------------------------------------------------------------------------


def fetch(method, url, body=None, headers=None, timeout=10):
    """(status, parsed JSON or text) for one request; never raises on HTTP errors."""
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(req, timeout=timeout) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
    if "json" in ctype:
        return status, json.loads(raw)
    return status, raw.decode("utf-8", "replace")


def closed_port():
    """A loopback port that nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class RefreshRecorder:
    """A tiny HTTP server standing in for boshroster's refresh endpoint."""

    def __init__(self, secret=SECRET, delay=0.0):
        self.secret = secret
        self.delay = delay
        self.backend = None  # base URL, set once the backend is up
        self.requests = []
        self.got_request = threading.Event()
        self.release = threading.Event()  # ends a delay early
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                record = {"path": self.path, "headers": dict(self.headers), "body": body}
                recorder.requests.append(record)
                try:
                    if recorder.delay:
                        recorder.release.wait(recorder.delay)
                    if recorder.secret and self.headers.get("Authorization") != "Bearer " + recorder.secret:
                        return self.reply(401, {"status": "error", "message": "unauthorized"})
                    users = json.loads(body)
                    # What boshroster does for online users: fetch their contacts again.
                    record["fetched"] = {
                        u: fetch("GET", "%s/contacts/%s" % (recorder.backend, urllib.parse.quote(u)))[1]
                        for u in users
                    }
                    self.reply(200, {"status": "ok", "message": "roster update complete",
                                     "updated": len(users), "errors": 0})
                finally:
                    recorder.got_request.set()

            def reply(self, status, obj):
                raw = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/roster_admin/refresh" % self.server.server_address[1]
        # poll_interval: shutdown() waits for the loop to look (0.5 s by default)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def bodies(self):
        return [json.loads(r["body"]) for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Backend:
    """scripts/demo_backend.py as a child process; stopped by its PID.

    Forked by the harness's fork server (which has gevent, bottle and requests imported: no
    interpreter start per test), or started with subprocess when BOSHROSTER_TEST_NO_FORK=1.
    Its stdout and stderr go to files in a temporary folder of their own (tests list the
    contacts file's folder), removed by stop()."""

    def __init__(self, contacts, refresh_url, *extra, secret=None):
        env = dict(os.environ)
        env.pop("BOSHROSTER_REFRESH_SECRET", None)
        if secret is not None:
            env["BOSHROSTER_REFRESH_SECRET"] = secret  # exercise the env var, not the flag
        args = ["--host", "127.0.0.1", "--port", "0", "--contacts", str(contacts), "--refresh-url", refresh_url, *extra]
        self.output_dir = tempfile.mkdtemp(prefix="demo-backend-")
        self.stdout_path = os.path.join(self.output_dir, "stdout")
        self.stderr_path = os.path.join(self.output_dir, "stderr")
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            if harness.FORK:
                self.proc = harness.forkserver().run_script(str(SCRIPT), args, self.stdout_path, self.stderr_path, env=env)
            else:
                self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=out, stderr=err, env=env)
        line = self._first_line(timeout=20)
        if "listening on http://" not in line:
            self.stop()
            raise AssertionError("demo backend did not start: %r\n%s" % (line, self.stderr))
        self.url = line.split("listening on ")[1].split()[0].rstrip("/")

    def _first_line(self, timeout):
        """The first line the script prints (it flushes it once it listens), or "" if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.stdout_path) as fh:
                text = fh.read()
            if "\n" in text:
                return text.split("\n", 1)[0] + "\n"
            if self.proc.poll() is not None:
                return text
            time.sleep(0.01)
        return ""

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with open(self.stderr_path) as fh:
            self.stderr = fh.read()
        shutil.rmtree(self.output_dir, ignore_errors=True)
        return self.stderr

    def get(self, path):
        return fetch("GET", self.url + path)

    def call(self, method, path, body=None, **kw):
        return fetch(method, self.url + path, body, **kw)


@pytest.fixture
def contacts_file(tmp_path):
    path = tmp_path / "contacts.json"
    shutil.copy(DEMO_CONTACTS, path)
    return path


@pytest.fixture
def recorder():
    r = RefreshRecorder()
    yield r
    r.close()


@pytest.fixture
def backend(contacts_file, recorder):
    b = Backend(contacts_file, recorder.url, secret=SECRET)
    recorder.backend = b.url
    yield b
    b.stop()


def read_file(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -- the shipped demo data -----------------------------------------------------------------


def test_demo_contacts_file_is_complete_and_symmetric():
    data = read_file(DEMO_CONTACTS)
    users = ["alice", "bob", "carol", "dave"]
    assert sorted(data) == users
    for user in users:
        others = {"%s@localhost" % u for u in users if u != user}
        assert set(data[user]) == others
        for jid, item in data[user].items():
            assert isinstance(item["name"], str) and item["name"]
            assert isinstance(item["groups"], list) and item["groups"]
            # whoever has me has me in the same groups
            assert data[jid.split("@")[0]]["%s@localhost" % user]["groups"] == item["groups"]
    assert data["alice"]["bob@localhost"]["name"] == "Bob Builder"


def test_demo_users_file():
    lines = (ROOT / "conf" / "demo-users.txt").read_text().split()
    assert lines == ["alice:password", "bob:password", "carol:password", "dave:password"]


# -- the roster contract --------------------------------------------------------------------


def test_get_contacts_contract(backend):
    status, body = backend.get("/contacts/alice")
    assert status == 200
    assert body == read_file(DEMO_CONTACTS)["alice"]
    assert body["bob@localhost"] == {"name": "Bob Builder", "groups": ["Friends", "Work"]}


def test_unknown_user_gets_empty_object(backend):
    assert backend.get("/contacts/nobody") == (200, {})
    assert backend.get("/contacts/" + urllib.parse.quote("not valid@x")) == (200, {})


def test_admin_page_and_list(backend):
    status, page = backend.get("/")
    assert status == 200 and "<form" in page and "/api/contacts" in page
    status, everything = backend.get("/api/contacts")
    assert status == 200 and everything == read_file(DEMO_CONTACTS)


# -- changes: file rewritten, refresh POSTed -----------------------------------------------


def test_add_contact_saves_and_refreshes(backend, recorder, contacts_file):
    status, reply = backend.call("POST", "/api/contacts/alice/eve@localhost",
                                 {"name": "Eve Dropper", "groups": ["Spies", "Friends"]})
    assert status == 200, reply
    assert reply["status"] == "saved"
    assert reply["affected"] == ["alice"]
    assert reply["contacts"]["eve@localhost"] == {"name": "Eve Dropper", "groups": ["Spies", "Friends"]}
    assert reply["refresh"]["ok"] is True
    assert reply["refresh"]["response"] == {"status": "ok", "message": "roster update complete",
                                            "updated": 1, "errors": 0}

    # the file on disk is rewritten (and stays valid JSON; no temp files left over)
    on_disk = read_file(contacts_file)
    assert on_disk["alice"]["eve@localhost"]["name"] == "Eve Dropper"
    assert "eve" not in on_disk  # not mutual: eve's side untouched
    assert sorted(os.listdir(contacts_file.parent)) == ["contacts.json"]

    # one refresh POST with the right usernames and the Bearer token
    assert len(recorder.requests) == 1
    req = recorder.requests[0]
    assert req["path"] == "/roster_admin/refresh"
    assert json.loads(req["body"]) == ["alice"]
    assert req["headers"]["Authorization"] == "Bearer " + SECRET
    assert req["headers"]["Content-Type"] == "application/json"
    # the backend answered the callback while waiting for the refresh, with the new data
    assert req["fetched"]["alice"]["eve@localhost"]["groups"] == ["Spies", "Friends"]

    assert backend.get("/contacts/alice")[1]["eve@localhost"]["name"] == "Eve Dropper"


def test_update_existing_contact(backend, recorder, contacts_file):
    status, reply = backend.call("POST", "/api/contacts/bob/carol@localhost", {"name": "Carol S.", "groups": []})
    assert status == 200 and reply["refresh"]["ok"]
    assert read_file(contacts_file)["bob"]["carol@localhost"] == {"name": "Carol S.", "groups": []}
    assert recorder.bodies() == [["bob"]]


def test_mutual_add_and_remove(backend, recorder, contacts_file):
    status, reply = backend.call("POST", "/api/contacts/alice/eve@localhost",
                                 {"name": "Eve", "groups": ["Spies"], "mutual": True})
    assert status == 200 and reply["affected"] == ["alice", "eve"]
    data = read_file(contacts_file)
    assert data["eve"]["alice@localhost"] == {"name": "Alice Liddell", "groups": ["Spies"]}
    assert recorder.bodies()[-1] == ["alice", "eve"]

    status, reply = backend.call("DELETE", "/api/contacts/bob/dave@localhost?mutual=1")
    assert status == 200 and reply["affected"] == ["bob", "dave"]
    data = read_file(contacts_file)
    assert "dave@localhost" not in data["bob"] and "bob@localhost" not in data["dave"]
    assert recorder.bodies()[-1] == ["bob", "dave"]


def test_delete_is_one_sided_unless_asked(backend, recorder, contacts_file):
    status, reply = backend.call("DELETE", "/api/contacts/carol/alice@localhost")
    assert status == 200 and reply["affected"] == ["carol"]
    data = read_file(contacts_file)
    assert "alice@localhost" not in data["carol"]
    assert "carol@localhost" in data["alice"]
    assert recorder.bodies() == [["carol"]]

    # deleting it again: 404, nothing saved, no refresh
    status, reply = backend.call("DELETE", "/api/contacts/carol/alice@localhost")
    assert status == 404 and "no contact" in reply["error"]
    assert recorder.bodies() == [["carol"]]


def test_put_replaces_the_whole_object(backend, recorder, contacts_file):
    new = {"bob@localhost": {"name": "Bobby", "groups": ["Only"]},
           "zoe@example.org": {"name": "Zoe", "groups": {"Remote": True}}}
    status, reply = backend.call("PUT", "/api/contacts/dave", new)
    assert status == 200, reply
    assert reply["affected"] == ["dave"]
    expected = {"bob@localhost": {"name": "Bobby", "groups": ["Only"]},
                "zoe@example.org": {"name": "Zoe", "groups": ["Remote"]}}  # groups written as arrays
    assert read_file(contacts_file)["dave"] == expected
    assert backend.get("/contacts/dave") == (200, expected)
    assert recorder.bodies() == [["dave"]]


def test_put_mutual_updates_both_sides(backend, recorder, contacts_file):
    status, reply = backend.call("PUT", "/api/contacts/dave?mutual=1",
                                 {"alice@localhost": {"name": "Alice", "groups": ["Work"]}})
    assert status == 200, reply
    assert reply["affected"] == ["dave", "bob", "carol"]  # alice was kept, so she is unaffected
    data = read_file(contacts_file)
    assert "dave@localhost" not in data["bob"] and "dave@localhost" not in data["carol"]
    assert "dave@localhost" in data["alice"]
    assert recorder.bodies() == [["dave", "bob", "carol"]]


def test_new_user_appears(backend, recorder):
    status, reply = backend.call("POST", "/api/contacts/erin/alice@localhost", {"name": "Alice", "groups": ["A"]})
    assert status == 200 and reply["affected"] == ["erin"]
    assert backend.get("/contacts/erin") == (200, {"alice@localhost": {"name": "Alice", "groups": ["A"]}})


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/api/contacts/alice/not-a-jid", {"name": "x"}),
    ("POST", "/api/contacts/alice/bob@localhost", {"groups": "ok", "name": 5}),
    ("POST", "/api/contacts/alice/bob@localhost", {"groups": [1, 2]}),
    ("PUT", "/api/contacts/alice", ["bob@localhost"]),
    ("PUT", "/api/contacts/alice", b"{not json"),
])
def test_bad_requests_change_nothing(backend, recorder, contacts_file, method, path, body):
    before = contacts_file.read_bytes()
    status, reply = backend.call(method, path, body)
    assert status == 400 and reply["status"] == "error" and reply["error"]
    assert contacts_file.read_bytes() == before
    assert recorder.requests == []


def test_plain_form_posts_are_refused(backend, recorder, contacts_file):
    before = contacts_file.read_bytes()
    status, reply = backend.call("POST", "/api/contacts/alice/eve@localhost", b"name=Eve",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "application/json" in reply["error"]
    assert contacts_file.read_bytes() == before


# -- refresh failures: reported, never fatal --------------------------------------------------


def test_refresh_target_down(contacts_file):
    b = Backend(contacts_file, "http://127.0.0.1:%d/roster_admin/refresh" % closed_port(),
                "--refresh-timeout", "2")
    try:
        t0 = time.monotonic()
        status, reply = b.call("POST", "/api/contacts/alice/eve@localhost", {"name": "Eve", "groups": []})
        assert time.monotonic() - t0 < 10
        assert status == 200 and reply["status"] == "saved"
        assert reply["refresh"]["ok"] is False
        err = reply["refresh"]["error"]
        assert "could not connect" in err and "refused" in err.lower() and "saved" in err
        assert read_file(contacts_file)["alice"]["eve@localhost"]["name"] == "Eve"
        # still alive and serving
        assert b.get("/contacts/alice")[1]["eve@localhost"]["name"] == "Eve"
        assert b.proc.poll() is None
    finally:
        stderr = b.stop()
    assert "Traceback" not in stderr


def test_refresh_target_too_slow(contacts_file):
    slow = RefreshRecorder(delay=1.5)
    b = Backend(contacts_file, slow.url, "--refresh-timeout", "0.5", "--refresh-secret", SECRET)
    slow.backend = b.url
    try:
        t0 = time.monotonic()
        status, reply = b.call("DELETE", "/api/contacts/alice/bob@localhost")
        assert time.monotonic() - t0 < 2.5
        assert status == 200 and reply["refresh"]["ok"] is False
        assert "did not answer within 0.5s" in reply["refresh"]["error"]
        assert "bob@localhost" not in read_file(contacts_file)["alice"]
        slow.release.set()  # the backend gave up long ago: no need to sit out the delay
        assert slow.got_request.wait(5)
        assert slow.requests[0]["headers"]["Authorization"] == "Bearer " + SECRET  # the flag works too
    finally:
        b.stop()
        slow.close()


def test_refresh_rejected_secret(contacts_file, recorder):
    b = Backend(contacts_file, recorder.url, secret="wrong")
    recorder.backend = b.url
    try:
        status, reply = b.call("POST", "/api/contacts/bob/eve@localhost", {"name": "Eve"})
        assert status == 200 and reply["status"] == "saved"
        assert reply["refresh"]["ok"] is False and reply["refresh"]["http_status"] == 401
        assert "401" in reply["refresh"]["error"] and "secret" in reply["refresh"]["error"]
        assert recorder.requests[0]["headers"]["Authorization"] == "Bearer wrong"
    finally:
        b.stop()


def test_no_secret_sends_no_authorization(contacts_file):
    rec = RefreshRecorder(secret=None)
    b = Backend(contacts_file, rec.url)
    rec.backend = b.url
    try:
        status, reply = b.call("POST", "/api/contacts/bob/eve@localhost", {"name": "Eve"})
        assert status == 200 and reply["refresh"]["ok"] is True
        assert "Authorization" not in rec.requests[0]["headers"]
    finally:
        b.stop()
        rec.close()


def test_stops_cleanly_on_sigterm(contacts_file, recorder):
    b = Backend(contacts_file, recorder.url)
    stderr = b.stop()
    assert b.proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in stderr

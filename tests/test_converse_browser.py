"""Converse.js in a real headless Chromium against the real server (issue 4, point 4).

The demo page (static/index.html) is served by a plain static file server on another
port, so the page's origin differs from the XMPP endpoint's and the browser applies
CORS to every BOSH request (the server is configured with that one allowed origin).
tests/js/converse_e2e.js drives the page with playwright-core and Debian's
/usr/bin/chromium; this test plays bob with a raw harness client and the web app with
the test backend. Screenshots go to test-artifacts/converse-<transport>-*.png.

Skips on a developer machine without node, playwright-core, chromium or the vendored
Converse files; fails in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from harness import NS_CLIENT, WsClient, free_port, q
from realclients import ROOT, artifacts_dir, require, require_node, run_node_script

pytestmark = pytest.mark.interop  # real third-party clients/proxies: -m 'not interop' skips them

STATIC = os.path.join(ROOT, "static")
STEPS = ("page_loads", "login_form", "roster_names_and_group", "receive_message", "send_message",
         "roster_refresh", "cross_origin")


def chromium_path() -> str | None:
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture
def static_origin():
    """static/ served by `python -m http.server` on its own port: a second origin."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", STATIC],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "static file server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("transport", ["bosh", "websocket"])
def test_converse_in_chromium(make_server, backend, static_origin, transport, tmp_path):
    require_node("playwright-core")
    chromium = chromium_path()
    require(chromium is not None, "chromium is not installed (apt-get install chromium)")
    require(os.path.isfile(os.path.join(STATIC, "vendor", "converse", "converse.min.js")),
            "static/vendor/converse/ is missing (run scripts/fetch_web_assets)")
    server = make_server(cors_allowed_origins=[static_origin])
    bob: dict[str, WsClient] = {}

    def bob_login(msg):
        client = WsClient(server.ws_url)
        bob["client"] = client
        jid = client.login("bob", resource="raw")
        client.get_roster()
        client.presence()
        return {"jid": jid}

    def bob_send(msg):
        bob["client"].message("alice@localhost", msg["text"])
        return {}

    def bob_expect(msg):
        el = bob["client"].recv_message(timeout=15, sender="alice@localhost")
        body = el.find(q(NS_CLIENT, "body")).text
        return {"ok": body == msg["text"], "body": body, "from": el.get("from")}

    page = f"{static_origin}/?server={server.base_url}&transport={transport}"
    try:
        result = run_node_script(
            "converse_e2e.js",
            ["--page", page, "--transport", transport, "--artifacts", artifacts_dir(), "--chromium", chromium],
            server=server, backend=backend, timeout=150,
            stderr_path=str(tmp_path / "converse-stderr.log"),
            handlers={"bob_login": bob_login, "bob_send": bob_send, "bob_expect": bob_expect},
        )
    finally:
        if "client" in bob:
            bob["client"].stop()

    summary = "\n".join(json.dumps(result.results.get(s, {"scenario": s, "missing": True}), ensure_ascii=False)[:1500]
                        for s in STEPS)
    with open(os.path.join(artifacts_dir(), f"converse-{transport}-steps.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in result.lines)
    failed = [s for s in STEPS if not result.results.get(s, {}).get("ok")]
    assert not failed, (f"Converse over {transport}: failed steps {failed}\n{summary}\n--- node stderr ---\n"
                        f"{result.stderr_tail(40)}\n--- server log ---\n{''.join(server.log().splitlines(True)[-40:])}")
    for name in ("1-roster", "2-chat", "3-refreshed"):
        assert os.path.getsize(os.path.join(artifacts_dir(), f"converse-{transport}-{name}.png")) > 5000

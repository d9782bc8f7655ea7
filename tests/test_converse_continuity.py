"""Continuity in the browser (issue 11): Converse.js in headless Chromium, in the demo's single
sign-on mode, reloads the page mid-conversation (tests/js/converse_reload_e2e.js).

Over WebSocket the reloaded page resumes the XEP-0198 session (Converse keeps the SM id and
counters in sessionStorage) and bob, played here by a raw client, never sees alice go
unavailable; the conversation is shown again, each message once, and Converse asked the
archive (XEP-0313); a second browser profile with nothing cached gets the history from the
archive alone.  Over BOSH, Converse's ``keepalive`` restores the BOSH session from
sessionStorage.  The server, the demo app and Chromium are real; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from harness import NS_CLIENT, WsClient, q
from realclients import artifacts_dir, require, require_node, run_node_script
from test_converse_browser import chromium_path
from test_sm_clients import wait_for_log
from test_sso_demo import STATIC, secret_file, sso  # noqa: F401  (fixtures)

STEPS = ("chat_before_reload", "reload_keeps_the_session", "conversation_shown_after_reload",
         "second_device_gets_the_history")


class Bob:
    """bob, online over WebSocket for the whole test; what he got stays in ``client.raw``."""

    def __init__(self, server):
        self.server = server
        self.client = None

    def login(self, _msg):
        client = WsClient(self.server.ws_url)
        client.wait_features()
        client.authenticate("bob", "password")
        client.restart()
        client.wait_features()
        client.bind("phone")
        client.get_roster()
        client.presence()
        self.client = client
        return {"jid": "bob@localhost/phone"}

    def send(self, msg):
        self.client.message("alice@localhost", msg["text"])
        return {}

    def expect(self, msg):
        while True:
            el = self.client.recv_message(timeout=20, sender=None)
            if el.findtext(q(NS_CLIENT, "body")) == msg["text"]:
                return {"from": el.get("from")}

    def seen(self, _msg):
        import xml.etree.ElementTree as ET

        presences = [ET.fromstring(raw) for raw in self.client.raw if raw.startswith("<presence")]
        alice = [p for p in presences if (p.get("from") or "").startswith("alice@localhost")]
        return {"unavailable": [ET.tostring(p, encoding="unicode") for p in alice if p.get("type") == "unavailable"],
                "available": sum(1 for p in alice if p.get("type") is None)}

    def stop(self):
        if self.client is not None:
            self.client.close()


@pytest.mark.interop
@pytest.mark.parametrize("transport", ["websocket", "bosh"])
def test_converse_reload_keeps_the_conversation_and_the_session(sso, transport, tmp_path):  # noqa: F811
    require_node("playwright-core")
    chromium = chromium_path()
    require(chromium is not None, "chromium is not installed (apt-get install chromium)")
    require(os.path.isfile(os.path.join(STATIC, "vendor", "converse", "converse.min.js")),
            "static/vendor/converse/ is missing (run scripts/fetch_web_assets)")
    server, app = sso(lifetime=300, bosh_max_wait=5, bosh_max_inactivity=20, smacks_hibernation_time=30)
    bob = Bob(server)
    try:
        result = run_node_script(
            "converse_reload_e2e.js",
            ["--app", app.url, "--transport", transport, "--artifacts", artifacts_dir(), "--chromium", chromium],
            server=server, backend=None, timeout=300, stderr_path=str(tmp_path / "reload-stderr.log"),
            handlers={"bob_login": bob.login, "bob_send": bob.send, "bob_expect": bob.expect, "bob_seen": bob.seen,
                      "log": lambda msg: wait_for_log(server, msg)},
        )
    finally:
        bob.stop()
        with open(os.path.join(artifacts_dir(), f"reload-{transport}-server.log"), "w") as fh:
            fh.write(server.log())
    with open(os.path.join(artifacts_dir(), f"reload-{transport}-steps.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in result.lines)
    summary = "\n".join(json.dumps(result.results.get(s, {"scenario": s, "missing": True}), ensure_ascii=False)[:2000]
                        for s in STEPS)
    failed = [s for s in STEPS if not result.results.get(s, {}).get("ok")]
    assert not failed, (f"Converse reload over {transport}: failed steps {failed}\n{summary}\n--- node stderr ---\n"
                        f"{result.stderr_tail(40)}\n--- server log ---\n{''.join(server.log().splitlines(True)[-50:])}")
    log = server.log()
    # The reload kept alice's session: besides the first page, only the second device binds,
    # and no session of alice ended before that (the browser closing at the end may end some).
    assert log.count("bound alice@localhost/") == 2, log[-4000:]
    second_device = log.index("bound alice@localhost/", log.index("bound alice@localhost/") + 1)
    assert "session end alice" not in log[:second_device], log[:second_device][-4000:]
    if transport == "websocket":
        # the reloaded page authenticates again (a fresh token) and resumes instead of binding
        assert log.count("login alice from 127.0.0.1 (websocket)") == 3, log[-4000:]
        assert len(re.findall(r"alice@localhost/converse\.js-\d+ hibernating", log)) >= 1
        assert len(re.findall(r"alice@localhost/converse\.js-\d+ resumed \(\d+ stanzas retransmitted\)", log)) == 1
    else:
        # keepalive: the reloaded page goes on with the same sid; no new BOSH session, no login
        assert log.count("BOSH session created") == 2, log[-4000:]
        assert log.count("login alice from 127.0.0.1 (bosh)") == 2, log[-4000:]

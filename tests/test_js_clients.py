"""Real JavaScript XMPP clients against the real server (issue 4, point 4).

Strophe.js 5 and StanzaJS 12 over BOSH and over WebSocket, and xmpp.js
(@xmpp/client 0.14) over WebSocket, each run by Node from tests/js/ against
``python -m boshroster serve`` with the demo roster backend. Each client x transport runs the scenario script
once (one server and one backend per run); every scenario is its own test here,
so the report is the matrix client x transport x scenario.

The server also has ``jwt_key`` (an HS256 secret): the ``token_*`` scenarios ask
this test for a token (``{"request": "token", "kind": ...}``) and log in with it
as the SASL PLAIN password (issue 13).  ``JS_SCENARIOS=token_login,token_refused``
runs only those scenarios in each script (for working on them; the completeness
test then checks that subset).

Without node or node_modules this skips on a developer machine and fails in CI.
"""

from __future__ import annotations

import os
import secrets
import time

import gevent.pool
import jwt
import pytest

from backend_app import TestBackend
from conftest import demo_contacts
from harness import ServerProcess
from realclients import require_node, run_node_script

pytestmark = pytest.mark.interop  # real third-party clients/proxies: -m 'not interop' skips them

RUNS = {
    # (client, transport): (script, npm packages it needs)
    ("strophe", "bosh"): ("strophe_scenarios.js", ("strophe.js", "xhr2", "@xmldom/xmldom", "ws")),
    ("strophe", "websocket"): ("strophe_scenarios.js", ("strophe.js", "@xmldom/xmldom", "ws")),
    ("xmppjs", "websocket"): ("xmppjs_scenarios.js", ("@xmpp/client", "ws")),
    ("stanza", "bosh"): ("stanza_scenarios.js", ("stanza",)),
    ("stanza", "websocket"): ("stanza_scenarios.js", ("stanza",)),
}
SCENARIOS = ("login", "wrong_password", "roster", "presence", "messages",
             "logout_unavailable", "drop_unavailable", "token_login", "token_refused", "refresh_push")
ONLY = tuple(name for name in os.environ.get("JS_SCENARIOS", "").split(",") if name)
RUN_SCENARIOS = ONLY or SCENARIOS
JWT_SECRET = secrets.token_urlsafe(48)
MINTED: list[str] = []  # every token handed out, to check none reaches the server log


def mint_token(msg) -> dict:
    """Answer a script's token request: a JWT as the app would mint it, or a bad one."""
    now = int(time.time())
    claims = {"jid": f"{msg['user']}@localhost", "iat": now, "exp": now + 300}
    kind = msg.get("kind", "valid")
    if kind == "expired":
        claims.update(iat=now - 900, exp=now - 600)
    elif kind == "other_user":
        claims["jid"] = "alice@localhost"
    if kind == "alg_none":
        token = jwt.encode(claims, None, algorithm="none")
    else:
        token = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    MINTED.append(token)
    return {"token": token}

# BOSH: a vanished client is noticed when its held request times out (wait) and no
# new one comes within the inactivity period; a WebSocket client that enabled
# resumable stream management (xmpp.js does) hibernates first (XEP-0198): keep all
# of them short so the drop test is quick.
SERVER_SETTINGS = {"bosh_max_wait": 2, "bosh_max_inactivity": 2, "smacks_hibernation_time": 3}


PARALLEL_RUNS = 3  # Node runs at once: each has its own server and backend; more would only fight for 2 cores


@pytest.fixture(scope="module")
def js_run(tmp_path_factory, request):
    """js_run(client, transport) -> the NodeRun of that pair's scenario script, run once.

    Every pair selected in this session starts at the first call, PARALLEL_RUNS at a
    time (their scripts mostly wait on timers and sockets), instead of one after another."""

    def run_once(key):
        client, transport = key
        script, packages = RUNS[key]
        try:
            require_node(*packages)
        except pytest.skip.Exception as skip:  # raised again in the test that asks for this run
            return skip
        workdir = tmp_path_factory.mktemp(f"{client}-{transport}")
        backend = TestBackend(demo_contacts()).start()
        server = None
        try:
            key_file = workdir / "jwt.secret"  # not `key`: that is this run's cache key
            key_file.write_text(JWT_SECRET)
            server = ServerProcess(workdir, http_roster_url=backend.url_template, jwt_key=str(key_file),
                                   fork=False,  # python -m boshroster serve
                                   **SERVER_SETTINGS).start()
            url = server.bosh_url if transport == "bosh" else server.ws_url
            args = ["--transport", transport, f"--{transport}", url, "--bosh-wait", "2", "--drop-timeout", "15000"]
            if ONLY:
                args += ["--only", ",".join(ONLY)]
            result = run_node_script(script, args, server=server, backend=backend,
                                     stderr_path=str(workdir / "node-stderr.log"),
                                     handlers={"token": mint_token})
            result.server_log = server.log()
        finally:
            if server is not None:
                server.stop()
            backend.stop()
        return result

    selected = [key for key in RUNS if any(
        item.module is request.module and getattr(item, "callspec", None) is not None
        and (item.callspec.params.get("client"), item.callspec.params.get("transport")) == key
        for item in request.session.items)]
    pool = gevent.pool.Pool(PARALLEL_RUNS)
    jobs = {key: pool.spawn(run_once, key) for key in selected}

    def run(client, transport):
        key = (client, transport)
        if key not in jobs:
            jobs[key] = pool.spawn(run_once, key)
        result = jobs[key].get()
        if isinstance(result, BaseException):
            raise result
        return result

    yield run
    pool.kill()


@pytest.mark.parametrize("scenario", RUN_SCENARIOS)
@pytest.mark.parametrize("client,transport", list(RUNS))
def test_real_client(js_run, client, transport, scenario):
    result = js_run(client, transport)
    line = result.results.get(scenario)
    context = (f"\n--- node stderr (tail) ---\n{result.stderr_tail()}"
               f"\n--- server log (tail) ---\n{''.join(result.server_log.splitlines(True)[-40:])}")
    assert line is not None, (f"{client}/{transport}: no result line for {scenario} "
                              f"(exit code {result.returncode}, after {result.seconds:.1f}s){context}")
    assert line["ok"], f"{client}/{transport}/{scenario} failed: {line.get('error')}{context}"


@pytest.mark.parametrize("client,transport", list(RUNS))
def test_every_scenario_ran_and_the_script_exited_cleanly(js_run, client, transport):
    result = js_run(client, transport)
    assert result.done is not None, f"no final line (exit code {result.returncode})\n{result.stderr_tail()}"
    assert set(result.results) == set(RUN_SCENARIOS), sorted(result.results)
    assert result.returncode == (1 if result.done["failed"] else 0), result.returncode


def test_scenario_list_matches_the_script():
    """Keep SCENARIOS in step with tests/js/scenarios.js."""
    with open(os.path.join(os.path.dirname(__file__), "js", "scenarios.js"), encoding="utf-8") as fh:
        source = fh.read()
    for name in SCENARIOS:
        assert f"runner.run('{name}'" in source, name


@pytest.mark.parametrize("client,transport", list(RUNS))
def test_refused_tokens_are_logged_with_their_reason_never_the_token(js_run, client, transport):
    if "token_refused" not in RUN_SCENARIOS:
        pytest.skip("token_refused not run")
    log = js_run(client, transport).server_log
    for reason in ("expired (exp is past)", "the 'jid' claim names another user", "algorithm 'none' not allowed"):
        assert f"token login refused for 'dave': {reason}" in log, reason
    for token in MINTED:
        assert token.split(".")[-1] not in log or not token.split(".")[-1]
        assert token.split(".")[1] not in log

"""Continuity with real clients (issue 11): StanzaJS 12 and Strophe.js 5 over WebSocket,
cut mid-conversation (tests/js/continuity.js: a TCP proxy on the client's side of the
connection is cut or black-holed), resume with XEP-0198; an outage longer than the
hibernation ends in a fresh session fed from offline storage; MAM paging of 120 messages
with max=50 through StanzaJS's searchHistory.

One server per client run (hibernation 8 s: long enough for StanzaJS's first reconnection
after 2-3 s, short enough for the expiry scenario), every scenario its own test here.  The
scripts ask this test to wait for server log lines (``{"request": "log"}``): that is how
they know the server noticed a cut before they send into the hibernating session.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from backend_app import TestBackend
from conftest import demo_contacts
from harness import ServerProcess
from realclients import artifacts_dir, require_node, run_node_script

pytestmark = pytest.mark.interop

RUNS = {
    "stanza": ("stanza_continuity.js", ("stanza",)),
    "strophe": ("strophe_continuity.js", ("strophe.js", "@xmldom/xmldom", "ws")),
}
SCENARIOS = ("cut_resume", "silent_resume", "resume_twice", "expired_then_offline", "logout_no_duplicates",
             "mam_paging_120")
ONLY = tuple(name for name in os.environ.get("JS_SCENARIOS", "").split(",") if name)  # as in test_js_clients
RUN_SCENARIOS = ONLY or SCENARIOS
SERVER_SETTINGS = {"smacks_hibernation_time": 8, "bosh_max_wait": 5}


def wait_for_log(server, msg, timeout: float = 30) -> dict:
    """Answer a script's log request: the first line after ``after`` containing ``pattern``."""
    pattern, after = msg["pattern"], int(msg.get("after", 0))
    deadline = time.monotonic() + float(msg.get("timeout", timeout))
    while True:
        lines = server.log().splitlines()
        if not pattern:
            return {"lines": len(lines)}
        for n, line in enumerate(lines[after:], start=after + 1):
            if pattern in line:
                return {"line": line, "lines": n}
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server log line with {pattern!r} after line {after}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def continuity_run(tmp_path_factory):
    cache = {}

    def run(client):
        if client not in cache:
            script, packages = RUNS[client]
            require_node(*packages)
            workdir = tmp_path_factory.mktemp(f"continuity-{client}")
            backend = TestBackend(demo_contacts()).start()
            server = None
            try:
                server = ServerProcess(workdir, http_roster_url=backend.url_template, **SERVER_SETTINGS).start()
                args = ["--transport", "websocket", "--websocket", server.ws_url]
                if ONLY:
                    args += ["--only", ",".join(ONLY)]
                result = run_node_script(script, args,
                                         server=server, backend=backend, timeout=400,
                                         stderr_path=str(workdir / "node-stderr.log"),
                                         handlers={"log": lambda msg: wait_for_log(server, msg)})
                result.server_log = server.log()
            finally:
                if server is not None:
                    # Kept for a look after a failure: the pytest tmp dirs do not last.
                    with open(os.path.join(artifacts_dir(), f"continuity-{client}-server.log"), "w") as fh:
                        fh.write(server.log())
                    if os.path.exists(workdir / "node-stderr.log"):
                        shutil.copy(workdir / "node-stderr.log", os.path.join(artifacts_dir(), f"continuity-{client}-node.log"))
                    server.stop()
                backend.stop()
            cache[client] = result
        return cache[client]

    return run


def _context(result) -> str:
    return (f"\n--- node stderr (tail) ---\n{result.stderr_tail(80)}"
            f"\n--- server log (tail) ---\n{''.join(result.server_log.splitlines(True)[-60:])}")


@pytest.mark.parametrize("scenario", RUN_SCENARIOS)
@pytest.mark.parametrize("client", list(RUNS))
def test_continuity(continuity_run, client, scenario):
    result = continuity_run(client)
    line = result.results.get(scenario)
    assert line is not None, (f"{client}: no result line for {scenario} (exit code {result.returncode}, "
                              f"after {result.seconds:.1f}s){_context(result)}")
    assert line["ok"], f"{client}/{scenario} failed: {line.get('error')}{_context(result)}"
    skipped = (line.get("detail") or {}).get("skipped")
    if skipped:
        pytest.skip(skipped)


@pytest.mark.parametrize("client", list(RUNS))
def test_every_scenario_ran_and_the_server_saw_resumptions(continuity_run, client):
    result = continuity_run(client)
    assert result.done is not None, f"no final line (exit code {result.returncode}){_context(result)}"
    assert set(result.results) == set(RUN_SCENARIOS), sorted(result.results)
    if ONLY:
        return
    log = result.server_log
    # cut, silent, twice x2: four resumptions, each retransmitting what was unacknowledged
    resumed = re.findall(r"alice@localhost/\S+ resumed \((\d+) stanzas retransmitted\)", log)
    assert len(resumed) == 4 and all(int(n) >= 1 for n in resumed), resumed
    # one refused resumption: the expired one, answered with the count the server had (§5)
    refused = [line for line in log.splitlines() if "resume refused" in line]
    assert len(refused) == 1 and "the session expired (h=" in refused[0], refused
    # nothing the clients did was a protocol error for the server
    errors = [line for line in log.splitlines() if "stream error" in line]
    assert not errors, errors


def test_scenario_list_matches_the_script():
    with open(os.path.join(os.path.dirname(__file__), "js", "continuity.js"), encoding="utf-8") as fh:
        source = fh.read()
    for name in SCENARIOS:
        if name in ("cut_resume", "silent_resume"):
            assert "`${how}_resume`" in source
        else:
            assert f"runner.run('{name}'" in source, name

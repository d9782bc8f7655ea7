"""Helpers for the end-to-end tests with real clients (Node scripts in tests/js/),
a real browser and a real nginx.

``require(ok, what)`` skips with a clear reason on a developer machine that lacks
a component, and fails in CI (``CI`` set), where ``.ci/run`` is supposed to have
installed everything.  ``run_node_script`` runs one of the scenario scripts and
answers its requests (see tests/js/common.js for the line protocol).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import gevent
import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS_DIR = os.path.join(ROOT, "tests", "js")
NODE_MODULES = os.path.join(ROOT, "node_modules")
ARTIFACTS = os.path.join(ROOT, "test-artifacts")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(ok: bool, what: str) -> None:
    """Skip (developer machine) or fail (CI) when a component is missing."""
    if ok:
        return
    if in_ci():
        pytest.fail(f"{what} (CI is set, so this fails instead of skipping; .ci/run / scripts/test should install it)",
                    pytrace=False)
    pytest.skip(what)


def node_binary() -> str | None:
    return shutil.which("node")


def require_node(*packages: str) -> str:
    node = node_binary()
    require(node is not None, "node is not installed (Node.js >= 20 is needed for the real-client tests)")
    missing = [p for p in packages if not os.path.isfile(os.path.join(NODE_MODULES, p, "package.json"))]
    require(not missing, f"npm packages missing from node_modules/: {', '.join(missing)} (run `npm ci`)")
    return node


def artifacts_dir() -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


def refresh(server, usernames, timeout: float = 15) -> dict:
    """POST /roster_admin/refresh on the server's own port, as the web app does."""
    reply = requests.post(server.base_url + "/roster_admin/refresh", json=list(usernames), timeout=timeout)
    assert reply.status_code == 200, (reply.status_code, reply.text)
    return reply.json()


class NodeRun:
    """The outcome of one scenario script run."""

    def __init__(self, lines: list[dict], returncode: int | None, stderr_path: str, seconds: float):
        self.lines = lines
        self.returncode = returncode
        self.stderr_path = stderr_path
        self.seconds = seconds
        self.results = {line["scenario"]: line for line in lines if "scenario" in line}
        self.done = next((line for line in lines if line.get("done")), None)

    def stderr_tail(self, n: int = 60) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-n:])
        except FileNotFoundError:
            return ""


def run_node_script(script: str, args: list[str], *, server, backend, timeout: float = 150,
                    stderr_path: str, handlers: dict | None = None) -> NodeRun:
    """Run ``node tests/js/<script> ARGS``, answer its requests, collect its lines.

    A ``{"request": "refresh", "id": N, "user": U, "contacts": {...}}`` line makes this
    change U's contacts at the (in-process) backend and POST the refresh to the
    server, then answer ``{"id": N, "ok": true, "reply": {...}}`` on the script's stdin.
    ``handlers`` maps other request names to ``fn(msg) -> dict`` (merged into the answer;
    an exception answers ``ok: false``).
    """
    node = require_node()

    def do_refresh(msg):
        backend.contacts[msg["user"]] = msg["contacts"]
        return {"reply": refresh(server, [msg["user"]])}

    handlers = {"refresh": do_refresh, **(handlers or {})}
    lines: list[dict] = []
    started = time.monotonic()
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen([node, os.path.join(JS_DIR, script), *args], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, encoding="utf-8", bufsize=1)
        try:
            with gevent.Timeout(timeout, TimeoutError(f"{script} still running after {timeout}s")):
                for raw in proc.stdout:
                    raw = raw.strip()
                    if not raw:
                        continue
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        err.write(f"[non-JSON stdout] {raw}\n")
                        continue
                    if "request" in msg:
                        answer = {"id": msg["id"], "ok": True}
                        try:
                            handler = handlers[msg["request"]]
                            answer.update(handler(msg) or {})
                        except Exception as exc:  # noqa: BLE001 - reported to the script, which fails the scenario
                            answer.update(ok=False, error=repr(exc))
                        proc.stdin.write(json.dumps(answer) + "\n")
                        proc.stdin.flush()
                        continue
                    lines.append(msg)
                proc.wait(timeout=10)
        except TimeoutError as exc:
            err.write(f"[test] {exc}; killing pid {proc.pid}\n")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except Exception:  # noqa: BLE001
                    pass
    return NodeRun(lines, proc.returncode, stderr_path, time.monotonic() - started)

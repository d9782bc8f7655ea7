"""Fork server for the test harness: import boshroster once, fork one real server per test.

Starting ``python -m boshroster serve`` costs an interpreter start and ~0.4 s of CPU for
imports (gevent, requests, prometheus_client, scramp …) every time; on the shared 2-core
test machine that was 1–2 s of wall time per server, several hundred times per suite.  This
process pays it once: it monkey-patches and imports exactly what ``python -m boshroster``
imports, then for every request forks a child that runs ``boshroster.cli.main.main(["serve",
"--config", FILE])`` with stdout/stderr on the server's log file — the same entry point, the
same code, its own process (signals, sockets, sqlite files), only already imported.

The same goes for scripts/demo_backend.py (gevent, bottle, requests: all imported here),
run as ``__main__`` with its own argv and environment.

Protocol, one JSON object per line on stdin, one reply line on stdout:

``{"op": "cli", "argv": [...], "log": PATH}``     → ``{"pid": N}``: ``boshroster ARGV...`` (``serve
                                                    --config F``, ``user import …``), its stdout and
                                                    stderr appended to ``log``
``{"op": "script", "path": PATH, "argv": [...], "env": {...}, "stdout": PATH, "stderr": PATH}``
                                                  → ``{"pid": N}``: ``python PATH ARGV...``
``{"op": "poll", "pid": N}``                      → ``{"code": None}`` while running, else the
                                                    exit status (negative: killed by that signal)

At EOF on stdin (the test session ended) every child still running is killed: tests leave no
process behind.  The harness (harness.ServerProcess) falls back to a plain subprocess when
BOSHROSTER_TEST_NO_FORK=1.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's package, as `python -m boshroster` run from ROOT sees it
os.chdir(ROOT)

import gevent  # noqa: E402
import gevent.os  # noqa: E402

import boshroster.cli.main  # noqa: E402,F401 - what `serve` imports, imported once
import boshroster.server  # noqa: E402,F401
import bottle  # noqa: E402,F401 - and what scripts/demo_backend.py imports
import requests  # noqa: E402,F401

_waitpid = monkey.get_original("os", "waitpid")


def _die_with_parent() -> None:
    """Linux: SIGKILL this child if the fork server dies (a crashed test run leaves no server)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def _redirect(stdout_path: str, stderr_path: str) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for target, path in ((1, stdout_path), (2, stderr_path)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, target)
        os.close(fd)


def run_child(request: dict) -> None:
    """In the forked child: become the requested program and never return."""
    code = 1
    try:
        _die_with_parent()
        if request["op"] == "cli":  # `boshroster ARGV...`, as `python -m boshroster` runs it
            _redirect(request["log"], request["log"])
            sys.argv = ["boshroster", *request["argv"]]
            code = boshroster.cli.main.main(sys.argv[1:]) or 0
        else:  # `python SCRIPT ARGV...`
            _redirect(request["stdout"], request["stderr"])
            if request.get("env") is not None:
                os.environ.clear()
                os.environ.update(request["env"])
            sys.argv = [request["path"], *request["argv"]]
            sys.path[0] = os.path.dirname(os.path.abspath(request["path"]))
            runpy.run_path(request["path"], run_name="__main__")
            code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the server's log
        import traceback

        traceback.print_exc()
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    children: dict[int, int | None] = {}  # pid -> exit status (None: running or not reaped yet)
    stdin = os.fdopen(0, "rb", buffering=0)
    reply_fd = 1

    def reply(obj) -> None:
        os.write(reply_fd, (json.dumps(obj) + "\n").encode())

    try:
        for line in iter(stdin.readline, b""):
            try:
                request = json.loads(line)
                if request["op"] in ("cli", "script"):
                    pid = gevent.os.fork_gevent()  # raw fork, then gevent.reinit() in the child
                    if pid == 0:
                        run_child(request)
                    children[pid] = None
                    reply({"pid": pid})
                elif request["op"] == "poll":
                    pid = request["pid"]
                    if pid not in children:
                        reply({"error": f"pid {pid} is not a child of the fork server"})
                        continue
                    if children[pid] is None:
                        done, status = _waitpid(pid, os.WNOHANG)
                        if done:
                            children[pid] = os.waitstatus_to_exitcode(status)
                    reply({"code": children[pid]})
                else:
                    reply({"error": f"unknown op {request['op']!r}"})
            except Exception as exc:  # noqa: BLE001 - a bad request must not end the fork server
                reply({"error": repr(exc)})
    finally:
        for pid, code in children.items():
            if code is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    _waitpid(pid, 0)
                except OSError:
                    pass


if __name__ == "__main__":
    main()

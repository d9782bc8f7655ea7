"""Real Redis, PostgreSQL and nginx for the cluster tests (issue 14), each a child process.

Each runs from a private directory under the test's tmp dir, on a free loopback
port, and is stopped by PID.  The Debian binaries are installed with apt-get
when missing and we are root (scripts/test does it first); ``require_*``
skips only when they cannot be had.  PostgreSQL refuses to run as root, so
``initdb``/``pg_ctl`` run as the ``postgres`` user (created by the package).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

import pytest

from harness import ROOT, free_port

_APT = {"redis-server": "redis-server", "postgres": "postgresql", "nginx": "nginx"}


def _apt_install(package: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                   capture_output=True, timeout=600, env=env)


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (os.path.exists("/usr/bin/redis-server") and "/usr/bin/redis-server") or None


def pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


def require(what: str):
    """The binary dir/path for ``what`` (redis-server, postgres, nginx), installing it if we can."""
    finders = {"redis-server": redis_binary, "postgres": pg_bindir,
               "nginx": lambda: shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)}
    found = finders[what]()
    if found is None:
        _apt_install(_APT[what])
        found = finders[what]()
    if found is None:
        message = f"{what} is not installed and cannot be installed here (apt-get install {_APT[what]} as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _wait_port(port: int, proc: subprocess.Popen, what: str, log_path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{open(log_path).read()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start:\n{open(log_path).read()[-3000:]}")


class RedisProcess:
    def __init__(self, workdir: str):
        self.binary = require("redis-server")
        self.dir = os.path.join(workdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        self.log_path = os.path.join(self.dir, "redis.log")
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=self.log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "redis-server", self.log_path)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class PostgresProcess:
    """A private PostgreSQL cluster (initdb) on a free port, run as the postgres user."""

    def __init__(self, workdir: str):
        self.bindir = require("postgres")
        self.dir = os.path.join(workdir, "pg")
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.password = "boshroster-test"

    @property
    def url(self) -> str:
        return f"postgresql://boshroster:{self.password}@127.0.0.1:{self.port}/boshroster"

    def _run(self, *args, **kwargs) -> subprocess.CompletedProcess:
        command = list(args)
        if self.user:
            command = ["runuser", "-u", self.user, "--"] + command
        return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)

    def start(self) -> "PostgresProcess":
        os.makedirs(self.dir, exist_ok=True)
        if self.user:
            info = pwd.getpwnam(self.user)
            os.chown(self.dir, info.pw_uid, info.pw_gid)
            parent = os.path.dirname(self.dir)
            while parent and parent != "/":  # the postgres user must reach the data dir
                os.chmod(parent, os.stat(parent).st_mode | 0o711)
                parent = os.path.dirname(parent)
        data = os.path.join(self.dir, "data")
        result = self._run(os.path.join(self.bindir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                           "-E", "UTF8", "--no-sync")
        assert result.returncode == 0, result.stderr
        self.log_path = os.path.join(self.dir, "pg.log")
        result = self._run(os.path.join(self.bindir, "pg_ctl"), "-D", data, "-l", self.log_path, "-w", "-t", "60",
                           "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        assert result.returncode == 0, result.stderr + result.stdout
        self.data = data
        sql = (f"CREATE ROLE boshroster LOGIN PASSWORD '{self.password}'; "
               "CREATE DATABASE boshroster OWNER boshroster;")
        for statement in sql.split("; "):
            result = self._run(os.path.join(self.bindir, "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", "postgres", "-d", "postgres", "-c", statement)
            assert result.returncode == 0, result.stderr
        return self

    def pid(self) -> int | None:
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as fh:
                return int(fh.readline())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if getattr(self, "data", None):
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
            self.data = None



# -- a PostgreSQL per test module, a fresh database per test ---------------------------------
_databases = itertools.count(1)


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    """A real PostgreSQL for the module (import this fixture into the test module)."""
    server = PostgresProcess(str(tmp_path_factory.mktemp("pg"))).start()
    yield server
    server.stop()


@pytest.fixture
def database_url(pg):
    """A new, empty database on ``pg`` for one test, owned by the boshroster role."""
    import psycopg  # the cluster's driver: only where a test needs PostgreSQL

    name = f"t{next(_databases)}_{int(time.time() * 1000) % 100000}"
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER boshroster")
    return f"postgresql://boshroster:{pg.password}@127.0.0.1:{pg.port}/{name}"


def render_nginx(prefix: str, listen_port: int, upstream_ports: list[int]) -> str:
    """conf/nginx.conf with an upstream of several nodes (round robin, no stickiness)."""
    with open(os.path.join(ROOT, "conf", "nginx.conf"), encoding="utf-8") as fh:
        text = fh.read()
    servers = "\n        ".join(f"server 127.0.0.1:{port};" for port in upstream_ports)
    text = text.replace("server @UPSTREAM@;", servers)
    # A dead node refuses connections: try the next one.  nginx never passes on a POST it
    # already sent (non_idempotent is not given), so no BOSH request is ever replayed.
    text = text.replace("proxy_next_upstream off;", "proxy_next_upstream error timeout;")
    for key, value in {"@LISTEN@": f"127.0.0.1:{listen_port}", "@STATIC_ROOT@": os.path.join(ROOT, "static"),
                       "@PREFIX@": prefix}.items():
        text = text.replace(key, value)
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


class NginxProcess:
    def __init__(self, workdir: str, upstream_ports: list[int]):
        self.binary = require("nginx")
        self.prefix = os.path.join(workdir, "nginx")
        os.makedirs(self.prefix, exist_ok=True)
        self.port = free_port()
        self.conf = render_nginx(self.prefix, self.port, upstream_ports)
        self.proc = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "NginxProcess":
        self.log_path = os.path.join(self.prefix, "stderr.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([self.binary, "-p", self.prefix, "-c", self.conf, "-e", "stderr",
                                      "-g", "daemon off;"], stdout=self.log, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.proc, "nginx", self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

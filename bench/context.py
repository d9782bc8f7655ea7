"""The run's context (``Ctx``): users, the probe, the roster backend, starting boshroster (or a
peer) for a workload, profiling with py-spy."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import gevent

from clients import HttpConn, ScramCache
from core import DOMAIN, HERE, PASSWORD, ROOT, Child, clean_env, close_all, free_port, pct
from results import Results, print_profile

class Ctx:
    """Shared by the runner and the workloads.  ``target`` is who the workloads measure now:
    ``"boshroster"``, or the peer's name while the runner replays them against ``peer``."""

    def __init__(self, args, prof: dict):
        self.args = args
        self.p = prof
        self.pin = not args.no_pin and len(os.sched_getaffinity(0)) >= 2
        cpus = sorted(os.sched_getaffinity(0))
        self.server_cpu = cpus[0] if self.pin else None
        self.gen_cpu = cpus[1] if self.pin else None
        self.work = tempfile.mkdtemp(prefix="boshroster-bench-")
        self.backend: Child | None = None
        self.backend_conn: HttpConn | None = None
        self.server: Child | None = None
        self.cache_dir = ""
        self.scram: ScramCache | None = None
        self.ceil: dict = {}
        self.results: Results | None = None
        self.profiles: list[str] = []
        self.spy = None
        self.probe = None
        self.probe_samples: list[tuple[float, float]] = []
        self.ceil_probe: dict[str, float] = {}
        self.peer = None  # e.g. peer_ejabberd.EjabberdPeer (--peer)
        self.target = "boshroster"

    @property
    def on_peer(self) -> bool:
        return self.target != "boshroster"

    # users -------------------------------------------------------------------------------
    def user_names(self) -> list[str]:
        p = self.p
        n_login = p["login_warm"] + p["login_seq"] + p["login_conc"] + p["login_plain"]
        return ([f"u{i}" for i in range(p["ring"])] + [f"l{i}" for i in range(n_login)]
                + [f"h{i}" for i in range(p["hub"] + 1)])

    def prepare_users(self) -> None:
        """Import users once per (user set, iterations, accounts.py); reuse the data dir after."""
        names = self.user_names()
        with open(os.path.join(ROOT, "boshroster", "auth", "accounts.py"), "rb") as fh:
            schema = hashlib.sha256(fh.read()).hexdigest()[:12]
        key = hashlib.sha256(f"{','.join(names)}|4096|{schema}".encode()).hexdigest()[:16]
        self.cache_dir = os.path.join(ROOT, "bench-results", "cache", key)
        db = os.path.join(self.cache_dir, "data", "accounts.sqlite3")
        if os.path.exists(os.path.join(self.cache_dir, "ready")):
            print(f"users: {len(names)} accounts reused from {os.path.relpath(self.cache_dir, ROOT)}", flush=True)
        else:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
            os.makedirs(os.path.join(self.cache_dir, "data"))
            users_file = os.path.join(self.cache_dir, "users.txt")
            with open(users_file, "w") as fh:
                fh.writelines(f"{n}:{PASSWORD}\n" for n in names)
            cfg = os.path.join(self.cache_dir, "import.toml")
            with open(cfg, "w") as fh:
                fh.write(f'data_dir = "{os.path.join(self.cache_dir, "data")}"\nscram_iterations = 4096\n')
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "boshroster", "user", "import", users_file, "--config", cfg],
                               cwd=ROOT, capture_output=True, text=True, env=clean_env())
            if r.returncode != 0:
                raise RuntimeError(f"user import failed: {r.stderr}{r.stdout}")
            took = time.perf_counter() - t0
            print(f"users: imported {len(names)} accounts in {took:.1f} s ({r.stdout.strip()})", flush=True)
            with open(os.path.join(self.cache_dir, "import-seconds"), "w") as fh:
                fh.write(f"{took:.2f}\n")
        self.scram = ScramCache(os.path.join(self.cache_dir, "scram-client-keys.json"))
        self._derive_client_keys(db)
        with open(os.path.join(self.cache_dir, "ready"), "w") as fh:
            fh.write("ok\n")

    def _derive_client_keys(self, db: str) -> None:
        """Clients cache SCRAM keys (Converse does): derive them once, on both cores, off the clock."""
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT username, salt, iterations FROM scram_credentials WHERE mechanism = 'SCRAM-SHA-1'").fetchall()
        except sqlite3.Error as exc:
            print(f"users: cannot read salts ({exc}); SCRAM keys are derived at first login", flush=True)
            return
        finally:
            con.close()
        todo = [(u, bytes(s), int(i)) for u, s, i in rows
                if ScramCache.key(u, base64.b64encode(bytes(s)).decode(), int(i)) not in self.scram.keys]
        if not todo:
            return
        t0 = time.perf_counter()
        pool = gevent.get_hub().threadpool
        pool.maxsize = max(2, os.cpu_count() or 2)
        results = [pool.spawn(ScramCache.derive, PASSWORD, salt, it) for _u, salt, it in todo]
        for (user, salt, it), res in zip(todo, results):
            self.scram.keys[ScramCache.key(user, base64.b64encode(salt).decode(), it)] = res.get()
        self.scram.dirty = True
        self.scram.save()
        print(f"users: derived {len(todo)} client SCRAM keys in {time.perf_counter() - t0:.1f} s (cached)", flush=True)

    # processes -------------------------------------------------------------------------------
    def start_probe(self) -> None:
        def pre():
            if self.server_cpu is not None:
                os.sched_setaffinity(0, {self.server_cpu})

        self.probe = subprocess.Popen([sys.executable, os.path.join(HERE, "probe.py")], stdout=subprocess.PIPE,
                                      preexec_fn=pre, cwd=ROOT)

        def read():
            for line in self.probe.stdout:
                t, dt = line.split()
                self.probe_samples.append((float(t), float(dt)))

        gevent.spawn(read)

    def probe_mean(self, t0: float, t1: float, at_least: int = 9) -> tuple[float | None, int]:
        """Mean probe time in [t0, t1] (CPU time is a sum: the mean slowdown applies), widened to the
        ``at_least`` nearest samples for short intervals."""
        samples = self.probe_samples
        if len(samples) < at_least:
            return None, 0
        inside = [dt for t, dt in samples if t0 <= t <= t1]
        if len(inside) < at_least:
            mid = (t0 + t1) / 2
            inside = [dt for _t, dt in sorted(samples[-2000:], key=lambda s: abs(s[0] - mid))[:at_least]]
        return statistics.fmean(inside), len(inside)

    def probe_baseline(self) -> float | None:
        if len(self.probe_samples) < 20:
            return None
        return pct([dt for _t, dt in self.probe_samples], 5)

    def start_backend(self) -> None:
        argv = [sys.executable, os.path.join(HERE, "backend.py"), "--ring", str(self.p["ring"]),
                "--hub", str(self.p["hub"]), "--domain", DOMAIN, "--validators", self.args.backend_validators]
        if self.args.backend_nagle:
            argv.append("--nagle")
        self.backend = Child("backend", argv, self.gen_cpu, os.path.join(self.work, "backend.log"), env=clean_env())
        self.backend_conn = HttpConn(("127.0.0.1", self.backend.port), path="/_ctl/bump", content_type="application/json")

    def backend_stats(self) -> dict:
        """The bench backend's counters: ``gets``, ``conditional``, ``not_modified``, ``connections``."""
        return json.loads(self.backend_conn.get("/_ctl/stats"))

    def backend_gets(self) -> int:
        return self.backend_stats()["gets"]

    def bump(self, users: list[str], conn: HttpConn | None = None) -> None:
        (conn or self.backend_conn).request(json.dumps(users).encode())

    def start_server(self, cpu: int | None = None, **overrides) -> Child:
        """boshroster with these settings, pinned to ``cpu`` (default: the server CPU)."""
        port = free_port()
        run_dir = tempfile.mkdtemp(prefix="server-", dir=self.work)
        data = os.path.join(run_dir, "data")
        os.makedirs(data)
        shutil.copy(os.path.join(self.cache_dir, "data", "accounts.sqlite3"), data)
        settings = {
            "domain": DOMAIN, "http_interfaces": ["127.0.0.1"], "http_ports": [port], "data_dir": data,
            "log_level": "warning", "max_connections": 15000, "auth_failure_limit": 0, "scram_iterations": 4096,
            "bosh_max_pending": 100000, "bosh_max_wait": 60, "bosh_max_inactivity": 60,
            "websocket_max_queue": 10000, "refresh_max_users": 10000,
            "http_roster_url": f"http://127.0.0.1:{self.backend.port}/contacts/%s",
        }
        settings.update(overrides)
        settings.update(self.args.server_settings)
        cfg = os.path.join(run_dir, "boshroster.toml")
        with open(cfg, "w") as fh:
            for k, v in settings.items():
                fh.write(f"{k} = {json.dumps(v)}\n")
        argv = [sys.executable, "-m", "boshroster", "serve", "--config", cfg]
        patch = os.environ.get("BENCH_SERVER_PATCH")
        if patch:  # experiments only: run these files (':'-separated) in the server before it starts
            files = [os.path.abspath(f) for f in patch.split(":") if f]
            argv = [sys.executable, "-c", "import sys; from boshroster.cli import main as cli\n"
                    f"for _f in {files!r}: exec(compile(open(_f).read(), _f, 'exec'), {{'__name__': 'patch'}})\n"
                    "sys.exit(cli.main())", "serve", "--config", cfg]
        self.server = Child("boshroster", argv, self.server_cpu if cpu is None else cpu,
                            os.path.join(run_dir, "server.log"), port=port,
                            env=clean_env())
        print(f"  (boshroster pid {self.server.pid}, port {port})", flush=True)
        return self.server

    @contextlib.contextmanager
    def serving(self, **overrides):
        """The server for one workload (boshroster with these settings, or the peer started afresh):
        yields (the server, a list for the workload's clients); afterwards closes those clients and
        stops the server, whatever happened."""
        srv = self.peer.start() if self.on_peer else self.start_server(**overrides)
        if self.on_peer:
            self.server = srv
        clients: list = []
        try:
            yield srv, clients
        finally:
            close_all(clients)
            self.stop_server()

    def stop_server(self) -> None:
        if self.on_peer:
            self.server = None
            self.peer.stop()
            return
        if self.server is not None:
            self.server.stop(timeout=15)
            log = self.server.tail(2000).strip()
            if "Traceback" in log or "ERROR" in log:
                print(f"  (server log: {self.server.log_path})\n    " + log[-1500:].replace("\n", "\n    "), flush=True)
            self.server = None

    # profiling -----------------------------------------------------------------------------
    def spy_start(self, pid: int, name: str) -> None:
        if not self.args.profile:
            return
        out = os.path.join(self.args.profile, f"{name}.txt")
        os.makedirs(self.args.profile, exist_ok=True)
        self.spy = (subprocess.Popen([self.args.py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                                      "--nonblocking", "-o", out], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL), out)

    def spy_stop(self) -> None:
        if self.spy is None:
            return
        proc, out = self.spy
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.spy = None
        self.profiles.append(out)
        print_profile(out)

    def close(self) -> None:
        self.stop_server()
        if self.peer is not None:
            self.peer.stop()
        if self.backend is not None:
            self.backend.stop()
        if self.probe is not None and self.probe.poll() is None:
            self.probe.terminate()
            self.probe.wait()
        shutil.rmtree(self.work, ignore_errors=True)



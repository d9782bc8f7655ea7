#!/usr/bin/env python3
"""boshroster benchmark (issue 5): speed and memory, as ratios to this machine's ceilings.

Run through ``scripts/bench`` (which prepares ``.venv``).  This process is the load
generator: gevent, raw sockets, minimal HTTP and WebSocket framing (bench/clients.py).
It starts, each on 127.0.0.1 and as processes of their own:

* the roster backend (bench/backend.py, tests/backend_app.TestBackend with generated rosters);
* boshroster itself (``python -m boshroster serve``), afresh for every workload and transport;
* the ceiling servers (bench/ceiling.py): bare gevent pywsgi, bare gevent-websocket echo.

Server CPU is read from ``/proc/<pid>/task/*/schedstat`` (ns; ``/proc/<pid>/stat`` utime+stime
is kept alongside in the JSON), RSS from ``/proc/<pid>/status``; the generator's own CPU from
``getrusage``.  By default the servers are pinned to CPU 0 and the generator and backend to
CPU 1 (``--no-pin`` to let the kernel choose).

Output: a table on stdout and JSON lines in ``bench-results/<timestamp>.jsonl``.
``--compare FILE...`` prints the spread of several result files (reproducibility).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.lock  # noqa: E402
import gevent.pool  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from clients import BenchError, BoshClient, HttpConn, ScramCache, WsClient, login, ws_frame  # noqa: E402

PASSWORD = "password"
DOMAIN = "localhost"
TRANSPORTS = ("bosh", "ws")
WORKLOADS = ("ceilings", "login", "idle", "messages", "refresh", "presence")

# Prosody 0.12 + mod_http_roster_admin on this machine kind (design notes F / issue 5).
REFERENCE = {
    ("login", "cpu_per_login"): {"ws": 3.3e-3, "bosh": 5.3e-3},
    ("idle", "rss_per_session"): {"ws": 40.0, "bosh": 55.0},  # KiB
    ("messages", "cpu_per_1000"): {"ws": 0.056, "bosh": 0.076},
    ("refresh", "reply_time"): {"ws": 0.430, "bosh": 0.430},
    ("refresh", "all_pushed_time"): {"ws": 0.430, "bosh": 0.430},
    ("refresh", "backend_gets"): {"ws": 200, "bosh": 200},
    ("refresh", "single_backend_gets"): {"ws": 400, "bosh": 400},
    ("presence", "cpu_per_fanout"): {"ws": 6.8e-3},
}
# Issue 5's ceiling targets: server CPU per message at most this many bare ceiling operations.
CEILING_TARGET = {("messages", "cpu_per_1000", "ws"): 1.6, ("messages", "cpu_per_1000", "bosh"): 1.0}

PROFILES = {
    "default": dict(
        ring=10000, hub=100, login_warm=10, login_seq=200, login_conc=1000, login_plain=200,
        idle_stages=[500, 5000, 10000], idle_window=10.0, idle_wait=10, idle_settle=2.0,
        messages=50000, messages_warm=2000, pairs=50, window=10,
        refresh_users=200, refresh_singles=400, refresh_conc=20, refresh_reps=3,
        presence_rounds=100, ceiling_seconds=5.0, ceiling_conns=50,
    ),
    "quick": dict(
        ring=2000, hub=100, login_warm=10, login_seq=150, login_conc=400, login_plain=200,
        idle_stages=[100, 500, 1000], idle_window=2.5, idle_wait=3, idle_settle=0.3,
        messages=25000, messages_warm=1000, pairs=50, window=10,
        refresh_users=200, refresh_singles=400, refresh_conc=20, refresh_reps=3,
        presence_rounds=60, ceiling_seconds=2.0, ceiling_conns=50,
    ),
}


# -- /proc ------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def proc_threads_cpu(pid: int) -> dict[str, int]:
    """ns on CPU per live thread (schedstat)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                out[tid] = int(fh.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


class CpuClock:
    """A process's CPU over an interval: schedstat per thread (ns), falling back to /proc/<pid>/stat
    (10 ms ticks, but it keeps the time of threads that exited, e.g. gevent's idle pool threads)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.t0 = proc_threads_cpu(pid)
        self.s0 = proc_stat_cpu(pid)

    def delta(self) -> tuple[float, float]:
        t1 = proc_threads_cpu(self.pid)
        sched = sum(v - self.t0.get(tid, 0) for tid, v in t1.items()) / 1e9
        stat = proc_stat_cpu(self.pid) - self.s0
        # a thread that exited took its schedstat with it: trust the ticks when they say clearly more
        return (stat if stat - sched > 3.0 / _TICK else sched), stat


def proc_cpu(pid: int) -> float:
    """Seconds on CPU so far, all live threads (schedstat: ns resolution)."""
    return sum(proc_threads_cpu(pid).values()) / 1e9


def proc_stat_cpu(pid: int) -> float:
    """utime + stime from /proc/<pid>/stat (clock ticks)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_busy() -> float:
    """CPU-seconds all CPUs spent busy (from /proc/stat), to see what other processes took."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- child processes ------------------------------------------------------------------------------

class Child:
    """A process we started (stopped by PID only)."""

    def __init__(self, name: str, argv: list[str], cpu: int | None, log_path: str, port: int | None = None,
                 env: dict | None = None):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "ab")

        def pre():
            raise_nofile()
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE if port is None else self.log,
                                     stderr=self.log, cwd=ROOT, preexec_fn=pre, env=env)
        self.pid = self.proc.pid
        if port is None:  # the child prints "PORT n"
            line = self.proc.stdout.readline().decode()
            if not line.startswith("PORT "):
                self.stop()
                raise RuntimeError(f"{name} did not start: {line!r}\n{self.tail()}")
            self.port = int(line.split()[1])
        else:
            self.port = port
            deadline = time.monotonic() + 30
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"{name} did not listen on {port}:\n{self.tail()}")
                    gevent.sleep(0.05)

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- measurement ---------------------------------------------------------------------------------

class Meter:
    """CPU of the server, the generator (this process) and the backend over an interval.

    With ``ops`` (a callable counting operations done so far) it also samples the server's CPU every
    ``window`` seconds; ``stop()`` then gives the median CPU per operation over those windows
    (``cpu_per_op``), which shrugs off the bursts of CPU theft this shared VM sees (the same fixed
    loop takes 14-28 ms of CPU time from one 50 ms slice to the next), and the overall figure
    (``cpu_per_op_total``)."""

    def __init__(self, ctx, server_pid: int, ops=None, window: float = 0.25):
        self.ctx = ctx
        self.pid = server_pid
        self.ops = ops
        self.samples: list[tuple[float, float, int]] = []
        self.sampler = None
        if ops is not None:
            self.samples.append((time.monotonic(), proc_cpu(server_pid), ops()))
            self.sampler = gevent.spawn(self._sample, window)
        self.t0 = time.perf_counter()
        self.mono0 = time.monotonic()
        self.p0 = CpuClock(ctx.probe.pid) if ctx.probe else None
        self.s0 = CpuClock(server_pid)
        self.g0 = self_cpu()
        self.b0 = CpuClock(ctx.backend.pid) if ctx.backend else None
        self.gets0 = ctx.backend_gets() if ctx.backend else 0
        self.m0 = machine_busy()

    def _sample(self, window: float) -> None:
        while True:
            gevent.sleep(window)
            self.samples.append((time.monotonic(), proc_cpu(self.pid), self.ops()))

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        if self.sampler is not None:
            self.sampler.kill()
            self.samples.append((time.monotonic(), proc_cpu(self.pid), self.ops()))
        server_cpu, server_stat_cpu = self.s0.delta()
        d = {
            "wall": wall,
            "server_cpu": server_cpu,
            "server_stat_cpu": server_stat_cpu,
            "gen_cpu": self_cpu() - self.g0,
            "backend_cpu": self.b0.delta()[0] if self.b0 else 0.0,
            "backend_gets": (self.ctx.backend_gets() - self.gets0) if self.ctx.backend else 0,
        }
        probe_cpu = self.p0.delta()[0] if self.p0 else 0.0
        # what neither the server, the generator, the backend nor the probe used: other people's load (noise)
        d["other_cpu"] = max(0.0, machine_busy() - self.m0 - d["server_cpu"] - d["gen_cpu"] - d["backend_cpu"] - probe_cpu)
        d["probe"], d["probe_n"] = self.ctx.probe_mean(self.mono0, time.monotonic())
        d["other_share"] = d["other_cpu"] / wall if wall > 0 else 0.0
        d["gen_share"] = d["gen_cpu"] / wall if wall > 0 else 0.0
        d["server_share"] = d["server_cpu"] / wall if wall > 0 else 0.0
        if self.ops is not None:
            total_ops = self.samples[-1][2] - self.samples[0][2]
            d["ops"] = total_ops
            d["cpu_per_op_total"] = server_cpu / total_ops if total_ops else None
            raw, per_probe = [], []
            for (t0, c0, n0), (t1, c1, n1) in zip(self.samples, self.samples[1:]):
                if n1 - n0 < max(3, total_ops / len(self.samples) / 4) or c1 < c0:
                    continue
                raw.append((c1 - c0) / (n1 - n0))
                pm = self.ctx.probe_mean(t0, t1, at_least=3)[0]
                if pm:
                    per_probe.append(raw[-1] / pm)
            d["windows"] = len(raw)
            if len(raw) >= 3:
                d["cpu_per_op"] = statistics.median(raw)
                if len(per_probe) >= 3:
                    # the probe time this figure effectively saw: normalizing divides by it
                    d["probe"] = d["cpu_per_op"] / statistics.median(per_probe)
            else:
                d["cpu_per_op"] = d["cpu_per_op_total"]
        return d


class Results:
    def __init__(self, path: str, meta: dict):
        self.path = path
        self.rows: list[dict] = []
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.fh = open(path, "w")
        self._write({"type": "meta", **meta})

    def _write(self, obj: dict) -> None:
        self.fh.write(json.dumps(obj) + "\n")
        self.fh.flush()

    def add(self, workload: str, transport: str, metric: str, value, unit: str, label: str,
            ceiling: float | None = None, ceiling_label: str = "", meter: dict | None = None,
            lower_is_better: bool = True, note: str = "", extra: dict | None = None,
            ceiling_probe: float | None = None) -> None:
        ref = REFERENCE.get((workload, metric), {}).get(transport)
        row = {
            "type": "live", "workload": workload, "transport": transport, "metric": metric,
            "label": label, "value": value, "unit": unit,
            "ceiling": ceiling, "ceiling_label": ceiling_label,
            "ratio_ceiling": (value / ceiling) if (ceiling and ceiling > 1e-9 and value is not None) else None,
            "reference": ref, "ratio_reference": (value / ref) if (ref and value is not None) else None,
            "lower_is_better": lower_is_better, "note": note,
        }
        target = CEILING_TARGET.get((workload, metric, transport))
        if target is not None:
            row["ceiling_target"] = target
        if "cpu" in metric and unit in ("s", "%core") and meter is not None and meter.get("probe"):
            row["normalize"] = True
            row["probe"] = meter["probe"]
            row["ceiling_probe"] = ceiling_probe
        if meter is not None:
            row["gen_share"] = round(meter["gen_share"], 3)
            row["server_share"] = round(meter["server_share"], 3)
            row["other_share"] = round(meter["other_share"], 3)
            row["meter"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in meter.items()}
        if extra:
            row.update(extra)
        self.rows.append(row)
        self._write(row)
        print("  " + format_row(row), flush=True)

    def finalize(self, baseline: float | None) -> None:
        """Server CPU figures at the machine's undisturbed speed: value x baseline / probe time
        during the measurement (baseline: the probe's 5th percentile over the whole run).  The raw
        figure stays in ``value_raw``; these final rows are written with type "figure"."""
        for row in self.rows:
            row["type"] = "figure"
            if baseline and row.get("normalize") and row["value"] is not None:
                slow = row["probe"] / baseline
                row["slow"] = round(slow, 3)
                row["value_raw"] = row["value"]
                row["value"] = row["value"] / slow
                if row["ceiling"] and row.get("ceiling_probe"):
                    row["ceiling_raw"] = row["ceiling"]
                    row["ceiling"] = row["ceiling"] * baseline / row["ceiling_probe"]
                if row["ceiling"] and row["ceiling"] > 1e-9:
                    row["ratio_ceiling"] = row["value"] / row["ceiling"]
                if row["reference"]:
                    row["ratio_reference"] = row["value"] / row["reference"]
            self._write(row)

    def close(self) -> None:
        self.fh.close()


def fmt_value(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        if abs(value) < 1e-3:
            return f"{value * 1e6:.3g} µs"
        v = value * 1e3
        return f"{v:.3g} ms" if v < 100 else f"{v:,.0f} ms"
    if unit == "%core":
        return f"{value * 100:.2f} %core"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f} {unit}".strip()
        return f"{value:.3g} {unit}".strip()
    return f"{value:,} {unit}".strip()


def fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_row(row: dict) -> str:
    gen = row.get("gen_share")
    gen_s = "" if gen is None else f"gen {gen * 100:.0f}%"
    other = row.get("other_share")
    if other is not None and other > 0.1:
        gen_s += f" (others {other * 100:.0f}%)"
    flag = " GEN-BOUND" if gen is not None and gen > 0.85 else ""
    if row.get("slow"):
        ref_raw = f" = {row['value_raw'] / row['reference']:.2f}x ref" if row.get("reference") else ""
        gen_s += f" [raw {fmt_value(row['value_raw'], row['unit'])}{ref_raw}, CPU slow x{row['slow']:.2f}]"
    return (f"{row['workload']:<9} {row['transport']:<5} {row['label']:<38} {fmt_value(row['value'], row['unit']):>16}"
            f"  ceil {fmt_ratio(row['ratio_ceiling']):>8}  ref {fmt_ratio(row['ratio_reference']):>7}  {gen_s}{flag}"
            f"{('  ' + row['note']) if row['note'] else ''}")


# -- the run --------------------------------------------------------------------------------

class Ctx:
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
        import base64

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
        self.backend = Child("backend", [sys.executable, os.path.join(HERE, "backend.py"), "--ring", str(self.p["ring"]),
                                         "--hub", str(self.p["hub"]), "--domain", DOMAIN],
                             self.gen_cpu, os.path.join(self.work, "backend.log"), env=clean_env())
        self.backend_conn = HttpConn(("127.0.0.1", self.backend.port), path="/_ctl/bump", content_type="application/json")

    def backend_gets(self) -> int:
        return json.loads(self.backend_conn.get("/_ctl/stats"))["gets"]

    def bump(self, users: list[str], conn: HttpConn | None = None) -> None:
        (conn or self.backend_conn).request(json.dumps(users).encode())

    def start_server(self, **overrides) -> Child:
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
        self.server = Child("boshroster", argv, self.server_cpu, os.path.join(run_dir, "server.log"), port=port,
                            env=clean_env())
        print(f"  (boshroster pid {self.server.pid}, port {port})", flush=True)
        return self.server

    @contextlib.contextmanager
    def serving(self, **overrides):
        """boshroster for one workload: yields (the server, a list for the workload's clients);
        afterwards closes those clients and stops the server, whatever happened."""
        srv = self.start_server(**overrides)
        clients: list = []
        try:
            yield srv, clients
        finally:
            close_all(clients)
            self.stop_server()

    def stop_server(self) -> None:
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
        if self.backend is not None:
            self.backend.stop()
        if self.probe is not None and self.probe.poll() is None:
            self.probe.terminate()
            self.probe.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("BOSHROSTER_")}


_RE_LINE = re.compile(r":\d+\)$")
_GENERIC = ("WSGIServer.handle", "_handle_and_close_when_done", "WSGIHandler.handle ", "ServerHandler.handle ",
            "WSGIHandler.handle_one_request", "WSGIHandler.handle_one_response", "WebSocketHandler.run_application",
            "<module>", "main (", "run (", "serve_forever")


def print_profile(path: str, top: int = 20) -> None:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    try:
        with open(path) as fh:
            for line in fh:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                n = int(count)
                total += n
                # "func (path/file.py:123)" -> "func (file.py)": per function, not per line
                frames = [_RE_LINE.sub(")", f) for f in stack.split(";")]
                selfc[frames[-1]] = selfc.get(frames[-1], 0) + n
                for f in set(frames):
                    incl[f] = incl.get(f, 0) + n
    except (OSError, ValueError):
        print(f"  profile: cannot read {path}")
        return
    if not total:
        return
    print(f"  profile {os.path.basename(path)}: {total} samples; top self / inclusive:")
    for f, n in sorted(selfc.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    self {100 * n / total:5.1f}%  {f}")
    shown = 0
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1]):
        if any(g in f for g in _GENERIC):
            continue
        print(f"    incl {100 * n / total:5.1f}%  {f}")
        shown += 1
        if shown >= top:
            break


def make_client(ctx: Ctx, transport: str, wait: int = 60):
    addr = ("127.0.0.1", ctx.server.port)
    return BoshClient(addr, DOMAIN, wait=wait) if transport == "bosh" else WsClient(addr, DOMAIN)


def run_pool(size: int, items, fn) -> list:
    pool = gevent.pool.Pool(size)
    jobs = [pool.spawn(fn, item) for item in items]
    gevent.joinall(jobs)
    errors = [j.exception for j in jobs if j.exception is not None]
    if errors:
        raise BenchError(f"{len(errors)} of {len(jobs)} failed; first: {errors[0]!r}")
    return [j.value for j in jobs]


def close_all(clients: list, size: int = 100) -> None:
    pool = gevent.pool.Pool(size)
    for c in clients:
        pool.spawn(c.close)
    pool.join(timeout=30)
    for c in clients:
        c.drop()


# -- ceilings ------------------------------------------------------------------------------------

TINY_POST = (b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1234567' sid='abcdefghijklmnopqrstuvwxyzABCDEF'>"
             b"<message xmlns='jabber:client' to='u1@localhost' type='chat' id='m1'><body>0 1 12345.678901</body>"
             b"</message></body>")
# Tiny, like the design notes' figure: gevent-websocket validates UTF-8 byte by byte in Python, so a
# stanza-sized echo (~130 B) costs it ~3x more; BENCH_ECHO_BYTES=130 shows that.
ECHO_MSG = "<message/>" if not os.environ.get("BENCH_ECHO_BYTES") else "<message>" + "x" * (
    int(os.environ["BENCH_ECHO_BYTES"]) - 19) + "</message>"


def wl_ceilings(ctx: Ctx, transports) -> None:
    p = ctx.p
    seconds, conns = p["ceiling_seconds"], p["ceiling_conns"]
    if "bosh" in transports:
        srv = Child("ceiling-http", [sys.executable, os.path.join(HERE, "ceiling.py"), "http"], ctx.server_cpu,
                    os.path.join(ctx.work, "ceiling-http.log"))
        try:
            addr = ("127.0.0.1", srv.port)
            stop = [False]
            count = [0]
            lat: list[float] = []

            def loop(_):
                c = HttpConn(addr, path="/")
                while not stop[0]:
                    t0 = time.perf_counter()
                    c.request(TINY_POST)
                    lat.append(time.perf_counter() - t0)
                    count[0] += 1
                c.close()

            one = HttpConn(addr, path="/")
            rtt = []
            for _ in range(300):
                t0 = time.perf_counter()
                one.request(TINY_POST)
                rtt.append(time.perf_counter() - t0)
            one.close()
            ctx.ceil["http_rtt1"] = pct(rtt[50:], 50)
            workers = [gevent.spawn(loop, i) for i in range(conns)]
            gevent.sleep(min(1.0, seconds / 2))
            n0, lat_n0 = count[0], len(lat)
            ctx.spy_start(srv.pid, "ceiling-http")
            m = Meter(ctx, srv.pid, ops=lambda: count[0])
            gevent.sleep(seconds)
            d = m.stop()
            n = count[0] - n0
            ctx.spy_stop()
            stop[0] = True
            gevent.joinall(workers, timeout=5)
            cpu = d["cpu_per_op"]
            ctx.ceil_probe["http"] = d["probe"]
            ctx.ceil.update(http_cpu=cpu, http_rate=n / d["wall"], http_p50=pct(lat[lat_n0:], 50))
            r = ctx.results
            r.add("ceilings", "http", "cpu_per_request", cpu, "s", "bare pywsgi: server CPU per request", meter=d,
                  note=f"{conns} kept-alive conns, TCP_NODELAY")
            r.add("ceilings", "http", "rate", n / d["wall"], "/s", "bare pywsgi: requests/s", meter=d, lower_is_better=False)
            r.add("ceilings", "http", "latency_p50", ctx.ceil["http_p50"], "s", f"bare pywsgi: round trip p50, {conns} conns",
                  meter=d)
            r.add("ceilings", "http", "rtt1_p50", ctx.ceil["http_rtt1"], "s", "bare pywsgi: round trip p50, 1 conn")
        finally:
            srv.stop()
    if "ws" in transports:
        srv = Child("ceiling-ws", [sys.executable, os.path.join(HERE, "ceiling.py"), "ws"], ctx.server_cpu,
                    os.path.join(ctx.work, "ceiling-ws.log"))
        try:
            addr = ("127.0.0.1", srv.port)
            stop = [False]
            count = [0]
            lat: list[float] = []
            frame = ws_frame(ECHO_MSG)

            one = WsClient(addr, DOMAIN, path="/", subprotocol=None)
            got = gevent.event.Event()
            one.handler = lambda c, text: got.set()
            one.connect()
            rtt = []
            for _ in range(300):
                got.clear()
                t0 = time.perf_counter()
                one.sock.sendall(frame)
                got.wait(5)
                rtt.append(time.perf_counter() - t0)
            one.drop()
            ctx.ceil["ws_rtt1"] = pct(rtt[50:], 50)
            # The loaded phase: the tightest loop we can write (the echo frame has a known size), so that
            # the generator is not what limits a bare echo that costs the server only ~20-35 µs.
            reply_len = 2 + len(ECHO_MSG.encode())
            socks = []
            for _ in range(conns):
                c = WsClient(addr, DOMAIN, path="/", subprotocol=None)
                c.connect()
                c.reader.kill()  # this loop reads the socket itself
                socks.append(c)

            def echo_loop(c):
                sock = c.sock
                sendall, recv = sock.sendall, sock.recv
                while not stop[0]:
                    t0 = time.perf_counter()
                    sendall(frame)
                    got = 0
                    while got < reply_len:
                        chunk = recv(65536)
                        if not chunk:
                            return
                        got += len(chunk)
                    count[0] += 1
                    if count[0] % 16 == 0:
                        lat.append(time.perf_counter() - t0)

            workers = [gevent.spawn(echo_loop, c) for c in socks]
            gevent.sleep(min(1.0, seconds / 2))
            n0, lat_n0 = count[0], len(lat)
            ctx.spy_start(srv.pid, "ceiling-ws")
            m = Meter(ctx, srv.pid, ops=lambda: count[0])
            gevent.sleep(seconds)
            d = m.stop()
            n = count[0] - n0
            ctx.spy_stop()
            stop[0] = True
            gevent.joinall(workers, timeout=2)
            for c in socks:
                c.drop()
            cpu = d["cpu_per_op"]
            ctx.ceil_probe["ws"] = d["probe"]
            ctx.ceil.update(ws_cpu=cpu, ws_rate=n / d["wall"], ws_p50=pct(lat[lat_n0:], 50))
            r = ctx.results
            r.add("ceilings", "ws", "cpu_per_message", cpu, "s", "bare ws echo: server CPU per message", meter=d,
                  note=f"{conns} sockets, {len(ECHO_MSG)} B messages")
            r.add("ceilings", "ws", "rate", n / d["wall"], "/s", "bare ws echo: messages/s", meter=d, lower_is_better=False)
            r.add("ceilings", "ws", "latency_p50", ctx.ceil["ws_p50"], "s", f"bare ws echo: round trip p50, {conns} sockets",
                  meter=d)
            r.add("ceilings", "ws", "rtt1_p50", ctx.ceil["ws_rtt1"], "s", "bare ws echo: round trip p50, 1 socket")
        finally:
            srv.stop()


def wl_ceiling_idle(ctx: Ctx, transports) -> None:
    """Idle connections on the bare servers: RSS and CPU per connection (the idle ceiling)."""
    p = ctx.p
    n = p["idle_stages"][-1]
    wait = p["idle_wait"]
    for transport in transports:
        mode = "http" if transport == "bosh" else "ws"
        srv = Child(f"ceiling-{mode}", [sys.executable, os.path.join(HERE, "ceiling.py"), mode], ctx.server_cpu,
                    os.path.join(ctx.work, f"ceiling-idle-{mode}.log"))
        conns: list = []
        stop = [False]
        polls = [0]
        try:
            addr = ("127.0.0.1", srv.port)
            gevent.sleep(0.3)
            base = proc_rss_kib(srv.pid)
            hold = f"POST /hold?s={wait - min(1.0, wait * 0.1)} HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: ".encode()

            def poller(c):
                while not stop[0]:
                    try:
                        c.request(TINY_POST, prefix=hold)
                    except Exception:  # noqa: BLE001
                        return
                    polls[0] += 1

            def connect(_):
                if mode == "http":
                    c = HttpConn(addr, path="/hold")
                    conns.append(c)
                    gevent.spawn(poller, c)
                else:
                    c = WsClient(addr, DOMAIN, path="/", subprotocol=None)
                    c.connect()
                    conns.append(c)

            run_pool(100, range(n), connect)
            gevent.sleep(p["idle_settle"])
            rss = proc_rss_kib(srv.pid)
            polls0 = polls[0]
            m = Meter(ctx, srv.pid)
            gevent.sleep(p["idle_window"])
            d = m.stop()
            per_conn = (rss - base) / n
            ctx.ceil[f"{mode}_idle_rss"] = per_conn
            ctx.ceil[f"{mode}_idle_cpu"] = d["server_share"]
            ctx.ceil_probe[f"{mode}_idle"] = d["probe"]
            label = "bare pywsgi: parked request" if mode == "http" else "bare ws echo: open socket"
            ctx.results.add("ceilings", mode, "idle_rss_per_conn", per_conn, "KiB", f"{label}, RSS per conn", meter=d,
                            note=f"{n} conns")
            ctx.results.add("ceilings", mode, "idle_cpu", d["server_share"], "%core", f"{label}, CPU while idle",
                            meter=d, note=(f"re-poll every {wait}s: {polls[0] - polls0} polls" if mode == "http" else ""))
        finally:
            stop[0] = True
            for c in conns:
                if isinstance(c, HttpConn):
                    c.close()
                else:
                    c.drop()
            srv.stop()


# -- 1 login ---------------------------------------------------------------------------------------

def wl_login(ctx: Ctx, transport: str) -> None:
    p = ctx.p
    r = ctx.results
    names = [f"l{i}" for i in range(p["login_warm"] + p["login_seq"] + p["login_conc"] + p["login_plain"])]
    warm = names[:p["login_warm"]]
    seq = names[p["login_warm"]:p["login_warm"] + p["login_seq"]]
    conc = names[p["login_warm"] + p["login_seq"]:p["login_warm"] + p["login_seq"] + p["login_conc"]]
    plain = names[p["login_warm"] + p["login_seq"] + p["login_conc"]:]
    items_seen: list[int] = []
    logged_in = [0]
    ceil_cpu = ctx.ceil.get("http_cpu" if transport == "bosh" else "ws_cpu")
    ceil_p50 = ctx.ceil.get("http_rtt1" if transport == "bosh" else "ws_rtt1")
    ceil_rate = ctx.ceil.get("http_rate" if transport == "bosh" else "ws_rate")
    what = "bare requests" if transport == "bosh" else "bare echo msgs"

    def one(user, mechanism="SCRAM-SHA-1"):
        c = make_client(ctx, transport)
        clients.append(c)
        t0 = time.perf_counter()
        items = login(c, user, PASSWORD, ctx.scram, mechanism)
        dt = time.perf_counter() - t0
        c.start(poll=True)
        items_seen.append(items)
        logged_in[0] += 1
        return dt

    with ctx.serving() as (srv, clients):
        for u in warm:
            one(u)
        gevent.sleep(0.2)
        for phase, users, conc_n, mech in (("sequential", seq, 1, "SCRAM-SHA-1"), ("20 concurrent", conc, 20, "SCRAM-SHA-1"),
                                           ("20 concurrent PLAIN", plain, 20, "PLAIN")):
            if not users:
                continue
            tag = {"sequential": "seq", "20 concurrent": "conc", "20 concurrent PLAIN": "plain"}[phase]
            ctx.spy_start(srv.pid, f"login-{tag}-{transport}")
            m = Meter(ctx, srv.pid, ops=lambda: logged_in[0], window=0.1)
            if conc_n == 1:
                lat = [one(u, mech) for u in users]
            else:
                lat = run_pool(conc_n, users, lambda u, mech=mech: one(u, mech))
            d = m.stop()
            ctx.spy_stop()
            n = len(users)
            cpu = d["cpu_per_op"]
            note = f"{n} logins, {mech}"
            r.add("login", transport, "cpu_per_login" if tag != "plain" else "cpu_per_login_plain", cpu, "s",
                  f"{phase}: server CPU per login", ceiling=(ceil_cpu or 0) or None, ceiling_label=what, meter=d, note=note,
                  ceiling_probe=ctx.ceil_probe.get("http" if transport == "bosh" else "ws"),
                  extra={"phase": tag})
            if tag == "plain":
                continue
            r.add("login", transport, f"{tag}_p50", pct(lat, 50), "s", f"{phase}: latency p50", ceiling=ceil_p50, meter=d)
            r.add("login", transport, f"{tag}_p95", pct(lat, 95), "s", f"{phase}: latency p95", ceiling=ceil_p50, meter=d)
            r.add("login", transport, f"{tag}_p99", pct(lat, 99), "s", f"{phase}: latency p99", ceiling=ceil_p50, meter=d)
            r.add("login", transport, f"{tag}_rate", n / d["wall"], "/s", f"{phase}: logins/s", ceiling=ceil_rate,
                  meter=d, lower_is_better=False)
            r.add("login", transport, f"{tag}_gets_per_login", d["backend_gets"] / n, "", f"{phase}: backend GETs per login",
                  meter=d, note=f"roster items {min(items_seen)}..{max(items_seen)}")


# -- 2 idle ---------------------------------------------------------------------------------------

def _ping(c, i: int) -> bool:
    c.buf = ""
    c.send(f"<iq xmlns='jabber:client' type='get' id='ping{i}'><ping xmlns='urn:xmpp:ping'/></iq>")
    try:
        c.expect(re.compile(r'<iq\b[^>]*\bid="ping%d"' % i), timeout=60)
    except BenchError:
        return False
    return True


def wl_idle(ctx: Ctx, transport: str) -> None:
    p = ctx.p
    wait = p["idle_wait"]
    srv = ctx.start_server(bosh_max_wait=max(wait, 1))
    r = ctx.results
    clients: list = []
    mode = "http" if transport == "bosh" else "ws"
    try:
        # warm-up: a few sessions in and out, so lazily imported code is in the baseline
        warm = [make_client(ctx, transport, wait) for _ in range(10)]
        for i, c in enumerate(warm):
            login(c, f"u{p['ring'] - 1 - i}", PASSWORD, ctx.scram)
        close_all(warm)
        gevent.sleep(1.0)
        gc.collect()
        base = proc_rss_kib(srv.pid)
        made = 0
        ping_round = 0
        for stage in p["idle_stages"]:
            def one(i):
                c = make_client(ctx, transport, wait)
                login(c, f"u{i}", PASSWORD, ctx.scram)
                if transport == "bosh":
                    c.single_conn = True
                c.start(poll=True)
                clients.append(c)

            m = Meter(ctx, srv.pid)
            run_pool(50, range(made, stage), one)
            d = m.stop()
            added = stage - made
            made = stage
            r.add("idle", transport, f"login_rate_{stage}", added / d["wall"], "/s", f"{stage}: logins/s to reach it",
                  meter=d, lower_is_better=False, note=f"50 concurrent; server CPU {d['server_cpu'] / added * 1e3:.2f} ms/login incl. re-polls of those already idle")
            gevent.sleep(p["idle_settle"])
            rss = proc_rss_kib(srv.pid)
            polls0 = sum(c.requests_done for c in clients) if transport == "bosh" else 0
            ctx.spy_start(srv.pid, f"idle-{stage}-{transport}")
            m = Meter(ctx, srv.pid)
            gevent.sleep(p["idle_window"])
            d = m.stop()
            ctx.spy_stop()
            polls = (sum(c.requests_done for c in clients) - polls0) if transport == "bosh" else 0
            per = (rss - base) / stage
            r.add("idle", transport, "rss_per_session" if stage == p["idle_stages"][-1] else f"rss_per_session_{stage}",
                  per, "KiB", f"{stage}: RSS per session", ceiling=ctx.ceil.get(f"{mode}_idle_rss"), meter=d,
                  note=f"RSS {rss / 1024:.0f} MiB, base {base / 1024:.0f} MiB", extra={"sessions": stage})
            ceil_idle = ctx.ceil.get(f"{mode}_idle_cpu")
            # the bare echo's idle sockets cost ~nothing: no ratio to a zero
            ceil_scaled = ceil_idle * stage / p["idle_stages"][-1] if ceil_idle and ceil_idle > 0.002 else None
            note = f"window {p['idle_window']:.0f}s"
            if transport == "bosh":
                note += f", wait={wait}s, {polls} re-polls"
                if polls:
                    note += f" ({d['server_cpu'] / polls * 1e6:.0f} µs each)"
            r.add("idle", transport, f"idle_cpu_{stage}", d["server_share"], "%core", f"{stage}: server CPU while idle",
                  ceiling=ceil_scaled, meter=d, note=note, ceiling_probe=ctx.ceil_probe.get(f"{mode}_idle"))
            t0 = time.perf_counter()
            ping_round += 1
            base_id = ping_round * 1_000_000
            ok = run_pool(200, range(len(clients)), lambda i: _ping(clients[i], base_id + i))
            took = time.perf_counter() - t0
            dead = sum(1 for c in clients if c.closed)
            r.add("idle", transport, f"ping_ok_{stage}", sum(ok), "", f"{stage}: sessions answering a ping",
                  lower_is_better=False, note=f"of {stage}; {dead} closed; pinged all in {took:.1f}s")
    finally:
        for c in clients:
            c.drop()
        ctx.stop_server()


# -- 3 messages ------------------------------------------------------------------------------------

RE_BODY = re.compile(r"<body>(\d+) (\d+) ([\d.]+)</body>")


def wl_messages(ctx: Ctx, transport: str) -> None:
    p = ctx.p
    r = ctx.results
    pairs, window = p["pairs"], p["window"]
    n_clients = 2 * pairs
    with ctx.serving() as (srv, clients):
        def one(i):
            c = make_client(ctx, transport)
            login(c, f"u{i}", PASSWORD, ctx.scram)
            c.start(poll=True)
            return c

        clients.extend(run_pool(20, range(n_clients), one))
        gevent.sleep(0.5)
        state = {"received": 0, "target": 0, "dups": 0, "total": 0}
        lat: list[float] = []
        done = gevent.event.Event()
        sems = [gevent.lock.Semaphore(window) for _ in range(n_clients)]
        seen = [bytearray() for _ in range(n_clients)]

        def on_text(c, text):
            now = time.perf_counter()
            got = 0
            for m in RE_BODY.finditer(text):
                sender, seq, ts = int(m.group(1)), int(m.group(2)), float(m.group(3))
                s = seen[sender]
                if seq >= len(s):
                    s.extend(b"\0" * (seq + 1 - len(s)))
                if s[seq]:
                    state["dups"] += 1
                    continue
                s[seq] = 1
                lat.append(now - ts)
                sems[sender].release()
                got += 1
            if got:
                state["received"] += got
                state["total"] += got
                if state["received"] >= state["target"]:
                    done.set()

        for c in clients:
            c.buf = ""
            c.handler = on_text

        def sender(i, start, count):
            c = clients[i]
            peer = f"u{i ^ 1}@{DOMAIN}"
            sem = sems[i]
            for seq in range(start, start + count):
                sem.acquire()
                c.send(f"<message xmlns='jabber:client' to='{peer}' type='chat' id='m{seq}'>"
                       f"<body>{i} {seq} {time.perf_counter():.6f}</body></message>")

        def round_(start, per_client):
            state["received"] = 0
            state["target"] = per_client * n_clients
            done.clear()
            del lat[:]
            t0 = time.perf_counter()
            senders = [gevent.spawn(sender, i, start, per_client) for i in range(n_clients)]
            done.wait(timeout=max(60.0, per_client * n_clients / 200))
            gevent.joinall(senders, timeout=1)
            return time.perf_counter() - t0

        warm_each = max(1, p["messages_warm"] // n_clients)
        round_(0, warm_each)
        per_client = p["messages"] // n_clients
        ctx.spy_start(srv.pid, f"messages-{transport}")
        m = Meter(ctx, srv.pid, ops=lambda: state["total"])
        elapsed = round_(warm_each, per_client)
        d = m.stop()
        ctx.spy_stop()
        gevent.sleep(0.5)  # late or duplicate deliveries would show up now
        sent = per_client * n_clients
        got = state["received"]
        lost = sent - got
        cpu1000 = d["cpu_per_op"] * 1000 if got else None
        is_bosh = transport == "bosh"
        ceil_cpu = ctx.ceil.get("http_cpu" if is_bosh else "ws_cpu")
        ceil_rate = ctx.ceil.get("http_rate" if is_bosh else "ws_rate")
        ceil_p50 = ctx.ceil.get("http_rtt1" if is_bosh else "ws_rtt1")
        reqs = ""
        if is_bosh:
            reqs = f", {sum(c.requests_done for c in clients)} HTTP requests in all"
        r.add("messages", transport, "cpu_per_1000", cpu1000, "s", "server CPU per 1,000 messages",
              ceiling=ceil_cpu * 1000 if ceil_cpu else None, ceiling_probe=ctx.ceil_probe.get("http" if is_bosh else "ws"),
              ceiling_label="1,000 bare requests" if is_bosh else "1,000 bare echo msgs", meter=d,
              note=f"{got} delivered, {pairs} pairs, window {window}/sender{reqs}")
        r.add("messages", transport, "delivered_rate", got / elapsed, "/s", "delivered messages/s", ceiling=ceil_rate,
              meter=d, lower_is_better=False)
        r.add("messages", transport, "latency_p50", pct(lat, 50), "s", "latency p50", ceiling=ceil_p50, meter=d)
        r.add("messages", transport, "latency_p99", pct(lat, 99), "s", "latency p99", ceiling=ceil_p50, meter=d)
        r.add("messages", transport, "lost", lost, "", "lost (must be 0)", meter=d,
              note=f"duplicates {state['dups']}; sessions closed {sum(1 for c in clients if c.closed)}")


# -- 4 refresh -------------------------------------------------------------------------------------

RE_PUSH = re.compile(r'<iq\b[^>]*?\bid="([^"]+)"[^>]*><query xmlns="jabber:iq:roster"')


def wl_refresh(ctx: Ctx, transport: str) -> None:
    p = ctx.p
    r = ctx.results
    n = p["refresh_users"]
    names = [f"u{i}" for i in range(n)]
    refresh_prefix = ("POST /roster_admin/refresh HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      "Content-Type: application/json\r\nContent-Length: ").encode()
    with ctx.serving() as (srv, clients):
        def one(i):
            c = make_client(ctx, transport)
            login(c, names[i], PASSWORD, ctx.scram)
            c.start(poll=True)
            c.data["pushes"] = 0
            return c

        clients.extend(run_pool(20, range(n), one))
        gevent.sleep(0.5)
        state = {"pushes": 0, "target": 0, "last": 0.0}
        done = gevent.event.Event()

        def on_text(c, text):
            ids = RE_PUSH.findall(text)
            if not ids:
                return
            c.data["pushes"] += len(ids)
            for push_id in ids:
                c.send(f"<iq xmlns='jabber:client' type='result' id='{push_id}'/>")
            state["pushes"] += len(ids)
            state["last"] = time.perf_counter()
            if state["pushes"] >= state["target"]:
                done.set()

        for c in clients:
            c.buf = ""
            c.handler = on_text

        def refresh(conn, users):
            return json.loads(conn.request(json.dumps(users).encode(), prefix=refresh_prefix))

        # one POST naming all n, repeated (median): the backend changes all n rosters before each
        conn = HttpConn(("127.0.0.1", srv.port))
        reps = []
        for rep in range(p["refresh_reps"]):
            ctx.bump(names)
            before = {c.user: c.data["pushes"] for c in clients}
            state["target"] = state["pushes"] + n
            done.clear()
            if rep == 0:
                ctx.spy_start(srv.pid, f"refresh-{transport}")
            m = Meter(ctx, srv.pid)
            t0 = time.perf_counter()
            reply = refresh(conn, names)
            t_reply = time.perf_counter() - t0
            done.wait(timeout=60)
            t_all = state["last"] - t0
            d = m.stop()
            if rep == 0:
                ctx.spy_stop()
            missing = sum(1 for c in clients if c.data["pushes"] - before[c.user] < 1)
            reps.append({"reply": t_reply, "all": t_all, "d": d, "missing": missing, "answer": reply})
            gevent.sleep(0.2)
        med = lambda key: statistics.median(x[key] for x in reps)  # noqa: E731
        d = dict(reps[-1]["d"])
        d["server_cpu"] = statistics.median(x["d"]["server_cpu"] for x in reps)
        d["backend_gets"] = statistics.median(x["d"]["backend_gets"] for x in reps)
        if all(x["d"].get("probe") for x in reps):
            d["probe"] = d["server_cpu"] / statistics.median(x["d"]["server_cpu"] / x["d"]["probe"] for x in reps)
        answers = "; ".join(f"updated={x['answer'].get('updated')} errors={x['answer'].get('errors')}" for x in reps)
        k = len(reps)
        r.add("refresh", transport, "reply_time", med("reply"), "s", f"one POST of {n}: time to reply", meter=d,
              note=f"median of {k}; {answers}")
        r.add("refresh", transport, "all_pushed_time", med("all"), "s", f"one POST of {n}: until every push arrived",
              meter=d, note=f"median of {k}; users without their push: {sum(x['missing'] for x in reps)}")
        r.add("refresh", transport, "backend_gets", d["backend_gets"], "", f"one POST of {n}: backend GETs", meter=d,
              note=f"median of {k}")
        r.add("refresh", transport, "server_cpu", d["server_cpu"], "s", f"one POST of {n}: server CPU", meter=d,
              note=f"median of {k}")

        # n_single POSTs of one user each, at concurrency c; the backend changes before each
        singles = [names[i % n] for i in range(p["refresh_singles"])]
        conc = p["refresh_conc"]
        conns = [HttpConn(("127.0.0.1", srv.port)) for _ in range(conc)]
        bconns = [HttpConn(("127.0.0.1", ctx.backend.port), path="/_ctl/bump", content_type="application/json")
                  for _ in range(conc)]
        free = list(range(conc))
        lat: list[float] = []
        state["target"] = state["pushes"] + len(singles)
        done.clear()

        def single(user):
            k = free.pop()
            try:
                ctx.bump([user], bconns[k])
                t = time.perf_counter()
                refresh(conns[k], [user])
                lat.append(time.perf_counter() - t)
            finally:
                free.append(k)

        m = Meter(ctx, srv.pid, ops=lambda: len(lat))
        t0 = time.perf_counter()
        run_pool(conc, singles, single)
        done.wait(timeout=60)
        t_all = time.perf_counter() - t0
        d = m.stop()
        got = state["pushes"] - (state["target"] - len(singles))
        r.add("refresh", transport, "single_total_time", t_all, "s", f"{len(singles)} single POSTs (conc {conc}): total",
              meter=d, note=f"{got}/{len(singles)} pushes")
        r.add("refresh", transport, "single_p50", pct(lat, 50), "s", f"{len(singles)} single POSTs: reply p50", meter=d)
        r.add("refresh", transport, "single_p99", pct(lat, 99), "s", f"{len(singles)} single POSTs: reply p99", meter=d)
        r.add("refresh", transport, "single_backend_gets", d["backend_gets"], "", f"{len(singles)} single POSTs: backend GETs",
              meter=d)
        r.add("refresh", transport, "single_cpu_per_post", d["cpu_per_op"], "s",
              f"{len(singles)} single POSTs: server CPU per POST", meter=d)

        # overlap: 3 POSTs for the same user at once, right after one change (single flight)
        state["target"] = state["pushes"] + n
        done.clear()
        before = {c.user: c.data["pushes"] for c in clients}

        def triple(user):
            k = free.pop()
            try:
                ctx.bump([user], bconns[k])
                extra = [HttpConn(("127.0.0.1", srv.port)) for _ in range(2)]
                jobs = [gevent.spawn(refresh, cn, [user]) for cn in (conns[k], *extra)]
                gevent.joinall(jobs, raise_error=True)
                for cn in extra:
                    cn.close()
            finally:
                free.append(k)

        m = Meter(ctx, srv.pid)
        run_pool(conc, names, triple)
        done.wait(timeout=30)
        gevent.sleep(0.3)
        d = m.stop()
        pushes = {c.user: c.data["pushes"] - before[c.user] for c in clients}
        wrong = sum(1 for v in pushes.values() if v != 1)
        r.add("refresh", transport, "overlap_backend_gets", d["backend_gets"], "",
              f"{n}x3 overlapping POSTs: backend GETs", meter=d,
              note=f"{sum(pushes.values())} pushes; users without exactly 1: {wrong}")
        for cn in conns + bconns:
            cn.close()
        conn.close()


# -- 5 presence ------------------------------------------------------------------------------------

RE_STATUS = re.compile(r"<status>r(\d+)</status>")


def wl_presence(ctx: Ctx, transport: str) -> None:
    p = ctx.p
    r = ctx.results
    hub = p["hub"]
    with ctx.serving() as (srv, clients):
        def one(i):
            c = make_client(ctx, transport)
            login(c, f"h{i}", PASSWORD, ctx.scram)
            c.start(poll=True)
            return c

        contacts = run_pool(20, range(1, hub + 1), one)
        h0 = one(0)
        clients.extend(contacts + [h0])
        gevent.sleep(0.5)
        state = {"round": -1, "count": 0, "last": 0.0}
        done = gevent.event.Event()

        def on_text(c, text):
            for m in RE_STATUS.finditer(text):
                if int(m.group(1)) == state["round"]:
                    state["count"] += 1
                    state["last"] = time.perf_counter()
                    if state["count"] >= hub:
                        done.set()

        for c in contacts:
            c.buf = ""
            c.handler = on_text
        h0.handler = lambda c, text: None
        shows = ("away", "chat", "dnd", "xa")

        def fanout(k):
            state["round"], state["count"] = k, 0
            done.clear()
            t0 = time.perf_counter()
            h0.send(f"<presence xmlns='jabber:client'><show>{shows[k % 4]}</show><status>r{k}</status></presence>")
            if not done.wait(timeout=10):
                raise BenchError(f"round {k}: only {state['count']}/{hub} contacts got the presence")
            gevent.sleep(0.03)  # BOSH contacts re-park; counted in the CPU, not in the time
            return state["last"] - t0

        for k in range(3):
            fanout(k)
        rounds = p["presence_rounds"]
        ctx.spy_start(srv.pid, f"presence-{transport}")
        times: list[float] = []
        m = Meter(ctx, srv.pid, ops=lambda: len(times), window=1.0)
        for k in range(3, 3 + rounds):
            times.append(fanout(k))
        d = m.stop()
        ctx.spy_stop()
        is_bosh = transport == "bosh"
        ceil_cpu = ctx.ceil.get("http_cpu" if is_bosh else "ws_cpu")
        r.add("presence", transport, "cpu_per_fanout", d["cpu_per_op"], "s",
              f"fan-out to {hub}: server CPU", ceiling=ceil_cpu * hub if ceil_cpu else None, meter=d,
              ceiling_probe=ctx.ceil_probe.get("http" if is_bosh else "ws"),
              ceiling_label=f"{hub} bare requests" if is_bosh else f"{hub} bare echo msgs", note=f"{rounds} rounds")
        r.add("presence", transport, "time_p50", pct(times, 50), "s", f"fan-out to {hub}: until all received, p50", meter=d)
        r.add("presence", transport, "time_max", max(times), "s", f"fan-out to {hub}: until all received, max", meter=d)


# -- table, compare ------------------------------------------------------------------------------------

def print_table(rows: list[dict], meta: dict) -> None:
    print()
    print(f"boshroster bench {meta['started']} on {meta['machine']} ({meta['profile']}, git {meta['git']})")
    head = f"{'workload':<9} {'tr':<5} {'figure':<38} {'value':>16}  {'vs ceiling':>13}  {'vs reference':>12}  gen CPU"
    print(head)
    print("-" * len(head))
    for row in rows:
        print(format_row(row))
    print()
    print("vs ceiling: value / the same figure on the bare gevent server (pywsgi for BOSH, gevent-websocket echo for"
          " WebSocket);\nvs reference: value / Prosody 0.12 (issue 5); gen CPU: the load generator's share of one core"
          " (GEN-BOUND: > 85%,\nthe figure is a floor); others: CPU used by processes not ours (noise).\n"
          "Server CPU figures are at the CPU's undisturbed speed: raw CPU divided by how much slower a fixed probe loop"
          " ran on\nthe server's CPU during the same interval than its 5th percentile over the run"
          f" ({(meta.get('probe_baseline') or 0) * 1e3:.2f} ms); the raw figure is shown too.")
    targets = [row for row in rows if row.get("ceiling_target") and row.get("ratio_ceiling") is not None]
    for row in targets:
        ok = row["ratio_ceiling"] <= row["ceiling_target"]
        print(f"target {row['workload']}/{row['transport']} {row['metric']}: {row['ratio_ceiling']:.2f}x ceiling "
              f"(target <= {row['ceiling_target']}x): {'met' if ok else 'MISSED'}")
    missed = [row for row in rows if row.get("ratio_reference") is not None and row["lower_is_better"]
              and row["ratio_reference"] > 1.0]
    for row in missed:
        print(f"reference MISSED: {row['workload']}/{row['transport']} {row['label']}: {row['ratio_reference']:.2f}x Prosody")


def compare(paths: list[str]) -> int:
    figures: dict[tuple, list] = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("type") != "figure" or row.get("value") is None:
                    continue
                figures.setdefault((row["workload"], row["transport"], row["metric"], row["label"], row["unit"]),
                                   []).append(row["value"])
    print(f"{len(paths)} runs: median, and the largest deviation from it (CPU-per-operation figures marked *)")
    worst = 0.0
    for (wl, tr, metric, label, unit), values in figures.items():
        med = statistics.median(values)
        dev = max(abs(v - med) for v in values) / abs(med) if med else 0.0
        cpu_op = unit == "s" and ("cpu" in metric)
        if cpu_op:
            worst = max(worst, dev)
        vals = ", ".join(fmt_value(v, unit) for v in values)
        print(f"{'*' if cpu_op else ' '} {wl:<9} {tr:<5} {label:<44} median {fmt_value(med, unit):>14}  ±{dev * 100:5.1f}%  [{vals}]")
    print(f"largest deviation of a CPU-per-operation figure from its median: ±{worst * 100:.1f}%")
    return 0


# -- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts (under 2 minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated workloads of {', '.join(WORKLOADS)}"
                                                " (the ceilings always run, briefly, for the ratios)")
    ap.add_argument("--transport", default="bosh,ws", help="bosh, ws or bosh,ws (default)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and generator to separate CPUs")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"), help="folder for the JSON lines")
    ap.add_argument("--profile", metavar="DIR", default="",
                    help="record each measured phase with py-spy (raw collapsed stacks in DIR) and print top functions")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a count of the profile, e.g. --set messages=150000 (see PROFILES in bench/run.py)")
    ap.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra boshroster config for experiments, e.g. --server-set websocket_ping_interval=0 (TOML/JSON value)")
    ap.add_argument("--compare", nargs="+", metavar="FILE", help="print the spread of several .jsonl results and exit")
    args = ap.parse_args()
    if args.compare:
        return compare(args.compare)
    only = [w.strip() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    for w in only:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    for t in transports:
        if t not in TRANSPORTS:
            ap.error(f"unknown transport {t!r}")
    if args.profile:
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(spy):
            ap.error("--profile needs py-spy (pip install py-spy)")
        args.py_spy = spy
    args.server_settings = {}
    for item in args.server_set:
        key, _, value = item.partition("=")
        try:
            args.server_settings[key] = json.loads(value)
        except ValueError:
            args.server_settings[key] = value
    raise_nofile()
    # SIGTERM/SIGINT: stop our children (by PID) on the way out, like a normal end
    gevent.signal_handler(signal.SIGTERM, gevent.getcurrent().throw, KeyboardInterrupt)
    prof = dict(PROFILES["quick" if args.quick else "default"])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in prof:
            ap.error(f"--set: unknown key {key!r}; one of {', '.join(prof)}")
        prof[key] = json.loads(value) if not isinstance(prof[key], str) else value
    ctx = Ctx(args, prof)
    started = datetime.datetime.now()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "boshroster"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    meta = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} CPU {cpu_model}, {platform.system()} {platform.release()}, Python {platform.python_version()}",
        "profile": "quick" if args.quick else "default", "git": git + ("+dirty" if dirty else ""),
        "only": only, "transports": transports, "server_settings": args.server_settings, "server_patch": os.environ.get("BENCH_SERVER_PATCH", ""), "pinned": ctx.pin, "sasl": "SCRAM-SHA-1 (client keys cached); PLAIN row separate",
        "settings": prof,
    }
    path = os.path.join(args.out, started.strftime("%Y%m%d-%H%M%S") + ".jsonl")
    t_start = time.perf_counter()
    try:
        ctx.prepare_users()
        if ctx.pin:
            os.sched_setaffinity(0, {ctx.gen_cpu})
        ctx.results = Results(path, meta)
        ctx.start_backend()
        ctx.start_probe()
        gevent.sleep(1.0)  # a few probe samples before the first measurement
        print(f"bench: server on CPU {ctx.server_cpu}, generator+backend on CPU {ctx.gen_cpu}" if ctx.pin
              else "bench: not pinned", flush=True)
        print("== ceilings", flush=True)
        wl_ceilings(ctx, transports)
        if "idle" in only:
            wl_ceiling_idle(ctx, transports)
        for w in only:
            if w == "ceilings":
                continue
            fn = globals()[f"wl_{w}"]
            for t in transports:
                print(f"== {w} / {t}", flush=True)
                t0 = time.perf_counter()
                try:
                    fn(ctx, t)
                except Exception as exc:  # noqa: BLE001 - one broken workload must not hide the others
                    print(f"  {w}/{t} FAILED: {exc!r}", flush=True)
                    ctx.results._write({"type": "error", "workload": w, "transport": t, "error": repr(exc)})
                print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        baseline = ctx.probe_baseline()
        ctx.close()
        if ctx.results is not None:
            ctx.results.finalize(baseline)
            ctx.results.close()
    meta["probe_baseline"] = baseline
    print_table(ctx.results.rows, meta)
    print(f"\nresults: {os.path.relpath(path, ROOT)}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)

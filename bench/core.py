"""Shared pieces of the bench: /proc readings, child processes, the CPU meter, pools of clients.

Imported by bench/run.py (the runner) and every workload module (bench/workloads/); the
runner monkey-patches with gevent before importing anything here.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import statistics
import subprocess
import time

import gevent
import gevent.pool

from clients import BenchError, BoshClient, WsClient

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PASSWORD = "password"
DOMAIN = "localhost"
TRANSPORTS = ("bosh", "ws")

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
            deadline = time.monotonic() + 90  # slow under tracemalloc (BENCH_SERVER_PATCH) on a busy machine
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
        self.stats0 = ctx.backend_stats() if ctx.backend else {}
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
        }
        stats = self.ctx.backend_stats() if self.ctx.backend else {}
        for key in ("gets", "conditional", "not_modified", "connections"):
            # what the roster backend saw meanwhile: GETs, conditional ones, 304s, new TCP connections
            d[f"backend_{key}"] = stats.get(key, 0) - self.stats0.get(key, 0)
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


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("BOSHROSTER_")}


def make_client(ctx, transport: str, wait: int = 60):
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



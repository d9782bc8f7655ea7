"""ejabberd 23.01 (Debian) as a peer measured in the same run (``scripts/bench --peer ejabberd``).

The private-instance starter is the one in ``--peer-dir`` (default ``$BENCH_EJABBERD_DIR`` or
``/work/shared/peers/ejabberd``; its README explains it): ``start.sh`` writes the config, boots a
node named after its run dir, on loopback only, with ``--bosh-fix`` (stock 23.01 BOSH stalls when a
client's two requests arrive out of order; the starter compiles its patched ``ejabberd_bosh.erl``),
and ``stop.sh`` stops it by PID.  The bench does the rest:

* installs the Debian package if it is missing (as root: ``apt-get update`` once, then
  ``apt-get install ejabberd``, with a ``policy-rc.d`` that keeps the system service from starting);
* starts the node afresh for every workload and transport (boshroster is restarted the same way),
  pinned to the server's CPU with one Erlang scheduler (``--peer-schedulers``), so its CPU per
  operation compares with one boshroster process on the same core;
* loads the same users and rosters straight into Mnesia over Erlang distribution: the users'
  passwd records carry the SCRAM-SHA-1 salt, iteration count and keys of boshroster's accounts
  database (so the generator's cached client keys work for both servers, and a SCRAM login costs
  ejabberd no PBKDF2, as it costs boshroster none), the rosters are the bench backend's
  (``u<i>``: 20 ring neighbours, ``l<i>``: 20 ``u`` contacts, ``h0``: ``h1..h100``), subscription
  both.  ejabberd keeps rosters itself (RAM tables): its logins make no backend GET, so its login
  figures are a floor for boshroster's, which fetches every roster over HTTP.

The run dir (Mnesia spool, logs) is ``bench-results/cache/ejabberd/``, kept between runs.
"""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import subprocess
import time

from core import DOMAIN, ROOT, free_port

NAME = "ejabberd"
DEFAULT_DIR = os.environ.get("BENCH_EJABBERD_DIR", "/work/shared/peers/ejabberd")
# What the peer cannot do: rosters delegated to a backend (so no refresh endpoint).
UNSUPPORTED = {"refresh": "ejabberd has no roster delegation (no refresh endpoint)"}

_LOADER = r"""
Node = list_to_atom(os:getenv("BENCH_NODE")),
D = list_to_binary(os:getenv("BENCH_DOMAIN")),
Ring = list_to_integer(os:getenv("BENCH_RING")),
Hub = list_to_integer(os:getenv("BENCH_HUB")),
NL = list_to_integer(os:getenv("BENCH_LOGIN_USERS")),
{ok, Users} = file:consult(os:getenv("BENCH_USERS_FILE")),
Write = fun(Rs) -> ok = rpc:call(Node, lists, foreach, [fun mnesia:dirty_write/1, Rs], 120000) end,
Chunks = fun C([]) -> ok; C(L) -> {H, T} = lists:split(min(5000, length(L)), L), Write(H), C(T) end,
Chunks([{passwd, {U, D}, {scram, Stored, Server, Salt, sha, It}} || {U, Stored, Server, Salt, It} <- Users]),
N = fun(P, I) -> <<P/binary, (integer_to_binary(I))/binary>> end,
Item = fun(O, C) -> {roster, {O, D, {C, D, <<>>}}, {O, D}, {C, D, <<>>}, <<"User ", C/binary>>,
                     both, none, [<<"Bench">>], <<>>, []} end,
Chunks([Item(N(<<"u">>, I), N(<<"u">>, (I + K + Ring) rem Ring))
        || I <- lists:seq(0, Ring - 1), K <- lists:seq(1, 10) ++ lists:seq(-10, -1)]),
Chunks([Item(N(<<"l">>, I), N(<<"u">>, (20 * I + K) rem Ring)) || I <- lists:seq(0, NL - 1), K <- lists:seq(0, 19)]),
Chunks([Item(<<"h0">>, N(<<"h">>, K)) || K <- lists:seq(1, Hub)] ++ [Item(N(<<"h">>, K), <<"h0">>) || K <- lists:seq(1, Hub)]),
io:format("loaded ~p users~n", [length(Users)]),
halt().
"""


class PeerServer:
    """What a workload sees of the running peer (like bench's Child: ``pid``, ``port``, ``tail``)."""

    def __init__(self, name: str, pid: int, port: int, log_path: str):
        self.name = name
        self.pid = pid
        self.port = port
        self.log_path = log_path

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


class EjabberdPeer:
    name = NAME

    def __init__(self, ctx, peer_dir: str, schedulers: int = 1):
        self.ctx = ctx
        self.peer_dir = os.path.abspath(peer_dir)
        self.schedulers = schedulers
        self.run_dir = os.path.join(ROOT, "bench-results", "cache", "ejabberd")
        self.users_file = os.path.join(self.run_dir, "users.terms")
        self.server: PeerServer | None = None
        self.version = ""

    # -- install -------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail early (before any measurement) if the peer cannot run; install the package if needed."""
        for script in ("start.sh", "stop.sh"):
            if not os.path.exists(os.path.join(self.peer_dir, script)):
                raise RuntimeError(f"--peer ejabberd: no {script} in {self.peer_dir} (see --peer-dir)")
        if not self._installed():
            self._install()
        self.version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "ejabberd"], capture_output=True,
                                      text=True).stdout.strip()
        if shutil.which("erl") is None or shutil.which("erlc") is None:
            raise RuntimeError("--peer ejabberd: erl/erlc missing (Debian package erlang-base)")

    @staticmethod
    def _installed() -> bool:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "ejabberd"], capture_output=True, text=True)
        return r.stdout.strip() == "install ok installed" and os.path.exists("/usr/sbin/ejabberdctl")

    @staticmethod
    def _install() -> None:
        if os.geteuid() != 0:
            raise RuntimeError("--peer ejabberd: the ejabberd package is not installed and installing it needs root "
                               "(apt-get install ejabberd)")
        print("peer: installing ejabberd (apt-get update, apt-get install ejabberd) ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        policy = "/usr/sbin/policy-rc.d"
        made_policy = not os.path.exists(policy)
        if made_policy:  # the package must not start the system-wide service (public ports)
            with open(policy, "w") as fh:
                fh.write("#!/bin/sh\nexit 101\n")
            os.chmod(policy, 0o755)
        try:
            for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "ejabberd"]):
                r = subprocess.run(argv, env=env, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"--peer ejabberd: {' '.join(argv)} failed:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
        finally:
            if made_policy:
                os.unlink(policy)
        if not EjabberdPeer._installed():
            raise RuntimeError("--peer ejabberd: still not installed after apt-get install")

    # -- users ---------------------------------------------------------------------------------
    def _write_users(self) -> None:
        """boshroster's SCRAM-SHA-1 credentials as Erlang terms for the loader (base64, as ejabberd stores them)."""
        db = os.path.join(self.ctx.cache_dir, "data", "accounts.sqlite3")
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT username, stored_key, server_key, salt, iterations FROM scram_credentials"
                               " WHERE mechanism = 'SCRAM-SHA-1'").fetchall()
        finally:
            con.close()
        b64 = lambda b: base64.b64encode(bytes(b)).decode()  # noqa: E731
        tmp = self.users_file + ".tmp"
        with open(tmp, "w") as fh:
            for user, stored, server, salt, iterations in rows:
                fh.write(f'{{<<"{user}">>, <<"{b64(stored)}">>, <<"{b64(server)}">>, <<"{b64(salt)}">>, {int(iterations)}}}.\n')
        os.replace(tmp, self.users_file)

    # -- one instance per workload -----------------------------------------------------------------
    def start(self) -> PeerServer:
        os.makedirs(self.run_dir, exist_ok=True)
        if not os.path.exists(self.users_file) or os.path.getmtime(self.users_file) < os.path.getmtime(
                os.path.join(self.ctx.cache_dir, "data", "accounts.sqlite3")):
            self._write_users()
        http, backend, dist = free_port(), free_port(), free_port()
        while len({http, backend, dist}) < 3:
            backend, dist = free_port(), free_port()
        argv = [os.path.join(self.peer_dir, "start.sh"), "--dir", self.run_dir, "--http-port", str(http),
                "--backend-port", str(backend), "--dist-port", str(dist), "--domain", DOMAIN, "--users", "0",
                "--bosh-fix", "--no-install", "--log-level", "error", "--schedulers", str(self.schedulers)]
        cpu = self.ctx.server_cpu

        def pre():
            if cpu is not None:  # beam.smp and its threads inherit it
                os.sched_setaffinity(0, {cpu})

        t0 = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pre, cwd=self.run_dir)
        if r.returncode != 0:
            raise RuntimeError(f"ejabberd did not start:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        with open(os.path.join(self.run_dir, "ejabberd.pid")) as fh:
            pid = int(fh.read().strip())
        node = ""
        with open(os.path.join(self.run_dir, "ejabberdctl.cfg")) as fh:
            for line in fh:
                if line.startswith("ERLANG_NODE="):
                    node = line.split("=", 1)[1].strip()
        self._load(node, dist)
        self.server = PeerServer(NAME, pid, http, os.path.join(self.run_dir, "logs", "ejabberd.log"))
        print(f"  (ejabberd {self.version} pid {pid}, port {http}; started and loaded in "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
        return self.server

    def _load(self, node: str, dist: int) -> None:
        p = self.ctx.p
        n_login = p["login_warm"] + p["login_seq"] + p["login_conc"] + p["login_plain"]
        env = dict(os.environ, HOME=self.run_dir, BENCH_NODE=node, BENCH_DOMAIN=DOMAIN, BENCH_RING=str(p["ring"]),
                   BENCH_HUB=str(p["hub"]), BENCH_LOGIN_USERS=str(n_login), BENCH_USERS_FILE=self.users_file)
        # a hidden client node; no epmd: the starter runs the distribution on a fixed port
        argv = ["erl", "-sname", f"benchload{os.getpid()}", "-hidden", "-noinput", "-noshell", "-erl_epmd_port",
                str(dist), "-start_epmd", "false", "-dist_listen", "false", "-eval", _LOADER]
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or "loaded" not in r.stdout:
            raise RuntimeError(f"ejabberd: loading users and rosters failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")

    def stop(self) -> None:
        if self.server is None:
            return
        self.server = None
        subprocess.run([os.path.join(self.peer_dir, "stop.sh"), "--dir", self.run_dir], capture_output=True,
                       text=True, timeout=60)


def make_peer(name: str, ctx, args):
    if name != NAME:
        raise SystemExit(f"unknown --peer {name!r} (known: {NAME})")
    return EjabberdPeer(ctx, args.peer_dir or DEFAULT_DIR, args.peer_schedulers)


__all__ = ["EjabberdPeer", "PeerServer", "UNSUPPORTED", "make_peer"]

#!/usr/bin/env python3
"""A three-node boshroster cluster on this machine (issue 14), run by scripts/cluster-demo.

Starts, each as a child process on loopback with private data under a temp
dir: a Redis, a PostgreSQL (initdb/pg_ctl as the postgres user), the demo
backend, three nodes (n1, n2, n3) and nginx round robin in front of them
(no stickiness: BOSH requests for another node's sid are relayed by the node
that gets them).  Ctrl-C (or --check, after a smoke test through nginx)
stops everything by PID.

    scripts/cluster-demo                # serve on http://127.0.0.1:5280/ until Ctrl-C
    scripts/cluster-demo --check        # start, log two users in through nginx, chat, stop
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from cluster_harness import NginxProcess, PostgresProcess, RedisProcess  # noqa: E402
from harness import ServerProcess, WsClient, free_port  # noqa: E402


class Demo:
    def __init__(self, workdir: str, port: int):
        self.workdir = workdir
        self.port = port
        self.started: list = []

    def start(self) -> None:
        self.redis = RedisProcess(self.workdir).start()
        self.started.append(self.redis)
        print(f"redis       {self.redis.url}  (pid {self.redis.proc.pid})")
        self.pg = PostgresProcess(self.workdir).start()
        self.started.append(self.pg)
        print(f"postgresql  127.0.0.1:{self.pg.port}  (pid {self.pg.pid()})")
        backend_port = free_port()
        contacts = os.path.join(self.workdir, "demo-contacts.json")
        shutil.copy(os.path.join(ROOT, "conf", "demo-contacts.json"), contacts)
        nodes = []
        ports = [free_port() for _ in range(3)]
        self.backend = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", "demo_backend.py"), "--port", str(backend_port),
             "--contacts", contacts, "--refresh-url", f"http://127.0.0.1:{ports[0]}/roster_admin/refresh"],
            stdout=open(os.path.join(self.workdir, "backend.log"), "w"), stderr=subprocess.STDOUT)
        print(f"backend     http://127.0.0.1:{backend_port}/  (pid {self.backend.pid})")
        for index, port in enumerate(ports, 1):
            workdir = os.path.join(self.workdir, f"n{index}")
            os.makedirs(workdir, exist_ok=True)
            node = ServerProcess(
                workdir, users=("alice", "bob", "carol", "dave") if index == 1 else (),
                cluster_redis_url=self.redis.url, database_url=self.pg.url, node_id=f"n{index}",
                http_roster_url=f"http://127.0.0.1:{backend_port}/contacts/%s", log_level="info",
            )
            node.port = port
            node.settings["http_ports"] = [port]
            node._write_config()
            node.start()
            nodes.append(node)
            self.started.append(node)
            print(f"node n{index}     {node.base_url}  (pid {node.proc.pid}, log {node.log_path})")
        self.nodes = nodes
        self.nginx = NginxProcess(self.workdir, [n.port for n in nodes])
        if self.port:
            from cluster_harness import render_nginx

            self.nginx.port = self.port
            self.nginx.conf = render_nginx(self.nginx.prefix, self.port, [n.port for n in nodes])
        self.nginx.start()
        self.started.append(self.nginx)
        print(f"nginx       {self.nginx.base_url}/  (pid {self.nginx.proc.pid}, round robin over n1..n3)")

    def check(self) -> None:
        url = f"ws://127.0.0.1:{self.nginx.port}/xmpp-websocket"
        alice, bob = WsClient(url), WsClient(url)
        alice.login("alice"), bob.login("bob")
        for client in (alice, bob):
            client.get_roster()
            client.presence()
        alice.message("bob@localhost", "hello through the cluster")
        body = bob.recv_message(timeout=10, sender="alice").findtext("{jabber:client}body")
        assert body == "hello through the cluster", body
        alice.close(), bob.close()
        print("check: alice and bob logged in through nginx and chatted")

    def stop(self) -> None:
        for item in reversed(self.started):
            try:
                item.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {item}: {exc}", file=sys.stderr)
        if getattr(self, "backend", None) is not None and self.backend.poll() is None:
            self.backend.send_signal(signal.SIGTERM)
            self.backend.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=5280, help="nginx port (0: any free port)")
    parser.add_argument("--check", action="store_true", help="smoke test through nginx, then stop")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="boshroster-cluster-")
    demo = Demo(workdir, 0 if args.check else args.port)
    try:
        demo.start()
        if args.check:
            demo.check()
            return 0
        print(f"\nopen {demo.nginx.base_url}/ and log in as alice / password (or bob, carol, dave); Ctrl-C stops\n")
        try:
            while all(n.alive() for n in demo.nodes):
                time.sleep(1)
            print("a node stopped; shutting down", file=sys.stderr)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        demo.stop()
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

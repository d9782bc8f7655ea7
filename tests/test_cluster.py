"""The cluster (issue 14) end to end: real Redis, real nodes (subprocesses), real clients.

Every test starts its own redis-server (and PostgreSQL / nginx where it says
so) on free loopback ports and stops them by PID.  Nodes are ServerProcess
subprocesses with ``cluster_redis_url`` and a short heartbeat, so a killed
node is declared dead within seconds (``cluster_node_timeout`` = 3 s).
"""

from __future__ import annotations

import json
import os
import signal
import time
import xml.etree.ElementTree as ET

import gevent
import pytest
import redis as redis_lib
import requests

from cluster_harness import NginxProcess, PostgresProcess, RedisProcess
from harness import NS_BOSH, NS_CLIENT, NS_ROSTER, BoshClient, ServerProcess, WsClient, q

pytestmark = pytest.mark.cluster

FAST = {"cluster_heartbeat_interval": 0.5, "cluster_node_timeout": 3.0}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(str(tmp_path)).start()
    yield server
    server.stop()


@pytest.fixture
def postgres(tmp_path):
    server = PostgresProcess(str(tmp_path)).start()
    yield server
    server.stop()


class Cluster:
    """Nodes n1..nN sharing one Redis (and a data_dir, or PostgreSQL)."""

    def __init__(self, tmp_path, redis_server, backend, database_url: str = ""):
        self.tmp = tmp_path
        self.redis = redis_server
        self.backend = backend
        self.database_url = database_url
        self.nodes: list[ServerProcess] = []
        self.clients = []

    def add(self, **settings) -> ServerProcess:
        index = len(self.nodes) + 1
        workdir = self.tmp / f"n{index}"
        workdir.mkdir(exist_ok=True)
        base = dict(FAST, cluster_redis_url=self.redis.url, node_id=f"n{index}",
                    http_roster_url=self.backend.url_template, bosh_max_wait=5)
        if self.database_url:
            base["database_url"] = self.database_url
        else:
            base["data_dir"] = str(self.tmp / "shared-data")  # SQLite files shared by the nodes (WAL)
        base.update(settings)
        node = ServerProcess(workdir, users=() if self.nodes else ("alice", "bob", "carol", "dave"), **base)
        node.start()
        self.nodes.append(node)
        return node

    def ws(self, node: ServerProcess, user: str, resource: str = "test", presence: bool = True) -> WsClient:
        client = WsClient(node.ws_url)
        self.clients.append(client)
        client.login(user, resource=resource)
        if presence:
            client.get_roster()
            client.presence()
        return client

    def close(self) -> None:
        for client in self.clients:
            try:
                client.close()
            except Exception:
                pass
        for node in self.nodes:
            node.stop()


@pytest.fixture
def cluster(tmp_path, redis_server, backend):
    made = Cluster(tmp_path, redis_server, backend)
    yield made
    made.close()


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        gevent.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_users_on_two_nodes_see_presence_and_chat(cluster):
    n1, n2 = cluster.add(), cluster.add()
    alice = cluster.ws(n1, "alice")
    bob = cluster.ws(n2, "bob")
    # bob came second: his probe is answered with alice's presence, and alice gets his broadcast.
    assert bob.recv_presence(sender="alice@localhost/test").get("type") is None
    assert alice.recv_presence(sender="bob@localhost/test").get("type") is None
    alice.message("bob@localhost", "hello from n1")
    got = bob.recv_message(sender="alice@localhost/test")
    assert got.findtext(q(NS_CLIENT, "body")) == "hello from n1"
    assert got.get("to") == "bob@localhost"
    bob.message("alice@localhost/test", "and back from n2")
    assert alice.recv_message(sender="bob@localhost/test").findtext(q(NS_CLIENT, "body")) == "and back from n2"
    # unavailable crosses nodes too
    bob.presence(type="unavailable")
    assert alice.recv_presence(sender="bob@localhost/test", type_="unavailable") is not None


def test_bare_jid_rules_over_all_nodes(cluster):
    """RFC 6121 §8.5.2.1.1: the highest-priority resource gets it, wherever it is; carbons (XEP-0280) too."""
    n1, n2 = cluster.add(), cluster.add()
    low = cluster.ws(n1, "bob", resource="low", presence=False)
    low.presence(inner="<priority>1</priority>")
    high = cluster.ws(n2, "bob", resource="high", presence=False)
    high.presence(inner="<priority>5</priority>")
    low.iq("<enable xmlns='urn:xmpp:carbons:2'/>", type_="set")
    alice = cluster.ws(n1, "alice")
    wait_for(lambda: True, 0.5)
    alice.message("bob@localhost", "to the best resource")
    assert high.recv_message(sender="alice").findtext(q(NS_CLIENT, "body")) == "to the best resource"
    carbon = low.recv(match=lambda e: e.tag == q(NS_CLIENT, "message")
                      and e.find("{urn:xmpp:carbons:2}received") is not None)
    assert carbon.get("from") == "bob@localhost"
    low.expect_nothing(0.5, lambda e: e.tag == q(NS_CLIENT, "message") and e.find(q(NS_CLIENT, "body")) is not None)
    # an IQ to a full JID on the other node reaches that resource, and its answer comes back
    alice.send_xml(f"<iq xmlns='{NS_CLIENT}' type='get' id='p1' to='{high.jid}'><ping xmlns='urn:xmpp:ping'/></iq>")
    ping = high.recv(match=lambda e: e.tag == q(NS_CLIENT, "iq") and e.get("id") == "p1")
    assert ping.get("from") == alice.jid
    high.send_xml(f"<iq xmlns='{NS_CLIENT}' type='result' id='p1' to='{alice.jid}'/>")
    assert alice.recv(match=lambda e: e.get("id") == "p1").get("type") == "result"


def test_kill_9_a_node_contacts_see_unavailable_and_no_message_is_lost(cluster):
    n1, n2, n3 = cluster.add(), cluster.add(), cluster.add()
    alice = cluster.ws(n1, "alice")
    bob = cluster.ws(n2, "bob")
    carol = cluster.ws(n3, "carol")
    assert alice.recv_presence(sender="bob@localhost/test").get("type") is None
    assert carol.recv_presence(sender="bob@localhost/test").get("type") is None
    alice.message("bob@localhost", "before the crash")
    assert bob.recv_message(sender="alice").findtext(q(NS_CLIENT, "body")) == "before the crash"

    killed_at = time.monotonic()
    n2.proc.send_signal(signal.SIGKILL)
    n2.proc.wait()
    # Sent while n2 is dead but not yet declared dead: they land in its inbox stream.
    alice.message("bob@localhost", "during the crash 1")
    carol.message("bob@localhost/test", "during the crash 2")
    gone_a = alice.recv_presence(timeout=30, sender="bob@localhost/test", type_="unavailable")
    gone_c = carol.recv_presence(timeout=30, sender="bob@localhost/test", type_="unavailable")
    noticed = time.monotonic() - killed_at
    assert gone_a is not None and gone_c is not None
    assert noticed < 30, noticed
    # The others keep chatting.
    alice.message("carol@localhost", "still here?")
    assert carol.recv_message(sender="alice").findtext(q(NS_CLIENT, "body")) == "still here?"
    alice.message("bob@localhost", "after the crash")
    # bob comes back on another node and gets everything he missed, once each.
    again = cluster.ws(n3, "bob", resource="back", presence=False)
    again.get_roster()
    again.presence()
    bodies = []
    deadline = time.monotonic() + 10
    while len(bodies) < 3 and time.monotonic() < deadline:
        bodies.append(again.recv_message(timeout=max(0.1, deadline - time.monotonic())).findtext(q(NS_CLIENT, "body")))
    assert sorted(bodies) == ["after the crash", "during the crash 1", "during the crash 2"], bodies
    again.expect_nothing(1.0, lambda e: e.tag == q(NS_CLIENT, "message") and e.find(q(NS_CLIENT, "body")) is not None)
    assert "is dead" in n1.log() + n3.log()
    print(f"kill -9: contacts saw unavailable after {noticed:.1f} s")


class AlternatingBosh(BoshClient):
    """A BOSH client whose every request goes to the next node in turn (a load balancer without stickiness)."""

    def __init__(self, urls, **kwargs):
        self.urls = urls
        self.turn = 0
        self.per_url = {url: 0 for url in urls}
        super().__init__(urls[0], **kwargs)

    def post(self, body, timeout=None):
        url = self.urls[self.turn % len(self.urls)]
        self.turn += 1
        self.per_url[url] += 1
        reply = self.http.post(url, data=body.encode("utf-8"), headers={"Content-Type": "text/xml; charset=utf-8"},
                               timeout=timeout or self.wait + 10)
        assert reply.status_code == 200, reply.status_code
        return ET.fromstring(reply.content)


def test_bosh_session_whose_requests_alternate_between_nodes(cluster):
    n1, n2 = cluster.add(), cluster.add()
    bob = cluster.ws(n2, "bob")
    alice = AlternatingBosh([n1.bosh_url, n2.bosh_url], wait=3)
    cluster.clients.append(alice)
    assert alice.sid.startswith("n1."), alice.sid
    alice.login("alice")
    alice.get_roster()
    alice.presence()
    assert bob.recv_presence(sender="alice@localhost/test").get("type") is None
    bob.message("alice@localhost", "over BOSH, any node")
    assert alice.recv_message(sender="bob").findtext(q(NS_CLIENT, "body")) == "over BOSH, any node"
    alice.message("bob@localhost", "back from BOSH")
    assert bob.recv_message(sender="alice").findtext(q(NS_CLIENT, "body")) == "back from BOSH"
    gevent.sleep(4)  # a held request answered empty after wait, through the relay
    bob.message("alice@localhost", "after a long poll")
    assert alice.recv_message(sender="bob").findtext(q(NS_CLIENT, "body")) == "after a long poll"
    assert min(alice.per_url.values()) >= 3, alice.per_url
    # the rid window holds across nodes: a replayed old rid is refused by the owner, via the relay
    stale = alice.post(f"<body xmlns='{NS_BOSH}' rid='{alice.rid - 50}' sid='{alice.sid}'/>")
    assert stale.get("type") == "terminate"
    # an unknown node's sid: item-not-found, not a hang
    unknown = requests.post(n2.bosh_url, data=f"<body xmlns='{NS_BOSH}' rid='5' sid='nx.abc'/>", timeout=5)
    assert ET.fromstring(unknown.content).get("condition") == "item-not-found"


def roster_pushes(client, count, timeout=5.0):
    pushes = []
    for _ in range(count):
        push = client.recv(timeout, lambda e: e.tag == q(NS_CLIENT, "iq") and e.get("type") == "set"
                           and e.find(q(NS_ROSTER, "query")) is not None)
        pushes.append(push.find(q(NS_ROSTER, "query"))[0])
    return pushes


def test_one_backend_get_per_user_and_refresh_on_any_node_pushes_everywhere(cluster, backend):
    n1, n2, n3 = cluster.add(), cluster.add(), cluster.add()
    alice1 = cluster.ws(n1, "alice", resource="one")
    alice2 = cluster.ws(n2, "alice", resource="two")
    bob = cluster.ws(n3, "bob")
    assert len(alice2.get_roster().find(q(NS_ROSTER, "query"))) == 3
    assert backend.requests_for("alice") == 1, "one GET for alice, however many nodes hold her sessions"
    assert backend.requests_for("bob") == 1

    contacts = backend.contacts["alice"]
    del contacts["dave@localhost"]
    contacts["carol@localhost"] = {"name": "Captain Marvel", "groups": ["Heroes"]}
    reply = requests.post(f"{n3.base_url}/roster_admin/refresh", json=["alice", "bob", "zed"], timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["updated"] == 3 and reply.json()["errors"] == 0, reply.json()
    for session in (alice1, alice2):
        items = {item.get("jid"): item for item in roster_pushes(session, 2)}
        assert items["dave@localhost"].get("subscription") == "remove"
        assert items["carol@localhost"].get("name") == "Captain Marvel"
        session.expect_nothing(0.5, lambda e: e.tag == q(NS_CLIENT, "iq") and e.get("type") == "set")
    assert backend.requests_for("alice") == 2, "the refresh fetched alice once for both nodes"
    assert backend.requests_for("bob") == 2
    bob.expect_nothing(0.3, lambda e: e.tag == q(NS_CLIENT, "iq") and e.get("type") == "set")

    # A failing fetch is counted as an error by whichever node is asked.
    backend.set_fault("alice", "status", 500)
    contacts["dave@localhost"] = {"name": "Dave", "groups": []}
    reply = requests.post(f"{n1.base_url}/roster_admin/refresh", json=["alice", "bob"], timeout=30)
    assert reply.json()["updated"] == 1 and reply.json()["errors"] == 1, reply.json()


def test_three_nodes_behind_nginx_round_robin_on_postgresql_survive_a_kill(tmp_path, redis_server, backend, postgres):
    """nginx without stickiness in front of three nodes sharing Redis and PostgreSQL; one is killed -9."""
    cluster = Cluster(tmp_path, redis_server, backend, database_url=postgres.url)
    try:
        nodes = [cluster.add(), cluster.add(), cluster.add()]
        nginx = NginxProcess(str(tmp_path), [n.port for n in nodes]).start()
        try:
            front_ws = f"ws://127.0.0.1:{nginx.port}/xmpp-websocket"
            front_bosh = f"{nginx.base_url}/http-bind"
            # BOSH through nginx: every request may land on another node.
            alice = BoshClient(front_bosh, wait=3)
            cluster.clients.append(alice)
            alice.login("alice")
            alice.get_roster()
            alice.presence()
            owner = alice.sid.partition(".")[0]
            ws_clients = {}
            for name in ("bob", "carol", "dave"):
                client = WsClient(front_ws)
                cluster.clients.append(client)
                client.login(name)
                client.get_roster()
                client.presence()
                ws_clients[name] = client
            for name, client in ws_clients.items():
                client.message("alice@localhost", f"hi from {name}")
            got = sorted(alice.recv_message(timeout=10).findtext(q(NS_CLIENT, "body")) for _ in ws_clients)
            assert got == ["hi from bob", "hi from carol", "hi from dave"]
            directory = redis_lib.Redis(port=redis_server.port, decode_responses=True)
            where = {name: json.loads(directory.hget(f"br:user:{name}", "test"))["n"] for name in ws_clients}
            candidates = [node for node in where.values() if node != owner]
            assert candidates, f"round robin put every WebSocket user on alice's node {owner}: {where}"
            victim = next(n for n in nodes if n.settings["node_id"] == candidates[0])
            lost_users = [name for name, node in where.items() if node == candidates[0]]
            survivors = [name for name in ws_clients if name not in lost_users]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            killed_at = time.monotonic()
            # alice (on a live node) sees the killed node's users go unavailable within 30 s
            for name in lost_users:
                alice.recv_presence(timeout=30, sender=f"{name}@localhost/test", type_="unavailable")
            print(f"nginx cluster: unavailable seen {time.monotonic() - killed_at:.1f} s after kill -9")
            for name in lost_users:
                alice.message(f"{name}@localhost", f"for {name}, offline")
            for name in survivors:
                alice.message(f"{name}@localhost", f"for {name}, live")
                assert ws_clients[name].recv_message(timeout=10, sender="alice").findtext(
                    q(NS_CLIENT, "body")) == f"for {name}, live"
            # The killed node's users reconnect through nginx (nginx skips the dead upstream) and get their mail.
            for name in lost_users:
                again = WsClient(front_ws)
                cluster.clients.append(again)
                again.login(name, resource="again")
                again.presence()
                assert again.recv_message(timeout=10, sender="alice").findtext(
                    q(NS_CLIENT, "body")) == f"for {name}, offline"
        finally:
            nginx.stop()
    finally:
        cluster.close()



def test_unreachable_redis_at_start_is_a_clear_error(tmp_path, backend):
    from harness import free_port

    node = ServerProcess(tmp_path, cluster_redis_url=f"redis://127.0.0.1:{free_port()}/0", node_id="n1",
                         http_roster_url=backend.url_template)
    with pytest.raises(RuntimeError, match="server exited"):
        node.start()
    assert "cluster_redis_url" in node.log() and "cannot reach Redis" in node.log(), node.log()


def test_a_redis_outage_degrades_then_the_cluster_recovers(cluster, redis_server):
    n1, n2 = cluster.add(), cluster.add()
    alice = cluster.ws(n1, "alice")
    carol = cluster.ws(n1, "carol")
    bob = cluster.ws(n2, "bob")
    alice.recv_presence(sender="bob@localhost/test")
    redis_server.stop()
    # Local delivery does not need Redis.
    alice.message("carol@localhost", "same node, no Redis")
    assert carol.recv_message(sender="alice").findtext(q(NS_CLIENT, "body")) == "same node, no Redis"
    # For another node's resource: kept in offline storage when Redis stays away (not lost).
    alice.message("bob@localhost", "during the outage")
    gevent.sleep(4.5)
    assert "degraded" in n1.log()
    redis_server.start()  # same port, empty: the nodes write everything again
    wait_for(lambda: "Redis is back" in n1.log() and "Redis is back" in n2.log(), 15, "both nodes back")
    wait_for(lambda: "resynchronised" in n1.log() and "resynchronised" in n2.log(), 15, "directory resync")
    gevent.sleep(1.0)
    alice.message("bob@localhost", "after the outage")
    assert bob.recv_message(timeout=10, sender="alice").findtext(q(NS_CLIENT, "body")) == "after the outage"
    bob.message("alice@localhost", "heard you")
    assert alice.recv_message(timeout=10, sender="bob").findtext(q(NS_CLIENT, "body")) == "heard you"
    # the message of the outage waits in bob's offline storage for his next login
    later = cluster.ws(n1, "bob", resource="later", presence=False)
    later.presence()
    assert later.recv_message(timeout=10, sender="alice").findtext(q(NS_CLIENT, "body")) == "during the outage"


def test_a_redis_that_stops_answering_is_noticed_and_the_cluster_recovers(cluster, redis_server):
    """SIGSTOP: the connections stay open and Redis answers nothing (a hung process, or a host
    gone without a RST).  The blocking reads (inbox XREADGROUP, the directory subscription)
    have a bound too (cluster_redis_timeout), so each node logs it and goes degraded; after
    SIGCONT they reconnect and cross-node chat works again."""
    settings = {"cluster_redis_timeout": 1.5}
    n1, n2 = cluster.add(**settings), cluster.add(**settings)
    alice = cluster.ws(n1, "alice")
    carol = cluster.ws(n1, "carol")
    bob = cluster.ws(n2, "bob")
    alice.recv_presence(sender="bob@localhost/test")
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        for node in (n1, n2):
            wait_for(lambda: "directory subscription lost" in node.log(), 15,
                     f"{node.settings['node_id']}: the silent subscription noticed")
            wait_for(lambda: "inbox read failed" in node.log(), 15,
                     f"{node.settings['node_id']}: the silent inbox read noticed")
            wait_for(lambda: "degraded" in node.log(), 15, f"{node.settings['node_id']}: degraded")
        alice.message("carol@localhost", "same node, Redis stopped")  # local delivery needs no Redis
        assert carol.recv_message(sender="alice").findtext(q(NS_CLIENT, "body")) == "same node, Redis stopped"
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    wait_for(lambda: "Redis is back" in n1.log() and "Redis is back" in n2.log(), 20, "both nodes back")
    for attempt in range(20):  # the subscriptions come back within their retry delay (<= 5 s)
        alice.message("bob@localhost", f"after the stop {attempt}")
        try:
            got = bob.recv_message(timeout=1, sender="alice")
            break
        except TimeoutError:
            continue
    else:
        raise AssertionError("no message from alice to bob after SIGCONT")
    assert got.findtext(q(NS_CLIENT, "body")).startswith("after the stop")
    bob.message("alice@localhost", "heard you")
    assert alice.recv_message(timeout=10, sender="bob").findtext(q(NS_CLIENT, "body")) == "heard you"
    assert "Traceback" not in n1.log() + n2.log()

"""XEP-0198 resumption on another node of the cluster (cluster/sm_handover.py), end to end.

Real Redis, real nodes (subprocesses), real WebSocket clients: a stream cut on
one node is resumed on another (as behind nginx round robin without
stickiness), the owner hands the hibernating session over, the contacts never
see it go, every message arrives exactly once; another user's id, a late
resume after the expiry, a dead or silent owner all fail with ``<failed/>``
and a fresh bind works.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import xml.etree.ElementTree as ET

import pytest
import redis as redis_lib
import requests

from harness import NS_CLIENT, NS_STANZAS, WsClient, q
from test_cluster import Cluster, redis_server, wait_for  # noqa: F401  (redis_server is a fixture)
from test_sm_e2e import authenticate, sm

pytestmark = pytest.mark.cluster

NS_SM = "urn:xmpp:sm:3"
NS_CARBONS = "urn:xmpp:carbons:2"
UNAVAILABLE = lambda e: e.tag == q(NS_CLIENT, "presence") and e.get("type") == "unavailable"  # noqa: E731
SM_ANSWER = lambda e: e.tag.startswith(f"{{{NS_SM}}}")  # noqa: E731


@pytest.fixture
def cluster(tmp_path, redis_server, backend):  # noqa: F811
    made = Cluster(tmp_path, redis_server, backend)
    yield made
    made.close()


def online(cluster, node, user, resource="web", carbons=False):
    client = WsClient(node.ws_url)
    cluster.clients.append(client)
    authenticate(client, user)
    client.bind(resource)
    client.get_roster()
    client.presence()
    if carbons:
        assert client.iq(f"<enable xmlns='{NS_CARBONS}'/>", type_="set").get("type") == "result"
    return client


def enable(client) -> str:
    client.send_xml(sm("enable", resume="true"))
    enabled = client.recv(match=lambda e: e.tag == q(NS_SM, "enabled"))
    assert enabled.get("resume") == "true"
    return enabled.get("id")


def resume(cluster, node, user, sm_id, h):
    again = WsClient(node.ws_url)
    cluster.clients.append(again)
    authenticate(again, user)
    started = time.monotonic()
    again.send_xml(sm("resume", previd=sm_id, h=h))
    answer = again.recv(timeout=15, match=SM_ANSWER)
    return again, answer, time.monotonic() - started


def bodies(client, count):
    return [client.recv_message().findtext(q(NS_CLIENT, "body")) for _ in range(count)]


def handled(client) -> int:
    """Stanzas received since <resumed/> (or <enabled/>): XEP-0198 §4's h counts them (on top of
    the h the resumption started from)."""
    texts = client.raw
    start = max(i for i, t in enumerate(texts) if t.startswith(("<resumed", "<enabled")))
    stanzas = (ET.fromstring(t).tag for t in texts[start + 1:])
    return sum(1 for tag in stanzas if tag in (q(NS_CLIENT, "message"), q(NS_CLIENT, "presence"), q(NS_CLIENT, "iq")))


def hibernating(node, jid, times=1):
    """The node logged ``jid`` going into hibernation ``times`` times (a session handed to a
    node hibernates there once before its stream takes it)."""
    wait_for(lambda: node.log().count(f"{jid} hibernating") >= times, what=f"{jid} hibernating")


def no_body_message(e):
    return e.tag == q(NS_CLIENT, "message") and e.find(q(NS_CLIENT, "body")) is not None


def test_cut_on_one_node_resumed_on_another_every_message_once_contacts_see_nothing(cluster, redis_server):
    n1, n2 = cluster.add(), cluster.add()
    bob = online(cluster, n1, "bob")  # a contact on the owner node
    carol = online(cluster, n2, "carol")  # and one on the node it resumes on
    alice = online(cluster, n1, "alice", carbons=True)
    phone = online(cluster, n1, "alice", resource="phone")
    sm_id = enable(alice)
    assert sm_id.startswith("n1."), sm_id  # the SM id names its node, as BOSH sids do
    bob.recv_presence(sender="alice@localhost/web")
    carol.recv_presence(sender="alice@localhost/web")
    bob.message("alice@localhost/web", "one")
    assert bodies(alice, 1) == ["one"]
    alice.sync()
    acked = handled(alice)  # "one", the presences that came after <enabled/>, the ping's result
    alice.send_xml(sm("a", h=acked))
    alice.drop()  # the <a/> is read before the end of the socket
    hibernating(n1, "alice@localhost/web")
    bob.message("alice@localhost/web", "two")
    carol.message("alice@localhost/web", "three")  # from n2 through n1's inbox
    bob.sync(), carol.sync()

    # bob tries alice's id from n2: refused, and nothing of alice's session is touched.
    thief, answer, _ = resume(cluster, n2, "bob", sm_id, 0)
    assert answer.tag == q(NS_SM, "failed") and answer.find(q(NS_STANZAS, "item-not-found")) is not None
    assert thief.bind("stolen").startswith("bob@localhost/")

    again, answer, took = resume(cluster, n2, "alice", sm_id, acked)
    assert answer.tag == q(NS_SM, "resumed"), ET.tostring(answer)
    assert answer.get("previd") == sm_id
    assert sorted(bodies(again, 2)) == ["three", "two"]  # exactly the unacknowledged, once each
    again.expect_nothing_queued(no_body_message, after=(bob, carol))
    assert "alice@localhost/web handed over to node n2" in n1.log()
    print(f"resumption on another node answered in {took * 1000:.0f} ms")

    # The directory names n2 now; chat goes on through n2, both ways, same full JID.
    entry = json.loads(redis_lib.Redis.from_url(redis_server.url).hget("br:user:alice", "web"))
    assert entry["n"] == "n2" and entry["x"] and entry["c"] == 1
    bob.message("alice@localhost/web", "four")
    carol.message("alice@localhost/web", "five")
    assert sorted(bodies(again, 2)) == ["five", "four"]
    again.message("bob@localhost", "back")
    assert bob.recv_message(sender="alice@localhost/web").findtext(q(NS_CLIENT, "body")) == "back"
    # Carbons stayed enabled: a message to her phone is copied to the resumed stream.
    bob.message("alice@localhost/phone", "to the phone")
    assert bodies(phone, 1) == ["to the phone"]
    carbon = again.recv(match=lambda e: e.tag == q(NS_CLIENT, "message") and e.find(q(NS_CARBONS, "received")) is not None)
    assert carbon.get("from") == "alice@localhost"

    # Cut again on n2 and come back on n1: the session moves back (br:sm-owner).
    again.sync()
    h = acked + handled(again) + 1  # h goes on counting from the resumption's; the ping's result is one more
    again.sync()
    assert acked + handled(again) == h
    again.send_xml(sm("a", h=h))
    again.sync()  # its result is the one stanza left unacknowledged
    again.drop()
    hibernating(n2, "alice@localhost/web", times=2)
    bob.message("alice@localhost/web", "six")
    bob.sync()
    third, answer, _ = resume(cluster, n1, "alice", sm_id, h)
    assert answer.tag == q(NS_SM, "resumed"), ET.tostring(answer)
    assert bodies(third, 1) == ["six"]
    # exactly the unacknowledged: the last ping's result, then six
    after = third.raw[[i for i, t in enumerate(third.raw) if t.startswith("<resumed")][0] + 1:]
    assert [ET.fromstring(t).tag for t in after][:2] == [q(NS_CLIENT, "iq"), q(NS_CLIENT, "message")], after
    third.expect_nothing_queued(no_body_message, after=(bob,))
    third.message("carol@localhost", "from n1 again")
    assert carol.recv_message(sender="alice@localhost/web").findtext(q(NS_CLIENT, "body")) == "from n1 again"

    # Through all of it, neither contact saw alice/web go unavailable.
    for contact in (bob, carol):
        contact.expect_nothing_queued(lambda e: UNAVAILABLE(e) and e.get("from") == "alice@localhost/web")
    third.close()
    assert bob.recv_presence(timeout=5, sender="alice@localhost/web", type_="unavailable") is not None


def test_the_hand_over_endpoint_refuses_what_is_not_a_node_of_the_cluster(cluster, redis_server):
    n1, n2 = cluster.add(), cluster.add()
    bob = online(cluster, n2, "bob")
    alice = online(cluster, n1, "alice")
    sm_id = enable(alice)
    bob.recv_presence(sender="alice@localhost/web")
    alice.drop()
    hibernating(n1, "alice@localhost/web")
    url = f"{n1.base_url}/_cluster/sm-handover"
    ask = {"id": sm_id, "user": "alice", "h": 0, "to": "n2"}
    assert requests.post(url, json=ask, timeout=5).status_code == 403  # no secret
    assert requests.post(url, json=ask, headers={"X-Boshroster-Cluster": "guess"}, timeout=5).status_code == 403
    secret = redis_lib.Redis.from_url(redis_server.url, decode_responses=True).get("br:cluster-secret")
    good = {"X-Boshroster-Cluster": secret}
    for bad in (b"not json", json.dumps({"id": sm_id}).encode(), json.dumps(dict(ask, h=-1)).encode(),
                json.dumps(dict(ask, to="../x")).encode(), b"x" * 5000):
        assert requests.post(url, data=bad, headers=good, timeout=5).status_code == 400, bad[:40]
    assert requests.get(url, headers=good, timeout=5).status_code == 405
    # Another user's session asked for by a node with the secret: failed, untouched.
    answer = requests.post(url, json=dict(ask, user="bob"), headers=good, timeout=5).json()
    assert "item-not-found" in answer["failed"]
    assert "without the cluster secret: refused" in n1.log()
    # Ids that are no node's: failed at once, on the node that got them.
    for bogus in ("n9.abcdef", "no-dot", "n1." + "x" * 300, f"{sm_id}x"):
        stray, answer, _ = resume(cluster, n2, "alice", bogus, 0)
        assert answer.tag == q(NS_SM, "failed") and answer.find(q(NS_STANZAS, "item-not-found")) is not None
        stray.stop()
    # An h above what n1 sent (§4): n1's answer, <failed h/> with unexpected-request, comes through n2.
    over, answer, _ = resume(cluster, n2, "alice", sm_id, 1000)
    assert answer.tag == q(NS_SM, "failed") and answer.find(q(NS_STANZAS, "unexpected-request")) is not None
    assert answer.get("h") == "0"
    over.stop()
    # alice's session is intact: she resumes it on n2.
    again, answer, _ = resume(cluster, n2, "alice", sm_id, 0)
    assert answer.tag == q(NS_SM, "resumed"), ET.tostring(answer)
    bob.expect_nothing_queued(UNAVAILABLE)


def test_late_resume_after_the_expiry_fails_with_h_on_another_node(cluster, redis_server):
    n1, n2 = cluster.add(smacks_hibernation_time=1.0), cluster.add()
    bob = online(cluster, n2, "bob")
    alice = online(cluster, n1, "alice")
    sm_id = enable(alice)
    bob.recv_presence(sender="alice@localhost/web")
    alice.message("bob@localhost", "handled 1")
    alice.message("bob@localhost", "handled 2")
    assert bodies(bob, 2) == ["handled 1", "handled 2"]
    alice.drop()
    # The hibernation ends: contacts see alice go now, and the id's tombstone is in Redis.
    assert bob.recv_presence(timeout=10, sender="alice@localhost/web", type_="unavailable") is not None
    r = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    wait_for(lambda: r.exists(f"br:sm-tomb:{sm_id}"), what="the tombstone in Redis")
    assert r.ttl(f"br:sm-tomb:{sm_id}") > 3000
    # bob cannot use it; alice gets <failed h/> on n2 (h = the stanzas n1 handled from her).
    _, answer, _ = resume(cluster, n2, "bob", sm_id, 0)
    assert answer.tag == q(NS_SM, "failed") and answer.get("h") is None
    late, answer, _ = resume(cluster, n2, "alice", sm_id, 0)
    assert answer.tag == q(NS_SM, "failed"), ET.tostring(answer)
    assert answer.get("h") == "2"  # the two messages sent after <enable/>
    assert answer.find(q(NS_STANZAS, "item-not-found")) is not None
    assert late.bind("web").startswith("alice@localhost/")
    late.presence()
    assert bob.recv_presence(sender="alice@localhost/web") is not None


def test_owner_killed_resume_fails_promptly_and_a_fresh_bind_works(cluster):
    n1, n2 = cluster.add(), cluster.add()
    bob = online(cluster, n2, "bob")
    alice = online(cluster, n1, "alice")
    sm_id = enable(alice)
    bob.recv_presence(sender="alice@localhost/web")
    alice.drop()
    hibernating(n1, "alice@localhost/web")
    n1.proc.send_signal(signal.SIGKILL)
    n1.proc.wait()
    again, answer, took = resume(cluster, n2, "alice", sm_id, 0)
    assert answer.tag == q(NS_SM, "failed") and answer.find(q(NS_STANZAS, "item-not-found")) is not None
    assert took < 3.0, took  # a refused connection: no wait for the timeout
    print(f"owner killed: <failed/> after {took * 1000:.0f} ms")
    assert again.bind("web").startswith("alice@localhost/")
    again.presence()
    bob.message("alice@localhost", "after the crash")
    assert bodies(again, 1) == ["after the crash"]


def test_a_silent_owner_costs_at_most_the_hand_over_timeout(cluster):
    """An owner that accepts connections and never answers (hung, or a black hole)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        n1 = cluster.add(cluster_internal_url=f"http://127.0.0.1:{silent.getsockname()[1]}")
        n2 = cluster.add(cluster_sm_handover_timeout=1.5)
        alice = online(cluster, n1, "alice")
        sm_id = enable(alice)
        alice.drop()
        hibernating(n1, "alice@localhost/web")
        again, answer, took = resume(cluster, n2, "alice", sm_id, 0)
        assert answer.tag == q(NS_SM, "failed") and answer.find(q(NS_STANZAS, "item-not-found")) is not None
        assert 1.4 < took < 5.0, took
        print(f"silent owner: <failed/> after {took * 1000:.0f} ms")
        assert "did not hand the session over" in n2.log()
        assert again.bind("web").startswith("alice@localhost/")
    finally:
        silent.close()


def test_behind_nginx_round_robin_the_resume_lands_on_the_other_node(tmp_path, cluster):
    """The deployment this is for: nginx without stickiness (one worker, so its round robin
    sends consecutive connections to alternate nodes), WebSocket cut and resumed twice."""
    from cluster_harness import NginxProcess

    n1, n2 = cluster.add(), cluster.add()
    nginx = NginxProcess(str(tmp_path), [n1.port, n2.port])
    with open(nginx.conf) as fh:
        text = fh.read()
    with open(nginx.conf, "w") as fh:
        fh.write(text.replace("worker_processes auto;", "worker_processes 1;"))
    nginx.start()
    try:
        front = f"ws://127.0.0.1:{nginx.port}/xmpp-websocket"
        bob = online(cluster, n1, "bob")
        alice = WsClient(front)
        cluster.clients.append(alice)
        authenticate(alice, "alice")
        alice.bind("web")
        alice.presence()
        sm_id = enable(alice)
        bob.recv_presence(sender="alice@localhost/web")
        base, stream = 0, alice
        for round_ in range(2):
            stream.sync()
            base += handled(stream)
            stream.send_xml(sm("a", h=base))
            before = n1.log().count("alice@localhost/web hibernating") + n2.log().count("alice@localhost/web hibernating")
            stream.drop()
            wait_for(lambda: n1.log().count("alice@localhost/web hibernating")
                     + n2.log().count("alice@localhost/web hibernating") > before, what="hibernation")
            bob.message("alice@localhost/web", f"while cut {round_}")
            bob.sync()
            stream = WsClient(front)
            cluster.clients.append(stream)
            authenticate(stream, "alice")
            stream.send_xml(sm("resume", previd=sm_id, h=base))
            answer = stream.recv(timeout=15, match=SM_ANSWER)
            assert answer.tag == q(NS_SM, "resumed"), ET.tostring(answer)
            assert bodies(stream, 1) == [f"while cut {round_}"]
            stream.expect_nothing_queued(no_body_message, after=(bob,))
        handed = [line for node in (n1, n2) for line in node.log().splitlines() if "web handed over to node" in line]
        assert len(handed) == 2, handed  # each resumption landed on the other node
        stream.message("bob@localhost", "through nginx")
        assert bob.recv_message(sender="alice@localhost/web").findtext(q(NS_CLIENT, "body")) == "through nginx"
        bob.expect_nothing_queued(UNAVAILABLE)
    finally:
        nginx.stop()


def test_an_owner_connection_still_open_is_closed_with_conflict(cluster):
    """The client gave up on a connection its node still thinks alive (a dead NAT mapping)
    and resumes on another node: the old connection gets <conflict/>, contacts see nothing."""
    n1, n2 = cluster.add(), cluster.add()
    bob = online(cluster, n2, "bob")
    alice = online(cluster, n1, "alice")
    sm_id = enable(alice)
    bob.recv_presence(sender="alice@localhost/web")
    bob.message("alice@localhost/web", "unread")
    alice.recv_message()
    again, answer, _ = resume(cluster, n2, "alice", sm_id, 0)
    assert answer.tag == q(NS_SM, "resumed"), ET.tostring(answer)
    error = alice.recv(match=lambda e: e.tag == "{http://etherx.jabber.org/streams}error")
    assert error.find(q(NS_STANZAS.replace("stanzas", "streams"), "conflict")) is not None
    assert bodies(again, 1) == ["unread"]
    bob.message("alice@localhost/web", "after")
    assert bodies(again, 1) == ["after"]
    bob.expect_nothing_queued(UNAVAILABLE, after=(again,))


def test_offline_messages_handed_over_are_delivered_once(cluster):
    """Offline messages delivered to the session on its first node and not acknowledged go
    with it: retransmitted by the new node, and gone from offline storage (no second copy
    at the next login)."""
    n1, n2 = cluster.add(), cluster.add()
    bob = online(cluster, n2, "bob")
    bob.message("alice@localhost", "stored 1")
    bob.message("alice@localhost", "stored 2")
    bob.sync()
    alice = WsClient(n1.ws_url)
    cluster.clients.append(alice)
    authenticate(alice, "alice")
    alice.bind("web")
    sm_id = enable(alice)
    alice.get_roster()
    alice.presence()  # the initial presence brings the offline messages, under XEP-0198
    assert sorted(bodies(alice, 2)) == ["stored 1", "stored 2"]
    alice.drop()
    hibernating(n1, "alice@localhost/web")
    again, answer, _ = resume(cluster, n2, "alice", sm_id, 0)
    assert answer.tag == q(NS_SM, "resumed"), ET.tostring(answer)
    assert sorted(bodies(again, 2)) == ["stored 1", "stored 2"]
    again.sync()
    again.send_xml(sm("a", h=handled(again)))
    again.sync()
    other = online(cluster, n1, "alice", resource="second")
    other.expect_nothing_queued(no_body_message)


class MergedLog:
    """Two nodes' logs as one, in the order this test saw the lines (only ever appended to), for
    the continuity scripts' log requests (test_sm_clients.wait_for_log)."""

    def __init__(self, *nodes):
        self.nodes = nodes
        self.seen = [0] * len(nodes)
        self.lines: list[str] = []

    def log(self) -> str:
        for index, node in enumerate(self.nodes):
            lines = node.log().splitlines()
            self.lines.extend(lines[self.seen[index]:])
            self.seen[index] = len(lines)
        return "\n".join(self.lines)


@pytest.mark.parametrize("client", ["stanza", "strophe"])
def test_real_client_cut_and_resumed_on_the_other_node(tmp_path, cluster, client):
    """A real client (StanzaJS 12, Strophe.js 5: tests/js/*_continuity.js, scenario cut_resume) behind nginx
    without stickiness: its connection cut, it reconnects by itself and resumes on the other
    node; every message once, in order, bob never sees it unavailable (the script checks)."""
    from cluster_harness import NginxProcess
    from realclients import require_node, run_node_script
    from test_sm_clients import RUNS, wait_for_log

    script, packages = RUNS[client]
    require_node(*packages)
    n1, n2 = cluster.add(), cluster.add()
    # One worker, peers n1, n1, n2 in turn: alice's first connection goes to n1, bob's too (the
    # script logs both in at once; contacts on two nodes are the first test's), alice's
    # reconnection to n2.
    nginx = NginxProcess(str(tmp_path), [n1.port, n1.port, n2.port])
    with open(nginx.conf) as fh:
        text = fh.read()
    with open(nginx.conf, "w") as fh:
        fh.write(text.replace("worker_processes auto;", "worker_processes 1;"))
    nginx.start()
    merged = MergedLog(n1, n2)
    try:
        result = run_node_script(
            script, ["--transport", "websocket", "--websocket",
                                     f"ws://127.0.0.1:{nginx.port}/xmpp-websocket", "--only", "cut_resume"],
            server=n1, backend=cluster.backend, timeout=200, stderr_path=str(tmp_path / "node-stderr.log"),
            handlers={"log": lambda msg: wait_for_log(merged, msg)})
    finally:
        nginx.stop()
    line = result.results.get("cut_resume")
    assert line is not None and line["ok"], (line and line.get("error"), result.stderr_tail(40), merged.log()[-4000:])
    handed = [entry for entry in merged.log().splitlines() if "cluster.sm: alice@localhost/" in entry
              and "handed over to node n2" in entry]
    assert handed, merged.log()[-4000:]


def metric(node, name: str) -> float:
    """One unlabelled series of ``node``'s /metrics."""
    for line in requests.get(f"{node.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def websocket_sessions(node) -> float:
    text = requests.get(f"{node.base_url}/metrics", timeout=5).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith('boshroster_sessions{transport="websocket"}')))


@pytest.mark.parametrize("at, sig", [("request", signal.SIGKILL), ("request", signal.SIGSTOP),
                                     ("answer", signal.SIGKILL), ("answer", signal.SIGSTOP)],
                         ids=["request-kill", "request-stop", "answer-kill", "answer-stop"])
def test_owner_dies_in_the_middle_of_the_hand_over(cluster, redis_server, at, sig):
    """The owner got the hand-over request and dies before (``request``: it still holds the
    session) or after handing the session over (``answer``: its directory entry names the new
    node already) and before answering; killed -9 (the connection is reset) or stopped (it
    never answers).  A test-only stall (cluster_sm_handover_test_stall) makes the point
    deterministic: the owner logs it, then the test signals it by PID.  The client gets
    <failed/> within cluster_sm_handover_timeout, binds anew on the new node; bob sees alice/web
    unavailable within the node-death bound; what was held for her on the new node is stored
    offline and delivered at her initial presence; nothing stays held or pending there."""
    timeout = 1.5
    n1 = cluster.add(cluster_sm_handover_test_stall=60.0, cluster_sm_handover_test_stall_at=at)
    n2 = cluster.add(cluster_sm_handover_timeout=timeout)
    bob = online(cluster, n2, "bob")  # the contact, on the new node
    carol = online(cluster, n1, "carol")  # a sender on the owner, through the new node's inbox
    bob.message("alice@localhost", "stored")
    bob.sync()
    alice = WsClient(n1.ws_url)
    cluster.clients.append(alice)
    authenticate(alice, "alice")
    alice.bind("web")
    sm_id = enable(alice)
    alice.get_roster()
    alice.presence()  # brings the offline message, under XEP-0198: not acknowledged
    assert bodies(alice, 1) == ["stored"]
    bob.recv_presence(sender="alice@localhost/web")
    alice.drop()
    hibernating(n1, "alice@localhost/web")
    r = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)

    again = WsClient(n2.ws_url)
    cluster.clients.append(again)
    authenticate(again, "alice")
    asked_at = time.monotonic()
    again.send_xml(sm("resume", previd=sm_id, h=0))
    wait_for(lambda: "test stall: hand-over of alice to node n2" in n1.log(), what="the owner's stall")
    assert metric(n2, "boshroster_cluster_sm_handovers_pending") == 1
    if at == "answer":
        # Handed over, not answered: the directory names n2 already, and what n1 routes to
        # alice/web goes to n2's inbox, where it is held for the session expected.
        assert json.loads(r.hget("br:user:alice", "web"))["n"] == "n2"
        carol.message("alice@localhost/web", "during the hand-over")
        wait_for(lambda: "stanza for alice/web held during its hand-over" in n2.log(), what="the held stanza")
        assert metric(n2, "boshroster_cluster_sm_held_stanzas") == 1
    killed_at = time.monotonic()
    try:
        n1.proc.send_signal(sig)
        answer = again.recv(timeout=15, match=SM_ANSWER)
        took, waited = time.monotonic() - killed_at, time.monotonic() - asked_at
        assert answer.tag == q(NS_SM, "failed") and answer.find(q(NS_STANZAS, "item-not-found")) is not None
        assert took < timeout + 1.5, took  # bounded by cluster_sm_handover_timeout (a reset: at once)
        if sig == signal.SIGSTOP:  # the request's timeout, counted from when n2 sent it
            assert timeout - 0.1 < waited < timeout + 1.5, waited
        assert "did not hand the session over" in n2.log()
        # bob sees alice/web go: from n2 at once (answer: the moved entry), or when n1 is found
        # dead (request: n2 cleans up n1's sessions), as for any dead node.
        gone = bob.recv_presence(timeout=30, sender="alice@localhost/web", type_="unavailable")
        noticed = time.monotonic() - killed_at
        assert gone is not None and noticed < 30, noticed
        wait_for(lambda: r.hget("br:user:alice", "web") is None, what="alice/web gone from the directory")
        assert "alice/web" not in r.smembers("br:node:n2:sessions") | r.smembers("br:node:n1:sessions")
        # Nothing held or pending on n2; no stray session there (bob and the fresh stream only).
        assert metric(n2, "boshroster_cluster_sm_handovers_pending") == 0
        assert metric(n2, "boshroster_cluster_sm_held_stanzas") == 0
        assert metric(n2, "boshroster_cluster_sm_orphans_total") == (1 if at == "answer" else 0)
        print(f"owner {signal.Signals(sig).name} at {at}: <failed/> after {took * 1000:.0f} ms,"
              f" bob saw unavailable after {noticed:.1f} s")

        # A fresh bind of the same resource works on n2; its initial presence brings what was
        # held, and the offline message n1 had delivered unacknowledged (still stored: n1 died
        # before it wrote the answer carrying it).
        assert again.bind("web") == "alice@localhost/web"
        again.get_roster()
        again.presence()
        assert bob.recv_presence(sender="alice@localhost/web").get("type") is None
        expected = ["during the hand-over", "stored"] if at == "answer" else ["stored"]
        assert sorted(bodies(again, len(expected))) == expected
        bob.message("alice@localhost/web", "after")
        assert bodies(again, 1) == ["after"]
        again.message("bob@localhost", "back")
        assert bob.recv_message(sender="alice@localhost/web").findtext(q(NS_CLIENT, "body")) == "back"
        again.expect_nothing_queued(no_body_message, after=(bob,))
        assert websocket_sessions(n2) == 2
        assert json.loads(r.hget("br:user:alice", "web"))["n"] == "n2"
        # n1 is found dead (heartbeat gone) and cleaned up by n2: carol goes too.
        assert bob.recv_presence(timeout=30, sender="carol@localhost/web", type_="unavailable") is not None
        # alice/web was left alone by that cleanup (no second unavailable).
        bob.expect_nothing_queued(lambda e: UNAVAILABLE(e) and e.get("from") == "alice@localhost/web")
    finally:
        n1.proc.send_signal(signal.SIGKILL)  # a stopped process too
        n1.proc.wait()


def test_an_owner_slower_than_the_timeout_moves_the_session_after_the_new_node_gave_up(cluster, redis_server):
    """The owner (alive, stalled at the request by the test-only setting) claims the session and
    moves its entry to n2 after n2's request timed out: n2 sees the move announced with no
    session behind it, removes the entry and sends unavailable (contacts are not left seeing a
    resource that is nowhere); the fresh bind on n2 then works."""
    n1 = cluster.add(cluster_sm_handover_test_stall=2.5, cluster_sm_handover_test_stall_at="request")
    n2 = cluster.add(cluster_sm_handover_timeout=1.0)
    bob = online(cluster, n2, "bob")
    alice = online(cluster, n1, "alice")
    sm_id = enable(alice)
    bob.recv_presence(sender="alice@localhost/web")
    alice.drop()
    hibernating(n1, "alice@localhost/web")
    again, answer, took = resume(cluster, n2, "alice", sm_id, 0)
    assert answer.tag == q(NS_SM, "failed"), ET.tostring(answer)
    assert took < 2.5, took  # n2's timeout, not the owner's stall
    wait_for(lambda: "alice@localhost/web handed over to node n2" in n1.log(), what="the late hand-over")
    assert bob.recv_presence(timeout=10, sender="alice@localhost/web", type_="unavailable") is not None
    r = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    wait_for(lambda: r.hget("br:user:alice", "web") is None, what="the moved entry removed")
    assert "was handed to this node by a node that did not answer" in n2.log()
    assert metric(n2, "boshroster_cluster_sm_handovers_pending") == 0
    assert metric(n2, "boshroster_cluster_sm_orphans_total") == 1
    assert again.bind("web") == "alice@localhost/web"
    again.presence()
    assert bob.recv_presence(sender="alice@localhost/web").get("type") is None
    bob.message("alice@localhost/web", "after")
    assert bodies(again, 1) == ["after"]
    assert websocket_sessions(n2) == 2

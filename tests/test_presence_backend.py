"""Issue 10 point 12: presence never waits on the roster backend when a roster is cached,
and never holds up the other stanzas of the session.

Before: with the backend slow (10 s), each presence update re-fetched the roster and the
session's next ping took 5–10 s.  Here the backend is *gated* (tests/backend_app.py: a GET
hangs until the test opens the gate), so "not blocked" is a logical check, not a timing
one: the ping is answered while the gate is still closed.  Real server subprocesses and
real BOSH / WebSocket clients.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import gevent.event
import pytest

from harness import NS_CLIENT, BoshClient, WsClient, q

NS_PING = "urn:xmpp:ping"


@pytest.fixture
def clients():
    made = []

    def make(server, kind):
        client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.stop()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


def ping(client, timeout: float = 5.0) -> None:
    reply = client.iq(f"<ping xmlns='{NS_PING}'/>", to="localhost", timeout=timeout)
    assert reply.get("type") == "result", ET.tostring(reply)


@pytest.mark.parametrize("kind", ["bosh", "websocket"])
def test_presence_updates_with_a_cached_roster_never_wait_on_a_hung_backend(make_server, backend, clients, kind):
    server = make_server(bosh_max_wait=5)
    bob = clients(server, "websocket")
    bob.login("bob", resource="b")
    assert bob.get_roster().get("type") == "result"
    bob.presence()
    alice = clients(server, kind)
    alice.login("alice", resource="a")
    assert alice.get_roster().get("type") == "result"  # cached from here on
    alice.presence()
    ping(alice)
    gets = backend.requests_for("alice")
    gate = gevent.event.Event()
    backend.set_fault("alice", "gate", gate)
    try:
        for n in range(5):
            alice.presence(f"<show>away</show><status>update {n}</status>")
        ping(alice)  # answered with the backend hung: nothing of the session waited on it
        for n in range(5):  # and bob, a contact, got every update meanwhile
            update = bob.recv(5, lambda e: e.tag == q(NS_CLIENT, "presence") and e.get("from") == "alice@localhost/a"
                              and e.find(q(NS_CLIENT, "status")) is not None)
            assert update.findtext(q(NS_CLIENT, "status")) == f"update {n}", ET.tostring(update)
        assert backend.requests_for("alice") == gets  # no fetch for a presence update
    finally:
        gate.set()
        backend.set_fault("alice", None, None)


@pytest.mark.parametrize("kind", ["bosh", "websocket"])
def test_initial_presence_while_the_roster_fetch_hangs_does_not_block_the_session(make_server, backend, clients, kind):
    """No cached roster: the login's fetch hangs.  The client's initial presence must wait
    for the roster (whom to tell), but the session's other stanzas are answered meanwhile."""
    server = make_server(bosh_max_wait=5, roster_read_timeout=30)
    gate = gevent.event.Event()
    backend.set_fault("alice", "gate", gate)
    try:
        alice = clients(server, kind)
        alice.login("alice", resource="a")  # bind starts the roster fetch, which hangs
        alice.presence()
        ping(alice)
    finally:
        gate.set()
        backend.set_fault("alice", None, None)
    assert alice.get_roster(timeout=10).get("type") == "result"
    ping(alice)

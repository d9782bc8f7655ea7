"""Nothing lost with offline messages in PostgreSQL (issue 14 on top of issue 10): real servers, killed.

The kill -9 / vanished-client tests of test_no_loss.py, imported and run again
with ``database_url`` set: the server is killed while its offline delivery is
in flight (rows claimed, not yet confirmed) and restarted with the same
node_id, which frees its previous life's claims.  Plus what only a shared
database has: two processes delivering to two resources of one user at once
hand out each message exactly once between them (cluster/pg_offline.py's
claims), a refused delivery frees its claims at once, and a cluster node killed
mid-delivery has its claims freed by the node that cleans it up.  One private
PostgreSQL for the module, a database per test.
"""

from __future__ import annotations

import signal
import time

import gevent
import psycopg
import pytest

from cluster_harness import database_url, pg  # noqa: F401  (fixtures)
from harness import stop_clients

import test_no_loss
from test_no_loss import (  # noqa: F401  (collected here with the PostgreSQL ``make_server``)
    collect,
    exactly_once,
    logged_in,
    send_messages,
    test_bosh_session_that_vanishes_with_offline_messages_unacknowledged_keeps_them,
    test_kill9_after_an_acknowledged_bosh_delivery_delivers_nothing_again,
    test_kill9_after_offline_messages_went_into_a_response_the_client_never_got,
    test_kill9_while_offline_messages_stream_to_a_slow_websocket_reader,
    test_kill9_with_400_stored_offline_messages_each_is_delivered_exactly_once,
)

pytestmark = pytest.mark.cluster


@pytest.fixture
def make_server(make_server, database_url):
    """conftest's make_server, every server on this test's PostgreSQL database."""

    def make(**settings):
        settings.setdefault("database_url", database_url)
        settings.setdefault("node_id", "n1")  # a restart is the same node: it frees its old claims
        return make_server(**settings)

    return make


def offline_rows(database_url: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT username, claim FROM offline ORDER BY id").fetchall()


def test_the_servers_here_really_store_offline_messages_in_postgresql(make_server, database_url):
    server = make_server(bosh_max_wait=5)
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    send_messages(alice, "bob@localhost", ["p1", "p2"])
    assert offline_rows(database_url) == [("bob", None), ("bob", None)]
    bob = logged_in("websocket", server, "bob", "b")
    exactly_once(collect(bob, 2), ["p1", "p2"])
    assert bob.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost").get("type") == "result"
    deadline = time.monotonic() + 10
    while offline_rows(database_url) and time.monotonic() < deadline:  # deleted once delivered
        gevent.sleep(0.05)
    assert offline_rows(database_url) == []


def test_two_processes_delivering_to_one_user_hand_out_each_message_once(make_server, database_url):
    """Two servers (node ids n1, n2) on one database; bob logs in to both at once: the rows are
    claimed page by page, so between his two resources every message arrives exactly once."""
    first = make_server(bosh_max_wait=5, node_id="n1")
    second = make_server(bosh_max_wait=5, node_id="n2", users=())  # the accounts are shared
    alice = logged_in("websocket", first, "alice", "a", presence=False)
    ids = [f"t{i}" for i in range(600)]
    send_messages(alice, "bob@localhost", ids)
    on_first = logged_in("websocket", first, "bob", "one", presence=False)
    on_second = logged_in("websocket", second, "bob", "two", presence=False)
    for client in (on_first, on_second):  # both initial presences in flight together
        client.presence()
    got_first = gevent.spawn(collect, on_first, 600, 30, 2.0)
    got_second = gevent.spawn(collect, on_second, 600, 30, 2.0)
    got = got_first.get() + got_second.get()
    exactly_once(got, ids)
    print(f"{len(got_first.value)} via n1, {len(got_second.value)} via n2")
    for client in (on_first, on_second):
        client.close()
    stop_clients(second.port)


def test_a_refused_delivery_releases_its_claims_for_another_process(make_server, database_url):
    """A BOSH session that vanishes unacknowledged: its rows are released (claim NULL), not left
    to the lease, so a second process delivers them at once."""
    first = make_server(bosh_max_wait=1, bosh_max_inactivity=2, node_id="n1")
    alice = logged_in("websocket", first, "alice", "a", presence=False)
    ids = [f"r{i}" for i in range(30)]
    send_messages(alice, "bob@localhost", ids)
    bob = test_no_loss.SyncBosh(first, "bob", "gone")
    bob.send_and_vanish("<presence xmlns='jabber:client'/>")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(claim for _user, claim in offline_rows(database_url)):
        gevent.sleep(0.05)
    assert all(claim and claim.startswith("n1:") for _user, claim in offline_rows(database_url))
    while time.monotonic() < deadline and any(claim for _user, claim in offline_rows(database_url)):
        gevent.sleep(0.1)  # inactivity ends the session: delivered(False) for each row
    assert offline_rows(database_url) == [("bob", None)] * 30
    second = make_server(bosh_max_wait=5, node_id="n2", users=())
    again = logged_in("websocket", second, "bob", "b")
    exactly_once(collect(again, 30), ids)
    again.close()
    stop_clients(second.port)


def test_rows_left_by_a_full_byte_window_are_released_when_the_delivery_is_refused(make_server, database_url):
    """Big messages: the 512 KiB byte window fills after a few rows of the first page, the rest
    of the page was claimed but never handed over.  When the BOSH session vanishes those rows
    are released too (claim NULL), so another process delivers everything at once, not after
    the 10-minute claim lease."""
    first = make_server(bosh_max_wait=1, bosh_max_inactivity=2, node_id="n1")
    alice = logged_in("websocket", first, "alice", "a", presence=False)
    ids = [f"w{i}" for i in range(20)]
    send_messages(alice, "bob@localhost", ids, body=lambda i: f"{i} " + "x" * 100_000)
    bob = test_no_loss.SyncBosh(first, "bob", "gone")
    bob.send_and_vanish("<presence xmlns='jabber:client'/>")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(claim for _user, claim in offline_rows(database_url)):
        gevent.sleep(0.05)
    assert all(claim and claim.startswith("n1:") for _user, claim in offline_rows(database_url))
    while time.monotonic() < deadline and any(claim for _user, claim in offline_rows(database_url)):
        gevent.sleep(0.1)  # inactivity ends the session: delivered(False), and the held rows freed
    assert offline_rows(database_url) == [("bob", None)] * 20
    second = make_server(bosh_max_wait=5, node_id="n2", users=())
    again = logged_in("websocket", second, "bob", "b")
    exactly_once(collect(again, 20), ids)
    again.close()
    stop_clients(second.port)


def test_kill9_of_a_cluster_node_mid_delivery_frees_its_claims_for_the_other_node(tmp_path, backend, database_url):
    """Two cluster nodes on one Redis and one PostgreSQL: n1 is killed while its offline delivery
    to bob is unacknowledged (rows claimed by n1).  n2 finds n1 dead (no heartbeat for
    cluster_node_timeout), cleans it up and frees its claims: bob gets every message on n2
    at once, not after the 10-minute claim lease."""
    from test_cluster import Cluster, RedisProcess

    redis_server = RedisProcess(str(tmp_path)).start()
    cluster = Cluster(tmp_path, redis_server, backend, database_url)
    try:
        n1, n2 = cluster.add(), cluster.add()
        alice = cluster.ws(n2, "alice", presence=False)
        ids = [f"c{i}" for i in range(40)]
        send_messages(alice, "bob@localhost", ids)
        bob = test_no_loss.SyncBosh(n1, "bob", "lost")
        bob.send_and_vanish("<presence xmlns='jabber:client'/>")  # the messages go into a response nobody reads
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(claim for _u, claim in offline_rows(database_url)):
            gevent.sleep(0.05)
        assert all(claim and claim.startswith("n1:") for _u, claim in offline_rows(database_url))
        n1.stop(signal.SIGKILL)
        deadline = time.monotonic() + 30  # cluster_node_timeout is 3 s here (test_cluster.FAST)
        while time.monotonic() < deadline and any(claim for _u, claim in offline_rows(database_url)):
            gevent.sleep(0.1)
        assert offline_rows(database_url) == [("bob", None)] * 40
        again = cluster.ws(n2, "bob", resource="again")
        exactly_once(collect(again, 40), ids)
    finally:
        cluster.close()
        redis_server.stop()

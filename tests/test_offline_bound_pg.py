"""offline_max_total_bytes with ``database_url`` (issue 10 point 15 on PostgreSQL).

The same scenario as tests/test_offline_bound.py (messages to several users fill the
bound, the rest bounce with service-unavailable, a kill -9 keeps the total, delivered
messages make room again) on a server whose offline storage is PostgreSQL
(cluster/pg_offline.py: the total is the ``offline_total`` row, kept by the same
transactions that add and delete rows, so every node of a cluster sees it), and the
running total checked against the rows themselves.
"""

from __future__ import annotations

import psycopg

from cluster_harness import database_url, pg  # noqa: F401  (fixtures)
from test_no_loss_pg import make_server  # noqa: F401  (every server on this test's database)
from harness import wait_for
from test_offline_bound import drain, login, send
from test_offline_bound import \
    test_offline_storage_as_a_whole_is_bounded_and_frees_up_as_messages_are_delivered as \
    test_postgresql_offline_storage_as_a_whole_is_bounded_and_frees_up  # noqa: F401  (collected here)


def totals(url: str) -> tuple[int, int]:
    """(the running total, the rows' real size)."""
    with psycopg.connect(url) as conn:
        (kept,) = conn.execute("SELECT bytes FROM offline_total WHERE id = 1").fetchone()
        (real,) = conn.execute("SELECT COALESCE(SUM(length(stanza)), 0) FROM offline").fetchone()
    return kept, real


def test_the_total_follows_the_rows_and_is_shared_by_two_processes(make_server, database_url):
    one = make_server(offline_max_total_bytes=12_000, offline_max_per_user=1000, c2s_stanza_rate=0, node_id="n1")
    two = make_server(offline_max_total_bytes=12_000, offline_max_per_user=1000, c2s_stanza_rate=0, node_id="n2")
    alice = login(one, "alice", "a", presence=False)
    carol = login(two, "carol", "c", presence=False)
    assert send(alice, "bob@localhost", [f"b{i}" for i in range(6)]) == []  # ~6.6 KB
    kept, real = totals(database_url)
    assert kept == real > 6000
    bounced = send(carol, "dave@localhost", [f"d{i}" for i in range(6)])  # the other process: the same bound
    assert bounced and "d0" not in bounced, bounced
    assert totals(database_url)[0] == totals(database_url)[1] <= 12_000
    assert "offline storage is full" in two.log()
    bob = login(one, "bob", "b", presence=True)
    assert sorted(drain(bob, 6)) == sorted(f"b{i}" for i in range(6))
    bob.sync()
    dave = login(two, "dave", "d", presence=True)
    assert len(drain(dave, 6 - len(bounced))) == 6 - len(bounced)
    dave.sync()
    # the deletes run in a greenlet after the delivery reports
    wait_for(lambda: totals(database_url) == (0, 0), timeout=10, what="the total back to 0 with the rows")

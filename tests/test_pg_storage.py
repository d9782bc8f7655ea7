"""PostgreSQL storage (issue 14): the SQLite storage tests, run again on a real PostgreSQL.

One private PostgreSQL (initdb, free loopback port, stopped by PID) for the
module; each test gets a database of its own.  The account-store tests of
test_accounts.py and the offline-storage tests of test_session_core.py are
imported here and run with PostgreSQL-backed fixtures of the same names, so
both backends pass the same tests; so are the archive's (test_archive.py) and the
MAM protocol's (test_mam_protocol.py) that need only an ``archive`` (and a clock),
on cluster/pg_archive.py.  Plus what only PostgreSQL has: a slow
query must not block the hub, migrations run once, and a clear error when
the database cannot be reached.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

import gevent
import psycopg
import pytest
import requests
from gevent.pywsgi import WSGIServer

from cluster_harness import database_url, pg  # noqa: F401  (fixtures)
from harness import ROOT, free_port

from boshroster.cluster.pg import PgDatabase, StorageUnavailable
from boshroster.cluster.pg_archive import PgArchive
from boshroster.cluster.pg_accounts import PgAccountStore
from boshroster.config import StartupError, load
from boshroster.wiring import Core

import test_accounts
import test_archive
import test_mam_protocol
import test_session_core
from test_archive import clock  # noqa: F401  (the injected clock both archive modules use)
from test_mam_protocol import mam  # noqa: F401  (MamService over the PostgreSQL ``archive`` below)
from test_accounts import (  # noqa: F401  (collected here with the PostgreSQL ``store``)
    test_errors,
    test_import_is_one_transaction_and_empty_input,
    test_import_lines_semantics,
    test_round_trip_and_prepared_names,
    test_saslprep_applied_to_passwords,
    test_scram_auth_info_matches_scramp,
    test_set_password_and_delete,
)
from test_session_core import (  # noqa: F401  (collected here with the PostgreSQL ``core``)
    test_negative_priority_resource_does_not_get_bare_messages_so_they_are_stored,
    test_offline_message_is_stored_and_delivered_with_delay_on_initial_presence,
    test_offline_message_to_a_full_jid_of_an_offline_user_is_stored,
)

pytestmark = pytest.mark.cluster


def _archive_tests(module, skip=()):
    """The module's tests whose only storage is the ``archive`` fixture (not a SQLite path or file)."""
    found = {}
    for name, fn in vars(module).items():
        if not name.startswith("test_") or not callable(fn) or name in skip:
            continue
        params = set(inspect.signature(fn).parameters)
        if ({"archive", "mam"} & params) and not ({"path", "tmp_path"} & params):
            found[f"{name}_pg"] = fn
    return found


# Collected here with the PostgreSQL ``archive``.  Left out: what reads SQLite's own tables.
globals().update(_archive_tests(test_archive, skip={"test_a_retracted_committed_message_is_deleted",
                                                  "test_a_refused_write_drops_the_queue_loudly_and_ids_stay_unique"}))
globals().update(_archive_tests(test_mam_protocol, skip={"test_an_unreadable_stored_stanza_is_sent_without_its_message"}))


@pytest.fixture
def store(database_url):
    s = PgAccountStore(database_url)
    yield s
    s.close()


@pytest.fixture
def archive(database_url, clock):
    database = PgDatabase(database_url, 4)
    made = PgArchive(database, clock=clock)
    yield made
    made.close()
    database.close()


@pytest.fixture
def backend():
    contacts = test_session_core.contacts_of
    return test_session_core.RosterBackendStub({"alice": contacts("bob", "carol"), "bob": contacts("alice"),
                                                "carol": contacts("alice"), "dave": contacts("alice")})


@pytest.fixture
def core(tmp_path, backend, database_url):
    config = load(None, env={}, data_dir=str(tmp_path / "data"), domain=test_session_core.DOMAIN,
                  scram_iterations=4096, database_url=database_url)
    made = Core(config, roster_backend=backend)
    assert type(made.offline).__name__ == "PgOfflineStore"
    assert type(made.archive).__name__ == "PgArchive"
    for user in ("alice", "bob", "carol", "dave"):
        made.accounts.add(user, test_session_core.PASSWORD)
    yield made
    made.shutdown()


def test_the_account_store_is_postgresql_and_shared_by_two_processes(database_url):
    first = PgAccountStore(database_url)
    second = PgAccountStore(database_url)  # like `boshroster user add` while the server runs
    first.add("alice", test_accounts.SECRET)
    assert second.exists("alice")
    assert second.check_password("alice", test_accounts.SECRET)
    first.close()
    second.close()


def test_migrations_run_once_and_record_their_version(database_url):
    PgAccountStore(database_url).close()
    database = PgDatabase(database_url, 2)
    assert database.migrate("accounts", [""]) == 1  # already at version 1: nothing run
    rows = database.execute("SELECT component, version FROM schema_version ORDER BY component").fetchall()
    assert rows == [("accounts", 1)]
    with pytest.raises(StartupError, match="newer than this"):
        database.migrate("accounts", [])
    database.close()


def test_a_slow_query_does_not_block_the_hub(database_url):
    """pg_sleep(1) in one greenlet while an HTTP server in this process answers at once."""
    database = PgDatabase(database_url, 2)
    server = WSGIServer(("127.0.0.1", free_port()), lambda env, start: (start("200 OK", []), [b"pong"])[1], log=None)
    server.start()
    try:
        slow = gevent.spawn(database.execute, "SELECT pg_sleep(1)")
        gevent.sleep(0.1)
        started = time.monotonic()
        answers = 0
        while not slow.ready():
            reply = requests.get(f"http://127.0.0.1:{server.server_port}/", timeout=2)
            assert reply.content == b"pong"
            answers += 1
        assert slow.get() is not None
        assert answers >= 20, f"only {answers} pings answered during the query"
        assert time.monotonic() - started < 2
    finally:
        server.stop()
        database.close()


def test_pool_is_bounded_and_waits_then_gives_up(database_url):
    database = PgDatabase(database_url, 1, timeout=0.3)
    holder = gevent.spawn(database.execute, "SELECT pg_sleep(1)")
    gevent.sleep(0.1)
    with pytest.raises(StorageUnavailable, match="no free connection"):
        database.execute("SELECT 1")
    holder.join()
    assert database.execute("SELECT 1").fetchone() == (1,)
    database.close()


def test_every_statement_and_lock_wait_is_bounded(database_url):
    """A statement (or the lock it waits for) cannot hold a pooled connection forever: every
    connection has a statement_timeout and TCP keepalives / tcp_user_timeout; a statement
    cancelled by it is StorageUnavailable to the caller, like an unreachable server."""
    database = PgDatabase(database_url)
    try:
        assert database.execute("SHOW statement_timeout").fetchone()[0] == "1min"
        with database.connection() as conn:
            assert "tcp_user_timeout=30000" in conn.info.dsn and "keepalives=1" in conn.info.dsn
        with pytest.raises(StorageUnavailable):
            with database.transaction() as tx:
                tx.execute("SET LOCAL statement_timeout = 200")  # the default, shortened for the test
                tx.execute("SELECT pg_sleep(5)")
        assert database.execute("SELECT 1").fetchone()[0] == 1  # the pool is still usable
    finally:
        database.close()


def test_unreachable_postgresql_at_start_is_a_clear_error(tmp_path):
    url = f"postgresql://boshroster:secret@127.0.0.1:{free_port()}/boshroster"
    config_path = tmp_path / "b.toml"
    config_path.write_text(f'data_dir = "{tmp_path}/data"\ndatabase_url = "{url}"\nhttp_ports = [{free_port()}]\n')
    result = subprocess.run([sys.executable, "-m", "boshroster", "serve", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1
    assert "database_url" in result.stderr and "cannot reach PostgreSQL" in result.stderr, result.stderr
    assert "secret" not in result.stderr  # the password is never printed
    result = subprocess.run([sys.executable, "-m", "boshroster", "user", "list", "--config", str(config_path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1 and "cannot reach PostgreSQL" in result.stderr


# -- the archive on PostgreSQL: what only a shared database has -------------------------------

def test_two_nodes_archive_for_the_same_users_without_clashing(database_url, clock):
    """Two PgArchive (two nodes) store alternately for the same two users: ordinals, counts and
    ids stay exact, each node reads what the other wrote, and a retraction on one never lets
    an id it handed out name the message the other stores next."""
    databases = [PgDatabase(database_url, 2), PgDatabase(database_url, 2)]
    nodes = [PgArchive(db, clock=clock) for db in databases]
    try:
        A, B = test_archive.A, test_archive.B
        sent = []
        for i in range(10):
            sent.append(test_archive.chat(nodes[i % 2], clock, A, B, f"m{i}"))
            if i % 4 != 2:
                nodes[i % 2].flush()  # archive order is commit order (m2 waits for m3's node to commit)
        nodes[0].flush()
        order = [0, 1, 3, 2, 4, 5, 7, 6, 8, 9]
        sent = [sent[i] for i in order]
        for node in nodes:
            page = node.query(A, test_archive.ArchiveQuery(max=50))
            assert test_archive.bodies(page) == [f"m{i}" for i in order] and page.count == 10
            assert [m.id for m in page.items] == [s for s, _ in sent]
            assert [m.id for m in node.query(B, test_archive.ArchiveQuery(max=50)).items] == [r for _, r in sent]
        bounced = test_archive.stored_chat(nodes[0], clock, A, B, "bounced")
        seen = list(bounced)
        assert nodes[0].retract(bounced.token) == 2
        after = test_archive.chat(nodes[1], clock, A, B, "next")
        nodes[1].flush()
        assert after[0] not in seen and after[1] not in seen
        page = nodes[0].query(A, test_archive.ArchiveQuery(max=50, before=""))
        assert test_archive.bodies(page)[-1] == "next" and page.count == 11
        with pytest.raises(test_archive.ItemNotFound):
            nodes[1].query(B, test_archive.ArchiveQuery(after=seen[1]))
    finally:
        for node, db in zip(nodes, databases):
            node.close()
            db.close()


def test_retention_on_postgresql_deletes_the_oldest(archive, clock):
    A, B = test_archive.A, test_archive.B
    for i in range(5):
        test_archive.chat(archive, clock, A, B, f"old{i}")
    cutoff = clock.now + 0.5
    for i in range(3):
        test_archive.chat(archive, clock, B, A, f"new{i}")
    assert archive.expire(cutoff) == 10  # 5 messages, 2 archives each
    for owner in (A, B):
        page = archive.query(owner, test_archive.ArchiveQuery())
        assert test_archive.bodies(page) == ["new0", "new1", "new2"] and page.count == 3
    assert archive.db.execute("SELECT COUNT(*) FROM mam_body").fetchone()[0] == 3
    assert archive.expire(cutoff) == 0


def test_restarted_nodes_do_not_use_up_owner_and_peer_ids(database_url, clock):
    """Owner ids are bounded (OWNER_MAX): a node meeting known users again (a restart, a cache
    reset) finds their rows without an INSERT, whose ON CONFLICT would still take an id."""
    A, B = test_archive.A, test_archive.B
    database = PgDatabase(database_url, 2)
    try:
        for _restart in range(3):
            node = PgArchive(database, clock=clock)
            test_archive.chat(node, clock, A, B, "again")
            node.close()
        node = PgArchive(database, clock=clock)
        test_archive.chat(node, clock, A, "carol@localhost", "new owner and peer")
        node.close()
        owners = dict(database.execute("SELECT jid, id FROM mam_owners").fetchall())
        peers = dict(database.execute("SELECT jid, id FROM mam_peers").fetchall())
        assert owners["carol@localhost"] == max(owners[A], owners[B]) + 1
        assert peers["carol@localhost"] == max(peers[A], peers[B]) + 1
    finally:
        database.close()


def test_a_server_with_database_url_archives_in_postgresql(tmp_path, database_url):
    """The real server: the archive is PostgreSQL's, live ids match the archive, a bounced
    message (offline storage full) is not in it."""
    from backend_app import TestBackend
    from conftest import demo_contacts
    from harness import NS_CLIENT, ServerProcess, WsClient, q
    from test_mam_e2e import archive_of, error_condition, stanza_ids

    roster = TestBackend(demo_contacts()).start()
    (tmp_path / "srv").mkdir()
    server = ServerProcess(tmp_path / "srv", http_roster_url=roster.url_template, database_url=database_url,
                           offline_max_per_user=1).start()
    alice, bob = WsClient(server.ws_url), WsClient(server.ws_url)
    try:
        alice.login("alice", resource="web")
        bob.login("bob", resource="web")
        bob.presence()
        alice.message("bob@localhost", "live")
        live = bob.recv_message(timeout=10)
        alice.message("carol@localhost", "stored")
        alice.message("carol@localhost", "bounced")
        error = alice.recv(10, lambda e: e.tag == q(NS_CLIENT, "message") and e.get("type") == "error")
        assert error_condition(error) == "service-unavailable"
        items, count = archive_of(bob)
        assert [(sid, body) for sid, body, _ in items] == [(stanza_ids(live)["bob@localhost"], "live")]
        items, count = archive_of(alice)
        assert [body for _, body, _ in items] == ["live", "stored"] and count == "2"
        with psycopg.connect(database_url) as conn:
            rows = conn.execute("SELECT COUNT(*) FROM mam_archive").fetchone()[0]
        assert rows == 4  # live and stored, in both parties' archives
    finally:
        alice.stop()
        bob.stop()
        server.stop()
        roster.stop()


def test_postgresql_away_costs_the_archive_not_the_message(database_url, clock, caplog):
    """The database goes away: a message is still accepted (no stanza-id, one WARNING, no
    traceback), a MAM query is refused with internal-server-error (wait)."""
    import logging

    from boshroster.im.mam import MamService
    from boshroster.xmpp.errors import StanzaError
    from boshroster.xmpp.jid import JID
    from boshroster.xmpp.router import StanzaEvent

    database = PgDatabase(database_url, 2)
    archive = PgArchive(database, clock=clock)
    service = MamService(archive, "localhost")
    database.close()  # every call now raises StorageUnavailable, as when PostgreSQL is down

    class Origin:
        jid = JID.parse("alice@localhost/pc")

    stanzas = [test_mam_protocol.xmlio.parse("<message xmlns='jabber:client' from='alice@localhost/pc'"
                                             f" to='bob@localhost' type='chat'><body>m{i}</body></message>", 4096)
               for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="boshroster.mam"):
        for stanza in stanzas:
            assert service._on_accepted(StanzaEvent(Origin(), stanza, JID.parse("bob@localhost"))) is None
    assert all(stanza.find("{urn:xmpp:sid:0}stanza-id") is None for stanza in stanzas)
    warnings = [r for r in caplog.records if r.name == "boshroster.mam"]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING" and warnings[0].exc_info is None
    iq = test_mam_protocol.xmlio.parse("<iq xmlns='jabber:client' type='set' id='q'><query xmlns='urn:xmpp:mam:2'/></iq>", 4096)
    with pytest.raises(StanzaError) as err:
        service.handle_iq("alice", iq, None)
    assert err.value.condition == "internal-server-error"
    archive.close()

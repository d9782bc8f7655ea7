"""Archive storage (boshroster/im/archive*.py) on a real SQLite file: no sockets, no server.

Queries, RSM paging both ways, 'with' filters, date bounds, ids, counts, retention,
preferences, persistence across reopen (and across a simulated crash), the bounded write
queue and a refused write.  Time comes from an injected clock, never from sleeping.
"""

from __future__ import annotations

import logging
import sqlite3

import gevent
import pytest

from boshroster.im.archive import ArchiveQuery, Copy, ItemNotFound, Prefs, Unsupported, parse_duration
from boshroster.im.archive_sqlite import SqliteArchive
from boshroster.xmpp import xmlio

A, B, C = "alice@localhost", "bob@localhost", "carol@localhost"
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "archive.sqlite3")


@pytest.fixture
def archive(path, clock):
    store = SqliteArchive(path, clock=clock)
    yield store
    store.close()


def chat(store, clock, sender, recipient, body, *, sender_res="pc", recipient_res=None, step=1.0):
    """Archive one chat message in both parties' archives; return (sender id, recipient id)."""
    clock.now += step
    to = recipient if recipient_res is None else f"{recipient}/{recipient_res}"
    stanza = xmlio.parse(f'<message xmlns="jabber:client" from="{sender}/{sender_res}" to="{to}" type="chat">'
                         f'<body>{body}</body></message>', 1 << 20)
    copies = [Copy(sender, recipient, recipient_res, True)]
    if recipient != sender:
        copies.append(Copy(recipient, sender, sender_res, False))
    ids = store.store(stanza, copies)
    return ids[0], ids[-1]


def bodies(page):
    return [m.stanza.findtext("{jabber:client}body") for m in page.items]


def test_store_then_query_returns_both_directions_with_distinct_opaque_ids(archive, clock):
    sent_id, received_id = chat(archive, clock, A, B, "hello")
    chat(archive, clock, B, A, "hi alice")
    mine = archive.query(A, ArchiveQuery())
    theirs = archive.query(B, ArchiveQuery())
    assert bodies(mine) == bodies(theirs) == ["hello", "hi alice"]
    assert [m.outgoing for m in mine.items] == [True, False]
    assert [m.outgoing for m in theirs.items] == [False, True]
    assert [m.peer for m in mine.items] == [B, B] and [m.peer for m in theirs.items] == [A, A]
    assert mine.items[0].id == sent_id and theirs.items[0].id == received_id
    assert sent_id != received_id
    ids = [m.id for m in mine.items + theirs.items]
    assert len(set(ids)) == 4 and all(len(i) == 22 for i in ids)
    assert mine.items[0].stamp == T0 + 1 and mine.items[1].stamp == T0 + 2
    assert mine.complete and mine.count == 2 and mine.first_index == 0


def test_stanza_is_stored_once_for_both_parties(archive, clock, path):
    chat(archive, clock, A, B, "once")
    archive.flush()
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM body").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM archive").fetchone()[0] == 2


def page_forward(store, owner, total_expected, **filters):
    seen, after, pages = [], None, []
    while True:
        page = store.query(owner, ArchiveQuery(max=50, after=after, **filters))
        pages.append(page)
        seen += page.items
        if page.complete:
            break
        after = page.items[-1].id
        assert len(pages) < 10
    return seen, pages


def test_paging_120_messages_forward_with_max_50_returns_each_once_in_order(archive, clock):
    for i in range(120):
        chat(archive, clock, *((A, B) if i % 2 == 0 else (B, A)), f"m{i}")
    seen, pages = page_forward(archive, A, 120)
    assert [len(p.items) for p in pages] == [50, 50, 20]
    assert [p.complete for p in pages] == [False, False, True]
    assert [p.count for p in pages] == [120, 120, 120]
    assert [p.first_index for p in pages] == [0, 50, 100]
    assert [b for p in pages for b in bodies(p)] == [f"m{i}" for i in range(120)]
    assert len({m.id for m in seen}) == 120
    assert [m.outgoing for m in seen] == [i % 2 == 0 for i in range(120)]


def test_paging_backwards_from_the_last_page(archive, clock):
    for i in range(120):
        chat(archive, clock, A, B, f"m{i}")
    pages, before = [], ""
    while True:
        page = archive.query(B, ArchiveQuery(max=50, before=before))
        pages.append(page)
        if page.complete:
            break
        before = page.items[0].id
    assert [len(p.items) for p in pages] == [50, 50, 20]
    assert [p.first_index for p in pages] == [70, 20, 0]
    assert [p.complete for p in pages] == [False, False, True]
    # Each page is chronological; the pages go back in time.
    got = [b for p in reversed(pages) for b in bodies(p)]
    assert got == [f"m{i}" for i in range(120)]


def test_last_page_of_a_big_archive_is_the_newest_messages(archive, clock):
    for i in range(300):
        chat(archive, clock, A, B, f"m{i}", step=0.001)
    page = archive.query(A, ArchiveQuery(max=50, before=""))
    assert bodies(page) == [f"m{i}" for i in range(250, 300)]
    assert page.count == 300 and page.first_index == 250 and not page.complete


def test_with_filters_bare_full_and_self(archive, clock):
    chat(archive, clock, A, B, "to bob from pc", sender_res="pc")
    chat(archive, clock, A, C, "to carol")
    chat(archive, clock, B, A, "bob from phone", sender_res="phone")
    chat(archive, clock, B, A, "bob from laptop", sender_res="laptop")
    chat(archive, clock, A, A, "note to self")
    chat(archive, clock, A, B, "to bob's phone", recipient_res="phone")
    with_bob = archive.query(A, ArchiveQuery(with_jid=B))
    assert bodies(with_bob) == ["to bob from pc", "bob from phone", "bob from laptop", "to bob's phone"]
    assert with_bob.count == 4 and with_bob.complete
    assert bodies(archive.query(A, ArchiveQuery(with_jid=C))) == ["to carol"]
    phone = archive.query(A, ArchiveQuery(with_jid=B, with_resource="phone"))
    assert bodies(phone) == ["bob from phone", "to bob's phone"]
    assert phone.count is None and phone.first_index is None  # not counted: it would read the conversation
    assert bodies(archive.query(A, ArchiveQuery(with_jid=A))) == ["note to self"]
    assert archive.query(A, ArchiveQuery(with_jid="nobody@localhost")).items == []
    # Carol's archive only has her conversation with alice.
    assert bodies(archive.query(C, ArchiveQuery())) == ["to carol"]
    assert bodies(archive.query(C, ArchiveQuery(with_jid=B))) == []


def test_with_filter_pages_and_counts_within_the_conversation(archive, clock):
    for i in range(130):
        chat(archive, clock, A, B if i % 3 else C, f"m{i}")
    expected = [f"m{i}" for i in range(130) if i % 3]
    seen, pages = page_forward(archive, A, len(expected), with_jid=B)
    assert [m.stanza.findtext("{jabber:client}body") for m in seen] == expected
    assert pages[0].count == len(expected) == 86
    assert [p.first_index for p in pages] == [0, 50]
    last = archive.query(A, ArchiveQuery(with_jid=B, max=10, before=""))
    assert bodies(last) == expected[-10:] and last.first_index == 76
    indexed = archive.query(A, ArchiveQuery(with_jid=B, max=5, index=40))
    assert bodies(indexed) == expected[40:45] and indexed.first_index == 40
    full = archive.query(A, ArchiveQuery(with_jid=B, with_resource="nothere"))
    assert full.items == [] and full.count is None and full.complete
    with pytest.raises(Unsupported):
        archive.query(A, ArchiveQuery(with_jid=B, with_resource="pc", index=3))
    paged = archive.query(A, ArchiveQuery(with_jid=C, with_resource="pc", max=2, before=""))
    assert bodies(paged) == [] and paged.complete  # alice's messages to carol have no resource


def test_date_bounds_are_inclusive(archive, clock):
    for i in range(10):
        chat(archive, clock, A, B, f"m{i}")  # stamps T0+1 .. T0+10
    page = archive.query(A, ArchiveQuery(start=T0 + 3, end=T0 + 6))
    assert bodies(page) == ["m2", "m3", "m4", "m5"] and page.count == 4 and page.first_index == 0
    assert bodies(archive.query(A, ArchiveQuery(start=T0 + 9.5))) == ["m9"]
    assert bodies(archive.query(A, ArchiveQuery(end=T0 + 1))) == ["m0"]
    assert archive.query(A, ArchiveQuery(start=T0 + 11)).items == []
    assert archive.query(A, ArchiveQuery(start=T0 + 6, end=T0 + 3)).items == []
    with_dates = archive.query(A, ArchiveQuery(with_jid=B, start=T0 + 5, max=2))
    assert bodies(with_dates) == ["m4", "m5"] and with_dates.count == 6 and not with_dates.complete


def test_clock_going_back_keeps_archive_order_and_monotonic_stamps(archive, clock):
    chat(archive, clock, A, B, "first")
    clock.now -= 3600
    chat(archive, clock, A, B, "second")
    page = archive.query(A, ArchiveQuery())
    assert bodies(page) == ["first", "second"]
    assert page.items[1].stamp >= page.items[0].stamp


def test_before_id_and_after_id_are_exclusive_and_combine(archive, clock):
    ids = [chat(archive, clock, A, B, f"m{i}")[0] for i in range(10)]
    assert bodies(archive.query(A, ArchiveQuery(after_id=ids[6]))) == ["m7", "m8", "m9"]
    assert bodies(archive.query(A, ArchiveQuery(before_id=ids[2]))) == ["m0", "m1"]
    between = archive.query(A, ArchiveQuery(after_id=ids[2], before_id=ids[6]))
    assert bodies(between) == ["m3", "m4", "m5"] and between.count == 3
    # RSM after/before page inside the before-id/after-id range.
    assert bodies(archive.query(A, ArchiveQuery(after_id=ids[1], max=2, before=""))) == ["m8", "m9"]
    assert bodies(archive.query(A, ArchiveQuery(after=ids[3], before=ids[6]))) == ["m4", "m5"]


def test_ids_field_returns_those_messages_in_archive_order(archive, clock):
    ids = [chat(archive, clock, A, B, f"m{i}")[0] for i in range(10)]
    page = archive.query(A, ArchiveQuery(ids=[ids[7], ids[2], ids[5]]))
    assert bodies(page) == ["m2", "m5", "m7"] and page.count == 3 and page.complete
    limited = archive.query(A, ArchiveQuery(ids=[ids[7], ids[2], ids[5]], max=2))
    assert bodies(limited) == ["m2", "m5"] and not limited.complete
    assert bodies(archive.query(A, ArchiveQuery(ids=[ids[1]], with_jid=C))) == []
    last = archive.query(A, ArchiveQuery(ids=ids[:4], max=2, before=""))
    assert bodies(last) == ["m2", "m3"] and last.first_index == 2


@pytest.mark.parametrize("field", ["after_id", "before_id", "after", "before", "ids"])
def test_unknown_ids_are_item_not_found(archive, clock, field):
    sent, received = chat(archive, clock, A, B, "x")
    bad_ids = [
        "nope",  # not even the right shape
        "A" * 22,  # right shape, not one of ours
        received,  # a real id, but of bob's archive
        sent[:-1] + ("B" if sent[-1] != "B" else "C"),  # one of ours, altered
        "",  # empty
    ]
    for bad in bad_ids:
        if field == "before" and bad == "":
            continue  # empty <before/> means "the last page"
        value = [bad] if field == "ids" else bad
        with pytest.raises(ItemNotFound):
            archive.query(A, ArchiveQuery(**{field: value}))
    # and in an archive that has nothing at all
    with pytest.raises(ItemNotFound):
        archive.query("nobody@localhost", ArchiveQuery(**{field: [sent] if field == "ids" else sent}))


def test_count_only_with_max_zero(archive, clock):
    for i in range(7):
        chat(archive, clock, A, B, f"m{i}")
    page = archive.query(A, ArchiveQuery(max=0))
    assert page.items == [] and page.count == 7 and not page.complete and page.first_index is None
    empty = archive.query(C, ArchiveQuery(max=0))
    assert empty.items == [] and empty.count == 0 and empty.complete


def test_rsm_index_starts_a_page_at_a_position(archive, clock):
    for i in range(20):
        chat(archive, clock, A, B, f"m{i}")
    page = archive.query(A, ArchiveQuery(max=3, index=15))
    assert bodies(page) == ["m15", "m16", "m17"] and page.first_index == 15
    assert archive.query(A, ArchiveQuery(max=3, index=20)).items == []


def test_empty_archive(archive):
    page = archive.query(A, ArchiveQuery())
    assert page.items == [] and page.complete and page.count == 0
    assert archive.bounds(A) is None


def test_bounds_are_first_and_last_message(archive, clock):
    first, _ = chat(archive, clock, A, B, "one")
    chat(archive, clock, A, B, "two")
    last, _ = chat(archive, clock, B, A, "three")
    lo, hi = archive.bounds(A)
    assert (lo.id, hi.id) == (first, archive.query(A, ArchiveQuery()).items[-1].id)
    assert lo.stamp == T0 + 1 and hi.stamp == T0 + 3


def test_retention_deletes_the_oldest_and_hides_expired_before_cleanup(path, clock):
    store = SqliteArchive(path, clock=clock, expires_after=100.0)
    try:
        for i in range(10):
            chat(store, clock, A, B, f"old{i}")  # T0+1 .. T0+10
        clock.now = T0 + 200
        kept = [chat(store, clock, A, B, f"new{i}")[0] for i in range(5)]  # T0+201 .. T0+205
        # Not cleaned up yet, but already gone for the client.
        page = store.query(A, ArchiveQuery())
        assert bodies(page) == [f"new{i}" for i in range(5)] and page.count == 5
        assert store.bounds(A)[0].id == kept[0]
        deleted = store.expire(clock.now - 100)
        assert deleted == 20  # ten messages in two archives
        db = sqlite3.connect(path)
        assert db.execute("SELECT COUNT(*) FROM archive").fetchone()[0] == 10
        assert db.execute("SELECT COUNT(*) FROM body").fetchone()[0] == 5
        clock.now = T0 + 500
        store.expire(clock.now - 100)
        assert store.query(A, ArchiveQuery()).items == []
        # Ids are never reused, even once a whole archive has expired.
        fresh = chat(store, clock, A, B, "after")[0]
        assert fresh not in kept
        assert bodies(store.query(A, ArchiveQuery())) == ["after"]
        assert store.query(A, ArchiveQuery()).count == 1
    finally:
        store.close()


def test_retention_runs_in_the_background(path, clock):
    store = SqliteArchive(path, clock=clock, expires_after=10.0, cleanup_interval=0.01)
    try:
        chat(store, clock, A, B, "old")
        store.flush()
        clock.now += 60
        store.start()
        gevent.sleep(0.05)
        db = sqlite3.connect(path)
        assert db.execute("SELECT COUNT(*) FROM archive").fetchone()[0] == 0
    finally:
        store.close()


def test_prefs_default_set_and_never_wins(archive, path, clock):
    assert archive.prefs(A) == Prefs("always")
    applied = archive.set_prefs(A, Prefs("roster", always=(B, C, B), never=(C, "dave@localhost/phone")))
    assert applied == Prefs("roster", always=(B,), never=(C, "dave@localhost/phone"))
    assert archive.prefs(A) == applied
    roster = {"erin@localhost"}.__contains__
    assert applied.archives(B, None, roster)
    assert not applied.archives(C, f"{C}/x", roster)
    assert applied.archives("erin@localhost", None, roster)
    assert not applied.archives("frank@localhost", None, roster)
    assert not applied.archives("dave@localhost", "dave@localhost/phone", roster)
    assert not applied.archives("dave@localhost", "dave@localhost/pc", roster)  # default roster: not in it
    assert Prefs("never").archives(B, None, None) is False
    assert Prefs("never", always=(f"{B}/pc",)).archives(B, f"{B}/pc", None) is True
    archive.close()
    reopened = SqliteArchive(path, clock=clock)
    try:
        assert reopened.prefs(A) == applied
        assert reopened.prefs(B) == Prefs("always")
    finally:
        reopened.close()


def test_prefs_refuse_bad_input(archive):
    with pytest.raises(ValueError):
        archive.set_prefs(A, Prefs("sometimes"))
    with pytest.raises(ValueError):
        archive.set_prefs(A, Prefs("always", always=tuple(f"u{i}@localhost" for i in range(1001))))


def test_default_policy_is_configurable(path):
    store = SqliteArchive(path, default_policy="roster")
    try:
        assert store.prefs(A) == Prefs("roster")
    finally:
        store.close()
    with pytest.raises(ValueError):
        SqliteArchive(path, default_policy="maybe")


def test_reopen_keeps_messages_order_and_ids(path, clock):
    store = SqliteArchive(path, clock=clock)
    first = [chat(store, clock, A, B, f"m{i}")[0] for i in range(3)]
    store.close()
    store = SqliteArchive(path, clock=clock)
    try:
        more = [chat(store, clock, A, B, f"n{i}")[0] for i in range(2)]
        page = store.query(A, ArchiveQuery())
        assert bodies(page) == ["m0", "m1", "m2", "n0", "n1"]
        assert [m.id for m in page.items] == first + more
        assert bodies(store.query(A, ArchiveQuery(after=first[2]))) == ["n0", "n1"]
    finally:
        store.close()


def test_crash_loses_only_the_queue_and_its_ids_never_name_another_message(path, clock):
    store = SqliteArchive(path, clock=clock, flush_interval=60)
    kept = chat(store, clock, A, B, "committed")[0]
    store.flush()
    lost = chat(store, clock, A, B, "queued, then the process dies")[0]
    store.db.close()  # a crash: the queue is never written
    store._closed = True
    again = SqliteArchive(path, clock=clock)
    try:
        assert bodies(again.query(A, ArchiveQuery())) == ["committed"]
        newer = chat(again, clock, A, B, "after restart")[0]
        assert newer != lost
        with pytest.raises(ItemNotFound):
            again.query(A, ArchiveQuery(after=lost))
        assert bodies(again.query(A, ArchiveQuery(after=kept))) == ["after restart"]
        assert again.query(A, ArchiveQuery()).count == 2
    finally:
        again.close()


def test_writes_are_batched_until_flush_and_committed_by_the_writer(path, clock):
    store = SqliteArchive(path, clock=clock, flush_interval=0.01)
    try:
        watcher = sqlite3.connect(path)
        for i in range(25):
            chat(store, clock, A, B, f"m{i}")
        assert watcher.execute("SELECT COUNT(*) FROM body").fetchone()[0] == 0  # queued, one batch
        gevent.sleep(0.05)  # the writer's turn
        assert watcher.execute("SELECT COUNT(*) FROM body").fetchone()[0] == 25
        assert watcher.execute("SELECT COUNT(*) FROM archive").fetchone()[0] == 50
    finally:
        store.close()


def test_full_queue_flushes_in_the_caller_and_says_so(path, clock, caplog):
    store = SqliteArchive(path, clock=clock, max_pending=4, flush_interval=60)
    try:
        watcher = sqlite3.connect(path)
        with caplog.at_level(logging.WARNING, logger="boshroster.archive"):
            for i in range(10):
                chat(store, clock, A, B, f"m{i}")
                assert len(store._pending) < 4
        assert watcher.execute("SELECT COUNT(*) FROM body").fetchone()[0] == 8
        assert any("queue full" in r.message for r in caplog.records)
        assert bodies(store.query(A, ArchiveQuery())) == [f"m{i}" for i in range(10)]
    finally:
        store.close()


def test_close_flushes_the_queue(path, clock):
    store = SqliteArchive(path, clock=clock, flush_interval=60)
    chat(store, clock, A, B, "last words")
    store.close()
    again = SqliteArchive(path, clock=clock)
    try:
        assert bodies(again.query(B, ArchiveQuery())) == ["last words"]
    finally:
        again.close()


def test_a_refused_write_drops_the_queue_loudly_and_ids_stay_unique(archive, clock, caplog):
    before = chat(archive, clock, A, B, "fine")[0]
    archive.flush()
    archive.db.execute("PRAGMA query_only=1")  # every write now fails, as with a full disk
    doomed = chat(archive, clock, A, B, "doomed")[0]
    with caplog.at_level(logging.ERROR, logger="boshroster.archive"):
        assert archive.flush() == 0
    assert any("not archived" in r.message for r in caplog.records)
    archive.db.execute("PRAGMA query_only=0")
    after = chat(archive, clock, A, B, "works again")[0]
    assert after not in (before, doomed)
    page = archive.query(A, ArchiveQuery())
    assert bodies(page) == ["fine", "works again"] and page.count == 2
    with pytest.raises(ItemNotFound):
        archive.query(A, ArchiveQuery(after=doomed))


@pytest.mark.parametrize(
    "text, seconds",
    [("never", None), ("1w", 604800.0), ("2d", 172800.0), ("12h", 43200.0), ("3600", 3600.0), (90, 90.0),
     ("1y", 365.2425 * 86400), ("1m", 31 * 86400.0), (" 5 D ", 432000.0)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "1 week", "-1d", "0", 0, -5, "1x"])
def test_parse_duration_refuses(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("setting, key", [
    ({"archive_expires_after": "soon"}, "archive_expires_after"),
    ({"archive_expires_after": "0"}, "archive_expires_after"),
    ({"archive_default_policy": "sometimes"}, "archive_default_policy"),
    ({"mam_default_page": 300}, "mam_default_page"),
    ({"mam_max_page": 0}, "mam_max_page"),
    ({"archive_queue_max": 0}, "archive_queue_max"),
    ({"archive_flush_interval": -1.0}, "archive_flush_interval"),
    ({"archive_cleanup_interval": 0.0}, "archive_cleanup_interval"),
])
def test_bad_archive_settings_are_refused_naming_the_key(setting, key):
    from boshroster import config

    with pytest.raises(config.ConfigError, match=key):
        config.load(env={}, **setting)


def test_archive_settings_reach_the_store(tmp_path):
    from boshroster import config
    from boshroster.im.archive_sqlite import open_archive

    cfg = config.load(env={}, data_dir=str(tmp_path), archive_expires_after="2d", archive_default_policy="roster",
                      archive_flush_interval=0.2, archive_queue_max=7, archive_cleanup_interval=60.0)
    store = open_archive(cfg)
    try:
        assert store.expires_after == 172800.0 and store.default_policy == "roster"
        assert store.flush_interval == 0.2 and store.max_pending == 7 and store.cleanup_interval == 60.0
        assert (tmp_path / "archive.sqlite3").exists()
    finally:
        store.close()
    never = open_archive(config.load(env={}, data_dir=str(tmp_path), archive_expires_after="never"))
    try:
        assert never.expires_after is None
    finally:
        never.close()


def test_stored_stanzas_come_back_exactly(archive, clock):
    text = ('<message xmlns="jabber:client" from="alice@localhost/pc" to="bob@localhost" type="chat" id="x1" '
            'xml:lang="fr"><body>héllo &amp; &lt;b&gt; 😀</body>'
            '<html xmlns="http://jabber.org/protocol/xhtml-im"><body xmlns="http://www.w3.org/1999/xhtml">'
            '<p>one <b>two</b> three</p></body></html>'
            '<encrypted xmlns="eu.siacs.conversations.axolotl"><header sid="1"><key rid="2">a2V5</key>'
            '<iv>aXY=</iv></header><payload>cGF5</payload></encrypted>\n  '
            '<origin-id xmlns="urn:xmpp:sid:0" id="o1"/></message>')
    original = xmlio.parse(text, 1 << 20)
    archive.store(original, [Copy(A, B, None, True)])
    original.append(xmlio.E("{urn:xmpp:sid:0}stanza-id", {"by": B, "id": "later"}))  # the caller stamps after
    got = archive.query(A, ArchiveQuery()).items[0].stanza
    assert xmlio.tostring(got) == xmlio.tostring(xmlio.parse(text, 1 << 20))
    assert got.get("{http://www.w3.org/XML/1998/namespace}lang") == "fr"


def stored_chat(store, clock, sender, recipient, body):
    """Like chat(), but returns what store() returned (ids and the retract token)."""
    clock.now += 1
    stanza = xmlio.parse(f'<message xmlns="jabber:client" from="{sender}/pc" to="{recipient}" type="chat">'
                         f'<body>{body}</body></message>', 1 << 20)
    return store.store(stanza, [Copy(sender, recipient, None, True), Copy(recipient, sender, "pc", False)])


def test_a_retracted_queued_message_leaves_no_hole_and_its_ids_name_nothing(archive, clock):
    chat(archive, clock, A, B, "kept")
    bounced = stored_chat(archive, clock, A, B, "bounced")
    seen = list(bounced)  # the ids as the live path would have read them
    assert archive.retract(bounced.token) == 2
    chat(archive, clock, B, A, "next")
    for owner in (A, B):
        page = archive.query(owner, ArchiveQuery())
        assert bodies(page) == ["kept", "next"] and page.count == 2
        assert archive.query(owner, ArchiveQuery(with_jid=A if owner == B else B)).count == 2
    for owner, sid in ((A, seen[0]), (B, seen[1])):
        with pytest.raises(ItemNotFound):
            archive.query(owner, ArchiveQuery(after=sid))


def test_a_retracted_committed_message_is_deleted(archive, clock, path):
    chat(archive, clock, A, B, "kept")
    bounced = stored_chat(archive, clock, A, B, "bounced")
    seen = list(bounced)
    archive.flush()
    assert archive.retract(bounced.token) == 2
    assert bodies(archive.query(A, ArchiveQuery())) == ["kept"]
    with pytest.raises(ItemNotFound):
        archive.query(B, ArchiveQuery(before=seen[1]))
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM body").fetchone()[0] == 1
    assert archive.retract(bounced.token) == 0  # twice: nothing more to take back


def test_ids_are_computed_when_read_and_stay_stable(archive, clock):
    stored = stored_chat(archive, clock, A, B, "lazy")
    recipient_id = stored[1]
    assert stored[1] == recipient_id and len(stored) == 2 and stored[-1] == recipient_id
    assert [m.id for m in archive.query(B, ArchiveQuery()).items] == [recipient_id]
    assert [m.id for m in archive.query(A, ArchiveQuery()).items] == [stored[0]]


def test_an_archive_written_before_the_format_was_recorded_is_read_and_extended(path, clock):
    """Format 0 (user_version 0: the same layout, unmarked): opened as it is, nothing
    rewritten, new rows added, and the file then says format 1."""
    store = SqliteArchive(path, clock=clock)
    old_ids = [chat(store, clock, A, B, f"old {i} &amp; é")[0] for i in range(3)]
    store.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=0")
    db.commit()
    db.close()
    again = SqliteArchive(path, clock=clock)
    try:
        new_id = chat(again, clock, B, A, "new")[-1]
        page = again.query(A, ArchiveQuery())
        assert bodies(page) == ["old 0 & é", "old 1 & é", "old 2 & é", "new"]
        assert [m.id for m in page.items] == old_ids + [new_id]
        assert bodies(again.query(B, ArchiveQuery())) == bodies(page)
        assert {t for (t,) in again.db.execute("SELECT typeof(stanza) FROM body")} == {"text"}
        assert again.db.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        again.close()


def test_an_archive_of_a_newer_format_is_refused(path, clock):
    SqliteArchive(path, clock=clock).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=7")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="format 7 was written by a newer boshroster"):
        SqliteArchive(path, clock=clock)


def test_an_unreadable_stored_stanza_is_logged_and_the_page_still_answers(path, clock, caplog):
    archive = SqliteArchive(path, clock=clock)
    chat(archive, clock, A, B, "fine")
    chat(archive, clock, A, B, "to be damaged")
    archive.flush()
    archive.db.execute("UPDATE body SET stanza=? WHERE id=(SELECT MAX(id) FROM body)", (b"\x00garbage",))
    with caplog.at_level(logging.ERROR, logger="boshroster.archive"):
        page = archive.query(A, ArchiveQuery())
    archive.close()
    assert [m.stanza is None for m in page.items] == [False, True]
    assert any("cannot be read back" in r.message for r in caplog.records)


def wait_until(predicate, timeout=10.0):
    """Yield to the writer until ``predicate()`` holds (no fixed sleeps)."""
    deadline = gevent.get_hub().loop.now() + timeout
    while not predicate():
        assert gevent.get_hub().loop.now() < deadline, "condition not reached"
        gevent.sleep(0.001)


def test_a_full_chunk_is_committed_without_waiting_for_the_flush_interval(path, clock):
    from boshroster.im.archive_sqlite import _CHUNK

    store = SqliteArchive(path, clock=clock, flush_interval=3600)
    try:
        watcher = sqlite3.connect(path)
        for i in range(_CHUNK + 3):
            chat(store, clock, A, B, f"m{i}")
        assert watcher.execute("SELECT COUNT(*) FROM body").fetchone()[0] == 0  # nothing yielded yet
        wait_until(lambda: watcher.execute("SELECT COUNT(*) FROM body").fetchone()[0] >= _CHUNK)
        assert watcher.execute("SELECT COUNT(*) FROM body").fetchone()[0] == _CHUNK + 3  # the rest with it
        # The queue emptied before the timer: it is cancelled, the next message starts a new one.
        assert store._flush_timer is None
        chat(store, clock, A, B, "next")
        assert store._flush_timer is not None and len(store._pending) == 1
    finally:
        store.close()


def test_a_full_queue_commits_one_chunk_in_the_sender_not_the_whole_queue(path, clock, caplog):
    from boshroster.im.archive_sqlite import _CHUNK

    store = SqliteArchive(path, clock=clock, flush_interval=3600, max_pending=_CHUNK + 200)
    try:
        watcher = sqlite3.connect(path)
        with caplog.at_level(logging.WARNING, logger="boshroster.archive"):
            for i in range(_CHUNK + 200):
                chat(store, clock, A, B, f"m{i}")
        # No yield happened: the sender committed exactly one chunk, the rest waits for the writer.
        assert watcher.execute("SELECT COUNT(*) FROM body").fetchone()[0] == _CHUNK
        assert len(store._pending) == 200
        assert [r.levelname for r in caplog.records if "queue full" in r.message] == ["WARNING"]
        assert f"committing {_CHUNK}" in next(r.message for r in caplog.records if "queue full" in r.message)
        wait_until(lambda: not store._pending)
        assert watcher.execute("SELECT COUNT(*) FROM body").fetchone()[0] == _CHUNK + 200
        assert bodies(store.query(A, ArchiveQuery(max=250, before=""))) == [f"m{i}" for i in range(450, 700)]
    finally:
        store.close()

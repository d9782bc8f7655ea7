"""Message archive benchmark (issue 11): MAM queries on a 1,000,000-message archive, and the
archive's write cost per message.

    .venv/bin/python bench/archive_query.py                  # build (~1 min, cached) and measure
    .venv/bin/python bench/archive_query.py --messages 200000 --runs 100
    .venv/bin/python bench/archive_query.py --rebuild --db /tmp/a.sqlite3

Builds (once; reused while --messages/--peers match) an archive in which alice has
``--messages`` messages with ``--peers`` contacts (both parties archived: alice's
1,000,000 entries plus her contacts' copies), spread over a year, through the real
``SqliteArchive.store`` path.  Then times, warm, over ``--runs`` runs each (median,
p95, max): the target "latest 50 messages of a user with a 1,000,000-message archive"
(RSM ``<before/>``, max 50), the same through the whole protocol path (MamService
parsing the IQ, the query, 50 result messages built and serialized), and the other
query shapes (with a contact, a page in the middle, a time window, count only, a
full-JID 'with'), plus the first query after reopening the file.

Write cost: CPU per message (process time) of what the server adds per chat message
(MamService.archive_message: stanza-id checks, preferences, serialization, ids; the
recipient's <stanza-id/>; the batched commit), for 50 pairs of users as in
``scripts/bench``'s messages workload, at several batch sizes (messages per commit).
Today's server CPU per message (bench/README.md) is the yardstick for issue 11's 1.3x.
Everything is local: one process, one SQLite file, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from boshroster.im.archive import ArchiveQuery, Copy  # noqa: E402
from boshroster.im.archive_sqlite import SqliteArchive  # noqa: E402
from boshroster.im.mam import MamService, stamp_stanza_id  # noqa: E402
from boshroster.xmpp import xmlio  # noqa: E402
from boshroster.xmpp.jid import JID  # noqa: E402

OWNER = "alice@localhost"
YEAR = 365 * 86400.0
STANZA = ('<message xmlns="jabber:client" from="{frm}" to="{to}" type="chat" id="{id}">'
          '<body>message number {i}: a typical line of chat, about this long, with some words in it</body>'
          '<active xmlns="http://jabber.org/protocol/chatstates"/></message>')


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(path: str, messages: int, peers: int, start: float) -> dict:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    clock = Clock(start)
    store = SqliteArchive(path, clock=clock, max_pending=1_000_000, flush_interval=3600)
    step = YEAR / messages
    # store() takes what it needs at once, so one element per direction is reused, changed.
    out = xmlio.parse(STANZA.format(frm=f"{OWNER}/web", to="x", id=0, i=0), 1 << 20)
    inc = xmlio.parse(STANZA.format(frm="x", to=OWNER, id=0, i=0), 1 << 20)
    t0, c0 = time.perf_counter(), cpu()
    for i in range(messages):
        peer = f"user{i % peers}@localhost"
        clock.now += step
        if i % 2 == 0:
            el = out
            el.set("to", peer)
            copies = [Copy(OWNER, peer, None, True), Copy(peer, OWNER, "web", False)]
        else:
            el = inc
            el.set("from", f"{peer}/phone")
            copies = [Copy(peer, OWNER, None, True), Copy(OWNER, peer, "phone", False)]
        el.set("id", str(i))
        el[0].text = f"message number {i}: a typical line of chat, about this long, with some words in it"
        store.store(el, copies)
        if i % 5000 == 4999:
            store.flush()
    store.close()
    seconds, cpu_s = time.perf_counter() - t0, cpu() - c0
    info = {"messages": messages, "peers": peers, "start": start, "build_s": round(seconds, 1),
            "build_cpu_us_per_message": round(cpu_s / messages * 1e6, 1)}
    with open(path + ".json", "w") as fh:
        json.dump(info, fh)
    return info


def timed(fn, runs: int) -> dict:
    fn()  # warm
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {"median_ms": round(statistics.median(samples), 3),
            "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 3), "max_ms": round(samples[-1], 3)}


def mam_iq(rsm: str) -> xmlio.Element:
    return xmlio.parse(f"<iq xmlns='jabber:client' type='set' id='q' from='{OWNER}/web'>"
                       f"<query xmlns='urn:xmpp:mam:2' queryid='b'><set xmlns='http://jabber.org/protocol/rsm'>"
                       f"{rsm}</set></query></iq>", 1 << 20)


def queries(path: str, info: dict, runs: int) -> list[tuple[str, dict]]:
    clock = Clock(info["start"] + YEAR)
    t = time.perf_counter()
    store = SqliteArchive(path, clock=clock)
    first = store.query(OWNER, ArchiveQuery(max=50, before=""))
    cold = (time.perf_counter() - t) * 1000
    assert len(first.items) == 50 and first.count == info["messages"], (len(first.items), first.count)
    middle_id = store.query(OWNER, ArchiveQuery(max=1, index=info["messages"] // 2)).items[0].id
    mam = MamService(store, "localhost", max_page=250)
    peer = "user7@localhost"
    rows = []

    def row(name, fn):
        rows.append((name, timed(fn, runs)))

    row("latest 50 (RSM <before/>), 1M archive: storage", lambda: store.query(OWNER, ArchiveQuery(max=50, before="")))
    iq = mam_iq("<max>50</max><before/>")
    row("latest 50, whole MAM path (parse, query, 50 results built + serialized)",
        lambda: [xmlio.tostring(el) for el in mam.handle_iq("alice", iq, None)])
    row("latest 50 with one contact (10k conversation)",
        lambda: store.query(OWNER, ArchiveQuery(with_jid=peer, max=50, before="")))
    row("50 before a message in the middle", lambda: store.query(OWNER, ArchiveQuery(max=50, before=middle_id)))
    row("50 after a message in the middle", lambda: store.query(OWNER, ArchiveQuery(max=50, after=middle_id)))
    mid = info["start"] + YEAR / 2
    row("time window (start/end: one day mid-year, max 50)",
        lambda: store.query(OWNER, ArchiveQuery(start=mid, end=mid + 86400, max=50)))
    row("count only (max=0)", lambda: store.query(OWNER, ArchiveQuery(max=0)))
    row("with a full JID (no count: the resource is filtered row by row), max 50",
        lambda: store.query(OWNER, ArchiveQuery(with_jid=peer, with_resource="phone", max=50, before="")))
    store.close()
    rows.append(("first query after reopening the file (open + query)", {"median_ms": round(cold, 3)}))
    return rows


def write_cost(path: str, batch: int, messages: int, clock_start: float) -> float:
    """CPU µs per chat message of the archive's work in the server path."""
    clock = Clock(clock_start)
    store = SqliteArchive(path, clock=clock, max_pending=1_000_000, flush_interval=3600)
    mam = MamService(store, "localhost")
    pairs = [(JID.parse(f"u{2 * p}@localhost/web"), JID.parse(f"u{2 * p + 1}@localhost")) for p in range(50)]
    stanzas = []
    for i in range(messages):
        sender, recipient = pairs[i % 50]
        if i % 2:
            sender, recipient = JID.parse(f"{recipient}/web"), sender.bare
        stanzas.append((xmlio.parse(STANZA.format(frm=sender, to=recipient, id=i, i=i), 1 << 20), sender, recipient))
    c0 = cpu()
    for i, (stanza, sender, recipient) in enumerate(stanzas):
        clock.now += 0.0001
        _, recipient_id = mam.archive_message(stanza, sender, recipient)
        stamp_stanza_id(stanza, str(recipient.bare), recipient_id)
        if i % batch == batch - 1:
            store.flush()
    store.flush()
    used = cpu() - c0
    store.close()
    return used / messages * 1e6


class _Serializing:
    """A transport that does what the WebSocket one does with a stanza: serialize it."""

    kind = "bench"

    def __init__(self):
        self.count = 0

    def send(self, el):
        xmlio.tostring(el)
        self.count += 1

    def stream_error(self, el):
        raise RuntimeError(xmlio.tostring(el))


def core_cost(workdir: str, archive: bool, messages: int, flush_interval: float | None = None) -> float:
    """Server CPU µs per chat message through the real session core (parse, route, deliver,
    serialize; with the archive: archive_message, stanza-id, batched commit), 50 pairs, no
    sockets.  Sessions log in with PLAIN over a fake loopback peer."""
    import base64
    import gevent
    from boshroster.config import load
    from boshroster.roster.model import Roster
    from boshroster.wiring import Core
    from boshroster.xmpp.stream import ClientSession, Peer

    class Backend:
        def fetch(self, username):
            return Roster.from_backend_json({}, log_context="bench")

    extra = {} if flush_interval is None else {"archive_flush_interval": flush_interval}
    config = load(None, env={}, data_dir=workdir, domain="localhost", scram_iterations=4096, log_level="warning",
                  archive_enabled=archive, c2s_stanza_rate=0.0, **extra)
    core = Core(config, roster_backend=Backend())
    users = [f"u{i}" for i in range(100)]
    sessions = []
    for user in users:
        if not core.accounts.exists(user):
            core.accounts.add(user, "pw")
        transport = _Serializing()
        session = ClientSession(core.stream_context, transport, Peer("127.0.0.1", False))
        session.open_stream("localhost")
        auth = base64.b64encode(f"\0{user}\0pw".encode()).decode()
        session.feed(xmlio.parse(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>", 4096))
        session.restart()
        session.feed(xmlio.parse("<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                                 "<resource>web</resource></bind></iq>", 4096))
        session.feed(xmlio.parse("<presence xmlns='jabber:client'/>", 4096))
        sessions.append((session, transport))
    texts = [STANZA.format(frm="", to=f"u{(i % 100) ^ 1}@localhost", id=i, i=i).replace(' from=""', "")
             for i in range(messages)]
    gevent.sleep(0.1)
    received_before = sum(t.count for _, t in sessions)
    c0 = cpu()
    for i, text in enumerate(texts):
        sessions[i % 100][0].feed(xmlio.parse(text, 65536))
        if i % 10 == 9:
            gevent.sleep(0)  # a real server yields between reads: the batched writer gets its turns
    if core.archive is not None:
        core.archive.flush()
    used = cpu() - c0
    delivered = sum(t.count for _, t in sessions) - received_before
    assert delivered >= messages, (delivered, messages)
    for session, _ in sessions:
        session.end("bench over")
    core.shutdown()
    return used / messages * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--peers", type=int, default=100)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--db", default="/tmp/boshroster-bench-archive/archive.sqlite3")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--write-messages", type=int, default=20000)
    ap.add_argument("--core-messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flush-interval", type=float, default=None,
                    help="archive_flush_interval for the server path (default: the server's default)")
    ap.add_argument("--core-only", action="store_true", help="only the server path, archive off/on (no 1M file)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    info, rows, writes = None, [], []
    if not args.core_only:
        os.makedirs(os.path.dirname(os.path.abspath(args.db)), exist_ok=True)
        info = None
        if not args.rebuild and os.path.exists(args.db + ".json"):
            with open(args.db + ".json") as fh:
                info = json.load(fh)
            if (info["messages"], info["peers"]) != (args.messages, args.peers):
                info = None
        if info is None:
            print(f"building {args.messages:,} messages for {OWNER} with {args.peers} contacts in {args.db} ...", flush=True)
            info = build(args.db, args.messages, args.peers, time.time() - 2 * YEAR)
        print(f"archive: {info['messages']:,} messages of {OWNER} (+ their contacts' copies), "
              f"{os.path.getsize(args.db) / 2**20:.0f} MiB; built in {info['build_s']} s, "
              f"{info['build_cpu_us_per_message']} µs CPU per message (2 entries each, store + batched commit)")
        rows = queries(args.db, info, args.runs)
        width = max(len(name) for name, _ in rows)
        print(f"\n{'query':<{width}}  median      p95      max")
        for name, fig in rows:
            print(f"{name:<{width}}  {fig['median_ms']:>6.2f} ms" + (
                f" {fig['p95_ms']:>6.2f} ms {fig['max_ms']:>6.2f} ms" if "p95_ms" in fig else ""))
        # Write cost on top of the big file (its indexes are as big as they get).
        writes = []
        print(f"\narchive CPU per chat message, 50 pairs, {args.write_messages:,} messages "
              f"(archive_message + stanza-id + commit), on the {info['messages']:,}-message file:")
        clock_start = info["start"] + YEAR + 10
        for batch in (1, 10, 100, 1000):
            us = write_cost(args.db, batch, args.write_messages, clock_start)
            clock_start += 10
            writes.append({"batch": batch, "cpu_us_per_message": round(us, 1)})
            print(f"  {batch:>5} messages per commit: {us:6.1f} µs")
    # The whole server path, archive off vs on, alternated (the machine's speed drifts).
    import tempfile
    print(f"\nserver CPU per chat message through the session core (no sockets), 50 pairs, "
          f"{args.core_messages:,} messages, archive_flush_interval {args.flush_interval or 'default'}, "
          f"off/on alternated {args.rounds} times:")
    figures = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for archive in (False, True):
                us = core_cost(os.path.join(tmp, f"{r}-{archive}"), archive, args.core_messages, args.flush_interval)
                figures[archive].append(us)
                print(f"  round {r + 1}, archive {'on ' if archive else 'off'}: {us:6.1f} µs", flush=True)
    off, on = statistics.median(figures[False]), statistics.median(figures[True])
    print(f"  median: off {off:.1f} µs, on {on:.1f} µs per message: {on / off:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"archive": info, "queries": dict(rows), "writes": writes,
                       "core": {"off_us": figures[False], "on_us": figures[True], "ratio": on / off}}, fh, indent=1)


if __name__ == "__main__":
    main()

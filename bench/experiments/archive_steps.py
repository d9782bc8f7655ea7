"""Where the archive's CPU per chat message goes, in process (issue 11): the
``message-accepted`` work without the store, ``SqliteArchive.store`` (and its stanza
encoding alone), and the batched commit, each timed over the same messages (50 pairs,
``--messages`` chat messages, one commit per ``--batch``), ``--rounds`` times; prints the
medians in µs per message.

    .venv/bin/python bench/experiments/archive_steps.py [--messages 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from boshroster.im import archive_sqlite_read  # noqa: E402
from boshroster.im.archive import Copy  # noqa: E402
from boshroster.im.archive_sqlite import SqliteArchive  # noqa: E402
from boshroster.im.mam import MamService, stamp_stanza_id  # noqa: E402
from boshroster.xmpp import xmlio  # noqa: E402
from boshroster.xmpp.jid import JID  # noqa: E402

STANZA = ('<message xmlns="jabber:client" from="{frm}" to="{to}" type="chat" id="{id}">'
          '<body>message number {i}: a typical line of chat, about this long, with some words in it</body>'
          '<active xmlns="http://jabber.org/protocol/chatstates"/></message>')


def messages(n: int):
    pairs = [(JID.parse(f"u{2 * p}@localhost/web"), JID.parse(f"u{2 * p + 1}@localhost")) for p in range(50)]
    out = []
    for i in range(n):
        sender, recipient = pairs[i % 50]
        if i % 2:
            sender, recipient = JID.parse(f"{recipient}/web"), sender.bare
        out.append((xmlio.parse(STANZA.format(frm=sender, to=recipient, id=i, i=i), 1 << 20), sender, recipient))
    return out


def one_round(tmp: str, n: int, batch: int) -> dict:
    store = SqliteArchive(os.path.join(tmp, f"a{time.monotonic_ns()}.sqlite3"), max_pending=1_000_000,
                          flush_interval=3600)
    mam = MamService(store, "localhost")
    warm = messages(2000)
    for stanza, s, r in warm:
        mam.archive_message(stanza, s, r)
    store.flush()
    msgs = messages(n)
    # 1. the whole hook (archive_message + stamp), commits excluded
    t_hook = t_commit = 0.0
    for start in range(0, n, batch):
        t = time.process_time()
        for stanza, sender, recipient in msgs[start:start + batch]:
            _, rid = mam.archive_message(stanza, sender, recipient, strip=False)
            stamp_stanza_id(stanza, f"{recipient.local}@{recipient.domain}", rid, replace=False)
        t_hook += time.process_time() - t
        t = time.process_time()
        store.flush()
        t_commit += time.process_time() - t
    # 2. store() alone, same copies
    msgs = messages(n)
    copies = []
    for stanza, s, r in msgs:
        sb, rb = f"{s.local}@{s.domain}", f"{r.local}@{r.domain}"
        copies.append([Copy(sb, rb, r.resource, True), Copy(rb, sb, s.resource, False)])
    t_store = 0.0
    for start in range(0, n, batch):
        t = time.process_time()
        for (stanza, _s, _r), c in zip(msgs[start:start + batch], copies[start:start + batch]):
            store.store(stanza, c)[1]
        t_store += time.process_time() - t
        store.flush()
    encode = getattr(archive_sqlite_read, "encode_compact", archive_sqlite_read.encode_stanza)
    t = time.process_time()
    for stanza, _s, _r in msgs:
        encode(stanza)
    t_encode = time.process_time() - t
    store.close()
    us = 1e6 / n
    return {"hook_total": t_hook * us, "store": t_store * us, "hook_without_store": (t_hook - t_store) * us,
            "encode": t_encode * us, "commit": t_commit * us, "archive_total": (t_hook + t_commit) * us}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            rows.append(one_round(tmp, args.messages, args.batch))
    for key in rows[0]:
        values = sorted(r[key] for r in rows)
        print(f"{key:<20} {statistics.median(values):6.1f} µs  (min {values[0]:.1f}, max {values[-1]:.1f})")


if __name__ == "__main__":
    main()

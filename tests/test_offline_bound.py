"""Issue 10 point 15: offline storage is bounded as a whole, not only per user.

Before: with ``auth = "http"`` messages to 300 made-up usernames were all stored
(the per-user cap never applies: each name is new).  ``http_user_exists_url`` now
bounces unknown names (tests/test_user_exists.py); ``offline_max_total_bytes`` bounds
what all users' messages take together: over it a message is bounced to its sender
(``service-unavailable``, "offline storage full"), and the room comes back as stored
messages are delivered.  The total survives a kill -9 (recomputed at start).
Real server subprocesses, real clients, message ids counted.
"""

from __future__ import annotations

import signal
import xml.etree.ElementTree as ET

from harness import NS_CLIENT, WsClient, q, wait_for

BODY = "x" * 1000  # a stored row is ~1.1 KB


def stanza_error(el: ET.Element) -> str | None:
    err = el.find(q(NS_CLIENT, "error"))
    if err is None:
        return None
    return next((c.tag.rpartition("}")[2] for c in err if not c.tag.endswith("}text")), None)


def send(client, to: str, ids) -> list[str]:
    """Send one message per id; return the ids bounced (all service-unavailable)."""
    for i in ids:
        client.send_xml(f"<message xmlns='{NS_CLIENT}' to='{to}' type='chat' id='{i}'><body>{i} {BODY}</body></message>")
    client.sync(timeout=30)
    errors = [el for el in client.seen if el.tag == q(NS_CLIENT, "message") and el.get("type") == "error"]
    client.seen = [el for el in client.seen if el not in errors]
    assert {stanza_error(el) for el in errors} <= {"service-unavailable"}, [ET.tostring(el)[:300] for el in errors]
    return [el.get("id") for el in errors]


def login(server, user: str, resource: str, presence: bool) -> WsClient:
    client = WsClient(server.ws_url)
    client.login(user, resource=resource)
    if presence:
        client.presence()
    return client


def drain(client, want: int) -> list[str]:
    got = []
    while len(got) < want:
        try:
            got.append(client.recv_message(timeout=10).get("id"))
        except TimeoutError:
            break
    return got


def test_offline_storage_as_a_whole_is_bounded_and_frees_up_as_messages_are_delivered(make_server):
    server = make_server(offline_max_total_bytes=30_000, offline_max_per_user=1000, c2s_stanza_rate=0)
    alice = login(server, "alice", "a", presence=False)
    to_bob = [f"b{i}" for i in range(20)]
    to_carol = [f"c{i}" for i in range(20)]
    bounced = send(alice, "bob@localhost", to_bob) + send(alice, "carol@localhost", to_carol)
    assert to_bob[0] not in bounced and to_carol[-1] in bounced  # bob's first ones fit, carol's last ones not
    stored = set(to_bob + to_carol) - set(bounced)
    assert 20 <= len(stored) <= 30, len(stored)  # ~1.1 KB each under 30,000 bytes
    assert "offline storage is full" in server.log()

    server.stop(signal.SIGKILL)  # the total is recomputed from the rows at start
    server.start()
    alice = login(server, "alice", "a2", presence=False)
    assert send(alice, "dave@localhost", ["d0"]) == ["d0"]  # still full after the restart

    bob = login(server, "bob", "b", presence=True)
    got_bob = drain(bob, len(stored & set(to_bob)))
    assert sorted(got_bob) == sorted(stored & set(to_bob))
    bob.sync()  # WebSocket: written to the socket means delivered: the rows go
    # (SQLite deletes them at once; PostgreSQL in the delivery's background delete)
    wait_for(lambda: "offline storage has room again" in server.log(), 15, "the delivered rows deleted")
    assert send(alice, "dave@localhost", ["d1"]) == []  # room again
    carol = login(server, "carol", "c", presence=True)
    assert sorted(drain(carol, len(stored & set(to_carol)))) == sorted(stored & set(to_carol))
    dave = login(server, "dave", "d", presence=True)
    assert drain(dave, 1) == ["d1"]
    for client in (alice, bob, carol, dave):
        client.close()

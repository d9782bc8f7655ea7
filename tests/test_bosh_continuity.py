"""BOSH session continuity (issue 11 point 3) against the real server, over raw HTTP.

A held request whose client closes its connection (a page reload, a tab closed) is
dropped by the server, and what arrives for the session afterwards waits for the
session's next request instead of being written into the dead socket, where the next
request would have acknowledged it (XEP-0124 §9; bosh_watch.py).  Also XEP-0124 §10
``pause``: the session outlives a pause longer than its inactivity timeout, up to
``maxpause``, and a pause over it is a ``policy-violation``.
"""

from __future__ import annotations

import socket
import struct
import xml.etree.ElementTree as ET

import pytest
import requests

from bosh_inprocess import World, messages
from harness import NS_BOSH, NS_CLIENT, BoshClient, WsClient, q, wait_for

BOB = "bob@localhost"


def held_session(bosh_url: str, wait: int = 2) -> BoshClient:
    """alice logged in over BOSH, available, with no request of hers at the server: the
    client's polling is stopped once everything queued for her was read (a ping round
    trip), and its last held request has come back."""
    alice = BoshClient(bosh_url, wait=wait)
    alice.login("alice")
    alice.presence()
    alice.sync()
    alice._loop.kill()
    wait_for(lambda: alice._in_flight == 0, timeout=wait + 10, what="alice's last request answered")
    return alice


def raw_post(port: int, body: str, corked: bool = False) -> socket.socket:
    """POST one BOSH body on a connection of its own and return the connection, unread.
    ``corked``: the request is held back in the kernel (MSG_MORE) and leaves with the FIN of
    the ``close`` that must follow: the server reads the request and the end of file together."""
    data = body.encode("utf-8")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /http-bind HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml; charset=utf-8\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data), socket.MSG_MORE if corked else 0)
    return sock


def post_held(port: int, bob, alice, rid: int) -> socket.socket:
    """alice's request ``rid`` on a raw connection, known to be held: it carries a message to
    bob, and once bob has it the server has processed the request (and holds it: nothing is
    queued for alice)."""
    tag = f"holding {rid}"
    sock = raw_post(port, f"<body xmlns='{NS_BOSH}' rid='{rid}' sid='{alice.sid}'>"
                            f"<message xmlns='{NS_CLIENT}' to='{BOB}' type='chat'><body>{tag}</body></message></body>")
    bob.recv(10, lambda e: e.tag == q(NS_CLIENT, "message") and e.findtext(q(NS_CLIENT, "body")) == tag)
    return sock


def post(bosh_url: str, body: str, timeout: float = 20) -> ET.Element:
    reply = requests.post(bosh_url, data=body.encode("utf-8"), timeout=timeout,
                          headers={"Content-Type": "text/xml; charset=utf-8"})
    assert reply.status_code == 200, reply.status_code
    return ET.fromstring(reply.content)


def read_response(sock: socket.socket, timeout: float = 20) -> ET.Element:
    """The BOSH body of the HTTP response on ``sock`` (200, Content-Length framed)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, rest
        rest += chunk
    return ET.fromstring(rest[:length])


def bodies(el: ET.Element) -> list[str]:
    return [m.findtext(q(NS_CLIENT, "body")) for m in el.iter(q(NS_CLIENT, "message"))]


def close(sock: socket.socket, how: str) -> None:
    if how == "reset":  # SO_LINGER 0: an RST instead of a FIN (a killed browser process)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture
def bob(server):
    client = WsClient(server.ws_url)
    client.login("bob")
    client.presence()
    yield client
    client.close()


@pytest.mark.parametrize("noticed_first", [True, False], ids=["noticed-first", "message-at-once"])
@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_held_request_whose_client_left_keeps_its_stanzas_for_the_next_request(server, bob, how,
                                                                                  noticed_first):
    alice = held_session(server.bosh_url)
    rid = alice.rid + 1
    close(post_held(server.port, bob, alice, rid), how)
    gone = f"BOSH request {rid} of {alice.jid}: the client closed its connection before the answer"
    if noticed_first:  # the watch saw the close with nothing to send (no stanza needed)
        wait_for(lambda: gone in server.log(), timeout=10, what="the server noticed the closed connection")
    # else: the message comes at once, maybe in the loop turn the close is seen in (the flush first)
    bob.message(alice.jid, "while you were reloading")
    bob.sync()
    # The reloaded page: the session's next rid, on a new connection (XEP-0206 §5 / Strophe keepalive).
    reply = post(server.bosh_url, f"<body xmlns='{NS_BOSH}' rid='{rid + 1}' sid='{alice.sid}'/>")
    assert reply.get("type") is None, ET.tostring(reply)
    assert bodies(reply) == ["while you were reloading"]
    assert gone in server.log()
    # The session goes on: a ping round trip in the next request.
    reply = post(server.bosh_url, f"<body xmlns='{NS_BOSH}' rid='{rid + 2}' sid='{alice.sid}'>"
                         f"<iq xmlns='{NS_CLIENT}' type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
                         f"</body>")
    assert [iq.get("id") for iq in reply.iter(q(NS_CLIENT, "iq"))] == ["p1"], ET.tostring(reply)
    alice.stop()


def test_a_dropped_request_sent_again_is_held_again(server, bob):
    """XEP-0124 §14.3: a client may re-send a request it got no answer to, with the same rid;
    one the server dropped for a closed connection is held again, not refused as old."""
    alice = held_session(server.bosh_url)
    rid = alice.rid + 1
    close(post_held(server.port, bob, alice, rid), "fin")
    gone = f"BOSH request {rid} of {alice.jid}: the client closed its connection before the answer"
    wait_for(lambda: gone in server.log(), timeout=10, what="the server noticed the closed connection")
    bob.message(alice.jid, "for the retry")
    bob.sync()
    reply = post(server.bosh_url, f"<body xmlns='{NS_BOSH}' rid='{rid}' sid='{alice.sid}'/>")
    assert reply.get("type") is None, ET.tostring(reply)
    assert bodies(reply) == ["for the retry"]
    reply = post(server.bosh_url, f"<body xmlns='{NS_BOSH}' rid='{rid + 1}' sid='{alice.sid}'/>")
    assert reply.get("type") is None, ET.tostring(reply)
    alice.stop()


def test_a_request_whose_client_left_before_it_was_read_takes_no_stanzas(server, bob):
    """Stanzas already queued, and the next request arrives together with its client's FIN:
    its answer is due at once, and it is not written into the closed connection either."""
    alice = held_session(server.bosh_url)
    rid = alice.rid + 1
    bob.message(alice.jid, "queued before")
    bob.sync()  # routed: in alice's queue, no request of hers at the server
    close(raw_post(server.port, f"<body xmlns='{NS_BOSH}' rid='{rid}' sid='{alice.sid}'/>", corked=True), "fin")
    gone = f"BOSH request {rid} of {alice.jid}: the client closed its connection before the answer; 1 stanza(s)"
    wait_for(lambda: gone in server.log(), timeout=10, what="the server noticed the closed connection")
    reply = post(server.bosh_url, f"<body xmlns='{NS_BOSH}' rid='{rid + 1}' sid='{alice.sid}'/>")
    assert bodies(reply) == ["queued before"]
    alice.stop()


def test_a_held_request_answered_normally_is_not_dropped(server, bob):
    """The watch must not mistake a live connection for a closed one: a message for a held
    request on an open connection is answered on it."""
    alice = held_session(server.bosh_url)
    rid = alice.rid + 1
    sock = post_held(server.port, bob, alice, rid)
    try:
        bob.message(alice.jid, "live")
        reply = read_response(sock)
        assert bodies(reply) == ["live"]
    finally:
        sock.close()
    assert f"BOSH request {rid} of" not in server.log()
    alice.stop()


def test_a_pipelined_request_is_not_taken_for_a_close(server, bob):
    """Data waiting behind a held request (HTTP/1.1 pipelining: the next request on the same
    connection) says the client is there: the held request is answered on it, then the next."""
    alice = held_session(server.bosh_url)
    rid = alice.rid + 1
    sock = post_held(server.port, bob, alice, rid)
    try:
        data = f"<body xmlns='{NS_BOSH}' rid='{rid + 1}' sid='{alice.sid}'/>".encode()
        sock.sendall(b"POST /http-bind HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml; charset=utf-8\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        bob.message(alice.jid, "first")
        assert bodies(read_response(sock)) == ["first"]
        bob.message(alice.jid, "second")
        assert bodies(read_response(sock)) == ["second"]
    finally:
        sock.close()
    assert f"BOSH request {rid} of" not in server.log()
    alice.stop()


# -- XEP-0124 §10 pause, in-process on a fake clock (tests/bosh_inprocess.py) -----------------

@pytest.fixture
def world(tmp_path, backend):
    made = []

    def make(**settings):
        w = World(tmp_path / f"w{len(made)}", backend.url_template, **settings)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def logged_in(w: World, user: str, resource: str = "r"):
    """``user`` logged in over BOSH with the roster fetched (the login's fetch, started at
    bind, is over: nothing of it runs on after the test's backend is gone)."""
    client = w.client().login(user, resource)
    reply = client.post(f"<iq xmlns='{NS_CLIENT}' type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>")
    assert [iq.get("type") for iq in reply.iter(q(NS_CLIENT, "iq"))] == ["result"], ET.tostring(reply)
    return client


def terminated(body: ET.Element) -> str | None:
    assert body.get("type") == "terminate", ET.tostring(body)
    return body.get("condition")


def test_pause_is_advertised_and_keeps_the_session_past_its_inactivity(world):
    w = world(bosh_max_inactivity=30, bosh_max_pause=120)
    alice = logged_in(w, "alice")
    assert alice.creation.get("maxpause") == "120"
    bob = logged_in(w, "bob", "b")
    parked = alice.spawn()
    assert not parked.ready()
    reply = alice.post(pause="100")  # answered at once, and so is the held request: both empty
    assert reply.get("type") is None and len(reply) == 0, ET.tostring(reply)
    assert len(parked.get(timeout=1)) == 0
    sent = bob.spawn(bob.message("alice@localhost/r", "during the pause", "m1"))
    w.clock.advance(99)  # more than three times the inactivity timeout
    sent.get(timeout=1)
    assert w.session(alice) is not None
    reply = alice.post()  # back: what came meanwhile is in the first answer
    assert [m.findtext(q(NS_CLIENT, "body")) for m in messages(reply)] == ["during the pause"]
    w.clock.advance(29)  # normal behaviour again (§10): the inactivity timeout is 30 s
    assert w.session(alice) is not None
    w.clock.advance(2)
    assert w.session(alice) is None


def test_a_pause_that_runs_out_ends_the_session(world):
    w = world(bosh_max_inactivity=30, bosh_max_pause=120)
    alice = logged_in(w, "alice")
    assert alice.post(pause="50").get("type") is None
    w.clock.advance(49)
    assert w.session(alice) is not None
    w.clock.advance(2)
    assert w.session(alice) is None
    assert terminated(alice.post()) == "item-not-found"


@pytest.mark.parametrize("pause", ["121", "0"])
def test_a_pause_outside_maxpause_is_a_policy_violation(world, pause):
    w = world(bosh_max_pause=120)
    alice = logged_in(w, "alice")
    assert terminated(alice.post(pause=pause)) == "policy-violation"
    assert w.session(alice) is None


def test_no_maxpause_and_no_pause_when_it_is_off(world):
    w = world(bosh_max_pause=0)
    alice = logged_in(w, "alice")
    assert alice.creation.get("maxpause") is None
    assert terminated(alice.post(pause="10")) == "policy-violation"


@pytest.mark.parametrize("pause", ["abc", "-5", "1.5", "99999999999999999"])
def test_a_pause_that_is_not_a_number_is_a_bad_request(world, pause):
    w = world(bosh_max_pause=120)
    alice = logged_in(w, "alice")
    assert terminated(alice.post(pause=pause)) == "bad-request"
    assert w.session(alice) is None

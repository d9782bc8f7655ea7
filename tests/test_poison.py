"""Poison stanzas (issue 10, points 6 and 7) end to end against the real server.

Nothing one client sends as XML may break the server or another user's stream:
what the server accepts it must deliver as well-formed, namespace-well-formed
XML (checked here with a strict namespace-aware parser, ``xml.dom.minidom`` on
expat, as a browser's DOMParser would), and what it cannot deliver so it must
refuse at the door with a stream error to the sender (RFC 6120 §4.9.3.18
``policy-violation``), never by failing in the recipient's writer.

Every recipient here is a ``Strict*Client``: it keeps each raw document it
received and fails it (``bad-xml`` in its inbox, or the BOSH request fails as a
browser's would) when a strict parser refuses it.
"""

from __future__ import annotations

import time
import xml.dom.minidom
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

import pytest
import requests
import websocket

from harness import NS_BOSH, NS_CLIENT, NS_FRAMING, NS_STREAM, BoshClient, WsClient, q

NS_STREAMS_ERR = "urn:ietf:params:xml:ns:xmpp-streams"
NS_XML = "http://www.w3.org/XML/1998/namespace"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DEEP = "urn:example:deep"
DEFAULT_MAX_DEPTH = 32  # stanza_max_depth's default: levels below the stanza


def strict_parse(raw: bytes | str) -> None:
    """Raise unless ``raw`` is well-formed and namespace-well-formed XML 1.0."""
    xml.dom.minidom.parseString(raw.encode("utf-8") if isinstance(raw, str) else raw)


class StrictBoshClient(BoshClient):
    """A BOSH client whose every response must pass a strict parser, as in a browser."""

    def __init__(self, *args, **kwargs):
        self.raw: list[bytes] = []
        self.statuses: list[int] = []
        super().__init__(*args, **kwargs)

    def post(self, body: str, timeout: float | None = None) -> ET.Element:
        reply = self.http.post(self.url, data=body.encode("utf-8"), headers={"Content-Type": "text/xml; charset=utf-8"},
                               timeout=timeout or self.wait + 10)
        self.statuses.append(reply.status_code)
        assert reply.status_code == 200, reply.status_code
        self.raw.append(reply.content)
        strict_parse(reply.content)
        return ET.fromstring(reply.content)


class StrictWsClient(WsClient):
    """A WebSocket client that checks each message strictly and survives a bad one."""

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except Exception as exc:  # noqa: BLE001 - surfaced through the inbox
                self.closed_reason = repr(exc)
                self.inbox.put(ET.Element("socket-closed"))
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close_status = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                self.inbox.put(ET.Element("socket-closed"))
                return
            if opcode == websocket.ABNF.OPCODE_TEXT:
                text = data.decode("utf-8")
                self.raw.append(text)
                try:
                    strict_parse(text)
                except Exception as exc:  # noqa: BLE001 - a strict client would fail here
                    self.inbox.put(ET.Element("bad-xml", {"error": str(exc), "raw": text[:300]}))
                    continue
                self.inbox.put(ET.fromstring(text))


@pytest.fixture
def clients():
    made = []
    yield made
    for client in made:
        try:
            client.stop()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


@pytest.fixture
def online(server, clients):
    """online(kind, user, resource) -> a strict, logged-in client that sent its initial presence."""

    def make(kind: str, user: str, resource: str, presence: bool = True, srv=None):
        srv = srv or server
        client = StrictBoshClient(srv.bosh_url, wait=5) if kind == "bosh" else StrictWsClient(srv.ws_url)
        clients.append(client)
        client.login(user, resource=resource)
        if presence:
            client.presence()
        return client

    return make


def pinged_ok(client) -> bool:
    return client.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost").get("type") == "result"


def assert_healthy(client, sender, body: str) -> None:
    """The client's stream still works: a normal message arrives, a ping is answered,
    and nothing it received was refused by the strict parser."""
    sender.message(client.jid, body)
    got = client.recv_message(sender=sender.jid)
    assert got.findtext(q(NS_CLIENT, "body")) == body
    assert pinged_ok(client)
    for el in client.seen:
        assert el.tag != "bad-xml", el.attrib
    if isinstance(client, StrictBoshClient):
        assert set(client.statuses) == {200}, client.statuses
        assert client.terminated is None, ET.tostring(client.terminated)
    for raw in client.raw:
        strict_parse(raw)


def assert_stream_error(client, condition: str) -> None:
    """The client's stream was closed with ``condition``: over WebSocket a
    <stream:error/> and <close/> (RFC 7395 §3.6); over BOSH a terminate body with
    that condition carrying the <stream:error/> (XEP-0206 §7)."""
    if isinstance(client, WsClient):
        error = client.recv(10, lambda e: e.tag == q(NS_STREAM, "error"))
        client.recv(10, lambda e: e.tag in (q(NS_FRAMING, "close"), "socket-closed"))
    else:
        body = client.recv(10, lambda e: e.tag == q(NS_BOSH, "body") and e.get("type") == "terminate")
        assert body.get("condition") == condition, ET.tostring(body)
        error = body.find(q(NS_STREAM, "error"))
        assert error is not None, ET.tostring(body)
    assert error.find(q(NS_STREAMS_ERR, condition)) is not None, ET.tostring(error)


def nested(levels: int, leaf: str = "bottom") -> str:
    """``levels`` nested elements in their own namespace, the deepest holding ``leaf``."""
    return f"<n xmlns='{NS_DEEP}'>" + "<n>" * (levels - 1) + escape(leaf) + "</n>" * levels


def deep_message(to: str, levels: int, msg_id: str = "deep") -> str:
    """A message whose deepest element is ``levels`` below the <message/>."""
    return f"<message xmlns='{NS_CLIENT}' to='{to}' type='chat' id='{msg_id}'><body>deep</body>{nested(levels)}</message>"


def depth_below(el: ET.Element) -> int:
    """Levels below ``el`` (0 for a leaf), without recursion."""
    depth, level = 0, [el]
    while True:
        level = [c for e in level for c in e]
        if not level:
            return depth
        depth += 1


def canonical(el: ET.Element):
    """A comparable form of a tree: tag, attributes, text, tail, children (without the
    server's own XEP-0359 <stanza-id/>, which the archive adds to what the recipient gets)."""
    children = [c for c in el if c.tag != "{urn:xmpp:sid:0}stanza-id"]
    return (el.tag, sorted(el.attrib.items()), el.text or "", el.tail or "", [canonical(c) for c in children])


KINDS = ["bosh", "websocket"]


# -- point 7a: nesting depth ---------------------------------------------------------------

@pytest.mark.parametrize("recipient_kind", KINDS)
@pytest.mark.parametrize("sender_kind", KINDS)
def test_a_message_nested_1200_deep_is_refused_and_the_recipient_keeps_working(online, sender_kind, recipient_kind):
    bob = online(recipient_kind, "bob", "victim")
    carol = online("websocket", "carol", "friend")
    alice = online(sender_kind, "alice", "attacker")
    raw = deep_message(bob.jid, 1200)
    assert len(raw) > 8000
    carol.message(bob.jid, "queued before")  # lands in bob's queue just before the poison
    alice.send_xml(raw)
    assert_stream_error(alice, "policy-violation")
    # the message queued before the poison one is not lost, and the stream goes on
    assert bob.recv_message().findtext(q(NS_CLIENT, "body")) == "queued before"
    assert_healthy(bob, carol, "after the poison")
    bob.expect_nothing(0.3, lambda e: e.get("id") == "deep")


@pytest.mark.parametrize("recipient_kind", KINDS)
def test_a_message_at_the_depth_limit_arrives_whole_also_as_a_carbon(online, recipient_kind):
    """32 levels below the stanza (carbons, MAM and OMEMO need far fewer) are accepted,
    and the server's own wrappers (carbons: 3 more levels, plus the BOSH body) serialize."""
    bob = online(recipient_kind, "bob", "tab1")
    tab2 = online(recipient_kind, "bob", "tab2")
    assert tab2.iq(f"<enable xmlns='{NS_CARBONS}'/>", type_="set").get("type") == "result"
    alice = online("websocket", "alice", "sender")
    alice.send_xml(deep_message(bob.jid, DEFAULT_MAX_DEPTH, "at-limit"))
    got = bob.recv(match=lambda e: e.get("id") == "at-limit")
    assert depth_below(got) == DEFAULT_MAX_DEPTH
    assert "".join(got.find(q(NS_DEEP, "n")).itertext()) == "bottom"
    carbon = tab2.recv(match=lambda e: e.find(q(NS_CARBONS, "received")) is not None)
    inner = carbon.find(f"{q(NS_CARBONS, 'received')}/{q(NS_FORWARD, 'forwarded')}/{q(NS_CLIENT, 'message')}")
    assert depth_below(inner) == DEFAULT_MAX_DEPTH
    assert pinged_ok(alice)
    assert_healthy(bob, alice, "fine")
    assert_healthy(tab2, alice, "fine too")


@pytest.mark.parametrize("sender_kind", KINDS)
def test_one_level_over_the_depth_limit_is_policy_violation(online, sender_kind):
    bob = online("websocket", "bob", "b")
    alice = online(sender_kind, "alice", "a")
    alice.send_xml(deep_message(bob.jid, DEFAULT_MAX_DEPTH + 1, "over"))
    assert_stream_error(alice, "policy-violation")
    bob.expect_nothing(0.3, lambda e: e.get("id") == "over")
    assert pinged_ok(bob)


def test_the_depth_limit_is_configurable(make_server, clients):
    server = make_server(stanza_max_depth=4)
    alice = StrictWsClient(server.ws_url)
    clients.append(alice)
    alice.login("alice", resource="a")
    alice.send_xml(deep_message("alice@localhost/a", 4, "four"))
    assert depth_below(alice.recv(match=lambda e: e.get("id") == "four")) == 4
    alice.send_xml(deep_message("alice@localhost/a", 5, "five"))
    assert_stream_error(alice, "policy-violation")
    # over BOSH, also in the body that creates the session (no session to end yet)
    body = f"<body xmlns='{NS_BOSH}' rid='1' to='localhost' wait='5' hold='1'>{deep_message('bob@localhost', 5)}</body>"
    reply = requests.post(server.bosh_url, data=body.encode(), timeout=20)
    assert ET.fromstring(reply.content).get("condition") == "policy-violation"
    log = server.log()
    assert "WARNING boshroster.websocket: WebSocket message from 127.0.0.1 refused: stanza nested deeper than 4" in log
    assert "WARNING boshroster.web: BOSH body from 127.0.0.1 refused: stanza nested deeper than 4" in log
    assert "Traceback" not in log


# -- point 7b: namespaces the serializer must get right ----------------------------------------

# Valid XML 1.0 + namespaces that a careless serializer turns into something else.
TRICKY_PAYLOADS = {
    "xml-prefix-element": "<xml:foo/>",
    "xml-prefix-element-with-children": "<xml:foo xml:lang='de'><bar xmlns='urn:b'>x</bar><baz/></xml:foo>",
    "foreign-attribute-namespaces": "<x xmlns='urn:x' xmlns:p='urn:p' xmlns:q='urn:q' p:a='1' q:a='2'><y p:b='3'/></x>",
    "attribute-in-the-default-namespace": "<x xmlns='urn:x' xmlns:d='urn:x' d:a='1' a='2'/>",
    "prefix-named-like-a-generated-one": "<x xmlns='urn:x' xmlns:ns0='urn:other' ns0:a='1'><ns0:y/></x>",
    "escaped-namespace-uri": "<x xmlns='urn:a&amp;b&quot;c&lt;d' xmlns:p='urn:&#9;tab' p:v='&#13;&#10;&#9;'/>",
    "carriage-return-in-text": "<x xmlns='urn:x'>a&#13;b&#13;&#10;c</x>",
    "no-namespace-child": "<x xmlns=''/>",
}


@pytest.mark.parametrize("recipient_kind", KINDS)
def test_messages_with_tricky_namespaces_reach_the_contact_intact(online, recipient_kind):
    bob = online(recipient_kind, "bob", "b")
    alice = online("websocket", "alice", "a")
    for name, payload in TRICKY_PAYLOADS.items():
        sent = f"<message xmlns='{NS_CLIENT}' to='{bob.jid}' type='chat' id='{name}'><body>hi</body>{payload}</message>"
        alice.send_xml(sent)
        got = bob.recv(match=lambda e: e.get("id") == name or e.tag == "bad-xml")
        assert got.tag == q(NS_CLIENT, "message"), (name, got.attrib)
        # the tree the contact gets is the tree alice sent (the server adds 'from')
        assert got.get("from") == alice.jid
        del got.attrib["from"]
        assert canonical(got) == canonical(ET.fromstring(sent)), name
    assert_healthy(bob, alice, "still here")


@pytest.mark.parametrize("recipient_kind", KINDS)
def test_a_presence_with_xml_foo_reaches_the_contact_as_well_formed_xml(online, recipient_kind):
    """Point 7b: a contact's presence carrying <xml:foo/> hung Strophe.js in Chromium at login."""
    alice = online("websocket", "alice", "poison", presence=False)
    alice.presence("<status>here</status><xml:foo/>")
    # bob logs in after it: the presence reaches him with his roster (the probe answer)
    bob = online(recipient_kind, "bob", "b")
    assert bob.get_roster().get("type") == "result"
    got = bob.recv(match=lambda e: (e.tag == q(NS_CLIENT, "presence") and e.get("from") == alice.jid)
                   or e.tag == "bad-xml")
    assert got.tag == q(NS_CLIENT, "presence"), got.attrib
    assert got.find(q(NS_XML, "foo")) is not None
    # and a live update with it too
    alice.presence("<status>again</status><xml:foo xml:lang='en'>x</xml:foo>")
    update = bob.recv(match=lambda e: e.findtext(q(NS_CLIENT, "status")) == "again" or e.tag == "bad-xml")
    assert update.find(q(NS_XML, "foo")).text == "x"
    assert_healthy(bob, alice, "after the presence")


def test_the_raw_wire_form_uses_the_xml_prefix_and_never_declares_it(online):
    bob = online("websocket", "bob", "b")
    alice = online("websocket", "alice", "a")
    alice.send_xml(f"<message xmlns='{NS_CLIENT}' to='{bob.jid}' id='wire'><xml:foo xml:space='preserve'/></message>")
    bob.recv(match=lambda e: e.get("id") == "wire")
    raw = next(r for r in bob.raw if "wire" in r)
    assert "<xml:foo xml:space=\"preserve\"/>" in raw, raw
    assert NS_XML not in raw, raw


# -- point 6: the size of each stanza inside a BOSH body ------------------------------------------

LIMIT = 4096


def sized_message(to: str, size: int, msg_id: str, xmlns: bool = False) -> str:
    """A message of exactly ``size`` UTF-8 bytes, its body padded with "z"; without
    ``xmlns`` as a stanza is written inside a BOSH body (it inherits jabber:client)."""
    ns = f" xmlns='{NS_CLIENT}'" if xmlns else ""
    head = f"<message{ns} to='{to}' type='chat' id='{msg_id}'><body>"
    tail = "</body></message>"
    pad = size - len(head.encode()) - len(tail)
    assert pad > 0 and "z" not in head
    return head + "z" * pad + tail


def post_body(server, sid_client: BoshClient, inner: str) -> ET.Element:
    rid = sid_client.next_rid()
    body = f"<body xmlns='{NS_BOSH}' rid='{rid}' sid='{sid_client.sid}'>{inner}</body>".encode()
    reply = requests.post(server.bosh_url, data=body, headers={"Content-Type": "text/xml; charset=utf-8"}, timeout=20)
    assert reply.status_code == 200
    strict_parse(reply.content)
    return ET.fromstring(reply.content)


def logged_in_without_polling(server, user: str, resource: str) -> StrictBoshClient:
    """A logged-in BOSH client whose poll loop is stopped, so a test can post bodies itself."""
    client = StrictBoshClient(server.bosh_url, wait=1)
    client.login(user, resource=resource)
    client._loop.kill()
    deadline = time.monotonic() + 5
    while client._in_flight and time.monotonic() < deadline:  # let the parked request come back
        time.sleep(0.05)
    return client


@pytest.mark.parametrize("oversize", [1, 600_000 - LIMIT])
def test_a_stanza_over_the_limit_inside_a_bosh_body_is_refused_and_not_stored(make_server, clients, oversize):
    server = make_server(stanza_size_limit=LIMIT, bosh_max_wait=1)
    alice = logged_in_without_polling(server, "alice", "sender")
    clients.append(alice)
    exact = sized_message("bob@localhost", LIMIT, "exact")
    assert len(exact.encode()) == LIMIT
    reply = post_body(server, alice, exact)  # at the limit: accepted (stored offline for bob)
    assert reply.get("type") != "terminate", ET.tostring(reply)
    big = sized_message("bob@localhost", LIMIT + oversize, "big")
    reply = post_body(server, alice, f"<message to='bob@localhost' id='before'><body>x</body></message>{big}")
    assert reply.get("type") == "terminate" and reply.get("condition") == "policy-violation", ET.tostring(reply)
    error = reply.find(q(NS_STREAM, "error"))
    assert error is not None and error.find(q(NS_STREAMS_ERR, "policy-violation")) is not None
    assert "larger than 4096 bytes" in server.log()
    # the session is over: its sid is no longer served
    after = post_body(server, alice, "")
    assert after.get("type") == "terminate"
    # bob gets the message at the limit, and neither the big one nor the one beside it in the refused body
    bob = StrictBoshClient(server.bosh_url, wait=1)
    clients.append(bob)
    bob.login("bob", resource="b")
    bob.presence()
    got = bob.recv_message()
    assert got.get("id") == "exact" and got.findtext(q(NS_CLIENT, "body")) == "z" * exact.count("z")
    bob.expect_nothing(1.0, lambda e: e.tag == q(NS_CLIENT, "message"))
    assert pinged_ok(bob)


def test_the_default_limit_refuses_262145_bytes_and_keeps_262144(make_server, clients):
    server = make_server(bosh_max_wait=1)
    alice = logged_in_without_polling(server, "alice", "sender")
    clients.append(alice)
    reply = post_body(server, alice, sized_message("bob@localhost", 262_144, "exact"))
    assert reply.get("type") != "terminate", ET.tostring(reply)
    reply = post_body(server, alice, sized_message("bob@localhost", 262_145, "big"))
    assert reply.get("condition") == "policy-violation", ET.tostring(reply)
    bob = StrictWsClient(server.ws_url)
    clients.append(bob)
    bob.login("bob", resource="b")
    bob.presence()
    assert bob.recv_message().get("id") == "exact"
    bob.expect_nothing(1.0, lambda e: e.tag == q(NS_CLIENT, "message"))


def test_a_websocket_message_exactly_at_the_limit_is_accepted(make_server, clients):
    server = make_server(stanza_size_limit=LIMIT)
    bob = StrictWsClient(server.ws_url)
    clients.append(bob)
    bob.login("bob", resource="b")
    bob.presence()
    alice = StrictWsClient(server.ws_url)
    clients.append(alice)
    alice.login("alice", resource="a")
    exact = sized_message(bob.jid, LIMIT, "exact", xmlns=True)
    assert len(exact.encode()) == LIMIT
    alice.send_xml(exact)
    assert bob.recv_message().get("id") == "exact"
    alice.send_xml(exact.replace("<body>", "<body>z", 1))
    assert_stream_error(alice, "policy-violation")
    assert pinged_ok(bob)


# -- found by the fuzzer: a DTD in UTF-16 passed the "<!" test of the fast path --------------------

def utf16_bomb(stanza_open: str, stanza_close: str) -> bytes:
    """An entity bomb written in BOM-less UTF-16LE: valid UTF-8 bytes (ASCII and NULs), so it
    passes a WebSocket text frame or a BOSH body, and has no b"<!" for the fast path to see."""
    dtd = ("<!DOCTYPE m [<!ENTITY a 'lollollollollol'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
           "<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'>]>")
    return (dtd + stanza_open + "<body>&c;</body>" + stanza_close).encode("utf-16-le")


@pytest.mark.parametrize("sender_kind", KINDS)
def test_an_entity_bomb_in_utf16_is_refused(online, server, sender_kind):
    bob = online("websocket", "bob", "b")
    alice = online(sender_kind, "alice", "a", presence=False)
    stanza = (f"<message xmlns='{NS_CLIENT}' to='{bob.jid}' id='bomb'>", "</message>")
    if sender_kind == "websocket":
        alice.ws.send(utf16_bomb(*stanza).decode("utf-8"))
        assert_stream_error(alice, "not-well-formed")
    else:
        data = utf16_bomb(f"<body xmlns='{NS_BOSH}' rid='{alice.next_rid()}' sid='{alice.sid}'>" + stanza[0],
                          stanza[1] + "</body>")
        reply = requests.post(server.bosh_url, data=data, headers={"Content-Type": "text/xml"}, timeout=20)
        assert reply.status_code == 200 and b"lollol" not in reply.content
        assert ET.fromstring(reply.content).get("condition") == "bad-request"
    bob.expect_nothing(0.5, lambda e: e.get("id") == "bomb")
    assert pinged_ok(bob)

"""RFC 6121 IM between users of the same domain, over both transports.

Every test runs once with BOSH clients and once with WebSocket clients (the
``transport`` fixture), and a few mix the two.  Rules are named after the
RFC 6121 §8.5 branch they check.
"""

import xml.etree.ElementTree as ET

import pytest

from harness import NS_CLIENT, NS_STANZAS, NS_STREAM, BoshClient, WsClient, q

NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"


def error_condition(stanza: ET.Element) -> str | None:
    err = stanza.find(q(NS_CLIENT, "error"))
    if err is None:
        return None
    for child in err:
        if child.tag.startswith(f"{{{NS_STANZAS}}}") and not child.tag.endswith("}text"):
            return child.tag.split("}")[1]
    return None


def online(connect, user, resource="r", presence=True, **kwargs):
    client = connect(**kwargs)
    client.login(user, resource=resource)
    if presence:
        client.presence()
    return client


def test_presence_both_ways_and_unavailable_on_logout(connect):
    alice = online(connect, "alice", "home")
    bob = online(connect, "bob", "work")
    # alice was first: she learns of bob by his broadcast; bob learns of alice by his probe.
    assert alice.recv_presence(sender="bob@localhost/work").get("type") is None
    assert bob.recv_presence(sender="alice@localhost/home").get("type") is None
    # A presence update with status and show reaches the contact.
    alice.presence("<show>away</show><status>lunch &amp; coffee</status>")
    update = bob.recv_presence(sender="alice@localhost/home")
    assert update.findtext(q(NS_CLIENT, "show")) == "away"
    assert update.findtext(q(NS_CLIENT, "status")) == "lunch & coffee"
    alice.close()
    bob.recv_presence(sender="alice@localhost/home", type_="unavailable")


@pytest.mark.parametrize("text", ["plain", "héllo wörld ✓ 😀", "<b>not markup</b> & \"quotes\" 'apos' ]]>"])
def test_messages_both_ways_keep_unicode_and_xml_special_characters(connect, text):
    alice = online(connect, "alice", "a")
    bob = online(connect, "bob", "b")
    alice.message("bob@localhost", text)
    got = bob.recv_message(sender="alice@localhost/a")
    assert got.findtext(q(NS_CLIENT, "body")) == text
    assert got.get("from") == "alice@localhost/a"
    bob.message("alice@localhost/a", text[::-1])
    back = alice.recv_message(sender="bob@localhost/b")
    assert back.findtext(q(NS_CLIENT, "body")) == text[::-1]


def test_messages_cross_transports(server):
    alice = BoshClient(server.bosh_url, wait=5)
    alice.login("alice", resource="bosh")
    alice.presence()
    bob = WsClient(server.ws_url)
    bob.login("bob", resource="ws")
    bob.presence()
    alice.message("bob@localhost", "over BOSH")
    assert bob.recv_message().findtext(q(NS_CLIENT, "body")) == "over BOSH"
    bob.message("alice@localhost", "over WebSocket")
    assert alice.recv_message().findtext(q(NS_CLIENT, "body")) == "over WebSocket"
    alice.close()
    bob.close()


def test_forged_from_is_replaced_by_the_server(connect):
    alice = online(connect, "alice", "a")
    bob = online(connect, "bob", "b")
    alice.send_xml(f"<message xmlns='{NS_CLIENT}' to='bob@localhost' from='carol@localhost/evil' type='chat'><body>who?</body></message>")
    got = bob.recv_message()
    assert got.get("from") == "alice@localhost/a"


def test_message_errors_unknown_user_other_domain_malformed_jid(connect):
    alice = online(connect, "alice", "a")
    cases = {
        "nobody@localhost": "service-unavailable",  # §8.5.1
        "bob@elsewhere.example": "remote-server-not-found",
        "bad user@localhost": "jid-malformed",
    }
    for to, condition in cases.items():
        mid = alice.new_id()
        alice.send_xml(f"<message xmlns='{NS_CLIENT}' to='{to}' id='{mid}' type='chat'><body>x</body></message>")
        reply = alice.recv(match=lambda e, mid=mid: e.get("id") == mid)
        assert reply.get("type") == "error", ET.tostring(reply)
        assert error_condition(reply) == condition, ET.tostring(reply)


def test_iq_routing_to_full_jid_and_errors(connect):
    alice = online(connect, "alice", "a")
    bob = online(connect, "bob", "b")
    # An IQ to an online full JID is delivered, and the answer routed back.
    alice.send_xml(f"<iq xmlns='{NS_CLIENT}' type='get' id='v1' to='bob@localhost/b'><query xmlns='jabber:iq:version'/></iq>")
    asked = bob.recv(match=lambda e: e.get("id") == "v1")
    assert asked.get("from") == "alice@localhost/a"
    bob.send_xml(f"<iq xmlns='{NS_CLIENT}' type='result' id='v1' to='alice@localhost/a'><query xmlns='jabber:iq:version'><name>harness</name></query></iq>")
    answer = alice.recv(match=lambda e: e.get("id") == "v1")
    assert answer.get("type") == "result" and answer.get("from") == "bob@localhost/b"
    # §8.5.3.2.3: an offline full JID -> service-unavailable.
    reply = alice.iq("<query xmlns='jabber:iq:version'/>", to="bob@localhost/gone")
    assert error_condition(reply) == "service-unavailable"
    # Not implemented on the server: one answer, service-unavailable.
    reply = alice.iq("<query xmlns='jabber:iq:private'><x xmlns='y'/></query>")
    assert error_condition(reply) == "service-unavailable"
    reply = alice.iq("<vCard xmlns='vcard-temp'/>", to="bob@localhost")
    assert error_condition(reply) == "service-unavailable"
    # An IQ get with two children is bad-request (RFC 6120 §8.2.3).
    reply = alice.iq("<ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/>", to="localhost")
    assert error_condition(reply) == "bad-request"


def test_disco_ping_and_carbons_enable(connect):
    alice = online(connect, "alice", "a", presence=False)
    info = alice.iq(f"<query xmlns='{NS_DISCO_INFO}'/>", to="localhost")
    features = {f.get("var") for f in info.iter(q(NS_DISCO_INFO, "feature"))}
    assert {NS_DISCO_INFO, "urn:xmpp:ping", NS_CARBONS} <= features
    assert "urn:xmpp:mam:2" not in features and "urn:xmpp:sm:3" not in features  # only what is implemented
    identity = info.find(f"{q(NS_DISCO_INFO, 'query')}/{q(NS_DISCO_INFO, 'identity')}")
    assert identity.get("category") == "server" and identity.get("type") == "im"
    items = alice.iq("<query xmlns='http://jabber.org/protocol/disco#items'/>", to="localhost")
    assert items.get("type") == "result"
    assert alice.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost").get("type") == "result"
    assert alice.iq("<ping xmlns='urn:xmpp:ping'/>").get("type") == "result"
    assert alice.iq(f"<enable xmlns='{NS_CARBONS}'/>", type_="set").get("type") == "result"
    own = alice.iq(f"<query xmlns='{NS_DISCO_INFO}'/>", to="alice@localhost")
    assert own.get("type") == "result"


def test_carbons_copy_sent_and_received_messages_to_other_tabs(connect):
    tab1 = online(connect, "alice", "tab1")
    tab2 = online(connect, "alice", "tab2")
    for tab in (tab1, tab2):
        assert tab.iq(f"<enable xmlns='{NS_CARBONS}'/>", type_="set").get("type") == "result"
    bob = online(connect, "bob", "b")
    # To a full JID: tab1 gets it, tab2 gets a <received/> carbon.
    bob.message("alice@localhost/tab1", "to tab1")
    assert tab1.recv_message().findtext(q(NS_CLIENT, "body")) == "to tab1"
    carbon = tab2.recv(match=lambda e: e.find(q(NS_CARBONS, "received")) is not None)
    assert carbon.get("from") == "alice@localhost"
    inner = carbon.find(f"{q(NS_CARBONS, 'received')}/{q(NS_FORWARD, 'forwarded')}/{q(NS_CLIENT, 'message')}")
    assert inner.findtext(q(NS_CLIENT, "body")) == "to tab1"
    # Sent from tab2: tab1 gets a <sent/> carbon.
    tab2.message("bob@localhost", "from tab2")
    assert bob.recv_message().findtext(q(NS_CLIENT, "body")) == "from tab2"
    sent = tab1.recv(match=lambda e: e.find(q(NS_CARBONS, "sent")) is not None)
    assert sent.find(f".//{q(NS_CLIENT, 'body')}").text == "from tab2"
    # <private/> messages are not copied.
    bob.send_xml(f"<message xmlns='{NS_CLIENT}' to='alice@localhost/tab1' type='chat'><body>secret</body><private xmlns='{NS_CARBONS}'/></message>")
    tab1.recv_message()
    tab2.expect_nothing_queued(lambda e: e.find(q(NS_CARBONS, "received")) is not None)  # routed: tab1 has it


def test_bare_jid_messages_go_to_the_highest_non_negative_priority(connect):
    high = online(connect, "carol", "high", presence=False)
    high.presence("<priority>5</priority>")
    low = online(connect, "carol", "low", presence=False)
    low.presence("<priority>1</priority>")
    hidden = online(connect, "carol", "hidden", presence=False)
    hidden.presence("<priority>-1</priority>")
    dave = online(connect, "dave", "d")
    dave.message("carol@localhost", "to the best")
    assert high.recv_message().findtext(q(NS_CLIENT, "body")) == "to the best"
    low.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "message"))  # routed: high has it
    hidden.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "message"))
    # A negative-priority resource still gets messages to its full JID.
    dave.message("carol@localhost/hidden", "direct")
    assert hidden.recv_message().findtext(q(NS_CLIENT, "body")) == "direct"


def test_directed_presence_and_its_unavailable_at_logout(connect):
    alice = online(connect, "alice", "a", presence=False)
    bob = online(connect, "bob", "b", presence=False)
    alice.presence("<status>just for bob</status>", to="bob@localhost/b")
    directed = bob.recv_presence(sender="alice@localhost/a")
    assert directed.findtext(q(NS_CLIENT, "status")) == "just for bob"
    alice.close()
    bob.recv_presence(sender="alice@localhost/a", type_="unavailable")


def test_subscription_requests_are_dropped(connect):
    alice = online(connect, "alice", "a")
    bob = online(connect, "bob", "b")
    bob.recv_presence(sender="alice@localhost/a")
    for kind in ("subscribe", "subscribed", "unsubscribe", "unsubscribed"):
        alice.presence(to="bob@localhost", type=kind)
    bob.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "presence") and e.get("type") in
                              ("subscribe", "subscribed", "unsubscribe", "unsubscribed"), after=[alice])


def test_offline_messages_survive_a_restart_and_arrive_with_delay(make_server, transport):
    server = make_server(bosh_max_wait=5)
    make = (lambda: BoshClient(server.bosh_url, wait=5)) if transport == "bosh" else (lambda: WsClient(server.ws_url))
    alice = make()
    alice.login("alice", resource="a")
    alice.presence()
    alice.message("bob@localhost", "while you were out <1>")
    alice.message("bob@localhost/oldtab", "to an old tab")  # §8.5.3.2.1: treated as bare
    alice.iq("<ping xmlns='urn:xmpp:ping'/>")  # both messages processed
    alice.stop()
    server.stop()
    server.start()
    bob = make()
    bob.login("bob", resource="b")
    bob.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "message"))  # not before initial presence
    bob.presence()
    first = bob.recv_message()
    second = bob.recv_message()
    assert first.findtext(q(NS_CLIENT, "body")) == "while you were out <1>"
    assert second.findtext(q(NS_CLIENT, "body")) == "to an old tab"
    assert first.get("from") == "alice@localhost/a"
    delay = first.find(q(NS_DELAY, "delay"))
    assert delay is not None and delay.get("stamp", "").endswith("Z") and delay.get("from") == "localhost"
    # Delivered once: a new session gets nothing more.
    bob.stop()
    again = make()
    again.login("bob", resource="c")
    again.presence()
    again.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "message"))


def test_graceful_shutdown_tells_every_client(make_server):
    server = make_server(bosh_max_wait=5)
    ws = WsClient(server.ws_url)
    ws.login("alice", resource="ws")
    bosh = BoshClient(server.bosh_url, wait=5)
    bosh.login("bob", resource="bosh")
    server.stop()
    error = ws.recv(match=lambda e: e.tag == q(NS_STREAM, "error"))
    assert error.find("{urn:ietf:params:xml:ns:xmpp-streams}system-shutdown") is not None
    terminated = bosh.recv(match=lambda e: e.get("type") == "terminate")
    assert terminated.get("condition") == "system-shutdown"

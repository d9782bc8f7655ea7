"""XEP-0198 over a real WebSocket: a stream cut mid-conversation is resumed with
every message sent meanwhile arriving exactly once, and the contact never sees
it go unavailable; an expired or unknown id fails and a fresh bind works."""

import xml.etree.ElementTree as ET

from harness import NS_BIND, NS_CLIENT, NS_SASL, WsClient, q

NS_SM = "urn:xmpp:sm:3"


def sm(name, **attrs):
    return f"<{name} xmlns='{NS_SM}'" + "".join(f" {k}='{v}'" for k, v in attrs.items()) + "/>"


def authenticate(client, user):
    client.wait_features()
    assert client.authenticate(user, "password").tag == q(NS_SASL, "success")
    client.restart()
    return client.wait_features()


def online(server, user):
    client = WsClient(server.ws_url)
    feats = authenticate(client, user)
    assert feats.find(q(NS_SM, "sm")) is not None
    client.bind("web")
    client.get_roster()
    client.presence()
    return client


def test_cut_websocket_resumes_and_every_message_arrives_once(server):
    bob = online(server, "bob")
    alice = online(server, "alice")
    bob.recv_presence(sender="alice@localhost/web")
    alice.send_xml(sm("enable", resume="true"))
    enabled = alice.recv(match=lambda e: e.tag == q(NS_SM, "enabled"))
    sm_id = enabled.get("id")
    assert enabled.get("resume") == "true"
    bob.message("alice@localhost", "one")
    assert alice.recv_message().findtext(q(NS_CLIENT, "body")) == "one"
    alice.send_xml(sm("a", h=1))
    alice.drop()  # the network goes away: no close frame, no </close>
    for text in ("two", "three"):
        bob.message("alice@localhost", text)
    bob.expect_nothing(1.0, lambda e: e.tag == q(NS_CLIENT, "presence") and e.get("type") == "unavailable")

    again = WsClient(server.ws_url)
    authenticate(again, "alice")
    again.send_xml(sm("resume", previd=sm_id, h=1))
    resumed = again.recv(match=lambda e: e.tag.startswith(f"{{{NS_SM}}}"))
    assert resumed.tag == q(NS_SM, "resumed"), ET.tostring(resumed)
    got = [again.recv_message().findtext(q(NS_CLIENT, "body")) for _ in range(2)]
    assert got == ["two", "three"]
    again.expect_nothing(0.5, lambda e: e.tag == q(NS_CLIENT, "message"))
    bob.message("alice@localhost", "four")
    assert again.recv_message().findtext(q(NS_CLIENT, "body")) == "four"
    # the resumed stream is the same session: same full JID, presence kept
    alice_jid = "alice@localhost/web"
    again.message("bob@localhost", "back")
    assert bob.recv_message().get("from") == alice_jid
    again.close(), bob.close()


def test_resume_with_an_unknown_id_fails_then_bind_works(server):
    client = WsClient(server.ws_url)
    authenticate(client, "alice")
    client.send_xml(sm("resume", previd="no-such-id", h=0))
    failed = client.recv(match=lambda e: e.tag.startswith(f"{{{NS_SM}}}"))
    assert failed.tag == q(NS_SM, "failed")
    assert failed.find("{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None
    assert client.bind("web").startswith("alice@localhost/")
    client.close()

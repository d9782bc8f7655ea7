"""XEP-0198 over a real WebSocket: a stream cut mid-conversation is resumed with
every message sent meanwhile arriving exactly once, and the contact never sees
it go unavailable; an expired or unknown id fails and a fresh bind works."""

import time
import xml.etree.ElementTree as ET

from harness import NS_BIND, NS_CLIENT, NS_SASL, NS_STANZAS, WsClient, q

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


def resumable(server, user):
    client = online(server, user)
    client.send_xml(sm("enable", resume="true"))
    return client, client.recv(match=lambda e: e.tag == q(NS_SM, "enabled")).get("id")


def try_resume(server, user, sm_id, h=0):
    again = WsClient(server.ws_url)
    authenticate(again, user)
    again.send_xml(sm("resume", previd=sm_id, h=h))
    return again, again.recv(match=lambda e: e.tag.startswith(f"{{{NS_SM}}}"))


def test_a_close_frame_without_close_leaves_the_session_resumable(server):
    """RFC 7395 §3.6.1, XEP-0198 §7: only <close/> ends the stream; a WebSocket closed without
    it (a browser closes with 1001 Going Away when the page unloads: a reload) hibernates."""
    bob = online(server, "bob")
    alice, sm_id = resumable(server, "alice")
    bob.recv_presence(sender="alice@localhost/web")
    alice.ws.close(status=1001)  # the close handshake, no <close/>
    bob.message("alice@localhost", "while reloading")
    bob.expect_nothing(1.0, lambda e: e.tag == q(NS_CLIENT, "presence") and e.get("type") == "unavailable")
    again, answer = try_resume(server, "alice", sm_id)
    assert answer.tag == q(NS_SM, "resumed"), ET.tostring(answer)
    assert again.recv_message().findtext(q(NS_CLIENT, "body")) == "while reloading"
    assert "alice@localhost/web hibernating" in server.log()
    again.close(), bob.close()


def test_close_ends_a_resumable_session_for_good(server):
    """<close/> is the clean end (XEP-0198 §7): contacts see unavailable at once, the id is gone."""
    bob = online(server, "bob")
    alice, sm_id = resumable(server, "alice")
    bob.recv_presence(sender="alice@localhost/web")
    alice.close()
    assert bob.recv_presence(timeout=5, sender="alice@localhost/web", type_="unavailable") is not None
    again, answer = try_resume(server, "alice", sm_id)
    assert answer.tag == q(NS_SM, "failed") and answer.get("h") is None
    assert answer.find(f"{{{NS_STANZAS}}}item-not-found") is not None
    again.close(), bob.close()


def test_resume_after_the_hibernation_ended_says_what_the_server_had(make_server):
    """XEP-0198 §5: <failed h/> for an expired id, so the client resends only the rest."""
    server = make_server(smacks_hibernation_time=1)
    alice, sm_id = resumable(server, "alice")
    for n in range(3):
        alice.message("alice@localhost/web", f"note {n}")  # three stanzas the server handled
    alice.send_xml(sm("r"))
    assert alice.recv(match=lambda e: e.tag == q(NS_SM, "a")).get("h") == "3"
    alice.drop()
    deadline = time.monotonic() + 10
    while "alice@localhost/web: hibernation timed out" not in server.log():
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.1)
    again, answer = try_resume(server, "alice", sm_id)
    assert answer.tag == q(NS_SM, "failed") and answer.get("h") == "3", ET.tostring(answer)
    assert again.bind("web") == "alice@localhost/web"
    again.close()

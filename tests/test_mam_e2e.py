"""XEP-0313 message archive end to end: real server, real BOSH and WebSocket clients.

Two users chat 120 messages; one pages through the archive with max=50 and gets all
120 once, in order; the live copies carry the recipient's <stanza-id/> and the archive
has the same ids; offline copies agree with the archive; another user's archive is
forbidden; the account advertises urn:xmpp:mam:2; a restart keeps the archive.
"""

import os
import xml.etree.ElementTree as ET

from harness import NS_CLIENT, NS_STANZAS, q

NS_MAM = "urn:xmpp:mam:2"
NS_RSM = "http://jabber.org/protocol/rsm"
NS_SID = "urn:xmpp:sid:0"
NS_FORWARD = "urn:xmpp:forward:0"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"


def online(connect, user, resource="web", **kwargs):
    client = connect(**kwargs)
    client.login(user, resource=resource)
    client.presence()
    return client


def error_condition(stanza):
    err = stanza.find(q(NS_CLIENT, "error"))
    if err is None:
        return None
    return next(c.tag.split("}")[1] for c in err if c.tag.startswith(f"{{{NS_STANZAS}}}") and not c.tag.endswith("}text"))


def stanza_ids(message):
    return {s.get("by"): s.get("id") for s in message.findall(q(NS_SID, "stanza-id"))}


def mam_query(client, queryid, rsm="", form="", to=None):
    """Send a MAM query; return (result messages for it, final iq)."""
    iq_id = client.new_id()
    to_attr = f" to='{to}'" if to else ""
    client.send_xml(f"<iq xmlns='{NS_CLIENT}' type='set' id='{iq_id}'{to_attr}>"
                    f"<query xmlns='{NS_MAM}' queryid='{queryid}'>{form}"
                    f"<set xmlns='{NS_RSM}'>{rsm}</set></query></iq>")
    final = client.recv(10, lambda e: e.tag == q(NS_CLIENT, "iq") and e.get("id") == iq_id)
    results = []
    while True:
        try:
            results.append(client.recv(0.01, lambda e: e.find(q(NS_MAM, "result")) is not None
                                       and e.find(q(NS_MAM, "result")).get("queryid") == queryid))
        except TimeoutError:
            break
    return results, final


def forwarded_message(result):
    return result.find(f"{q(NS_MAM, 'result')}/{q(NS_FORWARD, 'forwarded')}/{q(NS_CLIENT, 'message')}")


def page_through(client, max_=50):
    seen, after, pages = [], None, 0
    while True:
        pages += 1
        rsm = f"<max>{max_}</max>" + (f"<after>{after}</after>" if after else "")
        results, final = mam_query(client, f"p{pages}", rsm)
        assert final.get("type") == "result", ET.tostring(final)
        fin = final.find(q(NS_MAM, "fin"))
        seen += results
        if fin.get("complete") == "true":
            return seen, pages, fin
        after = fin.find(f"{q(NS_RSM, 'set')}/{q(NS_RSM, 'last')}").text
        assert pages < 10


def test_two_users_chat_120_messages_and_page_through_the_archive(connect):
    alice = online(connect, "alice", "web")
    bob = online(connect, "bob", "web")
    alice.recv_presence(sender="bob@localhost/web")
    bob.recv_presence(sender="alice@localhost/web")
    live_ids = {}  # body -> the id the recipient saw
    for i in range(120):
        sender, recipient, to = (alice, bob, "bob") if i % 2 == 0 else (bob, alice, "alice")
        sender.message(f"{to}@localhost", f"m{i}")
        got = recipient.recv_message(timeout=10)
        assert got.findtext(q(NS_CLIENT, "body")) == f"m{i}"
        ids = stanza_ids(got)
        assert set(ids) == {f"{to}@localhost"}, ET.tostring(got)  # only the recipient's archive
        live_ids[f"m{i}"] = ids[f"{to}@localhost"]
    assert len(set(live_ids.values())) == 120

    seen, pages, fin = page_through(alice)
    assert pages == 3
    bodies = [forwarded_message(r).findtext(q(NS_CLIENT, "body")) for r in seen]
    assert bodies == [f"m{i}" for i in range(120)]
    assert fin.find(f"{q(NS_RSM, 'set')}/{q(NS_RSM, 'count')}").text == "120"
    result_ids = [r.find(q(NS_MAM, "result")).get("id") for r in seen]
    assert len(set(result_ids)) == 120
    # The messages alice received carry, live, the id her archive has for them.
    for body, rid in zip(bodies, result_ids):
        if int(body[1:]) % 2 == 1:
            assert live_ids[body] == rid
    first = seen[0]
    assert first.get("from") == "alice@localhost" and first.get("to") == alice.jid
    inner = forwarded_message(first)
    assert inner.get("from") == "alice@localhost/web" and inner.get("to") == "bob@localhost"

    # Bob's archive, newest page first (RSM <before/>), then back: the same 120.
    results, final = mam_query(bob, "last", "<max>50</max><before/>")
    assert [forwarded_message(r).findtext(q(NS_CLIENT, "body")) for r in results] == [f"m{i}" for i in range(70, 120)]
    first_el = final.find(f"{q(NS_MAM, 'fin')}/{q(NS_RSM, 'set')}/{q(NS_RSM, 'first')}")
    assert first_el.get("index") == "70"
    with_alice = f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{NS_MAM}</value></field>" \
                 "<field var='with'><value>alice@localhost</value></field></x>"
    results, final = mam_query(bob, "w", "<max>0</max>", with_alice)
    assert results == [] and final.find(f".//{q(NS_RSM, 'count')}").text == "120"


def test_another_users_archive_is_forbidden_and_the_account_advertises_mam(connect):
    alice = online(connect, "alice", "web")
    bob = online(connect, "bob", "web")
    alice.message("bob@localhost", "secret")
    bob.recv_message()
    results, final = mam_query(alice, "spy", "<max>10</max>", to="bob@localhost")
    assert final.get("type") == "error" and error_condition(final) == "forbidden"
    assert results == []
    results, final = mam_query(alice, "host", "", to="localhost")
    assert final.get("type") == "error" and error_condition(final) == "service-unavailable"
    # Bad input gets the XEP's error, and the session goes on.
    bad_date = f"<x xmlns='jabber:x:data' type='submit'><field var='start'><value>yesterday</value></field></x>"
    assert error_condition(mam_query(alice, "d", "", bad_date)[1]) == "bad-request"
    unknown = f"<x xmlns='jabber:x:data' type='submit'><field var='fulltext'><value>x</value></field></x>"
    assert error_condition(mam_query(alice, "u", "", unknown)[1]) == "feature-not-implemented"
    assert error_condition(mam_query(alice, "n", "<after>nonexistent</after>")[1]) == "item-not-found"
    results, final = mam_query(alice, "ok", "<max>100000</max>")
    assert final.get("type") == "result" and len(results) == 1
    info = alice.iq(f"<query xmlns='{NS_DISCO_INFO}'/>", to="alice@localhost")
    features = {f.get("var") for f in info.iter(q(NS_DISCO_INFO, "feature"))}
    assert {"urn:xmpp:mam:2", "urn:xmpp:mam:2#extended", NS_SID} <= features
    form = alice.iq(f"<query xmlns='{NS_MAM}'/>")
    assert form.get("type") == "result" and form.find(f"{q(NS_MAM, 'query')}/{{jabber:x:data}}x") is not None


def test_offline_messages_carry_the_archive_id(connect):
    alice = online(connect, "alice", "web")
    alice.message("carol@localhost", "while you were out")
    alice.message("carol@localhost", "and another")
    carol = online(connect, "carol", "web")
    got = [carol.recv_message(timeout=10) for _ in range(2)]
    assert [m.findtext(q(NS_CLIENT, "body")) for m in got] == ["while you were out", "and another"]
    offline_ids = [stanza_ids(m).get("carol@localhost") for m in got]
    assert all(offline_ids)
    results, _ = mam_query(carol, "c", "<max>10</max>")
    assert [r.find(q(NS_MAM, "result")).get("id") for r in results] == offline_ids


def test_sent_carbons_do_not_carry_the_recipients_id(connect):
    alice = online(connect, "alice", "one")
    other_tab = online(connect, "alice", "two")
    assert other_tab.iq(f"<enable xmlns='{NS_CARBONS}'/>", type_="set").get("type") == "result"
    bob = online(connect, "bob", "web")
    alice.send_xml(f"<message xmlns='{NS_CLIENT}' to='bob@localhost' type='chat' id='c1'><body>hi</body>"
                   f"<stanza-id xmlns='{NS_SID}' by='bob@localhost' id='forged'/></message>")
    live = bob.recv_message()
    assert stanza_ids(live)["bob@localhost"] != "forged"
    carbon = other_tab.recv(5, lambda e: e.find(q(NS_CARBONS, "sent")) is not None)
    copied = carbon.find(f"{q(NS_CARBONS, 'sent')}/{q(NS_FORWARD, 'forwarded')}/{q(NS_CLIENT, 'message')}")
    assert copied.findtext(q(NS_CLIENT, "body")) == "hi"
    assert stanza_ids(copied) == {}  # neither bob's id nor the forged one


def test_archive_survives_a_restart(make_server):
    from harness import WsClient

    server = make_server()
    alice, bob = WsClient(server.ws_url), WsClient(server.ws_url)
    try:
        alice.login("alice", resource="web")
        bob.login("bob", resource="web")
        bob.presence()
        for i in range(3):
            alice.message("bob@localhost", f"before {i}")
        for _ in range(3):
            bob.recv_message()
    finally:
        alice.stop()
        bob.stop()
    server.stop()  # SIGTERM: the queue is committed on the way out
    server.start()
    again = WsClient(server.ws_url)
    try:
        again.login("alice", resource="web")
        results, final = mam_query(again, "r", "<max>10</max>")
        assert [forwarded_message(r).findtext(q(NS_CLIENT, "body")) for r in results] == [f"before {i}" for i in range(3)]
    finally:
        again.stop()


def test_archive_disabled_is_neither_advertised_nor_stamped(make_server):
    from harness import WsClient

    server = make_server(archive_enabled=False)
    alice, bob = WsClient(server.ws_url), WsClient(server.ws_url)
    try:
        alice.login("alice", resource="web")
        bob.login("bob", resource="web")
        bob.presence()
        alice.message("bob@localhost", "off the record")
        got = bob.recv_message()
        assert got.findtext(q(NS_CLIENT, "body")) == "off the record" and stanza_ids(got) == {}
        info = alice.iq(f"<query xmlns='{NS_DISCO_INFO}'/>", to="alice@localhost")
        features = {f.get("var") for f in info.iter(q(NS_DISCO_INFO, "feature"))}
        assert not any(f.startswith("urn:xmpp:mam") for f in features) and NS_SID not in features
        results, final = mam_query(alice, "x", "<max>10</max>")
        assert results == [] and error_condition(final) == "service-unavailable"
        assert not os.path.exists(os.path.join(server.settings["data_dir"], "archive.sqlite3"))
    finally:
        alice.stop()
        bob.stop()


# -- what the archive keeps: bounced messages, the app's API -----------------------------------

def archive_of(client, queryid="a"):
    """(id, body, from) of every message in the client's archive, and the fin's count."""
    results, final = mam_query(client, queryid, "<max>50</max>")
    assert final.get("type") == "result", ET.tostring(final)
    count = final.find(f"{q(NS_MAM, 'fin')}/{q(NS_RSM, 'set')}/{q(NS_RSM, 'count')}")
    items = [(r.find(q(NS_MAM, "result")).get("id"), forwarded_message(r).findtext(q(NS_CLIENT, "body")),
              forwarded_message(r).get("from")) for r in results]
    return items, (count.text if count is not None else None)


def test_a_message_bounced_because_offline_storage_is_full_leaves_both_archives(make_server):
    """Archived at message-accepted, then refused (offline storage full): out of the sender's
    and the recipient's archives; the counts stay exact and the ids of what was kept hold."""
    from harness import WsClient

    server = make_server(offline_max_per_user=2)
    alice, carol = WsClient(server.ws_url), WsClient(server.ws_url)
    try:
        alice.login("alice", resource="web")
        alice.presence()
        for i in range(3):
            alice.message("carol@localhost", f"o{i}")
        bounced = alice.recv(10, lambda e: e.tag == q(NS_CLIENT, "message") and e.get("type") == "error")
        assert error_condition(bounced) == "service-unavailable"
        items, count = archive_of(alice)
        assert [body for _, body, _ in items] == ["o0", "o1"] and count == "2"
        carol.login("carol", resource="web")
        carol.presence()
        got = [carol.recv_message(timeout=10) for _ in range(2)]
        assert [m.findtext(q(NS_CLIENT, "body")) for m in got] == ["o0", "o1"]
        items, count = archive_of(carol)
        assert [(sid, body) for sid, body, _ in items] == [
            (stanza_ids(m)["carol@localhost"], m.findtext(q(NS_CLIENT, "body"))) for m in got]
        assert count == "2"
        # No hole where the bounced message was: the next one is third, everywhere.
        alice.message("carol@localhost", "o3")
        live = carol.recv_message(timeout=10)
        items, count = archive_of(carol, "b")
        assert [body for _, body, _ in items] == ["o0", "o1", "o3"] and count == "3"
        assert items[-1][0] == stanza_ids(live)["carol@localhost"]
        items, count = archive_of(alice, "c")
        assert [body for _, body, _ in items] == ["o0", "o1", "o3"] and count == "3"
    finally:
        alice.stop()
        carol.stop()


def test_a_message_bounced_for_a_congested_recipient_leaves_the_archive(tmp_path, backend):
    """BOSH (in process, fake clock): bob does not poll, the 7th and 8th messages bounce with
    resource-constraint; the archives keep the 6 bob got, in order, with exact counts."""
    from bosh_inprocess import World

    ping = "<iq xmlns='jabber:client' type='get' id='p' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    w = World(tmp_path / "w", backend.url_template, bosh_high_water_stanzas=5, bosh_max_pending=100)
    try:
        alice = w.client().login("alice", "a")
        bob = w.client().login("bob", "b")
        reply = alice.post("".join(alice.message("bob@localhost/b", f"c {i}", f"c{i}") for i in range(8))
                           + ping)
        bounced = [el.get("id") for el in reply if el.get("type") == "error"]
        assert bounced == ["c6", "c7"]
        got = [el for el in bob.spawn().get(timeout=1) if el.tag == q(NS_CLIENT, "message")]
        assert [m.get("id") for m in got] == [f"c{i}" for i in range(6)]
        for client, queryid in ((alice, "qa"), (bob, "qb")):
            reply = client.post(f"<iq xmlns='{NS_CLIENT}' type='set' id='{queryid}'><query xmlns='{NS_MAM}'"
                                f" queryid='{queryid}'><set xmlns='{NS_RSM}'><max>50</max></set></query></iq>")
            results = [el for el in reply if el.find(q(NS_MAM, "result")) is not None]
            fin = next(el for el in reply if el.get("id") == queryid).find(q(NS_MAM, "fin"))
            assert [forwarded_message(r).get("id") for r in results] == [f"c{i}" for i in range(6)]
            assert fin.find(f"{q(NS_RSM, 'set')}/{q(NS_RSM, 'count')}").text == "6"
        assert [r.find(q(NS_MAM, "result")).get("id") for r in results] == [stanza_ids(m)["bob@localhost"] for m in got]
    finally:
        w.close()


def test_messages_from_the_app_api_are_archived_like_client_messages(server):
    """POST /api/messages: from a user (both archives) or from the domain (the recipient's),
    delivered live or stored offline: the live copy carries the archive's id."""
    import requests

    from harness import WsClient

    def post(body):
        reply = requests.post(server.base_url + "/api/messages", json=body, timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()["status"]

    bob = WsClient(server.ws_url)
    alice = WsClient(server.ws_url)
    carol = WsClient(server.ws_url)
    try:
        bob.login("bob", resource="web")
        bob.presence()
        assert post({"from": "alice@localhost", "to": "bob@localhost", "body": "from alice, via the app"}) == "delivered"
        assert post({"to": "bob", "body": "from the service", "type": "normal"}) == "delivered"
        assert post({"to": "bob", "body": "a headline is not archived", "type": "headline"}) == "delivered"
        live = [bob.recv_message(timeout=10) for _ in range(3)]
        items, count = archive_of(bob)
        assert [(body, frm) for _, body, frm in items] == [("from alice, via the app", "alice@localhost"),
                                                           ("from the service", "localhost")]
        assert count == "2"
        assert [sid for sid, _, _ in items] == [stanza_ids(m)["bob@localhost"] for m in live[:2]]
        assert stanza_ids(live[2]) == {}
        alice.login("alice", resource="web")
        items, count = archive_of(alice)
        assert [body for _, body, _ in items] == ["from alice, via the app"] and count == "1"
        # carol is offline: stored, and what she gets from offline storage has her archive's id.
        assert post({"to": "carol", "body": "while you were away"}) == "stored"
        carol.login("carol", resource="web")
        carol.presence()
        stored = carol.recv_message(timeout=10)
        items, _ = archive_of(carol)
        assert [(sid, body) for sid, body, _ in items] == [(stanza_ids(stored)["carol@localhost"], "while you were away")]
    finally:
        for client in (alice, bob, carol):
            client.stop()

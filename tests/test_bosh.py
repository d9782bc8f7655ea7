"""XEP-0124 / XEP-0206 against the real server: raw bodies over HTTP.

Errors must be HTTP 200 with <body type='terminate' condition='…'/> (Strophe
drops a session on any 4xx), and one client's bad request must not disturb
another client's session.  What depends on BOSH timing ('wait', inactivity,
early rids, the replay buffer) is tested in-process on a fake clock:
tests/test_bosh_inprocess.py.
"""

import xml.etree.ElementTree as ET

import pytest
import requests

from harness import NS_BOSH, NS_CLIENT, NS_SASL, NS_STREAM, BoshClient, q

XBOSH = "urn:xmpp:xbosh"


def post(server, body: bytes | str, headers: dict | None = None) -> requests.Response:
    data = body.encode("utf-8") if isinstance(body, str) else body
    headers = {"Content-Type": "text/xml; charset=utf-8", **(headers or {})}
    return requests.post(server.bosh_url, data=data, headers=headers, timeout=20)


def terminate_condition(response: requests.Response) -> str | None:
    assert response.status_code == 200, response.status_code
    body = ET.fromstring(response.content)
    assert body.tag == q(NS_BOSH, "body")
    assert body.get("type") == "terminate", response.content
    return body.get("condition")


def pinged_ok(client) -> bool:
    reply = client.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    return reply.get("type") == "result"


@pytest.fixture
def bystander(server):
    """A logged-in client that every bad request must leave untouched."""
    client = BoshClient(server.bosh_url, wait=5)
    client.login("dave", resource="bystander")
    yield client
    client.stop()


def test_session_creation_response(server):
    reply = post(server, f"<body xmlns='{NS_BOSH}' xmlns:xmpp='{XBOSH}' to='localhost' rid='1000' wait='120' hold='1' ver='1.6' xmpp:version='1.0' xml:lang='en'/>")
    assert reply.headers["Content-Type"].startswith("text/xml")
    body = ET.fromstring(reply.content)
    sid = body.get("sid")
    assert sid and len(sid) >= 24
    assert body.get("wait") == "5"  # clamped to bosh_max_wait
    assert body.get("hold") == "1" and body.get("requests") == "2"
    assert body.get("inactivity") and body.get("polling") and body.get("ver")
    assert body.get(q(XBOSH, "version")) == "1.0"
    assert body.get(q(XBOSH, "restartlogic")) == "true"
    assert body.get("from") == "localhost"
    mechs = [m.text for m in body.find(q(NS_STREAM, "features")).find(q(NS_SASL, "mechanisms"))]
    assert {"SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"} <= set(mechs)  # PLAIN: loopback
    # Two sessions never share a sid.
    other = ET.fromstring(post(server, f"<body xmlns='{NS_BOSH}' to='localhost' rid='5' wait='5' hold='1'/>").content)
    assert other.get("sid") != sid


def test_xml_of_the_wire_has_no_prefixes(server):
    raw = post(server, f"<body xmlns='{NS_BOSH}' to='localhost' rid='77' wait='5' hold='1'/>").text
    assert "ns0:" not in raw and "<stream:features" in raw and 'xmlns:stream="http://etherx.jabber.org/streams"' in raw
    assert '<mechanisms xmlns="urn:ietf:params:xml:ns:xmpp-sasl">' in raw


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256", "PLAIN"])
def test_login_with_each_mechanism(server, mechanism):
    client = BoshClient(server.bosh_url, wait=5)
    jid = client.login("alice", mechanism=mechanism, resource="web")
    assert jid == "alice@localhost/web"
    client.close()


def test_wrong_password_is_not_authorized_and_logged_without_password(server):
    client = BoshClient(server.bosh_url, wait=5)
    client.wait_features()
    failure = client.authenticate("alice", "hunter2-wrong", "SCRAM-SHA-1")
    assert failure.tag == q(NS_SASL, "failure")
    assert failure.find(q(NS_SASL, "not-authorized")) is not None
    failure = client.authenticate("alice", "hunter2-wrong", "PLAIN")
    assert failure.find(q(NS_SASL, "not-authorized")) is not None
    # The stream survives a failed attempt: the right password still works.
    assert client.authenticate("alice", "password", "SCRAM-SHA-256").tag == q(NS_SASL, "success")
    client.stop()
    log = server.log()
    assert "login failed from 127.0.0.1" in log
    assert "hunter2" not in log


def test_failed_logins_are_throttled_per_address_and_user(make_server):
    # Loopback is exempt by default (auth_throttle_exempt); tests/test_throttle.py has the rest.
    server = make_server(auth_failure_limit=3, auth_failure_window=60.0, auth_throttle_exempt=[])
    client = BoshClient(server.bosh_url, wait=5)
    client.wait_features()
    for _ in range(3):
        assert client.authenticate("bob", "nope", "PLAIN").find(q(NS_SASL, "not-authorized")) is not None
    throttled = client.authenticate("bob", "password", "PLAIN")
    assert throttled.find(q(NS_SASL, "temporary-auth-failure")) is not None
    client.stop()


def test_restart_gives_bind_features_and_duplicate_resource_gets_a_new_one(server):
    first = BoshClient(server.bosh_url, wait=5)
    second = BoshClient(server.bosh_url, wait=5)
    assert first.login("bob", resource="tab") == "bob@localhost/tab"
    second_jid = second.login("bob", resource="tab")
    assert second_jid.startswith("bob@localhost/tab") and second_jid != "bob@localhost/tab"
    # Both tabs stay connected: no kick-off war (RFC 6120 §7.7.2.2 a).
    assert pinged_ok(first) and pinged_ok(second)
    generated = BoshClient(server.bosh_url, wait=5)
    assert generated.login("bob", resource=None).startswith("bob@localhost/")
    for c in (first, second, generated):
        c.close()


def test_legacy_session_iq_is_answered_but_not_advertised(server):
    client = BoshClient(server.bosh_url, wait=5)
    client.wait_features()
    client.authenticate("carol", "password")
    client.restart()
    feats = client.wait_features()
    assert feats.find("{urn:ietf:params:xml:ns:xmpp-session}session") is None
    client.bind("s")
    reply = client.iq("<session xmlns='urn:ietf:params:xml:ns:xmpp-session'/>", type_="set")
    assert reply.get("type") == "result"
    client.close()


def test_repeated_rid_replays_the_same_response(server):
    client = BoshClient(server.bosh_url, wait=5, start=False)
    created = post(server, f"<body xmlns='{NS_BOSH}' to='localhost' rid='500' wait='5' hold='1'/>")
    sid = ET.fromstring(created.content).get("sid")
    auth = f"<body xmlns='{NS_BOSH}' rid='501' sid='{sid}'><auth xmlns='{NS_SASL}' mechanism='PLAIN'>AGFsaWNlAHBhc3N3b3Jk</auth></body>"
    first = post(server, auth)
    assert b"success" in first.content
    again = post(server, auth)
    assert again.content == first.content  # byte-identical replay, not a second login attempt
    assert post(server, f"<body xmlns='{NS_BOSH}' to='localhost' rid='500' sid='{sid}'/>").content == created.content
    del client


def test_rid_outside_the_window_is_item_not_found(server, bystander):
    created = ET.fromstring(post(server, f"<body xmlns='{NS_BOSH}' to='localhost' rid='100' wait='5' hold='1'/>").content)
    sid = created.get("sid")
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='150' sid='{sid}'/>")) == "item-not-found"
    # The session is gone afterwards.
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='101' sid='{sid}'/>")) == "item-not-found"
    assert pinged_ok(bystander)


def test_unknown_sid_and_missing_rid_and_bad_attributes(server, bystander):
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='1' sid='no-such-sid'/>")) == "item-not-found"
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' sid='no-such-sid'/>")) == "bad-request"
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' to='localhost'/>")) == "bad-request"
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='x1' to='localhost'/>")) == "bad-request"
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='1' to='localhost' wait='soon'/>")) == "bad-request"
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='1'/>")) == "improper-addressing"
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='1' to='elsewhere.example'/>")) == "host-unknown"
    assert terminate_condition(post(server, "<notbody rid='1'/>")) == "bad-request"
    assert pinged_ok(bystander)


@pytest.mark.parametrize(
    "payload",
    [
        b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1'",  # truncated
        b"\xff\xfe not xml",
        b"",
        b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'><!-- hi --></body>",
        b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]>"
        b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'>&lol2;</body>",
        b"<!DOCTYPE body SYSTEM 'file:///etc/passwd'><body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'/>",
        # issue 12: what could upset the shared feed parser (xmlio._FeedParser) of the server
        b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'>",
        b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'/><s>",
        b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'/></w>",
        b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'/>junk",
        b"<body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'/><body/>",
    ],
    ids=["truncated", "binary", "empty", "comment", "entity-bomb", "external-dtd",
         "unclosed", "then-unclosed-s", "end-of-the-wrapper", "text-after", "two-bodies"],
)
def test_malformed_and_dangerous_xml_is_refused_with_http_200(server, bystander, payload):
    reply = post(server, payload)
    assert terminate_condition(reply) == "bad-request"
    assert b"lollol" not in reply.content and b"root:" not in reply.content
    assert pinged_ok(bystander)


def test_oversized_body_is_policy_violation_before_parsing(make_server):
    server = make_server(bosh_max_body=4096)
    big = "<body xmlns='http://jabber.org/protocol/httpbind' rid='1' to='localhost'>" + "x" * 10000 + "</body>"
    assert terminate_condition(post(server, big)) == "policy-violation"
    # Chunked (no Content-Length) is bounded too.
    reply = requests.post(server.bosh_url, data=iter([big.encode()[:3000], big.encode()[3000:]]), timeout=10)
    assert terminate_condition(reply) == "policy-violation"


def test_client_terminate_logs_out_and_contacts_see_unavailable(server):
    alice = BoshClient(server.bosh_url, wait=5)
    alice.login("alice", resource="a")
    alice.presence()
    bob = BoshClient(server.bosh_url, wait=5)
    bob.login("bob", resource="b")
    bob.presence()
    alice.recv_presence(sender="bob@localhost/b")
    bob.close()
    assert bob.terminated.get("type") == "terminate"
    alice.recv_presence(sender="bob@localhost/b", type_="unavailable")
    alice.close()


def test_cors_preflight_and_headers_on_every_response(server):
    pre = requests.options(server.bosh_url, headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "content-type"}, timeout=5)
    assert pre.status_code == 200
    assert pre.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "content-type" in pre.headers["Access-Control-Allow-Headers"].lower()
    err = post(server, "garbage", headers={"Origin": "http://app.example"})
    assert err.headers["Access-Control-Allow-Origin"] == "*"  # errors too, or the browser hides them


def test_cors_allowlist_echoes_only_allowed_origins(make_server):
    server = make_server(cors_allowed_origins=["http://good.example"])
    good = requests.options(server.bosh_url, headers={"Origin": "http://good.example"}, timeout=5)
    assert good.headers["Access-Control-Allow-Origin"] == "http://good.example"
    bad = requests.options(server.bosh_url, headers={"Origin": "http://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in bad.headers


def test_get_shows_a_human_page(server):
    page = requests.get(server.bosh_url, timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "BOSH" in page.text


def test_stanzas_without_namespace_in_the_body_mean_jabber_client(server):
    alice = BoshClient(server.bosh_url, wait=5)
    alice.login("alice", resource="nons")
    iq_id = "nons1"
    alice.send_xml(f"<iq type='get' id='{iq_id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
    reply = alice.recv(match=lambda e: e.get("id") == iq_id)
    assert reply.tag == q(NS_CLIENT, "iq") and reply.get("type") == "result"
    alice.close()


@pytest.mark.parametrize("value", ["\u00b2", "\u0661", "-1", "1e3"])
def test_non_ascii_or_signed_integers_are_bad_request_not_http_500(server, bystander, value):
    # '\u00b2'.isdigit() is True but int() refuses it; int('\u0661') is 1 (issue 10 point 16).
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='{value}' to='localhost'/>")) == "bad-request"
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='7' to='localhost' hold='{value}'/>")) == "bad-request"
    created = ET.fromstring(post(server, f"<body xmlns='{NS_BOSH}' to='localhost' rid='300' wait='5' hold='1'/>").content)
    sid = created.get("sid")
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='301' sid='{sid}' ack='{value}'/>")) == "bad-request"
    # The session is over: its next request gets the terminal body again (or item-not-found later).
    assert terminate_condition(post(server, f"<body xmlns='{NS_BOSH}' rid='302' sid='{sid}'/>")) in ("bad-request", "item-not-found")
    assert pinged_ok(bystander)


def test_a_body_of_10000_pings_is_answered_and_the_session_lives_on(make_server):
    server = make_server(bosh_max_wait=5, c2s_stanza_rate=0)  # unshaped: this is about the BOSH queue
    bystander = BoshClient(server.bosh_url, wait=5)
    bystander.login("dave", resource="bystander")
    client = BoshClient(server.bosh_url, wait=5)
    client.login("alice", resource="pinger")
    client.send_xml(*(f"<iq type='get' id='p{i}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>" for i in range(10_000)))
    answered = set()
    while len(answered) < 10_000:
        answered.add(client.recv(20, lambda e: (e.get("id") or "").startswith("p")).get("id"))
    assert client.terminated is None and pinged_ok(client)
    assert pinged_ok(bystander)
    client.close()
    bystander.close()


def test_unauthenticated_bosh_sessions_per_address_are_capped(make_server):
    server = make_server(bosh_max_unauthenticated_per_address=5, bosh_unauthenticated_limit_loopback=True)
    created = [ET.fromstring(post(server, f"<body xmlns='{NS_BOSH}' to='localhost' rid='{9000 + i}' wait='5' hold='1'/>").content)
               for i in range(5)]
    assert all(body.get("sid") for body in created)
    refused = post(server, f"<body xmlns='{NS_BOSH}' to='localhost' rid='9100' wait='5' hold='1'/>")
    assert terminate_condition(refused) == "policy-violation"
    assert "5 unauthenticated sessions from 127.0.0.1" in server.log()
    # Logging in frees a place: a normal login from the same address still works.
    sid = created[0].get("sid")
    auth = f"<body xmlns='{NS_BOSH}' rid='9001' sid='{sid}'><auth xmlns='{NS_SASL}' mechanism='PLAIN'>AGFsaWNlAHBhc3N3b3Jk</auth></body>"
    assert b"success" in post(server, auth).content
    client = BoshClient(server.bosh_url, wait=5)
    assert client.login("bob", resource="cap") == "bob@localhost/cap"
    client.close()

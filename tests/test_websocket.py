"""RFC 7395 (XMPP over WebSocket) end to end against the real server subprocess.

Every bad input must cost only the connection that sent it: a second client,
already logged in, must still be served afterwards (``bystander``).
"""

import base64
import os
import socket
import time
import xml.etree.ElementTree as ET

import pytest
import requests
import websocket

from harness import NS_BIND, NS_CLIENT, NS_FRAMING, NS_SASL, NS_STREAM, WsClient, q

NS_STREAMS_ERR = "urn:ietf:params:xml:ns:xmpp-streams"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
OPEN = q(NS_FRAMING, "open")
CLOSE = q(NS_FRAMING, "close")
FEATURES = q(NS_STREAM, "features")


# -- helpers -------------------------------------------------------------------------------

def pinged_ok(client) -> bool:
    reply = client.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    return reply.get("type") == "result"


def until_closed(client, timeout: float = 10.0) -> list[ET.Element]:
    """Everything the client received, in order, up to and including the socket closing."""
    got = list(client.seen)
    client.seen.clear()
    deadline = time.monotonic() + timeout
    while not got or got[-1].tag != "socket-closed":
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"socket not closed; got {[e.tag for e in got]}"
        got.append(client.inbox.get(timeout=remaining))
    return got


def assert_stream_error(client, condition: str, close_codes=(1000,)) -> ET.Element:
    """RFC 7395 §3.5: <stream:error/>, then <close/>, then the WebSocket close frame."""
    got = until_closed(client)
    tags = [e.tag for e in got]
    assert tags[-3:] == [q(NS_STREAM, "error"), CLOSE, "socket-closed"], tags
    error = got[-3]
    conditions = [e.tag for e in error if e.tag != q(NS_STREAMS_ERR, "text")]
    assert conditions == [q(NS_STREAMS_ERR, condition)], ET.tostring(error)
    # each message is a standalone document: the stream prefix is declared in it
    raw_error = next(r for r in client.raw if "error" in r and "stream" in r)
    assert raw_error.startswith("<stream:error") and 'xmlns:stream="http://etherx.jabber.org/streams"' in raw_error
    assert client.close_status in close_codes, client.close_status
    return error


def ws_open(server, **kwargs) -> WsClient:
    return WsClient(server.ws_url, **kwargs)


def login(server, user, resource="test", mechanism="SCRAM-SHA-1", presence=False) -> WsClient:
    client = ws_open(server)
    client.login(user, mechanism=mechanism, resource=resource)
    if presence:
        client.presence()
    return client


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
def bystander(server, clients):
    """A logged-in WebSocket client that no other connection's errors may disturb."""
    client = login(server, "dave", resource="bystander")
    clients.append(client)
    assert pinged_ok(client)
    return client


def raw_http(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """Send one HTTP request on a raw socket; return (status, headers, body read to EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


def upgrade_request(port: int, protocol: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /xmpp-websocket HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- handshake -----------------------------------------------------------------------------

@pytest.mark.parametrize("protocols", [[], ["chat"], ["xmpp-old", "chat"]])
def test_handshake_without_xmpp_subprotocol_is_501(server, protocols):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(server.ws_url, subprotocols=protocols, timeout=10)
    assert info.value.status_code == 501


def test_handshake_without_subprotocol_raw_is_501_with_an_explanation(server):
    status, headers, body = raw_http(server.port, upgrade_request(server.port, None))
    assert status == 501
    assert "upgrade" not in headers
    assert b"xmpp" in body and b"subprotocol" in body


def test_handshake_echoes_the_xmpp_subprotocol(server):
    ws = websocket.create_connection(server.ws_url, subprotocols=["xmpp"], timeout=10)
    try:
        assert ws.getstatus() == 101
        assert ws.getheaders()["sec-websocket-protocol"] == "xmpp"
        assert ws.subprotocol == "xmpp"
    finally:
        ws.close()
    status, headers, _ = raw_http_upgrade_status(server.port, "chat, xmpp")
    assert status == 101 and headers["sec-websocket-protocol"] == "xmpp"


def raw_http_upgrade_status(port: int, protocol: str) -> tuple[int, dict, bytes]:
    """The 101 response head only (the connection stays open, so do not read to EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(upgrade_request(port, protocol))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers, b""


def test_plain_get_without_upgrade_is_426_with_a_text_body(server):
    reply = requests.get(server.ws_url.replace("ws://", "http://"), timeout=10)
    assert reply.status_code == 426
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.headers.get("Upgrade", "").lower() == "websocket"
    assert "WebSocket" in reply.text and "xmpp" in reply.text


# -- stream opening, features, authentication -----------------------------------------------

def test_server_open_and_features(server, clients):
    client = ws_open(server)
    clients.append(client)
    opened = client.recv(match=lambda e: e.tag == OPEN)
    assert opened.get("version") == "1.0"
    assert opened.get("from") == "localhost"
    assert opened.get("id")
    assert opened.get(XML_LANG) == "en"
    # the raw text carries the framing namespace as a default xmlns (Strophe checks it)
    assert client.raw[0].startswith("<open ") and f'xmlns="{NS_FRAMING}"' in client.raw[0]
    feats = client.wait_features()
    assert client.mechanisms() == ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]  # PLAIN: loopback
    assert feats.find(q(NS_BIND, "bind")) is None
    assert client.raw[1].startswith("<stream:features") and "xmlns:stream=" in client.raw[1]
    assert all("ns0:" not in r for r in client.raw)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
def test_login_with_each_mechanism(server, clients, mechanism):
    client = ws_open(server)
    clients.append(client)
    jid = client.login("alice", mechanism=mechanism, resource="mech")
    assert jid == "alice@localhost/mech"
    assert pinged_ok(client)


def test_wrong_password_is_a_sasl_failure_and_the_socket_stays(server, clients):
    client = ws_open(server)
    clients.append(client)
    client.wait_features()
    reply = client.authenticate("alice", "wrong", "SCRAM-SHA-1")
    assert reply.tag == q(NS_SASL, "failure") and reply.find(q(NS_SASL, "not-authorized")) is not None
    assert client.authenticate("alice", "password", "SCRAM-SHA-1").tag == q(NS_SASL, "success")


def test_restart_gives_bind_features_and_a_new_stream_id(server, clients):
    client = ws_open(server)
    clients.append(client)
    first = client.recv(match=lambda e: e.tag == OPEN)
    client.wait_features()
    assert client.authenticate("bob", "password", "SCRAM-SHA-256").tag == q(NS_SASL, "success")
    client.restart()
    second = client.recv(match=lambda e: e.tag == OPEN)
    feats = client.wait_features()
    assert second.get("id") and second.get("id") != first.get("id")
    assert second.get("from") == "localhost" and second.get("version") == "1.0"
    assert feats.find(q(NS_BIND, "bind")) is not None
    assert feats.find(q(NS_SASL, "mechanisms")) is None
    assert feats.find(q("urn:xmpp:features:rosterver", "ver")) is not None
    assert client.bind("after-restart") == "bob@localhost/after-restart"


def test_bind_requested_and_generated_resources(server, clients):
    named = login(server, "carol", resource="Kitchen Tablet")
    clients.append(named)
    assert named.jid == "carol@localhost/Kitchen Tablet"
    generated = ws_open(server)
    clients.append(generated)
    jid = generated.login("carol", resource=None)
    assert jid.startswith("carol@localhost/") and jid != named.jid and len(jid) > len("carol@localhost/")


def test_duplicate_resource_from_a_second_socket_gets_another_and_both_stay(server, clients):
    first = login(server, "alice", resource="web")
    second = login(server, "alice", resource="web")
    clients.extend([first, second])
    assert first.jid == "alice@localhost/web"
    assert second.jid != first.jid and second.jid.startswith("alice@localhost/web")
    assert pinged_ok(first) and pinged_ok(second)
    # each socket receives what is addressed to its own full JID
    sender = login(server, "bob", resource="sender")
    clients.append(sender)
    sender.message(first.jid, "to first")
    sender.message(second.jid, "to second")
    assert first.recv_message().findtext(q(NS_CLIENT, "body")) == "to first"
    assert second.recv_message().findtext(q(NS_CLIENT, "body")) == "to second"
    first.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "message"), after=[sender])


def test_messages_are_stamped_with_from(server, clients):
    alice = login(server, "alice", resource="a", presence=True)
    bob = login(server, "bob", resource="b", presence=True)
    clients.extend([alice, bob])
    alice.send_xml(f"<message xmlns='{NS_CLIENT}' to='bob@localhost/b' from='carol@localhost/x' type='chat'>"
                   "<body>forged?</body></message>")
    msg = bob.recv_message()
    assert msg.get("from") == "alice@localhost/a"


# -- closing ---------------------------------------------------------------------------------

def test_close_is_answered_with_close_and_status_1000(server, clients, bystander):
    client = login(server, "alice", resource="closing")
    clients.append(client)
    client.send_xml(f"<close xmlns='{NS_FRAMING}'/>")
    got = until_closed(client)
    assert [e.tag for e in got][-2:] == [CLOSE, "socket-closed"]
    assert client.close_status == 1000
    # the resource was released: the same resource can be bound again as is
    again = login(server, "alice", resource="closing")
    clients.append(again)
    assert again.jid == "alice@localhost/closing"
    assert pinged_ok(bystander)


def test_close_before_open_is_answered(server, clients):
    client = ws_open(server, open_stream=False)
    clients.append(client)
    client.send_xml(f"<close xmlns='{NS_FRAMING}'/>")
    got = until_closed(client)
    assert [e.tag for e in got] == [CLOSE, "socket-closed"]
    assert client.close_status == 1000


# -- bad input -------------------------------------------------------------------------------

def test_message_over_the_stanza_size_limit_is_policy_violation(make_server, clients):
    server = make_server(stanza_size_limit=4096)
    bystander = login(server, "dave", resource="bystander")
    clients.append(bystander)
    client = login(server, "alice", resource="big")
    clients.append(client)
    # over stanza_size_limit but within the frame cap (limit + 1024): refused by the parser
    client.message("bob@localhost", "x" * 4200)
    assert_stream_error(client, "policy-violation", close_codes=(1008,))
    assert pinged_ok(bystander)
    # a message just under the limit is fine
    ok = login(server, "alice", resource="small")
    clients.append(ok)
    ok.message("bob@localhost", "y" * 3800)
    assert pinged_ok(ok)


def test_frame_far_over_the_limit_is_refused_unread(make_server, clients):
    server = make_server(stanza_size_limit=4096)
    bystander = login(server, "dave", resource="bystander")
    clients.append(bystander)
    client = login(server, "alice", resource="huge")
    clients.append(client)
    client.message("bob@localhost", "z" * 200_000)
    assert_stream_error(client, "policy-violation", close_codes=(1008, 1009))
    assert pinged_ok(bystander)
    assert server.alive()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><body>unclosed</message>", id="mismatched"),
        pytest.param("<iq", id="truncated"),
        pytest.param("plain text", id="not-xml"),
        pytest.param(f"<message xmlns='{NS_CLIENT}'/><message xmlns='{NS_CLIENT}'/>", id="two-elements"),
        # issue 12: what could upset the shared feed parser (xmlio._FeedParser) of the server
        pytest.param(f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><body>unclosed", id="unclosed"),
        pytest.param(f"<message xmlns='{NS_CLIENT}'/><s>", id="element-then-unclosed-s"),
        pytest.param("<s>", id="unclosed-s"),
        pytest.param(f"<message xmlns='{NS_CLIENT}'/></w>", id="end-of-the-wrapper"),
        pytest.param(f"<message xmlns='{NS_CLIENT}'/>text", id="text-after"),
        pytest.param(f"text<message xmlns='{NS_CLIENT}'/>", id="text-before"),
        pytest.param(f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><body>x</body></message><s", id="cut-tag"),
    ],
)
def test_malformed_xml_is_not_well_formed(server, clients, bystander, payload):
    client = login(server, "alice", resource="malformed")
    clients.append(client)
    client.send_xml(payload)
    assert_stream_error(client, "not-well-formed")
    assert pinged_ok(bystander)


BOMB = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
    f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><body>&lol3;</body></message>"
)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(BOMB, id="entity-bomb"),
        pytest.param('<!DOCTYPE message [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                     f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><body>&x;</body></message>", id="external-entity"),
        pytest.param(f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><!-- hi --><body>x</body></message>",
                     id="comment"),
        pytest.param(f"<?xml-stylesheet href='x'?><message xmlns='{NS_CLIENT}' to='bob@localhost'/>", id="pi"),
    ],
)
def test_restricted_xml(server, clients, bystander, payload):
    client = login(server, "alice", resource="restricted")
    clients.append(client)
    client.send_xml(payload)
    assert_stream_error(client, "restricted-xml")
    assert pinged_ok(bystander)


def test_comment_before_authentication_is_restricted_xml(server, clients, bystander):
    client = ws_open(server)
    clients.append(client)
    client.wait_features()
    client.send_xml("<!-- probing -->")
    assert_stream_error(client, "restricted-xml")
    assert pinged_ok(bystander)


def test_open_to_another_host_is_host_unknown(server, clients, bystander):
    client = ws_open(server, open_stream=False)
    clients.append(client)
    client.open("other.example")
    error = assert_stream_error(client, "host-unknown")
    # RFC 6120 §4.9.1.2: an error triggered by the stream header still comes after an <open/>
    opened = client.raw[0]
    assert opened.startswith("<open ") and 'from="localhost"' in opened and 'version="1.0"' in opened, client.raw
    assert "error" in client.raw[1] and len(error)
    assert pinged_ok(bystander)


def test_stanza_before_auth_is_not_authorized(server, clients, bystander):
    client = ws_open(server)
    clients.append(client)
    client.wait_features()
    client.send_xml(f"<message xmlns='{NS_CLIENT}' to='dave@localhost/bystander'><body>sneaky</body></message>")
    assert_stream_error(client, "not-authorized")
    bystander.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "message"))  # the sender's stream is over
    assert pinged_ok(bystander)


def test_stanza_before_open_is_a_stream_error(server, clients, bystander):
    client = ws_open(server, open_stream=False)
    clients.append(client)
    client.send_xml(f"<iq xmlns='{NS_CLIENT}' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>")
    got = until_closed(client)
    assert [e.tag for e in got] == [OPEN, q(NS_STREAM, "error"), CLOSE, "socket-closed"]
    assert got[1][0].tag == q(NS_STREAMS_ERR, "not-well-formed")
    assert got[0].get("id") and got[0].get("version") == "1.0"
    assert pinged_ok(bystander)


def test_binary_frames_are_ignored(server, clients, bystander):
    client = login(server, "alice", resource="binary")
    clients.append(client)
    client.ws.send_binary(f"<iq xmlns='{NS_CLIENT}' type='get' id='bin'><ping xmlns='urn:xmpp:ping'/></iq>".encode())
    client.ws.send_binary(b"\x00\xff\x00 not xml at all")
    client.expect_nothing_queued(lambda e: e.get("id") == "bin" or e.tag == "socket-closed")
    assert pinged_ok(client)
    assert pinged_ok(bystander)


# -- vanishing clients, keepalives ------------------------------------------------------------

def test_vanished_client_is_announced_unavailable_and_the_server_keeps_serving(server, clients):
    bob = login(server, "bob", resource="watcher", presence=True)
    clients.append(bob)
    alice = login(server, "alice", resource="vanishing", presence=True)
    clients.append(alice)
    bob.recv_presence(sender="alice@localhost/vanishing")
    alice.drop()
    gone = bob.recv_presence(timeout=10, sender="alice@localhost/vanishing", type_="unavailable")
    assert gone.get("type") == "unavailable"
    # the server still serves a new login, and the dropped resource is free again
    again = login(server, "alice", resource="vanishing", presence=True)
    clients.append(again)
    assert again.jid == "alice@localhost/vanishing"
    assert bob.recv_presence(sender="alice@localhost/vanishing").get("type") is None
    assert pinged_ok(again) and pinged_ok(bob)


def test_ping_frames_are_sent_at_the_configured_interval(make_server):
    server = make_server(websocket_ping_interval=0.3)
    started = time.monotonic()
    ws = websocket.create_connection(server.ws_url, subprotocols=["xmpp"], timeout=5)
    try:
        ws.send(f"<open xmlns='{NS_FRAMING}' to='localhost' version='1.0'/>")
        pings = 0
        texts = 0
        while pings < 3:  # the socket timeout (5 s) fails the test if they stop coming
            opcode, _ = ws.recv_data(control_frame=True)  # websocket-client answers with a pong
            if opcode == websocket.ABNF.OPCODE_PING:
                pings += 1
            elif opcode == websocket.ABNF.OPCODE_TEXT:
                texts += 1
        # The server sent the third ping 3 intervals after the connection at the earliest
        # (it can only be late, and so can we): not more often than configured.
        assert time.monotonic() - started >= 3 * 0.3 - 0.05
        assert texts == 2  # <open/> and <stream:features/>
        # the stream is still usable after answering pings
        ws.send(f"<close xmlns='{NS_FRAMING}'/>")
        opcode, data = ws.recv_data(control_frame=True)
        while opcode == websocket.ABNF.OPCODE_PING:
            opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_TEXT and b"close" in data
    finally:
        ws.close()


def test_no_ping_frames_when_disabled(make_server):
    server = make_server(websocket_ping_interval=0)
    ws = websocket.create_connection(server.ws_url, subprotocols=["xmpp"], timeout=5)
    try:
        ws.send(f"<open xmlns='{NS_FRAMING}' to='localhost' version='1.0'/>")
        assert ws.recv_data(control_frame=True)[0] == websocket.ABNF.OPCODE_TEXT
        assert ws.recv_data(control_frame=True)[0] == websocket.ABNF.OPCODE_TEXT
        ws.settimeout(0.5)  # more than the 0.3 s interval the ping test sees pings at
        with pytest.raises(websocket.WebSocketTimeoutException):
            ws.recv_data(control_frame=True)
    finally:
        ws.close()

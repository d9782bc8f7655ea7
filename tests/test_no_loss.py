"""Nothing the server accepted is lost (issue 10 points 1–3, 5): real servers, killed and restarted.

Each test counts message ids: a message the server accepted must arrive
exactly once (at the recipient before the crash, or from offline storage
after the restart), or be bounced to its sender with an error.  ``kill -9``
is ``ServerProcess.stop(signal.SIGKILL)``; the restart reuses the same
data_dir.  A message counts as accepted once a later ping from the same
sender was answered (RFC 6120 §10.1: a session's stanzas are processed in
order).
"""

import base64
import json
import signal
import socket
import xml.etree.ElementTree as ET

import gevent
import gevent.event
import pytest
import requests
import websocket

from boshroster.transports.websocket import WebSocketStream
from harness import NS_BOSH, NS_CLIENT, NS_ROSTER, NS_STREAM, BoshClient, WsClient, q, wait_for

PING = "<iq xmlns='jabber:client' type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"


def send_messages(client, to: str, ids, body=lambda i: f"message {i}") -> None:
    """Send one message per id, then wait until the server has processed them all."""
    for i in ids:
        client.send_xml(f"<message xmlns='{NS_CLIENT}' to='{to}' type='chat' id='{i}'><body>{body(i)}</body></message>")
    assert client.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost", timeout=60).get("type") == "result"


def collect(client, want: int, timeout: float = 30.0, quiet: float = 1.0) -> list[str]:
    """Ids of the messages with a body that arrive: up to ``timeout`` for the first, then
    until ``want`` or ``quiet`` seconds of nothing."""
    got = []
    deadline = gevent.get_hub().loop.now() + timeout
    while len(got) < want:
        wait = quiet if got else max(0.0, deadline - gevent.get_hub().loop.now())
        try:
            el = client.recv_message(timeout=wait)
        except TimeoutError:
            break
        got.append(el.get("id"))
    return got


def logged_in(kind: str, server, user: str, resource: str, presence: bool = True):
    client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
    client.login(user, resource=resource)
    if presence:
        client.presence()
    return client


def exactly_once(got: list[str], expected: list[str]) -> None:
    missing = sorted(set(expected) - set(got))
    duplicated = sorted({i for i in got if got.count(i) > 1})
    assert not missing and not duplicated and len(got) == len(expected), (
        f"{len(missing)} missing (e.g. {missing[:5]}), {len(duplicated)} duplicated (e.g. {duplicated[:5]})")


# -- point 1: stored offline, kill -9 ---------------------------------------------------------

def test_kill9_with_400_stored_offline_messages_each_is_delivered_exactly_once(make_server):
    server = make_server(bosh_max_wait=5)
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    ids = [f"k{i}" for i in range(400)]
    send_messages(alice, "bob@localhost", ids)
    server.stop(signal.SIGKILL)
    server.start()
    bob = logged_in("bosh", server, "bob", "b")
    got = collect(bob, 400)
    exactly_once(got, ids)
    gevent.sleep(0.5)  # bob's next request acknowledges the last response
    bob.close()
    again = logged_in("websocket", server, "bob", "again")
    again.expect_nothing(1.0, lambda e: e.tag == q(NS_CLIENT, "message"))
    again.close()


# -- point 3: in a BOSH response the client never got ------------------------------------------

class SyncBosh:
    """A BOSH client without a polling loop: each request it makes is answered at once."""

    def __init__(self, server, user: str, resource: str):
        self.server = server
        self.rid = 424242
        body = self.post(f"<body xmlns='{NS_BOSH}' to='localhost' rid='{self.rid}' wait='5' hold='1'/>")
        self.sid = body.get("sid")
        token = base64.b64encode(f"\0{user}\0password".encode()).decode()
        assert b"success" in ET.tostring(self.next(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"))
        assert b"bind" in ET.tostring(self.next("", " xmpp:restart='true' xmlns:xmpp='urn:xmpp:xbosh'"))
        reply = self.next(f"<iq xmlns='{NS_CLIENT}' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                          f"<resource>{resource}</resource></bind></iq>")
        assert b"result" in ET.tostring(reply)

    def post(self, xml: str) -> ET.Element:
        return ET.fromstring(requests.post(self.server.bosh_url, data=xml.encode(), timeout=15).content)

    def next(self, inner: str, extra: str = "") -> ET.Element:
        self.rid += 1
        return self.post(f"<body xmlns='{NS_BOSH}' rid='{self.rid}' sid='{self.sid}'{extra}>{inner}</body>")

    def send_and_vanish(self, inner: str) -> None:
        """POST one request and close the connection without reading the response."""
        self.rid += 1
        data = f"<body xmlns='{NS_BOSH}' rid='{self.rid}' sid='{self.sid}'>{inner}</body>".encode()
        with socket.create_connection(("127.0.0.1", self.server.port)) as sock:
            sock.sendall(b"POST /http-bind HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            sock.shutdown(socket.SHUT_WR)


def test_kill9_after_offline_messages_went_into_a_response_the_client_never_got(make_server):
    server = make_server(bosh_max_wait=5)
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    ids = [f"u{i}" for i in range(50)]
    send_messages(alice, "bob@localhost", ids)
    bob = SyncBosh(server, "bob", "lost")
    bob.send_and_vanish(f"<presence xmlns='{NS_CLIENT}'/>")  # the offline messages go into this response
    gevent.sleep(1.0)
    server.stop(signal.SIGKILL)
    server.start()
    again = logged_in("bosh", server, "bob", "b")
    exactly_once(collect(again, 50), ids)


def test_kill9_after_an_acknowledged_bosh_delivery_delivers_nothing_again(make_server):
    server = make_server(bosh_max_wait=5)
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    ids = [f"d{i}" for i in range(50)]
    send_messages(alice, "bob@localhost", ids)
    bob = logged_in("bosh", server, "bob", "b")
    exactly_once(collect(bob, 50), ids)
    gevent.sleep(1.0)  # the harness has parked its next request: the response is acknowledged
    server.stop(signal.SIGKILL)
    server.start()
    again = logged_in("bosh", server, "bob", "c")
    again.expect_nothing(1.5, lambda e: e.tag == q(NS_CLIENT, "message"))


def test_bosh_session_that_vanishes_with_offline_messages_unacknowledged_keeps_them(make_server):
    server = make_server(bosh_max_wait=1, bosh_max_inactivity=2)
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    ids = [f"v{i}" for i in range(30)]
    send_messages(alice, "bob@localhost", ids)
    bob = SyncBosh(server, "bob", "gone")
    bob.send_and_vanish(f"<presence xmlns='{NS_CLIENT}'/>")
    gevent.sleep(4)  # inactivity: the session ends without the response being acknowledged
    again = logged_in("bosh", server, "bob", "b")
    exactly_once(collect(again, 30), ids)


# -- point 2: being delivered over WebSocket to a slow reader ----------------------------------

@pytest.mark.xfail(not getattr(WebSocketStream, "tracks_delivery", False), strict=True,
                   reason="needs the WebSocket transport to report delivery (ws branch): until then "
                          "a row counts as delivered when handed to the WebSocket queue")
def test_kill9_while_offline_messages_stream_to_a_slow_websocket_reader(make_server):
    server = make_server(bosh_max_wait=5)
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    ids = [f"w{i}" for i in range(300)]
    send_messages(alice, "bob@localhost", ids, body=lambda i: i + " " + "x" * 100_000)
    bob = WsClient(server.ws_url)
    bob.login("bob", resource="slow")
    bob._reader.kill()  # stop reading: the server's writes back up (30 MB do not fit in socket buffers)
    bob.presence()
    gevent.sleep(2.0)
    server.stop(signal.SIGKILL)
    # What the dead server had written still arrives; a truncated last frame does not count.
    got = []
    bob.ws.settimeout(5)
    while True:
        try:
            opcode, data = bob.ws.recv_data(control_frame=True)
        except Exception:  # noqa: BLE001 - the connection ends (EOF or truncated frame)
            break
        if opcode == websocket.ABNF.OPCODE_TEXT and data.startswith(b"<message"):
            got.append(ET.fromstring(data).get("id"))
    assert len(got) < 300, len(got)  # the crash really was mid-delivery
    print(f"{len(got)} of 300 arrived before the crash")
    server.start()
    again = logged_in("websocket", server, "bob", "again")
    after = collect(again, 300, timeout=60, quiet=2.0)
    missing = set(ids) - set(got) - set(after)
    assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:5]}"
    # A duplicate is only acceptable for a message the client really had before the crash: one
    # the kernel took before the dead server got to hear of it, so at most the rows in flight
    # (offline.py's window: 512 KiB, here 6 rows of 100 KB).
    again_seen = [i for i in after if i in got]
    assert len(after) == len(set(after)) and len(again_seen) <= 6, again_seen
    print(f"after the restart: {len(after)} delivered, {len(again_seen)} of them already received before the crash")


# -- point 1: SIGTERM under load ---------------------------------------------------------------

def test_sigterm_under_load_tells_everyone_and_loses_nothing_accepted(make_server):
    # no shaping: as much load as one sender makes; a small offline queue so that bounces are counted too
    server = make_server(bosh_max_wait=5, c2s_stanza_rate=0, offline_max_per_user=100)
    bob = logged_in("bosh", server, "bob", "b")
    carol = logged_in("websocket", server, "carol", "c")
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    accepted = {"bob": [], "carol": [], "dave": []}
    stop = gevent.event.Event()

    def flood():
        n = 0
        while not stop.is_set():
            batch = {user: [f"{user}{n + i}" for i in range(10)] for user in accepted}
            n += 10
            try:
                for user, ids in batch.items():
                    for i in ids:
                        alice.send_xml(f"<message xmlns='{NS_CLIENT}' to='{user}@localhost' type='chat' id='{i}'>"
                                       f"<body>{i}</body></message>")
                if alice.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost", timeout=3).get("type") != "result":
                    return
            except Exception:  # noqa: BLE001 - the server went away: this batch is not known accepted
                return
            for user, ids in batch.items():
                accepted[user].extend(ids)

    flooder = gevent.spawn(flood)
    gevent.sleep(1.5)
    server.stop()  # SIGTERM
    stop.set()
    flooder.join(10)
    assert sum(map(len, accepted.values())) > 100  # it was under load
    shutdown = bob.recv(match=lambda e: e.get("type") == "terminate", timeout=10)
    assert shutdown.get("condition") == "system-shutdown"
    error = carol.recv(match=lambda e: e.tag == q(NS_STREAM, "error"), timeout=10)
    assert error.find("{urn:ietf:params:xml:ns:xmpp-streams}system-shutdown") is not None
    live = {"bob": collect(bob, 10**6, timeout=0.5, quiet=0.5), "carol": collect(carol, 10**6, timeout=0.5, quiet=0.5),
            "dave": []}
    # A fast machine fills dave's offline queue (offline_max_per_user): the rest is bounced to
    # alice with an error (service-unavailable, "offline storage full"), which accounts for them.
    bounces = [el for el in alice.seen if el.tag == q(NS_CLIENT, "message") and el.get("type") == "error"]
    assert all(el.find(f"{q(NS_CLIENT, 'error')}/{{urn:ietf:params:xml:ns:xmpp-stanzas}}service-unavailable") is not None
               for el in bounces), [ET.tostring(el)[:300] for el in bounces[:3]]
    bounced = {el.get("id") for el in bounces}
    server.start()
    report = {}
    for user, resource in (("bob", "b2"), ("carol", "c2"), ("dave", "d")):
        client = logged_in("websocket", server, user, resource)
        stored = collect(client, 10**6, quiet=1.5, timeout=10)
        got = live[user] + stored
        missing = set(accepted[user]) - set(got) - bounced
        assert not missing, f"{user}: {len(missing)} accepted messages lost, e.g. {sorted(missing)[:5]}"
        report[user] = (len(accepted[user]), len(got) - len(set(got)), len(bounced & set(accepted[user])))
        client.close()
    print("accepted, duplicated, bounced per recipient:", report)


# -- point 5: overflow is the sender's problem -------------------------------------------------

def test_5001_messages_back_to_back_to_an_online_bosh_user_are_all_accounted_for(make_server):
    server = make_server(bosh_max_wait=5, c2s_stanza_rate=0)  # unshaped: the sender really floods
    bob = logged_in("bosh", server, "bob", "b")
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    ids = [f"f{i}" for i in range(5001)]
    send_messages(alice, "bob@localhost/b", ids)
    delivered = collect(bob, 5001, timeout=60)
    bounced = []
    while True:
        try:
            el = alice.recv(0.5, lambda e: e.tag == q(NS_CLIENT, "message") and e.get("type") == "error")
        except TimeoutError:
            break
        assert el.find(f"{q(NS_CLIENT, 'error')}/{{urn:ietf:params:xml:ns:xmpp-stanzas}}resource-constraint") is not None
        bounced.append(el.get("id"))
    exactly_once(delivered + bounced, ids)
    print(f"{len(delivered)} delivered, {len(bounced)} bounced to the sender")
    assert bob.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost").get("type") == "result"  # the victim lives on
    assert bob.terminated is None


def test_refresh_renaming_6000_contacts_reaches_a_bosh_user(make_server, backend):
    contacts = {f"c{i}@localhost": {"name": f"Contact {i}", "groups": ["Big"]} for i in range(6000)}
    backend.contacts["alice"] = contacts
    server = make_server(bosh_max_wait=5)
    alice = logged_in("bosh", server, "alice", "a", presence=False)
    roster = alice.get_roster(timeout=30)
    assert len(roster.find(q(NS_ROSTER, "query"))) == 6000
    backend.contacts["alice"] = {jid: {**item, "name": item["name"] + " (renamed)"} for jid, item in contacts.items()}
    reply = requests.post(server.base_url + "/roster_admin/refresh", data=json.dumps(["alice"]), timeout=60)
    assert reply.status_code == 200, reply.text
    pushes = 0
    while pushes < 6000:
        try:
            push = alice.recv(10, lambda e: e.tag == q(NS_CLIENT, "iq") and e.get("type") == "set")
        except TimeoutError:
            break
        item = push.find(f"{q(NS_ROSTER, 'query')}/{q(NS_ROSTER, 'item')}")
        assert item.get("name").endswith("(renamed)")
        pushes += 1
    assert pushes == 6000
    assert alice.terminated is None
    assert alice.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost").get("type") == "result"


# -- requeued after its session ended, every other resource congested -------------------------

def bounces_to(client, condition: str, quiet: float = 0.5) -> list[str]:
    """Ids of the error messages ``client`` got (or gets within ``quiet``), each with ``condition``."""
    while True:
        try:
            client.recv(quiet, lambda e: False)
        except TimeoutError:
            break
    errors = [el for el in client.seen if el.tag == q(NS_CLIENT, "message") and el.get("type") == "error"]
    wrong = [el for el in errors
             if el.find(f"{q(NS_CLIENT, 'error')}/{{urn:ietf:params:xml:ns:xmpp-stanzas}}{condition}") is None]
    assert not wrong, [ET.tostring(el)[:300] for el in wrong[:3]]
    return [el.get("id") for el in errors]


@pytest.mark.parametrize("offline_max", [1000, 12])
def test_requeued_messages_with_every_other_resource_congested_are_stored_or_bounced(make_server, offline_max):
    """bob/b1's BOSH session ends (terminate) with 20 messages queued; bob's other resource,
    bob/slow, is congested (it stopped polling: 20 KB wait for it): they go to offline storage, and what does
    not fit there (offline_max 12) is bounced to alice.  Before: all 20 dropped."""
    server = make_server(bosh_max_wait=1, bosh_high_water_bytes=20_000, offline_max_per_user=offline_max)
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    slow = SyncBosh(server, "bob", "slow")
    slow.next(f"<presence xmlns='{NS_CLIENT}'/>")  # available; then it never polls again
    send_messages(alice, "bob@localhost/slow", [f"s{i}" for i in range(10)], body=lambda i: "x" * 5000)
    congested = bounces_to(alice, "resource-constraint")
    assert congested, "bob/slow should be congested by now"
    # one WARNING for the burst, not one per bounced message
    assert server.log().count("bob@localhost/slow is not reading fast enough") == 1, len(congested)
    alice.seen.clear()
    b1 = SyncBosh(server, "bob", "b1")
    ids = [f"r{i}" for i in range(20)]
    send_messages(alice, "bob@localhost/b1", ids)
    assert not bounces_to(alice, "resource-constraint", quiet=0.2)  # b1 took them all
    b1.next("", " type='terminate'")  # they were queued for b1: given back to routing
    bounced = bounces_to(alice, "service-unavailable")
    assert len(bounced) == max(0, 20 - offline_max)
    again = logged_in("websocket", server, "bob", "again")
    stored = collect(again, 20)
    exactly_once(stored + bounced, ids)


def test_a_message_two_resources_got_is_not_requeued_to_the_survivor_when_one_ends(make_server):
    """RFC 6121 §8.5.2.1.1: a bare-JID message goes to every resource of the highest priority.
    When one of them ends with it undelivered, the other already has it: requeueing it there
    (or to offline storage) was a duplicate (found by scripts/soak: a BOSH client whose
    requests failed, reconnected, and its old session timed out later)."""
    server = make_server(bosh_max_wait=1)
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    live = logged_in("websocket", server, "bob", "live")
    gone = SyncBosh(server, "bob", "gone")
    gone.next(f"<presence xmlns='{NS_CLIENT}'/>")  # available; then it never polls again
    live.sync()
    ids = [f"t{i}" for i in range(20)]
    send_messages(alice, "bob@localhost", ids)
    gone.next("", " type='terminate'")  # the 20 were queued for it: given back to routing
    got = collect(live, 40, timeout=10, quiet=1.5)
    exactly_once(got, ids)
    live.close()
    again = logged_in("websocket", server, "bob", "again")
    again.expect_nothing(1.0, lambda e: e.tag == q(NS_CLIENT, "message"))  # and nothing went offline


# -- queued for a WebSocket connection that is cut off (no stream management) ------------------

def errors_to(client, quiet: float = 0.5) -> list[str]:
    """Ids of the error messages ``client`` got (or gets within ``quiet``), any condition."""
    while True:
        try:
            client.recv(quiet, lambda e: False)
        except TimeoutError:
            break
    return [el.get("id") for el in client.seen if el.tag == q(NS_CLIENT, "message") and el.get("type") == "error"]


def test_messages_queued_for_a_websocket_client_that_vanishes_are_requeued(make_server):
    """A client stops reading while 600 x 10 KB messages are sent to it (more than
    loopback's socket buffers take): its output queue
    fills (``websocket_max_queue_bytes``: above half of it the sender gets resource-constraint
    bounces), then the client goes away (its socket half-closed: EOF, no close frame) and the
    server gives up flushing (``websocket_flush_timeout``).  The client reads what the kernel
    had taken; the same user logs in again.  Every message the sender got no error for
    arrives exactly once: on the first connection, or from offline storage.  Before: the
    stanzas still in the output queue were dropped with it."""
    server = make_server(bosh_max_wait=5, websocket_max_queue_bytes=256 * 1024, websocket_flush_timeout=0.5)
    # a small receive buffer: the kernel cannot take the whole queue for bob
    bob = WsClient(server.ws_url, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 16384),))
    bob.login("bob", resource="slow")
    bob.presence()
    bob.sync()
    bob._reader.kill()  # idle between frames: bob stops reading, the server's writes back up
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    ids = [f"c{i}" for i in range(600)]
    send_messages(alice, "bob@localhost/slow", ids, body=lambda i: i + " " + "x" * 10_000)
    bob.ws.sock.shutdown(socket.SHUT_WR)  # gone: the server reads EOF
    wait_for(lambda: "session end bob@localhost/slow" in server.log(), 10, "bob's session to end")
    try:  # the flush gives up after websocket_flush_timeout + the close grace (2 s)
        wait_for(lambda: "never written: given back" in server.log(), 10, "what bob never got to be given back")
    except AssertionError:
        pass  # (before the fix nothing was given back, nor logged)
    first = []  # what the kernel had taken: the last frame may be cut in half
    bob.ws.settimeout(5)
    while True:
        try:
            opcode, data = bob.ws.recv_data(control_frame=True)
        except Exception:  # noqa: BLE001 - EOF, or a truncated frame
            break
        if opcode == websocket.ABNF.OPCODE_TEXT and data.startswith(b"<message"):
            first.append(ET.fromstring(data).get("id"))
    bounced = errors_to(alice)
    again = logged_in("websocket", server, "bob", "again")
    stored = collect(again, 600, timeout=30, quiet=2.0)
    print(f"\n{len(first)} on the first connection, {len(stored)} from offline storage, {len(bounced)} bounced")
    assert len(first) + len(bounced) < 600  # some really were queued when bob went away
    exactly_once(first + stored + bounced, ids)


def test_messages_dropped_when_a_websocket_reader_is_cut_off_are_requeued(make_server):
    """The same client that does not read, cut off by the output queue's cap (here
    ``websocket_max_queue``: 5 frames while the socket is backed up): the server drops what
    was queued and ends the stream with resource-constraint.  The client then reads what
    was written, up to the close frame, and logs in again: every message the sender got no
    error for arrives exactly once.  Before: what the overflow dropped was lost."""
    server = make_server(bosh_max_wait=5, websocket_max_queue=5)
    bob = WsClient(server.ws_url, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 16384),))
    bob.login("bob", resource="slow")
    bob.presence()
    bob.sync()
    bob._reader.kill()
    alice = logged_in("websocket", server, "alice", "a", presence=False)
    ids = [f"o{i}" for i in range(600)]
    send_messages(alice, "bob@localhost/slow", ids, body=lambda i: i + " " + "x" * 10_000)
    first, condition, code = [], None, None
    bob.ws.settimeout(15)
    while code is None:
        opcode, data = bob.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big")
        elif opcode == websocket.ABNF.OPCODE_TEXT:
            el = ET.fromstring(data)
            if el.tag == q(NS_CLIENT, "message"):
                first.append(el.get("id"))
            elif el.tag == q(NS_STREAM, "error"):
                condition = el[0].tag.split("}")[1]
    assert (condition, code) == ("resource-constraint", 1008)  # really cut off by the cap
    bounced = errors_to(alice)
    wait_for(lambda: "session end bob@localhost/slow" in server.log(), 10, "bob's session to end")
    again = logged_in("websocket", server, "bob", "again")
    stored = collect(again, 600, timeout=30, quiet=2.0)
    print(f"\n{len(first)} on the first connection, {len(stored)} from offline storage, {len(bounced)} bounced")
    assert len(first) + len(bounced) < 600
    exactly_once(first + stored + bounced, ids)
    assert "output queue full" in server.log()

"""XEP-0198 stream management, without sockets: the counters (wrap-around at 2^32),
acks both ways, hibernation and resumption with retransmission of exactly the
unacknowledged stanzas, and the errors the XEP names.

A real Core; clients are ClientSessions over an in-test transport of kind
``websocket`` (SM is offered to WebSocket streams only).  Hibernation timers
are injected: a test fires them instead of sleeping.
"""

import gevent
import pytest

from boshroster.xmpp import xmlio
from boshroster.xmpp.stream import ClientSession
from boshroster.xmpp.stream_management import NS_SM, AckTooHigh, SmState
from boshroster.xmpp.xmlio import NS_CLIENT, NS_STANZAS, NS_STREAM, NS_STREAMS_ERR
from test_session_core import DOMAIN, LOOPBACK, Client, backend, core, q  # noqa: F401  (fixtures)

WRAP = 1 << 32


# -- the counters ------------------------------------------------------------------------

def test_h_wraps_at_2_32_for_sent_and_acked():
    sm = SmState("id")
    sm.sent = sm.acked = WRAP - 2
    for n in range(4):
        sm.on_sent(xmlio.E(f"{{{NS_CLIENT}}}message", {"id": str(n)}), None)
    assert sm.sent == 2 and len(sm.queue) == 4
    acked = sm.on_ack(1)  # 2^32-2 -> 1 is three stanzas
    assert [s.get("id") for s, _ in acked] == ["0", "1", "2"]
    assert [s.get("id") for s in sm.unacked()] == ["3"]
    with pytest.raises(AckTooHigh):
        sm.on_ack(3)  # two more than the one unacknowledged
    assert sm.on_ack(1) == []  # a repeated ack acknowledges nothing new


def test_received_counter_wraps():
    sm = SmState(None)
    sm.handled_in = WRAP - 1
    sm.received()
    assert sm.handled_in == 0


# -- over the session core ----------------------------------------------------------------

class WsLikeTransport:
    kind = "websocket"
    tracks_delivery = False

    def __init__(self):
        self.out, self.errors, self.session = [], [], None

    def send(self, el, delivered=None):
        self.out.append(el)

    def stream_error(self, el):
        self.errors.append(el)


class WsClient(Client):
    def __init__(self, core):  # noqa: F811
        self.core = core
        self.transport = WsLikeTransport()
        self.session = ClientSession(core.stream_context, self.transport, LOOPBACK)
        self.transport.session = self.session

    def sm(self, xml: str):
        self.feed(xml.replace("<sm:", f"<").replace("/>", f" xmlns='{NS_SM}'/>", 1))


def sm_el(name, **attrs):
    attr = "".join(f" {k}='{v}'" for k, v in attrs.items())
    return f"<{name} xmlns='{NS_SM}'{attr}/>"


def ws_login(core, user, resume=None):  # noqa: F811
    client = WsClient(core)
    feats = client.session.open_stream(DOMAIN)
    assert client.plain(user).tag.endswith("success")
    feats = client.session.restart()
    assert feats.find(q(NS_SM, "sm")) is not None, "sm is advertised after authentication"
    if resume is not None:
        client.feed(sm_el("resume", previd=resume[0], h=resume[1]))
        return client
    assert client.bind("res").get("type") == "result"
    client.take()
    return client


@pytest.fixture
def timers(core):  # noqa: F811
    """Hibernation timers, fired by the test."""
    pending = []

    class Timer:
        def __init__(self, fn, args):
            self.fn, self.args, self.killed = fn, args, False

        def kill(self, block=False):
            self.killed = True

        def fire(self):
            if not self.killed:
                self.fn(*self.args)

    def spawn_later(delay, fn, *args):
        timer = Timer(fn, args)
        pending.append(timer)
        return timer

    core.stream_context.sm.spawn_later = spawn_later
    return pending


def enable(client, resume=True):
    client.feed(sm_el("enable", resume="true") if resume else sm_el("enable"))
    enabled = client.take_one()
    assert enabled.tag == q(NS_SM, "enabled")
    return enabled


def message(sender, to, body, id_):
    sender.feed(f"<message xmlns='{NS_CLIENT}' to='{to}' type='chat' id='{id_}'><body>{body}</body></message>")


def bodies(stanzas):
    return [s.findtext(q(NS_CLIENT, "body")) for s in stanzas if s.tag == q(NS_CLIENT, "message")]


def test_enable_then_acks_both_ways(core):  # noqa: F811
    alice, bob = ws_login(core, "alice"), ws_login(core, "bob")
    enabled = enable(alice)
    assert enabled.get("resume") == "true" and enabled.get("id") and enabled.get("max") == "600"
    for n in range(3):
        message(bob, "alice@localhost/res", f"m{n}", n)
    got = alice.take()
    assert bodies(got) == ["m0", "m1", "m2"]
    assert core.sessions.get("alice", "res").sm.sent == 3
    alice.feed(sm_el("a", h=2))
    assert [s.findtext(q(NS_CLIENT, "body")) for s in core.sessions.get("alice", "res").sm.unacked()] == ["m2"]
    alice.take()
    # the server answers <r/> with what it handled from the client (stanzas only, not nonzas)
    message(alice, "bob@localhost/res", "hi", "x")
    alice.feed(sm_el("r"))
    a = alice.take_one()
    assert a.tag == q(NS_SM, "a") and a.get("h") == "1"


def tags(elements):
    return ["r" if el.tag == q(NS_SM, "r") else el.findtext(q(NS_CLIENT, "body")) or el.tag for el in elements]


def test_the_server_asks_for_an_ack_at_once_one_request_at_a_time(core):  # noqa: F811
    """smacks_max_unacked_stanzas = 0 (Prosody's default): an <r/> as soon as a stanza is
    unacknowledged, never a second one while it is outstanding; the <a/> that leaves some
    unacknowledged brings the next <r/>, the one that leaves none does not."""
    alice, bob = ws_login(core, "alice"), ws_login(core, "bob")
    enable(alice, resume=False)
    for n in range(5):
        message(bob, "alice@localhost/res", f"m{n}", n)
    assert tags(alice.take()) == ["m0", "r", "m1", "m2", "m3", "m4"]
    alice.feed(sm_el("a", h=1))
    assert tags(alice.take()) == ["r"]  # four left: asked again
    alice.feed(sm_el("a", h=5))
    assert alice.take() == []
    message(bob, "alice@localhost/res", "m5", 5)
    assert tags(alice.take()) == ["m5", "r"]


def test_an_ack_below_the_previous_one_is_ignored_and_asks_nothing_more(core, caplog):  # noqa: F811
    """xmpp.js 0.13 resets its count after acking what came with <enabled/>: its h goes back
    (1, then 0).  That acknowledges nothing, ends nothing (one warning), and the server does
    not ask again until it sent something new: no <r/>/<a/> ping-pong with a lagging client."""
    alice, bob = ws_login(core, "alice"), ws_login(core, "bob")
    enable(alice, resume=False)
    message(bob, "alice@localhost/res", "m0", 0)
    message(bob, "alice@localhost/res", "m1", 1)
    assert tags(alice.take()) == ["m0", "r", "m1"]
    alice.feed(sm_el("a", h=1))
    assert tags(alice.take()) == ["r"]  # m1 came after the <r/>
    alice.feed(sm_el("a", h=0))  # the client's count went back
    assert not alice.session.ended and alice.errors == []
    assert alice.take() == []  # m1 is still unacknowledged, but nothing new was sent: no <r/>
    alice.feed(sm_el("a", h=0))
    assert alice.take() == []
    assert sum("below its previous ack" in r.getMessage() for r in caplog.records) == 1
    message(bob, "alice@localhost/res", "m2", 2)
    assert tags(alice.take()) == ["m2", "r"]
    alice.feed(sm_el("a", h=2))  # the lagging count: acknowledges m1 (oldest first)
    assert [el.findtext(q(NS_CLIENT, "body")) for el in alice.session.sm.unacked()] == ["m2"]
    assert alice.take() == []


def test_max_unacked_lets_more_go_before_asking(core):  # noqa: F811
    core.stream_context.sm.settings.max_unacked = 5
    alice, bob = ws_login(core, "alice"), ws_login(core, "bob")
    enable(alice, resume=False)
    for n in range(7):
        message(bob, "alice@localhost/res", f"m{n}", n)
    assert tags(alice.take()) == ["m0", "m1", "m2", "m3", "m4", "m5", "r", "m6"]
    alice.feed(sm_el("a", h=2))  # five left: not more than five
    assert alice.take() == []


def test_an_ack_of_more_than_was_sent_is_a_stream_error(core):  # noqa: F811
    alice = ws_login(core, "alice")
    enable(alice)
    alice.feed(sm_el("a", h=1))
    error = alice.errors[0]
    assert error.tag == q(NS_STREAM, "error") and error.find(q(NS_STREAMS_ERR, "undefined-condition")) is not None
    assert error.find(q(NS_SM, "handled-count-too-high")).get("send-count") == "0"
    assert alice.session.ended


@pytest.mark.parametrize("h", ["", "-1", "4294967296", "²", "x"])
def test_a_malformed_h_is_bad_format(core, h):  # noqa: F811
    alice = ws_login(core, "alice")
    enable(alice)
    alice.feed(sm_el("a", h=h))
    assert alice.errors[0].find(q(NS_STREAMS_ERR, "bad-format")) is not None


def test_enable_before_bind_or_twice_fails_with_unexpected_request(core):  # noqa: F811
    client = WsClient(core)
    client.session.open_stream(DOMAIN)
    client.plain("alice")
    client.session.restart()
    client.feed(sm_el("enable"))
    failed = client.take_one()
    assert failed.tag == q(NS_SM, "failed") and failed.find(q(NS_STANZAS, "unexpected-request")) is not None
    assert client.bind("res").get("type") == "result"
    enable(client)
    client.feed(sm_el("enable"))
    assert client.take_one().tag == q(NS_SM, "failed")
    assert not client.session.ended


def test_sm_is_not_offered_over_bosh(core):  # noqa: F811
    client = Client(core)  # a transport of another kind (BOSH-like)
    client.session.open_stream(DOMAIN)
    client.plain("alice")
    assert client.session.restart().find(q(NS_SM, "sm")) is None


def test_dropped_stream_hibernates_and_resumes_with_exactly_the_unacked(core, timers):  # noqa: F811
    alice, bob = ws_login(core, "alice"), ws_login(core, "bob")
    for c in (alice, bob):
        c.presence()
    alice.take(), bob.take()
    sm_id = enable(alice).get("id")
    message(bob, "alice@localhost", "before-1", 1)
    message(bob, "alice@localhost", "before-2", 2)
    assert bodies(alice.take()) == ["before-1", "before-2"]
    alice.feed(sm_el("a", h=1))  # the client had only the first
    alice.session.connection_lost("connection dropped")
    assert not alice.session.ended and len(timers) == 1
    message(bob, "alice@localhost", "during", 3)
    assert [p.get("type") for p in bob.take() if p.tag == q(NS_CLIENT, "presence")] == []  # never unavailable
    fresh = ws_login(core, "alice", resume=(sm_id, 1))
    got = fresh.take()
    assert got[0].tag == q(NS_SM, "resumed") and got[0].get("previd") == sm_id
    assert bodies(got[1:]) == ["before-2", "during"]  # exactly once each, in order
    assert got[-1].tag == q(NS_SM, "r")  # and the server asks at once what of it arrived
    assert core.sessions.get("alice", "res").transport is fresh.transport
    message(bob, "alice@localhost", "after", 4)
    assert bodies(fresh.take()) == ["after"]
    assert timers[0].killed
    # carbons, presence, the JID: the same session goes on
    assert core.sessions.get("alice", "res").presence is not None


def test_resume_with_an_unknown_id_fails_and_a_fresh_bind_works(core, timers):  # noqa: F811
    fresh = ws_login(core, "alice", resume=("nope", 0))
    failed = fresh.take_one()
    assert failed.tag == q(NS_SM, "failed") and failed.find(q(NS_STANZAS, "item-not-found")) is not None
    assert fresh.bind("res").get("type") == "result"


def test_resume_of_another_users_session_fails(core, timers):  # noqa: F811
    alice = ws_login(core, "alice")
    sm_id = enable(alice).get("id")
    alice.session.connection_lost("connection dropped")
    mallory = ws_login(core, "bob", resume=(sm_id, 0))
    assert mallory.take_one().find(q(NS_STANZAS, "item-not-found")) is not None
    assert not alice.session.ended  # still hibernating for alice


def test_hibernation_timeout_broadcasts_unavailable_and_stores_the_unacked(core, timers):  # noqa: F811
    alice, bob = ws_login(core, "alice"), ws_login(core, "bob")
    for c in (alice, bob):
        c.presence()
    alice.take(), bob.take()
    sm_id = enable(alice).get("id")
    message(bob, "alice@localhost", "unacked", 1)
    alice.session.connection_lost("connection dropped")
    message(bob, "alice@localhost", "while away", 2)
    timers[0].fire()
    assert alice.session.ended
    unavailable = [p for p in bob.take() if p.get("type") == "unavailable"]
    assert [p.get("from") for p in unavailable] == ["alice@localhost/res"]
    assert core.offline.count("alice") == 2  # nothing vanished
    fresh = ws_login(core, "alice", resume=(sm_id, 0))
    assert fresh.take_one().tag == q(NS_SM, "failed")  # expired


def test_resume_takes_over_a_connection_that_has_not_noticed_it_is_dead(core, timers):  # noqa: F811
    alice = ws_login(core, "alice")
    sm_id = enable(alice).get("id")
    fresh = ws_login(core, "alice", resume=(sm_id, 0))
    assert fresh.take()[0].tag == q(NS_SM, "resumed")
    assert alice.errors and alice.errors[0].find(q(NS_STREAMS_ERR, "conflict")) is not None
    assert core.sessions.get("alice", "res").transport is fresh.transport
    gevent.sleep(0)


def test_nothing_to_retransmit_no_ack_request(core, timers):  # noqa: F811
    alice, bob = ws_login(core, "alice"), ws_login(core, "bob")
    sm_id = enable(alice).get("id")
    message(bob, "alice@localhost/res", "seen", 1)
    alice.take()
    alice.feed(sm_el("a", h=1))
    alice.session.connection_lost("connection dropped")
    fresh = ws_login(core, "alice", resume=(sm_id, 1))
    assert tags(fresh.take()) == [q(NS_SM, "resumed")]


def expired(core, timers, user="alice", handled=2):
    """A resumable session of ``user`` that handled ``handled`` stanzas from its client,
    dropped and expired; returns its SM id."""
    client = ws_login(core, user)
    sm_id = enable(client).get("id")
    for n in range(handled):
        message(client, f"{user}@localhost/res", f"to myself {n}", n)
    client.session.connection_lost("connection dropped")
    timers[-1].fire()
    assert client.session.ended
    return sm_id


def failed_of(client):
    failed = [el for el in client.take() if el.tag == q(NS_SM, "failed")]
    assert len(failed) == 1 and failed[0].find(q(NS_STANZAS, "item-not-found")) is not None
    return failed[0]


def test_resume_after_expiry_says_how_many_stanzas_the_server_had(core, timers):  # noqa: F811
    """XEP-0198 §5: '<failed h/>' for an id that timed out, so the client resends only what
    the server never handled; once said, the id is forgotten; a fresh bind works."""
    sm_id = expired(core, timers, handled=2)
    late = ws_login(core, "alice", resume=(sm_id, 0))
    assert failed_of(late).get("h") == "2"
    assert late.bind("res").get("type") == "result"
    again = ws_login(core, "alice", resume=(sm_id, 0))
    assert failed_of(again).get("h") is None


def test_an_expired_id_tells_nothing_to_another_user(core, timers):  # noqa: F811
    sm_id = expired(core, timers, handled=3)
    mallory = ws_login(core, "bob", resume=(sm_id, 0))
    assert failed_of(mallory).get("h") is None
    alice = ws_login(core, "alice", resume=(sm_id, 0))  # still there for alice
    assert failed_of(alice).get("h") == "3"


def test_expired_ids_are_forgotten_after_an_hour(core, timers):  # noqa: F811
    from boshroster.xmpp.stream_management import _TOMBSTONE_LIFETIME

    sm = core.stream_context.sm
    now = [1000.0]
    sm.clock = lambda: now[0]
    sm_id = expired(core, timers)
    now[0] += sm.settings.hibernation_time * 2  # well after the expiry, a backed-off client
    assert failed_of(ws_login(core, "alice", resume=(sm_id, 0))).get("h") == "2"
    sm_id = expired(core, timers)
    now[0] += _TOMBSTONE_LIFETIME + 1
    late = ws_login(core, "alice", resume=(sm_id, 0))
    assert failed_of(late).get("h") is None
    # and the next expiry purges the stale entry
    expired(core, timers, user="bob")
    assert sm_id not in sm._tombstones


def test_expired_ids_kept_per_user_are_bounded(core, timers):  # noqa: F811
    sm = core.stream_context.sm
    sm.settings.max_old_sessions = 2
    ids = [expired(core, timers, handled=n) for n in range(3)]
    assert [key for key in sm._tombstones] == ids[1:]  # the oldest went
    assert failed_of(ws_login(core, "alice", resume=(ids[0], 0))).get("h") is None
    assert failed_of(ws_login(core, "alice", resume=(ids[2], 0))).get("h") == "2"


def test_expired_ids_are_bounded_server_wide(core, timers, monkeypatch, caplog):  # noqa: F811
    from boshroster.xmpp import stream_management

    monkeypatch.setattr(stream_management, "_MAX_TOMBSTONES", 2)
    sm = core.stream_context.sm
    ids = [expired(core, timers, user=user) for user in ("alice", "bob", "carol")]
    assert list(sm._tombstones) == ids[1:]
    assert "expired stream management sessions remembered: forgetting the oldest" in caplog.text

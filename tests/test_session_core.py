"""The transport-agnostic session core, driven without sockets.

A real Core (real account store, offline store, registry, router, roster
cache) with an in-test roster backend; each client is a ClientSession whose
transport collects what the server sends into a list.
"""

import base64
import shutil

import gevent

import pytest
import scramp

from boshroster.auth.accounts import AccountStore
from boshroster.xmpp import xmlio
from boshroster.config import load
from boshroster.wiring import Core
from boshroster.xmpp.errors import StreamError
from boshroster.roster.model import Roster
from boshroster.xmpp.stream import ClientSession, Peer
from boshroster.xmpp.xmlio import (
    NS_BIND,
    NS_CLIENT,
    NS_DELAY,
    NS_ROSTER,
    NS_ROSTERVER,
    NS_SASL,
    NS_STANZAS,
    NS_STREAM,
)

DOMAIN = "localhost"
PASSWORD = "secret pass"
LOOPBACK = Peer("127.0.0.1", False)


def q(ns, tag):
    return f"{{{ns}}}{tag}"


def contacts_of(*names):
    return {f"{n}@{DOMAIN}": {"name": n.title(), "groups": ["Friends"]} for n in names}


class RosterBackendStub:
    """The one method Core needs from a roster backend, returning real Roster objects."""

    def __init__(self, rosters: dict):
        self.rosters = rosters
        self.fetches: list[str] = []

    def fetch(self, username: str) -> Roster:
        self.fetches.append(username)
        return Roster.from_backend_json(self.rosters.get(username, {}), log_context="test")


class ListTransport:
    kind = "test"

    def __init__(self):
        self.out: list = []
        self.errors: list = []

    def send(self, el):
        self.out.append(el)

    def stream_error(self, el):
        self.errors.append(el)


class Client:
    """One session plus its transport, with small helpers."""

    def __init__(self, core: Core, peer: Peer = LOOPBACK):
        self.core = core
        self.transport = ListTransport()
        self.session = ClientSession(core.stream_context, self.transport, peer)

    def feed(self, xml: str) -> None:
        self.session.feed(xmlio.parse(xml, 65536))

    def take(self) -> list:
        out, self.transport.out = self.transport.out, []
        return out

    def take_one(self):
        out = self.take()
        assert len(out) == 1, [xmlio.tostring(e) for e in out]
        return out[0]

    @property
    def errors(self):
        return self.transport.errors

    def plain(self, user: str, password: str = PASSWORD):
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.feed(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
        return self.take_one()

    def bind(self, resource: str | None = None):
        inner = f"<resource>{resource}</resource>" if resource is not None else ""
        self.feed(f"<iq xmlns='{NS_CLIENT}' type='set' id='bind1'><bind xmlns='{NS_BIND}'>{inner}</bind></iq>")
        return self.take_one()

    def iq(self, inner: str, type_: str = "get", to: str | None = None, id_: str | None = "q1") -> list:
        attrs = f" type='{type_}'"
        if id_ is not None:
            attrs += f" id='{id_}'"
        if to is not None:
            attrs += f" to='{to}'"
        self.feed(f"<iq xmlns='{NS_CLIENT}'{attrs}>{inner}</iq>")
        return self.take()

    def presence(self, inner: str = "", **attrs) -> None:
        attr = "".join(f" {k}='{v}'" for k, v in attrs.items())
        self.feed(f"<presence xmlns='{NS_CLIENT}'{attr}>{inner}</presence>")
        settle(self.core)


    def message(self, to: str, body: str, extra_attrs: str = "", type_: str = "chat") -> None:
        self.feed(f"<message xmlns='{NS_CLIENT}' to='{to}' type='{type_}' id='m1'{extra_attrs}><body>{body}</body></message>")


def settle(core) -> None:
    """Let background work the stanza started finish (presence sent before the
    roster is known loads it in the background)."""
    for _ in range(100):
        gevent.sleep(0)
        if not core.roster._loading:
            return


def stanza_error_condition(el) -> str | None:
    err = el.find(q(NS_CLIENT, "error"))
    if err is None:
        return None
    for child in err:
        if child.tag.startswith(f"{{{NS_STANZAS}}}") and not child.tag.endswith("}text"):
            return xmlio.split_tag(child.tag)[1]
    return None


def stream_error_condition(el) -> str:
    assert el.tag == q(NS_STREAM, "error")
    return xmlio.split_tag(el[0].tag)[1]


@pytest.fixture
def backend():
    return RosterBackendStub(
        {
            "alice": contacts_of("bob", "carol"),
            "bob": contacts_of("alice"),
            "carol": contacts_of("alice"),
            # dave lists alice, alice does not list dave
            "dave": contacts_of("alice"),
        }
    )


_accounts_db = []  # the path, once made


def accounts_db(tmp_path_factory):
    """The four accounts, derived once per session (their SCRAM keys cost ~60 ms a test).
    A function, not a fixture: modules that import ``core`` from here need nothing more."""
    if not _accounts_db:
        path = tmp_path_factory.mktemp("accounts") / "accounts.sqlite3"
        store = AccountStore(str(path), 4096)
        for user in ("alice", "bob", "carol", "dave"):
            store.add(user, PASSWORD)
        store.close()
        _accounts_db.append(path)
    return _accounts_db[0]


@pytest.fixture
def core(tmp_path, tmp_path_factory, backend):
    (tmp_path / "data").mkdir()
    shutil.copyfile(accounts_db(tmp_path_factory), tmp_path / "data" / "accounts.sqlite3")
    config = load(None, env={}, data_dir=str(tmp_path / "data"), domain=DOMAIN, scram_iterations=4096)
    core = Core(config, roster_backend=backend)
    yield core
    core.shutdown()


def login(core, user, resource="res", presence=False) -> Client:
    client = Client(core)
    client.session.open_stream(DOMAIN)
    assert client.plain(user).tag == q(NS_SASL, "success")
    client.session.restart()
    reply = client.bind(resource)
    assert reply.get("type") == "result", xmlio.tostring(reply)
    if presence:
        client.presence()
    client.take()
    return client


# -- stream opening, features, SASL ----------------------------------------------------------

def test_features_before_auth_list_mechanisms(core):
    client = Client(core)
    feats = client.session.open_stream(DOMAIN)
    assert feats.tag == q(NS_STREAM, "features")
    mechs = [m.text for m in feats.find(q(NS_SASL, "mechanisms"))]
    assert mechs == ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
    assert feats.find(q(NS_BIND, "bind")) is None
    assert client.session.stream_id
    assert client.take() == []  # the transport sends the features, not the session


def test_plain_is_not_offered_to_an_insecure_remote_peer(core):
    feats = Client(core, Peer("192.0.2.7", False)).session.open_stream(DOMAIN)
    assert [m.text for m in feats.find(q(NS_SASL, "mechanisms"))] == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    feats = Client(core, Peer("192.0.2.7", True)).session.open_stream(DOMAIN)
    assert "PLAIN" in [m.text for m in feats.find(q(NS_SASL, "mechanisms"))]


def test_plain_offered_only_is_plain_accepted(core):
    client = Client(core, Peer("192.0.2.7", False))
    client.session.open_stream(DOMAIN)
    reply = client.plain("alice")
    assert reply.tag == q(NS_SASL, "failure")
    assert reply.find(q(NS_SASL, "invalid-mechanism")) is not None
    assert client.session.username is None


def test_open_to_another_domain_is_host_unknown(core):
    client = Client(core)
    with pytest.raises(StreamError) as info:
        client.session.open_stream("other.example")
    assert info.value.condition == "host-unknown"
    with pytest.raises(StreamError):
        client.session.open_stream(None)
    # the prepared form of our own domain is fine: the stream opens and offers SASL
    feats = client.session.open_stream("LOCALHOST.")
    assert feats.tag == q(NS_STREAM, "features")
    assert feats.find(q(NS_SASL, "mechanisms")) is not None
    assert client.session.stream_id


def test_plain_login_then_restart_gives_bind_features_and_new_stream_id(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    first_id = client.session.stream_id
    success = client.plain("Alice")  # usernames are prepared
    assert success.tag == q(NS_SASL, "success")
    assert client.session.username == "alice"
    feats = client.session.restart()
    assert feats.find(q(NS_SASL, "mechanisms")) is None
    assert feats.find(q(NS_BIND, "bind")) is not None
    assert feats.find(q(NS_ROSTERVER, "ver")) is not None
    assert client.session.stream_id and client.session.stream_id != first_id


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_login(core, mechanism):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    scram = scramp.ScramClient([mechanism], "bob", PASSWORD)
    first = base64.b64encode(scram.get_client_first().encode()).decode()
    client.feed(f"<auth xmlns='{NS_SASL}' mechanism='{mechanism}'>{first}</auth>")
    challenge = client.take_one()
    assert challenge.tag == q(NS_SASL, "challenge")
    scram.set_server_first(base64.b64decode(challenge.text).decode())
    final = base64.b64encode(scram.get_client_final().encode()).decode()
    client.feed(f"<response xmlns='{NS_SASL}'>{final}</response>")
    success = client.take_one()
    assert success.tag == q(NS_SASL, "success")
    scram.set_server_final(base64.b64decode(success.text).decode())  # verifies the server signature
    assert client.session.username == "bob"


def test_wrong_password_is_not_authorized_and_the_stream_stays_open(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    reply = client.plain("alice", "wrong")
    assert reply.tag == q(NS_SASL, "failure")
    assert reply.find(q(NS_SASL, "not-authorized")) is not None
    assert not client.errors and not client.session.ended
    assert client.plain("alice").tag == q(NS_SASL, "success")


def test_restart_before_auth_is_refused(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    with pytest.raises(StreamError) as info:
        client.session.restart()
    assert info.value.condition == "not-authorized"


def test_stanza_before_auth_is_a_stream_error(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    client.feed(f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><body>hi</body></message>")
    assert len(client.errors) == 1
    assert stream_error_condition(client.errors[0]) == "not-authorized"
    assert client.session.ended
    # nothing more goes out on an ended session
    client.feed(f"<iq xmlns='{NS_CLIENT}' type='get' id='x'><ping xmlns='urn:xmpp:ping'/></iq>")
    assert client.take() == [] and len(client.errors) == 1


def test_stanza_after_sasl_before_restart_is_a_stream_error(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    client.plain("alice")
    client.feed(f"<iq xmlns='{NS_CLIENT}' type='set' id='b'><bind xmlns='{NS_BIND}'/></iq>")
    assert stream_error_condition(client.errors[0]) == "not-authorized"
    assert client.session.ended


def test_message_before_bind_is_a_stream_error(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    client.plain("alice")
    client.session.restart()
    client.feed(f"<message xmlns='{NS_CLIENT}' to='bob@localhost'><body>hi</body></message>")
    assert len(client.errors) == 1
    assert stream_error_condition(client.errors[0]) == "not-authorized"
    assert client.session.ended and client.session.jid is None


def test_iq_get_before_bind_is_answered_with_an_error(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    client.plain("alice")
    client.session.restart()
    out = client.iq(f"<query xmlns='{NS_ROSTER}'/>")
    assert len(out) == 1 and out[0].get("type") == "error"
    assert stanza_error_condition(out[0]) == "not-authorized"
    assert not client.session.ended


# -- resource binding ----------------------------------------------------------------------

def test_bind_requested_resource(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    client.plain("alice")
    client.session.restart()
    reply = client.bind("Laptop Home")
    assert reply.get("type") == "result" and reply.get("id") == "bind1"
    assert reply.find(f"{q(NS_BIND, 'bind')}/{q(NS_BIND, 'jid')}").text == "alice@localhost/Laptop Home"
    assert client.session.state == "active"
    assert core.sessions.get("alice", "Laptop Home") is client.session


def test_bind_without_resource_gets_a_generated_one(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    client.plain("alice")
    client.session.restart()
    reply = client.bind()
    jid = reply.find(f"{q(NS_BIND, 'bind')}/{q(NS_BIND, 'jid')}").text
    assert jid.startswith("alice@localhost/") and len(jid) > len("alice@localhost/")


def test_duplicate_resource_gets_another_one_and_both_stay(core):
    first = login(core, "alice", "web")
    second = login(core, "alice", "web")
    assert first.session.jid_str == "alice@localhost/web"
    assert second.session.jid_str != first.session.jid_str
    assert second.session.jid_str.startswith("alice@localhost/web")
    assert not first.session.ended and not first.errors
    assert len(core.sessions.sessions_of("alice")) == 2


def test_kick_old_policy_closes_the_old_session_with_conflict(core):
    core.sessions.registry.conflict_policy = "kick_old"
    first = login(core, "alice", "web")
    second = login(core, "alice", "web")
    assert second.session.jid_str == "alice@localhost/web"
    assert first.session.ended
    assert stream_error_condition(first.errors[0]) == "conflict"
    assert core.sessions.get("alice", "web") is second.session


def test_invalid_resource_is_bad_request(core):
    client = Client(core)
    client.session.open_stream(DOMAIN)
    client.plain("alice")
    client.session.restart()
    reply = client.bind("bad\u0085nel")  # a C1 control: XML allows it, OpaqueString does not
    assert reply.get("type") == "error"
    assert stanza_error_condition(reply) == "bad-request"
    assert client.session.state == "bind"


# -- routing -------------------------------------------------------------------------------

def test_message_is_delivered_with_from_stamped(core):
    alice = login(core, "alice", presence=True)
    bob = login(core, "bob", "phone", presence=True)
    alice.message("bob@localhost/phone", "hello")
    out = bob.take()
    assert len(out) == 1
    msg = out[0]
    assert msg.tag == q(NS_CLIENT, "message")
    assert msg.get("from") == "alice@localhost/res"
    assert msg.findtext(q(NS_CLIENT, "body")) == "hello"
    assert [e for e in alice.take() if e.tag != q(NS_CLIENT, "presence")] == []  # no error back


def test_forged_from_is_replaced(core):
    alice = login(core, "alice", presence=True)
    bob = login(core, "bob", presence=True)
    alice.message("bob@localhost", "trust me", extra_attrs=" from='carol@localhost/evil'")
    msg = bob.take_one()
    assert msg.get("from") == "alice@localhost/res"


def test_message_to_a_bare_jid_reaches_the_highest_priority_resource(core):
    alice = login(core, "alice", presence=True)
    low = login(core, "bob", "low")
    low.presence("<priority>1</priority>")
    high = login(core, "bob", "high")
    high.presence("<priority>5</priority>")
    low.take(), high.take()
    alice.message("bob@localhost", "to the best")
    assert [m.findtext(q(NS_CLIENT, "body")) for m in high.take()] == ["to the best"]
    assert low.take() == []


def test_message_to_an_unknown_user_is_service_unavailable(core):
    alice = login(core, "alice", presence=True)
    alice.message("nobody@localhost", "hi")
    reply = alice.take_one()
    assert reply.get("type") == "error" and reply.get("id") == "m1"
    assert stanza_error_condition(reply) == "service-unavailable"


def test_message_to_another_domain_is_remote_server_not_found(core):
    alice = login(core, "alice", presence=True)
    alice.message("bob@elsewhere.example", "hi")
    assert stanza_error_condition(alice.take_one()) == "remote-server-not-found"


def test_malformed_to_is_jid_malformed(core):
    alice = login(core, "alice", presence=True)
    alice.message("a&amp;b@localhost", "hi")
    reply = alice.take_one()
    assert reply.get("type") == "error"
    assert stanza_error_condition(reply) == "jid-malformed"
    assert reply.get("to") == "alice@localhost/res"


def test_iq_without_id_is_bad_request(core):
    alice = login(core, "alice")
    out = alice.iq("<ping xmlns='urn:xmpp:ping'/>", id_=None)
    assert len(out) == 1 and out[0].get("type") == "error"
    assert stanza_error_condition(out[0]) == "bad-request"
    assert not alice.session.ended


def test_iq_with_invalid_type_is_bad_request(core):
    alice = login(core, "alice")
    out = alice.iq("<ping xmlns='urn:xmpp:ping'/>", type_="fetch")
    assert stanza_error_condition(out[0]) == "bad-request"


def test_iq_get_with_two_children_is_bad_request(core):
    alice = login(core, "alice")
    out = alice.iq("<ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/>")
    assert len(out) == 1 and out[0].get("id") == "q1"
    assert stanza_error_condition(out[0]) == "bad-request"


def test_iq_set_with_no_child_is_bad_request(core):
    alice = login(core, "alice")
    out = alice.iq("", type_="set")
    assert stanza_error_condition(out[0]) == "bad-request"


def test_ping_to_the_server(core):
    alice = login(core, "alice")
    out = alice.iq("<ping xmlns='urn:xmpp:ping'/>", to=DOMAIN)
    assert len(out) == 1 and out[0].get("type") == "result" and out[0].get("id") == "q1"
    assert out[0].get("to") == "alice@localhost/res"


@pytest.mark.parametrize("to", [None, DOMAIN, "alice@localhost"])
def test_unknown_iq_namespace_is_service_unavailable(core, to):
    alice = login(core, "alice")
    out = alice.iq("<query xmlns='urn:example:unknown'/>", to=to)
    assert len(out) == 1 and out[0].get("type") == "error" and out[0].get("id") == "q1"
    err = out[0].find(q(NS_CLIENT, "error"))
    assert err.get("type") == "cancel"
    assert stanza_error_condition(out[0]) == "service-unavailable"


def test_iq_to_an_offline_full_jid_is_service_unavailable(core):
    alice = login(core, "alice")
    out = alice.iq("<query xmlns='urn:example:unknown'/>", to="bob@localhost/gone")
    assert stanza_error_condition(out[0]) == "service-unavailable"


def test_iq_to_an_online_full_jid_is_forwarded_with_from(core):
    alice = login(core, "alice")
    bob = login(core, "bob", "desk")
    assert alice.iq("<query xmlns='urn:example:x'/>", to="bob@localhost/desk", id_="fw") == []
    got = bob.take_one()
    assert got.get("id") == "fw" and got.get("from") == "alice@localhost/res"


def test_roster_get_returns_the_backend_roster(core, backend):
    alice = login(core, "alice")
    out = alice.iq(f"<query xmlns='{NS_ROSTER}'/>")
    assert len(out) == 1 and out[0].get("type") == "result"
    query = out[0].find(q(NS_ROSTER, "query"))
    items = {i.get("jid"): i for i in query.findall(q(NS_ROSTER, "item"))}
    assert set(items) == {"bob@localhost", "carol@localhost"}
    assert items["bob@localhost"].get("subscription") == "both"
    assert items["bob@localhost"].get("name") == "Bob"
    assert query.get("ver")
    # same ver again: an empty result (RFC 6121 §2.6.3)
    out = alice.iq(f"<query xmlns='{NS_ROSTER}' ver='{query.get('ver')}'/>", id_="q2")
    assert out[0].get("type") == "result" and len(out[0]) == 0
    assert "alice" in backend.fetches


def test_roster_set_is_service_unavailable(core):
    alice = login(core, "alice")
    out = alice.iq(f"<query xmlns='{NS_ROSTER}'><item jid='eve@localhost'/></query>", type_="set")
    assert len(out) == 1 and out[0].get("type") == "error"
    assert stanza_error_condition(out[0]) == "service-unavailable"


@pytest.mark.parametrize("type_", ["result", "error"])
def test_result_or_error_iq_to_the_server_gets_no_answer(core, type_):
    alice = login(core, "alice")
    assert alice.iq("", type_=type_) == []
    assert alice.iq(f"<query xmlns='{NS_ROSTER}'/>", type_=type_, to=DOMAIN) == []
    assert not alice.session.ended and not alice.errors


def test_unknown_top_level_element_after_bind_is_a_stream_error(core):
    alice = login(core, "alice")
    alice.feed("<foo xmlns='urn:example:nonza'/>")
    assert stream_error_condition(alice.errors[0]) == "unsupported-stanza-type"
    assert alice.session.ended


# -- presence ------------------------------------------------------------------------------

def test_initial_presence_is_broadcast_to_contacts_and_probes_answered(core):
    bob = login(core, "bob", presence=True)
    alice = login(core, "alice")
    alice.presence("<show>away</show>")
    to_bob = bob.take()
    assert [(p.get("from"), p.get("to"), p.get("type")) for p in to_bob] == [
        ("alice@localhost/res", "bob@localhost", None)
    ]
    assert to_bob[0].findtext(q(NS_CLIENT, "show")) == "away"
    # alice gets her own presence back (RFC 6121 §4.2.2) and learns bob's (bob lists alice)
    got = [(p.get("from"), p.get("to")) for p in alice.take() if p.tag == q(NS_CLIENT, "presence")]
    assert sorted(got) == [("alice@localhost/res", "alice@localhost"), ("bob@localhost/res", "alice@localhost/res")]


def test_presence_follows_the_senders_roster_and_probes_the_owners(core):
    alice = login(core, "alice", presence=True)
    dave = login(core, "dave")  # dave lists alice; alice does not list dave
    dave.presence()
    # alice does not list dave: her presence is not shown to him
    assert [p.get("from") for p in dave.take()] == ["dave@localhost/res"]  # only his own echo
    # dave lists alice: his presence goes to her
    assert [(p.get("from"), p.get("to")) for p in alice.take()] == [("dave@localhost/res", "alice@localhost")]


def test_end_broadcasts_unavailable_to_contacts_with_presence(core):
    alice = login(core, "alice", presence=True)
    bob = login(core, "bob", presence=True)
    carol = login(core, "carol")  # no presence: gets nothing
    bob.take(), carol.take()
    alice.session.end("connection dropped")
    gone = bob.take_one()
    assert gone.tag == q(NS_CLIENT, "presence")
    assert gone.get("type") == "unavailable" and gone.get("from") == "alice@localhost/res"
    assert carol.take() == []
    assert core.sessions.get("alice", "res") is None
    # idempotent: a second end broadcasts nothing more
    alice.session.end("again")
    assert bob.take() == []


def test_client_unavailable_then_end_broadcasts_once(core):
    alice = login(core, "alice", presence=True)
    bob = login(core, "bob", presence=True)
    bob.take()
    alice.presence(type="unavailable")
    assert [p.get("type") for p in bob.take()] == ["unavailable"]
    alice.session.end("logout")
    assert bob.take() == []


def test_subscription_requests_are_dropped(core):
    alice = login(core, "alice", presence=True)
    bob = login(core, "bob", presence=True)
    alice.take(), bob.take()
    alice.presence(type="subscribe", to="bob@localhost")
    assert bob.take() == [] and alice.take() == []


# -- offline storage -----------------------------------------------------------------------

def test_offline_message_is_stored_and_delivered_with_delay_on_initial_presence(core):
    alice = login(core, "alice", presence=True)
    alice.message("bob@localhost", "while you were out")
    assert alice.take() == []  # no error: stored
    assert core.offline.count("bob") == 1

    bob = login(core, "bob")  # bound, no presence yet: still not available
    assert bob.take() == []
    alice.message("bob@localhost", "second")
    assert core.offline.count("bob") == 2

    bob.presence()
    messages = [e for e in bob.take() if e.tag == q(NS_CLIENT, "message")]
    assert [m.findtext(q(NS_CLIENT, "body")) for m in messages] == ["while you were out", "second"]
    for msg in messages:
        assert msg.get("from") == "alice@localhost/res"
        delay = msg.find(q(NS_DELAY, "delay"))
        assert delay is not None
        assert delay.get("from") == DOMAIN
        assert delay.get("stamp", "").endswith("Z") and "T" in delay.get("stamp")
    assert core.offline.count("bob") == 0
    # delivered once only: a second resource's initial presence gets none
    bob2 = login(core, "bob", "second")
    bob2.presence()
    assert [e for e in bob2.take() if e.tag == q(NS_CLIENT, "message")] == []


def test_offline_message_to_a_full_jid_of_an_offline_user_is_stored(core):
    alice = login(core, "alice", presence=True)
    alice.message("bob@localhost/gone", "to the old tab")
    assert alice.take() == []
    assert core.offline.count("bob") == 1


def test_negative_priority_resource_does_not_get_bare_messages_so_they_are_stored(core):
    alice = login(core, "alice", presence=True)
    bob = login(core, "bob")
    bob.presence("<priority>-1</priority>")
    bob.take()
    alice.message("bob@localhost", "hi")
    assert bob.take() == []
    assert core.offline.count("bob") == 1


# -- bookkeeping ---------------------------------------------------------------------------

def test_open_session_count_goes_back_to_zero(core):
    alice = login(core, "alice")
    assert core.metrics.open_sessions().get("test", 0) == 1
    alice.session.end("bye")
    assert core.metrics.open_sessions().get("test", 0) == 0


def test_ending_a_never_opened_session_does_not_skew_the_count(core):
    # A WebSocket that connects and drops before <open/> ends a session in state "new".
    client = Client(core)
    client.session.end("connection dropped")
    client2 = Client(core)
    client2.session.fail("not-well-formed", "garbage before <open/>")
    assert core.metrics.open_sessions().get("test", 0) == 0

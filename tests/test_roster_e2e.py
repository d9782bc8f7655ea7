"""Issue 3 end to end, XMPP side: rosters delegated to the backend app.

Real server subprocesses, a real backend HTTP app (tests/backend_app.py) that
counts GETs and injects faults, and raw BOSH / WebSocket clients.  Tests
where the transport matters run over both (the ``transport`` fixture).  The
HTTP side of the refresh endpoint (bad bodies, access control, time bounds)
is in test_refresh_endpoint.py.

Point of issue 3 -> tests:
 1 fetch ................ test_first_get_fetches_once_then_cache_serves_every_resource,
                          test_username_is_url_encoded_in_the_backend_url,
                          test_groups_both_forms_bad_jids_skipped_names_and_subscription
 2 cache ................ test_concurrent_logins_of_one_user_make_one_backend_request,
                          test_grace_period_after_logout, test_refresh_of_offline_user_refetches_the_cached_copy,
                          test_failed_refresh_of_offline_cached_user_drops_the_stale_copy
 3 get / ver / set ...... test_first_get_..., test_roster_versioning_result_empty_and_push_ver,
                          test_roster_set_is_refused_and_the_roster_unchanged
 4 refresh .............. test_refresh_pushes_added_removed_changed_to_interested_resources (+ HTTP file)
 5 pushes + presence .... test_refresh_..., test_presence_follows_refresh_both_ways,
                          test_refresh_for_user_without_initial_presence, test_overlapping_refreshes_push_each_change_once
 6 backend failures ..... test_backend_fault_at_login_*, test_connection_refused_at_login_*,
                          test_backend_fault_with_a_cached_roster_keeps_it,
                          test_retry_reaches_the_resource_that_got_the_error_*, test_retry_success_brings_presence
 7 subscriptions ........ test_subscription_stanzas_are_dropped
 9 auth = "http" ........ test_http_auth_plain_only_cached_and_refusals
 (8, protection of the endpoint, is HTTP only: test_refresh_endpoint.py)
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import gevent
import pytest
import requests
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from backend_app import TestBackend, _RawPathHandler, closed_port_url_template
from conftest import NAMES, USERS, demo_contacts
from harness import NS_CLIENT, NS_ROSTER, NS_SASL, NS_STANZAS, BoshClient, ServerProcess, WsClient, q, wait_for

NS_ROSTERVER = "urn:xmpp:features:rosterver"
NS_PING = "urn:xmpp:ping"
DEMO = demo_contacts()


# -- helpers -------------------------------------------------------------------------------


def new_client(server, kind):
    return BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)


def stop_all(made) -> None:
    for client in made:
        try:
            client.stop()
            if isinstance(client, BoshClient):
                client.http.close()  # no idle keep-alive for the server to wait for at shutdown
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


@pytest.fixture
def clients(make_server):
    """clients(server, kind) -> a new, not logged-in client; all stopped before the servers."""
    made = []

    def make(server, kind):
        client = new_client(server, kind)
        made.append(client)
        return client

    yield make
    stop_all(made)


@pytest.fixture
def connect(server, transport):
    """conftest's connect(), with a cleanup that lets the server stop at once."""
    made = []

    def make(kind=None):
        client = new_client(server, kind or transport)
        made.append(client)
        return client

    yield make
    stop_all(made)


def login(make, server, kind, user, resource, roster=True, presence=False):
    client = make(server, kind)
    client.login(user, resource=resource)
    if roster:
        reply = client.get_roster()
        assert reply.get("type") == "result", ET.tostring(reply)
    if presence:
        client.presence()
    return client


def items_of(iq: ET.Element) -> dict:
    """{jid: (name, sorted tuple of groups, subscription)} of a roster result or push."""
    query = iq.find(q(NS_ROSTER, "query"))
    assert query is not None, ET.tostring(iq)
    return {
        item.get("jid"): (item.get("name"), tuple(sorted(g.text for g in item.findall(q(NS_ROSTER, "group")))), item.get("subscription"))
        for item in query.findall(q(NS_ROSTER, "item"))
    }


def demo_items(user: str) -> dict:
    return {f"{o}@localhost": (NAMES[o], ("Friends",), "both") for o in USERS if o != user}


def is_push(el: ET.Element) -> bool:
    return el.tag == q(NS_CLIENT, "iq") and el.get("type") == "set" and el.find(q(NS_ROSTER, "query")) is not None


def pushes(client, count: int, timeout: float = 5.0) -> list[ET.Element]:
    """Exactly ``count`` roster pushes, checked for RFC 6121 §2.1.6 form.

    "Exactly": a change's pushes are queued together, so once ``count`` are here any
    extra one is queued too, and must have arrived before a ping's result."""
    got = [client.recv(timeout, is_push) for _ in range(count)]
    client.expect_nothing_queued(is_push)
    for push in got:
        assert push.get("id"), ET.tostring(push)
        assert push.get("from") in (None, client.jid.split("/")[0]), ET.tostring(push)
        assert len(push.find(q(NS_ROSTER, "query")).findall(q(NS_ROSTER, "item"))) == 1, ET.tostring(push)
    return got


def push_item(push: ET.Element) -> tuple:
    ((jid, rest),) = items_of(push).items()
    return (jid, *rest)


def removal(push: ET.Element) -> str:
    """The JID a push removes (RFC 6121 §2.5.3: only jid and subscription='remove' matter)."""
    jid, _name, _groups, subscription = push_item(push)
    assert subscription == "remove", ET.tostring(push)
    return jid


def push_ver(push: ET.Element) -> str | None:
    return push.find(q(NS_ROSTER, "query")).get("ver")


def error_of(stanza: ET.Element) -> tuple[str | None, str | None]:
    """(type, condition) of a stanza error."""
    err = stanza.find(q(NS_CLIENT, "error"))
    if err is None:
        return None, None
    for child in err:
        if child.tag.startswith(f"{{{NS_STANZAS}}}") and not child.tag.endswith("}text"):
            return err.get("type"), child.tag.split("}")[1]
    return err.get("type"), None


def ping_ok(client) -> None:
    reply = client.iq(f"<ping xmlns='{NS_PING}'/>")
    assert reply.get("type") == "result", ET.tostring(reply)


def refresh(server, users, timeout=15.0) -> dict:
    reply = requests.post(server.base_url + "/roster_admin/refresh", data=json.dumps(users), timeout=timeout)
    assert reply.status_code == 200, (reply.status_code, reply.text)
    assert reply.headers["Content-Type"].startswith("application/json")
    return reply.json()


def ok(updated, errors=0) -> dict:
    return {"status": "ok", "message": "roster update complete", "updated": updated, "errors": errors}


def start_backend_on(port: int, contacts: dict) -> TestBackend:
    """A TestBackend on a given port (TestBackend.start() always picks a free one)."""
    backend = TestBackend(contacts)
    backend._server = WSGIServer(("127.0.0.1", port), backend._app, handler_class=_RawPathHandler,
                                 spawn=Pool(), log=None, error_log=None)
    backend._server.start()
    return backend


# -- 1-3: fetch, cache, roster get, versioning -----------------------------------------------------


def test_first_get_fetches_once_then_cache_serves_every_resource(server, backend, connect, transport):
    first = connect()
    first.login("alice", resource="one")
    # Roster versioning is advertised after authentication (RFC 6121 §2.6.1).
    assert first.features.find(q(NS_ROSTERVER, "ver")) is not None, ET.tostring(first.features)
    # The fetch starts at bind, as Prosody loads the roster at bind; the roster get joins it.
    assert backend.requests_for("alice") <= 1
    reply = first.get_roster()
    assert reply.get("type") == "result"
    assert items_of(reply) == demo_items("alice")
    assert reply.find(q(NS_ROSTER, "query")).get("ver")
    assert backend.requests_for("alice") == 1
    assert backend.raw_paths == ["/contacts/alice"]
    assert backend.last_headers.get("HTTP_ACCEPT") == "application/json"
    # Again from the same resource, and from a second resource: the cache answers.
    assert items_of(first.get_roster()) == demo_items("alice")
    second = connect()
    second.login("alice", resource="two")
    assert items_of(second.get_roster()) == demo_items("alice")
    assert backend.requests_for("alice") == 1
    ping_ok(first)
    ping_ok(second)


def test_username_is_url_encoded_in_the_backend_url(make_server, backend, clients):
    user = "o+brien%x"
    server = make_server(users=("alice", user), bosh_max_wait=5)
    backend.contacts[user] = {"alice@localhost": {"name": "Alice"}}
    client = clients(server, "websocket")
    client.login(user)
    assert items_of(client.get_roster()) == {"alice@localhost": ("Alice", (), "both")}
    assert backend.raw_paths == ["/contacts/o%2Bbrien%25x"]
    assert backend.requests_for(user) == 1


def test_concurrent_logins_of_one_user_make_one_backend_request(server, backend, connect, transport):
    backend.set_fault("alice", "slow", 1.0)  # keep the fetch in flight while the others ask
    made = [connect() for _ in range(5)]

    def run(client, index):
        client.login("alice", resource=f"tab{index}")
        return items_of(client.get_roster(timeout=10))

    jobs = [gevent.spawn(run, client, i) for i, client in enumerate(made)]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert [job.value for job in jobs] == [demo_items("alice")] * 5
    assert backend.requests_for("alice") == 1


def test_grace_period_after_logout(make_server, backend, clients):
    server = make_server(roster_cache_grace=1.0, bosh_max_wait=5)
    login(clients, server, "bosh", "alice", "a").close()
    assert backend.requests_for("alice") == 1
    # A quick reconnect (page reload) within the grace period: the login revalidates the cached
    # copy with a conditional GET (issue 10 point 14; test_roster_revalidate.py), here a 304.
    login(clients, server, "websocket", "alice", "b").close()
    assert backend.requests_for("alice") == 2 and backend.not_modified_for("alice") == 1
    gevent.sleep(1.5)
    # After the grace period the roster was evicted: the next login fetches it whole.
    client = login(clients, server, "bosh", "alice", "c")
    assert backend.full_requests_for("alice") == 2 and backend.conditional_requests_for("alice") == 1
    ping_ok(client)


def test_groups_both_forms_bad_jids_skipped_names_and_subscription(server, backend, connect):
    backend.contacts["alice"] = {
        "bob@localhost": {"name": "Bob", "groups": ["Friends", "Work"]},          # array form
        "carol@localhost": {"name": "Carol", "groups": {"Family": True, "Work": True}},  # object form
        "dave@localhost": {},                                                      # no name, no groups
        "Marie@Example.COM": {"name": "Marie"},                                    # prepared to lower case
        "not a jid@localhost": {"name": "Broken"},                                 # space: not a JID
        "@localhost": {"name": "Empty localpart"},
        "eve@localhost/phone": {"name": "Full JID"},                               # has a resource
    }
    alice = connect()
    alice.login("alice")
    reply = alice.get_roster()
    assert items_of(reply) == {
        "bob@localhost": ("Bob", ("Friends", "Work"), "both"),
        "carol@localhost": ("Carol", ("Family", "Work"), "both"),
        "dave@localhost": (None, (), "both"),
        "marie@example.com": ("Marie", (), "both"),
    }
    ping_ok(alice)
    log = wait_for(lambda: "skipping contact" in (text := server.log()) and text, what="'skipping contact' in the log")
    assert "not a jid@localhost" in log and "skipping contact" in log


def test_roster_versioning_result_empty_and_push_ver(server, backend, connect, transport):
    alice = connect()
    alice.login("alice")
    full = alice.get_roster()
    ver = full.find(q(NS_ROSTER, "query")).get("ver")
    assert ver
    # RFC 6121 §2.6.3: the client's ver matches -> an empty result.
    same = alice.iq(f"<query xmlns='{NS_ROSTER}' ver='{ver}'/>")
    assert same.get("type") == "result" and len(same) == 0, ET.tostring(same)
    # ver="" (bootstrap) or a stale ver -> the whole roster, with the current ver.
    for sent in ("", "0123456789abcdef"):
        reply = alice.iq(f"<query xmlns='{NS_ROSTER}' ver='{sent}'/>")
        assert items_of(reply) == demo_items("alice")
        assert reply.find(q(NS_ROSTER, "query")).get("ver") == ver
    # A change: the pushes carry versions, the last one the roster's new ver.
    backend.contacts["alice"] = {**DEMO["alice"], "zoe@example.org": {"name": "Zoe"}}
    backend.contacts["alice"].pop("bob@localhost")
    assert refresh(server, ["alice"]) == ok(1)
    got = pushes(alice, 2)
    new = alice.get_roster()
    new_ver = new.find(q(NS_ROSTER, "query")).get("ver")
    assert new_ver and new_ver != ver
    assert all(push_ver(p) for p in got)
    assert push_ver(got[-1]) == new_ver
    # An interim push's ver never claims to be the complete new roster (a client that
    # saw only the first push must get the full roster at its next login), nor the old one.
    assert push_ver(got[0]) not in (ver, new_ver)
    again = alice.iq(f"<query xmlns='{NS_ROSTER}' ver='{push_ver(got[0])}'/>")
    assert len(items_of(again)) == 3
    assert len(alice.iq(f"<query xmlns='{NS_ROSTER}' ver='{new_ver}'/>")) == 0


def test_roster_set_is_refused_and_the_roster_unchanged(server, backend, connect, transport):
    alice = connect()
    alice.login("alice")
    before = alice.get_roster()
    reply = alice.iq(f"<query xmlns='{NS_ROSTER}'><item jid='mallory@localhost' name='M'/></query>", type_="set")
    assert reply.get("type") == "error"
    assert error_of(reply) == ("cancel", "service-unavailable")
    reply = alice.iq(f"<query xmlns='{NS_ROSTER}'><item jid='bob@localhost' subscription='remove'/></query>", type_="set")
    assert error_of(reply) == ("cancel", "service-unavailable")
    alice.expect_nothing_queued(is_push)
    after = alice.get_roster()
    assert items_of(after) == items_of(before) == demo_items("alice")
    assert after.find(q(NS_ROSTER, "query")).get("ver") == before.find(q(NS_ROSTER, "query")).get("ver")
    assert backend.requests_for("alice") == 1


# -- 4-5: refresh, pushes, presence ------------------------------------------------------------


def test_refresh_pushes_added_removed_changed_to_interested_resources(server, backend, connect, transport):
    one = connect()
    one.login("alice", resource="one")
    one.get_roster()
    two = connect()
    two.login("alice", resource="two")
    two.get_roster()
    three = connect()  # online and available, but never asked for its roster: no pushes
    three.login("alice", resource="three")
    three.presence()
    assert backend.requests_for("alice") == 1
    new = dict(DEMO["alice"])
    del new["bob@localhost"]                                                            # removed
    new["carol@localhost"] = {"name": "Captain Marvel", "groups": ["Avengers", "Friends"]}  # changed
    new["zoe@example.org"] = {"name": "Zoe", "groups": {"New": True}}                   # added
    backend.contacts["alice"] = new
    assert refresh(server, ["alice"]) == ok(1)
    assert backend.requests_for("alice") == 2
    expected = {
        ("zoe@example.org", "Zoe", ("New",), "both"),
        ("carol@localhost", "Captain Marvel", ("Avengers", "Friends"), "both"),
        ("bob@localhost", "Bob Builder", ("Friends",), "remove"),
    }
    for client in (one, two):
        got = pushes(client, 3)
        assert {push_item(p) for p in got} == expected
        assert all(p.get("to") == client.jid for p in got)
        assert len({p.get("id") for p in got}) == 3
    three.expect_nothing_queued(is_push)
    # The cache now holds the new roster: a get shows it, without another fetch.
    assert items_of(two.get_roster()) == {
        "carol@localhost": ("Captain Marvel", ("Avengers", "Friends"), "both"),
        "dave@localhost": ("Dave Bowman", ("Friends",), "both"),
        "zoe@example.org": ("Zoe", ("New",), "both"),
    }
    # GET /roster_admin/refresh/<user>: same JSON; nothing changed -> no pushes.
    reply = requests.get(server.base_url + "/roster_admin/refresh/alice", timeout=10)
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == ok(1)
    assert backend.requests_for("alice") == 3
    one.expect_nothing_queued(is_push)
    # Duplicates are fetched once and counted once.
    assert refresh(server, ["alice", "alice", "ALICE"]) == ok(1)
    assert backend.requests_for("alice") == 4
    ping_ok(one)
    ping_ok(three)


def test_presence_follows_refresh_both_ways(server, backend, connect, transport):
    backend.contacts["alice"] = {"bob@localhost": {}}
    backend.contacts["carol"] = {"bob@localhost": {}}
    alice = connect()
    alice.login("alice", resource="a")
    alice.get_roster()
    alice.presence()
    carol = connect()
    carol.login("carol", resource="c")
    carol.get_roster()
    carol.presence()
    alice.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "presence") and (e.get("from") or "").startswith("carol@"),
                                after=[carol])
    # The backend makes them contacts of each other and says so.
    backend.contacts["alice"] = {"bob@localhost": {}, "carol@localhost": {"name": "Carol"}}
    backend.contacts["carol"] = {"bob@localhost": {}, "alice@localhost": {"name": "Alice"}}
    assert refresh(server, ["alice", "carol"]) == ok(2)
    assert push_item(pushes(alice, 1)[0]) == ("carol@localhost", "Carol", (), "both")
    assert push_item(pushes(carol, 1)[0]) == ("alice@localhost", "Alice", (), "both")
    # Each sees the other online at once (the new contact's presence is probed).
    assert alice.recv_presence(sender="carol@localhost/c").get("type") is None
    assert carol.recv_presence(sender="alice@localhost/a").get("type") is None
    # Updates flow now.
    carol.presence("<show>away</show>")
    alice.recv(match=lambda e: e.get("from") == "carol@localhost/c" and e.findtext(q(NS_CLIENT, "show")) == "away")
    # The backend separates them again: removal pushes and unavailable both ways.
    backend.contacts["alice"] = {"bob@localhost": {}}
    backend.contacts["carol"] = {"bob@localhost": {}}
    assert refresh(server, ["carol", "alice"]) == ok(2)
    assert removal(pushes(alice, 1)[0]) == "carol@localhost"
    assert removal(pushes(carol, 1)[0]) == "alice@localhost"
    alice.recv_presence(sender="carol@localhost/c", type_="unavailable")
    carol.recv_presence(sender="alice@localhost/a", type_="unavailable")
    # ... and presence no longer flows.
    alice.presence("<show>dnd</show>")
    carol.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "presence") and e.findtext(q(NS_CLIENT, "show")) == "dnd",
                                after=[alice])
    ping_ok(alice)
    ping_ok(carol)


def test_refresh_for_user_without_initial_presence(server, backend, connect):
    """Prosody's module crashes here (contract §4); we push, send no presence yet, and carry on."""
    backend.contacts["dave"] = {"bob@localhost": {}}
    backend.contacts["carol"] = {"dave@localhost": {}, "bob@localhost": {}}
    carol = connect()
    carol.login("carol", resource="c")
    carol.get_roster()
    carol.presence()
    dave = connect()
    dave.login("dave", resource="d")
    dave.get_roster()  # interested, but no initial presence
    backend.contacts["dave"] = {"bob@localhost": {}, "carol@localhost": {"name": "Carol"}}
    assert refresh(server, ["dave"]) == ok(1)
    assert push_item(pushes(dave, 1)[0]) == ("carol@localhost", "Carol", (), "both")
    # RFC 6121 §4.4: no presence to a resource before its initial presence.
    dave.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "presence"))
    ping_ok(dave)
    # Initial presence now: the probe shows carol, carol sees dave.
    dave.presence()
    assert dave.recv_presence(sender="carol@localhost/c").get("type") is None
    assert carol.recv_presence(sender="dave@localhost/d").get("type") is None
    # And a removal for a user without presence works too.
    bob = connect()
    bob.login("bob", resource="b")
    bob.get_roster()
    backend.contacts["bob"] = {}
    assert refresh(server, ["bob"]) == ok(1)
    assert {push_item(p)[3] for p in pushes(bob, 3)} == {"remove"}
    bob.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "presence"))
    ping_ok(bob)


def test_refresh_of_offline_user_refetches_the_cached_copy(server, backend, connect):
    alice = connect()
    alice.login("alice")
    alice.get_roster()
    alice.close()
    assert backend.requests_for("alice") == 1
    backend.contacts["alice"] = {"zoe@example.org": {"name": "Zoe"}}
    # Offline but cached (grace period): re-fetched; never cached: counted, no fetch.
    assert refresh(server, ["alice", "nobody"]) == ok(2)
    assert backend.requests_for("alice") == 2 and backend.requests_for("nobody") == 0
    # A page reload within the grace period finds the new roster; the login revalidates it
    # (issue 10 point 14): a conditional GET, answered 304, no second transfer of the roster.
    again = connect()
    again.login("alice", resource="again")
    assert items_of(again.get_roster()) == {"zoe@example.org": ("Zoe", (), "both")}
    assert backend.full_requests_for("alice") == 2 and backend.not_modified_for("alice") == 1


def test_failed_refresh_of_offline_cached_user_drops_the_stale_copy(server, backend, connect):
    alice = connect()
    alice.login("alice")
    alice.get_roster()
    alice.close()
    backend.set_fault("alice", "status", 500)
    assert refresh(server, ["alice"]) == ok(1)  # nothing stale is left: counted as updated
    assert "cached copy dropped" in server.log()
    backend.set_fault("alice", None)
    backend.contacts["alice"] = {"zoe@example.org": {"name": "Zoe"}}
    again = connect()
    again.login("alice", resource="again")
    assert items_of(again.get_roster()) == {"zoe@example.org": ("Zoe", (), "both")}
    assert backend.requests_for("alice") == 3


def test_overlapping_refreshes_push_each_change_once(server, backend, connect):
    alice = connect()
    alice.login("alice")
    alice.get_roster()
    backend.set_fault("alice", "slow", 1.5)
    backend.contacts["alice"] = {**DEMO["alice"], "zoe@example.org": {"name": "Zoe"}}
    first = gevent.spawn(refresh, server, ["alice"])
    wait_for(lambda: backend.requests_for("alice") == 2, what="the refresh's fetch at the backend")  # now in flight
    backend.set_fault("alice", None)
    backend.contacts["alice"] = {**backend.contacts["alice"], "yuri@example.org": {"name": "Yuri"}}
    # Two refreshes arriving while it runs share ONE follow-up fetch ...
    later = [gevent.spawn(refresh, server, ["alice"]) for _ in range(2)]
    gevent.joinall([first, *later], timeout=15, raise_error=True)
    assert [job.value for job in (first, *later)] == [ok(1)] * 3
    assert backend.requests_for("alice") == 3
    # ... and each change is pushed exactly once.
    got = pushes(alice, 2)
    assert [push_item(p)[0] for p in got] == ["zoe@example.org", "yuri@example.org"]
    ping_ok(alice)


# -- 6: backend failures -----------------------------------------------------------------------------

FAULTS = [
    # (fault, value, condition of the <error type='wait'/>)
    ("slow", 10, "remote-server-timeout"),
    ("trickle", 0.1, "remote-server-timeout"),
    ("status", 500, "internal-server-error"),
    ("status", 404, "internal-server-error"),
    ("html", None, "internal-server-error"),
    ("array", None, "internal-server-error"),
    ("malformed", None, "internal-server-error"),
    ("huge", 50, "internal-server-error"),
    ("huge-declared", 50, "internal-server-error"),
]
FAULT_IDS = [f"{kind}-{value}" if value is not None else kind for kind, value, _ in FAULTS]
FAULT_USERS = [f"{fid}-{t}".replace(".", "") for fid in FAULT_IDS for t in ("bosh", "websocket")]


@pytest.fixture(scope="module")
def fault_world(tmp_path_factory):
    """One backend + server for every fault case, one user per case (faults are per user)."""
    contacts = {user: {"friend@example.org": {"name": "Friend", "groups": ["Friends"]},
                       "other@example.org": {"name": "Other"}} for user in FAULT_USERS}
    backend = TestBackend(contacts).start()
    server = ServerProcess(
        tmp_path_factory.mktemp("faults"), users=FAULT_USERS, http_roster_url=backend.url_template,
        roster_connect_timeout=0.5, roster_read_timeout=0.5, roster_max_body=1048576,
        roster_retry_backoff=0.25, roster_retry_count=5, bosh_max_wait=5,
    ).start()
    yield server, backend
    server.stop()
    backend.stop()


FRIENDS = {"friend@example.org": ("Friend", ("Friends",), "both"), "other@example.org": ("Other", (), "both")}


@pytest.mark.parametrize("fault,value,condition", FAULTS, ids=FAULT_IDS)
def test_backend_fault_at_login_answers_wait_error_keeps_session_and_retries(fault_world, clients, transport, fault, value, condition):
    server, backend = fault_world
    user = f"{fault}-{value}-{transport}" if value is not None else f"{fault}-{transport}"
    user = user.replace(".", "")
    backend.set_fault(user, fault, value)
    client = clients(server, transport)
    client.login(user)
    started = time.monotonic()
    reply = client.get_roster(timeout=5)
    assert time.monotonic() - started < 3
    assert reply.get("type") == "error", ET.tostring(reply)
    assert error_of(reply) == ("wait", condition), ET.tostring(reply)
    # The session lives on.
    ping_ok(client)
    if fault in ("huge", "huge-declared"):
        assert backend.huge_bytes_sent(user) < 10 * 1048576  # refused while streaming, not buffered
    # The backend recovers: the background retry pushes the contacts.
    backend.set_fault(user, None)
    got = pushes(client, 2, timeout=8)
    assert {push_item(p) for p in got} == {(jid, *rest) for jid, rest in FRIENDS.items()}
    requests_so_far = backend.requests_for(user)
    assert items_of(client.get_roster()) == FRIENDS
    assert backend.requests_for(user) == requests_so_far  # now cached
    ping_ok(client)


def test_connection_refused_at_login_then_backend_comes_up(make_server, clients, transport):
    url = closed_port_url_template()
    port = int(url.split(":")[2].split("/")[0])
    server = make_server(http_roster_url=url, roster_retry_backoff=0.25, roster_retry_count=6, bosh_max_wait=5)
    client = clients(server, transport)
    client.login("alice")
    reply = client.get_roster()
    assert error_of(reply) == ("wait", "internal-server-error"), ET.tostring(reply)
    ping_ok(client)
    late = start_backend_on(port, DEMO)
    try:
        got = pushes(client, 3, timeout=8)
        assert {push_item(p) for p in got} == {(j, *rest) for j, rest in demo_items("alice").items()}
        assert late.requests_for("alice") == 1
        ping_ok(client)
    finally:
        late.stop()


def test_backend_fault_with_a_cached_roster_keeps_it(make_server, backend, clients):
    server = make_server(roster_read_timeout=0.5, refresh_timeout=5, bosh_max_wait=5)
    alice = login(clients, server, "websocket", "alice", "a")
    for fault, value in (("status", 500), ("slow", 10), ("malformed", None)):
        backend.set_fault("alice", fault, value)
        backend.contacts["alice"] = {"zoe@example.org": {}}  # never seen: the fetch fails
        assert refresh(server, ["alice"]) == ok(0, 1)
        alice.expect_nothing_queued(is_push)
        assert items_of(alice.get_roster()) == demo_items("alice")
        ping_ok(alice)
    # A new resource logging in meanwhile is served the cached roster too.
    other = login(clients, server, "bosh", "alice", "b", roster=False)
    assert items_of(other.get_roster()) == demo_items("alice")
    backend.set_fault("alice", None)
    backend.contacts["alice"] = DEMO["alice"]
    assert refresh(server, ["alice"]) == ok(1)
    alice.expect_nothing_queued(is_push)


def test_retry_reaches_the_resource_that_got_the_error_even_if_another_fetched_first(make_server, backend, clients, transport):
    server = make_server(roster_retry_backoff=1.0, roster_retry_count=3, bosh_max_wait=5)
    backend.set_fault("alice", "status", 500)
    first = login(clients, server, transport, "alice", "first", roster=False)
    assert error_of(first.get_roster()) == ("wait", "internal-server-error")
    backend.set_fault("alice", None)
    # Another tab logs in before the first retry and gets the roster at once ...
    second = login(clients, server, transport, "alice", "second", roster=False)
    assert items_of(second.get_roster()) == demo_items("alice")
    # ... the tab that got the error still receives the contacts, as pushes.
    got = pushes(first, 3, timeout=6)
    assert {push_item(p) for p in got} == {(j, *rest) for j, rest in demo_items("alice").items()}
    second.expect_nothing_queued(is_push)  # it already has them
    ping_ok(first)


def test_retry_success_brings_presence(make_server, backend, clients, transport):
    server = make_server(roster_retry_backoff=0.5, roster_retry_count=4, bosh_max_wait=5)
    bob = login(clients, server, transport, "bob", "b", presence=True)
    backend.set_fault("alice", "status", 503)
    alice = login(clients, server, transport, "alice", "a", roster=False)
    assert error_of(alice.get_roster()) == ("wait", "internal-server-error")
    alice.presence()
    ping_ok(alice)
    backend.set_fault("alice", None)
    assert len(pushes(alice, 3, timeout=6)) == 3
    # Once the roster is known, presence flows both ways.
    assert alice.recv_presence(sender="bob@localhost/b").get("type") is None
    assert bob.recv_presence(sender="alice@localhost/a").get("type") is None


# -- 7: subscriptions ----------------------------------------------------------------------------------


def test_subscription_stanzas_are_dropped(server, backend, connect, transport):
    alice = connect()
    alice.login("alice", resource="a")
    alice.get_roster()
    alice.presence()
    bob = connect()
    bob.login("bob", resource="b")
    bob.get_roster()
    bob.presence()
    alice.recv_presence(sender="bob@localhost/b")
    bob.recv_presence(sender="alice@localhost/a")
    for ptype in ("subscribe", "subscribed", "unsubscribe", "unsubscribed"):
        alice.presence(to="bob@localhost", type=ptype)
        alice.presence(to="bob@localhost/b", type=ptype)
        alice.presence(to="mallory@localhost", type=ptype)
    bob.expect_nothing_queued(lambda e: e.tag == q(NS_CLIENT, "presence") and e.get("type") is not None, after=[alice])
    alice.expect_nothing_queued(is_push)
    bob.expect_nothing_queued(is_push)
    # Nothing changed: same rosters, presence still flowing.
    assert items_of(alice.get_roster()) == demo_items("alice")
    assert items_of(bob.get_roster()) == demo_items("bob")
    alice.presence("<show>chat</show>")
    assert bob.recv_presence(sender="alice@localhost/a").findtext(q(NS_CLIENT, "show")) == "chat"
    assert "dropped unsubscribed presence" in server.log()


# -- 9: auth = "http" --------------------------------------------------------------------------------


class PasswordChecker:
    """The backend app's password check: 204 for alice/secret, 403 for anything else."""

    def __init__(self):
        self.calls: list[dict] = []
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None, error_log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/check"

    def app(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
        self.calls.append({"body": body, "method": environ["REQUEST_METHOD"], "type": environ.get("CONTENT_TYPE", "")})
        if body.get("username") == "alice" and body.get("password") == "secret":
            start_response("204 No Content", [])
        else:
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"no"]
        return []


def test_http_auth_plain_only_cached_and_refusals(make_server, backend, clients, transport):
    checker = PasswordChecker()
    try:
        server = make_server(auth="http", http_auth_url=checker.url, http_auth_cache_seconds=30, users=(), bosh_max_wait=5)

        def attempt(user, password, mechanism="PLAIN"):
            client = clients(server, transport)
            client.wait_features()
            assert client.mechanisms() == ["PLAIN"]
            return client, client.authenticate(user, password, mechanism)

        for user, password in (("alice", "wrong"), ("bob", "secret")):
            _, failure = attempt(user, password)
            assert failure.tag == q(NS_SASL, "failure") and failure.find(q(NS_SASL, "not-authorized")) is not None
        assert len(checker.calls) == 2
        client, scram = attempt("alice", "secret", "SCRAM-SHA-1")
        assert scram.tag == q(NS_SASL, "failure"), ET.tostring(scram)
        client, success = attempt("alice", "secret")
        assert success.tag == q(NS_SASL, "success"), ET.tostring(success)
        assert checker.calls[-1] == {"body": {"username": "alice", "password": "secret", "domain": "localhost"},
                                     "method": "POST", "type": "application/json"}
        client.restart()
        client.wait_features()
        client.bind("web")
        assert items_of(client.get_roster()) == demo_items("alice")
        calls = len(checker.calls)
        # Within http_auth_cache_seconds the right password is not checked again.
        again, success = attempt("alice", "secret")
        assert success.tag == q(NS_SASL, "success")
        assert len(checker.calls) == calls
        # A wrong password is never answered from the cache.
        _, failure = attempt("alice", "secret2")
        assert failure.find(q(NS_SASL, "not-authorized")) is not None
        assert len(checker.calls) == calls + 1
    finally:
        checker.server.stop(timeout=0)


def test_http_auth_backend_down_is_a_temporary_failure_not_a_wrong_password(make_server, clients, transport):
    from backend_app import closed_port_url_template

    server = make_server(auth="http", http_auth_url=closed_port_url_template().replace("%s", "check"),
                         http_auth_timeout=1.0, auth_failure_limit=2, auth_throttle_exempt=[], users=(), bosh_max_wait=5)
    for _ in range(3):  # more than auth_failure_limit: an outage must not lock people out
        client = clients(server, transport)
        client.wait_features()
        failure = client.authenticate("alice", "secret", "PLAIN")
        assert failure.find(q(NS_SASL, "temporary-auth-failure")) is not None, ET.tostring(failure)
    assert "could not reach" in server.log()

"""Issue 10 point 14: a login revalidates a roster kept through the grace period.

Before: a user who logged out and back in within ``roster_cache_grace`` got the
copy cached at the first login, even when the backend had changed the roster
meanwhile without a refresh (it may not know the user is cached); the next
refresh then pushed a diff against that stale copy.  Now the first resource
that binds (a login) makes the next roster get revalidate: a conditional GET
(``If-None-Match`` / ``If-Modified-Since``) when the backend sent an ETag or a
Last-Modified, a full GET otherwise; the cached copy is served only when the
backend cannot answer.  Concurrent logins of one user still share one GET.
That login fetch starts when the resource binds (as Prosody loads the roster
at bind), so the roster get that follows joins it instead of waiting a whole
GET after a client round trip; if it failed, that roster get gets its error
without a second GET.

Real server subprocesses, the real test backend (tests/backend_app.py: ETag
and Last-Modified support, a switch to turn them off, counters of conditional
and full GETs), raw BOSH and WebSocket clients.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import gevent
import pytest
import requests

from conftest import NAMES, USERS
from harness import NS_CLIENT, NS_ROSTER, BoshClient, WsClient, q

NS_PING = "urn:xmpp:ping"


def demo_items(user: str) -> dict:
    return {f"{o}@localhost": (NAMES[o], ("Friends",), "both") for o in USERS if o != user}


def items_of(iq: ET.Element) -> dict:
    query = iq.find(q(NS_ROSTER, "query"))
    assert query is not None, ET.tostring(iq)
    return {
        item.get("jid"): (item.get("name"), tuple(sorted(g.text for g in item.findall(q(NS_ROSTER, "group")))),
                          item.get("subscription"))
        for item in query.findall(q(NS_ROSTER, "item"))
    }


def is_push(el: ET.Element) -> bool:
    return el.tag == q(NS_CLIENT, "iq") and el.get("type") == "set" and el.find(q(NS_ROSTER, "query")) is not None


def refresh(server, users) -> dict:
    reply = requests.post(server.base_url + "/roster_admin/refresh", data=json.dumps(users), timeout=15)
    assert reply.status_code == 200, (reply.status_code, reply.text)
    return reply.json()


def ping_ok(client) -> None:
    reply = client.iq(f"<ping xmlns='{NS_PING}'/>")
    assert reply.get("type") == "result", ET.tostring(reply)


@pytest.fixture
def clients():
    """clients(server, kind) -> a new client; every one is stopped afterwards."""
    made = []

    def make(server, kind):
        client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.stop()
            if isinstance(client, BoshClient):
                client.http.close()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


def login(clients, server, kind, user="alice", resource="a", roster=True):
    """A logged-in client and its roster result (or None)."""
    client = clients(server, kind)
    client.login(user, resource=resource)
    reply = client.get_roster() if roster else None
    if reply is not None:
        assert reply.get("type") == "result", ET.tostring(reply)
    return client, reply


def other(kind: str) -> str:
    return "websocket" if kind == "bosh" else "bosh"


CHANGED = {"bob@localhost": {"name": "Bob (renamed)", "groups": ["Friends"]},
           "zoe@localhost": {"name": "Zoe", "groups": ["New"]}}
CHANGED_ITEMS = {"bob@localhost": ("Bob (renamed)", ("Friends",), "both"),
                 "zoe@localhost": ("Zoe", ("New",), "both")}


@pytest.mark.parametrize("validators", ["etag", "last-modified", None])
def test_relogin_within_grace_gets_the_roster_changed_meanwhile(make_server, backend, clients, transport, validators):
    backend.set_validators(validators)
    server = make_server(roster_cache_grace=60, bosh_max_wait=5)
    first, reply = login(clients, server, transport)
    assert items_of(reply) == demo_items("alice")
    first.close()
    # The backend changes alice's roster and sends no refresh (it does not know she is cached).
    backend.contacts["alice"] = CHANGED
    again, reply = login(clients, server, other(transport), resource="b")
    assert items_of(reply) == CHANGED_ITEMS
    assert backend.requests_for("alice") == 2
    # One revalidating GET: conditional when the backend sent a validator, full otherwise.
    assert backend.conditional_requests_for("alice") == (0 if validators is None else 1)
    assert backend.not_modified_for("alice") == 0
    if validators == "etag":
        assert backend.last_headers.get("HTTP_IF_NONE_MATCH", "").startswith('"')
    elif validators == "last-modified":
        assert backend.last_headers.get("HTTP_IF_MODIFIED_SINCE", "").endswith("GMT")
    else:
        assert "HTTP_IF_NONE_MATCH" not in backend.last_headers
        assert "HTTP_IF_MODIFIED_SINCE" not in backend.last_headers
    # A refresh with nothing changed since the login pushes nothing: the cache holds what the client
    # was given (before, it held the stale copy and this refresh pushed its diff: 2 pushes).
    assert refresh(server, ["alice"])["updated"] == 1
    again.expect_nothing(0.5, is_push)
    # Refreshes are full GETs: the backend said the roster changed.
    assert backend.conditional_requests_for("alice") == (0 if validators is None else 1)
    ping_ok(again)


@pytest.mark.parametrize("validators", ["etag", "last-modified", "both"])
def test_relogin_with_an_unchanged_roster_is_one_304(make_server, backend, clients, transport, validators):
    backend.set_validators(validators)
    server = make_server(roster_cache_grace=60, bosh_max_wait=5)
    first, _ = login(clients, server, transport)
    first.close()
    again, reply = login(clients, server, transport, resource="b")
    assert items_of(reply) == demo_items("alice")
    assert backend.requests_for("alice") == 2
    assert backend.conditional_requests_for("alice") == 1 and backend.not_modified_for("alice") == 1
    assert backend.full_requests_for("alice") == 1
    if validators == "both":  # RFC 9110 §13.1: a client sends both when it has both
        assert "HTTP_IF_NONE_MATCH" in backend.last_headers and "HTTP_IF_MODIFIED_SINCE" in backend.last_headers
    # The revalidated copy still takes refreshes: a change is pushed against it.
    backend.contacts["alice"] = dict(backend.contacts["alice"], **{"zoe@localhost": {"name": "Zoe"}})
    assert refresh(server, ["alice"])["updated"] == 1
    push = again.recv(5, is_push)
    assert items_of(push) == {"zoe@localhost": ("Zoe", (), "both")}
    again.expect_nothing(0.3, is_push)


def test_a_second_resource_is_not_a_login_and_does_not_revalidate(make_server, backend, clients, transport):
    server = make_server(roster_cache_grace=60, bosh_max_wait=5)
    first, _ = login(clients, server, transport)
    backend.contacts["alice"] = CHANGED  # no refresh: the online resource keeps its roster
    second, reply = login(clients, server, other(transport), resource="b")
    assert items_of(reply) == demo_items("alice")  # served from the cache, no GET
    assert backend.requests_for("alice") == 1
    ping_ok(first)


def test_backend_down_at_relogin_serves_the_cached_copy(make_server, backend, clients, transport):
    server = make_server(roster_cache_grace=60, roster_read_timeout=0.5, bosh_max_wait=5)
    first, _ = login(clients, server, transport)
    first.close()
    for fault, value in (("status", 500), ("slow", 5), ("malformed", None)):
        backend.set_fault("alice", fault, value)
        again, reply = login(clients, server, transport, resource=f"b{fault}")
        assert items_of(reply) == demo_items("alice"), fault  # not an error: the copy we have
        again.close()
    assert backend.requests_for("alice") == 4  # one revalidation per login, each failed
    backend.set_fault("alice", None)
    backend.stop()  # connection refused
    again, reply = login(clients, server, transport, resource="c")
    assert items_of(reply) == demo_items("alice")
    gevent.sleep(0.2)
    assert "serving the cached copy" in server.log()
    ping_ok(again)


def test_a_304_to_an_unconditional_get_is_an_error_not_a_roster(make_server, backend, clients, transport):
    server = make_server(roster_retry_count=0, bosh_max_wait=5)
    backend.set_fault("alice", "status", 304)
    client, _ = login(clients, server, transport, roster=False)
    reply = client.get_roster()
    assert reply.get("type") == "error", ET.tostring(reply)
    assert backend.conditional_requests_for("alice") == 0
    ping_ok(client)


def test_concurrent_relogins_share_one_revalidation(make_server, backend, clients, transport):
    server = make_server(roster_cache_grace=60, bosh_max_wait=5)
    first, _ = login(clients, server, transport)
    first.close()
    backend.contacts["alice"] = CHANGED
    backend.set_fault("alice", "slow", 1.0)  # keep the revalidation in flight while the others ask
    made = [clients(server, transport if i % 2 else other(transport)) for i in range(5)]

    def run(client, index):
        client.login("alice", resource=f"tab{index}")
        return items_of(client.get_roster(timeout=10))

    jobs = [gevent.spawn(run, client, i) for i, client in enumerate(made)]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert [job.value for job in jobs] == [CHANGED_ITEMS] * 5
    assert backend.requests_for("alice") == 2  # the first login's GET and one revalidation
    assert backend.conditional_requests_for("alice") == 1


def test_relogin_after_the_grace_period_is_a_full_get(make_server, backend, clients, transport):
    server = make_server(roster_cache_grace=0.5, bosh_max_wait=5)
    first, _ = login(clients, server, transport)
    first.close()
    gevent.sleep(1.0)  # evicted: nothing to revalidate, so no validator either
    again, reply = login(clients, server, transport, resource="b")
    assert items_of(reply) == demo_items("alice")
    assert backend.requests_for("alice") == 2 and backend.conditional_requests_for("alice") == 0
    ping_ok(again)


# -- the login's fetch starts at bind (as Prosody loads the roster at bind) -------------------------


def wait_for(predicate, timeout=5.0) -> bool:
    deadline = gevent.get_hub().loop.now() + timeout
    while not predicate():
        if gevent.get_hub().loop.now() > deadline:
            return False
        gevent.sleep(0.02)
    return True


def test_the_login_fetch_starts_at_bind_and_the_roster_get_joins_it(make_server, backend, clients, transport):
    server = make_server(bosh_max_wait=5)
    client, _ = login(clients, server, transport, roster=False)
    # Bound, no roster get sent yet: the GET is already under way (or done).
    assert wait_for(lambda: backend.requests_for("alice") == 1)
    assert items_of(client.get_roster()) == demo_items("alice")
    assert backend.requests_for("alice") == 1  # the roster get used it: no second GET
    # A relogin within the grace period revalidates at bind too: one conditional GET, then a 304.
    client.close()
    again, _ = login(clients, server, other(transport), resource="b", roster=False)
    assert wait_for(lambda: backend.conditional_requests_for("alice") == 1)
    assert items_of(again.get_roster()) == demo_items("alice")
    assert backend.requests_for("alice") == 2 and backend.not_modified_for("alice") == 1


def test_a_failed_fetch_at_bind_answers_the_roster_get_without_a_second_get(make_server, backend, clients, transport):
    server = make_server(roster_retry_count=0, bosh_max_wait=5)
    backend.set_fault("alice", "status", 500)
    client, _ = login(clients, server, transport, roster=False)
    assert wait_for(lambda: backend.requests_for("alice") == 1)
    gevent.sleep(0.2)  # the failure is in
    reply = client.get_roster()
    assert reply.get("type") == "error", ET.tostring(reply)
    assert backend.requests_for("alice") == 1
    # The next roster get (the error was served once) asks the backend again, which is back.
    backend.set_fault("alice", None)
    assert items_of(client.get_roster()) == demo_items("alice")
    assert backend.requests_for("alice") == 2


# -- issue 12: the login's fetch starts at SASL success, before the restart and bind -----------------


def authenticated(clients, server, kind, user="alice"):
    """A client that completed SASL (success) and nothing else."""
    client = clients(server, kind)
    client.wait_features()
    result = client.authenticate(user, "password")
    assert result.tag.endswith("success"), ET.tostring(result)
    return client


def bind_after_auth(client, resource="a"):
    client.restart()
    client.wait_features()
    return client.bind(resource)


def test_the_login_fetch_starts_at_authentication_and_bind_does_not_fetch_again(make_server, backend, clients, transport):
    server = make_server(bosh_max_wait=5)
    client = authenticated(clients, server, transport)
    # SASL succeeded, no restart yet: the GET is under way (or done).
    assert wait_for(lambda: backend.requests_for("alice") == 1)
    bind_after_auth(client)
    assert items_of(client.get_roster()) == demo_items("alice")
    assert backend.requests_for("alice") == 1  # bind and roster get used that one GET
    ping_ok(client)
    # A relogin within the grace period revalidates at its authentication: one conditional GET.
    client.close()
    again = authenticated(clients, server, other(transport))
    assert wait_for(lambda: backend.conditional_requests_for("alice") == 1)
    bind_after_auth(again, "b")
    assert items_of(again.get_roster()) == demo_items("alice")
    assert backend.requests_for("alice") == 2 and backend.not_modified_for("alice") == 1


def test_a_second_resource_authenticating_while_online_fetches_nothing(make_server, backend, clients, transport):
    server = make_server(bosh_max_wait=5)
    first, reply = login(clients, server, transport)
    assert backend.requests_for("alice") == 1
    second = authenticated(clients, server, other(transport))
    bind_after_auth(second, "b")
    assert items_of(second.get_roster()) == demo_items("alice")
    assert backend.requests_for("alice") == 1  # online already: the cached roster is current
    ping_ok(first)


def test_authentication_without_bind_then_a_later_login_revalidates(make_server, backend, clients, transport):
    """A stream that authenticates and ends before binding leaves a roster that is not
    trusted for a later login: the backend changed it meanwhile, the next login sees it."""
    server = make_server(bosh_max_wait=5, roster_cache_grace=60)
    quitter = authenticated(clients, server, transport)
    assert wait_for(lambda: backend.requests_for("alice") == 1)
    quitter.close()
    backend.contacts["alice"] = CHANGED
    client, reply = login(clients, server, other(transport), resource="b")
    assert items_of(reply) == CHANGED_ITEMS
    assert backend.requests_for("alice") == 2


def test_a_refresh_between_authentication_and_bind_is_not_lost(make_server, backend, clients, transport):
    """The backend changes the roster and says so while the login is between SASL and bind:
    the roster get answers the new roster."""
    server = make_server(bosh_max_wait=5)
    client = authenticated(clients, server, transport)
    assert wait_for(lambda: backend.requests_for("alice") == 1)
    backend.contacts["alice"] = CHANGED
    refresh(server, ["alice"])
    bind_after_auth(client)
    assert items_of(client.get_roster()) == CHANGED_ITEMS
    ping_ok(client)


def test_a_failed_fetch_at_authentication_answers_the_roster_get_without_a_second_get(make_server, backend, clients,
                                                                                      transport):
    server = make_server(roster_retry_count=0, bosh_max_wait=5)
    backend.set_fault("alice", "status", 500)
    client = authenticated(clients, server, transport)
    assert wait_for(lambda: backend.requests_for("alice") == 1)
    bind_after_auth(client)
    reply = client.get_roster()
    assert reply.get("type") == "error", ET.tostring(reply)
    assert backend.requests_for("alice") == 1

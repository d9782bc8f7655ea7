"""The roster data layer: Roster, RosterBackend, RosterCache, refresh validation."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import logging  # noqa: E402
import string  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import pytest  # noqa: E402

try:  # tests/ is not a package: pytest puts it on sys.path
    from backend_app import TestBackend, closed_port_url_template  # noqa: E402
    from harness import wait_for  # noqa: E402
except ImportError:  # pragma: no cover
    from tests.backend_app import TestBackend, closed_port_url_template  # noqa: E402
    from tests.harness import wait_for  # noqa: E402

from boshroster.xmpp.jid import JIDError, prep_localpart  # noqa: E402
from boshroster.roster.refresh import RefreshBadRequest, _prep_username, parse_refresh_body  # noqa: E402
from boshroster.web.access import check_access as check_refresh_access, client_address  # noqa: E402
from boshroster.roster.model import Roster, RosterFormatError, RosterItem  # noqa: E402
from boshroster.roster.backend import RosterBackend, RosterFetchError  # noqa: E402
from boshroster.roster.cache import RosterCache  # noqa: E402

ALICE = {
    "marie@example.com": {"name": "Marie", "groups": ["Friends"]},
    "michael@example.com": {"name": "Michael"},
}


# =============================================================================
# Roster
# =============================================================================

def parse(data, user="alice"):
    return Roster.from_backend_json(data, log_context=user)


def test_roster_from_contract_example():
    roster = parse(ALICE)
    assert len(roster) == 2
    assert roster["marie@example.com"] == RosterItem("marie@example.com", "Marie", ("Friends",))
    assert roster["michael@example.com"] == RosterItem("michael@example.com", "Michael", ())
    assert list(roster) == ["marie@example.com", "michael@example.com"]
    assert "marie@example.com" in roster and roster.get("nobody@x") is None
    assert dict(roster.items) == {i.jid: i for i in roster.items.values()}


def test_groups_as_array_and_as_object_are_equivalent():
    as_array = parse({"a@x": {"groups": ["Work", "Friends", "Work"]}})
    as_object = parse({"a@x": {"groups": {"Friends": True, "Work": True}}})
    assert as_array["a@x"].groups == ("Friends", "Work")  # sorted, deduplicated
    assert as_array == as_object
    assert as_array.ver == as_object.ver


def test_bad_jids_skipped_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="boshroster.roster")
    roster = parse({
        "good@example.com": {},
        "Upper@EXAMPLE.com": {"name": "Prepared"},
        "res@example.com/phone": {},
        "a@b@c": {},
        "": {},
        "@example.com": {},
        "sp ace@example.com": {},
        "example.org": {"name": "a server JID is a valid bare JID"},
    }, user="carol")
    assert sorted(roster) == ["example.org", "good@example.com", "upper@example.com"]
    text = caplog.text
    assert "'carol'" in text
    assert "res@example.com/phone" in text and "resource" in text
    assert "a@b@c" in text


def test_non_object_document_is_a_format_error():
    for data in ([], ["a@x"], "a@x", None, 42, True):
        with pytest.raises(RosterFormatError, match="expected a JSON object"):
            parse(data)
    assert len(parse({})) == 0


def test_lenient_values():
    roster = parse({
        "null@x": None,                                   # no details
        "php@x": [],                                      # PHP's empty array
        "noname@x": {"name": None, "groups": None},
        "emptyname@x": {"name": ""},
        "junkgroups@x": {"groups": ["ok", 3, None, "", {"a": 1}, "ok2"]},
        "ctrl@x": {"name": "Bad\x00Na\x1bme", "groups": ["G\x07", "\x01"]},
        "string@x": "Marie",                              # skipped
        "number@x": 3,                                    # skipped
        "list@x": ["Friends"],                            # skipped
        "intname@x": {"name": 42},                        # skipped
        "objname@x": {"name": {"first": "M"}},            # skipped
        "strgroups@x": {"groups": "Friends"},             # skipped
        "numgroups@x": {"groups": 5},                     # skipped
    })
    assert sorted(roster) == ["ctrl@x", "emptyname@x", "junkgroups@x", "noname@x",
                              "null@x", "php@x"]
    assert roster["null@x"] == RosterItem("null@x")
    assert roster["emptyname@x"].name is None
    assert roster["junkgroups@x"].groups == ("ok", "ok2")
    assert roster["ctrl@x"] == RosterItem("ctrl@x", "BadName", ("G",))


def test_duplicate_after_preparation_keeps_first():
    roster = parse({"Marie@example.com": {"name": "First"},
                    "marie@example.com": {"name": "Second"}})
    assert len(roster) == 1 and roster["marie@example.com"].name == "First"


def test_skip_logging_is_bounded(caplog):
    caplog.set_level(logging.INFO, logger="boshroster.roster")
    parse({f"bad{i}@x/r": {} for i in range(500)} | {"a@x": {"groups": [1] * 500}})
    assert len(caplog.records) < 30
    assert "500 contacts skipped" in caplog.text


def test_ver_is_stable_and_content_addressed():
    a = parse(ALICE)
    b = parse(dict(reversed(list(ALICE.items()))))
    assert a.ver == b.ver and a == b
    assert len(a.ver) == 16 and all(c in string.hexdigits for c in a.ver)
    renamed = parse({**ALICE, "michael@example.com": {"name": "Mike"}})
    regrouped = parse({**ALICE, "michael@example.com": {"name": "Michael", "groups": ["X"]}})
    assert len({a.ver, renamed.ver, regrouped.ver, Roster().ver}) == 4
    # Same value computed independently: not dependent on process hash seeds.
    assert parse(ALICE).ver == a.ver


def test_roster_is_immutable():
    roster = parse(ALICE)
    with pytest.raises(AttributeError):
        roster.ver = "x"
    with pytest.raises(TypeError):
        roster.items["x@y"] = RosterItem("x@y")
    with pytest.raises(AttributeError):
        roster["marie@example.com"].name = "x"


def test_diff_added_removed_changed():
    old = parse({"keep@x": {"name": "K"}, "gone@x": {"name": "G"},
                 "rename@x": {"name": "Old"}, "regroup@x": {"groups": ["A"]}})
    new = parse({"keep@x": {"name": "K"}, "new@x": {"name": "N", "groups": ["F"]},
                 "rename@x": {"name": "New"}, "regroup@x": {"groups": {"A": 1, "B": 1}}})
    diff = old.diff(new)
    assert diff.added == (RosterItem("new@x", "N", ("F",)),)
    assert diff.removed == (RosterItem("gone@x", "G"),)
    assert diff.changed == (RosterItem("regroup@x", None, ("A", "B")),
                            RosterItem("rename@x", "New"))
    assert diff
    assert not new.diff(parse({"keep@x": {"name": "K"}, "new@x": {"name": "N", "groups": ["F"]},
                               "rename@x": {"name": "New"},
                               "regroup@x": {"groups": ["B", "A"]}}))
    assert Roster().diff(old).added == tuple(old.items.values())


# =============================================================================
# RosterBackend against a real HTTP backend
# =============================================================================

@pytest.fixture
def backend():
    with TestBackend({"alice": ALICE}) as b:
        yield b


def client(backend, **kw):
    kw.setdefault("connect_timeout", 0.5)
    kw.setdefault("read_timeout", 0.3)
    return RosterBackend(backend.url_template if hasattr(backend, "url_template") else backend,
                         **kw)


def fetch_error(rb, username):
    started = time.monotonic()
    with pytest.raises(RosterFetchError) as info:
        rb.fetch(username)
    return info.value, time.monotonic() - started


def test_fetch_ok(backend):
    rb = client(backend)
    roster = rb.fetch("alice")
    assert roster == parse(ALICE)
    assert backend.requests_for("alice") == 1
    assert backend.last_headers["HTTP_ACCEPT"] == "application/json"
    assert len(rb.fetch("nobody")) == 0
    assert (rb.fetches, rb.failures) == (2, 0) and rb.total_latency > 0


def test_no_backend_configured_means_empty_rosters():
    rb = RosterBackend("")
    assert rb.fetch("alice") == Roster() and rb.failures == 0


def test_url_template_is_validated():
    with pytest.raises(ValueError):
        RosterBackend("http://app/contacts/")
    with pytest.raises(ValueError):
        RosterBackend("ftp://app/contacts/%s")


def test_username_is_url_encoded(backend):
    odd = "a b/c@d%é?#&+"
    backend.contacts[odd] = {"x@y": {}}
    roster = client(backend).fetch(odd)
    assert list(roster) == ["x@y"]
    assert backend.requests_for(odd) == 1
    assert backend.raw_paths[-1] == "/contacts/a%20b%2Fc%40d%25%C3%A9%3F%23%26%2B"


def test_connection_refused():
    rb = client(closed_port_url_template())
    err, elapsed = fetch_error(rb, "alice")
    assert err.reason == "connection"
    assert "127.0.0.1" in str(err)
    assert elapsed < 1.0
    assert (rb.fetches, rb.failures) == (1, 1)
    assert rb.last_error.startswith("connection: GET http://127.0.0.1:")


def test_backend_stopped(backend):
    rb = client(backend)
    rb.fetch("alice")  # a pooled keep-alive connection now exists
    backend.stop()
    err, _ = fetch_error(rb, "alice")
    assert err.reason == "connection"


def _one_reply_per_connection_backend():
    """A raw HTTP backend that answers one keep-alive reply per connection, then closes it:
    a kept-alive connection the backend dropped while it sat in the pool.  Returns
    (URL template, the list of accepted connections, the server)."""
    from gevent.server import StreamServer

    accepted = []
    body = b'{"x@y": {}}'

    def handle(sock, _addr):
        accepted.append(sock)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return
            buf += chunk
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    return f"http://127.0.0.1:{server.server_port}/contacts/%s", accepted, server


def test_pooled_connection_dropped_by_the_backend_is_not_reused():
    """The check before reusing a pooled connection (a real zero-timeout poll, no hub turn)
    sees the backend's close: the next fetch opens a new connection instead of failing."""
    url, accepted, server = _one_reply_per_connection_backend()
    try:
        rb = client(url)
        for n in range(1, 4):
            assert list(rb.fetch("alice")) == ["x@y"]
            wait_for(lambda: len(accepted) == n and accepted[-1].closed, timeout=5)
        assert rb.connections_opened == 3 and rb.failures == 0
    finally:
        server.stop()


def test_kept_alive_connection_is_reused(backend):
    rb = client(backend)
    for _ in range(5):
        rb.fetch("alice")
    assert rb.connections_opened == 1 and backend.connections == 1


def test_slow_past_read_timeout(backend, caplog):
    backend.set_fault("alice", "slow", 3)
    err, elapsed = fetch_error(client(backend), "alice")
    assert err.reason == "timeout"
    assert elapsed < 1.0
    assert "reason=timeout" in caplog.text and "'alice'" in caplog.text


def test_trickling_backend_hits_overall_deadline(backend):
    backend.set_fault("alice", "trickle", 0.05)  # each read well inside read_timeout
    rb = client(backend, total_timeout=0.6)
    err, elapsed = fetch_error(rb, "alice")
    assert err.reason == "timeout" and "0.6 s" in str(err)
    assert 0.5 < elapsed < 1.5


def test_default_overall_deadline_is_connect_plus_read_plus_a_little(backend):
    rb = client(backend)
    assert rb.total_timeout == pytest.approx(0.5 + 0.3 + 0.5)


@pytest.mark.parametrize("code", [500, 404, 302, 204])
def test_http_status_errors(backend, code):
    backend.set_fault("alice", "status", code)
    err, _ = fetch_error(client(backend), "alice")
    assert err.reason == "status" and err.status == code
    assert str(code) in str(err) and "/contacts/alice" in str(err)


@pytest.mark.parametrize("fault,expected", [
    ("html", "not JSON"), ("malformed", "not JSON"), ("array", "got an array")])
def test_bad_bodies_are_format_errors(backend, fault, expected):
    backend.set_fault("alice", fault)
    err, _ = fetch_error(client(backend), "alice")
    assert err.reason == "format"
    assert expected in str(err)
    if fault == "html":
        assert "text/html" in str(err)


def test_huge_body_refused_while_streaming(backend):
    backend.set_fault("alice", "huge", 50)
    rb = client(backend, max_body=1024 * 1024)
    tracemalloc.start()
    try:
        err, elapsed = fetch_error(rb, "alice")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.reason == "too-large"
    assert elapsed < 2.0
    assert peak < 8 * 1024 * 1024
    gevent.sleep(0.2)  # let the server notice the closed connection
    assert backend.huge_bytes_sent("alice") < 20 * 1024 * 1024
    # the client is still usable afterwards
    backend.set_fault("alice", None)
    assert len(rb.fetch("alice")) == 2


def test_huge_content_length_refused_up_front(backend):
    backend.set_fault("alice", "huge-declared", 50)
    err, elapsed = fetch_error(client(backend, max_body=1024 * 1024), "alice")
    assert err.reason == "too-large" and "Content-Length" in str(err)
    assert elapsed < 1.0
    gevent.sleep(0.2)
    assert backend.huge_bytes_sent("alice") < 20 * 1024 * 1024


def test_concurrency_is_bounded(backend):
    users = [f"u{i}" for i in range(6)]
    gate = gevent.event.Event()
    for user in users:
        backend.set_fault(user, "gate", gate)  # every GET waits at the backend until the gate opens
    rb = client(backend, max_concurrency=2, read_timeout=5)
    jobs = [gevent.spawn(rb.fetch, u) for u in users]
    wait_for(lambda: backend.in_progress == 2, what="two GETs at the backend")
    gevent.sleep(0)  # every fetch has run up to its slot wait
    assert rb.in_flight == 2 and not any(job.ready() for job in jobs)  # four wait for a slot
    gate.set()
    gevent.joinall(jobs, raise_error=True)
    # Counted by the backend as requests arrive and leave: never more than 2 at once, all served.
    assert backend.peak_in_progress == 2
    assert [backend.requests_for(u) for u in users] == [1] * 6


def test_waiting_for_a_slot_is_bounded(backend):
    gate = gevent.event.Event()
    backend.set_fault("slowpoke", "gate", gate)
    rb = client(backend, max_concurrency=1, read_timeout=2, queue_timeout=0.2)
    first = gevent.spawn(rb.fetch, "slowpoke")
    wait_for(lambda: backend.in_progress == 1, what="slowpoke's GET at the backend")  # it holds the slot
    err, elapsed = fetch_error(rb, "alice")
    assert err.reason == "timeout" and "slot" in str(err)
    assert elapsed < 0.5
    gate.set()
    first.get()


# =============================================================================
# RosterCache
# =============================================================================

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache(backend, clock):
    return RosterCache(client(backend, read_timeout=3), grace_seconds=30, clock=clock)


def test_single_flight_get(backend, cache):
    backend.set_fault("alice", "slow", 0.2)
    greenlets = [gevent.spawn(cache.get, "alice") for _ in range(20)]
    gevent.joinall(greenlets, raise_error=True)
    assert backend.requests_for("alice") == 1
    first = greenlets[0].value
    assert all(g.value is first for g in greenlets)
    assert cache.get("alice") is first
    assert backend.requests_for("alice") == 1


def test_single_flight_failure_is_shared_and_not_cached(backend, cache):
    backend.set_fault("alice", "status", 500)
    greenlets = [gevent.spawn(cache.get, "alice") for _ in range(20)]
    gevent.joinall(greenlets)
    assert backend.requests_for("alice") == 1
    assert all(isinstance(g.exception, RosterFetchError) for g in greenlets)
    assert greenlets[0].exception.reason == "status"
    assert cache.cached("alice") is None and not cache.fetching("alice")
    backend.set_fault("alice", None)
    assert len(cache.get("alice")) == 2
    assert backend.requests_for("alice") == 2


def test_refresh_during_inflight_fetch_chains_one_followup(backend, cache):
    backend.set_fault("alice", "slow", 0.3)
    login = gevent.spawn(cache.get, "alice")
    wait_for(lambda: backend.requests_for("alice") == 1, what="the login fetch")  # on the wire, with the old contacts
    backend.contacts["alice"] = {**ALICE, "new@example.com": {"name": "New"}}
    refreshes = [gevent.spawn(cache.refresh, "alice") for _ in range(3)]
    gevent.joinall([login] + refreshes, raise_error=True)
    assert backend.requests_for("alice") == 2  # one follow-up for three refreshes
    old, new = refreshes[0].value
    assert all(r.value is refreshes[0].value for r in refreshes)
    assert old is login.value and "new@example.com" not in old
    assert "new@example.com" in new
    assert cache.cached("alice") is new
    assert old.diff(new).added == (RosterItem("new@example.com", "New"),)


def test_refresh_joins_a_fetch_not_yet_started(backend, cache):
    a = gevent.spawn(cache.refresh, "alice")
    b = gevent.spawn(cache.refresh, "alice")  # both queued before any GET was sent
    gevent.joinall([a, b], raise_error=True)
    assert backend.requests_for("alice") == 1
    assert a.value is b.value and a.value[0] is None


def test_refresh_transitions_chain(backend, cache):
    r0 = cache.get("alice")
    backend.contacts["alice"] = {"x@y": {}}
    old, r1 = cache.refresh("alice")
    assert old is r0 and list(r1) == ["x@y"]
    backend.contacts["alice"] = ALICE
    old, r2 = cache.refresh("alice")
    assert old is r1 and r2 == r0
    assert backend.requests_for("alice") == 3


def test_refresh_failure_keeps_old_roster(backend, cache):
    r0 = cache.get("alice")
    backend.set_fault("alice", "malformed")
    with pytest.raises(RosterFetchError) as info:
        cache.refresh("alice")
    assert info.value.reason == "format"
    assert cache.cached("alice") is r0 and cache.get("alice") is r0


def test_grace_period_after_last_release(backend, cache, clock):
    cache.hold("alice")
    cache.hold("alice")  # two tabs
    r0 = cache.get("alice")
    clock.now += 1000
    assert cache.cached("alice") is r0  # held: never expires
    cache.release("alice")
    assert cache.is_held("alice")
    cache.release("alice")
    assert not cache.is_held("alice")
    clock.now += 29  # a page reload inside the grace period: a login, so revalidated
    cache.hold("alice")
    assert cache.get("alice") is r0  # 304 (the test backend sends an ETag): the same copy
    assert backend.requests_for("alice") == 2 and backend.not_modified_for("alice") == 1
    cache.release("alice")
    clock.now += 29
    assert cache.cached("alice") is r0
    clock.now += 2
    assert cache.cached("alice") is None and len(cache) == 0
    assert cache.get("alice") is not r0
    assert backend.requests_for("alice") == 3


def test_unheld_entries_are_evicted_too(backend, cache, clock):
    for i in range(50):
        cache.get(f"user{i}")  # e.g. refreshes or gets without hold
    assert len(cache) == 50
    clock.now += 31
    assert len(cache) == 0
    assert cache._heap == [] and cache._expiry == {}


def test_release_without_hold_is_harmless(cache, caplog):
    cache.release("nobody")
    assert not cache.is_held("nobody")
    assert "without a matching hold" in caplog.text


def test_drop(backend, cache):
    cache.get("alice")
    cache.drop("alice")
    assert cache.cached("alice") is None
    cache.get("alice")
    assert backend.requests_for("alice") == 2


def test_drop_during_fetch_discards_stale_result(backend, cache):
    backend.set_fault("alice", "slow", 0.2)
    first = gevent.spawn(cache.get, "alice")
    wait_for(lambda: backend.requests_for("alice") == 1, what="the first fetch")
    cache.drop("alice")  # e.g. the backend said alice's roster changed
    backend.contacts["alice"] = {"fresh@x": {}}
    second = gevent.spawn(cache.get, "alice")
    gevent.joinall([first, second], raise_error=True)
    assert "fresh@x" not in first.value  # the old fetch's waiter gets its data...
    assert list(second.value) == ["fresh@x"]  # ...a later get waits for fresh data
    assert list(cache.cached("alice")) == ["fresh@x"]
    assert backend.requests_for("alice") == 2


def test_killed_waiter_does_not_break_the_flight(backend, cache):
    backend.set_fault("alice", "slow", 0.2)
    doomed = gevent.spawn(cache.get, "alice")
    other = gevent.spawn(cache.get, "alice")
    wait_for(lambda: backend.requests_for("alice") == 1, what="the fetch both wait for")
    doomed.kill()
    assert len(other.get(timeout=2)) == 2
    assert backend.requests_for("alice") == 1


# =============================================================================
# parse_refresh_body
# =============================================================================

def bad_body(body, **kw):
    with pytest.raises(RefreshBadRequest) as info:
        parse_refresh_body(body, **kw)
    return info.value.message


def test_refresh_body_ok():
    assert parse_refresh_body(b'["john", "aaron"]') == ["john", "aaron"]
    assert parse_refresh_body(b"[]") == []
    assert parse_refresh_body(' \n["Ünïcode", "MiXeD"]\n'.encode()) == ["ünïcode", "mixed"]


def test_refresh_body_duplicates_removed_in_order():
    assert parse_refresh_body(b'["alice", "bob", "Alice", "alice", "carol", "BOB"]') == [
        "alice", "bob", "carol"]


def test_refresh_body_errors():
    assert bad_body(b"") == "empty body, expected a JSON array of usernames"
    assert "empty body" in bad_body(b"  \r\n")
    msg = bad_body(b'["john",\n "aaron"')
    assert msg.startswith("malformed JSON at line 2 column") and "char" in msg
    assert "malformed JSON at line 1 column 1" in bad_body(b"<html>")
    assert "UTF-8" in bad_body(b'["\xff\xfe\xfa"]')
    assert "nested too deeply" in bad_body(b"[" * 100000)
    for body, kind in [(b"null", "null"), (b"42", "a number"), (b'"john"', "a string"),
                       (b'{"users": ["john"]}', "an object"), (b"true", "a boolean")]:
        assert bad_body(body) == f"expected a JSON array of usernames, got {kind}"
    assert bad_body(b'["a", "b", "c", 3]') == "entry 3 is a number, expected a string"
    assert bad_body(b'["a", null]') == "entry 1 is null, expected a string"
    assert bad_body(b'[["a"]]') == "entry 0 is an array, expected a string"
    assert bad_body(b'[{"u": "a"}]') == "entry 0 is an object, expected a string"


@pytest.mark.parametrize("name", ["alice@example.com", "", "a b", "a/b", "x:y", "\u0007bell",
                                  "é" * 100_000])
def test_refresh_body_invalid_username(name):
    msg = bad_body(json.dumps(["ok", name]).encode())
    shown = json.dumps(name if len(name) <= 64 else name[:64] + "...")
    assert msg.startswith(f"entry 1 ({shown}) is not a valid username")


def test_refresh_body_size_limit_and_speed():
    body = json.dumps([f"user{i}" for i in range(100_000)]).encode()
    started = time.monotonic()
    assert bad_body(body) == "too many usernames: 100000, at most 10000 per request"
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    users = parse_refresh_body(body, max_users=100_000)
    assert time.monotonic() - started < 1.0
    assert len(users) == 100_000 and users[0] == "user0"


def test_ascii_fast_path_matches_prep_localpart():
    samples = [chr(c) for c in range(0x00, 0x80)]
    samples += ["Alice", "a.b-c_d", "MiXeD~!#$%()*+,;=?[]^`{|}", "x" * 1023, "x" * 1024,
                "Ab" * 300, "tab\there", "ümlaut", "ß", "İ"]
    for sample in samples:
        try:
            expected = prep_localpart(sample)
        except JIDError:
            expected = JIDError
        try:
            got = _prep_username(sample)
        except JIDError:
            got = JIDError
        assert got == expected, sample


# =============================================================================
# check_refresh_access / client_address
# =============================================================================

LOOPBACK = ["127.0.0.0/8", "::1/128"]


def access(peer="127.0.0.1", xff=None, proxies=(), allowed=LOOPBACK, secret=None, auth=None):
    return check_refresh_access(peer_ip=peer, forwarded_for=xff, trusted_proxies=list(proxies),
                                allowed_networks=list(allowed), secret=secret,
                                authorization=auth)


def test_access_by_network():
    assert access() is None
    assert access(peer="::1") is None
    assert access(peer="::ffff:127.0.0.1") is None  # dual-stack socket
    status, msg = access(peer="203.0.113.5")
    assert status == 403 and "203.0.113.5" in msg
    assert access(peer="10.1.2.3", allowed=["10.0.0.0/8"]) is None
    assert access(peer="10.1.2.3", allowed=["10.1.2.3"]) is None
    assert access(peer="127.0.0.1", allowed=[])[0] == 403  # empty whitelist: nobody
    assert access(peer="not-an-ip")[0] == 403
    assert access(peer="203.0.113.5", allowed=["0.0.0.0/0", "::/0"]) is None


def test_xff_ignored_from_untrusted_peer():
    # Spoofing: an outside peer claims to be localhost.
    assert access(peer="203.0.113.5", xff="127.0.0.1")[0] == 403
    assert access(peer="203.0.113.5", xff="127.0.0.1", proxies=["10.0.0.1"])[0] == 403
    assert client_address("203.0.113.5", "127.0.0.1", []) == "203.0.113.5"


def test_xff_walk_from_trusted_proxy():
    proxies = ["127.0.0.1", "10.0.0.0/8"]
    assert client_address("127.0.0.1", "198.51.100.7", proxies) == "198.51.100.7"
    # the client prepends a spoofed hop; the rightmost untrusted hop wins
    assert client_address("127.0.0.1", "127.0.0.1, 198.51.100.7", proxies) == "198.51.100.7"
    assert client_address("127.0.0.1", "198.51.100.7, 10.0.0.2", proxies) == "198.51.100.7"
    assert client_address("127.0.0.1", "10.0.0.3,10.0.0.2", proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", "198.51.100.7:5555", proxies) == "198.51.100.7"
    assert client_address("127.0.0.1", "[2001:db8::1]:443", proxies) == "2001:db8::1"
    assert client_address("127.0.0.1", "unknown", proxies) == "unknown"
    assert client_address("127.0.0.1", None, proxies) == "127.0.0.1"
    # behind a trusted proxy, the real client must be allowed itself
    assert access(peer="127.0.0.1", xff="198.51.100.7", proxies=proxies)[0] == 403
    assert access(peer="127.0.0.1", xff="10.0.0.9, 198.51.100.7", proxies=["127.0.0.1"],
                  allowed=["198.51.100.0/24"]) is None
    assert access(peer="127.0.0.1", xff="unknown", proxies=proxies)[0] == 403


def test_access_by_secret():
    assert access(secret="s3cret", auth=None) == (401, "missing Authorization: Bearer token")
    assert access(secret="s3cret", auth="Bearer wrong") == (401, "invalid bearer token")
    assert access(secret="s3cret", auth="Basic czNjcmV0")[0] == 401
    assert access(secret="s3cret", auth="Bearer ")[0] == 401
    assert access(secret="s3cret", auth="Bearer s3cret") is None
    assert access(secret="s3cret", auth="bearer  s3cret ") is None
    assert access(secret="sécret", auth="Bearer sécret") is None
    assert access(secret="", auth="Bearer ")[0] == 401  # an empty secret matches nothing
    # the network is checked first
    assert access(peer="203.0.113.5", secret="s3cret", auth="Bearer s3cret")[0] == 403


def test_bad_network_config_raises():
    with pytest.raises(ValueError):
        access(allowed=["not-a-network"])

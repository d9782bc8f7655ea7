"""Failed-login throttling (issue 10 point 13), end to end over BOSH and WebSocket.

Before: 5 wrong passwords from one address locked every login from it out for
60 s, correct passwords of other users included (a NAT'ed office is one
address).  Now: per (address, username) with backoff, plus a per-address
ceiling against spraying that spares users who have logged in from there.

Clients appear at other addresses through the trusted proxy on loopback
(``X-Forwarded-For``, with ``X-Forwarded-Proto: https`` so PLAIN is offered
as behind a TLS proxy); plain loopback clients are exempt by default.
The unit tests at the end drive AuthThrottle with an injected clock, for the
backoff arithmetic that would otherwise need minutes of waiting.
"""

import re
import time

import gevent
import pytest
import websocket

from boshroster.auth.throttle import AuthThrottle
from harness import NS_SASL, BoshClient, WsClient, XmppClient, q

OFFICE = "198.51.100.7"  # one NAT'ed office


class ProxiedWsClient(WsClient):
    """WsClient whose handshake carries a proxy's headers (harness.WsClient.__init__ plus ``header``)."""

    def __init__(self, url, headers):
        XmppClient.__init__(self)
        self.ws = websocket.create_connection(url, subprotocols=["xmpp"], timeout=10,
                                              header=[f"{k}: {v}" for k, v in headers.items()])
        self.close_status = None
        self.raw = []
        self._reader = gevent.spawn(self._read)
        self.open()


@pytest.fixture
def attempt(transport):
    made = []

    def make(server, user, password, address=OFFICE, mechanism="PLAIN", client=None):
        """One login attempt on a new stream (or ``client``'s); returns (client, SASL reply tag)."""
        headers = {} if address is None else {"X-Forwarded-For": address, "X-Forwarded-Proto": "https"}
        if client is None:
            if transport == "bosh":
                client = BoshClient(server.bosh_url, wait=5, start=False)
                client.http.headers.update(headers)
                client.create()
            else:
                client = ProxiedWsClient(server.ws_url, headers)
            made.append(client)
            client.wait_features()
        reply = client.authenticate(user, password, mechanism)
        condition = reply[0].tag.split("}")[1] if reply.tag == q(NS_SASL, "failure") else "success"
        return client, condition

    yield make
    for client in made:
        try:
            client.stop()
        except Exception:  # noqa: BLE001
            pass


def test_one_users_typos_do_not_lock_out_the_office(make_server, attempt):
    """The issue's case: six wrong passwords from one address, then another user logs in at once."""
    server = make_server()
    for _ in range(6):
        _, condition = attempt(server, "alice", "hunter2-wrong")
        assert condition in ("not-authorized", "temporary-auth-failure")
    started = time.monotonic()
    client, condition = attempt(server, "bob", "password")
    assert condition == "success"
    assert time.monotonic() - started < 2
    # bob's stream goes on to a bound session.
    client.restart()
    client.wait_features()
    assert client.bind("office") == "bob@localhost/office"
    # alice herself is locked, even with the right password, and told so.
    _, condition = attempt(server, "alice", "password")
    assert condition == "temporary-auth-failure"
    # alice from another address is not affected.
    _, condition = attempt(server, "alice", "password", address="203.0.113.9")
    assert condition == "success"
    log = server.log()
    assert re.search(r"WARNING .*5 failed logins for 'alice' from 198\.51\.100\.7; that pair is locked for 60 s", log)
    assert re.search(r"WARNING .*login throttled: 'alice' from 198\.51\.100\.7 has \d failed logins", log)
    assert "hunter2" not in log


def test_the_lockout_doubles_with_each_failure_and_ends(make_server, attempt):
    server = make_server(auth_failure_limit=2, auth_lockout_seconds=1.0, auth_lockout_max_seconds=3.0)
    for expected in ("not-authorized", "not-authorized", "temporary-auth-failure"):
        assert attempt(server, "carol", "wrong")[1] == expected
    assert "2 failed logins for 'carol' from 198.51.100.7; that pair is locked for 1 s" in server.log()
    time.sleep(1.2)
    assert attempt(server, "carol", "wrong")[1] == "not-authorized"  # the lock ended; a third failure ...
    assert "3 failed logins for 'carol' from 198.51.100.7; that pair is locked for 2 s" in server.log()
    time.sleep(1.2)
    assert attempt(server, "carol", "password")[1] == "temporary-auth-failure"  # ... doubled it
    time.sleep(1.0)
    assert attempt(server, "carol", "wrong")[1] == "not-authorized"
    assert "4 failed logins for 'carol' from 198.51.100.7; that pair is locked for 3 s" in server.log()  # capped
    time.sleep(3.2)
    # A success forgets the pair: the next typo does not lock it again at once.
    assert attempt(server, "carol", "password")[1] == "success"
    assert attempt(server, "carol", "wrong")[1] == "not-authorized"
    assert attempt(server, "carol", "password")[1] == "success"


def test_scram_logins_are_throttled_where_the_username_appears(make_server, attempt):
    """SCRAM names the user in client-first: a locked pair gets its failure instead of a challenge."""
    server = make_server(auth_failure_limit=3)
    for _ in range(3):
        assert attempt(server, "dave", "wrong", mechanism="SCRAM-SHA-256")[1] == "not-authorized"
    assert attempt(server, "dave", "password", mechanism="SCRAM-SHA-256")[1] == "temporary-auth-failure"
    assert attempt(server, "dave", "password", mechanism="SCRAM-SHA-1")[1] == "temporary-auth-failure"
    assert attempt(server, "alice", "password", mechanism="SCRAM-SHA-256")[1] == "success"


def test_spraying_many_usernames_hits_the_address_ceiling(make_server, attempt):
    server = make_server(auth_address_failure_limit=10)
    # bob logged in from the office before the spray.
    assert attempt(server, "bob", "password")[1] == "success"
    client = None
    for index in range(10):  # ten names, one guess each: no pair reaches its own limit
        client, condition = attempt(server, f"victim{index}", "Summer2024!", client=client)
        assert condition == "not-authorized", index
    assert "198.51.100.7 reached 10 failed logins in 3600 s" in server.log()
    # Now new names are refused without a password check, real users that never logged in from here too ...
    assert attempt(server, "victim99", "Summer2024!")[1] == "temporary-auth-failure"
    assert attempt(server, "no body", "Summer2024!")[1] == "temporary-auth-failure"  # not even a valid name
    assert attempt(server, "carol", "password")[1] == "temporary-auth-failure"
    # ... but bob, known at this address, still logs in; and other addresses are untouched.
    assert attempt(server, "bob", "password")[1] == "success"
    assert attempt(server, "carol", "password", address="203.0.113.9")[1] == "success"
    assert re.search(r"WARNING .*'victim99' from 198\.51\.100\.7 refused, the address reached 10 failed logins", server.log())


def test_loopback_is_never_throttled_by_default(make_server, attempt):
    server = make_server()
    for _ in range(8):
        assert attempt(server, "alice", "wrong", address=None)[1] == "not-authorized"
    assert attempt(server, "alice", "password", address=None)[1] == "success"
    assert "login throttled" not in server.log()


def test_loopback_is_throttled_when_not_exempt(make_server, attempt):
    server = make_server(auth_throttle_exempt=[], auth_failure_limit=2)
    for _ in range(2):
        assert attempt(server, "alice", "wrong", address=None)[1] == "not-authorized"
    assert attempt(server, "alice", "password", address=None)[1] == "temporary-auth-failure"
    assert attempt(server, "bob", "password", address=None)[1] == "success"


def test_throttling_off(make_server, attempt):
    server = make_server(auth_failure_limit=0)
    for _ in range(7):
        assert attempt(server, "alice", "wrong")[1] == "not-authorized"
    assert attempt(server, "alice", "password")[1] == "success"


def test_bad_exempt_network_stops_startup(tmp_path):
    from boshroster.config import ConfigError, load

    with pytest.raises(ConfigError, match="auth_throttle_exempt"):
        load(auth_throttle_exempt=["not-a-network"])


# -- AuthThrottle itself, with an injected clock --------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(**kw):
    clock = Clock()
    kw.setdefault("exempt", [])
    return AuthThrottle(clock=clock, **kw), clock


def test_unit_backoff_schedule_and_forgetting():
    throttle, clock = make(limit=3, window=900, lockout=60, lockout_max=900)
    locks = []
    for _ in range(8):
        assert throttle.check("10.0.0.1", "alice") is None
        throttle.failed("10.0.0.1", "alice")
        wait = throttle.check("10.0.0.1", "alice")
        locks.append(round(wait) if wait else 0)
        clock.now += wait or 1
    assert locks == [0, 0, 60, 120, 240, 480, 900, 900]
    # Quiet for the window after the last lockout ended: forgotten.
    clock.now += 901
    throttle.failed("10.0.0.1", "alice")
    assert throttle.check("10.0.0.1", "alice") is None


def test_unit_address_ceiling_slides():
    throttle, clock = make(limit=5, address_limit=3, address_window=100)
    for index in range(3):
        throttle.failed("10.0.0.2", f"u{index}")
        clock.now += 10
    assert throttle.check("10.0.0.2", "new") is not None
    assert throttle.check("10.0.0.3", "new") is None
    clock.now += 71  # the first failure (at t=0) leaves the window
    assert throttle.check("10.0.0.2", "new") is None


def test_unit_memory_is_bounded():
    throttle, _ = make(limit=5, max_entries=100)
    for index in range(1000):
        throttle.failed(f"10.1.{index // 256}.{index % 256}", f"user{index}")
        throttle.succeeded(f"10.2.{index // 256}.{index % 256}", f"user{index}")
    assert len(throttle._pairs) <= 100 and len(throttle._addresses) <= 100 and len(throttle._known) <= 100


def test_unit_ipv4_mapped_loopback_is_exempt():
    throttle = AuthThrottle(limit=1)
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        throttle.failed(address, "alice")
        assert throttle.check(address, "alice") is None
    throttle.failed("::ffff:10.0.0.1", "alice")
    assert throttle.check("::ffff:10.0.0.1", "alice") is not None

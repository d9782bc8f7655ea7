"""SASL server mechanisms, driven by scramp's real client and hand-built PLAIN messages."""

import base64
import logging

import pytest
import scramp
from scramp.core import Gs2Header

from boshroster.auth.accounts import AccountStore
from boshroster.auth.sasl import SaslExchange, SaslFailure, mechanisms_for

DOMAIN = "example.com"
PASSWORD = "s3cret-Pässword"
ALL = ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = AccountStore(str(tmp_path_factory.mktemp("sasl") / "accounts.sqlite3"))
    s.add("alice", PASSWORD)
    s.add("bob", "bob-password")
    yield s
    s.close()


class PasswordOnly:
    """Like an HTTP password checker: no SCRAM keys."""

    def __init__(self, users):
        self.users = users
        self.calls = []

    def check_password(self, username, password):
        self.calls.append(username)
        return self.users.get(username) == password


class Broken:
    iterations = 4096

    def scram_auth_info(self, username, mechanism):
        raise OSError("database is gone")

    def check_password(self, username, password):
        raise OSError("backend is down")


def scram_exchange(store, mech, username, password, initial_empty=False, client=None):
    """Run a full exchange; return (exchange, client) or raise SaslFailure."""
    client = client or scramp.ScramClient([mech], username, password)
    ex = SaslExchange(mech, store, DOMAIN, ALL)
    if initial_empty:
        assert ex.step(b"") == ("challenge", b"")
    kind, server_first = ex.step(client.get_client_first().encode())
    assert kind == "challenge"
    client.set_server_first(server_first.decode())
    kind, server_final = ex.step(client.get_client_final().encode())
    assert kind == "success"
    client.set_server_final(server_final.decode())  # verifies the server signature
    return ex, client


def failure(fn, *args):
    with pytest.raises(SaslFailure) as info:
        fn(*args)
    return info.value


# -- mechanisms_for -----------------------------------------------------------


def test_mechanisms_for(store):
    assert mechanisms_for(store, secure=True, allow_plain_insecure=False) == ALL
    assert mechanisms_for(store, secure=False, allow_plain_insecure=False) == ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    assert mechanisms_for(store, secure=False, allow_plain_insecure=True) == ALL
    pw = PasswordOnly({})
    assert mechanisms_for(pw, secure=True, allow_plain_insecure=False) == ["PLAIN"]
    assert mechanisms_for(pw, secure=False, allow_plain_insecure=False) == []
    assert mechanisms_for(pw, secure=False, allow_plain_insecure=True) == ["PLAIN"]
    for secure in (True, False):
        for allow in (True, False):
            assert not any(m.endswith("-PLUS") for m in mechanisms_for(store, secure, allow))


def test_invalid_mechanism(store):
    for mech, offered in [
        ("PLAIN", ["SCRAM-SHA-256", "SCRAM-SHA-1"]),
        ("SCRAM-SHA-1-PLUS", ALL),
        ("SCRAM-SHA-1-PLUS", ALL + ["SCRAM-SHA-1-PLUS"]),
        ("DIGEST-MD5", ALL + ["DIGEST-MD5"]),
        ("", ALL),
    ]:
        assert failure(SaslExchange, mech, store, DOMAIN, offered).condition == "invalid-mechanism"
    # SCRAM offered by mistake to an authenticator without SCRAM keys.
    assert failure(SaslExchange, "SCRAM-SHA-1", PasswordOnly({}), DOMAIN, ALL).condition == "invalid-mechanism"


# -- SCRAM --------------------------------------------------------------------


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_scram_success(store, mech):
    ex, _client = scram_exchange(store, mech, "alice", PASSWORD)
    assert ex.username == "alice"


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_scram_empty_initial_response(store, mech):
    ex, _client = scram_exchange(store, mech, "bob", "bob-password", initial_empty=True)
    assert ex.username == "bob"


def test_scram_username_is_prepared(store):
    ex, _client = scram_exchange(store, "SCRAM-SHA-256", "ALICE", PASSWORD)
    assert ex.username == "alice"


def test_scram_server_first_shape(store):
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD, c_nonce="clientnonce")
    ex = SaslExchange("SCRAM-SHA-256", store, DOMAIN, ALL)
    kind, server_first = ex.step(client.get_client_first().encode())
    parts = dict(p.split("=", 1) for p in server_first.decode().split(","))
    assert parts["r"].startswith("clientnonce") and len(parts["r"]) > len("clientnonce")
    assert base64.b64decode(parts["s"]) == store.scram_auth_info("alice", "SCRAM-SHA-256")[0]
    assert int(parts["i"]) >= 4096


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_scram_wrong_password(store, mech):
    client = scramp.ScramClient([mech], "alice", "wrong")
    ex = SaslExchange(mech, store, DOMAIN, ALL)
    _kind, server_first = ex.step(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    f = failure(ex.step, client.get_client_final().encode())
    assert f.condition == "not-authorized"
    assert ex.username is None
    # The exchange is over: nothing more is accepted.
    assert failure(ex.step, b"anything").condition == "malformed-request"


def _first_fields(store, mech, user):
    client = scramp.ScramClient([mech], user, "whatever", c_nonce="fixednonce")
    ex = SaslExchange(mech, store, DOMAIN, ALL)
    kind, server_first = ex.step(client.get_client_first().encode())
    assert kind == "challenge"
    fields = [p.split("=", 1) for p in server_first.decode().split(",")]
    client.set_server_first(server_first.decode())
    f = failure(ex.step, client.get_client_final().encode())
    return fields, f


@pytest.mark.parametrize("mech", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_scram_unknown_user_same_shape_as_wrong_password(store, mech):
    known, known_failure = _first_fields(store, mech, "alice")
    unknown, unknown_failure = _first_fields(store, mech, "nobody")
    invalid, invalid_failure = _first_fields(store, mech, "no body")  # not even a localpart
    for fields in (unknown, invalid):
        assert [k for k, _ in fields] == [k for k, _ in known] == ["r", "s", "i"]
        assert len(base64.b64decode(fields[1][1])) == len(base64.b64decode(known[1][1]))
        assert fields[2][1] == known[2][1]  # same iteration count
    for f in (known_failure, unknown_failure, invalid_failure):
        assert f.condition == "not-authorized"
        assert str(f) == str(known_failure)
    # An unknown user's salt is stable across attempts (no tell-tale random salt).
    again, _ = _first_fields(store, mech, "nobody")
    assert again[1] == unknown[1]


def test_scram_channel_binding_p_refused(store):
    ex = SaslExchange("SCRAM-SHA-256", store, DOMAIN, ALL)
    f = failure(ex.step, b"p=tls-unique,,n=alice,r=abcdefghijkl")
    assert f.condition == "not-authorized"
    ex = SaslExchange("SCRAM-SHA-1", store, DOMAIN, ALL)
    f = failure(ex.step, b"p=tls-server-end-point,,n=alice,r=abcdefghijkl")
    assert f.condition == "not-authorized"


def test_scram_gs2_y_accepted(store):
    # A client that supports channel binding but thinks we don't sends 'y'.
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
    client.gs2_header = Gs2Header("y", None)
    first = client.get_client_first()
    assert first.startswith("y,,")
    ex, _ = scram_exchange(store, "SCRAM-SHA-256", "alice", PASSWORD, client=_Replay(client, first))
    assert ex.username == "alice"


class _Replay:
    """Wraps a ScramClient whose get_client_first() was already called."""

    def __init__(self, client, first):
        self.client, self.first = client, first

    def get_client_first(self):
        return self.first

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_scram_authzid_refused(store):
    # scramp refuses any non-empty GS2 authzid, even the user's own bare JID.
    ex = SaslExchange("SCRAM-SHA-256", store, DOMAIN, ALL)
    f = failure(ex.step, b"n,a=alice@example.com,n=alice,r=abcdefghijkl")
    assert f.condition == "not-authorized"


@pytest.mark.parametrize(
    "first",
    [b"hello", b"n,,", b"n,,r=abc", b"x,,n=alice,r=abc", b"n,,n=alice", b"\xff\xfe", b"n,,n=al\xffice,r=abc"],
)
def test_scram_malformed_client_first(store, first):
    ex = SaslExchange("SCRAM-SHA-1", store, DOMAIN, ALL)
    assert failure(ex.step, first).condition == "malformed-request"


def test_scram_malformed_client_final(store):
    client = scramp.ScramClient(["SCRAM-SHA-1"], "alice", PASSWORD)
    ex = SaslExchange("SCRAM-SHA-1", store, DOMAIN, ALL)
    ex.step(client.get_client_first().encode())
    assert failure(ex.step, b"c=biws,r=nonce").condition == "malformed-request"


def test_scram_tampered_nonce(store):
    client = scramp.ScramClient(["SCRAM-SHA-1"], "alice", PASSWORD)
    ex = SaslExchange("SCRAM-SHA-1", store, DOMAIN, ALL)
    _k, server_first = ex.step(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    final = client.get_client_final()
    fields = final.split(",")
    fields[1] = fields[1] + "x"
    assert failure(ex.step, ",".join(fields).encode()).condition == "not-authorized"


def test_scram_backend_error_is_temporary(store):
    client = scramp.ScramClient(["SCRAM-SHA-1"], "alice", PASSWORD)
    ex = SaslExchange("SCRAM-SHA-1", Broken(), DOMAIN, ALL)
    assert failure(ex.step, client.get_client_first().encode()).condition == "temporary-auth-failure"


# -- PLAIN --------------------------------------------------------------------


def plain(store, data, mech_offered=ALL):
    ex = SaslExchange("PLAIN", store, DOMAIN, mech_offered)
    return ex, ex.step(data)


def test_plain_good(store):
    pw = PASSWORD.encode()
    for data in (
        b"\0alice\0" + pw,
        b"alice@example.com\0alice\0" + pw,
        b"Alice@EXAMPLE.com\0ALICE\0" + pw,
        b"alice@example.com.\0alice\0" + pw,
    ):
        ex, result = plain(store, data)
        assert result == ("success", None)
        assert ex.username == "alice"


def test_plain_empty_initial_response(store):
    ex = SaslExchange("PLAIN", store, DOMAIN, ALL)
    assert ex.step(b"") == ("challenge", b"")
    assert ex.step(b"\0bob\0bob-password") == ("success", None)
    assert ex.username == "bob"


def test_plain_empty_after_challenge_is_malformed(store):
    ex = SaslExchange("PLAIN", store, DOMAIN, ALL)
    ex.step(b"")
    assert failure(ex.step, b"").condition == "malformed-request"


def test_plain_bad(store):
    pw = PASSWORD.encode()
    cases = {
        b"\0alice\0wrong": "not-authorized",
        b"\0nobody\0" + pw: "not-authorized",
        b"\0no body\0" + pw: "not-authorized",
        b"bob@example.com\0alice\0" + pw: "not-authorized",  # authzid mismatch
        b"alice@other.org\0alice\0" + pw: "not-authorized",
        b"alice@example.com/res\0alice\0" + pw: "not-authorized",
        b"example.com\0alice\0" + pw: "not-authorized",
        b"@@\0alice\0" + pw: "not-authorized",
        b"alice\0" + pw: "malformed-request",
        b"\0alice\0pw\0extra": "malformed-request",
        b"\0alice\0": "malformed-request",
        b"\0\0" + pw: "malformed-request",
        b"\0al\xffice\0" + pw: "malformed-request",
        b"garbage": "malformed-request",
    }
    for data, condition in cases.items():
        ex = SaslExchange("PLAIN", store, DOMAIN, ALL)
        f = failure(ex.step, data)
        assert f.condition == condition, data
        assert ex.username is None
        assert PASSWORD not in str(f) and "wrong" not in str(f)


def test_plain_with_password_only_authenticator():
    auth = PasswordOnly({"carol": "pw"})
    offered = mechanisms_for(auth, secure=True, allow_plain_insecure=False)
    ex = SaslExchange("PLAIN", auth, DOMAIN, offered)
    assert ex.step(b"\0Carol\0pw") == ("success", None)
    assert auth.calls == ["carol"]  # the checker gets the prepared localpart
    ex = SaslExchange("PLAIN", auth, DOMAIN, offered)
    assert failure(ex.step, b"\0carol\0nope").condition == "not-authorized"


def test_plain_backend_error_is_temporary(caplog):
    caplog.set_level(logging.DEBUG)
    ex = SaslExchange("PLAIN", Broken(), DOMAIN, ALL)
    assert failure(ex.step, b"\0alice\0TopSecret").condition == "temporary-auth-failure"
    assert "TopSecret" not in caplog.text


def test_no_password_in_logs(store, caplog):
    caplog.set_level(logging.DEBUG)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", "WrongSecret")
    ex = SaslExchange("SCRAM-SHA-256", store, DOMAIN, ALL)
    _k, sf = ex.step(client.get_client_first().encode())
    client.set_server_first(sf.decode())
    failure(ex.step, client.get_client_final().encode())
    failure(SaslExchange("PLAIN", store, DOMAIN, ALL).step, b"\0alice\0WrongSecret")
    assert "WrongSecret" not in caplog.text


def test_failure_conditions_are_validated():
    with pytest.raises(ValueError):
        SaslFailure("bogus")
    assert SaslFailure("aborted").condition == "aborted"


# -- throttling hooks (issue 10 point 13; end to end in test_throttle.py) ------------------------


def test_exchange_throttles_the_named_user(store):
    from boshroster.auth.throttle import AuthThrottle

    throttle = AuthThrottle(limit=2, exempt=[])
    for _ in range(2):
        ex = SaslExchange("PLAIN", store, DOMAIN, ALL, throttle=throttle, address="10.0.0.1")
        assert failure(ex.step, b"\0Alice\0wrong").condition == "not-authorized"
        assert ex.attempted == "alice"  # counted under the prepared name
    # alice is locked before her password is even checked; bob is not.
    ex = SaslExchange("PLAIN", store, DOMAIN, ALL, throttle=throttle, address="10.0.0.1")
    f = failure(ex.step, b"\0alice\0" + PASSWORD.encode())
    assert f.condition == "temporary-auth-failure" and f.text
    ex = SaslExchange("PLAIN", store, DOMAIN, ALL, throttle=throttle, address="10.0.0.1")
    assert ex.step(b"\0bob\0bob-password") == ("success", None)
    # SCRAM: the lock answers the client-first.
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
    ex = SaslExchange("SCRAM-SHA-256", store, DOMAIN, ALL, throttle=throttle, address="10.0.0.1")
    assert failure(ex.step, client.get_client_first().encode()).condition == "temporary-auth-failure"
    # Malformed requests and backend outages are nobody's failed password.
    for data in (b"garbage", b"\0\0x"):
        failure(SaslExchange("PLAIN", store, DOMAIN, ALL, throttle=throttle, address="10.0.0.2").step, data)
    failure(SaslExchange("PLAIN", Broken(), DOMAIN, ALL, throttle=throttle, address="10.0.0.2").step, b"\0x\0y")
    assert throttle.check("10.0.0.2", "x") is None and not throttle._pairs.get(("10.0.0.2", "x"))

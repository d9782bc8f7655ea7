"""Token login (issue 13 items 1 and 4): a JWT as the SASL PLAIN password, end to end.

Real servers with ``jwt_key`` (an HS256 secret, RSA / EC / Ed25519 PEM public
keys, a JWK set), raw BOSH and WebSocket clients sending the token as the PLAIN
password.  Every bad token is refused with ``<not-authorized/>``, its reason is
in the server log and the token is not.  TokenState (revocation, single use)
is also tested directly at the end: the app's API that will call it is
another task.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from boshroster.auth.token_state import TokenState
from boshroster.auth.tokens import TokenRefused, TokenVerifier, load_keys, looks_like_jwt
from boshroster.config import ConfigError, load
from harness import NS_SASL, ROOT, BoshClient, WsClient, q

SECRET = secrets.token_urlsafe(48)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(user="alice", domain="localhost", **extra):
    now = int(time.time())
    out = {"jid": f"{user}@{domain}", "iat": now, "exp": now + 300}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def hs256(payload, secret=SECRET, headers=None):
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)


def hand_made(header: dict, payload: dict, sign=None) -> str:
    """A JWS assembled by hand (for what PyJWT refuses to produce)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if sign is None else sign(signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


def tampered(token: str) -> str:
    head, sig = token.rsplit(".", 1)
    return f"{head}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"


def signed_raw(payload: bytes, secret=SECRET) -> str:
    signing_input = f"{b64(json.dumps({'alg': 'HS256'}).encode())}.{b64(payload)}"
    return f"{signing_input}.{b64(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key files: an HS256 secret, RSA / EC P-256 / Ed25519 PEM public keys, a JWK set."""
    folder = tmp_path_factory.mktemp("keys")
    made = {"dir": folder}
    (folder / "secret").write_text(SECRET + "\n")
    made["secret"] = str(folder / "secret")
    pems = {"rsa": rsa.generate_private_key(65537, 2048), "ec": ec.generate_private_key(ec.SECP256R1()),
            "ed": ed25519.Ed25519PrivateKey.generate()}
    for name, private in pems.items():
        pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        (folder / f"{name}.pem").write_bytes(pem)
        made[name] = private
        made[f"{name}_pem"] = str(folder / f"{name}.pem")
        made[f"{name}_pem_bytes"] = pem
    second = rsa.generate_private_key(65537, 2048)
    made["rsa2"] = second
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(made["rsa"].public_key())), "kid": "one", "use": "sig"},
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(second.public_key())), "kid": "two", "alg": "RS256"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(made["ec"].public_key())), "kid": "ec"},
    ]}
    (folder / "jwks.json").write_text(json.dumps(jwks))
    made["jwks"] = str(folder / "jwks.json")
    return made


@pytest.fixture
def login(transport):
    made = []

    def attempt(server, user, password, client=None):
        """PLAIN login attempt; returns (client, 'success' or the failure condition)."""
        if client is None:
            client = BoshClient(server.bosh_url, wait=5) if transport == "bosh" else WsClient(server.ws_url)
            made.append(client)
            client.wait_features()
        reply = client.authenticate(user, password, "PLAIN")
        return client, "success" if reply.tag == q(NS_SASL, "success") else reply[0].tag.split("}")[1]

    yield attempt
    for client in made:
        try:
            client.stop()
        except Exception:  # noqa: BLE001
            pass


def assert_refused(server, login, user, token, reason, client=None):
    """Refused with not-authorized, and the log lines this attempt added give ``reason``."""
    before = len(server.log())
    client, condition = login(server, user, token, client=client)
    assert condition == "not-authorized", (reason, condition)
    log = server.log()[before:]
    assert re.search(rf"WARNING .*token login refused for '{user}': {re.escape(reason)}", log), (reason, log[-2000:])
    assert token[-40:] not in log and token[:60] not in log  # never the token
    return client


# -- the good path ------------------------------------------------------------------------


def test_token_login_then_bind_and_roster_and_passwords_still_work(make_server, keys, login):
    server = make_server(jwt_key=keys["secret"])
    client, condition = login(server, "alice", hs256(claims()))
    assert condition == "success"
    client.restart()
    client.wait_features()
    assert client.bind("t") == "alice@localhost/t"
    assert len(client.get_roster().find("{jabber:iq:roster}query")) == 3
    # Password logins keep working for accounts that have one, SCRAM and PLAIN.
    other = BoshClient(server.bosh_url, wait=5)
    other.wait_features()
    assert other.mechanisms() == ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
    assert other.authenticate("bob", "password", "SCRAM-SHA-256").tag == q(NS_SASL, "success")
    other.stop()
    assert login(server, "carol", "password")[1] == "success"
    # A token user needs no account.
    assert login(server, "zoe", hs256(claims("zoe")))[1] == "success"


@pytest.mark.parametrize("kind,alg", [("rsa", "RS256"), ("rsa", "PS384"), ("ec", "ES256"), ("ed", "EdDSA")])
def test_public_key_tokens(make_server, keys, login, kind, alg, transport):
    if transport == "websocket" and alg != "RS256":
        pytest.skip("the key types are transport-independent: one transport is enough")
    server = make_server(jwt_key=keys[f"{kind}_pem"])
    assert login(server, "alice", jwt.encode(claims(), keys[kind], algorithm=alg))[1] == "success"
    other = {"rsa": rsa.generate_private_key(65537, 2048), "ec": ec.generate_private_key(ec.SECP256R1()),
             "ed": ed25519.Ed25519PrivateKey.generate()}[kind]
    assert_refused(server, login, "alice", jwt.encode(claims(), other, algorithm=alg), "bad signature")


def test_jwk_set_with_kids(make_server, keys, login):
    server = make_server(jwt_key=keys["jwks"])
    assert login(server, "alice", jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "one"}))[1] == "success"
    assert login(server, "bob", jwt.encode(claims("bob"), keys["rsa2"], "RS256", headers={"kid": "two"}))[1] == "success"
    assert login(server, "carol", jwt.encode(claims("carol"), keys["ec"], "ES256", headers={"kid": "ec"}))[1] == "success"
    # No kid: every key for the algorithm is tried.
    assert login(server, "dave", jwt.encode(claims("dave"), keys["rsa2"], "RS256"))[1] == "success"
    client = assert_refused(server, login, "alice", jwt.encode(claims(), keys["rsa"], "RS256", headers={"kid": "nine"}),
                            "unknown kid")
    # Key "two" is RS256 only (its "alg"); key one signs PS256 fine, but under kid two it does not verify.
    assert_refused(server, login, "alice", jwt.encode(claims(), keys["rsa"], "PS256", headers={"kid": "two"}),
                   "unknown kid", client)
    assert_refused(server, login, "alice", jwt.encode(claims(), keys["rsa2"], "RS256", headers={"kid": "one"}),
                   "bad signature", client)


def test_clock_skew_within_the_leeway_is_accepted(make_server, keys, login):
    server = make_server(jwt_key=keys["secret"], jwt_leeway=30.0)
    now = int(time.time())
    assert login(server, "alice", hs256(claims(iat=now + 20, nbf=now + 20)))[1] == "success"
    assert login(server, "alice", hs256(claims(exp=now - 20)))[1] == "success"


# -- bad input: each refused with not-authorized, its reason logged, never the token ---------------


def test_bad_tokens(make_server, keys, login):
    server = make_server(jwt_key=keys["secret"])
    now = int(time.time())
    cases = [
        (hs256(claims(exp=now - 120)), "expired (exp is past)"),
        (hs256(claims(nbf=now + 600)), "not yet valid (nbf or iat in the future)"),
        (hs256(claims(iat=now + 600)), "not yet valid (nbf or iat in the future)"),
        (hs256(claims(exp=None)), "no exp claim"),
        (hs256(claims(exp="tomorrow")), "malformed token"),
        (hs256(claims(iat="yesterday")), "iat is not a number"),
        (hs256(claims("bob")), "the 'jid' claim names another user"),
        (hs256(claims(domain="evil.example")), "the 'jid' claim is for another domain"),
        (hs256(claims(jid=None)), "no 'jid' claim (a JID string)"),
        (hs256(claims(jid=["alice@localhost"])), "no 'jid' claim (a JID string)"),
        (hs256(claims(jid="al ice@localhost")), "the 'jid' claim is not a valid JID"),
        (hs256(claims(aud="another-service")), "has an aud claim (tokens for another audience are refused)"),
        (hs256(claims(), secret=secrets.token_urlsafe(48)), "bad signature"),
        (hs256(claims())[:-6], "malformed token"),  # truncated signature: not base64url any more
        (tampered(hs256(claims())), "bad signature"),  # one signature character changed
        (hs256(claims()).rsplit(".", 1)[0] + ".", "bad signature"),  # no signature at all
        (hand_made({"alg": "none", "typ": "JWT"}, claims()), "algorithm 'none' not allowed (allowed: HS256, HS384, HS512)"),
        (hand_made({"alg": "None"}, claims()), "algorithm 'None' not allowed"),
        (hand_made({"alg": "RS256"}, claims(), lambda m: b"x" * 256), "algorithm 'RS256' not allowed"),
        (hand_made({"alg": 5}, claims()), "algorithm '?' not allowed"),
        (signed_raw(b"not json"), "malformed token"),  # a good signature over a payload that is not JSON
        (signed_raw(b"[1, 2]"), "malformed token"),
        (b64(b'{"alg":"HS256"}') + "." + b64(b"not json") + "." + b64(b"sig"), "bad signature"),
        (b64(b'{"alg":"HS256"}') + ".x.", "malformed token (not three base64url parts with a JSON header)"),
        (b64(b'{"alg":"HS256"') + ".x.y", None),  # header not JSON: not a token, a password (refused)
        ("eyJhbGciOiJIUzI1NiJ9." + "A" * 120_000 + ".sig", "token too long (120025 characters, at most 8192)"),
    ]
    client = None
    for token, reason in cases:
        if reason is None:
            before = len(server.log())
            client, condition = login(server, "alice", token, client)
            assert condition == "not-authorized" and "token login refused" not in server.log()[before:]
            continue
        client = assert_refused(server, login, "alice", token, reason, client)
    # The stream is still usable; HS512 is allowed for a secret too.
    assert login(server, "alice", jwt.encode(claims(), SECRET, algorithm="HS512"), client)[1] == "success"


def test_malformed_tokens_with_password_logins_off(make_server, keys, login):
    server = make_server(jwt_key=keys["secret"], password_logins=False)
    client = BoshClient(server.bosh_url, wait=5)
    client.wait_features()
    assert client.mechanisms() == ["PLAIN"]  # no SCRAM: nothing to check a token against
    client.stop()
    c = None
    for token in ("password", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9", "x" * 8000):
        c = assert_refused(server, login, "alice", token, "not a JWT", c)
    c = assert_refused(server, login, "alice", "x" * 50_000, "token too long (50000 characters, at most 8192)", c)
    assert login(server, "alice", hs256(claims()), c)[1] == "success"


def test_hs256_token_against_an_rsa_public_key(make_server, keys, login):
    """The classic confusion: an HS256 token 'signed' with the server's public key as the secret."""
    server = make_server(jwt_key=keys["rsa_pem"])
    pem = keys["rsa_pem_bytes"]
    forged = hand_made({"alg": "HS256", "typ": "JWT"}, claims(),
                       lambda m: hmac.new(pem, m, hashlib.sha256).digest())
    client = assert_refused(server, login, "alice", forged,
                            "algorithm 'HS256' not allowed (allowed: PS256, PS384, PS512, RS256, RS384, RS512)")
    # Nor with the key's DER, or with a JWK rendering of it.
    der = keys["rsa"].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    forged = hand_made({"alg": "HS256"}, claims(), lambda m: hmac.new(der, m, hashlib.sha256).digest())
    assert_refused(server, login, "alice", forged, "algorithm 'HS256' not allowed", client)
    assert login(server, "alice", jwt.encode(claims(), keys["rsa"], "RS256"), client)[1] == "success"


def test_single_use_jti_is_remembered_across_a_restart(make_server, keys, login):
    server = make_server(jwt_key=keys["secret"], jwt_single_use=True)
    token = hs256(claims(jti=str(uuid.uuid4())))
    assert login(server, "alice", token)[1] == "success"
    client = assert_refused(server, login, "alice", token, "replayed jti (single-use token already used)")
    assert_refused(server, login, "alice", hs256(claims()), "jwt_single_use is on and the token has no usable jti", client)
    assert_refused(server, login, "alice", hs256(claims(jti="x" * 300)),
                   "jwt_single_use is on and the token has no usable jti", client)
    assert login(server, "alice", hs256(claims(jti=str(uuid.uuid4()))), client)[1] == "success"
    server.stop()
    server.start()
    assert_refused(server, login, "alice", token, "replayed jti (single-use token already used)")


def test_failed_tokens_count_towards_the_throttle(make_server, keys, login):
    server = make_server(jwt_key=keys["secret"], auth_throttle_exempt=[], auth_failure_limit=3)
    client = None
    for _ in range(3):
        client, condition = login(server, "alice", hs256(claims(exp=int(time.time()) - 600)), client)
        assert condition == "not-authorized"
    assert login(server, "alice", hs256(claims()), client)[1] == "temporary-auth-failure"
    assert login(server, "bob", hs256(claims("bob")), client)[1] == "success"


# -- where PLAIN is offered: unchanged rule, documented in conf/boshroster.toml ---------------------


def test_plain_only_on_secure_or_loopback_connections(make_server, keys):
    server = make_server(jwt_key=keys["secret"], password_logins=False)

    def mechanisms(**headers):
        client = BoshClient(server.bosh_url, wait=5, start=False)
        client.http.headers.update(headers)
        client.create()
        client.wait_features()
        try:
            return client.mechanisms()
        finally:
            client.stop()

    assert mechanisms() == ["PLAIN"]  # loopback
    assert mechanisms(**{"X-Forwarded-For": "198.51.100.7"}) == []  # plain HTTP from afar: no PLAIN, no token
    assert mechanisms(**{"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}) == ["PLAIN"]


# -- configuration errors stop startup with a clear message -----------------------------------------


def test_config_errors(keys, tmp_path):
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    private = tmp_path / "private.pem"
    private.write_bytes(keys["rsa"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    badjwks = tmp_path / "bad.json"
    badjwks.write_text('{"keys": [{"kty": "RSA"}]}')
    cases = [
        (dict(jwt_key=str(tmp_path / "missing")), "cannot read"),
        (dict(jwt_key=str(short)), "at least 32 bytes"),
        (dict(jwt_key=keys["secret"], jwt_algorithms=["none"]), "'none' is never accepted"),
        (dict(jwt_key=keys["secret"], jwt_algorithms=["HS256", "NONE"]), "'none' is never accepted"),
        (dict(jwt_key=keys["rsa_pem"], jwt_algorithms=["HS256"]), "HS256 cannot be verified"),
        (dict(jwt_key=keys["ec_pem"], jwt_algorithms=["ES384"]), "ES384 cannot be verified"),
        (dict(jwt_key=str(garbage)), "not a PEM public key"),
        (dict(jwt_key=str(badjwks)), "key 0"),
        (dict(password_logins=False), "needs jwt_key"),
        (dict(jwt_single_use=True), "need jwt_key"),
        (dict(jwt_key=keys["secret"], jwt_jid_field=""), "jwt_jid_field"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(**settings)
    # A private key is accepted (its public half is used), with a warning.
    assert load(jwt_key=str(private)).jwt_key == str(private)
    # The server itself refuses to start, exit code 2, the reason on stderr.
    conf = tmp_path / "c.toml"
    conf.write_text(f'jwt_key = "short"\ndata_dir = "{tmp_path / "data"}"\n')
    result = subprocess.run([sys.executable, "-m", "boshroster", "serve", "--config", str(conf)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "at least 32 bytes" in result.stderr, result.stderr


# -- the verifier and TokenState directly (revocation is for the app's API, another task) ----------


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@pytest.fixture
def state(tmp_path):
    s = TokenState(str(tmp_path / "tokens.sqlite3"))
    yield s
    s.close()


def test_revocation_refuses_older_tokens_and_persists(keys, tmp_path, state):
    verifier = TokenVerifier(load_keys(keys["secret"]), "localhost", state)
    old = hs256(claims(iat=int(time.time()) - 10))
    assert verifier.verify("alice", old)["jid"] == "alice@localhost"
    cutoff = state.revoke_tokens("Alice")  # prepared like a username
    assert state.tokens_revoked_before("alice") == cutoff
    with pytest.raises(TokenRefused, match="issued before this user's tokens were revoked"):
        verifier.verify("alice", old)
    with pytest.raises(TokenRefused, match="no iat claim"):
        verifier.verify("alice", hs256(claims(iat=None)))
    verifier.verify("bob", hs256(claims("bob", iat=int(time.time()) - 10)))  # others unaffected
    fresh = hs256(claims(iat=int(cutoff) + 1))
    assert verifier.verify("alice", fresh)
    # Another process (or a restart) sees the same cutoff.
    again = TokenState(state.path)
    assert again.tokens_revoked_before("alice") == cutoff
    with pytest.raises(TokenRefused):
        TokenVerifier(load_keys(keys["secret"]), "localhost", again).verify("alice", old)
    again.clear_revocation("alice")
    assert state.tokens_revoked_before("alice") is None
    assert verifier.verify("alice", old)
    again.close()
    # An explicit time, e.g. "everything issued before the account was disabled".
    state.revoke_tokens("carol", before=time.time() - 3600)
    verifier.verify("carol", hs256(claims("carol")))


def test_used_jti_expire_with_their_tokens(state):
    clock = Clock()
    state.clock = clock
    assert state.use_jti("a", "alice", clock.now + 60) is True
    assert state.use_jti("a", "alice", clock.now + 60) is False
    clock.now += 61
    assert state.use_jti("b", "alice", clock.now + 60) is True  # purges the expired row ...
    assert state._db.execute("SELECT count(*) FROM used_jti").fetchone()[0] == 1
    assert state.use_jti("a", "alice", clock.now + 60) is True  # ... so "a" is new again (its token is dead)


def test_token_users_are_remembered(state, keys):
    from boshroster.auth.tokens import TokenAuthenticator

    auth = TokenAuthenticator(TokenVerifier(load_keys(keys["secret"]), "localhost", state))
    assert auth.check_password("zoe", hs256(claims("zoe"))) is True
    assert state.is_token_user("zoe") and not state.is_token_user("yann")
    assert TokenState(state.path).is_token_user("zoe")


def test_looks_like_jwt():
    assert looks_like_jwt(hs256(claims()))
    for not_a_token in ("password", "a.b.c", "Zm9v.YmFy.YmF6", "hunter2.hunter2.", "", ".", "...",
                        b64(b'["alg"]') + ".x.y", b64(b'{"typ":"JWT"}') + ".x.y"):
        assert not looks_like_jwt(not_a_token), not_a_token


def test_key_files(keys, tmp_path):
    assert [k.algorithms for k in load_keys(keys["secret"])] == [("HS256", "HS384", "HS512")]
    assert load_keys(keys["secret"])[0].key == SECRET.encode()  # the trailing newline is not part of it
    assert load_keys(keys["ed_pem"])[0].algorithms == ("EdDSA",)
    assert [k.algorithms for k in load_keys(keys["rsa_pem"], ["RS256"])] == [("RS256",)]
    by_kid = {k.kid: k.algorithms for k in load_keys(keys["jwks"])}
    assert by_kid == {"one": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "two": ("RS256",), "ec": ("ES256",)}
    assert [k.kid for k in load_keys(keys["jwks"], ["ES256"])] == ["ec"]
    enc_only = tmp_path / "enc.json"
    enc_only.write_text(json.dumps({"keys": [{"kty": "oct", "k": b64(os.urandom(32)), "use": "enc"}]}))
    with pytest.raises(ValueError, match="no signature key"):
        load_keys(str(enc_only))

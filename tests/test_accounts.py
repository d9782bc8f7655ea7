"""The embedded account store: real SQLite files in a tmp dir, real scramp."""

import os
import sqlite3
import time

import pytest
import scramp

from boshroster.auth.accounts import (
    AccountError,
    AccountExists,
    AccountStore,
    NoSuchAccount,
)

SECRET = "Correct-Horse-Battery-Staple-4711"


@pytest.fixture
def store(tmp_path):
    s = AccountStore(str(tmp_path / "accounts.sqlite3"))
    yield s
    s.close()


def _db_bytes(path):
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as fh:
                data += fh.read()
    return data


def test_creates_parent_dirs_and_uses_wal(tmp_path):
    path = tmp_path / "deep" / "er" / "accounts.sqlite3"
    s = AccountStore(str(path))
    try:
        assert path.exists()
        other = sqlite3.connect(str(path))
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.close()
    finally:
        s.close()


def test_round_trip_and_prepared_names(store):
    assert store.add("Alice", SECRET) == "alice"
    assert store.exists("alice") and store.exists("ALICE")
    assert not store.exists("bob")
    assert not store.exists("not valid")  # unpreparable: simply absent
    store.add("bob", "pw-b")
    store.add("ＣＡＲＯＬ", "pw-c")  # fullwidth → carol
    assert store.list() == ["alice", "bob", "carol"]
    assert store.check_password("alice", SECRET)
    assert store.check_password("ALICE", SECRET)
    assert not store.check_password("alice", SECRET + "x")
    assert not store.check_password("alice", "")
    assert not store.check_password("nobody", SECRET)
    assert not store.check_password("bad name", SECRET)


def test_errors(store):
    store.add("alice", "pw")
    with pytest.raises(AccountExists):
        store.add("ALICE", "other")
    with pytest.raises(NoSuchAccount):
        store.set_password("bob", "pw")
    with pytest.raises(NoSuchAccount):
        store.delete("bob")
    for bad in ("", "a b", "a@b", "a/b", "a:b"):
        with pytest.raises(AccountError, match="invalid username"):
            store.add(bad, "pw")
    with pytest.raises(AccountError, match="empty"):
        store.add("carol", "")
    with pytest.raises(AccountError) as info:
        store.add("carol", "bad\x07" + SECRET)  # control char: SASLprep refuses
    assert SECRET not in str(info.value)
    assert not store.exists("carol")
    assert issubclass(AccountExists, AccountError) and issubclass(NoSuchAccount, AccountError)


def test_set_password_and_delete(store):
    store.add("alice", "old-password")
    before = store.scram_auth_info("alice", "SCRAM-SHA-256")
    store.set_password("Alice", "new-password")
    after = store.scram_auth_info("alice", "SCRAM-SHA-256")
    assert before != after and before[0] != after[0]  # fresh salt
    assert store.check_password("alice", "new-password")
    assert not store.check_password("alice", "old-password")
    store.delete("ALICE")
    assert not store.exists("alice")
    assert store.list() == []
    assert store.scram_auth_info("alice", "SCRAM-SHA-1") is None


def test_scram_auth_info_matches_scramp(store):
    store.add("alice", SECRET)
    for mech, keylen in (("SCRAM-SHA-1", 20), ("SCRAM-SHA-256", 32)):
        salt, stored_key, server_key, iterations = store.scram_auth_info("alice", mech)
        assert iterations >= 4096
        assert len(stored_key) == len(server_key) == keylen
        assert len(salt) >= 16
        again = scramp.ScramMechanism(mech).make_auth_info(SECRET, iteration_count=iterations, salt=salt)
        assert again == (salt, stored_key, server_key, iterations)
    sha1 = store.scram_auth_info("alice", "SCRAM-SHA-1")
    sha256 = store.scram_auth_info("alice", "SCRAM-SHA-256")
    assert sha1[0] != sha256[0]  # separate salts
    assert store.scram_auth_info("nobody", "SCRAM-SHA-1") is None
    assert store.scram_auth_info("a b", "SCRAM-SHA-1") is None
    with pytest.raises(ValueError):
        store.scram_auth_info("alice", "SCRAM-SHA-512")


def test_saslprep_applied_to_passwords(store):
    # U+00A0 NO-BREAK SPACE maps to U+0020; U+00AD SOFT HYPHEN maps to nothing (RFC 4013).
    store.add("alice", "pass\u00a0wo\u00adrd")
    assert store.check_password("alice", "pass word")


def test_custom_iterations(tmp_path):
    with pytest.raises(ValueError):
        AccountStore(str(tmp_path / "x.sqlite3"), iterations=1000)
    s = AccountStore(str(tmp_path / "y.sqlite3"), iterations=5000)
    try:
        s.add("alice", "pw")
        assert s.scram_auth_info("alice", "SCRAM-SHA-1")[3] == 5000
        assert s.check_password("alice", "pw")
    finally:
        s.close()


def test_password_never_stored(tmp_path):
    path = str(tmp_path / "accounts.sqlite3")
    s = AccountStore(path)
    s.add("alice", SECRET)
    s.import_lines([f"bob:{SECRET}-bob\n"])
    s.set_password("alice", SECRET + "-2")
    needles = [
        SECRET.encode("utf-8"),
        SECRET.encode("utf-16-le"),
        SECRET[:12].encode("utf-8"),
    ]
    data = _db_bytes(path)  # while open: main file + WAL
    assert data and b"alice" in data
    for needle in needles:
        assert needle not in data
    s.close()
    data = _db_bytes(path)
    for needle in needles:
        assert needle not in data


def test_persistence_and_second_connection(tmp_path):
    path = str(tmp_path / "accounts.sqlite3")
    server = AccountStore(path)
    cli = AccountStore(path)  # like `boshroster user add` while the server runs
    try:
        cli.add("alice", "pw")
        assert server.exists("alice")
        assert server.check_password("alice", "pw")
    finally:
        cli.close()
        server.close()
    with AccountStore(path) as again:
        assert again.list() == ["alice"]


def test_import_lines_semantics(store):
    store.add("existing", "old")
    lines = [
        "# a comment\n",
        "\n",
        "   \n",
        "alice:pw-a\n",
        "Existing:new:with:colons\r\n",
        "no colon here\n",
        "bad name:pw\n",
        "carol:\n",
        "ALICE:again\n",
        "  dave  : spaced pw \n",
        b"erin:pw-e\n",
        b"\xff\xfe:pw\n",
        "   # indented comment\n",
    ]
    added, updated, errors = store.import_lines(lines)
    assert (added, updated) == (3, 1)
    assert store.list() == ["alice", "dave", "erin", "existing"]
    assert store.check_password("existing", "new:with:colons")
    assert store.check_password("alice", "pw-a")  # first occurrence kept
    assert store.check_password("dave", " spaced pw ")  # password verbatim
    assert store.check_password("erin", "pw-e")
    assert len(errors) == 5
    joined = "\n".join(errors)
    for lineno in (6, 7, 8, 9, 12):
        assert f"line {lineno}:" in joined
    assert "line 9:" in joined and "line 4" in joined  # duplicate points at the first
    for pw in ("pw-a", "again", "new:with:colons"):
        assert pw not in joined


def test_import_is_one_transaction_and_empty_input(store):
    assert store.import_lines([]) == (0, 0, [])
    assert store.import_lines(["# only a comment\n"]) == (0, 0, [])


def test_import_1000_users(store, capsys):
    store.add("user0007", "old")
    lines = ["# bulk\n"] + [f"user{i:04d}:password-{i}\n" for i in range(1000)]
    t0 = time.perf_counter()
    added, updated, errors = store.import_lines(lines)
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nimport of 1,000 users: {elapsed:.2f} s")
    assert errors == []
    assert (added, updated) == (999, 1)
    names = store.list()
    assert len(names) == 1000 and names[0] == "user0000" and names[-1] == "user0999"
    for i in (0, 7, 500, 999):
        assert store.check_password(f"user{i:04d}", f"password-{i}")
        assert not store.check_password(f"user{i:04d}", f"password-{i + 1}")
    salt, stored, server, iters = store.scram_auth_info("user0123", "SCRAM-SHA-1")
    assert scramp.ScramMechanism("SCRAM-SHA-1").make_auth_info(
        "password-123", iteration_count=iters, salt=salt
    ) == (salt, stored, server, iters)

"""The embedded account store: SQLite, SCRAM keys only.

For every account we keep, per SCRAM mechanism (SCRAM-SHA-1 and
SCRAM-SHA-256), the salt, StoredKey, ServerKey and iteration count that
``scramp.ScramMechanism(m).make_auth_info()`` derives (RFC 5802 §3).  The
password itself, or anything it could be recovered from without brute force,
is never written.  Passwords are SASLprep'ed by scramp before derivation, so a
SCRAM client (which SASLpreps too) and ``check_password`` (used for PLAIN, which
re-derives through scramp) agree on the same bytes.

Usernames are prepared with ``jid.prep_localpart`` (PRECIS UsernameCaseMapped
plus the RFC 7622 exclusions) on every entry point, so ``'Alice'`` and
``'alice'`` are the same account.

Concurrency: one ``sqlite3`` connection opened with ``check_same_thread=False``
and shared by all greenlets of the server process.  sqlite calls are C calls
that never yield to the gevent hub, so every method runs to completion without
another greenlet touching the connection in between; no lock is needed.  The
file is in WAL mode so the ``boshroster user ...`` CLI, another process, can
write while the server reads.  Writers hold the write lock only for the short
SQL part: key derivation (the slow PBKDF2 part) is done before ``BEGIN``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import scramp

from boshroster.xmpp.jid import JIDError, prep_localpart

MECHANISMS = ("SCRAM-SHA-1", "SCRAM-SHA-256")
MIN_ITERATIONS = 4096
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    username   TEXT PRIMARY KEY,
    created    INTEGER NOT NULL,
    updated    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS scram_credentials (
    username   TEXT NOT NULL REFERENCES accounts(username) ON DELETE CASCADE,
    mechanism  TEXT NOT NULL,
    salt       BLOB NOT NULL,
    stored_key BLOB NOT NULL,
    server_key BLOB NOT NULL,
    iterations INTEGER NOT NULL,
    PRIMARY KEY (username, mechanism)
);
"""


class AccountError(Exception):
    """Base class; its message is meant for the operator (never holds a password)."""


class AccountExists(AccountError):
    pass


class NoSuchAccount(AccountError):
    pass


def _prepare_username(username: str) -> str:
    try:
        return prep_localpart(username)
    except JIDError as exc:
        raise AccountError(f"invalid username {username!r}: {exc}") from None


def _derive(password: str, iterations: int) -> dict[str, tuple[bytes, bytes, bytes, int]]:
    """SCRAM auth info for every stored mechanism; AccountError for a bad password."""
    if not isinstance(password, str) or not password:
        raise AccountError("the password must not be empty")
    try:
        return {
            m: scramp.ScramMechanism(m).make_auth_info(password, iteration_count=iterations)
            for m in MECHANISMS
        }
    except scramp.ScramException as exc:
        # scramp's SASLprep messages name the rule broken, not the password.
        raise AccountError(f"unusable password: {exc.args[0]}") from None


def _executor_class():
    """The stdlib ThreadPoolExecutor, or gevent's if threading is monkey-patched."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return ThreadPoolExecutor
    if monkey.is_module_patched("threading"):
        from gevent.threadpool import ThreadPoolExecutor as GeventExecutor

        return GeventExecutor
    return ThreadPoolExecutor


class AccountStore:
    """Accounts in a SQLite file; see the module docstring for the threading rules."""

    def __init__(self, path: str, iterations: int = MIN_ITERATIONS):
        if not isinstance(iterations, int) or iterations < MIN_ITERATIONS:
            raise ValueError(f"iterations must be an int >= {MIN_ITERATIONS}")
        self.path = path
        self.iterations = iterations
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        # isolation_level=None: autocommit; transactions are explicit (_transaction).
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise AccountError(
                    f"{path}: account database schema version {version} is newer than this "
                    f"boshroster understands ({_SCHEMA_VERSION})"
                )
            self._db.executescript(_SCHEMA)
            if version < _SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise
        # Secret for the timing-equalising dummy derivation in check_password.
        self._dummy_salt = secrets.token_bytes(32)

    # -- transactions ------------------------------------------------------

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")

    def _transaction(self) -> "AccountStore._Tx":
        return self._Tx(self._db)

    def _write_credentials(self, db: sqlite3.Connection, username: str, info: dict) -> None:
        db.executemany(
            "INSERT OR REPLACE INTO scram_credentials"
            " (username, mechanism, salt, stored_key, server_key, iterations)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(username, m, *info[m]) for m in MECHANISMS],
        )

    def _exists(self, db: sqlite3.Connection, username: str) -> bool:
        row = db.execute("SELECT 1 FROM accounts WHERE username = ?", (username,)).fetchone()
        return row is not None

    # -- public API ----------------------------------------------------------

    def add(self, username: str, password: str) -> str:
        """Create an account; return the prepared username.  AccountExists if taken."""
        user = _prepare_username(username)
        if self.exists(user):  # cheap early answer before PBKDF2
            raise AccountExists(f"account {user!r} already exists")
        info = _derive(password, self.iterations)
        now = int(time.time())
        with self._transaction() as db:
            if self._exists(db, user):
                raise AccountExists(f"account {user!r} already exists")
            db.execute(
                "INSERT INTO accounts (username, created, updated) VALUES (?, ?, ?)",
                (user, now, now),
            )
            self._write_credentials(db, user, info)
        return user

    def set_password(self, username: str, password: str) -> None:
        """Replace the account's SCRAM keys.  NoSuchAccount if it does not exist."""
        user = _prepare_username(username)
        if not self.exists(user):
            raise NoSuchAccount(f"no account {user!r}")
        info = _derive(password, self.iterations)
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE accounts SET updated = ? WHERE username = ?", (int(time.time()), user)
            )
            if cur.rowcount == 0:
                raise NoSuchAccount(f"no account {user!r}")
            self._write_credentials(db, user, info)

    def delete(self, username: str) -> None:
        """Remove the account and its keys.  NoSuchAccount if it does not exist."""
        user = _prepare_username(username)
        with self._transaction() as db:
            db.execute("DELETE FROM scram_credentials WHERE username = ?", (user,))
            cur = db.execute("DELETE FROM accounts WHERE username = ?", (user,))
            if cur.rowcount == 0:
                raise NoSuchAccount(f"no account {user!r}")

    def exists(self, username: str) -> bool:
        """True if the account exists; False for unknown or unpreparable names."""
        try:
            user = prep_localpart(username)
        except JIDError:
            return False
        return self._exists(self._db, user)

    def user_exists(self, username: str) -> bool:
        """The authenticator interface every credential source offers (see sasl.py)."""
        return self.exists(username)

    def list(self) -> list[str]:
        """All prepared usernames, sorted by code point."""
        return sorted(r[0] for r in self._db.execute("SELECT username FROM accounts"))

    def import_lines(self, lines: Iterable[str | bytes]) -> tuple[int, int, list[str]]:
        """Apply ``name:password`` lines; return (added, updated, errors).

        Blank lines and lines starting with ``#`` (after leading blanks) are
        skipped.  The name is stripped of surrounding blanks; the password is
        everything after the first ``:`` up to the line ending, kept verbatim
        (a localpart can never contain ``:``, so the first one is the
        separator).  Existing accounts get the new password.  A bad line, or a
        name repeated in the input, is reported in ``errors`` (with its line
        number, never its password) and skipped; all good lines are written in
        ONE transaction.  PBKDF2 for every line (about 3 ms of CPU per account
        at 4096 iterations for both mechanisms) runs before that transaction,
        on a small thread pool, so the write lock is held only for the inserts.
        """
        errors: list[tuple[int, str]] = []
        parsed: list[tuple[int, str, str]] = []  # (lineno, user, password)
        seen: dict[str, int] = {}
        for lineno, raw in enumerate(lines, start=1):
            if isinstance(raw, bytes):
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError:
                    errors.append((lineno, f"line {lineno}: not valid UTF-8"))
                    continue
            line = raw.rstrip("\r\n")
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            name, colon, password = line.partition(":")
            if not colon:
                errors.append((lineno, f"line {lineno}: expected 'name:password' (no ':' found)"))
                continue
            name = name.strip()
            try:
                user = _prepare_username(name)
            except AccountError as exc:
                errors.append((lineno, f"line {lineno}: {exc}"))
                continue
            if user in seen:
                errors.append((
                    lineno,
                    f"line {lineno}: username {user!r} already given on line {seen[user]}; skipped",
                ))
                continue
            seen[user] = lineno
            parsed.append((lineno, user, password))

        pending: list[tuple[str, dict]] = []
        for (lineno, user, _pw), result in zip(parsed, self._derive_many([p for _l, _u, p in parsed])):
            if isinstance(result, AccountError):
                errors.append((lineno, f"line {lineno}: {result} (user {user!r})"))
            else:
                pending.append((user, result))
        errors.sort(key=lambda e: e[0])

        added = updated = 0
        now = int(time.time())
        with self._transaction() as db:
            for user, info in pending:
                cur = db.execute(
                    "UPDATE accounts SET updated = ? WHERE username = ?", (now, user)
                )
                if cur.rowcount:
                    updated += 1
                else:
                    db.execute(
                        "INSERT INTO accounts (username, created, updated) VALUES (?, ?, ?)",
                        (user, now, now),
                    )
                    added += 1
                self._write_credentials(db, user, info)
        return added, updated, [message for _lineno, message in errors]

    def _derive_many(self, passwords: list[str]) -> list:
        """_derive() for each password, in order; an AccountError instance for a bad one.

        hashlib's PBKDF2 releases the GIL, so a few threads use all cores.
        When gevent has monkey-patched ``threading`` the stdlib pool would run
        serially in greenlets, so gevent's native-thread pool is used instead;
        it waits cooperatively, so a patched server keeps serving meanwhile
        (safe: no transaction is open yet).  Measured on 2 cores for 1,000
        accounts: ~2 s unpatched, ~2.5 s patched, ~4 s serially.  Threads
        rather than processes: nothing to pickle, nothing forked under gevent.
        """

        def one(password: str):
            try:
                return _derive(password, self.iterations)
            except AccountError as exc:
                return exc

        workers = min(len(passwords) // 16, os.cpu_count() or 1, 8)
        if workers < 2:
            return [one(p) for p in passwords]
        with _executor_class()(max_workers=workers) as pool:
            return list(pool.map(one, passwords))

    def scram_auth_info(self, username: str, mechanism: str) -> tuple[bytes, bytes, bytes, int] | None:
        """(salt, stored_key, server_key, iterations) for scramp, or None if unknown user.

        ``mechanism`` is 'SCRAM-SHA-1' or 'SCRAM-SHA-256' (ValueError otherwise).
        """
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported SCRAM mechanism {mechanism!r}")
        try:
            user = prep_localpart(username)
        except JIDError:
            return None
        row = self._db.execute(
            "SELECT salt, stored_key, server_key, iterations FROM scram_credentials"
            " WHERE username = ? AND mechanism = ?",
            (user, mechanism),
        ).fetchone()
        if row is None:
            return None
        salt, stored_key, server_key, iterations = row
        return bytes(salt), bytes(stored_key), bytes(server_key), int(iterations)

    def check_password(self, username: str, password: str) -> bool:
        """True if ``password`` is the account's password (for SASL PLAIN).

        Re-derives the SCRAM-SHA-256 StoredKey with the stored salt and
        iteration count (through scramp, so SASLprep is identical) and compares
        with ``hmac.compare_digest``.  For an unknown user a dummy derivation of
        the same cost is done so the answer time does not reveal existence.
        """
        info = self.scram_auth_info(username, "SCRAM-SHA-256")
        if info is None:
            hashlib.pbkdf2_hmac("sha256", b"dummy", self._dummy_salt, self.iterations)
            return False
        salt, stored_key, _server_key, iterations = info
        if not isinstance(password, str) or not password:
            return False
        try:
            _s, candidate, _k, _i = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
                password, iteration_count=iterations, salt=salt
            )
        except scramp.ScramException:
            return False
        return hmac.compare_digest(candidate, stored_key)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "AccountStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Accounts in PostgreSQL: auth/accounts.py's AccountStore, same SQL, on PgDatabase.

Only the storage differs: the connection (a pool, see pg.py), the
transaction (``BEGIN``/``COMMIT`` on one pooled connection instead of SQLite's
``BEGIN IMMEDIATE``), the upsert of SCRAM keys (``ON CONFLICT``) and the
schema (migrations instead of ``PRAGMA user_version``).  Every rule of the
store (prepared usernames, SCRAM keys only, one transaction per import) is
the parent's, so the same tests run on both (tests/test_accounts.py).
"""

from __future__ import annotations

import contextlib
import secrets

from boshroster.auth.accounts import MECHANISMS, MIN_ITERATIONS, AccountStore
from boshroster.cluster.pg import PgDatabase, redacted

MIGRATIONS = [
    """
    CREATE TABLE accounts (username TEXT PRIMARY KEY, created BIGINT NOT NULL, updated BIGINT NOT NULL);
    CREATE TABLE scram_credentials (
        username   TEXT NOT NULL REFERENCES accounts(username) ON DELETE CASCADE,
        mechanism  TEXT NOT NULL,
        salt       BYTEA NOT NULL,
        stored_key BYTEA NOT NULL,
        server_key BYTEA NOT NULL,
        iterations INTEGER NOT NULL,
        PRIMARY KEY (username, mechanism)
    )
    """,
]


class PgAccountStore(AccountStore):
    def __init__(self, url: str, iterations: int = MIN_ITERATIONS, pool_size: int = 10, database: PgDatabase | None = None):
        if not isinstance(iterations, int) or iterations < MIN_ITERATIONS:
            raise ValueError(f"iterations must be an int >= {MIN_ITERATIONS}")
        self.path = redacted(url)
        self.iterations = iterations
        self._owns_db = database is None
        self._db = database if database is not None else PgDatabase(url, pool_size)
        self._db.migrate("accounts", MIGRATIONS)
        self._dummy_salt = secrets.token_bytes(32)

    @contextlib.contextmanager
    def _transaction(self):
        with self._db.transaction() as tx:
            yield tx

    def _write_credentials(self, db, username: str, info: dict) -> None:
        db.executemany(
            "INSERT INTO scram_credentials (username, mechanism, salt, stored_key, server_key, iterations)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (username, mechanism) DO UPDATE SET salt = EXCLUDED.salt,"
            " stored_key = EXCLUDED.stored_key, server_key = EXCLUDED.server_key, iterations = EXCLUDED.iterations",
            [(username, m, *info[m]) for m in MECHANISMS],
        )

    def close(self) -> None:
        if self._owns_db:
            self._db.close()

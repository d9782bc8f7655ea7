"""Persistent token state: revocation cutoffs, used ``jti``, users seen logging in by token.

One SQLite file, ``data_dir/tokens.sqlite3``, read and written by every
greenlet of the server.  Like accounts.py it is opened with
``check_same_thread=False``; sqlite calls never yield to the gevent hub, so
each method runs to completion alone and no lock is needed.  WAL mode lets
another process (the app's API, a CLI) write meanwhile; the verifier reads
the cutoff at every token login, so a revocation written elsewhere applies
at the next login.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time

from boshroster.xmpp.jid import JIDError, prep_localpart

log = logging.getLogger("boshroster.auth")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS token_cutoffs (
    username   TEXT PRIMARY KEY,
    not_before REAL NOT NULL,
    set_at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS used_jti (
    jti        TEXT PRIMARY KEY,
    username   TEXT NOT NULL,
    expires    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS used_jti_expires ON used_jti(expires);
CREATE TABLE IF NOT EXISTS token_users (
    username   TEXT PRIMARY KEY,
    last_login REAL NOT NULL
);
"""


class TokenState:
    """Persistent token state in ``data_dir/tokens.sqlite3``; see the module doc for threading.

    * ``revoke_tokens(user, before=now)``: refuse the user's tokens issued
      (``iat``) before ``before`` (the app's API calls it when it disables an
      account); ``clear_revocation(user)`` lifts it.
    * ``use_jti``: single-use bookkeeping, rows kept until the token expires.
    * ``token_user_seen`` / ``is_token_user``: users who logged in by token
      (they have no account, yet messages to them must be stored).
    """

    def __init__(self, path: str, clock=time.time):
        self.path = path
        self.clock = clock
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise
        self._seen: set[str] = set()  # token users already written this run (saves a write per login)

    @staticmethod
    def _user(username: str) -> str:
        return prep_localpart(username)  # JIDError for a name no token could carry

    # -- revocation ----------------------------------------------------------

    def revoke_tokens(self, username: str, before: float | None = None) -> float:
        """Refuse ``username``'s tokens issued before ``before`` (default: now); returns the cutoff."""
        user = self._user(username)
        now = self.clock()
        cutoff = now if before is None else float(before)
        self._db.execute(
            "INSERT INTO token_cutoffs (username, not_before, set_at) VALUES (?, ?, ?)"
            " ON CONFLICT(username) DO UPDATE SET not_before = excluded.not_before, set_at = excluded.set_at",
            (user, cutoff, now),
        )
        log.info("tokens of %r issued before %.0f are now refused", user, cutoff)
        return cutoff

    def clear_revocation(self, username: str) -> None:
        self._db.execute("DELETE FROM token_cutoffs WHERE username = ?", (self._user(username),))

    def tokens_revoked_before(self, username: str) -> float | None:
        try:
            user = self._user(username)
        except JIDError:
            return None
        row = self._db.execute("SELECT not_before FROM token_cutoffs WHERE username = ?", (user,)).fetchone()
        return None if row is None else row[0]

    # -- single use ----------------------------------------------------------

    def use_jti(self, jti: str, username: str, expires: float) -> bool:
        """Record ``jti``; False if it was already used (and has not expired)."""
        now = self.clock()
        self._db.execute("DELETE FROM used_jti WHERE expires < ?", (now,))
        cur = self._db.execute(
            "INSERT OR IGNORE INTO used_jti (jti, username, expires) VALUES (?, ?, ?)", (jti, username, expires)
        )
        return cur.rowcount == 1

    # -- users seen ----------------------------------------------------------

    def token_user_seen(self, username: str) -> None:
        if username in self._seen:
            return
        self._db.execute(
            "INSERT INTO token_users (username, last_login) VALUES (?, ?)"
            " ON CONFLICT(username) DO UPDATE SET last_login = excluded.last_login",
            (username, self.clock()),
        )
        if len(self._seen) < 100_000:
            self._seen.add(username)

    def is_token_user(self, username: str) -> bool:
        if username in self._seen:
            return True
        row = self._db.execute("SELECT 1 FROM token_users WHERE username = ?", (username,)).fetchone()
        return row is not None

    def close(self) -> None:
        self._db.close()

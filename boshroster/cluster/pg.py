"""PostgreSQL for what must last (issue 14): a small gevent-friendly pool and migrations.

psycopg 3, sync API.  Imported after ``gevent.monkey.patch_all()`` (the CLI
patches first thing), psycopg sees the patched ``select`` and waits through
gevent instead of its C ``wait_c`` (psycopg/waiting.py ``_is_select_patched``),
so a slow query parks only its own greenlet (tests/test_pg_storage.py runs
``pg_sleep`` while the hub keeps answering HTTP).  psycopg was chosen over
pg8000 for that explicit gevent support, its binary wheel's speed and its
maintained pool-free sync API; psycopg_pool is not used because it runs
worker threads, which monkey-patching turns into greenlets it does not expect.

``PgDatabase``: at most ``size`` connections (autocommit), lent one at a time
(``connection()``; a greenlet waits on a gevent queue when all are lent, up to
``timeout`` seconds, then ``StorageUnavailable``); a connection that broke is
closed and replaced on the next use, so a PostgreSQL restart costs the
queries in flight, not the server.  ``execute`` takes sqlite-style ``?``
placeholders so the stores' SQL stays shared with the SQLite ones.

Migrations: ``schema_version(component, version)``; ``migrate(component,
steps)`` runs the steps above the stored version in one transaction under an
advisory lock, so nodes starting together migrate once.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterable, Sequence

import gevent.lock
import gevent.queue
import psycopg

from boshroster.config import StartupError

log = logging.getLogger("boshroster.pg")

_PLACEHOLDER = re.compile(r"\?")


class StorageUnavailable(Exception):
    """PostgreSQL cannot be reached (or no connection came free in time)."""


def redacted(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class Result:
    __slots__ = ("rows", "rowcount")

    def __init__(self, rows: list | None, rowcount: int):
        self.rows = rows or []
        self.rowcount = rowcount

    def fetchone(self):
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list:
        return self.rows

    def __iter__(self):
        return iter(self.rows)


class _Tx:
    """What a transaction body sees: sqlite-like execute/executemany on one connection."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, params: Sequence = ()) -> Result:
        cur = self.conn.execute(_PLACEHOLDER.sub("%s", sql), tuple(params))
        return Result(cur.fetchall() if cur.description else None, cur.rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_PLACEHOLDER.sub("%s", sql), [tuple(r) for r in rows])


# Every wait on PostgreSQL is bounded, not only the pool and the connect: a statement (or the
# lock it waits for) at most STATEMENT_TIMEOUT_MS, then QueryCanceled (StorageUnavailable);
# a server that vanished without a reset is noticed by TCP keepalives and tcp_user_timeout
# (unacknowledged data) instead of the kernel's retransmission timeout (about 15 minutes).
STATEMENT_TIMEOUT_MS = 60_000
_BOUNDED = {
    "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


class PgDatabase:
    def __init__(self, url: str, size: int = 10, timeout: float = 10.0, connect_timeout: float = 5.0):
        self.url = url
        self.size = max(1, size)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: gevent.queue.LifoQueue = gevent.queue.LifoQueue()
        self._slots = gevent.lock.BoundedSemaphore(self.size)
        self._closed = False
        try:
            self._idle.put(self._connect())
        except StorageUnavailable as exc:
            raise StartupError(f"database_url {redacted(url)}: cannot reach PostgreSQL: {exc}") from None

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=int(max(1, self.connect_timeout)),
                                   **_BOUNDED)
        except psycopg.Error as exc:
            raise StorageUnavailable(str(exc).strip()) from None

    @contextlib.contextmanager
    def connection(self):
        if self._closed:
            raise StorageUnavailable("the database is closed")
        if not self._slots.acquire(timeout=self.timeout):
            log.warning("PostgreSQL: all %d connections busy for %.0f s", self.size, self.timeout)
            raise StorageUnavailable(f"no free connection within {self.timeout} s")
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except gevent.queue.Empty:
                conn = self._connect()
            if conn.closed or conn.broken:
                conn = self._connect()
            yield conn
        except psycopg.OperationalError as exc:
            if conn is not None:
                conn.close()
                conn = None
            log.warning("PostgreSQL unreachable: %s", str(exc).strip())
            raise StorageUnavailable(str(exc).strip()) from None
        finally:
            if conn is not None and not conn.closed and not conn.broken and not self._closed:
                self._idle.put(conn)
            elif conn is not None:
                conn.close()
            self._slots.release()

    def execute(self, sql: str, params: Sequence = ()) -> Result:
        with self.connection() as conn:
            return _Tx(conn).execute(sql, params)

    @contextlib.contextmanager
    def transaction(self):
        with self.connection() as conn:
            with conn.transaction():
                yield _Tx(conn)

    def migrate(self, component: str, steps: list[str]) -> int:
        """Bring ``component``'s tables to version ``len(steps)``; returns the version found."""
        with self.transaction() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(hashtext('boshroster-migrations'))")
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            row = tx.execute("SELECT version FROM schema_version WHERE component = ?", (component,)).fetchone()
            found = row[0] if row else 0
            if found > len(steps):
                raise StartupError(f"database_url: the {component} schema is version {found}, newer than this"
                                   f" boshroster understands ({len(steps)})")
            for version in range(found + 1, len(steps) + 1):
                for statement in filter(None, (s.strip() for s in steps[version - 1].split(";"))):
                    tx.execute(statement)
                log.info("PostgreSQL: %s schema migrated to version %d", component, version)
            if found < len(steps):
                tx.execute("INSERT INTO schema_version (component, version) VALUES (?, ?) ON CONFLICT (component)"
                           " DO UPDATE SET version = EXCLUDED.version", (component, len(steps)))
        return found

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except gevent.queue.Empty:
                break

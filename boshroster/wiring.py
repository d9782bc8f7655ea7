"""The shared session core: one per server, fed by every transport.

It owns the pieces a stanza passes through (router -> presence / messages /
iq / roster) and the state they share (registry, roster cache, offline
store).  Nothing here knows about HTTP or WebSocket frames.
"""

from __future__ import annotations

import logging
import os

from boshroster.auth.accounts import AccountStore
from boshroster.auth.http_check import HttpAuthenticator
from boshroster.auth.throttle import AuthThrottle
from boshroster.config import Config
from boshroster.im.server_iqs import IqHandler
from boshroster.xmpp.jid import JID
from boshroster.im.messages import MessageHandler
from boshroster.web.metrics import Metrics
from boshroster.im.offline import OfflineStore
from boshroster.im.presence import PresenceHandler
from boshroster.xmpp.sessions import SessionRegistry
from boshroster.roster.backend import RosterBackend
from boshroster.roster.cache import RosterCache
from boshroster.roster.delegation import RosterService
from boshroster.xmpp.router import Router
from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.core")


class Core:
    def __init__(self, config: Config, roster_backend=None):
        self.config = config
        self.metrics = Metrics()
        os.makedirs(config.data_dir, exist_ok=True)
        if config.auth == "http":
            self.authenticator = HttpAuthenticator(
                config.http_auth_url, config.domain, config.http_auth_timeout, config.http_auth_cache_seconds
            )
            self.accounts = None
        else:
            self.accounts = AccountStore(os.path.join(config.data_dir, "accounts.sqlite3"), config.scram_iterations)
            self.authenticator = self.accounts
        self.auth_throttle = AuthThrottle(config.auth_failure_limit, config.auth_failure_window)
        self.registry = SessionRegistry(config.resource_conflict, config.max_resources_per_user)
        self.offline = OfflineStore(
            os.path.join(config.data_dir, "offline.sqlite3"), config.domain, config.offline_max_per_user,
            config.stanza_size_limit,
        )
        if roster_backend is None:
            if not config.http_roster_url:
                log.warning("http_roster_url is not set: every roster is empty")
            roster_backend = RosterBackend(
                config.http_roster_url,
                connect_timeout=config.roster_connect_timeout,
                read_timeout=config.roster_read_timeout,
                max_body=config.roster_max_body,
                max_concurrency=config.roster_max_concurrency,
            )
        self.roster_backend = roster_backend
        self.roster = RosterService(self, RosterCache(roster_backend, grace_seconds=config.roster_cache_grace))
        self.router = Router(self)
        self.presence = PresenceHandler(self)
        self.messages = MessageHandler(self)
        self.iq = IqHandler(self)

    def user_exists(self, username: str) -> bool:
        if self.accounts is None:
            return True
        return self.registry.is_online(username) or self.accounts.exists(username)

    def bind(self, session: ClientSession, resource: str | None) -> None:
        """Give ``session`` a resource (RFC 6120 §7); raises StanzaError."""
        resource, kicked = self.registry.bind(session, session.username, resource)
        session.jid = JID.make(session.username, self.config.domain, resource)
        session.jid_str = str(session.jid)
        self.roster.user_online(session.username)
        if kicked is not None:
            kicked.jid, kicked_jid = None, kicked.jid  # already unbound: do not unbind the new one
            kicked.fail("conflict", "replaced by a new session")
            self._after_unbind(kicked, kicked_jid)

    def session_unbound(self, session: ClientSession) -> None:
        """Called once by ClientSession.end for a bound session."""
        self._after_unbind(session, session.jid)

    def _after_unbind(self, session: ClientSession, jid: JID | None) -> None:
        if jid is None:
            return
        self.presence.unavailable(session)  # RFC 6121 §4.5: on the client's behalf
        self.registry.unbind(jid.local, jid.resource, session)
        self.roster.user_offline(jid.local)

    def shutdown(self) -> None:
        """Tell every client the server is going away (system-shutdown)."""
        sessions = list(self.registry.all_sessions())
        for session in sessions:
            session.fail("system-shutdown", "the server is shutting down")
        log.info("shutdown: %d session(s) closed", len(sessions))
        self.offline.close()
        if self.accounts is not None:
            self.accounts.close()

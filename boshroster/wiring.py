"""The wiring: builds every component, gives each the narrow things it uses, hooks the modules.

This is the only module that imports the features (im/, roster/, auth/); it is
imported only by server.py.  Reading it top to bottom tells what the server
is made of.  A new server-answered IQ is one module and one line here
(see ``version.register``).

Greenlet safety: everything is built and hooked before the listeners start;
afterwards only the components' own documented state changes.
"""

from __future__ import annotations

import logging
import os
import secrets
import time

import gevent

from boshroster.auth import sasl
from boshroster.auth.factory import build_auth
from boshroster.config import Config
from boshroster.im import version
from boshroster.im.archive_sqlite import open_archive
from boshroster.im.mam import MamService
from boshroster.im.messages import MessageHandler
from boshroster.im.offline import OfflineStore
from boshroster.im.presence import PresenceHandler
from boshroster.im.server_iqs import Disco, ServerIqs
from boshroster.im.webhook import OfflineWebhook
from boshroster.roster.backend import RosterBackend
from boshroster.roster.cache import RosterCache
from boshroster.roster.delegation import RosterDelegation
from boshroster.web.metrics import Metrics
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.router import Router
from boshroster.xmpp.sessions import SessionManager
from boshroster.xmpp.stream import Shaper, StreamContext
from boshroster.xmpp.stream_management import SmSettings, StreamManagement

log = logging.getLogger("boshroster.wiring")


class Core:
    """Everything one server process runs, wired together (what the web layer is given)."""

    def __init__(self, config: Config, roster_backend=None):
        self.config = config
        domain = config.domain
        os.makedirs(config.data_dir, exist_ok=True)
        self.metrics = Metrics()
        self.bus = bus = EventBus()

        # Durable storage: SQLite files under data_dir, or PostgreSQL (database_url, cluster/pg.py).
        self.database = None
        if config.database_url:
            from boshroster.cluster.pg import PgDatabase

            self.database = PgDatabase(config.database_url, config.database_pool_size)

        # Who may log in: auth/factory.py (accounts or the HTTP check, JWT tokens, the login throttle).
        self.auth = build_auth(config, self.database)
        authenticator = self.auth.authenticator  # check_password, user_exists (, scram_auth_info)
        self.accounts = self.auth.accounts  # AccountStore, or None with auth = "http"
        self.tokens = self.auth.tokens  # TokenState (revoke_tokens, ...), or None without jwt_key
        throttle = self.auth.throttle

        # The core: sessions, the router, streams.
        self.sessions = SessionManager(bus, domain, config.resource_conflict, config.max_resources_per_user)
        router = Router(bus, self.sessions, domain, self.metrics)
        sm = None
        if config.smacks_enabled:
            sm = StreamManagement(SmSettings(
                hibernation_time=config.smacks_hibernation_time, max_unacked=config.smacks_max_unacked_stanzas,
                max_queue=config.smacks_max_queue_size, max_old_sessions=config.smacks_max_old_sessions,
            ), bus)
            sm.register(bus)
        self.stream_context = StreamContext(
            config=config,
            domain=domain,
            router=router,
            sessions=self.sessions,
            bus=bus,
            mechanisms=lambda secure: sasl.mechanisms_for(authenticator, secure, config.allow_plain_insecure),
            start_sasl=lambda mechanism, offered, address: sasl.SaslExchange(
                mechanism, authenticator, domain, offered, throttle=throttle, address=address),
            metrics=self.metrics,
            sm=sm,
            shaper=(lambda: Shaper(config.c2s_stanza_rate, config.c2s_stanza_burst, time.monotonic, gevent.sleep))
            if config.c2s_stanza_rate > 0 else None,
        )

        # Cluster (issue 14): only with cluster_redis_url; without it nothing below changes.
        # im/ then sees every node's resources (cluster/view.py), rosters are shared in Redis.
        self.cluster = None
        self.bosh_forwarder = None  # the web layer relays BOSH requests for other nodes' sids through it
        self.internal_routes = {}  # path -> WSGI app: node-to-node requests (cluster/sm_handover.py)
        im_sessions = self.sessions
        if config.cluster_redis_url:
            from boshroster.cluster.bosh_forward import BoshForwarder
            from boshroster.cluster.node import ClusterNode

            self.cluster = ClusterNode(config, self.sessions, bus)
            self.bosh_forwarder = BoshForwarder(self.cluster, config.bosh_max_wait)
            im_sessions = self.cluster.view
            if sm is not None:  # XEP-0198 resumption on any node: the owner hands the session over
                from boshroster.cluster.sm_handover import SmHandover

                handover = SmHandover(self.cluster, sm, self.sessions, config.cluster_sm_handover_timeout,
                                      self.metrics, config.cluster_sm_handover_test_stall,
                                      config.cluster_sm_handover_test_stall_at)
                self.internal_routes.update(handover.routes())
        # Who is online anywhere (a cluster: the directory mirror too), for user_exists: a
        # message for a user online on another node needs no account lookup (bench "cluster":
        # that SQLite SELECT was ~10% of a node's CPU per cross-node message).
        self._online = im_sessions.is_online

        # Rosters, delegated to the web application.
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
        fetcher = roster_backend
        if self.cluster is not None:
            from boshroster.cluster.rosters import SharedRosterBackend

            fetcher = SharedRosterBackend(roster_backend, self.cluster.redis, defer=self.cluster.writer.defer)
        self.roster = RosterDelegation(
            RosterCache(fetcher, grace_seconds=config.roster_cache_grace), self.sessions, bus,
            refresh_concurrency=config.refresh_max_concurrency,
            retry_count=config.roster_retry_count, retry_backoff=config.roster_retry_backoff,
        )

        # Instant messaging.
        if self.database is not None:
            from boshroster.cluster.pg_offline import PgOfflineStore

            # Rows are claimed per process (node:boot) while being delivered: see pg_offline.py.
            if self.cluster is not None:
                node, boot = self.cluster.node, self.cluster.boot
            else:
                from boshroster.cluster.keys import default_node_id

                node, boot = config.node_id or default_node_id(), secrets.token_hex(4)
            self.offline = PgOfflineStore(self.database, domain, config.offline_max_per_user, config.stanza_size_limit,
                                          node=node, boot=boot, max_total_bytes=config.offline_max_total_bytes)
        else:
            self.offline = OfflineStore(
                os.path.join(config.data_dir, "offline.sqlite3"), domain, config.offline_max_per_user,
                config.stanza_size_limit, max_total_bytes=config.offline_max_total_bytes,
            )
        disco = Disco()
        self.roster.register(bus)
        contacts = self.roster
        if self.cluster is not None:
            from boshroster.cluster.rosters import ClusterContacts

            contacts = ClusterContacts(self.roster, im_sessions, fetcher)
        presence = PresenceHandler(im_sessions, contacts, domain, bus)
        presence.register(bus)
        self.messages = MessageHandler(im_sessions, self.offline, self.user_exists, domain, bus)
        self.messages.register(bus)
        bus.hook("presence-initial", self.offline.deliver)
        ServerIqs(disco, self.user_exists).register(bus)
        version.register(bus, disco)

        # The message archive (XEP-0313): stamps <stanza-id/>, answers MAM queries.
        self.archive = None
        if config.archive_enabled:
            if self.database is not None:  # PostgreSQL, shared by the nodes (cluster/pg_archive.py)
                from boshroster.cluster.pg_archive import PgArchive

                self.archive = PgArchive.from_config(config, self.database)
            else:
                if self.cluster is not None:
                    log.warning("archive: nodes sharing data_dir/archive.sqlite3 give out clashing ids (one process"
                                " per file); set database_url for a cluster's archive")
                self.archive = open_archive(config)
            MamService(self.archive, domain, default_page=config.mam_default_page, max_page=config.mam_max_page,
                       in_roster=self.roster.shares_with).register(bus, disco.account_features)
            self.archive.start()  # retention, in the background
        # The offline-message webhook (issue 13): a POST to the app per message stored offline.
        self.webhook = OfflineWebhook.from_config(config, self.metrics)
        if self.webhook is not None:
            self.webhook.register(bus)
        if self.cluster is not None:
            from boshroster.cluster.rosters import RefreshFanout

            fanout = RefreshFanout(self.cluster.node, self.cluster.redis, self.roster, im_sessions, contacts,
                                   self.cluster.live_nodes, config.refresh_max_concurrency)
            self.roster.refresh_users = fanout.refresh_users  # POST /roster_admin/refresh: every node
            self.cluster.attach(messages=self.messages, presence=presence, roster=self.roster,
                                mailbox=self.offline, fanout=fanout)
            self.cluster.register(bus)
            self.cluster.start()

    def user_exists(self, username: str) -> bool:
        """RFC 6121 §8.5.1: is there such a local user?  (May ask the backend with
        auth = "http" and http_user_exists_url: cached, and "yes" when it is down.)"""
        return self._online(username) or self.auth.user_exists(username)

    def shutdown(self) -> None:
        """Tell every client the server is going away, then close the stores."""
        self.sessions.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()  # flush, hand this node's inbox over, leave the directory
        self.offline.close()
        if self.archive is not None:
            self.archive.close()  # commits what is still queued
        self.auth.close()
        if self.webhook is not None:
            self.webhook.close()
        if self.database is not None:
            self.database.close()

"""Process wiring: gevent WSGI listeners, logging, graceful shutdown.

gevent's pywsgi is not meant to face the Internet directly (its own docs):
deployments put nginx in front (conf/nginx.conf).  Every accepted socket
gets TCP_NODELAY from wsadapter.ServerHandler, since kept-alive BOSH
responses otherwise stall on delayed ACKs.
"""

from __future__ import annotations

import gc
import logging
import signal
import time

import gevent
import gevent.event
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from boshroster.config import Config
from boshroster.wiring import Core
from boshroster.web.app import WebApp
from boshroster.transports.http_handler import ServerHandler
from boshroster.transports.http_limits import HttpLimits, connection_cap, raise_fd_limit
from boshroster.transports.ws_connection import WsSettings

log = logging.getLogger("boshroster.server")


# Connections the kernel queues while the pool is full or the accept loop is busy (gevent's
# default is 128, nginx's 511); Linux caps it at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 1024

# Cyclic GC generation-0 threshold while serving (CPython's default: 700 container allocations
# net of deallocations).  A login or a BOSH fan-out allocates thousands of objects (elements,
# environ dicts, frames, sessions' state); at 700 (no freeze) the collector took 4.8-7.4% of the
# server's CPU, 1.8-2.1% at 20,000 + freeze, with RSS per idle BOSH session unchanged
# (bench/README.md, "fourth pass"; 10,000 and 50,000 were measured too).  Generations 1 and 2 keep their defaults, so
# real cycles (greenlet frames, tracebacks) are still collected, only in larger batches: the
# young generation holds at most this many extra objects (~a few MB at worst), not per session.
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Once, after wiring and before serving: what startup built (modules, Core, config,
    the app) lives as long as the process, so ``gc.freeze`` moves it to the permanent
    generation (no full collection scans it again), and generation 0 collects less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    log.info("cyclic GC: %d startup objects frozen, generation-0 threshold %d",
             gc.get_freeze_count(), GC_GEN0_THRESHOLD)


def _connection_cap(config: Config) -> int:
    """``max_connections`` as the process can hold it: the soft RLIMIT_NOFILE is raised to the
    hard limit first, then the cap is lowered so that file descriptors remain free."""
    before, fd_limit = raise_fd_limit()
    if fd_limit != before:
        log.info("open file limit (RLIMIT_NOFILE) raised from %d to %d", before, fd_limit)
    cap = connection_cap(config.max_connections, fd_limit)
    if cap < config.max_connections:
        log.warning("max_connections lowered from %d to %d: the process may open %d files "
                    "(RLIMIT_NOFILE; raise the hard limit, e.g. LimitNOFILE= in systemd)",
                    config.max_connections, cap, fd_limit)
    return cap


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Libraries' debug chatter (every HTTP request) drowns what happened to whom.
    for noisy in ("geventwebsocket", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


class Server:
    """Listeners on every (interface, port) pair, sharing one Core."""

    def __init__(self, config: Config, roster_backend=None):
        self.config = config
        self.core = Core(config, roster_backend=roster_backend)
        self.app = WebApp(self.core)
        pool = self._pool = Pool(_connection_cap(config))  # every connection's handler greenlet
        self.listeners = []
        handler = ServerHandler.with_settings(WsSettings(
            max_message=config.stanza_size_limit + 1024,
            ping_interval=config.websocket_ping_interval,
            queue_size=config.websocket_max_queue,
            # WebSocket limits (issue 10: points 9, 11)
            max_queue_bytes=config.websocket_max_queue_bytes,
            max_frames=config.websocket_max_message_frames,
            max_wire=config.websocket_max_message_wire_bytes,
            flush_timeout=config.websocket_flush_timeout,  # then what is left is given back
        ))
        for interface in config.http_interfaces:
            for port in config.http_ports:
                listener = WSGIServer(
                    (interface, port), self.app, handler_class=handler, spawn=pool,
                    log=None, error_log=logging.getLogger("boshroster.http"), backlog=LISTEN_BACKLOG,
                )
                self.listeners.append(listener)
        # transports/http_limits.py: timeouts, header caps, per-address cap; when the pool is full, idle
        # connections make room for new ones (listener.full is gevent's accept-time check).
        self.http_limits = HttpLimits(config, pool, self.listeners)
        for listener in self.listeners:
            listener.boshroster_limits = self.http_limits
            listener.full = self.http_limits.pool_full
        self._stopping = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [listener.address[:2] for listener in self.listeners]

    def start(self) -> None:
        for listener in self.listeners:
            listener.start()
        for host, port in self.addresses:
            log.info("boshroster serving %s on http://%s:%s/ (BOSH /http-bind, WebSocket /xmpp-websocket)",
                     self.config.domain, host, port)

    def stop(self, grace: float = 1.0) -> None:
        """Graceful: stop accepting, tell every client system-shutdown, end once all is written.

        Held BOSH requests are answered with ``system-shutdown`` (``bosh.shutdown``) and
        WebSocket streams get their stream error and close frame (``core.shutdown``); their
        handler greenlets end once that is written (and, for WebSocket, the peer's close frame
        is back).  Kept-alive connections with no request in progress are closed at once.  The
        wait lasts only while some handler is still running, ``grace`` seconds at most; what
        is left then is killed.
        """
        if self._stopping:
            return
        self._stopping = True
        deadline = time.monotonic() + grace
        log.info("shutting down")
        for listener in self.listeners:
            listener.close()  # the port closes: no new connection during shutdown
        self.app.bosh.shutdown()
        self.core.shutdown()
        self.http_limits.close_waiting()
        # A connection busy when close_waiting ran ends on its own: it reads no next request.
        if not self._pool.join(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("shutdown: %d connection(s) still busy after %.1fs; closing them",
                        len(self._pool), grace)
            self._pool.kill(block=True, timeout=1)
        log.info("stopped")

    def serve_forever(self) -> None:
        tune_gc()  # `boshroster serve` only: a Server built inside another program keeps its GC
        self.start()
        done = gevent.event.Event()

        def on_signal(signum):
            log.info("signal %s received", signal.Signals(signum).name)
            done.set()

        gevent.signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
        gevent.signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
        done.wait()
        self.stop()




"""Process wiring: gevent WSGI listeners, logging, graceful shutdown.

gevent's pywsgi is not meant to face the Internet directly (its own docs):
deployments put nginx in front (conf/nginx.conf).  Every accepted socket
gets TCP_NODELAY from wsadapter.ServerHandler, since kept-alive BOSH
responses otherwise stall on delayed ACKs.
"""

from __future__ import annotations

import logging
import signal

import gevent
import gevent.event
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from boshroster.config import Config
from boshroster.wiring import Core
from boshroster.web.app import WebApp
from boshroster.transports.http_handler import ServerHandler

log = logging.getLogger("boshroster.server")


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
        pool = Pool(config.max_connections)
        self.listeners = []
        for interface in config.http_interfaces:
            for port in config.http_ports:
                listener = WSGIServer(
                    (interface, port), self.app, handler_class=ServerHandler, spawn=pool,
                    log=None, error_log=logging.getLogger("boshroster.http"),
                )
                listener.ws_max_message = config.stanza_size_limit + 1024
                listener.ws_ping_interval = config.websocket_ping_interval
                listener.ws_queue_size = config.websocket_max_queue
                # WebSocket limits (issue 10: points 9, 11)
                listener.ws_max_queue_bytes = config.websocket_max_queue_bytes
                listener.ws_max_frames = config.websocket_max_message_frames
                listener.ws_max_wire = config.websocket_max_message_wire_bytes
                self.listeners.append(listener)
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
        """Graceful: every client is told system-shutdown, then listeners close."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down")
        self.app.bosh.shutdown()
        self.core.shutdown()
        gevent.sleep(min(grace, 0.5))  # let held BOSH requests and WebSocket writers flush
        for listener in self.listeners:
            listener.stop(timeout=grace)
        log.info("stopped")

    def serve_forever(self) -> None:
        self.start()
        done = gevent.event.Event()

        def on_signal(signum):
            log.info("signal %s received", signal.Signals(signum).name)
            done.set()

        gevent.signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
        gevent.signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
        done.wait()
        self.stop()




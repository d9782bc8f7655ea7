"""The machine's ceilings for one gevent process: what boshroster's figures are divided by.

``python bench/ceiling.py http``  bare gevent pywsgi app.  ``POST /`` reads the body and
                                  answers a tiny XML body; ``POST /hold?s=N`` first sleeps N
                                  seconds (a parked BOSH request without any XMPP).
``python bench/ceiling.py ws``    bare gevent-websocket echo: every text message is sent back.

Both set TCP_NODELAY on accepted sockets (design notes F: without it a kept-alive pywsgi
response waits ~40 ms for the client's delayed ACK).  Prints ``PORT <n>`` once listening.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

_REPLY = b"<body xmlns='http://jabber.org/protocol/httpbind'/>"
_HEADERS = [("Content-Type", "text/xml; charset=utf-8"), ("Content-Length", str(len(_REPLY)))]


def _nodelay(sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class HttpHandler(WSGIHandler):
    def handle(self):
        _nodelay(self.socket)
        return super().handle()


class WsHandler(WebSocketHandler):
    def handle(self):
        _nodelay(self.socket)
        return super().handle()


def http_app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    if environ.get("PATH_INFO") == "/hold":
        query = environ.get("QUERY_STRING", "")
        seconds = float(query[2:]) if query.startswith("s=") else 10.0
        gevent.sleep(seconds)
    start_response("200 OK", _HEADERS)
    return [_REPLY]


def ws_app(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("400 Bad Request", [("Content-Length", "0")])
        return [b""]
    while True:
        message = ws.receive()
        if message is None:
            break
        ws.send(message)
    return []


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("http", "ws"))
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app, handler = (http_app, HttpHandler) if args.mode == "http" else (ws_app, WsHandler)
    server = WSGIServer(("127.0.0.1", args.port), app, handler_class=handler, spawn=Pool(20000),
                        log=None, error_log=None, backlog=1024)
    server.start()
    print(f"PORT {server.server_port}", flush=True)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    server.stop(timeout=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

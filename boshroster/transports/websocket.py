"""XMPP over WebSocket (RFC 7395): messages in, stanzas to the session core.

Each WebSocket message is one complete element: <open/>, <close/>, or a
stanza/nonza (§3.3).  The socket itself (subprotocol, frames, size cap, the
single writer, pings) lives in wsadapter.py; this module only does the
framing of the XMPP stream on top of it.  One reader greenlet per socket
feeds the session, so stanzas are processed in order (RFC 6120 §10.1).
"""

from __future__ import annotations

import logging
import secrets

from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StreamError
from boshroster.xmpp.stream import ClientSession, Peer
from boshroster.transports.ws_connection import MessageTooLarge
from boshroster.xmpp.xmlio import E, Element, NS_FRAMING, NS_STREAM, XML_LANG

log = logging.getLogger("boshroster.websocket")

_OPEN = f"{{{NS_FRAMING}}}open"
_CLOSE = f"{{{NS_FRAMING}}}close"
_CLOSE_XML = f'<close xmlns="{NS_FRAMING}"/>'


class WebSocketStream:
    """The transport object the ClientSession writes into."""

    kind = "websocket"

    def __init__(self, core, conn, peer: Peer):
        self.core = core
        self.conn = conn
        self.session = ClientSession(core, self, peer)
        self.opened = False

    def send(self, el: Element) -> None:
        self.conn.send(xmlio.tostring(el))

    def stream_error(self, error: Element) -> None:
        # RFC 6120 §4.9.1.2: an error before the stream is open still opens it first
        # (as Prosody does); RFC 7395 §3.5: the error, then <close/>, then the WebSocket close.
        if not self.opened:
            self._send_open()
        self.conn.send(xmlio.tostring(error))
        self.conn.send(_CLOSE_XML)
        condition = xmlio.split_tag(error[0].tag)[1] if len(error) else ""
        self.conn.close(1008 if condition == "policy-violation" else 1000)

    def _open(self, el: Element) -> None:
        features = self.session.restart() if self.session.state == "restart" else self.session.open_stream(el.get("to"))
        self._send_open()
        self.conn.send(xmlio.tostring(features))

    def _send_open(self) -> None:
        self.opened = True
        attrs = {
            "from": self.core.config.domain,
            "id": self.session.stream_id or secrets.token_urlsafe(12),
            "version": "1.0",
            XML_LANG: "en",
        }
        self.conn.send(xmlio.tostring(E(_OPEN, attrs)))

    def run(self) -> None:
        """Read until the socket closes; always ends the session."""
        limit = self.core.config.stanza_size_limit
        reason = "connection closed"
        try:
            while not self.session.ended:
                try:
                    text = self.conn.receive()
                except MessageTooLarge:
                    self.session.fail("policy-violation", "stanza too large")
                    return
                if text is None:
                    reason = "connection dropped" if not self.conn.closed else "connection closed"
                    return
                try:
                    el = xmlio.parse(text, limit, max_depth=self.core.config.stanza_max_depth)
                except xmlio.XMLError as err:
                    if err.condition == "policy-violation":  # a limit was hit (issue 10, point 7)
                        log.warning("WebSocket message from %s refused: %s", self.session.peer.ip, err.text)
                    self.session.fail(err.condition, err.text)
                    return
                try:
                    if el.tag == _OPEN:
                        self._open(el)
                    elif el.tag == _CLOSE:
                        # §3.6: the client closes; answer <close/> and end.
                        self.conn.send(_CLOSE_XML)
                        self.conn.close(1000)
                        reason = "client closed the stream"
                        return
                    elif not self.opened:
                        raise StreamError("not-well-formed", "send <open/> first")
                    elif el.tag.startswith(f"{{{NS_STREAM}}}"):
                        raise StreamError("unsupported-stanza-type", "stream elements are not accepted here")
                    else:
                        self.session.feed(el)
                except StreamError as err:
                    self.session.fail(err.condition, err.text)
                    return
        finally:
            self.session.end(reason)
            if not self.conn.closed:
                self.conn.close(1000)

"""XMPP over WebSocket (RFC 7395): messages in, stanzas to the session core.

Each WebSocket message is one complete element: <open/>, <close/>, or a
stanza/nonza (§3.3).  The socket itself (subprotocol, frames, size and frame
caps, the bounded output queue, the single writer, pings) lives in
ws_connection.py; this module only does the framing of the XMPP stream on top
of it.  One reader greenlet per socket feeds the session, so stanzas are
processed in order (RFC 6120 §10.1).
"""

from __future__ import annotations

import logging
import secrets

import gevent

from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StreamError, stream_error_element
from boshroster.xmpp.stream import ClientSession, Peer
from boshroster.transports.ws_connection import MessageTooLarge
from boshroster.xmpp.xmlio import E, Element, NS_FRAMING, NS_STREAM, XML_LANG

log = logging.getLogger("boshroster.websocket")

_OPEN = f"{{{NS_FRAMING}}}open"
_CLOSE = f"{{{NS_FRAMING}}}close"
_CLOSE_XML = f'<close xmlns="{NS_FRAMING}"/>'
# WebSocket close code after a stream error (RFC 6455 §7.4.1); the rest close with 1000
_CLOSE_CODES = {"policy-violation": 1008, "resource-constraint": 1008}


class WebSocketStream:
    """The transport object the ClientSession writes into.

    Shared state: ``conn`` is written to by any greenlet (routing to this session);
    ``opened``/``_errored`` by whichever greenlet ends or opens the stream (the reader, a
    sender whose send overflowed the queue, the negotiation timer's greenlet); each is a
    one-way flag, so the order does not matter.
    What the connection never wrote comes back through ``_give_back`` (``conn.on_undelivered``),
    once, from the connection's handler greenlet after :meth:`run` returned.
    """

    kind = "websocket"
    tracks_delivery = True  # send(el, delivered): delivered(True) once the kernel has it

    def __init__(self, core, conn, peer: Peer):
        self.core = core
        self.conn = conn
        self.session = ClientSession(core, self, peer)
        self.opened = False
        self._errored = False
        self._close_code = None  # overrides _CLOSE_CODES for the next stream error
        conn.on_overflow = self._overflowed
        conn.on_undelivered = self._give_back
        # RFC 6120 leaves it to the server: a connection that has no bound session after
        # c2s_negotiation_timeout seconds is closed (as ejabberd's negotiation_timeout),
        # so idle upgraded sockets cannot hold connection slots (issue 10.8).
        self._negotiation = None
        timeout = getattr(core.config, "c2s_negotiation_timeout", 0)
        if timeout and timeout > 0:
            self._negotiation = gevent.get_hub().loop.timer(float(timeout))
            self._negotiation.start(self._negotiation_expired)

    @property
    def congested(self) -> bool:
        """The output queue is more than half full (``websocket_max_queue_bytes``)."""
        return self.conn.congested

    def send(self, el: Element, delivered=None) -> None:
        # Without stream management the connection keeps the stanza until it is written, and
        # gives it back if it never is (_give_back); with it (XEP-0198) the session keeps what
        # the client has not acknowledged and gives that back itself.  A stanza with a
        # ``delivered`` callback belongs to its owner (offline storage): told False instead.
        item = el if delivered is None and self.session.sm is None else None
        self.conn.send(xmlio.tostring(el), delivered, item)

    def _give_back(self, stanzas: list[Element]) -> None:
        """The connection is over and these stanzas were never written to its socket (the
        client vanished, was cut off, or did not read them within websocket_flush_timeout):
        back to routing as BOSH's give-back does (other resources, offline storage, else
        bounced to the sender; im/messages.py), one by one, so one failure costs one stanza.
        Runs in the connection's handler greenlet after run() returned: the session has
        ended (unbound), so nothing given back comes back to it."""
        session = self.session
        for el in stanzas:
            try:
                session.return_undelivered([el])
            except Exception:  # noqa: BLE001 - costs this stanza only
                log.exception("could not give back a stanza of the WebSocket session of %s", session.jid_str)

    def stream_error(self, error: Element) -> None:
        # RFC 6120 §4.9.1.2: an error before the stream is open still opens it first
        # (as Prosody does); RFC 7395 §3.5: the error, then <close/>, then the WebSocket close.
        # These last messages bypass the output queue's caps.
        if self._errored:
            return
        self._errored = True
        final = []
        if not self.opened:
            final.append(self._open_xml())
        final.append(xmlio.tostring(error))
        final.append(_CLOSE_XML)
        condition = xmlio.split_tag(error[0].tag)[1] if len(error) else ""
        self.conn.close(self._close_code or _CLOSE_CODES.get(condition, 1000), "", final)

    def _overflowed(self) -> None:
        """The client does not read and its output queue is full (the connection has logged
        it and dropped what was queued): RFC 6120 §4.9.3.17 resource-constraint. Runs in the
        greenlet that sent, maybe deep inside routing another user's stanza: the stream is
        closed now, the session (which tells contacts, may block) ends in a greenlet of its own."""
        text = "output queue full: the client is not reading"
        self.stream_error(stream_error_element("resource-constraint", text))
        gevent.spawn(self.session.fail, "resource-constraint", text)

    def _negotiation_expired(self) -> None:
        # a hub timer callback: nothing that may block here
        self._negotiation = None
        if self.session.state not in ("active", "ended"):
            gevent.spawn(self._negotiation_timeout)

    def _negotiation_timeout(self) -> None:
        session = self.session
        if session.state in ("active", "ended"):
            return
        timeout = self.core.config.c2s_negotiation_timeout
        log.warning("websocket %s: no session negotiated within %g s (stream state %s, user %s); closing",
                    session.peer.ip, timeout, session.state, session.username or "-")
        session.fail("connection-timeout", f"no session established within {timeout:g} seconds")

    def _stop_negotiation_timer(self) -> None:
        timer = self._negotiation
        if timer is not None:
            self._negotiation = None
            timer.close()

    def _open(self, el: Element) -> None:
        features = self.session.restart() if self.session.state == "restart" else self.session.open_stream(el.get("to"))
        self.conn.send(self._open_xml())
        self.conn.send(xmlio.tostring(features))

    def _open_xml(self) -> str:
        self.opened = True
        attrs = {
            "from": self.core.config.domain,
            "id": self.session.stream_id or secrets.token_urlsafe(12),
            "version": "1.0",
            XML_LANG: "en",
        }
        return xmlio.tostring(E(_OPEN, attrs))

    def run(self) -> None:
        """Read until the socket closes; always ends the session. ``self.session`` is read
        afresh each time: a XEP-0198 resumption hands this stream another session."""
        limit = self.core.config.stanza_size_limit
        reason = "connection closed"
        try:
            while not self.session.ended:
                try:
                    text = self.conn.receive()
                except MessageTooLarge as exc:
                    self._close_code = exc.close_code
                    self.session.fail("policy-violation", "stanza too large" if exc.close_code == 1009 else str(exc))
                    return
                if text is None:
                    # No close frame either way: the network went away (not a logout).
                    dropped = self.conn.peer_close_code is None and self.conn.close_code is None
                    reason = "connection dropped" if dropped else "connection closed"
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
                        self.conn.close(1000, "", (_CLOSE_XML,))
                        reason = "client closed the stream"
                        return
                    elif not self.opened:
                        raise StreamError("not-well-formed", "send <open/> first")
                    elif el.tag.startswith(f"{{{NS_STREAM}}}"):
                        raise StreamError("unsupported-stanza-type", "stream elements are not accepted here")
                    else:
                        self.session.feed(el)
                        if self._negotiation is not None and self.session.state == "active":
                            self._stop_negotiation_timer()
                except StreamError as err:
                    self.session.fail(err.condition, err.text)
                    return
        finally:
            self._stop_negotiation_timer()
            self.conn.on_overflow = None  # no cycle conn <-> stream left behind
            if reason != "client closed the stream":
                # RFC 7395 §3.6.1, XEP-0198 §7: a WebSocket closed (close frame or not) without
                # <close/> leaves the stream unfinished; a resumable session hibernates.  A
                # browser closes with 1001 when the page unloads: a reload must be resumable.
                self.session.connection_lost(reason)
            else:
                self.session.end(reason)
            if not self.conn.closed:
                self.conn.close(1000)

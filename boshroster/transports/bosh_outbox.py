"""What one BOSH session owes its client: queued stanzas and unacknowledged responses.

Nothing accepted is lost (issue 10 points 2–5):

* Acknowledgements (XEP-0124 §9.2).  ``take`` builds a response and keeps
  what it carried as *unacknowledged* until the client shows it has it
  (``acknowledge``): in a session created with ``ack='1'``, by the ``ack``
  attribute of a later request (no ``ack`` means "every earlier response");
  otherwise by the client's next request, which acknowledges every response
  sent before it arrived (a client sends its next request once it has read a
  response; Strophe does).  Then the ``delivered`` callbacks of its stanzas
  get True (offline storage deletes the rows).  When the session ends,
  ``give_back_all``: callbacks of unacknowledged and pending stanzas get
  False, the other stanzas go back to routing (other resources, offline
  storage) one by one, so that one failure costs one stanza (point 4).
* Bounds.  The queue is bounded in stanzas and bytes (``bosh_max_pending``,
  ``bosh_max_pending_bytes``); above a high-water mark the outbox is
  ``congested`` (routing bounces other users' stanzas to their sender with
  ``resource-constraint``).  Past the hard bound the newest stanza is refused
  (the oldest are kept): its callback told False, or an error routed to its
  sender, a WARNING logged; the session is never ended for it.  A response
  carries at most ``bosh_max_response_bytes`` (at least one stanza).
* Stanzas are serialized when queued (``add``): one that cannot be serialized
  is refused on its own, never breaking the response it would have been in,
  and the queue's size in bytes is known.

Bookkeeping: ``pending`` holds the serialized stanzas and ``pending_el`` the
same stanzas as elements (given back at the end); ``_seq`` numbers
``pending[0]``; ``_callbacks`` holds ``(seq, delivered)`` only for stanzas
that have a ``delivered`` callback (most have none: no object per stanza
then).  ``unacked`` maps the rid of each sent response that carried stanzas
to an *entry* ``(first seq, elements, callbacks or None)``.

Greenlet safety: owned by one BoshSession and mutated only through it (by its
request greenlets, timers, and ``send`` from any user's greenlet), in
methods that never yield; callbacks and routing run synchronously inside.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from typing import Callable

from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StanzaError, error_reply
from boshroster.xmpp.xmlio import Element, NS_BOSH, NS_CLIENT, NS_STREAM

log = logging.getLogger("boshroster.bosh")

BODY_OPEN = f'<body xmlns="{NS_BOSH}" xmlns:stream="{NS_STREAM}"'
EMPTY_BODY = f"{BODY_OPEN}/>".encode("utf-8")
DECLARED = frozenset({NS_STREAM})
_BODY_START = BODY_OPEN + ">"

_MESSAGE = f"{{{NS_CLIENT}}}message"
_IQ = f"{{{NS_CLIENT}}}iq"
Delivered = Callable[[bool], None]
Entry = tuple  # (first seq, list of elements, list of (seq, delivered) or None)


class Outbox:
    """``owner`` is the BoshSession: its ``session`` (the ClientSession) routes what is
    given back and refused; ``acks`` says the client sends 'ack' attributes."""

    def __init__(self, owner, config, keep_unacked: int, acks: bool):
        self.owner = owner
        self.acks = acks
        self.max_pending = config.bosh_max_pending
        self.max_pending_bytes = config.bosh_max_pending_bytes
        self.high_water = config.bosh_high_water_stanzas
        self.high_water_bytes = config.bosh_high_water_bytes
        self.max_response = config.bosh_max_response_bytes
        self.keep_unacked = keep_unacked  # more unacknowledged responses than the replay buffer: given back
        self.pending: list[str] = []
        self.pending_el: list[Element] = []
        self.pending_bytes = 0
        self._seq = 0
        self._callbacks: deque[tuple[int, Delivered]] = deque()
        self.unacked: OrderedDict[int, Entry] = OrderedDict()
        self.refused = 0  # stanzas refused since the queue last hit its hard bound
        self.frozen = False  # shutting down: responses carry nothing new, so that acks catch up

    @property
    def ready(self) -> bool:
        """There is something to put in a response."""
        return bool(self.pending) and not self.frozen

    @property
    def awaiting_ack(self) -> bool:
        """A sent response carried stanzas whose owner waits for the acknowledgement
        (offline storage pages through its rows as earlier ones are confirmed)."""
        return any(entry[2] for entry in self.unacked.values())

    @property
    def congested(self) -> bool:
        return len(self.pending) > self.high_water or self.pending_bytes > self.high_water_bytes

    def add(self, el: Element, delivered: Delivered | None) -> bool:
        """Queue ``el``; False when it is refused (and its owner or sender told)."""
        owner = self.owner.session.jid_str or "(unbound)"
        try:
            text = xmlio.tostring(el, NS_BOSH, DECLARED)
        except Exception as exc:  # noqa: BLE001 - e.g. RecursionError on absurd nesting: this stanza only
            log.warning("stanza for %s cannot be serialized (%s): refused", owner, type(exc).__name__)
            self._refuse(el, delivered, "internal-server-error")
            return False
        size = len(text)
        pending = self.pending
        if pending and (len(pending) >= self.max_pending or self.pending_bytes + size > self.max_pending_bytes):
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "BOSH queue of %s full (%d stanzas, %d bytes; bosh_max_pending=%d, bosh_max_pending_bytes=%d):"
                    " newest refused, %d so far", owner, len(pending), self.pending_bytes,
                    self.max_pending, self.max_pending_bytes, self.refused,
                )
            self._refuse(el, delivered, "resource-constraint")
            return False
        if delivered is not None:
            self._callbacks.append((self._seq + len(pending), delivered))
        pending.append(text)
        self.pending_el.append(el)
        self.pending_bytes += size
        return True

    def take(self, rid: int) -> bytes:
        """The response to ``rid``: pending stanzas up to ``max_response`` bytes (at least one)."""
        pending = self.pending
        if not pending or self.frozen:
            return EMPTY_BODY
        n = len(pending)
        size = self.pending_bytes
        if size > self.max_response:
            size = n = 0
            for text in pending:
                if n and size + len(text) > self.max_response:
                    break
                size += len(text)
                n += 1
        if n == len(pending):
            texts, els = pending, self.pending_el
            self.pending, self.pending_el = [], []
        else:
            texts, els = pending[:n], self.pending_el[:n]
            del pending[:n]
            del self.pending_el[:n]
        self.pending_bytes -= size
        if self.refused and len(self.pending) < self.max_pending // 2:
            log.info("BOSH queue of %s draining: %d stanza(s) were refused while it was full",
                     self.owner.session.jid_str, self.refused)
            self.refused = 0
        base = self._seq
        end = self._seq = base + n
        callbacks = self._callbacks
        taken = None
        if callbacks and callbacks[0][0] < end:
            taken = []
            while callbacks and callbacks[0][0] < end:
                taken.append(callbacks.popleft())
        self.unacked[rid] = (base, els, taken)
        if len(self.unacked) > self.keep_unacked:
            # Never acknowledged, and too old to be asked for again (§14.3): give it back.
            self._give_back([self.unacked.popitem(last=False)[1]])
        return (_BODY_START + "".join(texts) + "</body>").encode("utf-8")

    def acknowledge(self, rid: int, ack: int | None) -> None:
        """A new request ``rid`` (with its 'ack', if any) arrived: what does the client have?"""
        unacked = self.unacked
        if not unacked:
            return
        if self.acks:
            upto = rid - 1 if ack is None else ack  # §9.2: no 'ack' means every earlier response arrived
        else:
            upto = rid  # every response sent before this request arrived (all have lower rids)
        while unacked:
            first = next(iter(unacked))
            if first > upto:
                break
            callbacks = unacked.pop(first)[2]
            if callbacks:
                for _seq, callback in callbacks:
                    self._call(callback, True)

    def give_back_all(self) -> None:
        """The session ended: everything the client may not have (unacknowledged, then pending)."""
        entries = list(self.unacked.values())
        self.unacked.clear()
        if self.pending_el:
            entries.append((self._seq, self.pending_el, list(self._callbacks)))
        self._seq += len(self.pending_el)
        self.pending, self.pending_el, self.pending_bytes = [], [], 0
        self._callbacks.clear()
        self._give_back(entries)

    def _give_back(self, entries: list[Entry]) -> None:
        """Callbacks get False; the other stanzas go back to routing, one by one."""
        session = self.owner.session
        for base, els, callbacks in entries:
            skip = None
            if callbacks:
                skip = set()
                for seq, callback in callbacks:
                    skip.add(seq)
                    self._call(callback, False)
            for index, el in enumerate(els):
                if skip is None or base + index not in skip:
                    try:
                        session.return_undelivered([el])
                    except Exception:  # noqa: BLE001 - costs this stanza only
                        log.exception("could not give back a stanza of the BOSH session of %s", session.jid_str)

    def _refuse(self, el: Element, delivered: Delivered | None, condition: str) -> None:
        """A stanza this outbox will not take: its owner is told (callback), or its sender
        gets an error routed from this session's JID; one without such a sender was
        server-generated and is only logged."""
        if delivered is not None:
            self._call(delivered, False)
            return
        session = self.owner.session
        sender = el.get("from") or ""
        if (el.tag not in (_MESSAGE, _IQ) or el.get("type") in ("error", "result")  # RFC 6120 §8.3.1
                or "/" not in sender or sender == session.jid_str or session.jid is None):
            log.info("%s for %s dropped (%s): no sender to tell", xmlio.split_tag(el.tag)[1], session.jid_str, condition)
            return
        reply = error_reply(el, StanzaError(condition, text="the recipient cannot take it now"))
        reply.attrib.pop("from", None)  # the router stamps this session's JID
        session.ctx.router.route(session, reply)

    def _call(self, callback: Delivered, ok: bool) -> None:
        try:
            callback(ok)
        except Exception:  # noqa: BLE001 - a bug in a callback must not break the transport
            log.exception("delivery callback failed for %s", self.owner.session.jid_str)

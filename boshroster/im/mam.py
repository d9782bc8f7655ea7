"""XEP-0313 Message Archive Management (``urn:xmpp:mam:2``, v0.8 with #extended) over an archive.

The protocol only: parse a query IQ (XEP-0004 form + XEP-0059 RSM set), answer
with result messages then the final IQ result carrying ``<fin/>``; the query
form (§4.1.5), archive metadata (§5), preferences (XEP-0441, split out of
XEP-0313 §6), and the message-side helpers the wiring uses to archive a chat
message and stamp its XEP-0359 ``<stanza-id/>``.  No I/O of its own: every
handler returns the stanzas to send, or raises StanzaError (the router turns
it into the error reply).  The archive (archive.py) is the shared state.

Errors, as the XEPs name them: malformed date -> bad-request (XEP-0082
profile required); unknown form field -> feature-not-implemented (§4.1.5);
unknown id in before-id/after-id/ids or RSM after/before -> item-not-found
(§4.1.3, §4.3.2); another user's archive -> forbidden (§9.1).  A ``max``
above the server maximum is clamped (§4.3.1 lets a server limit a page; the
fin then says complete='false' and the client pages on); a malformed one is
bad-request.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from boshroster.im.archive import (
    ArchiveUnavailable,
    ArchivedMessage,
    ArchivePage,
    ArchiveQuery,
    Copy,
    ItemNotFound,
    MessageArchive,
    Prefs,
    Stored,
    Unsupported,
)
from boshroster.im.archive import MAX_PREF_JIDS, POLICIES
from boshroster.xmpp.errors import StanzaError
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.jid import JID, JIDError
from boshroster.xmpp.router import HANDLED, StanzaEvent
from boshroster.xmpp.xmlio import E, Element, NS_CLIENT, NS_DELAY, NS_FORWARD
from boshroster.im.mam_stanzas import NS_SID, archivable, stamp_stanza_id, strip_stanza_ids  # noqa: F401 (re-exported)

log = logging.getLogger("boshroster.mam")

NS_MAM = "urn:xmpp:mam:2"
NS_MAM_EXTENDED = "urn:xmpp:mam:2#extended"  # before-id/after-id/ids, flip-page, metadata (§6)
NS_MAM_GROUPCHAT_FIELD = "urn:xmpp:mam:2#groupchat-field"  # we understand 'include-groupchat' (§6)
NS_RSM = "http://jabber.org/protocol/rsm"
NS_XDATA = "jabber:x:data"
NS_XDATA_VALIDATE = "http://jabber.org/protocol/xdata-validate"

# XEP-0313 §6: what the account's disco#info lists (an archive lives on the user's bare JID).
ACCOUNT_FEATURES = (NS_MAM, NS_MAM_EXTENDED, NS_MAM_GROUPCHAT_FIELD, NS_SID)

_IQ = f"{{{NS_CLIENT}}}iq"
_MESSAGE = f"{{{NS_CLIENT}}}message"
_QUERY = f"{{{NS_MAM}}}query"
_PREFS = f"{{{NS_MAM}}}prefs"
_METADATA = f"{{{NS_MAM}}}metadata"

_FORM_FIELDS = ("FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids", "include-groupchat")
_SINGLE = ("with", "start", "end", "before-id", "after-id", "include-groupchat")

# XEP-0082 DateTime profile: CCYY-MM-DDThh:mm:ss[.sss]TZD, the zone is mandatory.
_DATETIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})")


def parse_datetime(text: str) -> float:
    """XEP-0082 DateTime -> seconds since the epoch; ValueError if not that profile."""
    match = _DATETIME.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not an XEP-0082 DateTime: {text!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if zone == "Z":
        tz = timezone.utc
    else:
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError(f"bad zone offset in {text!r}")
        offset = timedelta(hours=hours, minutes=minutes)
        tz = timezone(-offset if zone[0] == "-" else offset)
    when = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz)
    return when.timestamp() + (float(fraction) if fraction else 0.0)


def format_datetime(stamp: float) -> str:
    """Seconds -> XEP-0082 DateTime in UTC with microseconds (a stamp a client sends back as
    'start' or 'end' then selects exactly that message)."""
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class MamRequest:
    queryid: str | None
    query: ArchiveQuery
    flip: bool  # XEP-0313 §4.3.5: send the page newest first


def _text(el: Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def _parse_form(form: Element, q: ArchiveQuery, max_ids: int) -> None:
    """XEP-0004 submit form with FORM_TYPE urn:xmpp:mam:2 (XEP-0313 §4.1)."""
    if form.get("type", "submit") != "submit":
        raise StanzaError("bad-request", text="the query form must be of type 'submit'")
    seen: set[str] = set()
    for field in form.findall(f"{{{NS_XDATA}}}field"):
        var = field.get("var")
        if not var:
            raise StanzaError("bad-request", text="a form field without 'var'")
        if var in seen:
            raise StanzaError("bad-request", text=f"field {var!r} given twice")
        seen.add(var)
        if var not in _FORM_FIELDS:
            # XEP-0313 §4.1.5: a field the server does not recognise.
            raise StanzaError("feature-not-implemented", text=f"unsupported query field {var!r}")
        values = [_text(v) for v in field.findall(f"{{{NS_XDATA}}}value")]
        values = [v for v in values if v]
        if var in _SINGLE and len(values) > 1:
            raise StanzaError("bad-request", text=f"field {var!r} takes one value")
        value = values[0] if values else None
        if var == "FORM_TYPE":
            if value != NS_MAM:
                raise StanzaError("bad-request", text=f"FORM_TYPE must be {NS_MAM}")
        elif value is None and var != "ids":
            continue  # an empty field filters nothing
        elif var == "with":
            try:
                jid = JID.parse(value)
            except JIDError:
                raise StanzaError("jid-malformed", text=f"'with' is not a JID: {value!r}") from None
            q.with_jid = str(jid.bare)
            q.with_resource = jid.resource
        elif var in ("start", "end"):
            try:
                stamp = parse_datetime(value)
            except ValueError:
                raise StanzaError("bad-request", text=f"'{var}' is not an XEP-0082 DateTime: {value!r}") from None
            if var == "start":
                q.start = stamp
            else:
                q.end = stamp
        elif var == "after-id":
            q.after_id = value
        elif var == "before-id":
            q.before_id = value
        elif var == "ids":
            if len(values) > max_ids:
                log.warning("MAM query named %d ids; the limit is %d", len(values), max_ids)
                raise StanzaError("policy-violation", text=f"at most {max_ids} ids per query")
            q.ids = values or None
        elif var == "include-groupchat":
            if value not in ("true", "false", "1", "0"):
                raise StanzaError("bad-request", text="'include-groupchat' is a boolean")
            # Groupchat messages are never in a user's archive here, so both answers are honoured.


def _parse_rsm(rsm: Element, q: ArchiveQuery, max_page: int) -> None:
    """XEP-0059 request: max, after, before (empty = last page), index."""
    max_el = rsm.find(f"{{{NS_RSM}}}max")
    if max_el is not None:
        try:
            wanted = int(_text(max_el))
        except ValueError:
            raise StanzaError("bad-request", text="RSM <max/> must be an integer") from None
        if wanted < 0:
            raise StanzaError("bad-request", text="RSM <max/> must not be negative")
        if wanted > max_page:
            log.warning("MAM query asked for %d results; clamped to mam_max_page=%d", wanted, max_page)
            wanted = max_page
        q.max = wanted
    after = rsm.find(f"{{{NS_RSM}}}after")
    before = rsm.find(f"{{{NS_RSM}}}before")
    index = rsm.find(f"{{{NS_RSM}}}index")
    if after is not None:
        q.after = _text(after)  # an empty <after/> names no message: item-not-found, as any unknown id
    if before is not None:
        q.before = _text(before)
    if index is not None:
        if after is not None or before is not None:
            raise StanzaError("bad-request", text="RSM <index/> cannot be combined with <after/> or <before/>")
        try:
            q.index = int(_text(index))
        except ValueError:
            raise StanzaError("bad-request", text="RSM <index/> must be an integer") from None
        if q.index < 0:
            raise StanzaError("bad-request", text="RSM <index/> must not be negative")


def parse_query(query: Element, default_page: int, max_page: int) -> MamRequest:
    """A <query xmlns='urn:xmpp:mam:2'/> of an IQ set -> MamRequest; raise StanzaError."""
    if query.get("node") is not None:
        # §5.1.3 reserves 'node' for pubsub archives; a user's archive has none.
        raise StanzaError("item-not-found", text="this archive has no nodes")
    q = ArchiveQuery(max=default_page)
    form = query.find(f"{{{NS_XDATA}}}x")
    if form is not None:
        _parse_form(form, q, max_page)
    rsm = query.find(f"{{{NS_RSM}}}set")
    if rsm is not None:
        _parse_rsm(rsm, q, max_page)
    flip = query.find(f"{{{NS_MAM}}}flip-page") is not None
    return MamRequest(query.get("queryid"), q, flip)


def query_form() -> Element:
    """XEP-0313 §4.1.5: the fields this server supports (none of them required)."""
    x = E(f"{{{NS_XDATA}}}x", {"type": "form"},
          E(f"{{{NS_XDATA}}}field", {"type": "hidden", "var": "FORM_TYPE"}, E(f"{{{NS_XDATA}}}value", text=NS_MAM)),
          E(f"{{{NS_XDATA}}}field", {"type": "jid-single", "var": "with"}),
          E(f"{{{NS_XDATA}}}field", {"type": "text-single", "var": "start"}),
          E(f"{{{NS_XDATA}}}field", {"type": "text-single", "var": "end"}),
          E(f"{{{NS_XDATA}}}field", {"type": "text-single", "var": "before-id"}),
          E(f"{{{NS_XDATA}}}field", {"type": "text-single", "var": "after-id"}),
          E(f"{{{NS_XDATA}}}field", {"type": "list-multi", "var": "ids"},
            E(f"{{{NS_XDATA_VALIDATE}}}validate", {"datatype": "xs:string"}, E(f"{{{NS_XDATA_VALIDATE}}}open"))),
          E(f"{{{NS_XDATA}}}field", {"type": "boolean", "var": "include-groupchat"}))
    return E(_QUERY, None, x)


def result_message(to: str | None, archive_jid: str, queryid: str | None, item: ArchivedMessage) -> Element:
    """XEP-0313 §4.2: <message><result queryid id><forwarded><delay/><message/></forwarded></result>."""
    forwarded = E(f"{{{NS_FORWARD}}}forwarded", None,
                  E(f"{{{NS_DELAY}}}delay", {"stamp": format_datetime(item.stamp)}))
    if item.stanza is not None:
        forwarded.append(item.stanza)
    else:
        # §3.2 allows a result without the message; better than failing the whole page.
        log.error("archived message %s is unreadable; sent without its stanza", item.id)
    result = E(f"{{{NS_MAM}}}result", {"queryid": queryid, "id": item.id}, forwarded)
    return E(_MESSAGE, {"to": to, "from": archive_jid}, result)


def fin_element(queryid: str | None, page: ArchivePage) -> Element:
    """XEP-0313 §4.3: <fin complete><set><first index/><last/><count/></set></fin>."""
    rsm = E(f"{{{NS_RSM}}}set")
    if page.items:  # XEP-0059 §2.2: no first/last for an empty page
        index = str(page.first_index) if page.first_index is not None else None
        rsm.append(E(f"{{{NS_RSM}}}first", {"index": index}, text=page.items[0].id))
        rsm.append(E(f"{{{NS_RSM}}}last", text=page.items[-1].id))
    if page.count is not None:
        rsm.append(E(f"{{{NS_RSM}}}count", text=str(page.count)))
    return E(f"{{{NS_MAM}}}fin", {"queryid": queryid, "complete": "true" if page.complete else None}, rsm)


def prefs_element(prefs: Prefs) -> Element:
    """XEP-0441 §2.1: <always/> and <never/> are always present."""
    return E(_PREFS, {"default": prefs.default},
             E(f"{{{NS_MAM}}}always", None, *(E(f"{{{NS_MAM}}}jid", text=j) for j in prefs.always)),
             E(f"{{{NS_MAM}}}never", None, *(E(f"{{{NS_MAM}}}jid", text=j) for j in prefs.never)))


def parse_prefs(el: Element) -> Prefs:
    """An XEP-0441 <prefs/> of an IQ set -> Prefs; raise StanzaError."""
    default = el.get("default")
    if default not in POLICIES:
        raise StanzaError("bad-request", text=f"'default' must be one of {', '.join(POLICIES)}")
    lists = {}
    for name in ("always", "never"):
        jids: list[str] = []
        holder = el.find(f"{{{NS_MAM}}}{name}")
        for item in holder.findall(f"{{{NS_MAM}}}jid") if holder is not None else ():
            try:
                jids.append(str(JID.parse(_text(item))))
            except JIDError:
                raise StanzaError("jid-malformed", text=f"not a JID in <{name}/>: {_text(item)!r}") from None
        if len(jids) > MAX_PREF_JIDS:
            log.warning("MAM preferences with %d JIDs in <%s/>; the limit is %d", len(jids), name, MAX_PREF_JIDS)
            raise StanzaError("policy-violation", text=f"at most {MAX_PREF_JIDS} JIDs in <{name}/>")
        lists[name] = tuple(jids)
    return Prefs(default, lists["always"], lists["never"])


def _result(iq: Element, *children: Element) -> Element:
    return E(_IQ, {"type": "result", "id": iq.get("id"), "to": iq.get("from"), "from": iq.get("to")}, *children)


class MamService:
    """Answers MAM IQs for local accounts and archives their messages.

    ``in_roster(username, peer_bare)`` answers XEP-0441 default='roster'.
    """

    def __init__(self, archive: MessageArchive, domain: str, *, default_page: int = 50, max_page: int = 250,
                 in_roster: Callable[[str, str], bool] | None = None):
        self.archive = archive
        self.domain = domain
        self.max_page = max(1, max_page)
        self.default_page = min(max(1, default_page), self.max_page)
        self.in_roster = in_roster
        self._warned = -1e9  # when the last "archive unavailable" warning was logged

    def register(self, bus: EventBus, account_features: list[str]) -> None:
        """Hook the bus (router.py names the events) and advertise on the account (XEP-0313 §6).

        - ``iq-get|set/self/urn:xmpp:mam:2:query|prefs|metadata``: the user's own archive
          (no 'to', or their bare JID); ``…/bare/…``: someone else's -> forbidden.  An IQ
          to the domain is hooked by nobody: service-unavailable.
        - ``pre-message/bare|full`` (first): forged <stanza-id/>s go before anything sees them.
        - ``message-accepted``: archive for both parties, stamp the recipient's id on the
          stanza that is then delivered, carbon-copied to the recipient or stored offline
          (also for the app's API messages, which have no origin session).
        - ``message-bounced``: that message was refused after all: out of the archive.
        - ``message-stored``: commit the archive at once, so that what offline storage
          holds (with its id) is in the archive too, even across a crash."""
        account_features.extend(f for f in ACCOUNT_FEATURES if f not in account_features)
        for kind in ("get", "set"):
            for name in ("query", "prefs", "metadata"):
                for target in ("self", "bare"):
                    bus.hook(f"iq-{kind}/{target}/{NS_MAM}:{name}", self._on_iq)
        for target in ("bare", "full"):
            bus.hook(f"pre-message/{target}", self._on_pre_message, priority=100)
        bus.hook("message-accepted", self._on_accepted)
        bus.hook("message-bounced", self._on_bounced)
        bus.hook("message-stored", lambda event: self._flush())

    def _on_iq(self, event: StanzaEvent):
        for stanza in self.handle_iq(event.origin.username, event.stanza, event.to):
            event.origin.send(stanza)
        return HANDLED

    def _on_pre_message(self, event: StanzaEvent) -> None:
        strip_stanza_ids(event.stanza, self.domain)

    def _on_accepted(self, event: StanzaEvent) -> None:
        recipient = event.to
        stanza = event.stanza
        try:
            # A client's message: its session's JID.  The app's API (origin None): the stanza's
            # 'from', the domain (no archive of its own) or one of its users.
            sender = event.origin.jid if event.origin is not None else JID.parse(stanza.get("from") or self.domain)
            # pre-message already removed forged ids: no second pass.
            stored, _, recipient_at = self._archive(stanza, sender, recipient, sender.local is not None, True, False)
        except ArchiveUnavailable as exc:
            now = time.monotonic()
            if now - self._warned > 60:  # one line a minute, not one per message, while it is away
                self._warned = now
                log.warning("archive unavailable (%s): messages delivered without archiving", exc)
            return None
        except Exception:  # noqa: BLE001 - the archive failing must not cost the live message
            log.exception("archiving a message from %s failed; delivered without a stanza-id", stanza.get("from"))
            return None
        if stored is None:
            return None
        if recipient_at is not None:
            stamp_stanza_id(stanza, f"{recipient.local}@{recipient.domain}", stored[recipient_at], replace=False)
        event.archived = stored.token  # for message-bounced (same event, same deliver call)
        return None

    def _on_bounced(self, event: StanzaEvent) -> None:
        """``message-bounced``: the message archived at ``message-accepted`` was refused
        with an error to its sender.  It leaves both parties' archives (XEP-0313 §5.1.1
        archives messages exchanged, and this one never reached the recipient; the
        sender's other devices would show it as sent, without the error).  The token is on
        the event: a bounce fires with the event of its ``message-accepted``."""
        token, event.archived = event.archived, None
        if token is None:
            return None
        try:
            self.archive.retract(token)
        except Exception:  # noqa: BLE001 - logged; the sender already has the error
            log.exception("a bounced message could not be taken out of the archive")
        return None

    def _flush(self) -> None:
        try:
            self.archive.flush()
        except Exception:  # noqa: BLE001 - logged; offline storage already has the message
            log.exception("archive flush after an offline store failed")

    # -- IQs -------------------------------------------------------------------------------

    def handle_iq(self, username: str, iq: Element, to: JID | None) -> list[Element]:
        """Answer one MAM IQ get/set from ``username``; the stanzas to send, in order."""
        try:
            return self._handle_iq(username, iq, to)
        except ArchiveUnavailable as exc:
            log.warning("MAM request of %s refused: archive unavailable (%s)", username, exc)
            raise StanzaError("internal-server-error", "wait", "the archive is unavailable; try again later") from None

    def _handle_iq(self, username: str, iq: Element, to: JID | None) -> list[Element]:
        owner = f"{username}@{self.domain}"
        if to is not None and not (to.local == username and to.domain == self.domain and to.resource is None):
            if to.local is None and to.domain == self.domain:
                raise StanzaError("service-unavailable", text="the server keeps no archive of its own")
            raise StanzaError("forbidden", text="you can only query your own archive")  # XEP-0313 §9.1
        payload = iq[0]
        kind = iq.get("type")
        if payload.tag == _QUERY:
            if kind == "get":
                return [_result(iq, query_form())]
            return self._query(owner, iq, payload)
        if payload.tag == _PREFS:
            if kind == "set":
                try:
                    prefs = self.archive.set_prefs(owner, parse_prefs(payload))
                except ValueError as exc:
                    raise StanzaError("bad-request", text=str(exc)) from None
            else:
                prefs = self.archive.prefs(owner)
            return [_result(iq, prefs_element(prefs))]
        if payload.tag == _METADATA and kind == "get":
            return [_result(iq, self._metadata(owner))]
        raise StanzaError("service-unavailable")

    def _query(self, owner: str, iq: Element, payload: Element) -> list[Element]:
        request = parse_query(payload, self.default_page, self.max_page)
        try:
            page = self.archive.query(owner, request.query)
        except ItemNotFound as exc:
            raise StanzaError("item-not-found", text=f"no message {exc.args[0]!r} in this archive") from None
        except Unsupported as exc:
            raise StanzaError("feature-not-implemented", text=str(exc)) from None
        to = iq.get("from")
        results = [result_message(to, owner, request.queryid, item) for item in page.items]
        if request.flip:
            results.reverse()
        results.append(_result(iq, fin_element(request.queryid, page)))
        return results

    def _metadata(self, owner: str) -> Element:
        """XEP-0313 §5: ids and stamps of the first and last message (empty if none)."""
        meta = E(_METADATA)
        bounds = self.archive.bounds(owner)
        if bounds is not None:
            for name, item in zip(("start", "end"), bounds):
                meta.append(E(f"{{{NS_MAM}}}{name}", {"id": item.id, "timestamp": format_datetime(item.stamp)}))
        return meta

    # -- messages --------------------------------------------------------------------------

    def archive_message(self, stanza: Element, sender: JID, recipient: JID, sender_local: bool = True,
                        recipient_local: bool = True, strip: bool = True) -> tuple[str | None, str | None]:
        """Archive a one-to-one message in the archives of its local parties (XEP-0313 §5.1.1),
        as their preferences say (XEP-0441); return (sender's id, recipient's id), None where
        not archived.  Forged stanza-ids are removed from ``stanza`` first (``strip=False``:
        already done), and the stanza is stored without any: the caller stamps the returned
        id on the copies it delivers."""
        stored, sender_at, recipient_at = self._archive(stanza, sender, recipient, sender_local, recipient_local,
                                                        strip)
        if stored is None:
            return None, None
        return (stored[sender_at] if sender_at is not None else None,
                stored[recipient_at] if recipient_at is not None else None)

    def _archive(self, stanza: Element, sender: JID, recipient: JID, sender_local: bool, recipient_local: bool,
                 strip: bool) -> tuple[Stored | None, int | None, int | None]:
        """archive_message's work: (what the store returned, the sender's copy's index, the
        recipient's); ids are computed only when read."""
        if strip:
            strip_stanza_ids(stanza, self.domain)
        if not archivable(stanza):
            return None, None, None
        # The sender may be the domain itself (the app's API): its bare JID is the domain.
        sender_bare = f"{sender.local}@{sender.domain}" if sender.local is not None else sender.domain
        recipient_bare = f"{recipient.local}@{recipient.domain}"
        copies: list[Copy] = []
        if sender_local and self._archives(sender, sender_bare, recipient, recipient_bare):
            copies.append(Copy(sender_bare, recipient_bare, recipient.resource, True))
        self_note = sender_bare == recipient_bare
        if recipient_local and not self_note and self._archives(recipient, recipient_bare, sender, sender_bare):
            copies.append(Copy(recipient_bare, sender_bare, sender.resource, False))
        if not copies:
            return None, None, None
        stored = self.archive.store(stanza, copies)
        sender_at = 0 if copies[0].outgoing else None
        recipient_at = (len(copies) - 1) if not copies[-1].outgoing else (sender_at if self_note else None)
        return stored, sender_at, recipient_at

    def _archives(self, owner: JID, owner_bare: str, peer: JID, peer_bare: str) -> bool:
        prefs = self.archive.prefs(owner_bare)
        if prefs.default == "always" and not prefs.never and not prefs.always:
            return True  # the usual case, without building strings
        peer_full = str(peer) if peer.resource is not None else None
        in_roster = self.in_roster
        return prefs.archives(peer_bare, peer_full,
                              (lambda jid: in_roster(owner.local, jid)) if in_roster is not None else None)

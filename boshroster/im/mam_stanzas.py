"""The message side of XEP-0313/XEP-0359 (mam.py re-exports these): which messages are archived,
forged ``<stanza-id/>``s removed, the recipient's id stamped.  Pure functions on elements, no state."""

from __future__ import annotations

from xml.etree.ElementTree import SubElement

from boshroster.xmpp.jid import JID, JIDError
from boshroster.xmpp.xmlio import Element, NS_CLIENT, NS_HINTS

NS_SID = "urn:xmpp:sid:0"
_BODY = f"{{{NS_CLIENT}}}body"
_STANZA_ID = f"{{{NS_SID}}}stanza-id"


def archivable(stanza: Element) -> bool:
    """XEP-0313 §5.1.1: one-to-one 'chat' and 'normal' messages with a <body/>; XEP-0334
    <no-store/>/<no-permanent-store/> opt out unless <store/> is also there."""
    if stanza.get("type", "normal") not in ("chat", "normal") or stanza.find(_BODY) is None:
        return False
    if stanza.find(f"{{{NS_HINTS}}}store") is None and (
        stanza.find(f"{{{NS_HINTS}}}no-store") is not None
        or stanza.find(f"{{{NS_HINTS}}}no-permanent-store") is not None
    ):
        return False
    return True


def strip_stanza_ids(stanza: Element, domain: str) -> None:
    """XEP-0359 §5 rule 3 and XEP-0313 §3.5: a <stanza-id/> claiming to come from this server
    (by= the domain or an account here) that arrives from a client is forged: remove it."""
    for sid in stanza.findall(_STANZA_ID):
        try:
            forged = JID.parse(sid.get("by") or "").domain == domain
        except JIDError:
            forged = True  # §5 rule 5: 'by' is mandatory; a malformed one is no one's
        if forged:
            stanza.remove(sid)


def stamp_stanza_id(stanza: Element, by: str, sid: str, replace: bool = True) -> None:
    """XEP-0359 §3: at most one <stanza-id/> per 'by' at the top level (``replace=False``:
    the caller knows there is none, e.g. strip_stanza_ids ran)."""
    if replace:
        for old in stanza.findall(_STANZA_ID):
            if old.get("by") == by:
                stanza.remove(old)
    SubElement(stanza, _STANZA_ID, {"by": by, "id": sid})  # C, on every archived message

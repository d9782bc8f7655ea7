"""IQs the server answers itself: disco (XEP-0030), ping (XEP-0199), carbons (XEP-0280), session.

RFC 6120 §8.2.3: every get/set gets exactly one answer; the router answers
``service-unavailable`` for anything nobody hooks.  Disco lists only what is
implemented: modules add their features to ``Disco`` when they are wired
(``disco.server_features`` for the domain, ``disco.account_features`` for a
user's bare JID, XEP-0030 §3.1 / XEP-0313 §7).

Greenlet safety: the feature lists are filled at wiring time and only read
afterwards; the carbons flag is the requesting session's own.
"""

from __future__ import annotations

from typing import Callable

from boshroster.xmpp.events import EventBus
from boshroster.xmpp.router import RESULT, StanzaEvent
from boshroster.xmpp.tags import DISCO_INFO_QUERY, DISCO_ITEMS_QUERY, q
from boshroster.xmpp.xmlio import E, Element, NS_CARBONS, NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_SESSION


class Disco:
    """What the server and the accounts say they support (XEP-0030 disco#info)."""

    def __init__(self) -> None:
        self.server_features: list[str] = [NS_DISCO_INFO, NS_DISCO_ITEMS]
        self.account_features: list[str] = [NS_DISCO_INFO]
        self.server_identity = ("server", "im", "boshroster")

    def info(self, identity: tuple, features: list[str]) -> Element:
        category, itype, name = identity
        query = E(DISCO_INFO_QUERY, None, E(q(NS_DISCO_INFO, "identity"), {"category": category, "type": itype, "name": name}))
        for feature in features:
            query.append(E(q(NS_DISCO_INFO, "feature"), {"var": feature}))
        return query


class ServerIqs:
    def __init__(self, disco: Disco, user_exists: Callable[[str], bool]):
        self.disco = disco
        self.user_exists = user_exists

    def register(self, bus: EventBus) -> None:
        disco = self.disco
        disco.server_features += [NS_PING, NS_CARBONS]
        info, items = f"{NS_DISCO_INFO}:query", f"{NS_DISCO_ITEMS}:query"
        bus.hook(f"iq-get/host/{info}", self._server_info)
        bus.hook(f"iq-get/self/{info}", self._own_info)
        bus.hook(f"iq-get/bare/{info}", self._account_info)
        bus.hook(f"iq-get/host/{items}", self._items)
        bus.hook(f"iq-get/self/{items}", self._own_items)
        for target in ("host", "self", "bare"):
            bus.hook(f"iq-get/{target}/{NS_PING}:ping", lambda event: RESULT)  # XEP-0199
        for target in ("host", "self"):
            bus.hook(f"iq-set/{target}/{NS_CARBONS}:enable", self._carbons)  # XEP-0280 §4
            bus.hook(f"iq-set/{target}/{NS_CARBONS}:disable", self._carbons)
            # RFC 3921 leftover: answered, never advertised.
            bus.hook(f"iq-set/{target}/{NS_SESSION}:session", lambda event: RESULT)

    def _server_info(self, event: StanzaEvent):
        if event.stanza[0].get("node") is None:
            return self.disco.info(self.disco.server_identity, self.disco.server_features)
        return None

    def _own_info(self, event: StanzaEvent):
        if event.to is None:
            return None  # no 'to': answered as the domain (router falls back to host)
        return self._account_info(event)

    def _account_info(self, event: StanzaEvent):
        if event.stanza[0].get("node") is not None:
            return None
        if event.to.local == event.origin.username or self.user_exists(event.to.local):
            return self.disco.info(("account", "registered", None), self.disco.account_features)
        return None

    def _items(self, event: StanzaEvent):
        return E(DISCO_ITEMS_QUERY) if event.stanza[0].get("node") is None else None

    def _own_items(self, event: StanzaEvent):
        return None if event.to is None else self._items(event)

    @staticmethod
    def _carbons(event: StanzaEvent):
        event.origin.carbons = event.stanza[0].tag.endswith("}enable")
        return RESULT


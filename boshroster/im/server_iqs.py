"""IQs the server answers itself: roster, disco, ping, carbons, session.

RFC 6120 §8.2.3: every get/set gets exactly one answer, so anything not
implemented here is ``service-unavailable`` (§8.4), and results/errors
addressed to the server are swallowed.  Disco lists only what is implemented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from boshroster.xmpp.errors import StanzaError
from boshroster.xmpp.jid import JID
from boshroster.xmpp.xmlio import (
    E,
    Element,
    NS_CARBONS,
    NS_CLIENT,
    NS_DISCO_INFO,
    NS_DISCO_ITEMS,
    NS_PING,
    NS_ROSTER,
    NS_SESSION,
)

if TYPE_CHECKING:
    from boshroster.wiring import Core
    from boshroster.xmpp.stream import ClientSession

_IQ = f"{{{NS_CLIENT}}}iq"
_CARBON_TOGGLES = (f"{{{NS_CARBONS}}}enable", f"{{{NS_CARBONS}}}disable")

SERVER_FEATURES = (NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_CARBONS)
ACCOUNT_FEATURES = (NS_DISCO_INFO,)


def result(iq: Element, *children: Element) -> Element:
    return E(_IQ, {"type": "result", "id": iq.get("id"), "to": iq.get("from"), "from": iq.get("to")}, *children)


class IqHandler:
    def __init__(self, core: "Core"):
        self.core = core

    def handle(self, origin: "ClientSession", iq: Element, to: JID | None, for_server: bool) -> None:
        """``for_server``: addressed to the domain or nobody; else to a local bare JID."""
        iq_type = iq.get("type")
        if iq_type in ("result", "error"):
            return  # e.g. a client acknowledging a roster push
        payload = iq[0]
        key = (iq_type, payload.tag)
        own_account = to is None or (to.local == origin.username and to.resource is None)
        if key == ("get", f"{{{NS_ROSTER}}}query") and own_account:
            return self.core.roster.handle_get(origin, iq)
        if key == ("set", f"{{{NS_ROSTER}}}query") and own_account:
            # The backend app owns rosters; mod_http_roster_admin answers this way too.
            raise StanzaError("service-unavailable", "cancel", "rosters are managed by the web application")
        if key == ("get", f"{{{NS_PING}}}ping"):
            return origin.send(result(iq))  # XEP-0199
        if key == ("get", f"{{{NS_DISCO_INFO}}}query") and payload.get("node") is None:
            if for_server:
                return origin.send(result(iq, self._info(("server", "im", "boshroster"), SERVER_FEATURES)))
            if own_account or self.core.user_exists(to.local):
                return origin.send(result(iq, self._info(("account", "registered", None), ACCOUNT_FEATURES)))
        if key == ("get", f"{{{NS_DISCO_ITEMS}}}query") and payload.get("node") is None:
            if for_server or own_account:
                return origin.send(result(iq, E(f"{{{NS_DISCO_ITEMS}}}query")))
        if iq_type == "set" and payload.tag in _CARBON_TOGGLES and (own_account or for_server):
            origin.carbons = payload.tag.endswith("}enable")  # XEP-0280 §4
            return origin.send(result(iq))
        if key == ("set", f"{{{NS_SESSION}}}session"):
            return origin.send(result(iq))  # RFC 3921 leftover: answer, never advertise
        raise StanzaError("service-unavailable")

    @staticmethod
    def _info(identity: tuple, features: tuple) -> Element:
        category, itype, name = identity
        query = E(f"{{{NS_DISCO_INFO}}}query", None, E(f"{{{NS_DISCO_INFO}}}identity", {"category": category, "type": itype, "name": name}))
        for feature in features:
            query.append(E(f"{{{NS_DISCO_INFO}}}feature", {"var": feature}))
        return query

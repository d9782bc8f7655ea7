"""XEP-0092 Software Version: the server says what it is, when asked at the domain.

The OS is not disclosed (XEP-0092 §2 makes it optional, and it helps attackers).
"""

from __future__ import annotations

from boshroster import __version__
from boshroster.im.server_iqs import Disco
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.tags import q
from boshroster.xmpp.xmlio import E

NS_VERSION = "jabber:iq:version"


def register(bus: EventBus, disco: Disco) -> None:
    disco.server_features.append(NS_VERSION)
    answer = E(q(NS_VERSION, "query"), None, E(q(NS_VERSION, "name"), text="boshroster"),
               E(q(NS_VERSION, "version"), text=__version__))
    bus.hook(f"iq-get/host/{NS_VERSION}:query", lambda event: answer)

"""Qualified tag names used across the server, defined once (``{namespace}local``)."""

from boshroster.xmpp.xmlio import (
    NS_BIND,
    NS_CARBONS,
    NS_CLIENT,
    NS_DELAY,
    NS_DISCO_INFO,
    NS_DISCO_ITEMS,
    NS_FORWARD,
    NS_HINTS,
    NS_PING,
    NS_ROSTER,
    NS_SASL,
    NS_SESSION,
    NS_STREAM,
)


def q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


MESSAGE = q(NS_CLIENT, "message")
PRESENCE = q(NS_CLIENT, "presence")
IQ = q(NS_CLIENT, "iq")
STANZAS = frozenset({MESSAGE, PRESENCE, IQ})
BODY = q(NS_CLIENT, "body")
PRIORITY = q(NS_CLIENT, "priority")

FEATURES = q(NS_STREAM, "features")
BIND = q(NS_BIND, "bind")
BIND_RESOURCE = q(NS_BIND, "resource")
BIND_JID = q(NS_BIND, "jid")
SESSION = q(NS_SESSION, "session")
SASL_MECHANISMS = q(NS_SASL, "mechanisms")
SASL_MECHANISM = q(NS_SASL, "mechanism")
SASL_AUTH = q(NS_SASL, "auth")
SASL_RESPONSE = q(NS_SASL, "response")
SASL_ABORT = q(NS_SASL, "abort")
SASL_CHALLENGE = q(NS_SASL, "challenge")
SASL_SUCCESS = q(NS_SASL, "success")
SASL_FAILURE = q(NS_SASL, "failure")

ROSTER_QUERY = q(NS_ROSTER, "query")
ROSTER_ITEM = q(NS_ROSTER, "item")
ROSTER_GROUP = q(NS_ROSTER, "group")
DISCO_INFO_QUERY = q(NS_DISCO_INFO, "query")
DISCO_ITEMS_QUERY = q(NS_DISCO_ITEMS, "query")
PING = q(NS_PING, "ping")
CARBONS_ENABLE = q(NS_CARBONS, "enable")
CARBONS_DISABLE = q(NS_CARBONS, "disable")
CARBONS_PRIVATE = q(NS_CARBONS, "private")
FORWARDED = q(NS_FORWARD, "forwarded")
NO_COPY = q(NS_HINTS, "no-copy")
DELAY = q(NS_DELAY, "delay")

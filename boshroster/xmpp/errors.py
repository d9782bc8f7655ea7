"""Stanza and stream errors (RFC 6120 §8.3 and §4.9), raised by handlers and
turned into XML in one place, so that correct errors are the easy path."""

from __future__ import annotations

from boshroster.xmpp.xmlio import E, Element, NS_CLIENT, NS_STANZAS, NS_STREAM, NS_STREAMS_ERR, XML_LANG

# RFC 6120 §8.3.3: the usual error type of each defined condition.
_DEFAULT_TYPES = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


class StanzaError(Exception):
    """Raise from a handler; the router answers the stanza with this error."""

    def __init__(self, condition: str, error_type: str | None = None, text: str | None = None):
        super().__init__(text or condition)
        self.condition = condition
        self.error_type = error_type or _DEFAULT_TYPES.get(condition, "cancel")
        self.text = text


class StreamError(Exception):
    """A stream-level error: the stream is closed after sending it."""

    def __init__(self, condition: str, text: str | None = None):
        super().__init__(text or condition)
        self.condition = condition
        self.text = text


def error_element(condition: str, error_type: str, text: str | None = None) -> Element:
    err = E(f"{{{NS_CLIENT}}}error", {"type": error_type}, E(f"{{{NS_STANZAS}}}{condition}"))
    if text:
        err.append(E(f"{{{NS_STANZAS}}}text", {XML_LANG: "en"}, text=text))
    return err


def error_reply(stanza: Element, error: StanzaError) -> Element:
    """An error stanza answering ``stanza``: same kind and id, to/from swapped."""
    ns = stanza.tag[: stanza.tag.index("}") + 1] if stanza.tag.startswith("{") else ""
    _, _, kind = stanza.tag.rpartition("}")
    reply = E(
        f"{ns}{kind}",
        {
            "type": "error",
            "id": stanza.get("id"),
            "to": stanza.get("from"),
            "from": stanza.get("to"),
        },
    )
    reply.append(error_element(error.condition, error.error_type, error.text))
    return reply


def stream_error_element(condition: str, text: str | None = None) -> Element:
    el = E(f"{{{NS_STREAM}}}error", None, E(f"{{{NS_STREAMS_ERR}}}{condition}"))
    if text:
        el.append(E(f"{{{NS_STREAMS_ERR}}}text", {XML_LANG: "en"}, text=text))
    return el


# RFC 6120 §6.5: the SASL failure conditions.
SASL_CONDITIONS = frozenset(
    {
        "not-authorized",
        "malformed-request",
        "invalid-mechanism",
        "aborted",
        "temporary-auth-failure",
        "encryption-required",
    }
)


class SaslFailure(Exception):
    """An exchange failed; ``condition`` is the RFC 6120 §6.5 element name."""

    def __init__(self, condition: str, text: str | None = None):
        if condition not in SASL_CONDITIONS:
            raise ValueError(f"unknown SASL failure condition {condition!r}")
        super().__init__(condition if text is None else f"{condition}: {text}")
        self.condition = condition
        self.text = text

"""A fast path for the commonest BOSH request: an empty ``<body/>`` (a re-poll, XEP-0124 §7, §11).

Every contact of a BOSH fan-out sends one, as does every login several times; through
``xmlio.parse`` it costs an expat parse and a tree build (issue 12).  ``parse_empty_body``
reads exactly one form without a parser and builds the element ``xmlio.parse`` would:
``<body`` then attributes with plain ASCII names (no prefix, so no ``xmlns:…``, no
``xml:lang``) and values of printable ASCII without ``&`` or ``<`` (no references, no
white space to normalize, XML 1.0 §3.3.3), each name once, ``xmlns`` exactly the BOSH
namespace, then ``/>`` (Strophe) or ``></body>`` and nothing after it.  Anything else, however legal, returns None
and takes ``xmlio.parse``, which stays the reference (tests/test_bosh_body.py compares
both).  Pure function: no state.
"""

from __future__ import annotations

import re

from boshroster.xmpp.xmlio import Element, NS_BOSH

_ATTR = rb"[A-Za-z_][A-Za-z0-9_.-]*[ \t\r\n]*=[ \t\r\n]*(?:\"[ !#-%'-;=-~]*\"|'[ -%(-;=-~]*')"
_EMPTY_BODY = re.compile(rb"<body((?:[ \t\r\n]+" + _ATTR + rb")*)[ \t\r\n]*(?:/>|></body>)")
_ONE_ATTR = re.compile(rb"[ \t\r\n]+([A-Za-z_][A-Za-z0-9_.-]*)[ \t\r\n]*=[ \t\r\n]*(?:\"([^\"]*)\"|'([^']*)')")
_BODY_TAG = f"{{{NS_BOSH}}}body"
_NS_BYTES = NS_BOSH.encode("ascii")


def parse_empty_body(data: bytes) -> Element | None:
    """The ``<body/>`` element of ``data`` if it is the plain empty form above, else None."""
    m = _EMPTY_BODY.fullmatch(data)
    if m is None:
        return None
    attrib: dict[str, str] = {}
    namespace = None
    for am in _ONE_ATTR.finditer(m[1]):
        name = am[1].decode("ascii")
        value = am[2] if am[2] is not None else am[3]
        if name == "xmlns":
            if namespace is not None:
                return None  # twice: not well-formed
            namespace = value
        elif name in attrib:
            return None  # twice: not well-formed (XML 1.0 §3.1, unique att spec)
        else:
            attrib[name] = value.decode("ascii")
    if namespace != _NS_BYTES:
        return None
    return Element(_BODY_TAG, attrib)

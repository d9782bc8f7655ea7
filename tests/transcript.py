"""Transcript tests of the session core, in the style of Prosody's scansion files.

    alice sends:
        <iq type='get' id='v1' to='localhost'><query xmlns='jabber:iq:version'/></iq>
    alice receives:
        <iq type='result' id='v1' from='localhost' to='alice@localhost/res'>...</iq>
    bob receives nothing

Stanzas are written without ``xmlns`` (``jabber:client`` is implied, as in a
stream).  Expected XML is compared as XML, not text: same names, same
attributes (``{any}`` matches any value), same children in order, same
stripped text (``{any}`` matches any text).  Each ``receives:`` block must
match the next stanzas that client got, exactly, and nothing else.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from boshroster.xmpp import xmlio

ANY = "{any}"
_LINE = re.compile(r"^(\w+) (sends|receives)(:| nothing)\s*$")


def _parse(xml: str) -> list:
    wrapper = xmlio.parse(f"<wrapper xmlns='jabber:client'>{xml}</wrapper>", 1 << 20)
    return list(wrapper)


def _describe(el) -> str:
    return xmlio.tostring(el)


def match(expected, got, path="") -> str | None:
    """None if ``got`` matches ``expected``; else what differs."""
    here = f"{path}/{expected.tag}"
    if expected.tag != got.tag:
        return f"{path}: expected <{expected.tag}>, got <{got.tag}>"
    for name, value in expected.attrib.items():
        if name not in got.attrib:
            return f"{here}: missing attribute {name}"
        if value != ANY and got.attrib[name] != value:
            return f"{here}: {name}={got.attrib[name]!r}, expected {value!r}"
    extra = set(got.attrib) - set(expected.attrib)
    if extra:
        return f"{here}: unexpected attributes {sorted(extra)}"
    want, have = (expected.text or "").strip(), (got.text or "").strip()
    if want != ANY and want != have:
        return f"{here}: text {have!r}, expected {want!r}"
    if len(expected) != len(got):
        return f"{here}: {len(got)} children, expected {len(expected)}"
    for e_child, g_child in zip(expected, got):
        problem = match(e_child, g_child, here)
        if problem:
            return problem
    return None


def run(clients: dict, script: str) -> None:
    """Play ``script`` against ``clients`` (name -> object with ``feed(xml)`` and ``take()``)."""
    blocks: list[tuple[str, str, list[str]]] = []
    for line in script.strip().splitlines():
        head = _LINE.match(line.strip())
        if head:
            blocks.append((head.group(1), head.group(2) if head.group(3) == ":" else "nothing", []))
        elif line.strip():
            blocks[-1][2].append(line.strip())
    for number, (who, verb, lines) in enumerate(blocks, 1):
        client = clients[who]
        xml = "".join(lines)
        if verb == "sends":
            for el in _parse(xml):
                client.feed(xmlio.tostring(el))
            continue
        got = client.take()
        want = [] if verb == "nothing" else _parse(xml)
        shown = "\n".join(_describe(g) for g in got) or "(nothing)"
        assert len(got) == len(want), f"step {number}: {who} received {len(got)} stanzas, expected {len(want)}:\n{shown}"
        for w, g in zip(want, got):
            problem = match(w, g)
            assert problem is None, f"step {number}: {who}: {problem}\nreceived:\n{shown}"


__all__ = ["run", "match", "ANY", "ET"]

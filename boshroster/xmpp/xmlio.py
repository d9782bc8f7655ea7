"""XML in and out: safe parsing of complete documents and prefix-free serialization.

Every BOSH body (XEP-0124 §6) and every RFC 7395 message is one complete XML
document, so no incremental stream parser is needed.  Parsing refuses DTDs,
entity declarations, external references, comments and processing
instructions (RFC 6120 §11.1): input that could hold any of them goes through
defusedxml with a restricting tree builder; input that cannot (no "<!", no
"<?") takes the C expat parser directly.  Only UTF-8 is read (§11.6).  Limits
on input (issue 10, points 6 and 7): the size of the document and of each
stanza in a BOSH body, and the nesting depth below a stanza.

Serialization writes plain default ``xmlns="…"`` declarations and never
invents ``ns0:`` prefixes on elements, because Strophe compares ``nodeName``
(so ``<ns0:bind>`` would not be found).  Rule: whatever ``parse`` accepts,
``tostring`` writes as well-formed, namespace-well-formed XML that parses back
to the same tree (tests/test_fuzz_xml.py checks it).  Pure module: no I/O, no
gevent, no shared state.
"""

from __future__ import annotations

import _thread
import pyexpat
import re
import xml.etree.ElementTree as ET
from typing import Callable, Iterable, Iterator

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

Element = ET.Element

NS_CLIENT = "jabber:client"
NS_STREAM = "http://etherx.jabber.org/streams"
NS_FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
NS_BOSH = "http://jabber.org/protocol/httpbind"
NS_XBOSH = "urn:xmpp:xbosh"
NS_XML = "http://www.w3.org/XML/1998/namespace"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_STREAMS_ERR = "urn:ietf:params:xml:ns:xmpp-streams"
NS_ROSTER = "jabber:iq:roster"
NS_ROSTERVER = "urn:xmpp:features:rosterver"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
NS_PING = "urn:xmpp:ping"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"
NS_DELAY = "urn:xmpp:delay"
NS_HINTS = "urn:xmpp:hints"

XML_LANG = f"{{{NS_XML}}}lang"

# Prefixes we write for these namespaces, on elements and attributes; xml is predeclared
# (Namespaces in XML 1.0 §3) and never declared, the others are declared where used.
_KNOWN_PREFIXES = {NS_XML: "xml", NS_STREAM: "stream", NS_XBOSH: "xmpp"}


class XMLError(ValueError):
    """Input that is not acceptable XML.  ``condition`` is the RFC 6120 stream error;
    ``document`` is the parsed tree when the XML was well-formed but over a limit."""

    def __init__(self, condition: str, text: str, document: Element | None = None):
        super().__init__(text)
        self.condition = condition
        self.text = text
        self.document = document


class _RestrictedTreeBuilder(ET.TreeBuilder):
    """A TreeBuilder that refuses what XMPP forbids (RFC 6120 §11.1)."""

    def comment(self, data):  # noqa: D401 - ElementTree callback
        raise XMLError("restricted-xml", "XML comments are not allowed")

    def pi(self, target, data=None):
        raise XMLError("restricted-xml", "processing instructions are not allowed")


# Levels allowed below a stanza.  Real stanzas need few: a carbon or a MAM result wraps
# a message in 3 more levels, OMEMO's <encrypted/> adds 3, XHTML-IM a handful.  The
# limit is what keeps a 1,200-deep poison message out (issue 10, point 7a).
DEFAULT_MAX_DEPTH = 32


def parse(
    data: bytes | str,
    max_size: int,
    *,
    child_limit: int | None = None,
    max_depth: int | None = DEFAULT_MAX_DEPTH,
) -> Element:
    """Parse one complete XML document; raise XMLError.

    Size is checked before parsing so a huge input costs nothing.  A DTD,
    entity declaration, comment or PI is ``restricted-xml``; anything else that
    does not parse (including any encoding but UTF-8, RFC 6120 §11.6) is
    ``not-well-formed``.

    ``child_limit`` given, the document is a wrapper (a BOSH ``<body/>``,
    XEP-0124 §4) whose children are the stanzas: each must be at most
    ``child_limit`` bytes as written in ``data``, so that a body cannot smuggle
    in stanzas a WebSocket client could not send (issue 10, point 6).
    ``max_depth`` counts element levels below the stanza (the root, or each
    child of the wrapper); None means no limit (data the server wrote itself).
    Both limits are ``policy-violation`` (RFC 6120 §4.9.3.18), and the error
    keeps the parsed ``document`` so the caller can tell whose stream it was.
    """
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text can hold one
            raise XMLError("not-well-formed", "text that is not valid Unicode") from None
    if len(data) > max_size:
        raise XMLError("policy-violation", f"XML larger than {max_size} bytes")
    if b"\0" in data:
        # XML 1.0 has no NUL, and UTF-8 XML has none, but every UTF-16 or UTF-32 document
        # does; expat would detect and decode those despite encoding="utf-8", where the
        # "<!" test below cannot see a DTD (an entity bomb in UTF-16 passed it).
        raise XMLError("not-well-formed", "a NUL byte: only UTF-8 is accepted (RFC 6120 §11.6)")
    root = _parse_document(data)
    if max_depth is not None:
        levels = max_depth + (2 if child_limit is not None else 1)  # element levels the document may have
        # Every element on the longest chain but the last has children, hence an end tag:
        # the document has at most count("</") + 1 levels.  Almost every stanza, and a BOSH
        # body of a few, has fewer end tags than the limit and skips the walk (a C-speed count).
        if data.count(b"</") >= levels and _deeper_than(root, levels):
            raise XMLError("policy-violation", f"stanza nested deeper than {max_depth} levels", root)
    if child_limit is not None and len(data) > child_limit:  # a smaller body has no larger child
        size = _largest_child(data)
        if size > child_limit:
            raise XMLError("policy-violation", f"stanza of {size} bytes, larger than {child_limit} bytes", root)
    return root


def _parse_document(data: bytes) -> Element:
    if b"<!" not in data and b"<?" not in data:
        # Fast path (almost every stanza): without "<!" there can be no DTD, so
        # no entity but the five predefined ones and character references (expat
        # refuses any other), and no comment; without "<?" no PI, and no XML
        # declaration naming another encoding: with no NUL either (checked by the
        # caller) expat reads UTF-8.  So the plain C-accelerated parser is as safe
        # here as defusedxml's, at a quarter of the cost.  Anything it refuses goes
        # through the strict path below, which gives the precise error.
        root = _FEED.parse(data) if _FEED_LOCK.acquire(False) else None
        if root is not None:
            return root
        fast = ET.XMLParser()
        try:
            fast.feed(data)
            return fast.close()
        except ET.ParseError:
            pass
    # encoding="utf-8" overrides an XML declaration naming another one (RFC 6120 §11.6)
    parser = DET.XMLParser(target=_RestrictedTreeBuilder(), forbid_dtd=True, encoding="utf-8")
    try:
        parser.feed(data)
        return parser.close()
    except XMLError:
        raise
    except DefusedXmlException as exc:
        raise XMLError("restricted-xml", f"forbidden XML construct: {type(exc).__name__}") from None
    except ET.ParseError as exc:
        raise XMLError("not-well-formed", f"not well-formed XML: {exc}") from None
    except UnicodeError:
        raise XMLError("not-well-formed", "invalid UTF-8") from None


_RENEW_BYTES = 1 << 20  # input after which the feed parser is replaced (its name tables)
_WS = " \t\r\n"  # XML 1.0 §2.3 S: all the text a document may have outside its root


class _FeedParser:
    """One C expat parser fed document after document, inside a wrapper element.

    Creating an ``ET.XMLParser`` costs ~7 µs, more than parsing a typical stanza or a BOSH
    re-poll body (issue 12: ~20 per login).  This one is opened with ``<w>``; each document
    is fed after it, then the sentinel ``<s/>``, and accepted only if exactly its root and
    the sentinel (empty, as fed) were added to the wrapper, with XML white space around the
    root.  That is what a fresh parser accepts for input without "<!" or "<?" (no DTD,
    comment, PI or XML declaration): an unclosed element would hold the sentinel; a second
    root, a truncated tag or reference, text around the root or ``</w>`` make a count, a
    text or a parse error differ.  Otherwise None: the caller parses ``data`` afresh (the
    reference path, which gives the error).  A failed parser is replaced, and so is one fed
    ``_RENEW_BYTES``: expat's and ElementTree's name tables grow with every new name seen.

    Process-wide (``_FEED``), used only under ``_FEED_LOCK`` taken without waiting (parsing
    never yields to another greenlet; another thread finds it taken: a fresh parser)."""

    __slots__ = ("_parser", "_wrapper", "_last", "_fed")

    def __init__(self) -> None:
        self._parser: ET.XMLParser | None = None

    def _open(self) -> None:
        builder = ET.TreeBuilder()
        parser = ET.XMLParser(target=builder)
        parser.feed(b"<w>")
        try:
            # The C TreeBuilder's close() returns the root element it has started (the
            # wrapper), open or not, and changes nothing; the pure-Python one asserts that
            # the tree is complete: then there is no wrapper and every parse returns None.
            self._wrapper: Element | None = builder.close()
        except AssertionError:
            self._wrapper = None
        self._parser = parser
        self._last: Element | None = None  # the latest sentinel: the next text is its tail
        self._fed = 0

    def parse(self, data: bytes) -> Element | None:
        """The root of ``data``, or None (see the class); releases ``_FEED_LOCK``."""
        try:
            if self._parser is None or self._fed > _RENEW_BYTES:
                self._open()
            parser, last = self._parser, self._last
            self._parser = None  # until this parse succeeds
            try:
                parser.feed(data)
                parser.feed(b"<s/>")
            except Exception:  # ParseError, or anything: the fresh parser decides
                return None
            wrapper = self._wrapper
            if wrapper is None:
                return None
            before = wrapper.text if last is None else last.tail
            if len(wrapper) != 2 or (before and before.strip(_WS)):
                return None
            root, sentinel = wrapper
            tail = root.tail
            if (sentinel.tag != "s" or len(sentinel) or sentinel.text is not None or sentinel.attrib
                    or (tail and tail.strip(_WS))):
                return None
            root.tail = None
            if last is None:
                wrapper.text = None
            else:
                last.tail = None
            del wrapper[:]
            self._last = sentinel
            self._fed += len(data)
            self._parser = parser
            return root
        finally:
            _FEED_LOCK.release()


_FEED = _FeedParser()
# The C RLock: gevent patches allocate_lock into a Python-level semaphore.  parse never calls
# parse, and no greenlet switch happens inside it, so reentrancy cannot occur.
_FEED_LOCK = _thread.RLock()


def _deeper_than(root: Element, levels: int) -> bool:
    """Whether the tree has more than ``levels`` levels; breadth first, no recursion."""
    level = [root]
    for _ in range(levels):
        level = [sub for el in level for sub in el]
        if not level:
            return False
    return True


def _largest_child(data: bytes) -> int:
    """The size in bytes of the largest child of the root element of ``data``.

    Runs only on data that already parsed (so no DTD, no entity bomb) and only
    when the whole document is over the limit.  A child ends where the next
    parser event begins: expat reports the end of ``<a/>`` after the tag but
    the end of ``<a>…</a>`` before ``</a>``, so the end event itself cannot tell.
    """
    parser = pyexpat.ParserCreate(encoding="utf-8")
    depth = 0
    start = 0
    largest = 0
    ended = False  # a child of the root just ended: the next event marks where

    def close() -> None:
        nonlocal ended, largest
        ended = False
        largest = max(largest, parser.CurrentByteIndex - start)
        parser.CharacterDataHandler = parser.StartCdataSectionHandler = None

    def on_start(_name, _attrs) -> None:
        nonlocal depth, start
        if ended:
            close()
        if depth == 1:
            start = parser.CurrentByteIndex
        depth += 1

    def on_end(_name) -> None:
        nonlocal depth, ended
        if ended:
            close()
        depth -= 1
        if depth == 1:
            ended = True
            # text or CDATA right after the child is the next event too
            parser.CharacterDataHandler = parser.StartCdataSectionHandler = on_other

    def on_other(*_args) -> None:
        if ended:
            close()

    parser.StartElementHandler = on_start
    parser.EndElementHandler = on_end
    try:
        parser.Parse(data, True)
    except pyexpat.ExpatError:  # cannot happen for parsed data; measure what was seen
        pass
    return largest


def split_tag(tag: str) -> tuple[str | None, str]:
    """'{ns}local' -> ('ns', 'local')."""
    if tag[:1] == "{":
        ns, _, local = tag[1:].rpartition("}")
        return ns, local
    return None, tag


def E(tag: str, attrib: dict | None = None, *children: Element, text: str | None = None) -> Element:
    """Build an element; ``attrib`` values that are None are left out (copied only then)."""
    if not attrib:
        el = ET.Element(tag)
    elif None in attrib.values():
        el = ET.Element(tag, {k: v for k, v in attrib.items() if v is not None})
    else:
        el = ET.Element(tag, attrib)
    if text is not None:
        el.text = text
    if children:
        el.extend(children)
    return el


def shallow_copy(el: Element, to: str | None = None) -> Element:
    """A copy with its own attributes (``to`` replaced if given) and the same children,
    which are shared and must not be mutated.  ``copy.copy`` would share the attribute dict
    too (the C ElementTree does)."""
    out = ET.Element(el.tag, el.attrib)  # Element() copies the dict
    out.text, out.tail = el.text, el.tail
    out.extend(el)
    if to is not None:
        out.set("to", to)
    return out


def child(el: Element, tag: str) -> Element | None:
    return el.find(tag)


# -- serialization ---------------------------------------------------------

# Characters XML 1.0 does not allow (§2.2 Char): the parser refuses them on input, so only
# text the server built itself (a roster name from the backend, say) can hold one; it is
# written as U+FFFD rather than as a document no client can parse.
_INVALID = "".join(map(chr, [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0xD800, 0xE000), 0xFFFE, 0xFFFF]))
_INVALID_CLASS = "\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff"
# A literal CR in text would come back as LF (XML 1.0 §2.11), so it is a character reference.
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;", **dict.fromkeys(_INVALID, "\ufffd")})
_ATTR_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;",
     **dict.fromkeys(_INVALID, "\ufffd")}
)


# str.translate with a dict looks up every character in Python; almost every JID, id and body
# needs no escaping, and a regex search says so at C speed (~5x faster per call, measured).
_NEEDS_TEXT_ESCAPE = re.compile(f"[&<>\r{_INVALID_CLASS}]").search
_NEEDS_ATTR_ESCAPE = re.compile(f'[&<>"\n\r\t{_INVALID_CLASS}]').search


def escape_text(text: str) -> str:
    return text.translate(_TEXT_ESCAPES) if _NEEDS_TEXT_ESCAPE(text) else text


def escape_attr(text: str) -> str:
    return text.translate(_ATTR_ESCAPES) if _NEEDS_ATTR_ESCAPE(text) else text


def tostring(el: Element, parent_ns: str | None = None, declared: Iterable[str] = ()) -> str:
    """Serialize with default-namespace declarations only where the namespace changes.

    ``parent_ns`` is the default namespace in scope where the element will be
    written (None for a standalone document); ``declared`` names prefixed
    namespaces already declared by an enclosing element (e.g. xmlns:stream on
    a BOSH body).

    The output is namespace-well-formed for any tree ``parse`` returns, plus
    the server's wrappers (Namespaces in XML 1.0 §3): the XML namespace is
    always written with its predeclared ``xml`` prefix and never declared;
    namespaced attributes get a prefix declared on their element (``nsN``,
    never one already in scope); the stream and BOSH namespaces keep their
    usual prefixes.  The walk is iterative, so no depth can make it raise
    (issue 10, point 7a).
    """
    out: list[str] = []
    write = out.append
    node = el
    ns_in_scope = parent_ns
    prefixes = {ns: _KNOWN_PREFIXES[ns] for ns in declared if ns in _KNOWN_PREFIXES}
    # Open elements that have children: (element, iterator over its children, its name,
    # the default namespace and the prefixes in scope for its children).
    stack: list[tuple[Element, Iterator[Element], str, str | None, dict[str, str]]] = []
    while True:
        name, child_ns, child_prefixes = _start_tag(node, ns_in_scope, prefixes, write)
        text = node.text
        if len(node):
            write(">")
            if text:
                write(escape_text(text))
            stack.append((node, iter(node), name, child_ns, child_prefixes))
        else:
            if text:
                write(f">{escape_text(text)}</{name}>")
            else:
                write("/>")
            if stack and node.tail:  # the root's tail is not part of it
                write(escape_text(node.tail))
        while stack:
            parent, children, parent_name, ns_in_scope, prefixes = stack[-1]
            node = next(children, None)
            if node is not None:
                break
            stack.pop()
            write(f"</{parent_name}>")
            if stack and parent.tail:
                write(escape_text(parent.tail))
        else:
            return "".join(out)


def _start_tag(
    el: Element, parent_ns: str | None, declared: dict[str, str], write: Callable[[str], None]
) -> tuple[str, str | None, dict[str, str]]:
    """Write ``<name decls attrs`` (unclosed); return the name and the children's scope.

    ``declared``: namespace -> prefix bound by an enclosing element (never mutated)."""
    tag = el.tag
    if tag[:1] == "{":
        ns, _, local = tag[1:].rpartition("}")  # a local name has no "}"; rpartition is exact
        ns = ns or None
    else:
        ns, local = None, tag
    decls = ""
    prefix = _KNOWN_PREFIXES.get(ns)
    if prefix is None:
        name = local
        child_ns = ns
        if ns != parent_ns:
            decls = f' xmlns="{escape_attr(ns or "")}"'
    else:
        # xml:foo (the prefix is bound by definition and must not be declared, §3),
        # stream:error, xmpp:…: the default namespace is unchanged.
        name = f"{prefix}:{local}"
        child_ns = parent_ns
        if prefix != "xml" and declared.get(ns) != prefix:
            decls = f' xmlns:{prefix}="{escape_attr(ns)}"'
            declared = {**declared, ns: prefix}
    if not el.attrib:
        write(f"<{name}{decls}")
        return name, child_ns, declared
    attrs: list[str] = []
    for key, value in el.attrib.items():
        if key[:1] == "{":
            ans, _, alocal = key[1:].rpartition("}")
            if not ans:
                key = alocal
            elif ans == NS_XML:
                key = f"xml:{alocal}"
            else:
                aprefix = declared.get(ans)
                if aprefix is None:
                    aprefix = _new_prefix(ans, declared)
                    decls += f' xmlns:{aprefix}="{escape_attr(ans)}"'
                    declared = {**declared, ans: aprefix}
                key = f"{aprefix}:{alocal}"
        attrs.append(f' {key}="{escape_attr(value)}"')
    write(f"<{name}{decls}{''.join(attrs)}")
    return name, child_ns, declared


def _new_prefix(ns: str, declared: dict[str, str]) -> str:
    """A prefix for ``ns`` that nothing in scope uses: the usual one, else the first free ``nsN``.

    Every prefix in the output is chosen here or is one of ``_KNOWN_PREFIXES`` (each bound
    to its one namespace only), so a prefix the client used cannot collide with one of ours."""
    known = _KNOWN_PREFIXES.get(ns)
    if known is not None and known not in declared.values():
        return known
    used = set(declared.values())
    i = len(declared)
    while f"ns{i}" in used:
        i += 1
    return f"ns{i}"

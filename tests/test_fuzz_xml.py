"""A fuzzer over the XML input path (issue 10): ``xmlio.parse``, then ``xmlio.tostring``.

Hypothesis generates documents as a client could send them: random nesting,
namespace declarations (the reserved ``xml``/``xmlns`` names and namespaces
included, and prefixes named like the ones the serializer invents), prefixed
and foreign attributes, text from every class of character (controls, CR,
surrogates, U+FFFE, astral planes, markup characters), entity and character
references (defined, undefined, forbidden), CDATA, comments, PIs, DTDs, XML
declarations with other encodings, BOMs, as ``str`` or as UTF-8, UTF-16 or
Latin-1 bytes; and then random byte edits of those.  The properties:

* ``parse`` raises ``XMLError`` and nothing else (no RecursionError,
  UnicodeError, KeyError, …); a comment, PI or DTD is always refused;
* a tree it returns has at most ``max_depth`` levels below the root, exactly
  (``max_depth`` one less refuses it), and in a BOSH body each stanza larger
  than ``child_limit`` bytes, exactly, is refused;
* ``tostring`` of the tree, standalone and inside a BOSH body under a
  server-made carbon wrapper (the real output path), is accepted by a strict
  namespace-aware parser (``xml.dom.minidom`` on expat), parses back with
  ``xmlio.parse`` to an equal tree, and is idempotent.

In the suite it runs a bounded, derandomized number of examples (the same ones
every run: a few seconds, no flaky finds in CI).  By hand, longer and random:

    BOSHROSTER_FUZZ_EXAMPLES=200000 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fuzz_xml.py

Whatever it finds is fixed and kept in ``REGRESSIONS`` below (``test_regressions``).
"""

from __future__ import annotations

import os
import string
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from xml.dom import minidom

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from boshroster.xmpp import xmlio
from boshroster.xmpp.xmlio import E, NS_BOSH, NS_CLIENT, NS_STREAM, NS_XBOSH, NS_XML, XMLError

EXAMPLES = int(os.environ.get("BOSHROSTER_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=EXAMPLES or 60,
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the checkout; finds are kept in REGRESSIONS
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# The long mode runs for as long as it takes, past the suite's per-test timeout.
NO_TIMEOUT_WHEN_LONG = pytest.mark.timeout(0) if EXAMPLES else (lambda test: test)

LIMIT = 1 << 20
NS_XMLNS = "http://www.w3.org/2000/xmlns/"
NS_CARBONS = "urn:xmpp:carbons:2"
NS_FORWARD = "urn:xmpp:forward:0"


# -- generated documents -----------------------------------------------------------------------

@dataclass
class Doc:
    """A generated document and what the generator knows about it."""

    text: str
    restricted: bool = False  # holds a comment, PI or DTD: must be refused
    child_sizes: list[int] = field(default_factory=list)  # UTF-8 sizes of the root's element children
    encoding: str = "str"
    data: bytes | str = ""
    mutated: bool = False


def weighted(*choices):
    """sampled_from with weights: weighted((8, "a"), (1, "b"))."""
    return st.sampled_from([value for weight, value in choices for _ in range(weight)])


class Dialect:
    """The strategies for one kind of document.  The clean dialect writes only what XML
    and its namespaces allow (tricky but valid: CR, NEL, BOM, astral characters, foreign
    prefixes, the xml prefix, escaped namespace URIs), so that most of its documents
    parse and exercise the serializer; the noisy one mixes in everything that must be
    refused (forbidden characters, lone surrogates, reserved namespaces, bad names,
    unbound prefixes, bad references, comments, PIs, DTDs, other encodings)."""

    VALID_CHARS = (string.ascii_letters + string.digits + " \t\n\r&<>\"'];:{}/=?!-#"
                   + "\x7f\x85\xa0\u2028\ufffd\ufeff\xe9\u4e2d\U0001F600\U0010FFFF")
    BAD_CHARS = "\x00\x01\x08\x0b\x0c\x1f\ud800\udfff\ufffe\uffff"
    LOCAL_NAMES = ["a", "b", "m", "message", "body", "x", "\xe9", "\u540d\u524d", "a-b.c_d", "A1", "lang",
                   "space", "xmlns", "xml", "xmlfoo", "ns0", "stream"]
    PREFIXES = ("p", "q", "ns0", "ns1", "stream", "xmpp", "xml")
    VALID_URIS = [NS_CLIENT, "urn:a", "urn:b", NS_STREAM, NS_XBOSH, NS_BOSH, "urn:a&amp;b", "urn:&quot;&lt;&gt;",
                  "urn:{x", "urn:&#9;&#10;&#13;", "http://x/?a=1&amp;b=2", "urn:\xe9", "urn:a'b"]
    VALID_REFERENCES = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#9;", "&#10;", "&#13;", "&#xD;", "&#xFFFD;",
                        "&#x10FFFF;", "&#65;", "&#x1F600;", "&#xe9;", "&#x85;"]

    def __init__(self, clean: bool):
        self.clean = clean
        qnames = [(6, name) for name in self.LOCAL_NAMES]
        qnames += [(1, f"{prefix}:{name}") for prefix in self.PREFIXES for name in self.LOCAL_NAMES]
        uris = [(4, uri) for uri in self.VALID_URIS]
        decl_prefixes = [(6, None), (2, "p"), (2, "q"), (2, "ns0"), (1, "ns1"), (1, "stream"), (1, "xmpp")]
        references = [(3, ref) for ref in self.VALID_REFERENCES]
        text = [st.text(self.VALID_CHARS, max_size=10)]
        self.specials = weighted((1, "<![CDATA[ ]]]]><![CDATA[> ]]>"), (1, "<![CDATA[]]>"))
        self.restricted_share = 0
        if not clean:
            qnames += [(1, "xmlns:a"), (1, "1a"), (1, "a b"), (1, ":a"), (1, "a:"), (1, "\U00010000x")]
            uris += [(1, uri) for uri in ("", NS_XML, NS_XMLNS, "urn:}x", "urn:&#1;", 'urn:"', "urn:<")]
            decl_prefixes += [(1, "xml"), (1, "xmlns")]
            references += [(1, ref) for ref in ("&nbsp;", "&undefined;", "&#0;", "&#x1;", "&#xD800;", "&#xFFFE;",
                                                "&#x110000;", "&#;", "&#x;", "&", "&amp")]
            text += [st.text(self.VALID_CHARS + self.BAD_CHARS, max_size=6),
                     st.text(st.characters(exclude_categories=()), max_size=4)]  # surrogates included
            self.specials = weighted((2, "<!-- c -->"), (1, "<!---->"), (1, "<?pi data?>"), (1, "<!DOCTYPE a>"),
                                     (1, "<?xml-stylesheet href='x'?>"), (1, "<![CDATA[ ]]]]><![CDATA[> ]]>"))
        self.qnames = weighted(*qnames)
        self.uris = weighted(*uris)
        self.decl_prefixes = weighted(*decl_prefixes)
        self.references = weighted(*references)
        self.raw_text = st.one_of(*text)
        # strategies are built once: hypothesis validates each new strategy object, slowly
        self.escaped = {quote: self._escaped(quote) for quote in (None, "'", '"')}
        self.start_tag = self._start_tag()
        self.content = st.recursive(self._leaf(), self._element, max_leaves=8)
        self.stanza = self._element(self.content)

    def _escaped(self, quote: str | None):
        """Text as a client would write it: escaped right; in the noisy dialect sometimes not at all."""
        ways = [(8, "escape"), (1, "charrefs")] + ([] if self.clean else [(1, "raw")])

        @st.composite
        def draw_escaped(draw) -> str:
            raw = draw(self.raw_text)
            how = draw(weighted(*ways))
            if how == "raw":
                return raw
            if how == "charrefs":
                return "".join(f"&#{ord(c)};" if i % 2 else f"&#x{ord(c):X};" for i, c in enumerate(raw))
            out = raw.replace("&", "&amp;").replace("<", "&lt;").replace("]]>", "]]&gt;")
            if quote:
                out = out.replace(quote, "&quot;" if quote == '"' else "&apos;")
            return out

        return draw_escaped()

    def _start_tag(self):
        """(name, declarations and attributes) of one element."""

        @st.composite
        def draw_start_tag(draw) -> tuple[str, str]:
            name = draw(self.qnames)
            attrs = draw(st.lists(st.tuples(self.qnames, st.sampled_from("'\"")), max_size=3,
                                  unique_by=(lambda a: a[0]) if self.clean else None))
            if self.clean:  # an attribute named xmlns is a declaration, maybe a second one
                attrs = [a for a in attrs if a[0] != "xmlns"]
            used = {n.partition(":")[0] for n in [name] + [a for a, _ in attrs] if ":" in n.strip(":")} - {"xml"}
            # declare the prefixes used here (the noisy dialect forgets some), and a few others
            declared = [p for p in sorted(used) if self.clean or draw(st.integers(0, 9)) < 8]
            declared += [p for p in draw(st.lists(self.decl_prefixes, max_size=2)) if not self.clean or p not in used]
            if draw(st.integers(0, 9)) == 0:
                declared.append("xml")  # binding xml to its own namespace is allowed (and not repeated)
            parts = []
            for prefix in declared:
                quote, uri = draw(st.sampled_from("'\"")), draw(self.uris)
                if prefix == "xml" and (self.clean or draw(st.booleans())):
                    uri = NS_XML
                if quote in uri:
                    uri = uri.replace(quote, "&quot;" if quote == '"' else "&apos;")
                parts.append(f" xmlns{':' + prefix if prefix else ''}={quote}{uri}{quote}")
            if self.clean:
                parts = list(dict.fromkeys(parts))  # one declaration per prefix
                seen: set[str] = set()
                parts = [p for p in parts if not (p.split("=")[0] in seen or seen.add(p.split("=")[0]))]
            for attr_name, quote in attrs:
                parts.append(f" {attr_name}={quote}{draw(self.escaped[quote])}{quote}")
            if len(parts) > 1 and draw(st.booleans()):
                parts.reverse()  # attributes before declarations
            return name, "".join(parts)

        return draw_start_tag()

    def _leaf(self):
        return st.one_of(
            *[self.escaped[None].map(lambda t: (t, False))] * 10,
            self.references.map(lambda r: (r, False)),
            self.raw_text.map(lambda t: (f"<![CDATA[{t.replace(']]>', '')}]]>", False)),
            self.specials.map(lambda t: (t, not t.startswith("<![C"))),
        )

    def _element(self, children):
        @st.composite
        def draw_element(draw) -> tuple[str, bool]:
            name, attrs = draw(self.start_tag)
            content = draw(st.lists(children, max_size=4))
            restricted = any(r for _, r in content)
            inner = "".join(t for t, _ in content)
            if not inner and draw(st.booleans()):
                return f"<{name}{attrs}/>", restricted
            return f"<{name}{attrs}>{inner}</{name}>", restricted

        return draw_element()


CLEAN, NOISY = Dialect(clean=True), Dialect(clean=False)


@st.composite
def chain_around(draw, inner: tuple[str, bool]) -> tuple[str, bool]:
    """Nest ``inner`` in 0-40 more levels, to walk the depth limit's boundary."""
    levels = draw(st.sampled_from([0, 0, 0, 1, 30, 31, 32, 33, 34, 40]))
    text, restricted = inner
    name = draw(st.sampled_from(["d", "xml:d", "p:d"]))
    decl = " xmlns:p='urn:p'" if name.startswith("p:") else ""
    if levels:
        text = f"<{name}{decl}>" + f"<{name}>" * (levels - 1) + text + f"</{name}>" * levels
    return text, restricted


PROLOGS = ["\ufeff", "<?xml version='1.0'?>", '<?xml version="1.0" encoding="UTF-8"?>',
           "<?xml version='1.0' encoding='ISO-8859-1'?>", "<?xml version='1.0' standalone='yes'?>"]
BAD_PROLOGS = ["<?xml version='1.0' encoding='UTF-16'?>", "<?xml version='1.1'?>", " <?xml version='1.0'?>"]
RESTRICTED_PROLOGS = ["<!DOCTYPE a>", "<!DOCTYPE a [<!ENTITY e 'x'>]>", "<!DOCTYPE a SYSTEM 'file:///etc/passwd'>",
                      "<!-- c -->", "<?pi x?>"]


@st.composite
def documents(draw) -> Doc:
    """A whole document: prolog, a root (sometimes a BOSH <body/> of stanzas), epilog."""
    dialect = draw(weighted((3, CLEAN), (2, NOISY)))
    clean = dialect is CLEAN
    prolog = draw(weighted((20, ""), *[(1, p) for p in PROLOGS + ([] if clean else BAD_PROLOGS)]))
    restricted = False
    if not clean and draw(st.integers(0, 4)) == 0:
        prolog += draw(st.sampled_from(RESTRICTED_PROLOGS))
        restricted = True
    child_sizes = []
    if draw(st.booleans()):
        # a BOSH body of stanzas, so that child_limit has children to measure
        stanzas = draw(st.lists(st.tuples(dialect.stanza,
                                          st.sampled_from(["", "\n", " x ", "&amp;", "<![CDATA[c]]>"])),
                                min_size=1, max_size=4))
        inner = ""
        for (text, r), between in stanzas:
            text, r2 = draw(chain_around((text, r)))
            restricted |= r or r2
            child_sizes.append(len(text.encode("utf-8", "surrogatepass")))
            inner += text + between
        root = f"<body xmlns='{NS_BOSH}' rid='1' sid='s'>{inner}</body>"
    else:
        text, r = draw(chain_around(draw(dialect.stanza)))
        restricted |= r
        root = text
    epilog = draw(weighted((12, ""), (3, "\n"), *([] if clean else [(1, "<!-- after -->"), (1, "<?pi?>"),
                                                                     (1, "<x/>"), (1, "text")])))
    restricted |= epilog.startswith(("<!", "<?"))
    doc = Doc(prolog + root + epilog, restricted, child_sizes)
    doc.encoding = draw(weighted((1, "str"), (1, "utf-8")) if clean else
                        weighted((6, "str"), (6, "utf-8"), (1, "utf-16"), (1, "utf-16-le"), (1, "latin-1")))
    if doc.encoding == "str":
        doc.data = doc.text
    elif doc.encoding == "utf-8":
        doc.data = doc.text.encode("utf-8", "surrogatepass")  # a lone surrogate: invalid UTF-8 bytes
    else:
        doc.data = doc.text.encode(doc.encoding, "replace")
    return doc


@st.composite
def mutated(draw) -> Doc:
    """A generated document with a few random byte edits: the generator knows nothing more."""
    doc = draw(documents())
    data = bytearray(doc.data.encode("utf-8", "surrogatepass") if isinstance(doc.data, str) else doc.data)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["delete", "insert", "flip", "duplicate"]))
        if op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "insert":
            data[at:at] = draw(st.sampled_from([b"<", b">", b"&", b"/", b"'", b'"', b":", b"\x00", b"\xff",
                                                b"\xc3", b"]]>", b"<!--", b"<?", b"xmlns:p='u' ", b"<![CDATA["]))
        elif op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 16))]
    return Doc(doc.text, data=bytes(data), mutated=True)


# -- the properties -------------------------------------------------------------------------------

def canonical(el: ET.Element) -> list:
    """A comparable form of a tree (None == ""): each element in document order with its
    number of children, which fixes the shape.  Iterative, for trees of any depth."""
    return [(e.tag, sorted(e.attrib.items()), e.text or "", e.tail or "", len(e)) for e in el.iter()]


def levels_below(el: ET.Element) -> int:
    depth, level = 0, [el]
    while True:
        level = [c for e in level for c in e]
        if not level:
            return depth
        depth += 1


def note_event(what: str) -> None:
    if currently_in_test_context():  # hypothesis --hypothesis-show-statistics counts them
        event(what)


def strict(text: str) -> None:
    """A namespace-aware parser that refuses what a browser's DOMParser refuses."""
    minidom.parseString(text.encode("utf-8"))


def check(doc: Doc) -> None:
    try:
        tree = xmlio.parse(doc.data, LIMIT, max_depth=None)
    except XMLError as err:
        note_event(f"refused: {err.condition}: {err.text.removeprefix('not well-formed XML: ').split(':')[0][:50]}")
        assert err.condition in ("not-well-formed", "restricted-xml", "policy-violation"), err.condition
        return
    note_event("accepted" + (" (mutated)" if doc.mutated else ""))
    assert not doc.restricted, doc.text
    # the depth limit is exact
    depth = levels_below(tree)
    assert xmlio.parse(doc.data, LIMIT, max_depth=depth) is not None
    if depth:
        try:
            xmlio.parse(doc.data, LIMIT, max_depth=depth - 1)
        except XMLError as err:
            assert err.condition == "policy-violation" and err.document is not None
        else:
            raise AssertionError(f"{depth} levels accepted with max_depth={depth - 1}")
    # the size limit of each stanza in a BOSH body is exact
    if doc.child_sizes and not doc.mutated and doc.encoding in ("str", "utf-8"):
        largest = max(doc.child_sizes)
        assert xmlio.parse(doc.data, LIMIT, child_limit=largest, max_depth=None) is not None
        try:
            xmlio.parse(doc.data, LIMIT, child_limit=largest - 1, max_depth=None)
        except XMLError as err:
            assert err.condition == "policy-violation" and err.text.startswith(f"stanza of {largest} bytes")
        else:
            raise AssertionError(f"a stanza of {largest} bytes accepted with child_limit={largest - 1}")
    # what was accepted serializes to namespace-well-formed XML that parses back the same
    text = xmlio.tostring(tree)
    strict(text)
    back = xmlio.parse(text, 4 * LIMIT, max_depth=None)
    assert canonical(back) == canonical(tree), text
    assert xmlio.tostring(back) == text
    # ... also as the server sends it: in a BOSH body, under a carbon's three wrappers
    carbon = E(f"{{{NS_CLIENT}}}message", {"to": "a@b"},
               E(f"{{{NS_CARBONS}}}received", None, E(f"{{{NS_FORWARD}}}forwarded", None, tree)))
    body = (f'<body xmlns="{NS_BOSH}" xmlns:stream="{NS_STREAM}">'
            f"{xmlio.tostring(carbon, NS_BOSH, {NS_STREAM})}</body>")
    strict(body)
    again = xmlio.parse(body, 4 * LIMIT, max_depth=None)
    assert canonical(again[0][0][0][0]) == canonical(tree), body


# Regression cases: each was found by this fuzzer (or by issue 10) and is fixed.
REGRESSIONS = [
    Doc("<m><xml:foo/></m>", data="<m><xml:foo/></m>"),  # 7b: written as xmlns="…XML namespace"
    Doc("<m>a&#13;b</m>", data="<m>a&#13;b</m>"),  # a CR came back as LF
    Doc("<a>\ud800</a>", data="<a>\ud800</a>"),  # UnicodeEncodeError from str input
    Doc("<?xml version='1.0' encoding='ISO-8859-1'?><a>\xe9</a>",
        data=b"<?xml version='1.0' encoding='ISO-8859-1'?><a>\xe9</a>"),  # not UTF-8 (RFC 6120 §11.6)
    Doc("x", data="<a>" * 1200 + "</a>" * 1200),  # 7a: RecursionError in the serializer
    Doc("x", data="<xml:a xml:b='1'><xml:c/></xml:a>"),
]


@NO_TIMEOUT_WHEN_LONG
@SETTINGS
@given(documents())
def test_generated_documents_are_refused_or_round_trip(doc):
    check(doc)


@NO_TIMEOUT_WHEN_LONG
@SETTINGS
@given(mutated())
def test_mutated_documents_are_refused_or_round_trip(doc):
    check(doc)


def test_regressions():
    for doc in REGRESSIONS:
        check(doc)

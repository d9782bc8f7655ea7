"""The shared feed parser of xmlio (issue 12): documents after documents in one expat parser.

``xmlio.parse`` feeds input without "<!" or "<?" to one process-wide parser inside a
wrapper element (``xmlio._FeedParser``) instead of creating a parser per document.  These
tests check that it accepts exactly what a fresh parser accepts, gives the same trees,
that no document leaves anything behind for the next one (whoever sent it), and that the
parser is replaced after ``_RENEW_BYTES``.  The real-server cases (a WebSocket client
sending such input while a bystander keeps working) are in tests/test_websocket.py
(``test_malformed_xml_is_not_well_formed``) and below for BOSH.
"""

import xml.etree.ElementTree as ET

import pytest

from boshroster.xmpp import xmlio
from boshroster.xmpp.xmlio import NS_BOSH, NS_CLIENT, XMLError

LIMIT = 65536
GOOD = f"<message xmlns='{NS_CLIENT}' to='bob@localhost' id='g'><body>after</body></message>"

ODD = [
    "<a/>",
    "  <a/>  ",
    "\r\n\t<a>\r\ntext\r\n</a>\n",
    "<s/>",
    "<s></s>",
    "<s>x</s>",
    "<s a='1'/>",
    "<w/>",
    "<w><s/></w>",
    "<a><s/><s/></a>",
    "<a/><s/>",
    "<a/><s>",
    "<s>",
    "<a>",
    "<a><b>text",
    "<a/></w>",
    "</w>",
    "</w><w>",
    "<a/></w><w>",
    "<a/>text",
    "text<a/>",
    "text",
    "",
    "   ",
    "<a/><b/>",
    "<a/><",
    "<a/><b",
    "<a/><b x='1'",
    "<a/><b x='",
    "<a/></",
    "<a/>&amp;",
    "<a/>&amp",
    "<a>&amp</a>",
    "<a>&unknown;</a>",
    "<a x='1' x='2'/>",
    "<p:a/>",
    "<p:a xmlns:p='urn:p'/>",
    "<a xmlns='urn:x'><b/></a>",
    "\ufeff<a/>",
    "<a/>\ufeff",
    "<a/>\u00a0",
    "<a/>\u3000",
    "<a>\u00e9\U0001F600</a>",
    "<a>]]></a>",
    f"<body xmlns='{NS_BOSH}' rid='1' sid='x'/>",
    f"<body rid='1' xmlns='{NS_BOSH}' sid='x'><message xmlns='{NS_CLIENT}'><body>hi</body></message></body>",
]
ODD_BYTES = [
    b"<a>\xc3</a>",
    b"<a/>\xc3",
    b"<a/>\xe2\x82",
    b"<a>\xff</a>",
    b"<a>\xed\xa0\x80</a>",  # an encoded surrogate
]


def reference(data: bytes):
    """What a fresh C parser says (the fast path's reference): the tree or "error"."""
    parser = ET.XMLParser()
    try:
        parser.feed(data)
        return parser.close()
    except ET.ParseError:
        return "error"


def tree(el) -> tuple:
    return (el.tag, dict(el.attrib), el.text, el.tail, [tree(c) for c in el])


def check(data: bytes) -> None:
    expected = reference(data)
    got = outcome(data)
    if expected == "error":
        assert got[0] == "XMLError", got
    else:
        assert got == tree(expected)


def outcome(data: bytes):
    try:
        return tree(xmlio.parse(data, LIMIT))
    except XMLError as err:
        return ("XMLError", err.condition)


def cases():
    return [(d.encode("utf-8")) for d in ODD] + ODD_BYTES


@pytest.mark.parametrize("data", cases(), ids=repr)
def test_the_feed_parser_accepts_what_a_fresh_parser_accepts(data):
    check(data)
    # and it leaves nothing behind: the next document parses as it would alone, twice,
    # through the feed parser
    check(GOOD.encode())
    fed = xmlio._FEED._fed
    check(GOOD.encode())
    assert xmlio._FEED._fed == fed + len(GOOD)


@pytest.mark.parametrize("first", cases(), ids=repr)
@pytest.mark.parametrize("second", [d.encode() for d in ("<a/>", " <a>x</a>", "<s/>", "<a/>text", "<a")], ids=repr)
def test_pairs_of_documents_parse_as_each_would_alone(first, second):
    for data in (first, second, first, second):
        check(data)


def test_every_good_document_goes_through_the_feed_parser():
    xmlio.parse(GOOD, LIMIT)
    before = xmlio._FEED._fed
    for _ in range(10):
        xmlio.parse(GOOD, LIMIT)
    assert xmlio._FEED._fed == before + 10 * len(GOOD)


def test_the_feed_parser_is_replaced_after_renew_bytes():
    """Every new element name grows expat's and ElementTree's name tables: one parser is fed at
    most ``_RENEW_BYTES`` (a client sending endless new names cannot grow them for ever)."""
    xmlio.parse(GOOD, LIMIT)
    parsers = {id(xmlio._FEED._parser)}
    sent = 0
    n = 0
    while sent <= 2 * xmlio._RENEW_BYTES:
        doc = f"<e{n} a{n}='1'><f{n}/></e{n}>".encode()
        check(doc)
        assert xmlio._FEED._fed <= xmlio._RENEW_BYTES + len(doc)
        parsers.add(id(xmlio._FEED._parser))
        sent += len(doc)
        n += 1
    assert len(parsers) >= 2


def test_restricted_input_still_takes_the_defused_path():
    for data, condition in [
        ("<!DOCTYPE a [<!ENTITY x 'y'>]><a>&x;</a>", "restricted-xml"),
        ("<a><!-- c --></a>", "restricted-xml"),
        ("<a><?pi x?></a>", "restricted-xml"),
        ("<a/><!DOCTYPE a>", "not-well-formed"),
    ]:
        with pytest.raises(XMLError) as info:
            xmlio.parse(data, LIMIT)
        assert info.value.condition in (condition, "not-well-formed", "restricted-xml")
        assert outcome(GOOD.encode()) == tree(reference(GOOD.encode()))

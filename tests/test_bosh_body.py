"""The empty-``<body/>`` fast path (transports/bosh_body.py, issue 12) against ``xmlio.parse``.

``parse_empty_body`` must never accept what ``xmlio.parse`` refuses, and must give the
same element for what it accepts; it may decline anything (the full parser then takes
it).  Checked on listed odd inputs, on every one-byte change of real re-poll bodies, and
against the real server: re-polls in several legal forms are held and answered in rid
order, ill-formed ones are refused with ``bad-request``.
"""

import xml.etree.ElementTree as ET

import gevent
import pytest
import requests

from harness import NS_BOSH, q

from boshroster.transports.bosh_body import parse_empty_body
from boshroster.xmpp import xmlio

NS = NS_BOSH
COMMON = [  # what clients send: Strophe (double quotes), the test harness and the bench (single)
    f'<body rid="4093476185" xmlns="{NS}" sid="a1b2c3"/>',
    f"<body xmlns='{NS}' rid='1234567' sid='x-y_z.0'/>",
    f"<body rid='12' sid='abc' xmlns='{NS}' ack='11'/>",
    f"<body xmlns='{NS}' rid='12' sid='abc' key='0123456789abcdef'/>",
    f"<body xmlns='{NS}'\n  rid = '12'\tsid='abc' />",
    f"<body xmlns='{NS}' rid='1234567' sid='abc'></body>",  # StanzaJS, the bench's generator
    f"<body xmlns='{NS}' rid='1234567' sid='abc' ></body>",
]
DECLINED = [  # legal or not: the full parser decides
    f"<body xmlns='{NS}'/>",  # no attribute but xmlns: accepted (equal) or declined, both fine
    f"<body xmlns:xmpp='urn:xmpp:xbosh' xmlns='{NS}' rid='1' sid='s' xmpp:restart='true'/>",
    f"<body xmlns='{NS}' rid='1' sid='s' xml:lang='en'/>",
    f" <body xmlns='{NS}' rid='1' sid='s'/>",
    f"<body xmlns='{NS}' rid='1' sid='s'/> ",
    f"<body xmlns='{NS}' rid='1' sid='s'><presence/></body>",
    f"<body xmlns='{NS}' rid='1' sid='s'> </body>",
    f"<body xmlns='{NS}' rid='1' sid='s'>x</body>",
    f"<body xmlns='{NS}' rid='1' sid='s'></body >",
    f"<body xmlns='{NS}' rid='1' sid='s'></bodyx>",
    f"<body xmlns='{NS}' rid='1' sid='s'></body></body>",
    f"<body xmlns='{NS}' rid='1' sid='a&amp;b'/>",
    f"<body xmlns='{NS}' rid='1' sid='a&#x41;'/>",
    f"<body xmlns='{NS}' rid='1' sid='a\tb'/>",
    f"<body xmlns='{NS}' rid='1' sid='a\nb'/>",
    f"<body xmlns='{NS}' rid='1' sid='caf\u00e9'/>",
    f"<body xmlns='{NS}' rid='1' sid='s' sid='t'/>",
    f"<body xmlns='{NS}' xmlns='{NS}' rid='1'/>",
    f"<body xmlns='urn:other' rid='1' sid='s'/>",
    "<body rid='1' sid='s'/>",
    f"<body xmlns=\"{NS}' rid='1'/>",
    f"<body xmlns='{NS}' rid='1' sid='s'",
    f"<body xmlns='{NS}' rid='1' sid='s'/><body/>",
    f"<body xmlns='{NS}' rid='1'sid='s'/>",
    f"<body xmlns='{NS}' 1rid='1'/>",
    f"<body xmlns='{NS}' rid='<'/>",
    f"<body xmlns='{NS}' rid='>' sid='\"'/>",
    f'<body xmlns="{NS}" rid=">" sid="\'"/>',
    f"<bodyx xmlns='{NS}' rid='1'/>",
    f"<p:body xmlns:p='{NS}' rid='1'/>",
    f"<body xmlns='{NS}' rid='1' sid='s'/>\x00",
    f"<body xmlns='{NS}' rid='1' sid='s\x01'/>",
    f"<body xmlns='{NS}' rid='1' sid='s'\x0c/>",
    f"<body xmlns='{NS}' rid='1' sid='s' / >",
    "",
]


def full(data: bytes):
    try:
        return xmlio.parse(data, 65536, child_limit=4096)
    except xmlio.XMLError:
        return None


def tree(el) -> tuple:
    return (el.tag, list(el.attrib.items()), el.text, el.tail, [tree(c) for c in el])


def check(data: bytes) -> ET.Element | None:
    fast = parse_empty_body(data)
    if fast is not None:
        reference = full(data)
        assert reference is not None, f"fast path accepted what the parser refuses: {data!r}"
        assert tree(fast) == tree(reference)
    return fast


@pytest.mark.parametrize("doc", COMMON)
def test_common_re_polls_take_the_fast_path_and_equal_the_parse(doc):
    assert check(doc.encode()) is not None


@pytest.mark.parametrize("doc", DECLINED)
def test_odd_bodies_are_declined_or_equal(doc):
    check(doc.encode("utf-8"))


@pytest.mark.parametrize("doc", [d for d in DECLINED if full(d.encode("utf-8")) is None])
def test_bodies_the_parser_refuses_are_declined(doc):
    assert parse_empty_body(doc.encode("utf-8")) is None


BYTES = sorted(set(b" \t\r\n\x00\x01\x7f\x80\xc3\xff\"'<>&=/:;#xX1_-.") | {0x0B, 0x0C})


@pytest.mark.parametrize("doc", COMMON)
def test_every_one_byte_change_is_declined_or_equal(doc):
    data = doc.encode()
    for i in range(len(data) + 1):
        for b in BYTES:
            check(data[:i] + bytes([b]) + data[i + 1:])  # replaced
            check(data[:i] + bytes([b]) + data[i:])  # inserted
        check(data[:i] + data[i + 1:])  # deleted


# -- against the real server ------------------------------------------------------------------

def post(server, body: str, timeout: float = 20) -> ET.Element:
    reply = requests.post(server.bosh_url, data=body.encode(), headers={"Content-Type": "text/xml; charset=utf-8"},
                          timeout=timeout)
    assert reply.status_code == 200
    return ET.fromstring(reply.content)


FORMS = [
    "<body rid=\"{rid}\" xmlns=\"{ns}\" sid=\"{sid}\"/>",
    "<body xmlns='{ns}'\n rid = '{rid}'\tsid='{sid}' />",
    "<body sid='{sid}' rid='{rid}' xmlns='{ns}' key='abcdef0123'/>",
    "<body xmlns='{ns}' rid='{rid}' sid='{sid}'></body>",
    "<body xmlns='{ns}' rid='{rid}' sid='{sid}'> </body>",  # the full parser's form
]


def test_re_polls_in_every_form_are_held_and_answered_in_order(server):
    """hold=1: each new request makes the server answer the held one; every form is a
    re-poll of its session (answered with an empty body, in rid order)."""
    rid = 5_000_000
    created = post(server, f"<body xmlns='{NS}' to='localhost' rid='{rid}' wait='5' hold='1' ver='1.6'/>")
    sid = created.get("sid")
    assert sid
    previous = None
    for form in FORMS * 2:
        rid += 1
        glet = gevent.spawn(post, server, form.format(ns=NS, rid=rid, sid=sid))
        if previous is not None:
            answered = previous.get(timeout=10)
            assert answered.tag == q(NS_BOSH, "body") and answered.get("type") is None and len(answered) == 0
        previous = glet
    rid += 1
    end = post(server, f"<body xmlns='{NS}' rid='{rid}' sid='{sid}' type='terminate'/>")
    assert end.get("type") == "terminate"
    assert previous.get(timeout=10).tag == q(NS_BOSH, "body")


@pytest.mark.parametrize("doc", [
    "<body xmlns='{ns}' rid='{rid}' sid='{sid}' sid='{sid}'/>",
    "<body xmlns='{ns}' rid='{rid}' sid='{sid}'",
    "<body xmlns='{ns}' rid='{rid}' sid='{sid}'/><body/>",
    "<body xmlns='{ns}' rid='{rid}' sid='{sid}' rid='{rid}'/>",
])
def test_ill_formed_re_polls_are_bad_request(server, doc):
    created = post(server, f"<body xmlns='{NS}' to='localhost' rid='100' wait='5' hold='1' ver='1.6'/>")
    reply = post(server, doc.format(ns=NS, rid=101, sid=created.get("sid")))
    assert reply.get("type") == "terminate" and reply.get("condition") == "bad-request"

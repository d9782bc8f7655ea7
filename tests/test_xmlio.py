"""boshroster.xmlio: safe parsing of whole documents and prefix-free serialization."""

import re
import xml.etree.ElementTree as ET

import pytest

from boshroster.xmpp import xmlio
from boshroster.xmpp.xmlio import (
    E,
    NS_BIND,
    NS_BOSH,
    NS_CLIENT,
    NS_ROSTER,
    NS_SASL,
    NS_STREAM,
    NS_XBOSH,
    XML_LANG,
    XMLError,
)

LIMIT = 65536


def parse(data, limit=LIMIT):
    return xmlio.parse(data, limit)


def same_tree(a: ET.Element, b: ET.Element) -> bool:
    """Structural equality (tag, attributes, text, tail, children)."""
    if a.tag != b.tag or dict(a.attrib) != dict(b.attrib) or (a.text or "") != (b.text or ""):
        return False
    if (a.tail or "") != (b.tail or "") or len(a) != len(b):
        return False
    return all(same_tree(x, y) for x, y in zip(a, b))


ROUND_TRIP_DOCS = [
    f"<iq xmlns='{NS_CLIENT}' type='set' id='b1'><bind xmlns='{NS_BIND}'><resource>web</resource></bind></iq>",
    f"<message xmlns='{NS_CLIENT}' to='bob@localhost' type='chat' xml:lang='de'><body>Grüße &amp; &lt;tags&gt;</body>"
    "<active xmlns='http://jabber.org/protocol/chatstates'/></message>",
    f"<iq xmlns='{NS_CLIENT}' type='result' id='r'><query xmlns='{NS_ROSTER}' ver='abc'>"
    "<item jid='a@localhost' name='A &quot;quoted&quot;' subscription='both'><group>Friends</group></item>"
    "</query></iq>",
    f"<presence xmlns='{NS_CLIENT}'><show>away</show><status>line1\nline2\ttab</status><priority>-5</priority></presence>",
    f"<stream:features xmlns:stream='{NS_STREAM}'><mechanisms xmlns='{NS_SASL}'><mechanism>PLAIN</mechanism>"
    "</mechanisms></stream:features>",
    f"<body xmlns='{NS_BOSH}' xmlns:xmpp='{NS_XBOSH}' rid='1' xmpp:version='1.0'>"
    f"<message xmlns='{NS_CLIENT}'><body>x</body></message></body>",
    "<message xmlns='jabber:client'><x xmlns='urn:a'><y xmlns='urn:b'>mixed <b>text</b> tail</y>after</x></message>",
    "<root>\U0001F600 emoji and \u00e9 and \u4e2d</root>",
]


@pytest.mark.parametrize("doc", ROUND_TRIP_DOCS)
def test_round_trip_preserves_the_tree(doc):
    first = parse(doc)
    text = xmlio.tostring(first)
    second = parse(text)
    assert same_tree(first, second), (doc, text)
    # serialising again gives the very same text (stable output)
    assert xmlio.tostring(second) == text


@pytest.mark.parametrize("doc", ROUND_TRIP_DOCS)
def test_no_generated_prefixes_on_elements(doc):
    text = xmlio.tostring(parse(doc))
    assert "ns0" not in text and "ns1" not in text
    # the only element prefixes we ever write are the well-known ones
    for prefix in re.findall(r"<(\w+):", text):
        assert prefix in ("stream", "xmpp"), text


def test_xmlns_only_where_the_namespace_changes():
    el = parse(
        f"<iq xmlns='{NS_CLIENT}' type='result' id='1'><query xmlns='{NS_ROSTER}'>"
        f"<item jid='a@b'><group>G</group></item><item jid='c@d'/></query></iq>"
    )
    text = xmlio.tostring(el)
    assert text == (
        f'<iq xmlns="{NS_CLIENT}" type="result" id="1"><query xmlns="{NS_ROSTER}">'
        '<item jid="a@b"><group>G</group></item><item jid="c@d"/></query></iq>'
    )
    assert text.count("xmlns=") == 2


def test_parent_namespace_suppresses_the_declaration():
    el = E(f"{{{NS_CLIENT}}}message", {"to": "a@b"}, E(f"{{{NS_CLIENT}}}body", text="hi"))
    assert xmlio.tostring(el, NS_CLIENT) == '<message to="a@b"><body>hi</body></message>'
    # inside a BOSH body the stanza needs its own xmlns, once
    assert xmlio.tostring(el, NS_BOSH) == '<message xmlns="jabber:client" to="a@b"><body>hi</body></message>'


def test_element_without_namespace_under_a_namespaced_parent_resets_the_default():
    el = E(f"{{{NS_CLIENT}}}message", None, E("plain"))
    text = xmlio.tostring(el)
    assert text == '<message xmlns="jabber:client"><plain xmlns=""/></message>'
    assert parse(text)[0].tag == "plain"


def test_stream_prefix_is_declared_once_and_children_get_their_own_xmlns():
    features = E(
        f"{{{NS_STREAM}}}features",
        None,
        E(f"{{{NS_BIND}}}bind"),
        E(f"{{{NS_STREAM}}}nested"),
    )
    text = xmlio.tostring(features)
    assert text == (
        f'<stream:features xmlns:stream="{NS_STREAM}"><bind xmlns="{NS_BIND}"/><stream:nested/></stream:features>'
    )
    assert text.count("xmlns:stream=") == 1
    # an enclosing element (the BOSH <body/>) may already declare it
    assert xmlio.tostring(features, NS_BOSH, {NS_STREAM}) == (
        f'<stream:features><bind xmlns="{NS_BIND}"/><stream:nested/></stream:features>'
    )


def test_stream_error_serializes_as_rfc7395_wants():
    from boshroster.xmpp.errors import stream_error_element

    text = xmlio.tostring(stream_error_element("policy-violation", "too big"))
    assert text.startswith(f'<stream:error xmlns:stream="{NS_STREAM}">')
    assert '<policy-violation xmlns="urn:ietf:params:xml:ns:xmpp-streams"/>' in text
    assert '<text xmlns="urn:ietf:params:xml:ns:xmpp-streams" xml:lang="en">too big</text>' in text
    back = parse(text)
    assert back.tag == f"{{{NS_STREAM}}}error"
    assert back[1].get(XML_LANG) == "en"


def test_xml_lang_is_written_with_the_xml_prefix_and_never_declared():
    el = E(f"{{{NS_CLIENT}}}message", {XML_LANG: "en"})
    text = xmlio.tostring(el)
    assert text == '<message xmlns="jabber:client" xml:lang="en"/>'
    assert parse(text).get(XML_LANG) == "en"


def test_foreign_namespaced_attributes_stay_bound_in_descendants():
    # A prefix bound on an ancestor must be reused, never left unbound.
    el = E(
        f"{{{NS_CLIENT}}}message",
        {"{urn:foo}a": "1"},
        E(f"{{{NS_CLIENT}}}body", {"{urn:foo}b": "2", "{urn:bar}c": "3"}, text="hi"),
    )
    text = xmlio.tostring(el)
    back = parse(text)
    assert back.get("{urn:foo}a") == "1"
    assert back[0].attrib == {"{urn:foo}b": "2", "{urn:bar}c": "3"}


def test_bosh_prefixed_attribute_and_element():
    body = E(f"{{{NS_BOSH}}}body", {f"{{{NS_XBOSH}}}version": "1.0", "sid": "s"})
    text = xmlio.tostring(body)
    assert text == f'<body xmlns="{NS_BOSH}" xmlns:xmpp="{NS_XBOSH}" xmpp:version="1.0" sid="s"/>'
    assert parse(text).get(f"{{{NS_XBOSH}}}version") == "1.0"


def test_attribute_escaping():
    value = 'a"b<c>d&e\nf\rg\th\'i'
    text = xmlio.tostring(E("x", {"v": value}))
    assert text == '<x v="a&quot;b&lt;c&gt;d&amp;e&#10;f&#13;g&#9;h\'i"/>'
    # a parser gets the exact value back: newlines are not normalised to spaces
    assert parse(text).get("v") == value


def test_text_escaping():
    value = "1 < 2 && 3 > 2 \"q\" 'a' ]]> end"
    text = xmlio.tostring(E("x", text=value))
    assert text == "<x>1 &lt; 2 &amp;&amp; 3 &gt; 2 \"q\" 'a' ]]&gt; end</x>"
    assert parse(text).text == value


def test_tails_are_escaped_and_kept():
    el = parse("<p>a<b>b</b>&amp;tail&lt;<i/>x</p>")
    text = xmlio.tostring(el)
    assert text == "<p>a<b>b</b>&amp;tail&lt;<i/>x</p>"


def test_empty_element_is_self_closed_and_empty_text_too():
    assert xmlio.tostring(E("a")) == "<a/>"
    assert xmlio.tostring(E("a", text="")) == "<a/>"


def test_none_attributes_are_left_out():
    assert xmlio.tostring(E("iq", {"id": "1", "to": None})) == '<iq id="1"/>'


def test_str_and_bytes_input_are_the_same():
    doc = "<a x='é'>ü</a>"
    assert same_tree(parse(doc), parse(doc.encode("utf-8")))


def test_predefined_and_character_references_are_allowed():
    el = parse("<a t='&apos;&quot;'>&lt;&gt;&amp;&#65;&#x263A;</a>")
    assert el.text == "<>&A\u263a"
    assert el.get("t") == "'\""


def test_xml_declaration_is_allowed():
    assert parse("<?xml version='1.0' encoding='UTF-8'?><a/>").tag == "a"


# -- refusals ------------------------------------------------------------------------------

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]><lolz>&lol3;</lolz>'
)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param("<a><!-- hidden --></a>", id="comment-inside"),
        pytest.param("<!-- before --><a/>", id="comment-before"),
        pytest.param("<a/><!-- after -->", id="comment-after"),
        pytest.param("<?php echo 1 ?><a/>", id="pi-before"),
        pytest.param("<a><?target data?></a>", id="pi-inside"),
        pytest.param("<!DOCTYPE a><a/>", id="doctype"),
        pytest.param("<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>", id="internal-entity"),
        pytest.param(BILLION_LAUGHS, id="entity-bomb"),
        pytest.param('<!DOCTYPE a [<!ENTITY ext SYSTEM "file:///etc/passwd">]><a>&ext;</a>', id="external-entity"),
        pytest.param('<!DOCTYPE a SYSTEM "http://127.0.0.1:1/evil.dtd"><a/>', id="external-dtd"),
        pytest.param('<!DOCTYPE a [<!ENTITY % p SYSTEM "http://127.0.0.1:1/p">%p;]><a/>', id="parameter-entity"),
    ],
)
def test_restricted_xml(doc):
    with pytest.raises(XMLError) as info:
        parse(doc)
    assert info.value.condition == "restricted-xml"
    assert info.value.text


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"<a>", id="unclosed"),
        pytest.param(b"<a></b>", id="mismatched"),
        pytest.param(b"", id="empty"),
        pytest.param(b"   ", id="blank"),
        pytest.param(b"<a/><b/>", id="two-roots"),
        pytest.param(b"text only", id="no-element"),
        pytest.param(b"<a>&undefined;</a>", id="undefined-entity"),
        pytest.param(b"<a x='1' x='2'/>", id="duplicate-attribute"),
        pytest.param(b"<p:a/>", id="unbound-prefix"),
        pytest.param(b"<a>\xff\xfe</a>", id="invalid-utf8-bytes"),
        pytest.param(b"<a>\xc3(</a>", id="truncated-utf8-sequence"),
        pytest.param(b"<a>\xed\xa0\x80</a>", id="utf8-surrogate"),
        pytest.param(b"<a>\x01</a>", id="control-char"),
        pytest.param(b"<a>&#0;</a>", id="nul-reference"),
    ],
)
def test_not_well_formed(data):
    with pytest.raises(XMLError) as info:
        parse(data)
    assert info.value.condition == "not-well-formed", info.value.text


def test_size_limit_is_checked_before_parsing():
    # Garbage over the limit is policy-violation, not not-well-formed: it was never parsed.
    with pytest.raises(XMLError) as info:
        parse(b"<" * 101, limit=100)
    assert info.value.condition == "policy-violation"
    # the limit counts UTF-8 bytes, not characters
    doc = "<a>" + "é" * 50 + "</a>"  # 57 characters, 107 bytes
    with pytest.raises(XMLError) as info:
        parse(doc, limit=100)
    assert info.value.condition == "policy-violation"
    assert parse(doc, limit=107).text == "é" * 50


def test_size_limit_boundary():
    doc = b"<a>" + b"x" * 93 + b"</a>"
    assert len(doc) == 100
    assert parse(doc, limit=100).text == "x" * 93
    with pytest.raises(XMLError) as info:
        parse(doc, limit=99)
    assert info.value.condition == "policy-violation"


def test_error_is_a_value_error_with_text():
    err = XMLError("not-well-formed", "boom")
    assert isinstance(err, ValueError)
    assert str(err) == "boom" and err.condition == "not-well-formed"


def test_split_tag():
    assert xmlio.split_tag("{jabber:client}iq") == ("jabber:client", "iq")
    assert xmlio.split_tag("iq") == (None, "iq")


def test_cdata_takes_the_strict_path_and_utf16_is_refused():
    # "<!" sends CDATA through defusedxml; UTF-16 fails the fast path and then the strict one.
    assert parse("<a><![CDATA[<x/> & y]]></a>").text == "<x/> & y"
    with pytest.raises(XMLError) as info:  # RFC 6120 §11.6: UTF-8 only, on either path
        parse("\ufeff<a/>".encode("utf-16"))
    assert info.value.condition == "not-well-formed"

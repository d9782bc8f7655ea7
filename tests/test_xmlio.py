"""boshroster.xmlio: safe parsing of whole documents and prefix-free serialization."""

import re
import xml.etree.ElementTree as ET
from xml.dom import minidom

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


# -- namespaces the serializer must get right (issue 10, point 7b) ---------------------------
#
# Rule: whatever parse() accepts, tostring() writes as well-formed, namespace-well-formed XML
# (checked with minidom on expat, namespace-aware) that parses back to the same tree.

NS_XML = xmlio.NS_XML


def strict_round_trip(el: ET.Element, *args) -> str:
    """tostring(el), checked strictly and for the same tree; returns the text."""
    text = xmlio.tostring(el, *args)
    minidom.parseString(text.encode("utf-8"))  # raises on any namespace error
    if not args:
        assert same_tree(el, parse(text)), text
        assert xmlio.tostring(parse(text)) == text  # idempotent
    return text


def strict_round_trip_loose(el: ET.Element) -> str:
    """tostring(el) for a server-built tree that no parse could give: checked strictly only."""
    text = xmlio.tostring(el)
    minidom.parseString(text.encode("utf-8"))
    return text


def test_xml_prefixed_element_is_written_with_the_prefix_and_never_declared():
    el = parse(f"<message xmlns='{NS_CLIENT}'><xml:foo/><body>x</body></message>")
    assert el[0].tag == f"{{{NS_XML}}}foo"
    text = strict_round_trip(el)
    assert text == f'<message xmlns="{NS_CLIENT}"><xml:foo/><body>x</body></message>'
    assert NS_XML not in text


def test_children_of_an_xml_prefixed_element_keep_the_default_namespace():
    el = parse(f"<presence xmlns='{NS_CLIENT}'><xml:foo xml:lang='de'><status>s</status>"
               "<x xmlns='urn:x'><y/></x></xml:foo></presence>")
    text = strict_round_trip(el)
    assert '<xml:foo xml:lang="de"><status>s</status><x xmlns="urn:x"><y/></x></xml:foo>' in text
    assert parse(text)[0][0].tag == f"{{{NS_CLIENT}}}status"


def test_the_xml_namespace_is_never_declared_even_inside_a_bosh_body():
    el = E(f"{{{NS_CLIENT}}}message", {XML_LANG: "en"}, E(f"{{{NS_XML}}}foo", {f"{{{NS_XML}}}space": "preserve"}))
    text = xmlio.tostring(el, NS_BOSH, {NS_STREAM})
    assert text == '<message xmlns="jabber:client" xml:lang="en"><xml:foo xml:space="preserve"/></message>'
    minidom.parseString(f'<body xmlns="{NS_BOSH}" xmlns:stream="{NS_STREAM}">{text}</body>')


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param("<foo xmlns='http://www.w3.org/XML/1998/namespace'/>", id="xml-namespace-as-default"),
        pytest.param("<a xmlns:p='http://www.w3.org/XML/1998/namespace'/>", id="xml-namespace-other-prefix"),
        pytest.param("<a xmlns:xml='urn:x'/>", id="xml-prefix-rebound"),
        pytest.param("<a xmlns:xmlns='urn:x'/>", id="xmlns-prefix-declared"),
        pytest.param("<a xmlns:p='http://www.w3.org/2000/xmlns/'/>", id="xmlns-namespace-bound"),
        pytest.param("<a xmlns='http://www.w3.org/2000/xmlns/'/>", id="xmlns-namespace-as-default"),
        pytest.param("<xmlns:foo/>", id="xmlns-prefixed-element"),
        pytest.param("<a xmlns:p=''/>", id="prefix-undeclared"),
        pytest.param("<a:b:c xmlns:a='urn:a'/>", id="two-colons"),
        pytest.param("<a xmlns:p='urn:p' xmlns:q='urn:p' p:x='1' q:x='2'/>", id="duplicate-expanded-attribute"),
        pytest.param("<a xmlns:p='urn:a}b'><p:c/></a>", id="brace-in-namespace"),
        pytest.param("<a><![CDATA[x]]><p:c xmlns:p='urn:a}b'/></a>", id="brace-in-namespace-strict-path"),
    ],
)
def test_namespace_errors_are_not_well_formed(doc):
    """Namespaces in XML 1.0 §3: the xml and xmlns names are reserved; expat enforces it
    on input, so neither namespace can reach the serializer in a wrong place."""
    with pytest.raises(XMLError) as info:
        parse(doc)
    assert info.value.condition == "not-well-formed", info.value.text


def test_a_declared_xml_prefix_with_its_own_namespace_is_accepted_and_not_repeated():
    el = parse("<a xmlns:xml='http://www.w3.org/XML/1998/namespace' xml:lang='en'/>")
    assert strict_round_trip(el) == '<a xml:lang="en"/>'


def test_foreign_attribute_prefixes_never_collide():
    # The client's own prefix names mean nothing: ours are chosen fresh and declared where used.
    el = parse("<x xmlns='urn:x' xmlns:ns0='urn:b' xmlns:ns1='urn:a' ns1:a='1' ns0:b='2'>"
               "<y xmlns:ns0='urn:c' ns0:c='3' ns1:a='4'><z xmlns:p='urn:b' p:b='5'/></y></x>")
    text = strict_round_trip(el)
    assert text == (
        '<x xmlns="urn:x" xmlns:ns0="urn:a" xmlns:ns1="urn:b" ns0:a="1" ns1:b="2">'
        '<y xmlns:ns2="urn:c" ns2:c="3" ns0:a="4"><z ns1:b="5"/></y></x>'
    )


def test_an_attribute_in_the_default_namespace_gets_a_prefix():
    el = parse("<x xmlns='urn:x' xmlns:d='urn:x' d:a='1' a='2'/>")
    assert el.attrib == {"{urn:x}a": "1", "a": "2"}
    assert strict_round_trip(el) == '<x xmlns="urn:x" xmlns:ns0="urn:x" ns0:a="1" a="2"/>'


def test_namespace_uris_and_values_are_escaped():
    el = parse("<x xmlns='urn:a&amp;b&quot;c&lt;d&gt;' xmlns:p='urn:&#9;tab&#10;' p:v='&#13;&#10;&#9;&quot;'/>")
    assert el.tag == '{urn:a&b"c<d>}x'
    assert el.get("{urn:\ttab\n}v") == '\r\n\t"'
    assert strict_round_trip(el) == (
        '<x xmlns="urn:a&amp;b&quot;c&lt;d&gt;" xmlns:ns0="urn:&#9;tab&#10;" ns0:v="&#13;&#10;&#9;&quot;"/>'
    )


def test_a_carriage_return_in_text_survives_as_a_character_reference():
    el = parse("<x>a&#13;b&#13;&#10;c</x>")
    assert el.text == "a\rb\r\nc"
    assert strict_round_trip(el) == "<x>a&#13;b&#13;\nc</x>"


def test_a_literal_carriage_return_is_a_newline_as_xml_says():
    assert parse(b"<x>a\r\nb\rc</x>").text == "a\nb\nc"  # XML 1.0 §2.11


def test_server_built_text_with_characters_xml_forbids_is_still_well_formed():
    # Only the server's own text (a roster name from the backend, say) can hold these.
    bad = "a\x00b\x01c\x1fd\ud800e\ufffef\uffff"
    el = E("x", {"name": bad}, text=bad)
    text = strict_round_trip_loose(el)
    assert parse(text).text == "a\ufffdb\ufffdc\ufffdd\ufffde\ufffdf\ufffd"
    assert parse(text).get("name") == parse(text).text


def test_server_built_attributes_without_or_with_an_empty_namespace():
    el = E("{}x", {"{}a": "1", "b": "2"}, E("{urn:y}y"))
    text = strict_round_trip_loose(el)
    assert text == '<x a="1" b="2"><y xmlns="urn:y"/></x>'


def test_stream_and_bosh_prefixes_on_attributes_and_nested_elements():
    el = parse(f"<message xmlns='{NS_CLIENT}' xmlns:s='{NS_STREAM}' xmlns:b='{NS_XBOSH}' s:a='1' b:v='2'>"
               "<s:x><s:y/><b:z/></s:x></message>")
    text = strict_round_trip(el)
    assert text == (
        f'<message xmlns="{NS_CLIENT}" xmlns:stream="{NS_STREAM}" xmlns:xmpp="{NS_XBOSH}" stream:a="1" xmpp:v="2">'
        "<stream:x><stream:y/><xmpp:z/></stream:x></message>"
    )
    # inside a BOSH body, which declares xmlns:stream already
    inner = xmlio.tostring(el, NS_BOSH, {NS_STREAM})
    assert 'xmlns:stream' not in inner
    doc = f'<body xmlns="{NS_BOSH}" xmlns:stream="{NS_STREAM}">{inner}</body>'
    minidom.parseString(doc)
    assert same_tree(parse(doc)[0], el)


def test_characters_xml_10_forbids_are_refused_on_input():
    for doc in ["<a>&#1;</a>", "<a>&#xFFFE;</a>", "<a>&#xFFFF;</a>", "<a>&#xD800;</a>", "<a>&#x110000;</a>",
                "<a x='&#1;'/>", "<a>\ufffe</a>", "<a>\x0b</a>", "<a x='\x1f'/>"]:
        with pytest.raises(XMLError) as info:
            parse(doc)
        assert info.value.condition == "not-well-formed", doc
    assert parse("<a>&#x10FFFF;&#x9;&#xE000;\U0010ffff</a>").text == "\U0010ffff\t\ue000\U0010ffff"


def test_a_str_with_a_lone_surrogate_is_not_well_formed_not_a_unicode_error():
    with pytest.raises(XMLError) as info:
        parse("<a>\ud800</a>")
    assert info.value.condition == "not-well-formed"


def test_only_utf8_whatever_the_declaration_says():
    # RFC 6120 §11.6: the declared encoding does not turn Latin-1 bytes into text
    for doc in [b"<?xml version='1.0' encoding='ISO-8859-1'?><a>\xe9</a>",
                b"<?xml version='1.0' encoding='ISO-8859-1'?><a><![CDATA[\xe9]]></a>"]:
        with pytest.raises(XMLError) as info:
            parse(doc)
        assert info.value.condition == "not-well-formed"
    assert parse("<?xml version='1.0' encoding='ISO-8859-1'?><a>é</a>".encode()).text == "é"
    assert parse(b"\xef\xbb\xbf<a/>").tag == "a"  # a UTF-8 byte order mark is fine


# -- nesting depth (issue 10, point 7a) ------------------------------------------------------

def chain(levels: int, ns: str = "urn:d") -> bytes:
    """A document ``levels`` elements deep: <a><a>…</a></a>."""
    return (f"<a xmlns='{ns}'>" + "<a>" * (levels - 1) + "x" + "</a>" * levels).encode()


def test_depth_at_the_limit_is_accepted_and_one_more_is_policy_violation():
    assert parse(chain(33), 10**6) is not None  # the stanza and 32 levels below it
    with pytest.raises(XMLError) as info:
        parse(chain(34), 10**6)
    assert info.value.condition == "policy-violation"
    assert info.value.text == "stanza nested deeper than 32 levels"
    assert info.value.document is not None  # the caller can still see whose it was
    assert xmlio.parse(chain(5), 1000, max_depth=4) is not None
    with pytest.raises(XMLError):
        xmlio.parse(chain(6), 1000, max_depth=4)


def test_empty_elements_count_as_a_level_too():
    doc = b"<a>" * 32 + b"<leaf/>" + b"</a>" * 32  # 33 levels, one end tag fewer than elements
    assert parse(doc, 10**6)
    with pytest.raises(XMLError):
        parse(b"<a>" * 33 + b"<leaf/>" + b"</a>" * 33, 10**6)
    # also on the strict path
    with pytest.raises(XMLError) as info:
        parse(b"<a>" * 33 + b"<![CDATA[x]]><leaf/>" + b"</a>" * 33, 10**6)
    assert info.value.condition == "policy-violation"


def test_in_a_bosh_body_the_depth_counts_from_each_stanza():
    body = lambda levels: (f"<body xmlns='{NS_BOSH}' sid='s' rid='1'>".encode() + chain(levels)  # noqa: E731
                           + b"<message/></body>")
    assert len(xmlio.parse(body(33), 10**6, child_limit=10**6)) == 2
    with pytest.raises(XMLError) as info:
        xmlio.parse(body(34), 10**6, child_limit=10**6)
    assert info.value.condition == "policy-violation"
    assert info.value.document.get("sid") == "s"


def test_a_very_deep_document_is_refused_without_recursion_error():
    for levels in (1200, 100_000):
        with pytest.raises(XMLError) as info:
            parse(chain(levels), 10**7)
        assert info.value.condition == "policy-violation"


def test_max_depth_none_accepts_any_depth_and_the_serializer_never_recurses():
    deep = xmlio.parse(chain(5000), 10**6, max_depth=None)
    text = xmlio.tostring(deep)
    minidom.parseString(text)
    assert text == chain(5000).decode().replace("'", '"')
    # a server-built tree deeper than anything the parser accepts, wrapped like a carbon
    root = leaf = E("{jabber:client}message")
    for _ in range(20_000):
        leaf.append(E("{urn:deep}n"))
        leaf = leaf[0]
    wrapped = E("{jabber:client}message", None, E("{urn:xmpp:carbons:2}received", None,
                E("{urn:xmpp:forward:0}forwarded", None, root)))
    assert xmlio.tostring(wrapped, NS_BOSH, {NS_STREAM}).count("<n") == 20_000


def test_max_depth_must_leave_the_stanza_itself():
    assert parse(b"<a/>", 100) is not None
    assert xmlio.parse(b"<a><b/></a>", 100, max_depth=1) is not None
    with pytest.raises(XMLError):
        xmlio.parse(b"<a><b/></a>", 100, max_depth=0)


# -- size of each stanza in a BOSH body (issue 10, point 6) ------------------------------------

BODY_OPEN = f"<body xmlns='{NS_BOSH}' rid='1' sid='abc'>"


def body_with(*children: str, between: str = "") -> bytes:
    return (BODY_OPEN + between + between.join(children) + between + "</body>").encode()


def stanza(size: int, empty: bool = False) -> str:
    """A stanza of exactly ``size`` bytes: <m>zz…</m>, or <m a='zz…'/> when ``empty``."""
    if empty:
        return "<m a='" + "z" * (size - 9) + "'/>"
    return "<m>" + "z" * (size - 7) + "</m>"


@pytest.mark.parametrize("empty", [False, True], ids=["element", "empty-element"])
@pytest.mark.parametrize("between", ["", "\n ", "text", "<![CDATA[ ]]>", "&amp;"])
def test_each_child_of_a_body_is_measured_exactly(empty, between):
    at_limit = body_with(stanza(10, empty), stanza(100, empty), stanza(20, empty), between=between)
    assert len(xmlio.parse(at_limit, 10**6, child_limit=100)) == 3
    over = body_with(stanza(10, empty), stanza(101, empty), stanza(20, empty), between=between)
    with pytest.raises(XMLError) as info:
        xmlio.parse(over, 10**6, child_limit=100)
    assert info.value.condition == "policy-violation"
    assert info.value.text == "stanza of 101 bytes, larger than 100 bytes"
    assert info.value.document.get("sid") == "abc"


def test_the_last_and_only_child_is_measured_too():
    with pytest.raises(XMLError):
        xmlio.parse(body_with(stanza(101)), 10**6, child_limit=100)
    assert xmlio.parse(body_with(stanza(100)), 10**6, child_limit=100) is not None
    with pytest.raises(XMLError):
        xmlio.parse(body_with(stanza(5), stanza(101, empty=True)), 10**6, child_limit=100)


def test_a_child_counts_its_bytes_not_characters_and_its_nested_children():
    big = "<m><b>" + "é" * 45 + "</b><c/></m>"  # 63 characters: 18 bytes of markup, 90 of text
    assert len(big.encode()) == 108
    with pytest.raises(XMLError):
        xmlio.parse(body_with(big), 10**6, child_limit=107)
    assert xmlio.parse(body_with(big), 10**6, child_limit=108) is not None


def test_a_body_no_larger_than_the_limit_is_not_scanned_and_without_child_limit_nothing_is():
    doc = body_with(stanza(90))
    assert len(doc) < 200
    assert xmlio.parse(doc, 10**6, child_limit=200) is not None
    # the stanza limit applies to the children only: the body itself may be larger
    many = body_with(*[stanza(100)] * 50)
    assert len(xmlio.parse(many, 10**6, child_limit=100)) == 50
    assert len(xmlio.parse(many, 10**6)) == 50

"""boshroster.jid: RFC 7622 preparation and enforcement."""

import pytest

from boshroster.xmpp.jid import JID, JIDError, prep_domain, prep_localpart, prep_resource
from boshroster.xmpp.jid import _precis_localpart, _precis_resource  # the fast paths' reference


def parse(text: str) -> JID:
    return JID.parse(text)


# -- localpart (UsernameCaseMapped + §3.3.1) ------------------------------------------------

@pytest.mark.parametrize(
    "raw, prepared",
    [
        ("alice", "alice"),
        ("Alice", "alice"),
        ("ALICE", "alice"),
        ("\uff21\uff2c\uff29\uff23\uff25", "alice"),  # fullwidth ＡＬＩＣＥ -> ascii
        ("\uff41lice", "alice"),  # one fullwidth character
        ("J\u00dcRGEN", "j\u00fcrgen"),
        ("ju\u0308rgen", "j\u00fcrgen"),  # NFC: u + combining diaeresis -> ü
        ("\u03a3\u03ac\u03bc", "\u03c3\u03ac\u03bc"),  # Greek upper -> lower
        ("stra\u00dfe", "stra\u00dfe"),  # ß stays ß (no full case folding)
        ("user.name-1_x", "user.name-1_x"),
        ("+tag", "+tag"),
    ],
)
def test_localpart_preparation(raw, prepared):
    assert prep_localpart(raw) == prepared
    assert parse(f"{raw}@localhost").local == prepared


@pytest.mark.parametrize("char", list("\"&'/:<>@"))
def test_localpart_rfc7622_excluded_characters(char):
    # §3.3.1: precis-i18n's UsernameCaseMapped allows these; RFC 7622 does not.
    with pytest.raises(JIDError):
        prep_localpart(f"a{char}b")
    with pytest.raises(JIDError):
        JID.make(f"a{char}b", "localhost")


@pytest.mark.parametrize(
    "text",
    [
        "a&b@localhost",
        "a'b@localhost",
        'a"b@localhost',
        "a:b@localhost",
        "a<b@localhost",
        "a>b@localhost",
    ],
)
def test_parse_refuses_excluded_characters_in_localpart(text):
    with pytest.raises(JIDError):
        parse(text)


@pytest.mark.parametrize(
    "raw",
    [
        "a b",  # spaces are not allowed in UsernameCaseMapped
        "a\tb",
        "a\u0007b",  # control
        "\u2163",  # ROMAN NUMERAL FOUR (compatibility character): disallowed
        "a\u200bb",  # ZERO WIDTH SPACE
    ],
)
def test_localpart_disallowed_code_points(raw):
    with pytest.raises(JIDError):
        prep_localpart(raw)


def test_localpart_length_limit_counts_utf8_octets():
    assert prep_localpart("a" * 1023) == "a" * 1023
    with pytest.raises(JIDError):
        prep_localpart("a" * 1024)
    # 512 two-byte characters = 1024 octets: too long though only 512 characters
    with pytest.raises(JIDError):
        prep_localpart("\u00e9" * 512)
    assert prep_localpart("\u00e9" * 511) == "\u00e9" * 511


def test_empty_localpart():
    with pytest.raises(JIDError):
        prep_localpart("")
    with pytest.raises(JIDError):
        parse("@localhost")
    with pytest.raises(JIDError):
        parse("@localhost/res")


# -- resourcepart (OpaqueString) -----------------------------------------------------------

@pytest.mark.parametrize(
    "raw, prepared",
    [
        ("Res", "Res"),  # case is kept
        ("My Phone", "My Phone"),  # spaces kept
        ("  padded  ", "  padded  "),
        ("a/b@c", "a/b@c"),  # '/' and '@' are fine in a resource
        ("\u00c9t\u00e9", "\u00c9t\u00e9"),
        ("e\u0301", "\u00e9"),  # NFC
        ("\u3000wide space", " wide space"),  # OpaqueString maps non-ASCII spaces to U+0020
        ("\U0001F600", "\U0001F600"),
    ],
)
def test_resource_preparation(raw, prepared):
    assert prep_resource(raw) == prepared


def test_resource_keeps_case_and_spaces_in_a_full_jid():
    jid = parse("Alice@LocalHost/Laptop At Home")
    assert jid.local == "alice" and jid.domain == "localhost" and jid.resource == "Laptop At Home"


@pytest.mark.parametrize("raw", ["a\u0000b", "tab\there", "bell\u0007", "\u007f"])
def test_resource_refuses_controls(raw):
    with pytest.raises(JIDError):
        prep_resource(raw)


def test_resource_empty_and_too_long():
    with pytest.raises(JIDError):
        prep_resource("")
    with pytest.raises(JIDError):
        parse("alice@localhost/")
    assert len(prep_resource("r" * 1023)) == 1023
    with pytest.raises(JIDError):
        prep_resource("r" * 1024)
    with pytest.raises(JIDError):
        prep_resource("\u00e9" * 600)  # 1200 octets


# -- domainpart ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, prepared",
    [
        ("localhost", "localhost"),
        ("LocalHost", "localhost"),
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),  # one trailing dot is dropped
        ("EXAMPLE.com.", "example.com"),
        ("\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54", "localhost"),  # fullwidth -> ascii
        ("\uff2c\uff2f\uff23\uff21\uff2c\uff28\uff2f\uff33\uff34", "localhost"),
        ("B\u00fccher.Example", "b\u00fccher.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("[::1]", "[::1]"),
        ("[FE80::1]", "[fe80::1]"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_domain_preparation(raw, prepared):
    assert prep_domain(raw) == prepared


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "example..com",
        "example.com..",  # only one trailing dot may go
        ".example.com",
        "exa mple.com",
        "a@b",
        "a/b",
        'a"b',
        "a<b",
        "a" * 64 + ".com",  # label over 63 octets
        "a" * 1024,
    ],
)
def test_domain_refused(raw):
    with pytest.raises(JIDError):
        prep_domain(raw)


def test_domain_jids_compare_after_preparation():
    assert parse("alice@LOCALHOST.") == parse("alice@localhost")
    assert parse("ALICE@localhost/Res") == parse("alice@localhost/Res")
    assert parse("alice@localhost/Res") != parse("alice@localhost/res")


# -- parsing and structure -------------------------------------------------------------------

def test_split_on_first_slash_then_at():
    jid = parse("a@b/c@d/e")
    assert (jid.local, jid.domain, jid.resource) == ("a", "b", "c@d/e")
    jid = parse("domain.example/res@x")
    assert (jid.local, jid.domain, jid.resource) == (None, "domain.example", "res@x")


@pytest.mark.parametrize("text", ["", "/", "@", "a@", "a@/r", "a@b/", "@b", "a@b@c"])
def test_malformed(text):
    with pytest.raises(JIDError):
        parse(text)


def test_bare_and_full():
    full = parse("Alice@LocalHost/Tab 1")
    bare = full.bare
    assert not full.is_bare and bare.is_bare
    assert str(bare) == "alice@localhost"
    assert bare.bare is bare
    assert full.with_resource("Tab 2") == parse("alice@localhost/Tab 2")
    with pytest.raises(JIDError):
        full.with_resource("")
    domain_only = parse("localhost")
    assert domain_only.local is None and domain_only.is_bare and str(domain_only) == "localhost"
    server_resource = parse("localhost/admin")
    assert server_resource.local is None and server_resource.resource == "admin"


@pytest.mark.parametrize(
    "text",
    [
        "alice@localhost",
        "alice@localhost/Res With Spaces",
        "localhost",
        "localhost/r",
        "j\u00fcrgen@b\u00fccher.example/\u00c9",
        "a@[::1]/x",
    ],
)
def test_str_round_trip_of_prepared_jids(text):
    jid = parse(text)
    assert str(jid) == text
    assert parse(str(jid)) == jid


def test_str_of_unprepared_input_is_the_prepared_form():
    assert str(parse("\uff21lice@LOCALHOST./Home")) == "alice@localhost/Home"


def test_make_prepares_every_part():
    jid = JID.make("Bob", "LOCALHOST", "Desk")
    assert str(jid) == "bob@localhost/Desk"
    assert JID.make(None, "localhost") == parse("localhost")
    with pytest.raises(JIDError):
        JID.make("", "localhost")


def test_jids_are_hashable_and_immutable():
    a, b = parse("Alice@localhost"), parse("alice@LOCALHOST")
    assert {a, b} == {a}
    with pytest.raises(Exception):
        a.local = "eve"  # type: ignore[misc]


def test_jid_error_is_a_value_error():
    assert issubclass(JIDError, ValueError)


# -- the ASCII fast paths (issue 12): exactly what precis-i18n answers ------------------------


def _outcome(fn, value):
    try:
        return fn(value)
    except JIDError:
        return JIDError


_ASCII_SAMPLES = ([chr(c) for c in range(0x00, 0x80)] + [f"a{chr(c)}B" for c in range(0x00, 0x80)]
                  + [f"{chr(c)}{chr(c)}" for c in range(0x20, 0x7F)])


@pytest.mark.parametrize("value", _ASCII_SAMPLES, ids=lambda v: v.encode("unicode_escape").decode())
def test_ascii_localpart_fast_path_matches_precis(value):
    assert _outcome(prep_localpart, value) == _outcome(_precis_localpart, value)


@pytest.mark.parametrize("value", _ASCII_SAMPLES, ids=lambda v: v.encode("unicode_escape").decode())
def test_ascii_resource_fast_path_matches_precis(value):
    assert _outcome(prep_resource, value) == _outcome(_precis_resource, value)


@pytest.mark.parametrize("raw, prepared", [
    ("ALICE", "alice"),          # uppercase: case-mapped on the fast path too
    ("Alice.Smith-1_x", "alice.smith-1_x"),
    ("\u00c9lodie", "\u00e9lodie"),   # non-ASCII first: the PRECIS path
    ("abc\u00c9", "abc\u00e9"),       # ASCII, then one non-ASCII character
    ("\uff21\uff22", "ab"),          # fullwidth: width-mapped by PRECIS, not the fast path
    ("a" * 1023, "a" * 1023),
])
def test_localpart_fast_path_boundaries(raw, prepared):
    assert prep_localpart(raw) == prepared
    assert parse(f"{raw}@localhost/r").local == prepared


@pytest.mark.parametrize("raw", ["", "a b", " a", "a ", "a\tb", "a\x7fb", "a\x00", "a" * 1024, "a@b", "a/b"])
def test_localpart_fast_path_refusals(raw):
    with pytest.raises(JIDError):
        prep_localpart(raw)


@pytest.mark.parametrize("raw, prepared", [
    ("Bench Phone", "Bench Phone"),  # spaces and case kept (OpaqueString)
    (" ", " "),
    ("r\u00e9sum\u00e9", "r\u00e9sum\u00e9"),
    ("a\u00a0b", "a b"),             # a non-ASCII space becomes U+0020 (PRECIS path)
    ("r" * 1023, "r" * 1023),
])
def test_resource_fast_path_boundaries(raw, prepared):
    assert prep_resource(raw) == prepared


@pytest.mark.parametrize("raw", ["", "a\tb", "a\x7f", "r" * 1024])
def test_resource_fast_path_refusals(raw):
    with pytest.raises(JIDError):
        prep_resource(raw)

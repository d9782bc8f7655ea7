"""XEP-0313 protocol (boshroster/im/mam.py) over a real SQLite archive: no sockets, no server.

IQs are parsed from the XML a client sends; answers are checked element by element.
Every error case the XEPs name has a test.
"""

from __future__ import annotations

import logging

import pytest

from boshroster.im.archive import ArchiveQuery, Prefs
from boshroster.im.archive_sqlite import SqliteArchive
from boshroster.im.mam import (
    ACCOUNT_FEATURES,
    NS_MAM,
    NS_RSM,
    NS_SID,
    NS_XDATA,
    MamService,
    archivable,
    format_datetime,
    parse_datetime,
    result_message,
    stamp_stanza_id,
)
from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StanzaError
from boshroster.xmpp.jid import JID

DOMAIN = "localhost"
ALICE, BOB = "alice@localhost", "bob@localhost"
CLIENT = "jabber:client"
T0 = 1_700_000_000.0


def q(ns, tag):
    return f"{{{ns}}}{tag}"


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def archive(tmp_path, clock):
    store = SqliteArchive(str(tmp_path / "archive.sqlite3"), clock=clock)
    yield store
    store.close()


@pytest.fixture
def mam(archive):
    return MamService(archive, DOMAIN, default_page=50, max_page=100)


def iq(body: str, kind="set", to=None, frm="alice@localhost/pc", iq_id="q1"):
    to_attr = f' to="{to}"' if to else ""
    return xmlio.parse(f'<iq xmlns="jabber:client" type="{kind}" id="{iq_id}" from="{frm}"{to_attr}>{body}</iq>', 1 << 20)


def form(**fields):
    parts = ['<field var="FORM_TYPE" type="hidden"><value>urn:xmpp:mam:2</value></field>']
    for var, value in fields.items():
        var = var.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        parts.append(f'<field var="{var}">' + "".join(f"<value>{v}</value>" for v in values) + "</field>")
    return '<x xmlns="jabber:x:data" type="submit">' + "".join(parts) + "</x>"


def rsm(**items):
    inner = "".join(f"<{k}/>" if v == "" else f"<{k}>{v}</{k}>" for k, v in items.items())
    return f'<set xmlns="http://jabber.org/protocol/rsm">{inner}</set>'


def query(*parts, queryid="f27", extra=""):
    qid = f' queryid="{queryid}"' if queryid else ""
    return f'<query xmlns="urn:xmpp:mam:2"{qid}>{"".join(parts)}{extra}</query>'


def send(mam, clock, sender, recipient, body, step=1.0, mtype="chat"):
    clock.now += step
    stanza = xmlio.parse(f'<message xmlns="jabber:client" from="{sender}" to="{recipient}" type="{mtype}">'
                         f'<body>{body}</body></message>', 1 << 20)
    return mam.archive_message(stanza, JID.parse(sender), JID.parse(recipient))


def split(out):
    """(result messages, final iq)"""
    assert out[-1].tag == q(CLIENT, "iq") and out[-1].get("type") == "result"
    for m in out[:-1]:
        assert m.tag == q(CLIENT, "message")
    return out[:-1], out[-1]


def bodies(results):
    return [m.find(f"{q(NS_MAM, 'result')}/{q('urn:xmpp:forward:0', 'forwarded')}/{q(CLIENT, 'message')}/{q(CLIENT, 'body')}").text
            for m in results]


def fin_set(final):
    fin = final.find(q(NS_MAM, "fin"))
    assert fin is not None
    s = fin.find(q(NS_RSM, "set"))
    first, last, count = s.find(q(NS_RSM, "first")), s.find(q(NS_RSM, "last")), s.find(q(NS_RSM, "count"))
    return fin, first, last, count


def error_of(mam, stanza, username="alice", to=None):
    with pytest.raises(StanzaError) as info:
        mam.handle_iq(username, stanza, JID.parse(to) if to else None)
    return info.value.condition


# -- dates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2010-06-07T00:00:00Z", 1275868800.0),
    ("2010-06-07T02:00:00+02:00", 1275868800.0),
    ("2010-06-06T19:30:00-04:30", 1275868800.0),
    ("2010-06-07T00:00:00.250Z", 1275868800.25),
])
def test_parse_datetime(text, expected):
    assert parse_datetime(text) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["yesterday", "2010-06-07", "2010-06-07T00:00:00", "2010-13-07T00:00:00Z",
                                 "2010-06-31T00:00:00Z", "2010-06-07T25:00:00Z", "2010-06-07 00:00:00Z",
                                 "20100607T000000Z", "2010-06-07T00:00:00+25:00", ""])
def test_parse_datetime_refuses(bad):
    with pytest.raises(ValueError):
        parse_datetime(bad)


def test_format_datetime_round_trips_to_the_microsecond():
    stamp = T0 + 0.123456
    assert format_datetime(stamp) == "2023-11-14T22:13:20.123456Z"
    assert parse_datetime(format_datetime(stamp)) == pytest.approx(stamp, abs=1e-6)


# -- queries -------------------------------------------------------------------------------


def test_form_discovery(mam):
    out = mam.handle_iq("alice", iq(query(queryid=None), kind="get"), None)
    assert len(out) == 1 and out[0].get("type") == "result" and out[0].get("id") == "q1"
    x = out[0].find(f"{q(NS_MAM, 'query')}/{q(NS_XDATA, 'x')}")
    assert x.get("type") == "form"
    fields = {f.get("var"): f.get("type") for f in x.findall(q(NS_XDATA, "field"))}
    assert fields == {"FORM_TYPE": "hidden", "with": "jid-single", "start": "text-single", "end": "text-single",
                      "before-id": "text-single", "after-id": "text-single", "ids": "list-multi",
                      "include-groupchat": "boolean"}
    assert x.find(f"{q(NS_XDATA, 'field')}/{q(NS_XDATA, 'value')}").text == NS_MAM
    assert x.find(f".//{q('http://jabber.org/protocol/xdata-validate', 'open')}") is not None
    assert not x.findall(f".//{q(NS_XDATA, 'required')}")


def test_query_results_then_fin(mam, clock):
    sent_id, _ = send(mam, clock, "alice@localhost/pc", BOB, "Hail to thee")
    send(mam, clock, "bob@localhost/phone", ALICE, "and to you")
    out = mam.handle_iq("alice", iq(query()), None)
    results, final = split(out)
    assert bodies(results) == ["Hail to thee", "and to you"]
    first = results[0]
    assert first.get("to") == "alice@localhost/pc" and first.get("from") == ALICE
    result = first.find(q(NS_MAM, "result"))
    assert result.get("queryid") == "f27" and result.get("id") == sent_id
    delay = result.find(f"{q('urn:xmpp:forward:0', 'forwarded')}/{q('urn:xmpp:delay', 'delay')}")
    assert parse_datetime(delay.get("stamp")) == pytest.approx(T0 + 1)
    inner = result.find(f"{q('urn:xmpp:forward:0', 'forwarded')}/{q(CLIENT, 'message')}")
    assert inner.get("from") == "alice@localhost/pc" and inner.get("to") == BOB and inner.get("type") == "chat"
    assert inner.find(q(NS_SID, "stanza-id")) is None  # stored without the live copies' ids
    assert final.get("id") == "q1" and final.get("to") == "alice@localhost/pc"
    fin, first_el, last_el, count = fin_set(final)
    assert fin.get("complete") == "true" and fin.get("queryid") == "f27"
    assert first_el.text == sent_id and first_el.get("index") == "0"
    assert last_el.text == results[1].find(q(NS_MAM, "result")).get("id")
    assert count.text == "2"
    # serializes as clients expect: the forwarded message in jabber:client, no ns0: prefixes
    text = xmlio.tostring(first)
    assert "ns0:" not in text and '<forwarded xmlns="urn:xmpp:forward:0">' in text


def test_query_to_own_bare_jid_is_allowed(mam, clock):
    send(mam, clock, "alice@localhost/pc", BOB, "x")
    results, _ = split(mam.handle_iq("alice", iq(query(), to=ALICE), JID.parse(ALICE)))
    assert bodies(results) == ["x"]


def test_paging_120_messages_with_max_50(mam, clock):
    for i in range(120):
        send(mam, clock, "alice@localhost/pc" if i % 2 else "bob@localhost/phone", BOB if i % 2 else ALICE, f"m{i}")
    seen, after, completes, indexes = [], None, [], []
    while True:
        page = rsm(max=50, after=after) if after else rsm(max=50)
        results, final = split(mam.handle_iq("alice", iq(query(page)), None))
        seen += bodies(results)
        fin, first_el, last_el, count = fin_set(final)
        completes.append(fin.get("complete"))
        indexes.append(first_el.get("index"))
        assert count.text == "120"
        if fin.get("complete") == "true":
            break
        after = last_el.text
    assert seen == [f"m{i}" for i in range(120)]
    assert completes == [None, None, "true"] and indexes == ["0", "50", "100"]


def test_last_page_and_flip(mam, clock):
    ids = [send(mam, clock, "alice@localhost/pc", BOB, f"m{i}")[0] for i in range(10)]
    results, final = split(mam.handle_iq("alice", iq(query(rsm(max=3, before=""))), None))
    assert bodies(results) == ["m7", "m8", "m9"]
    fin, first_el, last_el, _ = fin_set(final)
    assert fin.get("complete") is None and first_el.text == ids[7] and first_el.get("index") == "7"
    flipped, final = split(mam.handle_iq("alice", iq(query(rsm(max=3, before=""), extra="<flip-page/>")), None))
    assert bodies(flipped) == ["m9", "m8", "m7"]
    _, first_el, last_el, _ = fin_set(final)
    assert (first_el.text, last_el.text) == (ids[7], ids[9])  # the page is the same, only sent newest first
    earlier, _ = split(mam.handle_iq("alice", iq(query(rsm(max=3, before=ids[7]))), None))
    assert bodies(earlier) == ["m4", "m5", "m6"]


def test_form_filters(mam, clock):
    ids = []
    for i in range(6):
        ids.append(send(mam, clock, "alice@localhost/pc", BOB if i % 2 else "carol@localhost", f"m{i}")[0])
    send(mam, clock, "bob@localhost/phone", ALICE, "from phone")
    send(mam, clock, "bob@localhost/laptop", ALICE, "from laptop")

    def run(**fields):
        return bodies(split(mam.handle_iq("alice", iq(query(form(**fields))), None))[0])

    assert run(**{"with": BOB}) == ["m1", "m3", "m5", "from phone", "from laptop"]
    assert run(**{"with": "bob@localhost/phone"}) == ["from phone"]
    results, final = split(mam.handle_iq("alice", iq(query(form(**{"with": "bob@localhost/phone"}))), None))
    fin, first_el, _, count = fin_set(final)
    assert count is None and first_el.get("index") is None and fin.get("complete") == "true"
    assert error_of(mam, iq(query(form(**{"with": "bob@localhost/phone"}), rsm(index=0)))) == "feature-not-implemented"
    assert run(start=format_datetime(T0 + 2), end=format_datetime(T0 + 4)) == ["m1", "m2", "m3"]
    assert run(after_id=ids[3]) == ["m4", "m5", "from phone", "from laptop"]
    assert run(before_id=ids[2]) == ["m0", "m1"]
    assert run(ids=[ids[4], ids[1]]) == ["m1", "m4"]
    assert run(include_groupchat="false") == run()
    assert run(**{"with": ""}) == run()  # an empty field filters nothing


def test_count_only(mam, clock):
    for i in range(4):
        send(mam, clock, "alice@localhost/pc", BOB, f"m{i}")
    results, final = split(mam.handle_iq("alice", iq(query(rsm(max=0))), None))
    assert results == []
    fin, first_el, last_el, count = fin_set(final)
    assert first_el is None and last_el is None and count.text == "4" and fin.get("complete") is None


def test_empty_archive(mam):
    results, final = split(mam.handle_iq("alice", iq(query()), None))
    fin, first_el, last_el, count = fin_set(final)
    assert results == [] and first_el is None and last_el is None and count.text == "0"
    assert fin.get("complete") == "true"


def test_huge_max_is_clamped_to_the_server_maximum(mam, clock, caplog):
    for i in range(130):
        send(mam, clock, "alice@localhost/pc", BOB, f"m{i}", step=0.01)
    with caplog.at_level(logging.WARNING, logger="boshroster.mam"):
        results, final = split(mam.handle_iq("alice", iq(query(rsm(max=10**12))), None))
    assert len(results) == 100  # max_page
    fin, _, last_el, count = fin_set(final)
    assert fin.get("complete") is None and count.text == "130"
    assert any("clamped" in r.message for r in caplog.records)
    rest, final = split(mam.handle_iq("alice", iq(query(rsm(max=10**12, after=last_el.text))), None))
    assert bodies(rest) == [f"m{i}" for i in range(100, 130)] and fin_set(final)[0].get("complete") == "true"


def test_default_page_size_applies_without_max(mam, clock):
    for i in range(60):
        send(mam, clock, "alice@localhost/pc", BOB, f"m{i}", step=0.01)
    results, final = split(mam.handle_iq("alice", iq(query()), None))
    assert len(results) == 50 and fin_set(final)[0].get("complete") is None


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["start", "end"])
@pytest.mark.parametrize("bad", ["yesterday", "2010-06-07", "2010-06-07T00:00:00", "2010-02-30T00:00:00Z"])
def test_malformed_dates_are_bad_request(mam, field, bad):
    assert error_of(mam, iq(query(form(**{field: bad})))) == "bad-request"


@pytest.mark.parametrize("field", ["free-text-search", "{http://example.com/}stanza-content", "withh"])
def test_unknown_fields_are_feature_not_implemented(mam, field):
    assert error_of(mam, iq(query(form(**{field: "x"})))) == "feature-not-implemented"


@pytest.mark.parametrize("body, condition", [
    ('<x xmlns="jabber:x:data" type="submit"><field var="FORM_TYPE"><value>urn:xmpp:mam:1</value></field></x>',
     "bad-request"),
    ('<x xmlns="jabber:x:data" type="cancel"/>', "bad-request"),
    ('<x xmlns="jabber:x:data" type="submit"><field><value>x</value></field></x>', "bad-request"),
    ('<x xmlns="jabber:x:data" type="submit"><field var="with"><value>a@localhost</value></field>'
     '<field var="with"><value>b@localhost</value></field></x>', "bad-request"),
    ('<x xmlns="jabber:x:data" type="submit"><field var="with"><value>a@localhost</value>'
     '<value>b@localhost</value></field></x>', "bad-request"),
    ('<x xmlns="jabber:x:data" type="submit"><field var="include-groupchat"><value>maybe</value></field></x>',
     "bad-request"),
    ('<x xmlns="jabber:x:data" type="submit"><field var="with"><value>@localhost</value></field></x>',
     "jid-malformed"),
    (rsm(max="ten"), "bad-request"),
    (rsm(max=-1), "bad-request"),
    (rsm(index=-1), "bad-request"),
    (rsm(index="two"), "bad-request"),
    (rsm(index=2, after="abc"), "bad-request"),
    (rsm(after=""), "item-not-found"),
])
def test_bad_query_input(mam, body, condition):
    assert error_of(mam, iq(query(body))) == condition


def test_unknown_ids_are_item_not_found(mam, clock):
    own, _ = send(mam, clock, "alice@localhost/pc", BOB, "x")
    _, bobs = send(mam, clock, "alice@localhost/pc", BOB, "y")
    for bad in ("nope", "A" * 22, bobs):
        assert error_of(mam, iq(query(rsm(after=bad)))) == "item-not-found"
        assert error_of(mam, iq(query(rsm(before=bad)))) == "item-not-found"
        assert error_of(mam, iq(query(form(after_id=bad)))) == "item-not-found"
        assert error_of(mam, iq(query(form(before_id=bad)))) == "item-not-found"
        assert error_of(mam, iq(query(form(ids=[own, bad])))) == "item-not-found"
    assert split(mam.handle_iq("alice", iq(query(form(ids=[own]))), None))


def test_too_many_ids_is_policy_violation(mam):
    assert error_of(mam, iq(query(form(ids=[f"id{i}" for i in range(101)])))) == "policy-violation"


def test_node_attribute_is_item_not_found(mam):
    assert error_of(mam, iq('<query xmlns="urn:xmpp:mam:2" node="urn:xmpp:mucsub:nodes:messages"/>')) == "item-not-found"


@pytest.mark.parametrize("payload", [query(), '<prefs xmlns="urn:xmpp:mam:2"/>', '<metadata xmlns="urn:xmpp:mam:2"/>'])
def test_another_users_archive_is_forbidden(mam, clock, payload):
    send(mam, clock, "bob@localhost/phone", "carol@localhost", "private")
    kind = "set" if payload.startswith("<query") else "get"
    assert error_of(mam, iq(payload, kind=kind, to=BOB), to=BOB) == "forbidden"
    assert error_of(mam, iq(payload, kind=kind, to="nobody@localhost"), to="nobody@localhost") == "forbidden"
    assert error_of(mam, iq(payload, kind=kind, to=DOMAIN), to=DOMAIN) == "service-unavailable"


def test_metadata_set_is_service_unavailable(mam):
    assert error_of(mam, iq('<metadata xmlns="urn:xmpp:mam:2"/>', kind="set")) == "service-unavailable"


def test_an_unreadable_stored_stanza_is_sent_without_its_message(caplog, archive, mam, clock):
    sent, _ = send(mam, clock, "alice@localhost/pc", BOB, "fine")
    archive.flush()
    archive.db.execute("UPDATE body SET stanza='<message><body>not our format'")
    with caplog.at_level(logging.ERROR):
        item = archive.query(ALICE, ArchiveQuery()).items[0]
        assert item.id == sent and item.stanza is None
        msg = result_message("alice@localhost/pc", ALICE, "q", item)
    forwarded = msg.find(f"{q(NS_MAM, 'result')}/{q('urn:xmpp:forward:0', 'forwarded')}")
    assert forwarded.find(q("urn:xmpp:delay", "delay")) is not None
    assert forwarded.find(q(CLIENT, "message")) is None
    assert any("unreadable" in r.message for r in caplog.records)


# -- preferences and metadata --------------------------------------------------------------


def prefs_of(out):
    p = out[0].find(q(NS_MAM, "prefs"))
    jids = lambda name: [j.text for j in p.find(q(NS_MAM, name)).findall(q(NS_MAM, "jid"))]  # noqa: E731
    return p.get("default"), jids("always"), jids("never")


def test_prefs_get_and_set(mam, archive):
    assert prefs_of(mam.handle_iq("alice", iq('<prefs xmlns="urn:xmpp:mam:2"/>', kind="get"), None)) == ("always", [], [])
    body = ('<prefs xmlns="urn:xmpp:mam:2" default="roster"><always><jid>Romeo@Montague.lit</jid></always>'
            '<never><jid>montague@montague.lit</jid></never></prefs>')
    assert prefs_of(mam.handle_iq("alice", iq(body), None)) == ("roster", ["romeo@montague.lit"], ["montague@montague.lit"])
    assert archive.prefs(ALICE) == Prefs("roster", ("romeo@montague.lit",), ("montague@montague.lit",))
    assert prefs_of(mam.handle_iq("alice", iq('<prefs xmlns="urn:xmpp:mam:2"/>', kind="get"), None))[0] == "roster"
    minimal = mam.handle_iq("alice", iq('<prefs xmlns="urn:xmpp:mam:2" default="never"/>'), None)
    assert prefs_of(minimal) == ("never", [], [])


@pytest.mark.parametrize("body, condition", [
    ('<prefs xmlns="urn:xmpp:mam:2"/>', "bad-request"),
    ('<prefs xmlns="urn:xmpp:mam:2" default="sometimes"/>', "bad-request"),
    ('<prefs xmlns="urn:xmpp:mam:2" default="always"><always><jid>a@b@c</jid></always></prefs>', "jid-malformed"),
    ('<prefs xmlns="urn:xmpp:mam:2" default="always"><never><jid/></never></prefs>', "jid-malformed"),
    ('<prefs xmlns="urn:xmpp:mam:2" default="always"><always>'
     + "".join(f"<jid>u{i}@localhost</jid>" for i in range(1001)) + "</always></prefs>", "policy-violation"),
])
def test_bad_prefs(mam, archive, body, condition):
    assert error_of(mam, iq(body)) == condition
    assert archive.prefs(ALICE) == Prefs("always")  # unchanged


def test_metadata(mam, clock):
    empty = mam.handle_iq("alice", iq('<metadata xmlns="urn:xmpp:mam:2"/>', kind="get"), None)
    assert len(empty[0].find(q(NS_MAM, "metadata"))) == 0
    first, _ = send(mam, clock, "alice@localhost/pc", BOB, "a")
    send(mam, clock, "alice@localhost/pc", BOB, "b")
    last, _ = send(mam, clock, "alice@localhost/pc", BOB, "c")
    meta = mam.handle_iq("alice", iq('<metadata xmlns="urn:xmpp:mam:2"/>', kind="get"), None)[0].find(q(NS_MAM, "metadata"))
    start, end = meta.find(q(NS_MAM, "start")), meta.find(q(NS_MAM, "end"))
    assert start.get("id") == first and end.get("id") == last
    assert parse_datetime(start.get("timestamp")) == pytest.approx(T0 + 1)
    assert parse_datetime(end.get("timestamp")) == pytest.approx(T0 + 3)


def test_account_features():
    assert ACCOUNT_FEATURES[0] == "urn:xmpp:mam:2" and "urn:xmpp:mam:2#extended" in ACCOUNT_FEATURES


# -- archiving messages --------------------------------------------------------------------


def msg(xml):
    return xmlio.parse(f'<message xmlns="jabber:client" from="alice@localhost/pc" to="bob@localhost" {xml}</message>',
                       1 << 20)


@pytest.mark.parametrize("xml, expected", [
    ('type="chat"><body>hi</body>', True),
    ('><body>hi</body>', True),  # 'normal'
    ('type="normal"><body>hi</body>', True),
    ('type="chat"><active xmlns="http://jabber.org/protocol/chatstates"/>', False),
    ('type="normal"><subject>s</subject>', False),
    ('type="headline"><body>news</body>', False),
    ('type="groupchat"><body>room</body>', False),
    ('type="error"><body>bounce</body>', False),
    ('type="chat"><body>hi</body><no-store xmlns="urn:xmpp:hints"/>', False),
    ('type="chat"><body>hi</body><no-permanent-store xmlns="urn:xmpp:hints"/>', False),
    ('type="chat"><body>hi</body><no-store xmlns="urn:xmpp:hints"/><store xmlns="urn:xmpp:hints"/>', True),
])
def test_archivable(xml, expected):
    assert archivable(msg(xml)) is expected


def test_archive_message_both_directions_and_forged_ids_removed(mam, archive):
    stanza = msg('type="chat"><body>hi</body><stanza-id xmlns="urn:xmpp:sid:0" by="bob@localhost" id="forged"/>'
                 '<stanza-id xmlns="urn:xmpp:sid:0" by="localhost" id="forged2"/>'
                 '<stanza-id xmlns="urn:xmpp:sid:0" id="no-by"/>'
                 '<stanza-id xmlns="urn:xmpp:sid:0" by="room@conference.example.org" id="theirs"/>')
    sender_id, recipient_id = mam.archive_message(stanza, JID.parse("alice@localhost/pc"), JID.parse(BOB))
    assert sender_id and recipient_id and sender_id != recipient_id
    left = [s.get("id") for s in stanza.findall(q(NS_SID, "stanza-id"))]
    assert left == ["theirs"]
    mine, theirs = archive.query(ALICE, ArchiveQuery()).items, archive.query(BOB, ArchiveQuery()).items
    assert [m.id for m in mine] == [sender_id] and mine[0].outgoing and mine[0].peer == BOB
    assert [m.id for m in theirs] == [recipient_id] and not theirs[0].outgoing and theirs[0].resource == "pc"
    assert [s.get("id") for s in mine[0].stanza.findall(q(NS_SID, "stanza-id"))] == ["theirs"]


def test_note_to_self_is_stored_once(mam, archive):
    stanza = msg('type="chat"><body>remember</body>')
    stanza.set("to", "alice@localhost/phone")
    sender_id, recipient_id = mam.archive_message(stanza, JID.parse("alice@localhost/pc"), JID.parse("alice@localhost/phone"))
    assert sender_id == recipient_id
    assert [m.id for m in archive.query(ALICE, ArchiveQuery()).items] == [sender_id]


def test_not_archived_messages_get_no_ids(mam, archive):
    assert mam.archive_message(msg('type="headline"><body>x</body>'), JID.parse("alice@localhost/pc"), JID.parse(BOB)) == (None, None)
    assert archive.query(ALICE, ArchiveQuery()).count == 0


def test_archive_message_follows_each_partys_prefs(archive):
    asked = []

    def in_roster(user, peer):
        asked.append((user, peer))
        return peer == "carol@localhost"

    mam = MamService(archive, DOMAIN, in_roster=in_roster)
    archive.set_prefs(BOB, Prefs("always", never=("alice@localhost/pc",)))
    archive.set_prefs(ALICE, Prefs("roster"))
    sender_id, recipient_id = mam.archive_message(msg('type="chat"><body>a</body>'), JID.parse("alice@localhost/pc"), JID.parse(BOB))
    assert sender_id is None and recipient_id is None  # bob not in alice's roster; bob never from alice/pc
    assert ("alice", BOB) in asked
    stanza = msg('type="chat"><body>b</body>')
    stanza.set("from", "alice@localhost/phone")
    sender_id, recipient_id = mam.archive_message(stanza, JID.parse("alice@localhost/phone"), JID.parse(BOB))
    assert sender_id is None and recipient_id is not None  # bob's 'never' was for alice/pc only
    stanza = msg('type="chat"><body>c</body>')
    stanza.set("to", "carol@localhost")
    sender_id, recipient_id = mam.archive_message(stanza, JID.parse("alice@localhost/pc"), JID.parse("carol@localhost"))
    assert sender_id is not None and recipient_id is not None
    assert archive.query(ALICE, ArchiveQuery()).count == 1


def test_stamp_stanza_id_replaces_ours_only():
    stanza = msg('type="chat"><body>hi</body><stanza-id xmlns="urn:xmpp:sid:0" by="room@muc.example.org" id="r"/>')
    stamp_stanza_id(stanza, BOB, "one")
    stamp_stanza_id(stanza, BOB, "two")
    ids = [(s.get("by"), s.get("id")) for s in stanza.findall(q(NS_SID, "stanza-id"))]
    assert ids == [("room@muc.example.org", "r"), (BOB, "two")]

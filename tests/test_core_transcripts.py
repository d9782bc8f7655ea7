"""The session core in transcripts (transcript.py): what a client sends, what each client receives.

Real Core (account store, offline store, event bus, every module hooked), no
sockets; users are logged in with resource ``res``.
"""

import pytest

import transcript
from test_session_core import backend, core, login  # noqa: F401  (fixtures)


@pytest.fixture
def clients(core):  # noqa: F811
    alice = login(core, "alice", presence=True)
    bob = login(core, "bob", presence=True)
    alice.take(), bob.take()
    return {"alice": alice, "bob": bob}


def test_software_version_xep_0092(clients):
    transcript.run(clients, """
        alice sends:
            <iq type='get' id='v1' to='localhost'><query xmlns='jabber:iq:version'/></iq>
        alice receives:
            <iq type='result' id='v1' from='localhost' to='alice@localhost/res'>
              <query xmlns='jabber:iq:version'><name>boshroster</name><version>{any}</version></query>
            </iq>
    """)


def test_server_disco_lists_what_is_hooked(clients):
    transcript.run(clients, """
        alice sends:
            <iq type='get' id='d1' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>
        alice receives:
            <iq type='result' id='d1' from='localhost' to='alice@localhost/res'>
              <query xmlns='http://jabber.org/protocol/disco#info'>
                <identity category='server' type='im' name='boshroster'/>
                <feature var='http://jabber.org/protocol/disco#info'/>
                <feature var='http://jabber.org/protocol/disco#items'/>
                <feature var='urn:xmpp:ping'/>
                <feature var='urn:xmpp:carbons:2'/>
                <feature var='jabber:iq:version'/>
              </query>
            </iq>
    """)


def test_account_disco_and_ping_of_another_user(clients):
    transcript.run(clients, """
        alice sends:
            <iq type='get' id='d2' to='bob@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>
            <iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>
        alice receives:
            <iq type='result' id='d2' from='bob@localhost' to='alice@localhost/res'>
              <query xmlns='http://jabber.org/protocol/disco#info'>
                <identity category='account' type='registered'/>
                <feature var='http://jabber.org/protocol/disco#info'/>
                <feature var='urn:xmpp:mam:2'/>
                <feature var='urn:xmpp:mam:2#extended'/>
                <feature var='urn:xmpp:mam:2#groupchat-field'/>
                <feature var='urn:xmpp:sid:0'/>
              </query>
            </iq>
            <iq type='result' id='p1' from='localhost' to='alice@localhost/res'/>
        bob receives nothing
    """)


def test_unknown_iq_is_service_unavailable_and_results_are_swallowed(clients):
    transcript.run(clients, """
        alice sends:
            <iq type='get' id='u1' to='localhost'><query xmlns='urn:example:nothing'/></iq>
            <iq type='result' id='u2' to='localhost'/>
        alice receives:
            <iq type='error' id='u1' from='localhost' to='alice@localhost/res'>
              <error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>
            </iq>
    """)


def test_roster_set_is_refused_and_subscriptions_are_dropped(clients):
    transcript.run(clients, """
        alice sends:
            <iq type='set' id='r1'><query xmlns='jabber:iq:roster'><item jid='eve@localhost'/></query></iq>
            <presence type='subscribe' to='bob@localhost'/>
        alice receives:
            <iq type='error' id='r1' to='alice@localhost/res'>
              <error type='cancel'>
                <service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>
                <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas' xml:lang='en'>{any}</text>
              </error>
            </iq>
        bob receives nothing
    """)


def test_chat_message_is_delivered_with_from_stamped(clients):
    transcript.run(clients, """
        alice sends:
            <message type='chat' id='m1' to='bob@localhost' from='mallory@evil.example'><body>hi &amp; bye</body></message>
        bob receives:
            <message type='chat' id='m1' to='bob@localhost' from='alice@localhost/res'><body>hi &amp; bye</body>
              <stanza-id xmlns='urn:xmpp:sid:0' by='bob@localhost' id='{any}'/>
            </message>
        alice receives nothing
    """)


def test_message_to_an_unknown_user_is_bounced(clients):
    transcript.run(clients, """
        alice sends:
            <message type='chat' id='m2' to='nobody@localhost'><body>hello?</body></message>
        alice receives:
            <message type='error' id='m2' from='nobody@localhost' to='alice@localhost/res'>
              <error type='cancel'>
                <service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>
                <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas' xml:lang='en'>no such user</text>
              </error>
            </message>
    """)


def test_iq_to_an_offline_full_jid_is_service_unavailable(clients):
    transcript.run(clients, """
        alice sends:
            <iq type='get' id='f1' to='bob@localhost/elsewhere'><ping xmlns='urn:xmpp:ping'/></iq>
        alice receives:
            <iq type='error' id='f1' from='bob@localhost/elsewhere' to='alice@localhost/res'>
              <error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>
            </iq>
    """)


def test_presence_update_goes_to_contacts_and_own_resources(clients):
    transcript.run(clients, """
        alice sends:
            <presence><show>away</show></presence>
        bob receives:
            <presence from='alice@localhost/res' to='bob@localhost'><show>away</show></presence>
        alice receives:
            <presence from='alice@localhost/res' to='alice@localhost'><show>away</show></presence>
    """)


def test_transcript_mismatch_is_reported():
    """The comparer itself can fail."""
    want = transcript._parse("<message to='a'><body>x</body></message>")[0]
    assert transcript.match(want, transcript._parse("<message to='a'><body>y</body></message>")[0])
    assert transcript.match(want, transcript._parse("<message to='b'><body>x</body></message>")[0])
    assert transcript.match(want, transcript._parse("<message to='a' id='1'><body>x</body></message>")[0])
    assert transcript.match(want, transcript._parse("<message to='a'><body>x</body></message>")[0]) is None

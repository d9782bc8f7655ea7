"""Per-stream traffic shaping: a client that sends faster than ``c2s_stanza_rate``
(after a burst of ``c2s_stanza_burst``) is slowed down, never cut off, nothing it
sent is dropped, and other users are not slowed with it."""

import time

from boshroster.xmpp.stream import Shaper
from harness import NS_CLIENT, WsClient, q


def test_shaper_allows_a_burst_then_the_rate():
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    shaper = Shaper(rate=10, burst=5, clock=lambda: now[0], sleep=sleep)
    assert [shaper.take() for _ in range(5)] == [0.0] * 5
    assert abs(shaper.take() - 0.1) < 1e-9  # the 6th waits for one token
    now[0] += 1.0  # a quiet second refills 10 tokens, but never beyond the burst
    assert [shaper.take() for _ in range(5)] == [0.0] * 5
    assert shaper.take() > 0
    assert sum(slept) < 0.3


def test_a_flooding_client_is_slowed_down_and_loses_nothing(make_server):
    server = make_server(c2s_stanza_rate=20.0, c2s_stanza_burst=10)
    receiver, flooder, bystander = (WsClient(server.ws_url) for _ in range(3))
    receiver.login("bob"), flooder.login("alice"), bystander.login("carol")
    for client in (receiver, flooder, bystander):
        client.get_roster()
        client.presence()
    started = time.monotonic()
    for n in range(50):
        flooder.message("bob@localhost", f"m{n}")
    # the bystander is not slowed down by the flooder's shaping
    t0 = time.monotonic()
    assert bystander.iq("<ping xmlns='urn:xmpp:ping'/>", to="localhost").get("type") == "result"
    assert time.monotonic() - t0 < 1.0
    got = [receiver.recv_message(timeout=10).findtext(q(NS_CLIENT, "body")) for _ in range(50)]
    elapsed = time.monotonic() - started
    assert got == [f"m{n}" for n in range(50)]  # all of them, in order
    assert elapsed >= 1.5, elapsed  # (50 - 10) / 20 per second = 2 s of shaping
    assert server.log().count("sends faster than 20.0 stanzas/s: slowed down") == 1  # once per flood, not per burst
    for client in (receiver, flooder, bystander):
        client.close()

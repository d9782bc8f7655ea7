"""Two users logging in at the same moment on two nodes see each other (RFC 6121 §4.2-4.4),
and a message sent as soon as the other is seen is delivered live.

Each node learns of the other's new resource through the directory's pub/sub, a moment
after it was written: a broadcast or probe that runs in that moment on either side finds
nobody there. Whichever way the race goes, both must end up with the other's presence.
"""

from __future__ import annotations

import gevent
import pytest

from harness import NS_CLIENT, WsClient, q
from test_cluster import Cluster, redis_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.cluster


@pytest.fixture
def cluster(tmp_path, redis_server, backend):  # noqa: F811
    made = Cluster(tmp_path, redis_server, backend)
    yield made
    made.close()


def test_simultaneous_logins_on_two_nodes_see_each_other(cluster):
    n1, n2 = cluster.add(), cluster.add()
    for round_ in range(12):
        a, b = WsClient(n1.ws_url), WsClient(n2.ws_url)
        cluster.clients += [a, b]
        a.login("alice", resource=f"r{round_}")
        b.login("bob", resource=f"r{round_}")
        a.get_roster()
        b.get_roster()
        # both initial presences at once, every round a little shifted
        if round_ % 2:
            gevent.joinall([gevent.spawn(a.presence), gevent.spawn(gevent.sleep, 0.0005 * round_), gevent.spawn(b.presence)])
        else:
            gevent.joinall([gevent.spawn(b.presence), gevent.spawn(a.presence)])
        a.recv_presence(timeout=5, sender=f"bob@localhost/r{round_}")
        b.recv_presence(timeout=5, sender=f"alice@localhost/r{round_}")
        # Seen available, so messaged at once: to the bare JID, live (not to offline storage:
        # the stanza that brought the presence must not overtake the directory change).
        a.message("bob@localhost", f"hi {round_}")
        b.message("alice@localhost", f"hello {round_}")
        assert b.recv_message(timeout=5, sender="alice").findtext(q(NS_CLIENT, "body")) == f"hi {round_}"
        assert a.recv_message(timeout=5, sender="bob").findtext(q(NS_CLIENT, "body")) == f"hello {round_}"
        a.close()
        b.close()

"""Two users logging in at the same moment on two nodes see each other (RFC 6121 §4.2-4.4).

Each node learns of the other's new resource through the directory's pub/sub, a moment
after it was written: a broadcast or probe that runs in that moment on either side finds
nobody there. Whichever way the race goes, both must end up with the other's presence.
"""

from __future__ import annotations

import gevent
import pytest

from harness import WsClient
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
        a.close()
        b.close()

# Monkey-patch before anything else imports socket/ssl/threading: the tests run
# real gevent servers and blocking clients (http.client, websocket-client) in
# one process, so every blocking call must yield to the hub.
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backend_app import TestBackend  # noqa: E402
from harness import BoshClient, ServerProcess, WsClient, stop_clients  # noqa: E402

# The demo world every end-to-end test starts from: everyone knows everyone.
USERS = ("alice", "bob", "carol", "dave")
NAMES = {"alice": "Alice Liddell", "bob": "Bob Builder", "carol": "Carol Danvers", "dave": "Dave Bowman"}


def demo_contacts(domain: str = "localhost") -> dict:
    return {
        user: {f"{other}@{domain}": {"name": NAMES[other], "groups": ["Friends"]} for other in USERS if other != user}
        for user in USERS
    }


@pytest.fixture
def backend():
    """A real HTTP roster backend serving the demo contacts and counting GETs."""
    server = TestBackend(demo_contacts()).start()
    yield server
    server.stop()


@pytest.fixture
def make_server(tmp_path, backend):
    """Start servers with extra settings: make_server(bosh_max_inactivity=2)."""
    started = []

    def make(**settings):
        settings.setdefault("http_roster_url", backend.url_template)
        workdir = tmp_path / f"server{len(started)}"
        workdir.mkdir()
        server = ServerProcess(workdir, **settings).start()
        started.append(server)
        return server

    yield make
    for server in started:
        stop_clients(server.port)  # close their keep-alive connections first
        server.stop()


@pytest.fixture
def server(make_server):
    """A running server with the demo users and a short BOSH wait."""
    return make_server(bosh_max_wait=5)


@pytest.fixture(params=["bosh", "websocket"])
def transport(request):
    return request.param


@pytest.fixture
def connect(server, transport):
    """connect() -> a new, not yet logged-in client over the parametrized transport."""
    clients = []

    def make(kind=None, **kwargs):
        kind = kind or transport
        client = BoshClient(server.bosh_url, wait=5, **kwargs) if kind == "bosh" else WsClient(server.ws_url, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        try:
            client.stop()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """Cluster tests (real Redis, PostgreSQL, nginx) count as interop too: ``-m "not interop"``
    is the layer that needs no third-party program.

    Tests marked run_first go first, run_last last, the others keep their order: the
    request test_nginx.py holds through nginx for a minute then overlaps the whole run
    instead of adding a minute to it."""
    for item in items:
        if item.get_closest_marker("cluster") and not item.get_closest_marker("interop"):
            item.add_marker(pytest.mark.interop)

    def rank(item) -> int:
        if item.get_closest_marker("run_last"):
            return 2
        return 0 if item.get_closest_marker("run_first") else 1

    items.sort(key=rank)

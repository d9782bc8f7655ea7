"""The roster client's reply-header reader (issue 12): the same message as http.client's.

``roster/backend_http.parse_response_headers`` skips email's parser for plain header
blocks; these tests compare it with ``http.client.parse_headers`` on plain and odd
blocks, and fetch rosters through ``RosterBackend`` from a raw backend that sends such
blocks (real sockets, real replies), including the ones http.client refuses.
"""

from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402
import io  # noqa: E402

import pytest  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from boshroster.roster.backend import RosterBackend, RosterFetchError  # noqa: E402
from boshroster.roster.backend_http import parse_response_headers  # noqa: E402

BLOCKS = {
    "plain": b"Content-Type: application/json\r\nContent-Length: 7\r\nETag: \"v1\"\r\n\r\n",
    "no-blank-after-colon": b"Content-Type:application/json\r\nX-A:\t\t tabbed  \r\n\r\n",
    "empty-value": b"X-Empty:\r\nX-Blank:   \r\nContent-Length: 2\r\n\r\n",
    "lf-only": b"Content-Type: application/json\nContent-Length: 7\n\n",
    "duplicates-and-case": b"etag: \"a\"\r\nETAG: \"b\"\r\nset-cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
    "latin-1-value": "X-Name: J\u00fcrgen \u00e9\r\n\r\n".encode("latin-1"),
    "control-characters-in-value": b"X-A: a\x0bb\x0cc\x1cd\x85e\r\nX-B: f\r\n\r\n",
    "obs-fold": b"X-Folded: one\r\n two\r\n\tthree\r\nContent-Length: 7\r\n\r\n",
    "no-colon": b"Content-Length: 7\r\ngarbage line\r\nETag: \"x\"\r\n\r\n",
    "empty-name": b"Content-Length: 7\r\n: nameless\r\n\r\n",
    "space-in-name": b"Bad Name: v\r\nContent-Length: 7\r\n\r\n",
    "from-line": b"From someone\r\nContent-Length: 7\r\n\r\n",
    "non-ascii-name": "N\u00e4me: v\r\n\r\n".encode("latin-1"),
    "cr-inside-value": b"X-A: a\rb\r\nContent-Length: 7\r\n\r\n",
    "first-line-continuation": b" leading: blank\r\nContent-Length: 7\r\n\r\n",
    "multipart": b"Content-Type: multipart/mixed; boundary=xyz\r\nContent-Length: 7\r\n\r\n",
    "multipart-upper": b"content-type:   MULTIPART/form-data\r\n\r\n",
    "message-rfc822": b"Content-Type: message/rfc822\r\nContent-Length: 7\r\n\r\n",
    "message-delivery-status": b"Content-Type: message/delivery-status\r\n\r\n",
    "messages-is-not-message": b"Content-Type: messages/x\r\n\r\n",
    "eof-terminated": b"Content-Type: application/json\r\nX-A: 1\r\n",
    "nothing": b"\r\n",
    "eof-at-once": b"",
}


def summary(msg) -> tuple:
    payload = msg.get_payload()
    if isinstance(payload, list):  # sub-messages (message/*) or parts: compared by content
        payload = [summary(part) for part in payload]
    return (type(msg), msg.items(), payload, msg.is_multipart(),
            [type(d) for d in msg.defects], msg.get_content_type(), msg.get("content-length"),
            msg.get_all("etag"), msg.get_unixfrom())


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_fast_reply_header_reader_matches_http_client(name):
    fast = parse_response_headers(io.BytesIO(BLOCKS[name] + b"BODY"))
    reference = http.client.parse_headers(io.BytesIO(BLOCKS[name] + b"BODY"))
    assert summary(fast) == summary(reference)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_fast_reply_header_reader_leaves_the_body_unread(name):
    fp = io.BytesIO(BLOCKS[name] + b"BODY")
    parse_response_headers(fp)
    reference = io.BytesIO(BLOCKS[name] + b"BODY")
    http.client.parse_headers(reference)
    assert fp.read() == reference.read()


def test_header_line_and_count_limits_are_http_clients():
    with pytest.raises(http.client.LineTooLong):
        parse_response_headers(io.BytesIO(b"X-A: " + b"a" * 70000 + b"\r\n\r\n"))
    with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
        parse_response_headers(io.BytesIO(b"X-A: 1\r\n" * 101 + b"\r\n"))


# -- through RosterBackend, against a raw backend --------------------------------------------

BODY = b'{"marie@example.com": {"name": "Marie"}}'


@pytest.fixture
def raw_backend():
    """A keep-alive backend answering every GET with ``state['head']`` (status line and
    header block, without the final CRLF) and the JSON body."""
    state = {"head": b"", "connections": 0}

    def handle(sock, _addr):
        state["connections"] += 1
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                buf += chunk
            _, _, buf = buf.partition(b"\r\n\r\n")
            sock.sendall(state["head"] % len(BODY) + b"\r\n" + BODY)

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    state["url"] = f"http://127.0.0.1:{server.server_port}/contacts/%s"
    yield state
    server.stop()


REPLIES = {
    "plain": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"v1\"\r\nContent-Length: %d\r\n",
    "lf-only": b"HTTP/1.1 200 OK\nContent-Type: application/json\nETag: \"v1\"\nContent-Length: %d\n",
    "obs-fold": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Folded: a\r\n b\r\n"
                 b"ETag: \"v1\"\r\nContent-Length: %d\r\n"),
    "a line without a colon": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nETag: \"v1\"\r\n"
                               b"Content-Length: %d\r\nnot a header\r\n"),
    "lowercase names": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\netag: \"v1\"\r\ncontent-length: %d\r\n",
    "100 continue first": (b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: %d\r\n"),
}


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_rosters_are_read_from_replies_with_any_header_block(raw_backend, name):
    raw_backend["head"] = REPLIES[name]
    rb = RosterBackend(raw_backend["url"], connect_timeout=2, read_timeout=2)
    for _ in range(3):
        roster, validators = rb.fetch_validated("alice")
        assert list(roster) == ["marie@example.com"] and roster["marie@example.com"].name == "Marie"
        if name != "a line without a colon":  # email's parser stops at that line, as before
            assert validators is not None and validators.etag == '"v1"'
    assert rb.connections_opened == 1 == raw_backend["connections"]  # kept alive: framing read right


@pytest.mark.parametrize("head, reason", [
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\nContent-Length: %d\r\n", "connection"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 101 + b"Content-Length: %d\r\n", "connection"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Length: 1\r\n", "connection"),
    (b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n", "status"),
])
def test_bad_reply_headers_are_fetch_errors(raw_backend, head, reason):
    raw_backend["head"] = head
    rb = RosterBackend(raw_backend["url"], connect_timeout=2, read_timeout=2)
    with pytest.raises(RosterFetchError) as info:
        rb.fetch("alice")
    assert info.value.reason == reason, info.value.message

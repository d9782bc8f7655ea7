"""Reading a WSGI request body within a limit: one reader for every app endpoint."""

from __future__ import annotations

from boshroster.transports.http_limits import ClientGone

__all__ = ["read_body"]


def read_body(environ, limit: int) -> bytes | None:
    """A WSGI request's body, or None if it is larger than ``limit`` (checked before reading).

    One reader for every app endpoint (BOSH, refresh, API). A body over the limit is left
    unread: the HTTP handler then closes the connection rather than read and discard it
    (``Content-Length: 99999999999999999999`` is refused at once). Raises ClientGone when the
    client stops short (it closed, ``http_body_timeout`` expired, bad chunking) or sends a
    Content-Length that is not a number: the caller answers 400, no traceback."""
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            size = int(length)
        except ValueError:
            raise ClientGone(f"bad Content-Length {length[:40]!r}") from None
        if size > limit:
            return None
    try:
        if length:
            data = stream.read(size)
            if len(data) < size:
                raise ClientGone(f"request body incomplete ({len(data)} of {size} bytes)")
            return data
        data = stream.read(limit + 1)
    except (OSError, ValueError) as exc:  # pywsgi: "unexpected end of file", bad chunking
        raise ClientGone(str(exc) or type(exc).__name__) from None
    return None if len(data) > limit else data

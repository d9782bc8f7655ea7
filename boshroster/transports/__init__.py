"""Transports: BOSH (XEP-0124/0206) and WebSocket (RFC 7395), turning HTTP/WS traffic into a stream of stanzas."""

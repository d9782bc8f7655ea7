"""Instant messaging (RFC 6121): presence, messages, offline storage, the IQs the server answers itself."""

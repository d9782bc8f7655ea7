"""boshroster: an XMPP server for browser clients whose rosters belong to a web application."""

__version__ = "0.1.0"

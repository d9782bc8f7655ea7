"""The XMPP core: XML, JIDs, errors, the event bus, the stream state machine, sessions, the router.

Nothing here imports a feature (im, roster, auth), a transport or the web layer:
features hook into the event bus, transports feed ``stream.ClientSession``."""

"""The HTTP face: the WSGI app, who is calling (client address, access rules), health and metrics."""

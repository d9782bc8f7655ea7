"""Rosters owned by the web application: the model, the backend client, the cache, the delegation module, refresh."""

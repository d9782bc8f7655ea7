"""Settings: a TOML file (stdlib tomllib), then BOSHROSTER_<KEY> environment overrides.

Keys Prosody has keep Prosody's names (domain, http_interfaces, http_ports,
data_dir, http_roster_url, bosh_max_inactivity, consider_bosh_secure,
trusted_proxies) so operators' habits and scripts carry over.  Every key is
documented with its default in conf/boshroster.toml.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message says which key."""


@dataclass
class Config:
    # --- serving
    domain: str = "localhost"
    http_interfaces: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    http_ports: list[int] = field(default_factory=lambda: [5280])
    data_dir: str = "data"
    static_dir: str = ""  # empty: the static/ folder next to the package
    log_level: str = "info"
    max_connections: int = 20000
    # --- security / proxies
    consider_bosh_secure: bool = False
    consider_websocket_secure: bool = False
    trusted_proxies: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    allow_plain_insecure: bool = False  # offer PLAIN on non-TLS, non-loopback connections
    cors_allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    # --- authentication
    auth: str = "internal"  # "internal" (SCRAM keys in data_dir) or "http"
    http_auth_url: str = ""
    http_auth_timeout: float = 5.0
    http_auth_cache_seconds: float = 60.0
    scram_iterations: int = 4096
    auth_failure_limit: int = 5  # failed logins per source address ...
    auth_failure_window: float = 60.0  # ... within this many seconds, then temporary-auth-failure
    # --- XMPP limits
    stanza_size_limit: int = 262144
    resource_conflict: str = "random"  # "random" (server picks a new resource) or "kick_old"
    max_resources_per_user: int = 10
    offline_max_per_user: int = 1000
    # --- BOSH
    bosh_max_wait: int = 60
    bosh_max_inactivity: int = 60
    bosh_max_requests: int = 2
    bosh_hold: int = 1
    bosh_polling: int = 5
    bosh_max_body: int = 1048576
    bosh_max_pending: int = 5000  # stanzas queued for a client that does not poll
    # --- WebSocket
    websocket_ping_interval: float = 30.0
    websocket_max_queue: int = 1000
    # --- roster delegation (mod_http_roster_admin)
    http_roster_url: str = ""
    roster_connect_timeout: float = 2.0
    roster_read_timeout: float = 5.0
    roster_max_body: int = 10485760
    roster_max_concurrency: int = 20
    roster_cache_grace: float = 60.0
    roster_retry_count: int = 5
    roster_retry_backoff: float = 1.0
    # --- refresh endpoint
    refresh_secret: str = ""
    refresh_allowed_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    refresh_max_users: int = 10000
    refresh_max_body: int = 1048576
    refresh_timeout: float = 30.0
    # --- XML input limits (issue 10, point 7a; stanza_size_limit above is checked for every stanza)
    stanza_max_depth: int = 32  # element levels below a stanza; deeper is a policy-violation stream error

    @property
    def bosh_requests(self) -> int:
        return max(self.bosh_max_requests, self.bosh_hold + 1)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value, default):
    """Check a TOML value against the default's type; parse env strings."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        try:
            value = json.loads(value) if kind in (list, bool) else kind(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{name}: cannot read {value!r} as {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list and isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    if kind is list and default:
        item_kind = type(default[0])
        for item in value:
            if not isinstance(item, item_kind) or isinstance(item, bool):
                raise ConfigError(f"{name}: expected a list of {item_kind.__name__}, got an item {item!r}")
    return value


def load(path: str | None = None, env: dict | None = None, **overrides) -> Config:
    """Read ``path`` (optional), apply BOSHROSTER_* environment variables, then ``overrides``."""
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as fh:
                values.update(tomllib.load(fh))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    env = os.environ if env is None else env
    for name in _FIELDS:
        key = f"BOSHROSTER_{name.upper()}"
        if key in env:
            values[name] = env[key]
    values.update(overrides)
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    defaults = Config()
    kwargs = {name: _coerce(name, value, getattr(defaults, name)) for name, value in values.items()}
    config = Config(**kwargs)
    if path and not os.path.isabs(config.data_dir):
        config.data_dir = os.path.join(os.path.dirname(os.path.abspath(path)), config.data_dir)
    if config.auth not in ("internal", "http"):
        raise ConfigError('auth: must be "internal" or "http"')
    if config.auth == "http" and not config.http_auth_url:
        raise ConfigError('auth = "http" needs http_auth_url')
    if config.resource_conflict not in ("random", "kick_old"):
        raise ConfigError('resource_conflict: must be "random" or "kick_old"')
    if len(config.http_ports) != len(config.http_interfaces) and len(config.http_ports) != 1:
        pass  # every interface gets every port, as Prosody does
    if config.stanza_max_depth < 1:
        raise ConfigError("stanza_max_depth: must be at least 1")
    return config

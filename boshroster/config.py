"""Settings: a TOML file (stdlib tomllib), then BOSHROSTER_<KEY> environment overrides.

Keys Prosody has keep Prosody's names (domain, http_interfaces, http_ports,
data_dir, http_roster_url, bosh_max_inactivity, consider_bosh_secure,
trusted_proxies) so operators' habits and scripts carry over.  Every key is
documented with its default in conf/boshroster.toml.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message says which key."""


class StartupError(RuntimeError):
    """A service the config names (Redis, PostgreSQL) cannot be used at start; the message says which."""


@dataclass(frozen=True)
class Config:
    """Every setting, with its default (documented in conf/boshroster.toml).

    Frozen: read once at start (``load``), never changed while serving, so no
    component can surprise another by rewriting a setting."""

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
    auth_failure_limit: int = 5  # failed logins per (address, username), then a lockout (0: no throttling)
    auth_failure_window: float = 900.0  # a pair's failures are forgotten this long after its last one
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
    bosh_max_pending: int = 50000  # hard bound: stanzas queued for one BOSH client (see bosh_max_pending_bytes)
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
    refresh_max_concurrency: int = 20  # users being refreshed at once (each may wait on the backend)
    # --- stream management (XEP-0198), Prosody's mod_smacks names
    smacks_enabled: bool = True
    smacks_hibernation_time: float = 600.0
    smacks_max_unacked_stanzas: int = 0
    smacks_max_queue_size: int = 500
    smacks_max_old_sessions: int = 1
    # --- per-stream traffic shaping (stanzas a client may send: burst, then per second; 0 = off)
    c2s_stanza_rate: float = 100.0
    c2s_stanza_burst: int = 1000
    # --- login throttling (issue 10.13) and token login (issue 13); auth/throttle.py, auth/tokens.py
    auth_lockout_seconds: float = 60.0  # first lockout of an (address, username) pair; doubles per failure
    auth_lockout_max_seconds: float = 900.0
    auth_address_failure_limit: int = 50  # failures per address (any usernames) ...
    auth_address_failure_window: float = 3600.0  # ... in this sliding window: no new usernames (0 limit: off)
    auth_throttle_exempt: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    http_user_exists_url: str = ""  # GET, %s = username: 2xx exists, 404/410 does not
    http_user_exists_cache_seconds: float = 60.0
    jwt_key: str = ""  # path: HS256 secret, PEM public key, or JWK / JWK set; empty: no token login
    jwt_jid_field: str = "jid"
    jwt_algorithms: list[str] = field(default_factory=list)  # empty: every algorithm the key type allows
    jwt_leeway: float = 30.0  # seconds of clock skew allowed for exp / nbf / iat
    jwt_single_use: bool = False  # refuse a second login with the same jti (until its exp)
    password_logins: bool = True  # false: only tokens (jwt_key) log in; SCRAM is not offered
    # --- WebSocket limits (issue 10: points 8, 9, 11)
    websocket_max_queue_bytes: int = 2097152  # output bytes queued for a slow reader, then cut off
    websocket_max_message_frames: int = 128  # frames per incoming message (control frames inside count)
    websocket_max_message_wire_bytes: int = 0  # wire bytes per incoming message; 0 = 2 x the frame cap
    c2s_negotiation_timeout: float = 30.0  # seconds to get from connect to a bound session; 0 = off
    # --- message archive (XEP-0313 MAM): im/archive*.py, im/mam.py
    archive_enabled: bool = True
    archive_expires_after: str = "1w"  # Prosody's name and default; "never", "30d", "3600" (seconds)
    archive_cleanup_interval: float = 3600.0
    archive_default_policy: str = "always"  # XEP-0441 default for users who set none
    archive_flush_interval: float = 0.05  # seconds a stored message may wait for the batched commit (or 500 queued)
    archive_queue_max: int = 10000  # messages waiting for the commit; more flushes in the sender's greenlet
    mam_default_page: int = 50  # results per query without RSM <max/>
    mam_max_page: int = 250  # a larger <max/> is clamped to this
    # --- the app's API (/api/..., issue 13 item 3) and the offline-message webhook; web/api.py, im/webhook.py
    api_max_body: int = 1048576  # bytes per API request body (more: 413)
    offline_message_webhook_url: str = ""  # POST {to, from, body, stamp} per message stored offline; "" = off
    offline_message_webhook_secret: str = ""  # sent as Authorization: Bearer <secret>; "" = none
    offline_message_webhook_timeout: float = 5.0  # seconds per attempt (connect and read)
    offline_message_webhook_retries: int = 3  # further attempts after a failed one
    offline_message_webhook_backoff: float = 1.0  # seconds before the first retry, doubled each time
    offline_message_webhook_queue: int = 1000  # notifications waiting to be sent; more are dropped (counted)
    # --- cluster (issue 14): several processes sharing Redis and PostgreSQL; boshroster/cluster/
    cluster_redis_url: str = ""  # redis://host:port/db; empty: a single process, as before
    database_url: str = ""  # postgresql://user:pass@host:port/db; empty: SQLite files under data_dir
    node_id: str = ""  # unique per process in a cluster (letters, digits, '-', '_'); empty: the host name
    cluster_internal_url: str = ""  # http://host:port where the other nodes reach this one (BOSH forwarding)
    cluster_heartbeat_interval: float = 2.0  # seconds between this node's heartbeats
    cluster_node_timeout: float = 10.0  # a node silent this long is dead: its sessions are cleaned up
    database_pool_size: int = 10  # PostgreSQL connections per process
    # --- XML input limits (issue 10, point 7a; stanza_size_limit above is checked for every stanza)
    stanza_max_depth: int = 32  # element levels below a stanza; deeper is a policy-violation stream error
    # --- HTTP layer limits (issue 10 points 8 and 16; nginx's names in brackets; transports/http_limits.py)
    http_header_timeout: float = 60.0  # request line + headers [client_header_timeout]
    http_body_timeout: float = 60.0  # the whole request body [client_body_timeout]
    http_keepalive_timeout: float = 75.0  # idle kept-alive connection [keepalive_timeout]
    http_max_header_line: int = 8192  # bytes per header line [large_client_header_buffers 4 8k]
    http_max_header_size: int = 32768  # bytes of all header lines
    http_max_connections_per_address: int = 500  # 0 = no cap
    http_connection_limit_exempt: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    http_external_url: str = ""  # public base URL (Prosody's name) for host-meta; "" = from Host
    # --- BOSH delivery, bounds and input checks (issue 10 points 2-5, 16)
    bosh_max_pending_bytes: int = 8388608  # hard bound: bytes queued for one BOSH client
    bosh_high_water_stanzas: int = 5000  # above this many queued stanzas the session is "congested" ...
    bosh_high_water_bytes: int = 1048576  # ... or above this many bytes: other users' stanzas bounce
    bosh_max_response_bytes: int = 1048576  # stanzas per response up to this size; the rest go in the next one
    bosh_max_stanzas_per_body: int = 10000  # a body with more is refused (policy-violation)
    bosh_max_unauthenticated_per_address: int = 100  # BOSH sessions not yet logged in, per client address; 0 = no cap
    bosh_unauthenticated_limit_loopback: bool = False  # apply that cap to loopback clients too
    # --- BOSH pause (issue 11, XEP-0124 §10)
    bosh_max_pause: int = 120  # 'maxpause' advertised: longest inactivity a client may ask for with 'pause'; 0 = off
    # --- reliability (issue 10 point 16, xmpp/pacing.py): BOSH stanzas over c2s_stanza_rate wait here
    bosh_shaper_queue: int = 1000  # stanzas of one BOSH session waiting for the shaper; more: resource-constraint
    offline_max_total_bytes: int = 1073741824  # all offline messages together (SQLite or PostgreSQL: all nodes); more bounce. 0 = no bound
    # --- WebSocket give-back (issue 10: nothing accepted is lost; transports/ws_output.py)
    websocket_flush_timeout: float = 10.0  # seconds to flush a closing connection's queue; the rest is given back
    # --- XEP-0198 resumption on another node of a cluster (cluster/sm_handover.py)
    cluster_sm_handover_timeout: float = 5.0  # seconds to wait for the owner node to hand a session over
    # --- cluster cost and robustness (issue 14, cluster/node.py): a Redis that stops answering
    cluster_redis_timeout: float = 5.0  # seconds a Redis reply may take before Redis counts as unreachable
    # --- XEP-0198 hand-over, the owner dying in the middle of it (cluster/sm_handover.py): TESTS ONLY
    cluster_sm_handover_test_stall: float = 0.0  # TEST ONLY: seconds the owner waits inside a hand-over (a test kills it meanwhile); 0 = off
    cluster_sm_handover_test_stall_at: str = "answer"  # TEST ONLY: "request" (before claiming the session) or "answer" (handed over, not yet answered)

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
    for name in ("data_dir", "jwt_key"):  # paths relative to the config file's folder
        value = kwargs.get(name, getattr(defaults, name))
        if path and value and not os.path.isabs(value):
            kwargs[name] = os.path.join(os.path.dirname(os.path.abspath(path)), value)
    config = Config(**kwargs)
    if config.auth not in ("internal", "http"):
        raise ConfigError('auth: must be "internal" or "http"')
    if config.auth == "http" and not config.http_auth_url:
        raise ConfigError('auth = "http" needs http_auth_url')
    _check_auth(config)
    if not config.password_logins and not config.jwt_key:
        raise ConfigError("password_logins = false needs jwt_key (nobody could log in)")
    _check_webhook(config)
    if config.resource_conflict not in ("random", "kick_old"):
        raise ConfigError('resource_conflict: must be "random" or "kick_old"')
    from boshroster.im.archive import POLICIES, parse_duration  # pure module, no I/O

    try:
        parse_duration(config.archive_expires_after)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if config.archive_default_policy not in POLICIES:
        raise ConfigError(f"archive_default_policy: must be one of {', '.join(POLICIES)}")
    if config.mam_max_page < 1 or not 1 <= config.mam_default_page <= config.mam_max_page:
        raise ConfigError("mam_default_page and mam_max_page: need 1 <= mam_default_page <= mam_max_page")
    if config.archive_queue_max < 1:
        raise ConfigError("archive_queue_max: must be at least 1")
    if config.bosh_shaper_queue < 1:
        raise ConfigError("bosh_shaper_queue: must be at least 1")
    if config.offline_max_total_bytes < 0:
        raise ConfigError("offline_max_total_bytes: must be >= 0 (0 = no bound)")
    if config.archive_flush_interval < 0:
        raise ConfigError("archive_flush_interval: must not be negative")
    if config.archive_cleanup_interval <= 0:
        raise ConfigError("archive_cleanup_interval: must be positive")
    _check_cluster(config)
    for name in ("http_header_timeout", "http_body_timeout", "http_keepalive_timeout"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name}: must be > 0 seconds")
    if config.http_max_header_line < 256 or config.http_max_header_size < config.http_max_header_line:
        raise ConfigError("http_max_header_line must be >= 256 and http_max_header_size >= http_max_header_line")
    if config.http_max_connections_per_address < 0:
        raise ConfigError("http_max_connections_per_address: must be >= 0 (0 = no cap)")
    _check_external_url(config.http_external_url)
    if config.bosh_max_pause < 0:
        raise ConfigError("bosh_max_pause: must be >= 0 (0 = no pause)")
    for name in ("http_connection_limit_exempt", "trusted_proxies"):  # both exempt from the per-address cap
        for spec in getattr(config, name):
            try:
                ipaddress.ip_network(spec.strip(), strict=False)
            except ValueError:
                raise ConfigError(f"{name}: {spec!r} is not an IP address or network") from None
    if len(config.http_ports) != len(config.http_interfaces) and len(config.http_ports) != 1:
        pass  # every interface gets every port, as Prosody does
    if config.stanza_max_depth < 1:
        raise ConfigError("stanza_max_depth: must be at least 1")
    return config


def _check_cluster(config: Config) -> None:
    """Cluster settings (issue 14): a mistake stops startup naming the key."""
    import re

    if config.cluster_redis_url and not re.match(r"^(redis|rediss|unix)://", config.cluster_redis_url):
        raise ConfigError("cluster_redis_url: expected redis://host:port/db (or rediss://, unix://)")
    if config.database_url and not re.match(r"^postgres(ql)?://", config.database_url):
        raise ConfigError("database_url: expected postgresql://user:pass@host:port/db")
    if config.node_id and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", config.node_id):
        raise ConfigError("node_id: letters, digits, '-' and '_' only (it is part of BOSH sids and Redis keys)")
    if config.cluster_internal_url and not re.match(r"^https?://", config.cluster_internal_url):
        raise ConfigError("cluster_internal_url: expected http://host:port")
    if not 0 < config.cluster_sm_handover_timeout <= 60:
        raise ConfigError("cluster_sm_handover_timeout: seconds, more than 0 and at most 60")
    if not 0 <= config.cluster_sm_handover_test_stall <= 60:
        raise ConfigError("cluster_sm_handover_test_stall: seconds, 0 (off) to 60")
    if config.cluster_sm_handover_test_stall_at not in ("request", "answer"):
        raise ConfigError("cluster_sm_handover_test_stall_at: \"request\" or \"answer\"")
    if config.cluster_heartbeat_interval <= 0 or config.cluster_node_timeout <= 2 * config.cluster_heartbeat_interval:
        raise ConfigError("cluster_node_timeout must be more than twice cluster_heartbeat_interval (> 0)")
    if config.database_pool_size < 1:
        raise ConfigError("database_pool_size: at least 1")
    if config.cluster_redis_timeout < 0.5:
        raise ConfigError("cluster_redis_timeout: at least 0.5 (seconds)")


def _check_auth(config: Config) -> None:
    """Throttle networks and the JWT key are checked here so a mistake stops startup with a clear message."""
    import ipaddress

    for spec in config.auth_throttle_exempt:
        try:
            ipaddress.ip_network(spec, strict=False)
        except ValueError:
            raise ConfigError(f"auth_throttle_exempt: {spec!r} is not an IP address or network") from None
    if not all(isinstance(a, str) for a in config.jwt_algorithms):
        raise ConfigError("jwt_algorithms: expected a list of str")
    if not config.jwt_key:
        if config.jwt_algorithms or config.jwt_single_use:
            raise ConfigError("jwt_algorithms / jwt_single_use need jwt_key")
        return
    if not config.jwt_jid_field:
        raise ConfigError("jwt_jid_field must not be empty")
    from boshroster.auth.tokens import KeyFileError, load_keys

    try:
        load_keys(config.jwt_key, config.jwt_algorithms)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from None


def _check_webhook(config: Config) -> None:
    """The offline-message webhook's settings (im/webhook.py): a bad URL stops startup, not the first message."""
    url = config.offline_message_webhook_url
    if url and not (url.startswith("http://") or url.startswith("https://")):
        raise ConfigError("offline_message_webhook_url: must be an http:// or https:// URL")
    if config.offline_message_webhook_secret and not url:
        raise ConfigError("offline_message_webhook_secret needs offline_message_webhook_url")
    if config.offline_message_webhook_timeout <= 0:
        raise ConfigError("offline_message_webhook_timeout: must be > 0")
    if config.offline_message_webhook_retries < 0 or config.offline_message_webhook_backoff < 0:
        raise ConfigError("offline_message_webhook_retries / _backoff: must be >= 0")
    if config.offline_message_webhook_queue < 1 or config.api_max_body < 1:
        raise ConfigError("offline_message_webhook_queue / api_max_body: must be >= 1")


def _check_external_url(value: str) -> None:
    """``http_external_url``: "" or an absolute http(s) URL without query or fragment (the
    app drops a trailing slash)."""
    from urllib.parse import urlsplit

    if not value:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"http_external_url: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or any(c in value for c in "<>\"' \\"):
        raise ConfigError(f"http_external_url: expected http(s)://host[:port][/path], got {value!r}")

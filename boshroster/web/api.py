"""The app's API (issue 13 item 3): what the web application asks of the chat server, JSON in and out.

==========================================  ==============================================
``GET    /api/users/<user>/sessions``        the user's bound resources: JID, transport,
                                             since when, presence
``DELETE /api/users/<user>/sessions``        end them with a stream error (RFC 6120 §4.9.3:
                                             ``policy-violation`` or ``conflict``, a text);
                                             ``revoke_tokens``: refuse the user's tokens
                                             issued before now (needs ``jwt_key``)
``POST   /api/messages``                     ``{"from"?, "to", "body", "type"?}``: a message
                                             from the domain (or a JID of it) to a user,
                                             delivered or stored offline like any other
==========================================  ==============================================

Protected exactly like the refresh endpoint (``check_access``: the caller's
address behind ``trusted_proxies`` must be in ``refresh_allowed_networks``,
else 403; ``refresh_secret`` as ``Authorization: Bearer``, else 401).
Request bodies must be ``application/json`` (415 otherwise: a browser cannot
send that cross-site without a CORS preflight, which this API never
grants), at most ``api_max_body`` bytes (413), a JSON object without unknown
fields (400).  Every error is ``{"status": "error", "message": ...}`` with
the HTTP status, and one log line.  See the README, "The app's API".

Greenlet safety: the handlers read the session registry (never yield between
reading and acting on it, except ``user_exists`` which may ask the app, and
is asked first); ``_in_flight``/``_stored`` (ids of the API's own stanzas
being delivered, and those of them that went to offline storage) are
mutated by the request greenlet that owns the stanza and by the
``message-stored`` hook, which runs inside that greenlet's ``deliver`` call.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from datetime import datetime, timezone

import bottle

from boshroster.roster.model import json_type_name as _kind
from boshroster.transports.http_limits import ClientGone
from boshroster.transports.request_body import read_body
from boshroster.web.access import request_denied
from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StanzaError
from boshroster.xmpp.jid import JID, JIDError, prep_localpart
from boshroster.xmpp.router import StanzaEvent
from boshroster.xmpp.tags import BODY, MESSAGE, q
from boshroster.xmpp.xmlio import E, NS_CLIENT

log = logging.getLogger("boshroster.api")

SHOW = q(NS_CLIENT, "show")
STATUS = q(NS_CLIENT, "status")
MESSAGE_FIELDS = {"from", "to", "body", "type"}
END_FIELDS = {"condition", "text", "revoke_tokens"}
MESSAGE_TYPES = ("chat", "normal", "headline")
END_CONDITIONS = ("policy-violation", "conflict")
MAX_TEXT = 1024  # characters of a stream error's text
DEFAULT_END_TEXT = "your session was ended by the service"
# XML 1.0 §2.2 Char: anything else (controls, lone surrogates, U+FFFE/FFFF) cannot be in a stanza.
_NOT_XML_CHAR = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class ApiError(Exception):
    """An answer other than 200: ``status`` and a message for the caller (and the log)."""

    def __init__(self, status: int, message: str, outcome: str = "bad-request", **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome
        self.extra = extra


def iso_utc(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class AppApi:
    """The /api/ routes of one server; ``register(bottle_app)`` before any catch-all route."""

    def __init__(self, core):
        self.core = core
        self.config = core.config
        self.domain = core.config.domain
        self._in_flight: set[int] = set()
        self._stored: set[int] = set()
        core.bus.hook("message-stored", self._on_stored)

    def register(self, app: bottle.Bottle) -> None:
        sessions = "/api/users/<user>/sessions"
        app.route(sessions, "GET", self._handler(self.list_sessions))
        app.route(sessions, "DELETE", self._handler(self.end_sessions))
        app.route(sessions, ["POST", "PUT", "PATCH"], self._handler(self._not_allowed("GET, DELETE")))
        app.route("/api/messages", "POST", self._handler(self.post_message))
        app.route("/api/messages", ["GET", "PUT", "DELETE", "PATCH"], self._handler(self._not_allowed("POST")))
        app.route("/api/<path:path>", ["GET", "POST", "PUT", "DELETE", "PATCH"], self._handler(self._unknown))

    # -- plumbing ------------------------------------------------------------------

    def _handler(self, fn):
        def handle(**params):
            req = bottle.request
            bottle.response.set_header("Cache-Control", "no-store")
            try:
                self._check_access(req)
                status, payload = fn(**params)
            except ApiError as err:
                self.core.metrics.api_requests.labels(err.outcome).inc()
                level = logging.INFO if err.status == 404 else logging.WARNING
                log.log(level, "API %s %s from %s: %d %s", req.method, req.path[:200],
                        req.environ.get("REMOTE_ADDR"), err.status, err.message)
                if err.status == 401:
                    bottle.response.set_header("WWW-Authenticate", 'Bearer realm="boshroster"')
                if err.status == 413:
                    bottle.response.set_header("Connection", "close")  # the rest of the body is not read
                return self._json(err.status, {"status": "error", "message": err.message, **err.extra})
            self.core.metrics.api_requests.labels("ok").inc()
            return self._json(status, payload)
        return handle

    @staticmethod
    def _json(status: int, payload: dict) -> str:
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        return json.dumps(payload, ensure_ascii=False)

    def _check_access(self, req) -> None:
        denied = request_denied(req.environ, self.config, action="API")
        if denied is not None:
            raise ApiError(denied[0], denied[1], outcome="refused")

    def _not_allowed(self, allow: str):
        def answer(**_params):
            bottle.response.set_header("Allow", allow)
            raise ApiError(405, f"{bottle.request.method} is not allowed here (allowed: {allow})")
        return answer

    def _unknown(self, path):
        raise ApiError(404, f"no such API endpoint: /api/{path}"[:300], outcome="not-found")

    def _username(self, user: str) -> str:
        try:
            return prep_localpart(user)
        except JIDError as err:
            raise ApiError(400, f"{user[:100]!r} is not a valid username ({err})") from None

    def _existing(self, user: str) -> str:
        user = self._username(user)
        if not self.core.user_exists(user):
            raise ApiError(404, f"no such user: {user}", outcome="not-found")
        return user

    def _read_json(self, required: bool) -> dict:
        """The request body as a JSON object ({} when there is none and none is required)."""
        env = bottle.request.environ
        data = self._read_body(env)
        if not data.strip():
            if required:
                raise ApiError(400, "a JSON object is required as the request body")
            return {}
        ctype = env.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, not {ctype[:60] or 'missing'!r}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not valid UTF-8") from None
        try:
            value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except ApiError:
            raise
        except (ValueError, RecursionError) as err:
            raise ApiError(400, f"malformed JSON: {str(err)[:200]}") from None
        if not isinstance(value, dict):
            raise ApiError(400, f"the body must be a JSON object, got {_kind(value)}")
        return value

    def _read_body(self, env) -> bytes:
        limit = self.config.api_max_body
        try:
            data = read_body(env, limit)
        except ClientGone as err:
            raise ApiError(400, f"request body incomplete ({str(err)[:100]})") from None
        if data is None:
            raise ApiError(413, f"body larger than api_max_body ({limit} bytes)")
        return data

    # -- GET /api/users/<user>/sessions -------------------------------------------------

    def list_sessions(self, user):
        user = self._existing(user)
        wall, mono = time.time(), time.monotonic()
        sessions = [{
            "resource": s.jid.resource,
            "jid": s.jid_str,
            "transport": s.transport.kind,
            "since": iso_utc(wall - (mono - s.started)),  # ClientSession.started is time.monotonic()
            "presence": _presence(s),
        } for s in self.core.sessions.sessions_of(user)]
        sessions.sort(key=lambda s: (s["since"], s["resource"]))
        return 200, {"user": user, "jid": f"{user}@{self.domain}", "online": bool(sessions), "sessions": sessions}

    # -- DELETE /api/users/<user>/sessions ------------------------------------------------

    def end_sessions(self, user):
        user = self._username(user)
        options = self._end_options()
        revoke = options.get("revoke_tokens", False)
        if revoke and self.core.tokens is None:
            raise ApiError(400, "revoke_tokens needs token login: jwt_key is not set on this server")
        user = self._existing(user)
        cutoff = self.core.tokens.revoke_tokens(user) if revoke else None  # first: no old token gets back in
        condition = options.get("condition", "policy-violation")
        text = options.get("text", DEFAULT_END_TEXT)
        ended = list(self.core.sessions.sessions_of(user))
        for session in ended:
            session.fail(condition, text)
        log.info("API: ended %d session(s) of %s (%s)%s", len(ended), user, condition,
                 ", tokens revoked" if revoke else "")
        return 200, {"status": "ok", "user": user, "ended": [s.jid_str for s in ended], "condition": condition,
                     "tokens_revoked_before": iso_utc(cutoff) if cutoff is not None else None}

    def _end_options(self) -> dict:
        """The DELETE options from the JSON body and/or the query string (the body wins)."""
        options: dict = {}
        query = bottle.request.query.decode()
        for key in query:
            if key not in END_FIELDS:
                raise ApiError(400, f"unknown query parameter {key[:60]!r} (known: {', '.join(sorted(END_FIELDS))})")
            value = query.get(key)
            if key == "revoke_tokens":
                value = value.strip().lower()
                if value not in _TRUE + _FALSE:
                    raise ApiError(400, f"revoke_tokens must be true or false, not {value[:20]!r}")
                value = value in _TRUE
            options[key] = value
        body = self._read_json(required=False)
        _no_unknown(body, END_FIELDS)
        options.update(body)
        if not isinstance(options.get("revoke_tokens", False), bool):
            raise ApiError(400, "revoke_tokens must be true or false")
        condition = options.get("condition", "policy-violation")
        if condition not in END_CONDITIONS:
            raise ApiError(400, f"condition must be one of {', '.join(END_CONDITIONS)}")
        text = options.get("text", DEFAULT_END_TEXT)
        if not isinstance(text, str) or len(text) > MAX_TEXT or _NOT_XML_CHAR.search(text):
            raise ApiError(400, f"text must be a string of at most {MAX_TEXT} XML characters")
        return options

    # -- POST /api/messages ---------------------------------------------------------------

    def post_message(self):
        data = self._read_json(required=True)
        _no_unknown(data, MESSAGE_FIELDS)
        to = self._recipient(data.get("to"))
        sender = self._sender(data.get("from", self.domain))
        mtype = data.get("type", "chat")
        if mtype not in MESSAGE_TYPES:
            raise ApiError(400, f"type must be one of {', '.join(MESSAGE_TYPES)}")
        body = data.get("body")
        if not isinstance(body, str) or not body:
            raise ApiError(400, "body must be a non-empty string")
        bad = _NOT_XML_CHAR.search(body)
        if bad:
            raise ApiError(400, f"body contains U+{ord(bad.group()):04X}, which XML cannot carry")
        msg_id = "api-" + secrets.token_urlsafe(9)
        stanza = E(MESSAGE, {"from": str(sender), "to": str(to), "type": mtype, "id": msg_id}, E(BODY, text=body))
        size = len(xmlio.tostring(stanza).encode("utf-8"))
        if size > self.config.stanza_size_limit:
            raise ApiError(413, f"the message would be {size} bytes, over stanza_size_limit "
                                f"({self.config.stanza_size_limit})")
        self._existing(to.local)
        key = id(stanza)
        self._in_flight.add(key)
        try:
            delivered = self._deliver(stanza, to)
            stored = key in self._stored
        finally:
            self._in_flight.discard(key)
            self._stored.discard(key)
        status = "stored" if stored else "delivered" if delivered else "dropped"
        log.info("API: message %s from %s to %s (%s): %s", msg_id, sender, to, mtype, status)
        return 200, {"status": status, "id": msg_id, "from": str(sender), "to": str(to)}

    def _deliver(self, stanza, to: JID) -> bool:
        """Hand the stanza to the message module (im/messages.py): True if some resource can get it."""
        available = [s for s in self.core.sessions.sessions_of(to.local)
                     if (to.resource is not None and s.jid.resource == to.resource)
                     or (s.presence is not None and s.priority >= 0)]
        try:
            # The event a client's message would have (origin None: no session sent it), so
            # the archive keeps API messages like any other (message-accepted, mam.py).
            self.core.messages.deliver(stanza, to, StanzaEvent(None, stanza, to))
        except StanzaError as err:
            if err.text == "no such user":
                raise ApiError(404, f"no such user: {to.local}", outcome="not-found") from None
            status = 503 if err.condition in ("resource-constraint", "service-unavailable") else 400
            raise ApiError(status, f"not delivered: {err.condition}" + (f" ({err.text})" if err.text else ""),
                           condition=err.condition) from None
        return bool(available)

    def _on_stored(self, event) -> None:
        """``message-stored``: note that one of our own stanzas went to offline storage."""
        key = id(event.stanza)
        if key in self._in_flight:
            self._stored.add(key)
        return None

    def _recipient(self, value) -> JID:
        if not isinstance(value, str) or not value:
            raise ApiError(400, "to must be a user's JID (user@domain, or user@domain/resource) or username")
        text = value if ("@" in value or "/" in value) else f"{value}@{self.domain}"
        try:
            jid = JID.parse(text)
        except JIDError as err:
            raise ApiError(400, f"to: {value[:100]!r} is not a valid JID ({err})") from None
        if jid.domain != self.domain or jid.local is None:
            raise ApiError(400, f"to: {value[:100]!r} is not a user of {self.domain}")
        return jid

    def _sender(self, value) -> JID:
        if not isinstance(value, str) or not value:
            raise ApiError(400, f"from must be a JID of {self.domain} (default: {self.domain} itself)")
        try:
            jid = JID.parse(value)
        except JIDError as err:
            raise ApiError(400, f"from: {value[:100]!r} is not a valid JID ({err})") from None
        if jid.domain != self.domain:
            raise ApiError(400, f"from: {value[:100]!r} is not a JID of {self.domain}")
        return jid


def _presence(session) -> dict:
    """RFC 6121 §4.7: the resource's last broadcast presence (show absent = plain available)."""
    presence = session.presence
    if presence is None:
        return {"available": False}
    return {"available": True, "show": presence.findtext(SHOW), "status": presence.findtext(STATUS),
            "priority": session.priority}


def _no_unknown(data: dict, known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(k[:60] for k in unknown[:10])} "
                            f"(known: {', '.join(sorted(known))})")


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ApiError(400, f"malformed JSON: the key {key[:60]!r} appears twice")
        seen[key] = value
    return seen


def _no_constant(name):
    raise ApiError(400, f"malformed JSON: {name} is not JSON")

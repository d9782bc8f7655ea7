#!/usr/bin/env python3
"""The demo web application whose contact lists boshroster serves as rosters.

It plays the part of the web app in Prosody's mod_http_roster_admin contract:

* boshroster GETs ``http_roster_url`` (here ``http://HOST:PORT/contacts/%s``) and
  gets a JSON object keyed by contact JID::

      {"bob@localhost": {"name": "Bob Builder", "groups": ["Friends"]}, ...}

  An unknown user gets ``{}``.
* after every change the app POSTs a JSON array of the affected usernames to
  boshroster's ``/roster_admin/refresh`` (``Authorization: Bearer <secret>`` when a
  secret is set), so online users get roster pushes.

The contacts live in one JSON file (``{"alice": {<contact object>}, ...}``) that is
rewritten atomically on each change. ``GET /`` is a small admin page; the JSON API
behind it is:

=========================================  ==========================================
``GET    /api/contacts``                   every user's contact object
``PUT    /api/contacts/<user>``            replace the whole contact object
``POST   /api/contacts/<user>/<jid>``      add/update one: ``{"name", "groups", "mutual"}``
``DELETE /api/contacts/<user>/<jid>``      remove one (``?mutual=1`` or ``{"mutual": true}``)
=========================================  ==========================================

Each change answers ``{"status": "saved", "affected": [...], "refresh": {...}}``,
where ``refresh`` carries boshroster's reply or the error (the change is saved
either way). ``mutual`` also adds/removes the reverse entry for contacts on the
demo domain, so both sides stay symmetric; without it only ``<user>`` changes.

Try it::

    python scripts/demo_backend.py --host 127.0.0.1 --port 8008 \\
        --contacts conf/demo-contacts.json \\
        --refresh-url http://127.0.0.1:5280/roster_admin/refresh
    curl -s http://127.0.0.1:8008/contacts/alice

Single sign-on (issue 13): the app has its own users (``--users``, ``name:password``
lines, conf/demo-users.txt) and its own login (``/login``, a session cookie). A signed-in
user opens the chat at ``/chat/``: the app serves boshroster's demo page
(static/index.html) itself, so that Converse's ``credentials_url`` (``/chat/credentials``)
is on the app's origin and gets the app's cookie; it answers ``{"jid", "password"}`` with
a freshly minted HS256 JWT (``--jwt-key``, the file boshroster's ``jwt_key`` names,
``--token-lifetime`` seconds, 5 minutes by default). The page then talks to boshroster
(``--chat-server``) cross-origin: WebSocket needs no CORS, BOSH gets boshroster's CORS
headers. The token never leaves the app's origin except to boshroster.

=========================================  ==========================================
``GET  /login``, ``POST /login``           the app's login form (303 to ``next``)
``POST /logout``                           end the app's session
``GET  /chat/``                            the chat page (303 to /login if signed out)
``GET  /chat/credentials``                 ``{"jid", "password": <JWT>}``, 401 if signed out
=========================================  ==========================================

The contacts admin page and its API have no login: this is a demo, bind it to
loopback. Run as a script it serves with gevent's WSGIServer (one greenlet per
request), which matters because boshroster calls ``/contacts/<user>`` back while this
app is still waiting for the refresh reply; without gevent it falls back to a
threaded wsgiref server.
"""

if __name__ == "__main__":
    # Patch before bottle/requests are imported (bottle's request object is
    # thread-local, requests must yield). Importing this module does not patch.
    try:
        from gevent import monkey

        monkey.patch_all()
    except ImportError:  # pragma: no cover - gevent is a project dependency
        pass

import argparse
import copy
import hmac
import html
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import urllib.parse

import bottle
import requests

log = logging.getLogger("demo_backend")

DEFAULT_CONTACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "demo-contacts.json")
DEFAULT_REFRESH_URL = "http://127.0.0.1:5280/roster_admin/refresh"
DEFAULT_USERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "demo-users.txt")
DEFAULT_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "static")
DEFAULT_CHAT_SERVER = "http://127.0.0.1:5280"
MAX_BODY = 1024 * 1024

# Deliberately loose: boshroster does the real RFC 7622 preparation. These only
# keep obvious garbage (spaces, slashes, '@' in usernames) out of the file.
_USER_RE = re.compile(r"^[^\s@/\"&'<>:]{1,1023}$")
_JID_RE = re.compile(r"^[^\s@/\"&'<>:]{1,1023}@[^\s@/]{1,1023}$")


class BadRequest(ValueError):
    """The request body or URL is not acceptable; the message goes to the client."""


def normalise_user(user):
    user = (user or "").strip().lower()
    if not _USER_RE.match(user):
        raise BadRequest("invalid username %r" % user)
    return user


def normalise_jid(jid):
    jid = (jid or "").strip().lower()
    if not _JID_RE.match(jid):
        raise BadRequest("invalid contact JID %r (expected user@domain, no resource)" % jid)
    return jid


def normalise_groups(groups):
    """Return groups as a list of strings; accept a list, a string or {name: true}."""
    if groups is None:
        return []
    if isinstance(groups, str):
        groups = [g for g in groups.split(",")]
    elif isinstance(groups, dict):  # the Lua module's native form: {"Friends": true}
        groups = [g for g, on in groups.items() if on]
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise BadRequest("groups must be a list of strings")
    out = []
    for g in (g.strip() for g in groups):
        if g and g not in out:
            out.append(g)
    return out


def normalise_item(item):
    if item is None:
        item = {}
    if not isinstance(item, dict):
        raise BadRequest("a contact must be a JSON object like {\"name\": ..., \"groups\": [...]}")
    name = item.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest("name must be a string")
    out = {}
    if name and name.strip():
        out["name"] = name.strip()
    out["groups"] = normalise_groups(item.get("groups"))
    return out


def normalise_contacts(contacts):
    if not isinstance(contacts, dict):
        raise BadRequest("the contact list must be a JSON object keyed by contact JID")
    return {normalise_jid(jid): normalise_item(item) for jid, item in contacts.items()}


class ContactStore:
    """All users' contacts, kept in memory and saved to one JSON file atomically."""

    def __init__(self, path, domain="localhost"):
        self.path = os.path.abspath(path)
        self.domain = domain.lower()
        self.lock = threading.RLock()
        self.data = self._load()

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            log.warning("%s does not exist yet; starting with no contacts", self.path)
            return {}
        if not isinstance(raw, dict):
            raise SystemExit("%s: expected a JSON object {user: {jid: {...}}}" % self.path)
        return {normalise_user(u): normalise_contacts(c or {}) for u, c in raw.items()}

    def save(self):
        """Write to a temp file in the same directory, fsync, then rename over the old file."""
        directory = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(self.path), suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.chmod(tmp, os.stat(self.path).st_mode & 0o777)
            except FileNotFoundError:
                os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    # -- reading --------------------------------------------------------------

    def all(self):
        with self.lock:
            return copy.deepcopy(self.data)

    def contacts_of(self, user):
        with self.lock:
            return copy.deepcopy(self.data.get(user, {}))

    # -- helpers for mutual changes ---------------------------------------------

    def local_user(self, jid):
        """'bob@localhost' -> 'bob' when the JID is on the demo domain, else None."""
        local, _, domain = jid.partition("@")
        return local if domain == self.domain else None

    def display_name(self, user):
        """How others call `user`: an existing name for user@domain, else 'User'."""
        jid = "%s@%s" % (user, self.domain)
        for contacts in self.data.values():
            name = contacts.get(jid, {}).get("name")
            if name:
                return name
        return user.capitalize()

    # -- changes; each returns the affected usernames (saved already) ------------

    def put(self, user, contacts, mutual=False):
        with self.lock:
            old = self.data.get(user, {})
            affected = [user]
            if mutual:
                me = "%s@%s" % (user, self.domain)
                for jid in sorted(set(old) ^ set(contacts)):  # added or removed, not kept
                    other = self.local_user(jid)
                    if other is None or other == user:
                        continue
                    if jid in contacts:
                        self._set(other, me, {"name": self.display_name(user), "groups": contacts[jid]["groups"]},
                                  keep_existing=True)
                    else:
                        self.data.get(other, {}).pop(me, None)
                    affected.append(other)
            self.data[user] = contacts
            self.save()
            return _dedupe(affected)

    def add(self, user, jid, item, mutual=False):
        with self.lock:
            self._set(user, jid, item)
            affected = [user]
            other = self.local_user(jid)
            if mutual and other and other != user:
                me = "%s@%s" % (user, self.domain)
                self._set(other, me, {"name": self.display_name(user), "groups": item["groups"]},
                          keep_existing=True)
                affected.append(other)
            self.save()
            return affected

    def remove(self, user, jid, mutual=False):
        """Remove jid from user's contacts; KeyError if it was not there."""
        with self.lock:
            contacts = self.data.get(user, {})
            if jid not in contacts:
                raise KeyError(jid)
            del contacts[jid]
            affected = [user]
            other = self.local_user(jid)
            if mutual and other and other != user:
                self.data.get(other, {}).pop("%s@%s" % (user, self.domain), None)
                affected.append(other)
            self.save()
            return affected

    def _set(self, user, jid, item, keep_existing=False):
        contacts = self.data.setdefault(user, {})
        if keep_existing and jid in contacts:
            # The reverse side of a mutual add keeps its own name and groups.
            return
        contacts[jid] = item


def _dedupe(items):
    seen = []
    for i in items:
        if i not in seen:
            seen.append(i)
    return seen


class Refresher:
    """POSTs affected usernames to boshroster's refresh endpoint and reports what happened."""

    def __init__(self, url, secret=None, timeout=5.0, connect_timeout=2.0):
        self.url = url or None
        self.secret = secret or None
        self.timeout = (connect_timeout, timeout)
        self.http = requests.Session()
        self.http.trust_env = False  # the refresh URL is internal: no proxies from the environment

    def __call__(self, usernames):
        if not self.url:
            return {"ok": False, "skipped": True, "error": "no refresh URL configured; nothing was pushed"}
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers["Authorization"] = "Bearer " + self.secret
        try:
            r = self.http.post(self.url, data=json.dumps(usernames), headers=headers, timeout=self.timeout)
        except requests.exceptions.ConnectTimeout:
            return self._failed("timed out connecting to %s after %gs." % (self.url, self.timeout[0]))
        except requests.exceptions.ReadTimeout:
            return self._failed("%s did not answer within %gs." % (self.url, self.timeout[1]))
        except requests.exceptions.ConnectionError as e:
            return self._failed("could not connect to %s (%s). Is boshroster running?" % (self.url, _reason(e)))
        except requests.exceptions.RequestException as e:
            return self._failed("refresh request to %s failed: %s." % (self.url, e))
        try:
            body = r.json()
        except ValueError:
            body = r.text[:2000]
        result = {"ok": 200 <= r.status_code < 300, "http_status": r.status_code, "response": body}
        if not result["ok"]:
            result["error"] = "%s answered HTTP %d" % (self.url, r.status_code)
            if r.status_code in (401, 403):
                result["error"] += " (check --refresh-secret / BOSHROSTER_REFRESH_SECRET)"
            log.warning("refresh of %s: %s", usernames, result["error"])
        else:
            log.info("refresh of %s: %s", usernames, body)
        return result

    def _failed(self, message):
        log.warning("refresh failed: %s", message)
        return {"ok": False, "error": message + " The change was saved; users will see it at their next login."}


def _reason(exc):
    """The innermost OS-level cause of a requests ConnectionError, e.g. 'Connection refused'."""
    e, seen = exc, 0
    while e is not None and seen < 12:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        e = getattr(e, "reason", None) or e.__cause__ or e.__context__
        seen += 1
    return str(exc)


# -- single sign-on: the app's own login, and tokens for the chat ---------------------------


class DemoUsers:
    """The app's own accounts: ``name:password`` lines (conf/demo-users.txt). A demo: a real
    app keeps password hashes; the comparison is in constant time all the same."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.passwords = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    name, sep, password = line.rstrip("\n").partition(":")
                    if sep and name.strip():
                        self.passwords[normalise_user(name)] = password
        except FileNotFoundError:
            log.warning("%s does not exist: nobody can sign in to the demo app", self.path)

    def check(self, user, password):
        expected = self.passwords.get(user)
        ok = hmac.compare_digest((expected or "\0").encode("utf-8"), (password or "").encode("utf-8"))
        return expected is not None and ok


class LoginSessions:
    """Signed-in browsers: a random id in an HttpOnly cookie -> (user, expiry), in memory,
    bounded (the oldest goes first)."""

    COOKIE = "demo_session"

    def __init__(self, lifetime=12 * 3600, max_sessions=10000):
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self.lock = threading.Lock()
        self.sessions = {}

    def create(self, user):
        sid = secrets.token_urlsafe(32)
        with self.lock:
            while len(self.sessions) >= self.max_sessions:
                self.sessions.pop(next(iter(self.sessions)))
            self.sessions[sid] = (user, time.time() + self.lifetime)
        return sid

    def user(self, sid):
        if not sid:
            return None
        with self.lock:
            entry = self.sessions.get(sid)
            if entry is None:
                return None
            if entry[1] < time.time():
                del self.sessions[sid]
                return None
            return entry[0]

    def drop(self, sid):
        with self.lock:
            self.sessions.pop(sid or "", None)


class TokenMinter:
    """Mints the chat's login tokens: HS256 JWTs in ejabberd's format ({"jid", "iat", "exp"},
    plus a random "jti"), signed with the secret file boshroster's ``jwt_key`` names."""

    def __init__(self, key_path, domain, lifetime=300):
        import jwt  # PyJWT: only needed when single sign-on is on

        self._jwt = jwt
        with open(key_path, "rb") as f:
            self.secret = f.read().removesuffix(b"\n")  # exactly as boshroster reads it
        if len(self.secret) < 32:
            raise SystemExit("%s: an HS256 secret needs at least 32 bytes" % key_path)
        self.domain = domain
        self.lifetime = lifetime

    def mint(self, user):
        jid = "%s@%s" % (user, self.domain)
        now = int(time.time())
        claims = {"jid": jid, "iat": now, "exp": now + self.lifetime, "jti": secrets.token_urlsafe(12)}
        return jid, self._jwt.encode(claims, self.secret, algorithm="HS256")


class SingleSignOn:
    """The /login, /logout and /chat/ routes (see the module docstring)."""

    def __init__(self, users, sessions, minter, static_dir, chat_server):
        self.users = users
        self.sessions = sessions
        self.minter = minter  # None: no --jwt-key, /chat/credentials answers 503
        self.static_dir = os.path.abspath(static_dir)
        self.chat_server = chat_server

    def current_user(self):
        return self.sessions.user(bottle.request.get_cookie(LoginSessions.COOKIE))

    def install(self, app):
        app.route("/login", "GET", self.login_page)
        app.route("/login", "POST", self.login)
        app.route("/logout", "POST", self.logout)
        app.route("/chat/credentials", "GET", self.credentials)
        app.route("/chat", "GET", lambda: bottle.redirect("/chat/", 301))
        app.route("/chat/", "GET", self.chat_page)
        app.route("/chat/<path:path>", "GET", self.chat_file)

    @staticmethod
    def _safe_next(target):
        """Only a path on this site: no "//host", no scheme (an open redirect otherwise)."""
        if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
            return "/chat/"
        return target

    def login_page(self, error=None, status=200, nxt=None):
        user = self.current_user()
        nxt = self._safe_next(nxt or bottle.request.query.getunicode("next"))
        body = LOGIN_PAGE.replace("@NEXT@", html.escape(nxt, quote=True))
        if user:
            state = ('<p>Signed in as <b>%s</b>. <a href="/chat/">Open the chat</a> (no second password).</p>'
                     '<form method="post" action="/logout"><button>Sign out</button></form>' % html.escape(user))
        else:
            state = "<p>Not signed in.</p>"
        body = body.replace("@STATE@", state).replace("@ERROR@", '<p class="error">%s</p>' % html.escape(error)
                                                      if error else "")
        return bottle.HTTPResponse(status=status, body=body, headers={
            "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})

    def _same_origin(self):
        """A form POST from another site would sign the browser in as the attacker (login CSRF)."""
        origin = bottle.request.headers.get("Origin")
        if not origin or origin == "null":
            return origin is None
        return urllib.parse.urlsplit(origin).netloc == bottle.request.headers.get("Host")

    def login(self):
        if not self._same_origin():
            return json_response({"status": "error", "error": "cross-site login refused"}, 403)
        form = bottle.request.forms
        try:
            user = normalise_user(form.getunicode("username") or "")
        except BadRequest:
            user = None
        if user is None or not self.users.check(user, form.getunicode("password") or ""):
            log.info("demo app: failed sign-in for %r", (form.getunicode("username") or "")[:64])
            return self.login_page("Wrong username or password.", 401, form.getunicode("next"))
        sid = self.sessions.create(user)
        log.info("demo app: %s signed in", user)
        response = bottle.HTTPResponse(status=303, headers={
            "Location": self._safe_next(form.getunicode("next")), "Cache-Control": "no-store"})
        response.set_cookie(LoginSessions.COOKIE, sid, path="/", httponly=True, samesite="lax")
        return response

    def logout(self):
        if not self._same_origin():
            return json_response({"status": "error", "error": "cross-site logout refused"}, 403)
        self.sessions.drop(bottle.request.get_cookie(LoginSessions.COOKIE))
        response = bottle.HTTPResponse(status=303, headers={"Location": "/login"})
        response.delete_cookie(LoginSessions.COOKIE, path="/")
        return response

    def credentials(self):
        """Converse's credentials_url: fetched at every (re)connection, so a short token is fine."""
        user = self.current_user()
        if user is None:
            return json_response({"status": "error", "error": "not signed in to the demo app"}, 401)
        if self.minter is None:
            return json_response({"status": "error", "error": "token login is not configured (--jwt-key)"}, 503)
        jid, token = self.minter.mint(user)
        log.info("demo app: minted a %ds chat token for %s", self.minter.lifetime, jid)
        return json_response({"jid": jid, "password": token})

    def chat_page(self):
        if self.current_user() is None:
            here = bottle.request.fullpath + ("?" + bottle.request.query_string if bottle.request.query_string else "")
            return bottle.redirect("/login?next=" + urllib.parse.quote(here, safe=""), 303)
        query = bottle.request.query
        if not query.get("credentials_url") or not query.get("server"):
            params = dict(query.decode())
            params.setdefault("server", self.chat_server)
            params["credentials_url"] = "credentials"  # relative: /chat/credentials, this origin
            return bottle.redirect("/chat/?" + urllib.parse.urlencode(params), 303)
        response = bottle.static_file("index.html", root=self.static_dir)
        response.set_header("Cache-Control", "no-store")
        return response

    def chat_file(self, path):
        return bottle.static_file(path, root=self.static_dir)


LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Demo web app - sign in</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 40em; color: #222; }
  form.login { display: flex; flex-direction: column; gap: .5em; max-width: 18em; }
  label { display: flex; flex-direction: column; font-size: .9em; }
  .error { color: #b00; }
</style>
</head>
<body>
<h1>Demo web app</h1>
@STATE@
@ERROR@
<h2>Sign in</h2>
<p>The demo app's own accounts: alice, bob, carol, dave (password <code>password</code>).
Once signed in, <a href="/chat/">the chat</a> logs you in with a short-lived token the app
mints: no second password.</p>
<form class="login" method="post" action="/login">
  <input type="hidden" name="next" value="@NEXT@">
  <label>Username <input type="text" id="username" name="username" autocomplete="username" required></label>
  <label>Password <input type="password" id="password" name="password" autocomplete="current-password" required></label>
  <button type="submit" id="sign-in">Sign in</button>
</form>
<p><a href="/">Contacts admin</a></p>
</body>
</html>
"""


# -- the web app -------------------------------------------------------------------


def json_response(obj, status=200):
    return bottle.HTTPResponse(
        status=status,
        body=json.dumps(obj, ensure_ascii=False, indent=1) + "\n",
        headers={"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"},
    )


def make_app(store, refresh, sso=None):
    """Build the Bottle app around a ContactStore and a refresh callable(usernames) -> dict
    (and, with ``sso`` (a SingleSignOn), the login and the chat page)."""
    app = bottle.Bottle()
    if sso is not None:
        sso.install(app)

    def body_json(required=True):
        if (bottle.request.content_length or 0) > MAX_BODY:
            raise BadRequest("request body too large")
        raw = bottle.request.body.read(MAX_BODY + 1)
        if not raw.strip():
            if required:
                raise BadRequest("a JSON body is required")
            return {}
        ctype = bottle.request.content_type.split(";")[0].strip().lower()
        if ctype != "application/json":
            # Also keeps plain cross-site form posts out: they cannot send this type without a preflight.
            raise BadRequest("Content-Type must be application/json")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise BadRequest("invalid JSON: %s" % e)

    def want_mutual(body):
        q = bottle.request.query.get("mutual", "")
        if q.lower() in ("1", "true", "yes", "on"):
            return True
        return isinstance(body, dict) and body.get("mutual") is True

    def changed(user, affected):
        result = refresh(affected)
        return json_response({
            "status": "saved",
            "user": user,
            "contacts": store.contacts_of(user),
            "affected": affected,
            "refresh": result,
        })

    def api(fn):
        def wrapper(*a, **kw):
            try:
                return fn(*a, **kw)
            except BadRequest as e:
                return json_response({"status": "error", "error": str(e)}, 400)
        wrapper.__name__ = fn.__name__
        return wrapper

    @app.get("/contacts/<user:path>")
    def contacts(user):
        """The http_roster_url endpoint: {} for users we do not know."""
        try:
            user = normalise_user(user)
        except BadRequest:
            return json_response({})
        return json_response(store.contacts_of(user))

    @app.get("/api/contacts")
    def api_all():
        return json_response(store.all())

    @app.put("/api/contacts/<user>")
    @api
    def api_put(user):
        user = normalise_user(user)
        body = body_json()
        if isinstance(body, dict) and "contacts" in body and isinstance(body["contacts"], dict):
            contacts = body["contacts"]  # {"contacts": {...}, "mutual": true}
        else:
            contacts = body
            if isinstance(contacts, dict) and isinstance(contacts.get("mutual"), bool):
                contacts = {k: v for k, v in contacts.items() if k != "mutual"}
        affected = store.put(user, normalise_contacts(contacts), mutual=want_mutual(body))
        return changed(user, affected)

    @app.post("/api/contacts/<user>/<jid>")
    @api
    def api_add(user, jid):
        user, jid = normalise_user(user), normalise_jid(jid)
        body = body_json(required=False)
        affected = store.add(user, jid, normalise_item(body), mutual=want_mutual(body))
        return changed(user, affected)

    @app.delete("/api/contacts/<user>/<jid>")
    @api
    def api_delete(user, jid):
        user, jid = normalise_user(user), normalise_jid(jid)
        body = body_json(required=False)
        try:
            affected = store.remove(user, jid, mutual=want_mutual(body))
        except KeyError:
            return json_response({"status": "error", "error": "%s has no contact %s" % (user, jid)}, 404)
        return changed(user, affected)

    @app.get("/")
    def admin_page():
        bottle.response.content_type = "text/html; charset=utf-8"
        bottle.response.set_header("Cache-Control", "no-store")
        return ADMIN_PAGE.replace("@DOMAIN@", store.domain)

    @app.error(404)
    @app.error(405)
    def not_found(err):
        bottle.response.content_type = "application/json"
        return json.dumps({"status": "error", "error": "%s %s: %s" % (
            bottle.request.method, bottle.request.path, err.status_line)}) + "\n"

    return app


ADMIN_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Demo web app - contacts admin</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 60em; color: #222; }
  h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
  table { border-collapse: collapse; width: 100%; }
  th, td { border-bottom: 1px solid #ddd; padding: .3em .5em; text-align: left; vertical-align: top; }
  .user { background: #f3f3f3; font-weight: bold; }
  .empty { color: #888; font-style: italic; }
  form { display: flex; flex-wrap: wrap; gap: .5em; align-items: end; margin: .5em 0; }
  label { display: flex; flex-direction: column; font-size: .85em; }
  label.inline { flex-direction: row; align-items: center; gap: .3em; }
  input[type=text] { padding: .3em; }
  #result { background: #f7f7f7; border: 1px solid #ddd; padding: .5em; white-space: pre-wrap; min-height: 2em; }
  .ok { border-left: 4px solid #2a2 !important; } .fail { border-left: 4px solid #c22 !important; }
</style>
</head>
<body>
<h1>Demo web app: who sees whom</h1>
<p><a href="/login">Sign in to the demo app</a> and <a href="/chat/">open the chat</a> without a second password (single sign-on).</p>
<p>Every change is saved and then pushed to boshroster's <code>/roster_admin/refresh</code>;
the server's reply (or the error) is shown below. Contacts are on <code>@DOMAIN@</code> unless you type a full JID.</p>

<h2>Add or update a contact</h2>
<form id="add">
  <label>User <input type="text" name="user" list="users" required placeholder="alice"></label>
  <label>Contact <input type="text" name="jid" required placeholder="bob or bob@@DOMAIN@"></label>
  <label>Name <input type="text" name="name" placeholder="Bob Builder"></label>
  <label>Groups (comma separated) <input type="text" name="groups" placeholder="Friends, Work"></label>
  <label class="inline"><input type="checkbox" name="mutual"> mutual (also add the user to the contact's list)</label>
  <button type="submit">Save</button>
</form>
<datalist id="users"></datalist>
<label class="inline"><input type="checkbox" id="mutual-remove"> remove mutually (also from the contact's list)</label>

<h2>Last change</h2>
<div id="result" class="empty">No change yet.</div>

<h2>Contacts</h2>
<table>
  <thead><tr><th>Contact</th><th>Name</th><th>Groups</th><th></th></tr></thead>
  <tbody id="contacts"><tr><td colspan="4" class="empty">Loading...</td></tr></tbody>
</table>

<script>
"use strict";
const DOMAIN = "@DOMAIN@";
const $ = (sel) => document.querySelector(sel);

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children) e.append(c);
  return e;
}

async function call(method, url, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(url, opts);
  let data;
  try { data = await r.json(); } catch (e) { data = { status: "error", error: "HTTP " + r.status }; }
  return data;
}

function showResult(data) {
  const box = $("#result");
  box.classList.remove("empty", "ok", "fail");
  let summary;
  if (data.status !== "saved") {
    summary = "Not saved: " + data.error;
    box.classList.add("fail");
  } else if (data.refresh && data.refresh.ok) {
    summary = "Saved; refresh of " + data.affected.join(", ") + " done.";
    box.classList.add("ok");
  } else {
    summary = "Saved, but the refresh failed: " + (data.refresh ? data.refresh.error : "?");
    box.classList.add("fail");
  }
  box.textContent = summary + "\\n\\n" + JSON.stringify(data.refresh !== undefined ? data.refresh : data, null, 2);
}

async function load() {
  const all = await call("GET", "/api/contacts");
  const tbody = $("#contacts");
  const users = Object.keys(all).sort();
  tbody.replaceChildren();
  $("#users").replaceChildren(...users.map((u) => el("option", { value: u })));
  if (!users.length) tbody.append(el("tr", {}, el("td", { colSpan: 4, className: "empty", textContent: "No users yet." })));
  for (const user of users) {
    tbody.append(el("tr", {}, el("td", { colSpan: 4, className: "user", textContent: user + "@" + DOMAIN })));
    const jids = Object.keys(all[user]).sort();
    if (!jids.length) tbody.append(el("tr", {}, el("td", { colSpan: 4, className: "empty", textContent: "no contacts" })));
    for (const jid of jids) {
      const item = all[user][jid];
      const edit = el("button", { type: "button", textContent: "Edit" });
      edit.addEventListener("click", () => {
        const f = $("#add");
        f.user.value = user; f.jid.value = jid; f.name.value = item.name || "";
        f.groups.value = (item.groups || []).join(", ");
        f.name.focus();
      });
      const remove = el("button", { type: "button", textContent: "Remove" });
      remove.addEventListener("click", async () => {
        const mutual = $("#mutual-remove").checked;
        showResult(await call("DELETE", "/api/contacts/" + encodeURIComponent(user) + "/" + encodeURIComponent(jid), { mutual }));
        load();
      });
      tbody.append(el("tr", {}, el("td", { textContent: jid }), el("td", { textContent: item.name || "" }),
        el("td", { textContent: (item.groups || []).join(", ") }), el("td", {}, edit, " ", remove)));
    }
  }
}

$("#add").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const user = f.user.value.trim().toLowerCase();
  let jid = f.jid.value.trim().toLowerCase();
  if (!jid.includes("@")) jid += "@" + DOMAIN;
  const body = {
    name: f.name.value.trim(),
    groups: f.groups.value.split(",").map((g) => g.trim()).filter(Boolean),
    mutual: f.mutual.checked,
  };
  showResult(await call("POST", "/api/contacts/" + encodeURIComponent(user) + "/" + encodeURIComponent(jid), body));
  load();
});

load().catch((e) => { $("#contacts").replaceChildren(el("tr", {}, el("td", { colSpan: 4, textContent: "Could not load: " + e }))); });
</script>
</body>
</html>
"""


# -- running -------------------------------------------------------------------------


def serve(app, host, port, ready=None):
    """Serve `app` until SIGTERM/SIGINT; call ready(actual_port) once listening."""
    try:
        from gevent import monkey
        patched = monkey.is_module_patched("socket")
    except ImportError:
        patched = False
    if patched:
        import signal

        import gevent
        from gevent.pool import Pool
        from gevent.pywsgi import LoggingLogAdapter, WSGIServer

        server = WSGIServer((host, port), app, spawn=Pool(200),
                            log=LoggingLogAdapter(log, logging.DEBUG), error_log=LoggingLogAdapter(log, logging.ERROR))
        server.start()
        gevent.signal_handler(signal.SIGTERM, server.stop)
        gevent.signal_handler(signal.SIGINT, server.stop)
        if ready:
            ready(server.server_port)
        server.serve_forever()
    else:
        import socketserver
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        class Quiet(WSGIRequestHandler):
            def log_message(self, fmt, *args):
                log.debug(fmt, *args)

        class Threading(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True

        server = make_server(host, port, app, server_class=Threading, handler_class=Quiet)
        if ready:
            ready(server.server_port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Demo web app serving contact lists to boshroster (mod_http_roster_admin contract).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8008, help="port to listen on, 0 for any free port (default %(default)s)")
    p.add_argument("--contacts", default=os.path.normpath(DEFAULT_CONTACTS),
                   help="JSON file {user: {jid: {name, groups}}} (default %(default)s)")
    p.add_argument("--domain", default="localhost", help="the XMPP domain of the demo users (default %(default)s)")
    p.add_argument("--refresh-url", default=DEFAULT_REFRESH_URL,
                   help="boshroster's refresh endpoint; empty to disable (default %(default)s)")
    p.add_argument("--refresh-secret", default=os.environ.get("BOSHROSTER_REFRESH_SECRET") or None,
                   help="sent as 'Authorization: Bearer ...' (default: $BOSHROSTER_REFRESH_SECRET)")
    p.add_argument("--refresh-timeout", type=float, default=5.0,
                   help="seconds to wait for the refresh reply (default %(default)s)")
    p.add_argument("--users", default=os.path.normpath(DEFAULT_USERS),
                   help="the demo app's own accounts, name:password lines (default %(default)s)")
    p.add_argument("--jwt-key", default=None,
                   help="HS256 secret file shared with boshroster's jwt_key; enables /chat/credentials")
    p.add_argument("--token-lifetime", type=int, default=300,
                   help="seconds a minted chat token is valid (default %(default)s)")
    p.add_argument("--chat-server", default=DEFAULT_CHAT_SERVER,
                   help="boshroster's base URL, as the browser reaches it (default %(default)s)")
    p.add_argument("--static", default=os.path.normpath(DEFAULT_STATIC),
                   help="boshroster's static/ folder: the chat page served at /chat/ (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = ContactStore(args.contacts, domain=args.domain)
    refresher = Refresher(args.refresh_url, args.refresh_secret, timeout=args.refresh_timeout)
    minter = TokenMinter(args.jwt_key, args.domain, args.token_lifetime) if args.jwt_key else None
    sso = SingleSignOn(DemoUsers(args.users), LoginSessions(), minter, args.static, args.chat_server)
    app = make_app(store, refresher, sso)

    def ready(port):
        # Tests wait for this line; with --port 0 it is the only way to learn the port.
        print("demo_backend listening on http://%s:%d/ (contacts %s, refresh %s)"
              % (args.host, port, store.path, args.refresh_url or "disabled"), flush=True)

    serve(app, args.host, args.port, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

This is a demo: it has no login of its own, so bind it to loopback. Run as a
script it serves with gevent's WSGIServer (one greenlet per request), which
matters because boshroster calls ``/contacts/<user>`` back while this app is
still waiting for the refresh reply; without gevent it falls back to a
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
import json
import logging
import os
import re
import sys
import tempfile
import threading

import bottle
import requests

log = logging.getLogger("demo_backend")

DEFAULT_CONTACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf", "demo-contacts.json")
DEFAULT_REFRESH_URL = "http://127.0.0.1:5280/roster_admin/refresh"
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


# -- the web app -------------------------------------------------------------------


def json_response(obj, status=200):
    return bottle.HTTPResponse(
        status=status,
        body=json.dumps(obj, ensure_ascii=False, indent=1) + "\n",
        headers={"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"},
    )


def make_app(store, refresh):
    """Build the Bottle app around a ContactStore and a refresh callable(usernames) -> dict."""
    app = bottle.Bottle()

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
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = ContactStore(args.contacts, domain=args.domain)
    refresher = Refresher(args.refresh_url, args.refresh_secret, timeout=args.refresh_timeout)
    app = make_app(store, refresher)

    def ready(port):
        # Tests wait for this line; with --port 0 it is the only way to learn the port.
        print("demo_backend listening on http://%s:%d/ (contacts %s, refresh %s)"
              % (args.host, port, store.path, args.refresh_url or "disabled"), flush=True)

    serve(app, args.host, args.port, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env node
'use strict';
/**
 * Strophe.js 5 (npm strophe.js, its Node build) against a running boshroster.
 *
 *   node tests/js/strophe_scenarios.js --transport bosh --bosh http://127.0.0.1:5280/http-bind
 *   node tests/js/strophe_scenarios.js --transport websocket --websocket ws://127.0.0.1:5280/xmpp-websocket
 *
 * Prints one JSON line per scenario (see common.js). In Node, Strophe takes its
 * WebSocket from `ws` and its DOM from `@xmldom/xmldom` (optional peer
 * dependencies it loads itself); BOSH needs an XMLHttpRequest, which Node lacks:
 * `xhr2` provides it, as in Strophe's own test setup.
 */

const { parseArgs, log, Inbox, NS, withTimeout } = require('./common');
const { main } = require('./scenarios');

const XHR2 = require('xhr2');
const { Strophe, $iq, $msg, $pres } = require('strophe.js');

/**
 * Node's XMLHttpRequest for Strophe's BOSH transport. xhr2 has no responseXML, and
 * Strophe 5.0.0's Request.getResponse() (src/request.ts l.67-93) parses responseText
 * when responseXML is missing but then returns null instead of the parsed document,
 * so every BOSH response would be dropped silently. Browsers fill responseXML
 * (Strophe calls overrideMimeType('text/xml')); so does this subclass.
 */
class XMLHttpRequest extends XHR2 {
    get responseXML() {
        if (this.readyState !== 4 || !this.responseText) return null;
        return new DOMParser().parseFromString(this.responseText, 'text/xml');
    }
}
globalThis.XMLHttpRequest = XMLHttpRequest;
Strophe.setLogLevel(Strophe.LogLevel.WARN);

const S = Strophe.Status;
const STATUS_NAMES = Object.fromEntries(Object.entries(S).map(([k, v]) => [v, k]));

function text(el, tag) {
    const found = el.getElementsByTagName(tag)[0];
    return found ? found.textContent : null;
}

function rosterItems(query) {
    return Array.from(query.getElementsByTagName('item')).map((item) => ({
        jid: item.getAttribute('jid'),
        name: item.getAttribute('name') || null,
        subscription: item.getAttribute('subscription'),
        groups: Array.from(item.getElementsByTagName('group')).map((g) => g.textContent),
    }));
}

function makeAdapter(args) {
    const bareJid = (user) => `${user}@${args.domain}`;

    function connect(user, password, options = {}) {
        // Strophe picks the strongest mechanism offered; a token needs PLAIN (Converse: connection_options).
        const conn = new Strophe.Connection(args.url, options.plain ? { mechanisms: [Strophe.SASLPlain] } : {});
        const inbox = new Inbox(user);
        let resolveClosed;
        const closed = new Promise((resolve) => {
            resolveClosed = resolve;
        });
        const statuses = [];
        conn.rawInput = (data) => log(`${user} <<`, data.slice(0, 300));
        conn.rawOutput = (data) => log(`${user} >>`, data.slice(0, 300));

        function install() {
            conn.addHandler((el) => {
                inbox.push({ kind: 'message', from: el.getAttribute('from'), to: el.getAttribute('to'), type: el.getAttribute('type'), body: text(el, 'body') });
                return true;
            }, null, 'message');
            conn.addHandler((el) => {
                inbox.push({ kind: 'presence', from: el.getAttribute('from'), type: el.getAttribute('type') });
                return true;
            }, null, 'presence');
            conn.addHandler((el) => {
                const query = el.getElementsByTagName('query')[0];
                inbox.push({ kind: 'roster-push', items: rosterItems(query) });
                const reply = $iq({ type: 'result', id: el.getAttribute('id') });
                if (el.getAttribute('from')) reply.attrs({ to: el.getAttribute('from') });
                conn.send(reply);
                return true;
            }, NS.ROSTER, 'iq', 'set');
        }

        const session = {
            conn,
            inbox,
            get jid() {
                return conn.jid;
            },
            get mechanism() {
                return conn._sasl_mechanism ? conn._sasl_mechanism.mechname : null;
            },
            available() {
                conn.send($pres());
            },
            roster() {
                return new Promise((resolve, reject) => {
                    conn.sendIQ($iq({ type: 'get' }).c('query', { xmlns: NS.ROSTER }),
                        (res) => resolve(rosterItems(res.getElementsByTagName('query')[0])),
                        (err) => reject(new Error(`roster get failed: ${err ? Strophe.serialize(err) : 'timeout'}`)),
                        10000);
                });
            },
            message(to, body) {
                conn.send($msg({ to, type: 'chat' }).c('body').t(body));
            },
            async logout() {
                conn.disconnect('logout');
                await withTimeout(closed, 10000, `${user}: Strophe reports DISCONNECTED after disconnect()`);
            },
            async stop() {
                if (statuses.includes(S.DISCONNECTED)) return;
                conn.disconnect('clean-up');
                await withTimeout(closed, 5000, 'disconnect').catch(() => conn.reset());
            },
        };

        return new Promise((resolve, reject) => {
            let authFailure = null;
            conn.connect(bareJid(user), password, (status, condition, elem) => {
                statuses.push(status);
                log(`${user} status ${STATUS_NAMES[status]}${condition ? ' ' + condition : ''}`);
                if (status === S.CONNECTED) {
                    install();
                    resolve(session);
                } else if (status === S.AUTHFAIL) {
                    const cond = elem && elem.firstElementChild ? elem.firstElementChild.nodeName
                        : elem && elem.childNodes && elem.childNodes[0] ? elem.childNodes[0].nodeName : condition;
                    authFailure = Object.assign(new Error(`authentication failed: ${cond}`), { authFailed: true, condition: cond, closed });
                    reject(authFailure);
                    // Strophe leaves the stream open after a SASL <failure/>; applications
                    // (Converse too) end it themselves.
                    conn.disconnect('authentication failed');
                } else if (status === S.CONNFAIL || status === S.ERROR || status === S.CONNTIMEOUT) {
                    reject(Object.assign(new Error(`connection failed: ${STATUS_NAMES[status]} ${condition || ''}`), { closed }));
                } else if (status === S.DISCONNECTED) {
                    resolveClosed();
                    reject(new Error(`disconnected before login completed (${condition || 'no condition'})`));
                }
            }, args.boshWait);
        });
    }

    return { connect };
}

main('strophe', makeAdapter, parseArgs(process.argv), __filename).catch((err) => {
    log(`fatal: ${err.stack || err}`);
    process.exit(2);
});

#!/usr/bin/env node
'use strict';
/**
 * xmpp.js (npm @xmpp/client 0.14) over WebSocket against a running boshroster.
 *
 *   node tests/js/xmppjs_scenarios.js --transport websocket --websocket ws://127.0.0.1:5280/xmpp-websocket
 *
 * Prints one JSON line per scenario (see common.js). @xmpp/websocket uses the
 * global WebSocket, which Node 20 only has behind --experimental-websocket, so
 * the `ws` package provides it (Node 22+ would not need this).
 */

const { parseArgs, log, Inbox, NS, withTimeout } = require('./common');
const { main } = require('./scenarios');

if (typeof globalThis.WebSocket === 'undefined') globalThis.WebSocket = require('ws');

function rosterItems(query) {
    return query.getChildren('item').map((item) => ({
        jid: item.attrs.jid,
        name: item.attrs.name || null,
        subscription: item.attrs.subscription,
        groups: item.getChildren('group').map((g) => g.text()),
    }));
}

async function makeAdapter(args) {
    if (args.transport !== 'websocket') throw new Error('xmpp.js in Node speaks WebSocket (and TCP) only, not BOSH');
    const { client, xml } = await import('@xmpp/client');

    async function connect(user, password, options = {}) {
        // xmpp.js picks SCRAM, and never PLAIN over ws:// (not "secure" to it); a token needs PLAIN,
        // chosen with a credentials function.
        const credentials = options.plain
            ? (authenticate) => authenticate({ username: user, password }, 'PLAIN')
            : undefined;
        const xmpp = client({ service: args.url, domain: args.domain, username: user, password, credentials });
        const inbox = new Inbox(user);
        let resolveClosed;
        const closed = new Promise((resolve) => {
            resolveClosed = resolve;
        });
        xmpp.on('status', (status) => {
            log(`${user} status ${status}`);
            if (status === 'offline' || status === 'disconnect') resolveClosed();
        });
        xmpp.on('error', (err) => log(`${user} error ${err.condition || ''} ${err.message}`));
        let mechanism = null;
        xmpp.on('element', (el) => log(`${user} <<`, el.toString().slice(0, 300)));
        xmpp.on('send', (el) => {
            if (el.is('auth')) mechanism = el.attrs.mechanism;
            log(`${user} >>`, el.toString().slice(0, 300));
        });
        xmpp.on('stanza', (st) => {
            if (st.is('message')) {
                inbox.push({ kind: 'message', from: st.attrs.from, to: st.attrs.to, type: st.attrs.type, body: st.getChildText('body') });
            } else if (st.is('presence')) {
                inbox.push({ kind: 'presence', from: st.attrs.from, type: st.attrs.type });
            }
        });
        xmpp.iqCallee.set(NS.ROSTER, 'query', (ctx) => {
            inbox.push({ kind: 'roster-push', items: rosterItems(ctx.element) });
            return true; // -> <iq type='result'/>
        });

        let jid;
        try {
            jid = await xmpp.start();
        } catch (err) {
            // A SASL <failure/> rejects start(); stop() ends the stream and the reconnect logic.
            await withTimeout(xmpp.stop(), 5000, `${user}: xmpp.stop() after a failed login`).catch((e) => log(`stop: ${e}`));
            const condition = err.condition || null;
            throw Object.assign(new Error(`login failed: ${err.name} ${condition || err.message}`), {
                authFailed: err.name === 'SASLError', condition, closed,
            });
        }

        return {
            xmpp,
            inbox,
            jid: jid.toString(),
            mechanism,
            available() {
                xmpp.send(xml('presence')).catch((e) => log(`send presence: ${e}`));
            },
            async roster() {
                const res = await xmpp.iqCaller.request(xml('iq', { type: 'get' }, xml('query', { xmlns: NS.ROSTER })), 10000);
                return rosterItems(res.getChild('query', NS.ROSTER));
            },
            message(to, body) {
                xmpp.send(xml('message', { to, type: 'chat' }, xml('body', {}, body))).catch((e) => log(`send message: ${e}`));
            },
            async logout() {
                // xmpp.js's clean logout: <close/>, wait for the server's, close the socket.
                await withTimeout(xmpp.stop(), 10000, `${user}: xmpp.stop()`);
            },
            async stop() {
                if (xmpp.status === 'offline') return;
                await withTimeout(xmpp.stop(), 5000, 'stop').catch(() => {});
            },
        };
    }

    return { connect };
}

main('xmppjs', makeAdapter, parseArgs(process.argv), __filename).catch((err) => {
    log(`fatal: ${err.stack || err}`);
    process.exit(2);
});

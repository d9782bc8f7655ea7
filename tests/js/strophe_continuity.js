#!/usr/bin/env node
'use strict';
/**
 * Strophe.js 5 in the continuity scenarios (continuity.js) over WebSocket, with its native
 * XEP-0198 support (since 4.1.0: the `enableStreamManagement` connection option, resumption
 * asked for by default, state in a storage backend: sessionStorage in a browser, memory
 * here, kept by the Connection object across reconnections).  Strophe does not reconnect
 * by itself: like an application, this adapter calls connect() again on the same
 * Connection when it reports DISCONNECTED, and Strophe sends <resume/> instead of binding
 * when it holds resumable state.
 *
 *   node tests/js/strophe_continuity.js --transport websocket --websocket ws://127.0.0.1:5280/xmpp-websocket
 */

const { parseArgs, log, Inbox, withTimeout } = require('./common');
const { main } = require('./continuity');

const { Strophe, $iq, $msg, $pres } = require('strophe.js');

Strophe.setLogLevel(Strophe.LogLevel.WARN);
const S = Strophe.Status;
const STATUS_NAMES = Object.fromEntries(Object.entries(S).map(([k, v]) => [v, k]));

function text(el, tag) {
    const found = el.getElementsByTagName(tag)[0];
    return found ? found.textContent : null;
}

function makeAdapter(args) {
    function connect(user, { url, sm }) {
        const conn = new Strophe.Connection(url, sm ? { enableStreamManagement: true } : {});
        const inbox = new Inbox(user);
        const seen = [];
        const push = (item) => {
            seen.push(item);
            inbox.push(item);
        };
        let stopping = false;
        let everConnected = false;
        let connectedNow = false;
        let reconnecting = null;
        let resolveClosed;
        const closed = new Promise((resolve) => {
            resolveClosed = resolve;
        });
        conn.rawInput = (data) => {
            log(`${user} <<`, data.slice(0, 300));
            const failed = /<failed[^>]*urn:xmpp:sm:3[^>]*>\s*<([\w-]+)/.exec(data);
            if (failed) push({ kind: 'status', what: 'resume-failed', condition: failed[1] });
            if (/<enabled[^>]*urn:xmpp:sm:3/.test(data)) push({ kind: 'status', what: 'enabled' });
        };
        let ackSent = -1;  // the 'h' of the last <a/> Strophe wrote
        conn.rawOutput = (data) => {
            const ack = /<a\b[^>]*urn:xmpp:sm:3[^>]*\bh=['"](\d+)['"]|<a\b[^>]*\bh=['"](\d+)['"][^>]*urn:xmpp:sm:3/.exec(data);
            if (ack) ackSent = Number(ack[1] || ack[2]);
            log(`${user} >>`, data.slice(0, 300));
        };

        function install() {
            conn.addHandler((el) => {
                push({ kind: 'message', from: el.getAttribute('from'), type: el.getAttribute('type'), body: text(el, 'body') });
                return true;
            }, null, 'message');
            conn.addHandler((el) => {
                push({ kind: 'presence', from: el.getAttribute('from'), type: el.getAttribute('type') });
                return true;
            }, null, 'presence');
        }

        const session = {
            conn,
            inbox,
            seen,
            // A stanza sent with no connection sits in Strophe's send queue and is written
            // to the next socket before authentication: an application must not do that.
            canSendWhileDisconnected: false,
            get jid() {
                return conn.jid;
            },
            smId: () => (conn.sm && conn.sm.state.id) || null,
            available() {
                conn.send($pres());
            },
            /**
             * Resolves once Strophe has written an <a/> covering every stanza it has handled
             * (its answer to the server's <r/>) and the server has read it (a roster round trip
             * written after it, on the same ordered stream).  See stanza_continuity.js.
             */
            async acked(ms = 15000) {
                const want = conn.sm.state.hIn;
                const deadline = Date.now() + ms;
                while (ackSent < want) {
                    if (Date.now() > deadline) throw new Error(`${user}: no <a h='${want}'/> written within ${ms} ms (last ${ackSent})`);
                    await new Promise((r) => setTimeout(r, 20));
                }
                await session.roster();
            },
            roster() {
                return new Promise((resolve, reject) => {
                    conn.sendIQ($iq({ type: 'get' }).c('query', { xmlns: 'jabber:iq:roster' }), resolve,
                        (err) => reject(new Error(`roster get failed: ${err ? Strophe.serialize(err) : 'timeout'}`)), 10000);
                });
            },
            message(to, body) {
                conn.send($msg({ to, type: 'chat' }).c('body').t(body));
            },
            async stop() {
                stopping = true;
                clearTimeout(reconnecting);
                if (!conn.connected) return;
                conn.disconnect('clean-up');
                await withTimeout(closed, 5000, 'disconnect').catch(() => conn.reset());
            },
        };

        return new Promise((resolve, reject) => {
            const onStatus = (status, condition) => {
                log(`${user} status ${STATUS_NAMES[status]}${condition ? ' ' + condition : ''}`);
                if (status === S.CONNECTED) {
                    connectedNow = true;
                    install();
                    if (!everConnected) {
                        everConnected = true;
                        resolve(session);
                    } else {
                        push({ kind: 'status', what: conn.hasResumed() ? 'resumed' : 'fresh' });
                    }
                } else if (status === S.AUTHFAIL) {
                    reject(new Error(`${user}: authentication failed`));
                } else if (status === S.DISCONNECTED) {
                    if (stopping || !sm) {
                        resolveClosed();
                        if (!everConnected) reject(new Error(`${user}: disconnected before login (${condition || ''})`));
                        return;
                    }
                    if (connectedNow) push({ kind: 'status', what: 'disconnected' });
                    connectedNow = false;
                    // An application's reconnection: the same Connection, so the same SM state.
                    // Strophe can report DISCONNECTED twice for one failed attempt (CONNFAIL, then
                    // the socket's close): one reconnection at a time.
                    if (reconnecting) return;
                    reconnecting = setTimeout(() => {
                        reconnecting = null;
                        if (!stopping) conn.connect(`${user}@${args.domain}`, args.password, onStatus);
                    }, 500);
                }
            };
            conn.connect(`${user}@${args.domain}`, args.password, onStatus);
        });
    }

    return { connect };
}

main('strophe', makeAdapter, parseArgs(process.argv)).catch((err) => {
    log(`fatal: ${err.stack || err}`);
    process.exit(2);
});

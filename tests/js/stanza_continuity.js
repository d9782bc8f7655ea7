#!/usr/bin/env node
'use strict';
/**
 * StanzaJS (npm stanza 12) in the continuity scenarios (continuity.js) over WebSocket:
 * stream management with resumption as StanzaJS does it by default (useStreamManagement,
 * allowResumption), and its own reconnection (autoReconnect: a backoff of 2^n + random
 * seconds, Client.js); MAM with client.searchHistory.
 *
 *   node tests/js/stanza_continuity.js --transport websocket --websocket ws://127.0.0.1:5280/xmpp-websocket
 */

const { parseArgs, log, Inbox } = require('./common');
const { main } = require('./continuity');

async function makeAdapter(args) {
    const XMPP = require('stanza');

    async function connect(user, { url, sm }) {
        const client = XMPP.createClient({
            jid: `${user}@${args.domain}`,
            password: args.password,
            transports: { websocket: url, bosh: false },
            useStreamManagement: sm,
            allowResumption: sm,
            autoReconnect: sm,
        });
        const inbox = new Inbox(user);
        const seen = [];
        const push = (item) => {
            seen.push(item);
            inbox.push(item);
        };
        let started = false;
        let smId = null;
        let failedCondition = null;
        let stopping = false;
        let resolveClosed;
        const closed = new Promise((resolve) => {
            resolveClosed = resolve;
        });
        client.on('raw:incoming', (data) => {
            const text = String(data);
            const failed = /<failed[^>]*urn:xmpp:sm:3[^>]*>\s*<([\w-]+)/.exec(text);
            if (failed) failedCondition = failed[1];
            log(`${user} <<`, text.slice(0, 300));
        });
        let ackSent = -1;  // the 'h' of the last <a/> StanzaJS wrote
        client.on('raw:outgoing', (data) => {
            const text = String(data);
            const ack = /^<a\b[^>]*urn:xmpp:sm:3[^>]*>/.test(text) && /\bh=['"](\d+)['"]/.exec(text);
            if (ack) ackSent = Number(ack[1]);
            log(`${user} >>`, text.slice(0, 300));
        });
        client.on('sm', (nonza) => {
            if (nonza.type === 'enabled') {
                smId = nonza.id;
                push({ kind: 'status', what: 'enabled', id: nonza.id });
            } else if (nonza.type === 'failed') {
                push({ kind: 'status', what: 'resume-failed', condition: failedCondition });
            }
        });
        client.on('stream:management:resumed', () => push({ kind: 'status', what: 'resumed' }));
        client.on('disconnected', () => {
            log(`${user} disconnected`);
            push({ kind: 'status', what: 'disconnected' });
            if (stopping) resolveClosed();
        });
        client.on('message', (msg) => push({ kind: 'message', from: msg.from, type: msg.type, body: msg.body }));
        client.on('presence', (pres) => push({ kind: 'presence', from: pres.from, type: pres.type }));
        client.on('stream:error', (err) => log(`${user} stream error ${JSON.stringify(err)}`));

        const session = {
            client,
            inbox,
            seen,
            canSendWhileDisconnected: true,
            get jid() {
                return client.jid;
            },
            smId: () => (client.sm.id || smId || null),
            available() {
                client.sendPresence();
            },
            /**
             * Resolves once StanzaJS has answered the server's <r/> with an <a/> covering
             * every stanza it has handled so far, and the server has read that <a/> (a
             * roster round trip on the same ordered stream, written after it).  StanzaJS 12
             * closes without a final <a/> (disconnect(): drain the queue, then <close/>;
             * XEP-0198 §4 only RECOMMENDS the last ack), so a logout right after a message
             * would leave it unacknowledged: this is what waiting for its ack means, on any
             * load, instead of a guessed delay.
             */
            async acked(ms = 15000) {
                const want = client.sm.handled;
                const deadline = Date.now() + ms;
                while (ackSent < want) {  // no wrap-around in a test's few dozen stanzas
                    if (Date.now() > deadline) throw new Error(`${user}: no <a h='${want}'/> written within ${ms} ms (last ${ackSent})`);
                    await new Promise((r) => setTimeout(r, 20));
                }
                await client.getRoster();
            },
            async roster() {
                return (await client.getRoster()).items;
            },
            message(to, body) {
                client.sendMessage({ to, type: 'chat', body });
            },
            async searchHistory({ with: withJid, paging }) {
                const res = await client.searchHistory({ with: withJid, paging });
                return {
                    complete: !!res.complete,
                    first: res.paging && res.paging.first,
                    last: res.paging && res.paging.last,
                    count: res.paging && res.paging.count,
                    bodies: res.results.map((r) => r.item && r.item.message && r.item.message.body),
                };
            },
            async stop() {
                stopping = true;
                client.config.autoReconnect = false;
                if (!client.transport) return;
                client.disconnect();
                await Promise.race([closed, new Promise((r) => setTimeout(r, 5000))]);
            },
        };

        return new Promise((resolve, reject) => {
            client.on('session:started', () => {
                if (!started) {
                    started = true;
                    resolve(session);
                } else {
                    push({ kind: 'status', what: 'fresh' });
                }
            });
            client.on('auth:failed', () => reject(new Error(`${user}: authentication failed`)));
            client.connect();
        });
    }

    return { connect };
}

main('stanza', makeAdapter, parseArgs(process.argv)).catch((err) => {
    log(`fatal: ${err.stack || err}`);
    process.exit(2);
});

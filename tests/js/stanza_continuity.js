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
        client.on('raw:outgoing', (data) => log(`${user} >>`, String(data).slice(0, 300)));
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

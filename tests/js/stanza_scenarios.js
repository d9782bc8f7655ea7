#!/usr/bin/env node
'use strict';
/**
 * StanzaJS (npm stanza 12) over BOSH or WebSocket against a running boshroster.
 *
 *   node tests/js/stanza_scenarios.js --transport bosh --bosh http://127.0.0.1:5280/http-bind
 *   node tests/js/stanza_scenarios.js --transport websocket --websocket ws://127.0.0.1:5280/xmpp-websocket
 *
 * Prints one JSON line per scenario (see common.js). StanzaJS runs in Node as it
 * is: BOSH through Node's global fetch, WebSocket through its own `ws` dependency.
 * Stream management (XEP-0198) is off here: these scenarios are about the basics (a
 * dropped client must go unavailable at once); stanza_continuity.js tests StanzaJS with it.
 */

const { parseArgs, log, Inbox } = require('./common');
const { main } = require('./scenarios');

function rosterItems(items) {
    return (items || []).map((item) => ({
        jid: item.jid,
        name: item.name || null,
        subscription: item.subscription,
        groups: [...(item.groups || [])],
    }));
}

async function makeAdapter(args) {
    const XMPP = require('stanza');
    const transports = args.transport === 'bosh'
        ? { bosh: args.url, websocket: false }
        : { websocket: args.url, bosh: false };

    async function connect(user, password, options = {}) {
        const client = XMPP.createClient({
            jid: `${user}@${args.domain}`,
            password,
            transports,
            useStreamManagement: false,
            allowResumption: false,
            autoReconnect: false,
        });
        if (options.plain) {
            // A token is the password: leave PLAIN as the only mechanism we would pick.
            for (const mech of ['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256', 'SCRAM-SHA-1-PLUS', 'SCRAM-SHA-1', 'DIGEST-MD5']) {
                client.sasl.disable(mech);
            }
        }
        const inbox = new Inbox(user);
        let resolveClosed;
        const closed = new Promise((resolve) => {
            resolveClosed = resolve;
        });
        let mechanism = null;
        client.on('raw:incoming', (data) => log(`${user} <<`, String(data).slice(0, 300)));
        client.on('raw:outgoing', (data) => {
            const text = String(data);
            const auth = /<auth[^>]*mechanism=["']([^"']+)["']/.exec(text);
            if (auth) mechanism = auth[1];
            log(`${user} >>`, text.slice(0, 300));
        });
        client.on('disconnected', (err) => {
            log(`${user} disconnected${err ? ' ' + err : ''}`);
            resolveClosed();
        });
        client.on('message', (msg) => {
            inbox.push({ kind: 'message', from: msg.from, to: msg.to, type: msg.type, body: msg.body });
        });
        client.on('presence', (pres) => {
            inbox.push({ kind: 'presence', from: pres.from, type: pres.type });
        });
        client.on('roster:update', (iq) => {
            // StanzaJS answers the push with a result itself.
            inbox.push({ kind: 'roster-push', items: rosterItems(iq.roster && iq.roster.items) });
        });

        const session = {
            client,
            inbox,
            get jid() {
                return client.jid;
            },
            get mechanism() {
                return mechanism;
            },
            available() {
                client.sendPresence();
            },
            async roster() {
                const roster = await client.getRoster();
                return rosterItems(roster.items);
            },
            message(to, body) {
                client.sendMessage({ to, type: 'chat', body });
            },
            async logout() {
                client.disconnect();
                await closed;
            },
            async stop() {
                if (!client.transport) return;
                client.disconnect();
                await Promise.race([closed, new Promise((r) => setTimeout(r, 5000))]);
            },
        };

        return new Promise((resolve, reject) => {
            let failed = false;
            client.on('session:started', () => resolve(session));
            client.on('auth:failed', () => {
                failed = true;
                reject(Object.assign(new Error('authentication failed'), {
                    authFailed: true, condition: 'not-authorized', closed,
                }));
            });
            client.on('stream:error', (err) => log(`${user} stream error ${JSON.stringify(err)}`));
            closed.then(() => {
                if (!failed) reject(Object.assign(new Error('disconnected before login completed'), { closed }));
            });
            client.connect();
        });
    }

    return { connect };
}

main('stanza', makeAdapter, parseArgs(process.argv), __filename).catch((err) => {
    log(`fatal: ${err.stack || err}`);
    process.exit(2);
});

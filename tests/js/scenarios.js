'use strict';
/**
 * The scenarios every real client runs, written once against a small adapter
 * that each client script implements with its own library's API:
 *
 *   adapter.connect(user, password, options) -> Promise<session>; rejects with an Error whose
 *       .authFailed is true (and .condition the SASL condition) when the password is
 *       wrong, and whose .closed is a Promise resolving once the library says it is
 *       disconnected.  options.plain: use SASL PLAIN even though SCRAM is offered (a
 *       token is the password: the server has no SCRAM keys for it), each library's way.
 *   session.jid                         the bound full JID
 *   session.mechanism                   the SASL mechanism the library chose
 *   session.inbox                       Inbox of normalized stanzas:
 *       {kind: 'presence', from, type}  {kind: 'message', from, type, body}
 *       {kind: 'roster-push', items: [{jid, name, subscription, groups}]}
 *   session.available()                 send initial presence
 *   session.roster()                    -> Promise<[{jid, name, subscription, groups}]>
 *   session.message(to, text)           send a chat message
 *   session.logout()                    -> Promise, resolved once cleanly disconnected
 *   session.stop()                      best-effort teardown for clean-ups (no checks)
 */

const {
    NAMES, TRICKY_TEXT, assert, assertEqual, log, Controller, Runner, spawnVanishingClient, sortItems, emit,
} = require('./common');

const bare = (jid) => (jid || '').split('/')[0];

const isPresence = (from, type) => (s) => s.kind === 'presence' && bare(s.from) === from && (s.type || null) === type;

function expectedRoster(user, domain) {
    return Object.keys(NAMES)
        .filter((other) => other !== user)
        .map((other) => ({ jid: `${other}@${domain}`, name: NAMES[other], subscription: 'both', groups: ['Friends'] }));
}

function refreshedAliceContacts(domain) {
    // bob renamed and put in a second group, carol unchanged, dave gone, erin new.
    return {
        [`bob@${domain}`]: { name: 'Bob the Builder', groups: ['Friends', 'Work'] },
        [`carol@${domain}`]: { name: NAMES.carol, groups: ['Friends'] },
        [`erin@${domain}`]: { name: 'Erin Example', groups: ['Colleagues'] },
    };
}

function normalizeItems(items) {
    return sortItems(items.map((i) => ({
        jid: i.jid, name: i.name, subscription: i.subscription, groups: [...(i.groups || [])].sort(),
    })));
}

async function runScenarios(clientName, adapter, args, script) {
    const runner = new Runner(clientName, args);
    const controller = new Controller();
    const d = args.domain;
    const alice = `alice@${d}`;
    const bob = `bob@${d}`;
    const carol = `carol@${d}`;
    const T = 10000; // per wait

    async function online(ctx, user) {
        const session = await adapter.connect(user, args.password);
        ctx.defer(() => session.stop());
        return session;
    }

    await runner.run('login', async (ctx) => {
        const s = await online(ctx, 'alice');
        assert(bare(s.jid) === alice && s.jid.includes('/'), `bound JID ${s.jid} is not a full JID of ${alice}`);
        await s.logout();
        return { jid: s.jid, mechanism: s.mechanism };
    });

    await runner.run('wrong_password', async () => {
        const started = Date.now();
        let err = null;
        try {
            const s = await adapter.connect('alice', 'not-the-password');
            await s.stop();
        } catch (e) {
            err = e;
        }
        assert(err, 'login with a wrong password succeeded');
        assert(err.authFailed, `failed, but not as an authentication failure: ${err}`);
        assertEqual(err.condition, 'not-authorized', 'SASL failure condition');
        await err.closed; // the library reports the connection as closed, no hanging socket
        return { condition: err.condition, ms: Date.now() - started };
    });

    await runner.run('roster', async (ctx) => {
        const s = await online(ctx, 'alice');
        const items = normalizeItems(await s.roster());
        assertEqual(items, normalizeItems(expectedRoster('alice', d)), 'roster of alice');
        await s.logout();
        return { items: items.map((i) => `${i.name} <${i.jid}> [${i.groups}] ${i.subscription}`) };
    });

    await runner.run('presence', async (ctx) => {
        const a = await online(ctx, 'alice');
        await a.roster();
        a.available();
        const b = await online(ctx, 'bob');
        await b.roster();
        b.available();
        // bob's initial presence is broadcast to alice; alice's reaches bob as the answer to his probe
        await a.inbox.wait(isPresence(bob, null), T, 'alice sees bob available');
        await b.inbox.wait(isPresence(alice, null), T, 'bob sees alice available');
        await b.logout();
        await a.logout();
        return { both_ways: true };
    });

    await runner.run('messages', async (ctx) => {
        const a = await online(ctx, 'alice');
        a.available();
        const b = await online(ctx, 'bob');
        b.available();
        await a.inbox.wait(isPresence(bob, null), T, 'alice sees bob available');
        a.message(b.jid, TRICKY_TEXT);
        const got = await b.inbox.wait((s) => s.kind === 'message' && bare(s.from) === alice && s.body != null, T, 'bob gets the message');
        assertEqual(got.body, TRICKY_TEXT, 'body alice -> bob');
        assertEqual(got.type, 'chat', 'type alice -> bob');
        const reply = `${TRICKY_TEXT} ↩ back`;
        b.message(a.jid, reply);
        const back = await a.inbox.wait((s) => s.kind === 'message' && bare(s.from) === bob && s.body != null, T, 'alice gets the reply');
        assertEqual(back.body, reply, 'body bob -> alice');
        await b.logout();
        await a.logout();
        return { sent: TRICKY_TEXT, received: got.body, reply_received: back.body };
    });

    await runner.run('logout_unavailable', async (ctx) => {
        const a = await online(ctx, 'alice');
        a.available();
        const b = await online(ctx, 'bob');
        b.available();
        await a.inbox.wait(isPresence(bob, null), T, 'alice sees bob available');
        const started = Date.now();
        await b.logout();
        await a.inbox.wait(isPresence(bob, 'unavailable'), T, 'alice sees bob unavailable after his logout');
        await a.logout();
        return { ms: Date.now() - started };
    });

    await runner.run('drop_unavailable', async (ctx) => {
        const a = await online(ctx, 'alice');
        a.available();
        const child = spawnVanishingClient(script, args, 'carol');
        ctx.defer(() => child.kill());
        const childJid = await child.ready;
        await a.inbox.wait(isPresence(carol, null), T, 'alice sees carol available');
        const started = Date.now();
        child.kill(); // SIGKILL: no logout, no <close/>, no BOSH terminate
        await a.inbox.wait(isPresence(carol, 'unavailable'), args.dropTimeout, 'alice sees carol unavailable after her client died');
        await a.logout();
        return { child: childJid, ms: Date.now() - started };
    }, args.dropTimeout + 20000);

    // Token login (issue 13): the test mints a JWT for the user (HS256, the server's jwt_key),
    // the library sends it as the SASL PLAIN password, as Converse does with credentials_url.
    await runner.run('token_login', async (ctx) => {
        const answer = await controller.request('token', { user: 'dave', kind: 'valid' });
        assert(answer.ok && answer.token, `the test could not mint a token: ${JSON.stringify(answer)}`);
        const s = await adapter.connect('dave', answer.token, { plain: true });
        ctx.defer(() => s.stop());
        assert(bare(s.jid) === `dave@${d}`, `bound JID ${s.jid} is not dave's`);
        assertEqual(s.mechanism, 'PLAIN', 'SASL mechanism used for the token');
        const items = normalizeItems(await s.roster());
        assertEqual(items, normalizeItems(expectedRoster('dave', d)), 'roster of dave after a token login');
        await s.logout();
        return { jid: s.jid, mechanism: s.mechanism };
    });

    await runner.run('token_refused', async () => {
        const refused = {};
        for (const kind of ['expired', 'other_user', 'alg_none']) {
            const answer = await controller.request('token', { user: 'dave', kind });
            assert(answer.ok && answer.token, `the test could not mint a ${kind} token`);
            let err = null;
            try {
                const s = await adapter.connect('dave', answer.token, { plain: true });
                await s.stop();
            } catch (e) {
                err = e;
            }
            assert(err, `login with a ${kind} token succeeded`);
            assert(err.authFailed, `${kind}: failed, but not as an authentication failure: ${err}`);
            assertEqual(err.condition, 'not-authorized', `${kind}: SASL failure condition`);
            await err.closed;
            refused[kind] = err.condition;
        }
        return refused;
    });

    // Last: it changes alice's contacts at the backend for the rest of the run.
    await runner.run('refresh_push', async (ctx) => {
        const a = await online(ctx, 'alice');
        await a.roster(); // an "interested resource" (RFC 6121 §2.1.6) gets pushes
        a.available();
        const contacts = refreshedAliceContacts(d);
        const answer = await controller.request('refresh', { user: 'alice', contacts });
        assert(answer.ok, `the test could not refresh: ${JSON.stringify(answer)}`);
        const pushed = new Map();
        const want = [`bob@${d}`, `erin@${d}`, `dave@${d}`];
        while (!want.every((j) => pushed.has(j))) {
            const push = await a.inbox.wait((s) => s.kind === 'roster-push', T, `roster pushes for ${want.filter((j) => !pushed.has(j))}`);
            for (const item of push.items) pushed.set(item.jid, item);
        }
        assertEqual(pushed.get(`dave@${d}`).subscription, 'remove', 'push for the removed contact');
        assertEqual(normalizeItems([pushed.get(`bob@${d}`)]), normalizeItems([{ jid: bob, subscription: 'both', ...contacts[bob] }]), 'push for the renamed contact');
        assertEqual(normalizeItems([pushed.get(`erin@${d}`)]), normalizeItems([{ jid: `erin@${d}`, subscription: 'both', ...contacts[`erin@${d}`] }]), 'push for the new contact');
        assert(!pushed.has(carol), 'the unchanged contact was pushed too');
        const now = normalizeItems(await a.roster());
        const expected = normalizeItems(Object.entries(contacts).map(([jid, c]) => ({ jid, subscription: 'both', ...c })));
        assertEqual(now, expected, 'roster after the refresh');
        await a.logout();
        return { pushes: [...pushed.values()].map((i) => `${i.jid} ${i.subscription} ${i.name || ''}`), refresh: answer.reply };
    });

    controller.close();
    runner.finish();
    return runner.failed;
}

/** The vanishing client: log in, go available, say so, then wait to be killed. */
async function childMain(adapter, args) {
    try {
        const s = await adapter.connect(args.user, args.password);
        await s.roster();
        s.available();
        emit({ ready: s.jid });
        setInterval(() => {}, 60000);
    } catch (err) {
        emit({ error: String(err) });
        process.exit(1);
    }
}

async function main(clientName, makeAdapter, args, script) {
    const adapter = await makeAdapter(args);
    if (args.child) return childMain(adapter, args);
    const failed = await runScenarios(clientName, adapter, args, script);
    log(`${clientName}/${args.transport}: done, ${failed} failed`);
    // Exit explicitly: a library timer must not keep the process alive.
    process.exit(failed ? 1 : 0);
}

module.exports = { main, bare };

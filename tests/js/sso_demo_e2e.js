#!/usr/bin/env node
'use strict';
/**
 * Single sign-on in the demo (issue 13 item 2): Converse.js in headless Chromium (playwright-core,
 * /usr/bin/chromium), served by the demo web app (scripts/demo_backend.py) at /chat/, logging in
 * with the tokens the app mints at /chat/credentials.
 *
 *   node tests/js/sso_demo_e2e.js --app http://127.0.0.1:8008 --transport websocket --artifacts test-artifacts
 *
 * Steps (one JSON line each, common.js protocol): the chat page sends a signed-out browser to the
 * app's login form; signing in there lands in the chat, connected, and the Converse login form
 * is never used (not visible once connected, nothing typed: the server logs token logins); the roster from the app is shown; the first token expires (the Python test
 * proves the server now refuses it); the connection is dropped (the app's API ends the session);
 * Converse fetches new credentials and reconnects, roster still there.
 * Requests to the Python test (stdout/stdin):
 *   {"request": "sessions"}               GET /api/users/alice/sessions -> {"sessions": [...]}
 *   {"request": "expired", "token": T}    wait until T has expired, try it: {"refused": bool, "reason"}
 *   {"request": "drop"}                   DELETE /api/users/alice/sessions -> {"ended": [...]}
 * Screenshots: <artifacts>/sso-<transport>-{1-roster,2-reconnected}.png
 */

const path = require('node:path');
const { Controller, Runner, emit, log, sleep, assert, assertEqual } = require('./common');

// conf/demo-contacts.json: what the demo app gives alice.
const ALICE_CONTACTS = {
    'bob@localhost': { name: 'Bob Builder', group: 'Work' },
    'carol@localhost': { name: 'Carol Singer', group: 'Book Club' },
    'dave@localhost': { name: 'Dave Digger', group: 'Work' },
};

function parseArgs(argv) {
    const args = { app: null, transport: 'websocket', artifacts: 'test-artifacts', chromium: '/usr/bin/chromium',
        user: 'alice', password: 'password', only: null };
    for (let i = 2; i < argv.length; i += 2) {
        const key = argv[i].replace(/^--/, '');
        if (!(key in args)) throw new Error(`unknown option --${key}`);
        args[key] = argv[i + 1];
    }
    if (!args.app) throw new Error('--app URL is required');
    return args;
}

const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-dev-shm-usage'];

async function main() {
    const args = parseArgs(process.argv);
    const { chromium } = require('playwright-core');
    const runner = new Runner('converse-sso', args);
    const controller = new Controller();
    const shot = (name) => path.join(args.artifacts, `sso-${args.transport}-${name}.png`);
    const seen = { console: [], credentials: [], loginFormShown: false };
    let browser = null;
    let page = null;
    let broken = false;

    async function step(name, fn, ms = 45000) {
        if (broken) {
            emit({ scenario: name, client: 'converse-sso', transport: args.transport, ok: false, error: 'not run: an earlier step failed' });
            return;
        }
        const before = runner.failed;
        await runner.run(name, fn, ms);
        if (runner.failed > before) {
            broken = true;
            if (page) await page.screenshot({ path: shot(`failed-${name}`) }).catch(() => {});
        }
    }

    const contact = (jid) => `converse-roster a.open-chat[data-jid="${jid}"]`;
    const demo = () => page.evaluate(() => {
        const d = window.boshrosterDemo || {};
        return { connected: d.connected, connects: d.connects, reconnects: d.reconnects, sso: d.sso };
    });
    async function rosterShown() {
        const shown = {};
        for (const [jid, { name, group }] of Object.entries(ALICE_CONTACTS)) {
            await page.waitForSelector(`converse-roster .roster-group[data-group="${group}"] a.open-chat[data-jid="${jid}"]`, { timeout: 20000 });
            shown[jid] = (await page.textContent(`${contact(jid)} .contact-name`)).trim();
            assertEqual(shown[jid], name, `name shown for ${jid}`);
        }
        return shown;
    }

    try {
        await step('signed_out_goes_to_the_app_login', async () => {
            browser = await chromium.launch({ executablePath: args.chromium, args: CHROMIUM_ARGS });
            const context = await browser.newContext({ viewport: { width: 1100, height: 720 }, locale: 'en-US' });
            // Converse's password field is never shown (the page hides Converse's login form in single
            // sign-on mode) and nothing is typed into one: watched from the first byte of every page.
            await context.addInitScript(() => {
                window.ssoLoginFormSeen = false;
                window.ssoPasswordTyped = false;
                new MutationObserver(() => {
                    const field = document.querySelector('#converse-login-password');
                    if (field && field.getClientRects().length) window.ssoLoginFormSeen = true;  // rendered visibly
                }).observe(document, { childList: true, subtree: true, attributes: true });
                document.addEventListener('input', (e) => {
                    if (e.target && e.target.type === 'password') window.ssoPasswordTyped = true;
                }, true);
            });
            page = await context.newPage();
            page.on('console', (m) => {
                if (['error', 'warning'].includes(m.type())) seen.console.push(`${m.type()}: ${m.text().slice(0, 300)}`);
            });
            page.on('pageerror', (e) => seen.console.push(`pageerror: ${e.message}`));
            page.on('response', async (r) => {
                if (new URL(r.url()).pathname === '/chat/credentials') {
                    let body = null;
                    try { body = await r.json(); } catch (e) { /* a 401 page, say */ }
                    seen.credentials.push({ status: r.status(), jid: body && body.jid, token: body && body.password, at: Date.now() });
                }
            });
            await page.goto(`${args.app}/chat/?transport=${args.transport}`);
            await page.waitForSelector('#username', { timeout: 15000 });
            assertEqual(new URL(page.url()).pathname, '/login', 'where a signed-out browser lands');
            return { url: page.url() };
        });

        await step('sign_in_to_the_app_and_be_in_the_chat', async () => {
            await page.fill('#username', args.user);
            await page.fill('#password', args.password);
            await page.click('#sign-in');
            await page.waitForURL((u) => u.pathname === '/chat/' && u.searchParams.get('credentials_url'), { timeout: 15000 });
            await page.waitForFunction(() => window.boshrosterDemo && window.boshrosterDemo.connected, null, { timeout: 30000 });
            await page.waitForFunction((jid) => ((document.querySelector('converse-controlbox') || {}).textContent || '').includes(jid),
                `${args.user}@localhost`, { timeout: 15000 });
            const state = await demo();
            assert(state.sso, 'the page is not in single sign-on mode');
            const ok = seen.credentials.filter((c) => c.status === 200);
            assert(ok.length >= 1, `no credentials fetched: ${JSON.stringify(seen.credentials)}`);
            assertEqual(ok[0].jid, `${args.user}@localhost`, 'JID from the credentials URL');
            assert(/^[\w-]+\.[\w-]+\.[\w-]+$/.test(ok[0].token), 'the password is not a JWT');
            const settings = await page.evaluate(() => ({
                auto_login: window.boshrosterDemo.settings.auto_login,
                credentials_url: window.boshrosterDemo.settings.credentials_url,
            }));
            assertEqual(settings.auto_login, true, 'auto_login');
            assertEqual(new URL(settings.credentials_url).origin, new URL(args.app).origin, 'credentials_url origin');
            return { state, credentials_fetched: ok.length, settings };
        });

        await step('roster_without_a_chat_password', async () => {
            const shown = await rosterShown();
            assertEqual(await page.isVisible('#converse-login-password'), false, 'Converse login form visible');
            const form = await page.evaluate(() => ({ shown: window.ssoLoginFormSeen, typed: window.ssoPasswordTyped }));
            assertEqual(form, { shown: false, typed: false }, 'Converse password field shown / typed into');
            const sessions = await controller.request('sessions', {});
            assert(sessions.ok, `sessions: ${sessions.error}`);
            assertEqual(sessions.sessions.map((s) => s.transport), [args.transport], 'sessions the server lists for alice');
            await page.screenshot({ path: shot('1-roster') });
            return { shown, sessions: sessions.sessions, screenshot: shot('1-roster') };
        });

        await step('token_expires', async () => {
            const first = seen.credentials.find((c) => c.status === 200);
            const answer = await controller.request('expired', { token: first.token }, 40000);
            assert(answer.ok, `expired: ${answer.error}`);
            assert(answer.refused, `the expired token still logs in: ${JSON.stringify(answer)}`);
            // The live session does not depend on the token any more.
            assertEqual((await demo()).connected, true, 'still connected after the token expired');
            return { reason: answer.reason };
        }, 60000);

        await step('dropped_then_reconnected_with_fresh_credentials', async () => {
            const before = seen.credentials.filter((c) => c.status === 200).length;
            const firstToken = seen.credentials.find((c) => c.status === 200).token;
            const dropped = await controller.request('drop', {});
            assert(dropped.ok, `drop: ${dropped.error}`);
            assertEqual(dropped.ended.length, 1, 'sessions ended by the API');
            await page.waitForFunction(() => window.boshrosterDemo.reconnects >= 1 && window.boshrosterDemo.connected, null, { timeout: 40000 });
            // The response listener reads the body asynchronously: give it a moment.
            const fetchedOk = () => seen.credentials.filter((c) => c.status === 200);
            for (let i = 0; i < 50 && fetchedOk().length <= before; i++) await sleep(100);
            const fetched = fetchedOk();
            assert(fetched.length > before, `no new credentials fetched on reconnect (${fetched.length})`);
            const latest = fetched[fetched.length - 1];
            assert(latest.token !== firstToken, 'reconnected with the first (expired) token');
            const shown = await rosterShown();
            const sessions = await controller.request('sessions', {});
            assert(sessions.ok && sessions.sessions.length === 1, `sessions after the reconnect: ${JSON.stringify(sessions)}`);
            assert(sessions.sessions[0].jid !== dropped.ended[0] || sessions.sessions[0].since >= dropped.at,
                'the session listed is the one that was ended');
            assertEqual(await page.isVisible('#converse-login-password'), false, 'Converse login form visible');
            assertEqual(await page.evaluate(() => ({ shown: window.ssoLoginFormSeen, typed: window.ssoPasswordTyped })),
                { shown: false, typed: false }, 'Converse password field shown / typed into');
            await page.screenshot({ path: shot('2-reconnected') });
            return { state: await demo(), credentials_fetched: fetched.length, shown, sessions: sessions.sessions,
                console: seen.console.slice(0, 15), screenshot: shot('2-reconnected') };
        }, 60000);
    } finally {
        controller.close();
        if (browser) await browser.close().catch(() => {});
    }
    log(`credentials responses: ${JSON.stringify(seen.credentials.map((c) => c.status))}`);
    runner.finish();
    return runner.failed;
}

main().then((failed) => process.exit(failed ? 1 : 0), (err) => {
    log(`fatal: ${err.stack || err}`);
    process.exit(2);
});

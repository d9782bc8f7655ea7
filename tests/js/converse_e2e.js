#!/usr/bin/env node
'use strict';
/**
 * Converse.js (static/index.html, the demo page) in headless Debian Chromium, driven by
 * playwright-core (no browser download: it launches /usr/bin/chromium).
 *
 *   node tests/js/converse_e2e.js --page 'http://127.0.0.1:8000/?server=http://127.0.0.1:5280&transport=bosh' \
 *        --transport bosh --artifacts test-artifacts
 *
 * The page must come from another origin than the XMPP endpoint, so the browser applies
 * CORS to BOSH. Prints one JSON line per step (common.js protocol) and asks the Python
 * test, over stdout/stdin, to act as the other side:
 *   {"request": "bob_login"}                      log bob in with a raw client, go available
 *   {"request": "bob_send", "text": T}            bob sends T to alice
 *   {"request": "bob_expect", "text": T}          wait until bob got T from alice
 *   {"request": "refresh", "user", "contacts"}    change alice's contacts at the backend + refresh
 * Screenshots: <artifacts>/converse-<transport>-{1-roster,2-chat,3-refreshed}.png
 */

const path = require('node:path');
const { Controller, Runner, emit, log, assert, assertEqual, NAMES, TRICKY_TEXT } = require('./common');

function parseArgs(argv) {
    const args = { page: null, transport: 'bosh', artifacts: 'test-artifacts', chromium: '/usr/bin/chromium', user: 'alice', password: 'password', domain: 'localhost', only: null };
    for (let i = 2; i < argv.length; i += 2) {
        const key = argv[i].replace(/^--/, '');
        if (!(key in args)) throw new Error(`unknown option --${key}`);
        args[key] = argv[i + 1];
    }
    if (!args.page) throw new Error('--page URL is required');
    return args;
}

const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-dev-shm-usage'];

async function main() {
    const args = parseArgs(process.argv);
    const { chromium } = require('playwright-core');
    const runner = new Runner('converse', args);
    const controller = new Controller();
    const d = args.domain;
    const shot = (name) => path.join(args.artifacts, `converse-${args.transport}-${name}.png`);
    const pageOrigin = new URL(args.page).origin;
    const seen = { console: [], failedRequests: [], boshResponses: [], websockets: [] };
    let browser = null;
    let page = null;
    let broken = false;

    // Each step needs the ones before it: after a failure the rest report "not run".
    async function step(name, fn, ms = 30000) {
        if (broken) {
            emit({ scenario: name, client: 'converse', transport: args.transport, ok: false, error: 'not run: an earlier step failed' });
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

    try {
        await step('page_loads', async () => {
            browser = await chromium.launch({ executablePath: args.chromium, args: CHROMIUM_ARGS });
            const context = await browser.newContext({ viewport: { width: 1100, height: 720 }, locale: 'en-US' });
            page = await context.newPage();
            page.on('console', (m) => {
                if (['error', 'warning'].includes(m.type())) seen.console.push(`${m.type()}: ${m.text().slice(0, 400)}`);
            });
            page.on('pageerror', (e) => seen.console.push(`pageerror: ${e.message}`));
            page.on('requestfailed', (r) => seen.failedRequests.push(`${r.method()} ${r.url()} ${r.failure() && r.failure().errorText}`));
            page.on('response', async (r) => {
                if (r.url().includes('/http-bind')) {
                    seen.boshResponses.push({ status: r.status(), acao: (await r.allHeaders())['access-control-allow-origin'] || null });
                }
            });
            page.on('websocket', (ws) => seen.websockets.push(ws.url()));
            await page.goto(args.page);
            await page.waitForSelector('#converse-login-jid', { timeout: 20000 });
            const demo = await page.evaluate(() => window.boshrosterDemo);
            const endpoint = demo.settings.bosh_service_url || demo.settings.websocket_url;
            assert(new URL(endpoint.replace(/^ws/, 'http')).origin !== pageOrigin, `endpoint ${endpoint} is not cross-origin to ${pageOrigin}`);
            return { page_origin: pageOrigin, endpoint, transport: demo.transport };
        });

        await step('login_form', async () => {
            await page.fill('#converse-login-jid', args.user);
            await page.fill('#converse-login-password', args.password);
            await page.click('button[type=submit]');
            await page.waitForFunction(() => window.boshrosterDemo && window.boshrosterDemo.connected, null, { timeout: 20000 });
            // the control box names the logged-in user
            await page.waitForFunction((jid) => ((document.querySelector('converse-controlbox') || {}).textContent || '').includes(jid),
                `${args.user}@${d}`, { timeout: 10000 });
            return { connected: true };
        });

        await step('roster_names_and_group', async () => {
            const expected = Object.keys(NAMES).filter((u) => u !== args.user);
            for (const u of expected) {
                await page.waitForSelector(`converse-roster .roster-group[data-group="Friends"] a.open-chat[data-jid="${u}@${d}"]`, { timeout: 20000 });
            }
            const shown = {};
            for (const u of expected) {
                shown[u] = (await page.textContent(`${contact(`${u}@${d}`)} .contact-name`)).trim();
                assertEqual(shown[u], NAMES[u], `name shown for ${u}`);
            }
            await page.screenshot({ path: shot('1-roster') });
            return { group: 'Friends', shown, screenshot: shot('1-roster') };
        });

        await step('receive_message', async () => {
            const bob = await controller.request('bob_login', {});
            assert(bob.ok, `the test could not log bob in: ${bob.error}`);
            // bob's presence reaches alice's roster
            await page.waitForSelector(`converse-roster li[data-status="online"] ${contact(`bob@${d}`).replace('converse-roster ', '')}`, { timeout: 15000 });
            const sent = await controller.request('bob_send', { text: TRICKY_TEXT });
            assert(sent.ok, `bob could not send: ${sent.error}`);
            await page.click(contact(`bob@${d}`));
            const body = await page.waitForSelector(`converse-chat-message .chat-msg[data-from^="bob@${d}"] converse-chat-message-body`, { timeout: 15000 });
            assertEqual(await body.getAttribute('text'), TRICKY_TEXT, 'message text shown in the chat');
            return { shown: await body.getAttribute('text') };
        });

        await step('send_message', async () => {
            const reply = `${TRICKY_TEXT} (from Converse)`;
            await page.fill('textarea.chat-textarea', reply);
            await page.press('textarea.chat-textarea', 'Enter');
            const got = await controller.request('bob_expect', { text: reply });
            assert(got.ok, `bob did not get the reply: ${JSON.stringify(got)}`);
            assertEqual(got.body, reply, 'body bob received');
            await page.waitForSelector(`converse-chat-message .chat-msg[data-from^="${args.user}@${d}"] converse-chat-message-body`, { timeout: 10000 });
            await page.screenshot({ path: shot('2-chat') });
            return { bob_received: got.body, screenshot: shot('2-chat') };
        });

        await step('roster_refresh', async () => {
            const contacts = {
                [`bob@${d}`]: { name: NAMES.bob, groups: ['Friends'] },
                [`carol@${d}`]: { name: NAMES.carol, groups: ['Friends'] },
                [`erin@${d}`]: { name: 'Erin Example', groups: ['Colleagues'] },
            };
            const answer = await controller.request('refresh', { user: args.user, contacts });
            assert(answer.ok, `refresh failed: ${answer.error}`);
            await page.waitForSelector(`converse-roster .roster-group[data-group="Colleagues"] a.open-chat[data-jid="erin@${d}"]`, { timeout: 15000 });
            assertEqual((await page.textContent(`${contact(`erin@${d}`)} .contact-name`)).trim(), 'Erin Example', 'name of the new contact');
            await page.waitForSelector(contact(`dave@${d}`), { state: 'detached', timeout: 15000 });
            await page.screenshot({ path: shot('3-refreshed') });
            return { refresh: answer.reply, screenshot: shot('3-refreshed') };
        });

        await step('cross_origin', async () => {
            const corsErrors = seen.console.filter((m) => /CORS|Access-Control/i.test(m));
            assertEqual(corsErrors, [], 'CORS errors in the console');
            if (args.transport === 'bosh') {
                assert(seen.boshResponses.length > 3, `only ${seen.boshResponses.length} BOSH responses seen`);
                const bad = seen.boshResponses.filter((r) => r.status !== 200 || !(r.acao === pageOrigin || r.acao === '*'));
                assertEqual(bad, [], 'BOSH responses without status 200 and an Access-Control-Allow-Origin for the page');
            } else {
                assert(seen.websockets.some((u) => u.includes('/xmpp-websocket')), `no WebSocket opened: ${seen.websockets}`);
            }
            return {
                bosh_responses: seen.boshResponses.length,
                allow_origin: [...new Set(seen.boshResponses.map((r) => r.acao))],
                websockets: seen.websockets,
                console: seen.console.slice(0, 20),
                failed_requests: seen.failedRequests.slice(0, 20),
            };
        });
    } finally {
        controller.close();
        if (browser) await browser.close().catch(() => {});
    }
    runner.finish();
    return runner.failed;
}

main().then((failed) => process.exit(failed ? 1 : 0), (err) => {
    log(`fatal: ${err.stack || err}`);
    process.exit(2);
});

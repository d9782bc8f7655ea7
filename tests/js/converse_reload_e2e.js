#!/usr/bin/env node
'use strict';
/**
 * Continuity in the browser (issue 11): Converse.js in headless Chromium, signed in through the
 * demo app (single sign-on: the only mode where Converse can log in again after a reload without
 * a typed password), chats with bob (played by the Python test), and the page is reloaded.
 *
 *   node tests/js/converse_reload_e2e.js --app http://127.0.0.1:8008 --transport websocket --artifacts test-artifacts
 *
 * Steps (one JSON line each, common.js protocol):
 *   chat_before_reload            sign in, bob and alice exchange messages
 *   reload_keeps_the_session      reload while bob writes; over WebSocket the new page resumes the
 *                                 XEP-0198 session (<resume/> -> <resumed/>), over BOSH Converse's
 *                                 keepalive restores the BOSH session; bob never sees alice unavailable
 *   conversation_shown_after_reload  the chat shows every message once, the one sent during the
 *                                 reload included; Converse asked the archive (XEP-0313 query seen)
 *   second_device_gets_the_history  a fresh browser profile (no cached messages) signs in: the
 *                                 conversation comes from the archive alone
 * Requests to the Python test (stdout/stdin):
 *   {"request": "bob_login"}  {"request": "bob_send", "text"}  {"request": "bob_expect", "text"}
 *   {"request": "bob_seen"} -> {"unavailable": [...], "available": n}   presences of alice bob got
 *   {"request": "log", "pattern", "after", "timeout"} -> {"line", "lines"}  server log lines
 * Screenshots: <artifacts>/reload-<transport>-*.png
 */

const path = require('node:path');
const { Controller, Runner, emit, log, sleep, assert, assertEqual } = require('./common');

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
const BOB = 'bob@localhost';
const BEFORE = ['before the reload, one', 'before the reload, two'];
const REPLY = 'a reply from alice, before the reload';
// bob writes as the page unloads (in flight: the old page may or may not get it), a moment later,
// and once the server has seen the old connection go
const DURING = [1, 2, 3].map((n) => `written by bob while the page reloads (${n})`);
const AFTER = 'after the reload';

async function main() {
    const args = parseArgs(process.argv);
    const { chromium } = require('playwright-core');
    const runner = new Runner('converse-reload', args);
    const controller = new Controller();
    const shot = (name) => path.join(args.artifacts, `reload-${args.transport}-${name}.png`);
    const frames = [];  // {dir: 'out'|'in', text, at, page: n}: every XMPP frame or BOSH body of every page
    let pageNo = 0;
    let browser = null;
    let page = null;
    let broken = false;
    let logLines = 0;

    async function step(name, fn, ms = 60000) {
        if (broken) {
            emit({ scenario: name, client: 'converse-reload', transport: args.transport, ok: false, error: 'not run: an earlier step failed' });
            return;
        }
        const before = runner.failed;
        await runner.run(name, fn, ms);
        if (runner.failed > before) {
            broken = true;
            if (page) await page.screenshot({ path: shot(`failed-${name}`) }).catch(() => {});
        }
    }

    async function ask(kind, payload = {}, ms = 30000) {
        const answer = await controller.request(kind, payload, ms);
        assert(answer.ok, `${kind}: ${answer.error}`);
        return answer;
    }

    async function serverLog(pattern, seconds = 20) {
        const answer = await ask('log', { pattern, after: logLines, timeout: seconds }, seconds * 1000 + 5000);
        logLines = answer.lines;
        return answer.line;
    }

    /** Record what the page sends and gets: WebSocket frames, or BOSH request/response bodies. */
    function watch(p) {
        p.on('websocket', (ws) => {
            const n = pageNo;
            ws.on('framesent', (f) => frames.push({ dir: 'out', text: String(f.payload), at: Date.now(), page: n }));
            ws.on('framereceived', (f) => frames.push({ dir: 'in', text: String(f.payload), at: Date.now(), page: n }));
        });
        p.on('request', (r) => {
            if (r.url().includes('/http-bind') && r.postData()) frames.push({ dir: 'out', text: r.postData(), at: Date.now(), page: pageNo });
        });
        p.on('response', async (r) => {
            if (!r.url().includes('/http-bind')) return;
            const n = pageNo;
            try {
                frames.push({ dir: 'in', text: await r.text(), at: Date.now(), page: n });
            } catch (e) { /* the page went away with the response */ }
        });
        p.on('console', (m) => {
            if (['error', 'warning'].includes(m.type())) log(`console ${m.type()}: ${m.text().slice(0, 300)}`);
        });
        p.on('pageerror', (e) => log(`pageerror: ${e.message}`));
    }

    const sent = (n, re) => frames.filter((f) => f.page === n && f.dir === 'out' && re.test(f.text));
    const got = (n, re) => frames.filter((f) => f.page === n && f.dir === 'in' && re.test(f.text));
    const connected = () => page.waitForFunction(() => window.boshrosterDemo && window.boshrosterDemo.connected, null, { timeout: 40000 });

    async function signIn(context) {
        const p = await context.newPage();
        watch(p);
        await p.goto(`${args.app}/chat/?transport=${args.transport}`);
        await p.waitForSelector('#username', { timeout: 15000 });
        await p.fill('#username', args.user);
        await p.fill('#password', args.password);
        await p.click('#sign-in');
        await p.waitForURL((u) => u.pathname === '/chat/' && u.searchParams.get('credentials_url'), { timeout: 15000 });
        return p;
    }

    /** The message bodies shown in the open chat with bob, in order. */
    async function shownBodies(p) {
        return p.$$eval('converse-chat-message converse-chat-message-body', (els) => els.map((e) => e.getAttribute('text')));
    }

    async function openChatWithBob(p) {
        const link = `converse-roster a.open-chat[data-jid="${BOB}"]`;
        const open = await p.$('converse-chat .chat-textarea');
        if (!open) {
            await p.waitForSelector(link, { timeout: 20000 });
            await p.click(link);
        }
        await p.waitForSelector('converse-chat textarea.chat-textarea', { timeout: 15000 });
    }

    async function waitShown(p, texts, ms = 20000) {
        const deadline = Date.now() + ms;
        let shown = [];
        while (Date.now() < deadline) {
            shown = await shownBodies(p);
            if (texts.every((t) => shown.includes(t))) return shown;
            await sleep(250);
        }
        throw new Error(`not all shown after ${ms} ms: wanted ${JSON.stringify(texts)}, shown ${JSON.stringify(shown)}`);
    }

    /** How many copies of each text Converse keeps in the page's storage (IndexedDB and
     * sessionStorage): a diagnostic of its cache, reported in the step details. */
    async function storedCopies(p, texts) {
        return p.evaluate(async (wanted) => {
            const counts = Object.fromEntries(wanted.map((t) => [t, 0]));
            const visit = (value) => {
                const text = typeof value === 'string' ? value : JSON.stringify(value);
                for (const t of wanted) {
                    if (text && text.includes(`"body":${JSON.stringify(t)}`)) counts[t] += 1;
                }
            };
            for (let i = 0; i < sessionStorage.length; i++) visit(sessionStorage.getItem(sessionStorage.key(i)));
            const dbs = indexedDB.databases ? await indexedDB.databases() : [];
            for (const { name } of dbs) {
                const db = await new Promise((ok, ko) => {
                    const r = indexedDB.open(name);
                    r.onsuccess = () => ok(r.result);
                    r.onerror = () => ko(r.error);
                });
                for (const store of db.objectStoreNames) {
                    const values = await new Promise((ok) => {
                        const r = db.transaction(store).objectStore(store).getAll();
                        r.onsuccess = () => ok(r.result);
                        r.onerror = () => ok([]);
                    });
                    values.forEach(visit);
                }
                db.close();
            }
            return counts;
        }, texts);
    }

    let jidBefore = null;
    try {
        await step('chat_before_reload', async () => {
            browser = await chromium.launch({ executablePath: args.chromium, args: CHROMIUM_ARGS });
            const context = await browser.newContext({ viewport: { width: 1100, height: 720 }, locale: 'en-US' });
            page = await signIn(context);
            await connected();
            await ask('bob_login');
            await page.waitForSelector(`converse-roster li[data-status="online"] a.open-chat[data-jid="${BOB}"]`, { timeout: 20000 });
            for (const text of BEFORE) await ask('bob_send', { text });
            await openChatWithBob(page);
            await waitShown(page, BEFORE);
            await page.fill('textarea.chat-textarea', REPLY);
            await page.press('textarea.chat-textarea', 'Enter');
            await ask('bob_expect', { text: REPLY });
            const bound = await serverLog(`bound ${args.user}@localhost/`);
            jidBefore = /bound (\S+)/.exec(bound)[1];
            const detail = { jid: jidBefore };
            if (args.transport === 'websocket') {
                const enabled = got(0, /<enabled[^>]*urn:xmpp:sm:3/);
                assert(enabled.length === 1, `stream management not enabled: ${enabled.length} <enabled/>`);
                detail.enabled = enabled[0].text;
            }
            await sleep(1000);  // Converse stores asynchronously
            detail.stored_copies = await storedCopies(page, [...BEFORE, REPLY]);
            await page.screenshot({ path: shot('1-before') });
            return detail;
        }, 90000);

        await step('reload_keeps_the_session', async () => {
            pageNo = 1;
            const started = Date.now();
            // Reload; bob writes as the page goes, a moment later, and once the server has seen
            // the old connection go (WebSocket: the session hibernates; BOSH: a while later).
            const reloading = page.reload();
            await ask('bob_send', { text: DURING[0] });
            await sleep(100);
            await ask('bob_send', { text: DURING[1] });
            if (args.transport === 'websocket') {
                await serverLog(`${jidBefore} hibernating`, 15);
            } else {
                await sleep(300);
            }
            await ask('bob_send', { text: DURING[2] });
            await reloading;
            await connected();
            const detail = { ms: Date.now() - started };
            if (args.transport === 'websocket') {
                const resume = sent(1, /<resume[^>]*urn:xmpp:sm:3/);
                assert(resume.length === 1, `the reloaded page sent ${resume.length} <resume/>`);
                const answer = got(1, /<(resumed|failed)[^>]*urn:xmpp:sm:3/);
                assert(answer.length >= 1 && /<resumed/.test(answer[0].text), `answer to <resume/>: ${answer.map((f) => f.text)}`);
                detail.resume = resume[0].text;
                detail.resumed = answer[0].text;
                detail.server = await serverLog(`${jidBefore} resumed (`);
                assertEqual(sent(1, /urn:ietf:params:xml:ns:xmpp-bind/).length, 0, 'resource binds on the reloaded page');
            } else {
                // keepalive: Converse restores sid and rid from sessionStorage and attaches, so the
                // reloaded page neither authenticates nor binds again.
                assertEqual(sent(1, /<auth[^>]*xmpp-sasl/).length, 0, 'SASL <auth/> sent by the reloaded page');
                assertEqual(sent(1, /urn:ietf:params:xml:ns:xmpp-bind/).length, 0, 'resource binds on the reloaded page');
                detail.first_body = (sent(1, /<body/)[0] || {}).text;
            }
            const seen = await ask('bob_seen');
            assertEqual(seen.unavailable, [], 'unavailable presences of alice that bob got');
            return detail;
        }, 90000);

        await step('conversation_shown_after_reload', async () => {
            await openChatWithBob(page);
            const expected = [...BEFORE, REPLY, ...DURING];
            await waitShown(page, expected);
            await ask('bob_send', { text: AFTER });
            await waitShown(page, [...expected, AFTER]);
            await sleep(1500);  // a duplicate would show now
            const final = await shownBodies(page);
            const stored = await storedCopies(page, [...expected, AFTER]);
            // What crossed the reload (the session's retransmission, the archive's catch-up) and
            // what came after: once each.  What the old page had already stored comes back from
            // Converse's own cache: at least once (Converse 14 sometimes stores a live message and
            // its archived copy twice, same stanza-id; see the step's stored_copies).
            for (const text of [...DURING, AFTER]) {
                assertEqual(final.filter((t) => t === text).length, 1, `times "${text}" is shown`);
            }
            for (const text of [...BEFORE, REPLY]) {
                assert(final.includes(text), `"${text}" is not shown after the reload`);
            }
            const mam = sent(1, /urn:xmpp:mam:2/);
            assert(mam.length >= 1, 'the reloaded page never queried the archive (urn:xmpp:mam:2)');
            // How each message written during the reload reached a page: live (a message stanza on
            // the stream) or only as an archive result.  Over WebSocket, XEP-0198 puts each on the
            // stream once: to the old page if that page counted it in its 'h' (Converse counts a
            // stanza when it arrives, so one arriving during the unload is acknowledged by the
            // <resume h/> yet never shown: the archive brings it back), else resent to the new
            // page.  Over BOSH a stanza written into the request the unloading page abandoned
            // reaches no page live either; only the archive query brings it back.
            // (Playwright does not always report frames of a page that is unloading.)
            const delivery = {};
            for (const text of DURING) {
                const frames0 = (n) => frames.filter((f) => f.page === n && f.dir === 'in' && f.text.includes(text));
                const live = [0, 1].flatMap((n) => frames0(n).filter((f) => !f.text.includes('urn:xmpp:mam:2')).map(() => n));
                const archived = [0, 1].flatMap((n) => frames0(n).filter((f) => f.text.includes('urn:xmpp:mam:2')).map(() => n));
                delivery[text] = { live_on_pages: live, archive_results_on_pages: archived };
            }
            if (args.transport === 'websocket') {
                for (const text of DURING) {
                    const { live_on_pages: live, archive_results_on_pages: archived } = delivery[text];
                    assert(live.length <= 1, `"${text}" came on the stream ${live.length} times (pages ${live})`);
                    assert(live.length + archived.length >= 1, `"${text}" reached no page`);
                }
            }
            await page.screenshot({ path: shot('2-after') });
            return { shown: final, delivery, stored_copies: stored, mam_queries: mam.map((f) => f.text.slice(0, 400)) };
        });

        await step('second_device_gets_the_history', async () => {
            // A new browser profile: no sessionStorage, no IndexedDB, nothing cached.
            pageNo = 2;
            const context = await browser.newContext({ viewport: { width: 1100, height: 720 }, locale: 'en-US' });
            const other = await signIn(context);
            await other.waitForFunction(() => window.boshrosterDemo && window.boshrosterDemo.connected, null, { timeout: 40000 });
            await openChatWithBob(other);
            const all = [...BEFORE, REPLY, ...DURING, AFTER];
            await waitShown(other, all, 30000);
            const shown = await shownBodies(other);
            for (const text of all) assertEqual(shown.filter((t) => t === text).length, 1, `times "${text}" is shown`);
            assert(sent(2, /urn:xmpp:mam:2/).length >= 1, 'the second device never queried the archive');
            await other.screenshot({ path: shot('3-second-device') });
            return { shown };
        });
    } finally {
        controller.close();
        if (browser) await browser.close().catch(() => {});
    }
    const fs = require('node:fs');
    fs.writeFileSync(path.join(args.artifacts, `reload-${args.transport}-frames.jsonl`),
        frames.map((f) => JSON.stringify(f)).join('\n') + '\n');
    runner.finish();
    return runner.failed;
}

main().then((failed) => process.exit(failed ? 1 : 0), (err) => {
    log(`fatal: ${err.stack || err}`);
    process.exit(2);
});

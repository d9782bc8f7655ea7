'use strict';
/**
 * Shared plumbing for the real-client scenario scripts (strophe_scenarios.js,
 * xmppjs_scenarios.js): argument parsing, one JSON line per scenario on stdout,
 * an inbox to wait on, the stdin/stdout conversation with the Python test that
 * owns the roster backend, and the "vanishing client" child process.
 *
 * Output protocol (stdout, one JSON object per line):
 *   {"scenario": "login", "client": "strophe", "transport": "bosh", "ok": true, "ms": 123, "detail": {...}}
 *   {"scenario": "...", "ok": false, "error": "why"}
 *   {"request": "refresh", "id": 1, "user": "alice"}   the test changes alice's contacts at the
 *                                                      backend, POSTs /roster_admin/refresh and
 *                                                      answers on stdin: {"id": 1, "ok": true, ...}
 *   {"done": true, "passed": N, "failed": M}            last line
 * Diagnostics go to stderr.
 */

const { spawn } = require('node:child_process');
const { Console } = require('node:console');
const readline = require('node:readline');

// stdout carries only our JSON lines: whatever a library prints goes to stderr.
globalThis.console = new Console({ stdout: process.stderr, stderr: process.stderr });

const NS = {
    CLIENT: 'jabber:client',
    ROSTER: 'jabber:iq:roster',
    STANZAS: 'urn:ietf:params:xml:ns:xmpp-stanzas',
};

/** The text every message scenario sends: non-ASCII, XML-special characters, an astral emoji. */
const TRICKY_TEXT = 'héllo <&> "quotes" \'apos\' ]]> 😀';

/** What the demo backend (tests/conftest.py demo_contacts) gives each user. */
const NAMES = { alice: 'Alice Liddell', bob: 'Bob Builder', carol: 'Carol Danvers', dave: 'Dave Bowman' };

function parseArgs(argv) {
    const args = {
        transport: 'websocket',
        bosh: null,
        websocket: null,
        domain: 'localhost',
        password: 'password',
        only: null,             // comma-separated scenario names
        child: false,           // run as the vanishing client (see spawnVanishingClient)
        user: null,
        dropTimeout: 20000,     // ms the contact may take to notice a dropped client
        boshWait: 10,           // BOSH wait (s) the client asks for
    };
    for (let i = 2; i < argv.length; i++) {
        const key = argv[i].replace(/^--/, '');
        if (key === 'child') {
            args.child = true;
            continue;
        }
        const value = argv[++i];
        if (value === undefined) throw new Error(`--${key} needs a value`);
        switch (key) {
            case 'transport': args.transport = value; break;
            case 'bosh': args.bosh = value; break;
            case 'websocket': args.websocket = value; break;
            case 'domain': args.domain = value; break;
            case 'password': args.password = value; break;
            case 'only': args.only = value.split(','); break;
            case 'user': args.user = value; break;
            case 'drop-timeout': args.dropTimeout = Number(value); break;
            case 'bosh-wait': args.boshWait = Number(value); break;
            default: throw new Error(`unknown option --${key}`);
        }
    }
    if (!['bosh', 'websocket'].includes(args.transport)) throw new Error('--transport must be bosh or websocket');
    if (!args[args.transport]) throw new Error(`--${args.transport} URL is required for --transport ${args.transport}`);
    args.url = args[args.transport];
    return args;
}

function emit(obj) {
    process.stdout.write(JSON.stringify(obj) + '\n');
}

function log(...parts) {
    process.stderr.write(`[${new Date().toISOString().slice(11, 23)}] ${parts.join(' ')}\n`);
}

function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout(promise, ms, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function assert(condition, message) {
    if (!condition) throw new Error(message);
}

function assertEqual(actual, expected, what) {
    const a = JSON.stringify(actual);
    const e = JSON.stringify(expected);
    if (a !== e) throw new Error(`${what}: expected ${e}, got ${a}`);
}

/**
 * Things that arrived (stanzas, status changes), kept until a test waits for them.
 * wait(match) resolves with the first kept or future item for which match(item) is true.
 */
class Inbox {
    constructor(name) {
        this.name = name;
        this.items = [];
        this.waiters = [];
    }

    push(item) {
        for (const waiter of this.waiters) {
            if (!waiter.done && waiter.match(item)) {
                waiter.done = true;
                waiter.resolve(item);
                this.waiters = this.waiters.filter((w) => !w.done);
                return;
            }
        }
        this.items.push(item);
    }

    wait(match, ms, what) {
        const index = this.items.findIndex(match);
        if (index >= 0) return Promise.resolve(this.items.splice(index, 1)[0]);
        const waiter = { match, done: false };
        const promise = new Promise((resolve) => {
            waiter.resolve = resolve;
        });
        this.waiters.push(waiter);
        return withTimeout(promise, ms, `${this.name}: ${what}`).finally(() => {
            waiter.done = true;
            this.waiters = this.waiters.filter((w) => !w.done);
        });
    }
}

/** Requests to the Python test over stdout, answers over stdin. */
class Controller {
    constructor() {
        this.nextId = 1;
        this.pending = new Map();
        this.rl = null;
    }

    _listen() {
        if (this.rl) return;
        this.rl = readline.createInterface({ input: process.stdin });
        this.rl.on('line', (line) => {
            let msg;
            try {
                msg = JSON.parse(line);
            } catch (e) {
                log('controller: ignoring non-JSON line', line);
                return;
            }
            const resolve = this.pending.get(msg.id);
            if (resolve) {
                this.pending.delete(msg.id);
                resolve(msg);
            }
        });
    }

    request(kind, payload, ms = 20000) {
        this._listen();
        const id = this.nextId++;
        const answer = new Promise((resolve) => this.pending.set(id, resolve));
        emit({ request: kind, id, ...payload });
        return withTimeout(answer, ms, `the test's answer to the ${kind} request`);
    }

    close() {
        if (this.rl) this.rl.close();
    }
}

/**
 * Runs scenarios one after another, each with a time limit, and prints one line each.
 * A scenario is async (ctx) => detail; it registers clean-ups with ctx.defer(fn).
 */
class Runner {
    constructor(client, args) {
        this.client = client;
        this.args = args;
        this.passed = 0;
        this.failed = 0;
    }

    async run(name, fn, ms = 30000) {
        if (this.args.only && !this.args.only.includes(name)) return;
        const started = Date.now();
        const cleanups = [];
        const ctx = { defer: (f) => cleanups.push(f) };
        const line = { scenario: name, client: this.client, transport: this.args.transport };
        log(`--- ${name}`);
        try {
            const detail = await withTimeout(Promise.resolve().then(() => fn(ctx)), ms, `scenario ${name}`);
            Object.assign(line, { ok: true, ms: Date.now() - started }, detail === undefined ? {} : { detail });
            this.passed++;
        } catch (err) {
            Object.assign(line, { ok: false, ms: Date.now() - started, error: String(err && err.stack ? err.stack : err) });
            this.failed++;
        }
        for (const cleanup of cleanups.reverse()) {
            try {
                await withTimeout(Promise.resolve().then(cleanup), 8000, `clean-up of ${name}`);
            } catch (err) {
                log(`clean-up of ${name} failed: ${err}`);
            }
        }
        emit(line);
    }

    finish() {
        emit({ done: true, client: this.client, transport: this.args.transport, passed: this.passed, failed: this.failed });
    }
}

/**
 * Start this same script as a child that logs in as `user`, sends presence and
 * prints {"ready": jid}; kill() then ends it with SIGKILL, so its socket or its
 * held BOSH request vanishes without a logout.
 */
function spawnVanishingClient(script, args, user) {
    const argv = [script, '--child', '--user', user, '--transport', args.transport, '--domain', args.domain,
        '--password', args.password, '--bosh-wait', String(args.boshWait)];
    if (args.bosh) argv.push('--bosh', args.bosh);
    if (args.websocket) argv.push('--websocket', args.websocket);
    const child = spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'inherit'] });
    const ready = new Promise((resolve, reject) => {
        const rl = readline.createInterface({ input: child.stdout });
        rl.on('line', (line) => {
            try {
                const msg = JSON.parse(line);
                if (msg.ready) resolve(msg.ready);
                if (msg.error) reject(new Error(`child: ${msg.error}`));
            } catch (e) { /* not ours */ }
        });
        child.on('exit', (code, signal) => reject(new Error(`child exited (${code ?? signal}) before it was ready`)));
    });
    return {
        ready: withTimeout(ready, 20000, `child client ${user} logging in`),
        kill() {
            if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        },
    };
}

/** The roster items as plain objects, sorted by JID. */
function sortItems(items) {
    return items.sort((a, b) => (a.jid < b.jid ? -1 : a.jid > b.jid ? 1 : 0));
}

module.exports = {
    NS, NAMES, TRICKY_TEXT,
    parseArgs, emit, log, sleep, withTimeout, assert, assertEqual,
    Inbox, Controller, Runner, spawnVanishingClient, sortItems,
};

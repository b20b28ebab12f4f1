'use strict';
// The snapgate Node.js runtime loader, run by the guest agent (/init) as
// `node --openssl-config=/opt/snapgate/openssl.cnf /opt/snapgate/loader.js`
// inside the runtime root disk. Fd 3 is its control channel to the agent
// (guest/init/src/agent.rs, step 2): one line per message each way.
//
// 1. Refuses to load unless OpenSSL draws its random bytes through
//    snapgate's getrandom provider (openssl.cnf, getrandom-provider.c):
//    OpenSSL's own generators would otherwise be seeded here, before the
//    snapshot, and repeat their bytes in every clone. Refuses, too, a
//    Node.js major version whose caches of random bytes were not checked.
// 2. Replaces Math.random (see `random` below) and loads what most HTTP
//    apps need (http, crypto, ...), runs a few requests through a local
//    HTTP server (V8 compiles functions on first use), so a snapshot taken
//    now carries it warmed.
// 3. Says `loaded` on the control channel: the agent then reports the
//    runtime ready and the base snapshot can be taken.
// 4. Reads control messages. `{"type":"resumed","token":T}`: the VM was
//    resumed from a snapshot and its kernel generator reseeded; every
//    generator state this process holds is dropped (`dropGeneratorState`)
//    and `resumed T` is answered. `{"type":"start","dir":"/app","main":...,
//    "port":...,"env":{...}}`: the app starts (step 5). After the start,
//    while the app runs, resumed messages are answered the same way, and
//    `{"type":"freeze","token":T}`, which a per-app snapshot's template
//    gets right before its snapshot, is answered `frozen T`, after which
//    the thread blocks (no timer or callback of the app runs) until the
//    next resumed message: a clone's first JavaScript runs after it.
// 5. Drops every generator state, sets the environment (PORT among it),
//    changes into the app directory and runs the app's main module in this
//    same process as Node's own entry point (require.main is the app's
//    module; "type": "module" packages and .mjs files load as ES modules).
//    An error while loading is printed with its stack and ends the process
//    with status 1, as an uncaught error later does: the agent then stops
//    the VM, and the gateway reports the output. Variables Node reads only
//    when it starts (NODE_OPTIONS, ...) cannot be set per app: the runtime
//    started long before, in the template; asking for one fails the start,
//    saying so.
//
// What an app gets: crypto (randomBytes, randomUUID, randomInt, keys, TLS)
// draws from the clone's own reseeded kernel generator; Math.random is
// fresh in each clone. What remains the snapshot's, shared by every clone:
// V8's hash seed, the Math.random of realms the app makes itself with the
// vm module (V8 seeds them from a generator of its own that no JavaScript
// can reseed), and, with a per-app snapshot, whatever the app computed
// before the snapshot.

const fs = require('fs');
const net = require('net');
const path = require('path');
const crypto = require('crypto');

const CONTROL = 3;

// Step 1. The provider announces itself in the environment when OpenSSL
// makes one of its generators with it (getrandom-provider.c); Node.js has
// made OpenSSL's primary one by now, and this draw makes the public one.
crypto.randomBytes(1);
if (process.env.SNAPGATE_OPENSSL_RAND !== 'getrandom') {
    console.error('snapgate-loader: OpenSSL in this runtime does not draw its random bytes ' +
        'through snapgate\'s getrandom provider, so every clone would repeat the bytes of ' +
        'OpenSSL\'s generators as the snapshot froze them: start node with ' +
        '--openssl-config=/opt/snapgate/openssl.cnf (snapgate.exec in the runtime\'s cmdline), ' +
        'whose [random] section selects the provider');
    process.exit(1);
}
// dropGeneratorState relies on the sizes of Node's caches of random bytes
// and on the ways into them, read in Node.js 18's lib/; another major
// version must be checked before it is trusted.
const TESTED_NODE_MAJORS = ['18'];
if (!TESTED_NODE_MAJORS.includes(process.versions.node.split('.')[0])) {
    console.error(`snapgate-loader: Node.js ${process.version} is not one this loader was ` +
        `checked with (${TESTED_NODE_MAJORS.join(', ')}): its caches of random bytes may not ` +
        'be the sizes the loader drops on each resume');
    process.exit(1);
}

// Step 2. V8's Math.random keeps its generator state in the heap, seeded
// when the process started: every clone would return the same sequence,
// and V8 has no reseed call reachable from JavaScript. This replacement
// draws 53 random bits per number from OpenSSL (so from the kernel,
// through the provider), through a small pool that is dropped whenever the
// VM resumes. Same property attributes, name and length as the built-in.
const pool = new Uint32Array(128);
let next = pool.length;
function random() {
    if (next >= pool.length) {
        crypto.randomFillSync(pool);
        next = 0;
    }
    const high = pool[next++] >>> 5; // 27 bits
    const low = pool[next++] >>> 6; // 26 bits
    return (high * 67108864 + low) / 9007199254740992; // / 2^53: [0, 1)
}
Object.defineProperty(Math, 'random', {
    value: random, writable: true, enumerable: false, configurable: true,
});

// Node caches random bytes in JavaScript for two calls
// (lib/internal/crypto/random.js): randomUUID keeps a batch of 128 UUIDs'
// bytes, refilled when the batch wraps; randomInt a 6 KiB cache of 6-byte
// draws, refilled when used up. Neither cache can be reached from here.
// Every way into them is wrapped to note that the app used it since they
// were last dropped (dropGeneratorState cycles only those, which costs
// milliseconds under software emulation): crypto.randomUUID, the
// webcrypto Crypto's randomUUID and URL.createObjectURL share the first,
// crypto.randomInt alone uses the second (Node 18's lib/ has no other
// callers). The wrappers keep their originals' names, lengths and
// property attributes, and ES module imports of node:crypto see them.
const touched = { uuid: false, int: false };
function noteUse(owner, name, cache) {
    const original = owner[name];
    const wrapper = {
        [name](...args) {
            touched[cache] = true;
            return Reflect.apply(original, this, args);
        },
    }[name];
    Object.defineProperty(wrapper, 'length', { value: original.length });
    Object.defineProperty(owner, name, {
        ...Object.getOwnPropertyDescriptor(owner, name), value: wrapper,
    });
}
noteUse(crypto, 'randomUUID', 'uuid');
noteUse(crypto, 'randomInt', 'int');
noteUse(Object.getPrototypeOf(crypto.webcrypto), 'randomUUID', 'uuid');
noteUse(URL, 'createObjectURL', 'uuid');
require('module').syncBuiltinESMExports();

// Drops every generator state this process holds in its own memory. The
// kernel's generator was reseeded before this runs, and OpenSSL holds
// none (step 1). A cache of Node's the app used is cycled through its
// whole size, which makes it refill (or run dry, and refill at its next
// use) from the reseeded generator.
function dropGeneratorState() {
    next = pool.length;
    if (touched.uuid) {
        for (let i = 0; i < 128; i++) crypto.randomUUID();
    }
    if (touched.int) {
        for (let i = 0; i < 1024; i++) crypto.randomInt(1);
    }
    touched.uuid = false;
    touched.int = false;
}

for (const m of ['http', 'https', 'net', 'events', 'stream', 'url', 'util',
    'zlib', 'os', 'child_process', 'querystring', 'buffer']) {
    require(m);
}

// Control-channel bytes received and not yet split into lines (bytes, so
// that a character split across two reads stays whole).
let pending = Buffer.alloc(0);
function takeLine() {
    const i = pending.indexOf(10);
    if (i < 0) return null;
    const line = pending.toString('utf8', 0, i);
    pending = pending.subarray(i + 1);
    return line;
}

// A line from the control channel, blocking this thread until one comes
// (before the app starts, and while frozen, when the channel is
// non-blocking); null when the channel closed.
function readLine() {
    const buf = Buffer.alloc(4096);
    for (;;) {
        const line = takeLine();
        if (line !== null) return line;
        let n;
        try {
            n = fs.readSync(CONTROL, buf, 0, buf.length, null);
        } catch (e) {
            if (e.code !== 'EAGAIN' && e.code !== 'EINTR') throw e;
            pause(1);
            continue;
        }
        if (n === 0) return null;
        pending = Buffer.concat([pending, buf.subarray(0, n)]);
    }
}

// A resumed message: drop every generator state, then answer.
function answerResumed(msg) {
    dropGeneratorState();
    say(`resumed ${msg.token}`);
}

async function warmUp() {
    const http = require('http');
    const server = http.createServer((req, res) => {
        res.setHeader('content-type', 'text/plain');
        res.end('warm\n');
    });
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    const { port } = server.address();
    for (let i = 0; i < 5; i++) {
        await new Promise((resolve, reject) => {
            http.get({ host: '127.0.0.1', port, path: '/', agent: false }, (res) => {
                res.resume();
                res.on('end', resolve);
            }).on('error', reject);
        });
    }
    await new Promise((resolve) => server.close(resolve));
    // The module loaders an app goes through: CommonJS and ES modules.
    const dir = fs.mkdtempSync('/tmp/snapgate-warm-');
    fs.writeFileSync(path.join(dir, 'a.js'), "module.exports = require('path').join('a', 'b');\n");
    fs.writeFileSync(path.join(dir, 'b.mjs'), "import path from 'node:path';\nexport default path.sep;\n");
    require(path.join(dir, 'a.js'));
    await import(path.join(dir, 'b.mjs'));
    fs.rmSync(dir, { recursive: true, force: true });
}

warmUp().catch((e) => {
    // A failed warm-up costs speed, not correctness.
    console.error(`snapgate-loader: warm-up failed: ${e && e.stack ? e.stack : e}`);
}).then(() => setImmediate(serve));

function parse(line) {
    try {
        return JSON.parse(line);
    } catch (e) {
        console.error(`snapgate-loader: control message is not JSON (${e.message}): ${line}`);
        return {};
    }
}

// Steps 3 and 4.
function serve() {
    say('loaded');
    for (;;) {
        const line = readLine();
        if (line === null) {
            console.error('snapgate-loader: the control channel closed before a start message');
            process.exit(1);
        }
        const msg = parse(line);
        if (msg.type === 'resumed') {
            answerResumed(msg);
        } else if (msg.type === 'start') {
            start(msg);
            return;
        } else {
            console.error(`snapgate-loader: unknown control message: ${line}`);
        }
    }
}

// A sleep that blocks this thread: no JavaScript runs meanwhile.
const sleeper = new Int32Array(new SharedArrayBuffer(4));
function pause(ms) {
    Atomics.wait(sleeper, 0, 0, ms);
}

// Writes one line to the control channel, synchronously (the channel is
// non-blocking once the app runs; the lines are short).
function say(line) {
    const bytes = Buffer.from(`${line}\n`);
    let done = 0;
    while (done < bytes.length) {
        try {
            done += fs.writeSync(CONTROL, bytes, done);
        } catch (e) {
            if (e.code !== 'EAGAIN' && e.code !== 'EINTR') throw e;
            pause(1);
        }
    }
}

// Freeze (step 4): answers, then keeps this thread, and so every timer and
// callback of the app, from running until a resumed message comes: the
// snapshot is taken meanwhile, so a clone runs no JavaScript of the app
// before its kernel generator is reseeded and this process's generator
// state dropped.
function freezeUntilResumed(token) {
    say(`frozen ${token}`);
    for (;;) {
        const line = readLine();
        if (line === null) {
            console.error('snapgate-loader: the control channel closed while frozen');
            process.exit(1);
        }
        const msg = parse(line);
        if (msg.type === 'resumed') {
            answerResumed(msg);
            return;
        }
        console.error(`snapgate-loader: unexpected control message while frozen: ${line}`);
    }
}

// Control messages while the app runs (step 4).
function answerControl() {
    const channel = new net.Socket({ fd: CONTROL, readable: true, writable: false });
    // The channel alone does not keep the process alive.
    channel.unref();
    const consume = () => {
        let line;
        while ((line = takeLine()) !== null) {
            const msg = parse(line);
            if (msg.type === 'resumed') {
                answerResumed(msg);
            } else if (msg.type === 'freeze') {
                freezeUntilResumed(msg.token);
            } else {
                console.error(`snapgate-loader: unexpected control message: ${line}`);
            }
        }
    };
    channel.on('data', (chunk) => {
        pending = Buffer.concat([pending, chunk]);
        consume();
    });
    channel.on('error', (e) => {
        console.error(`snapgate-loader: control channel: ${e.message}`);
    });
    consume();
}

const READ_AT_STARTUP = ['NODE_OPTIONS', 'NODE_PATH', 'NODE_EXTRA_CA_CERTS',
    'NODE_ICU_DATA', 'NODE_PRESERVE_SYMLINKS', 'UV_THREADPOOL_SIZE', 'OPENSSL_CONF'];

// Step 5.
function start(msg) {
    const main = path.resolve(msg.dir, msg.main);
    // The gateway reports the app's output from this line on.
    console.log(`snapgate-loader: starting ${main} on port ${msg.port}`);
    const late = Object.keys(msg.env || {}).filter((k) => READ_AT_STARTUP.includes(k));
    if (late.length > 0) {
        console.error(`snapgate-loader: ${late.join(', ')}: Node.js reads these only when ` +
            'it starts, and this runtime started before the snapshot; they cannot be set per app');
        process.exit(1);
    }
    dropGeneratorState();
    answerControl();
    for (const [k, v] of Object.entries(msg.env || {})) {
        process.env[k] = String(v);
    }
    process.env.PORT = String(msg.port);
    process.chdir(msg.dir);
    process.argv[1] = main;
    process.argv.length = 2;
    // Node's own entry point: sets require.main, picks CommonJS or ES
    // module loading; an error is uncaught, printed, and ends the process.
    require('module').runMain();
}

'use strict';
// The snapgate Node.js runtime loader, run by the guest agent (/init) as
// `node /opt/snapgate/loader.js` inside the runtime root disk.
//
// 1. Loads what most HTTP apps need (the runtime itself, http, crypto, ...)
//    and runs a few requests through a local HTTP server (V8 compiles
//    functions on first use), so a snapshot taken now carries it warmed.
// 2. Says `snapgate-loader: loaded` on stdout: the agent then reports the
//    runtime ready and the base snapshot can be taken.
// 3. Blocks reading one JSON line on stdin: the start message the agent
//    writes when the gateway claims this instance for an app, e.g.
//    {"dir":"/app","main":"server.js","port":8080,"env":{"K":"V"}}.
// 4. Sets the environment (PORT among it), changes into the app directory
//    and runs the app's main module in this same process as Node's own
//    entry point (require.main is the app's module; "type": "module"
//    packages and .mjs files load as ES modules). An error while loading is
//    printed with its stack and ends the process with status 1, as an
//    uncaught error later does: the agent then stops the VM, and the
//    gateway reports the output. Variables Node reads only when it starts
//    (NODE_OPTIONS, ...) cannot be set per app: the runtime started long
//    before, in the template; asking for one fails the start, saying so.

const fs = require('fs');
const path = require('path');
for (const m of ['http', 'https', 'net', 'events', 'stream', 'url', 'util',
    'crypto', 'zlib', 'os', 'child_process', 'querystring', 'buffer']) {
    require(m);
}

function readLine(fd) {
    const chunks = [];
    const buf = Buffer.alloc(4096);
    for (;;) {
        let n;
        try {
            n = fs.readSync(fd, buf, 0, buf.length, null);
        } catch (e) {
            if (e.code === 'EAGAIN' || e.code === 'EINTR') continue;
            throw e;
        }
        if (n === 0) return null;
        const i = buf.subarray(0, n).indexOf(10);
        if (i >= 0) {
            chunks.push(Buffer.from(buf.subarray(0, i)));
            return Buffer.concat(chunks).toString('utf8');
        }
        chunks.push(Buffer.from(buf.subarray(0, n)));
    }
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
}).then(() => setImmediate(startWhenTold));

const READ_AT_STARTUP = ['NODE_OPTIONS', 'NODE_PATH', 'NODE_EXTRA_CA_CERTS',
    'NODE_ICU_DATA', 'NODE_PRESERVE_SYMLINKS', 'UV_THREADPOOL_SIZE'];

function startWhenTold() {
    fs.writeSync(1, 'snapgate-loader: loaded\n');
    const line = readLine(0);
    if (line === null) {
        console.error('snapgate-loader: no start message (stdin closed)');
        process.exit(1);
    }
    const start = JSON.parse(line);
    const main = path.resolve(start.dir, start.main);
    // The gateway reports the app's output from this line on.
    console.log(`snapgate-loader: starting ${main} on port ${start.port}`);
    const late = Object.keys(start.env || {}).filter((k) => READ_AT_STARTUP.includes(k));
    if (late.length > 0) {
        console.error(`snapgate-loader: ${late.join(', ')}: Node.js reads these only when ` +
            'it starts, and this runtime started before the snapshot; they cannot be set per app');
        process.exit(1);
    }
    for (const [k, v] of Object.entries(start.env || {})) {
        process.env[k] = String(v);
    }
    process.env.PORT = String(start.port);
    process.chdir(start.dir);
    process.argv[1] = main;
    process.argv.length = 2;
    // Node's own entry point: sets require.main, picks CommonJS or ES
    // module loading; an error is uncaught, printed, and ends the process.
    require('module').runMain();
}

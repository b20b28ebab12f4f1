'use strict';
// The Node.js demo app of proxy.yaml (node.localhost). It runs in a clone
// of the Node.js runtime snapshot: snapgate attached this directory, packed
// as a read-only disk, when the request that woke it arrived.
const crypto = require('crypto');
const http = require('http');
const os = require('os');

const startedAt = new Date();
// Drawn when the app starts: every instance has its own (snapgate reseeds
// each clone's generators before its app starts).
const instance = crypto.randomBytes(4).toString('hex');
let served = 0;

http.createServer((req, res) => {
    if (req.url === '/healthz') {
        // snapgate's readiness probe (ready_path in proxy.yaml).
        res.end('ok\n');
        return;
    }
    served += 1;
    const body = [
        `Hello from Node.js ${process.version} in a snapgate microVM.`,
        `instance ${instance}, app started: ${startedAt.toISOString()} (uptime ${process.uptime().toFixed(2)}s)`,
        `a random number of its own: ${Math.random()}`,
        `requests served by this instance: ${served}`,
        `greeting from proxy.yaml: ${process.env.GREETING || '(none)'}`,
        `you asked for: ${req.method} ${req.url}`,
        `kernel: ${os.release()}`,
        '',
    ].join('\n');
    res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
    res.end(body);
}).listen(Number(process.env.PORT), () => {
    console.log(`demo app listening on ${process.env.PORT}`);
});

'use strict';
// The edge-case app of tests/edge_vm.rs, run in the Node.js runtime.
//
// Every request is read whole, then answered with one line describing what
// the app received:
//
//   method=POST url=/x len=70001 sha256=<hex> te=chunked cl=- conn=3
//   conn_requests=2 seen=1 instance=<hex> keep_alive_timeout=1000
//
// - len and sha256: the body exactly as the app read it;
// - te and cl: the framing headers the app got (- when absent);
// - conn: which of the app's own TCP connections carried it (numbered from
//   1 as they are accepted), conn_requests: its request number on that
//   connection;
// - seen: how often this app instance got this method and URL;
// - instance: drawn once when the app starts.
//
// keepAliveTimeout = 1000: Node sends `Keep-Alive: timeout=1` and closes
// a connection that was idle for 1 s.
const crypto = require('crypto');
const http = require('http');

const instance = crypto.randomBytes(4).toString('hex');
const seen = new Map();
let connections = 0;

const server = http.createServer((req, res) => {
    const hash = crypto.createHash('sha256');
    let len = 0;
    req.on('data', (chunk) => {
        len += chunk.length;
        hash.update(chunk);
    });
    // A client that goes away mid-body (the gateway cut it off): nothing
    // to answer.
    req.on('error', () => {});
    req.on('end', () => {
        const key = `${req.method} ${req.url}`;
        seen.set(key, (seen.get(key) || 0) + 1);
        req.socket.edgeRequests += 1;
        const line = [
            `method=${req.method}`,
            `url=${req.url}`,
            `len=${len}`,
            `sha256=${hash.digest('hex')}`,
            `te=${req.headers['transfer-encoding'] || '-'}`,
            `cl=${req.headers['content-length'] || '-'}`,
            `conn=${req.socket.edgeId}`,
            `conn_requests=${req.socket.edgeRequests}`,
            `seen=${seen.get(key)}`,
            `instance=${instance}`,
            `keep_alive_timeout=${server.keepAliveTimeout}`,
        ].join(' ');
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end(`${line}\n`);
    });
});
server.on('connection', (socket) => {
    connections += 1;
    socket.edgeId = connections;
    socket.edgeRequests = 0;
});
server.keepAliveTimeout = 1000;
server.listen(Number(process.env.PORT), () => {
    console.log(`edge app listening on ${process.env.PORT}`);
});

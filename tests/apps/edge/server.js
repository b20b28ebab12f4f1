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
// WebSocket (RFC 6455) echo on any path: each text or binary message comes
// back as it was sent; a ping gets its pong; a close is answered and the
// connection ends. Written out here because Node.js has no WebSocket server
// built in, and the app's code disk carries no packages.
server.on('upgrade', (req, socket) => {
    const key = req.headers['sec-websocket-key'];
    if ((req.headers.upgrade || '').toLowerCase() !== 'websocket' || !key) {
        socket.end('HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n');
        return;
    }
    const accept = crypto
        .createHash('sha1')
        .update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11')
        .digest('base64');
    socket.write(
        'HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n' +
            `sec-websocket-accept: ${accept}\r\nx-instance: ${instance}\r\n\r\n`,
    );
    let buf = Buffer.alloc(0);
    socket.on('error', () => {});
    socket.on('data', (chunk) => {
        buf = Buffer.concat([buf, chunk]);
        for (;;) {
            if (buf.length < 2) return;
            const opcode = buf[0] & 0x0f;
            let len = buf[1] & 0x7f;
            let at = 2;
            if (len === 126) {
                if (buf.length < 4) return;
                len = buf.readUInt16BE(2);
                at = 4;
            } else if (len === 127) {
                if (buf.length < 10) return;
                len = Number(buf.readBigUInt64BE(2));
                at = 10;
            }
            const masked = (buf[1] & 0x80) !== 0;
            const mask = masked ? buf.subarray(at, at + 4) : null;
            if (masked) at += 4;
            if (buf.length < at + len) return;
            const payload = Buffer.from(buf.subarray(at, at + len));
            buf = buf.subarray(at + len);
            if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4];
            if (opcode === 0x8) {
                socket.end(frame(0x8, payload.subarray(0, 2)));
                return;
            }
            if (opcode === 0x9) socket.write(frame(0xa, payload));
            else if (opcode === 0x1 || opcode === 0x2) socket.write(frame(opcode, payload));
        }
    });
});

// One unmasked, final frame (servers do not mask, RFC 6455 section 5.1).
function frame(opcode, payload) {
    let head;
    if (payload.length < 126) {
        head = Buffer.from([0x80 | opcode, payload.length]);
    } else if (payload.length < 65536) {
        head = Buffer.alloc(4);
        head[0] = 0x80 | opcode;
        head[1] = 126;
        head.writeUInt16BE(payload.length, 2);
    } else {
        head = Buffer.alloc(10);
        head[0] = 0x80 | opcode;
        head[1] = 127;
        head.writeBigUInt64BE(BigInt(payload.length), 2);
    }
    return Buffer.concat([head, payload]);
}

server.keepAliveTimeout = 1000;
server.listen(Number(process.env.PORT), () => {
    console.log(`edge app listening on ${process.env.PORT}`);
});

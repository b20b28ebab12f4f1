'use strict';
// gRPC Echo server over h2c (insecure, HTTP/2 with prior knowledge) on
// 127.0.0.1; prints `listening <port>` once bound. Port from argv[2]
// (0: any).
const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const proto = grpc.loadPackageDefinition(
    loader.loadSync(path.join(__dirname, 'echo.proto')),
).snapgate.test;

const authority = (call) => call.getHost();

const server = new grpc.Server();
server.addService(proto.Echo.service, {
    Say(call, done) {
        done(null, { text: call.request.text, authority: authority(call) });
    },
    Count(call) {
        for (let i = 1; i <= call.request.count; i++) {
            call.write({ text: `${call.request.text} ${i}`, authority: authority(call) });
        }
        call.end();
    },
});
server.bindAsync(
    `127.0.0.1:${process.argv[2] || 0}`,
    grpc.ServerCredentials.createInsecure(),
    (err, port) => {
        if (err) throw err;
        console.log(`listening ${port}`);
    },
);

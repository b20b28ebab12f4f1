'use strict';
// gRPC Echo client: one unary call and one server-streaming call to
// argv[2] (host:port) for the authority argv[3]; over TLS when argv[4]
// names a CA file (the certificate checked for argv[3]), else h2c.
// Prints one JSON line: { say, count } or { error }.
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const proto = grpc.loadPackageDefinition(
    loader.loadSync(path.join(__dirname, 'echo.proto')),
).snapgate.test;
const [target, authority, ca] = process.argv.slice(2);
const creds = ca
    ? grpc.credentials.createSsl(fs.readFileSync(ca))
    : grpc.credentials.createInsecure();
const options = { 'grpc.default_authority': authority };
if (ca) options['grpc.ssl_target_name_override'] = authority;
const client = new proto.Echo(target, creds, options);
const deadline = () => new Date(Date.now() + 20000);

client.Say({ text: 'hello' }, { deadline: deadline() }, (err, say) => {
    if (err) {
        console.log(JSON.stringify({ error: `Say: ${err.code} ${err.details}` }));
        process.exit(1);
    }
    const count = [];
    const stream = client.Count({ count: 5, text: 'n' }, { deadline: deadline() });
    stream.on('data', (note) => count.push(note.text));
    stream.on('error', (e) => {
        console.log(JSON.stringify({ error: `Count: ${e.code} ${e.details}` }));
        process.exit(1);
    });
    stream.on('end', () => {
        console.log(JSON.stringify({ say, count }));
        client.close();
    });
});

//! The request path's edge cases against a real app in a real VM: the
//! Node.js app of `tests/apps/edge/` (it reads every body whole and
//! answers with what it received) run in the Node.js runtime, in real QEMU
//! clones on real taps, behind the real gateway, with clients on raw TCP
//! connections where framing matters. Items of the behaviour contract:
//! 1 (upstream keep-alive), 3 (request framing), 6 (stalled bodies).
#![cfg(feature = "vm-tests")]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::runtime::app_entry;
use common::*;
use sha2::{Digest, Sha256};
use snapgate::testing::{runtime_gateway_config, shared_snapshot_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Under TCG a runtime clone takes ~10 s to start; a runtime snapshot that
/// must be rebuilt first takes much longer.
const WARM: Duration = Duration::from_secs(240);
/// Longest a warm app may take to answer one request.
const ANSWER: Duration = Duration::from_secs(60);

/// The edge app's code directory.
fn edge_code() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/edge")
}

/// A gateway with the Node.js runtime (no clone kept in stock) and one app
/// of the edge code, `app` on `<app>.test`, with `pool`; `top` is YAML
/// text of extra top-level keys.
async fn start(prefix: &str, app: &str, pool: &str, top: &str) -> TestGateway {
    let gw = launch(prefix, app, pool, top).await;
    gw.until(app, "one warm instance", WARM, |s| {
        s.instances == 1 && s.restoring == 0
    })
    .await;
    gw
}

/// [`start`] without waiting for an instance.
async fn launch(prefix: &str, app: &str, pool: &str, top: &str) -> TestGateway {
    let state = tempfile::tempdir().unwrap();
    let apps = app_entry(app, &edge_code(), "", pool);
    // The harness writes and loads the config; the extra top-level keys go
    // in front of it, and it is loaded again.
    runtime_gateway_config(state.path(), prefix, 0, &apps, &shared_snapshot_dir());
    let file = state.path().join("proxy.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("{top}{text}")).unwrap();
    let cfg = snapgate::config::Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    TestGateway::start(state, &cfg).await
}

/// What the edge app answered, by key (`method`, `len`, `sha256`, ...).
fn field<'a>(answer: &'a str, key: &str) -> &'a str {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {answer:?}"))
}

fn sha256(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// `len` bytes of a fixed pseudo-random sequence (every byte value occurs,
/// CR and LF included).
fn body_of(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A response read off a raw connection.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads more of `conn` into `buf`; EOF is an error.
async fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 16384];
    let n = conn.read(&mut chunk).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// One CRLF-terminated line of `buf` (read from `conn` as needed), without
/// its CRLF.
async fn line(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<String> {
    loop {
        if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..at]).into_owned();
            buf.drain(..at + 2);
            return Ok(line);
        }
        fill(conn, buf).await?;
    }
}

/// Reads one response (skipping any 1xx) from `conn`; `buf` holds bytes
/// read past the previous response. The body is decoded by its framing:
/// chunked, Content-Length, or until the connection closes.
async fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Response> {
    loop {
        let (status, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut head = httparse::Response::new(&mut slots);
            match head.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = head.code.unwrap();
                    let headers: Vec<(String, String)> = head
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    buf.drain(..n);
                    break (status, headers);
                }
                Ok(httparse::Status::Partial) => fill(conn, buf).await?,
                Err(e) => {
                    return Err(std::io::Error::other(format!(
                        "bad response head ({e}): {:?}",
                        String::from_utf8_lossy(buf)
                    )))
                }
            }
        };
        if (100..200).contains(&status) {
            continue;
        }
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if resp
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            loop {
                let size_line = line(conn, buf).await?;
                let size = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16).map_err(|e| {
                    std::io::Error::other(format!("bad chunk size {size_line:?}: {e}"))
                })?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !line(conn, buf).await?.is_empty() {}
                    break;
                }
                while buf.len() < size + 2 {
                    fill(conn, buf).await?;
                }
                resp.body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.trim().parse().map_err(std::io::Error::other)?;
            while buf.len() < len {
                fill(conn, buf).await?;
            }
            resp.body = buf.drain(..len).collect();
        } else {
            loop {
                match fill(conn, buf).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            resp.body = std::mem::take(buf);
        }
        return Ok(resp);
    }
}

/// A client connection to the gateway, on raw TCP.
struct Client {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(gw: &TestGateway) -> Client {
        let conn = TcpStream::connect(gw.running().listen).await.unwrap();
        conn.set_nodelay(true).unwrap();
        Client {
            conn,
            buf: Vec::new(),
        }
    }

    /// Writes `pieces` one `write` each (so a body goes out in several
    /// segments).
    async fn send(&mut self, pieces: &[Vec<u8>]) -> std::io::Result<()> {
        for piece in pieces {
            self.conn.write_all(piece).await?;
            self.conn.flush().await?;
        }
        Ok(())
    }

    /// The next response, within `within`.
    async fn response(&mut self, within: Duration) -> Result<Response, String> {
        match tokio::time::timeout(within, read_response(&mut self.conn, &mut self.buf)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(format!("reading the response: {e}")),
            Err(_) => Err(format!("no response within {within:?}")),
        }
    }

    /// Sends `pieces` and reads the response.
    async fn exchange(&mut self, pieces: &[Vec<u8>]) -> Result<Response, String> {
        self.send(pieces)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        self.response(ANSWER).await
    }
}

/// A request with `body` framed by `Content-Length`, as one piece.
fn with_length(method: &str, host: &str, path: &str, body: &[u8]) -> Vec<Vec<u8>> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    vec![req]
}

/// A request with `body` sent chunked: the head, then one piece per chunk
/// (sizes 1, 7, 4096, then the rest; the second chunk with a chunk
/// extension), then the last chunk.
fn chunked(method: &str, host: &str, path: &str, body: &[u8]) -> Vec<Vec<u8>> {
    let mut pieces = vec![format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes()];
    let mut rest = body;
    for (i, size) in [1usize, 7, 4096, usize::MAX].into_iter().enumerate() {
        let n = size.min(rest.len());
        if n == 0 {
            break;
        }
        let ext = if i == 1 { ";edge=1" } else { "" };
        let mut piece = format!("{n:x}{ext}\r\n").into_bytes();
        piece.extend_from_slice(&rest[..n]);
        piece.extend_from_slice(b"\r\n");
        pieces.push(piece);
        rest = &rest[n..];
    }
    pieces.push(b"0\r\n\r\n".to_vec());
    pieces
}

/// Checks that the app answered 200 and read `method` and exactly `body`.
fn check_echo(resp: &Response, method: &str, body: &[u8]) -> Result<String, String> {
    let text = resp.text();
    if resp.status != 200 {
        return Err(format!("status {}: {text:?}", resp.status));
    }
    let (got_method, len, hash) = (
        field(&text, "method"),
        field(&text, "len"),
        field(&text, "sha256"),
    );
    if got_method != method || len != body.len().to_string() || hash != sha256(body) {
        return Err(format!(
            "sent {method} with {} bytes (sha256 {}), the app read: {text:?}",
            body.len(),
            sha256(body)
        ));
    }
    Ok(text)
}

/// Item 1: the app closes every connection idle for 1 s (Node.js with
/// `keepAliveTimeout = 1000`, which also sends `Keep-Alive: timeout=1`).
/// One client connection sends GETs 1.2 s apart, a POST 1.2 s later, then
/// GETs at spacings around the app's 1 s: every one gets 200, the POST
/// reached the app exactly once, and the client connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_closing_connections_idle_for_1s_serves_requests_1_2s_apart() {
    let gw = start("sgev1", "edge1", "{ min_warm: 1, max_instances: 1 }", "").await;
    let mut client = Client::connect(&gw).await;
    let get = |path: &str| with_length("GET", "edge1.test", path, b"");

    let mut conns = Vec::new();
    for i in 0..5 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        let resp = client
            .exchange(&get(&format!("/spaced/{i}")))
            .await
            .unwrap_or_else(|e| panic!("GET {i} (1.2 s after the previous one): {e}"));
        let text = check_echo(&resp, "GET", b"")
            .unwrap_or_else(|e| panic!("GET {i} (1.2 s after the previous one): {e}"));
        assert_eq!(field(&text, "keep_alive_timeout"), "1000", "{text}");
        conns.push(field(&text, "conn").to_owned());
    }
    // The app really did close its side each time: every request came to
    // it on a connection of its own.
    for pair in conns.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "the app served two requests 1.2 s apart on one connection: {conns:?}"
        );
    }

    // A POST, 1.2 s after the last GET: on a fresh upstream connection,
    // seen once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let body = body_of(10_000, 1);
    let resp = client
        .exchange(&with_length("POST", "edge1.test", "/spaced/post", &body))
        .await
        .unwrap_or_else(|e| panic!("POST 1.2 s after a GET: {e}"));
    let text = check_echo(&resp, "POST", &body).unwrap_or_else(|e| panic!("POST: {e}"));
    assert_eq!(
        field(&text, "seen"),
        "1",
        "the app saw the POST once: {text}"
    );

    // Around the app's own 1 s, in 1 ms steps from 980 to 1019 ms: the
    // gateway must not hand a request to a connection the app is closing
    // at that moment (or must retry it). A gateway that reused the app's
    // kept-alive connection until it saw it close answered 502 here, at
    // 1000-1002 ms.
    let mut failures = Vec::new();
    for (i, ms) in (980u64..1020).enumerate() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        match client
            .exchange(&get(&format!("/around/{i}")))
            .await
            .and_then(|r| check_echo(&r, "GET", b""))
        {
            Ok(_) => {}
            Err(e) if e.starts_with("sending") || e.starts_with("reading") => {
                panic!("the gateway closed the client connection at GET {i} ({ms} ms after the previous): {e}")
            }
            Err(e) => failures.push(format!("GET {i}, {ms} ms after the previous: {e}")),
        }
    }
    assert!(failures.is_empty(), "failed: {failures:#?}");
    drop(client);
    gw.stop().await;
}

/// One request of [`request_bodies_reach_the_app_whole_for_every_method_and_framing`].
struct Case {
    name: String,
    method: &'static str,
    /// The body the app must read.
    body: Vec<u8>,
    /// The request as written, piece by piece.
    pieces: Vec<Vec<u8>>,
}

/// Item 3: a body reaches the app exactly as sent, chunked or with
/// Content-Length, for GET, POST, PUT, DELETE and OPTIONS; an empty body
/// stays empty. Each request on its own connection, then all of them on
/// one kept-alive connection (so each body must end exactly where its
/// framing says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_reach_the_app_whole_for_every_method_and_framing() {
    let gw = start("sgev3", "edge3", "{ min_warm: 1, max_instances: 1 }", "").await;
    let host = "edge3.test";
    let mut cases: Vec<Case> = Vec::new();
    for (i, method) in ["GET", "POST", "PUT", "DELETE", "OPTIONS"]
        .into_iter()
        .enumerate()
    {
        let body = body_of(70_001 + i, i as u64 + 10);
        let path = format!("/chunked/{method}");
        cases.push(Case {
            name: format!("{method} chunked, {} bytes", body.len()),
            method,
            body: body.clone(),
            pieces: chunked(method, host, &path, &body),
        });
        let path = format!("/length/{method}");
        cases.push(Case {
            name: format!("{method} Content-Length, {} bytes", body.len()),
            method,
            pieces: with_length(method, host, &path, &body),
            body,
        });
    }
    // Empty bodies: none at all, Content-Length: 0, a chunked body of only
    // its last chunk.
    cases.push(Case {
        name: "GET, no body".into(),
        method: "GET",
        body: Vec::new(),
        pieces: vec![format!("GET /empty HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()],
    });
    cases.push(Case {
        name: "POST Content-Length: 0".into(),
        method: "POST",
        body: Vec::new(),
        pieces: with_length("POST", host, "/empty", b""),
    });
    cases.push(Case {
        name: "GET chunked, empty".into(),
        method: "GET",
        body: Vec::new(),
        pieces: chunked("GET", host, "/empty", b""),
    });

    let mut failures = Vec::new();
    for case in &cases {
        let mut client = Client::connect(&gw).await;
        if let Err(e) = client
            .exchange(&case.pieces)
            .await
            .and_then(|r| check_echo(&r, case.method, &case.body))
        {
            failures.push(format!("{}: {e}", case.name));
        }
    }
    let mut client = Client::connect(&gw).await;
    for case in &cases {
        let result = client.exchange(&case.pieces).await;
        let broken = result.is_err();
        if let Err(e) = result.and_then(|r| check_echo(&r, case.method, &case.body)) {
            failures.push(format!("{}, on one kept-alive connection: {e}", case.name));
        }
        if broken {
            break;
        }
    }
    assert!(failures.is_empty(), "failed: {failures:#?}");
    drop(client);
    gw.stop().await;
}

/// Item 6: with one instance taking two requests at once, two clients
/// that announce a 1,000,000-byte body and send one byte hold both slots
/// until `body_read_timeout` (2 s): then each gets 408 and its slot is
/// freed, and a healthy GET held behind them gets 200 from the same
/// instance, which still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_get_408_and_free_their_slots_for_a_held_request() {
    let gw = start(
        "sgev6",
        "edge6",
        "{ min_warm: 1, max_instances: 1, max_concurrency: 2, hold_timeout: 20s }",
        "body_read_timeout: 2s\n",
    )
    .await;
    let (status, before) = gw.get("edge6.test", "/before").await;
    assert_eq!(status, 200, "{before}");
    let instance = field(&before, "instance").to_owned();

    // Both slots, to two stalled uploads.
    let claims = "snapgate_claims_total{app=\"edge6\",outcome=\"warm\"}";
    let claimed = gw.metric(claims).await;
    let mut stalled = Vec::new();
    for i in 0..2 {
        let mut client = Client::connect(&gw).await;
        client
            .send(&[format!(
                "POST /stalled/{i} HTTP/1.1\r\nHost: edge6.test\r\nContent-Length: 1000000\r\n\r\nx"
            )
            .into_bytes()])
            .await
            .unwrap();
        stalled.push((client, Instant::now()));
    }
    wait_for(
        "both stalled uploads to hold an instance slot",
        Duration::from_secs(30),
        async || gw.metric(claims).await >= claimed + 2.0,
    )
    .await;

    // The healthy GET waits for a slot...
    let healthy = {
        let req = gw
            .request("edge6.test", "/healthy")
            .timeout(Duration::from_secs(60));
        tokio::spawn(async move {
            let sent = Instant::now();
            let resp = req.send().await.expect("the gateway answers");
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap(), sent.elapsed())
        })
    };
    gw.until(
        "edge6",
        "the healthy GET to be held",
        Duration::from_secs(10),
        |s| s.queued == 1,
    )
    .await;

    // ...the stalled uploads are cut with a 408 at body_read_timeout...
    for (i, (client, sent)) in stalled.iter_mut().enumerate() {
        let resp = client
            .response(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("stalled upload {i}: {e}"));
        let waited = sent.elapsed();
        assert_eq!(resp.status, 408, "stalled upload {i}: {}", resp.text());
        assert!(
            resp.text().starts_with("snapgate: "),
            "stalled upload {i}: {:?}",
            resp.text()
        );
        assert!(
            waited >= Duration::from_millis(1900) && waited < Duration::from_secs(15),
            "stalled upload {i}: 408 after {waited:?}, body_read_timeout is 2 s"
        );
    }
    // ...and the held GET gets their slot.
    let (status, text, took) = tokio::time::timeout(Duration::from_secs(30), healthy)
        .await
        .expect("the healthy GET is answered once the stalled uploads are cut")
        .unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(field(&text, "url"), "/healthy", "{text}");
    eprintln!("healthy GET held behind two stalled uploads: 200 after {took:?}");

    // The instance was not broken by the cut-off exchanges: the same one
    // takes two requests at once again.
    let stats = gw.pool("edge6").stats();
    assert_eq!((stats.instances, stats.draining), (1, 0), "{stats:?}");
    let (a, b) = tokio::join!(
        gw.get("edge6.test", "/after/a"),
        gw.get("edge6.test", "/after/b")
    );
    for (status, text) in [a, b] {
        assert_eq!(status, 200, "{text}");
        assert_eq!(field(&text, "instance"), instance, "{text}");
    }
    drop(stalled);
    gw.stop().await;
}

/// The value of the series `name{app="<app>"}` on the gateway's registry.
fn app_metric(gw: &TestGateway, name: &str, app: &str) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&gw.running().registry.gather())
        .unwrap();
    let series = format!("{name}{{app=\"{app}\"");
    text.lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A WebSocket echo (the edge app's) through
/// the gateway to an app at zero with `idle_timeout: 2s`. The handshake
/// wakes an instance; the connection stays open and echoes across three
/// idle timeouts, the instance is not reaped meanwhile, and the upgraded
/// connection shows in the metrics; once closed, the instance is reaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_to_a_vm_app_outlives_its_idle_timeout_and_holds_its_instance() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

    let app = "edgews";
    // An hour's upstream_read_timeout (an app-level key after the pool's):
    // the tunnel can only end below by the app's close, not by going idle.
    let gw = launch(
        "sgevw",
        app,
        "{ min_warm: 0, max_instances: 1, idle_timeout: 2s }\n    upstream_read_timeout: 1h",
        "",
    )
    .await;
    let mut request = format!("ws://{}/chat", gw.running().listen)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", format!("{app}.test").parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(WARM, tokio_tungstenite::connect_async(request))
        .await
        .expect("the handshake within the cold start")
        .expect("the WebSocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    assert!(
        resp.headers().contains_key("x-instance"),
        "not the app's 101"
    );
    assert_eq!(app_metric(&gw, "snapgate_upgraded_connections", app), 1.0);
    assert_eq!(app_metric(&gw, "snapgate_upgrades_total", app), 1.0);

    for round in 0..4 {
        if round > 0 {
            // Quiet for longer than the pool's idle_timeout (2 s).
            tokio::time::sleep(Duration::from_secs(3)).await;
            let s = gw.pool(app).stats();
            assert_eq!(
                (s.instances, s.leased, s.stopping),
                (1, 1, 0),
                "round {round}: the instance with an open WebSocket was not kept: {s:?}"
            );
        }
        let text = format!("hello {round} {}", "x".repeat(200 * round));
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(ANSWER, ws.next())
            .await
            .expect("the echo in time")
            .expect("the connection open")
            .expect("a message");
        assert_eq!(echoed, Message::text(text), "round {round}");
    }
    ws.send(Message::Binary(vec![0u8, 159, 255, 10, 13].into()))
        .await
        .unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed, Message::Binary(vec![0u8, 159, 255, 10, 13].into()));
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}

    // The app closed its side after the close handshake; the client keeps
    // its socket open (`ws` lives on): the tunnel ends all the same.
    wait_for("the tunnel to end", ANSWER, async || {
        app_metric(&gw, "snapgate_upgraded_connections", app) == 0.0
    })
    .await;
    // Nothing holds the instance now: the reaper takes it.
    gw.until(
        app,
        "the instance reaped once the WebSocket closed",
        ANSWER,
        |s| s.instances == 0 && s.stopping == 0,
    )
    .await;
    gw.stop().await;
}

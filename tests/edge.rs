//! The request path's edge behaviour (issue 10's contract, items 1-10) for
//! static apps, end to end: a real gateway; real upstreams on loopback (raw
//! tokio servers that record the exact request they received, head bytes,
//! headers and decoded body, and misbehave on request: close idle
//! connections, read a request then close unanswered, reset, stall; and a
//! Python `http.server` speaking HTTP/1.0); real clients (raw TCP where the
//! input is malformed on purpose, reqwest, Python's `http.client`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

// ---------------------------------------------------------------------------
// HTTP/1.1 on the wire, for the test clients and the test upstreams.
// ---------------------------------------------------------------------------

/// Header lines as received, in order, names as sent.
type Headers = Vec<(String, String)>;

/// Every value of header `name` (case-insensitive), one per line, in order.
fn values<'a>(headers: &'a Headers, name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn collect(parsed: &[httparse::Header<'_>]) -> Headers {
    parsed
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn eof(where_: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("connection ended {where_}"),
    )
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A TCP stream with a read buffer.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
        }
    }

    async fn connect(addr: SocketAddr) -> Wire {
        Wire::new(
            TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connect {addr}: {e}")),
        )
    }

    /// A connection to `addr` from local address `from`.
    async fn connect_from(from: &str, addr: SocketAddr) -> Wire {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(format!("{from}:0").parse().unwrap())
            .unwrap_or_else(|e| panic!("bind {from}: {e}"));
        Wire::new(
            socket
                .connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connect {addr} from {from}: {e}")),
        )
    }

    /// Reads more into the buffer; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next message head, blank line included; `None` at an end of
    /// stream before its first byte.
    async fn head(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                return Ok(Some(self.buf.drain(..end + 4).collect()));
            }
            if self.fill().await? == 0 {
                return match self.buf.is_empty() {
                    true => Ok(None),
                    false => Err(eof("in a message head")),
                };
            }
        }
    }

    /// `n` bytes onto `out` (what arrived stays there on failure).
    async fn take(&mut self, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let mut left = n;
        loop {
            let k = left.min(self.buf.len());
            out.extend(self.buf.drain(..k));
            left -= k;
            if left == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(eof("in a body"));
            }
        }
    }

    /// One line, without its CRLF.
    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                return Ok(self.buf.drain(..i + 2).take(i).collect());
            }
            if self.fill().await? == 0 {
                return Err(eof("in a chunked body"));
            }
        }
    }

    /// A chunked body, decoded onto `out` (trailers read and dropped).
    async fn chunked(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let line = self.line().await?;
            let text = String::from_utf8_lossy(&line).into_owned();
            let size = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size line {text:?}")))?;
            if size == 0 {
                while !self.line().await?.is_empty() {}
                return Ok(());
            }
            self.take(size, out).await?;
            if !self.line().await?.is_empty() {
                return Err(invalid("no CRLF after a chunk".into()));
            }
        }
    }

    /// Everything up to the end of the stream.
    async fn until_close(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            out.append(&mut self.buf);
            if self.fill().await? == 0 {
                return Ok(());
            }
        }
    }

    /// Writes `bytes`; a write error is ignored (a server may answer and
    /// close before it read everything: what it answered is still read).
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }
}

/// How a message's body is delimited.
enum Framing {
    Chunked,
    Length(usize),
    /// To the end of the stream (responses only).
    Close,
}

fn is_chunked(headers: &Headers) -> bool {
    values(headers, "transfer-encoding")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(headers: &Headers) -> Option<usize> {
    values(headers, "content-length")
        .first()
        .map(|v| v.trim().parse().expect("a numeric Content-Length"))
}

/// A response as a client saw it.
#[derive(Debug)]
struct Resp {
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    version: u8,
    status: u16,
    headers: Headers,
    body: Vec<u8>,
    /// The body ended as its framing says (false: the connection ended or
    /// broke first; `body` holds what arrived).
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        values(&self.headers, name).first().copied()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts this is one of snapgate's own answers: `status`, text/plain,
    /// a body starting `snapgate: `.
    fn assert_snapgate(&self, status: u16, what: &str) {
        assert_eq!(self.status, status, "{what}: {self:?}");
        let ctype = self.header("content-type").unwrap_or("");
        assert!(
            ctype.starts_with("text/plain"),
            "{what}: snapgate's answers are text/plain, got {ctype:?}"
        );
        assert!(
            self.text().starts_with("snapgate: "),
            "{what}: snapgate's answers start `snapgate: `, got {:?}",
            self.text()
        );
    }
}

/// Reads one response from `w` (a response to HEAD has no body).
async fn read_response(w: &mut Wire, head_request: bool) -> io::Result<Resp> {
    let head = w.head().await?.ok_or_else(|| eof("before a response"))?;
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Response::new(&mut slots);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        other => {
            return Err(invalid(format!(
                "bad response head ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            )))
        }
    }
    let status = parsed.code.unwrap_or(0);
    let version = parsed.version.unwrap_or(1);
    let headers = collect(parsed.headers);
    let framing = if head_request || status < 200 || status == 204 || status == 304 {
        Framing::Length(0)
    } else if is_chunked(&headers) {
        Framing::Chunked
    } else if let Some(n) = content_length(&headers) {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let mut body = Vec::new();
    let complete = match framing {
        Framing::Length(n) => w.take(n, &mut body).await.is_ok(),
        Framing::Chunked => w.chunked(&mut body).await.is_ok(),
        Framing::Close => w.until_close(&mut body).await.is_ok(),
    };
    Ok(Resp {
        version,
        status,
        headers,
        body,
        complete,
    })
}

/// `f`, or a panic naming `what` after `limit`.
async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {limit:?}"))
}

/// Sends `request` on `w` and reads its response (5 s at most).
async fn exchange(w: &mut Wire, request: &[u8]) -> Resp {
    w.send(request).await;
    let line =
        String::from_utf8_lossy(&request[..find(request, b"\r\n").unwrap_or(0)]).into_owned();
    within(
        Duration::from_secs(5),
        &format!("response to {line:?}"),
        read_response(w, request.starts_with(b"HEAD ")),
    )
    .await
    .unwrap_or_else(|e| panic!("response to {line:?}: {e}"))
}

/// `request` on a new connection to `addr`.
async fn once(addr: SocketAddr, request: &[u8]) -> Resp {
    exchange(&mut Wire::connect(addr).await, request).await
}

fn get(path: &str, host: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

fn post(path: &str, host: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// `n` bytes of a pattern that is not all one byte.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// `body` chunked in chunks of `sizes` (cycled), last chunk included.
fn chunked(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    for n in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let n = (*n).min(rest.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

// ---------------------------------------------------------------------------
// Upstreams.
// ---------------------------------------------------------------------------

/// One request an upstream read in full.
#[derive(Clone, Debug)]
struct Seen {
    /// The upstream connection it came on (numbered from 0).
    conn: usize,
    /// 1 for the first request on its connection.
    nth: usize,
    /// The head as received.
    head: String,
    method: String,
    target: String,
    headers: Headers,
    /// The body, decoded from its framing.
    body: Vec<u8>,
}

impl Seen {
    fn values(&self, name: &str) -> Vec<&str> {
        values(&self.headers, name)
    }
}

#[derive(Clone, Debug, Default)]
struct Log {
    /// Connections accepted.
    conns: usize,
    /// Targets whose head arrived.
    heads: Vec<String>,
    /// Requests read in full.
    seen: Vec<Seen>,
    /// Targets whose body ended early (the gateway closed or reset).
    broken: Vec<String>,
}

impl Log {
    fn of(&self, target: &str) -> Vec<&Seen> {
        self.seen.iter().filter(|s| s.target == target).collect()
    }
}

/// How a raw upstream misbehaves, besides what its paths ask for.
#[derive(Clone, Default)]
struct Mode {
    /// Close a connection idle (between requests) this long.
    idle_close: Option<Duration>,
    /// Answer with `Connection: keep-alive` and `Keep-Alive: timeout=N`.
    keep_alive: Option<u64>,
    /// A request arriving on a connection idle at least this long is read,
    /// then the connection closed unanswered: the app closed the connection
    /// just as the request came.
    stale_after: Option<Duration>,
    /// Only a connection's first request is answered; a later one is read,
    /// then the connection closed unanswered.
    one_per_conn: bool,
    /// Answer with a chunked body instead of a Content-Length one.
    chunked_answers: bool,
}

/// Size of the `/big` answer.
const BIG: usize = 64 << 20;

/// A raw upstream on loopback. Every request is recorded in `log`; by its
/// path:
/// - `/drop*`: the connection is closed unanswered;
/// - `/reset*`: the connection is reset unanswered;
/// - `/hold*`: answered once `release` turns true;
/// - a prefix of [`CANNED`]: its answer, then what it says;
/// - `/big*`: a 200 of [`BIG`] zero bytes;
/// - `/empty-answer*`: 200 with an empty body;
/// - else: 200 with body `<method> <target>` (chunked in
///   [`Mode::chunked_answers`], else with Content-Length).
struct Upstream {
    addr: SocketAddr,
    log: watch::Sender<Log>,
    release: watch::Sender<bool>,
}

impl Upstream {
    async fn start(mode: Mode) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (log, _) = watch::channel(Log::default());
        let (release, _) = watch::channel(false);
        let (l, r) = (log.clone(), release.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                l.send_modify(|log| log.conns += 1);
                tokio::spawn(serve_raw(
                    Wire::new(stream),
                    n,
                    mode.clone(),
                    l.clone(),
                    r.clone(),
                ));
                n += 1;
            }
        });
        Upstream { addr, log, release }
    }

    fn log(&self) -> Log {
        self.log.borrow().clone()
    }

    /// The log once `cond` holds; panics naming `what` after 5 s.
    async fn wait(&self, what: &str, mut cond: impl FnMut(&Log) -> bool) -> Log {
        let mut rx = self.log.subscribe();
        within(Duration::from_secs(5), what, async move {
            rx.wait_for(|l| cond(l)).await.map(|l| l.clone()).unwrap()
        })
        .await
    }

    /// The one request with `target`; panics if there is not exactly one.
    fn only(&self, target: &str) -> Seen {
        let log = self.log();
        let seen = log.of(target);
        assert_eq!(
            seen.len(),
            1,
            "the upstream should have read exactly one request for {target}, got {seen:#?}"
        );
        seen[0].clone()
    }
}

/// What a canned answer's connection does next.
enum Then {
    /// Serves its next request.
    Next,
    /// Sends nothing more for 30 s, then closes.
    Stall,
    /// Closes 300 ms later, unread.
    CloseSoon,
}

/// Answers written as they are, by path prefix (see [`Upstream`]).
const CANNED: &[(&str, &[u8], Then)] = &[
    (
        "/stall-chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        Then::Stall,
    ),
    (
        "/stall-length",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
        Then::Stall,
    ),
    (
        "/switch",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        Then::Stall,
    ),
    (
        "/trailers",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n2\r\nok\r\n0\r\nX-Sum: 1\r\n\r\n",
        Then::Next,
    ),
    (
        "/both-framings",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
        Then::Next,
    ),
    (
        "/gzip-chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n",
        Then::Next,
    ),
    (
        "/chunked-gzip",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nzz",
        Then::CloseSoon,
    ),
    (
        "/then-close",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        Then::CloseSoon,
    ),
];

async fn serve_raw(
    mut w: Wire,
    conn: usize,
    mode: Mode,
    log: watch::Sender<Log>,
    release: watch::Sender<bool>,
) {
    let mut nth = 0;
    let mut last = Instant::now();
    loop {
        if w.buf.is_empty() {
            let first = match mode.idle_close {
                Some(idle) => match tokio::time::timeout(idle, w.fill()).await {
                    Ok(read) => read,
                    Err(_) => return, // idle too long: close it
                },
                None => w.fill().await,
            };
            if !matches!(first, Ok(n) if n > 0) {
                return;
            }
        }
        let idle = last.elapsed();
        let Ok(Some(head)) = w.head().await else {
            return;
        };
        nth += 1;
        let mut slots = vec![httparse::EMPTY_HEADER; 512];
        let mut parsed = httparse::Request::new(&mut slots);
        if !matches!(parsed.parse(&head), Ok(httparse::Status::Complete(_))) {
            return;
        }
        let method = parsed.method.unwrap_or("").to_owned();
        let target = parsed.path.unwrap_or("").to_owned();
        let headers = collect(parsed.headers);
        log.send_modify(|l| l.heads.push(target.clone()));
        let mut body = Vec::new();
        let read = if is_chunked(&headers) {
            w.chunked(&mut body).await
        } else {
            let n = values(&headers, "content-length")
                .first()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            w.take(n, &mut body).await
        };
        if read.is_err() {
            log.send_modify(|l| l.broken.push(target.clone()));
            return;
        }
        log.send_modify(|l| {
            l.seen.push(Seen {
                conn,
                nth,
                head: String::from_utf8_lossy(&head).into_owned(),
                method: method.clone(),
                target: target.clone(),
                headers,
                body,
            })
        });
        if nth > 1 && (mode.one_per_conn || mode.stale_after.is_some_and(|d| idle >= d)) {
            return;
        }
        let path = target.as_str();
        if path.starts_with("/drop") {
            return;
        }
        if path.starts_with("/reset") {
            let _ = w.stream.set_zero_linger();
            return;
        }
        if path.starts_with("/hold") {
            let mut rx = release.subscribe();
            let _ = rx.wait_for(|r| *r).await;
        }
        if let Some((_, answer, then)) = CANNED.iter().find(|(p, ..)| path.starts_with(p)) {
            let _ = w.stream.write_all(answer).await;
            match then {
                Then::Next => {
                    last = Instant::now();
                    continue;
                }
                Then::Stall => tokio::time::sleep(Duration::from_secs(30)).await,
                // The app closes a moment later without reading what
                // arrived meanwhile (the kernel resets the connection).
                Then::CloseSoon => tokio::time::sleep(Duration::from_millis(300)).await,
            }
            return;
        }
        if path.starts_with("/big") {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
            if w.stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let zeros = vec![0u8; 256 * 1024];
            let mut left = BIG;
            while left > 0 {
                let n = left.min(zeros.len());
                if w.stream.write_all(&zeros[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
        } else {
            let text = match path.starts_with("/empty-answer") {
                true => String::new(),
                false => format!("{method} {target}"),
            };
            let mut answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n".to_owned();
            if let Some(t) = mode.keep_alive {
                answer += &format!("Connection: keep-alive\r\nKeep-Alive: timeout={t}\r\n");
            }
            if mode.chunked_answers {
                answer += "Transfer-Encoding: chunked\r\n\r\n";
                if !text.is_empty() {
                    answer += &format!("{:x}\r\n{text}\r\n", text.len());
                }
                answer += "0\r\n\r\n";
            } else {
                answer += &format!("Content-Length: {}\r\n\r\n{text}", text.len());
            }
            if w.stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
        last = Instant::now();
    }
}

/// Python's `http.server` with its default `protocol_version` (HTTP/1.0:
/// one request per connection). `/nolen*` answers have no Content-Length
/// (the body ends with the connection). Prints its port.
const PY_HTTP10: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("python " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if not self.path.startswith("/nolen"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
s.daemon_threads = True
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// A Python HTTP/1.0 upstream, killed when dropped.
struct PyUpstream {
    addr: SocketAddr,
    _child: tokio::process::Child,
}

async fn python_http10_upstream() -> PyUpstream {
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(PY_HTTP10)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run python3");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let port = within(Duration::from_secs(10), "python's port", lines.next_line())
        .await
        .expect("read python's stdout")
        .expect("python printed its port");
    PyUpstream {
        addr: SocketAddr::from(([127, 0, 0, 1], port.trim().parse().unwrap())),
        _child: child,
    }
}

/// Python's `http.client` POSTing `size` bytes (Content-Length) for each of
/// `sizes`, each on a new connection; prints each status or the error.
const PY_POST: &str = r#"
import http.client, sys
port, host, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for size in sys.argv[4:]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=b"x" * int(size),
                     headers={"Host": host, "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        print(resp.status, flush=True)
    except Exception as e:
        print("error", type(e).__name__, e, flush=True)
    finally:
        conn.close()
"#;

/// What Python's `http.client` got for POSTs of `sizes` bytes.
async fn python_posts(gw: SocketAddr, host: &str, path: &str, sizes: &[usize]) -> Vec<String> {
    let out = within(
        Duration::from_secs(20),
        "python's POSTs",
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(PY_POST)
            .arg(gw.port().to_string())
            .arg(host)
            .arg(path)
            .args(sizes.iter().map(|s| s.to_string()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run python3");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// The gateway.
// ---------------------------------------------------------------------------

struct Gw {
    run: snapgate::gateway::Running,
    _state: tempfile::TempDir,
}

impl std::ops::Deref for Gw {
    type Target = snapgate::gateway::Running;
    fn deref(&self) -> &Self::Target {
        &self.run
    }
}

/// A gateway with top-level keys `top` (YAML lines) and `apps` (entries made
/// by [`app`]).
async fn gateway(top: &str, apps: &[String]) -> Gw {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("proxy.yaml");
    std::fs::write(
        &file,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{}shutdown_grace: 1s\n\
             state_dir: {}\nnetwork: {{ tap_prefix: sged }}\n{top}apps:\n{}",
            match top.contains("header_read_timeout") {
                true => "",
                false => "header_read_timeout: 2s\n",
            },
            state.path().display(),
            apps.concat()
        ),
    )
    .unwrap();
    let config = snapgate::config::Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let run = snapgate::gateway::start(&config, &mut std::io::sink())
        .await
        .unwrap();
    Gw { run, _state: state }
}

/// A static app `name` on `host` at `upstream`; `extra` are more of its keys
/// (`key: value`).
fn app(name: &str, host: &str, upstream: SocketAddr, extra: &[&str]) -> String {
    let mut s = format!(
        "  {name}:\n    hosts: [{host}]\n    upstream: {upstream}\n    response_timeout: 3s\n"
    );
    for e in extra {
        s += &format!("    {e}\n");
    }
    s
}

/// A default [`Upstream`] and a gateway (top-level keys `top`) whose one
/// static app `a` on `a.test` it serves (more keys of the app: `extra`).
async fn app_a(top: &str, extra: &[&str]) -> (Upstream, Gw) {
    let up = Upstream::start(Mode::default()).await;
    let gw = gateway(top, &[app("a", "a.test", up.addr, extra)]).await;
    (up, gw)
}

/// Two default [`Upstream`]s and a gateway with static apps `a` (on
/// `a.test`) and `b` (on `b.test`) on them.
async fn apps_a_and_b() -> (Upstream, Upstream, Gw) {
    let (a, b) = (
        Upstream::start(Mode::default()).await,
        Upstream::start(Mode::default()).await,
    );
    let gw = gateway(
        "",
        &[
            app("a", "a.test", a.addr, &[]),
            app("b", "b.test", b.addr, &[]),
        ],
    )
    .await;
    (a, b, gw)
}

/// The sum of the series of metric `name` that have all of `labels`.
fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, inner) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<(&str, &str)> = inner
            .split("\",")
            .filter_map(|p| {
                let (k, v) = p.split_once("=\"")?;
                Some((k.trim_start_matches(','), v.trim_end_matches('"')))
            })
            .collect();
        if labels.iter().all(|l| have.contains(l)) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

async fn metric(gw: &Gw, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = http()
        .get(format!("http://{}/metrics", gw.admin))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap();
    metric_in(&text, name, labels)
}

/// `GET path` on new connections until one is a 200 (every 50 ms, 3 s at
/// most); the last response.
async fn eventually_200(gw: &Gw, host: &str, path: &str) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = once(gw.listen, &get(path, host)).await;
        if r.status == 200 || Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn metric_lines_are_summed_by_label() {
    let text = "# HELP x y\nx{app=\"a\",reason=\"r1\"} 2\nx{app=\"a\",reason=\"r2\"} 3\n\
                x{app=\"b\",reason=\"r1\"} 5\nxy{app=\"a\"} 7\n";
    assert_eq!(metric_in(text, "x", &[("app", "a")]), 5.0);
    assert_eq!(metric_in(text, "x", &[("reason", "r1")]), 7.0);
    assert_eq!(metric_in(text, "x", &[]), 10.0);
    assert_eq!(metric_in(text, "x", &[("app", "c")]), 0.0);
}

// ---------------------------------------------------------------------------
// 1. Upstream keep-alive and retries.
// ---------------------------------------------------------------------------

/// Upstream connections are kept alive: the next requests, on the same
/// client connection or another (served by the same worker: one here),
/// go out on the connection the first one used, whether the app's
/// answers carry a Content-Length, are chunked or are empty.
#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let mut wrong = Vec::new();
    for (chunked_answers, first) in [(false, "/r1"), (true, "/r1"), (false, "/empty-answer")] {
        let up = Upstream::start(Mode {
            chunked_answers,
            ..Mode::default()
        })
        .await;
        let gw = gateway("workers: 1\n", &[app("site", "a.test", up.addr, &[])]).await;
        let mut c = Wire::connect(gw.listen).await;
        for path in [first, "/r2"] {
            assert_eq!(exchange(&mut c, &get(path, "a.test")).await.status, 200);
        }
        assert_eq!(once(gw.listen, &get("/r3", "a.test")).await.status, 200);
        let log = up.log();
        let got: Vec<(usize, usize)> = log.seen.iter().map(|s| (s.conn, s.nth)).collect();
        if got != [(0, 1), (0, 2), (0, 3)] {
            let answer = match (chunked_answers, first) {
                (_, "/empty-answer") => "an empty Content-Length answer",
                (false, _) => "Content-Length answers",
                (true, _) => "chunked answers",
            };
            wrong.push(format!(
                "after {answer}: (connection, nth request on it) = {got:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "expected 3 requests on one kept-alive upstream connection [(0, 1), (0, 2), (0, 3)]:\n{}",
        wrong.join("\n")
    );
}

/// Upstream connections are kept per edge worker, and a worker with none
/// idle takes another's before dialing (`proxy::edge`, step 3): requests
/// one after another over many client connections, whichever worker
/// accepted each, all go out on one upstream connection (an app that
/// serves one connection at a time never waits for an idle one).
#[tokio::test]
async fn sequential_requests_on_any_worker_share_one_upstream_connection() {
    let up = Upstream::start(Mode::default()).await;
    let gw = gateway("workers: 2\n", &[app("site", "a.test", up.addr, &[])]).await;
    let workers = 2.min(std::thread::available_parallelism().unwrap().get());
    for i in 0..12 {
        let mut c = Wire::connect(gw.listen).await;
        for j in 0..2 {
            let path = format!("/c{i}-{j}");
            assert_eq!(exchange(&mut c, &get(&path, "a.test")).await.status, 200);
        }
    }
    let log = up.log();
    assert_eq!(log.seen.len(), 24);
    let mut per_conn = std::collections::BTreeMap::<usize, usize>::new();
    for s in &log.seen {
        *per_conn.entry(s.conn).or_default() += 1;
    }
    assert_eq!(
        per_conn.len(),
        1,
        "one upstream connection for {workers} workers; got {per_conn:?}"
    );
}

/// An app that closes connections idle over 1 s (with and without saying
/// `Keep-Alive: timeout=1`): a request 1.2 s after the last one, on the
/// same client connection, is still a 200.
#[tokio::test]
async fn an_app_closing_idle_connections_after_1s_fails_no_request() {
    for keep_alive in [None, Some(1)] {
        let up = Upstream::start(Mode {
            idle_close: Some(Duration::from_secs(1)),
            keep_alive,
            ..Mode::default()
        })
        .await;
        let gw = gateway("", &[app("site", "a.test", up.addr, &[])]).await;
        let mut c = Wire::connect(gw.listen).await;
        let first = exchange(&mut c, &get("/first", "a.test")).await;
        assert_eq!(first.status, 200, "Keep-Alive {keep_alive:?}: {first:?}");
        // The input: the app's idle limit passes.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let second = exchange(&mut c, &get("/second", "a.test")).await;
        assert_eq!(second.status, 200, "Keep-Alive {keep_alive:?}: {second:?}");
        assert_eq!(second.text(), "GET /second");
        assert_eq!(up.only("/second").nth, 1, "on a new upstream connection");
    }
}

/// A GET sent on a reused connection that the app reads and then closes
/// unanswered (it closed as the request arrived) is sent once more on a
/// fresh connection, and counted as a retry. (The app's answers are
/// chunked, so that the first connection is reused whatever the gateway
/// does with Content-Length answers: see
/// `upstream_connections_are_kept_alive_and_reused`.)
#[tokio::test]
async fn a_get_on_a_reused_connection_the_app_closed_is_retried_on_a_fresh_one() {
    let up = Upstream::start(Mode {
        one_per_conn: true,
        chunked_answers: true,
        ..Mode::default()
    })
    .await;
    let gw = gateway("", &[app("site", "a.test", up.addr, &[])]).await;
    let mut c = Wire::connect(gw.listen).await;
    let first = exchange(&mut c, &get("/1", "a.test")).await;
    assert_eq!((first.status, first.text().as_str()), (200, "GET /1"));
    let second = exchange(&mut c, &get("/2", "a.test")).await;
    assert_eq!(
        (second.status, second.text().as_str()),
        (200, "GET /2"),
        "{second:?}"
    );
    let log = up.log();
    let tries: Vec<(usize, usize)> = log.of("/2").iter().map(|s| (s.conn, s.nth)).collect();
    assert_eq!(
        tries,
        [(0, 2), (1, 1)],
        "(connection, nth request on it) of each try: the GET should reach the app on the \
         kept-alive connection, then once more on a fresh one"
    );
    assert_eq!(
        metric(&gw, "snapgate_upstream_retries_total", &[("app", "site")]).await,
        1.0
    );
}

/// A POST whose bytes went out is never sent twice: the app reads it and
/// closes unanswered -> 502, and the app saw it exactly once; likewise on a
/// kept-alive connection the app closes as the POST arrives.
#[tokio::test]
async fn a_post_whose_bytes_went_out_is_never_replayed() {
    let up = Upstream::start(Mode::default()).await;
    let gw = gateway("", &[app("site", "a.test", up.addr, &[])]).await;
    let r = once(gw.listen, &post("/drop", "a.test", b"payload")).await;
    r.assert_snapgate(502, "a POST the app read and dropped");
    let seen = up.only("/drop");
    assert_eq!(
        (seen.method.as_str(), &seen.body[..]),
        ("POST", &b"payload"[..])
    );
    assert_eq!(
        metric(&gw, "snapgate_upstream_retries_total", &[("app", "site")]).await,
        0.0
    );

    let up = Upstream::start(Mode {
        one_per_conn: true,
        chunked_answers: true,
        ..Mode::default()
    })
    .await;
    let gw = gateway("", &[app("site", "a.test", up.addr, &[])]).await;
    let mut c = Wire::connect(gw.listen).await;
    assert_eq!(exchange(&mut c, &get("/warm", "a.test")).await.status, 200);
    let r = exchange(&mut c, &post("/p", "a.test", b"payload")).await;
    let seen = up.only("/p");
    assert_eq!(seen.body, b"payload");
    assert_eq!(
        (seen.conn, seen.nth),
        (0, 2),
        "the POST should go out on the kept-alive connection"
    );
    r.assert_snapgate(502, "a POST on a connection the app closed");
    assert_eq!(
        metric(&gw, "snapgate_upstream_retries_total", &[("app", "site")]).await,
        0.0
    );
}

/// A refused connection is retried once (a static app has one address, so
/// it is refused again): 502, one retry counted per request.
#[tokio::test]
async fn a_refused_connection_is_retried_once_then_is_a_502() {
    let gone = SocketAddr::from(([127, 0, 0, 1], 1));
    let gw = gateway("", &[app("gone", "gone.test", gone, &[])]).await;
    for n in 1..=2 {
        let r = once(gw.listen, &get("/", "gone.test")).await;
        r.assert_snapgate(502, "a refused upstream");
        assert_eq!(
            metric(&gw, "snapgate_upstream_retries_total", &[("app", "gone")]).await,
            n as f64,
            "one retry per request"
        );
    }
}

/// `upstream_idle_timeout: 1s`, and an app's `Keep-Alive: timeout=1`, keep
/// a request off a connection idle longer: a POST right after the first
/// request reuses its connection, one 1.2 s later goes out on a fresh one
/// (the app drops requests that arrive on a connection idle 1 s, as one
/// closing it at that moment would). Chunked answers, as above.
#[tokio::test]
async fn a_connection_idle_past_its_timeout_is_not_reused() {
    for (extra, keep_alive) in [
        (&["upstream_idle_timeout: 1s"][..], None),
        (&[][..], Some(1)),
    ] {
        let up = Upstream::start(Mode {
            stale_after: Some(Duration::from_secs(1)),
            keep_alive,
            chunked_answers: true,
            ..Mode::default()
        })
        .await;
        let gw = gateway("", &[app("site", "a.test", up.addr, extra)]).await;
        let mut c = Wire::connect(gw.listen).await;
        for path in ["/a", "/b"] {
            let r = exchange(&mut c, &post(path, "a.test", b"one")).await;
            assert_eq!(r.status, 200, "{r:?}");
        }
        let seen = up.only("/b");
        assert_eq!(
            (seen.conn, seen.nth),
            (0, 2),
            "{extra:?} / Keep-Alive {keep_alive:?}: a connection idle a moment is reused"
        );
        // The input: the connection's idle timeout passes.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let r = exchange(&mut c, &post("/c", "a.test", b"two")).await;
        assert_eq!(
            r.status, 200,
            "{extra:?} / Keep-Alive {keep_alive:?}: a POST went out on a connection idle past its timeout: {r:?}"
        );
        let seen = up.only("/c");
        assert_eq!((seen.nth, &seen.body[..]), (1, &b"two"[..]));
    }
}

// ---------------------------------------------------------------------------
// 2. Host and routing.
// ---------------------------------------------------------------------------

/// An absolute-form target routes by its own authority, not `Host`, and
/// the app gets `Host:` = that authority and an origin-form target.
#[tokio::test]
async fn an_absolute_form_target_routes_by_its_authority() {
    let (a, b, gw) = apps_a_and_b().await;
    let r = once(
        gw.listen,
        b"GET http://b.test/x?y=1 HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = b.only("/x?y=1");
    assert_eq!(seen.values("host"), ["b.test"], "{}", seen.head);
    let r = once(
        gw.listen,
        b"GET http://nobody.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await;
    r.assert_snapgate(404, "an absolute-form target naming no app");
    assert!(
        a.log().heads.is_empty(),
        "a.test's app got {:?}",
        a.log().heads
    );
}

/// The app gets `Host:` = the client's authority, never its own address;
/// unknown hosts are a 404.
#[tokio::test]
async fn the_app_gets_the_clients_authority_as_host() {
    let (up, gw) = app_a("", &[]).await;
    for (request, target, host) in [
        (
            &b"GET /h1 HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
            "/h1",
            "a.test",
        ),
        (
            b"GET /h2 HTTP/1.1\r\nHost: a.test:8080\r\n\r\n",
            "/h2",
            "a.test:8080",
        ),
        (b"GET /h3 HTTP/1.0\r\nHost: a.test\r\n\r\n", "/h3", "a.test"),
    ] {
        let r = once(gw.listen, request).await;
        assert_eq!(r.status, 200, "{r:?}");
        let seen = up.only(target);
        assert_eq!(seen.values("host"), [host], "{}", seen.head);
    }
    let r = once(gw.listen, &get("/", "nobody.test")).await;
    r.assert_snapgate(404, "an unknown host");
}

/// RFC 9112 section 3.2: a missing, repeated or malformed Host is a 400,
/// and nothing reaches an app.
#[tokio::test]
async fn a_missing_repeated_or_malformed_host_is_a_400() {
    let (a, b, gw) = apps_a_and_b().await;
    let cases: &[&str] = &[
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test:notaport\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: user:pw@a.test\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test/evil\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test?x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test#x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.te st\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a.test, b.test\r\n\r\n",
    ];
    let mut wrong = Vec::new();
    for case in cases {
        let r = once(gw.listen, case.as_bytes()).await;
        let ctype = r.header("content-type").unwrap_or("");
        if r.status != 400
            || !ctype.starts_with("text/plain")
            || !r.text().starts_with("snapgate: ")
        {
            wrong.push(format!("{case:?} -> {} {:?}", r.status, r.text()));
        }
    }
    assert!(
        wrong.is_empty(),
        "expected snapgate's 400 for each of:\n{}",
        wrong.join("\n")
    );
    assert!(a.log().heads.is_empty() && b.log().heads.is_empty());
}

// ---------------------------------------------------------------------------
// 3. Framing.
// ---------------------------------------------------------------------------

/// A body reaches the app byte for byte for every method, chunked or with
/// Content-Length, on one kept-alive client connection.
#[tokio::test]
async fn request_bodies_reach_the_app_as_sent_for_every_method() {
    let (up, gw) = app_a("", &[]).await;
    let body = pattern(70_000);
    let mut c = Wire::connect(gw.listen).await;
    let mut paths = Vec::new();
    for method in ["GET", "DELETE", "OPTIONS", "POST", "PUT"] {
        for te in [true, false] {
            let path = format!(
                "/{}/{}",
                method.to_lowercase(),
                if te { "chunked" } else { "length" }
            );
            let mut req = format!("{method} {path} HTTP/1.1\r\nHost: a.test\r\n").into_bytes();
            if te {
                req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                req.extend(chunked(&body, &[1, 10, 4096, 30_000]));
            } else {
                req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                req.extend_from_slice(&body);
            }
            let r = exchange(&mut c, &req).await;
            assert_eq!(
                (r.status, r.text()),
                (200, format!("{method} {path}")),
                "{path}"
            );
            paths.push((method, path));
        }
    }
    for (method, path) in paths {
        let seen = up.only(&path);
        assert_eq!(seen.method, method);
        assert!(
            seen.body == body,
            "{path}: the app read {} body bytes (of {}), not the body sent; head:\n{}",
            seen.body.len(),
            body.len(),
            seen.head
        );
        assert!(
            !(is_chunked(&seen.headers) && content_length(&seen.headers).is_some()),
            "{path}: sent with both Transfer-Encoding and Content-Length:\n{}",
            seen.head
        );
    }
}

/// The two orders of a request with both Transfer-Encoding and
/// Content-Length (5, while the chunked body is 10 bytes, `hellohello`),
/// each followed by a pipelined `GET /smuggled`.
fn te_and_cl_requests() -> [(&'static str, Vec<u8>); 2] {
    let tail =
        b"5\r\nhello\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let with = |head: &str| {
        let mut r = head.as_bytes().to_vec();
        r.extend_from_slice(tail);
        r
    };
    [
        (
            "/te-first",
            with("POST /te-first HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
        ),
        (
            "/cl-first",
            with("POST /cl-first HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ),
    ]
}

/// A request with both Transfer-Encoding and Content-Length (either
/// order) smuggles nothing (RFC 9112 section 6.3: an intermediary that
/// forwards it removes Content-Length and reads it chunked, as hyper does):
/// the client's connection closes after the answer, so the pipelined
/// request is never forwarded, and the forwarded request carries the
/// chunked body and no Content-Length.
#[tokio::test]
async fn transfer_encoding_with_content_length_smuggles_nothing() {
    let (up, gw) = app_a("", &[]).await;
    for (target, req) in te_and_cl_requests() {
        let mut c = Wire::connect(gw.listen).await;
        let r = exchange(&mut c, &req).await;
        assert_eq!(r.status, 200, "{target}: {r:?}");
        let after = within(
            Duration::from_secs(3),
            &format!("{target}: the connection's close"),
            read_response(&mut c, false),
        )
        .await;
        assert!(
            after.is_err(),
            "{target}: a second response on the connection: {after:?}"
        );
        let log = up.log();
        let forwarded = log.of(target);
        assert_eq!(forwarded.len(), 1, "{target}: forwarded once");
        for seen in forwarded {
            assert!(
                content_length(&seen.headers).is_none() && seen.body == b"hellohello",
                "{target} forwarded with a Content-Length or a cut body:\n{}",
                seen.head
            );
        }
    }
    assert!(
        !up.log().heads.contains(&"/smuggled".to_owned()),
        "the pipelined request was forwarded: {:?}",
        up.log().heads
    );
}

/// An empty body stays empty; a GET without one gets no body framing.
#[tokio::test]
async fn an_empty_body_stays_empty() {
    let (up, gw) = app_a("", &[]).await;
    let mut c = Wire::connect(gw.listen).await;
    for req in [
        &b"GET /e1 HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
        b"POST /e2 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n",
        b"POST /e3 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"DELETE /e4 HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ] {
        assert_eq!(exchange(&mut c, req).await.status, 200);
    }
    for target in ["/e1", "/e2", "/e3", "/e4"] {
        let seen = up.only(target);
        assert!(seen.body.is_empty(), "{target}: {:?}", seen.body);
    }
    for target in ["/e1", "/e4"] {
        let seen = up.only(target);
        assert!(
            !is_chunked(&seen.headers) && content_length(&seen.headers).unwrap_or(0) == 0,
            "{target} grew body framing:\n{}",
            seen.head
        );
    }
}

// ---------------------------------------------------------------------------
// 4. Forwarding headers.
// ---------------------------------------------------------------------------

/// Everything an untrusted client says about forwarding is dropped;
/// snapgate sets exactly one of each header from what it saw.
#[tokio::test]
async fn an_untrusted_peers_forwarding_headers_are_replaced() {
    let (up, gw) = app_a("", &[]).await;
    let r = once(
        gw.listen,
        b"GET /fwd HTTP/1.1\r\nHost: a.test\r\n\
          X-Forwarded-For: 6.6.6.6\r\nx-forwarded-for: 7.7.7.7\r\n\
          X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n\
          X-Forwarded-Port: 1\r\nX-Forwarded-Prefix: /evil\r\nX-Real-IP: 6.6.6.6\r\n\
          Forwarded: for=6.6.6.6;host=evil.test;proto=https\r\n\
          X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n\
          X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nX-Forwarded-Ssl: on\r\n\
          True-Client-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = up.only("/fwd");
    assert!(
        !seen.head.contains("6.6.6.6") && !seen.head.to_lowercase().contains("x-forwarded-ssl"),
        "a client-chosen forwarding value reached the app:\n{}",
        seen.head
    );
    let port = gw.listen.port().to_string();
    let want: &[(&str, &[&str])] = &[
        ("x-forwarded-for", &["127.0.0.1"]),
        ("x-real-ip", &["127.0.0.1"]),
        ("x-forwarded-proto", &["http"]),
        ("x-forwarded-host", &["a.test"]),
        ("x-forwarded-port", &[&port]),
        ("forwarded", &["for=127.0.0.1;host=a.test;proto=http"]),
        ("x-forwarded-prefix", &[]),
        ("x-original-url", &[]),
        ("x-rewrite-url", &[]),
    ];
    for (name, values) in want {
        assert_eq!(
            &seen.values(name),
            values,
            "{name}; the app got:\n{}",
            seen.head
        );
    }
}

/// A trusted proxy's chain is kept and extended; X-Real-IP is the
/// rightmost address that is not a trusted proxy; X-Original-URL and
/// X-Rewrite-URL still go.
#[tokio::test]
async fn a_trusted_proxys_forwarding_headers_are_kept_and_extended() {
    for (trusted, real_ip) in [
        ("[127.0.0.1/32]", "2.2.2.2"),
        ("[127.0.0.1/32, 2.2.2.0/24]", "1.1.1.1"),
    ] {
        let up = Upstream::start(Mode::default()).await;
        let gw = gateway(
            &format!("trusted_proxies: {trusted}\n"),
            &[app("a", "a.test", up.addr, &[])],
        )
        .await;
        let r = once(
            gw.listen,
            b"GET /fwd HTTP/1.1\r\nHost: a.test\r\n\
              X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\
              Forwarded: for=1.1.1.1;host=public.test;proto=https\r\n\
              X-Forwarded-Proto: https\r\nX-Forwarded-Host: public.test\r\n\
              X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /api\r\nX-Real-IP: 9.9.9.9\r\n\
              X-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        let seen = up.only("/fwd");
        let want: &[(&str, &[&str])] = &[
            ("x-forwarded-for", &["1.1.1.1, 2.2.2.2, 127.0.0.1"]),
            ("x-real-ip", &[real_ip]),
            ("x-forwarded-proto", &["https"]),
            ("x-forwarded-host", &["public.test"]),
            ("x-forwarded-port", &["443"]),
            ("x-forwarded-prefix", &["/api"]),
            (
                "forwarded",
                &["for=1.1.1.1;host=public.test;proto=https, for=127.0.0.1;host=a.test;proto=http"],
            ),
            ("x-original-url", &[]),
            ("x-rewrite-url", &[]),
        ];
        for (name, values) in want {
            assert_eq!(
                &seen.values(name),
                values,
                "trusted {trusted}: {name}; the app got:\n{}",
                seen.head
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Early answers to a client still uploading.
// ---------------------------------------------------------------------------

const MIB: usize = 1 << 20;

/// Python's http.client POSTing 2 and 8 MiB to an unknown host gets the
/// 404, not a broken pipe.
#[tokio::test]
async fn a_client_still_uploading_gets_the_404() {
    let (_up, gw) = app_a("", &[]).await;
    let got = python_posts(gw.listen, "nobody.test", "/", &[2 * MIB, 8 * MIB]).await;
    assert_eq!(got, ["404", "404"]);
}

/// ... and the 413 over max_body_size.
#[tokio::test]
async fn a_client_still_uploading_gets_the_413() {
    let (up, gw) = app_a("", &["max_body_size: 1MiB"]).await;
    let got = python_posts(gw.listen, "a.test", "/up", &[2 * MIB, 8 * MIB]).await;
    assert_eq!(got, ["413", "413"]);
    assert!(up.log().seen.is_empty(), "{:?}", up.log().heads);
}

/// ... and the 503 over max_requests_in_flight.
#[tokio::test]
async fn a_client_still_uploading_gets_the_503() {
    let (up, gw) = app_a("limits: { max_requests_in_flight: 1 }\n", &[]).await;
    let held = tokio::spawn(
        http()
            .get(format!("http://{}/hold", gw.listen))
            .header("host", "a.test")
            .send(),
    );
    up.wait("the held request", |l| l.heads.len() == 1).await;
    let got = python_posts(gw.listen, "a.test", "/up", &[2 * MIB, 8 * MIB]).await;
    assert_eq!(got, ["503", "503"]);
    up.release.send_replace(true);
    let held = within(Duration::from_secs(5), "the held request", held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.status(), 200);
}

// ---------------------------------------------------------------------------
// 6. Stalls.
// ---------------------------------------------------------------------------

/// A body that stops coming gets 408 after body_read_timeout; its request
/// slot is freed and the upstream exchange ended.
#[tokio::test]
async fn a_stalled_request_body_gets_408_and_frees_its_slot() {
    let (up, gw) = app_a(
        "body_read_timeout: 1s\nlimits: { max_requests_in_flight: 1 }\n",
        &[],
    )
    .await;
    let started = Instant::now();
    let r = once(
        gw.listen,
        b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000000\r\n\r\nx",
    )
    .await;
    let took = started.elapsed();
    r.assert_snapgate(408, "a stalled body");
    assert!(
        took >= Duration::from_millis(900),
        "408 after {took:?}, before body_read_timeout"
    );
    let r = eventually_200(&gw, "a.test", "/after").await;
    assert_eq!(
        r.status, 200,
        "the stalled request's slot is still taken: {r:?}"
    );
    if up.log().heads.contains(&"/upload".to_owned()) {
        up.wait("the upstream exchange to end", |l| {
            l.broken.contains(&"/upload".to_owned())
        })
        .await;
    }
    assert!(up.log().of("/upload").is_empty());
}

/// A client that stops reading a large response is cut off after
/// send_timeout: its connection is closed (and no longer counted), and
/// what it got is short of the whole.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    let (up, gw) = app_a(
        "send_timeout: 1s\nlimits: { max_requests_in_flight: 1 }\n",
        &[],
    )
    .await;
    let mut c = Wire::connect(gw.listen).await;
    c.send(&get("/big", "a.test")).await;
    up.wait("the /big request", |l| l.heads.len() == 1).await;
    // The input: the client reads nothing for longer than send_timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        metric(&gw, "snapgate_client_connections", &[]).await,
        0.0,
        "the blocked client's connection is still open"
    );
    let r = once(gw.listen, &get("/after", "a.test")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut total = c.buf.len();
    let ended = within(Duration::from_secs(10), "reading what was sent", async {
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            match c.stream.read(&mut chunk).await {
                Ok(0) => return "closed",
                Ok(n) => total += n,
                Err(_) => return "reset",
            }
        }
    })
    .await;
    assert!(
        total < BIG,
        "the whole response ({total} bytes) arrived: the connection was not cut ({ended})"
    );
}

/// An app whose response body stops producing: the client's response is
/// cut after upstream_read_timeout (an unfinished body, then the close).
#[tokio::test]
async fn a_stalled_response_body_is_cut_off_after_upstream_read_timeout() {
    let (_up, gw) = app_a("", &["upstream_read_timeout: 1s"]).await;
    for path in ["/stall-chunked", "/stall-length"] {
        let mut c = Wire::connect(gw.listen).await;
        let started = Instant::now();
        c.send(&get(path, "a.test")).await;
        let r = within(
            Duration::from_secs(6),
            &format!("{path}: the cut response"),
            read_response(&mut c, false),
        )
        .await
        .unwrap();
        let took = started.elapsed();
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.body, b"hello", "{path}");
        assert!(!r.complete, "{path}: the body was completed: {r:?}");
        assert!(
            took >= Duration::from_millis(900),
            "{path}: cut after {took:?}, before upstream_read_timeout"
        );
    }
}

// ---------------------------------------------------------------------------
// 7. Limits.
// ---------------------------------------------------------------------------

/// A GET with `lines` header lines `X-Pad-N: <pad bytes of a>` after Host.
fn padded(path: &str, lines: usize, pad: usize) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n");
    for i in 0..lines {
        r += &format!("X-Pad-{i}: {}\r\n", "a".repeat(pad));
    }
    r += "\r\n";
    r.into_bytes()
}

/// max_header_bytes (as a size string and as bytes) and max_headers: over
/// either is a 431, under both is a 200.
#[tokio::test]
async fn heads_over_max_header_bytes_or_max_headers_get_431() {
    for size in ["8KiB", "8192"] {
        let up = Upstream::start(Mode::default()).await;
        let gw = gateway(
            &format!("limits: {{ max_header_bytes: {size}, max_headers: 20 }}\n"),
            &[app("a", "a.test", up.addr, &[])],
        )
        .await;
        for (what, req, status) in [
            ("a 4 KB header", padded("/4k", 1, 4000), 200),
            ("a 10 KB header", padded("/10k", 1, 10_000), 431),
            ("15 header lines", padded("/15", 14, 10), 200),
            ("30 header lines", padded("/30", 29, 10), 431),
        ] {
            let r = once(gw.listen, &req).await;
            assert_eq!(r.status, status, "max_header_bytes {size}: {what}: {r:?}");
        }
        let heads = up.log().heads;
        assert_eq!(heads, ["/4k", "/15"], "max_header_bytes {size}");
    }
}

/// The defaults (64 KiB, 100 lines): a 200 KB header and 150 header lines
/// are a 431; a 50 KB header and 90 lines are served.
#[tokio::test]
async fn the_default_limits_refuse_a_200_kb_head_and_150_header_lines() {
    let (_up, gw) = app_a("", &[]).await;
    for (what, req, status) in [
        ("a 50 KB header", padded("/50k", 1, 50_000), 200),
        ("a 200 KB header", padded("/200k", 1, 200_000), 431),
        ("90 header lines", padded("/90", 89, 10), 200),
        ("150 header lines", padded("/150", 149, 10), 431),
    ] {
        let r = once(gw.listen, &req).await;
        assert_eq!(r.status, status, "{what}: {r:?}");
    }
}

/// Over max_body_size: 413 at once when Content-Length says so (before a
/// byte of body), or when a chunked body grows past it; at the limit: 200.
#[tokio::test]
async fn a_body_over_max_body_size_gets_413() {
    let (up, gw) = app_a("body_read_timeout: 5s\n", &["max_body_size: 1KiB"]).await;
    // Only the head: the answer must not wait for the body.
    let started = Instant::now();
    let r = once(
        gw.listen,
        b"POST /cl-over HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2000\r\n\r\n",
    )
    .await;
    r.assert_snapgate(413, "Content-Length over max_body_size");
    assert!(started.elapsed() < Duration::from_secs(3));

    let r = once(gw.listen, &post("/cl-at", "a.test", &pattern(1024))).await;
    assert_eq!(r.status, 200, "a body of exactly max_body_size: {r:?}");
    assert_eq!(up.only("/cl-at").body, pattern(1024));

    let mut req =
        b"POST /chunked-over HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    req.extend(chunked(&pattern(1200), &[600]));
    let r = once(gw.listen, &req).await;
    r.assert_snapgate(413, "a chunked body growing over max_body_size");

    let mut req =
        b"POST /chunked-under HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    req.extend(chunked(&pattern(1000), &[500]));
    let r = once(gw.listen, &req).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.only("/chunked-under").body, pattern(1000));

    let log = up.log();
    assert!(
        !log.heads.contains(&"/cl-over".to_owned()),
        "the app was sent a request over max_body_size"
    );
    assert!(
        log.of("/chunked-over").is_empty(),
        "the app read a body over max_body_size"
    );
}

/// Over max_requests_in_flight: 503 with Retry-After, counted; the body
/// names no figures (item 10); once the held requests end, requests are
/// served again.
#[tokio::test]
async fn requests_over_max_requests_in_flight_are_shed() {
    let (up, gw) = app_a("limits: { max_requests_in_flight: 7 }\n", &[]).await;
    let client = http();
    let held: Vec<_> = (0..7)
        .map(|i| {
            tokio::spawn(
                client
                    .get(format!("http://{}/hold/{i}", gw.listen))
                    .header("host", "a.test")
                    .send(),
            )
        })
        .collect();
    up.wait("7 held requests", |l| l.heads.len() == 7).await;
    let r = once(gw.listen, &get("/over", "a.test")).await;
    r.assert_snapgate(503, "over max_requests_in_flight");
    let retry = r.header("retry-after").unwrap_or("");
    assert!(
        !retry.is_empty() && retry.bytes().all(|b| b.is_ascii_digit()),
        "Retry-After {retry:?}"
    );
    assert!(
        !r.text().contains('7'),
        "the 503 names an internal figure: {:?}",
        r.text()
    );
    assert!(!up.log().heads.contains(&"/over".to_owned()));
    assert_eq!(
        metric(
            &gw,
            "snapgate_load_shed_total",
            &[("reason", "max_requests_in_flight")]
        )
        .await,
        1.0
    );
    up.release.send_replace(true);
    for h in held {
        let resp = within(Duration::from_secs(5), "a held request", h)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let r = eventually_200(&gw, "a.test", "/later").await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// Asserts `c` got snapgate's 503 for a connection over a cap (Retry-After,
/// Connection: close) and was then closed.
async fn assert_refused_connection(c: &mut Wire, what: &str) {
    let r = exchange(c, &get("/over", "a.test")).await;
    r.assert_snapgate(503, what);
    assert!(
        r.header("retry-after").is_some(),
        "{what}: no Retry-After: {r:?}"
    );
    assert!(
        r.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "{what}: no Connection: close: {r:?}"
    );
    let after = within(
        Duration::from_secs(3),
        &format!("{what}: the close"),
        c.fill(),
    )
    .await;
    assert!(
        matches!(after, Ok(0) | Err(_)),
        "{what}: the connection stayed open ({after:?}, {:?})",
        String::from_utf8_lossy(&c.buf)
    );
}

/// A connection over max_connections gets 503 and is closed, counted;
/// once a connection closes, a new one is served.
#[tokio::test]
async fn connections_over_max_connections_get_503_and_are_closed() {
    let (up, gw) = app_a("limits: { max_connections: 2 }\n", &[]).await;
    let mut c1 = Wire::connect(gw.listen).await;
    let mut c2 = Wire::connect(gw.listen).await;
    assert_eq!(exchange(&mut c1, &get("/1", "a.test")).await.status, 200);
    assert_eq!(exchange(&mut c2, &get("/2", "a.test")).await.status, 200);
    let mut c3 = Wire::connect(gw.listen).await;
    assert_refused_connection(&mut c3, "a third connection").await;
    assert!(!up.log().heads.contains(&"/over".to_owned()));
    assert_eq!(
        metric(
            &gw,
            "snapgate_load_shed_total",
            &[("reason", "max_connections")]
        )
        .await,
        1.0
    );
    // The first two are still served.
    assert_eq!(exchange(&mut c2, &get("/2b", "a.test")).await.status, 200);
    drop(c1);
    let r = eventually_200(&gw, "a.test", "/4").await;
    assert_eq!(
        r.status, 200,
        "a closed connection's place is not freed: {r:?}"
    );
}

/// max_connections_per_client counts one peer address: a third connection
/// from 127.0.0.1 is refused, one from 127.0.0.2 is served.
#[tokio::test]
async fn connections_over_max_connections_per_client_get_503() {
    let (up, gw) = app_a("limits: { max_connections_per_client: 2 }\n", &[]).await;
    let mut c1 = Wire::connect(gw.listen).await;
    let mut c2 = Wire::connect(gw.listen).await;
    assert_eq!(exchange(&mut c1, &get("/1", "a.test")).await.status, 200);
    assert_eq!(exchange(&mut c2, &get("/2", "a.test")).await.status, 200);
    let mut c3 = Wire::connect_from("127.0.0.1", gw.listen).await;
    assert_refused_connection(&mut c3, "a third connection from 127.0.0.1").await;
    let mut other = Wire::connect_from("127.0.0.2", gw.listen).await;
    let r = exchange(&mut other, &get("/other", "a.test")).await;
    assert_eq!(r.status, 200, "another client's connection: {r:?}");
    assert_eq!(up.only("/other").values("x-forwarded-for"), ["127.0.0.2"]);
    assert_eq!(
        metric(
            &gw,
            "snapgate_load_shed_total",
            &[("reason", "max_connections_per_client")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            "snapgate_load_shed_total",
            &[("reason", "max_connections")]
        )
        .await,
        0.0
    );
}

// ---------------------------------------------------------------------------
// 8. Client-controlled Connection headers.
// ---------------------------------------------------------------------------

/// `Connection:` naming Host, forwarding headers, Content-Length or
/// Transfer-Encoding removes none of them (nor the body), and the next
/// request on the connection is framed right; hop-by-hop headers and those
/// `Connection` names are not forwarded.
#[tokio::test]
async fn a_clients_connection_header_strips_nothing_snapgate_needs() {
    let (up, gw) = app_a("", &[]).await;
    let mut c = Wire::connect(gw.listen).await;
    let requests: &[(&str, &[u8])] = &[
        ("/c1", b"POST /c1 HTTP/1.1\r\nHost: a.test\r\nConnection: host\r\nContent-Length: 5\r\n\r\nhello"),
        ("/c2", b"POST /c2 HTTP/1.1\r\nHost: a.test\r\nConnection: x-forwarded-for, forwarded\r\nContent-Length: 5\r\n\r\nhello"),
        ("/c3", b"POST /c3 HTTP/1.1\r\nHost: a.test\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"),
        ("/c4", b"POST /c4 HTTP/1.1\r\nHost: a.test\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ("/c5", b"GET /c5 HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, x-custom\r\nKeep-Alive: timeout=5\r\n\
                  Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: x-t\r\nUpgrade: websocket\r\n\
                  X-Custom: 1\r\nX-Kept: yes\r\n\r\n"),
        ("/c6", b"GET /c6 HTTP/1.1\r\nHost: a.test\r\n\r\n"),
    ];
    for (target, req) in requests {
        let r = exchange(&mut c, req).await;
        let method = if target < &"/c5" { "POST" } else { "GET" };
        assert_eq!(
            (r.status, r.text()),
            (200, format!("{method} {target}")),
            "{target}"
        );
    }
    for target in ["/c1", "/c2", "/c3", "/c4"] {
        let seen = up.only(target);
        let h = &seen.head;
        assert_eq!(seen.body, b"hello", "{target}:\n{h}");
        assert_eq!(seen.values("host"), ["a.test"], "{target}:\n{h}");
        assert_eq!(
            seen.values("x-forwarded-for"),
            ["127.0.0.1"],
            "{target}:\n{h}"
        );
        assert_eq!(seen.values("forwarded").len(), 1, "{target}:\n{h}");
    }
    let seen = up.only("/c5");
    // TE is snapgate's own to the app: `trailers` (it passes them on),
    // announced in its Connection (RFC 9110 section 10.1.4); Trailer is
    // end-to-end (section 6.6.2).
    assert_eq!(seen.values("te"), ["trailers"], "{}", seen.head);
    assert_eq!(seen.values("trailer"), ["x-t"], "{}", seen.head);
    assert_eq!(seen.values("connection"), ["te"], "{}", seen.head);
    for gone in ["keep-alive", "proxy-connection", "upgrade", "x-custom"] {
        assert!(
            seen.values(gone).is_empty(),
            "{gone} was forwarded:\n{}",
            seen.head
        );
    }
    for v in seen.values("connection") {
        assert!(
            !v.to_ascii_lowercase().contains("x-custom"),
            "the client's Connection was forwarded:\n{}",
            seen.head
        );
    }
    assert_eq!(seen.values("x-kept"), ["yes"]);
    assert_eq!(up.log().seen.len(), 6, "{:?}", up.log().heads);
}

// ---------------------------------------------------------------------------
// 9. An HTTP/1.0 upstream.
// ---------------------------------------------------------------------------

/// Behind Python's HTTP/1.0 http.server (with and without Content-Length)
/// the client gets HTTP/1.1 answers on one kept-alive connection: 300
/// requests, all 200.
#[tokio::test]
async fn an_http_1_0_app_still_gives_the_client_a_kept_alive_http_1_1_connection() {
    let py = python_http10_upstream().await;
    let gw = gateway("", &[app("py", "py.test", py.addr, &[])]).await;
    let mut c = Wire::connect(gw.listen).await;
    for i in 0..300 {
        let path = if i % 2 == 0 {
            format!("/len/{i}")
        } else {
            format!("/nolen/{i}")
        };
        let r = exchange(&mut c, &get(&path, "py.test")).await;
        assert_eq!((r.version, r.status), (1, 200), "request {i}: {r:?}");
        assert!(r.complete, "request {i}: {r:?}");
        assert_eq!(r.text(), format!("python {path}"), "request {i}");
        assert!(
            !r.header("connection")
                .is_some_and(|v| v.to_ascii_lowercase().contains("close")),
            "request {i}: the client's connection is being closed: {r:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 10. One exchange's failure is that request's alone.
// ---------------------------------------------------------------------------

/// An app that resets one exchange fails that request (502); the next
/// ones are served.
#[tokio::test]
async fn a_reset_exchange_fails_only_that_request() {
    let (_up, gw) = app_a("", &[]).await;
    for round in 0..2 {
        let r = once(gw.listen, &get("/reset", "a.test")).await;
        r.assert_snapgate(502, "a reset exchange");
        let r = once(gw.listen, &get(&format!("/ok/{round}"), "a.test")).await;
        assert_eq!(r.status, 200, "after a reset: {r:?}");
    }
}

// ---------------------------------------------------------------------------
// Found by trying to break the front door.
// ---------------------------------------------------------------------------

/// An app that answers an upload early, in full, gets no more of it: the
/// rest is not forwarded and the app's connection is closed (so an upload
/// cannot go on into an instance whose lease has ended), and no other
/// request waits on that connection.
#[tokio::test]
async fn an_early_answer_to_a_slow_upload_ends_its_forwarding() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Set when the app sees its upload connection end.
    let (closed, mut closed_rx) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut w = Wire::new(stream);
                while let Ok(Some(head)) = w.head().await {
                    if head.starts_with(b"POST") {
                        let _ = w
                            .stream
                            .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
                            .await;
                        // Reads what comes, never answering again.
                        let mut sink = vec![0u8; 65536];
                        while let Ok(1..) = w.stream.read(&mut sink).await {}
                        closed.send_replace(true);
                        return;
                    }
                    let _ = w
                        .stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    // A pooled connection still busy with the upload would hold the GET
    // until it gave up on it: past this response_timeout.
    let gw = gateway(
        "",
        &[format!(
            "  a:\n    hosts: [a.test]\n    upstream: {addr}\n    response_timeout: 500ms\n"
        )],
    )
    .await;
    let mut uploader = Wire::connect(gw.listen).await;
    uploader
        .stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    uploader.stream.write_all(&[b'x'; 100]).await.unwrap();
    let early = within(
        Duration::from_secs(3),
        "the early 401",
        read_response(&mut uploader, false),
    )
    .await
    .unwrap();
    assert_eq!(early.status, 401);
    // The client goes on uploading; none of it goes on to the app.
    uploader.stream.write_all(&[b'x'; 10]).await.unwrap();
    within(
        Duration::from_secs(5),
        "the app's upload connection closed",
        closed_rx.wait_for(|c| *c),
    )
    .await
    .unwrap();
    let r = once(gw.listen, &get("/", "a.test")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{r:?}");
}

/// An app that answers a response framed both ways (Content-Length and
/// chunked) gets its body to the client whole, as chunked said (RFC 9112
/// section 6.3), not cut at the Content-Length; the connection goes on.
#[tokio::test]
async fn a_response_framed_both_ways_reaches_the_client_as_chunked_says() {
    let (_up, gw) = app_a("", &[]).await;
    let mut c = Wire::connect(gw.listen).await;
    let r = exchange(&mut c, &get("/both-framings", "a.test")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "0123456789"), "{r:?}");
    let next = exchange(&mut c, &get("/next", "a.test")).await;
    assert_eq!(next.text(), "GET /next");
}

/// An app's response with a transfer coding besides chunked gets the
/// client a 502 (framing.rs, rule 3), not the coded bytes as content
/// with the coding's name gone; the client's connection goes on.
#[tokio::test]
async fn a_response_with_a_transfer_coding_other_than_chunked_is_a_502() {
    let (_up, gw) = app_a("", &[]).await;
    let mut c = Wire::connect(gw.listen).await;
    for path in ["/gzip-chunked", "/chunked-gzip"] {
        let r = exchange(&mut c, &get(path, "a.test")).await;
        assert_eq!(r.status, 502, "{path}: {r:?}");
        assert!(!r.text().contains("zz"), "{path}: {r:?}");
    }
    let next = exchange(&mut c, &get("/next", "a.test")).await;
    assert_eq!(next.text(), "GET /next");
}

/// A GET sent on a kept-alive connection that the app then resets (it
/// closed with the request unread) is sent once more on a fresh one.
#[tokio::test]
async fn a_get_on_a_connection_the_app_resets_is_replayed() {
    let up = Upstream::start(Mode::default()).await;
    let gw = gateway("", &[app("site", "a.test", up.addr, &[])]).await;
    let mut c = Wire::connect(gw.listen).await;
    let first = exchange(&mut c, &get("/then-close", "a.test")).await;
    assert_eq!(first.status, 200);
    // Sent while the app's connection still looks open; the app closes it
    // unread moments later.
    let second = exchange(&mut c, &get("/after", "a.test")).await;
    assert_eq!(
        (second.status, second.text().as_str()),
        (200, "GET /after"),
        "{second:?}"
    );
    // The first try went out on the kept-alive connection, which the app
    // reset unread; the replay is the one it read.
    assert_eq!(up.log().conns, 2, "a fresh connection for the replay");
    assert_eq!(up.only("/after").nth, 1, "read on the fresh connection");
    assert_eq!(
        metric(
            &gw,
            "snapgate_upstream_retries_total",
            &[("app", "site"), ("reason", "closed")]
        )
        .await,
        1.0,
        "the replay is counted"
    );
}

/// An app that switches protocols when nobody asked gives the client a
/// 502, not a bare 101.
#[tokio::test]
async fn an_unasked_switch_of_protocols_is_a_502() {
    let (_up, gw) = app_a("", &[]).await;
    once(gw.listen, &get("/switch", "a.test"))
        .await
        .assert_snapgate(502, "an unasked 101");
}

/// Absolute-form targets keep their query when their path is empty; the
/// asterisk-form is for OPTIONS only; an empty port is no port; empty
/// labels are a 400.
#[tokio::test]
async fn odd_targets_and_hosts_are_read_as_the_rfcs_say() {
    let (_up, gw) = app_a("", &[]).await;
    let r = once(
        gw.listen,
        b"GET http://a.test?token=abc HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await;
    assert_eq!(r.text(), "GET /?token=abc");
    once(gw.listen, b"GET * HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .assert_snapgate(400, "GET *");
    let r = once(gw.listen, b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(r.text(), "OPTIONS *");
    let r = once(gw.listen, b"GET /p HTTP/1.1\r\nHost: a.test:\r\n\r\n").await;
    assert_eq!(r.text(), "GET /p");
    for host in ["a.test..", "x..a.test", "."] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        once(gw.listen, req.as_bytes())
            .await
            .assert_snapgate(400, host);
    }
}

/// The wait for the app's answer (`response_timeout`) starts once the
/// request is sent whole: a slow but steady upload is not a 504.
#[tokio::test]
async fn response_timeout_does_not_count_a_slow_upload() {
    let up = Upstream::start(Mode::default()).await;
    let gw = gateway(
        "",
        &[format!(
            "  a:\n    hosts: [a.test]\n    upstream: {}\n    response_timeout: 1s\n",
            up.addr
        )],
    )
    .await;
    let mut c = Wire::connect(gw.listen).await;
    c.stream
        .write_all(b"POST /slow HTTP/1.1\r\nHost: a.test\r\nContent-Length: 6\r\n\r\n")
        .await
        .unwrap();
    // 6 bytes over ~2.5 s: longer than response_timeout, each read well
    // within body_read_timeout.
    for b in b"abcdef" {
        c.stream.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = within(
        Duration::from_secs(5),
        "the answer",
        read_response(&mut c, false),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "POST /slow"), "{r:?}");
    assert_eq!(up.only("/slow").body, b"abcdef");
}

/// A client that sent `Expect: 100-continue` and was answered without a
/// `100 Continue` has sent no body: snapgate does not wait for one (RFC
/// 9110 section 10.1.1); the connection closes after the answer instead of
/// reading the client's next request as body bytes.
#[tokio::test]
async fn an_expect_100_continue_answered_early_is_not_drained() {
    let (up, gw) = app_a("", &["max_body_size: 10"]).await;
    let mut c = Wire::connect(gw.listen).await;
    let r = exchange(
        &mut c,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    r.assert_snapgate(413, "an Expect: 100-continue over max_body_size");
    let after = within(
        Duration::from_secs(2),
        "the connection's close",
        read_response(&mut c, false),
    )
    .await;
    assert!(after.is_err(), "more on the connection: {after:?}");
    assert!(up.log().heads.is_empty());
}

/// The app is told of the hop (RFC 9110 section 7.6.3: a gateway sends
/// `Via` on inbound requests), after any `Via` the client's own proxies
/// added; TRACE is not served.
#[tokio::test]
async fn via_is_added_and_trace_is_refused() {
    let (up, gw) = app_a("", &[]).await;
    let r = once(
        gw.listen,
        b"GET /via HTTP/1.1\r\nHost: a.test\r\nVia: 1.0 corp-proxy\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        up.only("/via").values("via"),
        ["1.0 corp-proxy, 1.1 snapgate"]
    );
    once(gw.listen, b"TRACE / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .assert_snapgate(405, "TRACE");
}

/// Trailers end a chunked body like its last chunk: a request whose body
/// ends with trailers still gets its 504 at response_timeout (the wait
/// starts once it is sent whole), and a response ending with trailers
/// gives its connection back for the next request.
#[tokio::test]
async fn trailers_end_a_body_on_either_side() {
    let (up, gw) = app_a("", &[]).await;
    let r = within(
        Duration::from_secs(8),
        "an answer to a request with trailers",
        async {
            once(
                gw.listen,
                b"POST /hold HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-Check: y\r\n\r\n",
            )
            .await
        },
    )
    .await;
    r.assert_snapgate(504, "an unanswered request whose body ended with trailers");
    let conns_before = up.log().conns;
    let mut c = Wire::connect(gw.listen).await;
    for _ in 0..3 {
        let r = exchange(&mut c, &get("/trailers", "a.test")).await;
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    }
    assert_eq!(
        up.log().conns - conns_before,
        1,
        "one upstream connection for the three answers with trailers"
    );
}

/// Waits until the gauge `name` reads `want` (polling /metrics every
/// 20 ms: the gateway has no event for a test to wait on), `within` at most.
async fn gauge_becomes(gw: &Gw, name: &str, want: f64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = metric(gw, name, &[]).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed {got}, not {want}, for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An idle kept-alive HTTP/1.1 connection is parked (its HTTP state
/// freed), serves its next request as before, pipelined ones included,
/// and still closes once idle for header_read_timeout (2 s here).
#[tokio::test]
async fn an_idle_connection_is_parked_serves_its_next_requests_and_closes_when_idle_too_long() {
    let (up, gw) = app_a("", &[]).await;
    let parked = "snapgate_client_connections_parked";
    let mut w = Wire::connect(gw.listen).await;
    assert_eq!(exchange(&mut w, &get("/one", "a.test")).await.status, 200);
    gauge_becomes(&gw, parked, 1.0, Duration::from_secs(5)).await;
    // Parked: the same connection, a new HTTP/1.1 state in the gateway.
    let two = exchange(&mut w, &get("/two", "a.test")).await;
    assert_eq!((two.status, two.complete), (200, true));
    gauge_becomes(&gw, parked, 1.0, Duration::from_secs(5)).await;
    // Two requests in one write after parking: both answered, in order.
    w.send(&[get("/three", "a.test"), get("/four", "a.test")].concat())
        .await;
    for path in ["/three", "/four"] {
        let resp = within(Duration::from_secs(5), path, read_response(&mut w, false))
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((resp.status, resp.complete), (200, true), "{path}");
    }
    let seen: Vec<String> = up.log().seen.iter().map(|r| r.target.clone()).collect();
    assert_eq!(seen, ["/one", "/two", "/three", "/four"]);
    // Idle for header_read_timeout, parked or not: closed.
    let closed = within(Duration::from_secs(5), "the idle close", w.head()).await;
    assert!(matches!(closed, Ok(None)), "{closed:?}");
    gauge_becomes(&gw, parked, 0.0, Duration::from_secs(5)).await;
}

/// A connection parks again a second after each use, every time: the
/// parked wait's deadline (header_read_timeout, 10 s here) is not carried
/// into the next idle spell.
#[tokio::test]
async fn a_connection_parks_again_after_each_use() {
    let (_up, gw) = app_a("header_read_timeout: 10s\n", &[]).await;
    let parked = "snapgate_client_connections_parked";
    let mut w = Wire::connect(gw.listen).await;
    for path in ["/one", "/two", "/three"] {
        let resp = exchange(&mut w, &get(path, "a.test")).await;
        assert_eq!((resp.status, resp.complete), (200, true), "{path}");
        gauge_becomes(&gw, parked, 0.0, Duration::from_secs(1)).await;
        // Parks after a second idle; a deadline carried over would make
        // it wait for most of the 10 s.
        gauge_becomes(&gw, parked, 1.0, Duration::from_secs(4)).await;
    }
}

/// A parked connection loses no byte of a request head that comes slowly
/// (within header_read_timeout, 5 s here) or that was pipelined, in part,
/// with the previous request.
#[tokio::test]
async fn parking_loses_no_slow_or_pipelined_request_head() {
    let (up, gw) = app_a("header_read_timeout: 5s\n", &[]).await;
    let mut w = Wire::connect(gw.listen).await;
    assert_eq!(exchange(&mut w, &get("/one", "a.test")).await.status, 200);
    // A head sent in two parts 2.5 s apart, past the 1 s park.
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.send(b"GET /two HTTP/1.1\r\n").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let two = exchange(&mut w, b"Host: a.test\r\n\r\n").await;
    assert_eq!((two.status, two.complete), (200, true));
    // A request and the start of the next in one write; the rest after
    // the connection would have parked.
    w.send(&[get("/three", "a.test"), b"GET /four HT".to_vec()].concat())
        .await;
    let three = within(
        Duration::from_secs(5),
        "/three",
        read_response(&mut w, false),
    )
    .await
    .unwrap();
    assert_eq!(three.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let four = exchange(&mut w, b"TP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!((four.status, four.complete), (200, true));
    let seen: Vec<String> = up.log().seen.iter().map(|r| r.target.clone()).collect();
    assert_eq!(seen, ["/one", "/two", "/three", "/four"]);
}

/// The admin listener answers before any token is checked: a client that
/// sends requests and never reads their answers loses its connection once
/// a write to it has waited 10 s, and the listener serves 64 connections
/// at most (more wait in the backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_drops_clients_that_never_read_and_caps_its_connections() {
    let (_up, gw) = app_a("", &[]).await;
    let admin = gw.admin;
    // Far more answer bytes than the socket buffers hold: the gateway's
    // write blocks while the client does not read.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(admin).await.unwrap();
    let requests = 5000;
    let one = b"GET /metrics HTTP/1.1\r\nhost: admin\r\n\r\n";
    let pipelined: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * requests)
        .collect();
    stalled.write_all(&pipelined).await.unwrap();
    // Not reading, past the write timeout (10 s, with room).
    tokio::time::sleep(Duration::from_secs(13)).await;
    // Now read: the connection ends (the gateway closed it) before all
    // the answers came.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut got)).await;
    let answers = got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count();
    assert!(
        matches!(read, Ok(Ok(_)) | Ok(Err(_))),
        "the stalled connection stayed open ({answers} answers read)"
    );
    assert!(answers < requests, "every answer came: nothing was cut off");

    // The cap: 64 connections held open (each in its header read), the
    // 65th waits until one of them goes.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(TcpStream::connect(admin).await.unwrap());
    }
    // Each of them accepted: one byte, not a whole head, so each stays in
    // its header read.
    for c in &mut held {
        c.write_all(b"G").await.unwrap();
    }
    let mut waiting = TcpStream::connect(admin).await.unwrap();
    waiting
        .write_all(b"GET /livez HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buf)).await;
    assert!(early.is_err(), "the 65th connection was served at once");
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), waiting.read(&mut buf))
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// X-Request-Id: a client's valid id reaches the app and comes back; a
/// missing, invalid or repeated one is replaced by a fresh 128-bit id,
/// the same at the app and on the response; snapgate's own answers (a
/// 404 for an unknown host) carry one too.
#[tokio::test]
async fn a_request_id_is_kept_or_made_sent_to_the_app_and_returned() {
    let (up, gw) = app_a("", &[]).await;
    let mut w = Wire::connect(gw.listen).await;
    let r = exchange(
        &mut w,
        b"GET /kept HTTP/1.1\r\nHost: a.test\r\nX-Request-Id: trace-42.a/b\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("trace-42.a/b"));
    assert_eq!(up.only("/kept").values("x-request-id"), ["trace-42.a/b"]);
    let hex = |id: &str| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    for (path, extra) in [
        ("/none", String::new()),
        ("/bad", "X-Request-Id: has space\r\n".into()),
        ("/long", format!("X-Request-Id: {}\r\n", "x".repeat(129))),
        ("/two", "X-Request-Id: a\r\nX-Request-Id: b\r\n".into()),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n{extra}\r\n");
        let r = exchange(&mut w, req.as_bytes()).await;
        assert_eq!(r.status, 200, "{path}");
        let id = r.header("x-request-id").unwrap().to_owned();
        assert!(hex(&id), "{path}: {id}");
        assert_eq!(
            up.only(path).values("x-request-id"),
            [id.as_str()],
            "{path}"
        );
    }
    let r = exchange(&mut w, &get("/", "nobody.test")).await;
    assert_eq!(r.status, 404);
    assert!(hex(r.header("x-request-id").unwrap()), "{r:?}");
    // Named hop-by-hop by the client: still the app's.
    let r = exchange(
        &mut w,
        b"GET /hop HTTP/1.1\r\nHost: a.test\r\nConnection: close, x-request-id\r\nX-Request-Id: hop-1\r\n\r\n",
    )
    .await;
    assert_eq!(r.header("x-request-id"), Some("hop-1"));
    assert_eq!(up.only("/hop").values("x-request-id"), ["hop-1"]);
}

/// The request id is added after the head's limits are checked: a request
/// at exactly `max_headers` fields, sent without an id, is served, and the
/// app gets the id as its field past the limit.
#[tokio::test]
async fn a_request_at_max_headers_is_served_with_its_request_id() {
    let (up, gw) = app_a("limits: { max_headers: 5 }\n", &[]).await;
    let mut w = Wire::connect(gw.listen).await;
    let r = exchange(
        &mut w,
        b"GET /five HTTP/1.1\r\nHost: a.test\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_eq!(up.only("/five").values("x-request-id"), [id.as_str()]);
    // One more field is over the limit.
    let r = exchange(
        &mut w,
        b"GET /six HTTP/1.1\r\nHost: a.test\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 431, "{r:?}");
}

//! HTTP/2 through the front door, with real clients: curl over TLS (ALPN
//! `h2`) and with prior knowledge (h2c) on the plain listener; an h2c app
//! (`upstream_protocol: h2c`) reached from HTTP/1.1 and HTTP/2 clients; and
//! gRPC, unary and server-streaming, with the `@grpc/grpc-js` client and
//! server (Node.js, packages installed by `scripts/test`) over h2c and TLS.
//! Only loopback traffic.

mod front;

use std::net::SocketAddr;

use front::*;

/// An HTTP/2-only (h2c, prior knowledge) upstream answering
/// `<HTTP version> <:authority> <TE> <Via>`.
async fn h2c_upstream() -> SocketAddr {
    listen_loopback(move |stream| {
        let service =
            hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let h = |n: &str| header_or_dash(&req, n);
                let authority = req.uri().authority().map_or("-".into(), |a| a.to_string());
                let body = format!("{:?} {authority} {} {}", req.version(), h("te"), h("via"));
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(body),
                )))
            });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
        );
    })
    .await
}

#[tokio::test]
async fn h2_over_tls_and_h2c_with_prior_knowledge_are_proxied() {
    let dir = test_pki();
    let gw = gateway(dir.path(), "", "").await;
    let tls = gw.tls.unwrap();
    let write_out = ["-w", " %{http_version}"];
    // ALPN h2 over TLS, verified against the test CA.
    let (code, out) = curl(
        dir.path(),
        tls,
        "a.test",
        &[&["--http2"][..], &write_out].concat(),
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, format!("a.test:{} https 2", tls.port()).as_str())
    );
    // The app hears HTTP/1.1, and a Via naming the client's HTTP/2.
    let port = tls.port();
    let (code, out) = curl_raw(
        dir.path(),
        &[
            "--http2",
            "--cacert",
            "ca.pem",
            "--resolve",
            &format!("a.test:{port}:127.0.0.1"),
            &format!("https://a.test:{port}/via"),
        ],
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "HTTP/1.1 2 snapgate"));
    // A client that offers only HTTP/1.1 gets it.
    let (code, out) = curl(
        dir.path(),
        tls,
        "a.test",
        &[&["--http1.1"][..], &write_out].concat(),
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, format!("a.test:{port} https 1.1").as_str())
    );
    // h2c with prior knowledge on the plain listener, and HTTP/1.1 beside it.
    let plain = gw.listen;
    for (flag, version) in [("--http2-prior-knowledge", "2"), ("--http1.1", "1.1")] {
        let (code, out) = curl_raw(
            dir.path(),
            &[
                flag,
                "-H",
                "Host: c.test",
                "-w",
                " %{http_version}",
                &format!("http://{plain}/"),
            ],
        )
        .await;
        assert_eq!(
            (code, out.as_str()),
            (0, format!("c.test http {version}").as_str())
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn an_h2c_app_is_reached_over_http2_from_http1_and_http2_clients() {
    let dir = test_pki();
    let up = h2c_upstream().await;
    let gw = gateway_with(
        dir.path(),
        "",
        "",
        &format!(
            "  h2app:\n    hosts: [h2.b.test]\n    upstream: {up}\n    upstream_protocol: h2c\n"
        ),
    )
    .await;
    let port = gw.tls.unwrap().port();
    let https = format!("https://h2.b.test:{port}/x");
    let resolve = format!("h2.b.test:{port}:127.0.0.1");
    for (flag, via) in [("--http2", "2 snapgate"), ("--http1.1", "1.1 snapgate")] {
        let (code, out) = curl_raw(
            dir.path(),
            &[flag, "--cacert", "ca.pem", "--resolve", &resolve, &https],
        )
        .await;
        assert_eq!(
            (code, out.as_str()),
            (0, format!("HTTP/2.0 h2.b.test:{port} - {via}").as_str()),
            "{flag}"
        );
    }
    // A client's `TE: trailers` goes on to an HTTP/2 app (nothing else of
    // TE may, RFC 9113 section 8.2.2).
    let (code, out) = curl_raw(
        dir.path(),
        &[
            "--http1.1",
            "-H",
            "TE: trailers, gzip",
            "-H",
            "Connection: TE",
            "-H",
            "Host: h2.b.test",
            &format!("http://{}/", gw.listen),
        ],
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, "HTTP/2.0 h2.b.test trailers 1.1 snapgate")
    );
    gw.shutdown().await;
}

/// gRPC with the `@grpc/grpc-js` packages `scripts/test` installs: run
/// with the suite's other tests of installed tools (`vm-tests`).
#[cfg(feature = "vm-tests")]
mod grpc {
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::process::Stdio;
    use std::time::Duration;

    use super::front::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    /// Where `scripts/test` installed the gRPC packages.
    fn grpc_modules() -> PathBuf {
        std::env::var_os("SNAPGATE_GRPC_MODULES")
            .map(PathBuf::from)
            .expect("SNAPGATE_GRPC_MODULES (scripts/test installs the gRPC packages and sets it)")
    }

    fn grpc_app(file: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/apps/grpc")
            .join(file)
    }

    /// The gRPC Echo server on a free loopback port: the child (killed on
    /// drop) and its address.
    async fn grpc_server(modules: &Path) -> (tokio::process::Child, SocketAddr) {
        let mut child = tokio::process::Command::new("node")
            .arg(grpc_app("server.js"))
            .arg("0")
            .env("NODE_PATH", modules)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the gRPC server binds in time")
            .unwrap()
            .expect("the gRPC server says where it listens");
        let port: u16 = line
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        (child, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// One unary and one server-streaming call through `target` for
    /// `authority` (over TLS with the test CA when `ca` is given): the
    /// client's JSON line.
    async fn grpc_calls(
        modules: &Path,
        target: SocketAddr,
        authority: &str,
        ca: Option<&Path>,
    ) -> String {
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(grpc_app("client.js"))
            .arg(target.to_string())
            .arg(authority)
            .env("NODE_PATH", modules);
        if let Some(ca) = ca {
            cmd.arg(ca);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("the gRPC client finishes")
            .expect("node runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + &String::from_utf8_lossy(&out.stderr)
    }

    #[tokio::test]
    async fn grpc_unary_and_server_streaming_calls_pass_over_h2c_and_tls() {
        let modules = grpc_modules();
        let dir = test_pki();
        let (_server, up) = grpc_server(&modules).await;
        let gw = gateway_with(
            dir.path(),
            "",
            "",
            &format!(
                "  grpc:\n    hosts: [grpc.b.test]\n    upstream: {up}\n    upstream_protocol: h2c\n"
            ),
        )
        .await;
        let count = r#""count":["n 1","n 2","n 3","n 4","n 5"]"#;
        // h2c with prior knowledge on the plain listener.
        let out = grpc_calls(&modules, gw.listen, "grpc.b.test", None).await;
        assert_eq!(
            out,
            format!(r#"{{"say":{{"text":"hello","authority":"grpc.b.test"}},{count}}}"#)
        );
        // HTTP/2 over TLS, the certificate verified for the host.
        let tls = gw.tls.unwrap();
        let out = grpc_calls(
            &modules,
            tls,
            "grpc.b.test",
            Some(&dir.path().join("ca.pem")),
        )
        .await;
        assert_eq!(
            out,
            format!(r#"{{"say":{{"text":"hello","authority":"grpc.b.test"}},{count}}}"#)
        );
        gw.shutdown().await;
    }
}

/// A WebSocket echo server (tokio-tungstenite) on loopback.
async fn websocket_echo() -> SocketAddr {
    use futures::{SinkExt, StreamExt};
    listen_loopback(move |stream| {
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    return;
                }
            }
        });
    })
    .await
}

/// WebSocket over HTTP/2 (RFC 8441): an extended CONNECT on an h2c
/// connection (hyper's client, the WebSocket on it by tungstenite) reaches
/// an HTTP/1.1 WebSocket app through the gateway, which answers 200 and
/// echoes; the plain HTTP/1.1 handshake works beside it; an extended
/// CONNECT for another protocol gets 501.
#[tokio::test]
async fn websocket_over_http2_extended_connect_reaches_an_http1_app() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};
    let dir = test_pki();
    let ws_app = websocket_echo().await;
    let gw = gateway_with(
        dir.path(),
        "",
        "",
        &format!("  ws:\n    hosts: [ws.b.test]\n    upstream: {ws_app}\n"),
    )
    .await;
    let (mut h2, conn) = h2c_client(gw.listen).await;
    tokio::spawn(conn);
    let connect = |protocol: &'static str| {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("http://ws.b.test/chat")
            .header("sec-websocket-version", "13")
            .body(http_body_util::Empty::new())
            .unwrap();
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static(protocol));
        req
    };
    h2.ready().await.unwrap();
    let mut resp = h2.send_request(connect("websocket")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("sec-websocket-accept"));
    let io = hyper::upgrade::on(&mut resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(io),
        Role::Client,
        None,
    )
    .await;
    for text in ["over h2", "and again"] {
        ws.send(Message::text(text)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    ws.close(None).await.unwrap();
    // Closed both ways: the stream ends with it.
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);

    // Another protocol over extended CONNECT is not tunnelled.
    h2.ready().await.unwrap();
    let resp = h2.send_request(connect("other")).await.unwrap();
    assert_eq!(resp.status(), 501);
    drop(h2);

    // HTTP/1.1's own handshake, beside it.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/chat",
            gw.listen
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("host", "ws.b.test".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over h1")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("over h1"));
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);

    let metrics = metrics_text(gw.admin).await;
    assert!(
        metrics.contains("snapgate_upgrades_total{app=\"ws\",protocol=\"websocket\"} 2"),
        "{metrics}"
    );
    gw.shutdown().await;
}

/// hyper's HTTP/2 client on a new h2c connection to `addr`: its sender
/// and its connection (to be spawned).
async fn h2c_client(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    hyper::client::conn::http2::Connection<
        hyper_util::rt::TokioIo<tokio::net::TcpStream>,
        http_body_util::Empty<bytes::Bytes>,
        hyper_util::rt::TokioExecutor,
    >,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap()
}

/// `nghttp` (h2c with prior knowledge) GET of `path` on `host`, with
/// `headers`: its verbose output.
async fn nghttp(listen: SocketAddr, host: &str, path: &str, headers: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new("nghttp");
    cmd.args(["-v", "-H", &format!(":authority: {host}")]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://{listen}{path}"))
        .output()
        .await
        .expect("nghttp runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cookies an HTTP/2 client sends in fields of their own reach an
/// HTTP/1.1 app as one `Cookie` field (RFC 9113 section 8.2.3); a request
/// to upgrade to anything but WebSocket (h2c here) is passed on as a
/// plain request, its `Upgrade` removed.
#[tokio::test]
async fn cookies_are_joined_and_only_websocket_is_upgraded() {
    let dir = test_pki();
    let gw = gateway(dir.path(), "", "").await;
    let out = nghttp(
        gw.listen,
        "a.test",
        "/cookie",
        &["cookie: a=1", "cookie: b=2"],
    )
    .await;
    assert!(out.contains("\na=1; b=2"), "{out}");
    let (code, out) = curl_raw(
        dir.path(),
        &[
            "--http1.1",
            "-H",
            "Host: a.test",
            "-H",
            "Connection: Upgrade, HTTP2-Settings",
            "-H",
            "Upgrade: h2c",
            "-H",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            "-w",
            " %{http_code}",
            &format!("http://{}/upgrade", gw.listen),
        ],
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "- - 200"));
    gw.shutdown().await;
}

/// With `http2.enabled: false`, HTTPS still serves (HTTP/1.1, whatever
/// the client offers) and the plain listener speaks no h2c.
#[tokio::test]
async fn http2_can_be_turned_off() {
    let dir = test_pki();
    let gw = gateway(dir.path(), "http2: { enabled: false }\n", "").await;
    let tls = gw.tls.unwrap();
    let (code, out) = curl(
        dir.path(),
        tls,
        "a.test",
        &["--http2", "-w", " %{http_version}"],
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, format!("a.test:{} https 1.1", tls.port()).as_str())
    );
    let (code, _) = curl_raw(
        dir.path(),
        &[
            "--http2-prior-knowledge",
            "-H",
            "Host: c.test",
            &format!("http://{}/", gw.listen),
        ],
    )
    .await;
    assert_ne!(code, 0, "h2c was spoken with HTTP/2 off");
    gw.shutdown().await;
}

/// A connection that sends nothing, or an HTTP/2 connection with no
/// stream, is closed after `header_read_timeout` (1 s here); HTTP/2 says
/// GOAWAY first.
#[tokio::test]
async fn silent_and_idle_connections_are_closed_after_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    let dir = test_pki();
    let gw = gateway(dir.path(), "header_read_timeout: 1s\n", "").await;
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the silent connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "a silent connection got {:?}", &buf[..n]);
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));

    // A TLS client that finishes its handshake (ALPN http/1.1) and says
    // nothing more is closed as well: openssl s_client ends when it is.
    let mut silent = s_client(gw.tls.unwrap(), Some("http/1.1"));
    tokio::time::timeout(std::time::Duration::from_secs(10), silent.wait())
        .await
        .expect("the silent TLS connection is closed")
        .unwrap();

    let (mut h2, conn) = h2c_client(gw.listen).await;
    let conn = tokio::spawn(conn);
    h2.ready().await.unwrap();
    let req = http::Request::get("http://c.test/")
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    // Idle from now: the gateway ends the connection (GOAWAY, then close),
    // and the client's connection task ends with it.
    tokio::time::timeout(std::time::Duration::from_secs(10), conn)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .unwrap()
        .unwrap();
    gw.shutdown().await;
}

/// An HTTP/1.1 upstream answering with a body and a `grpc-status: 0`
/// trailer (when the request accepts trailers, as hyper requires).
async fn trailers_upstream() -> SocketAddr {
    listen_loopback(move |stream| {
        let service =
            hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let frames = vec![
                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                        bytes::Bytes::from("body"),
                    )),
                    Ok(hyper::body::Frame::trailers(trailers)),
                ];
                let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
                let resp = http::Response::builder()
                    .header("trailer", "grpc-status")
                    .body(body)
                    .unwrap();
                Ok::<_, std::convert::Infallible>(resp)
            });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
        );
    })
    .await
}

/// An h2c upstream that takes two streams at once and answers after
/// 200 ms.
async fn narrow_h2c_upstream() -> SocketAddr {
    listen_loopback(move |stream| {
        let service =
            hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from("narrow"),
                )))
            });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_streams(2)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
        );
    })
    .await
}

/// A raw upstream that answers every request with `101` to `Upgrade: foo`.
async fn wrong_switch_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    listen_loopback(move |mut stream| {
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\n")
                .await;
        });
    })
    .await
}

/// Trailers from an HTTP/1.1 app reach an HTTP/1.1 client that accepts
/// them; more header lines than `max_headers` get 431 over HTTP/2 as over
/// HTTP/1.1; an h2c app that takes two streams at once is sent twenty
/// requests at once and answers all (snapgate waits for its SETTINGS); an
/// app that switches a WebSocket request to another protocol is a 502.
#[tokio::test]
async fn trailers_header_counts_narrow_h2c_apps_and_wrong_switches() {
    let dir = test_pki();
    let (trailers, narrow, wrong) = (
        trailers_upstream().await,
        narrow_h2c_upstream().await,
        wrong_switch_upstream().await,
    );
    let gw = gateway_with(
        dir.path(),
        "",
        "",
        &format!(
            "  tr:\n    hosts: [tr.b.test]\n    upstream: {trailers}\n\
             \x20 narrow:\n    hosts: [narrow.b.test]\n    upstream: {narrow}\n    upstream_protocol: h2c\n\
             \x20 wrong:\n    hosts: [wrong.b.test]\n    upstream: {wrong}\n"
        ),
    )
    .await;
    let (code, out) = curl_raw(
        dir.path(),
        &[
            "--http1.1",
            "--raw",
            "-H",
            "Host: tr.b.test",
            "-H",
            "TE: trailers",
            &format!("http://{}/", gw.listen),
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("body") && out.contains("grpc-status: 0"),
        "{out:?}"
    );

    let headers: Vec<String> = (0..101).map(|i| format!("x-h{i}: 1")).collect();
    let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let out = nghttp(gw.listen, "a.test", "/", &refs).await;
    assert!(out.contains(":status: 431"), "{out}");

    let http = reqwest::Client::new();
    let asks = (0..20).map(|i| {
        http.get(format!("http://{}/{i}", gw.listen))
            .header("host", "narrow.b.test")
            .send()
    });
    for r in futures::future::join_all(asks).await {
        assert_eq!(r.unwrap().status(), 200);
    }

    let (code, out) = curl_raw(
        dir.path(),
        &[
            "-H",
            "Host: wrong.b.test",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{}/", gw.listen),
        ],
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "502"));
    gw.shutdown().await;
}

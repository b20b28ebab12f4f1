//! HTTP/2 through the front door, with real clients: curl over TLS (ALPN
//! `h2`) and with prior knowledge (h2c) on the plain listener; an h2c app
//! (`upstream_protocol: h2c`) reached from HTTP/1.1 and HTTP/2 clients; and
//! gRPC, unary and server-streaming, with the `@grpc/grpc-js` client and
//! server (Node.js, packages installed by `scripts/test`) over h2c and TLS.
//! Only loopback traffic.

mod front;

use std::net::SocketAddr;
use std::path::Path;

use front::*;

/// `curl` with `args` (its last one the URL): its exit code and output.
async fn curl_raw(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl")
        .current_dir(dir)
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// An HTTP/2-only (h2c, prior knowledge) upstream answering
/// `<HTTP version> <:authority> <TE> <Via>`.
async fn h2c_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let authority = req.uri().authority().map_or("-".into(), |a| a.to_string());
                    let body = format!("{:?} {authority} {} {}", req.version(), h("te"), h("via"));
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(body)),
                    ))
                },
            );
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
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

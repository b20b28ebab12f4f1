//! Static apps (a fixed upstream, no VMs) and the listener's own limits,
//! against a real upstream server and a real client on loopback.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny upstream: answers every request with its method and path.
async fn upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/hang" {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    let via = req
                        .headers()
                        .get("x-forwarded-host")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = format!("{} {} via {via}", req.method(), req.uri());
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(body)),
                    ))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

async fn gateway(
    upstream: std::net::SocketAddr,
) -> (tempfile::TempDir, snapgate::gateway::Running) {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("proxy.yaml");
    std::fs::write(
        &file,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nheader_read_timeout: 1s\nstate_dir: {}\n\
             network: {{ tap_prefix: sgst }}\n\
             apps:\n  site:\n    hosts: ['*.site.test']\n    upstream: {upstream}\n    response_timeout: 1s\n  gone:\n    hosts: [gone.test]\n    upstream: 127.0.0.1:1\n",
            state.path().display()
        ),
    )
    .unwrap();
    let config = snapgate::config::Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let running = snapgate::gateway::start(&config, &mut std::io::sink())
        .await
        .unwrap();
    (state, running)
}

#[tokio::test]
async fn static_apps_are_forwarded_and_a_dead_upstream_is_a_502() {
    let (_state, gw) = gateway(upstream().await).await;
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("http://{}/a/b?c=d", gw.listen))
        .header("host", "www.site.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "GET /a/b?c=d via www.site.test");
    let resp = http
        .get(format!("http://{}/", gw.listen))
        .header("host", "gone.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.text().await.unwrap(),
        "snapgate: app gone: the upstream failed the request\n"
    );
    // Counted by app and kind: the connection was refused.
    assert_eq!(
        sample(
            gw.admin,
            "snapgate_upstream_errors_total{app=\"gone\",kind=\"connect\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        sample(
            gw.admin,
            "snapgate_requests_total{app=\"gone\",held=\"false\",status=\"502\"}"
        )
        .await,
        1.0
    );
    gw.shutdown().await;
}

/// The value of the sample `series` (name and labels as exposed, labels
/// in name order), 0 when absent.
async fn sample(admin: std::net::SocketAddr, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn slow_headers_are_cut_off_at_header_read_timeout() {
    let (_state, gw) = gateway(upstream().await).await;
    let mut conn = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    let started = Instant::now();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: www.site.test\r\n")
        .await
        .unwrap();
    // Never finish the headers: the gateway must give up, not wait forever.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 10 s");
    assert!(started.elapsed() >= Duration::from_secs(1));
    gw.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_never_answers_gets_a_504_at_response_timeout() {
    let (_state, gw) = gateway(upstream().await).await;
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .get(format!("http://{}/hang", gw.listen))
        .header("host", "a.site.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() >= Duration::from_secs(1) && started.elapsed() < Duration::from_secs(10)
    );
    assert_eq!(
        resp.text().await.unwrap(),
        "snapgate: app site: no response in time\n"
    );
    assert_eq!(
        sample(
            gw.admin,
            "snapgate_upstream_errors_total{app=\"site\",kind=\"timeout\"}"
        )
        .await,
        1.0
    );
    gw.shutdown().await;
}

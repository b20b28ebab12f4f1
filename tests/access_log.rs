//! The access log of the real `snapgate` binary (JSON lines on stderr,
//! which is no terminal here), against a static app on loopback: one line
//! per request, however it ends.

mod front;

use std::time::Duration;

use front::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The access lines of `log` so far.
fn access_lines(log: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "snapgate::access")
        .map(|l| l["fields"].clone())
        .collect()
}

/// Waits (at most 10 s) until `log` has the access line of `path`; its
/// lines for that path.
async fn lines_of(log: &std::path::Path, path: &str) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<Value> = access_lines(log)
            .into_iter()
            .filter(|l| l["path"] == path)
            .collect();
        if !found.is_empty() {
            // A second line would be written at the same moment.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return access_lines(log)
                .into_iter()
                .filter(|l| l["path"] == path)
                .collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no access line for {path}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_request_gets_one_access_line_however_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream().await;
    let config = static_site_config(dir.path(), up);
    let log = dir.path().join("log");
    let gw = Binary::start_logged(&config, Duration::from_secs(60), &log).await;
    let client = reqwest::Client::new();
    let url = |p: &str| format!("http://{}{p}", gw.listen);

    // A whole answer: its bytes, its id, the app.
    let resp = client
        .get(url("/whole"))
        .header("host", "site.test")
        .header("x-request-id", "r-1")
        .send()
        .await
        .unwrap();
    let body = resp.bytes().await.unwrap();
    let [l] = &lines_of(&log, "/whole").await[..] else {
        panic!("one line")
    };
    assert_eq!(l["status"], 200);
    assert_eq!(l["bytes"].as_u64(), Some(body.len() as u64));
    assert_eq!(l["request_id"], "r-1");
    assert_eq!(l["app"], "site");
    assert_eq!(l["host"], "site.test");
    assert_eq!(l["held"], false);
    assert_eq!(l["completed"], true);
    assert!(l["instance"].is_null(), "a static app has no instance");

    // HEAD: no body, complete.
    let resp = client
        .head(url("/head"))
        .header("host", "site.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let [l] = &lines_of(&log, "/head").await[..] else {
        panic!("one line")
    };
    assert_eq!(
        (l["method"].as_str(), l["bytes"].as_u64()),
        (Some("HEAD"), Some(0))
    );
    assert_eq!(l["completed"], true);

    // snapgate's own answer, to HEAD: complete too.
    let resp = client
        .head(url("/unknown"))
        .header("host", "nobody.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let [l] = &lines_of(&log, "/unknown").await[..] else {
        panic!("one line")
    };
    assert_eq!(
        (l["status"].as_u64(), l["completed"].as_bool()),
        (Some(404), Some(true))
    );
    assert!(l["app"].is_null());

    // The client goes away before the response head: 499, once.
    let mut conn = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    conn.write_all(b"GET /slow/2000 HTTP/1.1\r\nhost: site.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(conn);
    let [l] = &lines_of(&log, "/slow/2000").await[..] else {
        panic!("one line")
    };
    assert_eq!(l["status"], 499);
    assert_eq!(l["completed"], false);
    assert_eq!(l["bytes"], 0);

    // The client reads the head, then goes away: still one line, with
    // the status it got.
    let mut conn = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    conn.write_all(b"GET /slow/1 HTTP/1.1\r\nhost: site.test\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(conn);
    let lines = lines_of(&log, "/slow/1").await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["status"], 200);

    // HTTP/2 (nghttp, h2c with prior knowledge): three streams on one
    // connection, a line each.
    let urls: Vec<String> = (0..3).map(|i| url(&format!("/h2/{i}"))).collect();
    let out = tokio::process::Command::new("nghttp")
        .args(["-n", "-H", ":authority: site.test"])
        .args(&urls)
        .output()
        .await
        .expect("nghttp (Debian package nghttp2-client; scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..3 {
        let lines = lines_of(&log, &format!("/h2/{i}")).await;
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["version"], "HTTP/2");
        assert_eq!(lines[0]["status"], 200);
        assert_eq!(lines[0]["completed"], true);
    }
}

//! The TLS listener against real TLS clients (curl, openssl s_client)
//! and certificates made by `openssl` for the test: a test CA, one
//! certificate for `a.test` and one for `*.b.test`. Only loopback traffic.

mod front;

use front::*;

#[tokio::test]
async fn two_hosts_two_certificates_verified_by_a_real_client() {
    let dir = test_pki();
    let gw = gateway(dir.path(), "", "").await;
    let tls = gw.tls.expect("a TLS listener");
    let (code, out) = curl(dir.path(), tls, "a.test", &[]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, format!("a.test:{} https", tls.port()).as_str())
    );
    let (code, out) = curl(dir.path(), tls, "x.b.test", &[]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, format!("x.b.test:{} https", tls.port()).as_str())
    );
    assert_eq!(
        certificate_for(dir.path(), tls, "a.test").await.as_deref(),
        Some("CN = a")
    );
    assert_eq!(
        certificate_for(dir.path(), tls, "x.b.test")
            .await
            .as_deref(),
        Some("CN = b")
    );
    // A wildcard covers one label only.
    assert_eq!(certificate_for(dir.path(), tls, "y.x.b.test").await, None);
    // The plain listener still says http.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/", gw.listen))
        .header("host", "a.test")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(plain, "a.test http");
    // Nothing older than TLS 1.2 is spoken: a client that offers only
    // TLS 1.1 (its own security level lowered so that it would) is refused.
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &tls.to_string(),
            "-servername",
            "a.test",
        ])
        .args(["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a TLS 1.1 handshake succeeded: {text}"
    );
    assert!(
        text.contains("alert handshake failure") || text.contains("alert protocol version"),
        "no alert from the server: {text}"
    );
    // A request on a.test's connection for another host of the app is
    // misdirected (the certificate was not chosen for it).
    let (code, out) = curl(
        dir.path(),
        tls,
        "a.test",
        &[
            "-H",
            "Host: c.test",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ],
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "421"));
    gw.shutdown().await;
}

#[tokio::test]
async fn an_unknown_sni_fails_the_handshake_unless_a_default_is_configured() {
    let dir = test_pki();
    let gw = gateway(dir.path(), "", "").await;
    let tls = gw.tls.unwrap();
    assert_eq!(certificate_for(dir.path(), tls, "c.test").await, None);
    let (code, out) = curl(dir.path(), tls, "c.test", &["-k"]).await;
    assert_eq!(code, 35, "curl: {out}");
    // Both failed handshakes counted as TLS errors (an alert was sent).
    let text = metrics_text(gw.admin).await;
    assert!(
        text.contains("snapgate_tls_handshake_failures_total{reason=\"tls\"} 2\n"),
        "{text}"
    );
    gw.shutdown().await;

    let gw = gateway(dir.path(), "", "  default_host: a.test\n").await;
    let tls = gw.tls.unwrap();
    assert_eq!(
        certificate_for(dir.path(), tls, "c.test").await.as_deref(),
        Some("CN = a")
    );
    // The certificate is a.test's, so a verifying client refuses it for
    // c.test; one that does not verify is served.
    let (code, _) = curl(dir.path(), tls, "c.test", &[]).await;
    assert_eq!(code, 60, "the a.test certificate verified for c.test");
    let (code, out) = curl(dir.path(), tls, "c.test", &["-k"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, format!("c.test:{} https", tls.port()).as_str())
    );
    // curl negotiates TLS 1.3.
    let text = metrics_text(gw.admin).await;
    let done: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("snapgate_tls_handshakes_total{version=\"TLSv1.3\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(done >= 1.0, "{text}");
    gw.shutdown().await;
}

/// With `redirect_http`, the plain listener sends hosts that have a
/// certificate to HTTPS (308, the target kept); other hosts are served.
#[tokio::test]
async fn redirect_http_sends_hosts_with_a_certificate_to_https() {
    let dir = test_pki();
    let gw = gateway(dir.path(), "", "  redirect_http: true\n").await;
    let tls = gw.tls.unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |host: &'static str| {
        http.get(format!("http://{}/p?q=1", gw.listen))
            .header("host", host)
            .send()
    };
    let resp = get("A.test").await.unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://a.test:{}/p?q=1", tls.port()).as_str()
    );
    let resp = get("x.b.test").await.unwrap();
    assert_eq!(
        resp.headers()["location"],
        format!("https://x.b.test:{}/p?q=1", tls.port()).as_str()
    );
    let resp = get("c.test").await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "c.test has no certificate: served over http"
    );
    assert_eq!(resp.text().await.unwrap(), "c.test http");
    // And the redirect's target answers.
    let (code, out) = curl(dir.path(), tls, "a.test", &[]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, format!("a.test:{} https", tls.port()).as_str())
    );
    gw.shutdown().await;
}

/// testssl.sh (Debian's, installed by `scripts/test`, hence gated with the
/// VM tests) against the TLS listener: no protocol, cipher or
/// vulnerability finding of medium severity or worse. The test CA is added
/// to its trust store; findings about the certificate itself (a one-day
/// test certificate with no revocation service) are the test's, not the
/// listener's, and are left out, as are the HTTP security headers of the
/// answer (HSTS and the like), which are the app's.
#[cfg(feature = "vm-tests")]
#[tokio::test]
async fn testssl_finds_no_weak_protocol_or_cipher() {
    let dir = test_pki();
    let gw = gateway(dir.path(), "", "").await;
    let tls = gw.tls.unwrap();
    let out = tokio::process::Command::new("testssl")
        .current_dir(dir.path())
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--add-ca",
            "ca.pem",
        ])
        .args(["--jsonfile", "testssl.json", "--ip", "127.0.0.1"])
        .arg(format!("https://a.test:{}/", tls.port()))
        .output()
        .await
        .expect("testssl runs (scripts/test installs it)");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = std::fs::read_to_string(dir.path().join("testssl.json"))
        .unwrap_or_else(|e| panic!("no testssl.json ({e}); it printed:\n{report}"));
    let findings: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| {
            let id = f["id"].as_str().unwrap_or("");
            let severity = f["severity"].as_str().unwrap_or("");
            matches!(severity, "MEDIUM" | "HIGH" | "CRITICAL")
                && !id.starts_with("cert")
                && !id.starts_with("intermediate_cert")
                && !matches!(id, "OCSP_stapling" | "DNS_CAArecord" | "security_headers")
        })
        .map(|f| format!("{} {}: {}", f["severity"], f["id"], f["finding"]))
        .collect();
    let offered: Vec<String> = findings
        .iter()
        .filter(|f| {
            let id = f["id"].as_str().unwrap_or("");
            ["SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"].contains(&id)
        })
        .map(|f| format!("{}: {}", f["id"], f["finding"]))
        .collect();
    eprintln!("testssl.sh protocols: {offered:?}");
    eprintln!("{report}");
    assert!(bad.is_empty(), "testssl.sh findings:\n{}", bad.join("\n"));
    assert_eq!(
        offered.len(),
        6,
        "testssl.sh tested every protocol: {offered:?}"
    );
    gw.shutdown().await;
}

/// The connection caps are one for both listeners: a TLS connection
/// counts against the same per-client cap as a plain one.
#[tokio::test]
async fn both_listeners_share_the_connection_caps() {
    let dir = test_pki();
    let gw = gateway(
        dir.path(),
        "limits: { max_connections_per_client: 1 }\n",
        "",
    )
    .await;
    let tls = gw.tls.unwrap();
    // A TLS connection held open (the handshake done, no request yet).
    let mut held = s_client(tls, None);
    // Wait until the gateway counts it.
    let metrics = format!("http://{}/metrics", gw.admin);
    let mut counted = false;
    for _ in 0..100 {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        if text.lines().any(|l| l == "snapgate_client_connections 1") {
            counted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(counted, "the TLS connection was never counted");
    // Refused connections are answered at once, before any request.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    let _ = plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "a plain connection beside the TLS one: {answer}"
    );
    held.kill().await.unwrap();
    gw.shutdown().await;
}

/// `snapgate check` loads the certificates as `run` does: a key that is
/// not the certificate's is an error naming its key path.
#[tokio::test]
async fn check_refuses_a_key_that_is_not_the_certificates() {
    let dir = test_pki();
    let file = dir.path().join("proxy.yaml");
    std::fs::write(
        &file,
        "tls:\n  listen: 127.0.0.1:0\n  certificates:\n\
         \x20   - { hosts: [a.test], cert: a.pem, key: b.key }\n\
         apps:\n  site:\n    hosts: [a.test]\n    upstream: 127.0.0.1:1\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapgate"))
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check passed a mismatched key");
    assert!(
        err.contains("tls.certificates[0].key") && err.contains("does not match"),
        "{err}"
    );
}

/// Certificates are reloaded when their files change, with no config
/// reload: a.test's files are overwritten with another certificate and
/// key, and the next handshake shows it; files that do not load (a key
/// that is not the certificate's) leave the one in use.
#[tokio::test]
async fn changed_certificate_files_are_served_on_the_next_handshake() {
    let dir = tempfile::tempdir().unwrap();
    pki(
        dir.path(),
        &[("a", "a.test"), ("b", "*.b.test"), ("a2", "a.test")],
    );
    let gw = gateway(dir.path(), "", "").await;
    let tls = gw.tls.unwrap();
    assert_eq!(
        certificate_for(dir.path(), tls, "a.test").await.as_deref(),
        Some("CN = a")
    );
    let p = |f: &str| dir.path().join(f);
    // A mismatched pair first: the key of a2 with the certificate of a.
    std::fs::copy(p("a2.key"), p("a.key")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // The watcher settles for 300 ms after the last change; look until
    // the deadline that nothing else is served meanwhile.
    while std::time::Instant::now() < deadline - std::time::Duration::from_secs(8) {
        assert_eq!(
            certificate_for(dir.path(), tls, "a.test").await.as_deref(),
            Some("CN = a"),
            "a certificate whose key does not match was taken"
        );
    }
    std::fs::copy(p("a2.pem"), p("a.pem")).unwrap();
    loop {
        let seen = certificate_for(dir.path(), tls, "a.test").await;
        if seen.as_deref() == Some("CN = a2") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {seen:?} after the files changed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let metrics = metrics_text(gw.admin).await;
    assert!(
        metrics.contains("snapgate_certificate_reloads_total{result=\"rejected\"}"),
        "{metrics}"
    );
    gw.shutdown().await;
}

/// An idle kept-alive HTTPS connection is parked like a plain one (its
/// HTTP state freed, its TLS session kept) and serves its next request.
#[tokio::test]
async fn an_idle_tls_connection_is_parked_and_serves_its_next_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = test_pki();
    let gw = gateway(dir.path(), "", "").await;
    let tls = gw.tls.unwrap();
    let mut client = s_client(tls, Some("http/1.1"));
    let (mut to, mut from) = (client.stdin.take().unwrap(), client.stdout.take().unwrap());
    let mut seen = String::new();
    // Sends a request and reads until the answer's body has arrived.
    let mut exchange = async |n: usize| {
        to.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let read = async {
            let mut buf = [0u8; 4096];
            while seen.matches("a.test https").count() < n {
                let k = from.read(&mut buf).await.unwrap();
                assert!(k > 0, "the connection closed: {seen}");
                seen.push_str(&String::from_utf8_lossy(&buf[..k]));
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .unwrap_or_else(|_| panic!("answer {n}: nothing within 10 s: {seen}"));
    };
    exchange(1).await;
    let parked = |want: &'static str| {
        let metrics = format!("http://{}/metrics", gw.admin);
        async move {
            for _ in 0..250 {
                let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
                if text.lines().any(|l| l == want) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("never {want}");
        }
    };
    parked("snapgate_client_connections_parked 1").await;
    exchange(2).await;
    assert_eq!(seen.matches("HTTP/1.1 200").count(), 2, "{seen}");
    client.kill().await.unwrap();
    parked("snapgate_client_connections_parked 0").await;
    gw.shutdown().await;
}

/// A parked TLS connection whose client sends part of a TLS record, a byte
/// at a time, still closes once idle for header_read_timeout (3 s here):
/// bytes that give hyper nothing to read do not restart the count.
#[tokio::test]
async fn a_parked_tls_connection_fed_part_of_a_record_still_closes_when_idle_too_long() {
    use rustls_pki_types::pem::PemObject;
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let dir = test_pki();
    let gw = gateway(dir.path(), "header_read_timeout: 3s\n", "").await;
    let (tls, admin) = (gw.tls.unwrap(), gw.admin);
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let name = rustls_pki_types::ServerName::try_from("a.test").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut sock = std::net::TcpStream::connect(tls).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut tls_stream = rustls::Stream::new(&mut conn, &mut sock);
        tls_stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap();
        // The whole answer (head and body may come in two records).
        let mut buf = [0u8; 4096];
        let mut seen = String::new();
        while !seen.contains("a.test https") {
            let n = tls_stream.read(&mut buf).unwrap();
            assert!(n > 0, "closed: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
        let idle_since = Instant::now();
        // Parked before the bytes come: they wake a parked connection.
        let parked = || {
            let mut admin = std::net::TcpStream::connect(admin).unwrap();
            admin
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            admin.read_to_string(&mut text).unwrap();
            text.lines()
                .any(|l| l == "snapgate_client_connections_parked 1")
        };
        while !parked() {
            assert!(
                idle_since.elapsed() < Duration::from_secs(2),
                "never parked"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // One record of a request head that never ends, its bytes sent
        // one every 1.5 s: the socket turns readable, hyper gets nothing.
        conn.writer().write_all(&[b'X'; 1000]).unwrap();
        let mut record = Vec::new();
        conn.write_tls(&mut record).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        for byte in record.iter().take(20) {
            if sock.write_all(std::slice::from_ref(byte)).is_err() {
                return idle_since.elapsed();
            }
            match sock.read(&mut buf) {
                Ok(0) => return idle_since.elapsed(),
                Ok(_) => panic!("an answer to part of a record"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return idle_since.elapsed(),
            }
        }
        idle_since.elapsed()
    })
    .await
    .unwrap();
    // Closed about 3 s after going idle (the next byte's read sees it), not
    // held open by the bytes (20 of them would take 30 s).
    assert!(
        outcome < Duration::from_secs(8),
        "still open {outcome:?} after going idle"
    );
    gw.shutdown().await;
}

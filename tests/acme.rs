//! Automatic certificates against a real ACME CA: Debian's `pebble` (RFC
//! 8555 test server, installed by `scripts/test`), validating HTTP-01 and
//! TLS-ALPN-01 for real by connecting to the gateway's listeners, with
//! `pebble-challtestsrv` as its DNS (every name is 127.0.0.1). Clients are
//! curl and openssl s_client, trusting the root pebble made at start.
//! Only loopback traffic.
#![cfg(feature = "vm-tests")]

mod front;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use front::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Free loopback ports, found by binding and releasing them.
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// pebble and its DNS, killed on drop.
struct Pebble {
    _pebble: tokio::process::Child,
    _dns: tokio::process::Child,
    /// pebble's log (stdout and stderr), line by line, as it runs.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    directory: String,
    management: SocketAddr,
}

impl Pebble {
    /// Starts pebble validating challenges against `http_port` (HTTP-01)
    /// and `tls_port` (TLS-ALPN-01) on 127.0.0.1, issuing certificates
    /// valid for `validity`; its own HTTPS certificate is `dir`'s
    /// `pebble.pem`, made by the test CA.
    async fn start(dir: &Path, http_port: u16, tls_port: u16, validity: Duration) -> Pebble {
        let [listen, management, dns_port, dns_management] = free_ports::<4>();
        let dns = tokio::process::Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("pebble-challtestsrv runs");
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": dir.join("pebble.pem"),
                "privateKey": dir.join("pebble.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity.as_secs(),
            }
        });
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let mut pebble = tokio::process::Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            // Validations at once; no nonce refused at random.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("pebble runs");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let mut out = BufReader::new(pebble.stdout.take().unwrap()).lines();
        let mut err = BufReader::new(pebble.stderr.take().unwrap()).lines();
        let lines = log.clone();
        tokio::spawn(async move {
            loop {
                let line = tokio::select! {
                    l = out.next_line() => l,
                    l = err.next_line() => l,
                };
                let Ok(Some(line)) = line else { return };
                if line.contains("ACME directory available") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .expect("pebble serves its directory in time")
            .expect("pebble ran");
        Pebble {
            _pebble: pebble,
            _dns: dns,
            log,
            directory: format!("https://localhost:{listen}/dir"),
            management: SocketAddr::from(([127, 0, 0, 1], management)),
        }
    }

    /// New-order requests pebble has received.
    fn orders(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("POST /order-plz"))
            .count()
    }

    /// The root pebble issues under, written to `dir/acme-root.pem`.
    async fn root(&self, dir: &Path) -> PathBuf {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(dir.join("ca.pem"))
            .arg(format!(
                "https://localhost:{}/roots/0",
                self.management.port()
            ))
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = dir.join("acme-root.pem");
        std::fs::write(&path, &out.stdout).unwrap();
        path
    }
}

/// A gateway at `http` and `tls` (ports) with `tls.acme` on `pebble`,
/// answering `challenge`, for one static app on `hosts`; state in `state`.
async fn gateway(
    dir: &Path,
    state: &Path,
    (http, tls): (u16, u16),
    pebble: &Pebble,
    challenge: &str,
    hosts: &[&str],
) -> snapgate::gateway::Running {
    let up = upstream().await;
    let file = dir.join("proxy.yaml");
    std::fs::write(
        &file,
        format!(
            "listen: 127.0.0.1:{http}\nadmin: 127.0.0.1:0\nstate_dir: {}\n\
             network: {{ tap_prefix: sgac }}\n\
             tls:\n  listen: 127.0.0.1:{tls}\n  acme:\n    directory: {}\n    ca_root: ca.pem\n\
             \x20   challenge: {challenge}\n    contact: ['mailto:ops@acme.test']\n\
             apps:\n  site:\n    hosts: [{}]\n    upstream: {up}\n",
            state.display(),
            pebble.directory,
            hosts.join(", "),
        ),
    )
    .unwrap();
    let config = snapgate::config::Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    snapgate::gateway::start(&config, &mut std::io::sink())
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `curl https://<host>:<port>/` verifying against `root`: exit code and
/// output.
async fn curl_verified(root: &Path, port: u16, host: &str) -> (i32, String) {
    let root = root.display().to_string();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/");
    curl_raw(
        Path::new("."),
        &["--cacert", &root, "--resolve", &resolve, &url],
    )
    .await
}

/// The serial of the certificate served for `sni`, or `None` if the
/// handshake fails.
async fn serial(port: u16, sni: &str) -> Option<String> {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {sni} </dev/null 2>/dev/null | openssl x509 -noout -serial"
    );
    let out = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text.strip_prefix("serial=").map(str::to_owned)
}

/// Waits (at most `within`) until `curl` to `host` verifies and answers.
async fn until_served(root: &Path, port: u16, host: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (code, out) = curl_verified(root, port, host).await;
        if code == 0 {
            assert_eq!(out, format!("{host}:{port} https"));
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host}: not served in time: curl {code}: {out}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A configured host without a certificate file gets one from
/// pebble over HTTP-01, served on the next handshake and verified by curl
/// against pebble's root; it is renewed before it expires (pebble issues
/// for 30 s here: renewed at two thirds); an SNI the config does not name
/// fails its handshake and makes no order; a restart serves the stored
/// certificate with no new order; and TLS-ALPN-01 gets a second host its
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_and_renews_for_named_hosts_only() {
    // The gateway's log (its ACME steps) shows with a failure.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("snapgate=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &[("pebble", "localhost")]);
    let ports = {
        let [a, b] = free_ports::<2>();
        (a, b)
    };
    let pebble = Pebble::start(dir.path(), ports.0, ports.1, Duration::from_secs(30)).await;
    let root = pebble.root(dir.path()).await;
    let state = dir.path().join("state-http01");

    // HTTP-01.
    let gw = gateway(
        dir.path(),
        &state,
        ports,
        &pebble,
        "http-01",
        &["one.acme.test"],
    )
    .await;
    until_served(&root, ports.1, "one.acme.test", Duration::from_secs(60)).await;
    let first = serial(ports.1, "one.acme.test")
        .await
        .expect("a certificate");
    assert_eq!(pebble.orders(), 1);

    // A name the config does not list: no certificate, no order.
    assert_eq!(serial(ports.1, "evil.acme.test").await, None);
    let (code, _) = curl_verified(&root, ports.1, "evil.acme.test").await;
    assert_ne!(code, 0);
    assert_eq!(pebble.orders(), 1, "an unknown SNI caused an order");

    // Renewal before expiry: a new serial within the certificate's life.
    let deadline = Instant::now() + Duration::from_secs(40);
    let renewed = loop {
        match serial(ports.1, "one.acme.test").await {
            Some(s) if s != first => break s,
            _ => {}
        }
        assert!(Instant::now() < deadline, "not renewed within 40 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(pebble.orders(), 2);
    let (code, out) = curl_verified(&root, ports.1, "one.acme.test").await;
    assert_eq!(code, 0, "{out}");
    let metrics = metrics_text(gw.admin).await;
    assert!(
        metrics.contains("snapgate_acme_orders_total{host=\"one.acme.test\",result=\"issued\"} 2"),
        "{metrics}"
    );
    gw.shutdown().await;
    // The certificate and account are kept under state_dir, owner-only.
    let stored = std::fs::read_dir(state.join("acme"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::PermissionsExt;
    for f in [
        "account.json",
        "certs/one.acme.test.key",
        "certs/one.acme.test.pem",
    ] {
        let mode = std::fs::metadata(stored.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // A restart serves the stored certificate at once, with no order.
    let gw = gateway(
        dir.path(),
        &state,
        ports,
        &pebble,
        "http-01",
        &["one.acme.test"],
    )
    .await;
    assert_eq!(serial(ports.1, "one.acme.test").await, Some(renewed));
    assert_eq!(pebble.orders(), 2);
    gw.shutdown().await;

    // TLS-ALPN-01, on a state of its own.
    let state = dir.path().join("state-tls-alpn-01");
    let gw = gateway(
        dir.path(),
        &state,
        ports,
        &pebble,
        "tls-alpn-01",
        &["two.acme.test"],
    )
    .await;
    until_served(&root, ports.1, "two.acme.test", Duration::from_secs(60)).await;
    assert_eq!(pebble.orders(), 3);
    gw.shutdown().await;
}

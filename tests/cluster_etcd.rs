//! A cluster node on an etcd that demands TLS with client certificates
//! and a user with a password (`cluster.etcd.tls`, `username`,
//! `password_file`): a real etcd (Debian's `etcd-server`) on loopback,
//! a test CA made by `openssl`, etcd's users and roles set through its
//! JSON gateway with `curl`.
#![cfg(feature = "vm-tests")]

mod front;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `curl` to etcd's JSON gateway over TLS with the test client
/// certificate: the answer's body.
fn etcd_api(dir: &Path, port: u16, path: &str, body: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(dir.join("ca.pem"))
        .arg("--cert")
        .arg(dir.join("client.pem"))
        .arg("--key")
        .arg(dir.join("client.key"))
        .args(["-X", "POST", "-d", body])
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn b64(s: &str) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s)
}

/// A node's `/cluster` view.
async fn view(admin: std::net::SocketAddr) -> serde_json::Value {
    reqwest::get(format!("http://{admin}/cluster"))
        .await
        .expect("/cluster")
        .json()
        .await
        .expect("JSON")
}

fn node_config(
    dir: &Path,
    node: &str,
    listen: u16,
    port: u16,
    password_file: &str,
) -> std::path::PathBuf {
    let config = dir.join(format!("{node}.yaml"));
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:0\nshutdown_grace: 2s\n\
             state_dir: {state}\n\
             cluster:\n  node: {node}\n  advertise: 127.0.0.1:{listen}\n  secret_file: secret\n  \
             etcd:\n    endpoints: [\"https://127.0.0.1:{port}\"]\n    username: snapgate\n    \
             password_file: {password_file}\n    \
             tls: {{ ca: ca.pem, cert: client.pem, key: client.key }}\n\
             apps:\n  site:\n    hosts: [site.test]\n    upstream: 127.0.0.1:1\n",
            state = dir.join(format!("{node}-state")).display(),
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_registers_in_an_etcd_with_client_certificates_and_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    front::pki(
        d,
        &[("etcd", "localhost,IP:127.0.0.1"), ("client", "client")],
    );
    std::fs::write(d.join("secret"), "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::write(d.join("password"), "the-snapgate-password\n").unwrap();
    std::fs::write(d.join("wrong"), "not-the-password\n").unwrap();
    let (port, peer) = (free_port(), free_port());
    let log = std::fs::File::create(d.join("etcd.log")).unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _etcd = Killed(
        Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(d.join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("https://127.0.0.1:{port}"),
                "--advertise-client-urls",
                &format!("https://127.0.0.1:{port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("t=http://127.0.0.1:{peer}"),
                "--client-cert-auth",
            ])
            .arg("--cert-file")
            .arg(d.join("etcd.pem"))
            .arg("--key-file")
            .arg(d.join("etcd.key"))
            .arg("--trusted-ca-file")
            .arg(d.join("ca.pem"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian package etcd-server)"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !etcd_api(d, port, "/v3/maintenance/status", "{}").contains("\"leader\"") {
        assert!(std::time::Instant::now() < deadline, "etcd did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A root user (etcd needs one to enable authentication), and a user
    // `snapgate` that may read and write the catalog's prefix only.
    for (path, body) in [
        ("/v3/auth/role/add", r#"{"name":"root"}"#.to_owned()),
        (
            "/v3/auth/user/add",
            r#"{"name":"root","password":"root-password"}"#.to_owned(),
        ),
        (
            "/v3/auth/user/grant",
            r#"{"user":"root","role":"root"}"#.to_owned(),
        ),
        ("/v3/auth/role/add", r#"{"name":"catalog"}"#.to_owned()),
        (
            "/v3/auth/role/grant",
            format!(
                r#"{{"name":"catalog","perm":{{"permType":"READWRITE","key":"{}","range_end":"{}"}}}}"#,
                b64("/snapgate/"),
                b64("/snapgate0")
            ),
        ),
        (
            "/v3/auth/user/add",
            r#"{"name":"snapgate","password":"the-snapgate-password"}"#.to_owned(),
        ),
        (
            "/v3/auth/user/grant",
            r#"{"user":"snapgate","role":"catalog"}"#.to_owned(),
        ),
        ("/v3/auth/enable", "{}".to_owned()),
    ] {
        let said = etcd_api(d, port, path, &body);
        assert!(said.contains("\"header\""), "{path}: {said}");
    }

    // The node with the right password registers and watches.
    let listen = free_port();
    let good = node_config(d, "node-a", listen, port, "password");
    let a = front::Binary::start(&good, Duration::from_secs(60)).await;
    let mut registered = false;
    for _ in 0..100 {
        let v = view(a.admin).await;
        if v["degraded"].is_null()
            && v["nodes"]["node-a"]["address"] == format!("127.0.0.1:{listen}")
        {
            registered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(registered, "{}", view(a.admin).await);

    // A node with the wrong password never reads the catalog, and says so.
    let other = free_port();
    let bad = node_config(d, "node-b", other, port, "wrong");
    let b = front::Binary::start(&bad, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = view(b.admin).await;
    let why = v["degraded"].as_str().unwrap_or_default();
    assert!(why.contains("never read"), "{v}");
    let ready: serde_json::Value = reqwest::get(format!("http://{}/readyz", b.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["degraded"], true, "{ready}");
    // And node-a's catalog never got it.
    assert!(view(a.admin).await["nodes"]["node-b"].is_null());
    drop((a, b));
}

//! What the front door's tests share: a test PKI made by `openssl` (a test
//! CA, certificates for `a.test` and `*.b.test`), an HTTP/1.1 upstream, a
//! gateway with a TLS listener in front of it, and real TLS clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA in `dir` (`ca.pem`, `ca.key`) and, for each `(name, san)`, a
/// certificate `<name>.pem` with key `<name>.key` that it signed.
pub fn pki(dir: &Path, leaves: &[(&str, &str)]) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=snapgate test CA",
        ],
    );
    for (name, san) in leaves {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName=DNS:{san}\n"),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

/// A temporary directory with the test CA and the certificates for
/// `a.test` (`a.pem`) and `*.b.test` (`b.pem`).
pub fn test_pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &[("a", "a.test"), ("b", "*.b.test")]);
    dir
}

/// An HTTP/1.1 upstream answering `<Host> <X-Forwarded-Proto>`, or, for
/// `/via`, `<HTTP version> <Via>`, for `/cookie` its `Cookie` fields
/// joined by `|`, for `/upgrade` `<Upgrade> <Connection>`; `/slow/<ms>`
/// answers after `ms` milliseconds.
pub async fn upstream() -> SocketAddr {
    upstream_counting().await.0
}

/// [`upstream`], and a count of the `/slow/` requests it has begun.
pub async fn upstream_counting() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = slow.clone();
    let addr = listen_loopback(move |stream| {
        let slow = counted.clone();
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let slow = slow.clone();
                async move {
                    let h = |n: &str| header_or_dash(&req, n);
                    let path = req.uri().path();
                    if let Some(ms) = path.strip_prefix("/slow/").and_then(|m| m.parse().ok()) {
                        slow.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    let body = match path {
                        "/via" => format!("{:?} {}", req.version(), h("via")),
                        "/cookie" => req
                            .headers()
                            .get_all("cookie")
                            .iter()
                            .map(|v| v.to_str().unwrap_or("?"))
                            .collect::<Vec<_>>()
                            .join("|"),
                        "/upgrade" => format!("{} {}", h("upgrade"), h("connection")),
                        _ => format!("{} {}", h("host"), h("x-forwarded-proto")),
                    };
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from(body)),
                    ))
                }
            });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
        );
    })
    .await;
    (addr, slow)
}

/// A gateway with a TLS listener serving the two test certificates (more
/// keys of `tls:` in `tls_extra`, each line indented by two spaces) in
/// front of one static app; `top`: more top-level keys.
pub async fn gateway(dir: &Path, top: &str, tls_extra: &str) -> snapgate::gateway::Running {
    gateway_with(dir, top, tls_extra, "").await
}

/// [`gateway`] with more apps: `apps_extra`, each line indented by two
/// spaces.
pub async fn gateway_with(
    dir: &Path,
    top: &str,
    tls_extra: &str,
    apps_extra: &str,
) -> snapgate::gateway::Running {
    let up = upstream().await;
    let default = tls_extra;
    let file = dir.join("proxy.yaml");
    std::fs::write(
        &file,
        format!(
            "{top}listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstate_dir: {}\n\
             network: {{ tap_prefix: sgtl }}\n\
             tls:\n  listen: 127.0.0.1:0\n{default}  certificates:\n\
             \x20   - {{ hosts: [a.test], cert: a.pem, key: a.key }}\n\
             \x20   - {{ hosts: ['*.b.test'], cert: b.pem, key: b.key }}\n\
             apps:\n  site:\n    hosts: [a.test, '*.b.test', '*.x.b.test', c.test]\n    upstream: {up}\n{apps_extra}",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let config = snapgate::config::Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    snapgate::gateway::start(&config, &mut std::io::sink())
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `curl` to `https://<host>:<port>/` resolved to `tls`, verifying against
/// the test CA: its exit code and output.
pub async fn curl(dir: &Path, tls: SocketAddr, host: &str, extra: &[&str]) -> (i32, String) {
    let port = tls.port();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}/");
    let args = [
        &["--cacert", "ca.pem", "--resolve", &resolve][..],
        extra,
        &[&url],
    ]
    .concat();
    curl_raw(dir, &args).await
}

/// `curl` with `args` (its last one the URL): its exit code and output.
pub async fn curl_raw(dir: &Path, args: &[&str]) -> (i32, String) {
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

/// `openssl s_client` connected to `tls` as `a.test` (ALPN `alpn` if
/// given), quiet: its stdin and stdout piped (what is typed goes over the
/// connection, what comes back is printed), killed when dropped.
pub fn s_client(tls: SocketAddr, alpn: Option<&str>) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &tls.to_string()])
        .args(["-servername", "a.test", "-quiet"]);
    if let Some(alpn) = alpn {
        cmd.args(["-alpn", alpn]);
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl runs")
}

/// The subject of the certificate `tls` shows a client naming `sni`, or
/// `None` if the handshake fails.
pub async fn certificate_for(dir: &Path, tls: SocketAddr, sni: &str) -> Option<String> {
    let out = tokio::process::Command::new("openssl")
        .current_dir(dir)
        .args([
            "s_client",
            "-connect",
            &tls.to_string(),
            "-servername",
            sni,
            "-brief",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Peer certificate: "))
        .map(str::to_owned)
}

/// Writes `dir/proxy.yaml`: listeners and admin on loopback ports of the
/// system's choosing, state in `dir/state`, one static app `site` on
/// `site.test` forwarded to `up`. Its path.
pub fn static_site_config(dir: &Path, up: SocketAddr) -> std::path::PathBuf {
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstate_dir: {}\n\
             apps:\n  site:\n    hosts: [site.test]\n    upstream: {up}\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    config
}

/// The `snapgate` binary running `snapgate run --config <file>`: killed
/// on drop if still running.
pub struct Binary {
    pub child: tokio::process::Child,
    /// Its stdout, line by line.
    pub lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Where it serves HTTP, HTTPS (if configured) and its admin pages.
    pub listen: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub admin: SocketAddr,
}

impl Binary {
    /// Starts it and waits (at most `within`) for its `serving on` line.
    pub async fn start(config: &Path, within: std::time::Duration) -> Binary {
        Binary::start_under(&[], config, within).await
    }

    /// [`Binary::start`], its log (stderr) written to `log`.
    pub async fn start_logged(config: &Path, within: std::time::Duration, log: &Path) -> Binary {
        Binary::spawn(&[], config, within, Some(log), &[]).await
    }

    /// [`Binary::start`] with `env` added to its environment.
    pub async fn start_env(
        config: &Path,
        within: std::time::Duration,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Binary {
        Binary::spawn(&[], config, within, None, env).await
    }

    /// [`Binary::start`], run by the command `wrapper` (say, `setpriv`
    /// with its options) when it is not empty.
    pub async fn start_under(
        wrapper: &[&str],
        config: &Path,
        within: std::time::Duration,
    ) -> Binary {
        Binary::spawn(wrapper, config, within, None, &[]).await
    }

    async fn spawn(
        wrapper: &[&str],
        config: &Path,
        within: std::time::Duration,
        log: Option<&Path>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Binary {
        use tokio::io::AsyncBufReadExt;
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = tokio::process::Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_snapgate"));
                c
            }
            None => tokio::process::Command::new(env!("CARGO_BIN_EXE_snapgate")),
        };
        if let Some(log) = log {
            command.stderr(std::fs::File::create(log).expect("the log file"));
        }
        command.envs(env.iter().copied());
        let mut child = command
            .args(["run", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("snapgate runs");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let serving = tokio::time::timeout(within, async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("snapgate exited before serving");
                eprintln!("snapgate: {line}");
                if line.starts_with("serving on ") {
                    return line;
                }
            }
        })
        .await
        .expect("snapgate serves in time");
        // serving on http://A[, https://B], metrics on http://C/metrics
        let addr = |prefix: &str| {
            serving.split(prefix).nth(1).map(|rest| {
                rest.split([',', '/'])
                    .next()
                    .unwrap()
                    .parse::<SocketAddr>()
                    .unwrap()
            })
        };
        Binary {
            listen: addr("serving on http://").unwrap(),
            tls: addr("https://"),
            admin: addr("metrics on http://").unwrap(),
            child,
            lines,
        }
    }

    /// The next stdout line that starts with `prefix`, within `within`.
    pub async fn line_starting(&mut self, prefix: &str, within: std::time::Duration) -> String {
        tokio::time::timeout(within, async {
            loop {
                let line = self
                    .lines
                    .next_line()
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("snapgate exited before printing {prefix:?}"));
                eprintln!("snapgate: {line}");
                if line.starts_with(prefix) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {prefix:?} line in time"))
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().expect("running") as i32);
        nix::sys::signal::kill(pid, signal).expect("signal sent");
    }
}

impl Drop for Binary {
    /// A test that failed midway still stops the gateway the clean way
    /// (SIGTERM: its VMs and taps go), waiting up to 30 s before the kill
    /// `kill_on_drop` makes.
    fn drop(&mut self) {
        if let Some(id) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(id as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the metrics text")
}

/// A listener on a free loopback port: each connection accepted is handed
/// to `serve` (which spawns what serves it). Its address.
pub async fn listen_loopback(serve: impl Fn(tokio::net::TcpStream) + Send + 'static) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            serve(stream);
        }
    });
    addr
}

/// The value of `name` in `req`, or `-` when absent (or not text).
pub fn header_or_dash<B>(req: &http::Request<B>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

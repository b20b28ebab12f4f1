//! Hot reload and graceful drain of the real `snapgate` binary, with real
//! VMs (the test guest, restored by QEMU on real taps), real clients
//! (reqwest, curl, openssl s_client) and a test PKI made by `openssl`.
#![cfg(feature = "vm-tests")]

mod front;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use front::*;
use nix::sys::signal::Signal;

/// Under TCG the test guest restores in well under a second; a snapshot
/// that must be built first takes a minute or more.
const START: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(60);

/// One version of the test's `proxy.yaml`.
#[derive(Clone)]
struct Version {
    /// Whether the static app `extra` (extra.b.test) is there.
    extra: bool,
    /// Whether the VM app `vm` (vm.b.test) is there.
    vm: bool,
    /// The VM app's pool, as a YAML flow mapping.
    vm_pool: &'static str,
    /// The VM app's response_timeout.
    vm_response_timeout: &'static str,
    /// The certificate file (stem) for a.test: `a` or `a2`.
    a_cert: &'static str,
}

const FIRST: Version = Version {
    extra: false,
    vm: true,
    vm_pool: "{ min_warm: 1, max_instances: 3, idle_timeout: 60s }",
    vm_response_timeout: "60s",
    a_cert: "a",
};

/// Writes `v` as `dir/proxy.yaml` for a gateway on `tap_prefix` whose
/// static apps go to `upstream`.
fn write(dir: &Path, tap_prefix: &str, upstream: SocketAddr, v: &Version) {
    let image = snapgate::testing::test_guest_image();
    let vm = if v.vm {
        format!(
            "  vm:\n    hosts: [vm.b.test]\n    image: {image}\n    pool: {}\n    response_timeout: {}\n",
            v.vm_pool, v.vm_response_timeout
        )
    } else {
        String::new()
    };
    let extra = if v.extra {
        format!("  extra:\n    hosts: [extra.b.test]\n    upstream: {upstream}\n")
    } else {
        String::new()
    };
    let text = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nshutdown_grace: 10s\n\
         state_dir: {state}\nsnapshot_dir: {snapshots}\n\
         network: {{ tap_prefix: {tap_prefix} }}\n\
         tls:\n  listen: 127.0.0.1:0\n  certificates:\n\
         \x20   - {{ hosts: [a.test], cert: {a}.pem, key: {a}.key }}\n\
         \x20   - {{ hosts: ['*.b.test'], cert: b.pem, key: b.key }}\n\
         apps:\n\
         \x20 site:\n    hosts: [a.test]\n    upstream: {upstream}\n\
         {vm}{extra}",
        state = dir.join("state").display(),
        snapshots = snapgate::testing::shared_snapshot_dir().display(),
        a = v.a_cert,
    );
    std::fs::write(dir.join("proxy.yaml"), text).unwrap();
}

/// What the client loops saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// GETs `host` through `listen` on a kept-alive client until `stop`,
/// counting every answer that is not a 200 (a 5xx included) and every
/// connection error.
async fn client_loop(
    listen: SocketAddr,
    host: &'static str,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let http = reqwest::Client::new();
    while !stop.load(Ordering::Relaxed) {
        match http
            .get(format!("http://{listen}/"))
            .header("host", host)
            .timeout(Duration::from_secs(30))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => tally.fail(format!("{host}: {}", r.status())),
            Err(e) => tally.fail(format!("{host}: {e}")),
        }
    }
}

/// New HTTPS connections to a.test until `stop` (curl, verifying
/// against the test CA; the certificate may be a.pem's or a2.pem's).
async fn tls_loop(
    dir: std::path::PathBuf,
    tls: SocketAddr,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    while !stop.load(Ordering::Relaxed) {
        let (code, out) = curl(&dir, tls, "a.test", &["-w", " %{http_code}"]).await;
        if code == 0 && out.ends_with(" 200") {
            tally.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.fail(format!("https a.test: curl {code}: {out}"));
        }
    }
}

/// `GET /` for `host` on a new connection: its status.
async fn status(listen: SocketAddr, host: &str, path: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("http://{listen}{path}"))
        .header("host", host)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// `POST /reload` on the admin listener: status and body.
async fn post_reload(admin: SocketAddr) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("http://{admin}/reload"))
        .timeout(STEP)
        .send()
        .await
        .expect("POST /reload");
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The sum of the series of `name` with label `app`, from `/metrics`.
async fn metric(admin: SocketAddr, name: &str, app: &str) -> f64 {
    let text = metrics_text(admin).await;
    let series = format!("{name}{{");
    let label = format!("app=\"{app}\"");
    text.lines()
        .filter(|l| l.starts_with(&series) && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits (at most `within`) until `cond` holds, looking again each time
/// the gateway's metrics might have moved.
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// VMM processes whose command line names `state` and taps named
/// `<prefix>...`, left after the gateway stopped.
fn leftovers(state: &Path, prefix: &str) -> (Vec<String>, Vec<String>) {
    let state = state.display().to_string();
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("qemu-system") && cmd.contains(&state) {
                procs.push(cmd);
            }
        }
    }
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let taps = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(str::to_owned))
        .filter(|n| n.starts_with(prefix))
        .collect();
    (procs, taps)
}

/// While clients keep asking for a VM app and a static app, over
/// HTTP and over new HTTPS connections, `proxy.yaml` is changed and
/// reloaded ten times, by SIGHUP and by `POST /reload` in turn (and two
/// broken files rejected): an app
/// added and removed (a slow request to it in flight as it goes), the VM
/// app's pool resized up and down, its limits changed, the certificate of
/// a.test swapped and swapped back. Not one connection error or 5xx; the
/// added and removed apps, the grown pool and the swapped certificate are
/// each seen to take effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing_and_take_effect() {
    let dir = tempfile::tempdir().unwrap();
    pki(
        dir.path(),
        &[("a", "a.test"), ("b", "*.b.test"), ("a2", "a.test")],
    );
    let (upstream, slow_started) = upstream_counting().await;
    let prefix = "sgrl";
    write(dir.path(), prefix, upstream, &FIRST);
    let mut gw = Binary::start(&dir.path().join("proxy.yaml"), START).await;
    let (listen, admin, tls) = (gw.listen, gw.admin, gw.tls.unwrap());
    until("the VM app warm", START, || async {
        metric(admin, "snapgate_instances", "vm").await >= 1.0
            && status(listen, "vm.b.test", "/").await == 200
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let loops = vec![
        tokio::spawn(client_loop(
            listen,
            "vm.b.test",
            stop.clone(),
            tally.clone(),
        )),
        tokio::spawn(client_loop(
            listen,
            "vm.b.test",
            stop.clone(),
            tally.clone(),
        )),
        tokio::spawn(client_loop(listen, "a.test", stop.clone(), tally.clone())),
        tokio::spawn(tls_loop(
            dir.path().to_owned(),
            tls,
            stop.clone(),
            tally.clone(),
        )),
    ];

    // Each reload alternates between SIGHUP and POST /reload.
    let mut by_signal = false;
    let mut v = FIRST;
    let mut reloads = 0;
    macro_rules! reload {
        ($v:expr) => {{
            v = $v;
            write(dir.path(), prefix, upstream, &v);
            by_signal = !by_signal;
            reloads += 1;
            if by_signal {
                gw.signal(Signal::SIGHUP);
                let line = gw.line_starting("SIGHUP: ", STEP).await;
                assert!(
                    line.starts_with("SIGHUP: reloaded"),
                    "reload {reloads}: {line}"
                );
            } else {
                let (code, body) = post_reload(admin).await;
                assert_eq!(code, 200, "reload {reloads}: {body}");
            }
        }};
    }

    // 1: an app added.
    reload!(Version {
        extra: true,
        ..v.clone()
    });
    assert_eq!(status(listen, "extra.b.test", "/").await, 200);
    // 2: the VM pool grows: two warm.
    reload!(Version {
        vm_pool: "{ min_warm: 2, max_instances: 3, idle_timeout: 60s }",
        ..v.clone()
    });
    until("two VM instances", STEP, || async {
        metric(admin, "snapgate_instances", "vm").await >= 2.0
    })
    .await;
    // 3: a.test's certificate swapped.
    assert_eq!(
        certificate_for(dir.path(), tls, "a.test").await.as_deref(),
        Some("CN = a")
    );
    reload!(Version {
        a_cert: "a2",
        ..v.clone()
    });
    assert_eq!(
        certificate_for(dir.path(), tls, "a.test").await.as_deref(),
        Some("CN = a2")
    );
    // 4: the app removed while a slow request to it is in flight: that
    // request is answered, the next one finds no app.
    let slow = tokio::spawn(status(listen, "extra.b.test", "/slow/2000"));
    until("the slow request at the app", STEP, || {
        let n = slow_started.load(Ordering::SeqCst);
        async move { n == 1 }
    })
    .await;
    reload!(Version {
        extra: false,
        ..v.clone()
    });
    assert_eq!(status(listen, "extra.b.test", "/").await, 404);
    assert_eq!(
        slow.await.unwrap(),
        200,
        "the in-flight request to a removed app"
    );
    // 5 and 6: broken files are rejected, by POST and by SIGHUP; the
    // running config stays.
    std::fs::write(dir.path().join("proxy.yaml"), "apps: [\n").unwrap();
    let (code, body) = post_reload(admin).await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("rejected"), "{body}");
    std::fs::write(
        dir.path().join("proxy.yaml"),
        std::fs::read_to_string(dir.path().join("proxy.yaml"))
            .unwrap()
            .replace("apps: [", "listen: 127.0.0.1:1\napps: {}"),
    )
    .unwrap();
    gw.signal(Signal::SIGHUP);
    let line = gw.line_starting("SIGHUP: ", STEP).await;
    assert!(line.starts_with("SIGHUP: rejected"), "{line}");
    assert_eq!(status(listen, "vm.b.test", "/").await, 200);
    by_signal = true;
    // 7: the pool shrinks and the VM app's limits change.
    reload!(Version {
        vm_pool: "{ min_warm: 1, max_instances: 2, idle_timeout: 2s }",
        vm_response_timeout: "30s",
        ..v.clone()
    });
    // 8: the app is back.
    reload!(Version {
        extra: true,
        ..v.clone()
    });
    assert_eq!(status(listen, "extra.b.test", "/").await, 200);
    // 9: the certificate swapped back.
    reload!(Version {
        a_cert: "a",
        ..v.clone()
    });
    assert_eq!(
        certificate_for(dir.path(), tls, "a.test").await.as_deref(),
        Some("CN = a")
    );
    // 10 to 12: removed again, the pool grows, and everything as it began.
    reload!(Version {
        extra: false,
        ..v.clone()
    });
    reload!(Version {
        vm_pool: "{ min_warm: 1, max_instances: 3, idle_timeout: 60s }",
        ..v.clone()
    });
    reload!(FIRST);
    assert_eq!(reloads, 10);

    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let failures = tally.failures.lock().unwrap().clone();
    let ok = tally.ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} failures of {}: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(20)]
    );
    assert!(ok > 100, "only {ok} requests were made");
    eprintln!("{ok} requests, no failure, across {reloads} reloads and 2 rejected files");
    let applied = metric_plain(admin, "snapgate_config_reloads_total{result=\"applied\"}").await;
    let rejected = metric_plain(admin, "snapgate_config_reloads_total{result=\"rejected\"}").await;
    assert_eq!((applied, rejected), (10.0, 2.0));

    // The VM app removed: its pool is retired, and once nothing is in
    // flight on it, closed: every VM and tap of the gateway goes.
    let (procs, taps) = leftovers(&dir.path().join("state"), prefix);
    assert!(!procs.is_empty() && !taps.is_empty(), "no VM to retire");
    reload!(Version {
        vm: false,
        ..v.clone()
    });
    assert_eq!(status(listen, "vm.b.test", "/").await, 404);
    let state = dir.path().join("state");
    until("the retired pool's VMs and taps gone", STEP, || {
        let (procs, taps) = leftovers(&state, prefix);
        async move { procs.is_empty() && taps.is_empty() }
    })
    .await;

    gw.signal(Signal::SIGTERM);
    let status = tokio::time::timeout(STEP, gw.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "snapgate exited with {status}");
    let (procs, taps) = leftovers(&dir.path().join("state"), prefix);
    assert!(
        procs.is_empty() && taps.is_empty(),
        "left after exit: {procs:?} {taps:?}"
    );
}

/// The value of the one series `series` (name and labels as exposed).
async fn metric_plain(admin: SocketAddr, series: &str) -> f64 {
    let text = metrics_text(admin).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// SIGTERM while a slow request runs over HTTP/1.1 (reqwest) and
/// another as an HTTP/2 stream (nghttp, h2c with prior knowledge), with a
/// warm VM instance: the listener stops taking connections at once, the
/// HTTP/1.1 answer says `Connection: close`, the HTTP/2 client gets a
/// GOAWAY, both answers arrive whole, and the process exits 0 with every
/// VM and tap gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_and_an_http2_stream_finish_then_exits_clean() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path(), &[("a", "a.test"), ("b", "*.b.test")]);
    let (upstream, slow) = upstream_counting().await;
    let prefix = "sgdr";
    write(dir.path(), prefix, upstream, &FIRST);
    let mut gw = Binary::start(&dir.path().join("proxy.yaml"), START).await;
    let listen = gw.listen;
    until("the VM app warm", START, || async {
        status(listen, "vm.b.test", "/").await == 200
    })
    .await;

    let http1 = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(format!("http://{listen}/slow/3000"))
            .header("host", "a.test")
            .send()
            .await
            .expect("the HTTP/1.1 request is answered");
        let close = r.headers().get("connection").cloned();
        (r.status().as_u16(), close, r.text().await.unwrap())
    });
    let http2 = tokio::spawn(
        tokio::process::Command::new("nghttp")
            .args(["-v", "-H", ":authority: a.test"])
            .arg(format!("http://{listen}/slow/3000"))
            .output(),
    );
    until("both slow requests at the app", STEP, || {
        let n = slow.load(Ordering::SeqCst);
        async move { n == 2 }
    })
    .await;
    gw.signal(Signal::SIGTERM);
    gw.line_starting("SIGTERM: draining", STEP).await;
    // New connections are refused while the two run on.
    until("the listener closed", STEP, || async {
        tokio::net::TcpStream::connect(listen).await.is_err()
    })
    .await;
    assert!(
        !http1.is_finished(),
        "the slow request ended before the listener closed"
    );

    let (code, close, body) = http1.await.unwrap();
    assert_eq!((code, body.as_str()), (200, "a.test http"));
    assert_eq!(close.as_ref().map(|v| v.to_str().unwrap()), Some("close"));
    let out = http2.await.unwrap().expect("nghttp runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nghttp: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("recv GOAWAY frame"), "no GOAWAY: {text}");
    assert!(text.contains(":status: 200"), "{text}");
    assert!(
        text.contains("a.test http"),
        "the body did not arrive: {text}"
    );

    let exit = tokio::time::timeout(STEP, gw.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "snapgate exited with {exit}");
    let (procs, taps) = leftovers(&dir.path().join("state"), prefix);
    assert!(
        procs.is_empty() && taps.is_empty(),
        "left after exit: {procs:?} {taps:?}"
    );
}

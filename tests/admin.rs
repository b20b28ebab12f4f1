//! The admin API and the commands that use it, on the real `snapgate`
//! binary with real VMs (the test guest restored by QEMU on real taps):
//! a bearer token off loopback, drain with a request in flight, prewarm,
//! `snapgate status`.
#![cfg(feature = "vm-tests")]

mod front;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use front::*;
use serde_json::Value;

/// Under TCG the test guest restores in well under a second; a snapshot
/// that must be built first takes a minute or more.
const START: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(60);
const TOKEN: &str = "a-test-token-of-some-length";

fn write_config(dir: &Path, upstream: SocketAddr) -> std::path::PathBuf {
    let image = snapgate::testing::test_guest_image();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    // Bound to every interface (reached here on loopback): a token is
    // required.
    let text = format!(
        "listen: 127.0.0.1:0\nadmin: 0.0.0.0:0\nadmin_token_file: {token}\nshutdown_grace: 10s\n\
         state_dir: {state}\nsnapshot_dir: {snapshots}\n\
         network: {{ tap_prefix: sgadm }}\n\
         apps:\n\
         \x20 site:\n    hosts: [site.test]\n    upstream: {upstream}\n\
         \x20 app:\n    hosts: [app.test]\n    image: {image}\n\
         \x20   pool: {{ min_warm: 1, max_instances: 3, max_concurrency: 1, idle_timeout: 1h }}\n",
        token = dir.join("token").display(),
        state = dir.join("state").display(),
        snapshots = snapgate::testing::shared_snapshot_dir().display(),
    );
    let file = dir.join("proxy.yaml");
    std::fs::write(&file, text).unwrap();
    file
}

/// `GET path` on the admin listener with `token`: (status, JSON or text).
async fn get(admin: SocketAddr, path: &str, token: Option<&str>) -> (u16, Value, String) {
    let mut req = reqwest::Client::new().get(format!("http://{admin}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("the admin listener answers");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
        challenge,
    )
}

/// The app's instances, as `GET /instances?app=app` lists them.
async fn instances(admin: SocketAddr) -> Vec<Value> {
    let (status, v, _) = get(admin, "/instances?app=app", Some(TOKEN)).await;
    assert_eq!(status, 200, "{v}");
    v["instances"].as_array().unwrap().clone()
}

/// Polls the instance list (an admin API has no event to wait on) until
/// `cond` holds, at most `within`.
async fn until_instances(
    admin: SocketAddr,
    what: &str,
    within: Duration,
    cond: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let list = instances(admin).await;
        if cond(&list) {
            return list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: instances stayed {list:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn in_state<'a>(list: &'a [Value], state: &str) -> Vec<&'a Value> {
    list.iter().filter(|i| i["state"] == state).collect()
}

/// `snapgate ARGS --config FILE --admin ADMIN`: the config names the
/// token file; its admin port (0: any) is the one `admin` found.
async fn snapgate(args: &[&str], config: &Path, admin: SocketAddr) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_snapgate"))
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--admin")
        .arg(admin.to_string())
        .output()
        .await
        .expect("snapgate runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_drains_prewarms_and_lists_with_a_bearer_token_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    let config = write_config(dir.path(), upstream);
    let gw = Binary::start(&config, START).await;
    let admin = SocketAddr::from(([127, 0, 0, 1], gw.admin.port()));

    // Probes need no token; everything else does, and says how to give it.
    let (status, _, _) = get(admin, "/livez", None).await;
    assert_eq!(status, 200);
    for (path, token, wrong) in [
        ("/apps", None, false),
        ("/apps", Some("a-wrong-token-of-some-length"), true),
        ("/metrics", None, false),
        ("/instances", Some("x"), true),
    ] {
        let (status, body, challenge) = get(admin, path, token).await;
        assert_eq!(status, 401, "{path} with {token:?}: {body}");
        assert!(challenge.starts_with("Bearer realm="), "{challenge}");
        assert_eq!(
            challenge.contains("error=\"invalid_token\""),
            wrong,
            "{challenge}"
        );
    }
    let (status, _, _) = get(admin, "/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200);

    // Ready once min_warm is met (polled: readiness is a state, not an
    // event).
    let deadline = tokio::time::Instant::now() + START;
    let ready = loop {
        let (status, v, _) = get(admin, "/readyz", None).await;
        if status == 200 {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Without the token: whether, not why.
    assert_eq!(ready, serde_json::json!({ "ready": true }));
    let (status, ready, _) = get(admin, "/readyz", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(
        ready["apps"]["app"]
            .as_str()
            .unwrap()
            .starts_with("min_warm met"),
        "{ready}"
    );

    let (status, apps, _) = get(admin, "/apps", Some(TOKEN)).await;
    assert_eq!(status, 200, "{apps}");
    let named = |name: &str| {
        let all = apps["apps"].as_array().unwrap();
        all.iter().find(|a| a["name"] == name).unwrap().clone()
    };
    let app = named("app");
    assert_eq!(app["settings"]["max_instances"], 3);
    assert_eq!(app["pool"]["warm"], 1);
    assert_eq!(named("site")["upstream"], upstream.to_string());

    // One warm instance, with its VMM and tap.
    let list = until_instances(admin, "one warm", STEP, |l| in_state(l, "warm").len() == 1).await;
    let warm = in_state(&list, "warm")[0].clone();
    let first = warm["id"].as_str().unwrap().to_owned();
    let pid = warm["vmm_pid"].as_u64().unwrap() as i32;
    assert!(warm["tap"].as_str().unwrap().starts_with("sgadm"));
    assert!(warm["snapshot"].as_str().is_some(), "{warm}");
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    // A request in flight on it, held open by the test: its body is not
    // all sent (the guest reads the whole body before it answers).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = tokio::net::TcpStream::connect(gw.listen).await.unwrap();
    held.write_all(
        b"POST /held HTTP/1.1\r\nhost: app.test\r\ncontent-length: 10\r\nconnection: close\r\n\r\nhalf-",
    )
    .await
    .unwrap();
    until_instances(admin, "leased", STEP, |l| {
        l.iter()
            .any(|i| i["id"] == first.as_str() && i["state"] == "leased" && i["in_flight"] == 1)
    })
    .await;
    let (ok, out, err) = snapgate(&["drain", &first], &config, admin).await;
    assert!(ok, "drain: {out}{err}");
    assert!(out.contains(&first), "{out}");
    let list = instances(admin).await;
    let drained = list.iter().find(|i| i["id"] == first.as_str()).unwrap();
    assert_eq!(drained["state"], "draining", "{list:#?}");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "not stopped while it serves"
    );
    // The request in flight runs to its end...
    held.write_all(b"done!").await.unwrap();
    let mut answer = String::new();
    held.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("half-done!"),
        "the guest got the whole body: {answer}"
    );
    // ...then the instance stops, its VMM gone, and a replacement serves.
    until_instances(admin, "drained one gone, replaced", STEP, |l| {
        !l.iter().any(|i| i["id"] == first.as_str()) && in_state(l, "warm").len() == 1
    })
    .await;
    let deadline = tokio::time::Instant::now() + STEP;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "VMM {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listen = gw.listen;
    let status = reqwest::Client::new()
        .get(format!("http://{listen}/"))
        .header("host", "app.test")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    // Draining what is not there says so.
    let (ok, _, err) = snapgate(&["drain", "no-such-instance"], &config, admin).await;
    assert!(!ok);
    assert!(err.contains("404") && err.contains("no instance"), "{err}");

    // Prewarm to three: two more restore, within max_instances (3).
    let (ok, out, err) = snapgate(&["prewarm", "app", "--count", "3"], &config, admin).await;
    assert!(ok, "prewarm: {out}{err}");
    assert!(out.contains("2 restore(s) started"), "{out}");
    let list = until_instances(admin, "three warm", STEP, |l| {
        in_state(l, "warm").len() == 3
    })
    .await;
    let (ok, out, _) = snapgate(&["prewarm", "app", "--count", "5"], &config, admin).await;
    assert!(ok);
    assert!(
        out.contains("0 restore(s) started"),
        "at max_instances: {out}"
    );
    // A misspelt key is refused, not taken for the default count.
    let resp = reqwest::Client::new()
        .post(format!("http://{admin}/apps/app/prewarm?COUNT=5"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "{}", resp.text().await.unwrap());
    let (ok, _, err) = snapgate(&["prewarm", "site"], &config, admin).await;
    assert!(!ok && err.contains("static"), "{err}");

    // The table a newcomer reads.
    let (ok, out, err) = snapgate(&["status"], &config, admin).await;
    assert!(ok, "status: {err}");
    eprintln!("snapgate status:\n{out}");
    assert!(out.starts_with("APP"), "{out}");
    assert!(out
        .lines()
        .any(|l| l.starts_with("app ") && l.contains("pool")));
    assert!(out.contains(&format!("upstream {upstream}")), "{out}");
    for i in &list {
        let id = i["id"].as_str().unwrap();
        let row = out
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} in {out}"));
        assert!(
            row.contains("warm") && row.contains(&i["vmm_pid"].to_string()),
            "{row}"
        );
    }
    // Without the token file the command is refused.
    let (ok, _, err) = tokio::process::Command::new(env!("CARGO_BIN_EXE_snapgate"))
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .await
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(!ok && err.contains("401"), "{err}");
}

/// The JSON log lines (`--log-format auto`: stderr is no terminal here)
/// of `log`, parsed.
fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Where `line`'s event is in `lines`, by a predicate; panics naming
/// `what`.
fn find(lines: &[Value], what: &str, f: impl Fn(&Value) -> bool) -> usize {
    lines
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("no {what} line in {lines:#?}"))
}

/// Runs Debian's headless Chromium on `url`: its rendered DOM, and a
/// screenshot written to `png`.
fn chromium(url: &str, png: &Path, profile: &Path) -> String {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new("chromium-headless-shell")
            .args([
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1280,1100",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium-headless-shell (Debian package; scripts/test installs it)");
        assert!(
            out.status.success(),
            "chromium: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&[&format!("--screenshot={}", png.display())]);
    run(&["--dump-dom"])
}

/// One request from zero, end to end: held while its VM restores, its
/// request id kept and returned, every step in the JSON log (the VM's
/// restoring, ready and leased in its span, then the request's access
/// line); the status page shows the instance and the cold start in a
/// real browser; a drain is logged with the stop's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_is_logged_in_json_and_shown_on_the_status_page() {
    let dir = tempfile::tempdir().unwrap();
    let image = snapgate::testing::test_guest_image();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nshutdown_grace: 10s\n\
             state_dir: {state}\nsnapshot_dir: {snapshots}\n\
             network: {{ tap_prefix: sglog }}\n\
             apps:\n\
             \x20 app:\n    hosts: [app.test]\n    image: {image}\n\
             \x20   pool: {{ min_warm: 0, max_instances: 1, idle_timeout: 1h }}\n",
            state = dir.path().join("state").display(),
            snapshots = snapgate::testing::shared_snapshot_dir().display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("snapgate.log");
    let gw = Binary::start_logged(&config, START, &log).await;
    let client = reqwest::Client::new();
    let get = |id: Option<&str>| {
        let mut req = client
            .get(format!("http://{}/", gw.listen))
            .header("host", "app.test");
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        req.send()
    };
    // From zero: held while an instance restores; the client's id kept.
    let resp = get(Some("cold-start-1")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "cold-start-1");
    let body = resp.text().await.unwrap();
    // Warm now; an id that could break a log line is replaced.
    let resp = get(Some("bad id\"")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let made = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()),
        "{made}"
    );
    // No token is configured: the one `instances` sends is not checked.
    let list = instances(gw.admin).await;
    let [one] = &list[..] else {
        panic!("one instance: {list:?}")
    };
    let id = one["id"].as_str().unwrap().to_owned();

    // The status page, rendered by a real browser.
    let page = client
        .get(format!("http://{}/", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'none'"));
    let shots = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let dom = chromium(
        &format!("http://{}/", gw.admin),
        &png,
        &dir.path().join("chromium"),
    );
    for want in [
        "<h2>Apps</h2>",
        "<h2>Recent cold starts</h2>",
        "<h2>Restore failures</h2>",
        &id,
        ">clone<",
        "http-equiv=\"refresh\"",
    ] {
        assert!(dom.contains(want), "{want} not on the page: {dom}");
    }
    let shot = std::fs::read(&png).unwrap();
    assert!(
        shot.starts_with(b"\x89PNG") && shot.len() > 10_000,
        "a screenshot of the page: {} bytes",
        shot.len()
    );
    eprintln!("status page screenshot: {}", png.display());

    // Drained: it stops, logged with its reason.
    let drained = client
        .post(format!("http://{}/instances/{id}/drain", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
    until_instances(gw.admin, "the drained one gone", STEP, |l| l.is_empty()).await;
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let mut gw = gw;
    let status = tokio::time::timeout(STEP, gw.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");

    let lines = log_lines(&log);
    let of_vm = |message: &'static str| {
        let id = id.clone();
        move |l: &Value| l["fields"]["message"] == message && l["span"]["vm"] == id.as_str()
    };
    let restoring = find(&lines, "restoring", of_vm("restoring"));
    let ready = find(&lines, "ready", of_vm("ready"));
    let leased = find(&lines, "leased", of_vm("leased"));
    let access = find(&lines, "the cold start's access", |l| {
        l["target"] == "snapgate::access" && l["fields"]["request_id"] == "cold-start-1"
    });
    let stopped = find(&lines, "stopped", of_vm("stopped"));
    assert!(
        restoring < ready && ready < leased && leased < access && access < stopped,
        "{restoring} {ready} {leased} {access} {stopped}"
    );
    assert!(lines[ready]["fields"]["took_ms"].as_u64().is_some());
    assert_eq!(lines[stopped]["fields"]["reason"], "drained");
    find(
        &lines,
        "drained by an operator",
        of_vm("drained by an operator"),
    );
    let a = &lines[access]["fields"];
    assert_eq!(a["status"], 200);
    assert_eq!(a["app"], "app");
    assert_eq!(a["instance"], id.as_str());
    assert_eq!(a["host"], "app.test");
    assert_eq!(a["method"], "GET");
    assert_eq!(a["path"], "/");
    assert_eq!(a["client"], "127.0.0.1");
    assert_eq!(a["held"], true);
    assert_eq!(a["completed"], true);
    assert_eq!(a["bytes"].as_u64(), Some(body.len() as u64));
    let held_ms = a["held_ms"].as_f64().unwrap();
    assert!(
        held_ms > 0.0 && a["duration_ms"].as_f64().unwrap() >= held_ms,
        "{a}"
    );
    let warm = find(&lines, "the warm request's access", |l| {
        l["target"] == "snapgate::access" && l["fields"]["request_id"] == made.as_str()
    });
    assert_eq!(lines[warm]["fields"]["held"], false);
    assert!(lines[warm]["fields"]["held_ms"].is_null());
    eprintln!("the cold start, as logged:");
    let raw: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::to_owned)
        .collect();
    for i in [restoring, ready, leased, access, stopped] {
        eprintln!("{}", raw[i]);
    }
}

//! Contract tests for the Cloud Hypervisor driver: every request the client
//! sends (method, path, JSON body, number of fds) is checked by a server on a
//! Unix socket against Cloud Hypervisor's published API (its OpenAPI
//! document, v53, plus `net_fds` of `vm.restore` from its snapshot/restore
//! documentation). No VMM needed: these run everywhere.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use snapgate::net::NetParams;
use snapgate::vmm::cloud_hypervisor::{
    net_config, restore_config, vm_config, ChClient, MemoryRestoreMode,
};
use snapgate::vmm::{ImageSpec, VmId, VmmError};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body: Option<Value>,
    fds: Vec<(u64, u64)>,
}

/// A schema: required keys and every key the API defines.
struct Schema {
    required: &'static [&'static str],
    allowed: &'static [&'static str],
}

const VM_CONFIG: Schema = Schema {
    required: &["payload"],
    allowed: &[
        "cpus",
        "memory",
        "payload",
        "rate_limit_groups",
        "disks",
        "net",
        "rng",
        "balloon",
        "fs",
        "generic_vhost_user",
        "pmem",
        "serial",
        "console",
        "debug_console",
        "devices",
        "user_devices",
        "vdpa",
        "vsock",
        "numa",
        "iommu",
        "watchdog",
        "rtc",
        "pvpanic",
        "pci_segments",
        "platform",
        "tpm",
        "landlock_enable",
        "landlock_rules",
    ],
};
const CPUS: Schema = Schema {
    required: &["boot_vcpus", "max_vcpus"],
    allowed: &[
        "boot_vcpus",
        "max_vcpus",
        "topology",
        "kvm_hyperv",
        "max_phys_bits",
        "nested",
        "affinity",
        "features",
        "core_scheduling",
    ],
};
const MEMORY: Schema = Schema {
    required: &["size"],
    allowed: &[
        "size",
        "hotplug_size",
        "hotplugged_size",
        "mergeable",
        "hotplug_method",
        "shared",
        "hugepages",
        "hugepage_size",
        "prefault",
        "reserve",
        "thp",
        "zones",
    ],
};
const PAYLOAD: Schema = Schema {
    required: &[],
    allowed: &[
        "firmware",
        "kernel",
        "cmdline",
        "initramfs",
        "igvm",
        "host_data",
    ],
};
const DISK: Schema = Schema {
    required: &[],
    allowed: &[
        "path",
        "readonly",
        "direct",
        "iommu",
        "num_queues",
        "queue_size",
        "vhost_user",
        "vhost_socket",
        "rate_limiter_config",
        "pci_segment",
        "pci_device_id",
        "id",
        "serial",
        "rate_limit_group",
        "queue_affinity",
        "backing_files",
        "sparse",
        "image_type",
        "lock_granularity",
    ],
};
const NET: Schema = Schema {
    required: &[],
    allowed: &[
        "tap",
        "ip",
        "mask",
        "mac",
        "host_mac",
        "mtu",
        "iommu",
        "num_queues",
        "queue_size",
        "vhost_user",
        "vhost_socket",
        "vhost_mode",
        "id",
        "pci_segment",
        "pci_device_id",
        "rate_limiter_config",
        "offload_tso",
        "offload_ufo",
        "offload_csum",
    ],
};
const RNG: Schema = Schema {
    required: &["src"],
    allowed: &["id", "pci_segment", "pci_device_id", "iommu", "src"],
};
const CONSOLE: Schema = Schema {
    required: &["mode"],
    allowed: &[
        "file",
        "socket",
        "mode",
        "iommu",
        "id",
        "pci_segment",
        "pci_device_id",
    ],
};
const RESTORE: Schema = Schema {
    required: &["source_url"],
    // `net_fds` is documented in docs/snapshot_restore.md (since v40).
    allowed: &[
        "source_url",
        "prefault",
        "memory_restore_mode",
        "resume",
        "zone_updates",
        "net_fds",
    ],
};
const SNAPSHOT: Schema = Schema {
    required: &["destination_url"],
    allowed: &["destination_url"],
};

fn check(schema: &Schema, at: &str, v: &Value, problems: &mut Vec<String>) {
    let Some(obj) = v.as_object() else {
        problems.push(format!("{at}: not an object"));
        return;
    };
    for r in schema.required {
        if !obj.contains_key(*r) {
            problems.push(format!("{at}: missing required {r}"));
        }
    }
    for k in obj.keys() {
        if !schema.allowed.contains(&k.as_str()) {
            problems.push(format!("{at}: unknown key {k}"));
        }
    }
}

fn is_file_url(v: &Value) -> bool {
    v.as_str().is_some_and(|u| u.starts_with("file:///"))
}

/// Checks one request against the API; returns what is wrong.
fn validate(req: &Seen) -> Vec<String> {
    let mut p = Vec::new();
    let endpoint = req.path.strip_prefix("/api/v1/").unwrap_or("");
    let (method, body_schema): (&str, Option<&Schema>) = match endpoint {
        "vmm.ping" | "vm.info" | "vm.counters" => ("GET", None),
        "vmm.shutdown" | "vm.boot" | "vm.pause" | "vm.resume" | "vm.shutdown" | "vm.delete" => {
            ("PUT", None)
        }
        "vm.create" => ("PUT", Some(&VM_CONFIG)),
        "vm.add-net" => ("PUT", Some(&NET)),
        "vm.snapshot" => ("PUT", Some(&SNAPSHOT)),
        "vm.restore" => ("PUT", Some(&RESTORE)),
        other => {
            p.push(format!("no endpoint {other:?} in the API ({})", req.path));
            return p;
        }
    };
    if req.method != method {
        p.push(format!("{endpoint} takes {method}, got {}", req.method));
    }
    match (body_schema, &req.body) {
        (None, Some(b)) => p.push(format!("{endpoint} takes no body, got {b}")),
        (Some(_), None) => p.push(format!("{endpoint} needs a body")),
        (Some(schema), Some(b)) => check(schema, endpoint, b, &mut p),
        (None, None) => {}
    }
    let body = req.body.clone().unwrap_or(Value::Null);
    match endpoint {
        "vm.create" => {
            check(&CPUS, "cpus", &body["cpus"], &mut p);
            check(&MEMORY, "memory", &body["memory"], &mut p);
            check(&PAYLOAD, "payload", &body["payload"], &mut p);
            check(&RNG, "rng", &body["rng"], &mut p);
            check(&CONSOLE, "serial", &body["serial"], &mut p);
            check(&CONSOLE, "console", &body["console"], &mut p);
            for d in body["disks"].as_array().into_iter().flatten() {
                check(&DISK, "disks[]", d, &mut p);
            }
            if !body["memory"]["size"].is_u64() {
                p.push("memory.size must be an integer number of bytes".into());
            }
            for mode in [&body["serial"]["mode"], &body["console"]["mode"]] {
                let ok = ["Off", "Pty", "Tty", "File", "Socket", "Null"];
                if !ok.iter().any(|m| mode == m) {
                    p.push(format!("console mode {mode} is not one of {ok:?}"));
                }
            }
        }
        "vm.add-net" if req.fds.is_empty() && body.get("tap").is_none() => {
            p.push("add-net without a tap name needs fds".into());
        }
        "vm.restore" => {
            let want: u64 = body["net_fds"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| n["num_fds"].as_u64().unwrap_or(0))
                .sum();
            if want != req.fds.len() as u64 {
                p.push(format!(
                    "net_fds promise {want} fds, {} attached",
                    req.fds.len()
                ));
            }
            let mode = &body["memory_restore_mode"];
            if !mode.is_null() && mode != "Copy" && mode != "OnDemand" {
                p.push(format!("memory_restore_mode {mode}"));
            }
            if !is_file_url(&body["source_url"]) {
                p.push(format!(
                    "source_url {} is not a file:// URL",
                    body["source_url"]
                ));
            }
        }
        "vm.snapshot" if !is_file_url(&body["destination_url"]) => {
            p.push("destination_url is not a file:// URL".into());
        }
        _ => {}
    }
    if endpoint != "vm.add-net" && endpoint != "vm.restore" && !req.fds.is_empty() {
        p.push(format!("{endpoint} takes no fds, got {}", req.fds.len()));
    }
    p
}

/// Canned answers: what CH returns for each endpoint.
fn answer(endpoint: &str) -> (u16, Option<Value>) {
    match endpoint {
        "vmm.ping" => (
            200,
            Some(
                json!({"build_version": "v53.0", "version": "53.0", "pid": 1, "features": ["kvm"]}),
            ),
        ),
        "vm.info" => (
            200,
            Some(json!({"config": {}, "state": "Running", "memory_actual_size": 268435456})),
        ),
        _ => (204, None),
    }
}

/// A fake CH API server. `fail` maps an endpoint to an error chain.
struct Server {
    seen: Arc<Mutex<Vec<Seen>>>,
    violations: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

fn serve(fail: Vec<(&'static str, u16, Vec<&'static str>)>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let (s2, v2) = (seen.clone(), violations.clone());
    let fail = Arc::new(fail);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (s3, v3, f3) = (s2.clone(), v2.clone(), fail.clone());
            std::thread::spawn(move || handle(conn, &s3, &v3, &f3));
        }
    });
    Server {
        seen,
        violations,
        _dir: dir,
        socket,
    }
}

fn fstat_id(fd: &OwnedFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
    (st.st_dev, st.st_ino)
}

fn handle(
    mut conn: UnixStream,
    seen: &Mutex<Vec<Seen>>,
    violations: &Mutex<Vec<String>>,
    fail: &[(&'static str, u16, Vec<&'static str>)],
) {
    use sendfd::RecvWithFd;
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    loop {
        // Read until one whole request (head + Content-Length body) is here.
        let (head_len, req) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        std::str::from_utf8(h.value)
                            .unwrap()
                            .parse::<usize>()
                            .unwrap()
                    })
                    .unwrap_or(0);
                if buf.len() >= n + len {
                    let body = &buf[n..n + len];
                    let seen = Seen {
                        method: req.method.unwrap().to_owned(),
                        path: req.path.unwrap().to_owned(),
                        body: (!body.is_empty())
                            .then(|| serde_json::from_slice(body).expect("JSON body")),
                        fds: Vec::new(),
                    };
                    break (n + len, seen);
                }
            }
            let mut chunk = [0u8; 8192];
            let mut raw = [0i32; 8];
            let (n, nfds) = match conn.recv_with_fd(&mut chunk, &mut raw) {
                Ok(r) => r,
                Err(_) => return,
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            // SAFETY: recvmsg gave us these fds; we own and close them.
            fds.extend(
                raw[..nfds]
                    .iter()
                    .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        };
        buf.drain(..head_len);
        let mut req = req;
        req.fds = fds.drain(..).map(|fd| fstat_id(&fd)).collect();
        let endpoint = req.path.trim_start_matches("/api/v1/").to_owned();
        let problems = validate(&req);
        violations.lock().unwrap().extend(problems.iter().cloned());
        seen.lock().unwrap().push(req);
        let (status, body) = if !problems.is_empty() {
            (400, Some(json!(problems)))
        } else if let Some((_, status, chain)) = fail.iter().find(|(e, _, _)| *e == endpoint) {
            (*status, Some(json!(chain)))
        } else {
            answer(&endpoint)
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let reason = if status < 300 { "OK" } else { "Error" };
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if conn.write_all(resp.as_bytes()).is_err() {
            return;
        }
        let _ = conn.flush();
    }
}

fn spec() -> ImageSpec {
    serde_yaml_ng::from_str(
        "kernel: /guest/vmlinuz\ninitramfs: /guest/initramfs\ncmdline: x\ndisks: [{path: /guest/rofs.img}]\n",
    )
    .unwrap()
}

#[tokio::test]
async fn every_request_matches_the_published_api() {
    let server = serve(vec![]);
    let client = ChClient::new(VmId::new("contract"), &server.socket);
    let tap_stand_in = tempfile::tempfile().unwrap();
    let tap_id = {
        let st = nix::sys::stat::fstat(tap_stand_in.as_raw_fd()).unwrap();
        (st.st_dev, st.st_ino)
    };

    let ping = client.ping().await.unwrap();
    assert_eq!(ping["version"], "53.0");
    client
        .create(&vm_config(&spec(), "console=ttyS0", Path::new("/run")))
        .await
        .unwrap();
    client
        .add_net(&net_config(&NetParams::default()), &[tap_stand_in.as_fd()])
        .await
        .unwrap();
    client.boot().await.unwrap();
    assert_eq!(client.state().await.unwrap(), "Running");
    client.pause().await.unwrap();
    client
        .snapshot(Path::new("/snapshots/app/1"))
        .await
        .unwrap();
    client.resume().await.unwrap();
    client.shutdown().await.unwrap();
    client.delete().await.unwrap();
    for mode in [MemoryRestoreMode::Copy, MemoryRestoreMode::OnDemand] {
        client
            .restore(
                &restore_config(Path::new("/run/clone/source"), mode),
                &[tap_stand_in.as_fd()],
            )
            .await
            .unwrap();
    }
    client.vmm_shutdown().await.unwrap();

    assert_eq!(*server.violations.lock().unwrap(), Vec::<String>::new());
    let seen = server.seen.lock().unwrap().clone();
    let summary: Vec<(String, String, usize)> = seen
        .iter()
        .map(|s| {
            (
                s.method.clone(),
                s.path.trim_start_matches("/api/v1/").to_owned(),
                s.fds.len(),
            )
        })
        .collect();
    let expect = [
        ("GET", "vmm.ping", 0),
        ("PUT", "vm.create", 0),
        ("PUT", "vm.add-net", 1),
        ("PUT", "vm.boot", 0),
        ("GET", "vm.info", 0),
        ("PUT", "vm.pause", 0),
        ("PUT", "vm.snapshot", 0),
        ("PUT", "vm.resume", 0),
        ("PUT", "vm.shutdown", 0),
        ("PUT", "vm.delete", 0),
        ("PUT", "vm.restore", 1),
        ("PUT", "vm.restore", 1),
        ("PUT", "vmm.shutdown", 0),
    ];
    let expect: Vec<(String, String, usize)> = expect
        .iter()
        .map(|(m, p, n)| (m.to_string(), p.to_string(), *n))
        .collect();
    assert_eq!(summary, expect);

    // The fd that arrived is the one sent (same file), not just any fd.
    assert_eq!(seen[2].fds, vec![tap_id]);
    assert_eq!(seen[10].fds, vec![tap_id]);
    // Bodies carry what the driver means.
    let create = seen[1].body.as_ref().unwrap();
    assert_eq!(create["payload"]["kernel"], "/guest/vmlinuz");
    assert_eq!(
        create["disks"][0],
        json!({"path": "/guest/rofs.img", "readonly": true})
    );
    assert_eq!(create["memory"]["size"], 256u64 << 20);
    assert_eq!(seen[2].body.as_ref().unwrap()["id"], "net0");
    assert_eq!(
        seen[6].body.as_ref().unwrap()["destination_url"],
        "file:///snapshots/app/1"
    );
    let restore = seen[10].body.as_ref().unwrap();
    assert_eq!(restore["net_fds"], json!([{"id": "net0", "num_fds": 1}]));
    assert_eq!(restore["resume"], true);
    assert_eq!(
        seen[11].body.as_ref().unwrap()["memory_restore_mode"],
        "OnDemand"
    );
}

#[tokio::test]
async fn the_contract_server_rejects_what_the_api_does_not_define() {
    // The checker itself must be able to fail: a request outside the API.
    let bad = Seen {
        method: "GET".into(),
        path: "/api/v1/vm.create".into(),
        body: None,
        fds: vec![],
    };
    let problems = validate(&bad);
    assert!(
        problems.iter().any(|p| p.contains("takes PUT")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("needs a body")),
        "{problems:?}"
    );
    let bad = Seen {
        method: "PUT".into(),
        path: "/api/v1/vm.restore".into(),
        body: Some(
            json!({"source_url": "/x", "net_fds": [{"id": "net0", "num_fds": 1}], "bogus": 1}),
        ),
        fds: vec![],
    };
    let problems = validate(&bad);
    assert!(
        problems.iter().any(|p| p.contains("unknown key bogus")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("promise 1 fds, 0 attached")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("not a file://")),
        "{problems:?}"
    );
}

#[tokio::test]
async fn cloud_hypervisor_error_chains_reach_our_errors() {
    let server = serve(vec![
        (
            "vm.boot",
            500,
            vec![
                "Error booting VM",
                "Cannot load the kernel into memory",
                "Invalid ELF magic number",
            ],
        ),
        (
            "vm.restore",
            500,
            vec!["Error restoring VM", "Cannot open snapshot config.json"],
        ),
    ]);
    let client = ChClient::new(VmId::new("app-1"), &server.socket);
    let err = client.boot().await.unwrap_err();
    assert!(matches!(err, VmmError::Api { status: 500, .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "cloud-hypervisor vm.boot on app-1: HTTP 500: Error booting VM: Cannot load the kernel into memory: Invalid ELF magic number"
    );
    let f = tempfile::tempfile().unwrap();
    let err = client
        .restore(
            &restore_config(Path::new("/s"), MemoryRestoreMode::Copy),
            &[f.as_fd()],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cloud-hypervisor vm.restore on app-1: HTTP 500: Error restoring VM: Cannot open snapshot config.json"
    );
}

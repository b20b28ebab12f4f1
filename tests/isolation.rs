//! Isolation end to end, with real QEMU VMs on real taps: jailed VMM
//! processes (an unprivileged uid each, QEMU's seccomp sandbox, a mount
//! namespace, a cgroup with a memory ceiling) and the nftables fence
//! around every tap, probed from inside the guests.
#![cfg(feature = "vm-tests")]

mod common;

use std::collections::HashSet;
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use snapgate::config::Config;
use snapgate::net::Egress;
use snapgate::testing::{gateway_config, shared_snapshot_dir};
use snapgate::vmm::jail::JailParams;

fn config(state: &Path, prefix: &str, pool: &str) -> Config {
    gateway_config(state, prefix, pool, &shared_snapshot_dir())
}

/// A field of `/proc/<pid>/status`.
fn status_field(pid: u32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The cgroup directory of `pid` for the memory controller: v2's unified
/// entry, else v1's memory hierarchy.
fn memory_cgroup(pid: u32) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (controllers, path) = (controllers.unwrap(), path.unwrap());
        if unified && controllers.is_empty() {
            return Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        }
        if !unified && controllers.split(',').any(|c| c == "memory") {
            return Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        }
    }
    panic!("no memory cgroup in /proc/{pid}/cgroup:\n{text}");
}

fn memory_limit(dir: &Path) -> u64 {
    let file = if dir.join("memory.max").exists() {
        dir.join("memory.max")
    } else {
        dir.join("memory.limit_in_bytes")
    };
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Every path under `/proc/<pid>/root`, relative, as the VMM sees its
/// root (not descending into `proc`).
fn jail_listing(pid: u32) -> Vec<String> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(&root).unwrap().display().to_string();
            let kind = entry.file_type().unwrap();
            // The system paths and the run directory are listed, not walked.
            let walk =
                kind.is_dir() && !["usr", "proc"].contains(&rel.as_str()) && !rel.contains("/run/");
            out.push(rel);
            if walk {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_vmms_run_unprivileged_in_their_cgroup_and_see_only_their_jail() {
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path(), "sgja", "{ min_warm: 2, max_instances: 2 }");
    let defaults = JailParams::default();
    assert!(cfg.vmm.jail == defaults, "the jail is on by default");
    // A file this process holds open without close-on-exec, as a gateway
    // may inherit one from whatever started it: no VMM gets it.
    let marker = tempfile::NamedTempFile::new().unwrap();
    let inherited = nix::fcntl::open(
        marker.path(),
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let gw = AppGw::with_state(state, &cfg).await;
    wait_for("two warm clones", Duration::from_secs(120), async || {
        gw.pool().stats().instances == 2
    })
    .await;
    let (status, body) = gw.text("/").await;
    assert_eq!(status, 200, "{body}");

    let members = gw.pool().members();
    let mut uids = HashSet::new();
    let mut cgroups = Vec::new();
    for member in &members {
        let pid = member.detail.as_ref().unwrap().pid;
        // An unprivileged uid of its own, from the range, in every slot.
        let ids: Vec<u32> = status_field(pid, "Uid")
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(ids.len(), 4);
        assert!(ids.iter().all(|&id| id == ids[0]), "{ids:?}");
        let range = defaults.first_uid..defaults.first_uid + defaults.uids;
        assert!(range.contains(&ids[0]), "uid {} outside {range:?}", ids[0]);
        uids.insert(ids[0]);
        assert_eq!(
            status_field(pid, "Gid").split_whitespace().next().unwrap(),
            ids[0].to_string()
        );
        // QEMU's seccomp sandbox: filter mode, no new privileges, no
        // capabilities.
        assert_eq!(status_field(pid, "Seccomp"), "2");
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            assert_ne!(target, marker.path(), "VMM {pid} inherited fd {inherited}");
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            cmdline.contains(
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{cmdline:?}"
        );
        // Its own cgroup, whose memory ceiling is the guest's plus the
        // documented overhead.
        let cgroup = memory_cgroup(pid);
        // No network of its own but loopback (its tap came as an fd), in a
        // network namespace that is not the host's.
        let devices = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
        let names: Vec<&str> = devices
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(names, vec!["lo"], "{devices}");
        for ns in ["net", "ipc", "mnt"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{ns} namespace");
        }
        assert!(
            cgroup.ends_with(format!("snapgate-vms-sgja/{}", member.name)),
            "{}",
            cgroup.display()
        );
        let mib = u64::from(snapgate::testing::linux_spec().memory_mib)
            + u64::from(defaults.memory_overhead_mib);
        assert_eq!(memory_limit(&cgroup), mib << 20);
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), pid.to_string(), "the VMM alone is in it");
        cgroups.push(cgroup);

        // Its root: the system paths, its run directory, three devices,
        // its own /proc; nothing else of the host.
        let listing = jail_listing(pid);
        let run_dir = gw
            .state_dir()
            .join("run")
            .join(member.name.as_ref())
            .strip_prefix("/")
            .unwrap()
            .display()
            .to_string();
        assert!(listing.contains(&run_dir), "{listing:#?}");
        for want in ["usr", "etc/ld.so.cache", "dev/null", "dev/urandom", "proc"] {
            assert!(
                listing.iter().any(|l| l == want),
                "{want} missing: {listing:#?}"
            );
        }
        for unwanted in [
            "etc/passwd",
            "etc/shadow",
            "root",
            "home",
            "var",
            "sys",
            "dev/mem",
            "dev/net",
        ] {
            assert!(
                !listing.iter().any(|l| l == unwanted),
                "{unwanted} visible: {listing:#?}"
            );
        }
        // No other VM's run directory, no pid files, no snapshot.
        let others: Vec<&String> = listing
            .iter()
            .filter(|l| {
                l.contains("/run/") && !l.starts_with(&run_dir) && !run_dir.starts_with(l.as_str())
            })
            .collect();
        assert!(others.is_empty(), "{others:#?}");
        assert!(!listing.iter().any(|l| l.ends_with("/vms")), "{listing:#?}");
        assert!(
            !listing.iter().any(|l| l.contains("test-snapshots")),
            "a clone needs no snapshot file: {listing:#?}"
        );
        // Its mount namespace holds exactly those mounts: the root, the
        // system paths, the run directory, the devices and a /proc that
        // shows only its own processes (proc(5): hidepid, subset).
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let mounts: Vec<&str> = mountinfo
            .lines()
            .map(|l| l.split(' ').nth(4).unwrap())
            .collect();
        let mut want = vec![
            "/".to_owned(),
            "/usr".to_owned(),
            "/etc/ld.so.cache".to_owned(),
            "/dev/null".to_owned(),
            "/dev/urandom".to_owned(),
            "/proc".to_owned(),
            format!("/{run_dir}"),
        ];
        let mut got: Vec<String> = mounts.iter().map(|m| m.to_string()).collect();
        want.sort();
        got.sort();
        got.dedup();
        assert_eq!(got, want, "{mountinfo}");
        let proc_line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/proc"))
            .unwrap();
        assert!(
            proc_line.contains("hidepid=invisible") && proc_line.contains("subset=pid"),
            "{proc_line}"
        );
        for line in mountinfo.lines() {
            let point = line.split(' ').nth(4).unwrap();
            let options = line.split(' ').nth(5).unwrap();
            // Device nodes are opened read-write; the run directory is the
            // VMM's to write.
            if point != format!("/{run_dir}") && point != "/proc" && !point.starts_with("/dev/") {
                assert!(
                    options.split(',').any(|o| o == "ro"),
                    "{point} is writable: {line}"
                );
            }
        }
    }
    assert_eq!(uids.len(), 2, "each VMM has a uid of its own");
    gw.stop().await;
    let _ = nix::unistd::close(inherited);
    for cgroup in cgroups {
        assert!(!cgroup.exists(), "{} outlived its VMM", cgroup.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_over_its_memory_ceiling_is_killed_alone_and_the_next_request_gets_a_fresh_clone() {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(state.path(), "sgjm", "{ min_warm: 2, max_instances: 2 }");
    // The ceiling is the guest's memory alone: a clone that writes most of
    // it (its copies, plus the snapshot pages first touched) goes over.
    cfg.vmm.jail.memory_overhead_mib = 0;
    let gw = AppGw::with_state(state, &cfg).await;
    wait_for("two warm clones", Duration::from_secs(120), async || {
        gw.pool().stats().instances == 2
    })
    .await;
    let before = gw.pool().pids();
    let resp = gw.get("/touch/200").send().await.unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    assert_eq!(status, 502, "{body}");
    let alive: Vec<u32> = before.iter().copied().filter(|&p| alive(p)).collect();
    assert_eq!(
        alive.len(),
        1,
        "only the VMM over its ceiling died: {before:?}"
    );
    let dead = *before.iter().find(|p| !alive.contains(p)).unwrap();
    // The kernel's OOM killer chose it, inside its cgroup.
    let dmesg = Command::new("dmesg").output().unwrap();
    let log = String::from_utf8_lossy(&dmesg.stdout);
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("Killed process {dead} "))
                || l.contains(&format!("Killed process {dead},"))),
        "no OOM kill of {dead} in the kernel log"
    );
    assert_eq!(
        gw.metric("snapgate_instance_failures_total{app=\"app\"}")
            .await,
        1.0
    );
    // The next requests are served, by the survivor or a fresh clone.
    for _ in 0..3 {
        let (status, body) = gw.text("/").await;
        assert_eq!(status, 200, "{body}");
    }
    wait_for("a fresh clone", Duration::from_secs(120), async || {
        let pids = gw.pool().pids();
        pids.len() == 2 && !pids.contains(&dead)
    })
    .await;
    assert!(alive.iter().all(|&p| common::alive(p)));
    gw.stop().await;
}

/// A network namespace with a veth pair to the host: `<host_ip>/24` on the
/// host side, `<ns_ip>/24` and the address after it inside, forwarding on the host side (the
/// fence, not the host, decides what reaches it). Removed on drop.
struct Outside {
    name: String,
    host_if: String,
}

impl Outside {
    fn new(tag: &str, host_ip: &str, ns_ip: &str) -> Outside {
        let name = format!("sgiso-{tag}-{}", std::process::id());
        let host_if = format!("sgv{tag}{}", std::process::id() % 10000);
        let ns_if = format!("{host_if}n");
        let ns_ip2 = {
            let mut octets: Vec<&str> = ns_ip.split('.').collect();
            let last: u8 = octets[3].parse().unwrap();
            let next = (last + 1).to_string();
            octets[3] = &next;
            octets.join(".")
        };
        let out = Outside {
            name: name.clone(),
            host_if: host_if.clone(),
        };
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            &ns_if,
        ]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ns_ip2}/24"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", host_ip]);
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{host_if}/forwarding"), "1").unwrap();
        out
    }

    /// A TCP listener on `addr` inside the namespace, accepting for ever.
    fn listen(&self, addr: &str) {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        let addr = addr.to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listener = TcpListener::bind(&addr).unwrap();
            tx.send(()).unwrap();
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        rx.recv().unwrap();
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_if])
            .status();
    }
}

/// The packets counted by the fence rule with `comment` in `table`.
fn fence_count(table: &str, comment: &str) -> u64 {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", table])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut total = 0;
    for item in json["nftables"].as_array().unwrap() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        if rule["comment"].as_str() != Some(comment) {
            continue;
        }
        for expr in rule["expr"].as_array().unwrap() {
            if let Some(n) = expr.pointer("/counter/packets").and_then(|v| v.as_u64()) {
                total += n;
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_reaches_only_what_its_app_is_allowed() {
    let outside = Outside::new("o", "10.213.7.1", "10.213.7.2");
    outside.listen("10.213.7.2:80");
    outside.listen("10.213.7.2:81");
    outside.listen("10.213.7.3:80");
    let other_route = "10.215.7.2/32";

    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(state.path(), "sgjf", "{ min_warm: 2, max_instances: 2 }");
    // The admin listener on every address: still out of the guests' reach.
    cfg.admin = "0.0.0.0:0".parse().unwrap();
    cfg.apps.get_mut("app").unwrap().egress = vec![Egress {
        to: "10.213.7.2/32".parse().unwrap(),
        ports: vec![80],
    }];
    // A host service on all addresses, on a port of its own.
    let host_service = TcpListener::bind("0.0.0.0:0").unwrap();
    host_service.set_nonblocking(true).unwrap();
    let service_port = host_service.local_addr().unwrap().port();

    let gw = AppGw::with_state(state, &cfg).await;
    wait_for("two warm clones", Duration::from_secs(120), async || {
        gw.pool().stats().instances == 2
    })
    .await;
    let table = "snapgate_sgjf";
    // A second gateway whose taps this fence would cover (or the other way
    // round) is refused, naming both.
    let overlapping = snapgate::net::Network::new(snapgate::net::NetParams {
        tap_prefix: "sgjfx".into(),
        ..Default::default()
    })
    .unwrap();
    let refused = snapgate::net::Fence::up(&overlapping, &Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("tap_prefix \"sgjfx\" overlaps \"sgjf\""),
        "{refused}"
    );
    let admin_port = gw.running().admin.port();
    let host_ip = cfg.network.host_ip;
    // Both listeners do answer on the tap's host address, from the host.
    for port in [admin_port, service_port] {
        std::net::TcpStream::connect((host_ip, port)).unwrap();
    }
    while host_service.accept().is_ok() {}

    // The clone that serves the probes, and the other one's tap.
    let probe = |target: String| {
        let gw = &gw;
        async move {
            let (status, body) = gw.text(&format!("/connect/{target}")).await;
            assert_eq!(status, 200, "{body}");
            body.trim().to_owned()
        }
    };
    let instances = gw.pool().instances();
    // A route on the host that leads to each clone's tap: a guest that
    // sends there would reach the other clone through the host.
    let route_to = |tap: &str| {
        let st = Command::new("ip")
            .args(["route", "replace", other_route, "dev", tap])
            .status()
            .unwrap();
        assert!(st.success());
    };

    let to_host = fence_count(table, "to the host");
    assert_eq!(
        probe(format!("{host_ip}:{admin_port}")).await,
        "unreachable"
    );
    assert_eq!(
        probe(format!("{host_ip}:{service_port}")).await,
        "unreachable"
    );
    assert_eq!(probe(format!("{host_ip}:22")).await, "unreachable");
    assert!(fence_count(table, "to the host") >= to_host + 3);
    assert!(
        host_service.accept().is_err(),
        "the host service saw a connection from a guest"
    );

    // Another clone, through the host: whichever clone probes, the route
    // leads to a tap (its own or the other's); both are fenced.
    let tap_to_tap = fence_count(table, "tap to tap");
    for (_, tap) in &instances {
        route_to(tap);
        assert_eq!(probe("10.215.7.2:8080".into()).await, "unreachable");
    }
    let _ = Command::new("ip")
        .args(["route", "delete", other_route])
        .status();
    assert!(
        fence_count(table, "tap to tap") > tap_to_tap,
        "the fence's tap-to-tap rule stopped it"
    );

    // Outside: only the allowed address and port.
    let denied = fence_count(table, "egress not allowed");
    assert_eq!(probe("10.213.7.2:81".into()).await, "unreachable");
    assert_eq!(probe("10.213.7.3:80".into()).await, "unreachable");
    assert!(fence_count(table, "egress not allowed") >= denied + 2);
    for _ in 0..4 {
        // Every clone can, whichever serves the probe.
        assert_eq!(probe("10.213.7.2:80".into()).await, "connected");
    }
    assert!(fence_count(table, "egress of app") >= 4);
    gw.stop().await;
    let out = Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the fence's table outlived its gateway"
    );
    drop(outside);
}

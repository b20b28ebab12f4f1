//! `dist/snapgate.service`: checked by systemd's own analyzer, and the
//! least privilege it grants proven by running the real binary with only
//! that capability, serving a real VM over a real tap.

mod front;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The unit, its binary pointed at this build's.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/snapgate.service"),
    )
    .unwrap();
    let file = dir.join("snapgate.service");
    std::fs::write(
        &file,
        text.replace("/usr/local/bin/snapgate", env!("CARGO_BIN_EXE_snapgate")),
    )
    .unwrap();
    file
}

#[test]
fn the_unit_passes_systemd_analyze_verify_and_security() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "verify: {said}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // "→ Overall exposure level for snapgate.service: 2.0 OK 🙂"
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for snapgate.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    eprintln!("systemd-analyze security: exposure {score}");
    // systemd rates up to 3.9 "OK"; the unit gives what taps, the fence,
    // the VMMs' jails and listeners need and nothing more (README,
    // "Security model").
    assert!(score <= 3.7, "exposure {score}:\n{text}");
    for granted in [
        "CapabilityBoundingSet=~CAP_SYS_PTRACE",
        "CapabilityBoundingSet=~CAP_SYS_MODULE",
        "CapabilityBoundingSet=~CAP_BPF",
        "CapabilityBoundingSet=~CAP_(DAC_",
        "ProtectSystem=",
        "NoNewPrivileges=",
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(granted))
            .unwrap_or_else(|| panic!("{granted} not rated:\n{text}"));
        assert!(line.trim_start().starts_with('✓'), "{line}");
    }
}

/// The capability set `field` (`CapEff`, `CapPrm`, `CapAmb`) of `pid`.
#[cfg(feature = "vm-tests")]
fn caps(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

/// The capabilities the unit grants, as `setpriv` names them.
#[cfg(feature = "vm-tests")]
const UNIT_CAPS: &str = "net_admin,+sys_admin,+setuid,+setgid,+chown,+kill";

/// `setpriv` running a command as the unit does: every capability gone but
/// `caps` (a `setpriv` list), which the gateway keeps as its ambient set,
/// with root's own exec privileges off (`SECBIT_NOROOT`), so that uid 0
/// counts as any user would for capabilities; file access stays root's
/// (the test's files are root's).
#[cfg(feature = "vm-tests")]
fn as_the_unit(caps: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all,+{caps}"),
        format!("--inh-caps=-all,+{caps}"),
        format!("--ambient-caps=-all,+{caps}"),
        "--securebits=+noroot,+noroot_locked".into(),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

#[cfg(feature = "vm-tests")]
fn one_app_config(dir: &std::path::Path, prefix: &str) -> std::path::PathBuf {
    one_app_config_pool(dir, prefix, "{ min_warm: 1, max_instances: 1 }")
}

#[cfg(feature = "vm-tests")]
fn one_app_config_pool(dir: &std::path::Path, prefix: &str, pool: &str) -> std::path::PathBuf {
    let image = snapgate::testing::test_guest_image();
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nshutdown_grace: 5s\n\
             state_dir: {}\nsnapshot_dir: {}\nnetwork: {{ tap_prefix: {prefix} }}\n\
             apps:\n  app:\n    hosts: [app.test]\n    image: {image}\n    pool: {pool}\n",
            dir.join("state").display(),
            snapgate::testing::shared_snapshot_dir().display(),
        ),
    )
    .unwrap();
    config
}

/// The cgroup directories `name` a service manager would delegate, in each
/// hierarchy with the memory, cpu or pids controller where this process's
/// cgroup is; removed on drop.
#[cfg(feature = "vm-tests")]
struct Delegated(Vec<std::path::PathBuf>);

#[cfg(feature = "vm-tests")]
impl Delegated {
    fn new(name: &str) -> Delegated {
        let mut dirs = Vec::new();
        if !std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
            for controller in ["memory", "cpu", "pids"] {
                let path = own
                    .lines()
                    .find_map(|l| {
                        let mut parts = l.splitn(3, ':');
                        let (_, c, p) = (parts.next()?, parts.next()?, parts.next()?);
                        c.split(',').any(|x| x == controller).then_some(p)
                    })
                    .unwrap();
                let mount = if controller == "cpu"
                    && !std::path::Path::new("/sys/fs/cgroup/cpu").exists()
                {
                    "/sys/fs/cgroup/cpu,cpuacct".to_owned()
                } else {
                    format!("/sys/fs/cgroup/{controller}")
                };
                let dir = std::path::Path::new(&mount)
                    .join(path.trim_start_matches('/'))
                    .join(name);
                std::fs::create_dir_all(&dir).unwrap();
                dirs.push(dir);
            }
        }
        Delegated(dirs)
    }
}

#[cfg(feature = "vm-tests")]
impl Drop for Delegated {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A host that cannot jail VMMs is told so at start-up, with the key that
/// turns the part off: with CAP_NET_ADMIN alone, the user switch cannot
/// happen, and snapgate exits before any VM runs.
#[cfg(feature = "vm-tests")]
#[test]
fn without_the_jails_capabilities_start_up_fails_naming_the_part_and_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = one_app_config(dir.path(), "sgcan");
    let wrapper = as_the_unit("net_admin");
    let out = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(env!("CARGO_BIN_EXE_snapgate"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "vmm.jail.user: snapgate lacks CAP_SETUID, CAP_SETGID, CAP_CHOWN, CAP_KILL; \
             set vmm.jail.user: false to run VMMs without it"
        ),
        "{stderr}"
    );
}

/// The unit's capabilities are enough: the gateway makes taps, fences
/// them, jails and restores a VM and serves through it, and the VMMs it
/// starts have no capability at all. The unit's other settings
/// (system-call filter, `ProtectSystem`, device policy) are checked by
/// `systemd-analyze` above, not run here: this machine has no systemd as
/// its init.
#[cfg(feature = "vm-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_a_vm_app_with_the_units_capabilities_alone() {
    const UNIT: u64 = 1 << 12 | 1 << 21 | 1 << 7 | 1 << 6 | 1 << 5 | 1;
    let dir = tempfile::tempdir().unwrap();
    let config = one_app_config(dir.path(), "sgcap");
    // As systemd does for a unit with Delegate=: the gateway's cgroup is
    // made for it, its own to write (here, where the gateway's cgroup is a
    // v1 hierarchy's read-only root, the directory its VMMs go in).
    let delegated = Delegated::new("snapgate-vms-sgcap");
    let wrapper = as_the_unit(UNIT_CAPS);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let gw =
        front::Binary::start_under(&wrapper, &config, std::time::Duration::from_secs(300)).await;
    let pid = gw.child.id().unwrap();
    assert_eq!(caps(pid, "CapEff"), UNIT, "the gateway's CapEff");
    assert_eq!(caps(pid, "CapPrm"), UNIT, "the gateway's CapPrm");
    let resp = reqwest::Client::new()
        .get(format!("http://{}/", gw.listen))
        .header("host", "app.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let vmms = snapgate::testing::children_named(pid, "qemu");
    assert!(!vmms.is_empty(), "a VMM runs");
    for vmm in vmms {
        for field in ["CapEff", "CapPrm", "CapAmb"] {
            assert_eq!(caps(vmm, field), 0, "VMM {vmm}'s {field}");
        }
        let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
        assert!(
            status.contains("\nSeccomp:\t2\n"),
            "VMM {vmm} is jailed: {status}"
        );
    }
    drop(gw);
    let left: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sgcap"))
        .collect();
    assert!(left.is_empty(), "taps left: {left:?}");
    drop(delegated);
}

/// `Type=notify`: the gateway speaks systemd's notify protocol
/// (sd_notify(3), datagrams on `$NOTIFY_SOCKET`): READY=1 once it serves,
/// RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM.
/// The test is the service manager's end of the socket.
#[tokio::test]
async fn the_gateway_tells_the_service_manager_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let up = front::upstream().await;
    let config = front::static_site_config(dir.path(), up);
    let socket_path = dir.path().join("notify");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let next = async || {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), socket.recv(&mut buf))
            .await
            .expect("a notification in time")
            .unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let mut gw = front::Binary::start_env(
        &config,
        std::time::Duration::from_secs(60),
        &[("NOTIFY_SOCKET", socket_path.as_os_str())],
    )
    .await;
    assert_eq!(next().await, "READY=1\nSTATUS=serving\n");
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = next().await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(
        next().await,
        "READY=1\nSTATUS=serving; last reload applied\n"
    );
    // A file that does not load: rejected, and said so.
    std::fs::write(&config, "listen: [not an address\n").unwrap();
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(next().await.starts_with("RELOADING=1\n"));
    let rejected = next().await;
    assert!(
        rejected.starts_with("READY=1\nSTATUS=serving; last reload rejected: "),
        "{rejected}"
    );
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(next().await, "STOPPING=1\nSTATUS=draining\n");
    let status = gw.child.wait().await.unwrap();
    assert!(status.success(), "{status}");
}

/// The directories named `name` under `/sys/fs/cgroup`, at most `depth`
/// levels down: a gateway's VMM cgroups' parents, in every hierarchy.
#[cfg(feature = "vm-tests")]
fn cgroup_dirs_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if entry.file_name() == name {
                out.push(path);
            } else if depth > 0 {
                walk(&path, name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), name, 6, &mut out);
    out
}

/// The VMM cgroups under the parents named `name`.
#[cfg(feature = "vm-tests")]
fn vmm_cgroups(name: &str) -> Vec<PathBuf> {
    cgroup_dirs_named(name)
        .iter()
        .flat_map(|base| std::fs::read_dir(base).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// A gateway stopped (SIGINT) while a clone restores for a held request
/// kills that VMM and releases its jail before it exits: no cgroup of its
/// VMMs is left, in any hierarchy, and the held request is answered.
#[cfg(feature = "vm-tests")]
#[tokio::test]
async fn a_gateway_stopped_mid_restore_leaves_no_vmm_cgroup() {
    let dir = tempfile::tempdir().unwrap();
    let config = one_app_config_pool(dir.path(), "sgjs", "{ min_warm: 0, max_instances: 1 }");
    let mut gw = front::Binary::start(&config, std::time::Duration::from_secs(900)).await;
    assert!(vmm_cgroups("snapgate-vms-sgjs").is_empty(), "at zero");
    let held = tokio::spawn(
        reqwest::Client::new()
            .get(format!("http://{}/", gw.listen))
            .header("host", "app.test")
            .send(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while vmm_cgroups("snapgate-vms-sgjs").is_empty() {
        assert!(std::time::Instant::now() < deadline, "no restore began");
        tokio::task::yield_now().await;
    }
    gw.signal(nix::sys::signal::Signal::SIGINT);
    let exited = tokio::time::timeout(std::time::Duration::from_secs(60), gw.child.wait())
        .await
        .expect("the gateway stops")
        .unwrap();
    assert!(exited.success(), "{exited}");
    let left = vmm_cgroups("snapgate-vms-sgjs");
    assert!(left.is_empty(), "left behind: {left:?}");
    let status = held
        .await
        .unwrap()
        .expect("the held request is answered")
        .status();
    assert!(status == 503 || status == 200, "{status}");
}

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
    // systemd rates up to 3.9 "OK"; the unit gives what taps, VMs and
    // listeners need and nothing more.
    assert!(score <= 2.5, "exposure {score}:\n{text}");
    for granted in [
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "CapabilityBoundingSet=~CAP_SYS_PTRACE",
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

/// The unit grants `CAP_NET_ADMIN` alone: the gateway makes taps,
/// restores a VM and serves through it with nothing more, and the VMMs it
/// starts have no capability at all. Run as the unit's capabilities are
/// given (an ambient set of one), with root's own exec privileges off
/// (`SECBIT_NOROOT`), so that uid 0 counts as any user would for
/// capabilities; file access stays root's (the test's files are root's).
/// The unit's other settings (system-call filter, `ProtectSystem`,
/// device policy) are checked by `systemd-analyze` above, not run here:
/// this machine has no systemd as its init.
#[cfg(feature = "vm-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_a_vm_app_with_cap_net_admin_alone() {
    const CAP_NET_ADMIN: u64 = 1 << 12;
    let dir = tempfile::tempdir().unwrap();
    let image = snapgate::testing::test_guest_image();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nshutdown_grace: 5s\n\
             state_dir: {}\nsnapshot_dir: {}\nnetwork: {{ tap_prefix: sgcap }}\n\
             apps:\n  app:\n    hosts: [app.test]\n    image: {image}\n    pool: {{ min_warm: 1, max_instances: 1 }}\n",
            dir.path().join("state").display(),
            snapgate::testing::shared_snapshot_dir().display(),
        ),
    )
    .unwrap();
    // As the unit: every capability gone but CAP_NET_ADMIN, which the
    // VMMs it starts keep as the unit's ambient set gives it.
    let gw = front::Binary::start_under(
        &[
            "setpriv",
            "--bounding-set=-all,+net_admin",
            "--inh-caps=-all,+net_admin",
            "--ambient-caps=-all,+net_admin",
            "--securebits=+noroot,+noroot_locked",
            "--no-new-privs",
            "--",
        ],
        &config,
        std::time::Duration::from_secs(300),
    )
    .await;
    let pid = gw.child.id().unwrap();
    assert_eq!(caps(pid, "CapEff"), CAP_NET_ADMIN, "the gateway's CapEff");
    assert_eq!(caps(pid, "CapPrm"), CAP_NET_ADMIN, "the gateway's CapPrm");
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
    }
    drop(gw);
    let left: Vec<String> = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sgcap"))
        .collect();
    assert!(left.is_empty(), "taps left: {left:?}");
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

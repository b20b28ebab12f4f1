//! QEMU driver end to end: real VMs (TCG here, KVM where the host has it),
//! real taps. Needs root, /dev/net/tun, QEMU and the test guest.
#![cfg(feature = "vm-tests")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use snapgate::net::Network;
use snapgate::testing::linux_spec;
use snapgate::vmm::qemu::{Accel, Qemu};
use snapgate::vmm::{Snapshot, SnapshotMode, VmId, Vmm, VmmError};

struct Env {
    state: tempfile::TempDir,
    net: Network,
    qemu: Qemu,
}

fn env(prefix: &str) -> Env {
    let state = tempfile::tempdir().unwrap();
    let net = Network::new(net_params(prefix)).unwrap();
    let qemu = Qemu::new(
        "qemu-system-x86_64",
        Accel::Auto,
        state.path(),
        net.params().clone(),
    )
    .unwrap();
    Env { state, net, qemu }
}

/// Boots the test guest, waits until it is ready and snapshots it.
async fn build_snapshot(env: &Env, mode: SnapshotMode) -> (Snapshot, u32) {
    let mut spec = linux_spec();
    spec.snapshot_mode = mode;
    build_snapshot_of(env, &spec).await
}

/// Boots `spec`, waits until it is ready and snapshots it.
async fn build_snapshot_of(env: &Env, spec: &snapgate::vmm::ImageSpec) -> (Snapshot, u32) {
    let tap = env.net.create_tap().await.unwrap();
    let mut vm = env
        .qemu
        .boot(VmId::new("template"), spec, tap)
        .await
        .unwrap();
    let pid = vm.pid();
    snapgate::vmm::ready::wait_ready(&env.qemu, &mut vm, spec.ready_timeout)
        .await
        .unwrap();
    let dest = env.state.path().join("snap");
    let snap = env.qemu.snapshot(vm, &dest).await.unwrap();
    (snap, pid)
}

/// Restores a clone of `snap` on a new tap and waits until it is ready.
async fn ready_clone(env: &Env, snap: &Snapshot, name: &str) -> snapgate::vmm::Vm {
    let tap = env.net.create_tap().await.unwrap();
    let mut vm = env.qemu.restore(VmId::new(name), snap, tap).await.unwrap();
    snapgate::vmm::ready::wait_ready(&env.qemu, &mut vm, Duration::from_secs(30))
        .await
        .unwrap();
    vm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clones_each_answer_over_their_own_tap_with_their_own_identity() {
    let env = env("sgqc");
    let (snap, template_pid) = build_snapshot(&env, SnapshotMode::Template).await;
    assert!(
        !alive(template_pid) || eventually(Duration::from_secs(5), || !alive(template_pid)).await
    );
    assert_eq!(
        snap.manifest()
            .files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>(),
        ["state", "memory"]
    );

    // Restore three clones at once; each VM value kills its VMM if the test
    // fails before the explicit destroy below.
    let restores = (0..3).map(|i| ready_clone(&env, &snap, ["clone0", "clone1", "clone2"][i]));
    let clones = futures::future::join_all(restores).await;
    let pids: Vec<u32> = clones.iter().map(|vm| vm.pid()).collect();
    let taps: Vec<String> = clones.iter().map(|vm| vm.endpoint().tap.clone()).collect();
    assert_eq!(
        taps.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "{taps:?}"
    );

    let mut identities = std::collections::HashSet::new();
    for vm in &clones {
        for step in ["spawn", "load", "resume", "ready"] {
            assert!(
                vm.timings().get(step).is_some(),
                "{} lacks timing {step}",
                vm.id()
            );
        }
        let body = get_text(vm.endpoint(), "/who").await;
        assert!(body.contains("request: GET /who HTTP/1.1"), "{body}");
        let id = instance_of(&body);
        // Asking again over the same tap reaches the same instance.
        assert_eq!(instance_of(&get_text(vm.endpoint(), "/again").await), id);
        identities.insert(id);
    }
    assert_eq!(identities.len(), 3, "clones answered with {identities:?}");

    for vm in clones {
        env.qemu.destroy(vm).await.unwrap();
    }
    assert_all_gone(&env.net, &pids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_snapshot_restores_a_working_clone() {
    let env = env("sgqf");
    let (snap, _) = build_snapshot(&env, SnapshotMode::Full).await;
    assert_eq!(snap.manifest().mode, SnapshotMode::Full);
    assert!(!snap.file("memory").exists());
    let vm = ready_clone(&env, &snap, "full1").await;
    let body = get_text(vm.endpoint(), "/").await;
    assert!(body.starts_with("instance: "), "{body}");
    let pid = vm.pid();
    env.qemu.destroy(vm).await.unwrap();
    assert_all_gone(&env.net, &[pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_snapshots_fail_fast_naming_the_file_and_leave_nothing() {
    let env = env("sgqb");
    let (snap, _) = build_snapshot(&env, SnapshotMode::Template).await;
    let src = snap.dir();

    // Copies of the snapshot, broken three ways (hard links: no 256 MiB copies).
    let variant = |name: &str, skip: &str| {
        let dir = env.state.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in ["manifest.json", "state", "memory"] {
            if f != skip {
                std::fs::hard_link(src.join(f), dir.join(f)).unwrap();
            }
        }
        dir
    };
    let missing = variant("missing", "memory");
    let truncated = variant("truncated", "state");
    let state_len = std::fs::metadata(src.join("state")).unwrap().len() as usize;
    std::fs::write(truncated.join("state"), vec![0u8; state_len / 2]).unwrap();
    let garbage = variant("garbage", "state");
    std::fs::write(garbage.join("state"), vec![0xa5u8; state_len]).unwrap();

    // Opening checks each file against the manifest before any VMM starts.
    let err = Snapshot::open(&missing).unwrap_err();
    assert!(matches!(err, VmmError::SnapshotFile { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{}/memory", missing.display())),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
    let err = Snapshot::open(&truncated).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("{}/state", truncated.display())),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");

    // A file damaged after open is caught again by restore, still before spawning.
    let opened = Snapshot::open(&garbage).unwrap();
    std::fs::remove_file(garbage.join("memory")).unwrap();
    let tap = env.net.create_tap().await.unwrap();
    let err = env
        .qemu
        .restore(VmId::new("late"), &opened, tap)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/memory"), "{err}");
    assert!(
        !env.state.path().join("vms/late.pid").exists(),
        "a VMM was started"
    );

    // Same size, wrong content: QEMU refuses the state and the error carries its words.
    std::fs::hard_link(src.join("memory"), garbage.join("memory")).unwrap();
    let opened = Snapshot::open(&garbage).unwrap();
    let tap = env.net.create_tap().await.unwrap();
    let started = Instant::now();
    let err = env
        .qemu
        .restore(VmId::new("garbage"), &opened, tap)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("garbage"), "{msg}");
    assert!(
        msg.to_lowercase().contains("migration") || msg.contains("exited"),
        "{msg}"
    );
    eprintln!(
        "garbage state rejected after {:?}: {msg}",
        started.elapsed()
    );
    assert_all_gone(&env.net, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_never_becomes_ready_fails_at_the_deadline_and_leaves_nothing() {
    let env = env("sgqn");
    let mut spec = linux_spec();
    // The guest keeps serving 8080 while readiness probes 8099: it can never
    // become ready, however fast it boots.
    spec.cmdline = spec.cmdline.replace("{guest_port}", "8080");
    spec.guest_port = 8099;
    let tap = env.net.create_tap().await.unwrap();
    let mut vm = env.qemu.boot(VmId::new("never"), &spec, tap).await.unwrap();
    let pid = vm.pid();
    let run_dir = vm.process().run_dir().to_owned();
    // The guest is up and serving, just not where readiness looks.
    let mut serving = vm.endpoint().clone();
    serving.addr.set_port(8080);
    let up = Instant::now() + Duration::from_secs(60);
    while !matches!(
        snapgate::vmm::ready::get(&serving, "/healthz").await,
        Ok((200, _))
    ) {
        assert!(Instant::now() < up, "the guest never served on 8080");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Duration::from_secs(4);
    let started = Instant::now();
    let err = snapgate::vmm::ready::wait_ready(&env.qemu, &mut vm, deadline)
        .await
        .unwrap_err();
    assert!(started.elapsed() >= deadline);
    let msg = err.to_string();
    assert!(matches!(err, VmmError::NotReady { .. }), "{msg}");
    assert!(
        msg.contains("never not ready after 4.0s: GET /healthz on 169.254.100.2:8099"),
        "{msg}"
    );
    assert!(msg.contains("sgqn"), "the error names the tap: {msg}");
    drop(vm);
    assert_all_gone(&env.net, &[pid]).await;
    assert!(!run_dir.exists(), "run directory left behind");
    assert!(!env.state.path().join("vms/never.pid").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_that_dies_during_boot_is_reported_with_its_output() {
    let env = env("sgqd");
    let mut spec = linux_spec();
    // An initramfs that is not one: the kernel panics, -no-reboot ends QEMU.
    let bogus = env.state.path().join("bogus.img");
    std::fs::write(&bogus, b"not an initramfs").unwrap();
    spec.initramfs = Some(bogus);
    let tap = env.net.create_tap().await.unwrap();
    let mut vm = env.qemu.boot(VmId::new("dies"), &spec, tap).await.unwrap();
    let pid = vm.pid();
    let err = snapgate::vmm::ready::wait_ready(&env.qemu, &mut vm, Duration::from_secs(60))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VmmError::Exited { .. }), "{msg}");
    assert!(msg.contains("[console]"), "console output attached: {msg}");
    drop(vm);
    assert_all_gone(&env.net, &[pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_crashed_run_are_removed_at_start_up() {
    let env = env("sgqs");
    let spec = linux_spec();
    let tap = env.net.create_tap().await.unwrap();
    let vm = env
        .qemu
        .boot(VmId::new("orphan"), &spec, tap)
        .await
        .unwrap();
    let pid = vm.pid();
    // A crashed gateway runs no destructors: its VMM and tap live on...
    std::mem::forget(vm);
    // ...and it is gone: its pid file names an owner that no longer runs
    // (this process, with another start time).
    let pid_file = env.state.path().join("vms/orphan.pid");
    let text = std::fs::read_to_string(&pid_file).unwrap();
    let mut fields: Vec<&str> = text.split_whitespace().collect();
    fields[4] = "1";
    std::fs::write(&pid_file, fields.join(" ")).unwrap();
    assert_eq!(env.net.list_taps().await.unwrap().len(), 1);
    // A tap of the same prefix that no pid file names (another gateway's)
    // must survive the clean-up.
    let bystander = env.net.create_tap().await.unwrap();
    let stale = snapgate::vmm::process::kill_stale(env.state.path());
    assert_eq!(stale.killed, vec![pid]);
    assert_eq!(stale.taps.len(), 1);
    env.net.remove_taps(&stale.taps).await.unwrap();
    assert!(eventually(Duration::from_secs(10), || !alive(pid)).await);
    let left: Vec<String> = env
        .net
        .list_taps()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.1)
        .collect();
    assert_eq!(left, vec![bystander.name().to_owned()]);
    drop(bystander);
    assert_all_gone(&env.net, &[pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pc_machine_boots_snapshots_and_clones() {
    let env = env("sgqp");
    let mut spec = linux_spec();
    spec.machine = snapgate::vmm::Machine::Pc;
    let (snap, _) = build_snapshot_of(&env, &spec).await;
    assert_eq!(snap.manifest().spec.machine, snapgate::vmm::Machine::Pc);
    let clone = ready_clone(&env, &snap, "pc-clone").await;
    assert!(get_text(clone.endpoint(), "/")
        .await
        .starts_with("instance: "));
    let pid = clone.pid();
    env.qemu.destroy(clone).await.unwrap();
    assert_all_gone(&env.net, &[pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_build_command_reports_path_size_and_seconds() {
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("proxy.yaml");
    let image = serde_json::to_string(&linux_spec()).unwrap();
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nnetwork: {{ tap_prefix: sgqk }}\napps:\n  web:\n    hosts: [web.test]\n    image: {image}\n\
             \x20 site:\n    hosts: [site.test]\n    upstream: 127.0.0.1:1\n",
            state.path().display(),
        ),
    )
    .unwrap();
    let run = |app: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_snapgate"))
            .args(["snapshot", "build", "--config"])
            .arg(&config)
            .args(["--app", app])
            .output()
            .unwrap()
    };
    let out = run("web");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("web: booting template with qemu"),
        "{stdout}"
    );
    assert!(stdout.contains("web: ready after "), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("web: snapshot "))
        .expect("result line");
    // "web: snapshot <path> (<size> MiB) in <s>s; <s>s in all"
    let path = line.split_whitespace().nth(2).unwrap();
    assert!(
        line.contains(" MiB) in ") && line.ends_with("s in all"),
        "{line}"
    );
    let snap = snapgate::vmm::Snapshot::open(std::path::Path::new(path)).unwrap();
    let current = state.path().join("snapshots/web/current");
    assert_eq!(
        std::fs::canonicalize(current).unwrap(),
        std::fs::canonicalize(snap.dir()).unwrap()
    );
    // A static app has nothing to snapshot: refused by name.
    let out = run("site");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM or runtime app \"site\""));
    assert!(
        std::fs::read_dir(state.path().join("vms"))
            .unwrap()
            .next()
            .is_none(),
        "pid files left"
    );
}

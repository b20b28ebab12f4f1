//! VMM layer benchmark: boot-to-ready, snapshot, clone-to-first-byte and
//! memory per clone, with real VMs. Prints a table.
//!
//!     SNAPGATE_GUEST_DIR=$(scripts/build-guest) cargo bench --features vm-tests --bench vmm
//!
//! `SNAPGATE_BENCH_RUNS` sets the number of runs (default 5; at least 5).

use std::time::{Duration, Instant};

use snapgate::net::{NetParams, Network};
use snapgate::vmm::qemu::{Accel, Qemu};
use snapgate::vmm::{ImageSpec, Snapshot, SnapshotMode, VmId, Vmm};

fn guest_spec(mode: SnapshotMode) -> ImageSpec {
    let mut spec = snapgate::testing::linux_spec();
    spec.snapshot_mode = mode;
    spec
}

struct Stats(Vec<f64>);

impl Stats {
    fn row(&self, name: &str, unit: &str) -> String {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        format!(
            "| {name:<44} | {:>8.1} | {:>8.1} | {:>8.1} | {unit:<4} | {:>4} |",
            v[0],
            median,
            v[v.len() - 1],
            v.len()
        )
    }
}

/// (RSS, private) of a process in MiB, from smaps_rollup.
fn memory_mib(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum::<f64>()
            / 1024.0
    };
    (
        field("Rss:"),
        field("Private_Clean:") + field("Private_Dirty:"),
    )
}

async fn first_byte(vm: &snapgate::vmm::Vm) -> Duration {
    let t = Instant::now();
    let (status, _) = snapgate::vmm::ready::get(vm.endpoint(), "/")
        .await
        .expect("GET /");
    assert_eq!(status, 200);
    t.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("SNAPGATE_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(5);
    let state = tempfile::tempdir().expect("tempdir");
    let net = Network::new(NetParams {
        tap_prefix: "sgbn".into(),
        ..NetParams::default()
    })
    .expect("network");
    let qemu = Qemu::new(
        "qemu-system-x86_64",
        Accel::Auto,
        state.path(),
        net.params().clone(),
    )
    .expect("qemu");
    eprintln!("accel: {}, runs: {runs}", qemu.accel());

    let mut rows = Vec::new();
    let mut snapshots: Vec<(SnapshotMode, Snapshot)> = Vec::new();
    for mode in [SnapshotMode::Template, SnapshotMode::Full] {
        let (mut boot, mut save, mut size) = (Vec::new(), Vec::new(), 0u64);
        for i in 0..runs {
            let spec = guest_spec(mode);
            let t = Instant::now();
            let tap = net.create_tap().await.expect("tap");
            let mut vm = qemu
                .boot(VmId::new(format!("tpl-{mode:?}-{i}")), &spec, tap)
                .await
                .expect("boot");
            snapgate::vmm::ready::wait_ready(&qemu, &mut vm, spec.ready_timeout)
                .await
                .expect("ready");
            boot.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let dest = state.path().join(format!("snap-{mode:?}-{i}"));
            let snap = qemu.snapshot(vm, &dest).await.expect("snapshot");
            save.push(t.elapsed().as_secs_f64() * 1e3);
            size = snap.size_bytes();
            if i == 0 {
                snapshots.push((mode, snap));
            } else {
                std::fs::remove_dir_all(dest).expect("remove snapshot");
            }
        }
        if mode == SnapshotMode::Template {
            rows.push(Stats(boot).row("boot to ready (cold boot, HTTP 200)", "ms"));
        }
        rows.push(Stats(save).row(
            &format!(
                "snapshot {mode:?} ({:.1} MiB on disk)",
                size as f64 / 1048576.0
            ),
            "ms",
        ));
    }

    for (mode, snap) in &snapshots {
        let (mut first, mut restore, mut rss, mut private) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut alive = Vec::new();
        for i in 0..runs {
            let t = Instant::now();
            let tap = net.create_tap().await.expect("tap");
            let vm = qemu
                .restore(VmId::new(format!("clone-{mode:?}-{i}")), snap, tap)
                .await
                .expect("restore");
            restore.push(t.elapsed().as_secs_f64() * 1e3);
            // Clone to first byte: restore + the first answered request.
            let mut waited = vm;
            snapgate::vmm::ready::wait_ready(&qemu, &mut waited, Duration::from_secs(30))
                .await
                .expect("ready");
            first.push(t.elapsed().as_secs_f64() * 1e3);
            let _ = first_byte(&waited).await;
            alive.push(waited);
        }
        // Memory with all clones alive and each having served a request.
        for vm in &alive {
            let (r, p) = memory_mib(vm.pid());
            rss.push(r);
            private.push(p);
        }
        rows.push(Stats(restore).row(&format!("restore, {mode:?} (spawn+load+resume)"), "ms"));
        rows.push(Stats(first).row(&format!("clone to first byte, {mode:?}"), "ms"));
        if *mode == SnapshotMode::Template {
            // The same, and the test guest's on_restore hook (reseed the
            // kernel's generator, set the clock) before the first byte.
            let hook = snapgate::testing::test_guest_on_restore().hook(8080, "/healthz");
            let mut made_own = Vec::new();
            for i in 0..runs {
                let t = Instant::now();
                let tap = net.create_tap().await.expect("tap");
                let mut vm = qemu
                    .restore(VmId::new(format!("own-{i}")), snap, tap)
                    .await
                    .expect("restore");
                snapgate::vmm::resumed::ready_and_resumed(
                    &qemu,
                    &mut vm,
                    Some(&hook),
                    Duration::from_secs(30),
                )
                .await
                .expect("ready, then on_restore");
                made_own.push(t.elapsed().as_secs_f64() * 1e3);
                qemu.destroy(vm).await.expect("destroy");
            }
            rows.push(Stats(made_own).row("clone to first byte, Template, with on_restore", "ms"));
        }
        rows.push(Stats(rss).row(&format!("RSS per clone, {mode:?} ({runs} alive)"), "MiB"));
        rows.push(Stats(private).row(&format!("private memory per clone, {mode:?}"), "MiB"));
        for vm in alive {
            qemu.destroy(vm).await.expect("destroy");
        }
    }

    println!();
    println!(
        "snapgate VMM benchmark: QEMU {}, 256 MiB guest, 1 vCPU",
        qemu.accel()
    );
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>8} | {:<4} | {:>4} |",
        "step", "min", "median", "max", "unit", "runs"
    );
    println!(
        "|{:-<46}|{:-<10}|{:-<10}|{:-<10}|{:-<6}|{:-<6}|",
        "", "", "", "", "", ""
    );
    for row in rows {
        println!("{row}");
    }
}

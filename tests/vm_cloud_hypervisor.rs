//! Cloud Hypervisor against a real `cloud-hypervisor` binary
//! (`$SNAPGATE_CH_BIN` or PATH). Without one, each test reports itself as
//! skipped by name. Snapshot and restore also need hardware KVM.
#![cfg(feature = "vm-tests")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use snapgate::net::Network;
use snapgate::testing::linux_spec;
use snapgate::vmm::cloud_hypervisor::{vm_config, ChClient, CloudHypervisor, MemoryRestoreMode};
use snapgate::vmm::process::{make_run_dir, Launch, VmProcess};
use snapgate::vmm::qemu::hardware_kvm;
use snapgate::vmm::{ImageSpec, VmId, Vmm};

fn halting_spec(dir: &std::path::Path) -> ImageSpec {
    let kernel = dir.join("halt.elf");
    halting_pvh_kernel(&kernel);
    serde_yaml_ng::from_str(&format!(
        "kernel: {}\ncmdline: ''\nmemory_mib: 64\n",
        kernel.display()
    ))
    .unwrap()
}

/// The Cloud Hypervisor binary, or `None` after reporting `test` as
/// skipped for want of one.
fn ch_or_skip(test: &str) -> Option<std::path::PathBuf> {
    let bin = cloud_hypervisor_bin();
    if bin.is_none() {
        skip(test, "no cloud-hypervisor binary (set SNAPGATE_CH_BIN)");
    }
    bin
}

#[tokio::test]
async fn lifecycle_create_boot_info_pause_resume_shutdown_delete() {
    let Some(bin) =
        ch_or_skip("vm_cloud_hypervisor::lifecycle_create_boot_info_pause_resume_shutdown_delete")
    else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let spec = halting_spec(state.path());
    let id = VmId::new("ch-life");
    let run = make_run_dir(state.path(), &id).unwrap();
    let socket = run.join("api.sock");
    let args = vec![
        "--api-socket".into(),
        format!("path={}", socket.display()).into(),
    ];
    let launch = Launch {
        binary: &bin,
        args: &args,
        fds: vec![],
        tap: None,
        transparent_huge_pages: true,
        confinement: None,
    };
    let mut process = VmProcess::spawn(&id, launch, &run, state.path()).unwrap();
    let pid = process.pid();
    let client = ChClient::new(id.clone(), &socket);
    client
        .wait_for_api(&mut process, Instant::now() + Duration::from_secs(10))
        .await
        .unwrap();

    let ping = client.ping().await.unwrap();
    assert!(ping["version"].is_string(), "{ping}");
    client.create(&vm_config(&spec, "", &run)).await.unwrap();
    assert_eq!(client.state().await.unwrap(), "Created");
    client.boot().await.unwrap();
    let info = client.info().await.unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["config"]["memory"]["size"], 64u64 << 20);
    client.pause().await.unwrap();
    assert_eq!(client.state().await.unwrap(), "Paused");
    client.resume().await.unwrap();
    assert_eq!(client.state().await.unwrap(), "Running");
    client.shutdown().await.unwrap();
    // CH tears the VM down but keeps its config: it could boot again.
    assert_eq!(client.state().await.unwrap(), "Created");
    client.delete().await.unwrap();
    // No VM any more: CH says so through its error chain.
    let err = client.info().await.unwrap_err().to_string();
    assert!(err.contains("vm.info") && err.contains("HTTP"), "{err}");
    client.vmm_shutdown().await.unwrap();
    process.stop(Duration::from_secs(5)).await.unwrap();
    assert!(
        process.exited().unwrap().success(),
        "{:?}",
        process.exited()
    );
    drop(process);
    assert!(!alive(pid));
}

#[tokio::test]
async fn driver_boots_with_the_tap_fd_passed_over_the_api() {
    let Some(bin) =
        ch_or_skip("vm_cloud_hypervisor::driver_boots_with_the_tap_fd_passed_over_the_api")
    else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    // With a code slot, as a runtime image has.
    let mut spec = halting_spec(state.path());
    spec.extra_disk_mib = Some(4);
    let net = Network::new(net_params("sgch")).unwrap();
    let ch = CloudHypervisor::new(
        bin,
        state.path(),
        net.params().clone(),
        MemoryRestoreMode::Copy,
    );
    let tap = net.create_tap().await.unwrap();
    let tap_name = tap.name().to_owned();
    let vm = ch.boot(VmId::new("ch-net"), &spec, tap).await.unwrap();
    let pid = vm.pid();
    let info = CloudHypervisor::client(&vm).info().await.unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    let nets = info["config"]["net"].as_array().expect("a net device");
    assert_eq!(nets.len(), 1, "{info}");
    assert_eq!(nets[0]["id"], "net0");
    assert_eq!(nets[0]["mac"], net.params().guest_mac.to_string());
    // CH reports the fd it was given; our copy is closed, so the tap lives
    // only through the VMM.
    assert_eq!(nets[0]["fds"].as_array().map(Vec::len), Some(1), "{info}");
    // The code slot: this VM's own 4 MiB file, read-only.
    let slot = vm.extra_disk().expect("a code slot");
    assert_eq!(std::fs::metadata(&slot).unwrap().len(), 4 << 20);
    let disks = info["config"]["disks"].as_array().expect("disks");
    assert_eq!(
        disks.last().unwrap()["path"],
        slot.to_str().unwrap(),
        "{info}"
    );
    assert_eq!(disks.last().unwrap()["readonly"], true, "{info}");
    assert_eq!(
        net.list_taps()
            .await
            .unwrap()
            .iter()
            .map(|t| t.1.clone())
            .collect::<Vec<_>>(),
        vec![tap_name]
    );
    for step in ["spawn", "create", "boot"] {
        assert!(vm.timings().get(step).is_some(), "no {step} timing");
    }
    ch.destroy(vm).await.unwrap();
    assert_all_gone(&net, &[pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_clones_with_distinct_identities() {
    const NAME: &str = "vm_cloud_hypervisor::snapshot_and_restore_clones_with_distinct_identities";
    let Some(bin) = ch_or_skip(NAME) else {
        return;
    };
    if !hardware_kvm() {
        return skip(
            NAME,
            "Cloud Hypervisor snapshots need hardware KVM (no vmx/svm here)",
        );
    }
    let state = tempfile::tempdir().unwrap();
    let net = Network::new(net_params("sgcs")).unwrap();
    let ch = CloudHypervisor::new(
        bin,
        state.path(),
        net.params().clone(),
        MemoryRestoreMode::Copy,
    );
    let mut spec = linux_spec();
    // CH's serial is the legacy UART: same console as QEMU's.
    spec.ready_timeout = Duration::from_secs(30);
    let mut template = ch
        .boot(
            VmId::new("ch-template"),
            &spec,
            net.create_tap().await.unwrap(),
        )
        .await
        .unwrap();
    snapgate::vmm::ready::wait_ready(&ch, &mut template, spec.ready_timeout)
        .await
        .unwrap();
    let snap = ch
        .snapshot(template, &state.path().join("snap"))
        .await
        .unwrap();
    let mut pids = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut clones = Vec::new();
    for i in 0..2 {
        let mut vm = ch
            .restore(
                VmId::new(format!("ch-clone{i}")),
                &snap,
                net.create_tap().await.unwrap(),
            )
            .await
            .unwrap();
        snapgate::vmm::ready::wait_ready(&ch, &mut vm, Duration::from_secs(30))
            .await
            .unwrap();
        pids.push(vm.pid());
        ids.insert(instance_of(&get_text(vm.endpoint(), "/").await));
        clones.push(vm);
    }
    assert_eq!(ids.len(), 2, "{ids:?}");
    for vm in clones {
        ch.destroy(vm).await.unwrap();
    }
    assert_all_gone(&net, &pids).await;
}

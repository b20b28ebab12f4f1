//! Cloud Hypervisor driver, through its REST API.
//!
//! # Template
//! 1. Start `cloud-hypervisor --api-socket path=<run>/api.sock` and ping it.
//! 2. `vm.create` with cpus, memory, payload (kernel, initramfs, cmdline),
//!    read-only disks, rng and the serial console to `<run>/console.log`.
//! 3. `vm.add-net` for `net0` with the tap fd attached (SCM_RIGHTS). The
//!    snapshot then records an fd-backed net, not a tap *name*: clones of one
//!    snapshot would otherwise all try to open the same tap (EBUSY).
//! 4. `vm.boot`; readiness is probed over the tap like any VM.
//! 5. Snapshot: `vm.pause`, `vm.snapshot` to `file://<run>/snapshot` (CH
//!    writes `config.json`, `state.json`, `memory-ranges`; the run
//!    directory is the one a jailed CH can write to), then `vmm.shutdown`;
//!    the files move into the destination and are given to the gateway's
//!    user, so no later VMM can change them.
//!
//! # Jailed
//! With a [`Jail`] (crate::jail), CH starts in it. Its root holds the
//! image files, the snapshot directory a clone restores from (read-only),
//! its run directory, `/dev/kvm`, `/dev/urandom` and `/dev/null`; taps
//! come as fds over the API. CH's own seccomp filter stays on
//! (`--seccomp true`, its default) unless `vmm.jail.seccomp` is off.
//!
//! # Clones
//! A fresh process started with only `--api-socket`, then `vm.restore` with
//! `net_fds: [{id: net0, num_fds: 1}]`, the new tap's fd attached, and
//! `resume: true`. CH restores from a per-clone directory under the clone's
//! run directory: a copy of `config.json` with the serial console pointed at
//! the clone's own log, and symlinks to the shared `state.json` and
//! `memory-ranges`. Disks must be read-only (clones share them).
//!
//! CH copies snapshot memory into each clone (`memory_restore_mode: copy`),
//! or maps it on demand with userfaultfd (`ondemand`, which needs
//! `/dev/userfaultfd` or `vm.unprivileged_userfaultfd=1`). Snapshots need
//! hardware KVM.
//!
//! # What a clone gets, and what snapgate can see of its guest
//! Cloud Hypervisor (v53) has no VM generation ID device: a clone's kernel
//! learns it was cloned only from the resumed message (a VM app's
//! `on_restore`, the guest agent of a runtime). CH offers no view of a
//! halted vCPU: a guest that halts its CPU is seen only at the end of its
//! readiness wait. A guest that powers off ends the VMM process, which the
//! watch sees at once; [`Vmm::guest_stopped`] also reports a VM that CH
//! shows in the `Shutdown` state while its process runs on.

pub mod api;

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

pub use api::ChClient;

use std::sync::Arc;

use super::jail::{Access, Jail, Needs};
use super::process::{make_run_dir, Launch};
use super::snapshot::{create_dest, move_file, Origin};
use super::{
    Endpoint, ImageSpec, Snapshot, SnapshotMode, Vm, VmId, VmProcess, Vmm, VmmError, VmmKind,
};
use crate::net::{NetParams, Tap};

pub use crate::spec::MemoryRestoreMode;

const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshot files CH writes.
const SNAPSHOT_FILES: &[&str] = &["config.json", "state.json", "memory-ranges"];

/// The Cloud Hypervisor driver.
#[derive(Debug)]
pub struct CloudHypervisor {
    binary: PathBuf,
    state_dir: PathBuf,
    net: NetParams,
    tsc_khz: u64,
    restore_mode: MemoryRestoreMode,
    jail: Option<Arc<Jail>>,
}

/// The VmConfig body of `vm.create` for `spec`, for a VM whose run
/// directory is `run_dir` (serial console log, extra disk).
pub fn vm_config(spec: &ImageSpec, cmdline: &str, run_dir: &Path) -> Value {
    let console = run_dir.join("console.log");
    let mut payload = json!({
        "kernel": spec.kernel,
        "cmdline": cmdline,
    });
    if let Some(initramfs) = &spec.initramfs {
        payload["initramfs"] = json!(initramfs);
    }
    let extra_disk = spec.extra_disk_mib.map(|_| crate::extra_disk_path(run_dir));
    let disks: Vec<Value> = spec
        .disks
        .iter()
        .map(|d| d.path.as_path())
        .chain(extra_disk.as_deref())
        .map(|path| json!({ "path": path, "readonly": true }))
        .collect();
    let mut config = json!({
        "cpus": { "boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus },
        "memory": { "size": u64::from(spec.memory_mib) << 20, "shared": false },
        "payload": payload,
        "rng": { "src": "/dev/urandom" },
        "serial": { "mode": "File", "file": console },
        "console": { "mode": "Off" },
    });
    if !disks.is_empty() {
        config["disks"] = Value::Array(disks);
    }
    config
}

/// The NetConfig body of `vm.add-net` (one queue pair: one fd).
pub fn net_config(net: &NetParams) -> Value {
    json!({
        "id": "net0",
        "mac": net.guest_mac.to_string(),
        "host_mac": net.host_mac.to_string(),
        "num_queues": 2,
    })
}

/// The RestoreConfig body of `vm.restore` from `source`, one tap fd.
pub fn restore_config(source: &Path, mode: MemoryRestoreMode) -> Value {
    json!({
        "source_url": api::file_url(source),
        "prefault": false,
        "memory_restore_mode": match mode {
            MemoryRestoreMode::Copy => "Copy",
            MemoryRestoreMode::OnDemand => "OnDemand",
        },
        "resume": true,
        "net_fds": [{ "id": "net0", "num_fds": 1 }],
    })
}

impl CloudHypervisor {
    /// A driver running `binary`, keeping run files under `state_dir`.
    pub fn new(
        binary: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
        net: NetParams,
        restore_mode: MemoryRestoreMode,
    ) -> CloudHypervisor {
        CloudHypervisor {
            binary: binary.into(),
            state_dir: state_dir.into(),
            net,
            tsc_khz: super::spec::host_tsc_khz(),
            restore_mode,
            jail: None,
        }
    }

    /// Runs every VMM in `jail` (module doc, "Jailed").
    pub fn with_jail(mut self, jail: Option<Arc<Jail>>) -> CloudHypervisor {
        self.jail = jail;
        self
    }

    /// The command line of a bare VMM whose API listens on `socket`.
    pub fn args(&self, socket: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--api-socket".into(),
            format!("path={}", socket.display()).into(),
        ];
        if !self.jail.as_ref().is_some_and(|j| j.params().seccomp) {
            args.extend(["--seccomp".into(), "false".into()]);
        }
        args
    }

    /// What a jailed CH needs in its root (module doc, "Jailed"):
    /// `spec`'s files, `snapshot`'s directory when restoring.
    pub fn needs(spec: &ImageSpec, snapshot: Option<&Path>, run_dir: &Path) -> Needs {
        let mut needs = Needs::image(spec, snapshot.is_none(), run_dir, true);
        // Started bare: no guest runs until the VM is created or restored.
        needs.paused = true;
        needs
            .paths
            .extend(snapshot.map(|dir| (dir.to_owned(), Access::ReadOnly)));
        needs
    }

    /// Starts a bare VMM process for a VM on `tap` and waits for its API.
    async fn start(
        &self,
        id: &VmId,
        tap: &str,
        run_dir: &Path,
        needs: Needs,
    ) -> Result<(VmProcess, ChClient), VmmError> {
        let started = Instant::now();
        let socket = run_dir.join("api.sock");
        let args = self.args(&socket);
        let confinement = match &self.jail {
            Some(jail) => Some(jail.confine(id, run_dir, &needs)?),
            None => None,
        };
        let mut process = VmProcess::spawn(
            id,
            Launch {
                binary: self.jail.as_ref().map_or(&self.binary, |j| j.binary()),
                args: &args,
                fds: vec![],
                tap: Some(tap),
                // Its guest RAM is anonymous (`shared: false`), which it
                // asks THP to back.
                transparent_huge_pages: true,
                confinement,
            },
            run_dir,
            &self.state_dir,
        )?;
        let client = ChClient::new(id.clone(), socket);
        // It joins its cgroup while it starts; its guest runs only after
        // `start` returns (crate::jail, protocol step 4).
        let joined = process.join_cgroup();
        let (api, joined) = tokio::join!(
            client.wait_for_api(&mut process, started + START_TIMEOUT),
            joined
        );
        // (The API wait reports a VMM that exits meanwhile by its exit.)
        api?;
        joined?;
        Ok((process, client))
    }

    /// The client of a running VM.
    pub fn client(vm: &Vm) -> ChClient {
        ChClient::new(vm.id().clone(), vm.process().run_dir().join("api.sock"))
    }
}

/// Prepares `<run_dir>/source/`: the snapshot's `config.json` with the
/// serial console pointed at this clone's log and, for runtime images, the
/// last disk (the extra disk) at this clone's own file; links to the rest.
pub fn clone_source(
    snapshot: &Snapshot,
    run_dir: &Path,
    console: &Path,
) -> Result<PathBuf, VmmError> {
    let dir = run_dir.join("source");
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| VmmError::Io { what, path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    let config_path = snapshot.file("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(io("cannot read", &config_path))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| VmmError::SnapshotFile {
        path: config_path.clone(),
        problem: format!("not JSON: {e}"),
    })?;
    if config["serial"]["mode"] == "File" {
        config["serial"]["file"] = json!(console);
    }
    if snapshot.manifest().spec.extra_disk_mib.is_some() {
        let slot = config["disks"]
            .as_array_mut()
            .and_then(|disks| disks.last_mut())
            .ok_or_else(|| VmmError::SnapshotFile {
                path: config_path.clone(),
                problem: "a snapshot with an extra disk has no disks".into(),
            })?;
        slot["path"] = json!(crate::extra_disk_path(run_dir));
    }
    let out = dir.join("config.json");
    std::fs::write(&out, config.to_string()).map_err(io("cannot write", &out))?;
    for name in ["state.json", "memory-ranges"] {
        let link = dir.join(name);
        std::os::unix::fs::symlink(snapshot.file(name), &link).map_err(io("cannot link", &link))?;
    }
    Ok(dir)
}

#[async_trait]
impl Vmm for CloudHypervisor {
    fn kind(&self) -> VmmKind {
        VmmKind::CloudHypervisor
    }

    fn net(&self) -> &NetParams {
        &self.net
    }

    fn accel(&self) -> &str {
        "kvm"
    }

    async fn boot(&self, id: VmId, spec: &ImageSpec, mut tap: Tap) -> Result<Vm, VmmError> {
        let cmdline = crate::boot_cmdline(spec, &self.net, self.tsc_khz)?;
        let run_dir = make_run_dir(&self.state_dir, &id)?;
        let pending = crate::process::PendingRunDir::new(&run_dir);
        let started = Instant::now();
        let needs = Self::needs(spec, None, &run_dir);
        crate::create_extra_disk(spec, &run_dir)?;
        let admitting = tap.take_admission();
        let (process, client) = self.start(&id, tap.name(), &run_dir, needs).await?;
        pending.owned();
        let endpoint = Endpoint::of(&tap, &self.net, spec);
        let mut vm = Vm::new(id, endpoint, spec.clone(), cmdline, process);
        vm.record("spawn", started.elapsed());
        // Admitted while CH started; its guest runs only once that is done
        // (crate::net::Admitting).
        vm.admitted(admitting).await?;
        let t = Instant::now();
        client
            .create(&vm_config(spec, vm.cmdline(), &run_dir))
            .await?;
        let fd = tap.take_fd();
        client
            .add_net(&net_config(&self.net), &[fd.as_fd()])
            .await?;
        // CH holds its own copy now; ours closes here.
        drop(fd);
        vm.record("create", t.elapsed());
        let t = Instant::now();
        client.boot().await?;
        vm.record("boot", t.elapsed());
        Ok(vm)
    }

    async fn snapshot(&self, mut vm: Vm, dest: &Path) -> Result<Snapshot, VmmError> {
        create_dest(dest)?;
        let client = Self::client(&vm);
        let result = async {
            let t = Instant::now();
            client.pause().await?;
            let written = vm.process().run_dir().join("snapshot");
            std::fs::create_dir(&written).map_err(|source| VmmError::Io {
                what: "cannot create",
                path: written.clone(),
                source,
            })?;
            if let Some(uid) = vm.process().confinement().and_then(|c| c.uid()) {
                let id = Some(nix::unistd::Uid::from_raw(uid));
                nix::unistd::chown(&written, id, Some(nix::unistd::Gid::from_raw(uid))).map_err(
                    |e| VmmError::Io {
                        what: "cannot give the VMM",
                        path: written.clone(),
                        source: e.into(),
                    },
                )?;
            }
            client.snapshot(&written).await?;
            for name in SNAPSHOT_FILES {
                let to = dest.join(name);
                move_file(&written.join(name), &to)?;
                // Clones restore from them, each as its own uid.
                super::snapshot::take_ownership(&to, 0o644)?;
            }
            vm.record("save", t.elapsed());
            let origin = Origin {
                vmm: VmmKind::CloudHypervisor,
                mode: SnapshotMode::Full,
                accel: "kvm",
                spec: vm.spec(),
                cmdline: vm.cmdline(),
                net: &self.net,
            };
            Snapshot::write(dest, origin, SNAPSHOT_FILES)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(dest);
        }
        let _ = self.destroy(vm).await;
        result
    }

    async fn restore(&self, id: VmId, snapshot: &Snapshot, mut tap: Tap) -> Result<Vm, VmmError> {
        snapshot.verify()?;
        let m = snapshot.manifest();
        if m.vmm != VmmKind::CloudHypervisor {
            return Err(VmmError::ForeignSnapshot {
                dir: snapshot.dir().to_owned(),
                taken: format!("by {}", m.vmm),
                runs: "cloud-hypervisor".into(),
            });
        }
        let run_dir = make_run_dir(&self.state_dir, &id)?;
        let pending = crate::process::PendingRunDir::new(&run_dir);
        let started = Instant::now();
        // Written before the VMM starts: once it runs (jailed, as another
        // uid) it can write to its run directory.
        let source = clone_source(snapshot, &run_dir, &run_dir.join("console.log"))?;
        crate::create_extra_disk(&m.spec, &run_dir)?;
        let needs = Self::needs(&m.spec, Some(snapshot.dir()), &run_dir);
        let admitting = tap.take_admission();
        let (process, client) = self.start(&id, tap.name(), &run_dir, needs).await?;
        pending.owned();
        let endpoint = Endpoint::of(&tap, &self.net, &m.spec);
        let mut vm = Vm::new(id, endpoint, m.spec.clone(), m.cmdline.clone(), process);
        vm.record("spawn", started.elapsed());
        // Admitted while CH started; its guest runs only once that is done
        // (crate::net::Admitting).
        vm.admitted(admitting).await?;
        let t = Instant::now();
        let fd = tap.take_fd();
        client
            .restore(&restore_config(&source, self.restore_mode), &[fd.as_fd()])
            .await?;
        drop(fd);
        vm.record("load", t.elapsed());
        let state = client.state().await?;
        if state != "Running" {
            return Err(VmmError::Api {
                vm: vm.id().clone(),
                endpoint: "vm.info".into(),
                status: 200,
                chain: vec![format!("restored VM is {state}, not Running")],
            });
        }
        Ok(vm)
    }

    async fn guest_stopped(&self, vm: &Vm) -> Result<Option<String>, VmmError> {
        Ok(stop_reason(&Self::client(vm).state().await?))
    }

    async fn destroy(&self, mut vm: Vm) -> Result<(), VmmError> {
        let client = Self::client(&vm);
        // A clean exit lets CH release its resources; a hung VMM is killed.
        let _ = tokio::time::timeout(Duration::from_secs(2), client.vmm_shutdown()).await;
        vm.process_mut().stop(Duration::from_secs(2)).await
    }
}

/// Why a guest whose VM is in `state` (`vm.info`) has stopped, if it has.
fn stop_reason(state: &str) -> Option<String> {
    (state == "Shutdown")
        .then(|| "Cloud Hypervisor reports the VM Shutdown while it runs on".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_in_the_shutdown_state_has_stopped() {
        assert!(stop_reason("Shutdown").unwrap().contains("Shutdown"));
        for running in ["Created", "Running", "Paused"] {
            assert_eq!(stop_reason(running), None);
        }
    }

    #[test]
    fn bodies_follow_the_api_shapes() {
        let spec: ImageSpec = serde_yaml_ng::from_str(
            "kernel: /k\ninitramfs: /i\ncmdline: x\nmemory_mib: 128\nvcpus: 2\ndisks: [{path: /d}]\nextra_disk_mib: 8\n",
        )
        .unwrap();
        let c = vm_config(&spec, "console=ttyS0", Path::new("/run"));
        assert_eq!(c["serial"]["file"], "/run/console.log");
        assert_eq!(c["disks"][1]["path"], "/run/extra.img");
        assert_eq!(c["disks"][1]["readonly"], true);
        assert_eq!(c["memory"]["size"], 128u64 << 20);
        assert_eq!(c["cpus"]["boot_vcpus"], 2);
        assert_eq!(c["payload"]["initramfs"], "/i");
        assert_eq!(c["disks"][0]["readonly"], true);
        let r = restore_config(Path::new("/snap"), MemoryRestoreMode::OnDemand);
        assert_eq!(r["source_url"], "file:///snap");
        assert_eq!(r["memory_restore_mode"], "OnDemand");
        assert_eq!(r["net_fds"][0]["num_fds"], 1);
    }

    #[test]
    fn each_clone_restores_with_its_own_console_and_extra_disk() {
        let snap = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let spec: ImageSpec = serde_yaml_ng::from_str(
            "kernel: /k\ncmdline: x\ndisks: [{path: /root.img}]\nextra_disk_mib: 8\n",
        )
        .unwrap();
        // The template's config.json, as CH writes it: the template's slot.
        let template = vm_config(&spec, "x", Path::new("/state/vms/node-template"));
        std::fs::write(snap.path().join("config.json"), template.to_string()).unwrap();
        for name in ["state.json", "memory-ranges"] {
            std::fs::write(snap.path().join(name), b"{}").unwrap();
        }
        let origin = Origin {
            vmm: VmmKind::CloudHypervisor,
            mode: SnapshotMode::Full,
            accel: "kvm",
            spec: &spec,
            cmdline: "x",
            net: &NetParams::default(),
        };
        let snapshot = Snapshot::write(snap.path(), origin, SNAPSHOT_FILES).unwrap();
        let console = run.path().join("console.log");
        let source = clone_source(&snapshot, run.path(), &console).unwrap();
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["disks"][0]["path"], "/root.img");
        assert_eq!(
            config["disks"][1]["path"],
            json!(run.path().join("extra.img")),
            "{config}"
        );
        assert_eq!(config["serial"]["file"], json!(console));
        assert!(source.join("state.json").exists());
    }
}

//! QEMU driver, over QMP on a Unix socket.
//!
//! # Templates and clones (`snapshot_mode: template`)
//! The template's RAM is a file (`memory-backend-file,share=on`). Once the
//! guest is ready: `stop`, enable the `x-ignore-shared` migration capability
//! and `migrate` to a file: only device state (tens of KB) is written, the
//! RAM stays in the memory file. The template is then killed for good (clones
//! map its memory file privately and would see later writes) and the file
//! moves into the snapshot. A clone starts with the same command line but
//! `share=off` on that file, `-incoming defer`, and no `-kernel`, `-initrd`
//! or `-append` (its kernel is in that memory already), loads the device state with
//! `migrate-incoming`, and `cont`s: its RAM is copy-on-write over the
//! template's page cache, so a clone costs only the pages it writes.
//! Clones run without transparent huge pages: THP does not back the pages
//! a clone copies on write, and would only round QEMU's own buffers up to
//! 2 MiB pages (`process::Launch::transparent_huge_pages`).
//!
//! # Full snapshots (`snapshot_mode: full`)
//! RAM is anonymous memory, saved into the state stream and loaded into each
//! clone: slower and one full RAM copy per clone, but one self-contained file.
//!
//! # Accelerators
//! `kvm` where the host has hardware virtualization, else `tcg` (software
//! emulation). `auto` picks KVM only where `/dev/kvm` exists *and* the CPU
//! flags show `vmx` or `svm`: some hosts expose a `/dev/kvm` that cannot run
//! ordinary guests. A snapshot records its accelerator and is restored only
//! under the same one.
//!
//! Each VM gets the tap fd as fd 3 (`-netdev tap,fd=3`); the tap dies with
//! the QEMU process. Snapshot state travels over fds too, never through a
//! shell: a clone inherits the state file as fd 4 (`migrate-incoming
//! fd:4`); a snapshot is written to a file the driver opens and passes
//! over QMP (`getfd`, then `migrate fd:<name>`).
//!
//! # Jailed
//! With a [`Jail`] (on by default), QEMU starts in it (crate::jail) and
//! runs with its seccomp sandbox: `-sandbox on,obsolete=deny,
//! elevateprivileges=deny,spawn=deny,resourcecontrol=deny`. Its root holds
//! the image files a boot reads, the disks, its run directory and
//! `/dev/null`, `/dev/urandom` (the virtio-rng source) and, under KVM,
//! `/dev/kvm`. A clone's memory is the snapshot's memory file as a sealed
//! memfd, inherited as fd 5 and named `/proc/self/fd/5`: QEMU 7.2 opens
//! its memory file read-write even to map it privately, and a VMM that
//! could write the snapshot's memory would change every other clone's
//! (`Snapshot::sealed`).
//!
//! # Every clone its own
//! VMs on the `pc` machine get a VM generation ID device (`-device
//! vmgenid,guid=auto`, described to the guest by an ACPI table). Each QEMU
//! process draws its own random ID; when a clone loads a snapshot, the
//! device writes the clone's ID into guest memory and raises its ACPI
//! notification, and a guest kernel with a VMGenID driver (Linux >= 5.18,
//! `CONFIG_VMGENID`; Windows) reseeds its random generator from it within
//! milliseconds of the resume. `microvm` has no such device: QEMU builds no
//! ACPI table for it there, so a guest would never see it.
//!
//! # A guest that stops while QEMU runs on
//! [`Vmm::guest_stopped`] asks QMP (which serves one client at a time: a
//! check finds it busy only while the driver itself uses it, and then
//! says nothing). First `query-status`: `internal-error` (e.g. KVM could
//! not emulate an instruction), `io-error`, or `guest-panicked` (only with
//! a pvpanic device, which snapgate does not add; a Linux guest with
//! `panic=-1` reboots instead, and `-no-reboot` makes QEMU exit). Then
//! `info registers -a`: a guest whose every vCPU is halted (`HLT=1`) with
//! interrupts off (`IF`, bit 9 of `RFL`/`EFL`, clear) has stopped itself
//! for good: nothing but an NMI or a reset wakes it. An idle guest halts
//! with interrupts on.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use super::jail::{Jail, Needs};
use super::process::{make_run_dir, Launch};
use super::qmp::Qmp;
use super::snapshot::{create_dest, move_file, Origin};
pub use super::spec::Accel;
use super::{
    watch, Endpoint, ImageSpec, Machine, Snapshot, SnapshotMode, Vm, VmId, VmProcess, Vmm,
    VmmError, VmmKind,
};
use crate::net::{NetParams, Tap};

/// Whether this host can run ordinary guests under KVM.
pub fn hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
            })
            .unwrap_or(false)
}

impl Accel {
    /// The accelerator to use on this host: `"kvm"` or `"tcg"`.
    pub fn resolve(self) -> Result<&'static str, VmmError> {
        match self {
            Accel::Tcg => Ok("tcg"),
            Accel::Kvm if hardware_kvm() => Ok("kvm"),
            Accel::Kvm => Err(VmmError::NoKvm),
            Accel::Auto if hardware_kvm() => Ok("kvm"),
            Accel::Auto => Ok("tcg"),
        }
    }
}

/// How long QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long saving or loading a snapshot may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// Polling interval for migration status (a template clone loads in ~50 ms).
const POLL: Duration = Duration::from_millis(2);

/// The QEMU driver.
#[derive(Debug)]
pub struct Qemu {
    binary: PathBuf,
    accel: &'static str,
    state_dir: PathBuf,
    net: NetParams,
    tsc_khz: u64,
    jail: Option<Arc<Jail>>,
}

/// The fd a clone's snapshot state is inherited as.
const STATE_FD: i32 = 4;
/// The fd a jailed clone's sealed memory is inherited as.
const MEMORY_FD: i32 = 5;

enum Memory {
    /// Template: RAM in `<run_dir>/memory`, which the VM writes through to.
    Shared,
    /// Clone: the template's file mapped copy-on-write.
    Private(PathBuf),
    /// Jailed clone: the template's memory as a sealed memfd
    /// ([`MEMORY_FD`]), mapped copy-on-write.
    Sealed(Arc<OwnedFd>),
    /// Anonymous RAM.
    Ram,
}

impl Memory {
    /// Whether QEMU runs with transparent huge pages: all but a clone,
    /// whose copied-on-write pages THP does not back
    /// (`Launch::transparent_huge_pages`). A template's RAM may sit on a
    /// `huge=` tmpfs, and anonymous RAM is THP's to back.
    fn transparent_huge_pages(&self) -> bool {
        !matches!(self, Memory::Private(_) | Memory::Sealed(_))
    }
}

impl Qemu {
    /// A driver running `binary` (e.g. `qemu-system-x86_64`) under `accel`,
    /// keeping run files under `state_dir`.
    pub fn new(
        binary: impl Into<PathBuf>,
        accel: Accel,
        state_dir: impl Into<PathBuf>,
        net: NetParams,
    ) -> Result<Qemu, VmmError> {
        Ok(Qemu {
            binary: binary.into(),
            accel: accel.resolve()?,
            state_dir: state_dir.into(),
            net,
            tsc_khz: super::spec::host_tsc_khz(),
            jail: None,
        })
    }

    /// Runs every VMM in `jail` (module doc, "Jailed").
    pub fn with_jail(mut self, jail: Option<Arc<Jail>>) -> Qemu {
        self.jail = jail;
        self
    }

    /// The jail VMMs run in, if any.
    pub fn jail(&self) -> Option<&Arc<Jail>> {
        self.jail.as_ref()
    }

    /// Whether clones map a sealed memfd rather than the memory file.
    fn seals_memory(&self) -> bool {
        self.jail
            .as_ref()
            .is_some_and(|j| j.params().user || j.params().filesystem)
    }

    /// The accelerator in use: `"kvm"` or `"tcg"`.
    pub fn accel(&self) -> &'static str {
        self.accel
    }

    fn args(
        &self,
        id: &VmId,
        spec: &ImageSpec,
        cmdline: &str,
        memory: &Memory,
        run_dir: &Path,
        incoming: bool,
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        let mem = format!("{}M", spec.memory_mib);
        let (bus, machine) = match spec.machine {
            Machine::Microvm => (
                "device",
                // Under TCG the default microvm (no PIT/PIC/RTC) hangs while
                // calibrating; the legacy devices cost nothing under KVM.
                "microvm,pit=on,pic=on,rtc=on,memory-backend=mem",
            ),
            Machine::Pc => ("pci", "pc,memory-backend=mem"),
        };
        let name = format!("snapgate-{id}");
        push(&["-name", &name, "-nodefaults", "-no-user-config"]);
        push(&["-display", "none", "-no-reboot", "-accel", self.accel]);
        if self.accel == "kvm" {
            push(&["-cpu", "host"]);
        }
        push(&["-smp", &spec.vcpus.to_string(), "-m", &mem]);
        let backend = match memory {
            Memory::Shared => format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
                escape(&run_dir.join("memory"))
            ),
            Memory::Private(p) => format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=off",
                escape(p)
            ),
            Memory::Sealed(_) => format!(
                "memory-backend-file,id=mem,size={mem},mem-path=/proc/self/fd/{MEMORY_FD},share=off"
            ),
            Memory::Ram => format!("memory-backend-ram,id=mem,size={mem}"),
        };
        push(&["-object", &backend, "-M", machine]);
        // Only a boot loads the kernel: a clone's is in the snapshot's
        // memory already, and QEMU would keep a copy of the kernel file in
        // each clone's own memory (its size, 13.5 MiB for the test guest;
        // BENCHMARKS.md).
        if !incoming {
            push(&["-kernel", &path_str(&spec.kernel)]);
            if let Some(initrd) = &spec.initramfs {
                push(&["-initrd", &path_str(initrd)]);
            }
            push(&["-append", cmdline]);
        }
        let serial = format!("file:{}", path_str(&run_dir.join("console.log")));
        let qmp = format!(
            "unix:{},server=on,wait=off",
            path_str(&run_dir.join("qmp.sock"))
        );
        push(&["-serial", &serial, "-qmp", &qmp]);
        let nic = format!("virtio-net-{bus},netdev=net0,mac={}", self.net.guest_mac);
        push(&["-netdev", "tap,id=net0,fd=3", "-device", &nic]);
        let extra_disk = spec.extra_disk_mib.map(|_| super::extra_disk_path(run_dir));
        let disks = spec.disks.iter().map(|d| d.path.as_path());
        for (i, path) in disks.chain(extra_disk.as_deref()).enumerate() {
            let drive = format!(
                "id=disk{i},file={},format=raw,if=none,readonly=on",
                escape(path)
            );
            let dev = format!("virtio-blk-{bus},drive=disk{i}");
            push(&["-drive", &drive, "-device", &dev]);
        }
        let rng = format!("virtio-rng-{bus},rng=rng0");
        push(&[
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            &rng,
        ]);
        if spec.machine == Machine::Pc {
            // A new random ID in every process: see the module doc.
            push(&["-device", "vmgenid,guid=auto"]);
        }
        if self.jail.as_ref().is_some_and(|j| j.params().seccomp) {
            push(&[
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ]);
        }
        if incoming {
            push(&["-incoming", "defer"]);
        }
        a
    }

    /// Starts QEMU (in its jail, if any) and waits for QMP; a clone
    /// inherits its snapshot `state` as [`STATE_FD`]. Records `spawn`.
    async fn start(
        &self,
        id: VmId,
        spec: &ImageSpec,
        cmdline: String,
        mut tap: Tap,
        memory: Memory,
        state: Option<File>,
    ) -> Result<(Vm, Qmp), VmmError> {
        let started = Instant::now();
        let incoming = state.is_some();
        let run_dir = make_run_dir(&self.state_dir, &id)?;
        let pending = crate::process::PendingRunDir::new(&run_dir);
        super::create_extra_disk(spec, &run_dir)?;
        let transparent_huge_pages = memory.transparent_huge_pages();
        let args = self.args(&id, spec, &cmdline, &memory, &run_dir, incoming);
        let mut fds = vec![(tap.take_fd(), 3)];
        if let Some(state) = state {
            fds.push((OwnedFd::from(state), STATE_FD));
        }
        if let Memory::Sealed(fd) = &memory {
            let dup = fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| VmmError::Io {
                    what: "cannot duplicate the sealed memory of",
                    path: PathBuf::from(id.as_str()),
                    source,
                })?;
            fds.push((dup, MEMORY_FD));
        }
        let confinement = match &self.jail {
            Some(jail) => {
                Some(jail.confine(&id, &run_dir, &self.needs(spec, &run_dir, incoming))?)
            }
            None => None,
        };
        let process = VmProcess::spawn(
            &id,
            Launch {
                binary: self.jail.as_ref().map_or(&self.binary, |j| j.binary()),
                args: &args,
                fds,
                tap: Some(tap.name()),
                transparent_huge_pages,
                confinement,
            },
            &run_dir,
            &self.state_dir,
        )?;
        pending.owned();
        let endpoint = Endpoint::of(&tap, &self.net, spec);
        let mut vm = Vm::new(id.clone(), endpoint, spec.clone(), cmdline, process);
        let qmp_path = run_dir.join("qmp.sock");
        // A clone joins its cgroup while QEMU starts, and its guest runs
        // only after `start` returns (crate::jail, protocol step 4).
        let joined = vm.process().join_cgroup();
        let (qmp, joined) = tokio::join!(
            Qmp::connect(&id, &qmp_path, vm.process_mut(), started + START_TIMEOUT),
            joined
        );
        // A QEMU that dies during the handshake (a reset socket) is better
        // explained by its exit and its log.
        let qmp = match qmp {
            Ok(qmp) => qmp,
            Err(e) => return Err(vm.process_mut().explain(e, "starting").await),
        };
        joined?;
        vm.record("spawn", started.elapsed());
        Ok((vm, qmp))
    }

    /// What a jailed QEMU needs in its root (module doc, "Jailed").
    fn needs(&self, spec: &ImageSpec, run_dir: &Path, incoming: bool) -> Needs {
        let mut needs = Needs::image(spec, !incoming, run_dir, self.accel == "kvm");
        // A clone waits for its snapshot (`-incoming defer`): its guest runs
        // only once `load_and_resume` loads and continues it.
        needs.paused = incoming;
        needs
    }
}

/// Escapes a path for a QEMU option value (commas are doubled).
fn escape(p: &Path) -> String {
    path_str(p).replace(',', ",,")
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[async_trait]
impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn net(&self) -> &NetParams {
        &self.net
    }

    fn accel(&self) -> &str {
        self.accel
    }

    async fn boot(&self, id: VmId, spec: &ImageSpec, mut tap: Tap) -> Result<Vm, VmmError> {
        let cmdline = super::boot_cmdline(spec, &self.net, self.tsc_khz)?;
        // A booted guest runs from QEMU's start: admitted first.
        let slot = match tap.take_admission() {
            Some(admitting) => Some(admitting.finish().await?),
            None => None,
        };
        let memory = match spec.snapshot_mode {
            SnapshotMode::Template => Memory::Shared,
            SnapshotMode::Full => Memory::Ram,
        };
        let (mut vm, _qmp) = self.start(id, spec, cmdline, tap, memory, None).await?;
        if let Some(slot) = slot {
            vm.keep_fence_slot(slot);
        }
        Ok(vm)
    }

    async fn snapshot(&self, mut vm: Vm, dest: &Path) -> Result<Snapshot, VmmError> {
        create_dest(dest)?;
        let result = match self.snapshot_into(&mut vm, dest).await {
            Ok(snapshot) => Ok(snapshot),
            Err(e) => {
                let _ = std::fs::remove_dir_all(dest);
                Err(vm.process_mut().explain(e, "saving the snapshot").await)
            }
        };
        drop(vm);
        result
    }

    async fn restore(&self, id: VmId, snapshot: &Snapshot, mut tap: Tap) -> Result<Vm, VmmError> {
        snapshot.verify()?;
        let m = snapshot.manifest();
        if m.vmm != VmmKind::Qemu {
            return Err(VmmError::ForeignSnapshot {
                dir: snapshot.dir().to_owned(),
                taken: format!("by {}", m.vmm),
                runs: "qemu".into(),
            });
        }
        if m.accel != self.accel {
            return Err(VmmError::ForeignSnapshot {
                dir: snapshot.dir().to_owned(),
                taken: format!("under {}", m.accel),
                runs: self.accel.to_owned(),
            });
        }
        let mode = m.mode;
        let memory = match mode {
            SnapshotMode::Template if self.seals_memory() => {
                let snapshot = snapshot.clone();
                let path = snapshot.file("memory");
                let sealed = tokio::task::spawn_blocking(move || snapshot.sealed("memory"))
                    .await
                    .map_err(|e| VmmError::Io {
                        what: "cannot seal (the copy did not finish)",
                        path,
                        source: std::io::Error::other(e.to_string()),
                    })??;
                Memory::Sealed(sealed)
            }
            SnapshotMode::Template => Memory::Private(snapshot.file("memory")),
            SnapshotMode::Full => Memory::Ram,
        };
        let state_path = snapshot.file("state");
        let state = File::open(&state_path).map_err(|source| VmmError::Io {
            what: "cannot open",
            path: state_path,
            source,
        })?;
        // The tap's admission overlaps QEMU's start; the guest runs only
        // once it is done (crate::net::Admitting).
        let admitting = tap.take_admission();
        let (mut vm, mut qmp) = self
            .start(id, &m.spec, m.cmdline.clone(), tap, memory, Some(state))
            .await?;
        vm.admitted(admitting).await?;
        match load_and_resume(&mut vm, &mut qmp, mode).await {
            Ok(()) => Ok(vm),
            Err(e) => Err(vm.process_mut().explain(e, "loading the snapshot").await),
        }
    }

    async fn destroy(&self, mut vm: Vm) -> Result<(), VmmError> {
        // Guest state is disposable: no clean shutdown is needed.
        vm.process_mut().kill().await
    }

    async fn guest_stopped(&self, vm: &Vm) -> Result<Option<String>, VmmError> {
        let path = vm.process().run_dir().join("qmp.sock");
        let mut qmp = Qmp::attach(vm.id(), &path, watch::CHECK_TIMEOUT).await?;
        let status = qmp.execute("query-status", None).await?;
        if let Some(s @ ("guest-panicked" | "internal-error" | "io-error")) =
            status["status"].as_str()
        {
            return Ok(Some(format!("QEMU reports the VM {s}")));
        }
        let registers = qmp
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": "info registers -a" })),
            )
            .await?;
        Ok(halted_for_good(registers.as_str().unwrap_or("")).then(|| {
            "every vCPU is halted with interrupts off (the guest stopped itself; QEMU runs on)"
                .to_owned()
        }))
    }
}

/// Whether every vCPU in `info registers -a` output is halted (`HLT=1`)
/// with interrupts off (bit 9, IF, of `RFL=` in long mode, `EFL=` else).
fn halted_for_good(registers: &str) -> bool {
    let mut cpus = 0;
    for line in registers.lines().filter(|l| l.contains("HLT=")) {
        cpus += 1;
        let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name));
        let halted = field("HLT=") == Some("1");
        let flags = field("RFL=")
            .or_else(|| field("EFL="))
            .and_then(|v| u64::from_str_radix(v, 16).ok());
        if !halted || flags.is_none_or(|f| f & 0x200 != 0) {
            return false;
        }
    }
    cpus > 0
}

impl Qemu {
    async fn snapshot_into(&self, vm: &mut Vm, dest: &Path) -> Result<Snapshot, VmmError> {
        let id = vm.id().clone();
        let run_dir = vm.process().run_dir().to_owned();
        let mut qmp = Qmp::connect(
            &id,
            &run_dir.join("qmp.sock"),
            vm.process_mut(),
            Instant::now() + START_TIMEOUT,
        )
        .await?;
        let mode = vm.spec().snapshot_mode;
        let started = Instant::now();
        qmp.execute("stop", None).await?;
        if mode == SnapshotMode::Template {
            ignore_shared(&mut qmp).await?;
        }
        let state_path = dest.join("state");
        let state = File::create(&state_path).map_err(|source| VmmError::Io {
            what: "cannot create",
            path: state_path,
            source,
        })?;
        qmp.pass_fd("snapstate", state.as_fd()).await?;
        drop(state);
        qmp.execute("migrate", Some(json!({ "uri": "fd:snapstate" })))
            .await?;
        let deadline = started + MIGRATE_TIMEOUT;
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let why = info["error-desc"].as_str().unwrap_or("no reason given");
                    return Err(VmmError::Qmp {
                        vm: id,
                        command: "migrate".into(),
                        message: format!("saving the snapshot failed: {why}"),
                    });
                }
                _ => {}
            }
            if vm.process_mut().exited().is_some() {
                return Err(vm.process_mut().exited_error("saving the snapshot"));
            }
            if Instant::now() >= deadline {
                return Err(VmmError::Timeout {
                    vm: id,
                    step: "saving the snapshot",
                    after: MIGRATE_TIMEOUT,
                });
            }
            tokio::time::sleep(POLL).await;
        }
        vm.record("save", started.elapsed());
        // Clones map the memory file: the template must never run again.
        drop(qmp);
        vm.process_mut().kill().await?;
        let files: &[&str] = match mode {
            SnapshotMode::Template => {
                let memory = dest.join("memory");
                move_file(&run_dir.join("memory"), &memory)?;
                // Read by the gateway alone (clones get a sealed copy).
                super::snapshot::take_ownership(&memory, 0o640)?;
                &["state", "memory"]
            }
            SnapshotMode::Full => &["state"],
        };
        let origin = Origin {
            vmm: VmmKind::Qemu,
            mode,
            accel: self.accel,
            spec: vm.spec(),
            cmdline: vm.cmdline(),
            net: &self.net,
        };
        Snapshot::write(dest, origin, files)
    }
}

/// Loads a snapshot's state (inherited as [`STATE_FD`]) into a VM started
/// with `-incoming defer` and resumes it. Records `load` and `resume`.
async fn load_and_resume(vm: &mut Vm, qmp: &mut Qmp, mode: SnapshotMode) -> Result<(), VmmError> {
    let load = Instant::now();
    if mode == SnapshotMode::Template {
        ignore_shared(qmp).await?;
    }
    let uri = format!("fd:{STATE_FD}");
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
        .await?;
    let deadline = load + MIGRATE_TIMEOUT;
    let status = loop {
        let status = qmp.execute("query-status", None).await?;
        let status = status["status"].as_str().unwrap_or("").to_owned();
        if status != "inmigrate" {
            break status;
        }
        if vm.process_mut().exited().is_some() {
            return Err(vm.process_mut().exited_error("loading the snapshot"));
        }
        if Instant::now() >= deadline {
            return Err(VmmError::Timeout {
                vm: vm.id().clone(),
                step: "loading the snapshot",
                after: MIGRATE_TIMEOUT,
            });
        }
        tokio::time::sleep(POLL).await;
    };
    vm.record("load", load.elapsed());
    let resume = Instant::now();
    match status.as_str() {
        "running" => {}
        "paused" | "postmigrate" | "prelaunch" => {
            qmp.execute("cont", None).await?;
        }
        other => {
            return Err(VmmError::Qmp {
                vm: vm.id().clone(),
                command: "query-status".into(),
                message: format!("after loading the snapshot the VM is {other:?}"),
            })
        }
    }
    vm.record("resume", resume.elapsed());
    Ok(())
}

async fn ignore_shared(qmp: &mut Qmp) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": true }]
        })),
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver for building command lines only.
    fn tcg_driver() -> Qemu {
        Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: "tcg",
            state_dir: "/s".into(),
            net: NetParams::default(),
            tsc_khz: 1,
            jail: None,
        }
    }

    /// A VMM that dies during the QMP handshake (it accepts the control
    /// connection, then exits) is reported by its exit and its log, not by
    /// the reset socket.
    #[tokio::test]
    async fn a_vmm_that_dies_during_the_handshake_is_reported_by_its_exit_and_log() {
        use crate::net::Network;
        let dir = tempfile::tempdir().unwrap();
        // The fake VMM: binds the -qmp socket, accepts one client, says why
        // it gives up on stderr (the VMM log) and exits 3.
        let fake = dir.path().join("fake-qemu");
        std::fs::write(
            &fake,
            "#!/usr/bin/env python3\n\
             import os, socket, sys\n\
             arg = sys.argv[sys.argv.index('-qmp') + 1]\n\
             path = arg[len('unix:'):].split(',')[0]\n\
             s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1)\n\
             c, _ = s.accept()\n\
             sys.stderr.write('fake-qemu: cannot create a thread\\n'); sys.stderr.flush()\n\
             os._exit(3)\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let net = Network::new(NetParams {
            tap_prefix: "sgqh".into(),
            ..NetParams::default()
        })
        .unwrap();
        let qemu = Qemu::new(
            &fake,
            Accel::Tcg,
            dir.path().join("state"),
            net.params().clone(),
        )
        .unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"").unwrap();
        let spec: ImageSpec =
            serde_yaml_ng::from_str(&format!("kernel: {}\ncmdline: x\n", kernel.display()))
                .unwrap();
        let tap = net.create_tap().await.unwrap();
        let err = qemu.boot(VmId::new("dies"), &spec, tap).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, VmmError::Exited { .. }), "{text}");
        assert!(text.contains("cannot create a thread"), "{text}");
        assert!(text.contains("starting"), "{text}");
    }

    #[test]
    fn accel_tcg_always_resolves() {
        assert_eq!(Accel::Tcg.resolve().unwrap(), "tcg");
        let auto = Accel::Auto.resolve().unwrap();
        assert_eq!(auto == "kvm", hardware_kvm());
    }

    #[test]
    fn command_line_for_template_and_clone() {
        let q = tcg_driver();
        let spec: ImageSpec = serde_yaml_ng::from_str(
            "kernel: /k\ninitramfs: /i\ncmdline: x\ndisks: [{path: '/d,1'}]\nextra_disk_mib: 8\n",
        )
        .unwrap();
        let id = VmId::new("t1");
        let args: Vec<String> = q
            .args(&id, &spec, "x", &Memory::Shared, Path::new("/r"), false)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("mem-path=/r/memory,share=on"), "{joined}");
        assert!(joined.contains("-netdev tap,id=net0,fd=3"));
        assert!(joined.contains("virtio-net-device,netdev=net0,mac=02:73:67:00:00:02"));
        assert!(joined.contains("file=/d,,1,format=raw,if=none,readonly=on"));
        // The extra disk comes after the image's disks, from the VM's run dir.
        assert!(joined.contains("id=disk1,file=/r/extra.img,format=raw,if=none,readonly=on"));
        assert!(!joined.contains("-incoming"));
        let clone: Vec<String> = q
            .args(
                &id,
                &spec,
                "x",
                &Memory::Private("/s/memory".into()),
                Path::new("/r"),
                true,
            )
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = clone.join(" ");
        assert!(joined.contains("mem-path=/s/memory,share=off"));
        assert!(joined.ends_with("-incoming defer"));
    }

    #[test]
    fn halted_means_every_vcpu_halted_with_interrupts_off() {
        let cpu = |n: u32, flags: &str, hlt: u32| {
            format!(
                "CPU#{n}\nRAX=0000000000000000 RBX=0000000000000000\n\
                 RIP=ffffffff81c3b2cf RFL={flags} [--S--P-] CPL=0 II=0 A20=1 SMM=0 HLT={hlt}\n\
                 ES =0000 0000000000000000 00000000 00000000\n"
            )
        };
        // `cli; hlt` on both vCPUs: stopped for good.
        assert!(halted_for_good(
            &(cpu(0, "00000086", 1) + &cpu(1, "00000046", 1))
        ));
        // An idle guest halts with interrupts on.
        assert!(!halted_for_good(&cpu(0, "00000246", 1)));
        // One vCPU still running.
        assert!(!halted_for_good(
            &(cpu(0, "00000086", 1) + &cpu(1, "00000086", 0))
        ));
        // 32-bit mode prints EFL.
        assert!(halted_for_good(
            "EIP=0010000f EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\n"
        ));
        assert!(!halted_for_good("no registers here\n"));
    }

    #[test]
    fn pc_vms_get_a_vm_generation_id_and_microvm_ones_do_not() {
        let q = tcg_driver();
        let mut spec: ImageSpec = serde_yaml_ng::from_str("kernel: /k\ncmdline: x\n").unwrap();
        let joined = |spec: &ImageSpec| {
            q.args(
                &VmId::new("v"),
                spec,
                "x",
                &Memory::Ram,
                Path::new("/r"),
                true,
            )
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
        };
        assert!(!joined(&spec).contains("vmgenid"));
        spec.machine = Machine::Pc;
        assert!(joined(&spec).contains("-device vmgenid,guid=auto"));
    }

    #[test]
    fn only_a_clone_runs_without_transparent_huge_pages() {
        assert!(!Memory::Private(PathBuf::from("/s/memory")).transparent_huge_pages());
        assert!(Memory::Shared.transparent_huge_pages());
        assert!(Memory::Ram.transparent_huge_pages());
    }

    #[test]
    fn only_a_boot_loads_the_kernel_a_clone_takes_it_from_the_snapshot() {
        let q = tcg_driver();
        let spec: ImageSpec =
            serde_yaml_ng::from_str("kernel: /k\ninitramfs: /i\ncmdline: x\n").unwrap();
        let args = |incoming| {
            q.args(
                &VmId::new("v"),
                &spec,
                "x",
                &Memory::Ram,
                Path::new("/r"),
                incoming,
            )
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
        };
        let boot = args(false);
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(boot.iter().any(|a| a == flag), "a boot passes {flag}");
        }
        let clone = args(true);
        for flag in ["-kernel", "-initrd", "-append"] {
            assert!(!clone.iter().any(|a| a == flag), "a clone passes {flag}");
        }
        assert!(clone.windows(2).any(|w| w == ["-incoming", "defer"]));
    }
}

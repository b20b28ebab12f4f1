//! The image spec: what a VM boots, as written in `proxy.yaml`.
//!
//! One spec expresses both a Linux microVM guest and an OSv guest; everything
//! guest-specific (how the guest learns its address, which port it serves,
//! which path says it is ready) lives here, in config, not in code.
//!
//! ```yaml
//! # Linux test guest: addresses through the kernel's ip= parameter.
//! kernel: target/guest/current/vmlinuz
//! initramfs: target/guest/current/initramfs.cpio.gz
//! cmdline: "console=ttyS0 quiet panic=-1 tsc_early_khz={tsc_khz} ip={guest_ip}::{host_ip}:{netmask}::eth0:off"
//! machine: microvm
//!
//! # OSv guest: its documented boot interface and its whole partitioned
//! # disk (build/last/usr.img converted to raw: OSv mounts its root from
//! # the first partition, so the bare rofs.img filesystem does not boot).
//! kernel: osv/loader-stripped.elf
//! disks: [{ path: osv/usr.raw }]
//! cmdline: "--rootfs=rofs --ip=eth0,{guest_ip},{netmask} --defaultgw={host_ip} /node /app/server.js"
//! machine: pc
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::resumed::OnRestore;
use crate::net::NetParams;
use crate::FieldError;

/// QEMU machine type. Cloud Hypervisor has one machine and ignores this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// Minimal virtio-mmio machine: the fastest to boot and restore.
    Microvm,
    /// Classic PC with virtio-pci (for guests such as OSv under TCG that need
    /// an HPET or paravirtual clock, which microvm lacks under TCG).
    Pc,
}

/// How a QEMU snapshot is taken and restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Guest RAM lives in a file the template shares; clones map it privately
    /// (copy-on-write) and load only the device state. Fast, little memory.
    Template,
    /// Guest RAM is saved into the state stream and copied into each clone.
    Full,
}

/// A read-only disk attached to the guest, in order (`/dev/vda`, `/dev/vdb`,
/// ... on Linux; `/dev/vblk0`, ... on OSv).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Raw disk image.
    pub path: PathBuf,
}

fn default_memory_mib() -> u32 {
    256
}
fn default_vcpus() -> u8 {
    1
}
fn default_port() -> u16 {
    8080
}
fn default_ready_path() -> String {
    "/healthz".into()
}
fn default_ready_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_machine() -> Machine {
    Machine::Microvm
}
fn default_snapshot_mode() -> SnapshotMode {
    SnapshotMode::Template
}

/// The largest code disk, in MiB.
pub const MAX_CODE_DISK_MIB: u32 = 16 * 1024;

/// Placeholders a cmdline may use, and what they expand to.
pub const PLACEHOLDERS: &[(&str, &str)] = &[
    ("guest_ip", "the guest's address"),
    ("host_ip", "the host side of the tap, the guest's gateway"),
    ("netmask", "the tap subnet's mask, dotted"),
    ("prefix_len", "the tap subnet's prefix length"),
    ("guest_port", "the port the guest serves"),
    ("tsc_khz", "the host TSC frequency in kHz"),
];

/// What a VM boots. See the module doc for examples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Kernel image (Linux bzImage or an ELF such as OSv's loader).
    pub kernel: PathBuf,
    /// Initial ramdisk, if the guest uses one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Read-only disks, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    /// Kernel command line; `{name}` placeholders are listed in [`PLACEHOLDERS`].
    pub cmdline: String,
    /// QEMU machine type.
    #[serde(default = "default_machine")]
    pub machine: Machine,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Virtual CPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// TCP port the guest serves HTTP on.
    #[serde(default = "default_port")]
    pub guest_port: u16,
    /// Path that answers 200 once the guest can serve.
    #[serde(default = "default_ready_path")]
    pub ready_path: String,
    /// How long a booted or restored guest may take to become ready.
    #[serde(default = "default_ready_timeout", with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// How QEMU snapshots this image.
    #[serde(default = "default_snapshot_mode")]
    pub snapshot_mode: SnapshotMode,
    /// A path the guest serves that snapgate POSTs the resumed message to
    /// (the host's time, fresh entropy) once per clone, before the clone's
    /// first request; see [`OnRestore`]. Off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_restore: Option<OnRestore>,
    /// One more read-only disk after `disks`, of this many MiB, backed by
    /// a file of each VM's own ([`crate::Vm::extra_disk`]) that starts
    /// empty (sparse) and that the layer above may fill before the guest
    /// reads it. Set by snapgate (a runtime's `code_disk_mib`), never in a
    /// config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_disk_mib: Option<u32>,
    /// What ran on the template between its readiness and its snapshot,
    /// as the layer that ran it describes it (opaque here): recorded so a
    /// change to it makes the snapshot stale. Set by snapgate, never in a
    /// config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<String>,
}

impl ImageSpec {
    /// Checks everything that can be checked without booting.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut problems = Vec::new();
        if let Err(e) = render(&self.cmdline, |_| Some(String::new())) {
            problems.push(FieldError::new("cmdline", e));
        }
        if self.memory_mib < 16 {
            problems.push(FieldError::new(
                "memory_mib",
                format!("{} is below the 16 MiB minimum", self.memory_mib),
            ));
        }
        if self.vcpus == 0 {
            problems.push(FieldError::new("vcpus", "must be at least 1"));
        }
        if self.guest_port == 0 {
            problems.push(FieldError::new("guest_port", "must not be 0"));
        }
        if !self.ready_path.starts_with('/') {
            problems.push(FieldError::new(
                "ready_path",
                format!("{:?} must start with /", self.ready_path),
            ));
        }
        if self.ready_timeout.is_zero() {
            problems.push(FieldError::new("ready_timeout", "must be above zero"));
        }
        if let Some(hook) = &self.on_restore {
            problems.extend(hook.validate(&self.ready_path));
        }
        if let Some(mib) = self.extra_disk_mib {
            if !(1..=MAX_CODE_DISK_MIB).contains(&mib) {
                problems.push(FieldError::new(
                    "extra_disk_mib",
                    format!("{mib} is not within 1..={MAX_CODE_DISK_MIB}"),
                ));
            }
        }
        problems
    }

    /// Checks that the kernel, initramfs and disks are files that can be
    /// read now: the I/O half of checking a spec ([`ImageSpec::validate`]
    /// is the pure half).
    pub fn check_files(&self) -> Vec<FieldError> {
        let mut problems = Vec::new();
        let mut file = |field: String, path: &PathBuf| match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => problems.push(FieldError::new(
                field,
                format!("{} is not a file", path.display()),
            )),
            Err(e) => problems.push(FieldError::new(field, format!("{}: {e}", path.display()))),
        };
        file("kernel".into(), &self.kernel);
        if let Some(initramfs) = &self.initramfs {
            file("initramfs".into(), initramfs);
        }
        for (i, disk) in self.disks.iter().enumerate() {
            file(format!("disks[{i}].path"), &disk.path);
        }
        problems
    }

    /// The kernel command line with every placeholder filled in.
    pub fn render_cmdline(&self, net: &NetParams, tsc_khz: u64) -> Result<String, String> {
        render(&self.cmdline, |name| {
            Some(match name {
                "guest_ip" => net.guest_ip.to_string(),
                "host_ip" => net.host_ip.to_string(),
                "netmask" => net.netmask().to_string(),
                "prefix_len" => net.prefix_len.to_string(),
                "guest_port" => self.guest_port.to_string(),
                "tsc_khz" => tsc_khz.to_string(),
                _ => return None,
            })
        })
    }
}

/// Expands `{name}` placeholders; `{{` and `}}` stand for literal braces.
fn render(template: &str, value: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            return Err(format!(
                "unmatched '}}' at byte {}",
                template.len() - tail.len()
            ));
        }
        let end = tail
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' at byte {}", template.len() - tail.len()))?;
        let name = &tail[1..end];
        if !PLACEHOLDERS.iter().any(|(p, _)| *p == name) {
            let known: Vec<&str> = PLACEHOLDERS.iter().map(|(p, _)| *p).collect();
            return Err(format!(
                "unknown placeholder {{{name}}} (known: {})",
                known.join(", ")
            ));
        }
        out.push_str(&value(name).unwrap_or_default());
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The host's TSC frequency in kHz, for guests that must be told it under
/// TCG (`tsc_early_khz=`): the kernel's own figure if it exports one, else
/// the first `cpu MHz` of /proc/cpuinfo.
pub fn host_tsc_khz() -> u64 {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(khz) = s.trim().parse() {
            return khz;
        }
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(1_000_000)
}

/// Which accelerator QEMU uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where the CPU has hardware virtualization, else TCG.
    #[default]
    Auto,
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// How CH brings snapshot memory into a clone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryRestoreMode {
    /// Read the whole memory file into the clone before it runs.
    #[default]
    Copy,
    /// Fault pages in on first touch (userfaultfd).
    OnDemand,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmdline: &str) -> ImageSpec {
        serde_yaml_ng::from_str(&format!("kernel: /k\ncmdline: {cmdline:?}\n")).unwrap()
    }

    #[test]
    fn linux_and_osv_cmdlines_render_from_one_spec_shape() {
        let net = NetParams::default();
        let linux =
            spec("quiet tsc_early_khz={tsc_khz} ip={guest_ip}::{host_ip}:{netmask}::eth0:off");
        assert_eq!(
            linux.render_cmdline(&net, 2_445_404).unwrap(),
            "quiet tsc_early_khz=2445404 ip=169.254.100.2::169.254.100.1:255.255.255.252::eth0:off"
        );
        let osv = spec("--rootfs=rofs --ip=eth0,{guest_ip},{netmask} --defaultgw={host_ip} /hello");
        assert_eq!(
            osv.render_cmdline(&net, 1).unwrap(),
            "--rootfs=rofs --ip=eth0,169.254.100.2,255.255.255.252 --defaultgw=169.254.100.1 /hello"
        );
    }

    #[test]
    fn bad_placeholders_are_named() {
        let err = spec("ip={guest_addr}").render_cmdline(&NetParams::default(), 1);
        assert!(err.unwrap_err().contains("{guest_addr}"));
        assert!(spec("ip={guest_ip")
            .render_cmdline(&NetParams::default(), 1)
            .unwrap_err()
            .contains("unclosed"));
        assert_eq!(
            spec("a={{b}}")
                .render_cmdline(&NetParams::default(), 1)
                .unwrap(),
            "a={b}"
        );
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let s = spec("x");
        assert_eq!((s.memory_mib, s.vcpus, s.guest_port), (256, 1, 8080));
        assert_eq!(s.machine, Machine::Microvm);
        assert_eq!(s.snapshot_mode, SnapshotMode::Template);
        let err = serde_yaml_ng::from_str::<ImageSpec>("kernel: /k\ncmdline: x\nmem: 3\n");
        assert!(err.unwrap_err().to_string().contains("unknown field `mem`"));
    }

    #[test]
    fn validate_touches_no_file_and_check_files_names_missing_ones() {
        assert_eq!(spec("x").validate(), vec![]);
        let problems = spec("x").check_files();
        assert!(
            problems
                .iter()
                .any(|p| p.to_string().starts_with("kernel: /k")),
            "{problems:?}"
        );
    }
}

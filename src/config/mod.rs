//! `proxy.yaml`: serde structs (unknown keys rejected) -> validation -> typed
//! values. Relative paths in the file are resolved against the file's own
//! directory, so a config works from any working directory.
//!
//! Errors name the key path (`apps.hello.image.kernel`) and, for syntax and
//! type errors, the line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::net::NetParams;
use crate::vmm::cloud_hypervisor::MemoryRestoreMode;
use crate::vmm::qemu::Accel;
use crate::vmm::{ImageSpec, VmmKind};

/// A config problem: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `apps.hello.image.kernel`.
    pub key: String,
    /// Line in the file, where known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {line}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
#[error("{} has {} problem(s):\n{}", .file.display(), .problems.len(), .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong, each with its key.
    pub problems: Vec<Problem>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/snapgate")
}

/// Which VMM runs the VMs, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfig {
    /// `qemu` or `cloud-hypervisor`.
    #[serde(default = "default_vmm_kind")]
    pub kind: VmmKind,
    /// The VMM binary; found on PATH when relative.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// QEMU accelerator: `auto`, `kvm` or `tcg`.
    #[serde(default)]
    pub accel: Accel,
    /// Cloud Hypervisor memory restore: `copy` or `ondemand`.
    #[serde(default)]
    pub memory_restore_mode: MemoryRestoreMode,
}

fn default_vmm_kind() -> VmmKind {
    VmmKind::Qemu
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            kind: default_vmm_kind(),
            binary: None,
            accel: Accel::Auto,
            memory_restore_mode: MemoryRestoreMode::Copy,
        }
    }
}

impl VmmConfig {
    /// The binary to run.
    pub fn binary(&self) -> PathBuf {
        self.binary.clone().unwrap_or_else(|| {
            PathBuf::from(match self.kind {
                VmmKind::Qemu => "qemu-system-x86_64",
                VmmKind::CloudHypervisor => "cloud-hypervisor",
            })
        })
    }
}

/// One app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// What the app's VMs boot.
    pub image: ImageSpec,
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where pid files, run directories and snapshots live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where snapshots live; default `<state_dir>/snapshots`.
    #[serde(default)]
    pub snapshot_dir: Option<PathBuf>,
    /// The VMM.
    #[serde(default)]
    pub vmm: VmmConfig,
    /// Tap addressing shared by every VM.
    #[serde(default)]
    pub network: NetParams,
    /// Apps by name.
    pub apps: BTreeMap<String, AppConfig>,
}

impl Config {
    /// Reads, parses and validates `path`; every problem is reported at once
    /// where possible.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: path.to_owned(),
            problems,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(vec![Problem {
                key: "(file)".into(),
                line: None,
                message: e.to_string(),
            }])
        })?;
        let mut config = Self::parse(&text).map_err(|p| fail(vec![p]))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Parses YAML text; the error names the key path and line.
    pub fn parse(text: &str) -> Result<Config, Problem> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            Problem {
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                line: inner.location().map(|l| l.line()),
                message: strip_location(&inner.to_string()),
            }
        })
    }

    fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.state_dir);
        if let Some(dir) = &mut self.snapshot_dir {
            abs(dir);
        }
        for app in self.apps.values_mut() {
            abs(&mut app.image.kernel);
            if let Some(initramfs) = &mut app.image.initramfs {
                abs(initramfs);
            }
            for disk in &mut app.image.disks {
                abs(&mut disk.path);
            }
        }
    }

    /// Checks what the types cannot; each problem names its key.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut add = |key: String, message: String| {
            problems.push(Problem {
                key,
                line: None,
                message,
            })
        };
        if let Err(e) = self.network.validate() {
            let (field, msg) = e.split_once(": ").unwrap_or(("", &e));
            add(format!("network.{field}"), msg.to_owned());
        }
        if self.apps.is_empty() {
            add("apps".into(), "at least one app is needed".into());
        }
        for (name, app) in &self.apps {
            if !valid_app_name(name) {
                add(
                    format!("apps.{name}"),
                    "app names are 1-32 characters of [a-z0-9-], starting with a letter".into(),
                );
            }
            for p in app.image.validate() {
                let (field, msg) = p.split_once(": ").unwrap_or(("", &p));
                add(format!("apps.{name}.image.{field}"), msg.to_owned());
            }
        }
        problems
    }

    /// Where snapshots live.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.snapshot_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("snapshots"))
    }
}

fn valid_app_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// serde_yaml appends "at line N column M"; the line is reported separately.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named_with_its_path_and_line() {
        let text = "apps:\n  hello:\n    image:\n      kernel: /k\n      cmdline: x\n      memroy_mib: 3\n";
        let p = Config::parse(text).unwrap_err();
        assert_eq!(p.key, "apps.hello.image.memroy_mib");
        assert!(
            p.message.contains("unknown field `memroy_mib`"),
            "{}",
            p.message
        );
        assert_eq!(p.line, Some(6));
    }

    #[test]
    fn validation_names_keys() {
        let text = "network:\n  prefix_len: 31\napps:\n  Hello:\n    image:\n      kernel: /nonexistent/k\n      cmdline: '{nope}'\n";
        let c = Config::parse(text).unwrap();
        let keys: Vec<String> = c.validate().into_iter().map(|p| p.key).collect();
        assert!(keys.contains(&"network.prefix_len".to_string()), "{keys:?}");
        assert!(keys.contains(&"apps.Hello".to_string()), "{keys:?}");
        assert!(
            keys.contains(&"apps.Hello.image.kernel".to_string()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"apps.Hello.image.cmdline".to_string()),
            "{keys:?}"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let mut c = Config::parse("apps:\n  a:\n    image: {kernel: k, cmdline: x}\n").unwrap();
        c.resolve_paths(Path::new("/etc/snapgate"));
        assert_eq!(c.apps["a"].image.kernel, Path::new("/etc/snapgate/k"));
        assert_eq!(c.snapshot_dir(), Path::new("/var/lib/snapgate/snapshots"));
    }
}

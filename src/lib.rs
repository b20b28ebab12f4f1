//! snapgate: a scale-to-zero edge gateway for microVM apps.
//!
//! Module map (data flows one way, top to bottom):
//! - [`config`]: `proxy.yaml` -> serde structs -> validation -> typed values.
//! - [`gateway`]: wiring from a config to a running gateway, and shutdown.
//! - [`proxy`]: listener, Host router, forwarding, errors -> responses.
//! - [`admin`]: `/metrics` and `/healthz` on their own listener.
//! - [`vmm`]: the [`vmm::Vmm`] trait and its QEMU and Cloud Hypervisor drivers.
//! - [`net`]: taps, addressing, clean-up of a crashed run's leftovers.
//! - [`pool`]: per-app pools of VM instances: claim, hold queue, restore, reaper.
//! - [`runtime`]: runtime apps: a shared runtime snapshot, per-app code disks.
//! - [`path`]: request paths as guests' routers may read them.
//! - [`snapshot`]: building snapshots: jobs, the per-app lock, pruning.

#![deny(unsafe_code)]
#![warn(missing_docs)]
// Errors here carry context (paths, log tails) and are returned on cold
// paths next to VM starts that take milliseconds; boxing them buys nothing.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod config;
pub mod gateway;
pub mod net;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod runtime;
pub mod snapshot;
#[cfg(feature = "vm-tests")]
pub mod testing;
pub mod vmm;

/// An error and its `source()` chain on one line: `outer: cause: root`.
pub fn display_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their source in their own message.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A setting that cannot be used: which field, and why. Validators return
/// these; the config layer puts its own key path in front of `field`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, relative to the struct checked (`disks[0].path`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

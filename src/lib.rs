//! snapgate: a scale-to-zero edge gateway for microVM apps.
//!
//! Module map (data flows one way, top to bottom):
//! - [`config`]: `proxy.yaml` -> serde structs -> validation -> typed values.
//! - [`gateway`]: wiring from a config to a running gateway, and shutdown.
//! - [`proxy`]: listener, Host router, forwarding, errors -> responses.
//! - [`admin`]: `/metrics` and `/healthz` on their own listener.
//! - [`vmm`] (the crate `snapgate-vmm`, which cannot import anything
//!   here): the [`vmm::Vmm`] trait, QEMU and Cloud Hypervisor drivers,
//!   snapshot manifests, and [`net`]: taps and addressing.
//! - [`pool`]: per-app pools of VM instances: claim, hold queue, restore, reaper.
//! - [`runtime`]: runtime apps: a shared runtime snapshot, per-app code disks.
//! - [`path`]: request paths as guests' routers may read them.
//! - [`snapshot`]: building snapshots: jobs, the per-app lock, pruning.
//! - [`alloc`]: the global allocator the binary installs (mimalloc).

#![deny(unsafe_code)]
#![warn(missing_docs)]
// Errors here carry context (paths, log tails) and are returned on cold
// paths next to VM starts that take milliseconds; boxing them buys nothing.
#![allow(clippy::result_large_err)]

/// The VMM layer (its own crate, `snapgate-vmm`).
pub use snapgate_vmm as vmm;
pub use snapgate_vmm::net;
pub use snapgate_vmm::{display_chain, FieldError};

pub mod acme;
pub mod admin;
pub mod alloc;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod gateway;
pub mod logs;
pub mod path;
pub mod pool;
pub mod proxy;
pub mod runtime;
pub mod snapshot;
#[cfg(feature = "vm-tests")]
pub mod testing;

//! Runtime apps: one runtime snapshot shared by many apps, each app's code
//! on its own disk.
//!
//! # An instance of a runtime app (`snapshot: runtime`, the default)
//! 1. The runtime's template boots its image: the kernel, an initramfs
//!    whose `/init` is the guest agent, the runtime's read-only root disk,
//!    and an empty code slot. The agent starts the runtime (Node.js), which
//!    loads itself and its common modules, then waits. Once the agent's
//!    health path answers 200 the snapshot is taken, into
//!    `<snapshot_dir>/runtime.<name>/`.
//! 2. A [`Runtime`] keeps `min_warm` clones of that snapshot restored and
//!    loaded, for any app of the runtime to take.
//! 3. When an app's pool needs an instance, its [`RuntimeFactory`] takes a
//!    clone (a warm one, else it restores one), writes the app's code image
//!    into the clone's code slot and posts the start message to the agent.
//!    The message carries a fresh resumed message
//!    ([`crate::vmm::resumed`]: the host's time and 32 bytes of host
//!    entropy), which the agent applies first: it reseeds the guest
//!    kernel's generator and sets the clock, both as the snapshot froze
//!    them until then. It then mounts the disk and starts the app in the
//!    already loaded runtime, which drops whatever generator state it
//!    holds before the app runs (Math.random's pool, Node's entropy
//!    caches; OpenSSL in the runtime holds none: see
//!    `guest/node/getrandom-provider.c`). The instance is ready when the
//!    app answers its `ready_path` with 200 on the runtime's `app_port`.
//! 4. From then on the instance is the app's, pooled like any VM instance
//!    (leases, hold queue, idle reaping); it never returns to the runtime.
//!
//! # How the code disk reaches a restored clone
//! Every VM of a runtime image has one more read-only disk after the
//! image's own: its code slot ([`crate::vmm::ImageSpec::extra_disk_mib`]), a sparse file
//! of `code_disk_mib` in the VM's run directory, created empty before the
//! VMM starts.
//! - QEMU: the template and every clone have the same `-drive`/virtio-blk
//!   device, so the device state in the snapshot matches; only the file
//!   behind it differs per clone (`<run>/extra.img`).
//! - Cloud Hypervisor: each clone restores from its own copy of the
//!   snapshot's `config.json`, whose last disk is pointed at the clone's own
//!   file (`vmm::cloud_hypervisor::clone_source`).
//!
//! On claim the image is copied into the slot file. The VMM reads the file
//! through its own descriptor and the host page cache, so the guest sees
//! the code from the next read on. The guest kernel read the slot once,
//! while it was empty (the partition scan at boot, captured by the
//! snapshot); the agent drops those cached blocks (`BLKFLSBUF`) before it
//! mounts. The slot's size never changes, so no resize event is needed.
//! Hot-plugging a disk instead is not possible on QEMU's `microvm` machine
//! (no hotplug bus) and would add a device probe to every claim elsewhere.
//!
//! # Failures
//! A clone that fails to take its app (the code cannot be packed, the disk
//! does not mount, `main` is missing, the app crashes or never answers) is
//! destroyed. The error, with the app's own output from the console
//! ([`RuntimeError::App`]), fails only that app's start: its pool backs off and
//! answers its held requests with 503. The runtime's stock and its other
//! apps are not touched: the clone had already left the stock.
//!
//! # Per-app snapshots (`snapshot: app`)
//! The app's template boots the runtime image with the app's code image as
//! its code disk (no slot), the agent starts the app, and once the app
//! answers, the agent freezes the runtime ([`freeze`]: no JavaScript runs
//! until the next resumed message) and the snapshot is taken
//! ([`AppTemplate`]): clones skip the start.
//! As soon as a restored clone's agent answers its `/healthz`, before the
//! app's readiness probe and its first request, the clone gets a resumed
//! message through the agent's `/resumed` ([`agent_hook`]); the runtime,
//! frozen since the template's snapshot, runs no code of the app (no
//! request, timer or callback) before it. The agent reseeds the kernel's
//! generator, sets the clock and has the runtime drop its own generator
//! state, and answers only when all of that is done.
//! The snapshot's spec names the code image, whose file name is its content
//! hash, so changed code makes the snapshot stale and the next start
//! rebuilds it.

pub mod code;
mod error;
mod metrics;
mod start;
mod stock;
mod template;

use std::sync::Arc;

pub use code::{CodeError, CodeImage, CodeSource};
pub use error::RuntimeError;
pub use metrics::RuntimeMetrics;
pub use start::{agent_hook, app_output, freeze, start_app, StartSpec, RESUME_TIMEOUT};
pub use stock::{snapshot_name, Runtime, RuntimeFactory};
pub use template::{app_image, AppTemplate};

/// The app's code image as it is now (packed off the async workers).
pub async fn current_code(code: &Arc<CodeSource>, app: &str) -> Result<CodeImage, RuntimeError> {
    let code = code.clone();
    let packed = tokio::task::spawn_blocking(move || code.current()).await;
    let packed = packed.unwrap_or_else(|e| {
        Err(CodeError::Read {
            app: app.to_owned(),
            path: "(packing task)".into(),
            source: std::io::Error::other(e),
        })
    });
    packed.map_err(|source| RuntimeError::Code {
        app: app.to_owned(),
        source,
    })
}

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
//! image's own: its code slot ([`ImageSpec::code_slot_mib`]), a sparse file
//! of `code_disk_mib` in the VM's run directory, created empty before the
//! VMM starts.
//! - QEMU: the template and every clone have the same `-drive`/virtio-blk
//!   device, so the device state in the snapshot matches; only the file
//!   behind it differs per clone (`<run>/code.img`).
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
//! ([`VmmError::App`]), fails only that app's start: its pool backs off and
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
mod metrics;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{error, info, warn};

pub use code::{CodeError, CodeImage, CodeSource};
pub use metrics::RuntimeMetrics;

use crate::config::{RuntimeAppConfig, RuntimeConfig};
use crate::net::Network;
use crate::pool::Factory;
use crate::snapshot_cmd::Prepare;
use crate::vmm::resumed::{Hook, Resumed};
use crate::vmm::spec::DiskSpec;
use crate::vmm::{ready, watch, ImageSpec, Snapshot, Vm, VmId, Vmm, VmmError};

/// The directory name of a runtime's snapshots under `snapshot_dir` (app
/// names cannot contain a dot, so it never clashes with an app's).
pub fn snapshot_name(runtime: &str) -> String {
    format!("runtime.{runtime}")
}

/// How an app starts in a runtime instance.
#[derive(Clone, Debug)]
pub struct StartSpec {
    /// The app's name (for errors and logs).
    pub app: String,
    /// The module the runtime loads, relative to the code's root.
    pub main: String,
    /// The app's environment.
    pub env: BTreeMap<String, String>,
    /// The port the app serves on.
    pub port: u16,
    /// The app's readiness path and how long it may take.
    pub ready_path: String,
    /// How long the app may take from its start to its first 200.
    pub ready_timeout: Duration,
}

impl StartSpec {
    /// The start of `app`, configured as `cfg`, in `runtime`.
    pub fn new(app: &str, cfg: &RuntimeAppConfig, runtime: &RuntimeConfig) -> StartSpec {
        StartSpec {
            app: app.to_owned(),
            main: cfg.main.clone(),
            env: cfg.env.clone(),
            port: runtime.app_port,
            ready_path: cfg.ready_path.clone(),
            ready_timeout: cfg.ready_timeout,
        }
    }

    /// How the app is started: what the agent gets, less the resumed
    /// message (which differs for every clone).
    pub fn message(&self) -> String {
        self.message_value().to_string()
    }

    fn message_value(&self) -> serde_json::Value {
        serde_json::json!({ "main": self.main, "port": self.port, "env": self.env })
    }

    /// The body of the agent's `POST /start`: the message and a fresh
    /// resumed message, which the agent applies before anything else.
    fn request_body(&self) -> Result<Bytes, VmmError> {
        let mut body = self.message_value();
        body["resumed"] = Resumed::fresh()?.to_json();
        Ok(Bytes::from(body.to_string()))
    }

    fn fail(&self, reason: String, output: String) -> VmmError {
        VmmError::App {
            app: self.app.clone(),
            reason,
            output,
        }
    }
}

/// How long the guest agent may take to apply a resumed message: reseed,
/// clock, and the runtime's own answer (which the agent waits for up to
/// 5 s).
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a restored clone's guest agent, listening on `agent_port`, takes
/// its resumed message: `/resumed`, once its `agent_ready_path` (the
/// runtime image's `ready_path`) answers (module doc, per-app snapshots).
/// A [`crate::pool::SnapshotFactory`] sends it there before the app's own
/// readiness probe.
pub fn agent_hook(agent_port: u16, agent_ready_path: &str) -> Hook {
    Hook {
        port: agent_port,
        ready_path: agent_ready_path.to_owned(),
        path: "/resumed".into(),
        timeout: RESUME_TIMEOUT,
    }
}

/// The console lines the app printed: from the loader's `starting` line on
/// (the runtime prints it just before it loads the app), at most 40.
pub fn app_output(vm: &Vm) -> String {
    let text = std::fs::read_to_string(vm.process().console_path()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.contains("snapgate-loader: starting"))
        .map_or(lines.len().saturating_sub(15), |i| i + 1);
    let lines = &lines[from..];
    let mut out = String::new();
    for line in &lines[lines.len().saturating_sub(40)..] {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Starts the app of `start` in `vm`, a runtime instance whose agent is
/// ready: writes `image` into its code slot (if given; a per-app template
/// has its code disk already), posts the start message, and waits until
/// the app answers. Records `attach`, `start` and `ready`.
///
/// Failures that are the app's ([`VmmError::App`]): the agent refusing the
/// start with 422 (the disk does not mount, `main` is missing), the runtime
/// exiting (the guest powers off), the app not answering in time. Anything
/// else (the slot cannot be written, the agent cannot be reached, refuses
/// the message or does not answer within 30 s, the VMM dies) is the
/// host's or the VM's and keeps its own error.
pub async fn start_app(
    vmm: &dyn Vmm,
    vm: &mut Vm,
    image: Option<&Path>,
    start: &StartSpec,
) -> Result<(), VmmError> {
    if let Some(image) = image {
        let t = std::time::Instant::now();
        let slot = vm.code_slot().ok_or_else(|| {
            VmmError::Invalid(format!("{} has no code slot: not a runtime image", vm.id()))
        })?;
        let (from, to) = (image.to_owned(), slot.clone());
        tokio::task::spawn_blocking(move || copy_into(&from, &to))
            .await
            .map_err(|e| VmmError::Invalid(format!("attaching the code: {e}")))?
            .map_err(|source| VmmError::Io {
                what: "cannot write the app's code into",
                path: slot,
                source,
            })?;
        vm.record("attach", t.elapsed());
    }
    let t = std::time::Instant::now();
    let agent = vm.endpoint().clone();
    let body = start.request_body()?;
    let call = tokio::time::timeout(
        START_CALL_TIMEOUT,
        ready::request(&agent, http::Method::POST, "/start", body),
    );
    let answer = match watch::guarded(vmm, vm, "starting the app", call).await {
        Ok(answer) => answer,
        Err(e) => return Err(app_exit(start, vm, e)),
    };
    let agent_failed = |problem: String| VmmError::Agent {
        vm: vm.id().clone(),
        problem,
    };
    match answer {
        Ok(Ok((200, _))) => {}
        // The agent's one refusal that is the app's: its code disk does not
        // mount, or main is not on it. Any other is snapgate's or the VM's.
        Ok(Ok((422, body))) => {
            return Err(start.fail(
                format!(
                    "the guest agent of {} refused the start (HTTP 422): {}",
                    vm.id(),
                    String::from_utf8_lossy(&body).trim()
                ),
                app_output(vm),
            ))
        }
        Ok(Ok((status, body))) => {
            return Err(agent_failed(format!(
                "POST /start answered HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )))
        }
        Ok(Err(e)) => {
            let err = agent_failed(format!("POST /start on {}: {e}", agent.addr));
            // A broken connection is often a VMM on its way out.
            let err = vm.process_mut().explain(err, "starting the app").await;
            return Err(app_exit(start, vm, err));
        }
        Err(_) => {
            return Err(agent_failed(format!(
                "POST /start on {}: no answer within {}s",
                agent.addr,
                START_CALL_TIMEOUT.as_secs()
            )))
        }
    }
    vm.record("start", t.elapsed());
    vm.serve_at(start.port, &start.ready_path, start.ready_timeout);
    match ready::wait_ready(vmm, vm, start.ready_timeout).await {
        Ok(()) => Ok(()),
        Err(VmmError::NotReady {
            after, last_error, ..
        }) => Err(start.fail(
            format!(
                "GET {} on port {} in {} did not answer 200 within {:.1}s: {last_error}",
                start.ready_path,
                start.port,
                vm.id(),
                after.as_secs_f64()
            ),
            app_output(vm),
        )),
        Err(other) => Err(app_exit(start, vm, other)),
    }
}

/// How long the guest agent may take to answer `POST /start`: reseed,
/// clock, flush, mount and hand-over take milliseconds.
const START_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `err`, unless it says the guest powered itself off (the VMM exited with
/// status 0) after its agent logged that the runtime exited, which the
/// agent does when the runtime ends: then the app exited while starting,
/// and the error is the app's, with its output. (A guest kernel that
/// panics with `panic=-1` also ends its VMM with status 0, and stays the
/// VM's fault.)
fn app_exit(start: &StartSpec, vm: &Vm, err: VmmError) -> VmmError {
    let runtime_exited = || {
        std::fs::read_to_string(vm.process().console_path())
            .is_ok_and(|console| console.contains("agent: runtime exited"))
    };
    match err {
        VmmError::Exited { status, .. } if status == "exit status: 0" && runtime_exited() => start
            .fail(
                format!(
                    "the app exited while starting in {}; its VM stopped",
                    vm.id()
                ),
                app_output(vm),
            ),
        other => other,
    }
}

/// Copies a code image to the start of a slot file, keeping the slot's size.
fn copy_into(image: &Path, slot: &Path) -> std::io::Result<()> {
    let mut from = std::fs::File::open(image)?;
    let mut to = std::fs::OpenOptions::new().write(true).open(slot)?;
    let slot_len = to.metadata()?.len();
    let image_len = from.metadata()?.len();
    if image_len > slot_len {
        return Err(std::io::Error::other(format!(
            "{} is {image_len} bytes, larger than the {slot_len}-byte code slot",
            image.display()
        )));
    }
    // No fsync: the VMM reads the file through the same page cache.
    std::io::copy(&mut from, &mut to).map(drop)
}

struct Stock {
    warm: Vec<Vm>,
    restoring: usize,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    closed: bool,
}

/// A runtime's stock of restored, loaded clones (module doc, step 2).
pub struct Runtime {
    name: String,
    vmm: Arc<dyn Vmm>,
    net: Network,
    snapshot: Snapshot,
    min_warm: usize,
    state: Mutex<Stock>,
    wake: Notify,
    seq: AtomicU64,
    metrics: RuntimeMetrics,
}

const TICK: Duration = Duration::from_millis(500);

impl Runtime {
    /// A runtime restoring clones of `snapshot`; its refill task starts on
    /// the current tokio runtime and at once restores `min_warm` clones.
    pub fn start(
        name: &str,
        vmm: Arc<dyn Vmm>,
        net: Network,
        snapshot: Snapshot,
        min_warm: usize,
        metrics: RuntimeMetrics,
    ) -> Arc<Runtime> {
        metrics.init(name);
        let rt = Arc::new(Runtime {
            name: name.to_owned(),
            vmm,
            net,
            snapshot,
            min_warm,
            state: Mutex::new(Stock {
                warm: Vec::new(),
                restoring: 0,
                failures: 0,
                retry_at: None,
                last_error: None,
                closed: false,
            }),
            wake: Notify::new(),
            seq: AtomicU64::new(1),
            metrics,
        });
        tokio::spawn(refill(rt.clone()));
        rt
    }

    /// (warm clones, restores in flight).
    pub fn stock(&self) -> (usize, usize) {
        let st = self.lock();
        (st.warm.len(), st.restoring)
    }

    /// The error of the last failed background restore, while they fail.
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// VMM process ids of the warm clones.
    pub fn pids(&self) -> Vec<u32> {
        self.lock().warm.iter().map(Vm::pid).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stock> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> VmId {
        VmId::new(format!(
            "{}-{}",
            snapshot_name(&self.name).replace('.', "-"),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// A loaded runtime clone, taken out of the stock for good: a warm one
    /// if there is one, else one restored now.
    pub async fn take(&self) -> Result<Vm, VmmError> {
        loop {
            let candidate = {
                let mut st = self.lock();
                if st.closed {
                    return Err(VmmError::Invalid(format!(
                        "runtime {} is closed",
                        self.name
                    )));
                }
                let vm = st.warm.pop();
                self.publish(&st);
                vm
            };
            self.wake.notify_one();
            let Some(mut vm) = candidate else { break };
            if vm.process_mut().exited().is_none() {
                self.metrics.took(&self.name, "warm");
                return Ok(vm);
            }
            // A clone whose VMM died while waiting: drop it, try the next.
            warn!(runtime = %self.name, vm = %vm.id(), "warm clone's VMM exited; discarding it");
            self.metrics.failed(&self.name);
        }
        match self.restore_one().await {
            Ok(vm) => {
                self.metrics.took(&self.name, "restored");
                Ok(vm)
            }
            Err(e) => {
                self.metrics.failed(&self.name);
                Err(e)
            }
        }
    }

    async fn restore_one(&self) -> Result<Vm, VmmError> {
        let tap = self.net.create_tap().await?;
        let mut vm = self
            .vmm
            .restore(self.next_id(), &self.snapshot, tap)
            .await?;
        let timeout = self.snapshot.manifest().spec.ready_timeout;
        match ready::wait_ready(self.vmm.as_ref(), &mut vm, timeout).await {
            Ok(()) => Ok(vm),
            Err(e) => Err(crate::vmm::discard(self.vmm.as_ref(), vm, e).await),
        }
    }

    /// Stops refilling and destroys the warm clones (and those still being
    /// restored as they finish), waiting at most `within`.
    pub async fn close(&self, within: Duration) {
        let warm = {
            let mut st = self.lock();
            st.closed = true;
            let warm: Vec<Vm> = st.warm.drain(..).collect();
            self.publish(&st);
            warm
        };
        self.wake.notify_one();
        for vm in warm {
            if let Err(e) = self.vmm.destroy(vm).await {
                error!(runtime = %self.name, "destroying a warm clone: {}", crate::display_chain(&e));
            }
        }
        let deadline = Instant::now() + within;
        while self.lock().restoring > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn publish(&self, st: &Stock) {
        self.metrics
            .set(&self.name, st.warm.len() as i64, st.restoring as i64);
    }
}

/// The refill task: keeps `min_warm` clones restored, with backoff.
async fn refill(rt: Arc<Runtime>) {
    loop {
        let mut dead = Vec::new();
        {
            let mut st = rt.lock();
            if st.closed {
                return;
            }
            let mut i = 0;
            while i < st.warm.len() {
                if st.warm[i].process_mut().exited().is_some() {
                    dead.push(st.warm.remove(i));
                } else {
                    i += 1;
                }
            }
            let now = Instant::now();
            if st.retry_at.is_none_or(|t| t <= now) {
                let need = rt.min_warm.saturating_sub(st.warm.len() + st.restoring);
                for _ in 0..need {
                    st.restoring += 1;
                    tokio::spawn(restore_into_stock(rt.clone()));
                }
            }
            rt.publish(&st);
        }
        for vm in dead {
            warn!(runtime = %rt.name, vm = %vm.id(), "warm clone's VMM exited; replacing it");
            rt.metrics.failed(&rt.name);
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = rt.wake.notified() => {}
        }
    }
}

async fn restore_into_stock(rt: Arc<Runtime>) {
    let started = Instant::now();
    let result = rt.restore_one().await;
    let rejected = {
        let mut st = rt.lock();
        st.restoring -= 1;
        let rejected = match result {
            Ok(vm) if st.closed => Some(vm),
            Ok(vm) => {
                info!(runtime = %rt.name, vm = %vm.id(), timings = %vm.timings(), "runtime clone warm after {:.0} ms", started.elapsed().as_secs_f64() * 1e3);
                st.failures = 0;
                st.retry_at = None;
                st.last_error = None;
                st.warm.push(vm);
                None
            }
            Err(e) => {
                st.failures += 1;
                let wait = crate::pool::backoff(st.failures);
                st.retry_at = Some(Instant::now() + wait);
                let text = crate::display_chain(&e);
                error!(runtime = %rt.name, "restoring a runtime clone failed (next try in {wait:?}): {text}");
                st.last_error = Some(text);
                rt.metrics.failed(&rt.name);
                None
            }
        };
        rt.publish(&st);
        rejected
    };
    if let Some(vm) = rejected {
        // Restored while the stock closed: not wanted any more.
        let id = vm.id().clone();
        if let Err(e) = rt.vmm.destroy(vm).await {
            error!(runtime = %rt.name, vm = %id, "destroying a clone restored while closing: {}", crate::display_chain(&e));
        }
    }
    rt.wake.notify_one();
}

/// Starts instances of one runtime app from its runtime's stock (module
/// doc, step 3).
pub struct RuntimeFactory {
    runtime: Arc<Runtime>,
    code: Arc<CodeSource>,
    start: StartSpec,
}

impl RuntimeFactory {
    /// Instances of the app of `start`, with code from `code`, in `runtime`.
    pub fn new(runtime: Arc<Runtime>, code: CodeSource, start: StartSpec) -> RuntimeFactory {
        RuntimeFactory {
            runtime,
            code: Arc::new(code),
            start,
        }
    }
}

/// The app's code image as it is now (packed off the async workers).
pub async fn current_code(code: &Arc<CodeSource>, app: &str) -> Result<CodeImage, VmmError> {
    let code = code.clone();
    tokio::task::spawn_blocking(move || code.current())
        .await
        .map_err(|e| VmmError::App {
            app: app.to_owned(),
            reason: format!("packing the code: {e}"),
            output: String::new(),
        })?
        .map_err(|e| VmmError::App {
            app: app.to_owned(),
            reason: crate::display_chain(&e),
            output: String::new(),
        })
}

#[async_trait]
impl Factory for RuntimeFactory {
    async fn start(&self, id: VmId) -> Result<Vm, VmmError> {
        let image = current_code(&self.code, &self.start.app).await?;
        let mut vm = self.runtime.take().await?;
        info!(app = %self.start.app, instance = %id, vm = %vm.id(), code = %&image.hash[..16], "starting the app in a runtime clone");
        match start_app(
            self.runtime.vmm.as_ref(),
            &mut vm,
            Some(&image.path),
            &self.start,
        )
        .await
        {
            Ok(()) => Ok(vm),
            // The clone is spent: it may hold half-started app state.
            Err(e) => Err(crate::vmm::discard(self.runtime.vmm.as_ref(), vm, e).await),
        }
    }

    async fn stop(&self, vm: Vm) -> Result<(), VmmError> {
        self.runtime.vmm.destroy(vm).await
    }
}

/// Has the runtime of `vm`, whose guest agent listens on `agent_port`, stop
/// running app code until its next resumed message (the agent's
/// `/freeze`): the last step of a per-app snapshot's template, so that no
/// clone runs any of the app's code (its timers, its callbacks) before it
/// was made its own. Records `freeze`.
pub async fn freeze(vmm: &dyn Vmm, vm: &mut Vm, agent_port: u16) -> Result<(), VmmError> {
    let t = std::time::Instant::now();
    let mut agent = vm.endpoint().clone();
    agent.addr.set_port(agent_port);
    let call = tokio::time::timeout(
        RESUME_TIMEOUT,
        ready::request(&agent, http::Method::POST, "/freeze", Bytes::new()),
    );
    let problem = match watch::guarded(vmm, vm, "freezing the app", call).await? {
        Ok(Ok((200, _))) => {
            vm.record("freeze", t.elapsed());
            return Ok(());
        }
        Ok(Ok((status, body))) => format!(
            "POST /freeze answered HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ),
        Ok(Err(e)) => format!("POST /freeze on {}: {e}", agent.addr),
        Err(_) => format!(
            "POST /freeze on {}: no answer within {}s",
            agent.addr,
            RESUME_TIMEOUT.as_secs()
        ),
    };
    Err(VmmError::Agent {
        vm: vm.id().clone(),
        problem,
    })
}

/// The template step of a per-app snapshot (module doc, last section).
pub struct AppTemplate {
    /// How the app starts.
    pub start: StartSpec,
}

/// The image a per-app snapshot's template boots: the runtime's image with
/// the app's code image as its code disk.
pub fn app_image(runtime: &RuntimeConfig, code: &Path) -> ImageSpec {
    let mut spec = runtime.image.clone();
    spec.code_slot_mib = None;
    spec.disks.push(DiskSpec {
        path: PathBuf::from(code),
    });
    spec
}

#[async_trait]
impl Prepare for AppTemplate {
    async fn prepare(&self, vmm: &dyn Vmm, vm: &mut Vm) -> Result<(), VmmError> {
        // The agent's port, before the VM serves the app's.
        let agent_port = vm.endpoint().addr.port();
        start_app(vmm, vm, None, &self.start).await?;
        vm.set_app_start(self.start.message());
        freeze(vmm, vm, agent_port).await
    }

    fn prepared_spec(&self, boot: &ImageSpec) -> ImageSpec {
        let mut spec = boot.clone();
        spec.guest_port = self.start.port;
        spec.ready_path = self.start.ready_path.clone();
        spec.ready_timeout = self.start.ready_timeout;
        spec.app_start = Some(self.start.message());
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(env: &[(&str, &str)]) -> StartSpec {
        StartSpec {
            app: "a".into(),
            main: "server.js".into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            port: 8080,
            ready_path: "/healthz".into(),
            ready_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_per_app_snapshot_records_how_the_app_was_started() {
        let boot: ImageSpec = serde_yaml_ng::from_str(
            "kernel: /k\ncmdline: x\nguest_port: 8081\ndisks: [{path: /root.img}, {path: /code/1.img}]\n",
        )
        .unwrap();
        let spec = AppTemplate {
            start: start(&[("K", "1")]),
        }
        .prepared_spec(&boot);
        assert_eq!(spec.guest_port, 8080);
        assert_eq!(spec.ready_path, "/healthz");
        assert_eq!(
            spec.app_start.as_deref(),
            Some(r#"{"env":{"K":"1"},"main":"server.js","port":8080}"#)
        );
        // Another env (or main) is another snapshot.
        let other = AppTemplate {
            start: start(&[("K", "2")]),
        }
        .prepared_spec(&boot);
        assert_ne!(spec, other);
        assert_eq!(spec.disks, other.disks);
    }
}

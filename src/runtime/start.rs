//! Starting an app in a runtime clone: the guest agent's protocol
//! (`POST /start`, `/freeze`, `/resumed`) seen from the host.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use super::RuntimeError;
use crate::config::{RuntimeAppConfig, RuntimeConfig};
use crate::vmm::resumed::{Hook, Resumed};
use crate::vmm::{ready, watch, Vm, Vmm, VmmError};

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

    fn fail(&self, reason: String, output: String) -> RuntimeError {
        RuntimeError::App {
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
    let text = crate::vmm::process::read_vm_file(&vm.process().console_path());
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
/// Failures that are the app's ([`RuntimeError::App`]): the agent refusing the
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
) -> Result<(), RuntimeError> {
    if let Some(image) = image {
        let t = std::time::Instant::now();
        let slot = vm.extra_disk().ok_or_else(|| RuntimeError::NoCodeSlot {
            vm: vm.id().clone(),
        })?;
        let (from, to) = (image.to_owned(), slot.clone());
        tokio::task::spawn_blocking(move || copy_into(&from, &to))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| RuntimeError::Attach { path: slot, source })?;
        vm.record("attach", t.elapsed());
    }
    let t = std::time::Instant::now();
    post_start(vmm, vm, start).await?;
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

/// The agent's `POST /start`, bounded by [`START_CALL_TIMEOUT`], and what
/// its answer means (see [`start_app`]).
async fn post_start(vmm: &dyn Vmm, vm: &mut Vm, start: &StartSpec) -> Result<(), RuntimeError> {
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
    let vm_id = vm.id().clone();
    let agent_failed = |problem: String| RuntimeError::Agent { vm: vm_id, problem };
    match answer {
        Ok(Ok((200, _))) => Ok(()),
        // The agent's one refusal that is the app's: its code disk does not
        // mount, or main is not on it. Any other is snapgate's or the VM's.
        Ok(Ok((422, body))) => Err(start.fail(
            format!(
                "the guest agent of {} refused the start (HTTP 422): {}",
                vm.id(),
                String::from_utf8_lossy(&body).trim()
            ),
            app_output(vm),
        )),
        Ok(Ok((status, body))) => Err(agent_failed(format!(
            "POST /start answered HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ))),
        Ok(Err(e)) => {
            // A broken connection is often a VMM on its way out.
            if vm.process_mut().exited_within(EXIT_GRACE).await {
                let err = vm.process_mut().exited_error("starting the app");
                return Err(app_exit(start, vm, err));
            }
            Err(agent_failed(format!("POST /start on {}: {e}", agent.addr)))
        }
        Err(_) => Err(agent_failed(format!(
            "POST /start on {}: no answer within {}s",
            agent.addr,
            START_CALL_TIMEOUT.as_secs()
        ))),
    }
}

/// How long a VMM whose agent broke a connection may take to exit, when
/// its exit explains the break better.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How long the guest agent may take to answer `POST /start`: reseed,
/// clock, flush, mount and hand-over take milliseconds.
const START_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// `err`, unless it says the guest powered itself off (the VMM exited with
/// status 0) after its agent logged that the runtime exited, which the
/// agent does when the runtime ends: then the app exited while starting,
/// and the error is the app's, with its output. (A guest kernel that
/// panics with `panic=-1` also ends its VMM with status 0, and stays the
/// VM's fault.)
fn app_exit(start: &StartSpec, vm: &Vm, err: VmmError) -> RuntimeError {
    let runtime_exited = || {
        crate::vmm::process::read_vm_file(&vm.process().console_path())
            .contains("agent: runtime exited")
    };
    match err {
        VmmError::Exited { status, .. }
            if status.is_some_and(|s| s.success()) && runtime_exited() =>
        {
            start.fail(
                format!(
                    "the app exited while starting in {}; its VM stopped",
                    vm.id()
                ),
                app_output(vm),
            )
        }
        other => other.into(),
    }
}

/// Copies a code image to the start of a slot file, keeping the slot's size.
fn copy_into(image: &Path, slot: &Path) -> std::io::Result<()> {
    let mut from = std::fs::File::open(image)?;
    // The slot is in the VM's run directory, which its jailed VMM can write
    // to: never through a link it put there.
    let mut to = crate::vmm::process::open_vm_file(slot, true)?;
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

/// Has the runtime of `vm`, whose guest agent listens on `agent_port`, stop
/// running app code until its next resumed message (the agent's
/// `/freeze`): the last step of a per-app snapshot's template, so that no
/// clone runs any of the app's code (its timers, its callbacks) before it
/// was made its own. Records `freeze`.
pub async fn freeze(vmm: &dyn Vmm, vm: &mut Vm, agent_port: u16) -> Result<(), RuntimeError> {
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
    Err(RuntimeError::Agent {
        vm: vm.id().clone(),
        problem,
    })
}

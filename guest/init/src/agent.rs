//! The agent of runtime guests: a language runtime loaded before the
//! snapshot, an app started in it after a clone is claimed.
//!
//! Kernel parameters (all set in the runtime's `cmdline` in `proxy.yaml`):
//! `snapgate.agent=<port>` turns the agent on and names its control port;
//! `snapgate.root=<dev>` is the runtime's read-only root disk (default
//! `/dev/vda`); `snapgate.code=<dev>` the code disk (default `/dev/vdb`);
//! `snapgate.exec=<argv, comma-separated>` the runtime command, run inside
//! the root disk.
//!
//! 1. Mounts the root disk read-only at `/rt`, with `/proc`, `/dev` and a
//!    `/tmp` tmpfs inside it, and starts the runtime chrooted there: stdin
//!    `/dev/null`, stdout and stderr the console, and as fd 3 one end of a
//!    Unix stream socket, the runtime's control channel. The fd stays open
//!    in the runtime (no JavaScript can mark it close-on-exec), so
//!    processes an app starts inherit it; they must leave it alone.
//! 2. The control channel carries one line per message.
//!    - runtime -> agent: `loaded` once the runtime is loaded (the agent
//!      reports it healthy from then on); `resumed <token>` and `frozen
//!      <token>` once it has acted on the message of that token.
//!    - agent -> runtime: `{"type":"start","dir":"/app","main":...,
//!      "port":...,"env":{...}}`, once: run the app; `{"type":"freeze",
//!      "token":"<n>"}`: the app's template is about to be snapshotted;
//!      the runtime answers, then stops running app code (JavaScript) until
//!      its next resumed message, so no clone runs any before it; and
//!      `{"type":"resumed","token":"<n>"}` after the agent applied a
//!      resumed message: the runtime drops every generator state it holds
//!      in its own memory (the snapshot froze it; see
//!      guest/node/loader.js), answers, and runs app code again.
//! 3. Control API on the agent port:
//!    - `GET /healthz`: 200 once the runtime is loaded, 503 before. The
//!      runtime's base snapshot is taken after the first 200.
//!    - `POST /freeze`, which snapgate sends to an app's template right
//!      before its snapshot (`snapshot: app`): tells the runtime (step 2)
//!      and waits for its answer. 200 when frozen; 409 when no app was
//!      started; 500 when the runtime cannot be told; 504 when it did not
//!      answer within [`RUNTIME_ANSWER`].
//!    - `POST /resumed` with snapgate's resumed message ([`super::resume`]:
//!      the host's time and 32 bytes of fresh host entropy), which snapgate
//!      sends to every clone of a per-app snapshot as soon as this agent
//!      answers its `/healthz`: reseeds the kernel's generator, sets the
//!      clock, tells the runtime (step 2) and waits for its answer. 200
//!      when all is done; 400 for a bad message; 500 when the kernel
//!      refused or the runtime cannot be told; 503 while the runtime is
//!      loading; 504 when the runtime did not answer within
//!      [`RUNTIME_ANSWER`].
//!    - `POST /start` with `{"main": "server.js", "port": 8080, "env":
//!      {..}, "resumed": {<resumed message>}}`: applies `resumed` first
//!      (the clone's kernel generator and clock are the snapshot's until
//!      then), drops the guest's cached blocks of the code disk (the kernel
//!      read it while it was still the template's empty disk), mounts it
//!      read-only at `/rt/app`, checks that `main` is there, and sends the
//!      start message to the runtime (step 2). 200 when sent; 400 for a bad
//!      message (a missing or malformed `resumed` among them); 409 if an
//!      app was started already; 503 while the runtime is still loading;
//!      500 when the kernel refused the reseed or the clock, the code
//!      disk's cached blocks cannot be dropped or the runtime cannot be
//!      told; 422 with the reason when the disk does not mount or `main` is
//!      missing (the disk is then unmounted again): the one refusal that is
//!      the app's.
//! 4. When the runtime exits, its status goes to the console and the VM is
//!    powered off: the VMM exits and the gateway reports the console
//!    output, which carries the runtime's own error output.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::resume::{self, Resumed};
use super::{cmdline_value, log, serve_with, Request};

/// The control port when `snapgate.agent=` carries no number.
pub const DEFAULT_PORT: u16 = 8081;
/// How long the runtime may take to answer a resumed message.
pub const RUNTIME_ANSWER: Duration = Duration::from_secs(5);
const RT: &str = "/rt";

static LOADED: AtomicBool = AtomicBool::new(false);
/// Held while an app is being started, and `true` once one was.
static STARTED: Mutex<bool> = Mutex::new(false);
/// The agent's end of the control channel, for writing.
static CONTROL: OnceLock<Mutex<UnixStream>> = OnceLock::new();
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
/// Resumed messages sent to the runtime and not yet answered, those
/// answered and not yet taken, and the condition their senders wait on. A
/// sender that gives up forgets its token, and a late answer to it is
/// dropped.
static TOKENS: Mutex<Tokens> = Mutex::new(Tokens {
    pending: Vec::new(),
    answered: Vec::new(),
});
static ANSWER: Condvar = Condvar::new();

struct Tokens {
    pending: Vec<String>,
    answered: Vec<String>,
}

/// Runs the agent; never returns.
pub fn run(port: u16) -> ! {
    if let Err(e) = start_runtime() {
        log(&format!("agent: {e}"));
        power_off();
    }
    serve_with(port, control);
    power_off()
}

fn start_runtime() -> Result<(), String> {
    use command_fds::{CommandFdExt, FdMapping};
    use nix::mount::{mount, MsFlags};
    let none: Option<&str> = None;
    let root = cmdline_value("snapgate.root=").unwrap_or_else(|| "/dev/vda".into());
    let exec =
        cmdline_value("snapgate.exec=").ok_or("no snapgate.exec= on the kernel command line")?;
    let argv: Vec<&str> = exec.split(',').filter(|a| !a.is_empty()).collect();
    std::fs::create_dir_all(RT).map_err(|e| format!("{RT}: {e}"))?;
    mount(
        Some(root.as_str()),
        RT,
        Some("ext4"),
        MsFlags::MS_RDONLY,
        none,
    )
    .map_err(|e| format!("mount {root} on {RT}: {e}"))?;
    for (src, dst, fs) in [
        ("proc", "/rt/proc", "proc"),
        ("devtmpfs", "/rt/dev", "devtmpfs"),
        ("tmpfs", "/rt/tmp", "tmpfs"),
    ] {
        mount(Some(src), dst, Some(fs), MsFlags::empty(), none)
            .map_err(|e| format!("mount {dst}: {e}"))?;
    }
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("control socket: {e}"))?;
    // busybox chroot: std's Command has no safe chroot.
    let mut cmd = Command::new(super::BUSYBOX);
    cmd.arg("chroot")
        .arg(RT)
        .args(&argv)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env("NODE_ENV", "production")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: theirs.into(),
        child_fd: 3,
    }])
    .map_err(|e| format!("control socket as fd 3: {e}"))?;
    let mut child = cmd.spawn().map_err(|e| format!("starting {argv:?}: {e}"))?;
    // The child has its end; ours of it closed when `cmd` let go of it.
    drop(cmd);
    log(&format!("agent: runtime {argv:?} is pid {}", child.id()));
    let reader = ours
        .try_clone()
        .map_err(|e| format!("control socket: {e}"))?;
    let _ = CONTROL.set(Mutex::new(ours));
    std::thread::spawn(move || read_control(reader));
    std::thread::spawn(move || {
        let status = match child.wait() {
            Ok(status) => status.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        log(&format!("agent: runtime exited ({status}); powering off"));
        power_off();
    });
    Ok(())
}

/// Reads what the runtime says on the control channel (module doc, step 2).
fn read_control(stream: UnixStream) {
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    while lines.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let said = line.trim_end();
        if said == "loaded" {
            if !LOADED.swap(true, Ordering::SeqCst) {
                log("agent: runtime loaded");
            }
        } else if let Some(token) = said
            .strip_prefix("resumed ")
            .or_else(|| said.strip_prefix("frozen "))
        {
            let mut tokens = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
            if tokens.pending.iter().any(|t| t == token) {
                tokens.answered.push(token.to_owned());
                ANSWER.notify_all();
            } else {
                log(&format!("agent: a late or unknown resumed answer: {token}"));
            }
        } else {
            log(&format!(
                "agent: the runtime said something unknown: {said:?}"
            ));
        }
        line.clear();
    }
}

/// Sends one line to the runtime.
fn tell_runtime(message: &serde_json::Value) -> Result<(), String> {
    let control = CONTROL.get().ok_or("runtime not started")?;
    let mut stream = control.lock().unwrap_or_else(|p| p.into_inner());
    let mut line = message.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("writing to the runtime's control channel: {e}"))
}

/// Sends the runtime a message of `kind` (`resumed`, `freeze`) and waits
/// for its answer (module doc, step 2).
fn ask_runtime(kind: &str) -> Result<(), (&'static str, String)> {
    let token = NEXT_TOKEN.fetch_add(1, Ordering::SeqCst).to_string();
    let forget = |tokens: &mut Tokens| {
        tokens.pending.retain(|t| *t != token);
        tokens.answered.retain(|t| *t != token);
    };
    TOKENS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pending
        .push(token.clone());
    if let Err(e) = tell_runtime(&serde_json::json!({ "type": kind, "token": token })) {
        forget(&mut TOKENS.lock().unwrap_or_else(|p| p.into_inner()));
        return Err(("500 Internal Server Error", e));
    }
    let deadline = Instant::now() + RUNTIME_ANSWER;
    let mut tokens = TOKENS.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if tokens.answered.contains(&token) {
            forget(&mut tokens);
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            forget(&mut tokens);
            return Err((
                "504 Gateway Timeout",
                format!(
                    "the runtime did not answer the {kind} message within {}s",
                    RUNTIME_ANSWER.as_secs()
                ),
            ));
        }
        tokens = ANSWER
            .wait_timeout(tokens, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

// BLKFLSBUF from <linux/fs.h>: _IO(0x12, 97).
nix::ioctl_none!(blkflsbuf, 0x12, 97);

/// Drops the kernel's cached blocks of `dev` (BLKFLSBUF), so the next read
/// goes to the disk: the slot's content changed under the guest since the
/// kernel last read it. Done here rather than with `blockdev --flushbufs`
/// to spare a process start on every claim.
fn flush_cached_blocks(dev: &str) -> Result<(), String> {
    let file = std::fs::File::open(dev).map_err(|e| format!("open: {e}"))?;
    // SAFETY: BLKFLSBUF takes no argument and touches no user memory; the
    // descriptor is valid for the duration of the call.
    unsafe { blkflsbuf(std::os::fd::AsRawFd::as_raw_fd(&file)) }
        .map(drop)
        .map_err(|e| format!("BLKFLSBUF: {e}"))
}

fn power_off() -> ! {
    use nix::sys::reboot::{reboot, RebootMode};
    // Everything written to the console reaches the VMM before it stops.
    let _ = nix::sys::termios::tcdrain(std::io::stderr());
    nix::unistd::sync();
    // Does not return: QEMU (microvm's ACPI GED, pc's ACPI) and Cloud
    // Hypervisor end the VM; the VMM process exits with status 0.
    let err = reboot(RebootMode::RB_POWER_OFF).unwrap_err();
    log(&format!("agent: power-off failed: {err}"));
    loop {
        std::thread::park();
    }
}

type Answer = Result<String, (&'static str, String)>;

fn control(req: &Request, _peer: &str) -> (String, Vec<u8>) {
    let answer: Answer = match (req.method(), req.path()) {
        ("GET", "/healthz") if LOADED.load(Ordering::SeqCst) => Ok("loaded\n".into()),
        ("GET", "/healthz") => Err(("503 Service Unavailable", "runtime loading".into())),
        ("POST", "/start") => start_app(&req.body),
        ("POST", "/resumed") => resumed(&req.body),
        ("POST", "/freeze") => freeze(),
        _ => Err(("404 Not Found", "not found".into())),
    };
    match answer {
        Ok(msg) => ("200 OK".into(), msg.into_bytes()),
        Err((status, msg)) => {
            if !status.starts_with("503") && !status.starts_with("404") {
                log(&format!("agent: {} refused: {msg}", req.path()));
            }
            (status.into(), format!("{msg}\n").into_bytes())
        }
    }
}

const BAD: &str = "400 Bad Request";
const FAILED: &str = "500 Internal Server Error";

/// Applies a resumed message to the kernel (generator, clock).
fn apply_resumed(msg: &serde_json::Value) -> Result<(), (&'static str, String)> {
    let resumed = Resumed::from_json(msg).map_err(|e| (BAD, e))?;
    resume::apply(&resumed).map_err(|e| (FAILED, e))
}

/// `POST /resumed`.
fn resumed(body: &[u8]) -> Answer {
    let msg: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| (BAD, format!("resumed message: {e}")))?;
    if !LOADED.load(Ordering::SeqCst) {
        return Err(("503 Service Unavailable", "runtime still loading".into()));
    }
    apply_resumed(&msg)?;
    ask_runtime("resumed")?;
    Ok("resumed\n".into())
}

/// `POST /freeze`.
fn freeze() -> Answer {
    if !*STARTED.lock().unwrap_or_else(|p| p.into_inner()) {
        return Err((
            "409 Conflict",
            "no app was started: nothing to freeze".into(),
        ));
    }
    ask_runtime("freeze")?;
    Ok("frozen\n".into())
}

const UNUSABLE: &str = "422 Unprocessable Entity";

/// `POST /start`.
fn start_app(body: &[u8]) -> Answer {
    let msg: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| (BAD, format!("start message: {e}")))?;
    let main = msg["main"]
        .as_str()
        .filter(|m| !m.is_empty() && !m.starts_with('/') && !m.split('/').any(|c| c == ".."))
        .ok_or((
            BAD,
            "start message: \"main\" must be a relative path inside the code disk".to_string(),
        ))?
        .to_owned();
    if !msg["port"].is_u64() {
        return Err((BAD, "start message: \"port\" must be a number".into()));
    }
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    if *started {
        return Err((
            "409 Conflict",
            "an app was already started in this instance".into(),
        ));
    }
    if !LOADED.load(Ordering::SeqCst) {
        return Err(("503 Service Unavailable", "runtime still loading".into()));
    }
    // First of all: until now this clone's generator and clock are the
    // snapshot's, the same in every clone. No start without it.
    if msg["resumed"].is_null() {
        return Err((
            BAD,
            "start message: \"resumed\" is missing: an app never starts in a clone that \
             was not made its own"
                .into(),
        ));
    }
    apply_resumed(&msg["resumed"])?;
    mount_code(&main)?;
    let start = serde_json::json!({
        "type": "start",
        "dir": "/app",
        "main": main,
        "port": msg["port"],
        "env": msg["env"],
    });
    tell_runtime(&start).map_err(|e| (FAILED, format!("handing over the start: {e}")))?;
    *started = true;
    log(&format!("agent: started {main}"));
    Ok(format!("started {main}\n"))
}

/// Mounts the code disk on `/rt/app` (its cached blocks dropped first)
/// and checks that `main` is a file on it; 422 when the disk is not one
/// snapgate packed or `main` is missing.
fn mount_code(main: &str) -> Result<(), (&'static str, String)> {
    use nix::mount::{mount, MsFlags};
    let code = cmdline_value("snapgate.code=").unwrap_or_else(|| "/dev/vdb".into());
    flush_cached_blocks(&code).map_err(|e| (FAILED, format!("code disk {code}: {e}")))?;
    let none: Option<&str> = None;
    mount(
        Some(code.as_str()),
        "/rt/app",
        Some("ext4"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        none,
    )
    .map_err(|e| {
        (
            UNUSABLE,
            format!(
                "code disk {code} does not mount as ext4 ({e}); is it an image snapgate packed?"
            ),
        )
    })?;
    if !std::path::Path::new("/rt/app").join(main).is_file() {
        let mut found: Vec<String> = std::fs::read_dir("/rt/app")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lost+found")
            .collect();
        found.sort();
        let _ = nix::mount::umount("/rt/app");
        return Err((
            UNUSABLE,
            format!(
                "main {main:?} is not a file on the code disk (top level: {})",
                found.join(", ")
            ),
        ));
    }
    Ok(())
}

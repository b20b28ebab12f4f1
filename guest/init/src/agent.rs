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
//!    `/tmp` tmpfs inside it, and starts the runtime chrooted there: stdin a
//!    pipe, stdout a pipe read here, stderr the console.
//! 2. The runtime's first stdout line, `snapgate-loader: loaded`, marks it
//!    loaded; later lines are copied to the console.
//! 3. Control API on the agent port:
//!    - `GET /healthz`: 200 once the runtime is loaded, 503 before. The
//!      runtime's base snapshot is taken after the first 200.
//!    - `POST /start` with `{"main": "server.js", "port": 8080, "env": {..},
//!      "now_ms": <host time, ms since the epoch>}`: sets the clock (a
//!      clone's clock resumed from the snapshot's moment), drops the guest's
//!      cached blocks of the code disk (the kernel read
//!      it while it was still the template's empty disk), mounts it
//!      read-only at `/rt/app`, checks that `main` is there, and hands the
//!      message (plus `"dir": "/app"`) to the runtime on its stdin. 200 when
//!      handed over; 400 for a bad message; 409 if an app was started
//!      already; 503 while the runtime is still loading; 422 with the reason
//!      when the disk does not mount or `main` is missing (the disk is then
//!      unmounted again).
//!    - `POST /clock` with `{"now_ms": ...}`: sets the clock; snapgate sends
//!      it to clones of a per-app snapshot, which get no start message.
//! 4. When the runtime exits, its status goes to the console and the VM is
//!    powered off: the VMM exits and the gateway reports the console
//!    output, which carries the runtime's own error output.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use super::{cmdline_value, log, serve_with, Request};

/// The control port when `snapgate.agent=` carries no number.
pub const DEFAULT_PORT: u16 = 8081;
const RT: &str = "/rt";

static LOADED: AtomicBool = AtomicBool::new(false);
static STDIN: OnceLock<Mutex<Option<ChildStdin>>> = OnceLock::new();

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
    // busybox chroot: std's Command has no safe chroot.
    let mut child = Command::new(super::BUSYBOX)
        .arg("chroot")
        .arg(RT)
        .args(&argv)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env("NODE_ENV", "production")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {argv:?}: {e}"))?;
    log(&format!("agent: runtime {argv:?} is pid {}", child.id()));
    let _ = STDIN.set(Mutex::new(child.stdin.take()));
    let stdout = child.stdout.take().expect("piped");
    let (copied, copied_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _copied = copied;
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        while lines.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            if !LOADED.load(Ordering::SeqCst) && line.trim_end() == "snapgate-loader: loaded" {
                LOADED.store(true, Ordering::SeqCst);
                log("agent: runtime loaded");
            } else {
                eprint!("{line}");
            }
            line.clear();
        }
    });
    std::thread::spawn(move || {
        let status = match child.wait() {
            Ok(status) => status.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        // The runtime's last stdout lines first (the copier ends at the
        // pipe's end; a child the runtime left holding it gets 2 s).
        let _ = copied_rx.recv_timeout(std::time::Duration::from_secs(2));
        log(&format!("agent: runtime exited ({status}); powering off"));
        power_off();
    });
    Ok(())
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

fn control(req: &Request, _peer: &str) -> (String, Vec<u8>) {
    match (req.method(), req.path()) {
        ("GET", "/healthz") if LOADED.load(Ordering::SeqCst) => {
            ("200 OK".into(), b"loaded\n".to_vec())
        }
        ("GET", "/healthz") => (
            "503 Service Unavailable".into(),
            b"runtime loading\n".to_vec(),
        ),
        ("POST", "/start") => match start_app(&req.body) {
            Ok(msg) => ("200 OK".into(), msg.into_bytes()),
            Err((status, msg)) => {
                log(&format!("agent: start refused: {msg}"));
                (status.into(), format!("{msg}\n").into_bytes())
            }
        },
        ("POST", "/clock") => match clock(&req.body) {
            Ok(msg) => ("200 OK".into(), msg.into_bytes()),
            Err((status, msg)) => (status.into(), format!("{msg}\n").into_bytes()),
        },
        _ => ("404 Not Found".into(), b"not found\n".to_vec()),
    }
}

fn set_clock(ms: u64) -> Result<(), String> {
    let now = nix::sys::time::TimeSpec::new((ms / 1000) as i64, ((ms % 1000) * 1_000_000) as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
        .map_err(|e| format!("setting the clock: {e}"))
}

/// `POST /clock` with `{"now_ms": ...}`.
fn clock(body: &[u8]) -> Result<String, (&'static str, String)> {
    let msg: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ("400 Bad Request", format!("clock message: {e}")))?;
    let ms = msg["now_ms"].as_u64().ok_or((
        "400 Bad Request",
        "clock message: \"now_ms\" must be a number".to_string(),
    ))?;
    set_clock(ms).map_err(|e| ("500 Internal Server Error", e))?;
    Ok("clock set\n".into())
}

fn start_app(body: &[u8]) -> Result<String, (&'static str, String)> {
    use nix::mount::{mount, MsFlags};
    const BAD: &str = "400 Bad Request";
    const UNUSABLE: &str = "422 Unprocessable Entity";
    let mut msg: serde_json::Value =
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
    let stdin = STDIN
        .get()
        .ok_or((UNUSABLE, "runtime not started".to_string()))?;
    let mut stdin = stdin.lock().unwrap_or_else(|p| p.into_inner());
    let Some(pipe) = stdin.as_mut() else {
        return Err((
            "409 Conflict",
            "an app was already started in this instance".into(),
        ));
    };
    if !LOADED.load(Ordering::SeqCst) {
        return Err(("503 Service Unavailable", "runtime still loading".into()));
    }
    let code = cmdline_value("snapgate.code=").unwrap_or_else(|| "/dev/vdb".into());
    flush_cached_blocks(&code).map_err(|e| (UNUSABLE, format!("code disk {code}: {e}")))?;
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
    if !std::path::Path::new("/rt/app").join(&main).is_file() {
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
    // A clone's clock resumed from the snapshot's moment: set it to the
    // host's before the app reads it (logs, Date headers, TLS validity).
    if let Some(ms) = msg["now_ms"].as_u64() {
        let now =
            nix::sys::time::TimeSpec::new((ms / 1000) as i64, ((ms % 1000) * 1_000_000) as i64);
        if let Err(e) = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now) {
            log(&format!("agent: setting the clock: {e}"));
        }
    }
    msg["dir"] = "/app".into();
    let mut line = msg.to_string();
    line.push('\n');
    pipe.write_all(line.as_bytes()).map_err(|e| {
        (
            UNUSABLE,
            format!("handing the start message to the runtime: {e}"),
        )
    })?;
    // Taken: a second start is refused.
    *stdin = None;
    log(&format!("agent: started {main}"));
    Ok(format!("started {main}\n"))
}

//! PID 1 of the snapgate guests: the test guest, and the agent of runtime
//! guests (see [`agent`]; it runs instead of step 4 when the kernel command
//! line has `snapgate.agent=<port>`).
//!
//! 1. Mounts /proc, /sys and /dev.
//! 2. Loads the kernel modules listed, in order, in `/etc/modules` (virtio
//!    transport, net, blk, rng: the Debian cloud kernel builds them as modules).
//! 3. Configures `eth0` from the kernel's documented `ip=` parameter
//!    (`ip=<client>::<gw>:<netmask>::<device>:off`). The kernel cannot apply it
//!    itself because virtio_net is a module, so this program does, with the
//!    busybox `ip` applet.
//! 4. Serves HTTP/1.1 on `snapgate.port=` (default 8080):
//!    - `GET /healthz` answers `ok` and touches nothing else, so readiness
//!      probes on a template leave no per-instance state behind;
//!    - `POST /snapgate/resumed` takes snapgate's resumed message (see
//!      [`resume`]; configure it as the image's `on_restore` path): reseeds
//!      the kernel's generator with the host's entropy and sets the clock;
//!    - `/status/<code>` answers with that status (a guest that fails a call);
//!    - any other request answers with the instance identity, the boot id,
//!      what the instance drew from the kernel's generator and read from
//!      its clock at its first request (and whether its kernel had logged a
//!      reseed for a VM generation ID change by then), its request count,
//!      the resumed messages it got (with what the kernel's generator gave
//!      just before the first was applied, and the clock just after), the
//!      client's address and port (one per connection), the request line,
//!      every header and, for requests with a body, the body;
//!    - `/sleep/<ms>` does the same after `<ms>` milliseconds;
//!    - `/connect/<ipv4>:<port>` tries a TCP connection from the guest
//!      (2 s limit) and answers `connected`, `refused`, `unreachable`,
//!      `timed out` or `error: <reason>`, so tests can see what a guest
//!      can reach;
//!    - `/touch/<mib>` allocates `<mib>` MiB and writes to every page of
//!      it, then answers `touched <mib> MiB` (a guest that uses memory).
//!
//! The instance identity is minted on the first non-probe request from the
//! virtio-rng device, i.e. from host entropy read after the VM was restored.
//! Clones of one snapshot share all guest memory, including the kernel's RNG
//! state and boot id, so only the host can tell them apart (or the resumed
//! message, which reseeds the kernel's generator).
//!
//! For tests of guests that stop without their VMM exiting, as OSv does
//! after a fatal error: `snapgate.halt=boot` halts the CPU right after
//! step 3; `snapgate.halt=restore` halts when a resumed message arrives
//! (what only a clone gets), before it answers. Either prints a `fatal:`
//! line on the console first.

mod agent;
mod resume;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const BUSYBOX: &str = "/bin/busybox";

fn main() {
    if let Err(e) = setup() {
        log(&format!("setup failed: {e}"));
    }
    if cmdline_value("snapgate.halt=").as_deref() == Some("boot") {
        halt("snapgate.halt=boot asks this guest to stop at boot");
    }
    if let Some(port) = cmdline_value("snapgate.agent=") {
        let port = port.parse::<u16>().unwrap_or(agent::DEFAULT_PORT);
        agent::run(port);
    }
    let port = cmdline_value("snapgate.port=")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(8080);
    serve_with(port, echo);
}

fn log(msg: &str) {
    // The serial console is the only log a guest has.
    eprintln!("snapgate-guest: {msg}");
}

/// Stops the guest as a fatal error would, without ending the VM: prints
/// `fatal: <why>` on the console and halts the CPU (`reboot(2)` with
/// RB_HALT_SYSTEM: the kernel stops every CPU with interrupts off, and the
/// VMM process runs on).
fn halt(why: &str) -> ! {
    log(&format!("fatal: {why}; halting"));
    let _ = nix::sys::termios::tcdrain(std::io::stderr());
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_HALT_SYSTEM).unwrap_err();
    log(&format!("halt failed: {err}"));
    loop {
        std::thread::park();
    }
}

fn setup() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let none: Option<&str> = None;
    for (src, dst, fs) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = std::fs::create_dir_all(dst);
        mount(Some(src), dst, Some(fs), MsFlags::empty(), none)
            .map_err(|e| format!("mount {dst}: {e}"))?;
    }
    load_modules()?;
    configure_network()
}

fn load_modules() -> Result<(), String> {
    use nix::kmod::{finit_module, ModuleInitFlags};
    let list = std::fs::read_to_string("/etc/modules").map_err(|e| format!("/etc/modules: {e}"))?;
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/{name}.ko");
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        match finit_module(&file, c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("loading {name}: {e}")),
        }
    }
    Ok(())
}

fn cmdline_value(key: &str) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .map(str::to_owned)
}

fn busybox(args: &[&str]) -> Result<(), String> {
    let status = Command::new(BUSYBOX)
        .args(args)
        .status()
        .map_err(|e| format!("busybox {args:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("busybox {args:?}: {status}"))
    }
}

fn prefix_len(mask: &str) -> Result<u32, String> {
    let addr: std::net::Ipv4Addr = mask.parse().map_err(|_| format!("bad netmask {mask}"))?;
    Ok(u32::from(addr).count_ones())
}

fn configure_network() -> Result<(), String> {
    busybox(&["ip", "link", "set", "lo", "up"])?;
    let Some(ip) = cmdline_value("ip=") else {
        return Err("no ip= on the kernel command line".into());
    };
    // ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>
    let f: Vec<&str> = ip.split(':').collect();
    let field = |i: usize| f.get(i).copied().unwrap_or("");
    let (client, gw, mask) = (field(0), field(2), field(3));
    let dev = if field(5).is_empty() {
        "eth0"
    } else {
        field(5)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&format!("/sys/class/net/{dev}")).exists() {
        if Instant::now() > deadline {
            return Err(format!("{dev} did not appear"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let cidr = format!("{client}/{}", prefix_len(mask)?);
    busybox(&["ip", "addr", "add", &cidr, "dev", dev])?;
    busybox(&["ip", "link", "set", dev, "up"])?;
    if !gw.is_empty() {
        busybox(&["ip", "route", "add", "default", "via", gw])?;
    }
    log(&format!("{dev} is {cidr} via {gw}"));
    Ok(())
}

fn identity() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        // The virtio-rng driver keeps a prefetched buffer (64 bytes), which a
        // snapshot captures: every clone would read the same first bytes.
        // Reading past it (128 bytes) pulls fresh bytes from the host; all is
        // folded into the id.
        let mut buf = [0u8; 128];
        let read = std::fs::File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut buf));
        if read.is_err() {
            // No virtio-rng: fall back to the kernel RNG (shared by clones).
            let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
        }
        let mut id = [0u8; 8];
        for (i, b) in buf.iter().enumerate() {
            id[i % 8] = id[i % 8].rotate_left(3) ^ b;
        }
        id.iter().map(|b| format!("{b:02x}")).collect()
    })
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// One parsed HTTP/1.1 request.
pub struct Request {
    /// The request line, e.g. `GET / HTTP/1.1`.
    pub line: String,
    /// Headers as `name: value`, names lower-cased.
    pub headers: Vec<String>,
    /// The body (sized by Content-Length).
    pub body: Vec<u8>,
    /// Whether the client asked to close the connection after this one.
    pub close: bool,
}

impl Request {
    /// The request target.
    pub fn path(&self) -> &str {
        self.line.split_whitespace().nth(1).unwrap_or("/")
    }

    /// The method.
    pub fn method(&self) -> &str {
        self.line.split_whitespace().next().unwrap_or("")
    }
}

/// Reads one request; `None` when the client closed the connection.
pub fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let line = line.trim_end().to_owned();
    let mut headers = Vec::new();
    let mut content_length = 0usize;
    let mut close = line.ends_with("HTTP/1.0");
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                content_length = value.parse().unwrap_or(0);
            }
            if name == "connection" && value.eq_ignore_ascii_case("close") {
                close = true;
            }
            headers.push(format!("{name}: {value}"));
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    Ok(Some(Request {
        line,
        headers,
        body,
        close,
    }))
}

/// Writes one response with a text body.
pub fn write_response(
    out: &mut impl Write,
    status: &str,
    payload: &[u8],
    close: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
        payload.len(),
        if close { "connection: close\r\n" } else { "" }
    );
    // One write: with a separate write for the body, Nagle's algorithm
    // would wait for the client's delayed ACK (~40 ms) before sending it.
    let mut message = head.into_bytes();
    message.extend_from_slice(payload);
    out.write_all(&message)
}

/// Serves connections on `port`, each on its own thread, with `handler`.
fn serve_with(port: u16, handler: fn(&Request, &str) -> (String, Vec<u8>)) {
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            log(&format!("bind :{port}: {e}"));
            loop {
                std::thread::park();
            }
        }
    };
    log(&format!("listening on :{port}"));
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = connection(stream, handler);
        });
    }
}

/// One connection: HTTP/1.1 with keep-alive.
fn connection(
    stream: TcpStream,
    handler: fn(&Request, &str) -> (String, Vec<u8>),
) -> std::io::Result<()> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    while let Some(req) = read_request(&mut reader)? {
        let (status, payload) = handler(&req, &peer);
        write_response(&mut out, &status, &payload, req.close)?;
        if req.close {
            return Ok(());
        }
    }
    Ok(())
}

/// Non-probe requests served, this one included.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// What the instance drew and read at its first non-probe request.
struct First {
    random: String,
    now_ms: u64,
    /// Whether the kernel had logged a reseed for a new VM generation ID.
    vmfork: bool,
}

/// The resumed messages this instance took.
#[derive(Default)]
struct ResumedLog {
    calls: u64,
    /// Non-probe requests served before the first message.
    requests_before: u64,
    /// What getrandom(2) gave right before the first message was applied.
    before: String,
    now_ms: u64,
    /// The guest's clock right after the last message set it.
    set_at: u64,
    entropy: String,
}

static RESUMED: Mutex<Option<ResumedLog>> = Mutex::new(None);

fn first() -> &'static First {
    static FIRST: OnceLock<First> = OnceLock::new();
    FIRST.get_or_init(|| First {
        // getrandom(2): the kernel's generator, as an app would use it.
        random: draw(),
        now_ms: resume::now_ms(),
        vmfork: kernel_logged("crng reseeded due to virtual machine fork"),
    })
}

/// What getrandom(2) gives now, hex.
fn draw() -> String {
    let mut buf = [0u8; 16];
    match getrandom::fill(&mut buf) {
        Ok(()) => hex::encode(buf),
        Err(e) => format!("(getrandom failed: {e})"),
    }
}

/// Whether the kernel's log holds a line containing `needle` (read from
/// /dev/kmsg, one record per read, until no more are ready).
fn kernel_logged(needle: &str) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return false;
    };
    let mut record = [0u8; 8192];
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => return false,
            Ok(n) if String::from_utf8_lossy(&record[..n]).contains(needle) => return true,
            Ok(_) => {}
            // EPIPE: records were overwritten while reading; read on.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {}
            Err(_) => return false,
        }
    }
}

/// `POST /snapgate/resumed`.
fn resumed(req: &Request) -> (String, Vec<u8>) {
    if cmdline_value("snapgate.halt=").as_deref() == Some("restore") {
        halt("snapgate.halt=restore asks this guest to stop once restored");
    }
    let msg = serde_json::from_slice::<serde_json::Value>(&req.body)
        .map_err(|e| format!("resumed message: {e}"))
        .and_then(|v| resume::Resumed::from_json(&v));
    let msg = match msg {
        Ok(m) => m,
        Err(e) => return ("400 Bad Request".into(), format!("{e}\n").into_bytes()),
    };
    let mut record = RESUMED.lock().unwrap_or_else(|p| p.into_inner());
    let before = draw();
    if let Err(e) = resume::apply(&msg) {
        log(&format!("resumed: {e}"));
        return (
            "500 Internal Server Error".into(),
            format!("{e}\n").into_bytes(),
        );
    }
    let entry = record.get_or_insert_with(|| ResumedLog {
        requests_before: REQUESTS.load(Ordering::SeqCst),
        before,
        ..ResumedLog::default()
    });
    entry.calls += 1;
    entry.now_ms = msg.now_ms;
    entry.set_at = resume::now_ms();
    entry.entropy = hex::encode(&msg.entropy);
    ("200 OK".into(), b"resumed\n".to_vec())
}

/// One TCP connection attempt from the guest to `target` (`<ipv4>:<port>`),
/// as a word: what a guest can reach (see the crate doc).
fn connect(target: &str) -> String {
    let Ok(addr) = target.parse::<std::net::SocketAddr>() else {
        return format!("error: {target:?} is not <ipv4>:<port>");
    };
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => "connected".into(),
        Err(e) => match e.raw_os_error() {
            Some(nix::libc::ECONNREFUSED) => "refused".into(),
            Some(nix::libc::EHOSTUNREACH | nix::libc::ENETUNREACH) => "unreachable".into(),
            _ if e.kind() == std::io::ErrorKind::TimedOut => "timed out".into(),
            _ => format!("error: {e}"),
        },
    }
}

/// The test guest's own answers (see the crate doc).
fn echo(req: &Request, peer: &str) -> (String, Vec<u8>) {
    let path = req.path();
    if path == "/healthz" {
        return ("200 OK".into(), b"ok\n".to_vec());
    }
    if req.method() == "POST" && path == "/snapgate/resumed" {
        return resumed(req);
    }
    if let Some(target) = path.strip_prefix("/connect/") {
        return (
            "200 OK".into(),
            format!("{}\n", connect(target)).into_bytes(),
        );
    }
    if let Some(mib) = path
        .strip_prefix("/touch/")
        .and_then(|m| m.parse::<usize>().ok())
    {
        let mut pages = vec![0u8; mib << 20];
        for i in (0..pages.len()).step_by(4096) {
            pages[i] = 1;
        }
        let touched = pages.iter().step_by(4096).filter(|&&b| b == 1).count();
        return (
            "200 OK".into(),
            format!("touched {} MiB\n", touched / 256).into_bytes(),
        );
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
    {
        return (
            format!("{code} As Asked"),
            format!("status {code}\n").into_bytes(),
        );
    }
    // Read when the request arrives, before any sleep.
    let served = REQUESTS.fetch_add(1, Ordering::SeqCst) + 1;
    let first = first();
    let resumed = match &*RESUMED.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(r) => format!(
            "calls={} requests_before={} before={} now_ms={} set_at={} entropy={}",
            r.calls, r.requests_before, r.before, r.now_ms, r.set_at, r.entropy
        ),
        None => "calls=0".into(),
    };
    if let Some(ms) = path
        .strip_prefix("/sleep/")
        .and_then(|m| m.parse::<u64>().ok())
    {
        // Holds the request, so tests can keep an instance busy.
        std::thread::sleep(Duration::from_millis(ms));
    }
    let mut payload = Vec::new();
    payload.extend_from_slice(format!("instance: {}\n", identity()).as_bytes());
    payload.extend_from_slice(format!("boot_id: {}\n", boot_id()).as_bytes());
    payload.extend_from_slice(
        format!(
            "first: random={} now_ms={} vmfork={}\n",
            first.random, first.now_ms, first.vmfork
        )
        .as_bytes(),
    );
    payload.extend_from_slice(format!("requests: {served}\n").as_bytes());
    payload.extend_from_slice(format!("now_ms: {}\n", resume::now_ms()).as_bytes());
    payload.extend_from_slice(format!("resumed: {resumed}\n").as_bytes());
    payload.extend_from_slice(format!("peer: {peer}\n").as_bytes());
    payload.extend_from_slice(format!("request: {}\n", req.line).as_bytes());
    for h in &req.headers {
        payload.extend_from_slice(format!("header: {h}\n").as_bytes());
    }
    if !req.body.is_empty() {
        payload.extend_from_slice(format!("body: {} bytes\n", req.body.len()).as_bytes());
        payload.extend_from_slice(&req.body);
    }
    ("200 OK".into(), payload)
}

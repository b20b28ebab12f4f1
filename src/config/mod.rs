//! `proxy.yaml`: serde structs (unknown keys rejected) -> validation -> typed
//! values. Relative paths in the file are resolved against the file's own
//! directory, so a config works from any working directory.
//!
//! Errors name the key path (`apps.hello.image.kernel`) and, for syntax and
//! type errors, the line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod cluster;
mod validate;

pub use cluster::{ClusterConfig, EtcdConfig, EtcdTls, MIN_SECRET_LEN};

pub use validate::check_host_pattern;

use crate::net::NetParams;
use crate::vmm::jail::JailParams;
use crate::vmm::spec::{Accel, MemoryRestoreMode};
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
    /// How VMM processes are confined (`crate::vmm::jail`): every part on
    /// unless turned off here.
    #[serde(default)]
    pub jail: JailParams,
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
            jail: JailParams::default(),
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

fn default_min_warm() -> usize {
    0
}
fn default_max_instances() -> usize {
    4
}
fn default_max_concurrency() -> usize {
    16
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
/// The default `hold_queue`: a burst of a thousand requests onto an app
/// at zero is held, not refused. A held request costs what its client
/// connection does (about 25 KiB, BENCHMARKS.md), so a full queue is tens
/// of MiB.
fn default_hold_queue() -> usize {
    1000
}
fn default_hold_timeout() -> Duration {
    Duration::from_secs(10)
}
/// The default `start_timeout`: a restore takes well under a second on
/// KVM and a few seconds under TCG; a runtime app's start adds its own
/// `ready_timeout` (10 s by default).
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
fn default_start_timeout() -> Duration {
    DEFAULT_START_TIMEOUT
}

/// How an app's VMs are pooled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Instances kept restored and idle, ready for a request; 0 scales to zero.
    #[serde(default = "default_min_warm")]
    pub min_warm: usize,
    /// Most instances (running or being restored) at once.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// Most requests one instance serves at once.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// An instance with no request for this long (from its last completion)
    /// is destroyed, down to `min_warm`.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most requests held while no instance is free; more get 503.
    #[serde(default = "default_hold_queue")]
    pub hold_queue: usize,
    /// Longest a request is held; then it gets 503.
    #[serde(default = "default_hold_timeout", with = "humantime_serde")]
    pub hold_timeout: Duration,
    /// Longest one instance start may take, everything included (restore,
    /// readiness, resumed message, a runtime app's start); a start still
    /// running then is abandoned (its VM destroyed) and counts as a failed
    /// start. Default 60 s.
    #[serde(default = "default_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_warm: default_min_warm(),
            max_instances: default_max_instances(),
            max_concurrency: default_max_concurrency(),
            idle_timeout: default_idle_timeout(),
            hold_queue: default_hold_queue(),
            hold_timeout: default_hold_timeout(),
            start_timeout: default_start_timeout(),
        }
    }
}

fn default_code_disk_mib() -> u32 {
    64
}
fn default_app_port() -> u16 {
    8080
}

/// A language runtime shared by many apps: its VMs boot, load the runtime
/// and wait; their snapshot is the base every app of the runtime starts
/// from (see [`crate::runtime`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// What the runtime's VMs boot. `guest_port` is the guest agent's port
    /// and `ready_path` its health path (200 once the runtime is loaded).
    pub image: ImageSpec,
    /// Size of the code disk each instance has: the largest app code image
    /// this runtime takes.
    #[serde(default = "default_code_disk_mib")]
    pub code_disk_mib: u32,
    /// The port apps serve on (they are told it in `PORT`).
    #[serde(default = "default_app_port")]
    pub app_port: u16,
    /// Runtime clones kept restored and waiting, for any app of this runtime
    /// to take (each app's own `pool.min_warm` keeps started instances).
    #[serde(default)]
    pub min_warm: usize,
    /// Longest one clone's restore may take, readiness included; a restore
    /// still running then is abandoned. Default 60 s.
    #[serde(default = "default_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
}

impl RuntimeConfig {
    /// The image spec the runtime's VMs boot: the configured one plus the
    /// code slot.
    pub fn spec(&self) -> ImageSpec {
        let mut spec = self.image.clone();
        spec.extra_disk_mib = Some(self.code_disk_mib);
        spec
    }
}

/// Which snapshot a runtime app's instances start from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The runtime's shared snapshot: on claim, a runtime clone gets the
    /// app's code disk and starts the app. No per-app snapshot exists.
    #[default]
    Runtime,
    /// The app's own snapshot, taken after the app started: faster claims,
    /// one snapshot per app (rebuilt when its code changes).
    App,
}

fn default_main() -> String {
    "index.js".into()
}
fn default_app_ready_path() -> String {
    "/".into()
}
fn default_app_ready_timeout() -> Duration {
    Duration::from_secs(10)
}

/// An app that runs in a runtime: its code and how it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeAppConfig {
    /// The runtime (a key of `runtimes`).
    pub name: String,
    /// The app's code: a directory, packed by snapgate into a read-only
    /// ext4 image (cached by content hash), or a ready ext4 image file.
    pub code: PathBuf,
    /// The module the runtime loads, relative to the code's root.
    #[serde(default = "default_main")]
    pub main: String,
    /// Environment variables for the app (`PORT` is set by snapgate).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// GET of this path on the app port must answer 200 before the instance
    /// takes requests.
    #[serde(default = "default_app_ready_path")]
    pub ready_path: String,
    /// Longest the app may take from its start to its first 200.
    #[serde(default = "default_app_ready_timeout", with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// `runtime` (default) or `app`: see [`StartFrom`].
    #[serde(default)]
    pub snapshot: StartFrom,
}

/// One app: the hosts it answers and where its requests go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Host names (`app.example.com`) and wildcards (`*.example.com`).
    pub hosts: Vec<String>,
    /// VM app: what its VMs boot.
    #[serde(default)]
    pub image: Option<ImageSpec>,
    /// Runtime app: its code, run in a runtime's VMs.
    #[serde(default)]
    pub runtime: Option<RuntimeAppConfig>,
    /// VM app: how its VMs are pooled.
    #[serde(default)]
    pub pool: Option<PoolConfig>,
    /// Static app: a fixed upstream address, no VMs.
    #[serde(default)]
    pub upstream: Option<SocketAddr>,
    /// Longest the upstream may take to send response headers, from the
    /// end of the request; then 504.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Largest request body the app takes; a larger one gets 413 (at once
    /// when `Content-Length` says so, else when the body grows past it
    /// before the app answers). Default 10 MiB.
    #[serde(default = "default_max_body_size")]
    pub max_body_size: ByteSize,
    /// A kept-alive connection to the app unused this long is closed.
    /// Default 4 s: below common app servers' own keep-alive (Node.js's is
    /// 5 s), so snapgate closes first; an app's `Keep-Alive: timeout=N`
    /// response header lowers it for that connection. 0: connections are
    /// not reused.
    #[serde(default = "default_upstream_idle_timeout", with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    /// Longest wait between two reads of the app's response body, or for
    /// a blocked write of the request to it (the app stopped reading); then
    /// the exchange is cut off. Also how long an upgraded connection (a
    /// WebSocket) may carry no byte either way before it is closed.
    /// Default 60 s.
    #[serde(default = "default_upstream_read_timeout", with = "humantime_serde")]
    pub upstream_read_timeout: Duration,
    /// How snapgate speaks to the app: `http1` (HTTP/1.1, kept-alive
    /// connections; the default) or `h2c` (HTTP/2 over cleartext with
    /// prior knowledge, RFC 9113 section 3.3: one multiplexed connection,
    /// what gRPC servers speak).
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// Where the app's VMs may open connections beyond the host: a list of
    /// `{ to: <IPv4 CIDR>, ports: [<port>, ...] }` (no ports: every port;
    /// TCP and UDP). Empty, the default: nowhere. Enforced by the fence
    /// (`network.fence`, `crate::net::Fence`); not for static apps.
    #[serde(default)]
    pub egress: Vec<crate::net::Egress>,
}

/// The protocol of an app's upstream connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (RFC 9112).
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP with prior knowledge (RFC 9113 section 3.3).
    H2c,
}

/// HTTP/2 from clients (RFC 9113): over TLS by ALPN `h2`, and on the plain
/// listener with prior knowledge (h2c). Its header list is bounded by
/// `limits.max_header_bytes` (SETTINGS_MAX_HEADER_LIST_SIZE).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2Config {
    /// Whether clients may speak HTTP/2. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Streams a client may have open at once on one connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS, RFC 9113 section 6.5.2); 1 to
    /// 10000, default 100 (the section's recommended floor).
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// How often a PING is sent on a connection to check its client is
    /// there (RFC 9113 section 6.7); 0 turns pings off. Default 20 s.
    #[serde(default = "default_h2_keep_alive_interval", with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    /// Default 20 s.
    #[serde(default = "default_h2_keep_alive_timeout", with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            enabled: true,
            max_concurrent_streams: default_max_concurrent_streams(),
            keep_alive_interval: default_h2_keep_alive_interval(),
            keep_alive_timeout: default_h2_keep_alive_timeout(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_concurrent_streams() -> u32 {
    100
}
fn default_h2_keep_alive_interval() -> Duration {
    Duration::from_secs(20)
}
fn default_h2_keep_alive_timeout() -> Duration {
    Duration::from_secs(20)
}

fn default_response_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_body_size() -> ByteSize {
    ByteSize::mib(10)
}
fn default_upstream_idle_timeout() -> Duration {
    Duration::from_secs(4)
}
fn default_upstream_read_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_connections() -> usize {
    10_000
}
fn default_max_connections_per_client() -> usize {
    256
}
fn default_max_requests_in_flight() -> usize {
    10_000
}
fn default_max_header_bytes() -> ByteSize {
    ByteSize::kib(64)
}
fn default_max_headers() -> usize {
    100
}

/// The front door's caps. A connection over a connection cap gets `503`
/// with `Retry-After` and is closed; a request over the in-flight cap gets
/// `503` with `Retry-After` (load shedding); each is counted in
/// `snapgate_load_shed_total{reason}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Open client connections. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections from one client: the TCP peer's IPv4 address or
    /// IPv6 /64 (a peer in `trusted_proxies` counts in the total only).
    /// Default 256.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Requests being served at once, over every app, until their
    /// response headers. Default 10000.
    #[serde(default = "default_max_requests_in_flight")]
    pub max_requests_in_flight: usize,
    /// Largest request head (request line and header fields); a larger
    /// one gets 431 (RFC 6585 section 5). 8 KiB to 16 MiB; default 64 KiB.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Most header field lines in a request; more get 431. At most
    /// 10000; default 100.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            max_requests_in_flight: default_max_requests_in_flight(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
        }
    }
}

/// What serves an app, once validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream<'a> {
    /// MicroVMs restored from the app's snapshot.
    Vm(&'a ImageSpec, PoolConfig),
    /// The app's code in a runtime's microVMs.
    Runtime(&'a RuntimeAppConfig, PoolConfig),
    /// A fixed address.
    Static(SocketAddr),
}

impl AppConfig {
    /// The app's upstream (valid configs have exactly one kind).
    pub fn upstream(&self) -> Upstream<'_> {
        let pool = || self.pool.clone().unwrap_or_default();
        match (&self.image, &self.runtime, self.upstream) {
            (Some(image), _, _) => Upstream::Vm(image, pool()),
            (None, Some(rt), _) => Upstream::Runtime(rt, pool()),
            (None, None, Some(addr)) => Upstream::Static(addr),
            (None, None, None) => {
                unreachable!("validated: an app has an image, a runtime or an upstream")
            }
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
/// The admin listener's address when `admin` is left out.
pub(crate) fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn yes() -> bool {
    true
}

fn default_send_timeout() -> Duration {
    Duration::from_secs(30)
}

/// One certificate of the TLS listener and the hosts it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Exact names and `*.example.com` wildcards this certificate serves.
    pub hosts: Vec<String>,
    /// PEM file: the certificate, then its chain.
    pub cert: PathBuf,
    /// PEM file: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The TLS listener (see `src/proxy/tls.rs` for how a certificate is
/// chosen).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the HTTPS listener.
    pub listen: SocketAddr,
    /// Certificates by host, from files (may be empty with `acme`).
    #[serde(default)]
    pub certificates: Vec<CertificateConfig>,
    /// A host of one of `certificates` whose certificate answers a client
    /// naming no listed host (or none); without it, such a handshake fails.
    #[serde(default)]
    pub default_host: Option<String>,
    /// The plain listener answers requests for a host with a certificate
    /// here with `308 Permanent Redirect` to the same URL over HTTPS (on
    /// this listener's port, left out when 443). Default false.
    #[serde(default)]
    pub redirect_http: bool,
    /// The port redirects name, when clients reach the TLS listener on
    /// another port than it binds (a port forward); default its own.
    #[serde(default)]
    pub redirect_port: Option<u16>,
    /// Certificates obtained automatically (ACME) for hosts with no
    /// certificate file; none by default.
    #[serde(default)]
    pub acme: Option<AcmeConfig>,
}

/// Automatic certificates from an ACME CA (RFC 8555), such as Let's
/// Encrypt. Using it accepts the CA's terms of service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL (RFC 8555 section 7.1.1), e.g.
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// Contact URIs for the account (`mailto:ops@example.com`). Default none.
    #[serde(default)]
    pub contact: Vec<String>,
    /// How the CA checks control of a host: `http-01` (answered on the
    /// plain listener, which the CA reaches on port 80) or `tls-alpn-01`
    /// (RFC 8737, answered on the TLS listener, reached on 443). Default
    /// `http-01`.
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// The hosts to obtain certificates for; default every exact host of
    /// every app that no certificate file lists (wildcards, IP addresses
    /// and `localhost` never: these challenges cannot prove them).
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    /// A PEM file of the root the CA's own HTTPS is trusted by, for a
    /// private or test CA; default the system's roots.
    #[serde(default)]
    pub ca_root: Option<PathBuf>,
    /// Renew this long before a certificate expires; default a third of
    /// its lifetime (30 days of Let's Encrypt's 90).
    #[serde(default, with = "humantime_serde")]
    pub renew_before: Option<Duration>,
}

/// An ACME challenge type (RFC 8555 section 8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcmeChallenge {
    /// A token served over HTTP (RFC 8555 section 8.3).
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A certificate served over TLS with ALPN `acme-tls/1` (RFC 8737).
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

/// CIDRs (`10.0.0.0/8`), or single addresses (`10.0.0.1`, as a /32 or
/// /128).
fn nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| {
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{t:?} is not a CIDR (10.0.0.0/8, fd00::/8) or an IP address"
                    ))
                })
        })
        .collect()
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin listener: `/metrics`, `/livez`, `/readyz` and
    /// the admin API (README, "Admin API"). Loopback by default; any other
    /// address needs `admin_token_file`.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// A file holding the bearer token every admin request but `/livez`
    /// and `/readyz` must carry (`Authorization: Bearer TOKEN`, RFC 6750
    /// section 2.1): its first line, at least 16 characters. Required when
    /// `admin` is not a loopback address. Read at start (a new token
    /// takes a restart); relative to the config file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Longest a client may take to send request headers; also how long
    /// an idle kept-alive connection waits for its next request.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest wait between two reads of a client's request body; then the
    /// request ends with 408 (if no response has begun) and its instance
    /// is free for others. Default 10 s.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A write to a client that stays blocked this long (the client stopped
    /// reading) ends the connection. Default 30 s.
    #[serde(default = "default_send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
    /// One access log line per request, at its end (INFO, target
    /// `snapgate::access`, in the log format of `--log-format`, stamped
    /// when written): client, host, method, path, status, bytes, duration, app,
    /// instance, whether it was held and for how long, request id.
    /// Default true.
    #[serde(default = "yes")]
    pub access_log: bool,
    /// Peers whose forwarding headers (`X-Forwarded-*`, `Forwarded`,
    /// `X-Real-IP`) are believed and extended, as CIDRs; every other
    /// peer's are replaced by what snapgate saw. Default none.
    #[serde(default, deserialize_with = "nets")]
    pub trusted_proxies: Vec<IpNet>,
    /// Edge worker threads serving client connections (`proxy::edge`),
    /// each with a runtime of its own, as nginx's `worker_processes`; at
    /// least 1, and no more than the cores snapgate may run on are
    /// started. Default: one per core.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Connection and request caps.
    #[serde(default)]
    pub limits: Limits,
    /// The HTTPS listener; none by default.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// HTTP/2 from clients.
    #[serde(default)]
    pub http2: Http2Config,
    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
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
    /// Language runtimes by name, shared by runtime apps.
    #[serde(default)]
    pub runtimes: BTreeMap<String, RuntimeConfig>,
    /// Many nodes sharing one catalog in etcd (`crate::cluster`); absent,
    /// a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Apps by name.
    pub apps: BTreeMap<String, AppConfig>,
}

impl Config {
    /// The ACME challenge the TLS listener's automatic certificates use,
    /// if it has them.
    pub fn acme_challenge(&self) -> Option<AcmeChallenge> {
        self.tls.as_ref()?.acme.as_ref().map(|a| a.challenge)
    }

    /// Reads, parses, validates ([`Config::validate`], pure) and
    /// preflights ([`Config::preflight`], the file checks) `path`; every
    /// problem is reported at once where possible, with its key and line.
    /// `snapgate check`, `run` and `snapshot build` all load this way.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (config, text) = Self::read(path)?;
        let mut problems = config.validate();
        problems.extend(config.preflight());
        for p in &mut problems {
            p.line = locate(&text, &p.key);
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: path.to_owned(),
                problems,
            })
        }
    }

    /// Reads and parses `path`, its relative paths resolved, without
    /// validating or checking files: for the commands that talk to a
    /// running gateway and need only its `admin` address and token file,
    /// which a half-edited file or an unreadable key must not stop.
    /// Errors: the file cannot be read, or is not a config.
    pub fn load_unchecked(path: &Path) -> Result<Config, ConfigError> {
        Self::read(path).map(|(config, _)| config)
    }

    /// `path` read and parsed, its relative paths resolved; with its text.
    fn read(path: &Path) -> Result<(Config, String), ConfigError> {
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
        // Absolute, so paths stay right whatever directory a VMM runs in.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        config.resolve_paths(absolute.parent().unwrap_or(Path::new("/")));
        Ok((config, text))
    }

    /// Parses YAML text; the error names the key path and line.
    pub fn parse(text: &str) -> Result<Config, Problem> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let mut message = strip_location(&inner.to_string());
            // The YAML error may start with its own (shorter) path: keep one.
            if let Some((head, rest)) = message.split_once(": ") {
                if key.starts_with(head) {
                    message = rest.to_owned();
                }
            }
            Problem {
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                line: inner.location().map(|l| l.line()),
                message,
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
        if let Some(file) = &mut self.admin_token_file {
            abs(file);
        }
        if let Some(dir) = &mut self.snapshot_dir {
            abs(dir);
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.resolve_paths(base);
        }
        for c in self.tls.iter_mut().flat_map(|t| t.certificates.iter_mut()) {
            abs(&mut c.cert);
            abs(&mut c.key);
        }
        let acme_roots = self.tls.iter_mut().filter_map(|t| t.acme.as_mut());
        for root in acme_roots.filter_map(|a| a.ca_root.as_mut()) {
            abs(root);
        }
        for rt in self.apps.values_mut().filter_map(|a| a.runtime.as_mut()) {
            abs(&mut rt.code);
        }
        let images = self.apps.values_mut().filter_map(|a| a.image.as_mut());
        let runtime_images = self.runtimes.values_mut().map(|r| &mut r.image);
        for image in images.chain(runtime_images) {
            abs(&mut image.kernel);
            if let Some(initramfs) = &mut image.initramfs {
                abs(initramfs);
            }
            for disk in &mut image.disks {
                abs(&mut disk.path);
            }
        }
    }

    /// Where the code images of runtime app `app` are cached.
    pub fn code_cache(&self, app: &str) -> PathBuf {
        self.state_dir.join("code").join(app)
    }

    /// Where snapshots live.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.snapshot_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("snapshots"))
    }
}

/// The 1-based line of a dotted key path in YAML text, found by walking the
/// path's segments down the indentation; `None` if not found.
pub fn locate(text: &str, key: &str) -> Option<usize> {
    let mut line_no = 0usize;
    let mut min_indent = 0usize;
    let lines: Vec<&str> = text.lines().collect();
    let segments: Vec<&str> = key
        .split('.')
        .map(|s| s.split('[').next().unwrap_or(s))
        .filter(|s| !s.is_empty())
        .collect();
    for seg in segments {
        let found = lines.iter().enumerate().skip(line_no).find(|(_, l)| {
            let indent = l.len() - l.trim_start().len();
            let t = l.trim_start().trim_start_matches("- ");
            indent >= min_indent
                && (t.starts_with(&format!("{seg}:")) || t.starts_with(&format!("\"{seg}\":")))
        })?;
        line_no = found.0;
        min_indent = found.1.len() - found.1.trim_start().len() + 1;
    }
    Some(line_no + 1)
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
    fn host_patterns() {
        assert!(check_host_pattern("hello.localhost").is_ok());
        assert!(check_host_pattern("*.example.com").is_ok());
        for bad in [
            "Hello.com",
            "a.*.com",
            "*",
            "a..b",
            "-a.com",
            "a.com:80",
            "",
        ] {
            assert!(check_host_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn locate_finds_nested_keys() {
        let text = "listen: x\napps:\n  a:\n    pool:\n      min_warm: 1\n  b:\n    pool:\n      min_warm: 9\n";
        assert_eq!(locate(text, "apps.b.pool.min_warm"), Some(8));
        assert_eq!(locate(text, "apps.a.pool.min_warm"), Some(5));
        assert_eq!(locate(text, "apps.c"), None);
    }

    #[test]
    fn unknown_key_is_named_with_its_path_and_line() {
        let text = "apps:\n  hello:\n    hosts: [a.test]\n    image:\n      kernel: /k\n      cmdline: x\n      memroy_mib: 3\n";
        let p = Config::parse(text).unwrap_err();
        assert_eq!(p.key, "apps.hello.image.memroy_mib");
        assert!(
            p.message.contains("unknown field `memroy_mib`"),
            "{}",
            p.message
        );
        assert_eq!(p.line, Some(7));
    }

    #[test]
    fn validation_names_keys() {
        let text = "network:\n  prefix_len: 31\napps:\n  Hello:\n    hosts: [a.test]\n    image:\n      kernel: /nonexistent/k\n      cmdline: '{nope}'\n";
        let c = Config::parse(text).unwrap();
        let problems = c.validate().into_iter().chain(c.preflight());
        let keys: Vec<String> = problems.map(|p| p.key).collect();
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
    fn front_door_settings_parse_sizes_and_addresses() {
        let c = Config::parse(
            "trusted_proxies: [10.0.0.0/8, 192.0.2.7, '::1']\nlimits: {max_header_bytes: 16KiB}\n\
             apps:\n  a:\n    hosts: [a.test]\n    upstream: 127.0.0.1:1\n    max_body_size: 2 MiB\n",
        )
        .unwrap();
        let nets: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]);
        assert_eq!(c.limits.max_header_bytes.as_u64(), 16 * 1024);
        assert_eq!(c.limits.max_headers, 100, "a default");
        assert_eq!(c.apps["a"].max_body_size.as_u64(), 2 * 1024 * 1024);
        assert_eq!(c.apps["a"].upstream_idle_timeout, Duration::from_secs(4));
        assert!(c.validate().is_empty(), "{:?}", c.validate());
    }

    #[test]
    fn workers_are_one_per_core_unless_set_and_never_zero() {
        let app = "apps:\n  a:\n    hosts: [a.test]\n    upstream: 127.0.0.1:1\n";
        assert_eq!(Config::parse(app).unwrap().workers, None);
        let two = Config::parse(&format!("workers: 2\n{app}")).unwrap();
        assert_eq!(two.workers, Some(2));
        assert!(two.validate().is_empty(), "{:?}", two.validate());
        let zero = Config::parse(&format!("workers: 0\n{app}")).unwrap();
        let problems = zero.validate();
        assert!(
            problems
                .iter()
                .any(|p| p.key == "workers" && p.message.contains("at least 1")),
            "{problems:?}"
        );
    }

    #[test]
    fn tls_settings_are_checked_with_their_keys() {
        let c = Config::parse(
            "tls:\n  listen: 127.0.0.1:8443\n  default_host: nowhere.test\n  certificates:\n\
             \x20   - { hosts: [a.test, 'Bad..name'], cert: /nonexistent/a.pem, key: /nonexistent/a.key }\n\
             \x20   - { hosts: [a.test], cert: /nonexistent/b.pem, key: /nonexistent/b.key }\n\
             apps:\n  a:\n    hosts: [a.test]\n    upstream: 127.0.0.1:1\n",
        )
        .unwrap();
        let problems: Vec<String> = c
            .validate()
            .into_iter()
            .chain(c.preflight())
            .map(|p| p.key)
            .collect();
        for key in [
            "tls.certificates[0].hosts[1]",
            "tls.certificates[1].hosts[0]",
            "tls.default_host",
            "tls.certificates[0].cert",
            "tls.certificates[1].key",
        ] {
            assert!(
                problems.iter().any(|p| p == key),
                "{key} not in {problems:?}"
            );
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let mut c =
            Config::parse("apps:\n  a:\n    hosts: [a.test]\n    image: {kernel: k, cmdline: x}\n")
                .unwrap();
        c.resolve_paths(Path::new("/etc/snapgate"));
        assert_eq!(
            c.apps["a"].image.as_ref().unwrap().kernel,
            Path::new("/etc/snapgate/k")
        );
        assert_eq!(c.snapshot_dir(), Path::new("/var/lib/snapgate/snapshots"));
    }
}

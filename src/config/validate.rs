//! Checking a parsed config: [`Config::validate`] (pure: what the types
//! cannot express) and [`Config::preflight`] (the file checks, as they
//! are now). Each problem names its key path.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{AppConfig, Config, PoolConfig, Problem, RuntimeAppConfig, RuntimeConfig};
use crate::vmm::ImageSpec;

impl Config {
    /// The file checks, separate from [`Config::validate`]: every image's
    /// kernel, initramfs and disks are files, and every runtime app's code
    /// is a directory (holding its `main`) or an image file, as they are
    /// now. Each problem names its key.
    pub fn preflight(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut add = |key: String, message: String| {
            problems.push(Problem {
                key,
                line: None,
                message,
            })
        };
        if let Some(file) = &self.admin_token_file {
            if let Err(e) = crate::admin::Token::from_file(file) {
                // The error names the key and the file.
                let message = format!("{e:#}");
                let message = message
                    .strip_prefix("admin_token_file: ")
                    .unwrap_or(&message)
                    .to_owned();
                add("admin_token_file".into(), message);
            }
        }
        if let Some(cluster) = &self.cluster {
            for (key, path) in cluster.files() {
                if let Err(e) = std::fs::File::open(path) {
                    add(key, format!("{}: {e}", path.display()));
                }
            }
            if let Err(e) = crate::cluster::Secret::from_file(&cluster.secret_file) {
                if cluster.secret_file.exists() {
                    add("cluster.secret_file".into(), format!("{e:#}"));
                }
            }
        }
        for (i, c) in self
            .tls
            .iter()
            .flat_map(|t| t.certificates.iter())
            .enumerate()
        {
            for (field, path) in [("cert", &c.cert), ("key", &c.key)] {
                if let Err(e) = std::fs::File::open(path) {
                    add(
                        format!("tls.certificates[{i}].{field}"),
                        format!("{}: {e}", path.display()),
                    );
                }
            }
        }
        for (name, app) in &self.apps {
            let at = format!("apps.{name}");
            if let Some(image) = &app.image {
                for p in image.check_files() {
                    add(format!("{at}.image.{}", p.field), p.message);
                }
            }
            if let Some(rt) = &app.runtime {
                let at = format!("{at}.runtime");
                match std::fs::metadata(&rt.code) {
                    Ok(m) if m.is_dir() || m.is_file() => {}
                    Ok(_) => add(
                        format!("{at}.code"),
                        format!("{} is neither a directory nor a file", rt.code.display()),
                    ),
                    Err(e) => add(format!("{at}.code"), format!("{}: {e}", rt.code.display())),
                }
                let main = rt.code.join(&rt.main);
                if rt.code.is_dir() && valid_main(&rt.main) && !main.is_file() {
                    add(
                        format!("{at}.main"),
                        format!("{} is not a file", main.display()),
                    );
                }
            }
        }
        for (name, rt) in &self.runtimes {
            for p in rt.image.check_files() {
                add(format!("runtimes.{name}.image.{}", p.field), p.message);
            }
        }
        problems
    }

    /// Checks what the types cannot, without touching any file (see
    /// [`Config::preflight`]); each problem names its key.
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
            add(format!("network.{}", e.field), e.message);
        }
        if let Err(e) = self.vmm.jail.validate() {
            add(format!("vmm.jail.{}", e.field), e.message);
        }
        for (key, d) in self.durations() {
            if d > MAX_DURATION {
                add(
                    key,
                    format!(
                        "{d:?} is above the {}-day maximum",
                        MAX_DURATION.as_secs() / 86400
                    ),
                );
            }
        }
        if self.apps.is_empty() {
            add("apps".into(), "at least one app is needed".into());
        }
        if self.workers == Some(0) {
            add(
                "workers".into(),
                "at least 1 (leave it out for one per core)".into(),
            );
        }
        self.validate_limits(&mut add);
        self.validate_tls(&mut add);
        for (key, message) in self.cluster.iter().flat_map(|c| c.validate()) {
            add(key, message);
        }
        if let Some(c) = &self.cluster {
            // Peers forward plain HTTP there: the admin or TLS listener
            // would answer every forward wrongly.
            let other = [Some(self.admin), self.tls.as_ref().map(|t| t.listen)];
            let port = c.advertise.port();
            if port != self.listen.port() && other.iter().flatten().any(|a| a.port() == port) {
                add(
                    "cluster.advertise".into(),
                    format!(
                        "{}: the port of the admin or TLS listener; peers reach `listen` ({})",
                        c.advertise, self.listen
                    ),
                );
            }
        }
        // Port 0 asks for any free port: two of those never clash.
        if self.listen == self.admin && self.listen.port() != 0 {
            add(
                "admin".into(),
                format!("{} is also the listen address", self.admin),
            );
        }
        if !self.admin.ip().is_loopback() && self.admin_token_file.is_none() {
            add(
                "admin".into(),
                format!(
                    "{} is not a loopback address: set admin_token_file (the bearer token \
                     every admin request must carry) to serve the admin API off loopback",
                    self.admin
                ),
            );
        }
        let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, app) in &self.apps {
            self.validate_app(name, app, &mut owners, &mut add);
        }
        for (name, rt) in &self.runtimes {
            validate_runtime(name, rt, &mut add);
        }
        problems
    }

    /// One app's checks; `owners` maps each host pattern seen so far to
    /// its app.
    fn validate_app<'a>(
        &self,
        name: &'a str,
        app: &'a AppConfig,
        owners: &mut BTreeMap<&'a str, &'a str>,
        add: &mut impl FnMut(String, String),
    ) {
        let at = format!("apps.{name}");
        if !valid_app_name(name) {
            add(
                at.clone(),
                "app names are 1-32 characters of [a-z0-9-], starting with a letter".into(),
            );
        }
        if app.hosts.is_empty() {
            add(format!("{at}.hosts"), "at least one host is needed".into());
        }
        for (i, host) in app.hosts.iter().enumerate() {
            if let Err(e) = check_host_pattern(host) {
                add(format!("{at}.hosts[{i}]"), format!("{host:?}: {e}"));
            } else if let Some(other) = owners.insert(host, name) {
                add(
                    format!("{at}.hosts[{i}]"),
                    format!("{host:?} is also a host of app {other}"),
                );
            }
        }
        let kinds = [
            app.image.as_ref().map(|_| "image (VM app)"),
            app.runtime.as_ref().map(|_| "runtime (runtime app)"),
            app.upstream.as_ref().map(|_| "upstream (static app)"),
        ];
        let kinds: Vec<&str> = kinds.into_iter().flatten().collect();
        match kinds.len() {
            0 => add(
                at.clone(),
                "needs image (a VM app), runtime (a runtime app) or upstream (a static app)".into(),
            ),
            1 => {}
            _ => add(at.clone(), format!("has {}; keep one", kinds.join(" and "))),
        }
        if app.upstream.is_some() && app.pool.is_some() {
            add(
                format!("{at}.pool"),
                "applies to VM and runtime apps only; a static app has no pool".into(),
            );
        }
        if app.upstream.is_some() && !app.egress.is_empty() {
            add(
                format!("{at}.egress"),
                "applies to VM and runtime apps only; a static app has no VMs".into(),
            );
        }
        if !app.egress.is_empty() && !self.network.fence {
            add(
                format!("{at}.egress"),
                "needs network.fence: without the fence every VM reaches everywhere".into(),
            );
        }
        for (i, e) in app.egress.iter().enumerate() {
            if e.ports.contains(&0) {
                add(format!("{at}.egress[{i}].ports"), "0 is not a port".into());
            }
        }
        if let Some(rt) = &app.runtime {
            self.validate_runtime_app(&format!("{at}.runtime"), rt, add);
        }
        for (key, d) in [
            ("response_timeout", app.response_timeout),
            ("upstream_read_timeout", app.upstream_read_timeout),
        ] {
            if d.is_zero() {
                add(format!("{at}.{key}"), "must be above zero".into());
            }
        }
        if let Some(image) = &app.image {
            for p in image.validate().into_iter().chain(snapgate_fields(image)) {
                add(format!("{at}.image.{}", p.field), p.message);
            }
            // The VMM layer's own check of the path comes first.
            let basic_ok = !image
                .validate()
                .iter()
                .any(|p| p.field == "on_restore.path");
            if let Some(problem) = on_restore_routing(image).filter(|_| basic_ok) {
                add(format!("{at}.image.on_restore.path"), problem);
            }
        }
        if let Some(pool) = &app.pool {
            validate_pool(&at, pool, add);
        }
    }
}

/// An app's pool settings.
fn validate_pool(at: &str, pool: &PoolConfig, add: &mut impl FnMut(String, String)) {
    let key = |k: &str| format!("{at}.pool.{k}");
    if pool.max_instances == 0 {
        add(key("max_instances"), "must be at least 1".into());
    }
    if pool.min_warm > pool.max_instances {
        add(
            key("min_warm"),
            format!(
                "{} is above max_instances ({})",
                pool.min_warm, pool.max_instances
            ),
        );
    }
    if pool.max_concurrency == 0 {
        add(key("max_concurrency"), "must be at least 1".into());
    }
    if pool.hold_queue == 0 {
        add(
            key("hold_queue"),
            "must be at least 1 (a request at zero waits for its instance here)".into(),
        );
    }
    if pool.hold_timeout.is_zero() {
        add(key("hold_timeout"), "must be above zero".into());
    }
    if pool.idle_timeout.is_zero() {
        add(key("idle_timeout"), "must be above zero".into());
    }
    if pool.start_timeout.is_zero() {
        add(key("start_timeout"), "must be above zero".into());
    }
}

/// A runtime's settings.
fn validate_runtime(name: &str, rt: &RuntimeConfig, add: &mut impl FnMut(String, String)) {
    let at = format!("runtimes.{name}");
    if !valid_app_name(name) {
        add(
            at.clone(),
            "runtime names are 1-32 characters of [a-z0-9-], starting with a letter".into(),
        );
    }
    if rt.start_timeout.is_zero() {
        add(format!("{at}.start_timeout"), "must be above zero".into());
    }
    for p in rt.spec().validate() {
        let key = if p.field == "extra_disk_mib" {
            format!("{at}.code_disk_mib")
        } else {
            format!("{at}.image.{}", p.field)
        };
        add(key, p.message);
    }
    for p in snapgate_fields(&rt.image)
        .into_iter()
        .chain(agent_args(&rt.image))
    {
        add(format!("{at}.image.{}", p.field), p.message);
    }
    if rt.image.on_restore.is_some() {
        add(
            format!("{at}.image.on_restore"),
            "the guest agent of a runtime takes the resumed message itself \
                     (/resumed, and with each start); remove on_restore"
                .into(),
        );
    }
    if rt.app_port == 0 {
        add(format!("{at}.app_port"), "must not be 0".into());
    } else if rt.app_port == rt.image.guest_port {
        add(
            format!("{at}.app_port"),
            format!(
                "{} is also image.guest_port, the guest agent's port",
                rt.app_port
            ),
        );
    }
}

impl Config {
    fn validate_runtime_app(
        &self,
        at: &str,
        rt: &RuntimeAppConfig,
        add: &mut impl FnMut(String, String),
    ) {
        if !self.runtimes.contains_key(&rt.name) {
            let known: Vec<&str> = self.runtimes.keys().map(String::as_str).collect();
            add(
                format!("{at}.name"),
                if known.is_empty() {
                    format!(
                        "no runtime {:?}: the config has no runtimes section",
                        rt.name
                    )
                } else {
                    format!("no runtime {:?} (runtimes: {})", rt.name, known.join(", "))
                },
            );
        }
        if !valid_main(&rt.main) {
            add(
                format!("{at}.main"),
                format!("{:?} must be a relative path inside the code", rt.main),
            );
        }
        for key in rt.env.keys() {
            let ok = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                add(
                    format!("{at}.env.{key}"),
                    "variable names are [A-Za-z0-9_], not starting with a digit".into(),
                );
            } else if key == "PORT" {
                add(
                    format!("{at}.env.PORT"),
                    "is set by snapgate to the runtime's app_port".into(),
                );
            }
        }
        if !rt.ready_path.starts_with('/') {
            add(
                format!("{at}.ready_path"),
                format!("{:?} must start with /", rt.ready_path),
            );
        }
        if rt.ready_timeout.is_zero() {
            add(format!("{at}.ready_timeout"), "must be above zero".into());
        }
    }
}

impl Config {
    /// The front door's timeouts and caps: each above zero, the header
    /// size at least hyper's smallest read buffer.
    fn validate_limits(&self, add: &mut impl FnMut(String, String)) {
        for (key, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("send_timeout", self.send_timeout),
        ] {
            if d.is_zero() {
                add(key.into(), "must be above zero".into());
            }
        }
        let l = &self.limits;
        for (key, n, max) in [
            ("max_connections", l.max_connections, MAX_COUNT),
            (
                "max_connections_per_client",
                l.max_connections_per_client,
                MAX_COUNT,
            ),
            (
                "max_requests_in_flight",
                l.max_requests_in_flight,
                MAX_COUNT,
            ),
            ("max_headers", l.max_headers, MAX_HEADERS),
        ] {
            if n == 0 {
                add(format!("limits.{key}"), "must be above zero".into());
            } else if n > max {
                add(
                    format!("limits.{key}"),
                    format!("{n} is above the {max} maximum"),
                );
            }
        }
        let h2 = &self.http2;
        if !(1..=10_000).contains(&h2.max_concurrent_streams) {
            add(
                "http2.max_concurrent_streams".into(),
                format!("{} is outside 1 to 10000", h2.max_concurrent_streams),
            );
        }
        if !h2.keep_alive_interval.is_zero() && h2.keep_alive_timeout.is_zero() {
            add(
                "http2.keep_alive_timeout".into(),
                "must be above zero when keep_alive_interval is".into(),
            );
        }
        let head = l.max_header_bytes.as_u64();
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&head) {
            add(
                "limits.max_header_bytes".into(),
                format!(
                    "{head} bytes is outside {MIN_HEADER_BYTES} (8 KiB) to {MAX_HEADER_BYTES} (16 MiB)"
                ),
            );
        }
    }
}

impl Config {
    /// The TLS listener's own checks: hosts well-formed and listed once,
    /// the default host among them, its address apart from the others.
    fn validate_tls(&self, add: &mut impl FnMut(String, String)) {
        let Some(tls) = &self.tls else { return };
        if tls.certificates.is_empty() && tls.acme.is_none() {
            add(
                "tls.certificates".into(),
                "at least one certificate is needed (or tls.acme)".into(),
            );
        }
        if let Some(acme) = &tls.acme {
            if !(acme.directory.starts_with("https://") || acme.directory.starts_with("http://")) {
                add(
                    "tls.acme.directory".into(),
                    format!("{:?} is not an http(s) URL", acme.directory),
                );
            }
            for (j, host) in acme.hosts.iter().flatten().enumerate() {
                let key = format!("tls.acme.hosts[{j}]");
                if check_host_pattern(host).is_err() || host.starts_with('*') {
                    add(
                        key,
                        format!("{host:?}: must be an exact host name (no wildcard)"),
                    );
                } else if !self.apps.values().any(|a| a.hosts.contains(host)) {
                    add(key, format!("{host:?} is no app's host"));
                }
            }
        }
        let shared = tls.listen == self.listen || tls.listen == self.admin;
        // Port 0 asks for any free port: two of those never clash.
        if shared && tls.listen.port() != 0 {
            add(
                "tls.listen".into(),
                format!("{} is also another listener's address", tls.listen),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in tls.certificates.iter().enumerate() {
            if c.hosts.is_empty() {
                add(
                    format!("tls.certificates[{i}].hosts"),
                    "at least one host is needed".into(),
                );
            }
            for (j, host) in c.hosts.iter().enumerate() {
                let key = format!("tls.certificates[{i}].hosts[{j}]");
                if let Err(e) = check_host_pattern(host) {
                    add(key, format!("{host:?}: {e}"));
                } else if !seen.insert(host.as_str()) {
                    add(
                        key,
                        format!("{host:?} is listed with another certificate too"),
                    );
                }
            }
        }
        if let Some(default) = &tls.default_host {
            if !seen.contains(default.as_str()) {
                add(
                    "tls.default_host".into(),
                    format!("{default:?} is not a host of any certificate"),
                );
            }
        }
    }
}

/// The smallest `limits.max_header_bytes`: hyper's smallest read buffer.
pub const MIN_HEADER_BYTES: u64 = 8192;
/// The largest `limits.max_header_bytes`.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;
/// The largest connection and request caps (tokio's semaphores take no
/// more than `usize::MAX >> 3` permits; no host serves this many).
pub const MAX_COUNT: usize = 10_000_000;
/// The largest `limits.max_headers` (hyper reserves a slot for each on
/// every request it parses).
pub const MAX_HEADERS: usize = 10_000;

/// The longest duration any setting takes: deadlines are instants in the
/// future, and one past the end of time would panic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

impl Config {
    /// Every duration setting, with its key.
    fn durations(&self) -> Vec<(String, Duration)> {
        let mut out = vec![
            ("header_read_timeout".to_owned(), self.header_read_timeout),
            ("shutdown_grace".to_owned(), self.shutdown_grace),
            ("body_read_timeout".to_owned(), self.body_read_timeout),
            ("send_timeout".to_owned(), self.send_timeout),
            (
                "http2.keep_alive_interval".to_owned(),
                self.http2.keep_alive_interval,
            ),
            (
                "http2.keep_alive_timeout".to_owned(),
                self.http2.keep_alive_timeout,
            ),
        ];
        let image = |out: &mut Vec<(String, Duration)>, at: &str, image: &ImageSpec| {
            out.push((format!("{at}.ready_timeout"), image.ready_timeout));
            if let Some(hook) = &image.on_restore {
                out.push((format!("{at}.on_restore.timeout"), hook.timeout));
            }
        };
        for (name, app) in &self.apps {
            let at = format!("apps.{name}");
            out.push((format!("{at}.response_timeout"), app.response_timeout));
            out.push((
                format!("{at}.upstream_idle_timeout"),
                app.upstream_idle_timeout,
            ));
            out.push((
                format!("{at}.upstream_read_timeout"),
                app.upstream_read_timeout,
            ));
            if let Some(spec) = &app.image {
                image(&mut out, &format!("{at}.image"), spec);
            }
            if let Some(rt) = &app.runtime {
                out.push((format!("{at}.runtime.ready_timeout"), rt.ready_timeout));
            }
            if let Some(pool) = &app.pool {
                for (key, d) in [
                    ("idle_timeout", pool.idle_timeout),
                    ("hold_timeout", pool.hold_timeout),
                    ("start_timeout", pool.start_timeout),
                ] {
                    out.push((format!("{at}.pool.{key}"), d));
                }
            }
        }
        for (name, rt) in &self.runtimes {
            let at = format!("runtimes.{name}");
            out.push((format!("{at}.start_timeout"), rt.start_timeout));
            image(&mut out, &format!("{at}.image"), &rt.image);
        }
        out
    }
}

/// What the proxy needs of a VM app's `on_restore` path, beyond what the
/// VMM layer checks: a plain path of its own, so that clients' requests
/// for it can be refused in any spelling a guest's router may read
/// ([`crate::path`]), and not `ready_path` in any such spelling.
fn on_restore_routing(image: &ImageSpec) -> Option<String> {
    let hook = image.on_restore.as_ref()?;
    let path = &hook.path;
    if !crate::path::is_plain(path) {
        Some(format!(
            "{path:?} must be a plain path of its own: /-separated segments of \
             letters, digits, -, ., _ and ~, none of them . or .. \
             (snapgate refuses clients' requests for it, in any spelling)"
        ))
    } else if crate::path::normalize(path) == crate::path::normalize(&image.ready_path) {
        Some(format!(
            "{path:?} is also ready_path: give the hook a path of its own"
        ))
    } else {
        None
    }
}

/// A runtime app's `main`: a relative path that stays inside the code.
fn valid_main(main: &str) -> bool {
    !(main.is_empty() || main.starts_with('/') || main.split('/').any(|c| c == ".."))
}

/// What the guest agent of a runtime image needs on its kernel command line
/// and from the disk layout (see `guest/init/src/agent.rs`).
fn agent_args(image: &ImageSpec) -> Vec<crate::FieldError> {
    let mut out = Vec::new();
    let value = |key: &str| {
        image
            .cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
    };
    match value("snapgate.agent=") {
        None => out.push(crate::FieldError::new(
            "cmdline",
            "needs snapgate.agent={guest_port}: it starts the guest agent of a runtime",
        )),
        Some(v) if v != "{guest_port}" && v != image.guest_port.to_string() => {
            out.push(crate::FieldError::new(
                "cmdline",
                format!(
                    "snapgate.agent={v} is not guest_port ({}), where snapgate reaches the agent",
                    image.guest_port
                ),
            ))
        }
        Some(_) => {}
    }
    if value("snapgate.exec=").is_none() {
        out.push(crate::FieldError::new(
            "cmdline",
            "needs snapgate.exec=<runtime command, comma-separated>: what the agent starts",
        ));
    }
    // The agent's defaults: root disk /dev/vda, code disk /dev/vdb.
    let disks = image.disks.len();
    if value("snapgate.code=").is_none() && disks != 1 {
        out.push(crate::FieldError::new(
            "disks",
            format!(
                "with {disks} disk(s) the code disk is not /dev/vdb, where the agent looks: \
                 give one disk (the runtime's root) or set snapgate.code= (and snapgate.root=) \
                 in cmdline"
            ),
        ));
    }
    out
}

/// Image fields snapgate sets itself, which a config must leave out.
fn snapgate_fields(image: &ImageSpec) -> Vec<crate::FieldError> {
    let mut out = Vec::new();
    if image.extra_disk_mib.is_some() {
        out.push(crate::FieldError::new(
            "extra_disk_mib",
            "is set by snapgate from a runtime's code_disk_mib; remove it",
        ));
    }
    if image.prepared.is_some() {
        out.push(crate::FieldError::new(
            "prepared",
            "is set by snapgate for per-app snapshots; remove it",
        ));
    }
    out
}

/// Checks a host pattern: a lowercase DNS name, or `*.` and one, without a
/// port.
pub fn check_host_pattern(pattern: &str) -> Result<(), String> {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    if name.contains('*') {
        return Err("a wildcard may only be a leading \"*.\"".into());
    }
    if name.contains(':') {
        return Err("hosts match without a port; remove \":port\"".into());
    }
    if name.is_empty() || name.len() > 253 {
        return Err("not a host name".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(format!(
                "label {label:?} is not 1-63 of [a-z0-9-] (lowercase, no leading or trailing '-')"
            ));
        }
    }
    Ok(())
}

fn valid_app_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(path: &str) -> ImageSpec {
        serde_yaml_ng::from_str(&format!(
            "kernel: /k\ncmdline: x\nready_path: /healthz\non_restore: {{path: '{path}'}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_cluster_node_must_advertise_its_plain_listener() {
        let text = |advertise: &str| {
            format!(
                "listen: 0.0.0.0:8080\nadmin: 127.0.0.1:9090\ncluster:\n  node: a\n  \
                 advertise: {advertise}\n  secret_file: s\n  etcd: {{ endpoints: [\"http://e:2379\"] }}\n\
                 apps:\n  a:\n    hosts: [a.test]\n    upstream: 127.0.0.1:1\n"
            )
        };
        let keys = |t: String| -> Vec<String> {
            Config::parse(&t)
                .unwrap()
                .validate()
                .into_iter()
                .map(|p| p.key)
                .collect()
        };
        assert!(keys(text("10.0.0.1:8080")).is_empty());
        // A port forward to listen is the operator's to know.
        assert!(keys(text("10.0.0.1:80")).is_empty());
        assert_eq!(keys(text("10.0.0.1:9090")), ["cluster.advertise"]);
        assert_eq!(keys(text("0.0.0.0:8080")), ["cluster.advertise"]);
    }

    #[test]
    fn durations_past_a_year_are_refused_with_their_key() {
        let text = "header_read_timeout: 18446744073709551615s\napps:\n  a:\n    hosts: [a.test]\n    upstream: 127.0.0.1:1\n    response_timeout: 400d\n";
        let c = Config::parse(text).unwrap();
        let keys: Vec<String> = c.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["header_read_timeout", "apps.a.response_timeout"]);
    }

    #[test]
    fn an_on_restore_path_must_be_plain_and_not_ready_path_in_any_spelling() {
        for path in [
            "/a?x=1",
            "/a\\b",
            "/",
            "//",
            "/.",
            "/%2F",
            "/;x",
            "/a/..",
            "/HealthZ/",
        ] {
            assert!(on_restore_routing(&image(path)).is_some(), "{path:?}");
        }
        assert_eq!(on_restore_routing(&image("/snapgate/resumed")), None);
    }
}

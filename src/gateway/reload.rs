//! Config reload: a new `proxy.yaml` applied to the running gateway as a
//! diff, and certificate files reloaded when they change.
//!
//! # Reload protocol
//! 1. The caller loaded the new file with [`Config::load`] (parsed,
//!    validated, files checked): a file that fails that is rejected before
//!    anything here runs. One reload runs at a time (the current config's
//!    lock is held throughout).
//! 2. Settings that only a restart can change (listeners, timeouts,
//!    `trusted_proxies` and limits of the front door, HTTP/2, `tls.listen`,
//!    `tls.redirect_*`, `tls.acme`, `tls` itself, state and snapshot
//!    directories, the VMM, tap addressing, an existing runtime's settings) are
//!    compared; any change rejects the reload, naming each key.
//! 3. The new certificates load whole; a failure rejects the reload.
//! 4. Each app of the new file is, against the running one:
//!    - unchanged (or only its `hosts`): its target is kept as it is;
//!    - changed only in `pool`: kept, and its pool resized in place
//!      ([`Pool::resize`]) once the new table is in;
//!    - changed only in its limits and upstream settings
//!      (`response_timeout`, `upstream_*`, `max_body_size`): a new target
//!      over the same pool (and resized if `pool` changed too);
//!    - new, or changed in what runs it (its image, runtime, code or static
//!      upstream): a new target, its snapshot prepared and its pool
//!      started now. A failure here closes whatever this reload started
//!      and rejects it.
//!
//!    Before any of that (step 4a), the fence's allow rules are rewritten
//!    for the new file's `egress` (one `nft` transaction); a reload that
//!    fails later puts the old rules back. An app that gains or loses
//!    egress altogether is replaced (its VMs' taps forward only if their
//!    app had egress when they started); one whose list changes keeps its
//!    target.
//! 5. The new routing table replaces the old in one atomic swap, the
//!    certificates in another; requests already routed keep the table and
//!    the target they routed on.
//! 6. Pools of apps removed or replaced are retired: `min_warm` drops to 0
//!    at once, and once no request routed on an old table is still on its
//!    way to them, none is held and none is leased (upgraded connections
//!    included), they close. Until then they serve what reached them: no
//!    held or in-flight request is dropped. Shutdown closes them with the
//!    rest.
//! 7. The new file becomes the running config; the reload is counted in
//!    `snapgate_config_reloads_total{result}` and its summary returned.
//!
//! # Certificate files
//! A task watches the directories of the running config's certificate and
//! key files (inotify, through the `notify` crate). A change there, once
//! quiet for [`SETTLE`], loads the certificates afresh: a store that loads
//! whole replaces the one in use, one that does not is logged and the one
//! in use stays. A reload hands the task its new file list.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{close_targets, router_of, Factories, Running};
use crate::config::{AppConfig, Config, TlsConfig, Upstream};
use crate::pool::{Pool, PoolMetrics, Tasks};
use crate::proxy::tls::{CertStore, Certs};
use crate::proxy::{ProxyMetrics, Table, Target};
use crate::snapshot::Builder;
use crate::vmm::Vmm;

/// How long certificate files must stay unchanged after a change before
/// they are loaded (a renewal writes several files).
pub const SETTLE: Duration = Duration::from_millis(300);

/// A reload asked for through the admin listener: the answer goes back on
/// `reply` (the summary, or why it was rejected).
pub struct Ask {
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// Why a reload was rejected (the running config stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Settings changed that only a restart applies (protocol step 2).
    #[error("{} changed; only a restart applies {}", .0.join(", "), if .0.len() == 1 { "it" } else { "them" })]
    NeedsRestart(Vec<String>),
    /// The new certificates did not load (step 3).
    #[error("certificates: {0}")]
    Certificates(#[from] crate::proxy::tls::TlsError),
    /// The fence's allow rules could not be rewritten (step 4a).
    #[error("{0}")]
    Fence(String),
    /// An app could not be started (step 4).
    #[error("apps.{app}: {error:#}")]
    App {
        /// The app.
        app: String,
        /// Why.
        error: anyhow::Error,
    },
}

/// Reload metrics.
#[derive(Clone)]
pub struct ReloadMetrics {
    reloads: IntCounterVec,
    certificate_reloads: IntCounterVec,
    last_success: IntGauge,
}

impl ReloadMetrics {
    /// Registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<ReloadMetrics> {
        let m = ReloadMetrics {
            reloads: IntCounterVec::new(
                Opts::new(
                    "snapgate_config_reloads_total",
                    "Config reloads (SIGHUP or POST /reload on the admin listener) by result: applied or rejected.",
                ),
                &["result"],
            )?,
            certificate_reloads: IntCounterVec::new(
                Opts::new(
                    "snapgate_certificate_reloads_total",
                    "Certificate loads after their files changed on disk, by result: applied, or rejected (the certificates in use stay).",
                ),
                &["result"],
            )?,
            last_success: IntGauge::new(
                "snapgate_config_last_reload_success_timestamp_seconds",
                "When the running config was last applied (start or reload), in seconds since the Unix epoch.",
            )?,
        };
        registry.register(Box::new(m.reloads.clone()))?;
        registry.register(Box::new(m.certificate_reloads.clone()))?;
        registry.register(Box::new(m.last_success.clone()))?;
        // Both results from zero: a dashboard's reload panel has series
        // before the first reload.
        for result in ["applied", "rejected"] {
            m.reloads.with_label_values(&[result]);
        }
        m.applied_now();
        Ok(m)
    }

    fn applied_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_success
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }
}

/// What a reload works with, kept by [`Running`].
pub struct Reloading {
    /// The running config; locked for a whole reload (step 1).
    pub config: tokio::sync::Mutex<Config>,
    /// The VMM driver new pools restore with.
    pub driver: Arc<dyn Vmm>,
    /// The taps' network.
    pub net: crate::net::Network,
    /// The fence, unless `network.fence` is off.
    pub fence: Option<Arc<crate::net::Fence>>,
    /// Metrics of new pools.
    pub pool_metrics: PoolMetrics,
    /// Metrics of new targets.
    pub proxy_metrics: ProxyMetrics,
    /// The TLS listener's certificates.
    pub certs: Option<Arc<Certs>>,
    /// Pools being retired (step 6), until they close.
    pub retired: Arc<std::sync::Mutex<Vec<Pool>>>,
    /// Reload counts.
    pub metrics: ReloadMetrics,
    /// Tells the certificate watcher the files of a new config.
    pub certs_changed: Option<watch::Sender<TlsConfig>>,
    /// Tells the ACME task the hosts of a new config.
    pub acme_hosts: Option<watch::Sender<Vec<String>>>,
}

impl Reloading {
    /// Pools retired and not yet closed.
    pub fn retired(&self) -> Vec<Pool> {
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How an app changed (protocol step 4).
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Same,
    Resize,
    Limits,
    Replace,
}

/// `app` with everything step 4 applies in place set to fixed values: two
/// apps equal here run the same way.
fn what_runs(app: &AppConfig) -> AppConfig {
    let mut app = app.clone();
    let defaults: AppConfig = serde_yaml_ng::from_str("hosts: []").expect("hosts alone parse");
    app.hosts = Vec::new();
    app.pool = None;
    app.response_timeout = defaults.response_timeout;
    app.max_body_size = defaults.max_body_size;
    app.upstream_idle_timeout = defaults.upstream_idle_timeout;
    app.upstream_read_timeout = defaults.upstream_read_timeout;
    app
}

fn change(old: &AppConfig, new: &AppConfig) -> Change {
    // VMs get their egress slot as they start: an app that gains or loses
    // egress gets VMs that have (or lack) one. A change of the list alone
    // is the fence's (protocol step 4a).
    if what_runs(old) != what_runs(new) || old.egress.is_empty() != new.egress.is_empty() {
        return Change::Replace;
    }
    let limits = |a: &AppConfig| {
        (
            a.response_timeout,
            a.max_body_size,
            a.upstream_idle_timeout,
            a.upstream_read_timeout,
        )
    };
    let pool = |a: &AppConfig| match a.upstream() {
        Upstream::Vm(_, p) | Upstream::Runtime(_, p) => Some(p),
        Upstream::Static(_) => None,
    };
    if limits(old) != limits(new) {
        Change::Limits
    } else if pool(old) != pool(new) {
        Change::Resize
    } else {
        Change::Same
    }
}

/// The keys of protocol step 2 whose values differ.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let mut check = |key: &str, same: bool| {
        if !same {
            changed.push(key.to_owned());
        }
    };
    check("listen", old.listen == new.listen);
    check("admin", old.admin == new.admin);
    check(
        "admin_token_file",
        old.admin_token_file == new.admin_token_file,
    );
    check(
        "header_read_timeout",
        old.header_read_timeout == new.header_read_timeout,
    );
    check(
        "body_read_timeout",
        old.body_read_timeout == new.body_read_timeout,
    );
    check("send_timeout", old.send_timeout == new.send_timeout);
    check("access_log", old.access_log == new.access_log);
    check(
        "trusted_proxies",
        old.trusted_proxies == new.trusted_proxies,
    );
    check("limits", old.limits == new.limits);
    check("http2", old.http2 == new.http2);
    check("shutdown_grace", old.shutdown_grace == new.shutdown_grace);
    // By the count started: leaving it out or asking for more than the
    // cores may name the same number.
    check(
        "workers",
        crate::proxy::edge::count(old.workers) == crate::proxy::edge::count(new.workers),
    );
    check("state_dir", old.state_dir == new.state_dir);
    check("snapshot_dir", old.snapshot_dir() == new.snapshot_dir());
    check("vmm", old.vmm == new.vmm);
    check("network", old.network == new.network);
    check("cluster", old.cluster == new.cluster);
    match (&old.tls, &new.tls) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            check("tls.listen", a.listen == b.listen);
            check("tls.redirect_http", a.redirect_http == b.redirect_http);
            check("tls.redirect_port", a.redirect_port == b.redirect_port);
            check("tls.acme", a.acme == b.acme);
        }
        _ => check("tls", false),
    }
    for (name, rt) in &old.runtimes {
        if let Some(new_rt) = new.runtimes.get(name) {
            check(&format!("runtimes.{name}"), rt == new_rt);
        }
    }
    changed
}

impl Running {
    /// Loads `file` ([`Config::load`]) and applies it (protocol step 1):
    /// the summary, or why the file was rejected.
    pub async fn reload_file(&self, file: &std::path::Path) -> Result<String, String> {
        let loaded = Config::load(file).map_err(|e| e.to_string());
        let result = match loaded {
            Ok(new) => self.apply(new).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        self.count(&result);
        result
    }

    /// Applies `new` to the running gateway (the module doc's protocol):
    /// a one-line summary of what changed, or why it was rejected, in
    /// which case nothing changed.
    pub async fn reload(&self, new: Config) -> Result<String, ReloadError> {
        let result = self.apply(new).await;
        self.count(&result);
        result
    }

    /// Logs and counts a reload's outcome.
    fn count<E: std::fmt::Display>(&self, result: &Result<String, E>) {
        let m = &self.reloading.metrics;
        match result {
            Ok(summary) => {
                m.reloads.with_label_values(&["applied"]).inc();
                m.applied_now();
                info!("config reloaded: {summary}");
            }
            Err(e) => {
                m.reloads.with_label_values(&["rejected"]).inc();
                warn!("config reload rejected, the running config stays: {e}");
            }
        }
    }

    async fn apply(&self, new: Config) -> Result<String, ReloadError> {
        let r = &self.reloading;
        // Step 1.
        let mut current = r.config.lock().await;
        // Step 2.
        let fixed = needs_restart(&current, &new);
        if !fixed.is_empty() {
            return Err(ReloadError::NeedsRestart(fixed));
        }
        // Step 3.
        let store = match &new.tls {
            Some(tls) => Some(CertStore::load(tls)?),
            None => None,
        };
        // Step 4a.
        if let Some(fence) = &r.fence {
            fence
                .set_egress(&super::egress_of(&new))
                .await
                .map_err(|e| ReloadError::Fence(e.to_string()))?;
        }
        let result = self.apply_apps(&mut current, new, store).await;
        if let (Err(_), Some(fence)) = (&result, &r.fence) {
            if let Err(e) = fence.set_egress(&super::egress_of(&current)).await {
                warn!("putting the fence's old egress rules back: {e}");
            }
        }
        result
    }

    async fn apply_apps(
        &self,
        current: &mut tokio::sync::MutexGuard<'_, Config>,
        new: Config,
        store: Option<CertStore>,
    ) -> Result<String, ReloadError> {
        let r = &self.reloading;
        // Step 4.
        let old_table = self.proxy.table();
        let mut plan: Vec<(String, Change)> = Vec::new();
        for (name, app) in &new.apps {
            let change = match current.apps.get(name) {
                Some(old) => change(old, app),
                None => Change::Replace,
            };
            plan.push((name.clone(), change));
        }
        // A copy: the stocks stay listed (for pids and shutdown) meanwhile.
        let runtimes = self.lock_runtimes().clone();
        let mut factories = Factories {
            tasks: self.tasks.clone(),
            pins: Vec::new(),
            config: &new,
            driver: r.driver.clone(),
            net: r.net.clone(),
            fence: r.fence.clone(),
            builder: Builder::new(r.driver.as_ref(), &r.net, new.snapshot_dir()),
            runtime_metrics: self.runtime_metrics.clone(),
            runtimes,
        };
        let mut targets: HashMap<Arc<str>, Arc<Target>> = HashMap::new();
        let mut made: Vec<Arc<Target>> = Vec::new();
        // Pools kept, with their new sizing: applied once the table is in.
        let mut resize = Vec::new();
        let mut failed = None;
        for (name, how) in &plan {
            let old = old_table.targets().get(name.as_str());
            if let (
                Change::Resize | Change::Limits,
                Some(Target::Pool { pool, .. }),
                Upstream::Vm(_, cfg) | Upstream::Runtime(_, cfg),
            ) = (how, old.map(|t| &**t), new.apps[name].upstream())
            {
                resize.push((pool.clone(), cfg));
            }
            let reuse = match (how, old) {
                (Change::Same | Change::Resize, Some(old)) => {
                    targets.insert(Arc::from(name.as_str()), old.clone());
                    continue;
                }
                (Change::Limits, Some(old)) => match &**old {
                    Target::Pool { pool, .. } => Some(pool.clone()),
                    Target::Static { .. } => None,
                },
                _ => None,
            };
            let fresh = reuse.is_none();
            let target = factories
                .target(
                    name,
                    &r.pool_metrics,
                    &r.proxy_metrics,
                    reuse,
                    &mut std::io::sink(),
                )
                .await;
            match target {
                Ok(t) => {
                    let t = Arc::new(t);
                    if fresh {
                        made.push(t.clone());
                    }
                    targets.insert(Arc::from(name.as_str()), t);
                }
                Err(error) => {
                    failed = Some(ReloadError::App {
                        app: name.clone(),
                        error,
                    });
                    break;
                }
            }
        }
        let (runtimes, pins) = (factories.runtimes, factories.pins);
        *self.lock_runtimes() = runtimes;
        if let Some(e) = failed {
            close_targets(made.iter()).await;
            return Err(e);
        }
        self.pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(pins);
        // Step 5.
        // The table swapped out is `old_table`: only a reload swaps, and
        // this one holds the config's lock.
        self.proxy.swap(Table::new(router_of(&new), targets));
        if let (Some(certs), Some(store)) = (&r.certs, store) {
            certs.swap(store);
        }
        if let (Some(tx), Some(tls)) = (&r.certs_changed, &new.tls) {
            tx.send_replace(tls.clone());
        }
        if let Some(tx) = &r.acme_hosts {
            tx.send_replace(crate::acme::managed_hosts(&new));
        }
        for (pool, cfg) in &resize {
            pool.resize(cfg);
        }
        // Step 6: every old pool the new table has not kept.
        let new_pools = self.proxy.pools();
        let gone = Arc::downgrade(&old_table);
        for target in old_table.targets().values() {
            if let Target::Pool { pool, .. } = &**target {
                if !new_pools.iter().any(|p| p.same_as(pool)) {
                    self.retire(pool.clone(), gone.clone(), current);
                }
            }
        }
        // Step 7.
        let added: BTreeSet<&String> = new
            .apps
            .keys()
            .filter(|n| !current.apps.contains_key(*n))
            .collect();
        let removed: BTreeSet<&String> = current
            .apps
            .keys()
            .filter(|n| !new.apps.contains_key(*n))
            .collect();
        let with = |how: Change| -> Vec<&String> {
            plan.iter()
                .filter(|(n, c)| *c == how && current.apps.contains_key(n))
                .map(|(n, _)| n)
                .collect()
        };
        let summary = format!(
            "added {added:?}, removed {removed:?}, replaced {:?}, limits changed {:?}, pools resized {:?}, certificates {}",
            with(Change::Replace),
            with(Change::Limits),
            with(Change::Resize),
            if new.tls.is_some() { "reloaded" } else { "none" },
        );
        **current = new;
        Ok(summary)
    }

    /// Step 6 for `pool`, whose app `old` (the table it was in) no longer
    /// routes to.
    fn retire(&self, pool: Pool, old: std::sync::Weak<Table>, config: &Config) {
        if let Some(Upstream::Vm(_, mut cfg) | Upstream::Runtime(_, mut cfg)) =
            config.apps.get(pool.app()).map(AppConfig::upstream)
        {
            cfg.min_warm = 0;
            pool.resize(&cfg);
        }
        self.reloading
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pool.clone());
        let cancel = self.tasks.cancel.clone();
        let retired = Arc::downgrade(&self.reloading.retired);
        self.tasks.tracker.spawn(async move {
            let mut stats = pool.watch();
            loop {
                let s = *stats.borrow_and_update();
                // Requests that routed on the old table hold it until they
                // have claimed (or given up).
                if old.strong_count() == 0 && s.queued == 0 && s.leased == 0 {
                    break;
                }
                tokio::select! {
                    _ = stats.changed() => {}
                    // The table's holders are not watched: look again.
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = cancel.cancelled() => return,
                }
            }
            info!(app = pool.app(), "retired pool drained; closing it");
            pool.close(Duration::from_secs(5)).await;
            if let Some(retired) = retired.upgrade() {
                retired
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|p| !p.same_as(&pool));
            }
        });
    }
}

/// The certificate and key files of `tls`, as named and as their links
/// resolve (certbot's `live/` names link into `archive/`).
fn files_of(tls: &TlsConfig) -> BTreeSet<PathBuf> {
    tls.certificates
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .flat_map(|p| [std::path::absolute(p).ok(), std::fs::canonicalize(p).ok()])
        .flatten()
        .collect()
}

/// Starts the certificate watcher of the module doc for `tls`'s files,
/// swapping into `certs`; returns the sender a reload gives new file
/// lists to.
pub fn watch_certificates(
    certs: Arc<Certs>,
    tls: TlsConfig,
    metrics: ReloadMetrics,
    tasks: &Tasks,
) -> anyhow::Result<watch::Sender<TlsConfig>> {
    use notify::Watcher;
    let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
    // The files themselves, as named and as their links resolve: only
    // events on them count (other files share their directories).
    let files = Arc::new(std::sync::RwLock::new(files_of(&tls)));
    let ours = files.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let files = ours.read().unwrap_or_else(|p| p.into_inner());
        // No path: the watcher lost events and asks for a rescan.
        if event.paths.is_empty() || event.paths.iter().any(|p| files.contains(p)) {
            let _ = events_tx.send(());
        }
    })?;
    let dirs = |tls: &TlsConfig| -> BTreeSet<PathBuf> {
        files_of(tls)
            .iter()
            .filter_map(|p| p.parent().map(|d| d.to_path_buf()))
            .collect()
    };
    let mut watched = dirs(&tls);
    for dir in &watched {
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| {
                anyhow::anyhow!("watching {} for certificate changes: {e}", dir.display())
            })?;
    }
    let (tx, mut rx) = watch::channel(tls);
    let cancel = tasks.cancel.clone();
    tasks.tracker.spawn(async move {
        loop {
            tokio::select! {
                got = events.recv() => if got.is_none() { return },
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let tls = rx.borrow_and_update().clone();
                    *files.write().unwrap_or_else(|p| p.into_inner()) = files_of(&tls);
                    let now = dirs(&tls);
                    for dir in watched.difference(&now) {
                        let _ = watcher.unwatch(dir);
                    }
                    for dir in now.difference(&watched) {
                        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                            warn!("watching {} for certificate changes: {e}", dir.display());
                        }
                    }
                    watched = now;
                    continue;
                }
                _ = cancel.cancelled() => return,
            }
            // Quiet for SETTLE: a renewal writes several files.
            loop {
                tokio::select! {
                    got = events.recv() => if got.is_none() { return },
                    _ = tokio::time::sleep(SETTLE) => break,
                    _ = cancel.cancelled() => return,
                }
            }
            let tls = rx.borrow().clone();
            // Links may point elsewhere now: their directories too.
            *files.write().unwrap_or_else(|p| p.into_inner()) = files_of(&tls);
            let now = dirs(&tls);
            for dir in now.difference(&watched) {
                if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                    warn!("watching {} for certificate changes: {e}", dir.display());
                }
            }
            watched.extend(now);
            match CertStore::load(&tls) {
                // A reload swapped in its own store meanwhile: it wins.
                Ok(_) if rx.has_changed().unwrap_or(true) => continue,
                Ok(store) => {
                    certs.swap(store);
                    metrics
                        .certificate_reloads
                        .with_label_values(&["applied"])
                        .inc();
                    info!("certificate files changed: reloaded");
                }
                Err(e) => {
                    metrics
                        .certificate_reloads
                        .with_label_values(&["rejected"])
                        .inc();
                    warn!("certificate files changed but do not load; the certificates in use stay: {e}");
                }
            }
        }
    });
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(apps: &str, top: &str) -> Config {
        Config::parse(&format!("{top}apps:\n{apps}")).unwrap()
    }

    fn app(yaml: &str) -> AppConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn each_kind_of_app_change_is_told_apart() {
        let base = "hosts: [a.test]\nupstream: 127.0.0.1:1\n";
        let vm = "hosts: [a.test]\nruntime: { name: node, code: /srv/a }\n";
        assert_eq!(change(&app(base), &app(base)), Change::Same);
        assert_eq!(
            change(&app(base), &app("hosts: [b.test]\nupstream: 127.0.0.1:1\n")),
            Change::Same
        );
        assert_eq!(
            change(&app(base), &app(&format!("{base}response_timeout: 5s\n"))),
            Change::Limits
        );
        assert_eq!(
            change(&app(base), &app("hosts: [a.test]\nupstream: 127.0.0.1:2\n")),
            Change::Replace
        );
        assert_eq!(
            change(&app(base), &app(&format!("{base}upstream_protocol: h2c\n"))),
            Change::Replace
        );
        assert_eq!(
            change(&app(vm), &app(&format!("{vm}pool: {{ min_warm: 2 }}\n"))),
            Change::Resize
        );
        assert_eq!(
            change(
                &app(vm),
                &app(&format!(
                    "{vm}pool: {{ min_warm: 2 }}\nmax_body_size: 1MiB\n"
                ))
            ),
            Change::Limits
        );
        assert_eq!(
            change(
                &app(vm),
                &app("hosts: [a.test]\nruntime: { name: node, code: /srv/b }\n")
            ),
            Change::Replace
        );
    }

    #[test]
    fn only_settings_a_restart_applies_are_named() {
        let apps = "  a:\n    hosts: [a.test]\n    upstream: 127.0.0.1:1\n";
        let old = config(apps, "listen: 127.0.0.1:8080\n");
        let same = config(
            "  b:\n    hosts: [b.test]\n    upstream: 127.0.0.1:2\n",
            "listen: 127.0.0.1:8080\n",
        );
        assert!(needs_restart(&old, &same).is_empty());
        let moved = config(
            apps,
            "listen: 127.0.0.1:8081\nlimits: { max_connections: 5 }\nhttp2: { enabled: false }\n",
        );
        assert_eq!(needs_restart(&old, &moved), ["listen", "limits", "http2"]);
        let e = ReloadError::NeedsRestart(needs_restart(&old, &moved)).to_string();
        assert_eq!(
            e,
            "listen, limits, http2 changed; only a restart applies them"
        );
    }
}

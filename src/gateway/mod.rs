//! Wiring: from a validated config to a running gateway, and back to
//! nothing.
//!
//! # Start-up, in order
//! 1. Take the exclusive lock on `state_dir` ([`StateLock`]): a second
//!    gateway on the same directory stops here, having touched nothing.
//! 2. Kill VMMs an earlier gateway left (pid files in `<state_dir>/vms/`
//!    whose owner process is gone), then delete the taps recorded with
//!    them. VMs of a live `snapgate snapshot build` are left alone.
//!    Then the fence (`crate::net::Fence`, unless `network.fence` is off):
//!    this gateway's nftables table, written afresh, replacing what a run
//!    that died left.
//! 3. Bind the listener and the admin listener: a taken port fails
//!    start-up before any VM exists. Then the VMM driver checks, with its
//!    jail (`crate::vmm::jail`), that the host can do each part that is
//!    on, and removes the VM cgroups a run that died left.
//! 4. For each VM app, use its snapshot if it was taken from the configured
//!    image as it is now, else boot a template and take one. Runtime apps:
//!    pack each app's code; ensure the runtime's shared snapshot (and start
//!    its stock of warm clones) or, for `snapshot: app`, the app's own.
//!    Every snapshot used is opened at its own directory and pinned
//!    ([`crate::snapshot::pin`]) for the gateway's life, as is the code
//!    image of a per-app snapshot.
//! 5. Start each app's pool (which pre-warms `min_warm` instances) and
//!    serve. A reload later applies a new config as a diff
//!    ([`Running::reload`]).
//!
//! # Tasks
//! Every task the gateway starts (the listeners with the connections they
//! own, the admin listener's connections, each engine's maintenance,
//! restores, stops and exit waiters) runs on one [`Tasks`] tracker under
//! one cancel token. The listeners' accept loops, and the tasks of the
//! connections they serve, run on the edge workers (`proxy::edge`); the
//! rest on the runtime `start` was called on. The workers end last, once
//! every task has. Tasks of upstream connections end with their
//! connections (closed by the app, or dropped by snapgate: see
//! `src/proxy/upstream.rs`), a guest probe's connection is aborted with
//! its request, and the netlink connection belongs to its `Network`. [`Running::shutdown`]: stop accepting, let in-flight
//! requests finish for `shutdown_grace`, close every pool (failing held
//! requests with 503 and destroying every VM, whose taps go with it), then
//! every runtime stock, then cancel and wait for every task, then take the
//! fence down (no tap of this gateway is left for it to fence). Dropping
//! [`Running`] without a shutdown cancels every task: VMs being restored
//! are dropped (which kills their VMMs); instances die with the process.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

mod reload;
mod snapshots;
mod state;

pub use reload::{Ask as ReloadAsk, ReloadError};

pub use snapshots::{build as build_snapshots, driver, job_for_app};
pub use state::{StateLock, StateLockError};

use state::lock as lock_state_dir;

use crate::config::{AcmeChallenge, Config, StartFrom, Upstream};
use crate::net::{Egress, Fence, Network};
use crate::pool::{AppFactory, Pool, PoolMetrics, SnapshotFactory, StartPath, Tasks};
use crate::proxy::tls::{CertStore, Certs};
use crate::proxy::{AppLimits, Apps, ProxyMetrics, Router, Table, Target};
use crate::runtime::{self, CodeSource, Runtime, RuntimeFactory, StartSpec};
use crate::snapshot::{Builder, Job, Pin};
use crate::vmm::{Snapshot, Vmm};
use crate::{admin, vmm};

/// A running gateway.
pub struct Running {
    /// Where it serves HTTP.
    pub listen: SocketAddr,
    /// Where it serves `/metrics`.
    pub admin: SocketAddr,
    /// Where it serves HTTPS, if `tls` is configured.
    pub tls: Option<SocketAddr>,
    /// The proxy (pools, for tests and admin use).
    pub proxy: Arc<Apps>,
    /// The metrics registry.
    pub registry: Registry,
    /// Runtime stocks by runtime name (runtimes whose apps start from the
    /// shared snapshot).
    runtimes: Arc<std::sync::Mutex<HashMap<String, Runtime>>>,
    /// Runtime metrics.
    pub runtime_metrics: runtime::RuntimeMetrics,
    /// What a reload needs ([`Running::reload`]).
    reloading: reload::Reloading,
    stop: watch::Sender<bool>,
    /// Every listener's accept loop on every edge worker.
    servers: Vec<JoinHandle<()>>,
    /// The edge workers (`proxy::edge`): dropped, they end.
    workers: crate::proxy::edge::Workers,
    admin_task: JoinHandle<()>,
    admin_stop: tokio_util::sync::CancellationToken,
    tasks: Tasks,
    /// The snapshots and code images the gateway restores from.
    pins: std::sync::Mutex<Vec<Pin>>,
    /// The gateway's exclusive lock on its `state_dir`.
    _state_lock: StateLock,
    /// Reloads asked for through the admin listener, until taken.
    reload_requests: Option<tokio::sync::mpsc::Receiver<reload::Ask>>,
    /// The cluster this node is in, if any.
    cluster: Option<crate::cluster::Cluster>,
}

impl Drop for Running {
    /// Dropping the handle without [`Running::shutdown`] still stops
    /// everything: every task is cancelled (restores in flight drop their
    /// VMs, which kills their VMMs) and the listeners close.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.tasks.cancel.cancel();
    }
}

/// Starts the gateway described by `config`; progress lines go to `out`.
pub async fn start(config: &Config, out: &mut (dyn Write + Send)) -> anyhow::Result<Running> {
    // Before anything else: a second gateway touches nothing.
    let state_lock = lock_state_dir(&config.state_dir)?;
    let net = Network::new(config.network.clone())?;
    clean_up_stale(config, &net, out).await?;
    // The fence stands before any VM exists (`crate::net::Fence`).
    let fence = if config.network.fence {
        Some(Fence::up(&net, &egress_of(config)).await?)
    } else {
        tracing::warn!("network.fence is off: guests reach whatever the host does");
        None
    };
    // Bound first: a taken port fails start-up before any VM exists.
    let (listener, admin_listener) = bind(config).await?;
    let (listen, admin) = (listener.local_addr()?, admin_listener.local_addr()?);
    // The edge workers too, before any VM exists.
    let count = crate::proxy::edge::count(config.workers);
    let workers = crate::proxy::edge::Workers::start(count).context("starting the edge workers")?;
    if let Some(asked) = config.workers.filter(|&asked| asked > count) {
        tracing::warn!(
            asked,
            cores = crate::proxy::edge::cores(),
            "workers: more than the cores snapgate may run on; starting one per core"
        );
    }
    // Certificates load before any VM starts: a bad file fails start-up.
    let tls = match &config.tls {
        Some(tls) => {
            let store = Certs::new(CertStore::load(tls)?);
            let tls_alpn = config.acme_challenge() == Some(AcmeChallenge::TlsAlpn01);
            let acceptor = tokio_rustls::TlsAcceptor::from(
                store.server_config(config.http2.enabled, tls_alpn)?,
            );
            let listener = TcpListener::bind(tls.listen)
                .await
                .with_context(|| format!("tls.listen: binding {}", tls.listen))?;
            Some((listener, acceptor, store))
        }
        None => None,
    };
    let registry = Registry::new();
    register_process_metrics(&registry)?;
    let pool_metrics = PoolMetrics::new(&registry)?;
    let proxy_metrics = ProxyMetrics::new(&registry)?;
    let runtime_metrics =
        runtime::RuntimeMetrics::new(&registry)?.with_recent(pool_metrics.recent().clone());
    let driver = driver(config)?;
    let tasks = Tasks::default();
    // A start-up dropped part-way (a signal while a snapshot builds) ends
    // every task it started.
    let unfinished = tasks.cancel.clone().drop_guard();
    // The admin listener serves from here: probes answer while snapshots
    // build; the API once the apps are up (`serving`).
    let token = match &config.admin_token_file {
        Some(path) => Some(admin::Token::from_file(path)?),
        None => None,
    };
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
    let serving = Arc::new(std::sync::OnceLock::new());
    let admin_stop = tasks.cancel.child_token();
    let admin_task = tasks.tracker.spawn(admin::serve(
        admin_listener,
        admin::Admin {
            registry: registry.clone(),
            reloads: reload_tx,
            token,
            serving: serving.clone(),
            became_ready: Default::default(),
        },
        admin_stop.clone(),
        tasks.tracker.clone(),
    ));
    let mut factories = Factories {
        tasks: tasks.clone(),
        pins: Vec::new(),
        config,
        driver: driver.clone(),
        net: net.clone(),
        fence: fence.clone(),
        builder: Builder::new(driver.as_ref(), &net, config.snapshot_dir()),
        runtime_metrics: runtime_metrics.clone(),
        runtimes: HashMap::new(),
    };

    let mut targets = HashMap::new();
    for name in config.apps.keys() {
        match factories
            .target(name, &pool_metrics, &proxy_metrics, None, out)
            .await
        {
            Ok(target) => targets.insert(Arc::from(name.as_str()), Arc::new(target)),
            Err(e) => {
                abandon(targets.values(), factories.runtimes.values(), &tasks).await;
                return Err(e);
            }
        };
    }
    let (runtimes, pins) = (factories.runtimes, factories.pins);
    let runtimes = Arc::new(std::sync::Mutex::new(runtimes));
    let cluster = match &config.cluster {
        Some(c) => Some(crate::cluster::Cluster::new(
            c,
            crate::cluster::ClusterMetrics::new(&registry)?,
        )?),
        None => None,
    };
    let mut apps = Apps::new(
        Table::new(router_of(config), targets),
        proxy_metrics.clone(),
        tasks.clone(),
    );
    if let (Some(cluster), Some(c)) = (&cluster, &config.cluster) {
        // Peer connections: idle ones dropped before the peer closes them
        // (its `header_read_timeout`, taken to be this node's: the nodes
        // share their config), and a write blocked a minute ends one.
        let peer_upstreams = crate::proxy::UpstreamConfig {
            idle_timeout: config.header_read_timeout / 2,
            write_timeout: std::time::Duration::from_secs(60),
            replays: proxy_metrics.replays("(peers)"),
            tasks: tasks.clone(),
            h2c: false,
            connect_timeout: c.peer_connect_timeout,
        };
        apps = apps.with_cluster(cluster.clone(), peer_upstreams);
    }
    let proxy = Arc::new(apps);
    if let Some(cluster) = &cluster {
        let apps = proxy.clone();
        cluster.spawn(Arc::new(move || apps.pools()), &tasks);
    }
    let redirect = match (&config.tls, &tls) {
        (Some(cfg), Some((listener, _, certs))) if cfg.redirect_http => {
            Some(crate::proxy::Redirect {
                certs: certs.clone(),
                port: match cfg.redirect_port {
                    Some(port) => port,
                    None => listener.local_addr()?.port(),
                },
                trusted: config.trusted_proxies.clone().into(),
            })
        }
        _ => None,
    };
    let max_header_bytes =
        usize::try_from(config.limits.max_header_bytes.as_u64()).unwrap_or(usize::MAX);
    // One in-flight cap and one set of connection counts for both listeners.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(
        config.limits.max_requests_in_flight,
    ));
    let http01 = Arc::new(crate::acme::Http01::default());
    let acme_http01 =
        (config.acme_challenge() == Some(AcmeChallenge::Http01)).then(|| http01.clone());
    let stack_for = |proto, redirect, certs, acme_http01| {
        crate::proxy::stack::build(
            proxy.clone(),
            &crate::proxy::StackConfig {
                body_read_timeout: config.body_read_timeout,
                access_log: config.access_log,
                in_flight: in_flight.clone(),
                max_header_bytes,
                max_headers: config.limits.max_headers,
                trusted_proxies: config.trusted_proxies.clone(),
                proto,
                redirect,
                certs,
                acme_http01,
                cluster: cluster.clone(),
            },
            proxy_metrics.clone(),
            tasks.clone(),
        )
    };
    let listening = crate::proxy::Listening {
        header_read_timeout: config.header_read_timeout,
        send_timeout: config.send_timeout,
        max_header_bytes,
        max_headers: config.limits.max_headers,
        slots: crate::proxy::ConnectionSlots::new(
            config.limits.max_connections,
            config.limits.max_connections_per_client,
        ),
        trusted_proxies: config.trusted_proxies.clone(),
        cluster: cluster.clone(),
        grace: config.shutdown_grace,
        http2: config.http2.enabled.then(|| config.http2.clone()),
        tasks: tasks.clone(),
    };

    let (stop, stop_rx) = watch::channel(false);
    let cert_store = tls.as_ref().map(|(_, _, certs)| certs.clone());
    // Certificate files are watched for as long as the gateway runs.
    let reload_metrics = reload::ReloadMetrics::new(&registry)?;
    let certs_changed = match (&config.tls, &cert_store) {
        (Some(cfg), Some(certs)) => Some(reload::watch_certificates(
            certs.clone(),
            cfg.clone(),
            reload_metrics.clone(),
            &tasks,
        )?),
        _ => None,
    };
    let reload_proxy_metrics = proxy_metrics.clone();
    // Protocol step 2 of `proxy::edge`: each listener's accept loop on
    // every edge worker, over its own duplicate of the socket.
    let on_workers = OnWorkers {
        workers: &workers,
        listening: &listening,
        metrics: &proxy_metrics,
        stop: &stop_rx,
        tasks: &tasks,
    };
    let mut servers = Vec::new();
    let tls_listen = match tls {
        Some((tls_listener, acceptor, certs)) => {
            let addr = tls_listener.local_addr()?;
            servers.extend(on_workers.serve(
                tls_listener,
                stack_for("https", None, Some(certs), None),
                Some(acceptor),
            )?);
            Some(addr)
        }
        None => None,
    };
    servers.extend(on_workers.serve(
        listener,
        stack_for("http", redirect, None, acme_http01),
        None,
    )?);
    // Certificates ordered once the listeners serve the challenges.
    let acme_hosts = match &cert_store {
        Some(certs) => {
            let metrics = crate::acme::AcmeMetrics::new(&registry)?;
            crate::acme::Acme::new(config, certs.clone(), http01, metrics).map(|acme| {
                let (tx, rx) = watch::channel(crate::acme::managed_hosts(config));
                acme.spawn(rx, &tasks);
                tx
            })
        }
        None => None,
    };
    let _ = serving.set(admin::Serving {
        apps: proxy.clone(),
        runtimes: runtimes.clone(),
        recent: pool_metrics.recent().clone(),
        started: std::time::SystemTime::now(),
        cluster: cluster.clone(),
    });
    unfinished.disarm();
    info!(%listen, %admin, workers = workers.handles().len(), "serving");
    // Serving has begun: a progress line that cannot be written (a closed
    // pipe) must not end it.
    let https = tls_listen.map_or(String::new(), |a| format!(", https://{a}"));
    let _ = writeln!(
        out,
        "serving on http://{listen}{https}, metrics on http://{admin}/metrics"
    );
    Ok(Running {
        listen,
        admin,
        tls: tls_listen,
        proxy,
        reloading: reload::Reloading {
            config: tokio::sync::Mutex::new(config.clone()),
            driver,
            net,
            fence,
            pool_metrics,
            proxy_metrics: reload_proxy_metrics,
            certs: cert_store,
            retired: Default::default(),
            metrics: reload_metrics,
            certs_changed,
            acme_hosts,
        },
        registry,
        runtimes,
        runtime_metrics,
        stop,
        servers,
        workers,
        admin_task,
        admin_stop,
        tasks,
        pins: std::sync::Mutex::new(pins),
        _state_lock: state_lock,
        reload_requests: Some(reload_rx),
        cluster,
    })
}

/// What every listener's accept loops share (`proxy::edge`, step 2).
struct OnWorkers<'a> {
    workers: &'a crate::proxy::edge::Workers,
    listening: &'a crate::proxy::Listening,
    metrics: &'a ProxyMetrics,
    stop: &'a watch::Receiver<bool>,
    tasks: &'a Tasks,
}

impl OnWorkers<'_> {
    /// Serves `listener` with `stack` (over TLS with `acceptor`) on every
    /// edge worker, each over its own duplicate of the socket, registered
    /// with that worker's reactor; the accept loops' handles.
    fn serve(
        &self,
        listener: TcpListener,
        stack: crate::proxy::Stack,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let listener = listener.into_std()?;
        let mut servers = Vec::new();
        for handle in self.workers.handles() {
            // Registered with the worker's reactor here: a socket that
            // cannot be fails start-up.
            let socket = {
                let _worker = handle.enter();
                TcpListener::from_std(listener.try_clone()?)?
            };
            servers.push(self.tasks.tracker.spawn_on(
                crate::proxy::serve(
                    socket,
                    stack.clone(),
                    self.listening.clone(),
                    self.metrics.clone(),
                    acceptor.clone(),
                    self.stop.clone(),
                ),
                handle,
            ));
        }
        Ok(servers)
    }
}

/// `snapgate_build_info` (the version and commit running, always 1) and
/// the process's own metrics: `snapgate_process_resident_memory_bytes`,
/// `snapgate_process_open_fds`, CPU seconds, start time and more, read
/// from `/proc/self` at each scrape (the `prometheus` crate's process
/// collector).
fn register_process_metrics(registry: &Registry) -> prometheus::Result<()> {
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "snapgate_build_info",
            "The build running: its version and commit; always 1.",
        ),
        &["version", "commit"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("VERGEN_GIT_SHA")])
        .set(1);
    registry.register(Box::new(info))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::new(std::process::id() as i32, "snapgate"),
    ))
}

/// The listener and the admin listener.
async fn bind(config: &Config) -> anyhow::Result<(TcpListener, TcpListener)> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen: binding {}", config.listen))?;
    let admin = TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("admin: binding {}", config.admin))?;
    Ok((listener, admin))
}

/// The router of `config`'s apps.
fn router_of(config: &Config) -> Router {
    Router::new(config.apps.iter().map(|(n, a)| (n.as_str(), &a.hosts[..])))
}

/// Undoes a start-up that failed part-way: the pools and runtime stocks
/// made so far close (destroying their VMs), and every task they started
/// ends before the error is returned.
async fn abandon(
    targets: impl Iterator<Item = &Arc<Target>>,
    runtimes: impl Iterator<Item = &Runtime>,
    tasks: &Tasks,
) {
    close_targets(targets).await;
    for runtime in runtimes {
        runtime.close(std::time::Duration::from_secs(5)).await;
    }
    tasks.cancel.cancel();
    tasks.tracker.close();
    tasks.tracker.wait().await;
}

/// Closes the pools of `targets` (destroying their VMs).
async fn close_targets(targets: impl Iterator<Item = &Arc<Target>>) {
    for target in targets {
        if let Target::Pool { pool, .. } = &**target {
            pool.close(std::time::Duration::from_secs(5)).await;
        }
    }
}

/// Kills VMMs an earlier gateway left and removes their taps (module doc,
/// step 2).
async fn clean_up_stale(
    config: &Config,
    net: &Network,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let stale = vmm::process::kill_stale(&config.state_dir);
    let removed = net.remove_taps(&stale.taps).await?;
    if !stale.killed.is_empty() || !removed.is_empty() {
        writeln!(
            out,
            "cleaned up after an earlier run: killed VMMs {:?}, removed taps {removed:?}",
            stale.killed
        )?;
    }
    Ok(())
}

/// Makes the instance factory of each VM and runtime app, taking (or
/// reusing) the snapshots they start from and starting each runtime's stock
/// once, for all its apps.
struct Factories<'a> {
    tasks: Tasks,
    pins: Vec<Pin>,
    config: &'a Config,
    driver: Arc<dyn Vmm>,
    net: Network,
    fence: Option<Arc<Fence>>,
    builder: Builder<'a>,
    runtime_metrics: runtime::RuntimeMetrics,
    runtimes: HashMap<String, Runtime>,
}

/// Each app's `egress`, for the fence.
pub(crate) fn egress_of(config: &Config) -> std::collections::BTreeMap<String, Vec<Egress>> {
    config
        .apps
        .iter()
        .map(|(name, app)| (name.clone(), app.egress.clone()))
        .collect()
}

impl Factories<'_> {
    /// Where the requests of app `name` go: its pool (started here, or
    /// `reuse`d: a reload that changed only the app's limits) or its static
    /// upstream.
    async fn target(
        &mut self,
        name: &str,
        pool_metrics: &PoolMetrics,
        proxy_metrics: &ProxyMetrics,
        reuse: Option<Pool>,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<Target> {
        let app = &self.config.apps[name];
        let limits = AppLimits {
            response_timeout: app.response_timeout,
            upstream_read_timeout: app.upstream_read_timeout,
            max_body_size: app.max_body_size.as_u64(),
        };
        let upstream_config = crate::proxy::UpstreamConfig {
            idle_timeout: app.upstream_idle_timeout,
            write_timeout: app.upstream_read_timeout,
            replays: proxy_metrics.replays(name),
            tasks: self.tasks.clone(),
            h2c: app.upstream_protocol == crate::config::UpstreamProtocol::H2c,
            connect_timeout: crate::proxy::CONNECT_TIMEOUT,
        };
        let pool_cfg = match app.upstream() {
            Upstream::Static(addr) => {
                return Ok(Target::Static {
                    app: Arc::new(proxy_metrics.for_app(name)),
                    upstream: crate::proxy::Upstream::new(addr, None, upstream_config),
                    limits,
                })
            }
            Upstream::Vm(_, pool_cfg) | Upstream::Runtime(_, pool_cfg) => pool_cfg,
        };
        let internal_path = match app.upstream() {
            Upstream::Vm(spec, _) => spec
                .on_restore
                .as_ref()
                .map(|h| crate::path::normalize(&h.path)),
            _ => None,
        };
        let pool = match reuse {
            Some(pool) => pool,
            None => {
                let factory = self.for_app(name, out).await?;
                writeln!(
                    out,
                    "{name}: pool min_warm={} max_instances={} max_concurrency={} idle_timeout={:?} start_timeout={:?}",
                    pool_cfg.min_warm, pool_cfg.max_instances, pool_cfg.max_concurrency, pool_cfg.idle_timeout, pool_cfg.start_timeout
                )?;
                Pool::new(name, &pool_cfg, factory, pool_metrics.clone(), &self.tasks)
            }
        };
        Ok(Target::Pool {
            app: Arc::new(proxy_metrics.for_app(name)),
            upstreams: crate::proxy::InstanceUpstreams::new(upstream_config),
            pool,
            limits,
            internal_path,
        })
    }

    async fn for_app(
        &mut self,
        name: &str,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<AppFactory> {
        let (driver, net) = (self.driver.clone(), self.net.clone());
        let fence = self.fence.clone();
        let admission = move |app: Option<&str>| {
            fence
                .clone()
                .map(|fence| crate::pool::vm::Admission::new(fence, app))
        };
        let own = admission(Some(name));
        let rt_app = match self.config.apps[name].upstream() {
            Upstream::Vm(spec, _) => {
                let snapshot = self.ensure(&Job::vm_app(name, spec), out).await?;
                let hook = spec
                    .on_restore
                    .as_ref()
                    .map(|h| h.hook(spec.guest_port, &spec.ready_path));
                let factory = SnapshotFactory::new(driver, net, snapshot, hook).with_fence(own);
                return Ok(AppFactory::new(factory, StartPath::Clone));
            }
            Upstream::Runtime(rt_app, _) => rt_app,
            Upstream::Static(_) => unreachable!("static apps have no factory"),
        };
        let rt_name = &rt_app.name;
        let rt_cfg = &self.config.runtimes[rt_name];
        let code = CodeSource::for_app(self.config, name, rt_app);
        // A code source that cannot be packed is reported now.
        let image = code
            .current()
            .with_context(|| format!("app {name}: packing its code"))?;
        writeln!(
            out,
            "{name}: runtime {rt_name} ({:?} snapshot), code {} -> {} ({} KiB, sha256 {})",
            rt_app.snapshot,
            rt_app.code.display(),
            image.path.display(),
            image.bytes / 1024,
            &image.hash[..16]
        )?;
        Ok(match rt_app.snapshot {
            StartFrom::Runtime => {
                let stock = match self.runtimes.get(rt_name) {
                    Some(stock) => stock.clone(),
                    None => {
                        let job = snapshots::runtime_job(rt_name, rt_cfg);
                        let snapshot = self.ensure(&job, out).await?;
                        writeln!(out, "runtime {rt_name}: min_warm={}", rt_cfg.min_warm)?;
                        let stock = Runtime::start(
                            rt_name,
                            SnapshotFactory::new(driver, net, snapshot, None)
                                .with_fence(admission(None)),
                            rt_cfg.min_warm,
                            rt_cfg.start_timeout,
                            self.runtime_metrics.clone(),
                            &self.tasks,
                        );
                        self.runtimes.insert(rt_name.clone(), stock.clone());
                        stock
                    }
                };
                let start = StartSpec::new(name, rt_app, rt_cfg);
                AppFactory::new(
                    RuntimeFactory::new(stock, code, start).with_fence(own),
                    StartPath::RuntimeClone,
                )
            }
            StartFrom::App => {
                let job = snapshots::app_in_runtime_job(name, rt_app, rt_cfg, &image);
                let snapshot = self.ensure(&job, out).await?;
                // Its clones open the code image at every restore.
                let code_pin = crate::snapshot::pin::pin(&image.path)
                    .with_context(|| format!("{name}: pinning its code image"))?;
                self.pins.push(code_pin);
                let agent_port = rt_cfg.image.guest_port;
                let hook = runtime::agent_hook(agent_port, &rt_cfg.image.ready_path);
                AppFactory::new(
                    SnapshotFactory::new(driver, net, snapshot, Some(hook)).with_fence(own),
                    StartPath::Clone,
                )
            }
        })
    }

    /// The job's snapshot, pinned for as long as the gateway runs.
    async fn ensure(
        &mut self,
        job: &Job,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<Snapshot> {
        let (snapshot, pin) = self
            .builder
            .ensure(job, out)
            .await
            .with_context(|| format!("{}: preparing its snapshot", job.name))?;
        self.pins.push(pin);
        Ok(snapshot)
    }
}

impl Running {
    /// VMM process ids of every VM the gateway has: app instances and warm
    /// runtime clones.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.pools().iter().flat_map(|p| p.pids()).collect();
        for runtime in self.lock_runtimes().values() {
            pids.extend(runtime.pids());
        }
        pids
    }

    /// Every pool: the current apps' and those still draining after a
    /// reload removed or replaced their app.
    fn pools(&self) -> Vec<Pool> {
        let mut pools = self.proxy.pools();
        pools.extend(self.reloading.retired());
        pools
    }

    fn lock_runtimes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Runtime>> {
        self.runtimes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stock of runtime `name`, if the gateway has one.
    pub fn runtime(&self, name: &str) -> Option<Runtime> {
        self.lock_runtimes().get(name).cloned()
    }

    /// The names of the runtimes with a stock.
    pub fn runtime_names(&self) -> Vec<String> {
        self.lock_runtimes().keys().cloned().collect()
    }

    /// Takes the reloads asked for through the admin listener (`POST
    /// /reload`): whoever runs the gateway loads the config file for each
    /// and answers with [`Running::reload`]'s result. Once only.
    pub fn reload_requests(&mut self) -> Option<tokio::sync::mpsc::Receiver<reload::Ask>> {
        self.reload_requests.take()
    }

    /// Stops accepting, lets in-flight requests finish (at most the grace
    /// period), then closes every pool and destroys every VM; returns once
    /// every task of the gateway has ended.
    pub async fn shutdown(mut self) {
        let grace = self.reloading.config.lock().await.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        // Peers stop sending requests here first.
        if let Some(cluster) = &self.cluster {
            cluster.leave().await;
        }
        let _ = self.stop.send(true);
        // Held requests get their 503 now, not after the grace period.
        for pool in self.pools() {
            pool.begin_close();
        }
        for server in &mut self.servers {
            let _ = server.await;
        }
        // Upgraded connections have what is left of the grace period,
        // then end, so no lease holds a pool's close back.
        self.proxy.end_tunnels(deadline).await;
        self.admin_stop.cancel();
        let _ = (&mut self.admin_task).await;
        for pool in self.pools() {
            pool.close(std::time::Duration::from_secs(5)).await;
        }
        let runtimes: Vec<Runtime> = self.lock_runtimes().values().cloned().collect();
        for runtime in runtimes {
            runtime.close(std::time::Duration::from_secs(5)).await;
        }
        self.tasks.cancel.cancel();
        self.tasks.tracker.close();
        self.tasks.tracker.wait().await;
        // Tasks on the edge workers have ended with the rest.
        self.workers.stop().await;
        // A VMM dropped mid-start (a restore cancelled above) is killed
        // on drop; its cgroup and uid go once it has exited.
        if !crate::vmm::process::jails_released(std::time::Duration::from_secs(5)).await {
            tracing::warn!(
                "a stopped VMM's jail is not released yet: its cgroup stays until the next start"
            );
        }
        if let Some(fence) = self.reloading.fence.take() {
            if let Err(e) = fence.down().await {
                tracing::warn!("taking the fence down: {e}");
            }
        }
        info!("stopped");
    }
}

//! The node's two sessions with etcd (the module doc of `crate::cluster`,
//! protocol steps 1 to 6): its registration (lease, entry, keep-alives,
//! writes) and its watch of the catalog. Each runs until cancelled,
//! starting a new session after any failure.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AppLoad, Catalog, Cluster, Known, NodeEntry, Pools};

/// Longest wait for a connection to an etcd member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one etcd request (not a watch).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 PINGs on the gRPC connection, so a member that vanished (no
/// reset: a host gone) is noticed. No more often than etcd allows by
/// default (`--grpc-keepalive-min-time`, 5 s): a client that pings more
/// often is disconnected (`too_many_pings`).
const KEEP_ALIVE: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(5));
/// The backoff between sessions (protocol step 4): from the first to the
/// last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// What failed in a session.
type Failure = Box<dyn std::error::Error + Send + Sync>;

/// A client of one etcd member, with authentication and TLS: the first
/// that answers a status request, trying each endpoint once, from the one
/// the last session of this node used. Each session's streams run on one
/// member's connection, so a client of one member loses nothing a
/// balanced one would keep, and a member that is down is never chosen
/// again while another answers.
async fn connect(cluster: &Cluster) -> Result<Client, Failure> {
    let endpoints = &cluster.0.config.etcd.endpoints;
    let first = cluster
        .0
        .endpoint
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut failures = Vec::new();
    for k in 0..endpoints.len() {
        let i = (first + k) % endpoints.len();
        match connect_to(cluster, &endpoints[i]).await {
            Ok(client) => {
                cluster
                    .0
                    .endpoint
                    .store(i, std::sync::atomic::Ordering::Relaxed);
                return Ok(client);
            }
            Err(e) => failures.push(format!(
                "{}: {}",
                endpoints[i],
                crate::display_chain(e.as_ref())
            )),
        }
    }
    Err(format!("no etcd member answered ({})", failures.join("; ")).into())
}

/// A client of the member at `endpoint`, once it answered.
async fn connect_to(cluster: &Cluster, endpoint: &str) -> Result<Client, Failure> {
    let etcd = &cluster.0.config.etcd;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(KEEP_ALIVE.0, KEEP_ALIVE.1)
        .with_keep_alive_while_idle(true)
        // A member cut off from the quorum answers nothing rather than
        // what it last knew (etcd's `hasleader` metadata).
        .with_require_leader(true);
    if let (Some(user), Some(file)) = (&etcd.username, &etcd.password_file) {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cluster.etcd.password_file {}: {e}", file.display()))?;
        let password = text.lines().next().unwrap_or("").to_owned();
        options = options.with_user(user.clone(), password);
    }
    if let Some(tls) = &etcd.tls {
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("cluster.etcd.tls.{key} {}: {e}", p.display()))
        };
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca", &tls.ca)?));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            t = t.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        }
        options = options.with_tls(t);
    }
    let mut client = Client::connect([endpoint], Some(options)).await?;
    client.status().await?;
    Ok(client)
}

/// The catalog's key prefix: `<prefix>nodes/`.
fn nodes_prefix(cluster: &Cluster) -> String {
    format!("{}nodes/", cluster.0.config.etcd.prefix)
}

/// Runs `session` again and again until `cancel`, with the backoff
/// between failures; `name` names it in the log, `lost` is called after
/// each failure.
async fn sessions<F, Fut>(name: &str, cancel: CancellationToken, mut session: F, lost: impl Fn())
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let mut backoff = BACKOFF.0;
    loop {
        let started = Instant::now();
        let ended = tokio::select! {
            _ = cancel.cancelled() => return,
            ended = session() => ended,
        };
        match ended {
            Ok(()) => return,
            Err(e) => {
                lost();
                warn!(
                    "cluster: etcd {name} lost: {}; again in {backoff:?}",
                    crate::display_chain(e.as_ref())
                );
            }
        }
        // A session that lasted is a fresh start for the backoff.
        if started.elapsed() > BACKOFF.1 * 4 {
            backoff = BACKOFF.0;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// Protocol steps 1, 2, 4, 5 and 6: this node's entry under its lease.
pub(super) async fn register(cluster: Cluster, pools: Pools, cancel: CancellationToken) {
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let version = std::sync::atomic::AtomicU64::new(0);
    let lease = std::sync::Mutex::new(None::<(Client, i64)>);
    sessions(
        "registration",
        cancel.clone(),
        || registration(&cluster, &pools, epoch, &version, &lease, &cancel),
        || cluster.set_registered(false),
    )
    .await;
    cluster.set_registered(false);
    // Protocol step 6: the entry goes with the lease.
    let held = lease.lock().unwrap().take();
    if let Some((mut client, id)) = held {
        match tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(id)).await {
            Ok(Ok(_)) => info!("cluster: left the catalog"),
            Ok(Err(e)) => warn!("cluster: revoking the lease: {e}"),
            Err(_) => warn!("cluster: revoking the lease: no answer within 1 s"),
        }
    }
}

/// This node's entry now.
fn entry(cluster: &Cluster, pools: &Pools, epoch: u64, version: u64) -> NodeEntry {
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let apps: BTreeMap<String, AppLoad> = pools()
        .iter()
        .map(|pool| {
            let s = pool.stats();
            let load = AppLoad {
                warm: clamp(s.warm()),
                leased: clamp(s.leased),
                open: clamp(s.open),
                restoring: clamp(s.restoring),
                queued: clamp(s.queued),
                max: clamp(pool.sizing().max_instances),
            };
            (pool.app().to_owned(), load)
        })
        .collect();
    NodeEntry {
        node: cluster.node().to_string(),
        address: cluster.0.config.advertise,
        epoch,
        version,
        apps,
    }
}

/// One registration session: a lease, the entry under it, then
/// keep-alives each third of the TTL and the entry rewritten when it
/// changes, at most once per `publish_interval`.
async fn registration(
    cluster: &Cluster,
    pools: &Pools,
    epoch: u64,
    version: &std::sync::atomic::AtomicU64,
    held: &std::sync::Mutex<Option<(Client, i64)>>,
    cancel: &CancellationToken,
) -> Result<(), Failure> {
    let config = &cluster.0.config;
    let key = format!("{}{}", nodes_prefix(cluster), config.node);
    let mut client = connect(cluster).await?;
    // A name is one node's: an entry under it from another address is
    // another node's (a run of this node restarted keeps its address),
    // and this one waits for it to leave.
    let held_by = client.get(key.clone(), None).await?;
    if let Some(kv) = held_by.kvs().first() {
        if let Ok(other) = serde_json::from_slice::<NodeEntry>(kv.value()) {
            if other.address != config.advertise {
                return Err(format!(
                    "another node named {} is registered at {}: this one waits for it to leave",
                    config.node, other.address
                )
                .into());
            }
        }
    }
    let ttl = config.lease_ttl.as_secs() as i64;
    let lease = client.lease_grant(ttl, None).await?.id();
    *held.lock().unwrap() = Some((client.clone(), lease));
    let write = |client: &mut Client, entry: &NodeEntry| {
        let value = serde_json::to_vec(entry).expect("an entry serializes");
        let key = key.clone();
        let mut client = client.clone();
        async move {
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    };
    let next = || version.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let mut last = entry(cluster, pools, epoch, next());
    write(&mut client, &last).await?;
    cluster.0.metrics.publishes.inc();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
    cluster.set_registered(true);
    // Peers forward to `advertise`: said loudly if it is not this node's
    // listener as seen from here (a port forward may still be right).
    if !super::probe(config.advertise, config.peer_connect_timeout).await {
        warn!(
            advertise = %config.advertise,
            "cluster.advertise does not answer as a snapgate listener from this node: peers may not reach it there"
        );
    }
    info!(node = %config.node, lease, "cluster: registered in the catalog");
    let mut keep_alive = tokio::time::interval(config.lease_ttl / 3);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written = Instant::now();
    let mut publish = tokio::time::interval(config.publish_interval);
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = keep_alive.tick() => {
                keeper.keep_alive().await?;
                // Answered within the interval, or the lease may lapse.
                let within = config.lease_ttl / 3;
                let answer = tokio::time::timeout(within, answers.message())
                    .await
                    .map_err(|_| format!("no keep-alive answer within {within:?}"))??;
                match answer {
                    Some(a) if a.ttl() > 0 => {}
                    Some(_) => return Err("the lease expired".into()),
                    None => return Err("the keep-alive stream ended".into()),
                }
            }
            _ = publish.tick() => {
                let now = entry(cluster, pools, epoch, 0);
                // What routing reads goes out at once; the other counts
                // (for operators) at most every ten intervals.
                let due = routing_changed(&last, &now)
                    || (now.apps != last.apps && written.elapsed() >= config.publish_interval * 10);
                if due {
                    let now = NodeEntry { version: next(), ..now };
                    write(&mut client, &now).await?;
                    cluster.0.metrics.publishes.inc();
                    written = Instant::now();
                    last = now;
                }
            }
        }
    }
}

/// Whether what routing reads of an entry changed between `old` and `new`:
/// the apps listed, and for each whether it has instances free or open.
fn routing_changed(old: &NodeEntry, new: &NodeEntry) -> bool {
    old.apps.len() != new.apps.len()
        || old.apps.iter().zip(&new.apps).any(|((a, x), (b, y))| {
            a != b || (x.warm > 0) != (y.warm > 0) || (x.open > 0) != (y.open > 0)
        })
}

/// Protocol steps 3 and 4: the catalog, read whole and then watched.
pub(super) async fn watch(cluster: Cluster, cancel: CancellationToken) {
    sessions(
        "watch",
        cancel,
        || watching(&cluster),
        || cluster.set_watching(false),
    )
    .await;
    cluster.set_watching(false);
}

/// The node an entry's key names, and the entry, if its value parses.
fn parse(prefix: &str, key: &[u8], value: &[u8]) -> Option<(Arc<str>, NodeEntry)> {
    let name = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    match serde_json::from_slice::<NodeEntry>(value) {
        Ok(entry) if entry.node == name => Some((name.into(), entry)),
        Ok(entry) => {
            warn!(
                key = name,
                node = entry.node,
                "cluster: an entry names another node than its key; ignored"
            );
            None
        }
        Err(e) => {
            warn!(
                key = name,
                "cluster: an entry is not a node entry ({e}); ignored"
            );
            None
        }
    }
}

/// One watch session.
async fn watching(cluster: &Cluster) -> Result<(), Failure> {
    let prefix = nodes_prefix(cluster);
    let mut client = connect(cluster).await?;
    let read = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = read.header().map_or(0, |h| h.revision());
    let mut catalog = Catalog {
        nodes: BTreeMap::new(),
        revision,
    };
    for kv in read.kvs() {
        if let Some((name, entry)) = parse(&prefix, kv.key(), kv.value()) {
            let revision = kv.mod_revision();
            catalog.nodes.insert(name, Known { entry, revision });
        }
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let (mut watcher, mut stream) = client.watch(prefix.clone(), Some(options)).await?;
    let peers = catalog.nodes.len();
    cluster.store(catalog.clone());
    cluster.set_watching(true);
    cluster.confirm();
    info!(nodes = peers, revision, "cluster: watching the catalog");
    // A watch that gets no event says nothing: progress is asked for each
    // third of the lease TTL, and a watch silent for a whole TTL is lost.
    let every = cluster.0.config.lease_ttl / 3;
    let mut ask = tokio::time::interval(every);
    ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    loop {
        let answer = tokio::select! {
            answer = stream.message() => answer?,
            _ = ask.tick() => {
                if heard.elapsed() > cluster.0.config.lease_ttl {
                    return Err("the watch went silent".into());
                }
                watcher.request_progress().await?;
                continue;
            }
        };
        let Some(answer) = answer else { break };
        heard = Instant::now();
        if answer.canceled() {
            return Err(format!("the watch was cancelled: {}", answer.cancel_reason()).into());
        }
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            let name = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix(&prefix));
            match event.event_type() {
                EventType::Put => match parse(&prefix, kv.key(), kv.value()) {
                    Some((name, entry)) => {
                        let revision = kv.mod_revision();
                        catalog.nodes.insert(name, Known { entry, revision });
                    }
                    // What it said before is not true any more.
                    None => {
                        if let Some(name) = name {
                            catalog.nodes.remove(name);
                        }
                    }
                },
                EventType::Delete => {
                    if let Some(name) = name {
                        if catalog.nodes.remove(name).is_some() {
                            info!(node = name, "cluster: a node left the catalog");
                        }
                    }
                }
            }
        }
        if let Some(h) = answer.header() {
            catalog.revision = h.revision();
        }
        if !answer.events().is_empty() {
            cluster.store(catalog.clone());
        }
        cluster.confirm();
    }
    Err("the watch stream ended".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(apps: &[(&str, u32, u32, u32)]) -> NodeEntry {
        NodeEntry {
            node: "a".into(),
            address: "10.0.0.1:8080".parse().unwrap(),
            epoch: 1,
            version: 1,
            apps: apps
                .iter()
                .map(|(name, warm, open, leased)| {
                    let load = AppLoad {
                        warm: *warm,
                        open: *open,
                        leased: *leased,
                        ..Default::default()
                    };
                    (name.to_string(), load)
                })
                .collect(),
        }
    }

    #[test]
    fn only_what_routing_reads_is_written_at_once() {
        let base = entry(&[("x", 1, 1, 0)]);
        // Counts that move without crossing zero: no change.
        assert!(!routing_changed(
            &entry(&[("x", 2, 2, 0)]),
            &entry(&[("x", 1, 1, 1)])
        ));
        // The last free instance leased, still open: a change (free is shown).
        assert!(routing_changed(&base, &entry(&[("x", 0, 1, 1)])));
        // Free and open gone, an app added or renamed: a change.
        assert!(routing_changed(&base, &entry(&[("x", 0, 0, 1)])));
        assert!(routing_changed(
            &base,
            &entry(&[("x", 1, 1, 0), ("y", 0, 0, 0)])
        ));
        assert!(routing_changed(&base, &entry(&[("z", 1, 1, 0)])));
    }
}

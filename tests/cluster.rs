//! Many nodes: three snapgate nodes, each in a network namespace of its
//! own with its own taps and real QEMU VMs, sharing one catalog in a real
//! three-member etcd cluster (Debian's `etcd-server`). The test makes the
//! namespaces, a bridge linking them to the host, and the etcd members,
//! and removes them after, also when it fails.
#![cfg(feature = "vm-tests")]
// Nodes are numbered: the index names the node, its address and namespace.
#![allow(clippy::needless_range_loop)]

mod front;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use front::Binary;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// The host's end of the bridge; etcd's clients reach it there.
const HOST: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 254);
const CLIENT_PORT: u16 = 23790;
const PEER_PORT: u16 = 23800;
/// Small, so a dead node leaves the catalog soon.
const LEASE_TTL: u64 = 3;
const TOKEN: &str = "cluster-test-admin-token-0123456789";

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 231, 0, i as u8 + 1)
}

/// The bridge and one namespace per node, linked by veth pairs; removed
/// on drop (the taps and veths inside a namespace go with it).
struct Topology {
    bridge: String,
    namespaces: Vec<String>,
}

impl Topology {
    fn new() -> Topology {
        let id = std::process::id() % 10000;
        let topo = Topology {
            bridge: format!("sgcbr{id}"),
            namespaces: (0..3).map(|i| format!("sgc{id}-{i}")).collect(),
        };
        run(&["ip", "link", "add", &topo.bridge, "type", "bridge"]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{HOST}/24"),
            "dev",
            &topo.bridge,
        ]);
        run(&["ip", "link", "set", &topo.bridge, "up"]);
        for (i, ns) in topo.namespaces.iter().enumerate() {
            let (host_end, ns_end) = (format!("sgcv{id}h{i}"), format!("sgcv{id}n{i}"));
            run(&["ip", "netns", "add", ns]);
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ]);
            run(&["ip", "link", "set", &ns_end, "netns", ns]);
            run(&["ip", "link", "set", &host_end, "master", &topo.bridge, "up"]);
            let inside = |args: &[&str]| {
                let mut all = vec!["ip", "-n", ns];
                all.extend_from_slice(args);
                run(&all);
            };
            inside(&["addr", "add", &format!("{}/24", node_ip(i)), "dev", &ns_end]);
            inside(&["link", "set", &ns_end, "up"]);
            inside(&["link", "set", "lo", "up"]);
        }
        topo
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// One etcd member, on loopback (peers) and the bridge (clients); killed
/// on drop.
struct Member {
    i: usize,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl Member {
    fn start(i: usize, dir: &Path) -> Member {
        let mut m = Member {
            i,
            dir: dir.to_owned(),
            child: None,
        };
        m.restart();
        m
    }

    fn client_url(i: usize) -> String {
        format!("http://{HOST}:{}", CLIENT_PORT + i as u16)
    }

    fn restart(&mut self) {
        let i = self.i;
        let cluster: Vec<String> = (0..3)
            .map(|j| format!("m{j}=http://127.0.0.1:{}", PEER_PORT + j as u16))
            .collect();
        let log = std::fs::File::create(self.dir.join(format!("etcd{i}.log"))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.join(format!("etcd{i}")))
            .args([
                "--listen-client-urls",
                &format!(
                    "{},http://127.0.0.1:{}",
                    Member::client_url(i),
                    CLIENT_PORT + i as u16
                ),
                "--advertise-client-urls",
                &Member::client_url(i),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", PEER_PORT + i as u16),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", PEER_PORT + i as u16),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "snapgate-cluster-test",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian package etcd-server)");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn etcd_healthy(i: usize) -> bool {
    let url = format!("http://127.0.0.1:{}/health", CLIENT_PORT + i as u16);
    match reqwest::get(url).await {
        Ok(r) => r.text().await.is_ok_and(|t| t.contains("\"true\"")),
        Err(_) => false,
    }
}

/// Polls `cond` every 50 ms until it holds, or panics naming `what` after
/// `within` (an attempt still running then is cut short).
async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, cond()).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(_) => panic!("not within {within:?}: {what}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Node `i`'s config: `apps`, each with its pool (a YAML flow map).
fn config(dir: &Path, i: usize, apps: &[(&str, String)]) -> PathBuf {
    let image = snapgate::testing::test_guest_image();
    let endpoints: Vec<String> = (0..3).map(Member::client_url).collect();
    let mut text = format!(
        "listen: 0.0.0.0:8080\nadmin: 0.0.0.0:9090\nadmin_token_file: {token}\n\
         shutdown_grace: 5s\nstate_dir: {state}\nsnapshot_dir: {snapshots}\n\
         network: {{ tap_prefix: sgc{letter} }}\n\
         cluster:\n  node: {node}\n  advertise: {ip}:8080\n  secret_file: {secret}\n\
         \x20 lease_ttl: {LEASE_TTL}s\n  publish_interval: 100ms\n  peer_connect_timeout: 500ms\n\
         \x20 etcd: {{ endpoints: [{endpoints}] }}\napps:\n",
        token = dir.join("token").display(),
        state = dir.join(NODES[i]).display(),
        snapshots = snapgate::testing::shared_snapshot_dir().display(),
        letter = ['a', 'b', 'c'][i],
        node = NODES[i],
        ip = node_ip(i),
        secret = dir.join("secret").display(),
        endpoints = endpoints.join(", "),
    );
    for (app, pool) in apps {
        text.push_str(&format!(
            "  {app}:\n    hosts: [{app}.test]\n    image: {image}\n    pool: {pool}\n"
        ));
    }
    let file = dir.join(format!("{}.yaml", NODES[i]));
    std::fs::write(&file, text).unwrap();
    file
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// `GET path` for `app` through node `i`: status and body.
async fn get(i: usize, app: &str, path: &str) -> (u16, String) {
    get_with(i, app, path, &[]).await
}

async fn get_with(i: usize, app: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = client()
        .get(format!("http://{}:8080{path}", node_ip(i)))
        .header("host", format!("{app}.test"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("the node answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

async fn admin(i: usize, path: &str) -> serde_json::Value {
    let resp = client()
        .get(format!("http://{}:9090{path}", node_ip(i)))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("the admin listener answers");
    resp.json().await.expect("JSON")
}

async fn metrics(i: usize) -> String {
    client()
        .get(format!("http://{}:9090/metrics", node_ip(i)))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the series `series` (name and labels, as printed); panics
/// if there is none.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series}"))
}

async fn restores(i: usize, app: &str) -> f64 {
    value(
        &metrics(i).await,
        &format!("snapgate_restores_total{{app=\"{app}\"}}"),
    )
}

async fn restores_everywhere(app: &str, up: &[usize]) -> Vec<f64> {
    let mut all = Vec::new();
    for &i in up {
        all.push(restores(i, app).await);
    }
    all
}

/// Whether node `i`'s catalog has `node`'s entry with `warm` free
/// instances of `app`.
async fn sees_warm(i: usize, node: &str, app: &str, warm: u64) -> bool {
    let view = admin(i, "/cluster").await;
    view["nodes"][node]["apps"][app]["warm"].as_u64() == Some(warm)
}

fn home(app: &str, nodes: &[&str]) -> usize {
    let h = snapgate::cluster::placement::home(app, nodes.iter().copied()).unwrap();
    NODES.iter().position(|n| *n == h).unwrap()
}

/// Apps named `<stem><n>` so that each node is the home of one
/// (`by_home[i]`).
fn apps_by_home(stem: &str) -> [String; 3] {
    let mut by_home: [Option<String>; 3] = [None, None, None];
    for n in 0.. {
        let app = format!("{stem}{n}");
        let h = home(&app, &NODES);
        if by_home[h].is_none() {
            by_home[h] = Some(app);
        }
        if by_home.iter().all(Option::is_some) {
            break;
        }
    }
    by_home.map(Option::unwrap)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_share_a_catalog_in_etcd_and_route_to_each_other() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(
        dir.path().join("secret"),
        "0123456789abcdef0123456789abcdef-secret",
    )
    .unwrap();
    let topo = Topology::new();
    let mut members: Vec<Member> = (0..3).map(|i| Member::start(i, dir.path())).collect();
    for i in 0..3 {
        until("etcd member healthy", Duration::from_secs(30), || {
            etcd_healthy(i)
        })
        .await;
    }
    let by_home = apps_by_home("app");
    eprintln!("apps by home node: {by_home:?}");
    let apps: Vec<&str> = by_home.iter().map(String::as_str).collect();
    // One more app, whose home holds one instance serving one request at
    // a time and queues one request more: it refuses once both are taken,
    // and requests spill over to the next node.
    let spill = apps_by_home("spill")[0].clone();
    let spill_home = home(&spill, &NODES);
    let pool = "{ min_warm: 0, max_instances: 2, idle_timeout: 10m }";
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| {
            let mut list: Vec<(&str, String)> =
                apps.iter().map(|a| (*a, pool.to_owned())).collect();
            let spill_pool = match i == spill_home {
                true => {
                    "{ min_warm: 0, max_instances: 1, max_concurrency: 1, hold_queue: 1, \
                         idle_timeout: 10m }"
                }
                false => pool,
            };
            list.push((spill.as_str(), spill_pool.to_owned()));
            config(dir.path(), i, &list)
        })
        .collect();
    let mut nodes: Vec<Option<Binary>> = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let netns = format!("--net=/run/netns/{}", topo.namespaces[i]);
        let wrapper = ["nsenter", netns.as_str()];
        nodes.push(Some(
            Binary::start_under(&wrapper, config, Duration::from_secs(900)).await,
        ));
    }
    for i in 0..3 {
        until(
            "every node sees three nodes",
            Duration::from_secs(20),
            || async move {
                let view = admin(i, "/cluster").await;
                view["nodes"].as_object().is_some_and(|n| n.len() == 3)
                    && view["degraded"].is_null()
            },
        )
        .await;
    }

    // 1. At zero everywhere, requested through each node in turn: every
    // cold start happens on the app's home node.
    let app = by_home[0].as_str();
    let h = home(app, &NODES);
    // The home node last: the first request's cold start is a forward.
    for i in [(h + 1) % 3, (h + 2) % 3, h] {
        let (status, body) = get(i, app, "/").await;
        assert_eq!(status, 200, "{app} through {}: {body}", NODES[i]);
    }
    let counts = restores_everywhere(app, &[0, 1, 2]).await;
    assert!(counts[h] >= 1.0, "{counts:?}");
    for i in (0..3).filter(|&i| i != h) {
        assert_eq!(
            counts[i], 0.0,
            "a cold start off {app}'s home {}: {counts:?}",
            NODES[h]
        );
    }

    // 2. Warm on one node only (prewarmed there, off its home), requested
    // through another: that node's instance serves it, nothing restores.
    let app = by_home[1].as_str();
    let h = home(app, &NODES);
    let warm_on = (h + 1) % 3;
    let asked = (h + 2) % 3;
    let resp = client()
        .post(format!(
            "http://{}:9090/apps/{app}/prewarm?count=1",
            node_ip(warm_on)
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "prewarm: {}",
        resp.text().await.unwrap()
    );
    until(
        "the prewarmed instance is in the catalog",
        Duration::from_secs(120),
        || sees_warm(asked, NODES[warm_on], app, 1),
    )
    .await;
    let before = restores_everywhere(app, &[0, 1, 2]).await;
    let forwarded_warm = "snapgate_cluster_forwarded_requests_total{reason=\"warm\"}";
    let warm_before = value(&metrics(asked).await, forwarded_warm);
    let (status, through) = get(asked, app, "/").await;
    assert_eq!(status, 200, "{through}");
    assert_eq!(
        restores_everywhere(app, &[0, 1, 2]).await,
        before,
        "no restore anywhere"
    );
    assert_eq!(
        value(&metrics(asked).await, forwarded_warm),
        warm_before + 1.0
    );
    let (_, direct) = get(warm_on, app, "/").await;
    assert_eq!(
        common_instance(&through),
        common_instance(&direct),
        "served by {}'s instance",
        NODES[warm_on]
    );
    // The guest echoes the headers it got: two snapgates on the way, and
    // no hop marker.
    let lower = through.to_lowercase();
    assert!(
        lower.contains("via: 1.1 snapgate, 1.1 snapgate"),
        "{through}"
    );
    assert!(!lower.contains("snapgate-hop"), "{through}");
    // A request with a body goes there too (held, not refused at once).
    let resp = client()
        .post(format!("http://{}:8080/", node_ip(asked)))
        .header("host", format!("{app}.test"))
        .body("a body of 16 B.")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let posted = resp.text().await.unwrap();
    assert_eq!(
        common_instance(&posted),
        common_instance(&direct),
        "{posted}"
    );
    assert_eq!(
        restores_everywhere(app, &[0, 1, 2]).await,
        before,
        "no restore anywhere"
    );

    // 2b. The home node's one instance busy and its queue full, it
    // refuses: a request without a body spills over to the next node in
    // the app's order, which restores it.
    let order = snapgate::cluster::placement::order(&spill, NODES);
    let next = NODES.iter().position(|n| *n == order[1]).unwrap();
    let asked = NODES.iter().position(|n| *n == order[2]).unwrap();
    let h = spill_home;
    let busy = {
        let spill = spill.clone();
        tokio::spawn(async move { get(h, &spill, "/sleep/10000").await })
    };
    let series = |name: &str| format!("{name}{{app=\"{spill}\"}}");
    let leased = format!("snapgate_instances{{app=\"{spill}\",state=\"leased\"}}");
    until(
        "the home's instance is busy",
        Duration::from_secs(120),
        || {
            let leased = leased.clone();
            async move { value(&metrics(h).await, &leased) == 1.0 }
        },
    )
    .await;
    let queued = {
        let spill = spill.clone();
        tokio::spawn(async move { get(h, &spill, "/").await })
    };
    let depth = series("snapgate_hold_queue_depth");
    until("the home's queue is full", Duration::from_secs(30), || {
        let depth = depth.clone();
        async move { value(&metrics(h).await, &depth) == 1.0 }
    })
    .await;
    let spilled = "snapgate_cluster_forwarded_requests_total{reason=\"spillover\"}";
    let spilled_before = value(&metrics(asked).await, spilled);
    let (status, body) = get(asked, &spill, "/").await;
    assert_eq!(status, 200, "{body}");
    let counts = restores_everywhere(&spill, &[0, 1, 2]).await;
    assert_eq!(counts[h], 1.0, "the home restored only its one: {counts:?}");
    assert_eq!(counts[next], 1.0, "the next node restored it: {counts:?}");
    assert_eq!(counts[asked], 0.0, "{counts:?}");
    assert_eq!(value(&metrics(asked).await, spilled), spilled_before + 1.0);
    let refused = format!(
        "snapgate_cluster_peer_errors_total{{kind=\"refused\",peer=\"{}\"}}",
        NODES[h]
    );
    assert_eq!(value(&metrics(asked).await, &refused), 1.0);
    assert_eq!(busy.await.unwrap().0, 200);
    assert_eq!(queued.await.unwrap().0, 200);

    // 3. A client's own hop marker, forged or copied with another proof,
    // does not make a node serve locally: the cold start is still the
    // home node's.
    let app = by_home[2].as_str();
    let h = home(app, &NODES);
    let asked = (h + 1) % 3;
    let forged = format!("{} 00ff", NODES[asked]);
    let (status, body) = get_with(asked, app, "/", &[("snapgate-hop", &forged)]).await;
    assert_eq!(status, 200, "{body}");
    let counts = restores_everywhere(app, &[0, 1, 2]).await;
    assert_eq!(
        counts[asked], 0.0,
        "the marker made {} serve: {counts:?}",
        NODES[asked]
    );
    assert!(counts[h] >= 1.0, "{counts:?}");

    // 4. One etcd member killed: requests go on as before, and etcd stays
    // current for every node.
    members[0].kill();
    for i in 0..3 {
        for app in &apps {
            let (status, body) = get(i, app, "/").await;
            assert_eq!(status, 200, "{app} through {}: {body}", NODES[i]);
        }
    }
    // For two lease TTLs after, no node ever leaves any node's catalog,
    // and each is current again (a session on the killed member moves to
    // another).
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(2 * LEASE_TTL) {
        for i in 0..3 {
            let view = admin(i, "/cluster").await;
            let seen = view["nodes"].as_object().map_or(0, |n| n.len());
            assert_eq!(
                seen, 3,
                "with one etcd member down, {} sees: {view}",
                NODES[i]
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for i in 0..3 {
        until(
            "current with one member down",
            Duration::from_secs(10),
            || async move { admin(i, "/readyz").await["degraded"] == false },
        )
        .await;
    }

    // Each entry as node A sees it now: its run and version.
    let entries = |view: &serde_json::Value| -> Vec<(u64, u64)> {
        NODES
            .iter()
            .map(|n| {
                let e = &view["nodes"][*n];
                (e["epoch"].as_u64().unwrap(), e["version"].as_u64().unwrap())
            })
            .collect()
    };
    let before_outage = entries(&admin(0, "/cluster").await);

    // 5. All of etcd stopped: each node says it is degraded, and serves
    // from its own pools and the last catalog it saw.
    members[1].kill();
    members[2].kill();
    for i in 0..3 {
        until(
            "/readyz says degraded",
            Duration::from_secs(LEASE_TTL + 10),
            || async move {
                let ready = admin(i, "/readyz").await;
                ready["degraded"] == true && ready["ready"] == true
            },
        )
        .await;
        assert_eq!(value(&metrics(i).await, "snapgate_cluster_etcd_up"), 0.0);
    }
    for i in 0..3 {
        for app in &apps {
            let (status, body) = get(i, app, "/").await;
            assert_eq!(status, 200, "degraded, {app} through {}: {body}", NODES[i]);
        }
    }

    // 6. etcd back: within a few seconds every node is current again and
    // sees the same three entries.
    for m in &mut members {
        m.restart();
    }
    let back = Instant::now();
    for i in 0..3 {
        until("etcd member healthy again", Duration::from_secs(30), || {
            etcd_healthy(i)
        })
        .await;
    }
    for i in 0..3 {
        until(
            "the catalog converges",
            Duration::from_secs(15),
            || async move {
                let view = admin(i, "/cluster").await;
                view["degraded"].is_null()
                    && view["nodes"].as_object().is_some_and(|n| n.len() == 3)
            },
        )
        .await;
    }
    eprintln!(
        "catalog converged {:?} after etcd came back",
        back.elapsed()
    );
    // Every node registered again (a new entry of the same run), and
    // every node sees it.
    for i in 0..3 {
        until(
            "every node's new entry seen",
            Duration::from_secs(10),
            || {
                let before = before_outage.clone();
                let entries = &entries;
                async move {
                    let now = entries(&admin(i, "/cluster").await);
                    now.iter()
                        .zip(&before)
                        .all(|(n, b)| n.0 == b.0 && n.1 > b.1)
                }
            },
        )
        .await;
    }

    // 7. Node C killed mid-request: the request in flight on it fails
    // with 502; within its lease TTL and a second, its apps are served
    // by the others; requests elsewhere lose nothing.
    let c = 2;
    let app_c = by_home[c].as_str();
    let via = 0;
    // Warm on C, and known to be by A.
    let (status, _) = get(c, app_c, "/").await;
    assert_eq!(status, 200);
    let slow = {
        let app_c = app_c.to_owned();
        tokio::spawn(async move { get(via, &app_c, "/sleep/20000").await })
    };
    until(
        "the slow request is on C",
        Duration::from_secs(30),
        || async move {
            value(
                &metrics(c).await,
                &format!("snapgate_instances{{app=\"{app_c}\",state=\"leased\"}}"),
            ) >= 1.0
        },
    )
    .await;
    let mut dead = nodes[c].take().unwrap();
    let killed = Instant::now();
    dead.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = dead.child.wait().await;
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 502, "in flight on the killed node: {body}");
    // From the kill to its lease TTL and a second, every request for C's
    // apps through A and B is served by them.
    let deadline = killed + Duration::from_secs(LEASE_TTL + 1);
    let asking: Vec<_> = [0usize, 1]
        .into_iter()
        .flat_map(|i| [(i, by_home[c].clone()), (i, by_home[1].clone())])
        .map(|(i, app)| {
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while Instant::now() < deadline {
                    statuses.push(get(i, &app, "/").await.0);
                }
                (i, app, statuses)
            })
        })
        .collect();
    for asked in asking {
        let (i, app, statuses) = asked.await.unwrap();
        assert!(!statuses.is_empty());
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{app} through {} after the kill: {statuses:?}",
            NODES[i]
        );
    }
    eprintln!(
        "served by the others through {:?} after the kill",
        killed.elapsed()
    );
    for i in [0, 1] {
        until(
            "the dead node leaves the catalog",
            Duration::from_secs(LEASE_TTL + 5),
            || async move {
                admin(i, "/cluster").await["nodes"]
                    .as_object()
                    .is_some_and(|n| n.len() == 2)
            },
        )
        .await;
    }

    // C starts again on its state: it cleans up what the killed run left
    // and rejoins.
    drop(dead);
    let netns = format!("--net=/run/netns/{}", topo.namespaces[c]);
    let wrapper = ["nsenter", netns.as_str()];
    nodes[c] = Some(Binary::start_under(&wrapper, &configs[c], Duration::from_secs(300)).await);
    for i in 0..3 {
        until(
            "C is back in every catalog",
            Duration::from_secs(20),
            || async move {
                admin(i, "/cluster").await["nodes"]
                    .as_object()
                    .is_some_and(|n| n.len() == 3)
            },
        )
        .await;
    }
    // Nodes stop (SIGTERM, their VMs and taps go) before the namespaces.
    for node in nodes.iter_mut() {
        if let Some(node) = node.take() {
            node.signal(nix::sys::signal::Signal::SIGTERM);
            let mut node = node;
            let _ = tokio::time::timeout(Duration::from_secs(60), node.child.wait()).await;
        }
    }
    drop(members);
    drop(topo);
}

/// The instance a test guest's `/` answer names.
fn common_instance(body: &str) -> String {
    body.lines()
        .find_map(|l| l.strip_prefix("instance: "))
        .unwrap_or_else(|| panic!("no instance line in {body:?}"))
        .to_owned()
}

//! The admin listener: Prometheus metrics, probes and the admin API.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /` | the status page, HTML (`admin/page.rs`) |
//! | `GET /metrics` | the Prometheus text format |
//! | `GET /livez` (`/healthz`) | 200 while the process serves |
//! | `GET /readyz` | 200 once serving and every pool's `min_warm` has been met or has failed with a reason, and from then on; else 503; JSON either way. A cluster node whose etcd is not current stays 200 and says `"degraded"` (it serves from the last catalog it saw) |
//! | `GET /cluster` | a cluster node's view: etcd's state, the catalog's age, every node's entry, the peers it skips |
//! | `GET /apps` | apps with their pool's counts, settings and last error; runtime stocks |
//! | `GET /instances[?app=NAME]` | instances and restores in flight |
//! | `POST /instances/ID/drain` | drains one instance: no new requests, stops once those in flight end |
//! | `POST /apps/NAME/prewarm?count=N` | brings the app to N free instances (restores counted), within `max_instances` |
//! | `POST /reload` | reloads `proxy.yaml`, as SIGHUP does |
//!
//! Every page but the probes needs `Authorization: Bearer TOKEN` when
//! `admin_token_file` is set (required off loopback); the token is
//! compared in constant time (RFC 6750 section 2.1; a missing or wrong one
//! gets 401 with `WWW-Authenticate: Bearer`, section 3). Without it
//! `/readyz` says only whether the gateway is ready, not why.
//!
//! The listener serves from the moment it is bound, before snapshots are
//! built and pools made: until then `/readyz` says it is starting and the
//! API answers 503.
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

mod page;

use crate::pool::{Drained, MemberInfo, Prewarm, Sizing, Stats, VmDetail};
use crate::proxy::{Apps, Target};
use crate::runtime::Runtime;

/// An admin page's body.
type Page = Full<Bytes>;

/// A plain-text page.
fn text(status: StatusCode, body: String) -> Response<Page> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// What the admin pages serve.
#[derive(Clone)]
pub struct Admin {
    /// The metrics registry.
    pub registry: Registry,
    /// Where reloads are asked for (the process running the gateway loads
    /// the file and answers).
    pub reloads: tokio::sync::mpsc::Sender<crate::gateway::ReloadAsk>,
    /// The bearer token, if one is required.
    pub token: Option<Token>,
    /// The gateway's apps and stocks, once it serves.
    pub serving: Arc<OnceLock<Serving>>,
    /// Set the first time `/readyz` found the gateway ready: from then on
    /// it stays ready while it runs (an instance replaced, a runtime
    /// clone taken, does not take the gateway out of a balancer).
    pub became_ready: Arc<std::sync::atomic::AtomicBool>,
}

/// What the API reads and acts on, set once the gateway serves.
pub struct Serving {
    /// The apps (the current table: a reload swaps it).
    pub apps: Arc<Apps>,
    /// Runtime stocks by runtime name.
    pub runtimes: Arc<Mutex<HashMap<String, Runtime>>>,
    /// Recent cold starts and restore failures, for the status page.
    pub recent: Arc<crate::pool::Recent>,
    /// When it began to serve.
    pub started: std::time::SystemTime,
    /// The cluster this node is in, if any.
    pub cluster: Option<crate::cluster::Cluster>,
}

/// A bearer token, kept as its SHA-256 digest: compared digest to digest
/// in constant time, so neither its bytes nor its length show in timing.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    /// The token in the first line of `path` ([`token_in`]).
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Token> {
        token_in(path).map(|token| Token::new(&token))
    }

    /// `token` itself.
    pub fn new(token: &str) -> Token {
        Token(Sha256::digest(token.as_bytes()).into())
    }

    /// Whether `req` carries it (`Authorization: Bearer TOKEN`; the scheme
    /// is case-insensitive, RFC 9110 section 11.1).
    fn check<B>(&self, req: &Request<B>) -> Result<(), TokenError> {
        let Some(value) = req.headers().get(http::header::AUTHORIZATION) else {
            return Err(TokenError::Missing);
        };
        let value = value.as_bytes();
        let Some((scheme, given)) = value.split_at_checked(7) else {
            return Err(TokenError::Missing);
        };
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return Err(TokenError::Missing);
        }
        let given: [u8; 32] = Sha256::digest(given.trim_ascii()).into();
        match bool::from(given.ct_eq(&self.0)) {
            true => Ok(()),
            false => Err(TokenError::Wrong),
        }
    }
}

/// The admin bearer token in the first line of `path` (trimmed), as the
/// gateway and the `snapgate` commands read it. Errors name the file and
/// what is wrong: unreadable, a control character (no field value can
/// carry one, RFC 9110 section 5.5), fewer than 16 characters.
pub fn token_in(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("admin_token_file: reading {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim();
    // A field value cannot carry control characters (RFC 9110 section
    // 5.5): no client could send such a token.
    if token.chars().any(char::is_control) {
        anyhow::bail!(
            "admin_token_file: {} holds a control character in its token; \
             use printable characters (say, openssl rand -hex 32)",
            path.display()
        );
    }
    let length = token.chars().count();
    if length < 16 {
        anyhow::bail!(
            "admin_token_file: {} holds a token of {length} characters; at least 16 are needed",
            path.display(),
        );
    }
    Ok(token.to_owned())
}

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenError {
    /// No bearer token.
    Missing,
    /// Another token.
    Wrong,
}

/// A JSON page.
fn json(status: StatusCode, value: &impl Serialize) -> Response<Page> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON error: `{"error": why}`.
fn error(status: StatusCode, why: impl Into<String>) -> Response<Page> {
    json(status, &serde_json::json!({ "error": why.into() }))
}

/// `POST /reload`: 200 with the summary, 422 with the reason the file was
/// rejected (the running config stays), 503 if nothing takes reloads.
async fn reload(admin: &Admin) -> Response<Page> {
    if admin.serving.get().is_none() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is starting: reload once it serves\n".into(),
        );
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    if admin
        .reloads
        .send(crate::gateway::ReloadAsk { reply })
        .await
        .is_err()
    {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "reloads are not taken by this process\n".into(),
        );
    }
    match answer.await {
        Ok(Ok(summary)) => text(StatusCode::OK, format!("reloaded: {summary}\n")),
        Ok(Err(why)) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("rejected, the running config stays: {why}\n"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the reload was dropped (shutting down)\n".into(),
        ),
    }
}

/// Seconds, as the API writes durations (three decimals).
fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// An app's pool settings, as `GET /apps` shows them.
#[derive(Serialize)]
struct Settings {
    min_warm: usize,
    max_instances: usize,
    max_concurrency: usize,
    idle_timeout_seconds: Option<f64>,
    start_timeout_seconds: f64,
    hold_queue: usize,
    hold_timeout_seconds: f64,
}

impl From<Sizing> for Settings {
    fn from(s: Sizing) -> Settings {
        Settings {
            min_warm: s.min_warm,
            max_instances: s.max_instances,
            max_concurrency: s.max_concurrency,
            idle_timeout_seconds: s.idle_timeout.map(secs),
            start_timeout_seconds: secs(s.start_timeout),
            hold_queue: s.hold_queue,
            hold_timeout_seconds: secs(s.hold_timeout),
        }
    }
}

/// A pool's counts, as `GET /apps` shows them.
#[derive(Serialize)]
struct PoolState {
    instances: usize,
    warm: usize,
    leased: usize,
    draining: usize,
    restoring: usize,
    stopping: usize,
    queued: usize,
    peak: usize,
}

impl From<Stats> for PoolState {
    fn from(s: Stats) -> PoolState {
        PoolState {
            instances: s.instances,
            warm: s.warm(),
            leased: s.leased,
            draining: s.draining,
            restoring: s.restoring,
            stopping: s.stopping,
            queued: s.queued,
            peak: s.peak,
        }
    }
}

/// `GET /apps`.
fn apps(serving: &Serving) -> Response<Page> {
    let table = serving.apps.table();
    let mut targets: Vec<_> = table.targets().iter().collect();
    targets.sort_by_key(|(name, _)| *name);
    let apps: Vec<serde_json::Value> = targets
        .into_iter()
        .map(|(name, target)| match &**target {
            Target::Pool { pool, .. } => serde_json::json!({
                "name": &**name,
                "type": "pool",
                "pool": PoolState::from(pool.stats()),
                "settings": Settings::from(pool.sizing()),
                "last_error": pool.last_error(),
            }),
            Target::Static { upstream, .. } => serde_json::json!({
                "name": &**name,
                "type": "static",
                "upstream": upstream.addr().to_string(),
            }),
        })
        .collect();
    let runtimes = lock(&serving.runtimes);
    let mut stocks: Vec<serde_json::Value> = runtimes
        .iter()
        .map(|(name, rt)| {
            let (warm, restoring) = rt.stock();
            serde_json::json!({
                "name": name,
                "warm": warm,
                "restoring": restoring,
                "min_warm": rt.min_warm(),
                "last_error": rt.last_error(),
            })
        })
        .collect();
    stocks.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json(
        StatusCode::OK,
        &serde_json::json!({ "apps": apps, "runtimes": stocks }),
    )
}

/// One instance, as `GET /instances` lists it.
#[derive(Serialize)]
struct InstanceRow {
    id: String,
    app: String,
    state: &'static str,
    age_seconds: f64,
    in_flight: usize,
    idle_seconds: Option<f64>,
    vmm_pid: Option<u32>,
    tap: Option<String>,
    snapshot: Option<String>,
}

/// `GET /instances`, of the app `only` if given.
fn instances(serving: &Serving, only: Option<&str>) -> Response<Page> {
    let table = serving.apps.table();
    if let Some(app) = only {
        if !table.targets().contains_key(app) {
            return error(StatusCode::NOT_FOUND, format!("no app {app}"));
        }
    }
    let rows: Vec<InstanceRow> = members(&table, only)
        .into_iter()
        .map(|(app, m)| {
            let detail = m.detail;
            InstanceRow {
                id: m.name.to_string(),
                app: app.to_string(),
                state: m.state.as_str(),
                age_seconds: secs(m.age),
                in_flight: m.in_flight,
                idle_seconds: m.idle_for.map(secs),
                vmm_pid: detail.as_ref().map(|d| d.pid),
                tap: detail.as_ref().map(|d| d.tap.clone()),
                snapshot: detail.and_then(|d| d.snapshot),
            }
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "instances": rows }))
}

/// Every pool's members and restores in flight in `table` (of the app
/// `only` if given), by app, then name.
fn members(
    table: &crate::proxy::Table,
    only: Option<&str>,
) -> Vec<(Arc<str>, MemberInfo<VmDetail>)> {
    let mut rows = Vec::new();
    for (app, target) in table.targets() {
        let Target::Pool { pool, .. } = &**target else {
            continue;
        };
        if only.is_some_and(|o| o != &**app) {
            continue;
        }
        rows.extend(pool.members().into_iter().map(|m| (app.clone(), m)));
    }
    rows.sort_by(|a, b| (&a.0, &a.1.name).cmp(&(&b.0, &b.1.name)));
    rows
}

/// `POST /instances/ID/drain`: 200, 409 for a restore in flight, 404.
fn drain(serving: &Serving, id: &str) -> Response<Page> {
    let table = serving.apps.table();
    for (app, target) in table.targets() {
        if let Target::Pool { pool, .. } = &**target {
            match pool.drain(id) {
                // The engine logs the drain once, in the VM's span.
                Drained::Draining => {
                    return json(
                        StatusCode::OK,
                        &serde_json::json!({ "drained": id, "app": &**app }),
                    );
                }
                Drained::Restoring => {
                    return error(
                        StatusCode::CONFLICT,
                        format!("{id} is still restoring: drain it once it is ready"),
                    )
                }
                Drained::NotFound => {}
            }
        }
    }
    error(StatusCode::NOT_FOUND, format!("no instance {id}"))
}

/// `POST /apps/NAME/prewarm?count=N` (N from 1 to 1000; 1 if left out).
fn prewarm(serving: &Serving, app: &str, query: Option<&str>) -> Response<Page> {
    let mut asked = None;
    for (key, value) in query_pairs(query) {
        match key {
            "count" => asked = asked.or(Some(value)),
            "" => {}
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{other:?}: prewarm takes only count=N"),
                )
            }
        }
    }
    let count = match asked {
        None => 1,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) && v.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("count: {v:?} is not a number from 1 to 1000"),
                )
            }
        },
    };
    let table = serving.apps.table();
    let Some(target) = table.targets().get(app) else {
        return error(StatusCode::NOT_FOUND, format!("no app {app}"));
    };
    let Target::Pool { pool, .. } = &**target else {
        return error(
            StatusCode::CONFLICT,
            format!("{app} is a static app: it has no instances"),
        );
    };
    match pool.prewarm(count) {
        Ok(done) => {
            if done.started > 0 {
                info!(%app, count, started = done.started, "prewarm by the admin API");
            }
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "app": app,
                    "count": count,
                    "started": done.started,
                    "over_max_instances": done.over_max,
                    "max_instances": pool.sizing().max_instances,
                }),
            )
        }
        Err(Prewarm::Closed) => error(
            StatusCode::CONFLICT,
            format!("{app}'s pool is closed (retired by a reload, or shutting down)"),
        ),
        Err(Prewarm::BackingOff { for_, reason }) => {
            let mut resp = error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{app}'s starts are failing ({reason}); the next may begin in {:.1} s",
                    for_.as_secs_f64()
                ),
            );
            // Whole seconds, rounded up (RFC 9110 section 10.2.3).
            let whole = for_.as_secs() + u64::from(for_.subsec_nanos() > 0);
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(whole.max(1)),
            );
            resp
        }
    }
}

/// A query string's `key=value` pairs, the values percent-decoded.
fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, String)> {
    query.into_iter().flat_map(|q| q.split('&')).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
        (k, v.into_owned())
    })
}

/// The first value of `key` in a query string, percent-decoded.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    query_pairs(query).find_map(|(k, v)| (k == key).then_some(v))
}

/// `GET /readyz`: ready once serving and every pool and runtime stock has
/// had its `min_warm` (instances not draining, restores not counted) or
/// has failed with a reason, which it names; ready from then on (the
/// per-app lines say how each stands now). The per-app lines go only to
/// callers with the token when one is set (`detail`).
fn readyz(admin: &Admin, detail: bool) -> Response<Page> {
    let Some(serving) = admin.serving.get() else {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({
                "ready": false,
                "status": "starting: building snapshots and pools",
            }),
        );
    };
    let mut ready = true;
    let mut pools = serde_json::Map::new();
    let table = serving.apps.table();
    for (app, target) in table.targets() {
        let Target::Pool { pool, .. } = &**target else {
            continue;
        };
        let s = pool.stats();
        let (status, met) = warmth(
            s.instances - s.draining,
            pool.sizing().min_warm,
            pool.last_error(),
        );
        ready &= met;
        pools.insert(app.to_string(), status.into());
    }
    let mut stocks = serde_json::Map::new();
    for (name, rt) in lock(&serving.runtimes).iter() {
        let (status, met) = warmth(rt.stock().0, rt.min_warm(), rt.last_error());
        ready &= met;
        stocks.insert(name.clone(), status.into());
    }
    let latched = &admin.became_ready;
    if ready {
        latched.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let ready = latched.load(std::sync::atomic::Ordering::Relaxed);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // A cluster node cut off from etcd still serves: it stays in its
    // balancer, and says it is degraded.
    let degraded = serving.cluster.as_ref().and_then(|c| c.degraded());
    let mut body = serde_json::json!({ "ready": ready });
    if serving.cluster.is_some() {
        body["degraded"] = degraded.is_some().into();
    }
    if detail {
        body["apps"] = pools.into();
        body["runtimes"] = stocks.into();
        if let Some(why) = degraded {
            body["cluster"] = why.into();
        }
    }
    json(status, &body)
}

/// `GET /cluster`: this node's view of its cluster.
fn cluster(serving: &Serving) -> Response<Page> {
    let Some(c) = &serving.cluster else {
        return error(StatusCode::NOT_FOUND, "this gateway is not in a cluster");
    };
    let catalog = c.catalog();
    let nodes: serde_json::Map<String, serde_json::Value> = catalog
        .nodes
        .iter()
        .map(|(name, known)| {
            let mut v = serde_json::to_value(&known.entry).unwrap_or_default();
            v["revision"] = known.revision.into();
            (name.to_string(), v)
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "node": &**c.node(),
            "degraded": c.degraded(),
            "catalog_age_seconds": c.catalog_age().map(|a| a.as_secs_f64()),
            "revision": catalog.revision,
            "nodes": nodes,
            "peers_down": c.peers_down().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        }),
    )
}

/// How a set with `have` of its `want` warm stands for `/readyz`, and
/// whether that counts as ready: met, or failed with `last_error`.
fn warmth(have: usize, want: usize, last_error: Option<String>) -> (String, bool) {
    match (have >= want, last_error) {
        (true, _) => (format!("min_warm met: {have} of {want}"), true),
        (false, Some(e)) => (format!("failed: {e}"), true),
        (false, None) => (format!("warming: {have} of {want}"), false),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn respond(admin: &Admin, req: &Request<Incoming>) -> Response<Page> {
    let path = req.uri().path();
    let probe = matches!(path, "/livez" | "/healthz" | "/readyz");
    let admitted = match &admin.token {
        None => true,
        Some(token) => match token.check(req) {
            Ok(()) => true,
            // The probes answer without the token (with less detail).
            Err(_) if probe => false,
            Err(why) => return unauthorized(why),
        },
    };
    let decoded: Vec<std::borrow::Cow<'_, str>> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy())
        .collect();
    let segments: Vec<&str> = decoded.iter().map(|s| &**s).collect();
    let method = req.method();
    let read = method == http::Method::GET || method == http::Method::HEAD;
    let write = method == http::Method::POST;
    let route = match segments.as_slice() {
        ["reload"] | ["instances", _, "drain"] | ["apps", _, "prewarm"] => Route::Post,
        [""]
        | ["metrics"]
        | ["livez"]
        | ["healthz"]
        | ["readyz"]
        | ["apps"]
        | ["instances"]
        | ["cluster"] => Route::Get,
        _ => Route::None,
    };
    match (route, read, write) {
        (Route::None, ..) => {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "no admin page {path}; try / (the status page), /metrics, /livez, /readyz, /apps, /instances, /cluster, \
                     POST /instances/ID/drain, POST /apps/NAME/prewarm?count=N or POST /reload\n"
                ),
            )
        }
        (Route::Get, false, _) => return not_allowed("GET, HEAD"),
        (Route::Post, _, false) => return not_allowed("POST"),
        _ => {}
    }
    match segments.as_slice() {
        ["reload"] => reload(admin).await,
        ["metrics"] => metrics(&admin.registry),
        ["livez"] | ["healthz"] => text(StatusCode::OK, "ok\n".into()),
        ["readyz"] => readyz(admin, admitted),
        _ => {
            let Some(serving) = admin.serving.get() else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the gateway is starting: its apps are not up yet",
                );
            };
            match segments.as_slice() {
                [""] => status_page(serving),
                ["apps"] => apps(serving),
                ["cluster"] => cluster(serving),
                ["instances"] => {
                    instances(serving, query_value(req.uri().query(), "app").as_deref())
                }
                ["instances", id, "drain"] => drain(serving, id),
                ["apps", app, "prewarm"] => prewarm(serving, app, req.uri().query()),
                _ => unreachable!("routed above"),
            }
        }
    }
}

/// `GET /`: the status page.
fn status_page(serving: &Serving) -> Response<Page> {
    let mut resp = Response::new(Full::new(Bytes::from(page::render(serving))));
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Nothing but its own inline style: no script, no other origin.
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

/// Which method a page takes.
enum Route {
    Get,
    Post,
    None,
}

/// 401 with the challenge of RFC 6750 section 3 (`error="invalid_token"`
/// for a token that is not the one, section 3.1).
fn unauthorized(why: TokenError) -> Response<Page> {
    let (challenge, message) = match why {
        TokenError::Missing => (
            "Bearer realm=\"snapgate admin\"",
            "this admin listener needs Authorization: Bearer TOKEN \
             (snapgate commands: --config FILE or --token-file FILE)",
        ),
        TokenError::Wrong => (
            "Bearer realm=\"snapgate admin\", error=\"invalid_token\"",
            "the bearer token is not this admin listener's (admin_token_file)",
        ),
    };
    let mut resp = error(StatusCode::UNAUTHORIZED, message);
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static(challenge),
    );
    resp
}

/// 405 with `Allow: allow` (RFC 9110 section 15.5.6).
fn not_allowed(allow: &'static str) -> Response<Page> {
    let mut resp = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("this page takes {allow}\n"),
    );
    resp.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    resp
}

/// `GET /metrics`.
fn metrics(registry: &Registry) -> Response<Page> {
    let encoder = TextEncoder::new();
    let mut buf = Vec::new();
    if let Err(e) = encoder.encode(&registry.gather(), &mut buf) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        );
    }
    let mut resp = text(StatusCode::OK, String::from_utf8_lossy(&buf).into_owned());
    if let Ok(v) = encoder.format_type().parse() {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// Most admin connections open at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Longest a client may take to send a request head, and to take a write
/// of the answer: a client that stops reading loses its connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin pages until `stop` is cancelled; each connection runs
/// on `tasks` and ends with it. At most 64 connections at once, each
/// bounded by 10 s for reading a head and for each write (the
/// admin listener answers before any token is checked, so a client that
/// never reads must not hold memory or descriptors).
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            _ = stop.cancelled() => return,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("admin accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(IO_TIMEOUT));
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move {
                let mut resp = respond(&admin, &req).await;
                // Pages echo names from the request (a 404's "no
                // instance X"): never sniffed as anything but their type.
                resp.headers_mut().insert(
                    http::header::X_CONTENT_TYPE_OPTIONS,
                    http::HeaderValue::from_static("nosniff"),
                );
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = http.serve_connection(TokioIo::new(Box::pin(stream)), service);
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

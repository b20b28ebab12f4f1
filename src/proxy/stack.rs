//! The request path: each policy one layer, outermost first. The layers
//! are the steps of one future per request, not a service each: a
//! request allocates that one future, and the stack is shared as one
//! pointer (a stack of boxed tower services cost a clone of every layer
//! and a boxed future per layer, per request). The whole is a
//! [`tower::Service`], as is [`Policies`] over any inner service.
//!
//! ```text
//! boxed response body
//!   request id           X-Request-Id kept or made; to the app and the client
//!   access log           a line per request at its body's end (`access_log`)
//!   trace + metrics      a DEBUG span per request; requests_total, duration
//!   client body          timeouts: body_read_timeout (408); a bounded drain if unread
//!   errors               a ProxyError or a shed request becomes its response
//!   load shed            over max_requests_in_flight: 503 + Retry-After at once
//!   concurrency limit    max_requests_in_flight permits (shared by the listeners), held to the headers
//!   framing              a head over max_header_bytes: 431; codings: 400/501
//!   authority            Host / absolute-form -> one authority, or 400/405
//!   acme                 plain listener, tls.acme: HTTP-01 challenge answers
//!   certificate          TLS listener: a host its connection's certificate is not for: 421
//!   redirect             plain listener, host with a certificate: 308 to https
//!   forwarding           hop-by-hop out; X-Forwarded-*, Forwarded, X-Real-IP; X-Request-Id
//!   app                  route, claim, forward (retry once if nothing was sent)
//! ```
//!
//! The request reaching the stack carries its [`Peer`] (set per
//! connection by the listener).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use ipnet::IpNet;
use tower::ServiceExt;
use tracing::{debug_span, field, Instrument, Span};

use super::app::{AppService, Apps, RoutedTo};
use super::body::RequestBody;
use super::error::{ErrorKind, ProxyError};
use super::forwarded::{ClientAddr, Forwarding, Peer};
use super::{access, authority, framing};
use super::{ProxyBody, ProxyMetrics};
use crate::pool::Tasks;

/// The whole request path: the module doc's layers, over the apps. It
/// never fails: every error has become a response in the error layer.
///
/// Cloning it is one pointer: the listener's connections share it and
/// each request clones it (hyper calls a service through `&self`).
/// [`Stack::serve`] is the same path as its [`tower::Service`] impl
/// without boxing the request's future: the listener's connections use it.
#[derive(Clone)]
pub struct Stack(Arc<Outer>);

/// What the outermost layers (trace, metrics, client body) need.
struct Outer {
    policies: Policies<AppService>,
    body_timeout: Duration,
    access_log: bool,
    tasks: Tasks,
    metrics: ProxyMetrics,
}

impl Stack {
    /// `req` through every layer, to its response.
    pub fn serve(
        &self,
        mut req: Request<Incoming>,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let outer = self.0.clone();
        let started = tokio::time::Instant::now();
        // The request id layer: kept or made, before any layer can answer;
        // the forwarding layer writes it into the request.
        let request_id = access::RequestId::of(&req);
        let id = request_id.0.clone();
        req.extensions_mut().insert(request_id);
        // The access log layer: what the line says of the request, taken
        // now; written at the response body's end.
        let entry = outer.access_log.then(|| {
            let client = outer.policies.0.forwarding.client_of(&req);
            access::Entry::of(&req, client, id.clone())
        });
        // The trace layer: a span per request, DEBUG: off unless asked
        // for, and then free. At INFO it cost a fifth more instructions
        // per warm request (formatting its fields, the subscriber's
        // bookkeeping); the warnings of the app layer name the request's
        // method and target themselves.
        let span = debug_span!(
            "request",
            id = id.to_str().unwrap_or(""),
            method = %req.method(),
            uri = %req.uri(),
            peer = ?req.extensions().get::<Peer>().map(|p| p.addr),
            client = field::Empty
        );
        // The client body layer: the read timeout, and a drain if left
        // unread.
        let expects_continue = req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let req =
            req.map(|b| RequestBody::new(b, outer.body_timeout, expects_continue, &outer.tasks));
        // Written at drop if no response was made (the client went away).
        let mut unanswered = Unanswered(entry);
        async move {
            let mut resp = outer.policies.0.answer(req).await;
            // The metrics layer: observed at the response headers.
            let (app, held) = match resp.extensions().get::<RoutedTo>() {
                Some(r) => (&r.app, r.held.is_some()),
                None => (outer.metrics.unrouted(), false),
            };
            app.observe(resp.status(), held, started.elapsed());
            resp.headers_mut().insert(access::X_REQUEST_ID.clone(), id);
            match unanswered.0.take() {
                Some(entry) => entry.logging(resp),
                None => resp,
            }
        }
        .instrument(span)
    }
}

/// The access log entry of a request not answered yet: dropped with it
/// (its client went away), it writes the line of an unanswered request.
struct Unanswered(Option<access::Entry>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(entry) = self.0.take() {
            entry.unanswered();
        }
    }
}

impl tower::Service<Request<Incoming>> for Stack {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let answer = self.serve(req);
        Box::pin(async move { Ok(answer.await) })
    }
}

/// What the stack's policies are set from.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Longest wait between two reads of a request body.
    pub body_read_timeout: Duration,
    /// Whether each request is written to the access log.
    pub access_log: bool,
    /// Permits for requests served at once (shared by every listener);
    /// without one, requests are shed.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
    /// Most header field lines.
    pub max_headers: usize,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The listener's scheme: `http` or `https`.
    pub proto: &'static str,
    /// Hosts this (plain) listener sends to HTTPS instead.
    pub redirect: Option<Redirect>,
    /// The certificates of this (TLS) listener: a request must be for a
    /// host its connection's certificate was chosen for.
    pub certs: Option<Arc<super::tls::Certs>>,
    /// ACME HTTP-01 challenges this (plain) listener answers.
    pub acme_http01: Option<Arc<crate::acme::Http01>>,
    /// The cluster whose hop markers this listener believes.
    pub cluster: Option<crate::cluster::Cluster>,
}

/// The SNI a TLS connection was opened with: a request extension.
#[derive(Clone, Debug)]
pub struct Sni(pub Option<Arc<str>>);

/// The plain listener's redirect to HTTPS (`tls.redirect_http`).
#[derive(Clone)]
pub struct Redirect {
    /// The TLS listener's certificates: hosts they cover are redirected.
    pub certs: Arc<super::tls::Certs>,
    /// The port in the `Location`: `tls.redirect_port`, else the TLS
    /// listener's (left out when 443).
    pub port: u16,
    /// Peers whose `X-Forwarded-Proto: https` says the client already came
    /// over TLS (a TLS-terminating proxy in front): not redirected again.
    pub trusted: Arc<[IpNet]>,
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirect")
            .field("port", &self.port)
            .finish()
    }
}

impl Redirect {
    /// The HTTPS URL for `req`, if its host has a certificate and it did
    /// not come over TLS already; never for the asterisk form.
    fn location<B>(&self, req: &Request<B>) -> Option<String> {
        let name = &req.extensions().get::<super::authority::Authority>()?.name;
        if !self.certs.covers(name) || req.uri().path() == "*" {
            return None;
        }
        let peer = req.extensions().get::<Peer>()?;
        let ip = peer.addr.ip().to_canonical();
        let via_tls = self.trusted.iter().any(|n| n.contains(&ip))
            && req
                .headers()
                .get("x-forwarded-proto")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
        if via_tls {
            return None;
        }
        let port = match self.port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let target = if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("/{target}")
        };
        Some(format!("https://{name}{port}{target}"))
    }
}

/// Rule 5 of [`super::tls`]: `req`, or 421 if its host selects another
/// certificate than its connection's.
fn same_certificate<B>(
    certs: &super::tls::Certs,
    req: Request<B>,
) -> Result<Request<B>, ProxyError> {
    let sni = req.extensions().get::<Sni>().and_then(|s| s.0.clone());
    let name = req
        .extensions()
        .get::<super::authority::Authority>()
        .map(|a| a.name.clone());
    let served = certs.served_for(sni.as_deref());
    let wanted = certs.served_for(name.as_deref());
    match (served, wanted) {
        (Some(a), Some(b)) if Arc::ptr_eq(&a, &b) => Ok(req),
        _ => Err(ProxyError::new(ErrorKind::Misdirected)),
    }
}

/// Builds the stack of the module doc over `apps`; lingering drains run
/// on `tasks`.
pub fn build(apps: Arc<Apps>, cfg: &StackConfig, metrics: ProxyMetrics, tasks: Tasks) -> Stack {
    Stack(Arc::new(Outer {
        policies: policies(AppService(apps), cfg, metrics.clone()),
        body_timeout: cfg.body_read_timeout,
        access_log: cfg.access_log,
        tasks,
        metrics,
    }))
}

/// The policy layers of the module doc, from errors to forwarding, over
/// an inner service (the app service; a mock in tests). Each layer is a
/// step of one future, not a service of its own: a request allocates one
/// future for them all, and cloning the whole is one pointer.
pub struct Policies<S>(Arc<PolicyLayers<S>>);

impl<S> Clone for Policies<S> {
    fn clone(&self) -> Self {
        Policies(self.0.clone())
    }
}

/// The settings of each policy layer, in the module doc's order.
struct PolicyLayers<S> {
    /// Load shed: requests shed for want of a permit are counted here.
    metrics: ProxyMetrics,
    /// Load shed and concurrency limit: a permit per request, held to its
    /// response headers; none left: 503 at once.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Framing.
    max_head: usize,
    max_headers: usize,
    /// ACME HTTP-01 answers (plain listener, `tls.acme`).
    http01: Option<Arc<crate::acme::Http01>>,
    /// The certificate check (TLS listener).
    certs: Option<Arc<super::tls::Certs>>,
    /// The redirect to HTTPS (plain listener, `tls.redirect_http`).
    redirect: Option<Redirect>,
    /// Forwarding headers.
    forwarding: Forwarding,
    /// The app service.
    inner: S,
}

/// The policy layers of the module doc over `inner`.
pub fn policies<S>(inner: S, cfg: &StackConfig, metrics: ProxyMetrics) -> Policies<S> {
    Policies(Arc::new(PolicyLayers {
        metrics,
        in_flight: cfg.in_flight.clone(),
        max_head: cfg.max_header_bytes,
        max_headers: cfg.max_headers,
        http01: cfg.acme_http01.clone(),
        certs: cfg.certs.clone(),
        redirect: cfg.redirect.clone(),
        forwarding: Forwarding::new(&cfg.trusted_proxies, cfg.proto)
            .with_cluster(cfg.cluster.clone()),
        inner,
    }))
}

impl<S> PolicyLayers<S> {
    /// The error layer over the rest: `req`'s response, whatever failed.
    ///
    /// Not an `async fn`, nor is [`PolicyLayers::forward`]: an `async fn`
    /// copies each argument into a local of its own, and a future keeps
    /// room for every local in scope at an await, moved or not. The
    /// request (328 bytes) is held once here and once in the app's call,
    /// and the whole future is moved as it is made.
    #[allow(clippy::manual_async_fn)]
    fn answer<'a, B: 'a>(
        &'a self,
        req: Request<B>,
    ) -> impl Future<Output = Response<ProxyBody>> + 'a
    where
        S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = tower::BoxError>
            + Clone,
    {
        async move {
            // Load shed and concurrency limit: no waiting for a permit.
            // The permit is held to the response headers.
            let Ok(_permit) = self.in_flight.try_acquire() else {
                self.metrics.shed("max_requests_in_flight");
                return answer(Err(ProxyError::new(ErrorKind::Overloaded).into()));
            };
            answer(self.forward(req).await)
        }
    }

    /// The layers from framing to the app, in order: those before the
    /// app are not async, and run as this is called.
    fn forward<B>(
        &self,
        req: Request<B>,
    ) -> futures::future::Either<Refused, tower::util::Oneshot<S, Request<B>>>
    where
        S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = tower::BoxError>
            + Clone,
    {
        match self.admit(req) {
            Err(e) => futures::future::Either::Left(std::future::ready(Err(e))),
            Ok(req) => futures::future::Either::Right(self.inner.clone().oneshot(req)),
        }
    }

    /// The layers from framing to forwarding: the request the app gets,
    /// or the error that answers it.
    fn admit<B>(&self, req: Request<B>) -> Result<Request<B>, tower::BoxError> {
        // Framing: nothing ambiguous or not understood is passed on.
        let req = framing::check(req, self.max_head, self.max_headers)?;
        // Authority: one Host, or the absolute-form target's (400 else).
        let req = authority::normalize(req)?;
        // Plain listener, tls.acme: a CA's HTTP-01 request gets its key
        // authorization.
        if let Some(key_auth) = self
            .http01
            .as_ref()
            .and_then(|h| h.answer(req.uri().path()))
        {
            return Err(ProxyError::new(ErrorKind::AcmeChallenge(key_auth)).into());
        }
        // TLS listener: the host must be one the connection's certificate
        // is for (421).
        let req = match &self.certs {
            Some(certs) => same_certificate(certs, req)?,
            None => req,
        };
        // Plain listener, tls.redirect_http: hosts with a certificate go
        // to HTTPS.
        // A peer node's forward is not redirected: the client's request
        // was redirected, or not, where it arrived.
        if let Some(to) = self.redirect.as_ref().and_then(|r| r.location(&req)) {
            if self.forwarding.peer_node(&req).is_none() {
                return Err(ProxyError::new(ErrorKind::Redirect(to)).into());
            }
        }
        // Forwarding headers, by the trusted_proxies policy; the request
        // id (after the checks above, which count the head as sent, and
        // after hop-by-hop fields are stripped: it is always the app's).
        let mut req = self.forwarding.apply(req);
        access::RequestId::apply(&mut req);
        let span = Span::current();
        if !span.is_disabled() {
            let client = match req.extensions().get::<ClientAddr>() {
                Some(ClientAddr(ip)) => Some(*ip),
                None => req
                    .extensions()
                    .get::<Peer>()
                    .map(|p| p.addr.ip().to_canonical()),
            };
            if let Some(ip) = client {
                span.record("client", field::display(ip));
            }
        }
        Ok(req)
    }
}

impl<S, B> tower::Service<Request<B>> for Policies<S>
where
    S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = tower::BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let layers = self.0.clone();
        Box::pin(async move { Ok(layers.answer(req).await) })
    }
}

/// A request a layer before the app refused: its error, at once.
type Refused = std::future::Ready<Result<Response<ProxyBody>, tower::BoxError>>;

/// The error layer: the response for `r`'s error.
fn answer(r: Result<Response<ProxyBody>, tower::BoxError>) -> Response<ProxyBody> {
    let e = match r {
        Ok(resp) => return resp,
        Err(e) => e,
    };
    let e = match e.downcast::<ProxyError>() {
        Ok(e) => *e,
        Err(other) => {
            tracing::error!(
                "request failed inside snapgate: {}",
                crate::display_chain(other.as_ref())
            );
            ProxyError::new(ErrorKind::Internal)
        }
    };
    tracing::debug!(status = %e.kind.status(), "answered by snapgate: {e}");
    let mut resp = e.response();
    if let Some(app) = e.app {
        resp.extensions_mut().insert(RoutedTo {
            app,
            instance: e.instance,
            held: e.held,
        });
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::authority::Authority;
    use crate::proxy::error::text;
    use http::StatusCode;
    use tower::{Service, ServiceExt};
    use tower_test::mock;

    type Mock = mock::Mock<Request<()>, Response<ProxyBody>>;
    type Handle = mock::Handle<Request<()>, Response<ProxyBody>>;

    fn stack(max_in_flight: usize) -> (Policies<Mock>, Handle, ProxyMetrics) {
        let (inner, handle): (Mock, Handle) = mock::pair();
        let metrics = ProxyMetrics::new(&prometheus::Registry::new()).unwrap();
        let cfg = StackConfig {
            body_read_timeout: Duration::from_secs(1),
            access_log: false,
            in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            max_header_bytes: 65536,
            max_headers: 100,
            redirect: None,
            certs: None,
            acme_http01: None,
            trusted_proxies: Vec::new(),
            proto: "http",
            cluster: None,
        };
        (policies(inner, &cfg, metrics.clone()), handle, metrics)
    }

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/p");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut r = b.body(()).unwrap();
        r.extensions_mut().insert(Peer {
            addr: "192.0.2.1:4000".parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
        });
        r
    }

    #[tokio::test]
    async fn a_request_reaches_the_app_with_its_authority_and_forwarding_headers() {
        let (mut svc, mut handle, _) = stack(10);
        let call = svc.ready().await.unwrap().call(request(&[
            ("host", "A.Test"),
            ("x-forwarded-for", "6.6.6.6"),
            ("connection", "host"),
        ]));
        let serve = async {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.headers()["host"], "A.Test");
            assert_eq!(req.extensions().get::<Authority>().unwrap().name, "a.test");
            assert_eq!(req.headers()["x-forwarded-for"], "192.0.2.1");
            send.send_response(text(StatusCode::OK, "hi".into()));
        };
        let (resp, ()) = tokio::join!(call, serve);
        assert_eq!(resp.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn a_bad_host_is_answered_400_without_reaching_the_app() {
        let (svc, mut handle, _) = stack(10);
        let resp = svc
            .oneshot(request(&[("host", "a.test"), ("host", "b.test")]))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let reached = tokio::time::timeout(Duration::from_millis(50), handle.next_request()).await;
        assert!(!matches!(reached, Ok(Some(_))), "the app saw the request");
    }

    #[tokio::test]
    async fn an_apps_error_becomes_its_response_naming_the_app_for_metrics() {
        let (svc, mut handle, metrics) = stack(10);
        let call = svc.oneshot(request(&[("host", "a.test")]));
        let serve = async {
            let (_, send) = handle.next_request().await.unwrap();
            let app = Arc::new(metrics.for_app("a"));
            send.send_error(ErrorKind::ResponseTimeout(Duration::from_secs(2)).of(&app));
        };
        let (resp, ()) = tokio::join!(call, serve);
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 504);
        assert_eq!(
            &**resp.extensions().get::<RoutedTo>().unwrap().app.name(),
            "a"
        );
    }

    #[tokio::test]
    async fn over_max_requests_in_flight_is_shed_at_once_with_retry_after() {
        let (svc, mut handle, metrics) = stack(1);
        let first = tokio::spawn(svc.clone().oneshot(request(&[("host", "a.test")])));
        let (_, send) = handle.next_request().await.unwrap();
        let second = svc
            .clone()
            .oneshot(request(&[("host", "a.test")]))
            .await
            .unwrap();
        assert_eq!(second.status(), 503);
        assert_eq!(second.headers()["retry-after"], "1");
        assert_eq!(
            metrics
                .shed
                .with_label_values(&["max_requests_in_flight"])
                .get(),
            1
        );
        send.send_response(text(StatusCode::OK, "done".into()));
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
        // The permit is back: the next request is served.
        let third = tokio::spawn(svc.oneshot(request(&[("host", "a.test")])));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(text(StatusCode::OK, "again".into()));
        assert_eq!(third.await.unwrap().unwrap().status(), 200);
    }
}

//! The admin listener: `/metrics` (Prometheus text format), `/healthz`,
//! and `POST /reload` (reload `proxy.yaml`, as SIGHUP does; the answer
//! says what changed, or why the file was rejected).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

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
}

/// `POST /reload`: 200 with the summary, 422 with the reason the file was
/// rejected (the running config stays), 503 if nothing takes reloads.
async fn reload(admin: &Admin) -> Response<Page> {
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

async fn respond(admin: &Admin, req: &Request<Incoming>) -> Response<Page> {
    let registry = &admin.registry;
    match req.uri().path() {
        "/reload" if req.method() == http::Method::POST => reload(admin).await,
        "/reload" => {
            let mut resp = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST /reload reloads the config\n".into(),
            );
            resp.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            resp
        }
        "/metrics" => {
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
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        other => text(
            StatusCode::NOT_FOUND,
            format!("no admin page {other}; try /metrics, /healthz or POST /reload\n"),
        ),
    }
}

/// Serves the admin pages until `stop` is cancelled; each connection runs
/// on `tasks` and ends with it.
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
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
        let admin = admin.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(respond(&admin, &req).await) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

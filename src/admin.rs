//! The admin listener: `/metrics` (Prometheus text format) and `/healthz`.

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

fn respond(registry: &Registry, req: &Request<Incoming>) -> Response<Page> {
    match req.uri().path() {
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
            format!("no admin page {other}; try /metrics or /healthz\n"),
        ),
    }
}

/// Serves the admin pages until `stop` is cancelled; each connection runs
/// on `tasks` and ends with it.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
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
        let registry = registry.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let resp = respond(&registry, &req);
            async move { Ok::<_, Infallible>(resp) }
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

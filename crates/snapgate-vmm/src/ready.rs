//! Reaching a guest over its tap, and the readiness probe.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

use super::{watch, Endpoint, Vm, Vmm, VmmError};

/// Why one HTTP exchange with a guest failed, or why a readiness probe
/// did not see 200.
#[derive(Debug, thiserror::Error)]
pub enum GuestHttpError {
    /// The TCP connection failed.
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The HTTP/1.1 handshake, the request or the answer's body failed.
    #[error("{step}: {source}")]
    Http {
        /// `handshake`, `request` or `body`.
        step: &'static str,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be built (a path that is not a valid URI).
    #[error("request: {0}")]
    Build(#[source] http::Error),
    /// The guest answered, with another status than 200 (probes only).
    #[error("HTTP {0}")]
    Status(u16),
    /// The guest did not answer within the attempt's time.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// The probe's deadline passed before any attempt.
    #[error("no attempt made")]
    NoAttempt,
}

/// Opens a TCP connection to the guest, bound to its tap (`SO_BINDTODEVICE`):
/// every clone has the same address, the tap is what tells them apart.
pub async fn connect(endpoint: &Endpoint) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind_device(Some(endpoint.tap.as_bytes()))?;
    socket.set_nodelay(true)?;
    socket.connect(endpoint.addr.into()).await
}

/// One HTTP/1.1 GET of `path` on the guest; returns the status and body.
pub async fn get(endpoint: &Endpoint, path: &str) -> Result<(u16, Bytes), GuestHttpError> {
    request(endpoint, http::Method::GET, path, Bytes::new()).await
}

/// One HTTP/1.1 request on a fresh connection to the guest; returns the
/// status and body. The connection is closed when the answer was read, or
/// when the returned future is dropped.
pub async fn request(
    endpoint: &Endpoint,
    method: http::Method,
    path: &str,
    body: Bytes,
) -> Result<(u16, Bytes), GuestHttpError> {
    let http = |step| move |source| GuestHttpError::Http { step, source };
    let stream = connect(endpoint).await.map_err(GuestHttpError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http("handshake"))?;
    let _conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, endpoint.addr.to_string());
    if !body.is_empty() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(body)).map_err(GuestHttpError::Build)?;
    let resp = sender.send_request(req).await.map_err(http("request"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(http("body"))?
        .to_bytes();
    Ok((status, body))
}

/// How long one probe attempt may take. A guest whose network is not up yet
/// does not answer ARP, and a connect would otherwise hang for seconds.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between failed attempts (a refused connect returns at once).
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// Probes `GET <ready_path>` on the guest's port until it answers 200 or
/// `timeout` passes; fails at once if the VMM exits or the guest stops
/// ([`watch::guarded`]). Records the step `ready`.
pub async fn wait_ready(vmm: &dyn Vmm, vm: &mut Vm, timeout: Duration) -> Result<(), VmmError> {
    let (port, path) = (vm.endpoint().addr.port(), vm.ready_path().to_owned());
    wait_ready_at(vmm, vm, port, &path, timeout).await
}

/// [`wait_ready`] with `GET path` on `port` of the guest instead (another
/// service of the guest, such as a runtime's agent).
pub async fn wait_ready_at(
    vmm: &dyn Vmm,
    vm: &mut Vm,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(), VmmError> {
    let start = Instant::now();
    let mut endpoint = vm.endpoint().clone();
    endpoint.addr.set_port(port);
    let probing = probe(&endpoint, path, start + timeout);
    match watch::guarded(vmm, vm, "waiting for readiness", probing).await? {
        Ok(()) => {
            vm.record("ready", start.elapsed());
            Ok(())
        }
        Err(last_error) => Err(VmmError::NotReady {
            vm: vm.id().clone(),
            after: timeout,
            path: path.to_owned(),
            addr: endpoint.addr,
            tap: endpoint.tap,
            last_error,
            console_tail: vm.process().log_tail(),
        }),
    }
}

/// Asks `GET path` until it answers 200 (`Ok`) or `deadline` passes (the
/// last failure).
async fn probe(endpoint: &Endpoint, path: &str, deadline: Instant) -> Result<(), GuestHttpError> {
    let mut last_error = GuestHttpError::NoAttempt;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(last_error);
        }
        let attempt = ATTEMPT_TIMEOUT.min(deadline - now);
        match tokio::time::timeout(attempt, get(endpoint, path)).await {
            Ok(Ok((200, _))) => return Ok(()),
            Ok(Ok((status, _))) => last_error = GuestHttpError::Status(status),
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = GuestHttpError::NoAnswer(attempt),
        }
        tokio::time::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

//! Why snapgate answered a request itself, and the answer.
//!
//! Every layer of the stack fails with a [`ProxyError`] (or tower's
//! `Overloaded`, from load shedding); the error layer turns it into a short
//! `text/plain` response whose status follows from the error's source: the
//! client (4xx), the app or its instance (502/504), or capacity (503 with
//! `Retry-After`). Bodies name no internals; details go to the log.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::body::RequestBodyError;
use super::{ProxyBody, RoutedApp};
use crate::pool::ClaimError;

/// A request snapgate answers itself, and the app it was routed to, if it
/// got that far.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct ProxyError {
    /// The app the request was routed to.
    pub app: Option<Arc<RoutedApp>>,
    /// What went wrong.
    pub kind: ErrorKind,
    /// The instance it failed on, if one was leased.
    pub instance: Option<Arc<str>>,
    /// How long the request was held for an instance (`None`: not held).
    pub held: Option<Duration>,
    /// A 503 for want of an instance, to a request a peer node forwarded:
    /// its response carries `Snapgate-Refused`, so the peer may try the
    /// next node (`crate::cluster`, routing step 4).
    pub refused_to_peer: bool,
}

/// What went wrong, by source.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// The request is malformed: its `Host`, target or framing (400).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request's host is not one the TLS connection's certificate was
    /// chosen for (421, RFC 9110 section 15.5.20).
    #[error("the connection's certificate is not this host's")]
    Misdirected,
    /// The host is served over HTTPS: `308 Permanent Redirect` to this
    /// URL (RFC 9110 section 15.4.9).
    #[error("redirected to {0}")]
    Redirect(String),
    /// An ACME HTTP-01 validation request (RFC 8555 section 8.3): `200`
    /// with this key authorization.
    #[error("ACME HTTP-01 challenge answered")]
    AcmeChallenge(String),
    /// The request head is over `max_header_bytes` (431).
    #[error("the request head is too large")]
    HeadTooLarge,
    /// Something of the request snapgate does not implement (501).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    /// A method snapgate does not forward (405), e.g. `CONNECT`.
    #[error("method {0} is not served")]
    MethodNotAllowed(http::Method),
    /// No app serves the host (404).
    #[error("no app serves host {0:?}")]
    UnknownHost(String),
    /// The path is the guest's own, which only snapgate calls (404).
    #[error("the guest's internal path")]
    InternalPath,
    /// The body is over the app's `max_body_size` (413).
    #[error("the request body is over {0} bytes")]
    BodyTooLarge(u64),
    /// The client stopped sending its body (408).
    #[error("no request body data for {0:?}")]
    BodyTimeout(Duration),
    /// The client's body could not be read: it went away or sent garbage
    /// (400).
    #[error("the request body could not be read: {0}")]
    ClientBody(String),
    /// Too many requests in flight (503 with `Retry-After`).
    #[error("too many requests in flight")]
    Overloaded,
    /// No instance of the app could be had (503 with `Retry-After`).
    #[error(transparent)]
    NoInstance(ClaimError),
    /// The app broke off the exchange before a whole response head (502).
    #[error("the upstream failed the request: {0}")]
    Upstream(String),
    /// No connection to the app could be made (502).
    #[error("no connection to the upstream: {0}")]
    Connect(String),
    /// The app answered with something snapgate cannot pass on: a
    /// transfer coding it does not decode, an unasked or wrong protocol
    /// switch (502).
    #[error("the upstream's answer cannot be passed on: {0}")]
    BadAnswer(String),
    /// The instance's VMM died during the exchange (502).
    #[error("the instance's VMM exited")]
    VmGone,
    /// No response headers within the app's `response_timeout` (504).
    #[error("no response headers within {0:?}")]
    ResponseTimeout(Duration),
    /// A failure inside snapgate itself (500); the log has it.
    #[error("internal error")]
    Internal,
}

impl ErrorKind {
    /// For `app`.
    pub fn of(self, app: &Arc<RoutedApp>) -> ProxyError {
        ProxyError {
            app: Some(app.clone()),
            kind: self,
            instance: None,
            held: None,
            refused_to_peer: false,
        }
    }

    /// The kind a request body failure is: found in the `source()` chain of
    /// a hyper client error, where hyper wraps the body's own error.
    pub fn from_body_error(e: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
        let mut source = Some(e);
        while let Some(cause) = source {
            if let Some(b) = cause.downcast_ref::<RequestBodyError>() {
                return Some(match b {
                    RequestBodyError::Timeout(t) => ErrorKind::BodyTimeout(*t),
                    RequestBodyError::TooLarge(max) => ErrorKind::BodyTooLarge(*max),
                    RequestBodyError::Read(e) => ErrorKind::ClientBody(e.to_string()),
                    // Only after a whole answer, which the client has.
                    RequestBodyError::Cut => ErrorKind::Upstream(b.to_string()),
                });
            }
            source = cause.source();
        }
        None
    }

    /// The response status (RFC 9110 section 15).
    pub fn status(&self) -> StatusCode {
        match self {
            ErrorKind::BadRequest(_) | ErrorKind::ClientBody(_) => StatusCode::BAD_REQUEST,
            ErrorKind::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::Redirect(_) => StatusCode::PERMANENT_REDIRECT,
            ErrorKind::AcmeChallenge(_) => StatusCode::OK,
            ErrorKind::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::UnknownHost(_) | ErrorKind::InternalPath => StatusCode::NOT_FOUND,
            ErrorKind::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Overloaded | ErrorKind::NoInstance(_) => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Upstream(_)
            | ErrorKind::Connect(_)
            | ErrorKind::BadAnswer(_)
            | ErrorKind::VmGone => StatusCode::BAD_GATEWAY,
            ErrorKind::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the client reads: no internal figures or paths.
    fn public_message(&self, app: Option<&str>) -> String {
        let app = app.unwrap_or("-");
        match self {
            ErrorKind::BadRequest(why) => format!("bad request: {why}"),
            ErrorKind::MethodNotAllowed(m) => format!("method {m} is not served"),
            ErrorKind::NotImplemented(what) => format!("not implemented: {what}"),
            ErrorKind::HeadTooLarge => "the request head is too large".into(),
            ErrorKind::Redirect(to) => format!("moved to {to}"),
            ErrorKind::AcmeChallenge(key_auth) => key_auth.clone(),
            ErrorKind::Misdirected => "this connection is not for that host".into(),
            ErrorKind::UnknownHost(host) => format!("no app serves host {host:?}"),
            ErrorKind::InternalPath => "not found".into(),
            ErrorKind::BodyTooLarge(max) => format!("the request body is over {max} bytes"),
            ErrorKind::BodyTimeout(_) => "the request body stopped arriving".into(),
            ErrorKind::ClientBody(_) => "the request body could not be read".into(),
            ErrorKind::Overloaded => "too busy; try again shortly".into(),
            ErrorKind::NoInstance(e) => e.public_message(),
            ErrorKind::Upstream(_)
            | ErrorKind::Connect(_)
            | ErrorKind::BadAnswer(_)
            | ErrorKind::VmGone => {
                format!("app {app}: the upstream failed the request")
            }
            ErrorKind::ResponseTimeout(_) => format!("app {app}: no response in time"),
            ErrorKind::Internal => "internal error".into(),
        }
    }

    /// The `kind` label of `snapgate_upstream_errors_total`, for a
    /// failure of the app or its instance.
    pub fn upstream_kind(&self) -> Option<&'static str> {
        Some(match self {
            ErrorKind::Connect(_) => "connect",
            ErrorKind::Upstream(_) => "reset",
            ErrorKind::BadAnswer(_) => "protocol",
            ErrorKind::ResponseTimeout(_) => "timeout",
            ErrorKind::VmGone => "vm_exited",
            _ => return None,
        })
    }

    /// `Retry-After` in seconds, for the 503s.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ErrorKind::Overloaded => Some(1),
            ErrorKind::NoInstance(e) => Some(e.retry_after()),
            _ => None,
        }
    }
}

impl ProxyError {
    /// Without an app (failed before routing).
    pub fn new(kind: ErrorKind) -> ProxyError {
        ProxyError {
            app: None,
            kind,
            instance: None,
            held: None,
            refused_to_peer: false,
        }
    }

    /// The error, on `instance` after being held `held`.
    pub fn on(mut self, instance: Option<Arc<str>>, held: Option<Duration>) -> ProxyError {
        self.instance = instance;
        self.held = held;
        self
    }

    /// The answer the client gets.
    pub fn response(&self) -> Response<ProxyBody> {
        let status = self.kind.status();
        if let ErrorKind::AcmeChallenge(key_auth) = &self.kind {
            // The body is the key authorization, nothing else.
            let mut resp = text(status, key_auth.clone());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return resp;
        }
        let mut resp = text(
            status,
            format!(
                "snapgate: {}\n",
                self.kind
                    .public_message(self.app.as_ref().map(|a| &**a.name()))
            ),
        );
        if let Some(secs) = self.kind.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.refused_to_peer && matches!(self.kind, ErrorKind::NoInstance(_)) {
            resp.headers_mut().insert(
                crate::cluster::REFUSED,
                HeaderValue::from_static("no-instance"),
            );
        }
        if let ErrorKind::Redirect(to) = &self.kind {
            if let Ok(v) = HeaderValue::from_str(to) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
        }
        resp
    }
}

/// A short plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_has_its_status_and_503s_say_when_to_retry() {
        let registry = prometheus::Registry::new();
        let app = Arc::new(
            super::super::ProxyMetrics::new(&registry)
                .unwrap()
                .for_app("a"),
        );
        let cases = [
            (ErrorKind::BadRequest("x"), 400, None),
            (ErrorKind::UnknownHost("h".into()), 404, None),
            (ErrorKind::BodyTooLarge(10), 413, None),
            (ErrorKind::BodyTimeout(Duration::from_secs(1)), 408, None),
            (ErrorKind::Overloaded, 503, Some("1")),
            (ErrorKind::Upstream("reset".into()), 502, None),
            (ErrorKind::Connect("refused".into()), 502, None),
            (ErrorKind::BadAnswer("unasked switch".into()), 502, None),
            (
                ErrorKind::ResponseTimeout(Duration::from_secs(3)),
                504,
                None,
            ),
        ];
        for (kind, status, retry) in cases {
            let resp = kind.of(&app).response();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(
                resp.headers()
                    .get(header::RETRY_AFTER)
                    .map(|v| v.to_str().unwrap()),
                retry
            );
        }
    }

    #[test]
    fn a_full_queue_tells_the_client_no_counts() {
        let e = ErrorKind::NoInstance(ClaimError::QueueFull {
            app: "a".into(),
            instances: 3,
            restoring: 2,
            queued: 97,
        });
        let message = e.public_message(Some("a"));
        assert!(!message.chars().any(|c| c.is_ascii_digit()), "{message}");
    }
}

//! Request ids and the access log.
//!
//! - Every request carries one `X-Request-Id` ([`RequestId`]): the client's own when it
//!   sent exactly one that is 1 to 128 characters of
//!   `A-Z a-z 0-9 - _ . : / + = @ ~` (so it can never break a log line or
//!   a header), else 32 random hex digits (128 bits, as nginx's
//!   `$request_id`). The app gets it; so does the client, on the
//!   response, whoever answered.
//! - The access log: one INFO event per request, target
//!   `snapgate::access`, written when the response body ends, fails or
//!   is dropped (the client went away: `completed=false`), so its byte
//!   count and duration are the whole exchange's; or, for a request
//!   whose client went away before the response head, when its future is
//!   dropped (status 499, as nginx logs it).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::app::RoutedTo;
use super::{BoxError, ProxyBody};

/// The request id field (a de facto standard; no RFC names it).
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id kept from a client, in bytes.
pub const MAX_REQUEST_ID: usize = 128;

/// A request's id, as a request extension: set by the stack's first
/// layer, written into the request the app gets by its forwarding layer
/// ([`RequestId::apply`]), after the head's size and field count were
/// checked as the client sent them.
#[derive(Clone, Debug)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    /// `req`'s id: the client's, if it sent exactly one valid id, else a
    /// new one.
    pub fn of<B>(req: &Request<B>) -> RequestId {
        let mut sent = req.headers().get_all(&X_REQUEST_ID).iter();
        if let (Some(id), None) = (sent.next(), sent.next()) {
            if valid(id.as_bytes()) {
                return RequestId(id.clone());
            }
        }
        RequestId(generate())
    }

    /// Sets `req`'s `X-Request-Id` to its id (extension), replacing
    /// whatever the client sent; nothing without one.
    pub fn apply<B>(req: &mut Request<B>) {
        if let Some(RequestId(id)) = req.extensions().get::<RequestId>() {
            let id = id.clone();
            req.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
    }
}

fn valid(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len())
        && id
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:/+=@~".contains(c))
}

/// 128 random bits as 32 hex digits, from a per-thread generator seeded
/// from the OS (no system call per id).
fn generate() -> HeaderValue {
    let mut id = [0u8; 32];
    hex::encode_to_slice(fastrand::u128(..).to_le_bytes(), &mut id)
        .expect("16 bytes are 32 hex digits");
    HeaderValue::from_bytes(&id).expect("hex digits are a valid field value")
}

/// What the access log line says of a request, taken as it arrives.
pub struct Entry {
    started: Instant,
    client: Option<IpAddr>,
    host: Option<HeaderValue>,
    method: Method,
    path: Arc<str>,
    version: Version,
    id: HeaderValue,
}

impl Entry {
    /// For `req` from `client`, whose id is `id`; the clock starts now.
    pub fn of<B>(req: &Request<B>, client: Option<IpAddr>, id: HeaderValue) -> Entry {
        let host = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| req.headers().get(http::header::HOST).cloned());
        Entry {
            started: Instant::now(),
            client,
            host,
            method: req.method().clone(),
            // The path only: a query may carry secrets.
            path: req.uri().path().into(),
            version: req.version(),
            id,
        }
    }

    /// The line of a request whose client went away before its response
    /// head: status 499 (nginx's convention for "client closed request";
    /// no such status was sent), no bytes, `completed=false`.
    pub fn unanswered(self) {
        let status = StatusCode::from_u16(499).expect("499 is in range");
        Line {
            entry: self,
            status,
            routed: None,
        }
        .write(0, false);
    }

    /// `resp` with a body that writes the line when it ends.
    pub fn logging(self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let routed = resp.extensions().get::<RoutedTo>().cloned();
        let status = resp.status();
        resp.map(|body| {
            Logged {
                body,
                bytes: 0,
                line: Some(Line {
                    entry: self,
                    status,
                    routed,
                }),
            }
            .boxed()
        })
    }
}

/// A line to write, once.
struct Line {
    entry: Entry,
    status: StatusCode,
    routed: Option<RoutedTo>,
}

impl Line {
    fn write(self, bytes: u64, completed: bool) {
        let e = &self.entry;
        let took = e.started.elapsed();
        let app = self.routed.as_ref().map(|r| &**r.app.name());
        let instance = self.routed.as_ref().and_then(|r| r.instance.as_deref());
        let held = self.routed.as_ref().and_then(|r| r.held);
        tracing::info!(
            target: crate::logs::ACCESS,
            client = e.client.map(tracing::field::display),
            host = e.host.as_ref().and_then(|h| h.to_str().ok()),
            method = %e.method,
            path = &*e.path,
            version = version(e.version),
            status = self.status.as_u16(),
            bytes,
            duration_ms = ms(took),
            app,
            instance,
            held = held.is_some(),
            held_ms = held.map(ms),
            request_id = e.id.to_str().unwrap_or(""),
            completed,
            "access"
        );
    }
}

/// `version` as the request line writes it (RFC 9112 section 2.3).
fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "other",
    }
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// A response body that counts the bytes it passes and writes its line at
/// its end.
struct Logged {
    body: ProxyBody,
    bytes: u64,
    line: Option<Line>,
}

impl Logged {
    fn done(&mut self, completed: bool) {
        if let Some(line) = self.line.take() {
            line.write(self.bytes, completed);
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if this.body.is_end_stream() {
                    this.done(true);
                }
            }
            Poll::Ready(None) => this.done(true),
            Poll::Ready(Some(Err(_))) => this.done(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // A body hyper never polled (empty, or one a response to HEAD or
        // a 204 or 304 has none of: RFC 9110 sections 9.3.2, 15.3.5,
        // 15.4.5) ended whole; any other dropped early: the client went
        // away.
        let bodiless = self.line.as_ref().is_some_and(|l| {
            l.entry.method == Method::HEAD
                || l.status == StatusCode::NO_CONTENT
                || l.status == StatusCode::NOT_MODIFIED
        });
        let whole = bodiless || self.body.is_end_stream();
        self.done(whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id `req` would get and the app would see.
    fn applied(mut req: Request<()>) -> (HeaderValue, Request<()>) {
        let id = RequestId::of(&req);
        req.extensions_mut().insert(id.clone());
        RequestId::apply(&mut req);
        (id.0, req)
    }

    #[test]
    fn a_clients_valid_id_is_kept_and_anything_else_replaced() {
        let mut req = Request::new(());
        req.headers_mut()
            .insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123_x.y:z"));
        assert_eq!(applied(req).0, "abc-123_x.y:z");
        for bad in ["", "has space", "quote\"", &"x".repeat(129)] {
            let mut req = Request::new(());
            req.headers_mut()
                .insert(&X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let (id, req) = applied(req);
            assert_eq!(id.len(), 32, "{bad:?} replaced");
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
            assert_eq!(req.headers().get_all(&X_REQUEST_ID).iter().count(), 1);
            assert_eq!(req.headers()[&X_REQUEST_ID], id, "the app gets the new one");
        }
        // Two ids: neither is the request's.
        let mut req = Request::new(());
        req.headers_mut()
            .append(&X_REQUEST_ID, HeaderValue::from_static("a"));
        req.headers_mut()
            .append(&X_REQUEST_ID, HeaderValue::from_static("b"));
        let (id, req) = applied(req);
        assert_eq!(id.len(), 32);
        assert_eq!(req.headers().get_all(&X_REQUEST_ID).iter().count(), 1);
        // Fresh ones differ.
        assert_ne!(applied(Request::new(())).0, applied(Request::new(())).0);
    }
}

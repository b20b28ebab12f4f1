//! Message framing a request must have to be forwarded, and an app's
//! response to be relayed (RFC 9112 section 6). hyper has read the
//! body's framing already: a request with both `Transfer-Encoding` and
//! `Content-Length` has had the latter removed, is read chunked, and its
//! connection closes after the answer, as section 6.3 asks of an
//! intermediary; a final coding other than `chunked`, or
//! `Transfer-Encoding` on HTTP/1.0, got 400. What it takes and a
//! forwarder must not pass on:
//! 1. A transfer coding besides `chunked` (`gzip, chunked`): 501 (section
//!    6.1: a coding the server does not understand). snapgate forwards a
//!    body of unknown length chunked, and would otherwise drop the other
//!    coding. `chunked` twice: 400 (section 6.1: a sender "MUST NOT apply
//!    the chunked transfer coding more than once").
//! 2. A request head (request line and field lines) over `max_header_bytes`:
//!    431 (RFC 6585 section 5). hyper's own check bounds its read buffer,
//!    which a head sent in one burst can pass by a read's worth; this one
//!    counts the head itself. More than `max_headers` field lines: 431
//!    too (hyper counts them on HTTP/1.1; HTTP/2 has no such bound of its
//!    own).
//! 3. A response from an app with a transfer coding besides `chunked`
//!    (`gzip, chunked`, or `chunked, gzip` read to the connection's close):
//!    502 ([`response_coding`]). hyper takes `chunked` off;
//!    `Transfer-Encoding` is hop-by-hop and goes, so the other coding would
//!    be lost and the client would take coded bytes for the content (RFC 9112
//!    section 7: transfer codings are the message's, not the
//!    representation's).

use http::header;
use http::{HeaderMap, Request};

use super::error::{ErrorKind, ProxyError};

/// Applies the module's rules, with heads up to `max_head` bytes and
/// `max_headers` field lines: `req` back, or the answer it gets.
pub fn check<B>(
    req: Request<B>,
    max_head: usize,
    max_headers: usize,
) -> Result<Request<B>, ProxyError> {
    if head_size(&req) > max_head || req.headers().len() > max_headers {
        return Err(ProxyError::new(ErrorKind::HeadTooLarge));
    }
    match codings(req.headers()) {
        Codings::Passable => Ok(req),
        Codings::ChunkedTwice => Err(ProxyError::new(ErrorKind::BadRequest(
            "chunked applied more than once",
        ))),
        Codings::Other(_) => Err(ProxyError::new(ErrorKind::NotImplemented(
            "a transfer coding other than chunked",
        ))),
    }
}

/// Rule 3: the transfer coding of a response's `headers` that snapgate
/// cannot pass on (any but a single `chunked`), or `None`.
pub fn response_coding(headers: &HeaderMap) -> Option<String> {
    match codings(headers) {
        Codings::Passable => None,
        Codings::ChunkedTwice => Some("chunked, chunked".to_owned()),
        Codings::Other(c) => Some(String::from_utf8_lossy(c).into_owned()),
    }
}

/// What a message's `Transfer-Encoding` asks of a forwarder (rules 1
/// and 3; RFC 9112 section 6.1).
enum Codings<'a> {
    /// None, or `chunked` once: hyper reads it and frames it afresh.
    Passable,
    /// `chunked` more than once.
    ChunkedTwice,
    /// The first coding other than `chunked`.
    Other(&'a [u8]),
}

fn codings(headers: &HeaderMap) -> Codings<'_> {
    let mut chunked = 0;
    for coding in list(headers, header::TRANSFER_ENCODING) {
        if !coding.eq_ignore_ascii_case(b"chunked") {
            return Codings::Other(coding);
        }
        chunked += 1;
    }
    if chunked > 1 {
        Codings::ChunkedTwice
    } else {
        Codings::Passable
    }
}

/// The elements of the list field `name` (RFC 9110 section 5.6.1): every
/// field line of it split at commas, each trimmed, the empty ones left
/// out. As bytes: a value need not be text.
pub fn list<K: header::AsHeaderName>(headers: &HeaderMap, name: K) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The bytes of `req`'s head as sent: request line and field lines, each
/// with its CRLF.
fn head_size<B>(req: &Request<B>) -> usize {
    // Counted from the target's parts: no copy on the request path.
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    let fields: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    line + fields + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(headers: &[(&str, &str)]) -> u16 {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        match check(b.body(()).unwrap(), 8192, 100) {
            Ok(_) => 200,
            Err(e) => e.kind.status().as_u16(),
        }
    }

    #[test]
    fn framing_rules() {
        assert_eq!(status(&[]), 200);
        assert_eq!(status(&[("content-length", "3")]), 200);
        assert_eq!(status(&[("transfer-encoding", "Chunked")]), 200);
        assert_eq!(status(&[("transfer-encoding", "gzip, chunked")]), 501);
        assert_eq!(status(&[("transfer-encoding", "chunked, chunked")]), 400);
        let coding = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, v.parse().unwrap());
            }
            response_coding(&h)
        };
        assert_eq!(coding(&[]), None);
        assert_eq!(coding(&["Chunked"]), None);
        assert_eq!(coding(&["gzip, chunked"]).as_deref(), Some("gzip"));
        assert_eq!(coding(&["chunked, gzip"]).as_deref(), Some("gzip"));
        assert_eq!(coding(&["gzip", "chunked"]).as_deref(), Some("gzip"));
        assert_eq!(
            coding(&["chunked", "chunked"]).as_deref(),
            Some("chunked, chunked")
        );
        let big = "x".repeat(8192);
        assert_eq!(status(&[("x-big", &big)]), 431);
        assert_eq!(status(&[("x-big", &big[..8000])]), 200);
        let names: Vec<String> = (0..101).map(|i| format!("x-{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
        assert_eq!(status(&many), 431);
        assert_eq!(status(&many[..100]), 200);
        assert_eq!(
            status(&[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked")
            ]),
            501
        );
    }
}

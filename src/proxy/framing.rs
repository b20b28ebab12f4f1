//! Message framing a request must have to be forwarded (RFC 9112
//! section 6). hyper has read the body's framing already: a request with
//! both `Transfer-Encoding` and `Content-Length` has had the latter
//! removed, is read chunked, and its connection closes after the answer,
//! as section 6.3 asks of an intermediary; a final coding other than
//! `chunked`, or `Transfer-Encoding` on HTTP/1.0, got 400. What it takes
//! and a forwarder must not pass on:
//! 1. A transfer coding besides `chunked` (`gzip, chunked`): 501 (section
//!    6.1: a coding the server does not understand). snapgate forwards a
//!    body of unknown length chunked, and would otherwise drop the other
//!    coding.

use http::header;
use http::Request;

use super::error::{ErrorKind, ProxyError};

/// Applies the module's rules: `req` back, or the answer it gets.
pub fn check<B>(req: Request<B>) -> Result<Request<B>, ProxyError> {
    let h = req.headers();
    let codings: Vec<&[u8]> = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty())
        .collect();
    match codings[..] {
        [] => Ok(req),
        [only] if only.eq_ignore_ascii_case(b"chunked") => Ok(req),
        _ => Err(ProxyError::new(ErrorKind::NotImplemented(
            "a transfer coding other than chunked",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(headers: &[(&str, &str)]) -> u16 {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        match check(b.body(()).unwrap()) {
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
        assert_eq!(
            status(&[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked")
            ]),
            501
        );
    }
}

//! The one authority a request is for (RFC 9112 section 3.2).
//!
//! Rules, in order:
//! 1. `CONNECT` is not served (405): snapgate is no forward proxy. Nor is
//!    `TRACE` (405, as nginx does): it would echo the client's headers
//!    back through the app, cookies included. HTTP/2's extended `CONNECT`
//!    (RFC 8441 section 4: a `:protocol`, with `:scheme`, `:path` and
//!    `:authority`) is a request to a host like any other and passes.
//! 2. More than one `Host` field line is a 400; so is an HTTP/1.1 request
//!    without one (section 3.2: "MUST respond with a 400").
//! 3. An absolute-form target (`GET http://b.example/ HTTP/1.1`) names the
//!    authority; the `Host` field is not used for routing and is replaced
//!    (section 3.2.2), but must still be well-formed (section 3.2: "a Host
//!    header field with an invalid field value" is a 400). Only `http` and
//!    `https` targets are taken.
//! 4. Otherwise the `Host` field names it; a request with neither is a 400
//!    (an HTTP/1.0 request without `Host` cannot be routed).
//! 5. The authority must be `host[:port]`: a DNS name or IPv4 address of
//!    `[A-Za-z0-9.-_]` with no empty label (one trailing dot allowed), or a
//!    bracketed IPv6 address, and a port of at most five digits that fits
//!    16 bits, or empty (RFC 3986 section 3.2.3). User info, other
//!    characters and bad ports are a 400.
//! 6. The asterisk-form target (`*`) is for `OPTIONS` only (RFC 9112
//!    section 3.2.4); with any other method it is a 400.
//!
//! The result is the request's [`Authority`] extension, and its `Host` field
//! set to that authority: routing and the `Host` the app receives come from
//! the same value, and no other header can change them.

use std::net::Ipv6Addr;

use http::header::{self, HeaderValue};
use http::{Method, Request, Version};

use super::error::{ErrorKind, ProxyError};

/// The authority a request was routed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    /// The host, lowercased, without port or trailing dot, IPv6 in
    /// brackets: what the router matches.
    pub name: String,
    /// The authority as the client sent it (host and port): the `Host` the
    /// app receives and `X-Forwarded-Host`.
    pub value: HeaderValue,
}

/// Applies the module's rules to `req`: its [`Authority`] set as an
/// extension and as its `Host` field, or the 400/405 it gets.
pub fn normalize<B>(mut req: Request<B>) -> Result<Request<B>, ProxyError> {
    let bad = |why| Err(ProxyError::new(ErrorKind::BadRequest(why)));
    let extended_connect = req.version() == Version::HTTP_2
        && req.extensions().get::<hyper::ext::Protocol>().is_some();
    if (req.method() == Method::CONNECT && !extended_connect) || req.method() == Method::TRACE {
        return Err(ProxyError::new(ErrorKind::MethodNotAllowed(
            req.method().clone(),
        )));
    }
    if req.uri().path() == "*" && req.method() != Method::OPTIONS {
        return bad("the asterisk-form target is for OPTIONS only");
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return bad("more than one Host field");
    }
    if host.is_none() && req.version() == Version::HTTP_11 {
        return bad("an HTTP/1.1 request needs a Host field");
    }
    // The Host field must be well-formed even when the target names the
    // authority (rule 3).
    let host_named = match &host {
        Some(h) => match h.to_str().ok().and_then(host_name) {
            Some(name) => Some(name),
            None => return bad("the host is malformed"),
        },
        None => None,
    };
    let (name, value) = match req.uri().authority() {
        Some(target) => {
            if !matches!(req.uri().scheme_str(), Some("http" | "https")) {
                return bad("the target's scheme is not http or https");
            }
            let Ok(value) = HeaderValue::from_str(target.as_str()) else {
                return bad("the target's authority is malformed");
            };
            let Some(name) = value.to_str().ok().and_then(host_name) else {
                return bad("the host is malformed");
            };
            // The Host field is replaced by the target's authority.
            req.headers_mut().insert(header::HOST, value.clone());
            (name, value)
        }
        None => match (host, host_named) {
            // The one Host field is the authority already.
            (Some(value), Some(name)) => (name, value),
            _ => return bad("the request names no host"),
        },
    };
    req.extensions_mut().insert(Authority { name, value });
    Ok(req)
}

/// The routing name of an authority `host[:port]`, or `None` if it is not
/// one (rule 5).
fn host_name(authority: &str) -> Option<String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        v6.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (&authority[..v6.len() + 2], port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if let Some(port) = port.filter(|p| !p.is_empty()) {
        let digits = port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !digits || port.parse::<u16>().is_err() {
            return None;
        }
    }
    let labels = host.strip_suffix('.').unwrap_or(host);
    let name_ok = host.starts_with('[')
        || (!labels.is_empty()
            && labels.split('.').all(|l| !l.is_empty())
            && labels
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')));
    name_ok.then(|| labels.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(target);
        for h in hosts {
            b = b.header("host", *h);
        }
        b.body(()).unwrap()
    }

    fn routed(r: Result<Request<()>, ProxyError>) -> (String, String) {
        let r = r.expect("accepted");
        let a = r.extensions().get::<Authority>().unwrap().clone();
        assert_eq!(r.headers().get_all("host").iter().count(), 1);
        assert_eq!(r.headers()["host"], a.value);
        (a.name, a.value.to_str().unwrap().to_owned())
    }

    fn status(r: Result<Request<()>, ProxyError>) -> u16 {
        r.expect_err("refused").kind.status().as_u16()
    }

    #[test]
    fn the_absolute_form_wins_over_host() {
        let r = normalize(req(
            Version::HTTP_11,
            "http://B.Example:8080/x",
            &["a.example"],
        ));
        assert_eq!(routed(r), ("b.example".into(), "B.Example:8080".into()));
        assert_eq!(
            status(normalize(req(Version::HTTP_11, "ftp://b.example/", &["a"]))),
            400
        );
        let bad_host = req(Version::HTTP_11, "http://b.example/", &["a b"]);
        assert_eq!(status(normalize(bad_host)), 400);
    }

    #[test]
    fn host_is_required_once_and_well_formed() {
        assert_eq!(status(normalize(req(Version::HTTP_11, "/", &[]))), 400);
        assert_eq!(status(normalize(req(Version::HTTP_10, "/", &[]))), 400);
        assert_eq!(
            status(normalize(req(Version::HTTP_11, "/", &["a.test", "b.test"]))),
            400
        );
        for bad in [
            "a.example:notaport",
            "a.example:99999",
            "user@a.example",
            "a.example..",
            "x..a.example",
            ".a.example",
            ".",
            "a example",
            "a/b",
            "[::zz]",
            "[::1]x",
            "",
        ] {
            assert_eq!(
                status(normalize(req(Version::HTTP_11, "/", &[bad]))),
                400,
                "{bad}"
            );
        }
        assert_eq!(
            routed(normalize(req(Version::HTTP_10, "/", &["A.test."]))),
            ("a.test".into(), "A.test.".into())
        );
        assert_eq!(
            routed(normalize(req(Version::HTTP_11, "/", &["[::1]:80"]))),
            ("[::1]".into(), "[::1]:80".into())
        );
    }

    #[test]
    fn an_empty_port_is_no_port_and_asterisk_is_for_options() {
        assert_eq!(
            routed(normalize(req(Version::HTTP_11, "/", &["a.test:"]))),
            ("a.test".into(), "a.test:".into())
        );
        let star = |m: Method| {
            let r = Request::builder()
                .method(m)
                .uri("*")
                .header("host", "a.test");
            normalize(r.body(()).unwrap())
        };
        assert!(star(Method::OPTIONS).is_ok());
        assert_eq!(status(star(Method::GET)), 400);
    }

    #[test]
    fn connect_and_trace_are_not_served() {
        let r = Request::builder()
            .method(Method::CONNECT)
            .uri("a.test:443")
            .header("host", "a.test:443")
            .body(())
            .unwrap();
        assert_eq!(status(normalize(r)), 405);
        let r = Request::builder()
            .method(Method::TRACE)
            .uri("/")
            .header("host", "a.test")
            .body(())
            .unwrap();
        assert_eq!(status(normalize(r)), 405);
    }
}

//! The headers snapgate sends the app about the hop it made: hop-by-hop
//! headers removed (RFC 9110 section 7.6.1), then the forwarding headers
//! set by one policy.
//!
//! Policy:
//! 1. Hop-by-hop fields go: `Connection` and the fields it names (RFC 9110
//!    section 7.6.1), those that section lists (`Proxy-Connection`,
//!    `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`), and, as RFC 2616
//!    section 13.5.1 listed them, `Proxy-Authorization` and
//!    `Proxy-Authenticate` (proxy credentials are for a proxy, not an
//!    app). `Trailer` stays: it describes the message, whose trailers are
//!    forwarded (RFC 9110 section 6.6.2). `Connection` cannot name away `Host` or
//!    `Content-Length` (they frame and route the message), nor the fields
//!    snapgate sets, which are set after this step.
//! 2. From a peer outside `trusted_proxies`, every forwarding field the
//!    client sent is removed: `Forwarded`, every `X-Forwarded-*`,
//!    `X-Real-IP`, `True-Client-IP`, `X-Client-IP`, `X-Cluster-Client-IP`.
//!    From every peer: `X-Original-URL` and `X-Rewrite-URL` (which some
//!    frameworks route by: routing is snapgate's), and any of these names
//!    spelt with underscores (`X_Forwarded_For`), which CGI-style servers
//!    merge with the dashed name (nginx drops such names for this reason).
//! 3. From a trusted peer, the chains are kept (several `X-Forwarded-For`
//!    or `Forwarded` lines joined into one, in order), and so are the
//!    `-Proto`, `-Host`, `-Port`, `-Prefix` it sent.
//! 4. Then snapgate appends the peer to `X-Forwarded-For` and a
//!    `for=..;host=..;proto=..` element to `Forwarded` (RFC 7239), and sets
//!    those of `X-Forwarded-Proto`, `X-Forwarded-Host` and
//!    `X-Forwarded-Port` not kept by step 3, and `X-Real-IP`.
//! 5. The client address (for `X-Real-IP` and the log) is the peer, or,
//!    from a trusted peer, the rightmost `X-Forwarded-For` entry that is not
//!    a trusted proxy, or the leftmost if every entry is one (as nginx's
//!    `real_ip_recursive`).
//! 6. In a cluster, a request with a valid hop marker (`Snapgate-Hop`,
//!    `crate::cluster` routing step 1) from the address of a node in the
//!    catalog came from a peer node: it is trusted as a peer in
//!    `trusted_proxies` is, and gets [`FromPeer`]. The marker is removed
//!    from every request, valid or not; an invalid one is counted.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Request;
use ipnet::IpNet;

use super::authority::Authority;
use super::framing::list;

/// The connection a request came on: set by the listener.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// The client's (or the nearest proxy's) address.
    pub addr: SocketAddr,
    /// The listener's address.
    pub local: SocketAddr,
}

/// The client's address by the policy's step 5, when it is not the
/// peer's (a trusted proxy named it): a request extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The node that forwarded a request with a valid hop marker (policy
/// step 6), and whether it asked for a free instance only (`crate::cluster`,
/// routing step 3): a request extension.
#[derive(Clone, Debug)]
pub struct FromPeer {
    /// The node.
    pub node: Arc<str>,
    /// Serve it only from an instance free now, else refuse at once.
    pub now: bool,
}

/// How many names [`HOP_BY_HOP`] holds.
const HOP_COUNT: usize = 8;
/// Headers that describe one connection, not the message (policy step 1).
/// As names, not strings: removing by a string parses it first, per
/// request.
static HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Fields `Connection` may not name away (policy step 1).
const FRAMING: &[HeaderName] = &[header::HOST, header::CONTENT_LENGTH];

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
const XF_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// Removed from every peer (policy step 2).
const REWRITES: &[&str] = &["x-original-url", "x-rewrite-url"];
/// Client-address fields besides the `X-Forwarded-*` family (step 2).
const CLIENT_IP: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
];

/// Whether `name`, underscores read as dashes, is a forwarding field of
/// step 2 or a rewrite field.
fn forwarding_field(name: &str) -> bool {
    let known =
        |n: &str| n.starts_with("x-forwarded-") || CLIENT_IP.contains(&n) || REWRITES.contains(&n);
    // Most names have no underscore: no copy for them.
    if name.contains('_') {
        known(&name.replace('_', "-"))
    } else {
        known(name)
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`,
/// except `Host` and `Content-Length`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One look at each name: which hop-by-hop fields are present (most
    // requests have none; most responses only `Connection: keep-alive`).
    // A bit per entry of HOP_BY_HOP.
    const _: () = assert!(HOP_COUNT <= u8::BITS as usize);
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `Connection` names no field but hop-by-hop ones (or says `close`,
    // with no field of that name): those present go, and nothing else
    // is looked up.
    let names_others = list(headers, header::CONNECTION).any(|t| {
        let names_nothing_else = (t.eq_ignore_ascii_case(b"close")
            && !headers.contains_key("close"))
            || HOP_BY_HOP
                .iter()
                .any(|h| t.eq_ignore_ascii_case(h.as_str().as_bytes()));
        !names_nothing_else
    });
    if !names_others {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            if present & (1 << i) != 0 {
                headers.remove(name);
            }
        }
        return;
    }
    // The names `Connection` lists, compared as its tokens (ASCII case
    // folded) with the names present: no name is made of them.
    let listed: Vec<&[u8]> = list(headers, header::CONNECTION).collect();
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            HOP_BY_HOP.contains(n)
                || (!FRAMING.contains(n)
                    && listed
                        .iter()
                        .any(|t| t.eq_ignore_ascii_case(n.as_str().as_bytes())))
        })
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
}

/// What of a request's hop-by-hop fields the next hop still needs: a
/// request extension set before they are removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hop {
    /// The client accepts trailers (`TE: trailers`, RFC 9110 section
    /// 10.1.4): what gRPC needs, sent on to an HTTP/2 app (RFC 9113
    /// section 8.2.2 allows exactly this value).
    pub te_trailers: bool,
    /// `websocket` when an HTTP/1.1 request asks to switch to it
    /// (`Upgrade`, with `upgrade` in `Connection`; RFC 9110 section 7.8):
    /// no other protocol is passed on. For an HTTP/2 extended `CONNECT`,
    /// its `:protocol` (RFC 8441).
    pub upgrade: Option<HeaderValue>,
    /// The request is an HTTP/2 extended `CONNECT` (RFC 8441 section 4).
    pub extended_connect: bool,
}

impl Hop {
    fn of<B>(req: &Request<B>) -> Hop {
        let te_trailers = has_token(req.headers(), header::TE, "trailers");
        let protocol = req.extensions().get::<hyper::ext::Protocol>();
        let extended_connect = req.version() == http::Version::HTTP_2
            && req.method() == http::Method::CONNECT
            && protocol.is_some();
        // Only WebSocket is tunnelled: any other protocol (h2c above all,
        // which would carry requests past every check of snapgate's) is
        // not asked of the app.
        let upgrade = match req.version() {
            http::Version::HTTP_11
                if has_token(req.headers(), header::CONNECTION, "upgrade")
                    && has_token(req.headers(), header::UPGRADE, "websocket") =>
            {
                Some(HeaderValue::from_static("websocket"))
            }
            _ if extended_connect => protocol.and_then(|p| HeaderValue::from_str(p.as_str()).ok()),
            _ => None,
        };
        Hop {
            te_trailers,
            upgrade,
            extended_connect,
        }
    }
}

/// Whether a comma-separated list field `name` has `token` (ASCII case
/// folded), with no copy of the field.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    list(headers, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The forwarding policy of the module doc, for one listener.
#[derive(Clone, Debug, Default)]
pub struct Forwarding {
    trusted: Arc<[IpNet]>,
    /// `http` or `https`: the listener's scheme.
    proto: &'static str,
    /// The cluster whose hop markers are believed (step 6).
    cluster: Option<crate::cluster::Cluster>,
}

impl Forwarding {
    /// The policy trusting `trusted` peers, for a listener of `proto`.
    pub fn new(trusted: &[IpNet], proto: &'static str) -> Forwarding {
        Forwarding {
            trusted: trusted.into(),
            proto,
            cluster: None,
        }
    }

    /// This policy, also believing `cluster`'s hop markers (step 6).
    pub fn with_cluster(mut self, cluster: Option<crate::cluster::Cluster>) -> Forwarding {
        self.cluster = cluster;
        self
    }

    /// The peer node that forwarded `req`, if it carries a valid hop
    /// marker (step 6).
    pub(super) fn peer_node<B>(&self, req: &Request<B>) -> Option<(Arc<str>, bool)> {
        let marker = req.headers().get(crate::cluster::HOP_MARKER)?;
        let cluster = self.cluster.as_ref()?;
        // Only a node of the catalog forwards (a marker seen by others
        // cannot be replayed from elsewhere).
        let from = req.extensions().get::<Peer>()?.addr.ip().to_canonical();
        if !cluster.is_node(from) {
            return None;
        }
        let host = req
            .headers()
            .get(header::HOST)
            .map_or(&b""[..], |h| h.as_bytes());
        let target = req.uri().path_and_query().map_or("", |p| p.as_str());
        cluster.verify(marker, req.method(), host, target)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client address (policy step 5) when `peer` is trusted.
    fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let chain: Vec<IpAddr> = joined(headers, &XFF)
            .as_deref()
            .unwrap_or("")
            .split(',')
            .filter_map(|e| parse_ip(e.trim()))
            .collect();
        let leftmost = chain.first().copied();
        chain
            .into_iter()
            .rev()
            .find(|ip| !self.trusts(*ip))
            .or(leftmost)
            .unwrap_or(peer)
    }

    /// The client of `req` (which carries its [`Peer`]) as this policy
    /// sees it: the peer, or for a trusted peer the address its
    /// forwarding fields name ([`Forwarding::client`]).
    pub fn client_of<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        let ip = req.extensions().get::<Peer>()?.addr.ip().to_canonical();
        Some(match self.trusts(ip) || self.peer_node(req).is_some() {
            true => self.client(ip, req.headers()),
            false => ip,
        })
    }

    /// Applies the policy to `req`, which carries its [`Peer`] and
    /// [`Authority`]; sets its [`ClientAddr`] if the client is not the
    /// peer, and its [`Hop`] unless that is the default (no hop-by-hop
    /// field the next hop needs).
    pub fn apply<B>(&self, mut req: Request<B>) -> Request<B> {
        let peer = req.extensions().get::<Peer>().copied();
        let host = req.extensions().get::<Authority>().map(|a| a.value.clone());
        let from_peer = self.peer_node(&req);
        let trusted = from_peer.is_some() || peer.is_some_and(|p| self.trusts(p.addr.ip()));
        let marked = req
            .headers_mut()
            .remove(crate::cluster::HOP_MARKER)
            .is_some();
        match (from_peer, &self.cluster) {
            (Some((node, now)), _) => {
                req.extensions_mut().insert(FromPeer { node, now });
            }
            (None, Some(cluster)) if marked => {
                cluster.bad_marker(peer.map(|p| p.addr.ip().to_canonical()))
            }
            _ => {}
        }
        // One look at each name: hop-by-hop fields (most requests have
        // none) and forwarding fields to drop (step 2).
        let mut hop_by_hop = false;
        let mut drop: Vec<HeaderName> = Vec::new();
        for n in req.headers().keys() {
            hop_by_hop |= HOP_BY_HOP.contains(n);
            if forwarding_field(n.as_str())
                && (!trusted || n.as_str().contains('_') || REWRITES.contains(&n.as_str()))
            {
                drop.push(n.clone());
            }
        }
        if hop_by_hop {
            let hop = Hop::of(&req);
            if hop != Hop::default() {
                req.extensions_mut().insert(hop);
            }
            strip_hop_by_hop(req.headers_mut());
        } else if req.version() == http::Version::HTTP_2 && req.method() == http::Method::CONNECT {
            // An extended CONNECT has no hop-by-hop field but is a hop.
            let hop = Hop::of(&req);
            req.extensions_mut().insert(hop);
        }
        let h = req.headers_mut();
        for name in drop {
            h.remove(name);
        }
        let Some(peer) = peer else {
            return req;
        };
        let ip = peer.addr.ip().to_canonical();
        // From an untrusted peer every forwarding field is gone by now.
        let (client, prior_xff, prior_fwd) = match trusted {
            true => {
                let prior = (joined(h, &XFF), joined(h, &FORWARDED));
                h.remove(&X_REAL_IP);
                (self.client(ip, h), prior.0, prior.1)
            }
            false => (ip, None, None),
        };
        let ip_value = ip_field(ip);
        let ip_text = ip_value.to_str().expect("an address is ASCII");
        let xff = match prior_xff {
            Some(prior) => value(format!("{prior}, {ip_text}")),
            None => Some(ip_value.clone()),
        };
        let mut element = String::with_capacity(64);
        element.push_str("for=");
        match ip {
            IpAddr::V4(_) => element.push_str(ip_text),
            IpAddr::V6(_) => {
                element.push_str("\"[");
                element.push_str(ip_text);
                element.push_str("]\"");
            }
        }
        if let Some(host) = host.as_ref().and_then(|v| v.to_str().ok()) {
            element.push_str(";host=");
            push_token_or_quoted(&mut element, host);
        }
        element.push_str(";proto=");
        element.push_str(self.proto);
        let fwd = match prior_fwd {
            Some(prior) => format!("{prior}, {element}"),
            None => element,
        };
        if let Some(xff) = xff {
            h.insert(XFF, xff);
        }
        if let Some(fwd) = value(fwd) {
            h.insert(FORWARDED, fwd);
        }
        let real_ip = match client == ip {
            true => Some(ip_value),
            false => value(client.to_string()),
        };
        if let Some(real_ip) = real_ip {
            h.insert(X_REAL_IP, real_ip);
        }
        // Kept from a trusted peer (step 3), else set.
        if !trusted || !h.contains_key(&XFP) {
            h.insert(XFP, HeaderValue::from_static(self.proto));
        }
        if let Some(host) = host {
            if !trusted || !h.contains_key(&XFH) {
                h.insert(XFH, host);
            }
        }
        if !trusted || !h.contains_key(&XF_PORT) {
            h.insert(XF_PORT, port_field(peer.local.port()));
        }
        if client != ip {
            req.extensions_mut().insert(ClientAddr(client));
        }
        req
    }
}

/// `ip` as a field value. The last address is kept per thread: the next
/// request is most often from the same client (its connection's next
/// request, or the load balancer in front), and a value shares its bytes
/// when cloned.
fn ip_field(ip: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((seen, value)) if *seen == ip => value.clone(),
        _ => {
            let value =
                HeaderValue::from_str(&ip.to_string()).expect("an address is a field value");
            *last = Some((ip, value.clone()));
            value
        }
    })
}

/// `port` as a field value; the last one is kept per thread (a listener
/// has one).
fn port_field(port: u16) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u16, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((seen, value)) if *seen == port => value.clone(),
        _ => {
            let value = HeaderValue::from(port);
            *last = Some((port, value.clone()));
            value
        }
    })
}

/// Appends `v` as an RFC 7239 value: a token as is, else a quoted string
/// (a host with a port has a `:`, which is no token character, RFC 9110
/// section 5.6.2).
fn push_token_or_quoted(to: &mut String, v: &str) {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !v.is_empty() && v.bytes().all(tchar) {
        to.push_str(v);
    } else {
        to.push('"');
        for c in v.chars() {
            if c == '\\' || c == '"' {
                to.push('\\');
            }
            to.push(c);
        }
        to.push('"');
    }
}

/// Every line of `name`, joined with ", " (RFC 9110 section 5.3).
pub(super) fn joined(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    let parts: Vec<&str> = h
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// `text` as a field value, its bytes taken over (no copy); `None` if it
/// is none (a control character from a joined client value).
fn value(text: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).ok()
}

/// An address as `X-Forwarded-For` entries write it: `1.2.3.4`, `::1`,
/// `[::1]`, with or without a port.
fn parse_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut r = b.body(()).unwrap();
        r.extensions_mut().insert(Peer {
            addr: peer.parse().unwrap(),
            local: "127.0.0.1:8080".parse().unwrap(),
        });
        r.extensions_mut().insert(Authority {
            name: "a.test".into(),
            value: HeaderValue::from_static("a.test"),
        });
        r
    }

    fn all(r: &Request<()>, name: &str) -> Vec<String> {
        r.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    const SPOOFED: &[(&str, &str)] = &[
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-for", "7.7.7.7"),
        ("x-real-ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("x-forwarded-port", "1"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.test"),
        ("x-original-url", "/snapgate/resumed"),
        ("x_forwarded_for", "6.6.6.6"),
        ("x_real_ip", "6.6.6.6"),
        ("x-forwarded-ssl", "on"),
        ("true-client-ip", "6.6.6.6"),
    ];

    #[test]
    fn an_untrusted_peers_forwarding_headers_are_replaced() {
        let policy = Forwarding::new(&[], "http");
        let r = policy.apply(request("10.0.0.9:5555", SPOOFED));
        assert_eq!(all(&r, "x-forwarded-for"), ["10.0.0.9"]);
        assert_eq!(all(&r, "x-real-ip"), ["10.0.0.9"]);
        assert_eq!(
            all(&r, "forwarded"),
            ["for=10.0.0.9;host=a.test;proto=http"]
        );
        assert_eq!(all(&r, "x-forwarded-proto"), ["http"]);
        assert_eq!(all(&r, "x-forwarded-host"), ["a.test"]);
        assert_eq!(all(&r, "x-forwarded-port"), ["8080"]);
        for gone in [
            "x-forwarded-prefix",
            "x-original-url",
            "x_forwarded_for",
            "x_real_ip",
            "x-forwarded-ssl",
            "true-client-ip",
        ] {
            assert!(all(&r, gone).is_empty(), "{gone}");
        }
        // The client is the peer: no extension says otherwise.
        assert_eq!(r.extensions().get::<ClientAddr>(), None);
    }

    #[test]
    fn a_trusted_peers_chain_is_kept_and_extended() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let policy = Forwarding::new(&trusted, "http");
        let r = policy.apply(request(
            "10.0.0.9:5555",
            &[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2, 10.1.1.1"),
                ("forwarded", "for=1.1.1.1"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-prefix", "/app"),
                ("x_forwarded_for", "6.6.6.6"),
            ],
        ));
        assert!(all(&r, "x_forwarded_for").is_empty());
        assert_eq!(
            all(&r, "x-forwarded-for"),
            ["1.1.1.1, 2.2.2.2, 10.1.1.1, 10.0.0.9"]
        );
        assert_eq!(
            all(&r, "forwarded"),
            ["for=1.1.1.1, for=10.0.0.9;host=a.test;proto=http"]
        );
        // 10.1.1.1 is a trusted proxy: the client is the entry before it.
        assert_eq!(all(&r, "x-real-ip"), ["2.2.2.2"]);
        assert_eq!(
            r.extensions().get::<ClientAddr>(),
            Some(&ClientAddr("2.2.2.2".parse().unwrap()))
        );
        assert_eq!(all(&r, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&r, "x-forwarded-prefix"), ["/app"]);
    }

    #[test]
    fn ipv6_peers_are_quoted_in_forwarded() {
        let policy = Forwarding::new(&[], "http");
        let r = policy.apply(request("[::1]:5555", &[]));
        assert_eq!(
            all(&r, "forwarded"),
            ["for=\"[::1]\";host=a.test;proto=http"]
        );
        assert_eq!(all(&r, "x-forwarded-for"), ["::1"]);
    }

    #[test]
    fn connection_cannot_name_away_framing_or_what_snapgate_sets() {
        let policy = Forwarding::new(&[], "http");
        let r = policy.apply(request(
            "10.0.0.9:5555",
            &[
                ("host", "a.test"),
                ("content-length", "3"),
                (
                    "connection",
                    "host, content-length, x-forwarded-for, forwarded, x-private",
                ),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
            ],
        ));
        assert_eq!(all(&r, "host"), ["a.test"]);
        assert_eq!(all(&r, "content-length"), ["3"]);
        assert_eq!(all(&r, "x-forwarded-for"), ["10.0.0.9"]);
        assert!(r.headers().get("forwarded").is_some());
        for gone in ["connection", "x-private", "keep-alive", "te"] {
            assert!(r.headers().get(gone).is_none(), "{gone}");
        }
    }

    /// The two ways through: `Connection` naming only hop-by-hop fields
    /// (or `close`), and naming others too; framing stays either way.
    #[test]
    fn hop_by_hop_fields_and_those_connection_names_go() {
        let strip = |fields: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in fields {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            strip_hop_by_hop(&mut h);
            let mut left: Vec<String> = h.keys().map(|n| n.to_string()).collect();
            left.sort();
            left
        };
        assert_eq!(
            strip(&[
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("content-length", "2"),
            ]),
            ["content-length"]
        );
        assert_eq!(
            strip(&[
                ("connection", "close, TE"),
                ("connection", "Upgrade"),
                ("te", "trailers"),
                ("upgrade", "websocket"),
                ("transfer-encoding", "chunked"),
                ("x-kept", "1"),
            ]),
            ["x-kept"]
        );
        assert_eq!(
            strip(&[
                ("connection", "keep-alive, x-private, content-length"),
                ("x-private", "1"),
                ("content-length", "2"),
                ("x-kept", "1"),
            ]),
            ["content-length", "x-kept"]
        );
        assert_eq!(
            strip(&[("proxy-connection", "keep-alive"), ("x-kept", "1")]),
            ["x-kept"]
        );
        // RFC 9110 section 7.6.1: a field named by an option goes, even
        // one named Close.
        assert_eq!(
            strip(&[("connection", "close"), ("close", "1"), ("x-kept", "1")]),
            ["x-kept"]
        );
        assert_eq!(strip(&[("x-kept", "1")]), ["x-kept"]);
    }

    #[test]
    fn connection_tokens_match_names_in_any_case() {
        let policy = Forwarding::new(&[], "http");
        let r = policy.apply(request(
            "10.0.0.9:5555",
            &[
                ("connection", " X-Private ,Keep-Alive"),
                ("x-private", "1"),
                ("x-kept", "2"),
            ],
        ));
        assert!(r.headers().get("x-private").is_none());
        assert!(r.headers().get("connection").is_none());
        assert_eq!(all(&r, "x-kept"), ["2"]);
    }

    #[test]
    fn a_request_without_hop_by_hop_fields_gets_no_hop_extension() {
        let policy = Forwarding::new(&[], "http");
        let r = policy.apply(request("10.0.0.9:5555", &[("accept", "*/*")]));
        assert!(r.extensions().get::<Hop>().is_none());
        let r = policy.apply(request(
            "10.0.0.9:5555",
            &[("connection", "te"), ("te", "trailers")],
        ));
        assert_eq!(
            r.extensions().get::<Hop>(),
            Some(&Hop {
                te_trailers: true,
                ..Hop::default()
            })
        );
    }

    #[test]
    fn peers_and_ports_alternating_on_one_thread_each_get_their_own_values() {
        let policy = Forwarding::new(&[], "http");
        for (peer, local) in [
            ("10.0.0.1:1", "127.0.0.1:80"),
            ("10.0.0.2:1", "127.0.0.1:8443"),
            ("10.0.0.1:2", "127.0.0.1:80"),
            ("[::1]:3", "127.0.0.1:8443"),
        ] {
            let mut req = request(peer, &[]);
            req.extensions_mut().get_mut::<Peer>().unwrap().local = local.parse().unwrap();
            let r = policy.apply(req);
            let ip = peer.parse::<SocketAddr>().unwrap().ip().to_string();
            let port = local.parse::<SocketAddr>().unwrap().port().to_string();
            assert_eq!(all(&r, "x-forwarded-for"), std::slice::from_ref(&ip));
            assert_eq!(all(&r, "x-real-ip"), [ip]);
            assert_eq!(all(&r, "x-forwarded-port"), [port]);
        }
    }

    #[test]
    fn a_trusted_peer_that_sent_no_forwarding_fields_gets_them_set() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let policy = Forwarding::new(&trusted, "https");
        let r = policy.apply(request("10.0.0.9:5555", &[]));
        assert_eq!(all(&r, "x-forwarded-for"), ["10.0.0.9"]);
        assert_eq!(all(&r, "x-real-ip"), ["10.0.0.9"]);
        assert_eq!(all(&r, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&r, "x-forwarded-host"), ["a.test"]);
        assert_eq!(all(&r, "x-forwarded-port"), ["8080"]);
        assert_eq!(
            all(&r, "forwarded"),
            ["for=10.0.0.9;host=a.test;proto=https"]
        );
        assert!(r.extensions().get::<ClientAddr>().is_none());
    }
}

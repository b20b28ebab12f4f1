//! The `cluster:` section: many snapgate nodes sharing one catalog in etcd
//! (`crate::cluster`). Absent, the gateway is a single node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// This node's place in a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name: unique in the cluster, 1 to 63 of `a-z`, `0-9`
    /// and `-` (a DNS label, so a Kubernetes node or pod name fits).
    pub node: String,
    /// Where peers reach this node's `listen` (its plain HTTP listener),
    /// as `IP:port`: what it registers in the catalog. Peers forward
    /// requests there with the hop marker.
    pub advertise: SocketAddr,
    /// A file whose first line, at least 32 characters, every node of the
    /// cluster shares: the hop marker a node adds to a request it forwards
    /// to a peer proves it with this. Relative to the config file.
    pub secret_file: PathBuf,
    /// The etcd cluster holding the catalog.
    pub etcd: EtcdConfig,
    /// The lease this node's catalog entry is held under, in whole seconds
    /// (etcd's lease unit), at least 2 s: a node that dies leaves the
    /// catalog this long after its last keep-alive. Default 10 s.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Least time between two writes of this node's entry (its pools
    /// change faster than that under load: the changes in between are
    /// written as one). Default 250 ms; 50 ms to 10 s.
    #[serde(default = "default_publish_interval", with = "humantime_serde")]
    pub publish_interval: Duration,
    /// Longest wait for a connection to a peer; a peer that takes longer
    /// (or refuses) is skipped until it answers a health check or its
    /// catalog entry changes. Default 1 s.
    #[serde(default = "default_peer_connect_timeout", with = "humantime_serde")]
    pub peer_connect_timeout: Duration,
    /// Reserved: a snapshot store shared by the nodes. Not built: each
    /// node builds its snapshots and code images from the same inputs
    /// (README, "Many nodes"). Any value is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_store: Option<String>,
}

/// How to reach etcd (v3 API, over gRPC).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, `http://host:port` or
    /// `https://host:port` (with `tls`); requests are balanced over them.
    pub endpoints: Vec<String>,
    /// Where the catalog's keys live: `<prefix>nodes/<node>`. Default
    /// `/snapgate/`; must start and end with `/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// A user of etcd's authentication, with `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// A file whose first line is `username`'s password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// TLS to etcd (every endpoint `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that signed its certificates and, for client
/// certificate authentication, this node's certificate and key (PEM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// The CA certificate(s) etcd's server certificates chain to.
    pub ca: PathBuf,
    /// This node's client certificate, with `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_publish_interval() -> Duration {
    Duration::from_millis(250)
}

fn default_peer_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_prefix() -> String {
    "/snapgate/".into()
}

/// The shortest shared secret: 32 characters.
pub const MIN_SECRET_LEN: usize = 32;

impl ClusterConfig {
    /// Checks what the types cannot, without touching a file; each
    /// problem as (key under `cluster.`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut add = |k: &str, m: String| problems.push((format!("cluster.{k}"), m));
        if !valid_node_name(&self.node) {
            add(
                "node",
                format!(
                    "{:?}: 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
                    self.node
                ),
            );
        }
        if self.advertise.ip().is_unspecified() || self.advertise.port() == 0 {
            add(
                "advertise",
                format!(
                    "{}: the address peers reach this node's listen on, with its port \
                     (not 0.0.0.0 or port 0)",
                    self.advertise
                ),
            );
        }
        let ttl = self.lease_ttl;
        if ttl < Duration::from_secs(2) || ttl.subsec_nanos() != 0 || ttl.as_secs() > 3600 {
            add("lease_ttl", format!("{ttl:?}: whole seconds, 2 s to 1 h"));
        }
        let every = self.publish_interval;
        if every < Duration::from_millis(50) || every > Duration::from_secs(10) {
            add("publish_interval", format!("{every:?}: 50 ms to 10 s"));
        }
        let connect = self.peer_connect_timeout;
        if connect < Duration::from_millis(10) || connect > Duration::from_secs(60) {
            add(
                "peer_connect_timeout",
                format!("{connect:?}: 10 ms to 60 s"),
            );
        }
        if self.snapshot_store.is_some() {
            add(
                "snapshot_store",
                "a shared snapshot store is not supported yet: each node builds its \
                 snapshots from the same inputs (leave it out)"
                    .into(),
            );
        }
        let etcd = &self.etcd;
        if etcd.endpoints.is_empty() {
            add("etcd.endpoints", "at least one etcd client URL".into());
        }
        for (i, e) in etcd.endpoints.iter().enumerate() {
            let want = if etcd.tls.is_some() { "https" } else { "http" };
            let ok = e.parse::<http::Uri>().is_ok_and(|u| {
                u.scheme_str() == Some(want)
                    && u.port_u16().is_some()
                    && u.host().is_some_and(|h| !h.is_empty())
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none()
            });
            if !ok {
                let scheme = if etcd.tls.is_some() { "https" } else { "http" };
                add(
                    &format!("etcd.endpoints[{i}]"),
                    format!("{e:?}: a client URL {scheme}://host:port (with its port)"),
                );
            }
        }
        if !etcd.prefix.starts_with('/') || !etcd.prefix.ends_with('/') || etcd.prefix.len() < 2 {
            add(
                "etcd.prefix",
                format!("{:?}: starts and ends with '/'", etcd.prefix),
            );
        }
        if etcd.username.is_some() != etcd.password_file.is_some() {
            add(
                "etcd.username",
                "username and password_file go together".into(),
            );
        }
        if let Some(tls) = &etcd.tls {
            if tls.cert.is_some() != tls.key.is_some() {
                add("etcd.tls.cert", "cert and key go together".into());
            }
        }
        problems
    }

    /// Makes its relative paths relative to `base` (the config file's
    /// directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.secret_file);
        if let Some(p) = &mut self.etcd.password_file {
            abs(p);
        }
        if let Some(tls) = &mut self.etcd.tls {
            abs(&mut tls.ca);
            for p in [&mut tls.cert, &mut tls.key].into_iter().flatten() {
                abs(p);
            }
        }
    }

    /// The files it names, each with its key: for the preflight.
    pub fn files(&self) -> Vec<(String, &Path)> {
        let mut files = vec![("cluster.secret_file".to_owned(), self.secret_file.as_path())];
        if let Some(p) = &self.etcd.password_file {
            files.push(("cluster.etcd.password_file".into(), p));
        }
        if let Some(tls) = &self.etcd.tls {
            files.push(("cluster.etcd.tls.ca".into(), &tls.ca));
            if let Some(p) = &tls.cert {
                files.push(("cluster.etcd.tls.cert".into(), p));
            }
            if let Some(p) = &tls.key {
                files.push(("cluster.etcd.tls.key".into(), p));
            }
        }
        files
    }
}

/// A DNS label of lower-case letters, digits and `-` (RFC 1123 section 2.1).
fn valid_node_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> ClusterConfig {
        serde_yaml_ng::from_str(&format!(
            "node: node-a\nadvertise: 10.0.0.1:8080\nsecret_file: s\n\
             etcd: {{ endpoints: [\"http://10.0.0.9:2379\"] }}\n{extra}"
        ))
        .unwrap()
    }

    fn keys(c: &ClusterConfig) -> Vec<String> {
        c.validate().into_iter().map(|(k, _)| k).collect::<Vec<_>>()
    }

    #[test]
    fn a_minimal_section_takes_its_defaults_and_passes() {
        let c = parse("");
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.publish_interval, Duration::from_millis(250));
        assert_eq!(c.etcd.prefix, "/snapgate/");
        assert!(keys(&c).is_empty(), "{:?}", keys(&c));
    }

    #[test]
    fn each_bad_value_is_named_by_its_key() {
        let mut c = parse("lease_ttl: 1500ms\npublish_interval: 1ms\nsnapshot_store: s3://x");
        c.node = "Node_A".into();
        c.advertise = "0.0.0.0:8080".parse().unwrap();
        c.etcd.endpoints = vec!["10.0.0.9:2379".into(), "https://x:1".into()];
        c.etcd
            .endpoints
            .extend(["http://a b:1".into(), "http://x".into()]);
        c.etcd.prefix = "snapgate".into();
        c.etcd.username = Some("u".into());
        assert_eq!(
            keys(&c),
            [
                "cluster.node",
                "cluster.advertise",
                "cluster.lease_ttl",
                "cluster.publish_interval",
                "cluster.snapshot_store",
                "cluster.etcd.endpoints[0]",
                "cluster.etcd.endpoints[1]",
                "cluster.etcd.endpoints[2]",
                "cluster.etcd.endpoints[3]",
                "cluster.etcd.prefix",
                "cluster.etcd.username",
            ]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = serde_yaml_ng::from_str::<ClusterConfig>(
            "node: a\nadvertise: 10.0.0.1:80\nsecret_file: s\netcd: { endpoints: [] }\nttl: 5s",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `ttl`"), "{e}");
    }
}

//! Automatic certificates (ACME, RFC 8555) for the TLS listener, with the
//! `instant-acme` client.
//!
//! # Protocol
//! 1. Managed hosts are named by the config only ([`managed_hosts`]):
//!    `tls.acme.hosts`, else every exact host of every app that no
//!    certificate file lists; never a wildcard, an IP address or
//!    `localhost`. A handshake's SNI never adds one, so no client can make
//!    snapgate order a certificate.
//! 2. State lives under `<state_dir>/acme/<directory>/` (the directory URL
//!    made a file name): `account.json` (the account's key and URL) and
//!    `certs/<host>.pem` and `<host>.key`, each written to a temporary file
//!    and renamed, readable by the owner only. At start, each stored
//!    certificate that still loads is served at once.
//! 3. One task orders certificates, one host at a time: a host with no
//!    certificate is due now; one with a certificate is due `renew_before`
//!    ahead of its expiry (default a third of its lifetime). A failed order
//!    makes that host wait (1 min, doubling to 1 h) and is logged and
//!    counted; the certificate in use, if any, stays. The task sleeps
//!    until the next host is due, or until a reload names other hosts.
//! 4. One order: a new order for the host; its authorization's challenge
//!    of the configured type is published (HTTP-01: the key authorization
//!    under `/.well-known/acme-challenge/<token>` on the plain listener;
//!    TLS-ALPN-01: a self-signed certificate with the `acmeIdentifier`
//!    extension, RFC 8737 section 3, served to handshakes offering
//!    `acme-tls/1` for the host) and marked ready; the order is polled
//!    until ready, finalized with a CSR for a new P-256 key, and its
//!    certificate fetched, stored, and served from the next handshake on.
//!    The challenge is withdrawn however the order ends.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use instant_acme::{
    Account, AccountCredentials, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{AcmeChallenge, AcmeConfig, Config};
use crate::pool::Tasks;
use crate::proxy::tls::{certified_key_from_pem, Certs};

/// The HTTP-01 path prefix (RFC 8555 section 8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// Wait after a host's first failed order; doubled per failure.
const RETRY_FIRST: Duration = Duration::from_secs(60);
/// The longest wait between orders of a failing host.
const RETRY_MAX: Duration = Duration::from_secs(3600);

/// HTTP-01 key authorizations by token, answered on the plain listener
/// while their orders run.
#[derive(Debug, Default)]
pub struct Http01 {
    tokens: DashMap<String, String>,
}

impl Http01 {
    /// The key authorization for a request to `path`, if it is an
    /// HTTP-01 path of a pending challenge.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        self.tokens.get(token).map(|v| v.clone())
    }
}

/// The hosts protocol step 1 manages for `config`, sorted.
pub fn managed_hosts(config: &Config) -> Vec<String> {
    let Some(tls) = &config.tls else {
        return Vec::new();
    };
    let Some(acme) = &tls.acme else {
        return Vec::new();
    };
    // A file lists it, exactly or by a wildcard, as the TLS listener
    // matches (`tls.rs` rule 3): that certificate is served.
    let filed = |h: &str| {
        tls.certificates
            .iter()
            .flat_map(|c| c.hosts.iter())
            .any(|p| crate::proxy::tls::pattern_covers(&p.to_ascii_lowercase(), h))
    };
    let candidates: BTreeSet<String> = match &acme.hosts {
        Some(hosts) => hosts.iter().cloned().collect(),
        None => config
            .apps
            .values()
            .flat_map(|a| a.hosts.iter())
            .cloned()
            .collect(),
    };
    candidates
        .into_iter()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .filter(|h| acme.hosts.is_some() || !filed(h))
        .filter(|h| {
            !h.starts_with('*')
                && h != "localhost"
                && !h.ends_with(".localhost")
                && h.parse::<std::net::IpAddr>().is_err()
                && !h.starts_with('[')
        })
        .collect()
}

/// ACME metrics.
#[derive(Clone)]
pub struct AcmeMetrics {
    orders: IntCounterVec,
    expiry: IntGaugeVec,
}

impl AcmeMetrics {
    /// Registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<AcmeMetrics> {
        let m = AcmeMetrics {
            orders: IntCounterVec::new(
                Opts::new(
                    "snapgate_acme_orders_total",
                    "ACME certificate orders by host and result (issued, failed).",
                ),
                &["host", "result"],
            )?,
            expiry: IntGaugeVec::new(
                Opts::new(
                    "snapgate_certificate_expiry_timestamp_seconds",
                    "When the ACME certificate served for a host expires, in seconds since the Unix epoch.",
                ),
                &["host"],
            )?,
        };
        registry.register(Box::new(m.orders.clone()))?;
        registry.register(Box::new(m.expiry.clone()))?;
        Ok(m)
    }
}

/// A certificate with its validity.
struct Held {
    not_before: SystemTime,
    not_after: SystemTime,
}

/// The ACME side of the TLS listener (module doc).
pub struct Acme {
    config: AcmeConfig,
    dir: PathBuf,
    certs: Arc<Certs>,
    http01: Arc<Http01>,
    metrics: AcmeMetrics,
}

impl Acme {
    /// The manager for `config`'s `tls.acme` (none without one), serving
    /// into `certs` and `http01`; stored certificates are served at once
    /// (protocol step 2).
    pub fn new(
        config: &Config,
        certs: Arc<Certs>,
        http01: Arc<Http01>,
        metrics: AcmeMetrics,
    ) -> Option<Acme> {
        let acme = config.tls.as_ref()?.acme.clone()?;
        let dir = config
            .state_dir
            .join("acme")
            .join(dir_name(&acme.directory));
        Some(Acme {
            config: acme,
            dir,
            certs,
            http01,
            metrics,
        })
    }

    /// Runs protocol step 3 on `tasks` for the hosts `hosts` names (a
    /// reload sends new ones).
    pub fn spawn(self, hosts: watch::Receiver<Vec<String>>, tasks: &Tasks) {
        let cancel = tasks.cancel.clone();
        tasks.tracker.spawn(async move {
            tokio::select! {
                () = self.run(hosts) => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    async fn run(self, mut hosts: watch::Receiver<Vec<String>>) {
        let mut held: HashMap<String, Held> = HashMap::new();
        let mut retry: HashMap<String, (SystemTime, u32)> = HashMap::new();
        let mut account: Option<Account> = None;
        loop {
            let names = hosts.borrow_and_update().clone();
            for host in &names {
                if !held.contains_key(host) {
                    if let Some(h) = self.load_stored(host) {
                        held.insert(host.clone(), h);
                    }
                }
            }
            let now = SystemTime::now();
            let due_at = |host: &String| -> SystemTime {
                let renew = held.get(host).map_or(now, |h| self.renew_at(h));
                match retry.get(host) {
                    Some((at, _)) => renew.max(*at),
                    None => renew,
                }
            };
            let next = names.iter().min_by_key(|h| due_at(h)).cloned();
            let Some(host) = next else {
                if hosts.changed().await.is_err() {
                    return;
                }
                continue;
            };
            let due = due_at(&host);
            // Due now (a host with no certificate is due at `now`): order.
            if let Some(wait) = due.duration_since(now).ok().filter(|w| !w.is_zero()) {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    changed = hosts.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                continue;
            }
            match self.order(&host, &mut account).await {
                Ok(h) => {
                    self.metrics
                        .orders
                        .with_label_values(&[&host, "issued"])
                        .inc();
                    retry.remove(&host);
                    held.insert(host, h);
                }
                Err(e) => {
                    self.metrics
                        .orders
                        .with_label_values(&[&host, "failed"])
                        .inc();
                    let failures = retry.get(&host).map_or(0, |r| r.1) + 1;
                    let wait = RETRY_FIRST
                        .saturating_mul(1 << (failures - 1).min(6))
                        .min(RETRY_MAX);
                    warn!(%host, "ACME order failed ({e:#}); next try in {wait:?}");
                    retry.insert(host, (SystemTime::now() + wait, failures));
                }
            }
        }
    }

    /// When `h` is renewed (protocol step 3).
    fn renew_at(&self, h: &Held) -> SystemTime {
        let lifetime = h.not_after.duration_since(h.not_before).unwrap_or_default();
        // Never more than half its life ahead: a renew_before as long as
        // the CA's lifetimes would order again as soon as one is issued.
        let ahead = self
            .config
            .renew_before
            .unwrap_or(lifetime / 3)
            .min(lifetime / 2);
        h.not_after
            .checked_sub(ahead)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn cert_paths(&self, host: &str) -> (PathBuf, PathBuf) {
        let certs = self.dir.join("certs");
        (
            certs.join(format!("{host}.pem")),
            certs.join(format!("{host}.key")),
        )
    }

    /// The stored certificate of `host`, served now if it loads and has
    /// not expired.
    fn load_stored(&self, host: &str) -> Option<Held> {
        let (cert, key) = self.cert_paths(host);
        let (chain, key) = (std::fs::read(cert).ok()?, std::fs::read(key).ok()?);
        match self.serve(host, &chain, &key) {
            Ok(h) if h.not_after > SystemTime::now() => Some(h),
            Ok(_) => None,
            Err(e) => {
                warn!(%host, "stored ACME certificate not used: {e}");
                None
            }
        }
    }

    /// Serves the PEM `chain` and `key` for `host`.
    fn serve(&self, host: &str, chain: &[u8], key: &[u8]) -> anyhow::Result<Held> {
        let certified = certified_key_from_pem(chain, key).map_err(anyhow::Error::msg)?;
        let leaf = certified
            .cert
            .first()
            .ok_or_else(|| anyhow::anyhow!("no certificate"))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| anyhow::anyhow!("the certificate does not parse: {e}"))?;
        let time = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        let held = Held {
            not_before: time(parsed.validity().not_before),
            not_after: time(parsed.validity().not_after),
        };
        self.certs.set_issued(host, Arc::new(certified));
        let expiry = held
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.metrics
            .expiry
            .with_label_values(&[host])
            .set(i64::try_from(expiry).unwrap_or(i64::MAX));
        Ok(held)
    }

    /// The account: stored, else created (and stored).
    async fn account(&self) -> anyhow::Result<Account> {
        let path = self.dir.join("account.json");
        let builder = || match &self.config.ca_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        if let Ok(text) = std::fs::read(&path) {
            let credentials: AccountCredentials = serde_json::from_slice(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            return Ok(builder()?.from_credentials(credentials).await?);
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await?;
        write_private(&path, &serde_json::to_vec(&credentials)?)?;
        info!(directory = %self.config.directory, "ACME account created");
        Ok(account)
    }

    /// Protocol step 4 for `host`.
    async fn order(&self, host: &str, account: &mut Option<Account>) -> anyhow::Result<Held> {
        let account = match account {
            Some(a) => a,
            None => account.insert(self.account().await?),
        };
        info!(%host, "ordering a certificate (ACME)");
        let identifiers = [Identifier::Dns(host.to_owned())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut published = Published {
            http01: &self.http01,
            certs: &self.certs,
            tokens: Vec::new(),
            hosts: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            if authz.status == instant_acme::AuthorizationStatus::Valid {
                continue;
            }
            let kind = match self.config.challenge {
                AcmeChallenge::Http01 => ChallengeType::Http01,
                AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            };
            let mut challenge = authz
                .challenge(kind.clone())
                .ok_or_else(|| anyhow::anyhow!("the CA offers no {kind:?} challenge"))?;
            let key_auth = challenge.key_authorization();
            match self.config.challenge {
                AcmeChallenge::Http01 => {
                    let token = challenge.token.clone();
                    self.http01
                        .tokens
                        .insert(token.clone(), key_auth.as_str().to_owned());
                    published.tokens.push(token);
                }
                AcmeChallenge::TlsAlpn01 => {
                    let cert = alpn_challenge_certificate(host, key_auth.digest().as_ref())?;
                    self.certs.set_challenge(host, Some(Arc::new(cert)));
                    published.hosts.push(host.to_owned());
                }
            }
            challenge.set_ready().await?;
        }
        let retries = RetryPolicy::new().timeout(Duration::from_secs(120));
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            anyhow::bail!("the order is {status:?}, not ready (the challenge failed)");
        }
        drop(published);
        let key = order.finalize().await?;
        let chain = order.poll_certificate(&retries).await?;
        let held = self.serve(host, chain.as_bytes(), key.as_bytes())?;
        info!(%host, not_after = ?held.not_after, "certificate issued (ACME)");
        // Served now whatever happens to the files: a failure to keep them
        // is logged, not ordered again (CAs limit duplicate orders).
        let (cert_path, key_path) = self.cert_paths(host);
        let stored = write_private(&key_path, key.as_bytes())
            .and_then(|()| write_private(&cert_path, chain.as_bytes()));
        if let Err(e) = stored {
            warn!(%host, "the issued certificate is served but could not be stored in {}: {e}", self.dir.display());
        }
        Ok(held)
    }
}

/// Challenges published for one order, withdrawn on drop (protocol step
/// 4: however the order ends).
struct Published<'a> {
    http01: &'a Http01,
    certs: &'a Certs,
    tokens: Vec<String>,
    hosts: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for t in &self.tokens {
            self.http01.tokens.remove(t);
        }
        for h in &self.hosts {
            self.certs.set_challenge(h, None);
        }
    }
}

/// The TLS-ALPN-01 certificate for `host` (RFC 8737 section 3): self-signed,
/// for `host` only, with the SHA-256 of the key authorization in a critical
/// `acmeIdentifier` extension.
fn alpn_challenge_certificate(host: &str, digest: &[u8]) -> anyhow::Result<CertifiedKey> {
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    // Not through `certified_key_from_pem`: its key check parses the
    // certificate with webpki, which refuses the critical acmeIdentifier
    // extension; the key was made for this certificate just now.
    let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(anyhow::Error::msg)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// A directory URL as a file name: its host and path, other characters
/// replaced.
fn dir_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `bytes` to `path` (its directory made) through a temporary
/// file renamed over it, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_hosts_the_config_names_without_a_file_are_managed() {
        let c = Config::parse(
            "tls:\n  listen: 127.0.0.1:0\n  certificates: [{ hosts: [a.test, '*.f.test'], cert: a.pem, key: a.key }]\n\
             \x20 acme: { directory: 'https://ca.test/dir' }\n\
             apps:\n  x:\n    hosts: [a.test, B.test, '*.w.test', localhost, 127.0.0.1, c.test., x.f.test, y.x.f.test]\n    upstream: 127.0.0.1:1\n",
        )
        .unwrap();
        // x.f.test is under a file's wildcard; y.x.f.test is not (one label).
        assert_eq!(managed_hosts(&c), ["b.test", "c.test", "y.x.f.test"]);
    }

    #[test]
    fn http01_answers_only_pending_tokens_under_its_path() {
        let h = Http01::default();
        h.tokens.insert("tok".into(), "tok.thumb".into());
        assert_eq!(
            h.answer("/.well-known/acme-challenge/tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(h.answer("/.well-known/acme-challenge/other"), None);
        assert_eq!(h.answer("/tok"), None);
    }

    #[test]
    fn directory_urls_become_file_names() {
        assert_eq!(
            dir_name("https://acme-v02.api.letsencrypt.org/directory"),
            "acme-v02.api.letsencrypt.org_directory"
        );
        assert_eq!(
            dir_name("https://127.0.0.1:14000/dir"),
            "127.0.0.1_14000_dir"
        );
    }
}

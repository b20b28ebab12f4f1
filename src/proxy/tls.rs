//! TLS on the front door (rustls): certificates per host, from PEM files
//! named in `proxy.yaml`, chosen by the client's SNI.
//!
//! Rules:
//! 1. TLS 1.3 and 1.2 only (rustls implements nothing older), with
//!    rustls's cipher suites on ring: AEAD ciphers with forward secrecy, in
//!    the server's order of preference, not the client's.
//! 2. ALPN offers `h2` (unless `http2.enabled` is false) and `http/1.1`.
//! 3. A certificate serves the hosts listed with it: exact names first,
//!    then the longest matching `*.` wildcard (one label, as RFC 6125
//!    section 6.4.3 reads wildcards). SNI is matched case-folded, without a
//!    trailing dot.
//! 4. A client whose SNI names no listed host, or that sends none, gets the
//!    certificate of `tls.default_host` if the config names one; otherwise
//!    the handshake fails (rustls sends an alert): snapgate never shows a
//!    certificate for a host it was not asked for.
//! 5. A request on a TLS connection must be for a host that selects the
//!    certificate the connection was served with (421 Misdirected Request
//!    otherwise, RFC 9110 section 15.5.20): one host's certificate opens no
//!    other host's app.
//! 6. The certificates in use are one [`CertStore`], loaded whole and
//!    swapped whole ([`Certs`]): on a config reload and when a certificate
//!    or key file changes. A store that fails to load is not used; the
//!    one before it stays. Each handshake uses the store current when it
//!    starts.
//! 7. With `tls.acme`, certificates issued for hosts no file lists are
//!    served after the files' ([`crate::acme`]); a handshake that offers
//!    ALPN `acme-tls/1` (a CA validating TLS-ALPN-01, RFC 8737) gets only
//!    the challenge certificate of its SNI, or fails, and its connection
//!    carries no HTTP.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Why the TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file could not be read or holds no certificate.
    #[error("tls.certificates[{index}].cert: {path}: {why}")]
    Cert {
        /// Its index under `tls.certificates`.
        index: usize,
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A key file could not be read, holds no key, or a key rustls cannot
    /// sign with.
    #[error("tls.certificates[{index}].key: {path}: {why}")]
    Key {
        /// Its index under `tls.certificates`.
        index: usize,
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificates by host (rule 3) and the default (rule 4).
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// (suffix with its leading dot, certificate), longest first.
    wildcards: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads every certificate and key `config` names.
    pub fn load(config: &TlsConfig) -> Result<CertStore, TlsError> {
        let mut store = CertStore::default();
        for (index, c) in config.certificates.iter().enumerate() {
            let key = Arc::new(certified_key(index, &c.cert, &c.key)?);
            for host in &c.hosts {
                match host.strip_prefix('*') {
                    Some(suffix) => store.wildcards.push((suffix.to_owned(), key.clone())),
                    None => {
                        store.exact.insert(host.clone(), key.clone());
                    }
                }
            }
        }
        store
            .wildcards
            .sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        store.default = config
            .default_host
            .as_deref()
            .and_then(|h| store.for_name(h));
        Ok(store)
    }

    /// The certificate a client naming `name` gets (rules 3 and 4).
    pub fn served_for(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        name.and_then(|n| self.for_name(n))
            .or_else(|| self.default.clone())
    }

    /// Whether a certificate lists `name` (rule 3; not the default).
    pub fn covers(&self, name: &str) -> bool {
        self.for_name(name).is_some()
    }

    /// The certificate for `name` by rule 3.
    pub fn for_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| one_label_under(suffix, &name))
            .map(|(_, key)| key.clone())
    }
}

/// Whether the certificate host `pattern` (a name, or `*.` and a suffix)
/// is for `name` (lowercase, no trailing dot), by rule 3.
pub fn pattern_covers(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => one_label_under(suffix, name),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

/// Whether `name` is one label more than `suffix` (which starts with a
/// dot): a wildcard's reach (RFC 6125 section 6.4.3).
fn one_label_under(suffix: &str, name: &str) -> bool {
    name.len() > suffix.len()
        && name.ends_with(suffix)
        && !name[..name.len() - suffix.len()].contains('.')
}

/// ALPN protocol of the TLS-ALPN-01 challenge (RFC 8737 section 6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The certificates the TLS listener serves now (rules 6 and 7): one
/// [`CertStore`] of files, swapped whole; the certificates ACME issued,
/// by host; and TLS-ALPN-01 challenge certificates, by host.
#[derive(Debug)]
pub struct Certs {
    store: arc_swap::ArcSwap<CertStore>,
    issued: arc_swap::ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
    challenges: std::sync::Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Certs {
    /// Serving `store`.
    pub fn new(store: CertStore) -> Arc<Certs> {
        Arc::new(Certs {
            store: arc_swap::ArcSwap::from_pointee(store),
            issued: Default::default(),
            challenges: Default::default(),
        })
    }

    /// The file store served now.
    pub fn current(&self) -> Arc<CertStore> {
        self.store.load_full()
    }

    /// Serves `store` from the next handshake on.
    pub fn swap(&self, store: CertStore) {
        self.store.store(Arc::new(store));
    }

    /// Serves `key` for `host` (an ACME-issued certificate) from the next
    /// handshake on, unless a file lists the host.
    pub fn set_issued(&self, host: &str, key: Arc<CertifiedKey>) {
        self.issued.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(host.to_owned(), key.clone());
            m
        });
    }

    /// Serves `key` to TLS-ALPN-01 validation handshakes for `host`
    /// (`None`: no longer).
    pub fn set_challenge(&self, host: &str, key: Option<Arc<CertifiedKey>>) {
        let mut challenges = self.challenges.lock().unwrap_or_else(|p| p.into_inner());
        match key {
            Some(k) => challenges.insert(host.to_owned(), k),
            None => challenges.remove(host),
        };
    }

    /// The certificate a client naming `name` gets (rules 3, 4 and 7): a
    /// file's, else an issued one, else the default.
    pub fn served_for(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let store = self.store.load();
        name.and_then(|n| {
            store
                .for_name(n)
                .or_else(|| self.issued.load().get(&normal(n)).cloned())
        })
        .or_else(|| store.default.clone())
    }

    /// Whether a certificate (a file's or an issued one) is for `name`
    /// (not the default).
    pub fn covers(&self, name: &str) -> bool {
        self.store.load().covers(name) || self.issued.load().contains_key(&normal(name))
    }

    /// The rustls server config serving these certificates (rules 1, 2
    /// and 7): `h2` offered first by ALPN when HTTP/2 is on; `acme-tls/1`
    /// when TLS-ALPN-01 challenges are answered.
    pub fn server_config(
        self: &Arc<Self>,
        h2: bool,
        acme_tls_alpn: bool,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        // ALPN (RFC 7301): HTTP/2 first where enabled (RFC 9113 section 3.2).
        if h2 {
            config.alpn_protocols.push(b"h2".to_vec());
        }
        config.alpn_protocols.push(b"http/1.1".to_vec());
        if acme_tls_alpn {
            config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        }
        // The server's order (strongest first), not the client's.
        config.ignore_client_order = true;
        Ok(Arc::new(config))
    }
}

/// A name as certificates are matched (rule 3).
fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A validation offers acme-tls/1 alone (RFC 8737 section 3); a
        // client offering it among others is served as any other.
        let validation = hello.alpn().is_some_and(|protocols| {
            let offered: Vec<&[u8]> = protocols.collect();
            offered == [ACME_TLS_ALPN]
        });
        if validation {
            // Rule 7: only a challenge certificate, only for its host.
            let challenges = self.challenges.lock().unwrap_or_else(|p| p.into_inner());
            return hello
                .server_name()
                .and_then(|n| challenges.get(&normal(n)).cloned());
        }
        self.served_for(hello.server_name())
    }
}

/// A certificate chain and key in PEM (as an ACME CA issues them, and as
/// they are stored), checked to match.
pub fn certified_key_from_pem(chain: &[u8], key: &[u8]) -> Result<CertifiedKey, String> {
    let chain = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate".into());
    }
    let der = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("key: {e}"))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| format!("key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("the key does not match the certificate: {e}"))?;
    Ok(certified)
}

/// The certificate chain of `cert` with the key of `key`.
fn certified_key(index: usize, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_error = |why: String| TlsError::Cert {
        index,
        path: cert.display().to_string(),
        why,
    };
    let key_error = |why: String| TlsError::Key {
        index,
        path: key.display().to_string(),
        why,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no PEM certificate in it".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| key_error(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| key_error(format!("does not match the certificate: {e}")))?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        // Any signing key will do: only the Arc's identity matters here.
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(rcgen_free_p256_pkcs8().to_vec());
        let signing = rustls::crypto::ring::sign::any_supported_type(&der.into()).unwrap();
        Arc::new(CertifiedKey::new(vec![], signing))
    }

    /// A P-256 PKCS#8 key made by ring for the test.
    fn rcgen_free_p256_pkcs8() -> Vec<u8> {
        let rng = ring::rand::SystemRandom::new();
        ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap()
        .as_ref()
        .to_vec()
    }

    #[test]
    fn exact_names_then_one_label_wildcards_then_the_default() {
        let (a, b, d) = (key(), key(), key());
        let store = CertStore {
            exact: [("a.test".to_owned(), a.clone())].into(),
            wildcards: vec![(".b.test".to_owned(), b.clone())],
            default: Some(d.clone()),
        };
        let is = |name: Option<&str>, k: &Arc<CertifiedKey>| {
            Arc::ptr_eq(&store.served_for(name).unwrap(), k)
        };
        assert!(is(Some("A.Test."), &a));
        assert!(is(Some("x.b.test"), &b));
        assert!(is(Some("y.x.b.test"), &d), "a wildcard covers one label");
        assert!(is(Some("b.test"), &d));
        assert!(is(None, &d));
        assert!(store.covers("x.b.test") && !store.covers("y.x.b.test"));
    }
}

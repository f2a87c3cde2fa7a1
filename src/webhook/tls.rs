//! Serving certificates, reloaded without a restart.
//!
//! kubelet updates a mounted Secret by swapping a `..data` symlink, so a watch
//! on the certificate file's inode never fires. Instead the files are read by
//! path every interval and compared with what is loaded; a change that parses
//! is swapped in atomically. Connections in flight keep the certificate they
//! were set up with; new handshakes get the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tracing::{error, info};

use crate::metrics::{Metrics, ReloadLabels, ReloadResult};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("the key in {key} does not match the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The loaded certificate and the digest of the files it came from.
struct Loaded {
    key: Arc<CertifiedKey>,
    digest: [u8; 32],
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn digest_of(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(cert_pem);
    hasher.update([0u8]);
    hasher.update(key_pem);
    hasher.finalize().into()
}

fn parse(
    cert_path: &Path,
    key_path: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let bad_key = |detail: String| TlsError::BadKey {
        path: key_path.to_path_buf(),
        detail,
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|err| bad_key(err.to_string()))?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|err| bad_key(err.to_string()))?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        // Some key types cannot report their public key; accept those.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(_) => Err(TlsError::Mismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        }),
    }
}

/// Hands every new TLS handshake the certificate loaded last.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    digest: ArcSwap<[u8; 32]>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ReloadingCert {
    /// Loads the files once; the server does not start without them.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<ReloadingCert>, TlsError> {
        let loaded = Self::read_files(cert_path, key_path)?;
        Ok(Arc::new(ReloadingCert {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: ArcSwap::new(loaded.key),
            digest: ArcSwap::new(Arc::new(loaded.digest)),
        }))
    }

    fn read_files(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let digest = digest_of(&cert_pem, &key_pem);
        Ok(Loaded {
            key: parse(cert_path, key_path, &cert_pem, &key_pem)?,
            digest,
        })
    }

    /// Reads the files; swaps in their certificate if they changed and parse.
    /// Returns whether a new certificate was loaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let cert_pem = read(&self.cert_path)?;
        let key_pem = read(&self.key_path)?;
        let digest = digest_of(&cert_pem, &key_pem);
        if **self.digest.load() == digest {
            return Ok(false);
        }
        let key = parse(&self.cert_path, &self.key_path, &cert_pem, &key_pem)?;
        self.current.store(key);
        self.digest.store(Arc::new(digest));
        Ok(true)
    }

    /// Polls the files every `interval` until the task is dropped. A failed
    /// read (e.g. mid-rotation, key written before the certificate) keeps the
    /// old certificate and is retried next time.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Option<Arc<Metrics>>) {
        // A zero interval would spin (and tokio refuses it).
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            ticker.tick().await;
            let result = match self.reload_if_changed() {
                Ok(true) => {
                    info!(cert = %self.cert_path.display(), "serving certificate reloaded");
                    last_error = None;
                    Some(ReloadResult::Ok)
                }
                Ok(false) => {
                    last_error = None;
                    None
                }
                Err(err) => {
                    let message = err.to_string();
                    // Log a persistent problem once, not every interval.
                    if last_error.as_deref() != Some(message.as_str()) {
                        error!(error = %message, "certificate reload failed; still serving the previous certificate");
                    }
                    let first = last_error.is_none();
                    last_error = Some(message);
                    first.then_some(ReloadResult::Error)
                }
            };
            if let (Some(result), Some(metrics)) = (result, &metrics) {
                metrics
                    .tls_reloads
                    .get_or_create(&ReloadLabels { result })
                    .inc();
            }
        }
    }

    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Config(err.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

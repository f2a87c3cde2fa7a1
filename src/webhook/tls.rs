//! Serving certificates, reloaded without a restart.
//!
//! kubelet updates a mounted Secret by swapping a `..data` symlink, so a watch
//! on the certificate file's inode never fires. Instead the files are read by
//! path every interval and compared with what is loaded; a change that parses
//! is swapped in atomically. Connections in flight keep the certificate they
//! were set up with; new handshakes get the new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tracing::{error, info, warn};

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
    #[error("{path} holds no PEM CA certificate to verify clients with")]
    NoClientCa { path: PathBuf },
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The loaded certificate and the digest of the files it came from.
struct Loaded {
    key: Arc<CertifiedKey>,
    digest: [u8; 32],
}

/// When the serving (first) certificate of a chain ends, in Unix seconds.
fn not_after(key: &CertifiedKey) -> Option<i64> {
    let leaf = key.cert.first()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(certificate.validity().not_after.timestamp())
}

/// Within this much of its end, the certificate is warned about (daily).
pub const WARN_BEFORE_END: Duration = Duration::from_secs(30 * 24 * 3600);

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
    /// The loaded certificate's end, Unix seconds (0: unreadable).
    not_after: AtomicI64,
    /// When set, every client must present a certificate signed by one of
    /// these CAs (the API server, configured with a kubeconfig for webhooks).
    client_roots: Option<Arc<rustls::RootCertStore>>,
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
            not_after: AtomicI64::new(not_after(&loaded.key).unwrap_or(0)),
            current: ArcSwap::new(loaded.key),
            digest: ArcSwap::new(Arc::new(loaded.digest)),
            client_roots: None,
        }))
    }

    /// Loads the files, and requires clients to present a certificate
    /// signed by a CA in `client_ca` (PEM), when given.
    pub fn load_with_client_ca(
        cert_path: &Path,
        key_path: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Arc<ReloadingCert>, TlsError> {
        let loaded = Self::load(cert_path, key_path)?;
        let Some(client_ca) = client_ca else {
            return Ok(loaded);
        };
        let pem = read(client_ca)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok) {
            roots
                .add(cert)
                .map_err(|err| TlsError::Config(format!("{}: {err}", client_ca.display())))?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoClientCa {
                path: client_ca.to_path_buf(),
            });
        }
        let mut loaded = Arc::try_unwrap(loaded).map_err(|_| TlsError::Config("shared".into()))?;
        loaded.client_roots = Some(Arc::new(roots));
        Ok(Arc::new(loaded))
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_roots.is_some()
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
        self.not_after
            .store(not_after(&key).unwrap_or(0), Ordering::Relaxed);
        self.current.store(key);
        self.digest.store(Arc::new(digest));
        Ok(true)
    }

    /// When the serving certificate ends, Unix seconds (0: not readable).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// Logs a warning when the certificate ends within [`WARN_BEFORE_END`]
    /// (or has ended); `last` is when it last warned.
    fn warn_if_ending(&self, last: &mut Option<tokio::time::Instant>) {
        let end = self.not_after();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| since.as_secs() as i64)
            .unwrap_or(0);
        let left = end - now;
        if end == 0 || left > WARN_BEFORE_END.as_secs() as i64 {
            return;
        }
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(24 * 3600)) {
            return;
        }
        *last = Some(tokio::time::Instant::now());
        warn!(
            cert = %self.cert_path.display(),
            not_after = end,
            days_left = left / 86_400,
            "the serving certificate ends soon (or has ended): renew it (helm mode: `helm upgrade --reuse-values` \
             makes a new one within certificates.helm.renewBeforeDays of the CA's end; cert-manager renews by itself)"
        );
    }

    /// Polls the files every `interval` until the task is dropped. A failed
    /// read (e.g. mid-rotation, key written before the certificate) keeps the
    /// old certificate and is retried next time.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Option<Arc<Metrics>>) {
        // A zero interval would spin (and tokio refuses it).
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            ticker.tick().await;
            self.warn_if_ending(&mut warned);
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
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Config(err.to_string()))?;
        let builder = match &self.client_roots {
            Some(roots) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider(),
                )
                .build()
                .map_err(|err| TlsError::Config(err.to_string()))?,
            ),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

//! Helpers for the in-process server tests: certificates, a server on a free
//! loopback port, and an HTTPS client that trusts a given CA.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use velero_vm_restore_webhook::facts::RestoreFacts;
use velero_vm_restore_webhook::facts::given::{StaticGroups, StaticRestores};
use velero_vm_restore_webhook::metrics::Metrics;
use velero_vm_restore_webhook::webhook::review::{ReviewSettings, Reviewer};
use velero_vm_restore_webhook::webhook::server::{self, Limits};
use velero_vm_restore_webhook::webhook::tls::ReloadingCert;

pub struct TestCa {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate: (cert PEM, key PEM).
    pub fn client(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    /// A serving certificate for 127.0.0.1 and localhost: (cert PEM, key PEM).
    pub fn serving(&self) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    }
}

/// Lays out certificates the way kubelet mounts a Secret: the files are
/// symlinks through `..data`, which points at a timestamped directory.
pub struct SecretDir {
    pub dir: tempfile_dir::TempDir,
    generation: u32,
}

pub mod tempfile_dir {
    use std::path::{Path, PathBuf};

    /// A temporary directory removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> TempDir {
            // The counter, not the clock, makes names unique: two tests of
            // one process asking in the same clock tick got the same
            // directory (issue 33, finding 10: 1 run in 20 of `cargo test`
            // while the e2e ran failed so).
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let unique = format!(
                "{prefix}-{}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let path = std::env::temp_dir().join(unique);
            std::fs::create_dir_all(&path).expect("temp dir");
            TempDir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub fn join(dir: &TempDir, name: &str) -> PathBuf {
        dir.0.join(name)
    }
}

impl SecretDir {
    pub fn new(cert_pem: &str, key_pem: &str) -> SecretDir {
        let mut secret = SecretDir {
            dir: tempfile_dir::TempDir::new("vmrw-secret"),
            generation: 0,
        };
        secret.write(cert_pem, key_pem);
        #[cfg(unix)]
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), secret.dir.path().join(name))
                .expect("file symlink");
        }
        secret
    }

    /// Writes a new generation and swaps `..data` to it atomically, as kubelet does.
    pub fn write(&mut self, cert_pem: &str, key_pem: &str) {
        self.generation += 1;
        let generation_dir = format!("..gen{}", self.generation);
        let path = self.dir.path().join(&generation_dir);
        std::fs::create_dir_all(&path).expect("generation dir");
        std::fs::write(path.join("tls.crt"), cert_pem).expect("write cert");
        std::fs::write(path.join("tls.key"), key_pem).expect("write key");
        let tmp_link = self.dir.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp_link);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&generation_dir, &tmp_link).expect("data symlink");
        std::fs::rename(&tmp_link, self.dir.path().join("..data")).expect("swap ..data");
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }
}

pub fn limits() -> Limits {
    Limits {
        max_body_bytes: 256 * 1024,
        header_read_timeout: Duration::from_secs(5),
        request_read_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(120),
        max_concurrent_reviews: 64,
        max_buffered_bytes: 4 * 1024 * 1024,
        max_connections: 256,
        max_connections_per_source: 256,
        api_server_cidrs: Vec::new(),
        timeout_margin: Duration::from_secs(1),
        drain_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(10),
        bench_noop_route: true,
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub groups: Arc<StaticGroups>,
    pub certificate: Arc<ReloadingCert>,
    stop: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(secret: &SecretDir, settings: ReviewSettings, limits: Limits) -> TestServer {
        TestServer::start_with_restores(secret, settings, limits, StaticRestores::none()).await
    }

    pub async fn start_with_restores(
        secret: &SecretDir,
        settings: ReviewSettings,
        limits: Limits,
        restores: Arc<dyn RestoreFacts>,
    ) -> TestServer {
        let certificate =
            ReloadingCert::load(&secret.cert_path(), &secret.key_path()).expect("load cert");
        TestServer::start_serving(certificate, settings, limits, restores).await
    }

    /// A server with the certificate given (e.g. one requiring clients'
    /// certificates).
    pub async fn start_serving(
        certificate: Arc<ReloadingCert>,
        settings: ReviewSettings,
        limits: Limits,
        restores: Arc<dyn RestoreFacts>,
    ) -> TestServer {
        let metrics = Arc::new(Metrics::new());
        let groups = StaticGroups::new([]);
        let reviewer = Arc::new(Reviewer::new(
            groups.clone(),
            restores,
            settings,
            Some(metrics.clone()),
        ));
        let bound = server::bind(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .expect("bind");
        let (addr, metrics_addr) = (bound.tls_addr, bound.metrics_addr);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn({
            let certificate = certificate.clone();
            async move {
                bound
                    .run(reviewer, metrics, certificate, limits, async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("server run");
            }
        });
        TestServer {
            addr,
            metrics_addr,
            groups,
            certificate,
            stop: Some(stop_tx),
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Sends the shutdown signal (SIGTERM's stand-in) and returns at once.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn client_trusting(ca_pems: &[&str]) -> reqwest::Client {
    client_keeping_alive(ca_pems, 0)
}

/// A client that trusts `ca_pems` and keeps up to `keep_alive` idle
/// connections per host (0: a new connection per request).
pub fn client_keeping_alive(ca_pems: &[&str], keep_alive: usize) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for pem in ca_pems {
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.expect("ca pem")).expect("add root");
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .pool_max_idle_per_host(keep_alive)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

use rustls_pki_types::pem::PemObject;

pub fn example(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("example")).expect("example json")
}

/// An AdmissionReview CREATE for `object` as the API server would send it.
pub fn review_for(object: &Value, dry_run: bool) -> Value {
    let api_version = object["apiVersion"].as_str().unwrap_or("v1");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap_or("");
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "test-uid",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": format!("{}s", kind.to_lowercase())},
            "name": object["metadata"]["name"],
            "namespace": object["metadata"]["namespace"],
            "operation": "CREATE",
            // As the API server names Velero's ServiceAccount.
            "userInfo": {"username": "system:serviceaccount:velero:velero",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:velero", "system:authenticated"]},
            "object": object,
            "dryRun": dry_run
        }
    })
}

/// The response of a review, with the patch decoded.
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub patch: Option<json_patch::Patch>,
}

impl Answer {
    pub fn allowed(&self) -> bool {
        self.body["response"]["allowed"].as_bool().unwrap_or(false)
    }
    pub fn message(&self) -> String {
        self.body["response"]["status"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    pub fn warnings(&self) -> Vec<String> {
        self.body["response"]["warnings"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub async fn post_review(client: &reqwest::Client, url: &str, body: &Value) -> Answer {
    let response = client.post(url).json(body).send().await.expect("request");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON answer");
    // The admission API's form: base64 of the JSON Patch.
    let patch = body["response"]["patch"].as_str().map(|text| {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("patch is base64");
        serde_json::from_slice(&bytes).expect("patch is JSON Patch")
    });
    Answer {
        status,
        body,
        patch,
    }
}

pub fn apply(object: &Value, patch: &Option<json_patch::Patch>) -> Value {
    let mut patched = object.clone();
    if let Some(patch) = patch {
        json_patch::patch(&mut patched, patch).expect("patch applies");
    }
    patched
}

/// Posts a review of `object` from a task, so the test can act while the
/// server holds it.
pub fn spawn_review(client: &reqwest::Client, url: String, object: Value) -> JoinHandle<Answer> {
    let client = client.clone();
    tokio::spawn(async move { post_review(&client, &url, &review_for(&object, false)).await })
}

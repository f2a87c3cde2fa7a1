//! Fault runs against the webhook binary over HTTPS on loopback, each bounded
//! in time and count, each printing its figures:
//!
//! - `rotation`: reviews at concurrency 32 while the serving certificate is
//!   rotated kubelet-style (`..data` symlink swap) every second;
//! - `drain`: two replicas behind a client-side balancer that follows
//!   `/readyz` (as endpoints do); one gets SIGTERM mid-run;
//! - `attacker`: hundreds of concurrent reviews naming missing groups in
//!   many namespaces, while a legitimate client's reviews are timed;
//! - `memory`: worst-case bodies (the largest allowed, as one big annotation
//!   and as many tiny ones) at twice the review concurrency; peak RSS.
//!
//! `make bench-faults` (`cargo bench --bench faults`) runs them in full
//! against the release binary. `cargo test --benches` runs a short version of
//! the first three, with the same assertions, so the harness itself is tested.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "../tests/common/mod.rs"]
mod common;

struct Server {
    child: Child,
    port: u16,
    metrics_port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(secret: &Path, extra: &[&str]) -> Server {
        let (port, metrics_port) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_velero-vm-restore-webhook"))
            // Logging as deployed: JSON INFO lines to a pipe (here /dev/null).
            .args(["--log-level", "info", "serve", "--no-kube"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .arg("--tls-cert-file")
            .arg(secret.join("tls.crt"))
            .arg("--tls-key-file")
            .arg(secret.join("tls.key"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start server");
        Server {
            child,
            port,
            metrics_port,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|line| line.starts_with("VmHWM:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A CA and a kubelet-style Secret directory (`..data` symlink swaps) of
/// serving certificates it signs: the tests' own helpers.
struct Pki {
    ca: common::TestCa,
    secret: common::SecretDir,
}

impl Pki {
    fn new() -> Pki {
        let ca = common::TestCa::new("faults CA");
        let (cert, key) = ca.serving();
        let secret = common::SecretDir::new(&cert, &key);
        Pki { ca, secret }
    }

    fn dir(&self) -> &Path {
        self.secret.dir.path()
    }

    /// A new serving certificate from the same CA, swapped in atomically.
    fn rotate(&mut self) {
        let (cert, key) = self.ca.serving();
        self.secret.write(&cert, &key);
    }

    /// Keeps connections alive, as the API server does.
    fn client(&self, keep_alive: usize) -> reqwest::Client {
        common::client_keeping_alive(&[&self.ca.ca_pem], keep_alive)
    }
}

fn review(object: &Value) -> Value {
    let api_version = object["apiVersion"].as_str().unwrap_or("v1");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap_or("");
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "faults", "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": format!("{}s", kind.to_lowercase())},
        "name": object["metadata"]["name"], "namespace": object["metadata"]["namespace"],
        "operation": "CREATE", "userInfo": {"username": "velero"}, "object": object, "dryRun": false}})
}

fn example(name: &str) -> Value {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("example")).expect("json")
}

async fn wait_healthy(client: &reqwest::Client, server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(server.url("/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends reviews from `workers` tasks until `until`; returns (answered, failed).
async fn hammer(
    client: reqwest::Client,
    urls: Arc<dyn Fn(usize) -> String + Send + Sync>,
    body: bytes::Bytes,
    workers: usize,
    until: Instant,
    expect_allowed: bool,
) -> (usize, usize, Vec<String>) {
    let answered = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (client, urls, body) = (client.clone(), urls.clone(), body.clone());
        let (answered, failed, errors) = (answered.clone(), failed.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = worker;
            while Instant::now() < until {
                n += workers;
                let result = client.post(urls(n)).body(body.clone()).send().await;
                let ok = match result {
                    Ok(response) if response.status().is_success() => {
                        let answer: Value = response.json().await.unwrap_or(Value::Null);
                        answer["response"]["allowed"].as_bool() == Some(expect_allowed)
                    }
                    Ok(response) => {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("status {}", response.status()));
                        false
                    }
                    Err(err) => {
                        errors.lock().unwrap().push(format!("{err:?}"));
                        false
                    }
                };
                if ok {
                    answered.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    let errors = errors.lock().unwrap().iter().take(5).cloned().collect();
    (
        answered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        errors,
    )
}

fn vm_body() -> bytes::Bytes {
    let mut vm = example("vm-v1alpha5.json");
    vm["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("groupName");
    bytes::Bytes::from(serde_json::to_vec(&review(&vm)).expect("body"))
}

async fn rotation(seconds: u64) {
    let mut pki = Pki::new();
    let server = Server::start(pki.dir(), &["--tls-reload-interval", "200ms"]);
    let client = pki.client(32);
    wait_healthy(&client, &server).await;
    let until = Instant::now() + Duration::from_secs(seconds);
    let url = server.url("/mutate?timeout=10s");
    let load = tokio::spawn(hammer(
        client,
        Arc::new(move |_| url.clone()),
        vm_body(),
        32,
        until,
        true,
    ));
    let mut rotations = 0;
    while Instant::now() + Duration::from_millis(1200) < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pki.rotate();
        rotations += 1;
    }
    let (answered, failed, errors) = load.await.expect("load");
    println!(
        "rotation: {answered} reviews at concurrency 32 over {seconds}s, {rotations} certificate rotations, {failed} failed {errors:?}"
    );
    assert_eq!(failed, 0, "{errors:?}");
    assert!(rotations >= 1 && answered > 0);
}

async fn drain(seconds: u64, drain_delay: &str, workers: usize) {
    let pki = Pki::new();
    let replicas = [
        Server::start(pki.dir(), &["--shutdown-drain-delay", drain_delay]),
        Server::start(pki.dir(), &["--shutdown-drain-delay", drain_delay]),
    ];
    let client = pki.client(workers);
    for replica in &replicas {
        wait_healthy(&client, replica).await;
    }
    // The balancer's view, refreshed from /readyz as endpoints would be.
    let ready: Arc<[AtomicBool; 2]> = Arc::new([AtomicBool::new(true), AtomicBool::new(true)]);
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| r.url("/mutate?timeout=10s"))
        .collect();
    let probes: Vec<String> = replicas
        .iter()
        .map(|r| format!("http://127.0.0.1:{}/readyz", r.metrics_port))
        .collect();
    let until = Instant::now() + Duration::from_secs(seconds);
    let prober = tokio::spawn({
        let ready = ready.clone();
        let probe_client = reqwest::Client::builder()
            .use_preconfigured_tls(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
            .timeout(Duration::from_millis(500))
            .build()
            .expect("probe client");
        async move {
            while Instant::now() < until {
                for (i, probe) in probes.iter().enumerate() {
                    let up = matches!(probe_client.get(probe).send().await, Ok(r) if r.status().is_success());
                    ready[i].store(up, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let pick = {
        let ready = ready.clone();
        Arc::new(move |n: usize| {
            let preferred = n % 2;
            let chosen = if ready[preferred].load(Ordering::SeqCst) {
                preferred
            } else {
                1 - preferred
            };
            urls[chosen].clone()
        })
    };
    let load = tokio::spawn(hammer(client, pick, vm_body(), workers, until, true));
    tokio::time::sleep(Duration::from_secs(seconds / 3)).await;
    replicas[0].sigterm();
    let (answered, failed, errors) = load.await.expect("load");
    prober.await.expect("prober");
    let mut replicas = replicas;
    let exit = replicas[0].child.wait().expect("wait");
    println!(
        "drain: {answered} reviews at concurrency {workers} over {seconds}s across two replicas; SIGTERM to one at {}s \
         (drain delay {drain_delay}); {failed} failed {errors:?}; it exited with {exit}",
        seconds / 3,
    );
    assert_eq!(failed, 0, "{errors:?}");
    assert!(exit.success(), "{exit}");
}

async fn attacker(seconds: u64, attackers: usize) {
    let pki = Pki::new();
    let server = Server::start(
        pki.dir(),
        &["--group", "prod/web-tier", "--group-wait-timeout", "20s"],
    );
    let client = pki.client(attackers + 4);
    wait_healthy(&client, &server).await;
    let until = Instant::now() + Duration::from_secs(seconds);
    // Each attacker names a missing group in its own namespace, so the
    // per-namespace cap alone cannot stop them.
    let mut bad = example("vm-v1alpha5.json");
    bad["spec"]["groupName"] = json!("never-restored");
    let attack = {
        let client = client.clone();
        let url = server.url("/mutate?timeout=10s");
        let bad = bad.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for i in 0..attackers {
                let (client, url) = (client.clone(), url.clone());
                let mut vm = bad.clone();
                vm["metadata"]["namespace"] = json!(format!("attack-{i}"));
                let body = serde_json::to_vec(&review(&vm)).expect("body");
                tasks.push(tokio::spawn(async move {
                    let mut sent = 0usize;
                    while Instant::now() < until {
                        let _ = client.post(&url).body(body.clone()).send().await;
                        sent += 1;
                    }
                    sent
                }));
            }
            let mut sent = 0;
            for task in tasks {
                sent += task.await.unwrap_or(0);
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A legitimate restore: VMs whose group exists, and PVCs.
    let legit_vm =
        bytes::Bytes::from(serde_json::to_vec(&review(&example("vm-v1alpha5.json"))).expect("vm"));
    let legit_pvc =
        bytes::Bytes::from(serde_json::to_vec(&review(&example("pvc.json"))).expect("pvc"));
    let mut latencies = Vec::new();
    let mut failed = 0;
    let legit_until = until - Duration::from_millis(500);
    let url = server.url("/mutate?timeout=10s");
    let mut n = 0;
    while Instant::now() < legit_until {
        n += 1;
        let body = if n % 2 == 0 {
            legit_vm.clone()
        } else {
            legit_pvc.clone()
        };
        let started = Instant::now();
        let ok = match client.post(&url).body(body).send().await {
            Ok(response) if response.status().is_success() => {
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                answer["response"]["allowed"] == json!(true)
            }
            _ => false,
        };
        let took = started.elapsed();
        // Answered inside the deadline (10s timeout - 2s margin)?
        if !ok || took > Duration::from_secs(8) {
            failed += 1;
        }
        latencies.push(took);
    }
    let sent = attack.await.expect("attack");
    latencies.sort();
    let at = |q: f64| {
        latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1000.0
    };
    println!(
        "attacker: {attackers} concurrent callers sent {sent} reviews naming missing groups in {attackers} namespaces over {seconds}s; \
         {} legitimate reviews: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {failed} failed or late",
        latencies.len(),
        at(0.5),
        at(0.99),
        latencies
            .last()
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    );
    assert_eq!(failed, 0);
    assert!(!latencies.is_empty());
}

/// Not a pass/fail run: what holding every allowed connection does to a new
/// legitimate connection (the reason for the chart's NetworkPolicy).
async fn connections(seconds: u64) {
    let pki = Pki::new();
    let server = Server::start(
        pki.dir(),
        &["--max-connections", "64", "--header-read-timeout", "3s"],
    );
    let holders = pki.client(64);
    wait_healthy(&holders, &server).await;
    let until = Instant::now() + Duration::from_secs(seconds);
    let url = server.url("/mutate?timeout=10s");
    let load = tokio::spawn(hammer(
        holders,
        Arc::new(move |_| url.clone()),
        vm_body(),
        64,
        until,
        true,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fresh = pki.client(1);
    let started = Instant::now();
    let answered = fresh
        .post(server.url("/mutate?timeout=10s"))
        .body(vm_body())
        .send()
        .await;
    let took = started.elapsed();
    let _ = load.await;
    println!(
        "connections: 64 callers keep all 64 allowed connections busy; a new connection was answered after {:.0} ms ({}): new connections wait in the backlog until one closes",
        took.as_secs_f64() * 1000.0,
        if answered.is_ok() { "ok" } else { "failed" }
    );
}

async fn memory(seconds: u64) {
    let pki = Pki::new();
    let server = Server::start(pki.dir(), &[]);
    let client = pki.client(64);
    wait_healthy(&client, &server).await;
    let max_body = 1536 * 1024;
    let idle = server.peak_rss_mib();
    // One big annotation, and as many tiny annotations as fit (the shape that
    // costs the most memory once parsed).
    let mut big = example("vm-v1alpha5.json");
    big["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("groupName");
    let envelope = serde_json::to_vec(&review(&big)).expect("body").len();
    big["metadata"]["annotations"]["big"] = json!("x".repeat(max_body - envelope - 64));
    let mut tiny = example("vm-v1alpha5.json");
    tiny["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("groupName");
    let annotations = tiny["metadata"]["annotations"]
        .as_object_mut()
        .expect("annotations");
    let mut i = 0;
    let mut size = envelope;
    while size + 16 < max_body - 64 {
        let key = format!("k{i:x}");
        size += key.len() + 6;
        annotations.insert(key, json!(""));
        i += 1;
    }
    for (name, object) in [
        ("one big annotation", big),
        (&*format!("{i} tiny annotations"), tiny),
    ] {
        let body = bytes::Bytes::from(serde_json::to_vec(&review(&object)).expect("body"));
        assert!(body.len() <= max_body, "{} > {max_body}", body.len());
        let until = Instant::now() + Duration::from_secs(seconds);
        let url = server.url("/mutate?timeout=10s");
        let (answered, failed, errors) = hammer(
            client.clone(),
            Arc::new(move |_| url.clone()),
            body.clone(),
            64,
            until,
            true,
        )
        .await;
        println!(
            "memory: {} byte bodies ({name}) at concurrency 64 for {seconds}s: {answered} answered, {failed} not \
             (503 when no slot or byte budget is free in time) {errors:?}; peak RSS {:.1} MiB (idle {idle:.1} MiB)",
            body.len(),
            server.peak_rss_mib()
        );
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // `cargo bench --bench faults -- attacker memory` runs only those.
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if full {
            if wanted("rotation") {
                rotation(10).await;
            }
            if wanted("drain") {
                drain(12, "5s", 32).await;
            }
            if wanted("attacker") {
                // Below the connection cap (256): this run is about waits.
                attacker(15, 128).await;
            }
            if wanted("connections") {
                connections(10).await;
            }
            if wanted("memory") {
                memory(10).await;
            }
        } else {
            rotation(3).await;
            drain(
                6,
                &std::env::var("FAULTS_DRAIN_DELAY").unwrap_or("2s".into()),
                16,
            )
            .await;
            attacker(3, 32).await;
        }
    });
}

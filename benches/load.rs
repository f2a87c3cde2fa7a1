//! Load run over HTTPS against the release binary: a fixed number of requests
//! at fixed concurrency to `/noop` (TLS + HTTP + body read + the request uid, a valid allow; no review) and to
//! `/mutate` (a realistic VM review), measured in the same run, reported as
//! ratios. Loopback only; bounded in count and time.
//!
//! `cargo bench --bench load` (env LOAD_REQUESTS, LOAD_CONCURRENCY).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
}

struct Stats {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

async fn run_load(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    total: usize,
    concurrency: usize,
) -> Stats {
    let body = bytes::Bytes::copy_from_slice(body);
    let per_worker = total / concurrency;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, body) = (client.clone(), url.to_string(), body.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_worker);
            for _ in 0..per_worker {
                let start = Instant::now();
                let response = client
                    .post(&url)
                    .body(body.clone())
                    .send()
                    .await
                    .expect("request");
                assert!(
                    response.status().is_success(),
                    "status {}",
                    response.status()
                );
                let _ = response.bytes().await.expect("body");
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Stats {
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run
    // a tiny load then, so the harness itself is exercised.
    let quick = !std::env::args().any(|a| a == "--bench");
    let total: usize = std::env::var("LOAD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 200 } else { 20_000 });
    let concurrency: usize = std::env::var("LOAD_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);

    let dir = std::env::temp_dir().join(format!("vmrw-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let cert = params.self_signed(&key).expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write");

    // Logging as deployed (JSON INFO lines, one per change, to a pipe that is
    // drained) and logging off, each with its own server, in the same run.
    let start = |log_level: &str| -> (Server, u16) {
        let (port, metrics_port) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_velero-vm-restore-webhook"))
            .args([
                "--log-level",
                log_level,
                "--log-format",
                "json",
                "serve",
                "--no-kube",
                "--bench-noop-route",
            ])
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics-listen",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .arg("--tls-cert-file")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key-file")
            .arg(dir.join("tls.key"))
            .args([
                "--max-concurrent-reviews",
                "1024",
                "--max-buffered-bytes",
                "67108864",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server");
        // Drain the log pipe as a log shipper would.
        if let Some(mut stderr) = child.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        }
        (Server(child), port)
    };
    let (server, port) = start("info");
    let (quiet_server, quiet_port) = start("error");
    let pid = server.0.id();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(cert.pem().as_bytes()).expect("pem")).expect("root");
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .pool_max_idle_per_host(concurrency)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let base = format!("https://127.0.0.1:{port}");
        let quiet = format!("https://127.0.0.1:{quiet_port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        for url in [&base, &quiet] {
            while client.get(format!("{url}/healthz")).send().await.is_err() {
                assert!(Instant::now() < deadline, "server did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        // A realistic restored VM (v1alpha3: with the conversion copy), no group.
        let path = format!("{}/examples/vm-v1alpha3.json", env!("CARGO_MANIFEST_DIR"));
        let mut vm: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("example")).expect("json");
        vm["spec"].as_object_mut().expect("spec").remove("groupName");
        let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "load", "kind": {"group": "vmoperator.vmware.com", "version": "v1alpha3", "kind": "VirtualMachine"},
            "resource": {"group": "vmoperator.vmware.com", "version": "v1alpha3", "resource": "virtualmachines"},
            "name": "web-1", "namespace": "prod", "operation": "CREATE", "userInfo": {"username": "velero"},
            "object": vm, "dryRun": false}});
        let body = serde_json::to_vec(&review).expect("body");

        // Warm up both routes (connections, allocator).
        run_load(&client, &format!("{base}/noop"), &body, concurrency * 4, concurrency).await;
        run_load(&client, &format!("{base}/mutate"), &body, concurrency * 4, concurrency).await;
        run_load(&client, &format!("{quiet}/mutate"), &body, concurrency * 4, concurrency).await;
        let noop = run_load(&client, &format!("{base}/noop"), &body, total, concurrency).await;
        let mutate = run_load(&client, &format!("{base}/mutate"), &body, total, concurrency).await;
        let mutate_quiet = run_load(&client, &format!("{quiet}/mutate"), &body, total, concurrency).await;
        let rss = peak_rss_kib(pid).unwrap_or(0);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!("load run: {total} requests per route, concurrency {concurrency}, HTTPS on loopback, {} byte review", body.len());
        println!("  /noop    {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms", noop.rps, ms(noop.p50), ms(noop.p99));
        println!("  /mutate, logging as deployed (JSON INFO)  {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms", mutate.rps, ms(mutate.p50), ms(mutate.p99));
        println!("  /mutate, logging off (error level)       {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms", mutate_quiet.rps, ms(mutate_quiet.p50), ms(mutate_quiet.p99));
        println!(
            "  ratio mutate/noop, logging as deployed: throughput {:.3}, p50 {:.3}, p99 {:.3}",
            mutate.rps / noop.rps,
            ms(mutate.p50) / ms(noop.p50),
            ms(mutate.p99) / ms(noop.p99)
        );
        println!(
            "  ratio mutate/noop, logging off:         throughput {:.3}, p50 {:.3}, p99 {:.3}",
            mutate_quiet.rps / noop.rps,
            ms(mutate_quiet.p50) / ms(noop.p50),
            ms(mutate_quiet.p99) / ms(noop.p99)
        );
        println!("  server peak RSS: {:.1} MiB", rss as f64 / 1024.0);
    });
    drop(server);
    drop(quiet_server);
    let _ = std::fs::remove_dir_all(&dir);
}

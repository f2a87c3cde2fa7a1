//! Both ports' connections, on the real server: a kept-alive connection
//! outlives the header timeout (the API server reuses it for up to 90 s),
//! an idle one is closed after the idle timeout, a silent one after the
//! header timeout (on the metrics port too), one address gets its share of
//! connections and is answered 503 past it (the API server, known by its
//! address or its client certificate, is not counted), a body sent slowly
//! holds bytes, never a review slot, and the drain closes idle connections
//! early but never a request arriving.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;
use velero_vm_restore_webhook::settings::Cidr;
use velero_vm_restore_webhook::webhook::review::ReviewSettings;
use velero_vm_restore_webhook::webhook::server::Limits;

async fn server(limits: Limits) -> (TestServer, TestCa, SecretDir) {
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.serving();
    let secret = SecretDir::new(&cert, &key);
    let settings = ReviewSettings {
        group_wait_timeout: Duration::from_secs(5),
        timeout_margin: Duration::from_secs(1),
        ..ReviewSettings::default()
    };
    let server = TestServer::start(&secret, settings, limits).await;
    (server, ca, secret)
}

/// A TLS connection to the server, as the API server opens one.
async fn connect_tls(
    server: &TestServer,
    ca: &TestCa,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    try_connect_tls(server, ca, None)
        .await
        .expect("TLS handshake")
}

/// A TLS connection presenting `identity` (cert PEM, key PEM), if given:
/// the stream once a request's answer shows the handshake was accepted,
/// or why not.
async fn try_connect_tls(
    server: &TestServer,
    ca: &TestCa,
    identity: Option<&(String, String)>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|err| err.to_string())
}

/// One request on a kept-alive connection; the status, or the error.
async fn post<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    body: &Value,
) -> Result<u16, String> {
    post_to(stream, "/mutate?timeout=10s", body)
        .await
        .map(|answer| answer.status)
}

/// One request to `path`; the whole answer, or the error.
async fn post_to<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
    body: &Value,
) -> Result<Answer, String> {
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| err.to_string())?;
    read_answer(stream).await
}

/// An HTTP/1.1 answer: its status, its head (lowercased) and its body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn closes(&self) -> bool {
        self.head.contains("\r\nconnection: close\r\n")
    }
}

/// Reads one HTTP/1.1 response with a Content-Length.
async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Answer, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(_) => head.push(byte[0]),
            Err(err) => return Err(err.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let status: u16 = head[9..12].parse().map_err(|_| head.clone())?;
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|length| length.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|err| err.to_string())?;
    Ok(Answer {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Whether the peer has closed `stream` within `within` (a read returns 0 or
/// fails), without sending anything.
async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn short(limits: Limits) -> Limits {
    Limits {
        header_read_timeout: Duration::from_secs(1),
        ..limits
    }
}

#[tokio::test]
async fn a_kept_alive_connection_outlives_the_header_timeout_and_serves_the_next_request() {
    let (server, ca, _secret) = server(short(limits())).await;
    let mut stream = connect_tls(&server, &ca).await;
    let review = review_for(&example("pvc.json"), false);
    assert_eq!(post(&mut stream, &review).await, Ok(200));
    // Idle longer than the header timeout, as the API server's pool keeps it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        post(&mut stream, &review).await,
        Ok(200),
        "the same connection serves a request after an idle spell"
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let (server, ca, _secret) = server(Limits {
        idle_timeout: Duration::from_secs(2),
        ..short(limits())
    })
    .await;
    let mut stream = connect_tls(&server, &ca).await;
    assert_eq!(
        post(&mut stream, &review_for(&example("pvc.json"), false)).await,
        Ok(200)
    );
    let started = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_silent_connection_is_closed_on_both_ports_after_the_header_timeout() {
    let (server, ca, _secret) = server(short(limits())).await;
    let mut https = connect_tls(&server, &ca).await;
    let mut metrics = TcpStream::connect(server.metrics_addr).await.unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut https, Duration::from_secs(4)).await,
        "https"
    );
    assert!(
        closed_within(&mut metrics, Duration::from_secs(4)).await,
        "metrics"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A head sent a byte at a time, slower than the timeout, is cut too.
    let mut slow = TcpStream::connect(server.metrics_addr).await.unwrap();
    let head = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut cut = false;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        cut || closed_within(&mut slow, Duration::from_secs(2)).await,
        "a slow head"
    );
    let text = client_trusting(&[])
        .get(format!("http://{}/metrics", server.metrics_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("velero_vm_restore_webhook_connections_refused_total{port=\"metrics\",reason=\"slow_head\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn one_address_gets_its_share_of_connections_on_each_port_and_an_answer_past_it() {
    let (server, ca, _secret) = server(Limits {
        max_connections_per_source: 3,
        ..limits()
    })
    .await;
    let review = review_for(&example("pvc.json"), false);
    // HTTPS: three connections in use, the fourth answered 503 (not closed
    // in silence: the API server does not retry a POST on a dropped
    // connection, and client-go retries a 5xx with Retry-After).
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_tls(&server, &ca).await;
        assert_eq!(post(&mut stream, &review).await, Ok(200));
        open.push(stream);
    }
    let mut extra = connect_tls(&server, &ca).await;
    let answer = post_to(&mut extra, "/mutate?timeout=10s", &review)
        .await
        .expect("an answer, not a dropped connection");
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.closes(), "{answer:?}");
    assert!(answer.head.contains("\r\nretry-after: 1\r\n"), "{answer:?}");
    assert!(
        answer.body.contains("too many connections from 127.0.0.1")
            && answer.body.contains("at most 3 per source address")
            && answer.body.contains("--max-connections-per-source"),
        "{answer:?}"
    );
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    for stream in &mut open {
        assert_eq!(post(stream, &review).await, Ok(200), "the first three stay");
    }
    // The metrics port: the same.
    let mut metrics_open = Vec::new();
    for _ in 0..3 {
        metrics_open.push(TcpStream::connect(server.metrics_addr).await.unwrap());
    }
    let mut extra = TcpStream::connect(server.metrics_addr).await.unwrap();
    extra
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut extra).await.expect("an answer");
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.closes(), "{answer:?}");
    drop(metrics_open);
    // Once one closes, the address may connect again.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut stream = connect_tls(&server, &ca).await;
    assert_eq!(post(&mut stream, &review).await, Ok(200));
    let text = client_trusting(&[])
        .get(format!("http://{}/metrics", server.metrics_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("velero_vm_restore_webhook_connections_refused_total{port=\"https\",reason=\"per_source\"} 1"),
        "{text}"
    );
}

/// Holds `count` connections from 127.0.0.1, each with the head of a review
/// declaring `declared` bytes and none of them: each holds that much of its
/// source's byte share until the body's read timeout.
async fn hold_bytes(
    server: &TestServer,
    ca: &TestCa,
    count: usize,
    declared: usize,
) -> Vec<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut held = Vec::new();
    for _ in 0..count {
        let mut stream = connect_tls(server, ca).await;
        stream
            .write_all(format!("POST /mutate?timeout=10s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n{{").as_bytes())
            .await
            .unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    held
}

#[tokio::test]
async fn the_api_servers_addresses_are_not_capped_per_source() {
    // Its share of the byte budget: a quarter of 4 MiB, 1 MiB. Four bodies
    // of 256 KiB declared and not sent hold it all.
    let capped = Limits {
        max_connections_per_source: 6,
        ..limits()
    };
    let review = review_for(&example("pvc.json"), false);
    {
        let (server, ca, _secret) = server(capped.clone()).await;
        let _held = hold_bytes(&server, &ca, 4, 256 * 1024).await;
        let mut stream = connect_tls(&server, &ca).await;
        // Another source's would be served; this one waits for its share
        // until the deadline (2 s minus the 1 s margin).
        let answer = post_to(&mut stream, "/mutate?timeout=2s", &review).await;
        assert_eq!(answer.map(|answer| answer.status), Ok(503));
    }
    // Given as the API server's address: neither cap applies, only the
    // global ones.
    let (server, ca, _secret) = server(Limits {
        api_server_cidrs: vec![Cidr::parse("127.0.0.0/8").unwrap()],
        ..capped
    })
    .await;
    let _held = hold_bytes(&server, &ca, 4, 256 * 1024).await;
    let mut open = Vec::new();
    for _ in 0..10 {
        let mut stream = connect_tls(&server, &ca).await;
        assert_eq!(
            post_to(&mut stream, "/mutate?timeout=2s", &review)
                .await
                .map(|answer| answer.status),
            Ok(200)
        );
        open.push(stream);
    }
}

#[tokio::test]
async fn a_body_sent_slowly_holds_bytes_not_a_review_slot() {
    let (server, ca, _secret) = server(Limits {
        max_concurrent_reviews: 1,
        ..limits()
    })
    .await;
    // Headers and a few bytes of a declared body, then nothing.
    let mut slow = connect_tls(&server, &ca).await;
    slow.write_all(b"POST /mutate?timeout=10s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 4000\r\n\r\n{\"apiVersion\":")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The one review slot is still free for the API server's next review.
    let mut stream = connect_tls(&server, &ca).await;
    let started = Instant::now();
    assert_eq!(
        post(&mut stream, &review_for(&example("pvc.json"), false)).await,
        Ok(200)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn with_a_client_ca_only_clients_it_signed_are_answered() {
    let ca = TestCa::new("serving CA");
    let (cert, key) = ca.serving();
    let secret = SecretDir::new(&cert, &key);
    let clients = TestCa::new("API server's webhook client CA");
    let stranger = TestCa::new("another CA");
    let client_ca = secret.dir.path().join("client-ca.crt");
    std::fs::write(&client_ca, &clients.ca_pem).unwrap();
    let certificate = velero_vm_restore_webhook::webhook::tls::ReloadingCert::load_with_client_ca(
        &secret.cert_path(),
        &secret.key_path(),
        Some(&client_ca),
    )
    .unwrap();
    assert!(certificate.requires_client_certificates());
    let server = TestServer::start_serving(
        certificate,
        ReviewSettings::default(),
        Limits {
            max_connections_per_source: 2,
            ..limits()
        },
        velero_vm_restore_webhook::facts::given::StaticRestores::none(),
    )
    .await;
    let review = review_for(&example("pvc.json"), false);
    // The API server, with the certificate its kubeconfig names; its
    // connections are not counted against its address's share (2 here).
    let api_server = clients.client("kube-apiserver");
    let mut open = Vec::new();
    for _ in 0..5 {
        let mut stream = try_connect_tls(&server, &ca, Some(&api_server))
            .await
            .unwrap();
        assert_eq!(post(&mut stream, &review).await, Ok(200));
        open.push(stream);
    }
    // Anyone else: no certificate, or one another CA signed. TLS 1.3 reports
    // the refusal on the first read, so ask and look at the answer.
    for identity in [None, Some(stranger.client("a pod"))] {
        let answered = match try_connect_tls(&server, &ca, identity.as_ref()).await {
            Ok(mut stream) => post(&mut stream, &review).await,
            Err(err) => Err(err),
        };
        assert!(answered.is_err(), "{identity:?}: {answered:?}");
    }
}

#[tokio::test]
async fn the_drain_closes_idle_connections_early_and_answers_those_in_use() {
    // A drain delay of 4 s: connections idle for 2 s are closed.
    let (mut server, ca, _secret) = server(Limits {
        drain_delay: Duration::from_secs(4),
        ..limits()
    })
    .await;
    let review = review_for(&example("pvc.json"), false);
    // Kept alive by the API server's pool, unused: idle through the drain.
    let mut idle = connect_tls(&server, &ca).await;
    assert_eq!(post(&mut idle, &review).await, Ok(200));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // In use: answered just before the drain, used again during it.
    let mut in_use = connect_tls(&server, &ca).await;
    assert_eq!(post(&mut in_use, &review).await, Ok(200));
    let mut arriving = connect_tls(&server, &ca).await;
    assert_eq!(post(&mut arriving, &review).await, Ok(200));
    server.stop();
    let stopped = Instant::now();
    // The idle one is closed at once, long before the drain delay ends
    // (it used to stay open until then, and be closed as the API server
    // might be writing its next review onto it).
    assert!(
        closed_within(&mut idle, Duration::from_secs(1)).await,
        "an idle connection is closed early in the drain"
    );
    // The one in use is not closed under the API server: its next request
    // is answered, with `Connection: close`, and only then it ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = post_to(&mut in_use, "/mutate?timeout=10s", &review)
        .await
        .expect("a connection used within half the drain delay is still served");
    assert_eq!(answer.status, 200);
    assert!(answer.closes(), "{answer:?}");
    assert!(closed_within(&mut in_use, Duration::from_secs(1)).await);
    // A kept-alive connection whose next request's head began to arrive
    // within half the drain delay and is still arriving when the delay ends
    // is read and answered, not cut with the listener (hyper's graceful
    // shutdown closed a kept-alive connection whose head was incomplete).
    let body = review.to_string();
    let request = format!(
        "POST /mutate?timeout=10s HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (first, rest) = request.as_bytes().split_at(20);
    tokio::time::sleep_until((stopped + Duration::from_millis(1500)).into()).await;
    arriving.write_all(first).await.unwrap();
    tokio::time::sleep_until((stopped + Duration::from_millis(4500)).into()).await;
    arriving.write_all(rest).await.unwrap();
    let answer = read_answer(&mut arriving)
        .await
        .expect("a request arriving as the drain ends is answered");
    assert_eq!(answer.status, 200);
    assert!(answer.closes(), "{answer:?}");
    tokio::time::timeout(Duration::from_secs(10), &mut server.handle)
        .await
        .expect("the server stops once its connections have closed")
        .unwrap();
}

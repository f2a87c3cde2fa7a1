//! The request deadline and the resource limits, on the real server over TLS:
//! 408, 503, answers before the API server's deadline, shared and remembered
//! group waits, and a certificate reload that fails.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::{Value, json};

use common::*;
use velero_vm_restore_webhook::facts::{RestoreFacts, RestoreLookup};
use velero_vm_restore_webhook::webhook::review::ReviewSettings;
use velero_vm_restore_webhook::webhook::server::Limits;

fn settings(wait: Duration) -> ReviewSettings {
    ReviewSettings {
        group_wait_timeout: wait,
        timeout_margin: Duration::from_secs(1),
        ..ReviewSettings::default()
    }
}

async fn server_with(
    wait: Duration,
    limits: Limits,
    restores: Option<Arc<dyn RestoreFacts>>,
) -> (TestServer, reqwest::Client, SecretDir) {
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.serving();
    let secret = SecretDir::new(&cert, &key);
    let server = match restores {
        Some(restores) => {
            TestServer::start_with_restores(&secret, settings(wait), limits, restores).await
        }
        None => TestServer::start(&secret, settings(wait), limits).await,
    };
    (server, client_trusting(&[&ca.ca_pem]), secret)
}

async fn metrics_text(server: &TestServer) -> String {
    // Any client will do for plain HTTP; this one has a crypto provider.
    client_trusting(&[])
        .get(format!("http://{}/metrics", server.metrics_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn outcome_count(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("velero_vm_restore_webhook_reviews_total{")
                && line.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A Restore source whose API server never answers.
struct HangingRestores;

impl RestoreFacts for HangingRestores {
    fn is_synced(&self) -> bool {
        true
    }
    fn len(&self) -> usize {
        0
    }
    fn namespace(&self) -> &str {
        "velero"
    }
    fn lookup<'a>(&'a self, _label: &'a str) -> BoxFuture<'a, RestoreLookup> {
        Box::pin(futures::future::pending())
    }
}

#[tokio::test]
async fn a_hanging_restore_lookup_is_denied_inside_the_deadline() {
    let (server, client, _secret) = server_with(
        Duration::from_secs(20),
        limits(),
        Some(Arc::new(HangingRestores)),
    )
    .await;
    let started = Instant::now();
    let answer = post_review(
        &client,
        &server.url("/mutate?timeout=3s"),
        &review_for(&example("vm-v1alpha5.json"), false),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answer.status, 200);
    assert!(!answer.allowed(), "{}", answer.body);
    let message = answer.message();
    assert!(
        message.contains("could not read Velero Restore"),
        "{message}"
    );
    assert!(message.contains("deadline"), "{message}");
    // Deadline = 3s timeout - 1s margin; the API server would give up at 3s.
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(outcome_count(&metrics_text(&server).await, "deadline"), 1);
}

#[tokio::test]
async fn a_stalled_body_gets_408_at_the_deadline() {
    let (server, client, _secret) = server_with(Duration::from_secs(1), limits(), None).await;
    // Headers and half a body, then nothing.
    let stream = futures::stream::once(async {
        Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"{\"apiVersion\":",
        )))
    })
    .chain(futures::stream::pending());
    let started = Instant::now();
    let response = client
        .post(server.url("/mutate?timeout=3s"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(stream)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 408);
    // The request deadline (2s) cut the read, not the 5s read timeout.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let body: Value = response.json().await.unwrap();
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not received in time")
    );
    assert_eq!(outcome_count(&metrics_text(&server).await, "deadline"), 1);
}

use futures::StreamExt;

#[tokio::test]
async fn no_free_slot_gets_503_before_the_deadline() {
    let mut one_slot = limits();
    one_slot.max_concurrent_reviews = 1;
    let (server, client, _secret) = server_with(Duration::from_secs(6), one_slot, None).await;
    let waiting = spawn_review(
        &client,
        server.url("/mutate?timeout=10s"),
        example("vm-v1alpha5.json"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let response = client
        .post(server.url("/mutate?timeout=3s"))
        .json(&review_for(&example("pvc.json"), false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(outcome_count(&metrics_text(&server).await, "overloaded"), 1);
    server.groups.insert("prod", "web-tier");
    assert!(waiting.await.unwrap().allowed());
}

#[tokio::test]
async fn later_vms_for_a_group_that_timed_out_are_answered_at_once() {
    let (server, client, _secret) = server_with(Duration::from_secs(2), limits(), None).await;
    let body = review_for(&example("vm-v1alpha5.json"), false);
    let started = Instant::now();
    let first = post_review(&client, &server.url("/mutate?timeout=10s"), &body).await;
    assert!(!first.allowed());
    assert!(started.elapsed() >= Duration::from_secs(2));
    let started = Instant::now();
    let second = post_review(&client, &server.url("/mutate?timeout=10s"), &body).await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert!(!second.allowed());
    assert!(
        second.message().contains("did not wait again"),
        "{}",
        second.message()
    );
    // Once the group exists, VMs are admitted again.
    server.groups.insert("prod", "web-tier");
    let third = post_review(&client, &server.url("/mutate?timeout=10s"), &body).await;
    assert!(third.allowed(), "{}", third.body);
}

#[tokio::test]
async fn waits_for_a_missing_group_do_not_block_other_reviews_or_other_namespaces() {
    // Like an attacker (or a wrong restore order) holding waits: in each of
    // two namespaces, 8 VMs name a group that never comes.
    let (server, client, _secret) = server_with(Duration::from_secs(8), limits(), None).await;
    let mut holders = Vec::new();
    for namespace in ["attacker-a", "attacker-b"] {
        for i in 0..8 {
            let mut vm = example("vm-v1alpha5.json");
            vm["metadata"]["namespace"] = json!(namespace);
            vm["metadata"]["name"] = json!(format!("hold-{i}"));
            vm["spec"]["groupName"] = json!("never");
            let (client, url) = (client.clone(), server.url("/mutate?timeout=10s"));
            let mut review = review_for(&vm, false);
            review["request"]["namespace"] = json!(namespace);
            holders.push(tokio::spawn(async move {
                post_review(&client, &url, &review).await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = metrics_text(&server).await;
    // Two waits per namespace at most; the rest are answered at once.
    assert!(
        metrics.contains("velero_vm_restore_webhook_group_waits_in_progress 4"),
        "{metrics}"
    );
    // A legitimate VM whose group exists, and a PVC, are answered at once.
    server.groups.insert("prod", "web-tier");
    let started = Instant::now();
    let legit = post_review(
        &client,
        &server.url("/mutate?timeout=10s"),
        &review_for(&example("vm-v1alpha5.json"), false),
    )
    .await;
    let pvc = post_review(
        &client,
        &server.url("/mutate?timeout=10s"),
        &review_for(&example("pvc.json"), false),
    )
    .await;
    assert!(legit.allowed() && pvc.allowed());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // Another namespace's restore still gets its wait: its group comes a
    // second later and the VM is admitted.
    let mut restored = example("vm-v1alpha5.json");
    restored["metadata"]["namespace"] = json!("restoring");
    restored["spec"]["groupName"] = json!("late");
    let mut review = review_for(&restored, false);
    review["request"]["namespace"] = json!("restoring");
    let waiting = {
        let (client, url) = (client.clone(), server.url("/mutate?timeout=10s"));
        tokio::spawn(async move { post_review(&client, &url, &review).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.groups.insert("restoring", "late");
    let answer = waiting.await.unwrap();
    assert!(answer.allowed(), "{}", answer.body);
    let mut denied_at_once = 0;
    for holder in holders {
        let answer = holder.await.unwrap();
        assert!(!answer.allowed());
        if answer
            .message()
            .contains("were already waiting for groups, so this VM did not wait")
        {
            denied_at_once += 1;
        }
    }
    assert_eq!(
        denied_at_once, 12,
        "six of each namespace's eight did not wait"
    );
}

#[tokio::test]
async fn a_failed_certificate_reload_keeps_serving_the_old_certificate() {
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.serving();
    let mut secret = SecretDir::new(&cert, &key);
    let server = TestServer::start(&secret, settings(Duration::from_secs(1)), limits()).await;
    let client = client_trusting(&[&ca.ca_pem]);
    // A half-written rotation: a certificate without its key.
    let (other_cert, _) = ca.serving();
    secret.write(&other_cert, "not a key");
    let err = server.certificate.reload_if_changed().unwrap_err();
    assert!(
        err.to_string().contains("no usable PEM private key"),
        "{err}"
    );
    let answer = post_review(
        &client,
        &server.url("/mutate"),
        &review_for(&example("pvc.json"), false),
    )
    .await;
    assert!(answer.allowed());
    // The fixed files load on the next attempt.
    let (cert, key) = ca.serving();
    secret.write(&cert, &key);
    assert!(server.certificate.reload_if_changed().unwrap());
}

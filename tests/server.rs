//! The real server in-process, over real TLS, with a real HTTPS client.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::*;
use velero_vm_restore_webhook::settings::GroupPolicy;
use velero_vm_restore_webhook::webhook::review::ReviewSettings;

fn settings(wait: Duration) -> ReviewSettings {
    ReviewSettings {
        group_policy: GroupPolicy::WaitThenDeny,
        group_wait_timeout: wait,
        timeout_margin: Duration::from_secs(1),
        ..ReviewSettings::default()
    }
}

async fn started(wait: Duration) -> (TestServer, reqwest::Client, SecretDir, TestCa) {
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.serving();
    let secret = SecretDir::new(&cert, &key);
    let server = TestServer::start(&secret, settings(wait), limits()).await;
    let client = client_trusting(&[&ca.ca_pem]);
    (server, client, secret, ca)
}

#[tokio::test]
async fn review_round_trip_removes_documented_fields() {
    let (server, client, _secret, _ca) = started(Duration::from_secs(2)).await;
    server.groups.insert("prod", "web-tier");
    let object = example("vm-v1alpha3.json");
    let answer = post_review(&client, &server.url("/mutate"), &review_for(&object, false)).await;
    assert_eq!(answer.status, 200);
    assert!(answer.allowed(), "{}", answer.body);
    assert_eq!(answer.body["response"]["uid"], "test-uid");
    let patched = apply(&object, &answer.patch);
    assert!(patched.pointer("/spec/instanceUUID").is_none());
    assert!(patched.pointer("/spec/nextRestartTime").is_none());
    let annotations = patched["metadata"]["annotations"].as_object().unwrap();
    assert!(!annotations.contains_key("virtualmachine.vmoperator.vmware.com/first-boot-done"));
    assert!(!annotations.contains_key("vmoperator.vmware.com/bootstrap-hash-configspec"));
    assert_eq!(annotations["owner"], "team-web");
    // Not a copy: guest identity kept.
    assert_eq!(patched["spec"]["biosUUID"], object["spec"]["biosUUID"]);
    let copy: Value = serde_json::from_str(
        annotations["vmoperator.vmware.com/conversion"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(copy.get("status").is_none());
    assert!(copy.pointer("/spec/instanceUUID").is_none());
    let warnings = answer.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("removed spec.instanceUUID")),
        "{warnings:?}"
    );
    assert!(warnings.iter().all(|w| w.chars().count() < 120));

    // A second review of the patched object is a no-op (reinvocation safe).
    let again = post_review(
        &client,
        &server.url("/mutate"),
        &review_for(&patched, false),
    )
    .await;
    assert!(again.allowed());
    assert!(again.patch.is_none(), "{}", again.body);
}

#[tokio::test]
async fn out_of_scope_requests_are_allowed_unchanged() {
    let (server, client, _secret, _ca) = started(Duration::from_secs(2)).await;
    let mut object = example("vm-v1alpha5.json");
    object["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("velero.io/restore-name");
    let answer = post_review(&client, &server.url("/mutate"), &review_for(&object, false)).await;
    assert!(answer.allowed());
    assert!(answer.patch.is_none());
    assert!(answer.warnings().is_empty());

    // Anyone's update but Velero's is not ours.
    let mut update = review_for(&example("vm-v1alpha5.json"), false);
    update["request"]["operation"] = json!("UPDATE");
    update["request"]["oldObject"] = example("vm-v1alpha5.json");
    update["request"]["userInfo"]["username"] =
        json!("system:serviceaccount:vmware-system-vmop:vmware-system-vmop");
    let answer = post_review(&client, &server.url("/mutate"), &update).await;
    assert!(answer.allowed());
    assert!(answer.patch.is_none());
    // Velero's update that changes nothing cluster-bound: no patch either.
    update["request"]["userInfo"]["username"] = json!("system:serviceaccount:velero:velero");
    let answer = post_review(&client, &server.url("/mutate"), &update).await;
    assert!(answer.allowed());
    assert!(answer.patch.is_none());
    // Velero's status write: what is stored stays.
    let mut status = update.clone();
    status["request"]["subResource"] = json!("status");
    status["request"]["object"]["status"] = json!({"uniqueID": "vm-1041"});
    let answer = post_review(&client, &server.url("/mutate"), &status).await;
    assert!(answer.allowed());
    let patched = apply(&status["request"]["object"], &answer.patch);
    assert!(patched.get("status").is_none(), "{patched}");
}

#[tokio::test]
async fn malformed_input_gets_clear_json_errors() {
    let (server, client, _secret, _ca) = started(Duration::from_secs(2)).await;
    let url = server.url("/mutate");
    let response = client.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{body}"
    );

    let v1beta1 =
        json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}});
    let answer = post_review(&client, &url, &v1beta1).await;
    assert_eq!(answer.status, 400);
    assert!(answer.message().contains("admissionReviewVersions"));

    // A wrong type inside an in-scope object: a denial naming the field.
    let mut object = example("vm-v1alpha5.json");
    object["spec"]["instanceUUID"] = json!(42);
    let answer = post_review(&client, &url, &review_for(&object, false)).await;
    assert_eq!(answer.status, 200);
    assert!(!answer.allowed());
    assert!(answer.patch.is_none());
    assert!(
        answer
            .message()
            .contains("spec.instanceUUID must be a string"),
        "{}",
        answer.message()
    );
}

#[tokio::test]
async fn body_limit_is_enforced() {
    let (server, client, _secret, _ca) = started(Duration::from_secs(2)).await;
    let big = vec![b' '; 300 * 1024];
    let response = client
        .post(server.url("/mutate"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("exceeds")
    );
    // The server still serves after rejecting.
    let health = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test]
async fn group_created_during_the_wait_is_admitted() {
    let (server, client, _secret, _ca) = started(Duration::from_secs(10)).await;
    let groups = server.groups.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        groups.insert("prod", "web-tier");
    });
    let started_at = Instant::now();
    let object = example("vm-v1alpha5.json");
    let answer = post_review(
        &client,
        &server.url("/mutate?timeout=10s"),
        &review_for(&object, false),
    )
    .await;
    let took = started_at.elapsed();
    assert!(answer.allowed(), "{}", answer.body);
    assert!(
        took >= Duration::from_millis(600),
        "answered before the group existed: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "not woken by the cache event: {took:?}"
    );
}

#[tokio::test]
async fn group_never_created_is_denied_at_the_bound() {
    let (server, client, _secret, _ca) = started(Duration::from_secs(20)).await;
    let object = example("vm-v1alpha5.json");
    let started_at = Instant::now();
    // The API server's timeout (4s) minus the margin (1s) bounds the wait, and
    // the answer must arrive before the API server gives up.
    let answer = post_review(
        &client,
        &server.url("/mutate?timeout=4s"),
        &review_for(&object, false),
    )
    .await;
    let took = started_at.elapsed();
    assert!(!answer.allowed());
    let message = answer.message();
    assert!(message.contains("VirtualMachine prod/web-1"), "{message}");
    assert!(message.contains("\"web-tier\""), "{message}");
    assert!(message.contains("Restore the group first"), "{message}");
    // The wait ends early enough to confirm live and answer inside the
    // request's deadline (timeout minus margin: 3s).
    assert!(
        took >= Duration::from_millis(2000) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // A dry run does not wait.
    let started_at = Instant::now();
    let answer = post_review(
        &client,
        &server.url("/mutate?timeout=4s"),
        &review_for(&object, true),
    )
    .await;
    assert!(!answer.allowed());
    assert!(started_at.elapsed() < Duration::from_millis(1000));
}

#[tokio::test]
async fn allow_with_warning_policy_admits() {
    let ca = TestCa::new("ca");
    let (cert, key) = ca.serving();
    let secret = SecretDir::new(&cert, &key);
    let mut review_settings = settings(Duration::from_secs(5));
    review_settings.group_policy = GroupPolicy::AllowWithWarning;
    let server = TestServer::start(&secret, review_settings, limits()).await;
    let client = client_trusting(&[&ca.ca_pem]);
    let started_at = Instant::now();
    let answer = post_review(
        &client,
        &server.url("/mutate"),
        &review_for(&example("vm-v1alpha5.json"), false),
    )
    .await;
    assert!(answer.allowed());
    assert!(answer.patch.is_some());
    assert!(answer.warnings().iter().any(|w| w.contains("web-tier")));
    assert!(started_at.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn certificate_rotation_while_requests_run() {
    let old_ca = TestCa::new("old CA");
    let new_ca = TestCa::new("new CA");
    let (cert, key) = old_ca.serving();
    let mut secret = SecretDir::new(&cert, &key);
    let server = TestServer::start(&secret, settings(Duration::from_secs(1)), limits()).await;
    tokio::spawn(
        server
            .certificate
            .clone()
            .watch(Duration::from_millis(100), None),
    );
    let both = client_trusting(&[&old_ca.ca_pem, &new_ca.ca_pem]);
    let new_only = client_trusting(&[&new_ca.ca_pem]);

    // Requests run continuously across the rotation.
    let url = server.url("/mutate");
    let mut group_object = example("vmgroup-v1alpha5.json");
    group_object["spec"]
        .as_object_mut()
        .unwrap()
        .remove("groupName");
    let body = review_for(&group_object, false);
    let load = tokio::spawn({
        let (url, body, both) = (url.clone(), body.clone(), both.clone());
        async move {
            let mut answered = 0;
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                let answer = post_review(&both, &url, &body).await;
                assert!(answer.allowed());
                answered += 1;
            }
            answered
        }
    });
    assert!(
        new_only.get(server.url("/healthz")).send().await.is_err(),
        "new CA trusted before rotation"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cert, key) = new_ca.serving();
    secret.write(&cert, &key); // kubelet-style ..data symlink swap
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if new_only.get(server.url("/healthz")).send().await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answered = load.await.expect("no request failed during rotation");
    assert!(answered > 5, "only {answered} requests during rotation");
}

#[tokio::test]
async fn during_the_drain_delay_answers_close_their_connection() {
    // The API server keeps connections to a replica alive; once draining,
    // each answer tells it to drop the connection instead of reusing one the
    // drain will close (a POST racing that close fails unretried).
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.serving();
    let secret = SecretDir::new(&cert, &key);
    let mut limits = limits();
    limits.drain_delay = Duration::from_secs(3);
    let mut server = TestServer::start(&secret, settings(Duration::from_secs(1)), limits).await;
    let client = client_trusting(&[&ca.ca_pem]);
    let body = review_for(&example("pvc.json"), false);
    let serving = client
        .post(server.url("/mutate"))
        .json(&body)
        .send()
        .await
        .expect("review before the drain");
    assert_eq!(serving.status(), 200);
    assert!(serving.headers().get("connection").is_none());
    server.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let draining = client
        .post(server.url("/mutate"))
        .json(&body)
        .send()
        .await
        .expect("still served during the drain delay");
    assert_eq!(draining.status(), 200);
    assert_eq!(
        draining.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    tokio::time::timeout(Duration::from_secs(10), &mut server.handle)
        .await
        .expect("server stopped after draining")
        .unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_reviews() {
    let (mut server, client, _secret, _ca) = started(Duration::from_secs(10)).await;
    let in_flight = spawn_review(
        &client,
        server.url("/mutate?timeout=10s"),
        example("vm-v1alpha5.json"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Stopped accepting: a new connection fails.
    let fresh = client_trusting(&[&_ca.ca_pem]);
    assert!(fresh.get(server.url("/healthz")).send().await.is_err());
    // The in-flight review still completes when its group appears.
    server.groups.insert("prod", "web-tier");
    let answer = in_flight.await.unwrap();
    assert!(answer.allowed(), "{}", answer.body);
    tokio::time::timeout(Duration::from_secs(5), &mut server.handle)
        .await
        .expect("server stopped after draining")
        .unwrap();
}

#[tokio::test]
async fn metrics_and_probes() {
    let (server, client, _secret, _ca) = started(Duration::from_secs(1)).await;
    server.groups.insert("prod", "web-tier");
    let answer = post_review(
        &client,
        &server.url("/mutate"),
        &review_for(&example("pvc.json"), false),
    )
    .await;
    assert!(answer.allowed());
    let ready = client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let text = client
        .get(format!("http://{}/metrics", server.metrics_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("velero_vm_restore_webhook_reviews_total{kind=\"PersistentVolumeClaim\",operation=\"CREATE\",outcome=\"allowed\",patched=\"true\"} 1"), "{text}");
    assert!(text.contains("velero_vm_restore_webhook_changes_total{kind=\"PersistentVolumeClaim\",rule=\"pvc-volume-health\"} 2"), "{text}");
    assert!(
        text.contains("velero_vm_restore_webhook_group_cache_objects 1"),
        "{text}"
    );
    // The serving certificate's end, read from the certificate it serves.
    let not_after: i64 = text
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                "velero_vm_restore_webhook_serving_certificate_expiry_timestamp_seconds ",
            )
        })
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no certificate end in {text}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(not_after > now, "{not_after}");
    assert_eq!(not_after, server.certificate.not_after());
}

#[tokio::test]
async fn reinvocation_keeps_what_vm_operator_set_after_us() {
    use velero_vm_restore_webhook::facts::RestoreInfo;
    use velero_vm_restore_webhook::facts::given::StaticRestores;
    let ca = TestCa::new("test CA");
    let (cert, key) = ca.serving();
    let secret = SecretDir::new(&cert, &key);
    let restore = RestoreInfo {
        name: "nightly-20261125".into(),
        uid: Some("uid-1".into()),
        ..Default::default()
    };
    let server = TestServer::start_with_restores(
        &secret,
        settings(Duration::from_secs(2)),
        limits(),
        StaticRestores::found(restore),
    )
    .await;
    let client = client_trusting(&[&ca.ca_pem]);
    server.groups.insert("prod", "web-tier");
    let object = example("vm-v1alpha5.json");
    let first = post_review(&client, &server.url("/mutate"), &review_for(&object, false)).await;
    let mut patched = apply(&object, &first.patch);
    assert!(patched.pointer("/spec/instanceUUID").is_none());
    assert_eq!(
        patched["metadata"]["annotations"]["velero-vm-restore-webhook/reviewed-for-restore"],
        "nightly-20261125/uid-1"
    );
    // Stand-in for VM Operator's mutating webhook, which runs after ours and
    // assigns a fresh instance UUID; reinvocationPolicy IfNeeded calls us again.
    patched["spec"]["instanceUUID"] = json!("1b4e28ba-2fa1-11d2-883f-0016d3cca427");
    let again = post_review(
        &client,
        &server.url("/mutate"),
        &review_for(&patched, false),
    )
    .await;
    assert!(again.allowed());
    assert!(
        again.patch.is_none(),
        "the new UUID must survive: {}",
        again.body
    );

    // A later restore of a backup of this VM is cleaned again.
    let mut restored_again = patched.clone();
    restored_again["metadata"]["labels"]["velero.io/restore-name"] = json!("next-restore");
    let answer = post_review(
        &client,
        &server.url("/mutate"),
        &review_for(&restored_again, false),
    )
    .await;
    let cleaned = apply(&restored_again, &answer.patch);
    assert!(cleaned.pointer("/spec/instanceUUID").is_none());
    assert_eq!(
        cleaned["metadata"]["annotations"]["velero-vm-restore-webhook/reviewed-for-restore"],
        "next-restore/uid-1"
    );
}

/// Issue 33, finding 8: without a Restore (labelled by hand) the marker
/// says when it was written: the reinvocation of the same create keeps VM
/// Operator's fresh instanceUUID, while the same object come back from a
/// backup with an old marker, or a bare one, is cleaned again.
#[tokio::test]
async fn without_a_restore_only_this_admissions_marker_counts() {
    let (server, client, _secret, _ca) = started(Duration::from_secs(2)).await;
    server.groups.insert("prod", "web-tier");
    let marker = "velero-vm-restore-webhook/reviewed-for-restore";
    let object = example("vm-v1alpha5.json");
    let first = post_review(&client, &server.url("/mutate"), &review_for(&object, false)).await;
    let patched = apply(&object, &first.patch);
    let written = patched["metadata"]["annotations"][marker]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        written.starts_with("nightly-20261125/unread-at-"),
        "{written}"
    );
    // The reinvocation: VM Operator's webhook set a fresh instanceUUID.
    let mut defaulted = patched.clone();
    defaulted["spec"]["instanceUUID"] = json!("1b4e28ba-2fa1-11d2-883f-0016d3cca427");
    let again = post_review(
        &client,
        &server.url("/mutate"),
        &review_for(&defaulted, false),
    )
    .await;
    assert!(again.allowed());
    assert!(again.patch.is_none(), "{}", again.body);
    // From a backup: a bare marker, or one written a day ago.
    for old in ["nightly-20261125", "nightly-20261125/unread-at-1000"] {
        let mut backed_up = defaulted.clone();
        backed_up["metadata"]["annotations"][marker] = json!(old);
        let again = post_review(
            &client,
            &server.url("/mutate"),
            &review_for(&backed_up, false),
        )
        .await;
        let cleaned = apply(&backed_up, &again.patch);
        assert!(cleaned.pointer("/spec/instanceUUID").is_none(), "{old}");
        assert!(
            cleaned["metadata"]["annotations"][marker]
                .as_str()
                .unwrap()
                .starts_with("nightly-20261125/unread-at-"),
            "{old}"
        );
    }
}

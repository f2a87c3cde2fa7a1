//! Fuzzes the whole review handler: any body must produce a response or a
//! clear error, never a panic, and an allowed response's patch must apply to
//! the object it was computed for. The one-pass parse must agree with the
//! general one on every body it accepts. An input starting with `?` carries the
//! URL's query string on its first line (the API server's `?timeout=`),
//! which fixes the request's deadline.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

use velero_vm_restore_webhook::deadline::{Deadline, api_timeout_from_query};
use velero_vm_restore_webhook::facts::given::{StaticGroups, StaticRestores};
use velero_vm_restore_webhook::webhook::review::{ReviewSettings, Reviewer};

struct Harness {
    runtime: tokio::runtime::Runtime,
    reviewer: Reviewer,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| Harness {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime"),
        reviewer: Reviewer::new(
            StaticGroups::new([("prod", "web-tier")]),
            StaticRestores::none(),
            ReviewSettings {
                group_wait_timeout: std::time::Duration::ZERO,
                ..ReviewSettings::default()
            },
            None,
        ),
    })
}

fuzz_target!(|data: &[u8]| {
    let harness = harness();
    // The one-pass parse of a well-formed review must return exactly what the
    // general parse returns.
    if let Err(divergence) = velero_vm_restore_webhook::webhook::admission::one_pass_parse_agrees(data) {
        panic!("{divergence}");
    }
    let (query, data) = match data.strip_prefix(b"?") {
        Some(rest) => match rest.iter().position(|&byte| byte == b'\n') {
            Some(end) => (std::str::from_utf8(&rest[..end]).ok(), &rest[end + 1..]),
            None => (std::str::from_utf8(rest).ok(), &[][..]),
        },
        None => (None, data),
    };
    let reviewed = harness.runtime.block_on(async {
        let deadline = Deadline::for_request(
            tokio::time::Instant::now(),
            query.and_then(api_timeout_from_query),
            std::time::Duration::from_secs(2),
        );
        harness.reviewer.review(data, deadline).await
    });
    let Ok(reviewed) = reviewed else {
        return;
    };
    // What goes on the wire always encodes, and carries the same patch.
    let wire: Value = serde_json::to_value(
        velero_vm_restore_webhook::webhook::admission::WireReview(&reviewed.review),
    )
    .expect("the response encodes");
    if let Some(encoded) = wire.pointer("/response/patch") {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("patch is a string"))
            .expect("patch is base64");
        let kept = reviewed.review.response.as_ref().and_then(|r| r.patch.as_ref());
        assert_eq!(Some(&decoded), kept, "the wire patch is the response's patch");
    }
    let response = reviewed
        .review
        .response
        .expect("a review always has a response");
    let Some(patch) = response.patch else { return };
    assert!(response.allowed, "a denial must not carry a patch");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("patch is JSON Patch");
    let body: Value = serde_json::from_slice(data).expect("reviewed bodies are JSON");
    let mut object = body
        .pointer("/request/object")
        .cloned()
        .expect("patched reviews have an object");
    json_patch::patch(&mut object, &patch).expect("the patch applies to the reviewed object");
});

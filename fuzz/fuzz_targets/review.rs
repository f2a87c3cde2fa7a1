//! Fuzzes the whole review handler: any body must produce a response or a
//! clear error, never a panic, and an allowed response's patch must apply to
//! the object it was computed for.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

use velero_vm_restore_webhook::groups::GroupCache;
use velero_vm_restore_webhook::restores::RestoreCache;
use velero_vm_restore_webhook::review::{ReviewSettings, Reviewer};

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
        reviewer: Reviewer {
            groups: GroupCache::new_static([("prod", "web-tier")]),
            restores: RestoreCache::new_static(None),
            settings: ReviewSettings {
                group_wait_timeout: std::time::Duration::ZERO,
                ..ReviewSettings::default()
            },
            metrics: None,
        },
    })
}

fuzz_target!(|data: &[u8]| {
    let harness = harness();
    let Ok(reviewed) = harness
        .runtime
        .block_on(harness.reviewer.review(data, None))
    else {
        return;
    };
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

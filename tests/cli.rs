//! The `review` and `rules` commands, run as a user would.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_velero-vm-restore-webhook"))
}

fn example(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("wait")
}

#[test]
fn review_prints_a_response_with_warnings() {
    let out = run(
        &[
            "review",
            "--group",
            "prod/web-tier",
            &example("admission-review-vm.json"),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let review: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(
        review["response"]["uid"],
        "0b2bd3a7-6d0c-4a4e-9f3a-1c1d2e3f4a5b"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Warning: removed spec.instanceUUID"),
        "{stderr}"
    );
}

#[test]
fn review_patched_from_stdin() {
    let input = std::fs::read_to_string(example("vm-v1alpha6.json")).unwrap();
    let out = run(
        &["review", "--patched", "--group", "prod/web-tier", "-"],
        Some(&input),
    );
    assert!(out.status.success());
    let patched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(patched.pointer("/spec/instanceUUID").is_none());
    assert!(patched.pointer("/spec/biosUUID").is_some());
    // The label `review` adds to a bare object is not in the output.
    assert_eq!(
        patched["metadata"]["labels"]["velero.io/restore-name"],
        "nightly-20261125"
    );

    let out = run(
        &[
            "review",
            "--patched",
            "--new-identity",
            "--group",
            "prod/web-tier",
            "-",
        ],
        Some(&input),
    );
    let patched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(patched.pointer("/spec/biosUUID").is_none());
    assert!(
        patched
            .pointer("/spec/network/interfaces/0/macAddr")
            .is_none()
    );
}

#[test]
fn the_marker_is_set_unless_disabled() {
    let input = std::fs::read_to_string(example("pvc.json")).unwrap();
    let marker = "velero-vm-restore-webhook/reviewed-for-restore";
    let out = run(&["review", "--patched", "-"], Some(&input));
    let patched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        patched["metadata"]["annotations"][marker],
        "nightly-20261125"
    );
    let out = run(
        &[
            "review",
            "--patched",
            "--disable-rule",
            "reviewed-marker",
            "-",
        ],
        Some(&input),
    );
    let patched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(patched["metadata"]["annotations"].get(marker).is_none());
}

#[test]
fn review_reports_a_missing_group_as_denied() {
    let out = run(&["review", &example("vm-v1alpha5.json")], None);
    assert!(out.status.success());
    let review: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(review["response"]["allowed"], false);
    let message = review["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("web-tier") && message.contains("prod/web-1"),
        "{message}"
    );
}

#[test]
fn review_rejects_bad_input() {
    let out = run(&["review", "-"], Some("{oops"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not JSON"));
    let out = run(
        &["review", "--group", "no-slash", &example("pvc.json")],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let out = run(
        &[
            "review",
            "--disable-rule",
            "no-such-rule",
            &example("pvc.json"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("known rules"));
}

#[test]
fn readme_rule_table_matches_the_code() {
    let out = run(&["rules"], None);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let readme =
        std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    assert!(
        readme.contains(&table),
        "README's rule table differs from `velero-vm-restore-webhook rules`:\n{table}"
    );
}

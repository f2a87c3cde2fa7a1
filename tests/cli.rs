//! The `review` and `rules` commands, run as a user would.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;

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
        stderr.contains("VirtualMachine prod/web-1: 17 changes\n")
            && stderr
                .contains("\n  removed spec.instanceUUID (identity of the original vSphere VM)\n"),
        "{stderr}"
    );
    // The patch is base64, as the admission API documents it.
    let patch = review["response"]["patch"].as_str().expect("base64 string");
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    let ops: Value = serde_json::from_slice(&decoded).unwrap();
    assert!(
        ops.as_array()
            .unwrap()
            .iter()
            .any(|op| op["path"] == "/spec/instanceUUID")
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
    // No Restore behind the label here: the marker says when it was
    // written, and counts only within the same admission.
    let written = patched["metadata"]["annotations"][marker]
        .as_str()
        .unwrap()
        .to_string();
    let at: u64 = written
        .strip_prefix("nightly-20261125/unread-at-")
        .and_then(|at| at.parse().ok())
        .unwrap_or_else(|| panic!("{written}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(at <= now && now - at < 3600, "{written}");
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither JSON nor YAML"));
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
fn docs_rule_table_matches_the_code() {
    let out = run(&["rules"], None);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let rules_page =
        std::fs::read_to_string(format!("{}/docs/rules.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    assert!(
        rules_page.contains(&table),
        "docs/rules.md's rule table differs from `velero-vm-restore-webhook rules`:\n{table}"
    );
}

#[test]
fn chart_schema_allows_exactly_the_known_rule_ids() {
    let out = run(&["rules"], None);
    let ids: std::collections::BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            line.strip_prefix("| `")?
                .split('`')
                .next()
                .map(String::from)
        })
        .collect();
    assert!(
        ids.contains("vm-instance-uuid") && ids.len() > 10,
        "{ids:?}"
    );
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/charts/velero-vm-restore-webhook/values.schema.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    let allowed: std::collections::BTreeSet<String> = schema
        .pointer("/properties/server/properties/disabledRules/items/enum")
        .and_then(serde_json::Value::as_array)
        .expect("disabledRules is an enum")
        .iter()
        .filter_map(|id| id.as_str().map(String::from))
        .collect();
    assert_eq!(allowed, ids, "values.schema.json disabledRules vs `rules`");
}

#[test]
fn review_reads_yaml_lists_and_summarizes_each_object() {
    let vm: Value =
        serde_json::from_str(&std::fs::read_to_string(example("vm-v1alpha5.json")).unwrap())
            .unwrap();
    let pvc: Value =
        serde_json::from_str(&std::fs::read_to_string(example("pvc.json")).unwrap()).unwrap();
    let configmap = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "prod"}});
    let list =
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [vm, pvc, configmap]});
    let yaml = serde_yaml_ng::to_string(&list).unwrap();
    let out = run(
        &["review", "--group", "prod/web-tier", "-o", "yaml", "-"],
        Some(&yaml),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    let items = printed["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items[0].pointer("/spec/instanceUUID").is_none());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("VirtualMachine prod/web-1: "), "{stderr}");
    assert!(
        stderr.contains("PersistentVolumeClaim prod/web-1-data: "),
        "{stderr}"
    );
    assert!(
        stderr.contains("ConfigMap prod/c: unchanged: a kind this webhook does not handle"),
        "{stderr}"
    );
}

#[test]
fn review_says_why_nothing_happened() {
    let mut pvc: Value =
        serde_json::from_str(&std::fs::read_to_string(example("pvc.json")).unwrap()).unwrap();
    pvc["metadata"]["labels"].as_object_mut().unwrap().clear();
    let bare = serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u", "kind": {"group": "", "version": "v1", "kind": "PersistentVolumeClaim"},
        "resource": {"group": "", "version": "v1", "resource": "persistentvolumeclaims"},
        "name": "p", "namespace": "prod", "operation": "CREATE", "userInfo": {"username": "x"}, "object": pvc}});
    let out = run(&["review", "-o", "summary", "-"], Some(&bare.to_string()));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("unchanged: not restored by Velero (no velero.io/restore-name label)")
    );
    let mut delete = bare.clone();
    delete["request"]["operation"] = serde_json::json!("DELETE");
    delete["request"]["oldObject"] = delete["request"]["object"].take();
    let out = run(&["review", "-o", "json", "-"], Some(&delete.to_string()));
    assert!(out.status.success());
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(printed, Value::Null, "a DELETE prints no `null` object");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("PersistentVolumeClaim prod/p: unchanged: not a CREATE")
    );
}

#[test]
fn exit_codes_are_documented_ones() {
    let denied = example("vm-v1alpha5.json");
    assert_eq!(
        run(&["review", "-o", "summary", &denied], None)
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        run(
            &["review", "--fail-on-deny", "-o", "summary", &denied],
            None
        )
        .status
        .code(),
        Some(1)
    );
    let admitted = [
        "review",
        "--fail-on-deny",
        "--group",
        "prod/web-tier",
        "-o",
        "summary",
        &denied,
    ];
    assert_eq!(run(&admitted, None).status.code(), Some(0));
    assert_eq!(
        run(&["review", "-"], Some("kind: [unclosed")).status.code(),
        Some(2)
    );
    assert_eq!(
        run(&["review", "/no/such/file"], None).status.code(),
        Some(2)
    );
}

#[test]
fn offline_summaries_are_not_cut() {
    let out = run(&["review", "-o", "summary", &example("pvc.json")], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("(keeps VM Operator's new defaults on reinvocation)"),
        "{stdout}"
    );
    assert!(!stdout.contains('…'), "{stdout}");
}

#[test]
fn serve_without_a_cluster_is_a_usable_trial() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    let dir = std::env::temp_dir().join(format!("vmrw-cli-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = common::TestCa::new("cli test CA");
    let (cert_pem, key_pem) = ca.serving();
    std::fs::write(dir.join("tls.crt"), cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), key_pem).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = bin()
        .args([
            "--log-format",
            "text",
            "serve",
            "--no-kube",
            "--group",
            "prod/web-tier",
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
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The startup line names the groups and the real policy, without colours
    // (stderr is a pipe here).
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(
        first.contains("prod/web-tier") && first.contains("wait for it, then are denied"),
        "{first}"
    );
    assert!(!first.contains('\u{1b}'), "ANSI codes in a pipe: {first:?}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answer: Value = runtime.block_on(async {
        let client = common::client_trusting(&[&ca.ca_pem]);
        let url = format!("https://127.0.0.1:{port}/mutate?timeout=10s");
        let deadline = Instant::now() + Duration::from_secs(20);
        let review = std::fs::read_to_string(example("admission-review-vm.json")).unwrap();
        loop {
            match client.post(&url).body(review.clone()).send().await {
                Ok(response) => break response.json().await.unwrap(),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(err) => panic!("server never answered: {err}"),
            }
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    // The group given with --group exists: admitted, not held or denied.
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let warnings = answer["response"]["warnings"].to_string();
    assert!(
        warnings.contains("not found in namespace velero"),
        "{warnings}"
    );
}

#[test]
fn references_count_as_missing_unless_given_with_exists() {
    let mut vm: Value =
        serde_json::from_str(&std::fs::read_to_string(example("vm-v1alpha5.json")).unwrap())
            .unwrap();
    vm["metadata"]["labels"]["topology.kubernetes.io/zone"] = serde_json::json!("zone-a");
    vm["spec"]["class"] =
        serde_json::json!({"kind": "VirtualMachineClassInstance", "name": "small-1"});
    let input = vm.to_string();
    let out = run(
        &["review", "--group", "prod/web-tier", "-o", "json", "-"],
        Some(&input),
    );
    let patched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(patched.pointer("/spec/class").is_none());
    assert!(
        patched["metadata"]["labels"]
            .get("topology.kubernetes.io/zone")
            .is_none()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "removed spec.class (no active instance of this class by that name in the target)"
        ),
        "{stderr}"
    );
    let out = run(
        &[
            "review",
            "--group",
            "prod/web-tier",
            "--exists",
            "zone/prod/zone-a",
            "--exists",
            "classinstance/prod/small-1",
            "-o",
            "json",
            "-",
        ],
        Some(&input),
    );
    let patched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(patched["spec"]["class"]["name"], "small-1");
    assert_eq!(
        patched["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "zone-a"
    );
    let bad = run(&["review", "--exists", "zone/only-one", "-"], Some(&input));
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be KIND/NAMESPACE/NAME"));
    let bad = run(
        &["review", "--exists", "network/prod/vm-default", "-"],
        Some(&input),
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be network/NAMESPACE/KIND/NAME"));

    // A namespace given storage classes: one it is not assigned denies the
    // VM with the entry for Velero's ConfigMap; its own is admitted.
    let storage = vm["spec"]["storageClass"].as_str().unwrap().to_string();
    let review_with = |assigned: &str| {
        run(
            &[
                "review",
                "--group",
                "prod/web-tier",
                "--exists",
                &format!("storageclass/prod/{assigned}"),
                "--fail-on-deny",
                "-o",
                "json",
                "-",
            ],
            Some(&input),
        )
    };
    let denied = review_with("site-b-gold");
    assert_eq!(denied.status.code(), Some(1));
    let said = String::from_utf8_lossy(&denied.stderr).to_string()
        + &String::from_utf8_lossy(&denied.stdout);
    assert!(
        said.contains(&format!(
            "add `{storage}: site-b-gold` to Velero's change-storage-class ConfigMap"
        )),
        "{said}"
    );
    let admitted = review_with(&storage);
    assert_eq!(
        admitted.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&admitted.stderr)
    );

    // Images given: an image name that resolves to none of them denies the
    // VM, naming the images and the entry to add; a cluster image of that
    // name admits it.
    let image = vm["spec"]["imageName"].as_str().unwrap().to_string();
    let review_with_image = |given: &str| {
        run(
            &[
                "review",
                "--group",
                "prod/web-tier",
                "--exists",
                given,
                "--fail-on-deny",
                "-o",
                "json",
                "-",
            ],
            Some(&input),
        )
    };
    let denied = review_with_image("image/prod/vmi-5b1e");
    assert_eq!(denied.status.code(), Some(1));
    let said = String::from_utf8_lossy(&denied.stderr).to_string()
        + &String::from_utf8_lossy(&denied.stdout);
    assert!(
        said.contains(&format!("add `{image}: vmi-5b1e` under key images")),
        "{said}"
    );
    let admitted = review_with_image(&format!("clusterimage/{image}"));
    assert_eq!(
        admitted.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&admitted.stderr)
    );
}

#[test]
fn one_denial_names_every_missing_reference_and_the_summary_gathers_the_entries() {
    let out = run(
        &[
            "review",
            "--group",
            "prod/web-tier",
            "--exists",
            "image/prod/vmi-5b1e",
            "--exists",
            "class/prod/site-b-small",
            "--exists",
            "storageclass/prod/site-b-gold",
            "--exists",
            "storageclass/prod/site-b-silver",
            "--exists",
            "network/prod/SubnetSet/site-b-subnets",
            "-o",
            "summary",
            &example("vm-v1alpha5.json"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let denial = stdout
        .lines()
        .find(|line| line.contains("DENIED"))
        .unwrap_or_default();
    for clause in [
        "spec.imageName \"vmi-0a0044d7c690bcbea\" resolves to no VirtualMachineImage",
        "; and spec.className \"best-effort-small\" names no VirtualMachineClass",
        "; and spec.storageClass \"wcpglobal-storage-profile\" is not assigned",
        "; and an interface's network \"SubnetSet/primary\" (spec.network.interfaces[].network) is not in namespace prod",
    ] {
        assert!(denial.contains(clause), "{clause}: {stdout}");
    }
    // The entries once each, by where they go.
    let expected = "Mapping entries that would admit them (the target's first choice; each denial lists the others), then restore again:\n\
        \x20 Velero's change-storage-class ConfigMap (in namespace velero, labelled velero.io/plugin-config=\"\" and velero.io/change-storage-class=RestoreItemAction):\n\
        \x20   wcpglobal-storage-profile: site-b-gold    (1 VM)\n\
        \x20 key classes of a ConfigMap in namespace velero labelled velero.io/plugin-config=\"\" and velero-vm-restore-webhook/vm-mappings=RestoreItemAction:\n\
        \x20   best-effort-small: site-b-small    (1 VM)\n\
        \x20 key images of a ConfigMap in namespace velero labelled velero.io/plugin-config=\"\" and velero-vm-restore-webhook/vm-mappings=RestoreItemAction:\n\
        \x20   vmi-0a0044d7c690bcbea: vmi-5b1e    (1 VM)\n\
        \x20 key networks of a ConfigMap in namespace velero labelled velero.io/plugin-config=\"\" and velero-vm-restore-webhook/vm-mappings=RestoreItemAction:\n\
        \x20   SubnetSet/primary: SubnetSet/site-b-subnets    (1 VM)\n";
    assert!(stdout.ends_with(expected), "{stdout}");
}

#[test]
fn review_restores_into_the_namespaces_a_namespace_mapping_names() {
    let review = |extra: &[&str]| {
        let mut args = vec![
            "review",
            "--group",
            "prod-b/web-tier",
            "--group",
            "prod/web-tier",
            "--exists",
            "class/prod-b/site-b-small",
            "-o",
            "summary",
        ];
        args.extend_from_slice(extra);
        let file = example("vm-v1alpha5.json");
        args.push(&file);
        let out = run(&args, None);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mapped = review(&["--namespace-mappings", "prod:prod-b,dev:dev-b"]);
    assert!(
        mapped.contains("VirtualMachine prod-b/web-1: DENIED: spec.className \"best-effort-small\" names no VirtualMachineClass with an active instance in namespace prod-b"),
        "{mapped}"
    );
    // Into another namespace, it is a copy beside its original.
    let file = example("vm-v1alpha5.json");
    let copy = run(
        &[
            "review",
            "--group",
            "prod-b/web-tier",
            "--namespace-mappings",
            "prod:prod-b",
            "-o",
            "summary",
            &file,
        ],
        None,
    );
    let copy = String::from_utf8_lossy(&copy.stdout);
    assert!(
        copy.contains("removed spec.biosUUID (copy beside the original)"),
        "{copy}"
    );
    // In its own namespace, given no class: not checked, and not a copy.
    let unmapped = review(&[]);
    assert!(!unmapped.contains("DENIED"), "{unmapped}");
    assert!(!unmapped.contains("vm-copy-network-identity"), "{unmapped}");
    let bad = run(
        &[
            "review",
            "--namespace-mappings",
            "prod",
            &example("vm-v1alpha5.json"),
        ],
        None,
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be SRC:DST"));
}

#[test]
fn review_maps_a_vm_by_configmaps_given_as_files() {
    let dir = std::env::temp_dir().join(format!("vmrw-cli-mapping-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mappings.yaml");
    // Velero's own change-storage-class ConfigMap and ours, as an admin
    // would `kubectl apply -n velero` them.
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: change-storage-class\n  labels:\n    velero.io/plugin-config: \"\"\n    velero.io/change-storage-class: RestoreItemAction\ndata:\n  wcpglobal-storage-profile: site-b-gold\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: vm-mappings\n  labels:\n    velero.io/plugin-config: \"\"\n    velero-vm-restore-webhook/vm-mappings: RestoreItemAction\ndata:\n  classes: |\n    best-effort-small: site-b-small\n",
    )
    .unwrap();
    let vm: Value =
        serde_json::from_str(&std::fs::read_to_string(example("vm-v1alpha5.json")).unwrap())
            .unwrap();
    let (class, storage) = (
        vm["spec"]["className"].clone(),
        vm["spec"]["storageClass"].clone(),
    );
    assert_eq!(
        (class.as_str(), storage.as_str()),
        (Some("best-effort-small"), Some("wcpglobal-storage-profile"))
    );
    let mapping = file.to_str().unwrap();
    let out = run(
        &[
            "review",
            "--group",
            "prod/web-tier",
            "--mapping",
            mapping,
            "-o",
            "json",
            &example("vm-v1alpha5.json"),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let patched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(patched["spec"]["storageClass"], "site-b-gold");
    assert_eq!(patched["spec"]["className"], "site-b-small");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("set spec.storageClass to \"site-b-gold\" (wcpglobal-storage-profile -> site-b-gold, ConfigMap velero/change-storage-class)"),
        "{stderr}"
    );

    // A malformed one denies the VM and names the ConfigMap and the key.
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: vm-mappings\n  namespace: backup-system\n  labels:\n    velero.io/plugin-config: \"\"\n    velero-vm-restore-webhook/vm-mappings: RestoreItemAction\ndata:\n  networks: |\n    Wire/a: b\n",
    )
    .unwrap();
    let out = run(
        &[
            "review",
            "--group",
            "prod/web-tier",
            "--mapping",
            mapping,
            "--fail-on-deny",
            "-o",
            "summary",
            &example("vm-v1alpha5.json"),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("VirtualMachine prod/web-1: DENIED: the mappings for Velero Restore nightly-20261125 cannot be used: ConfigMap backup-system/vm-mappings, key networks: source \"Wire/a\": unknown network kind \"Wire\""),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn review_denies_an_encrypted_vm_mapped_to_a_storage_class_that_does_not_encrypt() {
    let dir = std::env::temp_dir().join(format!("vmrw-cli-encryption-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("change-storage-class.yaml");
    let mapping_to = |target: &str| {
        std::fs::write(
            &file,
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: change-storage-class\n  labels:\n    velero.io/plugin-config: \"\"\n    velero.io/change-storage-class: RestoreItemAction\ndata:\n  wcpglobal-storage-profile: {target}\n"),
        )
        .unwrap();
    };
    let mut vm: Value =
        serde_json::from_str(&std::fs::read_to_string(example("vm-v1alpha5.json")).unwrap())
            .unwrap();
    vm["spec"]["crypto"] = serde_json::json!({"encryptionClassName": "tenant-keys"});
    let input = vm.to_string();
    let review = || {
        run(
            &[
                "review",
                "--group",
                "prod/web-tier",
                "--mapping",
                file.to_str().unwrap(),
                "--exists",
                "storageclass/prod/site-b-plain",
                "--exists",
                "storageclass/prod/site-b-encrypted",
                "--exists",
                "encryptedstorageclass/site-b-encrypted",
                "--fail-on-deny",
                "-o",
                "summary",
                "-",
            ],
            Some(&input),
        )
    };
    mapping_to("site-b-plain");
    let out = review();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "spec.crypto.encryptionClassName \"tenant-keys\" needs an encryption storage class, and spec.storageClass \
             \"site-b-plain\" is not one"
        ),
        "{stdout}"
    );
    // The entry to change is the one Velero reads, from the backup's name.
    assert!(
        stdout.contains(
            "Map the storage class: change `wcpglobal-storage-profile: site-b-plain` to \
             `wcpglobal-storage-profile: site-b-encrypted` in ConfigMap velero/change-storage-class"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("    wcpglobal-storage-profile: site-b-encrypted    (1 VM)"),
        "{stdout}"
    );
    mapping_to("site-b-encrypted");
    let out = review();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bad = run(
        &["review", "--exists", "encryptedstorageclass/prod/x", "-"],
        Some(&input),
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be encryptedstorageclass/NAME"));
    std::fs::remove_dir_all(&dir).ok();
}

/// Finding 9 of the shared-safety review: whether a field is mapped is
/// decided once. An entry that maps a class to itself leaves `spec.class`
/// checked (and removed when the target has no such instance), and a
/// turned-off `vm-map-class` leaves the VM checked under the name it keeps.
#[test]
fn identity_entries_and_turned_off_mapping_rules_map_nothing_for_any_question() {
    let dir = std::env::temp_dir().join(format!("vmrw-cli-identity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mappings.yaml");
    let mapping_of = |classes: &str| {
        std::fs::write(
            &file,
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: vm-mappings\n  labels:\n    velero.io/plugin-config: \"\"\n    velero-vm-restore-webhook/vm-mappings: RestoreItemAction\ndata:\n  classes: |\n    {classes}\n"),
        )
        .unwrap();
    };
    let mut vm: Value =
        serde_json::from_str(&std::fs::read_to_string(example("vm-v1alpha5.json")).unwrap())
            .unwrap();
    vm["spec"]["class"] =
        serde_json::json!({"kind": "VirtualMachineClassInstance", "name": "small-1"});
    let input = vm.to_string();
    let mapping = file.to_str().unwrap().to_string();
    let review = |extra: &[&str]| {
        let mut args = vec![
            "review",
            "--group",
            "prod/web-tier",
            "--mapping",
            &mapping,
            "--exists",
            "class/prod/best-effort-small",
            "--exists",
            "class/prod/site-b-small",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", "summary", "-"]);
        run(&args, Some(&input))
    };
    // Identity: nothing renamed, and the instance (not in the target) removed.
    mapping_of("best-effort-small: best-effort-small");
    let out = review(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "removed spec.class (no active instance of this class by that name in the target)"
        ),
        "{stdout}"
    );
    assert!(!stdout.contains("set spec.className"), "{stdout}");
    // vm-map-class off: the VM keeps best-effort-small and is checked under
    // it; a namespace without it denies the VM under that name.
    mapping_of("best-effort-small: site-b-small");
    let out = review(&["--disable-rule", "vm-map-class"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("set spec.className"), "{stdout}");
    assert!(
        !stdout.contains("DENIED"),
        "best-effort-small is given: {stdout}"
    );
    let out = run(
        &[
            "review",
            "--group",
            "prod/web-tier",
            "--mapping",
            &mapping,
            "--exists",
            "class/prod/site-b-small",
            "--disable-rule",
            "vm-map-class",
            "-o",
            "summary",
            "-",
        ],
        Some(&input),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("spec.className \"best-effort-small\" names no VirtualMachineClass"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

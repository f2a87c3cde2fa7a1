//! Criterion: the rule engine on a realistic VM, and a whole review.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;

use velero_vm_restore_webhook::deadline::Deadline;
use velero_vm_restore_webhook::facts::given::{StaticGroups, StaticRestores};
use velero_vm_restore_webhook::vmop::{self, ApiVersion, CleanupOptions, Kind};
use velero_vm_restore_webhook::webhook::admission;
use velero_vm_restore_webhook::webhook::review::{ReviewSettings, Reviewer};

// The allocator the binary ships with (src/main.rs), so the figures are the
// deployed ones.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn example(name: &str) -> Value {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("example")).expect("json")
}

fn benches(c: &mut Criterion) {
    // v1alpha3 carries the hub copy in the conversion annotation: the most work.
    let vm = example("vm-v1alpha3.json");
    let options = CleanupOptions::default();
    c.bench_function(
        "rules: plan VirtualMachine v1alpha3 (with conversion copy)",
        |b| {
            b.iter(|| {
                vmop::plan(
                    Kind::VirtualMachine(ApiVersion(3)),
                    std::hint::black_box(&vm),
                    &options,
                )
                .expect("plan")
            })
        },
    );
    let vm6 = example("vm-v1alpha6.json");
    c.bench_function("rules: plan VirtualMachine v1alpha6 (no copy)", |b| {
        b.iter(|| {
            vmop::plan(
                Kind::VirtualMachine(ApiVersion(6)),
                std::hint::black_box(&vm6),
                &options,
            )
            .expect("plan")
        })
    });

    let body = std::fs::read(format!(
        "{}/examples/admission-review-vm.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("review");
    c.bench_function("admission: parse AdmissionReview", |b| {
        b.iter(|| admission::parse_review(std::hint::black_box(&body)).expect("parse"))
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let reviewer = Reviewer::new(
        StaticGroups::new([("prod", "web-tier")]),
        StaticRestores::none(),
        ReviewSettings::default(),
        Some(Arc::new(velero_vm_restore_webhook::metrics::Metrics::new())),
    );
    let review_to_bytes = || {
        let reviewed = runtime
            .block_on(reviewer.review(
                std::hint::black_box(&body),
                Deadline::after(std::time::Duration::from_secs(10)),
            ))
            .expect("review");
        serde_json::to_vec(&admission::WireReview(&reviewed.review)).expect("encode")
    };
    c.bench_function(
        "review: body to response bytes, VirtualMachine v1alpha5, logging off",
        |b| b.iter(review_to_bytes),
    );
    // As deployed: JSON INFO lines (one per change) through the writer
    // thread, here into a file.
    let log_path = std::env::temp_dir().join(format!("vmrw-bench-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let (subscriber, guard, _) = velero_vm_restore_webhook::telemetry::subscriber(
        "info",
        velero_vm_restore_webhook::settings::LogFormat::Json,
        false,
        true,
        std::io::BufWriter::new(log_file),
    );
    tracing::subscriber::with_default(subscriber, || {
        // One review outside the measurement, so the check below holds even
        // when a filter on the command line skips this benchmark.
        review_to_bytes();
        c.bench_function(
            "review: body to response bytes, VirtualMachine v1alpha5, logging as deployed",
            |b| b.iter(review_to_bytes),
        );
    });
    drop(guard);
    let lines = std::fs::read_to_string(&log_path)
        .map(|text| text.lines().count())
        .unwrap_or(0);
    assert!(lines > 0, "the production subscriber wrote no line");
    let _ = std::fs::remove_file(&log_path);
}

criterion_group!(name = rules; config = Criterion::default().sample_size(60); targets = benches);
criterion_main!(rules);

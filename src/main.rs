//! The command line: parses it and hands each subcommand to its module in
//! `commands/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use velero_vm_restore_webhook::commands::{plan, report, review, rules, selftest, serve};
use velero_vm_restore_webhook::settings::{LogFormat, ServeArgs};
use velero_vm_restore_webhook::telemetry;

/// mimalloc rather than glibc's allocator: a review allocates and frees many
/// small strings and maps, and glibc's malloc and free were about a third of
/// a review in the profile; with mimalloc a review takes about 30 % less
/// (`docs/performance.md` has the figures). Built with `no_thp`: with
/// transparent huge pages its arenas doubled the idle RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Cleans VM Operator objects restored by Velero, and admits VMs only after their group"
)]
struct Cli {
    /// Log filter: a level (info, debug) or EnvFilter directives. RUST_LOG
    /// wins. Default: info for `serve`, error for `review`.
    #[arg(long, global = true, env = "VMRW_LOG_LEVEL")]
    log_level: Option<String>,

    /// Log format.
    #[arg(long, global = true, env = "VMRW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve AdmissionReviews over HTTPS at POST /mutate.
    Serve(Box<ServeArgs>),
    /// Review objects offline (JSON, YAML, Lists, AdmissionReviews, or a Velero
    /// backup tarball) and print what a restore through the webhook would do.
    Review(review::ReviewArgs),
    /// Print the rules as a Markdown table (the table in docs/rules.md).
    Rules,
    /// Check an installed webhook (what `helm test` runs): a server-side
    /// dry-run create of a labelled VM must come back cleaned.
    Selftest(selftest::SelftestArgs),
    /// What a restore of a Velero backup into this cluster would do, before
    /// it runs: the backup fetched through Velero, its namespace mapping and
    /// mapping ConfigMaps applied, the target's groups and references read
    /// live. Writes nothing but a DownloadRequest, which it deletes.
    Plan(plan::PlanArgs),
    /// What a Velero Restore did to VM Operator objects, read from the
    /// cluster: objects cleaned per kind and rule, groups started in boot
    /// order, members pruned, VMs still waiting for a group.
    Report(report::ReportArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "error",
    };
    // Flushes the last log lines when main returns.
    let serving = matches!(cli.command, Command::Serve(_));
    let _log_writer = telemetry::init(
        cli.log_level.as_deref().unwrap_or(default_level),
        cli.log_format,
        serving,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(*args)),
        Command::Review(args) => runtime.block_on(review::run(args)),
        Command::Rules => {
            print!("{}", rules::table());
            ExitCode::SUCCESS
        }
        Command::Report(args) => runtime.block_on(report::run(args)),
        Command::Plan(args) => runtime.block_on(plan::run(args)),
        Command::Selftest(args) => runtime.block_on(selftest::run(args)),
    }
}

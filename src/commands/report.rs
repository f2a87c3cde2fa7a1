//! `report RESTORE`: what a Velero Restore did to VM Operator objects, read
//! from the cluster (the same report the companion writes as Events).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The Velero Restore's name.
    pub restore: String,
    /// Velero's namespace.
    #[arg(
        short = 'n',
        long = "namespace",
        env = "VMRW_VELERO_NAMESPACE",
        default_value = "velero"
    )]
    pub velero_namespace: String,
    /// `table` or `json`.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ReportOutput::Table)]
    pub output: ReportOutput,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ReportOutput {
    Table,
    Json,
}

pub async fn run(args: ReportArgs) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(err) => {
            eprintln!(
                "velero-vm-restore-webhook report: cannot build a Kubernetes client from KUBECONFIG or ~/.kube/config: {err}"
            );
            return ExitCode::FAILURE;
        }
    };
    match crate::companion::report(&client, &args.velero_namespace, &args.restore).await {
        Ok(report) => {
            match args.output {
                ReportOutput::Table => print!("{}", report.to_table()),
                ReportOutput::Json => match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(err) => {
                        eprintln!("velero-vm-restore-webhook report: {err}");
                        return ExitCode::FAILURE;
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("velero-vm-restore-webhook report: {err}");
            ExitCode::FAILURE
        }
    }
}

//! velero-vm-restore-webhook: a mutating admission webhook that cleans
//! VM Operator objects restored by Velero and orders groups before VMs.

pub mod admission;
pub mod aftercare;
pub mod companion;
pub mod deadline;
pub mod decide;
pub mod facts;
pub mod groups;
pub mod metrics;
pub mod offline;
pub mod patch;
pub mod refs;
pub mod restores;
pub mod review;
pub mod selftest;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod tls;
pub mod vmop;
pub mod waits;

//! velero-vm-restore-webhook: a mutating admission webhook that cleans
//! VM Operator objects restored by Velero and orders groups before VMs, and
//! a companion that acts once a Restore has finished.
//!
//! Three parts around one core; arrows point down this list, never up:
//! - [`commands`]: one module per subcommand (`serve`, `review`, `plan`,
//!   `rules`, `selftest`, `report`); `main.rs` only parses and dispatches.
//! - [`webhook`]: the path of one AdmissionReview, from the HTTPS server to
//!   the pure decision and back.
//! - [`companion`]: what runs once a Restore has finished: group boot order,
//!   pruning, the per-restore report.
//! - [`facts`]: what the webhook and the companion look up in the cluster
//!   (groups, Restores, references), behind small traits with live and
//!   given-by-hand implementations.
//! - The core, free of I/O: [`vmop`] (VM Operator's rules per kind and API
//!   version) and [`patch`] (changes, JSON Patch, warnings); and the shared
//!   plumbing: [`settings`], [`deadline`], [`metrics`], [`telemetry`].
//!
//! `docs/architecture.md` follows one review and one companion pass through
//! these modules.

pub mod commands;
pub mod companion;
pub mod deadline;
pub mod facts;
pub mod metrics;
pub mod patch;
pub mod settings;
pub mod telemetry;
pub mod vmop;
pub mod webhook;

//! The webhook path: where one AdmissionReview goes, in order.
//!
//! - [`server`]: HTTPS routes, body limits, review slots, graceful shutdown;
//!   [`connections`]: both ports' connections, their caps and timeouts;
//!   [`tls`]: the serving certificate and its reload.
//! - [`admission`]: the body parsed into a request and the raw object, and a
//!   [`admission::Verdict`] rendered back into the response (pure).
//! - [`review`]: one review end to end: scope, gather the facts within the
//!   request's deadline, [`decide`], then render once into the response, the
//!   log lines and the metrics.
//! - [`decide`]: the pure decision from the object and the facts;
//!   [`missing_refs`]: its wording for references the target lacks.
//! - [`waits`]: shared, capped and remembered waits for a missing group.
//!
//! Arrows: the `serve` and `review` commands use this module; it uses
//! [`crate::facts`] (behind traits), [`crate::vmop`] and the shared modules
//! at the top of the crate, never [`crate::companion`].

pub mod admission;
pub mod connections;
pub mod decide;
pub mod missing_refs;
pub mod review;
pub mod server;
pub mod tls;
pub mod waits;

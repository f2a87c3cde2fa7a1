//! Routes, TLS, limits and graceful shutdown.
//!
//! The HTTPS port serves `POST /mutate`, `GET /healthz` and `GET /readyz`; the
//! plain-HTTP metrics port serves `/metrics` and the same probes. Both ports'
//! connections are driven by [`super::connections`], with the same limits
//! (connection caps in total and per source address, the API server exempt
//! from the latter; handshake, header and idle timeouts) and the same drain
//! on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::deadline::Deadline;
use crate::metrics::{Metrics, Outcome, PortLabel};
use crate::settings::{Cidr, ServeArgs};
use crate::webhook::admission::{self, ReviewError};
use crate::webhook::connections::{ConnectionLimits, DrainState, Peer, Port};
use crate::webhook::review::Reviewer;
use crate::webhook::tls::{ReloadingCert, TlsError};

/// The limits the server enforces, from [`ServeArgs`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// From a request's first byte to its complete head.
    pub header_read_timeout: Duration,
    /// For the TLS handshake, and for reading a request's body.
    pub request_read_timeout: Duration,
    /// A kept-alive connection without a request is closed after this.
    pub idle_timeout: Duration,
    pub max_concurrent_reviews: usize,
    /// Request bytes buffered at once over all reviews; [`budget_kib`] raises
    /// it to max_body_bytes, so one largest body always fits.
    pub max_buffered_bytes: usize,
    pub max_connections: usize,
    /// Open connections from one source address, on each port.
    pub max_connections_per_source: usize,
    /// The API server's addresses: not capped per source (connections, or
    /// share of the byte budget).
    pub api_server_cidrs: Vec<Cidr>,
    /// Subtracted from the API server's `?timeout=` to fix each request's deadline.
    pub timeout_margin: Duration,
    /// On shutdown: serve with /readyz failing for this long, then stop accepting.
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
    pub bench_noop_route: bool,
}

impl From<&ServeArgs> for Limits {
    fn from(args: &ServeArgs) -> Limits {
        Limits {
            max_body_bytes: args.max_body_bytes as usize,
            header_read_timeout: args.header_read_timeout,
            request_read_timeout: args.request_read_timeout,
            idle_timeout: args.idle_timeout,
            max_concurrent_reviews: args.max_concurrent_reviews.max(1) as usize,
            max_buffered_bytes: args.max_buffered_bytes as usize,
            max_connections: args.max_connections.max(1) as usize,
            max_connections_per_source: args.max_connections_per_source.max(1) as usize,
            api_server_cidrs: args.api_server_cidrs.clone(),
            timeout_margin: args.rules.timeout_margin,
            drain_delay: args.shutdown_drain_delay,
            shutdown_timeout: args.shutdown_timeout,
            bench_noop_route: args.bench_noop_route,
        }
    }
}

impl Limits {
    fn connections(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            max_per_source: self.max_connections_per_source,
            uncapped_sources: self.api_server_cidrs.clone(),
            handshake_timeout: self.request_read_timeout,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            // Half the drain delay: a connection the API server uses within
            // that is ended by its answer's `Connection: close`, the rest
            // are closed idle, and none is left when the delay ends.
            drain_idle: self.drain_delay / 2,
        }
    }
}

/// The byte budget in KiB permits (a semaphore takes at most u32 permits at once).
fn budget_kib(limits: &Limits) -> usize {
    limits
        .max_buffered_bytes
        .max(limits.max_body_bytes)
        .div_ceil(1024)
        .min(u32::MAX as usize)
}

/// The share of the byte budget one source address may hold: a quarter, and
/// at least one largest body, so no single caller reading slowly can hold
/// the whole budget while the API server's bodies wait. The API server's own
/// requests (its addresses, or its client certificate) take from the whole
/// budget only: it sends every review, and a quarter would cap the replica's
/// reviews in flight at a quarter of what the budget holds.
fn source_share_kib(limits: &Limits) -> usize {
    (budget_kib(limits) / 4)
        .max(limits.max_body_bytes.div_ceil(1024))
        .min(budget_kib(limits))
}

/// Each source address's share of the byte budget.
#[derive(Default)]
struct SourceShares {
    shares: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, Arc<Semaphore>>>,
}

impl SourceShares {
    fn of(&self, source: std::net::IpAddr, kib: usize) -> Arc<Semaphore> {
        let mut shares = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        // Forget sources with nothing held, so the map stays small.
        if shares.len() > 1024 {
            shares.retain(|_, share| share.available_permits() < kib);
        }
        shares
            .entry(source)
            .or_insert_with(|| Arc::new(Semaphore::new(kib)))
            .clone()
    }
}

#[derive(Clone)]
struct AppState {
    reviewer: Arc<Reviewer>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    /// The byte budget, in KiB permits.
    buffered_kib: Arc<Semaphore>,
    /// Each source address's share of it.
    source_shares: Arc<SourceShares>,
    limits: Limits,
    shutting_down: Arc<AtomicBool>,
    /// When serving began: the reference caches get
    /// [`crate::webhook::review::REFS_READY_GRACE`] to list before readiness
    /// stops waiting for them.
    started: tokio::time::Instant,
    /// For the certificate's end, at scrape time.
    certificate: Arc<ReloadingCert>,
}

impl AppState {
    fn ready(&self) -> bool {
        !self.shutting_down.load(Ordering::SeqCst) && self.reviewer.is_ready(self.started.elapsed())
    }
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn error_response(state: &AppState, status: StatusCode, err: ReviewError) -> Response {
    warn!(status = status.as_u16(), error = %err, "request rejected");
    let outcome = match &err {
        ReviewError::TooLarge { .. } => Outcome::TooLarge,
        ReviewError::Overloaded => Outcome::Overloaded,
        ReviewError::ReadTimeout => Outcome::Deadline,
        _ => Outcome::BadRequest,
    };
    state.metrics.count_unreviewable(outcome);
    json_response(status, &admission::invalid(&err))
}

/// The `?timeout=10s` the API server appends to the webhook URL.
fn api_timeout(uri: &Uri) -> Option<Duration> {
    crate::deadline::api_timeout_from_query(uri.query()?)
}

/// `/mutate`, and the bench routes that answer like it with one of a
/// create's costs taken away ([`Way`]).
async fn mutate<const WAY: u8>(
    State(state): State<AppState>,
    peer: Option<Extension<Peer>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let way = match WAY {
        NO_WARNINGS => Way::NoWarnings,
        QUIET_CHANGES => Way::QuietChanges,
        _ => Way::Shipped,
    };
    review_request(state, peer, uri, headers, body, way).await
}

const SHIPPED: u8 = 0;
const NO_WARNINGS: u8 = 1;
const QUIET_CHANGES: u8 = 2;

/// How a route answers (`make bench-cluster`): ours as shipped, or ours
/// with one of a create's costs taken away, to tell which one costs what.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// `/mutate`.
    Shipped,
    /// `/bench/mutate-no-warnings`: the same review and patch, no `warnings`.
    NoWarnings,
    /// `/bench/mutate-quiet-changes`: the same answer, the change lines (INFO)
    /// not logged, as with logs at `warn`.
    QuietChanges,
}

async fn review_request(
    state: AppState,
    peer: Option<Extension<Peer>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    way: Way,
) -> Response {
    // One deadline for the whole request, fixed on arrival.
    let deadline = Deadline::for_request(
        tokio::time::Instant::now(),
        api_timeout(&uri),
        state.limits.timeout_margin,
    );
    let limit = state.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return error_response(
            &state,
            StatusCode::PAYLOAD_TOO_LARGE,
            ReviewError::TooLarge { limit },
        );
    }
    // The body's share of the byte budget comes before the body, from the
    // budget of all reviews and from its source's share of it: at most
    // max_buffered_bytes are buffered (and parsed) at once, and one caller
    // reading slowly cannot hold all of it. A body without Content-Length
    // reserves the largest allowed size.
    let kib = declared
        .unwrap_or(limit)
        .div_ceil(1024)
        .clamp(1, budget_kib(&state.limits)) as u32;
    let source_share = peer
        .filter(|Extension(peer)| peer.capped)
        .map(|Extension(peer)| {
            state
                .source_shares
                .of(peer.addr.ip(), source_share_kib(&state.limits))
        });
    let reserved = deadline
        .run(async {
            let share = match &source_share {
                Some(share) => Some(
                    share
                        .clone()
                        .acquire_many_owned(kib.min(share_permits(&state.limits)))
                        .await?,
                ),
                None => None,
            };
            let bytes = state.buffered_kib.clone().acquire_many_owned(kib).await?;
            Ok::<_, tokio::sync::AcquireError>((share, bytes))
        })
        .await;
    let _reserved = match reserved {
        Ok(Ok(reserved)) => reserved,
        Ok(Err(_)) | Err(_) => {
            return error_response(
                &state,
                StatusCode::SERVICE_UNAVAILABLE,
                ReviewError::Overloaded,
            );
        }
    };
    let read_deadline = deadline.min_after(state.limits.request_read_timeout);
    let bytes = match read_deadline.run(Limited::new(body, limit).collect()).await {
        Err(_) => {
            return error_response(
                &state,
                StatusCode::REQUEST_TIMEOUT,
                ReviewError::ReadTimeout,
            );
        }
        Ok(Err(err)) if err.is::<LengthLimitError>() => {
            return error_response(
                &state,
                StatusCode::PAYLOAD_TOO_LARGE,
                ReviewError::TooLarge { limit },
            );
        }
        Ok(Err(err)) => {
            return error_response(
                &state,
                StatusCode::BAD_REQUEST,
                ReviewError::Body(err.to_string()),
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    // A review slot once the body is in: a body sent slowly holds its bytes,
    // never a slot.
    let _slot = match deadline.run(state.slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(_)) | Err(_) => {
            return error_response(
                &state,
                StatusCode::SERVICE_UNAVAILABLE,
                ReviewError::Overloaded,
            );
        }
    };
    let reviewed = if way == Way::QuietChanges {
        crate::webhook::review::without_change_lines(state.reviewer.review(&bytes, deadline)).await
    } else {
        state.reviewer.review(&bytes, deadline).await
    };
    match reviewed {
        Ok(mut reviewed) => {
            if way == Way::NoWarnings
                && let Some(response) = reviewed.review.response.as_mut()
            {
                response.warnings = None;
            }
            json_response(StatusCode::OK, &admission::WireReview(&reviewed.review))
        }
        Err(err) => json_response(StatusCode::BAD_REQUEST, &admission::invalid(&err)),
    }
}

/// A source's share, in the permits one acquire may take.
fn share_permits(limits: &Limits) -> u32 {
    source_share_kib(limits).min(u32::MAX as usize) as u32
}

/// The least any webhook does: read the body, find the request's uid, and
/// allow it unchanged. Registered like ours, it is the floor a webhook costs
/// the API server; the load run uses it as the baseline route.
async fn noop(State(state): State<AppState>, body: Body) -> Response {
    bench_answer(&state, body, None).await
}

/// During the drain delay every answer says `Connection: close`, so the API
/// server drops each kept-alive connection to this replica after its answer
/// and dials again (to a replica still ready) instead of writing its next
/// review onto a connection the drain is about to close: a POST racing that
/// close fails, and the API server does not retry it.
async fn close_while_draining(State(state): State<AppState>, mut response: Response) -> Response {
    if state.shutting_down.load(Ordering::SeqCst) {
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// The least a mutating webhook that changes something does: `/noop` with a
/// fixed one-operation patch (a label), so that the API server applies a
/// patch. With `/noop`, it splits what any patch costs the API server from
/// what our review costs (`make bench-latency`, way `noop-patch`).
async fn noop_patch(State(state): State<AppState>, body: Body) -> Response {
    // [{"op":"add","path":"/metadata/labels/vmrw-bench-noop","value":"patched"}]
    const PATCH: &str = "W3sib3AiOiJhZGQiLCJwYXRoIjoiL21ldGFkYXRhL2xhYmVscy92bXJ3LWJlbmNoLW5vb3AiLCJ2YWx1ZSI6InBhdGNoZWQifV0=";
    bench_answer(&state, body, Some(PATCH)).await
}

/// `/noop-patch/{bytes}`: the no-op route answering with a patch of `bytes`
/// bytes (before base64), one label whose value pads it: the fair floor for a
/// create ours patches with that many bytes (`make bench-cluster` sizes it
/// from ours' answer for the same VM).
async fn noop_patch_sized(
    State(state): State<AppState>,
    axum::extract::Path(bytes): axum::extract::Path<usize>,
    body: Body,
) -> Response {
    use base64::Engine as _;
    const HEAD: &str = r#"[{"op":"add","path":"/metadata/labels/vmrw-bench-noop","value":""#;
    const TAIL: &str = r#""}]"#;
    // A label value is at most 63 characters: the rest pads an annotation.
    const ANNOTATION_HEAD: &str =
        r#"[{"op":"add","path":"/metadata/annotations/vmrw-bench-noop","value":""#;
    let bytes = bytes.min(state.limits.max_body_bytes);
    let head = if bytes > HEAD.len() + TAIL.len() + 63 {
        ANNOTATION_HEAD
    } else {
        HEAD
    };
    let pad = bytes.saturating_sub(head.len() + TAIL.len()).max(1);
    let patch = format!("{head}{}{TAIL}", "x".repeat(pad));
    let encoded = base64::engine::general_purpose::STANDARD.encode(patch);
    bench_answer(&state, body, Some(&encoded)).await
}

async fn bench_answer(state: &AppState, body: Body, patch: Option<&str>) -> Response {
    #[derive(serde::Deserialize)]
    struct Request {
        uid: String,
    }
    #[derive(serde::Deserialize)]
    struct Review {
        request: Request,
    }
    match Limited::new(body, state.limits.max_body_bytes)
        .collect()
        .await
    {
        Ok(collected) => {
            let uid = serde_json::from_slice::<Review>(&collected.to_bytes())
                .map(|review| review.request.uid)
                .unwrap_or_default();
            let mut response = serde_json::json!({"uid": uid, "allowed": true});
            if let Some(patch) = patch {
                response["patchType"] = "JSONPatch".into();
                response["patch"] = patch.into();
            }
            json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": response,
                }),
            )
        }
        Err(_) => StatusCode::PAYLOAD_TOO_LARGE.into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready() {
        (StatusCode::OK, "ok").into_response()
    } else if state.shutting_down.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the caches (VirtualMachineGroups, Restores, mapping ConfigMaps; what VMs refer to, for 10 s at most) to list once",
        )
            .into_response()
    }
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let reviewer = &state.reviewer;
    state
        .metrics
        .group_cache_objects
        .set(reviewer.groups.len() as i64);
    state
        .metrics
        .restore_cache_objects
        .set(reviewer.restores.len() as i64);
    state
        .metrics
        .group_waits_in_progress
        .set(reviewer.group_waits_in_progress() as i64);
    state
        .metrics
        .certificate_not_after
        .set(state.certificate.not_after());
    state
        .metrics
        .log_lines_dropped
        .inner()
        .store(crate::telemetry::dropped_lines(), Ordering::Relaxed);
    for cache in reviewer.cache_stats() {
        state.metrics.set_cache(
            cache.resource,
            cache.objects,
            cache.ready,
            crate::metrics::CacheCounters {
                live_reads: cache.live_reads,
                errors: cache.errors,
                confirmations: cache.confirmations,
            },
        );
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Listeners bound up front, so callers (and tests) know the ports.
pub struct Bound {
    tls_listener: TcpListener,
    metrics_listener: TcpListener,
    pub tls_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

pub async fn bind(listen: SocketAddr, metrics_listen: SocketAddr) -> std::io::Result<Bound> {
    let tls_listener = TcpListener::bind(listen).await?;
    let metrics_listener = TcpListener::bind(metrics_listen).await?;
    Ok(Bound {
        tls_addr: tls_listener.local_addr()?,
        metrics_addr: metrics_listener.local_addr()?,
        tls_listener,
        metrics_listener,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl Bound {
    /// Serves until `shutdown` resolves; then stops accepting, lets in-flight
    /// reviews finish (up to the shutdown timeout) and returns.
    pub async fn run(
        self,
        reviewer: Arc<Reviewer>,
        metrics: Arc<Metrics>,
        certificate: Arc<ReloadingCert>,
        limits: Limits,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let state = AppState {
            reviewer,
            metrics: metrics.clone(),
            slots: Arc::new(Semaphore::new(limits.max_concurrent_reviews)),
            buffered_kib: Arc::new(Semaphore::new(budget_kib(&limits))),
            source_shares: Arc::default(),
            limits: limits.clone(),
            shutting_down: Arc::new(AtomicBool::new(false)),
            started: tokio::time::Instant::now(),
            certificate: certificate.clone(),
        };
        let mut app = Router::new()
            .route("/mutate", post(mutate::<SHIPPED>))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz));
        if limits.bench_noop_route {
            app = app
                .route("/noop", post(noop))
                .route("/noop-patch", post(noop_patch))
                .route("/noop-patch/{bytes}", post(noop_patch_sized))
                .route("/bench/mutate-no-warnings", post(mutate::<NO_WARNINGS>))
                .route("/bench/mutate-quiet-changes", post(mutate::<QUIET_CHANGES>));
        }
        let app = app
            .layer(axum::middleware::map_response_with_state(
                state.clone(),
                close_while_draining,
            ))
            .with_state(state.clone());
        let metrics_app = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(state.clone());

        let acceptor = TlsAcceptor::from(Arc::new(certificate.server_config()?));
        let (drain_tx, drain_rx) = tokio::sync::watch::channel(DrainState::Serving);
        {
            // Readiness fails at once; serving goes on for the drain delay,
            // so endpoints stop routing here before the listener closes.
            // Meanwhile answers say `Connection: close` and idle connections
            // are closed (`connections::Activity::deadline`).
            let shutting_down = state.shutting_down.clone();
            let drain_delay = limits.drain_delay;
            tokio::spawn(async move {
                shutdown.await;
                shutting_down.store(true, Ordering::SeqCst);
                let _ = drain_tx.send(DrainState::Draining);
                info!(
                    drain_delay_ms = drain_delay.as_millis() as u64,
                    "shutting down: /readyz fails now; still serving during the drain delay"
                );
                tokio::time::sleep(drain_delay).await;
                let _ = drain_tx.send(DrainState::Stopped);
            });
        }
        info!(https = %self.tls_addr, metrics = %self.metrics_addr, "serving");
        let metrics_port = Port {
            label: PortLabel::Metrics,
            listener: self.metrics_listener,
            tls: None,
            app: metrics_app,
            limits: limits.connections(),
        };
        let metrics_server = tokio::spawn(metrics_port.serve(drain_rx.clone(), metrics.clone()));
        let https = Port {
            label: PortLabel::Https,
            listener: self.tls_listener,
            tls: Some(acceptor),
            app,
            limits: limits.connections(),
        }
        .serve(drain_rx, metrics.clone())
        .await;

        state.shutting_down.store(true, Ordering::SeqCst);
        info!(
            connections = https.count(),
            "drain delay over: no longer accepting; finishing in-flight reviews"
        );
        if tokio::time::timeout(limits.shutdown_timeout, https.closed())
            .await
            .is_err()
        {
            warn!("shutdown timeout reached with reviews still in flight");
        }
        match metrics_server.await {
            Ok(connections) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), connections.closed()).await;
            }
            Err(err) => warn!(error = %err, "metrics server task failed"),
        }
        info!("stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_api_server_timeout() {
        let uri: Uri = "/mutate?timeout=10s".parse().unwrap();
        assert_eq!(api_timeout(&uri), Some(Duration::from_secs(10)));
        let uri: Uri = "/mutate".parse().unwrap();
        assert_eq!(api_timeout(&uri), None);
        // Absurd values are ignored rather than trusted (and never panic).
        for query in [
            "timeout=99999999999999999999s",
            "timeout=1e308h",
            "timeout=-5s",
            "timeout=%FF",
        ] {
            let uri: Uri = format!("/mutate?{query}").parse().unwrap();
            assert_eq!(api_timeout(&uri), None, "{query}");
        }
    }
}

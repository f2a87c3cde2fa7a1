//! Accepting and driving connections, the same way on both ports (HTTPS for
//! the API server, plain HTTP for metrics and probes):
//!
//! - at most `max_connections` open at once (more wait in the listen
//!   backlog), and at most `max_per_source` from one address, so that a pod
//!   opening connections by the hundred cannot take the replica's. The API
//!   server is not counted per source: its addresses (`--api-server-cidr`)
//!   and, with client authentication, any connection presenting a
//!   certificate the client CA signed count only against `max_connections`.
//!   A connection over its source's share is answered, not dropped: `503`
//!   with `Connection: close`, `Retry-After: 1` and a line naming the cap,
//!   after its request has been read (a close with a request unread resets
//!   the connection, and the answer with it). client-go, which the API server
//!   calls webhooks with, retries a 5xx carrying `Retry-After` on a new
//!   connection. At most [`REFUSALS_AT_ONCE`] refusals are answered at once
//!   on a port; past that, a refused connection is closed unanswered
//!   (`per_source_unanswered`): only a source flooding the port meets that;
//! - the TLS handshake within `handshake_timeout`;
//! - a request's head within `header_read_timeout` of its first byte;
//! - a kept-alive connection closed after `idle_timeout` without a request.
//!   That is longer than the API server keeps an idle connection to a
//!   webhook (90 s): the API server always closes first, so it never sends
//!   a request on a connection this side is closing (a POST on a closed
//!   connection is not retried, and the create fails with "EOF"). hyper's
//!   own header timeout also runs while a connection is idle, which is why
//!   it is off and replaced by this;
//! - the drain ([`DrainState`]): see [`Activity::deadline`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::metrics::{ConnectionRefusal, Metrics, PortLabel};
use crate::settings::Cidr;

/// Refusals answered at once on a port (each holds a connection until its
/// request is read and answered, within the header timeout).
pub const REFUSALS_AT_ONCE: usize = 16;

/// A refused request's body is read up to this much before the answer, so
/// the close does not reset the connection under it.
const REFUSAL_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The limits every connection of a port gets.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_source: usize,
    /// Sources counted only against `max_connections`: the API server's.
    pub uncapped_sources: Vec<Cidr>,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// During the drain, a connection idle this long is closed (see
    /// [`Activity::deadline`]).
    pub drain_idle: Duration,
}

/// Where the server is in its life, as every connection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    Serving,
    /// SIGTERM came: `/readyz` fails, every answer says `Connection: close`,
    /// and connections idle for `drain_idle` are closed.
    Draining,
    /// The drain delay is over: no longer accepting; each connection is
    /// closed once its request in progress is answered.
    Stopped,
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request since this instant (kept alive, or just accepted).
    Idle(Instant),
    /// A request's first byte came at this instant; its head is not complete.
    ReadingHead(Instant),
    /// A request is being answered (its own deadline bounds it).
    Busy,
}

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Idle,
    Drained,
    SlowHead,
}

impl Close {
    fn as_str(self) -> &'static str {
        match self {
            Close::Idle => "idle",
            Close::Drained => "idle during the drain",
            Close::SlowHead => "request head too slow",
        }
    }
}

/// What a connection is doing, shared by its reader, its service and its
/// watchdog.
struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    /// A new connection: its first request's head is due within the header
    /// timeout, as any other's.
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            phase: Mutex::new(Phase::ReadingHead(Instant::now())),
            changed: Notify::new(),
        })
    }

    fn set(&self, update: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        *phase = update(*phase);
        drop(phase);
        self.changed.notify_one();
    }

    /// When the connection is to be closed if nothing changes, and why.
    ///
    /// The drain closes kept-alive connections only while they are idle,
    /// never one with a request arriving or in progress: during the drain
    /// every answer says `Connection: close`, so a connection in use ends
    /// after its answer, at the client's word. What is left are connections
    /// the API server keeps in its pool without using them, and nothing it
    /// can be told about: HTTP/1.1 has no way to retire an idle connection
    /// but to close it. They are closed once idle for `drain_idle` (half the
    /// drain delay), at once for one idle that long when the drain starts,
    /// so none is left when the drain delay ends (before, each stayed open
    /// until the drain ended, and hyper's graceful shutdown closed it then,
    /// along with any whose next request's head had begun to arrive).
    ///
    /// Why that is safe for the API server (Go's net/http transport): an
    /// idle pooled connection is always being read; the close (TLS
    /// close_notify, then FIN) arrives there, and the transport drops the
    /// connection from its pool (`errServerClosedIdle`), so a later request
    /// dials a new one (this replica while it is still among the endpoints,
    /// answered with `Connection: close`; then another). A request that had
    /// taken the connection but not yet written a byte is retried too
    /// (`nothingWrittenError`; the API server's request has a rewindable
    /// body). Only a request written in the instant between the close
    /// leaving here and the transport reading it (well under a millisecond
    /// in a cluster) fails, unretried as any POST: no server can close a
    /// kept-alive connection without that instant, and the one thing it
    /// can choose is which connections meet it. Waiting `drain_idle` first
    /// lets a connection in use (one the API server takes within that time)
    /// be ended by its answer instead; those idle longer are the ones its
    /// pool, which takes the most recently used connection first, is least
    /// likely to take.
    fn deadline(&self, limits: &ConnectionLimits, drain: DrainState) -> Option<(Instant, Close)> {
        match *self.phase.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Idle(since) => Some(match drain {
                DrainState::Serving => (since + limits.idle_timeout, Close::Idle),
                DrainState::Draining => (
                    since + limits.drain_idle.min(limits.idle_timeout),
                    Close::Drained,
                ),
                DrainState::Stopped => (since, Close::Drained),
            }),
            Phase::ReadingHead(since) => {
                Some((since + limits.header_read_timeout, Close::SlowHead))
            }
            Phase::Busy => None,
        }
    }
}

/// The connection's byte stream: the first byte read while idle starts a
/// request's head.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.set(|phase| match phase {
                Phase::Idle(_) => Phase::ReadingHead(Instant::now()),
                other => other,
            });
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Where a request came from, in its extensions (for per-source limits on
/// what a request may hold).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Whether its source's limits apply: false for the API server (its
    /// addresses, or its client certificate).
    pub capped: bool,
}

/// The routes, marking the connection busy from a request's complete head
/// until its answer.
#[derive(Clone)]
struct Marked {
    app: Router,
    activity: Arc<Activity>,
    peer: Peer,
}

type Incoming = axum::http::Request<hyper::body::Incoming>;

impl tower::Service<Incoming> for Marked {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Incoming>::poll_ready(&mut self.app, cx)
    }

    fn call(&mut self, mut request: Incoming) -> Self::Future {
        self.activity.set(|_| Phase::Busy);
        request.extensions_mut().insert(self.peer);
        let activity = self.activity.clone();
        let answer = tower::Service::call(&mut self.app, request);
        Box::pin(async move {
            let response = answer.await;
            activity.set(|_| Phase::Idle(Instant::now()));
            response
        })
    }
}

/// Open connections by source address.
struct Sources {
    open: Mutex<HashMap<IpAddr, usize>>,
    max_per_source: usize,
}

/// Leaves its source's count when the connection ends.
struct SourceGuard {
    sources: Arc<Sources>,
    source: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut open = self.sources.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

impl Sources {
    fn enter(self: &Arc<Self>, source: IpAddr) -> Option<SourceGuard> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            return None;
        }
        *count += 1;
        Some(SourceGuard {
            sources: self.clone(),
            source,
        })
    }
}

/// How an accepted connection counts against its source's share.
enum Admission {
    /// From one of the API server's addresses: only the global cap.
    Uncapped,
    /// Within its source's share.
    Counted(SourceGuard),
    /// Over it: answered 503, unless its client certificate shows it is the
    /// API server's. Holds one of the port's refusals.
    OverCap(OwnedSemaphorePermit),
}

/// One listening port and how its connections are served.
pub struct Port {
    pub label: PortLabel,
    pub listener: TcpListener,
    /// `None`: plain HTTP.
    pub tls: Option<TlsAcceptor>,
    pub app: Router,
    pub limits: ConnectionLimits,
}

/// A port's connections, once it has stopped accepting.
pub struct Connections {
    open: Arc<Semaphore>,
    max: usize,
}

impl Connections {
    /// Connections still open.
    pub fn count(&self) -> usize {
        self.max.saturating_sub(self.open.available_permits())
    }

    /// Resolves once every connection has ended.
    pub async fn closed(&self) {
        let _ = self
            .open
            .acquire_many(self.max.min(u32::MAX as usize) as u32)
            .await;
    }
}

impl Port {
    /// Accepts connections until `drain` is [`DrainState::Stopped`]; each is
    /// driven by its own task, which follows `drain`. Returns the port's
    /// connections, to wait for.
    pub async fn serve(
        self,
        drain: watch::Receiver<DrainState>,
        metrics: Arc<Metrics>,
    ) -> Connections {
        let max = self.limits.max_connections.max(1);
        let connections = Arc::new(Semaphore::new(max));
        let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
        let sources = Arc::new(Sources {
            open: Mutex::new(HashMap::new()),
            max_per_source: self.limits.max_per_source.max(1),
        });
        let limits = Arc::new(self.limits);
        let stopped = {
            let mut drain = drain.clone();
            async move {
                // A sender gone is a stop too.
                let _ = drain.wait_for(|state| *state == DrainState::Stopped).await;
            }
        };
        tokio::pin!(stopped);
        loop {
            // At the connection cap, further clients wait in the backlog.
            let permit = tokio::select! {
                _ = &mut stopped => break,
                permit = connections.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = &mut stopped => break,
                accepted = self.listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(connection) => connection,
                Err(err) => {
                    // E.g. out of file descriptors: back off, keep serving.
                    warn!(port = self.label.as_str(), error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admission = if limits
                .uncapped_sources
                .iter()
                .any(|cidr| cidr.contains(peer.ip()))
            {
                Admission::Uncapped
            } else if let Some(guard) = sources.enter(peer.ip()) {
                Admission::Counted(guard)
            } else if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                Admission::OverCap(refusal)
            } else {
                metrics.connection_refused(self.label, ConnectionRefusal::PerSourceUnanswered);
                debug!(port = self.label.as_str(), %peer, limit = sources.max_per_source,
                    "connection closed unanswered: too many open from this address, and \
                     {REFUSALS_AT_ONCE} refusals already in progress");
                continue;
            };
            let tls = self.tls.clone();
            let app = self.app.clone();
            let limits = limits.clone();
            let drain = drain.clone();
            let label = self.label;
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let accepted = Accepted {
                    app,
                    limits: &limits,
                    drain,
                    peer,
                    label,
                    metrics: &metrics,
                };
                match tls {
                    None => accepted.serve(tcp, false, admission).await,
                    Some(acceptor) => {
                        let tls = match tokio::time::timeout(
                            limits.handshake_timeout,
                            acceptor.accept(tcp),
                        )
                        .await
                        {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(err)) => {
                                debug!(%peer, error = %err, "TLS handshake failed");
                                metrics.connection_refused(label, ConnectionRefusal::Handshake);
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "TLS handshake timed out");
                                metrics.connection_refused(label, ConnectionRefusal::Handshake);
                                return;
                            }
                        };
                        // With client authentication, a completed handshake
                        // has a certificate the client CA signed.
                        let certified = tls.get_ref().1.peer_certificates().is_some();
                        accepted.serve(tls, certified, admission).await
                    }
                }
            });
        }
        Connections {
            open: connections,
            max,
        }
    }
}

/// An accepted connection and what serving it takes.
struct Accepted<'a> {
    app: Router,
    limits: &'a ConnectionLimits,
    drain: watch::Receiver<DrainState>,
    peer: SocketAddr,
    label: PortLabel,
    metrics: &'a Metrics,
}

impl Accepted<'_> {
    /// Serves the connection, or refuses it if it is over its source's share
    /// and not the API server's (`certified`: it presented a client
    /// certificate the client CA signed).
    async fn serve<S>(self, io: S, certified: bool, admission: Admission)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (_source, capped) = if certified {
            // The API server's: out of its source's count.
            drop(admission);
            (None, false)
        } else {
            match admission {
                Admission::Uncapped => (None, false),
                Admission::Counted(guard) => (Some(guard), true),
                Admission::OverCap(_refusal) => {
                    self.metrics
                        .connection_refused(self.label, ConnectionRefusal::PerSource);
                    debug!(port = self.label.as_str(), peer = %self.peer,
                        limit = self.limits.max_per_source,
                        "connection refused: too many open from this address");
                    refuse(io, self.peer.ip(), self.limits).await;
                    return;
                }
            }
        };
        drive(
            io,
            self.app,
            self.limits,
            self.drain,
            Peer {
                addr: self.peer,
                capped,
            },
            self.label,
            self.metrics,
        )
        .await
    }
}

/// Answers the connection's first request with 503 and closes it: the
/// request is read first (its body up to [`REFUSAL_BODY_BYTES`]), all within
/// the header timeout.
async fn refuse<S>(io: S, source: IpAddr, limits: &ConnectionLimits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limit = limits.max_per_source;
    let service = hyper::service::service_fn(move |request: Incoming| async move {
        let mut body = request.into_body();
        let mut read = 0usize;
        while read < REFUSAL_BODY_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(_)) | None => break,
            }
        }
        let text = format!(
            "too many connections from {source}: at most {limit} per source address \
             (--max-connections-per-source)\n"
        );
        let mut response = axum::http::Response::new(Full::new(Bytes::from(text)));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Ok::<_, Infallible>(response)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(false).header_read_timeout(None);
    let refused = builder.serve_connection(TokioIo::new(io), service);
    match tokio::time::timeout(limits.header_read_timeout, refused).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => debug!(%source, error = %err, "refusal not delivered"),
        Err(_) => debug!(%source, "refusal: no request within the header timeout"),
    }
}

/// Serves one connection until it ends, or its watchdog closes it (idle too
/// long, idle during the drain, or a request's head too slow).
async fn drive<S>(
    io: S,
    app: Router,
    limits: &ConnectionLimits,
    mut drain: watch::Receiver<DrainState>,
    peer: Peer,
    label: PortLabel,
    metrics: &Metrics,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = TokioIo::new(Tracked {
        inner: io,
        activity: activity.clone(),
    });
    let service = TowerToHyperService::new(Marked {
        app,
        activity: activity.clone(),
        peer,
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    // Once asked to close (idle): by when it must have, flushing included.
    let mut closing: Option<Instant> = None;
    let mut drain_open = true;
    let peer = peer.addr;
    loop {
        let deadline = match closing {
            Some(by) => Some(by),
            None => activity.deadline(limits, *drain.borrow()).map(|(at, _)| at),
        };
        let expired = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            ended = &mut connection => {
                if let Err(err) = ended {
                    debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = activity.changed.notified() => continue,
            changed = drain.changed(), if drain_open => {
                drain_open = changed.is_ok();
                continue;
            }
            _ = expired => {
                let now = Instant::now();
                if closing.is_some() {
                    debug!(%peer, port = label.as_str(), "the close did not finish in time");
                    return;
                }
                // Re-read: the phase may have changed as the timer fired.
                let Some((at, why)) = activity.deadline(limits, *drain.borrow()) else {
                    continue;
                };
                if at > now {
                    continue;
                }
                debug!(%peer, port = label.as_str(), why = why.as_str(), "closing the connection");
                if why == Close::SlowHead {
                    metrics.connection_refused(label, ConnectionRefusal::SlowHead);
                    return;
                }
                // Idle: no byte of a next request has been read. hyper
                // closes at once (TLS close_notify, then FIN), or once it
                // has written the answer it may still be flushing.
                connection.as_mut().graceful_shutdown();
                closing = Some(now + limits.header_read_timeout);
            }
        }
    }
}

//! Accepting and driving connections, the same way on both ports (HTTPS for
//! the API server, plain HTTP for metrics and probes):
//!
//! - at most `max_connections` open at once (more wait in the listen
//!   backlog), and at most `max_per_source` from one address: a pod that
//!   opens connections by the hundred is refused its extra ones, not the
//!   API server;
//! - the TLS handshake within `handshake_timeout`;
//! - a request's head within `header_read_timeout` of its first byte;
//! - a kept-alive connection closed after `idle_timeout` without a request.
//!   That is longer than the API server keeps an idle connection to a
//!   webhook (90 s): the API server always closes first, so it never sends
//!   a request on a connection this side is closing (a POST on a closed
//!   connection is not retried, and the create fails with "EOF"). hyper's
//!   own header timeout also runs while a connection is idle, which is why
//!   it is off and replaced by this.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::metrics::{ConnectionRefusal, Metrics, PortLabel};

/// The limits every connection of a port gets.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_source: usize,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
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
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, &'static str)> {
        match *self.phase.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Idle(since) => Some((since + limits.idle_timeout, "idle")),
            Phase::ReadingHead(since) => {
                Some((since + limits.header_read_timeout, "request head too slow"))
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

/// The address a request came from, in its extensions (for per-source
/// limits on what a request may hold).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The routes, marking the connection busy from a request's complete head
/// until its answer.
#[derive(Clone)]
struct Marked {
    app: Router,
    activity: Arc<Activity>,
    peer: SocketAddr,
}

type Incoming = axum::http::Request<hyper::body::Incoming>;

impl tower::Service<Incoming> for Marked {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Incoming>::poll_ready(&mut self.app, cx)
    }

    fn call(&mut self, mut request: Incoming) -> Self::Future {
        self.activity.set(|_| Phase::Busy);
        request.extensions_mut().insert(Peer(self.peer));
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

/// One listening port and how its connections are served.
pub struct Port {
    pub label: PortLabel,
    pub listener: TcpListener,
    /// `None`: plain HTTP.
    pub tls: Option<TlsAcceptor>,
    pub app: Router,
    pub limits: ConnectionLimits,
}

impl Port {
    /// Accepts connections until `stopped` resolves; each is driven by its
    /// own task, watched by `graceful` for the drain.
    pub async fn serve(
        self,
        graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
        stopped: impl Future<Output = ()>,
        metrics: Arc<Metrics>,
    ) {
        let connections = Arc::new(Semaphore::new(self.limits.max_connections.max(1)));
        let sources = Arc::new(Sources {
            open: Mutex::new(HashMap::new()),
            max_per_source: self.limits.max_per_source.max(1),
        });
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
            let Some(source) = sources.enter(peer.ip()) else {
                metrics.connection_refused(self.label, ConnectionRefusal::PerSource);
                debug!(port = self.label.as_str(), %peer, limit = sources.max_per_source,
                    "connection refused: too many open from this address");
                continue;
            };
            let tls = self.tls.clone();
            let app = self.app.clone();
            let limits = self.limits.clone();
            let watcher = graceful.watcher();
            let label = self.label;
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _source = source;
                match tls {
                    None => drive(tcp, app, &limits, watcher, peer, label, &metrics).await,
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
                        drive(tls, app, &limits, watcher, peer, label, &metrics).await
                    }
                }
            });
        }
    }
}

/// Serves one connection until it ends, the drain ends it, or its watchdog
/// closes it (idle too long, or a request's head too slow).
async fn drive<S>(
    io: S,
    app: Router,
    limits: &ConnectionLimits,
    watcher: Watcher,
    peer: SocketAddr,
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
    let connection = watcher.watch(builder.serve_connection(io, service));
    tokio::pin!(connection);
    loop {
        let deadline = activity.deadline(limits);
        let expired = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
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
            _ = expired => {
                // Re-read: the phase may have changed as the timer fired.
                if let Some((at, why)) = activity.deadline(limits)
                    && at <= Instant::now()
                {
                    debug!(%peer, port = label.as_str(), why, "closing the connection");
                    if why != "idle" {
                        metrics.connection_refused(label, ConnectionRefusal::SlowHead);
                    }
                    return;
                }
            }
        }
    }
}

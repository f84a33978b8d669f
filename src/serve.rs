//! The HTTP/1.1 accept loop and each connection's timeouts.
//!
//! `axum::serve` cannot bound how long a client takes to send its request
//! head or how long it may hold an idle keep-alive connection, so a few
//! hundred sockets that send `GET / HTTP/1.1\r\n` and stop could hold every
//! file descriptor. Here each accepted socket first takes a place in the
//! per-address and process-wide counts ([`crate::connlimit`]; refused
//! sockets are closed before anything is read), then runs on hyper's
//! HTTP/1.1 connection with upgrades (websockets), watched by one timer:
//!
//! * **header timeout** (`HTTP_HEADER_TIMEOUT`): from the first byte of a
//!   request head to the moment the head is parsed and the handler called;
//! * **idle timeout** (`HTTP_IDLE_TIMEOUT`): no byte read or written and no
//!   handler running (a handler is bounded by `REQUEST_TIMEOUT` instead).
//!   This also ends a connection whose client stopped reading its response.
//!
//! hyper's own `header_read_timeout` is not used: its clock starts as soon
//! as the connection waits for a head, so it would also close every idle
//! keep-alive connection at the (short) header timeout.
//!
//! At shutdown the loop stops accepting, asks every connection to finish
//! its in-flight request and close (idle ones close at once), and waits
//! for them. An upgraded websocket leaves this loop (its session watches
//! the shutdown token itself) but keeps its connection permit, which lives
//! inside the socket.

use std::{
    io,
    net::SocketAddr,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, extract::ConnectInfo, Router};
use hyper::{body::Incoming, server::conn::http1, Request};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_service::Service;
use tracing::{debug, warn};

use crate::{
    connlimit::{AddrLimits, Permit},
    telemetry,
};

#[derive(Clone)]
pub struct ServeSettings {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Open TCP connections per client address and in total.
    pub limits: Arc<AddrLimits>,
}

impl ServeSettings {
    /// How often a connection's timer looks at least: a request head that
    /// starts between two looks is then closed at its own deadline.
    fn tick(&self) -> Duration {
        self.header_timeout.min(self.idle_timeout)
    }
}

/// Accepts and serves connections until `shutdown` is cancelled, then
/// drains them.
pub async fn run(listener: TcpListener, router: Router, settings: ServeSettings, shutdown: CancellationToken) {
    // tracks the HTTP connections only; upgraded websockets are the
    // sessions' business
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let permit = match settings.limits.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                debug!(%peer, %why, "connection refused");
                telemetry::connection_refused(why);
                // closed without reading: the client sees the connection end
                drop(stream);
                continue;
            }
        };
        connections.spawn(connection(stream, peer, permit, router.clone(), settings.clone(), shutdown.clone()));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// `accept` failed: a connection reset before it was accepted is nothing;
/// anything else (`EMFILE`, `ENOBUFS`) is waited out briefly instead of
/// spinning.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted) {
        return;
    }
    warn!(error = %e, "accept failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Serves one connection until it ends, is upgraded, times out, or is
/// drained at shutdown.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    router: Router,
    settings: ServeSettings,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked { io: stream, activity: activity.clone(), _permit: permit });
    let handler_activity = activity.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let running = handler_activity.handler_started();
        // Router is always ready (its poll_ready does nothing), so call is
        // made directly; a clone is an Arc clone
        let mut router = router.clone();
        async move {
            let response = router.call(req.map(Body::new)).await;
            drop(running);
            response
        }
    });
    let mut builder = http1::Builder::new();
    // no hyper timer: the timeouts are this module's (see the module doc)
    builder.header_read_timeout(None);
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut draining = false;
    let check = tokio::time::sleep(settings.tick());
    let mut check = pin!(check);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.as_mut() => match activity.verdict(Instant::now(), &settings) {
                Verdict::Wait(until) => check.as_mut().reset(until),
                Verdict::Close(why) => {
                    debug!(%peer, why, "connection timed out");
                    telemetry::connection_timed_out(why);
                    return;
                }
            },
        }
    }
}

/// What a connection did last, for its timer. Times are milliseconds since
/// `start`, kept in atomics because the socket (which records them) and the
/// connection's task (which reads them) are apart once hyper owns the IO.
struct Activity {
    start: Instant,
    /// The last byte read or written.
    last_io: AtomicU64,
    /// The first byte of a request head not yet parsed, or [`NONE`].
    head_started: AtomicU64,
    /// Handlers running (hyper's HTTP/1.1 runs one at a time).
    handlers: AtomicUsize,
}

const NONE: u64 = u64::MAX;

enum Verdict {
    Wait(Instant),
    Close(&'static str),
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_io: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            handlers: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    fn read(&self) {
        let now = self.now_ms();
        self.last_io.store(now, Ordering::Relaxed);
        // bytes while no handler runs are (the start of) the next request head
        if self.handlers.load(Ordering::Acquire) == 0 && self.head_started.load(Ordering::Relaxed) == NONE {
            self.head_started.store(now, Ordering::Relaxed);
        }
    }

    fn touch(&self) {
        self.last_io.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The head is parsed and its handler called.
    fn handler_started(self: &Arc<Self>) -> Running {
        self.handlers.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NONE, Ordering::Relaxed);
        Running(self.clone())
    }

    /// Whether the connection has run out of time, or when to look again.
    fn verdict(&self, now: Instant, settings: &ServeSettings) -> Verdict {
        if self.handlers.load(Ordering::Acquire) > 0 {
            // REQUEST_TIMEOUT bounds the handler
            return Verdict::Wait(now + settings.tick());
        }
        let idle_until = self.at(self.last_io.load(Ordering::Relaxed)) + settings.idle_timeout;
        let head = self.head_started.load(Ordering::Relaxed);
        let head_until = (head != NONE).then(|| self.at(head) + settings.header_timeout);
        if head_until.is_some_and(|t| now >= t) {
            return Verdict::Close("header");
        }
        if now >= idle_until {
            return Verdict::Close("idle");
        }
        // a head that starts after this look is seen at the next one, which
        // then waits for that head's own deadline
        Verdict::Wait(head_until.unwrap_or(now + settings.tick()).min(idle_until))
    }
}

/// A running handler; dropping it (the response is ready) ends it.
struct Running(Arc<Activity>);

impl Drop for Running {
    fn drop(&mut self) {
        // the idle clock starts again when the response is ready
        self.0.touch();
        self.0.handlers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The TCP stream with its activity recorded and its connection permit
/// inside, so that an upgraded websocket keeps the permit for its life.
struct Tracked {
    io: TcpStream,
    activity: Arc<Activity>,
    _permit: Permit,
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

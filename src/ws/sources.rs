//! What wakes a connection's task: the client, its own operations'
//! responses, shared executions' frames, the keep-alive, the deadlines
//! (initialisation, token expiry, anonymous idleness) and the shutdown.
//!
//! Nearly every wake-up of a busy connection is a shared frame, so the other
//! sources are polled only when one of them woke the task ([`QuietWake`]):
//! polling the socket's read side, the operations' queue, the timers and
//! the shutdown signal on each delivery cost more than writing the frame.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
    time::{Duration, SystemTime},
};

use axum::extract::ws::{Message, WebSocket};
use futures_util::{stream::SplitStream, task::AtomicWaker, StreamExt};
use tokio::{
    sync::mpsc,
    time::{Instant, Interval, Sleep},
};
use tokio_stream::StreamMap;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{frame::Frame, running::Outgoing, shared::MemberFrames};

/// How long a closed connection waits for the client's answering Close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What woke a connection's task.
pub enum Event {
    Shutdown,
    InitTimeout,
    /// The connection's customer token reached its `exp`.
    TokenExpired,
    /// An anonymous connection ran no operation for the idle timeout.
    AnonymousIdle,
    /// A response of one of the connection's own operations.
    Outgoing(Outgoing),
    /// A frame of a shared execution (more may be ready).
    Shared((String, Frame)),
    Keepalive,
    /// A message from the client, an error, or the end of the socket.
    Client(Option<Result<Message, axum::Error>>),
}

/// The waker of the connection's sources other than shared frames: records
/// that one of them is ready before waking the task, so that a wake-up by a
/// delivery leaves them unpolled.
struct QuietWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for QuietWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

pub struct Sources {
    client: SplitStream<WebSocket>,
    /// The connection's own operations' responses (the sending halves are
    /// theirs; [`super::running`] bounds it).
    outgoing: mpsc::Receiver<Outgoing>,
    /// Made once: a fresh future per turn registered a waiter per message.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Until `connection_init`.
    init_deadline: Option<Pin<Box<Sleep>>>,
    /// From `connection_init`, when the session's token expires.
    token_deadline: Option<Pin<Box<Sleep>>>,
    /// Armed whenever an anonymous connection has nothing running.
    idle_deadline: Pin<Box<Sleep>>,
    idle: bool,
    keepalive: Interval,
    quiet: Arc<QuietWake>,
    quiet_waker: Waker,
}

impl Sources {
    pub fn new(
        client: SplitStream<WebSocket>,
        outgoing: mpsc::Receiver<Outgoing>,
        init_timeout: Duration,
        keepalive: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let mut keepalive = tokio::time::interval(keepalive);
        keepalive.reset();
        // woken: the first turn polls (and so registers) every source
        let quiet = Arc::new(QuietWake { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        Sources {
            client,
            outgoing,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            init_deadline: Some(Box::pin(tokio::time::sleep(init_timeout))),
            token_deadline: None,
            idle_deadline: Box::pin(tokio::time::sleep(Duration::ZERO)),
            idle: false,
            keepalive,
            quiet_waker: Waker::from(quiet.clone()),
            quiet,
        }
    }

    /// `connection_init` was accepted: no init deadline any more, and the
    /// token's expiry, if it has one, ends the session.
    pub fn initialised(&mut self, expires_at: Option<SystemTime>) {
        self.init_deadline = None;
        self.token_deadline = expires_at.map(|exp| Box::pin(tokio::time::sleep_until(deadline_of(exp))));
        self.repoll();
    }

    /// Arms the idle deadline when an anonymous connection's last operation
    /// ends (or it never had one), disarms it when one runs.
    pub fn watch_idle(&mut self, idle: bool, timeout: Duration) {
        if idle && !self.idle {
            self.idle_deadline.as_mut().reset(Instant::now() + timeout);
            self.repoll();
        }
        self.idle = idle;
    }

    /// The quiet sources are polled (and so registered) on the next turn.
    fn repoll(&self) {
        self.quiet.woken.store(true, Ordering::Release);
    }

    /// Waits for the next event. The quiet sources come first when they did
    /// wake the task, so a connection that always has frames waiting still
    /// reads its client.
    pub async fn next(&mut self, shared: &mut StreamMap<String, MemberFrames>) -> Event {
        std::future::poll_fn(|cx| {
            if self.quiet.woken.swap(false, Ordering::AcqRel) {
                self.quiet.task.register(cx.waker());
                if let Some(event) = self.poll_quiet() {
                    // the ones after it were not polled: next time round they are
                    self.repoll();
                    return Poll::Ready(event);
                }
            }
            if !shared.is_empty() {
                if let Poll::Ready(Some(first)) = shared.poll_next_unpin(cx) {
                    return Poll::Ready(Event::Shared(first));
                }
            }
            Poll::Pending
        })
        .await
    }

    fn poll_quiet(&mut self) -> Option<Event> {
        let mut cx = Context::from_waker(&self.quiet_waker);
        let due = |deadline: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>| {
            deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready())
        };
        if self.shutdown.as_mut().poll(&mut cx).is_ready() {
            Some(Event::Shutdown)
        } else if due(&mut self.init_deadline, &mut cx) {
            Some(Event::InitTimeout)
        } else if due(&mut self.token_deadline, &mut cx) {
            Some(Event::TokenExpired)
        } else if self.idle && self.idle_deadline.as_mut().poll(&mut cx).is_ready() {
            Some(Event::AnonymousIdle)
        } else if let Poll::Ready(Some(out)) = self.outgoing.poll_recv(&mut cx) {
            Some(Event::Outgoing(out))
        } else if self.keepalive.poll_tick(&mut cx).is_ready() {
            Some(Event::Keepalive)
        } else if let Poll::Ready(msg) = self.client.poll_next_unpin(&mut cx) {
            Some(Event::Client(msg))
        } else {
            None
        }
    }

    /// Reads what the client still sends until its answering Close (or the
    /// end), as RFC 6455 asks of the side that closed: a socket closed with
    /// unread data in it is reset, and the reset throws away the Close frame
    /// (and its code) before the client reads it.
    pub async fn drain(self) {
        let rest = self.client.take_while(|m| std::future::ready(m.is_ok())).for_each(|_| async {});
        let _ = tokio::time::timeout(CLOSE_WAIT, rest).await;
    }
}

/// The runtime instant of a wall-clock time (now, if it has passed; a
/// decade at most, which no `JWT_LIFETIME` needs and no timer overflows).
fn deadline_of(at: SystemTime) -> Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default().min(Duration::from_secs(10 * 365 * 86_400));
    Instant::now() + left
}

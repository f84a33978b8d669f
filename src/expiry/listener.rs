//! The keyspace listener: one per process, on its own connection, subscribed
//! to `__keyevent@<db>__:expired` for the db in `REDIS_URL`.
//!
//! It turns each expired key under our prefix into an order id and hands it
//! to a small pool of workers that cancel in batches, so a burst of
//! thousands of expiries neither serialises nor exhausts the database pool.
//! After every reconnect it asks for a sweep at once: Redis does not replay
//! the events that fired while we were away, and it asks the [canary] whether
//! events arrive at all. The same workers cancel the ids the nudger claims
//! while they do not ([`CancelQueue`]).
//!
//! [canary]: super::canary

use std::sync::{
    atomic::{AtomicBool, AtomicU8, Ordering},
    Arc,
};

use crate::redis::RedisConn;
use async_trait::async_trait;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use super::{
    canary::{Arrival, CanaryInbox},
    resync::Resync,
    schedule::Keys,
};
use crate::{domain::OrderId, orders::Orders, redis::subscription, telemetry};

/// Whether the listener is subscribed now and whether expired-key events
/// reach it; read by `/readyz` and the nudger.
#[derive(Default)]
pub struct ListenerState {
    up: AtomicBool,
    /// An [`Arrival`], as the canary last found it on this connection.
    arrival: AtomicU8,
    /// Set once `CONFIG` was refused, so that is said once.
    config_refused: AtomicBool,
}

impl ListenerState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn arrival(&self) -> Arrival {
        match self.arrival.load(Ordering::Relaxed) {
            1 => Arrival::Arriving,
            2 => Arrival::Missing,
            _ => Arrival::Checking,
        }
    }

    pub(super) fn set_arrival(&self, a: Arrival) {
        let n = match a {
            Arrival::Checking => 0,
            Arrival::Arriving => 1,
            Arrival::Missing => 2,
        };
        self.arrival.store(n, Ordering::Relaxed);
    }

    /// Whether expired-key events are known to reach the listener now; while
    /// not, the nudger hands its claimed ids to the workers itself.
    pub fn events_arrive(&self) -> bool {
        self.is_up() && self.arrival() == Arrival::Arriving
    }
}

/// The queue of ids to cancel, read by the listener's workers and fed by the
/// listener and (while events do not arrive) the nudger.
pub struct CancelQueue {
    tx: mpsc::Sender<OrderId>,
    rx: mpsc::Receiver<OrderId>,
}

impl Default for CancelQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(100_000);
        CancelQueue { tx, rx }
    }
}

impl CancelQueue {
    pub fn sender(&self) -> mpsc::Sender<OrderId> {
        self.tx.clone()
    }
}

/// Ids handled per database transaction.
const BATCH: usize = 500;
/// Batches in flight at once: enough to overlap round trips, few enough to
/// leave the pool to requests.
const WORKERS: usize = 4;

pub struct Listener {
    /// Where to subscribe: the Redis, or the primary a Sentinel follower names.
    pub target: subscription::Target,
    pub conn: RedisConn,
    pub keys: Keys,
    pub db: i64,
    pub orders: Arc<Orders>,
    pub state: Arc<ListenerState>,
    /// Wakes the sweeper after a reconnect.
    pub sweep_now: Arc<Notify>,
    pub canary: CanaryInbox,
    pub queue: CancelQueue,
}

struct Events {
    orders: Arc<Orders>,
    resync: Resync,
    keys: Keys,
    conn: RedisConn,
    state: Arc<ListenerState>,
    sweep_now: Arc<Notify>,
    canary: CanaryInbox,
    /// To the workers; bounded so that a flood pushes back on the socket.
    ids: mpsc::Sender<OrderId>,
}

#[async_trait]
impl subscription::Handler for Events {
    async fn connected(&mut self, reconnected: bool) {
        ensure_notifications(&mut self.conn, &self.state).await;
        // this may be another server (a restart, a failover): ask again
        self.state.set_arrival(Arrival::Checking);
        self.state.up.store(true, Ordering::Relaxed);
        telemetry::listener_up(true);
        self.canary.check();
        // this server may lack keys (emptied, or a promoted replica behind)
        self.resync.connected(self.orders.clone(), reconnected);
        if reconnected {
            telemetry::listener_reconnected();
            // every expiry during the gap was lost
            self.sweep_now.notify_one();
        }
    }

    async fn message(&mut self, _channel: &str, payload: &[u8]) {
        let Ok(key) = std::str::from_utf8(payload) else { return };
        if let Some(id) = self.keys.parse_order_key(key) {
            let _ = self.ids.send(id).await;
        } else if let Some(token) = self.keys.parse_canary_key(key) {
            self.canary.seen(token);
        }
    }

    fn disconnected(&mut self) {
        self.state.up.store(false, Ordering::Relaxed);
        telemetry::listener_up(false);
    }
}

/// Adds `E` and `x` to `notify-keyspace-events`, keeping the flags there.
/// Best effort: where CONFIG is refused (managed Redis) the server's own
/// setting stands, and the canary finds out whether events arrive.
pub async fn ensure_notifications(conn: &mut RedisConn, state: &ListenerState) {
    let current: redis::RedisResult<Vec<String>> =
        redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(conn).await;
    let flags = match current {
        Ok(v) => v.get(1).cloned().unwrap_or_default(),
        Err(e) => return config_refused(state, &e.to_string()),
    };
    let mut wanted = flags.clone();
    if !wanted.contains('E') {
        wanted.push('E');
    }
    // `A` is an alias that includes `x`
    if !wanted.contains('x') && !wanted.contains('A') {
        wanted.push('x');
    }
    if wanted == flags {
        return;
    }
    let set: redis::RedisResult<()> =
        redis::cmd("CONFIG").arg("SET").arg("notify-keyspace-events").arg(&wanted).query_async(conn).await;
    match set {
        Ok(()) => info!(before = %flags, after = %wanted, "enabled Redis keyspace notifications for expired keys"),
        Err(e) => config_refused(state, &e.to_string()),
    }
}

/// Not a problem in itself (the operator may have set the flags): said once,
/// at INFO; the canary warns if events really are missing.
fn config_refused(state: &ListenerState, why: &str) {
    if !state.config_refused.swap(true, Ordering::Relaxed) {
        info!(
            error = why,
            "Redis refuses CONFIG (managed Redis?): keeping its notify-keyspace-events as set; checking with a canary key that expired-key events arrive"
        );
    }
}

impl Listener {
    pub async fn run(self, tracker: TaskTracker, shutdown: CancellationToken) {
        let CancelQueue { tx, rx } = self.queue;
        tracker.spawn(workers(self.orders.clone(), rx, tx.clone(), tracker.clone(), shutdown.clone()));
        let mut events = Events {
            orders: self.orders.clone(),
            resync: Resync::default(),
            keys: self.keys.clone(),
            conn: self.conn.clone(),
            state: self.state.clone(),
            sweep_now: self.sweep_now.clone(),
            canary: self.canary,
            ids: tx,
        };
        let channel = format!("__keyevent@{}__:expired", self.db);
        subscription::run(self.target, channel, "expiry listener", &mut events, shutdown).await;
        self.state.up.store(false, Ordering::Relaxed);
    }
}

/// Cancels the ids from the listener in batches, `WORKERS` at a time.
async fn workers(
    orders: Arc<Orders>,
    mut rx: mpsc::Receiver<OrderId>,
    tx: mpsc::Sender<OrderId>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(WORKERS));
    let mut buf = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv_many(&mut buf, BATCH) => n,
        };
        if n == 0 {
            return;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let ids = std::mem::replace(&mut buf, Vec::with_capacity(BATCH));
        let orders = orders.clone();
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            match orders.expire(&ids).await {
                Ok(early) => {
                    for (id, deadline) in early {
                        // the event beat the database clock: look again at the deadline
                        let tx = tx.clone();
                        let shutdown = shutdown.clone();
                        tokio::spawn(async move {
                            let wait = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = tokio::time::sleep(wait + std::time::Duration::from_millis(5)) => { let _ = tx.send(id).await; }
                            }
                        });
                    }
                }
                Err(e) => warn!(error = %e, count = ids.len(), "could not cancel expired orders now; the sweep will"),
            }
            drop(permit);
        });
    }
}

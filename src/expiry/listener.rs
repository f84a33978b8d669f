//! The keyspace listener: one per process, on its own connection, subscribed
//! to `__keyevent@<db>__:expired` for the db in `REDIS_URL`.
//!
//! It turns each expired key under our prefix into an order id and hands it
//! to a small pool of workers that cancel in batches, so a burst of
//! thousands of expiries neither serialises nor exhausts the database pool.
//! After every reconnect it asks for a sweep at once: Redis does not replay
//! the events that fired while we were away.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use super::Keys;
use crate::{domain::OrderId, orders::Orders, pubsub, telemetry};

/// Whether the listener is subscribed now; read by `/readyz`.
#[derive(Default)]
pub struct ListenerState {
    up: AtomicBool,
    /// Set once `CONFIG SET` was refused, so the warning is said once.
    config_refused: AtomicBool,
}

impl ListenerState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// Ids handled per database transaction.
const BATCH: usize = 500;
/// Batches in flight at once: enough to overlap round trips, few enough to
/// leave the pool to requests.
const WORKERS: usize = 4;

pub struct Listener {
    pub client: redis::Client,
    pub conn: ConnectionManager,
    pub keys: Keys,
    pub db: i64,
    pub orders: Arc<Orders>,
    pub state: Arc<ListenerState>,
    /// Wakes the sweeper after a reconnect.
    pub sweep_now: Arc<Notify>,
}

struct Events {
    keys: Keys,
    conn: ConnectionManager,
    state: Arc<ListenerState>,
    sweep_now: Arc<Notify>,
    /// To the workers; bounded so that a flood pushes back on the socket.
    ids: mpsc::Sender<OrderId>,
}

#[async_trait]
impl pubsub::Handler for Events {
    async fn connected(&mut self, reconnected: bool) {
        ensure_notifications(&mut self.conn, &self.state).await;
        self.state.up.store(true, Ordering::Relaxed);
        telemetry::listener_up(true);
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
        }
    }

    fn disconnected(&mut self) {
        self.state.up.store(false, Ordering::Relaxed);
        telemetry::listener_up(false);
    }
}

/// Adds `E` and `x` to `notify-keyspace-events`, keeping the flags there.
/// Where CONFIG is refused (managed Redis), warns once: the sweep carries on.
pub async fn ensure_notifications(conn: &mut ConnectionManager, state: &ListenerState) {
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

fn config_refused(state: &ListenerState, why: &str) {
    if !state.config_refused.swap(true, Ordering::Relaxed) {
        error!(
            error = why,
            "cannot read or set notify-keyspace-events (CONFIG refused): set `notify-keyspace-events Ex` on the Redis server; until then the sweep alone cancels expired orders"
        );
    }
}

impl Listener {
    pub async fn run(self, tracker: TaskTracker, shutdown: CancellationToken) {
        let (tx, rx) = mpsc::channel(100_000);
        tracker.spawn(workers(self.orders.clone(), rx, tx.clone(), tracker.clone(), shutdown.clone()));
        let mut events = Events {
            keys: self.keys.clone(),
            conn: self.conn.clone(),
            state: self.state.clone(),
            sweep_now: self.sweep_now.clone(),
            ids: tx,
        };
        let channel = format!("__keyevent@{}__:expired", self.db);
        pubsub::run(self.client, channel, "expiry listener", &mut events, shutdown).await;
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

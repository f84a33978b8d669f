//! The keyspace listener: one per process, on its own connection, subscribed
//! to `__keyevent@<db>__:expired` for the db in `REDIS_URL`. On a Cluster,
//! where notifications are per node, it subscribes to every primary on a
//! connection of its own (replicas never expire keys) and follows the
//! topology: it re-reads the primaries every [`REFRESH`] and whenever a
//! subscription loses its node, starts subscriptions for new primaries,
//! stops those of demoted or removed ones, and enables notifications and
//! sweeps at once on each new primary (keys written just before a
//! failover may be lost with the old primary).
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

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
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
use crate::{
    domain::OrderId,
    orders::Orders,
    redis::{
        cluster::{self, ClusterTarget},
        subscription, Topology,
    },
    telemetry,
};

/// Whether the listener is subscribed now (on a Cluster: to every primary)
/// and whether expired-key events reach it; read by `/readyz` and the nudger.
#[derive(Default)]
pub struct ListenerState {
    /// Subscriptions up now, of `expected` (one, or one per primary).
    subscribed: AtomicUsize,
    expected: AtomicUsize,
    /// An [`Arrival`], as the canary last found it on this connection.
    arrival: AtomicU8,
    /// Set once `CONFIG` was refused, so that is said once.
    config_refused: AtomicBool,
}

impl ListenerState {
    pub fn is_up(&self) -> bool {
        let expected = self.expected.load(Ordering::Relaxed);
        expected > 0 && self.subscribed.load(Ordering::Relaxed) >= expected
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
    /// One server (or the primary a Sentinel follower names), or the
    /// Cluster whose primaries it subscribes to.
    pub topology: Topology,
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

/// How often a Cluster's primaries are read again (also at once when a
/// subscription loses its node).
pub const REFRESH: Duration = Duration::from_secs(1);

/// One subscription's handler (one per primary on a Cluster).
#[derive(Clone)]
struct Events {
    orders: Arc<Orders>,
    resync: Resync,
    keys: Keys,
    /// Where `CONFIG SET notify-keyspace-events` goes: the server itself.
    config: ConfigVia,
    state: Arc<ListenerState>,
    sweep_now: Arc<Notify>,
    canary: CanaryInbox,
    /// To the workers; bounded so that a flood pushes back on the socket.
    ids: mpsc::Sender<OrderId>,
    /// Whether this subscription counts in `state.subscribed` now.
    up: bool,
    /// Sweep on the first subscribe too: a primary that appeared after
    /// start (a promoted replica) may have missed keys and events.
    sweep_on_connect: bool,
    /// Tells the Cluster watcher that this node went away.
    lost: Option<Arc<Notify>>,
}

#[derive(Clone)]
enum ConfigVia {
    Conn(RedisConn),
    /// A Cluster primary, reached on a short-lived connection of its own.
    Node(Box<redis::Client>),
}

impl Events {
    /// This subscription ended for good: it no longer counts.
    fn release(&mut self) {
        if std::mem::take(&mut self.up) {
            self.state.subscribed.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl subscription::Handler for Events {
    async fn connected(&mut self, reconnected: bool) {
        match &self.config {
            ConfigVia::Conn(conn) => ensure_notifications(&mut conn.clone(), &self.state).await,
            ConfigVia::Node(client) => {
                let enable = async {
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    ensure_notifications(&mut conn, &self.state).await;
                    Ok::<_, redis::RedisError>(())
                };
                // bounded: this subscription reads nothing meanwhile
                if !matches!(tokio::time::timeout(Duration::from_secs(2), enable).await, Ok(Ok(()))) {
                    warn!("could not reach a Cluster primary to enable its keyspace notifications; the canary checks whether events arrive");
                }
            }
        }
        // this may be another server (a restart, a failover): ask again
        self.state.set_arrival(Arrival::Checking);
        if !std::mem::replace(&mut self.up, true) {
            self.state.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        telemetry::listener_up(self.state.is_up());
        self.canary.check();
        if reconnected {
            telemetry::listener_reconnected();
        }
        // a reconnect, or a Cluster primary that appeared after the start
        let another_server = reconnected || std::mem::take(&mut self.sweep_on_connect);
        // this server may lack keys (emptied, or a promoted replica behind)
        self.resync.connected(self.orders.clone(), another_server);
        if another_server {
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
        self.release();
        telemetry::listener_up(false);
        if let Some(lost) = &self.lost {
            lost.notify_one();
        }
    }
}

/// Adds `E` and `x` to `notify-keyspace-events`, keeping the flags there.
/// Best effort: where CONFIG is refused (managed Redis) the server's own
/// setting stands, and the canary finds out whether events arrive.
pub async fn ensure_notifications(conn: &mut impl redis::aio::ConnectionLike, state: &ListenerState) {
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
        let events = Events {
            orders: self.orders.clone(),
            resync: Resync::default(),
            keys: self.keys.clone(),
            config: ConfigVia::Conn(self.conn.clone()),
            state: self.state.clone(),
            sweep_now: self.sweep_now.clone(),
            canary: self.canary,
            ids: tx,
            up: false,
            sweep_on_connect: false,
            lost: None,
        };
        let channel = format!("__keyevent@{}__:expired", self.db);
        match self.topology {
            Topology::Single(target) => {
                self.state.expected.store(1, Ordering::Relaxed);
                let mut events = events;
                subscription::run(target, channel, "expiry listener", &mut events, shutdown).await;
                events.release();
            }
            Topology::Cluster(target) => {
                let primaries = Primaries { target, conn: self.conn, events, channel, tracker };
                primaries.follow(shutdown).await;
            }
        }
    }
}

/// A Cluster's keyspace-event subscriptions, one per primary.
struct Primaries {
    target: ClusterTarget,
    conn: RedisConn,
    /// The handler each new subscription starts from.
    events: Events,
    channel: String,
    tracker: TaskTracker,
}

impl Primaries {
    async fn follow(self, shutdown: CancellationToken) {
        let lost = Arc::new(Notify::new());
        let mut running: HashMap<String, CancellationToken> = HashMap::new();
        let mut started = false;
        let mut failing = false;
        loop {
            let read = tokio::time::timeout(Duration::from_secs(2), cluster::primaries(&mut self.conn.clone())).await;
            match read {
                Ok(Ok(now)) if !now.is_empty() => {
                    failing = false;
                    let before = running.len();
                    running.retain(|addr, stop| {
                        let keep = now.contains(addr);
                        if !keep {
                            info!(node = %addr, "no longer a Cluster primary: its keyspace-event subscription stops");
                            stop.cancel();
                        }
                        keep
                    });
                    let mut changed = running.len() != before;
                    for addr in &now {
                        if running.contains_key(addr) {
                            continue;
                        }
                        match self.target.node_client(addr) {
                            Ok(client) => {
                                let stop = shutdown.child_token();
                                self.spawn(addr, client, started, lost.clone(), stop.clone());
                                running.insert(addr.clone(), stop);
                                changed = true;
                            }
                            Err(e) => warn!(node = %addr, error = %e, "cannot make a client for a Cluster primary"),
                        }
                    }
                    self.events.state.expected.store(running.len(), Ordering::Relaxed);
                    if changed {
                        info!(primaries = ?now, "expiry listener follows these Cluster primaries");
                        if started {
                            // a failover or a removed node: what it held may be gone
                            self.events.sweep_now.notify_one();
                        }
                    }
                    started = true;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) if !failing => {
                    failing = true;
                    warn!(error = %e, "cannot read the Cluster's primaries; retrying");
                }
                Ok(Err(_)) => {}
                Err(_) => failing = true,
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(REFRESH) => {}
                _ = lost.notified() => {}
            }
        }
        for stop in running.values() {
            stop.cancel();
        }
        self.events.state.expected.store(0, Ordering::Relaxed);
    }

    fn spawn(&self, addr: &str, client: redis::Client, new: bool, lost: Arc<Notify>, stop: CancellationToken) {
        let mut events = self.events.clone();
        events.config = ConfigVia::Node(Box::new(client.clone()));
        events.sweep_on_connect = new;
        events.lost = Some(lost);
        let channel = self.channel.clone();
        let addr = addr.to_string();
        self.tracker.spawn(async move {
            info!(node = %addr, "expiry listener subscribes to a Cluster primary");
            subscription::run(client, channel, "expiry listener", &mut events, stop).await;
            events.release();
        });
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

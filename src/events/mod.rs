//! Order events, from the transaction that recorded them to every subscriber
//! on every instance.
//!
//! * The transaction that changes an order writes an outbox row (its id is
//!   the event id). The instance that committed hands the event to its relay
//!   at once and delivers it to its own subscribers.
//! * The relay `PUBLISH`es to `<prefix>events` and marks the rows published;
//!   rows it could not publish (Redis away, or an instance died) are claimed
//!   again by some relay after a grace period, until Redis takes them.
//!   Published rows are kept for [`OUTBOX_RETENTION`], then pruned.
//! * The fan-out is one Redis subscription per process feeding a tokio
//!   broadcast that every GraphQL subscription filters. Event ids already
//!   delivered are dropped, so a re-published event reaches nobody twice.
//! * Redis drops messages for a subscription that is down, so a fan-out
//!   that reconnects reads what it may have missed from the outbox (the
//!   database is the truth) and tells subscriptions to re-read snapshots.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    domain::{CustomerId, OrderEvent},
    redis::subscription,
    store::Store,
    telemetry,
};

/// What a GraphQL subscription receives.
#[derive(Clone, Debug)]
pub enum Fanout {
    Event(Arc<OrderEvent>),
    /// The event connection was lost and is back: events may have been
    /// missed, so snapshots should be read again.
    Resync,
}

/// Events kept per subscriber before it counts as lagging. A burst larger
/// than this reaches a slow subscriber as an explicit error or a snapshot.
pub const BROADCAST_CAPACITY: usize = 16_384;
/// Event ids remembered for de-duplication.
const SEEN_CAPACITY: usize = 200_000;
/// An outbox row this old was not published by its instance: claim it.
const OUTBOX_GRACE: Duration = Duration::from_secs(2);
const OUTBOX_POLL: Duration = Duration::from_millis(500);
/// How long published events stay readable for a reconnecting fan-out.
pub const OUTBOX_RETENTION: Duration = Duration::from_secs(120);
/// A replay covers this much before the loss was noticed: a dead
/// connection is noticed within a ping interval and its timeout, and
/// instances' clocks may differ a little.
const REPLAY_MARGIN: Duration = Duration::from_secs(15);
/// The most events one replay delivers.
const REPLAY_LIMIT: usize = 100_000;

#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every event: the admin's subscriptions hold receivers of this.
    tx: broadcast::Sender<Fanout>,
    /// One channel per customer with live subscriptions, carrying only that
    /// customer's events, so that an event wakes only the subscriptions that
    /// may see it (with 10,000 storefronts connected, waking all of them per
    /// event cost ~60 ms of CPU). Channels without receivers are dropped.
    customers: Mutex<CustomerChannels>,
    /// To the relay: events committed by this instance, to publish now.
    relay: mpsc::UnboundedSender<Vec<OrderEvent>>,
    seen: Mutex<Seen>,
    fanout_up: AtomicBool,
    /// Bumped on every event delivered here, every resync and every
    /// product change made here: whoever keeps a copy of the catalog
    /// (stock moves with orders) knows it went stale.
    changes: Arc<AtomicU64>,
}

#[derive(Default)]
struct CustomerChannels {
    by_customer: HashMap<CustomerId, broadcast::Sender<Fanout>>,
    /// Subscriptions since the last clean-up of unused channels.
    since_cleanup: usize,
}

/// Events one customer's channel holds for a slow subscription: a customer
/// has few orders in flight; the ring buffer is allocated up front.
const CUSTOMER_CAPACITY: usize = 64;

#[derive(Default)]
struct Seen {
    ids: HashSet<i64>,
    order: VecDeque<i64>,
}

impl Seen {
    /// True the first time an id is offered.
    fn first_time(&mut self, id: i64) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}

/// The receiving end of the relay channel, consumed by [`run_relay`].
pub struct RelayInbox(mpsc::UnboundedReceiver<Vec<OrderEvent>>);

impl EventBus {
    pub fn new() -> (EventBus, RelayInbox) {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (relay, inbox) = mpsc::unbounded_channel();
        let bus = EventBus {
            inner: Arc::new(Inner {
                tx,
                customers: Mutex::default(),
                relay,
                seen: Mutex::default(),
                fanout_up: AtomicBool::new(false),
                changes: Arc::default(),
            }),
        };
        (bus, RelayInbox(inbox))
    }

    /// Events committed by this instance: deliver locally now, publish to
    /// the other instances through the relay.
    pub fn publish(&self, events: Vec<OrderEvent>) {
        if events.is_empty() {
            return;
        }
        for e in &events {
            self.deliver(Arc::new(e.clone()));
        }
        let _ = self.inner.relay.send(events);
    }

    fn deliver(&self, event: Arc<OrderEvent>) {
        let first = self.inner.seen.lock().expect("seen lock").first_time(event.event_id);
        if !first {
            return;
        }
        self.inner.changes.fetch_add(1, Ordering::AcqRel);
        let customer = event.order.customer_id;
        let _ = self.inner.tx.send(Fanout::Event(event.clone()));
        let mut channels = self.inner.customers.lock().expect("channels lock");
        if let Some(tx) = channels.by_customer.get(&customer) {
            if tx.send(Fanout::Event(event)).is_err() {
                channels.by_customer.remove(&customer);
            }
        }
    }

    /// Whether an event id was delivered here already.
    fn seen(&self, id: i64) -> bool {
        self.inner.seen.lock().expect("seen lock").ids.contains(&id)
    }

    /// Tells every subscription that events may have been missed.
    fn resync(&self) {
        self.inner.changes.fetch_add(1, Ordering::AcqRel);
        let _ = self.inner.tx.send(Fanout::Resync);
        let mut channels = self.inner.customers.lock().expect("channels lock");
        channels.by_customer.retain(|_, tx| tx.send(Fanout::Resync).is_ok());
    }

    /// The events a subscription may see: one customer's (`Some`), or all
    /// (`None`, the admin).
    pub fn subscribe(&self, owner: Option<CustomerId>) -> broadcast::Receiver<Fanout> {
        let Some(customer) = owner else { return self.inner.tx.subscribe() };
        let mut channels = self.inner.customers.lock().expect("channels lock");
        channels.since_cleanup += 1;
        if channels.since_cleanup >= 1024 {
            channels.since_cleanup = 0;
            channels.by_customer.retain(|_, tx| tx.receiver_count() > 0);
        }
        channels.by_customer.entry(customer).or_insert_with(|| broadcast::channel(CUSTOMER_CAPACITY).0).subscribe()
    }

    /// A counter that moves whenever the catalog may have changed: every
    /// order event delivered here (committed here or elsewhere), every
    /// resync, every product created or restocked here. It moves
    /// synchronously: a change made by this instance has moved it before
    /// the request that made it is answered.
    pub fn changes(&self) -> Arc<AtomicU64> {
        self.inner.changes.clone()
    }

    /// A product was created or restocked by this instance. (Other
    /// instances' product changes reach no counter here: caches bound what
    /// they hide by their TTL.)
    pub fn catalog_changed(&self) {
        self.inner.changes.fetch_add(1, Ordering::AcqRel);
    }

    pub fn fanout_up(&self) -> bool {
        self.inner.fanout_up.load(Ordering::Relaxed)
    }

    pub fn subscribers(&self) -> usize {
        let channels = self.inner.customers.lock().expect("channels lock");
        self.inner.tx.receiver_count() + channels.by_customer.values().map(|tx| tx.receiver_count()).sum::<usize>()
    }
}

/// Publishes events to Redis and marks them published in the outbox once
/// Redis has them. Runs until shutdown, then publishes what it still holds.
pub async fn run_relay(
    mut inbox: RelayInbox,
    store: Arc<dyn Store>,
    conn: ConnectionManager,
    channel: String,
    shutdown: CancellationToken,
) {
    let mut poll = tokio::time::interval(OUTBOX_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf: Vec<Vec<OrderEvent>> = Vec::new();
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                while let Ok(events) = inbox.0.try_recv() {
                    publish(&store, &conn, &channel, events).await;
                }
                return;
            }
            n = inbox.0.recv_many(&mut buf, 64) => {
                if n == 0 { return; }
                let events: Vec<OrderEvent> = buf.drain(..).flatten().collect();
                publish(&store, &conn, &channel, events).await;
            }
            _ = poll.tick() => {
                ticks += 1;
                let now = Utc::now();
                let before = now - chrono::Duration::from_std(OUTBOX_GRACE).expect("small");
                let lease = now + chrono::Duration::seconds(10);
                match store.outbox_claim(before, lease, 1000).await {
                    Ok(events) if !events.is_empty() => {
                        debug!(count = events.len(), "relaying events left in the outbox");
                        publish(&store, &conn, &channel, events).await;
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "outbox poll failed"),
                }
                if let Ok(n) = store.outbox_len().await {
                    telemetry::outbox_backlog(n);
                }
                // every ~10 s: forget what every fan-out has had time to read
                if ticks.is_multiple_of(20) {
                    let horizon = now - chrono::Duration::from_std(OUTBOX_RETENTION).expect("small");
                    if let Err(e) = store.outbox_prune(horizon).await {
                        debug!(error = %e, "outbox prune failed");
                    }
                }
            }
        }
    }
}

/// Publishes events and marks them published; on failure they stay in the
/// outbox and a later poll publishes them.
async fn publish(store: &Arc<dyn Store>, conn: &ConnectionManager, channel: &str, events: Vec<OrderEvent>) {
    if events.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for e in &events {
        pipe.publish(channel, serde_json::to_string(e).expect("events serialise")).ignore();
    }
    match pipe.query_async::<()>(&mut conn.clone()).await {
        Ok(()) => {
            let ids: Vec<i64> = events.iter().map(|e| e.event_id).collect();
            if let Err(e) = store.outbox_published(&ids, Utc::now()).await {
                // published but not marked: it will be published again,
                // and receivers drop the duplicate
                warn!(error = %e, "could not mark relayed outbox rows published");
            }
        }
        Err(e) => {
            telemetry::relay_failed();
            warn!(error = %e, count = events.len(), "could not publish events; they stay in the outbox and are retried");
        }
    }
}

struct FanoutHandler {
    bus: EventBus,
    store: Arc<dyn Store>,
    /// When the last connection was noticed lost.
    lost_at: Option<DateTime<Utc>>,
}

#[async_trait]
impl subscription::Handler for FanoutHandler {
    async fn connected(&mut self, reconnected: bool) {
        self.bus.inner.fanout_up.store(true, Ordering::Relaxed);
        if reconnected {
            // events published while this subscription was down reached
            // nobody here: read them from the outbox
            let lost_at = self.lost_at.take().unwrap_or_else(Utc::now);
            let since = lost_at - chrono::Duration::from_std(REPLAY_MARGIN).expect("small");
            let (bus, store) = (self.bus.clone(), self.store.clone());
            tokio::spawn(async move {
                match store.outbox_since(since, REPLAY_LIMIT).await {
                    Ok(events) => {
                        info!(count = events.len(), "event fan-out replayed events from the outbox after a reconnect");
                        for e in events {
                            bus.deliver(Arc::new(e));
                        }
                    }
                    Err(e) => warn!(error = %e, "event fan-out could not read missed events from the outbox"),
                }
                // and subscriptions re-read their snapshots in any case
                bus.resync();
            });
        }
    }

    async fn message(&mut self, _channel: &str, payload: &[u8]) {
        // this instance's own events (already delivered when they were
        // committed) come back too: drop them before parsing the order
        if leading_event_id(payload).is_some_and(|id| self.bus.seen(id)) {
            return;
        }
        match serde_json::from_slice::<OrderEvent>(payload) {
            Ok(event) => self.bus.deliver(Arc::new(event)),
            Err(e) => warn!(error = %e, "ignoring a malformed order event"),
        }
    }

    fn disconnected(&mut self) {
        self.bus.inner.fanout_up.store(false, Ordering::Relaxed);
        self.lost_at.get_or_insert_with(Utc::now);
    }
}

/// The `event_id` of a published event, read from the start of its JSON
/// (serde writes `OrderEvent`'s fields in order); `None` if it is not there,
/// and the full parse decides.
fn leading_event_id(payload: &[u8]) -> Option<i64> {
    let rest = payload.strip_prefix(b"{\"event_id\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// The one Redis subscription of this process to `<prefix>events`.
pub async fn run_fanout(
    bus: EventBus,
    store: Arc<dyn Store>,
    client: redis::Client,
    channel: String,
    shutdown: CancellationToken,
) {
    let mut handler = FanoutHandler { bus, store, lost_at: None };
    subscription::run(client, channel, "event fan-out", &mut handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_id: i64, customer: i64) -> OrderEvent {
        use crate::domain::{Order, OrderId, OrderStatus};
        let now = chrono::Utc::now();
        let order = Order {
            id: OrderId(event_id),
            customer_id: CustomerId(customer),
            status: OrderStatus::Cancelled,
            lines: Vec::new(),
            total_cents: 0,
            currency: "USD".into(),
            created_at: now,
            expires_at: now,
            paid_at: None,
            cancelled_at: Some(now),
            cancel_reason: None,
        };
        OrderEvent { event_id, order }
    }

    #[tokio::test]
    async fn a_customer_channel_carries_only_that_customers_events_and_the_admin_gets_all() {
        let (bus, _inbox) = EventBus::new();
        let mut admin = bus.subscribe(None);
        let mut ann = bus.subscribe(Some(CustomerId(1)));
        let mut bob = bus.subscribe(Some(CustomerId(2)));
        bus.publish(vec![event(10, 1), event(11, 2), event(10, 1)]);
        let id = |f: Fanout| match f {
            Fanout::Event(e) => e.event_id,
            Fanout::Resync => 0,
        };
        assert_eq!(id(admin.try_recv().unwrap()), 10);
        assert_eq!(id(admin.try_recv().unwrap()), 11);
        assert!(admin.try_recv().is_err(), "a duplicate id is dropped");
        assert_eq!(id(ann.try_recv().unwrap()), 10);
        assert!(ann.try_recv().is_err());
        assert_eq!(id(bob.try_recv().unwrap()), 11);
        drop(bob);
        bus.publish(vec![event(12, 2)]);
        assert!(
            !bus.inner.customers.lock().unwrap().by_customer.contains_key(&CustomerId(2)),
            "unused channel dropped"
        );
        bus.resync();
        assert_eq!(id(ann.try_recv().unwrap()), 0);
    }

    #[test]
    fn the_event_id_is_read_from_the_published_json_without_parsing_it() {
        let json = serde_json::to_vec(&event(42, 7)).unwrap();
        assert_eq!(leading_event_id(&json), Some(42));
        assert_eq!(leading_event_id(b"{\"order\":{},\"event_id\":1}"), None);
        assert_eq!(leading_event_id(b"{\"event_id\":"), None);
        assert_eq!(leading_event_id(b"garbage"), None);
    }

    #[test]
    fn an_event_id_is_delivered_once() {
        let mut seen = Seen::default();
        assert!(seen.first_time(1));
        assert!(!seen.first_time(1));
        assert!(seen.first_time(2));
    }
}

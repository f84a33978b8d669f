//! Order events, from the transaction that recorded them to every subscriber
//! on every instance.
//!
//! * The transaction that changes an order writes an outbox row (its id is
//!   the event id; [`outbox`] holds the rules for reading those rows). The
//!   instance that committed hands the event to the [`EventBus`], which
//!   delivers it to its own subscribers at once and passes it to its
//!   [`relay`], which publishes it to the other instances through Redis.
//! * The [`fanout`] is one Redis subscription per process feeding the bus.
//!   The bus drops event ids already delivered, so a re-published event
//!   reaches nobody twice, and wakes only the subscriptions that may see an
//!   event: the admin's, and the channel of the order's customer.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use tokio::sync::{broadcast, mpsc};

use crate::domain::{CustomerId, OrderEvent};

pub mod fanout;
pub mod outbox;
pub mod relay;

use relay::RelayInbox;

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

/// This process's order events: delivered to its subscriptions, handed to
/// its relay, counted for whoever caches the catalog. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every event: the admin's subscriptions hold receivers of this.
    tx: broadcast::Sender<Fanout>,
    /// One channel per customer with live subscriptions, carrying only that
    /// customer's events, so that an event wakes only the subscriptions that
    /// may see it (waking every connected storefront per event was a large
    /// cost per event; see the websocket scenarios in BENCHMARKS.md).
    /// Channels without receivers are dropped.
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
pub const CUSTOMER_CAPACITY: usize = 64;

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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn event(event_id: i64, customer: i64) -> OrderEvent {
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
    fn an_event_id_is_delivered_once() {
        let mut seen = Seen::default();
        assert!(seen.first_time(1));
        assert!(!seen.first_time(1));
        assert!(seen.first_time(2));
    }
}

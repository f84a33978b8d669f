//! Order events, from the transaction that recorded them to every subscriber
//! on every instance.
//!
//! * The transaction that changes an order writes an outbox row (its id is
//!   the event id). The instance that committed hands the event to its relay
//!   at once and delivers it to its own subscribers.
//! * The relay `PUBLISH`es to `<prefix>events` and deletes the outbox rows;
//!   rows it could not publish (Redis away, or an instance died) are claimed
//!   again by some relay after a grace period, until Redis takes them.
//! * The fan-out is one Redis subscription per process feeding a tokio
//!   broadcast that every GraphQL subscription filters. Event ids already
//!   delivered are dropped, so a re-published event reaches nobody twice.
//! * Redis drops messages for a subscription that is down, so a fan-out
//!   that reconnects asks every relay (through the channel) to publish
//!   again what it published since shortly before the connection was lost.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{domain::OrderEvent, pubsub, store::Store, telemetry};

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
/// What a relay remembers of what it published, to publish it again for a
/// fan-out that reconnects.
const RESEND_WINDOW: Duration = Duration::from_secs(300);
const RESEND_CAPACITY: usize = 10_000;
/// A resend covers this much before the loss was noticed: a dead
/// connection is noticed within a ping interval and its timeout, and
/// instances' clocks may differ a little.
const RESEND_MARGIN: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every local subscription holds a receiver of this.
    tx: broadcast::Sender<Fanout>,
    /// To the relay: events committed by this instance, to publish now.
    relay: mpsc::UnboundedSender<Vec<OrderEvent>>,
    /// To the relay: resend requests, to make or to serve.
    control: mpsc::UnboundedSender<Control>,
    seen: Mutex<Seen>,
    fanout_up: AtomicBool,
}

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

/// The receiving end of the relay channels, consumed by [`run_relay`].
pub struct RelayInbox(mpsc::UnboundedReceiver<Vec<OrderEvent>>, mpsc::UnboundedReceiver<Control>);

/// Resend requests (times in milliseconds since the Unix epoch).
enum Control {
    /// This instance's fan-out is back: ask every relay to publish again
    /// what it published since `since`.
    Ask { since: i64 },
    /// Some fan-out asked: publish again what was published since `since`.
    Serve { since: i64 },
}

/// The message on the events channel that asks relays to publish again.
#[derive(serde::Serialize, serde::Deserialize)]
struct ResendRequest {
    resend_since: i64,
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

impl EventBus {
    pub fn new() -> (EventBus, RelayInbox) {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (relay, inbox) = mpsc::unbounded_channel();
        let (control, control_inbox) = mpsc::unbounded_channel();
        let bus = EventBus {
            inner: Arc::new(Inner { tx, relay, control, seen: Mutex::default(), fanout_up: AtomicBool::new(false) }),
        };
        (bus, RelayInbox(inbox, control_inbox))
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
        if first {
            let _ = self.inner.tx.send(Fanout::Event(event));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Fanout> {
        self.inner.tx.subscribe()
    }

    pub fn fanout_up(&self) -> bool {
        self.inner.fanout_up.load(Ordering::Relaxed)
    }

    pub fn subscribers(&self) -> usize {
        self.inner.tx.receiver_count()
    }
}

/// Publishes events to Redis and forgets them in the outbox once Redis has
/// them. Runs until shutdown, then publishes what it still holds.
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
    let mut recent = Recent::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                while let Ok(events) = inbox.0.try_recv() {
                    if let Some(events) = publish(&store, &conn, &channel, events).await {
                        recent.remember(events);
                    }
                }
                return;
            }
            n = inbox.0.recv_many(&mut buf, 64) => {
                if n == 0 { return; }
                let events: Vec<OrderEvent> = buf.drain(..).flatten().collect();
                if let Some(events) = publish(&store, &conn, &channel, events).await {
                    recent.remember(events);
                }
            }
            Some(control) = inbox.1.recv() => match control {
                Control::Ask { since } => ask_resend(&conn, &channel, since).await,
                Control::Serve { since } => {
                    let events = recent.since(since);
                    if !events.is_empty() {
                        debug!(count = events.len(), "publishing recent events again for a reconnected fan-out");
                        republish(&conn, &channel, &events).await;
                    }
                }
            },
            _ = poll.tick() => {
                let now = chrono::Utc::now();
                let before = now - chrono::Duration::from_std(OUTBOX_GRACE).expect("small");
                let lease = now + chrono::Duration::seconds(10);
                match store.outbox_claim(before, lease, 1000).await {
                    Ok(events) if !events.is_empty() => {
                        debug!(count = events.len(), "relaying events left in the outbox");
                        if let Some(events) = publish(&store, &conn, &channel, events).await {
                            recent.remember(events);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "outbox poll failed"),
                }
                if let Ok(n) = store.outbox_len().await {
                    telemetry::outbox_backlog(n);
                }
            }
        }
    }
}

/// Events a relay published lately, oldest first, with when.
#[derive(Default)]
struct Recent(VecDeque<(i64, OrderEvent)>);

impl Recent {
    fn remember(&mut self, events: Vec<OrderEvent>) {
        let now = millis(SystemTime::now());
        self.0.extend(events.into_iter().map(|e| (now, e)));
        let oldest = now - RESEND_WINDOW.as_millis() as i64;
        while self.0.len() > RESEND_CAPACITY || self.0.front().is_some_and(|(at, _)| *at < oldest) {
            self.0.pop_front();
        }
    }

    fn since(&self, since: i64) -> Vec<OrderEvent> {
        self.0.iter().filter(|(at, _)| *at >= since).map(|(_, e)| e.clone()).collect()
    }
}

/// Publishes events and forgets them in the outbox; returns them if Redis took them.
async fn publish(
    store: &Arc<dyn Store>,
    conn: &ConnectionManager,
    channel: &str,
    events: Vec<OrderEvent>,
) -> Option<Vec<OrderEvent>> {
    if events.is_empty() {
        return None;
    }
    let mut pipe = redis::pipe();
    for e in &events {
        pipe.publish(channel, serde_json::to_string(e).expect("events serialise")).ignore();
    }
    match pipe.query_async::<()>(&mut conn.clone()).await {
        Ok(()) => {
            let ids: Vec<i64> = events.iter().map(|e| e.event_id).collect();
            if let Err(e) = store.outbox_delete(&ids).await {
                // published but not forgotten: it will be published again,
                // and receivers drop the duplicate
                warn!(error = %e, "could not delete relayed outbox rows");
            }
            Some(events)
        }
        Err(e) => {
            telemetry::relay_failed();
            warn!(error = %e, count = events.len(), "could not publish events; they stay in the outbox and are retried");
            None
        }
    }
}

/// Asks every relay, through the channel, to publish again what it
/// published since `since`.
async fn ask_resend(conn: &ConnectionManager, channel: &str, since: i64) {
    let request = serde_json::to_string(&ResendRequest { resend_since: since }).expect("requests serialise");
    let sent = redis::cmd("PUBLISH").arg(channel).arg(request).query_async::<i64>(&mut conn.clone()).await;
    if let Err(e) = sent {
        warn!(error = %e, "could not ask the other instances to publish their recent events again");
    }
}

/// Publishes already relayed events again; receivers drop those they have.
async fn republish(conn: &ConnectionManager, channel: &str, events: &[OrderEvent]) {
    for chunk in events.chunks(1000) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.publish(channel, serde_json::to_string(e).expect("events serialise")).ignore();
        }
        if let Err(e) = pipe.query_async::<()>(&mut conn.clone()).await {
            warn!(error = %e, "could not publish recent events again");
            return;
        }
    }
}

struct FanoutHandler {
    bus: EventBus,
    /// When the last connection was noticed lost.
    lost_at: Option<SystemTime>,
}

#[async_trait]
impl pubsub::Handler for FanoutHandler {
    async fn connected(&mut self, reconnected: bool) {
        self.bus.inner.fanout_up.store(true, Ordering::Relaxed);
        if reconnected {
            let _ = self.bus.inner.tx.send(Fanout::Resync);
            // events published while this subscription was down reached
            // nobody here: have them published again
            let lost_at = self.lost_at.take().unwrap_or_else(SystemTime::now);
            let since = millis(lost_at) - RESEND_MARGIN.as_millis() as i64;
            let _ = self.bus.inner.control.send(Control::Ask { since });
        }
    }

    async fn message(&mut self, _channel: &str, payload: &[u8]) {
        match serde_json::from_slice::<OrderEvent>(payload) {
            Ok(event) => self.bus.deliver(Arc::new(event)),
            Err(e) => match serde_json::from_slice::<ResendRequest>(payload) {
                Ok(r) => {
                    let _ = self.bus.inner.control.send(Control::Serve { since: r.resend_since });
                }
                Err(_) => warn!(error = %e, "ignoring a malformed order event"),
            },
        }
    }

    fn disconnected(&mut self) {
        self.bus.inner.fanout_up.store(false, Ordering::Relaxed);
        self.lost_at = Some(SystemTime::now());
    }
}

/// The one Redis subscription of this process to `<prefix>events`.
pub async fn run_fanout(bus: EventBus, client: redis::Client, channel: String, shutdown: CancellationToken) {
    let mut handler = FanoutHandler { bus, lost_at: None };
    pubsub::run(client, channel, "event fan-out", &mut handler, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_id: i64) -> OrderEvent {
        use crate::domain::{CustomerId, Order, OrderId, OrderStatus};
        let now = chrono::Utc::now();
        let order = Order {
            id: OrderId(event_id),
            customer_id: CustomerId(1),
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

    #[test]
    fn a_relay_resends_what_it_published_since_the_asked_time() {
        let mut recent = Recent::default();
        recent.remember(vec![event(1), event(2)]);
        let ids = |v: Vec<OrderEvent>| v.iter().map(|e| e.event_id).collect::<Vec<_>>();
        assert_eq!(ids(recent.since(0)), vec![1, 2]);
        assert_eq!(ids(recent.since(millis(SystemTime::now()) + 60_000)), Vec::<i64>::new());
        recent.remember((3..=(RESEND_CAPACITY as i64 + 5)).map(event).collect());
        assert_eq!(recent.0.len(), RESEND_CAPACITY, "bounded");
        assert_eq!(recent.0.front().unwrap().1.event_id, 6, "oldest dropped first");
    }

    #[test]
    fn a_resend_request_is_not_mistaken_for_an_event() {
        let payload = serde_json::to_vec(&ResendRequest { resend_since: 5 }).unwrap();
        assert!(serde_json::from_slice::<OrderEvent>(&payload).is_err());
        assert_eq!(serde_json::from_slice::<ResendRequest>(&payload).unwrap().resend_since, 5);
    }

    #[test]
    fn an_event_id_is_delivered_once() {
        let mut seen = Seen::default();
        assert!(seen.first_time(1));
        assert!(!seen.first_time(1));
        assert!(seen.first_time(2));
    }
}

//! The rules of the contract for orders: place, pay, cancel, expire.
//!
//! Every path that ends an order goes through one of the store's conditional
//! transactions; this module adds what surrounds them: the expiry hash in
//! Redis, the events, the metrics, the log line with the order id, and the
//! refusal of a customer this instance already saw over its rate.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, SubsecRound, Utc};
use tracing::{info, warn};

use crate::{
    auth::Identity,
    domain::{CancelReason, CancelSource, CustomerId, Order, OrderEvent, OrderId, OrderRequest, OrderStatus},
    error::{ShopError, ShopResult},
    events::EventBus,
    expiry::schedule::Scheduler,
    ratelimit::{self, Refusal},
    store::{placement::PLACEMENT_WINDOW, CancelOutcome, PayOutcome, PlaceError, PlacementLimits, Store},
    telemetry,
};

pub struct Orders {
    pub store: Arc<dyn Store>,
    pub scheduler: Scheduler,
    pub events: EventBus,
    pub ttl: Duration,
    /// What one customer's unpaid orders may hold (`MAX_PENDING_ORDERS`,
    /// `MAX_PENDING_UNITS`) and how often it may place (`ORDER_RATE_LIMIT`).
    pub limits: PlacementLimits,
    pub(crate) over_rate: OverRate,
}

/// Customers this instance saw over their placement rate, each until its
/// window ends. Their further attempts (without idempotency key) are
/// refused here, without a database round trip, so a client hammering
/// `createOrder` costs the database nothing more. It refuses nothing the
/// database would have let through: the database said the window is full
/// until then, and a full window stays full until it ends.
#[derive(Default)]
pub(crate) struct OverRate(Mutex<HashMap<CustomerId, DateTime<Utc>>>);

/// Past this many customers, those whose window has ended are dropped.
const OVER_RATE_KEYS: usize = 100_000;

impl OverRate {
    fn until(&self, customer: CustomerId, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.lock().expect("over-rate lock").get(&customer).copied().filter(|until| *until > now)
    }

    fn remember(&self, customer: CustomerId, until: DateTime<Utc>, now: DateTime<Utc>) {
        let mut over = self.0.lock().expect("over-rate lock");
        if over.len() >= OVER_RATE_KEYS {
            over.retain(|_, t| *t > now);
        }
        over.insert(customer, until);
    }
}

impl Orders {
    /// Places an order for a customer: stock taken in one transaction, then
    /// the expiry hash written (a Redis failure is logged and counted; the
    /// sweep still cancels the order on time).
    pub async fn place(&self, identity: Identity, request: OrderRequest) -> ShopResult<Order> {
        let customer = match identity {
            Identity::Customer(c) => c,
            Identity::Admin => return Err(ShopError::Forbidden("orders are placed by customers, not the admin")),
            Identity::Anonymous => return Err(ShopError::Unauthenticated("sign in to place an order")),
        };
        // whole milliseconds, as clients are shown them and SQLite keeps
        // them: both stores then hold the deadline a client sees, and agree
        // at that instant (Postgres would keep microseconds after it)
        let now = Utc::now().trunc_subsecs(3);
        let expires_at =
            now + chrono::Duration::from_std(self.ttl).expect("ORDER_TTL is at most 30 days (config::MAX_ORDER_TTL)");
        if request.idempotency_key.is_none() {
            if let Some(until) = self.over_rate.until(customer, now) {
                let over = PlaceError::TooManyPlaced { max: self.limits.per_window, free_at: Some(until) };
                return Err(self.refused(over, now));
            }
        }
        let started = std::time::Instant::now();
        let placed = match self.store.place_order(customer, &request, now, expires_at, self.limits).await {
            Ok(placed) => placed,
            Err(e) => {
                if let PlaceError::TooManyPlaced { free_at: Some(until), .. } = e {
                    self.over_rate.remember(customer, until, now);
                }
                return Err(self.refused(e, now));
            }
        };
        if placed.created {
            // the reserved stock leaves the catalog (this instance's copies of it)
            self.events.catalog_changed();
            let order = &placed.order;
            self.scheduler.schedule(order).await;
            // the ids as the event's own fields, not a span's: a span per
            // order cost more than the line it carried
            info!(
                order_id = %order.id,
                customer_id = %customer,
                total_cents = order.total_cents,
                currency = %order.currency,
                expires_at = %order.expires_at,
                "order placed"
            );
            telemetry::order_created(started.elapsed());
        }
        Ok(placed.order)
    }

    /// A placement refusal in domain words; the pending limits say how long
    /// until the customer's earliest unpaid order ends (at the latest), the
    /// rate how long until its window ends.
    fn refused(&self, e: PlaceError, now: DateTime<Utc>) -> ShopError {
        let wait = |free_at: Option<DateTime<Utc>>, otherwise: Duration| {
            free_at.and_then(|t| (t - now).to_std().ok()).unwrap_or(otherwise)
        };
        match &e {
            PlaceError::TooManyPending { free_at, .. } | PlaceError::TooManyUnits { free_at, .. } => {
                let retry_after = wait(*free_at, self.ttl).max(Duration::from_secs(1));
                ShopError::RateLimited(Refusal { message: e.to_string(), retry_after })
            }
            PlaceError::TooManyPlaced { free_at, .. } => {
                ShopError::RateLimited(ratelimit::refusal(&e.to_string(), wait(*free_at, PLACEMENT_WINDOW)))
            }
            _ => e.into(),
        }
    }

    pub async fn pay(&self, identity: Identity, id: OrderId) -> ShopResult<Order> {
        match self.store.pay_order(id, identity.viewer()?, Utc::now()).await? {
            PayOutcome::Paid(event) => {
                let source = if identity == Identity::Admin { "admin" } else { "customer" };
                info!(order_id = %id, source, "order paid");
                telemetry::order_paid(source);
                let order = event.order.clone();
                self.finished(vec![event]).await;
                Ok(order)
            }
            PayOutcome::NotPending(order) if order.status == OrderStatus::PendingPayment => Err(ShopError::Expired(id)),
            PayOutcome::NotPending(order) => Err(ShopError::NotPending { id, status: order.status }),
            PayOutcome::NotFound => Err(ShopError::NotFound(format!("order {id}"))),
        }
    }

    pub async fn cancel(&self, identity: Identity, id: OrderId) -> ShopResult<Order> {
        let viewer = identity.viewer()?;
        let (reason, source) = match identity {
            Identity::Admin => (CancelReason::Admin, CancelSource::Admin),
            _ => (CancelReason::Customer, CancelSource::Customer),
        };
        match self.store.cancel_order(id, viewer, reason, Utc::now()).await? {
            CancelOutcome::Cancelled(event) => {
                let order = event.order.clone();
                self.cancelled(vec![event], source).await;
                Ok(order)
            }
            CancelOutcome::AlreadyCancelled(order) => Ok(order),
            CancelOutcome::NotPending(order) => Err(ShopError::NotPending { id, status: order.status }),
            CancelOutcome::NotFound => Err(ShopError::NotFound(format!("order {id}"))),
        }
    }

    /// Cancels orders whose expiry hash Redis expired. Returns those whose
    /// database deadline is still ahead (clock skew), to check again then.
    pub async fn expire(&self, ids: &[OrderId]) -> ShopResult<Vec<(OrderId, DateTime<Utc>)>> {
        let batch = self.store.cancel_expired(ids, Utc::now()).await?;
        self.cancelled(batch.events, CancelSource::Listener).await;
        Ok(batch.not_yet_due)
    }

    /// One sweep: cancels every overdue pending order, `batch` at a time.
    /// Returns how many this instance cancelled.
    pub async fn sweep_once(&self, now: DateTime<Utc>, batch: usize) -> ShopResult<usize> {
        let mut total = 0;
        loop {
            let events = self.store.cancel_overdue(now, batch).await?;
            let n = events.len();
            total += n;
            self.cancelled(events, CancelSource::Sweep).await;
            if n < batch {
                return Ok(total);
            }
        }
    }

    async fn cancelled(&self, events: Vec<OrderEvent>, source: CancelSource) {
        if events.is_empty() {
            return;
        }
        let now = Utc::now();
        for e in &events {
            let o = &e.order;
            let reason = o.cancel_reason.unwrap_or(CancelReason::Expired);
            info!(order_id = %o.id, reason = reason.as_db(), source = source.as_str(), "order cancelled");
            let lag = (reason == CancelReason::Expired).then(|| (now - o.expires_at).to_std().unwrap_or_default());
            telemetry::order_cancelled(reason, source, lag);
        }
        if source == CancelSource::Listener {
            // Redis has already deleted these keys, and the nudger (which
            // claims every due member) removes their deadline entries: a
            // `DEL` + `ZREM` round trip per batch would do nothing.
            self.events.publish(events);
        } else {
            self.finished(events).await;
        }
    }

    /// After a final status: publish the events, drop the Redis expiry state.
    async fn finished(&self, events: Vec<OrderEvent>) {
        let ids: Vec<OrderId> = events.iter().map(|e| e.order.id).collect();
        self.events.publish(events);
        if let Err(e) = self.scheduler.forget(&ids).await {
            warn!(error = %e, "could not remove expiry hashes (they expire by themselves)");
        }
    }
}

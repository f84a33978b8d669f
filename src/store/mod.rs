//! Storage: one trait in domain words, a Postgres and a SQLite backend.
//!
//! This module tree is the only place with SQL. Every state change of an
//! order is one conditional transaction here: `pay_order`, `cancel_order`,
//! `cancel_expired` and `cancel_overdue` all update `WHERE status =
//! 'PENDING_PAYMENT'`, so whoever changes the row first wins, and only the
//! winner returns stock and records the event in the outbox. Whether an
//! order may be placed, and which refusal it gets, is decided once for both
//! backends in [`placement`].

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::auth::Viewer;
use crate::domain::{
    CancelReason, Customer, CustomerId, Email, NewProduct, Order, OrderEvent, OrderId, OrderRequest, OrderStatus,
    Product, ProductId,
};

pub mod placement;
pub mod postgres;
pub mod sqlite;

pub use placement::PlacementLimits;

/// What can go wrong below the domain.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint (email, sku) was violated.
    #[error("{0} already exists")]
    Conflict(&'static str),
    /// The database could not be reached in time.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Database(e),
        }
    }
}

/// Why an order could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("product {0} does not exist")]
    UnknownProduct(ProductId),
    #[error("not enough stock for product {0}")]
    InsufficientStock(ProductId),
    #[error("all lines of an order must be in one currency")]
    MixedCurrencies,
    #[error("the order total exceeds 2147483647 cents")]
    TotalTooLarge,
    #[error("this idempotencyKey was already used for a different order")]
    IdempotencyConflict,
    /// The customer already holds `max` unpaid orders.
    #[error("you already have {max} unpaid orders (the most one customer may hold); pay or cancel one first")]
    TooManyPending { max: u32, free_at: Option<DateTime<Utc>> },
    /// The order would take the customer's unpaid units past `max`.
    #[error("unpaid orders may hold at most {max} units per customer; this order would hold {would_hold}")]
    TooManyUnits { max: u32, would_hold: i64, free_at: Option<DateTime<Utc>> },
    /// The customer attempted more than `max` placements in the window
    /// that ends at `free_at`.
    #[error("too many orders placed (at most {max} a minute)")]
    TooManyPlaced { max: u32, free_at: Option<DateTime<Utc>> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for PlaceError {
    fn from(e: sqlx::Error) -> Self {
        PlaceError::Store(e.into())
    }
}

/// A placed order, and whether this call created it (false: the idempotency
/// key returned an earlier order).
#[derive(Debug)]
pub struct Placed {
    pub order: Order,
    pub created: bool,
}

#[derive(Debug)]
pub enum PayOutcome {
    Paid(OrderEvent),
    NotPending(Order),
    NotFound,
}

#[derive(Debug)]
pub enum CancelOutcome {
    Cancelled(OrderEvent),
    AlreadyCancelled(Order),
    NotPending(Order),
    NotFound,
}

/// The result of cancelling expired orders named by expiry events.
#[derive(Debug, Default)]
pub struct ExpiredBatch {
    pub events: Vec<OrderEvent>,
    /// Still pending, but their database deadline is later than `now`
    /// (clocks differ): check again at the deadline.
    pub not_yet_due: Vec<(OrderId, DateTime<Utc>)>,
}

/// Whose orders a query may see: one customer's, or all (admin).

#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn ping(&self) -> Result<(), StoreError>;
    /// Connections in use and idle, for metrics.
    fn pool_state(&self) -> (u32, u32);

    async fn create_customer(&self, email: &Email, password_hash: &str) -> Result<Customer, StoreError>;
    /// The customer and its password hash.
    async fn customer_credentials(&self, email: &Email) -> Result<Option<(Customer, String)>, StoreError>;
    async fn customers_by_ids(&self, ids: &[CustomerId]) -> Result<Vec<Customer>, StoreError>;

    async fn create_product(&self, product: &NewProduct) -> Result<Product, StoreError>;
    /// Adds `quantity`; `None` when the product is missing or its stock would overflow.
    async fn restock_product(&self, id: ProductId, quantity: i32) -> Result<Option<Product>, StoreError>;
    async fn products_by_ids(&self, ids: &[ProductId]) -> Result<Vec<Product>, StoreError>;
    /// Oldest first, after the given id; at most `limit` rows.
    async fn list_products(&self, after: Option<i64>, limit: usize) -> Result<Vec<Product>, StoreError>;
    /// [`Store::products_by_ids`] for the public catalog: may be answered
    /// by a read replica, so it can lag behind the latest writes.
    async fn catalog_products(&self, ids: &[ProductId]) -> Result<Vec<Product>, StoreError> {
        self.products_by_ids(ids).await
    }
    /// [`Store::list_products`] for the public catalog (may lag, like
    /// [`Store::catalog_products`]).
    async fn catalog_page(&self, after: Option<i64>, limit: usize) -> Result<Vec<Product>, StoreError> {
        self.list_products(after, limit).await
    }
    /// Whether the read replica serves the catalog now; `None` without one.
    fn read_replica_usable(&self) -> Option<bool> {
        None
    }

    /// Takes every line's stock and inserts the order in one transaction,
    /// unless the customer's unpaid orders are at `limits` (decided in that
    /// transaction, so concurrent placements cannot both pass the last
    /// place). An idempotent replay returns its order whatever the limits.
    async fn place_order(
        &self,
        customer: CustomerId,
        request: &OrderRequest,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
        limits: PlacementLimits,
    ) -> Result<Placed, PlaceError>;
    /// The order placed earlier with the request's idempotency key, if any
    /// (`IdempotencyConflict` when its lines differ). The one rule of key
    /// replays, for both stores; they only look the key up.
    async fn order_for_key(&self, customer: CustomerId, request: &OrderRequest) -> Result<Option<Placed>, PlaceError> {
        let Some(key) = &request.idempotency_key else { return Ok(None) };
        let Some((id, placed_fingerprint)) = self.order_with_key(customer, key).await? else { return Ok(None) };
        if placed_fingerprint != fingerprint(request) {
            return Err(PlaceError::IdempotencyConflict);
        }
        Ok(self.order(id).await?.map(|order| Placed { order, created: false }))
    }
    /// The id and request [`fingerprint`] of the customer's order placed
    /// with idempotency `key`.
    async fn order_with_key(&self, customer: CustomerId, key: &str) -> Result<Option<(OrderId, String)>, StoreError>;
    async fn order(&self, id: OrderId) -> Result<Option<Order>, StoreError>;
    /// Newest first, before the given id; at most `limit` rows.
    async fn list_orders(
        &self,
        viewer: Viewer,
        status: Option<OrderStatus>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Order>, StoreError>;

    /// Pays a pending order whose deadline is after `now`.
    async fn pay_order(&self, id: OrderId, viewer: Viewer, now: DateTime<Utc>) -> Result<PayOutcome, StoreError>;
    /// Cancels a pending order with `reason` (`EXPIRED` when its deadline passed).
    async fn cancel_order(
        &self,
        id: OrderId,
        viewer: Viewer,
        reason: CancelReason,
        now: DateTime<Utc>,
    ) -> Result<CancelOutcome, StoreError>;
    /// Cancels (`EXPIRED`) those of `ids` that are pending with a deadline at
    /// or before `now`; orders another transaction holds are skipped.
    async fn cancel_expired(&self, ids: &[OrderId], now: DateTime<Utc>) -> Result<ExpiredBatch, StoreError>;
    /// Cancels (`EXPIRED`) up to `limit` pending orders past their deadline;
    /// concurrent sweepers split the work.
    async fn cancel_overdue(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<OrderEvent>, StoreError>;
    /// Unpublished outbox events recorded before `before`, claimed until
    /// `lease_until` so that other relays leave them alone meanwhile.
    async fn outbox_claim(
        &self,
        before: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OrderEvent>, StoreError>;
    /// Marks events as published; they stay for [`Store::outbox_since`] until pruned.
    async fn outbox_published(&self, event_ids: &[i64], at: DateTime<Utc>) -> Result<(), StoreError>;
    /// Every event recorded since `since`, published or not, oldest first:
    /// what a fan-out that was disconnected may have missed.
    async fn outbox_since(&self, since: DateTime<Utc>, limit: usize) -> Result<Vec<OrderEvent>, StoreError>;
    /// Forgets events published before `before`.
    async fn outbox_prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Events not yet published.
    async fn outbox_len(&self) -> Result<i64, StoreError>;
}

/// Opens the backend named by the URL scheme, creating and migrating it.
/// A Postgres replica for catalog reads (`DATABASE_READ_URL`).
#[derive(Clone, Debug)]
pub struct ReadReplica {
    pub url: String,
    /// Past this replay lag, catalog reads go to the primary.
    pub max_lag: std::time::Duration,
}

pub async fn connect(
    url: &str,
    max_connections: u32,
    timeout: std::time::Duration,
    read: Option<&ReadReplica>,
) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url, max_connections, timeout).await?))
    } else {
        Ok(Arc::new(postgres::PgStore::connect(url, max_connections, timeout, read).await?))
    }
}

/// The order if `viewer` may see it: an order that is not yours is reported
/// exactly like one that does not exist.
pub fn visible(order: Option<Order>, viewer: Viewer) -> Option<Order> {
    order.filter(|o| viewer.may_see(o))
}

/// What a payment that changed no row means, given the order as it is.
pub(crate) fn pay_refused(order: Option<Order>) -> PayOutcome {
    match order {
        Some(order) => PayOutcome::NotPending(order),
        None => PayOutcome::NotFound,
    }
}

/// What a cancellation that changed no row means, given the order as it is.
pub(crate) fn cancel_refused(order: Option<Order>) -> CancelOutcome {
    match order {
        Some(o) if o.status == OrderStatus::Cancelled => CancelOutcome::AlreadyCancelled(o),
        Some(o) => CancelOutcome::NotPending(o),
        None => CancelOutcome::NotFound,
    }
}

/// The `status` column as a status. Other text (a row written by something
/// else) is an error, reported as `INTERNAL`, never read as pending.
/// A product row, whose columns every product query of both stores
/// selects in this order: `id, sku, name, price_cents, currency, stock`.
/// Read by position: a column read by name is a hashed lookup per column
/// per row, and a catalog page reads 120 of them.
pub(crate) fn product_from<'r, R>(row: &'r R) -> Result<Product, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Product {
        id: ProductId(row.try_get(0)?),
        sku: row.try_get(1)?,
        name: row.try_get(2)?,
        price_cents: row.try_get(3)?,
        currency: row.try_get(4)?,
        stock: row.try_get(5)?,
    })
}

pub(crate) fn status_from(raw: &str) -> Result<OrderStatus, sqlx::Error> {
    OrderStatus::from_db(raw).ok_or_else(|| undecodable("status", raw))
}

/// The `cancel_reason` column: NULL is no reason, other unknown text an error.
pub(crate) fn reason_from(raw: Option<&str>) -> Result<Option<CancelReason>, sqlx::Error> {
    raw.map(|r| CancelReason::from_db(r).ok_or_else(|| undecodable("cancel_reason", r))).transpose()
}

fn undecodable(column: &str, raw: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode { index: column.into(), source: format!("unknown value {raw:?}").into() }
}

/// Gives each order its lines, from `(order id, line)` pairs.
pub(crate) fn attach_lines(orders: &mut [Order], lines: Vec<(i64, crate::domain::OrderLine)>) {
    let mut by_order: std::collections::HashMap<i64, Vec<crate::domain::OrderLine>> = Default::default();
    for (order_id, line) in lines {
        by_order.entry(order_id).or_default().push(line);
    }
    for o in orders {
        o.lines = by_order.remove(&o.id.0).unwrap_or_default();
    }
}

/// Outbox rows `(id, payload)` as events, oldest first. A row that does
/// not parse cannot be published or replayed: it is left where it is, said
/// at WARN with its id and counted, each time it is read.
pub(crate) fn events_from(rows: impl Iterator<Item = (i64, String)>) -> Vec<OrderEvent> {
    let mut events: Vec<OrderEvent> = rows
        .filter_map(|(event_id, payload)| match serde_json::from_str::<Order>(&payload) {
            Ok(order) => Some(OrderEvent { event_id, order }),
            Err(e) => {
                tracing::warn!(outbox_id = event_id, error = %e, "outbox row {event_id} is not an order event; skipped");
                crate::telemetry::outbox_row_unreadable();
                None
            }
        })
        .collect();
    events.sort_by_key(|e| e.event_id);
    events
}

/// The canonical text of an order's lines, to compare idempotent retries.
pub(crate) fn fingerprint(request: &OrderRequest) -> String {
    request.lines.iter().map(|(p, q)| format!("{}x{}", p.0, q.0)).collect::<Vec<_>>().join(",")
}

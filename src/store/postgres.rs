//! The PostgreSQL backend: several instances share it. Expiry batches lock
//! with `FOR UPDATE SKIP LOCKED`, so instances split the work instead of
//! queueing behind each other, and rows are always locked in id order.
//! Concurrent orders are placed in batches, one statement and one commit
//! each (see [`batch`]).

mod batch;
mod replica;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions, PgRow},
    PgPool, Postgres, Row, Transaction,
};

use super::{
    attach_lines, cancel_refused, events_from, fingerprint, pay_refused, visible, CancelOutcome, ExpiredBatch,
    PayOutcome, PendingLimits, PlaceError, Placed, Store, StoreError,
};
use crate::auth::Viewer;
use crate::domain::{
    CancelReason, Customer, CustomerId, Email, NewProduct, Order, OrderEvent, OrderId, OrderLine, OrderRequest,
    OrderStatus, Product, ProductId,
};

pub struct PgStore {
    pool: PgPool,
    /// Serves the public catalog when configured and usable.
    replica: Option<Arc<replica::Replica>>,
    /// Orders without idempotency key are placed in batches (group commit).
    batcher: batch::Batcher,
}

/// One order as one statement: orders with an idempotency key, and orders
/// of a batch that failed as a whole. `gate` locks the customer and counts
/// its unpaid orders after that lock (see `lock_pending` in the
/// pending-limits migration); `locked` waits for `gate`, then takes the row
/// locks in product id order (the order every transaction here uses, so
/// none deadlock) and reads the latest stock; `ok` checks every line and
/// the pending limits; `taken`, `o` and `l` write only when `ok`. The rows
/// returned are the products as locked (stock before the order), with the
/// new order's id or NULL, and the customer's unpaid orders before it.
const PLACE_ORDER: &str = "
WITH gate AS (
    SELECT * FROM lock_pending($4, $5)
), req AS (
    SELECT * FROM unnest($1::bigint[], $2::int[]) AS r(pid, qty)
), locked AS (
    SELECT p.id, p.stock, p.price_cents, p.currency, req.qty
    FROM products p JOIN req ON p.id = req.pid
    WHERE (SELECT n FROM gate) IS NOT NULL
    ORDER BY p.id
    FOR UPDATE OF p
), ok AS (
    SELECT count(*) = $3
       AND bool_and(stock >= qty)
       AND count(DISTINCT currency) = 1
       AND sum(price_cents::bigint * qty) <= $9
       AND (SELECT n FROM gate) < $10
       AND (SELECT units FROM gate) + sum(qty) <= $11 AS ok,
       sum(price_cents::bigint * qty) AS total,
       min(currency) AS currency
    FROM locked
), taken AS (
    UPDATE products p SET stock = p.stock - locked.qty
    FROM locked, ok
    WHERE ok.ok AND p.id = locked.id
), o AS (
    INSERT INTO orders (customer_id, status, total_cents, currency, created_at, expires_at, idempotency_key, fingerprint)
    SELECT $4, 'PENDING_PAYMENT', ok.total, ok.currency, $5, $6, $7, $8 FROM ok WHERE ok.ok
    RETURNING id
), l AS (
    INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents)
    SELECT o.id, locked.id, locked.qty, locked.price_cents FROM o, locked
)
SELECT locked.id, locked.stock, locked.price_cents, locked.currency, (SELECT id FROM o) AS order_id,
       (SELECT n FROM gate) AS pending_orders, (SELECT units FROM gate) AS pending_units,
       (SELECT first_expiry FROM gate) AS first_expiry
FROM locked";

const ORDER_COLUMNS: &str =
    "id, customer_id, status, total_cents, currency, created_at, expires_at, paid_at, cancelled_at, cancel_reason";

impl PgStore {
    pub async fn connect(
        url: &str,
        max_connections: u32,
        timeout: Duration,
        read: Option<&super::ReadReplica>,
    ) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(1)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await?;
        // sqlx's migrator holds pg_advisory_lock for the whole run, so
        // instances started together on a fresh database take turns
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let batcher = batch::Batcher::start(pool.clone(), batch::workers(max_connections));
        let replica = read.map(|r| replica::Replica::open(&r.url, max_connections, timeout, r.max_lag)).transpose()?;
        Ok(PgStore { pool, replica, batcher })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn product_from(row: &PgRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        id: ProductId(row.try_get("id")?),
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        currency: row.try_get("currency")?,
        stock: row.try_get("stock")?,
    })
}

fn order_from(row: &PgRow) -> Result<Order, sqlx::Error> {
    let reason: Option<String> = row.try_get("cancel_reason")?;
    Ok(Order {
        id: OrderId(row.try_get("id")?),
        customer_id: CustomerId(row.try_get("customer_id")?),
        status: super::status_from(row.try_get("status")?)?,
        lines: Vec::new(),
        total_cents: row.try_get("total_cents")?,
        currency: row.try_get("currency")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        paid_at: row.try_get("paid_at")?,
        cancelled_at: row.try_get("cancelled_at")?,
        cancel_reason: super::reason_from(reason.as_deref())?,
    })
}

/// Attaches the lines to orders read without them.
async fn with_lines<'e, E>(exec: E, mut orders: Vec<Order>) -> Result<Vec<Order>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    if orders.is_empty() {
        return Ok(orders);
    }
    let ids: Vec<i64> = orders.iter().map(|o| o.id.0).collect();
    let rows = sqlx::query(
        "SELECT order_id, product_id, quantity, unit_price_cents FROM order_lines WHERE order_id = ANY($1) ORDER BY order_id, product_id",
    )
    .bind(&ids)
    .fetch_all(exec)
    .await?;
    let lines = rows
        .iter()
        .map(|row| {
            Ok((
                row.try_get("order_id")?,
                OrderLine {
                    product_id: ProductId(row.try_get("product_id")?),
                    quantity: row.try_get("quantity")?,
                    unit_price_cents: row.try_get("unit_price_cents")?,
                },
            ))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    attach_lines(&mut orders, lines);
    Ok(orders)
}

/// The part of every cancellation after the winning `UPDATE … RETURNING`:
/// return the stock of the cancelled orders and record their events.
async fn finish_cancel(tx: &mut Transaction<'_, Postgres>, rows: Vec<PgRow>) -> Result<Vec<OrderEvent>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let orders = rows.iter().map(order_from).collect::<Result<Vec<_>, _>>()?;
    let orders = with_lines(&mut **tx, orders).await?;
    // Sum per product and lock in product-id order, the order in which
    // `PLACE_ORDER` and the batches' `place_orders` lock (each batch locks
    // all its products once, before taking any stock), so that none of
    // them deadlock. The lock is its
    // own statement: an `UPDATE … FROM` takes its row locks in whatever
    // order its join reads the table (the soak test caught the deadlock).
    let mut returned: std::collections::BTreeMap<i64, i32> = Default::default();
    for o in &orders {
        for l in &o.lines {
            *returned.entry(l.product_id.0).or_default() += l.quantity;
        }
    }
    let (pids, qtys): (Vec<i64>, Vec<i32>) = returned.into_iter().unzip();
    if pids.len() > 1 {
        sqlx::query("SELECT 1 FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&pids)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query(
        "UPDATE products p SET stock = p.stock + r.qty
         FROM (SELECT * FROM unnest($1::bigint[], $2::int[]) AS r(pid, qty) ORDER BY pid) r
         WHERE p.id = r.pid",
    )
    .bind(&pids)
    .bind(&qtys)
    .execute(&mut **tx)
    .await?;
    record_events(tx, orders).await
}

async fn record_events(tx: &mut Transaction<'_, Postgres>, orders: Vec<Order>) -> Result<Vec<OrderEvent>, sqlx::Error> {
    let order_ids: Vec<i64> = orders.iter().map(|o| o.id.0).collect();
    let payloads: Vec<String> = orders.iter().map(|o| serde_json::to_string(o).expect("orders serialise")).collect();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox (order_id, payload) SELECT * FROM unnest($1::bigint[], $2::text[]) RETURNING id",
    )
    .bind(&order_ids)
    .bind(&payloads)
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids.into_iter().zip(orders).map(|(event_id, order)| OrderEvent { event_id, order }).collect())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

fn is_retryable(e: &sqlx::Error) -> bool {
    // deadlock_detected, serialization_failure
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40P01") | Some("40001")))
}

impl PgStore {
    async fn existing_for_key(
        &self,
        customer: CustomerId,
        key: &str,
        request: &OrderRequest,
    ) -> Result<Option<Placed>, PlaceError> {
        let row = sqlx::query("SELECT id, fingerprint FROM orders WHERE customer_id = $1 AND idempotency_key = $2")
            .bind(customer.0)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let fp: String = row.try_get("fingerprint")?;
        if fp != fingerprint(request) {
            return Err(PlaceError::IdempotencyConflict);
        }
        let order = self.order(OrderId(row.try_get("id")?)).await?;
        Ok(order.map(|order| Placed { order, created: false }))
    }

    /// Places one order with its own statement: orders with an idempotency
    /// key (a key already used returns its order), and orders of a batch
    /// that Postgres refused as a whole.
    async fn place_alone(
        &self,
        customer: CustomerId,
        request: &OrderRequest,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
        limits: PendingLimits,
    ) -> Result<Placed, PlaceError> {
        if let Some(placed) = self.order_for_key(customer, request).await? {
            return Ok(placed);
        }
        let mut attempt = 0;
        loop {
            match try_place(&self.pool, customer, request, now, expires_at, limits).await {
                Ok(order) => return Ok(Placed { order, created: true }),
                Err(PlaceError::Store(StoreError::Database(e))) if is_unique_violation(&e) => {
                    // the same key raced in from another request: answer with its order
                    let key = request.idempotency_key.as_deref().unwrap_or_default();
                    if let Some(placed) = self.existing_for_key(customer, key, request).await? {
                        return Ok(placed);
                    }
                    return Err(PlaceError::Store(StoreError::Database(e)));
                }
                Err(PlaceError::Store(StoreError::Database(e))) if is_retryable(&e) && attempt < 5 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Places an order in one statement, so one round trip: lock the lines'
/// products in id order, check them all, and only if every check passes
/// take the stock and insert the order and its lines. Either all of it
/// happens or nothing does; the returned rows say why not.
async fn try_place(
    pool: &PgPool,
    customer: CustomerId,
    request: &OrderRequest,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    limits: PendingLimits,
) -> Result<Order, PlaceError> {
    let pids: Vec<i64> = request.lines.iter().map(|(p, _)| p.0).collect();
    let qtys: Vec<i32> = request.lines.iter().map(|(_, q)| q.0).collect();
    let rows = sqlx::query(PLACE_ORDER)
        .bind(&pids)
        .bind(&qtys)
        .bind(pids.len() as i64)
        .bind(customer.0)
        .bind(now)
        .bind(expires_at)
        .bind(request.idempotency_key.as_deref())
        .bind(fingerprint(request))
        .bind(crate::domain::MAX_TOTAL_CENTS)
        .bind(i64::from(limits.orders))
        .bind(i64::from(limits.units))
        .fetch_all(pool)
        .await?;
    let order_id: Option<i64> = rows.first().map(|r| r.try_get("order_id")).transpose()?.flatten();
    let mut found: HashMap<i64, (i32, i32, String)> = HashMap::with_capacity(rows.len());
    for r in &rows {
        found.insert(r.try_get("id")?, (r.try_get("stock")?, r.try_get("price_cents")?, r.try_get("currency")?));
    }
    let Some(id) = order_id else {
        if let Some((p, _)) = request.lines.iter().find(|(p, _)| !found.contains_key(&p.0)) {
            return Err(PlaceError::UnknownProduct(*p));
        }
        if let Some((p, _)) = request.lines.iter().find(|(p, q)| found[&p.0].0 < q.0) {
            return Err(PlaceError::InsufficientStock(*p));
        }
        let currency = &found[&pids[0]].2;
        if found.values().any(|(_, _, c)| c != currency) {
            return Err(PlaceError::MixedCurrencies);
        }
        let total: i64 = request.lines.iter().map(|(p, q)| i64::from(found[&p.0].1) * i64::from(q.0)).sum();
        if total > crate::domain::MAX_TOTAL_CENTS {
            return Err(PlaceError::TotalTooLarge);
        }
        let row = &rows[0];
        let units = request.lines.iter().map(|(_, q)| i64::from(q.0)).sum();
        let (orders, held) = (row.try_get("pending_orders")?, row.try_get("pending_units")?);
        return Err(limits
            .refusal(orders, held, units, row.try_get("first_expiry")?)
            .unwrap_or(PlaceError::TotalTooLarge));
    };
    let prices: Vec<i32> = request.lines.iter().map(|(p, _)| found[&p.0].1).collect();
    let currency = found[&pids[0]].2.clone();
    Ok(placed_order(OrderId(id), customer, request, currency, &prices, now, expires_at))
}

/// The order as placed, as a later read returns it: `prices` are the lines'
/// unit prices in the request's line order.
fn placed_order(
    id: OrderId,
    customer: CustomerId,
    request: &OrderRequest,
    currency: String,
    prices: &[i32],
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Order {
    let lines: Vec<OrderLine> = request
        .lines
        .iter()
        .zip(prices)
        .map(|((p, q), price)| OrderLine { product_id: *p, quantity: q.0, unit_price_cents: *price })
        .collect();
    Order {
        id,
        customer_id: customer,
        status: OrderStatus::PendingPayment,
        total_cents: lines.iter().map(|l| l.unit_price_cents as i64 * l.quantity as i64).sum(),
        lines,
        currency,
        // what the database stores (microsecond precision)
        created_at: truncate_micros(now),
        expires_at: truncate_micros(expires_at),
        paid_at: None,
        cancelled_at: None,
        cancel_reason: None,
    }
}

pub(crate) fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn pool_state(&self) -> (u32, u32) {
        let idle = self.pool.num_idle() as u32;
        (self.pool.size().saturating_sub(idle), idle)
    }

    async fn create_customer(&self, email: &Email, password_hash: &str) -> Result<Customer, StoreError> {
        let res =
            sqlx::query_scalar::<_, i64>("INSERT INTO customers (email, password_hash) VALUES ($1, $2) RETURNING id")
                .bind(email.as_str())
                .bind(password_hash)
                .fetch_one(&self.pool)
                .await;
        match res {
            Ok(id) => Ok(Customer { id: CustomerId(id), email: email.as_str().to_string() }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict("a customer with this email")),
            Err(e) => Err(e.into()),
        }
    }

    async fn customer_credentials(&self, email: &Email) -> Result<Option<(Customer, String)>, StoreError> {
        let row = sqlx::query("SELECT id, email, password_hash FROM customers WHERE email = $1")
            .bind(email.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (Customer { id: CustomerId(r.get("id")), email: r.get("email") }, r.get("password_hash"))))
    }

    async fn customers_by_ids(&self, ids: &[CustomerId]) -> Result<Vec<Customer>, StoreError> {
        let ids: Vec<i64> = ids.iter().map(|c| c.0).collect();
        let rows =
            sqlx::query("SELECT id, email FROM customers WHERE id = ANY($1)").bind(&ids).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| Customer { id: CustomerId(r.get("id")), email: r.get("email") }).collect())
    }

    async fn create_product(&self, p: &NewProduct) -> Result<Product, StoreError> {
        let res = sqlx::query(
            "INSERT INTO products (sku, name, price_cents, currency, stock) VALUES ($1, $2, $3, $4, $5)
             RETURNING id, sku, name, price_cents, currency, stock",
        )
        .bind(&p.sku)
        .bind(&p.name)
        .bind(p.price_cents)
        .bind(&p.currency)
        .bind(p.stock)
        .fetch_one(&self.pool)
        .await;
        match res {
            Ok(row) => Ok(product_from(&row)?),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict("a product with this sku")),
            Err(e) => Err(e.into()),
        }
    }

    async fn restock_product(&self, id: ProductId, quantity: i32) -> Result<Option<Product>, StoreError> {
        let row = sqlx::query(
            "UPDATE products SET stock = stock + $2 WHERE id = $1 AND stock <= 2147483647 - $2
             RETURNING id, sku, name, price_cents, currency, stock",
        )
        .bind(id.0)
        .bind(quantity)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(product_from).transpose()?)
    }

    async fn products_by_ids(&self, ids: &[ProductId]) -> Result<Vec<Product>, StoreError> {
        select_products(&self.pool, ids).await
    }

    async fn list_products(&self, after: Option<i64>, limit: usize) -> Result<Vec<Product>, StoreError> {
        select_product_page(&self.pool, after, limit).await
    }

    async fn catalog_products(&self, ids: &[ProductId]) -> Result<Vec<Product>, StoreError> {
        match &self.replica {
            Some(r) => r.read(&self.pool, |pool| select_products(pool, ids)).await,
            None => select_products(&self.pool, ids).await,
        }
    }

    async fn catalog_page(&self, after: Option<i64>, limit: usize) -> Result<Vec<Product>, StoreError> {
        match &self.replica {
            Some(r) => r.read(&self.pool, |pool| select_product_page(pool, after, limit)).await,
            None => select_product_page(&self.pool, after, limit).await,
        }
    }

    fn read_replica_usable(&self) -> Option<bool> {
        self.replica.as_ref().map(|r| r.is_usable())
    }

    async fn place_order(
        &self,
        customer: CustomerId,
        request: &OrderRequest,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
        limits: PendingLimits,
    ) -> Result<Placed, PlaceError> {
        if request.idempotency_key.is_some() {
            // rare, and their unique-key races are simplest answered one by one
            return self.place_alone(customer, request, now, expires_at, limits).await;
        }
        let mut attempt = 0;
        loop {
            match self.batcher.place(customer, request, now, expires_at, limits).await {
                batch::Outcome::Done(Ok(order)) => return Ok(Placed { order, created: true }),
                batch::Outcome::Done(Err(PlaceError::Store(StoreError::Database(e))))
                    if is_retryable(&e) && attempt < 5 =>
                {
                    attempt += 1
                }
                batch::Outcome::Done(Err(e)) => return Err(e),
                batch::Outcome::Alone => return self.place_alone(customer, request, now, expires_at, limits).await,
            }
        }
    }

    async fn order_for_key(&self, customer: CustomerId, request: &OrderRequest) -> Result<Option<Placed>, PlaceError> {
        match &request.idempotency_key {
            Some(key) => self.existing_for_key(customer, key, request).await,
            None => Ok(None),
        }
    }

    async fn order(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1")))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(with_lines(&self.pool, vec![order_from(&row)?]).await?.pop())
    }

    async fn list_orders(
        &self,
        viewer: Viewer,
        status: Option<OrderStatus>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Order>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ORDER_COLUMNS} FROM orders
             WHERE id < $1 AND ($2::bigint IS NULL OR customer_id = $2) AND ($3::text IS NULL OR status = $3)
             ORDER BY id DESC LIMIT $4"
        )))
        .bind(before.unwrap_or(i64::MAX))
        .bind(viewer.owner().map(|c| c.0))
        .bind(status.map(|s| s.as_db()))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let orders = rows.iter().map(order_from).collect::<Result<Vec<_>, _>>()?;
        Ok(with_lines(&self.pool, orders).await?)
    }

    async fn pay_order(&self, id: OrderId, viewer: Viewer, now: DateTime<Utc>) -> Result<PayOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders SET status = 'PAID', paid_at = $3
             WHERE id = $1 AND ($2::bigint IS NULL OR customer_id = $2)
               AND status = 'PENDING_PAYMENT' AND expires_at > $3
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(id.0)
        .bind(viewer.owner().map(|c| c.0))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(pay_refused(visible(self.order(id).await?, viewer)));
        };
        let orders = with_lines(&mut *tx, vec![order_from(&row)?]).await?;
        let mut events = record_events(&mut tx, orders).await?;
        tx.commit().await?;
        Ok(PayOutcome::Paid(events.remove(0)))
    }

    async fn cancel_order(
        &self,
        id: OrderId,
        viewer: Viewer,
        reason: CancelReason,
        now: DateTime<Utc>,
    ) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders SET status = 'CANCELLED', cancelled_at = $3,
                 cancel_reason = CASE WHEN expires_at <= $3 THEN 'EXPIRED' ELSE $4 END
             WHERE id = $1 AND ($2::bigint IS NULL OR customer_id = $2) AND status = 'PENDING_PAYMENT'
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(id.0)
        .bind(viewer.owner().map(|c| c.0))
        .bind(now)
        .bind(reason.as_db())
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(cancel_refused(visible(self.order(id).await?, viewer)));
        }
        let mut events = finish_cancel(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled(events.remove(0)))
    }

    async fn cancel_expired(&self, ids: &[OrderId], now: DateTime<Utc>) -> Result<ExpiredBatch, StoreError> {
        let mut ids: Vec<i64> = ids.iter().map(|o| o.0).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders SET status = 'CANCELLED', cancelled_at = $2, cancel_reason = 'EXPIRED'
             WHERE id = ANY(ARRAY(SELECT id FROM orders WHERE id = ANY($1) AND status = 'PENDING_PAYMENT'
                                    AND expires_at <= $2 ORDER BY id FOR UPDATE SKIP LOCKED))
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(&ids)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let cancelled = rows.len();
        let events = finish_cancel(&mut tx, rows).await?;
        tx.commit().await?;
        let mut batch = ExpiredBatch { events, not_yet_due: Vec::new() };
        if cancelled < ids.len() {
            let early = sqlx::query(
                "SELECT id, expires_at FROM orders WHERE id = ANY($1) AND status = 'PENDING_PAYMENT' AND expires_at > $2",
            )
            .bind(&ids)
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
            batch.not_yet_due = early.iter().map(|r| (OrderId(r.get("id")), r.get("expires_at"))).collect();
        }
        Ok(batch)
    }

    async fn cancel_overdue(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<OrderEvent>, StoreError> {
        // `= ANY(ARRAY(…))` makes the planner take the locked ids as a list
        // (primary-key lookups) instead of a semi-join over the whole table,
        // and `ORDER BY expires_at` walks the partial index of pending
        // orders rather than every finished order's primary key.
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders SET status = 'CANCELLED', cancelled_at = $1, cancel_reason = 'EXPIRED'
             WHERE id = ANY(ARRAY(SELECT id FROM orders WHERE status = 'PENDING_PAYMENT' AND expires_at <= $1
                                    ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED))
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let events = finish_cancel(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(events)
    }

    async fn outbox_claim(
        &self,
        before: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<OrderEvent>, StoreError> {
        let rows = sqlx::query(
            "UPDATE outbox SET claimed_until = $2
             WHERE id IN (SELECT id FROM outbox WHERE published_at IS NULL AND created_at < $1
                            AND (claimed_until IS NULL OR claimed_until < $1)
                          ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING id, payload",
        )
        .bind(before)
        .bind(lease_until)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(events_from(rows.iter().map(|r| (r.get("id"), r.get("payload")))))
    }

    async fn outbox_published(&self, event_ids: &[i64], at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET published_at = $2 WHERE id = ANY($1)")
            .bind(event_ids)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn outbox_since(&self, since: DateTime<Utc>, limit: usize) -> Result<Vec<OrderEvent>, StoreError> {
        let rows = sqlx::query("SELECT id, payload FROM outbox WHERE created_at >= $1 ORDER BY id LIMIT $2")
            .bind(since)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(events_from(rows.iter().map(|r| (r.get("id"), r.get("payload")))))
    }

    async fn outbox_prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM outbox WHERE published_at < $1").bind(before).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn outbox_len(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetch_one(&self.pool).await?)
    }
}

async fn select_products(pool: &PgPool, ids: &[ProductId]) -> Result<Vec<Product>, StoreError> {
    let ids: Vec<i64> = ids.iter().map(|p| p.0).collect();
    let rows = sqlx::query("SELECT id, sku, name, price_cents, currency, stock FROM products WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(product_from).collect::<Result<_, _>>()?)
}

async fn select_product_page(pool: &PgPool, after: Option<i64>, limit: usize) -> Result<Vec<Product>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, sku, name, price_cents, currency, stock FROM products WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after.unwrap_or(0))
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(product_from).collect::<Result<_, _>>()?)
}

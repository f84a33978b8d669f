//! The PostgreSQL backend: several instances share it. Expiry batches lock
//! with `FOR UPDATE SKIP LOCKED`, so instances split the work instead of
//! queueing behind each other, and rows are always locked in id order.
//! Concurrent orders are placed in batches, one statement and one commit
//! each (see [`batch`]).

mod batch;
mod place;
mod replica;

use std::{sync::Arc, time::Duration};

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
    // Sum per product and lock in product-id order, the order in which the
    // placements lock (`place::one`, and `place_batch`, which locks all of a
    // batch's products once, before taking any stock), so that none of them
    // deadlock. The lock is its own statement: an `UPDATE … FROM` takes its
    // row locks in whatever order its join reads the table (the soak test
    // caught the deadlock).
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

    /// The order the request's idempotency key placed while this request
    /// was placing it too (the insert hit the unique key): answered with
    /// that order, as if this request had come second.
    async fn raced_key(
        &self,
        customer: CustomerId,
        request: &OrderRequest,
        e: sqlx::Error,
    ) -> Result<Placed, PlaceError> {
        let key = request.idempotency_key.as_deref().unwrap_or_default();
        match self.existing_for_key(customer, key, request).await? {
            Some(placed) => Ok(placed),
            None => Err(PlaceError::Store(StoreError::Database(e))),
        }
    }
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
        if let Some(placed) = self.order_for_key(customer, request).await? {
            return Ok(placed);
        }
        // Orders with a key are rare and their unique-key races simplest
        // answered one by one, so they are placed alone; so is an order
        // whose batch Postgres refused as a whole. A deadlock or
        // serialization failure wrote nothing: try again, a few times.
        let mut alone = request.idempotency_key.is_some();
        let mut retries = 0;
        loop {
            let outcome = if alone {
                batch::Outcome::Done(place::one(&self.pool, customer, request, now, expires_at, limits).await)
            } else {
                self.batcher.place(customer, request, now, expires_at, limits).await
            };
            match outcome {
                batch::Outcome::Done(Ok(order)) => return Ok(Placed { order, created: true }),
                batch::Outcome::Alone => alone = true,
                batch::Outcome::Done(Err(PlaceError::Store(StoreError::Database(e)))) if is_unique_violation(&e) => {
                    return self.raced_key(customer, request, e).await
                }
                batch::Outcome::Done(Err(PlaceError::Store(StoreError::Database(e))))
                    if is_retryable(&e) && retries < 5 =>
                {
                    retries += 1
                }
                batch::Outcome::Done(Err(e)) => return Err(e),
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

//! The PostgreSQL backend: several instances share it. Expiry batches lock
//! with `FOR UPDATE SKIP LOCKED`, so instances split the work instead of
//! queueing behind each other, and rows are always locked in id order.
//! Concurrent orders are placed in batches, one statement and one commit
//! each (see [`place`]).

mod finish;
mod place;
mod replica;
mod rows;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool, Row,
};

use finish::{finish_cancel, record_events};
use rows::{order_from, select_product_page, select_products, with_lines};

use super::{
    cancel_refused, events_from, pay_refused, product_from, visible, CancelOutcome, ExpiredBatch, PayOutcome,
    PlaceError, Placed, PlacementLimits, Store, StoreError,
};
use crate::auth::Viewer;
use crate::domain::{
    CancelReason, Customer, CustomerId, Email, NewProduct, Order, OrderEvent, OrderId, OrderRequest, OrderStatus,
    Product, ProductId,
};

pub struct PgStore {
    pool: PgPool,
    /// Serves the public catalog when configured and usable.
    replica: Option<Arc<replica::Replica>>,
    /// Orders without idempotency key are placed in batches (group commit).
    batcher: place::Batcher,
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
        let batcher = place::Batcher::start(pool.clone(), place::workers(max_connections));
        let replica = read.map(|r| replica::Replica::open(&r.url, max_connections, timeout, r.max_lag)).transpose()?;
        Ok(PgStore { pool, replica, batcher })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
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
        limits: PlacementLimits,
    ) -> Result<Placed, PlaceError> {
        self.place(customer, request, now, expires_at, limits).await
    }

    async fn order_with_key(&self, customer: CustomerId, key: &str) -> Result<Option<(OrderId, String)>, StoreError> {
        let row = sqlx::query("SELECT id, fingerprint FROM orders WHERE customer_id = $1 AND idempotency_key = $2")
            .bind(customer.0)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((OrderId(r.try_get("id")?), r.try_get("fingerprint")?))).transpose()
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

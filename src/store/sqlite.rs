//! The SQLite backend: the zero-configuration, single-node default.
//!
//! SQLite allows one writer at a time, so writes go through a pool of one
//! connection (transactions queue in-process instead of failing with
//! `SQLITE_BUSY`) while reads use their own pool over WAL. Times are UTC unix
//! milliseconds; id lists travel as JSON arrays (`json_each`).

mod finish;
mod place;
mod rows;

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    Row, Sqlite, SqlitePool, Transaction,
};

use finish::{finish_cancel, record_events};
use rows::{order_from, with_lines};

use super::{
    cancel_refused, events_from, pay_refused, product_from, visible, CancelOutcome, ExpiredBatch, PayOutcome,
    PlaceError, Placed, PlacementLimits, Store, StoreError,
};
use crate::auth::Viewer;
use crate::domain::{
    CancelReason, Customer, CustomerId, Email, NewProduct, Order, OrderEvent, OrderId, OrderRequest, OrderStatus,
    Product, ProductId,
};

pub struct SqliteStore {
    /// One connection: SQLite has one writer, so writers wait here, in order.
    writer: SqlitePool,
    reader: SqlitePool,
}

const ORDER_COLUMNS: &str =
    "id, customer_id, status, total_cents, currency, created_at, expires_at, paid_at, cancelled_at, cancel_reason";

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn json_ids(ids: impl IntoIterator<Item = i64>) -> String {
    serde_json::to_string(&ids.into_iter().collect::<Vec<_>>()).expect("ids serialise")
}

impl SqliteStore {
    pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(timeout);
        let writer =
            SqlitePoolOptions::new().max_connections(1).acquire_timeout(timeout).connect_with(options.clone()).await?;
        migrate(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(timeout)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore { writer, reader })
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }
}

/// Runs the migrations holding SQLite's write lock from the first read of
/// `_sqlx_migrations` to the last migration. sqlx takes no lock on SQLite,
/// so processes started together on a fresh file would each find nothing
/// applied and all but one fail with `table customers already exists`;
/// `BEGIN IMMEDIATE` makes the others wait (up to `DB_TIMEOUT`) and then
/// find everything applied. Each migration runs in a savepoint inside it.
async fn migrate(writer: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::migrate!("./migrations/sqlite").run(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    fn pool_state(&self) -> (u32, u32) {
        let idle = (self.reader.num_idle() + self.writer.num_idle()) as u32;
        ((self.reader.size() + self.writer.size()).saturating_sub(idle), idle)
    }

    async fn create_customer(&self, email: &Email, password_hash: &str) -> Result<Customer, StoreError> {
        let res =
            sqlx::query_scalar::<_, i64>("INSERT INTO customers (email, password_hash) VALUES (?1, ?2) RETURNING id")
                .bind(email.as_str())
                .bind(password_hash)
                .fetch_one(&self.writer)
                .await;
        match res {
            Ok(id) => Ok(Customer { id: CustomerId(id), email: email.as_str().to_string() }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict("a customer with this email")),
            Err(e) => Err(e.into()),
        }
    }

    async fn customer_credentials(&self, email: &Email) -> Result<Option<(Customer, String)>, StoreError> {
        let row = sqlx::query("SELECT id, email, password_hash FROM customers WHERE email = ?1")
            .bind(email.as_str())
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.map(|r| (Customer { id: CustomerId(r.get("id")), email: r.get("email") }, r.get("password_hash"))))
    }

    async fn customers_by_ids(&self, ids: &[CustomerId]) -> Result<Vec<Customer>, StoreError> {
        let rows = sqlx::query("SELECT id, email FROM customers WHERE id IN (SELECT value FROM json_each(?1))")
            .bind(json_ids(ids.iter().map(|c| c.0)))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(|r| Customer { id: CustomerId(r.get("id")), email: r.get("email") }).collect())
    }

    async fn create_product(&self, p: &NewProduct) -> Result<Product, StoreError> {
        let res = sqlx::query(
            "INSERT INTO products (sku, name, price_cents, currency, stock) VALUES (?1, ?2, ?3, ?4, ?5)
             RETURNING id, sku, name, price_cents, currency, stock",
        )
        .bind(&p.sku)
        .bind(&p.name)
        .bind(p.price_cents)
        .bind(&p.currency)
        .bind(p.stock)
        .fetch_one(&self.writer)
        .await;
        match res {
            Ok(row) => Ok(product_from(&row)?),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict("a product with this sku")),
            Err(e) => Err(e.into()),
        }
    }

    async fn restock_product(&self, id: ProductId, quantity: i32) -> Result<Option<Product>, StoreError> {
        let row = sqlx::query(
            "UPDATE products SET stock = stock + ?2 WHERE id = ?1 AND stock <= 2147483647 - ?2
             RETURNING id, sku, name, price_cents, currency, stock",
        )
        .bind(id.0)
        .bind(quantity)
        .fetch_optional(&self.writer)
        .await?;
        Ok(row.as_ref().map(product_from).transpose()?)
    }

    async fn products_by_ids(&self, ids: &[ProductId]) -> Result<Vec<Product>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, sku, name, price_cents, currency, stock FROM products WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_ids(ids.iter().map(|p| p.0)))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(product_from).collect::<Result<_, _>>()?)
    }

    async fn list_products(&self, after: Option<i64>, limit: usize) -> Result<Vec<Product>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, sku, name, price_cents, currency, stock FROM products WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .bind(after.unwrap_or(0))
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(product_from).collect::<Result<_, _>>()?)
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
        let row = sqlx::query("SELECT id, fingerprint FROM orders WHERE customer_id = ?1 AND idempotency_key = ?2")
            .bind(customer.0)
            .bind(key)
            .fetch_optional(&self.writer)
            .await?;
        row.map(|r| Ok((OrderId(r.try_get("id")?), r.try_get("fingerprint")?))).transpose()
    }

    async fn order(&self, id: OrderId) -> Result<Option<Order>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?1")))
            .bind(id.0)
            .fetch_optional(&self.reader)
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(with_lines(&self.reader, vec![order_from(&row)?]).await?.pop())
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
             WHERE id < ?1 AND (?2 IS NULL OR customer_id = ?2) AND (?3 IS NULL OR status = ?3)
             ORDER BY id DESC LIMIT ?4"
        )))
        .bind(before.unwrap_or(i64::MAX))
        .bind(viewer.owner().map(|c| c.0))
        .bind(status.map(|s| s.as_db()))
        .bind(limit as i64)
        .fetch_all(&self.reader)
        .await?;
        let orders = rows.iter().map(order_from).collect::<Result<Vec<_>, _>>()?;
        Ok(with_lines(&self.reader, orders).await?)
    }

    async fn pay_order(&self, id: OrderId, viewer: Viewer, now: DateTime<Utc>) -> Result<PayOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders SET status = 'PAID', paid_at = ?3
             WHERE id = ?1 AND (?2 IS NULL OR customer_id = ?2) AND status = 'PENDING_PAYMENT' AND expires_at > ?3
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(id.0)
        .bind(viewer.owner().map(|c| c.0))
        .bind(ms(now))
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
        let mut tx = self.begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders SET status = 'CANCELLED', cancelled_at = ?3,
                 cancel_reason = CASE WHEN expires_at <= ?3 THEN 'EXPIRED' ELSE ?4 END
             WHERE id = ?1 AND (?2 IS NULL OR customer_id = ?2) AND status = 'PENDING_PAYMENT'
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(id.0)
        .bind(viewer.owner().map(|c| c.0))
        .bind(ms(now))
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
        let ids_json = json_ids(ids.iter().map(|o| o.0));
        let mut tx = self.begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders SET status = 'CANCELLED', cancelled_at = ?2, cancel_reason = 'EXPIRED'
             WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'PENDING_PAYMENT' AND expires_at <= ?2
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(&ids_json)
        .bind(ms(now))
        .fetch_all(&mut *tx)
        .await?;
        let events = finish_cancel(&mut tx, rows).await?;
        let early = sqlx::query(
            "SELECT id, expires_at FROM orders
             WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'PENDING_PAYMENT' AND expires_at > ?2",
        )
        .bind(&ids_json)
        .bind(ms(now))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ExpiredBatch {
            events,
            not_yet_due: early.iter().map(|r| (OrderId(r.get("id")), time(r.get("expires_at")))).collect(),
        })
    }

    async fn cancel_overdue(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<OrderEvent>, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE orders SET status = 'CANCELLED', cancelled_at = ?1, cancel_reason = 'EXPIRED'
             WHERE id IN (SELECT id FROM orders WHERE status = 'PENDING_PAYMENT' AND expires_at <= ?1
                          ORDER BY expires_at LIMIT ?2)
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(ms(now))
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
            "UPDATE outbox SET claimed_until = ?2
             WHERE id IN (SELECT id FROM outbox WHERE published_at IS NULL AND created_at < ?1
                            AND (claimed_until IS NULL OR claimed_until < ?1)
                          ORDER BY id LIMIT ?3)
             RETURNING id, payload",
        )
        .bind(ms(before))
        .bind(ms(lease_until))
        .bind(limit as i64)
        .fetch_all(&self.writer)
        .await?;
        Ok(events_from(rows.iter().map(|r| (r.get("id"), r.get("payload")))))
    }

    async fn outbox_published(&self, event_ids: &[i64], at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET published_at = ?2 WHERE id IN (SELECT value FROM json_each(?1))")
            .bind(json_ids(event_ids.iter().copied()))
            .bind(ms(at))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn outbox_since(&self, since: DateTime<Utc>, limit: usize) -> Result<Vec<OrderEvent>, StoreError> {
        let rows = sqlx::query("SELECT id, payload FROM outbox WHERE created_at >= ?1 ORDER BY id LIMIT ?2")
            .bind(ms(since))
            .bind(limit as i64)
            .fetch_all(&self.reader)
            .await?;
        Ok(events_from(rows.iter().map(|r| (r.get("id"), r.get("payload")))))
    }

    async fn outbox_prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM outbox WHERE published_at < ?1").bind(ms(before)).execute(&self.writer).await?;
        Ok(done.rows_affected())
    }

    async fn outbox_len(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetch_one(&self.reader).await?)
    }
}

//! Placing an order on SQLite. SQLite has one writer, so inside the
//! placement's write transaction (`BEGIN IMMEDIATE`) nothing else can change
//! the stock or the customer's unpaid orders: the facts are read first,
//! [`decide`] judges them, and only an accepted order is written.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Row, Sqlite, Transaction};

use super::{is_unique_violation, json_ids, ms, time, SqliteStore};
use crate::domain::{CustomerId, OrderId, OrderRequest};
use crate::store::placement::{decide, placed_order, Accepted, Pending, PendingLimits, Stocked};
use crate::store::{fingerprint, PlaceError, Placed, Store};

impl SqliteStore {
    /// Takes every line's stock and inserts the order in one transaction,
    /// unless [`decide`] refuses it; an idempotency key already used
    /// returns its order.
    pub(super) async fn place(
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
        let mut tx = self.begin().await?;
        let products = products(&mut tx, request).await?;
        let pending = match limits {
            PendingLimits::NONE => Pending::default(),
            _ => pending(&mut tx, customer, now).await?,
        };
        let accepted = match decide(request, &products, pending, limits) {
            Ok(accepted) => accepted,
            Err(refusal) => {
                tx.rollback().await?;
                return Err(refusal);
            }
        };
        let id = match insert(&mut tx, customer, request, &accepted, now, expires_at).await {
            Ok(id) => id,
            Err(e) if is_unique_violation(&e) => {
                // the same key raced in from another request: answer with its order
                tx.rollback().await?;
                let key = request.idempotency_key.as_deref().unwrap_or_default();
                return self.existing_for_key(customer, key, request).await?.ok_or_else(|| e.into());
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        let order = placed_order(OrderId(id), customer, request, accepted, time(ms(now)), time(ms(expires_at)));
        Ok(Placed { order, created: true })
    }

    /// The order placed earlier with this key, if any (`IdempotencyConflict`
    /// when its lines differ from the request's).
    pub(super) async fn existing_for_key(
        &self,
        customer: CustomerId,
        key: &str,
        request: &OrderRequest,
    ) -> Result<Option<Placed>, PlaceError> {
        let row = sqlx::query("SELECT id, fingerprint FROM orders WHERE customer_id = ?1 AND idempotency_key = ?2")
            .bind(customer.0)
            .bind(key)
            .fetch_optional(&self.writer)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let fp: String = row.try_get("fingerprint")?;
        if fp != fingerprint(request) {
            return Err(PlaceError::IdempotencyConflict);
        }
        let order = self.order(OrderId(row.try_get("id")?)).await?;
        Ok(order.map(|order| Placed { order, created: false }))
    }
}

/// Each line's product as it is now (`None`: no such product), in line order.
async fn products(
    tx: &mut Transaction<'static, Sqlite>,
    request: &OrderRequest,
) -> Result<Vec<Option<Stocked>>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, stock, price_cents, currency FROM products WHERE id IN (SELECT value FROM json_each(?1))",
    )
    .bind(json_ids(request.lines.iter().map(|(p, _)| p.0)))
    .fetch_all(&mut **tx)
    .await?;
    let mut found: HashMap<i64, Stocked> = HashMap::with_capacity(rows.len());
    for r in &rows {
        let stocked = Stocked {
            stock: r.try_get("stock")?,
            price_cents: r.try_get("price_cents")?,
            currency: r.try_get("currency")?,
        };
        found.insert(r.try_get("id")?, stocked);
    }
    Ok(request.lines.iter().map(|(p, _)| found.remove(&p.0)).collect())
}

/// What the customer's unpaid orders (pending, deadline after `now`) hold.
async fn pending(
    tx: &mut Transaction<'static, Sqlite>,
    customer: CustomerId,
    now: DateTime<Utc>,
) -> Result<Pending, sqlx::Error> {
    let row = sqlx::query(
        "SELECT count(*) AS n, min(o.expires_at) AS first_expiry,
                coalesce(sum((SELECT sum(l.quantity) FROM order_lines l WHERE l.order_id = o.id)), 0) AS units
         FROM orders o
         WHERE o.customer_id = ?1 AND o.status = 'PENDING_PAYMENT' AND o.expires_at > ?2",
    )
    .bind(customer.0)
    .bind(ms(now))
    .fetch_one(&mut **tx)
    .await?;
    let first_expiry: Option<i64> = row.try_get("first_expiry")?;
    Ok(Pending { orders: row.try_get("n")?, units: row.try_get("units")?, first_expiry: first_expiry.map(time) })
}

/// Writes an accepted order: its stock taken, its row and its lines.
/// Returns its id.
async fn insert(
    tx: &mut Transaction<'static, Sqlite>,
    customer: CustomerId,
    request: &OrderRequest,
    accepted: &Accepted,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    let id = sqlx::query_scalar::<_, i64>(
        "INSERT INTO orders (customer_id, status, total_cents, currency, created_at, expires_at, idempotency_key, fingerprint)
         VALUES (?1, 'PENDING_PAYMENT', ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
    )
    .bind(customer.0)
    .bind(accepted.total)
    .bind(&accepted.currency)
    .bind(ms(now))
    .bind(ms(expires_at))
    .bind(request.idempotency_key.as_deref())
    .bind(fingerprint(request))
    .fetch_one(&mut **tx)
    .await?;
    // [product, quantity, unit price] per line
    let lines: Vec<[i64; 3]> = request
        .lines
        .iter()
        .zip(&accepted.prices)
        .map(|((p, q), price)| [p.0, i64::from(q.0), i64::from(*price)])
        .collect();
    let lines = serde_json::to_string(&lines).expect("lines serialise");
    sqlx::query(
        "UPDATE products SET stock = stock - r.qty
         FROM (SELECT json_extract(value, '$[0]') AS pid, json_extract(value, '$[1]') AS qty FROM json_each(?1)) AS r
         WHERE products.id = r.pid",
    )
    .bind(&lines)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents)
         SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
         FROM json_each(?2)",
    )
    .bind(id)
    .bind(&lines)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

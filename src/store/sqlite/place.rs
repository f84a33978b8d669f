//! Placing an order on SQLite. SQLite has one writer, so inside the
//! placement's write transaction (`BEGIN IMMEDIATE`) nothing else can change
//! the stock or the customer's unpaid orders: the facts are read first,
//! [`decide`] judges them, and only an accepted order is written.

use chrono::{DateTime, Utc};
use sqlx::{Row, Sqlite, Transaction};

use super::{is_unique_violation, json_ids, ms, time, SqliteStore};
use crate::domain::{CustomerId, OrderId, OrderRequest};
use crate::store::placement::{
    decide, placed_order, stocked_lines, Accepted, CustomerFacts, PlacementLimits, Stocked, PLACEMENT_WINDOW,
};
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
        limits: PlacementLimits,
    ) -> Result<Placed, PlaceError> {
        if let Some(placed) = self.order_for_key(customer, request).await? {
            return Ok(placed);
        }
        let mut tx = self.begin().await?;
        let (placed, window_ends) = count_attempt(&mut tx, customer, now).await?;
        let (products, pending) = facts(&mut tx, customer, request, now, limits).await?;
        let pending = CustomerFacts { placed, window_ends, ..pending };
        let accepted = match decide(request, &products, pending, limits) {
            Ok(accepted) => accepted,
            Err(refusal) => {
                // the attempt stays counted: a refused one counts too
                tx.commit().await?;
                return Err(refusal);
            }
        };
        let id = match insert(&mut tx, customer, request, &accepted, now, expires_at).await {
            Ok(id) => id,
            Err(e) if is_unique_violation(&e) => {
                // the same key raced in from another request: answer with its order
                tx.rollback().await?;
                return self.order_for_key(customer, request).await?.ok_or_else(|| e.into());
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        let order = placed_order(OrderId(id), customer, request, accepted, time(ms(now)), time(ms(expires_at)));
        Ok(Placed { order, created: true })
    }
}

/// Counts a placement attempt in the customer's current window (a new
/// window starts when the last one is over). Returns the attempts in it,
/// this one included, and when it ends; none for an unknown customer.
async fn count_attempt(
    tx: &mut Transaction<'static, Sqlite>,
    customer: CustomerId,
    now: DateTime<Utc>,
) -> Result<(i64, Option<DateTime<Utc>>), sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        // the rule of the Postgres `lock_counted` and `place_batch`: a
        // window that never started (NULL) or has ended starts now
        "UPDATE customers
         SET placements_since = CASE WHEN placements_since + ?3 > ?2 THEN placements_since ELSE ?2 END,
             placements = CASE WHEN placements_since + ?3 > ?2 THEN placements ELSE 0 END + 1
         WHERE id = ?1
         RETURNING placements, placements_since + ?3",
    )
    .bind(customer.0)
    .bind(ms(now))
    .bind(PLACEMENT_WINDOW.as_millis() as i64)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map_or((0, None), |(placed, ends)| (placed, Some(time(ends)))))
}

/// The facts of a placement, read in one statement (each statement costs
/// thread hand-offs while the single writer is held): each line's product
/// as it is now (`None`: no such product), in line order, and what the
/// customer's unpaid orders (pending, deadline after `now`) hold, counted
/// only when there are limits to judge them by.
async fn facts(
    tx: &mut Transaction<'static, Sqlite>,
    customer: CustomerId,
    request: &OrderRequest,
    now: DateTime<Utc>,
    limits: PlacementLimits,
) -> Result<(Vec<Option<Stocked>>, CustomerFacts), sqlx::Error> {
    // `g` is always one row, so the customer's counts arrive even when no
    // line names a product that exists
    let rows = sqlx::query(
        "SELECT p.id, p.stock, p.price_cents, p.currency, g.n, g.units, g.first_expiry
         FROM (SELECT count(*) AS n, min(o.expires_at) AS first_expiry,
                      coalesce(sum((SELECT sum(l.quantity) FROM order_lines l WHERE l.order_id = o.id)), 0) AS units
               FROM orders o
               WHERE ?3 AND o.customer_id = ?1 AND o.status = 'PENDING_PAYMENT' AND o.expires_at > ?2) AS g
         LEFT JOIN products p ON p.id IN (SELECT value FROM json_each(?4))",
    )
    .bind(customer.0)
    .bind(ms(now))
    .bind(limits != PlacementLimits::NONE)
    .bind(json_ids(request.lines.iter().map(|(p, _)| p.0)))
    .fetch_all(&mut **tx)
    .await?;
    let products = stocked_lines(&rows, request)?;
    let pending = match rows.first() {
        Some(r) => {
            let first_expiry: Option<i64> = r.try_get("first_expiry")?;
            CustomerFacts {
                orders: r.try_get("n")?,
                units: r.try_get("units")?,
                first_expiry: first_expiry.map(time),
                ..CustomerFacts::default()
            }
        }
        None => CustomerFacts::default(),
    };
    Ok((products, pending))
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

//! One order placed by one statement, and how a placement's answer from
//! Postgres becomes an order or a refusal (for batches too, see
//! [`super::batch`]). The statements only make their writes conditional;
//! [`decide`] says which refusal an order gets.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::domain::{CustomerId, Order, OrderId, OrderRequest, MAX_TOTAL_CENTS};
use crate::store::placement::{
    decide, placed_order, stocked_lines, Accepted, CustomerFacts, PlacementLimits, PLACEMENT_WINDOW,
};
use crate::store::{fingerprint, PlaceError};

/// One order as one statement: orders with an idempotency key, batches of
/// one, and orders of a batch that failed as a whole. `gate` locks the
/// customer, counts the attempt in its rate window and counts its unpaid
/// orders after that lock (see `lock_counted` in the placement-rate
/// migration); `locked` waits for `gate` and, unless the customer is over
/// its rate, takes the row locks in product id order (the order every
/// transaction here uses, so none deadlock) and reads the latest stock;
/// `ok` is the write's condition, the rules of [`decide`] on the same
/// facts; `taken`, `o` and `l` write only when `ok`. The rows returned are
/// the facts: the customer's window and unpaid orders before this order,
/// once per product as locked (stock before the order) with the new
/// order's id or NULL, or once with NULL product when none was locked.
const PLACE_ORDER: &str = "
WITH gate AS (
    SELECT * FROM lock_counted($4, $5, $12)
), req AS (
    SELECT * FROM unnest($1::bigint[], $2::int[]) AS r(pid, qty)
), locked AS (
    SELECT p.id, p.stock, p.price_cents, p.currency, req.qty
    FROM products p JOIN req ON p.id = req.pid
    WHERE (SELECT coalesce(placed, 0) FROM gate) <= $13
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
       gate.n AS pending_orders, gate.units AS pending_units, gate.first_expiry, gate.placed, gate.window_ends
FROM gate LEFT JOIN locked ON true";

/// Places an order in one statement, so one round trip: lock the lines'
/// products in id order, check them all, and only if every check passes
/// take the stock and insert the order and its lines. Either all of it
/// happens or nothing does.
pub(super) async fn place(
    pool: &PgPool,
    customer: CustomerId,
    request: &OrderRequest,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    limits: PlacementLimits,
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
        .bind(MAX_TOTAL_CENTS)
        .bind(i64::from(limits.orders))
        .bind(i64::from(limits.units))
        .bind(PLACEMENT_WINDOW)
        .bind(i64::from(limits.per_window))
        .fetch_all(pool)
        .await?;
    let products = stocked_lines(&rows, request)?;
    // `gate` is one row, so there is always at least one
    let r = rows.first().ok_or_else(|| sqlx::Error::Protocol("placement: no facts returned".into()))?;
    let pending = CustomerFacts {
        orders: r.try_get("pending_orders")?,
        units: r.try_get("pending_units")?,
        first_expiry: r.try_get("first_expiry")?,
        placed: r.try_get::<Option<i64>, _>("placed")?.unwrap_or(0),
        window_ends: r.try_get("window_ends")?,
    };
    let written = r.try_get("order_id")?;
    settle(written, customer, request, decide(request, &products, pending, limits), now, expires_at)
}

/// What Postgres did (`written`: the new order's id) together with what
/// [`decide`] made of the facts it returned: the order placed, or the
/// refusal. They agree unless a statement's condition and [`decide`] have
/// come apart, which is reported as an internal error, never guessed at.
pub(super) fn settle(
    written: Option<i64>,
    customer: CustomerId,
    request: &OrderRequest,
    decision: Result<Accepted, PlaceError>,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Result<Order, PlaceError> {
    match (written, decision) {
        (Some(id), Ok(accepted)) => {
            // what the database stores: microsecond precision
            let (created_at, expires_at) = (truncate_micros(now), truncate_micros(expires_at));
            Ok(placed_order(OrderId(id), customer, request, accepted, created_at, expires_at))
        }
        (None, Err(refusal)) => Err(refusal),
        (Some(id), Err(refusal)) => {
            Err(disagree(format!("the database placed order {id}, which the rules refuse ({refusal})")).into())
        }
        (None, Ok(_)) => Err(disagree("the database refused an order that the rules accept".into()).into()),
    }
}

fn disagree(what: String) -> sqlx::Error {
    sqlx::Error::Protocol(format!("placement: {what}"))
}

fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

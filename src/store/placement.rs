//! Whether an order may be placed: decided here, once, for both stores.
//!
//! A store reads the facts a placement depends on, under the locks of the
//! placing transaction: each line's product (stock, price, currency) and
//! what the customer's unpaid orders already hold. [`decide`] turns those
//! facts into the order to write or the one refusal to give; SQL only makes
//! its writes conditional on the same facts (so that concurrent placements
//! cannot both pass), and a store that finds the database and [`decide`]
//! disagreeing reports an internal error rather than guessing.
//!
//! When several rules are broken, the refusal is the first of, in order:
//!
//! 0. `TooManyPlaced` (`RATE_LIMITED`): the customer's placements in the
//!    current window (this one included) exceed `ORDER_RATE_LIMIT`; nothing
//!    else is judged. The window is counted on the customer's row by the
//!    placing transaction itself, so every instance shares it exactly, with
//!    or without Redis, and it costs no round trip of its own.
//! 1. `UnknownProduct` (`NOT_FOUND`): the first line, in product id order,
//!    whose product does not exist. Nothing else can be judged about it.
//! 2. `MixedCurrencies`, then `TotalTooLarge` (`BAD_USER_INPUT`): the
//!    request itself is wrong and stays wrong whatever the stock.
//! 3. `InsufficientStock` (`INSUFFICIENT_STOCK`): the first line, in product
//!    id order, short of stock; it may pass later, after a restock.
//! 4. `TooManyPending`, then `TooManyUnits` (`RATE_LIMITED`): the order could
//!    be served, but not to this customer now; it may pass once the
//!    customer pays or cancels.
//!
//! So faults that need a different request come before faults that time
//! may clear, and a client is never told to wait for an order that could
//! never be placed.

use chrono::{DateTime, Utc};

use super::PlaceError;
use crate::domain::{CustomerId, Order, OrderId, OrderLine, OrderRequest, OrderStatus, MAX_TOTAL_CENTS};

/// How often one customer may place orders: at most `per_window`
/// placement attempts (refused ones too) in each fixed window of this length,
/// which starts with the first attempt after the previous one ended.
pub const PLACEMENT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// What one customer may do at once: what its unpaid (pending, not yet past
/// their deadline) orders may hold, and how many placements it may attempt
/// per [`PLACEMENT_WINDOW`] (`ORDER_RATE_LIMIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementLimits {
    pub orders: u32,
    pub units: u32,
    pub per_window: u32,
}

impl PlacementLimits {
    /// No limit: for tools and tests that place orders directly.
    pub const NONE: PlacementLimits = PlacementLimits { orders: u32::MAX, units: u32::MAX, per_window: u32::MAX };
}

/// A line's product as the placing transaction read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stocked {
    pub stock: i32,
    pub price_cents: i32,
    pub currency: String,
}

/// What the customer held when the placement was decided (its unpaid orders),
/// and its placements in the current window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CustomerFacts {
    pub orders: i64,
    pub units: i64,
    /// The earliest deadline among them: when a place frees up at the latest.
    pub first_expiry: Option<DateTime<Utc>>,
    /// Placement attempts in the current window, this one included.
    pub placed: i64,
    /// When the current window ends.
    pub window_ends: Option<DateTime<Utc>>,
}

/// Each line's product (`None`: it does not exist), in line order, from
/// the rows a store's placement read: columns `id` (NULL on a row that
/// carries only the customer's facts), `stock`, `price_cents`, `currency`.
pub(crate) fn stocked_lines<'r, R>(rows: &'r [R], request: &OrderRequest) -> Result<Vec<Option<Stocked>>, sqlx::Error>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for r in rows {
        if let Some(id) = r.try_get::<Option<i64>, _>("id")? {
            let stocked = Stocked {
                stock: r.try_get("stock")?,
                price_cents: r.try_get("price_cents")?,
                currency: r.try_get("currency")?,
            };
            found.insert(id, stocked);
        }
    }
    Ok(request.lines.iter().map(|(p, _)| found.remove(&p.0)).collect())
}

/// An order that passed every rule: what to write for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub currency: String,
    /// The unit price of each line, in the request's line order.
    pub prices: Vec<i32>,
    pub total: i64,
}

/// The facts of a request: `products[i]` is the product of line `i`
/// (`None`: it does not exist), `pending` what the customer already holds.
/// See the module documentation for which refusal wins.
pub(crate) fn decide(
    request: &OrderRequest,
    products: &[Option<Stocked>],
    pending: CustomerFacts,
    limits: PlacementLimits,
) -> Result<Accepted, PlaceError> {
    if pending.placed > i64::from(limits.per_window) {
        return Err(PlaceError::TooManyPlaced { max: limits.per_window, free_at: pending.window_ends });
    }
    let mut lines = Vec::with_capacity(request.lines.len());
    for (i, (product, quantity)) in request.lines.iter().enumerate() {
        match products.get(i).and_then(Option::as_ref) {
            Some(stocked) => lines.push((product, i64::from(quantity.0), stocked)),
            None => return Err(PlaceError::UnknownProduct(*product)),
        }
    }
    // a request has at least one line (`OrderRequest::new`)
    let currency = lines.first().map(|(_, _, s)| s.currency.as_str()).unwrap_or_default();
    if lines.iter().any(|(_, _, s)| s.currency != currency) {
        return Err(PlaceError::MixedCurrencies);
    }
    let total: i64 = lines.iter().map(|(_, q, s)| i64::from(s.price_cents) * q).sum();
    if total > MAX_TOTAL_CENTS {
        return Err(PlaceError::TotalTooLarge);
    }
    if let Some((product, _, _)) = lines.iter().find(|(_, q, s)| i64::from(s.stock) < *q) {
        return Err(PlaceError::InsufficientStock(**product));
    }
    let free_at = pending.first_expiry;
    if pending.orders >= i64::from(limits.orders) {
        return Err(PlaceError::TooManyPending { max: limits.orders, free_at });
    }
    let would_hold = pending.units + lines.iter().map(|(_, q, _)| q).sum::<i64>();
    if would_hold > i64::from(limits.units) {
        return Err(PlaceError::TooManyUnits { max: limits.units, would_hold, free_at });
    }
    let prices = lines.iter().map(|(_, _, s)| s.price_cents).collect();
    Ok(Accepted { currency: currency.to_string(), prices, total })
}

/// The order as written, as a later read returns it: `created_at` and
/// `expires_at` already at the precision the store keeps.
pub(crate) fn placed_order(
    id: OrderId,
    customer: CustomerId,
    request: &OrderRequest,
    accepted: Accepted,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Order {
    let lines = request
        .lines
        .iter()
        .zip(&accepted.prices)
        .map(|((p, q), price)| OrderLine { product_id: *p, quantity: q.0, unit_price_cents: *price })
        .collect();
    Order {
        id,
        customer_id: customer,
        status: OrderStatus::PendingPayment,
        lines,
        total_cents: accepted.total,
        currency: accepted.currency,
        created_at,
        expires_at,
        paid_at: None,
        cancelled_at: None,
        cancel_reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ProductId, Quantity};

    fn request(lines: &[(i64, i32)]) -> OrderRequest {
        let lines = lines.iter().map(|(p, q)| (ProductId(*p), Quantity::parse(*q).unwrap())).collect();
        OrderRequest::new(lines, None).unwrap()
    }

    fn usd(stock: i32, price_cents: i32) -> Option<Stocked> {
        Some(Stocked { stock, price_cents, currency: "USD".into() })
    }

    fn eur(stock: i32) -> Option<Stocked> {
        Some(Stocked { stock, price_cents: 100, currency: "EUR".into() })
    }

    const LIMITS: PlacementLimits = PlacementLimits { orders: 2, units: 10, per_window: 5 };
    const FULL: CustomerFacts = CustomerFacts { orders: 2, units: 0, first_expiry: None, placed: 1, window_ends: None };

    fn refusal(lines: &[(i64, i32)], products: &[Option<Stocked>], pending: CustomerFacts) -> String {
        format!("{:?}", decide(&request(lines), products, pending, LIMITS).unwrap_err())
    }

    #[test]
    fn an_order_that_breaks_no_rule_is_priced_line_by_line() {
        let accepted =
            decide(&request(&[(1, 2), (2, 3)]), &[usd(2, 250), usd(9, 100)], CustomerFacts::default(), LIMITS);
        assert_eq!(accepted.unwrap(), Accepted { currency: "USD".into(), prices: vec![250, 100], total: 800 });
    }

    #[test]
    fn over_the_rate_limit_nothing_else_is_judged() {
        let over = CustomerFacts { placed: 6, ..CustomerFacts::default() };
        assert_eq!(refusal(&[(1, 5)], &[None], over), "TooManyPlaced { max: 5, free_at: None }");
        let at = CustomerFacts { placed: 5, ..CustomerFacts::default() };
        assert!(decide(&request(&[(1, 1)]), &[usd(9, 100)], at, LIMITS).is_ok(), "the fifth attempt passes");
    }

    #[test]
    fn an_unknown_product_wins_over_every_other_fault() {
        let r = refusal(&[(1, 5), (2, 1)], &[usd(1, 100), None], FULL);
        assert_eq!(r, "UnknownProduct(ProductId(2))", "short of stock, then unknown");
        assert_eq!(
            refusal(&[(1, 1), (2, 1), (3, 1)], &[usd(9, 100), eur(9), None], FULL),
            "UnknownProduct(ProductId(3))"
        );
        assert_eq!(refusal(&[(1, 1), (2, 1)], &[None, None], FULL), "UnknownProduct(ProductId(1))");
    }

    #[test]
    fn a_wrong_request_wins_over_stock_and_limits() {
        assert_eq!(refusal(&[(1, 5), (2, 1)], &[usd(1, 100), eur(9)], FULL), "MixedCurrencies");
        let big = usd(0, i32::MAX);
        assert_eq!(refusal(&[(1, 2)], &[big], FULL), "TotalTooLarge");
    }

    #[test]
    fn stock_wins_over_the_pending_limits_and_names_the_first_short_line() {
        assert_eq!(refusal(&[(1, 5), (2, 5)], &[usd(1, 100), usd(1, 100)], FULL), "InsufficientStock(ProductId(1))");
        let r = refusal(&[(1, 1), (2, 5)], &[usd(1, 100), usd(1, 100)], CustomerFacts::default());
        assert_eq!(r, "InsufficientStock(ProductId(2))");
    }

    #[test]
    fn the_pending_limits_come_last_orders_before_units() {
        let r = refusal(&[(1, 11)], &[usd(99, 1)], FULL);
        assert!(r.starts_with("TooManyPending { max: 2"), "{r}");
        let r = refusal(&[(1, 4)], &[usd(99, 1)], CustomerFacts { orders: 1, units: 7, ..FULL });
        assert!(r.starts_with("TooManyUnits { max: 10, would_hold: 11"), "{r}");
    }
}

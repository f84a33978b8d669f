//! Domain values, parsed at the edge so that the rest of the code can trust
//! them: ids, quantities, emails, SKUs, currencies, and the order records.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A value a client sent that the contract rejects (`BAD_USER_INPUT`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidInput(pub String);

pub fn invalid(msg: impl Into<String>) -> InvalidInput {
    InvalidInput(msg.into())
}

/// Characters of client input an error message repeats: enough to
/// recognise the value, never enough to make a response grow with it.
pub const PREVIEW_CHARS: usize = 32;

/// Client input as an error message shows it: quoted, and cut after
/// [`PREVIEW_CHARS`] characters.
pub fn preview(raw: &str) -> String {
    match raw.char_indices().nth(PREVIEW_CHARS) {
        None => format!("{raw:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &raw[..end], raw.len()),
    }
}

/// Whether text holds a character no name, SKU, email, currency or key
/// contains: a control character (NUL, tab, newline, escapes, C1 controls)
/// or a bidirectional override that makes text display as something else.
/// Decided here, before any store sees the value: Postgres refuses NUL in
/// `text` and SQLite would store it, so both stores get the same values.
pub fn has_forbidden_chars(raw: &str) -> bool {
    raw.chars().any(|c| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'))
}

macro_rules! opaque_id {
    ($name:ident, $prefix:literal, $what:literal) => {
        #[doc = concat!("The id of a ", $what, "; shown to clients as `", $prefix, "_<n>`.")]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub i64);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
                // one spelling per id: the digits as Display writes them (no leading zeros)
                raw.strip_prefix(concat!($prefix, "_"))
                    .filter(|n| {
                        !n.is_empty() && n.len() <= 18 && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit())
                    })
                    .and_then(|n| n.parse::<i64>().ok())
                    .filter(|n| *n > 0)
                    .map($name)
                    .ok_or_else(|| invalid(format!(concat!("{} is not a valid ", $what, " id"), preview(raw))))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!($prefix, "_{}"), self.0)
            }
        }
    };
}

opaque_id!(ProductId, "prd", "product");
opaque_id!(OrderId, "ord", "order");
opaque_id!(CustomerId, "cus", "customer");

/// Units of one order line: 1..=10000 by contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantity(pub i32);

impl Quantity {
    pub const MAX: i32 = 10_000;
    pub fn parse(n: i32) -> Result<Self, InvalidInput> {
        if (1..=Self::MAX).contains(&n) {
            Ok(Quantity(n))
        } else {
            Err(invalid(format!("quantity must be between 1 and {}, got {n}", Self::MAX)))
        }
    }
}

/// The most lines one order may have.
pub const MAX_ORDER_LINES: usize = 100;
/// The largest order total, in cents (the GraphQL `Int` range).
pub const MAX_TOTAL_CENTS: i64 = i32::MAX as i64;

/// A normalised (trimmed, lower-case) email address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        // surrounding blanks (a pasted address) are trimmed, as before; what is left must be clean
        if has_forbidden_chars(raw.trim()) {
            return Err(invalid(format!("{} is not a valid email address", preview(raw))));
        }
        let e = raw.trim().to_lowercase();
        let ok = e.len() <= 254
            && e.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty()
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !domain.contains('@')
            })
            && !e.chars().any(char::is_whitespace);
        if ok {
            Ok(Email(e))
        } else {
            Err(invalid(format!("{} is not a valid email address", preview(raw))))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password that meets the length rule; its text is never logged.
pub struct Password(String);

impl Password {
    pub const MIN_LEN: usize = 8;
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let n = raw.chars().count();
        if n < Self::MIN_LEN {
            return Err(invalid(format!("password must be at least {} characters", Self::MIN_LEN)));
        }
        if n > 256 {
            return Err(invalid("password must be at most 256 characters"));
        }
        Ok(Password(raw.to_string()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(…)")
    }
}

/// What the admin sends to create a product, validated.
#[derive(Clone, Debug)]
pub struct NewProduct {
    pub sku: String,
    pub name: String,
    pub price_cents: i32,
    pub currency: String,
    pub stock: i32,
}

impl NewProduct {
    pub fn parse(sku: &str, name: &str, price_cents: i32, currency: &str, stock: i32) -> Result<Self, InvalidInput> {
        // judged before trimming: a line break or NUL at either end is as wrong as in the middle
        if has_forbidden_chars(sku) {
            return Err(invalid("sku must not contain control characters"));
        }
        if has_forbidden_chars(name) {
            return Err(invalid(
                "name must not contain control characters (NUL, tabs, line breaks) or text-direction overrides",
            ));
        }
        let sku = sku.trim();
        if sku.is_empty() || sku.len() > 64 || !sku.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(invalid("sku must be 1 to 64 letters, digits, '-', '_' or '.'"));
        }
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(invalid("name must be 1 to 200 characters"));
        }
        if price_cents < 0 {
            return Err(invalid("priceCents must not be negative"));
        }
        parse_currency(currency)?;
        if stock < 0 {
            return Err(invalid("stock must not be negative"));
        }
        Ok(NewProduct {
            sku: sku.to_string(),
            name: name.to_string(),
            price_cents,
            currency: currency.to_string(),
            stock,
        })
    }
}

pub fn parse_currency(raw: &str) -> Result<(), InvalidInput> {
    if raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(invalid(format!("currency must be 3 capital letters (ISO 4217), got {}", preview(raw))))
    }
}

/// An idempotency key: 1..=128 bytes without control characters.
pub fn parse_idempotency_key(raw: &str) -> Result<String, InvalidInput> {
    if raw.is_empty() || raw.len() > 128 {
        return Err(invalid("idempotencyKey must be 1 to 128 bytes"));
    }
    if has_forbidden_chars(raw) {
        return Err(invalid("idempotencyKey must not contain control characters"));
    }
    Ok(raw.to_string())
}

/// The lines of a new order: non-empty, at most 100, no product twice.
#[derive(Clone, Debug)]
pub struct OrderRequest {
    /// Sorted by product id, so that every transaction locks rows in one order.
    pub lines: Vec<(ProductId, Quantity)>,
    pub idempotency_key: Option<String>,
}

impl OrderRequest {
    pub fn new(mut lines: Vec<(ProductId, Quantity)>, idempotency_key: Option<String>) -> Result<Self, InvalidInput> {
        if lines.is_empty() {
            return Err(invalid("an order needs at least one line"));
        }
        if lines.len() > MAX_ORDER_LINES {
            return Err(invalid(format!("an order may have at most {MAX_ORDER_LINES} lines")));
        }
        lines.sort_by_key(|(p, _)| *p);
        if let Some(w) = lines.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(invalid(format!("product {} appears on more than one line", w[0].0)));
        }
        Ok(OrderRequest { lines, idempotency_key })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, async_graphql::Enum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    PendingPayment,
    Paid,
    Cancelled,
}

impl OrderStatus {
    pub fn as_db(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "PENDING_PAYMENT",
            OrderStatus::Paid => "PAID",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }
    /// `None` for text that is no status: a row that says something else
    /// is an error to report, never an order pending payment.
    pub fn from_db(s: &str) -> Option<Self> {
        match s {
            "PENDING_PAYMENT" => Some(OrderStatus::PendingPayment),
            "PAID" => Some(OrderStatus::Paid),
            "CANCELLED" => Some(OrderStatus::Cancelled),
            _ => None,
        }
    }
    pub fn is_final(self) -> bool {
        self != OrderStatus::PendingPayment
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, async_graphql::Enum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CancelReason {
    Expired,
    Customer,
    Admin,
}

impl CancelReason {
    pub fn as_db(self) -> &'static str {
        match self {
            CancelReason::Expired => "EXPIRED",
            CancelReason::Customer => "CUSTOMER",
            CancelReason::Admin => "ADMIN",
        }
    }
    pub fn from_db(s: &str) -> Option<Self> {
        match s {
            "EXPIRED" => Some(CancelReason::Expired),
            "CUSTOMER" => Some(CancelReason::Customer),
            "ADMIN" => Some(CancelReason::Admin),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: CustomerId,
    pub email: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub id: ProductId,
    pub sku: String,
    pub name: String,
    pub price_cents: i32,
    pub currency: String,
    pub stock: i32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: ProductId,
    pub quantity: i32,
    pub unit_price_cents: i32,
}

/// An order as stored, with its lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: OrderId,
    pub customer_id: CustomerId,
    pub status: OrderStatus,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub paid_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub cancel_reason: Option<CancelReason>,
}

/// Who asked for a cancellation; decides the reason and is counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CancelSource {
    Listener,
    Sweep,
    Customer,
    Admin,
}

impl CancelSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelSource::Listener => "listener",
            CancelSource::Sweep => "sweep",
            CancelSource::Customer => "customer",
            CancelSource::Admin => "admin",
        }
    }
}

/// A change of an order's status, recorded in the outbox by the transaction
/// that made it and published to every instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// Unique per change; receivers drop ids they have already delivered.
    pub event_id: i64,
    /// The order after the change.
    pub order: Order,
}

/// A cursor over a list ordered by id: `base64("c:<id>")`.
pub mod cursor {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};

    use super::{invalid, InvalidInput};

    pub fn encode(id: i64) -> String {
        URL_SAFE_NO_PAD.encode(format!("c:{id}"))
    }

    pub fn decode(raw: &str) -> Result<i64, InvalidInput> {
        URL_SAFE_NO_PAD
            .decode(raw)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("c:").and_then(|n| n.parse::<i64>().ok()))
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid(format!("{} is not a valid cursor", super::preview(raw))))
    }
}

/// `first` of a connection: defaults to 20, capped at 100, at least 0.
pub fn page_size(first: Option<i32>) -> Result<usize, InvalidInput> {
    match first {
        None => Ok(20),
        Some(n) if n < 0 => Err(invalid("first must not be negative")),
        Some(n) => Ok((n as usize).min(100)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        assert_eq!(OrderId::parse("ord_42").unwrap(), OrderId(42));
        assert_eq!(OrderId(42).to_string(), "ord_42");
        for bad in ["", "ord_", "ord_-1", "ord_0", "prd_1", "ord_1x", "ord_99999999999999999999", "ord_ 1", "ord_01"] {
            assert!(OrderId::parse(bad).is_err(), "{bad}");
        }
        assert!(ProductId::parse("prd_007").is_err());
    }

    #[test]
    fn statuses_round_trip_and_unknown_text_is_no_status() {
        for s in [OrderStatus::PendingPayment, OrderStatus::Paid, OrderStatus::Cancelled] {
            assert_eq!(OrderStatus::from_db(s.as_db()), Some(s));
        }
        for bad in ["", "pending_payment", "REFUNDED", "PAID "] {
            assert_eq!(OrderStatus::from_db(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn quantities_outside_one_to_ten_thousand_are_refused() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(-3).is_err());
        assert!(Quantity::parse(10_001).is_err());
        assert!(Quantity::parse(10_000).is_ok());
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(cursor::decode(&cursor::encode(7)).unwrap(), 7);
        assert!(cursor::decode("nope!").is_err());
        assert!(cursor::decode("").is_err());
    }

    #[test]
    fn order_requests_refuse_duplicates_and_sort_lines() {
        let q = Quantity(1);
        assert!(OrderRequest::new(vec![(ProductId(2), q), (ProductId(2), q)], None).is_err());
        assert!(OrderRequest::new(vec![], None).is_err());
        let r = OrderRequest::new(vec![(ProductId(3), q), (ProductId(1), q)], None).unwrap();
        assert_eq!(r.lines[0].0, ProductId(1));
    }

    #[test]
    fn control_characters_are_refused_in_every_stored_text() {
        for bad in ["a\0b", "a\u{7}b", "a\nb", "a\tb", "a\u{85}b", "a\u{202E}b", "a\u{1b}[31mb", "ab\n", "\0ab"] {
            assert!(NewProduct::parse("SKU-1", bad, 1, "USD", 1).is_err(), "name {bad:?}");
            assert!(NewProduct::parse(bad, "Name", 1, "USD", 1).is_err(), "sku {bad:?}");
            assert!(parse_idempotency_key(bad).is_err(), "key {bad:?}");
            assert!(Email::parse(&format!("{bad}@example.com")).is_err(), "email {bad:?}");
        }
        assert!(parse_currency("US\0").is_err());
        assert!(NewProduct::parse("SKU-1", "Café crème – 250 g", 1, "EUR", 1).is_ok());
    }

    #[test]
    fn error_messages_show_only_a_prefix_of_long_input() {
        let long = "x".repeat(250_000);
        let e = Email::parse(&long).unwrap_err().0;
        assert!(e.len() < 100, "{e}");
        assert!(e.contains("250000 bytes"), "{e}");
        assert!(ProductId::parse(&long).unwrap_err().0.len() < 100);
        assert_eq!(preview("é".repeat(40).as_str()).chars().filter(|c| *c == 'é').count(), PREVIEW_CHARS);
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(Email::parse(" A@B.io ").unwrap().as_str(), "a@b.io");
        for bad in ["a", "a@b", "@b.io", "a b@c.io", "a@.io"] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }
}

//! What clients send, parsed before anything acts on it: quantities,
//! emails, passwords, new products, currencies, idempotency keys and the
//! lines of a new order.

use super::{has_forbidden_chars, invalid, preview, InvalidInput, ProductId};

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

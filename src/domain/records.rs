//! What the stores keep and the events carry: order statuses and
//! cancellation reasons (with their database spellings), customers,
//! products, orders with their lines, and order events.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{CustomerId, OrderId, ProductId};

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

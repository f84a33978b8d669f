//! The schema's object types: thin views over domain records.

use std::{collections::HashMap, sync::Arc};

use async_graphql::{dataloader::Loader, ComplexObject, Context, Object, Scalar, ScalarType, SimpleObject, ID};

use crate::{
    domain::{CancelReason, Customer, CustomerId, Order, OrderLine, OrderStatus, Product, ProductId},
    error::ShopError,
    store::{Store, StoreError},
};

use super::{errors, services};

/// RFC 3339 with an offset, e.g. "2026-11-23T22:19:31.123Z".
#[derive(Clone, Copy, Debug)]
pub struct DateTime(pub chrono::DateTime<chrono::Utc>);

#[Scalar(name = "DateTime", specified_by_url = "https://www.rfc-editor.org/rfc/rfc3339")]
impl ScalarType for DateTime {
    fn parse(value: async_graphql::Value) -> async_graphql::InputValueResult<Self> {
        match &value {
            async_graphql::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| DateTime(t.with_timezone(&chrono::Utc)))
                .map_err(|_| async_graphql::InputValueError::custom("expected an RFC 3339 timestamp")),
            _ => Err(async_graphql::InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> async_graphql::Value {
        async_graphql::Value::String(self.0.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }
}

pub struct ProductNode(pub Product);

#[Object(name = "Product")]
impl ProductNode {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn sku(&self) -> &str {
        &self.0.sku
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn price_cents(&self) -> i32 {
        self.0.price_cents
    }
    /// ISO 4217, e.g. "USD".
    async fn currency(&self) -> &str {
        &self.0.currency
    }
    /// Units free for new orders.
    async fn stock(&self) -> i32 {
        self.0.stock
    }
}

pub struct CustomerNode(pub Customer);

#[Object(name = "Customer")]
impl CustomerNode {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn email(&self) -> &str {
        &self.0.email
    }
}

#[derive(SimpleObject)]
pub struct AuthPayload {
    pub token: String,
    pub customer: CustomerNode,
}

pub struct OrderLineNode(pub OrderLine);

#[Object(name = "OrderLine")]
impl OrderLineNode {
    async fn product(&self, ctx: &Context<'_>) -> async_graphql::Result<ProductNode> {
        let loaded = services(ctx).loader.load_one(self.0.product_id).await.map_err(errors::loader_error)?;
        loaded.map(ProductNode).ok_or_else(|| ShopError::NotFound(format!("product {}", self.0.product_id)).into())
    }
    async fn quantity(&self) -> i32 {
        self.0.quantity
    }
    /// The price when the order was placed.
    async fn unit_price_cents(&self) -> i32 {
        self.0.unit_price_cents
    }
    async fn line_total_cents(&self) -> i32 {
        // bounded by the order total, which is at most i32::MAX
        (self.0.unit_price_cents as i64 * self.0.quantity as i64) as i32
    }
}

pub struct OrderNode(pub Order);

#[Object(name = "Order")]
impl OrderNode {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }
    async fn customer(&self, ctx: &Context<'_>) -> async_graphql::Result<CustomerNode> {
        let loaded = services(ctx).loader.load_one(self.0.customer_id).await.map_err(errors::loader_error)?;
        loaded.map(CustomerNode).ok_or_else(|| ShopError::NotFound(format!("customer {}", self.0.customer_id)).into())
    }
    async fn status(&self) -> OrderStatus {
        self.0.status
    }
    async fn lines(&self) -> Vec<OrderLineNode> {
        self.0.lines.iter().cloned().map(OrderLineNode).collect()
    }
    async fn total_cents(&self) -> i32 {
        self.0.total_cents as i32
    }
    async fn currency(&self) -> &str {
        &self.0.currency
    }
    async fn created_at(&self) -> DateTime {
        DateTime(self.0.created_at)
    }
    async fn expires_at(&self) -> DateTime {
        DateTime(self.0.expires_at)
    }
    async fn paid_at(&self) -> Option<DateTime> {
        self.0.paid_at.map(DateTime)
    }
    async fn cancelled_at(&self) -> Option<DateTime> {
        self.0.cancelled_at.map(DateTime)
    }
    async fn cancel_reason(&self) -> Option<CancelReason> {
        self.0.cancel_reason
    }
}

pub struct OrderCancelledEvent(pub Arc<crate::domain::OrderEvent>);

#[Object(name = "OrderCancelledEvent")]
impl OrderCancelledEvent {
    async fn order(&self) -> OrderNode {
        OrderNode(self.0.order.clone())
    }
    async fn reason(&self) -> CancelReason {
        self.0.order.cancel_reason.unwrap_or(CancelReason::Expired)
    }
    async fn cancelled_at(&self) -> DateTime {
        DateTime(self.0.order.cancelled_at.unwrap_or_default())
    }
}

#[derive(SimpleObject, Default)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub has_previous_page: bool,
    pub start_cursor: Option<String>,
    pub end_cursor: Option<String>,
}

#[derive(SimpleObject)]
pub struct ProductEdge {
    pub node: ProductNode,
    pub cursor: String,
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct ProductConnection {
    pub edges: Vec<ProductEdge>,
    pub page_info: PageInfo,
}

#[ComplexObject]
impl ProductConnection {
    async fn nodes(&self) -> Vec<ProductNode> {
        self.edges.iter().map(|e| ProductNode(e.node.0.clone())).collect()
    }
}

#[derive(SimpleObject)]
pub struct OrderEdge {
    pub node: OrderNode,
    pub cursor: String,
}

#[derive(SimpleObject)]
#[graphql(complex)]
pub struct OrderConnection {
    pub edges: Vec<OrderEdge>,
    pub page_info: PageInfo,
}

#[ComplexObject]
impl OrderConnection {
    async fn nodes(&self) -> Vec<OrderNode> {
        self.edges.iter().map(|e| OrderNode(e.node.0.clone())).collect()
    }
}

/// Builds a Relay page from `limit + 1` rows fetched after a cursor.
pub fn page<T, E>(
    mut rows: Vec<T>,
    limit: usize,
    had_cursor: bool,
    id: impl Fn(&T) -> i64,
    edge: impl Fn(T, String) -> E,
) -> (Vec<E>, PageInfo) {
    let has_next_page = rows.len() > limit;
    rows.truncate(limit);
    let cursors: Vec<String> = rows.iter().map(|r| crate::domain::cursor::encode(id(r))).collect();
    let info = PageInfo {
        has_next_page,
        has_previous_page: had_cursor,
        start_cursor: cursors.first().cloned(),
        end_cursor: cursors.last().cloned(),
    };
    (rows.into_iter().zip(cursors).map(|(r, c)| edge(r, c)).collect(), info)
}

/// Batches product and customer reads of one moment into one query each.
pub struct StoreLoader(pub Arc<dyn Store>);

impl Loader<ProductId> for StoreLoader {
    type Value = Product;
    type Error = Arc<StoreError>;

    async fn load(&self, keys: &[ProductId]) -> Result<HashMap<ProductId, Product>, Self::Error> {
        let rows = self.0.products_by_ids(keys).await.map_err(Arc::new)?;
        Ok(rows.into_iter().map(|p| (p.id, p)).collect())
    }
}

impl Loader<CustomerId> for StoreLoader {
    type Value = Customer;
    type Error = Arc<StoreError>;

    async fn load(&self, keys: &[CustomerId]) -> Result<HashMap<CustomerId, Customer>, Self::Error> {
        let rows = self.0.customers_by_ids(keys).await.map_err(Arc::new)?;
        Ok(rows.into_iter().map(|c| (c.id, c)).collect())
    }
}

//! `Mutation`: customers, products (admin), orders.

use async_graphql::{Context, InputObject, Object, ID};

use super::{
    identity, services,
    types::{AuthPayload, CustomerNode, OrderNode, ProductNode},
    ClientAddr,
};
use crate::{
    auth::Identity,
    domain::{parse_idempotency_key, Email, NewProduct, OrderId, OrderRequest, Password, ProductId, Quantity},
    error::ShopError,
    store::StoreError,
};

pub struct Mutation;

#[derive(InputObject)]
pub struct CreateProductInput {
    pub sku: String,
    pub name: String,
    pub price_cents: i32,
    pub currency: String,
    pub stock: i32,
}

#[derive(InputObject)]
pub struct OrderLineInput {
    pub product_id: ID,
    pub quantity: i32,
}

#[derive(InputObject)]
pub struct CreateOrderInput {
    pub lines: Vec<OrderLineInput>,
    pub idempotency_key: Option<String>,
}

impl TryFrom<CreateOrderInput> for OrderRequest {
    type Error = crate::domain::InvalidInput;

    fn try_from(input: CreateOrderInput) -> Result<Self, Self::Error> {
        if input.lines.len() > crate::domain::MAX_ORDER_LINES {
            return Err(crate::domain::invalid(format!(
                "an order may have at most {} lines",
                crate::domain::MAX_ORDER_LINES
            )));
        }
        let lines = input
            .lines
            .iter()
            .map(|l| Ok((ProductId::parse(&l.product_id)?, Quantity::parse(l.quantity)?)))
            .collect::<Result<Vec<_>, crate::domain::InvalidInput>>()?;
        let key = input.idempotency_key.as_deref().map(parse_idempotency_key).transpose()?;
        OrderRequest::new(lines, key)
    }
}

fn require_admin(ctx: &Context<'_>) -> Result<(), ShopError> {
    match identity(ctx) {
        Identity::Admin => Ok(()),
        _ if !services(ctx).auth.admin_configured() => {
            Err(ShopError::Forbidden("admin operations are disabled: ADMIN_TOKEN is not set"))
        }
        Identity::Anonymous => Err(ShopError::Forbidden("this operation needs the admin token")),
        Identity::Customer(_) => Err(ShopError::Forbidden("this operation needs the admin token")),
    }
}

/// The client's address; `None` for callers without one (never over HTTP or websockets).
fn client_addr(ctx: &Context<'_>) -> Option<std::net::IpAddr> {
    ctx.data_opt::<ClientAddr>().map(|a| a.0)
}

#[Object]
impl Mutation {
    async fn register_customer(
        &self,
        ctx: &Context<'_>,
        email: String,
        password: String,
    ) -> async_graphql::Result<AuthPayload> {
        let email = Email::parse(&email)?;
        let password = Password::parse(&password)?;
        let s = services(ctx);
        if let Some(addr) = client_addr(ctx) {
            s.limits.register(addr).await.map_err(ShopError::RateLimited)?;
        }
        let hash = s.auth.hash_password(password.expose().to_string()).await;
        let customer = s.store.create_customer(&email, &hash).await.map_err(|e| match e {
            StoreError::Conflict(_) => ShopError::Conflict("a customer with this email already exists".into()),
            e => ShopError::Store(e),
        })?;
        tracing::info!(customer_id = %customer.id, "customer registered");
        Ok(AuthPayload { token: s.auth.issue_token(customer.id), customer: CustomerNode(customer) })
    }

    async fn login(&self, ctx: &Context<'_>, email: String, password: String) -> async_graphql::Result<AuthPayload> {
        let s = services(ctx);
        let email = Email::parse(&email).ok();
        if let Some(addr) = client_addr(ctx) {
            // per address and per account: many addresses guessing one
            // password, and one address guessing many, are both stopped
            s.limits.login(addr, email.as_ref().map(Email::as_str)).await.map_err(ShopError::RateLimited)?;
        }
        let wrong = || ShopError::Unauthenticated("wrong email or password");
        // a malformed email is simply unknown: same answer, same cost
        let found = match &email {
            Some(email) => s.store.customer_credentials(email).await?,
            None => None,
        };
        let (customer, hash) = match found {
            Some((c, h)) => (Some(c), Some(h)),
            None => (None, None),
        };
        if !s.auth.verify_password(password, hash).await {
            return Err(wrong().into());
        }
        let customer = customer.ok_or_else(wrong)?;
        Ok(AuthPayload { token: s.auth.issue_token(customer.id), customer: CustomerNode(customer) })
    }

    /// Admin only.
    async fn create_product(&self, ctx: &Context<'_>, input: CreateProductInput) -> async_graphql::Result<ProductNode> {
        require_admin(ctx)?;
        let p = NewProduct::parse(&input.sku, &input.name, input.price_cents, &input.currency, input.stock)?;
        let product = services(ctx).store.create_product(&p).await.map_err(|e| match e {
            StoreError::Conflict(_) => ShopError::Conflict(format!("a product with sku {:?} already exists", p.sku)),
            e => ShopError::Store(e),
        })?;
        services(ctx).events.catalog_changed();
        Ok(ProductNode(product))
    }

    /// Admin only; adds `quantity` to the free stock.
    async fn restock_product(&self, ctx: &Context<'_>, id: ID, quantity: i32) -> async_graphql::Result<ProductNode> {
        require_admin(ctx)?;
        let id = ProductId::parse(&id)?;
        if !(1..=1_000_000).contains(&quantity) {
            return Err(ShopError::Invalid(crate::domain::invalid("quantity must be between 1 and 1000000")).into());
        }
        let store = &services(ctx).store;
        let product = match store.restock_product(id, quantity).await? {
            Some(p) => p,
            None if store.products_by_ids(&[id]).await?.is_empty() => {
                return Err(ShopError::NotFound(format!("product {id}")).into())
            }
            None => {
                return Err(ShopError::Invalid(crate::domain::invalid("the stock would exceed 2147483647 units")).into())
            }
        };
        services(ctx).events.catalog_changed();
        Ok(ProductNode(product))
    }

    /// Customers only: reserves the stock of every line, or nothing.
    async fn create_order(&self, ctx: &Context<'_>, input: CreateOrderInput) -> async_graphql::Result<OrderNode> {
        let request = OrderRequest::try_from(input)?;
        // the per-customer rate limit is counted by the placement itself
        let order = services(ctx).orders.place(identity(ctx), request).await?;
        Ok(OrderNode(order))
    }

    /// The order's customer or the admin.
    async fn pay_order(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<OrderNode> {
        let id = OrderId::parse(&id)?;
        Ok(OrderNode(services(ctx).orders.pay(identity(ctx), id).await?))
    }

    /// The order's customer or the admin.
    async fn cancel_order(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<OrderNode> {
        let id = OrderId::parse(&id)?;
        Ok(OrderNode(services(ctx).orders.cancel(identity(ctx), id).await?))
    }
}

//! `Query`: products are public; orders are the caller's own (admin: all).

use async_graphql::{Context, Object, ID};

use super::{
    identity, services,
    types::{page, CustomerNode, OrderConnection, OrderEdge, OrderNode, ProductConnection, ProductEdge, ProductNode},
};
use crate::{
    auth::Identity,
    domain::{cursor, page_size, OrderId, OrderStatus, ProductId},
};

pub struct Query;

#[Object]
impl Query {
    /// Products, oldest first. `first` defaults to 20 and is capped at 100.
    async fn products(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<ProductConnection> {
        let limit = page_size(first)?;
        let after = after.as_deref().map(cursor::decode).transpose()?;
        let rows = services(ctx).store.catalog_page(after, limit + 1).await?;
        let (edges, page_info) =
            page(rows, limit, after.is_some(), |p| p.id.0, |p, cursor| ProductEdge { node: ProductNode(p), cursor });
        Ok(ProductConnection { edges, page_info })
    }

    async fn product(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<ProductNode>> {
        let id = ProductId::parse(&id)?;
        let rows = services(ctx).store.catalog_products(&[id]).await?;
        Ok(rows.into_iter().next().map(ProductNode))
    }

    /// The signed-in customer; null for anonymous callers and the admin.
    async fn me(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<CustomerNode>> {
        let Identity::Customer(id) = identity(ctx) else { return Ok(None) };
        let rows = services(ctx).store.customers_by_ids(&[id]).await?;
        Ok(rows.into_iter().next().map(CustomerNode))
    }

    /// One of your orders (admin: any); null when it does not exist or is not yours.
    async fn order(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Option<OrderNode>> {
        let id = OrderId::parse(&id)?;
        let viewer = identity(ctx).viewer()?;
        let order = services(ctx).store.order(id).await?;
        Ok(crate::store::visible(order, viewer).map(OrderNode))
    }

    /// Your orders (admin: all), newest first, optionally of one status.
    async fn orders(
        &self,
        ctx: &Context<'_>,
        status: Option<OrderStatus>,
        first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<OrderConnection> {
        let viewer = identity(ctx).viewer()?;
        let limit = page_size(first)?;
        let before = after.as_deref().map(cursor::decode).transpose()?;
        let rows = services(ctx).store.list_orders(viewer, status, before, limit + 1).await?;
        let (edges, page_info) =
            page(rows, limit, before.is_some(), |o| o.id.0, |o, cursor| OrderEdge { node: OrderNode(o), cursor });
        Ok(OrderConnection { edges, page_info })
    }
}

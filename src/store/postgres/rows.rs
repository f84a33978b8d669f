//! Postgres rows as domain values, and the reads every part of the backend
//! shares: products by id or page, an order's lines.

use sqlx::{postgres::PgRow, PgPool, Postgres, Row};

use crate::domain::{CustomerId, Order, OrderId, OrderLine, Product, ProductId};
use crate::store::{attach_lines, product_from, reason_from, status_from, StoreError};

pub(super) fn order_from(row: &PgRow) -> Result<Order, sqlx::Error> {
    let reason: Option<String> = row.try_get("cancel_reason")?;
    Ok(Order {
        id: OrderId(row.try_get("id")?),
        customer_id: CustomerId(row.try_get("customer_id")?),
        status: status_from(row.try_get("status")?)?,
        lines: Vec::new(),
        total_cents: row.try_get("total_cents")?,
        currency: row.try_get("currency")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        paid_at: row.try_get("paid_at")?,
        cancelled_at: row.try_get("cancelled_at")?,
        cancel_reason: reason_from(reason.as_deref())?,
    })
}

/// Attaches the lines to orders read without them.
pub(super) async fn with_lines<'e, E>(exec: E, mut orders: Vec<Order>) -> Result<Vec<Order>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    if orders.is_empty() {
        return Ok(orders);
    }
    let ids: Vec<i64> = orders.iter().map(|o| o.id.0).collect();
    let rows = sqlx::query(
        "SELECT order_id, product_id, quantity, unit_price_cents FROM order_lines WHERE order_id = ANY($1) ORDER BY order_id, product_id",
    )
    .bind(&ids)
    .fetch_all(exec)
    .await?;
    let lines = rows
        .iter()
        .map(|row| {
            Ok((
                row.try_get("order_id")?,
                OrderLine {
                    product_id: ProductId(row.try_get("product_id")?),
                    quantity: row.try_get("quantity")?,
                    unit_price_cents: row.try_get("unit_price_cents")?,
                },
            ))
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    attach_lines(&mut orders, lines);
    Ok(orders)
}

pub(super) async fn select_products(pool: &PgPool, ids: &[ProductId]) -> Result<Vec<Product>, StoreError> {
    let ids: Vec<i64> = ids.iter().map(|p| p.0).collect();
    let rows = sqlx::query("SELECT id, sku, name, price_cents, currency, stock FROM products WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(product_from).collect::<Result<_, _>>()?)
}

pub(super) async fn select_product_page(
    pool: &PgPool,
    after: Option<i64>,
    limit: usize,
) -> Result<Vec<Product>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, sku, name, price_cents, currency, stock FROM products WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after.unwrap_or(0))
    .bind(limit as i64)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(product_from).collect::<Result<_, _>>()?)
}

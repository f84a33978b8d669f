//! SQLite rows as domain values (times are unix milliseconds), and an
//! order's lines.

use sqlx::{sqlite::SqliteRow, Row, Sqlite};

use super::{json_ids, time};
use crate::domain::{CustomerId, Order, OrderId, OrderLine, ProductId};
use crate::store::{attach_lines, reason_from, status_from};

pub(super) fn order_from(row: &SqliteRow) -> Result<Order, sqlx::Error> {
    let reason: Option<String> = row.try_get("cancel_reason")?;
    let status: String = row.try_get("status")?;
    Ok(Order {
        id: OrderId(row.try_get("id")?),
        customer_id: CustomerId(row.try_get("customer_id")?),
        status: status_from(&status)?,
        lines: Vec::new(),
        total_cents: row.try_get("total_cents")?,
        currency: row.try_get("currency")?,
        created_at: time(row.try_get("created_at")?),
        expires_at: time(row.try_get("expires_at")?),
        paid_at: row.try_get::<Option<i64>, _>("paid_at")?.map(time),
        cancelled_at: row.try_get::<Option<i64>, _>("cancelled_at")?.map(time),
        cancel_reason: reason_from(reason.as_deref())?,
    })
}

pub(super) async fn with_lines<'e, E>(exec: E, mut orders: Vec<Order>) -> Result<Vec<Order>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    if orders.is_empty() {
        return Ok(orders);
    }
    let rows = sqlx::query(
        "SELECT order_id, product_id, quantity, unit_price_cents FROM order_lines
         WHERE order_id IN (SELECT value FROM json_each(?1)) ORDER BY order_id, product_id",
    )
    .bind(json_ids(orders.iter().map(|o| o.id.0)))
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

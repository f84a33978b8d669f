//! What a winning state change writes after its conditional `UPDATE`: the
//! stock a cancellation returns, and the events of the outbox.

use chrono::Utc;
use sqlx::{sqlite::SqliteRow, Sqlite, Transaction};

use super::rows::{order_from, with_lines};
use super::{json_ids, ms};
use crate::domain::{Order, OrderEvent};

/// After the winning `UPDATE … RETURNING`: return stock, record events.
pub(super) async fn finish_cancel(
    tx: &mut Transaction<'_, Sqlite>,
    rows: Vec<SqliteRow>,
) -> Result<Vec<OrderEvent>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let orders = rows.iter().map(order_from).collect::<Result<Vec<_>, _>>()?;
    let orders = with_lines(&mut **tx, orders).await?;
    sqlx::query(
        "UPDATE products SET stock = stock + r.qty
         FROM (SELECT product_id, SUM(quantity) AS qty FROM order_lines
               WHERE order_id IN (SELECT value FROM json_each(?1)) GROUP BY product_id) AS r
         WHERE products.id = r.product_id",
    )
    .bind(json_ids(orders.iter().map(|o| o.id.0)))
    .execute(&mut **tx)
    .await?;
    record_events(tx, orders).await
}

pub(super) async fn record_events(
    tx: &mut Transaction<'_, Sqlite>,
    orders: Vec<Order>,
) -> Result<Vec<OrderEvent>, sqlx::Error> {
    let now = ms(Utc::now());
    let mut events = Vec::with_capacity(orders.len());
    for order in orders {
        let event_id: i64 =
            sqlx::query_scalar("INSERT INTO outbox (order_id, payload, created_at) VALUES (?1, ?2, ?3) RETURNING id")
                .bind(order.id.0)
                .bind(serde_json::to_string(&order).expect("orders serialise"))
                .bind(now)
                .fetch_one(&mut **tx)
                .await?;
        events.push(OrderEvent { event_id, order });
    }
    Ok(events)
}

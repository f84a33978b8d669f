//! What a winning state change writes after its conditional `UPDATE`: the
//! stock a cancellation returns, and the events of the outbox.

use sqlx::{postgres::PgRow, Postgres, Transaction};

use super::rows::{order_from, with_lines};
use crate::domain::{Order, OrderEvent};

/// The part of every cancellation after the winning `UPDATE … RETURNING`:
/// return the stock of the cancelled orders and record their events.
pub(super) async fn finish_cancel(
    tx: &mut Transaction<'_, Postgres>,
    rows: Vec<PgRow>,
) -> Result<Vec<OrderEvent>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let orders = rows.iter().map(order_from).collect::<Result<Vec<_>, _>>()?;
    let orders = with_lines(&mut **tx, orders).await?;
    // Sum per product and lock in product-id order, the order in which the
    // placements lock (`place::one`, and `place_batch`, which locks all of a
    // batch's products once, before taking any stock), so that none of them
    // deadlock. The lock is its own statement: an `UPDATE … FROM` takes its
    // row locks in whatever order its join reads the table (the soak test
    // caught the deadlock).
    let mut returned: std::collections::BTreeMap<i64, i32> = Default::default();
    for o in &orders {
        for l in &o.lines {
            *returned.entry(l.product_id.0).or_default() += l.quantity;
        }
    }
    let (pids, qtys): (Vec<i64>, Vec<i32>) = returned.into_iter().unzip();
    if pids.len() > 1 {
        sqlx::query("SELECT 1 FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&pids)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query(
        "UPDATE products p SET stock = p.stock + r.qty
         FROM (SELECT * FROM unnest($1::bigint[], $2::int[]) AS r(pid, qty) ORDER BY pid) r
         WHERE p.id = r.pid",
    )
    .bind(&pids)
    .bind(&qtys)
    .execute(&mut **tx)
    .await?;
    record_events(tx, orders).await
}

pub(super) async fn record_events(
    tx: &mut Transaction<'_, Postgres>,
    orders: Vec<Order>,
) -> Result<Vec<OrderEvent>, sqlx::Error> {
    let order_ids: Vec<i64> = orders.iter().map(|o| o.id.0).collect();
    let payloads: Vec<String> = orders.iter().map(|o| serde_json::to_string(o).expect("orders serialise")).collect();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO outbox (order_id, payload) SELECT * FROM unnest($1::bigint[], $2::text[]) RETURNING id",
    )
    .bind(&order_ids)
    .bind(&payloads)
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids.into_iter().zip(orders).map(|(event_id, order)| OrderEvent { event_id, order }).collect())
}

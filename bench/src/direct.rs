//! Writing pending orders straight into the database and Redis, in the
//! server's own formats, for the scenarios that need more orders than the
//! API can create in the time they allow (1,000,000 pending; 50,000
//! expiring in the same second; 100,000 overdue):
//!
//! * the database: `orders` rows (`PENDING_PAYMENT`, explicit ids reserved
//!   from the id sequence, one `order_lines` row each, the product's stock
//!   taken), from `generate_series` (Postgres) or a recursive CTE (SQLite),
//!   100,000 rows per statement (migrations/*/…_init.sql);
//! * Redis (src/expiry/schedule.rs): for each order, in its deadline shard
//!   `N = id mod 16`, the hash `<prefix>{sN}order:<id>` (`customer`,
//!   `total_cents`, `currency`, `expires_at`) with `PEXPIREAT` at the
//!   deadline, and the member `<id>` with score = deadline (ms) in the sorted
//!   set `<prefix>{sN}deadlines`, pipelined up to 2,000 orders (6,000
//!   commands) of one shard per round trip (one shard is one Cluster slot).
//!
//! Deadline of order `i` of `n`: `t0 + i * span / n` (ms, integer division),
//! the same on both sides.

use std::time::Duration;

use anyhow::{bail, Result};
use futures_util::{StreamExt, TryStreamExt};
use sqlx::{Connection, Row};

use crate::server::{redis_any, Db, StoreKind};

/// The server's deadline shards (src/expiry/schedule.rs `SHARDS`).
const SHARDS: i64 = 16;

/// A range of orders written directly.
#[derive(Clone, Copy, Debug)]
pub struct Bulk {
    pub first_id: i64,
    pub n: i64,
    pub t0_ms: i64,
    pub span_ms: i64,
    pub customer: i64,
    pub product: i64,
    pub price_cents: i64,
}

impl Bulk {
    pub fn last_id(&self) -> i64 {
        self.first_id + self.n - 1
    }
    pub fn deadline_ms(&self, id: i64) -> i64 {
        self.t0_ms + ((id - self.first_id) * self.span_ms) / self.n.max(1)
    }
}

pub enum DbConn {
    Pg(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

const CHUNK: i64 = 100_000;

impl DbConn {
    pub async fn open(db: &Db) -> Result<DbConn> {
        Ok(match db.kind {
            StoreKind::Postgres => DbConn::Pg(sqlx::PgConnection::connect(&db.url).await?),
            StoreKind::Sqlite => {
                use std::str::FromStr;
                let opts = sqlx::sqlite::SqliteConnectOptions::from_str(&db.url)?
                    .busy_timeout(Duration::from_secs(60))
                    .foreign_keys(true);
                DbConn::Sqlite(sqlx::SqliteConnection::connect_with(&opts).await?)
            }
        })
    }

    /// Inserts `n` customers in one statement and returns their ids: shoppers
    /// for the order load, which would otherwise spend minutes in argon2
    /// registering them. Their password hash matches no password (they hold
    /// tokens, issued by the server's own code, and never log in).
    pub async fn insert_customers(&mut self, n: i64) -> Result<Vec<i64>> {
        let tag = crate::server::short_id();
        Ok(match self {
            DbConn::Pg(c) => {
                sqlx::query_scalar(
                    "INSERT INTO customers (email, password_hash)
                     SELECT 'shopper-' || g || '-' || $2 || '@bench.example', '!' FROM generate_series(1, $1) g
                     RETURNING id",
                )
                .bind(n)
                .bind(&tag)
                .fetch_all(&mut *c)
                .await?
            }
            DbConn::Sqlite(c) => {
                sqlx::query_scalar(
                    "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < ?1)
                     INSERT INTO customers (email, password_hash)
                     SELECT 'shopper-' || i || '-' || ?2 || '@bench.example', '!' FROM g
                     RETURNING id",
                )
                .bind(n)
                .bind(&tag)
                .fetch_all(&mut *c)
                .await?
            }
        })
    }

    /// Reserves `n` order ids and returns the first.
    pub async fn reserve_ids(&mut self, n: i64) -> Result<i64> {
        match self {
            DbConn::Pg(c) => {
                let first: i64 = sqlx::query_scalar("SELECT nextval('orders_id_seq')").fetch_one(&mut *c).await?;
                sqlx::query("SELECT setval('orders_id_seq', $1)").bind(first + n - 1).execute(&mut *c).await?;
                Ok(first)
            }
            DbConn::Sqlite(c) => {
                // AUTOINCREMENT continues after the largest id ever used
                let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'orders'")
                    .fetch_optional(&mut *c)
                    .await?;
                let max: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM orders").fetch_one(&mut *c).await?;
                Ok(seq.unwrap_or(0).max(max.unwrap_or(0)) + 1)
            }
        }
    }

    /// Inserts the orders of `b` as pending, with their lines, taking stock.
    pub async fn insert_pending(&mut self, b: &Bulk) -> Result<()> {
        let mut from = b.first_id;
        while from <= b.last_id() {
            let to = (from + CHUNK - 1).min(b.last_id());
            match self {
                DbConn::Pg(c) => {
                    let mut tx = c.begin().await?;
                    sqlx::query(
                        "INSERT INTO orders (id, customer_id, status, total_cents, currency, created_at, expires_at, fingerprint)
                         SELECT g, $1, 'PENDING_PAYMENT', $2, 'USD', now(),
                                to_timestamp(($3::bigint + ((g - $4::bigint) * $5::bigint) / $6::bigint) / 1000.0),
                                'bench-direct'
                         FROM generate_series($7::bigint, $8::bigint) AS g",
                    )
                    .bind(b.customer)
                    .bind(b.price_cents)
                    .bind(b.t0_ms)
                    .bind(b.first_id)
                    .bind(b.span_ms)
                    .bind(b.n)
                    .bind(from)
                    .bind(to)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents)
                         SELECT g, $1, 1, $2 FROM generate_series($3::bigint, $4::bigint) AS g",
                    )
                    .bind(b.product)
                    .bind(b.price_cents as i32)
                    .bind(from)
                    .bind(to)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query("UPDATE products SET stock = stock - $2 WHERE id = $1")
                        .bind(b.product)
                        .bind((to - from + 1) as i32)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                }
                DbConn::Sqlite(c) => {
                    let mut tx = c.begin().await?;
                    sqlx::query(
                        "WITH RECURSIVE s(g) AS (SELECT ?1 UNION ALL SELECT g + 1 FROM s WHERE g < ?2)
                         INSERT INTO orders (id, customer_id, status, total_cents, currency, created_at, expires_at, fingerprint)
                         SELECT g, ?3, 'PENDING_PAYMENT', ?4, 'USD', CAST(unixepoch('subsec') * 1000 AS INTEGER),
                                ?5 + ((g - ?6) * ?7) / ?8, 'bench-direct'
                         FROM s",
                    )
                    .bind(from)
                    .bind(to)
                    .bind(b.customer)
                    .bind(b.price_cents)
                    .bind(b.t0_ms)
                    .bind(b.first_id)
                    .bind(b.span_ms)
                    .bind(b.n)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "WITH RECURSIVE s(g) AS (SELECT ?1 UNION ALL SELECT g + 1 FROM s WHERE g < ?2)
                         INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents)
                         SELECT g, ?3, 1, ?4 FROM s",
                    )
                    .bind(from)
                    .bind(to)
                    .bind(b.product)
                    .bind(b.price_cents)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query("UPDATE products SET stock = stock - ?2 WHERE id = ?1")
                        .bind(b.product)
                        .bind(to - from + 1)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                }
            }
            from = to + 1;
        }
        Ok(())
    }

    /// Pending orders with ids in `[first, last]`.
    pub async fn pending_between(&mut self, first: i64, last: i64) -> Result<i64> {
        Ok(match self {
            DbConn::Pg(c) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM orders WHERE id BETWEEN $1 AND $2 AND status = 'PENDING_PAYMENT'",
                )
                .bind(first)
                .bind(last)
                .fetch_one(&mut *c)
                .await?
            }
            DbConn::Sqlite(c) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM orders WHERE id BETWEEN ?1 AND ?2 AND status = 'PENDING_PAYMENT'",
                )
                .bind(first)
                .bind(last)
                .fetch_one(&mut *c)
                .await?
            }
        })
    }

    /// `(expires_at, cancelled_at)` in ms of the cancelled orders in `[first, last]`.
    pub async fn cancel_times(&mut self, first: i64, last: i64) -> Result<Vec<(f64, f64)>> {
        match self {
            DbConn::Pg(c) => {
                let rows = sqlx::query(
                    "SELECT (extract(epoch FROM expires_at) * 1000)::float8 AS e, (extract(epoch FROM cancelled_at) * 1000)::float8 AS c
                     FROM orders WHERE id BETWEEN $1 AND $2 AND status = 'CANCELLED'",
                )
                .bind(first)
                .bind(last)
                .fetch_all(&mut *c)
                .await?;
                Ok(rows.iter().map(|r| (r.get::<f64, _>("e"), r.get::<f64, _>("c"))).collect())
            }
            DbConn::Sqlite(c) => {
                let rows = sqlx::query(
                    "SELECT expires_at AS e, cancelled_at AS c FROM orders WHERE id BETWEEN ?1 AND ?2 AND status = 'CANCELLED'",
                )
                .bind(first)
                .bind(last)
                .fetch_all(&mut *c)
                .await?;
                Ok(rows.iter().map(|r| (r.get::<i64, _>("e") as f64, r.get::<i64, _>("c") as f64)).collect())
            }
        }
    }

    pub async fn close(self) {
        let _ = match self {
            DbConn::Pg(c) => c.close().await,
            DbConn::Sqlite(c) => c.close().await,
        };
    }
}

/// Writes the expiry hash, `PEXPIREAT` and deadline entry of every order in `b`.
pub async fn schedule_in_redis(redis_url: &str, prefix: &str, b: &Bulk) -> Result<()> {
    const PER_PIPE: usize = 2000;
    let conn = redis_any(redis_url).await?;
    let mut batches: Vec<(i64, Vec<i64>)> = Vec::new();
    for shard in 0..SHARDS {
        let first = b.first_id + (shard - b.first_id).rem_euclid(SHARDS);
        let ids: Vec<i64> = (first..=b.last_id()).step_by(SHARDS as usize).collect();
        batches.extend(ids.chunks(PER_PIPE).map(|c| (shard, c.to_vec())));
    }
    futures_util::stream::iter(batches)
        .map(|(shard, ids)| {
            let mut conn = conn.clone();
            let b = *b;
            async move {
                let mut pipe = redis::pipe();
                for id in ids {
                    let key = format!("{prefix}{{s{shard}}}order:{id}");
                    let deadline = b.deadline_ms(id);
                    let expires = chrono::DateTime::from_timestamp_millis(deadline)
                        .unwrap_or_default()
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    let fields = [
                        ("customer", format!("cus_{}", b.customer)),
                        ("total_cents", b.price_cents.to_string()),
                        ("currency", "USD".to_string()),
                        ("expires_at", expires),
                    ];
                    pipe.hset_multiple(&key, &fields).ignore();
                    pipe.pexpire_at(&key, deadline).ignore();
                    pipe.zadd(format!("{prefix}{{s{shard}}}deadlines"), id, deadline).ignore();
                }
                pipe.query_async::<()>(&mut conn).await
            }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Writes `b` to the database, then Redis (the server's order: commit, then
/// schedule), and checks that the first deadline is still ahead.
pub async fn insert_scheduled(db: &Db, redis_url: &str, prefix: &str, b: &Bulk, redis_too: bool) -> Result<()> {
    let mut c = DbConn::open(db).await?;
    c.insert_pending(b).await?;
    c.close().await;
    if redis_too {
        schedule_in_redis(redis_url, prefix, b).await?;
        let now = crate::client::now_ms() as i64;
        if now >= b.t0_ms {
            bail!("inserting took too long: the first deadline passed {} ms before the insert ended (raise the lead time)", now - b.t0_ms);
        }
    }
    Ok(())
}

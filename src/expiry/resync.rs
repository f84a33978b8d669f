//! Writing back the expiry keys a Redis server may have lost.
//!
//! The sweep cancels orders that are already overdue when the listener
//! comes back, but an order whose key is gone and whose deadline is still
//! ahead would otherwise wait for the sweep after its deadline (up to
//! `SWEEP_INTERVAL` late). Keys go missing when Redis restarts empty, when a
//! different server takes over (a fresh one, or a promoted replica that had
//! not yet received the last writes: replication is asynchronous), and when
//! shopgraph restarts against such a server.
//!
//! The deployment keeps one marker key beside its expiry keys. Whenever the
//! listener (re)connects:
//! * no marker: the server holds none of our state (new or emptied), so every
//!   pending order with a deadline ahead is scheduled again, then the marker
//!   is set;
//! * a marker, after a reconnect: the server kept its data, except perhaps
//!   what was written just before a failover; the orders placed in the last
//!   [`RECENT`] are scheduled again.
//!
//! Scheduling is idempotent (the same hash, expiry and index entry), so
//! several instances doing it at once, or an order scheduled twice, change
//! nothing; an order that ended meanwhile is skipped by its cancellation's
//! conditional update.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::{auth::Viewer, domain::OrderStatus, orders::Orders};

/// How far back a reconnect re-schedules orders: far longer than the
/// replication lag of a healthy replica.
pub const RECENT: Duration = Duration::from_secs(30);
/// Orders read per page, and expiry writes in flight at once.
const PAGE: usize = 500;
const WRITES_IN_FLIGHT: usize = 64;

/// Runs one resync at a time; a reconnect during one does not start another.
#[derive(Clone, Default)]
pub struct Resync {
    running: Arc<Mutex<()>>,
}

impl Resync {
    /// Called by the listener on every subscription (re)connect; works in
    /// the background.
    pub fn connected(&self, orders: Arc<Orders>, reconnected: bool) {
        let Ok(guard) = self.running.clone().try_lock_owned() else { return };
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = after_connect(&orders, reconnected, Utc::now()).await {
                warn!(error = %e, "could not check or re-write expiry keys after connecting; the sweep covers those orders");
            }
        });
    }
}

/// The marker check and the resync it calls for (see the module's doc).
/// Returns how many orders were scheduled again.
pub async fn after_connect(orders: &Orders, reconnected: bool, now: DateTime<Utc>) -> Result<usize, String> {
    let scheduler = &orders.scheduler;
    let marker = scheduler.keys.marker();
    let mut conn = scheduler.conn.clone();
    let kept: Option<String> = conn.get(&marker).await.map_err(|e| e.to_string())?;
    let since = match (kept, reconnected) {
        (None, _) => None,
        (Some(_), true) => Some(now - chrono::Duration::from_std(RECENT).unwrap_or_default()),
        (Some(_), false) => return Ok(0),
    };
    let n = reschedule(orders, since, now).await?;
    if since.is_none() {
        let _: () = conn.set(&marker, "1").await.map_err(|e| e.to_string())?;
    }
    if n > 0 {
        match since {
            None => info!(orders = n, "Redis held none of this deployment's expiry keys (a new or emptied server): scheduled every pending order again"),
            Some(_) => info!(orders = n, "scheduled the orders of the last {RECENT:?} again after a reconnect (keys written just before a failover may be lost)"),
        }
    }
    Ok(n)
}

/// Schedules again every pending order with a deadline after `now`, placed
/// at or after `since` (all of them without), newest first.
pub async fn reschedule(orders: &Orders, since: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Result<usize, String> {
    let mut before = None;
    let mut scheduled = 0;
    loop {
        let page = orders
            .store
            .list_orders(Viewer::Admin, Some(OrderStatus::PendingPayment), before, PAGE)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last() else { break };
        before = Some(last.id.0);
        let reached_since = since.is_some_and(|s| last.created_at < s);
        let due: Vec<_> =
            page.iter().filter(|o| o.expires_at > now && since.is_none_or(|s| o.created_at >= s)).collect();
        scheduled += due.len();
        futures_util::stream::iter(due)
            .for_each_concurrent(WRITES_IN_FLIGHT, |o| async move { orders.scheduler.schedule(o).await })
            .await;
        if page.len() < PAGE || reached_since {
            break;
        }
    }
    Ok(scheduled)
}

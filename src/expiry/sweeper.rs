//! The safety net: every `SWEEP_INTERVAL`, at start, right after the
//! listener reconnects and a second after a failed sweep, cancel every
//! pending order past its deadline, in set-based batches. On Postgres,
//! `SKIP LOCKED` lets instances split a backlog instead of queueing on the
//! same rows.

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::orders::Orders;

/// Orders cancelled per transaction.
pub const SWEEP_BATCH: usize = 1000;
/// After a failed sweep (database away), the next try comes this soon (or
/// after `SWEEP_INTERVAL`, if shorter), so that expiries missed during an
/// outage are applied about a second after the database is back.
pub const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

pub async fn run(orders: Arc<Orders>, every: Duration, sweep_now: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        let wait = match orders.sweep_once(chrono::Utc::now(), SWEEP_BATCH).await {
            Ok(0) => every,
            Ok(n) => {
                info!(cancelled = n, "sweep cancelled overdue orders");
                every
            }
            Err(e) => {
                let wait = every.min(RETRY_AFTER_ERROR);
                warn!(error = %e, retry_in = ?wait, "sweep failed; retrying soon");
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = sweep_now.notified() => {}
        }
    }
}

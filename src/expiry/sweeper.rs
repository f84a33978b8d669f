//! The safety net: every `SWEEP_INTERVAL`, at start and right after the
//! listener reconnects, cancel every pending order past its deadline, in
//! set-based batches. On Postgres, `SKIP LOCKED` lets instances split a
//! backlog instead of queueing on the same rows.

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::orders::Orders;

/// Orders cancelled per transaction.
pub const SWEEP_BATCH: usize = 1000;

pub async fn run(orders: Arc<Orders>, every: Duration, sweep_now: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        match orders.sweep_once(chrono::Utc::now(), SWEEP_BATCH).await {
            Ok(0) => {}
            Ok(n) => info!(cancelled = n, "sweep cancelled overdue orders"),
            Err(e) => warn!(error = %e, "sweep failed; retrying next interval"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = sweep_now.notified() => {}
        }
    }
}

//! The outbox as the events see it: which rows a relay may take over, how
//! long published rows stay readable, and what a fan-out that lost its
//! subscription reads again. The rows themselves are written by the store,
//! in the transaction that changes the order (a row's id is the event id).

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};

use crate::{
    domain::OrderEvent,
    store::{Store, StoreError},
};

/// An outbox row this old was not published by its instance: claim it.
const GRACE: Duration = Duration::from_secs(2);
/// How long a claimed row is left to the relay that claimed it.
const LEASE: Duration = Duration::from_secs(10);
/// The most rows one claim takes.
const CLAIM_LIMIT: usize = 1000;
/// How long published events stay readable for a reconnecting fan-out.
pub const RETENTION: Duration = Duration::from_secs(120);
/// A replay covers this much before the loss was noticed: a dead
/// connection is noticed within a ping interval and its timeout, and
/// instances' clocks may differ a little.
const REPLAY_MARGIN: Duration = Duration::from_secs(15);
/// The most events one replay delivers.
const REPLAY_LIMIT: usize = 100_000;

/// The store's outbox, with the timing rules above; cheap to clone.
#[derive(Clone)]
pub struct Outbox(Arc<dyn Store>);

impl Outbox {
    pub fn new(store: Arc<dyn Store>) -> Outbox {
        Outbox(store)
    }

    /// Unpublished events older than the grace period (their instance did
    /// not publish them), leased to the caller so other relays leave them.
    pub async fn claim_abandoned(&self, now: DateTime<Utc>) -> Result<Vec<OrderEvent>, StoreError> {
        self.0.outbox_claim(now - chrono_duration(GRACE), now + chrono_duration(LEASE), CLAIM_LIMIT).await
    }

    pub async fn mark_published(&self, events: &[OrderEvent], now: DateTime<Utc>) -> Result<(), StoreError> {
        let ids: Vec<i64> = events.iter().map(|e| e.event_id).collect();
        self.0.outbox_published(&ids, now).await
    }

    /// Every event a subscription lost at `lost_at` may have missed.
    pub async fn missed_since(&self, lost_at: DateTime<Utc>) -> Result<Vec<OrderEvent>, StoreError> {
        self.0.outbox_since(lost_at - chrono_duration(REPLAY_MARGIN), REPLAY_LIMIT).await
    }

    /// Forgets what every fan-out has had [`RETENTION`] to read.
    pub async fn prune(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.0.outbox_prune(now - chrono_duration(RETENTION)).await
    }

    /// Events not yet published.
    pub async fn backlog(&self) -> Result<i64, StoreError> {
        self.0.outbox_len().await
    }
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).expect("the outbox's durations are small")
}

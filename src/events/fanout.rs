//! The fan-out: this process's one Redis subscription to `<prefix>events`
//! (on a Cluster a sharded one, `SSUBSCRIBE` on the primary that owns the
//! channel's slot, followed across failovers and slot moves), delivering what other instances published to the [`EventBus`] (which
//! drops event ids already delivered, this instance's own among them).
//!
//! Redis drops messages for a subscription that is down, so a fan-out that
//! reconnects reads what it may have missed from the outbox (the database
//! is the truth) and tells subscriptions to re-read snapshots.

use std::sync::{atomic::Ordering, Arc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{outbox::Outbox, EventBus};
use crate::{
    domain::OrderEvent,
    redis::{cluster, subscription, Topology},
};

/// Runs the subscription until shutdown, reconnecting as often as it takes.
pub async fn run(bus: EventBus, outbox: Outbox, topology: Topology, channel: String, shutdown: CancellationToken) {
    let mut handler = FanoutHandler { bus, outbox, lost_at: None };
    match topology {
        Topology::Single(target) => subscription::run(target, channel, "event fan-out", &mut handler, shutdown).await,
        Topology::Cluster(target) => {
            cluster::run_sharded(&target, channel, "event fan-out", &mut handler, shutdown).await
        }
    }
}

struct FanoutHandler {
    bus: EventBus,
    outbox: Outbox,
    /// When the last connection was noticed lost.
    lost_at: Option<DateTime<Utc>>,
}

#[async_trait]
impl subscription::Handler for FanoutHandler {
    async fn connected(&mut self, reconnected: bool) {
        self.bus.inner.fanout_up.store(true, Ordering::Relaxed);
        if reconnected {
            let lost_at = self.lost_at.take().unwrap_or_else(Utc::now);
            tokio::spawn(replay(self.bus.clone(), self.outbox.clone(), lost_at));
        }
    }

    async fn message(&mut self, _channel: &str, payload: &[u8]) {
        // this instance's own events (already delivered when they were
        // committed) come back too: drop them before parsing the order
        if leading_event_id(payload).is_some_and(|id| self.bus.seen(id)) {
            return;
        }
        match serde_json::from_slice::<OrderEvent>(payload) {
            Ok(event) => self.bus.deliver(Arc::new(event)),
            Err(e) => warn!(error = %e, "ignoring a malformed order event"),
        }
    }

    fn disconnected(&mut self) {
        self.bus.inner.fanout_up.store(false, Ordering::Relaxed);
        self.lost_at.get_or_insert_with(Utc::now);
    }
}

/// Events published while the subscription was down reached nobody here:
/// delivers them from the outbox, then has every subscription re-read its
/// snapshot in any case.
async fn replay(bus: EventBus, outbox: Outbox, lost_at: DateTime<Utc>) {
    match outbox.missed_since(lost_at).await {
        Ok(events) => {
            info!(count = events.len(), "event fan-out replayed events from the outbox after a reconnect");
            for e in events {
                bus.deliver(Arc::new(e));
            }
        }
        Err(e) => warn!(error = %e, "event fan-out could not read missed events from the outbox"),
    }
    bus.resync();
}

/// The `event_id` of a published event, read from the start of its JSON
/// (serde writes `OrderEvent`'s fields in order); `None` if it is not there,
/// and the full parse decides.
fn leading_event_id(payload: &[u8]) -> Option<i64> {
    let rest = payload.strip_prefix(b"{\"event_id\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_id_is_read_from_the_published_json_without_parsing_it() {
        let json = serde_json::to_vec(&super::super::tests::event(42, 7)).unwrap();
        assert_eq!(leading_event_id(&json), Some(42));
        assert_eq!(leading_event_id(b"{\"order\":{},\"event_id\":1}"), None);
        assert_eq!(leading_event_id(b"{\"event_id\":"), None);
        assert_eq!(leading_event_id(b"garbage"), None);
    }
}

//! The relay: `PUBLISH`es this instance's events to `<prefix>events` (on a
//! Cluster `SPUBLISH`, sharded pub/sub: the message goes to the channel's
//! shard only, not to every node) and marks them published in the outbox
//! once Redis has them. Rows it could not
//! publish (Redis away, or an instance died) are claimed again by some relay
//! after a grace period, until Redis takes them; published rows are pruned
//! after [`super::outbox::RETENTION`].

use std::time::Duration;

use crate::redis::RedisConn;
use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::outbox::Outbox;
use crate::{domain::OrderEvent, telemetry};

/// How often the outbox is read for events no relay published.
const POLL: Duration = Duration::from_millis(500);
/// Polls between two prunes of published rows.
const PRUNE_EVERY: u64 = 20;
/// The most batches taken from the inbox at once.
const BATCHES: usize = 64;

/// The receiving end of the bus's relay channel, consumed by [`run`].
pub struct RelayInbox(pub(super) mpsc::UnboundedReceiver<Vec<OrderEvent>>);

/// Runs until shutdown, then publishes what it still holds.
pub async fn run(mut inbox: RelayInbox, outbox: Outbox, conn: RedisConn, channel: String, shutdown: CancellationToken) {
    let relay = Relay { outbox, conn, channel };
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf: Vec<Vec<OrderEvent>> = Vec::new();
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                while let Ok(events) = inbox.0.try_recv() {
                    relay.publish(events).await;
                }
                return;
            }
            n = inbox.0.recv_many(&mut buf, BATCHES) => {
                if n == 0 { return; }
                relay.publish(buf.drain(..).flatten().collect()).await;
            }
            _ = poll.tick() => {
                ticks += 1;
                relay.poll(ticks.is_multiple_of(PRUNE_EVERY)).await;
            }
        }
    }
}

struct Relay {
    outbox: Outbox,
    conn: RedisConn,
    channel: String,
}

impl Relay {
    /// Publishes what no relay did, reports the backlog, and now and then
    /// forgets what every fan-out has had time to read.
    async fn poll(&self, prune: bool) {
        let now = Utc::now();
        match self.outbox.claim_abandoned(now).await {
            Ok(events) if !events.is_empty() => {
                debug!(count = events.len(), "relaying events left in the outbox");
                self.publish(events).await;
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "outbox poll failed"),
        }
        if let Ok(n) = self.outbox.backlog().await {
            telemetry::outbox_backlog(n);
        }
        if prune {
            if let Err(e) = self.outbox.prune(now).await {
                debug!(error = %e, "outbox prune failed");
            }
        }
    }

    /// Publishes events and marks them published; on failure they stay in
    /// the outbox and a later poll publishes them.
    async fn publish(&self, events: Vec<OrderEvent>) {
        if events.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        let sharded = self.conn.is_cluster();
        for e in &events {
            let json = serde_json::to_string(e).expect("events serialise");
            if sharded {
                pipe.spublish(&self.channel, json).ignore();
            } else {
                pipe.publish(&self.channel, json).ignore();
            }
        }
        match pipe.query_async::<()>(&mut self.conn.clone()).await {
            Ok(()) => {
                if let Err(e) = self.outbox.mark_published(&events, Utc::now()).await {
                    // published but not marked: it will be published again,
                    // and receivers drop the duplicate
                    warn!(error = %e, "could not mark relayed outbox rows published");
                }
            }
            Err(e) => {
                telemetry::relay_failed();
                warn!(error = %e, count = events.len(), "could not publish events; they stay in the outbox and are retried");
            }
        }
    }
}

//! The notification self-check: whether `expired` keyspace events really
//! reach the listener's subscription, found out without `CONFIG`.
//!
//! After every (re)subscribe, and every [`RECHECK`] while they are missing,
//! it writes `<prefix>{s<N>}canary:<uuid>.<N>` in every deadline shard with a
//! short [`TTL`], touches them once due (so Redis deletes them on the spot,
//! as the nudger does for orders) and waits for their events on the
//! listener's subscriptions. Events arrive only when every shard's did: on a
//! Cluster that judges every primary that holds orders. The answer goes to
//! [`ListenerState`] (`/readyz`, the nudger's fallback), a gauge, and one WARN
//! line with the fix when events go missing.

use std::{sync::Arc, time::Duration};

use redis::AsyncCommands;

use crate::redis::RedisConn;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    listener::ListenerState,
    schedule::{Keys, Shard},
};
use crate::telemetry;

/// The canary's time to live.
const TTL: Duration = Duration::from_millis(50);
/// How long after its deadline the canary is touched: past Redis's
/// millisecond rounding, so the touch deletes it.
const TOUCH_AFTER: Duration = Duration::from_millis(70);
/// How long its event may take to arrive before events count as missing.
const WAIT: Duration = Duration::from_secs(2);
/// While events are missing (or the check failed), how often to look again,
/// so that turning notifications on later is noticed.
pub const RECHECK: Duration = Duration::from_secs(30);

/// Whether expired-key events arrive, as last checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Not checked yet on this connection.
    Checking,
    Arriving,
    Missing,
}

impl Arrival {
    pub fn as_str(self) -> &'static str {
        match self {
            Arrival::Checking => "checking",
            Arrival::Arriving => "arriving",
            Arrival::Missing => "missing",
        }
    }
}

/// The listener's side: hands canary events over and asks for checks.
#[derive(Clone)]
pub struct CanaryInbox {
    seen: mpsc::Sender<String>,
    check_now: Arc<Notify>,
}

impl CanaryInbox {
    /// A canary's event arrived (its token); dropped if nobody waits.
    pub fn seen(&self, token: &str) {
        let _ = self.seen.try_send(token.to_string());
    }
    /// The subscription is new: check again.
    pub fn check(&self) {
        self.check_now.notify_one();
    }
}

pub struct Canary {
    conn: RedisConn,
    keys: Keys,
    state: Arc<ListenerState>,
    seen: mpsc::Receiver<String>,
    check_now: Arc<Notify>,
    /// The last answer, across reconnects, so a change is logged once.
    last: Arrival,
}

impl Canary {
    pub fn new(conn: RedisConn, keys: Keys, state: Arc<ListenerState>) -> (Canary, CanaryInbox) {
        let (tx, seen) = mpsc::channel(64);
        let check_now = Arc::new(Notify::new());
        let inbox = CanaryInbox { seen: tx, check_now: check_now.clone() };
        (Canary { conn, keys, state, seen, check_now, last: Arrival::Checking }, inbox)
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let recheck = self.last != Arrival::Arriving;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.check_now.notified() => {}
                _ = tokio::time::sleep(RECHECK), if recheck => {}
            }
            if !self.state.is_up() {
                continue; // the next subscribe asks again
            }
            match self.probe().await {
                Ok(arriving) => self.record(arriving),
                // Redis is away: the listener reconnects and asks again
                Err(e) => warn!(error = %e, "could not check whether Redis sends expired-key events"),
            }
        }
    }

    /// One canary per shard: true when every one's `expired` event
    /// arrived within [`WAIT`].
    async fn probe(&mut self) -> redis::RedisResult<bool> {
        while self.seen.try_recv().is_ok() {} // a late event of an earlier canary
        let probe = uuid::Uuid::new_v4().simple().to_string();
        let tokens: Vec<(Shard, String)> = Shard::all()
            .map(|shard| {
                let Shard::Tagged(n) = shard else { unreachable!("tagged shards only") };
                (shard, format!("{probe}.{n}"))
            })
            .collect();
        let keys: Vec<String> = tokens.iter().map(|(shard, token)| self.keys.canary(*shard, token)).collect();
        let conn = self.conn.clone();
        // each key alone: on a Cluster they live on different primaries
        futures_util::future::try_join_all(keys.iter().map(|key| {
            let mut conn = conn.clone();
            async move { conn.pset_ex::<_, _, ()>(key, 1, TTL.as_millis() as u64).await }
        }))
        .await?;
        tokio::time::sleep(TOUCH_AFTER).await;
        futures_util::future::try_join_all(keys.iter().map(|key| {
            let mut conn = conn.clone();
            async move { conn.exists::<_, bool>(key).await }
        }))
        .await?;
        let mut waiting: std::collections::HashSet<String> = tokens.into_iter().map(|(_, t)| t).collect();
        let arrived = tokio::time::timeout(WAIT, async {
            while let Some(seen) = self.seen.recv().await {
                waiting.remove(&seen);
                if waiting.is_empty() {
                    return true;
                }
            }
            false
        })
        .await;
        Ok(arrived.unwrap_or(false))
    }

    /// Stores the answer; logs only when it changes.
    fn record(&mut self, arriving: bool) {
        let now = if arriving { Arrival::Arriving } else { Arrival::Missing };
        self.state.set_arrival(now);
        let before = std::mem::replace(&mut self.last, now);
        telemetry::expiry_events_arriving(arriving);
        match (before, now) {
            (Arrival::Missing, Arrival::Arriving) => {
                info!("Redis sends expired-key events again: the keyspace listener cancels expired orders")
            }
            (_, Arrival::Arriving) if before != now => info!("Redis sends expired-key events"),
            (_, Arrival::Missing) if before != now => warn!(
                "Redis does not send expired-key events (notifications are off and CONFIG SET is refused or did not take): set `notify-keyspace-events Ex` on the Redis server (on managed Redis: in its parameter group or configuration); meanwhile the deadline nudger cancels due orders itself, checking again every {}s",
                RECHECK.as_secs()
            ),
            _ => {}
        }
    }
}

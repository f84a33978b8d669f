//! Makes Redis expire each order's key at its deadline.
//!
//! The index is split into [`SHARDS`] hash-tagged sorted sets; each round
//! claims every shard at once, each through its own script call, which on a
//! Cluster runs on the primary that owns the shard's slot (replicas never
//! expire keys). The unsharded set of servers before sharding is drained
//! the same way until it is empty.
//!
//! Redis deletes an expired key (and only then sends `expired`) when it is
//! touched or when its active expiry samples it; once many keys hold TTLs
//! that sampling is minutes late (BENCHMARKS.md, direct inserts). So every instance polls the deadline
//! index, claims the due members atomically (one script: `TIME`,
//! `ZRANGEBYSCORE`, `ZREM`, so each member is claimed by one instance) and
//! touches their keys with `EXISTS`: Redis deletes them on the spot and the
//! keyspace event, still the trigger, arrives on time.
//!
//! Where those events do not arrive (notifications off, `CONFIG` refused),
//! the ids it claimed go straight to the listener's cancel workers instead,
//! so the 1 s target holds without them.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use redis::{AsyncCommands, Script};

use crate::redis::RedisConn;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{
    listener::ListenerState,
    schedule::{Keys, Shard, SHARDS},
};
use crate::domain::OrderId;

/// The most members claimed per script call; Lua's `unpack` limit is ~8000.
pub const CLAIM_BATCH: usize = 2000;

/// Claims members whose deadline is strictly before Redis's current
/// millisecond (or `ARGV[2]`, a given one): Redis expires a key only once
/// `now > deadline`, so a member claimed in its deadline's own millisecond
/// would be touched while its key still lives (and then wait for Redis's
/// sampling or the sweep).
const CLAIM_DUE: &str = r#"
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local ids = {}
for i = 1, #due, 2 do ids[#ids + 1] = due[i] end
if #ids > 0 then redis.call('ZREM', KEYS[1], unpack(ids)) end
return due
"#;

pub struct Nudger {
    pub conn: RedisConn,
    pub keys: Keys,
    pub script: Script,
    pub fallback: Fallback,
    /// Whether the unsharded index may still hold members.
    legacy: AtomicBool,
    /// Whether some shards failed last round (said once per episode).
    degraded: AtomicBool,
}

/// Where claimed ids go while expired-key events do not arrive.
pub struct Fallback {
    pub listener: Arc<ListenerState>,
    /// The listener's cancel workers ([`super::listener::CancelQueue`]).
    pub cancel: mpsc::Sender<OrderId>,
}

/// One claim: how many members left the index, and the orders whose keys
/// are gone now (expired by the touch or before it).
#[derive(Debug, Default)]
pub struct Claimed {
    pub due: usize,
    pub expired: Vec<OrderId>,
    /// Whether some shard's claim came back full: more are due there.
    pub full: bool,
}

impl Nudger {
    pub fn new(conn: RedisConn, keys: Keys, fallback: Fallback) -> Self {
        Nudger {
            conn,
            keys,
            script: Script::new(CLAIM_DUE),
            fallback,
            legacy: AtomicBool::new(true),
            degraded: AtomicBool::new(false),
        }
    }

    /// Claims due deadlines in every shard and touches their keys. "Due" is
    /// by Redis's clock (`now: None`, as [`Nudger::run`] asks), the one that
    /// decides when a key expires; a test gives its own `now` to claim
    /// without waiting for a deadline. A shard that fails (its primary is
    /// away) does not hold up the others; the error is returned only when
    /// nothing could be claimed, and the sweep covers that shard meanwhile.
    pub async fn nudge_once(&self, now: Option<DateTime<Utc>>) -> redis::RedisResult<Claimed> {
        let legacy = self.legacy.load(Ordering::Relaxed);
        let shards = Shard::all().chain(legacy.then_some(Shard::Legacy));
        let results = futures_util::future::join_all(shards.map(|shard| self.nudge_shard(shard, now))).await;
        let mut total = Claimed::default();
        let mut error = None;
        let mut failed = 0;
        for (shard, result) in Shard::all().chain(legacy.then_some(Shard::Legacy)).zip(results) {
            match result {
                Ok(c) => {
                    if shard == Shard::Legacy && c.due == 0 {
                        self.drained_legacy().await;
                    }
                    total.due += c.due;
                    total.full |= c.full;
                    total.expired.extend(c.expired);
                }
                Err(e) => {
                    failed += 1;
                    error.get_or_insert(e);
                }
            }
        }
        match error {
            Some(e) if failed >= usize::from(SHARDS) => Err(e),
            Some(e) => {
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, failed, "deadline nudger cannot reach the primary of some shards; the sweep covers them meanwhile");
                }
                Ok(total)
            }
            None => {
                self.degraded.store(false, Ordering::Relaxed);
                Ok(total)
            }
        }
    }

    /// Stops looking at the unsharded index once it is gone.
    async fn drained_legacy(&self) {
        let mut conn = self.conn.clone();
        if let Ok(false) = conn.exists::<_, bool>(self.keys.deadlines(Shard::Legacy)).await {
            self.legacy.store(false, Ordering::Relaxed);
        }
    }

    async fn nudge_shard(&self, shard: Shard, now: Option<DateTime<Utc>>) -> redis::RedisResult<Claimed> {
        let mut conn = self.conn.clone();
        let deadlines = self.keys.deadlines(shard);
        let mut claim = self.script.key(&deadlines);
        claim.arg(CLAIM_BATCH);
        if let Some(now) = now {
            claim.arg(now.timestamp_millis());
        }
        let due: Vec<(i64, i64)> = claim.invoke_async(&mut conn).await?;
        if due.is_empty() {
            return Ok(Claimed::default());
        }
        // one shard's keys share its slot, so one pipeline (the unsharded
        // layout exists only on a single server)
        let mut pipe = redis::pipe();
        for (id, _) in &due {
            pipe.exists(self.keys.order_in(shard, OrderId(*id)));
        }
        let alive: Vec<bool> = pipe.query_async(&mut conn).await?;
        // A key that outlived its touch (a clock step, a later PEXPIREAT)
        // goes back into the index, so no member leaves while its key lives.
        let back: Vec<(i64, i64)> =
            due.iter().zip(&alive).filter(|(_, alive)| **alive).map(|((id, deadline), _)| (*deadline, *id)).collect();
        if !back.is_empty() {
            conn.zadd_multiple::<_, _, _, ()>(&deadlines, &back).await?;
        }
        let expired = due.iter().zip(&alive).filter(|(_, alive)| !**alive).map(|((id, _), _)| OrderId(*id)).collect();
        Ok(Claimed { due: due.len(), expired, full: due.len() == CLAIM_BATCH })
    }

    /// Unless expired-key events are known to arrive, cancels the claimed
    /// orders through the listener's workers (the one cancel path).
    async fn cancel_unless_events_arrive(&self, expired: Vec<OrderId>) {
        if expired.is_empty() || self.fallback.listener.events_arrive() {
            return;
        }
        for id in expired {
            let _ = self.fallback.cancel.send(id).await;
        }
    }

    pub async fn run(self, every: Duration, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            let claimed = self.nudge_once(None).await;
            let full = matches!(&claimed, Ok(c) if c.full);
            match claimed {
                Ok(c) => {
                    failing = false;
                    self.cancel_unless_events_arrive(c.expired).await;
                    // a full batch: more are due, go on at once
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "deadline nudger cannot reach Redis; the sweep covers meanwhile");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(if failing { every * 10 } else { every }) => {}
            }
        }
    }
}

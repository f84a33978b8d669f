//! Makes Redis expire each order's key at its deadline.
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

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use redis::{AsyncCommands, Script};

use crate::redis::RedisConn;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{listener::ListenerState, schedule::Keys};
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
}

impl Nudger {
    pub fn new(conn: RedisConn, keys: Keys, fallback: Fallback) -> Self {
        Nudger { conn, keys, script: Script::new(CLAIM_DUE), fallback }
    }

    /// Claims due deadlines and touches their keys. "Due" is by Redis's
    /// clock (`now: None`, as [`Nudger::run`] asks), the one that decides
    /// when a key expires; a test gives its own `now` to claim without
    /// waiting for a deadline.
    pub async fn nudge_once(&self, now: Option<DateTime<Utc>>) -> redis::RedisResult<Claimed> {
        let mut conn = self.conn.clone();
        let mut claim = self.script.key(self.keys.deadlines());
        claim.arg(CLAIM_BATCH);
        if let Some(now) = now {
            claim.arg(now.timestamp_millis());
        }
        let due: Vec<(i64, i64)> = claim.invoke_async(&mut conn).await?;
        if due.is_empty() {
            return Ok(Claimed::default());
        }
        let mut pipe = redis::pipe();
        for (id, _) in &due {
            pipe.exists(self.keys.order(OrderId(*id)));
        }
        let alive: Vec<bool> = pipe.query_async(&mut conn).await?;
        // A key that outlived its touch (a clock step, a later PEXPIREAT)
        // goes back into the index, so no member leaves while its key lives.
        let back: Vec<(i64, i64)> =
            due.iter().zip(&alive).filter(|(_, alive)| **alive).map(|((id, deadline), _)| (*deadline, *id)).collect();
        if !back.is_empty() {
            conn.zadd_multiple::<_, _, _, ()>(self.keys.deadlines(), &back).await?;
        }
        let expired = due.iter().zip(&alive).filter(|(_, alive)| !**alive).map(|((id, _), _)| OrderId(*id)).collect();
        Ok(Claimed { due: due.len(), expired })
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
            let full = matches!(&claimed, Ok(c) if c.due == CLAIM_BATCH);
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

//! What an order's expiry is in Redis: the names of the keys ([`Keys`]) and
//! the [`Scheduler`] that writes and removes an order's expiry hash and its
//! entry in the deadline index (new orders' writes go through one writer
//! task, so orders placed together share a round trip). Placing and ending
//! orders use this; the nudger, listener and canary read the same names.

use redis::{AsyncCommands, RedisResult};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::redis::RedisConn;

use crate::{
    domain::{Order, OrderId},
    telemetry,
};

/// How many deadline shards every deployment has, on every topology (one
/// layout for single, Sentinel and Cluster, so nothing migrates when the
/// topology changes). An order's shard is its id mod this.
pub const SHARDS: u16 = 16;

/// One deadline index: a hash-tagged shard, or the unsharded set that
/// servers before sharding wrote (drained once by the nudger).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shard {
    Tagged(u16),
    Legacy,
}

impl Shard {
    pub fn of(id: OrderId) -> Shard {
        Shard::Tagged(id.0.rem_euclid(i64::from(SHARDS)) as u16)
    }
    /// Every tagged shard.
    pub fn all() -> impl Iterator<Item = Shard> {
        (0..SHARDS).map(Shard::Tagged)
    }
}

/// The Redis names of one deployment, all under its prefix. Everything of
/// one shard carries the hash tag `{s<N>}`, so on a Cluster an order's key,
/// its shard's deadline index and the claim script over both share a slot.
#[derive(Clone, Debug)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    fn tag(&self, shard: Shard) -> String {
        match shard {
            Shard::Tagged(n) => format!("{}{{s{n}}}", self.prefix),
            Shard::Legacy => self.prefix.clone(),
        }
    }
    pub fn order(&self, id: OrderId) -> String {
        self.order_in(Shard::of(id), id)
    }
    /// An order's key as written in `shard` (its own, or the legacy layout).
    pub fn order_in(&self, shard: Shard, id: OrderId) -> String {
        format!("{}order:{}", self.tag(shard), id.0)
    }
    /// The deadline index of `shard`.
    pub fn deadlines(&self, shard: Shard) -> String {
        format!("{}deadlines", self.tag(shard))
    }
    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }
    /// Present while the server holds this deployment's expiry keys
    /// ([`super::resync`]); on a Cluster in one slot, like any single key.
    pub fn marker(&self) -> String {
        format!("{}expiry-keys", self.prefix)
    }
    /// The notification self-check's key for one probe in one shard (a
    /// probe covers every shard, so every Cluster primary that holds
    /// orders is checked).
    pub fn canary(&self, shard: Shard, token: &str) -> String {
        format!("{}canary:{}", self.tag(shard), token)
    }
    /// After the prefix, the shard tag if there is one.
    fn untagged<'a>(&self, key: &'a str) -> Option<&'a str> {
        let rest = key.strip_prefix(&self.prefix)?;
        match rest.strip_prefix("{s") {
            Some(tagged) => {
                let (n, rest) = tagged.split_once('}')?;
                n.parse::<u16>().ok().filter(|n| *n < SHARDS)?;
                Some(rest)
            }
            None => Some(rest),
        }
    }
    /// The probe token of an expired canary key, if the key is one of ours.
    pub fn parse_canary_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        self.untagged(key)?.strip_prefix("canary:")
    }
    /// The order named by an expired key, if the key is one of ours (either
    /// layout: keys written before sharding still expire).
    pub fn parse_order_key(&self, key: &str) -> Option<OrderId> {
        let n = self.untagged(key)?.strip_prefix("order:")?;
        n.parse::<i64>().ok().filter(|n| *n > 0).map(OrderId)
    }
}

/// Most expiry writes in one round trip. Orders placed together (one
/// placement transaction wakes them at once) queue while the previous
/// batch is out and go in the next.
const MAX_BATCH: usize = 256;
/// Writes waiting for the writer; past this a placement waits its turn.
const QUEUE: usize = 4096;

/// Writes and removes expiry hashes; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    pub conn: RedisConn,
    pub keys: Keys,
    /// The writer task's queue ([`Scheduler::new`]).
    writes: mpsc::Sender<Write>,
}

/// One order's expiry hash and deadline entry, and who waits for them.
struct Write {
    id: OrderId,
    deadline_ms: i64,
    fields: [(&'static str, String); 4],
    written: oneshot::Sender<bool>,
}

impl Scheduler {
    /// A scheduler and its writer task (on the current runtime), which ends
    /// when the last clone is dropped.
    pub fn new(conn: RedisConn, keys: Keys) -> Scheduler {
        let (writes, queue) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(conn.clone(), keys.clone(), queue));
        Scheduler { conn, keys, writes }
    }

    /// Writes the expiry hash and deadline entry of a new order (with those
    /// of the orders placed at the same time, in one MULTI per round trip;
    /// per shard on a Cluster, whose slots a MULTI cannot span) and returns
    /// once they are written. A failure is logged and counted, not
    /// returned: the order exists and the sweep cancels it on time without
    /// Redis.
    pub async fn schedule(&self, order: &Order) {
        let (written, done) = oneshot::channel();
        let write = Write {
            id: order.id,
            deadline_ms: order.expires_at.timestamp_millis(),
            fields: [
                ("customer", order.customer_id.to_string()),
                ("total_cents", order.total_cents.to_string()),
                ("currency", order.currency.clone()),
                ("expires_at", order.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            ],
            written,
        };
        let ok = self.writes.send(write).await.is_ok() && done.await.unwrap_or(false);
        if !ok {
            telemetry::expiry_write_failed();
            warn!(order_id = %order.id, "could not write the expiry hash; the sweep will cancel this order");
        }
    }

    /// Removes the expiry state of orders that reached a final status: one
    /// MULTI per shard (a shard's keys share a slot), the shards at once.
    pub async fn forget(&self, ids: &[OrderId]) -> RedisResult<()> {
        let writes = by_shard(ids.iter().copied()).into_iter().map(|(shard, positions)| {
            let keys: Vec<String> = positions.iter().map(|&i| self.keys.order(ids[i])).collect();
            let members: Vec<i64> = positions.iter().map(|&i| ids[i].0).collect();
            let mut conn = self.conn.clone();
            let deadlines = self.keys.deadlines(shard);
            async move {
                redis::pipe()
                    .atomic()
                    .del(&keys)
                    .ignore()
                    .zrem(deadlines, &members)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            }
        });
        futures_util::future::join_all(writes).await.into_iter().collect()
    }

    /// How many orders wait in the deadline index (every shard).
    pub async fn pending(&self) -> RedisResult<u64> {
        let counts = Shard::all().map(|shard| {
            let mut conn = self.conn.clone();
            let key = self.keys.deadlines(shard);
            async move { conn.zcard::<_, u64>(key).await }
        });
        let counts: Vec<u64> = futures_util::future::try_join_all(counts).await?;
        Ok(counts.into_iter().sum())
    }
}

/// The positions of `ids` by shard: what one MULTI may hold on a Cluster
/// (a shard's keys share a slot).
fn by_shard(ids: impl Iterator<Item = OrderId>) -> std::collections::HashMap<Shard, Vec<usize>> {
    let mut shards: std::collections::HashMap<Shard, Vec<usize>> = Default::default();
    for (i, id) in ids.enumerate() {
        shards.entry(Shard::of(id)).or_default().push(i);
    }
    shards
}

/// The writer task: takes every write waiting, writes them, tells each
/// waiting placement, and again.
async fn write_batches(conn: RedisConn, keys: Keys, mut queue: mpsc::Receiver<Write>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let results = write_batch(&conn, &keys, &batch).await;
        for (write, ok) in batch.drain(..).zip(results) {
            // a placement that gave up waiting no longer listens
            let _ = write.written.send(ok);
        }
    }
}

/// Writes a batch: one MULTI for all of it, or on a Cluster one per shard
/// (a shard's keys share a slot), the shards at once. Whether each write
/// landed, in batch order.
async fn write_batch(conn: &RedisConn, keys: &Keys, batch: &[Write]) -> Vec<bool> {
    let groups: Vec<Vec<usize>> = if conn.is_cluster() {
        by_shard(batch.iter().map(|w| w.id)).into_values().collect()
    } else {
        vec![(0..batch.len()).collect()]
    };
    let writes = groups.into_iter().map(|group| {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for &i in &group {
            let w = &batch[i];
            let key = keys.order(w.id);
            pipe.hset_multiple(&key, &w.fields).ignore();
            pipe.pexpire_at(&key, w.deadline_ms).ignore();
            pipe.zadd(keys.deadlines(Shard::of(w.id)), w.id.0, w.deadline_ms).ignore();
        }
        let mut conn = conn.clone();
        async move {
            let res: RedisResult<()> = pipe.query_async(&mut conn).await;
            if let Err(e) = &res {
                warn!(error = %e, orders = group.len(), "expiry hashes not written");
            }
            (group, res.is_ok())
        }
    });
    let mut landed = vec![false; batch.len()];
    for (group, ok) in futures_util::future::join_all(writes).await {
        for i in group {
            landed[i] = ok;
        }
    }
    landed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_under_the_prefix_name_orders() {
        let k = Keys { prefix: "t1:".into() };
        assert_eq!(k.order(OrderId(42)), "t1:{s10}order:42");
        assert_eq!(k.parse_order_key("t1:{s10}order:42"), Some(OrderId(42)));
        assert_eq!(k.parse_order_key("t1:order:42"), Some(OrderId(42)), "the layout before sharding");
        assert_eq!(k.parse_order_key("t2:{s10}order:42"), None);
        assert_eq!(k.parse_order_key("t1:{s99}order:42"), None);
        assert_eq!(k.parse_order_key("t1:{s1order:42"), None);
        assert_eq!(k.parse_order_key("t1:order:x"), None);
        assert_eq!(k.parse_order_key(&k.deadlines(Shard::Tagged(3))), None);
        assert_eq!(k.parse_order_key(&k.canary(Shard::Tagged(3), "abc")), None);
        assert_eq!(k.parse_canary_key(&k.canary(Shard::Tagged(3), "abc")), Some("abc"));
        assert_eq!(k.parse_canary_key("t2:canary:abc"), None);
    }

    #[test]
    fn a_shard_and_its_orders_share_a_hash_tag() {
        let k = Keys { prefix: "p:".into() };
        for id in [1, 15, 16, 17, 1_000_003] {
            let shard = Shard::of(OrderId(id));
            let tag = |key: &str| key[key.find('{').unwrap()..=key.find('}').unwrap()].to_string();
            assert_eq!(tag(&k.order(OrderId(id))), tag(&k.deadlines(shard)));
        }
        assert_eq!(Shard::all().count(), usize::from(SHARDS));
        assert_eq!(k.deadlines(Shard::Legacy), "p:deadlines");
    }
}

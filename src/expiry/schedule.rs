//! What an order's expiry is in Redis: the names of the keys ([`Keys`]) and
//! the [`Scheduler`] that writes and removes an order's expiry hash and its
//! entry in the deadline index. Placing and ending orders use this; the
//! nudger, listener and canary read the same names.

use redis::{AsyncCommands, RedisResult};

use crate::redis::RedisConn;
use tracing::warn;

use crate::{
    domain::{Order, OrderId},
    telemetry,
};

/// The Redis names of one deployment, all under its prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn order(&self, id: OrderId) -> String {
        format!("{}order:{}", self.prefix, id.0)
    }
    pub fn deadlines(&self) -> String {
        format!("{}deadlines", self.prefix)
    }
    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }
    /// Present while the server holds this deployment's expiry keys
    /// ([`super::resync`]).
    pub fn marker(&self) -> String {
        format!("{}expiry-keys", self.prefix)
    }
    /// The notification self-check's key for one probe.
    pub fn canary(&self, token: &str) -> String {
        format!("{}canary:{}", self.prefix, token)
    }
    /// The probe token of an expired canary key, if the key is one of ours.
    pub fn parse_canary_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)?.strip_prefix("canary:")
    }
    /// The order named by an expired key, if the key is one of ours.
    pub fn parse_order_key(&self, key: &str) -> Option<OrderId> {
        let n = key.strip_prefix(&self.prefix)?.strip_prefix("order:")?;
        n.parse::<i64>().ok().filter(|n| *n > 0).map(OrderId)
    }
}

/// Writes and removes expiry hashes; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    pub conn: RedisConn,
    pub keys: Keys,
}

impl Scheduler {
    /// Writes the expiry hash and deadline entry of a new order in one
    /// MULTI. A failure is logged and counted, not returned: the order exists
    /// and the sweep cancels it on time without Redis.
    pub async fn schedule(&self, order: &Order) {
        let key = self.keys.order(order.id);
        let deadline = order.expires_at.timestamp_millis();
        let fields = [
            ("customer", order.customer_id.to_string()),
            ("total_cents", order.total_cents.to_string()),
            ("currency", order.currency.clone()),
            ("expires_at", order.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        ];
        let res: RedisResult<()> = redis::pipe()
            .atomic()
            .hset_multiple(&key, &fields)
            .ignore()
            .pexpire_at(&key, deadline)
            .ignore()
            .zadd(self.keys.deadlines(), order.id.0, deadline)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await;
        if let Err(e) = res {
            telemetry::expiry_write_failed();
            warn!(order_id = %order.id, error = %e, "could not write the expiry hash; the sweep will cancel this order");
        }
    }

    /// Removes the expiry state of orders that reached a final status.
    pub async fn forget(&self, ids: &[OrderId]) -> RedisResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.keys.order(*id)).collect();
        let members: Vec<i64> = ids.iter().map(|id| id.0).collect();
        redis::pipe()
            .atomic()
            .del(&keys)
            .ignore()
            .zrem(self.keys.deadlines(), &members)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
    }

    /// How many orders wait in the deadline index.
    pub async fn pending(&self) -> RedisResult<u64> {
        self.conn.clone().zcard(self.keys.deadlines()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_under_the_prefix_name_orders() {
        let k = Keys { prefix: "t1:".into() };
        assert_eq!(k.parse_order_key("t1:order:42"), Some(OrderId(42)));
        assert_eq!(k.parse_order_key("t2:order:42"), None);
        assert_eq!(k.parse_order_key("t1:order:x"), None);
        assert_eq!(k.parse_order_key("t1:deadlines"), None);
        assert_eq!(k.parse_order_key(&k.canary("abc")), None);
        assert_eq!(k.parse_canary_key(&k.canary("abc")), Some("abc"));
        assert_eq!(k.parse_canary_key("t2:canary:abc"), None);
    }
}

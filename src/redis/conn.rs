//! [`RedisConn`]: the one command connection type of the process, whatever
//! the topology. Everything that sends commands (the scheduler, the nudger,
//! the relay, rate limits, persisted queries, readiness) holds one of these,
//! so a topology is a new variant here, not a new code path in its users.

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster_async::ClusterConnection,
    Cmd, Pipeline, RedisFuture, Value,
};

/// A cheap-to-clone handle that routes each command to the right server.
#[derive(Clone)]
pub struct RedisConn {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    /// One server (plain or TLS): a managed, reconnecting connection.
    Single(ConnectionManager),
    /// The primary Redis Sentinel names: a managed connection to it, replaced
    /// by [`PrimarySwitch`] when another node is promoted. Every clone shares
    /// the slot, so users never hold a connection to a demoted primary.
    Sentinel(Arc<ArcSwap<ConnectionManager>>),
    /// A Redis Cluster: each command goes to the primary of its key's slot
    /// (so every multi-key command and script stays within one slot).
    Cluster(ClusterConnection),
}

/// How every managed command connection behaves. Commands fail fast while
/// Redis is away: an order is still placed (the sweep covers it) instead of
/// hanging on a dead connection.
pub fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(1000)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500))
}

/// Moves a [`RedisConn::sentinel`] connection to a new primary.
pub struct PrimarySwitch(Arc<ArcSwap<ConnectionManager>>);

impl PrimarySwitch {
    /// From now on every command of every clone goes to `conn`; commands in
    /// flight finish on the connection they started on.
    pub fn replace(&self, conn: ConnectionManager) {
        self.0.store(Arc::new(conn));
    }
}

impl RedisConn {
    pub fn single(conn: ConnectionManager) -> RedisConn {
        RedisConn { inner: Inner::Single(conn) }
    }

    /// A connection to the current primary of a Sentinel deployment, and the
    /// switch its follower moves it with.
    pub fn sentinel(conn: ConnectionManager) -> (RedisConn, PrimarySwitch) {
        let slot = Arc::new(ArcSwap::from_pointee(conn));
        (RedisConn { inner: Inner::Sentinel(slot.clone()) }, PrimarySwitch(slot))
    }

    pub fn cluster(conn: ClusterConnection) -> RedisConn {
        RedisConn { inner: Inner::Cluster(conn) }
    }

    /// Whether this is a Redis Cluster (where order events use sharded
    /// pub/sub, and keyspace events come from every primary).
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner, Inner::Cluster(_))
    }
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.inner {
            Inner::Single(c) => c.req_packed_command(cmd),
            Inner::Sentinel(slot) => {
                let mut c = ConnectionManager::clone(&slot.load());
                Box::pin(async move { c.req_packed_command(cmd).await })
            }
            Inner::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.inner {
            Inner::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Sentinel(slot) => {
                let mut c = ConnectionManager::clone(&slot.load());
                Box::pin(async move { c.req_packed_commands(pipeline, offset, count).await })
            }
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(c) => c.get_db(),
            Inner::Sentinel(slot) => slot.load().get_db(),
            Inner::Cluster(_) => 0,
        }
    }
}

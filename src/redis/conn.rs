//! [`RedisConn`]: the one command connection type of the process, whatever
//! the topology. Everything that sends commands (the scheduler, the nudger,
//! the relay, rate limits, persisted queries, readiness) holds one of these,
//! so a topology is a new variant here, not a new code path in its users.

use redis::{aio::ConnectionManager, cluster_async::ClusterConnection, Cmd, Pipeline, RedisFuture, Value};

/// A cheap-to-clone handle that routes each command to the right server.
#[derive(Clone)]
pub struct RedisConn {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    /// One server (plain or TLS): a managed, reconnecting connection.
    Single(ConnectionManager),
    /// A Redis Cluster: each command goes to the primary of its key's slot
    /// (so every multi-key command and script stays within one slot).
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn single(conn: ConnectionManager) -> RedisConn {
        RedisConn { inner: Inner::Single(conn) }
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
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Single(c) => c.get_db(),
            Inner::Cluster(_) => 0,
        }
    }
}

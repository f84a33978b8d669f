//! The Redis mechanism, apart from what the keys mean: how a connection is
//! made ([`client`]: plain or TLS, the one constructor of `redis::Client`),
//! the command connection of every topology ([`conn`]), the primary Redis
//! Sentinel names and following it across failovers ([`sentinel`]), Redis
//! Cluster's seeds, primaries and sharded subscriptions ([`cluster`]), a
//! subscription that survives its connection ([`subscription`]), and the
//! private `redis-server` started when none is reachable ([`server`]); the
//! forms of `REDIS_URL` are told apart in [`url`].
//!
//! What shopgraph keeps in Redis lives with its owners: expiry keys in
//! [`crate::expiry::schedule`], event publishing in [`crate::events`].

pub mod client;
pub mod cluster;
pub mod conn;
pub mod sentinel;
pub mod server;
pub mod subscription;
pub mod url;

pub use cluster::Topology;
pub use conn::RedisConn;

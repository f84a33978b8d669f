//! The forms `REDIS_URL` takes (contract: "Where Redis and PostgreSQL
//! live"), told apart in one place: one server, the primary Sentinel names,
//! or a Cluster by its seeds. Configuration validates with it; the
//! connections are made by [`super::sentinel`], [`super::cluster`] and
//! [`super::client`].

use super::{
    cluster::{self, ClusterTarget},
    sentinel::{self, SentinelUrl},
};
use crate::config::redact_url;

/// A `REDIS_URL`, parsed.
pub enum RedisUrl {
    /// `redis://` or `rediss://`: one server.
    Single(String),
    Sentinel(SentinelUrl),
    Cluster(ClusterTarget),
}

impl RedisUrl {
    /// Parses any form; the error says which form was meant and what it
    /// should look like, with the password hidden.
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        if sentinel::is_sentinel(url) {
            let s = SentinelUrl::parse(url)
                .map_err(|e| format!("invalid Redis Sentinel URL {:?}: {e}", redact_url(url)))?;
            return Ok(RedisUrl::Sentinel(s));
        }
        if cluster::is_cluster(url) {
            let c = ClusterTarget::parse(url).map_err(|e| {
                format!(
                    "invalid Redis Cluster URL {:?}: {e} (expected redis-cluster://host:port,host:port,…)",
                    redact_url(url)
                )
            })?;
            return Ok(RedisUrl::Cluster(c));
        }
        url.parse::<redis::ConnectionInfo>()
            .map_err(|_| format!("invalid Redis URL {:?} (expected redis://host:port/db)", redact_url(url)))?;
        Ok(RedisUrl::Single(url.to_string()))
    }

    /// A URL of one data node this form connects to, for checking TLS
    /// settings before any node is known (`None` for a Cluster, whose seeds
    /// are checked when it connects).
    pub fn sample_node(&self) -> Option<String> {
        match self {
            RedisUrl::Single(url) => Some(url.clone()),
            RedisUrl::Sentinel(s) => Some(s.node_url("localhost", 6379)),
            RedisUrl::Cluster(_) => None,
        }
    }
}

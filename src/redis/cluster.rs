//! Redis Cluster mechanics: the seed-node URL form
//! (`redis-cluster://[user:password@]host:port,host:port,…`,
//! `rediss-cluster://` for TLS; the database is always 0), the cluster
//! command connection, the primaries of the current topology, and a sharded
//! (`SSUBSCRIBE`) subscription that follows its channel's slot.
//!
//! What is per node stays per node: keyspace notifications are neither
//! broadcast nor replicated, so the expiry listener subscribes to every
//! primary on its own plain connection ([`ClusterTarget::node_client`])
//! and follows [`primaries`]; redis-rs's cluster pub/sub would route a
//! `SUBSCRIBE` to one arbitrary node.

use std::time::Duration;

use redis::{cluster::ClusterClientBuilder, PushKind, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    client::{self, TrustedCa},
    subscription::Handler,
};

/// Where subscriptions connect: one server, or every node of a Cluster
/// that they need (each opens its own connections).
#[derive(Clone, Debug)]
pub enum Topology {
    /// One server, or the primary a Sentinel follower names.
    Single(super::subscription::Target),
    Cluster(ClusterTarget),
}

/// Whether `url` names a Redis Cluster by its seed nodes.
pub fn is_cluster(url: &str) -> bool {
    let url = url.trim_start();
    url.starts_with("redis-cluster://") || url.starts_with("rediss-cluster://")
}

/// A Redis Cluster as configured: its seed nodes, credentials and TLS.
#[derive(Clone, Debug)]
pub struct ClusterTarget {
    tls: bool,
    /// `user:password` exactly as written (still URL-encoded).
    userinfo: Option<String>,
    /// `host:port` of each seed.
    seeds: Vec<String>,
    ca: Option<TrustedCa>,
}

impl ClusterTarget {
    /// Parses a `redis-cluster://` or `rediss-cluster://` URL; the error
    /// says what is wrong and never repeats the password.
    pub fn parse(url: &str) -> Result<ClusterTarget, String> {
        let url = url.trim();
        let (tls, rest) = if let Some(rest) = url.strip_prefix("rediss-cluster://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("redis-cluster://") {
            (false, rest)
        } else {
            return Err("a cluster URL starts with redis-cluster:// or rediss-cluster://".into());
        };
        let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
        let (userinfo, hosts) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()).filter(|u| !u.is_empty()), h),
            None => (None, rest),
        };
        let (hosts, db) = hosts.split_once('/').unwrap_or((hosts, ""));
        if !(db.is_empty() || db == "0") {
            return Err(format!("a Redis Cluster has only database 0, not /{db}"));
        }
        let mut seeds = Vec::new();
        for node in hosts.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match node.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                    seeds.push(node.to_string())
                }
                _ => return Err(format!("seed node {node:?} is not host:port")),
            }
        }
        if seeds.is_empty() {
            return Err("no seed node (expected host:port,host:port,…)".into());
        }
        Ok(ClusterTarget { tls, userinfo, seeds, ca: None })
    }

    /// Trusts `ca` (beside the system's roots) over TLS.
    pub fn with_ca(mut self, ca: Option<TrustedCa>) -> ClusterTarget {
        self.ca = ca;
        self
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The plain URL of one node (`host:port`), with the cluster's
    /// credentials and TLS.
    pub fn node_url(&self, addr: &str) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        match &self.userinfo {
            Some(u) => format!("{scheme}://{u}@{addr}/0"),
            None => format!("{scheme}://{addr}/0"),
        }
    }

    /// A client for one node, e.g. a primary's keyspace-event subscription.
    pub fn node_client(&self, addr: &str) -> redis::RedisResult<redis::Client> {
        client::client(&self.node_url(addr), self.ca.as_ref())
    }

    fn builder(&self) -> ClusterClientBuilder {
        let seeds: Vec<String> = self.seeds.iter().map(|s| self.node_url(s)).collect();
        let builder = ClusterClientBuilder::new(seeds);
        match &self.ca {
            Some(ca) if self.tls => builder.certs(ca.certificates()),
            _ => builder,
        }
    }

    /// The command connection: routes each command to its slot's primary
    /// and follows `MOVED`. Commands fail fast while a primary is away (an
    /// order is still placed; the sweep covers it) instead of retrying
    /// through a failover.
    pub async fn connect(&self) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        self.builder()
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(1000))
            .retries(2)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()?
            .get_async_connection()
            .await
    }
}

/// The primaries that own slots now, as `host:port`, from `CLUSTER SLOTS`
/// (asked of whichever node the connection picks): the same view, with the
/// same preferred endpoints (ip or announced hostname, TLS port on a TLS
/// cluster), that the command connection routes by. A failed primary stays
/// until its replica is promoted (its subscription just retries meanwhile).
pub async fn primaries(conn: &mut super::RedisConn) -> redis::RedisResult<Vec<String>> {
    let slots: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    Ok(parse_primaries(&slots))
}

/// Each slot range is `[start, end, [endpoint, port, id, …], replicas…]`;
/// an unknown endpoint (`?`, empty) is left out.
fn parse_primaries(slots: &[Value]) -> Vec<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut out: Vec<String> = slots
        .iter()
        .filter_map(|range| {
            let Value::Array(range) = range else { return None };
            let Some(Value::Array(primary)) = range.get(2) else { return None };
            let host = text(primary.first()?)?;
            let Some(Value::Int(port)) = primary.get(1) else { return None };
            (!host.is_empty() && host != "?" && *port > 0).then(|| match host.contains(':') {
                true => format!("[{host}]:{port}"),
                false => format!("{host}:{port}"),
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the sharded subscription checks that its channel's slot
/// still lives where it subscribed (a failover, a slot move).
const PROBE_EVERY: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Like [`super::subscription::run`], on a sharded channel of a Cluster:
/// `SSUBSCRIBE` on the primary that owns the channel's slot (RESP3). Each
/// second it reads the channel's slot (`EXISTS <channel>`), so a failover or
/// slot move shows up as an error (or the server's `sunsubscribe`); then it
/// drops the connection and subscribes afresh on the current owner.
pub async fn run_sharded(
    target: &ClusterTarget,
    channel: String,
    name: &'static str,
    handler: &mut impl Handler,
    shutdown: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    loop {
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
        let attempt = async {
            let client = target
                .builder()
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .connection_timeout(Duration::from_millis(500))
                .response_timeout(Duration::from_millis(1000))
                .retries(1)
                .build()
                .map_err(|e| e.to_string())?;
            let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_connection())
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(CONNECT_TIMEOUT, conn.ssubscribe(&channel))
                .await
                .map_err(|_| "ssubscribe timed out".to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(conn)
        };
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match conn {
            Ok(mut conn) => {
                info!(%channel, reconnected = connected_before, "{name} subscribed (sharded)");
                handler.connected(connected_before).await;
                connected_before = true;
                backoff = MIN_BACKOFF;
                let mut probe = tokio::time::interval(PROBE_EVERY);
                probe.reset();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        push = pushes.recv() => match push {
                            Some(p) if p.kind == PushKind::SMessage => {
                                if let [Value::BulkString(ch), Value::BulkString(payload)] = &p.data[..] {
                                    handler.message(std::str::from_utf8(ch).unwrap_or("?"), payload).await;
                                }
                            }
                            // the slot moved away, or the connection closed
                            Some(p) if matches!(p.kind, PushKind::SUnsubscribe | PushKind::Disconnection) => break,
                            Some(_) => {}
                            None => break,
                        },
                        _ = probe.tick() => {
                            let check = redis::cmd("EXISTS").arg(&channel).clone();
                            let check = tokio::time::timeout(CONNECT_TIMEOUT, check.query_async::<Value>(&mut conn));
                            if !matches!(check.await, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                handler.disconnected();
                warn!(%channel, "{name} lost its shard's primary (failover, slot move or connection); subscribing again");
            }
            Err(e) => warn!(%channel, error = %e, "{name} cannot subscribe on the Cluster; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_names_seeds_credentials_and_tls() {
        let t = ClusterTarget::parse("rediss-cluster://app:s%40cret@a.example:7000,b.example:7001/0").unwrap();
        assert!(t.is_tls());
        assert_eq!(t.seeds, vec!["a.example:7000", "b.example:7001"]);
        assert_eq!(t.node_url("10.0.0.1:7002"), "rediss://app:s%40cret@10.0.0.1:7002/0");
        let t = ClusterTarget::parse("redis-cluster://127.0.0.1:7000").unwrap();
        assert_eq!(t.node_url("127.0.0.1:7000"), "redis://127.0.0.1:7000/0");
        for bad in
            ["redis-cluster://", "redis-cluster://host", "redis-cluster://h:1/2", "redis-cluster://h:x", "redis://h:1"]
        {
            assert!(ClusterTarget::parse(bad).is_err(), "{bad}");
        }
        let err = ClusterTarget::parse("redis-cluster://u:hunter2@h:1/3").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn the_primaries_are_the_first_node_of_each_slot_range() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![Value::BulkString(host.into()), Value::Int(port), Value::BulkString(b"id".to_vec())])
        };
        let range = |start: i64, end: i64, nodes: Vec<Value>| {
            Value::Array([vec![Value::Int(start), Value::Int(end)], nodes].concat())
        };
        let slots = vec![
            range(0, 99, vec![node("10.0.0.1", 7000), node("10.0.0.4", 7003)]),
            range(100, 199, vec![node("node-b.example", 7001)]),
            range(200, 299, vec![node("10.0.0.1", 7000)]),
            range(300, 399, vec![node("?", 7002)]),
            range(400, 499, vec![node("::1", 7005)]),
        ];
        assert_eq!(parse_primaries(&slots), vec!["10.0.0.1:7000", "[::1]:7005", "node-b.example:7001"]);
    }
}

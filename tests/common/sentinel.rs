//! A Redis Sentinel deployment of its own for one test: a primary, one
//! replica (`--replicaof`) and three sentinels (quorum 2, each with its
//! own writable config file in a temp dir), all on free loopback ports,
//! every process killed when this drops (also when the test panics).
//! Readiness is polled (`SENTINEL …`, `INFO replication`), never slept.
//! Neither data node has `notify-keyspace-events` set: the server under
//! test must turn it on, on every new primary too.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::eventually;

/// The master name the sentinels monitor.
pub const MASTER: &str = "shopmaster";
/// How long Sentinel waits before it calls a silent primary down.
pub const DOWN_AFTER_MS: u64 = 1000;

/// One child process on a port; SIGKILLed when dropped.
pub struct Node {
    pub port: u16,
    child: Option<Child>,
}

impl Node {
    fn spawn(port: u16, cmd: &mut Command) -> Node {
        let child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("redis-server on PATH");
        Node { port, child: Some(child) }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Not killed yet.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// A fresh connection (a killed node: an error).
    pub async fn conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        match tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection()).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "connect timed out"))),
        }
    }

    /// One field of `INFO replication`.
    pub async fn replication(&self, field: &str) -> Option<String> {
        let mut conn = self.conn().await.ok()?;
        let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await.ok()?;
        info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).map(|v| v.trim().to_string())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A primary, a replica and three sentinels.
pub struct SentinelSet {
    pub primary: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
    /// The sentinels' config files (rewritten by them) and logs.
    dir: tempfile::TempDir,
}

/// A data node working in `dir`: a replica's full sync writes an RDB file
/// even without persistence.
fn data_node(port: u16, replica_of: Option<u16>, dir: &std::path::Path) -> Node {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
    cmd.arg("--dir").arg(dir);
    if let Some(primary) = replica_of {
        cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
    }
    Node::spawn(port, &mut cmd)
}

impl SentinelSet {
    /// Starts everything and returns once every sentinel knows the primary,
    /// the replica and the two other sentinels (a failover can be agreed).
    pub async fn start() -> SentinelSet {
        let dir = tempfile::tempdir().expect("temp dir");
        let (primary_dir, replica_dir) = (dir.path().join("primary"), dir.path().join("replica"));
        std::fs::create_dir_all(&primary_dir).unwrap();
        std::fs::create_dir_all(&replica_dir).unwrap();
        let primary = data_node(free_port(), None, &primary_dir);
        let replica = data_node(free_port(), Some(primary.port), &replica_dir);
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            let log = dir.path().join(format!("sentinel-{i}.log"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n\
                     sentinel failover-timeout {MASTER} 5000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    dir = dir.path().display(),
                    log = log.display(),
                    primary = primary.port,
                ),
            )
            .unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.arg(&conf).arg("--sentinel");
            sentinels.push(Node::spawn(port, &mut cmd));
        }
        let set = SentinelSet { primary, replica, sentinels, dir };
        let ready = async {
            eventually(Duration::from_secs(30), || async { set.ready().await.then_some(()) }).await;
        };
        ready.await;
        set
    }

    async fn ready(&self) -> bool {
        if self.replica.replication("master_link_status").await.as_deref() != Some("up") {
            return false;
        }
        for s in &self.sentinels {
            let Ok(mut conn) = s.conn().await else { return false };
            let named: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER)
                .query_async(&mut conn)
                .await
                .ok()
                .flatten();
            if named.map(|(_, p)| p) != Some(self.primary.port) {
                return false;
            }
            let replicas: Vec<std::collections::HashMap<String, String>> =
                match redis::cmd("SENTINEL").arg("replicas").arg(MASTER).query_async(&mut conn).await {
                    Ok(r) => r,
                    Err(_) => return false,
                };
            let known = replicas.iter().any(|r| {
                r.get("port").map(String::as_str) == Some(&self.replica.port.to_string())
                    && r.get("flags").map(String::as_str) == Some("slave")
                    && r.get("master-link-status").map(String::as_str) == Some("ok")
            });
            let others: Vec<redis::Value> =
                redis::cmd("SENTINEL").arg("sentinels").arg(MASTER).query_async(&mut conn).await.unwrap_or_default();
            let quorum: redis::RedisResult<String> =
                redis::cmd("SENTINEL").arg("ckquorum").arg(MASTER).query_async(&mut conn).await;
            if !known || others.len() < 2 || quorum.is_err() {
                return false;
            }
        }
        true
    }

    /// `redis-sentinel://127.0.0.1:a,127.0.0.1:b,127.0.0.1:c/0#shopmaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis-sentinel://{}/0#{MASTER}", hosts.join(","))
    }

    /// Waits until the replica has every write the primary took, so a kill
    /// now loses nothing that was acknowledged before it.
    pub async fn wait_replicated(&self, limit: Duration) {
        eventually(limit, || async {
            let sent = self.primary.replication("master_repl_offset").await?;
            let acked = self.replica.replication("slave_repl_offset").await?;
            (sent == acked).then_some(())
        })
        .await
    }

    /// Asks the last sentinel for a failover (`SENTINEL FAILOVER`, which
    /// needs no agreement): the primary stays up, and is made a replica of
    /// the promoted one some seconds later.
    pub async fn failover(&self) {
        let mut conn = self.sentinels.last().unwrap().conn().await.expect("a sentinel");
        let ok: String = redis::cmd("SENTINEL").arg("failover").arg(MASTER).query_async(&mut conn).await.unwrap();
        assert_eq!(ok, "OK");
    }

    /// Waits until every running sentinel names the replica and it says it
    /// is master.
    pub async fn wait_promoted(&self, limit: Duration) {
        let replica = self.replica.port;
        eventually(limit, || async move {
            if self.replica.replication("role").await.as_deref() != Some("master") {
                return None;
            }
            for s in self.sentinels.iter().filter(|s| s.running()) {
                let mut conn = s.conn().await.ok()?;
                let named: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                if named?.1 != replica {
                    return None;
                }
            }
            Some(())
        })
        .await
    }

    /// The sentinels' logs, for a failure message.
    pub fn logs(&self) -> String {
        (0..self.sentinels.len())
            .map(|i| std::fs::read_to_string(self.dir.path().join(format!("sentinel-{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

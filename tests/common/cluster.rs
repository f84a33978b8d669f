//! A private Redis Cluster for tests: 3 primaries with a replica each, on
//! free ports, created with `redis-cli --cluster create`, ready once every
//! node reports `cluster_state:ok`. Every node is killed when it drops.
//! Notifications are left off, as on a fresh server: the app turns them on.
//! [`RedisCluster::start_tls`] makes every node speak TLS only (clients,
//! cluster bus and replication), with a given certificate.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct RedisCluster {
    pub ports: Vec<u16>,
    nodes: HashMap<u16, Child>,
    /// Set when the nodes speak TLS only: their CA.
    tls: Option<Tls>,
    _dir: tempfile::TempDir,
}

/// A node certificate (for 127.0.0.1), its key and the CA that signed it.
#[derive(Clone)]
pub struct Tls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

/// A port whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

async fn query_node(port: u16, tls: Option<&Tls>, cmd: &redis::Cmd) -> Option<String> {
    let client = match tls {
        Some(t) => {
            let ca = shopgraph::redis::client::TrustedCa::read(&t.ca).ok()?;
            shopgraph::redis::client::client(&format!("rediss://127.0.0.1:{port}/0"), Some(&ca)).ok()?
        }
        None => redis::Client::open(format!("redis://127.0.0.1:{port}/0")).ok()?,
    };
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        cmd.query_async::<String>(&mut conn).await
    };
    tokio::time::timeout(Duration::from_secs(1), attempt).await.ok()?.ok()
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        RedisCluster::start_with(None).await
    }

    /// Every node TLS only, with `tls`'s certificate (clients need not
    /// present one); `url()` is then `rediss-cluster://…`.
    pub async fn start_tls(tls: Tls) -> RedisCluster {
        RedisCluster::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Tls>) -> RedisCluster {
        // one cluster starts at a time in a test process: concurrent starts
        // would race for the free ports they picked
        static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = STARTING.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = RedisCluster { ports: Vec::new(), nodes: HashMap::new(), tls, _dir: dir };
        while cluster.ports.len() < 6 {
            let port = free_port();
            let mut child = cluster.spawn_node(port);
            // a port taken meanwhile by someone else: the server exits, try another
            let up = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if cluster.query(port, &redis::cmd("PING")).await.is_some() {
                        return true;
                    }
                    if child.try_wait().ok().flatten().is_some() {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            if up == Ok(true) {
                cluster.ports.push(port);
                cluster.nodes.insert(port, child);
            } else {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut cli = Command::new("redis-cli");
        if let Some(t) = &cluster.tls {
            cli.arg("--tls").arg("--cacert").arg(&t.ca);
        }
        let out = cli
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        cluster.wait_ok().await;
        cluster
    }

    fn spawn_node(&self, port: u16) -> Child {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            Some(t) => {
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes", "--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(&t.cert)
                    .arg("--tls-key-file")
                    .arg(&t.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&t.ca);
            }
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
        }
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            // a replica takes over however long ago it last heard from its primary
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--cluster-config-file")
            .arg(self._dir.path().join(format!("nodes-{port}.conf")))
            .arg("--dir")
            .arg(self._dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH")
    }

    async fn query(&self, port: u16, cmd: &redis::Cmd) -> Option<String> {
        query_node(port, self.tls.as_ref(), cmd).await
    }

    /// Until every live node says `cluster_state:ok` and knows the others.
    pub async fn wait_ok(&self) {
        let live: Vec<u16> = self.nodes.keys().copied().collect();
        for port in live {
            common_eventually(Duration::from_secs(60), || async move {
                let info = self.query(port, redis::cmd("CLUSTER").arg("INFO")).await?;
                (info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6")).then_some(())
            })
            .await;
        }
    }

    /// The `REDIS_URL` of this cluster (every primary-to-be as a seed).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let scheme = if self.tls.is_some() { "rediss-cluster" } else { "redis-cluster" };
        format!("{scheme}://{}", seeds.join(","))
    }

    /// `CLUSTER NODES` as a live node sees it.
    pub async fn nodes_text(&self) -> String {
        for port in self.nodes.keys() {
            if let Some(text) = self.query(*port, redis::cmd("CLUSTER").arg("NODES")).await {
                return text;
            }
        }
        panic!("no cluster node answers");
    }

    /// The port of the primary that serves `key`'s slot now.
    pub async fn owner_of(&self, key: &str) -> u16 {
        let port = *self.nodes.keys().next().unwrap();
        let slot: i64 = {
            let mut conn = self.node_conn(port).await;
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut conn).await.unwrap()
        };
        for line in self.nodes_text().await.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for range in &f[8..] {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse::<i64>(), hi.parse::<i64>()) {
                    if (lo..=hi).contains(&slot) {
                        return f[1].split([':', '@']).nth(1).unwrap().parse().unwrap();
                    }
                }
            }
        }
        panic!("no primary serves slot {slot}");
    }

    /// A plain (non-cluster) connection to one node.
    pub async fn node_conn(&self, port: u16) -> redis::aio::MultiplexedConnection {
        let client = match &self.tls {
            Some(t) => {
                let ca = shopgraph::redis::client::TrustedCa::read(&t.ca).unwrap();
                shopgraph::redis::client::client(&format!("rediss://127.0.0.1:{port}/0"), Some(&ca)).unwrap()
            }
            None => redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap(),
        };
        client.get_multiplexed_async_connection().await.unwrap()
    }

    /// SIGKILLs one node.
    pub fn kill(&mut self, port: u16) {
        if let Some(mut child) = self.nodes.remove(&port) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Until the surviving nodes agree that `killed` failed and a replica
    /// took its slots (`cluster_state:ok` everywhere again).
    pub async fn wait_failover(&self, killed: u16) {
        let live: Vec<u16> = self.nodes.keys().copied().collect();
        for port in live {
            common_eventually(Duration::from_secs(30), || async move {
                let info = self.query(port, redis::cmd("CLUSTER").arg("INFO")).await?;
                let nodes = self.query(port, redis::cmd("CLUSTER").arg("NODES")).await?;
                let failed = nodes.lines().any(|l| l.contains(&format!(":{killed}@")) && l.contains("fail"));
                (info.contains("cluster_state:ok") && failed).then_some(())
            })
            .await;
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in self.nodes.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
async fn common_eventually<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while check().await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the Redis Cluster did not get there within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

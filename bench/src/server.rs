//! Starting what is measured: a fresh database (SQLite file or Postgres
//! database), a Redis (a private `redis-server` by default), and the server
//! process itself, or an already running server given by URL.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use sqlx::Connection;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{log, procfs};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Postgres,
    Sqlite,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Postgres => "postgres",
            StoreKind::Sqlite => "sqlite",
        }
    }
    pub fn parse(s: &str) -> Result<StoreKind> {
        match s.trim() {
            "postgres" | "pg" => Ok(StoreKind::Postgres),
            "sqlite" => Ok(StoreKind::Sqlite),
            other => bail!("unknown store {other:?} (postgres or sqlite)"),
        }
    }
}

/// How to run one server implementation.
#[derive(Clone, Debug)]
pub enum Launch {
    /// A shopgraph binary: `<bin> serve`.
    Binary(PathBuf),
    /// A shell command (`sh -c`), e.g. the `--compare` server.
    Shell(String),
    /// A server that is already running; the harness controls nothing.
    Url(String),
}

#[derive(Clone, Debug)]
pub struct Target {
    pub label: String,
    pub launch: Launch,
}

impl Target {
    pub fn is_url(&self) -> bool {
        matches!(self.launch, Launch::Url(_))
    }
}

/// A fresh database for one deployment.
pub struct Db {
    pub kind: StoreKind,
    pub url: String,
    /// Postgres: the database name (dropped at cleanup).
    pub pg_name: Option<String>,
    pg_admin_url: Option<String>,
    /// SQLite: the directory holding the file (removed at cleanup).
    sqlite_dir: Option<PathBuf>,
}

pub fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

impl Db {
    pub async fn create(kind: StoreKind, pg_url: &str, work_dir: &Path) -> Result<Db> {
        match kind {
            StoreKind::Sqlite => {
                let dir = work_dir.join(format!("sqlite-{}", short_id()));
                std::fs::create_dir_all(&dir)?;
                let url = format!("sqlite://{}", dir.join("shopgraph.db").display());
                Ok(Db { kind, url, pg_name: None, pg_admin_url: None, sqlite_dir: Some(dir) })
            }
            StoreKind::Postgres => {
                let name = format!("shopgraph_bench_{}", short_id());
                let mut conn = sqlx::PgConnection::connect(pg_url)
                    .await
                    .with_context(|| format!("connect to --pg-url {pg_url}"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
                let _ = conn.close().await;
                let mut url = reqwest::Url::parse(pg_url).context("--pg-url is a URL")?;
                url.set_path(&name);
                Ok(Db {
                    kind,
                    url: url.to_string(),
                    pg_name: Some(name),
                    pg_admin_url: Some(pg_url.to_string()),
                    sqlite_dir: None,
                })
            }
        }
    }

    pub async fn cleanup(&self) {
        if let (Some(name), Some(admin)) = (&self.pg_name, &self.pg_admin_url) {
            if let Ok(mut conn) = sqlx::PgConnection::connect(admin).await {
                let q = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(q)).execute(&mut conn).await {
                    log(&format!("could not drop database {name}: {e}"));
                }
                let _ = conn.close().await;
            }
        }
        if let Some(dir) = &self.sqlite_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The Redis every deployment of this run uses, each under its own prefix.
pub struct RedisService {
    pub url: String,
    /// Ours to flush: a private `redis-server` (or Cluster) this harness started.
    pub private: bool,
    pub pid: Option<u32>,
    /// Every node's plain URL (one for a single server).
    pub nodes: Vec<String>,
    /// What the servers get as `REDIS_URL`: `url`, or with `--redis-tls` the
    /// same server's TLS port (the harness itself keeps to the plain port).
    pub server_url: String,
    /// `REDIS_TLS_CA_FILE` for the servers: the CA of the TLS port.
    pub ca_file: Option<PathBuf>,
    children: Vec<Child>,
    _cluster_dir: Option<PathBuf>,
    _certs: Option<crate::certs::Certs>,
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_cluster_port() -> Result<u16> {
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port pair for a cluster node")
}

impl RedisService {
    /// `configured`, or a private `redis-server` on a free port; with `tls`
    /// it also listens for TLS (a certificate for 127.0.0.1 from a throw-away
    /// CA) and the servers are given that port.
    pub async fn start(configured: Option<&str>, bin: &str, tls: bool) -> Result<RedisService> {
        if let Some(url) = configured {
            let pid = redis::Client::open(url)
                .ok()
                .and_then(|c| {
                    c.get_connection_info().addr().to_string().rsplit(':').next().and_then(|p| p.parse().ok())
                })
                .and_then(procfs::pid_listening_on);
            return Ok(RedisService {
                url: url.to_string(),
                private: false,
                pid,
                nodes: vec![url.to_string()],
                server_url: url.to_string(),
                ca_file: None,
                children: Vec::new(),
                _cluster_dir: None,
                _certs: None,
            });
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let certs = tls.then(crate::certs::generate_certs);
        let mut tls_args = Vec::new();
        let mut server_url = format!("redis://127.0.0.1:{port}/0");
        if let Some(c) = &certs {
            let tls_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            server_url = format!("rediss://127.0.0.1:{tls_port}/0");
            tls_args.extend(["--tls-port".to_string(), tls_port.to_string(), "--tls-auth-clients".into(), "no".into()]);
            for (flag, path) in
                [("--tls-cert-file", c.cert("good")), ("--tls-key-file", c.key("good")), ("--tls-ca-cert-file", c.ca())]
            {
                tls_args.extend([flag.to_string(), path.display().to_string()]);
            }
        }
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--maxclients", "20000"])
            .args(&tls_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {bin} (or pass --redis-url)"))?;
        let pid = child.id();
        let url = format!("redis://127.0.0.1:{port}/0");
        for _ in 0..100 {
            if let Ok(mut c) = redis_conn(&url).await {
                if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                    return Ok(RedisService {
                        url: url.clone(),
                        private: true,
                        pid,
                        nodes: vec![url],
                        server_url,
                        ca_file: certs.as_ref().map(|c| c.ca()),
                        children: vec![child],
                        _cluster_dir: None,
                        _certs: certs,
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{bin} on port {port} did not answer")
    }

    /// A private Redis Cluster: 3 primaries with a replica each, created
    /// with `redis-cli --cluster create`, ready once every node says
    /// `cluster_state:ok`. `url` is its `redis-cluster://` seed list; no
    /// single Redis pid is measured (the CPU columns count it as "other").
    pub async fn start_cluster(bin: &str, cli: &str) -> Result<RedisService> {
        let dir = std::env::temp_dir().join(format!("shopgraph-bench-cluster-{}", short_id()));
        std::fs::create_dir_all(&dir)?;
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..6 {
            let port = free_cluster_port()?;
            let child = Command::new(bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--maxclients", "20000", "--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .arg("--cluster-config-file")
                .arg(dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("start {bin}"))?;
            ports.push(port);
            children.push(child);
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("redis://127.0.0.1:{p}/0")).collect();
        for url in &nodes {
            wait_for(url, |_| true).await?;
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {cli} --cluster create"))?;
        if !out.status.success() {
            bail!("{cli} --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        for url in &nodes {
            wait_for(url, |info| info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6")).await?;
        }
        let url = format!("redis-cluster://{}", addrs.join(","));
        Ok(RedisService {
            server_url: url.clone(),
            url,
            private: true,
            pid: None,
            nodes,
            ca_file: None,
            children,
            _cluster_dir: Some(dir),
            _certs: None,
        })
    }

    /// Removes one deployment's keys: FLUSHALL on a private Redis (every
    /// node of a private Cluster), else the keys under the prefix (SCAN +
    /// UNLINK), never anyone else's.
    pub async fn forget(&self, prefix: &str) {
        if self.private {
            for node in &self.nodes {
                if let Ok(mut c) = redis_conn(node).await {
                    // a replica refuses it (READONLY) and follows its primary
                    let _ = redis::cmd("FLUSHALL").arg("ASYNC").query_async::<()>(&mut c).await;
                }
            }
            return;
        }
        let Ok(mut c) = redis_conn(&self.url).await else { return };
        let mut cursor: u64 = 0;
        for _ in 0..1_000_000 {
            let res: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut c)
                .await;
            let Ok((next, keys)) = res else { return };
            if !keys.is_empty() {
                let _ = redis::cmd("UNLINK").arg(&keys).query_async::<()>(&mut c).await;
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }

    pub async fn stop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill().await;
        }
        if let Some(dir) = &self._cluster_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Until `url` answers `CLUSTER INFO` (or, on a plain server, `PING`) as `ok` wants.
async fn wait_for(url: &str, ok: impl Fn(&str) -> bool) -> Result<()> {
    for _ in 0..400 {
        if let Ok(mut c) = redis_conn(url).await {
            let info: redis::RedisResult<String> = redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await;
            if info.is_ok_and(|i| ok(&i)) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("Redis Cluster node {url} did not get ready")
}

/// A command connection to a single Redis or a Cluster (`redis-cluster://`).
#[derive(Clone)]
pub enum AnyConn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            AnyConn::Single(c) => c.req_packed_command(cmd),
            AnyConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            AnyConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            AnyConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            AnyConn::Single(c) => c.get_db(),
            AnyConn::Cluster(_) => 0,
        }
    }
}

pub async fn redis_any(url: &str) -> Result<AnyConn> {
    match url.strip_prefix("redis-cluster://") {
        Some(seeds) => {
            let nodes: Vec<String> = seeds.split(',').map(|s| format!("redis://{s}/0")).collect();
            let client = redis::cluster::ClusterClient::new(nodes)?;
            let conn = tokio::time::timeout(Duration::from_secs(5), client.get_async_connection())
                .await
                .map_err(|_| anyhow!("Redis Cluster at {url}: connect timed out"))??;
            Ok(AnyConn::Cluster(conn))
        }
        None => Ok(AnyConn::Single(redis_conn(url).await?)),
    }
}

pub async fn redis_conn(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    Ok(tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
        .await
        .map_err(|_| anyhow!("Redis at {url}: connect timed out"))??)
}

/// A running server process (its own process group, stopped on drop).
pub struct ServerProc {
    child: Child,
    pub pid: Option<u32>,
    pub addr: String,
    pub log_path: PathBuf,
    /// When the process was spawned and when it printed its listening line.
    pub spawned: Instant,
    pub listening: Instant,
}

impl ServerProc {
    pub async fn start(launch: &Launch, env: &BTreeMap<String, String>, log_path: &Path) -> Result<ServerProc> {
        let mut cmd = match launch {
            Launch::Binary(bin) => {
                let mut c = Command::new(bin);
                c.arg("serve");
                c
            }
            Launch::Shell(sh) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(sh);
                c
            }
            Launch::Url(_) => bail!("a --url server is not started by the harness"),
        };
        let log = std::fs::File::create(log_path)?;
        cmd.envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(true);
        let spawned = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("start server {launch:?}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.trim().strip_prefix("listening on http://") {
                    return Ok::<_, std::io::Error>(Some(rest.trim().to_string()));
                }
            }
            Ok(None)
        })
        .await;
        let tail = || {
            std::fs::read_to_string(log_path)
                .map(|s| s.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"))
                .unwrap_or_default()
        };
        let addr = match found {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) | Ok(Err(_)) => bail!("server exited before printing its listening line:\n{}", tail()),
            Err(_) => bail!("server printed no listening line within 120 s:\n{}", tail()),
        };
        let listening = Instant::now();
        // keep draining stdout so the server never blocks on a full pipe
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let port: Option<u16> = addr.rsplit(':').next().and_then(|p| p.parse().ok());
        let pid = match launch {
            Launch::Binary(_) => child.id(),
            _ => port.and_then(procfs::pid_listening_on).or(child.id()),
        };
        Ok(ServerProc { child, pid, addr, log_path: log_path.to_path_buf(), spawned, listening })
    }

    /// SIGTERM to the process group, then SIGKILL after 10 s.
    pub async fn stop(mut self) {
        if let Some(pgid) = self.child.id() {
            // SAFETY: signalling the process group this harness created.
            unsafe {
                libc::kill(-(pgid as i32), libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
                unsafe {
                    libc::kill(-(pgid as i32), libc::SIGKILL);
                }
                let _ = self.child.wait().await;
            }
        }
    }
}

/// The settings a deployment is started with (all passed as env vars).
#[derive(Clone, Debug)]
pub struct EnvSpec {
    pub store: StoreKind,
    pub order_ttl: String,
    pub sweep_interval: String,
    pub extra: Vec<(String, String)>,
}

impl EnvSpec {
    pub fn new(store: StoreKind, order_ttl: &str) -> EnvSpec {
        EnvSpec { store, order_ttl: order_ttl.into(), sweep_interval: "30s".into(), extra: Vec::new() }
    }
}

/// One server on one fresh database and Redis prefix.
pub struct Deployment {
    pub target: Target,
    pub store: Option<StoreKind>,
    pub http: String,
    pub ws: String,
    pub db: Option<Db>,
    pub prefix: String,
    pub redis_url: String,
    pub redis_pid: Option<u32>,
    pub server: Option<ServerProc>,
    pub env: BTreeMap<String, String>,
    pub admin: String,
    log_dir: PathBuf,
    /// A --url server on this host: its pid, found by its listening port.
    external_pid: Option<u32>,
}

pub struct Settings<'a> {
    pub pg_url: &'a str,
    pub work_dir: &'a Path,
    pub admin_token: &'a str,
    pub jwt_secret: &'a str,
    pub server_env: &'a [(String, String)],
}

impl Deployment {
    pub async fn up(target: &Target, spec: &EnvSpec, redis: &RedisService, s: &Settings<'_>) -> Result<Deployment> {
        let prefix = format!("bench-{}:", short_id());
        if let Launch::Url(url) = &target.launch {
            let base = url.trim_end_matches('/').trim_end_matches("/graphql").to_string();
            let external_pid = reqwest::Url::parse(&base)
                .ok()
                .filter(|u| matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")))
                .and_then(|u| u.port_or_known_default())
                .and_then(procfs::pid_listening_on);
            return Ok(Deployment {
                target: target.clone(),
                store: None,
                ws: base.replacen("http", "ws", 1) + "/graphql",
                http: base + "/graphql",
                db: None,
                prefix,
                redis_url: redis.url.clone(),
                redis_pid: None,
                server: None,
                env: BTreeMap::new(),
                admin: s.admin_token.to_string(),
                log_dir: s.work_dir.to_path_buf(),
                external_pid,
            });
        }
        let db = Db::create(spec.store, s.pg_url, s.work_dir).await?;
        let mut env = BTreeMap::new();
        env.insert("DATABASE_URL".into(), db.url.clone());
        env.insert("REDIS_URL".into(), redis.server_url.clone());
        if let Some(ca) = &redis.ca_file {
            env.insert("REDIS_TLS_CA_FILE".into(), ca.display().to_string());
        }
        env.insert("REDIS_KEY_PREFIX".into(), prefix.clone());
        env.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
        env.insert("ORDER_TTL".into(), spec.order_ttl.clone());
        env.insert("SWEEP_INTERVAL".into(), spec.sweep_interval.clone());
        env.insert("ADMIN_TOKEN".into(), s.admin_token.into());
        env.insert("JWT_SECRET".into(), s.jwt_secret.into());
        env.insert("AUTH_RATE_LIMIT".into(), "1000000".into());
        // the load's customers each hold many unpaid orders; a scenario about
        // abuse limits sets its own through `extra`
        env.insert("LOGIN_RATE_LIMIT_PER_ACCOUNT".into(), "1000000".into());
        env.insert("MAX_PENDING_ORDERS".into(), "1000000".into());
        env.insert("MAX_PENDING_UNITS".into(), "1000000000".into());
        env.insert("ORDER_RATE_LIMIT".into(), "1000000".into());
        env.insert("WS_MAX_CONNECTIONS".into(), "20000".into());
        // every simulated client connects from 127.0.0.1
        env.insert("WS_MAX_CONNECTIONS_PER_IP".into(), "20000".into());
        env.insert("MAX_CONNECTIONS_PER_IP".into(), "25000".into());
        for (k, v) in spec.extra.iter().chain(s.server_env) {
            env.insert(k.clone(), v.clone());
        }
        let log_path = s.work_dir.join(format!("server-{}-{}.log", spec.store.name(), short_id()));
        let server = match ServerProc::start(&target.launch, &env, &log_path).await {
            Ok(s) => s,
            Err(e) => {
                db.cleanup().await;
                return Err(e);
            }
        };
        Ok(Deployment {
            target: target.clone(),
            store: Some(spec.store),
            http: format!("http://{}/graphql", server.addr),
            ws: format!("ws://{}/graphql", server.addr),
            db: Some(db),
            prefix,
            redis_url: redis.url.clone(),
            redis_pid: redis.pid,
            server: Some(server),
            env,
            admin: s.admin_token.to_string(),
            log_dir: s.work_dir.to_path_buf(),
            external_pid: None,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().and_then(|s| s.pid).or(self.external_pid)
    }

    pub fn watch(&self) -> procfs::Watch {
        procfs::Watch {
            server: self.pid(),
            pg_db: self.db.as_ref().and_then(|d| d.pg_name.clone()),
            redis: self.redis_pid,
        }
    }

    pub fn db(&self) -> Result<&Db> {
        self.db.as_ref().ok_or_else(|| anyhow!("needs a server the harness starts (not --url)"))
    }

    /// Stops the server (keeping the database and prefix).
    pub async fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
    }

    /// Starts the server again on the same database and prefix.
    pub async fn restart_server(&mut self) -> Result<()> {
        self.stop_server().await;
        self.db()?;
        let path = self.log_dir.join(format!("server-restart-{}.log", short_id()));
        let server = ServerProc::start(&self.target.launch, &self.env, &path).await?;
        self.http = format!("http://{}/graphql", server.addr);
        self.ws = format!("ws://{}/graphql", server.addr);
        self.server = Some(server);
        Ok(())
    }

    pub async fn down(mut self, redis: &RedisService) {
        self.stop_server().await;
        if let Some(db) = &self.db {
            db.cleanup().await;
        }
        if !self.target.is_url() {
            redis.forget(&self.prefix).await;
        }
    }
}

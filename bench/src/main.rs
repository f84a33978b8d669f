//! `shopgraph-bench`: starts shopgraph (and optionally a second server
//! implementing the same contract), drives it through the scenarios of
//! BENCHMARKS.md with real HTTP and websocket clients, and prints markdown
//! tables.
//!
//! ```text
//! cargo run --release -p shopgraph-bench -- --scenario all
//! cargo run --release -p shopgraph-bench -- --smoke --scenario all   # CI
//! ```

/// The tests' throw-away CA, for `--redis-tls`.
#[allow(dead_code)]
#[path = "../../tests/common/certs.rs"]
mod certs;
mod client;
mod direct;
/// The tests' caching proxy, one definition for tests and benchmarks.
#[allow(dead_code)]
#[path = "../../tests/common/nginx.rs"]
mod nginx;
/// The tests' private PostgreSQL clusters (primary, streaming replica).
#[allow(dead_code)]
#[path = "../../tests/common/pg_cluster.rs"]
mod pg_cluster;
mod procfs;
mod report;
mod scenarios;
mod server;

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;

use report::Table;
use server::{Deployment, EnvSpec, Launch, RedisService, Settings, StoreKind, Target};

pub const SCENARIOS: &[(&str, &str)] = &[
    ("create-order", "createOrder throughput and p50/p99 at concurrency 1, 16, 64"),
    ("products", "the products read path at concurrency 1, 16, 64"),
    ("products-proxy", "catalog GETs through a real nginx proxy_cache beside straight to the server"),
    ("products-replica", "uncached catalog reads on a primary, without and with a streaming replica"),
    ("expiry-burst", "expiry lag of 2,000 orders expiring in the same second"),
    ("expiry-pending", "expiry lag of probe orders while 1,000,000 other orders are pending"),
    ("expiry-throughput", "cancellations per second for 50,000 orders expiring in the same second"),
    ("backlog", "time to cancel 100,000 overdue orders after a start"),
    ("websocket", "10,000 subscribers: memory per connection, fan-out lag of 1,000 cancellations"),
    ("fanout", "1,000 admin subscribers x 200 cancellations: fan-out lag"),
    ("resources", "server RSS idle and under load, CPU time per 1,000 orders"),
    ("hostile", "legitimate createOrder and products traffic, calm and under each attack of issue 12"),
];

#[derive(Parser, Debug, Clone)]
#[command(
    name = "shopgraph-bench",
    version,
    about = "Benchmarks shopgraph through its public API and prints markdown tables"
)]
pub struct Opts {
    /// Scenarios, comma separated, or `all`: create-order, products,
    /// products-proxy, products-replica,
    /// expiry-burst, expiry-pending, expiry-throughput, backlog, websocket,
    /// fanout, resources, hostile.
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Short runs (about a second each, small sizes); fails unless every
    /// scenario ran and produced numbers. For CI.
    #[arg(long)]
    pub smoke: bool,
    /// The shopgraph binary to start (`<bin> serve`).
    #[arg(long, default_value = "target/release/shopgraph")]
    pub server_bin: PathBuf,
    /// Do not `cargo build --release --bin shopgraph` before using the default --server-bin.
    #[arg(long)]
    pub no_build: bool,
    /// Measure an already running server instead of starting one (scenarios
    /// that need to configure, restart or seed the server are skipped).
    #[arg(long)]
    pub url: Option<String>,
    /// A second server command (run with `sh -c`, same env vars; it must print
    /// `listening on http://HOST:PORT`), measured through the same scenarios.
    #[arg(long)]
    pub compare: Option<String>,
    /// A second, already running server to compare with.
    #[arg(long)]
    pub compare_url: Option<String>,
    /// Label of the --compare server in the tables.
    #[arg(long, default_value = "compare")]
    pub compare_label: String,
    /// Postgres server on which a fresh database is created per server start.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_url: String,
    /// Stores to measure, comma separated.
    #[arg(long, default_value = "postgres,sqlite")]
    pub stores: String,
    /// Redis to use (each server start gets a fresh REDIS_KEY_PREFIX); by
    /// default a private `redis-server --save "" --appendonly no` on a free port.
    #[arg(long)]
    pub redis_url: Option<String>,
    #[arg(long, default_value = "redis-server")]
    pub redis_server_bin: String,
    /// Start a private Redis Cluster (3 primaries, 1 replica each, with
    /// `redis-cli --cluster create`) instead of one redis-server, and run the
    /// scenarios on it (`REDIS_URL=redis-cluster://…`).
    #[arg(long, conflicts_with = "redis_url")]
    pub redis_cluster: bool,
    #[arg(long, default_value = "redis-cli")]
    pub redis_cli_bin: String,
    /// The private redis-server also listens for TLS, and the servers are
    /// given that port (`rediss://`, `REDIS_TLS_CA_FILE`); the harness's own
    /// writes keep to the plain port.
    #[arg(long, conflicts_with_all = ["redis_url", "redis_cluster"])]
    pub redis_tls: bool,
    #[arg(long, default_value = "bench-admin-token-0123")]
    pub admin_token: String,
    #[arg(long, default_value = "bench-jwt-secret-0123456789abcdef")]
    pub jwt_secret: String,
    /// Extra environment for started servers, KEY=VALUE (repeatable), e.g.
    /// `--server-env DB_MAX_CONNECTIONS=16`.
    #[arg(long = "server-env")]
    pub server_env: Vec<String>,
    /// Seconds measured per load level (default 10, smoke 1).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Concurrency levels of the load scenarios.
    #[arg(long, default_value = "1,16,64")]
    pub concurrency: String,
    /// Products the create-order scenario spreads its orders over (created
    /// through the API; 64 by default).
    #[arg(long)]
    pub products: Option<usize>,
    /// Customers the createOrder load takes in turn (written straight into the database; 32768 by default)
    #[arg(long)]
    pub shoppers: Option<usize>,
    /// Orders expiring in the same second (expiry-burst).
    #[arg(long)]
    pub burst_orders: Option<usize>,
    /// Other pending orders during expiry-pending.
    #[arg(long)]
    pub pending_orders: Option<usize>,
    /// Probe orders of expiry-pending.
    #[arg(long)]
    pub probes: Option<usize>,
    /// Orders expiring in the same second (expiry-throughput).
    #[arg(long)]
    pub throughput_orders: Option<usize>,
    /// Overdue orders of the backlog scenario.
    #[arg(long)]
    pub backlog_orders: Option<usize>,
    /// Websocket subscribers of the websocket scenario.
    #[arg(long)]
    pub ws_subscribers: Option<usize>,
    /// Customers the websocket subscribers are spread over.
    #[arg(long)]
    pub ws_customers: Option<usize>,
    /// Cancellations during the websocket scenario.
    #[arg(long)]
    pub ws_events: Option<usize>,
    /// Admin subscribers of the fanout scenario.
    #[arg(long)]
    pub fanout_subscribers: Option<usize>,
    /// Cancellations of the fanout scenario.
    #[arg(long)]
    pub fanout_events: Option<usize>,
    /// Cancellations per second issued in the websocket and fanout scenarios.
    #[arg(long, default_value_t = 200.0)]
    pub event_rate: f64,
    /// Also write the markdown to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the work directory (server logs, SQLite files) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

/// Sizes of one run: the issue's figures, or small ones for `--smoke`.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub warmup: Duration,
    pub duration: Duration,
    pub levels: Vec<usize>,
    pub customers: usize,
    /// Customers written straight into the database for the order load.
    pub shoppers: usize,
    pub products: usize,
    pub burst: usize,
    pub pending: usize,
    pub probes: usize,
    pub throughput: usize,
    pub backlog: usize,
    pub ws_subscribers: usize,
    pub ws_customers: usize,
    pub ws_events: usize,
    pub fanout_subscribers: usize,
    pub fanout_events: usize,
    pub event_rate: f64,
    pub idle_wait: Duration,
}

impl Sizes {
    fn from(o: &Opts) -> Result<Sizes> {
        let s = o.smoke;
        let pick = |v: Option<usize>, full: usize, smoke: usize| v.unwrap_or(if s { smoke } else { full });
        let levels = o
            .concurrency
            .split(',')
            .map(|x| x.trim().parse::<usize>().context("--concurrency: comma-separated numbers"))
            .collect::<Result<Vec<_>>>()?;
        let duration = Duration::from_secs_f64(o.duration.unwrap_or(if s { 1.0 } else { 10.0 }));
        Ok(Sizes {
            warmup: if s { Duration::from_millis(200) } else { Duration::from_secs(2) },
            duration,
            customers: if s { 8 } else { levels.iter().copied().max().unwrap_or(1) },
            shoppers: pick(o.shoppers, 32_768, 256).max(1),
            levels,
            products: o.products.unwrap_or(64).max(1),
            burst: pick(o.burst_orders, 2_000, 300),
            pending: pick(o.pending_orders, 1_000_000, 20_000),
            probes: pick(o.probes, 100, 10),
            throughput: pick(o.throughput_orders, 50_000, 2_000),
            backlog: pick(o.backlog_orders, 100_000, 5_000),
            ws_subscribers: pick(o.ws_subscribers, 10_000, 300),
            ws_customers: pick(o.ws_customers, 100, 10),
            ws_events: pick(o.ws_events, 1_000, 50),
            fanout_subscribers: pick(o.fanout_subscribers, 1_000, 100),
            fanout_events: pick(o.fanout_events, 200, 20),
            event_rate: o.event_rate,
            idle_wait: if s { Duration::from_secs(1) } else { Duration::from_secs(5) },
        })
    }
}

pub struct Ctx {
    pub opts: Opts,
    pub sizes: Sizes,
    pub targets: Vec<Target>,
    pub stores: Vec<StoreKind>,
    pub redis: RedisService,
    pub http: reqwest::Client,
    pub work_dir: PathBuf,
    server_env: Vec<(String, String)>,
}

impl Ctx {
    pub async fn deploy(&self, target: &Target, spec: &EnvSpec) -> Result<Deployment> {
        let settings = Settings {
            pg_url: &self.opts.pg_url,
            work_dir: &self.work_dir,
            admin_token: &self.opts.admin_token,
            jwt_secret: &self.opts.jwt_secret,
            server_env: &self.server_env,
        };
        let mut spec = spec.clone();
        if self.opts.smoke {
            // a smoke run checks that everything runs, not how late: let the
            // safety-net sweep catch whatever the expiry events miss quickly
            spec.sweep_interval = "2s".into();
        }
        Deployment::up(target, &spec, &self.redis, &settings).await
    }

    /// The stores to run a target on: the configured ones, or the one a
    /// --url server happens to use.
    pub fn stores_for(&self, target: &Target) -> Vec<Option<StoreKind>> {
        if target.is_url() {
            vec![None]
        } else {
            self.stores.iter().copied().map(Some).collect()
        }
    }
}

pub fn case_name(store: Option<StoreKind>) -> &'static str {
    store.map(StoreKind::name).unwrap_or("as running")
}

static STARTED: OnceLock<Instant> = OnceLock::new();

/// A progress line on stderr.
pub fn log(msg: &str) {
    let t = STARTED.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{t:7.1}s] {msg}");
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

async fn machine_header(ctx: &Ctx) -> String {
    let mut s = String::from("## shopgraph-bench run\n\n");
    let mem = command_output("free", &["-g"]);
    let mem_total = mem.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).unwrap_or("?");
    let pg_version = async {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&ctx.opts.pg_url).await.ok()?;
        let v: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut c).await.ok()?;
        Some(v)
    }
    .await
    .unwrap_or_else(|| "unreachable".into());
    let redis_version = async {
        let mut c = server::redis_conn(ctx.redis.nodes.first()?).await.ok()?;
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut c).await.ok()?;
        info.lines().find_map(|l| l.strip_prefix("redis_version:").map(|v| v.trim().to_string()))
    }
    .await
    .unwrap_or_else(|| "?".into());
    // the host's CPU model: the same binary gave ~40 % different CPU per
    // order on two VMs of this project, so results name the model they ran on
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_else(|| "?".into());
    s += &format!(
        "* machine: {} cores (`nproc`) of {cpu_model}, {} GiB RAM (`free -g`), kernel {}\n",
        command_output("nproc", &[]),
        mem_total,
        command_output("uname", &["-r"])
    );
    s += &format!("* load average at start: {}\n", procfs::load_avg());
    s += &format!(
        "* workspace commit: {} (the measured binaries are listed below; --server-bin may be another build)\n",
        command_output("git", &["-C", workspace_root().to_str().unwrap_or("."), "rev-parse", "--short", "HEAD"])
    );
    s += &format!(
        "* PostgreSQL {pg_version}; Redis {redis_version} ({}); {}\n",
        match (ctx.redis.private, ctx.redis.nodes.len()) {
            (true, 1) if ctx.redis.ca_file.is_some() => "private redis-server, the servers over TLS",
            (true, 1) => "private redis-server",
            (true, _) => "private Redis Cluster, 3 primaries + 3 replicas",
            _ => "given --redis-url",
        },
        command_output("rustc", &["--version"])
    );
    for t in &ctx.targets {
        let built = match &t.launch {
            Launch::Binary(p) => std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .map(|t| format!(", built {}", chrono::DateTime::<chrono::Utc>::from(t).format("%Y-%m-%d %H:%M UTC")))
                .unwrap_or_default(),
            _ => String::new(),
        };
        s += &format!("* server `{}`: {:?}{built}\n", t.label, t.launch);
    }
    s += &format!("* sizes: {:?}\n", ctx.sizes);
    s
}

fn build_default_server(opts: &Opts) -> Result<PathBuf> {
    let default = Path::new("target/release/shopgraph");
    if opts.server_bin != default {
        return Ok(opts.server_bin.clone());
    }
    let root = workspace_root();
    if !opts.no_build {
        log("building the server: cargo build --release -p shopgraph --bin shopgraph");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--release", "-p", "shopgraph", "--bin", "shopgraph"])
            .current_dir(&root)
            .status()
            .context("run cargo build")?;
        if !status.success() {
            bail!("cargo build of the server failed");
        }
    }
    let bin = if default.exists() { default.to_path_buf() } else { root.join(default) };
    if !bin.exists() {
        bail!("no server binary at {} (build it or pass --server-bin)", bin.display());
    }
    Ok(std::fs::canonicalize(&bin)?)
}

async fn run() -> Result<bool> {
    let opts = Opts::parse();
    let sizes = Sizes::from(&opts)?;
    let nofile = procfs::raise_nofile();
    log(&format!("open-file limit raised to {nofile} (servers started from here inherit it)"));
    let mut selected: Vec<&str> = Vec::new();
    for s in opts.scenario.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if s == "all" {
            selected.extend(SCENARIOS.iter().map(|(n, _)| *n));
        } else if let Some((n, _)) = SCENARIOS.iter().find(|(n, _)| *n == s) {
            selected.push(n);
        } else {
            bail!(
                "unknown scenario {s:?}; one of: all, {}",
                SCENARIOS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            );
        }
    }
    selected.dedup();
    let stores = opts.stores.split(',').map(StoreKind::parse).collect::<Result<Vec<_>>>()?;
    let server_env = opts
        .server_env
        .iter()
        .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).context("--server-env KEY=VALUE"))
        .collect::<Result<Vec<_>>>()?;

    let mut targets = Vec::new();
    match &opts.url {
        Some(url) => targets.push(Target { label: "shopgraph".into(), launch: Launch::Url(url.clone()) }),
        None => {
            targets.push(Target { label: "shopgraph".into(), launch: Launch::Binary(build_default_server(&opts)?) })
        }
    }
    if let Some(url) = &opts.compare_url {
        targets.push(Target { label: opts.compare_label.clone(), launch: Launch::Url(url.clone()) });
    } else if let Some(cmd) = &opts.compare {
        targets.push(Target { label: opts.compare_label.clone(), launch: Launch::Shell(cmd.clone()) });
    }

    let work_dir = std::env::temp_dir().join(format!("shopgraph-bench-{}", server::short_id()));
    std::fs::create_dir_all(&work_dir)?;
    let redis = if opts.redis_cluster {
        RedisService::start_cluster(&opts.redis_server_bin, &opts.redis_cli_bin).await?
    } else {
        RedisService::start(opts.redis_url.as_deref(), &opts.redis_server_bin, opts.redis_tls).await?
    };
    log(&format!(
        "redis at {} ({}); work dir {}",
        redis.url,
        if redis.private { "private" } else { "shared" },
        work_dir.display()
    ));
    let mut ctx =
        Ctx { opts: opts.clone(), sizes, targets, stores, redis, http: client::http_client(), work_dir, server_env };

    let header = machine_header(&ctx).await;
    println!("{header}");
    let mut markdown = header;
    let mut all: Vec<(String, Vec<Table>, Duration)> = Vec::new();
    for name in &selected {
        let started = Instant::now();
        log(&format!("== {name}"));
        let tables = scenarios::run(name, &ctx).await;
        for t in &tables {
            let md = t.markdown();
            println!("{md}");
            markdown.push_str(&md);
            markdown.push('\n');
        }
        log(&format!("== {name} done in {:.1} s", started.elapsed().as_secs_f64()));
        all.push((name.to_string(), tables, started.elapsed()));
    }
    let footer = format!("load average at end: {}\n", procfs::load_avg());
    println!("{footer}");
    markdown.push_str(&footer);
    if let Some(out) = &ctx.opts.out {
        std::fs::write(out, &markdown).with_context(|| format!("write {}", out.display()))?;
    }

    // every scenario must have run and produced numbers for every target
    let mut passed = 0;
    let mut failed = 0;
    for (name, tables, took) in &all {
        let mut problems = Vec::new();
        if tables.is_empty() || tables.iter().all(|t| t.rows.is_empty()) {
            problems.push("no rows".to_string());
        }
        for t in tables {
            for target in &ctx.targets {
                if !t.rows.iter().any(|r| r.target == target.label) {
                    problems.push(format!("{}: no row for {}", t.title, target.label));
                }
            }
            problems.extend(t.missing());
        }
        if problems.is_empty() {
            passed += 1;
            eprintln!("ok   {name} ({:.1} s)", took.as_secs_f64());
        } else {
            failed += 1;
            eprintln!("FAIL {name} ({:.1} s)", took.as_secs_f64());
            for p in problems.iter().take(10) {
                eprintln!("     {p}");
            }
        }
    }
    let smoke = ctx.opts.smoke;
    ctx.redis.stop().await;
    if !ctx.opts.keep {
        let _ = std::fs::remove_dir_all(&ctx.work_dir);
    } else {
        log(&format!("kept {}", ctx.work_dir.display()));
    }
    println!("bench: {passed} passed, {failed} failed");
    // only a smoke run asserts; a full run reports what it could not measure
    Ok(failed == 0 || !smoke)
}

#[tokio::main]
async fn main() {
    STARTED.get_or_init(Instant::now);
    match run().await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

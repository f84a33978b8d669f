//! What an operator sees running the `shopgraph` binary: the command line
//! and its help, settings refused at start, several processes on one fresh
//! database, the metrics and logs of a fresh server, and a private
//! `redis-server` that dies with its parent.

mod common;

use std::{process::Stdio, time::Duration};

use common::child::{self, ChildServer};

/// The settings every server here runs with: a fresh SQLite file in `dir`,
/// the tests' Redis under a prefix of its own.
async fn settings(dir: &tempfile::TempDir) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", format!("sqlite://{}", dir.path().join("shop.db").display())),
        ("REDIS_URL", common::redis_url().await),
        ("REDIS_KEY_PREFIX", common::unique_prefix()),
    ]
}

async fn ready(server: &ChildServer) {
    let url = format!("{}/readyz", server.url);
    common::eventually(Duration::from_secs(10), || async {
        server.http.get(&url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await
}

/// Three processes started together on one file that does not exist yet:
/// the migrations run once, and all three start and become ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_started_at_once_on_one_fresh_sqlite_file_all_become_ready() {
    let dir = tempfile::tempdir().unwrap();
    let env = settings(&dir).await;
    let (a, b, c) = tokio::join!(ChildServer::start(&env), ChildServer::start(&env), ChildServer::start(&env));
    for server in [&a, &b, &c] {
        ready(server).await;
        assert!(!server.logs().contains("migration failed"), "{}", server.logs());
    }
}

/// Flags before the subcommand are refused, saying which; after it, or
/// with no subcommand (`serve` is the default), they apply.
#[tokio::test]
async fn a_flag_before_the_subcommand_is_refused_and_after_it_applies() {
    let before = child::run_to_exit(&["--order-ttl", "abc", "serve"], &[]).await;
    assert!(!before.status.success(), "{}", before.stderr);
    assert!(
        before.stderr.contains("the subcommand 'serve' cannot be used with '--order-ttl <ORDER_TTL>'"),
        "{}",
        before.stderr
    );
    let valid_before = child::run_to_exit(&["--order-ttl", "2s", "migrate"], &[]).await;
    assert!(valid_before.stderr.contains("cannot be used with '--order-ttl"), "{}", valid_before.stderr);
    for args in [&["serve", "--order-ttl", "abc"][..], &["--order-ttl", "abc"]] {
        let after = child::run_to_exit(args, &[]).await;
        assert_eq!(after.status.code(), Some(2), "{args:?}: {}", after.stderr);
        assert!(after.stderr.contains("ORDER_TTL: invalid duration \"abc\""), "{args:?}: {}", after.stderr);
    }
}

/// `shopgraph serve --help` explains every flag, names its variable and
/// shows its default (or says what leaving it unset means).
#[tokio::test]
async fn every_flag_has_help_its_variable_and_its_default() {
    let help = child::run_to_exit(&["serve", "--help"], &[]).await;
    assert!(help.status.success(), "{}", help.stderr);
    let text = help.stdout;
    // one block per flag: its `--name <VALUE>` line and the lines under it
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    let mut in_options = false;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line == "Options:" {
            in_options = true;
        } else if line.starts_with("-h, --help") {
            break;
        } else if in_options && line.starts_with("--") {
            blocks.push(vec![line]);
        } else if let Some(block) = blocks.last_mut() {
            block.push(line);
        }
    }
    assert!(blocks.len() > 30 && blocks.len() == text.matches("[env: ").count(), "{text}");
    for block in &blocks {
        let flag = block[0].split_whitespace().next().unwrap();
        // help text: after `--name <VALUE>` on its line, or a line that is not `[env: …]`, `[default: …]`
        let same_line = block[0].split_once('>').map(|(_, rest)| rest.trim()).unwrap_or_default();
        let described = !same_line.is_empty() || block[1..].iter().any(|l| !l.starts_with('['));
        let block = block.join(" ");
        assert!(described, "{flag} has no help text:\n{block}");
        assert!(block.contains("[env: "), "{flag} names no variable:\n{block}");
        assert!(block.contains("[default: ") || block.contains("Unset:"), "{flag} shows no default:\n{block}");
    }
    assert!(text.contains("--order-ttl <ORDER_TTL>"), "{text}");
    assert!(text.contains("[default: 30m]"), "{text}");
}

/// An `ORDER_TTL` past 30 days stops the start with one line naming the
/// variable and the bound, instead of panicking in every `createOrder`.
#[tokio::test]
async fn an_order_ttl_over_thirty_days_stops_the_start_naming_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = settings(&dir).await;
    env.push(("ORDER_TTL", "100years".into()));
    let exit = child::run_to_exit(&["serve"], &env).await;
    assert_eq!(exit.status.code(), Some(2), "{}", exit.stderr);
    assert_eq!(exit.stderr.trim(), "error: ORDER_TTL: 100years is too long (at most 30 days)");
}

/// The counters and the histogram alerts watch are on a fresh server's
/// `/metrics` at zero, before anything happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_server_exports_cancellations_and_the_expiry_lag_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&settings(&dir).await).await;
    let m = server.metrics().await;
    for series in [
        "shopgraph_orders_cancelled_total{reason=\"EXPIRED\",source=\"listener\"}",
        "shopgraph_orders_cancelled_total{reason=\"EXPIRED\",source=\"sweep\"}",
        "shopgraph_orders_cancelled_total{reason=\"CUSTOMER\",source=\"customer\"}",
        "shopgraph_orders_cancelled_total{reason=\"ADMIN\",source=\"admin\"}",
        "shopgraph_expiry_lag_seconds_count{source=\"listener\"}",
        "shopgraph_expiry_lag_seconds_count{source=\"sweep\"}",
        "shopgraph_expiry_lag_seconds_bucket{source=\"listener\",le=\"1\"}",
        "shopgraph_outbox_unreadable_rows_total",
    ] {
        assert_eq!(child::metric(&m, series), Some(0.0), "{series} is not there at zero:\n{m}");
    }
}

/// An outbox row that is not an event is said at WARN with its id and
/// counted, not dropped without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_outbox_row_is_logged_with_its_id_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let env = settings(&dir).await;
    let server = ChildServer::start(&env).await;
    let pool = sqlx::SqlitePool::connect(&env[0].1).await.unwrap();
    // older than the relay's grace period, so its next poll claims it
    let created = chrono::Utc::now().timestamp_millis() - 10_000;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (order_id, payload, created_at) VALUES (1, '{\"id\":', ?1) RETURNING id",
    )
    .bind(created)
    .fetch_one(&pool)
    .await
    .unwrap();
    let logs = common::eventually(Duration::from_secs(10), || async {
        let logs = server.logs();
        logs.contains(&format!("outbox row {id} is not an order event")).then_some(logs)
    })
    .await;
    let line = logs.lines().find(|l| l.contains("is not an order event")).unwrap();
    assert!(line.contains("WARN") && line.contains(&format!("outbox_id={id}")), "{line}");
    let m = server.metrics().await;
    assert!(child::metric(&m, "shopgraph_outbox_unreadable_rows_total").unwrap_or(0.0) >= 1.0, "{m}");
}

/// `LISTEN_ADDR` takes a host name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_address_with_a_host_name_is_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = settings(&dir).await;
    env.push(("LISTEN_ADDR", "localhost:0".into()));
    let server = ChildServer::start(&env).await;
    let res = server.http.get(format!("{}/healthz", server.url)).send().await.unwrap();
    assert!(res.status().is_success(), "{}", server.url);
}

/// Logs written to a file (stderr is not a terminal) carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_carry_no_escape_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&settings(&dir).await).await;
    let logs = server.logs();
    assert!(logs.contains("shopgraph built"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "ANSI escapes in a log file:\n{logs:?}");
}

/// The private `redis-server` shopgraph starts when no Redis answers is
/// killed with it, even by SIGKILL (no drop, no shutdown runs). The server
/// runs in a network namespace of its own, where nothing answers on
/// 127.0.0.1:6379, so it has to start one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_redis_server_does_not_outlive_a_sigkilled_shopgraph() {
    let isolated = std::process::Command::new("unshare")
        .args(["--net", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !isolated {
        common::skipped("needs `unshare --net` (root) for a network namespace without Redis");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("shop.db").display());
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--net", "sh", "-c", "ip link set lo up && exec \"$0\" serve", child::BIN]);
    let mut shopgraph = child::command(cmd, &[("DATABASE_URL", db)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _stop = KillOnDrop(vec![shopgraph.id()]);
    let stdout = shopgraph.stdout.take().unwrap();
    let listening = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.starts_with("listening on "))
    });
    let listening = tokio::time::timeout(Duration::from_secs(30), listening).await;
    let redis = children(shopgraph.id(), "redis-server");
    let _cleanup = KillOnDrop(redis.clone());
    assert!(matches!(listening, Ok(Ok(true))), "shopgraph did not start in its namespace");
    assert_eq!(redis.len(), 1, "shopgraph started no private redis-server");
    shopgraph.kill().unwrap();
    shopgraph.wait().unwrap();
    common::eventually(Duration::from_secs(5), || async { (!alive(redis[0])).then_some(()) }).await;
}

/// Processes whose parent is `parent` and whose command is `name`.
fn children(parent: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid …`; comm may hold spaces, so split after its `)`
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if comm == name && ppid == Some(parent) {
            found.push(pid);
        }
    }
    found
}

/// Running (a zombie waiting to be reaped has stopped running).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned)))
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Kills what a failed test would otherwise leave running.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            if alive(*pid) {
                let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

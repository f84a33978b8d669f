//! What an operator sees running the `shopgraph` binary: the command line
//! and its help, settings refused at start, several processes on one fresh
//! database, the metrics and logs of a fresh server, and a private
//! `redis-server` that dies with its parent.

mod common;

use std::time::Duration;

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

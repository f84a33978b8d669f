//! The test harness: a real shopgraph on a free port, with its own database
//! (a fresh SQLite file, or a fresh Postgres database on the server at
//! `TEST_DATABASE_URL`) and its own `REDIS_KEY_PREFIX`, driven over HTTP and
//! websockets like any client.
#![allow(dead_code)]

pub mod certs;
pub mod child;
pub mod client;
pub mod nginx;
pub mod pg_cluster;
pub mod redis;
pub mod sentinel;
pub mod ws;

use std::{future::Future, sync::Arc, time::Duration};

use serde_json::Value;
use shopgraph::{orders::Orders, store::Store, App, Config};
use tokio::sync::oneshot;

pub use client::Client;

pub const ADMIN: &str = "test-admin-token";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789";
/// The `METRICS_TOKEN` of every test server.
pub const METRICS_TOKEN: &str = "test-metrics-token-0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one test, removed when this drops (when the test ends,
/// passed or failed): the SQLite file's temp dir, or the Postgres database.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// The Postgres database to drop, on the server at `TEST_DATABASE_URL`.
    pg_name: Option<String>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (Some(name), Some(base)) = (self.pg_name.take(), postgres_url()) else { return };
        // Drop is synchronous and may run inside the test's runtime: a
        // thread of its own with its own runtime does the async work.
        // FORCE ends the connections a server under test still holds.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async {
                use sqlx::Connection;
                let work = async {
                    let mut conn = sqlx::PgConnection::connect(&base).await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&mut conn)
                        .await
                };
                match tokio::time::timeout(Duration::from_secs(10), work).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("{name}: {e}")),
                    Err(_) => Err(format!("{name}: timed out")),
                }
            })
        })
        .join();
        if let Ok(Err(e)) | Err(e) = dropped.map_err(|_| "the dropping thread panicked".to_string()) {
            say(&format!("could not drop the test database {e}"));
        }
    }
}

/// The Postgres server for tests, or `None`.
pub fn postgres_url() -> Option<String> {
    std::env::var("TEST_DATABASE_URL").ok().filter(|s| !s.is_empty())
}

/// True (after saying so) when `TEST_DATABASE_URL` is unset: the calling
/// Postgres test returns at once.
pub fn skip_without_postgres() -> bool {
    let skip = postgres_url().is_none();
    if skip {
        skipped("TEST_DATABASE_URL unset");
    }
    skip
}

/// Says that the running test is skipped, and why, with a `SKIPPED:` line
/// on the process's stderr. The harness captures `eprintln!` of passing
/// tests, so a skip said that way would read as a plain `ok`.
pub fn skipped(why: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    say(&format!("SKIPPED: {test}: {why}"));
}

/// One line straight to stderr, past the harness's capture.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

pub async fn fresh_db(backend: Backend) -> TestDb {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("test.db").display());
            TestDb { url, _dir: Some(dir), pg_name: None }
        }
        Backend::Postgres => {
            let base = postgres_url().expect("TEST_DATABASE_URL");
            let name = format!("shopgraph_test_{}", uuid::Uuid::new_v4().simple());
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect to TEST_DATABASE_URL");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await
                .expect("create test database");
            let mut url = url::Url::parse(&base).expect("TEST_DATABASE_URL is a URL");
            url.set_path(&name);
            TestDb { url: url.to_string(), _dir: None, pg_name: Some(name) }
        }
    }
}

/// The Redis for tests: `REDIS_URL`, the default address, or one private
/// `redis-server` per test process.
pub async fn redis_url() -> String {
    static URL: tokio::sync::OnceCell<(String, Option<shopgraph::redis::server::PrivateRedis>)> =
        tokio::sync::OnceCell::const_new();
    let (url, _) = URL
        .get_or_init(|| async {
            let configured = std::env::var("REDIS_URL").ok();
            shopgraph::redis::server::resolve(configured.as_deref()).await.expect("a Redis for tests")
        })
        .await;
    url.clone()
}

pub fn unique_prefix() -> String {
    format!("test-{}:", uuid::Uuid::new_v4().simple())
}

/// An in-process server; its [`Client`] (`url`, `ws_url`, `http` and the
/// request helpers) through `Deref`.
pub struct TestApp {
    pub client: Client,
    pub addr: std::net::SocketAddr,
    pub store: Arc<dyn Store>,
    /// The domain the server runs, for tests that drive a background step
    /// (`sweep_once`) themselves.
    pub orders: Arc<Orders>,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _db: Option<Arc<TestDb>>,
}

/// A configuration for tests: port 0, short TTL, long sweep (so that
/// listener behaviour is what is observed unless a test shortens it).
pub async fn test_config(db_url: &str) -> Config {
    Config {
        database_url: db_url.to_string(),
        redis_url: Some(redis_url().await),
        redis_key_prefix: unique_prefix(),
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        order_ttl: Duration::from_secs(60),
        sweep_interval: Duration::from_secs(3600),
        admin_token: Some(shopgraph::config::Secret(ADMIN.into())),
        jwt_secret: Some(shopgraph::config::Secret(JWT_SECRET.into())),
        auth_rate_limit_per_minute: 10_000,
        // abuse limits are off unless a test is about them (tests/hostile/abuse.rs)
        login_rate_limit_per_account: 10_000,
        max_pending_orders: 1_000_000,
        max_pending_units: 1_000_000_000,
        order_rate_limit_per_minute: 1_000_000,
        metrics_token: Some(shopgraph::config::Secret(METRICS_TOKEN.into())),
        ..Config::default()
    }
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_app_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let db = Arc::new(fresh_db(backend).await);
    let mut config = test_config(&db.url).await;
    tweak(&mut config);
    let mut app = start(config).await;
    app._db = Some(db);
    app
}

/// Starts a server from a complete config (e.g. a second instance).
pub async fn start(config: Config) -> TestApp {
    let app = App::build(config.clone()).await.expect("app builds");
    let addr = app.addr;
    let store = app.store.clone();
    let orders = app.orders.clone();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    TestApp {
        client: Client::new(format!("http://{addr}")),
        addr,
        store,
        orders,
        config,
        stop: Some(tx),
        handle: Some(handle),
        _db: None,
    }
}

impl TestApp {
    /// Another instance on the same database and Redis prefix.
    pub async fn sibling(&self) -> TestApp {
        let mut config = self.config.clone();
        config.listen_addr = "127.0.0.1:0".parse().unwrap();
        let mut app = start(config).await;
        app._db = self._db.clone();
        app
    }

    /// Stops this server and starts another on the same database with its
    /// configuration changed: for a test on both stores whose server needs
    /// something made first (a private Redis), which a tweak given to
    /// `both_stores!` cannot start.
    pub async fn restart_with(mut self, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let mut config = self.config.clone();
        tweak(&mut config);
        let db = self._db.take();
        self.stop().await;
        let mut app = start(config).await;
        app._db = db;
        app
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), h).await;
        }
    }
}

impl std::ops::Deref for TestApp {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// The `extensions.code` of the first error.
pub fn code(v: &Value) -> &str {
    v["errors"][0]["extensions"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {v}"))
}

/// Waits until `check` returns `Some`, polling every 20 ms, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not reached within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs each test body against SQLite and Postgres (the Postgres half is
/// skipped, with a `SKIPPED:` line, when `TEST_DATABASE_URL` is not set).
/// Each body gets a fresh [`TestApp`]; `with <tweak>` changes the test
/// configuration first (a closure on `&mut Config`):
///
/// ```ignore
/// both_stores! {
///     plain => |app: TestApp| async move { /* … */ };
///     short_ttl with |c| c.order_ttl = Duration::from_secs(1) => |app: TestApp| async move { /* … */ };
/// }
/// ```
///
/// The tests land in modules `sqlite` and `postgres`, so a file (or module)
/// says it once.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident $(with $tweak:expr)? => $body:expr;)+) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let app = $crate::common::spawn_app_with(
                        $crate::common::Backend::Sqlite,
                        $crate::both_stores!(@tweak $($tweak)?),
                    )
                    .await;
                    ($body)(app).await;
                }
            )+
        }
        mod postgres {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::common::skip_without_postgres() {
                        return;
                    }
                    let app = $crate::common::spawn_app_with(
                        $crate::common::Backend::Postgres,
                        $crate::both_stores!(@tweak $($tweak)?),
                    )
                    .await;
                    ($body)(app).await;
                }
            )+
        }
    };
    (@tweak) => { |_: &mut shopgraph::Config| {} };
    (@tweak $tweak:expr) => { $tweak };
}

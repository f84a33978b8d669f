//! TLS to Redis and PostgreSQL, against real servers that speak TLS only,
//! with a CA and certificates generated per test run by the `openssl` CLI:
//! `rediss://` with `REDIS_TLS_CA_FILE`, and libpq's `sslmode` /
//! `sslrootcert` on `DATABASE_URL`.

mod common;

use std::time::Duration;

use common::{
    certs::{generate_certs, Certs},
    pg_cluster::{PrivatePostgres, ServerTls},
    redis::{PrivateRedis, TlsFiles},
    ws::WsClient,
    Backend, TestApp, ADMIN,
};
use serde_json::{json, Value};

async fn tls_redis(certs: &Certs) -> PrivateRedis {
    let (cert, key, ca) = (certs.cert("good"), certs.key("good"), certs.ca());
    PrivateRedis::start_tls(TlsFiles { cert: &cert, key: &key, ca: &ca }, &[]).await
}

const CANCELLED_SUB: &str = "subscription { orderCancelled { reason order { id status } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_to_redis_an_order_expires_and_is_cancelled_with_its_event() {
    let certs = generate_certs();
    let redis = tls_redis(&certs).await;
    let (url, ca) = (redis.url.clone(), certs.ca());
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        c.redis_tls_ca_file = Some(ca);
        c.order_ttl = Duration::from_secs(1);
    })
    .await;
    app.wait_ready().await;
    let ready: Value = app.http.get(format!("{}/readyz", app.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["redis"], "up", "{ready}");

    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let mut ws = WsClient::init(&app.ws_url, "graphql-transport-ws", Some(ADMIN)).await;
    ws.subscribe("all", CANCELLED_SUB, json!({})).await;
    ws.send(json!({"type": "ping"})).await;
    let id = app.order_id(&token, &[(&a, 2)]).await;
    // the sweep is an hour away: the keyspace event (over TLS) cancels it
    let events = ws.cancellations_until(Duration::from_secs(5), |seen| !seen.is_empty()).await;
    assert_eq!(events[&id]["reason"], "EXPIRED");
    let o = app.order(ADMIN, &id).await;
    let lag = chrono::DateTime::parse_from_rfc3339(o["cancelledAt"].as_str().unwrap()).unwrap()
        - chrono::DateTime::parse_from_rfc3339(o["expiresAt"].as_str().unwrap()).unwrap();
    assert!(lag.num_milliseconds() < 1000, "cancelled {lag} after the deadline");
    assert_eq!(app.stock(&a).await, 10);
    let ready: Value = app.http.get(format!("{}/readyz", app.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["expiryEvents"], "arriving", "{ready}");
    app.stop().await;
}

/// The binary, configured by environment variables as a deployment is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_rediss_and_redis_tls_ca_file_from_the_environment() {
    let certs = generate_certs();
    let redis = tls_redis(&certs).await;
    let dir = tempfile::tempdir().unwrap();
    let server = common::child::ChildServer::start(&[
        ("DATABASE_URL", format!("sqlite://{}", dir.path().join("t.db").display())),
        ("REDIS_URL", redis.url.clone()),
        ("REDIS_TLS_CA_FILE", certs.ca().display().to_string()),
        ("REDIS_KEY_PREFIX", common::unique_prefix()),
    ])
    .await;
    common::eventually(Duration::from_secs(10), || async {
        let res = server.http.get(format!("{}/readyz", server.url)).send().await.ok()?;
        let ok = res.status().is_success();
        let body: Value = res.json().await.ok()?;
        (ok && body["listener"] == "up" && body["events"] == "up").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_file_the_start_fails_naming_the_setting() {
    let certs = generate_certs();
    let redis = tls_redis(&certs).await;
    let db = common::fresh_db(Backend::Sqlite).await;
    let mut config = common::test_config(&db.url).await;
    config.redis_url = Some(redis.url.clone());
    let err = match shopgraph::App::build(config).await {
        Ok(_) => panic!("started against a Redis whose certificate nothing trusts"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("REDIS_URL: cannot reach Redis at rediss://127.0.0.1:"), "{err}");
    assert!(err.contains("REDIS_TLS_CA_FILE"), "the error names the fix: {err}");
}

/// A plain `redis://` client to a TLS-only server is told to use `rediss://`
/// rather than left with a bare connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_redis_to_a_tls_only_server_fails_at_start() {
    let certs = generate_certs();
    let redis = tls_redis(&certs).await;
    let db = common::fresh_db(Backend::Sqlite).await;
    let mut config = common::test_config(&db.url).await;
    config.redis_url = Some(redis.url.replacen("rediss://", "redis://", 1));
    let err = match tokio::time::timeout(Duration::from_secs(10), shopgraph::App::build(config)).await {
        Ok(Ok(_)) => panic!("a plain client talked to a TLS-only server"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("the start hung instead of failing"),
    };
    assert!(err.starts_with("REDIS_URL: cannot reach Redis"), "{err}");
}

/// A private PostgreSQL with `ssl=on` that refuses TCP clients without TLS,
/// serving the certificate `name`; `None` where private clusters cannot run.
async fn tls_postgres(certs: &Certs, name: &str) -> Option<PrivatePostgres> {
    let (cert, key) = (certs.read(&certs.cert(name)), certs.read(&certs.key(name)));
    let pg = PrivatePostgres::start_with_tls(ServerTls { cert_pem: &cert, key_pem: &key, tls_only: true }).await;
    if pg.is_none() {
        common::skipped("private PostgreSQL clusters need root and the PostgreSQL 15 binaries");
    }
    pg
}

fn with_params(url: &str, params: &str) -> String {
    format!("{url}?{params}")
}

/// Builds the whole app on `database_url` and places and pays an order.
async fn works_on(database_url: &str) {
    let config = common::test_config(database_url).await;
    let app: TestApp = common::start(config).await;
    let a = app.create_product(&uuid::Uuid::new_v4().simple().to_string(), 100, 10).await;
    let (token, _) = app.customer().await;
    let id = app.order_id(&token, &[(&a, 3)]).await;
    assert_eq!(app.pay(&token, &id).await["data"]["payOrder"]["status"], "PAID");
    assert_eq!(app.stock(&a).await, 7);
    app.stop().await;
}

async fn start_error(database_url: &str) -> String {
    let config = common::test_config(database_url).await;
    match tokio::time::timeout(Duration::from_secs(30), shopgraph::App::build(config)).await {
        Ok(Ok(_)) => panic!("started on {database_url}"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("the start hung on {database_url}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_with_verify_full_and_require() {
    let certs = generate_certs();
    let Some(pg) = tls_postgres(&certs, "good").await else { return };
    let ca = certs.ca().display().to_string();
    works_on(&with_params(&pg.url, &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    works_on(&with_params(&pg.url, "sslmode=require")).await;
    // the server takes TLS only, so the two above really used it
    let err = start_error(&with_params(&pg.url, "sslmode=disable")).await;
    assert!(err.starts_with("DATABASE_URL:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_refuses_a_certificate_for_another_host() {
    let certs = generate_certs();
    let Some(pg) = tls_postgres(&certs, "wrong").await else { return };
    let ca = certs.ca().display().to_string();
    let err = start_error(&with_params(&pg.url, &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    assert!(err.starts_with("DATABASE_URL:"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "the error says it is the certificate: {err}");
    // the chain itself is good: verify-ca (no host name check) accepts it
    works_on(&with_params(&pg.url, &format!("sslmode=verify-ca&sslrootcert={ca}"))).await;
}

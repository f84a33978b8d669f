//! `DATABASE_READ_URL`: the public catalog is read from a real streaming
//! replica (`pg_basebackup -R` of a private primary); orders and what a
//! customer just wrote stay on the primary; a replica that lags too far or
//! stops sends catalog reads back to the primary.

mod common;

use std::time::Duration;

use common::{eventually, pg_cluster::PrivatePostgres, TestApp, ADMIN};
use serde_json::{json, Value};
use sqlx::Connection;

async fn catalog_stock(app: &TestApp, product: &str) -> Option<i64> {
    let v = app.gql(None, "query($id: ID!) { product(id: $id) { stock } }", json!({"id": product})).await;
    assert!(v.get("errors").is_none(), "{v}");
    v["data"]["product"]["stock"].as_i64()
}

async fn page_stocks(app: &TestApp) -> Vec<i64> {
    let v = app.data(None, "{ products { nodes { stock } } }", json!({})).await;
    v["products"]["nodes"].as_array().unwrap().iter().map(|n| n["stock"].as_i64().unwrap()).collect()
}

async fn replica_state(app: &TestApp) -> (u16, Value) {
    let res = app.http.get(format!("{}/readyz", app.url)).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

async fn on_replica(replica: &PrivatePostgres, sql: &str) {
    let mut conn = sqlx::PgConnection::connect(&replica.url).await.expect("connect to the replica");
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut conn).await.expect(sql);
}

async fn start(primary: &PrivatePostgres, replica: &PrivatePostgres, max_lag: Duration) -> TestApp {
    let mut config = common::test_config(&primary.url).await;
    config.database_read_url = Some(shopgraph::config::Secret(replica.url.clone()));
    config.database_read_max_lag = max_lag;
    common::start(config).await
}

async fn replica_becomes(app: &TestApp, state: &str) {
    eventually(Duration::from_secs(10), || async {
        (replica_state(app).await.1["readReplica"] == state).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_reads_from_the_replica_and_falls_back_to_the_primary() {
    let Some(primary) = PrivatePostgres::start().await else {
        common::skipped("needs root and the PostgreSQL 15 binaries for a private cluster");
        return;
    };
    // the primary must be migrated before the copy is taken: the replica is read-only
    let app = common::start(common::test_config(&primary.url).await).await;
    let p = app.create_product("REP", 100, 10).await;
    app.stop().await;
    let mut replica = PrivatePostgres::replica_of(&primary).await.expect("a replica");
    let app = start(&primary, &replica, Duration::from_secs(60)).await;
    replica_becomes(&app, "up").await;
    assert_eq!(catalog_stock(&app, &p).await, Some(10));

    // with replay paused, the catalog shows what the replica has, while an
    // order and everything read through it come from the primary
    on_replica(&replica, "SELECT pg_wal_replay_pause()").await;
    let restocked = app
        .data(Some(ADMIN), "mutation($id: ID!) { restockProduct(id: $id, quantity: 5) { stock } }", json!({"id": p}))
        .await;
    assert_eq!(restocked["restockProduct"]["stock"], 15, "the admin's write answers from the primary");
    let (token, _) = app.customer().await;
    let order = app.order_id(&token, &[(&p, 3)]).await;
    let mine = app.order(&token, &order).await;
    assert_eq!(mine["status"], "PENDING_PAYMENT", "{mine}");
    let q = "query($id: ID!) { order(id: $id) { lines { product { stock } } } }";
    let seen = app.data(Some(&token), q, json!({"id": order})).await;
    assert_eq!(seen["order"]["lines"][0]["product"]["stock"], 12, "an order's products are read from the primary");
    let state = replica_state(&app).await.1;
    assert_eq!(catalog_stock(&app, &p).await, Some(10), "the catalog is served by the (paused) replica: {state}");
    assert_eq!(page_stocks(&app).await, vec![10]);

    // a second instance with a 1 s bound sees the lag and reads the primary
    let strict = start(&primary, &replica, Duration::from_secs(1)).await;
    eventually(Duration::from_secs(10), || async { (catalog_stock(&strict, &p).await == Some(12)).then_some(()) })
        .await;
    assert_eq!(page_stocks(&strict).await, vec![12]);
    let (status, body) = replica_state(&strict).await;
    assert_eq!((status, body["readReplica"].as_str()), (200, Some("down")), "{body}");

    // replay resumes: the replica catches up and serves both again
    on_replica(&replica, "SELECT pg_wal_replay_resume()").await;
    eventually(Duration::from_secs(10), || async { (catalog_stock(&app, &p).await == Some(12)).then_some(()) }).await;
    replica_becomes(&strict, "up").await;

    // the replica stops: catalog reads are answered from the primary at once
    replica.stop().await;
    let restocked = app
        .data(Some(ADMIN), "mutation($id: ID!) { restockProduct(id: $id, quantity: 1) { stock } }", json!({"id": p}))
        .await;
    assert_eq!(restocked["restockProduct"]["stock"], 13);
    for app in [&app, &strict] {
        assert_eq!(catalog_stock(app, &p).await, Some(13));
        assert_eq!(page_stocks(app).await, vec![13]);
        let (status, body) = replica_state(app).await;
        assert_eq!((status, body["readReplica"].as_str()), (200, Some("down")), "{body}");
    }
    strict.stop().await;
    app.stop().await;
}

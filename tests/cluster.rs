//! shopgraph on a Redis Cluster (3 primaries, 1 replica each, started per
//! test): orders on every deadline shard expire on time, once each; paying
//! works; events reach a second instance over sharded pub/sub; and a
//! primary SIGKILLed with orders pending loses no cancellation and
//! publishes no event twice.

mod common;
#[path = "common/cluster.rs"]
mod redis_cluster;

use std::{collections::HashMap, time::Duration};

use common::{ws::WsClient, Backend, TestApp, ADMIN};
use redis_cluster::RedisCluster;
use serde_json::{json, Value};
use shopgraph::expiry::schedule::SHARDS;

const CANCELLED_SUB: &str = "subscription { orderCancelled { reason cancelledAt order { id status } } }";

async fn watcher(app: &TestApp) -> WsClient {
    let mut ws = WsClient::init(&app.ws_url, "graphql-transport-ws", Some(ADMIN)).await;
    ws.subscribe("all", CANCELLED_SUB, json!({})).await;
    // as in tests/expiry.rs: the events waited for come from orders placed
    // after this, with a TTL of seconds
    ws.barrier().await;
    ws
}

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap().with_timezone(&chrono::Utc)
}

async fn on_cluster(cluster: &RedisCluster, tweak: impl FnOnce(&mut shopgraph::config::Config)) -> TestApp {
    let url = cluster.url();
    common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        tweak(c);
    })
    .await
}

/// Until `/readyz` says the listener is up on every primary and events arrive.
async fn ready(app: &TestApp) {
    common::eventually(Duration::from_secs(20), || async {
        let r = app.http.get(format!("{}/readyz", app.url)).send().await.ok()?;
        let ok = r.status() == 200;
        let body: Value = r.json().await.ok()?;
        (ok && body["expiryEvents"] == "arriving").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_on_every_shard_expire_on_time_once_each() {
    let cluster = RedisCluster::start().await;
    let app = on_cluster(&cluster, |c| c.order_ttl = Duration::from_secs(2)).await;
    ready(&app).await;
    let a = app.create_product("A", 100, 1000).await;
    let (token, _) = app.customer().await;
    let mut ws = watcher(&app).await;
    // consecutive ids: every shard twice
    let n = 2 * usize::from(SHARDS);
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(app.order_id(&token, &[(&a, 3)]).await);
    }
    assert_eq!(app.stock(&a).await, 1000 - 3 * n as i64);
    let events = ws.cancellations_until(Duration::from_secs(10), |seen| seen.len() >= n).await;
    for id in &ids {
        assert_eq!(events[id]["reason"], "EXPIRED", "{id}");
        let o = app.order(ADMIN, id).await;
        assert_eq!(o["status"], "CANCELLED");
        let lag = time(&o["cancelledAt"]) - time(&o["expiresAt"]);
        assert!(lag.num_milliseconds() < 1000, "{id} cancelled {lag} after its deadline");
    }
    assert_eq!(app.stock(&a).await, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_order_stays_paid_and_leaves_no_deadline_behind() {
    let cluster = RedisCluster::start().await;
    let app = on_cluster(&cluster, |c| {
        c.order_ttl = Duration::from_secs(1);
        c.sweep_interval = Duration::from_millis(300);
    })
    .await;
    ready(&app).await;
    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let paid = app.order_id(&token, &[(&a, 2)]).await;
    assert_eq!(app.pay(&token, &paid).await["data"]["payOrder"]["status"], "PAID");
    let mut ws = watcher(&app).await;
    let unpaid = app.order_id(&token, &[(&a, 1)]).await;
    let events = ws.cancellations_until(Duration::from_secs(5), |seen| !seen.is_empty()).await;
    assert_eq!(events.keys().collect::<Vec<_>>(), vec![&unpaid]);
    assert_eq!(app.order(ADMIN, &paid).await["status"], "PAID");
    assert_eq!(app.stock(&a).await, 8);
    // the paid order's key and deadline are gone from its shard
    let keys = shopgraph::expiry::schedule::Keys { prefix: app.config.redis_key_prefix.clone() };
    let id = shopgraph::domain::OrderId(paid.trim_start_matches("ord_").parse().unwrap());
    let port = cluster.owner_of(&keys.order(id)).await;
    let mut conn = cluster.node_conn(port).await;
    let exists: bool = redis::cmd("EXISTS").arg(keys.order(id)).query_async(&mut conn).await.unwrap();
    let score: Option<i64> = redis::cmd("ZSCORE")
        .arg(keys.deadlines(shopgraph::expiry::schedule::Shard::of(id)))
        .arg(id.0)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((exists, score), (false, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_sees_the_events_over_sharded_pubsub() {
    let cluster = RedisCluster::start().await;
    let app = on_cluster(&cluster, |c| c.order_ttl = Duration::from_secs(2)).await;
    let sibling = app.sibling().await;
    ready(&app).await;
    ready(&sibling).await;
    let a = app.create_product("A", 100, 100).await;
    let (token, _) = app.customer().await;
    let mut there = watcher(&sibling).await;
    let mut here = watcher(&app).await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(app.order_id(&token, &[(&a, 1)]).await);
    }
    let paid = app.order_id(&token, &[(&a, 1)]).await;
    app.pay(&token, &paid).await;
    // orderUpdated on the sibling: the current state, then the change made on `app`
    let cancelled = app.order_id(&token, &[(&a, 1)]).await;
    let mut updates = WsClient::init(&sibling.ws_url, "graphql-transport-ws", Some(ADMIN)).await;
    updates
        .subscribe("u", "subscription($id: ID!) { orderUpdated(orderId: $id) { status } }", json!({ "id": cancelled }))
        .await;
    assert_eq!(updates.next_data("u").await["data"]["orderUpdated"]["status"], "PENDING_PAYMENT");
    app.cancel(&token, &cancelled).await;
    assert_eq!(updates.next_data("u").await["data"]["orderUpdated"]["status"], "CANCELLED");
    ids.push(cancelled);
    for ws in [&mut there, &mut here] {
        let events: HashMap<String, Value> = ws.cancellations_until(Duration::from_secs(10), |s| s.len() >= 9).await;
        for id in &ids {
            assert!(events.contains_key(id), "no event for {id}");
        }
    }
    assert_eq!(app.stock(&a).await, 99);
}

/// One primary SIGKILLed while orders are pending (the one that serves the
/// events channel, so the fan-out must follow too), its replica promoted:
/// every order is cancelled, one event each on both instances, stock exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_primary_loses_no_cancellation_and_publishes_nothing_twice() {
    let mut cluster = RedisCluster::start().await;
    let app = on_cluster(&cluster, |c| {
        c.order_ttl = Duration::from_secs(4);
        c.sweep_interval = Duration::from_secs(3);
    })
    .await;
    let sibling = app.sibling().await;
    ready(&app).await;
    ready(&sibling).await;
    let a = app.create_product("A", 100, 1000).await;
    let (token, _) = app.customer().await;
    let mut there = watcher(&sibling).await;
    let mut here = watcher(&app).await;
    let n = 3 * usize::from(SHARDS);
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(app.order_id(&token, &[(&a, 2)]).await);
    }
    let victim = cluster.owner_of(&format!("{}events", app.config.redis_key_prefix)).await;
    cluster.kill(victim);
    cluster.wait_failover(victim).await;
    for ws in [&mut there, &mut here] {
        let events = ws.cancellations_until(Duration::from_secs(30), |s| s.len() >= n).await;
        for id in &ids {
            assert_eq!(events[id]["reason"], "EXPIRED", "{id}");
        }
    }
    for id in &ids {
        assert_eq!(app.order(ADMIN, id).await["status"], "CANCELLED", "{id}");
    }
    assert_eq!(app.stock(&a).await, 1000);
    // the promoted primary was told to send expired-key events
    ready(&app).await;
}

/// On a single Redis: orders scheduled by a server from before the sharded
/// layout (`<prefix>order:<id>` in `<prefix>deadlines`) still expire on
/// time after the upgrade, through the nudger's drain of the old index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_in_the_layout_before_sharding_still_expire_on_time() {
    use shopgraph::{domain::OrderId, expiry::schedule::Shard};
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.order_ttl = Duration::from_secs(3)).await;
    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let id = app.order_id(&token, &[(&a, 2)]).await;
    let deadline = time(&app.order(ADMIN, &id).await["expiresAt"]).timestamp_millis();
    // rewrite its expiry as a server before sharding wrote it (this server's
    // nudger looks at the old index only at start, and the deadline is ahead)
    let keys = shopgraph::expiry::schedule::Keys { prefix: app.config.redis_key_prefix.clone() };
    let order = OrderId(id.trim_start_matches("ord_").parse().unwrap());
    let client = redis::Client::open(app.config.redis_url.clone().unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let legacy = keys.order_in(Shard::Legacy, order);
    let _: () = redis::pipe()
        .atomic()
        .del(keys.order(order))
        .zrem(keys.deadlines(Shard::of(order)), order.0)
        .hset(&legacy, "customer", "cus_1")
        .pexpire_at(&legacy, deadline)
        .zadd(keys.deadlines(Shard::Legacy), order.0, deadline)
        .query_async(&mut conn)
        .await
        .unwrap();
    // the upgraded server starts
    let app = app.restart_with(|_| {}).await;
    let mut ws = watcher(&app).await;
    let events = ws.cancellations_until(Duration::from_secs(6), |s| !s.is_empty()).await;
    assert_eq!(events[&id]["reason"], "EXPIRED");
    let o = app.order(ADMIN, &id).await;
    let lag = time(&o["cancelledAt"]) - time(&o["expiresAt"]);
    assert!(lag.num_milliseconds() < 1000, "cancelled {lag} after its deadline");
    assert_eq!(app.stock(&a).await, 10);
    let left: bool = redis::cmd("EXISTS").arg(keys.deadlines(Shard::Legacy)).query_async(&mut conn).await.unwrap();
    assert!(!left, "the old index is drained");
}

/// `rediss-cluster://` with `REDIS_TLS_CA_FILE`: every connection (commands,
/// each primary's keyspace events, sharded order events) over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_orders_expire_on_every_shard_and_events_reach_a_second_instance() {
    let certs = common::certs::generate_certs();
    let tls = redis_cluster::Tls { cert: certs.cert("good"), key: certs.key("good"), ca: certs.ca() };
    let cluster = RedisCluster::start_tls(tls.clone()).await;
    assert!(cluster.url().starts_with("rediss-cluster://"));
    let app = on_cluster(&cluster, |c| {
        c.order_ttl = Duration::from_secs(2);
        c.redis_tls_ca_file = Some(tls.ca.clone());
    })
    .await;
    let sibling = app.sibling().await;
    ready(&app).await;
    ready(&sibling).await;
    let a = app.create_product("A", 100, 100).await;
    let (token, _) = app.customer().await;
    let mut there = watcher(&sibling).await;
    let n = usize::from(SHARDS);
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(app.order_id(&token, &[(&a, 1)]).await);
    }
    let events = there.cancellations_until(Duration::from_secs(10), |s| s.len() >= n).await;
    for id in &ids {
        assert_eq!(events[id]["reason"], "EXPIRED", "{id}");
        let o = app.order(ADMIN, id).await;
        let lag = time(&o["cancelledAt"]) - time(&o["expiresAt"]);
        assert!(lag.num_milliseconds() < 1000, "{id} cancelled {lag} after its deadline");
    }
    assert_eq!(app.stock(&a).await, 100);
}

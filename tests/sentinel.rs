//! Redis Sentinel with real processes (a primary, a replica, three
//! sentinels; tests/common/sentinel.rs): the server starts on a
//! `redis-sentinel://` URL and expires orders on time; a SIGKILLed primary
//! with orders pending loses no cancellation, publishes none twice and the
//! server carries on against the promoted replica; a bad URL or unreachable
//! sentinels stop the start with one clear line.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use common::{
    sentinel::{SentinelSet, MASTER},
    ws::WsClient,
    Backend, ADMIN,
};
use serde_json::{json, Value};
use shopgraph::{config::ConfigArgs, App};

const CANCELLED_SUB: &str =
    "subscription { orderCancelled { reason cancelledAt order { id status expiresAt cancelReason } } }";

/// An admin subscriber to every cancellation (see tests/faults.rs).
async fn watcher(ws_url: &str) -> WsClient {
    let mut ws = WsClient::init(ws_url, "graphql-transport-ws", Some(ADMIN)).await;
    ws.subscribe("all", CANCELLED_SUB, json!({})).await;
    ws.barrier().await;
    ws
}

fn time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}"))).unwrap().with_timezone(&Utc)
}

/// The `notify-keyspace-events` flags of a node.
async fn notify_flags(node: &common::sentinel::Node) -> Option<String> {
    let mut conn = node.conn().await.ok()?;
    let v: Vec<String> =
        redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(&mut conn).await.ok()?;
    v.get(1).cloned()
}

fn has_expired_events(flags: &str) -> bool {
    flags.contains('E') && (flags.contains('x') || flags.contains('A'))
}

/// Whether an order's expiry key is on a node.
async fn scheduled_on(node: &common::sentinel::Node, prefix: &str, id: &str) -> bool {
    let Ok(mut conn) = node.conn().await else { return false };
    let id = shopgraph::domain::OrderId::parse(id).expect("an order id");
    let key = shopgraph::expiry::schedule::Keys { prefix: prefix.to_string() }.order(id);
    redis::cmd("EXISTS").arg(key).query_async::<i64>(&mut conn).await.unwrap_or(0) == 1
}

/// One line past the harness's capture: what the fault test measured.
fn measured(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "MEASURED: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_starts_on_a_sentinel_url_and_an_order_expires_on_time() {
    let set = SentinelSet::start().await;
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(set.url());
        c.order_ttl = Duration::from_secs(2);
    })
    .await;
    app.wait_ready().await;
    let mut ws = watcher(&app.ws_url).await;
    let product = app.create_product("SENT-A", 500, 10).await;
    let (token, _) = app.customer().await;
    let id = app.order_id(&token, &[(&product, 3)]).await;
    assert_eq!(app.stock(&product).await, 7);
    assert!(scheduled_on(&set.primary, &app.config.redis_key_prefix, &id).await, "the key is on the primary");

    let events = ws.cancellations_until(Duration::from_secs(10), |seen| seen.contains_key(&id)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[&id];
    assert_eq!(event["reason"], "EXPIRED");
    let lag = time(&event["cancelledAt"]) - time(&event["order"]["expiresAt"]);
    assert!(lag < chrono::Duration::seconds(1), "cancelled {lag} after its deadline");
    let order = app.order(&token, &id).await;
    assert_eq!((order["status"].as_str(), order["cancelReason"].as_str()), (Some("CANCELLED"), Some("EXPIRED")));
    assert_eq!(app.stock(&product).await, 10);
    let flags = notify_flags(&set.primary).await.unwrap();
    assert!(has_expired_events(&flags), "the server turns on expired-key events on the primary: {flags:?}");

    // a master name the sentinels do not monitor stops the start, naming it
    let mut other = app.config.clone();
    other.listen_addr = "127.0.0.1:0".parse().unwrap();
    other.redis_url = Some(set.url().replace(&format!("#{MASTER}"), "#nosuchmaster"));
    let err = App::build(other).await.err().expect("an unknown master name fails the start").to_string();
    assert!(err.starts_with("REDIS_URL: "), "{err}");
    assert!(err.contains("knows no master named \"nosuchmaster\""), "{err}");
    app.stop().await;
}

/// Orders pending on two instances; the primary is SIGKILLed; Sentinel
/// promotes the replica. Instance A's orders (2 s) fall due during the
/// failover, instance B's (8 s) after it: every one is cancelled, each
/// subscriber (one per instance) gets exactly one event per order, stock
/// adds up, and new orders and `payOrder` work against the new primary,
/// which the server gave expired-key events. Orders the customer cancels
/// while there is no primary reach the other instance once, from the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_loses_no_cancellation_and_publishes_none_twice() {
    killed_primary(Backend::Sqlite).await;
}

/// The same on PostgreSQL, where the two instances' sweeps split the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_loses_no_cancellation_and_publishes_none_twice_on_postgres() {
    if common::skip_without_postgres() {
        return;
    }
    killed_primary(Backend::Postgres).await;
}

async fn killed_primary(backend: Backend) {
    let mut set = SentinelSet::start().await;
    let a = common::spawn_app_with(backend, |c| {
        c.redis_url = Some(set.url());
        c.order_ttl = Duration::from_secs(2);
    })
    .await;
    let mut config_b = a.config.clone();
    config_b.listen_addr = "127.0.0.1:0".parse().unwrap();
    config_b.order_ttl = Duration::from_secs(8);
    // dropped before `a`, which holds the database
    let b = common::start(config_b).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let prefix = a.config.redis_key_prefix.clone();
    let mut ws_a = watcher(&a.ws_url).await;
    let mut ws_b = watcher(&b.ws_url).await;
    let (p, q) = (a.create_product("SENT-P", 100, 1000).await, a.create_product("SENT-Q", 250, 1000).await);
    let (token, _) = a.customer().await;

    let mut due_in_failover = Vec::new();
    let mut due_after = Vec::new();
    for i in 0..10 {
        due_in_failover.push(a.order_id(&token, &[(&p, 1 + i % 3), (&q, 2)]).await);
        due_after.push(b.order_id(&token, &[(&p, 2), (&q, 1 + i % 4)]).await);
    }
    set.wait_replicated(Duration::from_secs(5)).await;
    let killed_at = Utc::now();
    let killed = Instant::now();
    set.primary.kill();
    // cancelled by the customer while there is no primary: the relay's
    // PUBLISH fails, the events wait in the outbox
    let by_customer: Vec<String> = due_after.drain(..3).collect();
    for id in &by_customer {
        let v = a.cancel(&token, id).await;
        assert_eq!(v["data"]["cancelOrder"]["cancelReason"], "CUSTOMER", "{v}");
    }

    set.wait_promoted(Duration::from_secs(30)).await;
    let promoted = killed.elapsed();
    // Both instances follow: ready again (the old primary is dead, so
    // their commands and both subscriptions are on the new one), the new
    // primary has expired-key events turned on (not replicated), and a new
    // order's expiry key lands there.
    a.wait_ready().await;
    b.wait_ready().await;
    let flags = notify_flags(&set.replica).await.expect("the new primary answers");
    assert!(has_expired_events(&flags), "notifications on the new primary: {flags:?}");
    let mut after = Vec::new();
    let first = a.order_id(&token, &[(&p, 1)]).await;
    assert!(scheduled_on(&set.replica, &prefix, &first).await, "a new order is scheduled on the new primary");
    let following = killed.elapsed();
    after.push(first);
    for _ in 0..3 {
        after.push(a.order_id(&token, &[(&q, 3)]).await);
    }
    let paid = a.order_id(&token, &[(&p, 5), (&q, 5)]).await;
    let v = a.pay(&token, &paid).await;
    assert_eq!(v["data"]["payOrder"]["status"], "PAID", "{v}");

    let every: Vec<String> =
        due_in_failover.iter().chain(&due_after).chain(&after).chain(&by_customer).cloned().collect();
    let reason = |id: &String| if by_customer.contains(id) { "CUSTOMER" } else { "EXPIRED" };
    let mut per_instance = Vec::new();
    for ws in [&mut ws_a, &mut ws_b] {
        let events = ws.cancellations_until(Duration::from_secs(30), |seen| seen.len() >= every.len()).await;
        let mut got: Vec<&String> = events.keys().collect();
        let mut want: Vec<&String> = every.iter().collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "events for exactly the unpaid orders\n{}", set.logs());
        assert!(events.iter().all(|(id, e)| e["reason"] == reason(id)), "{events:?}");
        per_instance.push(events);
    }
    let events: &HashMap<String, Value> = &per_instance[0];
    let cancelled_at = |ids: &[String]| ids.iter().map(|id| time(&events[id]["cancelledAt"])).max().unwrap();
    let all_due_cancelled = (cancelled_at(&due_in_failover) - killed_at).to_std().unwrap();
    let lag_after = due_after
        .iter()
        .chain(&after)
        .map(|id| time(&events[id]["cancelledAt"]) - time(&events[id]["order"]["expiresAt"]))
        .max()
        .unwrap();
    assert!(lag_after < chrono::Duration::seconds(1), "orders due after the failover cancelled {lag_after} late");

    for id in &every {
        let o = a.order(ADMIN, id).await;
        assert_eq!((o["status"].as_str(), o["cancelReason"].as_str()), (Some("CANCELLED"), Some(reason(id))), "{o}");
    }
    assert_eq!(a.order(ADMIN, &paid).await["status"], "PAID");
    assert_eq!((a.stock(&p).await, a.stock(&q).await), (995, 995), "only the paid order holds stock");

    measured(&format!(
        "sentinel failover ({backend:?}): SIGKILL → replica promoted {promoted:?}; → both instances ready on the new primary (notifications on, a new order scheduled there) {following:?}; → every order due during the failover cancelled {all_due_cancelled:?}; orders due after it cancelled ≤ {} ms late",
        lag_after.num_milliseconds()
    ));
    b.stop().await;
    a.stop().await;
}

/// A failover the operator asks for (`SENTINEL FAILOVER`), after the first
/// sentinel of the URL died: the old primary stays up (Sentinel turns it
/// into a replica seconds later, so `ROLE` still says master), and every
/// connection to it would stay open. The server hears `+switch-master` on
/// another sentinel and moves all of them: orders due after the failover are
/// cancelled on time, which only the listener subscribed on the new primary
/// can do (the sweep is an hour away, and the nudger trusts a listener it
/// thinks is up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_that_stays_up_is_left_for_the_promoted_one() {
    let mut set = SentinelSet::start().await;
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(set.url());
        c.order_ttl = Duration::from_secs(4);
    })
    .await;
    app.wait_ready().await;
    let prefix = app.config.redis_key_prefix.clone();
    let mut ws = watcher(&app.ws_url).await;
    let product = app.create_product("SENT-D", 100, 100).await;
    let (token, _) = app.customer().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.order_id(&token, &[(&product, 2)]).await);
    }
    set.wait_replicated(Duration::from_secs(5)).await;
    set.sentinels[0].kill();
    set.failover().await;
    set.wait_promoted(Duration::from_secs(30)).await;
    common::eventually(Duration::from_secs(10), || async {
        has_expired_events(&notify_flags(&set.replica).await?).then_some(())
    })
    .await;
    let late = app.order_id(&token, &[(&product, 1)]).await;
    assert!(scheduled_on(&set.replica, &prefix, &late).await, "a new order is scheduled on the new primary");
    ids.push(late);
    // still up, so connections to it would stay open (Sentinel demotes it
    // only seconds later)
    assert!(set.primary.replication("role").await.is_some(), "the old primary is still up");

    let events = ws.cancellations_until(Duration::from_secs(15), |seen| seen.len() >= ids.len()).await;
    assert_eq!(events.len(), ids.len(), "{events:?}");
    for id in &ids {
        let e = &events[id];
        let lag = time(&e["cancelledAt"]) - time(&e["order"]["expiresAt"]);
        assert!(lag < chrono::Duration::seconds(1), "{id} cancelled {lag} after its deadline");
    }
    assert_eq!(app.stock(&product).await, 100);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_sentinel_url_or_unreachable_sentinels_stop_the_start_clearly() {
    let args = |url: &str| ConfigArgs { redis_url: Some(url.into()), ..Default::default() };
    for (bad, says) in [
        ("redis-sentinel://app:hunter2@127.0.0.1:26379,127.0.0.1:26380/0", "names no master"),
        ("redis-sentinel://127.0.0.1:26379,127.0.0.1:banana/0#m", "is not host:port"),
        ("redis-sentinel://127.0.0.1:26379/zero#m", "the database after / must be a number"),
    ] {
        let err = args(bad).into_config().unwrap_err();
        assert_eq!(err.var, "REDIS_URL", "{bad}");
        let text = err.to_string();
        assert!(text.contains(says) && text.contains("redis-sentinel://host:port"), "{text}");
        assert!(!text.contains("hunter2"), "the password is redacted: {text}");
    }

    // nothing listens on these ports
    let ports: Vec<u16> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let url = format!("redis-sentinel://app:hunter2@127.0.0.1:{},127.0.0.1:{}/0#{MASTER}", ports[0], ports[1]);
    let config = args(&url).into_config().expect("a valid sentinel URL");
    assert_eq!(config.redis_url.as_deref(), Some(url.as_str()));
    let db = common::fresh_db(Backend::Sqlite).await;
    let mut config = common::test_config(&db.url).await;
    config.redis_url = Some(url);
    let started = Instant::now();
    let err = App::build(config).await.err().expect("unreachable sentinels fail the start").to_string();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(err.starts_with("REDIS_URL: cannot reach Redis at redis-sentinel://app:***@"), "{err}");
    for port in &ports {
        assert!(err.contains(&format!("sentinel 127.0.0.1:{port}: ")), "{err}");
    }
    assert!(!err.contains("hunter2"), "{err}");
}

//! The expiry pipeline end to end: Redis expiry hashes, the keyspace
//! listener, the nudger, the sweep, exactly-once cancellation and events.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{code, redis::PrivateRedis, ws::WsClient, Backend, TestApp, ADMIN};
use serde_json::{json, Value};

const CANCELLED_SUB: &str = "subscription { orderCancelled { reason cancelledAt order { id status } } }";

/// An admin subscriber to every cancellation.
async fn watcher(app: &TestApp) -> WsClient {
    let mut ws = WsClient::init(&app.ws_url, "graphql-transport-ws", Some(ADMIN)).await;
    ws.subscribe("all", CANCELLED_SUB, json!({})).await;
    // Nothing here waits until the subscription is live (an admin's
    // `orderCancelled` runs as a shared execution on a task of its own, which
    // no reply marks as started). The tests rely on a margin instead: every
    // event they wait for is a cancellation of an order placed after this
    // returns, with an ORDER_TTL of at least a second.
    ws
}

/// Collects `n` cancellation events, then asserts no more arrive for a second.
async fn collect_events(ws: &mut WsClient, n: usize, limit: Duration) -> HashMap<String, Value> {
    ws.cancellations_until(limit, |seen| seen.len() >= n).await
}

async fn status(app: &TestApp, id: &str) -> Value {
    app.order(ADMIN, id).await
}

both_stores! {
    an_unpaid_order_is_cancelled_by_the_listener_soon_after_its_deadline
        with |c| c.order_ttl = Duration::from_secs(1) => |app: TestApp| async move {
        // the sweep runs once an hour here: only the keyspace event can cancel in time
        let a = app.create_product("A", 100, 10).await;
        let (token, _) = app.customer().await;
        let mut ws = watcher(&app).await;
        let id = app.order_id(&token, &[(&a, 3)]).await;
        assert_eq!(app.stock(&a).await, 7);
        let events = collect_events(&mut ws, 1, Duration::from_secs(5)).await;
        let e = &events[&id];
        assert_eq!(e["reason"], "EXPIRED");
        let o = status(&app, &id).await;
        assert_eq!(o["status"], "CANCELLED");
        let lag = chrono::DateTime::parse_from_rfc3339(o["cancelledAt"].as_str().unwrap()).unwrap()
            - chrono::DateTime::parse_from_rfc3339(o["expiresAt"].as_str().unwrap()).unwrap();
        assert!(lag.num_milliseconds() < 1000, "cancelled {lag} after the deadline");
        assert_eq!(app.stock(&a).await, 10);
    };

    a_paid_order_is_never_cancelled
        with |c| { c.order_ttl = Duration::from_secs(1); c.sweep_interval = Duration::from_millis(300); }
        => |app: TestApp| async move {
        let a = app.create_product("A", 100, 10).await;
        let (token, _) = app.customer().await;
        let id = app.order_id(&token, &[(&a, 2)]).await;
        assert_eq!(app.pay(&token, &id).await["data"]["payOrder"]["status"], "PAID");
        let mut ws = watcher(&app).await;
        ws.assert_silent(Duration::from_millis(1800)).await;
        assert_eq!(status(&app, &id).await["status"], "PAID");
        assert_eq!(app.stock(&a).await, 8);
    };

    one_sweep_cancels_exactly_the_orders_overdue_at_the_now_it_is_given => |app: TestApp| async move {
        // the listener and the hour-long sweep cannot act within the 60 s TTL:
        // what happens here is the sweep step, run with a chosen `now`
        let a = app.create_product("A", 100, 10).await;
        let (token, _) = app.customer().await;
        let due = app.order_id(&token, &[(&a, 2)]).await;
        let expires = time(&status(&app, &due).await["expiresAt"]);
        // the next order's deadline comes strictly later
        let ttl = chrono::Duration::from_std(app.config.order_ttl).unwrap();
        common::eventually(Duration::from_secs(1), || async {
            (chrono::Utc::now() + ttl > expires + chrono::Duration::milliseconds(1)).then_some(())
        })
        .await;
        let later = app.order_id(&token, &[(&a, 3)]).await;
        let paid = app.order_id(&token, &[(&a, 1)]).await;
        assert!(app.pay(&token, &paid).await.get("errors").is_none());
        let later_expires = time(&status(&app, &later).await["expiresAt"]);

        // before the deadline nothing is overdue
        assert_eq!(app.orders.sweep_once(expires - chrono::Duration::milliseconds(1), 1000).await.unwrap(), 0);
        // at the deadline clients are shown, only that order is overdue, on
        // both stores (in batches of one, the step goes on until a batch
        // comes back short)
        let just_after = expires;
        assert_eq!(app.orders.sweep_once(just_after, 1).await.unwrap(), 1);
        let o = status(&app, &due).await;
        assert_eq!(o["status"], "CANCELLED");
        assert_eq!(o["cancelReason"], "EXPIRED");
        assert_eq!(status(&app, &later).await["status"], "PENDING_PAYMENT");
        assert_eq!(app.stock(&a).await, 10 - 3 - 1);
        // once each: a second sweep at the same `now` finds nothing
        assert_eq!(app.orders.sweep_once(just_after, 1000).await.unwrap(), 0);
        // an hour on, the other pending order is overdue too; a paid one never is
        assert_eq!(app.orders.sweep_once(later_expires + chrono::Duration::hours(1), 1).await.unwrap(), 1);
        assert_eq!(status(&app, &later).await["status"], "CANCELLED");
        assert_eq!(status(&app, &paid).await["status"], "PAID");
        assert_eq!(app.stock(&a).await, 10 - 1);
    };

    paying_at_the_deadline_ends_paid_or_cancelled_never_both
        with |c| { c.order_ttl = Duration::from_secs(1); c.sweep_interval = Duration::from_millis(500); }
        => |app: TestApp| async move {
        let a = app.create_product("A", 100, 10_000).await;
        let (token, _) = app.customer().await;
        let mut ids = Vec::new();
        for _ in 0..40 {
            ids.push(app.order_id(&token, &[(&a, 3)]).await);
        }
        let expires = chrono::DateTime::parse_from_rfc3339(status(&app, &ids[20]).await["expiresAt"].as_str().unwrap()).unwrap();
        let wait = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait.saturating_sub(Duration::from_millis(15))).await;
        let mut tasks = Vec::new();
        for id in &ids {
            let (url, token, id) = (app.url.clone(), token.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                let v: Value = reqwest::Client::new().post(format!("{url}/graphql")).bearer_auth(token)
                    .json(&json!({"query": "mutation($id: ID!) { payOrder(id: $id) { status } }", "variables": {"id": id}}))
                    .send().await.unwrap().json().await.unwrap();
                v
            }));
        }
        for t in tasks {
            let v = t.await.unwrap();
            assert!(v["data"]["payOrder"]["status"] == "PAID" || code(&v) == "ORDER_NOT_PENDING", "{v}");
        }
        let finals = common::eventually(Duration::from_secs(5), || async {
            let mut all = Vec::new();
            for id in &ids {
                let o = status(&app, id).await;
                if o["status"] == "PENDING_PAYMENT" { return None; }
                all.push(o);
            }
            Some(all)
        }).await;
        let mut paid = 0;
        for o in &finals {
            match o["status"].as_str().unwrap() {
                "PAID" => { paid += 1; assert!(o["cancelledAt"].is_null()); }
                "CANCELLED" => assert!(o["paidAt"].is_null()),
                s => panic!("{s}"),
            }
        }
        assert_eq!(app.stock(&a).await, 10_000 - 3 * paid);
    };
}

fn time(v: &Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap().with_timezone(&chrono::Utc)
}

/// The nudger's step with a chosen `now`: it claims only deadlines before
/// it, touches their keys, puts back the members whose key still lives, and
/// reports the orders whose key is gone.
/// Orders placed at the same moment share their expiry writes; each one's
/// hash, TTL and deadline entry are in Redis by the time `createOrder`
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_at_once_each_have_their_expiry_hash_when_placement_answers() {
    use shopgraph::expiry::schedule::{Keys, Shard};
    let app = common::spawn_app(Backend::Sqlite).await;
    let a = app.create_product("A", 250, 1000).await;
    let mut tokens = Vec::new();
    for _ in 0..4 {
        tokens.push(app.customer().await.0);
    }
    let placements = (0..48).map(|i| {
        let (app, token, a) = (&app, &tokens[i % tokens.len()], &a);
        async move { app.create_order(token, &[(a, 1 + (i as i64 % 3))]).await }
    });
    let placed = futures_util::future::join_all(placements).await;
    let client = redis::Client::open(app.config.redis_url.clone().unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = Keys { prefix: app.config.redis_key_prefix.clone() };
    let mut shards = std::collections::HashSet::new();
    for order in &placed {
        let order = &order["data"]["createOrder"];
        let id = shopgraph::domain::OrderId(order["id"].as_str().unwrap().trim_start_matches("ord_").parse().unwrap());
        let deadline = time(&order["expiresAt"]).timestamp_millis();
        let key = keys.order(id);
        let hash: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(hash.get("total_cents"), Some(&order["totalCents"].to_string()), "{hash:?}");
        assert_eq!(hash.get("currency").map(String::as_str), order["currency"].as_str(), "{hash:?}");
        let expires: i64 = redis::cmd("PEXPIRETIME").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(expires, deadline, "{key}");
        let score: Option<i64> =
            redis::cmd("ZSCORE").arg(keys.deadlines(Shard::of(id))).arg(id.0).query_async(&mut conn).await.unwrap();
        assert_eq!(score, Some(deadline), "{key}");
        shards.insert(Shard::of(id));
    }
    assert!(shards.len() > 1, "the orders span several shards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nudge_claims_the_deadlines_before_its_now_and_keeps_those_whose_key_lives() {
    use shopgraph::expiry::{
        listener::ListenerState,
        nudger::{Fallback, Nudger},
        schedule::{Keys, Shard},
    };
    // a 60 s TTL: the server's own nudger (on Redis's clock) leaves these alone
    let app = common::spawn_app(Backend::Sqlite).await;
    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let id = app.order_id(&token, &[(&a, 1)]).await;
    let deadline = time(&status(&app, &id).await["expiresAt"]);
    let prefix = app.config.redis_key_prefix.clone();
    let client = redis::Client::open(app.config.redis_url.clone().unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (cancel, _cancelled) = tokio::sync::mpsc::channel(1);
    let nudger = Nudger::new(
        shopgraph::redis::RedisConn::single(redis::aio::ConnectionManager::new(client.clone()).await.unwrap()),
        Keys { prefix: prefix.clone() },
        Fallback { listener: std::sync::Arc::new(ListenerState::default()), cancel },
    );
    let member = id.trim_start_matches("ord_").to_string();
    let keys = Keys { prefix: prefix.clone() };
    let order_id = shopgraph::domain::OrderId(member.parse().unwrap());
    let key = keys.order(order_id);
    let indexed = |mut conn: redis::aio::MultiplexedConnection| {
        let (deadlines, member) = (keys.deadlines(Shard::of(order_id)), member.clone());
        async move {
            let score: Option<i64> =
                redis::cmd("ZSCORE").arg(deadlines).arg(member).query_async(&mut conn).await.unwrap();
            score
        }
    };
    assert_eq!(indexed(conn.clone()).await, Some(deadline.timestamp_millis()));

    // before the deadline (and in its own millisecond) nothing is due
    assert_eq!(nudger.nudge_once(Some(deadline)).await.unwrap().due, 0);
    // just after: claimed and touched, but the key lives (Redis's clock is a
    // minute from the deadline), so the member goes back into the index
    let after = deadline + chrono::Duration::milliseconds(1);
    let claimed = nudger.nudge_once(Some(after)).await.unwrap();
    assert_eq!((claimed.due, claimed.expired.len()), (1, 0), "{claimed:?}");
    assert_eq!(indexed(conn.clone()).await, Some(deadline.timestamp_millis()));
    // once its key is gone, the claim reports the order and keeps it out
    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
    let claimed = nudger.nudge_once(Some(after)).await.unwrap();
    assert_eq!(claimed.due, 1);
    assert_eq!(claimed.expired.iter().map(|o| format!("ord_{}", o.0)).collect::<Vec<_>>(), vec![id.clone()]);
    assert_eq!(indexed(conn.clone()).await, None);
    assert_eq!(nudger.nudge_once(Some(after)).await.unwrap().due, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_expires_on_time_while_a_hundred_thousand_others_are_pending() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.order_ttl = Duration::from_secs(2)).await;
    // 100,000 other orders pending in Redis with long TTLs, as the server writes them
    let client = redis::Client::open(app.config.redis_url.clone().unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = shopgraph::expiry::schedule::Keys { prefix: app.config.redis_key_prefix.clone() };
    let order = |id: i64| shopgraph::domain::OrderId(id);
    let far = chrono::Utc::now().timestamp_millis() + 3_600_000;
    for chunk in 0..100 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            let id = 10_000_000 + chunk * 1000 + i;
            let key = keys.order(order(id));
            pipe.hset(&key, "customer", "cus_1")
                .ignore()
                .pexpire_at(&key, far)
                .ignore()
                .zadd(keys.deadlines(shopgraph::expiry::schedule::Shard::of(order(id))), id, far)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let mut ws = watcher(&app).await;
    let id = app.order_id(&token, &[(&a, 1)]).await;
    collect_events(&mut ws, 1, Duration::from_secs(6)).await;
    let o = status(&app, &id).await;
    let lag = chrono::DateTime::parse_from_rfc3339(o["cancelledAt"].as_str().unwrap()).unwrap()
        - chrono::DateTime::parse_from_rfc3339(o["expiresAt"].as_str().unwrap()).unwrap();
    assert!(lag.num_milliseconds() < 1000, "cancelled {lag} after the deadline");
    // clean up the shared Redis
    let indexes: Vec<String> = shopgraph::expiry::schedule::Shard::all().map(|s| keys.deadlines(s)).collect();
    let _: () = redis::cmd("UNLINK").arg(indexes).query_async(&mut conn).await.unwrap();
    for chunk in 0..100 {
        let ids: Vec<String> = (0..1000).map(|i| keys.order(order(10_000_000 + chunk * 1000 + i))).collect();
        let _: () = redis::cmd("UNLINK").arg(ids).query_async(&mut conn).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_after_the_deadline_fails_even_before_any_cancellation_ran() {
    let mut redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        c.order_ttl = Duration::from_secs(1);
    })
    .await;
    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let id = app.order_id(&token, &[(&a, 1)]).await;
    // no Redis, an hour-long sweep: nothing can cancel it
    redis.kill();
    // until just past the deadline the server gave the order (the test and
    // the server share a clock)
    let left = (time(&status(&app, &id).await["expiresAt"]) - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(5)).await;
    assert_eq!(code(&app.pay(&token, &id).await), "ORDER_NOT_PENDING");
    assert_eq!(status(&app, &id).await["status"], "PENDING_PAYMENT");
}

/// Redis dies with orders pending and comes back empty: the sweep cancels
/// every order once, and every event reaches subscribers once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_loses_no_cancellation_and_no_event() {
    if common::skip_without_postgres() {
        return;
    }
    let mut redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let app = common::spawn_app_with(Backend::Postgres, |c| {
        c.redis_url = Some(url);
        c.order_ttl = Duration::from_secs(2);
        c.sweep_interval = Duration::from_secs(2);
    })
    .await;
    let other = app.sibling().await;
    let a = app.create_product("A", 100, 100).await;
    let (token, _) = app.customer().await;
    // the subscriber is on the other instance: its events must travel through Redis
    let mut ws = watcher(&other).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(app.order_id(&token, &[(&a, 2)]).await);
    }
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart().await;
    let events = collect_events(&mut ws, ids.len(), Duration::from_secs(20)).await;
    for id in &ids {
        assert_eq!(events[id]["reason"], "EXPIRED");
        assert_eq!(status(&app, id).await["status"], "CANCELLED");
    }
    assert_eq!(app.stock(&a).await, 100);
    other.stop().await;
}

/// Redis restarts empty while orders are still ahead of their deadline: the
/// listener finds the deployment's keys gone and writes them back, so each
/// order is cancelled within the 1 s target after its deadline, not at the
/// next sweep (an hour away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_ahead_of_their_deadline_expire_on_time_after_redis_comes_back_empty() {
    let mut redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        c.order_ttl = Duration::from_secs(6);
        c.sweep_interval = Duration::from_secs(3600);
    })
    .await;
    let a = app.create_product("A", 100, 100).await;
    let (token, _) = app.customer().await;
    let mut ws = watcher(&app).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(app.order_id(&token, &[(&a, 2)]).await);
    }
    redis.kill();
    redis.restart().await;
    let events = collect_events(&mut ws, ids.len(), Duration::from_secs(20)).await;
    for id in &ids {
        assert_eq!(events[id]["reason"], "EXPIRED");
        let o = status(&app, id).await;
        assert_eq!(o["status"], "CANCELLED");
        let lag = time(&o["cancelledAt"]) - time(&o["expiresAt"]);
        assert!(lag >= chrono::Duration::zero(), "{id} cancelled before its deadline");
        assert!(lag <= chrono::Duration::milliseconds(1500), "{id} cancelled {lag} after its deadline");
    }
    assert_eq!(app.stock(&a).await, 100);
}

/// The listener's connection is killed again and again while orders expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_listener_connection_repeatedly_misses_nothing_and_doubles_nothing() {
    let redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        c.order_ttl = Duration::from_secs(2);
        c.sweep_interval = Duration::from_secs(3);
    })
    .await;
    let a = app.create_product("A", 100, 1000).await;
    let (token, _) = app.customer().await;
    let mut ws = watcher(&app).await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(app.order_id(&token, &[(&a, 1)]).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = redis.conn().await;
    for _ in 0..8 {
        let _: redis::Value =
            redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut conn).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let events = collect_events(&mut ws, ids.len(), Duration::from_secs(15)).await;
    assert_eq!(events.len(), ids.len());
    assert_eq!(app.stock(&a).await, 1000);
}

/// Three instances on one Postgres and one Redis: 300 orders expire, each is
/// cancelled once, with one event each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_cancel_each_expired_order_exactly_once() {
    if common::skip_without_postgres() {
        return;
    }
    let app = common::spawn_app_with(Backend::Postgres, |c| {
        c.order_ttl = Duration::from_secs(3);
        c.sweep_interval = Duration::from_secs(2);
    })
    .await;
    let b = app.sibling().await;
    let c = app.sibling().await;
    let a = app.create_product("A", 100, 1000).await;
    let mut customers = Vec::new();
    for _ in 0..3 {
        customers.push(app.customer().await.0);
    }
    let mut ws_b = watcher(&b).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let url = [&app.url, &b.url, &c.url][i % 3].clone();
        let token = customers[i % 3].clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let v: Value = reqwest::Client::new().post(format!("{url}/graphql")).bearer_auth(token)
                .json(&json!({"query": "mutation($p: ID!) { createOrder(input: {lines: [{productId: $p, quantity: 2}]}) { id } }", "variables": {"p": a}}))
                .send().await.unwrap().json().await.unwrap();
            v["data"]["createOrder"]["id"].as_str().unwrap().to_string()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    assert_eq!(app.stock(&a).await, 400);
    let events = collect_events(&mut ws_b, 300, Duration::from_secs(30)).await;
    assert_eq!(events.len(), 300);
    assert_eq!(app.stock(&a).await, 1000);
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_turns_on_keyspace_notifications_when_they_are_off() {
    let redis = PrivateRedis::start(&["--notify-keyspace-events", ""]).await;
    let url = redis.url.clone();
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        c.order_ttl = Duration::from_secs(1);
    })
    .await;
    let mut conn = redis.conn().await;
    common::eventually(Duration::from_secs(5), || {
        let mut conn = conn.clone();
        async move {
            let v: Vec<String> =
                redis::cmd("CONFIG").arg("GET").arg("notify-keyspace-events").query_async(&mut conn).await.ok()?;
            (v[1].contains('E') && v[1].contains('x')).then_some(())
        }
    })
    .await;
    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let mut ws = watcher(&app).await;
    app.order_id(&token, &[(&a, 1)]).await;
    collect_events(&mut ws, 1, Duration::from_secs(5)).await;
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_config_is_refused_and_notifications_are_off_orders_still_cancel() {
    let redis = PrivateRedis::start(&["--notify-keyspace-events", "", "--rename-command", "CONFIG", ""]).await;
    let url = redis.url.clone();
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        c.order_ttl = Duration::from_secs(1);
        c.sweep_interval = Duration::from_millis(500);
    })
    .await;
    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let mut ws = watcher(&app).await;
    let id = app.order_id(&token, &[(&a, 4)]).await;
    let events = collect_events(&mut ws, 1, Duration::from_secs(5)).await;
    assert_eq!(events[&id]["reason"], "EXPIRED");
    assert_eq!(app.stock(&a).await, 10);
}

/// Redis's clock may run ahead of the database's: an `expired` event that
/// arrives before the order's deadline is checked again at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_event_before_the_database_deadline_is_rechecked_at_the_deadline() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.order_ttl = Duration::from_secs(2)).await;
    let a = app.create_product("A", 100, 10).await;
    let (token, _) = app.customer().await;
    let mut ws = watcher(&app).await;
    let id = app.order_id(&token, &[(&a, 1)]).await;
    // make Redis expire the key now, two seconds early
    let client = redis::Client::open(app.config.redis_url.clone().unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = shopgraph::expiry::schedule::Keys { prefix: app.config.redis_key_prefix.clone() };
    let key = keys.order(shopgraph::domain::OrderId(id.trim_start_matches("ord_").parse().unwrap()));
    let _: () = redis::cmd("PEXPIRE").arg(&key).arg(1).query_async(&mut conn).await.unwrap();
    let _: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.unwrap();
    // not cancelled early...
    ws.assert_silent(Duration::from_millis(1200)).await;
    assert_eq!(status(&app, &id).await["status"], "PENDING_PAYMENT");
    // ...but at its deadline, though no key is left to expire and the sweep is an hour away
    let events = collect_events(&mut ws, 1, Duration::from_secs(3)).await;
    assert_eq!(events[&id]["reason"], "EXPIRED");
    let o = status(&app, &id).await;
    let lag = chrono::DateTime::parse_from_rfc3339(o["cancelledAt"].as_str().unwrap()).unwrap()
        - chrono::DateTime::parse_from_rfc3339(o["expiresAt"].as_str().unwrap()).unwrap();
    assert!((0..500).contains(&lag.num_milliseconds()), "cancelled {lag} after the deadline");
}

//! GraphQL subscriptions over websocket (issue 4): both protocols, against
//! a real server on a free port, with real sockets and bounded waits.
//!
//! Tests that touch the store run on SQLite and, when `TEST_DATABASE_URL`
//! is set, on Postgres too (otherwise the Postgres half says it is skipped).

mod common;

use std::time::Duration;

use common::{
    child::{metric, ChildServer},
    redis::PrivateRedis,
    ws::WsClient,
    Backend, TestApp, ADMIN, JWT_SECRET,
};
use futures_util::{future::join_all, stream, SinkExt, StreamExt};
use serde_json::{json, Value};

const TRANSPORT: &str = "graphql-transport-ws";
const LEGACY: &str = "graphql-ws";
const PROTOCOLS: [&str; 2] = [TRANSPORT, LEGACY];

const ORDER_CANCELLED: &str = "subscription($id: ID) { orderCancelled(orderId: $id) { \
    reason cancelledAt order { id status cancelReason cancelledAt customer { id } } } }";
const ORDER_UPDATED: &str =
    "subscription($id: ID!) { orderUpdated(orderId: $id) { id status paidAt cancelledAt cancelReason } }";

/// How long a socket must stay quiet to show that no duplicate follows.
const QUIET: Duration = Duration::from_secs(1);

both_stores! {
    an_order_left_to_expire_sends_exactly_one_order_cancelled_event_in_both_protocols
        with |c| c.order_ttl = Duration::from_secs(1) => expiry_sends_one_event;
    order_updated_sends_the_snapshot_first_then_the_final_status_and_completes => order_updated_then_final;
    order_updated_on_an_order_that_is_already_final_sends_the_snapshot_and_completes => order_updated_on_a_final_order;
    order_cancelled_narrowed_to_one_order_receives_only_that_order => order_cancelled_narrowed_to_one_order;
    a_customer_receives_nothing_of_another_customers_orders_and_cannot_subscribe_to_them => customers_are_isolated;
    a_subscriber_on_one_instance_sees_cancellations_made_on_another_exactly_once
        with |c| c.order_ttl = Duration::from_secs(2) => two_instances_share_events;
    after_a_redis_outage_subscribers_get_the_current_state_and_every_missed_event_once => redis_outage_catch_up;
}

fn variables(order: Option<&str>) -> Value {
    json!({ "id": order })
}

fn bearer(token: &str) -> Value {
    json!({ "Authorization": format!("Bearer {token}") })
}

/// A product with plenty of stock and a customer: (product, token, customer id).
async fn shop(app: &TestApp) -> (String, String, String) {
    let sku = format!("sku-{}", uuid::Uuid::new_v4().simple());
    let product = app.create_product(&sku, 1250, 1_000_000).await;
    let (token, customer) = app.customer().await;
    (product, token, customer)
}

/// Checks an `orderCancelled` payload: the order, its reason, the time.
fn assert_cancelled(payload: &Value, order: &str, reason: &str) {
    assert!(payload.get("errors").is_none(), "unexpected errors: {payload}");
    let e = &payload["data"]["orderCancelled"];
    assert_eq!(e["order"]["id"], order, "{payload}");
    assert_eq!(e["order"]["status"], "CANCELLED", "{payload}");
    assert_eq!(e["reason"], reason, "{payload}");
    assert_eq!(e["order"]["cancelReason"], reason, "{payload}");
    let at = e["cancelledAt"].as_str().unwrap_or_else(|| panic!("no cancelledAt in {payload}"));
    chrono::DateTime::parse_from_rfc3339(at).unwrap_or_else(|_| panic!("cancelledAt {at:?} is not RFC 3339"));
    assert_eq!(e["order"]["cancelledAt"], at, "{payload}");
}

fn updated(payload: &Value) -> &Value {
    assert!(payload.get("errors").is_none(), "unexpected errors: {payload}");
    &payload["data"]["orderUpdated"]
}

async fn all_silent(clients: &mut [WsClient], quiet: Duration) {
    join_all(clients.iter_mut().map(|c| c.assert_silent(quiet))).await;
}

// ---------------------------------------------------------------------------
// events

async fn expiry_sends_one_event(app: TestApp) {
    app.wait_ready().await;
    let (product, token, customer) = shop(&app).await;

    // the customer in both protocols, and the admin, who sees every order
    let mut clients = Vec::new();
    for protocol in PROTOCOLS {
        clients.push(WsClient::init(&app.ws_url, protocol, Some(&token)).await);
    }
    clients.push(WsClient::init(&app.ws_url, TRANSPORT, Some(ADMIN)).await);
    for c in &mut clients {
        c.subscribe("mine", ORDER_CANCELLED, variables(None)).await;
        c.barrier().await;
    }

    let order = app.order_id(&token, &[(&product, 3)]).await;
    for c in &mut clients {
        let payload = c.next_data("mine").await;
        assert_cancelled(&payload, &order, "EXPIRED");
        assert_eq!(payload["data"]["orderCancelled"]["order"]["customer"]["id"], customer.as_str());
    }
    all_silent(&mut clients, QUIET).await;
    assert_eq!(app.stock(&product).await, 1_000_000, "the stock came back");
}

async fn order_updated_then_final(app: TestApp) {
    let (product, token, _) = shop(&app).await;
    for protocol in PROTOCOLS {
        // paid
        let order = app.order_id(&token, &[(&product, 1)]).await;
        let mut c = WsClient::init(&app.ws_url, protocol, Some(&token)).await;
        c.subscribe("u", ORDER_UPDATED, variables(Some(&order))).await;
        let first = c.next_data("u").await;
        let snapshot = updated(&first);
        assert_eq!(snapshot["id"], order.as_str());
        assert_eq!(snapshot["status"], "PENDING_PAYMENT", "{protocol}: {first}");
        assert_eq!(snapshot["paidAt"], Value::Null);

        let paid = app.pay(&token, &order).await;
        assert!(paid.get("errors").is_none(), "{paid}");
        let second = c.next_data("u").await;
        let change = updated(&second);
        assert_eq!(change["status"], "PAID", "{protocol}: {second}");
        assert_eq!(change["paidAt"], paid["data"]["payOrder"]["paidAt"]);
        c.next_complete("u").await;
        c.assert_silent(Duration::from_millis(300)).await;

        // cancelled, on the same connection
        let order = app.order_id(&token, &[(&product, 1)]).await;
        c.subscribe("v", ORDER_UPDATED, variables(Some(&order))).await;
        assert_eq!(updated(&c.next_data("v").await)["status"], "PENDING_PAYMENT");
        let cancelled = app.cancel(&token, &order).await;
        assert!(cancelled.get("errors").is_none(), "{cancelled}");
        let change = c.next_data("v").await;
        assert_eq!(updated(&change)["status"], "CANCELLED", "{protocol}: {change}");
        assert_eq!(updated(&change)["cancelReason"], "CUSTOMER");
        c.next_complete("v").await;
    }
}

async fn order_updated_on_a_final_order(app: TestApp) {
    let (product, token, _) = shop(&app).await;
    let paid = app.order_id(&token, &[(&product, 1)]).await;
    assert!(app.pay(&token, &paid).await.get("errors").is_none());
    let cancelled = app.order_id(&token, &[(&product, 1)]).await;
    assert!(app.cancel(&token, &cancelled).await.get("errors").is_none());

    for protocol in PROTOCOLS {
        for (who, order, status) in [(token.as_str(), &paid, "PAID"), (ADMIN, &cancelled, "CANCELLED")] {
            let mut c = WsClient::init(&app.ws_url, protocol, Some(who)).await;
            c.subscribe("u", ORDER_UPDATED, variables(Some(order))).await;
            let payload = c.next_data("u").await;
            assert_eq!(updated(&payload)["id"], order.as_str());
            assert_eq!(updated(&payload)["status"], status, "{protocol}: {payload}");
            c.next_complete("u").await;
            c.assert_silent(Duration::from_millis(300)).await;
        }
    }
}

async fn order_cancelled_narrowed_to_one_order(app: TestApp) {
    let (product, token, _) = shop(&app).await;
    let watched = app.order_id(&token, &[(&product, 1)]).await;
    let other = app.order_id(&token, &[(&product, 1)]).await;
    let mut clients = Vec::new();
    for protocol in PROTOCOLS {
        let mut c = WsClient::init(&app.ws_url, protocol, Some(&token)).await;
        c.subscribe("one", ORDER_CANCELLED, variables(Some(&watched))).await;
        c.barrier().await;
        clients.push(c);
    }
    // the other order first: if it leaked through, it would arrive first
    assert!(app.cancel(&token, &other).await.get("errors").is_none());
    assert!(app.cancel(ADMIN, &watched).await.get("errors").is_none());
    for c in &mut clients {
        assert_cancelled(&c.next_data("one").await, &watched, "ADMIN");
    }
    all_silent(&mut clients, Duration::from_millis(300)).await;
}

async fn customers_are_isolated(app: TestApp) {
    let (product, token_a, _) = shop(&app).await;
    let (token_b, _) = app.customer().await;
    let a_order = app.order_id(&token_a, &[(&product, 1)]).await;
    let b_order = app.order_id(&token_b, &[(&product, 1)]).await;

    let mut clients = Vec::new();
    for protocol in PROTOCOLS {
        let mut b = WsClient::init(&app.ws_url, protocol, Some(&token_b)).await;
        // A's order, and one that does not exist, are refused alike
        for (sub, query) in [("cancelled", ORDER_CANCELLED), ("updated", ORDER_UPDATED)] {
            for (label, order) in [("a", a_order.as_str()), ("missing", "ord_987654321")] {
                let id = format!("{sub}-{label}");
                b.subscribe(&id, query, variables(Some(order))).await;
                let errors = b.next_errors(&id).await;
                assert_eq!(errors[0]["extensions"]["code"], "NOT_FOUND", "{protocol} {id}: {errors:?}");
                assert!(!errors[0]["message"].as_str().unwrap().contains("cus_"), "no owner is revealed: {errors:?}");
            }
        }
        // a malformed id is the client's mistake, not a missing order
        b.subscribe("malformed", ORDER_UPDATED, variables(Some("not-an-id"))).await;
        assert_eq!(b.next_error_code("malformed").await, "BAD_USER_INPUT");

        b.subscribe("mine", ORDER_CANCELLED, variables(None)).await;
        b.barrier().await;
        clients.push(b);
    }

    // A's cancellation first: had it leaked, it would arrive before B's own
    assert!(app.cancel(&token_a, &a_order).await.get("errors").is_none());
    assert!(app.cancel(&token_b, &b_order).await.get("errors").is_none());
    for b in &mut clients {
        assert_cancelled(&b.next_data("mine").await, &b_order, "CUSTOMER");
    }
    all_silent(&mut clients, Duration::from_millis(300)).await;
}

async fn two_instances_share_events(a: TestApp) {
    let b = a.sibling().await;
    a.wait_ready().await;
    b.wait_ready().await;
    let (product, token, _) = shop(&a).await;

    // the admin on B in both protocols, the customer on A
    let mut on_b = Vec::new();
    for protocol in PROTOCOLS {
        on_b.push(WsClient::init(&b.ws_url, protocol, Some(ADMIN)).await);
    }
    let mut on_a = WsClient::init(&a.ws_url, TRANSPORT, Some(&token)).await;
    for c in on_b.iter_mut().chain(std::iter::once(&mut on_a)) {
        c.subscribe("all", ORDER_CANCELLED, variables(None)).await;
        c.barrier().await;
    }

    // cancelled by its customer on A
    let cancelled = a.order_id(&token, &[(&product, 1)]).await;
    assert!(a.cancel(&token, &cancelled).await.get("errors").is_none());
    for c in on_b.iter_mut().chain(std::iter::once(&mut on_a)) {
        assert_cancelled(&c.next_data("all").await, &cancelled, "CUSTOMER");
    }

    // placed on B and left to expire: both listeners see the key expire,
    // one cancellation and one event result
    let expired = b.order_id(&token, &[(&product, 1)]).await;
    for c in on_b.iter_mut().chain(std::iter::once(&mut on_a)) {
        assert_cancelled(&c.next_data("all").await, &expired, "EXPIRED");
    }
    on_b.push(on_a);
    all_silent(&mut on_b, QUIET).await;

    // orderUpdated on B follows a payment made on A
    let paid = b.order_id(&token, &[(&product, 1)]).await;
    let mut u = WsClient::init(&b.ws_url, LEGACY, Some(&token)).await;
    u.subscribe("u", ORDER_UPDATED, variables(Some(&paid))).await;
    assert_eq!(updated(&u.next_data("u").await)["status"], "PENDING_PAYMENT");
    assert!(a.pay(&token, &paid).await.get("errors").is_none());
    assert_eq!(updated(&u.next_data("u").await)["status"], "PAID");
    u.next_complete("u").await;

    b.stop().await;
    a.stop().await;
}

async fn redis_outage_catch_up(app: TestApp) {
    // the servers need this Redis in their configuration from the start
    let mut redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let a = app.restart_with(|c| c.redis_url = Some(url)).await;
    let b = a.sibling().await;
    a.wait_ready().await;
    b.wait_ready().await;
    let (product, token, _) = shop(&a).await;
    let paid = a.order_id(&token, &[(&product, 1)]).await;
    let cancelled = a.order_id(&token, &[(&product, 1)]).await;

    let mut on_b = WsClient::init(&b.ws_url, TRANSPORT, Some(&token)).await;
    on_b.subscribe("u", ORDER_UPDATED, variables(Some(&paid))).await;
    assert_eq!(updated(&on_b.next_data("u").await)["status"], "PENDING_PAYMENT");
    on_b.subscribe("c", ORDER_CANCELLED, variables(None)).await;
    on_b.barrier().await;
    let mut on_a = WsClient::init(&a.ws_url, LEGACY, Some(&token)).await;
    on_a.subscribe("c", ORDER_CANCELLED, variables(None)).await;
    on_a.barrier().await;

    // Redis goes away; A takes a payment and a cancellation meanwhile
    redis.kill();
    let v = a.pay(&token, &paid).await;
    assert!(v.get("errors").is_none(), "{v}");
    let v = a.cancel(&token, &cancelled).await;
    assert!(v.get("errors").is_none(), "{v}");
    // A's own subscriber hears at once
    assert_cancelled(&on_a.next_data("c").await, &cancelled, "CUSTOMER");

    // Redis is back: B's fan-out reconnects, orderUpdated reads the order
    // again (PAID, so it completes), and the events held in the outbox
    // are relayed, so the cancellation reaches B too
    redis.restart().await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let v = on_b.next(Duration::from_secs(20)).await.expect("socket open");
        match (v["id"].as_str(), v["type"].as_str()) {
            (Some("u"), Some("next")) => assert_eq!(updated(&v["payload"])["status"], "PAID", "{v}"),
            (Some("u"), Some("complete")) => {}
            (Some("c"), Some("next")) => assert_cancelled(&v["payload"], &cancelled, "CUSTOMER"),
            _ => panic!("unexpected {v}"),
        }
        seen.push(format!("{}:{}", v["id"].as_str().unwrap(), v["type"].as_str().unwrap()));
    }
    assert_eq!(seen.iter().filter(|s| *s == "u:next").count(), 1, "{seen:?}");
    assert!(seen.contains(&"u:complete".to_string()), "{seen:?}");
    assert_eq!(seen.iter().filter(|s| *s == "c:next").count(), 1, "{seen:?}");
    // and nobody hears anything twice once the relay has caught up
    common::eventually(Duration::from_secs(10), || async { (a.store.outbox_len().await.ok()? == 0).then_some(()) })
        .await;
    let mut clients = [on_a, on_b];
    all_silent(&mut clients, QUIET).await;
    let [mut on_a, mut on_b] = clients;

    // Redis stays up but the subscriber connections are cut: an event
    // published before the fan-outs are back is published again for them
    let third = a.order_id(&token, &[(&product, 1)]).await;
    let mut conn = redis.conn().await;
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut conn).await.unwrap();
    assert!(killed >= 2, "both fan-outs were cut ({killed} connections)");
    let v = a.cancel(&token, &third).await;
    assert!(v.get("errors").is_none(), "{v}");
    assert_cancelled(&on_a.next_data("c").await, &third, "CUSTOMER");
    assert_cancelled(&on_b.next_data("c").await, &third, "CUSTOMER");
    let mut clients = [on_a, on_b];
    all_silent(&mut clients, QUIET).await;

    b.stop().await;
    a.stop().await;
}

// ---------------------------------------------------------------------------
// authentication

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_connection_cannot_subscribe_to_orders() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let (product, token, _) = shop(&app).await;
    let order = app.order_id(&token, &[(&product, 1)]).await;
    for protocol in PROTOCOLS {
        for payload in [json!({}), Value::Null, json!({"Authorization": "Bearer"})] {
            let mut c = WsClient::connect(&app.ws_url, protocol).await;
            c.send(json!({"type": "connection_init", "payload": payload})).await;
            assert_eq!(c.next_json().await.expect("connection_ack")["type"], "connection_ack");
            c.subscribe("all", ORDER_CANCELLED, variables(None)).await;
            assert_eq!(c.next_error_code("all").await, "UNAUTHENTICATED", "{protocol} {payload}");
            c.subscribe("one", ORDER_CANCELLED, variables(Some(&order))).await;
            assert_eq!(c.next_error_code("one").await, "UNAUTHENTICATED", "{protocol} {payload}");
            c.subscribe("updated", ORDER_UPDATED, variables(Some(&order))).await;
            assert_eq!(c.next_error_code("updated").await, "UNAUTHENTICATED", "{protocol} {payload}");
            // the connection itself stays usable for public data
            c.barrier().await;
        }
    }
    // and nothing is delivered to it when the order is cancelled
    let mut c = WsClient::init(&app.ws_url, TRANSPORT, None).await;
    c.subscribe("all", ORDER_CANCELLED, variables(None)).await;
    assert_eq!(c.next_error_code("all").await, "UNAUTHENTICATED");
    assert!(app.cancel(&token, &order).await.get("errors").is_none());
    c.assert_silent(Duration::from_millis(300)).await;
}

fn jwt(secret: &str, sub: &str, exp_offset_secs: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": sub, "iat": now, "exp": now + exp_offset_secs});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_expired_or_forged_token_in_connection_init_closes_the_socket_with_4403() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let (token, customer) = app.customer().await;
    let bad = [
        ("garbage", "Bearer not-a-token".to_string()),
        ("forged", format!("Bearer {}", jwt("some-other-secret-0123456789", &customer, 3600))),
        ("expired", format!("Bearer {}", jwt(JWT_SECRET, &customer, -120))),
        ("tampered", format!("Bearer {token}x")),
        ("wrong admin token", format!("Bearer {ADMIN}-not")),
        ("wrong scheme", format!("Basic {token}")),
    ];
    for protocol in PROTOCOLS {
        for key in ["Authorization", "authorization"] {
            for (what, value) in &bad {
                let mut c = WsClient::init_with_payload(&app.ws_url, protocol, json!({ key: value })).await;
                let closed = c.closed(Duration::from_secs(5)).await;
                assert_eq!(closed.code, 4403, "{protocol} {key} {what}: {closed:?}");
            }
            // the same key with a valid token is accepted
            let mut c =
                WsClient::init_with_payload(&app.ws_url, protocol, json!({ key: format!("Bearer {token}") })).await;
            assert_eq!(c.next_json().await.expect("connection_ack")["type"], "connection_ack", "{protocol} {key}");
        }
        // a credential that is not a string is not anonymous either
        let mut c = WsClient::init_with_payload(&app.ws_url, protocol, json!({"Authorization": 42})).await;
        assert_eq!(c.closed(Duration::from_secs(5)).await.code, 4403, "{protocol}");
    }
}

// ---------------------------------------------------------------------------
// transport

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_closes_only_that_socket_with_4400() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let (product, token, _) = shop(&app).await;
    let mut good = Vec::new();
    for protocol in PROTOCOLS {
        let mut c = WsClient::init(&app.ws_url, protocol, Some(ADMIN)).await;
        c.subscribe("all", ORDER_CANCELLED, variables(None)).await;
        c.barrier().await;
        good.push(c);
    }
    let malformed = [
        "this is not JSON",
        r#"{"id": "x"}"#,
        r#"{"type": 7}"#,
        r#"{"type": "no-such-message"}"#,
        r#"{"type": "subscribe", "payload": {"query": "subscription { orderCancelled { reason } }"}}"#,
    ];
    for protocol in PROTOCOLS {
        for text in malformed {
            let mut bad = WsClient::init(&app.ws_url, protocol, Some(ADMIN)).await;
            bad.subscribe("all", ORDER_CANCELLED, variables(None)).await;
            bad.barrier().await;
            let text = if protocol == LEGACY { text.replace("\"subscribe\"", "\"start\"") } else { text.to_string() };
            bad.send_raw(&text).await;
            let closed = bad.closed(Duration::from_secs(5)).await;
            assert_eq!(closed.code, 4400, "{protocol} {text}: {closed:?}");
        }
    }
    let order = app.order_id(&token, &[(&product, 1)]).await;
    assert!(app.cancel(&token, &order).await.get("errors").is_none());
    for c in &mut good {
        assert_cancelled(&c.next_data("all").await, &order, "CUSTOMER");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_connection_init_is_closed_with_4408() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.ws_init_timeout = Duration::from_millis(300)).await;
    for protocol in PROTOCOLS {
        let mut idle = WsClient::connect(&app.ws_url, protocol).await;
        let started = tokio::time::Instant::now();
        let closed = idle.closed(Duration::from_secs(5)).await;
        assert_eq!(closed.code, 4408, "{protocol}: {closed:?}");
        assert!(started.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", started.elapsed());

        // one that did initialise in time is not affected by the timeout
        let mut ready = WsClient::init(&app.ws_url, protocol, None).await;
        ready.assert_silent(Duration::from_millis(700)).await;
        ready.barrier().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_the_socket_with_their_codes() {
    let app = common::spawn_app(Backend::Sqlite).await;
    for protocol in PROTOCOLS {
        // subscribe before connection_init
        let mut c = WsClient::connect(&app.ws_url, protocol).await;
        c.subscribe("1", ORDER_CANCELLED, variables(None)).await;
        assert_eq!(c.closed(Duration::from_secs(5)).await.code, 4401, "{protocol}");

        // a second connection_init
        let mut c = WsClient::init(&app.ws_url, protocol, Some(ADMIN)).await;
        c.send(json!({"type": "connection_init", "payload": {}})).await;
        assert_eq!(c.closed(Duration::from_secs(5)).await.code, 4429, "{protocol}");

        // an id that is still running
        let mut c = WsClient::init(&app.ws_url, protocol, Some(ADMIN)).await;
        c.subscribe("1", ORDER_CANCELLED, variables(None)).await;
        c.subscribe("1", ORDER_CANCELLED, variables(None)).await;
        assert_eq!(c.closed(Duration::from_secs(5)).await.code, 4409, "{protocol}");
    }

    // graphql-transport-ws: a ping is answered with a pong
    let mut c = WsClient::init(&app.ws_url, TRANSPORT, None).await;
    c.send(json!({"type": "ping"})).await;
    let msg = tokio::time::timeout(Duration::from_secs(5), c.socket.next()).await.expect("pong in time");
    let text = match msg {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => t.to_string(),
        other => panic!("expected pong, got {other:?}"),
    };
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["type"], "pong");

    // legacy: stop answers complete, connection_terminate closes normally
    let mut c = WsClient::init(&app.ws_url, LEGACY, Some(ADMIN)).await;
    c.subscribe("1", ORDER_CANCELLED, variables(None)).await;
    c.barrier().await;
    c.unsubscribe("1").await;
    c.next_complete("1").await;
    c.send(json!({"type": "connection_terminate"})).await;
    assert_eq!(c.closed(Duration::from_secs(5)).await.code, 1000);
}

// ---------------------------------------------------------------------------
// limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_over_the_per_connection_cap_are_refused_with_rate_limited() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.ws_max_subscriptions = 2).await;
    let (product, token, _) = shop(&app).await;
    for protocol in PROTOCOLS {
        let order = app.order_id(&token, &[(&product, 1)]).await;
        let mut c = WsClient::init(&app.ws_url, protocol, Some(&token)).await;
        c.subscribe("a", ORDER_CANCELLED, variables(None)).await;
        c.subscribe("b", ORDER_UPDATED, variables(Some(&order))).await;
        assert_eq!(updated(&c.next_data("b").await)["status"], "PENDING_PAYMENT");
        c.subscribe("c", ORDER_UPDATED, variables(Some(&order))).await;
        let errors = c.next_errors("c").await;
        assert_eq!(errors[0]["extensions"]["code"], "RATE_LIMITED", "{protocol}: {errors:?}");
        assert!(errors[0]["message"].as_str().unwrap().contains('2'), "the message names the cap: {errors:?}");

        // the refusal ends only that operation: a freed slot can be used again
        c.unsubscribe("b").await;
        if protocol == LEGACY {
            c.next_complete("b").await;
        }
        c.subscribe("d", ORDER_UPDATED, variables(Some(&order))).await;
        assert_eq!(updated(&c.next_data("d").await)["status"], "PENDING_PAYMENT");

        // and the running ones keep receiving
        assert!(app.cancel(&token, &order).await.get("errors").is_none());
        let mut seen = Vec::new();
        for _ in 0..3 {
            let v = c.next_json().await.expect("socket open");
            seen.push((v["id"].as_str().unwrap().to_string(), v["type"].as_str().unwrap().to_string()));
            if v["id"] == "a" {
                assert_cancelled(&v["payload"], &order, "CUSTOMER");
            } else if v["type"] != "complete" {
                assert_eq!(updated(&v["payload"])["status"], "CANCELLED");
            }
        }
        let data = if protocol == LEGACY { "data" } else { "next" };
        seen.sort();
        let expected = [("a", data), ("d", "complete"), ("d", data)];
        let mut expected: Vec<(String, String)> =
            expected.iter().map(|(i, t)| (i.to_string(), t.to_string())).collect();
        expected.sort();
        assert_eq!(seen, expected, "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_process_cap_are_closed_with_1013() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.ws_max_connections = 2;
        // every client here is 127.0.0.1: its share is the whole cap
        c.ws_max_connections_per_ip = Some(2);
    })
    .await;
    let mut first = WsClient::init(&app.ws_url, TRANSPORT, None).await;
    let mut second = WsClient::init(&app.ws_url, LEGACY, None).await;
    for protocol in PROTOCOLS {
        let mut over = WsClient::connect(&app.ws_url, protocol).await;
        let closed = over.closed(Duration::from_secs(5)).await;
        assert_eq!(closed.code, 1013, "{protocol}: {closed:?}");
        assert!(!closed.reason.is_empty(), "the close says why");
    }
    // the open ones are unaffected
    second.barrier().await;

    // a closed connection frees its place
    first.socket.close(None).await.unwrap();
    common::eventually(Duration::from_secs(5), || async {
        let mut c = WsClient::connect(&app.ws_url, TRANSPORT).await;
        c.send(json!({"type": "connection_init", "payload": {}})).await;
        match c.next_json().await {
            Ok(v) if v["type"] == "connection_ack" => Some(()),
            Ok(v) => panic!("unexpected {v}"),
            Err(closed) => {
                assert_eq!(closed.code, 1013);
                None
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_hold_up_a_fast_one() {
    const ORDERS: usize = 300;
    const SLOW_SUBSCRIPTIONS: usize = 10;
    /// Queries whose answers (about 380 kB each) the slow client reads late.
    const STUFFING: usize = 16;
    let app =
        common::spawn_app_with(Backend::Sqlite, |c| c.ws_max_subscriptions = SLOW_SUBSCRIPTIONS + STUFFING + 1).await;
    let (product, token, _) = shop(&app).await;

    // 100 products with long names, each name asked for under 18 aliases:
    // one answer of ~380 kB, within the complexity and alias limits.
    let (app_ref, token_ref, product_ref) = (&app, &token, &product);
    stream::iter(0..100)
        .for_each_concurrent(8, |i| async move {
            let name = "n".repeat(200);
            let input =
                json!({"sku": format!("long-{i}"), "name": name, "priceCents": 1, "currency": "USD", "stock": 1});
            let mutation = "mutation($i: CreateProductInput!) { createProduct(input: $i) { id } }";
            app_ref.data(Some(ADMIN), mutation, json!({"i": input})).await;
        })
        .await;
    let aliases: String = (0..18).map(|i| format!("a{i}: name ")).collect();
    let stuffing = format!("query {{ products(first: 100) {{ nodes {{ {aliases} }} }} }}");

    // The slow client subscribes, then asks for far more than the socket
    // buffers hold (a 4 kB receive buffer here, at most 4 MB on the
    // server's side) and never reads: the server cannot write to it.
    let mut slow = WsClient::connect_with_recv_buffer(&app.ws_url, TRANSPORT, 4096).await;
    slow.send(json!({"type": "connection_init", "payload": bearer(ADMIN)})).await;
    assert_eq!(slow.next_json().await.unwrap()["type"], "connection_ack");
    for i in 0..SLOW_SUBSCRIPTIONS {
        slow.subscribe(&format!("s{i}"), ORDER_CANCELLED, variables(None)).await;
    }
    slow.barrier().await;
    for i in 0..STUFFING {
        slow.subscribe(&format!("q{i}"), &stuffing, json!({})).await;
    }

    let mut fast = WsClient::init(&app.ws_url, LEGACY, Some(ADMIN)).await;
    fast.subscribe("all", ORDER_CANCELLED, variables(None)).await;
    fast.barrier().await;

    let orders: Vec<String> = stream::iter(0..ORDERS)
        .map(|_| async move { app_ref.order_id(token_ref, &[(product_ref, 1)]).await })
        .buffer_unordered(8)
        .collect()
        .await;

    // the fast client reads while the cancellations happen
    let reader = tokio::spawn(async move {
        let mut ids = std::collections::HashSet::new();
        while ids.len() < ORDERS {
            let payload = fast.next_data("all").await;
            let id = payload["data"]["orderCancelled"]["order"]["id"].as_str().unwrap().to_string();
            assert!(ids.insert(id), "an event arrived twice");
        }
        (fast, ids, tokio::time::Instant::now())
    });
    stream::iter(&orders)
        .for_each_concurrent(8, |id| async move {
            let v = app_ref.cancel(ADMIN, id).await;
            assert!(v.get("errors").is_none(), "{v}");
        })
        .await;
    let cancelled_all = tokio::time::Instant::now();
    let (mut fast, ids, done) = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the fast client received every event in time")
        .unwrap();
    assert_eq!(ids.len(), ORDERS);
    let behind = done.saturating_duration_since(cancelled_all);
    assert!(behind < Duration::from_secs(2), "the fast client finished {behind:?} after the last cancellation");
    fast.assert_silent(Duration::from_millis(200)).await;

    // the slow one lost nothing: once it reads, it gets every answer and
    // every event (ORDERS is far below the broadcast buffer)
    let mut counts = std::collections::HashMap::<String, usize>::new();
    let expected = SLOW_SUBSCRIPTIONS * ORDERS + 2 * STUFFING;
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..expected {
            let v = slow.next(Duration::from_secs(10)).await.expect("socket open");
            assert!(v["type"] == "next" || v["type"] == "complete", "{v}");
            *counts.entry(v["id"].as_str().unwrap().to_string()).or_default() += 1;
        }
    })
    .await;
    assert!(drained.is_ok(), "the slow client could not catch up");
    for i in 0..SLOW_SUBSCRIPTIONS {
        assert_eq!(counts[&format!("s{i}")], ORDERS, "s{i}");
    }
    for i in 0..STUFFING {
        assert_eq!(counts[&format!("q{i}")], 2, "q{i}: the answer and complete");
    }
    slow.assert_silent(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_and_client_messages_are_served_while_events_stream_in() {
    use tokio_tungstenite::tungstenite::Message;
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.ws_keepalive = Duration::from_millis(100)).await;
    let (product, token, _) = shop(&app).await;
    for protocol in PROTOCOLS {
        let (keepalive, data) = if protocol == LEGACY { ("ka", "data") } else { ("ping", "next") };
        let mut c = WsClient::init(&app.ws_url, protocol, Some(ADMIN)).await;
        c.subscribe("all", ORDER_CANCELLED, variables(None)).await;
        c.barrier().await;
        let mut orders = Vec::new();
        for _ in 0..20 {
            orders.push(app.order_id(&token, &[(&product, 1)]).await);
        }
        // a cancellation every 50 ms for a second, while the socket is read
        let cancelling = async {
            for order in &orders {
                assert_eq!(app.cancel(&token, order).await["data"]["cancelOrder"]["status"], "CANCELLED");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let reading = async {
            let (mut events, mut keepalives, mut answered) = (0, 0, false);
            let query = json!({"id": "q", "type": if protocol == LEGACY { "start" } else { "subscribe" },
                "payload": {"query": "{ products(first: 1) { pageInfo { hasNextPage } } }"}});
            while events < orders.len() || !answered {
                let msg = tokio::time::timeout(Duration::from_secs(10), c.socket.next())
                    .await
                    .unwrap_or_else(|_| panic!("{protocol}: stalled after {events} events, {keepalives} keep-alives"));
                let Some(Ok(Message::Text(text))) = msg else { panic!("{protocol}: socket ended: {msg:?}") };
                let v: Value = serde_json::from_str(text.as_str()).unwrap();
                match (v["type"].as_str().unwrap_or_default(), v["id"].as_str()) {
                    (t, None) if t == keepalive => keepalives += 1,
                    (t, Some("all")) if t == data => {
                        events += 1;
                        if events == 5 {
                            // a query mid-stream: read, run and answered between events
                            c.socket.send(Message::text(query.to_string())).await.unwrap();
                        }
                    }
                    (t, Some("q")) if t == data => {
                        assert!(v["payload"].get("errors").is_none(), "{protocol}: {v}");
                        answered = true;
                    }
                    ("complete", Some("q")) | ("pong", None) => {}
                    _ => panic!("{protocol}: unexpected {v}"),
                }
            }
            keepalives
        };
        let ((), keepalives) = tokio::join!(cancelling, reading);
        // a second of events at a 100 ms keep-alive: ten or so, and not
        // crowded out by the events
        assert!(keepalives >= 4, "{protocol}: only {keepalives} keep-alives in a second of events");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_closes_websockets_with_1001() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let mut clients = Vec::new();
    for protocol in PROTOCOLS {
        let mut c = WsClient::init(&app.ws_url, protocol, Some(ADMIN)).await;
        c.subscribe("all", ORDER_CANCELLED, variables(None)).await;
        c.barrier().await;
        clients.push(c);
        // and one that has not even initialised
        clients.push(WsClient::connect(&app.ws_url, protocol).await);
    }
    let stopping = tokio::spawn(app.stop());
    for c in &mut clients {
        let closed = c.closed(Duration::from_secs(10)).await;
        assert_eq!(closed.code, 1001, "{closed:?}");
    }
    tokio::time::timeout(Duration::from_secs(15), stopping).await.expect("the server stopped").unwrap();
}

// ---------------------------------------------------------------------------
// shared executions

/// Subscribers with the same document and the same view of the orders share
/// one execution whose frames are rendered once per event. Nobody may notice
/// that from what arrives: each subscriber gets every event it may see,
/// once, from the moment it subscribed; customers sharing a document text
/// still see only their own orders; one leaving stops nobody else; and the
/// execution ends with its last subscriber (a real process, for its metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_subscriptions_share_one_execution_and_each_subscriber_still_gets_exactly_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&[
        ("DATABASE_URL", format!("sqlite://{}", dir.path().join("shared.db").display())),
        ("REDIS_URL", common::redis_url().await),
        ("REDIS_KEY_PREFIX", common::unique_prefix()),
        ("ADMIN_TOKEN", ADMIN.into()),
        ("JWT_SECRET", JWT_SECRET.into()),
    ])
    .await;
    let product = server.create_product("SH-1", 100, 10).await;
    let (token_a, token_b) = (server.customer().await.0, server.customer().await.0);
    let place = |token: String| {
        let (server, product) = (&server, product.clone());
        async move {
            let q = "mutation($p: ID!) { createOrder(input: {lines: [{productId: $p, quantity: 1}]}) { id } }";
            server.data(Some(&token), q, json!({"p": product})).await["createOrder"]["id"].as_str().unwrap().to_string()
        }
    };
    let cancel_q = "mutation($id: ID!) { cancelOrder(id: $id) { id } }";

    // the admin: one socket with the document twice, one legacy, one more;
    // the two customers with the very same text
    let mut twice = WsClient::init(&server.ws_url, TRANSPORT, Some(ADMIN)).await;
    let mut legacy = WsClient::init(&server.ws_url, LEGACY, Some(ADMIN)).await;
    let mut leaver = WsClient::init(&server.ws_url, TRANSPORT, Some(ADMIN)).await;
    let mut a = WsClient::init(&server.ws_url, TRANSPORT, Some(&token_a)).await;
    let mut b = WsClient::init(&server.ws_url, TRANSPORT, Some(&token_b)).await;
    twice.subscribe("y", ORDER_CANCELLED, variables(None)).await;
    for c in [&mut twice, &mut legacy, &mut leaver, &mut a, &mut b] {
        c.subscribe("x", ORDER_CANCELLED, variables(None)).await;
        c.barrier().await;
    }
    let m = server.metrics().await;
    assert_eq!(metric(&m, "shopgraph_websocket_subscriptions"), Some(6.0), "{m}");
    // one for the admin, one per customer
    assert_eq!(metric(&m, "shopgraph_websocket_shared_executions"), Some(3.0), "{m}");

    // A's order: every admin subscription and A, once; not B
    let first = place(token_a.clone()).await;
    server.data(Some(&token_a), cancel_q, json!({"id": first})).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let v = twice.next(Duration::from_secs(10)).await.expect("socket open");
        assert_eq!(v["type"], "next", "{v}");
        assert_cancelled(&v["payload"], &first, "CUSTOMER");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(ids, ["x", "y"]);
    for c in [&mut legacy, &mut leaver, &mut a] {
        assert_cancelled(&c.next_data("x").await, &first, "CUSTOMER");
    }

    // one admin subscriber leaves, another arrives: it gets only what follows
    leaver.unsubscribe("x").await;
    let mut late = WsClient::init(&server.ws_url, TRANSPORT, Some(ADMIN)).await;
    late.subscribe("x", ORDER_CANCELLED, variables(None)).await;
    late.barrier().await;
    let second = place(token_b.clone()).await;
    server.data(Some(ADMIN), cancel_q, json!({"id": second})).await;
    for c in [&mut legacy, &mut late, &mut b] {
        assert_cancelled(&c.next_data("x").await, &second, "ADMIN");
    }
    for _ in 0..2 {
        let v = twice.next(Duration::from_secs(10)).await.expect("socket open");
        assert_cancelled(&v["payload"], &second, "ADMIN");
    }
    let mut quiet = [twice, legacy, leaver, late, a, b];
    all_silent(&mut quiet, QUIET).await;

    // the executions end with their last subscribers
    drop(quiet);
    common::eventually(Duration::from_secs(10), || async {
        let m = server.metrics().await;
        (metric(&m, "shopgraph_websocket_subscriptions") == Some(0.0)
            && metric(&m, "shopgraph_websocket_shared_executions") == Some(0.0))
        .then_some(())
    })
    .await;
}

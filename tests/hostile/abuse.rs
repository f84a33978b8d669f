//! Abuse limits: inventory hoarding (`MAX_PENDING_ORDERS`, pending units,
//! `createOrder` rate), password guessing (per client address, per account,
//! across instances), `TRUSTED_PROXIES`, and what HTTP says about refusals
//! (429 + `Retry-After`, 401 + `WWW-Authenticate`). Redis being down loosens
//! the login and registration limits to per-process, never lifts them; the
//! `createOrder` rate is counted in the database and stays exact.

use std::time::{Duration, Instant};

use reqwest::{header::HeaderMap, StatusCode};
use serde_json::{json, Value};

use crate::common::{self, code, redis::PrivateRedis, Backend, TestApp};

const LOGIN: &str = "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { token } }";
const ORDER: &str = "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id status } }";

/// What a client sees of one POST: status, headers, body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn retry_after(&self) -> u64 {
        let h = self.headers.get("retry-after").unwrap_or_else(|| panic!("no Retry-After: {}", self.body));
        h.to_str().unwrap().parse().expect("Retry-After in whole seconds")
    }

    fn code(&self) -> &str {
        code(&self.body)
    }
}

/// POSTs a document with extra headers (`authorization`, `x-forwarded-for`, …).
async fn post(app: &TestApp, headers: &[(&str, &str)], query: &str, variables: Value) -> Answer {
    let mut req = app.http.post(format!("{}/graphql", app.url)).json(&json!({"query": query, "variables": variables}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("request sent");
    let (status, headers) = (res.status(), res.headers().clone());
    Answer { status, headers, body: res.json().await.expect("JSON body") }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn order(app: &TestApp, token: &str, product: &str, qty: i64, key: Option<&str>) -> Answer {
    let auth = bearer(token);
    let lines = json!([{"productId": product, "quantity": qty}]);
    post(app, &[("authorization", &auth)], ORDER, json!({"i": {"lines": lines, "idempotencyKey": key}})).await
}

async fn register(app: &TestApp, email: &str) {
    let q = "mutation($e: String!) { registerCustomer(email: $e, password: \"correct horse battery\") { token } }";
    app.data(None, q, json!({"e": email})).await;
}

/// A login attempt from `xff` (as a proxy would forward it, if any).
async fn login(app: &TestApp, xff: Option<&str>, email: &str, password: &str) -> Answer {
    let headers: Vec<(&str, &str)> = xff.map(|x| ("x-forwarded-for", x)).into_iter().collect();
    post(app, &headers, LOGIN, json!({"e": email, "p": password})).await
}

/// Orders of `qty` sent all at once, `a.1` from customer `a` and `b.1`
/// from `b`, interleaved. Returns how many each placed and, for every 429,
/// whether it was `b`'s and its message; anything else fails the test.
async fn burst(
    app: &std::sync::Arc<TestApp>,
    product: &str,
    qty: i64,
    a: (&str, usize),
    b: (&str, usize),
) -> (usize, usize, Vec<(bool, String)>) {
    let every = (a.1 + b.1) / b.1.max(1);
    let tasks: Vec<_> = (0..a.1 + b.1)
        .map(|i| {
            let is_b = i % every == 0 && i / every < b.1;
            let token = if is_b { b.0.to_string() } else { a.0.to_string() };
            let (app, product) = (app.clone(), product.to_string());
            tokio::spawn(async move { (is_b, order(&app, &token, &product, qty, None).await) })
        })
        .collect();
    let (mut placed_a, mut placed_b, mut refused) = (0, 0, Vec::new());
    for t in tasks {
        let (is_b, answer) = t.await.unwrap();
        match answer.status {
            StatusCode::OK if is_b => placed_b += 1,
            StatusCode::OK => placed_a += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused.push((is_b, answer.body["errors"][0]["message"].as_str().unwrap_or_default().to_string()))
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    (placed_a, placed_b, refused)
}

fn assert_rate_limited(a: &Answer, max_wait: u64) {
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.code(), "RATE_LIMITED", "{}", a.body);
    let wait = a.retry_after();
    assert!((1..=max_wait).contains(&wait), "Retry-After {wait}");
    assert_eq!(a.body["errors"][0]["extensions"]["retryAfter"], wait, "{}", a.body);
}

crate::both_stores! {
    a_hoarder_at_max_pending_orders_is_refused_and_others_still_order with |c: &mut shopgraph::Config| c.max_pending_orders = 3 => |app: TestApp| async move {
        let product = app.create_product("HOARD", 100, 100).await;
        let (a, _) = app.customer().await;
        let (b, _) = app.customer().await;
        let first = order(&app, &a, &product, 1, Some("first")).await;
        let first_id = first.body["data"]["createOrder"]["id"].clone();
        for _ in 0..2 {
            assert_eq!(order(&app, &a, &product, 1, None).await.status, StatusCode::OK);
        }
        let refused = order(&app, &a, &product, 1, None).await;
        assert_rate_limited(&refused, 60);
        let message = refused.body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("3 unpaid orders"), "{message}");
        assert_eq!(app.stock(&product).await, 97, "a refused order reserves nothing");

        // an idempotent replay places nothing, so it is answered
        let replay = order(&app, &a, &product, 1, Some("first")).await;
        assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
        assert_eq!(replay.body["data"]["createOrder"]["id"], first_id);

        // another customer is not affected
        assert_eq!(order(&app, &b, &product, 1, None).await.status, StatusCode::OK);
        // paying one frees a place
        app.pay(&a, first_id.as_str().unwrap()).await;
        assert_eq!(order(&app, &a, &product, 1, None).await.status, StatusCode::OK);
        assert_eq!(app.stock(&product).await, 95);
    };

    concurrent_orders_at_the_limit_do_not_both_pass with |c: &mut shopgraph::Config| c.max_pending_orders = 5 => |app: TestApp| async move {
        let product = app.create_product("RACE", 100, 1000).await;
        let (a, _) = app.customer().await;
        let (b, _) = app.customer().await;
        // 24 at once from one customer, 4 from another, so that Postgres
        // places them in batches mixing both customers
        let app = std::sync::Arc::new(app);
        let (placed_a, placed_b, refused) = burst(&app, &product, 2, (&a, 24), (&b, 4)).await;
        assert!(refused.iter().all(|(is_b, _)| !is_b), "b holds fewer than the limit: {refused:?}");
        assert_eq!((placed_a, placed_b, refused.len()), (5, 4, 19));
        assert_eq!(app.stock(&product).await, 1000 - 2 * 9, "only the placed orders hold stock");
    };

    pending_units_are_capped_per_customer with |c: &mut shopgraph::Config| c.max_pending_units = 10 => |app: TestApp| async move {
        let product = app.create_product("UNITS", 100, 100).await;
        let (a, _) = app.customer().await;
        assert_eq!(order(&app, &a, &product, 6, None).await.status, StatusCode::OK);
        let refused = order(&app, &a, &product, 5, None).await;
        assert_rate_limited(&refused, 60);
        assert!(refused.body["errors"][0]["message"].as_str().unwrap().contains("at most 10 units"));
        assert_eq!(order(&app, &a, &product, 4, None).await.status, StatusCode::OK);
        assert_eq!(app.stock(&product).await, 90);
        // stock refusals keep their own code
        let (b, _) = app.customer().await;
        assert_eq!(order(&app, &b, &product, 1000, None).await.code(), "INSUFFICIENT_STOCK");
    };

    create_order_is_rate_limited_per_customer_but_replays_are_answered with |c: &mut shopgraph::Config| c.order_rate_limit_per_minute = 3 => |app: TestApp| async move {
        let product = app.create_product("RATE", 100, 100).await;
        let (a, _) = app.customer().await;
        let (b, _) = app.customer().await;
        let first = order(&app, &a, &product, 1, Some("k1")).await;
        // a refused attempt counts too
        assert_eq!(order(&app, &a, &product, 1000, None).await.code(), "INSUFFICIENT_STOCK");
        assert_eq!(order(&app, &a, &product, 1, None).await.status, StatusCode::OK);
        let refused = order(&app, &a, &product, 1, None).await;
        assert_rate_limited(&refused, 60);
        assert!(refused.body["errors"][0]["message"].as_str().unwrap().contains("at most 3 a minute"));
        let replay = order(&app, &a, &product, 1, Some("k1")).await;
        assert_eq!(replay.status, StatusCode::OK, "{}", replay.body);
        assert_eq!(replay.body["data"]["createOrder"]["id"], first.body["data"]["createOrder"]["id"]);
        assert_rate_limited(&order(&app, &a, &product, 1, Some("k2")).await, 60);
        assert_eq!(order(&app, &b, &product, 1, None).await.status, StatusCode::OK);
        assert_eq!(app.stock(&product).await, 97);
    };

    // Concurrent orders are counted one by one, also when Postgres places
    // several of one customer in one batch: exactly the limit passes for each.
    a_burst_of_orders_is_counted_exactly_at_the_rate_limit with |c: &mut shopgraph::Config| c.order_rate_limit_per_minute = 7 => |app: TestApp| async move {
        let app = std::sync::Arc::new(app);
        let product = app.create_product("BURST", 100, 1000).await;
        let (a, _) = app.customer().await;
        let (b, _) = app.customer().await;
        let (placed_a, placed_b, refused) = burst(&app, &product, 1, (&a, 20), (&b, 10)).await;
        assert!(refused.iter().all(|(_, message)| message.contains("at most 7 a minute")), "{refused:?}");
        // a sent 20, b 10: each gets 7
        assert_eq!((placed_a, placed_b, refused.len()), (7, 7, 16));
        assert_eq!(app.stock(&product).await, 1000 - 14);
    };
}

/// The `createOrder` rate is counted by the placing transaction, in the
/// database every instance shares: exact across instances, and as exact
/// with Redis gone.
async fn the_order_rate_is_shared_by_instances_and_holds_with_redis_down(backend: Backend) {
    let mut redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let one = common::spawn_app_with(backend, |c| {
        c.redis_url = Some(url);
        c.order_rate_limit_per_minute = 4;
    })
    .await;
    let two = one.sibling().await;
    let product = one.create_product("SHARED", 100, 100).await;
    let (a, _) = one.customer().await;
    redis.kill();
    assert!(!redis.ping().await);
    for i in 0..4 {
        let app = if i % 2 == 0 { &one } else { &two };
        let placed = order(app, &a, &product, 1, None).await;
        assert_eq!(placed.status, StatusCode::OK, "{}", placed.body);
    }
    for app in [&one, &two] {
        let refused = order(app, &a, &product, 1, None).await;
        assert_rate_limited(&refused, 60);
        assert!(refused.body["errors"][0]["message"].as_str().unwrap().contains("at most 4 a minute"));
    }
    assert_eq!(one.stock(&product).await, 96);
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_rate_is_shared_by_instances_and_holds_with_redis_down_sqlite() {
    the_order_rate_is_shared_by_instances_and_holds_with_redis_down(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_rate_is_shared_by_instances_and_holds_with_redis_down_postgres() {
    if common::skip_without_postgres() {
        return;
    }
    the_order_rate_is_shared_by_instances_and_holds_with_redis_down(Backend::Postgres).await;
}

/// Past its rate, a customer's attempts are refused by the instance that
/// saw it, without reaching the database, until the window ends; the
/// database's count stays where the refusal started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_over_the_order_rate_do_not_reach_the_database() {
    if common::skip_without_postgres() {
        return;
    }
    let app = common::spawn_app_with(Backend::Postgres, |c| c.order_rate_limit_per_minute = 2).await;
    let product = app.create_product("HAMMER", 100, 100).await;
    let (a, _) = app.customer().await;
    for _ in 0..2 {
        assert_eq!(order(&app, &a, &product, 1, None).await.status, StatusCode::OK);
    }
    for _ in 0..20 {
        let refused = order(&app, &a, &product, 1, None).await;
        assert_rate_limited(&refused, 60);
        assert!(refused.body["errors"][0]["message"].as_str().unwrap().contains("at most 2 a minute"));
    }
    let db = sqlx::PgPool::connect(&app.config.database_url).await.unwrap();
    let counted: i32 = sqlx::query_scalar("SELECT max(placements) FROM customers").fetch_one(&db).await.unwrap();
    assert_eq!(counted, 3, "the first refused attempt was counted, the 19 after it never reached the database");
    // another instance asks the database, which refuses as well
    let two = app.sibling().await;
    assert_rate_limited(&order(&two, &a, &product, 1, None).await, 60);
    assert_eq!(app.stock(&product).await, 98);
    two.stop().await;
}

/// A Redis that restarted has forgotten the counting script: the next hit
/// loads it again and is still counted in Redis, shared by instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_still_shared_after_redis_forgets_its_scripts() {
    let redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let one = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        c.login_rate_limit_per_account = 4;
    })
    .await;
    let two = one.sibling().await;
    register(&one, "flush@example.com").await;
    let a = login(&one, None, "flush@example.com", "guess 0").await;
    assert_eq!(a.code(), "UNAUTHENTICATED", "{}", a.body);
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut conn).await.unwrap();
    for i in 1..4 {
        let app = if i % 2 == 0 { &one } else { &two };
        let a = login(app, None, "flush@example.com", &format!("guess {i}")).await;
        assert_eq!(a.code(), "UNAUTHENTICATED", "{}", a.body);
    }
    // the fifth attempt, on either instance, is over the shared budget
    assert_rate_limited(&login(&two, None, "flush@example.com", "guess 4").await, 60);
    assert_rate_limited(&login(&one, None, "flush@example.com", "guess 5").await, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_limited_per_account_across_instances() {
    let one = common::spawn_app_with(Backend::Sqlite, |c| c.login_rate_limit_per_account = 4).await;
    let two = one.sibling().await;
    register(&one, "victim@example.com").await;
    register(&one, "other@example.com").await;
    // guesses alternate between the instances; the budget is shared
    for i in 0..4 {
        let app = if i % 2 == 0 { &one } else { &two };
        let a = login(app, None, "Victim@Example.com", &format!("guess {i}")).await;
        assert_eq!(a.code(), "UNAUTHENTICATED", "{}", a.body);
    }
    for app in [&one, &two] {
        let a = login(app, None, "victim@example.com", "correct horse battery").await;
        assert_rate_limited(&a, 60);
        assert!(a.body["errors"][0]["message"].as_str().unwrap().contains("account"), "{}", a.body);
    }
    // other accounts are served
    let ok = login(&two, None, "other@example.com", "correct horse battery").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.body["data"]["login"]["token"].is_string(), "{}", ok.body);
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_limited_per_client_address_named_by_a_trusted_proxy() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.auth_rate_limit_per_minute = 3;
        c.trusted_proxies = shopgraph::client_addr::parse_cidrs("127.0.0.0/8").unwrap();
    })
    .await;
    register(&app, "someone@example.com").await; // from 127.0.0.1: its own budget
    for i in 0..3 {
        let a = login(&app, Some("198.51.100.1"), &format!("u{i}@example.com"), "nope nope").await;
        assert_eq!(a.code(), "UNAUTHENTICATED", "{}", a.body);
    }
    // many accounts from one address: the address is stopped
    let a = login(&app, Some("198.51.100.1"), "u9@example.com", "nope nope").await;
    assert_rate_limited(&a, 60);
    assert!(a.body["errors"][0]["message"].as_str().unwrap().contains("address"));
    // a client-written entry left of the proxy's does not change who it is
    let a = login(&app, Some("203.0.113.77, 198.51.100.1"), "u9@example.com", "nope nope").await;
    assert_rate_limited(&a, 60);
    // other clients behind the same proxy are not locked out
    let ok = login(&app, Some("198.51.100.2"), "someone@example.com", "correct horse battery").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);

    // IPv6: one /64 is one client
    for i in 0..3 {
        let a = login(&app, Some(&format!("2001:db8:0:7::{i}")), "u@example.com", "nope nope").await;
        assert_eq!(a.code(), "UNAUTHENTICATED", "{}", a.body);
    }
    assert_rate_limited(&login(&app, Some("2001:db8:0:7:ffff::1"), "u@example.com", "nope nope").await, 60);
    let other = login(&app, Some("2001:db8:0:8::1"), "u@example.com", "nope nope").await;
    assert_eq!(other.code(), "UNAUTHENTICATED", "{}", other.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    // no trusted proxies, then proxies that do not include the test's peer
    for trusted in ["", "10.0.0.0/8"] {
        let app = common::spawn_app_with(Backend::Sqlite, |c| {
            c.auth_rate_limit_per_minute = 2;
            c.trusted_proxies = shopgraph::client_addr::parse_cidrs(trusted).unwrap();
        })
        .await;
        for i in 0..2 {
            let a = login(&app, Some(&format!("192.0.2.{i}")), "x@example.com", "nope nope").await;
            assert_eq!(a.code(), "UNAUTHENTICATED", "{}", a.body);
        }
        // inventing a new address per request does not buy a new budget
        assert_rate_limited(&login(&app, Some("192.0.2.200"), "y@example.com", "nope nope").await, 60);
        assert_rate_limited(&login(&app, None, "y@example.com", "nope nope").await, 60);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_get_401_with_www_authenticate() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let forged = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXNfMSIsImV4cCI6OTk5OTk5OTk5OX0.forged";
    for accept in ["application/json", "application/graphql-response+json"] {
        for auth in ["Bearer garbage", forged, "Basic dXNlcjpwYXNz"] {
            let a =
                post(&app, &[("authorization", auth), ("accept", accept)], "{ products { nodes { id } } }", json!({}))
                    .await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{auth} / {accept}: {}", a.body);
            assert_eq!(a.headers["www-authenticate"], "Bearer error=\"invalid_token\"");
            assert_eq!(a.code(), "UNAUTHENTICATED");
            assert!(a.body.get("data").is_none(), "nothing runs: {}", a.body);
        }
    }
    // over GET too
    let res = app
        .http
        .get(format!("{}/graphql?query=%7Bproducts%7Bnodes%7Bid%7D%7D%7D", app.url))
        .header("authorization", "Bearer garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.headers()["www-authenticate"], "Bearer error=\"invalid_token\"");
    // a header that is not text is refused, not served as anonymous
    let not_utf8 = reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap();
    let res = app
        .http
        .post(format!("{}/graphql", app.url))
        .header("authorization", not_utf8)
        .json(&json!({"query": "{ products { nodes { id } } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // no header at all is anonymous and served
    let a = post(&app, &[], "{ products { nodes { id } } }", json!({})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_limits_still_apply_per_process_without_hanging() {
    let mut redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.redis_url = Some(url);
        c.login_rate_limit_per_account = 3;
    })
    .await;
    register(&app, "down@example.com").await;
    redis.kill();
    assert!(!redis.ping().await);
    // "without hanging": a Redis call waits at most its 150 ms budget, so a
    // login takes its argon2 time (seconds in a debug build on a busy
    // machine), never the minutes of a reconnect loop. Not a timing test.
    let hang = Duration::from_secs(15);
    for i in 0..3 {
        let started = Instant::now();
        let a = login(&app, None, "down@example.com", &format!("guess {i}")).await;
        assert_eq!(a.code(), "UNAUTHENTICATED", "{}", a.body);
        assert!(started.elapsed() < hang, "a login took {:?}", started.elapsed());
    }
    let started = Instant::now();
    let a = login(&app, None, "down@example.com", "correct horse battery").await;
    assert_rate_limited(&a, 60);
    assert!(started.elapsed() < hang);
    // other accounts are still served
    let a = login(&app, None, "nobody@example.com", "nope nope").await;
    assert_eq!(a.code(), "UNAUTHENTICATED", "{}", a.body);
}

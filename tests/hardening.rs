//! Hostile input and operations: query limits (depth, complexity, aliases,
//! document size, batches, introspection), HTTP limits (body size, request
//! timeout, websocket frames), rate limiting of logins, logs that follow an
//! order by its id and never carry a secret, `/metrics` after traffic,
//! `/readyz` naming what is down.

mod common;

use std::time::Duration;

use common::{
    child::{metric, ChildServer},
    code,
    redis::PrivateRedis,
    ws::WsClient,
    Backend, ADMIN, JWT_SECRET,
};
use futures_util::SinkExt;
use serde_json::{json, Value};
use shopgraph::graphql::{MAX_ALIASES, MAX_COMPLEXITY, MAX_QUERY_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn aliases(n: usize, field: &str) -> String {
    (0..n).map(|i| format!("a{i}: {field}")).collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_depth_complexity_aliases_size_and_batches_are_bounded() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let p = app.create_product("LIM", 100, 10).await;

    // depth
    let deep = "{ __schema { types { fields { type { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { name } } } } } } } } } } } } } } } } }";
    assert_eq!(code(&app.gql(None, deep, json!({})).await), "QUERY_TOO_COMPLEX");

    // complexity: 40 pages of 100 products, as nodes and as edges: 17 values each
    let page = "products(first: 100) { nodes { id sku name priceCents currency stock } edges { cursor node { id sku name priceCents currency stock } } }";
    let v = app.gql(None, &format!("{{ {} }}", aliases(40, page)), json!({})).await;
    assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "40 aliases but 40 × 100 × 17 > {MAX_COMPLEXITY}: {v}");

    // aliases: complexity alone does not bound them. 1,000 aliases of
    // `product(id) { id }` cost 1,000 × 2 = 2,000, within MAX_COMPLEXITY,
    // and would run 1,000 lookups; 200 aliases of `me` cost 200.
    const { assert!(1_000 * 2 <= MAX_COMPLEXITY && 200 < MAX_COMPLEXITY) };
    let many = format!("query($p: ID!) {{ {} }}", aliases(1_000, "product(id: $p) { id }"));
    let v = app.gql(None, &many, json!({"p": p})).await;
    assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("aliases"), "{v}");
    assert_eq!(
        code(&app.gql(None, &format!("{{ {} }}", aliases(200, "me { id }")), json!({})).await),
        "QUERY_TOO_COMPLEX"
    );
    // the bound is exact, and counts aliases inside fragments too
    let ok = app.gql(None, &format!("{{ {} }}", aliases(MAX_ALIASES, "__typename")), json!({})).await;
    assert!(ok.get("errors").is_none(), "{ok}");
    assert_eq!(ok["data"].as_object().unwrap().len(), MAX_ALIASES);
    let v = app.gql(None, &format!("{{ {} }}", aliases(MAX_ALIASES + 1, "__typename")), json!({})).await;
    assert_eq!(code(&v), "QUERY_TOO_COMPLEX");
    let in_fragment = format!("query {{ ...F }} fragment F on Query {{ {} }}", aliases(MAX_ALIASES + 1, "__typename"));
    assert_eq!(code(&app.gql(None, &in_fragment, json!({})).await), "QUERY_TOO_COMPLEX");
    // as a request error, it is a 400 under the GraphQL-over-HTTP media type
    let res = app
        .http
        .post(format!("{}/graphql", app.url))
        .header("accept", "application/graphql-response+json")
        .json(&json!({"query": format!("{{ {} }}", aliases(MAX_ALIASES + 1, "__typename"))}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    // document size: padding in a comment, just under and just over
    let pad = |n: usize| format!("{{ products(first: 1) {{ nodes {{ id }} }} }}\n#{}", "x".repeat(n));
    let under = pad(MAX_QUERY_BYTES - 100);
    assert!(under.len() <= MAX_QUERY_BYTES);
    assert!(app.gql(None, &under, json!({})).await.get("errors").is_none());
    let over = pad(MAX_QUERY_BYTES);
    let v = app.gql(None, &over, json!({})).await;
    assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("bytes"));

    // batches: 10 run, 11 are refused whole
    let one = json!({"query": "{ products(first: 1) { nodes { id } } }"});
    let res = app.http.post(format!("{}/graphql", app.url)).json(&vec![one.clone(); 10]).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let answers: Vec<Value> = res.json().await.unwrap();
    assert_eq!(answers.len(), 10);
    assert!(answers.iter().all(|a| a.get("errors").is_none()));
    let res = app.http.post(format!("{}/graphql", app.url)).json(&vec![one; 11]).send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(code(&res.json::<Value>().await.unwrap()), "QUERY_TOO_COMPLEX");

    // introspection is on by default
    let v = app.gql(None, "{ __schema { queryType { name } } }", json!({})).await;
    assert_eq!(v["data"]["__schema"]["queryType"]["name"], "Query", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_can_be_turned_off() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.introspection = false).await;
    // the engine answers introspection fields with null (no error); what
    // matters is that nothing of the schema is revealed
    for q in ["{ __schema { queryType { name } } }", "{ __type(name: \"Order\") { fields { name } } }"] {
        let v = app.gql(None, q, json!({})).await;
        let leaked = v["data"]["__schema"].is_object() || v["data"]["__type"].is_object();
        assert!(!leaked, "introspection answered: {v}");
        if let Some(errors) = v["errors"].as_array() {
            assert!(errors.iter().all(|e| e["extensions"]["code"].is_string()), "{v}");
        }
    }
    // everything else still works
    let v = app.gql(None, "{ products { nodes { id } } }", json!({})).await;
    assert!(v.get("errors").is_none(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_limits_body_size_request_timeout_and_websocket_frames() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.request_timeout = Duration::from_secs(1)).await;
    let url = format!("{}/graphql", app.url);

    // a body over 256 KiB: 413, with a coded error
    let big = json!({"query": format!("{{ products {{ nodes {{ id }} }} }}\n#{}", "x".repeat(300 * 1024))});
    let res = app.http.post(&url).json(&big).send().await.unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(code(&res.json::<Value>().await.unwrap()), "QUERY_TOO_COMPLEX");

    // a websocket outlives REQUEST_TIMEOUT
    let mut ws = WsClient::init(&app.ws_url, "graphql-transport-ws", None).await;

    // a body that never finishes arriving: 408 after REQUEST_TIMEOUT
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = "POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"query\":";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("\"code\"") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("answered in time");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"INTERNAL\""), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(900), "answered before the timeout: {answer}");

    // still served, past the request timeout
    ws.barrier().await;

    // a frame over 64 KiB ends that socket, and only that one
    let mut victim = WsClient::init(&app.ws_url, "graphql-transport-ws", None).await;
    let huge = json!({"type": "ping", "payload": {"pad": "x".repeat(70 * 1024)}}).to_string();
    let _ = victim.socket.send(Message::Text(huge.into())).await;
    let closed = victim.closed(Duration::from_secs(5)).await;
    assert!([1009, 1006, 1002].contains(&closed.code), "{closed:?}");
    ws.barrier().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_beyond_the_rate_limit_are_refused_with_rate_limited() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.auth_rate_limit_per_minute = 3).await;
    let login = "mutation { login(email: \"nobody@example.com\", password: \"wrong password\") { token } }";
    for _ in 0..3 {
        assert_eq!(code(&app.gql(None, login, json!({})).await), "UNAUTHENTICATED");
    }
    let v = app.gql(None, login, json!({})).await;
    assert_eq!(code(&v), "RATE_LIMITED", "{v}");
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("too many attempts") && message.contains("try again in"), "{message}");
    // registrations share the budget; other operations do not
    let register =
        "mutation { registerCustomer(email: \"new@example.com\", password: \"correct horse battery\") { token } }";
    assert_eq!(code(&app.gql(None, register, json!({})).await), "RATE_LIMITED");
    assert!(app.gql(None, "{ products { nodes { id } } }", json!({})).await.get("errors").is_none());
}

/// The JSON log lines of a child process.
fn json_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {l}")))
        .collect()
}

/// The order a log line is about: its own `order_id` field or its span's.
fn order_of(line: &Value) -> Option<&str> {
    line["fields"]["order_id"].as_str().or(line["span"]["order_id"].as_str())
}

/// With `LOG_FORMAT=json` (at debug level), every line is JSON, each
/// order's life (placed, paid or cancelled with reason and source) can be
/// followed by its id, and no password, token or secret is ever written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_each_order_by_id_and_never_carry_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let password = "s3cret-Passw0rd-never-logged";
    let mut server = ChildServer::start(&[
        ("DATABASE_URL", format!("sqlite://{}", dir.path().join("logs.db").display())),
        ("REDIS_URL", common::redis_url().await),
        ("REDIS_KEY_PREFIX", common::unique_prefix()),
        ("ORDER_TTL", "1s".into()),
        ("SWEEP_INTERVAL", "1h".into()),
        ("ADMIN_TOKEN", ADMIN.into()),
        ("JWT_SECRET", JWT_SECRET.into()),
        ("LOG_FORMAT", "json".into()),
        ("RUST_LOG", "debug".into()),
    ])
    .await;
    let p = server
        .data(
            Some(ADMIN),
            "mutation { createProduct(input: {sku: \"LOG-1\", name: \"Log\", priceCents: 100, currency: \"USD\", stock: 10}) { id } }",
            json!({}),
        )
        .await["createProduct"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let register = server
        .data(
            None,
            "mutation($p: String!) { registerCustomer(email: \"logs@example.com\", password: $p) { token } }",
            json!({"p": password}),
        )
        .await;
    let token1 = register["registerCustomer"]["token"].as_str().unwrap().to_string();
    let login = server
        .data(
            None,
            "mutation($p: String!) { login(email: \"logs@example.com\", password: $p) { token } }",
            json!({"p": password}),
        )
        .await;
    let token = login["login"]["token"].as_str().unwrap().to_string();
    let wrong = server
        .gql(
            None,
            "mutation { login(email: \"logs@example.com\", password: \"wrong-password-logged?\") { token } }",
            json!({}),
        )
        .await;
    assert_eq!(code(&wrong), "UNAUTHENTICATED");
    let place = "mutation($p: ID!) { createOrder(input: {lines: [{productId: $p, quantity: 1}]}) { id } }";
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            server.data(Some(&token), place, json!({"p": p})).await["createOrder"]["id"].as_str().unwrap().to_string(),
        );
    }
    server.data(Some(&token), "mutation($id: ID!) { payOrder(id: $id) { id } }", json!({"id": ids[0]})).await;
    server.data(Some(&token), "mutation($id: ID!) { cancelOrder(id: $id) { id } }", json!({"id": ids[1]})).await;
    // the third expires
    common::eventually(Duration::from_secs(10), || async {
        let d = server.data(Some(&token), "query($id: ID!) { order(id: $id) { status } }", json!({"id": ids[2]})).await;
        (d["order"]["status"] == "CANCELLED").then_some(())
    })
    .await;
    assert!(server.terminate().await, "clean shutdown");

    let logs = server.logs();
    let lines = json_lines(&logs);
    assert!(lines.len() > 10, "{logs}");
    for secret in [password, "wrong-password-logged?", &token1, &token, ADMIN, JWT_SECRET] {
        assert!(!logs.contains(secret), "the logs contain a secret ({secret:?})");
    }
    let life = |id: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| order_of(l) == Some(id))
            .filter_map(|l| {
                let f = &l["fields"];
                let m = f["message"].as_str().filter(|m| m.starts_with("order "))?;
                Some(match (f["reason"].as_str(), f["source"].as_str()) {
                    (Some(r), Some(s)) => format!("{m} {r} {s}"),
                    _ => m.to_string(),
                })
            })
            .collect()
    };
    assert_eq!(life(&ids[0]), ["order placed", "order paid"], "{logs}");
    assert_eq!(life(&ids[1]), ["order placed", "order cancelled CUSTOMER customer"], "{logs}");
    assert_eq!(life(&ids[2]), ["order placed", "order cancelled EXPIRED listener"], "{logs}");
}

/// After some traffic, `/metrics` has the request latency per operation,
/// orders created/paid/cancelled by reason and source, the expiry lag, the
/// listener's state and reconnects, websocket connections and
/// subscriptions, and the database pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_requests_orders_expiry_listener_websockets_and_the_pool() {
    let redis = PrivateRedis::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&[
        ("DATABASE_URL", format!("sqlite://{}", dir.path().join("metrics.db").display())),
        ("REDIS_URL", redis.url.clone()),
        ("ORDER_TTL", "1s".into()),
        ("ADMIN_TOKEN", ADMIN.into()),
        ("JWT_SECRET", JWT_SECRET.into()),
    ])
    .await;
    let m = server.metrics().await;
    for zero in [
        "shopgraph_orders_created_total",
        "shopgraph_expiry_listener_reconnects_total",
        "shopgraph_expiry_hash_write_failures_total",
        "shopgraph_websocket_connections",
    ] {
        assert_eq!(metric(&m, zero), Some(0.0), "{zero} is not there from the start:\n{m}");
    }
    let p = server
        .data(
            Some(ADMIN),
            "mutation { createProduct(input: {sku: \"M-1\", name: \"M\", priceCents: 100, currency: \"USD\", stock: 10}) { id } }",
            json!({}),
        )
        .await["createProduct"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = server
        .data(
            None,
            "mutation { registerCustomer(email: \"m@example.com\", password: \"correct horse battery\") { token } }",
            json!({}),
        )
        .await;
    let token = d["registerCustomer"]["token"].as_str().unwrap().to_string();
    let mut ws = WsClient::init(&server.ws_url, "graphql-transport-ws", Some(&token)).await;
    ws.subscribe("c", "subscription { orderCancelled { reason } }", json!({})).await;
    ws.barrier().await;
    let place = "mutation PlaceOrder($p: ID!) { createOrder(input: {lines: [{productId: $p, quantity: 1}]}) { id } }";
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            server.data(Some(&token), place, json!({"p": p})).await["createOrder"]["id"].as_str().unwrap().to_string(),
        );
    }
    server.data(Some(&token), "mutation PayOrder($id: ID!) { payOrder(id: $id) { id } }", json!({"id": ids[0]})).await;
    server
        .data(Some(ADMIN), "mutation CancelOrder($id: ID!) { cancelOrder(id: $id) { id } }", json!({"id": ids[1]}))
        .await;
    assert_eq!(ws.next_data("c").await["data"]["orderCancelled"]["reason"], "ADMIN");
    assert_eq!(ws.next_data("c").await["data"]["orderCancelled"]["reason"], "EXPIRED");
    // the listener's connection is cut once: it reconnects
    let mut conn = redis.conn().await;
    let _: redis::Value =
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut conn).await.unwrap();
    let m = common::eventually(Duration::from_secs(10), || async {
        let m = server.metrics().await;
        (metric(&m, "shopgraph_expiry_listener_reconnects_total").unwrap_or(0.0) >= 1.0
            && metric(&m, "shopgraph_expiry_listener_up") == Some(1.0))
        .then_some(m)
    })
    .await;
    let expect = [
        ("shopgraph_graphql_request_duration_seconds_count{field=\"createOrder\"}", 3.0),
        ("shopgraph_graphql_request_duration_seconds_count{field=\"payOrder\"}", 1.0),
        ("shopgraph_orders_created_total", 3.0),
        ("shopgraph_orders_paid_total{source=\"customer\"}", 1.0),
        ("shopgraph_orders_cancelled_total{reason=\"ADMIN\",source=\"admin\"}", 1.0),
        ("shopgraph_orders_cancelled_total{reason=\"EXPIRED\",source=\"listener\"}", 1.0),
        ("shopgraph_expiry_lag_seconds_count{source=\"listener\"}", 1.0),
        ("shopgraph_websocket_connections", 1.0),
        ("shopgraph_websocket_subscriptions", 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(metric(&m, series), Some(value), "{series}:\n{m}");
    }
    assert!(m.contains("shopgraph_graphql_request_duration_seconds_bucket{field=\"createOrder\",le=\""), "{m}");
    assert!(m.contains("shopgraph_expiry_lag_seconds_bucket{source=\"listener\",le=\"1\"}"), "{m}");
    assert!(metric(&m, "shopgraph_db_pool_connections{state=\"idle\"}").is_some(), "{m}");
    assert!(metric(&m, "shopgraph_db_pool_connections{state=\"in_use\"}").is_some(), "{m}");
    drop(ws);
    common::eventually(Duration::from_secs(5), || async {
        let m = server.metrics().await;
        (metric(&m, "shopgraph_websocket_connections") == Some(0.0)
            && metric(&m, "shopgraph_websocket_subscriptions") == Some(0.0))
        .then_some(())
    })
    .await;
}

/// `/readyz` answers 503 naming what is down: here Redis (and so the
/// listener), while the database is up; 200 again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_what_is_down() {
    let mut redis = PrivateRedis::start(&[]).await;
    let url = redis.url.clone();
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.redis_url = Some(url)).await;
    let readyz = || async {
        let res = app.http.get(format!("{}/readyz", app.url)).send().await.unwrap();
        (res.status().as_u16(), res.json::<Value>().await.unwrap())
    };
    common::eventually(Duration::from_secs(5), || async { (readyz().await.0 == 200).then_some(()) }).await;
    redis.kill();
    // 503 with the listener down, which this waits for; then what else it says
    let body = common::eventually(Duration::from_secs(10), || async {
        let (s, b) = readyz().await;
        (s == 503 && b["listener"] == "down").then_some(b)
    })
    .await;
    assert_eq!(body["database"], "up", "{body}");
    assert_eq!(body["redis"], "down", "{body}");
    redis.restart().await;
    common::eventually(Duration::from_secs(15), || async { (readyz().await.0 == 200).then_some(()) }).await;
}

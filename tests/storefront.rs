//! Issue 14, the storefront's side: CORS for browser pages on other
//! origins, cache headers a CDN can use (ETag, 304), automatic persisted
//! queries over POST and GET, a real nginx `proxy_cache` in front, and
//! websocket clients that get the subprotocol they prefer.

mod common;

use common::{nginx::Nginx, spawn_app_with, Backend, TestApp};
use reqwest::{header, Method, StatusCode};
use serde_json::json;

const SHOP: &str = "https://shop.example.com";

async fn cors_app() -> TestApp {
    spawn_app_with(Backend::Sqlite, |c| {
        c.cors_allowed_origins =
            Some(shopgraph::cors::AllowedOrigins::parse(&format!("{SHOP}, http://localhost:5173")).unwrap())
    })
    .await
}

fn preflight(app: &TestApp, origin: &str) -> reqwest::RequestBuilder {
    app.http
        .request(Method::OPTIONS, format!("{}/graphql", app.url))
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type, authorization")
}

fn cors_headers(res: &reqwest::Response) -> Vec<String> {
    res.headers().keys().map(|k| k.as_str().to_string()).filter(|k| k.starts_with("access-control-")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_gets_its_preflight_answered_and_the_response_readable() {
    let app = cors_app().await;
    let res = preflight(&app, SHOP).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let h = res.headers();
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], SHOP);
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "GET, POST");
    let allowed = h[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap();
    assert!(allowed.contains("content-type") && allowed.contains("authorization"), "{allowed}");
    assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "600");

    let res = app
        .http
        .post(format!("{}/graphql", app.url))
        .header(header::ORIGIN, SHOP)
        .json(&json!({"query": "{ products { nodes { id } } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], SHOP);
    let vary: Vec<_> = res.headers().get_all(header::VARY).iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert!(vary.iter().any(|v| v.eq_ignore_ascii_case("origin")), "Vary: {vary:?}");
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["data"]["products"]["nodes"].is_array(), "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_origin_gets_no_cors_headers() {
    let app = cors_app().await;
    let res = preflight(&app, "https://evil.example").send().await.unwrap();
    assert!(!res.status().is_success(), "{}", res.status());
    assert!(cors_headers(&res).is_empty(), "{:?}", cors_headers(&res));

    let res = app
        .http
        .post(format!("{}/graphql", app.url))
        .header(header::ORIGIN, "https://evil.example")
        .json(&json!({"query": "{ products { nodes { id } } }"}))
        .send()
        .await
        .unwrap();
    assert!(cors_headers(&res).is_empty(), "{:?}", cors_headers(&res));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_there_are_no_cors_headers_and_a_star_allows_every_origin() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let res = preflight(&app, SHOP).send().await.unwrap();
    assert!(cors_headers(&res).is_empty(), "{:?}", cors_headers(&res));
    app.stop().await;

    let app =
        spawn_app_with(Backend::Sqlite, |c| c.cors_allowed_origins = Some(shopgraph::cors::AllowedOrigins::Any)).await;
    let res = preflight(&app, "https://anyone.example").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    app.stop().await;
}

#[test]
fn the_setting_is_validated_naming_the_variable() {
    let args = shopgraph::config::ConfigArgs {
        cors_allowed_origins: Some("https://shop.example.com/catalog".into()),
        ..Default::default()
    };
    assert!(args.into_config().unwrap_err().to_string().starts_with("CORS_ALLOWED_ORIGINS: "));
    let args = shopgraph::config::ConfigArgs { catalog_max_age: Some("soon".into()), ..Default::default() };
    assert!(args.into_config().unwrap_err().to_string().starts_with("CATALOG_MAX_AGE: "));
}

// ------------------------------------------------------------- caching ---

const CATALOG: &str = "query Catalog { products(first: 20) { nodes { id sku stock } } }";

fn get_query(app: &TestApp, params: &[(&str, &str)]) -> reqwest::RequestBuilder {
    app.http.get(format!("{}/graphql", app.url)).query(params)
}

fn cache_control(res: &reqwest::Response) -> &str {
    res.headers().get(header::CACHE_CONTROL).map(|v| v.to_str().unwrap()).unwrap_or("<none>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_catalog_reads_are_public_with_an_etag_and_a_matching_if_none_match_gets_304() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.catalog_max_age = std::time::Duration::from_secs(7)).await;
    let product = app.create_product("C-1", 500, 3).await;

    let res = get_query(&app, &[("query", CATALOG)]).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(cache_control(&res), "public, max-age=7");
    let etag = res.headers()[header::ETAG].to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() > 10, "strong ETag: {etag}");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["data"]["products"]["nodes"][0]["stock"], 3, "{body}");

    // the same body, the same tag; the client's copy is still good: 304, no body
    let res = get_query(&app, &[("query", CATALOG)]).header(header::IF_NONE_MATCH, &etag).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(res.headers()[header::ETAG].to_str().unwrap(), etag);
    assert_eq!(cache_control(&res), "public, max-age=7");
    assert!(res.bytes().await.unwrap().is_empty());

    // POST is judged the same way; `product` too
    let res = app
        .http
        .post(format!("{}/graphql", app.url))
        .header(header::IF_NONE_MATCH, &etag)
        .json(&json!({"query": CATALOG}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    let one =
        json!({"query": "query($id: ID!) { product(id: $id) { name } __typename }", "variables": {"id": product}});
    let res = app.http.post(format!("{}/graphql", app.url)).json(&one).send().await.unwrap();
    assert_eq!(cache_control(&res), "public, max-age=7");

    // a change of stock is a new body, so a new tag: the old one gets 200
    app.data(
        Some(common::ADMIN),
        "mutation($id: ID!) { restockProduct(id: $id, quantity: 2) { stock } }",
        json!({"id": product}),
    )
    .await;
    let res = get_query(&app, &[("query", CATALOG)]).header(header::IF_NONE_MATCH, &etag).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_ne!(res.headers()[header::ETAG].to_str().unwrap(), etag);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["data"]["products"]["nodes"][0]["stock"], 5, "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_for_a_token_mutations_errors_and_private_fields_are_never_stored() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let (token, _) = app.customer().await;
    let post = |body: serde_json::Value, token: Option<&str>| {
        let mut req = app.http.post(format!("{}/graphql", app.url)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let res = post(json!({"query": CATALOG}), Some(&token)).await.unwrap();
    assert_eq!(cache_control(&res), "private, no-store");
    assert!(res.headers().get(header::ETAG).is_none());
    let res = post(json!({"query": "{ me { email } }"}), Some(&token)).await.unwrap();
    assert_eq!(cache_control(&res), "private, no-store");

    let login =
        json!({"query": "mutation { login(email: \"nobody@example.com\", password: \"whatever-it-is\") { token } }"});
    assert_eq!(cache_control(&post(login, None).await.unwrap()), "no-store");
    let mixed = json!({"query": "{ products { nodes { id } } me { id } }"});
    assert_eq!(cache_control(&post(mixed, None).await.unwrap()), "no-store");
    let error = json!({"query": "{ product(id: \"not-an-id\") { id } }"});
    assert_eq!(cache_control(&post(error, None).await.unwrap()), "no-store");
    let batch = json!([{"query": CATALOG}, {"query": CATALOG}]);
    assert_eq!(cache_control(&post(batch, None).await.unwrap()), "no-store");
    app.stop().await;
}

// --------------------------------------------------- persisted queries ---

fn apq(hash: &str) -> serde_json::Value {
    json!({"persistedQuery": {"version": 1, "sha256Hash": hash}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_queries_register_over_post_and_run_by_hash_over_get_on_every_instance() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    app.create_product("P-1", 700, 4).await;
    let hash = shopgraph::graphql::persisted::sha256_hex(CATALOG);
    let ext = apq(&hash).to_string();
    let url = format!("{}/graphql", app.url);

    // unknown hash: the message clients look for, and nothing stored by caches
    let res = app.http.get(&url).query(&[("extensions", ext.as_str())]).send().await.unwrap();
    assert_eq!(cache_control(&res), "no-store");
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "PersistedQueryNotFound", "{body}");
    assert!(body["errors"][0]["extensions"]["code"].is_string(), "{body}");

    // a hash that is not the query's is refused, and registers nothing
    let wrong = shopgraph::graphql::persisted::sha256_hex("{ __typename }");
    let body: serde_json::Value = app
        .http
        .post(&url)
        .json(&json!({"query": CATALOG, "extensions": apq(&wrong)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("does not match"), "{body}");
    let body: serde_json::Value =
        app.http.post(&url).json(&json!({"extensions": apq(&wrong)})).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "PersistedQueryNotFound", "{body}");

    // query + hash registers it (and answers it)
    let body: serde_json::Value = app
        .http
        .post(&url)
        .json(&json!({"query": CATALOG, "extensions": apq(&hash)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["data"]["products"]["nodes"][0]["stock"], 4, "{body}");

    // then the hash alone works over GET, cacheable, here and on another instance (shared through Redis)
    let sibling = app.sibling().await;
    for base in [&app.url, &sibling.url] {
        let res = app.http.get(format!("{base}/graphql")).query(&[("extensions", ext.as_str())]).send().await.unwrap();
        assert_eq!(cache_control(&res), format!("public, max-age={}", app.config.catalog_max_age.as_secs()));
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["data"]["products"]["nodes"][0]["stock"], 4, "{base}: {body}");
    }
    // and over POST
    let body: serde_json::Value =
        app.http.post(&url).json(&json!({"extensions": apq(&hash)})).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["data"]["products"]["nodes"][0]["sku"], "P-1", "{body}");
    sibling.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persisted_mutation_does_not_run_over_get_and_an_oversized_document_is_never_stored() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let url = format!("{}/graphql", app.url);
    let register =
        "mutation { registerCustomer(email: \"apq@example.com\", password: \"correct horse battery\") { token } }";
    let hash = shopgraph::graphql::persisted::sha256_hex(register);
    // registered over POST (it runs there, once)
    let body: serde_json::Value = app
        .http
        .post(&url)
        .json(&json!({"query": register, "extensions": apq(&hash)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(body["data"]["registerCustomer"]["token"].is_string(), "{body}");
    let ext = apq(&hash).to_string();
    let body: serde_json::Value =
        app.http.get(&url).query(&[("extensions", ext.as_str())]).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "mutations must be sent with POST", "{body}");

    // the 32 KiB limit applies to a document sent for registration
    let big = format!("{{ products {{ nodes {{ id }} }} }} # {}", "x".repeat(shopgraph::graphql::MAX_QUERY_BYTES));
    let big_hash = shopgraph::graphql::persisted::sha256_hex(&big);
    let body: serde_json::Value = app
        .http
        .post(&url)
        .json(&json!({"query": big, "extensions": apq(&big_hash)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(common::code(&body), "QUERY_TOO_COMPLEX", "{body}");
    let body: serde_json::Value =
        app.http.post(&url).json(&json!({"extensions": apq(&big_hash)})).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "PersistedQueryNotFound", "{body}");
    app.stop().await;
}

/// A real caching reverse proxy in front of a real shopgraph process: the
/// catalog by persisted-query hash over GET is served from nginx's cache
/// within `CATALOG_MAX_AGE` (shopgraph counts no requests), and a restock
/// shows up once it passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_repeated_catalog_gets_are_served_from_its_cache_until_max_age() {
    let Some(bin) = Nginx::binary() else {
        common::skipped("nginx is not installed (apt-get install nginx-light); .ci/run installs it");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let max_age = std::time::Duration::from_secs(2);
    let server = common::child::ChildServer::start(&[
        ("DATABASE_URL", format!("sqlite://{}", dir.path().join("nginx.db").display())),
        ("REDIS_URL", common::redis_url().await),
        ("REDIS_KEY_PREFIX", common::unique_prefix()),
        ("ADMIN_TOKEN", common::ADMIN.into()),
        ("JWT_SECRET", common::JWT_SECRET.into()),
        ("CATALOG_MAX_AGE", "2s".into()),
    ])
    .await;
    let product = server
        .data(
            Some(common::ADMIN),
            "mutation { createProduct(input: {sku: \"NGX-1\", name: \"N\", priceCents: 100, currency: \"USD\", stock: 5}) { id } }",
            json!({}),
        )
        .await["createProduct"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let proxy = Nginx::start(&bin, &server.url).await.unwrap();
    let hash = shopgraph::graphql::persisted::sha256_hex(CATALOG);
    let ext = apq(&hash).to_string();
    // what Apollo Client sends with useGETForHashedQueries, after registering over POST
    let registered: serde_json::Value = server
        .http
        .post(format!("{}/graphql", proxy.url))
        .json(&json!({"query": CATALOG, "extensions": apq(&hash)}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(registered["data"]["products"]["nodes"][0]["stock"], 5, "{registered}");
    let catalog_get = || async {
        let res = server
            .http
            .get(format!("{}/graphql", proxy.url))
            .query(&[("extensions", ext.as_str())])
            .send()
            .await
            .unwrap();
        let status = res.headers().get("x-cache-status").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
        let body: serde_json::Value = res.json().await.unwrap();
        (status, body["data"]["products"]["nodes"][0]["stock"].as_i64().unwrap_or_else(|| panic!("{body}")))
    };
    let served = || async {
        let m = server.metrics().await;
        common::child::metric(&m, "shopgraph_graphql_request_duration_seconds_count{field=\"products\"}").unwrap_or(0.0)
    };

    let before = served().await;
    let (first, stock) = catalog_get().await;
    let cached_at = std::time::Instant::now();
    assert_eq!((first.as_str(), stock), ("MISS", 5));
    for _ in 0..10 {
        let (status, stock) = catalog_get().await;
        assert_eq!((status.as_str(), stock), ("HIT", 5));
    }
    server
        .data(
            Some(common::ADMIN),
            "mutation($id: ID!) { restockProduct(id: $id, quantity: 3) { stock } }",
            json!({"id": product}),
        )
        .await;
    let (status, stock) = catalog_get().await;
    if cached_at.elapsed() < max_age {
        assert_eq!((status.as_str(), stock), ("HIT", 5), "within max-age the proxy answers from its copy");
        assert_eq!(served().await - before, 1.0, "only the first GET reached shopgraph");
    }
    // past max-age the proxy asks again and the restock shows
    let seen = common::eventually(std::time::Duration::from_secs(10), || async {
        let (status, stock) = catalog_get().await;
        (stock == 8).then_some(status)
    })
    .await;
    assert!(cached_at.elapsed() >= max_age, "the restock showed before max-age");
    assert_ne!(seen, "HIT");
    let (status, stock) = catalog_get().await;
    assert_eq!((status.as_str(), stock), ("HIT", 8), "the new copy is cached in turn");
}

// ------------------------------------------------------------- clients ---

/// Opens a websocket offering `offered` (in that order); returns the socket
/// and the subprotocol the server chose.
async fn offer(
    url: &str,
    offered: &str,
) -> (tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>, String) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", offered.parse().unwrap());
    let (socket, resp) = tokio::time::timeout(std::time::Duration::from_secs(5), tokio_tungstenite::connect_async(req))
        .await
        .unwrap()
        .unwrap();
    let chosen = resp.headers().get("sec-websocket-protocol").unwrap().to_str().unwrap().to_string();
    (socket, chosen)
}

async fn next_json(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) -> serde_json::Value {
    use futures_util::StreamExt;
    loop {
        let msg =
            tokio::time::timeout(std::time::Duration::from_secs(5), socket.next()).await.unwrap().unwrap().unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] != "ka" && v["type"] != "ping" {
                return v;
            }
        }
    }
}

/// Python's `gql` offers both protocols, the legacy one first, and speaks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offering_graphql_ws_first_gets_graphql_ws_and_is_served_in_it() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let (mut socket, chosen) = offer(&app.ws_url, "graphql-ws, graphql-transport-ws").await;
    assert_eq!(chosen, "graphql-ws");
    socket.send(Message::text(json!({"type": "connection_init", "payload": {}}).to_string())).await.unwrap();
    assert_eq!(next_json(&mut socket).await["type"], "connection_ack");
    let start = json!({"id": "1", "type": "start", "payload": {"query": "{ __typename }"}});
    socket.send(Message::text(start.to_string())).await.unwrap();
    let data = next_json(&mut socket).await;
    assert_eq!(
        (data["type"].as_str(), data["payload"]["data"]["__typename"].as_str()),
        (Some("data"), Some("Query")),
        "{data}"
    );

    let (_, chosen) = offer(&app.ws_url, "graphql-transport-ws, graphql-ws").await;
    assert_eq!(chosen, "graphql-transport-ws");
    let (_, chosen) = offer(&app.ws_url, "soap, graphql-ws").await;
    assert_eq!(chosen, "graphql-ws");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn date_time_is_specified_by_rfc_3339_for_codegen() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let d = app.data(None, "{ __type(name: \"DateTime\") { specifiedByURL } }", json!({})).await;
    assert_eq!(d["__type"]["specifiedByURL"], "https://www.rfc-editor.org/rfc/rfc3339");
    assert!(shopgraph::graphql::sdl()
        .contains("scalar DateTime @specifiedBy(url: \"https://www.rfc-editor.org/rfc/rfc3339\")"));
    app.stop().await;
}

// The server's own cache of anonymous catalog answers (CATALOG_CACHE_TTL).

async fn catalog_stock(app: &TestApp) -> i64 {
    let res = get_query(app, &[("query", CATALOG)]).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body: serde_json::Value = res.json().await.unwrap();
    body["data"]["products"]["nodes"][0]["stock"].as_i64().unwrap_or_else(|| panic!("{body}"))
}

/// Adds stock behind the server's back, as another instance or a script would.
async fn restock_directly(app: &TestApp, product: &str, quantity: i32) {
    let id = shopgraph::domain::ProductId::parse(product).unwrap();
    app.store.restock_product(id, quantity).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_catalog_reads_are_answered_from_the_servers_cache_and_changes_through_it_show_at_once() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.catalog_cache_ttl = std::time::Duration::from_secs(60)).await;
    let product = app.create_product("RC-1", 500, 10).await;
    assert_eq!(catalog_stock(&app).await, 10);

    // a change the server did not make is not seen while its answer is fresh
    restock_directly(&app, &product, 5).await;
    assert_eq!(catalog_stock(&app).await, 10, "the stored answer");
    let hits = common::child::metric(&app.metrics().await, "shopgraph_catalog_cache_hits_total").unwrap_or(0.0);
    assert!(hits >= 1.0, "counted as a hit: {hits}");

    // every change made through it shows at once: an order, a cancellation, a restock
    let (token, _) = app.customer().await;
    let order = app.order_id(&token, &[(&product, 3)]).await;
    assert_eq!(catalog_stock(&app).await, 12, "15 minus the 3 the order reserved");
    app.cancel(&token, &order).await;
    assert_eq!(catalog_stock(&app).await, 15);
    app.data(
        Some(common::ADMIN),
        "mutation($id: ID!) { restockProduct(id: $id, quantity: 1) { stock } }",
        json!({"id": product}),
    )
    .await;
    assert_eq!(catalog_stock(&app).await, 16);

    // an answer for a token is never the stored one
    restock_directly(&app, &product, 1).await;
    let mine = app
        .http
        .get(format!("{}/graphql", app.url))
        .query(&[("query", CATALOG)])
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(cache_control(&mine), "private, no-store");
    let body: serde_json::Value = mine.json().await.unwrap();
    assert_eq!(body["data"]["products"]["nodes"][0]["stock"], 17, "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instances_orders_show_at_once_and_its_restocks_within_the_cache_ttl() {
    let ttl = std::time::Duration::from_millis(300);
    let a = spawn_app_with(Backend::Sqlite, |c| c.catalog_cache_ttl = ttl).await;
    let b = a.sibling().await;
    let product = a.create_product("RC-2", 500, 10).await;
    assert_eq!(catalog_stock(&a).await, 10);

    // an order's event reaches every instance, and with it the change of stock
    let (token, _) = b.customer().await;
    let order = b.order_id(&token, &[(&product, 4)]).await;
    b.cancel(&token, &order).await;
    common::eventually(std::time::Duration::from_secs(5), || async {
        // the cancellation's event arrived: the stock it returned shows
        (a.order(&token, &order).await["status"] == "CANCELLED").then_some(())
    })
    .await;
    assert_eq!(catalog_stock(&a).await, 10);

    // a restock through b is seen by a once its stored answer is older than the TTL
    b.data(
        Some(common::ADMIN),
        "mutation($id: ID!) { restockProduct(id: $id, quantity: 5) { stock } }",
        json!({"id": product}),
    )
    .await;
    // (bounded by a few TTLs, not to the millisecond: this is not a timing test)
    common::eventually(ttl * 10, || async { (catalog_stock(&a).await == 15).then_some(()) }).await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_catalog_cache_ttl_reads_the_database_every_time() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.catalog_cache_ttl = std::time::Duration::ZERO).await;
    let product = app.create_product("RC-3", 500, 10).await;
    assert_eq!(catalog_stock(&app).await, 10);
    restock_directly(&app, &product, 5).await;
    assert_eq!(catalog_stock(&app).await, 15);
    app.stop().await;
}

#[test]
fn the_catalog_cache_ttl_is_a_duration_of_at_most_a_minute_and_zero_turns_it_off() {
    let parse = |v: &str| {
        shopgraph::config::ConfigArgs { catalog_cache_ttl: Some(v.into()), ..Default::default() }.into_config()
    };
    assert_eq!(parse("0s").unwrap().catalog_cache_ttl, std::time::Duration::ZERO);
    assert_eq!(parse("0").unwrap().catalog_cache_ttl, std::time::Duration::ZERO);
    assert_eq!(parse("250ms").unwrap().catalog_cache_ttl, std::time::Duration::from_millis(250));
    for bad in ["soon", "2m"] {
        let e = parse(bad).unwrap_err().to_string();
        assert!(e.starts_with("CATALOG_CACHE_TTL: "), "{e}");
    }
}

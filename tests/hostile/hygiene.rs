//! Hygiene: `/metrics` behind its token with labels clients cannot flood,
//! 415 for non-JSON POST bodies, one text validation on both stores,
//! security headers on every response, GraphiQL that can be turned off.

use std::collections::BTreeSet;

use reqwest::{header, StatusCode};
use serde_json::{json, Value};

use crate::common::{self, code, TestApp, ADMIN, METRICS_TOKEN};

async fn metrics(app: &TestApp, token: Option<&str>) -> reqwest::Response {
    let mut req = app.http.get(format!("{}/metrics", app.url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn post(app: &TestApp, content_type: Option<&str>, body: &Value) -> (StatusCode, Value) {
    let mut req = app.http.post(format!("{}/graphql", app.url)).bearer_auth(ADMIN).body(body.to_string());
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    (status, res.json().await.unwrap())
}

async fn skus(app: &TestApp) -> Vec<String> {
    let d = app.data(None, "{ products(first: 100) { nodes { sku } } }", json!({})).await;
    d["products"]["nodes"].as_array().unwrap().iter().map(|n| n["sku"].as_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_only_to_their_token_and_do_not_exist_without_one() {
    let app = common::spawn_app(common::Backend::Sqlite).await;
    let res = metrics(&app, None).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.headers().get(header::WWW_AUTHENTICATE).is_some());
    assert!(!res.text().await.unwrap().contains("shopgraph_"));
    for wrong in ["nope", ADMIN, &METRICS_TOKEN[..METRICS_TOKEN.len() - 1]] {
        assert_eq!(metrics(&app, Some(wrong)).await.status(), StatusCode::UNAUTHORIZED, "{wrong}");
    }
    let res = metrics(&app, Some(METRICS_TOKEN)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.text().await.unwrap().contains("shopgraph_orders_created_total"));

    let open = common::spawn_app_with(common::Backend::Sqlite, |c| c.metrics_token = None).await;
    for token in [None, Some(METRICS_TOKEN)] {
        let res = metrics(&open, token).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert!(!res.text().await.unwrap().contains("shopgraph_"));
    }
}

/// 300 made-up operation names and 300 unknown root fields add no series:
/// the request histogram is labelled by the root field that ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_add_metric_labels() {
    let app = common::spawn_app(common::Backend::Sqlite).await;
    for i in 0..300 {
        app.data(None, &format!("query Junk{i} {{ products(first: 1) {{ nodes {{ id }} }} }}"), json!({})).await;
        let v = app.gql(None, &format!("{{ junkField{i} }}"), json!({})).await;
        assert_eq!(code(&v), "BAD_USER_INPUT");
    }
    let text = metrics(&app, Some(METRICS_TOKEN)).await.text().await.unwrap();
    let labels: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("shopgraph_graphql_request_duration_seconds_count{field=\""))
        .filter_map(|l| l.split_once('"').map(|(label, _)| label))
        .collect();
    assert!(labels.contains("products"), "{labels:?}");
    assert!(labels.iter().all(|l| !l.to_lowercase().contains("junk")), "{labels:?}");
    // the schema's root fields and the fixed words (several tests share this process's recorder)
    assert!(labels.len() <= 20, "{labels:?}");
    assert!(!text.contains("Junk"), "an operation name reached /metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_bodies_that_are_not_json_get_415_and_run_nothing() {
    let app = common::spawn_app(common::Backend::Sqlite).await;
    let create = |sku: &str| json!({"query": format!("mutation {{ createProduct(input: {{sku: \"{sku}\", name: \"N\", priceCents: 1, currency: \"USD\", stock: 1}}) {{ id }} }}")});
    let refused = [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json; charset=latin1"),
        Some("application/jsonx"),
        None,
    ];
    for (i, ct) in refused.iter().enumerate() {
        let (status, body) = post(&app, *ct, &create(&format!("NOPE-{i}"))).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        assert_eq!(code(&body), "BAD_USER_INPUT", "{ct:?}");
    }
    assert!(skus(&app).await.is_empty(), "a refused request ran");
    let accepted = ["application/json", "application/json; charset=UTF-8", "application/graphql-response+json"];
    for (i, ct) in accepted.iter().enumerate() {
        let (status, body) = post(&app, Some(ct), &create(&format!("YES-{i}"))).await;
        assert_eq!(status, StatusCode::OK, "{ct}: {body}");
        assert!(body.get("errors").is_none(), "{ct}: {body}");
    }
    assert_eq!(skus(&app).await.len(), accepted.len());
}

async fn refused_text(app: &TestApp, query: &str, variables: Value) {
    let v = app.gql(Some(ADMIN), query, variables.clone()).await;
    assert_eq!(code(&v), "BAD_USER_INPUT", "{variables}: {v}");
}

crate::both_stores! {
    control_characters_are_bad_user_input_on_either_store => |app: TestApp| async move {
        let create = "mutation($i: CreateProductInput!) { createProduct(input: $i) { id name } }";
        let product = |sku: &str, name: &str, currency: &str| {
            json!({"i": {"sku": sku, "name": name, "priceCents": 100, "currency": currency, "stock": 5}})
        };
        for bad in ["a\u{0}b", "a\u{7}b", "line\nbreak", "tab\tbed", "esc\u{1b}[31m", "c1\u{85}", "rtl\u{202e}txt"] {
            refused_text(&app, create, product("OK-1", bad, "USD")).await;
            refused_text(&app, create, product(&format!("S{bad}"), "Name", "USD")).await;
            let v = app
                .gql(None, "mutation($e: String!) { registerCustomer(email: $e, password: \"long enough pw\") { token } }",
                    json!({"e": format!("x{bad}@example.com")}))
                .await;
            assert_eq!(code(&v), "BAD_USER_INPUT", "email {bad:?}: {v}");
        }
        for currency in ["US\u{0}", "U\u{7}D", "\nUS"] {
            refused_text(&app, create, product("OK-1", "Name", currency)).await;
        }
        assert!(skus(&app).await.is_empty(), "a product with a control character was stored");

        let ok = app.data(Some(ADMIN), create, product("OK-1", "Café crème – 250 g", "EUR")).await;
        assert_eq!(ok["createProduct"]["name"], "Café crème – 250 g");
        let id = ok["createProduct"]["id"].as_str().unwrap().to_string();
        let (token, _) = app.customer().await;
        let place = "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id } }";
        for bad in ["k\u{0}", "k\u{7f}", "k\r\n"] {
            let v = app.gql(Some(&token), place, json!({"i": {"lines": [{"productId": id, "quantity": 1}], "idempotencyKey": bad}})).await;
            assert_eq!(code(&v), "BAD_USER_INPUT", "key {bad:?}: {v}");
        }
        assert_eq!(app.stock(&id).await, 5, "a refused order reserved stock");
    };
}

fn assert_security_headers(res: &reqwest::Response, what: &str) {
    let h = res.headers();
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("{what}: no {name}"));
    assert_eq!(get("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(get("x-frame-options"), "DENY", "{what}");
    assert_eq!(get("referrer-policy"), "no-referrer", "{what}");
    let csp = get("content-security-policy");
    for directive in ["frame-ancestors 'none'", "script-src 'self'", "object-src 'none'", "base-uri 'none'"] {
        assert!(csp.contains(directive), "{what}: {directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{what}: {csp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_and_api_responses_carry_security_headers() {
    let demo = tempfile::tempdir().unwrap();
    std::fs::write(demo.path().join("index.html"), "<!doctype html><title>demo</title>").unwrap();
    let dir = demo.path().to_path_buf();
    let app = common::spawn_app_with(common::Backend::Sqlite, |c| c.demo_dir = dir).await;
    for path in ["/graphiql", "/graphiql/graphiql.js", "/demo/", "/graphql?query=%7B__typename%7D", "/healthz", "/nope"]
    {
        let res = app.http.get(format!("{}{path}", app.url)).send().await.unwrap();
        assert_security_headers(&res, path);
    }
    let res = app.http.get(format!("{}/graphiql", app.url)).send().await.unwrap();
    let csp = res.headers()["content-security-policy"].to_str().unwrap().to_string();
    let page = res.text().await.unwrap();
    // the page's inline style is allowed by its hash, not by 'unsafe-inline'
    assert!(page.contains("<style>") && csp.contains("style-src 'self' 'sha256-"), "{csp}");
    let (status, _) = post(&app, Some("text/plain"), &json!({"query": "{ __typename }"})).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_can_be_turned_off() {
    let app = common::spawn_app_with(common::Backend::Sqlite, |c| c.graphiql = false).await;
    for path in ["/graphiql", "/", "/graphiql/graphiql.js", "/graphiql/graphiql.css"] {
        let res = app.http.get(format!("{}{path}", app.url)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
    }
    app.data(None, "{ __typename }", json!({})).await;
    let on = common::spawn_app(common::Backend::Sqlite).await;
    assert_eq!(on.http.get(format!("{}/graphiql", on.url)).send().await.unwrap().status(), StatusCode::OK);
}

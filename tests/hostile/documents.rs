//! Documents priced as written: fragment bombs (named, inline, in
//! subscriptions over both websocket protocols, in mutations), directive
//! floods, amplifying batches and echoed input are refused before they run.

use std::{future::Future, time::Duration};

use serde_json::{json, Value};
use shopgraph::graphql::{MAX_COMPLEXITY, MAX_DIRECTIVES};

use crate::common::{self, code, ws::WsClient, Backend, TestApp, ADMIN};

/// Generous: these are availability checks, not speed tests (a refusal
/// takes microseconds; before the fix, minutes).
const REFUSED_WITHIN: Duration = Duration::from_secs(5);

/// `op { ...F0 } fragment F0 on Root { ...F1 ...F1 } … fragment Fn on Root { leaf }`:
/// 2^n copies of `leaf` in about 40 bytes a level.
fn bomb(op: &str, root: &str, levels: usize, leaf: &str) -> String {
    let mut q = format!("{op} {{ ...F0 }}\n");
    for i in 0..levels {
        q.push_str(&format!("fragment F{i} on {root} {{ ...F{n} ...F{n} }}\n", n = i + 1));
    }
    q.push_str(&format!("fragment F{levels} on {root} {{ {leaf} }}\n"));
    q
}

/// Runs `attack` while a bystander reads the catalog over and over; every
/// one of the bystander's reads must be answered in time.
async fn while_others_are_served<T>(app: &TestApp, attack: impl Future<Output = T>) -> T {
    let stop = tokio_util::sync::CancellationToken::new();
    let bystander = {
        let (http, url, stop) = (app.http.clone(), format!("{}/graphql", app.url), stop.clone());
        tokio::spawn(async move {
            let mut served = 0;
            // at least one read, however soon the attack is refused (the
            // task may start after it was)
            loop {
                let read = http.post(&url).json(&json!({"query": "{ products(first: 5) { nodes { id stock } } }"}));
                let res = tokio::time::timeout(Duration::from_secs(3), read.send())
                    .await
                    .expect("a bystander's catalog read is answered while the attack runs")
                    .expect("catalog read");
                assert_eq!(res.status(), 200);
                served += 1;
                if stop.is_cancelled() {
                    break;
                }
            }
            served
        })
    };
    let out = tokio::time::timeout(REFUSED_WITHIN, attack).await.expect("the attack is answered in time");
    stop.cancel();
    assert!(bystander.await.expect("bystander") >= 1);
    out
}

fn message(v: &Value) -> &str {
    v["errors"][0]["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment_bombs_are_refused_at_once_over_post_and_get() {
    let app = common::spawn_app(Backend::Sqlite).await;
    app.create_product("BOMB", 100, 10).await;
    for leaf in ["me { id }", "__typename", "... on Query { __typename products { nodes { id } } }"] {
        let q = bomb("query", "Query", 30, leaf);
        assert!(q.len() < 2_000, "the attack is small: {} bytes", q.len());
        let v = while_others_are_served(&app, app.gql(None, &q, json!({}))).await;
        assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "{v}");
        assert!(message(&v).contains(&MAX_COMPLEXITY.to_string()), "{v}");
        let get = app.http.get(format!("{}/graphql", app.url)).query(&[("query", q.as_str())]).send();
        let v: Value = while_others_are_served(&app, get).await.unwrap().json().await.unwrap();
        assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "{v}");
    }
    // inline fragments nest the spreads the same way
    let mut q = String::from("query { ...F0 }\n");
    for i in 0..30 {
        q.push_str(&format!("fragment F{i} on Query {{ ... on Query {{ ...F{n} }} ... {{ ...F{n} }} }}\n", n = i + 1));
    }
    q.push_str("fragment F30 on Query { __typename }");
    assert_eq!(code(&while_others_are_served(&app, app.gql(None, &q, json!({}))).await), "QUERY_TOO_COMPLEX");
    // two at once, and the health check still answers
    let (q30, q31) = (bomb("query", "Query", 30, "__typename"), bomb("query", "Query", 31, "__typename"));
    let (a, b, health) = tokio::join!(
        app.gql(None, &q30, json!({})),
        app.gql(None, &q31, json!({})),
        tokio::time::timeout(Duration::from_secs(3), app.http.get(format!("{}/healthz", app.url)).send()),
    );
    assert_eq!((code(&a), code(&b)), ("QUERY_TOO_COMPLEX", "QUERY_TOO_COMPLEX"));
    assert_eq!(health.expect("healthz in time").unwrap().status(), 200);
    // a fragment that spreads itself is a malformed document, not a hang
    let cycle = "{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }";
    assert_eq!(code(&app.gql(None, cycle, json!({})).await), "BAD_USER_INPUT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_bomb_changes_nothing() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let leaf = r#"createProduct(input: {sku: "BOMB", name: "x", priceCents: 1, currency: "USD", stock: 1}) { id }"#;
    let v =
        while_others_are_served(&app, app.gql(Some(ADMIN), &bomb("mutation", "Mutation", 25, leaf), json!({}))).await;
    assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "{v}");
    let products = app.data(None, "{ products { nodes { id } } }", json!({})).await;
    assert_eq!(products["products"]["nodes"], json!([]), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_in_websocket_documents_are_refused_over_both_protocols() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let (token, _) = app.customer().await;
    for protocol in ["graphql-transport-ws", "graphql-ws"] {
        let mut ws = WsClient::init(&app.ws_url, protocol, Some(&token)).await;
        let sub = bomb("subscription", "Subscription", 30, "orderCancelled { reason }");
        let query = bomb("query", "Query", 30, "me { id }");
        for (id, doc) in [("sub", sub), ("query", query)] {
            ws.subscribe(id, &doc, json!({})).await;
            let code = while_others_are_served(&app, ws.next_error_code(id)).await;
            assert_eq!(code, "QUERY_TOO_COMPLEX", "{protocol} {id}");
        }
        // the socket stays usable
        ws.barrier().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directive_floods_are_refused() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let many = (0..=MAX_DIRECTIVES).map(|_| "@include(if: true)").collect::<Vec<_>>().join(" ");
    for q in [
        format!("{{ __typename {many} }}"),
        bomb("query", "Query", 12, "__typename @skip(if: false) @include(if: true)"),
        format!(
            "{{ ...F @include(if: true) }} fragment F on Query {{ {} }}",
            "__typename @skip(if: false) ".repeat(60)
        ),
    ] {
        let v = while_others_are_served(&app, app.gql(None, &q, json!({}))).await;
        assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "{v}");
    }
    // a few are fine
    let v = app.gql(None, "{ __typename @include(if: true) @skip(if: false) }", json!({})).await;
    assert_eq!(v["data"]["__typename"], "Query", "{v}");
}

/// The whole request shares one budget: a batch whose operations each fit
/// but together do not is refused whole, before any of it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplifying_batches_are_refused_whole() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let p = app.create_product("AMP", 100, 1_000).await;
    let (token, _) = app.customer().await;
    app.create_order(&token, &[(&p, 1)]).await;
    // the attack of the issue: ten operations of three aliased order histories
    let history = "orders(first: 100) { nodes { id lines { quantity unitPriceCents product { id sku name stock } } } }";
    let op = format!("{{ a: {history} b: {history} c: {history} }}");
    let batch = vec![json!({"query": op}); 10];
    let res = app.http.post(format!("{}/graphql", app.url)).bearer_auth(&token).json(&batch).send();
    let answers: Vec<Value> = while_others_are_served(&app, res).await.unwrap().json().await.unwrap();
    assert_eq!(answers.len(), 10);
    assert!(answers.iter().all(|a| code(a) == "QUERY_TOO_COMPLEX" && a["data"].is_null()), "{answers:?}");
    // each of these fits alone (10 × 100 × 8 = 8,000) and ten do not
    let page = "products(first: 100) { nodes { id sku name priceCents currency stock } }";
    let ten = (0..10).map(|i| format!("p{i}: {page}")).collect::<Vec<_>>().join(" ");
    let one = json!({"query": format!("{{ {ten} }}")});
    let alone = app.gql(None, one["query"].as_str().unwrap(), json!({})).await;
    assert!(alone.get("errors").is_none(), "{alone}");
    let res = app.http.post(format!("{}/graphql", app.url)).json(&vec![one.clone(); 10]).send().await.unwrap();
    let answers: Vec<Value> = res.json().await.unwrap();
    assert!(answers.iter().all(|a| code(a) == "QUERY_TOO_COMPLEX"), "{answers:?}");
    // a batch with a mutation in it runs none of it when refused
    let restock = json!({"query": format!(r#"mutation {{ restockProduct(id: "{p}", quantity: 5) {{ stock }} }}"#)});
    let mut batch = vec![one; 9];
    batch.insert(0, restock);
    let res = app.http.post(format!("{}/graphql", app.url)).bearer_auth(ADMIN).json(&batch).send().await.unwrap();
    let answers: Vec<Value> = res.json().await.unwrap();
    assert!(answers.iter().all(|a| code(a) == "QUERY_TOO_COMPLEX"), "{answers:?}");
    assert_eq!(app.stock(&p).await, 999, "the restock did not run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_input_is_cut_short_in_every_message() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let huge = "x".repeat(250 * 1024);
    let q = format!(
        "query($id: ID!) {{ {} }}",
        (0..50).map(|i| format!("p{i}: product(id: $id) {{ id }}")).collect::<Vec<_>>().join(" ")
    );
    let res = app.http.post(format!("{}/graphql", app.url)).json(&json!({"query": q, "variables": {"id": huge}}));
    let body = while_others_are_served(&app, res.send()).await.unwrap().text().await.unwrap();
    assert!(body.len() < 50 * 1024, "a 250 KB input echoed: {} bytes", body.len());
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code(&v), "BAD_USER_INPUT", "{v}");
    // the same through the engine's own messages (an unknown field name)
    let name = "f".repeat(20_000);
    let v = app.gql(None, &format!("{{ {name} }}"), json!({})).await;
    assert!(message(&v).len() < 400, "{}", message(&v).len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variable_longer_than_any_input_is_refused_whole_and_changes_nothing() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let create = "mutation($name: String!) { createProduct(input: {sku: \"LONG-1\", name: $name, priceCents: 100, \
                  currency: \"USD\", stock: 1}) { id } }";
    let too_long = "n".repeat(shopgraph::graphql::MAX_VARIABLE_STRING_BYTES + 1);
    let v = app.gql(Some(ADMIN), create, json!({"name": too_long})).await;
    assert_eq!(code(&v), "BAD_USER_INPUT", "{v}");
    assert!(message(&v).contains("$name"), "names the variable: {v}");
    assert!(v.get("data").is_none_or(|d| d.is_null()), "nothing ran: {v}");
    // nested in an input object or a list, too
    let lines = json!({"lines": [{"productId": "x".repeat(9000), "quantity": 1}]});
    let v = app
        .gql(None, "mutation($lines: [OrderLineInput!]!) { createOrder(input: {lines: $lines}) { id } }", lines)
        .await;
    assert_eq!(code(&v), "BAD_USER_INPUT", "{v}");
    let products = app.data(None, "{ products { nodes { id } } }", json!({})).await;
    assert_eq!(products["products"]["nodes"].as_array().unwrap().len(), 0, "no product was created");
    // at the bound it is judged as usual (here: too long for a product name)
    let v = app.gql(Some(ADMIN), create, json!({"name": "n".repeat(8 * 1024)})).await;
    assert_eq!(code(&v), "BAD_USER_INPUT", "{v}");
    assert!(!message(&v).contains("$name"), "the name's own rule: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_introspection_errors_suggest_no_names() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.introspection = false).await;
    for q in
        ["{ products { nodez { id } } }", "{ orders(stauts: PAID) { nodes { id } } }", "{ prodcts { nodes { id } } }"]
    {
        let v = app.gql(None, q, json!({})).await;
        assert_eq!(code(&v), "BAD_USER_INPUT", "{v}");
        assert!(!v.to_string().contains("Did you mean"), "{v}");
    }
    let on = common::spawn_app(Backend::Sqlite).await;
    let v = on.gql(None, "{ products { nodez { id } } }", json!({})).await;
    assert!(v.to_string().contains("Did you mean"), "suggestions stay on with introspection: {v}");
}

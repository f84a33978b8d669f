//! Bursts of concurrent `createOrder`, as a client sees them. On Postgres
//! concurrent orders are placed together in batches (one statement, one
//! commit); these tests pin what must not change because of that: no
//! overselling, each order all-or-nothing and refused for its own reason
//! only, idempotency keys answered with one order, and the order returned
//! equal to the order read later. They run on SQLite too (same contract).

mod common;

use std::time::Duration;

use common::{code, TestApp, ADMIN};
use futures_util::future::join_all;
use serde_json::{json, Value};

const PLACE: &str = "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id status totalCents currency createdAt expiresAt lines { quantity unitPriceCents product { id } } } }";
const READ: &str = "query($id: ID!) { order(id: $id) { id status totalCents currency createdAt expiresAt lines { quantity unitPriceCents product { id } } } }";

/// Sends every request at once and waits for all answers, for at most 60 s.
async fn burst(app: &TestApp, requests: Vec<(String, Value)>) -> Vec<Value> {
    let sends = requests.into_iter().map(|(token, input)| {
        let (http, url) = (app.http.clone(), format!("{}/graphql", app.url));
        async move {
            let res = http.post(url).bearer_auth(token).json(&json!({"query": PLACE, "variables": {"i": input}}));
            res.send().await.unwrap().json::<Value>().await.unwrap()
        }
    });
    tokio::time::timeout(Duration::from_secs(60), join_all(sends)).await.expect("the burst is answered within 60 s")
}

fn lines(lines: &[(&str, i64)]) -> Value {
    json!({"lines": lines.iter().map(|(p, q)| json!({"productId": p, "quantity": q})).collect::<Vec<_>>()})
}

fn placed(v: &Value) -> Option<&Value> {
    v["data"]["createOrder"].as_object().map(|_| &v["data"]["createOrder"])
}

async fn customers(app: &TestApp, n: usize) -> Vec<String> {
    join_all((0..n).map(|_| app.customer())).await.into_iter().map(|(token, _)| token).collect()
}

both_stores! {
    a_burst_on_scarce_stock_never_oversells_and_every_refusal_names_the_product => |app: TestApp| async move {
        let scarce = app.create_product("SCARCE", 300, 40).await;
        let plenty = app.create_product("PLENTY", 100, 1_000_000).await;
        let tokens = customers(&app, 8).await;
        // 120 orders of 1 or 2 units (180 units wanted, 40 in stock), half of
        // them with a second line on a product that never runs out
        let requests: Vec<(String, Value)> = (0..120)
            .map(|i| {
                let qty = 1 + (i % 2) as i64;
                let input = if i % 4 < 2 { lines(&[(&scarce, qty)]) } else { lines(&[(&scarce, qty), (&plenty, 1)]) };
                (tokens[i % tokens.len()].clone(), input)
            })
            .collect();
        let answers = burst(&app, requests).await;
        let (mut units, mut plenty_units) = (0, 0);
        for v in &answers {
            match placed(v) {
                Some(o) => {
                    let ls = o["lines"].as_array().unwrap();
                    units += ls.iter().find(|l| l["product"]["id"] == scarce.as_str()).unwrap()["quantity"].as_i64().unwrap();
                    plenty_units += ls.iter().filter(|l| l["product"]["id"] == plenty.as_str()).count() as i64;
                }
                None => {
                    assert_eq!(code(v), "INSUFFICIENT_STOCK", "{v}");
                    assert!(v["errors"][0]["message"].as_str().unwrap().contains(&scarce), "names the product: {v}");
                }
            }
        }
        let left = app.stock(&scarce).await;
        assert!((0..2).contains(&left), "the burst wanted 4.5 times the stock: at most one unit can stay unsold, {left} did");
        assert_eq!(units, 40 - left, "stock taken = units in placed orders");
        assert_eq!(app.stock(&plenty).await, 1_000_000 - plenty_units, "refused orders took nothing");
        // what createOrder answered is what a later read returns
        for v in answers.iter().filter_map(placed).take(20) {
            let read = app.data(Some(ADMIN), READ, json!({"id": v["id"]})).await;
            assert_eq!(&read["order"], v);
        }
    };

    a_burst_mixing_good_and_bad_orders_places_the_good_ones => |app: TestApp| async move {
        let a = app.create_product("A", 250, 1_000).await;
        let gone = app.create_product("GONE", 100, 0).await;
        let eur = app.create_product_in("EUR", 100, "EUR", 1_000).await;
        let big = app.create_product("BIG", 1_000_000, 10_000).await;
        let tokens = customers(&app, 4).await;
        let kinds: [(Value, Option<(&str, &str)>); 6] = [
            (lines(&[(&a, 2)]), None),
            (lines(&[("prd_987654", 1)]), Some(("NOT_FOUND", "prd_987654"))),
            (lines(&[(&gone, 1)]), Some(("INSUFFICIENT_STOCK", gone.as_str()))),
            (lines(&[(&a, 1), (&gone, 1)]), Some(("INSUFFICIENT_STOCK", gone.as_str()))),
            (lines(&[(&a, 1), (&eur, 1)]), Some(("BAD_USER_INPUT", "currency"))),
            (lines(&[(&a, 1), (&big, 10_000)]), Some(("BAD_USER_INPUT", "total"))),
        ];
        let mut good = 0;
        for round in 0..5 {
            let requests: Vec<(String, Value)> =
                (0..48).map(|i| (tokens[(i + round) % tokens.len()].clone(), kinds[i % kinds.len()].0.clone())).collect();
            let answers = burst(&app, requests).await;
            for (i, v) in answers.iter().enumerate() {
                match &kinds[i % kinds.len()].1 {
                    None => {
                        let o = placed(v).unwrap_or_else(|| panic!("a good order was refused: {v}"));
                        assert_eq!(o["totalCents"], 500);
                        good += 1;
                    }
                    Some((want, mentions)) => {
                        assert_eq!(code(v), *want, "{v}");
                        assert!(v["errors"][0]["message"].as_str().unwrap().contains(mentions), "{v}");
                    }
                }
            }
        }
        assert_eq!(good, 5 * 8);
        assert_eq!(app.stock(&a).await, 1_000 - 2 * good, "only the good orders took stock");
        assert_eq!((app.stock(&gone).await, app.stock(&eur).await, app.stock(&big).await), (0, 1_000, 10_000));
        let all = app.data(Some(ADMIN), "{ orders(first: 100) { nodes { id } } }", json!({})).await;
        assert_eq!(all["orders"]["nodes"].as_array().unwrap().len() as i64, good, "no order row for a refused order");
    };

    one_idempotency_key_sent_concurrently_gives_one_order => |app: TestApp| async move {
        let a = app.create_product("A", 100, 1_000).await;
        let tokens = customers(&app, 3).await;
        let keyed = |key: &str| {
            let mut input = lines(&[(&a, 3)]);
            input["idempotencyKey"] = json!(key);
            input
        };
        // per customer 8 retries of one checkout, amid orders without a key
        let mut requests = Vec::new();
        for _ in 0..8 {
            for t in &tokens {
                requests.push((t.clone(), keyed("checkout-1")));
                requests.push((t.clone(), lines(&[(&a, 1)])));
            }
        }
        let answers = burst(&app, requests).await;
        let mut ids_per_customer = vec![std::collections::BTreeSet::new(); tokens.len()];
        for (i, v) in answers.iter().enumerate() {
            let o = placed(v).unwrap_or_else(|| panic!("refused: {v}"));
            if i % 2 == 0 {
                ids_per_customer[(i / 2) % tokens.len()].insert(o["id"].as_str().unwrap().to_string());
            }
        }
        for ids in &ids_per_customer {
            assert_eq!(ids.len(), 1, "one order per customer and key: {ids:?}");
        }
        let distinct: std::collections::BTreeSet<_> = ids_per_customer.iter().flatten().collect();
        assert_eq!(distinct.len(), tokens.len(), "keys are per customer");
        assert_eq!(app.stock(&a).await, 1_000 - 3 * 3 - 8 * 3, "each key's stock taken once");
    };
}

//! The contract's queries and mutations over HTTP, on SQLite and Postgres.

mod common;

use common::{code, TestApp, ADMIN};
use serde_json::json;

both_stores! {
    registering_twice_with_one_email_is_a_conflict => |app: TestApp| async move {
        let q = "mutation($e: String!) { registerCustomer(email: $e, password: \"long enough pw\") { token customer { email } } }";
        let first = app.data(None, q, json!({"e": "Ann@Example.com"})).await;
        assert_eq!(first["registerCustomer"]["customer"]["email"], "ann@example.com");
        let again = app.gql(None, q, json!({"e": "ann@example.com"})).await;
        assert_eq!(code(&again), "CONFLICT");
    };

    login_answers_the_same_for_a_wrong_password_and_an_unknown_email => |app: TestApp| async move {
        let reg = "mutation { registerCustomer(email: \"bob@example.com\", password: \"right password\") { token } }";
        app.data(None, reg, json!({})).await;
        let login = "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { token customer { email } } }";
        let ok = app.data(None, login, json!({"e": "bob@example.com", "p": "right password"})).await;
        let token = ok["login"]["token"].as_str().unwrap();
        let me = app.data(Some(token), "{ me { email } }", json!({})).await;
        assert_eq!(me["me"]["email"], "bob@example.com");
        let wrong = app.gql(None, login, json!({"e": "bob@example.com", "p": "wrong password"})).await;
        let unknown = app.gql(None, login, json!({"e": "nobody@example.com", "p": "wrong password"})).await;
        assert_eq!(code(&wrong), "UNAUTHENTICATED");
        assert_eq!(wrong["errors"][0]["message"], unknown["errors"][0]["message"]);
        assert_eq!(code(&unknown), "UNAUTHENTICATED");
    };

    bad_registrations_are_refused_with_bad_user_input => |app: TestApp| async move {
        let q = "mutation($e: String!, $p: String!) { registerCustomer(email: $e, password: $p) { token } }";
        assert_eq!(code(&app.gql(None, q, json!({"e": "not-an-email", "p": "long enough pw"})).await), "BAD_USER_INPUT");
        assert_eq!(code(&app.gql(None, q, json!({"e": "a@b.io", "p": "short"})).await), "BAD_USER_INPUT");
    };

    only_the_admin_creates_and_restocks_products => |app: TestApp| async move {
        let (token, _) = app.customer().await;
        let q = "mutation { createProduct(input: {sku: \"X-1\", name: \"X\", priceCents: 100, currency: \"EUR\", stock: 1}) { id } }";
        assert_eq!(code(&app.gql(None, q, json!({})).await), "FORBIDDEN");
        assert_eq!(code(&app.gql(Some(&token), q, json!({})).await), "FORBIDDEN");
        let id = app.data(Some(ADMIN), q, json!({})).await["createProduct"]["id"].as_str().unwrap().to_string();
        assert_eq!(code(&app.gql(Some(ADMIN), q, json!({})).await), "CONFLICT");
        let restock = "mutation($id: ID!, $q: Int!) { restockProduct(id: $id, quantity: $q) { stock } }";
        assert_eq!(code(&app.gql(Some(&token), restock, json!({"id": id, "q": 5})).await), "FORBIDDEN");
        let d = app.data(Some(ADMIN), restock, json!({"id": id, "q": 5})).await;
        assert_eq!(d["restockProduct"]["stock"], 6);
        assert_eq!(code(&app.gql(Some(ADMIN), restock, json!({"id": id, "q": 0})).await), "BAD_USER_INPUT");
        assert_eq!(code(&app.gql(Some(ADMIN), restock, json!({"id": "prd_999999", "q": 1})).await), "NOT_FOUND");
        assert_eq!(code(&app.gql(Some(ADMIN), restock, json!({"id": "banana", "q": 1})).await), "BAD_USER_INPUT");
        let full = app.create_product("FULL", 100, 2_147_000_000).await;
        let v = app.gql(Some(ADMIN), restock, json!({"id": full, "q": 1_000_000})).await;
        assert_eq!(code(&v), "BAD_USER_INPUT", "{v}");
        assert_eq!(app.stock(&full).await, 2_147_000_000);
    };

    invalid_products_are_refused_and_nothing_is_created => |app: TestApp| async move {
        let q = "mutation($i: CreateProductInput!) { createProduct(input: $i) { id } }";
        let base = json!({"sku": "OK-1", "name": "Fine", "priceCents": 100, "currency": "USD", "stock": 1});
        for (field, value) in [("priceCents", json!(-1)), ("stock", json!(-5)), ("currency", json!("usd")), ("currency", json!("DOLLAR")), ("sku", json!("")), ("name", json!(" "))] {
            let mut input = base.clone();
            input[field] = value;
            let v = app.gql(Some(ADMIN), q, json!({"i": input})).await;
            assert_eq!(code(&v), "BAD_USER_INPUT", "{field}: {v}");
        }
        let list = app.data(None, "{ products { nodes { id } } }", json!({})).await;
        assert_eq!(list["products"]["nodes"].as_array().unwrap().len(), 0);
    };

    products_are_paged_oldest_first_with_cursors => |app: TestApp| async move {
        for i in 0..25 {
            app.create_product(&format!("P-{i:02}"), 100, 1).await;
        }
        let q = "query($f: Int, $a: String) { products(first: $f, after: $a) { edges { cursor node { sku } } nodes { sku } pageInfo { hasNextPage hasPreviousPage startCursor endCursor } } }";
        let page1 = app.data(None, q, json!({})).await["products"].clone();
        assert_eq!(page1["nodes"].as_array().unwrap().len(), 20, "first defaults to 20");
        assert_eq!(page1["nodes"][0]["sku"], "P-00");
        assert_eq!(page1["pageInfo"]["hasNextPage"], true);
        let after = page1["pageInfo"]["endCursor"].as_str().unwrap();
        let page2 = app.data(None, q, json!({"f": 10, "a": after})).await["products"].clone();
        let skus: Vec<_> = page2["nodes"].as_array().unwrap().iter().map(|n| n["sku"].as_str().unwrap().to_string()).collect();
        assert_eq!(skus, (20..25).map(|i| format!("P-{i:02}")).collect::<Vec<_>>());
        assert_eq!(page2["pageInfo"]["hasNextPage"], false);
        assert_eq!(page2["pageInfo"]["hasPreviousPage"], true);
        let capped = app.data(None, q, json!({"f": 1000})).await;
        assert_eq!(capped["products"]["nodes"].as_array().unwrap().len(), 25);
        assert_eq!(code(&app.gql(None, q, json!({"a": "garbage!"})).await), "BAD_USER_INPUT");
        assert_eq!(code(&app.gql(None, q, json!({"f": -1})).await), "BAD_USER_INPUT");
    };

    an_order_takes_stock_snapshots_prices_and_expires_after_the_ttl => |app: TestApp| async move {
        let a = app.create_product("A", 250, 10).await;
        let b = app.create_product("B", 1000, 3).await;
        let (token, customer) = app.customer().await;
        let v = app
            .gql(Some(&token), "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id status totalCents currency createdAt expiresAt customer { id } lines { quantity unitPriceCents lineTotalCents product { id sku } } } }",
                json!({"i": {"lines": [{"productId": b, "quantity": 2}, {"productId": a, "quantity": 4}]}}))
            .await;
        let o = &v["data"]["createOrder"];
        assert_eq!(o["status"], "PENDING_PAYMENT", "{v}");
        assert_eq!(o["totalCents"], 3000);
        assert_eq!(o["currency"], "USD");
        assert_eq!(o["customer"]["id"], customer.as_str());
        assert_eq!(o["lines"].as_array().unwrap().len(), 2);
        let created = chrono::DateTime::parse_from_rfc3339(o["createdAt"].as_str().unwrap()).unwrap();
        let expires = chrono::DateTime::parse_from_rfc3339(o["expiresAt"].as_str().unwrap()).unwrap();
        assert_eq!((expires - created).num_seconds(), 60);
        assert_eq!(app.stock(&a).await, 6);
        assert_eq!(app.stock(&b).await, 1);
    };

    an_order_is_all_or_nothing_and_names_the_product_short_of_stock => |app: TestApp| async move {
        let a = app.create_product("A", 100, 10).await;
        let b = app.create_product("B", 100, 1).await;
        let (token, _) = app.customer().await;
        let v = app.create_order(&token, &[(&a, 5), (&b, 2)]).await;
        assert_eq!(code(&v), "INSUFFICIENT_STOCK");
        assert!(v["errors"][0]["message"].as_str().unwrap().contains(&b), "{v}");
        assert_eq!(app.stock(&a).await, 10);
        assert_eq!(app.stock(&b).await, 1);
    };

    bad_order_input_is_refused_and_changes_nothing => |app: TestApp| async move {
        let a = app.create_product("A", 100, 10).await;
        let eur = app.create_product_in("E", 100, "EUR", 10).await;
        let big = app.create_product("BIG", 1_000_000, 10_000).await;
        let (token, _) = app.customer().await;
        for (lines, want) in [
            (vec![(a.as_str(), 0)], "BAD_USER_INPUT"),
            (vec![(a.as_str(), -1)], "BAD_USER_INPUT"),
            (vec![(a.as_str(), 10_001)], "BAD_USER_INPUT"),
            (vec![], "BAD_USER_INPUT"),
            (vec![(a.as_str(), 1), (a.as_str(), 1)], "BAD_USER_INPUT"),
            (vec![(a.as_str(), 1), (eur.as_str(), 1)], "BAD_USER_INPUT"),
            (vec![(big.as_str(), 10_000)], "BAD_USER_INPUT"),
            (vec![("prd_987654", 1)], "NOT_FOUND"),
            (vec![("not-an-id", 1)], "BAD_USER_INPUT"),
        ] {
            let v = app.create_order(&token, &lines).await;
            assert_eq!(code(&v), want, "{lines:?}: {v}");
        }
        let many: Vec<(String, i64)> = (0..101).map(|i| (format!("prd_{}", i + 1000), 1)).collect();
        let many: Vec<(&str, i64)> = many.iter().map(|(p, q)| (p.as_str(), *q)).collect();
        assert_eq!(code(&app.create_order(&token, &many).await), "BAD_USER_INPUT");
        assert_eq!(app.stock(&a).await, 10);
        assert_eq!(app.stock(&eur).await, 10);
        assert_eq!(app.stock(&big).await, 10_000);
        assert_eq!(code(&app.create_order(ADMIN, &[(&a, 1)]).await), "FORBIDDEN");
        let anon = app.gql(None, "mutation { createOrder(input: {lines: [{productId: \"prd_1\", quantity: 1}]}) { id } }", json!({})).await;
        assert_eq!(code(&anon), "UNAUTHENTICATED");
    };

    an_idempotency_key_returns_the_first_order_and_reserves_nothing_more => |app: TestApp| async move {
        let a = app.create_product("A", 100, 10).await;
        let (token, _) = app.customer().await;
        let (other, _) = app.customer().await;
        let q = "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id status } }";
        let input = json!({"i": {"lines": [{"productId": a, "quantity": 2}], "idempotencyKey": "checkout-1"}});
        let first = app.data(Some(&token), q, input.clone()).await;
        let again = app.data(Some(&token), q, input.clone()).await;
        assert_eq!(first["createOrder"]["id"], again["createOrder"]["id"]);
        assert_eq!(app.stock(&a).await, 8);
        let id = first["createOrder"]["id"].as_str().unwrap();
        app.cancel(&token, id).await;
        let after_cancel = app.data(Some(&token), q, input.clone()).await;
        assert_eq!(after_cancel["createOrder"]["status"], "CANCELLED", "the first order, whatever its status now");
        let different = app.gql(Some(&token), q, json!({"i": {"lines": [{"productId": a, "quantity": 3}], "idempotencyKey": "checkout-1"}})).await;
        assert_eq!(code(&different), "CONFLICT");
        let theirs = app.data(Some(&other), q, input).await;
        assert_ne!(theirs["createOrder"]["id"], first["createOrder"]["id"], "keys are per customer");
    };

    customers_see_only_their_own_orders_and_the_admin_sees_all => |app: TestApp| async move {
        let a = app.create_product("A", 100, 10).await;
        let (alice, _) = app.customer().await;
        let (bob, _) = app.customer().await;
        let order = app.order_id(&alice, &[(&a, 1)]).await;
        let q = "query($id: ID!) { order(id: $id) { id } }";
        assert_eq!(app.data(Some(&alice), q, json!({"id": order})).await["order"]["id"], order.as_str());
        assert!(app.data(Some(&bob), q, json!({"id": order})).await["order"].is_null());
        assert!(app.data(Some(&bob), q, json!({"id": "ord_987654"})).await["order"].is_null());
        assert_eq!(app.data(Some(ADMIN), q, json!({"id": order})).await["order"]["id"], order.as_str());
        assert_eq!(code(&app.gql(None, q, json!({"id": order})).await), "UNAUTHENTICATED");
        assert_eq!(code(&app.gql(Some(&bob), q, json!({"id": "x"})).await), "BAD_USER_INPUT");
        let not_yours = app.pay(&bob, &order).await;
        let missing = app.pay(&bob, "ord_987654").await;
        assert_eq!(code(&not_yours), "NOT_FOUND");
        assert_eq!(not_yours["errors"][0]["message"].as_str().unwrap().replace(&order, "ID"), missing["errors"][0]["message"].as_str().unwrap().replace("ord_987654", "ID"));
        assert_eq!(code(&app.cancel(&bob, &order).await), "NOT_FOUND");
        let list = "{ orders { nodes { id } } }";
        assert_eq!(app.data(Some(&bob), list, json!({})).await["orders"]["nodes"].as_array().unwrap().len(), 0);
        assert_eq!(app.data(Some(ADMIN), list, json!({})).await["orders"]["nodes"].as_array().unwrap().len(), 1);
    };

    orders_are_listed_newest_first_and_filtered_by_status => |app: TestApp| async move {
        let a = app.create_product("A", 100, 100).await;
        let (token, _) = app.customer().await;
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(app.order_id(&token, &[(&a, 1)]).await);
        }
        app.pay(&token, &ids[1]).await;
        app.cancel(&token, &ids[2]).await;
        let q = "query($s: OrderStatus, $f: Int, $a: String) { orders(status: $s, first: $f, after: $a) { nodes { id status } pageInfo { hasNextPage endCursor } } }";
        let all = app.data(Some(&token), q, json!({"f": 3})).await;
        let got: Vec<_> = all["orders"]["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(got, vec![ids[4].clone(), ids[3].clone(), ids[2].clone()]);
        let rest = app.data(Some(&token), q, json!({"f": 3, "a": all["orders"]["pageInfo"]["endCursor"]})).await;
        assert_eq!(rest["orders"]["nodes"].as_array().unwrap().len(), 2);
        assert_eq!(rest["orders"]["pageInfo"]["hasNextPage"], false);
        let paid = app.data(Some(&token), q, json!({"s": "PAID"})).await;
        assert_eq!(paid["orders"]["nodes"], json!([{"id": ids[1], "status": "PAID"}]));
        let pending = app.data(Some(&token), q, json!({"s": "PENDING_PAYMENT"})).await;
        assert_eq!(pending["orders"]["nodes"].as_array().unwrap().len(), 3);
    };

    paying_and_cancelling_follow_the_contract => |app: TestApp| async move {
        let a = app.create_product("A", 100, 10).await;
        let (token, _) = app.customer().await;
        let paid = app.order_id(&token, &[(&a, 2)]).await;
        let v = app.pay(&token, &paid).await;
        assert_eq!(v["data"]["payOrder"]["status"], "PAID", "{v}");
        assert!(v["data"]["payOrder"]["paidAt"].is_string());
        assert_eq!(code(&app.pay(&token, &paid).await), "ORDER_NOT_PENDING");
        assert_eq!(code(&app.cancel(&token, &paid).await), "ORDER_NOT_PENDING");
        assert_eq!(app.stock(&a).await, 8, "a paid order keeps its stock");

        let cancelled = app.order_id(&token, &[(&a, 3)]).await;
        let v = app.cancel(&token, &cancelled).await;
        assert_eq!(v["data"]["cancelOrder"]["cancelReason"], "CUSTOMER", "{v}");
        assert_eq!(app.stock(&a).await, 8);
        let again = app.cancel(&token, &cancelled).await;
        assert_eq!(again["data"]["cancelOrder"]["status"], "CANCELLED", "cancelling twice returns the order unchanged");
        assert_eq!(code(&app.pay(&token, &cancelled).await), "ORDER_NOT_PENDING");

        let by_admin = app.order_id(&token, &[(&a, 1)]).await;
        let v = app.cancel(ADMIN, &by_admin).await;
        assert_eq!(v["data"]["cancelOrder"]["cancelReason"], "ADMIN");
        let admin_pays = app.order_id(&token, &[(&a, 1)]).await;
        assert_eq!(app.pay(ADMIN, &admin_pays).await["data"]["payOrder"]["status"], "PAID");
        assert_eq!(app.stock(&a).await, 7);
    };

    concurrent_pay_and_cancel_on_one_order_have_exactly_one_winner => |app: TestApp| async move {
        let a = app.create_product("A", 100, 1000).await;
        let (token, _) = app.customer().await;
        for _ in 0..10 {
            let id = app.order_id(&token, &[(&a, 5)]).await;
            let mut tasks = Vec::new();
            for i in 0..8 {
                let (app_url, token, id) = (app.url.clone(), token.clone(), id.clone());
                tasks.push(tokio::spawn(async move {
                    let q = if i % 2 == 0 { "mutation($id: ID!) { payOrder(id: $id) { status } }" } else { "mutation($id: ID!) { cancelOrder(id: $id) { status } }" };
                    let v: serde_json::Value = reqwest::Client::new().post(format!("{app_url}/graphql")).bearer_auth(token)
                        .json(&json!({"query": q, "variables": {"id": id}})).send().await.unwrap().json().await.unwrap();
                    v
                }));
            }
            let mut paid = 0;
            let mut cancelled = 0;
            for t in tasks {
                let v = t.await.unwrap();
                let status = v["data"].as_object().and_then(|d| d.values().next()).map(|o| o["status"].clone());
                match status.as_ref().and_then(|s| s.as_str()) {
                    Some("PAID") => paid += 1,
                    Some("CANCELLED") => cancelled += 1,
                    _ => assert_eq!(code(&v), "ORDER_NOT_PENDING", "{v}"),
                }
            }
            assert!(paid <= 1 && (paid == 0 || cancelled == 0), "paid {paid} cancelled {cancelled}");
            assert!(paid + cancelled >= 1);
        }
        // every order either keeps its 5 units (paid) or gave them back
        let d = app.data(Some(ADMIN), "{ orders(first: 100) { nodes { status } } }", json!({})).await;
        let paid = d["orders"]["nodes"].as_array().unwrap().iter().filter(|n| n["status"] == "PAID").count() as i64;
        assert_eq!(app.stock(&a).await, 1000 - 5 * paid);
    };

    concurrent_orders_never_oversell_a_product => |app: TestApp| async move {
        let a = app.create_product("SCARCE", 100, 25).await;
        let mut customers = Vec::new();
        for _ in 0..4 {
            customers.push(app.customer().await.0);
        }
        let mut tasks = Vec::new();
        for i in 0..60 {
            let (url, token, a) = (app.url.clone(), customers[i % 4].clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                let v: serde_json::Value = reqwest::Client::new().post(format!("{url}/graphql")).bearer_auth(token)
                    .json(&json!({"query": "mutation($p: ID!) { createOrder(input: {lines: [{productId: $p, quantity: 1}]}) { id } }", "variables": {"p": a}}))
                    .send().await.unwrap().json().await.unwrap();
                v
            }));
        }
        let mut placed = 0;
        for t in tasks {
            let v = t.await.unwrap();
            if v["data"]["createOrder"]["id"].is_string() { placed += 1 } else { assert_eq!(code(&v), "INSUFFICIENT_STOCK", "{v}") }
        }
        assert_eq!(placed, 25);
        assert_eq!(app.stock(&a).await, 0);
    };

    an_id_has_one_spelling_so_a_leading_zero_is_malformed => |app: TestApp| async move {
        let (token, _) = app.customer().await;
        let p = app.create_product("ZERO-1", 100, 5).await;
        let o = app.order_id(&token, &[(&p, 1)]).await;
        let zeroed = |id: &str| id.replacen('_', "_0", 1);
        let order = "query($id: ID!) { order(id: $id) { id } }";
        assert_eq!(app.data(Some(&token), order, json!({"id": o})).await["order"]["id"], o.as_str());
        assert_eq!(code(&app.gql(Some(&token), order, json!({"id": zeroed(&o)})).await), "BAD_USER_INPUT");
        assert_eq!(code(&app.pay(&token, &zeroed(&o)).await), "BAD_USER_INPUT");
        assert_eq!(app.order(&token, &o).await["status"], "PENDING_PAYMENT");
        let product = "query($id: ID!) { product(id: $id) { id } }";
        assert_eq!(code(&app.gql(None, product, json!({"id": zeroed(&p)})).await), "BAD_USER_INPUT");
    };

    // A document that ran before skips the engine's validation (only its
    // variables are checked again): what a client sees must not change.
    a_document_that_ran_before_refuses_bad_variables_and_bad_ids_as_the_first_time => |app: TestApp| async move {
        let (token, _) = app.customer().await;
        let p = app.create_product("AGAIN-1", 100, 50).await;
        let create = "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id lines { quantity } } }";
        let post = |variables: serde_json::Value| {
            let app = &app;
            let token = token.clone();
            async move {
                let res = app
                    .client
                    .http
                    .post(format!("{}/graphql", app.client.url))
                    .bearer_auth(token)
                    .header("accept", "application/graphql-response+json")
                    .json(&json!({"query": create, "variables": variables}))
                    .send()
                    .await
                    .unwrap();
                (res.status().as_u16(), res.json::<serde_json::Value>().await.unwrap())
            }
        };
        let wrong = [
            json!({"i": {"lines": [{"productId": p, "quantity": "two"}]}}),
            json!({"i": {"lines": [{"productId": p}]}}),
            json!({"i": {"lines": [{"productId": p, "quantity": 1, "colour": "red"}]}}),
            json!({"i": null}),
        ];
        let mut first = Vec::new();
        for v in &wrong {
            first.push(post(v.clone()).await);
        }
        let good = post(json!({"i": {"lines": [{"productId": p, "quantity": 2}]}})).await;
        assert_eq!(good.0, 200, "{}", good.1);
        assert_eq!(good.1["data"]["createOrder"]["lines"][0]["quantity"], 2);
        // the same document again, now known: each wrong request answered
        // exactly as before it was known, nothing placed
        for (v, before) in wrong.iter().zip(&first) {
            let again = post(v.clone()).await;
            assert_eq!(&again, before, "{v}");
            assert_eq!(again.0, 400, "{v}: {}", again.1);
            assert_eq!(code(&again.1), "BAD_USER_INPUT", "{v}: {}", again.1);
        }
        let known = post(json!({"i": {"lines": [{"productId": p, "quantity": 3}]}})).await;
        assert_eq!(known.1["data"]["createOrder"]["lines"][0]["quantity"], 3, "{}", known.1);
        assert_eq!(app.stock(&p).await, 45);

        // a document without variables, known after its first run: errors
        // still carry their codes
        let bad_id = "{ product(id: \"banana\") { id } }";
        let once = app.gql(None, bad_id, json!({})).await;
        let twice = app.gql(None, bad_id, json!({})).await;
        assert_eq!(code(&once), "BAD_USER_INPUT", "{once}");
        assert_eq!(once, twice);
        let unknown_field = "{ product(id: \"prd_1\") { colour } }";
        assert_eq!(app.gql(None, unknown_field, json!({})).await, app.gql(None, unknown_field, json!({})).await);
        // the operation a name selects, or the engine's refusal of a name
        // that selects none, the same before and after the document is known
        let two = "query A { products(first: 1) { nodes { sku } } } query B { products(first: 2) { nodes { sku } } }";
        for name in [json!("B"), json!("C"), serde_json::Value::Null] {
            let run = || async {
                let res = app
                    .client
                    .http
                    .post(format!("{}/graphql", app.client.url))
                    .json(&json!({"query": two, "operationName": name}))
                    .send()
                    .await
                    .unwrap();
                res.json::<serde_json::Value>().await.unwrap()
            };
            let (first, again) = (run().await, run().await);
            assert_eq!(first, again, "{name}");
            if name == "B" {
                assert!(first["errors"].is_null(), "{first}");
            } else {
                assert!(first["errors"][0]["message"].is_string(), "{name}: {first}");
            }
        }
    };
}

/// A row whose status the server does not know (written around the
/// schema's CHECK, by hand or by another version) is an `INTERNAL` error,
/// never shown as an order pending payment.
#[tokio::test]
async fn an_order_with_an_unknown_status_is_an_internal_error_not_pending_payment() {
    use sqlx::Connection;
    let app = common::spawn_app(common::Backend::Sqlite).await;
    let (token, _) = app.customer().await;
    let p = app.create_product("ODD-1", 100, 5).await;
    let o = app.order_id(&token, &[(&p, 1)]).await;
    let mut db = sqlx::SqliteConnection::connect(&app.config.database_url).await.unwrap();
    sqlx::query("PRAGMA ignore_check_constraints = ON").execute(&mut db).await.unwrap();
    sqlx::query("UPDATE orders SET status = 'REFUNDED'").execute(&mut db).await.unwrap();
    let v = app.gql(Some(&token), "query($id: ID!) { order(id: $id) { id status } }", json!({"id": o})).await;
    assert_eq!(code(&v), "INTERNAL", "{v}");
    assert!(!v.to_string().contains("REFUNDED"), "{v}");
}

mod http {
    use super::*;

    #[tokio::test]
    async fn a_malformed_body_gets_400_and_get_cannot_mutate() {
        let app = common::spawn_app(common::Backend::Sqlite).await;
        let res = app
            .http
            .post(format!("{}/graphql", app.url))
            .header("content-type", "application/json")
            .body("{nope")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
        let res =
            app.http.get(format!("{}/graphql?query=%7Bproducts%7Bnodes%7Bid%7D%7D%7D", app.url)).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let res = app
            .http
            .get(format!("{}/graphql?query=mutation%7BregisterCustomer(email:%22a@b.io%22,password:%2212345678%22)%7Btoken%7D%7D", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 405);
        let res = app.http.get(format!("{}/healthz", app.url)).send().await.unwrap();
        assert_eq!(res.status(), 200);
        // ready once the listener has subscribed (503 until then)
        app.wait_ready().await;
        let res = app.http.get(format!("{}/readyz", app.url)).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["database"], "up");
        let res = app.http.get(format!("{}/graphiql", app.url)).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let res = app.http.get(format!("{}/metrics", app.url)).bearer_auth(common::METRICS_TOKEN).send().await.unwrap();
        assert!(res.text().await.unwrap().contains("shopgraph_"));
    }

    #[tokio::test]
    async fn invalid_tokens_are_refused_never_served_as_anonymous() {
        let app = common::spawn_app(common::Backend::Sqlite).await;
        for bad in ["garbage", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjdXNfMSIsImV4cCI6OTk5OTk5OTk5OX0.forged"] {
            let v = app.gql(Some(bad), "{ products { nodes { id } } }", json!({})).await;
            assert_eq!(code(&v), "UNAUTHENTICATED");
        }
        let res = app
            .http
            .post(format!("{}/graphql", app.url))
            .header("accept", "application/graphql-response+json")
            .bearer_auth("garbage")
            .json(&json!({"query": "{ products { nodes { id } } }"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
    }

    #[tokio::test]
    async fn deep_or_costly_queries_are_refused_before_running() {
        let app = common::spawn_app(common::Backend::Sqlite).await;
        let mut q = String::from("{ __schema { types { fields { type { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { ofType { name } } } } } } } } } } } } } } } } }");
        let v = app.gql(None, &q, json!({})).await;
        assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "{v}");
        // 40 pages of 100 products as nodes and edges: 40 × 100 × 13 > MAX_COMPLEXITY
        q = (0..40)
            .map(|i| format!("a{i}: products(first: 100) {{ nodes {{ id sku name stock }} edges {{ cursor node {{ id sku name stock }} }} }}"))
            .collect::<Vec<_>>()
            .join(" ");
        let v = app.gql(None, &format!("{{ {q} }}"), json!({})).await;
        assert_eq!(code(&v), "QUERY_TOO_COMPLEX", "{v}");
    }

    #[test]
    fn schema_graphql_is_current() {
        let checked_in = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql")).unwrap();
        assert!(
            checked_in == shopgraph::graphql::sdl(),
            "schema.graphql is stale: run `cargo run -- schema > schema.graphql`"
        );
    }

    #[test]
    fn invalid_configuration_stops_the_start_with_one_line_naming_the_variable() {
        for (var, value) in
            [("ORDER_TTL", "abc"), ("ORDER_TTL", "0s"), ("REDIS_URL", "http://x"), ("DATABASE_URL", "mysql://x")]
        {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_shopgraph"))
                .env(var, value)
                .env("LISTEN_ADDR", "127.0.0.1:0")
                .output()
                .unwrap();
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            assert!(err.contains(var), "{err}");
        }
    }
}

//! What a test says to a server, in-process ([`super::TestApp`]) or a child
//! process ([`super::child::ChildServer`]): its addresses, an HTTP client,
//! and the requests tests make again and again (GraphQL, catalog and
//! customer setup, orders, `/metrics`, readiness). Both servers hold one and
//! hand it out through `Deref`, so the helpers are written once.

use std::time::Duration;

use serde_json::{json, Value};

use super::eventually;

pub struct Client {
    /// `http://host:port`
    pub url: String,
    /// `ws://host:port/graphql`
    pub ws_url: String,
    pub http: reqwest::Client,
}

impl Client {
    /// A client for the server at `url` (`http://host:port`).
    pub fn new(url: String) -> Client {
        let ws_url = format!("{}/graphql", url.replacen("http://", "ws://", 1));
        Client { url, ws_url, http: reqwest::Client::new() }
    }

    /// Waits until `/readyz` says 200 and the event fan-out is subscribed,
    /// so that events published by other instances reach this one.
    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.url);
        eventually(Duration::from_secs(10), || async {
            let res = self.http.get(&url).send().await.ok()?;
            let ok = res.status().is_success();
            let body: Value = res.json().await.ok()?;
            (ok && body["events"] == "up").then_some(())
        })
        .await
    }

    /// Sends a GraphQL document; returns the whole JSON response.
    pub async fn gql(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut req =
            self.http.post(format!("{}/graphql", self.url)).json(&json!({"query": query, "variables": variables}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.expect("request sent");
        res.json().await.expect("JSON response")
    }

    /// Like `gql`, but panics on errors and returns `data`.
    pub async fn data(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let v = self.gql(token, query, variables).await;
        assert!(v.get("errors").is_none(), "unexpected errors: {v}");
        v["data"].clone()
    }

    pub async fn create_product(&self, sku: &str, price_cents: i64, stock: i64) -> String {
        self.create_product_in(sku, price_cents, "USD", stock).await
    }

    pub async fn create_product_in(&self, sku: &str, price_cents: i64, currency: &str, stock: i64) -> String {
        let d = self
            .data(
                Some(super::ADMIN),
                "mutation($i: CreateProductInput!) { createProduct(input: $i) { id } }",
                json!({"i": {"sku": sku, "name": format!("Product {sku}"), "priceCents": price_cents, "currency": currency, "stock": stock}}),
            )
            .await;
        d["createProduct"]["id"].as_str().unwrap().to_string()
    }

    /// Registers a customer with a unique email; returns (token, customer id).
    pub async fn customer(&self) -> (String, String) {
        let email = format!("c-{}@example.com", uuid::Uuid::new_v4().simple());
        let d = self
            .data(
                None,
                "mutation($e: String!) { registerCustomer(email: $e, password: \"correct horse battery\") { token customer { id } } }",
                json!({"e": email}),
            )
            .await;
        (
            d["registerCustomer"]["token"].as_str().unwrap().to_string(),
            d["registerCustomer"]["customer"]["id"].as_str().unwrap().to_string(),
        )
    }

    pub async fn create_order(&self, token: &str, lines: &[(&str, i64)]) -> Value {
        let lines: Vec<Value> = lines.iter().map(|(p, q)| json!({"productId": p, "quantity": q})).collect();
        self.gql(
            Some(token),
            "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id status totalCents currency expiresAt createdAt } }",
            json!({"i": {"lines": lines}}),
        )
        .await
    }

    /// Places an order that must succeed; returns its id.
    pub async fn order_id(&self, token: &str, lines: &[(&str, i64)]) -> String {
        let v = self.create_order(token, lines).await;
        v["data"]["createOrder"]["id"].as_str().unwrap_or_else(|| panic!("order not placed: {v}")).to_string()
    }

    /// The Prometheus text of `/metrics` (asked with the test `METRICS_TOKEN`).
    pub async fn metrics(&self) -> String {
        let req = self.http.get(format!("{}/metrics", self.url)).bearer_auth(super::METRICS_TOKEN);
        req.send().await.unwrap().text().await.unwrap()
    }

    pub async fn stock(&self, product: &str) -> i64 {
        let d = self.data(None, "query($id: ID!) { product(id: $id) { stock } }", json!({"id": product})).await;
        d["product"]["stock"].as_i64().unwrap()
    }

    pub async fn order(&self, token: &str, id: &str) -> Value {
        let d = self
            .data(
                Some(token),
                "query($id: ID!) { order(id: $id) { id status cancelReason paidAt cancelledAt expiresAt } }",
                json!({"id": id}),
            )
            .await;
        d["order"].clone()
    }

    pub async fn pay(&self, token: &str, id: &str) -> Value {
        self.gql(Some(token), "mutation($id: ID!) { payOrder(id: $id) { id status paidAt } }", json!({"id": id})).await
    }

    pub async fn cancel(&self, token: &str, id: &str) -> Value {
        self.gql(
            Some(token),
            "mutation($id: ID!) { cancelOrder(id: $id) { id status cancelReason } }",
            json!({"id": id}),
        )
        .await
    }
}

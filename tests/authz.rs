//! The authorization matrix: every query, mutation and subscription against
//! every kind of caller (anonymous, customer A, customer B, the admin, an
//! expired token, a forged one, one signed with another secret), each with
//! the answer the contract gives it. A cell that acts on "A's order" gets an
//! order of its own, so that no cell depends on another.

mod common;

use std::fmt;

use common::{code, ws::WsClient, TestApp, ADMIN, JWT_SECRET};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Anonymous,
    A,
    B,
    Admin,
    Expired,
    Forged,
    OtherSecret,
}

const EVERYONE: [Who; 7] = [Who::Anonymous, Who::A, Who::B, Who::Admin, Who::Expired, Who::Forged, Who::OtherSecret];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Products,
    Product,
    Me,
    Order,
    Orders,
    RegisterCustomer,
    Login,
    CreateProduct,
    RestockProduct,
    CreateOrder,
    PayOrder,
    CancelOrder,
    OrderCancelled,
    OrderCancelledOne,
    OrderUpdated,
}

const HTTP_OPS: [Op; 12] = [
    Op::Products,
    Op::Product,
    Op::Me,
    Op::Order,
    Op::Orders,
    Op::RegisterCustomer,
    Op::Login,
    Op::CreateProduct,
    Op::RestockProduct,
    Op::CreateOrder,
    Op::PayOrder,
    Op::CancelOrder,
];
const WS_OPS: [Op; 3] = [Op::OrderCancelled, Op::OrderCancelledOne, Op::OrderUpdated];

/// What a caller got.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The operation ran and returned (or delivered) the thing asked for.
    Data,
    /// `null`: not there for this caller.
    Null,
    /// Ran, but what is not the caller's was left out (a list, a feed).
    Hidden,
    /// An error with this `extensions.code`.
    Code(String),
    /// The websocket was closed with this code.
    Closed(u16),
    /// Anything else (described).
    Other(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Code(c) => write!(f, "{c}"),
            Outcome::Closed(c) => write!(f, "close {c}"),
            Outcome::Other(s) => write!(f, "other: {s}"),
            o => write!(f, "{o:?}"),
        }
    }
}

fn err(c: &str) -> Outcome {
    Outcome::Code(c.to_string())
}

/// The contract's answer for each cell.
fn expected(op: Op, who: Who) -> Outcome {
    use Op::*;
    use Outcome::{Closed, Data, Hidden, Null};
    use Who::*;
    if matches!(who, Expired | Forged | OtherSecret) {
        // never served as anonymous, whatever the operation
        return if WS_OPS.contains(&op) { Closed(4403) } else { err("UNAUTHENTICATED") };
    }
    match (op, who) {
        (Products | Product | RegisterCustomer | Login, _) => Data,
        (Me, A | B) => Data,
        (Me, _) => Null,
        (Order, A | Admin) => Data,
        (Order, B) => Null,
        (Orders, A | Admin) => Data,
        (Orders, B) => Hidden,
        (CreateProduct | RestockProduct, Admin) => Data,
        (CreateProduct | RestockProduct, _) => err("FORBIDDEN"),
        (CreateOrder, A | B) => Data,
        (CreateOrder, Admin) => err("FORBIDDEN"),
        (PayOrder | CancelOrder | OrderCancelledOne | OrderUpdated, A | Admin) => Data,
        (PayOrder | CancelOrder | OrderCancelledOne | OrderUpdated, B) => err("NOT_FOUND"),
        (OrderCancelled, A | Admin) => Data,
        (OrderCancelled, B) => Hidden,
        (_, Anonymous) => err("UNAUTHENTICATED"),
        (op, who) => unreachable!("{op:?} × {who:?}"),
    }
}

fn jwt(secret: &str, sub: &str, exp_offset_secs: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": sub, "iat": now, "exp": now + exp_offset_secs});
    encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

struct World {
    app: TestApp,
    product: String,
    a_token: String,
    a_id: String,
    a_email: String,
    b_token: String,
    b_id: String,
    tokens: Vec<(Who, Option<String>)>,
}

impl World {
    async fn new() -> World {
        let app = common::spawn_app(common::Backend::Sqlite).await;
        let product = app.create_product("AUTHZ", 100, 100_000).await;
        let a_email = format!("a-{}@example.com", uuid::Uuid::new_v4().simple());
        let d = app
            .data(
                None,
                "mutation($e: String!) { registerCustomer(email: $e, password: \"correct horse battery\") { token customer { id } } }",
                json!({"e": a_email}),
            )
            .await;
        let a_token = d["registerCustomer"]["token"].as_str().unwrap().to_string();
        let a_id = d["registerCustomer"]["customer"]["id"].as_str().unwrap().to_string();
        let (b_token, b_id) = app.customer().await;
        // A's real claims, signature replaced
        let (head, _) = a_token.rsplit_once('.').unwrap();
        let forged = format!("{head}.{}", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        let tokens = vec![
            (Who::Anonymous, None),
            (Who::A, Some(a_token.clone())),
            (Who::B, Some(b_token.clone())),
            (Who::Admin, Some(ADMIN.to_string())),
            (Who::Expired, Some(jwt(JWT_SECRET, &a_id, -10))),
            (Who::Forged, Some(forged)),
            (Who::OtherSecret, Some(jwt("another-secret-entirely-0123", &a_id, 3600))),
        ];
        World { app, product, a_token, a_id, a_email, b_token, b_id, tokens }
    }

    fn token(&self, who: Who) -> Option<&str> {
        self.tokens.iter().find(|(w, _)| *w == who).unwrap().1.as_deref()
    }

    /// A fresh pending order of A (or of B).
    async fn order_of(&self, who: Who) -> String {
        let token = if who == Who::B { &self.b_token } else { &self.a_token };
        self.app.order_id(token, &[(&self.product, 1)]).await
    }

    async fn status(&self, id: &str) -> Value {
        self.app.order(ADMIN, id).await["status"].clone()
    }

    async fn http(&self, op: Op, who: Who) -> Outcome {
        let token = self.token(who);
        let target = match op {
            Op::Order | Op::Orders | Op::PayOrder | Op::CancelOrder => Some(self.order_of(Who::A).await),
            _ => None,
        };
        let (query, vars) = match op {
            Op::Products => ("{ products { nodes { id } } }", json!({})),
            Op::Product => ("query($id: ID!) { product(id: $id) { id } }", json!({"id": self.product})),
            Op::Me => ("{ me { id } }", json!({})),
            Op::Order => ("query($id: ID!) { order(id: $id) { id } }", json!({"id": target})),
            Op::Orders => ("{ orders(first: 100) { nodes { id } } }", json!({})),
            Op::RegisterCustomer => (
                "mutation($e: String!) { registerCustomer(email: $e, password: \"correct horse battery\") { token } }",
                json!({"e": format!("r-{}@example.com", uuid::Uuid::new_v4().simple())}),
            ),
            Op::Login => (
                "mutation($e: String!) { login(email: $e, password: \"correct horse battery\") { token } }",
                json!({"e": self.a_email}),
            ),
            Op::CreateProduct => (
                "mutation($i: CreateProductInput!) { createProduct(input: $i) { id } }",
                json!({"i": {"sku": format!("S-{}", uuid::Uuid::new_v4().simple()), "name": "x", "priceCents": 1, "currency": "USD", "stock": 1}}),
            ),
            Op::RestockProduct => {
                ("mutation($id: ID!) { restockProduct(id: $id, quantity: 1) { id } }", json!({"id": self.product}))
            }
            Op::CreateOrder => (
                "mutation($p: ID!) { createOrder(input: {lines: [{productId: $p, quantity: 1}]}) { id } }",
                json!({"p": self.product}),
            ),
            Op::PayOrder => ("mutation($id: ID!) { payOrder(id: $id) { id status } }", json!({"id": target})),
            Op::CancelOrder => ("mutation($id: ID!) { cancelOrder(id: $id) { id status } }", json!({"id": target})),
            _ => unreachable!(),
        };
        let v = self.app.gql(token, query, vars).await;
        if v.get("errors").is_some() {
            let outcome = Outcome::Code(code(&v).to_string());
            // a refused payment or cancellation changed nothing
            if let (Op::PayOrder | Op::CancelOrder, Some(id)) = (op, &target) {
                if self.status(id).await != "PENDING_PAYMENT" {
                    return Outcome::Other(format!("refused with {outcome} but the order changed"));
                }
            }
            return outcome;
        }
        let data = &v["data"];
        match op {
            Op::Me if data["me"].is_null() => Outcome::Null,
            Op::Me => {
                let own = if who == Who::A { &self.a_id } else { &self.b_id };
                if data["me"]["id"] == own.as_str() {
                    Outcome::Data
                } else {
                    Outcome::Other(format!("me is {}", data["me"]))
                }
            }
            Op::Order if data["order"].is_null() => Outcome::Null,
            Op::Orders => {
                let ids: Vec<&str> =
                    data["orders"]["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
                if ids.contains(&target.as_deref().unwrap()) {
                    Outcome::Data
                } else {
                    Outcome::Hidden
                }
            }
            Op::PayOrder | Op::CancelOrder => {
                let (field, status) =
                    if op == Op::PayOrder { ("payOrder", "PAID") } else { ("cancelOrder", "CANCELLED") };
                if data[field]["status"] == status && self.status(target.as_deref().unwrap()).await == status {
                    Outcome::Data
                } else {
                    Outcome::Other(v.to_string())
                }
            }
            _ => Outcome::Data,
        }
    }

    /// Subscribes, makes sure the subscription is live, then the admin
    /// cancels a fresh order of A and then one of B: the first thing the
    /// subscription yields tells what the caller may see.
    async fn ws(&self, op: Op, who: Who, protocol: &str) -> Outcome {
        let token = self.token(who);
        let mut ws = match token {
            Some(t) if matches!(who, Who::Expired | Who::Forged | Who::OtherSecret) => {
                let mut ws = WsClient::init_with_payload(
                    &self.app.ws_url,
                    protocol,
                    json!({"Authorization": format!("Bearer {t}")}),
                )
                .await;
                return match ws.next_json().await {
                    Err(closed) => Outcome::Closed(closed.code),
                    Ok(v) => Outcome::Other(format!("not closed: {v}")),
                };
            }
            _ => WsClient::init(&self.app.ws_url, protocol, token).await,
        };
        let oa = self.order_of(Who::A).await;
        let ob = self.order_of(Who::B).await;
        let (query, vars) = match op {
            Op::OrderCancelled => ("subscription { orderCancelled { order { id } } }", json!({})),
            Op::OrderCancelledOne => {
                ("subscription($id: ID) { orderCancelled(orderId: $id) { order { id } } }", json!({"id": oa}))
            }
            Op::OrderUpdated => ("subscription($id: ID!) { orderUpdated(orderId: $id) { id } }", json!({"id": oa})),
            _ => unreachable!(),
        };
        ws.subscribe("s", query, vars).await;
        // a query after the subscription: once its answer is complete, the
        // subscription has started (or failed)
        ws.subscribe("barrier", "{ products(first: 1) { nodes { id } } }", json!({})).await;
        let mut first: Option<Value> = None;
        loop {
            let v = ws.next_json().await.expect("socket open");
            if v["id"] == "s" && first.is_none() {
                first = Some(v);
            } else if v["id"] == "barrier" && v["type"] == "complete" {
                break;
            }
        }
        if first.is_none() {
            for id in [&oa, &ob] {
                let d = self.app.cancel(ADMIN, id).await;
                assert_eq!(d["data"]["cancelOrder"]["status"], "CANCELLED", "{d}");
            }
            first = Some(ws.next_json().await.expect("socket open"));
        }
        let v = first.unwrap();
        match v["type"].as_str() {
            Some("error") => {
                let e = if v["payload"].is_array() { &v["payload"][0] } else { &v["payload"] };
                Outcome::Code(e["extensions"]["code"].as_str().unwrap_or("none").to_string())
            }
            Some("next") | Some("data") => {
                let data = &v["payload"]["data"];
                let id = data["orderCancelled"]["order"]["id"].as_str().or(data["orderUpdated"]["id"].as_str());
                match id {
                    Some(id) if id == oa => Outcome::Data,
                    Some(id) if id == ob => Outcome::Hidden,
                    _ => Outcome::Other(v.to_string()),
                }
            }
            _ => Outcome::Other(v.to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_every_caller_as_the_contract_says() {
    let w = World::new().await;
    let mut table = Vec::new();
    let mut wrong = Vec::new();
    let mut check = |op: Op, who: Who, how: &str, got: Outcome| {
        let want = expected(op, who);
        let mark = if got == want { "ok" } else { "WRONG" };
        table.push(format!("{mark:5} {op:?} ({how}) × {who:?}: expected {want}, got {got}"));
        if got != want {
            wrong.push(table.last().unwrap().clone());
        }
    };
    for op in HTTP_OPS {
        for who in EVERYONE {
            check(op, who, "http", w.http(op, who).await);
        }
    }
    for protocol in ["graphql-transport-ws", "graphql-ws"] {
        for op in WS_OPS {
            for who in EVERYONE {
                check(op, who, protocol, w.ws(op, who, protocol).await);
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cells differ from the contract:\n{}\n\nthe whole matrix:\n{}",
        wrong.len(),
        wrong.join("\n"),
        table.join("\n")
    );
    assert_eq!(table.len(), 7 * (12 + 2 * 3));
}

/// Tokens expire: a customer token issued with a 1 s lifetime is refused
/// (`UNAUTHENTICATED`, never anonymous) once its `exp` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_tokens_expire_after_jwt_lifetime() {
    let app =
        common::spawn_app_with(common::Backend::Sqlite, |c| c.jwt_lifetime = std::time::Duration::from_secs(1)).await;
    let issued = std::time::Instant::now();
    let (token, id) = app.customer().await;
    let d = app.data(Some(&token), "{ me { id } }", json!({})).await;
    assert_eq!(d["me"]["id"], id.as_str());
    // `exp` is in whole seconds: refused at the latest 2 s after issue
    let refused = common::eventually(std::time::Duration::from_secs(5), || async {
        let v = app.gql(Some(&token), "{ me { id } }", json!({})).await;
        v.get("errors").is_some().then_some(v)
    })
    .await;
    assert_eq!(code(&refused), "UNAUTHENTICATED");
    assert!(issued.elapsed() >= std::time::Duration::from_millis(900), "refused too early");
    assert!(refused["data"].is_null() || refused.get("data").is_none(), "{refused}");
    let v = app.gql(Some(&token), "{ products { nodes { id } } }", json!({})).await;
    assert_eq!(code(&v), "UNAUTHENTICATED", "an expired token is never served as anonymous");
}

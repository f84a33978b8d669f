//! Property tests. Input parsing (ids, cursors, quantities, currencies,
//! emails, passwords, idempotency keys, order lines, page sizes): no input
//! panics, what is accepted is exactly what the contract allows, and values
//! round-trip. Then a real server under random input: malformed websocket
//! frames never take it down (other sockets keep being served), and random
//! HTTP bodies never get a 5xx or an error without a code.

mod common;

use std::time::Duration;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use common::{ws::WsClient, ADMIN};
use futures_util::SinkExt;
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::{json, Value};
use shopgraph::domain::{
    cursor, page_size, parse_currency, parse_idempotency_key, CustomerId, Email, OrderId, OrderRequest, Password,
    ProductId, Quantity,
};
use tokio_tungstenite::tungstenite::Message;

/// Ids go up to 18 digits (the parser's bound; far beyond any sequence).
const MAX_ID: i64 = 999_999_999_999_999_999;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ids_round_trip_and_nothing_else_parses(n in 1..=MAX_ID, raw in ".{0,30}", near in "(ord|prd|cus|)_?[0-9 +-]{0,22}") {
        prop_assert_eq!(OrderId::parse(&OrderId(n).to_string()), Ok(OrderId(n)));
        prop_assert_eq!(ProductId::parse(&ProductId(n).to_string()), Ok(ProductId(n)));
        prop_assert_eq!(CustomerId::parse(&CustomerId(n).to_string()), Ok(CustomerId(n)));
        // one kind's id is never another's
        prop_assert!(OrderId::parse(&ProductId(n).to_string()).is_err());
        prop_assert!(CustomerId::parse(&OrderId(n).to_string()).is_err());
        for s in [raw.as_str(), near.as_str()] {
            if let Ok(id) = OrderId::parse(s) {
                prop_assert!(id.0 > 0);
                prop_assert_eq!(OrderId::parse(&id.to_string()), Ok(id));
                prop_assert!(s.starts_with("ord_") && s[4..].bytes().all(|b| b.is_ascii_digit()));
            }
            let _ = ProductId::parse(s);
            let _ = CustomerId::parse(s);
        }
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused(n in 1..=i64::MAX, raw in ".{0,40}", bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        prop_assert_eq!(cursor::decode(&cursor::encode(n)), Ok(n));
        for s in [raw, URL_SAFE_NO_PAD.encode(&bytes)] {
            if let Ok(m) = cursor::decode(&s) {
                prop_assert!(m > 0);
                prop_assert_eq!(cursor::decode(&cursor::encode(m)), Ok(m));
            }
        }
    }

    #[test]
    fn quantities_are_one_to_ten_thousand(n in any::<i32>(), ok in 1..=10_000i32) {
        prop_assert_eq!(Quantity::parse(n).is_ok(), (1..=10_000).contains(&n));
        prop_assert_eq!(Quantity::parse(ok), Ok(Quantity(ok)));
    }

    #[test]
    fn currencies_are_three_capital_letters(raw in ".{0,6}", code in "[A-Z]{3}") {
        let expected = raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_uppercase());
        prop_assert_eq!(parse_currency(&raw).is_ok(), expected);
        prop_assert!(parse_currency(&code).is_ok());
        prop_assert!(parse_currency(&code.to_lowercase()).is_err());
    }

    #[test]
    fn emails_are_normalised_once_and_stay_valid(
        raw in ".{0,60}",
        good in "[a-zA-Z0-9._%+-]{1,20}@[a-zA-Z0-9-]{1,12}\\.[a-zA-Z]{2,6}",
        pad in "[ \t]{0,3}",
    ) {
        for s in [raw, good.clone(), format!("{pad}{good}{pad}")] {
            if let Ok(e) = Email::parse(&s) {
                let text = e.as_str();
                prop_assert_eq!(text, text.trim());
                prop_assert_eq!(text.to_lowercase(), text);
                prop_assert!(text.len() <= 254);
                prop_assert_eq!(text.matches('@').count(), 1);
                prop_assert_eq!(Email::parse(text).map(|x| x.as_str().to_string()), Ok(text.to_string()));
            }
        }
        let parsed = Email::parse(&format!("{pad}{good}{pad}"));
        prop_assert_eq!(parsed.map(|e| e.as_str().to_string()), Ok(good.to_lowercase()));
    }

    #[test]
    fn passwords_and_idempotency_keys_are_bounded(raw in ".{0,300}") {
        let chars = raw.chars().count();
        prop_assert_eq!(Password::parse(&raw).is_ok(), (8..=256).contains(&chars));
        // no control characters and no text-direction overrides (U+202A–E, U+2066–9)
        let hidden = |c: char| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        let key_ok = !raw.is_empty() && raw.len() <= 128 && !raw.chars().any(hidden);
        prop_assert_eq!(parse_idempotency_key(&raw).is_ok(), key_ok);
    }

    #[test]
    fn order_requests_take_one_to_a_hundred_distinct_lines_sorted(
        lines in proptest::collection::vec((1i64..150, 1..=10_000i32), 0..120),
    ) {
        let input: Vec<(ProductId, Quantity)> = lines.iter().map(|(p, q)| (ProductId(*p), Quantity(*q))).collect();
        let mut ids: Vec<i64> = lines.iter().map(|(p, _)| *p).collect();
        ids.sort();
        ids.dedup();
        let valid = !lines.is_empty() && lines.len() <= 100 && ids.len() == lines.len();
        match OrderRequest::new(input, None) {
            Ok(r) => {
                prop_assert!(valid);
                prop_assert!(r.lines.windows(2).all(|w| w[0].0 < w[1].0), "sorted by product");
                prop_assert_eq!(r.lines.len(), lines.len());
            }
            Err(_) => prop_assert!(!valid),
        }
    }

    #[test]
    fn page_sizes_are_capped(first in proptest::option::of(any::<i32>())) {
        match (first, page_size(first)) {
            (None, Ok(n)) => prop_assert_eq!(n, 20),
            (Some(f), Ok(n)) => prop_assert!(f >= 0 && n == (f as usize).min(100)),
            (Some(f), Err(_)) => prop_assert!(f < 0),
            (None, Err(_)) => prop_assert!(false, "no `first` is the default"),
        }
    }
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::hash_map("[a-zA-Z_]{1,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// GraphQL-ish text: real operations, broken ones and noise.
fn query_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{ products { nodes { id stock } } }".to_string()),
        Just("query($id: ID!) { order(id: $id) { id } }".to_string()),
        Just("query($f: Int) { products(first: $f) { nodes { id } } }".to_string()),
        Just("mutation($i: CreateOrderInput!) { createOrder(input: $i) { id } }".to_string()),
        Just("subscription { orderCancelled { reason } }".to_string()),
        Just("subscription($id: ID!) { orderUpdated(orderId: $id) { id } }".to_string()),
        Just("query A { me { id } } query B { products { nodes { id } } }".to_string()),
        "[{}()a-zA-Z:$!@. \n\"]{0,60}",
        ".{0,80}",
    ]
}

#[derive(Debug, Clone)]
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

fn frame() -> impl Strategy<Value = Frame> {
    let kinds = prop_oneof![
        Just("connection_init"),
        Just("subscribe"),
        Just("start"),
        Just("complete"),
        Just("stop"),
        Just("ping"),
        Just("pong"),
        Just("connection_terminate"),
        Just("next"),
        Just("bogus"),
    ];
    let id = prop_oneof![Just(Value::Null), "[a-z0-9]{0,6}".prop_map(Value::from), json_value()];
    let payload = prop_oneof![
        json_value(),
        (query_text(), json_value(), proptest::option::of(".{0,10}"))
            .prop_map(|(q, v, op)| json!({"query": q, "variables": v, "operationName": op})),
        Just(json!({"Authorization": "Bearer garbage"})),
        Just(json!({"authorization": 42})),
    ];
    prop_oneof![
        ".{0,120}".prop_map(Frame::Text),
        json_value().prop_map(|v| Frame::Text(v.to_string())),
        (kinds, id, payload, any::<bool>()).prop_map(|(kind, id, payload, with_id)| {
            let mut m = json!({"type": kind, "payload": payload});
            if with_id {
                m["id"] = id;
            }
            Frame::Text(m.to_string())
        }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Frame::Binary),
    ]
}

/// Close codes the server documents (and 1000, 1009 from the library).
const CLOSE_CODES: [u16; 9] = [1000, 1002, 1009, 4400, 4401, 4403, 4408, 4409, 4429];

/// Random frames on fresh sockets, each followed by a probe that the server
/// must answer (or close the socket with a documented code). Meanwhile a
/// subscriber on another socket keeps receiving its events.
#[test]
fn random_websocket_frames_never_take_the_server_down() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (app, mut watcher, product, token) = rt.block_on(async {
        let app = common::spawn_app(common::Backend::Sqlite).await;
        let product = app.create_product("FUZZ", 100, 1_000).await;
        let (token, _) = app.customer().await;
        let mut watcher = WsClient::init(&app.ws_url, "graphql-transport-ws", Some(ADMIN)).await;
        watcher.subscribe("all", "subscription { orderCancelled { order { id } } }", json!({})).await;
        watcher.barrier().await;
        (app, watcher, product, token)
    });
    let mut runner = TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    let case = (any::<bool>(), 0..3usize, proptest::collection::vec(frame(), 1..6));
    runner
        .run(&case, |(legacy, init, frames)| {
            rt.block_on(async {
                let protocol = if legacy { "graphql-ws" } else { "graphql-transport-ws" };
                let mut ws = WsClient::connect(&app.ws_url, protocol).await;
                match init {
                    1 => ws.send(json!({"type": "connection_init", "payload": {}})).await,
                    2 => {
                        ws.send(
                            json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {ADMIN}")}}),
                        )
                        .await
                    }
                    _ => {}
                }
                for f in &frames {
                    let msg = match f {
                        Frame::Text(t) => Message::Text(t.clone().into()),
                        Frame::Binary(b) => Message::Binary(b.clone().into()),
                    };
                    if ws.socket.send(msg).await.is_err() {
                        break; // already closed by the server
                    }
                }
                // the probe: a query the server answers, or the close
                let probe = format!("probe-{}", uuid::Uuid::new_v4().simple());
                let kind = if legacy { "start" } else { "subscribe" };
                let _ = ws
                    .socket
                    .send(Message::Text(
                        json!({"id": probe, "type": kind, "payload": {"query": "{ __typename }"}}).to_string().into(),
                    ))
                    .await;
                loop {
                    match ws.next(Duration::from_secs(10)).await {
                        Ok(v) => {
                            // whatever the server says, its errors carry codes
                            let errors = match v["type"].as_str() {
                                Some("error") => Some(&v["payload"]),
                                Some("next" | "data") => v["payload"].get("errors"),
                                _ => None,
                            };
                            if let Some(errors) = errors {
                                let errors = errors.as_array().cloned().unwrap_or_else(|| vec![errors.clone()]);
                                prop_assert!(
                                    errors.iter().all(|e| e["extensions"]["code"].is_string()),
                                    "an error without a code: {v} after {frames:?}"
                                );
                            }
                            if v["id"] == probe.as_str() {
                                break;
                            }
                        }
                        Err(closed) => {
                            prop_assert!(CLOSE_CODES.contains(&closed.code), "closed with {closed:?} after {frames:?}");
                            break;
                        }
                    }
                }
                Ok::<(), TestCaseError>(())
            })
        })
        .unwrap();
    rt.block_on(async {
        // the bystander still gets its events, and HTTP is served
        let id = app.order_id(&token, &[(&product, 1)]).await;
        app.cancel(&token, &id).await;
        let e = watcher.next_data("all").await;
        assert_eq!(e["data"]["orderCancelled"]["order"]["id"], id.as_str());
        let res = app.http.get(format!("{}/healthz", app.url)).send().await.unwrap();
        assert_eq!(res.status(), 200);
    });
}

#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Json(Value),
}

fn request() -> impl Strategy<Value = Value> {
    (
        query_text(),
        json_value(),
        proptest::option::of(prop_oneof![Just("A".to_string()), ".{0,8}".prop_map(String::from)]),
    )
        .prop_map(|(q, v, op)| json!({"query": q, "variables": v, "operationName": op}))
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(Body::Bytes),
        json_value().prop_map(Body::Json),
        request().prop_map(Body::Json),
        proptest::collection::vec(request(), 0..13).prop_map(|v| Body::Json(Value::from(v))),
        (request(), json_value()).prop_map(|(mut r, x)| {
            r["extensions"] = x;
            Body::Json(r)
        }),
    ]
}

/// Every error in a GraphQL response carries a code; a response without
/// errors has `data`.
fn check_response(v: &Value) -> Result<(), String> {
    let answers: Vec<&Value> = match v {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    for a in answers {
        match a.get("errors") {
            Some(Value::Array(errors)) if !errors.is_empty() => {
                if let Some(e) = errors.iter().find(|e| !e["extensions"]["code"].is_string()) {
                    return Err(format!("an error without a code: {e}"));
                }
            }
            Some(other) => return Err(format!("malformed errors: {other}")),
            None if a.get("data").is_some() => {}
            None => return Err(format!("neither data nor errors: {a}")),
        }
    }
    Ok(())
}

/// Random bodies (bytes, JSON, requests with random variables, batches of
/// up to 12) by POST, and random query strings by GET: never a 5xx, always
/// JSON whose errors all carry a code.
#[test]
fn random_http_bodies_never_get_a_5xx_or_an_uncoded_error() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (app, token) = rt.block_on(async {
        let app = common::spawn_app(common::Backend::Sqlite).await;
        app.create_product("FUZZ", 100, 1_000).await;
        let (token, _) = app.customer().await;
        (app, token)
    });
    let mut runner = TestRunner::new(ProptestConfig { cases: 256, ..ProptestConfig::default() });
    let content_type =
        prop_oneof![Just("application/json"), Just("text/plain"), Just("application/graphql-response+json"), Just("")];
    let case =
        (body(), content_type, 0..3usize, any::<bool>(), proptest::collection::vec((".{0,12}", ".{0,40}"), 0..3));
    runner
        .run(&case, |(body, content_type, who, modern, params)| {
            rt.block_on(async {
                let url = format!("{}/graphql", app.url);
                let auth = [None, Some(token.as_str()), Some(ADMIN)][who];
                let mut post = app.http.post(&url);
                let mut get = app.http.get(&url).query(&params);
                if !content_type.is_empty() {
                    post = post.header("content-type", content_type);
                }
                if modern {
                    post = post.header("accept", "application/graphql-response+json");
                    get = get.header("accept", "application/graphql-response+json");
                }
                if let Some(t) = auth {
                    post = post.bearer_auth(t);
                    get = get.bearer_auth(t);
                }
                let post = match &body {
                    Body::Bytes(b) => post.body(b.clone()),
                    Body::Json(v) => post.body(v.to_string()),
                };
                for (what, req) in [("POST", post), ("GET", get)] {
                    let res = req.send().await.expect("the server answers");
                    let status = res.status();
                    let text = res.text().await.unwrap();
                    prop_assert!(!status.is_server_error(), "{what} {body:?} {params:?}: {status} {text}");
                    let v: Value = serde_json::from_str(&text).map_err(|e| {
                        TestCaseError::fail(format!("{what} {body:?}: not JSON ({e}): {status} {text}"))
                    })?;
                    check_response(&v).map_err(|e| TestCaseError::fail(format!("{what} {body:?} {params:?}: {e}")))?;
                }
                Ok::<(), TestCaseError>(())
            })
        })
        .unwrap();
}

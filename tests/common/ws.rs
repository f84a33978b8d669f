//! A small GraphQL websocket client for tests, speaking either protocol.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::{
    client_async, connect_async,
    tungstenite::{client::IntoClientRequest, http::HeaderValue, Message},
    MaybeTlsStream, WebSocketStream,
};

pub struct WsClient {
    pub socket: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    pub legacy: bool,
}

/// How a socket ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

impl WsClient {
    /// Opens a socket with the given sub-protocol (`graphql-transport-ws` or `graphql-ws`).
    pub async fn connect(url: &str, protocol: &str) -> WsClient {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(protocol).unwrap());
        let (socket, resp) = tokio::time::timeout(Duration::from_secs(5), connect_async(req))
            .await
            .expect("connect in time")
            .expect("websocket upgrade");
        assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), protocol);
        WsClient { socket, legacy: protocol == "graphql-ws" }
    }

    /// Connects and completes `connection_init` with an optional token.
    pub async fn init(url: &str, protocol: &str, token: Option<&str>) -> WsClient {
        let mut c = WsClient::connect(url, protocol).await;
        let payload = match token {
            Some(t) => json!({"Authorization": format!("Bearer {t}")}),
            None => json!({}),
        };
        c.send(json!({"type": "connection_init", "payload": payload})).await;
        let ack = c.next_json().await.expect("connection_ack");
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        c
    }

    /// Opens a socket whose kernel receive buffer is small (about `bytes`),
    /// so that a client that stops reading pushes back on the server quickly.
    pub async fn connect_with_recv_buffer(url: &str, protocol: &str, bytes: u32) -> WsClient {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(protocol).unwrap());
        let addr = url::Url::parse(url).unwrap().socket_addrs(|| None).unwrap()[0];
        let tcp = tokio::net::TcpSocket::new_v4().unwrap();
        tcp.set_recv_buffer_size(bytes).unwrap();
        let stream = tokio::time::timeout(Duration::from_secs(5), tcp.connect(addr))
            .await
            .expect("connect in time")
            .expect("TCP connect");
        let (socket, resp) =
            tokio::time::timeout(Duration::from_secs(5), client_async(req, MaybeTlsStream::Plain(stream)))
                .await
                .expect("upgrade in time")
                .expect("websocket upgrade");
        assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), protocol);
        WsClient { socket, legacy: protocol == "graphql-ws" }
    }

    /// Connects and sends `connection_init` with exactly this payload,
    /// without waiting for the answer (see [`WsClient::closed`]).
    pub async fn init_with_payload(url: &str, protocol: &str, payload: Value) -> WsClient {
        let mut c = WsClient::connect(url, protocol).await;
        c.send(json!({"type": "connection_init", "payload": payload})).await;
        c
    }

    pub async fn send(&mut self, v: Value) {
        self.socket.send(Message::Text(v.to_string().into())).await.expect("send");
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.socket.send(Message::Text(text.to_string().into())).await.expect("send");
    }

    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let kind = if self.legacy { "start" } else { "subscribe" };
        self.send(json!({"id": id, "type": kind, "payload": {"query": query, "variables": variables}})).await;
    }

    /// The next protocol message that is not a keep-alive, or the close.
    pub async fn next(&mut self, limit: Duration) -> Result<Value, Closed> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no message within {limit:?}"));
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("JSON message");
                    match v["type"].as_str() {
                        Some("ka") | Some("pong") => continue,
                        Some("ping") => {
                            self.send(json!({"type": "pong"})).await;
                            continue;
                        }
                        _ => return Ok(v),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(frame
                        .map(|f| Closed { code: f.code.into(), reason: f.reason.to_string() })
                        .unwrap_or(Closed { code: 1005, reason: String::new() }))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(Closed { code: 1006, reason: String::new() }),
            }
        }
    }

    pub async fn next_json(&mut self) -> Result<Value, Closed> {
        self.next(Duration::from_secs(10)).await
    }

    /// Asserts nothing but keep-alives arrives for `quiet`.
    pub async fn assert_silent(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    assert!(
                        matches!(v["type"].as_str(), Some("ka") | Some("ping") | Some("pong")),
                        "unexpected message {v}"
                    );
                }
                Ok(other) => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Waits for the server to close the socket (keep-alives are skipped;
    /// any other message is a failure).
    pub async fn closed(&mut self, limit: Duration) -> Closed {
        match self.next(limit).await {
            Err(closed) => closed,
            Ok(v) => panic!("expected the socket to close, got {v}"),
        }
    }

    /// Stops subscription `id` (`complete`, or `stop` in the legacy protocol).
    pub async fn unsubscribe(&mut self, id: &str) {
        let kind = if self.legacy { "stop" } else { "complete" };
        self.send(json!({"id": id, "type": kind})).await;
    }

    /// The errors of the next message, which must be the `error` message
    /// ending subscription `id`; always a list (the legacy protocol sends one
    /// error object).
    pub async fn next_errors(&mut self, id: &str) -> Vec<Value> {
        let v = self.next_json().await.expect("socket open");
        assert_eq!(v["type"], "error", "expected error: {v}");
        assert_eq!(v["id"], id);
        match &v["payload"] {
            Value::Array(errors) => errors.clone(),
            Value::Object(_) if self.legacy => vec![v["payload"].clone()],
            _ => panic!("malformed error payload: {v}"),
        }
    }

    /// The `extensions.code` of the `error` message ending subscription `id`.
    pub async fn next_error_code(&mut self, id: &str) -> String {
        let errors = self.next_errors(id).await;
        errors[0]["extensions"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {errors:?}")).to_string()
    }

    /// The next message must be `complete` for subscription `id`.
    pub async fn next_complete(&mut self, id: &str) {
        let v = self.next_json().await.expect("socket open");
        assert_eq!(v["type"], "complete", "expected complete: {v}");
        assert_eq!(v["id"], id);
    }

    /// Runs a query that needs the database over this socket and waits for
    /// its result. Call it before other messages arrive.
    ///
    /// What it proves depends on how the server runs a subscription sent
    /// before it. One the session runs itself (`orderUpdated`, any
    /// customer's) has been polled once, and so has joined the event
    /// broadcast, no later than the query's first, pending, poll: events
    /// produced afterwards reach it. A shared execution (a subscription
    /// whose every root field is `orderCancelled`, e.g. the admin's feed)
    /// runs on a task of its own, and nothing a client can see marks that
    /// task's first poll: the barrier proves only that the subscriber has
    /// joined it. Tests that wait for its events keep a margin instead (the
    /// events they wait for come from work started after the barrier, and
    /// take at least a request's round trip).
    pub async fn barrier(&mut self) {
        let id = format!("barrier-{}", uuid::Uuid::new_v4().simple());
        self.subscribe(&id, "query { products(first: 1) { pageInfo { hasNextPage } } }", json!({})).await;
        let payload = self.next_data(&id).await;
        assert!(payload.get("errors").is_none(), "barrier query failed: {payload}");
        self.next_complete(&id).await;
    }

    /// Collects the `orderCancelled` events of subscription `all` until
    /// `done` says the set is complete, then asserts that nothing more
    /// arrives for a second. Panics on a second event for one order.
    pub async fn cancellations_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&std::collections::HashMap<String, Value>) -> bool,
    ) -> std::collections::HashMap<String, Value> {
        let mut seen = std::collections::HashMap::new();
        let deadline = tokio::time::Instant::now() + limit;
        while !done(&seen) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "only {} events arrived within {limit:?}: {:?}", seen.len(), seen.keys());
            let p = self.next_data_within("all", left).await;
            let e = p["data"]["orderCancelled"].clone();
            let id = e["order"]["id"].as_str().unwrap().to_string();
            assert!(seen.insert(id.clone(), e).is_none(), "a second event for {id}");
        }
        self.assert_silent(Duration::from_secs(1)).await;
        seen
    }

    /// The payload of the next data message for subscription `id`.
    pub async fn next_data(&mut self, id: &str) -> Value {
        self.next_data_within(id, Duration::from_secs(10)).await
    }

    /// Like `next_data`, waiting at most `limit`.
    pub async fn next_data_within(&mut self, id: &str, limit: Duration) -> Value {
        let v = self.next(limit).await.expect("socket open");
        let kind = if self.legacy { "data" } else { "next" };
        assert_eq!(v["type"], kind, "expected {kind}: {v}");
        assert_eq!(v["id"], id);
        v["payload"].clone()
    }
}

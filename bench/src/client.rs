//! The clients: GraphQL over HTTP (reqwest) and `graphql-transport-ws`
//! subscribers (tokio-tungstenite), plus a closed-loop load runner.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};

use crate::procfs::{self, Usage, Watch};

pub const PASSWORD: &str = "bench-password-1";

/// Milliseconds since the epoch, from the wall clock (the server's
/// timestamps use the same clock: same host).
pub fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

pub fn rfc3339_ms(s: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_micros() as f64 / 1000.0)
}

/// `prd_12` → 12.
pub fn numeric_id(id: &str) -> Option<i64> {
    id.rsplit('_').next()?.parse().ok()
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

#[derive(Clone)]
pub struct Gql {
    pub http: reqwest::Client,
    pub url: String,
}

#[derive(Clone, Debug)]
pub struct Customer {
    pub id: i64,
    pub token: String,
}

fn first_error(v: &Value) -> Option<String> {
    let e = v.get("errors")?.get(0)?;
    let code = e.pointer("/extensions/code").and_then(Value::as_str).unwrap_or("?");
    let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
    Some(format!("{code}: {msg}"))
}

impl Gql {
    pub fn new(http: reqwest::Client, url: &str) -> Gql {
        Gql { http, url: url.to_string() }
    }

    /// Posts a prepared JSON body; `Ok(data)` only without GraphQL errors.
    pub async fn post_body(&self, token: Option<&str>, body: String) -> Result<Value> {
        let mut req = self.http.post(&self.url).header("content-type", "application/json").body(body);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let v: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])))?;
        if let Some(e) = first_error(&v) {
            bail!("{e}");
        }
        if !status.is_success() {
            bail!("HTTP {status}");
        }
        v.get("data").cloned().ok_or_else(|| anyhow!("no data in the response"))
    }

    /// Posts a prepared body and counts `needle` in the response, which must
    /// be a 2xx without errors: for read loads, where parsing every
    /// response would make the harness the busiest process on the machine.
    pub async fn post_counting(&self, body: &'static str, needle: &str) -> Result<usize> {
        let resp = self.http.post(&self.url).header("content-type", "application/json").body(body).send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let text = std::str::from_utf8(&bytes).unwrap_or_default();
        if !status.is_success() || text.contains("\"errors\"") {
            bail!("HTTP {status}: {}", &text[..text.len().min(200)]);
        }
        Ok(text.matches(needle).count())
    }

    pub async fn call(&self, token: Option<&str>, query: &str, variables: Value) -> Result<Value> {
        self.post_body(token, json!({"query": query, "variables": variables}).to_string()).await
    }

    pub async fn register(&self, email: &str) -> Result<Customer> {
        let d = self
            .call(
                None,
                "mutation($e: String!, $p: String!) { registerCustomer(email: $e, password: $p) { token customer { id } } }",
                json!({"e": email, "p": PASSWORD}),
            )
            .await?;
        let token = d.pointer("/registerCustomer/token").and_then(Value::as_str).ok_or_else(|| anyhow!("no token"))?;
        let id = d.pointer("/registerCustomer/customer/id").and_then(Value::as_str).and_then(numeric_id);
        Ok(Customer { id: id.ok_or_else(|| anyhow!("no customer id"))?, token: token.into() })
    }

    /// `n` customers, registered `concurrency` at a time (argon2 is slow on purpose).
    pub async fn register_many(&self, n: usize, concurrency: usize) -> Result<Vec<Customer>> {
        let run = crate::server::short_id();
        let emails: Vec<String> = (0..n).map(|i| format!("bench-{run}-{i}@example.com")).collect();
        let results: Vec<Result<Customer>> = futures_util::stream::iter(emails)
            .map(|e| async move { self.register(&e).await })
            .buffered(concurrency.max(1))
            .collect()
            .await;
        results.into_iter().collect()
    }

    pub async fn create_product(&self, admin: &str, sku: &str, price_cents: i32, stock: i32) -> Result<i64> {
        let d = self
            .call(
                Some(admin),
                "mutation($i: CreateProductInput!) { createProduct(input: $i) { id } }",
                json!({"i": {"sku": sku, "name": format!("Bench product {sku}"), "priceCents": price_cents, "currency": "USD", "stock": stock}}),
            )
            .await?;
        d.pointer("/createProduct/id")
            .and_then(Value::as_str)
            .and_then(numeric_id)
            .ok_or_else(|| anyhow!("no product id"))
    }

    pub async fn create_products(&self, admin: &str, n: usize, stock: i32) -> Result<Vec<i64>> {
        let run = crate::server::short_id();
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            ids.push(self.create_product(admin, &format!("BENCH-{run}-{i}"), 1000 + i as i32, stock).await?);
        }
        Ok(ids)
    }

    /// The JSON body of a one-line `createOrder`.
    pub fn create_order_body(product: i64, quantity: i32) -> String {
        json!({
            "query": "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id expiresAt } }",
            "variables": {"i": {"lines": [{"productId": format!("prd_{product}"), "quantity": quantity}]}},
        })
        .to_string()
    }

    /// Places an order; returns its id and `expiresAt` (ms).
    pub async fn create_order(&self, token: &str, product: i64) -> Result<(i64, f64)> {
        let d = self.post_body(Some(token), Self::create_order_body(product, 1)).await?;
        let id = d.pointer("/createOrder/id").and_then(Value::as_str).and_then(numeric_id);
        let exp = d.pointer("/createOrder/expiresAt").and_then(Value::as_str).and_then(rfc3339_ms);
        match (id, exp) {
            (Some(id), Some(exp)) => Ok((id, exp)),
            _ => bail!("createOrder answered without id or expiresAt"),
        }
    }

    /// Cancels an order; returns its `cancelledAt` (ms).
    pub async fn cancel_order(&self, token: &str, id: i64) -> Result<f64> {
        let d = self
            .call(
                Some(token),
                "mutation($id: ID!) { cancelOrder(id: $id) { status cancelledAt } }",
                json!({"id": format!("ord_{id}")}),
            )
            .await?;
        d.pointer("/cancelOrder/cancelledAt")
            .and_then(Value::as_str)
            .and_then(rfc3339_ms)
            .ok_or_else(|| anyhow!("no cancelledAt"))
    }
}

// ---------------------------------------------------------------------------
// closed-loop load

/// What one load level measured.
pub struct LoadResult {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency of each successful request started in the window, ms.
    pub latencies_ms: Vec<f64>,
    /// From the window's start to the last completion.
    pub elapsed: Duration,
    pub usage: Usage,
    /// Highest VmRSS of the server seen during the window (KiB).
    pub peak_rss_kib: Option<u64>,
}

impl LoadResult {
    pub fn per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `concurrency` workers, each sending one request after the other:
/// `warmup` unmeasured, then `duration` measured.
pub async fn run_load<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    watch: &Watch,
    request: F,
) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let request = Arc::new(request);
    let start = Instant::now() + warmup;
    let end = start + duration;
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let last_done = Arc::new(Mutex::new(start));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (request, ok, errors, first_error, last_done) =
            (request.clone(), ok.clone(), errors.clone(), first_error.clone(), last_done.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let res = request(w, seq).await;
                seq += 1;
                let t1 = Instant::now();
                if t0 < start {
                    continue;
                }
                match res {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        lat.push((t1 - t0).as_secs_f64() * 1000.0);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert_with(|| e.to_string());
                        // do not spin on a failing server
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                let mut l = last_done.lock().unwrap();
                if t1 > *l {
                    *l = t1;
                }
            }
            lat
        }));
    }
    // CPU and memory over the measured window
    let pid = watch.server;
    let sampler = {
        let watch = watch.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let a = watch.snapshot();
            let mut peak = pid.and_then(procfs::rss_kib);
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(100)).await;
                peak = peak.max(pid.and_then(procfs::rss_kib));
            }
            let b = watch.snapshot();
            (a.usage_until(&b), peak)
        })
    };
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap_or_default());
    }
    let (usage, peak_rss_kib) = sampler.await.unwrap_or_default();
    let elapsed = last_done.lock().unwrap().saturating_duration_since(start).max(duration / 2);
    let first_error = first_error.lock().unwrap().clone();
    LoadResult {
        ok: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        first_error,
        latencies_ms: latencies,
        elapsed,
        usage,
        peak_rss_kib,
    }
}

// ---------------------------------------------------------------------------
// websocket subscribers

/// One `orderCancelled` event received by one subscriber.
#[derive(Clone, Copy, Debug)]
pub struct Delivery {
    pub order: i64,
    pub recv_ms: f64,
    pub cancelled_ms: f64,
    pub expires_ms: f64,
}

#[derive(Debug)]
pub enum SubEvent {
    Delivery(Delivery),
    /// The subscription ended with an error or the socket closed.
    Ended(usize, String),
}

pub const ORDER_CANCELLED: &str = "subscription { orderCancelled { reason cancelledAt order { id expiresAt } } }";

/// A websocket with a small read buffer: tungstenite's default (128 KiB)
/// is zeroed on every read, which was the harness's largest cost (16 % of
/// its CPU in `memset`) with 1,000 subscribers.
async fn connect(
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    // small: tungstenite zeroes the read buffer before every read attempt
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(512);
    tokio_tungstenite::connect_async_with_config(req, Some(config), true).await
}

/// A `next` message of [`ORDER_CANCELLED`], read without allocating.
#[derive(serde::Deserialize)]
struct NextCancelled<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    payload: NextPayload<'a>,
}

#[derive(serde::Deserialize)]
struct NextPayload<'a> {
    #[serde(borrow)]
    data: CancelledData<'a>,
}

#[derive(serde::Deserialize)]
struct CancelledData<'a> {
    #[serde(rename = "orderCancelled", borrow)]
    order_cancelled: CancelledEvent<'a>,
}

#[derive(serde::Deserialize)]
struct CancelledEvent<'a> {
    #[serde(rename = "cancelledAt")]
    cancelled_at: Option<&'a str>,
    #[serde(borrow)]
    order: CancelledOrder<'a>,
}

#[derive(serde::Deserialize)]
struct CancelledOrder<'a> {
    id: &'a str,
    #[serde(rename = "expiresAt")]
    expires_at: Option<&'a str>,
}

/// Connects, authenticates (`connection_init`), subscribes, and spawns a
/// task that forwards every event to `tx` until `stop` turns true.
pub async fn subscribe(
    ws_url: &str,
    token: &str,
    sub: usize,
    tx: mpsc::UnboundedSender<SubEvent>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut req = ws_url.into_client_request()?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("graphql-transport-ws"));
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(30), connect(req))
        .await
        .map_err(|_| anyhow!("websocket connect timed out"))??;
    let init = json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}});
    ws.send(Message::text(init.to_string())).await?;
    let acked = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m? {
                let v: Value = serde_json::from_str(t.as_str())?;
                match v.get("type").and_then(Value::as_str) {
                    Some("connection_ack") => return Ok(()),
                    Some("ping") => {}
                    other => bail!("expected connection_ack, got {other:?}"),
                }
            }
        }
        bail!("closed before connection_ack")
    })
    .await;
    acked.map_err(|_| anyhow!("no connection_ack within 30 s"))??;
    let msg = json!({"id": "1", "type": "subscribe", "payload": {"query": ORDER_CANCELLED}});
    ws.send(Message::text(msg.to_string())).await?;
    Ok(tokio::spawn(async move {
        // made once, and the socket not split: per delivery, a fresh
        // `changed()` waiter and the split halves' lock cost the harness
        // CPU that the server it measures shares
        let stopped = stop.changed();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => {
                    let _ = ws.send(Message::Close(None)).await;
                    return;
                }
                m = ws.next() => {
                    let recv_ms = now_ms();
                    let text = match m {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(f))) => {
                            let _ = tx.send(SubEvent::Ended(sub, format!("closed: {f:?}")));
                            return;
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => {
                            let _ = tx.send(SubEvent::Ended(sub, e.to_string()));
                            return;
                        }
                        None => {
                            let _ = tx.send(SubEvent::Ended(sub, "socket closed".into()));
                            return;
                        }
                    };
                    // the common case, an event, without building a JSON tree
                    // (the harness shares the two cores with the server)
                    if let Ok(m) = serde_json::from_str::<NextCancelled>(text.as_str()) {
                        let e = m.payload.data.order_cancelled;
                        let d = Delivery {
                            order: numeric_id(e.order.id).unwrap_or(0),
                            recv_ms,
                            cancelled_ms: e.cancelled_at.and_then(rfc3339_ms).unwrap_or(f64::NAN),
                            expires_ms: e.order.expires_at.and_then(rfc3339_ms).unwrap_or(f64::NAN),
                        };
                        if d.order == 0 || m.kind != "next" {
                            let _ = tx.send(SubEvent::Ended(sub, format!("unexpected message: {text}")));
                            return;
                        }
                        let _ = tx.send(SubEvent::Delivery(d));
                        continue;
                    }
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    match v.get("type").and_then(Value::as_str) {
                        Some("next") => {
                            let e = v.pointer("/payload/data/orderCancelled");
                            let field = |p: &str| e.and_then(|e| e.pointer(p)).and_then(Value::as_str);
                            let d = Delivery {
                                order: field("/order/id").and_then(numeric_id).unwrap_or(0),
                                recv_ms,
                                cancelled_ms: field("/cancelledAt").and_then(rfc3339_ms).unwrap_or(f64::NAN),
                                expires_ms: field("/order/expiresAt").and_then(rfc3339_ms).unwrap_or(f64::NAN),
                            };
                            if d.order == 0 {
                                let _ = tx.send(SubEvent::Ended(sub, format!("unexpected payload: {text}")));
                                return;
                            }
                            let _ = tx.send(SubEvent::Delivery(d));
                        }
                        Some("ping") => {
                            let _ = ws.send(Message::text(r#"{"type":"pong"}"#)).await;
                        }
                        Some("error") | Some("complete") => {
                            let _ = tx.send(SubEvent::Ended(sub, text.to_string()));
                            return;
                        }
                        _ => {}
                    }
                }
            }
        }
    }))
}

/// How often [`Subscribers::collect`] drains the deliveries.
const COLLECT_POLL: Duration = Duration::from_millis(2);

/// Many subscribers, connected `concurrency` at a time; `token(i)` names
/// the credential of subscriber `i`.
pub struct Subscribers {
    pub rx: mpsc::UnboundedReceiver<SubEvent>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub connect_time: Duration,
}

impl Subscribers {
    pub async fn connect(
        ws_url: &str,
        n: usize,
        concurrency: usize,
        token: impl Fn(usize) -> String,
    ) -> Result<Subscribers> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let started = Instant::now();
        let jobs: Vec<(usize, String)> = (0..n).map(|i| (i, token(i))).collect();
        let results: Vec<Result<tokio::task::JoinHandle<()>>> = futures_util::stream::iter(jobs)
            .map(|(i, t)| {
                let (tx, stop_rx) = (tx.clone(), stop_rx.clone());
                async move {
                    let mut last = None;
                    for attempt in 0..3 {
                        match subscribe(ws_url, &t, i, tx.clone(), stop_rx.clone()).await {
                            Ok(h) => return Ok(h),
                            Err(e) => last = Some(e),
                        }
                        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
                    }
                    Err(last.expect("an error"))
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let connect_time = started.elapsed();
        let mut tasks = Vec::with_capacity(n);
        for r in results {
            match r {
                Ok(h) => tasks.push(h),
                Err(e) => {
                    let _ = stop.send(true);
                    return Err(e.context(format!("connecting subscriber {} of {n}", tasks.len() + 1)));
                }
            }
        }
        Ok(Subscribers { rx, stop, tasks, connect_time })
    }

    /// Collects deliveries until `done(delivery)` says so, every
    /// subscriber ended (errors are returned alongside), or `timeout`.
    /// With `quiet`, also stops once nothing arrived for that long.
    pub async fn collect(
        &mut self,
        timeout: Duration,
        quiet: Option<Duration>,
        mut done: impl FnMut(&Delivery) -> bool,
    ) -> (Vec<Delivery>, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut ended = Vec::new();
        let mut last_arrival = Instant::now();
        // Drained every couple of milliseconds instead of awaited: a waiting
        // receiver is woken (a thread unpark) by every delivery, which cost
        // the harness as much as reading the sockets with 1,000 subscribers.
        // Lag is unaffected: each delivery was timed when its socket read it.
        loop {
            let mut got = false;
            loop {
                match self.rx.try_recv() {
                    Ok(SubEvent::Delivery(d)) => {
                        got = true;
                        out.push(d);
                        if done(&d) {
                            return (out, ended);
                        }
                    }
                    Ok(SubEvent::Ended(sub, why)) => {
                        got = true;
                        ended.push(format!("subscriber {sub}: {why}"));
                        if ended.len() >= self.tasks.len() {
                            return (out, ended);
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return (out, ended),
                }
            }
            let now = Instant::now();
            if got {
                last_arrival = now;
            }
            if now >= deadline || quiet.is_some_and(|q| now.duration_since(last_arrival) >= q) {
                break;
            }
            tokio::time::sleep(COLLECT_POLL).await;
        }
        (out, ended)
    }

    pub async fn close(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

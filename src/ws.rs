//! GraphQL over websocket on `GET /graphql`: the `graphql-transport-ws`
//! protocol (graphql-ws) and the legacy `graphql-ws` one
//! (subscriptions-transport-ws), chosen by `Sec-WebSocket-Protocol`.
//!
//! Each connection is one task: it authenticates once from
//! `connection_init`, runs each operation as its own task (feeding a small
//! per-connection queue, so a stalled socket holds no database connection) or,
//! for live cancellation subscriptions, joins a shared execution whose frames
//! are rendered once for every subscriber ([`crate::shared_subscriptions`]),
//! and writes to its own socket only, so a slow client delays nobody else.
//! Close codes: 4400 malformed message, 4401 subscribe before init, 4403
//! invalid credentials, or the token's `exp` reached (a session lives no
//! longer than its token; an operation that arrives after `exp` is not run),
//! 4408 no `connection_init` in time, or an anonymous connection that ran
//! no operation for `WS_ANONYMOUS_IDLE_TIMEOUT` (anonymous callers have
//! nothing to subscribe to, so an idle one only holds a slot; authenticated
//! idle connections are kept), 4409 duplicate subscription id, 4429 second
//! `connection_init`, 1013 connection limit (per process, or the client
//! address's share of it), 1001 server shutting down.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
    time::{Duration, SystemTime},
};

use async_graphql::{Request, Response};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{task::AtomicWaker, FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::{sync::mpsc, task::AbortHandle};
use tokio_stream::{
    wrappers::{errors::BroadcastStreamRecvError, BroadcastStream},
    StreamMap,
};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Auth, Identity},
    graphql::{errors, ClientAddr, ShopSchema},
    shared_subscriptions::{self, Frame, Hub, Hubs},
    telemetry,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `graphql-transport-ws`, the graphql-ws library's protocol.
    TransportWs,
    /// `graphql-ws`, the legacy subscriptions-transport-ws protocol.
    Legacy,
}

impl Protocol {
    pub const NAMES: [&'static str; 2] = ["graphql-transport-ws", "graphql-ws"];

    /// The first protocol the client offers that the server speaks: the
    /// client's order of preference, not the server's (Python's `gql` offers
    /// both and speaks the one it lists first).
    /// (axum's `protocols()` keeps the offer in a sorted set, so the header is read here.)
    pub fn preferred(request: &axum::http::HeaderMap) -> Option<&'static str> {
        request
            .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|name| Self::NAMES.into_iter().find(|n| *n == name.trim()))
    }

    pub fn from_name(name: &str) -> Self {
        if name == "graphql-ws" {
            Protocol::Legacy
        } else {
            Protocol::TransportWs
        }
    }
}

pub struct WsSettings {
    pub max_subscriptions: usize,
    pub init_timeout: Duration,
    pub keepalive: Duration,
    /// How long an anonymous connection may run no operation.
    pub anonymous_idle_timeout: Duration,
    /// The process's shared subscription executions.
    pub hubs: Hubs,
}

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    payload: Option<Value>,
}

/// How long one write may wait for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closed connection waits for the client's answering Close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Responses of the connection's operations, tagged with the operation id;
/// `None` when the operation has ended.
type Outgoing = (String, Option<Response>);
/// Responses waiting for the socket per connection: each operation runs as
/// its own task and waits here, holding nothing else, when the client reads
/// slowly (so a stalled socket never holds database connections).
const OUTGOING_BUFFER: usize = 32;
/// Frames of shared executions written with one flush at most.
const WRITE_BATCH: usize = 64;

/// What woke a connection's task.
enum Event {
    Shutdown,
    InitTimeout,
    /// The connection's customer token reached its `exp`.
    TokenExpired,
    /// An anonymous connection ran no operation for the idle timeout.
    AnonymousIdle,
    /// A response of one of the connection's own operations.
    Outgoing(Outgoing),
    /// A frame of a shared execution (more may be ready).
    Shared((String, Result<Frame, BroadcastStreamRecvError>)),
    Keepalive,
    /// A message from the client, an error, or the end of the socket.
    Client(Option<Result<Message, axum::Error>>),
}

/// The waker of the connection's sources other than shared frames: records
/// that one of them is ready before waking the task, so that a wake-up by a
/// delivery leaves them unpolled.
struct QuietWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Default for QuietWake {
    /// Woken: the first turn polls (and so registers) every source.
    fn default() -> Self {
        QuietWake { woken: AtomicBool::new(true), task: AtomicWaker::new() }
    }
}

impl Wake for QuietWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// An operation running on this connection: its own task, or its place in a
/// shared execution. Dropping it stops it (and counts a subscription less).
struct Running {
    task: Option<AbortHandle>,
    _hub: Option<Arc<Hub>>,
    subscription: bool,
}

impl Running {
    fn new(task: Option<AbortHandle>, hub: Option<Arc<Hub>>, subscription: bool) -> Self {
        if subscription {
            telemetry::ws_subscriptions(1.0);
        }
        Running { task, _hub: hub, subscription }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        if self.subscription {
            telemetry::ws_subscriptions(-1.0);
        }
    }
}

struct Connection {
    sink: futures_util::stream::SplitSink<WebSocket, Message>,
    protocol: Protocol,
}

impl Connection {
    /// False when the socket is gone, or when the client has not taken a
    /// message for [`WRITE_TIMEOUT`]: a client that stops reading is dropped
    /// instead of holding its task and its connection slot forever.
    async fn send(&mut self, v: Value) -> bool {
        self.send_text(v.to_string()).await
    }

    async fn send_text(&mut self, text: String) -> bool {
        let write = self.sink.send(Message::Text(text.into()));
        matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(())))
    }

    /// Sends several messages with one flush (so, mostly, one write), all
    /// within one [`WRITE_TIMEOUT`].
    async fn send_all(&mut self, texts: Vec<String>) -> bool {
        let write = async {
            for text in texts {
                self.sink.feed(Message::Text(text.into())).await?;
            }
            self.sink.flush().await
        };
        matches!(tokio::time::timeout(WRITE_TIMEOUT, write).await, Ok(Ok(())))
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            let _ = self.sink.send(Message::Close(Some(frame))).await;
            let _ = self.sink.close().await;
        })
        .await;
    }

    /// Sends a rendered frame of operation `id`.
    async fn frame(&mut self, id: &str, frame: &Frame) -> bool {
        self.send_text(self.envelope(id, frame)).await
    }

    /// The message for a frame: the envelope is written around the payload
    /// text, which is not parsed again.
    fn envelope(&self, id: &str, frame: &Frame) -> String {
        let id_json = serde_json::to_string(id).unwrap_or_default();
        let (kind, payload) = match (frame, self.protocol) {
            (Frame::Next(p), Protocol::TransportWs) => ("next", &**p),
            (Frame::Next(p), Protocol::Legacy) => ("data", &**p),
            (Frame::Error(e), Protocol::TransportWs) => ("error", e.0.as_str()),
            (Frame::Error(e), Protocol::Legacy) => ("error", e.1.as_str()),
            (Frame::Complete, _) => return format!("{{\"id\":{id_json},\"type\":\"complete\"}}"),
        };
        let mut text = String::with_capacity(payload.len() + id_json.len() + 32);
        text.push_str("{\"id\":");
        text.push_str(&id_json);
        text.push_str(",\"type\":\"");
        text.push_str(kind);
        text.push_str("\",\"payload\":");
        text.push_str(payload);
        text.push('}');
        text
    }

    async fn error(&mut self, id: &str, errors: Value) -> bool {
        let payload = match self.protocol {
            Protocol::TransportWs => errors,
            Protocol::Legacy => errors.get(0).cloned().unwrap_or(Value::Null),
        };
        self.send(json!({"id": id, "type": "error", "payload": payload})).await
    }

    async fn complete(&mut self, id: &str) -> bool {
        self.send(json!({"id": id, "type": "complete"})).await
    }
}

/// The credential in a `connection_init` payload: `Authorization` or
/// `authorization`, at the top level or under `headers`.
fn credential(payload: &Option<Value>) -> Result<Option<String>, ()> {
    let Some(p) = payload else { return Ok(None) };
    if p.is_null() {
        return Ok(None);
    }
    let obj = p.as_object().ok_or(())?;
    let find = |o: &serde_json::Map<String, Value>| o.get("Authorization").or_else(|| o.get("authorization")).cloned();
    let value = find(obj).or_else(|| obj.get("headers").and_then(|h| h.as_object()).and_then(find));
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(()),
    }
}

/// Serves one websocket until it closes, fails, or the server shuts down.
pub async fn serve(
    socket: WebSocket,
    protocol: Protocol,
    schema: ShopSchema,
    auth: Arc<Auth>,
    client: ClientAddr,
    settings: Arc<WsSettings>,
    shutdown: CancellationToken,
) {
    telemetry::ws_connections(1.0);
    let (sink, mut source) = socket.split();
    let mut conn = Connection { sink, protocol };
    // operation id → what runs it; own tasks send into `outgoing`, shared
    // executions' frames arrive through `shared`
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut shared: StreamMap<String, BroadcastStream<Frame>> = StreamMap::new();
    let (out_tx, mut outgoing) = mpsc::channel::<Outgoing>(OUTGOING_BUFFER);
    let mut identity: Option<Identity> = None;
    let init_deadline = tokio::time::sleep(settings.init_timeout);
    tokio::pin!(init_deadline);
    // armed at connection_init when the token expires
    let mut expires_at: Option<SystemTime> = None;
    let token_deadline = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(token_deadline);
    // armed whenever an anonymous connection has nothing running
    let mut anonymous_idle = false;
    let idle_deadline = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(idle_deadline);
    // made once: a fresh one per loop turn registered a waiter per message
    let shutting_down = shutdown.cancelled();
    tokio::pin!(shutting_down);
    let mut keepalive = tokio::time::interval(settings.keepalive);
    keepalive.reset();

    // the sources other than shared frames wake the task through this
    let quiet = Arc::new(QuietWake::default());
    let quiet_waker = Waker::from(quiet.clone());

    loop {
        let idle_now = identity == Some(Identity::Anonymous) && running.is_empty();
        if idle_now && !anonymous_idle {
            idle_deadline.as_mut().reset(tokio::time::Instant::now() + settings.anonymous_idle_timeout);
            // polled (and so registered) on the next turn
            quiet.woken.store(true, Ordering::Release);
        }
        anonymous_idle = idle_now;
        let event = std::future::poll_fn(|cx| {
            // Everything but shared frames is polled only when one of those
            // sources woke the task: nearly every wake-up is a delivery, and
            // polling the socket's read side, the operations' queue, the
            // timers and the shutdown signal on each cost more than writing
            // the frame. They come first when they did wake it, so a
            // connection that always has frames waiting still reads its client.
            if quiet.woken.swap(false, Ordering::AcqRel) {
                quiet.task.register(cx.waker());
                let mut qcx = Context::from_waker(&quiet_waker);
                let ready = if shutting_down.as_mut().poll(&mut qcx).is_ready() {
                    Some(Event::Shutdown)
                } else if identity.is_none() && init_deadline.as_mut().poll(&mut qcx).is_ready() {
                    Some(Event::InitTimeout)
                } else if expires_at.is_some() && token_deadline.as_mut().poll(&mut qcx).is_ready() {
                    Some(Event::TokenExpired)
                } else if anonymous_idle && idle_deadline.as_mut().poll(&mut qcx).is_ready() {
                    Some(Event::AnonymousIdle)
                } else if let Poll::Ready(Some(out)) = outgoing.poll_recv(&mut qcx) {
                    Some(Event::Outgoing(out))
                } else if keepalive.poll_tick(&mut qcx).is_ready() {
                    Some(Event::Keepalive)
                } else if let Poll::Ready(msg) = source.poll_next_unpin(&mut qcx) {
                    Some(Event::Client(msg))
                } else {
                    None
                };
                if let Some(event) = ready {
                    // the ones after it were not polled: next time round they are
                    quiet.woken.store(true, Ordering::Release);
                    return Poll::Ready(event);
                }
            }
            if !shared.is_empty() {
                if let Poll::Ready(Some(first)) = shared.poll_next_unpin(cx) {
                    return Poll::Ready(Event::Shared(first));
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Shutdown => {
                conn.close(1001, "server shutting down").await;
                break;
            }
            Event::InitTimeout => {
                conn.close(4408, "Connection initialisation timeout").await;
                break;
            }
            Event::TokenExpired => {
                telemetry::ws_closed("token_expired");
                conn.close(4403, TOKEN_EXPIRED).await;
                break;
            }
            Event::AnonymousIdle => {
                telemetry::ws_closed("anonymous_idle");
                conn.close(4408, "Idle timeout: an anonymous connection ran no operation").await;
                break;
            }
            Event::Shared(first) => {
                // whatever else is ready goes out in the same write: a client
                // that fell behind catches up in few syscalls
                let mut ready = Some(first);
                let mut texts = Vec::new();
                while let Some((id, item)) = ready.take() {
                    let frame = match item {
                        Ok(frame) => frame,
                        Err(BroadcastStreamRecvError::Lagged(n)) => {
                            Frame::Error(Arc::new((fell_behind(n, false), fell_behind(n, true))))
                        }
                    };
                    if !matches!(frame, Frame::Next(_)) {
                        running.remove(&id);
                        shared.remove(&id);
                    }
                    texts.push(conn.envelope(&id, &frame));
                    if texts.len() < WRITE_BATCH && !shared.is_empty() {
                        ready = shared.next().now_or_never().flatten();
                    }
                }
                if !conn.send_all(texts).await {
                    break;
                }
            }
            Event::Outgoing((id, item)) => {
                if !running.contains_key(&id) {
                    // stopped by the client meanwhile
                    continue;
                }
                let frame = item.as_ref().map_or(Frame::Complete, Frame::render);
                if !matches!(frame, Frame::Next(_)) {
                    // completed, or refused before or while running: the error ends it
                    running.remove(&id);
                }
                if !conn.frame(&id, &frame).await {
                    break;
                }
            }
            Event::Keepalive => {
                let ping = match protocol {
                    Protocol::TransportWs => json!({"type": "ping"}),
                    Protocol::Legacy => json!({"type": "ka"}),
                };
                if !conn.send(ping).await {
                    break;
                }
            }
            Event::Client(msg) => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        conn.close(4400, "binary messages are not supported").await;
                        break;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                };
                let Ok(msg) = serde_json::from_str::<ClientMessage>(text.as_str()) else {
                    conn.close(4400, "Invalid message received").await;
                    break;
                };
                match (protocol, msg.kind.as_str()) {
                    (_, "connection_init") => {
                        if identity.is_some() {
                            conn.close(4429, "Too many initialisation requests").await;
                            break;
                        }
                        let who = credential(&msg.payload)
                            .map_err(|_| ())
                            .and_then(|c| auth.authenticate_session(c.as_deref()).map_err(|_| ()));
                        match who {
                            Ok(session) => {
                                identity = Some(session.identity);
                                if let Some(exp) = session.expires_at {
                                    expires_at = Some(exp);
                                    token_deadline.as_mut().reset(deadline_of(exp));
                                }
                                if !conn.send(json!({"type": "connection_ack"})).await {
                                    break;
                                }
                                if protocol == Protocol::Legacy && !conn.send(json!({"type": "ka"})).await {
                                    break;
                                }
                            }
                            Err(()) => {
                                conn.close(4403, "Forbidden: invalid or expired credentials").await;
                                break;
                            }
                        }
                    }
                    (Protocol::TransportWs, "subscribe") | (Protocol::Legacy, "start") => {
                        let Some(who) = identity else {
                            conn.close(4401, "Unauthorized").await;
                            break;
                        };
                        if expires_at.is_some_and(|exp| SystemTime::now() >= exp) {
                            // arrived before the timer fired: not run either
                            telemetry::ws_closed("token_expired");
                            conn.close(4403, TOKEN_EXPIRED).await;
                            break;
                        }
                        let (Some(id), Some(payload)) = (msg.id, msg.payload) else {
                            conn.close(4400, "Invalid message received").await;
                            break;
                        };
                        if running.contains_key(&id) {
                            conn.close(4409, &format!("Subscriber for {id} already exists")).await;
                            break;
                        }
                        let Ok(request) = serde_json::from_value::<Request>(payload) else {
                            conn.close(4400, "Invalid message received").await;
                            break;
                        };
                        if running.len() >= settings.max_subscriptions {
                            let err = json!([{
                                "message": format!("too many subscriptions on this connection (at most {})", settings.max_subscriptions),
                                "extensions": {"code": errors::RATE_LIMITED},
                            }]);
                            if !conn.error(&id, err).await {
                                break;
                            }
                            continue;
                        }
                        let plan = shared_subscriptions::plan(&request, who);
                        let subscription = plan.subscription;
                        if plan.shareable() {
                            let schema = schema.clone();
                            let member = settings
                                .hubs
                                .join(plan, move || schema.execute_stream(request.data(who).data(client)).boxed());
                            shared.insert(id.clone(), BroadcastStream::new(member.frames));
                            running.insert(id, Running::new(None, Some(member.hub), true));
                            continue;
                        }
                        let mut responses = schema.execute_stream(request.data(who).data(client)).boxed();
                        let (tx, key) = (out_tx.clone(), id.clone());
                        let task = tokio::spawn(async move {
                            while let Some(resp) = responses.next().await {
                                if tx.send((key.clone(), Some(resp))).await.is_err() {
                                    return;
                                }
                            }
                            let _ = tx.send((key, None)).await;
                        });
                        running.insert(id, Running::new(Some(task.abort_handle()), None, subscription));
                    }
                    (Protocol::TransportWs, "complete") | (Protocol::Legacy, "stop") => {
                        if let Some(id) = msg.id {
                            if running.remove(&id).is_some() {
                                shared.remove(&id);
                                if protocol == Protocol::Legacy && !conn.complete(&id).await {
                                    break;
                                }
                            }
                        }
                    }
                    (Protocol::TransportWs, "ping") => {
                        if !conn.send(json!({"type": "pong"})).await {
                            break;
                        }
                    }
                    (Protocol::TransportWs, "pong") => {}
                    (Protocol::Legacy, "connection_terminate") => {
                        conn.close(1000, "Normal Closure").await;
                        break;
                    }
                    _ => {
                        conn.close(4400, &format!("Invalid message type {:?}", msg.kind)).await;
                        break;
                    }
                }
            }
        }
    }
    // dropping them stops them
    drop(running);
    // Read what the client still sends until its answering Close (or the
    // end), as RFC 6455 asks of the side that closed: a socket closed with
    // unread data in it is reset, and the reset throws away the Close frame
    // (and its code) before the client reads it.
    let rest = source.take_while(|m| std::future::ready(m.is_ok())).for_each(|_| async {});
    let _ = tokio::time::timeout(CLOSE_WAIT, rest).await;
    telemetry::ws_connections(-1.0);
}

const TOKEN_EXPIRED: &str = "Forbidden: the token has expired";

/// The runtime instant of a wall-clock time (now, if it has passed; a
/// decade at most, which no `JWT_LIFETIME` needs and no timer overflows).
fn deadline_of(at: SystemTime) -> tokio::time::Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default().min(Duration::from_secs(10 * 365 * 86_400));
    tokio::time::Instant::now() + left
}

/// The error that ends a subscription whose client fell too far behind
/// (the legacy protocol's payload is one error, the other's a list).
fn fell_behind(n: u64, single: bool) -> String {
    let err = json!({
        "message": format!("this subscription fell {n} events behind and was stopped; subscribe again and re-read your orders"),
        "extensions": {"code": errors::INTERNAL},
    });
    if single {
        err.to_string()
    } else {
        json!([err]).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_found_in_either_key_case_and_under_headers() {
        assert_eq!(credential(&Some(json!({"Authorization": "Bearer a"}))), Ok(Some("Bearer a".into())));
        assert_eq!(credential(&Some(json!({"authorization": "Bearer b"}))), Ok(Some("Bearer b".into())));
        assert_eq!(credential(&Some(json!({"headers": {"Authorization": "Bearer c"}}))), Ok(Some("Bearer c".into())));
        assert_eq!(credential(&None), Ok(None));
        assert_eq!(credential(&Some(json!({}))), Ok(None));
        assert!(credential(&Some(json!({"Authorization": 5}))).is_err());
        assert!(credential(&Some(json!("x"))).is_err());
    }
}

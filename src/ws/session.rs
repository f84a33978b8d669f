//! One websocket connection's task: it waits for the next [`Event`], hands
//! it to the method for its kind, and each method says whether the session
//! goes on ([`Flow`]). It writes to its own socket only, so a slow client
//! delays nobody else.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use async_graphql::Request;
use axum::extract::ws::WebSocket;
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::StreamMap;
use tokio_util::sync::CancellationToken;

use super::{
    connection::{Connection, Gone},
    frame::Frame,
    protocol::{credential, ClientOp, Close, Protocol},
    running::{Outgoing, Running, OUTGOING_BUFFER},
    shared::{self, MemberFrames},
    sources::{Event, Sources},
    WsSettings,
};
use crate::{
    auth::{Auth, Identity},
    error::ShopError,
    graphql::{ClientAddr, ShopSchema},
    telemetry,
};

/// Frames of shared executions written with one flush at most.
const WRITE_BATCH: usize = 64;

/// What the session does after an event.
enum Flow {
    Continue,
    /// Close the connection with this code and reason.
    Close(Close),
    /// End without a close of the server's own: the client closed, or the
    /// socket is gone (a close would only wait for it).
    End,
}

impl From<Result<(), Gone>> for Flow {
    fn from(sent: Result<(), Gone>) -> Self {
        match sent {
            Ok(()) => Flow::Continue,
            Err(Gone) => Flow::End,
        }
    }
}

struct Session {
    conn: Connection,
    sources: Sources,
    schema: ShopSchema,
    auth: Arc<Auth>,
    client: ClientAddr,
    settings: Arc<WsSettings>,
    /// Who the client is, from `connection_init`.
    identity: Option<Identity>,
    /// The session's token expires then: no operation runs after it.
    expires_at: Option<SystemTime>,
    /// Operation id → what runs it.
    running: HashMap<String, Running>,
    /// The frames of the operations that joined a shared execution.
    shared: StreamMap<String, MemberFrames>,
    /// Where the connection's own operations send their responses.
    out_tx: mpsc::Sender<Outgoing>,
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
    let (sink, stream) = socket.split();
    let (out_tx, outgoing) = mpsc::channel::<Outgoing>(OUTGOING_BUFFER);
    let sources = Sources::new(stream, outgoing, settings.init_timeout, settings.keepalive, shutdown);
    let conn = Connection { sink, protocol };
    let mut session = Session {
        conn,
        sources,
        schema,
        auth,
        client,
        settings,
        identity: None,
        expires_at: None,
        running: HashMap::new(),
        shared: StreamMap::new(),
        out_tx,
    };
    loop {
        let idle = session.identity == Some(Identity::Anonymous) && session.running.is_empty();
        session.sources.watch_idle(idle, session.settings.anonymous_idle_timeout);
        let event = session.sources.next(&mut session.shared).await;
        match session.handle(event).await {
            Flow::Continue => {}
            Flow::Close(close) => {
                if let Some(reason) = close.counted_as() {
                    telemetry::ws_closed(reason);
                }
                session.conn.close(&close).await;
                break;
            }
            Flow::End => break,
        }
    }
    let Session { running, sources, .. } = session;
    // dropping them stops them
    drop(running);
    sources.drain().await;
    telemetry::ws_connections(-1.0);
}

impl Session {
    async fn handle(&mut self, event: Event) -> Flow {
        match event {
            Event::Shutdown => Flow::Close(Close::ShuttingDown),
            Event::InitTimeout => Flow::Close(Close::InitTimeout),
            Event::TokenExpired => Flow::Close(Close::TokenExpired),
            Event::AnonymousIdle => Flow::Close(Close::AnonymousIdle),
            Event::Shared(first) => self.shared_frames(first).await,
            Event::Outgoing(out) => self.own_response(out).await,
            Event::Keepalive => self.conn.keepalive().await.into(),
            Event::Client(Some(Ok(msg))) => match ClientOp::parse(self.conn.protocol, msg) {
                Ok(op) => self.client_op(op).await,
                Err(close) => Flow::Close(close),
            },
            Event::Client(Some(Err(_)) | None) => Flow::End,
        }
    }

    async fn client_op(&mut self, op: ClientOp) -> Flow {
        match op {
            ClientOp::Init(payload) => self.init(payload).await,
            ClientOp::Subscribe { id, request } => self.subscribe(id, *request).await,
            ClientOp::Stop(id) => self.stop(id).await,
            ClientOp::Ping => self.conn.pong().await.into(),
            ClientOp::Terminate => Flow::Close(Close::Normal),
            ClientOp::Nothing => Flow::Continue,
            ClientOp::Closed => Flow::End,
        }
    }

    /// Frames of shared executions: whatever else is ready goes out in the
    /// same write, so a client that fell behind catches up in few syscalls.
    async fn shared_frames(&mut self, first: (String, Frame)) -> Flow {
        let mut ready = Some(first);
        let mut texts = Vec::new();
        while let Some((id, frame)) = ready.take() {
            if frame.is_last() {
                self.running.remove(&id);
                self.shared.remove(&id);
            }
            texts.push(frame.envelope(&id, self.conn.protocol));
            if texts.len() < WRITE_BATCH && !self.shared.is_empty() {
                ready = self.shared.next().now_or_never().flatten();
            }
        }
        self.conn.send_all(texts).await.into()
    }

    /// A response of an operation running as its own task.
    async fn own_response(&mut self, (id, item): Outgoing) -> Flow {
        if !self.running.contains_key(&id) {
            // stopped by the client meanwhile
            return Flow::Continue;
        }
        let frame = item.as_ref().map_or(Frame::Complete, Frame::render);
        if frame.is_last() {
            // completed, or refused before or while running: the error ends it
            self.running.remove(&id);
        }
        self.conn.frame(&id, &frame).await.into()
    }

    /// `connection_init`: authenticates the session once.
    async fn init(&mut self, payload: Option<Value>) -> Flow {
        if self.identity.is_some() {
            return Flow::Close(Close::TooManyInits);
        }
        let auth = &self.auth;
        let session = credential(&payload).and_then(|c| auth.authenticate_session(c.as_deref()).map_err(|_| ()));
        let Ok(session) = session else { return Flow::Close(Close::Forbidden) };
        self.identity = Some(session.identity);
        self.expires_at = session.expires_at;
        self.sources.initialised(session.expires_at);
        self.conn.ack().await.into()
    }

    /// Runs an operation: joins the shared execution of an identical one,
    /// or starts its own task.
    async fn subscribe(&mut self, id: String, request: Request) -> Flow {
        let Some(who) = self.identity else { return Flow::Close(Close::Unauthorized) };
        if self.expires_at.is_some_and(|exp| SystemTime::now() >= exp) {
            // arrived before the timer fired: not run either
            return Flow::Close(Close::TokenExpired);
        }
        if self.running.contains_key(&id) {
            return Flow::Close(Close::DuplicateId(id));
        }
        let max = self.settings.max_subscriptions;
        if self.running.len() >= max {
            return self.conn.frame(&id, &Frame::refusal(ShopError::TooManySubscriptions(max))).await.into();
        }
        let plan = shared::plan(&request, who);
        let subscription = plan.subscription;
        let request = request.data(who).data(self.client);
        let running = if plan.shareable() {
            let schema = self.schema.clone();
            let member = self.settings.hubs.join(plan, move || schema.execute_stream(request).boxed());
            self.shared.insert(id.clone(), member.frames);
            Running::shared(member.hub)
        } else {
            let responses = self.schema.execute_stream(request).boxed();
            Running::own(id.clone(), responses, self.out_tx.clone(), subscription)
        };
        self.running.insert(id, running);
        Flow::Continue
    }

    /// `complete` (legacy: `stop`); the legacy protocol confirms it.
    async fn stop(&mut self, id: String) -> Flow {
        if self.running.remove(&id).is_none() {
            return Flow::Continue;
        }
        self.shared.remove(&id);
        match self.conn.protocol {
            Protocol::Legacy => self.conn.frame(&id, &Frame::Complete).await.into(),
            Protocol::TransportWs => Flow::Continue,
        }
    }
}

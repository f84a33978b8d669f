//! The write side of one websocket: every message the server sends, each
//! bounded by [`WRITE_TIMEOUT`], in the connection's protocol.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{stream::SplitSink, SinkExt};
use serde_json::{json, Value};

use super::{
    frame::Frame,
    protocol::{Close, Protocol},
};

/// How long one write may wait for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Connection {
    pub sink: SplitSink<WebSocket, Message>,
    pub protocol: Protocol,
}

/// A write failed: the socket is gone, or the client has not taken a
/// message for [`WRITE_TIMEOUT`]. A client that stops reading is dropped
/// instead of holding its task and its connection slot forever.
#[derive(Debug)]
pub struct Gone;

impl Connection {
    async fn send(&mut self, v: Value) -> Result<(), Gone> {
        self.send_text(v.to_string()).await
    }

    async fn send_text(&mut self, text: String) -> Result<(), Gone> {
        let write = self.sink.send(Message::Text(text.into()));
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Gone),
        }
    }

    /// Sends several messages with one flush (so, mostly, one write), all
    /// within one [`WRITE_TIMEOUT`].
    pub async fn send_all(&mut self, texts: Vec<String>) -> Result<(), Gone> {
        let write = async {
            for text in texts {
                self.sink.feed(Message::Text(text.into())).await?;
            }
            self.sink.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Gone),
        }
    }

    /// Sends frame `frame` of operation `id`.
    pub async fn frame(&mut self, id: &str, frame: &Frame) -> Result<(), Gone> {
        self.send_text(frame.envelope(id, self.protocol)).await
    }

    /// Accepts `connection_init` (the legacy protocol's first keep-alive
    /// follows at once, as subscriptions-transport-ws clients expect).
    pub async fn ack(&mut self) -> Result<(), Gone> {
        self.send(json!({"type": "connection_ack"})).await?;
        match self.protocol {
            Protocol::TransportWs => Ok(()),
            Protocol::Legacy => self.send(json!({"type": "ka"})).await,
        }
    }

    pub async fn keepalive(&mut self) -> Result<(), Gone> {
        let ping = match self.protocol {
            Protocol::TransportWs => json!({"type": "ping"}),
            Protocol::Legacy => json!({"type": "ka"}),
        };
        self.send(ping).await
    }

    pub async fn pong(&mut self) -> Result<(), Gone> {
        self.send(json!({"type": "pong"})).await
    }

    pub async fn close(&mut self, close: &Close) {
        let frame = CloseFrame { code: close.code(), reason: close.reason().as_ref().into() };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            let _ = self.sink.send(Message::Close(Some(frame))).await;
            let _ = self.sink.close().await;
        })
        .await;
    }
}

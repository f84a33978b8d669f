//! One Redis subscription that survives its connection: connect, subscribe,
//! read, and on any loss reconnect with capped backoff and subscribe again,
//! exactly once per connection. Used by the expiry listener and the event
//! fan-out, each with its own connection.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a subscription does with its connection's life.
#[async_trait]
pub trait Handler: Send {
    /// Subscribed on a fresh connection; `reconnected` is false the first time.
    async fn connected(&mut self, reconnected: bool);
    async fn message(&mut self, channel: &str, payload: &[u8]);
    fn disconnected(&mut self);
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A silent connection is probed this often, so a dead peer is noticed
/// even when no RST arrives.
const PING_EVERY: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub async fn run(
    client: redis::Client,
    channel: String,
    name: &'static str,
    handler: &mut impl Handler,
    shutdown: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    loop {
        let attempt = async {
            let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(CONNECT_TIMEOUT, pubsub.subscribe(&channel))
                .await
                .map_err(|_| "subscribe timed out".to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match pubsub {
            Ok(pubsub) => {
                info!(%channel, reconnected = connected_before, "{name} subscribed");
                handler.connected(connected_before).await;
                connected_before = true;
                backoff = MIN_BACKOFF;
                let (mut sink, mut stream) = pubsub.split();
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.reset();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(msg) => handler.message(msg.get_channel_name(), msg.get_payload_bytes()).await,
                            None => break,
                        },
                        _ = ping.tick() => {
                            let alive = tokio::time::timeout(CONNECT_TIMEOUT, sink.ping::<redis::Value>()).await;
                            if !matches!(alive, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                handler.disconnected();
                warn!(%channel, "{name} lost its Redis connection; reconnecting");
            }
            Err(e) => warn!(%channel, error = %e, "{name} cannot reach Redis; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

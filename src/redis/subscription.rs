//! One Redis subscription that survives its connection: connect, subscribe,
//! read, and on any loss reconnect with capped backoff and subscribe again,
//! exactly once per connection. Used by the expiry listener, the event
//! fan-out and the Sentinel follower, each with its own connection.
//!
//! Where to connect is a [`Target`], asked again on every attempt: a fixed
//! server (a plain `redis::Client` converts into one), the primary a
//! Sentinel follower names (a move ends the current connection at once, even
//! one that still looks healthy: a demoted primary keeps its subscribers),
//! or any one of several servers, the next after each loss.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::watch;
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

/// Where a subscription connects, asked again on every attempt.
#[derive(Clone)]
pub struct Target(Kind);

#[derive(Clone)]
enum Kind {
    /// Boxed: a client is large beside the other variants.
    Fixed(Box<redis::Client>),
    /// The current primary, as a follower publishes it.
    Followed(watch::Receiver<redis::Client>),
    /// Any of these; each attempt takes the next one.
    Any { clients: Arc<[redis::Client]>, next: usize },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.0 {
            Kind::Fixed(_) => "fixed",
            Kind::Followed(_) => "followed",
            Kind::Any { .. } => "any",
        };
        write!(f, "Target({kind})")
    }
}

impl From<redis::Client> for Target {
    fn from(client: redis::Client) -> Target {
        Target(Kind::Fixed(Box::new(client)))
    }
}

impl Target {
    /// The server `primary` names now; a change moves the subscription.
    pub fn followed(primary: watch::Receiver<redis::Client>) -> Target {
        Target(Kind::Followed(primary))
    }

    /// Any one of `clients` (at least one), tried in turn.
    pub fn any(clients: Vec<redis::Client>) -> Target {
        assert!(!clients.is_empty(), "a subscription target needs a server");
        Target(Kind::Any { clients: clients.into(), next: 0 })
    }

    /// The server for the next attempt.
    fn next(&mut self) -> redis::Client {
        match &mut self.0 {
            Kind::Fixed(c) => redis::Client::clone(c),
            Kind::Followed(rx) => rx.borrow_and_update().clone(),
            Kind::Any { clients, next } => {
                let c = clients[*next % clients.len()].clone();
                *next = next.wrapping_add(1);
                c
            }
        }
    }

    /// Resolves when the server to use has changed since [`Target::next`];
    /// never for a fixed target.
    async fn moved(&mut self) {
        if let Kind::Followed(rx) = &mut self.0 {
            if rx.changed().await.is_ok() {
                return;
            }
        }
        std::future::pending().await
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A silent connection is probed this often, so a dead peer is noticed
/// even when no RST arrives.
const PING_EVERY: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How one connection ended.
enum End {
    Lost,
    /// The target moved: reconnect at once, no backoff.
    Moved,
}

pub async fn run(
    target: impl Into<Target>,
    channel: String,
    name: &'static str,
    handler: &mut impl Handler,
    shutdown: CancellationToken,
) {
    let mut target = target.into();
    let mut backoff = MIN_BACKOFF;
    let mut connected_before = false;
    loop {
        let client = target.next();
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
            _ = target.moved() => continue,
            r = attempt => r,
        };
        let end = match pubsub {
            Ok(pubsub) => {
                info!(%channel, reconnected = connected_before, "{name} subscribed");
                handler.connected(connected_before).await;
                connected_before = true;
                backoff = MIN_BACKOFF;
                let (mut sink, mut stream) = pubsub.split();
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.reset();
                let end = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = target.moved() => break End::Moved,
                        msg = stream.next() => match msg {
                            Some(msg) => handler.message(msg.get_channel_name(), msg.get_payload_bytes()).await,
                            None => break End::Lost,
                        },
                        _ = ping.tick() => {
                            let alive = tokio::time::timeout(CONNECT_TIMEOUT, sink.ping::<redis::Value>()).await;
                            if !matches!(alive, Ok(Ok(_))) {
                                break End::Lost;
                            }
                        }
                    }
                };
                handler.disconnected();
                match end {
                    End::Moved => info!(%channel, "{name}: the primary moved; subscribing there"),
                    End::Lost => warn!(%channel, "{name} lost its Redis connection; reconnecting"),
                }
                end
            }
            Err(e) => {
                warn!(%channel, error = %e, "{name} cannot reach Redis; retrying in {backoff:?}");
                End::Lost
            }
        };
        if matches!(end, End::Moved) {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            // a new primary is worth trying at once
            _ = target.moved() => {}
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

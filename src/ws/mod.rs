//! GraphQL over websocket on `GET /graphql`: the `graphql-transport-ws`
//! protocol (graphql-ws) and the legacy `graphql-ws` one
//! (subscriptions-transport-ws), chosen by `Sec-WebSocket-Protocol`.
//!
//! Each connection is one task ([`session`]): it authenticates once from
//! `connection_init`, runs each operation as its own task (feeding a small
//! per-connection queue, so a stalled socket holds no database connection) or,
//! for live cancellation subscriptions, joins a shared execution whose frames
//! are rendered once for every subscriber ([`shared`]), and writes to its own
//! socket only, so a slow client delays nobody else.
//!
//! * [`protocol`]: the two protocols' messages ([`protocol::ClientOp::parse`])
//!   and the close codes ([`protocol::Close`]).
//! * [`session`]: the connection's loop, one method per event.
//! * [`sources`]: what wakes the connection, polled cheaply while frames flow.
//! * [`connection`]: the messages the server writes, each with a timeout.
//! * [`running`]: the connection's operations; [`shared`]: shared executions.
//! * [`frame`]: a response rendered once as JSON text.
//!
//! Close codes: 4400 malformed message, 4401 subscribe before init, 4403
//! invalid credentials, or the token's `exp` reached (a session lives no
//! longer than its token; an operation that arrives after `exp` is not run),
//! 4408 no `connection_init` in time, or an anonymous connection that ran
//! no operation for `WS_ANONYMOUS_IDLE_TIMEOUT` (anonymous callers have
//! nothing to subscribe to, so an idle one only holds a slot; authenticated
//! idle connections are kept), 4409 duplicate subscription id, 4429 second
//! `connection_init`, 1013 connection limit (per process, or the client
//! address's share of it), 1001 server shutting down.

use std::time::Duration;

mod connection;
mod frame;
mod protocol;
mod running;
mod session;
pub mod shared;
mod sources;

pub use protocol::Protocol;
pub use session::serve;

pub struct WsSettings {
    pub max_subscriptions: usize,
    pub init_timeout: Duration,
    pub keepalive: Duration,
    /// How long an anonymous connection may run no operation.
    pub anonymous_idle_timeout: Duration,
    /// The process's shared subscription executions.
    pub hubs: shared::Hubs,
}

//! The operations a connection runs: each its own task, feeding the
//! connection's small queue of responses, or a place in a shared execution.

use std::sync::Arc;

use async_graphql::Response;
use futures_util::{stream::BoxStream, StreamExt};
use tokio::{sync::mpsc, task::AbortHandle};

use super::shared::Hub;
use crate::telemetry;

/// Responses of the connection's operations, tagged with the operation id;
/// `None` when the operation has ended.
pub type Outgoing = (String, Option<Response>);

/// Responses waiting for the socket per connection: each operation runs as
/// its own task and waits here, holding nothing else, when the client reads
/// slowly (so a stalled socket never holds database connections).
pub const OUTGOING_BUFFER: usize = 32;

/// An operation running on this connection. Dropping it stops it (and
/// counts a subscription less).
pub struct Running {
    task: Option<AbortHandle>,
    /// Held to stay a member: the last member leaving stops the execution.
    _hub: Option<Arc<Hub>>,
    subscription: bool,
}

impl Running {
    /// A place in a shared execution (always a subscription).
    pub fn shared(hub: Arc<Hub>) -> Self {
        Self::counted(Running { task: None, _hub: Some(hub), subscription: true })
    }

    /// Runs `responses` as its own task, sending each into `tx` under `id`.
    pub fn own(
        id: String,
        mut responses: BoxStream<'static, Response>,
        tx: mpsc::Sender<Outgoing>,
        subscription: bool,
    ) -> Self {
        let task = tokio::spawn(async move {
            while let Some(resp) = responses.next().await {
                if tx.send((id.clone(), Some(resp))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send((id, None)).await;
        });
        Self::counted(Running { task: Some(task.abort_handle()), _hub: None, subscription })
    }

    fn counted(self) -> Self {
        if self.subscription {
            telemetry::ws_subscriptions(1.0);
        }
        self
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

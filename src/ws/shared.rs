//! One execution per identical subscription.
//!
//! Storefronts all send the same few subscription documents. Executing the
//! selection set and serialising the response once per subscriber per event
//! was most of the server's work in a fan-out (every admin subscriber had
//! the same JSON built for it per event). Here, websocket subscribers whose
//! operation is the same (document text, operation name, variables) and who
//! see the same orders (the same [`Identity`]) join one running execution, a
//! [`Hub`]; it renders each response once into a [`Frame`] of JSON text that
//! every member's connection sends as it is.
//!
//! Only operations whose every root field is `orderCancelled` are shared:
//! their items are live events, so a member that joins a running hub gets
//! exactly what a stream of its own would have given from that moment on.
//! (`orderUpdated` starts with a snapshot, so each subscriber runs its own.)
//! A member that falls more than the hub's buffer behind is ended with
//! [`ShopError::FellBehind`], as a subscriber of its own would be by the
//! event broadcast.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use async_graphql::{
    parser::{
        parse_query,
        types::{DocumentOperations, OperationType, Selection},
    },
    Request, Response,
};
use futures_util::{
    stream::{BoxStream, Map},
    StreamExt,
};
use tokio::sync::broadcast;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};
use tokio_util::sync::CancellationToken;

use super::frame::Frame;
use crate::{auth::Identity, error::ShopError, graphql::MAX_QUERY_BYTES};

/// What a websocket needs to know about an operation before running it.
pub struct Plan {
    /// The operation is a subscription (counted as one while it runs).
    pub subscription: bool,
    /// Set when it may join a shared execution.
    key: Option<Key>,
}

impl Plan {
    pub fn shareable(&self) -> bool {
        self.key.is_some()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    query: String,
    operation: Option<String>,
    /// The variables as JSON text: the same object sent the same way.
    variables: String,
    viewer: Identity,
    /// `orderCancelled(orderId: …)` sees at most one event: a small buffer.
    narrow: bool,
}

/// Looks at the operation a request would run. Documents that do not parse,
/// or are over the size limit, get no key: the engine reports their errors.
pub fn plan(request: &Request, viewer: Identity) -> Plan {
    let unknown = Plan { subscription: false, key: None };
    if request.query.len() > MAX_QUERY_BYTES {
        return unknown;
    }
    let Ok(doc) = parse_query(&request.query) else { return unknown };
    let op = match (&doc.operations, request.operation_name.as_deref()) {
        (DocumentOperations::Single(op), None) => op,
        (DocumentOperations::Multiple(ops), Some(name)) => match ops.get(name) {
            Some(op) => op,
            None => return unknown,
        },
        // one named operation, run without naming it
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => match ops.values().next() {
            Some(op) => op,
            None => return unknown,
        },
        _ => return unknown,
    };
    if op.node.ty != OperationType::Subscription {
        return unknown;
    }
    let roots = &op.node.selection_set.node.items;
    let only_cancellations = !roots.is_empty()
        && roots.iter().all(|s| matches!(&s.node, Selection::Field(f) if f.node.name.node == "orderCancelled"));
    let plain = request.extensions.is_empty() && viewer != Identity::Anonymous;
    if !(only_cancellations && plain) {
        return Plan { subscription: true, key: None };
    }
    // every root field names one order: at most one event each
    let narrow = roots.iter().all(|s| match &s.node {
        Selection::Field(f) => f.node.arguments.iter().any(|(name, value)| {
            let resolved = value.node.clone().into_const_with(|var| {
                Ok::<_, ()>(request.variables.get(&var).cloned().unwrap_or(async_graphql::Value::Null))
            });
            name.node == "orderId" && resolved.is_ok_and(|v| v != async_graphql::Value::Null)
        }),
        _ => false,
    });
    let key = Key {
        query: request.query.clone(),
        operation: request.operation_name.clone(),
        variables: serde_json::to_string(&request.variables).unwrap_or_default(),
        viewer,
        narrow,
    };
    Plan { subscription: true, key: Some(key) }
}

type Registry = Mutex<HashMap<Key, Weak<Hub>>>;

/// The running shared executions of this process.
#[derive(Clone, Default)]
pub struct Hubs(Arc<Registry>);

/// One shared execution. Members hold it; when the last member leaves, the
/// execution stops and leaves the registry.
pub struct Hub {
    key: Key,
    frames: broadcast::Sender<Frame>,
    stop: CancellationToken,
    registry: Weak<Registry>,
}

/// A subscriber's place in a hub: keep `hub` while reading `frames`.
pub struct Member {
    pub hub: Arc<Hub>,
    pub frames: MemberFrames,
}

/// A member's frames as it reads them: falling behind ends it.
pub type MemberFrames = Map<BroadcastStream<Frame>, fn(Result<Frame, BroadcastStreamRecvError>) -> Frame>;

fn member_frames(frames: broadcast::Receiver<Frame>) -> MemberFrames {
    fn or_fell_behind(item: Result<Frame, BroadcastStreamRecvError>) -> Frame {
        item.unwrap_or_else(|BroadcastStreamRecvError::Lagged(n)| Frame::refusal(ShopError::FellBehind(n)))
    }
    BroadcastStream::new(frames).map(or_fell_behind as fn(_) -> _)
}

/// Frames a member may fall behind before it is ended. The admin sees every
/// event, including expiry bursts of thousands per second; a customer's
/// events come a few at a time. The customer's buffer is as large as its
/// event channel; the admin's is half the event broadcast, which it reads
/// from. A narrow operation (every root field names one order with
/// `orderId`) sees at most one event per field.
const ADMIN_BUFFER: usize = crate::events::BROADCAST_CAPACITY / 2;
const CUSTOMER_BUFFER: usize = crate::events::CUSTOMER_CAPACITY;
const NARROW_BUFFER: usize = 4;

impl Hubs {
    /// Joins the running execution for `plan`'s key, or starts one with
    /// `start` (called at most once, under the registry lock, so two
    /// subscribers arriving together share one execution). `plan` must be
    /// shareable.
    pub fn join(&self, plan: Plan, start: impl FnOnce() -> BoxStream<'static, Response>) -> Member {
        let key = plan.key.expect("a shareable plan");
        let mut registry = self.0.lock().expect("hub registry lock");
        if let Some(hub) = registry.get(&key).and_then(Weak::upgrade) {
            return Member { frames: member_frames(hub.frames.subscribe()), hub };
        }
        let capacity = match (key.narrow, key.viewer) {
            (true, _) => NARROW_BUFFER,
            (false, Identity::Admin) => ADMIN_BUFFER,
            (false, _) => CUSTOMER_BUFFER,
        };
        let (tx, rx) = broadcast::channel(capacity);
        let hub = Arc::new(Hub {
            key: key.clone(),
            frames: tx.clone(),
            stop: CancellationToken::new(),
            registry: Arc::downgrade(&self.0),
        });
        registry.insert(key, Arc::downgrade(&hub));
        tokio::spawn(run(start(), tx, hub.stop.clone(), Arc::downgrade(&hub), hub.registry.clone(), hub.key.clone()));
        Member { hub, frames: member_frames(rx) }
    }

    /// Shared executions running now.
    pub fn len(&self) -> usize {
        self.0.lock().expect("hub registry lock").values().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drives one execution: renders each response once and hands it to every
/// member. On its last response it leaves the registry first, so whoever
/// subscribes next starts a fresh execution instead of joining a finished one.
async fn run(
    mut responses: BoxStream<'static, Response>,
    frames: broadcast::Sender<Frame>,
    stop: CancellationToken,
    me: Weak<Hub>,
    registry: Weak<Registry>,
    key: Key,
) {
    crate::telemetry::ws_shared_executions(1.0);
    let _counted = scopeguard(|| crate::telemetry::ws_shared_executions(-1.0));
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = responses.next() => next,
        };
        let frame = next.as_ref().map_or(Frame::Complete, Frame::render);
        let last = !matches!(frame, Frame::Next(_));
        if last {
            retire(&registry, &key, &me);
        }
        // no receivers: every member left between two events; `stop` follows
        let _ = frames.send(frame);
        if last {
            return;
        }
    }
}

/// Runs `f` when dropped: the execution is counted until its task ends,
/// however it ends.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Removes `key` from the registry if it still names this hub.
fn retire(registry: &Weak<Registry>, key: &Key, me: &Weak<Hub>) {
    let Some(registry) = registry.upgrade() else { return };
    let mut map = registry.lock().expect("hub registry lock");
    if map.get(key).is_some_and(|w| w.ptr_eq(me)) {
        map.remove(key);
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(registry) = self.registry.upgrade() {
            let mut map = registry.lock().expect("hub registry lock");
            // a newer hub may hold the key already; only a dead entry goes
            if map.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::CustomerId;

    fn req(q: &str) -> Request {
        Request::new(q)
    }

    #[test]
    fn only_live_cancellation_subscriptions_are_shared() {
        let admin = Identity::Admin;
        assert!(plan(&req("subscription { orderCancelled { reason } }"), admin).shareable());
        assert!(plan(&req("subscription S { a: orderCancelled { reason } b: orderCancelled { cancelledAt } }"), admin)
            .shareable());
        let updated = plan(&req("subscription { orderUpdated(orderId: \"ord_1\") { status } }"), admin);
        assert!(updated.subscription && !updated.shareable());
        let query = plan(&req("{ products { nodes { id } } }"), admin);
        assert!(!query.subscription && !query.shareable());
        assert!(!plan(&req("subscription { orderCancelled { "), admin).shareable());
        assert!(!plan(&req("subscription { orderCancelled { reason } }"), Identity::Anonymous).shareable());
        let two = "subscription A { orderCancelled { reason } } subscription B { orderCancelled { reason } }";
        assert!(!plan(&req(two), admin).shareable());
        assert!(plan(&req(two).operation_name("B"), admin).shareable());
    }

    #[test]
    fn viewers_and_variables_are_part_of_the_key() {
        let q = "subscription($id: ID) { orderCancelled(orderId: $id) { reason } }";
        let a = plan(&req(q), Identity::Customer(CustomerId(1))).key.unwrap();
        let b = plan(&req(q), Identity::Customer(CustomerId(2))).key.unwrap();
        let c = plan(&req(q), Identity::Customer(CustomerId(1))).key.unwrap();
        assert_ne!(a, b);
        assert_eq!(a, c);
        let v = plan(
            &req(q).variables(async_graphql::Variables::from_json(serde_json::json!({"id": "ord_1"}))),
            Identity::Customer(CustomerId(1)),
        )
        .key
        .unwrap();
        assert_ne!(a, v);
        assert!(v.narrow);
    }

    #[tokio::test]
    async fn a_member_that_falls_behind_is_ended_with_an_error_saying_so() {
        let (tx, rx) = broadcast::channel(1);
        let mut frames = member_frames(rx);
        for _ in 0..3 {
            tx.send(Frame::Next("{}".into())).unwrap();
        }
        let Some(Frame::Error(e)) = frames.next().await else { panic!("an error first") };
        let first: serde_json::Value = serde_json::from_str(&e.1).unwrap();
        assert_eq!(first["extensions"]["code"], "INTERNAL", "{first}");
        assert!(first["message"].as_str().unwrap().contains("fell 2 events behind"), "{first}");
    }
}

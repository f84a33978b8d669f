//! `Subscription`: filtered views of the process's event broadcast.
//!
//! A subscriber that falls behind the broadcast buffer is never left to miss
//! events silently: `orderCancelled` ends with [`ShopError::FellBehind`],
//! and `orderUpdated` reads a fresh snapshot from the database.

use async_graphql::{Context, Subscription as GqlSubscription, ID};
use futures_util::{stream, Stream};
use tokio::sync::broadcast::error::RecvError;

use super::{
    identity, services,
    types::{OrderCancelledEvent, OrderNode},
};
use crate::{
    auth::Viewer,
    domain::{Order, OrderId, OrderStatus},
    error::ShopError,
    events::Fanout,
    store::visible,
};

pub struct Subscription;

/// The subscriber as a viewer of orders; anonymous callers may not subscribe.
fn subscriber(ctx: &Context<'_>) -> Result<Viewer, ShopError> {
    identity(ctx).viewer().map_err(|_| ShopError::Unauthenticated("sign in to subscribe to your orders"))
}

#[GqlSubscription]
impl Subscription {
    /// Cancellations of your orders (admin: all); `orderId` narrows to one.
    async fn order_cancelled(
        &self,
        ctx: &Context<'_>,
        order_id: Option<ID>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<OrderCancelledEvent>>> {
        let viewer = subscriber(ctx)?;
        let s = services(ctx).clone();
        // subscribe first, then check the order: a cancellation committed
        // between the two still reaches this subscription
        let rx = s.events.subscribe(viewer.owner());
        let only = match order_id {
            Some(raw) => {
                let id = OrderId::parse(&raw)?;
                if visible(s.store.order(id).await?, viewer).is_none() {
                    return Err(ShopError::NotFound(format!("order {id}")).into());
                }
                Some(id)
            }
            None => None,
        };
        Ok(stream::unfold(Some(rx), move |rx| async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(Fanout::Event(e)) => {
                        let o = &e.order;
                        let wanted =
                            o.status == OrderStatus::Cancelled && viewer.may_see(o) && only.is_none_or(|id| id == o.id);
                        if wanted {
                            return Some((Ok(OrderCancelledEvent(e)), Some(rx)));
                        }
                    }
                    Ok(Fanout::Resync) => {}
                    Err(RecvError::Lagged(n)) => return Some((Err(ShopError::FellBehind(n).into()), None)),
                    Err(RecvError::Closed) => return None,
                }
            }
        }))
    }

    /// The order as it is now, then each change of its status; completes
    /// after a final status (`PAID`, `CANCELLED`).
    async fn order_updated(
        &self,
        ctx: &Context<'_>,
        order_id: ID,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<OrderNode>>> {
        let viewer = subscriber(ctx)?;
        let id = OrderId::parse(&order_id)?;
        let s = services(ctx).clone();
        // subscribe first, then read: nothing can fall between the two
        let rx = s.events.subscribe(viewer.owner());
        let snapshot =
            visible(s.store.order(id).await?, viewer).ok_or_else(|| ShopError::NotFound(format!("order {id}")))?;
        struct State {
            rx: tokio::sync::broadcast::Receiver<Fanout>,
            first: Option<Order>,
            last: OrderStatus,
            done: bool,
        }
        let state = State { rx, last: snapshot.status, first: Some(snapshot), done: false };
        Ok(stream::unfold(state, move |mut st| {
            let s = s.clone();
            async move {
                if st.done {
                    return None;
                }
                if let Some(order) = st.first.take() {
                    st.done = order.status.is_final();
                    return Some((Ok(OrderNode(order)), st));
                }
                loop {
                    // (the order, whether to send it even if its status is unchanged)
                    let fresh = match st.rx.recv().await {
                        Ok(Fanout::Event(e)) if e.order.id == id => Some((e.order.clone(), false)),
                        Ok(Fanout::Event(_)) => None,
                        Ok(Fanout::Resync) | Err(RecvError::Lagged(_)) => {
                            // events may be gone: the database says where the
                            // order is, and the client hears it again
                            match s.store.order(id).await {
                                Ok(Some(o)) => Some((o, true)),
                                Ok(None) => return None,
                                Err(e) => return Some((Err(ShopError::Store(e).into()), State { done: true, ..st })),
                            }
                        }
                        Err(RecvError::Closed) => return None,
                    };
                    // otherwise only changes after the snapshot: a status only moves forward
                    if let Some((order, _)) = fresh.filter(|(o, again)| *again || o.status != st.last) {
                        st.last = order.status;
                        st.done = order.status.is_final();
                        return Some((Ok(OrderNode(order)), st));
                    }
                }
            }
        }))
    }
}

//! Placing orders on Postgres: alone with one statement ([`one`]), or
//! together with concurrent orders in a batch ([`batch`]), and what to do
//! when Postgres refuses the attempt itself: retry a deadlock, answer an
//! idempotency key that raced in with its order.

mod batch;
mod one;

use chrono::{DateTime, Utc};

pub(super) use batch::{workers, Batcher};

use super::{is_unique_violation, PgStore};
use crate::domain::{CustomerId, OrderRequest};
use crate::store::{PlaceError, Placed, PlacementLimits, Store, StoreError};

/// How often a placement that Postgres aborted (deadlock, serialization
/// failure: nothing was written) is tried again.
const RETRIES: u32 = 5;

impl PgStore {
    /// Places the order: orders with a key are rare and their unique-key
    /// races simplest answered one by one, so they are placed alone; so is
    /// an order whose batch Postgres refused as a whole. Others join a batch.
    pub(super) async fn place(
        &self,
        customer: CustomerId,
        request: &OrderRequest,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
        limits: PlacementLimits,
    ) -> Result<Placed, PlaceError> {
        if let Some(placed) = self.order_for_key(customer, request).await? {
            return Ok(placed);
        }
        let mut alone = request.idempotency_key.is_some();
        let mut retries = 0;
        loop {
            let outcome = if alone {
                batch::Outcome::Done(one::place(&self.pool, customer, request, now, expires_at, limits).await)
            } else {
                self.batcher.place(customer, request, now, expires_at, limits).await
            };
            let e = match outcome {
                batch::Outcome::Done(Ok(order)) => return Ok(Placed { order, created: true }),
                batch::Outcome::Alone => {
                    alone = true;
                    continue;
                }
                batch::Outcome::Done(Err(PlaceError::Store(StoreError::Database(e)))) => e,
                batch::Outcome::Done(Err(refusal)) => return Err(refusal),
            };
            if is_unique_violation(&e) {
                return self.raced_key(customer, request, e).await;
            }
            if !is_retryable(&e) || retries == RETRIES {
                return Err(PlaceError::Store(StoreError::Database(e)));
            }
            retries += 1;
        }
    }

    /// The order the request's idempotency key placed while this request
    /// was placing it too (the insert hit the unique key): answered with
    /// that order, as if this request had come second.
    async fn raced_key(
        &self,
        customer: CustomerId,
        request: &OrderRequest,
        e: sqlx::Error,
    ) -> Result<Placed, PlaceError> {
        match self.order_for_key(customer, request).await? {
            Some(placed) => Ok(placed),
            None => Err(PlaceError::Store(StoreError::Database(e))),
        }
    }
}

/// Whether Postgres aborted the attempt in a way that wrote nothing and may
/// pass if tried again: deadlock_detected, serialization_failure.
fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40P01") | Some("40001")))
}

//! The domain's error vocabulary. `graphql::errors` maps each variant to
//! exactly one contract code; nothing else decides codes.

use crate::{
    auth::SignInRequired,
    domain::{InvalidInput, OrderId, OrderStatus, ProductId},
    store::{PlaceError, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum ShopError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(String),
    #[error("not enough stock for product {0}")]
    InsufficientStock(ProductId),
    #[error("order {id} is {status:?}: it can no longer be paid or cancelled")]
    NotPending { id: OrderId, status: OrderStatus },
    #[error("order {0} has expired: it can no longer be paid")]
    Expired(OrderId),
    #[error("{0}")]
    Conflict(String),
    /// Over a rate or holding limit; the refusal says how long to wait.
    #[error("{}", .0.message)]
    RateLimited(crate::ratelimit::Refusal),
    /// A subscriber read its events too slowly and was stopped (events it
    /// missed are gone, so it is told instead of being left to miss them).
    #[error("this subscription fell {0} events behind and was stopped; subscribe again and re-read your orders")]
    FellBehind(u64),
    /// A websocket connection runs as many operations as it may at once.
    #[error("too many subscriptions on this connection (at most {0})")]
    TooManySubscriptions(usize),
    #[error("internal error")]
    Store(#[from] StoreError),
}

impl From<SignInRequired> for ShopError {
    fn from(_: SignInRequired) -> Self {
        ShopError::Unauthenticated("sign in to see your orders")
    }
}

impl From<PlaceError> for ShopError {
    fn from(e: PlaceError) -> Self {
        match e {
            PlaceError::UnknownProduct(p) => ShopError::NotFound(format!("product {p}")),
            PlaceError::InsufficientStock(p) => ShopError::InsufficientStock(p),
            PlaceError::MixedCurrencies => ShopError::Invalid(InvalidInput(e.to_string())),
            PlaceError::TotalTooLarge => ShopError::Invalid(InvalidInput(e.to_string())),
            PlaceError::IdempotencyConflict => ShopError::Conflict(e.to_string()),
            PlaceError::TooManyPending { .. } | PlaceError::TooManyUnits { .. } | PlaceError::TooManyPlaced { .. } => {
                // Orders::place answers these with the wait; this is the fallback
                ShopError::RateLimited(crate::ratelimit::Refusal {
                    message: e.to_string(),
                    retry_after: std::time::Duration::from_secs(60),
                })
            }
            PlaceError::Store(s) => ShopError::Store(s),
        }
    }
}

pub type ShopResult<T> = Result<T, ShopError>;

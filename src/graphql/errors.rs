//! The one place where errors get the contract's codes.

use async_graphql::{ErrorExtensions, ServerError};
use tracing::error;

use crate::{domain::InvalidInput, error::ShopError, store::StoreError};

pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
pub const FORBIDDEN: &str = "FORBIDDEN";
pub const NOT_FOUND: &str = "NOT_FOUND";
pub const BAD_USER_INPUT: &str = "BAD_USER_INPUT";
pub const INSUFFICIENT_STOCK: &str = "INSUFFICIENT_STOCK";
pub const ORDER_NOT_PENDING: &str = "ORDER_NOT_PENDING";
pub const CONFLICT: &str = "CONFLICT";
pub const QUERY_TOO_COMPLEX: &str = "QUERY_TOO_COMPLEX";
pub const RATE_LIMITED: &str = "RATE_LIMITED";
pub const INTERNAL: &str = "INTERNAL";

/// The extension of a `RATE_LIMITED` error that says how many seconds to
/// wait; over HTTP it becomes the `Retry-After` header.
pub const RETRY_AFTER: &str = "retryAfter";

pub fn coded(message: impl Into<String>, code: &'static str) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code))
}

impl From<ShopError> for async_graphql::Error {
    fn from(e: ShopError) -> Self {
        let code = match &e {
            ShopError::Invalid(_) => BAD_USER_INPUT,
            ShopError::Unauthenticated(_) => UNAUTHENTICATED,
            ShopError::Forbidden(_) => FORBIDDEN,
            ShopError::NotFound(_) => NOT_FOUND,
            ShopError::InsufficientStock(_) => INSUFFICIENT_STOCK,
            ShopError::NotPending { .. } | ShopError::Expired(_) => ORDER_NOT_PENDING,
            ShopError::Conflict(_) => CONFLICT,
            ShopError::RateLimited(r) => {
                // whole seconds, as `Retry-After` carries them (src/http.rs)
                let secs = r.retry_after.as_secs().max(1);
                return async_graphql::Error::new(e.to_string()).extend_with(|_, x| {
                    x.set("code", RATE_LIMITED);
                    x.set(RETRY_AFTER, secs);
                });
            }
            ShopError::Store(inner) => {
                // the cause goes to the log, never to the client
                error!(error = %inner, cause = ?std::error::Error::source(inner), "internal error");
                return coded(internal_message(inner), INTERNAL);
            }
        };
        coded(e.to_string(), code)
    }
}

fn internal_message(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "the database is unavailable; try again shortly",
        _ => "internal error",
    }
}

impl From<InvalidInput> for async_graphql::Error {
    fn from(e: InvalidInput) -> Self {
        ShopError::Invalid(e).into()
    }
}

impl From<StoreError> for async_graphql::Error {
    fn from(e: StoreError) -> Self {
        ShopError::Store(e).into()
    }
}

/// Codes for errors that async-graphql raises itself (parsing, validation,
/// limits), so that every error a client sees carries one.
pub fn code_engine_error(mut e: ServerError) -> ServerError {
    let has_code = e.extensions.as_ref().is_some_and(|x| x.get("code").is_some());
    if has_code {
        return e;
    }
    let code = if e.message.contains("too complex")
        || e.message.contains("nested too deep")
        || e.message.contains("recursion")
        || e.message.contains("too many")
    {
        QUERY_TOO_COMPLEX
    } else {
        BAD_USER_INPUT
    };
    e.extensions.get_or_insert_with(Default::default).set("code", code);
    e
}

/// A limit refused the document before it ran.
pub fn too_complex(message: String) -> ServerError {
    server_error(message, QUERY_TOO_COMPLEX)
}

/// The document cannot run as written (a fragment cycle, say).
pub fn bad_document(message: String) -> ServerError {
    server_error(message, BAD_USER_INPUT)
}

fn server_error(message: String, code: &'static str) -> ServerError {
    let mut e = ServerError::new(message, None);
    e.extensions.get_or_insert_with(Default::default).set("code", code);
    e
}

/// Bytes of an error message a client gets back. Messages quote client
/// input (an id, an email, a field name); a long input is cut here so no
/// response echoes it in full, however many errors it causes.
pub const MAX_MESSAGE_BYTES: usize = 300;

/// `message` cut to [`MAX_MESSAGE_BYTES`] at a character boundary, with `…`.
pub fn clip(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.into();
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end]).into()
}

pub fn clip_message(mut e: ServerError) -> ServerError {
    if e.message.len() > MAX_MESSAGE_BYTES {
        e.message = clip(&e.message).into_owned();
    }
    e
}

//! The one place where errors get the contract's codes: domain errors
//! ([`ShopError`], [`StoreError`]), the parser's, and the engine's own
//! (through [`EngineErrorCodes`], over HTTP and websockets alike).

use std::sync::Arc;

use async_graphql::{
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextRequest, NextSubscribe, NextValidation},
    parser, ErrorExtensions, Response, ServerError, ValidationResult,
};
use futures_util::{stream::BoxStream, StreamExt};
use tracing::error;

use crate::{auth::SignInRequired, domain::InvalidInput, error::ShopError, store::StoreError};

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
            ShopError::FellBehind(_) => INTERNAL,
            // no `retryAfter`: waiting does not free a slot, stopping an operation does
            ShopError::TooManySubscriptions(_) => RATE_LIMITED,
            ShopError::RateLimited(r) => {
                // whole seconds, as `Retry-After` carries them (src/http/graphql.rs)
                let secs = r.retry_after.as_secs().max(1);
                return async_graphql::Error::new(e.to_string()).extend_with(|_, x| {
                    x.set("code", RATE_LIMITED);
                    x.set(RETRY_AFTER, secs);
                });
            }
            ShopError::Store(inner) => return store_error(inner),
        };
        coded(e.to_string(), code)
    }
}

/// A store error as the client sees it: `INTERNAL`, saying only whether
/// trying again soon may help; the cause goes to the log, never to the client.
fn store_error(e: &StoreError) -> async_graphql::Error {
    error!(error = %e, cause = ?std::error::Error::source(e), "internal error");
    let message = match e {
        StoreError::Unavailable(_) => "the database is unavailable; try again shortly",
        _ => "internal error",
    };
    coded(message, INTERNAL)
}

impl From<InvalidInput> for async_graphql::Error {
    fn from(e: InvalidInput) -> Self {
        ShopError::Invalid(e).into()
    }
}

impl From<SignInRequired> for async_graphql::Error {
    fn from(e: SignInRequired) -> Self {
        ShopError::from(e).into()
    }
}

impl From<StoreError> for async_graphql::Error {
    fn from(e: StoreError) -> Self {
        ShopError::Store(e).into()
    }
}

/// A DataLoader's error: one store error shared by every field that waited
/// on the batch, each getting the code and message the error itself has.
pub fn loader_error(e: Arc<StoreError>) -> async_graphql::Error {
    store_error(&e)
}

/// A domain error that belongs to no field (a websocket refusing or
/// stopping an operation): no location, no path.
pub fn standalone(e: ShopError) -> ServerError {
    let e = async_graphql::Error::from(e);
    let mut server = ServerError::new(e.message, None);
    server.extensions = e.extensions;
    server
}

/// The parser's refusal: nesting past its recursion limit is a limit, the
/// rest is a malformed document.
pub fn parse_error(e: parser::Error) -> ServerError {
    let code = match e {
        parser::Error::RecursionLimitExceeded => QUERY_TOO_COMPLEX,
        _ => BAD_USER_INPUT,
    };
    let mut e = ServerError::from(e);
    e.extensions.get_or_insert_with(Default::default).set("code", code);
    e
}

/// A code for an error the engine raises itself (validation, and later an
/// unknown operation name, a missing or ill-typed variable): the document
/// or its variables are wrong. Errors that carry a code keep it. The
/// engine's own limits are not configured (`cost` judges documents before
/// they reach it), so none of its errors is a limit.
pub fn code_engine_error(mut e: ServerError) -> ServerError {
    let has_code = e.extensions.as_ref().is_some_and(|x| x.get("code").is_some());
    if !has_code {
        e.extensions.get_or_insert_with(Default::default).set("code", BAD_USER_INPUT);
    }
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

/// Gives the engine's own errors (syntax, validation, and those it raises
/// later: an unknown operation name, a missing or ill-typed variable)
/// contract codes, and clips every message, over HTTP and websockets alike.
pub struct EngineErrorCodes;

/// The response with every engine error coded and its message clipped.
pub(crate) fn code_response(mut response: Response) -> Response {
    if !response.errors.is_empty() {
        response.errors = response.errors.into_iter().map(code_engine_error).map(clip_message).collect();
    }
    response
}

impl ExtensionFactory for EngineErrorCodes {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(EngineErrorCodes)
    }
}

#[async_trait::async_trait]
impl Extension for EngineErrorCodes {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        code_response(next.run(ctx).await)
    }

    fn subscribe<'s>(
        &self,
        ctx: &ExtensionContext<'_>,
        stream: BoxStream<'s, Response>,
        next: NextSubscribe<'_>,
    ) -> BoxStream<'s, Response> {
        next.run(ctx, stream).map(code_response).boxed()
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        next.run(ctx).await.map_err(|errs| errs.into_iter().map(code_engine_error).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(e: &ServerError) -> Option<async_graphql::Value> {
        e.extensions.as_ref().and_then(|x| x.get("code")).cloned()
    }

    #[test]
    fn nesting_past_the_parser_limit_is_too_complex_and_bad_syntax_is_bad_input() {
        let deep = format!("{}{}", "{ a ".repeat(100), "}".repeat(100));
        let e = parse_error(parser::parse_query(&deep).unwrap_err());
        assert_eq!(code(&e), Some(QUERY_TOO_COMPLEX.into()), "{e:?}");
        let e = parse_error(parser::parse_query("{ a ").unwrap_err());
        assert_eq!(code(&e), Some(BAD_USER_INPUT.into()), "{e:?}");
    }

    #[test]
    fn engine_errors_keep_their_code_and_are_never_coded_by_their_wording() {
        let e = code_engine_error(ServerError::new("too many cooks", None));
        assert_eq!(code(&e), Some(BAD_USER_INPUT.into()));
        let e = code_engine_error(too_complex("over the budget".into()));
        assert_eq!(code(&e), Some(QUERY_TOO_COMPLEX.into()));
    }

    #[test]
    fn a_shared_loader_error_keeps_the_store_errors_message() {
        let unavailable = Arc::new(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
        let other = Arc::new(StoreError::Database(sqlx::Error::RowNotFound));
        let _second_holder = (unavailable.clone(), other.clone());
        let e = loader_error(unavailable);
        assert!(e.message.contains("unavailable"), "{}", e.message);
        assert_eq!(loader_error(other).message, "internal error");
    }

    #[test]
    fn a_standalone_error_has_its_code_and_no_location() {
        let e = standalone(ShopError::TooManySubscriptions(2));
        assert_eq!(code(&e), Some(RATE_LIMITED.into()));
        assert!(e.locations.is_empty() && e.path.is_empty());
        let e = standalone(ShopError::FellBehind(3));
        assert_eq!(code(&e), Some(INTERNAL.into()));
        assert!(e.message.contains("fell 3 events behind"), "{}", e.message);
    }
}

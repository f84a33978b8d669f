//! The GraphQL schema. It knows nothing of HTTP: the router mounts it, and
//! each request or websocket brings its [`Identity`] as context data.

use std::{net::IpAddr, sync::Arc};

use async_graphql::{
    dataloader::DataLoader,
    extensions::{
        Extension, ExtensionContext, ExtensionFactory, NextExecute, NextRequest, NextSubscribe, NextValidation,
    },
    Context, Response, Schema, ServerError, ValidationResult,
};
use futures_util::{stream::BoxStream, StreamExt};

use crate::{
    auth::{Auth, Identity},
    events::EventBus,
    orders::Orders,
    ratelimit::Limits,
    store::Store,
};

mod cost;
mod documents;
pub mod errors;
mod mutation;
mod query;
mod subscription;
pub mod types;

pub use mutation::Mutation;
pub use query::Query;
pub use subscription::Subscription;

pub type ShopSchema = Schema<Query, Mutation, Subscription>;

/// Everything resolvers need, shared by all requests.
pub struct Services {
    pub store: Arc<dyn Store>,
    pub orders: Arc<Orders>,
    pub auth: Arc<Auth>,
    pub events: EventBus,
    pub loader: DataLoader<types::StoreLoader>,
    pub limits: Limits,
}

/// The client address of a request, for rate limits: the TCP peer, or the
/// client a trusted proxy names (`crate::client_addr`).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

pub fn services<'a>(ctx: &Context<'a>) -> &'a Arc<Services> {
    ctx.data_unchecked::<Arc<Services>>()
}

pub fn identity(ctx: &Context<'_>) -> Identity {
    ctx.data_opt::<Identity>().copied().unwrap_or(Identity::Anonymous)
}

pub use cost::{MAX_ALIASES, MAX_COMPLEXITY, MAX_DEPTH, MAX_DIRECTIVES};
pub use documents::{Documents, MAX_QUERY_BYTES};

/// The schema, its documents judged by `documents` before they run. With
/// introspection off, error messages suggest no field names either.
pub fn build(services: Arc<Services>, documents: Documents, introspection: bool) -> ShopSchema {
    let mut builder = Schema::build(Query, Mutation, Subscription)
        .data(services)
        .extension(documents)
        .extension(EngineErrorCodes)
        .extension(RequestMetrics);
    if !introspection {
        builder = builder.disable_introspection().disable_suggestions();
    }
    builder.finish()
}

/// The SDL of the schema, as checked in at `schema.graphql`.
pub fn sdl() -> String {
    Schema::build(Query, Mutation, Subscription).finish().sdl()
}

/// Gives the engine's own errors (syntax, validation, limits, and those it
/// raises later: an unknown operation name, a missing or ill-typed variable)
/// contract codes, over HTTP and websockets alike.
struct EngineErrorCodes;

fn code_response(mut response: Response) -> Response {
    if !response.errors.is_empty() {
        response.errors =
            response.errors.into_iter().map(errors::code_engine_error).map(errors::clip_message).collect();
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
        next.run(ctx).await.map_err(|errs| errs.into_iter().map(errors::code_engine_error).collect())
    }
}

/// Times each query or mutation (over HTTP, each operation of a batch on
/// its own) and labels it with the name of the operation that ran.
struct RequestMetrics;

impl ExtensionFactory for RequestMetrics {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(RequestTimer::default())
    }
}

/// One per request: `execute` learns the operation's name, `request` times
/// the whole (parsing and validation included).
#[derive(Default)]
struct RequestTimer {
    operation: std::sync::Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl Extension for RequestTimer {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let started = std::time::Instant::now();
        let response = next.run(ctx).await;
        let operation = self.operation.lock().map(|mut o| o.take()).unwrap_or_default();
        crate::telemetry::graphql_request(operation.as_deref(), started.elapsed());
        response
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        if let Ok(mut o) = self.operation.lock() {
            *o = operation_name.map(str::to_string);
        }
        next.run(ctx, operation_name).await
    }
}

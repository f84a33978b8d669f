//! The GraphQL schema. It knows nothing of HTTP: the router mounts it, and
//! each request or websocket brings its [`Identity`] as context data.

use std::{net::IpAddr, sync::Arc};

use async_graphql::{
    dataloader::DataLoader,
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextValidation},
    parser::types::ExecutableDocument,
    Context, Schema, ServerError, ServerResult, ValidationResult, Variables,
};

use crate::{
    auth::{Auth, Identity},
    events::EventBus,
    orders::Orders,
    ratelimit::RateLimiter,
    store::Store,
};

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
    pub auth_limiter: RateLimiter,
}

/// The client address of a request, for rate limits.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

pub fn services<'a>(ctx: &Context<'a>) -> &'a Arc<Services> {
    ctx.data_unchecked::<Arc<Services>>()
}

pub fn identity(ctx: &Context<'_>) -> Identity {
    ctx.data_opt::<Identity>().copied().unwrap_or(Identity::Anonymous)
}

/// Query limits: deep or costly documents are refused before any resolver runs.
/// Deep enough for the standard introspection query (15), which GraphiQL and codegen send.
pub const MAX_DEPTH: usize = 16;
pub const MAX_COMPLEXITY: usize = 2_000;

pub fn build(services: Arc<Services>, introspection: bool) -> ShopSchema {
    let mut builder = Schema::build(Query, Mutation, Subscription)
        .data(services)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .limit_recursive_depth(32)
        .limit_directives(10)
        .extension(EngineErrorCodes);
    if !introspection {
        builder = builder.disable_introspection();
    }
    builder.finish()
}

/// The SDL of the schema, as checked in at `schema.graphql`.
pub fn sdl() -> String {
    Schema::build(Query, Mutation, Subscription).finish().sdl()
}

/// Gives the engine's own errors (syntax, validation, limits) contract codes.
struct EngineErrorCodes;

impl ExtensionFactory for EngineErrorCodes {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(EngineErrorCodes)
    }
}

#[async_trait::async_trait]
impl Extension for EngineErrorCodes {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        next.run(ctx, query, variables).await.map_err(errors::code_engine_error)
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        next.run(ctx).await.map_err(|errs| errs.into_iter().map(errors::code_engine_error).collect())
    }
}

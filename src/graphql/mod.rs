//! The GraphQL schema. It knows nothing of HTTP: the router mounts it, and
//! each request or websocket brings its [`Identity`] as context data.

use std::{net::IpAddr, sync::Arc};

use async_graphql::{dataloader::DataLoader, Context, Schema};

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
pub mod persisted;
mod query;
mod subscription;
pub mod types;
mod variables;

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
pub use documents::{Documents, MAX_QUERY_BYTES, MAX_VARIABLE_STRING_BYTES};

/// The schema, its documents judged by `documents` before they run. With
/// introspection off, error messages suggest no field names either.
pub fn build(
    services: Arc<Services>,
    documents: Documents,
    introspection: bool,
    persisted: persisted::PersistedQueries,
) -> ShopSchema {
    let mut builder = Schema::build(Query, Mutation, Subscription)
        .data(services)
        .extension(errors::EngineErrorCodes)
        .extension(persisted)
        .extension(documents);
    if !introspection {
        builder = builder.disable_introspection().disable_suggestions();
    }
    builder.finish()
}

/// The same schema for documents that already passed [`build`]'s schema
/// (`Documents::run_known`): no extensions, and only the engine's cheap
/// checks instead of the validation rules, which passed for that document.
pub fn build_known(services: Arc<Services>, introspection: bool) -> ShopSchema {
    let mut builder = Schema::build(Query, Mutation, Subscription)
        .data(services)
        .validation_mode(async_graphql::ValidationMode::Fast);
    if !introspection {
        builder = builder.disable_introspection().disable_suggestions();
    }
    builder.finish()
}

/// The SDL of the schema, as checked in at `schema.graphql`.
pub fn sdl() -> String {
    // with `@specifiedBy` on DateTime, so codegen tools type it
    let options = async_graphql::SDLExportOptions::new().include_specified_by();
    Schema::build(Query, Mutation, Subscription).finish().sdl_with_options(options)
}

//! The GraphQL schema. It knows nothing of HTTP: the router mounts it, and
//! each request or websocket brings its [`Identity`] as context data.

use std::{net::IpAddr, sync::Arc};

use async_graphql::{
    dataloader::DataLoader,
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextRequest},
    parser::types::{ExecutableDocument, Selection, SelectionSet},
    Context, Response, Schema, ServerResult, Variables,
};

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
        .extension(RequestMetrics)
        .extension(persisted)
        // before `documents`, which parses without calling further, so that it sees every document
        .extension(crate::caching::CatalogDocuments)
        .extension(documents);
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

/// Times each query or mutation (over HTTP, each operation of a batch on
/// its own) and labels it with the root field it executed.
struct RequestMetrics;

impl ExtensionFactory for RequestMetrics {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(RequestTimer::default())
    }
}

/// One per request: `parse_query` notes each operation's root field,
/// `execute` (reached only once the document is valid, so the field is one
/// the schema has) picks the one that runs, `request` times the whole
/// (parsing and validation included).
#[derive(Default)]
struct RequestTimer {
    /// (operation name, its root field label) of the parsed document.
    candidates: std::sync::Mutex<Vec<(Option<String>, String)>>,
    executed: std::sync::Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl Extension for RequestTimer {
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let started = std::time::Instant::now();
        let response = next.run(ctx).await;
        let field = self.executed.lock().map(|mut o| o.take()).unwrap_or_default();
        crate::telemetry::graphql_request(field.as_deref(), started.elapsed());
        response
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let doc = next.run(ctx, query, variables).await?;
        if let Ok(mut c) = self.candidates.lock() {
            *c = doc
                .operations
                .iter()
                .map(|(name, op)| (name.map(|n| n.to_string()), root_field_label(&doc, &op.node.selection_set.node)))
                .collect();
        }
        Ok(doc)
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        let label = self.candidates.lock().ok().and_then(|c| {
            let only = c.len() == 1;
            c.iter().find(|(name, _)| only || name.as_deref() == operation_name).map(|(_, label)| label.clone())
        });
        if let Ok(mut o) = self.executed.lock() {
            *o = label;
        }
        next.run(ctx, operation_name).await
    }
}

/// The root field an operation selects (fragments at the root included,
/// each looked at once), `multiple` when it selects several; `__typename`
/// counts only when it is alone.
fn root_field_label(doc: &ExecutableDocument, root: &SelectionSet) -> String {
    let mut fields = std::collections::BTreeSet::new();
    let mut seen_fragments = std::collections::HashSet::new();
    let mut stack = vec![root];
    while let Some(set) = stack.pop() {
        for item in &set.items {
            match &item.node {
                Selection::Field(f) => {
                    fields.insert(f.node.name.node.as_str());
                }
                Selection::InlineFragment(f) => stack.push(&f.node.selection_set.node),
                Selection::FragmentSpread(s) => {
                    let name = &s.node.fragment_name.node;
                    if seen_fragments.insert(name.as_str()) {
                        if let Some(f) = doc.fragments.get(name) {
                            stack.push(&f.node.selection_set.node);
                        }
                    }
                }
            }
        }
    }
    if fields.len() > 1 {
        fields.remove("__typename");
    }
    match fields.len() {
        1 => fields.into_iter().next().unwrap_or_default().to_string(),
        _ => "multiple".to_string(),
    }
}

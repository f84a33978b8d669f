//! Automatic persisted queries (Apollo's protocol): a client sends
//! `extensions.persistedQuery.sha256Hash` instead of the document, and the
//! document only when the server answers `PersistedQueryNotFound`. That
//! makes catalog reads short `GET`s a CDN can cache by URL.
//!
//! Owns the hash → document store: Redis (`<prefix>apq:<hash>`, kept
//! [`REDIS_TTL`]) shared by every instance, with a small in-process map in
//! front. Not async-graphql's own extension: it stores parsed documents,
//! which cannot be shared through Redis, and parses a registered document
//! itself, past this schema's limits. Here a hash only ever stands for the
//! document text, which then goes through the usual parse (32 KiB limit,
//! alias count, document cache) and validation; a document is stored only
//! once it passed both, and only under its own hash.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::redis::RedisConn;
use async_graphql::{
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest, NextValidation},
    Request, ServerError, ServerResult, ValidationResult,
};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::errors;

/// How long Redis keeps a registered document after its registration.
pub const REDIS_TTL: Duration = Duration::from_secs(24 * 3600);
/// Documents kept in process; past that the map starts again.
const LOCAL_SIZE: usize = 1024;

/// The shared store, one per process; cheap to clone.
#[derive(Clone)]
pub struct PersistedQueries {
    redis: RedisConn,
    prefix: String,
    local: Arc<Mutex<HashMap<String, Arc<str>>>>,
}

impl PersistedQueries {
    pub fn new(redis: RedisConn, key_prefix: &str) -> PersistedQueries {
        PersistedQueries { redis, prefix: format!("{key_prefix}apq:"), local: Default::default() }
    }

    async fn lookup(&self, hash: &str) -> Option<Arc<str>> {
        if let Some(q) = self.local.lock().expect("apq lock").get(hash) {
            return Some(q.clone());
        }
        let mut conn = self.redis.clone();
        let found: Option<String> = match redis::cmd("GET").arg(self.key(hash)).query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => {
                // the client sends the document again: slower, not broken
                warn!(error = %e, "persisted query lookup failed");
                None
            }
        };
        let query: Arc<str> = found?.into();
        self.remember(hash, query.clone());
        Some(query)
    }

    async fn register(&self, hash: String, query: Arc<str>) {
        self.remember(&hash, query.clone());
        let mut conn = self.redis.clone();
        let mut set = redis::cmd("SET");
        set.arg(self.key(&hash)).arg(&*query).arg("EX").arg(REDIS_TTL.as_secs());
        if let Err(e) = set.query_async::<()>(&mut conn).await {
            warn!(error = %e, "persisted query registration failed");
        }
    }

    fn remember(&self, hash: &str, query: Arc<str>) {
        let mut local = self.local.lock().expect("apq lock");
        if local.len() >= LOCAL_SIZE {
            local.clear();
        }
        local.insert(hash.to_string(), query);
    }

    fn key(&self, hash: &str) -> String {
        format!("{}{hash}", self.prefix)
    }
}

impl ExtensionFactory for PersistedQueries {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(PerRequest { store: self.clone(), pending: Mutex::new(None) })
    }
}

/// One per request: a registration waits here until the document validated.
struct PerRequest {
    store: PersistedQueries,
    pending: Mutex<Option<(String, Arc<str>)>>,
}

#[derive(serde::Deserialize)]
struct PersistedQuery {
    version: i64,
    #[serde(rename = "sha256Hash")]
    sha256_hash: String,
}

#[async_trait::async_trait]
impl Extension for PerRequest {
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        let Some(value) = request.extensions.remove("persistedQuery") else { return next.run(ctx, request).await };
        let hash = requested_hash(value)?;
        if request.query.is_empty() {
            let query = self.store.lookup(&hash).await.ok_or_else(not_found)?;
            request.query = query.to_string();
            // the HTTP layer refuses a GET mutation it can see; this one it could not
            if request.data.contains_key(&std::any::TypeId::of::<SafeMethod>()) && runs_mutation(&request) {
                return Err(refused("mutations must be sent with POST"));
            }
        } else if request.query.len() <= super::MAX_QUERY_BYTES {
            if sha256_hex(&request.query) != hash {
                return Err(refused("the persisted query's sha256Hash does not match its query"));
            }
            *self.pending.lock().expect("apq lock") = Some((hash, request.query.as_str().into()));
        }
        // (a document over the limit is refused by the parse, and never stored)
        next.run(ctx, request).await
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let result = next.run(ctx).await?;
        let pending = self.pending.lock().expect("apq lock").take();
        if let Some((hash, query)) = pending {
            self.store.register(hash, query).await;
        }
        Ok(result)
    }
}

/// In a request's data: it came by `GET`, so it may not run a mutation.
pub struct SafeMethod;

/// Whether the operation a request runs is a mutation (any operation of
/// the document, when it names none): what `GET` may not run.
pub fn runs_mutation(request: &Request) -> bool {
    use async_graphql::parser::types::OperationType;
    let Ok(doc) = async_graphql::parser::parse_query(&request.query) else { return false };
    doc.operations.iter().any(|(name, op)| {
        op.node.ty == OperationType::Mutation
            && match (&request.operation_name, name) {
                (Some(wanted), Some(name)) => wanted == name.as_str(),
                _ => true,
            }
    })
}

/// The hash of a `persistedQuery` extension, version 1, as lowercase hex.
fn requested_hash(value: async_graphql::Value) -> ServerResult<String> {
    let pq: PersistedQuery = async_graphql::from_value(value)
        .map_err(|_| refused("invalid persistedQuery extension: expected {\"version\": 1, \"sha256Hash\": \"…\"}"))?;
    if pq.version != 1 {
        return Err(refused(format!("persistedQuery version {} is not supported (only 1)", pq.version)));
    }
    let hash = pq.sha256_hash.to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(refused("persistedQuery.sha256Hash must be 64 hexadecimal digits"));
    }
    Ok(hash)
}

pub fn sha256_hex(query: &str) -> String {
    format!("{:x}", Sha256::digest(query.as_bytes()))
}

/// The exact message Apollo Client, urql and others look for before
/// sending the document.
fn not_found() -> ServerError {
    refused("PersistedQueryNotFound")
}

fn refused(message: impl Into<String>) -> ServerError {
    let mut e = ServerError::new(message, None);
    e.extensions.get_or_insert_with(Default::default).set("code", errors::BAD_USER_INPUT);
    e
}

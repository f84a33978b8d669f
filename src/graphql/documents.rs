//! From query text to a document the engine may run: the size limit, the
//! parse (cached by text), and the cost limits of [`super::cost`], all before
//! validation or execution, identically for HTTP requests, batches and both
//! websocket protocols (every one of them enters the schema here).
//!
//! The engine's own parse step is never called: after parsing it checks
//! recursion and directives by walking the document with every fragment
//! expanded, which is exponential in the number of fragments.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_graphql::{
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery},
    parser::{parse_query, types::ExecutableDocument},
    BatchRequest, ServerError, ServerResult, Variables,
};

use super::{
    cost::{self, Cost, Refusal},
    errors,
};

/// Bytes of one query document (contract: a document of at most 32 KiB is
/// judged within milliseconds).
pub const MAX_QUERY_BYTES: usize = 32 * 1024;

/// Distinct documents kept; past that the cache starts again (a client
/// sending ever-new documents just gets no benefit).
const CACHE_SIZE: usize = 256;
/// Only documents up to this size are kept: storefronts send a few short
/// documents over and over, and a cache of large ones would be memory an
/// attacker chooses.
const CACHED_QUERY_BYTES: usize = 8 * 1024;

/// Parsed documents by query text. Parsing costs more than cloning the
/// parsed form (about 7 % of the server's CPU per `createOrder`).
#[derive(Clone, Default)]
pub struct Documents(Arc<Mutex<HashMap<String, ExecutableDocument>>>);

impl Documents {
    /// The document for `query`, refused if it is too large, malformed, or
    /// costs more than the limits allow with these variables.
    pub fn prepare(&self, query: &str, variables: &Variables) -> ServerResult<(ExecutableDocument, Cost)> {
        if query.len() > MAX_QUERY_BYTES {
            return Err(errors::too_complex(format!(
                "the query document is {} bytes; at most {MAX_QUERY_BYTES} are accepted",
                query.len()
            )));
        }
        let cached = self.0.lock().expect("document cache lock").get(query).cloned();
        let doc = match cached {
            Some(doc) => doc,
            None => parse_query(query).map_err(|e| errors::code_engine_error(e.into()))?,
        };
        let cost = cost::of_document(&doc, variables).map_err(refused)?;
        cost.check().map_err(refused)?;
        if query.len() <= CACHED_QUERY_BYTES {
            let mut cache = self.0.lock().expect("document cache lock");
            if !cache.contains_key(query) {
                if cache.len() >= CACHE_SIZE {
                    cache.clear();
                }
                cache.insert(query.to_string(), doc.clone());
            }
        }
        Ok((doc, cost))
    }

    /// Judges a whole HTTP request before any of it runs: every document on
    /// its own, and the complexity of all operations of a batch together.
    pub fn check_request(&self, request: &BatchRequest) -> ServerResult<()> {
        let BatchRequest::Batch(requests) = request else { return Ok(()) };
        let mut total = 0usize;
        for r in requests {
            let (_, cost) = self.prepare(&r.query, &r.variables)?;
            total = total.saturating_add(cost.complexity);
        }
        Cost { complexity: total, ..Cost::default() }.check().map_err(refused)
    }
}

fn refused(r: Refusal) -> ServerError {
    if r.is_limit() {
        errors::too_complex(r.to_string())
    } else {
        errors::bad_document(r.to_string())
    }
}

impl ExtensionFactory for Documents {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Extension for Documents {
    async fn parse_query(
        &self,
        _ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        _next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        self.prepare(query, variables).map(|(doc, _)| doc)
    }
}

//! From query text to a document the engine may run: the size limit, the
//! parse (cached by text), and the cost limits of [`super::cost`], all before
//! validation or execution, identically for HTTP requests, batches and both
//! websocket protocols (every one of them enters the schema here).
//!
//! The engine's own parse step is never called: after parsing it checks
//! recursion and directives by walking the document with every fragment
//! expanded, which is exponential in the number of fragments.
//!
//! A document that passed validation once is not validated again when it
//! comes back without variables (validation reads only the document, the
//! schema and the variables' values): storefronts repeat the same catalog
//! reads, and the engine's validation rules were a large share of their
//! cost.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_graphql::{
    extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextValidation},
    parser::{parse_query, types::ExecutableDocument},
    BatchRequest, ServerError, ServerResult, ValidationResult, Variables,
};

use super::{
    cost::{self, Cost, Refusal},
    errors,
};

/// Bytes of one query document (contract: a document of at most 32 KiB is
/// judged within milliseconds).
pub const MAX_QUERY_BYTES: usize = 32 * 1024;

/// Bytes of one string in a request's variables. The longest input the
/// schema accepts is a few hundred bytes (names, emails, passwords); a
/// longer string can only be an attempt to make the engine copy it into
/// every argument and error that names it.
pub const MAX_VARIABLE_STRING_BYTES: usize = 8 * 1024;

/// Distinct documents kept; past that the cache starts again (a client
/// sending ever-new documents just gets no benefit).
const CACHE_SIZE: usize = 256;
/// Only documents up to this size are kept: storefronts send a few short
/// documents over and over, and a cache of large ones would be memory an
/// attacker chooses.
const CACHED_QUERY_BYTES: usize = 8 * 1024;

/// Parsed documents by query text. Parsing costs more than cloning the
/// parsed form, and every request parses (BENCHMARKS.md has the profiles).
#[derive(Clone, Default)]
pub struct Documents(Arc<Mutex<HashMap<String, Entry>>>);

#[derive(Clone)]
struct Entry {
    doc: ExecutableDocument,
    /// The outcome of validating it without variables, once it passed.
    validated: Option<ValidationResult>,
}

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
        check_variables(variables)?;
        let cached = self.0.lock().expect("document cache lock").get(query).map(|e| e.doc.clone());
        let doc = match cached {
            Some(doc) => doc,
            None => parse_query(query).map_err(errors::parse_error)?,
        };
        let cost = cost::of_document(&doc, variables).map_err(refused)?;
        cost.check().map_err(refused)?;
        if query.len() <= CACHED_QUERY_BYTES {
            let mut cache = self.0.lock().expect("document cache lock");
            if !cache.contains_key(query) {
                if cache.len() >= CACHE_SIZE {
                    cache.clear();
                }
                cache.insert(query.to_string(), Entry { doc: doc.clone(), validated: None });
            }
        }
        Ok((doc, cost))
    }

    /// Judges a whole HTTP request before any of it runs: every document on
    /// its own, and the complexity of all operations of a batch together.
    pub fn check_request(&self, request: &BatchRequest) -> ServerResult<()> {
        let BatchRequest::Batch(requests) = request else { return Ok(()) };
        let mut total = 0usize;
        // a persisted query sent by hash alone is judged on its own once its
        // text is known (each document within the budget), not in the total
        for r in requests.iter().filter(|r| !r.query.is_empty()) {
            let (_, cost) = self.prepare(&r.query, &r.variables)?;
            total = total.saturating_add(cost.complexity);
        }
        Cost { complexity: total, ..Cost::default() }.check().map_err(refused)
    }

    fn validated(&self, query: &str) -> Option<ValidationResult> {
        self.0.lock().expect("document cache lock").get(query).and_then(|e| e.validated)
    }

    fn remember_validated(&self, query: &str, result: ValidationResult) {
        if let Some(e) = self.0.lock().expect("document cache lock").get_mut(query) {
            e.validated = Some(result);
        }
    }
}

/// Refuses a request whose variables hold a string longer than
/// [`MAX_VARIABLE_STRING_BYTES`] (object keys included), before anything
/// copies it.
fn check_variables(variables: &Variables) -> ServerResult<()> {
    fn longest(v: &async_graphql::Value) -> usize {
        use async_graphql::Value;
        match v {
            Value::String(s) => s.len(),
            Value::List(items) => items.iter().map(longest).max().unwrap_or(0),
            Value::Object(fields) => fields.iter().map(|(k, v)| k.len().max(longest(v))).max().unwrap_or(0),
            _ => 0,
        }
    }
    match variables.iter().find(|(_, v)| longest(v) > MAX_VARIABLE_STRING_BYTES) {
        None => Ok(()),
        Some((name, _)) => Err(errors::bad_document(format!(
            "variable ${name} holds a string longer than {MAX_VARIABLE_STRING_BYTES} bytes; no input is that long"
        ))),
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
        Arc::new(OneRequest { documents: self.clone(), query: Mutex::new(None) })
    }
}

/// The extension's state for one request: the query text, when its
/// validation may be remembered (no variables).
struct OneRequest {
    documents: Documents,
    query: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl Extension for OneRequest {
    async fn parse_query(
        &self,
        _ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        _next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let (doc, _) = self.documents.prepare(query, variables)?;
        if variables.is_empty() && query.len() <= CACHED_QUERY_BYTES {
            *self.query.lock().expect("request query lock") = Some(query.to_string());
        }
        Ok(doc)
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let query = self.query.lock().expect("request query lock").take();
        let Some(query) = query else { return next.run(ctx).await };
        if let Some(result) = self.documents.validated(&query) {
            return Ok(result);
        }
        let result = next.run(ctx).await?;
        self.documents.remember_validated(&query, result);
        Ok(result)
    }
}

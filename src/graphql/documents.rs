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
//! cost. Over HTTP such a request goes further ([`Documents::run_known`]):
//! it runs on the schema built without extensions ([`super::build_known`]),
//! with this module's per-request work done around the call instead of in
//! hooks, because the engine passes every field of every response through
//! each extension when it has any (a boxed future per field per extension,
//! and a registry lookup: about a third of an uncached catalog page).
//!
//! What the rest of a request needs to know about its document ([`Facts`]:
//! whether it reads only the public catalog, which root field each
//! operation runs) is worked out here once per distinct document, and this
//! one extension hands it on: the catalog verdict to the HTTP layer's
//! [`CatalogOnly`] slot, the root field to the request's duration metric.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_graphql::{
    extensions::{
        Extension, ExtensionContext, ExtensionFactory, NextExecute, NextParseQuery, NextRequest, NextValidation,
    },
    parser::{
        parse_query,
        types::{ExecutableDocument, Selection, SelectionSet},
    },
    BatchRequest, Request, Response, ServerError, ServerResult, ValidationResult, Variables,
};

use super::{
    cost::{self, Cost, Refusal},
    errors, variables,
};
use crate::caching::{reads_only_catalog, CatalogOnly};

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
    facts: Arc<Facts>,
    /// The outcome of validating it, once it passed. Passing with some
    /// variables means passing without any (the rule that reads them skips
    /// arguments whose variables are absent), so the result answers for a
    /// request without variables; one with variables needs
    /// [`variables::certainly_valid`] as well.
    validated: Option<ValidationResult>,
}

/// What a document is, as far as the rest of its request cares; the same
/// whatever the variables.
#[derive(Debug)]
pub struct Facts {
    /// Every operation is a query of public catalog fields only
    /// ([`reads_only_catalog`]): its response may be cached and shared.
    pub catalog_only: bool,
    /// Each operation's name and the root field it selects, the label of
    /// its duration metric ([`root_field_label`]).
    roots: Vec<(Option<String>, String)>,
}

impl Facts {
    fn of(doc: &ExecutableDocument) -> Facts {
        let roots = doc
            .operations
            .iter()
            .map(|(name, op)| (name.map(|n| n.to_string()), root_field_label(doc, &op.node.selection_set.node)))
            .collect();
        Facts { catalog_only: reads_only_catalog(doc), roots }
    }

    /// The label of the operation that runs (the only one, or the named one).
    fn label(&self, operation_name: Option<&str>) -> Option<&str> {
        let only = self.roots.len() == 1;
        self.roots.iter().find(|(name, _)| only || name.as_deref() == operation_name).map(|(_, label)| label.as_str())
    }
}

/// A document ready to validate, what it costs, and its [`Facts`].
pub struct Prepared {
    pub doc: ExecutableDocument,
    pub cost: Cost,
    pub facts: Arc<Facts>,
}

impl Documents {
    /// The document for `query`, refused if it is too large, malformed, or
    /// costs more than the limits allow with these variables.
    pub fn prepare(&self, query: &str, variables: &Variables) -> ServerResult<Prepared> {
        if query.len() > MAX_QUERY_BYTES {
            return Err(errors::too_complex(format!(
                "the query document is {} bytes; at most {MAX_QUERY_BYTES} are accepted",
                query.len()
            )));
        }
        check_variables(variables)?;
        let cached = self.0.lock().expect("document cache lock").get(query).map(|e| (e.doc.clone(), e.facts.clone()));
        let (doc, facts, fresh) = match cached {
            Some((doc, facts)) => (doc, facts, false),
            None => {
                let doc = parse_query(query).map_err(errors::parse_error)?;
                let facts = Arc::new(Facts::of(&doc));
                (doc, facts, true)
            }
        };
        let cost = cost::of_document(&doc, variables).map_err(refused)?;
        cost.check().map_err(refused)?;
        if fresh && query.len() <= CACHED_QUERY_BYTES {
            let mut cache = self.0.lock().expect("document cache lock");
            if !cache.contains_key(query) {
                if cache.len() >= CACHE_SIZE {
                    cache.clear();
                }
                cache.insert(query.to_string(), Entry { doc: doc.clone(), facts: facts.clone(), validated: None });
            }
        }
        Ok(Prepared { doc, cost, facts })
    }

    /// Judges a whole HTTP request before any of it runs: every document on
    /// its own, and the complexity of all operations of a batch together.
    pub fn check_request(&self, request: &BatchRequest) -> ServerResult<()> {
        let BatchRequest::Batch(requests) = request else { return Ok(()) };
        let mut total = 0usize;
        // a persisted query sent by hash alone is judged on its own once its
        // text is known (each document within the budget), not in the total
        for r in requests.iter().filter(|r| !r.query.is_empty()) {
            let cost = self.prepare(&r.query, &r.variables)?.cost;
            total = total.saturating_add(cost.complexity);
        }
        Cost { complexity: total, ..Cost::default() }.check().map_err(refused)
    }

    /// Runs `request` on `known` (the schema without extensions or
    /// validation rules) when its document passed validation before and
    /// nothing about the request can change that verdict: it selects an
    /// operation; its variables, if any, are certainly valid
    /// ([`variables::certainly_valid`]) and within the cost limits; it has
    /// no extensions (a persisted query's hash or registration takes the
    /// extension path). Does here what the extensions do for every other
    /// request: the catalog verdict, the duration metric labelled with the
    /// root field, the engine's errors coded. Gives the request back when
    /// it is not such a request, for the full path and its answer.
    pub async fn run_known(
        &self,
        known: &super::ShopSchema,
        mut request: Request,
        catalog: &CatalogOnly,
    ) -> Result<Response, Request> {
        if !request.extensions.is_empty() || request.query.len() > CACHED_QUERY_BYTES {
            return Err(request);
        }
        let entry = self
            .0
            .lock()
            .expect("document cache lock")
            .get(&request.query)
            .and_then(|e| e.validated.map(|_| (e.doc.clone(), e.facts.clone())));
        let Some((doc, facts)) = entry else { return Err(request) };
        if variables::selected(&doc, request.operation_name.as_deref()).is_none() {
            return Err(request);
        }
        // without variables the document's cost is its own, and it passed
        // when the document was first prepared; with them, the checks that
        // read variables run here, and any doubt takes the full path (which
        // gives the refusal)
        if !request.variables.is_empty() {
            let cheap = check_variables(&request.variables).is_ok()
                && cost::of_document(&doc, &request.variables).is_ok_and(|c| c.check().is_ok());
            if !cheap || !variables::certainly_valid(&doc, request.operation_name.as_deref(), &request.variables) {
                return Err(request);
            }
        }
        let started = std::time::Instant::now();
        catalog.set(facts.catalog_only);
        let label = facts.label(request.operation_name.as_deref());
        request.set_parsed_query(doc);
        let response = errors::code_response(known.execute(request).await);
        crate::telemetry::graphql_request(label, started.elapsed());
        Ok(response)
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
        Arc::new(OneRequest { documents: self.clone(), state: Mutex::new(RequestState::default()) })
    }
}

/// The extension's state for one request (over HTTP, each operation of a
/// batch is a request of its own).
struct OneRequest {
    documents: Documents,
    state: Mutex<RequestState>,
}

#[derive(Default)]
struct RequestState {
    /// The query text, when its validation may be remembered.
    query: Option<String>,
    /// Whether a remembered validation answers for this request (it has no
    /// variables; with them, only `run_known`'s check may reuse it).
    reuse: bool,
    facts: Option<Arc<Facts>>,
    /// The root field of the operation that ran, once execution started
    /// (reached only by valid documents, so it is a field the schema has).
    executed: Option<String>,
}

impl OneRequest {
    fn state(&self) -> std::sync::MutexGuard<'_, RequestState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait::async_trait]
impl Extension for OneRequest {
    /// Times the whole request (parsing and validation included), labelled
    /// with the root field it executed.
    async fn request(&self, ctx: &ExtensionContext<'_>, next: NextRequest<'_>) -> Response {
        let started = std::time::Instant::now();
        let response = next.run(ctx).await;
        let field = self.state().executed.take();
        crate::telemetry::graphql_request(field.as_deref(), started.elapsed());
        response
    }

    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        _next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let Prepared { doc, facts, .. } = self.documents.prepare(query, variables)?;
        if let Some(slot) = ctx.data_opt::<CatalogOnly>() {
            slot.set(facts.catalog_only);
        }
        let mut state = self.state();
        if query.len() <= CACHED_QUERY_BYTES {
            state.query = Some(query.to_string());
            state.reuse = variables.is_empty();
        }
        state.facts = Some(facts);
        Ok(doc)
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let (query, reuse) = {
            let mut state = self.state();
            (state.query.take(), state.reuse)
        };
        let Some(query) = query else { return next.run(ctx).await };
        if reuse {
            if let Some(result) = self.documents.validated(&query) {
                return Ok(result);
            }
        }
        let result = next.run(ctx).await?;
        self.documents.remember_validated(&query, result);
        Ok(result)
    }

    async fn execute(
        &self,
        ctx: &ExtensionContext<'_>,
        operation_name: Option<&str>,
        next: NextExecute<'_>,
    ) -> Response {
        {
            let mut state = self.state();
            state.executed = state.facts.as_ref().and_then(|f| f.label(operation_name)).map(str::to_string);
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

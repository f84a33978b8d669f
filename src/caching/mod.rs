//! HTTP caching of GraphQL responses, so that a CDN or caching proxy can
//! answer the anonymous catalog reads that are most of a shop's traffic.
//!
//! Owns the decision (which response may be stored by whom) and the
//! validators: an anonymous response to a document that reads only
//! `products`/`product` (and `__typename`) is `public, max-age=CATALOG_MAX_AGE`
//! with a strong `ETag`; a matching `If-None-Match` gets 304 without a body.
//! Anything answered for a token is `private, no-store`; everything else
//! (mutations, errors, other fields, batches) is `no-store`.
//!
//! [`responses`] keeps those public answers in the server too.

pub mod responses;

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use async_graphql::{
    parser::types::{ExecutableDocument, OperationType, Selection, SelectionSet},
    BatchResponse,
};
use axum::{
    body::{Body, Bytes},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::Response,
};

use crate::auth::Identity;

/// Root fields whose answer is the same for every anonymous visitor.
const PUBLIC_ROOT_FIELDS: &[&str] = &["products", "product", "__typename"];

/// Set when the request's document reads only the public catalog (by the
/// schema's document stage, `graphql::documents`, from
/// [`reads_only_catalog`]); one per HTTP request, in the request's data.
#[derive(Clone, Default)]
pub struct CatalogOnly(Arc<AtomicBool>);

impl CatalogOnly {
    pub fn set(&self, catalog_only: bool) {
        self.0.store(catalog_only, Ordering::Relaxed);
    }
    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Who may store a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Shared caches may keep it for `max-age`; it gets an `ETag`.
    Public,
    /// Answered for a token: nobody stores it.
    Private,
    NoStore,
}

/// The decision for one executed HTTP request.
pub fn verdict(identity: &Identity, response: &BatchResponse, catalog: &CatalogOnly) -> Verdict {
    if !matches!(identity, Identity::Anonymous) {
        return Verdict::Private;
    }
    match response {
        BatchResponse::Single(r) if r.errors.is_empty() && catalog.get() => Verdict::Public,
        _ => Verdict::NoStore,
    }
}

/// Sets `Cache-Control` on a response that is not public.
pub fn not_public(verdict: Verdict, mut res: Response) -> Response {
    let control = match verdict {
        Verdict::Private => HeaderValue::from_static("private, no-store"),
        Verdict::NoStore | Verdict::Public => HeaderValue::from_static("no-store"),
    };
    res.headers_mut().insert(header::CACHE_CONTROL, control);
    res
}

/// The response for a public body: `Cache-Control`, `ETag`, `Vary`, `Age`
/// when it was executed a while ago; 304 without a body when the client
/// already holds it.
pub fn public(
    control: &HeaderValue,
    request: &HeaderMap,
    content_type: HeaderValue,
    body: Bytes,
    tag: HeaderValue,
    age: Duration,
) -> Response {
    let mut res = Response::new(Body::empty());
    let headers = res.headers_mut();
    headers.insert(header::CACHE_CONTROL, control.clone());
    // application/json or application/graphql-response+json, by Accept
    headers.insert(header::VARY, HeaderValue::from_static("Accept"));
    if age >= Duration::from_secs(1) {
        headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
    }
    let not_modified = if_none_match(request, &tag);
    headers.insert(header::ETAG, tag);
    if not_modified {
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        return res;
    }
    res.headers_mut().insert(header::CONTENT_TYPE, content_type);
    *res.body_mut() = Body::from(body);
    res
}

/// `public, max-age=…` for anonymous catalog responses.
pub fn cache_control(max_age: Duration) -> HeaderValue {
    // whole seconds; a sub-second setting still allows one
    HeaderValue::from_str(&format!("public, max-age={}", max_age.as_secs().max(1)))
        .unwrap_or_else(|_| HeaderValue::from_static("no-store"))
}

/// A strong validator: a 128-bit hash of the exact body.
pub fn etag(body: &[u8]) -> HeaderValue {
    let tag = format!("\"{:032x}\"", xxhash_rust::xxh3::xxh3_128(body));
    HeaderValue::from_str(&tag).expect("hex is a valid header value")
}

/// `If-None-Match` names this tag (weak comparison, as RFC 9110 asks for
/// this header) or is `*`.
fn if_none_match(request: &HeaderMap, tag: &HeaderValue) -> bool {
    let tag = tag.to_str().unwrap_or_default();
    request.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |candidate| {
            let candidate = candidate.trim();
            candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == tag
        },
    )
}

/// Every operation of the document is a query whose root fields (through
/// fragments too) are public catalog fields. Judged on the whole document,
/// whichever operation runs: a document that also holds a mutation is not
/// cacheable.
pub fn reads_only_catalog(doc: &ExecutableDocument) -> bool {
    doc.operations.iter().all(|(_, op)| {
        op.node.ty == OperationType::Query && root_is_public(doc, &op.node.selection_set.node, &mut HashSet::new())
    })
}

fn root_is_public<'d>(doc: &'d ExecutableDocument, set: &'d SelectionSet, seen: &mut HashSet<&'d str>) -> bool {
    set.items.iter().all(|item| match &item.node {
        Selection::Field(f) => PUBLIC_ROOT_FIELDS.contains(&f.node.name.node.as_str()),
        Selection::InlineFragment(f) => root_is_public(doc, &f.node.selection_set.node, seen),
        Selection::FragmentSpread(s) => {
            let name = s.node.fragment_name.node.as_str();
            // a fragment already judged is not judged again (cycles are refused by validation)
            if !seen.insert(name) {
                return true;
            }
            doc.fragments
                .get(&s.node.fragment_name.node)
                .is_some_and(|f| root_is_public(doc, &f.node.selection_set.node, seen))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(q: &str) -> bool {
        reads_only_catalog(&async_graphql::parser::parse_query(q).unwrap())
    }

    #[test]
    fn only_documents_of_catalog_queries_are_catalog_reads() {
        assert!(catalog("{ products { nodes { id } } }"));
        assert!(catalog("query P($id: ID!) { product(id: $id) { id } __typename }"));
        assert!(catalog("query { ...F } fragment F on Query { a: products { nodes { id } } }"));
        assert!(!catalog("{ products { nodes { id } } me { id } }"));
        assert!(!catalog("query { ... on Query { orders { nodes { id } } } }"));
        assert!(!catalog(
            "query A { products { nodes { id } } } mutation B { login(email: \"a\", password: \"b\") { token } }"
        ));
        assert!(!catalog("subscription { orderCancelled { reason } }"));
    }

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        let tag = etag(b"{}");
        let mut h = HeaderMap::new();
        assert!(!if_none_match(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(&format!("\"x\", W/{}", tag.to_str().unwrap())).unwrap());
        assert!(if_none_match(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&h, &tag));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!if_none_match(&h, &tag));
    }
}

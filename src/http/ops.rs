//! The operator's endpoints: `/readyz`, `/metrics`, and the GraphiQL
//! page with its bundle.

use axum::{
    extract::State,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use std::sync::Arc;

use super::HttpState;
use crate::telemetry;

pub(super) async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    let timeout = std::time::Duration::from_secs(2);
    let db = matches!(tokio::time::timeout(timeout, state.store.ping()).await, Ok(Ok(())));
    let mut conn = state.redis.clone();
    let redis =
        matches!(tokio::time::timeout(timeout, redis::cmd("PING").query_async::<String>(&mut conn)).await, Ok(Ok(_)));
    let listener = state.listener.is_up();
    let up = |b: bool| if b { "up" } else { "down" };
    let mut body = json!({
        "database": up(db),
        "redis": up(redis),
        "listener": up(listener),
        "events": up(state.events.fanout_up()),
        // informational: while missing the nudger cancels due orders itself,
        // so orders are still cancelled on time and readiness stands
        "expiryEvents": state.listener.arrival().as_str(),
    });
    // informational: without the replica the primary serves the catalog
    if let Some(replica) = state.store.read_replica_usable() {
        body["readReplica"] = up(replica).into();
    }
    let status = if db && redis && listener { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// `/metrics` answers only to `Authorization: Bearer <METRICS_TOKEN>`:
/// it shows order counts and traffic that are nobody else's business.
/// Without a configured token it does not exist (404).
pub(super) async fn metrics(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let Some(token) = &state.metrics_token else {
        return (StatusCode::NOT_FOUND, "metrics are off: set METRICS_TOKEN to serve them\n").into_response();
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .unwrap_or_default();
    if !bool::from(subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.0.as_bytes())) {
        let mut res =
            (StatusCode::UNAUTHORIZED, "metrics need Authorization: Bearer <METRICS_TOKEN>\n").into_response();
        res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"metrics\""));
        return res;
    }
    let (in_use, idle) = state.store.pool_state();
    telemetry::db_pool(in_use, idle);
    let body = telemetry::metrics_handle().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub(super) const GRAPHIQL_HTML: &[u8] = include_bytes!("../../assets/graphiql/index.html");
const GRAPHIQL_JS: &[u8] = include_bytes!("../../assets/graphiql/graphiql.js");
const GRAPHIQL_CSS: &[u8] = include_bytes!("../../assets/graphiql/graphiql.css");

pub(super) async fn graphiql_page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], GRAPHIQL_HTML)
}

pub(super) async fn graphiql_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        GRAPHIQL_JS,
    )
}

pub(super) async fn graphiql_css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], GRAPHIQL_CSS)
}

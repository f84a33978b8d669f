//! The axum router: `/graphql` (HTTP and websocket, [`graphql`]),
//! `/graphiql`, `/healthz`, `/readyz`, `/metrics` ([`ops`]), `/demo/`; the
//! security headers and the time bound every response carries.

mod graphql;
mod ops;

use std::{sync::Arc, time::Duration};

use crate::redis::RedisConn;
use axum::{
    extract::{DefaultBodyLimit, Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tower_http::services::ServeDir;

use crate::{
    auth::Auth,
    caching::responses,
    client_addr::Cidr,
    config::Secret,
    connlimit::AddrLimits,
    cors,
    events::EventBus,
    expiry::listener::ListenerState,
    graphql::{errors, Documents, ShopSchema},
    store::Store,
    ws::WsSettings,
};

/// Everything the handlers share (as `State<Arc<HttpState>>`).
#[derive(Clone)]
pub struct HttpState {
    pub schema: ShopSchema,
    /// The schema for documents that passed `schema`'s validation before
    /// (`Documents::run_known`).
    pub known_schema: ShopSchema,
    /// The schema's documents, to judge a whole batch before any of it runs.
    pub documents: Documents,
    pub auth: Arc<Auth>,
    pub store: Arc<dyn Store>,
    pub redis: RedisConn,
    pub listener: Arc<ListenerState>,
    pub events: EventBus,
    pub ws: Arc<WsSettings>,
    /// One permit per open websocket: `WS_MAX_CONNECTIONS` per process and
    /// `WS_MAX_CONNECTIONS_PER_IP` per client address.
    pub ws_permits: Arc<AddrLimits>,
    /// Cancelled at shutdown: websockets close with 1001.
    pub shutdown: CancellationToken,
    /// Bound on one HTTP request, body upload included (`REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// Peers whose `X-Forwarded-For` names the client (`TRUSTED_PROXIES`).
    pub trusted_proxies: Arc<Vec<Cidr>>,
    /// `CORS_ALLOWED_ORIGINS`; `None`: no CORS headers.
    pub cors: Option<Arc<crate::cors::AllowedOrigins>>,
    /// `Cache-Control: public, max-age=CATALOG_MAX_AGE` of anonymous catalog
    /// responses, made once.
    pub catalog_cache_control: HeaderValue,
    /// The server's own store of those responses (`CATALOG_CACHE_TTL`).
    pub responses: Arc<responses::ResponseCache>,
    /// The bearer token `/metrics` requires (`METRICS_TOKEN`); `None`: 404.
    pub metrics_token: Option<Secret>,
    /// Whether GraphiQL is served (`GRAPHIQL`).
    pub graphiql: bool,
}

/// Requests per batch; a larger batch is refused with 400.
pub const MAX_BATCH: usize = 10;
/// Bytes of a request body.
pub const MAX_BODY: usize = 256 * 1024;
/// Bytes of one response body. The cost limits keep every answer far
/// below it; this stops whatever they did not foresee from growing without
/// bound (the response is refused, not truncated).
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;
/// Bytes of one websocket message.
pub const MAX_WS_MESSAGE: usize = 64 * 1024;

pub fn router(state: HttpState, demo_dir: &std::path::Path) -> Router {
    let demo = ServeDir::new(demo_dir).append_index_html_on_directories(true);
    let mut router = Router::new()
        .route(
            "/graphql",
            get(graphql::get)
                .post(graphql::post)
                .layer(middleware::from_fn_with_state(state.cors.clone(), cors::layer)),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/demo", get(|| async { Redirect::permanent("/demo/") }))
        .nest_service("/demo/", demo);
    if state.graphiql {
        router = router
            .route("/", get(|| async { Redirect::temporary("/graphiql") }))
            .route("/graphiql", get(ops::graphiql_page))
            .route("/graphiql/graphiql.js", get(ops::graphiql_js))
            .route("/graphiql/graphiql.css", get(ops::graphiql_css));
    }
    router
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.request_timeout, request_timeout))
        .layer(middleware::map_response(security_headers))
        // behind an `Arc`: axum clones the state for every request, and
        // this one is a dozen reference-counted fields
        .with_state(Arc::new(state))
}

/// The Content-Security-Policy of every response. Scripts and styles come
/// from this origin only (the GraphiQL bundle and the demo are files, not
/// inline code); the one inline `<style>` of the GraphiQL page is allowed
/// by its hash, computed from the embedded page so a rebuilt page cannot
/// fall out of step. GraphiQL inlines its fonts and icons as `data:` URLs.
/// `connect-src 'self'` covers `/graphql` over HTTP and `ws:`/`wss:`.
fn content_security_policy() -> &'static HeaderValue {
    static CSP: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        let style_hashes: String =
            inline_styles(ops::GRAPHIQL_HTML).map(|css| format!(" 'sha256-{}'", sha256_base64(css))).collect();
        let policy = format!(
            "default-src 'self'; script-src 'self'; style-src 'self'{style_hashes}; img-src 'self' data:; \
             font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
             frame-ancestors 'none'"
        );
        HeaderValue::from_str(&policy).expect("the policy is ASCII")
    })
}

/// The text of each `<style>` element of an HTML page.
fn inline_styles(html: &[u8]) -> impl Iterator<Item = &[u8]> {
    let html = std::str::from_utf8(html).unwrap_or_default();
    html.split("<style>").skip(1).filter_map(|rest| rest.split_once("</style>")).map(|(css, _)| css.as_bytes())
}

fn sha256_base64(bytes: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
}

/// Headers that keep browsers from framing, sniffing or leaking: on every
/// response (a JSON answer in a frame is as unwanted as a page), unless a
/// handler set its own.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.entry(header::CONTENT_SECURITY_POLICY).or_insert_with(|| content_security_policy().clone());
    h.entry(header::X_CONTENT_TYPE_OPTIONS).or_insert(HeaderValue::from_static("nosniff"));
    h.entry(header::X_FRAME_OPTIONS).or_insert(HeaderValue::from_static("DENY"));
    h.entry(header::REFERRER_POLICY).or_insert(HeaderValue::from_static("no-referrer"));
    res
}

/// Answers 408 (with a coded GraphQL error) when a request, its body upload
/// included, takes longer than `REQUEST_TIMEOUT`. A websocket upgrade is
/// answered at once, so the socket itself is not bound by it.
async fn request_timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => error_body(
            StatusCode::REQUEST_TIMEOUT,
            &format!("the request did not complete within {}", humantime::format_duration(limit)),
            errors::INTERNAL,
        ),
    }
}

pub(crate) fn error_body(status: StatusCode, message: &str, code: &str) -> Response {
    let message = errors::clip(message);
    (status, Json(json!({"errors": [{"message": message, "extensions": {"code": code}}]}))).into_response()
}

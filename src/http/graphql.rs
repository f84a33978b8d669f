//! `/graphql` over HTTP: POST and GET bodies to one execution path (the
//! token, the whole-batch limits, the server's catalog cache, HTTP statuses
//! and cache headers), and the websocket upgrade.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use async_graphql::{http::parse_query_string, BatchRequest, BatchResponse};
use axum::{
    body::Bytes,
    extract::{
        rejection::BytesRejection, ws::WebSocketUpgrade, ConnectInfo, FromRequest, FromRequestParts, Request, State,
    },
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};

use super::{error_body, HttpState, MAX_BATCH, MAX_BODY, MAX_RESPONSE_BYTES, MAX_WS_MESSAGE};
use crate::{
    auth::InvalidToken,
    caching::{self, responses},
    client_addr,
    connlimit::Refused,
    graphql::{errors, ClientAddr},
    telemetry,
    ws::{self, Protocol},
};

/// Whether the client asked for `application/graphql-response+json`.
fn wants_graphql_response(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/graphql-response+json"))
}

/// The one place that decides a request's client address: the peer, or
/// whom a trusted proxy names (HTTP requests and websockets alike).
fn client(state: &HttpState, headers: &HeaderMap, peer: SocketAddr) -> ClientAddr {
    ClientAddr(client_addr::client_ip(&state.trusted_proxies, headers, peer.ip()))
}

/// The `Authorization` header's value: `None` when absent; a value that is
/// not text is a credential we cannot read, refused like a bad token.
fn authorization(headers: &HeaderMap) -> Result<Option<&str>, InvalidToken> {
    headers.get(header::AUTHORIZATION).map(|v| v.to_str().map_err(|_| InvalidToken)).transpose()
}

/// 401 for a refused credential, over either content type (RFC 6750).
fn unauthorized(message: &str) -> Response {
    let mut res = error_body(StatusCode::UNAUTHORIZED, message, errors::UNAUTHENTICATED);
    res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
    res
}

/// The longest `retryAfter` (seconds) among the response's `RATE_LIMITED`
/// errors, if it has any.
fn rate_limited(response: &BatchResponse) -> Option<u64> {
    let responses = match response {
        BatchResponse::Single(r) => std::slice::from_ref(r),
        BatchResponse::Batch(v) => v.as_slice(),
    };
    responses
        .iter()
        .flat_map(|r| &r.errors)
        .filter_map(|e| e.extensions.as_ref())
        .filter(|x| matches!(x.get("code"), Some(async_graphql::Value::String(c)) if c == errors::RATE_LIMITED))
        .map(|x| match x.get(errors::RETRY_AFTER) {
            Some(async_graphql::Value::Number(n)) => n.as_u64().unwrap_or(1),
            _ => 1,
        })
        .max()
}

async fn execute(
    state: &HttpState,
    headers: &HeaderMap,
    client: ClientAddr,
    batch: BatchRequest,
    key: Option<responses::Key>,
) -> Response {
    let modern = wants_graphql_response(headers);
    let identity = match authorization(headers).and_then(|bearer| state.auth.authenticate(bearer)) {
        Ok(i) => i,
        Err(e) => return unauthorized(&e.to_string()),
    };
    if let Err(e) = state.documents.check_request(&batch) {
        // the whole batch is refused before any of it runs
        let refused = |_| async_graphql::Response::from_errors(vec![e.clone()]);
        let response = match &batch {
            BatchRequest::Single(_) => BatchResponse::Single(refused(())),
            BatchRequest::Batch(v) => BatchResponse::Batch(v.iter().map(|_| refused(())).collect()),
        };
        let status = if modern { StatusCode::BAD_REQUEST } else { StatusCode::OK };
        return caching::not_public(caching::Verdict::NoStore, graphql_response(status, modern, &response));
    }
    // timed per operation by the schema's document stage (graphql::documents)
    let catalog = caching::CatalogOnly::default();
    let ticket = state.responses.ticket();
    let batch = batch.data(identity).data(client).data(catalog.clone());
    let response = match batch {
        BatchRequest::Single(request) => {
            match state.documents.run_known(&state.known_schema, request, &catalog).await {
                Ok(response) => BatchResponse::Single(response),
                Err(request) => BatchResponse::Single(state.schema.execute(request).await),
            }
        }
        batch => state.schema.execute_batch(batch).await,
    };
    if let Some(secs) = rate_limited(&response) {
        let mut res = (StatusCode::TOO_MANY_REQUESTS, Json(response)).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, content_type(modern));
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return caching::not_public(caching::Verdict::NoStore, res);
    }
    let cache = caching::verdict(&identity, &response, &catalog);
    if cache == caching::Verdict::Public {
        let Some(body) = graphql_body(&response) else {
            return caching::not_public(caching::Verdict::NoStore, too_large());
        };
        let tag = caching::etag(&body);
        if let Some(key) = key {
            state.responses.put(key, ticket, body.clone(), tag.clone());
        }
        return caching::public(&state.catalog_cache_control, headers, content_type(modern), body, tag, Duration::ZERO);
    }
    let request_error = match &response {
        BatchResponse::Single(r) => {
            r.data == async_graphql::Value::Null && r.errors.iter().all(|e| e.path.is_empty()) && r.is_err()
        }
        BatchResponse::Batch(_) => false,
    };
    let status = if modern && request_error { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    caching::not_public(cache, graphql_response(status, modern, &response))
}

/// The server's cache key for an anonymous request, when the cache is on.
fn cache_key(state: &HttpState, headers: &HeaderMap, get: bool, request: Bytes) -> Option<responses::Key> {
    (state.responses.enabled() && !headers.contains_key(header::AUTHORIZATION)).then(|| responses::Key {
        get,
        modern: wants_graphql_response(headers),
        request,
    })
}

/// The stored answer to an anonymous catalog request, if fresh.
fn cached(state: &HttpState, headers: &HeaderMap, key: Option<&responses::Key>) -> Option<Response> {
    let hit = state.responses.get(key?)?;
    telemetry::catalog_cache_hit();
    let content_type = content_type(key?.modern);
    Some(caching::public(&state.catalog_cache_control, headers, content_type, hit.body, hit.etag, hit.age))
}

fn content_type(modern: bool) -> HeaderValue {
    HeaderValue::from_static(if modern { "application/graphql-response+json" } else { "application/json" })
}

/// A GraphQL response as the client asked for it, refused with a coded
/// error if its body would pass [`MAX_RESPONSE_BYTES`].
fn graphql_response(status: StatusCode, modern: bool, response: &BatchResponse) -> Response {
    let Some(body) = graphql_body(response) else { return too_large() };
    let mut res = (status, body).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, content_type(modern));
    res
}

/// The JSON body of a response; `None` past [`MAX_RESPONSE_BYTES`].
fn graphql_body(response: &BatchResponse) -> Option<Bytes> {
    // room for a typical answer up front: serde_json writes token by token,
    // and growing from empty reallocates several times per response
    let mut body = BoundedBody(Vec::with_capacity(512));
    serde_json::to_writer(&mut body, response).ok()?;
    Some(Bytes::from(body.0))
}

fn too_large() -> Response {
    telemetry::response_too_large();
    let message =
        format!("the response would exceed {MAX_RESPONSE_BYTES} bytes; ask for smaller pages or fewer fields");
    error_body(StatusCode::OK, &message, errors::QUERY_TOO_COMPLEX)
}

/// A response body that refuses to grow past [`MAX_RESPONSE_BYTES`].
struct BoundedBody(Vec<u8>);

impl std::io::Write for BoundedBody {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RESPONSE_BYTES {
            return Err(std::io::Error::other("response too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether a POST body's media type is JSON: `application/json` or
/// `application/graphql-response+json`, with at most a UTF-8 charset.
/// Anything else (`text/plain`, forms: what a browser may send cross-origin
/// without a preflight) is refused before the body is read.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let mut parts = value.split(';').map(str::trim);
    let media = parts.next().unwrap_or_default();
    let json = media.eq_ignore_ascii_case("application/json")
        || media.eq_ignore_ascii_case("application/graphql-response+json");
    json && parts.all(|p| {
        p.split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("charset") && v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        })
    })
}

pub(super) async fn post(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    if !is_json_content_type(req.headers()) {
        let mut res = error_body(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "POST bodies must be application/json (Content-Type: application/json)",
            errors::BAD_USER_INPUT,
        );
        res.headers_mut().insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        return res;
    }
    let (mut parts, body) = req.into_parts();
    // the body extractor needs only the extensions (the body limit), not the headers
    let headers = std::mem::take(&mut parts.headers);
    let body: Result<Bytes, BytesRejection> = Bytes::from_request(Request::from_parts(parts, body), &state).await;
    let body = match body {
        Ok(b) => b,
        // over MAX_BODY: 413, as a coded GraphQL error like every other refusal
        Err(rejection) => {
            let code = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                errors::QUERY_TOO_COMPLEX
            } else {
                errors::BAD_USER_INPUT
            };
            let message = format!("request body refused: {} (at most {MAX_BODY} bytes)", rejection.body_text());
            return error_body(rejection.status(), &message, code);
        }
    };
    let key = cache_key(&state, &headers, false, body.clone());
    if let Some(hit) = cached(&state, &headers, key.as_ref()) {
        return hit;
    }
    let batch = match batch_request(&body) {
        Ok(b) => b,
        Err(e) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                &format!("malformed GraphQL request body: {e}"),
                errors::BAD_USER_INPUT,
            )
        }
    };
    if let BatchRequest::Batch(v) = &batch {
        if v.len() > MAX_BATCH || v.is_empty() {
            return error_body(
                StatusCode::BAD_REQUEST,
                &format!("a batch must hold 1 to {MAX_BATCH} operations"),
                errors::QUERY_TOO_COMPLEX,
            );
        }
    }
    let client = client(&state, &headers, addr);
    execute(&state, &headers, client, batch, key).await
}

/// A POST body as the engine's batch request. A body that is one JSON
/// object is read straight into one request: the untagged `BatchRequest`
/// first buffers the whole document as generic content, then tries each
/// variant on it. Anything else, and an object that does not read as a
/// request, takes the engine's own path, so its answer and errors are
/// unchanged.
fn batch_request(body: &[u8]) -> serde_json::Result<BatchRequest> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        if let Ok(single) = serde_json::from_slice::<async_graphql::Request>(body) {
            return Ok(BatchRequest::Single(single));
        }
    }
    serde_json::from_slice(body)
}

/// `GET /graphql`: a websocket upgrade, or a query in the query string.
pub(super) async fn get(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let (mut parts, _) = req.into_parts();
    let is_upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_upgrade {
        let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &state).await {
            Ok(u) => u,
            Err(rejection) => return rejection.into_response(),
        };
        let client = client(&state, &parts.headers, addr);
        return websocket(state, client, upgrade, Protocol::preferred(&parts.headers));
    }
    let query = parts.uri.query().unwrap_or_default();
    let key = cache_key(&state, &parts.headers, true, Bytes::copy_from_slice(query.as_bytes()));
    if let Some(hit) = cached(&state, &parts.headers, key.as_ref()) {
        return hit;
    }
    let request = match parse_query_string(query) {
        Ok(r) => r,
        Err(e) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                &format!("malformed GraphQL query string: {e}"),
                errors::BAD_USER_INPUT,
            )
        }
    };
    if crate::graphql::persisted::runs_mutation(&request) {
        let mut res =
            error_body(StatusCode::METHOD_NOT_ALLOWED, "mutations must be sent with POST", errors::BAD_USER_INPUT);
        res.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return res;
    }
    let client = client(&state, &parts.headers, addr);
    let request = request.data(crate::graphql::persisted::SafeMethod);
    execute(&state, &parts.headers, client, BatchRequest::Single(request), key).await
}

fn websocket(
    state: Arc<HttpState>,
    client: ClientAddr,
    upgrade: WebSocketUpgrade,
    preferred: Option<&'static str>,
) -> Response {
    // Small buffers: they are allocated per connection up front, and
    // subscription traffic is small messages (tungstenite's default is 128 KiB).
    // The read buffer is zeroed before every read attempt, so it is smaller
    // still: clients send a few short messages (a longer one takes a few reads).
    // Writes are flushed per message, except frames that were ready together
    // (`ws`), which share a write up to this size.
    let upgrade = upgrade
        .protocols(preferred)
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .read_buffer_size(512)
        .write_buffer_size(8 * 1024);
    let protocol = Protocol::from_name(upgrade.selected_protocol().and_then(|p| p.to_str().ok()).unwrap_or_default());
    // per client (whom a trusted proxy names), like every other per-client limit
    let permit = state.ws_permits.try_acquire(client.0);
    upgrade.on_upgrade(move |mut socket| async move {
        let _permit = match permit {
            Ok(p) => p,
            Err(why) => {
                use axum::extract::ws::{CloseFrame, Message};
                let (reason, label) = match why {
                    Refused::PerAddress => ("too many websockets from this address; try again later", "per_address"),
                    Refused::Total => ("connection limit reached; try again later", "total"),
                };
                telemetry::ws_closed(label);
                let _ = socket.send(Message::Close(Some(CloseFrame { code: 1013, reason: reason.into() }))).await;
                return;
            }
        };
        let (schema, auth, settings, shutdown) =
            (state.schema.clone(), state.auth.clone(), state.ws.clone(), state.shutdown.clone());
        ws::serve(socket, protocol, schema, auth, client, settings, shutdown).await;
    })
}

//! Cross-origin access to `/graphql` for browser storefronts on other
//! origins (`CORS_ALLOWED_ORIGINS`): preflight answers, `Access-Control-*`
//! headers for allowed origins, nothing at all for the others.
//!
//! Written out rather than tower-http's `CorsLayer`, which answers every
//! `OPTIONS` with its method and header lists whatever the origin: the
//! contract says other origins get no CORS headers.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

/// How long a browser may reuse a preflight answer.
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);
const ALLOW_METHODS: &str = "GET, POST";
const ALLOW_HEADERS: &str = "content-type, authorization";
/// Headers a page may read: validators and the refusal details.
const EXPOSE_HEADERS: &str = "etag, retry-after, www-authenticate";

/// Which origins may call `/graphql` from a browser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `*`: every origin (no credentials are involved: tokens are bearer headers).
    Any,
    /// Exact origins (`https://shop.example.com`), compared as browsers send them.
    List(Vec<String>),
}

impl AllowedOrigins {
    /// Parses `CORS_ALLOWED_ORIGINS`: `*`, or comma-separated origins.
    pub fn parse(raw: &str) -> Result<AllowedOrigins, String> {
        let items: Vec<&str> = raw.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        if items.is_empty() {
            return Err("expected `*` or comma-separated origins like https://shop.example.com".into());
        }
        if items.contains(&"*") {
            return if items.len() == 1 {
                Ok(AllowedOrigins::Any)
            } else {
                Err("`*` cannot be combined with origins".into())
            };
        }
        items.into_iter().map(origin).collect::<Result<_, _>>().map(AllowedOrigins::List)
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::List(list) => list.iter().any(|o| o == origin),
        }
    }
}

/// One origin in the form browsers send it: `scheme://host[:port]`, lowercase, no path.
fn origin(raw: &str) -> Result<String, String> {
    let url =
        url::Url::parse(raw).map_err(|_| format!("invalid origin {raw:?} (expected e.g. https://shop.example.com)"))?;
    let bare = url.path() == "/" && url.query().is_none() && url.fragment().is_none();
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || !bare || !url.username().is_empty() {
        return Err(format!("invalid origin {raw:?} (expected scheme://host[:port] without a path)"));
    }
    Ok(url.origin().ascii_serialization())
}

/// The middleware on `/graphql`; `None` (the setting unset) passes everything through untouched.
pub async fn layer(State(allowed): State<Option<Arc<AllowedOrigins>>>, req: Request, next: Next) -> Response {
    let Some(allowed) = allowed else { return next.run(req).await };
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let permitted = origin.as_deref().filter(|o| allowed.allows(o)).map(str::to_owned);
    if req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return preflight(&allowed, permitted.as_deref());
    }
    let mut res = next.run(req).await;
    decorate(res.headers_mut(), &allowed, permitted.as_deref());
    if permitted.is_some() {
        res.headers_mut().insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
    }
    res
}

/// 204 with the allowed methods and headers, or 403 with no CORS header.
fn preflight(allowed: &AllowedOrigins, permitted: Option<&str>) -> Response {
    let mut res = if permitted.is_some() { StatusCode::NO_CONTENT } else { StatusCode::FORBIDDEN }.into_response();
    let headers = res.headers_mut();
    decorate(headers, allowed, permitted);
    if permitted.is_some() {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(PREFLIGHT_MAX_AGE.as_secs()));
    }
    res
}

/// `Access-Control-Allow-Origin` for a permitted origin. With a list, every
/// response also varies on `Origin`: a shared cache must not hand one
/// origin's answer (with or without the header) to another.
fn decorate(headers: &mut HeaderMap, allowed: &AllowedOrigins, permitted: Option<&str>) {
    if let AllowedOrigins::List(_) = allowed {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    let value = match (allowed, permitted) {
        (AllowedOrigins::Any, Some(_)) => HeaderValue::from_static("*"),
        (AllowedOrigins::List(_), Some(o)) => match HeaderValue::from_str(o) {
            Ok(v) => v,
            Err(_) => return,
        },
        (_, None) => return,
    };
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalised_and_validated() {
        let parsed = AllowedOrigins::parse("https://Shop.Example.com/, http://localhost:5173").unwrap();
        assert_eq!(
            parsed,
            AllowedOrigins::List(vec!["https://shop.example.com".into(), "http://localhost:5173".into()])
        );
        assert_eq!(AllowedOrigins::parse(" * ").unwrap(), AllowedOrigins::Any);
        assert!(AllowedOrigins::parse("*, https://a.example").is_err());
        assert!(AllowedOrigins::parse("https://a.example/shop").is_err());
        assert!(AllowedOrigins::parse("shop.example.com").is_err());
        assert!(AllowedOrigins::parse(" , ").is_err());
    }
}

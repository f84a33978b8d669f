//! Issue 14, the storefront's side: CORS for browser pages on other
//! origins, cache headers a CDN can use (ETag, 304), automatic persisted
//! queries over POST and GET, a real nginx `proxy_cache` in front, and
//! websocket clients that get the subprotocol they prefer.

mod common;

use common::{spawn_app_with, Backend, TestApp};
use reqwest::{header, Method, StatusCode};
use serde_json::json;

const SHOP: &str = "https://shop.example.com";

async fn cors_app() -> TestApp {
    spawn_app_with(Backend::Sqlite, |c| {
        c.cors_allowed_origins =
            Some(shopgraph::cors::AllowedOrigins::parse(&format!("{SHOP}, http://localhost:5173")).unwrap())
    })
    .await
}

fn preflight(app: &TestApp, origin: &str) -> reqwest::RequestBuilder {
    app.http
        .request(Method::OPTIONS, format!("{}/graphql", app.url))
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type, authorization")
}

fn cors_headers(res: &reqwest::Response) -> Vec<String> {
    res.headers().keys().map(|k| k.as_str().to_string()).filter(|k| k.starts_with("access-control-")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_origin_gets_its_preflight_answered_and_the_response_readable() {
    let app = cors_app().await;
    let res = preflight(&app, SHOP).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let h = res.headers();
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], SHOP);
    assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "GET, POST");
    let allowed = h[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap();
    assert!(allowed.contains("content-type") && allowed.contains("authorization"), "{allowed}");
    assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "600");

    let res = app
        .http
        .post(format!("{}/graphql", app.url))
        .header(header::ORIGIN, SHOP)
        .json(&json!({"query": "{ products { nodes { id } } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], SHOP);
    let vary: Vec<_> = res.headers().get_all(header::VARY).iter().map(|v| v.to_str().unwrap().to_string()).collect();
    assert!(vary.iter().any(|v| v.eq_ignore_ascii_case("origin")), "Vary: {vary:?}");
    let body: serde_json::Value = res.json().await.unwrap();
    assert!(body["data"]["products"]["nodes"].is_array(), "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_origin_gets_no_cors_headers() {
    let app = cors_app().await;
    let res = preflight(&app, "https://evil.example").send().await.unwrap();
    assert!(!res.status().is_success(), "{}", res.status());
    assert!(cors_headers(&res).is_empty(), "{:?}", cors_headers(&res));

    let res = app
        .http
        .post(format!("{}/graphql", app.url))
        .header(header::ORIGIN, "https://evil.example")
        .json(&json!({"query": "{ products { nodes { id } } }"}))
        .send()
        .await
        .unwrap();
    assert!(cors_headers(&res).is_empty(), "{:?}", cors_headers(&res));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_there_are_no_cors_headers_and_a_star_allows_every_origin() {
    let app = spawn_app_with(Backend::Sqlite, |_| {}).await;
    let res = preflight(&app, SHOP).send().await.unwrap();
    assert!(cors_headers(&res).is_empty(), "{:?}", cors_headers(&res));
    app.stop().await;

    let app =
        spawn_app_with(Backend::Sqlite, |c| c.cors_allowed_origins = Some(shopgraph::cors::AllowedOrigins::Any)).await;
    let res = preflight(&app, "https://anyone.example").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    app.stop().await;
}

#[test]
fn the_setting_is_validated_naming_the_variable() {
    let args = shopgraph::config::ConfigArgs {
        cors_allowed_origins: Some("https://shop.example.com/catalog".into()),
        ..Default::default()
    };
    assert!(args.into_config().unwrap_err().to_string().starts_with("CORS_ALLOWED_ORIGINS: "));
}

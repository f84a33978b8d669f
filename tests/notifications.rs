//! Managed Redis that refuses `CONFIG` (`rename-command CONFIG ""`), tried
//! as a deployment would run it: with `notify-keyspace-events Ex` preset by
//! the operator everything works and nothing is said about notifications;
//! without it the server finds out, says so once (WARN, with the fix), in
//! `/readyz` and a gauge, and orders are still cancelled on time.

mod common;

use std::time::Duration;

use common::{
    child::{metric, ChildServer},
    redis::PrivateRedis,
    ws::WsClient,
    ADMIN, JWT_SECRET,
};
use serde_json::{json, Value};

const NO_CONFIG: [&str; 3] = ["--rename-command", "CONFIG", ""];

/// The binary on `redis`, SQLite in `dir`, 1 s orders, a sweep once an hour
/// (so only expiry events or the nudger's fallback can cancel in time).
async fn server(redis: &PrivateRedis, dir: &tempfile::TempDir) -> ChildServer {
    ChildServer::start(&[
        ("DATABASE_URL", format!("sqlite://{}", dir.path().join("t.db").display())),
        ("REDIS_URL", redis.url.clone()),
        ("REDIS_KEY_PREFIX", common::unique_prefix()),
        ("ORDER_TTL", "1s".into()),
        ("SWEEP_INTERVAL", "1h".into()),
        ("ADMIN_TOKEN", ADMIN.into()),
        ("JWT_SECRET", JWT_SECRET.into()),
        ("AUTH_RATE_LIMIT", "10000".into()),
        ("LOG_FORMAT", "json".into()),
    ])
    .await
}

/// `/readyz` once the self-check has answered: (status, body).
async fn readiness(s: &ChildServer) -> (u16, Value) {
    common::eventually(Duration::from_secs(10), || async {
        let res = s.http.get(format!("{}/readyz", s.url)).send().await.ok()?;
        let status = res.status().as_u16();
        let body: Value = res.json().await.ok()?;
        (body["expiryEvents"] != "checking").then_some((status, body))
    })
    .await
}

/// Places an order for one unit of a new product; returns its id.
async fn place_order(s: &ChildServer) -> String {
    let p = s.create_product(&uuid::Uuid::new_v4().simple().to_string(), 100, 5).await;
    let (token, _) = s.customer().await;
    s.order_id(&token, &[(&p, 1)]).await
}

/// Waits for the order to be cancelled; returns how long after its
/// deadline that happened.
async fn cancelled_after_deadline(s: &ChildServer, id: &str) -> chrono::Duration {
    let o = common::eventually(Duration::from_secs(10), || async {
        let d = s
            .data(
                Some(ADMIN),
                "query($id: ID!) { order(id: $id) { status cancelReason expiresAt cancelledAt } }",
                json!({"id": id}),
            )
            .await;
        (d["order"]["status"] == "CANCELLED").then(|| d["order"].clone())
    })
    .await;
    assert_eq!(o["cancelReason"], "EXPIRED", "{o}");
    let at = |f: &str| chrono::DateTime::parse_from_rfc3339(o[f].as_str().unwrap()).unwrap();
    at("cancelledAt") - at("expiresAt")
}

/// Log lines at `level` that talk about keyspace notifications.
fn notification_lines(logs: &str, level: &str) -> Vec<String> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["level"] == level)
        .map(|l| l["fields"]["message"].as_str().unwrap_or_default().to_string())
        .filter(|m| m.contains("notify-keyspace-events") || m.contains("expired-key events") || m.contains("CONFIG"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_refused_with_notifications_preset_works_as_usual_and_says_nothing_alarming() {
    let redis = PrivateRedis::start(&[&NO_CONFIG[..], &["--notify-keyspace-events", "Ex"]].concat()).await;
    let dir = tempfile::tempdir().unwrap();
    let s = server(&redis, &dir).await;
    let (status, body) = readiness(&s).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expiryEvents"], "arriving", "{body}");
    assert_eq!(metric(&s.metrics().await, "shopgraph_expiry_events_arriving"), Some(1.0));

    let id = place_order(&s).await;
    let lag = cancelled_after_deadline(&s, &id).await;
    assert!(lag.num_milliseconds() < 1000, "cancelled {lag} after the deadline");

    let logs = s.logs();
    for level in ["WARN", "ERROR"] {
        let lines = notification_lines(&logs, level);
        assert!(lines.is_empty(), "{level} lines about notifications: {lines:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_refused_without_notifications_is_reported_and_orders_still_cancel_on_time() {
    let redis = PrivateRedis::start(&NO_CONFIG).await;
    let dir = tempfile::tempdir().unwrap();
    let s = server(&redis, &dir).await;
    let (status, body) = readiness(&s).await;
    // orders are still cancelled on time, so the instance stays ready
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expiryEvents"], "missing", "{body}");
    assert_eq!(metric(&s.metrics().await, "shopgraph_expiry_events_arriving"), Some(0.0));

    let mut ws = WsClient::init(&s.ws_url, "graphql-transport-ws", Some(ADMIN)).await;
    ws.subscribe("all", "subscription { orderCancelled { reason order { id status } } }", json!({})).await;
    ws.send(json!({"type": "ping"})).await;
    let ids = [place_order(&s).await, place_order(&s).await];
    for id in &ids {
        let lag = cancelled_after_deadline(&s, id).await;
        // generous for a loaded machine, and far below the hour-long sweep
        assert!(lag.num_milliseconds() < 3000, "cancelled {lag} after the deadline");
    }
    let events = ws.cancellations_until(Duration::from_secs(10), |seen| seen.len() >= ids.len()).await;
    for id in &ids {
        assert_eq!(events[id]["reason"], "EXPIRED");
    }

    let logs = s.logs();
    let warnings = notification_lines(&logs, "WARN");
    assert_eq!(warnings.len(), 1, "one warning about notifications: {warnings:?}");
    assert!(warnings[0].contains("notify-keyspace-events Ex"), "the warning names the fix: {}", warnings[0]);
    let errors = notification_lines(&logs, "ERROR");
    assert!(errors.is_empty(), "{errors:?}");
}

/// Notifications turned on later (here through CONFIG under another name,
/// as an operator's console would) are noticed at the next re-check, within
/// about 30 s, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_turned_on_later_are_noticed() {
    let secret = format!("config-{}", uuid::Uuid::new_v4().simple());
    let redis = PrivateRedis::start(&["--rename-command", "CONFIG", &secret]).await;
    let dir = tempfile::tempdir().unwrap();
    let s = server(&redis, &dir).await;
    assert_eq!(readiness(&s).await.1["expiryEvents"], "missing");
    let mut conn = redis.conn().await;
    let _: () =
        redis::cmd(&secret).arg("SET").arg("notify-keyspace-events").arg("Ex").query_async(&mut conn).await.unwrap();
    common::eventually(Duration::from_secs(40), || async {
        let body: Value = s.http.get(format!("{}/readyz", s.url)).send().await.ok()?.json().await.ok()?;
        (body["expiryEvents"] == "arriving").then_some(())
    })
    .await;
    assert_eq!(metric(&s.metrics().await, "shopgraph_expiry_events_arriving"), Some(1.0));
    let id = place_order(&s).await;
    assert!(cancelled_after_deadline(&s, &id).await.num_milliseconds() < 1000);
    let infos = notification_lines(&s.logs(), "INFO");
    assert!(infos.iter().any(|m| m.contains("again")), "{infos:?}");
}

//! Connections as an attacker holds them: heads that never end, idle
//! keep-alives, many sockets from one address, idle anonymous websockets,
//! and websockets that outlive their token.
//!
//! Two client addresses: 127.0.0.1 and 127.0.0.2 (both loopback on Linux);
//! a client socket is bound to the second with tokio's `TcpSocket`.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::{
    client_async,
    tungstenite::{client::IntoClientRequest, http::HeaderValue},
    MaybeTlsStream,
};

use crate::common::{self, ws::WsClient, Backend, TestApp, ADMIN};

const PROTOCOLS: [&str; 2] = ["graphql-transport-ws", "graphql-ws"];
const OTHER: &str = "127.0.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A TCP connection to the server from `from`.
async fn tcp_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(from), 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to)).await.expect("connect in time").expect("connect")
}

/// A websocket from `from`, upgraded but not initialised.
async fn ws_from(from: &str, app: &TestApp, protocol: &str) -> WsClient {
    let mut req = app.ws_url.as_str().into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(protocol).unwrap());
    let stream = tcp_from(from, app.addr).await;
    let (socket, _) = tokio::time::timeout(Duration::from_secs(5), client_async(req, MaybeTlsStream::Plain(stream)))
        .await
        .expect("upgrade in time")
        .expect("websocket upgrade");
    WsClient { socket, legacy: protocol == "graphql-ws" }
}

/// Sends `connection_init` and returns the answer (ack) or the close.
async fn init(c: &mut WsClient, token: Option<&str>) -> Result<Value, common::ws::Closed> {
    let payload = token.map_or(json!({}), |t| json!({"Authorization": format!("Bearer {t}")}));
    c.send(json!({"type": "connection_init", "payload": payload})).await;
    c.next_json().await
}

/// An HTTP client whose connections come from `from`.
fn http_from(from: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(ip(from)).build().unwrap()
}

async fn healthz(client: &reqwest::Client, app: &TestApp) -> reqwest::StatusCode {
    let res = tokio::time::timeout(Duration::from_secs(5), client.get(format!("{}/healthz", app.url)).send())
        .await
        .expect("served in time")
        .expect("served");
    res.status()
}

/// Reads until the server closes the connection (EOF or reset); returns
/// what it sent first. Panics if it stays open for `limit`.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.unwrap_or_else(|_| panic!("the connection stayed open for {limit:?}"));
    got
}

/// Sends one keep-alive request and reads its whole (small) response.
async fn request_on(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: shop\r\n\r\n").await.expect("request written");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"ok") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(n > 0, "closed before the response: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_that_never_ends_is_closed_and_another_client_is_still_served() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.http_header_timeout = Duration::from_secs(1)).await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        stalled.push(s);
    }
    // a slowloris: one more header byte every 200 ms never finishes either
    let mut trickle = TcpStream::connect(app.addr).await.unwrap();
    trickle.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();

    assert_eq!(healthz(&app.http, &app).await, 200, "another client is served meanwhile");

    let trickling = async {
        for _ in 0..50 {
            if trickle.write_all(b"X").await.is_err() {
                return;
            }
            let mut b = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(200), trickle.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => panic!("a trickled head was answered: {:?}", String::from_utf8_lossy(&b[..n])),
                Err(_) => {}
            }
        }
        panic!("a head trickled for 10 s is still open");
    };
    trickling.await;
    assert!(started.elapsed() < Duration::from_secs(4), "trickle closed after {:?}", started.elapsed());
    for s in &mut stalled {
        let answer = until_closed(s, Duration::from_secs(4)).await;
        assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&answer));
    }
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before the timeout: {:?}", started.elapsed());
    assert_eq!(healthz(&app.http, &app).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_outlives_the_header_timeout_and_ends_at_the_idle_timeout() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| {
        c.http_header_timeout = Duration::from_millis(500);
        c.http_idle_timeout = Duration::from_millis(2000);
    })
    .await;
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    assert!(request_on(&mut conn).await.starts_with("HTTP/1.1 200"));
    // idle for three header timeouts: still usable
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(request_on(&mut conn).await.starts_with("HTTP/1.1 200"), "idle keep-alive closed by the header timeout");

    // requests more often than the idle timeout keep it open past it
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(request_on(&mut conn).await.starts_with("HTTP/1.1 200"));
    }
    let idle_from = Instant::now();
    let rest = until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(1800), "closed after {idle:?} idle, before the idle timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_from_one_address_do_not_lock_out_another() {
    const CAP: usize = 8;
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.max_connections_per_ip = CAP).await;
    // HTTP and websocket connections count together
    let mut ws = WsClient::init(&app.ws_url, PROTOCOLS[0], None).await;
    let mut held = Vec::new();
    for _ in 0..CAP - 1 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        // served, so it has surely been accepted and counted
        request_on(&mut s).await;
        held.push(s);
    }

    let mut over = TcpStream::connect(app.addr).await.unwrap();
    let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    let answer = until_closed(&mut over, Duration::from_secs(5)).await;
    assert!(answer.is_empty(), "a connection over the cap was served: {:?}", String::from_utf8_lossy(&answer));

    // another address is served over HTTP and websocket
    assert_eq!(healthz(&http_from(OTHER), &app).await, 200);
    let mut other_ws = ws_from(OTHER, &app, PROTOCOLS[1]).await;
    assert_eq!(init(&mut other_ws, None).await.expect("acked")["type"], "connection_ack");
    // the held ones still work
    ws.barrier().await;
    request_on(&mut held[0]).await;

    // a closed connection gives its place back
    drop(held.pop());
    common::eventually(Duration::from_secs(5), || async {
        let mut s = TcpStream::connect(app.addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: shop\r\n\r\n").await.ok()?;
        let mut buf = [0u8; 12];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.ok()?.ok()?;
        (n > 0 && buf.starts_with(b"HTTP/1.1 200")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_wide_cap_closes_connections_over_it_at_accept() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.max_connections = Some(4)).await;
    let mut held = Vec::new();
    for from in ["127.0.0.1", "127.0.0.1", OTHER, OTHER] {
        let mut s = tcp_from(from, app.addr).await;
        request_on(&mut s).await;
        held.push(s);
    }
    let mut over = tcp_from("127.0.0.3", app.addr).await;
    let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nHost: shop\r\n\r\n").await;
    assert!(until_closed(&mut over, Duration::from_secs(5)).await.is_empty());
    drop(held);
    common::eventually(Duration::from_secs(5), || async {
        let status = http_from("127.0.0.3").get(format!("{}/healthz", app.url)).send().await.ok()?.status();
        (status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_only_its_share_of_websocket_slots() {
    // share by default: a quarter of WS_MAX_CONNECTIONS
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.ws_max_connections = 8).await;
    let mut mine = Vec::new();
    for protocol in PROTOCOLS {
        mine.push(WsClient::init(&app.ws_url, protocol, None).await);
    }
    for protocol in PROTOCOLS {
        let mut over = WsClient::connect(&app.ws_url, protocol).await;
        let closed = over.closed(Duration::from_secs(5)).await;
        assert_eq!(closed.code, 1013, "{protocol}: {closed:?}");
        assert!(closed.reason.contains("address"), "the close says why: {closed:?}");
    }
    // another address still gets its own share
    for protocol in PROTOCOLS {
        let mut other = ws_from(OTHER, &app, protocol).await;
        assert_eq!(init(&mut other, None).await.expect("acked")["type"], "connection_ack", "{protocol}");
        other.barrier().await;
    }
    for c in &mut mine {
        c.barrier().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_anonymous_websocket_is_closed_while_an_authenticated_one_stays() {
    let app =
        common::spawn_app_with(Backend::Sqlite, |c| c.ws_anonymous_idle_timeout = Duration::from_millis(800)).await;
    let (token, _) = app.customer().await;
    for protocol in PROTOCOLS {
        let mut anonymous = WsClient::init(&app.ws_url, protocol, None).await;
        let mut customer = WsClient::init(&app.ws_url, protocol, Some(&token)).await;
        let mut admin = WsClient::init(&app.ws_url, protocol, Some(ADMIN)).await;
        // running an operation is activity: the idle clock starts after it
        anonymous.barrier().await;
        let idle_from = Instant::now();
        let closed = anonymous.closed(Duration::from_secs(5)).await;
        assert_eq!(closed.code, 4408, "{protocol}: {closed:?}");
        assert!(closed.reason.to_lowercase().contains("idle"), "{closed:?}");
        assert!(idle_from.elapsed() >= Duration::from_millis(700), "closed after {:?}", idle_from.elapsed());

        customer.assert_silent(Duration::from_millis(1200)).await;
        customer.barrier().await;
        admin.barrier().await;
    }
}

/// The `exp` claim of a JWT (seconds since the epoch).
fn exp_of(token: &str) -> u64 {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    let claims: Value = serde_json::from_slice(&bytes).expect("JSON claims");
    claims["exp"].as_u64().expect("exp")
}

fn until(exp: u64) -> Duration {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(exp);
    at.duration_since(std::time::SystemTime::now()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_closed_with_4403_at_its_tokens_expiry() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.jwt_lifetime = Duration::from_secs(2)).await;
    let product = app.create_product("EXP-1", 500, 100).await;
    for protocol in PROTOCOLS {
        let (token, _) = app.customer().await;
        let order = app.order_id(&token, &[(&product, 1)]).await;
        let mut c = WsClient::init(&app.ws_url, protocol, Some(&token)).await;
        c.subscribe("live", "subscription($id: ID!) { orderUpdated(orderId: $id) { status } }", json!({"id": order}))
            .await;
        let first = c.next_data("live").await;
        assert_eq!(first["data"]["orderUpdated"]["status"], "PENDING_PAYMENT");

        let left = until(exp_of(&token));
        let closed = c.closed(left + Duration::from_secs(2)).await;
        assert_eq!(closed.code, 4403, "{protocol}: {closed:?}");
        assert!(until(exp_of(&token)).is_zero(), "closed before the token's exp");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_sent_after_the_tokens_expiry_is_not_run() {
    let app = common::spawn_app_with(Backend::Sqlite, |c| c.jwt_lifetime = Duration::from_secs(2)).await;
    let product = app.create_product("EXP-2", 500, 100).await;
    for protocol in PROTOCOLS {
        let (token, _) = app.customer().await;
        let order = app.order_id(&token, &[(&product, 1)]).await;
        let mut c = WsClient::init(&app.ws_url, protocol, Some(&token)).await;
        // the token is past its exp when the mutation is sent (the server
        // may or may not have closed the socket by then)
        tokio::time::sleep(until(exp_of(&token)) + Duration::from_millis(50)).await;
        let kind = if c.legacy { "start" } else { "subscribe" };
        let cancel = json!({"id": "late", "type": kind, "payload": {
            "query": "mutation($id: ID!) { cancelOrder(id: $id) { status } }", "variables": {"id": order}}});
        let _ = futures_util::SinkExt::send(
            &mut c.socket,
            tokio_tungstenite::tungstenite::Message::Text(cancel.to_string().into()),
        )
        .await;
        let closed = c.closed(Duration::from_secs(3)).await;
        assert_eq!(closed.code, 4403, "{protocol}: {closed:?}");
        assert_eq!(app.order(ADMIN, &order).await["status"], "PENDING_PAYMENT", "{protocol}: the late mutation ran");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_shutdown_is_answered_while_new_connections_are_refused() {
    let app = common::spawn_app(Backend::Sqlite).await;
    let addr = app.addr;
    let body = json!({"query": "{ products(first: 1) { pageInfo { hasNextPage } } }"}).to_string();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /graphql HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    // `100 Continue` comes once the handler reads the body: the request is
    // in flight (not merely queued in the kernel) before the stop
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&seen).contains("100 Continue\r\n\r\n") {
            let mut buf = [0u8; 256];
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before 100 Continue: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("100 Continue in time");
    conn.write_all(&body.as_bytes()[..10]).await.unwrap();

    let stopping = tokio::spawn(app.stop());
    // the listener is gone: the server is draining
    common::eventually(Duration::from_secs(5), || async { TcpStream::connect(addr).await.is_err().then_some(()) })
        .await;

    conn.write_all(&body.as_bytes()[10..]).await.unwrap();
    let answer = String::from_utf8_lossy(&until_closed(&mut conn, Duration::from_secs(10)).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("hasNextPage"), "{answer}");
    tokio::time::timeout(Duration::from_secs(15), stopping).await.expect("stopped in time").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_the_connection_settings_from_its_environment() {
    let db = common::fresh_db(Backend::Sqlite).await;
    let server = common::child::ChildServer::start(&[
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", common::redis_url().await),
        ("REDIS_KEY_PREFIX", common::unique_prefix()),
        ("HTTP_HEADER_TIMEOUT", "1s".into()),
        ("WS_ANONYMOUS_IDLE_TIMEOUT", "1s".into()),
    ])
    .await;
    let addr: SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    until_closed(&mut stalled, Duration::from_secs(4)).await;
    assert!(started.elapsed() >= Duration::from_millis(900), "closed after {:?}", started.elapsed());

    let mut anonymous = WsClient::init(&server.ws_url, PROTOCOLS[0], None).await;
    assert_eq!(anonymous.closed(Duration::from_secs(4)).await.code, 4408);
}

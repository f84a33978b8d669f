//! Finding Redis at start: `REDIS_URL`, else the default address, else a
//! private `redis-server` child on a free port (no persistence), stopped
//! with the process.

use std::{process::Stdio, time::Duration};

use tokio::process::{Child, Command};
use tracing::info;

use crate::{
    config::DEFAULT_REDIS_URL,
    redis_client::{self, TrustedCa},
};

/// A `redis-server` this process started; killed when dropped.
pub struct PrivateRedis {
    pub url: String,
    _child: Child,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    #[error("REDIS_URL: cannot reach Redis at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("REDIS_URL is not set, nothing answers at {DEFAULT_REDIS_URL}, and redis-server is not on PATH: install Redis (e.g. `apt-get install redis-server` or `brew install redis`) or set REDIS_URL")]
    NoServer,
    #[error("could not start a private redis-server: {0}")]
    Spawn(String),
    #[error("REDIS_TLS_CA_FILE: {0}")]
    TlsCa(String),
}

pub async fn ping(url: &str) -> Result<(), String> {
    ping_with(url, None).await
}

/// PINGs `url` within 2 s; over TLS trusting `ca` too.
pub async fn ping_with(url: &str, ca: Option<&TrustedCa>) -> Result<(), String> {
    let client = redis_client::client(url, ca).map_err(|e| e.to_string())?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// The Redis URL to use, and the private server if one had to be started.
pub async fn resolve(configured: Option<&str>) -> Result<(String, Option<PrivateRedis>), RedisStartError> {
    resolve_with(configured, None).await
}

/// Like [`resolve`]; a configured `rediss://` URL is tried trusting `ca` too.
pub async fn resolve_with(
    configured: Option<&str>,
    ca: Option<&TrustedCa>,
) -> Result<(String, Option<PrivateRedis>), RedisStartError> {
    if let Some(url) = configured {
        return match ping_with(url, ca).await {
            Ok(()) => Ok((url.to_string(), None)),
            Err(e) => {
                let reason = format!("{e}{}", redis_client::tls_hint(url, &e));
                Err(RedisStartError::Unreachable { url: crate::config::redact_url(url), reason })
            }
        };
    }
    if ping(DEFAULT_REDIS_URL).await.is_ok() {
        return Ok((DEFAULT_REDIS_URL.to_string(), None));
    }
    let private = start_private().await?;
    info!(url = %private.url, "no Redis at {DEFAULT_REDIS_URL}: started a private redis-server (no persistence), stopped on exit");
    Ok((private.url.clone(), Some(private)))
}

/// Starts `redis-server` on a free loopback port and waits until it answers.
pub async fn start_private() -> Result<PrivateRedis, RedisStartError> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| RedisStartError::Spawn(e.to_string()))?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--notify-keyspace-events", "Ex"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RedisStartError::NoServer,
            _ => RedisStartError::Spawn(e.to_string()),
        })?;
    let url = format!("redis://127.0.0.1:{port}/0");
    for _ in 0..100 {
        if ping(&url).await.is_ok() {
            return Ok(PrivateRedis { url, _child: child });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(RedisStartError::Spawn(format!("redis-server on port {port} did not answer")))
}

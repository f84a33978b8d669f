//! Finding Redis at start: `REDIS_URL`, else the default address, else a
//! private `redis-server` child on a free port (no persistence), stopped
//! with the process: when it drops its [`PrivateRedis`], and on Linux also
//! when it is killed outright (SIGKILL, OOM), through `PR_SET_PDEATHSIG`.

use std::{
    process::{Child, Command, Stdio},
    sync::{mpsc, OnceLock},
    time::Duration,
};

use tracing::info;

use crate::{
    config::DEFAULT_REDIS_URL,
    redis::{
        client::{self, TrustedCa},
        sentinel,
    },
};

/// A `redis-server` this process started; killed when dropped.
pub struct PrivateRedis {
    pub url: String,
    child: Child,
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// How long a start-up PING may take before Redis counts as unreachable.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// PINGs `url` within [`PING_TIMEOUT`]; over TLS trusting `ca` too. For a
/// Sentinel URL: a sentinel names a primary and that node says it is one.
pub async fn ping_with(url: &str, ca: Option<&TrustedCa>) -> Result<(), String> {
    if sentinel::is_sentinel(url) {
        let resolver = sentinel::Resolver::new(sentinel::SentinelUrl::parse(url)?, ca)?;
        return resolver.resolve().await.map(|_| ());
    }
    let client = client::client(url, ca).map_err(|e| e.to_string())?;
    let attempt = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(PING_TIMEOUT, attempt).await {
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
                let reason = format!("{e}{}", client::tls_hint(url, &e));
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
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--notify-keyspace-events", "Ex"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = spawn_tied(cmd).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => RedisStartError::NoServer,
        _ => RedisStartError::Spawn(e.to_string()),
    })?;
    // dropped on the way out, so a server that never answers is stopped too
    let private = PrivateRedis { url: format!("redis://127.0.0.1:{port}/0"), child };
    for _ in 0..100 {
        if ping(&private.url).await.is_ok() {
            return Ok(private);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(RedisStartError::Spawn(format!("redis-server on port {port} did not answer")))
}

type SpawnJob = (Command, tokio::sync::oneshot::Sender<std::io::Result<Child>>);

/// Spawns `cmd` as a child that dies with this process. Linux sends the
/// parent-death signal when the *thread* that forked the child ends, not
/// the process, so every such child is forked by one thread that lives as
/// long as the process (a runtime's worker or a test's thread may end
/// first and would take the server with it).
async fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
    die_with_parent(&mut cmd);
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("the child-spawner thread starts");
        tx
    });
    let (reply, spawned) = tokio::sync::oneshot::channel();
    spawner.send((cmd, reply)).map_err(|_| std::io::Error::other("the child-spawner thread is gone"))?;
    spawned.await.map_err(|_| std::io::Error::other("the child-spawner thread is gone"))?
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure makes only async-signal-safe
    // calls (prctl, getppid) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // the parent died before prctl took effect: no signal will come
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Elsewhere the child is stopped when [`PrivateRedis`] drops, not when
/// this process is killed.
#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

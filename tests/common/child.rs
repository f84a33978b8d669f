//! The real `shopgraph` binary as a child process, configured by environment
//! variables like a deployment: its own stdout (the `listening on` line),
//! its stderr in a file (the logs), its own `/metrics`, killable with SIGKILL.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::Client;

/// Every setting the binary reads, cleared from the inherited environment so
/// that only what a test passes applies.
const SETTINGS: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_READ_URL",
    "DATABASE_READ_MAX_LAG",
    "REDIS_URL",
    "REDIS_TLS_CA_FILE",
    "REDIS_KEY_PREFIX",
    "LISTEN_ADDR",
    "ORDER_TTL",
    "SWEEP_INTERVAL",
    "ADMIN_TOKEN",
    "JWT_SECRET",
    "JWT_LIFETIME",
    "DB_MAX_CONNECTIONS",
    "DB_TIMEOUT",
    "NUDGE_INTERVAL",
    "WS_MAX_CONNECTIONS",
    "WS_MAX_SUBSCRIPTIONS",
    "WS_INIT_TIMEOUT",
    "WS_KEEPALIVE",
    "REQUEST_TIMEOUT",
    "INTROSPECTION",
    "DEMO_DIR",
    "AUTH_RATE_LIMIT",
    "LOG_FORMAT",
    "TRUSTED_PROXIES",
    "LOGIN_RATE_LIMIT_PER_ACCOUNT",
    "MAX_PENDING_ORDERS",
    "MAX_PENDING_UNITS",
    "ORDER_RATE_LIMIT",
    "CORS_ALLOWED_ORIGINS",
    "CATALOG_MAX_AGE",
    "CATALOG_CACHE_TTL",
    "METRICS_TOKEN",
    "GRAPHIQL",
    "RUST_LOG",
    "HTTP_HEADER_TIMEOUT",
    "HTTP_IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_IP",
    "WS_MAX_CONNECTIONS_PER_IP",
    "WS_ANONYMOUS_IDLE_TIMEOUT",
];

/// A child process; its [`Client`] (`url`, `ws_url`, `http` and the request
/// helpers [`super::TestApp`] has) through `Deref`.
pub struct ChildServer {
    pub client: Client,
    pub pid: u32,
    child: Option<Child>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildServer {
    /// Starts `shopgraph serve` on a free port with these settings on top of
    /// `LISTEN_ADDR=127.0.0.1:0`, `RUST_LOG=info` and
    /// `METRICS_TOKEN=`[`super::METRICS_TOKEN`]; returns once it printed
    /// `listening on http://…`.
    pub async fn start(env: &[(&str, String)]) -> ChildServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let stderr = dir.path().join("stderr.log");
        let mut cmd = command(Command::new(BIN), env);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("the shopgraph binary starts");
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // reads to the end, so the child never blocks on a full pipe
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        // owned (and so killed on drop) before the first await: a start
        // dropped half-way, by a panic or a sibling failing in a `join!`,
        // leaves no server behind
        let mut server = ChildServer { client: Client::new(String::new()), pid, child: Some(child), stderr, _dir: dir };
        let url = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .expect("reader thread")
            .unwrap_or_else(|_| panic!("the child did not print `listening on`; stderr:\n{}", server.logs()));
        server.client = Client::new(url);
        server
    }

    /// Everything the child wrote to stderr so far.
    pub fn logs(&self) -> String {
        read(&self.stderr)
    }

    /// SIGKILL: no shutdown of any kind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits (at most 20 s) for the exit; true when it exited 0.
    pub async fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let status = tokio::task::spawn_blocking(move || {
            for _ in 0..400 {
                if let Ok(Some(s)) = c.try_wait() {
                    return Some(s);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            None
        })
        .await
        .unwrap();
        status.is_some_and(|s| s.success())
    }
}

impl std::ops::Deref for ChildServer {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_shopgraph");

/// `cmd` with every setting cleared from the inherited environment, then
/// `LISTEN_ADDR=127.0.0.1:0`, `RUST_LOG=info`, the test `METRICS_TOKEN`,
/// and `env` on top.
pub fn command(mut cmd: Command, env: &[(&str, String)]) -> Command {
    for var in SETTINGS {
        cmd.env_remove(var);
    }
    cmd.env("LISTEN_ADDR", "127.0.0.1:0").env("RUST_LOG", "info").env("METRICS_TOKEN", super::METRICS_TOKEN);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// What a run of the binary that is expected to stop by itself left.
pub struct Exit {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` and the settings of [`command`] until it
/// exits; panics if it is still running after 20 s (it accepted what it
/// should have refused, and is serving).
pub async fn run_to_exit(args: &[&str], env: &[(&str, String)]) -> Exit {
    let mut cmd = tokio::process::Command::from(command(Command::new(BIN), env));
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`shopgraph {}` was still running after 20 s", args.join(" ")))
        .expect("the shopgraph binary runs");
    Exit {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of a metric line `name{labels} value` (labels exactly as
/// rendered, `""` for none); `None` when the series is absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(name, _)| *name == series).and_then(|(_, v)| v.parse().ok()))
}

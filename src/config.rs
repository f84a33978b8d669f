//! Settings from the environment and `serve` flags, validated once at start.
//!
//! Every setting arrives as text (clap reads the flag or the variable) and is
//! parsed here, so an invalid value stops the start with one line naming the
//! variable instead of a clap usage dump.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use clap::Args;

/// The validated configuration of one server process.
#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    /// A Postgres replica for the public catalog (`DATABASE_READ_URL`).
    pub database_read_url: Option<Secret>,
    /// Past this replay lag the catalog is read from the primary.
    pub database_read_max_lag: Duration,
    /// `None`: use `redis://127.0.0.1:6379/0`, or start a private
    /// `redis-server` when nothing answers there.
    pub redis_url: Option<String>,
    /// A PEM file of CAs trusted (beside the system's roots) for `rediss://`.
    pub redis_tls_ca_file: Option<PathBuf>,
    pub redis_key_prefix: String,
    pub listen_addr: SocketAddr,
    pub order_ttl: Duration,
    pub sweep_interval: Duration,
    pub admin_token: Option<Secret>,
    /// `None`: a random key per process (with a warning).
    pub jwt_secret: Option<Secret>,
    pub jwt_lifetime: Duration,
    pub db_max_connections: u32,
    /// How long a request waits for the database before failing with `INTERNAL`.
    pub db_timeout: Duration,
    pub nudge_interval: Duration,
    pub ws_max_connections: usize,
    pub ws_max_subscriptions: usize,
    pub ws_init_timeout: Duration,
    /// How often an idle-or-not websocket gets a keep-alive (`ping`, legacy
    /// `ka`), so proxies with idle timeouts keep it open.
    pub ws_keepalive: Duration,
    /// How long one HTTP request (body upload included) may take before it
    /// is answered with 408; websockets are not bound by it.
    pub request_timeout: Duration,
    pub introspection: bool,
    pub demo_dir: PathBuf,
    pub auth_rate_limit_per_minute: u32,
    pub log_format: LogFormat,
    /// How long a client may take to send a request head, from its first
    /// byte (`HTTP_HEADER_TIMEOUT`).
    pub http_header_timeout: Duration,
    /// How long a keep-alive connection may sit with no request and no
    /// byte moving (`HTTP_IDLE_TIMEOUT`).
    pub http_idle_timeout: Duration,
    /// Open TCP connections per process (`MAX_CONNECTIONS`); `None`: what
    /// fits below the file-descriptor limit.
    pub max_connections: Option<usize>,
    /// Open TCP connections (HTTP and websocket) per client address.
    pub max_connections_per_ip: usize,
    /// Websockets per client address; `None`: a quarter of
    /// `WS_MAX_CONNECTIONS`, at most 64.
    pub ws_max_connections_per_ip: Option<usize>,
    /// How long an anonymous websocket may run no operation before it is
    /// closed with 4408.
    pub ws_anonymous_idle_timeout: Duration,
    /// Peers whose `X-Forwarded-For` names the client (`TRUSTED_PROXIES`).
    pub trusted_proxies: Vec<crate::client_addr::Cidr>,
    /// `login` attempts per account (email) per minute, across instances.
    pub login_rate_limit_per_account: u32,
    /// Unpaid orders one customer may hold at once.
    pub max_pending_orders: u32,
    /// Units (sum of quantities) one customer's unpaid orders may hold at once.
    pub max_pending_units: u32,
    /// `createOrder` calls per customer per minute, across instances.
    pub order_rate_limit_per_minute: u32,
    /// `None`: no cross-origin access (no CORS headers at all).
    pub cors_allowed_origins: Option<crate::cors::AllowedOrigins>,
    /// `max-age` of anonymous catalog responses (`Cache-Control: public`).
    pub catalog_max_age: Duration,
    /// How long this server answers an anonymous catalog request from its
    /// own cache at most (zero: it never does). Writes through this
    /// instance show at once regardless.
    pub catalog_cache_ttl: Duration,
    /// The bearer token `/metrics` requires; `None`: `/metrics` answers 404.
    pub metrics_token: Option<Secret>,
    /// Whether `/graphiql` (and the redirect from `/`) is served.
    pub graphiql: bool,
}

/// A value that must never reach a log line.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

impl Default for Config {
    /// The contract's defaults.
    fn default() -> Self {
        Config {
            database_url: "sqlite://shopgraph.db".into(),
            database_read_url: None,
            database_read_max_lag: Duration::from_secs(5),
            redis_url: None,
            redis_tls_ca_file: None,
            redis_key_prefix: "shopgraph:".into(),
            listen_addr: "127.0.0.1:8000".parse().expect("valid address"),
            order_ttl: Duration::from_secs(30 * 60),
            sweep_interval: Duration::from_secs(30),
            admin_token: None,
            jwt_secret: None,
            jwt_lifetime: Duration::from_secs(24 * 3600),
            db_max_connections: 8,
            db_timeout: Duration::from_secs(5),
            nudge_interval: Duration::from_millis(20),
            ws_max_connections: 20_000,
            ws_max_subscriptions: 100,
            ws_init_timeout: Duration::from_secs(10),
            ws_keepalive: Duration::from_secs(15),
            request_timeout: Duration::from_secs(30),
            introspection: true,
            demo_dir: PathBuf::from("frontend-demo/dist"),
            auth_rate_limit_per_minute: 30,
            log_format: LogFormat::Human,
            http_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            max_connections: None,
            max_connections_per_ip: 256,
            ws_max_connections_per_ip: None,
            ws_anonymous_idle_timeout: Duration::from_secs(30),
            trusted_proxies: Vec::new(),
            login_rate_limit_per_account: 10,
            max_pending_orders: 10,
            max_pending_units: 1000,
            order_rate_limit_per_minute: 60,
            cors_allowed_origins: None,
            catalog_max_age: Duration::from_secs(5),
            catalog_cache_ttl: Duration::from_secs(1),
            metrics_token: None,
            graphiql: true,
        }
    }
}

/// Flags of `shopgraph serve`; each also read from its environment variable.
// Every value arrives as text and is parsed by `into_config`. A
// `default_value` is what help shows and what an unset flag and variable
// mean: the value of `Config::default` (a test keeps the two equal).
// Settings whose absence means something else say so in their help instead.
#[derive(Args, Debug, Default, Clone)]
pub struct ConfigArgs {
    /// `sqlite://…` (created and migrated on start) or `postgres://…` (libpq's sslmode and sslrootcert apply).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://shopgraph.db", hide_env_values = true)]
    pub database_url: Option<String>,
    /// A PostgreSQL replica that serves the public catalog (`products`, `product`). Unset: no replica.
    #[arg(long, env = "DATABASE_READ_URL", hide_env_values = true)]
    pub database_read_url: Option<String>,
    /// Replay lag past which catalog reads go back to the primary.
    #[arg(long, env = "DATABASE_READ_MAX_LAG", default_value = "5s")]
    pub database_read_max_lag: Option<String>,
    /// The Redis whose key expiry drives cancellation (its db index is honoured). Unset: redis://127.0.0.1:6379/0, or a private redis-server when nothing answers there.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// A PEM file of CA certificates trusted for rediss:// (beside the system's roots). Unset: the system's roots.
    #[arg(long, env = "REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<String>,
    /// The start of every Redis key and channel this server uses.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "shopgraph:")]
    pub redis_key_prefix: Option<String>,
    /// HOST:PORT to listen on (a host name is resolved; port 0 picks a free port).
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8000")]
    pub listen_addr: Option<String>,
    /// How long an order may stay unpaid (500ms, 2s, 30m, 1h; at most 30 days).
    #[arg(long, env = "ORDER_TTL", default_value = "30m")]
    pub order_ttl: Option<String>,
    /// How often the safety-net sweep cancels overdue orders that no expiry event reached.
    #[arg(long, env = "SWEEP_INTERVAL", default_value = "30s")]
    pub sweep_interval: Option<String>,
    /// The admin bearer token (at least 8 characters). Unset: admin operations are refused.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The HS256 key of customer tokens (at least 16 characters); share it between instances. Unset: a random key per process.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// How long customer tokens stay valid.
    #[arg(long, env = "JWT_LIFETIME", default_value = "24h")]
    pub jwt_lifetime: Option<String>,
    /// Database pool size.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value = "8")]
    pub db_max_connections: Option<String>,
    /// How long a request waits for a database connection (INTERNAL after).
    #[arg(long, env = "DB_TIMEOUT", default_value = "5s")]
    pub db_timeout: Option<String>,
    /// How often the deadline index is polled for due orders.
    #[arg(long, env = "NUDGE_INTERVAL", default_value = "20ms")]
    pub nudge_interval: Option<String>,
    /// Websockets per process (over it: closed with 1013).
    #[arg(long, env = "WS_MAX_CONNECTIONS", default_value = "20000")]
    pub ws_max_connections: Option<String>,
    /// Subscriptions per websocket (over it: RATE_LIMITED).
    #[arg(long, env = "WS_MAX_SUBSCRIPTIONS", default_value = "100")]
    pub ws_max_subscriptions: Option<String>,
    /// Time a websocket has to send connection_init (closed with 4408 after).
    #[arg(long, env = "WS_INIT_TIMEOUT", default_value = "10s")]
    pub ws_init_timeout: Option<String>,
    /// Interval of the keep-alive messages on every websocket.
    #[arg(long, env = "WS_KEEPALIVE", default_value = "15s")]
    pub ws_keepalive: Option<String>,
    /// How long one HTTP request may take (408 after).
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s")]
    pub request_timeout: Option<String>,
    /// `false` turns schema introspection off.
    #[arg(long, env = "INTROSPECTION", default_value = "true")]
    pub introspection: Option<String>,
    /// Where the built demo is served from (/demo/).
    #[arg(long, env = "DEMO_DIR", default_value = "frontend-demo/dist")]
    pub demo_dir: Option<String>,
    /// Logins and registrations per client address per minute.
    #[arg(long, env = "AUTH_RATE_LIMIT", default_value = "30")]
    pub auth_rate_limit: Option<String>,
    /// `human` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "human")]
    pub log_format: Option<String>,
    /// How long a client may take to send a request head (closed after).
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "10s")]
    pub http_header_timeout: Option<String>,
    /// How long an HTTP keep-alive connection may stay idle (closed after).
    #[arg(long, env = "HTTP_IDLE_TIMEOUT", default_value = "60s")]
    pub http_idle_timeout: Option<String>,
    /// Open connections per process. Unset: what the file-descriptor limit allows.
    #[arg(long, env = "MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
    /// Open connections (HTTP and websocket) per client address.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value = "256")]
    pub max_connections_per_ip: Option<String>,
    /// Websockets per client address. Unset: WS_MAX_CONNECTIONS / 4, at most 64.
    #[arg(long, env = "WS_MAX_CONNECTIONS_PER_IP")]
    pub ws_max_connections_per_ip: Option<String>,
    /// How long an anonymous websocket may run no operation (closed with 4408 after).
    #[arg(long, env = "WS_ANONYMOUS_IDLE_TIMEOUT", default_value = "30s")]
    pub ws_anonymous_idle_timeout: Option<String>,
    /// Comma-separated CIDRs of reverse proxies whose `X-Forwarded-For` names the client. Unset: the header is ignored.
    #[arg(long, env = "TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// Logins per account (email) per minute, shared by all instances.
    #[arg(long, env = "LOGIN_RATE_LIMIT_PER_ACCOUNT", default_value = "10")]
    pub login_rate_limit_per_account: Option<String>,
    /// Unpaid orders one customer may hold at once.
    #[arg(long, env = "MAX_PENDING_ORDERS", default_value = "10")]
    pub max_pending_orders: Option<String>,
    /// Units (sum of quantities) one customer's unpaid orders may hold at once.
    #[arg(long, env = "MAX_PENDING_UNITS", default_value = "1000")]
    pub max_pending_units: Option<String>,
    /// createOrder calls per customer per minute, shared by all instances.
    #[arg(long, env = "ORDER_RATE_LIMIT", default_value = "60")]
    pub order_rate_limit: Option<String>,
    /// Origins whose pages may call /graphql: comma-separated (https://shop.example.com) or `*`. Unset: no cross-origin access.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS")]
    pub cors_allowed_origins: Option<String>,
    /// How long shared caches may keep anonymous catalog responses.
    #[arg(long, env = "CATALOG_MAX_AGE", default_value = "5s")]
    pub catalog_max_age: Option<String>,
    /// How long the server reuses its own answer to an anonymous catalog request (at most 60s; `0s` turns it off). Writes through the same instance show at once.
    #[arg(long, env = "CATALOG_CACHE_TTL", default_value = "1s")]
    pub catalog_cache_ttl: Option<String>,
    /// Bearer token that `/metrics` requires (at least 16 characters). Unset: `/metrics` answers 404.
    #[arg(long, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// `false` stops serving GraphiQL (`/graphiql` and `/` answer 404).
    #[arg(long, env = "GRAPHIQL", default_value = "true")]
    pub graphiql: Option<String>,
}

/// One invalid setting, printed as one line naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

fn bad(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError { var, reason: reason.into() }
}

fn duration(var: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(raw.trim())
        .map_err(|_| bad(var, format!("invalid duration {raw:?} (expected e.g. 500ms, 2s, 30m, 1h)")))?;
    if d.is_zero() {
        return Err(bad(var, "must be greater than zero"));
    }
    Ok(d)
}

fn boolean(var: &'static str, raw: &str) -> Result<bool, ConfigError> {
    match raw.trim() {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(bad(var, format!("invalid value {raw:?} (expected true or false)"))),
    }
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(var: &'static str, raw: &str) -> Result<T, ConfigError> {
    match raw.trim().parse::<T>() {
        Ok(v) if v > T::default() => Ok(v),
        _ => Err(bad(var, format!("invalid value {raw:?} (expected a positive integer)"))),
    }
}

impl ConfigArgs {
    /// Parses every setting; the first invalid one is the error.
    pub fn into_config(mut self) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        self.connection_settings(&mut c)?;
        self.database(&mut c)?;
        self.redis(&mut c)?;
        self.orders(&mut c)?;
        self.access(&mut c)?;
        self.serving(&mut c)?;
        self.storefront(&mut c)?;
        Ok(c)
    }

    /// `DATABASE_URL`, the read replica, the pool.
    fn database(&mut self, c: &mut Config) -> Result<(), ConfigError> {
        if let Some(url) = self.database_url.take() {
            let url = url.trim().to_string();
            if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(bad(
                    "DATABASE_URL",
                    format!("unsupported URL {:?} (expected sqlite://… or postgres://…)", redact_url(&url)),
                ));
            }
            c.database_url = url;
        }
        if let Some(url) = self.database_read_url.take().filter(|u| !u.trim().is_empty()) {
            let url = url.trim().to_string();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(bad(
                    "DATABASE_READ_URL",
                    format!(
                        "unsupported URL {:?} (expected postgres://…, a replica of DATABASE_URL)",
                        redact_url(&url)
                    ),
                ));
            }
            if c.database_url.starts_with("sqlite:") {
                return Err(bad("DATABASE_READ_URL", "a read replica needs DATABASE_URL to be PostgreSQL"));
            }
            c.database_read_url = Some(Secret(url));
        }
        if let Some(v) = self.database_read_max_lag.take() {
            c.database_read_max_lag = duration("DATABASE_READ_MAX_LAG", &v)?;
        }
        if let Some(v) = self.db_max_connections.take() {
            c.db_max_connections = positive("DB_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = self.db_timeout.take() {
            c.db_timeout = duration("DB_TIMEOUT", &v)?;
        }
        Ok(())
    }

    /// `REDIS_URL`, its CA file, the key prefix.
    fn redis(&mut self, c: &mut Config) -> Result<(), ConfigError> {
        if let Some(url) = self.redis_url.take() {
            let url = url.trim().to_string();
            let info: redis::ConnectionInfo = url.as_str().parse().map_err(|_| {
                bad("REDIS_URL", format!("invalid Redis URL {:?} (expected redis://host:port/db)", redact_url(&url)))
            })?;
            let _ = info;
            c.redis_url = Some(url);
        }
        if let Some(path) = self.redis_tls_ca_file.take().filter(|p| !p.trim().is_empty()) {
            c.redis_tls_ca_file = Some(redis_tls_ca_file(path.trim(), c.redis_url.as_deref())?);
        }
        if let Some(p) = self.redis_key_prefix.take() {
            if p.is_empty() || p.chars().any(|ch| ch.is_whitespace() || ch == '*' || ch == '?' || ch == '[') {
                return Err(bad("REDIS_KEY_PREFIX", "must be non-empty without spaces or glob characters"));
            }
            c.redis_key_prefix = p;
        }
        Ok(())
    }

    /// Order lifetime, the background steps, the pending and rate limits.
    fn orders(&mut self, c: &mut Config) -> Result<(), ConfigError> {
        if let Some(v) = self.order_ttl.take() {
            c.order_ttl = duration("ORDER_TTL", &v)?;
            if c.order_ttl > MAX_ORDER_TTL {
                return Err(bad("ORDER_TTL", format!("{} is too long (at most 30 days)", v.trim())));
            }
        }
        if let Some(v) = self.sweep_interval.take() {
            c.sweep_interval = duration("SWEEP_INTERVAL", &v)?;
        }
        if let Some(v) = self.nudge_interval.take() {
            c.nudge_interval = duration("NUDGE_INTERVAL", &v)?;
        }
        if let Some(v) = self.max_pending_orders.take() {
            c.max_pending_orders = positive("MAX_PENDING_ORDERS", &v)?;
        }
        if let Some(v) = self.max_pending_units.take() {
            c.max_pending_units = positive("MAX_PENDING_UNITS", &v)?;
        }
        if let Some(v) = self.order_rate_limit.take() {
            c.order_rate_limit_per_minute = positive("ORDER_RATE_LIMIT", &v)?;
        }
        Ok(())
    }

    /// Tokens, secrets and the limits on signing in.
    fn access(&mut self, c: &mut Config) -> Result<(), ConfigError> {
        if let Some(v) = self.admin_token.take() {
            if v.len() < 8 {
                return Err(bad("ADMIN_TOKEN", "must be at least 8 characters"));
            }
            c.admin_token = Some(Secret(v));
        }
        if let Some(v) = self.jwt_secret.take() {
            if v.len() < 16 {
                return Err(bad("JWT_SECRET", "must be at least 16 characters"));
            }
            c.jwt_secret = Some(Secret(v));
        }
        if let Some(v) = self.jwt_lifetime.take() {
            c.jwt_lifetime = duration("JWT_LIFETIME", &v)?;
            // a token's `exp` is seconds since 1970: a lifetime past a year
            // is a mistake, and a huge one would overflow it
            if c.jwt_lifetime > MAX_JWT_LIFETIME {
                return Err(bad("JWT_LIFETIME", format!("{} is too long (at most 365 days)", v.trim())));
            }
        }
        if let Some(v) = self.auth_rate_limit.take() {
            c.auth_rate_limit_per_minute = positive("AUTH_RATE_LIMIT", &v)?;
        }
        if let Some(v) = self.login_rate_limit_per_account.take() {
            c.login_rate_limit_per_account = positive("LOGIN_RATE_LIMIT_PER_ACCOUNT", &v)?;
        }
        if let Some(v) = self.metrics_token.take() {
            // a scrape credential that travels in every request: long enough not to be guessed
            if v.len() < 16 || v.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                return Err(bad("METRICS_TOKEN", "must be at least 16 characters without spaces"));
            }
            c.metrics_token = Some(Secret(v));
        }
        if let Some(v) = self.trusted_proxies.take() {
            c.trusted_proxies = crate::client_addr::parse_cidrs(&v).map_err(|e| bad("TRUSTED_PROXIES", e))?;
        }
        Ok(())
    }

    /// Where it listens, websockets, time bounds, logs, the demo's files.
    fn serving(&mut self, c: &mut Config) -> Result<(), ConfigError> {
        if let Some(a) = self.listen_addr.take() {
            c.listen_addr = listen_addr(&a)?;
        }
        if let Some(v) = self.ws_max_connections.take() {
            c.ws_max_connections = positive("WS_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = self.ws_max_subscriptions.take() {
            c.ws_max_subscriptions = positive("WS_MAX_SUBSCRIPTIONS", &v)?;
        }
        if let Some(v) = self.ws_init_timeout.take() {
            c.ws_init_timeout = duration("WS_INIT_TIMEOUT", &v)?;
        }
        if let Some(v) = self.ws_keepalive.take() {
            c.ws_keepalive = duration("WS_KEEPALIVE", &v)?;
        }
        if let Some(v) = self.request_timeout.take() {
            c.request_timeout = duration("REQUEST_TIMEOUT", &v)?;
        }
        if let Some(v) = self.demo_dir.take() {
            c.demo_dir = PathBuf::from(v);
        }
        if let Some(v) = self.log_format.take() {
            c.log_format = match v.trim() {
                "human" | "text" | "" => LogFormat::Human,
                "json" => LogFormat::Json,
                _ => return Err(bad("LOG_FORMAT", format!("invalid value {v:?} (expected human or json)"))),
            };
        }
        Ok(())
    }

    /// What browsers and caches see: introspection, GraphiQL, CORS, caching.
    fn storefront(&mut self, c: &mut Config) -> Result<(), ConfigError> {
        if let Some(v) = self.introspection.take() {
            c.introspection = boolean("INTROSPECTION", &v)?;
        }
        if let Some(v) = self.cors_allowed_origins.take() {
            c.cors_allowed_origins =
                Some(crate::cors::AllowedOrigins::parse(&v).map_err(|reason| bad("CORS_ALLOWED_ORIGINS", reason))?);
        }
        if let Some(v) = self.catalog_max_age.take() {
            c.catalog_max_age = duration("CATALOG_MAX_AGE", &v)?;
        }
        if let Some(v) = self.catalog_cache_ttl.take() {
            c.catalog_cache_ttl = catalog_cache_ttl(&v)?;
        }
        if let Some(v) = self.graphiql.take() {
            c.graphiql = boolean("GRAPHIQL", &v)?;
        }
        Ok(())
    }
}

/// `CATALOG_CACHE_TTL`: a duration of at most a minute, where zero (unlike
/// every other duration here) is allowed: it turns the cache off.
fn catalog_cache_ttl(raw: &str) -> Result<Duration, ConfigError> {
    let ttl = match raw.trim() {
        "0" => Duration::ZERO,
        raw => humantime::parse_duration(raw).map_err(|_| {
            bad("CATALOG_CACHE_TTL", format!("invalid duration {raw:?} (expected e.g. 500ms, 1s, or 0s: off)"))
        })?,
    };
    if ttl > Duration::from_secs(60) {
        return Err(bad("CATALOG_CACHE_TTL", "must be at most 60s (stock would be shown that stale)"));
    }
    Ok(ttl)
}

/// The longest `ORDER_TTL`: an order holds its stock that long at most,
/// and every deadline computed from it stays far inside the range of the
/// database's timestamps and Redis's `PEXPIREAT`.
pub const MAX_ORDER_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest `JWT_LIFETIME`.
pub const MAX_JWT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// `LISTEN_ADDR`: `IP:PORT`, or `HOST:PORT` with the host name resolved
/// (`localhost:8000`); the first address the resolver gives is used.
fn listen_addr(raw: &str) -> Result<SocketAddr, ConfigError> {
    let raw = raw.trim();
    if let Ok(addr) = raw.parse() {
        return Ok(addr);
    }
    let invalid = |why: &str| {
        bad("LISTEN_ADDR", format!("invalid address {raw:?}{why} (expected HOST:PORT, e.g. 127.0.0.1:8000)"))
    };
    match raw.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(invalid("")),
    }
    let mut addrs = raw.to_socket_addrs().map_err(|e| invalid(&format!(": {e}")))?;
    addrs.next().ok_or_else(|| invalid(": the host name has no address"))
}

/// `REDIS_TLS_CA_FILE`: a readable PEM bundle, for a `rediss://` URL.
fn redis_tls_ca_file(path: &str, redis_url: Option<&str>) -> Result<PathBuf, ConfigError> {
    const VAR: &str = "REDIS_TLS_CA_FILE";
    let Some(url) = redis_url.filter(|u| crate::redis::client::is_tls(u)) else {
        return Err(bad(VAR, "is set, but REDIS_URL is not rediss://…: it only applies to Redis over TLS"));
    };
    let path = PathBuf::from(path);
    let ca = crate::redis::client::TrustedCa::read(&path).map_err(|e| bad(VAR, e))?;
    crate::redis::client::client(url, Some(&ca)).map_err(|e| bad(VAR, format!("{}: {e}", path.display())))?;
    Ok(path)
}

impl ConfigArgs {
    /// The connection limits and timeouts (issue 12).
    fn connection_settings(&self, c: &mut Config) -> Result<(), ConfigError> {
        if let Some(v) = &self.http_header_timeout {
            c.http_header_timeout = duration("HTTP_HEADER_TIMEOUT", v)?;
        }
        if let Some(v) = &self.http_idle_timeout {
            c.http_idle_timeout = duration("HTTP_IDLE_TIMEOUT", v)?;
        }
        if let Some(v) = &self.max_connections {
            c.max_connections = Some(positive("MAX_CONNECTIONS", v)?);
        }
        if let Some(v) = &self.max_connections_per_ip {
            c.max_connections_per_ip = positive("MAX_CONNECTIONS_PER_IP", v)?;
        }
        if let Some(v) = &self.ws_max_connections_per_ip {
            c.ws_max_connections_per_ip = Some(positive("WS_MAX_CONNECTIONS_PER_IP", v)?);
        }
        if let Some(v) = &self.ws_anonymous_idle_timeout {
            c.ws_anonymous_idle_timeout = duration("WS_ANONYMOUS_IDLE_TIMEOUT", v)?;
        }
        Ok(())
    }
}

impl Config {
    /// Websockets one client address may hold: `WS_MAX_CONNECTIONS_PER_IP`,
    /// or a quarter of `WS_MAX_CONNECTIONS` (at most 64: one per browser tab
    /// of a household or office behind one NAT), never more than the total.
    pub fn ws_per_ip(&self) -> usize {
        let default = (self.ws_max_connections / 4).clamp(1, 64);
        self.ws_max_connections_per_ip.unwrap_or(default).min(self.ws_max_connections)
    }
}

/// The URL without its password, for error messages.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_ttl_is_refused_naming_the_variable() {
        let args = ConfigArgs { order_ttl: Some("0s".into()), ..Default::default() };
        let err = args.into_config().unwrap_err();
        assert_eq!(err.var, "ORDER_TTL");
    }

    #[test]
    fn an_unparsable_ttl_is_refused_naming_the_variable() {
        let args = ConfigArgs { order_ttl: Some("abc".into()), ..Default::default() };
        assert!(args.into_config().unwrap_err().to_string().starts_with("ORDER_TTL: invalid duration"));
    }

    #[test]
    fn trusted_proxies_are_cidrs() {
        let args = ConfigArgs { trusted_proxies: Some("10.0.0.0/8, ::1/128,192.0.2.7".into()), ..Default::default() };
        assert_eq!(args.into_config().unwrap().trusted_proxies.len(), 3);
        let args = ConfigArgs { trusted_proxies: Some("10.0.0.0/33".into()), ..Default::default() };
        assert_eq!(args.into_config().unwrap_err().var, "TRUSTED_PROXIES");
    }

    #[test]
    fn a_bad_redis_url_is_refused() {
        let args = ConfigArgs { redis_url: Some("http://nope".into()), ..Default::default() };
        assert_eq!(args.into_config().unwrap_err().var, "REDIS_URL");
    }

    #[test]
    fn connection_settings_parse_and_the_websocket_share_defaults_to_a_quarter() {
        let args = ConfigArgs {
            http_header_timeout: Some("2s".into()),
            max_connections_per_ip: Some("9".into()),
            ws_max_connections: Some("40".into()),
            ..Default::default()
        };
        let c = args.into_config().unwrap();
        assert_eq!(c.http_header_timeout, Duration::from_secs(2));
        assert_eq!(c.max_connections_per_ip, 9);
        assert_eq!(c.ws_per_ip(), 10);
        assert_eq!(Config::default().ws_per_ip(), 64);
        let zero = ConfigArgs { max_connections_per_ip: Some("0".into()), ..Default::default() };
        assert_eq!(zero.into_config().unwrap_err().var, "MAX_CONNECTIONS_PER_IP");
    }

    #[test]
    fn a_short_metrics_token_and_a_bad_graphiql_flag_are_refused() {
        let args = ConfigArgs { metrics_token: Some("short".into()), ..Default::default() };
        assert_eq!(args.into_config().unwrap_err().var, "METRICS_TOKEN");
        let args = ConfigArgs { graphiql: Some("maybe".into()), ..Default::default() };
        assert_eq!(args.into_config().unwrap_err().var, "GRAPHIQL");
        let args = ConfigArgs { graphiql: Some("false".into()), ..Default::default() };
        assert!(!args.into_config().unwrap().graphiql);
    }

    #[test]
    fn a_redis_ca_file_needs_rediss_and_a_pem_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let args = |url: &str, file: &std::path::Path| ConfigArgs {
            redis_url: Some(url.into()),
            redis_tls_ca_file: Some(file.display().to_string()),
            ..Default::default()
        };
        let plain = args("redis://127.0.0.1:6379/0", &junk).into_config().unwrap_err();
        assert_eq!(plain.var, "REDIS_TLS_CA_FILE");
        assert!(plain.reason.contains("rediss://"), "{plain}");
        let junk = args("rediss://127.0.0.1:6380/0", &junk).into_config().unwrap_err();
        assert!(junk.reason.contains("no PEM certificate"), "{junk}");
        let missing = args("rediss://127.0.0.1:6380/0", &dir.path().join("nope.pem")).into_config().unwrap_err();
        assert!(missing.reason.contains("cannot read"), "{missing}");
    }

    #[test]
    fn an_order_ttl_over_thirty_days_is_refused_naming_the_bound() {
        let args = |v: &str| ConfigArgs { order_ttl: Some(v.into()), ..Default::default() };
        assert_eq!(args("30days").into_config().unwrap().order_ttl, MAX_ORDER_TTL);
        for huge in ["31days", "100years", "18446744073709551615s"] {
            let err = args(huge).into_config().unwrap_err();
            assert_eq!(err.var, "ORDER_TTL", "{huge}");
            assert!(err.reason.contains("at most 30 days") || err.reason.contains("invalid duration"), "{err}");
        }
    }

    #[test]
    fn a_jwt_lifetime_over_a_year_is_refused_naming_the_bound() {
        let args = |v: &str| ConfigArgs { jwt_lifetime: Some(v.into()), ..Default::default() };
        assert_eq!(args("365days").into_config().unwrap().jwt_lifetime, MAX_JWT_LIFETIME);
        for huge in ["366days", "100years", "18446744073709551615s"] {
            let err = args(huge).into_config().unwrap_err();
            assert_eq!(err.var, "JWT_LIFETIME", "{huge}");
            assert!(err.reason.contains("at most 365 days") || err.reason.contains("invalid duration"), "{err}");
        }
    }

    #[test]
    fn listen_addresses_take_ips_and_host_names() {
        let addr = |v: &str| ConfigArgs { listen_addr: Some(v.into()), ..Default::default() }.into_config();
        assert_eq!(addr("0.0.0.0:80").unwrap().listen_addr, "0.0.0.0:80".parse().unwrap());
        assert_eq!(addr("[::1]:0").unwrap().listen_addr, "[::1]:0".parse().unwrap());
        let local = addr("localhost:8000").unwrap().listen_addr;
        assert!(local.ip().is_loopback() && local.port() == 8000, "{local}");
        for bad in ["localhost", "localhost:http", ":8000", "127.0.0.1:99999"] {
            assert_eq!(addr(bad).unwrap_err().var, "LISTEN_ADDR", "{bad}");
        }
    }

    /// What help shows as each flag's default is what an unset setting means.
    #[test]
    fn the_defaults_help_shows_are_the_config_defaults() {
        use clap::{FromArgMatches, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            config: ConfigArgs,
        }
        // the variables of the test's own environment must not count
        let command = <Cli as clap::CommandFactory>::command().mut_args(|a| a.env(None::<&str>));
        let matches = command.try_get_matches_from(["shopgraph"]).unwrap();
        let parsed = Cli::from_arg_matches(&matches).unwrap().config.into_config().unwrap();
        assert_eq!(format!("{parsed:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn humantime_durations_are_accepted() {
        let args =
            ConfigArgs { order_ttl: Some("90s".into()), sweep_interval: Some("500ms".into()), ..Default::default() };
        let c = args.into_config().unwrap();
        assert_eq!(c.order_ttl, Duration::from_secs(90));
        assert_eq!(c.sweep_interval, Duration::from_millis(500));
    }
}

//! The settings as text (flags and environment variables, through clap),
//! and their parsing into a [`Config`], one named group of settings at a
//! time.

use std::{
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use clap::Args;

use super::{redact_url, Config, ConfigError, LogFormat, Secret, MAX_JWT_LIFETIME, MAX_ORDER_TTL};

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
    /// The Redis whose key expiry drives cancellation (its db index is honoured), or a Redis Cluster as redis-cluster://host:port,host:port,… (rediss-cluster:// over TLS). Unset: redis://127.0.0.1:6379/0, or a private redis-server when nothing answers there.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// A PEM file of CA certificates trusted for rediss:// and rediss-cluster:// (beside the system's roots). Unset: the system's roots.
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
            crate::redis::url::RedisUrl::parse(&url).map_err(|e| bad("REDIS_URL", e))?;
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
        return Err(bad(
            VAR,
            "is set, but REDIS_URL is not rediss://…, rediss-sentinel://… or rediss-cluster://…: it only applies to Redis over TLS",
        ));
    };
    let path = PathBuf::from(path);
    let ca = crate::redis::client::TrustedCa::read(&path).map_err(|e| bad(VAR, e))?;
    // the certificates are parsed now, for a node the URL connects to
    let node = crate::redis::url::RedisUrl::parse(url).ok().and_then(|u| u.sample_node());
    if let Some(node) = node {
        crate::redis::client::client(&node, Some(&ca)).map_err(|e| bad(VAR, format!("{}: {e}", path.display())))?;
    }
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

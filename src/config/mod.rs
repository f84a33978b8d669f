//! Settings from the environment and `serve` flags, validated once at start.
//!
//! Every setting arrives as text (clap reads the flag or the variable) and is
//! parsed here, so an invalid value stops the start with one line naming the
//! variable instead of a clap usage dump. [`args`] reads them; this module
//! holds what they become.

mod args;

pub use args::ConfigArgs;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

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
/// One invalid setting, printed as one line naming the variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

/// The longest `ORDER_TTL`: an order holds its stock that long at most,
/// and every deadline computed from it stays far inside the range of the
/// database's timestamps and Redis's `PEXPIREAT`.
pub const MAX_ORDER_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest `JWT_LIFETIME`.
pub const MAX_JWT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

impl Config {
    /// Websockets one client address may hold: `WS_MAX_CONNECTIONS_PER_IP`,
    /// or a quarter of `WS_MAX_CONNECTIONS` (at most 64: one per browser tab
    /// of a household or office behind one NAT), never more than the total.
    pub fn ws_per_ip(&self) -> usize {
        let default = (self.ws_max_connections / 4).clamp(1, 64);
        self.ws_max_connections_per_ip.unwrap_or(default).min(self.ws_max_connections)
    }
}

/// The URL without its password, for error messages and logs; also the
/// forms with several hosts (`redis-sentinel://u:p@a:1,b:2/0#m`), which are
/// not URLs to the `url` crate.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => raw.to_string(),
        // not a URL to the parser (a Cluster's `host:port,host:port,…`):
        // blank whatever follows `user:` before the last `@` of the authority
        Err(_) => redact_userinfo(raw),
    }
}

/// `scheme://user:***@rest`: the password between the userinfo's first `:`
/// and the authority's last `@` replaced.
fn redact_userinfo(raw: &str) -> String {
    let Some(start) = raw.find("://").map(|i| i + 3) else { return raw.to_string() };
    let rest = &raw[start..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else { return raw.to_string() };
    match authority[..at].find(':') {
        Some(colon) => format!("{}{}:***{}", &raw[..start], &rest[..colon], &rest[at..]),
        None => raw.to_string(),
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
    fn cluster_urls_are_accepted_and_their_passwords_redacted() {
        let ok = ConfigArgs { redis_url: Some("redis-cluster://a:7000,b:7001".into()), ..Default::default() };
        assert_eq!(ok.into_config().unwrap().redis_url.as_deref(), Some("redis-cluster://a:7000,b:7001"));
        let bad = ConfigArgs { redis_url: Some("redis-cluster://u:hunter2@a:7000,b/3".into()), ..Default::default() };
        let err = bad.into_config().unwrap_err();
        assert_eq!(err.var, "REDIS_URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_eq!(redact_url("rediss-cluster://u:hunter2@a:1,b:2/0"), "rediss-cluster://u:***@a:1,b:2/0");
    }

    #[test]
    fn a_bad_redis_url_is_refused() {
        let args = ConfigArgs { redis_url: Some("http://nope".into()), ..Default::default() };
        assert_eq!(args.into_config().unwrap_err().var, "REDIS_URL");
    }

    #[test]
    fn sentinel_urls_are_validated_and_their_passwords_redacted() {
        let url = |u: &str| ConfigArgs { redis_url: Some(u.into()), ..Default::default() }.into_config();
        let ok = url("redis-sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26379/2#shop").unwrap();
        assert_eq!(ok.redis_url.as_deref(), Some("redis-sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26379/2#shop"));
        let err = url("redis-sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26379/2").unwrap_err();
        assert_eq!(err.var, "REDIS_URL");
        let text = err.to_string();
        assert!(text.contains("master") && text.contains("redis-sentinel://"), "{text}");
        assert!(!text.contains("s3cret") && text.contains("app:***@"), "{text}");
        assert_eq!(redact_url("rediss-sentinel://:pw@a:1,b:2/0#m"), "rediss-sentinel://:***@a:1,b:2/0#m".to_string());
        assert_eq!(redact_url("redis-sentinel://a:1,b:2/0#m"), "redis-sentinel://a:1,b:2/0#m");
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

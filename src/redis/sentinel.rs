//! Redis Sentinel: `redis-sentinel://host:port,host:port,…/db#master-name`
//! (`rediss-sentinel://` for TLS to the data nodes; the sentinels themselves
//! are asked in plain text). Owns the URL form ([`SentinelUrl`]), finding
//! the primary ([`Resolver`]: each sentinel in turn, and the node it names
//! must answer `ROLE` with `master`), and following it across failovers
//! ([`Follower`]).
//!
//! The follower learns of a failover two ways: `+switch-master` on any
//! reachable sentinel (re-subscribed, on the next sentinel, when lost), and
//! a periodic `ROLE` of the current primary, because a pub/sub message can
//! be missed and a demoted primary keeps its connections open. On a change
//! it first moves the command connection ([`RedisConn`]'s Sentinel variant),
//! then publishes the new primary to every subscription that follows it
//! ([`subscription::Target::followed`]): those reconnect at once, and their
//! handlers' `connected(reconnected = true)` re-applies what a new server
//! needs (the listener's `notify-keyspace-events`, its canary, a sweep).
//! User and password in the URL are the data nodes'.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    client::{self, TrustedCa},
    conn::{self, PrimarySwitch},
    subscription::{self, Target},
    RedisConn,
};

const SCHEME: &str = "redis-sentinel://";
const TLS_SCHEME: &str = "rediss-sentinel://";
/// Sentinel's own default port, for a host given without one.
const DEFAULT_PORT: u16 = 26379;
/// How long one sentinel, or one candidate primary, may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the follower checks that the current primary is still one.
const CHECK_EVERY: Duration = Duration::from_millis(500);
const FORM: &str = "expected redis-sentinel://host:port,host:port,…/db#master-name";

/// Whether `url` is of the Sentinel form (plain or TLS).
pub fn is_sentinel(url: &str) -> bool {
    let url = url.trim_start();
    url.starts_with(SCHEME) || url.starts_with(TLS_SCHEME)
}

/// A parsed `redis-sentinel://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelUrl {
    /// TLS to the data nodes.
    pub tls: bool,
    /// `user:password` as written (still percent-encoded), for the data nodes.
    userinfo: Option<String>,
    /// The sentinels, as `(host, port)`; an IPv6 host without brackets.
    pub sentinels: Vec<(String, u16)>,
    pub db: i64,
    pub master: String,
}

impl SentinelUrl {
    /// Parses the Sentinel form; the error says what is wrong, without the
    /// password.
    pub fn parse(raw: &str) -> Result<SentinelUrl, String> {
        let raw = raw.trim();
        let (tls, rest) = if let Some(rest) = raw.strip_prefix(TLS_SCHEME) {
            (true, rest)
        } else if let Some(rest) = raw.strip_prefix(SCHEME) {
            (false, rest)
        } else {
            return Err(FORM.into());
        };
        let (rest, master) = rest.split_once('#').ok_or_else(|| format!("names no master ({FORM})"))?;
        if master.is_empty() || master.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("the master name after # must be non-empty without spaces ({FORM})"));
        }
        if rest.contains('?') {
            return Err(format!("takes no query parameters ({FORM})"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (Some(authority[..i].to_string()).filter(|u| !u.is_empty()), &authority[i + 1..]),
            None => (None, authority),
        };
        let sentinels = hosts.split(',').map(host_port).collect::<Result<Vec<_>, _>>()?;
        let db = match path {
            "" => 0,
            p => p
                .parse::<i64>()
                .ok()
                .filter(|db| *db >= 0)
                .ok_or_else(|| format!("the database after / must be a number, not {p:?} ({FORM})"))?,
        };
        let url = SentinelUrl { tls, userinfo, sentinels, db, master: master.to_string() };
        // what the data nodes' URLs will be must parse
        url.node_url("127.0.0.1", 6379)
            .parse::<redis::ConnectionInfo>()
            .map_err(|_| format!("the user or password is not valid in a URL ({FORM})"))?;
        Ok(url)
    }

    /// The URL of the data node at `host:port`, with this URL's
    /// credentials, database and TLS.
    pub fn node_url(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = self.userinfo.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("{scheme}://{auth}{}/{}", join(host, port), self.db)
    }
}

/// One `host:port` of the sentinel list (`[v6]:port` for IPv6).
fn host_port(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("{s:?} is not host:port ({FORM})");
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || (host.contains([':', '@', '/']) && !s.starts_with('[')) {
        return Err(bad());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
    };
    Ok((host.to_string(), port))
}

/// `host:port`, bracketing an IPv6 host.
fn join(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The primary as resolved: its address and a client for it.
#[derive(Clone)]
pub struct Primary {
    pub addr: String,
    pub client: redis::Client,
}

/// Asks the sentinels which node is the primary, and checks that it is.
#[derive(Clone)]
pub struct Resolver {
    url: SentinelUrl,
    ca: Option<TrustedCa>,
    sentinels: Vec<redis::Client>,
}

impl Resolver {
    pub fn new(url: SentinelUrl, ca: Option<&TrustedCa>) -> Result<Resolver, String> {
        let sentinels = url
            .sentinels
            .iter()
            .map(|(h, p)| redis::Client::open(format!("redis://{}", join(h, *p))).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(Resolver { url, ca: ca.cloned(), sentinels })
    }

    /// The primary the first sentinel that knows one names, provided that
    /// node answers `ROLE` with `master`; else why not, sentinel by sentinel.
    pub async fn resolve(&self) -> Result<Primary, String> {
        let master = &self.url.master;
        let mut why = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        for (sentinel, (h, p)) in self.sentinels.iter().zip(&self.url.sentinels) {
            let at = join(h, *p);
            let named = match tokio::time::timeout(ASK_TIMEOUT, ask(sentinel, master)).await {
                Err(_) => Err("timed out".to_string()),
                Ok(r) => r,
            };
            let (host, port) = match named {
                Ok(Some(hp)) => hp,
                Ok(None) => {
                    why.push(format!("sentinel {at} knows no master named {master:?}"));
                    continue;
                }
                Err(e) => {
                    why.push(format!("sentinel {at}: {e}"));
                    continue;
                }
            };
            let addr = join(&host, port);
            if refused.contains(&addr) {
                continue;
            }
            match self.check(&host, port).await {
                Ok(client) => return Ok(Primary { addr, client }),
                Err(e) => {
                    why.push(format!("sentinel {at} names {addr}, but {e}"));
                    refused.push(addr);
                }
            }
        }
        Err(format!("no sentinel names a usable primary for {master:?}: {}", why.join("; ")))
    }

    /// A client for `host:port` if that node says it is a master.
    async fn check(&self, host: &str, port: u16) -> Result<redis::Client, String> {
        let url = self.url.node_url(host, port);
        let client = client::client(&url, self.ca.as_ref()).map_err(|e| e.to_string())?;
        let attempt = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            role(&mut conn).await
        };
        match tokio::time::timeout(ASK_TIMEOUT, attempt).await {
            Ok(Ok(role)) if role == "master" => Ok(client),
            Ok(Ok(role)) => Err(format!("it answers ROLE with {role:?}, not master")),
            Ok(Err(e)) => {
                let e = e.to_string();
                Err(format!("it is unreachable: {e}{}", client::tls_hint(&url, &e)))
            }
            Err(_) => Err("it is unreachable: timed out".into()),
        }
    }
}

/// `SENTINEL get-master-addr-by-name`: `None` when the sentinel knows no
/// such master.
async fn ask(sentinel: &redis::Client, master: &str) -> Result<Option<(String, u16)>, String> {
    let mut conn = sentinel.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let named: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(master)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(named)
}

/// The first word of `ROLE`: `master`, `slave` or `sentinel`.
async fn role(conn: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<String> {
    let reply: Vec<redis::Value> = redis::cmd("ROLE").query_async(conn).await?;
    let first = reply.into_iter().next().unwrap_or(redis::Value::Nil);
    Ok(redis::from_redis_value(first)?)
}

/// What a Sentinel deployment gives the process: the command connection,
/// the primary for subscriptions to follow, and the task that moves both.
pub struct Followed {
    pub conn: RedisConn,
    pub primary: watch::Receiver<redis::Client>,
    pub db: i64,
    pub follower: Follower,
}

/// Resolves the primary of `url` now (a start-up error says why not) and
/// connects to it.
pub async fn connect(url: &str, ca: Option<&TrustedCa>) -> Result<Followed, String> {
    let parsed = SentinelUrl::parse(url)?;
    let db = parsed.db;
    let master = parsed.master.clone();
    let resolver = Resolver::new(parsed, ca)?;
    let primary = resolver.resolve().await?;
    let manager =
        ConnectionManager::new_with_config(primary.client.clone(), conn::manager_config()).await.map_err(|e| {
            let e = e.to_string();
            format!("the primary {}: {e}", primary.addr)
        })?;
    info!(%master, primary = %primary.addr, "Redis Sentinel names the primary");
    let (conn, switch) = RedisConn::sentinel(manager);
    let (tx, rx) = watch::channel(primary.client);
    let follower = Follower { resolver, conn: conn.clone(), switch, primary: tx, current: primary.addr };
    Ok(Followed { conn, primary: rx, db, follower })
}

/// Moves the process to a new primary when the sentinels promote one.
pub struct Follower {
    resolver: Resolver,
    /// The command connection, for the periodic `ROLE`.
    conn: RedisConn,
    switch: PrimarySwitch,
    primary: watch::Sender<redis::Client>,
    /// The current primary's address.
    current: String,
}

impl Follower {
    /// Runs until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let mut switches = SwitchWatch { master: self.resolver.url.master.clone(), wake: wake.clone() };
        let sentinels = Target::any(self.resolver.sentinels.clone());
        let watcher =
            subscription::run(sentinels, "+switch-master".into(), "sentinel watch", &mut switches, shutdown.clone());
        let checker = async {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // said once per episode, not every tick of a failover
            let mut troubled = false;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if self.primary_answers_as_master().await {
                            troubled = false;
                            continue;
                        }
                    }
                    _ = wake.notified() => {}
                }
                self.follow(&mut troubled).await;
            }
        };
        tokio::join!(watcher, checker);
    }

    async fn primary_answers_as_master(&mut self) -> bool {
        matches!(tokio::time::timeout(ASK_TIMEOUT, role(&mut self.conn)).await, Ok(Ok(r)) if r == "master")
    }

    /// Asks the sentinels, and moves everything if they name another node.
    async fn follow(&mut self, troubled: &mut bool) {
        let primary = match self.resolver.resolve().await {
            Ok(p) if p.addr == self.current => return,
            Ok(p) => p,
            Err(e) => {
                if !std::mem::replace(troubled, true) {
                    warn!(current = %self.current, error = %e, "the Redis primary does not answer as master; waiting for Sentinel to name one");
                } else {
                    debug!(error = %e, "still no usable Redis primary");
                }
                return;
            }
        };
        let connect = ConnectionManager::new_with_config(primary.client.clone(), conn::manager_config());
        let manager = match tokio::time::timeout(ASK_TIMEOUT * 2, connect).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                return warn!(primary = %primary.addr, error = %e, "cannot connect to the new Redis primary yet")
            }
            Err(_) => return warn!(primary = %primary.addr, "cannot connect to the new Redis primary yet: timed out"),
        };
        // commands first, so that what subscribers do on reconnecting
        // (CONFIG SET, the canary) already reaches the new primary
        self.switch.replace(manager);
        self.primary.send_replace(primary.client);
        info!(from = %self.current, to = %primary.addr, master = %self.resolver.url.master, "Redis Sentinel failover: following the new primary");
        self.current = primary.addr;
        *troubled = false;
    }
}

/// The `+switch-master` subscription: wakes the follower for its master,
/// and after every (re)subscribe, since a switch may have passed unseen.
struct SwitchWatch {
    master: String,
    wake: Arc<Notify>,
}

#[async_trait]
impl subscription::Handler for SwitchWatch {
    async fn connected(&mut self, reconnected: bool) {
        if reconnected {
            self.wake.notify_one();
        }
    }

    async fn message(&mut self, _channel: &str, payload: &[u8]) {
        // `<master-name> <old-ip> <old-port> <new-ip> <new-port>`
        let payload = String::from_utf8_lossy(payload);
        if payload.split(' ').next() == Some(self.master.as_str()) {
            info!(switch = %payload, "Sentinel announced a new primary");
            self.wake.notify_one();
        }
    }

    fn disconnected(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sentinel_form_parses() {
        let u = SentinelUrl::parse("redis-sentinel://u:p%40ss@a:26379,b:26380,[::1]:7/3#mymaster").unwrap();
        assert!(!u.tls);
        let hosts: Vec<(String, u16)> = vec![("a".into(), 26379), ("b".into(), 26380), ("::1".into(), 7)];
        assert_eq!(u.sentinels, hosts);
        assert_eq!((u.db, u.master.as_str()), (3, "mymaster"));
        assert_eq!(u.node_url("10.0.0.1", 6379), "redis://u:p%40ss@10.0.0.1:6379/3");
        assert_eq!(u.node_url("fe80::1", 6379), "redis://u:p%40ss@[fe80::1]:6379/3");
        let t = SentinelUrl::parse("rediss-sentinel://h#m").unwrap();
        assert!(t.tls);
        assert_eq!((t.sentinels[0].1, t.db), (DEFAULT_PORT, 0));
        assert_eq!(t.node_url("h", 1), "rediss://h:1/0");
    }

    #[test]
    fn bad_sentinel_forms_are_refused() {
        for bad in [
            "redis-sentinel://a:1,b:2/0",
            "redis-sentinel://a:1/0#",
            "redis-sentinel://a:1/x#m",
            "redis-sentinel://a:1,,b:2/0#m",
            "redis-sentinel://a:99999/0#m",
            "redis-sentinel://a:1/0?x=1#m",
            "redis-sentinel:///0#m",
            "redis://a:1/0",
        ] {
            assert!(SentinelUrl::parse(bad).is_err(), "{bad}");
        }
    }
}

//! Abuse limits by rate: `login` per client address and per account,
//! `registerCustomer` per client address. (`createOrder` per customer is
//! counted by the placing transaction itself, on the customer's row: see
//! `store::placement`.)
//!
//! Each limit is a fixed window counted in Redis (one `INCR` and, for a
//! window's first hit, `PEXPIRE`, in one Lua script under
//! `REDIS_KEY_PREFIX`), so every instance sharing the Redis shares the
//! budget. When Redis errors or does not answer within [`REDIS_BUDGET`], the
//! limit is counted in this process instead ([`LocalWindows`]): a Redis
//! outage loosens a limit to per-process, never refuses everyone and never
//! makes a request wait. After a failure Redis is left alone for
//! [`REDIS_BACKOFF`], so an outage costs one short wait, not one per request.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::redis::RedisConn;

use crate::client_addr::limit_key;

/// How long a limit waits for Redis before counting locally.
pub const REDIS_BUDGET: Duration = Duration::from_millis(150);
/// How long Redis is skipped after it failed.
pub const REDIS_BACKOFF: Duration = Duration::from_secs(1);

/// `INCR` the window's counter; start the window on its first hit (also
/// when a counter somehow lost its TTL). Returns the count and the
/// milliseconds left in the window.
const WINDOW_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
";

/// A refused attempt: which limit, and how long until its window ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub retry_after: Duration,
}

/// One limit: at most `per_window` hits per `window` per subject.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Part of the key and of the message.
    pub name: &'static str,
    pub per_window: u32,
    pub window: Duration,
}

impl Limit {
    pub fn per_minute(name: &'static str, n: u32) -> Self {
        Limit { name, per_window: n, window: Duration::from_secs(60) }
    }
}

/// The settings of every limit.
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// `login` and `registerCustomer` per client address (`AUTH_RATE_LIMIT`).
    pub auth_per_address: u32,
    /// `login` per account (`LOGIN_RATE_LIMIT_PER_ACCOUNT`).
    pub login_per_account: u32,
}

/// Every rate limit of the service, counted in Redis or, while Redis is
/// away, in this process.
pub struct Limits {
    redis: Option<RedisConn>,
    prefix: String,
    script: redis::Script,
    local: LocalWindows,
    /// Redis is skipped until then after a failure.
    redis_down_until: Mutex<Option<Instant>>,
    auth_address: Limit,
    login_account: Limit,
}

impl Limits {
    /// Limits counted in Redis under `prefix` (`None`: in this process only).
    pub fn new(redis: Option<RedisConn>, prefix: &str, settings: LimitSettings) -> Self {
        Limits {
            redis,
            prefix: prefix.to_string(),
            script: redis::Script::new(WINDOW_SCRIPT),
            local: LocalWindows::default(),
            redis_down_until: Mutex::default(),
            auth_address: Limit::per_minute("auth-address", settings.auth_per_address),
            login_account: Limit::per_minute("login-account", settings.login_per_account),
        }
    }

    /// A `login` attempt from `addr` for `account` (the normalised email;
    /// `None` when it names no possible account).
    pub async fn login(&self, addr: IpAddr, account: Option<&str>) -> Result<(), Refusal> {
        self.hit(self.auth_address, &limit_key(addr).to_string())
            .await
            .map_err(|wait| refusal("too many attempts from this address", wait))?;
        if let Some(account) = account {
            self.hit(self.login_account, account)
                .await
                .map_err(|wait| refusal("too many attempts for this account", wait))?;
        }
        Ok(())
    }

    /// A `registerCustomer` attempt from `addr`.
    pub async fn register(&self, addr: IpAddr) -> Result<(), Refusal> {
        self.hit(self.auth_address, &limit_key(addr).to_string())
            .await
            .map_err(|wait| refusal("too many attempts from this address", wait))
    }

    /// Counts one hit on `limit` for `subject`; `Err(wait)` when over it.
    pub async fn hit(&self, limit: Limit, subject: &str) -> Result<(), Duration> {
        let key = format!("{}ratelimit:{}:{subject}", self.prefix, limit.name);
        match self.count_in_redis(&key, limit.window).await {
            Some((n, left)) if n > u64::from(limit.per_window) => Err(left),
            Some(_) => Ok(()),
            None => self.local.hit(&key, limit),
        }
    }

    /// The window's count after this hit and the time left in it, or `None`
    /// when Redis failed or is being skipped.
    async fn count_in_redis(&self, key: &str, window: Duration) -> Option<(u64, Duration)> {
        let mut conn = self.redis.clone()?;
        if self.redis_down_until.lock().expect("limits lock").is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let mut call = self.script.key(key);
        call.arg(window.as_millis() as u64);
        let answer = tokio::time::timeout(REDIS_BUDGET, call.invoke_async::<(u64, u64)>(&mut conn)).await;
        match answer {
            Ok(Ok((n, left_ms))) => Some((n, Duration::from_millis(left_ms))),
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {REDIS_BUDGET:?}"),
                };
                tracing::warn!(reason, "rate limits: Redis failed; counting in this process for now");
                *self.redis_down_until.lock().expect("limits lock") = Some(Instant::now() + REDIS_BACKOFF);
                None
            }
        }
    }
}

/// A refusal of `what` for `wait`, said in whole seconds.
pub(crate) fn refusal(what: &str, wait: Duration) -> Refusal {
    // whole seconds, rounded up: `Retry-After` and the message agree, and
    // a client that waits that long is let in
    let secs = wait.as_millis().div_ceil(1000).max(1) as u64;
    Refusal { message: format!("{what}; try again in {secs} s"), retry_after: Duration::from_secs(secs) }
}

/// Fixed windows counted in this process: the fallback while Redis is away.
#[derive(Default)]
pub struct LocalWindows {
    /// Key → (window start, hits in it).
    hits: Mutex<HashMap<String, (Instant, u32)>>,
}

/// Past this many keys, finished windows are dropped.
const LOCAL_KEYS: usize = 100_000;

impl LocalWindows {
    /// Counts one hit; `Err(wait)` when `key` is over `limit`.
    pub fn hit(&self, key: &str, limit: Limit) -> Result<(), Duration> {
        let now = Instant::now();
        let mut hits = self.hits.lock().expect("rate limiter lock");
        if hits.len() > LOCAL_KEYS {
            hits.retain(|_, (start, _)| now.duration_since(*start) < limit.window);
        }
        let entry = hits.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= limit.window {
            *entry = (now, 0);
        }
        if entry.1 >= limit.per_window {
            return Err(limit.window.saturating_sub(now.duration_since(entry.0)));
        }
        entry.1 += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(n: u32) -> LimitSettings {
        LimitSettings { auth_per_address: n, login_per_account: n }
    }

    #[tokio::test]
    async fn the_limit_applies_per_address() {
        let l = Limits::new(None, "t:", settings(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.register(a).await.is_ok());
        assert!(l.register(a).await.is_ok());
        let refused = l.register(a).await.unwrap_err();
        assert!(refused.retry_after >= Duration::from_secs(1) && refused.retry_after <= Duration::from_secs(60));
        assert!(l.register(b).await.is_ok());
    }

    #[tokio::test]
    async fn ipv6_addresses_of_one_64_share_a_budget() {
        let l = Limits::new(None, "t:", settings(1));
        assert!(l.register("2001:db8::1".parse().unwrap()).await.is_ok());
        assert!(l.register("2001:db8::ffff:2".parse().unwrap()).await.is_err());
        assert!(l.register("2001:db8:0:1::1".parse().unwrap()).await.is_ok());
    }

    #[tokio::test]
    async fn an_account_is_limited_whatever_the_address() {
        let l = Limits::new(None, "t:", LimitSettings { auth_per_address: 100, login_per_account: 2 });
        for i in 0..2 {
            assert!(l.login(format!("10.0.0.{i}").parse().unwrap(), Some("a@b.io")).await.is_ok());
        }
        let refused = l.login("10.0.0.9".parse().unwrap(), Some("a@b.io")).await.unwrap_err();
        assert!(refused.message.contains("account"), "{refused:?}");
        assert!(l.login("10.0.0.9".parse().unwrap(), Some("c@b.io")).await.is_ok());
    }
}

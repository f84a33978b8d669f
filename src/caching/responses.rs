//! The server's own cache of anonymous catalog responses: the one shared
//! cache every deployment has, in front of the GraphQL engine and the
//! database, so that the anonymous `products`/`product` reads that are most
//! of a shop's traffic cost a hash lookup instead of an execution.
//!
//! What it stores is exactly what [`super::Verdict::Public`] lets a CDN
//! store (the same bytes and `ETag`), keyed by the request as sent: the
//! POST body or the GET query string, and the response media type. It is
//! kept fresh three ways:
//!
//! * every order event this instance commits or receives from another
//!   (placements and cancellations move stock) and every product created or
//!   restocked through it moves a version ([`crate::events::EventBus::changes`]),
//!   and an entry from an older version is never served: a visitor's own
//!   order, an expiry anywhere or a restock through this instance shows at
//!   once;
//! * an entry is served for at most `CATALOG_CACHE_TTL` (default 1 s): the
//!   bound on what another instance's restock can leave unseen here;
//! * a version is taken *before* a request executes, so an answer read
//!   before a write that lands during its execution is stored as already
//!   stale.
//!
//! Bounded in entries and bytes; a full cache drops what is stale, then
//! everything (cheap, and an attacker cycling distinct documents gains
//! nothing from any smarter policy).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{body::Bytes, http::HeaderValue};

/// Entries kept at most.
const MAX_ENTRIES: usize = 4096;
/// Bytes of keys and bodies kept at most.
const MAX_BYTES: usize = 32 * 1024 * 1024;
/// A larger response is not kept (a catalog page is a few KiB).
const MAX_ENTRY_BYTES: usize = 512 * 1024;

/// A request as the cache knows it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// `GET` (query string) or `POST` (body): the same text means different
    /// requests in the two.
    pub get: bool,
    /// `application/graphql-response+json` asked for.
    pub modern: bool,
    pub request: Bytes,
}

/// A stored response.
#[derive(Clone)]
pub struct Hit {
    pub body: Bytes,
    pub etag: HeaderValue,
    /// How long ago it was executed (for `Age`).
    pub age: Duration,
}

/// The catalog version a request saw when it began executing.
#[derive(Clone, Copy)]
pub struct Ticket(u64);

struct Entry {
    version: u64,
    stored: Instant,
    body: Bytes,
    etag: HeaderValue,
}

pub struct ResponseCache {
    ttl: Duration,
    /// Moves on every catalog change ([`crate::events::EventBus::changes`]).
    version: Arc<AtomicU64>,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<Key, Entry>,
    bytes: usize,
}

impl ResponseCache {
    /// `ttl` zero: nothing is ever stored. `version` moves on every
    /// catalog change.
    pub fn new(ttl: Duration, version: Arc<AtomicU64>) -> Self {
        ResponseCache { ttl, version, entries: Mutex::default() }
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// The stored answer to this request, if it is fresh.
    pub fn get(&self, key: &Key) -> Option<Hit> {
        if !self.enabled() {
            return None;
        }
        let version = self.version();
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.map.get(key)?;
        let age = entry.stored.elapsed();
        (entry.version == version && age < self.ttl).then(|| Hit {
            body: entry.body.clone(),
            etag: entry.etag.clone(),
            age,
        })
    }

    /// Taken before a request executes; [`Self::put`] stores its answer
    /// only under the version it was read at.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.version())
    }

    pub fn put(&self, key: Key, ticket: Ticket, body: Bytes, etag: HeaderValue) {
        let size = key.request.len() + body.len();
        if !self.enabled() || body.len() > MAX_ENTRY_BYTES || ticket.0 != self.version() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.map.len() >= MAX_ENTRIES || entries.bytes + size > MAX_BYTES {
            entries.drop_stale(ticket.0, self.ttl);
            if entries.map.len() >= MAX_ENTRIES || entries.bytes + size > MAX_BYTES {
                entries.map.clear();
                entries.bytes = 0;
            }
        }
        let entry = Entry { version: ticket.0, stored: Instant::now(), body, etag };
        let key_len = key.request.len();
        if let Some(old) = entries.map.insert(key, entry) {
            entries.bytes -= key_len + old.body.len();
        }
        entries.bytes += size;
    }
}

impl Entries {
    fn drop_stale(&mut self, version: u64, ttl: Duration) {
        let mut freed = 0;
        self.map.retain(|key, e| {
            let keep = e.version == version && e.stored.elapsed() < ttl;
            if !keep {
                freed += key.request.len() + e.body.len();
            }
            keep
        });
        self.bytes -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> Key {
        Key { get: false, modern: false, request: Bytes::copy_from_slice(text.as_bytes()) }
    }

    fn body(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn an_answer_is_served_until_a_write_or_its_ttl() {
        let cache = ResponseCache::new(Duration::from_secs(60), Arc::default());
        let t = cache.ticket();
        cache.put(key("a"), t, body("{}"), HeaderValue::from_static("\"1\""));
        assert_eq!(cache.get(&key("a")).unwrap().body, body("{}"));
        assert!(cache.get(&key("b")).is_none());
        cache.version.fetch_add(1, Ordering::AcqRel);
        assert!(cache.get(&key("a")).is_none());

        let short = ResponseCache::new(Duration::from_nanos(1), Arc::default());
        short.put(key("a"), short.ticket(), body("{}"), HeaderValue::from_static("\"1\""));
        std::thread::sleep(Duration::from_millis(1));
        assert!(short.get(&key("a")).is_none());
    }

    #[test]
    fn an_answer_read_before_a_write_is_not_stored() {
        let cache = ResponseCache::new(Duration::from_secs(60), Arc::default());
        let before = cache.ticket();
        cache.version.fetch_add(1, Ordering::AcqRel);
        cache.put(key("a"), before, body("{}"), HeaderValue::from_static("\"1\""));
        assert!(cache.get(&key("a")).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_bounds() {
        let cache = ResponseCache::new(Duration::from_secs(60), Arc::default());
        let big = Bytes::from(vec![b' '; MAX_ENTRY_BYTES]);
        for i in 0..(MAX_BYTES / MAX_ENTRY_BYTES) * 3 {
            cache.put(key(&i.to_string()), cache.ticket(), big.clone(), HeaderValue::from_static("\"1\""));
            let entries = cache.entries.lock().unwrap();
            assert!(entries.bytes <= MAX_BYTES && entries.map.len() <= MAX_ENTRIES);
            assert_eq!(entries.bytes, entries.map.iter().map(|(k, e)| k.request.len() + e.body.len()).sum::<usize>());
        }
        for i in 0..MAX_ENTRIES * 2 {
            cache.put(key(&i.to_string()), cache.ticket(), body("{}"), HeaderValue::from_static("\"1\""));
        }
        assert!(cache.entries.lock().unwrap().map.len() <= MAX_ENTRIES);
        // too large to keep
        cache.put(
            key("huge"),
            cache.ticket(),
            Bytes::from(vec![b' '; MAX_ENTRY_BYTES + 1]),
            HeaderValue::from_static("\"1\""),
        );
        assert!(cache.get(&key("huge")).is_none());
    }

    #[test]
    fn a_zero_ttl_turns_it_off() {
        let cache = ResponseCache::new(Duration::ZERO, Arc::default());
        cache.put(key("a"), cache.ticket(), body("{}"), HeaderValue::from_static("\"1\""));
        assert!(cache.get(&key("a")).is_none());
    }
}

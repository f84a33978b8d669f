//! # shopgraph
//!
//! A GraphQL commerce API whose unpaid orders cancel themselves: Redis key
//! expiry is the trigger, the database row is the truth.
//!
//! # Layout
//!
//! * [`config`]: settings from the environment and flags, validated once.
//! * [`app`]: builds the whole service from a config; tests use the same builder.
//! * [`serve`]: the HTTP/1.1 accept loop, header and idle timeouts.
//! * [`connlimit`]: open connections per client address and per process.
//! * [`http`]: the axum router and its layers; `/graphql` over HTTP (one execution path for POST
//!   and GET); the operator's endpoints (`/readyz`, `/metrics`, GraphiQL).
//! * [`ws`]: GraphQL over websocket: the session loop, the two protocols' parser, shared executions
//!   of identical subscriptions (rendered once per event).
//! * [`caching`]: `Cache-Control`, `ETag` and 304 for catalog reads a CDN can serve, and the
//!   server's own cache of those answers ([`caching::responses`], `CATALOG_CACHE_TTL`).
//! * [`cors`]: cross-origin access for browser storefronts (`CORS_ALLOWED_ORIGINS`).
//! * [`auth`]: the admin token, customer JWTs, password hashing, who may see an order ([`auth::Viewer`]).
//! * [`graphql`]: schema types and resolvers; the one place errors get codes.
//! * [`orders`]: the rules of the contract (place, pay, cancel).
//! * [`domain`]: parsed value types (ids, quantities, money, emails).
//! * [`error`]: the domain's error vocabulary.
//! * [`store`]: the storage trait and its Postgres and SQLite backends; all SQL.
//! * [`expiry`]: expiry keys and the deadline index ([`expiry::schedule`]), the nudger, the
//!   keyspace listener, the notification self-check, the sweeper, the resync of lost keys.
//! * [`events`]: order events: outbox relay to Redis, fan-out to subscribers, de-duplication.
//! * [`redis`]: the Redis mechanism: connections (plain or TLS; one [`redis::RedisConn`] for every
//!   topology; the primary Sentinel names, followed across failovers), a subscription that survives
//!   reconnects and failovers, a private `redis-server` child when none is reachable.
//! * [`ratelimit`]: rate limits (login per address and account, sign-ups, orders), shared through Redis.
//! * [`client_addr`]: the client's address, from the peer or a trusted proxy's `X-Forwarded-For`.
//! * [`telemetry`]: tracing and Prometheus metrics; [`log_writer`]: log lines to stderr, quiet ones batched.

pub mod app;
pub mod auth;
pub mod caching;
pub mod client_addr;
pub mod config;
pub mod connlimit;
pub mod cors;
pub mod domain;
pub mod error;
pub mod events;
pub mod expiry;
pub mod graphql;
pub mod http;
pub mod log_writer;
pub mod orders;
pub mod ratelimit;
pub mod redis;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod ws;

pub use app::App;
pub use config::Config;

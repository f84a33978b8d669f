//! Builds the whole service from a [`Config`]: store, Redis, background
//! tasks, schema, router, bound listener. `main` and every test build it the
//! same way (tests on port 0).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use rand::RngCore;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    auth::Auth,
    config::Config,
    connlimit::{self, AddrLimits},
    events::{fanout, outbox::Outbox, relay, EventBus},
    expiry::{
        canary::Canary,
        listener::{CancelQueue, Listener, ListenerState},
        nudger::{Fallback, Nudger},
        schedule::{Keys, Scheduler},
        sweeper,
    },
    graphql::{self, types::StoreLoader, Services},
    http::{self, HttpState},
    orders::Orders,
    ratelimit::{LimitSettings, Limits},
    redis::{
        client::{self, TrustedCa},
        server::{self, PrivateRedis, RedisStartError},
    },
    serve::{self, ServeSettings},
    store::{self, PendingLimits, Store, StoreError},
    telemetry,
    ws::WsSettings,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("DATABASE_URL: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Redis(#[from] RedisStartError),
    #[error("LISTEN_ADDR: cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// A built service, bound to its port, background tasks running.
pub struct App {
    pub addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub orders: Arc<Orders>,
    pub redis_url: String,
    listener: tokio::net::TcpListener,
    router: Router,
    serve: ServeSettings,
    tracker: TaskTracker,
    /// Cancelled when the server stops: every background task and websocket
    /// watches it.
    shutdown: CancellationToken,
    /// Kept alive for the life of the app; its drop stops the child.
    _private_redis: Option<PrivateRedis>,
}

/// Opens the configured database, creating and migrating it.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    let read = config
        .database_read_url
        .as_ref()
        .map(|url| store::ReadReplica { url: url.0.clone(), max_lag: config.database_read_max_lag });
    store::connect(&config.database_url, config.db_max_connections, config.db_timeout, read.as_ref()).await
}

impl App {
    pub async fn build(config: Config) -> Result<App, StartError> {
        telemetry::metrics_handle();
        let store = open_store(&config).await?;
        let ca =
            config.redis_tls_ca_file.as_deref().map(TrustedCa::read).transpose().map_err(RedisStartError::TlsCa)?;
        let (redis_url, private_redis) = server::resolve_with(config.redis_url.as_deref(), ca.as_ref()).await?;
        let client = client::client(&redis_url, ca.as_ref())
            .map_err(|e| RedisStartError::Unreachable { url: redis_url.clone(), reason: e.to_string() })?;
        let db = client.get_connection_info().redis_settings().db();
        // Commands fail fast while Redis is away: an order is still placed
        // (the sweep covers it) instead of hanging on a dead connection.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(1000)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config)
            .await
            .map_err(|e| RedisStartError::Unreachable { url: redis_url.clone(), reason: e.to_string() })?;

        let jwt_secret = match &config.jwt_secret {
            Some(s) => s.0.clone().into_bytes(),
            None => {
                warn!("JWT_SECRET is not set: using a random key, so customer tokens die with this process and other instances reject them");
                let mut key = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut key);
                key
            }
        };
        let auth = Auth::new(config.admin_token.clone(), &jwt_secret, config.jwt_lifetime);
        if config.admin_token.is_none() {
            warn!("ADMIN_TOKEN is not set: admin operations are refused");
        }

        let keys = Keys { prefix: config.redis_key_prefix.clone() };
        let (bus, relay_inbox) = EventBus::new();
        let scheduler = Scheduler { conn: conn.clone(), keys: keys.clone() };
        let pending = PendingLimits { orders: config.max_pending_orders, units: config.max_pending_units };
        let orders =
            Arc::new(Orders { store: store.clone(), scheduler, events: bus.clone(), ttl: config.order_ttl, pending });

        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let listener_state = Arc::new(ListenerState::default());
        let sweep_now = Arc::new(Notify::new());

        let outbox = Outbox::new(store.clone());
        tracker.spawn(relay::run(relay_inbox, outbox.clone(), conn.clone(), keys.events(), shutdown.clone()));
        tracker.spawn(fanout::run(bus.clone(), outbox, client.clone(), keys.events(), shutdown.clone()));
        let queue = CancelQueue::default();
        let fallback = Fallback { listener: listener_state.clone(), cancel: queue.sender() };
        tracker.spawn(Nudger::new(conn.clone(), keys.clone(), fallback).run(config.nudge_interval, shutdown.clone()));
        let (canary, canary_inbox) = Canary::new(conn.clone(), keys.clone(), listener_state.clone());
        tracker.spawn(canary.run(shutdown.clone()));
        tracker.spawn(
            Listener {
                client: client.clone(),
                conn: conn.clone(),
                keys: keys.clone(),
                db,
                orders: orders.clone(),
                state: listener_state.clone(),
                sweep_now: sweep_now.clone(),
                canary: canary_inbox,
                queue,
            }
            .run(tracker.clone(), shutdown.clone()),
        );
        tracker.spawn(sweeper::run(orders.clone(), config.sweep_interval, sweep_now, shutdown.clone()));

        let services = Arc::new(Services {
            store: store.clone(),
            orders: orders.clone(),
            auth: auth.clone(),
            events: bus.clone(),
            loader: async_graphql::dataloader::DataLoader::new(StoreLoader(store.clone()), tokio::spawn)
                .delay(Duration::from_micros(200)),
            limits: Limits::new(
                Some(conn.clone()),
                &config.redis_key_prefix,
                LimitSettings {
                    auth_per_address: config.auth_rate_limit_per_minute,
                    login_per_account: config.login_rate_limit_per_account,
                    orders_per_customer: config.order_rate_limit_per_minute,
                },
            ),
        });
        let documents = graphql::Documents::default();
        let persisted = graphql::persisted::PersistedQueries::new(conn.clone(), &config.redis_key_prefix);
        let schema = graphql::build(services, documents.clone(), config.introspection, persisted);
        let responses =
            Arc::new(crate::caching::responses::ResponseCache::new(config.catalog_cache_ttl, bus.changes()));
        let state = HttpState {
            schema,
            documents,
            auth,
            store: store.clone(),
            redis: conn,
            listener: listener_state,
            events: bus,
            ws: Arc::new(WsSettings {
                max_subscriptions: config.ws_max_subscriptions,
                init_timeout: config.ws_init_timeout,
                keepalive: config.ws_keepalive,
                anonymous_idle_timeout: config.ws_anonymous_idle_timeout,
                hubs: Default::default(),
            }),
            ws_permits: AddrLimits::new(config.ws_per_ip(), config.ws_max_connections),
            shutdown: shutdown.clone(),
            request_timeout: config.request_timeout,
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            cors: config.cors_allowed_origins.clone().map(Arc::new),
            catalog_max_age: config.catalog_max_age,
            responses,
            metrics_token: config.metrics_token.clone(),
            graphiql: config.graphiql,
        };
        let router = http::router(state, &config.demo_dir);
        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| StartError::Listen { addr: config.listen_addr, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen_addr, source })?;
        let serve = serve_settings(&config);
        info!(backend = store.backend(), redis = %crate::config::redact_url(&redis_url), "shopgraph built");
        Ok(App {
            addr,
            store,
            orders,
            redis_url,
            listener,
            router,
            serve,
            tracker,
            shutdown,
            _private_redis: private_redis,
        })
    }

    /// Serves until `stop` resolves, then closes websockets (1001), lets
    /// in-flight requests finish and waits for the background tasks.
    pub async fn run(self, stop: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let token = self.shutdown.clone();
        let stopper = tokio::spawn(async move {
            stop.await;
            token.cancel();
        });
        serve::run(self.listener, self.router, self.serve, self.shutdown.clone()).await;
        stopper.abort();
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await.is_err() {
            warn!("background tasks did not stop within 10 s");
        }
        info!("shopgraph stopped");
        Ok(())
    }
}

/// The connection caps and timeouts. The process-wide cap keeps the
/// database pool's descriptors (a few per SQLite connection) free below
/// the file-descriptor limit; a per-address cap at or over it would let one
/// address fill the process, so that is said at start.
fn serve_settings(config: &Config) -> ServeSettings {
    let budget = connlimit::fd_budget(4 * u64::from(config.db_max_connections));
    let total = match config.max_connections {
        Some(n) if n > budget => {
            warn!(
                configured = n,
                budget, "MAX_CONNECTIONS is over what the file-descriptor limit allows; using {budget}"
            );
            budget
        }
        Some(n) => n,
        None => budget,
    };
    if config.max_connections_per_ip >= total {
        warn!(
            per_ip = config.max_connections_per_ip,
            total, "MAX_CONNECTIONS_PER_IP is not below the process-wide cap: one address can take every connection"
        );
    }
    ServeSettings {
        header_timeout: config.http_header_timeout,
        idle_timeout: config.http_idle_timeout,
        limits: AddrLimits::new(config.max_connections_per_ip, total),
    }
}

//! Builds the whole service from a [`Config`]: store, Redis, background
//! tasks, schema, router, bound listener. `main` and every test build it the
//! same way (tests on port 0).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use async_graphql::dataloader::DataLoader;
use axum::Router;
use rand::RngCore;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    auth::Auth,
    caching::responses::ResponseCache,
    config::Config,
    connlimit::{self, AddrLimits},
    events::{
        fanout,
        outbox::Outbox,
        relay::{self, RelayInbox},
        EventBus,
    },
    expiry::{
        canary::Canary,
        listener::{CancelQueue, Listener, ListenerState},
        nudger::{Fallback, Nudger},
        schedule::{Keys, Scheduler},
        sweeper,
    },
    graphql::{self, persisted::PersistedQueries, types::StoreLoader, Services},
    http::{self, HttpState},
    orders::Orders,
    ratelimit::{LimitSettings, Limits},
    redis::{
        client::{self, TrustedCa},
        cluster::{self, ClusterTarget},
        conn, sentinel,
        server::{self, PrivateRedis, RedisStartError},
        subscription, RedisConn, Topology,
    },
    serve::{self, ServeSettings},
    store::{self, PlacementLimits, Store, StoreError},
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
    /// Wires every setting in four steps, each below: connect the store and
    /// Redis, build the domain services, spawn the background tasks, build
    /// the HTTP state; then binds the listener.
    pub async fn build(config: Config) -> Result<App, StartError> {
        telemetry::metrics_handle();
        let store = open_store(&config).await?;
        let mut redis = RedisLink::connect(&config).await?;
        let (domain, relay_inbox) = Domain::new(&config, store, &redis);
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        redis.spawn_follower(&tracker, &shutdown);
        let listener_state = spawn_background(&config, &domain, &redis, relay_inbox, &tracker, &shutdown);
        let state = http_state(&config, &domain, &redis, listener_state, &shutdown);
        let router = http::router(state, &config.demo_dir);
        let listener = tokio::net::TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| StartError::Listen { addr: config.listen_addr, source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen_addr, source })?;
        let serve = serve_settings(&config);
        info!(backend = domain.store.backend(), redis = %crate::config::redact_url(&redis.url), "shopgraph built");
        Ok(App {
            addr,
            store: domain.store,
            orders: domain.orders,
            redis_url: redis.url,
            listener,
            router,
            serve,
            tracker,
            shutdown,
            _private_redis: redis.private,
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

/// The Redis of this process: where subscriptions connect (each opens its
/// own connection) and one managed connection for every command.
struct RedisLink {
    url: String,
    /// The private server, when one had to be started.
    private: Option<PrivateRedis>,
    topology: Topology,
    conn: RedisConn,
    /// The database index, whose keyspace events the listener reads.
    db: i64,
    /// Sentinel only: the task that follows failovers, until spawned.
    follower: Option<sentinel::Follower>,
}

impl RedisLink {
    async fn connect(config: &Config) -> Result<RedisLink, StartError> {
        let ca =
            config.redis_tls_ca_file.as_deref().map(TrustedCa::read).transpose().map_err(RedisStartError::TlsCa)?;
        if let Some(url) = config.redis_url.as_deref().filter(|u| sentinel::is_sentinel(u)) {
            let followed = sentinel::connect(url, ca.as_ref())
                .await
                .map_err(|reason| RedisStartError::Unreachable { url: crate::config::redact_url(url), reason })?;
            return Ok(RedisLink {
                url: url.to_string(),
                private: None,
                topology: Topology::Single(subscription::Target::followed(followed.primary)),
                conn: followed.conn,
                db: followed.db,
                follower: Some(followed.follower),
            });
        }
        if let Some(url) = config.redis_url.as_deref().filter(|u| cluster::is_cluster(u)) {
            return Self::connect_cluster(url, ca).await;
        }
        let (url, private) = server::resolve_with(config.redis_url.as_deref(), ca.as_ref()).await?;
        let unreachable = |e: redis::RedisError| RedisStartError::Unreachable {
            url: crate::config::redact_url(&url),
            reason: e.to_string(),
        };
        let client = client::client(&url, ca.as_ref()).map_err(unreachable)?;
        let db = client.get_connection_info().redis_settings().db();
        let conn = RedisConn::single(
            ConnectionManager::new_with_config(client.clone(), conn::manager_config()).await.map_err(unreachable)?,
        );
        Ok(RedisLink { url, private, topology: Topology::Single(client.into()), conn, db, follower: None })
    }

    /// Starts what keeps the connections on the right server (Sentinel's
    /// follower), if this topology has one.
    fn spawn_follower(&mut self, tracker: &TaskTracker, shutdown: &CancellationToken) {
        if let Some(follower) = self.follower.take() {
            tracker.spawn(follower.run(shutdown.clone()));
        }
    }

    /// A Redis Cluster by its seeds: the cluster command connection (which
    /// must reach a seed now), database 0.
    async fn connect_cluster(url: &str, ca: Option<TrustedCa>) -> Result<RedisLink, StartError> {
        let unreachable = |reason: String| {
            let reason = format!("{reason}{}", client::tls_hint(url, &reason));
            RedisStartError::Unreachable { url: crate::config::redact_url(url), reason }
        };
        let target = ClusterTarget::parse(url).map_err(&unreachable)?.with_ca(ca);
        let conn = tokio::time::timeout(Duration::from_secs(5), target.connect())
            .await
            .map_err(|_| unreachable("no seed node answered within 5 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(RedisLink {
            url: url.to_string(),
            private: None,
            topology: Topology::Cluster(target),
            conn: RedisConn::cluster(conn),
            db: 0,
            follower: None,
        })
    }
}

/// The services every entry point shares: the store, the order rules, the
/// event bus, credentials, and the Redis names of this deployment.
struct Domain {
    store: Arc<dyn Store>,
    keys: Keys,
    events: EventBus,
    orders: Arc<Orders>,
    auth: Arc<Auth>,
}

impl Domain {
    /// The domain, and the bus's relay inbox for [`spawn_background`].
    fn new(config: &Config, store: Arc<dyn Store>, redis: &RedisLink) -> (Domain, RelayInbox) {
        let keys = Keys { prefix: config.redis_key_prefix.clone() };
        let (events, relay_inbox) = EventBus::new();
        let orders = Arc::new(Orders {
            store: store.clone(),
            scheduler: Scheduler::new(redis.conn.clone(), keys.clone()),
            events: events.clone(),
            ttl: config.order_ttl,
            limits: PlacementLimits {
                orders: config.max_pending_orders,
                units: config.max_pending_units,
                per_window: config.order_rate_limit_per_minute,
            },
            over_rate: Default::default(),
        });
        let auth = Auth::new(config.admin_token.clone(), &jwt_secret(config), config.jwt_lifetime);
        if config.admin_token.is_none() {
            warn!("ADMIN_TOKEN is not set: admin operations are refused");
        }
        (Domain { store, keys, events, orders, auth }, relay_inbox)
    }
}

/// `JWT_SECRET`, or a random key for this process alone.
fn jwt_secret(config: &Config) -> Vec<u8> {
    match &config.jwt_secret {
        Some(s) => s.0.clone().into_bytes(),
        None => {
            warn!("JWT_SECRET is not set: using a random key, so customer tokens die with this process and other instances reject them");
            let mut key = vec![0u8; 32];
            rand::thread_rng().fill_bytes(&mut key);
            key
        }
    }
}

/// Starts the event relay and fan-out and the expiry tasks (nudger, canary,
/// listener, sweeper) on `tracker`; each stops when `shutdown` is cancelled.
/// Returns the listener's state, which readiness and the nudger read.
fn spawn_background(
    config: &Config,
    domain: &Domain,
    redis: &RedisLink,
    relay_inbox: RelayInbox,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Arc<ListenerState> {
    let (keys, conn) = (&domain.keys, &redis.conn);
    let outbox = Outbox::new(domain.store.clone());
    tracker.spawn(relay::run(relay_inbox, outbox.clone(), conn.clone(), keys.events(), shutdown.clone()));
    tracker.spawn(fanout::run(domain.events.clone(), outbox, redis.topology.clone(), keys.events(), shutdown.clone()));

    let listener_state = Arc::new(ListenerState::default());
    let sweep_now = Arc::new(Notify::new());
    let queue = CancelQueue::default();
    let fallback = Fallback { listener: listener_state.clone(), cancel: queue.sender() };
    tracker.spawn(Nudger::new(conn.clone(), keys.clone(), fallback).run(config.nudge_interval, shutdown.clone()));
    let (canary, canary_inbox) = Canary::new(conn.clone(), keys.clone(), listener_state.clone());
    tracker.spawn(canary.run(shutdown.clone()));
    let listener = Listener {
        topology: redis.topology.clone(),
        conn: conn.clone(),
        keys: keys.clone(),
        db: redis.db,
        orders: domain.orders.clone(),
        state: listener_state.clone(),
        sweep_now: sweep_now.clone(),
        canary: canary_inbox,
        queue,
    };
    tracker.spawn(listener.run(tracker.clone(), shutdown.clone()));
    tracker.spawn(sweeper::run(domain.orders.clone(), config.sweep_interval, sweep_now, shutdown.clone()));
    listener_state
}

/// The GraphQL schema over the domain, and everything the router serves it
/// with: websocket settings, limits, CORS, caching.
fn http_state(
    config: &Config,
    domain: &Domain,
    redis: &RedisLink,
    listener: Arc<ListenerState>,
    shutdown: &CancellationToken,
) -> HttpState {
    let services = Arc::new(Services {
        store: domain.store.clone(),
        orders: domain.orders.clone(),
        auth: domain.auth.clone(),
        events: domain.events.clone(),
        loader: DataLoader::new(StoreLoader(domain.store.clone()), tokio::spawn).delay(Duration::from_micros(200)),
        limits: Limits::new(
            Some(redis.conn.clone()),
            &config.redis_key_prefix,
            LimitSettings {
                auth_per_address: config.auth_rate_limit_per_minute,
                login_per_account: config.login_rate_limit_per_account,
            },
        ),
    });
    let documents = graphql::Documents::default();
    let persisted = PersistedQueries::new(redis.conn.clone(), &config.redis_key_prefix);
    let known_schema = graphql::build_known(services.clone(), config.introspection);
    let schema = graphql::build(services, documents.clone(), config.introspection, persisted);
    HttpState {
        schema,
        known_schema,
        documents,
        auth: domain.auth.clone(),
        store: domain.store.clone(),
        redis: redis.conn.clone(),
        listener,
        events: domain.events.clone(),
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
        catalog_cache_control: crate::caching::cache_control(config.catalog_max_age),
        responses: Arc::new(ResponseCache::new(config.catalog_cache_ttl, domain.events.changes())),
        metrics_token: config.metrics_token.clone(),
        graphiql: config.graphiql,
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

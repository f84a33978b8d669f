//! The read replica (`DATABASE_READ_URL`) that serves the public catalog.
//!
//! Only catalog reads come here; orders, customers and everything a customer
//! just wrote stay on the primary. The replica is used while it answers and
//! its replay lag is within `DATABASE_READ_MAX_LAG`: a watcher measures the
//! lag every second, and a read that fails on the replica marks it down and
//! is answered from the primary at once, so a replica that is stopped,
//! unreachable or far behind costs a storefront nothing but the primary's
//! load.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool,
};
use tracing::{info, warn};

use crate::{store::StoreError, telemetry};

/// How stale a replica is: zero when it has replayed all it received, else
/// the age of its last replayed transaction (when it has replayed none since
/// it started, its data is at least as old as its start). A server that is
/// not in recovery (pointed at a primary) is not stale.
const LAG_SECONDS: &str = "
SELECT CASE
    WHEN NOT pg_is_in_recovery() THEN 0
    WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
    ELSE EXTRACT(EPOCH FROM now() - COALESCE(pg_last_xact_replay_timestamp(), pg_postmaster_start_time()))
END::float8";

/// How often the lag is measured.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A health check that takes longer than this counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Replica {
    pool: PgPool,
    max_lag: Duration,
    usable: AtomicBool,
}

impl Replica {
    /// A pool for the replica, connected lazily: a replica that is down when
    /// the server starts does not stop it; reads go to the primary until the
    /// replica answers.
    pub fn open(
        url: &str,
        max_connections: u32,
        timeout: Duration,
        max_lag: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout.min(Duration::from_secs(1)))
            .connect_lazy_with(options);
        let replica = Arc::new(Replica { pool, max_lag, usable: AtomicBool::new(false) });
        tokio::spawn(watch(Arc::downgrade(&replica)));
        Ok(replica)
    }

    pub fn is_usable(&self) -> bool {
        self.usable.load(Ordering::Relaxed)
    }

    /// Runs `read` on the replica while it is usable, else (or when it
    /// fails there) on the primary.
    pub async fn read<'a, T, F, Fut>(&'a self, primary: &'a PgPool, read: F) -> Result<T, StoreError>
    where
        F: Fn(&'a PgPool) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + 'a,
    {
        if self.is_usable() {
            match read(&self.pool).await {
                Ok(v) => return Ok(v),
                Err(e) => self.set_usable(false, &format!("a read failed: {e}")),
            }
        }
        read(primary).await
    }

    fn set_usable(&self, usable: bool, why: &str) {
        if self.usable.swap(usable, Ordering::Relaxed) != usable {
            telemetry::read_replica_up(usable);
            if usable {
                info!("the read replica serves the catalog again");
            } else {
                warn!(reason = why, "the read replica is not used; the catalog is read from the primary");
            }
        }
    }

    async fn check(&self) {
        let lag = tokio::time::timeout(CHECK_TIMEOUT, sqlx::query_scalar::<_, f64>(LAG_SECONDS).fetch_one(&self.pool));
        match lag.await {
            Ok(Ok(lag)) if lag <= self.max_lag.as_secs_f64() => self.set_usable(true, ""),
            Ok(Ok(lag)) => self.set_usable(false, &format!("replay lag {lag:.1} s is over DATABASE_READ_MAX_LAG")),
            Ok(Err(e)) => self.set_usable(false, &e.to_string()),
            Err(_) => self.set_usable(false, "the lag check timed out"),
        }
    }
}

/// Measures the lag until the store (and with it the replica) is dropped.
async fn watch(replica: Weak<Replica>) {
    telemetry::read_replica_up(false);
    loop {
        let Some(r) = replica.upgrade() else { return };
        r.check().await;
        drop(r);
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

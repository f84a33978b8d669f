//! Expiry: how late an unpaid order's cancellation reaches an admin
//! `orderCancelled` subscriber (receipt − the order's `expiresAt`), in a
//! burst, among a million pending orders, at volume; and how fast a backlog
//! of overdue orders drains after a start.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{canary, customer_and_product, deploy, finish, label_case, lag_cells, spec};
use crate::{
    client::{now_ms, Gql, Subscribers},
    direct::{insert_scheduled, Bulk, DbConn},
    log,
    procfs::{Usage, Watch},
    report::{summarise, Cell, Summary, Table},
    server::{Deployment, StoreKind},
    Ctx,
};

/// What one expiry measurement found.
struct Expired {
    n: usize,
    received: usize,
    /// receipt − expiresAt, ms
    lag: Summary,
    /// cancelled_at − expires_at from the database, ms
    db_lag: Summary,
    /// last receipt − first deadline, ms
    last_recv_after_t0: f64,
    /// last cancelled_at − first deadline, ms
    last_cancel_after_t0: f64,
    usage: Usage,
    insert_secs: f64,
    /// events that arrived more than a second after the deadline
    late: usize,
}

/// An admin subscriber, live (checked by a canary), on a deployment with a
/// customer and a product.
async fn admin_subscriber(dep: &Deployment, gql: &Gql) -> Result<(Subscribers, crate::client::Customer, i64)> {
    let (customer, product) = customer_and_product(gql, &dep.admin).await?;
    let admin = dep.admin.clone();
    let mut subs = Subscribers::connect(&dep.ws, 1, 1, |_| admin.clone()).await?;
    canary(gql, &dep.admin, &mut subs, std::slice::from_ref(&customer), product, 1).await?;
    Ok((subs, customer, product))
}

/// `n` orders, written directly, expiring evenly over the second starting
/// `lead` from now; waits for every cancellation event.
async fn same_second(ctx: &Ctx, dep: &Deployment, n: usize) -> Result<Expired> {
    let gql = Gql::new(ctx.http.clone(), &dep.http);
    let (mut subs, customer, product) = admin_subscriber(dep, &gql).await?;
    let db = dep.db()?;
    let mut conn = DbConn::open(db).await?;
    let first = conn.reserve_ids(n as i64).await?;
    // time to write n orders, generously: ~60 µs each plus a second
    let lead_ms = 1500 + (n as i64 * 60 / 1000) * 2;
    let t0 = now_ms() as i64 + lead_ms;
    let bulk = Bulk {
        first_id: first,
        n: n as i64,
        t0_ms: t0,
        span_ms: 1000,
        customer: customer.id,
        product,
        price_cents: 1000,
    };
    let ins = Instant::now();
    insert_scheduled(db, &dep.redis_url, &dep.prefix, &bulk, true).await?;
    let insert_secs = ins.elapsed().as_secs_f64();
    log(&format!(
        "  {n} orders written in {insert_secs:.2} s; deadlines in [{} ms, +1 s) from now",
        t0 - now_ms() as i64
    ));
    let watch: Watch = dep.watch();
    // the window starts just before the first deadline (events queue meanwhile)
    let wait_ms = (t0 as f64 - 50.0 - now_ms()).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(wait_ms / 1000.0)).await;
    let a_ms = now_ms();
    let a = watch.snapshot();
    let mut seen = 0usize;
    let (ds, ended) = subs
        .collect(Duration::from_millis(lead_ms as u64 + 1000) + Duration::from_secs(120), None, |d| {
            if d.order >= first && d.order <= bulk.last_id() {
                seen += 1;
            }
            seen >= n
        })
        .await;
    let b = watch.snapshot();
    subs.close().await;
    let mine: Vec<_> = ds.iter().filter(|d| d.order >= first && d.order <= bulk.last_id()).collect();
    let mut lag: Vec<f64> = mine.iter().map(|d| d.recv_ms - d.expires_ms).collect();
    let late = lag.iter().filter(|l| **l > 1000.0).count();
    let last_recv = mine.iter().map(|d| d.recv_ms).fold(f64::NAN, f64::max);
    // the database's view, independent of the subscriber
    let pending_left = conn.pending_between(first, bulk.last_id()).await?;
    let times = conn.cancel_times(first, bulk.last_id()).await?;
    conn.close().await;
    let mut db_lag: Vec<f64> = times.iter().map(|(e, c)| c - e).collect();
    let last_cancel = times.iter().map(|(_, c)| *c).fold(f64::NAN, f64::max);
    if let Some(e) = ended.first() {
        log(&format!("  subscriber ended: {e}"));
    }
    if mine.len() < n {
        log(&format!("  only {} of {n} cancellation events arrived; {pending_left} orders still pending", mine.len()));
    }
    let active_secs = (last_recv.max(last_cancel) - a_ms) / 1000.0;
    Ok(Expired {
        n,
        received: mine.len(),
        lag: summarise(&mut lag),
        db_lag: summarise(&mut db_lag),
        last_recv_after_t0: last_recv - t0 as f64,
        last_cancel_after_t0: last_cancel - t0 as f64,
        usage: a.usage_until(&b).over(active_secs),
        insert_secs,
        late,
    })
}

fn per_k_cells(x: &Expired, store: Option<StoreKind>) -> Vec<Cell> {
    let k = |secs: f64| secs * 1e6 / x.n.max(1) as f64;
    vec![
        if x.usage.server_secs > 0.0 {
            Cell::num(k(x.usage.server_secs), 0)
        } else {
            Cell::Missing("no server pid".into())
        },
        if store == Some(StoreKind::Postgres) { Cell::num(k(x.usage.pg_secs), 0) } else { Cell::text("–") },
    ]
}

fn needs_harness(target: &crate::server::Target) -> Option<&'static str> {
    target.is_url().then_some("needs a server the harness starts (direct inserts)")
}

pub async fn burst(ctx: &Ctx) -> Vec<Table> {
    let n = ctx.sizes.burst;
    let mut t = Table::new(&format!("Expiry lag, {n} orders expiring in the same second (receipt by an admin orderCancelled subscriber − expiresAt)"),
        &[
            "orders",
            "events received",
            "lag p50 ms",
            "lag p99 ms",
            "lag max ms",
            "DB lag p99 ms (cancelled_at − expires_at)",
            "later than 1 s",
            "server CPU ms / 1k cancellations",
            "Postgres CPU ms / 1k cancellations",
            "CPU cores used, first deadline to last event (server · pg · redis · bench · other)",
        ],
    );
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            if let Some(why) = needs_harness(target) {
                t.push_failed(&target.label, &label_case(store, ""), why);
                continue;
            }
            let dep = match deploy(ctx, target, &spec(store, "1h")).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
                    continue;
                }
            };
            let res = same_second(ctx, &dep, n).await;
            match &res {
                Ok(x) => {
                    let mut cells = vec![Cell::num(x.n as f64, 0), Cell::num(x.received as f64, 0)];
                    cells.extend(lag_cells(&x.lag));
                    cells.push(Cell::opt(x.db_lag.p99, 1, "none cancelled"));
                    cells.push(Cell::num(x.late as f64, 0));
                    cells.extend(per_k_cells(x, store));
                    cells.push(Cell::text(x.usage.describe()));
                    t.push(&target.label, &label_case(store, ""), cells);
                }
                Err(e) => t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}")),
            }
            finish(ctx, dep, &res).await;
        }
    }
    t.notes.push("Orders written directly (see \"direct inserts\"), deadlines spread evenly over one second; the server's nudger, keyspace listener and cancel path do the rest. CPU over the whole wait.".into());
    vec![t]
}

pub async fn throughput(ctx: &Ctx) -> Vec<Table> {
    let n = ctx.sizes.throughput;
    let mut t = Table::new(
        &format!("Expiry at volume: {n} orders expiring in the same second"),
        &[
            "orders",
            "events received",
            "cancellations/s (DB: n ÷ (last cancelled_at − first deadline))",
            "events/s at the subscriber",
            "lag p50 ms",
            "lag p99 ms",
            "lag max ms",
            "DB lag p50 ms",
            "DB lag p99 ms",
            "server CPU ms / 1k cancellations",
            "Postgres CPU ms / 1k cancellations",
            "CPU cores used, first deadline to last event (server · pg · redis · bench · other)",
        ],
    );
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            if let Some(why) = needs_harness(target) {
                t.push_failed(&target.label, &label_case(store, ""), why);
                continue;
            }
            let dep = match deploy(ctx, target, &spec(store, "1h")).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
                    continue;
                }
            };
            let res = same_second(ctx, &dep, n).await;
            match &res {
                Ok(x) => {
                    let rate = |after_t0: f64, count: usize| count as f64 / (after_t0.max(1000.0) / 1000.0);
                    let mut cells = vec![
                        Cell::num(x.n as f64, 0),
                        Cell::num(x.received as f64, 0),
                        Cell::num(rate(x.last_cancel_after_t0, x.db_lag.n), 0),
                        Cell::num(rate(x.last_recv_after_t0, x.received), 0),
                    ];
                    cells.extend(lag_cells(&x.lag));
                    cells.push(Cell::opt(x.db_lag.p50, 1, "none cancelled"));
                    cells.push(Cell::opt(x.db_lag.p99, 1, "none cancelled"));
                    cells.extend(per_k_cells(x, store));
                    cells.push(Cell::text(x.usage.describe()));
                    t.push(&target.label, &label_case(store, ""), cells);
                    log(&format!("  written in {:.2} s", x.insert_secs));
                }
                Err(e) => t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}")),
            }
            finish(ctx, dep, &res).await;
        }
    }
    t.notes.push("The deadlines arrive over one second, so no figure above n per second can show; a server slower than that takes longer than a second and the rate is its capacity.".into());
    vec![t]
}

pub async fn pending(ctx: &Ctx) -> Vec<Table> {
    let n = ctx.sizes.pending;
    let k = ctx.sizes.probes;
    let mut t = Table::new(
        &format!("Expiry lag of {k} probe orders (ORDER_TTL=2s, one every 20 ms) while {n} other orders are pending"),
        &[
            "pending",
            "probes received",
            "lag p50 ms",
            "lag p99 ms",
            "lag max ms",
            "DB lag p99 ms",
            "probes later than 1 s",
            "seed time s",
            "CPU cores used (server · pg · redis · bench · other)",
        ],
    );
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            if let Some(why) = needs_harness(target) {
                t.push_failed(&target.label, &label_case(store, ""), why);
                continue;
            }
            let dep = match deploy(ctx, target, &spec(store, "2s")).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
                    continue;
                }
            };
            let res = probes(ctx, &dep, n, k).await;
            match &res {
                Ok(x) => {
                    let mut cells = vec![Cell::num(n as f64, 0), Cell::num(x.received as f64, 0)];
                    cells.extend(lag_cells(&x.lag));
                    cells.push(Cell::opt(x.db_lag.p99, 1, "none cancelled"));
                    cells.push(Cell::num(x.late as f64, 0));
                    cells.push(Cell::num(x.insert_secs, 1));
                    cells.push(Cell::text(x.usage.describe()));
                    t.push(&target.label, &label_case(store, ""), cells);
                }
                Err(e) => t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}")),
            }
            finish(ctx, dep, &res).await;
        }
    }
    t.notes.push("The pending orders are written directly with deadlines spread over [now+1h, now+2h): 1 row + 1 line each in the database, 1 hash with PEXPIREAT + 1 deadline-index member each in Redis. The probes go through createOrder. CPU over the probe phase.".into());
    vec![t]
}

async fn probes(ctx: &Ctx, dep: &Deployment, n: usize, k: usize) -> Result<Expired> {
    let gql = Gql::new(ctx.http.clone(), &dep.http);
    let (mut subs, customer, product) = admin_subscriber(dep, &gql).await?;
    let db = dep.db()?;
    let mut conn = DbConn::open(db).await?;
    let first = conn.reserve_ids(n as i64).await?;
    let hour = 3_600_000;
    let bulk = Bulk {
        first_id: first,
        n: n as i64,
        t0_ms: now_ms() as i64 + hour,
        span_ms: hour,
        customer: customer.id,
        product,
        price_cents: 1000,
    };
    log(&format!("  writing {n} pending orders"));
    let ins = Instant::now();
    insert_scheduled(db, &dep.redis_url, &dep.prefix, &bulk, true).await?;
    let insert_secs = ins.elapsed().as_secs_f64();
    log(&format!("  written in {insert_secs:.1} s"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let watch = dep.watch();
    let a = watch.snapshot();
    let driver = {
        let gql = gql.clone();
        let token = customer.token.clone();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(k);
            for _ in 0..k {
                ids.push(gql.create_order(&token, product).await?.0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(ids)
        })
    };
    let mut seen = 0usize;
    let last = bulk.last_id();
    let (ds, ended) = subs
        .collect(Duration::from_millis(k as u64 * 40 + 2000) + Duration::from_secs(60), None, |d| {
            if d.order > last {
                seen += 1;
            }
            seen >= k
        })
        .await;
    let b = watch.snapshot();
    subs.close().await;
    let ids = driver.await??;
    if let Some(e) = ended.first() {
        log(&format!("  subscriber ended: {e}"));
    }
    let mine: Vec<_> = ds.iter().filter(|d| ids.contains(&d.order)).collect();
    let mut lag: Vec<f64> = mine.iter().map(|d| d.recv_ms - d.expires_ms).collect();
    let late = lag.iter().filter(|l| **l > 1000.0).count();
    let (lo, hi) = (ids.iter().min().copied().unwrap_or(0), ids.iter().max().copied().unwrap_or(0));
    let times = conn.cancel_times(lo, hi).await?;
    conn.close().await;
    let mut db_lag: Vec<f64> = times.iter().map(|(e, c)| c - e).collect();
    Ok(Expired {
        n: k,
        received: mine.len(),
        lag: summarise(&mut lag),
        db_lag: summarise(&mut db_lag),
        last_recv_after_t0: f64::NAN,
        last_cancel_after_t0: f64::NAN,
        usage: a.usage_until(&b),
        insert_secs,
        late,
    })
}

pub async fn backlog(ctx: &Ctx) -> Vec<Table> {
    let n = ctx.sizes.backlog;
    let mut t = Table::new(
        &format!("Backlog drain: {n} overdue pending orders in the database (no Redis keys), then the server starts"),
        &[
            "overdue orders",
            "drained s (from spawn)",
            "drained s (from listening line)",
            "cancellations/s",
            "server CPU ms / 1k cancellations",
            "Postgres CPU ms / 1k cancellations",
            "CPU cores used (server · pg · redis · bench · other)",
        ],
    );
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            if let Some(why) = needs_harness(target) {
                t.push_failed(&target.label, &label_case(store, ""), why);
                continue;
            }
            let mut dep = match deploy(ctx, target, &spec(store, "1h")).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
                    continue;
                }
            };
            let res = drain(ctx, &mut dep, n, store).await;
            match &res {
                Ok((from_spawn, from_listen, usage)) => t.push(
                    &target.label,
                    &label_case(store, ""),
                    vec![
                        Cell::num(n as f64, 0),
                        Cell::num(*from_spawn, 2),
                        Cell::num(*from_listen, 2),
                        Cell::num(n as f64 / from_spawn.max(1e-6), 0),
                        Cell::num(usage.server_secs * 1e6 / n as f64, 0),
                        if store == Some(StoreKind::Postgres) {
                            Cell::num(usage.pg_secs * 1e6 / n as f64, 0)
                        } else {
                            Cell::text("–")
                        },
                        Cell::text(usage.describe()),
                    ],
                ),
                Err(e) => t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}")),
            }
            finish(ctx, dep, &res).await;
        }
    }
    t.notes.push("The server is started once (migrations, a customer and a product), stopped, the overdue orders are written directly (deadlines 60–30 s ago), and the server is started again; the harness polls the database every 25 ms until none of them is pending.".into());
    vec![t]
}

async fn drain(ctx: &Ctx, dep: &mut Deployment, n: usize, store: Option<StoreKind>) -> Result<(f64, f64, Usage)> {
    let gql = Gql::new(ctx.http.clone(), &dep.http);
    let (customer, product) = customer_and_product(&gql, &dep.admin).await?;
    dep.stop_server().await;
    let db = dep.db()?;
    let mut conn = DbConn::open(db).await?;
    let first = conn.reserve_ids(n as i64).await?;
    let bulk = Bulk {
        first_id: first,
        n: n as i64,
        t0_ms: now_ms() as i64 - 60_000,
        span_ms: 30_000,
        customer: customer.id,
        product,
        price_cents: 1000,
    };
    log(&format!("  writing {n} overdue orders ({})", store.map(StoreKind::name).unwrap_or("?")));
    insert_scheduled(db, &dep.redis_url, &dep.prefix, &bulk, false).await?;
    let before = dep.watch().snapshot(); // no server yet: its CPU counts from 0
    dep.restart_server().await?;
    let (spawned, listening) = {
        let s = dep.server.as_ref().expect("restarted");
        (s.spawned, s.listening)
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = conn.pending_between(first, bulk.last_id()).await?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{left} of {n} overdue orders still pending after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let done = Instant::now();
    let after = dep.watch().snapshot();
    conn.close().await;
    // the window began before the spawn; average over the drain itself
    let wall = done.duration_since(spawned).as_secs_f64();
    let usage = before.usage_until(&after).over(wall);
    Ok((wall, done.duration_since(listening).as_secs_f64(), usage))
}

//! Closed-loop load: `createOrder`, the `products` read path, and the
//! server's memory and CPU per order.

use std::sync::Arc;

use anyhow::Result;

use super::{deploy, finish, label_case, spec};
use crate::{
    client::{run_load, Gql, LoadResult},
    direct, log, procfs,
    report::{summarise, Cell, Table},
    server::{Deployment, Launch, StoreKind},
    Ctx,
};

const CREATE_COLUMNS: &[&str] = &[
    "orders/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "errors",
    "server CPU ms / 1k orders",
    "Postgres CPU ms / 1k orders",
    "CPU cores used (server · pg backends+aux · redis · bench · other)",
];

/// Milliseconds of CPU per 1,000 requests (`secs` over `n` requests).
pub(super) fn per_k(secs: f64, n: u64) -> f64 {
    if n == 0 {
        f64::NAN
    } else {
        secs * 1_000.0 * 1_000.0 / n as f64
    }
}

fn load_cells(r: &mut LoadResult, store: Option<StoreKind>, has_pid: bool) -> Vec<Cell> {
    let s = summarise(&mut r.latencies_ms);
    let why = "no successful request";
    vec![
        Cell::num(r.per_sec(), 0),
        Cell::opt(s.p50, 2, why),
        Cell::opt(s.p99, 2, why),
        Cell::opt(s.max, 1, why),
        Cell::num(r.errors as f64, 0),
        if has_pid { Cell::num(per_k(r.usage.server_secs, r.ok), 0) } else { Cell::Missing("no server pid".into()) },
        if store == Some(StoreKind::Postgres) { Cell::num(per_k(r.usage.pg_secs, r.ok), 0) } else { Cell::text("–") },
        Cell::text(r.usage.describe()),
    ]
}

/// Products and customers for order load; returns (bodies per product,
/// tokens). On a deployment the harness started (its database at hand)
/// the customers are `shoppers` written straight into it, with tokens
/// issued by shopgraph's own `Auth` under the deployment's `JWT_SECRET`, so
/// that each holds a few unpaid orders as real shoppers do; elsewhere
/// `customers` register through the API.
async fn order_setup(
    gql: &Gql,
    dep: &Deployment,
    products: usize,
    customers: usize,
    shoppers: usize,
) -> Result<(Arc<Vec<String>>, Arc<Vec<String>>)> {
    let ids = gql.create_products(&dep.admin, products, 1_000_000_000).await?;
    let bodies: Vec<String> = ids.iter().map(|p| Gql::create_order_body(*p, 1)).collect();
    let tokens: Vec<String> = match (&dep.db, dep.env.get("JWT_SECRET"), &dep.target.launch) {
        (Some(db), Some(secret), Launch::Binary(_)) => {
            log(&format!("  writing {shoppers} customers"));
            let mut conn = direct::DbConn::open(db).await?;
            let ids = conn.insert_customers(shoppers as i64).await?;
            conn.close().await;
            let auth = shopgraph::auth::Auth::new(None, secret.as_bytes(), std::time::Duration::from_secs(24 * 3600));
            ids.into_iter().map(|id| auth.issue_token(shopgraph::domain::CustomerId(id))).collect()
        }
        _ => {
            log(&format!("  registering {customers} customers"));
            gql.register_many(customers, 4).await?.into_iter().map(|c| c.token).collect()
        }
    };
    Ok((Arc::new(bodies), Arc::new(tokens)))
}

async fn order_load(
    ctx: &Ctx,
    dep: &Deployment,
    gql: &Gql,
    bodies: &Arc<Vec<String>>,
    tokens: &Arc<Vec<String>>,
    level: usize,
) -> LoadResult {
    let (gql, bodies, tokens) = (gql.clone(), bodies.clone(), tokens.clone());
    let z = &ctx.sizes;
    run_load(level, z.warmup, z.duration, &dep.watch(), move |w, seq| {
        let gql = gql.clone();
        // each worker walks the products from its own offset: little row contention
        let body = bodies[(w + seq as usize) % bodies.len()].clone();
        // the workers take the customers in turn, each its next one
        let token = tokens[(seq as usize * level + w) % tokens.len()].clone();
        async move { gql.post_body(Some(&token), body).await.map(|_| ()) }
    })
    .await
}

pub async fn create_order(ctx: &Ctx) -> Vec<Table> {
    let mut t = Table::new(&format!(
            "createOrder: closed-loop throughput and latency (1 line, quantity 1, products round-robin over {}; each request from the next of {} customers, so each holds a few unpaid orders)",
            ctx.sizes.products, ctx.sizes.shoppers
        ),
        CREATE_COLUMNS,
    );
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            let dep = match deploy(ctx, target, &spec(store, "1h")).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
                    continue;
                }
            };
            let res: Result<()> = async {
                let gql = Gql::new(ctx.http.clone(), &dep.http);
                let (bodies, tokens) =
                    order_setup(&gql, &dep, ctx.sizes.products, ctx.sizes.customers, ctx.sizes.shoppers).await?;
                for &level in &ctx.sizes.levels {
                    log(&format!("  createOrder c{level}"));
                    let mut r = order_load(ctx, &dep, &gql, &bodies, &tokens, level).await;
                    if let Some(e) = &r.first_error {
                        log(&format!("  first error: {e}"));
                    }
                    t.push(
                        &target.label,
                        &label_case(store, &format!("c{level}")),
                        load_cells(&mut r, store, dep.pid().is_some()),
                    );
                }
                Ok(())
            }
            .await;
            if let Err(e) = &res {
                t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
            }
            finish(ctx, dep, &res).await;
        }
    }
    t.notes.push(format!(
        "Each level: {:.1} s warm-up, then {:.1} s measured; orders/s counts successful responses; latency is the client-side round trip (HTTP/1.1 keep-alive, loopback). CPU cores are averages over the measured window from /proc/<pid>/stat (2 cores = 2.00).",
        ctx.sizes.warmup.as_secs_f64(),
        ctx.sizes.duration.as_secs_f64()
    ));
    vec![t]
}

pub async fn products(ctx: &Ctx) -> Vec<Table> {
    let mut t = Table::new(
        "products(first: 20) read path, anonymous (100 products in the store); `uncached`: CATALOG_CACHE_TTL=0s, every request executes",
        &[
            "requests/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "errors",
            "server CPU ms / 1k requests",
            "Postgres CPU ms / 1k requests",
            "CPU cores used (server · pg backends+aux · redis · bench · other)",
        ],
    );
    const QUERY: &str = r#"{"query":"{ products(first: 20) { nodes { id sku name priceCents currency stock } pageInfo { hasNextPage endCursor } } }"}"#;
    // the server's own cache on (its default), and off: every request executes
    let modes: [(&str, Option<&str>); 2] = [("", None), ("uncached ", Some("0s"))];
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            for (mode, ttl) in modes {
                let mut env = spec(store, "1h");
                if let Some(ttl) = ttl {
                    env.extra.push(("CATALOG_CACHE_TTL".into(), ttl.into()));
                }
                let dep = match deploy(ctx, target, &env).await {
                    Ok(d) => d,
                    Err(e) => {
                        t.push_failed(&target.label, &label_case(store, mode.trim()), &format!("{e:#}"));
                        continue;
                    }
                };
                let res: Result<()> = async {
                    let gql = Gql::new(ctx.http.clone(), &dep.http);
                    gql.create_products(&dep.admin, 100, 1000).await?;
                    for &level in &ctx.sizes.levels {
                        log(&format!("  products {mode}c{level}"));
                        let g = gql.clone();
                        let mut r = run_load(level, ctx.sizes.warmup, ctx.sizes.duration, &dep.watch(), move |_, _| {
                            let g = g.clone();
                            async move {
                                let n = g.post_counting(QUERY, "\"sku\":").await?;
                                anyhow::ensure!(n == 20, "expected 20 products, got {n}");
                                Ok(())
                            }
                        })
                        .await;
                        t.push(
                            &target.label,
                            &label_case(store, &format!("{mode}c{level}")),
                            load_cells(&mut r, store, dep.pid().is_some()),
                        );
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = &res {
                    t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
                }
                finish(ctx, dep, &res).await;
            }
        }
    }
    vec![t]
}

pub async fn resources(ctx: &Ctx) -> Vec<Table> {
    let mut t = Table::new(
        "Server memory and CPU: RSS idle and under createOrder load (c16), CPU time per 1,000 orders",
        &[
            "idle RSS MiB",
            "RSS after setup MiB",
            "RSS under load MiB (peak)",
            "orders/s (c16)",
            "server CPU ms / 1k orders",
            "Postgres CPU ms / 1k orders",
            "Redis CPU ms / 1k orders",
            "bench CPU ms / 1k orders",
        ],
    );
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            let dep = match deploy(ctx, target, &spec(store, "1h")).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
                    continue;
                }
            };
            let res: Result<()> = async {
                let pid = dep.pid();
                tokio::time::sleep(ctx.sizes.idle_wait).await;
                let idle = pid.and_then(procfs::rss_kib);
                let gql = Gql::new(ctx.http.clone(), &dep.http);
                let (bodies, tokens) =
                    order_setup(&gql, &dep, 16, if ctx.opts.smoke { 4 } else { 16 }, ctx.sizes.shoppers).await?;
                let after_setup = pid.and_then(procfs::rss_kib);
                log("  createOrder c16 for resources");
                let r = order_load(ctx, &dep, &gql, &bodies, &tokens, 16).await;
                let mib = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
                let bench_secs = r.usage.bench * r.usage.wall;
                t.push(
                    &target.label,
                    &label_case(store, ""),
                    vec![
                        Cell::opt(mib(idle), 1, "no server pid"),
                        Cell::opt(mib(after_setup), 1, "no server pid"),
                        Cell::opt(mib(r.peak_rss_kib), 1, "no server pid"),
                        Cell::num(r.per_sec(), 0),
                        if pid.is_some() {
                            Cell::num(per_k(r.usage.server_secs, r.ok), 0)
                        } else {
                            Cell::Missing("no server pid".into())
                        },
                        if store == Some(StoreKind::Postgres) {
                            Cell::num(per_k(r.usage.pg_secs, r.ok), 0)
                        } else {
                            Cell::text("–")
                        },
                        if dep.redis_pid.is_some() {
                            Cell::num(per_k(r.usage.redis_secs, r.ok), 0)
                        } else {
                            Cell::Missing("no redis pid".into())
                        },
                        Cell::num(per_k(bench_secs, r.ok), 0),
                    ],
                );
                Ok(())
            }
            .await;
            if let Err(e) = &res {
                t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
            }
            finish(ctx, dep, &res).await;
        }
    }
    t.notes.push(format!(
        "Idle RSS: VmRSS of /proc/<pid>/status {:.0} s after the listening line, before any request. After setup: after 16 products and the customers were created (registrations hash passwords with argon2, 19 MiB each, 4 at a time). Under load: highest VmRSS sampled every 100 ms during {:.0} s of createOrder at concurrency 16. CPU: utime+stime deltas over the measured window divided by orders placed.",
        ctx.sizes.idle_wait.as_secs_f64(),
        ctx.sizes.duration.as_secs_f64()
    ));
    vec![t]
}

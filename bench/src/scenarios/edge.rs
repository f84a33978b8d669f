//! The catalog at the edge of the deployment: behind a real caching reverse
//! proxy (nginx `proxy_cache`, the same configuration the storefront tests
//! use), and served from a PostgreSQL streaming replica
//! (`DATABASE_READ_URL`) beside the same server reading its primary.

use std::{path::Path, time::Duration};

use anyhow::{anyhow, Result};

use super::{deploy, finish, label_case, load::per_k, spec};
use crate::{
    client::{run_load, Gql},
    log,
    nginx::Nginx,
    pg_cluster::PrivatePostgres,
    procfs,
    report::{summarise, Cell, Table},
    server::StoreKind,
    Ctx,
};

/// Set on the servers this module starts, to read their counters.
const METRICS_TOKEN: &str = "bench-metrics-token-0123456789";

const CATALOG_BODY: &str = r#"{"query":"{ products(first: 20) { nodes { id sku name priceCents currency stock } pageInfo { hasNextPage endCursor } } }"}"#;
const CATALOG: &str =
    "{ products(first: 20) { nodes { id sku name priceCents currency stock } pageInfo { hasNextPage endCursor } } }";

/// Catalog GETs through nginx: what a CDN or caching proxy in front of
/// shopgraph takes off it, and what is left for the server.
pub async fn proxy(ctx: &Ctx) -> Vec<Table> {
    let mut t = Table::new(
        "products(first: 20) over GET through nginx proxy_cache (CATALOG_MAX_AGE=5s, one nginx worker) beside the same GETs straight to shopgraph; `reached shopgraph /s`: catalog requests the server executed or answered from its own cache, per second of warm-up and window",
        &[
            "requests/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "reached shopgraph /s",
            "server CPU ms / 1k requests",
            "CPU cores used (server · pg backends+aux · redis · bench · other)",
        ],
    );
    let Some(bin) = Nginx::binary() else {
        t.push_failed("shopgraph", "-", "nginx is not installed (apt-get install nginx-light)");
        return vec![t];
    };
    for target in ctx.targets.iter().filter(|t| !t.is_url()) {
        let store = Some(StoreKind::Postgres);
        let mut env = spec(store, "1h");
        env.extra.push(("METRICS_TOKEN".into(), METRICS_TOKEN.into()));
        let dep = match deploy(ctx, target, &env).await {
            Ok(d) => d,
            Err(e) => {
                t.push_failed(&target.label, "-", &format!("{e:#}"));
                continue;
            }
        };
        let res: Result<()> = async {
            let gql = Gql::new(ctx.http.clone(), &dep.http);
            gql.create_products(&dep.admin, 100, 1000).await?;
            // the deployment's URL is its /graphql endpoint
            let server = dep.http.trim_end_matches("/graphql").to_string();
            let nginx = Nginx::start(&bin, &server).await.map_err(|e| anyhow!(e))?;
            for (via, base) in [("direct", server.clone()), ("via nginx", nginx.url.clone())] {
                for &level in &ctx.sizes.levels {
                    log(&format!("  products GET {via} c{level}"));
                    let served_before = catalog_served(ctx, &server).await;
                    let (http, url) = (ctx.http.clone(), format!("{base}/graphql"));
                    let mut r = run_load(level, ctx.sizes.warmup, ctx.sizes.duration, &dep.watch(), move |_, _| {
                        let (http, url) = (http.clone(), url.clone());
                        async move {
                            let res = http.get(&url).query(&[("query", CATALOG)]).send().await?;
                            anyhow::ensure!(res.status().is_success(), "HTTP {}", res.status());
                            // counted, not parsed: the harness shares the machine
                            let body = res.bytes().await?;
                            let n = std::str::from_utf8(&body).unwrap_or_default().matches("\"sku\":").count();
                            anyhow::ensure!(n == 20, "expected 20 products, got {n}");
                            Ok(())
                        }
                    })
                    .await;
                    // over warm-up and window alike, so per second of both
                    let served = catalog_served(ctx, &server).await - served_before;
                    let window = (ctx.sizes.warmup + ctx.sizes.duration).as_secs_f64();
                    let s = summarise(&mut r.latencies_ms);
                    t.push(
                        &target.label,
                        &format!("{via} c{level}"),
                        vec![
                            Cell::num(r.per_sec(), 0),
                            Cell::opt(s.p50, 2, "no successful request"),
                            Cell::opt(s.p99, 2, "no successful request"),
                            Cell::num(r.errors as f64, 0),
                            Cell::num(served / window, 1),
                            Cell::num(per_k(r.usage.server_secs, r.ok), 1),
                            Cell::text(r.usage.describe()),
                        ],
                    );
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = &res {
            t.push_failed(&target.label, "-", &format!("{e:#}"));
        }
        finish(ctx, dep, &res).await;
    }
    vec![t]
}

/// Catalog requests the server has counted (executed or from its cache).
async fn catalog_served(ctx: &Ctx, base: &str) -> f64 {
    let text = match ctx.http.get(format!("{base}/metrics")).bearer_auth(METRICS_TOKEN).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return f64::NAN,
    };
    let series = "shopgraph_graphql_request_duration_seconds_count{field=\"products\"}";
    let hits = "shopgraph_catalog_cache_hits_total";
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    value(series) + value(hits)
}

/// Uncached catalog POSTs (CATALOG_CACHE_TTL=0s: every request reads the
/// database) against a private primary, without and then with a streaming
/// replica as `DATABASE_READ_URL`: where the catalog's database work goes.
pub async fn replica(ctx: &Ctx) -> Vec<Table> {
    let mut t = Table::new(
        "products(first: 20), anonymous, uncached (CATALOG_CACHE_TTL=0s), on a private PostgreSQL 15 primary, without and with its streaming replica (pg_basebackup -R) as DATABASE_READ_URL; CPU of each cluster = its postmaster and every process it forked",
        &[
            "requests/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "server CPU ms / 1k requests",
            "primary CPU ms / 1k requests",
            "replica CPU ms / 1k requests",
        ],
    );
    let Some(primary) = PrivatePostgres::start().await else {
        t.push_failed("shopgraph", "-", "needs root and the PostgreSQL 15 binaries to make a private cluster");
        return vec![t];
    };
    let Some(standby) = PrivatePostgres::replica_of(&primary).await else {
        t.push_failed("shopgraph", "-", "pg_basebackup failed");
        return vec![t];
    };
    let (Some(primary_pid), Some(replica_pid)) = (postmaster_pid(&primary), postmaster_pid(&standby)) else {
        t.push_failed("shopgraph", "-", "cannot read the clusters' postmaster.pid");
        return vec![t];
    };
    for target in ctx.targets.iter().filter(|t| !t.is_url()) {
        for (case, read_url) in [("primary only", None), ("with replica", Some(standby.url.clone()))] {
            let mut env = spec(Some(StoreKind::Postgres), "1h");
            env.extra.push(("DATABASE_URL".into(), primary.url.clone()));
            env.extra.push(("CATALOG_CACHE_TTL".into(), "0s".into()));
            if let Some(url) = &read_url {
                env.extra.push(("DATABASE_READ_URL".into(), url.clone()));
            }
            let dep = match deploy(ctx, target, &env).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, case, &format!("{e:#}"));
                    continue;
                }
            };
            let res: Result<()> = async {
                let gql = Gql::new(ctx.http.clone(), &dep.http);
                // products of earlier cases stay; every case reads the first 20
                gql.create_products(&dep.admin, 100, 1000).await?;
                if read_url.is_some() {
                    wait_replicated(&gql).await?;
                }
                for &level in &ctx.sizes.levels {
                    log(&format!("  products {case} c{level}"));
                    let g = gql.clone();
                    let watch = dep.watch();
                    let (p0, r0) = (procfs::tree_cpu_secs(primary_pid), procfs::tree_cpu_secs(replica_pid));
                    let mut r = run_load(level, ctx.sizes.warmup, ctx.sizes.duration, &watch, move |_, _| {
                        let g = g.clone();
                        async move {
                            let n = g.post_counting(CATALOG_BODY, "\"sku\":").await?;
                            anyhow::ensure!(n == 20, "expected 20 products, got {n}");
                            Ok(())
                        }
                    })
                    .await;
                    // the clusters are measured over warm-up and window alike
                    let sent = r.ok + r.errors;
                    let (p1, r1) = (procfs::tree_cpu_secs(primary_pid), procfs::tree_cpu_secs(replica_pid));
                    let s = summarise(&mut r.latencies_ms);
                    t.push(
                        &target.label,
                        &label_case(Some(StoreKind::Postgres), &format!("{case} c{level}")),
                        vec![
                            Cell::num(r.per_sec(), 0),
                            Cell::opt(s.p50, 2, "no successful request"),
                            Cell::opt(s.p99, 2, "no successful request"),
                            Cell::num(r.errors as f64, 0),
                            Cell::num(per_k(r.usage.server_secs, r.ok), 0),
                            Cell::num(per_k(p1 - p0, sent), 0),
                            Cell::num(per_k(r1 - r0, sent), 0),
                        ],
                    );
                }
                Ok(())
            }
            .await;
            if let Err(e) = &res {
                t.push_failed(&target.label, case, &format!("{e:#}"));
            }
            finish(ctx, dep, &res).await;
        }
    }
    drop(standby);
    drop(primary);
    vec![t]
}

/// The replica has replayed the products just written (the catalog through
/// the server reads it): polls, bounded.
async fn wait_replicated(gql: &Gql) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let d = gql.call(None, "{ products(first: 100) { nodes { id } } }", serde_json::json!({})).await?;
        let n = d.pointer("/products/nodes").and_then(|v| v.as_array()).map_or(0, Vec::len);
        if n >= 100 {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the replica showed {n} of 100 products after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first line of the cluster's `postmaster.pid`.
fn postmaster_pid(pg: &PrivatePostgres) -> Option<u32> {
    let file = pg.data_dir().join("postmaster.pid");
    let text = std::fs::read_to_string(Path::new(&file)).ok()?;
    text.lines().next()?.trim().parse().ok()
}

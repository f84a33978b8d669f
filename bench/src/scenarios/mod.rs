//! The scenarios. Each starts a fresh deployment per server and store, so
//! no scenario measures what an earlier one left behind.

mod edge;
mod expiry;
mod hostile;
mod load;
mod ws;

use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use crate::{
    case_name,
    client::{Customer, Gql, Subscribers},
    log,
    report::{Cell, Summary, Table},
    server::{Deployment, EnvSpec, StoreKind, Target},
    Ctx,
};

pub async fn run(name: &str, ctx: &Ctx) -> Vec<Table> {
    match name {
        "create-order" => load::create_order(ctx).await,
        "products" => load::products(ctx).await,
        "products-proxy" => edge::proxy(ctx).await,
        "products-replica" => edge::replica(ctx).await,
        "resources" => load::resources(ctx).await,
        "expiry-burst" => expiry::burst(ctx).await,
        "expiry-pending" => expiry::pending(ctx).await,
        "expiry-throughput" => expiry::throughput(ctx).await,
        "backlog" => expiry::backlog(ctx).await,
        "websocket" => ws::websocket(ctx).await,
        "fanout" => ws::fanout(ctx).await,
        "hostile" => hostile::hostile(ctx).await,
        other => {
            let mut t = Table::new(other, &["result"]);
            t.push_failed("-", "-", "unknown scenario");
            vec![t]
        }
    }
}

/// A fresh deployment of `target`, logged.
pub async fn deploy(ctx: &Ctx, target: &Target, spec: &EnvSpec) -> Result<Deployment> {
    let dep = ctx.deploy(target, spec).await?;
    log(&format!(
        "  {} on {}: {}",
        target.label,
        if target.is_url() { "its own store" } else { spec.store.name() },
        dep.http
    ));
    Ok(dep)
}

/// Takes a deployment down; on error, shows the end of the server's log.
pub async fn finish<T>(ctx: &Ctx, dep: Deployment, res: &Result<T>) {
    if let Err(e) = res {
        log(&format!("  failed: {e:#}"));
        if let Some(s) = &dep.server {
            let tail = std::fs::read_to_string(&s.log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(8).collect();
            for l in tail.into_iter().rev() {
                log(&format!("    server: {l}"));
            }
        }
    }
    dep.down(&ctx.redis).await;
}

pub fn spec(store: Option<StoreKind>, ttl: &str) -> EnvSpec {
    EnvSpec::new(store.unwrap_or(StoreKind::Postgres), ttl)
}

/// Lag cells: p50, p99, max (ms).
pub fn lag_cells(s: &Summary) -> Vec<Cell> {
    let why = "no samples";
    vec![Cell::opt(s.p50, 1, why), Cell::opt(s.p99, 1, why), Cell::opt(s.max, 1, why)]
}

/// One customer and one product (stock 1,000,000,000) for direct inserts.
pub async fn customer_and_product(gql: &Gql, admin: &str) -> Result<(Customer, i64)> {
    let customer = gql.register_many(1, 1).await?.remove(0);
    let product = gql.create_products(admin, 1, 1_000_000_000).await?[0];
    Ok((customer, product))
}

/// Makes sure every subscriber is live: one order per customer is created
/// and cancelled by the admin, and every subscriber must receive the
/// cancellation it can see (`expect(sub)` orders per subscriber; all with
/// `per_sub_all` for admin subscribers).
pub async fn canary(
    gql: &Gql,
    admin: &str,
    subs: &mut Subscribers,
    customers: &[Customer],
    product: i64,
    total_expected: usize,
) -> Result<()> {
    for c in customers {
        let (id, _) = gql.create_order(&c.token, product).await?;
        gql.cancel_order(admin, id).await?;
    }
    let mut got = 0usize;
    let (ds, ended) = subs
        .collect(Duration::from_secs(60), None, |_| {
            got += 1;
            got >= total_expected
        })
        .await;
    if let Some(e) = ended.first() {
        bail!("a subscriber ended during the readiness check: {e}");
    }
    if ds.len() < total_expected {
        return Err(anyhow!(
            "readiness check: {} of {} subscribers received their canary event within 60 s",
            ds.len(),
            total_expected
        ));
    }
    Ok(())
}

pub fn label_case(store: Option<StoreKind>, extra: &str) -> String {
    if extra.is_empty() {
        case_name(store).to_string()
    } else {
        format!("{} {extra}", case_name(store))
    }
}

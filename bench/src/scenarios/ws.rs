//! Websocket subscribers: memory per connection and fan-out lag
//! (receipt − the event's `cancelledAt`, the server's clock just before the
//! cancelling transaction; same host, same clock).

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use futures_util::StreamExt;

use super::{canary, deploy, finish, label_case, lag_cells, spec};
use crate::{
    client::{Gql, Subscribers},
    log, procfs,
    procfs::Usage,
    report::{summarise, Cell, Summary, Table},
    server::Deployment,
    Ctx,
};

struct WsResult {
    subscribers: usize,
    connect_secs: f64,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    events: usize,
    received: usize,
    expected: usize,
    cancel_errors: usize,
    lag: Summary,
    usage: Usage,
}

/// Subscribers as customers (`admin == false`: subscriber `i` is customer
/// `i % customers` and sees only its own orders) or as the admin (every
/// subscriber sees every event).
async fn run(
    ctx: &Ctx,
    dep: &Deployment,
    subscribers: usize,
    customers: usize,
    events: usize,
    admin: bool,
) -> Result<WsResult> {
    let gql = Gql::new(ctx.http.clone(), &dep.http);
    log(&format!("  registering {customers} customers"));
    let custs = gql.register_many(customers, 4).await?;
    let product = gql.create_products(&dep.admin, 1, 1_000_000_000).await?[0];
    let pid = dep.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = pid.and_then(procfs::rss_kib);
    log(&format!("  connecting {subscribers} subscribers"));
    let tokens: Vec<String> = custs.iter().map(|c| c.token.clone()).collect();
    let admin_token = dep.admin.clone();
    let mut subs = Subscribers::connect(&dep.ws, subscribers, 64, |i| {
        if admin {
            admin_token.clone()
        } else {
            tokens[i % tokens.len()].clone()
        }
    })
    .await?;
    log(&format!("  connected in {:.1} s; readiness check", subs.connect_time.as_secs_f64()));
    let canary_customers = if admin { &custs[..1] } else { &custs[..] };
    canary(&gql, &dep.admin, &mut subs, canary_customers, product, subscribers).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = pid.and_then(procfs::rss_kib);

    log(&format!("  placing {events} orders"));
    let placed: Vec<Result<(i64, usize)>> = futures_util::stream::iter(0..events)
        .map(|j| {
            let gql = gql.clone();
            let c = &custs[j % custs.len()];
            async move { Ok((gql.create_order(&c.token, product).await?.0, j % customers)) }
        })
        .buffered(16)
        .collect()
        .await;
    let placed = placed.into_iter().collect::<Result<Vec<_>>>()?;
    let subs_of = |ci: usize| subscribers / customers + usize::from(ci < subscribers % customers);
    let expected: usize = if admin { subscribers * events } else { placed.iter().map(|(_, ci)| subs_of(*ci)).sum() };
    let ids: HashSet<i64> = placed.iter().map(|(id, _)| *id).collect();

    let rate = ctx.sizes.event_rate.max(1.0);
    log(&format!("  cancelling {events} orders at {rate}/s; expecting {expected} deliveries"));
    let watch = dep.watch();
    let a = watch.snapshot();
    let start_ms = crate::client::now_ms();
    let driver = {
        let gql = gql.clone();
        let admin = dep.admin.clone();
        let order_ids: Vec<i64> = placed.iter().map(|(id, _)| *id).collect();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut handles = Vec::with_capacity(order_ids.len());
            for (j, id) in order_ids.into_iter().enumerate() {
                tokio::time::sleep_until((start + Duration::from_secs_f64(j as f64 / rate)).into()).await;
                let (gql, admin) = (gql.clone(), admin.clone());
                handles.push(tokio::spawn(async move { gql.cancel_order(&admin, id).await }));
            }
            let mut errors = 0;
            let mut first = None;
            for h in handles {
                match h.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        errors += 1;
                        first.get_or_insert_with(|| e.to_string());
                    }
                    Err(e) => {
                        errors += 1;
                        first.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (errors, first)
        })
    };
    let mut got = 0usize;
    let (ds, ended) = subs
        .collect(
            Duration::from_secs_f64(events as f64 / rate) + Duration::from_secs(60),
            Some(Duration::from_secs(15)),
            |d| {
                if ids.contains(&d.order) {
                    got += 1;
                }
                got >= expected
            },
        )
        .await;
    let b = watch.snapshot();
    let (cancel_errors, first_error) = driver.await.unwrap_or((events, None));
    if let Some(e) = first_error {
        log(&format!("  {cancel_errors} cancelOrder calls failed, e.g. {e}"));
    }
    let connect_secs = subs.connect_time.as_secs_f64();
    subs.close().await;
    if let Some(e) = ended.first() {
        log(&format!("  {} subscribers ended early, e.g. {e}", ended.len()));
    }
    let mut lag: Vec<f64> = ds.iter().filter(|d| ids.contains(&d.order)).map(|d| d.recv_ms - d.cancelled_ms).collect();
    let received = lag.len();
    // CPU averaged over the activity: first cancel to last delivery
    let last_ms = ds.iter().map(|d| d.recv_ms).fold(start_ms, f64::max);
    let usage = a.usage_until(&b).over((last_ms - start_ms) / 1000.0);
    if received == 0 {
        bail!("no cancellation reached any subscriber");
    }
    Ok(WsResult {
        subscribers,
        connect_secs,
        rss_before,
        rss_after,
        events,
        received,
        expected,
        cancel_errors,
        lag: summarise(&mut lag),
        usage,
    })
}

const COLUMNS: &[&str] = &[
    "subscribers",
    "connect s",
    "server RSS before MiB",
    "server RSS with subscribers MiB",
    "KiB per connection",
    "cancellations",
    "cancelOrder errors",
    "deliveries",
    "expected",
    "lag p50 ms",
    "lag p99 ms",
    "lag max ms",
    "server CPU µs / delivery",
    "CPU cores used, first cancel to last delivery (server · pg · redis · bench · other)",
];

fn cells(x: &WsResult) -> Vec<Cell> {
    let mib = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
    let per_conn = match (x.rss_before, x.rss_after) {
        (Some(a), Some(b)) => Some((b as f64 - a as f64) / x.subscribers as f64),
        _ => None,
    };
    let mut v = vec![
        Cell::num(x.subscribers as f64, 0),
        Cell::num(x.connect_secs, 1),
        Cell::opt(mib(x.rss_before), 1, "no server pid"),
        Cell::opt(mib(x.rss_after), 1, "no server pid"),
        Cell::opt(per_conn, 1, "no server pid"),
        Cell::num(x.events as f64, 0),
        Cell::num(x.cancel_errors as f64, 0),
        Cell::num(x.received as f64, 0),
        Cell::num(x.expected as f64, 0),
    ];
    v.extend(lag_cells(&x.lag));
    v.push(if x.received > 0 && x.usage.server_secs > 0.0 {
        Cell::num(x.usage.server_secs * 1e6 / x.received as f64, 1)
    } else {
        Cell::Missing("no server pid".into())
    });
    v.push(Cell::text(x.usage.describe()));
    v
}

async fn scenario(ctx: &Ctx, title: &str, subscribers: usize, customers: usize, events: usize, admin: bool) -> Table {
    let mut t = Table::new(title, COLUMNS);
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            let dep = match deploy(ctx, target, &spec(store, "1h")).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}"));
                    continue;
                }
            };
            let res = run(ctx, &dep, subscribers, customers, events, admin).await;
            match &res {
                Ok(x) => t.push(&target.label, &label_case(store, ""), cells(x)),
                Err(e) => t.push_failed(&target.label, &label_case(store, ""), &format!("{e:#}")),
            }
            finish(ctx, dep, &res).await;
        }
    }
    t
}

pub async fn websocket(ctx: &Ctx) -> Vec<Table> {
    let z = &ctx.sizes;
    let mut t = scenario(
        ctx,
        &format!(
            "Websocket: {} subscribers (customers' own orderCancelled, spread over {} customers), {} cancellations by cancelOrder at {}/s",
            z.ws_subscribers, z.ws_customers, z.ws_events, z.event_rate
        ),
        z.ws_subscribers,
        z.ws_customers,
        z.ws_events,
        false,
    )
    .await;
    t.notes.push("KiB per connection = (VmRSS after every subscriber connected, subscribed and received one event − VmRSS before connecting) ÷ subscribers. Each cancellation reaches the subscribers of its customer; every subscriber's broadcast receiver still wakes for every event. Lag = receipt − the event's cancelledAt.".into());
    vec![t]
}

pub async fn fanout(ctx: &Ctx) -> Vec<Table> {
    let z = &ctx.sizes;
    let mut t = scenario(
        ctx,
        &format!(
            "Fan-out: {} admin subscribers (each receives every event) × {} cancellations by cancelOrder at {}/s",
            z.fanout_subscribers, z.fanout_events, z.event_rate
        ),
        z.fanout_subscribers,
        1,
        z.fanout_events,
        true,
    )
    .await;
    t.notes.push("Lag = receipt − the event's cancelledAt, over every (subscriber, event) delivery.".into());
    vec![t]
}

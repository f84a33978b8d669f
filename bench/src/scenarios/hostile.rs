//! `hostile` (issue 12): legitimate `createOrder` and catalog
//! (`products(first: 20)`) traffic measured calm, then under each attack in
//! turn, on one deployment per store: what the legitimate clients see
//! (p50/p99 against calm), what the server spends per attack request
//! (CPU from /proc, the legitimate share taken out) and its peak RSS.
//!
//! Attackers come from other loopback addresses than the legitimate
//! clients (127.0.0.2; password guessing from 127.0.0.10–29), so limits per
//! client address see them as the different clients they would be. Every
//! attack request has a client timeout and every attack stops with its
//! window, so the scenario completes against a server that does not defend
//! itself yet (its rows then show the damage, or `n/a` where legitimate
//! traffic got nothing through).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};

use super::{deploy, finish, label_case, spec};
use crate::{
    client::{run_load, Customer, Gql, LoadResult},
    log,
    report::{summarise, Cell, Table},
    server::{Deployment, StoreKind},
    Ctx,
};

const COLUMNS: &[&str] = &[
    "createOrder p50 ms",
    "createOrder p99 ms",
    "products p50 ms",
    "products p99 ms",
    "worst p99 / calm p99",
    "legit errors",
    "attack requests",
    "refused",
    "server CPU ms / attack request",
    "largest attack response KiB",
    "peak RSS MiB",
];

/// The attacks of issue 12, in the order they are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    FragmentsPost,
    FragmentsWs,
    AmplifiedBatch,
    EchoedVariable,
    SlowHeaders,
    ManyConnections,
    PasswordGuessing,
}

const ATTACKS: &[Attack] = &[
    Attack::FragmentsPost,
    Attack::FragmentsWs,
    Attack::AmplifiedBatch,
    Attack::EchoedVariable,
    Attack::SlowHeaders,
    Attack::ManyConnections,
    Attack::PasswordGuessing,
];

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::FragmentsPost => "fragment expansion n=30 (POST)",
            Attack::FragmentsWs => "fragment expansion n=30 (websocket)",
            Attack::AmplifiedBatch => "amplification batch (10 ops x 3 orders(first:100))",
            Attack::EchoedVariable => "echoed 250 KB variable (50 aliases)",
            Attack::SlowHeaders => "slow-header sockets",
            Attack::ManyConnections => "many connections from one address",
            Attack::PasswordGuessing => "password guessing from 20 addresses",
        }
    }
}

/// Sizes of the attacks: the issue's, or small ones for `--smoke`.
struct Plan {
    /// Bound on one attack request (connect to answer).
    timeout: Duration,
    /// Bound on one legitimate request: a server that does not defend
    /// itself makes them wait, but not past this.
    legit_timeout: Duration,
    /// Concurrent attackers of the request attacks.
    attackers: usize,
    slow_sockets: usize,
    connections: usize,
    /// Orders of 100 lines the amplification customer holds.
    amplified_orders: usize,
    /// How long the server may take to answer `/healthz` again after an attack.
    recovery: Duration,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        Plan {
            timeout: if smoke { Duration::from_secs(2) } else { Duration::from_secs(10) },
            legit_timeout: if smoke { Duration::from_secs(5) } else { Duration::from_secs(30) },
            attackers: 2,
            slow_sockets: if smoke { 100 } else { 400 },
            connections: if smoke { 200 } else { 1_000 },
            amplified_orders: if smoke { 10 } else { 100 },
            recovery: if smoke { Duration::from_secs(10) } else { Duration::from_secs(60) },
        }
    }
}

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Counters of one attack window.
#[derive(Default)]
struct Tally {
    /// Attack requests (documents, sockets, connections, guesses) started in the window.
    units: AtomicU64,
    refused: AtomicU64,
    largest_response: AtomicU64,
}

impl Tally {
    fn sent(&self) {
        self.units.fetch_add(1, Ordering::Relaxed);
    }
    fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
    fn response(&self, bytes: usize) {
        self.largest_response.fetch_max(bytes as u64, Ordering::Relaxed);
    }
}

/// What the attacks need from the deployment.
struct Setup {
    /// The legitimate clients' (from 127.0.0.1, bounded by `legit_timeout`).
    gql: Gql,
    ws_url: String,
    addr: SocketAddr,
    /// Bodies of one-line orders, one per product.
    order_bodies: Arc<Vec<String>>,
    tokens: Arc<Vec<String>>,
    /// The customer with many 100-line orders (amplification).
    hoarder: Customer,
    /// The email whose password is guessed.
    victim: String,
}

pub async fn hostile(ctx: &Ctx) -> Vec<Table> {
    let mut t = Table::new(
        "hostile: legitimate createOrder + products(first: 20) traffic (2 + 2 clients), calm and under each attack",
        COLUMNS,
    );
    let plan = Plan::new(ctx.opts.smoke);
    for target in &ctx.targets {
        for store in ctx.stores_for(target) {
            let mut spec = spec(store, "1h");
            // the contract's login limits, not the harness's "unlimited"
            spec.extra.push(("AUTH_RATE_LIMIT".into(), "30".into()));
            spec.extra.push(("LOGIN_RATE_LIMIT_PER_ACCOUNT".into(), "10".into()));
            let dep = match deploy(ctx, target, &spec).await {
                Ok(d) => d,
                Err(e) => {
                    t.push_failed(&target.label, &label_case(store, "calm"), &format!("{e:#}"));
                    continue;
                }
            };
            let res = run_store(ctx, &plan, &dep, store, &mut t).await;
            if let Err(e) = &res {
                t.push_failed(&target.label, &label_case(store, "setup"), &format!("{e:#}"));
            }
            finish(ctx, dep, &res).await;
        }
    }
    t.notes.push(format!(
        "One deployment per store; each row: {:.1} s warm-up, then {:.1} s measured with the attack running (attack requests time out after {:.0} s). \
         Legitimate clients come from 127.0.0.1, attackers from 127.0.0.2 (password guessing: 127.0.0.10-29, against one account). \
         Server CPU per attack request: utime+stime of the server over the window, minus the legitimate requests served times their calm cost, \
         divided by the attack requests started in the window (documents; sockets for slow headers; connections; login guesses). \
         Refused: answered with an error (QUERY_TOO_COMPLEX, BAD_USER_INPUT, RATE_LIMITED, a 4xx, a websocket error or close), or for sockets closed by the server within the window. \
         Peak RSS: highest VmRSS sampled every 100 ms in the window. Targets (issue 12): < 5 ms CPU per refused document, worst p99 at most 2x calm, peak RSS < 256 MiB.",
        ctx.sizes.warmup.as_secs_f64(),
        ctx.sizes.duration.as_secs_f64(),
        plan.timeout.as_secs_f64(),
    ));
    vec![t]
}

async fn run_store(ctx: &Ctx, plan: &Plan, dep: &Deployment, store: Option<StoreKind>, t: &mut Table) -> Result<()> {
    let setup = prepare(ctx, plan, dep).await?;
    let label = &dep.target.label;
    log("  hostile: calm");
    let calm = legit_window(ctx, dep, &setup, None, plan).await;
    let calm_p99 = calm.worst_p99();
    let calm_cpu_per_request = calm.server_secs() / calm.ok().max(1) as f64;
    t.push(label, &label_case(store, "calm"), calm.cells(calm_p99, None, calm_cpu_per_request));
    for &attack in ATTACKS {
        log(&format!("  hostile: {}", attack.name()));
        let w = legit_window(ctx, dep, &setup, Some(attack), plan).await;
        t.push(label, &label_case(store, attack.name()), w.cells(calm_p99, Some(&w.tally), calm_cpu_per_request));
        if let Err(e) = recover(&setup, plan.recovery).await {
            log(&format!("  the server did not recover after {}: {e:#}", attack.name()));
        }
    }
    Ok(())
}

/// Products, the legitimate customers, the hoarder's orders and the victim.
async fn prepare(ctx: &Ctx, plan: &Plan, dep: &Deployment) -> Result<Setup> {
    let gql = Gql::new(ctx.http.clone(), &dep.http);
    let products = gql.create_products(&dep.admin, 100, 1_000_000_000).await?;
    let order_bodies: Vec<String> = products.iter().map(|p| Gql::create_order_body(*p, 1)).collect();
    log("  registering the legitimate customers, the hoarder and the victim");
    let mut customers = gql.register_many(4, 4).await?;
    let hoarder = customers.pop().ok_or_else(|| anyhow!("no customer"))?;
    let tokens: Vec<String> = customers.iter().map(|c| c.token.clone()).collect();
    let victim = format!("victim-{}@example.com", crate::server::short_id());
    gql.register(&victim).await?;
    log(&format!("  the hoarder places {} orders of 100 lines (each paid)", plan.amplified_orders));
    let lines: Vec<Value> = products.iter().map(|p| json!({"productId": format!("prd_{p}"), "quantity": 1})).collect();
    for _ in 0..plan.amplified_orders {
        let d = gql
            .call(
                Some(&hoarder.token),
                "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id } }",
                json!({"i": {"lines": lines}}),
            )
            .await?;
        let id = d.pointer("/createOrder/id").and_then(Value::as_str).ok_or_else(|| anyhow!("no order id"))?;
        // paid, so that limits on unpaid orders do not stop the setup
        gql.call(Some(&hoarder.token), "mutation($id: ID!) { payOrder(id: $id) { id } }", json!({"id": id})).await?;
    }
    let addr: SocketAddr = dep
        .http
        .trim_start_matches("http://")
        .trim_end_matches("/graphql")
        .parse()
        .with_context(|| format!("server address of {}", dep.http))?;
    let legit = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .pool_max_idle_per_host(16)
        .tcp_nodelay(true)
        .timeout(plan.legit_timeout)
        .build()?;
    Ok(Setup {
        gql: Gql::new(legit, &dep.http),
        ws_url: dep.ws.clone(),
        addr,
        order_bodies: Arc::new(order_bodies),
        tokens: Arc::new(tokens),
        hoarder,
        victim,
    })
}

/// One measured window of legitimate traffic, with `attack` running in it.
struct Window {
    orders: LoadResult,
    products: LoadResult,
    tally: Tally,
}

impl Window {
    fn ok(&self) -> u64 {
        self.orders.ok + self.products.ok
    }

    fn server_secs(&self) -> f64 {
        // both loads sampled the same server over the same window
        self.orders.usage.server_secs
    }

    fn worst_p99(&self) -> Option<f64> {
        let p = |r: &LoadResult| summarise(&mut r.latencies_ms.clone()).p99;
        match (p(&self.orders), p(&self.products)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn cells(&self, calm_p99: Option<f64>, tally: Option<&Tally>, calm_cpu_per_request: f64) -> Vec<Cell> {
        let why = "no successful request";
        let o = summarise(&mut self.orders.latencies_ms.clone());
        let p = summarise(&mut self.products.latencies_ms.clone());
        let ratio = match (self.worst_p99(), calm_p99) {
            (Some(now), Some(calm)) if calm > 0.0 => Cell::num(now / calm, 2),
            _ => Cell::Missing(why.into()),
        };
        let peak = Cell::opt(self.orders.peak_rss_kib.map(|k| k as f64 / 1024.0), 1, "no server pid");
        let mut cells = vec![
            Cell::opt(o.p50, 2, why),
            Cell::opt(o.p99, 2, why),
            Cell::opt(p.p50, 2, why),
            Cell::opt(p.p99, 2, why),
            ratio,
            Cell::num((self.orders.errors + self.products.errors) as f64, 0),
        ];
        match tally {
            None => cells.extend([Cell::text("–"), Cell::text("–"), Cell::text("–"), Cell::text("–")]),
            Some(tally) => {
                let units = tally.units.load(Ordering::Relaxed);
                let legit_secs = calm_cpu_per_request * self.ok() as f64;
                let attack_secs = (self.server_secs() - legit_secs).max(0.0);
                cells.extend([
                    Cell::num(units as f64, 0),
                    Cell::num(tally.refused.load(Ordering::Relaxed) as f64, 0),
                    if units == 0 {
                        Cell::Missing("no attack request started in the window".into())
                    } else {
                        Cell::num(attack_secs * 1000.0 / units as f64, 2)
                    },
                    Cell::num(tally.largest_response.load(Ordering::Relaxed) as f64 / 1024.0, 1),
                ]);
            }
        }
        cells.push(peak);
        cells
    }
}

async fn legit_window(ctx: &Ctx, dep: &Deployment, s: &Setup, attack: Option<Attack>, plan: &Plan) -> Window {
    let z = &ctx.sizes;
    let start = Instant::now() + z.warmup;
    let end = start + z.duration;
    let tally = Arc::new(Tally::default());
    let attack_task = attack.map(|a| {
        let ctx = AttackCtx {
            gql: s.gql.clone(),
            ws_url: s.ws_url.clone(),
            addr: s.addr,
            hoarder: s.hoarder.token.clone(),
            victim: s.victim.clone(),
            timeout: plan.timeout,
            attackers: plan.attackers,
            slow_sockets: plan.slow_sockets,
            connections: plan.connections,
            start,
            end,
            tally: tally.clone(),
        };
        tokio::spawn(async move { run_attack(a, ctx).await })
    });
    let watch = dep.watch();
    let (gql, bodies, tokens) = (s.gql.clone(), s.order_bodies.clone(), s.tokens.clone());
    let orders = run_load(2, z.warmup, z.duration, &watch, move |w, seq| {
        let gql = gql.clone();
        let body = bodies[(w * 50 + seq as usize) % bodies.len()].clone();
        let token = tokens[w % tokens.len()].clone();
        async move {
            let d = gql.post_body(Some(&token), body).await?;
            // paid at once, off the measured path: a customer's unpaid orders
            // would otherwise pile up over the run (ORDER_TTL 1h), and every
            // placement counts them, so later rows would be slower for a
            // reason that is not the attack
            if let Some(id) = d.pointer("/createOrder/id").and_then(Value::as_str).map(str::to_string) {
                tokio::spawn(async move {
                    let _ = gql
                        .call(Some(&token), "mutation($id: ID!) { payOrder(id: $id) { id } }", json!({"id": id}))
                        .await;
                });
            }
            Ok(())
        }
    });
    let g = s.gql.clone();
    let products = run_load(2, z.warmup, z.duration, &watch, move |_, _| {
        let g = g.clone();
        async move {
            let d = g.post_body(None, PRODUCTS.to_string()).await?;
            let n = d.pointer("/products/nodes").and_then(Value::as_array).map_or(0, Vec::len);
            anyhow::ensure!(n == 20, "expected 20 products, got {n}");
            Ok(())
        }
    });
    let (mut orders, products) = tokio::join!(orders, products);
    if let Some(task) = attack_task {
        // every attack request is bounded by the plan's timeout
        match tokio::time::timeout(plan.timeout * 3, task).await {
            Ok(Ok(Err(e))) => log(&format!("  attack failed: {e:#}")),
            Ok(Err(e)) => log(&format!("  attack task: {e}")),
            Err(_) => log("  attack did not stop in time; left behind"),
            Ok(Ok(Ok(()))) => {}
        }
    }
    for (what, r) in [("createOrder", &orders), ("products", &products)] {
        if let Some(e) = &r.first_error {
            log(&format!("  legit {what}: {} errors, first: {e}", r.errors));
        }
    }
    // the peak of the two samplers
    orders.peak_rss_kib = orders.peak_rss_kib.max(products.peak_rss_kib);
    let tally = Arc::try_unwrap(tally).unwrap_or_else(|t| Tally {
        units: AtomicU64::new(t.units.load(Ordering::Relaxed)),
        refused: AtomicU64::new(t.refused.load(Ordering::Relaxed)),
        largest_response: AtomicU64::new(t.largest_response.load(Ordering::Relaxed)),
    });
    Window { orders, products, tally }
}

/// Waits until `/healthz` answers within a second again.
async fn recover(s: &Setup, limit: Duration) -> Result<()> {
    let url = s.gql.url.replace("/graphql", "/healthz");
    let deadline = Instant::now() + limit;
    loop {
        let ok =
            s.gql.http.get(&url).timeout(Duration::from_secs(1)).send().await.is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("/healthz still not answering after {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const PRODUCTS: &str = r#"{"query":"{ products(first: 20) { nodes { id sku name priceCents currency stock } pageInfo { hasNextPage endCursor } } }"}"#;

struct AttackCtx {
    gql: Gql,
    ws_url: String,
    addr: SocketAddr,
    hoarder: String,
    victim: String,
    timeout: Duration,
    attackers: usize,
    slow_sockets: usize,
    connections: usize,
    start: Instant,
    end: Instant,
    tally: Arc<Tally>,
}

async fn run_attack(attack: Attack, a: AttackCtx) -> Result<()> {
    tokio::time::sleep_until(a.start.into()).await;
    let a = Arc::new(a);
    match attack {
        Attack::FragmentsPost => {
            let body = json!({"query": fragment_bomb(30)}).to_string();
            documents(&a, ATTACKER, a.attackers, None, move || body.clone()).await
        }
        Attack::FragmentsWs => {
            let workers = (0..a.attackers).map(|_| {
                let a = a.clone();
                tokio::spawn(async move {
                    while Instant::now() < a.end {
                        a.tally.sent();
                        match tokio::time::timeout(a.timeout, ws_document(&a.ws_url, a.addr, &fragment_bomb(30))).await
                        {
                            Ok(Ok(refused)) if refused => a.tally.refused(),
                            _ => {}
                        }
                    }
                })
            });
            futures_util::future::join_all(workers).await;
            Ok(())
        }
        Attack::AmplifiedBatch => {
            let body = amplification_batch();
            let token = a.hoarder.clone();
            documents(&a, ATTACKER, a.attackers, Some(token), move || body.clone()).await
        }
        Attack::EchoedVariable => {
            let body = echo_document();
            documents(&a, ATTACKER, a.attackers, None, move || body.clone()).await
        }
        Attack::SlowHeaders => sockets(&a, a.slow_sockets, b"GET / HTTP/1.1\r\n", false).await,
        Attack::ManyConnections => {
            sockets(&a, a.connections, b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n", true).await
        }
        Attack::PasswordGuessing => {
            let workers = (10..30u8).map(|host| {
                let a = a.clone();
                tokio::spawn(async move {
                    let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, host));
                    let Ok(http) = attack_client(from, a.timeout) else { return };
                    let mut guess = 0u64;
                    while Instant::now() < a.end {
                        guess += 1;
                        let body = json!({
                            "query": "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { token } }",
                            "variables": {"e": a.victim, "p": format!("guess-{host}-{guess}")},
                        });
                        a.tally.sent();
                        let (refused, _) = post(&http, &a.gql.url, None, body.to_string()).await;
                        if refused == Some(true) {
                            a.tally.refused();
                        }
                    }
                })
            });
            futures_util::future::join_all(workers).await;
            Ok(())
        }
    }
}

/// `query { ...F0 } fragment F0 on Query { ...F1 ...F1 } … fragment Fn on Query { me { id } }`:
/// 2^n leaves when expanded, about 40·n bytes as written.
fn fragment_bomb(n: usize) -> String {
    let mut s = String::from("query { ...F0 }");
    for i in 0..n {
        s += &format!(" fragment F{i} on Query {{ ...F{j} ...F{j} }}", j = i + 1);
    }
    s += &format!(" fragment F{n} on Query {{ me {{ id }} }}");
    s
}

/// Ten operations, each three aliased `orders(first: 100)` with every line and its product.
fn amplification_batch() -> String {
    let selection = "nodes { id totalCents lines { quantity unitPriceCents lineTotalCents product { id sku name priceCents currency stock } } }";
    let query = format!("{{ a: orders(first: 100) {{ {selection} }} b: orders(first: 100) {{ {selection} }} c: orders(first: 100) {{ {selection} }} }}");
    let batch: Vec<Value> = (0..10).map(|_| json!({"query": query})).collect();
    Value::Array(batch).to_string()
}

/// A 250,000-character variable in 50 aliased `product(id:)`: each error may repeat it.
fn echo_document() -> String {
    let fields: String = (0..50).map(|i| format!(" a{i}: product(id: $v) {{ id }}")).collect();
    json!({"query": format!("query($v: ID!) {{{fields} }}"), "variables": {"v": "x".repeat(250_000)}}).to_string()
}

fn attack_client(from: IpAddr, timeout: Duration) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder().local_address(from).timeout(timeout).tcp_nodelay(true).build()?)
}

/// POSTs one body; `(Some(refused), bytes)` when an answer came.
async fn post(http: &reqwest::Client, url: &str, token: Option<&str>, body: String) -> (Option<bool>, usize) {
    let mut req = http.post(url).header("content-type", "application/json").body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let Ok(res) = req.send().await else { return (None, 0) };
    let status = res.status();
    let Ok(bytes) = res.bytes().await else { return (None, 0) };
    let errors = match serde_json::from_slice::<Value>(&bytes) {
        // a batch: refused when any of its operations was
        Ok(Value::Array(items)) => items.iter().any(|v| v.get("errors").is_some()),
        Ok(v) => v.get("errors").is_some(),
        Err(_) => false,
    };
    (Some(errors || status.is_client_error()), bytes.len())
}

/// `attackers` workers POSTing `body()` from `from` until the window ends.
async fn documents(
    a: &Arc<AttackCtx>,
    from: IpAddr,
    attackers: usize,
    token: Option<String>,
    body: impl Fn() -> String + Clone + Send + 'static,
) -> Result<()> {
    let http = attack_client(from, a.timeout)?;
    let workers = (0..attackers).map(|_| {
        let (a, http, token, body) = (a.clone(), http.clone(), token.clone(), body.clone());
        tokio::spawn(async move {
            while Instant::now() < a.end {
                a.tally.sent();
                let (refused, bytes) = post(&http, &a.gql.url, token.as_deref(), body()).await;
                a.tally.response(bytes);
                if refused == Some(true) {
                    a.tally.refused();
                }
            }
        })
    });
    futures_util::future::join_all(workers).await;
    Ok(())
}

/// One document as a `graphql-transport-ws` subscription, anonymous; true
/// when the server refused it (an `error` message or a close).
async fn ws_document(ws_url: &str, addr: SocketAddr, query: &str) -> Result<bool> {
    let mut req = ws_url.into_client_request()?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("graphql-transport-ws"));
    let stream = connect_from(ATTACKER, addr).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    ws.send(Message::text(json!({"type": "connection_init", "payload": {}}).to_string())).await?;
    ws.send(Message::text(json!({"id": "1", "type": "subscribe", "payload": {"query": query}}).to_string())).await?;
    while let Some(m) = ws.next().await {
        match m? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str())?;
                match v.get("type").and_then(Value::as_str) {
                    Some("error") => return Ok(true),
                    Some("next") => return Ok(v.pointer("/payload/errors").is_some()),
                    Some("complete") => return Ok(false),
                    _ => {}
                }
            }
            Message::Close(_) => return Ok(true),
            _ => {}
        }
    }
    Ok(true)
}

async fn connect_from(from: IpAddr, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    Ok(socket.connect(to).await?)
}

/// `n` connections from one address, each sending `opening` (a complete
/// request when `complete`, whose answer is read) and then holding the
/// socket idle until the window ends; refused: the server closed it (or
/// would not take it).
async fn sockets(a: &Arc<AttackCtx>, n: usize, opening: &'static [u8], complete: bool) -> Result<()> {
    let opened = futures_util::stream::iter(0..n)
        .map(|_| {
            let a = a.clone();
            async move {
                a.tally.sent();
                let attempt = tokio::time::timeout(a.timeout, async {
                    let mut s = connect_from(ATTACKER, a.addr).await?;
                    s.write_all(opening).await?;
                    if complete {
                        let mut buf = [0u8; 1024];
                        let n = s.read(&mut buf).await?;
                        anyhow::ensure!(n > 0, "closed before answering");
                    }
                    Ok::<_, anyhow::Error>(s)
                })
                .await;
                match attempt {
                    Ok(Ok(s)) => Some(s),
                    _ => {
                        a.tally.refused();
                        None
                    }
                }
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    tokio::time::sleep_until(a.end.into()).await;
    for s in opened.into_iter().flatten() {
        let mut buf = [0u8; 1024];
        // still open: WouldBlock; closed or answered (408) by the server: refused
        match s.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => a.tally.refused(),
        }
    }
    Ok(())
}

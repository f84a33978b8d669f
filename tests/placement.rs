//! Orders that break several placement rules at once. Both stores give the
//! one refusal that `src/store/placement.rs` puts first (unknown product,
//! then a wrong request, then stock, then the pending limits), whether the
//! order is placed on its own or (on Postgres) in a batch of concurrent
//! orders, and a refused order changes nothing: stock exact, no order row.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::{code, TestApp, ADMIN};
use futures_util::future::join_all;
use serde_json::{json, Value};
use shopgraph::{
    domain::{CustomerId, OrderRequest, ProductId, Quantity},
    store::{PlaceError, PlacementLimits},
};

const UNKNOWN: &str = "prd_987654";

/// An order's lines, the code it must get and a word its message must contain.
type Fault<'a> = (Vec<(&'a str, i64)>, &'static str, &'a str);

/// The catalog the faults are made of.
struct Catalog {
    /// USD, 10 in stock
    plenty: String,
    /// USD, 1 in stock
    short: String,
    /// EUR, 10 in stock
    eur: String,
    /// USD at 1,000,000 cents: 10,000 of them are over the largest total
    dear: String,
}

impl Catalog {
    async fn create(app: &TestApp) -> Catalog {
        Catalog {
            plenty: app.create_product("PLENTY", 100, 10).await,
            short: app.create_product("SHORT", 100, 1).await,
            eur: app.create_product_in("EURO", 100, "EUR", 10).await,
            dear: app.create_product("DEAR", 1_000_000, 10_000).await,
        }
    }

    /// The multi-fault orders.
    fn faults(&self) -> Vec<Fault<'_>> {
        let (plenty, short, eur, dear) =
            (self.plenty.as_str(), self.short.as_str(), self.eur.as_str(), self.dear.as_str());
        vec![
            (vec![(short, 5), (UNKNOWN, 1)], "NOT_FOUND", UNKNOWN),
            (vec![(eur, 1), (UNKNOWN, 1)], "NOT_FOUND", UNKNOWN),
            (vec![(short, 5), (eur, 1), (UNKNOWN, 1)], "NOT_FOUND", UNKNOWN),
            (vec![(short, 5), (eur, 1)], "BAD_USER_INPUT", "currency"),
            (vec![(short, 5), (dear, 10_000)], "BAD_USER_INPUT", "total"),
            (vec![(plenty, 11), (short, 5)], "INSUFFICIENT_STOCK", plenty),
            (vec![(plenty, 1), (short, 5)], "INSUFFICIENT_STOCK", short),
        ]
    }

    async fn assert_untouched(&self, app: &TestApp) {
        let stocks = [&self.plenty, &self.short, &self.eur, &self.dear].map(|p| app.stock(p));
        assert_eq!(join_all(stocks).await, vec![10, 1, 10, 10_000], "a refused order takes no stock");
        let all = app.data(Some(ADMIN), "{ orders(first: 100) { nodes { id } } }", json!({})).await;
        assert_eq!(all["orders"]["nodes"], json!([]), "no order row for a refused order");
    }
}

fn assert_refused(v: &Value, want: &str, mentions: &str, lines: &[(&str, i64)]) {
    assert_eq!(code(v), want, "{lines:?}: {v}");
    let message = v["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains(mentions), "{lines:?}: the message names {mentions}: {v}");
}

/// A request as the store takes it (lines sorted, as `createOrder` makes them).
fn request(lines: &[(&str, i64)]) -> OrderRequest {
    let lines =
        lines.iter().map(|(p, q)| (ProductId::parse(p).unwrap(), Quantity::parse(*q as i32).unwrap())).collect();
    OrderRequest::new(lines, None).unwrap()
}

/// Places directly through the store, with the given pending limits.
async fn place(
    app: &TestApp,
    customer: CustomerId,
    lines: &[(&str, i64)],
    limits: PlacementLimits,
) -> Result<(), PlaceError> {
    let now = Utc::now();
    let expires_at = now + chrono::Duration::seconds(60);
    app.store.place_order(customer, &request(lines), now, expires_at, limits).await.map(|_| ())
}

both_stores! {
    each_multi_fault_order_gets_the_first_refusal_and_changes_nothing => |app: TestApp| async move {
        let catalog = Catalog::create(&app).await;
        let (token, _) = app.customer().await;
        for (lines, want, mentions) in catalog.faults() {
            let v = app.create_order(&token, &lines).await;
            assert_refused(&v, want, mentions, &lines);
        }
        catalog.assert_untouched(&app).await;
    };

    multi_fault_orders_sent_together_get_the_same_refusals => |app: TestApp| async move {
        // sent at once, so that Postgres places them in batches
        let catalog = Catalog::create(&app).await;
        let tokens: Vec<String> = join_all((0..4).map(|_| app.customer())).await.into_iter().map(|(t, _)| t).collect();
        let faults = catalog.faults();
        for round in 0..3 {
            let sends = (0..faults.len() * 4).map(|i| {
                let (lines, _, _) = &faults[i % faults.len()];
                app.create_order(&tokens[(i + round) % tokens.len()], lines)
            });
            let answers = tokio::time::timeout(Duration::from_secs(60), join_all(sends)).await.expect("answered within 60 s");
            for (i, v) in answers.iter().enumerate() {
                let (lines, want, mentions) = &faults[i % faults.len()];
                assert_refused(v, want, mentions, lines);
            }
        }
        catalog.assert_untouched(&app).await;
    };

    the_pending_limits_come_after_every_other_refusal => |app: TestApp| async move {
        let catalog = Catalog::create(&app).await;
        let (_, id) = app.customer().await;
        let customer = CustomerId::parse(&id).unwrap();
        // the customer holds one unpaid order of 4 units: at a limit of one order and of 5 units
        place(&app, customer, &[(&catalog.plenty, 4)], PlacementLimits::NONE).await.unwrap();
        let limits = PlacementLimits { orders: 1, units: 5, ..PlacementLimits::NONE };
        let (plenty, short, eur) = (catalog.plenty.as_str(), catalog.short.as_str(), catalog.eur.as_str());
        let cases: Vec<(Vec<(&str, i64)>, &str)> = vec![
            (vec![(short, 5), (UNKNOWN, 1)], "UnknownProduct"),
            (vec![(plenty, 1), (eur, 1)], "MixedCurrencies"),
            (vec![(short, 5)], "InsufficientStock"),
            (vec![(plenty, 5)], "TooManyPending"),
        ];
        for (lines, want) in &cases {
            let got = place(&app, customer, lines, limits).await.unwrap_err();
            assert!(format!("{got:?}").starts_with(want), "{lines:?}: want {want}, got {got:?}");
        }
        // room for one more order, not for its units
        let got = place(&app, customer, &[(plenty, 2)], PlacementLimits { orders: 2, units: 5, ..PlacementLimits::NONE }).await.unwrap_err();
        assert!(matches!(got, PlaceError::TooManyUnits { max: 5, would_hold: 6, .. }), "{got:?}");
        // the same, many at once (Postgres: in batches), from the limited customer
        let burst = (0..16).map(|i| {
            let (lines, _) = &cases[i % cases.len()];
            place(&app, customer, lines, limits)
        });
        for (i, got) in join_all(burst).await.into_iter().enumerate() {
            let (lines, want) = &cases[i % cases.len()];
            let got = got.unwrap_err();
            assert!(format!("{got:?}").starts_with(want), "{lines:?}: want {want}, got {got:?}");
        }
        assert_eq!(app.stock(plenty).await, 6, "only the first order holds stock");
        assert_eq!((app.stock(short).await, app.stock(eur).await), (1, 10));
    };
}

/// The placement's count of a customer's unpaid orders reads that
/// customer's orders only, even on a connection whose plans were made while
/// `orders` was empty (a new deployment): PL/pgSQL keeps a plan for the
/// connection's life, and a plan chosen on an empty table once read every
/// unpaid order in the database for each batch, halving `createOrder`
/// throughput as orders accumulated. Counted with the transaction's own
/// table statistics, which Postgres updates as it goes (no waiting).
#[tokio::test]
async fn counting_a_customers_unpaid_orders_reads_only_that_customers_orders_even_planned_on_an_empty_table() {
    use sqlx::{Connection, Row};
    if common::skip_without_postgres() {
        return;
    }
    let db = common::fresh_db(common::Backend::Postgres).await;
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::migrate!("./migrations/postgres").run(&mut conn).await.expect("migrate");
    // the statistics say `orders` is empty, and stay so: fewer rows follow
    // than autovacuum's threshold
    sqlx::query("VACUUM ANALYZE orders").execute(&mut conn).await.expect("vacuum");
    let setup = "
        INSERT INTO customers (email, password_hash) VALUES ('a@x.io', 'h'), ('b@x.io', 'h'), ('c@x.io', 'h');
        INSERT INTO products (sku, name, price_cents, currency, stock) VALUES ('P', 'p', 100, 'USD', 1000);
        INSERT INTO orders (customer_id, status, total_cents, currency, created_at, expires_at, fingerprint)
        SELECT CASE WHEN g <= 3 THEN 1 ELSE 3 END, 'PENDING_PAYMENT', 100, 'USD', now(), now() + interval '1 hour', 'f'
          FROM generate_series(1, 40) g;
        INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents) SELECT id, 1, 1, 100 FROM orders;";
    sqlx::raw_sql(setup).execute(&mut conn).await.expect("setup");
    conn.close().await.expect("close");

    // A new connection plans everything now, on those statistics. Customers
    // 1 (3 unpaid orders) and 2 (none) place one order each; the 37 unpaid
    // orders of customer 3 are not theirs to read.
    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let mut tx = conn.begin().await.expect("begin");
    let rows_read = "SELECT pg_stat_get_xact_tuples_returned('orders'::regclass) \
                     + pg_stat_get_xact_tuples_fetched('orders'::regclass)";
    let before: i64 = sqlx::query_scalar(rows_read).fetch_one(&mut *tx).await.expect("statistics");
    let now = Utc::now();
    let rows =
        sqlx::query("SELECT r_id, r_pending FROM place_batch($1, $2, $3, $4, $5, $6, $7, 2147483647, 10, 1000000)")
            .bind(vec![1_i64, 2])
            .bind(vec![now, now])
            .bind(vec![now + chrono::Duration::hours(1); 2])
            .bind(vec!["f".to_string(), "f".to_string()])
            .bind(vec![1_i32, 2])
            .bind(vec![1_i64, 1])
            .bind(vec![1_i32, 1])
            .fetch_all(&mut *tx)
            .await
            .expect("place_batch");
    let pending: Vec<i64> = rows.iter().map(|r| r.get("r_pending")).collect();
    assert_eq!(pending, [3, 0], "the unpaid orders each customer held before");
    assert!(rows.iter().all(|r| r.get::<Option<i64>, _>("r_id").is_some()), "both placed");
    let single = sqlx::query("SELECT n FROM lock_pending(1, now())").fetch_one(&mut *tx).await.expect("lock_pending");
    assert_eq!(single.get::<i64, _>("n"), 4, "customer 1's unpaid orders, the new one included");

    let read = sqlx::query_scalar::<_, i64>(rows_read).fetch_one(&mut *tx).await.expect("statistics") - before;
    // customer 1's orders twice (3, then 4), the two new orders' foreign-key
    // checks: 9; reading every unpaid order would be 40 or more each time
    assert!(read <= 15, "the counts read {read} order rows");
    tx.rollback().await.expect("rollback");
}

//! Tracing (human or JSON lines) and Prometheus metrics. Metric names live
//! here, so a dashboard has one file to read.

use std::{
    collections::HashMap,
    io::IsTerminal,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, EnvFilter};

use crate::{
    config::LogFormat,
    domain::{CancelReason, CancelSource},
    log_writer::LogWriter,
};

/// Installs the global tracing subscriber (once; later calls are ignored).
/// Human logs are coloured only on a terminal: a file, pipe or journal
/// gets plain text, without escape sequences. Lines go to stderr through
/// [`LogWriter`] (`INFO` lines batched, warnings at once).
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let ansi = std::io::stderr().is_terminal();
    let _ = match format {
        LogFormat::Json => fmt().json().with_env_filter(filter).with_writer(LogWriter::start()).try_init(),
        LogFormat::Human => fmt().with_ansi(ansi).with_env_filter(filter).with_writer(LogWriter::start()).try_init(),
    };
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let lag_buckets = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            let latency_buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("shopgraph_expiry_lag_seconds".into()), &lag_buckets)
                .expect("buckets")
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &latency_buckets)
                .expect("buckets")
                .install_recorder()
                .expect("one recorder per process");
            // the series alerts watch exist from the start, at zero, rather
            // than appearing with their first increment
            for name in [
                "shopgraph_orders_created_total",
                "shopgraph_expiry_listener_reconnects_total",
                "shopgraph_expiry_hash_write_failures_total",
                "shopgraph_event_relay_failures_total",
                "shopgraph_outbox_unreadable_rows_total",
            ] {
                counter!(name).increment(0);
            }
            for (reason, source) in CANCELLATIONS {
                counter!("shopgraph_orders_cancelled_total", "reason" => reason.as_db(), "source" => source.as_str())
                    .increment(0);
            }
            for source in [CancelSource::Listener, CancelSource::Sweep, CancelSource::Customer, CancelSource::Admin] {
                // registered without a sample: rendered with every bucket at zero
                let _ = histogram!("shopgraph_expiry_lag_seconds", "source" => source.as_str());
            }
            gauge!("shopgraph_expiry_listener_up").increment(0.0);
            gauge!("shopgraph_websocket_connections").increment(0.0);
            gauge!("shopgraph_websocket_subscriptions").increment(0.0);
            gauge!("shopgraph_websocket_shared_executions").increment(0.0);
            handle
        })
        .clone()
}

pub fn order_created(latency: Duration) {
    // the handles are looked up once: `counter!`/`histogram!` find theirs in
    // the registry by name on every call, and this runs once per order
    static HANDLES: OnceLock<(Counter, Histogram)> = OnceLock::new();
    let (created, duration) = HANDLES.get_or_init(|| {
        // a handle taken before the recorder is installed would stay a no-op
        metrics_handle();
        (counter!("shopgraph_orders_created_total"), histogram!("shopgraph_create_order_duration_seconds"))
    });
    created.increment(1);
    duration.record(latency.as_secs_f64());
}

/// One payment; `source` is who paid: `customer` or `admin`.
pub fn order_paid(source: &'static str) {
    counter!("shopgraph_orders_paid_total", "source" => source).increment(1);
}

/// Every (reason, source) a cancellation can be counted with: a pending
/// order cancelled after its deadline is `EXPIRED` whoever asked, so the
/// customer and the admin can cancel with two reasons each.
const CANCELLATIONS: [(CancelReason, CancelSource); 6] = [
    (CancelReason::Expired, CancelSource::Listener),
    (CancelReason::Expired, CancelSource::Sweep),
    (CancelReason::Customer, CancelSource::Customer),
    (CancelReason::Expired, CancelSource::Customer),
    (CancelReason::Admin, CancelSource::Admin),
    (CancelReason::Expired, CancelSource::Admin),
];

/// One cancellation; `lag` (cancellation − deadline) for expiries.
pub fn order_cancelled(reason: CancelReason, source: CancelSource, lag: Option<Duration>) {
    counter!("shopgraph_orders_cancelled_total", "reason" => reason.as_db(), "source" => source.as_str()).increment(1);
    if let Some(lag) = lag {
        histogram!("shopgraph_expiry_lag_seconds", "source" => source.as_str()).record(lag.as_secs_f64());
    }
}

pub fn expiry_write_failed() {
    counter!("shopgraph_expiry_hash_write_failures_total").increment(1);
}

pub fn listener_up(up: bool) {
    gauge!("shopgraph_expiry_listener_up").set(if up { 1.0 } else { 0.0 });
}

/// 1 while the canary finds that expired-key events reach the listener.
pub fn expiry_events_arriving(arriving: bool) {
    gauge!("shopgraph_expiry_events_arriving").set(if arriving { 1.0 } else { 0.0 });
}

pub fn listener_reconnected() {
    counter!("shopgraph_expiry_listener_reconnects_total").increment(1);
}

pub fn outbox_backlog(n: i64) {
    gauge!("shopgraph_outbox_backlog").set(n as f64);
}

/// An outbox row whose payload is not an event (counted each time it is read).
pub fn outbox_row_unreadable() {
    counter!("shopgraph_outbox_unreadable_rows_total").increment(1);
}

pub fn relay_failed() {
    counter!("shopgraph_event_relay_failures_total").increment(1);
}

pub fn ws_connections(delta: f64) {
    gauge!("shopgraph_websocket_connections").increment(delta);
}

pub fn ws_subscriptions(delta: f64) {
    gauge!("shopgraph_websocket_subscriptions").increment(delta);
}

/// Executions shared by identical subscriptions (each serves one or more of
/// `shopgraph_websocket_subscriptions`).
pub fn ws_shared_executions(delta: f64) {
    gauge!("shopgraph_websocket_shared_executions").increment(delta);
}

/// Distinct `field` labels kept; the label is a root field of the schema
/// (or one of the fixed words below), so a handful exist. The cap only
/// guards against a future caller passing something else.
const MAX_FIELD_LABELS: usize = 64;

/// The latency of one GraphQL request, labelled `field` with the root field
/// it executed (`createOrder`, `products`): names the schema bounds, never
/// the client-chosen operation name. `multiple` when an operation selects
/// several root fields, `none` when nothing executed (syntax or validation
/// errors, limits).
pub fn graphql_request(root_field: Option<&str>, latency: Duration) {
    // one histogram handle per label, kept: looking a labelled histogram up
    // in the registry allocates and hashes its key, once per request
    static LABELS: Mutex<Option<RequestHistograms>> = Mutex::new(None);
    let mut labels = LABELS.lock().unwrap_or_else(|e| e.into_inner());
    let labels = labels.get_or_insert_with(|| {
        // a handle taken before the recorder is installed would stay a no-op
        metrics_handle();
        RequestHistograms { fields: HashMap::new(), none: None, other: None }
    });
    // each series is registered by its first sample, as `histogram!` would
    let histogram = match root_field {
        None => &*labels.none.get_or_insert_with(|| request_histogram("none".to_string())),
        Some(field) if labels.fields.contains_key(field) => &labels.fields[field],
        Some(field) if labels.fields.len() < MAX_FIELD_LABELS => {
            &*labels.fields.entry(field.to_string()).or_insert_with(|| request_histogram(field.to_string()))
        }
        Some(_) => &*labels.other.get_or_insert_with(|| request_histogram("other".to_string())),
    };
    histogram.record(latency.as_secs_f64());
}

/// The request-latency histograms by `field` label (see [`graphql_request`]).
struct RequestHistograms {
    fields: HashMap<String, Histogram>,
    none: Option<Histogram>,
    other: Option<Histogram>,
}

fn request_histogram(label: String) -> Histogram {
    histogram!("shopgraph_graphql_request_duration_seconds", "field" => label)
}

pub fn db_pool(in_use: u32, idle: u32) {
    gauge!("shopgraph_db_pool_connections", "state" => "in_use").set(in_use as f64);
    gauge!("shopgraph_db_pool_connections", "state" => "idle").set(idle as f64);
}

/// An anonymous catalog request answered from the server's own cache
/// (it executed nothing, so `shopgraph_graphql_request_duration_seconds`
/// does not see it).
pub fn catalog_cache_hit() {
    counter!("shopgraph_catalog_cache_hits_total").increment(1);
}

/// A response refused because its body would pass the response-size cap.
pub fn response_too_large() {
    counter!("shopgraph_graphql_responses_too_large_total").increment(1);
}

/// Whether the read replica serves the catalog (1) or the primary does (0).
pub fn read_replica_up(up: bool) {
    gauge!("shopgraph_db_read_replica_up").set(if up { 1.0 } else { 0.0 });
}

/// A connection closed at accept: `per_address` or `total` cap.
pub fn connection_refused(why: crate::connlimit::Refused) {
    let reason = match why {
        crate::connlimit::Refused::PerAddress => "per_address",
        crate::connlimit::Refused::Total => "total",
    };
    counter!("shopgraph_connections_refused_total", "reason" => reason).increment(1);
}

/// An HTTP connection closed by its header or idle timeout.
pub fn connection_timed_out(why: &'static str) {
    counter!("shopgraph_connections_timed_out_total", "reason" => why).increment(1);
}

/// A websocket closed by the server for a limit: `per_address` or `total`
/// (1013), `anonymous_idle` (4408) or `token_expired` (4403).
pub fn ws_closed(reason: &'static str) {
    counter!("shopgraph_websocket_limit_closes_total", "reason" => reason).increment(1);
}

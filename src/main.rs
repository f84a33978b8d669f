//! The `shopgraph` command: parses the command line and calls the library.

use clap::{Parser, Subcommand};
use shopgraph::{
    app::{open_store, App},
    config::ConfigArgs,
    domain::NewProduct,
    log_writer,
    store::StoreError,
    telemetry,
};

// Flags belong to the command they configure: `shopgraph serve --order-ttl 2s`,
// or `shopgraph --order-ttl 2s` for the default `serve`. Flags before a
// subcommand (`shopgraph --order-ttl 2s serve`) are refused rather than
// parsed and then ignored. (Not a doc comment: clap would show it as help.)
#[derive(Parser)]
#[command(
    name = "shopgraph",
    version,
    about = "A GraphQL commerce API whose unpaid orders cancel themselves",
    args_conflicts_with_subcommands = true,
    after_help = "Flags go after the command (`shopgraph serve --order-ttl 2s`), or stand alone for serve \
                  (`shopgraph --order-ttl 2s`); each is also read from its environment variable."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve(ConfigArgs),
    /// Print the GraphQL schema (SDL) to stdout.
    Schema,
    /// Create or migrate the database named by DATABASE_URL.
    Migrate(ConfigArgs),
    /// Add a dozen demo products (idempotent).
    SeedDemo(ConfigArgs),
}

fn fail(msg: impl std::fmt::Display) -> ! {
    log_writer::flush();
    eprintln!("error: {msg}");
    std::process::exit(2);
}

/// glibc raises its mmap threshold after the first large block is freed;
/// large blocks (argon2's 19 MiB hashing buffers, when they came from
/// glibc) then come from the heap and fragment it, and the process kept
/// hundreds of MiB after a few logins. A fixed threshold keeps large blocks
/// mapped and returns them when freed. Rust's allocations now go to
/// mimalloc ([`GLOBAL`]); this still holds for what calls glibc's malloc.
fn tame_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called once at start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// mimalloc: every request allocates and frees thousands of small blocks
/// (the engine's documents, values and futures), which mimalloc's per-thread
/// free lists serve in fewer instructions than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    tame_allocator();
    let cli = Cli::parse();
    let (command, args) = match cli.command {
        None => ("serve", cli.config),
        Some(Command::Serve(a)) => ("serve", a),
        Some(Command::Schema) => {
            print!("{}", shopgraph::graphql::sdl());
            return;
        }
        Some(Command::Migrate(a)) => ("migrate", a),
        Some(Command::SeedDemo(a)) => ("seed-demo", a),
    };
    let config = args.into_config().unwrap_or_else(|e| fail(e));
    telemetry::init_tracing(config.log_format);
    match command {
        "migrate" => {
            open_store(&config).await.unwrap_or_else(|e| fail(format!("DATABASE_URL: {e}")));
            println!("database is up to date");
        }
        "seed-demo" => seed_demo(&config).await,
        _ => {
            let app = App::build(config).await.unwrap_or_else(|e| fail(e));
            // what the start logged is on stderr before anyone is told to connect
            log_writer::flush();
            println!("listening on http://{}", app.addr);
            if let Err(e) = app.run(shutdown_signal()).await {
                fail(format!("server error: {e}"));
            }
        }
    }
    log_writer::flush();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

const DEMO_PRODUCTS: &[(&str, &str, i32, i32)] = &[
    ("DEMO-TEE-BLK", "Black T-shirt", 1900, 40),
    ("DEMO-TEE-WHT", "White T-shirt", 1900, 40),
    ("DEMO-HOODIE", "Hoodie", 4900, 20),
    ("DEMO-CAP", "Baseball cap", 1500, 30),
    ("DEMO-MUG", "Coffee mug", 1200, 50),
    ("DEMO-SOCKS", "Socks (3 pairs)", 999, 60),
    ("DEMO-TOTE", "Tote bag", 1400, 25),
    ("DEMO-STICKERS", "Sticker pack", 500, 100),
    ("DEMO-NOTEBOOK", "Notebook", 800, 35),
    ("DEMO-BOTTLE", "Water bottle", 2200, 15),
    ("DEMO-POSTER", "Poster", 1800, 10),
    ("DEMO-KEYCHAIN", "Keychain", 600, 5),
];

async fn seed_demo(config: &shopgraph::Config) {
    let store = open_store(config).await.unwrap_or_else(|e| fail(format!("DATABASE_URL: {e}")));
    let mut added = 0;
    for (sku, name, price, stock) in DEMO_PRODUCTS {
        let p = NewProduct::parse(sku, name, *price, "USD", *stock).expect("demo products are valid");
        match store.create_product(&p).await {
            Ok(_) => added += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(e) => fail(format!("DATABASE_URL: {e}")),
        }
    }
    println!("demo products: {added} added, {} already there", DEMO_PRODUCTS.len() - added);
}

//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!`
//! embeds `migrations/` at compile time, and cargo does not know to look
//! there by itself (a new file left the old set in the binary).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

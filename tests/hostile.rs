//! Hostile traffic (issue 12): each attack is refused and changes nothing,
//! and while it runs another client is still served.

mod common;

#[path = "hostile/connections.rs"]
mod connections;

//! Hostile traffic (issue 12): every attack is refused with the contract's
//! code, changes nothing, and leaves the service to other clients.

mod common;

#[path = "hostile/abuse.rs"]
mod abuse;

//! Hostile traffic (issue 12): each attack is refused with the contract's
//! code, changes nothing, and leaves the service to other clients.

mod common;

#[path = "hostile/hygiene.rs"]
mod hygiene;

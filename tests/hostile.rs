//! Hostile traffic: every attack of issue 12, tried as an attacker would,
//! is refused with the contract's code, changes nothing, and leaves the
//! service answering other clients while it runs. One submodule per front:
//! documents (cost on the document as written), connections, abuse limits,
//! hygiene.

mod common;

#[path = "hostile/abuse.rs"]
mod abuse;
#[path = "hostile/connections.rs"]
mod connections;
#[path = "hostile/documents.rs"]
mod documents;

//! Order expiry: Redis is the trigger, the database row is the truth.
//!
//! * [`schedule`] names the keys ([`schedule::Keys`]), and its
//!   [`schedule::Scheduler`] writes each order's expiry hash
//!   (`<prefix>{sN}order:<id>`, `PEXPIREAT` at the deadline) and its entry in
//!   its shard of the deadline index (`<prefix>{sN}deadlines`, a sorted set;
//!   N = id mod [`schedule::SHARDS`], one hash tag per shard so a Cluster
//!   keeps both in one slot), atomically. It is the only part of expiry that
//!   [`crate::orders`] uses.
//! * [`nudger`] claims due entries from the index and touches their keys, so
//!   Redis deletes them at the deadline instead of whenever its sampling finds
//!   them (minutes late once many keys hold TTLs), and sends `expired` now.
//! * [`listener`] receives `__keyevent@<db>__:expired` on its own connection
//!   (one per primary on a Cluster, following the topology) and cancels the
//!   orders named by the keys.
//! * [`canary`] checks that expired events really arrive (no `CONFIG`
//!   needed); while they do not, the nudger cancels what it claims itself.
//! * [`sweeper`] cancels whatever no event reached: the safety net.
//! * [`resync`] writes back the keys a new or emptied Redis server lacks,
//!   so orders still ahead of their deadline expire on time after it.

pub mod canary;
pub mod listener;
pub mod nudger;
pub mod resync;
pub mod schedule;
pub mod sweeper;

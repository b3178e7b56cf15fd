//! The lsync simulator: several devices of one library under a seeded workload and hostile
//! conditions, and a proof that they all end with the same data. `cargo xtask sim` runs it.
//!
//! # Two modes
//! - **Real** ([`real`], the default): every peer is the real engine — an
//!   [`lsync_node::Library`] with its own SQLite file, real QUIC on loopback, real actors —
//!   driven by a seeded workload (bulk indexing of file trees, edits, moves, subtree deletes, tags,
//!   albums, assignments, metadata, concurrent conflicting edits) under partitions, peers going
//!   offline, abrupt kills and restarts from the files, a device joining mid-run, and clock skew.
//!   Wall-clock time and thread scheduling make each run different; the seed fixes the workload
//!   and the fault schedule.
//! - **Deterministic** ([`det`]): the engine's sans-IO cores (HLC, merge, owner-version rule,
//!   watermarks, prune planning, batcher, retry queue) driven over the in-memory network with a
//!   virtual clock and one seeded RNG. A run is a pure function of its seed; thousands of seeds
//!   run in a minute.
//!
//! # Invariants checked
//! - Real mode, at the end, independently of the engine's bookkeeping: every non-`sync_` table is
//!   identical on every peer, and every write the workload saw acknowledged is present on every
//!   peer or superseded by a later acknowledged write (the expected tables are computed from the
//!   workload's own record of its writes).
//! - Deterministic mode, after every step: HLC stamps strictly increase per device (restarts
//!   included), watermarks never move backwards and never claim a change not applied, the log is
//!   never pruned above what every peer acked nor above what any device has applied, and only a
//!   row's owner writes it; after healing, every device converges within a bounded number of steps
//!   on the state an independent oracle computes from every write.
//!
//! # What it does not do
//! It does not measure against a baseline (`cargo xtask bench` does), and it does not simulate
//! disks failing or a process dying in the middle of a SQLite transaction (SQLite's atomic commit
//! is trusted; see `docs/simulator.md`).
//!
//! # Where the IO is
//! [`det`] does none: it reads no clock and touches no file or socket. [`real`] opens SQLite files
//! in a temporary folder (or `--keep DIR`), binds UDP sockets on 127.0.0.1 and reads the system
//! clock.

pub mod det;
mod faults;
pub mod real;
mod topology;

pub use faults::{FAULT_NAMES, Faults};
pub use topology::{TOPOLOGY_NAMES, Topology};

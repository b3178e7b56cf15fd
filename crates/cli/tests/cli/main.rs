//! End-to-end tests of the `lsync` binary, run as a user runs it: separate processes, real
//! library files, real QUIC on loopback, pairing by invitation, and convergence checked by
//! comparing the library files' tables.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

mod errors;
mod harness;
mod readme;
mod sync;

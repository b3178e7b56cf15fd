//! End-to-end tests: real SQLite files, real QUIC on loopback, several devices per test. Each
//! test asserts convergence by comparing every synced table of every device.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]
#![allow(unreachable_pub, missing_docs, reason = "test helpers")]

mod catchup;
mod harness;
mod lifecycle;
mod live;
mod world;

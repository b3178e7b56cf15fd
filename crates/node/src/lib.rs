//! The lsync engine: the library API an app uses, over supervised actors that keep a library in
//! sync with its paired devices.
//!
//! # Model
//! - [`core`] holds the engine's decision logic as sans-IO state machines: what to batch and when
//!   to flush it, what to retry and when. They take the current time as an argument and return
//!   what to do; nothing in them reads a clock, touches a socket or the database.
//! - [`config`] holds [`config::SyncConfig`], every knob of the engine with its default and why:
//!   read from a TOML file and `LSYNC_*` environment variables, validated as a whole, and turned
//!   into the settings of the transport, the store, the log and the clock. The engine reads its
//!   settings from nowhere else.
//!
//! # What this crate does not do (yet)
//! The actors, the library API and live sync arrive with issue 5; catch-up, relay and backfill
//! with issue 6. Until then this crate holds only the cores listed above.

pub mod config;
pub mod core;

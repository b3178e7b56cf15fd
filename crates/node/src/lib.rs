//! The lsync engine: the library API an app uses ([`Library`]), over supervised actors that keep
//! a library in sync with its paired devices.
//!
//! # Model
//! - [`Library`] is one device's copy of a library: a SQLite file ([`lsync_store`]) plus the
//!   engine. Local writes commit data, change record, watermark and clock in one transaction and
//!   are then handed to the engine; reads go straight to the database.
//! - The engine starts when a transport is given ([`Library::start_sync`]; networking may come up
//!   late) and runs on its own thread as actix actors (`engine`): a supervisor, one peer actor
//!   per remote device, a retry actor and a pruner. They are thin shells over [`core`] (batching,
//!   retry scheduling) and the storage crates (merging, watermarks, pruning decisions).
//! - Live sync: local writes are batched (a window of `batch_window`, rows of one model coalesced
//!   to their newest version) and pushed to every online peer; receivers apply each batch in one
//!   transaction, observe its HLC stamps, persist watermarks, and acknowledge. Unacknowledged
//!   batches are re-sent with backoff; acknowledgements drive pruning.
//! - Catch-up: on every connect, after sync is switched back on, and whenever a heartbeat shows a
//!   peer holds more, a peer actor exchanges watermarks with its peer and pulls exactly what this
//!   device lacks, page by page. Offline peers get nothing pushed and nothing is held in memory
//!   for them: the log and the tables are their queue.
//! - Relay: a peer serves every origin's changes and every owner's rows it holds, so devices
//!   that never meet stay in sync through a third.
//! - Backfill: a copy made with [`Library::join`] (a new device, or one re-created under its
//!   identity) fetches everything from a complete peer through the backfill actor, which drives
//!   [`lsync_backfill`]: snapshots of shared records, then each owner's rows by key, each page
//!   committed with its checkpoint, then a catch-up, then ready. A device whose needs a peer
//!   pruned away resyncs the same way (shared records only, or everything with deletion of what
//!   the peer no longer holds).
//! - [`config::SyncConfig`] holds every knob; [`Event`]s tell the app what changed.
//!
//! # Invariants
//! - A write accepted by the library is committed before the call returns, and survives crashes
//!   and `close`.
//! - Batches from one peer are applied in the order received, one transaction each; a batch that
//!   fails to apply is not acknowledged, so its sender keeps it.
//! - Every queue is bounded: actor mailboxes (writers and the transport wait), the retry queue
//!   (past it, catch-up by watermark takes over, counted in metrics), event subscribers (an
//!   explicit [`Event::Overflow`] marker).
//!
//! - Until a copy is complete (backfill phase `Ready`) it applies no live batch and acknowledges
//!   none; its watermarks say `ready: false`, so no peer backfills from it.
//! - Database work inside an actor runs with `ctx.wait`, never `ctx.spawn` (a spawned future
//!   holding the single writer while a waited one needs it would deadlock the actor).
//!
//! # Metrics
//! Through the `metrics` facade (the app installs a recorder): `lsync_changes_applied_total`
//! `{kind}`, `lsync_apply_seconds{kind}`, `lsync_messages_sent_total{kind}`,
//! `lsync_bytes_sent_total`, `lsync_batch_rows`, `lsync_replication_lag_seconds`,
//! `lsync_retries_total`, `lsync_retries_given_up_total`, `lsync_retry_overflow_total`,
//! `lsync_retry_queue`, `lsync_rejected_rows_total{kind}`, `lsync_skewed_changes_total`,
//! `lsync_peer_rtt_seconds`, `lsync_peers_online`, `lsync_peer_log_entries`,
//! `lsync_catch_up_failures_total`, `lsync_catch_up_pruned_total`, `lsync_apply_failures_total`,
//! `lsync_push_skipped_total`, `lsync_events_missed_total`, `lsync_actor_restarts_total{actor}`,
//! `lsync_inbound_dropped_total`, `lsync_backfill_rows_done`, `lsync_backfill_rows_total`,
//! `lsync_backfill_failures_total`, `lsync_resyncs_total`.

pub mod config;
pub mod core;
mod engine;
mod events;
mod library;
mod sync;

pub use events::Event;
pub use library::{
    BackfillProgress, EngineStatus, Library, LibraryError, PeerStatus, Status, SyncState,
};
pub use lsync_backfill::Phase as BackfillPhase;
pub use lsync_shared_sync::sql::Edit;
pub use lsync_state_sync::sql::RowEdit;

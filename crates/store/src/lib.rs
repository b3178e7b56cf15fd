//! The lsync library database: one SQLite file per device holding both the synced tables and
//! lsync's bookkeeping, so that a write and its change record commit in one transaction.
//!
//! # Model
//! - An app declares its synced tables as [`ModelDef`]s in a [`Registry`]: columns, ownership
//!   (device-owned or shared), references to other models by UUID, merge strategy. The registry
//!   rejects bad names and reference cycles and derives the apply order (referenced models first)
//!   and the SQL schema. The app writes no SQL for sync bookkeeping.
//! - Every synced table has a UUID primary key `id`; device-owned tables also carry `owner` and
//!   `version` (the owner's HLC time at its last write). These are the same on every device, so
//!   two converged devices hold byte-identical content in every table not prefixed `sync_`.
//! - Bookkeeping lives only in `sync_` tables, created by the migrations in `migrations/`.
//! - [`Database`] opens the file in WAL mode with one writer connection (all writes serialised,
//!   one transaction each through [`Database::write`]) and a pool of readers.
//!
//! # Invariants
//! - The file's library and device are written once at creation and never change. Its epoch is
//!   chosen at random at creation and again when [`Database::open`] finds the file restored from
//!   an old copy (its write count, `generation`, below the count kept beside it in
//!   `<file>-generation`); the restore then stays pending ([`restore_pending`]) until the sync
//!   engine scheduled a full resync.
//! - A table whose columns differ from the registry is refused at open, never silently altered.
//! - The persisted clock ([`store_clock`]) only grows.
//! - A write cancelled at any point (its future dropped) commits nothing and never leaves the
//!   writer connection inside a transaction: the next write, and `close`, first roll back what a
//!   cancelled `BEGIN` left open. [`Database::hold_writes`] lets whoever stops the writers wait
//!   for the write in progress instead of cancelling it.
//!
//! # What this crate does not do
//! It knows no merge rules, logs or watermarks: `state-sync`, `shared-sync`, `peer-log` and
//! `watermark` own the queries on their tables (which tables belong to whom is written in
//! `migrations/0001_sync_tables.sql`; later migrations add indexes). It knows nothing of the
//! network or of actors.
//!
//! # Where the IO is
//! Everything here is async SQL through sqlx, except [`Registry`], which is plain data.

mod db;
mod dump;
mod reference;
mod registry;
pub mod sql;

pub use db::{
    Database, Durability, Identity, Restored, StoreOptions, WritesHeld, adopt_incarnation,
    clear_restore_pending, generation, incarnation_end, load_clock, own_origins, restore_pending,
    store_clock,
};
pub use dump::dump_tables;
pub use reference::{ENTRY_KIND_DIRECTORY, ENTRY_KIND_FILE, reference_models, reference_registry};
pub use registry::{Column, ColumnType, MergeStrategy, ModelDef, Ownership, Registry, SchemaError};
pub use sqlx::SqliteConnection;

use std::path::PathBuf;

/// What can go wrong with the library database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite or sqlx failed.
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// The file does not exist.
    #[error("no library at {0}")]
    NotFound(PathBuf),
    /// The file already holds a library.
    #[error("{0} already holds a library")]
    AlreadyExists(PathBuf),
    /// The file was written by a newer lsync.
    #[error(
        "the library was written by a newer lsync (schema {found}, this version knows up to {supported})"
    )]
    TooNew {
        /// The file's schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// A table's columns differ from the registry.
    #[error("table {table} has columns {found:?}, the registry declares {expected:?}")]
    SchemaMismatch {
        /// The table.
        table: String,
        /// Columns the registry declares.
        expected: Vec<String>,
        /// Columns the file has.
        found: Vec<String>,
    },
    /// The database was closed.
    #[error("the library database is closed")]
    Closed,
    /// Stored bookkeeping is not what lsync wrote.
    #[error("corrupt library: {0}")]
    Corrupt(String),
    /// A value cannot be stored (e.g. an HLC time beyond the year 6429).
    #[error("out of range: {0}")]
    OutOfRange(String),
}

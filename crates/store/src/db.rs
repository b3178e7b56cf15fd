//! The library database: one SQLite file per device, opened in WAL mode, with one writer
//! connection and a small pool of readers.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lsync_hlc::{DeviceId, Hlc};
use lsync_protocol::{Epoch, LibraryId};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous, SqliteTransactionManager,
};
use sqlx::{Connection, Row, TransactionManager};
use tokio::sync::{Mutex, MutexGuard};
use uuid::Uuid;

use crate::{Registry, StoreError};

/// The schema migrations of lsync's own `sync_` tables, applied in order, each in one transaction.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "sync tables", include_str!("../migrations/0001_sync_tables.sql")),
    (
        2,
        "shared references by record",
        include_str!("../migrations/0002_shared_refs_by_record.sql"),
    ),
    (3, "collected tombstones", include_str!("../migrations/0003_collected_tombstones.sql")),
    (4, "incarnations", include_str!("../migrations/0004_incarnations.sql")),
];

/// How hard SQLite works to keep a committed transaction across a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is on disk before it returns; survives power loss.
    #[default]
    Full,
    /// `synchronous=NORMAL`: commits survive a crash of the process but the last ones may be lost
    /// on power loss or an OS crash. Faster for many small transactions.
    Normal,
}

/// Settings of the library database.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Default [`Durability::Full`]: a write the library accepted must survive.
    pub durability: Durability,
    /// How long a statement waits for another process's lock before failing. Default 5 s: long
    /// enough for a large batch of another process (a CLI command) to commit.
    pub busy_timeout: Duration,
    /// Reader connections. Default 4: readers never block the writer in WAL mode, and sync serves
    /// at most a few concurrent page requests per peer.
    pub readers: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { durability: Durability::Full, busy_timeout: Duration::from_secs(5), readers: 4 }
    }
}

/// Who this copy of the library is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The library.
    pub library: LibraryId,
    /// This device.
    pub device: DeviceId,
    /// This copy's epoch: chosen at random when the file was created.
    pub epoch: Epoch,
    /// The origin this device numbers its shared changes under until the library is closed: a
    /// new random id at every open (an *incarnation*), recorded in `sync_incarnations`. A file
    /// restored from a backup cannot know which numbers its lost changes had taken; under a
    /// new origin it never reuses one, whatever it knows.
    pub origin: DeviceId,
}

/// What [`Database::open`] found when the file was older than the device's last write: it was
/// restored from an old copy (a backup, a snapshot, a copy of the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The epoch the old copy carried (the device now announces a new one).
    pub old_epoch: Epoch,
    /// Write transactions the restored file had committed.
    pub file_generation: u64,
    /// Write transactions the device had committed before the file was replaced.
    pub last_generation: u64,
}

/// An open library database.
///
/// All writes go through one connection, one transaction at a time ([`Database::write`]), so
/// writes never contend inside the process; reads use a separate pool and see committed data.
///
/// # Restored copies
/// Every write transaction that changes something also counts itself (`generation` in
/// `sync_meta`), and after the commit the count is copied to a small file beside the database
/// (`<file>-generation`). A
/// library file restored from an old copy has a smaller count than that file remembers:
/// [`Database::open`] then gives the copy a new epoch and records a pending restore
/// ([`restore_pending`]) for the sync engine, which must fetch back what the copy lost before
/// the device numbers new changes. (Restoring the two files together hides the restore; a copy
/// of only the database, the usual restore, is caught.)
#[derive(Debug)]
pub struct Database {
    /// `None` once closed.
    writer: Mutex<Option<SqliteConnection>>,
    readers: SqlitePool,
    registry: Arc<Registry>,
    identity: Identity,
    path: PathBuf,
    generation: std::sync::Mutex<Option<std::fs::File>>,
    restored: Option<Restored>,
}

impl Database {
    /// Creates the library file at `path` for a new device of `library`, with the tables of
    /// `registry`. Refuses if the file already holds a library.
    pub async fn create(
        path: &Path,
        registry: Arc<Registry>,
        library: LibraryId,
        device: DeviceId,
        options: &StoreOptions,
    ) -> Result<Self, StoreError> {
        let mut writer = connect(path, options, true).await?;
        migrate(&mut writer).await?;
        if read_meta(&mut writer, "library").await?.is_some() {
            return Err(StoreError::AlreadyExists(path.to_owned()));
        }
        // A random epoch: a device re-created under the same identity, or restored from an old
        // copy of this file, announces an epoch its peers have not seen with its current state.
        let epoch = Epoch(Uuid::new_v4().as_u64_pair().0);
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
        write_meta(&mut tx, "library", library.0.as_bytes()).await?;
        write_meta(&mut tx, "device", device.as_bytes()).await?;
        write_meta(&mut tx, "epoch", &epoch.0.to_be_bytes()).await?;
        sqlx::raw_sql(&registry.ddl()).execute(&mut *tx).await?;
        tx.commit().await?;
        // A generation file left by an earlier library at this path says nothing of this one.
        let generation = open_generation_file(path, Some(0));
        Self::finish_open(path, writer, registry, options, generation, None).await
    }

    /// Opens an existing library file, applying pending migrations and creating tables of models
    /// added to `registry`. Refuses a missing file and tables whose columns differ from the
    /// registry.
    pub async fn open(
        path: &Path,
        registry: Arc<Registry>,
        options: &StoreOptions,
    ) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::NotFound(path.to_owned()));
        }
        let mut writer = connect(path, options, false).await?;
        migrate(&mut writer).await?;
        sqlx::raw_sql(&registry.ddl()).execute(&mut writer).await?;
        let mut generation = open_generation_file(path, None);
        let restored = match generation.as_mut().and_then(read_generation_file) {
            Some(last) => detect_restore(&mut writer, path, last).await?,
            None => None,
        };
        if let Some(file) = generation.as_mut() {
            // Remember the file's own count from now on: the restore is recorded in the file.
            write_generation_file(file, read_generation(&mut writer).await?);
        }
        Self::finish_open(path, writer, registry, options, generation, restored).await
    }

    async fn finish_open(
        path: &Path,
        mut writer: SqliteConnection,
        registry: Arc<Registry>,
        options: &StoreOptions,
        generation: Option<std::fs::File>,
        restored: Option<Restored>,
    ) -> Result<Self, StoreError> {
        check_tables(&mut writer, &registry).await?;
        let mut identity = read_identity(&mut writer, path).await?;
        identity.origin = DeviceId(Uuid::new_v4());
        let opened_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX));
        // The previous incarnation ended with the file's write count as it is now.
        let writes = read_generation(&mut writer).await?;
        sqlx::query(
            "UPDATE sync_incarnations SET last_generation = ?1 WHERE last_generation IS NULL",
        )
        .bind(writes.cast_signed())
        .execute(&mut writer)
        .await?;
        sqlx::query("INSERT INTO sync_incarnations (origin, opened_at) VALUES (?1, ?2)")
            .bind(identity.origin.as_bytes().as_slice())
            .bind(opened_at)
            .execute(&mut writer)
            .await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(options.readers.max(1))
            .connect_with(connect_options(path, options, false).read_only(true))
            .await?;
        Ok(Self {
            writer: Mutex::new(Some(writer)),
            readers,
            registry,
            identity,
            path: path.to_owned(),
            generation: std::sync::Mutex::new(generation),
            restored,
        })
    }

    /// Whether [`Database::open`] found the file restored from an old copy (and gave it a new
    /// epoch). See [`restore_pending`] for what the sync engine must do about it.
    pub fn restored(&self) -> Option<Restored> {
        self.restored
    }

    /// Runs `work` in one write transaction: committed if it returns `Ok`, rolled back otherwise.
    /// Writes are serialised: a second caller waits for the first transaction to finish.
    pub async fn write<T, E>(
        &self,
        work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let mut writer = self.writer.lock().await;
        let writer = writer.as_mut().ok_or(StoreError::Closed).map_err(E::from)?;
        end_abandoned_transaction(writer).await.map_err(E::from)?;
        // IMMEDIATE takes the write lock up front, so a transaction that reads then writes cannot
        // fail half-way on another process's lock.
        let mut tx =
            writer.begin_with("BEGIN IMMEDIATE").await.map_err(|error| E::from(error.into()))?;
        let changes_before = total_changes(&mut tx).await.map_err(E::from)?;
        match work(&mut tx).await {
            Ok(value) => {
                // Only a transaction that changed something counts (and costs a sync to disk):
                // many "writes" only read a consistent view under the write lock.
                let changed = total_changes(&mut tx).await.map_err(E::from)? != changes_before;
                let generation = if changed {
                    Some(bump_generation(&mut tx).await.map_err(E::from)?)
                } else {
                    None
                };
                tx.commit().await.map_err(|error| E::from(error.into()))?;
                if let Some(generation) = generation {
                    self.remember_generation(generation);
                }
                Ok(value)
            }
            Err(error) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::error!(%rollback, "rolling back a failed write transaction failed");
                }
                Err(error)
            }
        }
    }

    /// Copies a committed generation to the file beside the database. Best effort: a count
    /// that lags behind the database only makes a restore to a very recent copy go unnoticed;
    /// it is never ahead of a committed count.
    fn remember_generation(&self, generation: u64) {
        let mut file = self.generation.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(file) = file.as_mut() {
            write_generation_file(file, generation);
        }
    }

    /// Waits for the write in progress to finish and holds back every later one until the
    /// returned guard is dropped. For stopping whatever issues writes (the engine's actors)
    /// without cancelling one half-way: a write waiting here has not begun, so dropping it
    /// loses nothing that was committed and leaves no transaction behind.
    pub async fn hold_writes(&self) -> WritesHeld<'_> {
        WritesHeld { _writer: self.writer.lock().await }
    }

    /// Runs `work` in one read transaction on a reader connection: a consistent snapshot that
    /// neither waits for nor blocks the writer (WAL). For serving peers and other reads that
    /// span several statements.
    pub async fn read<T, E>(
        &self,
        work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let mut tx = self.readers.begin().await.map_err(|error| E::from(error.into()))?;
        let result = work(&mut tx).await;
        // Nothing to keep: ending the snapshot either way releases it.
        if let Err(error) = tx.rollback().await {
            tracing::warn!(%error, "ending a read transaction failed");
        }
        result
    }

    /// The reader pool, for queries outside write transactions.
    pub fn reader(&self) -> &SqlitePool {
        &self.readers
    }

    /// The model registry the database was opened with.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Library, device and epoch of this copy.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops the connections as a crash would: no checkpoint, and a transaction still open is
    /// rolled back by SQLite (the next open recovers from the WAL). Later writes fail with
    /// [`StoreError::Closed`]. For crash tests and simulations.
    pub async fn abandon(&self) {
        let mut writer = self.writer.lock().await;
        self.readers.close().await;
        drop(writer.take());
    }

    /// Closes all connections, waiting for the write in progress and then for them; the WAL is
    /// checkpointed into the main file. Later writes and reads fail ([`StoreError::Closed`] for
    /// writes); closing again does nothing. Takes `&self` so that a database shared with other
    /// holders (an `Arc`) is still closed when its owner says so, not when the last holder
    /// lets go.
    pub async fn close(&self) -> Result<(), StoreError> {
        let mut writer = self.writer.lock().await;
        self.readers.close().await;
        let Some(mut writer) = writer.take() else {
            return Ok(());
        };
        end_abandoned_transaction(&mut writer).await?;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut writer).await?;
        writer.close().await?;
        Ok(())
    }
}

/// Whether this copy was restored from an old copy and the sync engine has not yet fetched back
/// what it lost: returns the epoch it had before. While a restore is pending, this device's own
/// numbering of shared changes may lag behind what its peers already hold from it, so it must
/// not number new shared changes until it fetched them back (a full resync). Cleared by
/// [`clear_restore_pending`] in the transaction that schedules that resync.
pub async fn restore_pending(conn: &mut SqliteConnection) -> Result<Option<Epoch>, StoreError> {
    match read_meta(conn, "restored_from").await? {
        Some(bytes) => {
            let bytes: [u8; 8] = bytes
                .try_into()
                .map_err(|_| StoreError::Corrupt("sync_meta restored_from".into()))?;
            Ok(Some(Epoch(u64::from_be_bytes(bytes))))
        }
        None => Ok(None),
    }
}

/// Clears the pending restore; see [`restore_pending`].
pub async fn clear_restore_pending(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM sync_meta WHERE key = 'restored_from'").execute(conn).await?;
    Ok(())
}

/// Compares the file's generation with `last`, the generation the device last committed (from
/// the file beside it); on a restore gives the copy a new epoch and records the restore.
async fn detect_restore(
    writer: &mut SqliteConnection,
    path: &Path,
    last: u64,
) -> Result<Option<Restored>, StoreError> {
    let file_generation = read_generation(writer).await?;
    if file_generation >= last {
        return Ok(None);
    }
    let old_epoch = read_identity(writer, path).await?.epoch;
    let epoch = Epoch(Uuid::new_v4().as_u64_pair().0);
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    write_meta(&mut tx, "epoch", &epoch.0.to_be_bytes()).await?;
    // Kept until the engine scheduled the resync (a second restore before that keeps the
    // first old epoch: either way the peers see a new one).
    if restore_pending(&mut tx).await?.is_none() {
        write_meta(&mut tx, "restored_from", &old_epoch.0.to_be_bytes()).await?;
    }
    tx.commit().await?;
    tracing::warn!(
        file = %path.display(),
        file_generation,
        last_generation = last,
        "the library file is older than this device's last write: it was restored from an old copy; it takes a new epoch and resyncs"
    );
    Ok(Some(Restored { old_epoch, file_generation, last_generation: last }))
}

async fn read_generation(conn: &mut SqliteConnection) -> Result<u64, StoreError> {
    let generation: Option<i64> =
        sqlx::query_scalar("SELECT value FROM sync_meta WHERE key = 'generation'")
            .fetch_optional(conn)
            .await?;
    Ok(generation.map_or(0, i64::cast_unsigned))
}

/// Rows inserted, updated or deleted on this connection since it was opened.
async fn total_changes(conn: &mut SqliteConnection) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT total_changes()").fetch_one(conn).await?)
}

async fn bump_generation(conn: &mut SqliteConnection) -> Result<u64, StoreError> {
    // An integer in the BLOB column (SQLite keeps the value's own type), so it adds in place.
    let generation: i64 = sqlx::query_scalar(
        "INSERT INTO sync_meta (key, value) VALUES ('generation', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1
         RETURNING value",
    )
    .fetch_one(conn)
    .await?;
    Ok(generation.cast_unsigned())
}

/// The file beside the database that remembers the last committed generation.
fn generation_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-generation");
    PathBuf::from(name)
}

/// Opens (creating it if needed) the generation file, writing `reset` into it if given. `None`
/// when it cannot be opened: restores then go unnoticed, which is logged, and nothing else
/// changes.
fn open_generation_file(path: &Path, reset: Option<u64>) -> Option<std::fs::File> {
    let at = generation_path(path);
    match std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&at)
    {
        Ok(mut file) => {
            if let Some(generation) = reset {
                write_generation_file(&mut file, generation);
            }
            Some(file)
        }
        Err(error) => {
            tracing::warn!(file = %at.display(), %error, "cannot open the generation file: a restore from an old copy would go unnoticed");
            None
        }
    }
}

/// The generation the file holds; `None` when it is empty or unreadable (nothing to compare).
fn read_generation_file(file: &mut std::fs::File) -> Option<u64> {
    let mut bytes = [0; 8];
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_exact(&mut bytes).ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn write_generation_file(file: &mut std::fs::File, generation: u64) {
    let result =
        file.seek(SeekFrom::Start(0)).and_then(|_| file.write_all(&generation.to_be_bytes()));
    if let Err(error) = result {
        tracing::warn!(%error, "cannot record the write generation beside the library");
    }
}

/// Holds back writes while alive; see [`Database::hold_writes`].
#[derive(Debug)]
#[must_use = "writes resume as soon as the guard is dropped"]
pub struct WritesHeld<'a> {
    _writer: MutexGuard<'a, Option<SqliteConnection>>,
}

/// Rolls back a transaction that a cancelled write left open on the writer connection.
///
/// sqlx 0.8 cannot always clean up after a cancelled `begin_with`: if the future is dropped
/// after SQLite ran `BEGIN IMMEDIATE` but before sqlx built its `Transaction`, the connection
/// stays inside a transaction nobody owns. Every later `BEGIN` would then fail, and so would the
/// checkpoint at close (`SQLITE_LOCKED`). Such a transaction has not run a statement of its
/// own, so rolling it back loses nothing. (A `Transaction` dropped mid-work queues its own
/// rollback, which runs before this one; this one is then a no-op.)
async fn end_abandoned_transaction(writer: &mut SqliteConnection) -> Result<(), StoreError> {
    if writer.is_in_transaction() {
        tracing::warn!("a cancelled write left its transaction open; rolling it back");
        SqliteTransactionManager::rollback(writer).await?;
    }
    Ok(())
}

/// The last HLC stamp persisted by [`store_clock`], to resume the clock after a restart.
pub async fn load_clock(conn: &mut SqliteConnection) -> Result<Option<Hlc>, StoreError> {
    match read_meta(conn, "clock").await? {
        Some(bytes) => Hlc::from_bytes(&bytes)
            .map(Some)
            .map_err(|error| StoreError::Corrupt(format!("sync_meta clock: {error}"))),
        None => Ok(None),
    }
}

/// Persists `last` as the clock's resume point, unless a larger stamp is already stored. Call it
/// in every transaction that writes stamps.
pub async fn store_clock(conn: &mut SqliteConnection, last: Hlc) -> Result<(), StoreError> {
    // The byte form sorts like the stamps, so SQLite's max() over BLOBs keeps the larger.
    sqlx::query(
        "INSERT INTO sync_meta (key, value) VALUES ('clock', ?1)
         ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
    )
    .bind(last.to_bytes().as_slice())
    .execute(conn)
    .await?;
    Ok(())
}

fn connect_options(path: &Path, options: &StoreOptions, create: bool) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match options.durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(options.busy_timeout)
        // References between synced rows are kept by lsync (parking, tombstones), not by SQLite:
        // rows arrive from several devices in no guaranteed order.
        .foreign_keys(false)
        // Each multi-row statement shape is prepared once; keep enough of them.
        .statement_cache_capacity(256)
        // Rows travel from SQLite's worker thread to the async side through a bounded channel;
        // sqlx's default of 50 makes the worker stop and be woken every 50 rows, which cost a
        // backfill page of 5,000 rows more in thread hand-offs than in SQLite. Bounded: a query
        // buffers at most this many rows ahead of its reader.
        .row_buffer_size(ROW_BUFFER_ROWS)
}

/// Rows a query's worker may produce ahead of the code reading them.
const ROW_BUFFER_ROWS: usize = 4096;

async fn connect(
    path: &Path,
    options: &StoreOptions,
    create: bool,
) -> Result<SqliteConnection, StoreError> {
    Ok(SqliteConnection::connect_with(&connect_options(path, options, create)).await?)
}

async fn migrate(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS sync_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    let applied: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM sync_migrations")
        .fetch_one(&mut *conn)
        .await?;
    let applied = applied.unwrap_or(0);
    let newest = MIGRATIONS.last().map_or(0, |(version, ..)| *version);
    if applied > newest {
        return Err(StoreError::TooNew { found: applied, supported: newest });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|(version, ..)| *version > applied) {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO sync_migrations (version, name) VALUES (?1, ?2)")
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
    }
    Ok(())
}

/// Checks that every model's table has exactly the columns the registry declares.
async fn check_tables(conn: &mut SqliteConnection, registry: &Registry) -> Result<(), StoreError> {
    for model in registry.in_apply_order() {
        let found: Vec<String> = sqlx::query(&format!("PRAGMA table_info(\"{}\")", model.name))
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>("name"))
            .collect::<Result<_, _>>()?;
        let mut expected = vec!["id".to_owned()];
        if model.ownership == crate::Ownership::DeviceOwned {
            expected.extend(["owner".to_owned(), "version".to_owned()]);
        }
        expected.extend(model.column_names());
        if found != expected {
            return Err(StoreError::SchemaMismatch { table: model.name.clone(), expected, found });
        }
    }
    Ok(())
}

async fn read_identity(conn: &mut SqliteConnection, path: &Path) -> Result<Identity, StoreError> {
    let missing = || StoreError::Corrupt(format!("{} has no library identity", path.display()));
    let uuid = |bytes: Vec<u8>, what: &str| {
        Uuid::from_slice(&bytes).map_err(|_| StoreError::Corrupt(format!("sync_meta {what}")))
    };
    let library = uuid(read_meta(conn, "library").await?.ok_or_else(missing)?, "library")?;
    let device = uuid(read_meta(conn, "device").await?.ok_or_else(missing)?, "device")?;
    let epoch = read_meta(conn, "epoch").await?.ok_or_else(missing)?;
    let epoch: [u8; 8] =
        epoch.try_into().map_err(|_| StoreError::Corrupt("sync_meta epoch".into()))?;
    Ok(Identity {
        library: LibraryId(library),
        device: DeviceId(device),
        epoch: Epoch(u64::from_be_bytes(epoch)),
        // Replaced by a new incarnation before the identity is handed out (`finish_open`).
        origin: DeviceId(device),
    })
}

/// The file's write count (`sync_meta` generation): every write transaction that changed
/// something counts itself.
pub async fn generation(conn: &mut SqliteConnection) -> Result<u64, StoreError> {
    read_generation(conn).await
}

/// What this file knows of incarnation `origin` of its device: `None`, not one of its own;
/// `Some(None)`, one still running; `Some(Some(n))`, one that ended here at write count `n`
/// (`lsync_watermark::copy_rolled_back` decides from it whether the file was rolled back).
pub async fn incarnation_end(
    conn: &mut SqliteConnection,
    origin: DeviceId,
) -> Result<Option<Option<u64>>, StoreError> {
    let known: Option<Option<i64>> =
        sqlx::query_scalar("SELECT last_generation FROM sync_incarnations WHERE origin = ?1")
            .bind(origin.as_bytes().as_slice())
            .fetch_optional(conn)
            .await?;
    Ok(known.map(|last| last.map(i64::cast_unsigned)))
}

/// Records `origin`, seen by a peer at write count `generation`, as an incarnation of this device
/// that ended there (the file had lost it): it is not taken for a rollback again.
pub async fn adopt_incarnation(
    conn: &mut SqliteConnection,
    origin: DeviceId,
    generation: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sync_incarnations (origin, opened_at, last_generation) VALUES (?1, 0, ?2)
         ON CONFLICT (origin) DO UPDATE SET last_generation = max(last_generation, excluded.last_generation)",
    )
    .bind(origin.as_bytes().as_slice())
    .bind(generation.cast_signed())
    .execute(conn)
    .await?;
    Ok(())
}

/// Every origin this file knows to be one of this device's incarnations (see
/// [`Identity::origin`]), the current one included.
pub async fn own_origins(conn: &mut SqliteConnection) -> Result<Vec<DeviceId>, StoreError> {
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT origin FROM sync_incarnations").fetch_all(conn).await?;
    rows.iter()
        .map(|bytes| {
            Uuid::from_slice(bytes)
                .map(DeviceId)
                .map_err(|_| StoreError::Corrupt("sync_incarnations origin".into()))
        })
        .collect()
}

async fn read_meta(conn: &mut SqliteConnection, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(sqlx::query_scalar("SELECT value FROM sync_meta WHERE key = ?1")
        .bind(key)
        .fetch_optional(conn)
        .await?)
}

async fn write_meta(
    conn: &mut SqliteConnection,
    key: &str,
    value: &[u8],
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sync_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(key)
    .bind(value)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    async fn create(dir: &tempfile::TempDir) -> Database {
        Database::create(
            &dir.path().join("library.db"),
            Arc::new(crate::reference_registry().unwrap()),
            LibraryId(Uuid::from_bytes([1; 16])),
            DeviceId::from_bytes([2; 16]),
            &StoreOptions::default(),
        )
        .await
        .unwrap()
    }

    async fn put(db: &Database, key: &str) -> Result<(), StoreError> {
        db.write(async |conn| write_meta(conn, key, b"v").await).await
    }

    async fn stored(db: &Database, key: &str) -> bool {
        let mut conn = db.reader().acquire().await.unwrap();
        read_meta(&mut conn, key).await.unwrap().is_some()
    }

    #[tokio::test]
    async fn a_transaction_left_open_by_a_cancelled_write_is_rolled_back_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = create(&dir).await;
        // The state a `begin_with` cancelled between SQLite's BEGIN and sqlx's `Transaction`
        // leaves behind: a transaction on the writer that nothing owns.
        SqliteTransactionManager::begin(
            db.writer.lock().await.as_mut().unwrap(),
            Some("BEGIN IMMEDIATE".into()),
        )
        .await
        .unwrap();
        put(&db, "after").await.unwrap();
        assert!(stored(&db, "after").await, "the next write committed");
        db.close().await.unwrap();
    }

    #[tokio::test]
    async fn close_rolls_back_a_transaction_left_open_and_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let db = create(&dir).await;
        put(&db, "before").await.unwrap();
        SqliteTransactionManager::begin(
            db.writer.lock().await.as_mut().unwrap(),
            Some("BEGIN IMMEDIATE".into()),
        )
        .await
        .unwrap();
        db.close().await.unwrap();
        let wal = dir.path().join("library.db-wal");
        assert_eq!(std::fs::metadata(&wal).map_or(0, |meta| meta.len()), 0, "WAL checkpointed");
        let db = Database::open(
            &dir.path().join("library.db"),
            Arc::new(crate::reference_registry().unwrap()),
            &StoreOptions::default(),
        )
        .await
        .unwrap();
        assert!(stored(&db, "before").await);
        db.close().await.unwrap();
    }

    #[tokio::test]
    async fn writes_cancelled_at_any_point_leave_the_writer_usable() {
        let dir = tempfile::tempdir().unwrap();
        let db = create(&dir).await;
        let mut cx = Context::from_waker(Waker::noop());
        for polls in 0..64 {
            let key = format!("cancelled-{polls}");
            let mut write = Box::pin(put(&db, &key));
            for _ in 0..polls {
                if write.as_mut().poll(&mut cx).is_ready() {
                    break;
                }
                // Let SQLite's worker thread move on, so the write is dropped at varied points.
                tokio::task::yield_now().await;
                std::thread::yield_now();
            }
            drop(write);
            let key = format!("after-{polls}");
            put(&db, &key).await.unwrap();
            assert!(stored(&db, &key).await, "write after {polls} polls committed");
        }
        db.close().await.unwrap();
    }

    async fn reopen(dir: &tempfile::TempDir) -> Database {
        Database::open(
            &dir.path().join("library.db"),
            Arc::new(crate::reference_registry().unwrap()),
            &StoreOptions::default(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_file_restored_from_an_old_copy_gets_a_new_epoch_and_a_pending_restore() {
        let dir = tempfile::tempdir().unwrap();
        let db = create(&dir).await;
        put(&db, "one").await.unwrap();
        let backup = dir.path().join("backup.db");
        sqlx::query("VACUUM INTO ?1")
            .bind(backup.to_str().unwrap())
            .execute(db.reader())
            .await
            .unwrap();
        put(&db, "two").await.unwrap();
        let epoch = db.identity().epoch;
        db.close().await.unwrap();

        // Reopening the file as it was restores nothing.
        let db = reopen(&dir).await;
        assert_eq!(db.restored(), None);
        assert_eq!(db.identity().epoch, epoch);
        db.close().await.unwrap();

        std::fs::copy(&backup, dir.path().join("library.db")).unwrap();
        let db = reopen(&dir).await;
        let restored = db.restored().expect("the restore is noticed");
        assert_eq!(restored.old_epoch, epoch);
        assert!(restored.file_generation < restored.last_generation);
        assert_ne!(db.identity().epoch, epoch, "a new epoch");
        assert!(!stored(&db, "two").await);
        let pending = db.write(async |conn| restore_pending(conn).await).await.unwrap();
        assert_eq!(pending, Some(epoch));
        db.write(async |conn| clear_restore_pending(conn).await).await.unwrap();
        let new_epoch = db.identity().epoch;
        db.close().await.unwrap();

        // Noticed once: the next open is an ordinary one.
        let db = reopen(&dir).await;
        assert_eq!(db.restored(), None);
        assert_eq!(db.identity().epoch, new_epoch);
        assert_eq!(db.write(async |conn| restore_pending(conn).await).await.unwrap(), None);
        db.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_library_created_where_an_old_one_was_is_not_taken_for_a_restore() {
        let dir = tempfile::tempdir().unwrap();
        let db = create(&dir).await;
        for key in ["a", "b", "c"] {
            put(&db, key).await.unwrap();
        }
        db.close().await.unwrap();
        std::fs::remove_file(dir.path().join("library.db")).unwrap();
        let db = create(&dir).await;
        db.close().await.unwrap();
        assert_eq!(reopen(&dir).await.restored(), None);
    }

    #[tokio::test]
    async fn a_shared_database_closes_when_told_and_refuses_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(create(&dir).await);
        let other = db.clone();
        put(&db, "before").await.unwrap();
        db.close().await.unwrap();
        assert!(matches!(put(&other, "after").await, Err(StoreError::Closed)));
        db.close().await.unwrap();
        let wal = dir.path().join("library.db-wal");
        assert_eq!(std::fs::metadata(&wal).map_or(0, |meta| meta.len()), 0, "WAL checkpointed");
    }

    #[tokio::test]
    async fn a_file_of_schema_one_is_migrated_and_references_are_found_by_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = create(&dir).await;
        // Back to what a file written before migration 2 holds (later migrations undone too).
        db.write(async |conn| {
            sqlx::raw_sql(
                "DROP INDEX sync_shared_refs_by_record; DROP TABLE sync_collected_state;
                 DROP TABLE sync_incarnations; ALTER TABLE sync_peers DROP COLUMN seen_origin;
                 ALTER TABLE sync_peers DROP COLUMN seen_generation;
                 DELETE FROM sync_migrations WHERE version >= 2;",
            )
            .execute(conn)
            .await
            .map_err(StoreError::from)
        })
        .await
        .unwrap();
        db.close().await.unwrap();

        let db = reopen(&dir).await;
        let (version, plan) = db
            .write(async |conn| {
                let version: i64 = sqlx::query_scalar("SELECT max(version) FROM sync_migrations")
                    .fetch_one(&mut *conn)
                    .await?;
                let plan: Vec<String> = sqlx::query(
                    "EXPLAIN QUERY PLAN
                     DELETE FROM sync_shared_refs WHERE model = 'tags' AND id IN (x'01', x'02')",
                )
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|row| row.try_get::<String, _>(3))
                .collect::<Result<_, _>>()?;
                Ok::<_, StoreError>((version, plan))
            })
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.last().map_or(0, |(version, ..)| *version));
        assert!(
            plan.iter().any(|step| step.contains("sync_shared_refs_by_record")),
            "replacing a record's references uses the index, not a scan: {plan:?}"
        );
        db.close().await.unwrap();
    }

    #[tokio::test]
    async fn only_transactions_that_change_something_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let db = create(&dir).await;
        let generation =
            async |db: &Database| db.write(async |conn| read_generation(conn).await).await.unwrap();
        let start = generation(&db).await;
        put(&db, "one").await.unwrap();
        assert_eq!(generation(&db).await, start + 1);
        for _ in 0..3 {
            db.write(async |conn| read_meta(conn, "one").await).await.unwrap();
        }
        assert_eq!(generation(&db).await, start + 1, "reads under the write lock change nothing");
        db.close().await.unwrap();
    }

    #[tokio::test]
    async fn held_writes_wait_and_then_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = create(&dir).await;
        let held = db.hold_writes().await;
        {
            let mut write = pin!(put(&db, "waited"));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(matches!(write.as_mut().poll(&mut cx), Poll::Pending), "a held write waits");
            assert!(!stored(&db, "waited").await);
            drop(held);
            write.await.unwrap();
        }
        assert!(stored(&db, "waited").await);
        db.close().await.unwrap();
    }
}

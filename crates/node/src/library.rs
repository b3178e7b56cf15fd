//! The library API: what an app calls.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lsync_backfill::{Checkpoint, Phase};
use lsync_hlc::{Clock, DeviceId, HlcGenerator, HlcTime, Resume, SystemClock};
use lsync_protocol::{LibraryId, OriginSeq, SharedChange, StateMark, StateRow, Watermarks};
use lsync_shared_sync::SharedError;
use lsync_shared_sync::sql::Edit;
use lsync_state_sync::StateError;
use lsync_state_sync::sql::RowEdit;
use lsync_store::{Database, Identity, Registry, SqliteConnection, StoreError, load_clock};
use lsync_transport::{Transport, TransportEvent};
use tokio::sync::{Mutex, mpsc};

use crate::config::SyncConfig;
use crate::events::{Event, EventBus};

/// A boxed future, for the object-safe engine interface.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the library needs from a running sync engine, whatever its transport.
pub(crate) trait Engine: Send + Sync {
    /// Local device-owned rows of `model` were committed; `since` is this device's mark for the
    /// model before the write, or `Some(HlcTime::MAX)` when the copy claimed none of its own rows
    /// (it may not serve: its mark is not backed by what it holds, see
    /// `Batcher::push_state_unclaimed`).
    fn local_state(
        &self,
        model: String,
        since: Option<HlcTime>,
        rows: Vec<StateRow>,
    ) -> BoxFuture<'_, ()>;
    /// Local shared changes were committed.
    fn local_shared(&self, changes: Vec<SharedChange>) -> BoxFuture<'_, ()>;
    /// Sync was switched on or off.
    fn set_enabled(&self, enabled: bool) -> BoxFuture<'_, ()>;
    /// The engine's view of peers and queues.
    fn status(&self) -> BoxFuture<'_, EngineStatus>;
    /// Flushes, stops the actors and the transport, and waits for them. Writes to `db` are held
    /// while the actors stop, so none is cancelled half-way.
    fn shutdown<'a>(&'a self, db: &'a Database) -> BoxFuture<'a, ()>;
    /// Stops the actors where they stand, as a crash would: nothing flushed, writes in progress
    /// dropped (their transactions roll back); then stops the transport.
    fn abort(&self) -> BoxFuture<'_, ()>;
    /// The running engine, for tests that reach into it.
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any;
}

/// What the running engine knows beyond the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStatus {
    /// Connected peers with their round-trip time in microseconds, if measured.
    pub online: Vec<(DeviceId, Option<u64>)>,
    /// Messages awaiting acknowledgement or retry.
    pub retry_queue: usize,
    /// Local rows and changes waiting in the batching window.
    pub pending_batch_rows: usize,
}

/// Counters the engine keeps for status (the same figures also go to the metrics facade).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Batches handed to the transport (each peer counted).
    pub(crate) batches_sent: std::sync::atomic::AtomicU64,
    /// Batches sent again because no acknowledgement came in time or the send failed.
    pub(crate) retries: std::sync::atomic::AtomicU64,
    /// Shared changes received with stamps beyond the drift bound (applied, clock not adopted).
    pub(crate) skewed: std::sync::atomic::AtomicU64,
}

/// Whether sync runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// No transport was given yet (networking comes up later).
    NotStarted,
    /// Switched off by configuration: local writes still go to the log.
    Disabled,
    /// Running.
    Running,
}

/// One paired device, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The device.
    pub device: DeviceId,
    /// Its name.
    pub name: String,
    /// Whether it is connected now.
    pub online: bool,
    /// When it was last connected (ms since the epoch).
    pub last_seen_ms: Option<u64>,
    /// Last measured round trip, in microseconds.
    pub rtt_us: Option<u64>,
    /// What it acknowledged of shared changes.
    pub acked_shared: Vec<OriginSeq>,
    /// What it acknowledged of device-owned rows.
    pub acked_state: Vec<StateMark>,
    /// How many of this device's own shared changes it has not acknowledged yet.
    pub lag: u64,
    /// How far its acknowledgement of this device's own rows trails this device's newest rows:
    /// milliseconds of row versions, the largest over models (0: it has every row). `None`
    /// when it acknowledged none of a model this device wrote rows of.
    pub rows_lag_ms: Option<u64>,
    /// Whether this device's retention cap left it behind (log entries pruned or tombstones
    /// collected before it had them): not counted for pruning until it caught up again.
    pub needs_resync: bool,
    /// Its wall clock minus this device's, in milliseconds, measured at the last watermark
    /// exchange (to within half a round trip); `None` until one. A device far ahead (beyond the
    /// drift bound) is named here, in the metric `lsync_peer_clock_offset_ms` and in a warning.
    pub clock_offset_ms: Option<i64>,
}

/// Everything `status` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The library.
    pub library: LibraryId,
    /// This device.
    pub device: DeviceId,
    /// Whether sync runs.
    pub sync: SyncState,
    /// This device's watermarks.
    pub watermarks: Watermarks,
    /// Paired devices.
    pub peers: Vec<PeerStatus>,
    /// Entries in the peer log.
    pub log_entries: u64,
    /// Shared records waiting for a referenced row.
    pub parked: u64,
    /// Messages awaiting acknowledgement or retry.
    pub retry_queue: usize,
    /// Local rows and changes waiting in the batching window.
    pub pending_batch_rows: usize,
    /// How far the clock runs ahead of the wall clock (ms): skew made visible.
    pub clock_lead_ms: u64,
    /// Batches handed to the transport since the library opened (each peer counted).
    pub batches_sent: u64,
    /// Batches sent again since the library opened.
    pub retries: u64,
    /// Shared changes received since the library opened whose stamps ran ahead of this device's
    /// clock by more than the drift bound: applied (nothing is lost), but this device's clock did
    /// not adopt them. Non-zero means some peer's clock is wrong.
    pub skewed_changes: u64,
    /// Whether this copy is complete, and the progress of its backfill if one runs.
    pub backfill: BackfillProgress,
}

/// A backfill's progress: phase, rows done and estimated per step, rate, ETA.
pub type BackfillProgress = lsync_backfill::Progress;

/// What can go wrong using a library.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A device-owned write was refused.
    #[error(transparent)]
    State(#[from] StateError),
    /// A shared write was refused.
    #[error(transparent)]
    Shared(#[from] SharedError),
    /// The library is closing or closed.
    #[error("the library is closed")]
    Closed,
    /// A shared write on a copy that is still backfilling (joining, or resyncing after a
    /// restore): it numbers its shared changes after what its peers hold from it, which it
    /// learns from the backfill.
    #[error(
        "this copy is still backfilling ({phase}); shared data can be written once it is ready"
    )]
    NotReady {
        /// The backfill's phase.
        phase: Phase,
    },
    /// Sync was already started.
    #[error("sync is already running")]
    AlreadyStarted,
    /// The transport belongs to another device than the library.
    #[error("the transport is device {transport}, the library is device {library}")]
    WrongDevice {
        /// The transport's device.
        transport: DeviceId,
        /// The library's device.
        library: DeviceId,
    },
}

pub(crate) struct LibraryInner {
    pub(crate) db: Database,
    pub(crate) clock: HlcGenerator<Arc<dyn Clock>>,
    pub(crate) config: SyncConfig,
    pub(crate) enabled: AtomicBool,
    pub(crate) events: EventBus,
    accepting: AtomicBool,
    pub(crate) engine: Mutex<Option<Box<dyn Engine>>>,
    /// The latest watermarks, for heartbeats (which must not wait for the database).
    pub(crate) snapshot: std::sync::Mutex<Option<Watermarks>>,
    pub(crate) counters: Counters,
    /// Whether this copy is complete (backfill `Ready`): only then are live changes applied and
    /// does the device offer itself as a backfill source.
    pub(crate) ready: AtomicBool,
    /// Whether this copy may serve a backfill ([`lsync_backfill::Checkpoint::serves`]): ready,
    /// or resyncing a copy that was. What its watermarks tell peers as `ready`.
    pub(crate) serves: AtomicBool,
    /// Backfills (and resyncs) this copy completed ([`lsync_backfill::Checkpoint::completed`]):
    /// a resync asked for before one ended is stale.
    pub(crate) backfills_completed: std::sync::atomic::AtomicU64,
    /// The backfill's latest progress, for status (`None` once ready and never backfilled in
    /// this process).
    pub(crate) backfill: std::sync::Mutex<Option<BackfillProgress>>,
    /// Backfill pages read ahead for peers backfilling from this device.
    pub(crate) read_ahead: std::sync::Mutex<HashMap<DeviceId, crate::sync::ReadAhead>>,
    /// Written for the whole of a row comparison with a peer, read for the whole of a catch-up
    /// of rows by version: a comparison runs alone. Two at once (one peer actor each) could
    /// interleave, one deleting what the other's newer view had just brought; and rows a
    /// catch-up from another peer brings in the middle of a comparison are that peer's view,
    /// which may hold a row the compared peer deleted and forgot (the comparison had passed its
    /// key, then raised the mark over the deletion; found by the deterministic mode with
    /// `--faults retention,offline`).
    pub(crate) comparing: tokio::sync::RwLock<()>,
    /// After a backfill that brought this device's own rows back from a peer
    /// (`Checkpoint::brought_back_own_rows`): the paired peers that have not yet told, without
    /// showing another rollback, what they heard of this copy. Empty: the barrier is set.
    pub(crate) barrier_pending: std::sync::Mutex<lsync_backfill::OwnRowsBarrier>,
    /// Each peer's wall clock minus this device's, measured at the last watermark exchange.
    pub(crate) clock_offsets: std::sync::Mutex<HashMap<DeviceId, i64>>,
    /// When this device last compared all rows of an (owner, model) with a peer: at most one
    /// comparison per peer, owner and model every ten heartbeat intervals.
    pub(crate) compared:
        std::sync::Mutex<HashMap<(DeviceId, DeviceId, String), std::time::Instant>>,
}

impl LibraryInner {
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        self.db.registry()
    }

    pub(crate) fn identity(&self) -> Identity {
        self.db.identity()
    }

    pub(crate) fn emit(&self, event: Event) {
        self.events.emit(event);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn serves(&self) -> bool {
        self.serves.load(Ordering::Acquire)
    }
}

/// An open library: one device's copy of the synced data, and the sync engine around it.
///
/// Writes go through [`Library::write_rows`] (device-owned data) and [`Library::write_shared`]
/// (shared data): each commits the data, its change record, the new watermark and the clock in
/// one transaction, then hands the change to the engine for broadcast. Reads go straight to the
/// database ([`Library::reader`]). Sync starts when a transport is given
/// ([`Library::start_sync`]), which may be long after opening.
#[derive(Clone)]
pub struct Library {
    pub(crate) inner: Arc<LibraryInner>,
}

impl Library {
    /// Creates a new library file at `path` for `device`, the library's first device: its copy
    /// is complete from the start (it is all there is).
    pub async fn create(
        path: &Path,
        registry: Arc<Registry>,
        library: LibraryId,
        device: DeviceId,
        config: SyncConfig,
    ) -> Result<Self, LibraryError> {
        Self::create_with(path, registry, library, device, config, Checkpoint::ready()).await
    }

    /// Creates this device's copy of an existing library at `path`: it starts empty and
    /// backfills from the first complete peer it meets (resumably, from checkpoints), then
    /// catches up and applies live changes. Also the way back for a device re-created under
    /// the same identity.
    pub async fn join(
        path: &Path,
        registry: Arc<Registry>,
        library: LibraryId,
        device: DeviceId,
        config: SyncConfig,
    ) -> Result<Self, LibraryError> {
        Self::create_with(path, registry, library, device, config, Checkpoint::uninitialized())
            .await
    }

    async fn create_with(
        path: &Path,
        registry: Arc<Registry>,
        library: LibraryId,
        device: DeviceId,
        config: SyncConfig,
        checkpoint: Checkpoint,
    ) -> Result<Self, LibraryError> {
        let db = Database::create(path, registry, library, device, &config.store_options()).await?;
        db.write(async |conn| lsync_backfill::sql::store(conn, &checkpoint).await).await?;
        Self::with_database(db, config, Arc::new(SystemClock)).await
    }

    /// Opens an existing library file.
    pub async fn open(
        path: &Path,
        registry: Arc<Registry>,
        config: SyncConfig,
    ) -> Result<Self, LibraryError> {
        Self::open_with_clock(path, registry, config, Arc::new(SystemClock)).await
    }

    /// Opens an existing library file with a given wall clock (tests and simulations).
    pub async fn open_with_clock(
        path: &Path,
        registry: Arc<Registry>,
        config: SyncConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, LibraryError> {
        let db = Database::open(path, registry, &config.store_options()).await?;
        Self::with_database(db, config, clock).await
    }

    async fn with_database(
        db: Database,
        config: SyncConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, LibraryError> {
        let (last, checkpoint) = db
            .write(async |conn| {
                let mut checkpoint = lsync_backfill::sql::load(conn).await?;
                if let Some(old_epoch) = lsync_store::restore_pending(conn).await? {
                    // The file is an old copy: peers hold changes and rows of this device that
                    // it lost. Fetch everything back (deleting what the peers no longer hold)
                    // before numbering new shared changes; the scheduled resync and the cleared
                    // flag commit together.
                    let mut backfill = lsync_backfill::Backfill::new(
                        checkpoint.clone().unwrap_or_else(Checkpoint::ready),
                    );
                    backfill.resync(lsync_backfill::Scope::Everything, true);
                    lsync_backfill::sql::store(conn, backfill.checkpoint()).await?;
                    lsync_store::clear_restore_pending(conn).await?;
                    tracing::warn!(
                        old_epoch = old_epoch.0,
                        "this copy was restored from an old file: resyncing from a peer"
                    );
                    checkpoint = Some(backfill.checkpoint().clone());
                }
                Ok::<_, StoreError>((load_clock(conn).await?, checkpoint))
            })
            .await?;
        // No checkpoint: a copy made before backfill existed, complete by construction.
        let ready = checkpoint.as_ref().is_none_or(|checkpoint| checkpoint.phase == Phase::Ready);
        let serves = checkpoint.as_ref().is_none_or(Checkpoint::serves);
        let completed = checkpoint.as_ref().map_or(0, |checkpoint| checkpoint.completed);
        // Status shows where an unfinished backfill stands before sync starts.
        let progress = checkpoint
            .filter(|_| !ready)
            .map(|checkpoint| lsync_backfill::Backfill::new(checkpoint).progress(now_ms()));
        let resume = last.map_or(Resume::FirstStart, Resume::After);
        let generator = HlcGenerator::new(db.identity().device, clock, config.hlc_config(), resume);
        let inner = LibraryInner {
            enabled: AtomicBool::new(config.enabled),
            events: EventBus::new(config.event_capacity),
            db,
            clock: generator,
            config,
            accepting: AtomicBool::new(true),
            engine: Mutex::new(None),
            snapshot: std::sync::Mutex::new(None),
            counters: Counters::default(),
            ready: AtomicBool::new(ready),
            serves: AtomicBool::new(serves),
            backfills_completed: std::sync::atomic::AtomicU64::new(completed),
            backfill: std::sync::Mutex::new(progress),
            read_ahead: std::sync::Mutex::new(HashMap::new()),
            comparing: tokio::sync::RwLock::new(()),
            barrier_pending: std::sync::Mutex::new(lsync_backfill::OwnRowsBarrier::default()),
            clock_offsets: std::sync::Mutex::new(HashMap::new()),
            compared: std::sync::Mutex::new(HashMap::new()),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Library, device and epoch of this copy.
    pub fn identity(&self) -> Identity {
        self.inner.identity()
    }

    /// The model registry.
    pub fn registry(&self) -> &Arc<Registry> {
        self.inner.registry()
    }

    /// The configuration the library was opened with.
    pub fn config(&self) -> &SyncConfig {
        &self.inner.config
    }

    /// Readers for app queries; they see committed data.
    pub fn reader(&self) -> &sqlx::SqlitePool {
        self.inner.db.reader()
    }

    /// Writes this device's own rows of a device-owned model (one row or a million): validated,
    /// stamped and committed in one transaction, then broadcast in the next batch.
    pub async fn write_rows(
        &self,
        model: &str,
        edits: Vec<RowEdit>,
    ) -> Result<Vec<StateRow>, LibraryError> {
        self.check_open()?;
        let inner = &self.inner;
        let device = inner.identity().device;
        let registry = inner.registry().clone();
        let (since, rows) = inner
            .db
            .write(async |conn| {
                // Read first: `serves` turns true only after the resync's end committed, so a
                // write that reads it true also reads the mark the resync left.
                let claimed = inner.serves();
                let since =
                    lsync_watermark::sql::load_state_progress(conn).await?.get(device, model);
                let since = if claimed { since } else { Some(HlcTime::MAX) };
                let (rows, _) = lsync_state_sync::sql::write_local(
                    conn,
                    &registry,
                    &inner.clock,
                    model,
                    edits,
                    now_ms(),
                )
                .await?;
                Ok::<_, LibraryError>((since, rows))
            })
            .await?;
        if let Some(engine) = inner.engine.lock().await.as_ref() {
            engine.local_state(model.to_owned(), since, rows.clone()).await;
        }
        Ok(rows)
    }

    /// Writes shared data (create, update fields, delete; set add and remove): validated,
    /// stamped, numbered, logged and committed in one transaction, then broadcast in the next
    /// batch. Refused with [`LibraryError::NotReady`] while the copy backfills: until then it
    /// does not know how far its peers numbered its own changes (a device re-created under its
    /// identity or restored from an old file would reuse numbers its peers already hold, and
    /// they would drop the new changes as duplicates). Device-owned writes are accepted.
    pub async fn write_shared(&self, edits: Vec<Edit>) -> Result<Vec<SharedChange>, LibraryError> {
        self.check_open()?;
        if !self.inner.is_ready() {
            let phase = self
                .inner
                .backfill
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .map_or(Phase::Uninitialized, |progress| progress.phase);
            return Err(LibraryError::NotReady { phase });
        }
        let inner = &self.inner;
        let registry = inner.registry().clone();
        let changes = inner
            .db
            .write(async |conn| {
                let (changes, _) = lsync_shared_sync::sql::write_local(
                    conn,
                    &registry,
                    &inner.clock,
                    inner.identity().origin,
                    edits,
                    now_ms(),
                )
                .await?;
                Ok::<_, LibraryError>(changes)
            })
            .await?;
        if let Some(engine) = inner.engine.lock().await.as_ref() {
            engine.local_shared(changes.clone()).await;
        }
        Ok(changes)
    }

    /// What heartbeats carry: this device's latest watermarks, as last refreshed by the engine
    /// (after every applied batch and on an interval). Pass it to the transport's options.
    pub fn watermark_source(&self) -> lsync_transport::WatermarkSource {
        let inner = self.inner.clone();
        Arc::new(move || {
            inner.snapshot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
        })
    }

    /// Whether this copy is complete (its backfill `Ready`): only then does it accept shared
    /// writes and apply live changes. A device that joined, or one resyncing after a restore,
    /// is not until its backfill finishes, which [`Event::Backfill`] with phase `Ready` tells.
    pub fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    /// A new subscription to [`Event`]s.
    pub fn subscribe(&self) -> mpsc::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Starts sync over `transport`, whose events arrive on `events` (late start: the transport
    /// may come up long after the library opened). The transport must be this library's device.
    pub async fn start_sync<T: Transport>(
        &self,
        transport: T,
        events: mpsc::Receiver<TransportEvent>,
    ) -> Result<(), LibraryError> {
        self.check_open()?;
        let device = self.identity().device;
        if transport.local_device() != device {
            return Err(LibraryError::WrongDevice {
                transport: transport.local_device(),
                library: device,
            });
        }
        let mut engine = self.inner.engine.lock().await;
        if engine.is_some() {
            return Err(LibraryError::AlreadyStarted);
        }
        *engine = Some(crate::engine::start(self.inner.clone(), transport, events).await);
        Ok(())
    }

    /// Switches sync on or off at run time. While off, nothing is sent or applied from peers;
    /// local writes still go to the log and reach peers once sync is on again.
    pub async fn set_sync_enabled(&self, enabled: bool) {
        self.inner.enabled.store(enabled, Ordering::Release);
        if let Some(engine) = self.inner.engine.lock().await.as_ref() {
            engine.set_enabled(enabled).await;
        }
    }

    /// State, peers, watermarks, lag, log size, parked records and queues.
    pub async fn status(&self) -> Result<Status, LibraryError> {
        let inner = &self.inner;
        let identity = inner.identity();
        let engine = match inner.engine.lock().await.as_ref() {
            Some(engine) => Some(engine.status().await),
            None => None,
        };
        let enabled = inner.enabled.load(Ordering::Acquire);
        let (watermarks, own_origins, peers, acks_shared, acks_state, log_entries, parked) = inner
            .db
            .write(async |conn| {
                Ok::<_, StoreError>((
                    lsync_watermark::sql::own_watermarks(conn, identity, inner.is_ready()).await?,
                    lsync_store::own_origins(conn).await?,
                    lsync_watermark::sql::peers(conn).await?,
                    lsync_watermark::sql::load_shared_acks(conn).await?,
                    lsync_watermark::sql::load_state_acks(conn).await?,
                    lsync_peer_log::sql::len(conn).await?,
                    lsync_shared_sync::sql::parked_count(conn).await?,
                ))
            })
            .await?;
        // This device's own changes, under every incarnation this file knows.
        let own = lsync_watermark::SharedProgress::from_wire(&watermarks.shared);
        let online = engine.as_ref().map(|status| status.online.clone()).unwrap_or_default();
        let offsets =
            inner.clock_offsets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let peers = peers
            .into_iter()
            .map(|peer| {
                let shared = acks_shared.get(&peer.device).cloned().unwrap_or_default();
                let rtt = online.iter().find(|(device, _)| *device == peer.device);
                PeerStatus {
                    device: peer.device,
                    name: peer.name,
                    online: rtt.is_some(),
                    last_seen_ms: peer.last_seen,
                    rtt_us: rtt.and_then(|(_, rtt)| *rtt),
                    lag: own_origins
                        .iter()
                        .map(|origin| own.get(*origin).saturating_sub(shared.get(*origin)))
                        .sum(),
                    rows_lag_ms: rows_lag_ms(
                        &watermarks.state,
                        acks_state.get(&peer.device),
                        identity.device,
                    ),
                    acked_shared: shared.to_wire(),
                    acked_state: acks_state
                        .get(&peer.device)
                        .map(|progress| progress.to_wire())
                        .unwrap_or_default(),
                    needs_resync: peer.needs_resync,
                    clock_offset_ms: offsets.get(&peer.device).copied(),
                }
            })
            .collect();
        Ok(Status {
            library: identity.library,
            device: identity.device,
            sync: match (&engine, enabled) {
                (_, false) => SyncState::Disabled,
                (None, true) => SyncState::NotStarted,
                (Some(_), true) => SyncState::Running,
            },
            watermarks,
            peers,
            log_entries,
            parked,
            retry_queue: engine.as_ref().map_or(0, |status| status.retry_queue),
            pending_batch_rows: engine.as_ref().map_or(0, |status| status.pending_batch_rows),
            clock_lead_ms: inner.clock.lead_ms(),
            batches_sent: inner.counters.batches_sent.load(Ordering::Acquire),
            retries: inner.counters.retries.load(Ordering::Acquire),
            skewed_changes: inner.counters.skewed.load(Ordering::Acquire),
            backfill: inner
                .backfill
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| BackfillProgress::idle(inner.is_ready())),
        })
    }

    /// Runs `work` in one write transaction of the library database (for app tables and tools;
    /// synced tables must be written through `write_rows` and `write_shared`).
    pub async fn with_transaction<T>(
        &self,
        work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, StoreError>,
    ) -> Result<T, LibraryError> {
        self.check_open()?;
        Ok(self.inner.db.write(work).await?)
    }

    /// Closes the library: stops accepting writes, flushes pending batches to connected peers,
    /// stops the actors and the transport, and closes the database — awaited, not fire and
    /// forget. Every write accepted before `close` is committed.
    pub async fn close(self) -> Result<(), LibraryError> {
        self.inner.accepting.store(false, Ordering::Release);
        if let Some(engine) = self.inner.engine.lock().await.take() {
            engine.shutdown(&self.inner.db).await;
        }
        // Closed now even if another handle (a clone the app holds, a transport's watermark
        // source) is still alive: the file is complete when `close` returns, and later calls
        // through those handles fail with `Closed`.
        self.inner.db.close().await?;
        Ok(())
    }

    /// Stops as a crashing process would, for crash tests and simulations: refuses writes, stops
    /// the engine where it stands (pending batches are not flushed; writes in progress are
    /// dropped and their transactions roll back; the transport is stopped, as the process's
    /// sockets would be), and drops the database connections without
    /// a checkpoint. What was committed is in the file; reopening it is recovery, as after a
    /// crash. Prefer [`Library::close`] everywhere else.
    pub async fn abort(self) {
        self.inner.accepting.store(false, Ordering::Release);
        if let Some(engine) = self.inner.engine.lock().await.take() {
            engine.abort().await;
        }
        self.inner.db.abandon().await;
    }

    fn check_open(&self) -> Result<(), LibraryError> {
        if self.inner.accepting.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(LibraryError::Closed)
        }
    }
}

/// See [`PeerStatus::rows_lag_ms`].
fn rows_lag_ms(
    own: &[StateMark],
    acked: Option<&lsync_watermark::StateProgress>,
    device: DeviceId,
) -> Option<u64> {
    own.iter().filter(|mark| mark.owner == device).try_fold(0, |lag: u64, mark| {
        let acked = acked.and_then(|acked| acked.get(device, &mark.model))?;
        Some(lag.max(mark.version.physical_ms().saturating_sub(acked.physical_ms())))
    })
}

/// Wall-clock milliseconds for bookkeeping timestamps (log entry ages, last seen).
pub(crate) fn now_ms() -> u64 {
    SystemClock.now_ms()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn rows_lag_is_the_largest_gap_over_models_and_unknown_without_an_ack() {
        let (me, other) = (DeviceId::from_bytes([1; 16]), DeviceId::from_bytes([2; 16]));
        let mark = |owner, model: &str, ms| StateMark {
            owner,
            model: model.to_owned(),
            version: HlcTime::new(ms, 0).unwrap(),
        };
        let own = vec![
            mark(me, "entries", 10_000),
            mark(me, "locations", 5_000),
            mark(other, "entries", 99_000),
        ];
        let acked = lsync_watermark::StateProgress::from_wire(&[
            mark(me, "entries", 9_000),
            mark(me, "locations", 5_000),
        ]);
        assert_eq!(rows_lag_ms(&own, Some(&acked), me), Some(1_000));
        let caught_up = lsync_watermark::StateProgress::from_wire(&own);
        assert_eq!(rows_lag_ms(&own, Some(&caught_up), me), Some(0));
        let partial = lsync_watermark::StateProgress::from_wire(&[mark(me, "entries", 10_000)]);
        assert_eq!(rows_lag_ms(&own, Some(&partial), me), None, "locations never acknowledged");
        assert_eq!(rows_lag_ms(&own, None, me), None);
        assert_eq!(rows_lag_ms(&[], None, me), Some(0), "no rows written: nothing to lag");
    }
}

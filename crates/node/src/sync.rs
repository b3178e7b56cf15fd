//! What the actors do with the database and the transport: applying what a peer sent, serving
//! what a peer asks for, and catching up from a peer. Plain async functions over
//! [`LibraryInner`] and a [`Transport`]; the actors decide when to call them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lsync_hlc::{DeviceId, HlcTime};
use lsync_protocol::{
    Ack, BackfillRequest, ErrorCode, ErrorMessage, Message, OriginSeq, SharedBatch,
    SharedCatchUpRequest, SharedCatchUpResponse, SharedSnapshotPage, SharedSnapshotRequest,
    StateBatch, StateCatchUpRequest, StateCursor, StateMark, StatePage, Watermarks,
};
use lsync_store::{StoreError, store_clock};
use lsync_transport::{RequestError, Transport};
use lsync_watermark::{CatchUpStep, SharedProgress, StateProgress, shared_needs, state_needs};

use crate::events::Event;
use crate::library::{LibraryError, LibraryInner, now_ms};

/// This device's current watermarks, as its peers are told them ([`lsync_watermark::told`]).
/// Also refreshes the snapshot heartbeats carry.
pub(crate) async fn own_watermarks(inner: &LibraryInner) -> Result<Watermarks, StoreError> {
    let identity = inner.identity();
    let watermarks = inner
        .db
        .write(async |conn| {
            lsync_watermark::sql::own_watermarks(conn, identity, inner.serves()).await
        })
        .await?;
    // What peers are told: a copy that may not serve claims no device-owned rows.
    let watermarks = lsync_watermark::told(watermarks);
    *inner.snapshot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
        Some(watermarks.clone());
    Ok(watermarks)
}

/// Whether `theirs` shows the peer holding more of one of this device's own incarnations than
/// this device does (its file was rolled back to an old copy, with nothing to tell at open); the
/// peer's sequence for that incarnation if so. The lost shared changes come back by the ordinary
/// catch-up (they are an origin like any other, and new changes are numbered under a new
/// incarnation); what the caller resyncs for is this device's own rows written since the backup.
pub(crate) async fn own_rollback(
    inner: &LibraryInner,
    theirs: &Watermarks,
) -> Result<Option<u64>, StoreError> {
    let (mine, origins) = inner
        .db
        .read(async |conn| {
            Ok::<_, StoreError>((
                lsync_watermark::sql::load_shared_progress(conn).await?,
                lsync_store::own_origins(conn).await?,
            ))
        })
        .await?;
    Ok(theirs.shared.iter().filter(|progress| origins.contains(&progress.origin)).find_map(
        |progress| lsync_watermark::own_rollback(mine.get(progress.origin), progress.seq),
    ))
}

/// Whether the peer holds more of this device's own rows than this copy's own marks show
/// ([`lsync_watermark::own_rows_rolled_back`]): the file was rolled back and lost row writes,
/// which the peer's view of its write count may not show yet (heartbeats carry it, batches do
/// not). Only a copy that is ready: one backfilling has no complete own marks yet.
pub(crate) async fn own_rows_rolled_back(
    inner: &LibraryInner,
    theirs: &Watermarks,
) -> Result<bool, StoreError> {
    if !inner.is_ready() {
        return Ok(false);
    }
    let me = inner.identity().device;
    let own =
        inner.db.read(async |conn| lsync_watermark::sql::load_state_progress(conn).await).await?;
    Ok(lsync_watermark::own_rows_rolled_back(me, &own, &theirs.state))
}

/// Whether the peer heard more of this device's copy than its file holds (`Watermarks::seen`:
/// an incarnation the file does not know, or one that ended here with fewer writes): the file
/// was rolled back to an older copy — restored from a backup with its generation file, which
/// nothing at open can tell. Rows this device wrote since the backup are on its peers, and a
/// write since may have put its own mark above them; only a full resync gets them back. The
/// incarnation is recorded as this device's, so it is acted on once.
pub(crate) async fn copy_rolled_back(
    inner: &LibraryInner,
    theirs: &Watermarks,
) -> Result<bool, StoreError> {
    let Some(seen) = theirs.seen else { return Ok(false) };
    let current = inner.identity().origin;
    inner
        .db
        .write(async |conn| {
            let known = lsync_store::incarnation_end(conn, seen.origin).await?;
            let rolled_back = lsync_watermark::copy_rolled_back(current, seen, known);
            if rolled_back {
                lsync_store::adopt_incarnation(conn, seen.origin, seen.seq).await?;
            }
            Ok(rolled_back)
        })
        .await
}

/// The acknowledgement this device sends: everything it has applied.
pub(crate) fn ack_of(watermarks: &Watermarks) -> Ack {
    Ack { shared: watermarks.shared.clone(), state: watermarks.state.clone() }
}

/// Applies a live batch of device-owned rows from `peer`. The batch raises this device's mark
/// only if it starts at or below it (the batch's `since`), so a gap is never papered over.
/// Returns whether there was a gap (the caller catches up to close it).
pub(crate) async fn apply_state_batch(
    inner: &LibraryInner,
    peer: DeviceId,
    batch: StateBatch,
) -> Result<bool, LibraryError> {
    let registry = inner.registry().clone();
    let started = Instant::now();
    let rows = batch.rows.len();
    let versions: Vec<HlcTime> = batch.rows.iter().map(|row| row.version).collect();
    // The owner's stamps are observed like shared changes' stamps (causality: a later local
    // write is stamped after what this device has seen), within the drift bound.
    observe_rows(inner, peer, batch.owner, &versions);
    let applied = inner
        .db
        .write(async |conn| {
            let mark = lsync_watermark::sql::load_state_progress(conn)
                .await?
                .get(batch.owner, &batch.model);
            let complete = batch.since <= mark;
            tracing::trace!(%peer, owner = %batch.owner, model = %batch.model, since = ?batch.since, ?mark, rows = batch.rows.len(), complete, "state batch");
            let applied = lsync_state_sync::sql::apply_rows(
                conn,
                &registry,
                batch.owner,
                &batch.model,
                &batch.columns,
                batch.rows,
                complete,
                now_ms(),
            )
            .await?;
            if complete && let Some(newest) = applied.newest {
                let mark =
                    StateMark { owner: batch.owner, model: batch.model.clone(), version: newest };
                lsync_watermark::sql::raise_state_progress(conn, &[mark]).await?;
            }
            Ok::<_, LibraryError>((applied, !complete))
        })
        .await?;
    let (applied, gap) = applied;
    record_applied("state", rows, applied.rejected, started);
    let now = inner.clock.wall_ms();
    for version in versions {
        let lag_ms = now.saturating_sub(version.physical_ms());
        metrics::histogram!("lsync_replication_lag_seconds", "kind" => "state")
            .record(lag_ms as f64 / 1_000.0);
    }
    if applied.rejected > 0 {
        metrics::counter!("lsync_rejected_rows_total", "kind" => "state")
            .increment(applied.rejected as u64);
    }
    if !applied.upserted.is_empty() || !applied.deleted.is_empty() {
        inner.emit(Event::RowsChanged {
            from: peer,
            owner: batch.owner,
            model: batch.model,
            upserted: applied.upserted,
            deleted: applied.deleted,
        });
    }
    emit_projection(inner, peer, applied.projection);
    Ok(gap)
}

/// Observes the owner's row versions that arrived from `peer` (a live batch, a catch-up or
/// backfill page) with this device's clock. Versions beyond the drift bound are applied but not
/// adopted: they are counted as skewed, against the wall clock the library was opened with.
fn observe_rows(inner: &LibraryInner, peer: DeviceId, owner: DeviceId, versions: &[HlcTime]) {
    let Some(newest) = versions.iter().max() else { return };
    if let Err(lsync_hlc::HlcError::DriftExceeded { .. }) =
        inner.clock.update(lsync_hlc::Hlc::new(*newest, owner))
    {
        let bound = inner.clock.wall_ms().saturating_add(inner.clock.max_drift_ms());
        let skewed = versions.iter().filter(|version| version.physical_ms() > bound).count();
        count_skewed(inner, peer, skewed);
    }
}

/// Moves this device's clock past the newest version a peer holds of this device's own rows
/// (its watermarks: a request, a response, a heartbeat). A copy restored from an old file or
/// re-created, whose clock runs behind, would otherwise stamp a new edit of a row below a
/// version of that row it wrote before and lost, which peers still hold: the older edit would
/// win everywhere (the real-mode simulator saw it, `--ops 3000 --topology random`). Versions
/// beyond the drift bound are not adopted (`local_version` keeps writes after the own mark).
pub(crate) fn observe_own_marks(inner: &LibraryInner, theirs: &Watermarks) {
    let me = inner.identity().device;
    if let Some(newest) =
        theirs.state.iter().filter(|mark| mark.owner == me).map(|mark| mark.version).max()
    {
        let _ = inner.clock.update(lsync_hlc::Hlc::new(newest, me));
    }
}

/// Observes the stamps of snapshot records from `peer` (a backfill page) with this device's
/// clock, as [`observe_rows`] does for rows.
fn observe_records(inner: &LibraryInner, peer: DeviceId, records: &[lsync_protocol::SharedRecord]) {
    let stamps: Vec<lsync_hlc::Hlc> = records
        .iter()
        .filter_map(|record| lsync_shared_sync::RecordState::from_record(record).last_stamp())
        .collect();
    let Some(newest) = stamps.iter().max() else { return };
    if let Err(lsync_hlc::HlcError::DriftExceeded { .. }) = inner.clock.update(*newest) {
        let bound = inner.clock.wall_ms().saturating_add(inner.clock.max_drift_ms());
        let skewed = stamps.iter().filter(|stamp| stamp.physical_ms() > bound).count();
        count_skewed(inner, peer, skewed);
    }
}

fn count_skewed(inner: &LibraryInner, peer: DeviceId, skewed: usize) {
    if skewed == 0 {
        return;
    }
    tracing::warn!(%peer, count = skewed, "changes stamped beyond the drift bound: applied, clock not adopted");
    inner.counters.skewed.fetch_add(skewed as u64, std::sync::atomic::Ordering::AcqRel);
    metrics::counter!("lsync_skewed_changes_total").increment(skewed as u64);
}

/// Applies shared changes from `peer` (a live batch or a catch-up page).
pub(crate) async fn apply_shared_changes(
    inner: &LibraryInner,
    peer: DeviceId,
    batch: SharedBatch,
) -> Result<(), LibraryError> {
    let registry = inner.registry().clone();
    let started = Instant::now();
    let count = batch.changes.len();
    let max_parked = inner.config.max_parked;
    let received = inner
        .db
        .write(async |conn| {
            lsync_shared_sync::sql::receive(
                conn,
                &registry,
                &inner.clock,
                &batch.changes,
                max_parked,
                now_ms(),
            )
            .await
        })
        .await?;
    record_applied("shared", count, received.rejected.len(), started);
    if !received.rejected.is_empty() {
        metrics::counter!("lsync_rejected_rows_total", "kind" => "shared")
            .increment(received.rejected.len() as u64);
        for rejected in &received.rejected {
            tracing::warn!(%peer, origin = %rejected.origin, seq = rejected.seq, reason = %rejected.reason, "change not applied");
        }
    }
    count_skewed(inner, peer, received.skewed);
    let now = inner.clock.wall_ms();
    for change in &batch.changes {
        let lag_ms = now.saturating_sub(change.time.physical_ms());
        metrics::histogram!("lsync_replication_lag_seconds", "kind" => "shared")
            .record(lag_ms as f64 / 1_000.0);
    }
    emit_projection(inner, peer, received.projection);
    Ok(())
}

/// Tells subscribers which shared rows a transfer from `peer` showed or hid.
fn emit_projection(
    inner: &LibraryInner,
    peer: DeviceId,
    projection: lsync_shared_sync::sql::Projection,
) {
    if !projection.shown.is_empty() || !projection.hidden.is_empty() {
        inner.emit(Event::SharedChanged {
            from: peer,
            shown: projection.shown,
            hidden: projection.hidden,
        });
    }
}

/// Sends this device's watermarks to `peer` and returns the peer's.
pub(crate) async fn exchange_watermarks<T: Transport>(
    inner: &LibraryInner,
    transport: &T,
    peer: DeviceId,
) -> Result<Watermarks, CatchUpError> {
    let mut mine = own_watermarks(inner).await?;
    // What this device heard of the peer's copy, so that a peer rolled back to an older file
    // finds out before it answers (it would claim rows it lost).
    mine.seen =
        inner.db.read(async |conn| lsync_watermark::sql::load_seen(conn, peer).await).await?;
    let sent = inner.clock.wall_ms();
    mine.wall_ms = Some(sent);
    match transport
        .request(peer, Message::WatermarksRequest(mine), inner.config.request_timeout)
        .await?
    {
        Message::WatermarksResponse(theirs) => {
            observe_own_marks(inner, &theirs);
            if let Some(their_wall) = theirs.wall_ms {
                let received = inner.clock.wall_ms();
                note_clock_offset(inner, peer, clock_offset_ms(sent, their_wall, received));
            }
            Ok(theirs)
        }
        _ => Err(CatchUpError::Unexpected("answer to WatermarksRequest")),
    }
}

/// The responder's wall clock minus this device's, from one request: its clock read
/// `their_wall` while this device's went from `sent` to `received` (the answer was read about
/// half-way; the error is at most half the round trip).
pub(crate) fn clock_offset_ms(sent: u64, their_wall: u64, received: u64) -> i64 {
    let midpoint = sent / 2 + received / 2 + (sent % 2 + received % 2) / 2;
    i64::try_from(i128::from(their_wall) - i128::from(midpoint))
        .unwrap_or(if their_wall > midpoint { i64::MAX } else { i64::MIN })
}

/// Remembers `peer`'s clock offset for status and metrics; one beyond the drift bound is
/// named in a warning (its changes' stamps are not adopted, and an edit made here after seeing
/// them still wins: see `docs/protocol.md`, "Clocks far ahead").
fn note_clock_offset(inner: &LibraryInner, peer: DeviceId, offset_ms: i64) {
    let previous = inner
        .clock_offsets
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(peer, offset_ms);
    metrics::gauge!("lsync_peer_clock_offset_ms", "peer" => peer.to_string()).set(offset_ms as f64);
    let bound = i64::try_from(inner.clock.max_drift_ms()).unwrap_or(i64::MAX);
    let beyond = |offset: i64| offset.unsigned_abs() > bound.unsigned_abs();
    if beyond(offset_ms) && !previous.is_some_and(beyond) {
        tracing::warn!(%peer, offset_ms, max_drift_ms = bound, "the peer's clock is beyond the drift bound: its stamps are applied but not adopted; fix its clock");
        inner.emit(Event::Error {
            message: format!(
                "the clock of {peer} is {} s {} this device's, beyond the drift bound",
                offset_ms.unsigned_abs() / 1_000,
                if offset_ms > 0 { "ahead of" } else { "behind" }
            ),
        });
    }
}

fn record_applied(kind: &'static str, count: usize, rejected: usize, started: Instant) {
    metrics::counter!("lsync_changes_applied_total", "kind" => kind)
        .increment((count - rejected.min(count)) as u64);
    metrics::histogram!("lsync_apply_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
}

/// Records what `peer` acknowledged (from an `Ack` or its heartbeat watermarks).
pub(crate) async fn record_ack(
    inner: &LibraryInner,
    peer: DeviceId,
    ack: &Ack,
) -> Result<(), StoreError> {
    inner
        .db
        .write(async |conn| {
            lsync_watermark::sql::touch_peer(conn, peer, now_ms()).await?;
            lsync_watermark::sql::record_acks(conn, peer, &ack.shared, &ack.state).await
        })
        .await
}

/// A backfill page read for a peer before it asked: the page after the one just served, read
/// while that one travels and is applied, so that serving and applying overlap on both cores.
/// One per peer at most (a page of rows); dropped when the next request asks for something else
/// or the peer disconnects.
pub(crate) struct ReadAhead {
    request: BackfillRequest,
    page: tokio::task::JoinHandle<Result<KeyPage, LibraryError>>,
}

impl ReadAhead {
    /// Stops reading (the peer went away).
    pub(crate) fn abort(&self) {
        self.page.abort();
    }
}

/// One backfill page of rows in key order, and the step's estimated size on its first page.
struct KeyPage {
    columns: Vec<String>,
    rows: Vec<lsync_protocol::StateRow>,
    more: bool,
    total: u64,
    /// This device's collected mark for the (owner, model), read with the rows.
    collected: Option<HlcTime>,
}

async fn read_backfill_page(
    inner: &LibraryInner,
    request: &BackfillRequest,
) -> Result<KeyPage, LibraryError> {
    let registry = inner.registry().clone();
    let BackfillRequest { owner, model, after, limit } = request;
    inner
        .db
        .read(async |conn| {
            let (columns, rows, more) =
                lsync_state_sync::sql::rows_by_key(conn, &registry, *owner, model, *after, *limit)
                    .await?;
            // Counting is a scan: estimate on a step's first page only.
            let total = match after {
                None => lsync_state_sync::sql::count_rows(conn, &registry, *owner, model).await?,
                Some(_) => 0,
            };
            let collected = lsync_watermark::sql::load_collected(conn).await?.get(*owner, model);
            Ok::<_, LibraryError>(KeyPage { columns, rows, more, total, collected })
        })
        .await
}

/// Starts reading the page `next` asks for, for `peer`'s next request.
fn read_ahead(inner: &Arc<LibraryInner>, peer: DeviceId, next: BackfillRequest) {
    let task = {
        let (inner, next) = (inner.clone(), next.clone());
        actix::spawn(async move { read_backfill_page(&inner, &next).await })
    };
    let replaced = inner
        .read_ahead
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(peer, ReadAhead { request: next, page: task });
    if let Some(replaced) = replaced {
        replaced.abort();
    }
}

/// An answer to a request from a peer.
pub(crate) struct Served {
    /// What to send back.
    pub(crate) response: Message,
    /// The request told this device that its file was rolled back to an older copy (a watermark
    /// request whose `seen` this file does not hold): the caller starts the full resync. The
    /// answer already claims none of this device's rows.
    pub(crate) rolled_back: bool,
}

/// Answers a request from a peer: watermarks, catch-up pages, backfill pages.
pub(crate) async fn serve(inner: &Arc<LibraryInner>, peer: DeviceId, request: Message) -> Served {
    let mut rolled_back = false;
    let response = match serve_inner(inner, peer, request, &mut rolled_back).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(%error, "failed to serve a request");
            Message::Error(ErrorMessage {
                code: ErrorCode::Internal,
                message: error.to_string().chars().take(500).collect(),
            })
        }
    };
    Served { response, rolled_back }
}

async fn serve_inner(
    inner: &Arc<LibraryInner>,
    peer: DeviceId,
    request: Message,
    rolled_back: &mut bool,
) -> Result<Message, LibraryError> {
    tracing::trace!(request = request.name(), "serving");
    if matches!(request, Message::StateCatchUpRequest(_) | Message::BackfillRequest(_))
        && let Some(refusal) = lsync_watermark::refuse_rows(inner.serves())
    {
        return Ok(Message::Error(refusal));
    }
    let registry = inner.registry().clone();
    Ok(match request {
        Message::WatermarksRequest(theirs) => {
            // A peer asking for watermarks is planning (or rebasing) a backfill or catching up:
            // every page it asks for next must be read after the marks it gets now. A page read
            // ahead before would lack rows those marks cover, and the peer would raise its mark
            // over them without them (the simulator found it: a joiner rebased under lossy
            // links was served the page it had been read ahead before the rebase).
            if let Some(stale) = inner
                .read_ahead
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&peer)
            {
                stale.abort();
            }
            // Never `resync: true`: a peer that fell behind this device's retention finds out
            // from these watermarks (`collected`: it compares rows) and from a catch-up's
            // `pruned` (it fetches a snapshot of the shared records). A full resync asked here
            // ran again on every later catch-up when another peer had served it, and a
            // shared-only backfill could pass for it (issue 16, failure 3).
            // What this device heard of the requester's own copy before, told back to it: a
            // copy rolled back to an old file learns it here (`copy_rolled_back`).
            let seen = inner
                .db
                .write(async |conn| {
                    lsync_watermark::sql::record_seen(conn, peer, theirs.incarnation, true).await
                })
                .await?;
            observe_own_marks(inner, &theirs);
            // The requester heard more of this copy than its file holds: found out here, before
            // answering with claims on rows the file lost.
            if copy_rolled_back(inner, &theirs).await? {
                own_rows_unconfirmed(inner);
                tracing::error!(%peer, seen = ?theirs.seen, "this copy was rolled back to an older file (told by a peer's request): resyncing fully");
                metrics::counter!("lsync_rollbacks_detected_total").increment(1);
                *rolled_back = true;
                // Claims nothing from now on; the resync this starts keeps it so until it ends.
                inner.serves.store(false, std::sync::atomic::Ordering::Release);
            }
            Message::WatermarksResponse(Watermarks {
                seen,
                wall_ms: Some(inner.clock.wall_ms()),
                ..own_watermarks(inner).await?
            })
        }
        Message::SharedCatchUpRequest(SharedCatchUpRequest { after, limit }) => {
            let after = SharedProgress::from_wire(&after);
            let answer = inner
                .db
                .read(async |conn| {
                    let own = lsync_watermark::sql::load_shared_progress(conn).await?;
                    lsync_peer_log::sql::changes_after(conn, &after, &own, limit as usize).await
                })
                .await?;
            Message::SharedCatchUpResponse(SharedCatchUpResponse {
                changes: answer.changes,
                complete: answer.complete,
                pruned: answer.pruned,
            })
        }
        Message::StateCatchUpRequest(StateCatchUpRequest { owner, model, since, after, limit }) => {
            // The collected mark and the rows are read in one transaction: a tombstone collected
            // in between would be missing from the page without the refusal saying so.
            let answer = inner
                .db
                .read(async |conn| {
                    let collected = lsync_watermark::sql::load_collected(conn).await?;
                    if let Some(refusal) =
                        lsync_watermark::refuse_rows_since(collected.get(owner, &model), since)
                    {
                        return Ok::<_, LibraryError>(Err(refusal));
                    }
                    Ok(Ok(lsync_state_sync::sql::rows_since(
                        conn, &registry, owner, &model, since, after, limit,
                    )
                    .await?))
                })
                .await?;
            match answer {
                Ok((columns, rows, more)) => Message::StatePage(StatePage {
                    owner,
                    model,
                    columns,
                    rows,
                    more,
                    estimated_total: 0,
                    // Not above `since` (refused otherwise), so it adds nothing to the request.
                    collected: None,
                }),
                Err(refusal) => {
                    tracing::debug!(%peer, %owner, %model, "a catch-up from below deletions this copy forgot: refused, the peer compares");
                    Message::Error(refusal)
                }
            }
        }
        Message::BackfillRequest(request) => {
            let ahead = inner
                .read_ahead
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&peer);
            let page = match ahead {
                Some(ahead) if ahead.request == request => match ahead.page.await {
                    Ok(page) => page?,
                    // Aborted or failed as a task: read it now.
                    Err(_) => read_backfill_page(inner, &request).await?,
                },
                other => {
                    if let Some(stale) = other {
                        stale.page.abort();
                    }
                    read_backfill_page(inner, &request).await?
                }
            };
            if page.more
                && let Some(last) = page.rows.last()
            {
                read_ahead(
                    inner,
                    peer,
                    BackfillRequest { after: Some(last.id), ..request.clone() },
                );
            }
            Message::StatePage(StatePage {
                owner: request.owner,
                model: request.model,
                columns: page.columns,
                rows: page.rows,
                more: page.more,
                estimated_total: page.total,
                collected: page.collected,
            })
        }
        Message::SharedSnapshotRequest(SharedSnapshotRequest { model, after, limit }) => {
            let (records, more) = inner
                .db
                .read(async |conn| {
                    lsync_shared_sync::sql::snapshot_page(conn, &model, after, limit).await
                })
                .await?;
            Message::SharedSnapshotPage(SharedSnapshotPage {
                model,
                records,
                more,
                estimated_total: 0,
            })
        }
        other => Message::Error(ErrorMessage {
            code: ErrorCode::Unsupported,
            message: format!("{} is not a request this device answers", other.name()),
        }),
    })
}

/// Why a catch-up stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CatchUpError {
    /// The local side failed.
    #[error(transparent)]
    Local(#[from] LibraryError),
    /// The request failed (timeout, disconnect, refusal).
    #[error("request to the peer failed: {0}")]
    Request(#[from] RequestError),
    /// The peer answered something else.
    #[error("unexpected answer {0}")]
    Unexpected(&'static str),
    /// The peer answered with an error.
    #[error("the peer refused: {0}")]
    Refused(String),
}

impl From<StoreError> for CatchUpError {
    fn from(error: StoreError) -> Self {
        CatchUpError::Local(error.into())
    }
}

/// Pulls from `peer` everything it holds that this device lacks, given the peer's watermarks:
/// device-owned rows per (owner, model) newer than this device's mark, then shared changes per
/// origin after this device's watermark, in pages, each page one transaction. Returns whether
/// anything was pulled, and whether the peer pruned changes this device lacks (which only a
/// snapshot of the shared records can make up for).
pub(crate) async fn catch_up<T: Transport>(
    inner: &LibraryInner,
    transport: &T,
    peer: DeviceId,
    theirs: &Watermarks,
) -> Result<CatchUpOutcome, CatchUpError> {
    let timeout = inner.config.request_timeout;
    let limit = inner.config.page_rows;
    let mut pulled = false;
    let mut pruned_away = false;

    // The order and the kind of each step are `watermark::catch_up_plan`'s: rows first (shared
    // records refer to rows), comparisons where the peer forgot deletions, then shared changes.
    let (mine_shared, mine_state) = (load_shared(inner).await?, load_state(inner).await?);
    for step in lsync_watermark::catch_up_plan(&mine_shared, &mine_state, theirs) {
        match step {
            CatchUpStep::Compare { owner, model, target, forgotten } => {
                // A comparison reads all of the owner's rows on both sides: at most one per
                // peer, owner and model every ten heartbeat intervals, so a peer whose retention
                // keeps forgetting deletions (a tiny `tombstone_retention`) cannot make this
                // device compare on every heartbeat. Meanwhile nothing of it is pulled from that
                // peer (a catch-up by version would raise the mark over forgotten deletions).
                let key = (peer, owner, model.clone());
                let pause = inner.config.heartbeat_interval.saturating_mul(10);
                let recent = inner
                    .compared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&key)
                    .is_some_and(|at| at.elapsed() < pause);
                if recent {
                    tracing::debug!(%peer, %owner, %model, "a comparison with the peer ran recently; the next one waits");
                    continue;
                }
                pulled |=
                    compare_rows(inner, transport, peer, owner, &model, target, forgotten).await?;
                inner
                    .compared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(key, Instant::now());
            }
            CatchUpStep::Rows { owner, model, since, target } => {
                // Never in the middle of a comparison (see `LibraryInner::comparing`).
                let _rows = inner.comparing.read().await;
                let mut after: Option<StateCursor> = None;
                loop {
                    let request = Message::StateCatchUpRequest(StateCatchUpRequest {
                        owner,
                        model: model.clone(),
                        since,
                        after,
                        limit,
                    });
                    tracing::trace!(%peer, ?after, "requesting a state page");
                    let page = match transport.request(peer, request, timeout).await? {
                        Message::StatePage(page) => page,
                        // Refused: the peer may not serve rows now, or it forgot deletions
                        // after this device's mark since it told its watermarks; the next ones
                        // show it, and the next catch-up compares instead.
                        Message::Error(error) => return Err(CatchUpError::Refused(error.message)),
                        _ => return Err(CatchUpError::Unexpected("answer to StateCatchUpRequest")),
                    };
                    after = page
                        .rows
                        .last()
                        .map(|row| StateCursor { version: row.version, id: row.id });
                    pulled |= !page.rows.is_empty();
                    apply_state_page(inner, peer, page, since, after, Some(target)).await?;
                    if after.is_none() {
                        break;
                    }
                }
            }
            CatchUpStep::Shared { .. } => {
                // Until this device has all the peer's watermarks cover.
                let their_shared = SharedProgress::from_wire(&theirs.shared);
                loop {
                    let mine = load_shared(inner).await?;
                    if shared_needs(&mine, &their_shared).is_empty() {
                        break;
                    }
                    let request = Message::SharedCatchUpRequest(SharedCatchUpRequest {
                        after: mine.to_wire(),
                        limit,
                    });
                    let Message::SharedCatchUpResponse(response) =
                        transport.request(peer, request, timeout).await?
                    else {
                        return Err(CatchUpError::Unexpected("answer to SharedCatchUpRequest"));
                    };
                    for pruned in &response.pruned {
                        pruned_away = true;
                        metrics::counter!("lsync_catch_up_pruned_total").increment(1);
                        tracing::warn!(%peer, origin = %pruned.origin, first_held = pruned.seq, "peer pruned changes this device lacks");
                    }
                    if response.changes.is_empty() {
                        break;
                    }
                    pulled = true;
                    apply_shared_changes(inner, peer, SharedBatch { changes: response.changes })
                        .await?;
                    if response.complete {
                        break;
                    }
                }
            }
        }
    }

    Ok(CatchUpOutcome { pulled, pruned: pruned_away })
}

/// Brings this device's rows of one (owner, model) to the peer's, by comparing all of them in
/// key order (the backfill's pages, `BackfillRequest`): rows the peer holds newer are applied,
/// rows the peer no longer holds at or below its mark (`target`) are deleted. Used where the peer
/// forgot deletions above this device's mark (`forgotten`, its collected mark), so a catch-up by
/// version would leave deleted rows alive here for good. Each page is one transaction; the mark
/// is raised to the peer's (and this device's collected mark to `forgotten`: what it now holds
/// came from a copy without those tombstones) with the last one. Interrupted, it starts over on
/// the next catch-up, which repeats nothing harmful: every page is applied by the merge rules.
async fn compare_rows<T: Transport>(
    inner: &LibraryInner,
    transport: &T,
    peer: DeviceId,
    owner: DeviceId,
    model: &str,
    target: HlcTime,
    forgotten: HlcTime,
) -> Result<bool, CatchUpError> {
    let timeout = inner.config.request_timeout;
    let registry = inner.registry().clone();
    let model = model.to_owned();
    // One comparison at a time; one that another made needless (this device's mark reached
    // the peer's collected mark meanwhile: what called for it no longer holds) is skipped.
    let _comparing = inner.comparing.write().await;
    let mark = inner
        .db
        .read(async |conn| lsync_watermark::sql::state_mark(conn, owner, &model).await)
        .await?;
    if mark >= Some(forgotten) {
        return Ok(false);
    }
    tracing::info!(%peer, %owner, %model, ?forgotten, "the peer forgot deletions above this device's mark: comparing every row");
    metrics::counter!("lsync_row_comparisons_total").increment(1);
    let mut after: Option<uuid::Uuid> = None;
    let mut pulled = false;
    // What this copy cannot list deletions of once the comparison ends: what the peer told it
    // forgot, and what it forgot while serving the pages (deletions missing from them without
    // tombstones), never above the mark the comparison raises.
    let mut forgotten = forgotten;
    loop {
        let request = Message::BackfillRequest(BackfillRequest {
            owner,
            model: model.clone(),
            after,
            limit: inner.config.page_rows,
        });
        let page = match transport.request(peer, request, timeout).await? {
            Message::StatePage(page) => page,
            Message::Error(error) => return Err(CatchUpError::Refused(error.message)),
            _ => return Err(CatchUpError::Unexpected("answer to BackfillRequest")),
        };
        let keys: Vec<(uuid::Uuid, HlcTime)> =
            page.rows.iter().map(|row| (row.id, row.version)).collect();
        let last = keys.last().map(|(id, _)| *id);
        let more = page.more && last.is_some();
        let through = if more { last } else { None };
        pulled |= !page.rows.is_empty();
        if let Some(collected) = page.collected {
            forgotten = forgotten.max(collected.min(target));
        }
        let (upserted, deleted, projection) = inner
            .db
            .write(async |conn| {
                // Rows the peer holds are taken even where this device's mark says it saw them
                // go (absent at or below the mark): a deletion at or below that mark lies below
                // the peer's collected mark too, which is above this device's mark, so the peer
                // applied it and would not hold the row. A row it holds that this device lacks
                // comes from a copy rolled back and resynced, after its barrier
                // (`own_rows_barrier`). Tombstones held here still win. Unless live batches
                // raised the mark above the peer's meanwhile (`comparison_mark`).
                let mark = lsync_watermark::sql::state_mark(conn, owner, &model).await?;
                let applied = lsync_state_sync::sql::apply_rows_known_through(
                    conn,
                    &registry,
                    owner,
                    &model,
                    &page.columns,
                    page.rows,
                    false,
                    lsync_state_sync::comparison_mark(mark, target),
                    now_ms(),
                )
                .await?;
                let mut deleted = applied.deleted;
                let mut projection = applied.projection;
                let (missing, hidden) = lsync_state_sync::sql::delete_missing(
                    conn,
                    &registry,
                    owner,
                    &model,
                    after,
                    through,
                    target,
                    &keys,
                    now_ms(),
                )
                .await?;
                deleted.extend(missing);
                projection.absorb(hidden);
                if !more {
                    let mark = StateMark { owner, model: model.clone(), version: target };
                    lsync_watermark::sql::raise_state_progress(conn, &[mark]).await?;
                    let mark = StateMark { owner, model: model.clone(), version: forgotten };
                    lsync_watermark::sql::raise_collected(conn, &[mark]).await?;
                }
                Ok::<_, LibraryError>((applied.upserted, deleted, projection))
            })
            .await?;
        if !deleted.is_empty() {
            tracing::info!(%peer, %owner, %model, deleted = deleted.len(), "rows the peer no longer holds were deleted");
        }
        pulled |= !deleted.is_empty();
        if !upserted.is_empty() || !deleted.is_empty() {
            inner.emit(Event::RowsChanged {
                from: peer,
                owner,
                model: model.clone(),
                upserted,
                deleted,
            });
        }
        emit_projection(inner, peer, projection);
        if !more {
            return Ok(pulled);
        }
        after = last;
    }
}

/// What a catch-up did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CatchUpOutcome {
    /// Something was pulled.
    pub(crate) pulled: bool,
    /// The peer no longer holds changes this device lacks: a shared snapshot is needed.
    pub(crate) pruned: bool,
}

/// One page of a backfill, as fetched.
pub(crate) enum BackfillPage {
    /// Device-owned rows by key.
    State(StatePage),
    /// Merged shared records by key.
    Shared(SharedSnapshotPage),
}

impl BackfillPage {
    /// The page's keys, in order.
    pub(crate) fn keys(&self) -> Vec<uuid::Uuid> {
        match self {
            BackfillPage::State(page) => page.rows.iter().map(|row| row.id).collect(),
            BackfillPage::Shared(page) => page.records.iter().map(|record| record.id).collect(),
        }
    }

    /// The serving peer's collected mark when it read a page of rows
    /// ([`StatePage::collected`]).
    pub(crate) fn forgotten(&self) -> Option<HlcTime> {
        match self {
            BackfillPage::State(page) => page.collected,
            BackfillPage::Shared(_) => None,
        }
    }

    /// Whether more pages follow, and the peer's estimate of the step's size.
    pub(crate) fn more_and_total(&self) -> (bool, u64) {
        match self {
            BackfillPage::State(page) => (page.more, page.estimated_total),
            BackfillPage::Shared(page) => (page.more, page.estimated_total),
        }
    }
}

/// Fetches one backfill page from `peer`.
pub(crate) async fn fetch_backfill_page<T: Transport>(
    inner: &LibraryInner,
    transport: &T,
    peer: DeviceId,
    step: &lsync_backfill::StepKind,
    after: Option<uuid::Uuid>,
) -> Result<BackfillPage, CatchUpError> {
    let timeout = inner.config.request_timeout;
    let limit = inner.config.page_rows;
    let request = match step {
        lsync_backfill::StepKind::State { owner, model } => {
            Message::BackfillRequest(BackfillRequest {
                owner: *owner,
                model: model.clone(),
                after,
                limit,
            })
        }
        lsync_backfill::StepKind::Shared { model } => {
            Message::SharedSnapshotRequest(SharedSnapshotRequest {
                model: model.clone(),
                after,
                limit,
            })
        }
    };
    match transport.request(peer, request, timeout).await? {
        Message::StatePage(page) => Ok(BackfillPage::State(page)),
        Message::SharedSnapshotPage(page) => Ok(BackfillPage::Shared(page)),
        Message::Error(error) => Err(CatchUpError::Refused(error.message)),
        _ => Err(CatchUpError::Unexpected("answer to a backfill request")),
    }
}

/// Applies a backfill page, what the state machine derived from it, and the new checkpoint, in
/// one transaction.
pub(crate) async fn apply_backfill_page(
    inner: &LibraryInner,
    peer: DeviceId,
    page: BackfillPage,
    outcome: &lsync_backfill::PageOutcome,
    checkpoint: &lsync_backfill::Checkpoint,
) -> Result<(), LibraryError> {
    let registry = inner.registry().clone();
    let device = inner.identity().device;
    let started = Instant::now();
    let (changed, projection) = inner
        .db
        .write(async |conn| {
            let mut changed = None;
            let projection = match page {
                BackfillPage::State(page) => {
                    let count = page.rows.len();
                    // Observed like any stamp; a copy re-created under this identity gets its
                    // own rows back, and its clock must run past their versions before it
                    // writes again.
                    let versions: Vec<HlcTime> = page.rows.iter().map(|row| row.version).collect();
                    observe_rows(inner, peer, page.owner, &versions);
                    // A resync of this device's own rows trusts the serving peer over the own
                    // mark: a restored copy's mark may lie above rows it lost (it wrote newer
                    // ones since), which the mark would refuse as deleted here. What this device
                    // deleted is held as tombstones, or acknowledged by every peer and absent.
                    // Except below the marks an earlier rollback resync left its rows exactly as
                    // its source held them (`Checkpoint::resynced_through`): a peer that heard
                    // less of this copy still holds rows that source had seen deleted.
                    // What the peer holds, for the resync's deletion (`delete_missing`).
                    let held: Vec<(uuid::Uuid, HlcTime)> =
                        page.rows.iter().map(|row| (row.id, row.version)).collect();
                    let known_through = if checkpoint.delete_missing && page.owner == device {
                        checkpoint.own_rows_known_through(device, &page.model)
                    } else {
                        lsync_watermark::sql::state_mark(conn, page.owner, &page.model).await?
                    };
                    let applied = lsync_state_sync::sql::apply_rows_known_through(
                        conn,
                        &registry,
                        page.owner,
                        &page.model,
                        &page.columns,
                        page.rows,
                        false,
                        known_through,
                        now_ms(),
                    )
                    .await?;
                    let mut deleted = applied.deleted;
                    // Only rows the serving peer has seen the owner's changes up to: a newer
                    // row (this device's own, written since; another owner's, received
                    // directly) is one the peer does not know yet. This device's own rows are
                    // included: a copy restored from an old file resyncs them, and rows it
                    // deleted after the backup must go.
                    let peer_mark = checkpoint
                        .state_marks
                        .iter()
                        .find(|mark| mark.owner == page.owner && mark.model == page.model)
                        .map(|mark| mark.version);
                    let mut projection = applied.projection;
                    if let (Some((after, through)), Some(peer_mark)) =
                        (outcome.delete_missing, peer_mark)
                    {
                        let (missing, hidden) = lsync_state_sync::sql::delete_missing(
                            conn,
                            &registry,
                            page.owner,
                            &page.model,
                            after,
                            through,
                            peer_mark,
                            &held,
                            now_ms(),
                        )
                        .await?;
                        deleted.extend(missing);
                        projection.absorb(hidden);
                    }
                    record_applied("backfill", count, applied.rejected, started);
                    changed = Some((page.owner, page.model, applied.upserted, deleted));
                    projection
                }
                BackfillPage::Shared(page) => {
                    let count = page.records.len();
                    observe_records(inner, peer, &page.records);
                    let projection = lsync_shared_sync::sql::apply_snapshot(
                        conn,
                        &registry,
                        &page.model,
                        &page.records,
                        now_ms(),
                    )
                    .await?;
                    record_applied("snapshot", count, 0, started);
                    projection
                }
            };
            if !outcome.raise_shared.is_empty() {
                lsync_watermark::sql::raise_shared_progress(conn, &outcome.raise_shared).await?;
            }
            if !outcome.raise_state.is_empty() {
                lsync_watermark::sql::raise_state_progress(conn, &outcome.raise_state).await?;
            }
            if !outcome.raise_collected.is_empty() {
                lsync_watermark::sql::raise_collected(conn, &outcome.raise_collected).await?;
            }
            lsync_backfill::sql::store(conn, checkpoint).await?;
            store_clock(conn, inner.clock.last()).await?;
            Ok::<_, LibraryError>((changed, projection))
        })
        .await?;
    if let Some((owner, model, upserted, deleted)) = changed
        && (!upserted.is_empty() || !deleted.is_empty())
    {
        inner.emit(Event::RowsChanged { from: peer, owner, model, upserted, deleted });
    }
    emit_projection(inner, peer, projection);
    Ok(())
}

/// Persists a checkpoint on its own (a plan, a rebase, the end of a backfill).
pub(crate) async fn store_checkpoint(
    inner: &LibraryInner,
    checkpoint: &lsync_backfill::Checkpoint,
) -> Result<(), LibraryError> {
    let peers = inner
        .db
        .write(async |conn| {
            lsync_backfill::sql::store(conn, checkpoint).await?;
            if !checkpoint.brought_back_own_rows() {
                return Ok::<_, StoreError>(None);
            }
            let peers = lsync_watermark::sql::peers(conn).await?;
            Ok(Some(
                peers
                    .into_iter()
                    .map(|peer| peer.device)
                    .collect::<std::collections::BTreeSet<_>>(),
            ))
        })
        .await?;
    if let Some(peers) = peers {
        tracing::info!(
            peers = peers.len(),
            "own rows came back from a peer: the barrier waits for every peer to tell what it heard of this copy"
        );
        let due = inner
            .barrier_pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .start(peers);
        if due {
            own_rows_barrier(inner).await?;
        }
    }
    Ok(())
}

/// `peer` told what it heard of this copy (a watermark exchange) and showed no rollback: once
/// every paired peer has, after a backfill that brought this device's own rows back, the
/// barrier is set ([`lsync_backfill::Checkpoint::brought_back_own_rows`]).
pub(crate) async fn own_rows_confirmed(
    inner: &LibraryInner,
    peer: DeviceId,
) -> Result<(), LibraryError> {
    let due = inner
        .barrier_pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .confirmed(peer);
    if due {
        own_rows_barrier(inner).await?;
    }
    Ok(())
}

/// A rollback was found: a barrier waiting for peers waits for the next resync instead.
pub(crate) fn own_rows_unconfirmed(inner: &LibraryInner) {
    inner.barrier_pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).cancel();
}

/// Raises this device's own mark and own collected mark for every device-owned model it holds
/// rows of to a fresh version: its peers compare its rows with theirs once.
async fn own_rows_barrier(inner: &LibraryInner) -> Result<(), LibraryError> {
    let device = inner.identity().device;
    let registry = inner.registry().clone();
    let count = inner
        .db
        .write(async |conn| {
            let progress = lsync_watermark::sql::load_state_progress(conn).await?;
            let mut marks = Vec::new();
            for model in registry.in_apply_order() {
                if model.ownership != lsync_store::Ownership::DeviceOwned {
                    continue;
                }
                let Some(mark) = progress.get(device, &model.name) else { continue };
                let now = inner.clock.now().map_err(lsync_state_sync::StateError::from)?;
                let version = lsync_state_sync::local_version(now.time(), Some(mark));
                marks.push(StateMark { owner: device, model: model.name.clone(), version });
            }
            lsync_watermark::sql::raise_state_progress(conn, &marks).await?;
            lsync_watermark::sql::raise_collected(conn, &marks).await?;
            store_clock(conn, inner.clock.last()).await?;
            Ok::<_, LibraryError>(marks.len())
        })
        .await?;
    tracing::info!(
        models = count,
        "every peer told what it heard of this copy: its peers compare its own rows once"
    );
    Ok(())
}

/// Applies a catch-up page (rows in version order after the mark) and raises the mark: to just
/// below the last row's version while more may follow (rows can share a version), and to the
/// peer's mark once the last page arrived.
async fn apply_state_page(
    inner: &LibraryInner,
    peer: DeviceId,
    page: StatePage,
    since: Option<HlcTime>,
    last: Option<StateCursor>,
    target: Option<HlcTime>,
) -> Result<(), LibraryError> {
    let registry = inner.registry().clone();
    let more = page.more;
    let (owner, model) = (page.owner, page.model.clone());
    let versions: Vec<HlcTime> = page.rows.iter().map(|row| row.version).collect();
    observe_rows(inner, peer, owner, &versions);
    let applied = inner
        .db
        .write(async |conn| {
            let mark = lsync_watermark::sql::load_state_progress(conn).await?.get(owner, &model);
            // The page starts at `since`: it is contiguous with this device's mark if that mark
            // did not fall below `since` meanwhile (marks never fall).
            let complete = since <= mark;
            let applied = lsync_state_sync::sql::apply_rows(
                conn,
                &registry,
                owner,
                &model,
                &page.columns,
                page.rows,
                complete,
                now_ms(),
            )
            .await?;
            // Never above `target`, the peer's mark when the catch-up began: the peer may also
            // hold newer rows it applied across a gap of its own (a live batch that arrived
            // before an earlier one), and serves them; the rows of that gap it does not have.
            // Claiming everything up to the newest row served would skip them for good (the
            // real-mode simulator found it: a joiner lost renames its serving peer had missed).
            let raised = match (more, last, target) {
                // The last page: everything the peer vouched for arrived.
                (false, _, Some(target)) => Some(target),
                // Every row below the page's last version that the peer vouched for arrived.
                (true, Some(last), Some(target)) if last.version > HlcTime::ZERO => {
                    Some(HlcTime::from_u64(last.version.as_u64() - 1).min(target))
                }
                _ => None,
            };
            if complete && let Some(version) = raised {
                let mark = StateMark { owner, model: model.clone(), version };
                lsync_watermark::sql::raise_state_progress(conn, &[mark]).await?;
            }
            Ok::<_, LibraryError>(applied)
        })
        .await?;
    if !applied.upserted.is_empty() || !applied.deleted.is_empty() {
        inner.emit(Event::RowsChanged {
            from: peer,
            owner,
            model,
            upserted: applied.upserted,
            deleted: applied.deleted,
        });
    }
    Ok(())
}

async fn load_shared(inner: &LibraryInner) -> Result<SharedProgress, StoreError> {
    inner.db.read(async |conn| lsync_watermark::sql::load_shared_progress(conn).await).await
}

async fn load_state(inner: &LibraryInner) -> Result<StateProgress, StoreError> {
    inner.db.read(async |conn| lsync_watermark::sql::load_state_progress(conn).await).await
}

/// Whether `theirs` holds anything this device lacks.
pub(crate) async fn behind(inner: &LibraryInner, theirs: &Watermarks) -> Result<bool, StoreError> {
    let shared = load_shared(inner).await?;
    let state = load_state(inner).await?;
    tracing::trace!(?state, theirs = ?theirs.state, "behind?");
    Ok(!shared_needs(&shared, &SharedProgress::from_wire(&theirs.shared)).is_empty()
        || !state_needs(
            &state,
            &StateProgress::from_wire(&theirs.state),
            &StateProgress::from_wire(&theirs.collected),
        )
        .is_empty())
}

/// The origin/sequence an `Ack` must reach for a shared batch to count as delivered.
pub(crate) fn shared_coverage(batch: &SharedBatch) -> Option<OriginSeq> {
    batch
        .changes
        .iter()
        .map(|change| OriginSeq { origin: change.origin, seq: change.seq })
        .max_by_key(|mark| mark.seq)
}

/// Prunes the peer log and collects tombstones as far as every paired device allows.
pub(crate) async fn prune(inner: &LibraryInner) -> Result<(u64, u64), StoreError> {
    let retention = inner.config.retention();
    let tombstone_cutoff = now_ms().saturating_sub(duration_ms(inner.config.tombstone_retention));
    let log_cutoff = now_ms().saturating_sub(duration_ms(retention.max_age));
    inner
        .db
        .write(async |conn| {
            let peers = lsync_watermark::sql::peers(conn).await?;
            let prune_peers: Vec<lsync_peer_log::PrunePeer> = peers
                .iter()
                .map(|peer| lsync_peer_log::PrunePeer {
                    device: peer.device,
                    needs_resync: peer.needs_resync,
                })
                .collect();
            let logs = lsync_peer_log::sql::origin_logs(conn, log_cutoff).await?;
            let own = lsync_watermark::sql::load_shared_progress(conn).await?;
            let acks = lsync_watermark::sql::load_shared_acks(conn).await?;
            let plan = lsync_peer_log::plan_prune(&logs, &own, &prune_peers, &acks, &retention);
            let pruned = lsync_peer_log::sql::prune(conn, &plan).await?;
            let groups = lsync_state_sync::sql::tombstone_groups(conn, tombstone_cutoff).await?;
            let state_acks = lsync_watermark::sql::load_state_acks(conn).await?;
            let gc_peers: Vec<(DeviceId, bool)> =
                peers.iter().map(|peer| (peer.device, peer.needs_resync)).collect();
            let own_state = lsync_watermark::sql::load_state_progress(conn).await?;
            let gc =
                lsync_state_sync::plan_tombstone_gc(&groups, &gc_peers, &state_acks, &own_state);
            let collected = lsync_state_sync::sql::collect_tombstones(conn, &gc).await?;
            // What is collected can no longer be served to a peer catching up from below it.
            let forgotten: Vec<StateMark> = gc
                .collect_through
                .iter()
                .map(|(owner, model, version)| StateMark {
                    owner: *owner,
                    model: model.clone(),
                    version: *version,
                })
                .collect();
            lsync_watermark::sql::raise_collected(conn, &forgotten).await?;
            for device in plan.resync.iter().chain(&gc.resync) {
                tracing::warn!(%device, "retention cap passed: the device was left behind; it is not counted for pruning until it caught up again");
                lsync_watermark::sql::set_needs_resync(conn, *device, true).await?;
            }
            // A peer left behind counts again once it acknowledged everything this device no
            // longer keeps: every change pruned from the log, every deletion forgotten.
            let left_behind: Vec<DeviceId> = peers
                .iter()
                .filter(|peer| peer.needs_resync)
                .map(|peer| peer.device)
                .filter(|device| !plan.resync.contains(device) && !gc.resync.contains(device))
                .collect();
            if !left_behind.is_empty() {
                let logs = lsync_peer_log::sql::origin_logs(conn, log_cutoff).await?;
                let mut pruned_through = SharedProgress::default();
                for (origin, seq) in own.iter() {
                    let first_held = logs.iter().find(|log| log.origin == origin).map(|log| log.first_seq);
                    pruned_through.raise(origin, first_held.map_or(seq, |first| first.saturating_sub(1)));
                }
                let collected = lsync_watermark::sql::load_collected(conn).await?;
                for device in left_behind {
                    let shared = acks.get(&device).cloned().unwrap_or_default();
                    let state = state_acks.get(&device).cloned().unwrap_or_default();
                    if lsync_watermark::caught_up_again(&shared, &state, &pruned_through, &collected)
                    {
                        tracing::info!(%device, "a device left behind by retention caught up again");
                        lsync_watermark::sql::set_needs_resync(conn, device, false).await?;
                    }
                }
            }
            let left = lsync_peer_log::sql::len(conn).await?;
            metrics::gauge!("lsync_peer_log_entries").set(left as f64);
            Ok((pruned, collected))
        })
        .await
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

    use std::sync::Arc;

    use lsync_hlc::DeviceId;
    use lsync_protocol::{BackfillRequest, LibraryId, Message, Value};

    #[test]
    fn the_clock_offset_is_read_at_the_middle_of_the_round_trip() {
        assert_eq!(super::clock_offset_ms(1_000, 1_010, 1_020), 0);
        assert_eq!(super::clock_offset_ms(1_000, 5_010, 1_020), 4_000);
        assert_eq!(super::clock_offset_ms(1_000, 10, 1_020), -1_000);
        assert_eq!(super::clock_offset_ms(u64::MAX, u64::MAX, u64::MAX), 0);
        assert_eq!(super::clock_offset_ms(0, u64::MAX, 0), i64::MAX);
    }
    use lsync_state_sync::sql::RowEdit;
    use lsync_store::{ENTRY_KIND_FILE, reference_registry};
    use uuid::Uuid;

    use crate::config::SyncConfig;
    use crate::library::Library;

    fn entries(n: usize) -> Vec<RowEdit> {
        (0..n)
            .map(|i| RowEdit::Upsert {
                id: Uuid::now_v7(),
                values: vec![
                    Value::Blob(Uuid::nil().as_bytes().to_vec()),
                    Value::Null,
                    Value::from(format!("f{i}")),
                    Value::Integer(ENTRY_KIND_FILE),
                    Value::Integer(1),
                    Value::Integer(1),
                ],
            })
            .collect()
    }

    /// The peer every test here pairs with.
    const PEER: DeviceId = DeviceId(Uuid::from_bytes([2; 16]));

    /// A new library in `dir` (device `[1; 16]`), paired with [`PEER`].
    async fn paired_library(dir: &std::path::Path) -> Library {
        let library = Library::create(
            &dir.join("library.db"),
            Arc::new(reference_registry().unwrap()),
            LibraryId(Uuid::new_v4()),
            DeviceId::from_bytes([1; 16]),
            SyncConfig::default(),
        )
        .await
        .unwrap();
        library
            .with_transaction(async |conn| {
                lsync_watermark::sql::add_peer(conn, PEER, "peer", 0).await
            })
            .await
            .unwrap();
        library
    }

    /// A backup of `library`'s file in `dir` (`VACUUM INTO`, as a backup tool would) and of its
    /// generation file.
    async fn back_up(library: &Library, dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
        let backup = dir.join("backup.db");
        sqlx::query("VACUUM INTO ?1")
            .bind(backup.to_str().unwrap())
            .execute(library.reader())
            .await
            .unwrap();
        (backup, std::fs::read(dir.join("library.db-generation")).unwrap())
    }

    /// Puts a backup back in the closed library's folder: the file, and the generation file too
    /// when `whole_folder` (nothing at open can tell then).
    fn restore(dir: &std::path::Path, backup: &(std::path::PathBuf, Vec<u8>), whole_folder: bool) {
        for file in ["library.db-wal", "library.db-shm"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        std::fs::copy(&backup.0, dir.join("library.db")).unwrap();
        if whole_folder {
            std::fs::write(dir.join("library.db-generation"), &backup.1).unwrap();
        }
    }

    fn page_rows(answer: Message) -> Vec<Uuid> {
        match answer {
            Message::StatePage(page) => page.rows.iter().map(|row| row.id).collect(),
            other => panic!("not a page: {other:?}"),
        }
    }

    #[test]
    fn a_page_read_ahead_before_a_peer_asks_for_watermarks_is_not_served_after() {
        actix::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let library = paired_library(dir.path()).await;
            let (inner, me, peer) = (library.inner.clone(), library.identity().device, PEER);
            library.write_rows("entries", entries(10)).await.unwrap();
            let request = |after| {
                Message::BackfillRequest(BackfillRequest {
                    owner: me,
                    model: "entries".into(),
                    after,
                    limit: 6,
                })
            };
            let first = page_rows(super::serve(&inner, peer, request(None)).await.response);
            assert_eq!(first.len(), 6);
            // Let the read-ahead of the second page finish.
            loop {
                let done = inner
                    .read_ahead
                    .lock()
                    .unwrap()
                    .get(&peer)
                    .is_some_and(|ahead| ahead.page.is_finished());
                if done {
                    break;
                }
                actix::clock::sleep(std::time::Duration::from_millis(1)).await;
            }
            // Rows written since (their keys sort after the first page), then a new plan.
            library.write_rows("entries", entries(3)).await.unwrap();
            let answer = super::serve(
                &inner,
                peer,
                Message::WatermarksRequest(super::own_watermarks(&inner).await.unwrap()),
            )
            .await
            .response;
            assert!(matches!(answer, Message::WatermarksResponse(_)));
            let second = page_rows(
                super::serve(&inner, peer, request(first.last().copied())).await.response,
            );
            assert_eq!(second.len(), 6, "the page read now, not the one read ahead (4 rows)");
            library.close().await.unwrap();
        });
    }

    #[test]
    fn a_catch_up_from_below_deletions_this_copy_forgot_is_refused_not_served_without_them() {
        actix::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let library = paired_library(dir.path()).await;
            let (inner, me) = (library.inner.clone(), library.identity().device);
            let written = entries(5);
            let ids: Vec<Uuid> = written
                .iter()
                .map(|edit| match edit {
                    RowEdit::Upsert { id, .. } => *id,
                    _ => unreachable!(),
                })
                .collect();
            library.write_rows("entries", written).await.unwrap();
            let own_mark = async || {
                super::own_watermarks(&inner)
                    .await
                    .unwrap()
                    .state
                    .iter()
                    .find(|mark| mark.owner == me && mark.model == "entries")
                    .map(|mark| mark.version)
            };
            // The peer's mark: before the delete.
            let since = own_mark().await;
            library.write_rows("entries", vec![RowEdit::Delete { id: ids[0] }]).await.unwrap();
            let mark = own_mark().await.unwrap();
            // Its tombstone is collected after the peer planned its catch-up (a retention cap
            // passed, the peer left behind): the peer's watermarks said nothing was forgotten.
            library
                .with_transaction(async |conn| {
                    let gc = lsync_state_sync::TombstoneGc {
                        collect_through: vec![(me, "entries".to_owned(), mark)],
                        resync: Vec::new(),
                    };
                    lsync_state_sync::sql::collect_tombstones(conn, &gc).await?;
                    let forgotten = lsync_protocol::StateMark {
                        owner: me,
                        model: "entries".into(),
                        version: mark,
                    };
                    lsync_watermark::sql::raise_collected(conn, &[forgotten]).await
                })
                .await
                .unwrap();
            let request = |since| {
                Message::StateCatchUpRequest(lsync_protocol::StateCatchUpRequest {
                    owner: me,
                    model: "entries".into(),
                    since,
                    after: None,
                    limit: 100,
                })
            };
            // Served, the page would lack the delete and the peer would raise its mark over it,
            // keeping the deleted row for good. Refused, it compares rows instead.
            match super::serve(&inner, PEER, request(since)).await.response {
                Message::Error(error) => {
                    assert_eq!(error.code, lsync_protocol::ErrorCode::NotAvailable);
                }
                other => panic!("served a catch-up over a forgotten delete: {other:?}"),
            }
            // From the collected mark on nothing is missing: served.
            assert!(
                page_rows(super::serve(&inner, PEER, request(Some(mark))).await.response)
                    .is_empty()
            );
            library.close().await.unwrap();
        });
    }

    #[test]
    fn a_copy_resyncing_what_it_may_have_lost_claims_no_rows_and_serves_none() {
        actix::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("library.db");
            let registry = Arc::new(reference_registry().unwrap());
            let library = paired_library(dir.path()).await;
            let (me, peer) = (library.identity().device, PEER);
            library.write_rows("entries", entries(5)).await.unwrap();
            // A backup, more writes, then the backup put back (the generation file kept, as the
            // user guide says): the copy resyncs at open, and until a peer serves it its tables
            // lack the rows written after the backup.
            let backup = back_up(&library, dir.path()).await;
            library.write_rows("entries", entries(5)).await.unwrap();
            library.close().await.unwrap();
            restore(dir.path(), &backup, false);
            let library = Library::open(&path, registry, SyncConfig::default()).await.unwrap();
            let inner = library.inner.clone();
            assert!(!inner.serves(), "a restored copy serves nothing before its resync");
            let told = super::own_watermarks(&inner).await.unwrap();
            let answer =
                super::serve(&inner, peer, Message::WatermarksRequest(told)).await.response;
            let Message::WatermarksResponse(answer) = answer else { panic!("{answer:?}") };
            assert!(!answer.ready);
            assert_eq!(answer.state, vec![], "no device-owned rows claimed");
            assert_eq!(answer.collected, vec![]);
            let requests = [
                Message::StateCatchUpRequest(lsync_protocol::StateCatchUpRequest {
                    owner: me,
                    model: "entries".into(),
                    since: None,
                    after: None,
                    limit: 100,
                }),
                Message::BackfillRequest(BackfillRequest {
                    owner: me,
                    model: "entries".into(),
                    after: None,
                    limit: 100,
                }),
            ];
            for request in requests {
                let name = request.name();
                match super::serve(&inner, peer, request).await.response {
                    Message::Error(error) => {
                        assert_eq!(error.code, lsync_protocol::ErrorCode::Busy, "{name}");
                    }
                    other => panic!("{name} answered while resyncing: {other:?}"),
                }
            }
            library.close().await.unwrap();
        });
    }

    #[test]
    fn a_copy_restored_with_its_generation_file_learns_it_from_a_request_before_answering() {
        actix::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("library.db");
            let registry = Arc::new(reference_registry().unwrap());
            let library = paired_library(dir.path()).await;
            let peer = PEER;
            library.write_rows("entries", entries(5)).await.unwrap();
            // The whole folder backed up, generation file included: nothing at open can tell.
            let backup = back_up(&library, dir.path()).await;
            library.write_rows("entries", entries(5)).await.unwrap();
            // What the peer heard of this copy last: more than the backup holds.
            let heard = super::own_watermarks(&library.inner).await.unwrap().incarnation;
            library.close().await.unwrap();
            restore(dir.path(), &backup, true);
            let library = Library::open(&path, registry, SyncConfig::default()).await.unwrap();
            let inner = library.inner.clone();
            assert!(inner.serves(), "nothing at open tells");
            let mut request = super::own_watermarks(&inner).await.unwrap();
            request.seen = heard;
            let served = super::serve(&inner, peer, Message::WatermarksRequest(request)).await;
            assert!(served.rolled_back, "the request told it");
            let Message::WatermarksResponse(answer) = served.response else { panic!() };
            assert!(!answer.ready);
            assert_eq!(answer.state, vec![], "the answer claims none of the rows the file lost");
            // Told once: the incarnation is recorded, and a second request changes nothing.
            let mut again = super::own_watermarks(&inner).await.unwrap();
            again.seen = heard;
            let served = super::serve(&inner, peer, Message::WatermarksRequest(again)).await;
            assert!(!served.rolled_back);
            library.close().await.unwrap();
        });
    }

    #[test]
    fn a_copy_restored_whole_whose_lost_writes_were_only_rows_learns_it_from_the_peers_marks() {
        actix::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("library.db");
            let registry = Arc::new(reference_registry().unwrap());
            let library = paired_library(dir.path()).await;
            library.write_rows("entries", entries(5)).await.unwrap();
            let backup = back_up(&library, dir.path()).await;
            // A write since the backup reached the peer (its batch raised the peer's mark of
            // this device's rows), but no heartbeat told it the file's write count.
            library.write_rows("entries", entries(5)).await.unwrap();
            let peer_heard = super::own_watermarks(&library.inner).await.unwrap();
            library.close().await.unwrap();
            restore(dir.path(), &backup, true);
            let library = Library::open(&path, registry, SyncConfig::default()).await.unwrap();
            let inner = library.inner.clone();
            let mut theirs = peer_heard.clone();
            theirs.device = PEER;
            theirs.seen = None;
            assert!(super::own_rollback(&inner, &theirs).await.unwrap().is_none());
            assert!(!super::copy_rolled_back(&inner, &theirs).await.unwrap());
            assert!(
                super::own_rows_rolled_back(&inner, &theirs).await.unwrap(),
                "the peer holds more of this device's rows than the file does"
            );
            // A peer that holds exactly what the file holds shows nothing.
            let mut same = super::own_watermarks(&inner).await.unwrap();
            same.device = PEER;
            assert!(!super::own_rows_rolled_back(&inner, &same).await.unwrap());
            library.close().await.unwrap();
        });
    }

    #[test]
    fn a_copy_stamps_its_next_edit_after_what_a_peer_holds_of_its_rows() {
        actix::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let library = paired_library(dir.path()).await;
            let (inner, me, peer) = (library.inner.clone(), library.identity().device, PEER);
            // A peer holds a version of this device's rows 20 s ahead of its clock: written
            // before a restore, by a clock that ran ahead then.
            let ahead = lsync_hlc::HlcTime::new(inner.clock.wall_ms() + 20_000, 0).unwrap();
            let mut theirs = super::own_watermarks(&inner).await.unwrap();
            theirs.device = peer;
            theirs.state = vec![lsync_protocol::StateMark {
                owner: me,
                model: "entries".into(),
                version: ahead,
            }];
            let _ = super::serve(&inner, peer, Message::WatermarksRequest(theirs)).await;
            let rows = library.write_rows("entries", entries(1)).await.unwrap();
            assert!(rows[0].version > ahead, "{:?} not after {ahead:?}", rows[0].version);
            library.close().await.unwrap();
        });
    }
}

//! The batching window: local writes wait a short time so that many of them travel in one
//! message, several writes to one row travel as its newest version, and a burst (indexing a
//! million files) goes out in bounded chunks.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use lsync_hlc::HlcTime;
use lsync_protocol::{SharedChange, StateRow};
use uuid::Uuid;

/// What to send: one `StateBatch` or `SharedBatch` worth of local writes. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flush {
    /// This device's rows of one device-owned model.
    State {
        /// The device-owned model.
        model: String,
        /// The owner's mark for the model before the first row of this flush: the flush holds
        /// every change of the model after it (the `since` of the `StateBatch`). `HlcTime::MAX`
        /// when it claims no such thing: rows written while this copy claimed none of its own
        /// ([`Batcher::push_state_unclaimed`]); a receiver applies them and keeps its mark.
        since: Option<HlcTime>,
        /// The rows, at most one per primary key (its newest version), in primary-key order.
        rows: Vec<StateRow>,
    },
    /// This device's shared changes, in sequence order.
    Shared {
        /// The changes.
        changes: Vec<SharedChange>,
    },
}

/// The local writes of one device-owned model since its last flush.
#[derive(Debug)]
struct PendingState {
    /// The owner's mark before the first write of this batch.
    since: Option<HlcTime>,
    /// The newest version of every row written, by primary key.
    rows: HashMap<Uuid, StateRow>,
    /// The newest version among `rows` (`None` only while `rows` is empty).
    newest: Option<HlcTime>,
    /// When the first write of this batch arrived: the window is measured from here.
    first_write: Instant,
    /// A write of this batch was made while the copy claimed none of its own rows: the batch
    /// claims no contiguity, and its flushes carry `since = HlcTime::MAX`.
    unclaimed: bool,
}

/// The local shared changes since the last flush.
#[derive(Debug)]
struct PendingShared {
    /// The changes, in sequence order.
    changes: Vec<SharedChange>,
    /// When the first of them arrived.
    first_write: Instant,
}

/// Collects this device's local writes and decides when to send them.
///
/// Each device-owned model has its own pending batch, and shared changes have one more. A pending
/// batch is due when its window, measured from its first write after the last flush, has
/// elapsed, or as soon as it holds `max_rows` rows (after coalescing). A due batch of more than
/// `max_rows` rows is split into chunks of at most `max_rows`:
///
/// - State rows are chunked in **version order**, and each chunk's `since` is the newest version
///   of the chunk before it (the first chunk's is the batch's `since`). So every chunk holds every
///   change after its `since`, as the `StateBatch` contract requires: a receiver that applied the
///   previous chunks may raise its mark through each one. Cut in key order instead, a chunk could
///   hold a newer row than a later chunk, and a receiver raising its mark to that newer version
///   would claim rows it never got. Within a chunk the rows are then sorted by primary key, the
///   order SQLite inserts fastest.
/// - Shared changes are chunked in sequence order.
///
/// # Call order
/// 1. [`Batcher::push_state`] / [`Batcher::push_shared`] for every local write, as it commits.
/// 2. Arm a timer at [`Batcher::next_deadline`] (re-read after every call; an instant that has
///    already passed means "poll now").
/// 3. When it fires, [`Batcher::poll`], and send what it returns, in order.
/// 4. [`Batcher::flush_all`] whenever nothing may wait: shutdown, sync being disabled, a peer
///    coming online.
///
/// The `now` passed to these calls must never go backwards (checked in debug builds).
#[derive(Debug)]
pub struct Batcher {
    window: Duration,
    max_rows: usize,
    /// Pending batches by model name; a `BTreeMap` so flushes come out in a fixed order.
    state: BTreeMap<String, PendingState>,
    shared: Option<PendingShared>,
    /// The latest `now` seen, to check that time does not go backwards.
    last_now: Option<Instant>,
}

impl Batcher {
    /// A batcher that holds writes for `window` (the engine uses 100 ms: long enough to gather a
    /// burst of writes into one message, short enough to feel live) and flushes early at
    /// `max_rows` rows per batch (at least 1; zero is treated as 1).
    pub fn new(window: Duration, max_rows: usize) -> Self {
        Self {
            window,
            max_rows: max_rows.max(1),
            state: BTreeMap::new(),
            shared: None,
            last_now: None,
        }
    }

    /// Records a local write of device-owned rows of `model`, committed at `now`. `since` is this
    /// device's mark for the model *before* the write (`None` if it is the model's first write);
    /// every row's version must be above it. A row written again replaces its older version.
    pub fn push_state(
        &mut self,
        model: &str,
        since: Option<HlcTime>,
        rows: Vec<StateRow>,
        now: Instant,
    ) {
        self.push(model, since, false, rows, now);
    }

    /// Records a local write of device-owned rows of `model` made while this copy claims none of
    /// its own rows (it may not serve: a copy resyncing what it may have lost, see
    /// `lsync_watermark::told`). Its mark before the write is not backed by what it holds — a
    /// restored copy's mark lies below the rows it lost, and a peer that holds more than that
    /// mark would raise its own over deletions it never saw — so the batch these rows join
    /// claims nothing: its flushes carry `since = HlcTime::MAX`. Receivers apply the rows and
    /// keep their marks; they catch up once the copy is whole again.
    pub fn push_state_unclaimed(&mut self, model: &str, rows: Vec<StateRow>, now: Instant) {
        self.push(model, None, true, rows, now);
    }

    /// Makes every pending batch of rows claim nothing: the copy just learned that its mark is
    /// not backed by what it holds (its file was rolled back to an older copy), and rows written
    /// before it knew must not carry the old claim either.
    pub fn unclaim_state(&mut self) {
        for pending in self.state.values_mut() {
            pending.unclaimed = true;
        }
    }

    fn push(
        &mut self,
        model: &str,
        since: Option<HlcTime>,
        unclaimed: bool,
        rows: Vec<StateRow>,
        now: Instant,
    ) {
        self.observe(now);
        if rows.is_empty() {
            return;
        }
        debug_assert!(
            unclaimed || rows.iter().all(|row| Some(row.version) > since),
            "a write's rows must be newer than the mark before it"
        );
        let pending = match self.state.get_mut(model) {
            Some(pending) => {
                // The batch holds every change after its `since`: a write may only continue from
                // a mark the batch already covers. The own mark moves without a write too — an
                // own-rows barrier raises it so that every peer compares this device's rows, and
                // rows of its own pulled from a peer raise it — and a batch claiming contiguity
                // across that rise would have peers raise their marks over it (skipping the
                // comparison the barrier asks for): the batch then claims nothing. A batch that
                // claims nothing stays so (the copy's mark jumps when its resync ends).
                let covered = pending.newest.max(pending.since);
                pending.unclaimed |= unclaimed || since > covered;
                pending
            }
            None => self.state.entry(model.to_owned()).or_insert(PendingState {
                since,
                rows: HashMap::new(),
                newest: None,
                first_write: now,
                unclaimed,
            }),
        };
        for row in rows {
            pending.newest = pending.newest.max(Some(row.version));
            match pending.rows.get(&row.id) {
                Some(held) if held.version >= row.version => {}
                _ => {
                    pending.rows.insert(row.id, row);
                }
            }
        }
    }

    /// Records local shared changes (this device's origin, increasing sequence numbers),
    /// committed at `now`.
    pub fn push_shared(&mut self, changes: Vec<SharedChange>, now: Instant) {
        self.observe(now);
        if changes.is_empty() {
            return;
        }
        let pending = self
            .shared
            .get_or_insert_with(|| PendingShared { changes: Vec::new(), first_write: now });
        for change in changes {
            debug_assert!(
                pending
                    .changes
                    .last()
                    .is_none_or(|last| { last.origin == change.origin && last.seq < change.seq }),
                "shared changes must come from one origin in increasing sequence order"
            );
            pending.changes.push(change);
        }
    }

    /// Takes every pending batch that is due at `now`: its window has elapsed, or it holds
    /// `max_rows` rows. State batches come first, by model name, then shared changes.
    pub fn poll(&mut self, now: Instant) -> Vec<Flush> {
        self.observe(now);
        let (window, max_rows) = (self.window, self.max_rows);
        let due = |first_write: Instant, len: usize| {
            len >= max_rows || now.saturating_duration_since(first_write) >= window
        };
        let due_models: Vec<String> = self
            .state
            .iter()
            .filter(|(_, pending)| due(pending.first_write, pending.rows.len()))
            .map(|(model, _)| model.clone())
            .collect();
        let mut flushes = Vec::new();
        for model in due_models {
            if let Some(pending) = self.state.remove(&model) {
                flushes.extend(state_flushes(model, pending, max_rows));
            }
        }
        if self
            .shared
            .as_ref()
            .is_some_and(|pending| due(pending.first_write, pending.changes.len()))
            && let Some(pending) = self.shared.take()
        {
            flushes.extend(shared_flushes(pending.changes, max_rows));
        }
        flushes
    }

    /// Takes every pending batch, due or not.
    pub fn flush_all(&mut self) -> Vec<Flush> {
        let max_rows = self.max_rows;
        let mut flushes = Vec::new();
        for (model, pending) in std::mem::take(&mut self.state) {
            flushes.extend(state_flushes(model, pending, max_rows));
        }
        if let Some(pending) = self.shared.take() {
            flushes.extend(shared_flushes(pending.changes, max_rows));
        }
        flushes
    }

    /// When the earliest pending batch becomes due: the end of its window, or the time of its
    /// first write if it is already full (an instant in the past: poll now). `None` if nothing is
    /// pending, or if no pending batch will ever be due by time alone (a window so long that its
    /// end cannot be represented).
    pub fn next_deadline(&self) -> Option<Instant> {
        let deadline = |first_write: Instant, len: usize| {
            if len >= self.max_rows {
                Some(first_write)
            } else {
                first_write.checked_add(self.window)
            }
        };
        let state = self
            .state
            .values()
            .filter_map(|pending| deadline(pending.first_write, pending.rows.len()));
        let shared = self
            .shared
            .iter()
            .filter_map(|pending| deadline(pending.first_write, pending.changes.len()));
        state.chain(shared).min()
    }

    /// How many rows and changes wait, after coalescing.
    pub fn pending_rows(&self) -> usize {
        let state: usize = self.state.values().map(|pending| pending.rows.len()).sum();
        state + self.shared.as_ref().map_or(0, |pending| pending.changes.len())
    }

    fn observe(&mut self, now: Instant) {
        debug_assert!(self.last_now.is_none_or(|last| now >= last), "time went backwards");
        self.last_now = Some(self.last_now.map_or(now, |last| last.max(now)));
    }
}

/// Cuts a pending state batch into flushes of at most `max_rows` rows, in version order, each
/// holding every change after its `since`.
fn state_flushes(model: String, pending: PendingState, max_rows: usize) -> Vec<Flush> {
    let mut rows: Vec<StateRow> = pending.rows.into_values().collect();
    rows.sort_unstable_by_key(|row| (row.version, row.id));
    if pending.unclaimed {
        return chunk_by_version(None, rows, max_rows)
            .into_iter()
            .map(|(_, mut rows)| {
                rows.sort_unstable_by_key(|row| row.id);
                Flush::State { model: model.clone(), since: Some(HlcTime::MAX), rows }
            })
            .collect();
    }
    let chunks = chunk_by_version(pending.since, rows, max_rows);
    let mut previous_since = None;
    chunks
        .into_iter()
        .map(|(since, mut rows)| {
            debug_assert!(!rows.is_empty(), "an empty flush");
            debug_assert!(
                rows.iter().all(|row| Some(row.version) > since),
                "a chunk holds a row not newer than its since"
            );
            debug_assert!(
                previous_since.is_none_or(|previous| since > previous),
                "chunks' since must increase"
            );
            previous_since = Some(since);
            rows.sort_unstable_by_key(|row| row.id);
            Flush::State { model: model.clone(), since, rows }
        })
        .collect()
}

/// Splits rows sorted by version into chunks of at most `max_rows`; chunk k+1's `since` is the
/// newest version of chunk k. A chunk never ends between two rows of the same version (a receiver
/// raising its mark to that version would claim the rows left for the next chunk), so a chunk is
/// longer than `max_rows` only if more than `max_rows` rows share one version — which an owner
/// never writes, as it stamps every row with a fresh tick of its clock.
fn chunk_by_version(
    since: Option<HlcTime>,
    rows: Vec<StateRow>,
    max_rows: usize,
) -> Vec<(Option<HlcTime>, Vec<StateRow>)> {
    let mut chunks = Vec::with_capacity(rows.len().div_ceil(max_rows));
    let mut chunk_since = since;
    let mut chunk: Vec<StateRow> = Vec::with_capacity(max_rows.min(rows.len()));
    for row in rows {
        let full = chunk.len() >= max_rows;
        let splits_version = chunk.last().is_some_and(|last| last.version == row.version);
        if full && !splits_version {
            let newest = chunk.last().map(|last| last.version);
            chunks.push((chunk_since, std::mem::take(&mut chunk)));
            chunk_since = newest;
        }
        chunk.push(row);
    }
    if !chunk.is_empty() {
        chunks.push((chunk_since, chunk));
    }
    chunks
}

/// Cuts pending shared changes into flushes of at most `max_rows`, in sequence order.
fn shared_flushes(changes: Vec<SharedChange>, max_rows: usize) -> Vec<Flush> {
    debug_assert!(changes.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    let mut flushes = Vec::with_capacity(changes.len().div_ceil(max_rows));
    let mut changes = changes.into_iter().peekable();
    while changes.peek().is_some() {
        let chunk: Vec<SharedChange> = changes.by_ref().take(max_rows).collect();
        flushes.push(Flush::Shared { changes: chunk });
    }
    flushes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

    use std::collections::BTreeMap;

    use lsync_hlc::DeviceId;
    use lsync_protocol::{SharedOp, StateOp, Value};
    use proptest::prelude::*;

    use super::*;

    const WINDOW: Duration = Duration::from_millis(100);

    fn version(n: u64) -> HlcTime {
        HlcTime::from_u64(n)
    }

    fn row(id: u128, at: u64) -> StateRow {
        let value = Value::Integer(i64::try_from(at).unwrap());
        StateRow { id: Uuid::from_u128(id), version: version(at), op: StateOp::Upsert(vec![value]) }
    }

    fn change(seq: u64) -> SharedChange {
        SharedChange {
            origin: DeviceId::from_bytes([1; 16]),
            seq,
            time: version(seq),
            model: "tag".to_owned(),
            record: Uuid::from_u128(u128::from(seq)),
            op: SharedOp::Delete,
        }
    }

    /// A flush as (model, since, [(id, version)]) — `None` model for shared changes, whose seqs
    /// stand in the version slot.
    type Summary = (Option<String>, Option<u64>, Vec<(u128, u64)>);

    fn summary(flushes: &[Flush]) -> Vec<Summary> {
        flushes
            .iter()
            .map(|flush| match flush {
                Flush::State { model, since, rows } => (
                    Some(model.clone()),
                    since.map(HlcTime::as_u64),
                    rows.iter().map(|row| (row.id.as_u128(), row.version.as_u64())).collect(),
                ),
                Flush::Shared { changes } => (
                    None,
                    None,
                    changes.iter().map(|change| (change.record.as_u128(), change.seq)).collect(),
                ),
            })
            .collect()
    }

    /// An expected flush, written as a [`Summary`] of borrowed parts.
    type Expected<'a> = (Option<&'a str>, Option<u64>, &'a [(u128, u64)]);

    fn check(flushes: &[Flush], expected: &[Expected<'_>]) {
        let expected: Vec<Summary> = expected
            .iter()
            .map(|(model, since, rows)| (model.map(str::to_owned), *since, rows.to_vec()))
            .collect();
        assert_eq!(summary(flushes), expected);
    }

    #[test]
    fn coalescing_keeps_the_newest_version_of_each_row() {
        let start = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 100);
        batcher.push_state("file", Some(version(1)), vec![row(7, 2), row(3, 3)], start);
        batcher.push_state("file", Some(version(3)), vec![row(7, 4)], start);
        // The same row twice in one write: the newer one wins whatever the order.
        batcher.push_state("file", Some(version(4)), vec![row(3, 6), row(3, 5)], start);
        assert_eq!(batcher.pending_rows(), 2);
        check(&batcher.poll(start + WINDOW), &[(Some("file"), Some(1), &[(3, 6), (7, 4)])]);
        assert_eq!(batcher.pending_rows(), 0);
    }

    #[test]
    fn rows_written_while_the_copy_claims_none_claim_no_contiguity_in_any_chunk() {
        let start = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 2);
        let unclaimed = Some(u64::MAX);
        // A claimed write, then one made while the copy resyncs: the whole batch claims nothing.
        batcher.push_state("file", Some(version(1)), vec![row(1, 2), row(2, 3)], start);
        batcher.push_state_unclaimed("file", vec![row(3, 4)], start);
        // The resync ended and the mark jumped above the batch: still nothing claimed.
        batcher.push_state("file", Some(version(9)), vec![row(4, 10)], start);
        check(
            &batcher.flush_all(),
            &[
                (Some("file"), unclaimed, &[(1, 2), (2, 3)]),
                (Some("file"), unclaimed, &[(3, 4), (4, 10)]),
            ],
        );
        // The next batch starts afresh, until the copy learns its mark is not backed.
        batcher.push_state("file", Some(version(10)), vec![row(5, 11)], start);
        batcher.push_state("volume", Some(version(10)), vec![row(6, 12)], start);
        check(
            &batcher.poll(start + WINDOW),
            &[(Some("file"), Some(10), &[(5, 11)]), (Some("volume"), Some(10), &[(6, 12)])],
        );
        batcher.push_state("file", Some(version(11)), vec![row(7, 13)], start + WINDOW);
        batcher.unclaim_state();
        check(&batcher.flush_all(), &[(Some("file"), unclaimed, &[(7, 13)])]);
    }

    #[test]
    fn a_write_after_the_own_mark_rose_without_a_write_claims_no_contiguity_across_the_rise() {
        let start = Instant::now();
        let unclaimed = Some(u64::MAX);
        let mut batcher = Batcher::new(WINDOW, 100);
        batcher.push_state("file", Some(version(1)), vec![row(1, 2)], start);
        // Within the window the own mark rose to 9 by an own-rows barrier, not by a write: the
        // next write continues from 9, which the pending batch does not cover.
        batcher.push_state("file", Some(version(9)), vec![row(2, 10)], start);
        check(&batcher.flush_all(), &[(Some("file"), unclaimed, &[(1, 2), (2, 10)])]);
        // The next batch claims again, from where the mark is.
        batcher.push_state("file", Some(version(10)), vec![row(3, 11)], start);
        check(&batcher.flush_all(), &[(Some("file"), Some(10), &[(3, 11)])]);
    }

    #[test]
    fn nothing_flushes_before_the_window_and_everything_after() {
        let start = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 100);
        batcher.push_state("file", None, vec![row(1, 1)], start);
        assert!(batcher.poll(start).is_empty());
        batcher.push_shared(vec![change(1)], start + Duration::from_millis(20));
        assert!(batcher.poll(start + Duration::from_millis(50)).is_empty());
        // A later write does not extend the window of its batch.
        batcher.push_state(
            "file",
            Some(version(1)),
            vec![row(2, 2)],
            start + Duration::from_millis(60),
        );
        assert!(batcher.poll(start + Duration::from_millis(99)).is_empty());
        check(&batcher.poll(start + WINDOW), &[(Some("file"), None, &[(1, 1), (2, 2)])]);
        assert!(batcher.poll(start + Duration::from_millis(119)).is_empty());
        check(&batcher.poll(start + Duration::from_millis(120)), &[(None, None, &[(1, 1)])]);
        assert!(batcher.poll(start + Duration::from_secs(10)).is_empty());
        assert_eq!(batcher.next_deadline(), None);
    }

    #[test]
    fn a_full_batch_flushes_at_the_next_poll() {
        let start = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 3);
        batcher.push_state("file", None, vec![row(1, 1), row(2, 2)], start);
        // Rewriting a row does not count twice.
        batcher.push_state("file", Some(version(2)), vec![row(1, 3)], start);
        assert!(batcher.poll(start).is_empty());
        batcher.push_state("file", Some(version(3)), vec![row(4, 4)], start);
        assert_eq!(batcher.next_deadline(), Some(start), "a full batch is due at once");
        check(&batcher.poll(start), &[(Some("file"), None, &[(1, 3), (2, 2), (4, 4)])]);

        batcher.push_shared(vec![change(1), change(2), change(3)], start);
        check(&batcher.poll(start), &[(None, None, &[(1, 1), (2, 2), (3, 3)])]);
    }

    #[test]
    fn chunks_follow_version_order_and_each_is_sorted_by_key() {
        let start = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 2);
        // Keys run against versions, so key-order chunks would break the since rule.
        let rows: Vec<StateRow> = (1..=5).map(|at| row(u128::from(10 - at), at)).collect();
        batcher.push_state("file", Some(version(0)), rows, start);
        check(
            &batcher.flush_all(),
            &[
                (Some("file"), Some(0), &[(8, 2), (9, 1)]),
                (Some("file"), Some(2), &[(6, 4), (7, 3)]),
                (Some("file"), Some(4), &[(5, 5)]),
            ],
        );
        batcher.push_shared((1..=5).map(change).collect(), start);
        check(
            &batcher.flush_all(),
            &[
                (None, None, &[(1, 1), (2, 2)]),
                (None, None, &[(3, 3), (4, 4)]),
                (None, None, &[(5, 5)]),
            ],
        );
    }

    #[test]
    fn a_chunk_never_splits_one_version() {
        let rows = vec![row(1, 1), row(2, 2), row(3, 2), row(4, 3)];
        let chunks = chunk_by_version(None, rows, 2);
        let shape: Vec<(Option<u64>, usize)> =
            chunks.iter().map(|(since, rows)| (since.map(HlcTime::as_u64), rows.len())).collect();
        assert_eq!(shape, [(None, 3), (Some(2), 1)]);
    }

    #[test]
    fn flush_all_empties_everything() {
        let start = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 100);
        batcher.push_state("file", None, vec![row(1, 1)], start);
        batcher.push_state("volume", Some(version(5)), vec![row(2, 6)], start);
        batcher.push_shared(vec![change(1)], start);
        assert_eq!(batcher.pending_rows(), 3);
        check(
            &batcher.flush_all(),
            &[
                (Some("file"), None, &[(1, 1)]),
                (Some("volume"), Some(5), &[(2, 6)]),
                (None, None, &[(1, 1)]),
            ],
        );
        assert_eq!(batcher.pending_rows(), 0);
        assert_eq!(batcher.next_deadline(), None);
        assert!(batcher.flush_all().is_empty());
        assert!(batcher.poll(start + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn empty_writes_leave_nothing_pending() {
        let start = Instant::now();
        let mut batcher = Batcher::new(WINDOW, 100);
        batcher.push_state("file", None, Vec::new(), start);
        batcher.push_shared(Vec::new(), start);
        assert_eq!(batcher.next_deadline(), None);
        assert!(batcher.flush_all().is_empty());
    }

    #[test]
    fn next_deadline_is_the_earliest_window_end() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut batcher = Batcher::new(WINDOW, 100);
        assert_eq!(batcher.next_deadline(), None);
        batcher.push_state("volume", None, vec![row(1, 1)], start + ms(30));
        assert_eq!(batcher.next_deadline(), Some(start + ms(130)));
        batcher.push_shared(vec![change(1)], start + ms(40));
        batcher.push_state("file", None, vec![row(2, 2)], start + ms(50));
        assert_eq!(batcher.next_deadline(), Some(start + ms(130)));
        check(&batcher.poll(start + ms(130)), &[(Some("volume"), None, &[(1, 1)])]);
        assert_eq!(batcher.next_deadline(), Some(start + ms(140)));
        check(&batcher.poll(start + ms(145)), &[(None, None, &[(1, 1)])]);
        assert_eq!(batcher.next_deadline(), Some(start + ms(150)));
    }

    /// One step of the random workload.
    #[derive(Debug, Clone)]
    enum Step {
        /// Time moves forward by this many milliseconds.
        Advance(u64),
        /// One local write to model `.0` of the rows with these keys.
        Write(usize, Vec<u128>),
        /// Local shared changes.
        Shared(usize),
        Poll,
        FlushAll,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u64..80).prop_map(Step::Advance),
            6 => (0usize..3, prop::collection::vec(0u128..24, 1..6))
                .prop_map(|(model, ids)| Step::Write(model, ids)),
            1 => (1usize..4).prop_map(Step::Shared),
            3 => Just(Step::Poll),
            1 => Just(Step::FlushAll),
        ]
    }

    /// What one model's receiver sees of the flushes.
    #[derive(Default)]
    struct Receiver {
        /// The newest version of the last chunk applied (the mark it may raise to).
        mark: Option<HlcTime>,
        /// Each row's version, applying chunks in order, newer wins.
        rows: BTreeMap<Uuid, HlcTime>,
        /// Each chunk's (since, newest version]: the stretch of versions it covers.
        ranges: Vec<(Option<HlcTime>, HlcTime)>,
    }

    proptest! {
        /// Random writes with increasing versions across models and times: every chunk
        /// continues exactly where the previous one of its model ended, holds only rows newer
        /// than its since, each at the newest version written when it was cut, and together the
        /// chunks of a model carry the newest version of every row, each inside the chunk whose
        /// version stretch contains it; shared changes come out complete and in order.
        #[test]
        fn chunks_carry_every_newest_version_with_a_consistent_since(
            max_rows in 1usize..6,
            steps in prop::collection::vec(step(), 1..120),
        ) {
            let models = ["file", "location", "volume"];
            let start = Instant::now();
            let mut now = start;
            let mut batcher = Batcher::new(WINDOW, max_rows);
            let mut clock = 0u64;
            let mut owner_mark: BTreeMap<&str, HlcTime> = BTreeMap::new();
            let mut written: BTreeMap<&str, BTreeMap<Uuid, HlcTime>> = BTreeMap::new();
            let mut receivers: BTreeMap<String, Receiver> = BTreeMap::new();
            let mut shared_sent = 0u64;
            let mut shared_received = Vec::new();

            let mut take = |flushes: Vec<Flush>,
                            written: &BTreeMap<&str, BTreeMap<Uuid, HlcTime>>,
                            shared_received: &mut Vec<u64>| {
                for flush in flushes {
                    match flush {
                        Flush::State { model, since, rows } => {
                            prop_assert!(!rows.is_empty());
                            prop_assert!(rows.len() <= max_rows);
                            prop_assert!(rows.windows(2).all(|pair| pair[0].id < pair[1].id));
                            let receiver = receivers.entry(model.clone()).or_default();
                            prop_assert_eq!(since, receiver.mark, "since continues the chain");
                            let newest_written = &written[model.as_str()];
                            for row in &rows {
                                prop_assert!(Some(row.version) > since);
                                prop_assert_eq!(Some(&row.version), newest_written.get(&row.id));
                                receiver.rows.insert(row.id, row.version);
                            }
                            let newest = rows.iter().map(|row| row.version).max().unwrap();
                            receiver.mark = Some(newest);
                            receiver.ranges.push((since, newest));
                        }
                        Flush::Shared { changes } => {
                            prop_assert!(!changes.is_empty());
                            prop_assert!(changes.len() <= max_rows);
                            shared_received.extend(changes.iter().map(|change| change.seq));
                        }
                    }
                }
                Ok(())
            };

            for step in steps {
                match step {
                    Step::Advance(ms) => now += Duration::from_millis(ms),
                    Step::Write(model, ids) => {
                        let model = models[model];
                        let since = owner_mark.get(model).copied();
                        let rows: Vec<StateRow> = ids
                            .into_iter()
                            .map(|id| {
                                clock += 1;
                                row(id, clock)
                            })
                            .collect();
                        for row in &rows {
                            written.entry(model).or_default().insert(row.id, row.version);
                        }
                        owner_mark.insert(model, version(clock));
                        batcher.push_state(model, since, rows, now);
                    }
                    Step::Shared(count) => {
                        let changes = (0..count)
                            .map(|_| {
                                shared_sent += 1;
                                change(shared_sent)
                            })
                            .collect();
                        batcher.push_shared(changes, now);
                    }
                    Step::Poll => {
                        take(batcher.poll(now), &written, &mut shared_received)?;
                        // Nothing due is left behind.
                        prop_assert!(batcher.next_deadline().is_none_or(|deadline| deadline > now));
                    }
                    Step::FlushAll => {
                        take(batcher.flush_all(), &written, &mut shared_received)?;
                        prop_assert_eq!(batcher.pending_rows(), 0);
                    }
                }
            }
            take(batcher.flush_all(), &written, &mut shared_received)?;
            prop_assert_eq!(batcher.pending_rows(), 0);
            prop_assert_eq!(batcher.next_deadline(), None);

            for (model, newest) in &written {
                let receiver = &receivers[*model];
                prop_assert_eq!(&receiver.rows, newest);
                prop_assert_eq!(receiver.mark, owner_mark.get(model).copied());
                // Each row's newest version lies inside the one chunk that carried it: a receiver
                // that raised its mark past it really holds it.
                for version in newest.values() {
                    let containing = receiver
                        .ranges
                        .iter()
                        .filter(|(since, end)| Some(*version) > *since && version <= end)
                        .count();
                    prop_assert_eq!(containing, 1);
                }
            }
            prop_assert_eq!(shared_received, (1..=shared_sent).collect::<Vec<u64>>());
        }
    }
}

//! One device of the deterministic mode: a durable part (what its library file would hold; it
//! survives a crash) and a volatile part (what its engine holds in memory; a crash loses it), and
//! the sync flows driven through the sans-IO cores.
//!
//! The flows follow the engine's: local writes are stamped by the HLC, applied, logged and handed
//! to the [`Batcher`]; flushes go to every connected peer and wait in the [`RetryQueue`] for an
//! ack; receivers merge shared changes into [`RecordState`] registers, apply device-owned rows
//! through [`decide`], advance watermarks ([`advance_contiguous`], batches' `since`) and ack;
//! heartbeats carry watermarks (which count as acknowledgements for pruning, as in the engine),
//! and a peer that holds more is pulled from page by page ([`shared_needs`], [`state_needs`]);
//! the log is pruned by [`plan_prune`]. A joining device drives the backfill state machine
//! ([`lsync_backfill::Backfill`], see [`backfill`]).

mod backfill;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::time::{Duration, Instant};

use lsync_backfill::{Checkpoint, OwnRowsBarrier, Phase, ResyncRequest, Scope};
use lsync_hlc::{DeviceId, Hlc, HlcConfig, HlcState, HlcTime, Resume};
use lsync_node::core::batcher::{Batcher, Flush};
use lsync_node::core::retry::{Coverage, RetryQueue};
use lsync_peer_log::{OriginLog, PrunePeer, RetentionPolicy, plan_prune};
use lsync_protocol::{
    Ack, Heartbeat, Message, OriginSeq, SharedBatch, SharedCatchUpRequest, SharedCatchUpResponse,
    SharedChange, SharedOp, StateBatch, StateCatchUpRequest, StateCursor, StateMark, StateOp,
    StatePage, StateRow, Value, Watermarks,
};
use lsync_shared_sync::RecordState;
use lsync_state_sync::{
    Current, Decision, TombstoneGroup, comparison_mark, decide, plan_tombstone_gc,
};
use lsync_transport::{MemoryNetwork, SendOutcome};
use lsync_watermark::{CatchUpStep, SharedProgress, StateProgress, advance_contiguous};
use uuid::Uuid;

use super::trace::{Event, Trace};

/// The shared model every simulated shared record belongs to.
pub(super) const SHARED_MODEL: &str = "tags";
/// The device-owned model every simulated row belongs to.
pub(super) const STATE_MODEL: &str = "entries";
/// Wall time at the start of every run: 2023-11-14, a plausible present.
pub(super) const EPOCH_MS: u64 = 1_700_000_000_000;

/// Engine settings in virtual time, scaled down from the engine's defaults so that a run of a few
/// thousand steps sees many windows, heartbeats, timeouts and prunes.
pub(super) mod tuning {
    use std::time::Duration;

    /// Batching window (engine default 100 ms).
    pub(in crate::det) const BATCH_WINDOW: Duration = Duration::from_millis(20);
    /// Rows per batch before an early flush and chunking (engine default 5,000): small, so that
    /// chunked flushes with chained `since` happen often.
    pub(in crate::det) const MAX_BATCH_ROWS: usize = 8;
    /// Heartbeat interval (engine default 5 s).
    pub(in crate::det) const HEARTBEAT: Duration = Duration::from_millis(250);
    /// How long a catch-up request may wait for its response before the pull is abandoned and
    /// left to the next heartbeat (engine default 10 s).
    pub(in crate::det) const REQUEST_TIMEOUT: Duration = Duration::from_millis(600);
    /// Prune interval (engine default 30 s).
    pub(in crate::det) const PRUNE_INTERVAL: Duration = Duration::from_millis(300);
    /// Changes or rows per catch-up page (engine default 5,000): small, so pulls take many pages.
    pub(in crate::det) const PAGE_LIMIT: u32 = 16;
    /// Records or rows per backfill page (engine default 5,000): small, so a joining device's
    /// backfill takes several pages per step and crashes, partitions and losses hit it mid-step.
    pub(in crate::det) const BACKFILL_PAGE: u32 = 7;
    /// Whether a backfill page of rows carries the owner's tombstones too, in key order with its
    /// live rows, as the engine's `rows_by_key` does. `false` models the engine before that fix:
    /// a backfilled copy holds no tombstone of what was deleted below its marks, a device behind
    /// it that catches up from it never learns of those deletes and keeps the deleted rows for
    /// good ("Found by the simulator" in `docs/simulator.md`; 18 of seeds 0–999 fail with
    /// "mark … rose … without row …").
    pub(in crate::det) const BACKFILL_TOMBSTONES: bool = true;
    /// First delay after a failed backfill request, doubled per failure in a row up to
    /// [`BACKFILL_BACKOFF_MAX`] (the engine's: 100 ms doubling up to `retry_max`).
    pub(in crate::det) const BACKFILL_BACKOFF: Duration = Duration::from_millis(25);
    /// The log entries kept per origin with the `retention` fault (engine default 100,000; the
    /// real mode's 200): a device away for a few hundred milliseconds is left behind.
    pub(in crate::det) const RETENTION_ENTRIES: u64 = 12;
    /// How long a tombstone is kept with the `retention` fault (engine default 30 days; the
    /// real mode's 2 s), by its version's wall time on this device's clock.
    pub(in crate::det) const TOMBSTONE_RETENTION_MS: u64 = 400;
    /// The longest delay between backfill attempts.
    pub(in crate::det) const BACKFILL_BACKOFF_MAX: Duration = Duration::from_millis(400);

    /// Retry settings (engine defaults 5 s, 200 ms, 30 s, 8 attempts, 1,024 entries).
    pub(in crate::det) fn retry() -> lsync_node::core::retry::RetryConfig {
        lsync_node::core::retry::RetryConfig {
            ack_timeout: Duration::from_millis(150),
            base: Duration::from_millis(50),
            max: Duration::from_millis(400),
            max_attempts: 3,
            capacity: 256,
        }
    }
}

/// What travels between simulated devices: the engine's messages, with request correlation.
#[derive(Debug, Clone)]
pub(super) enum Wire {
    /// A one-way message (batches, acks, heartbeats).
    OneWay(Message),
    /// A request awaiting exactly one response.
    Request(u64, Message),
    /// The response to request `id`.
    Response(u64, Message),
}

/// One device-owned row as held: a live row or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Held {
    /// Its owner.
    pub(super) owner: DeviceId,
    /// The owner's version of it.
    pub(super) version: HlcTime,
    /// Its value; `None` for a tombstone.
    pub(super) value: Option<Value>,
}

impl Held {
    fn current(&self) -> Current {
        match self.value {
            Some(_) => Current::Row { owner: self.owner, version: self.version },
            None => Current::Tombstone { owner: self.owner, version: self.version },
        }
    }

    fn to_row(&self, id: Uuid) -> StateRow {
        let op = match &self.value {
            Some(value) => StateOp::Upsert(vec![value.clone()]),
            None => StateOp::Delete,
        };
        StateRow { id, version: self.version, op }
    }
}

/// What a library file holds: it survives a crash (and a backup copies it).
#[derive(Debug, Default, Clone)]
pub(super) struct Durable {
    /// The last persisted HLC stamp (the resume point).
    pub(super) clock: Option<Hlc>,
    /// Every incarnation of this device's (the engine's `sync_incarnations`): each run of the
    /// engine numbers its shared changes under a new origin, so a copy restored or re-created
    /// never reuses an (origin, seq) for another change. With each, the write count it ended at
    /// (`None`: still running), as the engine's `last_generation`.
    pub(super) incarnations: BTreeMap<DeviceId, Option<u64>>,
    /// The file's write count (the engine's `sync_meta` generation): every stamp the clock
    /// persists counts one write.
    pub(super) generation: u64,
    /// Per peer, what it last announced of its copy: its incarnation and write count
    /// (`sync_peers.seen_*`), told back to it in watermark requests and answers.
    pub(super) seen: BTreeMap<DeviceId, OriginSeq>,
    /// The copy's epoch (the engine's `Identity::epoch`): new when the copy is re-created.
    pub(super) epoch: u64,
    /// The epoch each peer last told: a new one resets what is remembered of it (its acks).
    pub(super) peer_epochs: BTreeMap<DeviceId, u64>,
    /// Shared records' registers.
    pub(super) records: BTreeMap<Uuid, RecordState>,
    /// The peer log, by (origin, seq).
    pub(super) log: BTreeMap<(DeviceId, u64), SharedChange>,
    /// Contiguous shared watermarks.
    pub(super) shared: SharedProgress,
    /// Device-owned rows and tombstones.
    pub(super) rows: BTreeMap<Uuid, Held>,
    /// Device-owned watermarks.
    pub(super) state: StateProgress,
    /// Per (owner, model), the newest deletion this copy may no longer remember (the engine's
    /// `sync_collected_state`): raised by tombstone collection and by backfill steps.
    pub(super) collected: StateProgress,
    /// Shared acks received, by peer.
    pub(super) acks: BTreeMap<DeviceId, SharedProgress>,
    /// Device-owned acks received, by peer (they decide which tombstones may go).
    pub(super) state_acks: BTreeMap<DeviceId, StateProgress>,
    /// Per origin, the log was pruned through this sequence number.
    pub(super) pruned: BTreeMap<DeviceId, u64>,
    /// Peers a retention cap left behind (the engine's `sync_peers.needs_resync`): not counted
    /// for pruning until they acknowledged everything this copy no longer keeps.
    pub(super) left_behind: BTreeSet<DeviceId>,
    /// Per origin, the changes a backfill's snapshot pages covered (the shared marks raised when
    /// its last shared step ended): never held in the log here.
    pub(super) snapshot_base: BTreeMap<DeviceId, u64>,
    /// The backfill checkpoint, as `lsync_backfill::sql` stores it in the library file: `None`
    /// for a copy that founded the library (complete from the start, as the engine reads a
    /// missing checkpoint); a joining copy's from `Uninitialized` on. Written with every page it
    /// records, in the same handler (the engine's one transaction per page).
    pub(super) backfill: Option<Checkpoint>,
    /// Instrumentation, never read by the flows: every (origin, seq) ever applied here, so the
    /// checker can tell a watermark that claims a change never applied.
    pub(super) applied: BTreeMap<DeviceId, BTreeSet<u64>>,
}

impl Durable {
    /// Whether this copy is complete: from the start, or once its backfill reached `Ready`.
    pub(super) fn ready(&self) -> bool {
        self.backfill.as_ref().is_none_or(|checkpoint| checkpoint.phase == Phase::Ready)
    }

    /// Whether it may serve a backfill (what its watermarks say as `ready`).
    pub(super) fn serves(&self) -> bool {
        self.backfill.as_ref().is_none_or(Checkpoint::serves)
    }

    /// Raises `origin`'s contiguous watermark over the changes logged right above it.
    fn advance(&mut self, origin: DeviceId) {
        let current = self.shared.get(origin);
        let present =
            self.log.range((origin, current + 1)..=(origin, u64::MAX)).map(|((_, seq), _)| *seq);
        let advanced = advance_contiguous(current, present);
        self.shared.raise(origin, advanced);
    }
}

/// A catch-up step: what to pull next from a peer.
#[derive(Debug, Clone)]
enum PullStep {
    /// Shared changes of these origins after this device's watermarks.
    Shared { origins: Vec<DeviceId> },
    /// Device-owned rows of `owner` after this device's mark, up to the peer's mark `target`.
    State { owner: DeviceId, target: HlcTime, after: Option<StateCursor> },
    /// All rows of `owner` in key order after `after`, compared with this device's: the peer
    /// forgot deletions above this device's mark (`forgotten`), as the engine's `compare_rows`.
    Compare { owner: DeviceId, target: HlcTime, forgotten: HlcTime, after: Option<Uuid> },
}

/// A catch-up from one peer in progress.
#[derive(Debug)]
struct Pull {
    request: u64,
    deadline: Duration,
    current: PullStep,
    rest: Vec<PullStep>,
    /// Where it comes from and what it found so far.
    meta: PullMeta,
    /// No request is out: the step waits for another pull's step over rows to end (the
    /// engine's `LibraryInner::comparing` lock, see [`Device::rows_busy`]).
    waiting: bool,
}

/// What a catch-up carries from page to page.
#[derive(Debug, Clone, Copy)]
struct PullMeta {
    /// The catch-up that ends a backfill (`Command::CatchUp`): its end makes the copy ready.
    for_backfill: bool,
    /// Backfills completed when it started: a resync it asks for is stale once one ended since.
    completed: u64,
    /// The peer reported changes this device lacks as pruned: at the end, a resync of the
    /// shared records from snapshots is asked for (as the engine's peer actor does).
    pruned: bool,
    /// Planned from the answer to this device's watermark request while the own-rows barrier
    /// waits for the peer: its end confirms the peer (this device then holds what the peer
    /// holds of its rows), as the engine's catch-up does.
    confirms: bool,
}

/// What the engine holds in memory: a crash loses it.
#[derive(Debug)]
struct Volatile {
    clock: HlcState,
    /// This run's incarnation: the origin of the shared changes it writes (the engine's
    /// `Identity::origin`, new at every open).
    origin: DeviceId,
    /// The last sequence number given to one of this run's shared changes.
    own_seq: u64,
    /// After a backfill that brought this device's own rows back: the peers whose answer to a
    /// watermark request is waited for before the barrier ([`OwnRowsBarrier`]).
    barrier: OwnRowsBarrier,
    /// Watermark requests of this device in flight (for the barrier), by request id: the peer
    /// and when the request is given up.
    asked_marks: BTreeMap<u64, (DeviceId, Duration)>,
    /// Ask every connected peer for its watermarks on the next tick (the barrier just started).
    ask_all: bool,
    /// Answers to this device's watermark requests that came while a catch-up from the peer ran:
    /// the catch-up they plan follows it (the engine's actor runs one catch-up after the other).
    answered: BTreeMap<DeviceId, Watermarks>,
    /// Live batches from a peer that arrived while a catch-up from it ran: the engine's peer
    /// actor reads its mailbox only once the catch-up ended, so they wait for it (applied then,
    /// in order; dropped if the peer disconnects, as the actor's mailbox is).
    held_batches: BTreeMap<DeviceId, Vec<Message>>,
    /// A rollback of this copy was found in a handler: it claims none of its rows and serves
    /// none until the backfill stores its next checkpoint (the engine's `inner.serves` set to
    /// false, published again by the backfill actor).
    claims_nothing: bool,
    batcher: Batcher,
    retry: RetryQueue<Message>,
    next_heartbeat: Duration,
    next_prune: Duration,
    pulls: BTreeMap<DeviceId, Pull>,
    /// The backfill driver of a copy with a checkpoint (a joining one): the machine resumed from
    /// the durable checkpoint, what is known of the peers, the request in flight.
    backfill: Option<backfill::Driver>,
}

/// The mark rows are applied against ([`decide`]'s `mark`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Against {
    /// This device's mark of the owner's rows.
    Held,
    /// A comparison's pages: [`comparison_mark`] of this device's mark and the peer's.
    Compared(HlcTime),
    /// A rollback resync's pages of this device's own rows: the mark through which an earlier
    /// rollback resync left them as its source held them, if any
    /// ([`Checkpoint::own_rows_known_through`]), as the engine's backfill applies them.
    Known(Option<HlcTime>),
}

/// Takes out of `held` what waits for peers no catch-up runs from any more.
fn after_pulls<T>(
    held: &mut BTreeMap<DeviceId, T>,
    pulls: &BTreeMap<DeviceId, Pull>,
) -> Vec<(DeviceId, T)> {
    let done: Vec<DeviceId> =
        held.keys().copied().filter(|peer| !pulls.contains_key(peer)).collect();
    done.into_iter().filter_map(|peer| held.remove(&peer).map(|value| (peer, value))).collect()
}

/// Everything a device's handlers reach beyond the device itself.
pub(super) struct Ctx<'a> {
    /// Virtual time since the start of the run.
    pub(super) now: Duration,
    /// The instant virtual time 0 maps to, for the cores that take `Instant`s.
    pub(super) base: Instant,
    /// The wire.
    pub(super) network: &'a mut MemoryNetwork<Wire>,
    /// The event trace.
    pub(super) trace: &'a mut Trace,
    /// Invariant violations found while handling.
    pub(super) violations: &'a mut Vec<String>,
    /// The next request id (one sequence for the whole run).
    pub(super) next_request: &'a mut u64,
    /// Who created each device-owned row (ground truth for the owner-only check).
    pub(super) creators: &'a BTreeMap<Uuid, DeviceId>,
    /// Every device of the run (the paired set; devices never unpair).
    pub(super) devices: &'a [DeviceId],
    /// Counters.
    pub(super) stats: &'a mut Stats,
    /// Whether retention caps are small (`retention`): logs and tombstones go before every
    /// peer had them, and the peers left behind catch up from snapshots and comparisons.
    pub(super) retention: bool,
}

impl Ctx<'_> {
    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn fail(&mut self, message: String) {
        self.violations.push(message);
    }

    /// Hands `wire` to the network; `false` if the link refused it (full).
    fn send(&mut self, from: DeviceId, to: DeviceId, wire: Wire) -> bool {
        let kind = match &wire {
            Wire::OneWay(message) | Wire::Request(_, message) | Wire::Response(_, message) => {
                message.kind()
            }
        };
        let outcome = match wire {
            Wire::Response(..) => self.network.send_response(from, to, wire, self.now),
            _ => self.network.send(from, to, wire, self.now),
        };
        self.trace.record(Event::Send, &[ident(from), ident(to), u64::from(kind)]);
        self.stats.messages += 1;
        outcome != SendOutcome::Full
    }
}

/// Counters a run reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages handed to the network.
    pub messages: u64,
    /// Shared writes made.
    pub shared_writes: u64,
    /// Device-owned writes made.
    pub row_writes: u64,
    /// Writes refused (an update of a record not held, a write to another device's row).
    pub refused: u64,
    /// Remote stamps beyond the drift bound (applied, not adopted by the clock).
    pub skewed: u64,
    /// Batches re-sent by the retry queue.
    pub resent: u64,
    /// Catch-up pages applied.
    pub pages: u64,
    /// Catch-ups abandoned for a lost request or response.
    pub pulls_abandoned: u64,
    /// Log entries pruned.
    pub pruned: u64,
    /// Crashes.
    pub crashes: u64,
    /// Backfills completed by joining devices.
    pub backfills: u64,
    /// Backfill pages applied (each with its checkpoint).
    pub backfill_pages: u64,
    /// Backfills that continued from another peer (`Backfill::rebased`).
    pub backfill_rebases: u64,
    /// Backfills resumed from a persisted checkpoint after a crash mid-backfill.
    pub backfill_resumes: u64,
    /// Backfill requests that failed (timeout, disconnect, refusal).
    pub backfill_failures: u64,
    /// Catch-up requests for an origin the peer no longer held (or never did).
    pub unavailable: u64,
    /// Tombstones collected once every peer acknowledged them.
    pub tombstones_collected: u64,
    /// Received rows at or below the receiver's mark that it did not hold: deleted rows whose
    /// tombstone was collected, arriving late; not applied.
    pub late_rows_refused: u64,
    /// Resyncs started on a copy (a peer pruned changes it lacked: `retention`).
    pub resyncs: u64,
    /// Devices re-created under their identity (`recreate`).
    pub recreates: u64,
    /// Own-rows barriers set after a backfill brought a device's own rows back.
    pub barriers: u64,
    /// Wall clocks jumped a year ahead (`clock-jump`).
    pub clock_jumps: u64,
    /// Devices that stopped reading for a while (`stall`).
    pub stalls: u64,
    /// Devices restored from a backup (`restore`).
    pub restores: u64,
    /// Restores not made: the device's wall clock was behind the stamps it had issued.
    pub restores_skipped: u64,
    /// Rollbacks of a copy found from a peer's watermarks (a restored file; found at open
    /// when the generation file was kept, which is not counted here).
    pub rollbacks: u64,
}

impl Stats {
    /// Adds another run's counters.
    pub fn add(&mut self, other: &Stats) {
        let Stats {
            messages,
            shared_writes,
            row_writes,
            refused,
            skewed,
            resent,
            pages,
            pulls_abandoned,
            pruned,
            crashes,
            backfills,
            backfill_pages,
            backfill_rebases,
            backfill_resumes,
            backfill_failures,
            unavailable,
            tombstones_collected,
            late_rows_refused,
            resyncs,
            recreates,
            barriers,
            clock_jumps,
            stalls,
            restores,
            restores_skipped,
            rollbacks,
        } = *other;
        self.messages += messages;
        self.shared_writes += shared_writes;
        self.row_writes += row_writes;
        self.refused += refused;
        self.skewed += skewed;
        self.resent += resent;
        self.pages += pages;
        self.pulls_abandoned += pulls_abandoned;
        self.pruned += pruned;
        self.crashes += crashes;
        self.backfills += backfills;
        self.backfill_pages += backfill_pages;
        self.backfill_rebases += backfill_rebases;
        self.backfill_resumes += backfill_resumes;
        self.backfill_failures += backfill_failures;
        self.unavailable += unavailable;
        self.tombstones_collected += tombstones_collected;
        self.late_rows_refused += late_rows_refused;
        self.resyncs += resyncs;
        self.recreates += recreates;
        self.barriers += barriers;
        self.clock_jumps += clock_jumps;
        self.stalls += stalls;
        self.restores += restores;
        self.restores_skipped += restores_skipped;
        self.rollbacks += rollbacks;
    }
}

/// A stable number for a device in the trace (its id's first 8 bytes).
pub(super) fn ident(device: DeviceId) -> u64 {
    let bytes = device.as_bytes();
    u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

/// Why a local write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// The record is not held (an update or delete of something never seen or deleted).
    NotFound,
    /// The row belongs to another device.
    NotOwner,
    /// The device is down.
    Down,
}

/// One simulated device.
#[derive(Debug)]
pub(super) struct Device {
    /// Its id.
    pub(super) id: DeviceId,
    /// Its wall clock's offset from true (virtual) time, in ms.
    pub(super) skew_ms: i64,
    /// What survives a crash.
    pub(super) durable: Durable,
    volatile: Option<Volatile>,
    /// Instrumentation: the last stamp its clock produced (over its whole life, restarts
    /// included).
    last_stamp: Option<Hlc>,
    /// The generation file beside the library file (`library.db-generation`) where it differs
    /// from the file's own count: only after a restore that kept it, until the next start reads
    /// it (`Database::open`'s `detect_restore`).
    pub(super) generation_file: Option<u64>,
    /// The copy a backup took of the file (`restore`), with the generation file as it was then.
    pub(super) backup: Option<(Durable, u64)>,
    /// Instrumentation: own-rows barriers set so far (the checker's repair point after a
    /// restore).
    pub(super) barriers_set: u64,
}

impl Device {
    /// A new, running device with nothing stored: a complete copy (`ready`, one of the first
    /// devices) or a joining one that must backfill first.
    pub(super) fn new(id: DeviceId, skew_ms: i64, ready: bool, now: Duration, seed: u64) -> Self {
        let backfill = (!ready).then(Checkpoint::uninitialized);
        let durable = Durable { backfill, ..Durable::default() };
        let mut device = Self {
            id,
            skew_ms,
            durable,
            volatile: None,
            last_stamp: None,
            generation_file: None,
            backup: None,
            barriers_set: 0,
        };
        device.boot(now, seed);
        device
    }

    /// Whether the device is running.
    pub(super) fn is_up(&self) -> bool {
        self.volatile.is_some()
    }

    /// Whether it claims its rows and serves them (what its watermarks say as `ready`): its
    /// checkpoint says so, and no rollback was found since it was stored.
    pub(super) fn serves(&self) -> bool {
        self.durable.serves()
            && !self.volatile.as_ref().is_some_and(|volatile| volatile.claims_nothing)
    }

    /// Whether `theirs` (a peer's watermark request or answer) shows this copy rolled back to an
    /// older file ([`lsync_watermark::copy_rolled_back`]); if so the incarnation it names is
    /// recorded as one of this device's that ended there, so it is acted on once (the engine's
    /// `copy_rolled_back` and `adopt_incarnation`, in one transaction).
    fn copy_rolled_back(&mut self, theirs: &Watermarks) -> bool {
        let (Some(seen), Some(volatile)) = (theirs.seen, self.volatile.as_ref()) else {
            return false;
        };
        let known = self.durable.incarnations.get(&seen.origin).copied();
        let rolled_back = lsync_watermark::copy_rolled_back(volatile.origin, seen, known);
        if rolled_back {
            let end = self.durable.incarnations.entry(seen.origin).or_insert(Some(seen.seq));
            *end = end.map(|last| last.max(seen.seq));
        }
        rolled_back
    }

    /// Whether a peer's answer shows this device lost some of its own shared changes: it holds
    /// more of one of this file's incarnations than the file does (the engine's
    /// `own_rollback`).
    fn lost_own_changes(&self, theirs: &Watermarks) -> Option<u64> {
        theirs
            .shared
            .iter()
            .filter(|progress| self.durable.incarnations.contains_key(&progress.origin))
            .find_map(|progress| {
                lsync_watermark::own_rollback(
                    self.durable.shared.get(progress.origin),
                    progress.seq,
                )
            })
    }

    /// A rollback of this copy was found, told by `peer`: the own-rows barrier waits for the
    /// next resync, the copy claims nothing from now on, and a full resync that deletes what the
    /// peers no longer hold is asked for (the engine's handlers, on a request and on an answer).
    fn rolled_back(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId) {
        let Some(volatile) = self.volatile.as_mut() else { return };
        volatile.barrier.cancel();
        volatile.claims_nothing = true;
        ctx.stats.rollbacks += 1;
        let completed = self.durable.backfill.as_ref().map_or(0, |checkpoint| checkpoint.completed);
        let request = ResyncRequest {
            scope: Scope::Everything,
            delete_missing: true,
            from: Some(peer),
            completed,
        };
        self.request_resync(ctx, request);
    }

    /// Remembers what `peer` announced of its copy ([`lsync_watermark::seen_after`]); returns
    /// what was remembered before.
    fn record_seen(
        &mut self,
        peer: DeviceId,
        theirs: &Watermarks,
        told: bool,
    ) -> Option<OriginSeq> {
        let before = self.durable.seen.get(&peer).copied();
        if let Some(next) = lsync_watermark::seen_after(before, theirs.incarnation, told) {
            self.durable.seen.insert(peer, next);
        }
        before
    }

    /// Starts the engine from the durable state (first start, or restart after a crash).
    pub(super) fn boot(&mut self, now: Duration, retry_seed: u64) {
        let resume = self.durable.clock.map_or(Resume::FirstStart, Resume::After);
        // A new incarnation at every start, drawn from the run's seed.
        let mut draw = lsync_transport::SplitMix64::new(retry_seed ^ 0x0123_4567_89ab_cdef);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&draw.next_u64().to_le_bytes());
        bytes[8..].copy_from_slice(&draw.next_u64().to_le_bytes());
        let origin = DeviceId::from_bytes(bytes);
        // A generation file ahead of the file: restored from an old copy with the file kept
        // beside it (the engine's `detect_restore` and `Library::open`): a new epoch, and a full
        // resync that deletes what the peers no longer hold, scheduled before anything runs.
        if let Some(last) = self.generation_file.take()
            && self.durable.generation < last
        {
            self.durable.epoch = draw.next_u64();
            let mut machine = lsync_backfill::Backfill::new(
                self.durable.backfill.clone().unwrap_or_else(Checkpoint::ready),
            );
            machine.resync(Scope::Everything, true);
            self.durable.backfill = Some(machine.checkpoint().clone());
        }
        // The previous incarnation ended with the file's write count as it is now.
        let writes = self.durable.generation;
        for end in self.durable.incarnations.values_mut() {
            end.get_or_insert(writes);
        }
        self.durable.incarnations.insert(origin, None);
        self.volatile = Some(Volatile {
            clock: HlcState::new(self.id, HlcConfig::default(), resume),
            origin,
            own_seq: 0,
            barrier: OwnRowsBarrier::default(),
            asked_marks: BTreeMap::new(),
            ask_all: false,
            answered: BTreeMap::new(),
            held_batches: BTreeMap::new(),
            claims_nothing: false,
            batcher: Batcher::new(tuning::BATCH_WINDOW, tuning::MAX_BATCH_ROWS),
            retry: RetryQueue::new(tuning::retry(), retry_seed),
            next_heartbeat: now,
            next_prune: now + tuning::PRUNE_INTERVAL,
            pulls: BTreeMap::new(),
            backfill: self.durable.backfill.clone().map(backfill::Driver::new),
        });
    }

    /// Kills the engine: everything volatile is lost.
    pub(super) fn crash(&mut self) {
        self.volatile = None;
    }

    /// The `recreate` fault: the library file is wiped and the device joins again under its
    /// identity, as `Library::join` with existing keys: a new epoch, no incarnation known, a
    /// backfill from the start; then it runs.
    pub(super) fn recreate(&mut self, now: Duration, seed: u64) {
        let epoch = self.durable.epoch + 1;
        self.durable =
            Durable { backfill: Some(Checkpoint::uninitialized()), epoch, ..Durable::default() };
        // A new file: its clock starts afresh (the checker's record of stamps too).
        self.last_stamp = None;
        self.boot(now, seed);
    }

    /// Whether this device's wall clock now is behind the last stamp its clock produced: a copy
    /// restored now would stamp its next writes below ones it lost.
    pub(super) fn clock_behind_its_stamps(&self, now: Duration) -> bool {
        self.last_stamp.is_some_and(|last| self.wall_ms(now) <= last.time().physical_ms())
    }

    /// The file was put back from a backup: the clock resumes from the stamp it holds (the
    /// checker's record of stamps too).
    pub(super) fn restored(&mut self) {
        self.last_stamp = self.durable.clock;
    }

    /// This device's wall clock at virtual time `now`.
    fn wall_ms(&self, now: Duration) -> u64 {
        let true_ms = EPOCH_MS.saturating_add(u64::try_from(now.as_millis()).unwrap_or(u64::MAX));
        true_ms.saturating_add_signed(self.skew_ms)
    }

    /// Checks and records a stamp the clock just produced, and persists it.
    fn observe_stamp(&mut self, ctx: &mut Ctx<'_>, stamp: Hlc) {
        if let Some(last) = self.last_stamp
            && stamp <= last
        {
            ctx.fail(format!("HLC of {} went from {last} to {stamp}", self.id));
        }
        self.last_stamp = Some(stamp);
        self.durable.clock = Some(stamp);
        self.durable.generation += 1;
    }

    /// A local stamp, or `None` when down or the clock is exhausted.
    fn tick(&mut self, ctx: &mut Ctx<'_>) -> Option<Hlc> {
        let wall = self.wall_ms(ctx.now);
        let stamp = self.volatile.as_mut()?.clock.tick(wall).ok()?;
        self.observe_stamp(ctx, stamp);
        Some(stamp)
    }

    /// Observes the peer's marks of this device's own rows with the clock (the engine's
    /// `observe_own_marks`): a copy restored from an old file stamps its next writes after what
    /// its peers hold of it. Beyond the drift bound the clock stays.
    pub(super) fn observe_own_marks(&mut self, ctx: &mut Ctx<'_>, theirs: &Watermarks) {
        let me = self.id;
        let newest =
            theirs.state.iter().filter(|mark| mark.owner == me).map(|mark| mark.version).max();
        let wall = self.wall_ms(ctx.now);
        let Some(newest) = newest else { return };
        let Some(volatile) = self.volatile.as_mut() else { return };
        if let Ok(stamp) = volatile.clock.receive(Hlc::new(newest, me), wall) {
            self.observe_stamp(ctx, stamp);
        }
    }

    /// Observes a remote stamp with the clock.
    fn receive_stamp(&mut self, ctx: &mut Ctx<'_>, remote: Hlc) {
        let wall = self.wall_ms(ctx.now);
        let Some(volatile) = self.volatile.as_mut() else { return };
        match volatile.clock.receive(remote, wall) {
            Ok(stamp) => self.observe_stamp(ctx, stamp),
            Err(_) => ctx.stats.skewed += 1,
        }
    }

    /// Writes a shared change of record `record` locally; returns its stamp.
    pub(super) fn write_shared(
        &mut self,
        ctx: &mut Ctx<'_>,
        record: Uuid,
        op: SharedOp,
    ) -> Result<SharedChange, Refused> {
        if !self.is_up() {
            return Err(Refused::Down);
        }
        let exists = self.durable.records.get(&record).is_some_and(RecordState::exists);
        if !matches!(op, SharedOp::Insert(_)) && !exists {
            ctx.stats.refused += 1;
            return Err(Refused::NotFound);
        }
        let stamp = self.tick(ctx).ok_or(Refused::Down)?;
        let (origin, seq) = {
            let volatile = self.volatile.as_mut().ok_or(Refused::Down)?;
            volatile.own_seq += 1;
            (volatile.origin, volatile.own_seq)
        };
        // As the engine's `write_local`: after every stamp the record holds.
        let shown = self.durable.records.get(&record);
        let time = lsync_shared_sync::local_stamp_time(stamp.time(), shown);
        // An edit made after the device showed a value wins over it, whatever the clocks say
        // (a peer's clock a year ahead stamped what is shown).
        if let Some(seen) = shown.and_then(RecordState::last_stamp)
            && Hlc::new(time, origin) <= seen
        {
            ctx.fail(format!(
                "{} edits {record} at {time:?}, not after the value it shows ({seen})",
                self.id
            ));
        }
        let change = SharedChange { origin, seq, time, model: SHARED_MODEL.to_owned(), record, op };
        self.apply_changes(ctx, std::slice::from_ref(&change));
        let now = ctx.instant();
        if let Some(volatile) = self.volatile.as_mut() {
            volatile.batcher.push_shared(vec![change.clone()], now);
        }
        ctx.stats.shared_writes += 1;
        Ok(change)
    }

    /// Writes this device's rows in one transaction (each `(id, None)` deletes its row), every
    /// row stamped with its own tick; returns the rows as written. A write touching a row of
    /// another device is refused whole.
    pub(super) fn write_rows(
        &mut self,
        ctx: &mut Ctx<'_>,
        edits: Vec<(Uuid, Option<Value>)>,
    ) -> Result<Vec<StateRow>, Refused> {
        if !self.is_up() {
            return Err(Refused::Down);
        }
        let foreign = |(id, _): &(Uuid, Option<Value>)| {
            self.durable.rows.get(id).is_some_and(|held| held.owner != self.id)
        };
        if edits.iter().any(foreign) {
            ctx.stats.refused += 1;
            return Err(Refused::NotOwner);
        }
        let since = self.durable.state.get(self.id, STATE_MODEL);
        let mut rows = Vec::with_capacity(edits.len());
        for (id, value) in edits {
            let stamp = self.tick(ctx).ok_or(Refused::Down)?;
            // As the engine's `write_local`: after the owner's own mark.
            let version = lsync_state_sync::local_version(
                stamp.time(),
                self.durable.state.get(self.id, STATE_MODEL),
            );
            let held = Held { owner: self.id, version, value };
            rows.push(held.to_row(id));
            self.durable.rows.insert(id, held);
            self.durable.state.raise(self.id, STATE_MODEL, version);
        }
        let now = ctx.instant();
        let claimed = self.serves();
        if let Some(volatile) = self.volatile.as_mut() {
            // As the engine's `write_rows`: a copy that may not serve claims none of its rows.
            if claimed {
                volatile.batcher.push_state(STATE_MODEL, since, rows.clone(), now);
            } else {
                volatile.batcher.push_state_unclaimed(STATE_MODEL, rows.clone(), now);
            }
        }
        ctx.stats.row_writes += u64::try_from(rows.len()).unwrap_or(0);
        Ok(rows)
    }

    /// Everything time-driven: flushes, re-sends, heartbeats, prunes, pull timeouts.
    pub(super) fn on_tick(&mut self, ctx: &mut Ctx<'_>, connected: &[DeviceId]) {
        let now = ctx.instant();
        let Some(volatile) = self.volatile.as_mut() else { return };
        for flush in volatile.batcher.poll(now) {
            self.push(ctx, connected, flush);
        }
        self.resend_due(ctx);
        self.drive_backfill(ctx, connected);
        self.heartbeat_if_due(ctx, connected);
        self.prune_if_due(ctx);
        self.expire_pulls(ctx);
        self.resume_waiting_pulls(ctx);
        if let Some(volatile) = self.volatile.as_mut() {
            volatile.asked_marks.retain(|_, (_, deadline)| *deadline > ctx.now);
        }
        // Answers that came during a catch-up from their peer, once it ended.
        let answered = self
            .volatile
            .as_mut()
            .map_or_else(Vec::new, |volatile| after_pulls(&mut volatile.answered, &volatile.pulls));
        for (peer, theirs) in answered {
            self.confirming_pull(ctx, peer, &theirs);
        }
        // The batches held while a catch-up from their sender ran, once it ended.
        let released = self.volatile.as_mut().map_or_else(Vec::new, |volatile| {
            after_pulls(&mut volatile.held_batches, &volatile.pulls)
        });
        for (peer, batches) in released {
            for message in batches {
                self.on_wire(ctx, peer, Wire::OneWay(message));
            }
        }
        if let Some(volatile) = self.volatile.as_mut()
            && std::mem::take(&mut volatile.ask_all)
        {
            let waiting: Vec<DeviceId> = volatile
                .barrier
                .waiting()
                .map(|waiting| waiting.iter().copied().collect())
                .unwrap_or_default();
            for peer in waiting.into_iter().filter(|peer| connected.contains(peer)) {
                self.ask_marks(ctx, peer);
            }
        }
    }

    /// Sends one flush to every connected peer and waits for their acks.
    fn push(&mut self, ctx: &mut Ctx<'_>, connected: &[DeviceId], flush: Flush) {
        let (message, covers) = match flush {
            Flush::State { model, since, rows } => {
                let Some(version) = rows.iter().map(|row| row.version).max() else { return };
                let covers = Coverage::State { owner: self.id, model: model.clone(), version };
                let batch = StateBatch {
                    owner: self.id,
                    model,
                    columns: vec!["value".into()],
                    rows,
                    since,
                };
                (Message::StateBatch(batch), covers)
            }
            Flush::Shared { changes } => {
                // One run's changes: one origin (its incarnation).
                let Some(last) = changes.iter().max_by_key(|change| change.seq) else { return };
                let covers = Coverage::Shared { origin: last.origin, seq: last.seq };
                (Message::SharedBatch(SharedBatch { changes }), covers)
            }
        };
        let now = ctx.instant();
        for peer in connected {
            let sent = ctx.send(self.id, *peer, Wire::OneWay(message.clone()));
            let Some(volatile) = self.volatile.as_mut() else { return };
            if let Ok(entry) = volatile.retry.sent(*peer, message.clone(), covers.clone(), now)
                && !sent
            {
                volatile.retry.send_failed(entry, now);
            }
        }
    }

    fn resend_due(&mut self, ctx: &mut Ctx<'_>) {
        let now = ctx.instant();
        let Some(volatile) = self.volatile.as_mut() else { return };
        let due = volatile.retry.poll_due(now);
        for (entry, peer, message) in due.resend {
            ctx.stats.resent += 1;
            if !ctx.send(self.id, peer, Wire::OneWay(message))
                && let Some(volatile) = self.volatile.as_mut()
            {
                volatile.retry.send_failed(entry, now);
            }
        }
    }

    /// What this device tells its peers, as the engine does ([`lsync_watermark::told`]).
    fn watermarks(&self) -> Watermarks {
        lsync_watermark::told(Watermarks {
            library: lsync_protocol::LibraryId(Uuid::nil()),
            device: self.id,
            epoch: lsync_protocol::Epoch(self.durable.epoch),
            shared: self.durable.shared.to_wire(),
            state: self.durable.state.to_wire(),
            ready: self.serves(),
            resync: false,
            collected: self.durable.collected.to_wire(),
            incarnation: self.volatile.as_ref().map(|volatile| OriginSeq {
                origin: volatile.origin,
                seq: self.durable.generation,
            }),
            seen: None,
            wall_ms: None,
        })
    }

    /// The watermarks of a request to `peer`: with what this device heard of the peer's copy,
    /// so that a peer rolled back to an older file finds out before it answers.
    pub(super) fn request_marks(&self, peer: DeviceId) -> Watermarks {
        Watermarks { seen: self.durable.seen.get(&peer).copied(), ..self.watermarks() }
    }

    fn heartbeat_if_due(&mut self, ctx: &mut Ctx<'_>, connected: &[DeviceId]) {
        let Some(volatile) = self.volatile.as_mut() else { return };
        if ctx.now < volatile.next_heartbeat {
            return;
        }
        volatile.next_heartbeat = ctx.now + tuning::HEARTBEAT;
        for peer in connected {
            self.send_heartbeat(ctx, *peer);
        }
    }

    fn send_heartbeat(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId) {
        let heartbeat = Heartbeat { nonce: 0, watermarks: Some(self.watermarks()) };
        ctx.send(self.id, peer, Wire::OneWay(Message::Heartbeat(heartbeat)));
    }

    /// A peer connected: exchange watermarks at once (each side then pulls what it lacks).
    pub(super) fn on_connect(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId) {
        if self.is_up() {
            self.send_heartbeat(ctx, peer);
            // The engine's peer actor catches up at once on connect, from the answer to a
            // watermark request of its own (which tells what the peer heard of this copy).
            self.ask_marks(ctx, peer);
        }
    }

    /// Asks `peer` for its watermarks: its answer tells what it heard of this copy, which the
    /// barrier waits for (heartbeats confirm nothing, as in the engine).
    fn ask_marks(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId) {
        let request = *ctx.next_request;
        *ctx.next_request += 1;
        let watermarks = self.request_marks(peer);
        if let Some(volatile) = self.volatile.as_mut() {
            volatile.asked_marks.insert(request, (peer, ctx.now + tuning::REQUEST_TIMEOUT));
        }
        ctx.send(self.id, peer, Wire::Request(request, Message::WatermarksRequest(watermarks)));
    }

    /// A backfill that brought this device's own rows back ended: the barrier waits for every
    /// paired peer ([`Checkpoint::brought_back_own_rows`]).
    pub(super) fn start_barrier(&mut self, ctx: &mut Ctx<'_>) {
        let me = self.id;
        let peers: Vec<DeviceId> = ctx.devices.iter().copied().filter(|peer| *peer != me).collect();
        let Some(volatile) = self.volatile.as_mut() else { return };
        if volatile.barrier.start(peers) {
            self.own_rows_barrier(ctx);
        } else if let Some(volatile) = self.volatile.as_mut() {
            volatile.ask_all = true;
        }
    }

    /// The catch-up an answer to this device's watermark request plans; its end confirms the
    /// peer for the barrier (at once if there is nothing to pull).
    fn confirming_pull(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId, theirs: &Watermarks) {
        if !self.durable.ready() {
            return;
        }
        if self.begin_pull(ctx, peer, theirs, false) {
            if let Some(pull) =
                self.volatile.as_mut().and_then(|volatile| volatile.pulls.get_mut(&peer))
            {
                pull.meta.confirms = true;
            }
        } else {
            self.barrier_confirmed(ctx, peer);
        }
    }

    /// `peer` answered a watermark request of this device's and it holds what `peer` holds: the
    /// barrier fires once that was the last peer waited for.
    fn barrier_confirmed(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId) {
        let due = self.volatile.as_mut().is_some_and(|volatile| volatile.barrier.confirmed(peer));
        if due {
            self.own_rows_barrier(ctx);
        }
    }

    /// Every paired peer told what it heard of this copy: raise the own mark and own collected
    /// mark to a fresh version, so that every peer compares this device's rows once (the
    /// engine's `own_rows_barrier`).
    fn own_rows_barrier(&mut self, ctx: &mut Ctx<'_>) {
        let Some(stamp) = self.tick(ctx) else { return };
        let mark = self.durable.state.get(self.id, STATE_MODEL);
        if mark.is_none() {
            return;
        }
        let version = lsync_state_sync::local_version(stamp.time(), mark);
        self.durable.state.raise(self.id, STATE_MODEL, version);
        self.durable.collected.raise(self.id, STATE_MODEL, version);
        ctx.stats.barriers += 1;
        self.barriers_set += 1;
    }

    /// A peer disconnected: forget what waits for it; a backfill served by it must rebase.
    pub(super) fn on_disconnect(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId) {
        if let Some(volatile) = self.volatile.as_mut() {
            volatile.retry.peer_offline(peer);
            volatile.pulls.remove(&peer);
            volatile.held_batches.remove(&peer);
            volatile.answered.remove(&peer);
        }
        self.backfill_peer_offline(ctx, peer);
    }

    fn prune_if_due(&mut self, ctx: &mut Ctx<'_>) {
        let Some(volatile) = self.volatile.as_mut() else { return };
        if ctx.now < volatile.next_prune {
            return;
        }
        volatile.next_prune = ctx.now + tuning::PRUNE_INTERVAL;
        let mut logs: BTreeMap<DeviceId, OriginLog> = BTreeMap::new();
        for (origin, seq) in self.durable.log.keys() {
            logs.entry(*origin).and_modify(|log| log.last_seq = *seq).or_insert(OriginLog {
                origin: *origin,
                first_seq: *seq,
                last_seq: *seq,
                aged_out_through: None,
            });
        }
        let logs: Vec<OriginLog> = logs.into_values().collect();
        let peers: Vec<PrunePeer> = ctx
            .devices
            .iter()
            .filter(|device| **device != self.id)
            .map(|device| PrunePeer {
                device: *device,
                needs_resync: self.durable.left_behind.contains(device),
            })
            .collect();
        // Without the retention fault no cap: a simulated run is far shorter than any cap.
        let policy = if ctx.retention {
            RetentionPolicy {
                max_age: Duration::MAX,
                max_entries_per_origin: tuning::RETENTION_ENTRIES,
            }
        } else {
            RetentionPolicy { max_age: Duration::MAX, max_entries_per_origin: u64::MAX }
        };
        let plan = plan_prune(&logs, &self.durable.shared, &peers, &self.durable.acks, &policy);
        for through in plan.prune_through {
            for peer in &peers {
                let acked =
                    self.durable.acks.get(&peer.device).map_or(0, |acks| acks.get(through.origin));
                // Only a retention cap prunes what a peer lacks, and the peer is left behind.
                let left = peer.needs_resync || plan.resync.contains(&peer.device);
                if through.seq > acked && !left {
                    ctx.fail(format!(
                        "{} prunes {} through {}; {} acked only {acked}",
                        self.id, through.origin, through.seq, peer.device
                    ));
                }
            }
            let keep = self.durable.log.split_off(&(through.origin, through.seq + 1));
            let before = self.durable.log.len();
            self.durable.log.retain(|(origin, _), _| *origin != through.origin);
            ctx.stats.pruned += u64::try_from(before - self.durable.log.len()).unwrap_or(0);
            self.durable.log.extend(keep);
            let pruned = self.durable.pruned.entry(through.origin).or_insert(0);
            *pruned = (*pruned).max(through.seq);
            ctx.trace.record(Event::Prune, &[ident(self.id), ident(through.origin), through.seq]);
        }
        self.durable.left_behind.extend(plan.resync.iter().copied());
        self.collect_tombstones(ctx, &peers);
    }

    /// Drops the tombstones every paired peer has acknowledged (its state ack for the owner is at
    /// or above them), as the engine's pruner does.
    fn collect_tombstones(&mut self, ctx: &mut Ctx<'_>, peers: &[PrunePeer]) {
        let mut newest: BTreeMap<DeviceId, HlcTime> = BTreeMap::new();
        for held in self.durable.rows.values().filter(|held| held.value.is_none()) {
            let slot = newest.entry(held.owner).or_insert(held.version);
            *slot = (*slot).max(held.version);
        }
        // With the retention fault, tombstones older than the cap go whoever lacks them (their
        // age by the version's wall time on this device's clock; the engine's by when it stored
        // them).
        let cutoff = self.wall_ms(ctx.now).saturating_sub(tuning::TOMBSTONE_RETENTION_MS);
        let mut aged: BTreeMap<DeviceId, HlcTime> = BTreeMap::new();
        for held in self.durable.rows.values().filter(|held| held.value.is_none()) {
            if ctx.retention && held.version.physical_ms() < cutoff {
                let slot = aged.entry(held.owner).or_insert(held.version);
                *slot = (*slot).max(held.version);
            }
        }
        let groups: Vec<TombstoneGroup> = newest
            .into_iter()
            .map(|(owner, newest)| TombstoneGroup {
                owner,
                model: STATE_MODEL.to_owned(),
                newest,
                aged_newest: aged.get(&owner).copied(),
            })
            .collect();
        let left_behind = &self.durable.left_behind;
        let peers: Vec<(DeviceId, bool)> =
            peers.iter().map(|peer| (peer.device, left_behind.contains(&peer.device))).collect();
        // Never above this device's own mark (the core caps it there): above it a late row could
        // still be older than a tombstone this device holds, and only the tombstone says it is dead.
        let gc = plan_tombstone_gc(&groups, &peers, &self.durable.state_acks, &self.durable.state);
        for (owner, model, through) in gc.collect_through {
            self.durable.collected.raise(owner, &model, through);
            let before = self.durable.rows.len();
            self.durable.rows.retain(|_, held| {
                held.value.is_some() || held.owner != owner || held.version > through
            });
            ctx.stats.tombstones_collected +=
                u64::try_from(before - self.durable.rows.len()).unwrap_or(0);
        }
        self.durable.left_behind.extend(gc.resync.iter().copied());
        // A peer left behind counts again once it acknowledged everything this copy no longer
        // keeps, as the engine's pruner decides (`watermark::caught_up_again`).
        let mut pruned_through = SharedProgress::default();
        for (origin, seq) in self.durable.shared.iter() {
            let first_held = self
                .durable
                .log
                .range((origin, 0)..=(origin, u64::MAX))
                .next()
                .map(|(key, _)| key.1);
            pruned_through.raise(origin, first_held.map_or(seq, |first| first.saturating_sub(1)));
        }
        let again: Vec<DeviceId> = self
            .durable
            .left_behind
            .iter()
            .copied()
            .filter(|device| !gc.resync.contains(device))
            .filter(|device| {
                let shared = self.durable.acks.get(device).cloned().unwrap_or_default();
                let state = self.durable.state_acks.get(device).cloned().unwrap_or_default();
                lsync_watermark::caught_up_again(
                    &shared,
                    &state,
                    &pruned_through,
                    &self.durable.collected,
                )
            })
            .collect();
        for device in again {
            self.durable.left_behind.remove(&device);
        }
    }

    /// Whether a step over rows of another pull than `peer`'s keeps `step` from starting, as the
    /// engine's `comparing` lock does: a comparison runs alone (written), catch-ups of rows by
    /// version run together (read). Shared steps take no part.
    fn rows_busy(&self, peer: DeviceId, step: &PullStep) -> bool {
        let Some(volatile) = self.volatile.as_ref() else { return false };
        let mut others = volatile
            .pulls
            .iter()
            .filter(|(other, pull)| **other != peer && !pull.waiting)
            .map(|(_, pull)| &pull.current);
        match step {
            PullStep::Shared { .. } => false,
            PullStep::State { .. } => others.any(|other| matches!(other, PullStep::Compare { .. })),
            PullStep::Compare { .. } => others
                .any(|other| matches!(other, PullStep::State { .. } | PullStep::Compare { .. })),
        }
    }

    /// Starts the steps that waited for another pull's step over rows, once it ended.
    fn resume_waiting_pulls(&mut self, ctx: &mut Ctx<'_>) {
        let Some(volatile) = self.volatile.as_ref() else { return };
        let waiting: Vec<DeviceId> =
            volatile.pulls.iter().filter(|(_, pull)| pull.waiting).map(|(peer, _)| *peer).collect();
        for peer in waiting {
            let Some(volatile) = self.volatile.as_mut() else { return };
            let Some(pull) = volatile.pulls.remove(&peer) else { continue };
            if self.rows_busy(peer, &pull.current) {
                if let Some(volatile) = self.volatile.as_mut() {
                    volatile.pulls.insert(peer, pull);
                }
                continue;
            }
            self.send_pull(ctx, peer, pull.current, pull.rest, pull.meta);
        }
    }

    fn expire_pulls(&mut self, ctx: &mut Ctx<'_>) {
        let Some(volatile) = self.volatile.as_mut() else { return };
        let before = volatile.pulls.len();
        volatile.pulls.retain(|_, pull| pull.deadline > ctx.now);
        ctx.stats.pulls_abandoned += u64::try_from(before - volatile.pulls.len()).unwrap_or(0);
    }

    /// Handles a message from `from`.
    pub(super) fn on_wire(&mut self, ctx: &mut Ctx<'_>, from: DeviceId, wire: Wire) {
        // Like the engine, a copy still backfilling neither applies nor acknowledges live
        // batches: the backfill's pages and the catch-up after them bring those changes.
        let live = matches!(wire, Wire::OneWay(Message::SharedBatch(_) | Message::StateBatch(_)));
        if live && !self.durable.ready() {
            return;
        }
        if live
            && let Some(volatile) = self.volatile.as_mut()
            && volatile.pulls.contains_key(&from)
            && let Wire::OneWay(message) = wire
        {
            volatile.held_batches.entry(from).or_default().push(message);
            return;
        }
        match wire {
            Wire::OneWay(Message::SharedBatch(batch)) => {
                self.apply_changes(ctx, &batch.changes);
                self.ack(ctx, from);
            }
            Wire::OneWay(Message::StateBatch(batch)) => {
                let newest = batch.rows.iter().map(|row| row.version).max();
                self.apply_rows(ctx, batch.owner, &batch.rows, None);
                // The batch holds every change after its `since`: if this device already holds
                // everything up to `since`, it now holds everything up to the batch's newest.
                if let Some(newest) = newest
                    && batch.since <= self.durable.state.get(batch.owner, &batch.model)
                {
                    self.durable.state.raise(batch.owner, &batch.model, newest);
                }
                self.ack(ctx, from);
            }
            Wire::OneWay(Message::Ack(ack)) => {
                self.record_ack(from, &ack.shared, &ack.state);
                if let Some(volatile) = self.volatile.as_mut() {
                    volatile.retry.acked(from, &ack);
                }
            }
            Wire::OneWay(Message::Heartbeat(Heartbeat { watermarks: Some(theirs), .. })) => {
                // As the engine does (`record_ack` of `ack_of` the heartbeat's watermarks): what
                // a peer's watermarks show it holds counts as acknowledged, for pruning and
                // tombstone collection (not for the retry queue, which waits for an `Ack`).
                self.note_epoch(from, theirs.epoch);
                self.record_ack(from, &theirs.shared, &theirs.state);
                self.record_seen(from, &theirs, false);
                self.observe_own_marks(ctx, &theirs);
                self.backfill_peer_state(from, theirs.ready);
                // A peer the barrier still waits for, with no request of it under way: asked
                // again (the engine retries a failed catch-up with a request of its own).
                let ask = self.volatile.as_ref().is_some_and(|volatile| {
                    volatile.barrier.waiting().is_some_and(|waiting| waiting.contains(&from))
                        && !volatile.asked_marks.values().any(|(peer, _)| *peer == from)
                        && !volatile.pulls.contains_key(&from)
                });
                if ask {
                    self.ask_marks(ctx, from);
                }
                self.start_pull(ctx, from, &theirs);
            }
            Wire::Request(id, Message::WatermarksRequest(theirs)) => {
                self.note_epoch(from, theirs.epoch);
                // What this device heard of the requester's copy, told back to it; and what the
                // requester heard of this one: a rollback found before answering.
                let seen = self.record_seen(from, &theirs, true);
                self.observe_own_marks(ctx, &theirs);
                if self.copy_rolled_back(&theirs) {
                    self.rolled_back(ctx, from);
                }
                let response =
                    Message::WatermarksResponse(Watermarks { seen, ..self.watermarks() });
                ctx.send(self.id, from, Wire::Response(id, response));
            }
            Wire::Request(id, Message::SharedCatchUpRequest(request)) => {
                let response = self.serve_shared(&request);
                ctx.send(self.id, from, Wire::Response(id, response));
            }
            Wire::Request(id, Message::StateCatchUpRequest(_) | Message::BackfillRequest(_))
                if let Some(refusal) = lsync_watermark::refuse_rows(self.serves()) =>
            {
                ctx.send(self.id, from, Wire::Response(id, Message::Error(refusal)));
            }
            Wire::Request(id, Message::StateCatchUpRequest(request)) => {
                let response = self.serve_state(&request);
                ctx.send(self.id, from, Wire::Response(id, response));
            }
            Wire::Request(id, Message::BackfillRequest(request)) => {
                let response = self.serve_backfill_rows(&request);
                ctx.send(self.id, from, Wire::Response(id, response));
            }
            Wire::Request(id, Message::SharedSnapshotRequest(request)) => {
                let response = self.serve_snapshot(&request);
                ctx.send(self.id, from, Wire::Response(id, response));
            }
            Wire::Response(id, message) => self.on_response(ctx, from, id, message),
            Wire::OneWay(other) | Wire::Request(_, other) => {
                ctx.fail(format!("{} got an unexpected message {}", self.id, other.name()));
            }
        }
    }

    /// Records what `peer` acknowledged holding: shared changes and device-owned marks.
    /// A peer told its epoch: a new one (its copy was re-created) resets its acknowledgements,
    /// as the engine does at the handshake.
    fn note_epoch(&mut self, peer: DeviceId, epoch: lsync_protocol::Epoch) {
        let known = self.durable.peer_epochs.insert(peer, epoch.0);
        if known.is_some_and(|known| known != epoch.0) {
            self.durable.acks.remove(&peer);
            self.durable.state_acks.remove(&peer);
        }
    }

    fn record_ack(&mut self, peer: DeviceId, shared: &[OriginSeq], state: &[StateMark]) {
        self.durable.acks.entry(peer).or_default().raise_all(&SharedProgress::from_wire(shared));
        let state_acks = self.durable.state_acks.entry(peer).or_default();
        for mark in state {
            state_acks.raise(mark.owner, &mark.model, mark.version);
        }
    }

    fn ack(&mut self, ctx: &mut Ctx<'_>, to: DeviceId) {
        // Made from the watermarks as told, as the engine's `ack_of(own_watermarks)`.
        let Watermarks { shared, state, .. } = self.watermarks();
        let ack = Ack { shared, state };
        ctx.send(self.id, to, Wire::OneWay(Message::Ack(ack)));
    }

    /// Merges shared changes (own or received), logs them and advances the watermarks.
    fn apply_changes(&mut self, ctx: &mut Ctx<'_>, changes: &[SharedChange]) {
        let mut origins = BTreeSet::new();
        for change in changes {
            let key = (change.origin, change.seq);
            if change.seq <= self.durable.shared.get(change.origin)
                || self.durable.log.contains_key(&key)
            {
                continue;
            }
            if !self.durable.incarnations.contains_key(&change.origin) {
                self.receive_stamp(ctx, change.hlc());
            }
            self.durable.records.entry(change.record).or_default().apply(change.hlc(), &change.op);
            self.durable.log.insert(key, change.clone());
            self.durable.applied.entry(change.origin).or_default().insert(change.seq);
            origins.insert(change.origin);
            ctx.trace.record(Event::Apply, &[ident(self.id), ident(change.origin), change.seq]);
        }
        for origin in origins {
            self.durable.advance(origin);
        }
    }

    /// Applies `owner`'s rows through the owner-version rule.
    /// Deletes `owner`'s rows in the key range `(after, through]` (`through = None`: to the end)
    /// that the serving peer no longer holds (not among `keys`) at or below its mark, as
    /// `state_sync::sql::delete_missing` does for a resync or a comparison.
    pub(super) fn delete_missing(
        &mut self,
        owner: DeviceId,
        after: Option<Uuid>,
        through: Option<Uuid>,
        peer_mark: HlcTime,
        held: &[(Uuid, HlcTime)],
    ) {
        let held: BTreeMap<Uuid, HlcTime> = held.iter().copied().collect();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let upper = through.map_or(Bound::Unbounded, Bound::Included);
        let missing: Vec<Uuid> = self
            .durable
            .rows
            .range((lower, upper))
            .filter(|(id, mine)| {
                // Live rows only, as the engine's (its tombstones are kept: they still win), that
                // the peer does not hold at the same or a newer version.
                mine.value.is_some()
                    && mine.owner == owner
                    && mine.version <= peer_mark
                    && held.get(id).is_none_or(|theirs| *theirs < mine.version)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in missing {
            self.durable.rows.remove(&id);
        }
    }

    /// Applies `owner`'s rows by [`decide`], against this device's mark for them — or, for a
    /// comparison's pages (`compared`: the peer's mark it raises this device's to), against
    /// [`comparison_mark`], as the engine's `compare_rows`.
    fn apply_rows(
        &mut self,
        ctx: &mut Ctx<'_>,
        owner: DeviceId,
        rows: &[StateRow],
        compared: Option<HlcTime>,
    ) {
        self.apply_rows_against(
            ctx,
            owner,
            rows,
            compared.map_or(Against::Held, Against::Compared),
        );
    }

    /// Applies `owner`'s rows by [`decide`] against the mark `against` says.
    pub(super) fn apply_rows_against(
        &mut self,
        ctx: &mut Ctx<'_>,
        owner: DeviceId,
        rows: &[StateRow],
        against: Against,
    ) {
        for row in rows {
            if let Some(creator) = ctx.creators.get(&row.id)
                && *creator != owner
            {
                ctx.fail(format!(
                    "{} was sent row {} as {owner}'s; it is {creator}'s",
                    self.id, row.id
                ));
            }
            self.receive_stamp(ctx, Hlc::new(row.version, owner));
            let current = self.durable.rows.get(&row.id).map_or(Current::Absent, Held::current);
            let held_mark = self.durable.state.get(owner, STATE_MODEL);
            let mark = match against {
                Against::Held => held_mark,
                Against::Compared(target) => comparison_mark(held_mark, target),
                Against::Known(known) => known,
            };
            // This device holds every row of `owner` whose newest version is at or below its
            // mark: one it lacks there was deleted, and its tombstone may have been collected;
            // `decide` refuses a late copy (a re-sent batch), which would bring it back for good.
            if current == Current::Absent && Some(row.version) <= mark {
                ctx.stats.late_rows_refused += 1;
            }
            match decide(current, owner, row.version, mark) {
                Decision::Apply => {
                    let value = match &row.op {
                        StateOp::Upsert(values) => {
                            Some(values.first().cloned().unwrap_or(Value::Null))
                        }
                        StateOp::Delete | StateOp::DeleteSubtree => None,
                    };
                    self.durable.rows.insert(row.id, Held { owner, version: row.version, value });
                }
                Decision::Stale => {}
                Decision::WrongOwner { owner: held_by } => {
                    ctx.fail(format!(
                        "{} refused {owner}'s row {}: held as {held_by}'s (honest devices never \
                         claim each other's rows)",
                        self.id, row.id
                    ));
                }
            }
        }
    }

    /// Starts pulling from `peer` what its watermarks show this device lacks, unless a pull from it
    /// is already under way or this copy is still backfilling (its backfill catches up itself).
    fn start_pull(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId, theirs: &Watermarks) {
        if self.durable.ready() {
            self.begin_pull(ctx, peer, theirs, false);
        }
    }

    /// Starts pulling from `peer` what its watermarks show this device lacks; `false` if there is
    /// nothing to pull (or a pull from it is under way already, or the device is down).
    fn begin_pull(
        &mut self,
        ctx: &mut Ctx<'_>,
        peer: DeviceId,
        theirs: &Watermarks,
        for_backfill: bool,
    ) -> bool {
        if self.volatile.as_ref().is_none_or(|volatile| volatile.pulls.contains_key(&peer)) {
            return false;
        }
        // The engine's plan: rows first, comparisons where the peer forgot deletions, then
        // shared changes.
        let steps: Vec<PullStep> =
            lsync_watermark::catch_up_plan(&self.durable.shared, &self.durable.state, theirs)
                .into_iter()
                .map(|step| match step {
                    CatchUpStep::Rows { owner, target, .. } => {
                        PullStep::State { owner, target, after: None }
                    }
                    CatchUpStep::Compare { owner, target, forgotten, .. } => {
                        PullStep::Compare { owner, target, forgotten, after: None }
                    }
                    CatchUpStep::Shared { origins } => PullStep::Shared { origins },
                })
                .collect();
        let mut steps = steps.into_iter();
        let Some(first) = steps.next() else { return false };
        let completed = self.durable.backfill.as_ref().map_or(0, |checkpoint| checkpoint.completed);
        let meta = PullMeta { for_backfill, completed, pruned: false, confirms: false };
        self.send_pull(ctx, peer, first, steps.collect(), meta);
        true
    }

    fn send_pull(
        &mut self,
        ctx: &mut Ctx<'_>,
        peer: DeviceId,
        step: PullStep,
        rest: Vec<PullStep>,
        meta: PullMeta,
    ) {
        let deadline = ctx.now + tuning::REQUEST_TIMEOUT;
        let waiting = self.rows_busy(peer, &step);
        // As the engine's `compare_rows` once it holds the lock: a comparison that another made
        // needless (this device's mark reached what the peer forgot meanwhile) is skipped.
        if !waiting
            && let PullStep::Compare { owner, forgotten, after: None, .. } = &step
            && self.durable.state.get(*owner, STATE_MODEL) >= Some(*forgotten)
        {
            self.pull_goes_on(ctx, peer, None, rest, meta);
            return;
        }
        let request = *ctx.next_request;
        *ctx.next_request += 1;
        let message = match &step {
            PullStep::Shared { origins } => Message::SharedCatchUpRequest(SharedCatchUpRequest {
                after: origins
                    .iter()
                    .map(|origin| OriginSeq {
                        origin: *origin,
                        seq: self.durable.shared.get(*origin),
                    })
                    .collect(),
                limit: tuning::PAGE_LIMIT,
            }),
            PullStep::Compare { owner, after, .. } => {
                Message::BackfillRequest(lsync_protocol::BackfillRequest {
                    owner: *owner,
                    model: STATE_MODEL.to_owned(),
                    after: *after,
                    limit: tuning::PAGE_LIMIT,
                })
            }
            PullStep::State { owner, after, .. } => {
                Message::StateCatchUpRequest(StateCatchUpRequest {
                    owner: *owner,
                    model: STATE_MODEL.to_owned(),
                    since: self.durable.state.get(*owner, STATE_MODEL),
                    after: *after,
                    limit: tuning::PAGE_LIMIT,
                })
            }
        };
        if let Some(volatile) = self.volatile.as_mut() {
            volatile
                .pulls
                .insert(peer, Pull { request, deadline, current: step, rest, meta, waiting });
        }
        if waiting {
            // Asked for once the other step ends (`resume_waiting_pulls`), or abandoned at the
            // deadline like any pull.
            return;
        }
        ctx.send(self.id, peer, Wire::Request(request, message));
    }

    fn on_response(&mut self, ctx: &mut Ctx<'_>, from: DeviceId, id: u64, message: Message) {
        let Some(message) = self.on_backfill_response(ctx, from, id, message) else { return };
        let asked = self.volatile.as_mut().and_then(|volatile| volatile.asked_marks.remove(&id));
        if let Some((peer, _)) = asked {
            if let (true, Message::WatermarksResponse(theirs)) = (peer == from, message) {
                self.note_epoch(from, theirs.epoch);
                self.observe_own_marks(ctx, &theirs);
                // The peer holds more of one of this file's incarnations, or saw more of this
                // copy than the file holds: rolled back; a full resync replaces the catch-up.
                // Both checks run, so the incarnation is recorded once.
                let lost = self.lost_own_changes(&theirs);
                let seen_more = self.copy_rolled_back(&theirs);
                let lost_rows = self.durable.ready()
                    && lsync_watermark::own_rows_rolled_back(
                        self.id,
                        &self.durable.state,
                        &theirs.state,
                    );
                if lost.is_some() || seen_more || lost_rows {
                    self.rolled_back(ctx, from);
                    return;
                }
                self.record_ack(from, &theirs.shared, &theirs.state);
                // The peer is confirmed once this device holds what it holds (the pull this
                // answer plans ends), or at once if there is nothing to pull; a pull of another
                // catch-up under way leaves it to the next answer.
                let pulling = self
                    .volatile
                    .as_ref()
                    .is_some_and(|volatile| volatile.pulls.contains_key(&from));
                if pulling {
                    if let Some(volatile) = self.volatile.as_mut() {
                        volatile.answered.insert(from, theirs);
                    }
                } else {
                    self.confirming_pull(ctx, from, &theirs);
                }
            }
            return;
        }
        let Some(volatile) = self.volatile.as_mut() else { return };
        // A response to an abandoned or finished pull (or a duplicate) is ignored.
        let Some(pull) = volatile.pulls.remove_entry(&from).and_then(|(peer, pull)| {
            if pull.request == id {
                Some(pull)
            } else {
                volatile.pulls.insert(peer, pull);
                None
            }
        }) else {
            return;
        };
        ctx.stats.pages += 1;
        if let Message::Error(_) = message {
            // Refused (the peer may not serve rows now): the catch-up ends, as the engine's
            // fails, and runs again on the next heartbeat that shows the peer ahead.
            if pull.meta.for_backfill {
                self.backfill_failed(ctx, Some(from));
            }
            return;
        }
        let mut meta = pull.meta;
        let next = match (pull.current, message) {
            (PullStep::Shared { origins }, Message::SharedCatchUpResponse(page)) => {
                // An origin reported pruned is not available from this peer: either this device's
                // watermark rose past it since the request (nothing lost), or the peer never held
                // those changes (it started from a snapshot) and another peer serves them. Whether
                // anything a device still needs was pruned is checked globally after every step.
                let unavailable: BTreeSet<DeviceId> = page
                    .pruned
                    .iter()
                    .filter(|pruned| pruned.seq > self.durable.shared.get(pruned.origin))
                    .map(|pruned| pruned.origin)
                    .collect();
                ctx.stats.unavailable += u64::try_from(unavailable.len()).unwrap_or(0);
                meta.pruned |= !page.pruned.is_empty();
                self.apply_changes(ctx, &page.changes);
                self.ack(ctx, from);
                let origins: Vec<DeviceId> =
                    origins.into_iter().filter(|origin| !unavailable.contains(origin)).collect();
                let again = !page.complete || page.pruned.len() > unavailable.len();
                (again && !origins.is_empty()).then_some(PullStep::Shared { origins })
            }
            (PullStep::State { owner, target, .. }, Message::StatePage(page)) => {
                self.apply_rows(ctx, owner, &page.rows, None);
                let last =
                    page.rows.last().map(|row| StateCursor { version: row.version, id: row.id });
                if page.more && last.is_some() {
                    Some(PullStep::State { owner, target, after: last })
                } else {
                    // Every row of `owner` up to the peer's mark is now held (pages come in
                    // version order, none skipped), so the mark may rise to it.
                    self.durable.state.raise(owner, STATE_MODEL, target);
                    self.ack(ctx, from);
                    None
                }
            }
            (
                PullStep::Compare { owner, target, mut forgotten, after },
                Message::StatePage(page),
            ) => {
                // What the peer forgot while serving (deletions missing from its pages without
                // tombstones) is forgotten here too, up to the mark the comparison raises, as
                // the engine's `compare_rows`.
                if let Some(collected) = page.collected {
                    forgotten = forgotten.max(collected.min(target));
                }
                // As the engine's `compare_rows`: apply the page, delete what the peer no longer
                // holds in its key range at or below its mark; the last page raises the marks.
                self.apply_rows(ctx, owner, &page.rows, Some(target));
                let held: Vec<(Uuid, HlcTime)> =
                    page.rows.iter().map(|row| (row.id, row.version)).collect();
                let last = held.last().map(|(id, _)| *id);
                let more = page.more && last.is_some();
                self.delete_missing(owner, after, if more { last } else { None }, target, &held);
                if more {
                    Some(PullStep::Compare { owner, target, forgotten, after: last })
                } else {
                    self.durable.state.raise(owner, STATE_MODEL, target);
                    self.durable.collected.raise(owner, STATE_MODEL, forgotten);
                    self.ack(ctx, from);
                    None
                }
            }
            (_, other) => {
                ctx.fail(format!("{} got a mismatched response {}", self.id, other.name()));
                None
            }
        };
        self.pull_goes_on(ctx, from, next, pull.rest, meta);
    }

    /// Sends the pull's next step (`next`, or the first of `rest`), or ends the pull.
    fn pull_goes_on(
        &mut self,
        ctx: &mut Ctx<'_>,
        from: DeviceId,
        next: Option<PullStep>,
        rest: Vec<PullStep>,
        meta: PullMeta,
    ) {
        let mut rest = rest.into_iter();
        if let Some(step) = next.or_else(|| rest.next()) {
            self.send_pull(ctx, from, step, rest.collect(), meta);
            return;
        }
        if meta.for_backfill {
            self.backfill_caught_up(ctx, from);
            return;
        }
        if meta.confirms {
            self.barrier_confirmed(ctx, from);
        }
        if meta.pruned {
            // As the engine's peer actor after a catch-up whose peer pruned what this device
            // lacks: the shared records come again from snapshots.
            let request = ResyncRequest {
                scope: Scope::Shared,
                delete_missing: false,
                from: Some(from),
                completed: meta.completed,
            };
            self.request_resync(ctx, request);
        }
    }

    /// Serves a shared catch-up page from the log: per origin, the contiguous run after the
    /// requested point, reporting origins whose wanted changes were pruned.
    fn serve_shared(&self, request: &SharedCatchUpRequest) -> Message {
        let mut changes = Vec::new();
        let mut pruned = Vec::new();
        let mut complete = true;
        let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
        for after in &request.after {
            let pruned_through = [&self.durable.pruned, &self.durable.snapshot_base]
                .iter()
                .filter_map(|map| map.get(&after.origin).copied())
                .max()
                .unwrap_or(0);
            if pruned_through > after.seq {
                pruned.push(OriginSeq { origin: after.origin, seq: pruned_through });
                continue;
            }
            let from = after.seq + 1;
            let run = self.durable.log.range((after.origin, from)..=(after.origin, u64::MAX));
            for (expected, ((_, seq), change)) in (from..).zip(run) {
                if *seq != expected {
                    break;
                }
                if changes.len() >= limit {
                    complete = false;
                    break;
                }
                changes.push(change.clone());
            }
        }
        Message::SharedCatchUpResponse(SharedCatchUpResponse { changes, complete, pruned })
    }

    /// Serves a page of `owner`'s rows above `since`, in (version, id) order after the cursor;
    /// refused when this copy forgot deletions above `since` ([`lsync_watermark::refuse_rows_since`]).
    fn serve_state(&self, request: &StateCatchUpRequest) -> Message {
        let collected = self.durable.collected.get(request.owner, &request.model);
        if let Some(refusal) = lsync_watermark::refuse_rows_since(collected, request.since) {
            return Message::Error(refusal);
        }
        let mut rows: Vec<StateRow> = self
            .durable
            .rows
            .iter()
            .filter(|(_, held)| held.owner == request.owner && Some(held.version) > request.since)
            .map(|(id, held)| held.to_row(*id))
            .filter(|row| {
                request
                    .after
                    .is_none_or(|cursor| (row.version, row.id) > (cursor.version, cursor.id))
            })
            .collect();
        rows.sort_by_key(|row| (row.version, row.id));
        let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
        let more = rows.len() > limit;
        rows.truncate(limit);
        Message::StatePage(StatePage {
            owner: request.owner,
            model: request.model.clone(),
            columns: vec!["value".into()],
            rows,
            more,
            estimated_total: 0,
            // Not above `since` (refused otherwise).
            collected: None,
        })
    }
}

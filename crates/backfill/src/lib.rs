//! Backfill: how a device with nothing (a new device, or a copy re-created under the same
//! identity) or with a gap it cannot close from peer logs (changes pruned away, tombstones
//! collected) gets a complete copy of the library from a peer, resumably.
//!
//! # Model
//! A [`Backfill`] is a state machine over a persisted [`Checkpoint`]:
//!
//! ```text
//!   Uninitialized ──planned──▶ Backfilling ──last page──▶ CatchingUp ──caught up──▶ Ready
//!         ▲                     │     ▲                                               │
//!         └──────── resync ─────┼─────┼───────────────────────────────────────────────┘
//!                               └─────┘ page (checkpoint), peer switch (rebase)
//!   any phase but Ready ──pause──▶ Paused ──resume──▶ the phase it left
//! ```
//!
//! - **Planning** needs the serving peer's [`Watermarks`]: the plan is one [`Step`] per shared
//!   model (a snapshot of merged records, by primary key), then one per (owner, device-owned
//!   model) the peer holds, models in foreign-key order (the registry's order), so a row's parent
//!   arrives before it. The peer's watermarks at that moment become the checkpoint's `marks`.
//! - **Pages**: each page of a step is applied together with the new checkpoint in one
//!   transaction ([`sql::store`]); a restart resumes after the last applied key of the current
//!   step — never from zero, never skipping rows.
//! - **Marks**: when a step ends, this device's watermark for what the step covered is raised to
//!   the checkpoint's marks: everything the serving peer held up to its marks is here (rows
//!   changed meanwhile are newer than the marks, and catch-up fetches them afterwards). Shared
//!   progress is raised when the last shared step ends.
//! - **Peer switch**: if the serving peer goes away, another peer continues from the same
//!   checkpoint after a *rebase*: the marks become the minimum of both peers' marks, so no
//!   device's claim covers more than it served.
//! - **Live changes during a backfill** are not applied: their senders keep them
//!   (unacknowledged), and the catch-up that follows the last page fetches everything after the
//!   marks. Nothing is buffered in memory, nothing is dropped.
//! - **Full resync** of a device that already has data ([`Scope::Everything`] with
//!   `delete_missing`): rows of the peer's owners that the peer no longer holds are deleted range
//!   by range ([`PageOutcome::delete_missing`]), because the tombstones that would have said so
//!   were collected.
//!
//! # Call order
//! 1. [`Backfill::new`] with the persisted checkpoint ([`Checkpoint::ready`] for a device that
//!    founded its library, [`Checkpoint::uninitialized`] for one that joins).
//! 2. Loop on [`Backfill::next`]: it says what to do ([`Command`]); do it and report the result
//!    with [`Backfill::planned`], [`Backfill::page`], [`Backfill::rebased`],
//!    [`Backfill::caught_up`] or [`Backfill::peer_lost`]; persist [`Backfill::checkpoint`] after
//!    each of them, in the transaction that applied the page if there was one.
//! 3. [`Backfill::pause`] / [`Backfill::resume`] when sync is switched off and on;
//!    [`Backfill::resync`] when a gap cannot be closed from logs.
//!
//! Times are milliseconds passed in by the caller; they must not go backwards.
//!
//! # Invariants
//! - The step index and the cursor only move forward within a plan.
//! - Marks only fall on rebase (to the minimum of the two peers') and are never applied before
//!   their step ends.
//! - `Ready` is reached only through `CatchingUp`.

use lsync_hlc::{DeviceId, HlcTime};
use lsync_protocol::{OriginSeq, StateMark, Watermarks};
use lsync_watermark::{SharedProgress, StateProgress};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod sql;

/// Where a device is in getting a complete copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Needs a plan: nothing fetched yet for the current backfill.
    Uninitialized,
    /// Fetching pages of the plan.
    Backfilling,
    /// Every page applied; fetching what changed meanwhile, by watermark.
    CatchingUp,
    /// Complete; live sync applies changes as they come.
    Ready,
    /// Sync is switched off while not ready (reported only; the checkpoint keeps the phase).
    Paused,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Uninitialized => "uninitialized",
            Phase::Backfilling => "backfilling",
            Phase::CatchingUp => "catching-up",
            Phase::Ready => "ready",
            Phase::Paused => "paused",
        })
    }
}

/// What a backfill fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Shared records only: some origin's changes were pruned before this device had them.
    Shared,
    /// Everything: a new device, or a full resync.
    Everything,
}

/// One part of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepKind {
    /// Merged records of a shared model, by primary key (`SharedSnapshotRequest`).
    Shared {
        /// The model.
        model: String,
    },
    /// One owner's rows of a device-owned model, by primary key (`BackfillRequest`).
    State {
        /// The owner.
        owner: DeviceId,
        /// The model.
        model: String,
    },
}

/// A step and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// What it fetches.
    pub kind: StepKind,
    /// Rows (or records) applied so far.
    pub done: u64,
    /// The serving peer's estimate of the step's size (0 until its first page).
    pub total: u64,
}

impl Step {
    /// A name for progress reports: `tags`, or `entries@<owner>`.
    pub fn name(&self) -> String {
        match &self.kind {
            StepKind::Shared { model } => model.clone(),
            StepKind::State { owner, model } => format!("{model}@{owner}"),
        }
    }
}

/// Everything needed to resume a backfill after a restart. Persisted after every page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The phase (never [`Phase::Paused`]: pausing is not persisted).
    pub phase: Phase,
    /// What the current backfill fetches.
    pub scope: Scope,
    /// Whether rows the serving peer does not hold are deleted (full resync of existing data).
    pub delete_missing: bool,
    /// The plan.
    pub steps: Vec<Step>,
    /// The index of the step in progress (`steps.len()` when all are done).
    pub current: usize,
    /// The last primary key applied in the current step.
    pub cursor: Option<Uuid>,
    /// Shared watermarks to raise to when the shared steps end.
    pub shared_marks: Vec<OriginSeq>,
    /// Device-owned watermarks to raise to when each state step ends.
    pub state_marks: Vec<StateMark>,
    /// The peer serving the current plan, if one is chosen.
    pub peer: Option<DeviceId>,
    /// Backfills completed by this copy (a full resync counts).
    pub completed: u64,
    /// The serving peers' collected-deletion marks ([`Watermarks::collected`]): the copy this
    /// backfill makes cannot list deletions the peer had forgotten, so each state step, when it
    /// ends, raises this device's own collected mark to the peer's ([`PageOutcome::raise_collected`]).
    #[serde(default)]
    pub collected_marks: Vec<StateMark>,
    /// Whether the copy was complete when this backfill started: a resync of a copy that was
    /// ready once. Its tables still hold what its watermarks claim (a resync raises them only
    /// when a step ends), so it keeps serving backfills meanwhile unless the resync deletes
    /// what the peer no longer holds ([`Checkpoint::serves`]) — were resyncing copies refused
    /// as sources, devices that all resync at once (each fell behind another's retention) would
    /// wait for each other, and a joiner for all of them, for ever.
    #[serde(default)]
    pub complete_before: bool,
    /// Peers other than the source that reported, during this resync that deletes what its
    /// source no longer holds, that this copy had been rolled back: each may have heard more of
    /// this copy's own rows than the source. Once this resync ends, another follows from the
    /// first of them, then from the next ([`Backfill::rolled_back_by`]), with this device's own
    /// rows by that peer's word each time. A report comes once per peer and incarnation (the
    /// copy records what it was told), so none may be dropped.
    #[serde(default)]
    pub resync_after: Vec<DeviceId>,
    /// Marks through which a resync that deleted what its source no longer held (a rollback
    /// resync) left this copy's rows exactly as its source held them: the source's marks when it
    /// planned. Kept across later backfills. A later rollback resync from another peer takes
    /// this device's own rows by that peer's word only above these marks ([`Checkpoint::
    /// own_rows_known_through`]): a peer that heard less of the copy still holds rows it deleted,
    /// which the first source had seen go, and they would come back (the real-mode simulator,
    /// `--topology chain --seed 13`, and the barrier then spread them to every peer).
    #[serde(default)]
    pub resynced_through: Vec<StateMark>,
}

impl Checkpoint {
    /// The checkpoint of a copy that is complete: a library's founding device.
    pub fn ready() -> Self {
        Self::with_phase(Phase::Ready, Scope::Everything, false)
    }

    /// The checkpoint of a copy that has nothing yet: a device joining a library.
    pub fn uninitialized() -> Self {
        Self::with_phase(Phase::Uninitialized, Scope::Everything, false)
    }

    fn with_phase(phase: Phase, scope: Scope, delete_missing: bool) -> Self {
        Self {
            phase,
            scope,
            delete_missing,
            steps: Vec::new(),
            current: 0,
            cursor: None,
            shared_marks: Vec::new(),
            state_marks: Vec::new(),
            peer: None,
            completed: 0,
            collected_marks: Vec::new(),
            complete_before: false,
            resync_after: Vec::new(),
            resynced_through: Vec::new(),
        }
    }

    /// Whether this copy may serve a backfill: its tables hold what its watermarks claim. A
    /// ready copy does, and so does one resyncing what it fell behind on
    /// ([`Checkpoint::complete_before`]). A full resync that deletes what the peer no longer
    /// holds (`delete_missing`: a copy restored from an old file) does not: its tables hold
    /// rows deleted since the backup, and its own marks jump over that lost history as soon as
    /// it writes (the simulator saw a joiner copy such rows and keep them for good). Nor does a
    /// joiner or a re-created device before its first backfill ends.
    pub fn serves(&self) -> bool {
        self.phase == Phase::Ready || (self.complete_before && !self.delete_missing)
    }

    /// The version through which a rollback resync's page of `owner`'s rows of `model` applies
    /// against what this copy holds (`decide`'s mark), where `owner` is this device: `None` (by
    /// the serving peer's word alone: this copy's own mark may lie above rows it lost) unless an
    /// earlier rollback resync left those rows exactly as its source held them through a mark
    /// ([`Checkpoint::resynced_through`]).
    pub fn own_rows_known_through(&self, owner: DeviceId, model: &str) -> Option<HlcTime> {
        self.resynced_through
            .iter()
            .find(|mark| mark.owner == owner && mark.model == model)
            .map(|mark| mark.version)
    }

    /// Whether this finished backfill brought back this device's own rows from a peer: a full
    /// one of a copy that was not complete (re-created under its identity) or that deleted what
    /// the peer no longer holds (restored from an old file). Its own rows are then the serving
    /// peers' view of them, which other peers may not share: rows it wrote and lost that a
    /// third peer got, whose mark lies above them, or rows it deleted that a peer never saw go.
    /// Once every paired peer has since told what it heard of this copy without showing another
    /// rollback, the device sets a barrier: it raises its own mark and own collected mark to a
    /// fresh version, and each peer compares its rows with it once. Not before: a peer that heard
    /// more may be away, and a view spread too early deletes the rows only it still holds.
    pub fn brought_back_own_rows(&self) -> bool {
        self.phase == Phase::Ready
            && self.scope == Scope::Everything
            && (self.delete_missing || !self.complete_before)
    }
}

/// A need for a resync, seen by a catch-up with `from` (its watermarks showed changes it pruned,
/// `Scope::Shared`, or a rollback of this copy, `Scope::Everything` with `delete_missing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncRequest {
    /// What to fetch again.
    pub scope: Scope,
    /// Whether rows the serving peer does not hold are deleted.
    pub delete_missing: bool,
    /// The peer that showed the need: the preferred source.
    pub from: Option<DeviceId>,
    /// [`Checkpoint::completed`] when the catch-up that saw the need started.
    pub completed: u64,
}

/// What [`Backfill::on_resync_request`] decided.
#[derive(Debug, Clone)]
pub enum ResyncDecision {
    /// A backfill ended since the need was seen: nothing to do.
    Stale,
    /// The backfill under way covers it; `prefer`: the requesting peer becomes the preferred
    /// source (no source is chosen or preferred yet).
    Covered {
        /// Whether to prefer the requesting peer.
        prefer: bool,
    },
    /// Another resync follows the running one, from the requesting peer: persist this machine.
    Chain(Backfill),
    /// A new plan starts: persist this machine (not `Ready`), prefer the requesting peer.
    Start(Backfill),
}

/// The barrier after a backfill that brought this device's own rows back from a peer
/// ([`Checkpoint::brought_back_own_rows`]): which paired peers have yet to tell, in the answer to
/// a watermark request of this device's, what they heard of this copy without showing another
/// rollback. Once none is left the device raises its own mark and own collected mark to a fresh
/// version, so that every peer compares its rows with it once. Held in memory (a restart before
/// it fires drops it: the device stays as without one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnRowsBarrier {
    waiting: Option<std::collections::BTreeSet<DeviceId>>,
}

impl OwnRowsBarrier {
    /// Such a backfill ended: wait for these peers. `true` if the barrier is due at once (no
    /// paired peer to wait for).
    pub fn start(&mut self, peers: impl IntoIterator<Item = DeviceId>) -> bool {
        let peers: std::collections::BTreeSet<DeviceId> = peers.into_iter().collect();
        let due = peers.is_empty();
        self.waiting = (!due).then_some(peers);
        due
    }

    /// `peer` answered a watermark request of this device's and showed no rollback. `true` if
    /// that was the last one: the barrier is due now (and no longer waits).
    pub fn confirmed(&mut self, peer: DeviceId) -> bool {
        let due = self
            .waiting
            .as_mut()
            .is_some_and(|waiting| waiting.remove(&peer) && waiting.is_empty());
        if due {
            self.waiting = None;
        }
        due
    }

    /// A rollback was found: the next resync starts the wait again, not this one.
    pub fn cancel(&mut self) {
        self.waiting = None;
    }

    /// The peers still waited for, if the barrier waits.
    pub fn waiting(&self) -> Option<&std::collections::BTreeSet<DeviceId>> {
        self.waiting.as_ref()
    }
}

/// What the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Nothing: ready, paused, or waiting for a peer.
    Idle,
    /// Choose a ready peer ([`choose_peer`]), ask for its watermarks, report them with
    /// [`Backfill::planned`].
    Plan,
    /// The serving peer is gone: ask `peer`'s watermarks and report them with
    /// [`Backfill::rebased`]. The caller picks `peer` with [`choose_peer`].
    Rebase,
    /// Fetch the next page of the current step from `peer`, after `after`.
    Fetch {
        /// The serving peer.
        peer: DeviceId,
        /// What to fetch.
        step: StepKind,
        /// Resume after this key.
        after: Option<Uuid>,
    },
    /// Every page is applied: catch up by watermark from `peer` (and any other peer), then
    /// report [`Backfill::caught_up`].
    CatchUp {
        /// The serving peer.
        peer: Option<DeviceId>,
    },
}

/// What applying a page implies, for the caller's transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageOutcome {
    /// Delete this device's rows of the step's (owner, model) whose key lies in this range and is
    /// not among the page's keys: `(after, through]`, `through = None` meaning "to the end".
    /// Only for a full resync of a device-owned step.
    pub delete_missing: Option<(Option<Uuid>, Option<Uuid>)>,
    /// Raise these shared watermarks (the last shared step ended).
    pub raise_shared: Vec<OriginSeq>,
    /// Raise these device-owned watermarks (a state step ended).
    pub raise_state: Vec<StateMark>,
    /// Raise this device's collected-deletion marks to these (a state step ended: its rows came
    /// from a peer that may have forgotten deletions up to them).
    pub raise_collected: Vec<StateMark>,
    /// The step ended.
    pub step_done: bool,
}

/// A peer that could serve a backfill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The peer.
    pub device: DeviceId,
    /// Its measured round trip, if known.
    pub rtt_us: Option<u64>,
    /// Whether it is online.
    pub online: bool,
    /// Whether it announced a complete copy (`Watermarks::ready`), if known.
    pub ready: Option<bool>,
    /// Whether a request to it failed during this backfill.
    pub failed: bool,
}

/// Picks the peer to backfill from: online, not known to be incomplete, not failed in this
/// backfill; `preferred` if it is one (the peer that showed a resync was needed holds what this
/// copy lacks: a resync from another might not bring it, and the need would show again), else
/// the one with the shortest measured round trip (unknown counts as slowest); ties by device id,
/// so the choice is deterministic.
pub fn choose_peer(candidates: &[Candidate], preferred: Option<DeviceId>) -> Option<DeviceId> {
    let usable = candidates.iter().filter(|candidate| {
        candidate.online && candidate.ready != Some(false) && !candidate.failed
    });
    if let Some(preferred) = preferred
        && usable.clone().any(|candidate| candidate.device == preferred)
    {
        return Some(preferred);
    }
    usable
        .min_by_key(|candidate| (candidate.rtt_us.unwrap_or(u64::MAX), candidate.device))
        .map(|candidate| candidate.device)
}

/// The models a plan covers, in the order to fetch them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Models {
    /// Shared models (records and memberships).
    pub shared: Vec<String>,
    /// Device-owned models, parents before children.
    pub state: Vec<String>,
}

/// Progress of the current backfill, for status and events.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// The serving peer.
    pub peer: Option<DeviceId>,
    /// Per step: name, rows done, estimated total.
    pub steps: Vec<(String, u64, u64)>,
    /// Rows done over all steps.
    pub done: u64,
    /// Estimated rows over all steps (steps not started yet count 0 until their first page).
    pub total: u64,
    /// Rows per second since this run of the backfill started (0 before the first page).
    pub rate: f64,
    /// Estimated seconds left, when a rate is known.
    pub eta_secs: Option<f64>,
}

impl Progress {
    /// The progress of a copy with no backfill underway: [`Phase::Ready`], or
    /// [`Phase::Uninitialized`] if it waits for one.
    pub fn idle(ready: bool) -> Self {
        Self {
            phase: if ready { Phase::Ready } else { Phase::Uninitialized },
            peer: None,
            steps: Vec::new(),
            done: 0,
            total: 0,
            rate: 0.0,
            eta_secs: None,
        }
    }
}

/// The backfill state machine (see the crate docs for the call order).
#[derive(Debug, Clone)]
pub struct Backfill {
    checkpoint: Checkpoint,
    paused: bool,
    /// When this process started fetching, and how many rows were done then (for the rate).
    run_start: Option<(u64, u64)>,
    last_now: u64,
}

impl Backfill {
    /// A machine resuming from `checkpoint`.
    pub fn new(checkpoint: Checkpoint) -> Self {
        Self { checkpoint, paused: false, run_start: None, last_now: 0 }
    }

    /// The checkpoint to persist.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The phase, [`Phase::Paused`] while paused before being ready.
    pub fn phase(&self) -> Phase {
        if self.paused && self.checkpoint.phase != Phase::Ready {
            Phase::Paused
        } else {
            self.checkpoint.phase
        }
    }

    /// Whether live changes may be applied (the copy is complete).
    pub fn is_ready(&self) -> bool {
        self.checkpoint.phase == Phase::Ready
    }

    /// Whether this copy may serve a backfill ([`Checkpoint::serves`]): what its watermarks
    /// tell peers as [`Watermarks::ready`].
    pub fn serves(&self) -> bool {
        self.checkpoint.serves()
    }

    /// What to do now.
    pub fn next(&self) -> Command {
        if self.paused {
            return Command::Idle;
        }
        let checkpoint = &self.checkpoint;
        match checkpoint.phase {
            Phase::Ready | Phase::Paused => Command::Idle,
            Phase::Uninitialized => Command::Plan,
            Phase::CatchingUp => Command::CatchUp { peer: checkpoint.peer },
            Phase::Backfilling => match (checkpoint.peer, checkpoint.steps.get(checkpoint.current))
            {
                (None, _) => Command::Rebase,
                (Some(peer), Some(step)) => {
                    Command::Fetch { peer, step: step.kind.clone(), after: checkpoint.cursor }
                }
                // Unreachable by construction (the last page moves to CatchingUp); recover.
                (Some(peer), None) => Command::CatchUp { peer: Some(peer) },
            },
        }
    }

    /// The plan from `peer`'s watermarks: Uninitialized → Backfilling (or straight to
    /// CatchingUp if there is nothing to fetch).
    pub fn planned(&mut self, peer: DeviceId, theirs: &Watermarks, models: &Models) {
        if self.checkpoint.phase != Phase::Uninitialized {
            return;
        }
        let mut steps: Vec<Step> = models
            .shared
            .iter()
            .map(|model| Step {
                kind: StepKind::Shared { model: model.clone() },
                done: 0,
                total: 0,
            })
            .collect();
        if self.checkpoint.scope == Scope::Everything {
            let marks = StateProgress::from_wire(&theirs.state);
            for model in &models.state {
                let owners: Vec<DeviceId> = marks
                    .iter()
                    .filter(|(_, mark_model, _)| mark_model == model)
                    .map(|(owner, _, _)| owner)
                    .collect();
                for owner in owners {
                    steps.push(Step {
                        kind: StepKind::State { owner, model: model.clone() },
                        done: 0,
                        total: 0,
                    });
                }
            }
        }
        let checkpoint = &mut self.checkpoint;
        checkpoint.steps = steps;
        checkpoint.current = 0;
        checkpoint.cursor = None;
        checkpoint.shared_marks = theirs.shared.clone();
        checkpoint.state_marks = theirs.state.clone();
        checkpoint.collected_marks = theirs.collected.clone();
        checkpoint.peer = Some(peer);
        checkpoint.phase =
            if checkpoint.steps.is_empty() { Phase::CatchingUp } else { Phase::Backfilling };
    }

    /// A page of the current step was fetched: `keys` are its primary keys in order, `more` says
    /// whether more follow, `estimated_total` is the peer's estimate for the step (0: no new
    /// estimate). Returns what
    /// the caller's transaction must do besides applying the rows; then persist the checkpoint.
    ///
    /// `forgotten`: the serving peer's collected mark for a state step's (owner, model) when it
    /// read the page ([`lsync_protocol::StatePage::collected`]). Deletions it forgot after the
    /// plan are missing from its pages without tombstones, so the step, when it ends, raises
    /// this device's collected mark to the highest such mark (never above the step's own mark)
    /// as well as to the one the plan's watermarks told.
    pub fn page(
        &mut self,
        keys: &[Uuid],
        more: bool,
        estimated_total: u64,
        forgotten: Option<HlcTime>,
        now_ms: u64,
    ) -> PageOutcome {
        self.observe(now_ms);
        let mut outcome = PageOutcome::default();
        if self.checkpoint.phase != Phase::Backfilling {
            return outcome;
        }
        if let (Some(forgotten), Some(step)) =
            (forgotten, self.checkpoint.steps.get(self.checkpoint.current))
            && let StepKind::State { owner, model } = &step.kind
        {
            let marks = StateProgress::from_wire(&self.checkpoint.state_marks);
            let capped = marks.get(*owner, model).map(|mark| mark.min(forgotten));
            let mut collected = StateProgress::from_wire(&self.checkpoint.collected_marks);
            if let Some(version) = capped {
                collected.raise(*owner, model, version);
                self.checkpoint.collected_marks = collected.to_wire();
            }
        }
        if self.run_start.is_none() {
            let done = self.checkpoint.steps.iter().map(|step| step.done).sum();
            self.run_start = Some((now_ms, done));
        }
        let checkpoint = &mut self.checkpoint;
        let Some(step) = checkpoint.steps.get_mut(checkpoint.current) else {
            return outcome;
        };
        step.done += keys.len() as u64;
        // Peers estimate on a step's first page only (counting is not free).
        step.total = if estimated_total > 0 { estimated_total } else { step.total }.max(step.done);
        let after = checkpoint.cursor;
        let last = keys.last().copied();
        let through = if more { last.or(after) } else { None };
        if checkpoint.delete_missing && matches!(step.kind, StepKind::State { .. }) {
            outcome.delete_missing = Some((after, through));
        }
        if more && last.is_some() {
            checkpoint.cursor = last;
            return outcome;
        }
        // The step ended.
        outcome.step_done = true;
        match &step.kind {
            StepKind::State { owner, model } => {
                let marks = StateProgress::from_wire(&checkpoint.state_marks);
                if let Some(version) = marks.get(*owner, model) {
                    outcome.raise_state.push(StateMark {
                        owner: *owner,
                        model: model.clone(),
                        version,
                    });
                }
                let collected = StateProgress::from_wire(&checkpoint.collected_marks);
                if let Some(version) = collected.get(*owner, model) {
                    outcome.raise_collected.push(StateMark {
                        owner: *owner,
                        model: model.clone(),
                        version,
                    });
                }
            }
            StepKind::Shared { .. } => {
                let next_is_shared = checkpoint
                    .steps
                    .get(checkpoint.current + 1)
                    .is_some_and(|next| matches!(next.kind, StepKind::Shared { .. }));
                if !next_is_shared {
                    outcome.raise_shared = checkpoint.shared_marks.clone();
                }
            }
        }
        checkpoint.current += 1;
        checkpoint.cursor = None;
        if checkpoint.current >= checkpoint.steps.len() {
            checkpoint.phase = Phase::CatchingUp;
        }
        outcome
    }

    /// The serving peer failed (went offline, timed out): another one must rebase before
    /// fetching. In CatchingUp, any peer may finish the catch-up.
    pub fn peer_lost(&mut self, peer: DeviceId) {
        if self.checkpoint.peer == Some(peer) {
            self.checkpoint.peer = None;
        }
    }

    /// Continue with `peer`, whose watermarks are `theirs`: the marks become the minimum of the
    /// old and the new peer's, per origin and per (owner, model); a mark the new peer lacks is
    /// dropped (nothing is claimed for it).
    pub fn rebased(&mut self, peer: DeviceId, theirs: &Watermarks) {
        let checkpoint = &mut self.checkpoint;
        let their_shared = SharedProgress::from_wire(&theirs.shared);
        checkpoint.shared_marks = checkpoint
            .shared_marks
            .iter()
            .map(|mark| OriginSeq {
                origin: mark.origin,
                seq: mark.seq.min(their_shared.get(mark.origin)),
            })
            .filter(|mark| mark.seq > 0)
            .collect();
        let their_state = StateProgress::from_wire(&theirs.state);
        checkpoint.state_marks = checkpoint
            .state_marks
            .iter()
            .filter_map(|mark| {
                let theirs: HlcTime = their_state.get(mark.owner, &mark.model)?;
                Some(StateMark {
                    owner: mark.owner,
                    model: mark.model.clone(),
                    version: mark.version.min(theirs),
                })
            })
            .collect();
        // Pages from either peer may lack deletions that peer forgot: keep the higher mark.
        let mut collected = StateProgress::from_wire(&checkpoint.collected_marks);
        for mark in &theirs.collected {
            collected.raise(mark.owner, &mark.model, mark.version);
        }
        checkpoint.collected_marks = collected.to_wire();
        checkpoint.peer = Some(peer);
    }

    /// The catch-up after the last page finished: CatchingUp → Ready.
    pub fn caught_up(&mut self) {
        if self.checkpoint.phase == Phase::CatchingUp {
            self.checkpoint.phase = Phase::Ready;
            self.checkpoint.completed += 1;
            if self.checkpoint.delete_missing && self.checkpoint.scope == Scope::Everything {
                let checkpoint = &mut self.checkpoint;
                for mark in &checkpoint.state_marks {
                    match checkpoint
                        .resynced_through
                        .iter_mut()
                        .find(|held| held.owner == mark.owner && held.model == mark.model)
                    {
                        Some(held) => held.version = held.version.max(mark.version),
                        None => checkpoint.resynced_through.push(mark.clone()),
                    }
                }
            }
            // The steps stay, as the report of the backfill that finished.
            self.checkpoint.cursor = None;
            self.checkpoint.peer = None;
            self.run_start = None;
            if !self.checkpoint.resync_after.is_empty() {
                let mut rest = std::mem::take(&mut self.checkpoint.resync_after);
                rest.remove(0);
                self.resync(Scope::Everything, true);
                self.checkpoint.resync_after = rest;
            }
        }
    }

    /// `peer` reported that this copy was rolled back while a resync that deletes what its source
    /// no longer holds runs: unless `peer` is that resync's source, another follows from it once
    /// this one ends ([`Checkpoint::resync_after`]; when the source is not chosen yet, the
    /// caller may prefer `peer` instead). Returns whether the checkpoint changed (store it).
    /// Nothing changes when no such resync runs (the caller starts one) or `peer` is already due.
    pub fn rolled_back_by(&mut self, peer: DeviceId) -> bool {
        let checkpoint = &mut self.checkpoint;
        let running = checkpoint.phase != Phase::Ready
            && checkpoint.delete_missing
            && checkpoint.scope == Scope::Everything;
        if !running || checkpoint.peer == Some(peer) || checkpoint.resync_after.contains(&peer) {
            return false;
        }
        checkpoint.resync_after.push(peer);
        true
    }

    /// Sync switched off: nothing is fetched until [`Backfill::resume`].
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Sync switched on again: continue from the checkpoint.
    pub fn resume(&mut self) {
        self.paused = false;
        self.run_start = None;
    }

    /// A gap that logs cannot close: start over with a new plan of `scope` (a resync while a
    /// backfill of the same or a larger scope is already underway changes nothing).
    pub fn resync(&mut self, scope: Scope, delete_missing: bool) {
        let checkpoint = &mut self.checkpoint;
        let busy = checkpoint.phase != Phase::Ready;
        if busy && (checkpoint.scope == Scope::Everything || checkpoint.scope == scope) {
            checkpoint.delete_missing |= delete_missing && checkpoint.phase == Phase::Uninitialized;
            return;
        }
        let (completed, complete_before) = (checkpoint.completed, checkpoint.serves());
        let resynced_through = std::mem::take(&mut checkpoint.resynced_through);
        *checkpoint = Checkpoint::with_phase(Phase::Uninitialized, scope, delete_missing);
        checkpoint.completed = completed;
        checkpoint.complete_before = complete_before;
        checkpoint.resynced_through = resynced_through;
        self.run_start = None;
    }

    /// What to do with a request for a resync ([`ResyncRequest`]): the one decision the engine's
    /// backfill actor and the deterministic simulator both take. `served_rollback`: a resync
    /// after a rollback of this copy was already served by the requesting peer (since the
    /// engine started); `preferred`: the source an earlier request asked for, if any.
    ///
    /// - A backfill or resync that ended since the need was seen makes the request stale (the
    ///   need, if it remains, shows again at the next catch-up) — except a rollback report from
    ///   a peer that served no resync after the rollback: each reporting peer may have heard
    ///   more of this copy's own rows, so none of their reports is dropped.
    /// - A rollback report from another peer while a rollback resync runs chains one more
    ///   resync from that peer, after this one ([`Backfill::rolled_back_by`]).
    /// - A backfill under way of the same or a larger scope covers the request.
    /// - Otherwise a new plan starts ([`Backfill::resync`]).
    pub fn on_resync_request(
        &self,
        request: &ResyncRequest,
        served_rollback: bool,
        preferred: Option<DeviceId>,
    ) -> ResyncDecision {
        let rollback = request.delete_missing && request.scope == Scope::Everything;
        if request.completed < self.checkpoint.completed && (!rollback || served_rollback) {
            return ResyncDecision::Stale;
        }
        let mut next = self.clone();
        next.resync(request.scope, request.delete_missing);
        let not_planned = self.checkpoint.peer.is_none();
        let mut after = self.clone();
        let chained = rollback
            && request.from.is_some_and(|from| {
                // A resync whose source is not chosen yet prefers the first reporter.
                let first = not_planned && preferred.is_none_or(|p| p == from);
                !first && after.rolled_back_by(from)
            });
        if chained {
            return ResyncDecision::Chain(after);
        }
        if next.checkpoint == self.checkpoint {
            return ResyncDecision::Covered { prefer: not_planned && preferred.is_none() };
        }
        ResyncDecision::Start(next)
    }

    /// Progress at `now_ms`.
    pub fn progress(&self, now_ms: u64) -> Progress {
        let checkpoint = &self.checkpoint;
        let steps: Vec<(String, u64, u64)> =
            checkpoint.steps.iter().map(|step| (step.name(), step.done, step.total)).collect();
        let done: u64 = steps.iter().map(|(_, done, _)| done).sum();
        let total: u64 = steps.iter().map(|(_, done, total)| (*total).max(*done)).sum();
        let (rate, eta_secs) = match self.run_start {
            Some((start, done_at_start)) if now_ms > start && done > done_at_start => {
                let rate = (done - done_at_start) as f64 / ((now_ms - start) as f64 / 1000.0);
                (rate, Some(total.saturating_sub(done) as f64 / rate))
            }
            _ => (0.0, None),
        };
        Progress { phase: self.phase(), peer: checkpoint.peer, steps, done, total, rate, eta_secs }
    }

    fn observe(&mut self, now_ms: u64) {
        debug_assert!(now_ms >= self.last_now, "time went backwards");
        self.last_now = self.last_now.max(now_ms);
    }
}

#[cfg(test)]
mod tests;

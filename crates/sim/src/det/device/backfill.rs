//! A joining device's backfill: the shell around [`lsync_backfill::Backfill`], as the engine's
//! `BackfillActor` (`crates/node/src/engine/backfill.rs`) is. It asks the machine what to do,
//! turns the command into a request to a peer over the simulated network, applies each page and
//! its checkpoint in one handler (the engine's one transaction per page), reports the result,
//! and asks again, until the copy is ready. One request at a time.
//!
//! - `Plan` / `Rebase`: a `WatermarksRequest` to the peer [`choose_peer`] picks among the
//!   candidates (online: connected now; ready: what its heartbeats and answers said; failed:
//!   a request to it failed in this backfill); the answer goes to `planned` / `rebased`.
//! - `Fetch`: a `SharedSnapshotRequest` (merged records of the shared model) or a
//!   `BackfillRequest` (one owner's live rows) after the checkpoint's cursor, at most
//!   [`tuning::BACKFILL_PAGE`]; the page goes through the same cores as everything else (the
//!   register merge, [`Device::apply_rows`]), then `page` says which marks to raise (and, for a
//!   full resync, which range to delete).
//! - `CatchUp`: the peer's watermarks, then the device's ordinary pull from it (shared changes
//!   and rows after this device's marks, page by page); its end is `caught_up`: ready.
//! - A request that times out, a peer that disconnects, an error answer: `peer_lost`, the peer
//!   counts as failed for this backfill, a backoff, then the next command (a `Rebase` onto another
//!   peer, from the same checkpoint).
//!
//! The machine, the candidates and the request in flight are volatile (a crash loses them); the
//! checkpoint is durable, and a restart resumes from it with `Backfill::new`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use lsync_backfill::{
    Backfill, Candidate, Checkpoint, Command, Models, Phase, ResyncDecision, ResyncRequest,
    StepKind, choose_peer,
};
use lsync_hlc::DeviceId;
use lsync_protocol::{
    BackfillRequest, ErrorCode, ErrorMessage, Message, SharedSnapshotPage, SharedSnapshotRequest,
    StatePage, StateRow, Watermarks,
};
use lsync_shared_sync::RecordState;
use uuid::Uuid;

use super::{Ctx, Device, SHARED_MODEL, STATE_MODEL, Wire, ident, tuning};
use crate::det::trace::Event;

/// The backfill state of a running device that has a checkpoint.
#[derive(Debug)]
pub(in crate::det) struct Driver {
    machine: Backfill,
    /// What is known of each peer, for choosing whom to backfill from.
    candidates: BTreeMap<DeviceId, Candidate>,
    /// The request (or catch-up) in flight.
    asked: Option<Asked>,
    /// Failures in a row, for the backoff.
    failures: u32,
    /// No new request before this virtual time (backoff after a failure).
    not_before: std::time::Duration,
    /// Started from a checkpoint past planning (counted once the device runs).
    resumed: bool,
    /// The source a resync asked for, until the backfill ends (the engine's `preferred`).
    preferred: Option<DeviceId>,
    /// Resync requests that arrived while a request was in flight: taken once it ended, as the
    /// engine's backfill actor retries them once its step in flight ended.
    deferred: Vec<ResyncRequest>,
    /// The peers a resync after a rollback of this copy was served by since the engine started
    /// (the engine's `rollback_sources`): a later report of the same rollback from one of them
    /// asks for nothing it did not bring.
    rollback_sources: BTreeSet<DeviceId>,
}

impl Driver {
    /// A driver resuming from the persisted `checkpoint`.
    pub(in crate::det) fn new(checkpoint: Checkpoint) -> Self {
        let resumed = matches!(checkpoint.phase, Phase::Backfilling | Phase::CatchingUp);
        Self {
            machine: Backfill::new(checkpoint),
            candidates: BTreeMap::new(),
            asked: None,
            failures: 0,
            not_before: std::time::Duration::ZERO,
            resumed,
            preferred: None,
            deferred: Vec::new(),
            rollback_sources: BTreeSet::new(),
        }
    }

    fn candidate(&mut self, peer: DeviceId) -> &mut Candidate {
        self.candidates.entry(peer).or_insert(Candidate {
            device: peer,
            rtt_us: None,
            online: false,
            ready: None,
            failed: false,
        })
    }

    fn pick(&self) -> Option<DeviceId> {
        let candidates: Vec<Candidate> = self.candidates.values().copied().collect();
        choose_peer(&candidates, self.preferred)
    }

    fn online(&self, peer: DeviceId) -> bool {
        self.candidates.get(&peer).is_some_and(|candidate| candidate.online)
    }
}

/// A request in flight.
#[derive(Debug, Clone)]
struct Asked {
    request: u64,
    peer: DeviceId,
    deadline: std::time::Duration,
    kind: Asking,
}

/// What a request in flight asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asking {
    /// Watermarks, for `Plan` or `Rebase`.
    Plan,
    /// A page of the current step after the cursor.
    Page { step: StepKind, after: Option<Uuid> },
    /// Watermarks to catch up by.
    CatchUpMarks,
    /// The catch-up pull is under way (its requests have their own ids and deadlines).
    CatchUp,
}

/// What a backfill event is, in the trace.
#[derive(Debug, Clone, Copy)]
enum Traced {
    Resumed = 0,
    Planned,
    Rebased,
    Page,
    Ready,
    Failed,
    Resync,
}

/// The models a plan covers (the engine takes them from the registry, parents first).
fn models() -> Models {
    Models { shared: vec![SHARED_MODEL.to_owned()], state: vec![STATE_MODEL.to_owned()] }
}

/// What a backfill page brought, for [`Device::backfill_page`].
#[derive(Clone, Copy)]
struct Fetched<'a> {
    /// Its keys, in order.
    keys: &'a [Uuid],
    /// Rows: each key with its version (what the peer holds, for a resync's deletion).
    held: &'a [(Uuid, lsync_hlc::HlcTime)],
    /// Whether more pages follow.
    more: bool,
    /// The peer's estimate of the step.
    estimated_total: u64,
    /// The peer's collected mark when it read the page ([`StatePage::collected`]).
    forgotten: Option<lsync_hlc::HlcTime>,
}

/// The checkpoint without the serving peer, which the engine drops in memory only (`peer_lost`)
/// and persists with the next rebase.
fn persisted_part(checkpoint: &Checkpoint) -> Checkpoint {
    Checkpoint { peer: None, ..checkpoint.clone() }
}

impl Device {
    fn driver(&mut self) -> Option<&mut Driver> {
        self.volatile.as_mut()?.backfill.as_mut()
    }

    fn trace_backfill(&self, ctx: &mut Ctx<'_>, what: Traced, detail: u64) {
        ctx.trace.record(Event::Backfill, &[ident(self.id), what as u64, detail]);
    }

    /// What a peer's heartbeat says: whether it holds a complete copy (a source for a backfill).
    pub(super) fn backfill_peer_state(&mut self, peer: DeviceId, ready: bool) {
        if let Some(driver) = self.driver() {
            driver.candidate(peer).ready = Some(ready);
        }
    }

    /// A peer disconnected: it serves nothing now; a request to it in flight failed.
    pub(super) fn backfill_peer_offline(&mut self, ctx: &mut Ctx<'_>, peer: DeviceId) {
        let Some(driver) = self.driver() else { return };
        driver.candidate(peer).online = false;
        driver.machine.peer_lost(peer);
        if driver.asked.as_ref().is_some_and(|asked| asked.peer == peer) {
            self.backfill_failed(ctx, Some(peer));
        }
    }

    /// Runs the backfill on: notices a request that timed out, then, unless a request is in
    /// flight or a backoff runs, does what the machine says next.
    pub(super) fn drive_backfill(&mut self, ctx: &mut Ctx<'_>, connected: &[DeviceId]) {
        let me = self.id;
        let Some(volatile) = self.volatile.as_mut() else { return };
        let Some(driver) = volatile.backfill.as_mut() else { return };
        if driver.machine.is_ready() && driver.deferred.is_empty() {
            return;
        }
        let resumed = std::mem::take(&mut driver.resumed);
        // Who is online, as the engine's peer updates tell its backfill actor; a peer that comes
        // back online is forgiven an earlier failure.
        for peer in ctx.devices.iter().copied().filter(|peer| *peer != me) {
            let online = connected.contains(&peer);
            let candidate = driver.candidate(peer);
            if online && !candidate.online {
                candidate.failed = false;
            }
            candidate.online = online;
        }
        let lost = driver.asked.as_ref().and_then(|asked| {
            let lost = match asked.kind {
                Asking::CatchUp => !volatile.pulls.contains_key(&asked.peer),
                _ => asked.deadline <= ctx.now,
            };
            lost.then_some(asked.peer)
        });
        if resumed {
            ctx.stats.backfill_resumes += 1;
            let done =
                self.durable.backfill.as_ref().map_or(0, |checkpoint| {
                    checkpoint.steps.iter().map(|step| step.done).sum::<u64>()
                });
            self.trace_backfill(ctx, Traced::Resumed, done);
        }
        if let Some(peer) = lost {
            self.backfill_failed(ctx, Some(peer));
        }
        self.take_deferred(ctx);
        let watermarks = self.watermarks();
        // Each request tells the peer what this device heard of its copy (`request_marks`).
        let seen = self.durable.seen.clone();
        let persisted = self.durable.backfill.as_ref().map(persisted_part);
        let Some(driver) = self.driver() else { return };
        if driver.asked.is_some() || ctx.now < driver.not_before {
            return;
        }
        // The machine runs on what was persisted: after a restart it is the checkpoint itself.
        if persisted.as_ref() != Some(&persisted_part(driver.machine.checkpoint())) {
            ctx.fail(format!("{me}'s backfill machine is not at the checkpoint it stored"));
        }
        let command = driver.machine.next();
        let (peer, message, kind) = match command {
            Command::Idle => return,
            Command::Plan | Command::Rebase => {
                let Some(peer) = driver.pick() else { return };
                (
                    peer,
                    Message::WatermarksRequest(Watermarks {
                        seen: seen.get(&peer).copied(),
                        ..watermarks
                    }),
                    Asking::Plan,
                )
            }
            Command::Fetch { peer, step, after } => {
                // A resumed (or continuing) backfill asks for the page right after the last key
                // its checkpoint recorded: never from the start, never skipping one.
                let checkpoint = driver.machine.checkpoint();
                if checkpoint.steps.get(checkpoint.current).map(|current| &current.kind)
                    != Some(&step)
                    || after != checkpoint.cursor
                {
                    ctx.fail(format!(
                        "{me}'s backfill fetches {step:?} after {after:?}; its checkpoint is at \
                         step {} after {:?}",
                        checkpoint.current, checkpoint.cursor
                    ));
                }
                if !driver.online(peer) {
                    // The engine's transport refuses a request to a peer that is not connected.
                    self.backfill_failed(ctx, Some(peer));
                    return;
                }
                let limit = tuning::BACKFILL_PAGE;
                let message = match &step {
                    StepKind::State { owner, model } => Message::BackfillRequest(BackfillRequest {
                        owner: *owner,
                        model: model.clone(),
                        after,
                        limit,
                    }),
                    StepKind::Shared { model } => {
                        Message::SharedSnapshotRequest(SharedSnapshotRequest {
                            model: model.clone(),
                            after,
                            limit,
                        })
                    }
                };
                (peer, message, Asking::Page { step, after })
            }
            Command::CatchUp { peer } => {
                let Some(peer) = peer.filter(|peer| driver.online(*peer)).or_else(|| driver.pick())
                else {
                    return;
                };
                (
                    peer,
                    Message::WatermarksRequest(Watermarks {
                        seen: seen.get(&peer).copied(),
                        ..watermarks
                    }),
                    Asking::CatchUpMarks,
                )
            }
        };
        let request = *ctx.next_request;
        *ctx.next_request += 1;
        let deadline = ctx.now + tuning::REQUEST_TIMEOUT;
        driver.asked = Some(Asked { request, peer, deadline, kind });
        ctx.send(me, peer, Wire::Request(request, message));
    }

    /// A catch-up found a gap logs cannot close: what [`Backfill::on_resync_request`] decides
    /// (the engine's backfill actor takes the same decision), applied to the checkpoint. A copy
    /// that founded the library (no checkpoint) starts from a ready one. Deferred while a
    /// request of the backfill is in flight.
    pub(super) fn request_resync(&mut self, ctx: &mut Ctx<'_>, request: ResyncRequest) {
        let Some(volatile) = self.volatile.as_mut() else { return };
        let driver = volatile.backfill.get_or_insert_with(|| {
            Driver::new(self.durable.backfill.clone().unwrap_or_else(Checkpoint::ready))
        });
        if driver.asked.is_some() {
            driver.deferred.push(request);
            return;
        }
        let served = request.from.is_some_and(|from| driver.rollback_sources.contains(&from));
        match driver.machine.on_resync_request(&request, served, driver.preferred) {
            ResyncDecision::Stale => return,
            ResyncDecision::Covered { prefer } => {
                if prefer {
                    driver.preferred = request.from;
                }
                return;
            }
            ResyncDecision::Chain(next) => driver.machine = next,
            ResyncDecision::Start(next) => {
                driver.machine = next;
                driver.preferred = request.from;
                if let Some(from) = request.from {
                    driver.candidate(from).failed = false;
                }
                ctx.stats.resyncs += 1;
            }
        }
        let checkpoint = driver.machine.checkpoint().clone();
        self.durable.backfill = Some(checkpoint);
        self.published();
        self.trace_backfill(ctx, Traced::Resync, request.from.map_or(0, ident));
    }

    /// The checkpoint was stored: what the copy claims follows it again (the engine's backfill
    /// actor publishes `serves` from its machine whenever it stored one), ending the refusal a
    /// rollback found in a handler set ([`Device::rolled_back`]).
    fn published(&mut self) {
        if let Some(volatile) = self.volatile.as_mut() {
            volatile.claims_nothing = false;
        }
    }

    /// Resync requests deferred while a request was in flight.
    fn take_deferred(&mut self, ctx: &mut Ctx<'_>) {
        let Some(driver) = self.driver() else { return };
        if driver.asked.is_some() || driver.deferred.is_empty() {
            return;
        }
        for request in std::mem::take(&mut driver.deferred) {
            self.request_resync(ctx, request);
        }
    }

    /// A request of the backfill failed: the peer counts as failed for this backfill (every
    /// peer is forgiven once all failed), the machine drops it, and the next attempt waits.
    pub(super) fn backfill_failed(&mut self, ctx: &mut Ctx<'_>, peer: Option<DeviceId>) {
        let Some(driver) = self.driver() else { return };
        driver.asked = None;
        driver.failures = driver.failures.saturating_add(1);
        if let Some(peer) = peer {
            driver.candidate(peer).failed = true;
            driver.machine.peer_lost(peer);
        }
        if driver.pick().is_none() {
            for candidate in driver.candidates.values_mut() {
                candidate.failed = false;
            }
        }
        let backoff = tuning::BACKFILL_BACKOFF
            .saturating_mul(1 << driver.failures.saturating_sub(1).min(8))
            .min(tuning::BACKFILL_BACKOFF_MAX);
        driver.not_before = ctx.now + backoff;
        ctx.stats.backfill_failures += 1;
        self.trace_backfill(ctx, Traced::Failed, peer.map_or(0, ident));
    }

    /// Handles `message` if it answers the backfill's request in flight; otherwise hands it back.
    pub(super) fn on_backfill_response(
        &mut self,
        ctx: &mut Ctx<'_>,
        from: DeviceId,
        id: u64,
        message: Message,
    ) -> Option<Message> {
        let Some(driver) = self.driver() else { return Some(message) };
        let Some(asked) =
            driver.asked.take_if(|asked| asked.request == id && asked.kind != Asking::CatchUp)
        else {
            // Not the backfill's, or a late or duplicated answer to an abandoned request.
            return Some(message);
        };
        if asked.peer != from {
            ctx.fail(format!("{} got {from}'s answer to a request to {}", self.id, asked.peer));
            return None;
        }
        match (asked.kind, message) {
            (Asking::Plan, Message::WatermarksResponse(theirs)) => {
                self.observe_own_marks(ctx, &theirs);
                self.backfill_planned(ctx, from, &theirs);
            }
            (Asking::Page { step, after }, Message::SharedSnapshotPage(page)) => {
                self.backfill_records(ctx, &step, after, &page);
            }
            (Asking::Page { step, after }, Message::StatePage(page)) => {
                self.backfill_rows(ctx, &step, after, &page);
            }
            (Asking::CatchUpMarks, Message::WatermarksResponse(theirs)) => {
                self.observe_own_marks(ctx, &theirs);
                if self.begin_pull(ctx, from, &theirs, true) {
                    if let Some(driver) = self.driver() {
                        driver.asked = Some(Asked { kind: Asking::CatchUp, ..asked });
                    }
                } else {
                    self.backfill_caught_up(ctx, from);
                }
            }
            (_, Message::Error(_)) => self.backfill_failed(ctx, Some(from)),
            (kind, other) => {
                ctx.fail(format!(
                    "{} got {} in answer to its backfill request {kind:?}",
                    self.id,
                    other.name()
                ));
            }
        }
        None
    }

    /// `from`'s watermarks: the plan (or, after losing the serving peer, the rebase onto `from`).
    fn backfill_planned(&mut self, ctx: &mut Ctx<'_>, from: DeviceId, theirs: &Watermarks) {
        let Some(driver) = self.driver() else { return };
        driver.candidate(from).ready = Some(theirs.ready);
        if !theirs.ready {
            // Not a complete copy: not a source. Another peer is asked at once.
            return;
        }
        let traced = match driver.machine.next() {
            Command::Plan => {
                driver.machine.planned(from, theirs, &models());
                Traced::Planned
            }
            Command::Rebase => {
                driver.machine.rebased(from, theirs);
                ctx.stats.backfill_rebases += 1;
                Traced::Rebased
            }
            _ => return,
        };
        driver.failures = 0;
        let checkpoint = driver.machine.checkpoint().clone();
        let steps = checkpoint.steps.len() as u64;
        self.durable.backfill = Some(checkpoint);
        self.published();
        self.trace_backfill(ctx, traced, steps);
    }

    /// Checks that a page answers the request: keys strictly increasing, all after the cursor,
    /// no more than asked for.
    fn check_page(&self, ctx: &mut Ctx<'_>, keys: &[Uuid], after: Option<Uuid>) {
        let ordered = keys.windows(2).all(|pair| pair[0] < pair[1]);
        let after_cursor =
            keys.first().is_none_or(|first| after.is_none_or(|after| *first > after));
        let limit = usize::try_from(tuning::BACKFILL_PAGE).unwrap_or(usize::MAX);
        if !ordered || !after_cursor || keys.len() > limit {
            ctx.fail(format!(
                "{} got a backfill page of {} keys after {after:?} out of key order or not after \
                 its cursor",
                self.id,
                keys.len()
            ));
        }
    }

    /// A page of the shared step: merged into the registers as any snapshot record is.
    fn backfill_records(
        &mut self,
        ctx: &mut Ctx<'_>,
        step: &StepKind,
        after: Option<Uuid>,
        page: &SharedSnapshotPage,
    ) {
        if *step != (StepKind::Shared { model: page.model.clone() }) {
            ctx.fail(format!("{} got records of {} for step {step:?}", self.id, page.model));
            return;
        }
        let keys: Vec<Uuid> = page.records.iter().map(|record| record.id).collect();
        self.check_page(ctx, &keys, after);
        for record in &page.records {
            self.durable
                .records
                .entry(record.id)
                .or_default()
                .merge(&RecordState::from_record(record));
        }
        let fetched = Fetched {
            keys: &keys,
            held: &[],
            more: page.more,
            estimated_total: page.estimated_total,
            forgotten: None,
        };
        self.backfill_page(ctx, None, &fetched);
    }

    /// A page of one owner's rows: applied through the owner-version rule, as every row is.
    fn backfill_rows(
        &mut self,
        ctx: &mut Ctx<'_>,
        step: &StepKind,
        after: Option<Uuid>,
        page: &StatePage,
    ) {
        if *step != (StepKind::State { owner: page.owner, model: page.model.clone() }) {
            ctx.fail(format!(
                "{} got rows of {}@{} for step {step:?}",
                self.id, page.model, page.owner
            ));
            return;
        }
        let keys: Vec<Uuid> = page.rows.iter().map(|row| row.id).collect();
        self.check_page(ctx, &keys, after);
        // As the engine's backfill: a rollback resync's pages of this device's own rows apply
        // by the source's word, not against its own mark (which may lie above rows it lost),
        // except through the marks an earlier one left (`own_rows_known_through`).
        let against = match self.durable.backfill.as_ref() {
            Some(checkpoint) if checkpoint.delete_missing && page.owner == self.id => {
                super::Against::Known(checkpoint.own_rows_known_through(self.id, &page.model))
            }
            _ => super::Against::Held,
        };
        self.apply_rows_against(ctx, page.owner, &page.rows, against);
        let held: Vec<(Uuid, lsync_hlc::HlcTime)> =
            page.rows.iter().map(|row| (row.id, row.version)).collect();
        let fetched = Fetched {
            keys: &keys,
            held: &held,
            more: page.more,
            estimated_total: page.estimated_total,
            forgotten: page.collected,
        };
        self.backfill_page(ctx, Some(page.owner), &fetched);
    }

    /// The rest of a page's transaction: what the machine derives from the page (marks to raise,
    /// a range to delete), and the new checkpoint.
    fn backfill_page(&mut self, ctx: &mut Ctx<'_>, owner: Option<DeviceId>, fetched: &Fetched<'_>) {
        let Fetched { keys, held, more, estimated_total, forgotten } = *fetched;
        let now_ms = u64::try_from(ctx.now.as_millis()).unwrap_or(u64::MAX);
        let Some(driver) = self.driver() else { return };
        let outcome = driver.machine.page(keys, more, estimated_total, forgotten, now_ms);
        driver.failures = 0;
        let checkpoint = driver.machine.checkpoint().clone();
        // A full resync's deletion of what the serving peer no longer holds (never for a joining
        // device: its plan does not delete), bounded by the peer's mark as the engine's is.
        if let (Some((after, through)), Some(owner)) = (outcome.delete_missing, owner) {
            let peer_mark = checkpoint
                .state_marks
                .iter()
                .find(|mark| mark.owner == owner && mark.model == STATE_MODEL)
                .map(|mark| mark.version);
            if let Some(peer_mark) = peer_mark {
                self.delete_missing(owner, after, through, peer_mark, held);
            }
        }
        // Everything the serving peer held up to its marks is here now: the changes below the
        // shared marks are covered by the records (never held in this log; the checker verifies
        // the records reflect each of them), the rows below a state mark by the step's pages.
        for mark in &outcome.raise_shared {
            let base = self.durable.snapshot_base.entry(mark.origin).or_insert(0);
            *base = (*base).max(mark.seq);
            self.durable.shared.raise(mark.origin, mark.seq);
            self.durable.advance(mark.origin);
        }
        for mark in &outcome.raise_state {
            self.durable.state.raise(mark.owner, &mark.model, mark.version);
        }
        for mark in &outcome.raise_collected {
            self.durable.collected.raise(mark.owner, &mark.model, mark.version);
        }
        let done = checkpoint.steps.iter().map(|step| step.done).sum::<u64>();
        self.durable.backfill = Some(checkpoint);
        self.published();
        ctx.stats.backfill_pages += 1;
        self.trace_backfill(ctx, Traced::Page, done);
    }

    /// The catch-up after the last page ended: the copy is ready.
    pub(super) fn backfill_caught_up(&mut self, ctx: &mut Ctx<'_>, from: DeviceId) {
        let Some(driver) = self.driver() else { return };
        driver.asked = None;
        driver.failures = 0;
        let checkpoint = driver.machine.checkpoint();
        if checkpoint.delete_missing && checkpoint.scope == lsync_backfill::Scope::Everything {
            driver.rollback_sources.insert(from);
        }
        driver.machine.caught_up();
        let checkpoint = driver.machine.checkpoint().clone();
        let ready = driver.machine.is_ready();
        let joined = !checkpoint.complete_before;
        if ready {
            driver.preferred = None;
        }
        // Ready, or (a chained resync) the next plan: persisted either way.
        self.durable.backfill = Some(checkpoint);
        self.published();
        if !ready {
            return;
        }
        // A joining device's backfill (a resync of a copy that was complete is counted when it
        // starts, `Stats::resyncs`).
        if joined {
            ctx.stats.backfills += 1;
        }
        self.trace_backfill(ctx, Traced::Ready, ident(from));
        self.ack(ctx, from);
        if self.durable.backfill.as_ref().is_some_and(Checkpoint::brought_back_own_rows) {
            self.start_barrier(ctx);
        }
    }

    /// Serves a backfill page of `owner`'s rows in primary-key order after the cursor, as the
    /// engine's `rows_by_key` does, with the count of the owner's rows on the step's first page
    /// and its tombstones among them (see [`tuning::BACKFILL_TOMBSTONES`]).
    pub(super) fn serve_backfill_rows(&self, request: &BackfillRequest) -> Message {
        if request.model != STATE_MODEL {
            return unknown_model(&request.model);
        }
        let live = |(_, held): &(&Uuid, &super::Held)| {
            held.owner == request.owner && (held.value.is_some() || tuning::BACKFILL_TOMBSTONES)
        };
        let lower = request.after.map_or(Bound::Unbounded, Bound::Excluded);
        let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
        let mut rows = self.durable.rows.range((lower, Bound::Unbounded)).filter(live);
        let page: Vec<StateRow> =
            rows.by_ref().take(limit).map(|(id, held)| held.to_row(*id)).collect();
        let more = rows.next().is_some();
        let estimated_total = match request.after {
            None => self.durable.rows.iter().filter(live).count() as u64,
            Some(_) => 0,
        };
        Message::StatePage(StatePage {
            owner: request.owner,
            model: request.model.clone(),
            columns: vec!["value".into()],
            rows: page,
            more,
            estimated_total,
            collected: self.durable.collected.get(request.owner, &request.model),
        })
    }

    /// Serves a page of the merged shared records in primary-key order after the cursor, as the
    /// engine's `snapshot_page` does (deleted records included: their registers are the state).
    pub(super) fn serve_snapshot(&self, request: &SharedSnapshotRequest) -> Message {
        if request.model != SHARED_MODEL {
            return unknown_model(&request.model);
        }
        let lower = request.after.map_or(Bound::Unbounded, Bound::Excluded);
        let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
        let mut records = self.durable.records.range((lower, Bound::Unbounded));
        let page = records.by_ref().take(limit).map(|(id, record)| record.to_record(*id)).collect();
        let more = records.next().is_some();
        let estimated_total = match request.after {
            None => self.durable.records.len() as u64,
            Some(_) => 0,
        };
        Message::SharedSnapshotPage(SharedSnapshotPage {
            model: request.model.clone(),
            records: page,
            more,
            estimated_total,
        })
    }
}

fn unknown_model(model: &str) -> Message {
    Message::Error(ErrorMessage {
        code: ErrorCode::NotAvailable,
        message: format!("no model {model} here"),
    })
}

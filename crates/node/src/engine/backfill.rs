//! The `BackfillActor`: the shell around [`lsync_backfill::Backfill`]. It asks the machine what
//! to do, does it (a request to a peer, a page applied with its checkpoint in one transaction),
//! reports the result, and repeats until the copy is ready. One request or transaction at a time,
//! so memory stays bounded by one page whatever the library's size.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use lsync_backfill::{Backfill, Candidate, Command, Models, ResyncDecision, Scope, choose_peer};
use lsync_hlc::DeviceId;
use lsync_protocol::Watermarks;
use lsync_store::Ownership;
use lsync_transport::Transport;

use super::Supervisor;
use crate::events::Event;
use crate::library::{LibraryInner, now_ms};
use crate::sync;

/// Drives the backfill of this copy (see the module docs).
pub(super) struct BackfillActor<T: Transport> {
    inner: Arc<LibraryInner>,
    transport: Arc<T>,
    supervisor: Addr<Supervisor<T>>,
    machine: Backfill,
    /// What is known of each peer, for choosing whom to backfill from.
    candidates: HashMap<DeviceId, Candidate>,
    /// The source a resync asked for ([`Resync::from`]), until the backfill ends.
    preferred: Option<DeviceId>,
    /// The peers a resync after a rollback was served by since the actor started: a later
    /// report of the same rollback from one of them asks for nothing it did not bring.
    rollback_sources: std::collections::HashSet<DeviceId>,
    /// A request or transaction is in flight.
    busy: bool,
    /// Consecutive failures without progress (for backoff).
    failures: u32,
    /// The next page, requested while the current one is applied.
    prefetch: Option<(Command, PendingPage)>,
    _watch: super::Watch,
}

/// A page being fetched.
type PendingPage = tokio::sync::oneshot::Receiver<Result<sync::BackfillPage, sync::CatchUpError>>;

impl<T: Transport> BackfillActor<T> {
    pub(super) fn new(
        inner: Arc<LibraryInner>,
        transport: Arc<T>,
        supervisor: Addr<Supervisor<T>>,
        checkpoint: lsync_backfill::Checkpoint,
        watch: super::Watch,
    ) -> Self {
        let mut machine = Backfill::new(checkpoint);
        if !inner.enabled.load(std::sync::atomic::Ordering::Acquire) {
            machine.pause();
        }
        Self {
            inner,
            transport,
            supervisor,
            machine,
            candidates: HashMap::new(),
            preferred: None,
            rollback_sources: std::collections::HashSet::new(),
            busy: false,
            failures: 0,
            prefetch: None,
            _watch: watch,
        }
    }

    /// The models a plan covers: shared ones, then device-owned ones in the registry's order
    /// (parents first).
    fn models(&self) -> Models {
        let mut models = Models::default();
        for model in self.inner.registry().in_apply_order() {
            match model.ownership {
                Ownership::DeviceOwned => models.state.push(model.name.clone()),
                _ => models.shared.push(model.name.clone()),
            }
        }
        models
    }

    /// Publishes progress to status and subscribers, and the ready flag to the engine.
    fn publish(&self) {
        let progress = self.machine.progress(now_ms());
        self.inner.ready.store(self.machine.is_ready(), std::sync::atomic::Ordering::Release);
        self.inner.serves.store(self.machine.serves(), std::sync::atomic::Ordering::Release);
        self.inner
            .backfills_completed
            .store(self.machine.checkpoint().completed, std::sync::atomic::Ordering::Release);
        *self.inner.backfill.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(progress.clone());
        metrics::gauge!("lsync_backfill_rows_done").set(progress.done as f64);
        metrics::gauge!("lsync_backfill_rows_total").set(progress.total as f64);
        self.inner.emit(Event::Backfill(progress));
    }

    fn pick(&self) -> Option<DeviceId> {
        let candidates: Vec<Candidate> = self.candidates.values().copied().collect();
        choose_peer(&candidates, self.preferred)
    }

    /// A request to `peer` failed: try another peer (or this one again after a backoff).
    fn failed(
        &mut self,
        ctx: &mut Context<Self>,
        peer: Option<DeviceId>,
        error: &dyn std::fmt::Display,
    ) {
        self.busy = false;
        self.prefetch = None;
        self.failures += 1;
        metrics::counter!("lsync_backfill_failures_total").increment(1);
        tracing::warn!(?peer, %error, "backfill step failed; continuing from the checkpoint");
        if let Some(peer) = peer {
            if let Some(candidate) = self.candidates.get_mut(&peer) {
                candidate.failed = true;
            }
            self.machine.peer_lost(peer);
        }
        if self.pick().is_none() {
            // Every peer failed once: forgive them and retry after a backoff.
            for candidate in self.candidates.values_mut() {
                candidate.failed = false;
            }
        }
        let delay = Duration::from_millis(100u64.saturating_mul(1 << self.failures.min(8)))
            .min(self.inner.config.retry_max.max(Duration::from_millis(100)));
        ctx.run_later(delay, |actor, ctx| actor.drive(ctx));
    }

    /// Asks the machine what to do and starts doing it.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        match self.machine.next() {
            Command::Idle => {}
            Command::Plan | Command::Rebase => {
                let Some(peer) = self.pick() else {
                    tracing::debug!(candidates = ?self.candidates, "no peer to backfill from yet");
                    return;
                };
                tracing::debug!(%peer, "asking a peer for its watermarks to plan the backfill");
                self.busy = true;
                let (inner, transport) = (self.inner.clone(), self.transport.clone());
                let work =
                    async move { sync::exchange_watermarks(&inner, &*transport, peer).await };
                ctx.wait(work.into_actor(self).map(move |result: Result<Watermarks, _>, actor, ctx| {
                    match result {
                        Ok(theirs) if !theirs.ready => {
                            // Not a complete copy: not a source.
                            tracing::debug!(%peer, "not a complete copy: not a backfill source");
                            actor.busy = false;
                            if let Some(candidate) = actor.candidates.get_mut(&peer) {
                                candidate.ready = Some(false);
                            }
                            actor.drive(ctx);
                        }
                        Ok(theirs) => {
                            let mut next = actor.machine.clone();
                            if next.next() == Command::Plan {
                                let models = actor.models();
                                next.planned(peer, &theirs, &models);
                                tracing::info!(%peer, steps = next.checkpoint().steps.len(), "backfill planned");
                            } else {
                                next.rebased(peer, &theirs);
                                tracing::info!(%peer, "backfill continues from another peer");
                            }
                            actor.persist(ctx, next);
                        }
                        Err(error) => actor.failed(ctx, Some(peer), &error),
                    }
                }));
            }
            command @ Command::Fetch { .. } => {
                let Command::Fetch { peer, .. } = command else { return };
                self.busy = true;
                // The page asked for while the previous one was applied, or a new request.
                let fetched = match self.prefetch.take() {
                    Some((asked, fetched)) if asked == command => fetched,
                    _ => self.fetch(&command),
                };
                let work = async move {
                    fetched.await.unwrap_or(Err(sync::CatchUpError::Unexpected("a dropped fetch")))
                };
                ctx.wait(work.into_actor(self).map(move |result, actor, ctx| match result {
                    Ok(page) => {
                        let keys = page.keys();
                        let (more, total) = page.more_and_total();
                        let mut next = actor.machine.clone();
                        let outcome = next.page(&keys, more, total, page.forgotten(), now_ms());
                        // Ask for the next page now: the peer reads it and the network carries
                        // it while this one is written. At most two pages are in memory.
                        let following = next.next();
                        if matches!(following, Command::Fetch { .. }) {
                            let fetched = actor.fetch(&following);
                            actor.prefetch = Some((following, fetched));
                        }
                        let inner = actor.inner.clone();
                        let checkpoint = next.checkpoint().clone();
                        let apply = async move {
                            sync::apply_backfill_page(&inner, peer, page, &outcome, &checkpoint)
                                .await
                        };
                        ctx.wait(apply.into_actor(actor).map(move |result, actor, ctx| {
                            match result {
                                Ok(()) => {
                                    actor.machine = next;
                                    actor.failures = 0;
                                    actor.busy = false;
                                    actor.publish();
                                    actor.drive(ctx);
                                }
                                // The machine stays at the last committed checkpoint.
                                Err(error) => actor.failed(ctx, None, &error),
                            }
                        }));
                    }
                    Err(error) => actor.failed(ctx, Some(peer), &error),
                }));
            }
            Command::CatchUp { peer } => {
                let Some(peer) = peer
                    .filter(|peer| self.candidates.get(peer).is_some_and(|c| c.online))
                    .or_else(|| self.pick())
                else {
                    return;
                };
                self.busy = true;
                let (inner, transport) = (self.inner.clone(), self.transport.clone());
                let work = async move {
                    let theirs = sync::exchange_watermarks(&inner, &*transport, peer).await?;
                    sync::catch_up(&inner, &*transport, peer, &theirs).await
                };
                ctx.wait(work.into_actor(self).map(move |result, actor, ctx| match result {
                    Ok(_) => {
                        let mut next = actor.machine.clone();
                        let again = next.checkpoint().resync_after.first().copied();
                        let checkpoint = next.checkpoint();
                        if checkpoint.delete_missing && checkpoint.scope == Scope::Everything {
                            actor.rollback_sources.insert(peer);
                        }
                        next.caught_up();
                        if let Some(again) = again {
                            tracing::warn!(%peer, from = %again, "resync done; another peer heard more of this copy: resyncing from it too");
                            actor.preferred = Some(again);
                            if let Some(candidate) = actor.candidates.get_mut(&again) {
                                candidate.failed = false;
                            }
                        } else {
                            tracing::info!(%peer, "backfill complete: this copy is ready");
                        }
                        actor.persist(ctx, next);
                    }
                    Err(error) => actor.failed(ctx, Some(peer), &error),
                }));
            }
        }
    }

    /// Starts fetching the page `command` names, in a task of its own (it touches no local
    /// state, only the network).
    fn fetch(&self, command: &Command) -> PendingPage {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        if let Command::Fetch { peer, step, after } = command.clone() {
            let (inner, transport) = (self.inner.clone(), self.transport.clone());
            actix::spawn(async move {
                let page = sync::fetch_backfill_page(&inner, &*transport, peer, &step, after).await;
                let _ = sender.send(page);
            });
        }
        receiver
    }

    /// Stores `next`'s checkpoint, then adopts it and goes on.
    fn persist(&mut self, ctx: &mut Context<Self>, next: Backfill) {
        let inner = self.inner.clone();
        let checkpoint = next.checkpoint().clone();
        ctx.wait(
            async move { sync::store_checkpoint(&inner, &checkpoint).await }.into_actor(self).map(
                move |result, actor, ctx| match result {
                    Ok(()) => {
                        let became_ready = !actor.machine.is_ready() && next.is_ready();
                        actor.machine = next;
                        actor.busy = false;
                        actor.publish();
                        if became_ready {
                            actor.preferred = None;
                            actor.supervisor.do_send(super::BackfillDone);
                        }
                        actor.drive(ctx);
                    }
                    Err(error) => actor.failed(ctx, None, &error),
                },
            ),
        );
    }
}

impl<T: Transport> Actor for BackfillActor<T> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.inner.ready.store(self.machine.is_ready(), std::sync::atomic::Ordering::Release);
        self.inner.serves.store(self.machine.serves(), std::sync::atomic::Ordering::Release);
        if !self.machine.is_ready() {
            self.publish();
        }
        self.drive(ctx);
    }
}

/// Supervisor → backfill actor: what is known of a peer changed.
pub(super) struct PeerUpdate {
    pub(super) peer: DeviceId,
    pub(super) online: bool,
    pub(super) rtt_us: Option<u64>,
    pub(super) ready: Option<bool>,
}
impl Message for PeerUpdate {
    type Result = ();
}

impl<T: Transport> Handler<PeerUpdate> for BackfillActor<T> {
    type Result = ();
    fn handle(&mut self, update: PeerUpdate, ctx: &mut Self::Context) {
        let candidate = self.candidates.entry(update.peer).or_insert(Candidate {
            device: update.peer,
            rtt_us: None,
            online: false,
            ready: None,
            failed: false,
        });
        let came_online = update.online && !candidate.online;
        candidate.online = update.online;
        candidate.rtt_us = update.rtt_us.or(candidate.rtt_us);
        candidate.ready = update.ready.or(candidate.ready);
        if came_online {
            candidate.failed = false;
        }
        if !update.online {
            self.machine.peer_lost(update.peer);
        }
        self.drive(ctx);
    }
}

/// Supervisor → backfill actor: sync switched off (pause) or on (resume).
pub(super) struct SetPaused(pub(super) bool);
impl Message for SetPaused {
    type Result = ();
}

impl<T: Transport> Handler<SetPaused> for BackfillActor<T> {
    type Result = ();
    fn handle(&mut self, SetPaused(paused): SetPaused, ctx: &mut Self::Context) {
        if paused {
            self.machine.pause();
        } else {
            self.machine.resume();
        }
        if !self.machine.is_ready() {
            self.publish();
        }
        self.drive(ctx);
    }
}

/// Supervisor (from a peer actor) → backfill actor: a gap that peer logs cannot close.
pub(super) struct Resync {
    pub(super) scope: Scope,
    pub(super) delete_missing: bool,
    /// The peer to resync from if it can serve (see [`choose_peer`]).
    pub(super) from: Option<DeviceId>,
    /// Backfills this copy had completed when the need was seen
    /// ([`LibraryInner::backfills_completed`](crate::library::LibraryInner)).
    pub(super) completed: u64,
}
impl Message for Resync {
    type Result = ();
}

impl<T: Transport> Handler<Resync> for BackfillActor<T> {
    type Result = ();
    fn handle(&mut self, resync: Resync, ctx: &mut Self::Context) {
        // The decision is `Backfill::on_resync_request`'s (the deterministic simulator takes
        // the same one); this handler only persists what it chose.
        let request = lsync_backfill::ResyncRequest {
            scope: resync.scope,
            delete_missing: resync.delete_missing,
            from: resync.from,
            completed: resync.completed,
        };
        let served = resync.from.is_some_and(|from| self.rollback_sources.contains(&from));
        let decision = self.machine.on_resync_request(&request, served, self.preferred);
        let next = match decision {
            ResyncDecision::Stale => return,
            ResyncDecision::Covered { prefer } => {
                if prefer {
                    self.preferred = resync.from;
                }
                return;
            }
            ResyncDecision::Chain(_) | ResyncDecision::Start(_) if self.busy => {
                // Retry once the step in flight ends (it may move the checkpoint).
                ctx.run_later(Duration::from_millis(50), move |_, ctx| {
                    ctx.address().do_send(resync);
                });
                return;
            }
            ResyncDecision::Chain(after) => {
                // A rollback resync runs from another peer: this one may have heard more of
                // this copy's own rows; it serves the next resync, once this one ends.
                tracing::warn!(from = ?resync.from, "rolled back, told again during the resync: another follows from that peer");
                self.busy = true;
                self.persist(ctx, after);
                return;
            }
            ResyncDecision::Start(next) => next,
        };
        self.preferred = resync.from;
        // The peer that showed the need just answered: a failure of an earlier backfill (its
        // sync was off then) does not rule it out.
        if let Some(candidate) = resync.from.and_then(|from| self.candidates.get_mut(&from)) {
            candidate.failed = false;
        }
        tracing::warn!(scope = ?resync.scope, "a gap peer logs cannot close: resyncing");
        metrics::counter!("lsync_resyncs_total").increment(1);
        self.busy = true;
        self.inner.ready.store(false, std::sync::atomic::Ordering::Release);
        self.persist(ctx, next);
    }
}

#[cfg(test)]
impl<T: Transport> Handler<super::Crash> for BackfillActor<T> {
    type Result = ();
    fn handle(&mut self, _: super::Crash, _: &mut Self::Context) {
        panic!("injected failure of the backfill actor");
    }
}

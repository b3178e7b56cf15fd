//! The actors: a supervisor owning a `PeerActor` per remote device, a `BackfillActor`, a
//! `RetryActor` and a `PrunerActor`, all on one dedicated thread running an actix system. Every actor is a thin
//! shell: decisions live in [`crate::core`] and in the storage crates, IO in [`crate::sync`].
//!
//! Message flow:
//! - the library hands local writes to the supervisor ([`LocalState`], [`LocalShared`]); the
//!   supervisor batches them ([`Batcher`]) and, when a window closes, sends each batch to every
//!   online peer's actor ([`Push`]);
//! - a pump task forwards every [`TransportEvent`] to the supervisor, which routes it to the
//!   peer's actor ([`FromPeer`]);
//! - a peer actor applies what its peer sent, in order, one transaction per batch, and
//!   acknowledges; it answers requests; on connect (and when heartbeat watermarks show it is
//!   behind) it catches up;
//! - after each send a peer actor registers the message with the retry actor, which re-sends
//!   through the supervisor what was not acknowledged in time, with backoff, and forgets what was;
//! - acknowledgements wake the pruner, which also runs on an interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use lsync_hlc::{DeviceId, HlcTime};
use lsync_protocol::{Message as WireMessage, SharedBatch, SharedChange, StateBatch, StateRow};
use lsync_store::Database;
use lsync_transport::{DisconnectReason, Transport, TransportEvent};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::core::batcher::{Batcher, Flush};
use crate::core::retry::{Coverage, RetryConfig, RetryQueue};
use crate::events::Event;
use crate::library::{BoxFuture, Engine, EngineStatus, LibraryInner};
use crate::sync;

mod backfill;
#[cfg(test)]
mod tests;

use backfill::BackfillActor;

/// Starts the engine thread and its actors; returns the handle the library talks to.
pub(crate) async fn start<T: Transport>(
    inner: Arc<LibraryInner>,
    transport: T,
    events: mpsc::Receiver<TransportEvent>,
) -> Box<dyn Engine> {
    let checkpoint = match inner.db.write(async |conn| lsync_backfill::sql::load(conn).await).await
    {
        Ok(checkpoint) => checkpoint.unwrap_or_else(lsync_backfill::Checkpoint::ready),
        Err(error) => {
            tracing::error!(%error, "cannot read the backfill checkpoint; sync does not start");
            return Box::new(DeadEngine);
        }
    };
    let (ready, ready_rx) = tokio::sync::oneshot::channel();
    let transport = Arc::new(transport);
    let engine_transport = transport.clone();
    let thread = std::thread::Builder::new().name("lsync-engine".into()).spawn(move || {
        // Futures the engine leaves behind when it stops are dropped after its runtime stopped;
        // some (a database connection going back to its pool) spawn a task from their destructor,
        // which panics without a Tokio context. This context outlives the engine's runtime; what
        // is spawned on it is dropped with it, never run.
        let leftovers = tokio::runtime::Builder::new_current_thread().build();
        let _context = leftovers.as_ref().map(tokio::runtime::Runtime::enter);
        let system = System::new();
        system.block_on(async move {
            let supervisor = Supervisor::new(inner, engine_transport, checkpoint).start();
            actix::spawn(pump(events, supervisor.clone()));
            let _ = ready.send((supervisor, System::current()));
        });
        if let Err(error) = system.run() {
            tracing::error!(%error, "the engine thread stopped with an error");
        }
    });
    match thread {
        Ok(thread) => match ready_rx.await {
            Ok((supervisor, system)) => Box::new(EngineHandle {
                supervisor,
                system,
                thread: std::sync::Mutex::new(Some(thread)),
                transport,
            }),
            Err(_) => Box::new(DeadEngine),
        },
        Err(error) => {
            tracing::error!(%error, "cannot start the engine thread");
            Box::new(DeadEngine)
        }
    }
}

/// Forwards transport events to the supervisor, waiting when its mailbox is full (so a flood of
/// incoming batches slows the transport down instead of growing memory).
async fn pump<T: Transport>(
    mut events: mpsc::Receiver<TransportEvent>,
    supervisor: Addr<Supervisor<T>>,
) {
    while let Some(event) = events.recv().await {
        tracing::trace!(?event, "pump");
        if supervisor.send(FromTransport(event)).await.is_err() {
            break;
        }
    }
}

pub(crate) struct EngineHandle<T: Transport> {
    supervisor: Addr<Supervisor<T>>,
    system: System,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// For `abort`, which stops the transport without the supervisor.
    transport: Arc<T>,
}

impl<T: Transport> Engine for EngineHandle<T> {
    fn local_state(
        &self,
        model: String,
        since: Option<HlcTime>,
        rows: Vec<StateRow>,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.supervisor.send(LocalState { model, since, rows }).await;
        })
    }

    fn local_shared(&self, changes: Vec<SharedChange>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.supervisor.send(LocalShared { changes }).await;
        })
    }

    fn set_enabled(&self, enabled: bool) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.supervisor.send(SetEnabled(enabled)).await;
        })
    }

    fn status(&self) -> BoxFuture<'_, EngineStatus> {
        Box::pin(async move { self.supervisor.send(GetStatus).await.unwrap_or_default() })
    }

    fn abort(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.system.stop();
            let thread =
                self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(thread) = thread {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            // A dead process's connections die with it; in-process, the transport's tasks would
            // live on and answer heartbeats for a device that no longer listens. The actors are
            // gone, so nothing new is sent.
            let _ = self.transport.shutdown().await;
        })
    }

    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn shutdown<'a>(&'a self, db: &'a Database) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self.supervisor.send(Shutdown).await;
            // Stopping the system drops every future of the actors where it stands. Let the write
            // in progress finish and keep later ones from starting: a write dropped while it waits
            // for its turn has done nothing, one dropped inside its transaction could leave it
            // open. (A batch not applied was not acknowledged, so its sender sends it again;
            // acks and watermarks are exchanged again on the next connection.)
            let held = db.hold_writes().await;
            self.system.stop();
            let thread =
                self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            if let Some(thread) = thread {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            drop(held);
        })
    }
}

/// Stands in when the engine thread could not start: sync does nothing, writes still commit.
struct DeadEngine;

impl Engine for DeadEngine {
    fn local_state(&self, _: String, _: Option<HlcTime>, _: Vec<StateRow>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn local_shared(&self, _: Vec<SharedChange>) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn set_enabled(&self, _: bool) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn status(&self) -> BoxFuture<'_, EngineStatus> {
        Box::pin(async { EngineStatus::default() })
    }
    fn shutdown<'a>(&'a self, _: &'a Database) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    fn abort(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    #[cfg(test)]
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// Library → supervisor: local device-owned rows were committed.
struct LocalState {
    model: String,
    since: Option<HlcTime>,
    rows: Vec<StateRow>,
}
impl Message for LocalState {
    type Result = ();
}

/// Library → supervisor: local shared changes were committed.
struct LocalShared {
    changes: Vec<SharedChange>,
}
impl Message for LocalShared {
    type Result = ();
}

/// Library → supervisor: sync switched on or off.
struct SetEnabled(bool);
impl Message for SetEnabled {
    type Result = ();
}

/// Library → supervisor: report peers and queues.
struct GetStatus;
impl Message for GetStatus {
    type Result = EngineStatus;
}

/// Library → supervisor: flush, stop children and the transport.
struct Shutdown;
impl Message for Shutdown {
    type Result = ();
}

/// Pump → supervisor: something happened on the network.
struct FromTransport(TransportEvent);
impl Message for FromTransport {
    type Result = ();
}

/// Supervisor → peer actor: a transport event about this peer.
struct FromPeer(TransportEvent);
impl Message for FromPeer {
    type Result = ();
}

/// Supervisor (or retry actor, through the supervisor) → peer actor: send this to the peer and
/// register it for acknowledgement.
struct Push {
    message: WireMessage,
    /// What an acknowledgement must cover; `None` for a re-send, which the retry actor already
    /// tracks (with its attempt count).
    covers: Option<Coverage>,
}
impl Message for Push {
    type Result = ();
}

/// Retry actor → supervisor: re-send to `peer`.
struct Resend {
    peer: DeviceId,
    message: WireMessage,
}
impl Message for Resend {
    type Result = ();
}

/// Peer actor → retry actor: sent (or failed to send) a message that awaits acknowledgement.
struct Sent {
    peer: DeviceId,
    message: WireMessage,
    covers: Coverage,
}
impl Message for Sent {
    type Result = ();
}

/// Peer actor → retry actor (and pruner): the peer acknowledged.
struct Acked {
    peer: DeviceId,
    ack: lsync_protocol::Ack,
}
impl Message for Acked {
    type Result = ();
}

/// Peer actor → retry actor: the peer went offline; catch-up will take over.
struct PeerGone(DeviceId);
impl Message for PeerGone {
    type Result = ();
}

/// Supervisor → retry actor: how many messages wait.
struct RetryLen;
impl Message for RetryLen {
    type Result = usize;
}

/// Anyone → pruner: acks moved; prune soon.
struct PruneSoon;
impl Message for PruneSoon {
    type Result = ();
}

/// Peer actor → supervisor: the peer's online state and round trip, for status.
struct PeerState {
    peer: DeviceId,
    online: bool,
    rtt_us: Option<u64>,
    /// Whether the peer announced a complete copy, if this update knows.
    ready: Option<bool>,
}
impl Message for PeerState {
    type Result = ();
}

/// Backfill actor → supervisor: this copy became ready; catch up from every online peer.
struct BackfillDone;
impl Message for BackfillDone {
    type Result = ();
}

impl<T: Transport> Handler<BackfillDone> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, _: BackfillDone, ctx: &mut Self::Context) {
        for peer in self.online.keys().copied().collect::<Vec<_>>() {
            self.peer(peer, ctx).do_send(CatchUpNow);
        }
    }
}

/// Peer actor → supervisor: the peer pruned changes this device lacks; only a snapshot helps.
struct ResyncNeeded {
    scope: lsync_backfill::Scope,
    /// Delete rows the peer no longer holds (a full resync).
    delete_missing: bool,
}
impl Message for ResyncNeeded {
    type Result = ();
}

impl<T: Transport> Handler<ResyncNeeded> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, resync: ResyncNeeded, _: &mut Self::Context) {
        if let Some(backfill) = &self.backfill {
            backfill.do_send(backfill::Resync {
                scope: resync.scope,
                delete_missing: resync.delete_missing,
            });
        }
    }
}

/// Child → supervisor: what went wrong, just before the child stops (it is then restarted
/// with backoff, see [`ChildStopped`]).
struct ChildFailed {
    child: Child,
    error: String,
}
impl Message for ChildFailed {
    type Result = ();
}

/// One of the supervisor's children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Child {
    Pruner,
    Retry,
    Backfill,
    Peer(DeviceId),
}

impl Child {
    fn name(self) -> &'static str {
        match self {
            Child::Pruner => "pruner",
            Child::Retry => "retry",
            Child::Backfill => "backfill",
            Child::Peer(_) => "peer",
        }
    }
}

/// Lives inside every child actor. When the actor goes — it stopped, or a handler panicked and
/// the runtime dropped it — dropping the watch tells the supervisor, which restarts it unless
/// the engine is shutting down.
pub(super) struct Watch {
    child: Child,
    generation: u64,
    supervisor: Recipient<ChildStopped>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.supervisor.do_send(ChildStopped { child: self.child, generation: self.generation });
    }
}

/// Watch → supervisor: a child is gone.
pub(super) struct ChildStopped {
    child: Child,
    generation: u64,
}
impl Message for ChildStopped {
    type Result = ();
}

/// How often a child failed lately, for its restart backoff.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// A child that ran this long since its last failure starts its backoff afresh.
const FAILURES_FORGOTTEN_AFTER: Duration = Duration::from_secs(300);

/// The retry actor and pruner as they are now: peer actors and their sender tasks read them here
/// at each use, so a restarted child is reached without restarting every peer actor.
struct Siblings<T: Transport> {
    retry: std::sync::RwLock<Option<Addr<RetryActor<T>>>>,
    pruner: std::sync::RwLock<Option<Addr<PrunerActor>>>,
}

impl<T: Transport> Siblings<T> {
    fn retry(&self) -> Option<Addr<RetryActor<T>>> {
        self.retry.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
    fn pruner(&self) -> Option<Addr<PrunerActor>> {
        self.pruner.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
    fn prune_soon(&self) {
        if let Some(pruner) = self.pruner() {
            pruner.do_send(PruneSoon);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Supervisor

/// Owns the children, batches local writes, routes transport events, orders shutdown.
struct Supervisor<T: Transport> {
    inner: Arc<LibraryInner>,
    transport: Arc<T>,
    peers: HashMap<DeviceId, Addr<PeerActor<T>>>,
    online: HashMap<DeviceId, Option<u64>>,
    siblings: Arc<Siblings<T>>,
    backfill: Option<Addr<BackfillActor<T>>>,
    /// The stored backfill checkpoint, until the backfill actor takes it.
    checkpoint: Option<lsync_backfill::Checkpoint>,
    batcher: Batcher,
    /// When the pending flush timer fires, if one is pending.
    flush_at: Option<Instant>,
    enabled: bool,
    /// The generation of each running child: a stop reported by an older one is stale.
    generations: HashMap<Child, u64>,
    next_generation: u64,
    failures: HashMap<Child, Failures>,
    /// What a child reported before it stopped.
    last_errors: HashMap<Child, String>,
    /// Shutting down: children that stop are not restarted.
    stopping: bool,
}

impl<T: Transport> Supervisor<T> {
    fn new(
        inner: Arc<LibraryInner>,
        transport: Arc<T>,
        checkpoint: lsync_backfill::Checkpoint,
    ) -> Self {
        let config = &inner.config;
        let batcher = Batcher::new(config.batch_window, config.max_batch_rows);
        let enabled = inner.enabled.load(std::sync::atomic::Ordering::Acquire);
        Self {
            inner,
            transport,
            peers: HashMap::new(),
            online: HashMap::new(),
            siblings: Arc::new(Siblings {
                retry: std::sync::RwLock::new(None),
                pruner: std::sync::RwLock::new(None),
            }),
            backfill: None,
            checkpoint: Some(checkpoint),
            batcher,
            flush_at: None,
            enabled,
            generations: HashMap::new(),
            next_generation: 0,
            failures: HashMap::new(),
            last_errors: HashMap::new(),
            stopping: false,
        }
    }

    /// A watch for a new `child`, which becomes the current one.
    fn watch(&mut self, child: Child, ctx: &Context<Self>) -> Watch {
        self.next_generation += 1;
        self.generations.insert(child, self.next_generation);
        Watch { child, generation: self.next_generation, supervisor: ctx.address().recipient() }
    }

    fn peer(&mut self, peer: DeviceId, ctx: &mut Context<Self>) -> Addr<PeerActor<T>> {
        if let Some(addr) = self.peers.get(&peer) {
            return addr.clone();
        }
        let addr = PeerActor {
            peer,
            inner: self.inner.clone(),
            transport: self.transport.clone(),
            supervisor: ctx.address(),
            siblings: self.siblings.clone(),
            online: false,
            catching_up: false,
            outbound: None,
            span: tracing::info_span!("peer", %peer),
            _watch: self.watch(Child::Peer(peer), ctx),
        }
        .start();
        self.peers.insert(peer, addr.clone());
        addr
    }

    /// Schedules the next flush at the batcher's earliest deadline.
    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        let Some(deadline) = self.batcher.next_deadline() else { return };
        if self.flush_at.is_some_and(|scheduled| scheduled <= deadline) {
            return;
        }
        self.flush_at = Some(deadline);
        let supervisor = ctx.address();
        // A plain timer task that messages the supervisor: the flush happens between messages,
        // like everything else the supervisor does.
        actix::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            supervisor.do_send(FlushDue);
        });
    }

    /// Sends each flushed batch to every online peer.
    fn broadcast(&mut self, flushes: Vec<Flush>) {
        let device = self.inner.identity().device;
        for flush in flushes {
            let (message, covers, rows, kind) = match flush {
                Flush::State { model, since, rows } => {
                    let Some(newest) = rows.iter().map(|row| row.version).max() else { continue };
                    let columns = self
                        .inner
                        .registry()
                        .model(&model)
                        .map(|m| m.column_names())
                        .unwrap_or_default();
                    let count = rows.len();
                    let covers =
                        Coverage::State { owner: device, model: model.clone(), version: newest };
                    let batch = StateBatch { owner: device, model, columns, rows, since };
                    (WireMessage::StateBatch(batch), covers, count, "state")
                }
                Flush::Shared { changes } => {
                    let batch = SharedBatch { changes };
                    let Some(mark) = sync::shared_coverage(&batch) else { continue };
                    let count = batch.changes.len();
                    (
                        WireMessage::SharedBatch(batch),
                        Coverage::Shared { origin: mark.origin, seq: mark.seq },
                        count,
                        "shared",
                    )
                }
            };
            metrics::histogram!("lsync_batch_rows", "kind" => kind).record(rows as f64);
            for (peer, addr) in &self.peers {
                if self.online.contains_key(peer) {
                    push(
                        addr,
                        *peer,
                        Push { message: message.clone(), covers: Some(covers.clone()) },
                    );
                }
            }
        }
    }

    fn start_children(&mut self, ctx: &mut Context<Self>, checkpoint: lsync_backfill::Checkpoint) {
        self.start_backfill(ctx, checkpoint);
        self.start_retry(ctx);
        self.start_pruner(ctx);
    }

    fn start_backfill(&mut self, ctx: &mut Context<Self>, checkpoint: lsync_backfill::Checkpoint) {
        let watch = self.watch(Child::Backfill, ctx);
        let backfill = BackfillActor::new(
            self.inner.clone(),
            self.transport.clone(),
            ctx.address(),
            checkpoint,
            watch,
        )
        .start();
        // (It starts paused if sync is off.) What is known of the peers now; readiness comes with their next heartbeat.
        for (peer, rtt_us) in &self.online {
            backfill.do_send(backfill::PeerUpdate {
                peer: *peer,
                online: true,
                rtt_us: *rtt_us,
                ready: None,
            });
        }
        self.backfill = Some(backfill);
    }

    fn start_retry(&mut self, ctx: &mut Context<Self>) {
        let config = &self.inner.config;
        let retry_config = RetryConfig {
            ack_timeout: config.ack_timeout,
            base: config.retry_base,
            max: config.retry_max,
            max_attempts: config.retry_max_attempts,
            capacity: config.retry_capacity,
        };
        let seed = u64::from_le_bytes(
            self.inner.identity().device.as_bytes()[..8].try_into().unwrap_or([0; 8]),
        );
        let watch = self.watch(Child::Retry, ctx);
        let retry = RetryActor {
            queue: RetryQueue::new(retry_config, seed),
            supervisor: ctx.address(),
            timer: None,
            _watch: watch,
        }
        .start();
        *self.siblings.retry.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(retry);
    }

    fn start_pruner(&mut self, ctx: &mut Context<Self>) {
        let watch = self.watch(Child::Pruner, ctx);
        let pruner = PrunerActor {
            inner: self.inner.clone(),
            supervisor: ctx.address().recipient(),
            pending: false,
            _watch: watch,
        }
        .start();
        *self.siblings.pruner.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(pruner);
    }

    /// Starts a child again, in place of one that stopped.
    fn restart(&mut self, child: Child, ctx: &mut Context<Self>) {
        match child {
            Child::Pruner => self.start_pruner(ctx),
            Child::Retry => self.start_retry(ctx),
            Child::Peer(peer) => {
                self.peers.remove(&peer);
                let addr = self.peer(peer, ctx);
                if self.online.contains_key(&peer) {
                    addr.do_send(Restarted);
                }
            }
            Child::Backfill => {
                // From its last checkpoint, read beside the writer (a plain read).
                let inner = self.inner.clone();
                ctx.wait(
                    async move {
                        inner.db.read(async |conn| lsync_backfill::sql::load(conn).await).await
                    }
                    .into_actor(self)
                    .map(|loaded, supervisor, ctx| match loaded {
                        Ok(checkpoint) => {
                            let checkpoint =
                                checkpoint.unwrap_or_else(lsync_backfill::Checkpoint::ready);
                            supervisor.start_backfill(ctx, checkpoint);
                        }
                        Err(error) => {
                            supervisor.last_errors.insert(
                                Child::Backfill,
                                format!("cannot read the checkpoint: {error}"),
                            );
                            supervisor.child_stopped(Child::Backfill, ctx);
                        }
                    }),
                );
            }
        }
    }

    /// A current child is gone: report it and start it again after a backoff that grows with
    /// its recent failures (100 ms doubling to a minute).
    fn child_stopped(&mut self, child: Child, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let failures = self
            .failures
            .entry(child)
            .and_modify(|failures| {
                if now.duration_since(failures.last) > FAILURES_FORGOTTEN_AFTER {
                    failures.count = 0;
                }
                failures.count += 1;
                failures.last = now;
            })
            .or_insert(Failures { count: 1, last: now });
        let count = failures.count;
        let delay = Duration::from_millis(100u64.saturating_mul(1 << (count - 1).min(10)))
            .min(Duration::from_secs(60));
        let error =
            self.last_errors.remove(&child).unwrap_or_else(|| "stopped unexpectedly".to_owned());
        metrics::counter!("lsync_actor_restarts_total", "actor" => child.name()).increment(1);
        let which = match child {
            Child::Peer(peer) => format!("the actor of peer {peer}"),
            other => format!("the {} actor", other.name()),
        };
        tracing::error!(child = child.name(), %error, failures = count, ?delay, "restarting a failed actor");
        self.inner.emit(Event::Error {
            message: format!(
                "{which} failed ({count} time{} in a row): {error}; restarting in {delay:?}",
                if count == 1 { "" } else { "s" }
            ),
        });
        ctx.run_later(delay, move |supervisor, ctx| {
            if !supervisor.stopping {
                supervisor.restart(child, ctx);
            }
        });
    }
}

impl<T: Transport> Actor for Supervisor<T> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Bounded mailbox: writers and the transport pump wait when the engine is busy.
        ctx.set_mailbox_capacity(64);
        let checkpoint = self.checkpoint.take().unwrap_or_else(lsync_backfill::Checkpoint::ready);
        self.start_children(ctx, checkpoint);
        // Keep the watermarks heartbeats carry fresh (local writes move them too), twice per
        // heartbeat interval so a heartbeat never carries a snapshot older than that.
        let every = (self.inner.config.heartbeat_interval / 2).max(Duration::from_millis(100));
        let refresh = |supervisor: &mut Self, ctx: &mut Context<Self>| {
            let inner = supervisor.inner.clone();
            ctx.spawn(
                async move {
                    let _ = sync::own_watermarks(&inner).await;
                }
                .into_actor(supervisor),
            );
        };
        refresh(self, ctx);
        ctx.run_interval(every, refresh);
    }
}

impl<T: Transport> Handler<LocalState> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, message: LocalState, ctx: &mut Self::Context) {
        self.batcher.push_state(&message.model, message.since, message.rows, Instant::now());
        self.schedule_flush(ctx);
    }
}

/// Timer → supervisor: the batching window of a pending batch closed.
struct FlushDue;
impl Message for FlushDue {
    type Result = ();
}

impl<T: Transport> Handler<FlushDue> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, _: FlushDue, ctx: &mut Self::Context) {
        self.flush_at = None;
        let flushes = self.batcher.poll(Instant::now());
        if self.enabled {
            self.broadcast(flushes);
        }
        self.schedule_flush(ctx);
    }
}

impl<T: Transport> Handler<LocalShared> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, message: LocalShared, ctx: &mut Self::Context) {
        self.batcher.push_shared(message.changes, Instant::now());
        self.schedule_flush(ctx);
    }
}

impl<T: Transport> Handler<SetEnabled> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, SetEnabled(enabled): SetEnabled, ctx: &mut Self::Context) {
        if self.enabled == enabled {
            return;
        }
        self.enabled = enabled;
        if let Some(backfill) = &self.backfill {
            backfill.do_send(backfill::SetPaused(!enabled));
        }
        if enabled {
            // Whatever was written meanwhile is in the log and the tables: each online peer
            // catches up on both sides (each side pulls what it lacks).
            for peer in self.online.keys().copied().collect::<Vec<_>>() {
                self.peer(peer, ctx).do_send(CatchUpNow);
            }
        } else {
            // Batches pending now would be sent while disabled: drop them from memory; the
            // writes are committed and reach peers through catch-up once sync is on again.
            let _ = self.batcher.flush_all();
        }
    }
}

impl<T: Transport> Handler<GetStatus> for Supervisor<T> {
    type Result = ResponseActFuture<Self, EngineStatus>;
    fn handle(&mut self, _: GetStatus, _: &mut Self::Context) -> Self::Result {
        let online: Vec<(DeviceId, Option<u64>)> =
            self.online.iter().map(|(peer, rtt)| (*peer, *rtt)).collect();
        let pending = self.batcher.pending_rows();
        let retry = self.siblings.retry();
        Box::pin(
            async move {
                let retry_queue = match retry {
                    Some(retry) => retry.send(RetryLen).await.unwrap_or(0),
                    None => 0,
                };
                EngineStatus { online, retry_queue, pending_batch_rows: pending }
            }
            .into_actor(self),
        )
    }
}

impl<T: Transport> Handler<FromTransport> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, FromTransport(event): FromTransport, ctx: &mut Self::Context) {
        let peer = match &event {
            TransportEvent::Connected { peer, .. }
            | TransportEvent::Disconnected { peer, .. }
            | TransportEvent::Message { peer, .. }
            | TransportEvent::Watermarks { peer, .. } => *peer,
            TransportEvent::Request(request) => request.peer,
            TransportEvent::Paired(paired) => paired.device,
        };
        if let TransportEvent::Connected { .. } = &event {
            self.online.entry(peer).or_insert(None);
            // A peer that comes online must not wait for the window to get what is pending.
            let flushes = self.batcher.flush_all();
            if self.enabled {
                self.broadcast(flushes);
            }
        }
        if let TransportEvent::Disconnected { reason, .. } = &event
            && !matches!(reason, DisconnectReason::Replaced)
        {
            self.online.remove(&peer);
            if let Some(ahead) = self
                .inner
                .read_ahead
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&peer)
            {
                ahead.abort();
            }
            if let Some(retry) = self.siblings.retry() {
                retry.do_send(PeerGone(peer));
            }
        }
        if let TransportEvent::Request(request) = event {
            // Requests only read: they are answered beside the actors, never queued behind a
            // peer actor that is itself waiting for an answer from that peer (both sides catch up
            // at once on connect).
            let inner = self.inner.clone();
            let enabled = self.enabled;
            actix::spawn(async move {
                let response = if enabled {
                    sync::serve(&inner, request.peer, request.message).await
                } else {
                    WireMessage::Error(lsync_protocol::ErrorMessage {
                        code: lsync_protocol::ErrorCode::Busy,
                        message: "sync is disabled on this device".into(),
                    })
                };
                let _ = request.responder.respond(response).await;
            });
            return;
        }
        if !self.enabled
            && matches!(event, TransportEvent::Message { .. } | TransportEvent::Watermarks { .. })
        {
            // Disabled: incoming batches are dropped unapplied and unacknowledged, so their
            // senders keep them and catch-up brings them once sync is on again.
            return;
        }
        // The supervisor never waits for a peer actor: a peer actor may itself be waiting for an
        // answer from its peer, whose answer may be waiting for this device to read, and two
        // devices doing that to each other would wait forever. Connection events always get
        // through (they are rare); batches, acks and heartbeat watermarks for an actor whose
        // bounded mailbox is full are dropped and counted: an unacknowledged batch is sent again,
        // and catch-up by watermark closes any gap.
        if let TransportEvent::Message { message: WireMessage::Ack(ack), .. } = event {
            // Acks never queue behind batches: they stop re-sends and drive pruning.
            if let Some(retry) = self.siblings.retry() {
                retry.do_send(Acked { peer, ack: ack.clone() });
            }
            self.siblings.prune_soon();
            let inner = self.inner.clone();
            actix::spawn(async move {
                if let Err(error) = sync::record_ack(&inner, peer, &ack).await {
                    tracing::warn!(%peer, %error, "cannot record an acknowledgement");
                }
            });
            return;
        }
        let addr = self.peer(peer, ctx);
        match event {
            TransportEvent::Message { .. } | TransportEvent::Watermarks { .. } => {
                if addr.try_send(FromPeer(event)).is_err() {
                    metrics::counter!("lsync_inbound_dropped_total").increment(1);
                    tracing::debug!(%peer, "peer actor busy; an incoming message was dropped");
                }
            }
            event => addr.do_send(FromPeer(event)),
        }
    }
}

/// Hands a batch to a peer's actor without waiting. A peer whose mailbox is full is busy
/// applying; the batch is not queued for it — counted, and caught up by watermark at its next
/// heartbeat.
fn push<T: Transport>(addr: &Addr<PeerActor<T>>, peer: DeviceId, message: Push) {
    if addr.try_send(message).is_err() {
        metrics::counter!("lsync_push_skipped_total").increment(1);
        tracing::debug!(%peer, "peer actor busy; the batch will reach it by catch-up");
    }
}

impl<T: Transport> Handler<Resend> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, resend: Resend, _: &mut Self::Context) {
        metrics::counter!("lsync_retries_total").increment(1);
        self.inner.counters.retries.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let (Some(addr), true) =
            (self.peers.get(&resend.peer), self.online.contains_key(&resend.peer))
        {
            push(addr, resend.peer, Push { message: resend.message, covers: None });
        }
    }
}

impl<T: Transport> Handler<PeerState> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, state: PeerState, _: &mut Self::Context) {
        if let Some(backfill) = &self.backfill {
            backfill.do_send(backfill::PeerUpdate {
                peer: state.peer,
                online: state.online,
                rtt_us: state.rtt_us,
                ready: state.ready,
            });
        }
        if state.online {
            self.online.insert(state.peer, state.rtt_us);
            if let Some(rtt) = state.rtt_us {
                metrics::histogram!("lsync_peer_rtt_seconds").record(rtt as f64 / 1e6);
            }
        } else {
            self.online.remove(&state.peer);
        }
        metrics::gauge!("lsync_peers_online").set(self.online.len() as f64);
    }
}

impl<T: Transport> Handler<ChildFailed> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, failure: ChildFailed, _: &mut Self::Context) {
        self.last_errors.insert(failure.child, failure.error);
    }
}

impl<T: Transport> Handler<ChildStopped> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, stopped: ChildStopped, ctx: &mut Self::Context) {
        // A stop during shutdown, or of a child already replaced, needs nothing.
        if self.stopping || self.generations.get(&stopped.child) != Some(&stopped.generation) {
            return;
        }
        self.generations.remove(&stopped.child);
        self.child_stopped(stopped.child, ctx);
    }
}

impl<T: Transport> Handler<Shutdown> for Supervisor<T> {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        self.stopping = true;
        // Order: stop intake (the library already refuses writes), flush what is pending to the
        // connected peers, let the sends drain, then close the transport.
        let flushes = self.batcher.flush_all();
        if self.enabled {
            self.broadcast(flushes);
        }
        let peers: Vec<Addr<PeerActor<T>>> = self.peers.values().cloned().collect();
        let transport = self.transport.clone();
        let close_timeout = self.inner.config.close_timeout;
        Box::pin(
            async move {
                // A no-op message queued behind the pushes: when it is handled, they were sent.
                // Bounded: a peer actor inside a long catch-up, or a peer that stopped reading,
                // must not hold the close up (what is not sent is left to retry and catch-up).
                let drained = tokio::time::timeout(close_timeout, async {
                    for peer in peers {
                        let _ = peer.send(Drain).await;
                    }
                })
                .await;
                if drained.is_err() {
                    tracing::warn!(
                        ?close_timeout,
                        "pending sends did not drain in time; closing without them"
                    );
                }
                let report = transport.shutdown().await;
                tracing::info!(?report, "transport closed");
            }
            .into_actor(self),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Peer actor

/// Supervisor → peer actor: exchange watermarks and pull what this device lacks (sync was
/// switched back on).
struct CatchUpNow;
impl Message for CatchUpNow {
    type Result = ();
}

/// Supervisor → a restarted peer actor: the peer is connected; catch up with it.
struct Restarted;
impl Message for Restarted {
    type Result = ();
}

/// Supervisor → peer actor: answered once every message queued for the peer before it was
/// handed to the transport.
struct Drain;
impl Message for Drain {
    type Result = ();
}

/// One remote device: applies what it sends (in order), answers its requests, sends it batches,
/// catches up from it.
///
/// Database work in an actor runs with `ctx.wait`, never `ctx.spawn`. While a waited future is
/// pending, actix polls neither the mailbox nor spawned futures; a spawned future holding the
/// database's single writer at that moment would never be polled again, and a waited future
/// needing the writer would wait for it forever (this happened: a heartbeat's spawned
/// watermark check took the writer just before a catch-up started).
struct PeerActor<T: Transport> {
    peer: DeviceId,
    inner: Arc<LibraryInner>,
    transport: Arc<T>,
    supervisor: Addr<Supervisor<T>>,
    siblings: Arc<Siblings<T>>,
    online: bool,
    catching_up: bool,
    outbound: Option<mpsc::Sender<Outbound>>,
    /// `peer{peer=…}`: every log line of the actor, its futures and its sender task is inside.
    span: tracing::Span,
    _watch: Watch,
}

/// What a peer actor's sender task takes, in order.
enum Outbound {
    /// Send this; with a coverage, register it for acknowledgement. Boxed: messages vary in
    /// size, and the queue's slots stay small.
    Message(Box<WireMessage>, Option<Coverage>),
    /// Everything queued before this was handed to the transport.
    Marker(tokio::sync::oneshot::Sender<()>),
}

/// Messages waiting for the network, per peer. 256 batches of up to `max_batch_rows` rows: a
/// peer that cannot take that much is not keeping up, and catch-up by watermark serves it better
/// than a deeper queue.
const OUTBOUND_CAPACITY: usize = 256;

impl<T: Transport> Actor for PeerActor<T> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(64);
        // One sender task per peer, in order. Network sends never run inside the actor: an actor
        // waiting for a peer to read would stop applying what that peer sends, and two devices
        // doing that to each other would wait forever.
        let (outbound, mut queue) = mpsc::channel::<Outbound>(OUTBOUND_CAPACITY);
        self.outbound = Some(outbound);
        let (transport, peer, siblings) =
            (self.transport.clone(), self.peer, self.siblings.clone());
        // Its own task, not a future of the actor's context: the actor waits on the database
        // (and on catch-up requests) without holding up the peer's outgoing messages.
        let span = self.span.clone();
        actix::spawn(
            async move {
            while let Some(item) = queue.recv().await {
                let (message, covers) = match item {
                    Outbound::Message(message, covers) => (*message, covers),
                    Outbound::Marker(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                let bytes = lsync_protocol::encode(&message).map_or(0, |bytes| bytes.len());
                let kind = message.name();
                // First sends only (they register for acknowledgement); re-sends are counted by
                // `lsync_retries_total`.
                let changes = match (&message, &covers) {
                    (WireMessage::StateBatch(batch), Some(_)) => Some(("state", batch.rows.len())),
                    (WireMessage::SharedBatch(batch), Some(_)) => {
                        Some(("shared", batch.changes.len()))
                    }
                    _ => None,
                };
                // Registered before sending, so an acknowledgement can never arrive first.
                // A failed send is simply due again after the acknowledgement timeout.
                if let (Some(retry), Some(covers)) = (siblings.retry(), covers) {
                    retry.do_send(Sent { peer, message: message.clone(), covers });
                }
                match transport.send(peer, message).await {
                    Ok(()) => {
                        metrics::counter!("lsync_messages_sent_total", "kind" => kind).increment(1);
                        metrics::counter!("lsync_bytes_sent_total").increment(bytes as u64);
                        if let Some((kind, count)) = changes {
                            metrics::counter!("lsync_changes_sent_total", "kind" => kind)
                                .increment(count as u64);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%peer, %error, "send failed; due again after the ack timeout")
                    }
                }
            }
        }
            .instrument(span),
        );
    }
}

impl<T: Transport> PeerActor<T> {
    /// Queues a message for the peer without waiting. A full queue means the peer is not keeping
    /// up: the message is counted and left to catch-up (batches) or the next ack (acks).
    fn queue(&self, message: WireMessage, covers: Option<Coverage>) {
        let Some(outbound) = &self.outbound else { return };
        if outbound.try_send(Outbound::Message(Box::new(message), covers)).is_err() {
            metrics::counter!("lsync_push_skipped_total").increment(1);
            tracing::debug!(peer = %self.peer, "outbound queue full; catch-up by watermark takes over");
        }
    }

    /// Exchanges watermarks with the peer and pulls what this device lacks. Runs in the actor's
    /// context with `wait`, so batches from this peer are applied after the catch-up, in order.
    fn catch_up(&mut self, ctx: &mut Context<Self>, theirs: Option<lsync_protocol::Watermarks>) {
        if self.catching_up
            || !self.inner.enabled.load(std::sync::atomic::Ordering::Acquire)
            // Until the copy is complete, the backfill actor fetches everything.
            || !self.inner.is_ready()
        {
            return;
        }
        self.catching_up = true;
        tracing::debug!(peer = %self.peer, "catch-up starts");
        let (inner, transport, peer) = (self.inner.clone(), self.transport.clone(), self.peer);
        let supervisor = self.supervisor.clone();
        let work = async move {
            let theirs = match theirs {
                Some(theirs) => theirs,
                None => sync::exchange_watermarks(&inner, &*transport, peer).await?,
            };
            if theirs.resync {
                // This device fell behind the peer's retention: a full resync replaces the
                // catch-up (rows the peer no longer holds are deleted).
                supervisor.do_send(ResyncNeeded {
                    scope: lsync_backfill::Scope::Everything,
                    delete_missing: true,
                });
                return Ok((false, None));
            }
            if let Some(seq) = sync::own_rollback(&inner, &theirs).await? {
                // The peer holds more of this device's own changes than it does: its file was
                // rolled back (restored together with the file that would have told at open).
                // Fetch everything back before numbering on; shared writes wait meanwhile.
                tracing::error!(%peer, seq, "the peer holds changes of this device that it lost: resyncing fully");
                metrics::counter!("lsync_rollbacks_detected_total").increment(1);
                supervisor.do_send(ResyncNeeded {
                    scope: lsync_backfill::Scope::Everything,
                    delete_missing: true,
                });
                return Ok((false, None));
            }
            if sync::copy_rolled_back(&inner, &theirs).await? {
                // The peer heard more of this copy than the file holds: it was rolled back
                // (restored with its generation file). Fetch everything back.
                tracing::error!(%peer, seen = ?theirs.seen, "the peer saw more of this copy than its file holds (restored from an old copy): resyncing fully");
                metrics::counter!("lsync_rollbacks_detected_total").increment(1);
                supervisor.do_send(ResyncNeeded {
                    scope: lsync_backfill::Scope::Everything,
                    delete_missing: true,
                });
                return Ok((false, None));
            }
            sync::record_ack(&inner, peer, &sync::ack_of(&theirs)).await?;
            let outcome = sync::catch_up(&inner, &*transport, peer, &theirs).await?;
            let pulled = outcome.pulled;
            if outcome.pruned {
                supervisor.do_send(ResyncNeeded {
                    scope: lsync_backfill::Scope::Shared,
                    delete_missing: false,
                });
            }
            let ack = if pulled {
                Some(sync::ack_of(&sync::own_watermarks(&inner).await?))
            } else {
                None
            };
            Ok::<_, sync::CatchUpError>((pulled, ack))
        };
        ctx.wait(work.instrument(self.span.clone()).into_actor(self).map(|result, actor, _| {
            actor.catching_up = false;
            match result {
                Ok((pulled, ack)) => {
                    tracing::debug!(peer = %actor.peer, pulled, "caught up");
                    actor.inner.emit(Event::CaughtUp { peer: actor.peer, pulled });
                    if let Some(ack) = ack {
                        actor.queue(WireMessage::Ack(ack), None);
                    }
                    actor.siblings.prune_soon();
                }
                Err(error) => {
                    metrics::counter!("lsync_catch_up_failures_total").increment(1);
                    tracing::warn!(peer = %actor.peer, %error, "catch-up stopped; it resumes on the next heartbeat or reconnect");
                    // A peer going away mid-way is routine; this device failing to take what it
                    // pulled (a full parking bound, a refused page) is for the app to see.
                    if matches!(error, sync::CatchUpError::Local(_)) {
                        actor.inner.emit(Event::Error {
                            message: format!("catch-up from {} stopped: {error}", actor.peer),
                        });
                    }
                }
            }
        }));
    }

    /// Applies a batch from the peer, then acknowledges it; in order, blocking this actor's
    /// mailbox until done.
    fn apply(&mut self, ctx: &mut Context<Self>, message: lsync_protocol::Message) {
        if !self.inner.enabled.load(std::sync::atomic::Ordering::Acquire) || !self.inner.is_ready()
        {
            // Switched off after this batch was queued, or this copy is still backfilling: not
            // applied, not acknowledged; the sender keeps it, and catch-up by watermark brings
            // it afterwards.
            return;
        }
        let (inner, peer) = (self.inner.clone(), self.peer);
        tracing::trace!(%peer, "apply starts");
        let work = async move {
            let gap = match message {
                lsync_protocol::Message::StateBatch(batch) => {
                    sync::apply_state_batch(&inner, peer, batch).await?
                }
                lsync_protocol::Message::SharedBatch(batch) => {
                    sync::apply_shared_changes(&inner, peer, batch).await?;
                    false
                }
                _ => return Ok(None),
            };
            let mine = sync::own_watermarks(&inner).await?;
            Ok::<_, crate::library::LibraryError>(Some((sync::ack_of(&mine), gap)))
        };
        ctx.wait(work.instrument(self.span.clone()).into_actor(self).map(|result, actor, ctx| {
            tracing::trace!(peer = %actor.peer, "apply done");
            if let Ok(Some((ack, gap))) = &result {
                actor.queue(WireMessage::Ack(ack.clone()), None);
                if *gap {
                    // This device missed earlier rows of the batch's owner: close the gap now
                    // rather than at the next heartbeat.
                    actor.catch_up(ctx, None);
                }
            }
            if let Err(error) = result {
                // Not acknowledged: the sender keeps the batch and sends it again (or the gap is
                // caught up by watermark).
                metrics::counter!("lsync_apply_failures_total").increment(1);
                tracing::warn!(peer = %actor.peer, %error, "a batch from the peer was not applied");
                actor.inner.emit(Event::Error {
                    message: format!("batch from {} not applied: {error}", actor.peer),
                });
            }
        }));
    }
}

impl<T: Transport> Handler<FromPeer> for PeerActor<T> {
    type Result = ();
    fn handle(&mut self, FromPeer(event): FromPeer, ctx: &mut Self::Context) {
        let _span = self.span.clone().entered();
        match event {
            TransportEvent::Connected { hello, .. } => {
                self.online = true;
                let (inner, peer) = (self.inner.clone(), self.peer);
                let name = hello.name.clone();
                let epoch = hello.epoch;
                ctx.wait(
                    async move {
                        let result = inner
                            .db
                            .write(async |conn| {
                                lsync_watermark::sql::add_peer(
                                    conn,
                                    peer,
                                    &name,
                                    crate::library::now_ms(),
                                )
                                .await?;
                                lsync_watermark::sql::touch_peer(
                                    conn,
                                    peer,
                                    crate::library::now_ms(),
                                )
                                .await?;
                                lsync_watermark::sql::note_epoch(conn, peer, epoch).await
                            })
                            .await;
                        if let Err(error) = result {
                            tracing::warn!(%peer, %error, "cannot record the peer");
                        }
                    }
                    .instrument(self.span.clone())
                    .into_actor(self),
                );
                self.supervisor.do_send(PeerState {
                    peer: self.peer,
                    online: true,
                    rtt_us: None,
                    ready: None,
                });
                self.inner.emit(Event::PeerOnline { peer: self.peer, name: hello.name });
                self.catch_up(ctx, None);
            }
            TransportEvent::Disconnected { reason, .. } => {
                if matches!(reason, DisconnectReason::Replaced) {
                    return;
                }
                self.online = false;
                self.supervisor.do_send(PeerState {
                    peer: self.peer,
                    online: false,
                    rtt_us: None,
                    ready: None,
                });
                self.inner.emit(Event::PeerOffline { peer: self.peer, reason: reason.to_string() });
            }
            TransportEvent::Message { message: lsync_protocol::Message::Ack(ack), .. } => {
                let (inner, peer) = (self.inner.clone(), self.peer);
                if let Some(retry) = self.siblings.retry() {
                    retry.do_send(Acked { peer, ack: ack.clone() });
                }
                self.siblings.prune_soon();
                ctx.wait(
                    async move {
                        if let Err(error) = sync::record_ack(&inner, peer, &ack).await {
                            tracing::warn!(%peer, %error, "cannot record an acknowledgement");
                        }
                    }
                    .instrument(self.span.clone())
                    .into_actor(self),
                );
            }
            TransportEvent::Message { message, .. } => self.apply(ctx, message),
            TransportEvent::Request(_) => {
                // Answered by the supervisor (see `Handler<FromTransport>`); never routed here.
            }
            TransportEvent::Watermarks { watermarks, .. } => {
                let rtt = self
                    .transport
                    .connected_peers()
                    .into_iter()
                    .find(|info| info.device == self.peer)
                    .and_then(|info| info.rtt)
                    .map(|rtt| u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX));
                self.supervisor.do_send(PeerState {
                    peer: self.peer,
                    online: true,
                    rtt_us: rtt,
                    ready: Some(watermarks.ready),
                });
                let (inner, peer) = (self.inner.clone(), self.peer);
                // `wait`, never `spawn`: see the note on database work on `PeerActor`.
                ctx.wait(
                    async move {
                        let _ = sync::record_ack(&inner, peer, &sync::ack_of(&watermarks)).await;
                        // What the peer's copy is at, told back to it in watermark responses (a
                        // copy rolled back to an old file learns it from them).
                        if watermarks.incarnation.is_some() {
                            let seen = watermarks.incarnation;
                            let _ = inner
                                .db
                                .write(async |conn| {
                                    lsync_watermark::sql::record_seen(conn, peer, seen).await
                                })
                                .await;
                        }
                        // Divergence is repaired without waiting for a reconnect.
                        match sync::behind(&inner, &watermarks).await {
                            Ok(true) => Some(watermarks),
                            _ => None,
                        }
                    }
                    .instrument(self.span.clone())
                    .into_actor(self)
                    .map(|behind, actor, ctx| {
                        actor.siblings.prune_soon();
                        if let Some(theirs) = behind {
                            actor.catch_up(ctx, Some(theirs));
                        }
                    }),
                );
            }
            TransportEvent::Paired(paired) => {
                let inner = self.inner.clone();
                ctx.wait(
                    async move {
                        let _ = inner
                            .db
                            .write(async |conn| {
                                lsync_watermark::sql::add_peer(
                                    conn,
                                    paired.device,
                                    &paired.name,
                                    crate::library::now_ms(),
                                )
                                .await
                            })
                            .await;
                    }
                    .instrument(self.span.clone())
                    .into_actor(self),
                );
            }
        }
    }
}

impl<T: Transport> Handler<Push> for PeerActor<T> {
    type Result = ();
    fn handle(&mut self, push: Push, _: &mut Self::Context) {
        if !self.online {
            return;
        }
        self.inner.counters.batches_sent.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.queue(push.message, push.covers);
    }
}

impl<T: Transport> Handler<Restarted> for PeerActor<T> {
    type Result = ();
    fn handle(&mut self, _: Restarted, ctx: &mut Self::Context) {
        self.online = true;
        self.catch_up(ctx, None);
    }
}

impl<T: Transport> Handler<CatchUpNow> for PeerActor<T> {
    type Result = ();
    fn handle(&mut self, _: CatchUpNow, ctx: &mut Self::Context) {
        if self.online {
            self.catch_up(ctx, None);
        }
    }
}

impl<T: Transport> Handler<Drain> for PeerActor<T> {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Drain, _: &mut Self::Context) -> Self::Result {
        let outbound = self.outbound.clone();
        Box::pin(async move {
            let Some(outbound) = outbound else { return };
            let (done, flushed) = tokio::sync::oneshot::channel();
            if outbound.send(Outbound::Marker(done)).await.is_ok() {
                let _ = flushed.await;
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Retry actor

/// Holds sent batches until acknowledged; re-sends what is not, with backoff.
struct RetryActor<T: Transport> {
    queue: RetryQueue<WireMessage>,
    supervisor: Addr<Supervisor<T>>,
    timer: Option<SpawnHandle>,
    _watch: Watch,
}

impl<T: Transport> RetryActor<T> {
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        metrics::gauge!("lsync_retry_queue").set(self.queue.len() as f64);
        if let Some(due) = self.queue.next_due() {
            let delay = due.saturating_duration_since(Instant::now());
            self.timer = Some(ctx.run_later(delay, |actor, ctx| {
                actor.timer = None;
                let due = actor.queue.poll_due(Instant::now());
                for (_, peer, message) in due.resend {
                    actor.supervisor.do_send(Resend { peer, message });
                }
                if !due.gave_up.is_empty() {
                    metrics::counter!("lsync_retries_given_up_total")
                        .increment(due.gave_up.len() as u64);
                    tracing::info!(
                        count = due.gave_up.len(),
                        "gave up re-sending; catch-up by watermark takes over"
                    );
                }
                actor.schedule(ctx);
            }));
        }
    }
}

impl<T: Transport> Actor for RetryActor<T> {
    type Context = Context<Self>;
}

impl<T: Transport> Handler<Sent> for RetryActor<T> {
    type Result = ();
    fn handle(&mut self, sent: Sent, ctx: &mut Self::Context) {
        let now = Instant::now();
        match self.queue.sent(sent.peer, sent.message, sent.covers, now) {
            Ok(_) => {}
            Err(_) => {
                metrics::counter!("lsync_retry_overflow_total").increment(1);
                tracing::info!(peer = %sent.peer, "retry queue full; catch-up by watermark takes over");
            }
        }
        self.schedule(ctx);
    }
}

impl<T: Transport> Handler<Acked> for RetryActor<T> {
    type Result = ();
    fn handle(&mut self, acked: Acked, ctx: &mut Self::Context) {
        self.queue.acked(acked.peer, &acked.ack);
        self.schedule(ctx);
    }
}

impl<T: Transport> Handler<PeerGone> for RetryActor<T> {
    type Result = ();
    fn handle(&mut self, PeerGone(peer): PeerGone, ctx: &mut Self::Context) {
        self.queue.peer_offline(peer);
        self.schedule(ctx);
    }
}

impl<T: Transport> Handler<RetryLen> for RetryActor<T> {
    type Result = usize;
    fn handle(&mut self, _: RetryLen, _: &mut Self::Context) -> usize {
        self.queue.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Pruner actor

/// Prunes the peer log and collects tombstones when acks allow, on an interval and soon after
/// acks arrive (debounced to one run per second).
struct PrunerActor {
    inner: Arc<LibraryInner>,
    supervisor: Recipient<ChildFailed>,
    pending: bool,
    _watch: Watch,
}

impl PrunerActor {
    fn run(&mut self, ctx: &mut Context<Self>) {
        let inner = self.inner.clone();
        ctx.wait(async move { sync::prune(&inner).await }.into_actor(self).map(
            |result, actor, ctx| {
                actor.pending = false;
                match result {
                    Ok((pruned, collected)) => {
                        if pruned + collected > 0 {
                            tracing::debug!(pruned, collected, "pruned");
                            actor
                                .inner
                                .emit(Event::Pruned { log_entries: pruned, tombstones: collected });
                        }
                    }
                    Err(error) => {
                        actor.supervisor.do_send(ChildFailed {
                            child: Child::Pruner,
                            error: error.to_string(),
                        });
                        ctx.stop();
                    }
                }
            },
        ));
    }
}

impl Actor for PrunerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let interval = self.inner.config.prune_interval;
        ctx.run_interval(interval, |actor, ctx| actor.run(ctx));
    }
}

impl Handler<PruneSoon> for PrunerActor {
    type Result = ();
    fn handle(&mut self, _: PruneSoon, ctx: &mut Self::Context) {
        if !self.pending {
            self.pending = true;
            ctx.run_later(Duration::from_secs(1), |actor, ctx| actor.run(ctx));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test hooks: make a child fail, see the children.

/// Test → any child actor: panic in a handler, as a bug would.
#[cfg(test)]
pub(crate) struct Crash;
#[cfg(test)]
impl Message for Crash {
    type Result = ();
}

#[cfg(test)]
impl Handler<Crash> for PrunerActor {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected failure of the pruner");
    }
}

#[cfg(test)]
impl<T: Transport> Handler<Crash> for RetryActor<T> {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected failure of the retry actor");
    }
}

#[cfg(test)]
impl<T: Transport> Handler<Crash> for PeerActor<T> {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected failure of a peer actor");
    }
}

/// Test → supervisor: crash a child.
#[cfg(test)]
pub(crate) struct CrashChild(pub(crate) Child);
#[cfg(test)]
impl Message for CrashChild {
    type Result = ();
}

#[cfg(test)]
impl<T: Transport> Handler<CrashChild> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, CrashChild(child): CrashChild, _: &mut Self::Context) {
        match child {
            Child::Pruner => self.siblings.pruner().map(|addr| addr.do_send(Crash)),
            Child::Retry => self.siblings.retry().map(|addr| addr.do_send(Crash)),
            Child::Backfill => self.backfill.as_ref().map(|addr| addr.do_send(Crash)),
            Child::Peer(peer) => self.peers.get(&peer).map(|addr| addr.do_send(Crash)),
        };
    }
}

/// Test → supervisor: the generation of every running child.
#[cfg(test)]
pub(crate) struct Generations;
#[cfg(test)]
impl Message for Generations {
    type Result = HashMap<Child, u64>;
}

#[cfg(test)]
impl<T: Transport> Handler<Generations> for Supervisor<T> {
    type Result = MessageResult<Generations>;
    fn handle(&mut self, _: Generations, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.generations.clone())
    }
}

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
mod peer;
mod pruner;
mod retry;
mod supervisor;
#[cfg(test)]
mod tests;

use backfill::BackfillActor;
use peer::{CatchUpNow, Drain, PeerActor, Restarted};
use pruner::PrunerActor;
use retry::RetryActor;
use supervisor::Supervisor;

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
    // Every line the engine logs names its device: a process may run several libraries (an app
    // with two, the simulator with many).
    let span = tracing::info_span!("engine", device = %inner.identity().device);
    let thread = std::thread::Builder::new().name("lsync-engine".into()).spawn(move || {
        let _span = span.enter();
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
    /// The peer that showed the need (it holds what this copy lacks): the resync's source if
    /// it can serve.
    from: DeviceId,
    /// Backfills this copy had completed when the need was seen: one that ended since makes
    /// the request stale.
    completed: u64,
}
impl Message for ResyncNeeded {
    type Result = ();
}

impl<T: Transport> Handler<ResyncNeeded> for Supervisor<T> {
    type Result = ();
    fn handle(&mut self, resync: ResyncNeeded, _: &mut Self::Context) {
        if resync.delete_missing {
            // Rows this copy wrote before it knew lie above a mark its tables do not back.
            self.batcher.unclaim_state();
        }
        if let Some(backfill) = &self.backfill {
            backfill.do_send(backfill::Resync {
                scope: resync.scope,
                delete_missing: resync.delete_missing,
                from: Some(resync.from),
                completed: resync.completed,
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
// Test hooks: make a child fail, see the children.

/// Test → any child actor: panic in a handler, as a bug would.
#[cfg(test)]
pub(crate) struct Crash;
#[cfg(test)]
impl Message for Crash {
    type Result = ();
}

/// Test → supervisor: crash a child.
#[cfg(test)]
pub(crate) struct CrashChild(pub(crate) Child);
#[cfg(test)]
impl Message for CrashChild {
    type Result = ();
}

/// Test → supervisor: the generation of every running child.
#[cfg(test)]
pub(crate) struct Generations;
#[cfg(test)]
impl Message for Generations {
    type Result = HashMap<Child, u64>;
}

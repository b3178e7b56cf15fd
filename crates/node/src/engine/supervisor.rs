//! The supervisor: owns a peer actor per remote device and the backfill, retry and pruner
//! actors; batches local writes and routes transport events; restarts children that fail.

use super::*;

/// Owns the children, batches local writes, routes transport events, orders shutdown.
pub(super) struct Supervisor<T: Transport> {
    pub(super) inner: Arc<LibraryInner>,
    pub(super) transport: Arc<T>,
    pub(super) peers: HashMap<DeviceId, Addr<PeerActor<T>>>,
    pub(super) online: HashMap<DeviceId, Option<u64>>,
    pub(super) siblings: Arc<Siblings<T>>,
    pub(super) backfill: Option<Addr<BackfillActor<T>>>,
    /// The stored backfill checkpoint, until the backfill actor takes it.
    pub(super) checkpoint: Option<lsync_backfill::Checkpoint>,
    pub(super) batcher: Batcher,
    /// When the pending flush timer fires, if one is pending.
    pub(super) flush_at: Option<Instant>,
    pub(super) enabled: bool,
    /// The generation of each running child: a stop reported by an older one is stale.
    pub(super) generations: HashMap<Child, u64>,
    pub(super) next_generation: u64,
    pub(super) failures: HashMap<Child, Failures>,
    /// What a child reported before it stopped.
    pub(super) last_errors: HashMap<Child, String>,
    /// Shutting down: children that stop are not restarted.
    pub(super) stopping: bool,
}

impl<T: Transport> Supervisor<T> {
    pub(super) fn new(
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
    pub(super) fn watch(&mut self, child: Child, ctx: &Context<Self>) -> Watch {
        self.next_generation += 1;
        self.generations.insert(child, self.next_generation);
        Watch { child, generation: self.next_generation, supervisor: ctx.address().recipient() }
    }

    pub(super) fn peer(&mut self, peer: DeviceId, ctx: &mut Context<Self>) -> Addr<PeerActor<T>> {
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
            owed: false,
            outbound: None,
            span: tracing::info_span!("peer", %peer),
            _watch: self.watch(Child::Peer(peer), ctx),
        }
        .start();
        self.peers.insert(peer, addr.clone());
        addr
    }

    /// Schedules the next flush at the batcher's earliest deadline.
    pub(super) fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
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
    pub(super) fn broadcast(&mut self, flushes: Vec<Flush>) {
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
                    // A batch that claims nothing raises no receiver's mark, so no ack ever
                    // covers it: it goes once, unretried; catch-up brings it after the resync.
                    let covers = (since != Some(HlcTime::MAX)).then(|| Coverage::State {
                        owner: device,
                        model: model.clone(),
                        version: newest,
                    });
                    let batch = StateBatch { owner: device, model, columns, rows, since };
                    (WireMessage::StateBatch(batch), covers, count, "state")
                }
                Flush::Shared { changes } => {
                    let batch = SharedBatch { changes };
                    let Some(mark) = sync::shared_coverage(&batch) else { continue };
                    let count = batch.changes.len();
                    (
                        WireMessage::SharedBatch(batch),
                        Some(Coverage::Shared { origin: mark.origin, seq: mark.seq }),
                        count,
                        "shared",
                    )
                }
            };
            metrics::histogram!("lsync_batch_rows", "kind" => kind).record(rows as f64);
            for (peer, addr) in &self.peers {
                if self.online.contains_key(peer) {
                    push(addr, *peer, Push { message: message.clone(), covers: covers.clone() });
                }
            }
        }
    }

    pub(super) fn start_children(
        &mut self,
        ctx: &mut Context<Self>,
        checkpoint: lsync_backfill::Checkpoint,
    ) {
        self.start_backfill(ctx, checkpoint);
        self.start_retry(ctx);
        self.start_pruner(ctx);
    }

    pub(super) fn start_backfill(
        &mut self,
        ctx: &mut Context<Self>,
        checkpoint: lsync_backfill::Checkpoint,
    ) {
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

    pub(super) fn start_retry(&mut self, ctx: &mut Context<Self>) {
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

    pub(super) fn start_pruner(&mut self, ctx: &mut Context<Self>) {
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
    pub(super) fn restart(&mut self, child: Child, ctx: &mut Context<Self>) {
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
    pub(super) fn child_stopped(&mut self, child: Child, ctx: &mut Context<Self>) {
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
        let now = Instant::now();
        if message.since == Some(HlcTime::MAX) {
            self.batcher.push_state_unclaimed(&message.model, message.rows, now);
        } else {
            self.batcher.push_state(&message.model, message.since, message.rows, now);
        }
        self.schedule_flush(ctx);
    }
}

/// Timer → supervisor: the batching window of a pending batch closed.
pub(super) struct FlushDue;
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
            let supervisor = ctx.address();
            actix::spawn(async move {
                let response = if enabled {
                    // A resync this asks for is stale once a backfill ended after this point.
                    let completed =
                        inner.backfills_completed.load(std::sync::atomic::Ordering::Acquire);
                    let served = sync::serve(&inner, request.peer, request.message).await;
                    if served.rolled_back {
                        supervisor.do_send(ResyncNeeded {
                            scope: lsync_backfill::Scope::Everything,
                            delete_missing: true,
                            from: request.peer,
                            completed,
                        });
                    }
                    served.response
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
pub(super) fn push<T: Transport>(addr: &Addr<PeerActor<T>>, peer: DeviceId, message: Push) {
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

#[cfg(test)]
impl<T: Transport> Handler<Generations> for Supervisor<T> {
    type Result = MessageResult<Generations>;
    fn handle(&mut self, _: Generations, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.generations.clone())
    }
}

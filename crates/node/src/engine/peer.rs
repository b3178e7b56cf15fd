//! The actor of one remote device: applies what it sends in order, acknowledges, catches up
//! from it, and sends to it through its own ordered sender task.

use super::*;

/// Supervisor → peer actor: exchange watermarks and pull what this device lacks (sync was
/// switched back on).
pub(super) struct CatchUpNow;
impl Message for CatchUpNow {
    type Result = ();
}

/// Supervisor → a restarted peer actor: the peer is connected; catch up with it.
pub(super) struct Restarted;
impl Message for Restarted {
    type Result = ();
}

/// Supervisor → peer actor: answered once every message queued for the peer before it was
/// handed to the transport.
pub(super) struct Drain;
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
pub(super) struct PeerActor<T: Transport> {
    pub(super) peer: DeviceId,
    pub(super) inner: Arc<LibraryInner>,
    pub(super) transport: Arc<T>,
    pub(super) supervisor: Addr<Supervisor<T>>,
    pub(super) siblings: Arc<Siblings<T>>,
    pub(super) online: bool,
    pub(super) catching_up: bool,
    /// The last catch-up failed: the next heartbeat from the peer starts one, with a watermark
    /// request of its own, whether or not the heartbeat shows the peer ahead. Only a request's
    /// answer tells what the peer saw of this copy (`Watermarks::seen`): a copy restored from an
    /// old file, whose catch-up with a peer failed (its sync was off), would otherwise never
    /// hear from that peer once its own writes put it ahead, and lose the rows only that peer
    /// held.
    pub(super) owed: bool,
    pub(super) outbound: Option<mpsc::Sender<Outbound>>,
    /// `peer{peer=…}`: every log line of the actor, its futures and its sender task is inside.
    pub(super) span: tracing::Span,
    pub(super) _watch: Watch,
}

/// What a peer actor's sender task takes, in order.
pub(super) enum Outbound {
    /// Send this; with a coverage, register it for acknowledgement. Boxed: messages vary in
    /// size, and the queue's slots stay small.
    Message(Box<WireMessage>, Option<Coverage>),
    /// Everything queued before this was handed to the transport.
    Marker(tokio::sync::oneshot::Sender<()>),
}

/// Messages waiting for the network, per peer. 256 batches of up to `max_batch_rows` rows: a
/// peer that cannot take that much is not keeping up, and catch-up by watermark serves it better
/// than a deeper queue.
pub(super) const OUTBOUND_CAPACITY: usize = 256;

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
    pub(super) fn queue(&self, message: WireMessage, covers: Option<Coverage>) {
        let Some(outbound) = &self.outbound else { return };
        if outbound.try_send(Outbound::Message(Box::new(message), covers)).is_err() {
            metrics::counter!("lsync_push_skipped_total").increment(1);
            tracing::debug!(peer = %self.peer, "outbound queue full; catch-up by watermark takes over");
        }
    }

    /// Exchanges watermarks with the peer and pulls what this device lacks. Runs in the actor's
    /// context with `wait`, so batches from this peer are applied after the catch-up, in order.
    pub(super) fn catch_up(
        &mut self,
        ctx: &mut Context<Self>,
        theirs: Option<lsync_protocol::Watermarks>,
    ) {
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
        // What this catch-up starts from: a resync it asks for is stale once a backfill ended.
        let completed = self.inner.backfills_completed.load(std::sync::atomic::Ordering::Acquire);
        // Only an answer to this device's own request says what the peer heard of this copy
        // (`seen`); heartbeat watermarks do not, and confirm nothing.
        let asked = theirs.is_none();
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
                    from: peer,
                    completed,
                });
                return Ok((false, None));
            }
            // The peer holds more of one of this device's incarnations than it does, or saw more
            // of this copy than its file holds: the file was rolled back to an older copy (with
            // the generation file that would have told at open). Fetch everything back; shared
            // writes wait meanwhile. Both checks run, so the incarnation is recorded once.
            let lost_changes = sync::own_rollback(&inner, &theirs).await?;
            let seen_more = sync::copy_rolled_back(&inner, &theirs).await?;
            let lost_rows = sync::own_rows_rolled_back(&inner, &theirs).await?;
            if lost_changes.is_some() || seen_more || lost_rows {
                sync::own_rows_unconfirmed(&inner);
                // Claims nothing from now on; the resync this starts keeps it so until it ends.
                inner.serves.store(false, std::sync::atomic::Ordering::Release);
                tracing::error!(%peer, ?lost_changes, lost_rows, seen = ?theirs.seen, "this copy was rolled back to an older file: resyncing fully");
                metrics::counter!("lsync_rollbacks_detected_total").increment(1);
                supervisor.do_send(ResyncNeeded {
                    scope: lsync_backfill::Scope::Everything,
                    delete_missing: true,
                    from: peer,
                    completed,
                });
                return Ok((false, None));
            }
            sync::record_ack(&inner, peer, &sync::ack_of(&theirs)).await?;
            let outcome = sync::catch_up(&inner, &*transport, peer, &theirs).await?;
            // Only once this device holds what the peer holds of its rows: a barrier set before
            // the catch-up from the last peer to confirm raised the own mark over the rows only
            // that peer held, which the catch-up then no longer asked for, and every peer's
            // comparison deleted them (found by the deterministic mode's `recreate` fault).
            if asked {
                sync::own_rows_confirmed(&inner, peer).await?;
            }
            let pulled = outcome.pulled;
            if outcome.pruned {
                supervisor.do_send(ResyncNeeded {
                    scope: lsync_backfill::Scope::Shared,
                    delete_missing: false,
                    from: peer,
                    completed,
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
                    actor.owed = false;
                    tracing::debug!(peer = %actor.peer, pulled, "caught up");
                    actor.inner.emit(Event::CaughtUp { peer: actor.peer, pulled });
                    if let Some(ack) = ack {
                        actor.queue(WireMessage::Ack(ack), None);
                    }
                    actor.siblings.prune_soon();
                }
                Err(error) => {
                    metrics::counter!("lsync_catch_up_failures_total").increment(1);
                    if actor.owed {
                        // Retried on every heartbeat: said once, not every few seconds.
                        tracing::debug!(peer = %actor.peer, %error, "catch-up failed again");
                    } else {
                        tracing::warn!(peer = %actor.peer, %error, "catch-up stopped; it resumes on the next heartbeat or reconnect");
                    }
                    actor.owed = true;
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
    pub(super) fn apply(&mut self, ctx: &mut Context<Self>, message: lsync_protocol::Message) {
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
                        sync::observe_own_marks(&inner, &watermarks);
                        let _ = sync::record_ack(&inner, peer, &sync::ack_of(&watermarks)).await;
                        // What the peer's copy is at, told back to it in watermark responses (a
                        // copy rolled back to an old file learns it from them).
                        if watermarks.incarnation.is_some() {
                            let seen = watermarks.incarnation;
                            let _ = inner
                                .db
                                .write(async |conn| {
                                    lsync_watermark::sql::record_seen(conn, peer, seen, false).await
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
                        if actor.owed {
                            actor.catch_up(ctx, None);
                        } else if let Some(theirs) = behind {
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

#[cfg(test)]
impl<T: Transport> Handler<Crash> for PeerActor<T> {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected failure of a peer actor");
    }
}

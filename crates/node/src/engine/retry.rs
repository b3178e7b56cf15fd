//! The retry actor: re-sends what a peer did not acknowledge in time, with backoff
//! ([`crate::core::retry::RetryQueue`]).

use super::*;

/// Holds sent batches until acknowledged; re-sends what is not, with backoff.
pub(super) struct RetryActor<T: Transport> {
    pub(super) queue: RetryQueue<WireMessage>,
    pub(super) supervisor: Addr<Supervisor<T>>,
    pub(super) timer: Option<SpawnHandle>,
    pub(super) _watch: Watch,
}

impl<T: Transport> RetryActor<T> {
    pub(super) fn schedule(&mut self, ctx: &mut Context<Self>) {
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

#[cfg(test)]
impl<T: Transport> Handler<Crash> for RetryActor<T> {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected failure of the retry actor");
    }
}

//! The pruner actor: prunes the peer log and collects tombstones on an interval and when
//! acknowledgements arrive ([`crate::sync::prune`]).

use super::*;

/// Prunes the peer log and collects tombstones when acks allow, on an interval and soon after
/// acks arrive (debounced to one run per second).
pub(super) struct PrunerActor {
    pub(super) inner: Arc<LibraryInner>,
    pub(super) supervisor: Recipient<ChildFailed>,
    pub(super) pending: bool,
    pub(super) _watch: Watch,
}

impl PrunerActor {
    pub(super) fn run(&mut self, ctx: &mut Context<Self>) {
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

#[cfg(test)]
impl Handler<Crash> for PrunerActor {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected failure of the pruner");
    }
}

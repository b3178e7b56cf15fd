//! Sans-IO state machines of the engine. Each takes inputs and the current time (`now`, a
//! monotonic [`std::time::Instant`] supplied by the caller) and returns what should happen; the
//! actors do the IO. Time passed in must never go backwards.
//!
//! - [`batcher::Batcher`]: the batching window for local writes, with coalescing and chunking.
//! - [`retry::RetryQueue`]: messages awaiting a peer's ack, re-sent with backoff.

use std::time::{Duration, Instant};

pub mod batcher;
pub mod retry;

/// `now + delay`, or, if that instant cannot be represented, the latest representable instant
/// found by halving `delay` (so a configured "forever" means "as late as the platform allows"
/// instead of a panic).
pub(crate) fn instant_after(now: Instant, delay: Duration) -> Instant {
    let mut delay = delay;
    loop {
        if let Some(later) = now.checked_add(delay) {
            return later;
        }
        delay /= 2;
    }
}

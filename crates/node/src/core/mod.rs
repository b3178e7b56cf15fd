//! Sans-IO state machines of the engine. Each takes inputs and the current time (`now`, a
//! monotonic [`std::time::Instant`] supplied by the caller) and returns what should happen; the
//! actors do the IO. Time passed in must never go backwards.
//!
//! - [`batcher::Batcher`]: the batching window for local writes, with coalescing and chunking.

pub mod batcher;

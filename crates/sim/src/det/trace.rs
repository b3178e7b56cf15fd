//! The event trace of a deterministic run, kept as a running hash: two runs are the same run when
//! their traces hash the same.

/// What happened (the first word hashed for each event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A message handed to the network: from, to, message kind.
    Send = 1,
    /// A message delivered: from, to.
    Deliver,
    /// A shared change applied: device, origin, seq.
    Apply,
    /// A log prefix pruned: device, origin, through.
    Prune,
    /// A local write: device, kind (0 shared, 1 row), record or row id bits.
    Write,
    /// A fault: kind, devices involved.
    Fault,
    /// Devices connected or disconnected: a, b, 1 or 0.
    Link,
    /// A backfill event: device, what (resumed, planned, rebased, page, ready, failed), detail.
    Backfill,
}

/// FNV-1a offset basis (64-bit).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a prime (64-bit).
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A running 64-bit FNV-1a hash of every event, with virtual time, and a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trace {
    hash: u64,
    events: u64,
    now_ms: u64,
}

impl Default for Trace {
    fn default() -> Self {
        Self { hash: FNV_OFFSET, events: 0, now_ms: 0 }
    }
}

impl Trace {
    /// Sets the virtual time recorded with the following events.
    pub(crate) fn at(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    /// Records one event.
    pub(crate) fn record(&mut self, event: Event, fields: &[u64]) {
        self.events += 1;
        self.mix(event as u64);
        self.mix(self.now_ms);
        for field in fields {
            self.mix(*field);
        }
    }

    fn mix(&mut self, word: u64) {
        for byte in word.to_le_bytes() {
            self.hash ^= u64::from(byte);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
    }

    /// The hash of everything recorded.
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    /// How many events were recorded.
    pub(crate) fn events(&self) -> u64 {
        self.events
    }
}

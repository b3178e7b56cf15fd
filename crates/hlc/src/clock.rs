//! Wall-clock sources. The generator never reads the system time directly, so tests and the
//! deterministic simulator decide what "now" is.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// The value may stall or go backwards (NTP steps, a user changing the time); the clock rules cope
/// with both. Implementations must be cheap: the generator reads the clock once per stamp.
pub trait Clock: Send + Sync {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn now_ms(&self) -> u64;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A system clock set before 1970 reads as the epoch: the HLC then keeps counting logically
        // from its last stamp, which is the best it can do with such a clock.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that only moves when told to; shared freely between threads.
///
/// Used by tests and the deterministic simulator, where each simulated device owns one and the
/// simulator sets it from its virtual time plus that device's skew.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock that reads `now_ms` until changed.
    pub fn new(now_ms: u64) -> Self {
        Self { now_ms: AtomicU64::new(now_ms) }
    }

    /// Sets the time, forwards or backwards.
    pub fn set(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::Release);
    }

    /// Moves the time forwards by `delta_ms` (saturating).
    pub fn advance(&self, delta_ms: u64) {
        // fetch_update cannot fail with a closure that always returns Some.
        let _ = self.now_ms.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            Some(now.saturating_add(delta_ms))
        });
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(5);
        assert_eq!(clock.now_ms(), 1_005);
        clock.set(10);
        assert_eq!(clock.now_ms(), 10);
        clock.set(u64::MAX - 1);
        clock.advance(10);
        assert_eq!(clock.now_ms(), u64::MAX);
    }

    #[test]
    fn system_clock_reads_a_plausible_time() {
        // 2020-01-01 in ms: any machine running these tests is past it.
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}

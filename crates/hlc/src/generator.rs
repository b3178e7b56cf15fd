//! The clock rules: a sans-IO state ([`HlcState`]) and a thread-safe generator ([`HlcGenerator`])
//! that share the same two step functions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::{Clock, DeviceId, Hlc, HlcTime};

/// Clock settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HlcConfig {
    /// How far ahead of the local wall clock a remote stamp may be before it is refused.
    ///
    /// Default: 60 seconds. Devices synchronised by NTP agree within milliseconds, and a free-running
    /// laptop or phone clock drifts by seconds a week, so honest devices stay far inside a minute. A
    /// device with a wrong clock (dead RTC battery, a time zone entered as UTC, a user setting the
    /// date by hand) is off by hours or years and is caught. A larger bound would let such a device
    /// push every peer's clock, and so every later write, that far into the future.
    pub max_drift: Duration,
}

impl Default for HlcConfig {
    fn default() -> Self {
        Self { max_drift: Duration::from_secs(60) }
    }
}

impl HlcConfig {
    fn max_drift_ms(&self) -> u64 {
        u64::try_from(self.max_drift.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Where a generator starts counting from. There is deliberately no default: whoever builds a
/// generator must say whether this device has issued stamps before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The device has never issued or observed a stamp (a brand-new library on this device).
    FirstStart,
    /// The largest stamp this device persisted before it stopped; every new stamp exceeds it, even
    /// if the wall clock now reads earlier.
    After(Hlc),
}

/// Why the clock refused a stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HlcError {
    /// A remote stamp was too far ahead of the local wall clock; the clock was not changed.
    #[error(
        "remote stamp {remote} is {ahead_ms} ms ahead of the local wall clock, beyond the drift bound of {max_drift_ms} ms"
    )]
    DriftExceeded {
        /// The refused stamp.
        remote: Hlc,
        /// The local wall clock when it was refused.
        wall_ms: u64,
        /// How far ahead the stamp's physical time was.
        ahead_ms: u64,
        /// The configured bound.
        max_drift_ms: u64,
    },
    /// The clock reached [`HlcTime::MAX`] (the year 10889, or a corrupt persisted stamp) and cannot
    /// issue a larger stamp.
    #[error(
        "the clock cannot issue a stamp after {last:?}: the largest representable time was reached"
    )]
    Exhausted {
        /// The last time issued.
        last: HlcTime,
    },
}

/// The send rule: the next local time after `last` at wall time `wall_ms`.
fn step_local(last: HlcTime, wall_ms: u64) -> Result<HlcTime, HlcError> {
    let after_last = last.successor().ok_or(HlcError::Exhausted { last })?;
    Ok(after_last.max(HlcTime::from_physical_saturating(wall_ms)))
}

/// The receive rule: the time of receiving `remote` after `last` at wall time `wall_ms`.
fn step_receive(
    last: HlcTime,
    remote: Hlc,
    wall_ms: u64,
    max_drift_ms: u64,
) -> Result<HlcTime, HlcError> {
    let ahead_ms = remote.physical_ms().saturating_sub(wall_ms);
    if ahead_ms > max_drift_ms {
        return Err(HlcError::DriftExceeded { remote, wall_ms, ahead_ms, max_drift_ms });
    }
    let latest = last.max(remote.time());
    let after_latest = latest.successor().ok_or(HlcError::Exhausted { last: latest })?;
    Ok(after_latest.max(HlcTime::from_physical_saturating(wall_ms)))
}

fn resume_time(resume: Resume) -> HlcTime {
    match resume {
        Resume::FirstStart => HlcTime::ZERO,
        Resume::After(last) => last.time(),
    }
}

/// The clock as a plain value: every call takes the wall time, nothing is read from the system.
///
/// Call [`HlcState::tick`] for each local event and [`HlcState::receive`] for each received stamp.
/// Wall times passed in may go backwards; the stamps never do.
#[derive(Debug, Clone)]
pub struct HlcState {
    device: DeviceId,
    last: HlcTime,
    max_drift_ms: u64,
}

impl HlcState {
    /// A clock for `device`, continuing after `resume`.
    pub fn new(device: DeviceId, config: HlcConfig, resume: Resume) -> Self {
        Self { device, last: resume_time(resume), max_drift_ms: config.max_drift_ms() }
    }

    /// The stamp for a local event at wall time `wall_ms`.
    pub fn tick(&mut self, wall_ms: u64) -> Result<Hlc, HlcError> {
        self.last = step_local(self.last, wall_ms)?;
        Ok(Hlc::new(self.last, self.device))
    }

    /// Observes `remote` at wall time `wall_ms` and returns the stamp of the receive event, which is
    /// larger than both `remote` and every earlier stamp. On error the state is unchanged.
    pub fn receive(&mut self, remote: Hlc, wall_ms: u64) -> Result<Hlc, HlcError> {
        self.last = step_receive(self.last, remote, wall_ms, self.max_drift_ms)?;
        Ok(Hlc::new(self.last, self.device))
    }

    /// The largest stamp issued or observed so far: what to persist.
    pub fn last(&self) -> Hlc {
        Hlc::new(self.last, self.device)
    }

    /// The device this clock stamps for.
    pub fn device(&self) -> DeviceId {
        self.device
    }
}

/// A thread-safe hybrid logical clock for one device, reading wall time from `C`.
///
/// Lock-free: the state is one `u64` advanced by compare-and-swap, so any number of threads or
/// tasks may stamp concurrently without an async runtime, and no two calls get the same stamp.
#[derive(Debug)]
pub struct HlcGenerator<C> {
    device: DeviceId,
    clock: C,
    last: AtomicU64,
    max_drift_ms: u64,
}

impl<C: Clock> HlcGenerator<C> {
    /// A generator for `device` that reads `clock` and continues after `resume`.
    pub fn new(device: DeviceId, clock: C, config: HlcConfig, resume: Resume) -> Self {
        Self {
            device,
            clock,
            last: AtomicU64::new(resume_time(resume).as_u64()),
            max_drift_ms: config.max_drift_ms(),
        }
    }

    /// The stamp for a local event (a write): strictly larger than every stamp this generator issued
    /// or observed before.
    pub fn now(&self) -> Result<Hlc, HlcError> {
        let wall_ms = self.clock.now_ms();
        self.advance(|last| step_local(last, wall_ms))
    }

    /// Observes a stamp received from another device and returns the stamp of the receive event.
    ///
    /// Refuses, without changing the clock, a stamp more than `max_drift` ahead of the wall clock.
    /// Old stamps, and stamps already observed, are accepted and only move the counter on.
    pub fn update(&self, remote: Hlc) -> Result<Hlc, HlcError> {
        let wall_ms = self.clock.now_ms();
        self.advance(|last| step_receive(last, remote, wall_ms, self.max_drift_ms))
    }

    /// The largest stamp issued or observed so far: what to persist.
    pub fn last(&self) -> Hlc {
        Hlc::new(HlcTime::from_u64(self.last.load(Ordering::Acquire)), self.device)
    }

    /// How far the clock runs ahead of the wall clock, in milliseconds (0 when behind). Non-zero
    /// after the wall clock stepped back or after observing stamps from faster clocks; shown in
    /// status so that skew is visible.
    pub fn lead_ms(&self) -> u64 {
        self.last().physical_ms().saturating_sub(self.clock.now_ms())
    }

    /// The device this generator stamps for.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The wall clock it reads, now (ms since the Unix epoch).
    pub fn wall_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The configured drift bound in milliseconds.
    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    fn advance(
        &self,
        step: impl Fn(HlcTime) -> Result<HlcTime, HlcError>,
    ) -> Result<Hlc, HlcError> {
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = step(HlcTime::from_u64(last))?.as_u64();
            match self.last.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(Hlc::new(HlcTime::from_u64(next), self.device)),
                Err(current) => last = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{MAX_LOGICAL, ManualClock};

    const DRIFT_MS: u64 = 60_000;

    fn device(byte: u8) -> DeviceId {
        DeviceId::from_bytes([byte; 16])
    }

    fn at(physical_ms: u64, logical: u16) -> HlcTime {
        HlcTime::new(physical_ms, logical).unwrap()
    }

    fn remote(physical_ms: u64, logical: u16) -> Hlc {
        Hlc::new(at(physical_ms, logical), device(0xee))
    }

    fn generator(wall_ms: u64) -> (Arc<ManualClock>, HlcGenerator<Arc<ManualClock>>) {
        let clock = Arc::new(ManualClock::new(wall_ms));
        let generator =
            HlcGenerator::new(device(1), clock.clone(), HlcConfig::default(), Resume::FirstStart);
        (clock, generator)
    }

    /// Runs the send rule from `(last, wall)` and compares with the expected `(physical, logical)`.
    fn check_local(last: HlcTime, wall_ms: u64, expected: (u64, u16)) {
        let next = step_local(last, wall_ms).unwrap();
        assert_eq!((next.physical_ms(), next.logical()), expected, "last {last:?}, wall {wall_ms}");
    }

    /// Runs the receive rule and compares with the expected `(physical, logical)`.
    fn check_receive(last: HlcTime, remote_time: HlcTime, wall_ms: u64, expected: (u64, u16)) {
        let next = step_receive(last, Hlc::new(remote_time, device(9)), wall_ms, DRIFT_MS).unwrap();
        assert_eq!(
            (next.physical_ms(), next.logical()),
            expected,
            "last {last:?}, remote {remote_time:?}, wall {wall_ms}"
        );
    }

    #[test]
    fn send_rule() {
        // Wall clock advanced: take it, counter resets.
        check_local(at(100, 7), 200, (200, 0));
        // Wall clock stalled: counter increments.
        check_local(at(100, 7), 100, (100, 8));
        // Wall clock stepped back: keep the last physical time, counter increments.
        check_local(at(100, 7), 50, (100, 8));
        // Counter full: carry into physical time instead of wrapping.
        check_local(at(100, MAX_LOGICAL), 100, (101, 0));
    }

    #[test]
    fn receive_rule() {
        // Wall clock ahead of both: (pt, 0).
        check_receive(at(100, 3), at(150, 9), 200, (200, 0));
        // Remote ahead of local and wall: remote's counter + 1.
        check_receive(at(100, 3), at(150, 9), 120, (150, 10));
        // Local ahead: local counter + 1.
        check_receive(at(150, 3), at(100, 9), 120, (150, 4));
        // Equal physical parts: the larger counter + 1.
        check_receive(at(150, 3), at(150, 9), 150, (150, 10));
        check_receive(at(150, 12), at(150, 9), 150, (150, 13));
        // Counter full on the remote stamp: carry.
        check_receive(at(100, 0), at(150, MAX_LOGICAL), 120, (151, 0));
    }

    #[test]
    fn stamps_strictly_increase_when_the_wall_clock_stalls_or_steps_back() {
        let (clock, generator) = generator(1_000);
        let mut previous = generator.now().unwrap();
        for wall_ms in [1_000, 1_000, 900, 0, 1_000, 1_001, 500] {
            clock.set(wall_ms);
            let next = generator.now().unwrap();
            assert!(next > previous, "{next} after {previous} at wall {wall_ms}");
            previous = next;
        }
    }

    #[test]
    fn after_update_the_next_stamp_is_larger_than_the_remote_stamp() {
        let (_, generator) = generator(1_000);
        let future = remote(1_000 + DRIFT_MS, 42);
        let receive_stamp = generator.update(future).unwrap();
        assert!(receive_stamp > future);
        assert!(generator.now().unwrap() > future);
    }

    #[test]
    fn a_stamp_beyond_the_drift_bound_is_refused_and_leaves_the_clock_alone() {
        let (_, generator) = generator(1_000);
        let before = generator.now().unwrap();
        let too_far = remote(1_000 + DRIFT_MS + 1, 0);
        assert_eq!(
            generator.update(too_far),
            Err(HlcError::DriftExceeded {
                remote: too_far,
                wall_ms: 1_000,
                ahead_ms: DRIFT_MS + 1,
                max_drift_ms: DRIFT_MS
            })
        );
        assert_eq!(generator.last(), before);
        assert_eq!(generator.now().unwrap().time(), at(1_000, before.logical() + 1));
    }

    #[test]
    fn old_and_repeated_stamps_never_make_the_clock_regress() {
        let (_, generator) = generator(5_000);
        let current = generator.now().unwrap();
        let old = remote(10, 0);
        let first = generator.update(old).unwrap();
        let again = generator.update(old).unwrap();
        assert!(current < first && first < again);
        assert_eq!(again.physical_ms(), 5_000);
    }

    #[test]
    fn counter_resets_when_physical_time_advances() {
        let (clock, generator) = generator(1_000);
        for _ in 0..5 {
            generator.now().unwrap();
        }
        assert_eq!(generator.last().logical(), 4);
        clock.advance(1);
        assert_eq!(generator.now().unwrap().time(), at(1_001, 0));
    }

    #[test]
    fn counter_overflow_carries_into_physical_time() {
        let (_, generator) = generator(1_000);
        let mut previous = generator.now().unwrap();
        for _ in 0..=u32::from(MAX_LOGICAL) {
            let next = generator.now().unwrap();
            assert!(next > previous);
            previous = next;
        }
        assert_eq!(previous.time(), at(1_001, 0));
    }

    #[test]
    fn resuming_after_a_persisted_stamp_continues_above_it_even_if_the_wall_clock_is_behind() {
        let persisted = Hlc::new(at(9_000, 3), device(1));
        let clock = ManualClock::new(1_000);
        let generator =
            HlcGenerator::new(device(1), &clock, HlcConfig::default(), Resume::After(persisted));
        assert_eq!(generator.now().unwrap().time(), at(9_000, 4));
        assert_eq!(generator.lead_ms(), 8_000);
    }

    #[test]
    fn the_largest_time_is_an_error_not_a_wrap() {
        let clock = ManualClock::new(1_000);
        let persisted = Hlc::new(HlcTime::MAX, device(1));
        let generator =
            HlcGenerator::new(device(1), &clock, HlcConfig::default(), Resume::After(persisted));
        assert_eq!(generator.now(), Err(HlcError::Exhausted { last: HlcTime::MAX }));
        assert_eq!(generator.last(), persisted);
    }

    #[test]
    fn state_and_generator_follow_the_same_rules() {
        let clock = ManualClock::new(0);
        let generator =
            HlcGenerator::new(device(1), &clock, HlcConfig::default(), Resume::FirstStart);
        let mut state = HlcState::new(device(1), HlcConfig::default(), Resume::FirstStart);
        for (wall_ms, incoming) in [(5, None), (5, Some(remote(9, 2))), (3, None), (70, None)] {
            clock.set(wall_ms);
            let (from_generator, from_state) = match incoming {
                Some(stamp) => (generator.update(stamp), state.receive(stamp, wall_ms)),
                None => (generator.now(), state.tick(wall_ms)),
            };
            assert_eq!(from_generator, from_state);
        }
        assert_eq!(generator.last(), state.last());
    }

    #[test]
    fn concurrent_callers_never_share_a_stamp() {
        let (_, generator) = generator(1_000);
        let per_thread = 20_000;
        let stamps: Vec<Hlc> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..per_thread).map(|_| generator.now().unwrap()).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|handle| handle.join().unwrap()).collect()
        });
        let unique: std::collections::BTreeSet<_> = stamps.iter().copied().collect();
        assert_eq!(unique.len(), 4 * per_thread);
    }
}

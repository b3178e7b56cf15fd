//! The transport's knobs, with documented defaults, and the reconnect backoff they drive.

use std::time::Duration;

/// Tuning of a transport. Every field has a default (see [`TransportConfig::default`]);
/// [`TransportConfig::validate`] checks the relations between them, and the transports call it at
/// start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// The longest a connection attempt (QUIC and TLS handshake, then the `Hello` exchange) may
    /// take. Default 10 s: the QUIC handshake needs a few round trips; 10 s covers lossy,
    /// high-latency mobile links with retransmissions.
    pub handshake_timeout: Duration,
    /// How often each side sends a `Heartbeat` on an idle or busy connection, and the QUIC
    /// keep-alive interval. Default 5 s: keeps NAT bindings (commonly 30 s for UDP) open and
    /// refreshes the RTT often, at a cost of a few hundred bytes per 5 s.
    pub heartbeat_interval: Duration,
    /// A peer that answered no heartbeat for this long is reported disconnected (also the QUIC idle
    /// timeout). Default 15 s: three heartbeat intervals, so one or two lost heartbeats do not
    /// drop a healthy connection.
    pub stale_timeout: Duration,
    /// First delay before redialing a known peer after a failed attempt or a disconnection.
    /// Default 500 ms: reconnects quickly after a blip.
    pub backoff_base: Duration,
    /// The longest delay between redials; the delay doubles per failure up to this. Default 60 s:
    /// an offline peer costs one attempt a minute.
    pub backoff_cap: Duration,
    /// The most requests a peer may have in flight to this device at once (QUIC bidirectional
    /// streams); further requests wait at the sender. Default 32: the engine keeps a handful in
    /// flight per peer (watermarks, catch-up pages, heartbeats), and the cap bounds what one peer
    /// can make this device buffer to 32 frames of at most 8 MiB.
    pub max_concurrent_requests: u32,
    /// Capacity of the events channel. When it is full the transport waits (stops reading from
    /// peers, so QUIC flow control slows the senders) rather than dropping. Default 1024 events.
    pub event_capacity: usize,
    /// The longest [`crate::Transport::shutdown`] waits, in all: for queued one-way messages to
    /// be acknowledged by their peers (those left are reported as unsent), then for the close to
    /// reach them. Default 5 s.
    pub close_timeout: Duration,
    /// The longest a one-way send waits for the peer to take the message (QUIC flow control: a
    /// peer that stopped reading without closing). Past it the send fails with
    /// [`crate::SendError::TimedOut`] and the stream is reset, so one hung peer holds up neither
    /// its sender's queue nor a shutdown for longer. Default 10 s.
    pub send_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            stale_timeout: Duration::from_secs(15),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            max_concurrent_requests: 32,
            event_capacity: 1024,
            close_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(10),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transport configuration: {0}")]
pub struct ConfigError(pub String);

impl TransportConfig {
    /// Checks every field and the relations between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |reason: &str| Err(ConfigError(reason.to_owned()));
        if self.handshake_timeout.is_zero() {
            return fail("handshake_timeout must be positive");
        }
        if self.heartbeat_interval.is_zero() {
            return fail("heartbeat_interval must be positive");
        }
        if self.stale_timeout <= self.heartbeat_interval {
            return fail("stale_timeout must be longer than heartbeat_interval");
        }
        if self.backoff_base.is_zero() || self.backoff_cap < self.backoff_base {
            return fail("backoff_base must be positive and at most backoff_cap");
        }
        if self.max_concurrent_requests == 0 {
            return fail("max_concurrent_requests must be at least 1");
        }
        if self.event_capacity == 0 {
            return fail("event_capacity must be at least 1");
        }
        Ok(())
    }
}

/// Exponential backoff with jitter: the `n`-th consecutive failure waits a random delay between
/// half and all of `min(cap, base * 2^n)` ("equal jitter"). The random half spreads redials of
/// many devices that lost the same network at once; the fixed half keeps the delay growing.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// Backoff between `base` and `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, failures: 0 }
    }

    /// The delay before the next attempt, given a uniformly random `random`; counts a failure.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        // 2^32 times any positive base exceeds every sensible cap; stopping the exponent there
        // avoids overflow.
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let half_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if half_nanos == 0 { 0 } else { random % (half_nanos + 1) };
        half + Duration::from_nanos(jitter) + (ceiling - half * 2)
    }

    /// Forgets past failures (after a successful connection).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny, fast, statistically sound generator for
/// jitter and the in-memory network's faults. Not for secrets (those come from `ring`).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniformly random number in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        // The top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `true` with probability `p` (clamped to `[0, 1]`).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }

    /// A uniformly random duration in `[low, high]` (`low` if `high < low`).
    pub fn duration_between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = u64::try_from(high.saturating_sub(low).as_nanos()).unwrap_or(u64::MAX);
        if span == 0 {
            return low;
        }
        low + Duration::from_nanos(self.next_u64() % span.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(TransportConfig::default().validate(), Ok(()));
    }

    #[test]
    fn broken_configurations_are_refused() {
        let check = |change: fn(&mut TransportConfig)| {
            let mut config = TransportConfig::default();
            change(&mut config);
            assert!(config.validate().is_err(), "{config:?}");
        };
        check(|config| config.handshake_timeout = Duration::ZERO);
        check(|config| config.heartbeat_interval = Duration::ZERO);
        check(|config| config.stale_timeout = config.heartbeat_interval);
        check(|config| config.backoff_base = Duration::ZERO);
        check(|config| config.backoff_cap = config.backoff_base / 2);
        check(|config| config.max_concurrent_requests = 0);
        check(|config| config.event_capacity = 0);
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        let mut rng = SplitMix64::new(1);
        let mut backoff = Backoff::new(base, cap);
        for failure in 0..12u32 {
            let ceiling = (base * 2u32.pow(failure.min(20))).min(cap);
            let delay = backoff.next_delay(rng.next_u64());
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{failure}: {delay:?} vs {ceiling:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay(u64::MAX) <= base);
        // Extreme inputs neither panic nor exceed the cap.
        let mut huge = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..100 {
            huge.next_delay(u64::MAX);
        }
    }

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let x = a.next_f64();
            assert!((0.0..1.0).contains(&x));
            b.next_f64();
        }
        let low = Duration::from_millis(5);
        let high = Duration::from_millis(9);
        for _ in 0..1000 {
            let d = a.duration_between(low, high);
            assert!(d >= low && d <= high);
        }
        assert!(!a.chance(0.0));
        assert!(a.chance(1.0));
    }
}

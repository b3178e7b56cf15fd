//! Property tests of the clock rules and encodings, through the public API only.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::collections::BTreeSet;

use lsync_hlc::{
    DeviceId, Hlc, HlcConfig, HlcError, HlcGenerator, HlcState, HlcTime, ManualClock, Resume,
};
use proptest::prelude::*;

fn any_hlc() -> impl Strategy<Value = Hlc> {
    (any::<u64>(), any::<[u8; 16]>())
        .prop_map(|(time, device)| Hlc::new(HlcTime::from_u64(time), DeviceId::from_bytes(device)))
}

fn config(max_drift_ms: u64) -> HlcConfig {
    HlcConfig { max_drift: std::time::Duration::from_millis(max_drift_ms) }
}

/// One step of the multi-device scenario.
#[derive(Debug, Clone)]
enum Event {
    /// Global time moves forward.
    Advance(u64),
    /// Device `.0` stamps a local write.
    Local(usize),
    /// Device `.0` stamps a message and device `.1` receives it.
    Send(usize, usize),
}

fn event(n_devices: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        (0u64..50).prop_map(Event::Advance),
        (0..n_devices).prop_map(Event::Local),
        (0..n_devices, 0..n_devices).prop_map(|(from, to)| Event::Send(from, to)),
    ]
}

fn scenario() -> impl Strategy<Value = (Vec<i64>, u64, Vec<Event>)> {
    (2usize..6).prop_flat_map(|n_devices| {
        (
            prop::collection::vec(-5_000i64..=5_000, n_devices),
            0u64..15_000,
            prop::collection::vec(event(n_devices), 1..300),
        )
    })
}

proptest! {
    /// Devices with skewed wall clocks stamp writes and exchange messages in random order.
    /// Every stamp is unique, each device's stamps increase, a receive is stamped after the send,
    /// and no clock runs ahead of its own wall clock by more than the drift bound.
    #[test]
    fn devices_with_skewed_clocks_exchanging_stamps((skews, max_drift_ms, events) in scenario()) {
        let start_ms: u64 = 1_700_000_000_000;
        let mut global_ms = start_ms;
        let wall = |device: usize, global_ms: u64| global_ms.saturating_add_signed(skews[device]);
        let mut devices: Vec<HlcState> = (0..skews.len())
            .map(|index| {
                let id = DeviceId::from_bytes([u8::try_from(index).unwrap(); 16]);
                HlcState::new(id, config(max_drift_ms), Resume::FirstStart)
            })
            .collect();
        let mut seen = BTreeSet::new();
        let mut record = |device: &HlcState, stamp: Hlc, wall_ms: u64| {
            prop_assert!(seen.insert(stamp), "stamp {} issued twice", stamp);
            prop_assert_eq!(device.last(), stamp);
            let lead = stamp.physical_ms().saturating_sub(wall_ms);
            prop_assert!(lead <= max_drift_ms, "lead {} ms beyond bound {}", lead, max_drift_ms);
            Ok(())
        };
        for event in events {
            match event {
                Event::Advance(delta_ms) => global_ms += delta_ms,
                Event::Local(index) => {
                    let before = devices[index].last();
                    let wall_ms = wall(index, global_ms);
                    let stamp = devices[index].tick(wall_ms).unwrap();
                    prop_assert!(stamp > before);
                    record(&devices[index], stamp, wall_ms)?;
                }
                Event::Send(from, to) => {
                    let send_wall = wall(from, global_ms);
                    let sent = devices[from].tick(send_wall).unwrap();
                    record(&devices[from], sent, send_wall)?;
                    let before = devices[to].last();
                    let receive_wall = wall(to, global_ms);
                    match devices[to].receive(sent, receive_wall) {
                        Ok(received) => {
                            prop_assert!(received > sent && received > before);
                            record(&devices[to], received, receive_wall)?;
                        }
                        Err(HlcError::DriftExceeded { ahead_ms, .. }) => {
                            prop_assert!(ahead_ms > max_drift_ms);
                            prop_assert_eq!(devices[to].last(), before);
                        }
                        Err(other) => prop_assert!(false, "unexpected error {}", other),
                    }
                }
            }
        }
    }

    /// Whatever the wall clock does, a generator's stamps strictly increase.
    #[test]
    fn stamps_increase_under_any_wall_clock(walls in prop::collection::vec(any::<u64>(), 1..200)) {
        let clock = ManualClock::new(0);
        let generator = HlcGenerator::new(DeviceId::random(), &clock, HlcConfig::default(), Resume::FirstStart);
        let mut previous: Option<Hlc> = None;
        for wall_ms in walls {
            clock.set(wall_ms % (1 << 48));
            let stamp = generator.now().unwrap();
            prop_assert!(previous.is_none_or(|previous| stamp > previous));
            previous = Some(stamp);
        }
    }

    /// After observing any accepted remote stamp, every later local stamp is larger.
    #[test]
    fn later_stamps_exceed_every_observed_stamp(
        wall_ms in 0u64..(1 << 40),
        offsets in prop::collection::vec(-100_000i64..60_000, 1..50),
    ) {
        let clock = ManualClock::new(wall_ms);
        let generator = HlcGenerator::new(DeviceId::random(), &clock, HlcConfig::default(), Resume::FirstStart);
        for offset in offsets {
            let remote = Hlc::new(
                HlcTime::from_physical_saturating(wall_ms.saturating_add_signed(offset)),
                DeviceId::random(),
            );
            generator.update(remote).unwrap();
            prop_assert!(generator.now().unwrap() > remote);
        }
    }

    /// A generator resumed from any persisted stamp issues larger stamps.
    #[test]
    fn resume_continues_above_the_persisted_stamp(persisted in any_hlc(), wall_ms in 0u64..(1 << 48)) {
        prop_assume!(persisted.time() < HlcTime::MAX);
        let clock = ManualClock::new(wall_ms);
        let device = persisted.device();
        let generator = HlcGenerator::new(device, &clock, HlcConfig::default(), Resume::After(persisted));
        prop_assert!(generator.now().unwrap() > persisted);
    }

    /// Comparing byte forms gives the same answer as comparing stamps.
    #[test]
    fn byte_order_equals_stamp_order(a in any_hlc(), b in any_hlc()) {
        prop_assert_eq!(a.to_bytes().cmp(&b.to_bytes()), a.cmp(&b));
        prop_assert_eq!(Hlc::from_bytes(&a.to_bytes()).unwrap(), a);
    }

    /// Stamps survive the string form and MessagePack.
    #[test]
    fn encodings_round_trip(stamp in any_hlc()) {
        prop_assert_eq!(stamp.to_string().parse::<Hlc>().unwrap(), stamp);
        let packed = rmp_serde::to_vec(&stamp).unwrap();
        prop_assert_eq!(rmp_serde::from_slice::<Hlc>(&packed).unwrap(), stamp);
    }

    /// Arbitrary bytes never panic the decoders.
    #[test]
    fn hostile_bytes_are_errors_not_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = Hlc::from_bytes(&bytes);
        let _ = rmp_serde::from_slice::<Hlc>(&bytes);
        let _ = String::from_utf8_lossy(&bytes).parse::<Hlc>();
    }
}

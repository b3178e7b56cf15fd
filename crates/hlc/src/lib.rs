//! Hybrid logical clock (HLC) for lsync, after Kulkarni, Demirbas et al., "Logical Physical Clocks
//! and Consistent Snapshots in Globally Distributed Databases" (2014).
//!
//! # Model
//!
//! A stamp ([`Hlc`]) is a triple `(physical_ms, logical, device)` ordered lexicographically. The
//! first two parts are packed into one `u64` ([`HlcTime`]): 48 bits of milliseconds since the Unix
//! epoch (enough until the year 10889) and a 16-bit logical counter. The device id breaks ties, so
//! stamps issued by different devices never compare equal.
//!
//! Two rules produce stamps, exactly as in the paper:
//! - a local event (send rule, [`HlcGenerator::now`]): `l' = max(l, pt)`; the counter is
//!   incremented when `l' == l` and reset to 0 when physical time advanced;
//! - a receive event ([`HlcGenerator::update`]): `l' = max(l, l_m, pt)`; the counter is one more
//!   than the largest counter among the stamps whose physical part equals `l'`, or 0 if only the wall
//!   clock reached `l'`.
//!
//! Packing `(l, c)` into one integer turns both rules into `max(previous + 1, (pt, 0))`, which is
//! what the code does.
//!
//! # Invariants
//! - Stamps issued by one generator strictly increase, whatever the wall clock does (stall, step
//!   back, leap forward).
//! - After [`HlcGenerator::update`] with stamp `t`, every later stamp of that generator is `> t`.
//! - A remote stamp whose physical part is more than `max_drift` ahead of the local wall clock is
//!   refused with [`HlcError::DriftExceeded`] and leaves the clock untouched, so one device with a
//!   wrong clock cannot drag every other device into the future. Old stamps are accepted and never
//!   make the clock regress; observing a stamp again is harmless.
//! - Counter overflow (more than 65,536 stamps within one millisecond) carries into the physical
//!   part instead of wrapping: the stamp stays strictly increasing and runs ahead of the wall clock
//!   by one millisecond per 65,536 stamps, which wall time absorbs as soon as the burst ends. It
//!   takes a sustained rate above 65 million stamps a second to build any lasting lead.
//! - The byte form ([`Hlc::to_bytes`]) sorts like the stamps themselves, so SQLite can index and
//!   compare stamps stored as BLOBs.
//!
//! # What this crate does not do
//! It knows nothing of storage or network and has no async runtime. It does not persist anything:
//! the caller stores the stamps it issues (lsync stores each one in the same transaction as the write
//! it stamps) and must hand the last one back to [`HlcGenerator::new`] after a restart through
//! [`Resume`]; there is no constructor that skips that decision.
//!
//! # Where time comes from
//! [`HlcState`] is the sans-IO core: every call takes the wall time as an argument. [`HlcGenerator`]
//! wraps the same rules in a lock-free, thread-safe generator that reads an injected [`Clock`], so
//! tests and the simulator control time with [`ManualClock`].
//!
//! # Example
//!
//! ```
//! use lsync_hlc::{DeviceId, HlcConfig, HlcGenerator, ManualClock, Resume};
//!
//! let clock = ManualClock::new(1_700_000_000_000);
//! let laptop = HlcGenerator::new(DeviceId::random(), &clock, HlcConfig::default(), Resume::FirstStart);
//! let write = laptop.now()?;
//!
//! // The wall clock steps back: stamps still increase.
//! clock.set(1_600_000_000_000);
//! assert!(laptop.now()? > write);
//!
//! // After a restart, resume from the last stamp persisted with the data.
//! let persisted = laptop.last();
//! let restarted = HlcGenerator::new(persisted.device(), &clock, HlcConfig::default(), Resume::After(persisted));
//! assert!(restarted.now()? > persisted);
//! # Ok::<(), lsync_hlc::HlcError>(())
//! ```

mod clock;
mod generator;
mod stamp;

pub use clock::{Clock, ManualClock, SystemClock};
pub use generator::{HlcConfig, HlcError, HlcGenerator, HlcState, Resume};
pub use stamp::{DeviceId, HLC_BYTES, Hlc, HlcTime, MAX_LOGICAL, MAX_PHYSICAL_MS, ParseHlcError};

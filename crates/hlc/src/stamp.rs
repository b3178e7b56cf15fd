//! The stamp types and their encodings.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Bits of [`HlcTime`] that hold the logical counter.
const LOGICAL_BITS: u32 = 16;

/// Largest logical counter; one more carries into the physical part.
pub const MAX_LOGICAL: u16 = u16::MAX;

/// Largest physical time a stamp can hold: 2^48 − 1 ms after the epoch, in the year 10889.
pub const MAX_PHYSICAL_MS: u64 = (1 << (64 - LOGICAL_BITS)) - 1;

/// Length of [`Hlc::to_bytes`]: 8 bytes of packed time, 16 bytes of device id.
pub const HLC_BYTES: usize = 24;

/// The identity of a device (one installation of a library on one machine).
///
/// A UUID; it orders by its bytes, which is also how it breaks ties between stamps.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(pub Uuid);

impl DeviceId {
    /// A new random device id.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    /// The id as bytes, in the order used for comparisons.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The id from its bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for DeviceId {
    type Err = uuid::Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(text).map(Self)
    }
}

/// The time part of a stamp: physical milliseconds and a logical counter packed into one integer,
/// `physical_ms << 16 | logical`, so that integer order is stamp-time order and "the next stamp" is
/// `+ 1` with a carry instead of a wrap. Serialized as that integer.
///
/// Where the device is known from context (an owner's row versions, an origin's changes), the wire
/// carries only this part and the full [`Hlc`] is rebuilt with [`Hlc::new`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HlcTime(u64);

impl HlcTime {
    /// The smallest time; every real stamp is larger.
    pub const ZERO: HlcTime = HlcTime(0);
    /// The largest representable time.
    pub const MAX: HlcTime = HlcTime(u64::MAX);

    /// Packs a physical time and a counter. `None` if `physical_ms` exceeds [`MAX_PHYSICAL_MS`].
    pub fn new(physical_ms: u64, logical: u16) -> Option<Self> {
        (physical_ms <= MAX_PHYSICAL_MS)
            .then(|| Self(physical_ms << LOGICAL_BITS | u64::from(logical)))
    }

    /// The time `(physical_ms, 0)`, with `physical_ms` clamped to [`MAX_PHYSICAL_MS`].
    pub fn from_physical_saturating(physical_ms: u64) -> Self {
        Self(physical_ms.min(MAX_PHYSICAL_MS) << LOGICAL_BITS)
    }

    /// The packed form.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// From the packed form; every `u64` is a valid time.
    pub fn from_u64(packed: u64) -> Self {
        Self(packed)
    }

    /// Milliseconds since the Unix epoch.
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter.
    pub fn logical(self) -> u16 {
        // The mask keeps exactly the low 16 bits, so the conversion cannot fail.
        u16::try_from(self.0 & u64::from(MAX_LOGICAL)).unwrap_or(MAX_LOGICAL)
    }

    /// The next time after this one (counter + 1, carrying into the physical part), or `None` at
    /// [`HlcTime::MAX`].
    pub fn successor(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

impl fmt::Debug for HlcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_utc_ms(f, self.physical_ms())?;
        write!(f, "#{}", self.logical())
    }
}

/// A hybrid logical clock stamp: time first, device id as the tie-breaker.
///
/// The derived order is the stamp order: `(physical_ms, logical, device)` lexicographically.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hlc {
    time: HlcTime,
    device: DeviceId,
}

impl Hlc {
    /// A stamp from its parts.
    pub fn new(time: HlcTime, device: DeviceId) -> Self {
        Self { time, device }
    }

    /// The time part.
    pub fn time(&self) -> HlcTime {
        self.time
    }

    /// The device that issued the stamp.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// Milliseconds since the Unix epoch.
    pub fn physical_ms(&self) -> u64 {
        self.time.physical_ms()
    }

    /// The logical counter.
    pub fn logical(&self) -> u16 {
        self.time.logical()
    }

    /// Fixed-width big-endian form: 8 bytes of packed time, then the 16 bytes of the device id.
    /// Comparing two such arrays byte by byte gives the same answer as comparing the stamps.
    pub fn to_bytes(&self) -> [u8; HLC_BYTES] {
        let mut bytes = [0u8; HLC_BYTES];
        bytes[..8].copy_from_slice(&self.time.0.to_be_bytes());
        bytes[8..].copy_from_slice(self.device.as_bytes());
        bytes
    }

    /// Parses [`Hlc::to_bytes`]; any other length is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ParseHlcError> {
        let bytes: &[u8; HLC_BYTES] =
            bytes.try_into().map_err(|_| ParseHlcError::Length(bytes.len()))?;
        let (time, device) = bytes.split_at(8);
        let time = u64::from_be_bytes(time.try_into().map_err(|_| ParseHlcError::Length(8))?);
        let device: [u8; 16] = device.try_into().map_err(|_| ParseHlcError::Length(16))?;
        Ok(Self { time: HlcTime(time), device: DeviceId::from_bytes(device) })
    }
}

/// Error from parsing a stamp's byte or string form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseHlcError {
    /// The byte form has the wrong length.
    #[error("an HLC stamp is {HLC_BYTES} bytes, got {0}")]
    Length(usize),
    /// The string form is malformed.
    #[error(
        "malformed HLC stamp {text:?}: expected YYYY-MM-DDTHH:MM:SS.mmmZ#COUNTER@DEVICE-UUID ({reason})"
    )]
    Syntax {
        /// The text that failed to parse (truncated to 100 characters).
        text: String,
        /// What was wrong.
        reason: &'static str,
    },
}

impl fmt::Display for Hlc {
    /// `2026-11-22T01:59:01.123Z#0@67e55044-10b1-426f-9247-bb680e5fe0c8`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}@{}", self.time, self.device)
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Hlc {
    type Err = ParseHlcError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax =
            |reason| ParseHlcError::Syntax { text: text.chars().take(100).collect(), reason };
        let (time, device) =
            text.split_once('@').ok_or_else(|| syntax("no '@' before the device id"))?;
        let (utc, logical) =
            time.split_once('#').ok_or_else(|| syntax("no '#' before the counter"))?;
        let physical_ms = parse_utc_ms(utc).ok_or_else(|| syntax("bad date or time"))?;
        let logical: u16 =
            logical.parse().map_err(|_| syntax("counter is not a number 0..=65535"))?;
        let device: DeviceId = device.parse().map_err(|_| syntax("device id is not a UUID"))?;
        let time =
            HlcTime::new(physical_ms, logical).ok_or_else(|| syntax("time beyond year 10889"))?;
        Ok(Hlc { time, device })
    }
}

impl Serialize for Hlc {
    /// Binary formats (MessagePack) get the 24-byte form; human-readable ones the string form.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_bytes(&self.to_bytes())
        }
    }
}

impl<'de> Deserialize<'de> for Hlc {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(HlcVisitor)
        } else {
            deserializer.deserialize_bytes(HlcVisitor)
        }
    }
}

struct HlcVisitor;

impl<'de> Visitor<'de> for HlcVisitor {
    type Value = Hlc;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an HLC stamp ({HLC_BYTES} bytes or its string form)")
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Hlc, E> {
        Hlc::from_bytes(bytes).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Hlc, E> {
        text.parse().map_err(E::custom)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Hlc, A::Error> {
        // Formats without a bytes type (and serde's own content buffering) present bytes as a
        // sequence; read at most HLC_BYTES of them so a hostile length costs nothing.
        let mut bytes = [0u8; HLC_BYTES];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(index, &self))?;
        }
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(HLC_BYTES + 1, &self));
        }
        Hlc::from_bytes(&bytes).map_err(de::Error::custom)
    }
}

const MS_PER_DAY: u64 = 86_400_000;

/// Writes `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the epoch (proleptic Gregorian, UTC).
fn write_utc_ms(f: &mut fmt::Formatter<'_>, ms: u64) -> fmt::Result {
    let days = ms / MS_PER_DAY;
    let in_day = ms % MS_PER_DAY;
    let (year, month, day) = civil_from_days(days);
    write!(
        f,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1_000 % 60,
        in_day % 1_000
    )
}

/// Parses what [`write_utc_ms`] writes; `None` for anything else, including dates before 1970.
fn parse_utc_ms(text: &str) -> Option<u64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date_parts = date.splitn(3, '-');
    let year: u64 = date_parts.next()?.parse().ok()?;
    let month: u64 = date_parts.next()?.parse().ok()?;
    let day: u64 = date_parts.next()?.parse().ok()?;
    let (hms, millis) = time.split_once('.')?;
    let mut time_parts = hms.splitn(3, ':');
    let hour: u64 = time_parts.next()?.parse().ok()?;
    let minute: u64 = time_parts.next()?.parse().ok()?;
    let second: u64 = time_parts.next()?.parse().ok()?;
    let millis: u64 = millis.parse().ok()?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 || millis > 999 || !(1970..=99_999).contains(&year) {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    days.checked_mul(MS_PER_DAY)?
        .checked_add(hour * 3_600_000 + minute * 60_000 + second * 1_000 + millis)
}

fn is_leap(year: u64) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's `civil_from_days`, unsigned
/// because stamps never precede the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`]; `None` before the epoch.
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    let year = if month <= 2 { year.checked_sub(1)? } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era).checked_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(byte: u8) -> DeviceId {
        DeviceId::from_bytes([byte; 16])
    }

    fn stamp(physical_ms: u64, logical: u16, device_byte: u8) -> Hlc {
        Hlc::new(HlcTime::new(physical_ms, logical).unwrap(), device(device_byte))
    }

    #[test]
    fn order_is_time_then_counter_then_device() {
        assert!(stamp(1, 0, 9) < stamp(2, 0, 0));
        assert!(stamp(1, 1, 0) > stamp(1, 0, 9));
        assert!(stamp(1, 1, 2) > stamp(1, 1, 1));
        assert_eq!(stamp(1, 1, 1), stamp(1, 1, 1));
    }

    #[test]
    fn packing_keeps_parts_and_rejects_out_of_range_physical() {
        let time = HlcTime::new(MAX_PHYSICAL_MS, MAX_LOGICAL).unwrap();
        assert_eq!(time.physical_ms(), MAX_PHYSICAL_MS);
        assert_eq!(time.logical(), MAX_LOGICAL);
        assert_eq!(time, HlcTime::MAX);
        assert_eq!(HlcTime::new(MAX_PHYSICAL_MS + 1, 0), None);
        assert_eq!(HlcTime::from_physical_saturating(u64::MAX).physical_ms(), MAX_PHYSICAL_MS);
    }

    #[test]
    fn successor_carries_the_counter_into_physical_time() {
        let time = HlcTime::new(7, MAX_LOGICAL).unwrap().successor().unwrap();
        assert_eq!((time.physical_ms(), time.logical()), (8, 0));
        assert_eq!(HlcTime::MAX.successor(), None);
    }

    #[test]
    fn bytes_round_trip_and_reject_other_lengths() {
        let original = stamp(1_700_000_000_123, 42, 7);
        assert_eq!(Hlc::from_bytes(&original.to_bytes()).unwrap(), original);
        assert_eq!(Hlc::from_bytes(&[0; 23]), Err(ParseHlcError::Length(23)));
        assert_eq!(Hlc::from_bytes(&[0; 25]), Err(ParseHlcError::Length(25)));
    }

    #[test]
    fn string_form_is_readable_and_round_trips() {
        let check = |original: Hlc, expected: &str| {
            assert_eq!(original.to_string(), expected);
            assert_eq!(expected.parse::<Hlc>().unwrap(), original);
        };
        check(stamp(0, 0, 0), "1970-01-01T00:00:00.000Z#0@00000000-0000-0000-0000-000000000000");
        // 2024-02-29T23:59:59.999Z, a leap day.
        check(
            stamp(1_709_251_199_999, 65_535, 0xab),
            "2024-02-29T23:59:59.999Z#65535@abababab-abab-abab-abab-abababababab",
        );
        check(
            stamp(MAX_PHYSICAL_MS, 1, 1),
            "10889-08-02T05:31:50.655Z#1@01010101-0101-0101-0101-010101010101",
        );
    }

    #[test]
    fn malformed_strings_are_errors() {
        for text in [
            "",
            "1970-01-01T00:00:00.000Z#0",
            "1970-01-01T00:00:00.000Z@00000000-0000-0000-0000-000000000000",
            "1970-02-30T00:00:00.000Z#0@00000000-0000-0000-0000-000000000000",
            "1969-12-31T23:59:59.999Z#0@00000000-0000-0000-0000-000000000000",
            "1970-01-01T24:00:00.000Z#0@00000000-0000-0000-0000-000000000000",
            "1970-01-01T00:00:00.000Z#65536@00000000-0000-0000-0000-000000000000",
            "1970-01-01T00:00:00.000Z#0@not-a-uuid",
            "99999-12-31T00:00:00.000Z#0@00000000-0000-0000-0000-000000000000",
        ] {
            assert!(text.parse::<Hlc>().is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn calendar_conversion_matches_known_dates() {
        for (days, ymd) in [
            (0, (1970, 1, 1)),
            (59, (1970, 3, 1)),
            (11_016, (2000, 2, 29)),
            (19_782, (2024, 2, 29)),
            (20_414, (2025, 11, 22)),
        ] {
            assert_eq!(civil_from_days(days), ymd);
            assert_eq!(days_from_civil(ymd.0, ymd.1, ymd.2), Some(days));
        }
    }

    #[test]
    fn message_pack_uses_the_byte_form() {
        let original = stamp(1_700_000_000_000, 3, 5);
        let bytes = rmp_serde::to_vec(&original).unwrap();
        // bin8 marker, length, then the 24 bytes.
        assert_eq!(bytes.len(), 2 + HLC_BYTES);
        assert_eq!(rmp_serde::from_slice::<Hlc>(&bytes).unwrap(), original);
        assert!(
            rmp_serde::from_slice::<Hlc>(&rmp_serde::to_vec(&[1u8; 23].as_slice()).unwrap())
                .is_err()
        );
    }
}

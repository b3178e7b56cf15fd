//! Durations as configuration text: an integer and a unit, `"250ms"`, `"5s"`, `"2m"`, `"1h"`,
//! `"30d"`.
//!
//! The grammar is deliberately small: ASCII digits, then exactly one of `ms`, `s`, `m`, `h`, `d`.
//! No sign, no fraction, no spaces, no compound forms (`"1h30m"`): write `"90m"`. Zero (`"0s"`)
//! parses; [`super::SyncConfig::validate`] refuses it for the keys where it makes no sense. The
//! finest unit is the millisecond, so every duration written this way is a whole number of
//! milliseconds, and [`DisplayDuration`] writes such a duration back exactly.

use std::fmt;
use std::time::Duration;

/// Milliseconds per unit, coarsest first: [`DisplayDuration`] picks the first that divides.
const UNITS: &[(&str, u64)] =
    &[("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// How a duration text was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {shown:?}: {reason}")]
pub struct ParseDurationError {
    /// The text, cut to its first 40 characters so that an error never echoes a huge input.
    shown: String,
    reason: &'static str,
}

/// Parses `"<integer><unit>"` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(text: &str) -> Result<Duration, ParseDurationError> {
    let fail = |reason| Err(ParseDurationError { shown: text.chars().take(40).collect(), reason });
    // The first non-digit is the start of a character, so both halves are valid `str`s.
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return fail("expected a whole number followed by a unit (ms, s, m, h or d), as in \"5s\"");
    }
    let Some(&(_, millis_per_unit)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return fail(if unit.is_empty() {
            "missing unit: add ms, s, m, h or d"
        } else {
            "unknown unit: use ms, s, m, h or d"
        });
    };
    let Ok(number) = digits.parse::<u64>() else {
        return fail("number too large");
    };
    match number.checked_mul(millis_per_unit) {
        Some(millis) => Ok(Duration::from_millis(millis)),
        None => fail("number too large"),
    }
}

/// Writes a duration in the coarsest unit that represents it exactly (`"5s"`, not `"5000ms"`);
/// zero is `"0s"`. A fraction of a millisecond cannot be written and is dropped; such durations
/// never come from [`parse_duration`], and validation refuses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisplayDuration(pub Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis == 0 {
            return f.write_str("0s");
        }
        let (unit, per_unit) = UNITS
            .iter()
            .find(|(_, per_unit)| millis.is_multiple_of(u128::from(*per_unit)))
            .map_or(("ms", 1), |&(unit, per_unit)| (unit, u128::from(per_unit)));
        write!(f, "{}{unit}", millis / per_unit)
    }
}

/// `#[serde(with = "...")]` for [`Duration`] fields: written and read as duration text.
pub(super) mod text {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    use super::{DisplayDuration, parse_duration};

    pub(crate) fn serialize<S: Serializer>(
        duration: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&DisplayDuration(*duration))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        deserializer.deserialize_str(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"250ms\", \"5s\", \"2m\", \"1h\" or \"30d\"")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            parse_duration(text).map_err(E::custom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Option<Duration>) {
        assert_eq!(parse_duration(text).ok(), expected, "{text:?}");
    }

    #[test]
    fn parses_each_unit() {
        check("250ms", Some(Duration::from_millis(250)));
        check("5s", Some(Duration::from_secs(5)));
        check("2m", Some(Duration::from_secs(120)));
        check("1h", Some(Duration::from_secs(3600)));
        check("30d", Some(Duration::from_secs(30 * 86_400)));
        check("0s", Some(Duration::ZERO));
        check("007s", Some(Duration::from_secs(7)));
    }

    #[test]
    fn refuses_malformed_text() {
        for text in [
            "",
            "5",
            "5x",
            "-1s",
            "+1s",
            " 5s",
            "5s ",
            "5 s",
            "1.5s",
            "1h30m",
            "5S",
            "s",
            "ms",
            "5us",
            "٣s",
            "99999999999999999999d",
            "18446744073709551615s",
        ] {
            check(text, None);
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let message = |text| parse_duration(text).unwrap_err().to_string();
        assert!(message("5").contains("missing unit"), "{}", message("5"));
        assert!(message("5x").contains("unknown unit"));
        assert!(message("99999999999999999999d").contains("too large"));
        assert!(message(&"9".repeat(1000)).len() < 200, "the error echoes a huge input");
    }

    #[test]
    fn displays_in_the_coarsest_exact_unit() {
        let shown = |millis| DisplayDuration(Duration::from_millis(millis)).to_string();
        assert_eq!(shown(0), "0s");
        assert_eq!(shown(250), "250ms");
        assert_eq!(shown(1_500), "1500ms");
        assert_eq!(shown(5_000), "5s");
        assert_eq!(shown(90_000), "90s");
        assert_eq!(shown(120_000), "2m");
        assert_eq!(shown(7_200_000), "2h");
        assert_eq!(shown(30 * 86_400_000), "30d");
        assert_eq!(DisplayDuration(Duration::MAX).to_string(), "18446744073709551615999ms");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = parse_duration(&text);
        }

        #[test]
        fn near_misses_never_panic(text in "[-+0-9]{0,25}(ms|s|m|h|d|x|)") {
            let _ = parse_duration(&text);
        }

        #[test]
        fn display_parses_back(millis in proptest::prelude::any::<u64>()) {
            let duration = Duration::from_millis(millis);
            let text = DisplayDuration(duration).to_string();
            proptest::prop_assert_eq!(parse_duration(&text), Ok(duration));
        }
    }
}

//! The engine's configuration: [`SyncConfig`] holds every knob of the engine, each with its
//! default and the reason for it.
//!
//! # Model
//! A configuration starts from [`SyncConfig::default`], then takes the keys a TOML file sets
//! ([`SyncConfig::load`], [`SyncConfig::from_toml_str`]), then the `LSYNC_<KEY>` environment
//! variables ([`SyncConfig::apply_env`]): later sources win. Each step refuses unknown keys
//! (a misspelt key is an error, never silently a default), names the key whose value is wrong,
//! and ends with [`SyncConfig::validate`], which checks every range and every relation between
//! keys. The engine reads its settings only from here, and the conversions
//! ([`SyncConfig::transport_config`], [`SyncConfig::store_options`], [`SyncConfig::retention`],
//! [`SyncConfig::hlc_config`]) hand them to the crates it composes.
//!
//! [`SyncConfig::to_commented_toml`] writes a complete file, every key preceded by its
//! documentation (what `lsync init` writes); `docs/configuration.md` lists the same keys, and a
//! test keeps the two in step.
//!
//! Durations are written as text, an integer and a unit: `"250ms"`, `"5s"`, `"2m"`, `"1h"`,
//! `"30d"` ([`parse_duration`]).
//!
//! # Invariants
//! - Nothing here panics on any input: malformed text, values out of range and non-UTF-8
//!   environment variables are all errors.
//! - A configuration that passes [`SyncConfig::validate`] round-trips exactly through
//!   [`SyncConfig::to_commented_toml`] and [`SyncConfig::from_toml_str`].
//! - Every key has documentation: the struct and its key table are generated from one list, in
//!   which a field cannot be declared without a doc comment.
//!
//! # Where the IO is
//! Only [`SyncConfig::load`] (reads the file) and [`SyncConfig::from_env_and_file`] (also reads
//! the process environment) do IO; everything else works on values passed in.

mod duration;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use std::{fmt, io};

use lsync_hlc::HlcConfig;
use lsync_peer_log::RetentionPolicy;
use lsync_protocol::{MAX_PAGE_ROWS, MAX_TEXT_BYTES};
use lsync_store::{Durability, StoreOptions};
use lsync_transport::TransportConfig;
use serde::{Deserialize, Serialize};

pub use duration::{DisplayDuration, ParseDurationError, parse_duration};

/// Prefix of the environment variables that override keys: `LSYNC_BATCH_WINDOW` sets
/// `batch_window`.
pub const ENV_PREFIX: &str = "LSYNC_";

/// Environment variables that start with [`ENV_PREFIX`] but are not configuration keys, and so
/// are ignored by [`SyncConfig::apply_env`]. Every other `LSYNC_*` variable must name a key, so
/// that a misspelt override is an error rather than silently ignored. The benchmarks' own
/// variables (`cargo xtask bench`: `LSYNC_BENCH_QUICK` for short runs, `LSYNC_BENCH_ONLY` to pick
/// groups, and those it hands its child processes) and the test suite's `LSYNC_TEST_LOG` are
/// not keys. A new non-configuration variable must be added here.
pub const NON_CONFIG_ENV_VARS: &[&str] = &[
    "LSYNC_BENCH_QUICK",
    "LSYNC_BENCH_ONLY",
    "LSYNC_BENCH_CHILD",
    "LSYNC_BENCH_DIR",
    "LSYNC_BENCH_LIBRARY",
    "LSYNC_BENCH_TOKEN",
    "LSYNC_TEST_LOG",
];

/// The longest duration any key accepts: 100 years (`"36500d"`). Far beyond every sensible
/// setting, and small enough that adding it to a clock reading never overflows.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// The largest capacity any queue key accepts: 1,048,576 (2^20) entries. Three orders of
/// magnitude above the defaults, and far below what tokio's bounded channels accept
/// (`usize::MAX >> 3`; they panic beyond it).
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;

/// The most reader connections `db_readers` accepts: 64. Each reader is a SQLite connection with
/// its own page cache; more than this only costs memory, since sync runs a few concurrent reads
/// per peer.
pub const MAX_DB_READERS: u32 = 64;

/// Opens every file [`SyncConfig::to_commented_toml`] writes.
const HEADER: &str = "\
# lsync configuration.
#
# Every key is listed below after its documentation; a key left out takes its default.
# Durations are a whole number and a unit: ms, s, m, h or d (\"250ms\", \"5s\", \"30d\").
# Each key can be overridden by the environment variable LSYNC_<KEY> in upper case (for example
# LSYNC_BATCH_WINDOW=250ms), which takes precedence over this file.
# docs/configuration.md describes every key.
";

/// What a commented-out line shows for an optional key that is unset.
const UNSET_EXAMPLES: &[(&str, &str)] = &[("metrics_listen", "\"127.0.0.1:9464\"")];

/// Declares [`SyncConfig`] with its `Default` impl and the table of its keys ([`KEYS`]) from one
/// list, so that a field cannot be added without documentation or a default, and every field is
/// known to the environment overrides, the commented TOML and the per-type checks.
macro_rules! sync_config {
    (
        $(#[$struct_meta:meta])*
        pub struct SyncConfig {
            $(
                $(#[doc = $doc:literal])+
                $(#[serde($($serde:tt)*)])*
                pub $field:ident: $type:ty = $default:expr,
            )+
        }
    ) => {
        $(#[$struct_meta])*
        pub struct SyncConfig {
            $(
                $(#[doc = $doc])+
                $(#[serde($($serde)*)])*
                pub $field: $type,
            )+
        }

        impl Default for SyncConfig {
            fn default() -> Self {
                Self { $($field: $default,)+ }
            }
        }

        /// Every key, in the order of the struct and of the commented TOML.
        const KEYS: &[Key] = &[
            $(Key { name: stringify!($field), doc: &[$($doc),+], kind: <$type as Field>::KIND },)+
        ];

        impl SyncConfig {
            /// Runs the checks every value of each field's type must pass.
            fn check_fields(&self) -> Result<(), ConfigError> {
                $(
                    Field::check(&self.$field).map_err(|reason| ConfigError::Constraint {
                        key: stringify!($field),
                        reason,
                    })?;
                )+
                Ok(())
            }
        }
    };
}

sync_config! {
    /// Every setting of the sync engine. See the module documentation for where values come
    /// from; `docs/configuration.md` lists the keys.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct SyncConfig {
        /// Whether this device syncs. While false the transport stays connected (heartbeats keep
        /// peers' online state), but the engine sends nothing, ignores batches from peers (they
        /// are not acknowledged, so their senders keep them) and answers their requests with
        /// `Busy`; local writes still go to the log, so peers receive them once sync is on
        /// again. The engine can also switch sync on and off at run time; this is the state it
        /// starts in. Default true: a library is set up in order to be synced.
        pub enabled: bool = true,

        /// This device's human-readable name, sent to peers when connecting (in Hello) and shown
        /// in their lists of devices. At most 1024 bytes, the protocol's limit for free text.
        /// Default empty: `lsync init` writes the host name here when it sets up the library, so
        /// a name is chosen once, where the host is known, and then stays as the user edits it.
        pub device_name: String = String::new(),

        /// Where this device accepts sync connections: an IP address and UDP port (QUIC), such
        /// as `"0.0.0.0:7788"` or `"[::]:7788"`. Default "0.0.0.0:7788": every IPv4 interface,
        /// so that devices on the same network can connect, on a fixed port, because paired
        /// devices remember the address they last reached this device at and redial it; port 0
        /// (any free port) would change at every start and leave them dialing a stale address.
        pub listen: String = "0.0.0.0:7788".to_owned(),

        /// How long local changes are collected before they are sent to peers as one batch; the
        /// first change starts the window. "0s" sends every write at once. Default 100ms, the
        /// design's batching window: a peer still sees an edit within a blink, while a burst of
        /// writes (an import, a directory scan) travels as a few large batches instead of
        /// thousands of small messages.
        #[serde(with = "duration::text")]
        pub batch_window: Duration = Duration::from_millis(100),

        /// A batch is sent as soon as it holds this many rows, before its window ends. From 1 to
        /// 10000 (the protocol's MAX_PAGE_ROWS). Default 5000: at a typical 100 to 300 bytes a
        /// row a full batch is 0.5 to 1.5 MiB, near the 1 MiB at which responders close a page,
        /// and half the protocol's limit leaves room for wide rows.
        pub max_batch_rows: usize = 5_000,

        /// Rows asked for in each catch-up and backfill page request. From 1 to 10000 (the
        /// protocol's MAX_PAGE_ROWS). Default 5000, for the reasons given for max_batch_rows:
        /// each page costs a round trip and a transaction, so pages should be large, and the
        /// responder also closes a page at 1 MiB.
        pub page_rows: u32 = 5_000,

        /// A batch sent to a peer and not acknowledged within this is sent again (see
        /// retry_base). Must be longer than zero. Default 5s: the receiver applies a batch in one
        /// SQLite transaction before acknowledging it; 5 s leaves room for a large batch on a slow
        /// disk plus round trips on a slow link, without re-sending batches that are merely slow.
        #[serde(with = "duration::text")]
        pub ack_timeout: Duration = Duration::from_secs(5),

        /// First delay before a failed or unacknowledged message is sent again; the delay doubles
        /// with each attempt, up to retry_max. Must be longer than zero. Default 200ms: a few
        /// round trips on a slow link, so that a transient failure (a reset stream, a peer busy
        /// with a large transaction) is retried quickly.
        #[serde(with = "duration::text")]
        pub retry_base: Duration = Duration::from_millis(200),

        /// The longest delay between two attempts to send a message; at least retry_base.
        /// Default 30s: with the other defaults the delays run 0.2, 0.4, 0.8 ... 25.6 s and stay
        /// under it; the cap matters for a larger retry_base or retry_max_attempts, and bounds how
        /// long a peer that comes back waits for a retried message.
        #[serde(with = "duration::text")]
        pub retry_max: Duration = Duration::from_secs(30),

        /// How many times a message is sent again before the retry queue gives it up. Given up
        /// is not lost: the peer's watermarks still lack those changes, and catch-up on the next
        /// (re)connect sends them. At least 1. Default 8: with the defaults above the attempts
        /// span about 51 s, longer than a dead connection takes to be noticed (stale_timeout),
        /// after which catch-up is the better tool.
        pub retry_max_attempts: u32 = 8,

        /// The most messages held for retry at once, over all peers. A message that finds the
        /// queue full is not queued, and not lost either: catch-up on the next (re)connect sends
        /// whatever the peer's watermarks lack. From 1 to 1048576. Default 1024: about 100 s of
        /// back-to-back batches to one peer at the default batch_window, while bounding the memory
        /// a peer that stopped acknowledging can tie up.
        pub retry_capacity: usize = 1_024,

        /// The longest the engine waits for the answer to a request (watermark exchange, catch-up
        /// or backfill page) before treating it as failed and asking again. Must be longer than
        /// zero. Default 10s: a page is one SQLite query and about 1 MiB on the wire, which 10 s
        /// covers on a slow disk and a slow link (the same allowance as handshake_timeout).
        #[serde(with = "duration::text")]
        pub request_timeout: Duration = Duration::from_secs(10),

        /// How often each side sends a heartbeat (carrying its watermarks) on a connection; also
        /// the QUIC keep-alive interval. Must be longer than zero. Default 5s, the transport's
        /// default: keeps NAT bindings (commonly 30 s for UDP) open and refreshes the round-trip
        /// time often, at a cost of a few hundred bytes per 5 s.
        #[serde(with = "duration::text")]
        pub heartbeat_interval: Duration = Duration::from_secs(5),

        /// A peer that answered no heartbeat for this long is reported disconnected (also the QUIC
        /// idle timeout). Must be longer than heartbeat_interval. Default 15s, the transport's
        /// default: three heartbeat intervals, so one or two lost heartbeats do not drop a healthy
        /// connection.
        #[serde(with = "duration::text")]
        pub stale_timeout: Duration = Duration::from_secs(15),

        /// The longest a connection attempt (QUIC and TLS handshake, then the Hello exchange) may
        /// take. Must be longer than zero. Default 10s, the transport's default: the QUIC
        /// handshake needs a few round trips, and 10 s covers lossy, high-latency mobile links
        /// with retransmissions.
        #[serde(with = "duration::text")]
        pub handshake_timeout: Duration = Duration::from_secs(10),

        /// First delay before redialing a paired device after a failed attempt or a
        /// disconnection; the delay doubles per failure, with random jitter, up to reconnect_max.
        /// Must be longer than zero. Default 500ms, the transport's default: reconnects quickly
        /// after a blip.
        #[serde(with = "duration::text")]
        pub reconnect_base: Duration = Duration::from_millis(500),

        /// The longest delay between redials of an unreachable paired device; at least
        /// reconnect_base. Default 60s, the transport's default: an offline peer costs one attempt
        /// a minute.
        #[serde(with = "duration::text")]
        pub reconnect_max: Duration = Duration::from_secs(60),

        /// The most requests a peer may have in flight to this device at once (QUIC bidirectional
        /// streams); further requests wait at the sender. At least 1. Default 32, the transport's
        /// default: the engine keeps a handful in flight per peer (watermarks, catch-up pages,
        /// heartbeats), and the cap bounds what one peer can make this device buffer to 32 frames
        /// of at most 8 MiB.
        pub max_concurrent_requests: u32 = 32,

        /// Capacity of the transport's event queue (connections, messages and requests from
        /// peers). When it is full the transport stops reading from peers, so QUIC flow control
        /// slows the senders; nothing is dropped. From 1 to 1048576. Default 1024, the transport's
        /// default: absorbs a burst from several peers while the engine applies a batch.
        pub transport_event_capacity: usize = 1_024,

        /// On shutdown, the longest the transport waits in all for queued messages to be
        /// acknowledged by their peers and for the close to reach them; messages still queued
        /// then are reported unsent, and
        /// catch-up delivers their changes later. "0s" closes at once. Default 5s, the transport's
        /// default: one ack_timeout, time for a reachable peer to apply a queued batch.
        #[serde(with = "duration::text")]
        pub close_timeout: Duration = Duration::from_secs(5),

        /// How often the pruner deletes the log entries every paired device acknowledged (and
        /// those past the retention limits below) and collects tombstones. Must be longer than
        /// zero. Default 30s: pruning is an indexed delete per origin, cheap enough to run often,
        /// and running often keeps the log near its acknowledged minimum.
        #[serde(with = "duration::text")]
        pub prune_interval: Duration = Duration::from_secs(30),

        /// Log entries older than this are pruned even if a paired device has not acknowledged
        /// them; that device is then marked for a full resync (backfill). Must be longer than
        /// zero. Default 30d: a device offline for a month backfills instead of replaying a month
        /// of changes.
        #[serde(with = "duration::text")]
        pub log_retention: Duration = Duration::from_secs(30 * 86_400),

        /// At most this many log entries are kept per origin device; older ones are pruned as for
        /// log_retention. At least 1. Default 1000000: about 100 MB of log for one origin, beyond
        /// which a snapshot (backfill) is cheaper than replaying the log.
        pub log_max_entries_per_origin: u64 = 1_000_000,

        /// Tombstones (records of deleted device-owned rows) older than this are collected even if
        /// a paired device has not received them; that device is then marked for a full resync, so
        /// the deletion still reaches it. Must be longer than zero. Default 90d: deletions are
        /// rare and tombstones small, so keeping them three times as long as the log costs little
        /// and spares a device offline for one to three months a full resync of its state.
        #[serde(with = "duration::text")]
        pub tombstone_retention: Duration = Duration::from_secs(90 * 86_400),

        /// How far ahead of the local wall clock a peer's timestamp may be before the local clock
        /// refuses to adopt it (the change is still applied). Must be longer than zero. Default
        /// 60s: devices synchronised by NTP agree within milliseconds and free-running clocks
        /// drift by seconds a week, so honest devices stay far inside a minute, while a wrong
        /// clock (dead RTC battery, wrong time zone) is off by hours and is caught; a larger bound
        /// would let such a device drag every peer's clock into the future.
        #[serde(with = "duration::text")]
        pub max_drift: Duration = Duration::from_secs(60),

        /// The most shared records that may wait, stored, for a row they reference that has not
        /// arrived. A batch that would park more is refused, not acknowledged, and sent again
        /// later. At least 1. Default 100000: twenty full pages, far more than rows arriving out
        /// of order normally leave waiting, while bounding what a peer sending dangling
        /// references can make this device store.
        pub max_parked: u64 = 100_000,

        /// How hard SQLite works to keep a committed write across a power loss: "full" (every
        /// commit is on disk before it returns) or "normal" (commits survive a crash of the
        /// process, but the last ones may be lost on a power loss or an OS crash, even after peers
        /// were told they arrived; faster for many small transactions). Default "full": a write
        /// the library accepted must survive.
        #[serde(with = "durability_text")]
        pub durability: Durability = Durability::Full,

        /// Reader connections to the library database. From 1 to 64. Default 4: in WAL mode
        /// readers never block the writer, and sync serves at most a few concurrent page requests
        /// per peer; each reader is a SQLite connection with its own page cache.
        pub db_readers: u32 = 4,

        /// How long a database statement waits for another process's lock (a CLI command writing
        /// to the same library) before failing. "0s" fails at once. Default 5s: long enough for a
        /// large batch of another process to commit.
        #[serde(with = "duration::text")]
        pub busy_timeout: Duration = Duration::from_secs(5),

        /// Events queued for each subscriber of the engine's event stream. A subscriber whose
        /// queue is full does not silently lose events: further events are counted, and it then
        /// receives one Overflow { missed } event saying how many it missed, so it knows to
        /// re-read what it shows. From 1 to 1048576. Default 1024: a subscriber more than a
        /// thousand events behind is better served by re-reading than by replaying them.
        pub event_capacity: usize = 1_024,

        /// Where the CLI serves Prometheus metrics over HTTP: an IP address and port on a loopback
        /// address, such as "127.0.0.1:9464". Loopback only, because the endpoint has no
        /// authentication and the metrics reveal when and how much this device syncs. Default
        /// unset: no endpoint. An empty LSYNC_METRICS_LISTEN unsets it.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub metrics_listen: Option<String> = None,
    }
}

/// One key of [`SyncConfig`].
#[derive(Debug)]
struct Key {
    name: &'static str,
    /// The doc comment, one element per line, each starting with a space (as `///` leaves it).
    doc: &'static [&'static str],
    kind: Kind,
}

/// How a value is written in TOML, which decides how an environment variable is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Integer,
    Text,
    /// Text that may be absent: an empty environment variable unsets it.
    OptionalText,
}

/// What every field type tells the key table, and the checks every value of the type must pass
/// whatever the key.
trait Field {
    const KIND: Kind;

    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Field for bool {
    const KIND: Kind = Kind::Bool;
}

impl Field for u32 {
    const KIND: Kind = Kind::Integer;
}

impl Field for u64 {
    const KIND: Kind = Kind::Integer;

    fn check(&self) -> Result<(), String> {
        if i64::try_from(*self).is_ok() {
            Ok(())
        } else {
            Err(format!("must be at most {} (the largest TOML integer), not {self}", i64::MAX))
        }
    }
}

impl Field for usize {
    const KIND: Kind = Kind::Integer;

    fn check(&self) -> Result<(), String> {
        if i64::try_from(*self).is_ok() {
            Ok(())
        } else {
            Err(format!("must be at most {} (the largest TOML integer), not {self}", i64::MAX))
        }
    }
}

impl Field for String {
    const KIND: Kind = Kind::Text;
}

impl Field for Option<String> {
    const KIND: Kind = Kind::OptionalText;
}

impl Field for Durability {
    const KIND: Kind = Kind::Text;
}

impl Field for Duration {
    const KIND: Kind = Kind::Text;

    fn check(&self) -> Result<(), String> {
        if !self.subsec_nanos().is_multiple_of(1_000_000) {
            Err(format!("must be a whole number of milliseconds, not {} ns", self.as_nanos()))
        } else if *self > MAX_DURATION {
            Err(format!(
                "must be at most {} (100 years), not {}",
                DisplayDuration(MAX_DURATION),
                DisplayDuration(*self)
            ))
        } else {
            Ok(())
        }
    }
}

/// `#[serde(with = "...")]` for [`Durability`]: `"full"` or `"normal"`.
mod durability_text {
    use lsync_store::Durability;
    use serde::{Deserialize, Deserializer, Serializer, de};

    pub(crate) fn serialize<S: Serializer>(
        durability: &Durability,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(match durability {
            Durability::Full => "full",
            Durability::Normal => "normal",
        })
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Durability, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "full" => Ok(Durability::Full),
            "normal" => Ok(Durability::Normal),
            _ => {
                Err(de::Error::invalid_value(de::Unexpected::Str(&text), &"\"full\" or \"normal\""))
            }
        }
    }
}

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Text passed to [`SyncConfig::from_toml_str`].
    Text,
    /// A file read by [`SyncConfig::load`].
    File(PathBuf),
    /// `LSYNC_*` environment variables ([`SyncConfig::apply_env`]).
    Environment,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text => f.write_str("configuration text"),
            Self::File(path) => write!(f, "configuration file {}", path.display()),
            Self::Environment => f.write_str("environment"),
        }
    }
}

/// Why a configuration could not be loaded or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file does not exist. Whether that means "use the defaults" is the
    /// caller's decision.
    #[error("configuration file {} does not exist", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The configuration file exists but could not be read (permissions, not UTF-8, ...).
    #[error("cannot read configuration file {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The text is not valid TOML.
    #[error("{origin}: TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// Where the text came from.
        origin: Origin,
        /// Line of the error, from 1.
        line: usize,
        /// Column of the error in characters, from 1.
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// Keys (or `LSYNC_*` environment variables) that name no configuration key.
    #[error(
        "{origin}: unknown configuration key(s) {}; docs/configuration.md lists the keys",
        keys.join(", ")
    )]
    UnknownKey {
        /// Where the keys came from.
        origin: Origin,
        /// The unknown keys, or environment variable names.
        keys: Vec<String>,
    },
    /// A value that cannot be read as its key's type (a malformed duration, a string for a
    /// number, ...).
    #[error("{origin}: bad value for {key}: {reason}")]
    BadValue {
        /// Where the value came from.
        origin: Origin,
        /// The key, or the environment variable's name.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A well-formed value outside its allowed range, or keys that contradict each other.
    #[error("invalid configuration: {key} {reason}")]
    Constraint {
        /// The key (for a relation, the key the rule is stated for).
        key: &'static str,
        /// The rule and the value found.
        reason: String,
    },
}

impl SyncConfig {
    /// Reads a configuration from TOML text: defaults, overridden by the keys the text sets.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, Origin::Text)
    }

    /// Reads the configuration file at `path`. A missing file is [`ConfigError::Missing`], so
    /// the caller can decide whether that means defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(ConfigError::Missing { path: path.to_owned() });
            }
            Err(source) => return Err(ConfigError::Unreadable { path: path.to_owned(), source }),
        };
        Self::parse(&text, Origin::File(path.to_owned()))
    }

    /// The file at `path` (or the defaults if `path` is `None`), then the process's `LSYNC_*`
    /// environment variables. A `path` that does not exist is an error.
    pub fn from_env_and_file(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::load(path)?,
            None => Self::default(),
        };
        config.apply_env(process_env()?)?;
        Ok(config)
    }

    /// Overrides keys from environment variables: `LSYNC_<KEY>` (the key in upper case) sets
    /// `<key>`, written as in TOML but without quotes (`LSYNC_BATCH_WINDOW=250ms`,
    /// `LSYNC_ENABLED=false`, `LSYNC_MAX_PARKED=5000`); an empty `LSYNC_METRICS_LISTEN` unsets it.
    /// Variables without the prefix, and those in [`NON_CONFIG_ENV_VARS`], are ignored; any other
    /// `LSYNC_*` variable is an unknown key. The result is validated; on error `self` is
    /// unchanged.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut overrides: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| {
                name.starts_with(ENV_PREFIX) && !NON_CONFIG_ENV_VARS.contains(&name.as_str())
            })
            .collect();
        // Sorted so that errors are the same whatever order the environment lists them in.
        overrides.sort();
        let unknown: Vec<String> = overrides
            .iter()
            .filter(|(name, _)| key_for_env(name).is_none())
            .map(|(name, _)| name.clone())
            .collect();
        if !unknown.is_empty() {
            return Err(ConfigError::UnknownKey { origin: Origin::Environment, keys: unknown });
        }
        let mut table = self.to_table()?;
        for (name, text) in overrides {
            let Some(key) = key_for_env(&name) else { continue };
            let bad = |reason: String| ConfigError::BadValue {
                origin: Origin::Environment,
                key: name.clone(),
                reason,
            };
            let value = match key.kind {
                Kind::Bool => match text.as_str() {
                    "true" => toml::Value::Boolean(true),
                    "false" => toml::Value::Boolean(false),
                    _ => return Err(bad(format!("expected true or false, not {}", shown(&text)))),
                },
                Kind::Integer => match text.parse::<i64>() {
                    Ok(number) => toml::Value::Integer(number),
                    Err(_) => {
                        return Err(bad(format!("expected a whole number, not {}", shown(&text))));
                    }
                },
                Kind::OptionalText if text.is_empty() => {
                    table.remove(key.name);
                    continue;
                }
                Kind::Text | Kind::OptionalText => toml::Value::String(text),
            };
            check_value(key.name, value.clone()).map_err(bad)?;
            table.insert(key.name.to_owned(), value);
        }
        let config = from_table(table, Origin::Environment)?;
        config.validate()?;
        *self = config;
        Ok(())
    }

    /// Checks every key's range and the relations between keys; errors name the key and what
    /// it allows.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_fields()?;
        if self.device_name.len() > MAX_TEXT_BYTES {
            return constraint(
                "device_name",
                format!(
                    "must be at most {MAX_TEXT_BYTES} bytes (the protocol's limit for free text), not {}",
                    self.device_name.len()
                ),
            );
        }
        if let Err(error) = self.listen.parse::<SocketAddr>() {
            return constraint(
                "listen",
                format!(
                    "must be an IP address and port such as \"0.0.0.0:7788\" or \"[::]:7788\", not {} ({error})",
                    shown(&self.listen)
                ),
            );
        }
        let max_page_rows = u64::from(MAX_PAGE_ROWS);
        in_range("max_batch_rows", to_u64(self.max_batch_rows), 1, max_page_rows)?;
        in_range("page_rows", u64::from(self.page_rows), 1, max_page_rows)?;
        positive("ack_timeout", self.ack_timeout)?;
        positive("retry_base", self.retry_base)?;
        at_least("retry_max", self.retry_max, "retry_base", self.retry_base)?;
        in_range("retry_max_attempts", u64::from(self.retry_max_attempts), 1, u64::from(u32::MAX))?;
        let max_queue = to_u64(MAX_QUEUE_CAPACITY);
        in_range("retry_capacity", to_u64(self.retry_capacity), 1, max_queue)?;
        positive("request_timeout", self.request_timeout)?;
        positive("heartbeat_interval", self.heartbeat_interval)?;
        if self.stale_timeout <= self.heartbeat_interval {
            return constraint(
                "stale_timeout",
                format!(
                    "must be longer than heartbeat_interval ({}), not {}",
                    DisplayDuration(self.heartbeat_interval),
                    DisplayDuration(self.stale_timeout)
                ),
            );
        }
        positive("handshake_timeout", self.handshake_timeout)?;
        positive("reconnect_base", self.reconnect_base)?;
        at_least("reconnect_max", self.reconnect_max, "reconnect_base", self.reconnect_base)?;
        in_range(
            "max_concurrent_requests",
            u64::from(self.max_concurrent_requests),
            1,
            u64::from(u32::MAX),
        )?;
        in_range("transport_event_capacity", to_u64(self.transport_event_capacity), 1, max_queue)?;
        positive("prune_interval", self.prune_interval)?;
        positive("log_retention", self.log_retention)?;
        in_range("log_max_entries_per_origin", self.log_max_entries_per_origin, 1, i64_max())?;
        positive("tombstone_retention", self.tombstone_retention)?;
        positive("max_drift", self.max_drift)?;
        in_range("max_parked", self.max_parked, 1, i64_max())?;
        in_range("db_readers", u64::from(self.db_readers), 1, u64::from(MAX_DB_READERS))?;
        in_range("event_capacity", to_u64(self.event_capacity), 1, max_queue)?;
        if let Some(listen) = &self.metrics_listen {
            match listen.parse::<SocketAddr>() {
                Err(error) => {
                    return constraint(
                        "metrics_listen",
                        format!(
                            "must be a loopback IP address and port such as \"127.0.0.1:9464\", not {} ({error})",
                            shown(listen)
                        ),
                    );
                }
                Ok(address) if !address.ip().is_loopback() => {
                    return constraint(
                        "metrics_listen",
                        format!(
                            "must be a loopback address (127.0.0.0/8 or [::1]) because the endpoint has no authentication, not {address}"
                        ),
                    );
                }
                Ok(_) => {}
            }
        }
        // The transport checks its own relations too; the keys above should already have
        // caught anything it refuses.
        self.transport_config()
            .validate()
            .map_err(|error| ConfigError::Constraint { key: "transport", reason: error.0 })
    }

    /// A complete TOML file holding every key, each after its documentation as `#` comments;
    /// an unset optional key is a commented-out example. Reading it back with
    /// [`SyncConfig::from_toml_str`] gives an equal configuration if this one is valid.
    pub fn to_commented_toml(&self) -> String {
        let mut out = String::from(HEADER);
        let table = match self.to_table() {
            Ok(table) => table,
            // Only an invalid configuration gets here (validate checks that every value can be
            // written); the keys are still listed, commented out.
            Err(error) => {
                out.push_str(&format!("#\n# This configuration is not valid: {error}\n"));
                toml::Table::new()
            }
        };
        for key in KEYS {
            out.push('\n');
            for line in key.doc {
                out.push('#');
                out.push_str(line.trim_end());
                out.push('\n');
            }
            match table.get(key.name) {
                Some(value) => out.push_str(&format!("{} = {value}\n", key.name)),
                None => {
                    let example = UNSET_EXAMPLES
                        .iter()
                        .find(|(name, _)| *name == key.name)
                        .map_or("\"\"", |(_, example)| example);
                    out.push_str(&format!("# {} = {example}\n", key.name));
                }
            }
        }
        out
    }

    /// The transport's settings.
    pub fn transport_config(&self) -> TransportConfig {
        // No `..Default::default()`: a new transport knob must become a key here.
        TransportConfig {
            handshake_timeout: self.handshake_timeout,
            heartbeat_interval: self.heartbeat_interval,
            stale_timeout: self.stale_timeout,
            backoff_base: self.reconnect_base,
            backoff_cap: self.reconnect_max,
            max_concurrent_requests: self.max_concurrent_requests,
            event_capacity: self.transport_event_capacity,
            close_timeout: self.close_timeout,
            // A send waits for a peer to take the message as long as a request waits for an
            // answer: past it the peer is not reading, and retry or catch-up takes over.
            send_timeout: self.request_timeout,
        }
    }

    /// The library database's settings.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            durability: self.durability,
            busy_timeout: self.busy_timeout,
            readers: self.db_readers,
        }
    }

    /// The change log's retention limits.
    pub fn retention(&self) -> RetentionPolicy {
        RetentionPolicy {
            max_age: self.log_retention,
            max_entries_per_origin: self.log_max_entries_per_origin,
        }
    }

    /// The hybrid logical clock's settings.
    pub fn hlc_config(&self) -> HlcConfig {
        HlcConfig { max_drift: self.max_drift }
    }

    fn parse(text: &str, origin: Origin) -> Result<Self, ConfigError> {
        let table: toml::Table =
            toml::from_str(text).map_err(|error| syntax_error(text, &error, origin.clone()))?;
        let unknown: Vec<String> =
            table.keys().filter(|name| key_named(name).is_none()).cloned().collect();
        if !unknown.is_empty() {
            return Err(ConfigError::UnknownKey { origin, keys: unknown });
        }
        // Each value alone first, so that an error names its key.
        for (name, value) in &table {
            check_value(name, value.clone()).map_err(|reason| ConfigError::BadValue {
                origin: origin.clone(),
                key: name.clone(),
                reason,
            })?;
        }
        let config = from_table(table, origin)?;
        config.validate()?;
        Ok(config)
    }

    fn to_table(&self) -> Result<toml::Table, ConfigError> {
        self.check_fields()?;
        toml::Table::try_from(self).map_err(|error| ConfigError::Constraint {
            key: "configuration",
            reason: format!("cannot be written as TOML: {error}"),
        })
    }
}

fn key_named(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|key| key.name == name)
}

/// The key `LSYNC_<KEY>` overrides; the name after the prefix must be the key in upper case.
fn key_for_env(name: &str) -> Option<&'static Key> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    KEYS.iter().find(|key| key.name.to_ascii_uppercase() == rest)
}

/// Reads one key's value alone (every other key at its default), for an error naming the key.
fn check_value(name: &str, value: toml::Value) -> Result<(), String> {
    let mut table = toml::Table::new();
    table.insert(name.to_owned(), value);
    table.try_into::<SyncConfig>().map(drop).map_err(|error| error.message().to_owned())
}

fn from_table(table: toml::Table, origin: Origin) -> Result<SyncConfig, ConfigError> {
    // Every value was read alone before, so this fails only if keys interfere, which they do
    // not; the error is still reported rather than assumed away.
    table.try_into().map_err(|error: toml::de::Error| ConfigError::BadValue {
        origin,
        key: "configuration".to_owned(),
        reason: error.message().to_owned(),
    })
}

fn syntax_error(text: &str, error: &toml::de::Error, origin: Origin) -> ConfigError {
    let offset = error.span().map_or(0, |span| span.start).min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&byte| byte == b'\n').map_or(0, |index| index + 1);
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    ConfigError::Syntax { origin, line, column, message: error.message().trim_end().to_owned() }
}

/// The process's `LSYNC_*` variables; one whose value is not UTF-8 is an error, one whose name
/// is not UTF-8 is kept (lossily) so that it is reported as unknown.
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if !name.starts_with(ENV_PREFIX) {
            continue;
        }
        match value.into_string() {
            Ok(value) => vars.push((name, value)),
            Err(_) => {
                return Err(ConfigError::BadValue {
                    origin: Origin::Environment,
                    key: name,
                    reason: "the value is not valid UTF-8".to_owned(),
                });
            }
        }
    }
    Ok(vars)
}

fn constraint(key: &'static str, reason: String) -> Result<(), ConfigError> {
    Err(ConfigError::Constraint { key, reason })
}

fn in_range(key: &'static str, value: u64, low: u64, high: u64) -> Result<(), ConfigError> {
    if (low..=high).contains(&value) {
        Ok(())
    } else {
        constraint(key, format!("must be from {low} to {high}, not {value}"))
    }
}

fn positive(key: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        constraint(key, "must be longer than zero (0s)".to_owned())
    } else {
        Ok(())
    }
}

fn at_least(
    key: &'static str,
    value: Duration,
    other_key: &str,
    other: Duration,
) -> Result<(), ConfigError> {
    if value >= other {
        Ok(())
    } else {
        constraint(
            key,
            format!(
                "must be at least {other_key} ({}), not {}",
                DisplayDuration(other),
                DisplayDuration(value)
            ),
        )
    }
}

fn to_u64(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

fn i64_max() -> u64 {
    u64::try_from(i64::MAX).unwrap_or(u64::MAX)
}

/// A user's text in an error message, quoted and cut to 40 characters.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(40).collect();
    if cut.len() < text.len() { format!("{cut:?}...") } else { format!("{cut:?}") }
}

#[cfg(test)]
mod tests;

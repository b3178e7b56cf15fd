//! The vocabulary lsync peers speak: every message, its encoding, and its limits.
//!
//! # Model
//!
//! A message is one [`Message`] value. On the wire it is a MessagePack array `[kind, body]`:
//! `kind` is a stable integer ([`Message::kind`], listed in `docs/protocol.md`) and `body` the
//! message struct as a map keyed by field name. The hot-path elements inside bodies (rows, changes,
//! snapshot records, values) are positional arrays instead, for size, and tolerate trailing elements
//! added by later versions. So a newer peer may add fields and message kinds: an older peer ignores
//! unknown fields and answers an unknown kind with [`DecodeError::UnknownKind`] (reported to the
//! sender as [`ErrorCode::Unsupported`]) without dropping the connection.
//!
//! # Invariants
//! - [`decode`] never panics and never allocates more than a small multiple of its input, whatever
//!   the bytes: input above [`MAX_MESSAGE_BYTES`] is refused before parsing, lengths inside are
//!   checked against the bytes actually present, and collections grow as elements arrive.
//! - A decoded message is valid: names are well formed, upsert rows have one value per column,
//!   sequence numbers start at 1, page limits are within
//!   [`MAX_PAGE_ROWS`] (see [`Message::validate`]). Receivers can trust the shape and check only
//!   what depends on their own state (pairing, ownership, the registry of models).
//! - [`encode`] refuses to produce what [`decode`] would refuse, so a peer never sends a message its
//!   counterpart must drop.
//!
//! # What this crate does not do
//! It knows no sockets, no framing (the transport prefixes each encoded message with its length),
//! no storage and no merge rules: it only says what the messages are and how they are written.

mod messages;
mod rows;
mod value;

use std::collections::HashSet;

pub use lsync_hlc::{DeviceId, Hlc, HlcTime};
pub use messages::{
    Ack, BackfillRequest, Epoch, ErrorCode, ErrorMessage, Heartbeat, HeartbeatAck, Hello,
    LibraryId, OriginSeq, PairRequest, PairResponse, SharedBatch, SharedCatchUpRequest,
    SharedCatchUpResponse, SharedSnapshotPage, SharedSnapshotRequest, StateBatch,
    StateCatchUpRequest, StateCursor, StateMark, StatePage, Watermarks,
};
pub use rows::{SharedChange, SharedOp, SharedRecord, Stamped, StateOp, StateRow};
pub use value::Value;

/// The protocol version, named in the transport's ALPN (`lsync/1`).
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest encoded message: 8 MiB. A page of [`MAX_PAGE_ROWS`] typical rows (100 to 300 bytes
/// each, measured for `entries`) takes 1 to 3 MiB, leaving room for wide rows; responders also stop
/// filling a page at [`PAGE_BYTES_TARGET`], so only single huge values come near the limit.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// The most rows, changes or records one page or batch may carry: 10,000. Large enough that a
/// page's per-request cost (one round trip, one SQLite transaction) is amortised over thousands of
/// rows, small enough that a page stays well inside [`MAX_MESSAGE_BYTES`].
pub const MAX_PAGE_ROWS: u32 = 10_000;

/// The payload size at which responders close a page even if it has fewer than the requested
/// rows: 1 MiB, an eighth of [`MAX_MESSAGE_BYTES`] so that encoding overhead can never push a page
/// over the limit.
pub const PAGE_BYTES_TARGET: usize = 1024 * 1024;

/// The longest model or column name: 64 bytes of `[a-z0-9_]`, starting with a letter.
pub const MAX_NAME_BYTES: usize = 64;

/// The most columns a model may have on the wire.
pub const MAX_COLUMNS: usize = 256;

/// The longest free text (device names, error messages): 1 KiB.
pub const MAX_TEXT_BYTES: usize = 1024;

/// One message between two peers. See `docs/protocol.md` for who sends each and what the receiver
/// does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens a connection; answered with the responder's own `Hello`.
    Hello(Hello),
    /// Device-owned rows, pushed live.
    StateBatch(StateBatch),
    /// Shared changes, pushed live.
    SharedBatch(SharedBatch),
    /// What the sender has applied, for pruning.
    Ack(Ack),
    /// The sender's watermarks; answered with [`Message::WatermarksResponse`].
    WatermarksRequest(Watermarks),
    /// The responder's watermarks.
    WatermarksResponse(Watermarks),
    /// Asks for missing shared changes.
    SharedCatchUpRequest(SharedCatchUpRequest),
    /// Missing shared changes.
    SharedCatchUpResponse(SharedCatchUpResponse),
    /// Asks for device-owned rows changed since a version.
    StateCatchUpRequest(StateCatchUpRequest),
    /// A page of device-owned rows (answer to catch-up and backfill requests).
    StatePage(StatePage),
    /// Asks for a page of device-owned rows in key order.
    BackfillRequest(BackfillRequest),
    /// Asks for a page of shared records' merged state.
    SharedSnapshotRequest(SharedSnapshotRequest),
    /// A page of shared records' merged state.
    SharedSnapshotPage(SharedSnapshotPage),
    /// Liveness probe.
    Heartbeat(Heartbeat),
    /// Answer to a heartbeat.
    HeartbeatAck(HeartbeatAck),
    /// Error reply or closing reason.
    Error(ErrorMessage),
    /// Pairing: proof of an invitation.
    PairRequest(PairRequest),
    /// Pairing accepted.
    PairResponse(PairResponse),
}

/// Calls `$callback!` with the list of `kind => variant` pairs: the one place kind numbers are
/// assigned, so encoding, decoding and `kind()` cannot disagree.
macro_rules! for_each_kind {
    ($callback:ident!($($args:tt)*)) => {
        $callback!($($args)*
            1 => Hello,
            2 => StateBatch,
            3 => SharedBatch,
            4 => Ack,
            5 => WatermarksRequest,
            6 => WatermarksResponse,
            7 => SharedCatchUpRequest,
            8 => SharedCatchUpResponse,
            9 => StateCatchUpRequest,
            10 => StatePage,
            11 => BackfillRequest,
            12 => SharedSnapshotRequest,
            13 => SharedSnapshotPage,
            14 => Heartbeat,
            15 => HeartbeatAck,
            16 => Error,
            17 => PairRequest,
            18 => PairResponse,
        )
    };
}

macro_rules! kind_of {
    ($message:ident $($kind:literal => $variant:ident,)*) => {
        match $message { $(Message::$variant(_) => $kind,)* }
    };
}

macro_rules! name_of {
    ($message:ident $($kind:literal => $variant:ident,)*) => {
        match $message { $(Message::$variant(_) => stringify!($variant),)* }
    };
}

macro_rules! encode_body {
    ($message:ident, $out:ident $($kind:literal => $variant:ident,)*) => {
        match $message { $(Message::$variant(body) => rmp_serde::encode::write_named($out, body),)* }
    };
}

macro_rules! decode_body {
    ($kind:ident, $body:ident $($number:literal => $variant:ident,)*) => {
        match $kind {
            $($number => rmp_serde::from_slice($body).map(Message::$variant),)*
            other => return Err(DecodeError::UnknownKind(other)),
        }
    };
}

impl Message {
    /// The stable kind number that prefixes the body on the wire.
    pub fn kind(&self) -> u16 {
        for_each_kind!(kind_of!(self))
    }

    /// The variant's name, for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        for_each_kind!(name_of!(self))
    }

    /// Checks the rules a message must follow beyond its shape (see the crate docs).
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            Message::Hello(hello) => check_text("name", &hello.name),
            Message::StateBatch(batch) => {
                check_name("model", &batch.model)?;
                check_state_rows(&batch.columns, &batch.rows)
            }
            Message::SharedBatch(batch) => check_changes(&batch.changes),
            Message::Ack(ack) => check_marks(&ack.state),
            Message::WatermarksRequest(marks) | Message::WatermarksResponse(marks) => {
                check_marks(&marks.state).and_then(|()| check_marks(&marks.collected))
            }
            Message::SharedCatchUpRequest(request) => check_limit(request.limit),
            Message::SharedCatchUpResponse(response) => check_changes(&response.changes),
            Message::StateCatchUpRequest(request) => {
                check_name("model", &request.model)?;
                check_limit(request.limit)
            }
            Message::StatePage(page) => {
                check_name("model", &page.model)?;
                check_state_rows(&page.columns, &page.rows)
            }
            Message::BackfillRequest(request) => {
                check_name("model", &request.model)?;
                check_limit(request.limit)
            }
            Message::SharedSnapshotRequest(request) => {
                check_name("model", &request.model)?;
                check_limit(request.limit)
            }
            Message::SharedSnapshotPage(page) => {
                check_name("model", &page.model)?;
                check_count(page.records.len())?;
                page.records
                    .iter()
                    .flat_map(|record| record.fields.keys())
                    .try_for_each(|field| check_name("field", field))
            }
            Message::Heartbeat(Heartbeat { watermarks, .. })
            | Message::HeartbeatAck(HeartbeatAck { watermarks, .. }) => {
                watermarks.as_ref().map_or(Ok(()), |marks| {
                    check_marks(&marks.state).and_then(|()| check_marks(&marks.collected))
                })
            }
            Message::Error(error) => check_text("message", &error.message),
            Message::PairRequest(request) => {
                check_text("name", &request.name)?;
                if request.proof.len() != 32 {
                    return Err(Invalid(format!(
                        "pairing proof is {} bytes, not 32",
                        request.proof.len()
                    )));
                }
                Ok(())
            }
            Message::PairResponse(response) => check_text("name", &response.name),
        }
    }
}

/// A rule of the protocol that a message breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Why bytes could not be decoded into a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input exceeds [`MAX_MESSAGE_BYTES`].
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Input length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The kind number is not one this version knows (a newer peer?).
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// The bytes are not a well-formed message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message is well formed but breaks a protocol rule.
    #[error("invalid {kind} message: {reason}")]
    Invalid {
        /// The message's variant name.
        kind: &'static str,
        /// The broken rule.
        reason: Invalid,
    },
}

impl DecodeError {
    /// The error code to report to the sender.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownKind(_) => ErrorCode::Unsupported,
            DecodeError::Malformed(_) | DecodeError::Invalid { .. } => ErrorCode::Malformed,
        }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message would exceed [`MAX_MESSAGE_BYTES`]; split it.
    #[error("encoded {kind} message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The message's variant name.
        kind: &'static str,
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The message breaks a protocol rule; the receiver would refuse it.
    #[error("refusing to encode an invalid {kind} message: {reason}")]
    Invalid {
        /// The message's variant name.
        kind: &'static str,
        /// The broken rule.
        reason: Invalid,
    },
    /// The serializer failed (a value it cannot represent).
    #[error("cannot encode {kind} message: {reason}")]
    Serialize {
        /// The message's variant name.
        kind: &'static str,
        /// What failed.
        reason: String,
    },
}

/// Encodes `message`, appending to `out`. On error `out` is left as it was.
pub fn encode_into(message: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let kind = message.name();
    message.validate().map_err(|reason| EncodeError::Invalid { kind, reason })?;
    let start = out.len();
    let result = rmp::encode::write_array_len(out, 2)
        .map_err(|error| error.to_string())
        .and_then(|_| {
            rmp::encode::write_uint(out, u64::from(message.kind()))
                .map_err(|error| error.to_string())
        })
        .and_then(|_| {
            for_each_kind!(encode_body!(message, out)).map_err(|error| error.to_string())
        });
    if let Err(reason) = result {
        out.truncate(start);
        return Err(EncodeError::Serialize { kind, reason });
    }
    let len = out.len() - start;
    if len > MAX_MESSAGE_BYTES {
        out.truncate(start);
        return Err(EncodeError::TooLarge { kind, len, max: MAX_MESSAGE_BYTES });
    }
    Ok(())
}

/// Encodes `message` into a new buffer.
pub fn encode(message: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(message, &mut out)?;
    Ok(out)
}

/// Decodes and validates one message. Trailing envelope elements from later versions are ignored.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: MAX_MESSAGE_BYTES });
    }
    let mut rest = bytes;
    let malformed = |reason: &dyn std::fmt::Display| DecodeError::Malformed(reason.to_string());
    let envelope_len = rmp::decode::read_array_len(&mut rest).map_err(|error| malformed(&error))?;
    if envelope_len < 2 {
        return Err(malformed(&format_args!(
            "envelope has {envelope_len} elements, expected [kind, body]"
        )));
    }
    let kind: u16 = rmp::decode::read_int(&mut rest).map_err(|error| malformed(&error))?;
    let body = rest;
    let message: Message =
        for_each_kind!(decode_body!(kind, body)).map_err(|error| malformed(&error))?;
    message.validate().map_err(|reason| DecodeError::Invalid { kind: message.name(), reason })?;
    Ok(message)
}

fn check_name(what: &str, name: &str) -> Result<(), Invalid> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if well_formed {
        Ok(())
    } else {
        let shown: String = name.chars().take(MAX_NAME_BYTES).collect();
        Err(Invalid(format!(
            "{what} name {shown:?} must be 1 to {MAX_NAME_BYTES} bytes of [a-z0-9_] starting with a letter"
        )))
    }
}

fn check_text(what: &str, text: &str) -> Result<(), Invalid> {
    if text.len() <= MAX_TEXT_BYTES {
        Ok(())
    } else {
        Err(Invalid(format!("{what} is {} bytes, more than {MAX_TEXT_BYTES}", text.len())))
    }
}

fn check_limit(limit: u32) -> Result<(), Invalid> {
    if (1..=MAX_PAGE_ROWS).contains(&limit) {
        Ok(())
    } else {
        Err(Invalid(format!("page limit {limit} is outside 1..={MAX_PAGE_ROWS}")))
    }
}

fn check_count(count: usize) -> Result<(), Invalid> {
    if count <= MAX_PAGE_ROWS as usize {
        Ok(())
    } else {
        Err(Invalid(format!("{count} items in one message, more than {MAX_PAGE_ROWS}")))
    }
}

fn check_columns(columns: &[String]) -> Result<(), Invalid> {
    if columns.len() > MAX_COLUMNS {
        return Err(Invalid(format!("{} columns, more than {MAX_COLUMNS}", columns.len())));
    }
    let mut seen = HashSet::with_capacity(columns.len());
    for column in columns {
        check_name("column", column)?;
        if !seen.insert(column.as_str()) {
            return Err(Invalid(format!("column {column:?} listed twice")));
        }
    }
    Ok(())
}

fn check_state_rows(columns: &[String], rows: &[StateRow]) -> Result<(), Invalid> {
    check_columns(columns)?;
    check_count(rows.len())?;
    for row in rows {
        if let StateOp::Upsert(values) = &row.op
            && values.len() != columns.len()
        {
            return Err(Invalid(format!(
                "row {} has {} values for {} columns",
                row.id,
                values.len(),
                columns.len()
            )));
        }
    }
    Ok(())
}

fn check_changes(changes: &[SharedChange]) -> Result<(), Invalid> {
    check_count(changes.len())?;
    for change in changes {
        check_name("model", &change.model)?;
        if change.seq == 0 {
            return Err(Invalid(format!("change of {} has sequence number 0", change.origin)));
        }
        if let Some(fields) = change.op.fields() {
            fields.keys().try_for_each(|field| check_name("field", field))?;
        }
    }
    Ok(())
}

fn check_marks(marks: &[StateMark]) -> Result<(), Invalid> {
    marks.iter().try_for_each(|mark| check_name("model", &mark.model))
}

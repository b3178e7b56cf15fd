//! The messages, one struct each. They travel as MessagePack maps keyed by field name, so a later
//! version may add fields (readers ignore keys they do not know, and fields marked
//! `#[serde(default)]` may be absent).

use std::fmt;
use std::str::FromStr;

use lsync_hlc::{DeviceId, HlcTime};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{SharedChange, SharedRecord, StateRow};

/// The identity of a library: the data set that a group of paired devices keeps in sync.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LibraryId(pub Uuid);

impl fmt::Display for LibraryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for LibraryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for LibraryId {
    type Err = uuid::Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(text).map(Self)
    }
}

/// A random number chosen when a device's copy of a library is created. A device restored from
/// an old copy, or re-created under the same identity, comes back with a different epoch, which
/// tells its peers that the watermarks they remember for it are stale.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

/// How far a device has applied one origin's shared changes: every change of `origin` with a
/// sequence number up to and including `seq` is applied, with no gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OriginSeq {
    /// The device whose changes these are.
    pub origin: DeviceId,
    /// The highest contiguous sequence number (0: none yet).
    pub seq: u64,
}

/// How far a device holds one owner's rows of one device-owned model: every version the owner
/// wrote up to and including `version` is held.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StateMark {
    /// The device that owns the rows.
    pub owner: DeviceId,
    /// The device-owned model.
    pub model: String,
    /// The highest owner version held (the time of the owner's stamp).
    pub version: HlcTime,
}

/// First message on every connection, in both directions (request and response): who is talking,
/// for which library, in which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The library the sender syncs; a different one ends the connection.
    pub library: LibraryId,
    /// The sender.
    pub device: DeviceId,
    /// The sender's current epoch.
    pub epoch: Epoch,
    /// The sender's human-readable device name.
    #[serde(default)]
    pub name: String,
}

/// A sender's sync position: sent on every (re)connect and in heartbeats, so each side can compute
/// exactly what the other lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermarks {
    /// The library.
    pub library: LibraryId,
    /// The device these watermarks belong to.
    pub device: DeviceId,
    /// That device's epoch.
    pub epoch: Epoch,
    /// Per origin, the highest contiguous shared change applied.
    pub shared: Vec<OriginSeq>,
    /// Per (owner, model), the highest owner version held.
    pub state: Vec<StateMark>,
    /// Whether the device finished its initial backfill (only such devices serve backfills).
    #[serde(default)]
    pub ready: bool,
    /// Set only in a [`Message::WatermarksResponse`](crate::Message::WatermarksResponse): the
    /// requester fell behind what the responder keeps (pruned changes, collected tombstones) and
    /// must resync fully, deleting rows the responder no longer holds. The responder asks until
    /// the requester reports, with `ready: false`, that its resync runs.
    #[serde(default)]
    pub resync: bool,
    /// Per (owner, model), the newest version of a deletion this device may no longer remember:
    /// tombstones it collected, or never received because its copy came from a peer that had
    /// collected them. A catch-up from this device starting below it cannot list those
    /// deletions, so a requester whose mark is lower compares its rows with this device's
    /// instead (see `docs/protocol.md`, "Collected tombstones"). Absent: nothing collected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collected: Vec<StateMark>,
    /// The sender's current incarnation (the origin it numbers its shared changes under) and its
    /// write count, as `{origin, seq}` with the write count in `seq`. The receiver remembers it
    /// and tells it back in [`Watermarks::seen`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<OriginSeq>,
    /// In a [`Message::WatermarksResponse`](crate::Message::WatermarksResponse): what the
    /// responder last heard of the requester's incarnation and write count before this request.
    /// In a [`Message::WatermarksRequest`](crate::Message::WatermarksRequest): what the requester
    /// last heard of the responder's. A device whose file does not hold that much was rolled
    /// back to an older copy; told in a request, it finds out before it answers, and answers as
    /// a copy that claims none of its rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<OriginSeq>,
    /// The sender's wall clock (ms since the Unix epoch) when it sent a watermark request or
    /// response: the requester measures the responder's clock offset from it and the round trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_ms: Option<u64>,
}

/// Device-owned rows of one owner and one model, pushed live by the owner or relayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBatch {
    /// The device that owns (and alone writes) these rows.
    pub owner: DeviceId,
    /// The device-owned model.
    pub model: String,
    /// Column names, in the order of each upsert's values; the primary key is not among them.
    pub columns: Vec<String>,
    /// The rows, several changes to one row coalesced to the newest.
    pub rows: Vec<StateRow>,
    /// The owner's mark for this model when the batch was cut: the batch holds every change of
    /// the owner's rows of this model after it. A receiver whose own mark is at least `since` may
    /// raise its mark to the batch's newest version; one further behind applies the rows but
    /// keeps its mark, and catches up the gap by watermark. `None`: from the very first write.
    /// `Some(HlcTime::MAX)`: the batch claims nothing, the owner's copy is resyncing what it may
    /// have lost (restored from an old file, re-created) and its mark is not backed by its rows.
    #[serde(default)]
    pub since: Option<HlcTime>,
}

/// Shared changes pushed live, in origin sequence order per origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedBatch {
    /// The changes.
    pub changes: Vec<SharedChange>,
}

/// What the sender has durably applied: drives pruning of peer logs and tombstones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Per origin, the highest contiguous shared change the sender applied.
    pub shared: Vec<OriginSeq>,
    /// Per (owner, model), the highest owner version the sender holds.
    #[serde(default)]
    pub state: Vec<StateMark>,
}

/// Asks for shared changes the requester lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedCatchUpRequest {
    /// The requester's watermarks: for each listed origin, changes with a larger sequence number
    /// are wanted; for origins not listed, all of them.
    pub after: Vec<OriginSeq>,
    /// The most changes to return (at most [`crate::MAX_PAGE_ROWS`]).
    pub limit: u32,
}

/// Answers [`SharedCatchUpRequest`]: changes in origin sequence order per origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedCatchUpResponse {
    /// The changes; per origin contiguous from the requested point.
    pub changes: Vec<SharedChange>,
    /// `false` if more changes remain: ask again with updated watermarks.
    pub complete: bool,
    /// Origins whose wanted changes the responder no longer holds (pruned), with the lowest
    /// sequence number it still holds. The requester cannot close that gap from this peer: it
    /// needs the records' merged state (a snapshot) instead.
    #[serde(default)]
    pub pruned: Vec<OriginSeq>,
}

/// Asks for one owner's rows of one device-owned model changed since a version, deletions
/// included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCatchUpRequest {
    /// Whose rows.
    pub owner: DeviceId,
    /// Which model.
    pub model: String,
    /// Rows with an owner version above this (`None`: all).
    pub since: Option<HlcTime>,
    /// Resume after this row of the previous page, in (version, id) order.
    pub after: Option<StateCursor>,
    /// The most rows to return (at most [`crate::MAX_PAGE_ROWS`]).
    pub limit: u32,
}

/// A position in (version, id) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StateCursor {
    /// The owner version of the last row received.
    pub version: HlcTime,
    /// Its primary key.
    pub id: Uuid,
}

/// Asks for one owner's live rows of one device-owned model in primary-key order: the bulk of a
/// backfill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillRequest {
    /// Whose rows.
    pub owner: DeviceId,
    /// Which model.
    pub model: String,
    /// Resume after this primary key (`None`: from the start).
    pub after: Option<Uuid>,
    /// The most rows to return (at most [`crate::MAX_PAGE_ROWS`]).
    pub limit: u32,
}

/// Answers [`StateCatchUpRequest`] (rows in (version, id) order, tombstones included) and
/// [`BackfillRequest`] (live rows in primary-key order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatePage {
    /// Whose rows.
    pub owner: DeviceId,
    /// Which model.
    pub model: String,
    /// Column names for the upserts' values.
    pub columns: Vec<String>,
    /// The rows.
    pub rows: Vec<StateRow>,
    /// Whether more rows follow: ask again after the last row.
    pub more: bool,
    /// The responder's estimate of all rows of the request (for progress and ETA).
    #[serde(default)]
    pub estimated_total: u64,
    /// The responder's collected-deletion mark for (owner, model) when it read the page
    /// (optional): deletions at or below it may be missing from the page without a tombstone.
    /// A backfill step or a comparison raises the requester's own collected mark to it (capped
    /// at the mark it raises), since the requester's copy cannot list those deletions either.
    /// Absent from older peers: the collected mark their watermarks told stands in.
    #[serde(default)]
    pub collected: Option<HlcTime>,
}

/// Asks for the merged state of a shared model's records in primary-key order: backfill of shared
/// data, which works even after peer logs were pruned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedSnapshotRequest {
    /// Which shared model.
    pub model: String,
    /// Resume after this primary key (`None`: from the start).
    pub after: Option<Uuid>,
    /// The most records to return (at most [`crate::MAX_PAGE_ROWS`]).
    pub limit: u32,
}

/// Answers [`SharedSnapshotRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedSnapshotPage {
    /// Which shared model.
    pub model: String,
    /// The records, in primary-key order.
    pub records: Vec<SharedRecord>,
    /// Whether more records follow.
    pub more: bool,
    /// The responder's estimate of all records of the model.
    #[serde(default)]
    pub estimated_total: u64,
}

/// Liveness probe; the receiver answers with [`HeartbeatAck`] echoing `nonce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Echoed in the answer, to measure the round trip.
    pub nonce: u64,
    /// The sender's watermarks, so divergence is noticed without a reconnect.
    #[serde(default)]
    pub watermarks: Option<Watermarks>,
}

/// Answer to [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The heartbeat's nonce.
    pub nonce: u64,
    /// The answering device's watermarks.
    #[serde(default)]
    pub watermarks: Option<Watermarks>,
}

/// Why a request failed or a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The message was for another library.
    WrongLibrary,
    /// The sender is not a paired device.
    UnknownDevice,
    /// The message kind or an operation in it is not known to this version.
    Unsupported,
    /// The message could not be decoded or broke a rule of the protocol.
    Malformed,
    /// The message exceeded a size limit.
    TooLarge,
    /// What was asked for is no longer held (pruned); fall back to a snapshot.
    NotAvailable,
    /// The responder is overloaded or shutting down; retry later.
    Busy,
    /// Pairing refused: wrong, reused or expired invitation.
    PairingRefused,
    /// The responder failed internally.
    Internal,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            ErrorCode::WrongLibrary => 1,
            ErrorCode::UnknownDevice => 2,
            ErrorCode::Unsupported => 3,
            ErrorCode::Malformed => 4,
            ErrorCode::TooLarge => 5,
            ErrorCode::NotAvailable => 6,
            ErrorCode::Busy => 7,
            ErrorCode::PairingRefused => 8,
            ErrorCode::Internal => 9,
            ErrorCode::Other(code) => code,
        }
    }

    /// The code for a wire value; unknown values are kept as [`ErrorCode::Other`].
    pub fn from_u16(code: u16) -> Self {
        match code {
            1 => ErrorCode::WrongLibrary,
            2 => ErrorCode::UnknownDevice,
            3 => ErrorCode::Unsupported,
            4 => ErrorCode::Malformed,
            5 => ErrorCode::TooLarge,
            6 => ErrorCode::NotAvailable,
            7 => ErrorCode::Busy,
            8 => ErrorCode::PairingRefused,
            9 => ErrorCode::Internal,
            other => ErrorCode::Other(other),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u16::deserialize(deserializer).map(ErrorCode::from_u16)
    }
}

/// An error reply to a request, or the reason a connection is about to close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What kind of failure.
    pub code: ErrorCode,
    /// A human-readable explanation (at most [`crate::MAX_TEXT_BYTES`]).
    pub message: String,
}

/// A joining device proves it holds an invitation's secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairRequest {
    /// Which invitation.
    pub invitation: Uuid,
    /// HMAC-SHA256 under the invitation secret of both devices' certificate fingerprints, so the
    /// secret itself never travels and the proof is bound to this TLS session's identities.
    #[serde(with = "serde_bytes_vec")]
    pub proof: Vec<u8>,
    /// The joining device.
    pub device: DeviceId,
    /// Its human-readable name.
    pub name: String,
}

/// Answer to an accepted [`PairRequest`]; a refused one gets [`ErrorMessage`] with
/// [`ErrorCode::PairingRefused`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairResponse {
    /// The library joined.
    pub library: LibraryId,
    /// The inviting device.
    pub device: DeviceId,
    /// Its human-readable name.
    pub name: String,
}

/// Encodes a `Vec<u8>` as MessagePack bin rather than an array of integers.
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        struct BytesVisitor;
        impl<'de> serde::de::Visitor<'de> for BytesVisitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
                Ok(bytes.to_vec())
            }
        }
        deserializer.deserialize_bytes(BytesVisitor)
    }
}

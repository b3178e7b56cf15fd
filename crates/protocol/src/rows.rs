//! The hot-path elements (rows, changes, snapshot records), encoded as compact MessagePack arrays.
//!
//! A batch carries thousands of these, so they travel as positional arrays rather than maps with
//! field names. To stay version-tolerant anyway, every array may carry trailing elements that this
//! version does not know: readers skip them, so a later version can append fields.

use std::collections::BTreeMap;
use std::fmt;

use lsync_hlc::{DeviceId, Hlc, HlcTime};
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::Value;

/// A value with the stamp of the write that set it: one last-writer-wins register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped<T>(pub Hlc, pub T);

/// One device-owned row as its owner last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRow {
    /// Primary key.
    pub id: Uuid,
    /// The time of the owner's HLC stamp when it wrote this version (the stamp's device is the
    /// owner, named once per batch); newer wins, older or equal is a no-op.
    pub version: HlcTime,
    /// What the owner did.
    pub op: StateOp,
}

/// What an owner did to a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOp {
    /// The row exists with these values, in the order of the batch's `columns`.
    Upsert(Vec<Value>),
    /// The row was deleted (a tombstone).
    Delete,
    /// The row and every row below it in its model's tree were deleted: one tombstone for a whole
    /// subtree (a directory and everything under it).
    DeleteSubtree,
}

impl StateOp {
    fn code(&self) -> u8 {
        match self {
            StateOp::Upsert(_) => 0,
            StateOp::Delete => 1,
            StateOp::DeleteSubtree => 2,
        }
    }
}

impl Serialize for StateRow {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let values = match &self.op {
            StateOp::Upsert(values) => Some(values),
            StateOp::Delete | StateOp::DeleteSubtree => None,
        };
        let mut tuple = serializer.serialize_tuple(3 + usize::from(values.is_some()))?;
        tuple.serialize_element(&self.id)?;
        tuple.serialize_element(&self.version)?;
        tuple.serialize_element(&self.op.code())?;
        if let Some(values) = values {
            tuple.serialize_element(values)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for StateRow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> Visitor<'de> for RowVisitor {
            type Value = StateRow;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a state row [id, version, op, values?]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StateRow, A::Error> {
                let id = required(&mut seq, 0, &self)?;
                let version = required(&mut seq, 1, &self)?;
                let op = match required::<u8, _>(&mut seq, 2, &self)? {
                    0 => StateOp::Upsert(required(&mut seq, 3, &self)?),
                    1 => StateOp::Delete,
                    2 => StateOp::DeleteSubtree,
                    other => return Err(de::Error::custom(format!("unknown state op {other}"))),
                };
                skip_rest(seq)?;
                Ok(StateRow { id, version, op })
            }
        }
        deserializer.deserialize_seq(RowVisitor)
    }
}

/// One change to shared data, as recorded in the origin's peer log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedChange {
    /// The device that made the change.
    pub origin: DeviceId,
    /// The origin's sequence number: 1, 2, 3… per origin, without gaps.
    pub seq: u64,
    /// The time of the origin's HLC stamp for the change (the stamp's device is the origin; see
    /// [`SharedChange::hlc`]).
    pub time: HlcTime,
    /// The shared model (table) changed.
    pub model: String,
    /// The record changed.
    pub record: Uuid,
    /// What changed.
    pub op: SharedOp,
}

/// What a shared change does to its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedOp {
    /// Creates the record (or re-adds a set member) with these field values.
    Insert(BTreeMap<String, Value>),
    /// Sets these fields; each field is its own last-writer-wins register.
    Update(BTreeMap<String, Value>),
    /// Deletes the record (or removes a set member).
    Delete,
}

impl SharedOp {
    fn code(&self) -> u8 {
        match self {
            SharedOp::Insert(_) => 0,
            SharedOp::Update(_) => 1,
            SharedOp::Delete => 2,
        }
    }

    /// The fields the change sets (none for a delete).
    pub fn fields(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            SharedOp::Insert(fields) | SharedOp::Update(fields) => Some(fields),
            SharedOp::Delete => None,
        }
    }
}

impl SharedChange {
    /// The change's full stamp: its time, issued by its origin.
    pub fn hlc(&self) -> Hlc {
        Hlc::new(self.time, self.origin)
    }
}

impl Serialize for SharedChange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = self.op.fields();
        let mut tuple = serializer.serialize_tuple(6 + usize::from(fields.is_some()))?;
        tuple.serialize_element(&self.origin)?;
        tuple.serialize_element(&self.seq)?;
        tuple.serialize_element(&self.time)?;
        tuple.serialize_element(&self.model)?;
        tuple.serialize_element(&self.record)?;
        tuple.serialize_element(&self.op.code())?;
        if let Some(fields) = fields {
            tuple.serialize_element(fields)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for SharedChange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChangeVisitor;
        impl<'de> Visitor<'de> for ChangeVisitor {
            type Value = SharedChange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a shared change [origin, seq, time, model, record, op, fields?]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SharedChange, A::Error> {
                let origin = required(&mut seq, 0, &self)?;
                let seq_no = required(&mut seq, 1, &self)?;
                let time = required(&mut seq, 2, &self)?;
                let model = required(&mut seq, 3, &self)?;
                let record = required(&mut seq, 4, &self)?;
                let op = match required::<u8, _>(&mut seq, 5, &self)? {
                    0 => SharedOp::Insert(required(&mut seq, 6, &self)?),
                    1 => SharedOp::Update(required(&mut seq, 6, &self)?),
                    2 => SharedOp::Delete,
                    other => return Err(de::Error::custom(format!("unknown shared op {other}"))),
                };
                skip_rest(seq)?;
                Ok(SharedChange { origin, seq: seq_no, time, model, record, op })
            }
        }
        deserializer.deserialize_seq(ChangeVisitor)
    }
}

/// The merged state of one shared record, as a snapshot for backfill: enough to merge correctly
/// with any change, even after the peer logs that produced it were pruned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRecord {
    /// Primary key.
    pub id: Uuid,
    /// The existence register: `true` after an insert, `false` after a delete, with the stamp of
    /// the winning one; `None` if only field updates were seen so far.
    pub existence: Option<Stamped<bool>>,
    /// Each field's register.
    pub fields: BTreeMap<String, Stamped<Value>>,
}

impl Serialize for SharedRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(3)?;
        tuple.serialize_element(&self.id)?;
        tuple.serialize_element(&self.existence)?;
        tuple.serialize_element(&self.fields)?;
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for SharedRecord {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RecordVisitor;
        impl<'de> Visitor<'de> for RecordVisitor {
            type Value = SharedRecord;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a shared record [id, existence, fields]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SharedRecord, A::Error> {
                let id = required(&mut seq, 0, &self)?;
                let existence = required(&mut seq, 1, &self)?;
                let fields = required(&mut seq, 2, &self)?;
                skip_rest(seq)?;
                Ok(SharedRecord { id, existence, fields })
            }
        }
        deserializer.deserialize_seq(RecordVisitor)
    }
}

fn required<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(
    seq: &mut A,
    index: usize,
    expected: &dyn de::Expected,
) -> Result<T, A::Error> {
    seq.next_element()?.ok_or_else(|| de::Error::invalid_length(index, expected))
}

/// Skips elements appended by later protocol versions.
fn skip_rest<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

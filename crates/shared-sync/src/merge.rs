//! The merge rules, as pure functions on one record's registers.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use lsync_hlc::{Hlc, HlcTime};
use lsync_protocol::{SharedOp, SharedRecord, Stamped, Value};
use lsync_store::ModelDef;
use uuid::Uuid;

/// The merged state of one shared record: one last-writer-wins register per field and one for
/// the record's existence.
///
/// - An insert sets existence to `true` and every field it carries, at its stamp.
/// - An update sets the fields it carries and existence to `true`, at its stamp: an edit made
///   after a delete (in HLC order) revives the record, an edit made before it does not.
/// - A delete sets existence to `false` at its stamp.
///
/// A register takes an incoming write if its stamp is larger (stamps order by time, then counter,
/// then device id, so concurrent writes resolve the same way everywhere). Equal stamps come from
/// the same write and so carry the same value; should a faulty peer send different values under
/// one stamp, the larger value by [`compare_values`] wins, keeping the merge deterministic.
///
/// Because every register keeps the maximum of what it saw, applying changes is idempotent,
/// commutative and associative, and so is [`RecordState::merge`]: replicas that saw the same
/// changes in any order, any number of times, hold the same state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordState {
    /// Existence register (`None` until an insert, update or delete was seen).
    pub existence: Option<Stamped<bool>>,
    /// Field registers.
    pub fields: BTreeMap<String, Stamped<Value>>,
}

impl RecordState {
    /// Applies one change made at `stamp`; returns whether any register changed.
    pub fn apply(&mut self, stamp: Hlc, op: &SharedOp) -> bool {
        let mut changed = match op {
            SharedOp::Insert(_) | SharedOp::Update(_) => {
                merge_register(&mut self.existence, Stamped(stamp, true), bool::cmp)
            }
            SharedOp::Delete => {
                merge_register(&mut self.existence, Stamped(stamp, false), bool::cmp)
            }
        };
        if let Some(fields) = op.fields() {
            for (name, value) in fields {
                changed |= self.merge_field(name, Stamped(stamp, value.clone()));
            }
        }
        changed
    }

    /// Merges another replica's state of the same record; returns whether anything changed.
    pub fn merge(&mut self, other: &RecordState) -> bool {
        let mut changed = match &other.existence {
            Some(existence) => merge_register(&mut self.existence, existence.clone(), bool::cmp),
            None => false,
        };
        for (name, register) in &other.fields {
            changed |= self.merge_field(name, register.clone());
        }
        changed
    }

    fn merge_field(&mut self, name: &str, incoming: Stamped<Value>) -> bool {
        match self.fields.get_mut(name) {
            Some(current) => {
                let mut slot = Some(current.clone());
                let changed = merge_register(&mut slot, incoming, compare_values);
                if let Some(merged) = slot {
                    *current = merged;
                }
                changed
            }
            None => {
                self.fields.insert(name.to_owned(), incoming);
                true
            }
        }
    }

    /// Whether the record exists (its existence register holds `true`).
    pub fn exists(&self) -> bool {
        matches!(self.existence, Some(Stamped(_, true)))
    }

    /// The row to show in the model's table, in column order: `None` if the record does not
    /// exist or lacks a value for a NOT NULL column (an update that arrived before its insert).
    pub fn row(&self, model: &ModelDef) -> Option<Vec<Value>> {
        if !self.exists() {
            return None;
        }
        model
            .columns
            .iter()
            .map(|column| match self.fields.get(&column.name) {
                Some(Stamped(_, value)) => Some(value.clone()),
                None if column.nullable => Some(Value::Null),
                None => None,
            })
            .collect()
    }

    /// The largest stamp in any register: the time of the last write to the record.
    pub fn last_stamp(&self) -> Option<Hlc> {
        let fields = self.fields.values().map(|Stamped(stamp, _)| *stamp);
        self.existence.iter().map(|Stamped(stamp, _)| *stamp).chain(fields).max()
    }

    /// As a snapshot record for the wire.
    pub fn to_record(&self, id: Uuid) -> SharedRecord {
        SharedRecord { id, existence: self.existence.clone(), fields: self.fields.clone() }
    }

    /// From a snapshot record.
    pub fn from_record(record: &SharedRecord) -> Self {
        Self { existence: record.existence.clone(), fields: record.fields.clone() }
    }
}

/// The time to stamp a local edit of a record with: the clock's `now`, or — when the record
/// already holds a stamp at or after it (written by a clock running ahead, a year ahead even) —
/// just after the record's newest stamp. An edit made after this device showed a value thus
/// always wins over that value, whatever the clocks say; the clock itself is not moved (a clock
/// far ahead is not adopted: see the drift bound). Stamps stay unique: the device part of a
/// local stamp is this device's incarnation, which no other writer uses.
pub fn local_stamp_time(now: HlcTime, current: Option<&RecordState>) -> HlcTime {
    match current.and_then(RecordState::last_stamp) {
        Some(newest) if newest.time() >= now => newest.time().successor().unwrap_or(HlcTime::MAX),
        _ => now,
    }
}

/// Takes `incoming` into `register` if its stamp is larger, or equal with a larger value.
fn merge_register<T: Clone>(
    register: &mut Option<Stamped<T>>,
    incoming: Stamped<T>,
    compare: impl Fn(&T, &T) -> Ordering,
) -> bool {
    let wins = match register {
        None => true,
        Some(current) => match incoming.0.cmp(&current.0) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => compare(&incoming.1, &current.1) == Ordering::Greater,
        },
    };
    if wins {
        *register = Some(incoming);
    }
    wins
}

/// A total order on values: by kind (NULL, integer, real, text, blob), then by content; reals by
/// their IEEE total order. Used only to break ties between equal stamps.
pub fn compare_values(a: &Value, b: &Value) -> Ordering {
    fn kind(value: &Value) -> u8 {
        match value {
            Value::Null => 0,
            Value::Integer(_) => 1,
            Value::Real(_) => 2,
            Value::Text(_) => 3,
            Value::Blob(_) => 4,
        }
    }
    match (a, b) {
        (Value::Integer(a), Value::Integer(b)) => a.cmp(b),
        (Value::Real(a), Value::Real(b)) => a.total_cmp(b),
        (Value::Text(a), Value::Text(b)) => a.cmp(b),
        (Value::Blob(a), Value::Blob(b)) => a.cmp(b),
        _ => kind(a).cmp(&kind(b)),
    }
}

#[cfg(test)]
mod tests {
    use lsync_hlc::{DeviceId, HlcTime};
    use lsync_store::{Column, ColumnType};

    use super::*;

    fn stamp(ms: u64, device: u8) -> Hlc {
        Hlc::new(HlcTime::new(ms, 0).unwrap(), DeviceId::from_bytes([device; 16]))
    }

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, Value> {
        pairs.iter().map(|(name, value)| (name.to_string(), Value::from(*value))).collect()
    }

    fn tags() -> ModelDef {
        ModelDef::shared(
            "tags",
            vec![
                Column::new("name", ColumnType::Text),
                Column::nullable("color", ColumnType::Text),
            ],
        )
    }

    #[test]
    fn concurrent_edits_of_different_fields_both_survive() {
        let mut record = RecordState::default();
        record.apply(stamp(1, 1), &SharedOp::Insert(fields(&[("name", "work"), ("color", "red")])));
        record.apply(stamp(5, 2), &SharedOp::Update(fields(&[("name", "job")])));
        record.apply(stamp(4, 3), &SharedOp::Update(fields(&[("color", "blue")])));
        assert_eq!(record.row(&tags()), Some(vec![Value::from("job"), Value::from("blue")]));
    }

    #[test]
    fn concurrent_edits_of_one_field_resolve_by_stamp_then_device() {
        let mut record = RecordState::default();
        record.apply(stamp(1, 1), &SharedOp::Insert(fields(&[("name", "a")])));
        record.apply(stamp(5, 2), &SharedOp::Update(fields(&[("name", "from 2")])));
        record.apply(stamp(5, 3), &SharedOp::Update(fields(&[("name", "from 3")])));
        record.apply(stamp(4, 9), &SharedOp::Update(fields(&[("name", "older")])));
        assert_eq!(record.row(&tags()).unwrap()[0], Value::from("from 3"));
    }

    #[test]
    fn delete_against_concurrent_edit_is_decided_by_stamp() {
        let insert = SharedOp::Insert(fields(&[("name", "a")]));
        let mut edited_before = RecordState::default();
        edited_before.apply(stamp(1, 1), &insert);
        edited_before.apply(stamp(3, 2), &SharedOp::Update(fields(&[("name", "b")])));
        edited_before.apply(stamp(4, 1), &SharedOp::Delete);
        assert_eq!(edited_before.row(&tags()), None);

        let mut edited_after = RecordState::default();
        edited_after.apply(stamp(1, 1), &insert);
        edited_after.apply(stamp(4, 1), &SharedOp::Delete);
        edited_after.apply(stamp(5, 2), &SharedOp::Update(fields(&[("name", "b")])));
        assert_eq!(edited_after.row(&tags()), Some(vec![Value::from("b"), Value::Null]));
    }

    #[test]
    fn an_update_before_its_insert_is_not_shown_until_required_fields_arrive() {
        let mut record = RecordState::default();
        record.apply(stamp(5, 2), &SharedOp::Update(fields(&[("color", "red")])));
        assert!(record.exists());
        assert_eq!(record.row(&tags()), None);
        record.apply(stamp(1, 1), &SharedOp::Insert(fields(&[("name", "a"), ("color", "blue")])));
        assert_eq!(record.row(&tags()), Some(vec![Value::from("a"), Value::from("red")]));
    }

    #[test]
    fn equal_stamps_with_different_values_still_merge_deterministically() {
        let mut left = RecordState::default();
        let mut right = RecordState::default();
        let a = SharedOp::Update(fields(&[("name", "a")]));
        let b = SharedOp::Update(fields(&[("name", "b")]));
        left.apply(stamp(1, 1), &a);
        left.apply(stamp(1, 1), &b);
        right.apply(stamp(1, 1), &b);
        right.apply(stamp(1, 1), &a);
        assert_eq!(left, right);
    }

    #[test]
    fn values_have_a_total_order() {
        let ordered = [
            Value::Null,
            Value::Integer(-1),
            Value::Integer(3),
            Value::Real(f64::NEG_INFINITY),
            Value::Real(0.5),
            Value::Real(f64::NAN),
            Value::from("a"),
            Value::from("b"),
            Value::Blob(vec![]),
            Value::Blob(vec![1]),
        ];
        for (i, a) in ordered.iter().enumerate() {
            for (j, b) in ordered.iter().enumerate() {
                assert_eq!(compare_values(a, b), i.cmp(&j), "{a:?} vs {b:?}");
            }
        }
    }
}

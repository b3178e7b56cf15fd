//! The merge is idempotent, commutative and associative: replicas that see the same changes in any
//! order, with duplicates, end identical.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::collections::{BTreeMap, HashMap};

use lsync_hlc::{DeviceId, Hlc, HlcTime};
use lsync_protocol::{SharedOp, Value};
use lsync_shared_sync::RecordState;
use proptest::prelude::*;

/// A change to one of a few records: (record, stamp, op).
type Change = (u8, Hlc, SharedOp);

fn stamp() -> impl Strategy<Value = Hlc> {
    // Few times and devices, so equal physical times and tie-breaks by device are common.
    (0u64..6, 0u16..2, 0u8..3).prop_map(|(ms, logical, device)| {
        Hlc::new(HlcTime::new(ms, logical).unwrap(), DeviceId::from_bytes([device; 16]))
    })
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (0i64..4).prop_map(Value::Integer),
        prop::sample::select(vec!["", "a", "b", "ab"]).prop_map(Value::from)
    ]
}

fn fields() -> impl Strategy<Value = BTreeMap<String, Value>> {
    prop::collection::btree_map(
        prop::sample::select(vec!["name".to_owned(), "color".to_owned(), "n".to_owned()]),
        value(),
        0..3,
    )
}

fn change() -> impl Strategy<Value = Change> {
    let op = prop_oneof![
        fields().prop_map(SharedOp::Insert),
        fields().prop_map(SharedOp::Update),
        Just(SharedOp::Delete),
    ];
    (0u8..3, stamp(), op)
}

fn replay(changes: &[Change]) -> HashMap<u8, RecordState> {
    let mut records: HashMap<u8, RecordState> = HashMap::new();
    for (record, stamp, op) in changes {
        records.entry(*record).or_default().apply(*stamp, op);
    }
    records
}

proptest! {
    #[test]
    fn replicas_converge_whatever_the_order_and_duplicates(
        changes in prop::collection::vec(change(), 0..40),
        orders in prop::collection::vec(any::<prop::sample::Index>(), 2..4),
        duplicates in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let reference = replay(&changes);
        for seed in orders {
            // A different deterministic shuffle per replica, plus duplicated deliveries.
            let mut delivered: Vec<Change> = changes.clone();
            for index in &duplicates {
                if !changes.is_empty() {
                    delivered.push(changes[index.index(changes.len())].clone());
                }
            }
            let n = delivered.len();
            if n > 1 {
                let mut shift = seed.index(n);
                for i in (1..n).rev() {
                    shift = (shift * 31 + 7) % n;
                    delivered.swap(i, shift % (i + 1));
                }
            }
            prop_assert_eq!(&replay(&delivered), &reference);
        }
    }

    #[test]
    fn merging_states_is_associative_commutative_and_idempotent(
        a in prop::collection::vec(change(), 0..10),
        b in prop::collection::vec(change(), 0..10),
        c in prop::collection::vec(change(), 0..10),
    ) {
        let state = |changes: &[Change]| {
            let mut state = RecordState::default();
            for (_, stamp, op) in changes {
                state.apply(*stamp, op);
            }
            state
        };
        let both: Vec<Change> = a.iter().chain(&b).cloned().collect();
        let all_applied = state(&both);
        let (a, b, c) = (state(&a), state(&b), state(&c));
        let merged = |x: &RecordState, y: &RecordState| {
            let mut out = x.clone();
            out.merge(y);
            out
        };
        prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        prop_assert_eq!(merged(&a, &a), a.clone());
        // Merging two replicas' states equals applying both replicas' changes to one.
        prop_assert_eq!(merged(&a, &b), all_applied);
        prop_assert!(!merged(&a, &b).merge(&b), "merging again changes nothing");
    }
}

//! Round trips, version tolerance and hostile input for the wire encoding.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::collections::BTreeMap;

use lsync_hlc::{DeviceId, Hlc, HlcTime};
use lsync_protocol::*;
use proptest::prelude::*;
use uuid::Uuid;

fn device() -> impl Strategy<Value = DeviceId> {
    any::<[u8; 16]>().prop_map(DeviceId::from_bytes)
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>().prop_map(Uuid::from_bytes)
}

fn time() -> impl Strategy<Value = HlcTime> {
    any::<u64>().prop_map(HlcTime::from_u64)
}

fn hlc() -> impl Strategy<Value = Hlc> {
    (any::<u64>(), device()).prop_map(|(time, device)| Hlc::new(HlcTime::from_u64(time), device))
}

fn name() -> impl Strategy<Value = String> {
    (
        prop::sample::select(b"abcxyz".to_vec()),
        prop::collection::vec(prop::sample::select(b"abz09_".to_vec()), 0..12),
    )
        .prop_map(|(first, rest)| std::iter::once(first).chain(rest).map(char::from).collect())
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..20).prop_map(|chars| chars.into_iter().collect())
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::Integer),
        any::<f64>().prop_map(Value::Real),
        text().prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..20).prop_map(Value::Blob),
    ]
}

fn fields() -> impl Strategy<Value = BTreeMap<String, Value>> {
    prop::collection::btree_map(name(), value(), 0..5)
}

fn columns_and_rows() -> impl Strategy<Value = (Vec<String>, Vec<StateRow>)> {
    prop::collection::btree_set(name(), 0..6).prop_flat_map(|columns| {
        let columns: Vec<String> = columns.into_iter().collect();
        let n_columns = columns.len();
        let op = prop_oneof![
            prop::collection::vec(value(), n_columns).prop_map(StateOp::Upsert),
            Just(StateOp::Delete),
            Just(StateOp::DeleteSubtree),
        ];
        let row = (uuid(), time(), op).prop_map(|(id, version, op)| StateRow { id, version, op });
        (Just(columns), prop::collection::vec(row, 0..8))
    })
}

fn shared_change() -> impl Strategy<Value = SharedChange> {
    let op = prop_oneof![
        fields().prop_map(SharedOp::Insert),
        fields().prop_map(SharedOp::Update),
        Just(SharedOp::Delete),
    ];
    (device(), 1..u64::MAX, time(), name(), uuid(), op).prop_map(
        |(origin, seq, time, model, record, op)| SharedChange {
            origin,
            seq,
            time,
            model,
            record,
            op,
        },
    )
}

fn shared_record() -> impl Strategy<Value = SharedRecord> {
    (
        uuid(),
        prop::option::of((hlc(), any::<bool>()).prop_map(|(stamp, exists)| Stamped(stamp, exists))),
        prop::collection::btree_map(
            name(),
            (hlc(), value()).prop_map(|(s, v)| Stamped(s, v)),
            0..4,
        ),
    )
        .prop_map(|(id, existence, fields)| SharedRecord { id, existence, fields })
}

fn watermarks() -> impl Strategy<Value = Watermarks> {
    (
        uuid(),
        device(),
        any::<u64>(),
        prop::collection::vec((device(), any::<u64>()), 0..4),
        prop::collection::vec((device(), name(), time()), 0..4),
        any::<bool>(),
        prop::collection::vec((device(), name(), time()), 0..3),
    )
        .prop_map(|(library, device, epoch, shared, state, ready, collected)| Watermarks {
            library: LibraryId(library),
            device,
            epoch: Epoch(epoch),
            shared: shared.into_iter().map(|(origin, seq)| OriginSeq { origin, seq }).collect(),
            state: state
                .into_iter()
                .map(|(owner, model, version)| StateMark { owner, model, version })
                .collect(),
            ready,
            resync: false,
            collected: collected
                .into_iter()
                .map(|(owner, model, version)| StateMark { owner, model, version })
                .collect(),
            incarnation: (epoch % 2 == 0).then_some(OriginSeq { origin: device, seq: epoch / 3 }),
            seen: (epoch % 3 == 0).then_some(OriginSeq { origin: device, seq: epoch / 5 }),
            wall_ms: (epoch % 5 == 0).then_some(epoch / 7),
        })
}

fn limit() -> impl Strategy<Value = u32> {
    1..=MAX_PAGE_ROWS
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (uuid(), device(), any::<u64>(), text()).prop_map(|(library, device, epoch, name)| {
            Message::Hello(Hello { library: LibraryId(library), device, epoch: Epoch(epoch), name })
        }),
        (device(), name(), columns_and_rows()).prop_map(|(owner, model, (columns, rows))| {
            Message::StateBatch(StateBatch { owner, model, columns, rows, since: None })
        }),
        prop::collection::vec(shared_change(), 0..6)
            .prop_map(|changes| Message::SharedBatch(SharedBatch { changes })),
        watermarks()
            .prop_map(|marks| Message::Ack(Ack { shared: marks.shared, state: marks.state })),
        watermarks().prop_map(Message::WatermarksRequest),
        watermarks().prop_map(Message::WatermarksResponse),
        (watermarks(), limit()).prop_map(|(marks, limit)| {
            Message::SharedCatchUpRequest(SharedCatchUpRequest { after: marks.shared, limit })
        }),
        (prop::collection::vec(shared_change(), 0..6), any::<bool>(), watermarks()).prop_map(
            |(changes, complete, marks)| Message::SharedCatchUpResponse(SharedCatchUpResponse {
                changes,
                complete,
                pruned: marks.shared
            })
        ),
        (device(), name(), prop::option::of(time()), prop::option::of((time(), uuid())), limit())
            .prop_map(|(owner, model, since, after, limit)| {
                Message::StateCatchUpRequest(StateCatchUpRequest {
                    owner,
                    model,
                    since,
                    after: after.map(|(version, id)| StateCursor { version, id }),
                    limit,
                })
            }),
        (
            device(),
            name(),
            columns_and_rows(),
            any::<bool>(),
            any::<u64>(),
            prop::option::of(time())
        )
            .prop_map(
                |(owner, model, (columns, rows), more, estimated_total, collected)| {
                    Message::StatePage(StatePage {
                        owner,
                        model,
                        columns,
                        rows,
                        more,
                        estimated_total,
                        collected,
                    })
                }
            ),
        (device(), name(), prop::option::of(uuid()), limit()).prop_map(
            |(owner, model, after, limit)| Message::BackfillRequest(BackfillRequest {
                owner,
                model,
                after,
                limit
            })
        ),
        (name(), prop::option::of(uuid()), limit()).prop_map(|(model, after, limit)| {
            Message::SharedSnapshotRequest(SharedSnapshotRequest { model, after, limit })
        }),
        (name(), prop::collection::vec(shared_record(), 0..5), any::<bool>(), any::<u64>())
            .prop_map(|(model, records, more, estimated_total)| {
                Message::SharedSnapshotPage(SharedSnapshotPage {
                    model,
                    records,
                    more,
                    estimated_total,
                })
            }),
        (any::<u64>(), prop::option::of(watermarks()))
            .prop_map(|(nonce, watermarks)| Message::Heartbeat(Heartbeat { nonce, watermarks })),
        (any::<u64>(), prop::option::of(watermarks())).prop_map(|(nonce, watermarks)| {
            Message::HeartbeatAck(HeartbeatAck { nonce, watermarks })
        }),
        (any::<u16>(), text()).prop_map(|(code, message)| Message::Error(ErrorMessage {
            code: ErrorCode::from_u16(code),
            message
        })),
        (uuid(), any::<[u8; 32]>(), device(), text()).prop_map(
            |(invitation, proof, device, name)| {
                Message::PairRequest(PairRequest {
                    invitation,
                    proof: proof.to_vec(),
                    device,
                    name,
                })
            }
        ),
        (uuid(), device(), text()).prop_map(|(library, device, name)| {
            Message::PairResponse(PairResponse { library: LibraryId(library), device, name })
        }),
    ]
}

proptest! {
    /// Every valid message survives encode then decode unchanged.
    #[test]
    fn messages_round_trip(message in message()) {
        let bytes = encode(&message).unwrap();
        prop_assert_eq!(decode(&bytes).unwrap(), message);
    }

    /// Arbitrary bytes decode to an error or a valid message, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(message) = decode(&bytes) {
            prop_assert!(message.validate().is_ok());
        }
    }

    /// Valid encodings with bytes flipped, cut or inserted are errors or valid messages.
    #[test]
    fn mutated_messages_never_panic(
        message in message(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = encode(&message).unwrap();
        for (index, byte, action) in edits {
            if bytes.is_empty() {
                break;
            }
            let at = index.index(bytes.len());
            match action {
                0 => bytes[at] = byte,
                1 => bytes.truncate(at),
                _ => bytes.insert(at, byte),
            }
        }
        if let Ok(message) = decode(&bytes) {
            prop_assert!(message.validate().is_ok());
        }
    }
}

fn sample_batch() -> Message {
    let owner = DeviceId::from_bytes([1; 16]);
    let version = HlcTime::new(1_700_000_000_000, 0).unwrap();
    Message::StateBatch(StateBatch {
        owner,
        model: "entries".into(),
        columns: vec!["name".into(), "size".into()],
        rows: vec![StateRow {
            id: Uuid::from_bytes([2; 16]),
            version,
            op: StateOp::Upsert(vec![Value::Text("a.txt".into()), Value::Integer(10)]),
        }],
        since: Some(HlcTime::new(1_600_000_000_000, 3).unwrap()),
    })
}

#[test]
fn unknown_kinds_are_reported_as_such() {
    let mut bytes = Vec::new();
    rmp::encode::write_array_len(&mut bytes, 2).unwrap();
    rmp::encode::write_uint(&mut bytes, 999).unwrap();
    rmp::encode::write_map_len(&mut bytes, 0).unwrap();
    let error = decode(&bytes).unwrap_err();
    assert_eq!(error, DecodeError::UnknownKind(999));
    assert_eq!(error.code(), ErrorCode::Unsupported);
}

#[test]
fn later_versions_may_add_fields_and_envelope_elements() {
    // A Hello from a "newer" peer: an extra map key and a third envelope element.
    let mut bytes = Vec::new();
    rmp::encode::write_array_len(&mut bytes, 3).unwrap();
    rmp::encode::write_uint(&mut bytes, 1).unwrap();
    rmp::encode::write_map_len(&mut bytes, 4).unwrap();
    rmp::encode::write_str(&mut bytes, "library").unwrap();
    rmp::encode::write_bin(&mut bytes, &[3; 16]).unwrap();
    rmp::encode::write_str(&mut bytes, "device").unwrap();
    rmp::encode::write_bin(&mut bytes, &[4; 16]).unwrap();
    rmp::encode::write_str(&mut bytes, "epoch").unwrap();
    rmp::encode::write_uint(&mut bytes, 7).unwrap();
    rmp::encode::write_str(&mut bytes, "capabilities").unwrap();
    rmp::encode::write_array_len(&mut bytes, 1).unwrap();
    rmp::encode::write_str(&mut bytes, "zstd").unwrap();
    rmp::encode::write_nil(&mut bytes).unwrap();
    let Message::Hello(hello) = decode(&bytes).unwrap() else { panic!("not a Hello") };
    assert_eq!(hello.epoch, Epoch(7));
    assert_eq!(hello.name, "", "a field missing from an older peer takes its default");
}

#[test]
fn rows_tolerate_trailing_elements() {
    let version = HlcTime::new(5, 0).unwrap();
    let mut bytes = Vec::new();
    rmp::encode::write_array_len(&mut bytes, 5).unwrap();
    rmp::encode::write_bin(&mut bytes, &[9; 16]).unwrap();
    rmp::encode::write_uint(&mut bytes, version.as_u64()).unwrap();
    rmp::encode::write_uint(&mut bytes, 1).unwrap(); // delete
    rmp::encode::write_str(&mut bytes, "a future field").unwrap();
    rmp::encode::write_uint(&mut bytes, 42).unwrap();
    let row: StateRow = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(row, StateRow { id: Uuid::from_bytes([9; 16]), version, op: StateOp::Delete });
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let bytes = vec![0xc0; MAX_MESSAGE_BYTES + 1];
    assert_eq!(
        decode(&bytes),
        Err(DecodeError::TooLarge { len: MAX_MESSAGE_BYTES + 1, max: MAX_MESSAGE_BYTES })
    );
}

#[test]
fn declared_lengths_beyond_the_input_are_errors_without_allocation() {
    // A StateBatch whose rows array claims 4 billion elements, and a string claiming 4 GiB.
    for body in [
        vec![0x84, 0xa4, b'r', b'o', b'w', b's', 0xdd, 0xff, 0xff, 0xff, 0xff],
        vec![0x81, 0xa5, b'm', b'o', b'd', b'e', b'l', 0xdb, 0xff, 0xff, 0xff, 0xff, b'x'],
    ] {
        let mut bytes = vec![0x92, 0x02];
        bytes.extend(body);
        assert!(matches!(decode(&bytes), Err(DecodeError::Malformed(_))));
    }
}

#[test]
fn invalid_messages_are_refused_on_both_sides() {
    let Message::StateBatch(mut batch) = sample_batch() else { unreachable!() };
    batch.rows[0].op = StateOp::Upsert(vec![Value::Null]);
    let message = Message::StateBatch(batch.clone());
    assert!(matches!(encode(&message), Err(EncodeError::Invalid { kind: "StateBatch", .. })));

    // Forge the same message past the encoder's check: the decoder refuses it too.
    let mut bytes = vec![0x92, 0x02];
    rmp_serde::encode::write_named(&mut bytes, &batch).unwrap();
    assert!(matches!(decode(&bytes), Err(DecodeError::Invalid { kind: "StateBatch", .. })));

    for bad_model in ["", "Entries", "1entries", "entries;drop", &"a".repeat(MAX_NAME_BYTES + 1)] {
        let Message::StateBatch(mut batch) = sample_batch() else { unreachable!() };
        batch.model = bad_model.to_owned();
        assert!(encode(&Message::StateBatch(batch)).is_err(), "{bad_model:?} accepted");
    }
}

#[test]
fn shared_changes_are_numbered_from_one() {
    let origin = DeviceId::from_bytes([1; 16]);
    let change = SharedChange {
        origin,
        seq: 1,
        time: HlcTime::new(5, 0).unwrap(),
        model: "tags".into(),
        record: Uuid::from_bytes([2; 16]),
        op: SharedOp::Delete,
    };
    let batch = |change: SharedChange| Message::SharedBatch(SharedBatch { changes: vec![change] });
    assert!(encode(&batch(change.clone())).is_ok());
    assert_eq!(change.hlc().device(), origin);
    assert!(encode(&batch(SharedChange { seq: 0, ..change })).is_err());
}

#[test]
fn page_limits_are_bounded() {
    let request = |limit| {
        Message::BackfillRequest(BackfillRequest {
            owner: DeviceId::from_bytes([1; 16]),
            model: "entries".into(),
            after: None,
            limit,
        })
    };
    assert!(encode(&request(MAX_PAGE_ROWS)).is_ok());
    assert!(encode(&request(0)).is_err());
    assert!(encode(&request(MAX_PAGE_ROWS + 1)).is_err());
}

#[test]
fn an_entry_row_costs_little_more_than_its_values() {
    // The wire-efficiency budget: a row's framing (id, version, op) beside its values.
    let Message::StateBatch(batch) = sample_batch() else { unreachable!() };
    let row_bytes = rmp_serde::to_vec(&batch.rows[0]).unwrap().len();
    let StateOp::Upsert(values) = &batch.rows[0].op else { unreachable!() };
    let values_bytes = rmp_serde::to_vec(values).unwrap().len();
    // 1 (array) + 18 (id) + 9 (version) + 1 (op) = 29 bytes of framing.
    assert_eq!(row_bytes, values_bytes + 29);
}

//! Shared data on real library files: local writes, receiving, parking, snapshots, and
//! convergence of several devices.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::collections::BTreeMap;
use std::sync::Arc;

use lsync_hlc::{DeviceId, HlcConfig, HlcGenerator, ManualClock, Resume};
use lsync_protocol::{LibraryId, SharedChange, Value};
use lsync_shared_sync::SharedError;
use lsync_shared_sync::sql::{
    Edit, apply_snapshot, parked_count, receive, snapshot_page, write_local,
};
use lsync_store::{Database, Registry, StoreError, StoreOptions, dump_tables, reference_registry};
use proptest::prelude::*;
use uuid::Uuid;

struct Device {
    db: Database,
    clock: HlcGenerator<Arc<ManualClock>>,
    wall: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

impl Device {
    async fn new(byte: u8) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let device = DeviceId::from_bytes([byte; 16]);
        let db = Database::create(
            &dir.path().join("library.db"),
            Arc::new(reference_registry().unwrap()),
            LibraryId(Uuid::from_bytes([7; 16])),
            device,
            &StoreOptions::default(),
        )
        .await
        .unwrap();
        let wall = Arc::new(ManualClock::new(1_700_000_000_000));
        let clock =
            HlcGenerator::new(device, wall.clone(), HlcConfig::default(), Resume::FirstStart);
        Self { db, clock, wall, _dir: dir }
    }

    async fn write(&self, edits: Vec<Edit>) -> Result<Vec<SharedChange>, SharedError> {
        let registry = self.db.registry().clone();
        self.db
            .write(async |conn| {
                Ok::<_, SharedError>(
                    write_local(conn, &registry, &self.clock, self.clock.device(), edits, 0)
                        .await?
                        .0,
                )
            })
            .await
    }

    async fn receive(&self, changes: &[SharedChange]) -> lsync_shared_sync::sql::Received {
        let registry = self.db.registry().clone();
        self.db
            .write(async |conn| receive(conn, &registry, &self.clock, changes, 1_000, 0).await)
            .await
            .unwrap()
    }

    async fn tables(&self) -> BTreeMap<String, Vec<Vec<Value>>> {
        dump_tables(self.db.reader(), self.db.registry()).await.unwrap()
    }

    async fn parked(&self) -> u64 {
        self.db.write(async |conn| parked_count(conn).await).await.unwrap()
    }

    /// Inserts an entry row directly, standing in for device-owned data.
    async fn add_entry(&self, id: Uuid) {
        self.db
            .write(async |conn| {
                sqlx::query(
                    "INSERT INTO entries (id, owner, version, location_id, parent_id, name, kind, size, modified_at)
                     VALUES (?1, ?2, 1, ?1, NULL, 'file', 0, 0, 0)",
                )
                .bind(id.as_bytes().as_slice())
                // Device-owned rows come from their owner, the same everywhere.
                .bind([9u8; 16].as_slice())
                .execute(&mut *conn)
                .await?;
                let registry = self.db.registry().clone();
                lsync_shared_sync::sql::reproject_dependents(conn, &registry, "entries", &[id], false, 0).await?;
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
    }
}

fn text(value: &str) -> Value {
    Value::from(value)
}

fn fields(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs.iter().map(|(name, value)| ((*name).to_owned(), value.clone())).collect()
}

fn tag(id: Uuid, name: &str) -> Edit {
    Edit::Insert { model: "tags".into(), id, fields: fields(&[("name", text(name))]) }
}

fn assignment(tag: Uuid, entry: Uuid) -> Edit {
    Edit::Insert {
        model: "tag_assignments".into(),
        id: Registry::membership_id("tag_assignments", tag, entry),
        fields: fields(&[
            ("tag_id", Value::Blob(tag.as_bytes().to_vec())),
            ("entry_id", Value::Blob(entry.as_bytes().to_vec())),
        ]),
    }
}

#[tokio::test]
async fn a_local_write_is_shown_logged_and_numbered() {
    let a = Device::new(1).await;
    let id = Uuid::now_v7();
    let changes = a.write(vec![tag(id, "work")]).await.unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].seq, 1);
    assert_eq!(
        a.tables().await["tags"],
        [vec![Value::Blob(id.as_bytes().to_vec()), text("work"), Value::Null]]
    );
    let more = a
        .write(vec![Edit::Update {
            model: "tags".into(),
            id,
            fields: fields(&[("color", text("red"))]),
        }])
        .await
        .unwrap();
    assert_eq!(more[0].seq, 2);
    let log_len = a.db.write(async |conn| lsync_peer_log::sql::len(conn).await).await.unwrap();
    assert_eq!(log_len, 2);
}

#[tokio::test]
async fn invalid_local_edits_are_refused_and_leave_nothing_behind() {
    let a = Device::new(1).await;
    let id = Uuid::now_v7();
    let missing = Edit::Update { model: "tags".into(), id, fields: fields(&[("name", text("x"))]) };
    assert!(matches!(a.write(vec![missing]).await, Err(SharedError::NotFound { .. })));
    let no_name =
        Edit::Insert { model: "tags".into(), id, fields: fields(&[("color", text("red"))]) };
    assert!(matches!(a.write(vec![no_name]).await, Err(SharedError::Invalid(_))));
    let bad_type =
        Edit::Insert { model: "tags".into(), id, fields: fields(&[("name", Value::Integer(3))]) };
    assert!(matches!(a.write(vec![bad_type]).await, Err(SharedError::Invalid(_))));
    let device_owned = Edit::Insert { model: "entries".into(), id, fields: BTreeMap::new() };
    assert!(matches!(a.write(vec![device_owned]).await, Err(SharedError::Invalid(_))));
    // A batch with one bad edit writes nothing at all.
    let result = a
        .write(vec![tag(id, "ok"), Edit::Delete { model: "tags".into(), id: Uuid::now_v7() }])
        .await;
    assert!(result.is_err());
    assert!(a.tables().await["tags"].is_empty());
    a.write(vec![tag(id, "ok")]).await.unwrap();
    assert!(matches!(
        a.write(vec![tag(id, "again")]).await,
        Err(SharedError::AlreadyExists { .. })
    ));
}

#[tokio::test]
async fn concurrent_edits_of_different_fields_survive_on_both_devices() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let id = Uuid::now_v7();
    let created = a.write(vec![tag(id, "work")]).await.unwrap();
    b.receive(&created).await;
    a.wall.advance(10);
    b.wall.advance(10);
    let from_a = a
        .write(vec![Edit::Update {
            model: "tags".into(),
            id,
            fields: fields(&[("name", text("job"))]),
        }])
        .await
        .unwrap();
    let from_b = b
        .write(vec![Edit::Update {
            model: "tags".into(),
            id,
            fields: fields(&[("color", text("red"))]),
        }])
        .await
        .unwrap();
    a.receive(&from_b).await;
    b.receive(&from_a).await;
    let tables = a.tables().await;
    assert_eq!(
        tables["tags"],
        [vec![Value::Blob(id.as_bytes().to_vec()), text("job"), text("red")]]
    );
    assert_eq!(tables, b.tables().await);
}

#[tokio::test]
async fn concurrent_edits_of_the_same_field_resolve_by_stamp_then_device() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let id = Uuid::now_v7();
    let created = a.write(vec![tag(id, "work")]).await.unwrap();
    b.receive(&created).await;
    a.wall.advance(5);
    b.wall.advance(5);
    let rename = |name: &str| Edit::Update {
        model: "tags".into(),
        id,
        fields: fields(&[("name", text(name))]),
    };
    let from_a = a.write(vec![rename("a")]).await.unwrap();
    let from_b = b.write(vec![rename("b")]).await.unwrap();
    assert_eq!(from_a[0].time, from_b[0].time, "same wall time and counter: a true tie");
    a.receive(&from_b).await;
    b.receive(&from_a).await;
    // The device id breaks the tie: device 2 > device 1.
    assert_eq!(a.tables().await["tags"][0][1], text("b"));
    assert_eq!(a.tables().await, b.tables().await);

    // Later in HLC order wins even against a larger device id.
    a.wall.advance(5);
    let later = a.write(vec![rename("later")]).await.unwrap();
    b.receive(&later).await;
    assert_eq!(b.tables().await["tags"][0][1], text("later"));
}

#[tokio::test]
async fn receiving_moves_the_clock_past_the_senders_stamps_within_the_drift_bound() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    a.wall.advance(30_000);
    let ahead = a.write(vec![tag(Uuid::now_v7(), "from the future")]).await.unwrap();
    let received = b.receive(&ahead).await;
    assert_eq!(received.skewed, 0);
    assert!(b.clock.last() > ahead[0].hlc());

    // Beyond the bound (60 s): applied, reported, and b's clock is not dragged along.
    a.wall.advance(120_000);
    let too_far = a.write(vec![tag(Uuid::now_v7(), "way ahead")]).await.unwrap();
    let before = b.clock.last();
    let received = b.receive(&too_far).await;
    assert_eq!(received.skewed, 1);
    assert_eq!(b.clock.last(), before);
    assert_eq!(b.tables().await["tags"].len(), 2);
}

#[tokio::test]
async fn a_change_whose_target_has_not_arrived_is_parked_then_shown() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let (tag_id, entry) = (Uuid::now_v7(), Uuid::now_v7());
    a.add_entry(entry).await;
    let created = a.write(vec![tag(tag_id, "work")]).await.unwrap();
    let assigned = a.write(vec![assignment(tag_id, entry)]).await.unwrap();
    assert_eq!(a.tables().await["tag_assignments"].len(), 1);

    // b gets the assignment first: neither the tag nor the entry is there.
    let received = b.receive(&assigned).await;
    assert_eq!(received.projection.parked.len(), 1);
    assert_eq!(b.parked().await, 1);
    assert!(b.tables().await["tag_assignments"].is_empty());
    // The tag arrives: still waiting for the entry.
    b.receive(&created).await;
    assert_eq!(b.parked().await, 1);
    // The entry arrives: shown.
    b.add_entry(entry).await;
    assert_eq!(b.parked().await, 0);
    assert_eq!(b.tables().await["tag_assignments"], a.tables().await["tag_assignments"]);
}

#[tokio::test]
async fn parking_is_bounded_and_a_refused_batch_leaves_nothing_behind() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let tag_id = Uuid::now_v7();
    let mut assignments = Vec::new();
    for _ in 0..3 {
        let entry = Uuid::now_v7();
        a.add_entry(entry).await;
        assignments.push(assignment(tag_id, entry));
    }
    a.write(vec![tag(tag_id, "work")]).await.unwrap();
    let changes = a.write(assignments).await.unwrap();
    let registry = b.db.registry().clone();
    let result =
        b.db.write(async |conn| receive(conn, &registry, &b.clock, &changes, 2, 0).await).await;
    assert!(matches!(result, Err(SharedError::ParkedOverflow { parked: 3, max: 2 })));
    assert_eq!(b.parked().await, 0);
    let logged = b.db.write(async |conn| lsync_peer_log::sql::len(conn).await).await.unwrap();
    assert_eq!(logged, 0, "the refused batch was rolled back, to be sent again");
}

#[tokio::test]
async fn deleting_a_tag_hides_its_assignments_and_membership_can_be_re_added() {
    let a = Device::new(1).await;
    let (tag_id, entry) = (Uuid::now_v7(), Uuid::now_v7());
    a.add_entry(entry).await;
    a.write(vec![tag(tag_id, "work"), assignment(tag_id, entry)]).await.unwrap();
    let pair = Registry::membership_id("tag_assignments", tag_id, entry);
    a.write(vec![Edit::Delete { model: "tag_assignments".into(), id: pair }]).await.unwrap();
    assert!(a.tables().await["tag_assignments"].is_empty());
    a.write(vec![assignment(tag_id, entry)]).await.unwrap();
    assert_eq!(a.tables().await["tag_assignments"].len(), 1);
    a.write(vec![Edit::Delete { model: "tags".into(), id: tag_id }]).await.unwrap();
    assert!(a.tables().await["tag_assignments"].is_empty());
}

#[tokio::test]
async fn invalid_received_changes_are_logged_and_reported_but_not_applied() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let mut changes =
        a.write(vec![tag(Uuid::now_v7(), "x"), tag(Uuid::now_v7(), "y")]).await.unwrap();
    changes[0].model = "no_such_model".into();
    let received = b.receive(&changes).await;
    assert_eq!(received.fresh, 2);
    assert_eq!(received.rejected.len(), 1);
    assert_eq!(received.advanced[0].seq, 2, "the watermark does not stall on the bad change");
    assert_eq!(b.tables().await["tags"].len(), 1);
}

#[tokio::test]
async fn a_snapshot_reproduces_the_shared_tables_on_a_new_device() {
    let (a, c) = (Device::new(1).await, Device::new(3).await);
    let entry = Uuid::now_v7();
    a.add_entry(entry).await;
    c.add_entry(entry).await;
    let mut edits = Vec::new();
    for index in 0..25 {
        let id = Uuid::now_v7();
        edits.push(tag(id, &format!("tag {index}")));
        edits.push(assignment(id, entry));
    }
    a.write(edits).await.unwrap();
    let registry = c.db.registry().clone();
    for model in ["tags", "tag_assignments"] {
        let mut after = None;
        loop {
            let (records, more) =
                a.db.write(async |conn| snapshot_page(conn, model, after, 7).await).await.unwrap();
            after = records.last().map(|record| record.id);
            c.db.write(async |conn| apply_snapshot(conn, &registry, model, &records, 0).await)
                .await
                .unwrap();
            if !more {
                break;
            }
        }
    }
    let (expected, got) = (a.tables().await, c.tables().await);
    assert_eq!(got["tags"], expected["tags"]);
    assert_eq!(got["tag_assignments"], expected["tag_assignments"]);
}

/// One device's edit in the random workload.
#[derive(Debug, Clone)]
enum Action {
    Create(usize, u8),
    Rename(usize, u8),
    Recolor(usize, u8),
    Delete(usize),
    Assign(usize),
    Unassign(usize),
}

fn action() -> impl Strategy<Value = (usize, Action)> {
    let record = 0usize..4;
    let action = prop_oneof![
        (record.clone(), any::<u8>()).prop_map(|(r, n)| Action::Create(r, n)),
        (record.clone(), any::<u8>()).prop_map(|(r, n)| Action::Rename(r, n)),
        (record.clone(), any::<u8>()).prop_map(|(r, n)| Action::Recolor(r, n)),
        record.clone().prop_map(Action::Delete),
        record.clone().prop_map(Action::Assign),
        record.prop_map(Action::Unassign),
    ];
    (0usize..3, action)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Three devices edit the same few tags and assignments concurrently, seeing each other's
    /// changes late, in shuffled batches, with duplicates; in the end every device has every
    /// change and all hold byte-identical tables.
    #[test]
    fn three_devices_converge(actions in prop::collection::vec(action(), 1..40), shuffle in any::<u64>()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let devices = [Device::new(1).await, Device::new(2).await, Device::new(3).await];
            let ids: Vec<Uuid> = (0..4).map(|index| Uuid::from_u128(index + 1)).collect();
            let entry = Uuid::from_u128(99);
            for device in &devices {
                device.add_entry(entry).await;
            }
            let mut all_changes: Vec<SharedChange> = Vec::new();
            for (step, (who, action)) in actions.iter().enumerate() {
                let device = &devices[*who];
                device.wall.advance(u64::try_from(step % 3).unwrap());
                let id = |record: &usize| ids[*record];
                let edit = match action {
                    Action::Create(r, n) => tag(id(r), &format!("t{n}")),
                    Action::Rename(r, n) => Edit::Update { model: "tags".into(), id: id(r), fields: fields(&[("name", text(&format!("r{n}")))]) },
                    Action::Recolor(r, n) => Edit::Update { model: "tags".into(), id: id(r), fields: fields(&[("color", text(&format!("c{n}")))]) },
                    Action::Delete(r) => Edit::Delete { model: "tags".into(), id: id(r) },
                    Action::Assign(r) => assignment(id(r), entry),
                    Action::Unassign(r) => Edit::Delete { model: "tag_assignments".into(), id: Registry::membership_id("tag_assignments", id(r), entry) },
                };
                // Edits a device cannot make in its current view are refused, as for a real app.
                if let Ok(changes) = device.write(vec![edit]).await {
                    // Sometimes the others hear about it right away.
                    if step % 2 == 0 {
                        for other in devices.iter().filter(|other| other.clock.device() != device.clock.device()) {
                            other.receive(&changes).await;
                        }
                    }
                    all_changes.extend(changes);
                }
            }
            // Deliver everything to everyone, in a per-device shuffled order, in batches of 3,
            // with every change delivered twice.
            for (index, device) in devices.iter().enumerate() {
                let mut delivery: Vec<SharedChange> = all_changes.iter().chain(&all_changes).cloned().collect();
                let mut state = shuffle ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                for i in (1..delivery.len()).rev() {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    delivery.swap(i, usize::try_from(state >> 33).unwrap() % (i + 1));
                }
                for batch in delivery.chunks(3) {
                    device.receive(batch).await;
                }
            }
            let reference = devices[0].tables().await;
            for device in &devices[1..] {
                assert_eq!(device.tables().await, reference);
            }
        });
    }
}

//! Device-owned rows on real library files: local writes, applying received rows in any order,
//! tombstones and subtree deletes, catch-up and backfill pages, and convergence.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::collections::BTreeMap;
use std::sync::Arc;

use lsync_hlc::{DeviceId, HlcConfig, HlcGenerator, HlcTime, ManualClock, Resume};
use lsync_protocol::{LibraryId, StateCursor, StateMark, StateRow, Value};
use lsync_state_sync::sql::{
    Applied, RowEdit, apply_rows, collect_tombstones, delete_missing, rows_by_key, rows_since,
    tombstone_groups, write_local,
};
use lsync_state_sync::{StateError, plan_tombstone_gc};
use lsync_store::{
    Database, ENTRY_KIND_DIRECTORY, ENTRY_KIND_FILE, StoreOptions, dump_tables, reference_registry,
};
use proptest::prelude::*;
use uuid::Uuid;

const LOCATION: Uuid = Uuid::from_u128(0x10c);

/// What a live push of one local write carries.
#[derive(Debug, Clone)]
struct Batch {
    since: Option<HlcTime>,
    rows: Vec<StateRow>,
}

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

    fn id(&self) -> DeviceId {
        self.clock.device()
    }

    /// This device's mark for `owner`'s entries.
    async fn mark(&self, owner: DeviceId) -> Option<HlcTime> {
        let progress = self
            .db
            .write(async |conn| lsync_watermark::sql::load_state_progress(conn).await)
            .await
            .unwrap();
        progress.get(owner, "entries")
    }

    async fn raise_mark(&self, owner: DeviceId, version: HlcTime) {
        let mark = StateMark { owner, model: "entries".into(), version };
        self.db
            .write(async |conn| lsync_watermark::sql::raise_state_progress(conn, &[mark]).await)
            .await
            .unwrap();
    }

    /// Writes entries as their owner; returns the batch a live push would carry.
    async fn write(&self, edits: Vec<RowEdit>) -> Result<Batch, StateError> {
        self.wall.advance(1);
        let since = self.mark(self.id()).await;
        let registry = self.db.registry().clone();
        let rows = self
            .db
            .write(async |conn| {
                Ok::<_, StateError>(
                    write_local(conn, &registry, &self.clock, "entries", edits, 0).await?.0,
                )
            })
            .await?;
        Ok(Batch { since, rows })
    }

    /// Applies rows without claiming to hold everything before them.
    async fn receive(&self, owner: DeviceId, rows: Vec<StateRow>) -> Applied {
        self.apply(owner, rows, false).await
    }

    async fn apply(&self, owner: DeviceId, rows: Vec<StateRow>, complete: bool) -> Applied {
        let registry = self.db.registry().clone();
        let columns = registry.model("entries").unwrap().column_names();
        self.db
            .write(async |conn| {
                apply_rows(conn, &registry, owner, "entries", &columns, rows, complete, 0).await
            })
            .await
            .unwrap()
    }

    /// Applies a live batch as the engine does: complete if it starts at or below this device's
    /// mark, and then the mark moves to the batch's newest version.
    async fn deliver(&self, owner: DeviceId, batch: &Batch) -> Applied {
        let complete = batch.since <= self.mark(owner).await;
        let applied = self.apply(owner, batch.rows.clone(), complete).await;
        if complete && let Some(newest) = applied.newest {
            self.raise_mark(owner, newest).await;
        }
        applied
    }

    /// Catches up on `owner`'s entries from `server`, in pages after this device's mark.
    async fn catch_up_from(&self, server: &Device, owner: DeviceId) {
        let since = self.mark(owner).await;
        let registry = server.db.registry().clone();
        let mut after: Option<StateCursor> = None;
        loop {
            let (_, rows, more) = server
                .db
                .write(async |conn| {
                    rows_since(conn, &registry, owner, "entries", since, after, 5).await
                })
                .await
                .unwrap();
            after = rows.last().map(|row| StateCursor { version: row.version, id: row.id });
            self.apply(owner, rows, true).await;
            if !more {
                break;
            }
        }
        if let Some(mark) = server.mark(owner).await {
            self.raise_mark(owner, mark).await;
        }
    }

    async fn entries(&self) -> Vec<Vec<Value>> {
        dump_tables(self.db.reader(), self.db.registry()).await.unwrap().remove("entries").unwrap()
    }
}

fn entry(parent: Option<Uuid>, name: &str, kind: i64) -> Vec<Value> {
    vec![
        Value::Blob(LOCATION.as_bytes().to_vec()),
        parent.map_or(Value::Null, |p| Value::Blob(p.as_bytes().to_vec())),
        Value::from(name),
        Value::Integer(kind),
        Value::Integer(0),
        Value::Integer(0),
    ]
}

fn dir(id: Uuid, parent: Option<Uuid>, name: &str) -> RowEdit {
    RowEdit::Upsert { id, values: entry(parent, name, ENTRY_KIND_DIRECTORY) }
}

fn file(id: Uuid, parent: Uuid, name: &str) -> RowEdit {
    RowEdit::Upsert { id, values: entry(Some(parent), name, ENTRY_KIND_FILE) }
}

#[tokio::test]
async fn received_rows_reproduce_the_owners_tables_and_replays_change_nothing() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let root = Uuid::now_v7();
    let mut edits = vec![dir(root, None, "root")];
    for index in 0..1_200 {
        edits.push(file(Uuid::now_v7(), root, &format!("file {index}")));
    }
    let rows = a.write(edits).await.unwrap().rows;
    let applied = b.receive(a.id(), rows.clone()).await;
    assert_eq!(applied.upserted.len(), 1_201);
    assert_eq!(b.entries().await, a.entries().await);
    let replay = b.receive(a.id(), rows).await;
    assert_eq!((replay.upserted.len(), replay.stale), (0, 1_201));
    assert_eq!(b.entries().await, a.entries().await);
}

#[tokio::test]
async fn older_versions_never_overwrite_newer_ones() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let id = Uuid::now_v7();
    let first = a.write(vec![dir(id, None, "old name")]).await.unwrap().rows;
    let second = a.write(vec![dir(id, None, "new name")]).await.unwrap().rows;
    b.receive(a.id(), second).await;
    let late = b.receive(a.id(), first).await;
    assert_eq!(late.stale, 1);
    assert_eq!(b.entries().await, a.entries().await);
}

#[tokio::test]
async fn rows_claimed_by_another_device_are_rejected_and_counted() {
    let (a, b, c) = (Device::new(1).await, Device::new(2).await, Device::new(3).await);
    let id = Uuid::now_v7();
    let rows = a.write(vec![dir(id, None, "mine")]).await.unwrap().rows;
    b.receive(a.id(), rows).await;
    // c claims a's row with a newer version.
    c.wall.advance(10_000);
    let forged = c.write(vec![dir(id, None, "stolen")]).await.unwrap().rows;
    let applied = b.receive(c.id(), forged).await;
    assert_eq!(applied.rejected, 1);
    assert_eq!(b.entries().await, a.entries().await);
    // And b itself may not write a's row.
    let result = b.write(vec![dir(id, None, "also mine?")]).await;
    assert!(matches!(result, Err(StateError::NotOwner { owner, .. }) if owner == a.id()));
}

#[tokio::test]
async fn a_comparison_deletes_rows_the_peer_lacks_or_holds_only_older_up_to_its_mark() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let (kept, gone, older, newer) =
        (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    a.write(vec![dir(older, None, "o")]).await.unwrap();
    let deleted = a.write(vec![RowEdit::Delete { id: older }]).await.unwrap().rows;
    let rows = a
        .write(vec![dir(kept, None, "k"), dir(gone, None, "g"), dir(older, None, "o2")])
        .await
        .unwrap()
        .rows;
    let peer_mark = rows.iter().map(|row| row.version).max().unwrap();
    let late = a.write(vec![dir(newer, None, "n")]).await.unwrap().rows;
    b.receive(a.id(), rows.clone()).await;
    b.receive(a.id(), late).await;
    // The peer, at `peer_mark`, holds `kept` as written, not `gone` (deleted there, tombstone
    // collected), and `older` only as its first delete: it saw the write again and forgot a
    // later delete. `newer` lies above its mark: not seen yet, it stays.
    let version =
        |rows: &[StateRow], id: Uuid| rows.iter().find(|row| row.id == id).unwrap().version;
    let keep = [(kept, version(&rows, kept)), (older, version(&deleted, older))];
    let registry = b.db.registry().clone();
    let owner = a.id();
    let (missing, _) =
        b.db.write(async |conn| {
            delete_missing(conn, &registry, owner, "entries", None, None, peer_mark, &keep, 0).await
        })
        .await
        .unwrap();
    let mut missing = missing;
    missing.sort();
    let mut expected = vec![gone, older];
    expected.sort();
    assert_eq!(missing, expected);
    assert_eq!(b.entries().await.len(), 2, "kept and newer");
}

#[tokio::test]
async fn a_delete_is_never_undone_by_a_late_upsert() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let id = Uuid::now_v7();
    let created = a.write(vec![dir(id, None, "x")]).await.unwrap().rows;
    let deleted = a.write(vec![RowEdit::Delete { id }]).await.unwrap().rows;
    b.receive(a.id(), deleted).await;
    let late = b.receive(a.id(), created).await;
    assert_eq!(late.stale, 1);
    assert!(b.entries().await.is_empty());
    assert_eq!(b.entries().await, a.entries().await);
}

#[tokio::test]
async fn deleting_a_directory_removes_its_subtree_everywhere_with_one_tombstone() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let (root, docs, deep) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let mut edits =
        vec![dir(root, None, "root"), dir(docs, Some(root), "docs"), dir(deep, Some(docs), "deep")];
    for index in 0..50 {
        edits.push(file(Uuid::now_v7(), deep, &format!("f{index}")));
    }
    let created = a.write(edits).await.unwrap().rows;
    b.receive(a.id(), created.clone()).await;
    let deleted = a.write(vec![RowEdit::DeleteSubtree { id: docs }]).await.unwrap().rows;
    assert_eq!(deleted.len(), 1, "one tombstone for the whole subtree");
    let applied = b.receive(a.id(), deleted).await;
    assert_eq!(applied.deleted.len(), 52);
    assert_eq!(b.entries().await, a.entries().await);
    assert_eq!(a.entries().await.len(), 1);
    // Replaying the creation of the subtree, in any order, resurrects nothing.
    let mut replay = created;
    replay.reverse();
    b.receive(a.id(), replay).await;
    assert_eq!(b.entries().await, a.entries().await);
}

#[tokio::test]
async fn a_subtree_tombstone_reaches_a_device_that_never_saw_the_subtree() {
    let (a, c) = (Device::new(1).await, Device::new(3).await);
    let (root, docs, sub) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let leaf = Uuid::now_v7();
    let created =
        a.write(vec![dir(root, None, "root"), dir(docs, Some(root), "docs")]).await.unwrap();
    let sub_rows = a.write(vec![dir(sub, Some(docs), "sub")]).await.unwrap();
    let leaf_rows = a.write(vec![file(leaf, sub, "leaf")]).await.unwrap();
    // Rename sub after leaf was created: in version order leaf comes before sub.
    let renamed = a.write(vec![dir(sub, Some(docs), "sub renamed")]).await.unwrap();
    let deleted = a.write(vec![RowEdit::DeleteSubtree { id: docs }]).await.unwrap();
    // c hears of the delete first, then of everything older, leaf before its parent.
    for batch in [&created, &deleted, &leaf_rows, &renamed, &sub_rows] {
        c.deliver(a.id(), batch).await;
    }
    assert_eq!(c.entries().await, a.entries().await);
    c.catch_up_from(&a, a.id()).await;
    assert_eq!(c.entries().await, a.entries().await);
    assert_eq!(c.mark(a.id()).await, a.mark(a.id()).await);
}

#[tokio::test]
async fn a_row_moved_out_before_its_directory_was_deleted_survives_any_order() {
    let (a, b, c) = (Device::new(1).await, Device::new(2).await, Device::new(3).await);
    let (root, trash, keep, moved) =
        (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let created = a
        .write(vec![
            dir(root, None, "root"),
            dir(trash, Some(root), "trash"),
            dir(keep, Some(root), "keep"),
            file(moved, trash, "f"),
        ])
        .await
        .unwrap();
    let move_out = a.write(vec![file(moved, keep, "f")]).await.unwrap();
    let delete = a.write(vec![RowEdit::DeleteSubtree { id: trash }]).await.unwrap();
    for device in [&b, &c] {
        device.deliver(a.id(), &created).await;
    }
    b.deliver(a.id(), &move_out).await;
    b.deliver(a.id(), &delete).await;
    c.deliver(a.id(), &delete).await;
    c.deliver(a.id(), &move_out).await;
    assert_eq!(b.entries().await, a.entries().await);
    assert_eq!(c.entries().await, a.entries().await);
    assert_eq!(a.entries().await.len(), 3);
}

#[tokio::test]
async fn catch_up_pages_carry_changes_and_tombstones_in_version_order() {
    let (a, b) = (Device::new(1).await, Device::new(2).await);
    let root = Uuid::now_v7();
    let mut ids = Vec::new();
    let mut edits = vec![dir(root, None, "root")];
    for index in 0..30 {
        let id = Uuid::now_v7();
        ids.push(id);
        edits.push(file(id, root, &format!("f{index}")));
    }
    let first = a.write(edits).await.unwrap().rows;
    b.receive(a.id(), first).await;
    let mark =
        b.db.write(async |conn| lsync_watermark::sql::load_state_progress(conn).await)
            .await
            .unwrap();
    assert_eq!(mark.get(a.id(), "entries"), None, "receiving does not raise marks by itself");
    let since: HlcTime =
        a.db.write(async |conn| lsync_watermark::sql::load_state_progress(conn).await)
            .await
            .unwrap()
            .get(a.id(), "entries")
            .unwrap();

    // a changes a few rows and deletes others while b is away.
    a.write(ids[..5].iter().map(|id| file(*id, root, "renamed")).collect()).await.unwrap();
    a.write(ids[5..8].iter().map(|id| RowEdit::Delete { id: *id }).collect()).await.unwrap();

    let registry = a.db.registry().clone();
    let mut after: Option<StateCursor> = None;
    let mut pages = 0;
    loop {
        let (columns, rows, more) =
            a.db.write(async |conn| {
                rows_since(conn, &registry, a.id(), "entries", Some(since), after, 3).await
            })
            .await
            .unwrap();
        assert!(
            rows.windows(2)
                .all(|pair| (pair[0].version, pair[0].id) < (pair[1].version, pair[1].id))
        );
        after = rows.last().map(|row| StateCursor { version: row.version, id: row.id });
        let registry = b.db.registry().clone();
        b.db.write(async |conn| {
            apply_rows(conn, &registry, a.id(), "entries", &columns, rows, true, 0).await
        })
        .await
        .unwrap();
        pages += 1;
        if !more {
            break;
        }
    }
    assert_eq!(pages, 3, "8 changes in pages of 3");
    assert_eq!(b.entries().await, a.entries().await);
}

#[tokio::test]
async fn backfill_pages_in_key_order_rebuild_the_table() {
    let (a, c) = (Device::new(1).await, Device::new(3).await);
    let root = Uuid::now_v7();
    let mut edits = vec![dir(root, None, "root")];
    for index in 0..1_000 {
        edits.push(file(Uuid::now_v7(), root, &format!("f{index}")));
    }
    a.write(edits).await.unwrap();
    let registry = a.db.registry().clone();
    let mut after = None;
    loop {
        let (columns, rows, more) = a
            .db
            .write(async |conn| rows_by_key(conn, &registry, a.id(), "entries", after, 256).await)
            .await
            .unwrap();
        assert!(rows.windows(2).all(|pair| pair[0].id < pair[1].id));
        after = rows.last().map(|row| row.id);
        let registry = c.db.registry().clone();
        c.db.write(async |conn| {
            apply_rows(conn, &registry, a.id(), "entries", &columns, rows, true, 0).await
        })
        .await
        .unwrap();
        if !more {
            break;
        }
    }
    assert_eq!(c.entries().await, a.entries().await);
}

#[tokio::test]
async fn a_device_catching_up_from_a_backfilled_copy_learns_of_deletes_before_the_backfill() {
    let (a, b, c) = (Device::new(1).await, Device::new(2).await, Device::new(3).await);
    let root = Uuid::now_v7();
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let mut edits = vec![dir(root, None, "root")];
    edits.extend(ids.iter().enumerate().map(|(i, id)| file(*id, root, &format!("f{i}"))));
    a.write(edits).await.unwrap();
    // c holds everything so far; then a deletes rows (one file, and a directory's subtree) and
    // writes another while c is away.
    c.catch_up_from(&a, a.id()).await;
    let sub = Uuid::now_v7();
    let inner = Uuid::now_v7();
    a.write(vec![dir(sub, Some(root), "sub"), file(inner, sub, "inner")]).await.unwrap();
    c.catch_up_from(&a, a.id()).await;
    a.write(vec![RowEdit::Delete { id: ids[3] }, RowEdit::Delete { id: sub }]).await.unwrap();
    a.write(vec![file(Uuid::now_v7(), root, "later")]).await.unwrap();

    // b is new: it backfills from a, page by page in key order, as the engine does (pages are
    // not complete; the mark rises to a's when the step ends).
    let registry = a.db.registry().clone();
    let mut after = None;
    loop {
        let (_, rows, more) = a
            .db
            .write(async |conn| rows_by_key(conn, &registry, a.id(), "entries", after, 4).await)
            .await
            .unwrap();
        assert!(rows.windows(2).all(|pair| pair[0].id < pair[1].id), "key order");
        after = rows.last().map(|row| row.id);
        b.apply(a.id(), rows, false).await;
        if !more {
            break;
        }
    }
    b.raise_mark(a.id(), a.mark(a.id()).await.unwrap()).await;
    assert_eq!(b.entries().await, a.entries().await);

    // c catches up from b, not from a: it must learn of the deletes.
    c.catch_up_from(&b, a.id()).await;
    assert_eq!(c.entries().await, a.entries().await, "no deleted row survives on c");
}

#[tokio::test]
async fn a_row_written_again_after_its_delete_is_not_split_from_its_tombstone_between_pages() {
    let (a, c) = (Device::new(1).await, Device::new(3).await);
    let root = Uuid::now_v7();
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let mut edits = vec![dir(root, None, "root")];
    edits.extend(ids.iter().map(|id| file(*id, root, "first")));
    a.write(edits).await.unwrap();
    a.write(vec![RowEdit::Delete { id: ids[1] }]).await.unwrap();
    a.write(vec![file(ids[1], root, "again")]).await.unwrap();
    // Keys in order: root, ids[0], ids[1] twice (row and tombstone), ids[2], ids[3]. A limit of
    // 3 ends the first page on ids[1]'s first entry.
    let registry = a.db.registry().clone();
    let (mut after, mut served) = (None, Vec::new());
    loop {
        let (_, rows, more) = a
            .db
            .write(async |conn| rows_by_key(conn, &registry, a.id(), "entries", after, 3).await)
            .await
            .unwrap();
        if let Some(last) = rows.last() {
            assert!(after.is_none_or(|after| rows[0].id > after), "no key twice across pages");
            after = Some(last.id);
        }
        served.extend(rows.iter().map(|row| row.id));
        c.apply(a.id(), rows, false).await;
        if !more {
            break;
        }
    }
    assert_eq!(served.iter().filter(|id| **id == ids[1]).count(), 2, "row and tombstone served");
    assert_eq!(c.entries().await, a.entries().await, "the row written again is there");
}

#[tokio::test]
async fn tombstones_are_collected_once_every_peer_acknowledged_them() {
    let a = Device::new(1).await;
    let id = Uuid::now_v7();
    a.write(vec![dir(id, None, "x")]).await.unwrap();
    let deleted = a.write(vec![RowEdit::Delete { id }]).await.unwrap();
    let peer = DeviceId::from_bytes([2; 16]);
    let count = async |a: &Device| {
        a.db.write(async |conn| {
            let groups = tombstone_groups(conn, 0).await?;
            let peers: Vec<(DeviceId, bool)> = lsync_watermark::sql::peers(conn)
                .await?
                .iter()
                .map(|peer| (peer.device, peer.needs_resync))
                .collect();
            let acks = lsync_watermark::sql::load_state_acks(conn).await?;
            let own = lsync_watermark::sql::load_state_progress(conn).await?;
            collect_tombstones(conn, &plan_tombstone_gc(&groups, &peers, &acks, &own)).await?;
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_tombstones")
                .fetch_one(&mut *conn)
                .await?;
            Ok::<_, lsync_store::StoreError>(left)
        })
        .await
        .unwrap()
    };
    a.db.write(async |conn| lsync_watermark::sql::add_peer(conn, peer, "b", 0).await)
        .await
        .unwrap();
    assert_eq!(count(&a).await, 1, "the peer has not acknowledged the delete");
    let mark =
        StateMark { owner: a.id(), model: "entries".into(), version: deleted.rows[0].version };
    a.db.write(async |conn| lsync_watermark::sql::record_acks(conn, peer, &[], &[mark]).await)
        .await
        .unwrap();
    assert_eq!(count(&a).await, 0);
}

/// Collects every tombstone `device` may drop: with no peers added, all of them (as when every
/// peer acknowledged them).
async fn collect_all_tombstones(device: &Device) {
    device
        .db
        .write(async |conn| {
            let groups = tombstone_groups(conn, 0).await?;
            let acks = lsync_watermark::sql::load_state_acks(conn).await?;
            let own = lsync_watermark::sql::load_state_progress(conn).await?;
            collect_tombstones(conn, &plan_tombstone_gc(&groups, &[], &acks, &own)).await?;
            Ok::<_, lsync_store::StoreError>(())
        })
        .await
        .unwrap();
}

/// Found by the simulator (`cargo xtask sim --peers 5 --seed 71`, under CPU load): rows of a
/// deleted subtree came back as orphans on two of six devices, after the tombstones were
/// collected everywhere. Reduced: a batch re-sent late (its ack was lost) reaches a device that
/// already holds everything up to a later mark and has collected the subtree's tombstone; the
/// row is absent and no tombstone remains, so it is applied, and no later catch-up removes it.
/// A row at or below the receiver's mark that the receiver does not hold was deleted: it is
/// refused.
#[tokio::test]
async fn a_late_batch_does_not_resurrect_a_deleted_subtree_after_tombstone_collection() {
    let (a, c) = (Device::new(1).await, Device::new(3).await);
    let (root, trash, leaf) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let created = a
        .write(vec![
            dir(root, None, "root"),
            dir(trash, Some(root), "trash"),
            file(leaf, trash, "f"),
        ])
        .await
        .unwrap();
    let renamed = a.write(vec![file(leaf, trash, "f renamed")]).await.unwrap();
    a.write(vec![RowEdit::DeleteSubtree { id: trash }]).await.unwrap();
    c.deliver(a.id(), &created).await;
    // The rename's batch is lost; c catches up (it gets the tombstone, its mark reaches a's).
    c.catch_up_from(&a, a.id()).await;
    assert_eq!(c.entries().await, a.entries().await);
    // Every device acknowledged the delete: the tombstones go.
    collect_all_tombstones(&a).await;
    collect_all_tombstones(&c).await;
    // The rename's batch, re-sent because its ack never came, arrives now.
    c.deliver(a.id(), &renamed).await;
    c.catch_up_from(&a, a.id()).await;
    assert_eq!(c.entries().await, a.entries().await, "the deleted file came back on c");
}

/// The other half of the rule: a receiver keeps a tombstone above its own mark even when every
/// peer acknowledged it, since a late copy of the row between its mark and the tombstone would
/// otherwise be newer than anything it knows.
#[tokio::test]
async fn a_tombstone_above_the_receivers_mark_outlives_collection() {
    let (a, c) = (Device::new(1).await, Device::new(3).await);
    let id = Uuid::now_v7();
    let created = a.write(vec![dir(id, None, "x")]).await.unwrap();
    let renamed = a.write(vec![dir(id, None, "x renamed")]).await.unwrap();
    let deleted = a.write(vec![RowEdit::Delete { id }]).await.unwrap();
    c.deliver(a.id(), &created).await;
    // The delete overtakes the rename: a gap, so c's mark stays at the create.
    c.deliver(a.id(), &deleted).await;
    assert_eq!(c.mark(a.id()).await, Some(created.rows[0].version));
    collect_all_tombstones(&a).await;
    collect_all_tombstones(&c).await;
    c.deliver(a.id(), &renamed).await;
    c.catch_up_from(&a, a.id()).await;
    assert_eq!(c.entries().await, a.entries().await, "the renamed row came back on c");
    assert!(c.entries().await.is_empty());
}

/// One step of the owner's random work on a small tree.
#[derive(Debug, Clone)]
enum Step {
    MakeDir(usize, usize),
    MakeFile(usize, usize),
    Move(usize, usize),
    Rename(usize),
    Delete(usize),
    DeleteSubtree(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let node = 0usize..12;
    prop_oneof![
        (node.clone(), node.clone()).prop_map(|(a, b)| Step::MakeDir(a, b)),
        (node.clone(), node.clone()).prop_map(|(a, b)| Step::MakeFile(a, b)),
        (node.clone(), node.clone()).prop_map(|(a, b)| Step::Move(a, b)),
        node.clone().prop_map(Step::Rename),
        node.clone().prop_map(Step::Delete),
        node.prop_map(Step::DeleteSubtree),
    ]
}

/// What happens to one live batch on its way to a receiver.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Delivered,
    Dropped,
    Duplicated,
    /// Delivered after the next few batches.
    Delayed(usize),
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        4 => Just(Fate::Delivered),
        1 => Just(Fate::Dropped),
        1 => Just(Fate::Duplicated),
        1 => (1usize..4).prop_map(Fate::Delayed),
    ]
}

/// The order in which a receiver sees batches, given each batch's fate.
fn deliveries(n_batches: usize, fates: &[Fate]) -> Vec<usize> {
    let mut order: Vec<(usize, usize)> = Vec::new();
    for index in 0..n_batches {
        match fates[index % fates.len()] {
            Fate::Delivered => order.push((index * 10, index)),
            Fate::Dropped => {}
            Fate::Duplicated => {
                order.push((index * 10, index));
                order.push((index * 10 + 5, index));
            }
            Fate::Delayed(by) => order.push(((index + by) * 10 + 7, index)),
        }
    }
    order.sort();
    order.into_iter().map(|(_, index)| index).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// An owner builds, moves, renames and deletes in a small tree (subtrees included). Two
    /// devices receive its live batches with drops, duplicates and delays; then b catches up
    /// from the owner and c catches up from b (a relay). Both end with exactly the owner's table,
    /// and with the owner's mark.
    #[test]
    fn live_batches_with_faults_then_catch_up_converge_on_the_owners_tree(
        steps in prop::collection::vec(step(), 1..40),
        fates_b in prop::collection::vec(fate(), 1..8),
        fates_c in prop::collection::vec(fate(), 1..8),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (a, b, c) = (Device::new(1).await, Device::new(2).await, Device::new(3).await);
            let ids: Vec<Uuid> = (0..12).map(|index| Uuid::from_u128(1000 + index)).collect();
            // What the owner currently holds: node -> (parent, is_dir).
            let mut tree: BTreeMap<usize, (Option<usize>, bool)> = BTreeMap::new();
            let mut batches = Vec::new();
            for step in steps {
                let dir_or_none = |tree: &BTreeMap<usize, (Option<usize>, bool)>, p: usize| {
                    tree.get(&p).filter(|(_, is_dir)| *is_dir).map(|_| p)
                };
                let upsert = |n: usize, parent: Option<usize>, is_dir: bool, name: String| {
                    let kind = if is_dir { ENTRY_KIND_DIRECTORY } else { ENTRY_KIND_FILE };
                    RowEdit::Upsert { id: ids[n], values: entry(parent.map(|p| ids[p]), &name, kind) }
                };
                let edit = match step {
                    Step::MakeDir(n, p) | Step::MakeFile(n, p) if !tree.contains_key(&n) && n != p => {
                        let is_dir = matches!(step, Step::MakeDir(..));
                        let parent = dir_or_none(&tree, p);
                        tree.insert(n, (parent, is_dir));
                        upsert(n, parent, is_dir, format!("n{n}"))
                    }
                    Step::Move(n, p) if tree.contains_key(&n) && n != p => {
                        // No moves into the node's own subtree.
                        let mut ancestor = dir_or_none(&tree, p);
                        while let Some(node) = ancestor {
                            if node == n {
                                break;
                            }
                            ancestor = tree[&node].0;
                        }
                        if ancestor.is_some() {
                            continue;
                        }
                        let parent = dir_or_none(&tree, p);
                        let is_dir = tree[&n].1;
                        tree.insert(n, (parent, is_dir));
                        upsert(n, parent, is_dir, format!("n{n}"))
                    }
                    Step::Rename(n) if tree.contains_key(&n) => {
                        let (parent, is_dir) = tree[&n];
                        upsert(n, parent, is_dir, format!("renamed {n}"))
                    }
                    Step::Delete(n) if tree.get(&n).is_some_and(|(_, is_dir)| !is_dir) => {
                        tree.remove(&n);
                        RowEdit::Delete { id: ids[n] }
                    }
                    Step::DeleteSubtree(n) if tree.contains_key(&n) => {
                        let mut doomed = vec![n];
                        let mut index = 0;
                        while index < doomed.len() {
                            let node = doomed[index];
                            doomed.extend(
                                tree.iter()
                                    .filter(|(_, (parent, _))| *parent == Some(node))
                                    .map(|(child, _)| *child),
                            );
                            index += 1;
                        }
                        for node in doomed {
                            tree.remove(&node);
                        }
                        RowEdit::DeleteSubtree { id: ids[n] }
                    }
                    _ => continue,
                };
                batches.push(a.write(vec![edit]).await.unwrap());
            }
            for index in deliveries(batches.len(), &fates_b) {
                b.deliver(a.id(), &batches[index]).await;
            }
            for index in deliveries(batches.len(), &fates_c) {
                c.deliver(a.id(), &batches[index]).await;
            }
            b.catch_up_from(&a, a.id()).await;
            c.catch_up_from(&b, a.id()).await;
            assert_eq!(b.entries().await, a.entries().await);
            assert_eq!(c.entries().await, a.entries().await);
            assert_eq!(c.mark(a.id()).await, a.mark(a.id()).await);
        });
    }

    /// Without subtrees, rows converge whatever the order: newest version wins, deletes stick.
    #[test]
    fn flat_rows_converge_in_any_order(
        writes in prop::collection::vec((0usize..6, prop::option::of(any::<u8>())), 1..40),
        shuffle in any::<u64>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (a, b) = (Device::new(1).await, Device::new(2).await);
            let ids: Vec<Uuid> = (0..6).map(|index| Uuid::from_u128(500 + index)).collect();
            let mut rows = Vec::new();
            for (n, name) in writes {
                let edit = match name {
                    Some(name) => RowEdit::Upsert { id: ids[n], values: entry(None, &format!("f{name}"), ENTRY_KIND_FILE) },
                    None => RowEdit::Delete { id: ids[n] },
                };
                rows.extend(a.write(vec![edit]).await.unwrap().rows);
            }
            let mut delivery: Vec<StateRow> = rows.iter().chain(&rows).cloned().collect();
            let mut state = shuffle | 1;
            for i in (1..delivery.len()).rev() {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                delivery.swap(i, usize::try_from(state >> 33).unwrap() % (i + 1));
            }
            for batch in delivery.chunks(3) {
                b.receive(a.id(), batch.to_vec()).await;
            }
            assert_eq!(b.entries().await, a.entries().await);
        });
    }
}

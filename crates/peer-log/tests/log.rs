//! The peer log on a real library file.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::collections::BTreeMap;
use std::sync::Arc;

use lsync_hlc::{DeviceId, HlcTime};
use lsync_peer_log::sql::*;
use lsync_peer_log::{PrunePeer, RetentionPolicy, plan_prune};
use lsync_protocol::{LibraryId, OriginSeq, SharedChange, SharedOp, Value};
use lsync_store::{Database, StoreError, StoreOptions, reference_registry};
use lsync_watermark::SharedProgress;
use lsync_watermark::sql::{load_shared_acks, load_shared_progress, record_acks};
use uuid::Uuid;

fn device(byte: u8) -> DeviceId {
    DeviceId::from_bytes([byte; 16])
}

fn change(origin: u8, seq: u64) -> SharedChange {
    let mut fields = BTreeMap::new();
    fields.insert("name".to_owned(), Value::Text(format!("tag {origin}/{seq}")));
    SharedChange {
        origin: device(origin),
        seq,
        time: HlcTime::new(1_000 + seq, 0).unwrap(),
        model: "tags".into(),
        record: Uuid::from_u128(u128::from(seq)),
        op: if seq.is_multiple_of(3) { SharedOp::Delete } else { SharedOp::Insert(fields) },
    }
}

async fn library(dir: &tempfile::TempDir) -> Database {
    Database::create(
        &dir.path().join("library.db"),
        Arc::new(reference_registry().unwrap()),
        LibraryId(Uuid::from_bytes([7; 16])),
        device(9),
        &StoreOptions::default(),
    )
    .await
    .unwrap()
}

/// Appends `changes` as a receiver would and advances the watermarks; returns the fresh ones.
async fn receive(db: &Database, changes: Vec<SharedChange>) -> Vec<SharedChange> {
    db.write(async |conn| {
        let mut progress = load_shared_progress(conn).await?;
        let fresh = append_new(conn, &changes, &progress, 5).await?;
        advance_progress(conn, fresh.iter().map(|change| change.origin), &mut progress).await?;
        Ok::<_, StoreError>(fresh)
    })
    .await
    .unwrap()
}

async fn progress(db: &Database) -> SharedProgress {
    db.write(async |conn| load_shared_progress(conn).await).await.unwrap()
}

#[tokio::test]
async fn duplicates_are_logged_once_and_the_watermark_waits_for_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let db = library(&dir).await;
    assert_eq!(receive(&db, vec![change(1, 1), change(1, 2), change(1, 2)]).await.len(), 2);
    assert_eq!(progress(&db).await.get(device(1)), 2);
    // 4 and 5 arrive before 3: logged, but the watermark stays.
    assert_eq!(receive(&db, vec![change(1, 5), change(1, 4)]).await.len(), 2);
    assert_eq!(progress(&db).await.get(device(1)), 2);
    // Duplicates of applied changes are recognised; 3 closes the gap.
    assert_eq!(
        receive(&db, vec![change(1, 1), change(1, 4), change(1, 3)]).await,
        vec![change(1, 3)]
    );
    assert_eq!(progress(&db).await.get(device(1)), 5);
    let served = db
        .write(async |conn| {
            let own = load_shared_progress(conn).await?;
            changes_after(conn, &SharedProgress::default(), &own, 100).await
        })
        .await
        .unwrap();
    assert!(served.complete);
    assert_eq!(served.changes, (1..=5).map(|seq| change(1, seq)).collect::<Vec<_>>());
}

#[tokio::test]
async fn catch_up_is_paged_contiguous_and_reports_pruned_origins() {
    let dir = tempfile::tempdir().unwrap();
    let db = library(&dir).await;
    receive(
        &db,
        (1..=10).map(|seq| change(1, seq)).chain((1..=3).map(|seq| change(2, seq))).collect(),
    )
    .await;
    let own = progress(&db).await;
    let after = SharedProgress::from_wire(&[OriginSeq { origin: device(1), seq: 4 }]);

    let page = db.write(async |conn| changes_after(conn, &after, &own, 4).await).await.unwrap();
    assert!(!page.complete);
    assert_eq!(page.changes, (5..=8).map(|seq| change(1, seq)).collect::<Vec<_>>());

    let page = db.write(async |conn| changes_after(conn, &after, &own, 100).await).await.unwrap();
    assert!(page.complete);
    assert_eq!(page.changes.len(), 6 + 3);

    // Prune origin 1 through 6: a requester at 4 can no longer be served from here.
    db.write(async |conn| {
        prune(
            conn,
            &lsync_peer_log::PrunePlan {
                prune_through: vec![OriginSeq { origin: device(1), seq: 6 }],
                resync: vec![],
            },
        )
        .await
    })
    .await
    .unwrap();
    let page = db.write(async |conn| changes_after(conn, &after, &own, 100).await).await.unwrap();
    assert_eq!(page.pruned, [OriginSeq { origin: device(1), seq: 7 }]);
    assert!(page.changes.iter().all(|change| change.origin == device(2)));
}

#[tokio::test]
async fn pruning_follows_the_acks_of_every_paired_device() {
    let dir = tempfile::tempdir().unwrap();
    let db = library(&dir).await;
    receive(&db, (1..=10).map(|seq| change(1, seq)).collect()).await;
    let run_pruner = async |db: &Database| {
        db.write(async |conn| {
            let logs = origin_logs(conn, 0).await?;
            let own = load_shared_progress(conn).await?;
            let acks = load_shared_acks(conn).await?;
            let peers: Vec<PrunePeer> = lsync_watermark::sql::peers(conn)
                .await?
                .into_iter()
                .map(|peer| PrunePeer { device: peer.device, needs_resync: peer.needs_resync })
                .collect();
            let plan = plan_prune(&logs, &own, &peers, &acks, &RetentionPolicy::default());
            prune(conn, &plan).await?;
            len(conn).await
        })
        .await
        .unwrap()
    };
    db.write(async |conn| {
        lsync_watermark::sql::add_peer(conn, device(2), "a", 0).await?;
        lsync_watermark::sql::add_peer(conn, device(3), "b", 0).await?;
        record_acks(conn, device(2), &[OriginSeq { origin: device(1), seq: 10 }], &[]).await
    })
    .await
    .unwrap();
    assert_eq!(run_pruner(&db).await, 10, "device 3 never acknowledged");
    db.write(async |conn| {
        record_acks(conn, device(3), &[OriginSeq { origin: device(1), seq: 7 }], &[]).await
    })
    .await
    .unwrap();
    assert_eq!(run_pruner(&db).await, 3);
    db.write(async |conn| {
        record_acks(conn, device(3), &[OriginSeq { origin: device(1), seq: 10 }], &[]).await
    })
    .await
    .unwrap();
    assert_eq!(run_pruner(&db).await, 0);
}

//! Watermarks, peers and acks on a real library file.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::sync::Arc;

use lsync_hlc::{DeviceId, HlcTime};
use lsync_protocol::{Epoch, LibraryId, OriginSeq, StateMark};
use lsync_store::{Database, StoreError, StoreOptions, reference_registry};
use lsync_watermark::sql::*;
use lsync_watermark::{EpochCheck, SharedProgress};
use proptest::prelude::*;
use uuid::Uuid;

fn device(byte: u8) -> DeviceId {
    DeviceId::from_bytes([byte; 16])
}

async fn library(dir: &tempfile::TempDir) -> Database {
    Database::create(
        &dir.path().join("library.db"),
        Arc::new(reference_registry().unwrap()),
        LibraryId(Uuid::from_bytes([7; 16])),
        device(1),
        &StoreOptions::default(),
    )
    .await
    .unwrap()
}

fn mark(owner: u8, model: &str, ms: u64) -> StateMark {
    StateMark { owner: device(owner), model: model.into(), version: HlcTime::new(ms, 0).unwrap() }
}

#[tokio::test]
async fn progress_and_acks_persist_and_never_move_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let db = library(&dir).await;
    db.write(async |conn| {
        add_peer(conn, device(2), "laptop", 1_000).await?;
        raise_shared_progress(conn, &[OriginSeq { origin: device(3), seq: 9 }]).await?;
        raise_shared_progress(conn, &[OriginSeq { origin: device(3), seq: 4 }]).await?;
        raise_state_progress(conn, &[mark(3, "entries", 50)]).await?;
        raise_state_progress(conn, &[mark(3, "entries", 40)]).await?;
        record_acks(
            conn,
            device(2),
            &[OriginSeq { origin: device(3), seq: 7 }],
            &[mark(3, "entries", 30)],
        )
        .await?;
        record_acks(
            conn,
            device(2),
            &[OriginSeq { origin: device(3), seq: 2 }],
            &[mark(3, "entries", 10)],
        )
        .await?;
        Ok::<_, StoreError>(())
    })
    .await
    .unwrap();
    db.close().await.unwrap();

    let db = Database::open(
        &dir.path().join("library.db"),
        Arc::new(reference_registry().unwrap()),
        &StoreOptions::default(),
    )
    .await
    .unwrap();
    let identity = db.identity();
    let (marks, shared_acks, state_acks) = db
        .write(async |conn| {
            Ok::<_, StoreError>((
                own_watermarks(conn, identity, true).await?,
                load_shared_acks(conn).await?,
                load_state_acks(conn).await?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(marks.shared, [OriginSeq { origin: device(3), seq: 9 }]);
    assert_eq!(marks.state, [mark(3, "entries", 50)]);
    assert_eq!(shared_acks[&device(2)].get(device(3)), 7);
    assert_eq!(
        state_acks[&device(2)].get(device(3), "entries"),
        Some(HlcTime::new(30, 0).unwrap())
    );
}

#[tokio::test]
async fn a_changed_epoch_resets_what_the_peer_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let db = library(&dir).await;
    let (first, same, changed, acks, peers) = db
        .write(async |conn| {
            add_peer(conn, device(2), "phone", 0).await?;
            let first = note_epoch(conn, device(2), Epoch(11)).await?;
            record_acks(conn, device(2), &[OriginSeq { origin: device(1), seq: 5 }], &[]).await?;
            let same = note_epoch(conn, device(2), Epoch(11)).await?;
            let changed = note_epoch(conn, device(2), Epoch(u64::MAX)).await?;
            Ok::<_, StoreError>((
                first,
                same,
                changed,
                load_shared_acks(conn).await?,
                peers(conn).await?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(first, EpochCheck::FirstContact);
    assert_eq!(same, EpochCheck::Same);
    assert_eq!(changed, EpochCheck::Changed { previous: Epoch(11) });
    assert!(acks.get(&device(2)).is_none_or(|progress| progress.get(device(1)) == 0));
    assert_eq!(peers[0].epoch, Some(Epoch(u64::MAX)));
}

#[tokio::test]
async fn unpairing_forgets_the_peer_and_its_acks() {
    let dir = tempfile::tempdir().unwrap();
    let db = library(&dir).await;
    let (removed, again, peers, acks) = db
        .write(async |conn| {
            add_peer(conn, device(2), "phone", 0).await?;
            record_acks(conn, device(2), &[OriginSeq { origin: device(1), seq: 5 }], &[]).await?;
            let removed = remove_peer(conn, device(2)).await?;
            let again = remove_peer(conn, device(2)).await?;
            Ok::<_, StoreError>((removed, again, peers(conn).await?, load_shared_acks(conn).await?))
        })
        .await
        .unwrap();
    assert!(removed && !again);
    assert!(peers.is_empty() && acks.is_empty());
}

proptest! {
    // Each case creates a library file: a few dozen cases cover the orders that matter.
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Whatever order acks arrive in, the stored ack is the largest one.
    #[test]
    fn stored_acks_are_the_maximum_received(seqs in prop::collection::vec(0u64..1_000, 1..20)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let db = library(&dir).await;
            let acks = db.write(async |conn| {
                for seq in &seqs {
                    record_acks(conn, device(2), &[OriginSeq { origin: device(3), seq: *seq }], &[]).await?;
                }
                load_shared_acks(conn).await
            }).await.unwrap();
            let expected = SharedProgress::from_wire(&[OriginSeq { origin: device(3), seq: *seqs.iter().max().unwrap() }]);
            assert_eq!(acks.get(&device(2)).cloned().unwrap_or_default(), expected);
        });
    }
}

//! Opening, starting, closing and reopening a library.

use lsync_node::{Edit, RowEdit, SyncState};
use lsync_protocol::{StateOp, Value};
use lsync_store::ENTRY_KIND_FILE;
use uuid::Uuid;

use crate::harness::*;

pub fn entry(name: &str) -> RowEdit {
    RowEdit::Upsert {
        id: Uuid::now_v7(),
        values: vec![
            Value::Blob(Uuid::nil().as_bytes().to_vec()),
            Value::Null,
            Value::from(name),
            Value::Integer(ENTRY_KIND_FILE),
            Value::Integer(42),
            Value::Integer(1_700_000_000),
        ],
    }
}

pub fn tag(name: &str) -> Edit {
    Edit::Insert {
        model: "tags".into(),
        id: Uuid::now_v7(),
        fields: [("name".to_owned(), Value::from(name))].into_iter().collect(),
    }
}

/// Networking comes up after the library opened: writes made before sync started reach a peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_started_late_still_delivers_earlier_writes() {
    let library_id = new_library();
    let dir = tempfile::tempdir().unwrap();
    let config = test_config();
    let library = open_library(dir.path(), library_id, &config, true).await;
    assert_eq!(library.status().await.unwrap().sync, SyncState::NotStarted);
    library.write_rows("entries", vec![entry("written before sync started")]).await.unwrap();
    library.write_shared(vec![tag("early")]).await.unwrap();
    let transport = start_transport(dir.path(), &library, "a", &config).await;
    let mut a = Node { name: "a".into(), dir, events: library.subscribe(), library, transport };
    assert_eq!(a.library.status().await.unwrap().sync, SyncState::Running);
    let mut b = Node::start(library_id, "b").await;
    pair(&mut a, &mut b).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 1);
    assert_eq!(tables["tags"].len(), 1);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_library_has_its_data_identity_and_a_clock_past_every_stamp() {
    let library_id = new_library();
    let node = Node::start(library_id, "a").await;
    let identity = node.library.identity();
    let rows = node.library.write_rows("entries", vec![entry("one"), entry("two")]).await.unwrap();
    node.library.write_shared(vec![tag("work")]).await.unwrap();
    let before = node.tables().await;
    let dir = node.close().await;

    let node = Node::start_in(dir, library_id, "a", test_config(), false).await;
    let reopened = node.library.identity();
    assert_eq!(
        (reopened.library, reopened.device, reopened.epoch),
        (identity.library, identity.device, identity.epoch)
    );
    assert_ne!(reopened.origin, identity.origin, "shared changes go under a new incarnation");
    assert_eq!(node.tables().await, before);
    let newest = rows.iter().map(|row| row.version).max().unwrap();
    let later = node.library.write_rows("entries", vec![entry("three")]).await.unwrap();
    assert!(later[0].version > newest, "the clock resumed after the last persisted stamp");
    assert!(matches!(rows[0].op, StateOp::Upsert(_)));
    assert_eq!(node.library.status().await.unwrap().sync, SyncState::Running);
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_close_are_refused() {
    let node = Node::start(new_library(), "a").await;
    let library = node.library.clone();
    let _dir = node.close().await;
    assert!(matches!(
        library.write_rows("entries", vec![entry("late")]).await,
        Err(lsync_node::LibraryError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_aborted_like_a_crash_reopens_with_every_committed_write() {
    let library_id = new_library();
    let (mut a, mut b) = (Node::start(library_id, "a").await, Node::start(library_id, "b").await);
    pair(&mut a, &mut b).await;
    a.library
        .write_rows("entries", (0..300).map(|i| entry(&format!("e{i}"))).collect())
        .await
        .unwrap();
    a.library.write_shared(vec![tag("last")]).await.unwrap();
    let expected = a.tables().await;
    // No flush, no checkpoint: the WAL is left for the next open to recover from.
    let Node { library, dir, transport, .. } = a;
    library.clone().abort().await;
    assert!(matches!(
        library.write_rows("entries", vec![entry("late")]).await,
        Err(lsync_node::LibraryError::Closed)
    ));
    drop((library, transport));
    let a = Node::start_in(dir, library_id, "a", test_config(), false).await;
    assert_eq!(a.tables().await, expected, "every committed write is there after recovery");
    // And b gets everything, from the live batches or by catch-up after the restart.
    let mut a = a;
    assert_eq!(converge(&mut [&mut a, &mut b]).await, expected);
    a.close().await;
    b.close().await;
}

//! The world as it is (issue 16): devices paired by hand in partial graphs, copies restored from
//! backups, clocks far ahead, peers that stop reading. Each test reproduces a failure seen with
//! the real engine and asserts the property that failed.

use std::time::Duration;

use lsync_node::RowEdit;
use lsync_node::config::SyncConfig;
use uuid::Uuid;

use crate::catchup::tree;
use crate::harness::*;

/// How many tombstones `node` holds.
async fn tombstones(library: &lsync_node::Library) -> i64 {
    library
        .with_transaction(async |conn| {
            Ok(sqlx::query_scalar("SELECT count(*) FROM sync_tombstones").fetch_one(conn).await?)
        })
        .await
        .unwrap()
}

/// Pairs a–p and a–b only. While b is away a deletes a subtree; p (whose only peer is a) collects
/// the tombstones; j joins through p, so its copy has neither the rows nor their tombstones;
/// b comes back, pairs with j and meets j before a. b must delete the rows: j's copy cannot list
/// the deletions, so b must not raise its mark over them by catching up from j.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_catching_up_from_a_copy_made_after_tombstones_were_collected_deletes_the_rows() {
    let library = new_library();
    let forgetful = SyncConfig { tombstone_retention: Duration::from_millis(1), ..test_config() };
    let mut a = Node::start(library, "a").await;
    let mut p = Node::start_in(tempfile::tempdir().unwrap(), library, "p", forgetful, true).await;
    let mut b = Node::start(library, "b").await;
    pair(&mut a, &mut p).await;
    pair(&mut a, &mut b).await;
    let (rows, folder) = tree(Uuid::now_v7(), "a/");
    a.library.write_rows("entries", rows).await.unwrap();
    converge(&mut [&mut a, &mut p, &mut b]).await;

    let b_dir = b.close().await;
    a.library.write_rows("entries", vec![RowEdit::DeleteSubtree { id: folder }]).await.unwrap();
    let expected = converge(&mut [&mut a, &mut p]).await;
    assert_eq!(expected["entries"].len(), 4, "the folder and its two files are gone");
    eventually(&mut p, async |library| tombstones(&library).await == 0).await;

    let mut j =
        Node::start_as(tempfile::tempdir().unwrap(), library, "j", test_config(), How::Join).await;
    pair_joining(&mut p, &mut j).await;
    a.close().await;
    let mut b = Node::start_in(b_dir, library, "b", test_config(), false).await;
    pair(&mut j, &mut b).await;
    let tables = converge(&mut [&mut j, &mut b]).await;
    assert_eq!(tables, expected, "b deleted what a deleted while it was away");
    p.close().await;
    j.close().await;
    b.close().await;
}

//! The world as it is (issue 16): devices paired by hand in partial graphs, copies restored from
//! backups, clocks far ahead, peers that stop reading. Each test reproduces a failure seen with
//! the real engine and asserts the property that failed.

use std::time::Duration;

use lsync_node::config::SyncConfig;
use lsync_node::{Edit, RowEdit};
use lsync_protocol::Value;
use lsync_store::Registry;
use uuid::Uuid;

use crate::catchup::tree;
use crate::harness::*;
use crate::lifecycle::{entry, tag};

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
    // A file in the folder carries a tag: the assignment must be hidden once the file is gone.
    let RowEdit::Upsert { id: file, .. } = &rows[2] else { unreachable!() };
    let file = *file;
    a.library.write_rows("entries", rows).await.unwrap();
    let holiday = tag("holiday");
    let Edit::Insert { id: tag_id, .. } = &holiday else { unreachable!() };
    let tag_id = *tag_id;
    let blob = |id: Uuid| Value::Blob(id.as_bytes().to_vec());
    a.library
        .write_shared(vec![
            holiday,
            Edit::Insert {
                model: "tag_assignments".into(),
                id: Registry::membership_id("tag_assignments", tag_id, file),
                fields: [("tag_id".to_owned(), blob(tag_id)), ("entry_id".to_owned(), blob(file))]
                    .into_iter()
                    .collect(),
            },
        ])
        .await
        .unwrap();
    let before = converge(&mut [&mut a, &mut p, &mut b]).await;
    assert_eq!(before["tag_assignments"].len(), 1);

    let b_dir = b.close().await;
    a.library.write_rows("entries", vec![RowEdit::DeleteSubtree { id: folder }]).await.unwrap();
    let expected = converge(&mut [&mut a, &mut p]).await;
    assert_eq!(expected["entries"].len(), 4, "the folder and its two files are gone");
    assert!(expected["tag_assignments"].is_empty(), "the tagged file is gone");
    eventually(&mut p, async |library| tombstones(&library).await == 0).await;

    let mut j =
        Node::start_as(tempfile::tempdir().unwrap(), library, "j", test_config(), How::Join).await;
    pair_joining(&mut p, &mut j).await;
    a.close().await;
    let mut b = Node::start_in(b_dir, library, "b", test_config(), false).await;
    pair(&mut j, &mut b).await;
    let tables = converge(&mut [&mut j, &mut b]).await;
    assert_eq!(tables, expected, "b deleted what a deleted while it was away, and hid its tag");
    p.close().await;
    j.close().await;
    b.close().await;
}

/// Three devices. a's last shared changes reach only c; a is then restored from a backup of its
/// whole folder (the generation file too, so a cannot tell), meets b, and makes new changes while
/// c is away. No (origin, seq) may name two changes: once c is back, every device holds the lost
/// changes and the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_restored_without_knowing_it_never_reuses_a_change_number() {
    let library = new_library();
    let (mut a, mut b, mut c) = three_paired(library).await;
    a.library.write_shared((0..3).map(|i| tag(&format!("kept{i}"))).collect()).await.unwrap();
    converge(&mut [&mut a, &mut b, &mut c]).await;

    let backup = back_up(&a).await;

    // b stops syncing; a's next changes reach only c, which then goes away.
    b.library.set_sync_enabled(false).await;
    a.library.write_shared((0..2).map(|i| tag(&format!("lost{i}"))).collect()).await.unwrap();
    converge(&mut [&mut a, &mut c]).await;
    let c_dir = c.close().await;

    // a is restored, meets b, and writes while c is away.
    let a_dir = a.close().await;
    restore(a_dir.path(), &backup, true);
    b.library.set_sync_enabled(true).await;
    let mut a = Node::start_in(a_dir, library, "a", test_config(), false).await;
    online(&mut b, a.device()).await;
    // a learns from b that it was rolled back (b saw more of this copy than the restored file
    // holds) and resyncs; whether the write lands before or after that, it must take fresh numbers.
    a.write_shared((0..2).map(|i| tag(&format!("new{i}"))).collect()).await;
    converge(&mut [&mut a, &mut b]).await;

    // c comes back (it reaches b, whose address has not changed).
    let mut c = Node::start_in(c_dir, library, "c", test_config(), false).await;
    let tables = converge(&mut [&mut a, &mut b, &mut c]).await;
    let mut names: Vec<String> = tables["tags"]
        .iter()
        .flat_map(|row| row.iter())
        .filter_map(|value| match value {
            Value::Text(text) => Some(text.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    assert_eq!(names, ["kept0", "kept1", "kept2", "lost0", "lost1", "new0", "new1"]);
    a.close().await;
    b.close().await;
    c.close().await;
}

/// b hangs: it stops reading its connection without closing it, while a has far more queued for
/// it than QUIC's flow control lets through. Closing a takes about its `close_timeout` (twice at
/// most: the engine's drain, then the transport's flush and close), not the stale timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_while_a_peer_stopped_reading_takes_the_close_timeout_not_the_stale_timeout() {
    let library = new_library();
    let config = SyncConfig {
        stale_timeout: Duration::from_secs(120),
        close_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(3),
        ..test_config()
    };
    let dir = || tempfile::tempdir().unwrap();
    let mut a = Node::start_in(dir(), library, "a", config.clone(), true).await;
    let mut b = Node::start_in(dir(), library, "b", config, true).await;
    pair(&mut a, &mut b).await;
    b.transport.set_reading(false);
    // Some 6 MB of rows: far beyond what b's receive windows take without reading.
    for chunk in 0..5 {
        let rows = (0..10_000).map(|i| entry(&format!("chunk {chunk} row {i} {}", "x".repeat(40))));
        a.library.write_rows("entries", rows.collect()).await.unwrap();
    }
    let started = std::time::Instant::now();
    a.close().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "closing took {took:?}");
    b.transport.set_reading(true);
    b.close().await;
}

/// b is away while a indexes files and tags every one of them; b parks at most 10 records that
/// wait for a row. Catching up, b must pull the entries before the assignments that reference
/// them: the other way round every page of assignments overflows the bound, is refused, and the
/// rows that would unpark them are never pulled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_with_more_references_than_the_parking_bound_completes() {
    let library = new_library();
    let small = SyncConfig { max_parked: 10, ..test_config() };
    let mut a = Node::start(library, "a").await;
    let mut b =
        Node::start_in(tempfile::tempdir().unwrap(), library, "b", small.clone(), true).await;
    pair(&mut a, &mut b).await;
    let b_dir = b.close().await;

    let files = a
        .library
        .write_rows("entries", (0..50).map(|i| entry(&format!("file {i}"))).collect())
        .await
        .unwrap();
    let holiday = tag("holiday");
    let Edit::Insert { id: tag_id, .. } = &holiday else { unreachable!() };
    let tag_id = *tag_id;
    a.library.write_shared(vec![holiday]).await.unwrap();
    let blob = |id: Uuid| Value::Blob(id.as_bytes().to_vec());
    let assignments = files
        .iter()
        .map(|file| Edit::Insert {
            model: "tag_assignments".into(),
            id: Registry::membership_id("tag_assignments", tag_id, file.id),
            fields: [("tag_id".to_owned(), blob(tag_id)), ("entry_id".to_owned(), blob(file.id))]
                .into_iter()
                .collect(),
        })
        .collect();
    a.library.write_shared(assignments).await.unwrap();

    let mut b = Node::start_in(b_dir, library, "b", small, false).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["tag_assignments"].len(), 50);
    a.close().await;
    b.close().await;
}

/// a's rows written after a backup reach b; a's `library.db` is restored from the backup as the
/// user guide says (the generation file kept, so a knows and resyncs), and a writes a row before
/// it meets any peer, while its copy is not ready, which puts its own mark above the rows it lost.
/// The resync must still bring them back: a's mark says nothing about rows it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_copy_that_writes_before_its_resync_gets_its_lost_rows_back() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    a.library
        .write_rows("entries", (0..5).map(|i| entry(&format!("kept {i}"))).collect())
        .await
        .unwrap();
    converge(&mut [&mut a, &mut b]).await;
    let backup = back_up(&a).await;
    a.library
        .write_rows("entries", (0..5).map(|i| entry(&format!("lost {i}"))).collect())
        .await
        .unwrap();
    converge(&mut [&mut a, &mut b]).await;

    let a_dir = a.close().await;
    restore(a_dir.path(), &backup, false);
    // Offline: a knows it was restored (its resync is pending) and writes before it meets b.
    let offline = open_library(a_dir.path(), library, &test_config(), false).await;
    assert_eq!(
        offline.status().await.unwrap().backfill.phase,
        lsync_node::BackfillPhase::Uninitialized,
        "the restored copy is not ready until its resync"
    );
    offline.write_rows("entries", vec![entry("after the restore")]).await.unwrap();
    offline.close().await.unwrap();

    let mut a = Node::start_in(a_dir, library, "a", test_config(), false).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 11, "kept, lost and new rows are everywhere");
    a.close().await;
    b.close().await;
}

/// a's rows written after a backup reach only c; a's `library.db` is restored (a knows, and
/// resyncs) while c is away, so it resyncs from b, which never had those rows, then writes
/// again, which puts its own mark above them. When c is back it tells a what it saw of a's old
/// copy, and a resyncs from c: the rows come back everywhere. (Found by the real-mode
/// simulator: c used to forget what it saw of a once a announced its new epoch, and the rows
/// were lost on a and b for good.)
/// What c saw reaches a only in the answer to a watermark request, and a's catch-up with c
/// failed (c's sync was off): a used to ask again only when c looked ahead of it, which it no
/// longer did once a wrote. b's mark for a's rows lies above the rows' versions, so it took them
/// for deleted. Writing them again under new versions reached b, but also brought back rows a
/// deleted after the backup that a peer which missed the delete still held (the simulator
/// showed 1413 of them, seed 44); a barrier set as soon as a's first resync ended (a raising its
/// own mark and collected mark so that peers compare with it) passed this test 3 runs in 4, and
/// in the fourth c compared with b, which had compared with a, and deleted the rows on the only
/// device that still held them. Now the barrier waits until every paired peer has told what it
/// heard of a without showing another rollback; b then compares with a and takes a's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_copy_that_resynced_from_a_peer_that_knew_less_gets_its_rows_from_one_that_knew_more()
 {
    let library = new_library();
    let (mut a, mut b, mut c) = three_paired(library).await;
    let kept = (0..5).map(|i| entry(&format!("kept {i}"))).collect();
    a.library.write_rows("entries", kept).await.unwrap();
    converge(&mut [&mut a, &mut b, &mut c]).await;
    let backup = back_up(&a).await;

    b.library.set_sync_enabled(false).await;
    let lost = (0..5).map(|i| entry(&format!("lost {i}"))).collect();
    a.library.write_rows("entries", lost).await.unwrap();
    converge(&mut [&mut a, &mut c]).await;
    // a catches up with c again, so c hears where a's copy is now.
    let c_id = c.device();
    told_again(&mut a, c_id).await;
    // c goes away (it keeps its address, so that a, whose address changes, reaches it again).
    c.library.set_sync_enabled(false).await;

    let a_dir = a.close().await;
    restore(a_dir.path(), &backup, false);
    b.library.set_sync_enabled(true).await;
    let mut a = Node::start_in(a_dir, library, "a", test_config(), false).await;
    backfilled(&mut a).await;
    a.library.write_rows("entries", vec![entry("after the restore")]).await.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 6, "b never had the lost rows");

    c.library.set_sync_enabled(true).await;
    let tables = converge(&mut [&mut a, &mut b, &mut c]).await;
    assert_eq!(tables["entries"].len(), 11, "kept, lost and new rows are everywhere");
    a.close().await;
    b.close().await;
    c.close().await;
}

/// a deletes rows after a backup, in a later session; b hears of the deletes, c (away) does
/// not. a's `library.db` is restored (a knows, and resyncs): its first resync comes from b,
/// which deleted the rows too. Then c, back while b is away, tells a what it saw of a's session
/// before (writes the backup lacks), and a resyncs from c, which still holds the rows. Taking a's own rows "by c's word" brought them back on a, and
/// the barrier then had every peer take them from a (the real-mode simulator, `--topology chain
/// --seed 13`: 151 deleted entries alive everywhere). Rows the first resync's source held a's
/// rows complete through stay decided by it: a later resync from a peer that heard less takes
/// only rows above that mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_resync_from_a_peer_that_heard_less_does_not_bring_back_rows_the_first_deleted() {
    let library = new_library();
    // Tombstones go soon: b forgets the deletes before a is restored, so the resync from b
    // brings neither the rows nor their tombstones.
    let config = SyncConfig { tombstone_retention: Duration::from_millis(200), ..test_config() };
    let start = async |name: &str| {
        Node::start_in(tempfile::tempdir().unwrap(), library, name, config.clone(), true).await
    };
    let (mut a, mut b, mut c) = (start("a").await, start("b").await, start("c").await);
    pair(&mut a, &mut b).await;
    pair(&mut a, &mut c).await;
    pair(&mut b, &mut c).await;
    let doomed: Vec<RowEdit> = (0..5).map(|i| entry(&format!("doomed {i}"))).collect();
    let ids: Vec<Uuid> = doomed
        .iter()
        .map(|row| match row {
            RowEdit::Upsert { id, .. } => *id,
            _ => unreachable!(),
        })
        .collect();
    a.library.write_rows("entries", doomed).await.unwrap();
    converge(&mut [&mut a, &mut b, &mut c]).await;
    let backup = back_up(&a).await;
    // Written after the backup and heard by c, so that c knows a's copy went further.
    a.library.write_rows("entries", vec![entry("after the backup")]).await.unwrap();
    converge(&mut [&mut a, &mut b, &mut c]).await;
    let c_id = c.device();
    told_again(&mut a, c_id).await;
    c.library.set_sync_enabled(false).await;
    // A new session (a new incarnation) deletes the rows: once a is restored, c's view of the
    // old session shows a rollback even after a learned of the new one from b.
    let a_dir = a.close().await;
    let mut a = Node::start_in(a_dir, library, "a", config.clone(), false).await;

    let deletes = ids.iter().map(|id| RowEdit::Delete { id: *id }).collect();
    a.library.write_rows("entries", deletes).await.unwrap();
    converge(&mut [&mut a, &mut b]).await;
    let b_id = b.device();
    told_again(&mut a, b_id).await;
    // b collects the tombstones (c, away, is left behind by the retention).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let held: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_tombstones")
            .fetch_one(b.library.reader())
            .await
            .unwrap();
        if held == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "b still holds {held} tombstones");
        // b's next event (a heartbeat's comes every 300 ms), then look again.
        let _ = tokio::time::timeout(Duration::from_secs(1), b.events.recv()).await;
    }

    let a_dir = a.close().await;
    restore(a_dir.path(), &backup, false);
    let mut a = Node::start_in(a_dir, library, "a", config.clone(), false).await;
    backfilled(&mut a).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 1, "the first resync, from b, deleted the doomed rows");

    // b goes away, c comes back: a resyncs again, from c, which never saw the deletes.
    b.library.set_sync_enabled(false).await;
    c.library.set_sync_enabled(true).await;
    a.wait_for(|event| match event {
        lsync_node::Event::Backfill(progress)
            if progress.phase != lsync_node::BackfillPhase::Ready
                && progress.peer == Some(c_id) =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    backfilled(&mut a).await;
    b.library.set_sync_enabled(true).await;
    let tables = converge(&mut [&mut a, &mut b, &mut c]).await;
    assert_eq!(tables["entries"].len(), 1, "the doomed rows stay deleted everywhere");
    a.close().await;
    b.close().await;
    c.close().await;
}

/// As above, but the whole folder is restored (the generation file too), so nothing at open can
/// tell: b, which heard of a's copy after the backup, tells a, and a resyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_restored_without_knowing_it_learns_it_from_a_peer_and_gets_its_lost_rows_back() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    a.library
        .write_rows("entries", (0..5).map(|i| entry(&format!("kept {i}"))).collect())
        .await
        .unwrap();
    converge(&mut [&mut a, &mut b]).await;
    let backup = back_up(&a).await;
    a.library
        .write_rows("entries", (0..5).map(|i| entry(&format!("lost {i}"))).collect())
        .await
        .unwrap();
    converge(&mut [&mut a, &mut b]).await;
    // a catches up with b again, so b hears where a's copy is now.
    let b_id = b.device();
    told_again(&mut a, b_id).await;

    let a_dir = a.close().await;
    restore(a_dir.path(), &backup, true);
    // Offline: a cannot tell it was restored, and writes before it meets b.
    let offline = open_library(a_dir.path(), library, &test_config(), false).await;
    assert_eq!(
        offline.status().await.unwrap().backfill.phase,
        lsync_node::BackfillPhase::Ready,
        "nothing at open tells"
    );
    offline.write_rows("entries", vec![entry("after the restore")]).await.unwrap();
    offline.close().await.unwrap();

    let mut a = Node::start_in(a_dir, library, "a", test_config(), false).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 11, "kept, lost and new rows are everywhere");
    a.close().await;
    b.close().await;
}

/// a's clock ran a year ahead when it wrote a row; a is then re-created under its identity with
/// its clock right. Its clock does not adopt its own year-ahead versions (beyond the drift
/// bound), yet its next edit of the row must be newer than them, or it is refused as stale
/// everywhere, a itself included, while `write_rows` said Ok (found by the real-mode simulator:
/// `--seed 21 --topology random`, clock-jump then recreate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_recreated_after_its_clock_ran_a_year_ahead_can_still_edit_its_rows() {
    let library = new_library();
    let mut b = Node::start(library, "b").await;
    let a_dir = tempfile::tempdir().unwrap();
    open_library(a_dir.path(), library, &test_config(), true).await.close().await.unwrap();
    let registry = std::sync::Arc::new(lsync_store::reference_registry().unwrap());
    let year_ahead: std::sync::Arc<dyn lsync_hlc::Clock> =
        std::sync::Arc::new(crate::catchup::AheadClock { ahead_ms: 365 * 24 * 3_600_000 });
    let a_library = lsync_node::Library::open_with_clock(
        &a_dir.path().join("library.db"),
        registry,
        test_config(),
        year_ahead,
    )
    .await
    .unwrap();
    let transport = start_transport(a_dir.path(), &a_library, "a", &test_config()).await;
    let mut a = Node {
        name: "a".into(),
        dir: a_dir,
        events: a_library.subscribe(),
        library: a_library,
        transport,
    };
    pair(&mut a, &mut b).await;
    let row = entry("written a year ahead");
    let RowEdit::Upsert { id, values } = &row else { unreachable!() };
    let (id, mut values) = (*id, values.clone());
    a.library.write_rows("entries", vec![row]).await.unwrap();
    converge(&mut [&mut a, &mut b]).await;

    // a loses its file, keeps its keys, and joins again with its clock right.
    let a_dir = a.close().await;
    for file in ["library.db", "library.db-wal", "library.db-shm", "library.db-generation"] {
        let _ = std::fs::remove_file(a_dir.path().join(file));
    }
    let mut a = Node::start_as(a_dir, library, "a", test_config(), How::Join).await;
    backfilled(&mut a).await;
    values[2] = Value::from("renamed after the re-creation");
    a.library.write_rows("entries", vec![RowEdit::Upsert { id, values }]).await.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert!(
        tables["entries"][0].contains(&Value::from("renamed after the re-creation")),
        "{:?}",
        tables["entries"]
    );
    a.close().await;
    b.close().await;
}

//! Catch-up on reconnect, relay, backfill with checkpoints, re-created devices.

use lsync_node::config::SyncConfig;
use lsync_node::{BackfillPhase, Edit, RowEdit};
use lsync_protocol::Value;
use lsync_store::ENTRY_KIND_DIRECTORY;
use uuid::Uuid;

use crate::harness::*;
use crate::lifecycle::{entry, tag};

/// Writes `n` entries in bulk, in calls of at most 10,000 rows.
async fn write_entries(node: &Node, n: usize, prefix: &str) {
    let mut written = 0;
    while written < n {
        let chunk = (n - written).min(10_000);
        let rows = (written..written + chunk).map(|i| entry(&format!("{prefix}{i}"))).collect();
        node.library.write_rows("entries", rows).await.unwrap();
        written += chunk;
    }
}

fn small_pages() -> SyncConfig {
    SyncConfig { page_rows: 1_000, ..test_config() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_backfills_a_hundred_thousand_entries() {
    let library = new_library();
    let mut a = Node::start(library, "a").await;
    write_entries(&a, 100_000, "file ").await;
    a.library.write_shared((0..100).map(|i| tag(&format!("t{i}"))).collect()).await.unwrap();
    let mut b =
        Node::start_as(tempfile::tempdir().unwrap(), library, "b", test_config(), How::Join).await;
    assert_eq!(b.library.status().await.unwrap().backfill.phase, BackfillPhase::Uninitialized);
    pair_joining(&mut a, &mut b).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 100_000);
    assert_eq!(tables["tags"].len(), 100);
    let status = b.library.status().await.unwrap();
    assert_eq!(status.backfill.phase, BackfillPhase::Ready);
    assert!(status.watermarks.ready);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_resumes_from_its_checkpoint_after_a_crash() {
    let library = new_library();
    let mut a = Node::start(library, "a").await;
    write_entries(&a, 20_000, "file ").await;
    let mut b =
        Node::start_as(tempfile::tempdir().unwrap(), library, "b", small_pages(), How::Join).await;
    let invitation = a.transport.invite(std::time::Duration::from_secs(60)).await.unwrap();
    b.transport.join(&invitation).await.unwrap();
    // Stop b's engine once a few pages of entries are in.
    backfill_reached(&mut b, 5_000).await;
    let b_dir = b.close().await;
    // What the checkpoint says, read from the file before sync restarts.
    let reopened = open_library(b_dir.path(), library, &small_pages(), false).await;
    let stopped = reopened.status().await.unwrap().backfill;
    reopened.close().await.unwrap();
    assert_eq!(stopped.phase, BackfillPhase::Backfilling);
    let entries_step = |progress: &lsync_node::BackfillProgress| {
        progress
            .steps
            .iter()
            .find(|(name, _, _)| name.starts_with("entries@"))
            .map_or(0, |step| step.1)
    };
    let done_before = entries_step(&stopped);
    assert!(done_before >= 4_000, "{stopped:?}");
    let mut b = Node::start_as(b_dir, library, "b", small_pages(), How::Reopen).await;
    // The first page after the restart continues from the checkpoint: one page more, not one
    // page from zero.
    let first = b
        .wait_for(|event| match event {
            lsync_node::Event::Backfill(progress) if entries_step(progress) > done_before => {
                Some(progress.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(entries_step(&first), done_before + 1_000, "{first:?}");
    let finished = backfilled(&mut b).await;
    // Every row was fetched exactly once over both runs.
    assert_eq!(entries_step(&finished), 20_000, "{finished:?}");
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 20_000);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_continues_from_another_peer_when_its_peer_goes_away() {
    let library = new_library();
    let (mut a, mut c) = (Node::start(library, "a").await, Node::start(library, "c").await);
    pair(&mut a, &mut c).await;
    write_entries(&a, 20_000, "file ").await;
    converge(&mut [&mut a, &mut c]).await;
    let mut b =
        Node::start_as(tempfile::tempdir().unwrap(), library, "b", small_pages(), How::Join).await;
    for inviter in [&a, &c] {
        let invitation =
            inviter.transport.invite(std::time::Duration::from_secs(60)).await.unwrap();
        b.transport.join(&invitation).await.unwrap();
    }
    online(&mut b, a.device()).await;
    online(&mut b, c.device()).await;
    let progress = backfill_reached(&mut b, 5_000).await;
    let serving = progress.peer.unwrap();
    let (mut stays, gone) = if serving == a.device() { (c, a) } else { (a, c) };
    let gone_id = gone.device();
    gone.close().await;
    let finished = backfilled(&mut b).await;
    assert_eq!(finished.done, finished.total);
    let switched = b.library.status().await.unwrap();
    assert_eq!(switched.backfill.phase, BackfillPhase::Ready);
    let tables = converge(&mut [&mut stays, &mut b]).await;
    assert_eq!(tables["entries"].len(), 20_000);
    assert!(switched.peers.iter().any(|peer| peer.device == gone_id && !peer.online));
    stays.close().await;
    b.close().await;
}

/// A small tree under `root`: two folders with two files each.
fn tree(root: Uuid, prefix: &str) -> (Vec<RowEdit>, Uuid) {
    let folder = |id: Uuid, parent: Option<Uuid>, name: String, kind: i64| RowEdit::Upsert {
        id,
        values: vec![
            Value::Blob(Uuid::nil().as_bytes().to_vec()),
            parent.map_or(Value::Null, |parent| Value::Blob(parent.as_bytes().to_vec())),
            Value::from(name),
            Value::Integer(kind),
            Value::Integer(0),
            Value::Integer(1_700_000_000),
        ],
    };
    let mut rows = vec![folder(root, None, format!("{prefix}root"), ENTRY_KIND_DIRECTORY)];
    let mut first_folder = root;
    for f in 0..2 {
        let id = Uuid::now_v7();
        if f == 0 {
            first_folder = id;
        }
        rows.push(folder(id, Some(root), format!("{prefix}dir{f}"), ENTRY_KIND_DIRECTORY));
        for n in 0..2 {
            rows.push(folder(
                Uuid::now_v7(),
                Some(id),
                format!("{prefix}dir{f}/file{n}"),
                lsync_store::ENTRY_KIND_FILE,
            ));
        }
    }
    (rows, first_folder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_peer_gets_writes_deletes_and_subtree_deletes_made_while_apart() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    let (rows, folder) = tree(Uuid::now_v7(), "a/");
    let single = entry("deleted while b is away");
    let RowEdit::Upsert { id: single_id, .. } = &single else { unreachable!() };
    let single_id = *single_id;
    a.library.write_rows("entries", rows).await.unwrap();
    a.library.write_rows("entries", vec![single]).await.unwrap();
    let doomed_tag = tag("doomed");
    let Edit::Insert { id: doomed_id, .. } = &doomed_tag else { unreachable!() };
    let doomed_id = *doomed_id;
    a.library.write_shared(vec![doomed_tag]).await.unwrap();
    converge(&mut [&mut a, &mut b]).await;

    // b goes away; both sides write while apart.
    let b_id = b.device();
    let b_dir = b.close().await;
    a.library
        .write_rows(
            "entries",
            vec![
                RowEdit::Delete { id: single_id },
                RowEdit::DeleteSubtree { id: folder },
                entry("new on a"),
            ],
        )
        .await
        .unwrap();
    a.library
        .write_shared(vec![
            tag("a while apart"),
            Edit::Delete { model: "tags".into(), id: doomed_id },
        ])
        .await
        .unwrap();
    let offline_b = open_library(b_dir.path(), library, &test_config(), false).await;
    offline_b.write_rows("entries", vec![entry("new on b")]).await.unwrap();
    offline_b.write_shared(vec![tag("b while apart")]).await.unwrap();
    offline_b.close().await.unwrap();

    // b comes back.
    let mut b = Node::start_in(b_dir, library, "b", test_config(), false).await;
    online(&mut a, b_id).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    let names: Vec<&Value> = tables["entries"].iter().map(|row| &row[5]).collect();
    assert!(names.contains(&&Value::from("new on a")) && names.contains(&&Value::from("new on b")));
    assert!(!names.contains(&&Value::from("deleted while b is away")));
    assert!(!names.iter().any(|name| matches!(name, Value::Text(t) if t.starts_with("a/dir0"))));
    // The root, the other folder and its two files remain.
    assert_eq!(
        tables["entries"]
            .iter()
            .filter(|row| matches!(&row[5], Value::Text(t) if t.starts_with("a/")))
            .count(),
        4
    );
    let tags: Vec<&Value> = tables["tags"].iter().flat_map(|row| row.iter()).collect();
    assert!(
        tags.contains(&&Value::from("a while apart"))
            && tags.contains(&&Value::from("b while apart"))
    );
    assert!(!tags.contains(&&Value::from("doomed")));
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_catches_up_on_an_offline_device_through_a_third() {
    let library = new_library();
    let (mut a, mut b, mut c) = (
        Node::start(library, "a").await,
        Node::start(library, "b").await,
        Node::start(library, "c").await,
    );
    // a–b and b–c are paired; a and c never meet.
    pair(&mut a, &mut b).await;
    pair(&mut b, &mut c).await;
    let c_dir = c.close().await;
    a.library
        .write_rows("entries", (0..50).map(|i| entry(&format!("a{i}"))).collect())
        .await
        .unwrap();
    a.library.write_shared(vec![tag("from a")]).await.unwrap();
    converge(&mut [&mut a, &mut b]).await;
    let expected = a.tables().await;
    a.close().await;
    let mut c = Node::start_in(c_dir, library, "c", test_config(), false).await;
    let tables = converge(&mut [&mut b, &mut c]).await;
    assert_eq!(tables, expected);
    b.close().await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_re_created_under_its_identity_gets_its_data_back_and_numbers_on() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    a.library
        .write_rows("entries", (0..30).map(|i| entry(&format!("a{i}"))).collect())
        .await
        .unwrap();
    a.library.write_shared((0..5).map(|i| tag(&format!("a{i}"))).collect()).await.unwrap();
    let before = converge(&mut [&mut a, &mut b]).await;
    let old_epoch = a.library.identity().epoch;
    let a_id = a.device();

    // a loses its library file but keeps its keys and pairings, and joins again.
    let a_dir = a.close().await;
    for file in ["library.db", "library.db-wal", "library.db-shm"] {
        let _ = std::fs::remove_file(a_dir.path().join(file));
    }
    let mut a = Node::start_as(a_dir, library, "a", test_config(), How::Join).await;
    assert_eq!(a.device(), a_id);
    assert_ne!(a.library.identity().epoch, old_epoch);
    backfilled(&mut a).await;
    assert_eq!(converge(&mut [&mut a, &mut b]).await, before);
    // New writes continue a's numbering and clock: b applies them instead of taking them for
    // duplicates of a's old changes.
    a.library.write_shared(vec![tag("after re-creation")]).await.unwrap();
    a.library.write_rows("entries", vec![entry("after re-creation")]).await.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["tags"].len(), 6);
    assert_eq!(tables["entries"].len(), 31);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_restored_from_an_old_file_fetches_back_what_it_lost_and_numbers_on() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    a.library.write_shared((0..3).map(|i| tag(&format!("kept{i}"))).collect()).await.unwrap();
    let kept = a
        .library
        .write_rows("entries", (0..10).map(|i| entry(&format!("kept{i}"))).collect())
        .await
        .unwrap();
    converge(&mut [&mut a, &mut b]).await;

    // A backup of a's file, taken while it runs.
    let db = a.dir.path().join("library.db");
    let backup = a.dir.path().join("backup.db");
    sqlx::query("VACUUM INTO ?1")
        .bind(backup.to_str().unwrap())
        .execute(a.library.reader())
        .await
        .unwrap();

    // After the backup: new shared changes (numbered after the backup's), rows, a delete.
    a.library.write_shared((0..4).map(|i| tag(&format!("lost{i}"))).collect()).await.unwrap();
    a.library
        .write_rows("entries", (0..5).map(|i| entry(&format!("lost{i}"))).collect())
        .await
        .unwrap();
    a.library.write_rows("entries", vec![RowEdit::Delete { id: kept[0].id }]).await.unwrap();
    let before = converge(&mut [&mut a, &mut b]).await;
    let old_epoch = a.library.identity().epoch;

    // The backup is restored over the file.
    let a_dir = a.close().await;
    for file in ["library.db-wal", "library.db-shm"] {
        let _ = std::fs::remove_file(a_dir.path().join(file));
    }
    std::fs::copy(&backup, &db).unwrap();
    let mut a = Node::start_as(a_dir, library, "a", test_config(), How::Reopen).await;
    assert_ne!(a.library.identity().epoch, old_epoch, "a restored copy announces a new epoch");
    assert!(
        matches!(
            a.library.write_shared(vec![tag("too early")]).await,
            Err(lsync_node::LibraryError::NotReady { .. })
        ),
        "no shared change is numbered before the copy knows its peers' numbering"
    );
    backfilled(&mut a).await;
    // The lost tags and rows are back, the deleted row is gone again.
    assert_eq!(converge(&mut [&mut a, &mut b]).await, before);

    // New changes continue after what b holds from a: b applies them instead of dropping them
    // as duplicates of the lost ones.
    a.library.write_shared(vec![tag("after restore")]).await.unwrap();
    a.library.write_rows("entries", vec![entry("after restore")]).await.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["tags"].len(), 8);
    assert_eq!(tables["entries"].len(), 15);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_restored_with_its_generation_file_learns_it_from_its_peer_and_resyncs() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    a.library.write_shared((0..3).map(|i| tag(&format!("kept{i}"))).collect()).await.unwrap();
    converge(&mut [&mut a, &mut b]).await;
    let db = a.dir.path().join("library.db");
    let (backup, generation) =
        (a.dir.path().join("backup.db"), a.dir.path().join("library.db-generation"));
    sqlx::query("VACUUM INTO ?1")
        .bind(backup.to_str().unwrap())
        .execute(a.library.reader())
        .await
        .unwrap();
    let backup_generation = std::fs::read(&generation).unwrap();
    a.library.write_shared((0..4).map(|i| tag(&format!("lost{i}"))).collect()).await.unwrap();
    let before = converge(&mut [&mut a, &mut b]).await;

    // Both files restored: the file count cannot tell; b's watermarks can.
    let a_dir = a.close().await;
    for file in ["library.db-wal", "library.db-shm"] {
        let _ = std::fs::remove_file(a_dir.path().join(file));
    }
    std::fs::copy(&backup, &db).unwrap();
    std::fs::write(&generation, backup_generation).unwrap();
    let mut a = Node::start_as(a_dir, library, "a", test_config(), How::Reopen).await;
    assert_eq!(a.library.status().await.unwrap().backfill.phase, BackfillPhase::Ready);
    backfilled(&mut a).await;
    assert_eq!(converge(&mut [&mut a, &mut b]).await, before);
    a.library.write_shared(vec![tag("after restore")]).await.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["tags"].len(), 8, "b applied the new tag instead of taking it for lost2");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_left_behind_by_retention_resyncs_fully() {
    let library = new_library();
    // a keeps at most 10 log entries per origin and collects tombstones at once.
    let short_memory = SyncConfig {
        log_max_entries_per_origin: 10,
        tombstone_retention: std::time::Duration::from_millis(1),
        ..test_config()
    };
    let mut a =
        Node::start_in(tempfile::tempdir().unwrap(), library, "a", short_memory, true).await;
    let mut b = Node::start(library, "b").await;
    pair(&mut a, &mut b).await;
    let rows = a
        .library
        .write_rows("entries", (0..20).map(|i| entry(&format!("e{i}"))).collect())
        .await
        .unwrap();
    converge(&mut [&mut a, &mut b]).await;

    let b_id = b.device();
    let b_dir = b.close().await;
    let deletes = rows.iter().take(5).map(|row| RowEdit::Delete { id: row.id }).collect();
    a.library.write_rows("entries", deletes).await.unwrap();
    a.library.write_shared((0..30).map(|i| tag(&format!("t{i}"))).collect()).await.unwrap();
    // a prunes what b never received and marks b for a full resync.
    eventually(&mut a, async |library| {
        let status = library.status().await.unwrap();
        let tombstones: i64 = library
            .with_transaction(async |conn| {
                Ok(sqlx::query_scalar("SELECT count(*) FROM sync_tombstones")
                    .fetch_one(conn)
                    .await?)
            })
            .await
            .unwrap();
        status.log_entries <= 10
            && tombstones == 0
            && status.peers.iter().any(|peer| peer.device == b_id && peer.needs_resync)
    })
    .await;

    let mut b = Node::start_in(b_dir, library, "b", test_config(), false).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(
        tables["entries"].len(),
        15,
        "the deletions whose tombstones were collected arrived"
    );
    assert_eq!(tables["tags"].len(), 30, "the changes pruned from the log arrived");
    // Once b reported its resync finished, a stops asking.
    eventually(&mut a, async |library| {
        let status = library.status().await.unwrap();
        status.peers.iter().any(|peer| peer.device == b_id && !peer.needs_resync)
    })
    .await;
    a.close().await;
    b.close().await;
}

/// A wall clock running `ahead_ms` ahead of the real one.
struct AheadClock {
    ahead_ms: u64,
}

impl lsync_hlc::Clock for AheadClock {
    fn now_ms(&self) -> u64 {
        lsync_hlc::SystemClock.now_ms() + self.ahead_ms
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_a_clock_beyond_the_drift_bound_are_kept_and_the_skew_is_visible() {
    let library = new_library();
    let mut a = Node::start(library, "a").await;
    // c's clock runs two hours ahead, far beyond the 60 s drift bound.
    let c_dir = tempfile::tempdir().unwrap();
    open_library(c_dir.path(), library, &test_config(), true).await.close().await.unwrap();
    let registry = std::sync::Arc::new(lsync_store::reference_registry().unwrap());
    let clock: std::sync::Arc<dyn lsync_hlc::Clock> =
        std::sync::Arc::new(AheadClock { ahead_ms: 2 * 3_600_000 });
    let c_library = lsync_node::Library::open_with_clock(
        &c_dir.path().join("library.db"),
        registry,
        test_config(),
        clock,
    )
    .await
    .unwrap();
    let transport = start_transport(c_dir.path(), &c_library, "c", &test_config()).await;
    let mut c = Node {
        name: "c".into(),
        dir: c_dir,
        events: c_library.subscribe(),
        library: c_library,
        transport,
    };
    pair(&mut a, &mut c).await;
    let record = tag("from the future");
    let Edit::Insert { id, .. } = &record else { unreachable!() };
    let id = *id;
    c.library.write_shared(vec![record]).await.unwrap();
    c.library.write_rows("entries", vec![entry("from the future")]).await.unwrap();
    let tables = converge(&mut [&mut a, &mut c]).await;
    assert_eq!(tables["tags"].len(), 1, "nothing is lost");
    assert_eq!(tables["entries"].len(), 1, "nothing is lost");
    let status = a.library.status().await.unwrap();
    assert!(status.skewed_changes >= 1, "the skew is visible: {status:?}");
    assert!(status.clock_lead_ms < 60_000, "a's clock did not jump two hours ahead");
    // a can still edit the record; its own stamp is older, so c's future stamp keeps winning
    // the field until a's clock passes it (last writer wins by stamp, as documented).
    a.library
        .write_shared(vec![Edit::Update {
            model: "tags".into(),
            id,
            fields: [("name".to_owned(), Value::from("renamed on a"))].into_iter().collect(),
        }])
        .await
        .unwrap();
    let tables = converge(&mut [&mut a, &mut c]).await;
    assert!(tables["tags"][0].contains(&Value::from("from the future")));
    a.close().await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_heartbeats_goes_offline_and_catches_up_when_back() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    let b_id = b.device();
    // b hangs: its connection stays open but it answers no heartbeat.
    b.transport.set_answer_heartbeats(false);
    let reason = a
        .wait_for(|event| match event {
            lsync_node::Event::PeerOffline { peer, reason } if *peer == b_id => {
                Some(reason.clone())
            }
            _ => None,
        })
        .await;
    assert!(reason.contains("heartbeat") || reason.contains("stale"), "{reason}");
    let status = a.library.status().await.unwrap();
    assert!(status.peers.iter().any(|peer| peer.device == b_id && !peer.online));
    a.library.write_rows("entries", vec![entry("while b hung")]).await.unwrap();
    b.transport.set_answer_heartbeats(true);
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 1);
    a.close().await;
    b.close().await;
}

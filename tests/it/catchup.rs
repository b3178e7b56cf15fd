//! Catch-up on reconnect, relay, backfill with checkpoints, re-created devices.

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use lsync_backfill::{Checkpoint, StepKind};
use lsync_node::config::SyncConfig;
use lsync_node::{BackfillPhase, Edit, Event, RowEdit};
use lsync_protocol::{LibraryId, Value};
use lsync_store::ENTRY_KIND_DIRECTORY;
use lsync_transport::Invitation;
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

/// A device closed (gracefully) in the middle of its backfill resumes from its checkpoint: the
/// close path — writes held while the actors stop, the page read ahead dropped — loses and
/// repeats nothing. (A kill is the test below.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_closed_mid_way_resumes_from_its_checkpoint() {
    let library = new_library();
    let mut a = Node::start(library, "a").await;
    write_entries(&a, 20_000, "file ").await;
    let mut b =
        Node::start_as(tempfile::tempdir().unwrap(), library, "b", small_pages(), How::Join).await;
    let invitation = a.transport.invite(Duration::from_secs(60)).await.unwrap();
    b.transport.join(&invitation).await.unwrap();
    // Stop b's engine once a few pages of entries are in.
    backfill_reached(&mut b, 5_000).await;
    let b_dir = b.close().await;
    // What the checkpoint says, read from the file before sync restarts.
    let reopened = open_library(b_dir.path(), library, &small_pages(), false).await;
    let stopped = reopened.status().await.unwrap().backfill;
    reopened.close().await.unwrap();
    assert_eq!(stopped.phase, BackfillPhase::Backfilling);
    let done_before = entries_done(&stopped);
    assert!(done_before >= 4_000, "{stopped:?}");
    let mut b = Node::start_as(b_dir, library, "b", small_pages(), How::Reopen).await;
    // The first page after the restart continues from the checkpoint: one page more, not one
    // page from zero.
    let first = b
        .wait_for(|event| match event {
            Event::Backfill(progress) if entries_done(progress) > done_before => {
                Some(progress.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(entries_done(&first), done_before + 1_000, "{first:?}");
    let finished = backfilled(&mut b).await;
    // Every row was fetched exactly once over both runs.
    assert_eq!(entries_done(&finished), 20_000, "{finished:?}");
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 20_000);
    a.close().await;
    b.close().await;
}

/// The harness's name of [`the_joining_device_that_is_killed`], to run it alone.
const KILLED_CHILD: &str = "catchup::the_joining_device_that_is_killed";
/// The child's first line: it runs, and has what it needs.
const CHILD_STARTED: &str = "CHILD started";
/// The start of the child's line for each backfill progress: `CHILD progress <entries done>`.
const CHILD_PROGRESS: &str = "CHILD progress ";

/// The joining device of [`a_backfill_resumes_from_its_checkpoint_after_its_process_is_killed`],
/// which runs it in a child process: joins the library in `IT_CHILD_DIR` by the invitation
/// `IT_CHILD_TOKEN` and prints every backfill progress, until it is killed (or, if the kill comes
/// too late, until its backfill finished). Without that environment it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of a_backfill_resumes_from_its_checkpoint_after_its_process_is_killed"]
async fn the_joining_device_that_is_killed() {
    let (Some(dir), Ok(library), Ok(token)) = (
        std::env::var_os("IT_CHILD_DIR"),
        std::env::var("IT_CHILD_LIBRARY"),
        std::env::var("IT_CHILD_TOKEN"),
    ) else {
        return;
    };
    println!("{CHILD_STARTED}");
    let dir = std::path::PathBuf::from(dir);
    let library = LibraryId(library.parse().unwrap());
    let library = open_library_as(&dir, library, &small_pages(), How::Join).await;
    let mut events = library.subscribe();
    let transport = start_transport(&dir, &library, "b", &small_pages()).await;
    transport.join(&Invitation::from_token(&token).unwrap()).await.unwrap();
    loop {
        let event = tokio::time::timeout(WAIT, events.recv()).await.unwrap().unwrap();
        if let Event::Backfill(progress) = event {
            println!("{CHILD_PROGRESS}{}", entries_done(&progress));
            if progress.phase == BackfillPhase::Ready {
                break;
            }
        }
    }
    library.close().await.unwrap();
}

/// Whether `checkpoint` is in the middle of the `entries` step: some of its pages applied, not
/// all, so a restart has a cursor to continue after.
fn mid_entries(checkpoint: &Checkpoint) -> bool {
    checkpoint.phase == lsync_backfill::Phase::Backfilling
        && checkpoint.cursor.is_some()
        && checkpoint.steps.get(checkpoint.current).is_some_and(
            |step| matches!(&step.kind, StepKind::State { model, .. } if model == "entries"),
        )
}

/// A device holding `rows` entries, and a device joining it in a child process that is killed
/// (SIGKILL) once its persisted checkpoint shows a sixth of the entries applied. Returns the
/// serving device, the killed device's folder and the checkpoint it left; `None` if the backfill
/// was past the entries step before the kill landed.
async fn kill_mid_backfill(rows: usize) -> Option<(Node, tempfile::TempDir, Checkpoint)> {
    let library = new_library();
    let a = Node::start(library, "a").await;
    write_entries(&a, rows, "file ").await;
    let b_dir = tempfile::tempdir().unwrap();
    let token = a.transport.invite(Duration::from_secs(60)).await.unwrap().to_token();
    let library_text = library.0.to_string();
    let mut child = ChildTest::spawn(
        KILLED_CHILD,
        &[
            ("IT_CHILD_DIR", b_dir.path().as_os_str()),
            ("IT_CHILD_LIBRARY", OsStr::new(&library_text)),
            ("IT_CHILD_TOKEN", OsStr::new(&token)),
        ],
    );
    let threshold = rows as u64 / 6;
    let mut started = false;
    loop {
        let Some(line) = child.line().await else {
            let status = child.wait();
            assert!(started, "the child test {KILLED_CHILD} did not run ({status})");
            assert!(status.success(), "the child failed before the kill: {status}");
            // It finished: the kill would have come too late.
            a.close().await;
            return None;
        };
        // The test harness's own output may share the line (`test <name> ... CHILD started`).
        started |= line.ends_with(CHILD_STARTED);
        let Some((_, done)) = line.split_once(CHILD_PROGRESS) else { continue };
        // The progress is published after its page committed; the file confirms it.
        if done.parse::<u64>().unwrap() >= threshold {
            let persisted = persisted_checkpoint(b_dir.path()).await;
            if mid_entries(&persisted) && persisted.steps[persisted.current].done >= threshold {
                break;
            }
        }
    }
    let status = child.kill();
    assert_eq!(status.signal(), Some(SIGKILL), "the child was killed, not stopped: {status}");
    // The checkpoint the killed process left, whatever it committed after the check above.
    let killed = persisted_checkpoint(b_dir.path()).await;
    if mid_entries(&killed) {
        Some((a, b_dir, killed))
    } else {
        assert!(
            killed.current
                > killed.steps.iter().position(|s| s.name().starts_with("entries@")).unwrap(),
            "a checkpoint that went backwards: {killed:?}"
        );
        a.close().await;
        None
    }
}

/// SIGKILL's number (Linux).
const SIGKILL: i32 = 9;

/// The receiver's engine is killed mid-backfill — its process, with SIGKILL: no close, no flush,
/// maybe in the middle of a page's transaction — and its library reopened: the backfill resumes
/// from the checkpoint the killed process committed and fetches exactly the rows it lacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_resumes_from_its_checkpoint_after_its_process_is_killed() {
    let mut rows = 30_000;
    let (mut a, b_dir, killed) = loop {
        if let Some(landed) = kill_mid_backfill(rows).await {
            break landed;
        }
        assert!(rows < 120_000, "the backfill of {rows} entries finished before the kill landed");
        rows *= 2;
    };
    let rows = rows as u64;
    let (done_at_kill, cursor) = (killed.steps[killed.current].done, killed.cursor);
    assert!(0 < done_at_kill && done_at_kill < rows, "{killed:?}");
    println!("killed with {done_at_kill} of {rows} entries applied, cursor {cursor:?}");

    // Reopened, before sync starts: the backfill stands where the killed process left it.
    let library = a.library.identity().library;
    let reopened = open_library_as(b_dir.path(), library, &small_pages(), How::Reopen).await;
    let resumed = reopened.status().await.unwrap().backfill;
    assert_eq!(resumed.phase, BackfillPhase::Backfilling, "{resumed:?}");
    assert_eq!(entries_done(&resumed), done_at_kill, "{resumed:?}");
    let (mut b, log) = Node::sync_recording(b_dir, reopened, "b", &small_pages()).await;
    // Its first page is the one after the checkpoint: one page more, not one page from zero.
    let first = b
        .wait_for(|event| match event {
            Event::Backfill(progress) if entries_done(progress) > done_at_kill => {
                Some(progress.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(entries_done(&first), done_at_kill + 1_000.min(rows - done_at_kill), "{first:?}");
    let finished = backfilled(&mut b).await;
    assert_eq!(entries_done(&finished), rows, "every row applied once over both runs");

    // What the resumed run asked for: first the page after the checkpoint's cursor, and nothing
    // of the steps the killed process had finished, nor anything from the start of a step.
    let requests = log.lock().unwrap().clone();
    assert_eq!(
        requests.first().map(|request| (request.model.as_str(), request.after)),
        Some(("entries", cursor)),
        "{requests:?}"
    );
    let finished_steps: Vec<String> = killed.steps[..killed.current]
        .iter()
        .map(|step| match &step.kind {
            StepKind::Shared { model } | StepKind::State { model, .. } => model.clone(),
        })
        .collect();
    assert!(
        requests.iter().all(|request| !finished_steps.contains(&request.model)),
        "a finished step was fetched again: {requests:?}"
    );
    assert!(
        requests.iter().filter(|request| request.model == "entries").all(|r| r.after.is_some()),
        "entries were fetched from the start again: {requests:?}"
    );
    let served: usize = answered_pages(&log, a.device(), "entries").values().sum();
    println!("resumed: {} page requests, {served} entries served", requests.len());
    assert_eq!(served as u64, rows - done_at_kill, "the resumed run fetched only what it lacked");
    // No row missing, none twice: b holds exactly a's tables.
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len() as u64, rows);
    a.close().await;
    b.close().await;
}

/// The serving peer goes away mid-backfill: the other peer continues from the checkpoint (after
/// its cursor, with the rows already applied kept), it does not start over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_continues_from_another_peer_when_its_peer_goes_away() {
    let library = new_library();
    let (mut a, mut c) = (Node::start(library, "a").await, Node::start(library, "c").await);
    pair(&mut a, &mut c).await;
    write_entries(&a, 20_000, "file ").await;
    converge(&mut [&mut a, &mut c]).await;
    let (mut b, log) =
        Node::start_recording(tempfile::tempdir().unwrap(), library, "b", small_pages(), How::Join)
            .await;
    for inviter in [&a, &c] {
        let invitation = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
        b.transport.join(&invitation).await.unwrap();
    }
    online(&mut b, a.device()).await;
    online(&mut b, c.device()).await;
    let progress = backfill_reached(&mut b, 5_000).await;
    let seen = entries_done(&progress);
    let serving = progress.peer.unwrap();
    let (mut stays, gone) = if serving == a.device() { (c, a) } else { (a, c) };
    let (stays_id, gone_id) = (stays.device(), gone.device());
    gone.close().await;
    // The switch: the rebased checkpoint is stored and published before any page of the other
    // peer. It still holds every row applied from the first one.
    let switched = b
        .wait_for(|event| match event {
            Event::Backfill(progress)
                if progress.peer == Some(stays_id) || progress.phase == BackfillPhase::Ready =>
            {
                Some(progress.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(switched.phase, BackfillPhase::Backfilling, "finished before any switch");
    let at_switch = entries_done(&switched);
    assert!(
        at_switch >= seen,
        "the checkpoint was reset at the switch ({seen} seen): {switched:?}"
    );
    // The first page of the other peer continues from there: one page more.
    let first = b
        .wait_for(|event| match event {
            Event::Backfill(progress) if entries_done(progress) > at_switch => {
                Some(progress.clone())
            }
            _ => None,
        })
        .await;
    assert_eq!(first.peer, Some(stays_id), "{first:?}");
    assert_eq!(entries_done(&first), (at_switch + 1_000).min(20_000), "{first:?}");
    let finished = backfilled(&mut b).await;
    // A restart from the step's start would count more rows than there are.
    assert_eq!(entries_done(&finished), 20_000, "{finished:?}");

    // What b asked: the other peer's first page starts after the last key of the first peer's
    // pages that the checkpoint counted, and it served exactly the rest.
    let requests = log.lock().unwrap().clone();
    let mut from_gone: Vec<&PageRequest> = Vec::new();
    for request in requests.iter().filter(|r| r.peer == gone_id && r.model == "entries") {
        if request.rows.is_some() && !from_gone.iter().any(|seen| seen.after == request.after) {
            from_gone.push(request);
        }
    }
    let resumed_after = requests
        .iter()
        .find(|request| request.peer == stays_id && request.model == "entries")
        .and_then(|request| request.after)
        .expect("the other peer is asked for entries after a key, not from the start");
    let through = from_gone
        .iter()
        .position(|page| page.last == Some(resumed_after))
        .expect("the other peer continues after a key the first one served");
    let applied_before: usize = from_gone[..=through].iter().filter_map(|page| page.rows).sum();
    assert_eq!(applied_before as u64, at_switch, "the cursor and the count agree at the switch");
    let served: usize = answered_pages(&log, stays_id, "entries").values().sum();
    assert_eq!(served as u64, 20_000 - at_switch, "the other peer served only the rest");

    let status = b.library.status().await.unwrap();
    assert_eq!(status.backfill.phase, BackfillPhase::Ready);
    let tables = converge(&mut [&mut stays, &mut b]).await;
    assert_eq!(tables["entries"].len(), 20_000);
    assert!(status.peers.iter().any(|peer| peer.device == gone_id && !peer.online));
    stays.close().await;
    b.close().await;
}

/// A small tree under `root`: two folders with two files each.
pub fn tree(root: Uuid, prefix: &str) -> (Vec<RowEdit>, Uuid) {
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
    let backup = back_up(&a).await;

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
    restore(a_dir.path(), &backup, false);
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
    let backup = back_up(&a).await;
    a.library.write_shared((0..4).map(|i| tag(&format!("lost{i}"))).collect()).await.unwrap();
    let before = converge(&mut [&mut a, &mut b]).await;

    // Both files restored: the file count cannot tell; b's watermarks can.
    let a_dir = a.close().await;
    restore(a_dir.path(), &backup, true);
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
async fn a_device_left_behind_by_retention_catches_up_without_a_full_resync() {
    let library = new_library();
    // a keeps at most 10 log entries per origin and collects tombstones at once.
    let short_memory = SyncConfig {
        log_max_entries_per_origin: 10,
        tombstone_retention: Duration::from_millis(1),
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
    // Once b acknowledged everything a dropped, it counts for pruning again.
    eventually(&mut a, async |library| {
        let status = library.status().await.unwrap();
        status.peers.iter().any(|peer| peer.device == b_id && !peer.needs_resync)
    })
    .await;
    // b got the deletions by comparing entries with a, and the pruned changes from a snapshot
    // of the shared records: never a full resync, which a asked for until now (and asked again
    // on every later catch-up when another peer had served it).
    let steps: Vec<String> = b
        .library
        .status()
        .await
        .unwrap()
        .backfill
        .steps
        .iter()
        .map(|(name, ..)| name.clone())
        .collect();
    assert!(
        steps.iter().all(|step| !step.starts_with("entries")),
        "no backfill of rows ran on b: {steps:?}"
    );
    a.close().await;
    b.close().await;
}

/// A wall clock running `ahead_ms` ahead of the real one.
pub struct AheadClock {
    pub ahead_ms: u64,
}

impl lsync_hlc::Clock for AheadClock {
    fn now_ms(&self) -> u64 {
        lsync_hlc::SystemClock.now_ms() + self.ahead_ms
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_from_a_clock_beyond_the_drift_bound_are_kept_the_skew_is_visible_and_a_later_edit_wins()
 {
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
    let c_id = c.device();
    let offset =
        status.peers.iter().find(|peer| peer.device == c_id).and_then(|peer| peer.clock_offset_ms);
    assert!(
        offset.is_some_and(|offset| (7_000_000..7_400_000).contains(&offset)),
        "the device two hours ahead is named with its offset: {offset:?}"
    );
    assert!(status.clock_lead_ms < 60_000, "a's clock did not jump two hours ahead");
    // a, having seen c's name, renames the tag: the rename wins everywhere although a's clock is
    // two hours behind c's stamp (a local edit is stamped after every stamp the record holds).
    a.library
        .write_shared(vec![Edit::Update {
            model: "tags".into(),
            id,
            fields: [("name".to_owned(), Value::from("renamed on a"))].into_iter().collect(),
        }])
        .await
        .unwrap();
    let tables = converge(&mut [&mut a, &mut c]).await;
    assert!(tables["tags"][0].contains(&Value::from("renamed on a")), "{:?}", tables["tags"]);
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
            Event::PeerOffline { peer, reason } if *peer == b_id => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.contains("heartbeat") || reason.contains("stale"), "{reason}");
    let status = a.library.status().await.unwrap();
    if !status.peers.iter().any(|peer| peer.device == b_id && !peer.online) {
        // b, whose own heartbeats are answered, redialled at once after a closed the connection
        // (a race with this status call): then its new connection was announced.
        a.wait_for(|event| {
            matches!(event, Event::PeerOnline { peer, .. } if *peer == b_id).then_some(())
        })
        .await;
    }
    a.library.write_rows("entries", vec![entry("while b hung")]).await.unwrap();
    b.transport.set_answer_heartbeats(true);
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 1);
    a.close().await;
    b.close().await;
}

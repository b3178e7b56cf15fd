//! Live sync between devices over QUIC: device-owned rows, shared data with conflicts, several
//! peers, batching, pruning, retries, disabling sync, and shutdown.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use lsync_node::{Edit, Event, RowEdit};
use lsync_protocol::Value;
use uuid::Uuid;

use crate::harness::*;
use crate::lifecycle::{entry, tag};

fn fields(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, Value> {
    pairs.iter().map(|(name, value)| ((*name).to_owned(), Value::from(*value))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_sync_device_owned_rows() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    let edits: Vec<RowEdit> = (0..2_000).map(|index| entry(&format!("file {index}"))).collect();
    a.library.write_rows("entries", edits).await.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 2_000);
    // b's own rows reach a too.
    b.library.write_rows("entries", vec![entry("from b")]).await.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 2_001);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_resolve_by_hlc_and_edits_of_different_fields_both_survive() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    let id = Uuid::now_v7();
    a.library
        .write_shared(vec![Edit::Insert {
            model: "tags".into(),
            id,
            fields: fields(&[("name", "work")]),
        }])
        .await
        .unwrap();
    converge(&mut [&mut a, &mut b]).await;

    // Different fields of one record, at the same time on both devices: both edits survive.
    let rename = Edit::Update { model: "tags".into(), id, fields: fields(&[("name", "job")]) };
    let recolor = Edit::Update { model: "tags".into(), id, fields: fields(&[("color", "red")]) };
    let (first, second) =
        tokio::join!(a.library.write_shared(vec![rename]), b.library.write_shared(vec![recolor]));
    first.unwrap();
    second.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["tags"][0][1..], [Value::from("job"), Value::from("red")]);

    // The same field at the same time: one value wins, the same on both devices.
    let (first, second) = tokio::join!(
        a.library.write_shared(vec![Edit::Update {
            model: "tags".into(),
            id,
            fields: fields(&[("name", "from a")])
        }]),
        b.library.write_shared(vec![Edit::Update {
            model: "tags".into(),
            id,
            fields: fields(&[("name", "from b")])
        }]),
    );
    let (from_a, from_b) = (first.unwrap(), second.unwrap());
    let tables = converge(&mut [&mut a, &mut b]).await;
    let winner = if from_a[0].hlc() > from_b[0].hlc() { "from a" } else { "from b" };
    assert_eq!(tables["tags"][0][1], Value::from(winner), "the larger HLC stamp wins");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_converge() {
    let library = new_library();
    let mut a = Node::start(library, "a").await;
    let mut b = Node::start(library, "b").await;
    let mut c = Node::start(library, "c").await;
    pair(&mut a, &mut b).await;
    pair(&mut a, &mut c).await;
    pair(&mut b, &mut c).await;
    a.library
        .write_rows("entries", (0..300).map(|i| entry(&format!("a{i}"))).collect())
        .await
        .unwrap();
    b.library.write_shared((0..50).map(|i| tag(&format!("b{i}"))).collect()).await.unwrap();
    c.library
        .write_rows("entries", (0..300).map(|i| entry(&format!("c{i}"))).collect())
        .await
        .unwrap();
    let tables = converge(&mut [&mut a, &mut b, &mut c]).await;
    assert_eq!(tables["entries"].len(), 600);
    assert_eq!(tables["tags"].len(), 50);
    for node in [a, b, c] {
        node.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_pruned_once_every_peer_acknowledged() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    a.library.write_shared((0..200).map(|i| tag(&format!("t{i}"))).collect()).await.unwrap();
    converge(&mut [&mut a, &mut b]).await;
    for node in [&mut a, &mut b] {
        eventually(node, async |library| library.status().await.unwrap().log_entries == 0).await;
    }
    let status = a.library.status().await.unwrap();
    assert_eq!(status.peers[0].lag, 0);
    a.close().await;
    b.close().await;
}

/// A new device whose first `failures` sends of batches fail, as a dropped connection would make
/// them fail; returns it and the count of failures still to come.
async fn start_dropping_batches(
    library: lsync_protocol::LibraryId,
    name: &str,
    config: &lsync_node::config::SyncConfig,
    failures: usize,
) -> (Node, Arc<AtomicUsize>) {
    let dir = tempfile::tempdir().unwrap();
    let node_library = open_library(dir.path(), library, config, true).await;
    let (transport, events) = quic(dir.path(), &node_library, name, config).await;
    let failures = Arc::new(AtomicUsize::new(failures));
    let flaky = FlakyTransport { inner: transport.clone(), failures: failures.clone() };
    node_library.start_sync(flaky, events).await.unwrap();
    let node = Node {
        name: name.into(),
        dir,
        events: node_library.subscribe(),
        library: node_library,
        transport,
    };
    (node, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_send_is_retried_until_acknowledged() {
    let library = new_library();
    // Heartbeats rarely, so that catch-up by watermark does not deliver the row before the retry.
    let config = lsync_node::config::SyncConfig {
        heartbeat_interval: std::time::Duration::from_secs(5),
        stale_timeout: std::time::Duration::from_secs(15),
        ..test_config()
    };
    let (mut a, failures) = start_dropping_batches(library, "a", &config, 2).await;
    let mut b =
        Node::start_in(tempfile::tempdir().unwrap(), library, "b", config.clone(), true).await;
    pair(&mut a, &mut b).await;
    a.library.write_rows("entries", vec![entry("first")]).await.unwrap();
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 1);
    assert_eq!(failures.load(std::sync::atomic::Ordering::Acquire), 0, "the sends did fail");
    assert!(a.library.status().await.unwrap().retries > 0);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_batch_is_repaired_by_heartbeat_watermarks_without_a_reconnect() {
    let library = new_library();
    // No retry within the test: only the heartbeats can bring the row.
    let config = lsync_node::config::SyncConfig {
        ack_timeout: std::time::Duration::from_secs(600),
        ..test_config()
    };
    let (mut a, failures) = start_dropping_batches(library, "a", &config, 1).await;
    let mut b =
        Node::start_in(tempfile::tempdir().unwrap(), library, "b", config.clone(), true).await;
    pair(&mut a, &mut b).await;
    let a_id = a.device();
    a.library.write_rows("entries", vec![entry("lost on the way")]).await.unwrap();
    // b learns from a's heartbeat that it is behind, and catches up.
    let mut reconnected = false;
    while b.tables().await["entries"].is_empty() {
        let event = b.wait_for(|event| Some(event.clone())).await;
        reconnected |= matches!(event, Event::PeerOffline { peer, .. } if peer == a_id);
    }
    assert_eq!(failures.load(std::sync::atomic::Ordering::Acquire), 0, "the send did fail");
    assert!(!reconnected, "repaired without a reconnect");
    assert_eq!(a.library.status().await.unwrap().retries, 0, "and without a retry");
    assert_eq!(converge(&mut [&mut a, &mut b]).await["entries"].len(), 1);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_while_sync_is_disabled_arrive_once_it_is_enabled() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    b.library.set_sync_enabled(false).await;
    assert_eq!(b.library.status().await.unwrap().sync, lsync_node::SyncState::Disabled);
    a.library.write_rows("entries", vec![entry("from a while b is off")]).await.unwrap();
    b.library.write_shared(vec![tag("from b while off")]).await.unwrap();
    // a's batch went out and was not acknowledged: a sends it again.
    eventually(&mut a, async |library| library.status().await.unwrap().retries > 0).await;
    assert!(b.tables().await["entries"].is_empty(), "b applies nothing while disabled");
    b.library.set_sync_enabled(true).await;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 1);
    assert_eq!(tables["tags"].len(), 1);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_right_after_writing_loses_nothing() {
    let library = new_library();
    let (mut a, mut b) = (Node::start(library, "a").await, Node::start(library, "b").await);
    pair(&mut a, &mut b).await;
    a.library
        .write_rows("entries", (0..500).map(|i| entry(&format!("f{i}"))).collect())
        .await
        .unwrap();
    a.library.write_shared(vec![tag("last")]).await.unwrap();
    let expected = a.tables().await;
    let a_id = a.device();
    // Close at once: pending batches are flushed to b before the transport closes.
    let dir = a.close().await;
    b.wait_for(|event| {
        matches!(event, Event::PeerOffline { peer, .. } if *peer == a_id).then_some(())
    })
    .await;
    let mut tables = b.tables().await;
    while tables != expected {
        b.wait_for(|event| {
            matches!(event, Event::RowsChanged { .. } | Event::SharedChanged { .. }).then_some(())
        })
        .await;
        tables = b.tables().await;
    }
    // And a reopened a still has every accepted write.
    let reopened = Node::start_in(dir, library, "a", test_config(), false).await;
    assert_eq!(reopened.tables().await, expected);
    reopened.close().await;
    b.close().await;
}

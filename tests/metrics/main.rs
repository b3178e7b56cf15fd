//! Figures the engine reports through the `metrics` facade, read back from a recorder installed
//! for this process. A binary of its own: the recorder is global, and no other test's devices
//! may add to its counts.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]
#![allow(unreachable_pub, missing_docs, reason = "test helpers")]

#[path = "../it/harness.rs"]
#[allow(dead_code, reason = "shared with the `it` binary, which uses all of it")]
mod harness;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use lsync_node::RowEdit;
use lsync_node::config::SyncConfig;
use lsync_protocol::Value;
use lsync_store::ENTRY_KIND_FILE;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use uuid::Uuid;

use harness::*;

/// Counters by name and labels (`name{a=1,b=2}`); gauges and histograms are not kept.
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Counters {
    fn get(&self, name: &str) -> u64 {
        let counters = self.0.lock().unwrap();
        counters.get(name).map_or(0, |counter| counter.load(Ordering::Acquire))
    }
}

impl metrics::Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut labels: Vec<String> =
            key.labels().map(|label| format!("{}={}", label.key(), label.value())).collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Counter::from_arc(self.0.lock().unwrap().entry(name).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let counters: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(counters).expect("the only recorder of this process");
        counters
    })
}

fn entry(id: Uuid, name: &str) -> RowEdit {
    RowEdit::Upsert {
        id,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_thousand_edits_is_sent_in_far_fewer_messages() {
    let counters = counters();
    let library = new_library();
    // The default window, not the tests' short one: how many windows 10,000 writes span depends
    // on the machine's disk (one fsync per write), and with 20 ms a slow disk sends a batch per
    // few edits. The bound below is stated in windows for the same reason.
    let config = SyncConfig { batch_window: SyncConfig::default().batch_window, ..test_config() };
    let window = config.batch_window;
    let start =
        |name| Node::start_in(tempfile::tempdir().unwrap(), library, name, config.clone(), true);
    let (mut a, mut b) = (start("a").await, start("b").await);
    pair(&mut a, &mut b).await;
    let began = std::time::Instant::now();
    let batches_before = counters.get("lsync_messages_sent_total{kind=StateBatch}");
    let rows_before = counters.get("lsync_changes_sent_total{kind=state}");
    let ids: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    // 100 rows, each edited 100 times in a row, one write call per edit: a batching window
    // holds several edits of one row, which leave as one.
    for id in &ids {
        for round in 0..100 {
            a.library
                .write_rows("entries", vec![entry(*id, &format!("round {round}"))])
                .await
                .unwrap();
        }
    }
    let windows = began.elapsed().as_millis() / window.as_millis() + 1;
    let tables = converge(&mut [&mut a, &mut b]).await;
    assert_eq!(tables["entries"].len(), 100);
    assert!(tables["entries"].iter().all(|row| row[5] == Value::from("round 99")));
    let retries = a.library.status().await.unwrap().retries;
    let batches = counters.get("lsync_messages_sent_total{kind=StateBatch}") - batches_before;
    let rows = counters.get("lsync_changes_sent_total{kind=state}") - rows_before;
    // Both devices count into this process's recorder, but only a writes entries. Messages
    // count re-sends too; `lsync_changes_sent_total` counts first sends only.
    let first_sends = batches - retries;
    eprintln!(
        "10,000 edits in {windows} windows: {first_sends} batches, {rows} rows sent first; \
         {retries} re-sends"
    );
    // One batch per window (one model written), plus the last flush after the writes ended; a
    // tenth more for timers that fire late under load.
    assert!(
        first_sends > 0 && u128::from(first_sends) <= windows + windows / 10 + 1,
        "10,000 edits in {windows} windows went out in {first_sends} batches ({batches} with \
         {retries} re-sends)"
    );
    assert!(first_sends <= 2_500, "10,000 edits went out in {first_sends} batches");
    assert!(rows <= 2_000, "coalesced: {rows} rows sent for 10,000 edits of 100 rows");
    assert!(rows >= 100, "every row was sent at least once ({rows})");
    a.close().await;
    b.close().await;
}

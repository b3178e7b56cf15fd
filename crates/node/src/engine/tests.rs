//! Supervision: a child that fails is reported and restarted with a growing backoff, and sync
//! goes on through the restarted children. Two libraries on real SQLite files, connected through
//! the in-memory transport.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::sync::Arc;
use std::time::Duration;

use lsync_protocol::{Epoch, LibraryId, Value};
use lsync_state_sync::sql::RowEdit;
use lsync_store::{ENTRY_KIND_FILE, reference_registry};
use lsync_transport::{MemoryHub, MemoryPeer, MemoryTransport, TransportConfig};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Child, CrashChild, EngineHandle, Generations, Supervisor};
use crate::config::SyncConfig;
use crate::events::Event;
use crate::library::Library;
use lsync_hlc::DeviceId;

const WAIT: Duration = Duration::from_secs(30);

struct Device {
    library: Library,
    events: mpsc::Receiver<Event>,
    _dir: tempfile::TempDir,
}

impl Device {
    /// Waits for the first event `pick` accepts.
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let event = self.events.recv().await.expect("events open");
                if let Some(found) = pick(&event) {
                    return found;
                }
            }
        })
        .await
        .expect("the event came")
    }

    /// The running engine's supervisor.
    async fn supervisor(&self) -> actix::Addr<Supervisor<MemoryTransport>> {
        let engine = self.library.inner.engine.lock().await;
        let handle = engine
            .as_ref()
            .unwrap()
            .as_any()
            .downcast_ref::<EngineHandle<MemoryTransport>>()
            .unwrap();
        handle.supervisor.clone()
    }

    async fn generations(&self) -> std::collections::HashMap<Child, u64> {
        self.supervisor().await.send(Generations).await.unwrap()
    }

    async fn crash(&self, child: Child) {
        self.supervisor().await.send(CrashChild(child)).await.unwrap();
    }

    /// Waits until `child` runs with a generation other than `old`.
    async fn restarted(&self, child: Child, old: u64) -> u64 {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(&now) = self.generations().await.get(&child)
                    && now != old
                {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the child was restarted")
    }

    /// Backfills (and resyncs) this copy completed, from its stored checkpoint.
    async fn completed_backfills(&self) -> u64 {
        let mut conn = self.library.reader().acquire().await.unwrap();
        lsync_backfill::sql::load(&mut conn).await.unwrap().unwrap().completed
    }

    async fn entries(&self) -> usize {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM entries")
            .fetch_one(self.library.reader())
            .await
            .unwrap();
        usize::try_from(count).unwrap()
    }
}

fn test_config() -> SyncConfig {
    SyncConfig {
        batch_window: Duration::from_millis(20),
        ack_timeout: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(200),
        ..SyncConfig::default()
    }
}

async fn pair_on_hub() -> (Device, Device, MemoryHub) {
    let hub = MemoryHub::new(7, TransportConfig::default()).unwrap();
    let library = LibraryId(Uuid::new_v4());
    let mut devices = Vec::new();
    for byte in [1u8, 2] {
        let dir = tempfile::tempdir().unwrap();
        let device = DeviceId::from_bytes([byte; 16]);
        let lib = Library::create(
            &dir.path().join("library.db"),
            Arc::new(reference_registry().unwrap()),
            library,
            device,
            test_config(),
        )
        .await
        .unwrap();
        let events = lib.subscribe();
        let (transport, transport_events) = hub
            .add_device(
                MemoryPeer {
                    device,
                    library,
                    name: format!("device {byte}"),
                    epoch: Epoch(u64::from(byte)),
                },
                Some(lib.watermark_source()),
            )
            .await;
        lib.start_sync(transport, transport_events).await.unwrap();
        devices.push(Device { library: lib, events, _dir: dir });
    }
    let b = devices.pop().unwrap();
    let mut a = devices.pop().unwrap();
    let b_id = b.library.identity().device;
    a.wait_for(|event| {
        matches!(event, Event::PeerOnline { peer, .. } if *peer == b_id).then_some(())
    })
    .await;
    (a, b, hub)
}

fn entry(name: &str) -> RowEdit {
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

/// Waits until `device` holds `count` entries, re-checking on its events.
async fn holds(device: &mut Device, count: usize) {
    tokio::time::timeout(WAIT, async {
        while device.entries().await != count {
            let _ = tokio::time::timeout(Duration::from_millis(50), device.events.recv()).await;
        }
    })
    .await
    .expect("the rows arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_child_that_fails_is_reported_and_restarted_and_sync_goes_on() {
    let (mut a, mut b, _hub) = pair_on_hub().await;
    let b_id = b.library.identity().device;
    for child in [Child::Pruner, Child::Retry, Child::Backfill, Child::Peer(b_id)] {
        let old = a.generations().await[&child];
        a.crash(child).await;
        let message = a
            .wait_for(|event| match event {
                Event::Error { message } if message.contains("failed (1 time in a row)") => {
                    Some(message.clone())
                }
                _ => None,
            })
            .await;
        assert!(message.contains(child.name()), "{message}");
        let new = a.restarted(child, old).await;
        assert!(new > old);
    }
    // Sync works through the restarted children, both ways.
    a.library.write_rows("entries", vec![entry("from a")]).await.unwrap();
    holds(&mut b, 1).await;
    b.library.write_rows("entries", vec![entry("from b")]).await.unwrap();
    holds(&mut a, 2).await;
    a.library.close().await.unwrap();
    b.library.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_failing_again_and_again_is_reported_each_time_with_a_growing_backoff() {
    let (mut a, b, _hub) = pair_on_hub().await;
    let mut delays = Vec::new();
    for failure in 1..=3u32 {
        let old = a.generations().await[&Child::Pruner];
        a.crash(Child::Pruner).await;
        let times = if failure == 1 { "1 time".to_owned() } else { format!("{failure} times") };
        let message = a
            .wait_for(|event| match event {
                Event::Error { message } if message.contains("pruner") => Some(message.clone()),
                _ => None,
            })
            .await;
        assert!(message.contains(&format!("failed ({times} in a row)")), "{message}");
        delays.push(message.rsplit("restarting in ").next().unwrap().to_owned());
        a.restarted(Child::Pruner, old).await;
    }
    assert_eq!(delays, ["100ms", "200ms", "400ms"]);
    a.library.close().await.unwrap();
    b.library.close().await.unwrap();
}

/// Several peers show the same need at once (a restored copy learns of its rollback from each
/// of them): the resync the first request starts covers them all, and the copy resyncs once.
/// The backfill actor reads its mailbox only between backfills, so the other requests used to
/// start a resync each once the first ended: the simulator saw a restored copy resync fully
/// three times over for one rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_running_resync_covers_start_no_second_one() {
    use lsync_backfill::{Phase, Scope};
    let (mut a, b, _hub) = pair_on_hub().await;
    let b_id = b.library.identity().device;
    let rows = (0..3000).map(|i| entry(&format!("file {i}"))).collect();
    b.library.write_rows("entries", rows).await.unwrap();
    holds(&mut a, 3000).await;
    let completed_before = a.completed_backfills().await;

    let supervisor = a.supervisor().await;
    let resync = || super::ResyncNeeded {
        scope: Scope::Everything,
        delete_missing: true,
        from: b_id,
        completed: completed_before,
    };
    supervisor.send(resync()).await.unwrap();
    a.wait_for(|event| {
        matches!(event, Event::Backfill(progress) if progress.phase != Phase::Ready).then_some(())
    })
    .await;
    for _ in 0..3 {
        supervisor.send(resync()).await.unwrap();
    }
    a.wait_for(|event| {
        matches!(event, Event::Backfill(progress) if progress.phase == Phase::Ready).then_some(())
    })
    .await;
    // The requests queued while the resync ran used to start a new one as soon as it ended:
    // a second is given ample time to show up.
    let another = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(event) = a.events.recv().await {
            if matches!(&event, Event::Backfill(progress) if progress.phase != Phase::Ready) {
                return;
            }
        }
    })
    .await;
    assert!(another.is_err(), "a second resync started");
    assert_eq!(a.completed_backfills().await, completed_before + 1);
    holds(&mut a, 3000).await;
    a.library.close().await.unwrap();
    b.library.close().await.unwrap();
}

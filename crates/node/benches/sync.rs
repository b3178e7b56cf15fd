//! End-to-end benchmarks of the engine (issue 9): real library files, real QUIC on loopback,
//! several devices; each figure beside a baseline measured in the same run.
//!
//! Scenarios (full sizes; `LSYNC_BENCH_QUICK=1` scales them down, and `cargo test --all-targets`
//! runs a tiny smoke version because cargo passes `--bench` only when benchmarking):
//! - **backfill**: a joining device pulls 1,000,000 `entries` and 10,000 tags from a peer, in a
//!   child process so its peak RSS is its own (also at 100,000 rows, to show RSS does not grow
//!   with the library). Baseline: the same entries inserted raw into an empty library file in key
//!   order (500-row statements, 100,000-row transactions) — the physical limit.
//! - **live-state**: one device bulk-writes 200,000 entries while 2 peers are online; rows/s
//!   until both hold them. Baseline: the same bulk write on a device with no peers.
//! - **wire**: bytes of `StateBatch` messages sent to one peer per entry replicated, against the
//!   MessagePack size of the row itself.
//! - **latency**: one entry written on a device until applied on each of 2 peers, one write at a
//!   time, while a third device writes a tag every 100 ms; p50 and p99. Baseline: the batch
//!   window plus one measured QUIC round trip.
//! - **catch-up**: a device offline while 100,000 entries are written comes back; seconds until
//!   it holds them. Baseline: the writer's own time to write them.
//! - **live-shared**: 3 devices make 50,000 shared changes at once; changes/s until every device
//!   applied every change, peak peer-log size, and the time until every log is back under 1,000
//!   entries. Baseline: one device making the same number of changes with no peers.
//! - **merge**: applying shared changes to in-memory records (`RecordState::apply`), against
//!   inserting the same values into a map.
//!
//! Run with `cargo xtask bench sync` (or `cargo bench -p lsync-node --bench sync`).
#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary has no API")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark fails loudly")]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "counts and durations are far below every limit they are cast to"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lsync_hlc::{DeviceId, Hlc, HlcTime};
use lsync_node::config::SyncConfig;
use lsync_node::{BackfillPhase, Edit, Event, Library, RowEdit};
use lsync_protocol::{LibraryId, Message, SharedOp, StateOp, StateRow, Value};
use lsync_store::{Database, ENTRY_KIND_DIRECTORY, ENTRY_KIND_FILE, reference_registry};
use lsync_transport::{
    FilePeerStore, Identity, Invitation, LocalDevice, PeerInfo, PeerStore, QuicOptions,
    QuicTransport, RequestError, SendError, ShutdownReport, SplitMix64, Transport, TransportEvent,
};
use tokio::sync::mpsc;
use uuid::Uuid;

/// How big each scenario is.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    backfill: u64,
    backfill_small: u64,
    backfill_shared: u64,
    live_state: u64,
    live_shared: u64,
    latency_writes: usize,
    catch_up: u64,
    merge: u64,
}

const FULL: Sizes = Sizes {
    backfill: 1_000_000,
    backfill_small: 100_000,
    backfill_shared: 10_000,
    live_state: 200_000,
    live_shared: 50_000,
    latency_writes: 1_000,
    catch_up: 100_000,
    merge: 2_000_000,
};

const QUICK: Sizes = Sizes {
    backfill: 100_000,
    backfill_small: 20_000,
    backfill_shared: 1_000,
    live_state: 20_000,
    live_shared: 5_000,
    latency_writes: 50,
    catch_up: 20_000,
    merge: 200_000,
};

const SMOKE: Sizes = Sizes {
    backfill: 3_000,
    backfill_small: 1_000,
    backfill_shared: 100,
    live_state: 2_000,
    live_shared: 300,
    latency_writes: 5,
    catch_up: 1_000,
    merge: 10_000,
};

/// Rows per `write_rows` call when a device bulk-writes.
const WRITE_CHUNK: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// Reporting

struct Figure<'a> {
    name: &'a str,
    figure: f64,
    unit: &'a str,
    baseline_name: &'a str,
    baseline: f64,
    /// The target, in words, and whether it was met (`None`: no target).
    target: Option<(String, bool)>,
}

fn report(figure: &Figure<'_>) {
    let ratio = if figure.baseline > 0.0 { figure.figure / figure.baseline } else { 0.0 };
    let (target, met) = match &figure.target {
        Some((target, met)) => (format!("\"{target}\""), met.to_string()),
        None => ("null".to_owned(), "null".to_owned()),
    };
    println!(
        "{:<24} {:>14.1} {:<9} {:<34} {:>14.1}   ratio {ratio:>7.3}   target {} {}",
        figure.name,
        figure.figure,
        figure.unit,
        figure.baseline_name,
        figure.baseline,
        figure.target.as_ref().map_or("-", |(target, _)| target.as_str()),
        match &figure.target {
            Some((_, true)) => "met",
            Some((_, false)) => "MISSED",
            None => "",
        },
    );
    println!(
        "BENCH {{\"name\":\"{}\",\"figure\":{:.3},\"unit\":\"{}\",\"baseline\":{:.3},\"baseline_name\":\"{}\",\"ratio\":{ratio:.3},\"target\":{target},\"met\":{met}}}",
        figure.name, figure.figure, figure.unit, figure.baseline, figure.baseline_name
    );
}

/// A field of /proc/self/status in KiB (`VmHWM` is the peak resident set).
fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| {
            line.trim_start_matches(field)
                .trim_start_matches(':')
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Rows

/// `n` entries as a directory walk yields them: time-ordered ids in key order, about 1 %
/// directories, each file under a recent directory, names of 12–20 characters.
fn entries(n: u64, seed: u64) -> Vec<(Uuid, Vec<Value>)> {
    let mut random = SplitMix64::new(seed);
    let location = Uuid::from_u64_pair(seed, 1);
    let base_ms = 1_700_000_000_000 + seed * 10_000_000_000;
    let mut directories: Vec<Uuid> = Vec::new();
    (0..n)
        .map(|i| {
            let id =
                Uuid::from_u64_pair((base_ms + i) << 16 | 0x7000, random.next_u64() >> 2 | 1 << 63);
            let directory = i % 100 == 0;
            let parent = directories
                .get(directories.len().saturating_sub(1 + (random.next_u64() % 16) as usize))
                .copied();
            if directory {
                directories.push(id);
            }
            let len = 12 + (random.next_u64() % 9) as usize;
            let name: String =
                (0..len).map(|_| char::from(b'a' + (random.next_u64() % 26) as u8)).collect();
            let values = vec![
                Value::Blob(location.as_bytes().to_vec()),
                parent.map_or(Value::Null, |parent| Value::Blob(parent.as_bytes().to_vec())),
                Value::from(name),
                Value::Integer(if directory { ENTRY_KIND_DIRECTORY } else { ENTRY_KIND_FILE }),
                Value::Integer((random.next_u64() % 10_000_000) as i64),
                Value::Integer(1_700_000_000 + (random.next_u64() % 10_000_000) as i64),
            ];
            (id, values)
        })
        .collect()
}

async fn write_entries(library: &Library, rows: &[(Uuid, Vec<Value>)]) {
    for chunk in rows.chunks(WRITE_CHUNK) {
        let edits = chunk
            .iter()
            .map(|(id, values)| RowEdit::Upsert { id: *id, values: values.clone() })
            .collect();
        library.write_rows("entries", edits).await.unwrap();
    }
}

fn tag_edit(name: String) -> Edit {
    Edit::Insert {
        model: "tags".into(),
        id: Uuid::now_v7(),
        fields: [("name".to_owned(), Value::from(name))].into_iter().collect(),
    }
}

async fn write_tags(library: &Library, n: u64, prefix: &str) {
    let mut written = 0;
    while written < n {
        let count = (n - written).min(100);
        let edits = (written..written + count).map(|i| tag_edit(format!("{prefix}{i}"))).collect();
        library.write_shared(edits).await.unwrap();
        written += count;
    }
}

/// What the live-shared scenario's devices hold before it starts: entries to set metadata on,
/// and tags that every device renames concurrently.
struct SharedSetup {
    entries: Vec<Uuid>,
    common_tags: Vec<Uuid>,
}

const SETUP_ENTRIES: u64 = 1_000;
const COMMON_TAGS: usize = 100;

/// Writes the setup on `library`: `SETUP_ENTRIES` entries and `COMMON_TAGS` tags.
async fn write_setup(library: &Library) -> SharedSetup {
    let rows = entries(SETUP_ENTRIES, 99);
    write_entries(library, &rows).await;
    let tags: Vec<Edit> = (0..COMMON_TAGS).map(|i| tag_edit(format!("common {i}"))).collect();
    let common_tags = tags
        .iter()
        .map(|edit| match edit {
            Edit::Insert { id, .. } => *id,
            _ => unreachable!("tag_edit inserts"),
        })
        .collect();
    library.write_shared(tags).await.unwrap();
    SharedSetup { entries: rows.iter().map(|(id, _)| *id).collect(), common_tags }
}

/// `n` shared changes, in calls of 100, of the kinds a user makes: half create tags, a quarter
/// rename one of the common tags (which the other devices rename concurrently: conflicts the
/// registers resolve), a quarter set a metadata key on an entry.
async fn write_shared_mix(library: &Library, n: u64, prefix: &str, setup: &SharedSetup) {
    let mut written = 0;
    while written < n {
        let count = (n - written).min(100);
        let edits = (written..written + count)
            .map(|i| match i % 4 {
                0 => {
                    let entry = setup.entries[(i % SETUP_ENTRIES) as usize];
                    let key = format!("{prefix}{i}");
                    Edit::Insert {
                        model: "user_metadata".into(),
                        id: lsync_store::Registry::derived_id(
                            "user_metadata",
                            &[entry.as_bytes(), key.as_bytes()],
                        ),
                        fields: [
                            ("entry_id".to_owned(), Value::Blob(entry.as_bytes().to_vec())),
                            ("key".to_owned(), Value::from(key)),
                            ("value".to_owned(), Value::from(format!("value {i}"))),
                        ]
                        .into_iter()
                        .collect(),
                    }
                }
                1 => Edit::Update {
                    model: "tags".into(),
                    id: setup.common_tags[(i / 4) as usize % COMMON_TAGS],
                    fields: [("name".to_owned(), Value::from(format!("{prefix}{i}")))]
                        .into_iter()
                        .collect(),
                },
                _ => tag_edit(format!("{prefix}{i}")),
            })
            .collect();
        library.write_shared(edits).await.unwrap();
        written += count;
    }
}

/// The physical limit: the rows inserted raw into an empty library file's `entries` table, in
/// key order, 500-row statements, 100,000-row transactions. Returns rows/s.
async fn raw_insert_rate(dir: &Path, rows: &[(Uuid, Vec<Value>)]) -> f64 {
    let registry = Arc::new(reference_registry().unwrap());
    let db = Database::create(
        &dir.join("raw.db"),
        registry,
        LibraryId(Uuid::new_v4()),
        DeviceId::random(),
        &SyncConfig::default().store_options(),
    )
    .await
    .unwrap();
    let owner = DeviceId::random();
    let version = lsync_store::sql::time_to_sql(HlcTime::from_u64(1 << 20)).unwrap();
    let started = Instant::now();
    for transaction in rows.chunks(100_000) {
        db.write(async |conn| {
            for statement in transaction.chunks(500) {
                let sql = format!(
                    "INSERT INTO entries (id, owner, version, location_id, parent_id, name, kind, size, modified_at) VALUES {}",
                    lsync_store::sql::value_rows(statement.len(), 9)
                );
                let mut query = sqlx::query(&sql);
                for (id, values) in statement {
                    query = query.bind(id.as_bytes().as_slice()).bind(owner.as_bytes().as_slice()).bind(version);
                    for value in values {
                        query = lsync_store::sql::bind_value(query, value);
                    }
                }
                query.execute(&mut *conn).await?;
            }
            Ok::<_, lsync_store::StoreError>(())
        })
        .await
        .unwrap();
    }
    let rate = rows.len() as f64 / started.elapsed().as_secs_f64();
    db.close().await.unwrap();
    rate
}

// ---------------------------------------------------------------------------------------------
// Devices

/// Counts what a device sends: bytes and rows of `StateBatch` messages, per peer.
#[derive(Clone)]
struct Counting {
    inner: QuicTransport,
    bytes: Arc<AtomicU64>,
    rows: Arc<AtomicU64>,
    /// Only this peer's traffic is counted (the wire figure is per peer).
    peer: Arc<std::sync::Mutex<Option<DeviceId>>>,
}

impl Transport for Counting {
    fn local_device(&self) -> DeviceId {
        self.inner.local_device()
    }

    fn send(
        &self,
        peer: DeviceId,
        message: Message,
    ) -> impl Future<Output = Result<(), SendError>> + Send {
        if let Message::StateBatch(batch) = &message
            && *self.peer.lock().unwrap() == Some(peer)
        {
            let bytes = lsync_protocol::encode(&message).map_or(0, |bytes| bytes.len());
            self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            self.rows.fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
        }
        self.inner.send(peer, message)
    }

    fn request(
        &self,
        peer: DeviceId,
        message: Message,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, RequestError>> + Send {
        self.inner.request(peer, message, timeout)
    }

    fn connected_peers(&self) -> Vec<PeerInfo> {
        self.inner.connected_peers()
    }

    fn shutdown(&self) -> impl Future<Output = ShutdownReport> + Send {
        self.inner.shutdown()
    }
}

struct Device {
    dir: tempfile::TempDir,
    library: Library,
    transport: QuicTransport,
    events: mpsc::Receiver<Event>,
    counting: Option<Counting>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Create,
    Join,
    Reopen,
}

async fn open(dir: &Path, library: LibraryId, how: Open) -> Library {
    let identity = Identity::load_or_create(&dir.join("identity")).unwrap();
    let registry = Arc::new(reference_registry().unwrap());
    let path = dir.join("library.db");
    let config = SyncConfig::default();
    match how {
        Open::Create => Library::create(&path, registry, library, identity.device(), config).await,
        Open::Join => Library::join(&path, registry, library, identity.device(), config).await,
        Open::Reopen => Library::open(&path, registry, config).await,
    }
    .unwrap()
}

async fn quic(dir: &Path, library: &Library) -> (QuicTransport, mpsc::Receiver<TransportEvent>) {
    let store: Arc<dyn PeerStore> = Arc::new(FilePeerStore::open(dir.join("peers")).unwrap());
    QuicTransport::start(QuicOptions {
        identity: Identity::load_or_create(&dir.join("identity")).unwrap(),
        local: LocalDevice {
            library: library.identity().library,
            name: "bench".into(),
            epoch: library.identity().epoch,
        },
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        store,
        config: SyncConfig::default().transport_config(),
        watermarks: Some(library.watermark_source()),
    })
    .await
    .unwrap()
}

impl Device {
    async fn start(
        dir: tempfile::TempDir,
        library_id: LibraryId,
        how: Open,
        count: bool,
    ) -> Device {
        let library = open(dir.path(), library_id, how).await;
        let events = library.subscribe();
        let (transport, transport_events) = quic(dir.path(), &library).await;
        let counting = if count {
            let counting = Counting {
                inner: transport.clone(),
                bytes: Arc::default(),
                rows: Arc::default(),
                peer: Arc::default(),
            };
            library.start_sync(counting.clone(), transport_events).await.unwrap();
            Some(counting)
        } else {
            library.start_sync(transport.clone(), transport_events).await.unwrap();
            None
        };
        Device { dir, library, transport, events, counting }
    }

    fn id(&self) -> DeviceId {
        self.library.identity().device
    }

    async fn close(self) -> tempfile::TempDir {
        self.library.close().await.unwrap();
        self.dir
    }

    /// Waits for an event `pick` accepts, failing after two minutes.
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                _ => panic!("benchmark stalled: the awaited event did not come"),
            }
        }
    }

    /// Waits until `n` more entries rows were written here by peers.
    async fn entries_arrived(&mut self, n: u64) {
        let mut seen = 0;
        while seen < n {
            seen += self
                .wait_for(|event| match event {
                    Event::RowsChanged { model, upserted, .. } if model == "entries" => {
                        Some(upserted.len() as u64)
                    }
                    _ => None,
                })
                .await;
        }
    }
}

async fn pair(inviter: &mut Device, joiner: &mut Device) {
    let invitation = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
    joiner.transport.join(&invitation).await.unwrap();
    let (inviter_id, joiner_id) = (inviter.id(), joiner.id());
    for (device, peer) in [(&mut *inviter, joiner_id), (&mut *joiner, inviter_id)] {
        device
            .wait_for(|event| {
                matches!(event, Event::CaughtUp { peer: p, .. } if *p == peer).then_some(())
            })
            .await;
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// What the backfill child reports.
struct ChildReport {
    rows: u64,
    seconds: f64,
    rss_kib: u64,
}

/// The joining device of the backfill scenario, in this process (run as a child).
async fn backfill_child() {
    let dir = std::path::PathBuf::from(std::env::var("LSYNC_BENCH_DIR").unwrap());
    let library_id = LibraryId(std::env::var("LSYNC_BENCH_LIBRARY").unwrap().parse().unwrap());
    let invitation = Invitation::from_token(&std::env::var("LSYNC_BENCH_TOKEN").unwrap()).unwrap();
    let library = open(&dir, library_id, Open::Join).await;
    let mut events = library.subscribe();
    let (transport, transport_events) = quic(&dir, &library).await;
    library.start_sync(transport.clone(), transport_events).await.unwrap();
    let started = Instant::now();
    transport.join(&invitation).await.unwrap();
    let done = loop {
        match tokio::time::timeout(Duration::from_secs(300), events.recv()).await {
            Ok(Some(Event::Backfill(progress))) if progress.phase == BackfillPhase::Ready => {
                break progress;
            }
            Ok(Some(_)) => {}
            _ => panic!("the backfill stalled"),
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    println!("CHILD {} {seconds:.6} {}", done.done, proc_status_kib("VmHWM"));
    library.close().await.unwrap();
}

/// Runs the joining device in a child process; returns what it measured.
fn run_backfill_child(dir: &Path, library: LibraryId, token: &str) -> ChildReport {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env("LSYNC_BENCH_CHILD", "backfill")
        .env("LSYNC_BENCH_DIR", dir)
        .env("LSYNC_BENCH_LIBRARY", library.0.to_string())
        .env("LSYNC_BENCH_TOKEN", token)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "the backfill child failed: {}", output.status);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find_map(|line| line.strip_prefix("CHILD ")).expect("child report");
    let fields: Vec<&str> = line.split_whitespace().collect();
    ChildReport {
        rows: fields[0].parse().unwrap(),
        seconds: fields[1].parse().unwrap(),
        rss_kib: fields[2].parse().unwrap(),
    }
}

/// A device holding `n` entries and `shared` tags, ready to serve a backfill; returns the
/// device, the rows and the token of an invitation for the joiner.
async fn backfill_source(
    n: u64,
    shared: u64,
    seed: u64,
) -> (Device, Vec<(Uuid, Vec<Value>)>, LibraryId) {
    let library = LibraryId(Uuid::new_v4());
    let source = Device::start(tempdir(), library, Open::Create, false).await;
    let rows = entries(n, seed);
    write_entries(&source.library, &rows).await;
    write_tags(&source.library, shared, "tag ").await;
    (source, rows, library)
}

async fn backfill(sizes: Sizes) {
    // The small run first: its RSS is the reference for "bounded".
    let (small_source, _, small_library) = backfill_source(sizes.backfill_small, 0, 7).await;
    let token = small_source.transport.invite(Duration::from_secs(600)).await.unwrap().to_token();
    let small_dir = tempdir();
    let small = run_backfill_child(small_dir.path(), small_library, &token);
    small_source.close().await;

    let (source, rows, library) = backfill_source(sizes.backfill, sizes.backfill_shared, 11).await;
    let baseline_dir = tempdir();
    let baseline = raw_insert_rate(baseline_dir.path(), &rows).await;
    drop(rows);
    let token = source.transport.invite(Duration::from_secs(600)).await.unwrap().to_token();
    let child_dir = tempdir();
    let large = run_backfill_child(child_dir.path(), library, &token);
    source.close().await;
    assert_eq!(large.rows, sizes.backfill + sizes.backfill_shared, "every row arrived");

    let rate = large.rows as f64 / large.seconds;
    let label = if sizes.backfill >= 1_000_000 { "1m" } else { "scaled" };
    report(&Figure {
        name: &format!("backfill-{label}"),
        figure: rate,
        unit: "rows/s",
        baseline_name: "raw key-order insert",
        baseline,
        target: Some((
            format!(">= 0.5 of baseline, {} rows in <= 8 s", sizes.backfill),
            rate >= 0.5 * baseline && large.seconds <= 8.0,
        )),
    });
    report(&Figure {
        name: &format!("backfill-seconds-{label}"),
        figure: large.seconds,
        unit: "s",
        baseline_name: "raw insert of the same rows",
        baseline: sizes.backfill as f64 / baseline,
        target: Some(("<= 8 s".into(), large.seconds <= 8.0)),
    });
    let (rss, small_rss) = (large.rss_kib as f64 / 1024.0, small.rss_kib as f64 / 1024.0);
    report(&Figure {
        name: &format!("backfill-rss-{label}"),
        figure: rss,
        unit: "MiB",
        baseline_name: &format!("peak RSS at {} rows", sizes.backfill_small),
        baseline: small_rss,
        target: Some(("<= 200 MB".into(), rss * 1.048_576 <= 200.0)),
    });
}

/// Live device-owned sync, wire efficiency, latency and catch-up share three devices.
async fn live(sizes: Sizes) {
    let library = LibraryId(Uuid::new_v4());
    let mut a = Device::start(tempdir(), library, Open::Create, true).await;
    let mut b = Device::start(tempdir(), library, Open::Create, false).await;
    let mut c = Device::start(tempdir(), library, Open::Create, false).await;
    pair(&mut a, &mut b).await;
    pair(&mut a, &mut c).await;
    let counting = a.counting.clone().unwrap();
    *counting.peer.lock().unwrap() = Some(b.id());

    // Baseline: the same bulk write on a device alone.
    let rows = entries(sizes.live_state, 3);
    let alone = Device::start(tempdir(), LibraryId(Uuid::new_v4()), Open::Create, false).await;
    let started = Instant::now();
    write_entries(&alone.library, &rows).await;
    let alone_rate = rows.len() as f64 / started.elapsed().as_secs_f64();
    alone.close().await;

    let started = Instant::now();
    write_entries(&a.library, &rows).await;
    let n = rows.len() as u64;
    tokio::join!(b.entries_arrived(n), c.entries_arrived(n));
    let rate = n as f64 / started.elapsed().as_secs_f64();
    report(&Figure {
        name: "live-state",
        figure: rate,
        unit: "rows/s",
        baseline_name: "the bulk write alone",
        baseline: alone_rate,
        target: Some((">= 0.5 of baseline".into(), rate >= 0.5 * alone_rate)),
    });

    let row_size = rows
        .iter()
        .take(10_000)
        .map(|(id, values)| {
            let row = StateRow {
                id: *id,
                version: HlcTime::from_u64(1 << 40),
                op: StateOp::Upsert(values.clone()),
            };
            rmp_serde::to_vec(&row).unwrap().len()
        })
        .sum::<usize>() as f64
        / rows.len().min(10_000) as f64;
    let sent_rows = counting.rows.load(Ordering::Relaxed).max(1);
    let per_row = counting.bytes.load(Ordering::Relaxed) as f64 / sent_rows as f64;
    report(&Figure {
        name: "wire",
        figure: per_row,
        unit: "B/row",
        baseline_name: "MessagePack size of the row",
        baseline: row_size,
        target: Some(("<= 1.3x the row".into(), per_row <= 1.3 * row_size)),
    });

    latency(sizes, &mut a, &mut b, &mut c).await;

    // Catch-up: c goes away while a writes, then comes back.
    let c_dir = c.close().await;
    let more = entries(sizes.catch_up, 5);
    let started = Instant::now();
    write_entries(&a.library, &more).await;
    let write_seconds = started.elapsed().as_secs_f64();
    b.entries_arrived(sizes.catch_up).await;
    let started = Instant::now();
    let mut c = Device::start(c_dir, library, Open::Reopen, false).await;
    c.entries_arrived(sizes.catch_up).await;
    let seconds = started.elapsed().as_secs_f64();
    report(&Figure {
        name: "catch-up",
        figure: seconds,
        unit: "s",
        baseline_name: "the writer's own write time",
        baseline: write_seconds,
        target: Some((
            format!("{} changes in <= 3 s", sizes.catch_up),
            seconds <= 3.0 * sizes.catch_up as f64 / 100_000.0,
        )),
    });
    a.close().await;
    b.close().await;
    c.close().await;
}

async fn latency(sizes: Sizes, a: &mut Device, b: &mut Device, c: &mut Device) {
    let window_ms = SyncConfig::default().batch_window.as_secs_f64() * 1000.0;
    // The QUIC round trip to the peers, as the transport's heartbeats measure it (the first
    // heartbeat comes within one heartbeat interval of connecting).
    let measured = Instant::now();
    let rtt_ms = loop {
        let rtts: Vec<f64> = a
            .transport
            .connected_peers()
            .iter()
            .filter_map(|peer| peer.rtt)
            .map(|rtt| rtt.as_secs_f64() * 1000.0)
            .collect();
        // (The smoke run in `cargo test` does not wait for it.)
        let patience = if sizes.latency_writes < 50 {
            Duration::ZERO
        } else {
            2 * SyncConfig::default().heartbeat_interval
        };
        if rtts.len() >= 2 || measured.elapsed() > patience {
            break rtts.into_iter().fold(0.0, f64::max);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Light background load: c writes a tag every 100 ms.
    let background = c.library.clone();
    let load = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for i in 0.. {
            tick.tick().await;
            if background.write_shared(vec![tag_edit(format!("load {i}"))]).await.is_err() {
                break;
            }
        }
    });
    let mut samples = Vec::with_capacity(sizes.latency_writes * 2);
    for i in 0..sizes.latency_writes {
        let row = entries(1, 1_000 + i as u64).remove(0);
        let id = row.0;
        let started = Instant::now();
        a.library
            .write_rows("entries", vec![RowEdit::Upsert { id: row.0, values: row.1 }])
            .await
            .unwrap();
        for peer in [&mut *b, &mut *c] {
            peer.wait_for(|event| match event {
                Event::RowsChanged { upserted, .. } if upserted.contains(&id) => Some(()),
                _ => None,
            })
            .await;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    load.abort();
    samples.sort_by(f64::total_cmp);
    let percentile = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let baseline = window_ms + rtt_ms;
    for (name, value, slack) in
        [("latency-p50", percentile(0.5), 20.0), ("latency-p99", percentile(0.99), 100.0)]
    {
        report(&Figure {
            name,
            figure: value,
            unit: "ms",
            baseline_name: "batch window + QUIC round trip",
            baseline,
            target: Some((format!("<= window + {slack} ms"), value <= window_ms + slack)),
        });
    }
}

async fn live_shared(sizes: Sizes) {
    let library = LibraryId(Uuid::new_v4());
    let mut devices = Vec::new();
    for _ in 0..3 {
        devices.push(Device::start(tempdir(), library, Open::Create, false).await);
    }
    let (first, rest) = devices.split_at_mut(1);
    let (second, third) = rest.split_at_mut(1);
    pair(&mut first[0], &mut second[0]).await;
    pair(&mut second[0], &mut third[0]).await;
    pair(&mut first[0], &mut third[0]).await;

    let alone = Device::start(tempdir(), LibraryId(Uuid::new_v4()), Open::Create, false).await;
    let alone_setup = write_setup(&alone.library).await;
    let started = Instant::now();
    write_shared_mix(&alone.library, sizes.live_shared, "alone ", &alone_setup).await;
    let alone_rate = sizes.live_shared as f64 / started.elapsed().as_secs_f64();
    alone.close().await;

    // The setup reaches every device before the clock starts.
    let setup = Arc::new(write_setup(&devices[0].library).await);
    for device in &mut devices[1..] {
        device.entries_arrived(SETUP_ENTRIES).await;
    }
    let setup_origin = devices[0].library.identity().origin;
    loop {
        let mut ready = true;
        for device in &devices {
            let status = device.library.status().await.unwrap();
            ready &= status
                .watermarks
                .shared
                .iter()
                .any(|mark| mark.origin == setup_origin && mark.seq >= COMMON_TAGS as u64);
        }
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let per_device = sizes.live_shared / 3;
    let started = Instant::now();
    let writers: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, device)| {
            let (library, setup) = (device.library.clone(), setup.clone());
            tokio::spawn(async move {
                write_shared_mix(&library, per_device, &format!("d{i} "), &setup).await;
            })
        })
        .collect();
    let mut peak_log = 0;
    let origins: Vec<DeviceId> =
        devices.iter().map(|device| device.library.identity().origin).collect();
    let converged = |statuses: &[lsync_node::Status]| {
        statuses.iter().all(|status| {
            origins.iter().all(|origin| {
                // The first device's numbering starts after its setup changes.
                let base = if *origin == setup_origin { COMMON_TAGS as u64 } else { 0 };
                status
                    .watermarks
                    .shared
                    .iter()
                    .any(|mark| mark.origin == *origin && mark.seq >= base + per_device)
            })
        })
    };
    loop {
        let mut statuses = Vec::new();
        for device in &devices {
            statuses.push(device.library.status().await.unwrap());
        }
        peak_log = statuses.iter().map(|status| status.log_entries).fold(peak_log, u64::max);
        if converged(&statuses) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "live shared sync stalled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = (per_device * 3) as f64 / started.elapsed().as_secs_f64();
    for writer in writers {
        writer.await.unwrap();
    }
    report(&Figure {
        name: "live-shared",
        figure: rate,
        unit: "changes/s",
        baseline_name: "one device making the same mix alone",
        baseline: alone_rate,
        target: Some((">= 20000 changes/s".into(), rate >= 20_000.0)),
    });
    let quiet = Instant::now();
    loop {
        let mut largest = 0;
        for device in &devices {
            largest = largest.max(device.library.status().await.unwrap().log_entries);
        }
        if largest < 1_000 {
            break;
        }
        assert!(quiet.elapsed() < Duration::from_secs(300), "the peer logs were not pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = quiet.elapsed().as_secs_f64();
    report(&Figure {
        name: "live-shared-peak-log",
        figure: peak_log as f64,
        unit: "entries",
        baseline_name: "changes made",
        baseline: (per_device * 3) as f64,
        target: None,
    });
    report(&Figure {
        name: "live-shared-log-drain",
        figure: drained,
        unit: "s",
        baseline_name: "prune interval",
        baseline: SyncConfig::default().prune_interval.as_secs_f64(),
        target: Some(("log < 1000 entries within seconds (<= 5 s)".into(), drained <= 5.0)),
    });
    for device in devices {
        device.close().await;
    }
}

fn merge(sizes: Sizes) {
    let device = DeviceId::random();
    let changes: Vec<(Hlc, SharedOp)> = (0..sizes.merge)
        .map(|i| {
            let fields: BTreeMap<String, Value> =
                [("name".to_owned(), Value::from(format!("name {}", i % 1_000)))]
                    .into_iter()
                    .collect();
            (Hlc::new(HlcTime::from_u64(i << 4), device), SharedOp::Update(fields))
        })
        .collect();
    let records = 1_000;
    let started = Instant::now();
    let mut states = vec![lsync_shared_sync::RecordState::default(); records];
    for (i, (stamp, op)) in changes.iter().enumerate() {
        black_box(states[i % records].apply(*stamp, op));
    }
    let rate = changes.len() as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut maps = vec![BTreeMap::<String, Value>::new(); records];
    for (i, (_, op)) in changes.iter().enumerate() {
        if let SharedOp::Update(fields) = op {
            for (name, value) in fields {
                black_box(maps[i % records].insert(name.clone(), value.clone()));
            }
        }
    }
    let baseline = changes.len() as f64 / started.elapsed().as_secs_f64();
    report(&Figure {
        name: "merge-apply",
        figure: rate,
        unit: "applies/s",
        baseline_name: "plain map insert of the values",
        baseline,
        target: None,
    });
}

fn main() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if std::env::var("LSYNC_BENCH_CHILD").as_deref() == Ok("backfill") {
        runtime.block_on(backfill_child());
        return;
    }
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let sizes = if !benchmarking {
        SMOKE
    } else if std::env::var_os("LSYNC_BENCH_QUICK").is_some() {
        QUICK
    } else {
        FULL
    };
    println!(
        "{:<24} {:>14} {:<9} {:<34} {:>14}   {:<13}   target",
        "scenario", "figure", "unit", "baseline", "value", "ratio"
    );
    // `LSYNC_BENCH_ONLY=backfill,live` runs some scenario groups only (backfill, live,
    // live-shared, merge).
    let only = std::env::var("LSYNC_BENCH_ONLY").unwrap_or_default();
    let runs = |group: &str| only.is_empty() || only.split(',').any(|name| name == group);
    runtime.block_on(async {
        if runs("backfill") {
            backfill(sizes).await;
        }
        if runs("live") {
            live(sizes).await;
        }
        if runs("live-shared") {
            live_shared(sizes).await;
        }
    });
    if runs("merge") {
        merge(sizes);
    }
}

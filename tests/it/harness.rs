//! Devices for end-to-end tests: a library file in a temporary folder, a QUIC transport on
//! loopback, pairing by invitation, and waiting for convergence on events (never on sleeps).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use lsync_hlc::DeviceId;
use lsync_node::config::SyncConfig;
use lsync_node::{Edit, Event, Library};
use lsync_protocol::{LibraryId, Message, Value};
use lsync_store::{dump_tables, reference_registry};
use lsync_transport::{
    FilePeerStore, Identity, Invitation, LocalDevice, PeerInfo, PeerStore, QuicOptions,
    QuicTransport, RequestError, SendError, ShutdownReport, Transport, TransportEvent,
};
use tokio::sync::mpsc;
use uuid::Uuid;

/// The longest any test waits for something to happen; reaching it fails the test.
pub const WAIT: Duration = Duration::from_secs(60);

/// Sends the engine's tracing output to the test's output when `LSYNC_TEST_LOG` is set (a
/// `RUST_LOG`-style filter, e.g. `LSYNC_TEST_LOG=lsync_node=debug`).
pub fn init_logging() {
    if std::env::var_os("LSYNC_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("LSYNC_TEST_LOG"))
            .with_test_writer()
            .try_init();
    }
}

/// Settings that make tests quick without changing behaviour: short windows and intervals.
pub fn test_config() -> SyncConfig {
    SyncConfig {
        batch_window: Duration::from_millis(20),
        ack_timeout: Duration::from_millis(500),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        heartbeat_interval: Duration::from_millis(300),
        stale_timeout: Duration::from_secs(3),
        prune_interval: Duration::from_millis(500),
        request_timeout: Duration::from_secs(10),
        ..SyncConfig::default()
    }
}

/// One device: its folder, library, transport and event subscription.
pub struct Node {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub library: Library,
    pub transport: QuicTransport,
    pub events: mpsc::Receiver<Event>,
}

impl Node {
    /// A new device of `library` in a new folder, syncing.
    pub async fn start(library: LibraryId, name: &str) -> Node {
        Node::start_in(tempfile::tempdir().unwrap(), library, name, test_config(), true).await
    }

    /// A device in `dir`: created there, or reopened from what is there.
    pub async fn start_in(
        dir: tempfile::TempDir,
        library_id: LibraryId,
        name: &str,
        config: SyncConfig,
        create: bool,
    ) -> Node {
        let how = if create { How::Create } else { How::Reopen };
        Node::start_as(dir, library_id, name, config, how).await
    }

    /// A device in `dir`, its library opened `how`, syncing.
    pub async fn start_as(
        dir: tempfile::TempDir,
        library_id: LibraryId,
        name: &str,
        config: SyncConfig,
        how: How,
    ) -> Node {
        let library = open_library_as(dir.path(), library_id, &config, how).await;
        let transport = start_transport(dir.path(), &library, name, &config).await;
        Node { name: name.to_owned(), dir, library, transport, events: mpsc::channel(1).1 }
            .subscribed()
            .await
    }

    async fn subscribed(mut self) -> Node {
        self.events = self.library.subscribe();
        self
    }

    pub fn device(&self) -> DeviceId {
        self.library.identity().device
    }

    /// Every synced table's content.
    pub async fn tables(&self) -> BTreeMap<String, Vec<Vec<Value>>> {
        dump_tables(self.library.reader(), self.library.registry()).await.unwrap()
    }

    /// Closes the library (and with it the transport); returns the folder for reopening.
    pub async fn close(self) -> tempfile::TempDir {
        self.library.close().await.unwrap();
        self.dir
    }

    /// Writes shared edits as an app should: a copy that learned it must resync (a restore it
    /// could not see itself, found out from a peer) refuses them with `NotReady` until its
    /// backfill ends, so wait for that and write again.
    pub async fn write_shared(&mut self, edits: Vec<Edit>) {
        loop {
            match self.library.write_shared(edits.clone()).await {
                Err(lsync_node::LibraryError::NotReady { .. }) => {
                    backfilled(self).await;
                }
                written => {
                    written.unwrap();
                    return;
                }
            }
        }
    }

    /// Waits for the first event `pick` accepts.
    pub async fn wait_for<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let event = self.events.recv().await.expect("event subscription open");
                if let Some(found) = pick(&event) {
                    return found;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{}: no matching event within {WAIT:?}", self.name))
    }
}

/// Opens (or creates) a library in `dir` with the reference schema.
pub async fn open_library(
    dir: &Path,
    library: LibraryId,
    config: &SyncConfig,
    create: bool,
) -> Library {
    let how = if create { How::Create } else { How::Reopen };
    open_library_as(dir, library, config, how).await
}

/// How a test device gets its library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// The library's first device.
    Create,
    /// A new copy of an existing library: it backfills.
    Join,
    /// The file already in the folder.
    Reopen,
}

/// Opens, creates or joins a library in `dir` with the reference schema.
pub async fn open_library_as(
    dir: &Path,
    library: LibraryId,
    config: &SyncConfig,
    how: How,
) -> Library {
    init_logging();
    let identity = Identity::load_or_create(&dir.join("identity")).unwrap();
    let registry = Arc::new(reference_registry().unwrap());
    let path = dir.join("library.db");
    let config = config.clone();
    match how {
        How::Create => Library::create(&path, registry, library, identity.device(), config).await,
        How::Join => Library::join(&path, registry, library, identity.device(), config).await,
        How::Reopen => Library::open(&path, registry, config).await,
    }
    .unwrap()
}

/// Starts a QUIC transport on loopback for `library` and starts sync over it.
pub async fn start_transport(
    dir: &Path,
    library: &Library,
    name: &str,
    config: &SyncConfig,
) -> QuicTransport {
    let (transport, events) = quic(dir, library, name, config).await;
    library.start_sync(transport.clone(), events).await.unwrap();
    transport
}

/// A QUIC transport for `library`, not yet handed to it.
pub async fn quic(
    dir: &Path,
    library: &Library,
    name: &str,
    config: &SyncConfig,
) -> (QuicTransport, mpsc::Receiver<TransportEvent>) {
    let identity = Identity::load_or_create(&dir.join("identity")).unwrap();
    let store: Arc<dyn PeerStore> = Arc::new(FilePeerStore::open(dir.join("peers")).unwrap());
    QuicTransport::start(QuicOptions {
        identity,
        local: LocalDevice {
            library: library.identity().library,
            name: name.to_owned(),
            epoch: library.identity().epoch,
        },
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        store,
        config: config.transport_config(),
        watermarks: Some(library.watermark_source()),
    })
    .await
    .unwrap()
}

/// Pairs `joiner` with `inviter` by invitation and waits until each sees the other online and
/// has caught up from it.
pub async fn pair(inviter: &mut Node, joiner: &mut Node) {
    let (inviter_id, joiner_id) = pair_online(inviter, joiner).await;
    caught_up(inviter, joiner_id).await;
    caught_up(joiner, inviter_id).await;
}

/// Pairs a joining device with `inviter`, and waits until each sees the other online and the
/// joiner's backfill finished.
pub async fn pair_joining(inviter: &mut Node, joiner: &mut Node) {
    pair_online(inviter, joiner).await;
    backfilled(joiner).await;
}

/// Pairs by invitation (through its text form) and waits until each sees the other online.
/// Returns the inviter's and the joiner's ids.
async fn pair_online(inviter: &mut Node, joiner: &mut Node) -> (DeviceId, DeviceId) {
    let invitation = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
    let invitation = Invitation::from_token(&invitation.to_token()).unwrap();
    joiner.transport.join(&invitation).await.unwrap();
    let (inviter_id, joiner_id) = (inviter.device(), joiner.device());
    online(inviter, joiner_id).await;
    online(joiner, inviter_id).await;
    (inviter_id, joiner_id)
}

/// Three devices a, b and c of `library`, each paired with each other.
pub async fn three_paired(library: LibraryId) -> (Node, Node, Node) {
    let (mut a, mut b, mut c) = three(library).await;
    pair(&mut a, &mut b).await;
    pair(&mut a, &mut c).await;
    pair(&mut b, &mut c).await;
    (a, b, c)
}

/// Three devices a, b and c of `library`, not paired yet.
pub async fn three(library: LibraryId) -> (Node, Node, Node) {
    (
        Node::start(library, "a").await,
        Node::start(library, "b").await,
        Node::start(library, "c").await,
    )
}

/// Waits until `node`'s backfill finished (its copy is ready).
pub async fn backfilled(node: &mut Node) -> lsync_node::BackfillProgress {
    node.wait_for(|event| match event {
        Event::Backfill(progress) if progress.phase == lsync_node::BackfillPhase::Ready => {
            Some(progress.clone())
        }
        _ => None,
    })
    .await
}

/// Waits until `node`'s backfill applied at least `rows` rows; returns that progress.
pub async fn backfill_reached(node: &mut Node, rows: u64) -> lsync_node::BackfillProgress {
    node.wait_for(|event| match event {
        Event::Backfill(progress) if progress.done >= rows => Some(progress.clone()),
        _ => None,
    })
    .await
}

/// `node` reconnects and catches up from `peer` again, so that `peer` hears where `node`'s copy
/// is now (its incarnation and write count, told in the watermark request).
pub async fn told_again(node: &mut Node, peer: DeviceId) {
    node.library.set_sync_enabled(false).await;
    node.library.set_sync_enabled(true).await;
    caught_up(node, peer).await;
}

/// Waits until `node` finished a catch-up from `peer`.
pub async fn caught_up(node: &mut Node, peer: DeviceId) {
    node.wait_for(|event| {
        matches!(event, Event::CaughtUp { peer: p, .. } if *p == peer).then_some(())
    })
    .await;
}

/// Waits until `node` reports `peer` online.
pub async fn online(node: &mut Node, peer: DeviceId) {
    node.wait_for(|event| {
        matches!(event, Event::PeerOnline { peer: p, .. } if *p == peer).then_some(())
    })
    .await;
}

/// Waits until every node holds the same content in every synced table, re-checking after each
/// event any of them emits.
pub async fn converge(nodes: &mut [&mut Node]) -> BTreeMap<String, Vec<Vec<Value>>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut tables = Vec::with_capacity(nodes.len());
        for node in nodes.iter() {
            tables.push(node.tables().await);
        }
        if tables.windows(2).all(|pair| pair[0] == pair[1]) {
            return tables.remove(0);
        }
        let next = std::future::poll_fn(|cx| {
            for node in nodes.iter_mut() {
                if let Poll::Ready(event) = node.events.poll_recv(cx) {
                    return Poll::Ready(event);
                }
            }
            Poll::Pending
        });
        if tokio::time::timeout_at(deadline, next).await.is_err() {
            let names: Vec<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
            let counts: Vec<BTreeMap<&String, usize>> = tables
                .iter()
                .map(|t| t.iter().map(|(name, rows)| (name, rows.len())).collect())
                .collect();
            panic!("{names:?} did not converge within {WAIT:?}: row counts {counts:?}");
        }
    }
}

/// Waits until `check` holds: checked first, after every event on `node`, and every 50 ms for
/// conditions no event announces (a retry, an acknowledgement). Fails after [`WAIT`].
pub async fn eventually<F: Future<Output = bool>>(
    node: &mut Node,
    mut check: impl FnMut(Library) -> F,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !check(node.library.clone()).await {
        if tokio::time::Instant::now() >= deadline {
            panic!("{}: condition not reached within {WAIT:?}", node.name);
        }
        tokio::select! {
            _ = node.events.recv() => {}
            _ = tick.tick() => {}
        }
    }
}

/// A random id of a new library.
pub fn new_library() -> LibraryId {
    LibraryId(Uuid::new_v4())
}

/// A transport whose first `failures` sends of batches fail, as a dropped connection would make
/// them fail; everything else goes through the real transport underneath.
#[derive(Clone)]
pub struct FlakyTransport<T> {
    pub inner: T,
    pub failures: Arc<AtomicUsize>,
}

impl<T: Transport + Clone> Transport for FlakyTransport<T> {
    fn local_device(&self) -> DeviceId {
        self.inner.local_device()
    }

    fn send(
        &self,
        peer: DeviceId,
        message: Message,
    ) -> impl Future<Output = Result<(), SendError>> + Send {
        let is_batch = matches!(message, Message::StateBatch(_) | Message::SharedBatch(_));
        let fail = is_batch
            && self
                .failures
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(1))
                .is_ok();
        let inner = self.inner.clone();
        async move {
            if fail {
                Err(SendError::ConnectionLost("dropped by the test".into()))
            } else {
                inner.send(peer, message).await
            }
        }
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

/// One backfill page a device asked a peer for, and how many rows the answer carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// The peer asked.
    pub peer: DeviceId,
    /// The model (device-owned: `BackfillRequest`; shared: `SharedSnapshotRequest`).
    pub model: String,
    /// The key the page starts after (`None`: from the start of the step).
    pub after: Option<Uuid>,
    /// Rows (or records) in the answer: `None` while it is pending, or if the request failed.
    pub rows: Option<usize>,
    /// The key of the answer's last row, if it had rows.
    pub last: Option<Uuid>,
}

/// Every backfill page request a device sent, in the order it sent them.
pub type PageLog = Arc<std::sync::Mutex<Vec<PageRequest>>>;

/// The requests in `log` for `model` to `peer` that were answered, one per start key (a request
/// repeated after a failure counts once): start key → rows served.
pub fn answered_pages(log: &PageLog, peer: DeviceId, model: &str) -> BTreeMap<Option<Uuid>, usize> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|request| request.peer == peer && request.model == model)
        .filter_map(|request| Some((request.after, request.rows?)))
        .collect()
}

/// A transport that records every backfill page request its device sends ([`PageLog`]) and
/// otherwise is the real transport underneath.
#[derive(Clone)]
pub struct RecordingTransport<T> {
    pub inner: T,
    pub log: PageLog,
}

impl<T: Transport + Clone> Transport for RecordingTransport<T> {
    fn local_device(&self) -> DeviceId {
        self.inner.local_device()
    }

    fn send(
        &self,
        peer: DeviceId,
        message: Message,
    ) -> impl Future<Output = Result<(), SendError>> + Send {
        self.inner.send(peer, message)
    }

    fn request(
        &self,
        peer: DeviceId,
        message: Message,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, RequestError>> + Send {
        let page = match &message {
            Message::BackfillRequest(request) => Some((request.model.clone(), request.after)),
            Message::SharedSnapshotRequest(request) => Some((request.model.clone(), request.after)),
            _ => None,
        };
        let index = page.map(|(model, after)| {
            let mut log = self.log.lock().unwrap();
            log.push(PageRequest { peer, model, after, rows: None, last: None });
            log.len() - 1
        });
        let (inner, log) = (self.inner.clone(), self.log.clone());
        async move {
            let response = inner.request(peer, message, timeout).await;
            if let Some(index) = index {
                let keys: Option<Vec<Uuid>> = match &response {
                    Ok(Message::StatePage(page)) => Some(page.rows.iter().map(|r| r.id).collect()),
                    Ok(Message::SharedSnapshotPage(page)) => {
                        Some(page.records.iter().map(|r| r.id).collect())
                    }
                    _ => None,
                };
                let mut log = log.lock().unwrap();
                log[index].rows = keys.as_ref().map(Vec::len);
                log[index].last = keys.and_then(|keys| keys.last().copied());
            }
            response
        }
    }

    fn connected_peers(&self) -> Vec<PeerInfo> {
        self.inner.connected_peers()
    }

    fn shutdown(&self) -> impl Future<Output = ShutdownReport> + Send {
        self.inner.shutdown()
    }
}

impl Node {
    /// Like [`Node::start_as`], with every backfill page request recorded.
    pub async fn start_recording(
        dir: tempfile::TempDir,
        library_id: LibraryId,
        name: &str,
        config: SyncConfig,
        how: How,
    ) -> (Node, PageLog) {
        let library = open_library_as(dir.path(), library_id, &config, how).await;
        Node::sync_recording(dir, library, name, &config).await
    }

    /// Starts sync on an open `library` in `dir`, recording every backfill page request. The
    /// subscription starts before sync does, so it sees the backfill's first progress.
    pub async fn sync_recording(
        dir: tempfile::TempDir,
        library: Library,
        name: &str,
        config: &SyncConfig,
    ) -> (Node, PageLog) {
        let events = library.subscribe();
        let (transport, transport_events) = quic(dir.path(), &library, name, config).await;
        let log = PageLog::default();
        let recording = RecordingTransport { inner: transport.clone(), log: log.clone() };
        library.start_sync(recording, transport_events).await.unwrap();
        (Node { name: name.to_owned(), dir, library, transport, events }, log)
    }
}

/// Rows done of the `entries` step (of its one owner) in `progress`; 0 before the plan.
pub fn entries_done(progress: &lsync_node::BackfillProgress) -> u64 {
    progress.steps.iter().find(|(name, _, _)| name.starts_with("entries@")).map_or(0, |step| step.1)
}

/// The backfill checkpoint persisted in the library file in `dir`, read through a read-only
/// connection of its own: the file may belong to another process, running or killed.
pub async fn persisted_checkpoint(dir: &Path) -> lsync_backfill::Checkpoint {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.join("library.db"))
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let checkpoint = lsync_backfill::sql::load(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    checkpoint.expect("a joining copy stores its checkpoint when it is created")
}

/// One test of this binary running alone in a child process, its stdout read line by line.
/// Dropping it kills the process, so a failing test leaves none behind.
pub struct ChildTest {
    child: std::process::Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl ChildTest {
    /// Runs the test named `test` (as the harness names it: `module::function`; it may be
    /// `#[ignore]`d) in a child process with `env` added to the environment.
    pub fn spawn(test: &str, env: &[(&str, &std::ffi::OsStr)]) -> ChildTest {
        use std::io::BufRead;
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .args([test, "--exact", "--include-ignored", "--nocapture", "--test-threads=1"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        ChildTest { child, lines }
    }

    /// The next line the child printed; `None` once it closed its output (it exited). Fails
    /// after [`WAIT`].
    pub async fn line(&mut self) -> Option<String> {
        tokio::time::timeout(WAIT, self.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("the child process printed nothing within {WAIT:?}"))
    }

    /// Kills the child with SIGKILL (no handler runs, nothing is flushed or closed) and reaps
    /// it; returns how it ended.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        self.child.kill().unwrap();
        self.child.wait().unwrap()
    }

    /// Waits for the child to exit by itself.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for ChildTest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backup of a running node's library file (`VACUUM INTO`) and of its generation file.
pub struct Backup {
    db: std::path::PathBuf,
    generation: Vec<u8>,
}

/// Takes a backup of `node`'s library while it runs, as a backup tool would.
pub async fn back_up(node: &Node) -> Backup {
    let db = node.dir.path().join("backup.db");
    sqlx::query("VACUUM INTO ?1")
        .bind(db.to_str().unwrap())
        .execute(node.library.reader())
        .await
        .unwrap();
    let generation = std::fs::read(node.dir.path().join("library.db-generation")).unwrap();
    Backup { db, generation }
}

/// Puts `backup` back in the closed node's folder `dir`: the library file, and the generation
/// file too when `whole_folder` (then nothing at open can tell it was restored).
pub fn restore(dir: &Path, backup: &Backup, whole_folder: bool) {
    for file in ["library.db-wal", "library.db-shm"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    std::fs::copy(&backup.db, dir.join("library.db")).unwrap();
    if whole_folder {
        std::fs::write(dir.join("library.db-generation"), &backup.generation).unwrap();
    }
}

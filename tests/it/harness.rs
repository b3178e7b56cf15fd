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
use lsync_node::{Event, Library};
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

//! One peer of the real mode (a library file, a QUIC transport on loopback, the engine), its
//! skewable wall clock, and the gate through which the simulator cuts and heals its links.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lsync_hlc::{Clock, DeviceId, SystemClock};
use lsync_node::config::SyncConfig;
use lsync_node::{Event, Library};
use lsync_protocol::{Hello, LibraryId, Message};
use lsync_store::Registry;
use lsync_transport::{
    DisconnectReason, FilePeerStore, Identity, Invitation, LocalDevice, PeerInfo, PeerStore,
    QuicOptions, QuicTransport, RequestError, SendError, ShutdownReport, SplitMix64, Transport,
    TransportEvent,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::SimError;

/// The share of batches a lossy gate drops silently, as if lost on the wire after the transport
/// accepted them: 2 %, enough to exercise the ack timeout and re-send path many times a run.
const LOSS: f64 = 0.02;

/// A wall clock offset from the system clock by an amount the simulator sets (clock skew, and
/// clock steps while running).
#[derive(Debug, Default)]
pub(super) struct SkewedClock {
    offset_ms: AtomicI64,
}

impl SkewedClock {
    /// The offset from the system clock.
    pub(super) fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Sets the offset from the system clock.
    pub(super) fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }
}

impl Clock for SkewedClock {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms().saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
    }
}

/// Which peers a gate lets through, and which peers are connected underneath.
#[derive(Debug, Default)]
struct GateState {
    cut: BTreeSet<DeviceId>,
    /// Peers the QUIC transport reports connected, with their `Hello`.
    underlying: BTreeMap<DeviceId, Hello>,
}

/// Sits between a peer's QUIC transport and its engine. While the link to a peer is cut, the
/// engine sees that peer disconnected: sends and requests to it fail, and every event from it
/// (messages, requests, heartbeat watermarks) is dropped. Healing shows the peer connected again
/// if its QUIC connection is up (the engine then catches up as on any reconnect). With `lossy`
/// set, a share of batches is dropped silently after being accepted.
pub(super) struct Gate {
    state: tokio::sync::Mutex<GateState>,
    /// A copy of the cut set for the synchronous checks in `send`.
    cut: Mutex<BTreeSet<DeviceId>>,
    to_engine: mpsc::Sender<TransportEvent>,
    lossy: AtomicBool,
    rng: Mutex<SplitMix64>,
    /// Encoded bytes of the messages and requests this peer sent.
    pub(super) bytes_sent: AtomicU64,
    /// Encoded bytes of the responses each peer sent to this one.
    pub(super) response_bytes: Mutex<BTreeMap<DeviceId, u64>>,
    /// Batches dropped by the lossy gate.
    pub(super) dropped: AtomicU64,
}

impl Gate {
    fn lock_cut(&self) -> std::sync::MutexGuard<'_, BTreeSet<DeviceId>> {
        self.cut.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_cut(&self, peer: DeviceId) -> bool {
        self.lock_cut().contains(&peer)
    }

    /// Cuts the link to `peer` as this side sees it.
    pub(super) async fn cut(&self, peer: DeviceId) {
        let mut state = self.state.lock().await;
        if state.cut.insert(peer) {
            self.lock_cut().insert(peer);
            if state.underlying.contains_key(&peer) {
                let reason = DisconnectReason::Lost("link cut by the simulator".into());
                let _ = self.to_engine.send(TransportEvent::Disconnected { peer, reason }).await;
            }
        }
        drop(state);
    }

    /// Heals the link to `peer`.
    pub(super) async fn heal(&self, peer: DeviceId) {
        let mut state = self.state.lock().await;
        if state.cut.remove(&peer) {
            self.lock_cut().remove(&peer);
            if let Some(hello) = state.underlying.get(&peer).cloned() {
                let _ = self.to_engine.send(TransportEvent::Connected { peer, hello }).await;
            }
        }
        drop(state);
    }

    /// Heals every link.
    pub(super) async fn heal_all(&self) {
        let cut: Vec<DeviceId> = self.lock_cut().iter().copied().collect();
        for peer in cut {
            self.heal(peer).await;
        }
    }

    /// Starts or stops dropping a share of batches.
    pub(super) fn set_lossy(&self, lossy: bool) {
        self.lossy.store(lossy, Ordering::Relaxed);
    }

    /// Whether to drop this batch (lossy gates only).
    fn lose(&self, message: &Message) -> bool {
        let batch = matches!(message, Message::StateBatch(_) | Message::SharedBatch(_));
        if !batch || !self.lossy.load(Ordering::Relaxed) {
            return false;
        }
        let lost = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner).chance(LOSS);
        if lost {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        lost
    }

    /// Passes the QUIC transport's events to the engine, minus those of cut peers.
    async fn forward(self: Arc<Self>, mut from_quic: mpsc::Receiver<TransportEvent>) {
        while let Some(event) = from_quic.recv().await {
            let mut state = self.state.lock().await;
            let pass = match &event {
                TransportEvent::Connected { peer, hello } => {
                    state.underlying.insert(*peer, hello.clone());
                    !state.cut.contains(peer)
                }
                TransportEvent::Disconnected { peer, .. } => {
                    state.underlying.remove(peer);
                    !state.cut.contains(peer)
                }
                TransportEvent::Message { peer, .. } | TransportEvent::Watermarks { peer, .. } => {
                    !state.cut.contains(peer)
                }
                // A dropped responder fails the request on the requester's side.
                TransportEvent::Request(request) => !state.cut.contains(&request.peer),
                TransportEvent::Paired(_) => true,
            };
            if pass && self.to_engine.send(event).await.is_err() {
                break;
            }
            drop(state);
        }
    }
}

fn encoded_len(message: &Message) -> u64 {
    lsync_protocol::encode(message).map_or(0, |bytes| u64::try_from(bytes.len()).unwrap_or(0))
}

/// The transport the engine gets: the QUIC transport behind a [`Gate`].
#[derive(Clone)]
pub(super) struct GatedTransport {
    inner: QuicTransport,
    gate: Arc<Gate>,
}

impl Transport for GatedTransport {
    fn local_device(&self) -> DeviceId {
        self.inner.local_device()
    }

    fn send(
        &self,
        peer: DeviceId,
        message: Message,
    ) -> impl Future<Output = Result<(), SendError>> + Send {
        let (inner, gate) = (self.inner.clone(), self.gate.clone());
        async move {
            if gate.is_cut(peer) {
                return Err(SendError::ConnectionLost("link cut by the simulator".into()));
            }
            gate.bytes_sent.fetch_add(encoded_len(&message), Ordering::Relaxed);
            if gate.lose(&message) {
                return Ok(());
            }
            inner.send(peer, message).await
        }
    }

    fn request(
        &self,
        peer: DeviceId,
        message: Message,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, RequestError>> + Send {
        let (inner, gate) = (self.inner.clone(), self.gate.clone());
        async move {
            if gate.is_cut(peer) {
                return Err(RequestError::ConnectionLost("link cut by the simulator".into()));
            }
            gate.bytes_sent.fetch_add(encoded_len(&message), Ordering::Relaxed);
            let response = inner.request(peer, message, timeout).await?;
            *gate
                .response_bytes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(peer)
                .or_default() += encoded_len(&response);
            Ok(response)
        }
    }

    fn connected_peers(&self) -> Vec<PeerInfo> {
        let cut = self.gate.lock_cut().clone();
        self.inner
            .connected_peers()
            .into_iter()
            .filter(|peer| !cut.contains(&peer.device))
            .collect()
    }

    fn shutdown(&self) -> impl Future<Output = ShutdownReport> + Send {
        self.inner.shutdown()
    }
}

/// A running peer.
pub(super) struct Running {
    pub(super) library: Library,
    pub(super) transport: QuicTransport,
    pub(super) gate: Arc<Gate>,
    pub(super) events: mpsc::Receiver<Event>,
    forwarder: JoinHandle<()>,
}

/// Traffic a peer's earlier runs sent, kept across restarts.
#[derive(Debug, Default, Clone)]
pub(super) struct Traffic {
    pub(super) bytes_sent: u64,
    /// Responses received from each peer (counted towards that peer's bytes sent).
    pub(super) response_bytes: BTreeMap<DeviceId, u64>,
    pub(super) dropped: u64,
}

impl Traffic {
    fn add_gate(&mut self, gate: &Gate) {
        self.bytes_sent += gate.bytes_sent.load(Ordering::Relaxed);
        self.dropped += gate.dropped.load(Ordering::Relaxed);
        let responses =
            gate.response_bytes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (peer, bytes) in responses.iter() {
            *self.response_bytes.entry(*peer).or_default() += bytes;
        }
    }
}

/// One device of the simulated library.
pub(super) struct Peer {
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) device: DeviceId,
    pub(super) clock: Arc<SkewedClock>,
    listen: SocketAddr,
    pub(super) running: Option<Running>,
    /// Traffic of the runs before the current one.
    pub(super) traffic: Traffic,
    pub(super) restarts: u32,
}

impl Peer {
    /// A new device in `dir`, not yet started: the library's first copy, or (`joining`) a new copy
    /// of it that backfills from its peers.
    pub(super) async fn create(
        name: String,
        dir: PathBuf,
        library_id: LibraryId,
        registry: &Arc<Registry>,
        config: &SyncConfig,
        joining: bool,
    ) -> Result<Self, SimError> {
        std::fs::create_dir_all(&dir).map_err(|error| SimError::io(&dir, &error))?;
        let identity = Identity::load_or_create(&dir.join("identity"))
            .map_err(|error| SimError::Setup(format!("{name}: identity: {error}")))?;
        let path = dir.join("library.db");
        let (registry, device, config) = (registry.clone(), identity.device(), config.clone());
        let library = if joining {
            Library::join(&path, registry, library_id, device, config).await
        } else {
            Library::create(&path, registry, library_id, device, config).await
        }
        .map_err(|error| SimError::Setup(format!("{name}: creating the library: {error}")))?;
        library.close().await.map_err(|error| SimError::Setup(format!("{name}: {error}")))?;
        Ok(Self {
            name,
            dir,
            device: identity.device(),
            clock: Arc::new(SkewedClock::default()),
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            running: None,
            traffic: Traffic::default(),
            restarts: 0,
        })
    }

    /// Opens the library from its files with the peer's clock and starts sync behind a gate that
    /// starts with `cut` links cut. Listens on the same port as before a restart, so that peers
    /// redial it where they knew it.
    pub(super) async fn start(
        &mut self,
        registry: &Arc<Registry>,
        config: &SyncConfig,
        cut: &BTreeSet<DeviceId>,
        lossy: bool,
        rng_seed: u64,
    ) -> Result<(), SimError> {
        let setup = |what: &str, error: &dyn std::fmt::Display| {
            SimError::Setup(format!("{}: {what}: {error}", self.name))
        };
        let clock: Arc<dyn Clock> = self.clock.clone();
        let library = Library::open_with_clock(
            &self.dir.join("library.db"),
            registry.clone(),
            config.clone(),
            clock,
        )
        .await
        .map_err(|error| setup("opening the library", &error))?;
        let events = library.subscribe();
        let identity = Identity::load_or_create(&self.dir.join("identity"))
            .map_err(|error| setup("identity", &error))?;
        let store: Arc<dyn PeerStore> = Arc::new(
            FilePeerStore::open(self.dir.join("peers"))
                .map_err(|error| setup("peer store", &error))?,
        );
        let (transport, from_quic) = QuicTransport::start(QuicOptions {
            identity,
            local: LocalDevice {
                library: library.identity().library,
                name: self.name.clone(),
                epoch: library.identity().epoch,
            },
            listen: self.listen,
            store,
            config: config.transport_config(),
            watermarks: Some(library.watermark_source()),
        })
        .await
        .map_err(|error| setup("starting QUIC", &error))?;
        self.listen = transport.local_addr().map_err(|error| setup("local address", &error))?;
        let (to_engine, engine_events) = mpsc::channel(config.transport_event_capacity.max(1));
        let gate = Arc::new(Gate {
            state: tokio::sync::Mutex::new(GateState {
                cut: cut.clone(),
                underlying: BTreeMap::new(),
            }),
            cut: Mutex::new(cut.clone()),
            to_engine,
            lossy: AtomicBool::new(lossy),
            rng: Mutex::new(SplitMix64::new(rng_seed)),
            bytes_sent: AtomicU64::new(0),
            response_bytes: Mutex::new(BTreeMap::new()),
            dropped: AtomicU64::new(0),
        });
        let forwarder = tokio::spawn(gate.clone().forward(from_quic));
        let gated = GatedTransport { inner: transport.clone(), gate: gate.clone() };
        library
            .start_sync(gated, engine_events)
            .await
            .map_err(|error| setup("starting sync", &error))?;
        self.running = Some(Running { library, transport, gate, events, forwarder });
        Ok(())
    }

    /// Stops the peer. Its links must already be cut on both sides for an abrupt stop: then the
    /// engine's shutdown flush reaches no one, as if the process had died.
    pub(super) async fn stop(&mut self) -> Result<(), SimError> {
        let Some(running) = self.running.take() else { return Ok(()) };
        self.traffic.add_gate(&running.gate);
        let closed = running.library.close().await;
        running.forwarder.abort();
        closed.map_err(|error| SimError::Setup(format!("{}: closing: {error}", self.name)))
    }

    /// Kills the peer as a crash would ([`Library::abort`]): nothing flushed, writes in
    /// progress dropped, no checkpoint. Its links should be cut first, so that what its
    /// connections still carry reaches no one.
    pub(super) async fn kill(&mut self) {
        let Some(running) = self.running.take() else { return };
        self.traffic.add_gate(&running.gate);
        running.library.abort().await;
        running.forwarder.abort();
    }

    /// Replaces the stopped peer's library file with a new, empty copy that joins again under
    /// the same identity (its keys and pairings stay): it backfills when started.
    pub(super) async fn recreate(
        &mut self,
        library_id: LibraryId,
        registry: &Arc<Registry>,
        config: &SyncConfig,
    ) -> Result<(), SimError> {
        for file in ["library.db", "library.db-wal", "library.db-shm", "library.db-generation"] {
            let path = self.dir.join(file);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|error| SimError::io(&path, &error))?;
            }
        }
        let library = Library::join(
            &self.dir.join("library.db"),
            registry.clone(),
            library_id,
            self.device,
            config.clone(),
        )
        .await
        .map_err(|error| SimError::Setup(format!("{}: joining again: {error}", self.name)))?;
        library.close().await.map_err(|error| SimError::Setup(format!("{}: {error}", self.name)))
    }

    /// Copies the running library to `backup.db` beside it (and the generation file to
    /// `backup.db-generation`), as a backup tool would while the app runs.
    pub(super) async fn back_up(&self) -> Result<bool, SimError> {
        let Some(running) = &self.running else { return Ok(false) };
        let backup = self.dir.join("backup.db");
        if backup.exists() {
            std::fs::remove_file(&backup).map_err(|error| SimError::io(&backup, &error))?;
        }
        let target = backup.to_string_lossy().into_owned();
        sqlx::query("VACUUM INTO ?1")
            .bind(target)
            .execute(running.library.reader())
            .await
            .map_err(|error| SimError::Setup(format!("{}: backup: {error}", self.name)))?;
        let generation = self.dir.join("library.db-generation");
        if generation.exists() {
            let copy = self.dir.join("backup.db-generation");
            std::fs::copy(&generation, &copy).map_err(|error| SimError::io(&copy, &error))?;
        }
        Ok(true)
    }

    /// Puts the backup back in place of the stopped peer's library file; `with_generation`:
    /// the generation file too (the whole folder restored: nothing at open can tell), otherwise
    /// the generation file is kept, as the user guide says to restore.
    pub(super) fn restore_backup(&self, with_generation: bool) -> Result<(), SimError> {
        for file in ["library.db-wal", "library.db-shm"] {
            let path = self.dir.join(file);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|error| SimError::io(&path, &error))?;
            }
        }
        let (backup, db) = (self.dir.join("backup.db"), self.dir.join("library.db"));
        std::fs::copy(&backup, &db).map_err(|error| SimError::io(&db, &error))?;
        let saved = self.dir.join("backup.db-generation");
        if with_generation && saved.exists() {
            let generation = self.dir.join("library.db-generation");
            std::fs::copy(&saved, &generation)
                .map_err(|error| SimError::io(&generation, &error))?;
        }
        Ok(())
    }

    /// This peer's traffic so far, current run included.
    pub(super) fn traffic(&self) -> Traffic {
        let mut traffic = self.traffic.clone();
        if let Some(running) = &self.running {
            traffic.add_gate(&running.gate);
        }
        traffic
    }
}

/// Pairs `joiner` with `inviter` by invitation (both must be running).
pub(super) async fn pair(inviter: &Peer, joiner: &Peer) -> Result<(), SimError> {
    let (Some(inviting), Some(joining)) = (&inviter.running, &joiner.running) else {
        return Err(SimError::Setup(format!(
            "cannot pair {} with {}: not running",
            joiner.name, inviter.name
        )));
    };
    let failed = |error: &dyn std::fmt::Display| {
        SimError::Setup(format!("pairing {} with {}: {error}", joiner.name, inviter.name))
    };
    let invitation =
        inviting.transport.invite(Duration::from_secs(60)).await.map_err(|error| failed(&error))?;
    let invitation =
        Invitation::from_token(&invitation.to_token()).map_err(|error| failed(&error))?;
    joining.transport.join(&invitation).await.map_err(|error| failed(&error))?;
    Ok(())
}

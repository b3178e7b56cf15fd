//! The QUIC transport: quinn endpoints, pairing, dialing, and the public [`QuicTransport`].
//!
//! Tasks: one accept loop per endpoint (sync, and pairing once an invitation was issued), one
//! dialer per paired peer (redials with backoff while the peer is not connected), one task per
//! live connection (accepts streams, sends heartbeats, detects staleness), and one per incoming
//! stream. All of them end on [`QuicTransport::shutdown`].

pub mod raw;
mod session;
mod stream;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lsync_hlc::DeviceId;
use lsync_protocol::{
    Epoch, ErrorCode, ErrorMessage, LibraryId, MAX_TEXT_BYTES, Message, PROTOCOL_VERSION,
    PairRequest, PairResponse,
};
use quinn::{ConnectionError, TransportErrorCode};
use ring::rand::SecureRandom;
use rustls::crypto::CryptoProvider;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};
use uuid::Uuid;

pub(crate) use session::QuicResponder;
use session::Session;

use stream::{FrameReader, Incoming, close};
use tls::{SERVER_NAME, Trust};

use crate::config::{Backoff, SplitMix64, TransportConfig};
use crate::frame::encode_frame;
use crate::identity::{Fingerprint, Identity};
use crate::pairing::{Invitation, Refusal, SECRET_BYTES, pairing_proof};
use crate::peer_store::{PairedPeer, PeerStore, StoreError};
use crate::{
    PeerInfo, RequestError, SendError, ShutdownReport, Transport, TransportEvent, WatermarkSource,
    is_transport_message,
};

/// The least time shutdown leaves for the close frames to go out, within the close timeout.
const CLOSE_GRACE: Duration = Duration::from_millis(100);

/// The ALPN of pairing connections. Versioned separately from sync: the pairing exchange is
/// small and may outlive several sync versions.
pub const PAIR_ALPN: &[u8] = b"lsync-pair/1";

/// The ALPN of sync connections: `lsync/` and [`PROTOCOL_VERSION`], so `lsync/1`. A peer speaking
/// another version fails the TLS handshake with `no_application_protocol` instead of exchanging
/// messages it would misread.
pub fn sync_alpn() -> Vec<u8> {
    format!("lsync/{PROTOCOL_VERSION}").into_bytes()
}

/// The most one-way streams a peer may have open at once: 4. A peer uses one; the others let it
/// open a new one while a stream this side stopped is still being torn down.
const MAX_ONE_WAY_STREAMS: u32 = 4;

/// Per-stream receive window: 2 MiB, above the bandwidth-delay product of a gigabit LAN at 10 ms
/// so one stream can use the link, while a slow reader stops a sender after 2 MiB.
const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// Per-connection receive and send windows: 16 MiB, so a few streams make progress at once and
/// one connection never holds more than this in QUIC buffers in either direction.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// This device as its `Hello` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDevice {
    /// The library this transport syncs; connections for another library are refused.
    pub library: LibraryId,
    /// The device's human-readable name.
    pub name: String,
    /// The device's current epoch.
    pub epoch: Epoch,
}

/// Everything [`QuicTransport::start`] needs.
pub struct QuicOptions {
    /// The device's key and certificate ([`Identity::load_or_create`]).
    pub identity: Identity,
    /// What the `Hello` says.
    pub local: LocalDevice,
    /// Where to listen (UDP). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where pairings are kept.
    pub store: Arc<dyn PeerStore>,
    /// Knobs.
    pub config: TransportConfig,
    /// The watermarks heartbeats carry; `None` sends heartbeats without.
    pub watermarks: Option<WatermarkSource>,
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The TLS configuration could not be built (a bad identity).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The socket could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The pairings could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a connection to a peer could not be established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The peer does not speak `lsync/1` (TLS `no_application_protocol`).
    #[error("the peer does not speak lsync/{version}: {reason}", version = PROTOCOL_VERSION, reason = .0)]
    IncompatibleVersion(String),
    /// The peer's certificate is not one this device paired with (refused by this side).
    #[error("the peer's certificate is not paired with this device")]
    NotPaired,
    /// The peer refused this device's certificate (it does not know this device).
    #[error("the peer refused this device: {0}")]
    Refused(String),
    /// The peer's `Hello` named another library, or it refused ours for that reason.
    #[error("the peer syncs another library")]
    WrongLibrary,
    /// The peer broke the connection protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The handshake did not finish within the handshake timeout.
    #[error("handshake timed out")]
    Timeout,
    /// The connection failed.
    #[error("connection failed: {0}")]
    Failed(String),
    /// The transport is shutting down.
    #[error("the transport is shutting down")]
    ShuttingDown,
}

/// Why pairing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    /// The inviter refused: wrong, reused, expired or unknown invitation
    /// (`ErrorCode::PairingRefused`); the message says which.
    #[error("pairing refused: {0}")]
    Refused(String),
    /// The invitation is for another library than this transport's.
    #[error("the invitation is for library {invitation}, this transport syncs {local}")]
    WrongLibrary {
        /// The invitation's library.
        invitation: LibraryId,
        /// This transport's.
        local: LibraryId,
    },
    /// The inviter could not be reached or the exchange failed.
    #[error("cannot reach the inviter: {0}")]
    Unreachable(String),
    /// The inviter answered something other than a pairing response.
    #[error("unexpected answer from the inviter: {0}")]
    Protocol(String),
    /// The pairing could not be stored.
    #[error(transparent)]
    Store(#[from] StoreErrorMessage),
    /// This side cannot issue the invitation.
    #[error("cannot invite: {0}")]
    Invite(String),
    /// The transport is shutting down.
    #[error("the transport is shutting down")]
    ShuttingDown,
}

/// A [`StoreError`] as text (so [`PairError`] stays `Clone` and comparable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreErrorMessage(pub String);

impl From<StoreError> for PairError {
    fn from(error: StoreError) -> Self {
        PairError::Store(StoreErrorMessage(error.to_string()))
    }
}

/// The QUIC implementation of [`Transport`]. Cheap to clone (a handle to shared state).
///
/// Must be started inside a tokio runtime, and should be stopped with [`Transport::shutdown`]:
/// its tasks hold the endpoint open until then.
#[derive(Clone)]
pub struct QuicTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("device", &self.inner.identity.device())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    identity: Identity,
    local: LocalDevice,
    config: TransportConfig,
    provider: Arc<CryptoProvider>,
    quic_config: Arc<quinn::TransportConfig>,
    endpoint: quinn::Endpoint,
    sync_client: quinn::ClientConfig,
    /// The pairing endpoint, opened at the first invitation.
    pairing: tokio::sync::Mutex<Option<quinn::Endpoint>>,
    trust: Arc<Trust>,
    store: Arc<dyn PeerStore>,
    events: mpsc::Sender<TransportEvent>,
    /// The live connection per peer. A std mutex: never held across an await.
    sessions: Mutex<HashMap<DeviceId, Arc<Session>>>,
    /// The dialer of each paired peer, woken when its connection ends or the peer is unpaired.
    dialers: Mutex<HashMap<DeviceId, Arc<Notify>>>,
    shutting_down: AtomicBool,
    shutdown_signal: watch::Sender<bool>,
    answer_heartbeats: AtomicBool,
    /// `false` while stalled ([`QuicTransport::set_reading`]): nothing incoming is read.
    reading: watch::Sender<bool>,
    watermarks: Option<WatermarkSource>,
    rng: Mutex<SplitMix64>,
    next_nonce: AtomicU64,
    dial_failures: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section in this module is a single map operation or a copy, so a lock
    // poisoned by a panic elsewhere still guards consistent data.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An `Error` message, its text cut to the protocol's limit.
pub(crate) fn error_message(code: ErrorCode, text: &str) -> Message {
    let mut end = text.len().min(MAX_TEXT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Message::Error(ErrorMessage { code, message: text[..end].to_owned() })
}

fn random_seed() -> u64 {
    let mut bytes = [0; 8];
    // The system RNG failing is not something a transport can recover from; a fixed seed then
    // only makes backoff jitter predictable, which is harmless.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

impl QuicTransport {
    /// Binds the sync endpoint, loads the pairings, starts dialing every paired peer, and returns
    /// the transport with its events receiver (capacity [`TransportConfig::event_capacity`]).
    pub async fn start(
        options: QuicOptions,
    ) -> Result<(Self, mpsc::Receiver<TransportEvent>), StartError> {
        let QuicOptions { identity, local, listen, store, config, watermarks } = options;
        config.validate()?;
        let provider = tls::provider();
        let trust = Arc::new(Trust::new(store.paired()?, &provider));

        let quic_config = Arc::new(raw::transport_config(&config)?);
        let tls_error = |error: tls::TlsError| StartError::Tls(error.to_string());
        let server = tls::server_config(
            &identity,
            &trust,
            &provider,
            Arc::clone(&quic_config),
            tls::Accept::Paired,
            sync_alpn(),
        )
        .map_err(tls_error)?;
        let sync_client = tls::client_config(
            &identity,
            &trust,
            &provider,
            Arc::clone(&quic_config),
            None,
            sync_alpn(),
        )
        .map_err(tls_error)?;
        let endpoint = quinn::Endpoint::server(server, listen)
            .map_err(|source| StartError::Bind { address: listen, source })?;

        let (events, receiver) = mpsc::channel(config.event_capacity);
        let inner = Arc::new(Inner {
            identity,
            local,
            config,
            provider,
            quic_config,
            endpoint,
            sync_client,
            pairing: tokio::sync::Mutex::new(None),
            trust,
            store,
            events,
            sessions: Mutex::new(HashMap::new()),
            dialers: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            shutdown_signal: watch::Sender::new(false),
            answer_heartbeats: AtomicBool::new(true),
            reading: watch::Sender::new(true),
            watermarks,
            rng: Mutex::new(SplitMix64::new(random_seed())),
            next_nonce: AtomicU64::new(1),
            dial_failures: AtomicU64::new(0),
        });
        tokio::spawn(accept_loop(Arc::clone(&inner), inner.endpoint.clone(), false));
        for peer in inner.trust.all() {
            start_dialer(&inner, peer.device, true);
        }
        info!(
            device = %inner.identity.device(),
            address = ?inner.endpoint.local_addr().ok(),
            "transport started"
        );
        Ok((Self { inner }, receiver))
    }

    /// Where the sync endpoint listens.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// This device's certificate fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.identity.fingerprint()
    }

    /// How many handshakes were refused because the remote certificate is not paired (also the
    /// `lsync_transport_handshakes_refused_total` metrics counter).
    pub fn refused_handshakes(&self) -> u64 {
        self.inner.trust.refused()
    }

    /// How many dial attempts to paired peers failed (each is followed by a backoff).
    pub fn dial_failures(&self) -> u64 {
        self.inner.dial_failures.load(Ordering::Relaxed)
    }

    /// The peers this device is paired with.
    pub fn paired_peers(&self) -> Vec<PairedPeer> {
        self.inner.trust.all()
    }

    /// Fault injection for tests: while `false`, this transport leaves every incoming heartbeat
    /// unanswered (without closing anything), as a hung peer would, so its peers' stale
    /// detection can be exercised. Everything else keeps working.
    pub fn set_answer_heartbeats(&self, answer: bool) {
        self.inner.answer_heartbeats.store(answer, Ordering::Relaxed);
    }

    /// Fault injection for tests and the simulator's `stall` fault: while `false`, this
    /// transport reads nothing from its connections — no message, request or heartbeat — and
    /// closes none of them, as a hung process would. Its peers' sends then block on QUIC flow
    /// control (and time out after `send_timeout`), their requests time out, and their stale
    /// detection closes the connections. `true` reads on from where it stopped.
    pub fn set_reading(&self, reading: bool) {
        self.inner.reading.send_replace(reading);
    }

    /// Dials `address` now, outside the backoff schedule, and returns the device reached once the
    /// connection is established (or kept: if the peer was already connected, the existing or
    /// the new connection survives by the usual rule).
    pub async fn connect(&self, address: SocketAddr) -> Result<DeviceId, ConnectError> {
        dial(&self.inner, address).await
    }

    /// Issues a single-use invitation valid for `ttl`. Opens the pairing endpoint (next to the
    /// sync endpoint, on a free port) the first time.
    pub async fn invite(&self, ttl: Duration) -> Result<Invitation, PairError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(PairError::ShuttingDown);
        }
        let pairing_address = self.pairing_endpoint().await?;
        let mut secret = [0; SECRET_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| PairError::Invite("the system random generator failed".to_owned()))?;
        let id = Uuid::new_v4();
        let now = Instant::now();
        self.inner
            .trust
            .invitations()
            .issue(id, secret, now + ttl, now)
            .map_err(|refusal| PairError::Invite(refusal.to_string()))?;
        let expires_at_ms = SystemTime::now()
            .checked_add(ttl)
            .and_then(|expires| expires.duration_since(UNIX_EPOCH).ok())
            .map_or(u64::MAX, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        let addresses = self.local_addr().map(|address| vec![address]).unwrap_or_default();
        Ok(Invitation {
            id,
            library: self.inner.local.library,
            device: self.inner.identity.device(),
            fingerprint: self.inner.identity.fingerprint(),
            addresses,
            pairing_address,
            secret,
            expires_at_ms,
        })
    }

    /// Withdraws an open invitation; `false` if it was not open.
    pub fn revoke_invitation(&self, id: Uuid) -> bool {
        self.inner.trust.invitations().revoke(id)
    }

    async fn pairing_endpoint(&self) -> Result<SocketAddr, PairError> {
        let mut pairing = self.inner.pairing.lock().await;
        if let Some(endpoint) = pairing.as_ref() {
            return endpoint.local_addr().map_err(|error| PairError::Invite(error.to_string()));
        }
        let server = tls::server_config(
            &self.inner.identity,
            &self.inner.trust,
            &self.inner.provider,
            Arc::clone(&self.inner.quic_config),
            tls::Accept::Any,
            PAIR_ALPN.to_vec(),
        )
        .map_err(|error| PairError::Invite(error.to_string()))?;
        let sync_address =
            self.local_addr().map_err(|error| PairError::Invite(error.to_string()))?;
        let endpoint = quinn::Endpoint::server(server, SocketAddr::new(sync_address.ip(), 0))
            .map_err(|error| PairError::Invite(error.to_string()))?;
        let address =
            endpoint.local_addr().map_err(|error| PairError::Invite(error.to_string()))?;
        tokio::spawn(accept_loop(Arc::clone(&self.inner), endpoint.clone(), true));
        *pairing = Some(endpoint);
        Ok(address)
    }

    /// Joins the inviter's library: connects to its pairing endpoint (accepting only the
    /// invitation's certificate), proves the secret, and on success stores the inviter as paired
    /// and starts dialing it.
    pub async fn join(&self, invitation: &Invitation) -> Result<PairedPeer, PairError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::Acquire) {
            return Err(PairError::ShuttingDown);
        }
        if invitation.library != inner.local.library {
            return Err(PairError::WrongLibrary {
                invitation: invitation.library,
                local: inner.local.library,
            });
        }
        let client = tls::client_config(
            &inner.identity,
            &inner.trust,
            &inner.provider,
            Arc::clone(&inner.quic_config),
            Some(invitation.fingerprint),
            PAIR_ALPN.to_vec(),
        )
        .map_err(|error| PairError::Unreachable(error.to_string()))?;
        let connecting = inner
            .endpoint
            .connect_with(client, invitation.pairing_address, SERVER_NAME)
            .map_err(|error| PairError::Unreachable(error.to_string()))?;
        let connection = tokio::time::timeout(inner.config.handshake_timeout, connecting)
            .await
            .map_err(|_| PairError::Unreachable("handshake timed out".to_owned()))?
            .map_err(|error| PairError::Unreachable(error.to_string()))?;
        let proof = pairing_proof(
            &invitation.secret,
            &inner.identity.fingerprint(),
            &invitation.fingerprint,
        );
        let request = Message::PairRequest(PairRequest {
            invitation: invitation.id,
            proof: proof.to_vec(),
            device: inner.identity.device(),
            name: inner.local.name.clone(),
        });
        let answer =
            session::request_on(&connection, request, inner.config.handshake_timeout).await;
        connection.close(close::PAIRING_DONE, b"pairing done");
        let response = match answer {
            Ok(Message::PairResponse(response)) => response,
            Ok(other) => return Err(PairError::Protocol(other.name().to_owned())),
            Err(RequestError::Remote(error)) if error.code == ErrorCode::PairingRefused => {
                return Err(PairError::Refused(error.message));
            }
            Err(RequestError::Remote(error)) => {
                return Err(PairError::Protocol(format!("{:?}: {}", error.code, error.message)));
            }
            Err(error) => return Err(PairError::Unreachable(error.to_string())),
        };
        if response.library != invitation.library || response.device != invitation.device {
            return Err(PairError::Protocol(
                "the inviter answered for another library or device".to_owned(),
            ));
        }
        let peer = PairedPeer {
            device: invitation.device,
            fingerprint: invitation.fingerprint,
            name: response.name,
            addresses: invitation.addresses.clone(),
        };
        inner.store.add(peer.clone())?;
        inner.trust.add(peer.clone());
        info!(peer = %peer.device, "paired by invitation");
        start_dialer(inner, peer.device, true);
        Ok(peer)
    }

    /// Removes a pairing: forgets the peer (store and trust), stops dialing it, and closes its
    /// connection (reported as [`crate::DisconnectReason::Unpaired`]).
    pub fn unpair(&self, device: DeviceId) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let removed = inner.store.remove(device)?;
        inner.trust.remove(device);
        if let Some(wake) = lock(&inner.dialers).remove(&device) {
            wake.notify_one();
        }
        let session = lock(&inner.sessions).get(&device).cloned();
        if let Some(session) = session {
            session.close(close::UNPAIRED, crate::DisconnectReason::Unpaired, "unpaired");
        }
        Ok(removed)
    }

    fn session(&self, peer: DeviceId) -> Option<Arc<Session>> {
        lock(&self.inner.sessions).get(&peer).cloned()
    }
}

impl Transport for QuicTransport {
    fn local_device(&self) -> DeviceId {
        self.inner.identity.device()
    }

    async fn send(&self, peer: DeviceId, message: Message) -> Result<(), SendError> {
        if is_transport_message(&message) {
            return Err(SendError::Reserved(message.name()));
        }
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(SendError::ShuttingDown);
        }
        let frame = encode_frame(&message)?;
        let session = self.session(peer).ok_or(SendError::NotConnected(peer))?;
        session.send_frame(&frame).await
    }

    async fn request(
        &self,
        peer: DeviceId,
        message: Message,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        if is_transport_message(&message) {
            return Err(RequestError::Reserved(message.name()));
        }
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(RequestError::ShuttingDown);
        }
        let session = self.session(peer).ok_or(RequestError::NotConnected(peer))?;
        session::request_on(&session.connection, message, timeout).await
    }

    fn connected_peers(&self) -> Vec<PeerInfo> {
        lock(&self.inner.sessions).values().map(|session| session.info()).collect()
    }

    async fn shutdown(&self) -> ShutdownReport {
        let inner = &self.inner;
        if inner.shutting_down.swap(true, Ordering::AcqRel) {
            return ShutdownReport::default();
        }
        inner.shutdown_signal.send_replace(true);
        // No new connections from here on.
        inner.endpoint.set_server_config(None);
        if let Some(pairing) = inner.pairing.lock().await.take() {
            pairing.close(close::SHUTDOWN, b"shutting down");
        }
        let sessions: Vec<Arc<Session>> = lock(&inner.sessions).values().cloned().collect();
        let mut report = ShutdownReport::default();
        // One budget for the whole shutdown: a vanished peer never acknowledges nor answers the
        // close, and must not hold it up twice.
        let deadline = tokio::time::Instant::now() + inner.config.close_timeout;
        let mut flushes = tokio::task::JoinSet::new();
        for session in &sessions {
            let session = Arc::clone(session);
            flushes.spawn(async move { (session.peer, session.flush(deadline).await) });
        }
        for (peer, flushed) in flushes.join_all().await {
            if flushed {
                report.flushed.push(peer);
            } else {
                report.unsent.push(peer);
            }
        }
        for session in &sessions {
            session.close(close::SHUTDOWN, crate::DisconnectReason::Shutdown, "shutting down");
        }
        inner.endpoint.close(close::SHUTDOWN, b"shutting down");
        // Lets the close frames go out (given a moment even when the flushes used the budget);
        // bounded, since a peer that vanished never answers.
        let grace = inner.config.close_timeout.min(CLOSE_GRACE);
        let until = deadline.max(tokio::time::Instant::now() + grace);
        let _ = tokio::time::timeout_at(until, inner.endpoint.wait_idle()).await;
        info!(device = %inner.identity.device(), ?report, "transport shut down");
        report
    }
}

/// Accepts connections on `endpoint` until it closes.
async fn accept_loop(inner: Arc<Inner>, endpoint: quinn::Endpoint, pairing: bool) {
    while let Some(incoming) = endpoint.accept().await {
        if pairing && !inner.trust.invitations().any_remembered(Instant::now()) {
            // No invitation to redeem: refuse before spending a handshake on it.
            incoming.refuse();
            continue;
        }
        let inner = Arc::clone(&inner);
        tokio::spawn(async move {
            let address = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(connecting) => connecting,
                Err(error) => {
                    debug!(%address, %error, "incoming connection failed");
                    return;
                }
            };
            let connection =
                match tokio::time::timeout(inner.config.handshake_timeout, connecting).await {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(error)) => {
                        debug!(%address, %error, "incoming handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%address, "incoming handshake timed out");
                        return;
                    }
                };
            if pairing {
                serve_pairing(&inner, connection).await;
            } else if let Err(error) = session::establish(&inner, connection, false).await {
                warn!(%address, %error, "incoming connection refused");
            }
        });
    }
}

/// Dials `address` with the sync ALPN and establishes the session.
async fn dial(inner: &Arc<Inner>, address: SocketAddr) -> Result<DeviceId, ConnectError> {
    if inner.shutting_down.load(Ordering::Acquire) {
        return Err(ConnectError::ShuttingDown);
    }
    let connecting = inner
        .endpoint
        .connect_with(inner.sync_client.clone(), address, SERVER_NAME)
        .map_err(|error| ConnectError::Failed(error.to_string()))?;
    let connection = tokio::time::timeout(inner.config.handshake_timeout, connecting)
        .await
        .map_err(|_| ConnectError::Timeout)?
        .map_err(classify_handshake_error)?;
    session::establish(inner, connection, true).await
}

/// TLS alert 120, `no_application_protocol` (RFC 7301), as a QUIC crypto error.
const NO_APPLICATION_PROTOCOL: u8 = 120;

fn classify_handshake_error(error: ConnectionError) -> ConnectError {
    let no_alpn = TransportErrorCode::crypto(NO_APPLICATION_PROTOCOL);
    match error {
        ConnectionError::ConnectionClosed(close) if close.error_code == no_alpn => {
            ConnectError::IncompatibleVersion(close.to_string())
        }
        ConnectionError::TransportError(error) if error.code == no_alpn => {
            ConnectError::IncompatibleVersion(error.to_string())
        }
        // A crypto error raised here: our verifier refused the peer's certificate.
        ConnectionError::TransportError(error)
            if error.code != TransportErrorCode::PROTOCOL_VIOLATION
                && error.to_string().contains("certificate") =>
        {
            ConnectError::NotPaired
        }
        // A crypto alert from the peer: it refused our certificate.
        ConnectionError::ConnectionClosed(close) if close.error_code != no_alpn => {
            ConnectError::Refused(close.to_string())
        }
        other => ConnectError::Failed(other.to_string()),
    }
}

/// Starts the dialer of `device` unless it runs already; its first attempt comes at once if
/// `immediately`, else after a backoff delay.
fn start_dialer(inner: &Arc<Inner>, device: DeviceId, immediately: bool) {
    if inner.shutting_down.load(Ordering::Acquire) {
        return;
    }
    let wake = {
        let mut dialers = lock(&inner.dialers);
        if let Some(wake) = dialers.get(&device) {
            // Already dialing: make it try now (a new address may be known).
            wake.notify_one();
            return;
        }
        let wake = Arc::new(Notify::new());
        dialers.insert(device, Arc::clone(&wake));
        wake
    };
    tokio::spawn(run_dialer(Arc::clone(inner), device, wake, immediately));
}

/// Keeps `device` connected: while it is not, dials its remembered addresses, waiting a growing,
/// jittered delay between rounds. Ends when the device is unpaired or on shutdown.
async fn run_dialer(inner: Arc<Inner>, device: DeviceId, wake: Arc<Notify>, immediately: bool) {
    let config = &inner.config;
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_cap);
    let mut shutdown = inner.shutdown_signal.subscribe();
    let mut first_round = immediately;
    loop {
        let still_mine =
            lock(&inner.dialers).get(&device).is_some_and(|current| Arc::ptr_eq(current, &wake));
        if *shutdown.borrow() || !still_mine {
            return;
        }
        let Some(peer) = inner.trust.peer_by_device(device) else {
            return;
        };
        if lock(&inner.sessions).contains_key(&device) {
            tokio::select! {
                () = wake.notified() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        if !first_round {
            let random = lock(&inner.rng).next_u64();
            let delay = backoff.next_delay(random);
            debug!(%device, ?delay, "redialing after a delay");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = wake.notified() => {}
                _ = shutdown.changed() => {}
            }
            if lock(&inner.sessions).contains_key(&device) || *shutdown.borrow() {
                continue;
            }
        }
        first_round = false;
        for address in peer.addresses {
            match dial(&inner, address).await {
                Ok(reached) => {
                    if reached == device {
                        backoff.reset();
                        break;
                    }
                }
                Err(error) => {
                    inner.dial_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(%device, %address, %error, "dial failed");
                }
            }
        }
    }
}

/// The inviter's side of pairing: one `PairRequest`, one answer, then the connection closes.
async fn serve_pairing(inner: &Arc<Inner>, connection: quinn::Connection) {
    let address = connection.remote_address();
    let exchange = async {
        let (mut send, recv) = connection.accept_bi().await.ok()?;
        let mut reader = FrameReader::new(recv);
        let (answer, paired) = match reader.next_message().await {
            Incoming::Message(Message::PairRequest(request)) => {
                match redeem(inner, &connection, request) {
                    Ok((peer, response)) => {
                        // Reported before the answer goes out: the joiner dials as soon as it
                        // reads it, and `Paired` must come before that connection's `Connected`.
                        // The events channel may be closed if the application is gone.
                        let _ = inner.events.send(TransportEvent::Paired(peer.clone())).await;
                        (response, Some(peer))
                    }
                    Err(refusal) => (refusal, None),
                }
            }
            Incoming::Message(other) => (
                error_message(
                    ErrorCode::Unsupported,
                    &format!("a pairing connection carries only PairRequest, not {}", other.name()),
                ),
                None,
            ),
            Incoming::UnknownKind(error) => {
                (error_message(ErrorCode::Unsupported, &error.to_string()), None)
            }
            Incoming::Broken(reason) => (error_message(ErrorCode::Malformed, &reason), None),
            Incoming::End | Incoming::Failed(_) => return None,
        };
        let frame = encode_frame(&answer).ok()?;
        send.write_all(&frame).await.ok()?;
        send.finish().ok()?;
        // Wait until the joiner has the answer (it closes the connection after reading it).
        let _ = send.stopped().await;
        paired
    };
    let paired =
        tokio::time::timeout(inner.config.handshake_timeout, exchange).await.ok().flatten();
    connection.close(close::PAIRING_DONE, b"pairing done");
    if let Some(peer) = paired {
        info!(peer = %peer.device, %address, "a device paired by invitation");
        // The joiner dials right away; dialing it at the same moment would only race that
        // connection (one of the two would be closed), so this side's first attempt waits.
        start_dialer(inner, peer.device, false);
    }
}

/// Checks a pairing request; on success persists the joiner and returns the `PairResponse`,
/// otherwise the `Error` to answer.
#[allow(
    clippy::result_large_err,
    reason = "called once per pairing; the error is the message to answer, sent at once"
)]
fn redeem(
    inner: &Arc<Inner>,
    connection: &quinn::Connection,
    request: PairRequest,
) -> Result<(PairedPeer, Message), Message> {
    let refuse = |reason: &str| {
        warn!(address = %connection.remote_address(), reason, "pairing refused");
        error_message(ErrorCode::PairingRefused, reason)
    };
    let Some(fingerprint) = tls::peer_fingerprint(connection) else {
        return Err(refuse("no client certificate"));
    };
    if crate::device_id_for(&fingerprint) != request.device {
        return Err(refuse("the device id does not match the certificate"));
    }
    inner
        .trust
        .invitations()
        .redeem(
            request.invitation,
            &request.proof,
            &fingerprint,
            &inner.identity.fingerprint(),
            Instant::now(),
        )
        .map_err(|refusal: Refusal| refuse(&refusal.to_string()))?;
    let peer = PairedPeer {
        device: request.device,
        fingerprint,
        name: request.name,
        addresses: vec![connection.remote_address()],
    };
    if let Err(error) = inner.store.add(peer.clone()) {
        warn!(%error, "cannot store a new pairing");
        return Err(error_message(ErrorCode::Internal, "cannot store the pairing"));
    }
    inner.trust.add(peer.clone());
    let response = Message::PairResponse(PairResponse {
        library: inner.local.library,
        device: inner.identity.device(),
        name: inner.local.name.clone(),
    });
    Ok((peer, response))
}

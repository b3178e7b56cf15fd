//! Moves typed [`Message`]s between the paired devices of one library, and lets nothing else in.
//!
//! # Model
//!
//! A [`Transport`] connects this device to the devices it has paired with and offers two ways to
//! talk to a connected peer: one-way messages ([`Transport::send`], ordered per peer) and
//! requests answered by exactly one response ([`Transport::request`], with a timeout). What
//! happens on the network arrives as [`TransportEvent`]s on one bounded channel handed out at
//! construction: a peer connected (with its `Hello`) or disconnected (with the reason), a one-way
//! message, a request (with a [`Responder`]), watermarks carried by a heartbeat, a new pairing.
//!
//! Two implementations behave the same except for speed:
//! - [`QuicTransport`]: QUIC (quinn) with mutual TLS 1.3 (rustls, ring). Each device has a
//!   long-lived self-signed certificate ([`Identity`]); its [`DeviceId`] is derived from the
//!   certificate's fingerprint. A handshake succeeds only if the other side's certificate is one
//!   this device paired with ([`PeerStore`]); pairing goes through a single-use, short-lived
//!   [`Invitation`]. One-way messages share one ordered QUIC stream per connection; each request
//!   gets its own bidirectional stream, so its response cannot go anywhere else.
//! - [`MemoryTransport`]: the in-memory twin over a sans-IO [`MemoryNetwork`] model (seeded
//!   RNG, virtual time, per-link latency, loss, duplication, reordering and partitions), for
//!   engine tests and the deterministic simulator.
//!
//! Frames are a big-endian `u32` length and then [`lsync_protocol::encode`] bytes, at most
//! [`lsync_protocol::MAX_MESSAGE_BYTES`] ([`frame`]). See `docs/protocol.md`, "Transport:
//! handshake, pairing, framing", for the wire-level details.
//!
//! # Invariants
//! - Only paired certificates complete a sync handshake (ALPN `lsync/1`); an unknown
//!   certificate is refused during the TLS handshake and counted
//!   ([`QuicTransport::refused_handshakes`]). Unknown certificates complete a handshake only on
//!   the separate pairing endpoint (ALPN `lsync-pair/1`), which accepts connections only while
//!   an invitation is remembered, and whose connection carries one `PairRequest` and nothing
//!   else.
//! - The first message on every sync connection is a `Hello` in each direction; a wrong library,
//!   a device id that does not match the certificate, or anything else first closes the
//!   connection with a logged reason.
//! - Every request gets at most one response at the API; a response is never delivered to
//!   another request. A request that cannot be answered fails (timeout, connection lost, no
//!   response), it never waits forever.
//! - Nothing is dropped silently at the API: a send that cannot be queued returns an error; every
//!   queue is bounded and, when full, makes its producer wait.
//! - At most one live connection per peer: when both sides dial at once, the connection dialed by
//!   the smaller device id survives, on both sides.
//!
//! # What this crate does not do
//! It does not retry messages, persist them, or know what they mean beyond the transport's own
//! (`Hello`, `Heartbeat`, pairing): `Ok` from [`Transport::send`] means queued on the peer's
//! ordered stream, and the protocol's acknowledgements (`Ack`), not the transport, confirm that a
//! peer applied something. It does not discover peers (addresses come from invitations and from
//! where peers connected from) nor traverse NATs.
//!
//! # Where the IO is
//! [`frame`], [`pairing`], the configuration and backoff, and [`MemoryNetwork`] are sans-IO.
//! The `quic` module owns the sockets and spawns tokio tasks (one per connection, per stream and
//! per paired peer's dialer); identities and the [`FilePeerStore`] touch the file system.
//! [`MemoryTransport`] spawns one driver task that moves the virtual network forward on tokio's
//! clock.

mod config;
pub mod frame;
mod identity;
mod memory;
pub mod pairing;
mod peer_store;
mod quic;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use config::{Backoff, ConfigError, SplitMix64, TransportConfig};
pub use identity::write_private_io as write_private_file;
pub use identity::{CERT_FILE, Fingerprint, Identity, IdentityError, KEY_FILE, device_id_for};
pub use lsync_hlc::DeviceId;
use lsync_protocol::{EncodeError, ErrorMessage, Hello, Message, Watermarks};
pub use memory::{
    DEFAULT_LINK_CAPACITY, Delivery, LinkConfig, MemoryHub, MemoryNetwork, MemoryPeer,
    MemoryTransport, NetworkStats, SendOutcome,
};
pub use pairing::{Invitation, Refusal, TokenError};
pub use peer_store::{
    FilePeerStore, MAX_ADDRESSES, MemoryPeerStore, PairedPeer, PeerStore, StoreError,
};
pub use quic::raw;
pub use quic::{
    ConnectError, LocalDevice, PAIR_ALPN, PairError, QuicOptions, QuicTransport, StartError,
    sync_alpn,
};

/// Supplies the watermarks a heartbeat carries: called once per heartbeat sent or answered.
/// Must be cheap and must not block (read a snapshot the engine keeps up to date).
pub type WatermarkSource = Arc<dyn Fn() -> Option<Watermarks> + Send + Sync>;

/// Moves messages between this device and its connected peers. See the crate docs.
pub trait Transport: Send + Sync + 'static {
    /// This device.
    fn local_device(&self) -> DeviceId;

    /// Sends a one-way message, ordered after every earlier `send` to the same peer. `Ok` means
    /// it is queued on the peer's stream (waiting first if the stream is congested); an error
    /// means it was not sent. Transport-internal kinds (`Hello`, `Heartbeat`, `HeartbeatAck`,
    /// pairing) are refused.
    fn send(
        &self,
        peer: DeviceId,
        message: Message,
    ) -> impl Future<Output = Result<(), SendError>> + Send;

    /// Sends a request and waits at most `timeout` for its response. A response that is an
    /// `Error` message comes back as [`RequestError::Remote`].
    fn request(
        &self,
        peer: DeviceId,
        message: Message,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, RequestError>> + Send;

    /// The peers connected now.
    fn connected_peers(&self) -> Vec<PeerInfo>;

    /// Stops accepting and dialing, flushes queued one-way messages (for at most the configured
    /// close timeout), closes every connection and reports which peers' messages were flushed.
    /// Later sends and requests fail with `ShuttingDown`. Calling it twice is harmless.
    fn shutdown(&self) -> impl Future<Output = ShutdownReport> + Send;
}

/// A connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer.
    pub device: DeviceId,
    /// Its `Hello` (library, epoch, name).
    pub hello: Hello,
    /// Its address, where there is one (not in memory).
    pub address: Option<SocketAddr>,
    /// The last heartbeat round trip, once one was answered.
    pub rtt: Option<Duration>,
    /// When this connection was established.
    pub connected_since: SystemTime,
}

/// Something that happened on the network. Delivered in order per connection, through a bounded
/// channel: when the channel is full the transport waits rather than dropping.
#[derive(Debug)]
pub enum TransportEvent {
    /// A peer connected (or reconnected: catch up from its watermarks).
    Connected {
        /// The peer.
        peer: DeviceId,
        /// Its `Hello`.
        hello: Hello,
    },
    /// A peer's connection ended. Outstanding requests to it fail.
    Disconnected {
        /// The peer.
        peer: DeviceId,
        /// Why.
        reason: DisconnectReason,
    },
    /// A one-way message.
    Message {
        /// The sender.
        peer: DeviceId,
        /// The message.
        message: Message,
    },
    /// A request: answer it through the responder.
    Request(IncomingRequest),
    /// A peer's watermarks, carried by one of its heartbeats or heartbeat answers.
    Watermarks {
        /// The peer.
        peer: DeviceId,
        /// Its watermarks.
        watermarks: Watermarks,
    },
    /// A device paired with this one by redeeming one of its invitations.
    Paired(PairedPeer),
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The peer answered no heartbeat (or sent nothing at all) within the stale timeout.
    Stale,
    /// The peer closed the connection, saying why.
    ClosedByPeer(String),
    /// The connection failed (reset, protocol error).
    Lost(String),
    /// This device unpaired the peer.
    Unpaired,
    /// A newer connection to the same peer replaced this one; a `Connected` follows.
    Replaced,
    /// This device is shutting down.
    Shutdown,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::Stale => f.write_str("no heartbeat answered within the timeout"),
            DisconnectReason::ClosedByPeer(reason) => write!(f, "closed by the peer: {reason}"),
            DisconnectReason::Lost(reason) => write!(f, "connection lost: {reason}"),
            DisconnectReason::Unpaired => f.write_str("unpaired"),
            DisconnectReason::Replaced => f.write_str("replaced by a newer connection"),
            DisconnectReason::Shutdown => f.write_str("shutting down"),
        }
    }
}

/// A request from a peer, with the handle that answers it.
#[derive(Debug)]
pub struct IncomingRequest {
    /// The requester.
    pub peer: DeviceId,
    /// The request.
    pub message: Message,
    /// Answers it, exactly once.
    pub responder: Responder,
}

/// Answers one request. Consumed by [`Responder::respond`], so a request cannot be answered
/// twice; dropping it unanswered tells the requester at once ([`RequestError::NoResponse`])
/// instead of leaving it to time out.
#[derive(Debug)]
pub struct Responder {
    inner: ResponderInner,
}

#[derive(Debug)]
enum ResponderInner {
    Quic(quic::QuicResponder),
    Memory(memory::MemoryResponder),
}

impl Responder {
    /// Sends `response`. An error means it could not be sent (encoding, connection gone).
    pub async fn respond(self, response: Message) -> Result<(), SendError> {
        match self.inner {
            ResponderInner::Quic(responder) => responder.respond(response).await,
            ResponderInner::Memory(responder) => responder.respond(response),
        }
    }
}

/// Why a one-way message was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No live connection to the peer.
    #[error("peer {0} is not connected")]
    NotConnected(DeviceId),
    /// The message cannot be encoded (too large, invalid).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The message kind belongs to the transport itself.
    #[error("{0} messages are the transport's own and cannot be sent by the application")]
    Reserved(&'static str),
    /// The connection failed while sending.
    #[error("connection lost while sending: {0}")]
    ConnectionLost(String),
    /// The transport is shutting down.
    #[error("the transport is shutting down")]
    ShuttingDown,
    /// The peer took nothing for this long (it stopped reading without closing): the message
    /// was not sent.
    #[error("the peer read nothing for {0:?}; not sent")]
    TimedOut(Duration),
}

/// Why a request got no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No live connection to the peer.
    #[error("peer {0} is not connected")]
    NotConnected(DeviceId),
    /// The request cannot be encoded.
    #[error(transparent)]
    Encode(EncodeError),
    /// The message kind belongs to the transport itself.
    #[error("{0} messages are the transport's own and cannot be sent by the application")]
    Reserved(&'static str),
    /// No response within the timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The peer dropped the request without answering.
    #[error("the peer dropped the request without answering")]
    NoResponse,
    /// The peer answered with an `Error` message.
    #[error("the peer refused the request: {code:?}: {message}", code = .0.code, message = .0.message)]
    Remote(ErrorMessage),
    /// The response could not be decoded.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The connection failed before the response arrived.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The transport is shutting down.
    #[error("the transport is shutting down")]
    ShuttingDown,
}

impl From<EncodeError> for RequestError {
    fn from(error: EncodeError) -> Self {
        RequestError::Encode(error)
    }
}

/// What [`Transport::shutdown`] managed to flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Peers whose queued one-way messages were all delivered (acknowledged) before closing.
    pub flushed: Vec<DeviceId>,
    /// Peers with queued one-way messages that could not be confirmed before the close timeout;
    /// those messages may be lost.
    pub unsent: Vec<DeviceId>,
}

/// Whether `message` is one of the kinds the transport sends and answers itself.
pub fn is_transport_message(message: &Message) -> bool {
    matches!(
        message,
        Message::Hello(_)
            | Message::Heartbeat(_)
            | Message::HeartbeatAck(_)
            | Message::PairRequest(_)
            | Message::PairResponse(_)
    )
}

#[cfg(test)]
mod test_support {
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> Self {
            Self(
                std::env::temp_dir()
                    .join(format!("lsync-transport-{name}-{}", uuid::Uuid::new_v4())),
            )
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

//! The QUIC transport over real sockets on 127.0.0.1: pairing, refusals, request/response under
//! concurrency, reconnects, stale detection, and hostile input. Every wait is on an event, with a
//! timeout only as an upper bound.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lsync_protocol::{
    Ack, Epoch, ErrorCode, Hello, LibraryId, MAX_MESSAGE_BYTES, Message, OriginSeq,
    SharedCatchUpRequest, SharedCatchUpResponse, Watermarks,
};
use lsync_transport::frame::encode_frame;
use lsync_transport::{
    ConnectError, DeviceId, DisconnectReason, Identity, Invitation, LocalDevice, MemoryPeerStore,
    PairError, PairedPeer, PeerStore, QuicOptions, QuicTransport, RequestError, SendError,
    Transport, TransportConfig, TransportEvent, WatermarkSource, raw, sync_alpn,
};
use tokio::sync::mpsc;
use uuid::Uuid;

/// The longest any test waits for an event before failing.
const WAIT: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Short timers so reconnects and stale detection happen within a test's patience.
fn config() -> TransportConfig {
    TransportConfig {
        handshake_timeout: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(200),
        stale_timeout: Duration::from_millis(1200),
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(400),
        close_timeout: Duration::from_secs(2),
        ..TransportConfig::default()
    }
}

struct Node {
    transport: QuicTransport,
    events: mpsc::Receiver<TransportEvent>,
    store: Arc<MemoryPeerStore>,
    identity: Identity,
    library: LibraryId,
}

impl Node {
    async fn start(library: LibraryId) -> Node {
        Self::start_with(
            library,
            Identity::generate().unwrap(),
            Arc::new(MemoryPeerStore::default()),
            loopback(),
            None,
        )
        .await
    }

    async fn start_with(
        library: LibraryId,
        identity: Identity,
        store: Arc<MemoryPeerStore>,
        listen: SocketAddr,
        watermarks: Option<WatermarkSource>,
    ) -> Node {
        let (transport, events) = QuicTransport::start(QuicOptions {
            identity: identity.clone(),
            local: LocalDevice {
                library,
                name: format!("device {}", identity.device()),
                epoch: Epoch(7),
            },
            listen,
            store: Arc::clone(&store) as Arc<dyn PeerStore>,
            config: config(),
            watermarks,
        })
        .await
        .unwrap();
        Node { transport, events, store, identity, library }
    }

    fn device(&self) -> DeviceId {
        self.identity.device()
    }

    fn address(&self) -> SocketAddr {
        self.transport.local_addr().unwrap()
    }

    /// Waits for the first event `pick` accepts, skipping the others.
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(TransportEvent) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let event = self.events.recv().await.expect("events channel open");
                if let Some(found) = pick(event) {
                    return found;
                }
            }
        })
        .await
        .expect("event within the timeout")
    }

    async fn connected(&mut self, peer: DeviceId) -> Hello {
        self.wait_for(|event| match event {
            TransportEvent::Connected { peer: p, hello } if p == peer => Some(hello),
            _ => None,
        })
        .await
    }

    /// The next real disconnection of `peer`: `Replaced` (a simultaneous dial resolved, another
    /// connection takes over at once) is skipped.
    async fn disconnected(&mut self, peer: DeviceId) -> DisconnectReason {
        self.wait_for(|event| match event {
            TransportEvent::Disconnected { peer: p, reason }
                if p == peer && reason != DisconnectReason::Replaced =>
            {
                Some(reason)
            }
            _ => None,
        })
        .await
    }
}

/// Two devices paired through an invitation, connected.
async fn paired_pair() -> (Node, Node) {
    let library = LibraryId(Uuid::new_v4());
    let mut inviter = Node::start(library).await;
    let mut joiner = Node::start(library).await;
    let invitation = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
    let token = invitation.to_token();
    joiner.transport.join(&Invitation::from_token(&token).unwrap()).await.unwrap();
    let (inviter_id, joiner_id) = (inviter.device(), joiner.device());
    inviter.connected(joiner_id).await;
    joiner.connected(inviter_id).await;
    (inviter, joiner)
}

/// Answers every `SharedCatchUpRequest` with its `limit` echoed in `pruned`, so each response
/// names its request.
fn spawn_echo_responder(mut node_events: mpsc::Receiver<TransportEvent>) {
    tokio::spawn(async move {
        while let Some(event) = node_events.recv().await {
            if let TransportEvent::Request(request) = event
                && let Message::SharedCatchUpRequest(asked) = request.message
            {
                let response = Message::SharedCatchUpResponse(SharedCatchUpResponse {
                    changes: Vec::new(),
                    complete: true,
                    pruned: vec![OriginSeq { origin: request.peer, seq: u64::from(asked.limit) }],
                });
                let _ = request.responder.respond(response).await;
            }
        }
    });
}

fn catch_up(limit: u32) -> Message {
    Message::SharedCatchUpRequest(SharedCatchUpRequest { after: Vec::new(), limit })
}

fn ack(seq: u64) -> Message {
    Message::Ack(Ack {
        shared: vec![OriginSeq { origin: DeviceId::from_bytes([1; 16]), seq }],
        state: Vec::new(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_connects_both_devices_and_persists_them() {
    let library = LibraryId(Uuid::new_v4());
    let mut inviter = Node::start(library).await;
    let mut joiner = Node::start(library).await;
    let invitation = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
    let paired = joiner.transport.join(&invitation).await.unwrap();
    assert_eq!(paired.device, inviter.device());
    assert_eq!(paired.fingerprint, inviter.transport.fingerprint());

    let new_peer = inviter
        .wait_for(|event| match event {
            TransportEvent::Paired(peer) => Some(peer),
            _ => None,
        })
        .await;
    assert_eq!(new_peer.device, joiner.device());
    let hello = inviter.connected(joiner.device()).await;
    assert_eq!(hello.library, library);
    assert_eq!(hello.epoch, Epoch(7));
    joiner.connected(inviter.device()).await;

    let stored: Vec<DeviceId> = inviter.store.paired().unwrap().iter().map(|p| p.device).collect();
    assert_eq!(stored, vec![joiner.device()]);
    let stored: Vec<DeviceId> = joiner.store.paired().unwrap().iter().map(|p| p.device).collect();
    assert_eq!(stored, vec![inviter.device()]);
    let peers = inviter.transport.connected_peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].device, joiner.device());

    inviter.transport.shutdown().await;
    joiner.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_refused() {
    let library = LibraryId(Uuid::new_v4());
    let inviter = Node::start(library).await;
    let joiner = Node::start(library).await;
    let mut invitation = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
    invitation.secret[0] ^= 1;
    let error = joiner.transport.join(&invitation).await.unwrap_err();
    assert_eq!(error, PairError::Refused("wrong invitation secret".to_owned()));
    assert!(inviter.store.paired().unwrap().is_empty());
    assert!(joiner.store.paired().unwrap().is_empty());
    inviter.transport.shutdown().await;
    joiner.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_invitation_is_refused() {
    let library = LibraryId(Uuid::new_v4());
    let inviter = Node::start(library).await;
    let first = Node::start(library).await;
    let second = Node::start(library).await;
    let invitation = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
    first.transport.join(&invitation).await.unwrap();
    let error = second.transport.join(&invitation).await.unwrap_err();
    assert_eq!(error, PairError::Refused("invitation already used".to_owned()));
    assert_eq!(inviter.store.paired().unwrap().len(), 1);
    for node in [inviter, first, second] {
        node.transport.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_invitation_is_refused() {
    let library = LibraryId(Uuid::new_v4());
    let inviter = Node::start(library).await;
    let joiner = Node::start(library).await;
    // Expires the moment it is issued.
    let invitation = inviter.transport.invite(Duration::ZERO).await.unwrap();
    let error = joiner.transport.join(&invitation).await.unwrap_err();
    assert_eq!(error, PairError::Refused("invitation expired".to_owned()));

    // An invitation for another library is refused by the joiner itself.
    let mut foreign = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
    foreign.library = LibraryId(Uuid::new_v4());
    assert!(matches!(joiner.transport.join(&foreign).await, Err(PairError::WrongLibrary { .. })));
    inviter.transport.shutdown().await;
    joiner.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaired_certificate_is_refused_at_the_handshake_and_counted() {
    let library = LibraryId(Uuid::new_v4());
    let mut device = Node::start(library).await;
    // The stranger trusts the device (so its own verifier lets the handshake go on), but the
    // device never paired with it.
    let stranger = Node::start_with(
        library,
        Identity::generate().unwrap(),
        Arc::new(MemoryPeerStore::with_peers([pairing_of(&device.identity)])),
        loopback(),
        None,
    )
    .await;

    // The stranger dials: the device's verifier refuses its certificate.
    assert!(stranger.transport.connect(device.address()).await.is_err());
    assert!(device.transport.refused_handshakes() >= 1);
    // The device dials the stranger: its own verifier refuses the stranger's certificate.
    let before = device.transport.refused_handshakes();
    assert_eq!(device.transport.connect(stranger.address()).await, Err(ConnectError::NotPaired));
    assert!(device.transport.refused_handshakes() > before);
    assert!(device.transport.connected_peers().is_empty());
    assert!(device.events.try_recv().is_err(), "no event for a refused peer");
    device.transport.shutdown().await;
    stranger.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_their_own_response() {
    let (inviter, joiner) = paired_pair().await;
    let responder_id = joiner.device();
    spawn_echo_responder(joiner.events);
    let transport = inviter.transport.clone();
    // 200 requests at once, more than the 32 streams a peer may open: the rest wait for a free
    // stream (back-pressure), and every one is answered.
    let mut tasks = tokio::task::JoinSet::new();
    for limit in 1..=200u32 {
        let transport = transport.clone();
        tasks.spawn(async move {
            let response = transport.request(responder_id, catch_up(limit), WAIT).await.unwrap();
            (limit, response)
        });
    }
    let mut answered = 0;
    while let Some(result) = tasks.join_next().await {
        let (limit, response) = result.unwrap();
        let Message::SharedCatchUpResponse(response) = response else {
            panic!("unexpected response {response:?}");
        };
        assert_eq!(response.pruned[0].seq, u64::from(limit), "response matched to its request");
        answered += 1;
    }
    assert_eq!(answered, 200);
    inviter.transport.shutdown().await;
    joiner.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_messages_arrive_in_order_and_reserved_kinds_are_refused() {
    let (inviter, mut joiner) = paired_pair().await;
    let to = joiner.device();
    for seq in 1..=300 {
        inviter.transport.send(to, ack(seq)).await.unwrap();
    }
    for expected in 1..=300 {
        let message = joiner
            .wait_for(|event| match event {
                TransportEvent::Message { message, .. } => Some(message),
                _ => None,
            })
            .await;
        assert_eq!(message, ack(expected));
    }
    let hello = Message::Hello(Hello {
        library: inviter.library,
        device: inviter.device(),
        epoch: Epoch(1),
        name: String::new(),
    });
    assert_eq!(inviter.transport.send(to, hello).await, Err(SendError::Reserved("Hello")));
    let nobody = DeviceId::random();
    assert_eq!(inviter.transport.send(nobody, ack(1)).await, Err(SendError::NotConnected(nobody)));
    // A request nobody answers fails at its deadline instead of hanging.
    assert_eq!(
        inviter.transport.request(to, catch_up(1), Duration::from_millis(300)).await,
        Err(RequestError::Timeout(Duration::from_millis(300)))
    );
    inviter.transport.shutdown().await;
    joiner.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_responder_tells_the_requester() {
    let (inviter, mut joiner) = paired_pair().await;
    let to = joiner.device();
    let transport = inviter.transport.clone();
    let request = tokio::spawn(async move { transport.request(to, catch_up(1), WAIT).await });
    let incoming = joiner
        .wait_for(|event| match event {
            TransportEvent::Request(request) => Some(request),
            _ => None,
        })
        .await;
    drop(incoming);
    assert_eq!(request.await.unwrap(), Err(RequestError::NoResponse));
    inviter.transport.shutdown().await;
    joiner.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_goes_away_and_comes_back_is_reconnected() {
    let (mut stays, leaves) = paired_pair().await;
    let leaving_id = leaves.device();
    let address = leaves.address();
    let identity = leaves.identity.clone();
    let library = leaves.library;
    // The returning device remembers the pairing but no address for it, so only the device that
    // stayed can re-establish the connection: by redialing with backoff.
    let mut remembered = leaves.store.paired().unwrap();
    for peer in &mut remembered {
        peer.addresses.clear();
    }
    let report = leaves.transport.shutdown().await;
    assert!(report.unsent.is_empty());
    drop(leaves);
    let reason = stays.disconnected(leaving_id).await;
    assert_eq!(reason, DisconnectReason::ClosedByPeer("shutting down".to_owned()));

    // Back on the same port. The old socket is released once its driver task notices it was
    // dropped; yield until then (bounded).
    let store = Arc::new(MemoryPeerStore::with_peers(remembered));
    let mut attempts = 0;
    let mut back = loop {
        let result = QuicTransport::start(QuicOptions {
            identity: identity.clone(),
            local: LocalDevice { library, name: "back".to_owned(), epoch: Epoch(8) },
            listen: address,
            store: Arc::clone(&store) as Arc<dyn PeerStore>,
            config: config(),
            watermarks: None,
        })
        .await;
        match result {
            Ok((transport, events)) => {
                break Node {
                    transport,
                    events,
                    store: Arc::clone(&store),
                    identity: identity.clone(),
                    library,
                };
            }
            Err(error) => {
                attempts += 1;
                assert!(attempts < 10_000, "port never released: {error}");
                tokio::task::yield_now().await;
            }
        }
    };
    let hello = stays.connected(leaving_id).await;
    assert_eq!(hello.epoch, Epoch(8), "the new session's Hello");
    back.connected(stays.device()).await;
    stays.transport.shutdown().await;
    back.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_heartbeats_is_reported_stale() {
    let (mut watcher, hung) = paired_pair().await;
    let hung_id = hung.device();
    hung.transport.set_answer_heartbeats(false);
    let started = tokio::time::Instant::now();
    let reason = watcher.disconnected(hung_id).await;
    assert_eq!(reason, DisconnectReason::Stale);
    // Reported within the stale timeout plus scheduling slack (an upper bound, not a speed
    // assertion: the wait above is bounded by WAIT anyway).
    assert!(started.elapsed() < config().stale_timeout * 5);
    watcher.transport.shutdown().await;
    hung.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_carry_watermarks_and_measure_rtt() {
    let library = LibraryId(Uuid::new_v4());
    let marks = Watermarks {
        library,
        device: DeviceId::from_bytes([5; 16]),
        epoch: Epoch(3),
        shared: vec![OriginSeq { origin: DeviceId::from_bytes([5; 16]), seq: 42 }],
        state: Vec::new(),
        ready: true,
        resync: false,
        collected: Vec::new(),
        incarnation: None,
        seen: None,
        wall_ms: None,
    };
    let source_marks = marks.clone();
    let source: WatermarkSource = Arc::new(move || Some(source_marks.clone()));
    let mut inviter = Node::start(library).await;
    let joiner = Node::start_with(
        library,
        Identity::generate().unwrap(),
        Arc::new(MemoryPeerStore::default()),
        loopback(),
        Some(source),
    )
    .await;
    let invitation = inviter.transport.invite(Duration::from_secs(60)).await.unwrap();
    joiner.transport.join(&invitation).await.unwrap();
    let joiner_id = joiner.device();
    let received = inviter
        .wait_for(|event| match event {
            TransportEvent::Watermarks { peer, watermarks } if peer == joiner_id => {
                Some(watermarks)
            }
            _ => None,
        })
        .await;
    assert_eq!(received, marks);
    // The inviter's heartbeats are answered too; wait until one measured an RTT.
    tokio::time::timeout(WAIT, async {
        loop {
            if inviter.transport.connected_peers().iter().any(|peer| peer.rtt.is_some()) {
                return;
            }
            // Each heartbeat answer may bring an event; waiting on the next one paces the check.
            let _ = inviter.events.recv().await;
        }
    })
    .await
    .expect("an RTT is measured");
    inviter.transport.shutdown().await;
    joiner.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpairing_closes_the_connection_and_refuses_the_peer() {
    let (mut inviter, mut joiner) = paired_pair().await;
    let joiner_id = joiner.device();
    assert!(inviter.transport.unpair(joiner_id).unwrap());
    assert_eq!(inviter.disconnected(joiner_id).await, DisconnectReason::Unpaired);
    joiner.disconnected(inviter.device()).await;
    assert!(inviter.store.paired().unwrap().is_empty());
    // The joiner still knows the inviter and redials; the inviter refuses it at the handshake.
    assert!(joiner.transport.connect(inviter.address()).await.is_err());
    assert!(inviter.transport.refused_handshakes() >= 1);
    inviter.transport.shutdown().await;
    joiner.transport.shutdown().await;
}

/// A hand-driven client with a certificate the node is paired with, to send what the transport
/// itself never would.
struct RawPeer {
    endpoint: quinn::Endpoint,
    identity: Identity,
}

impl RawPeer {
    /// A raw client whose certificate `node`'s store pairs with. Must run before `node` starts.
    fn paired_with(store: &MemoryPeerStore) -> RawPeer {
        let identity = Identity::generate().unwrap();
        store
            .add(PairedPeer {
                device: identity.device(),
                fingerprint: identity.fingerprint(),
                name: "raw".to_owned(),
                addresses: Vec::new(),
            })
            .unwrap();
        let endpoint = quinn::Endpoint::client(loopback()).unwrap();
        RawPeer { endpoint, identity }
    }

    async fn connect(
        &self,
        node: &Node,
        alpn: &[u8],
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        let client =
            raw::client_config(&self.identity, node.transport.fingerprint(), alpn, &config())
                .unwrap();
        self.endpoint.connect_with(client, node.address(), "lsync").unwrap().await
    }

    fn hello(&self, library: LibraryId) -> Message {
        Message::Hello(Hello {
            library,
            device: self.identity.device(),
            epoch: Epoch(1),
            name: "raw".to_owned(),
        })
    }
}

/// Writes `bytes` as a request and reads the whole answer.
async fn raw_request(connection: &quinn::Connection, bytes: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    recv.read_to_end(MAX_MESSAGE_BYTES + 4).await.unwrap()
}

fn decode_frame(frame: &[u8]) -> Message {
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4);
    lsync_protocol::decode(&frame[4..]).unwrap()
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

fn error_code(message: &Message) -> ErrorCode {
    match message {
        Message::Error(error) => error.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_their_stream_and_nothing_else() {
    let library = LibraryId(Uuid::new_v4());
    let store = Arc::new(MemoryPeerStore::default());
    let raw = RawPeer::paired_with(&store);
    let mut node = Node::start_with(
        library,
        Identity::generate().unwrap(),
        Arc::clone(&store),
        loopback(),
        None,
    )
    .await;
    // A well-behaved peer on the side, to show it is unaffected.
    let mut friend = Node::start(library).await;
    let invitation = node.transport.invite(Duration::from_secs(60)).await.unwrap();
    friend.transport.join(&invitation).await.unwrap();
    node.connected(friend.device()).await;
    friend.connected(node.device()).await;

    let connection = raw.connect(&node, &sync_alpn()).await.unwrap();
    let answer = raw_request(&connection, &encode_frame(&raw.hello(library)).unwrap()).await;
    assert!(matches!(decode_frame(&answer), Message::Hello(_)));
    node.connected(raw.identity.device()).await;

    // Malformed body in a request: answered with Error(Malformed).
    let answer = raw_request(&connection, &frame_of(b"\x92\x05\xc1garbage")).await;
    assert_eq!(error_code(&decode_frame(&answer)), ErrorCode::Malformed);

    // Unknown kind: answered with Error(Unsupported); the connection stays.
    let unknown = rmp_serde_unknown_kind();
    let answer = raw_request(&connection, &frame_of(&unknown)).await;
    assert_eq!(error_code(&decode_frame(&answer)), ErrorCode::Unsupported);

    // Oversized length on the one-way stream: refused before the body; the stream is stopped.
    let mut one_way = connection.open_uni().await.unwrap();
    let too_long = u32::try_from(MAX_MESSAGE_BYTES + 1).unwrap().to_be_bytes();
    one_way.write_all(&too_long).await.unwrap();
    let stopped = tokio::time::timeout(WAIT, one_way.stopped()).await.unwrap();
    assert!(matches!(stopped, Ok(Some(_))), "stream stopped with a code: {stopped:?}");

    // Malformed one-way message: the stream is stopped too.
    let mut one_way = connection.open_uni().await.unwrap();
    one_way.write_all(&frame_of(b"\xc1")).await.unwrap();
    let stopped = tokio::time::timeout(WAIT, one_way.stopped()).await.unwrap();
    assert!(matches!(stopped, Ok(Some(_))), "{stopped:?}");

    // The raw connection still works, and so does the friend's.
    let mut one_way = connection.open_uni().await.unwrap();
    one_way.write_all(&encode_frame(&ack(9)).unwrap()).await.unwrap();
    let raw_id = raw.identity.device();
    let message = node
        .wait_for(|event| match event {
            TransportEvent::Message { peer, message } if peer == raw_id => Some(message),
            _ => None,
        })
        .await;
    assert_eq!(message, ack(9));
    friend.transport.send(node.device(), ack(10)).await.unwrap();
    let friend_id = friend.device();
    let message = node
        .wait_for(|event| match event {
            TransportEvent::Message { peer, message } if peer == friend_id => Some(message),
            _ => None,
        })
        .await;
    assert_eq!(message, ack(10));
    node.transport.shutdown().await;
    friend.transport.shutdown().await;
}

/// A well-framed envelope `[999, {}]`: a kind no version defines.
fn rmp_serde_unknown_kind() -> Vec<u8> {
    // fixarray(2), uint16 999, fixmap(0)
    vec![0x92, 0xcd, 0x03, 0xe7, 0x80]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_must_open_with_the_right_hello() {
    let library = LibraryId(Uuid::new_v4());
    let store = Arc::new(MemoryPeerStore::default());
    let raw = RawPeer::paired_with(&store);
    let node = Node::start_with(
        library,
        Identity::generate().unwrap(),
        Arc::clone(&store),
        loopback(),
        None,
    )
    .await;

    // Something other than Hello first: refused, connection closed.
    let connection = raw.connect(&node, &sync_alpn()).await.unwrap();
    let answer = raw_request(&connection, &encode_frame(&ack(1)).unwrap()).await;
    assert_eq!(error_code(&decode_frame(&answer)), ErrorCode::Malformed);
    let closed = tokio::time::timeout(WAIT, connection.closed()).await.unwrap();
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed:?}");

    // A Hello for another library: Error(WrongLibrary), connection closed.
    let connection = raw.connect(&node, &sync_alpn()).await.unwrap();
    let foreign = raw.hello(LibraryId(Uuid::new_v4()));
    let answer = raw_request(&connection, &encode_frame(&foreign).unwrap()).await;
    assert_eq!(error_code(&decode_frame(&answer)), ErrorCode::WrongLibrary);
    let closed = tokio::time::timeout(WAIT, connection.closed()).await.unwrap();
    assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed:?}");
    assert!(node.transport.connected_peers().is_empty());
    node.transport.shutdown().await;
}

fn pairing_of(identity: &Identity) -> PairedPeer {
    PairedPeer {
        device: identity.device(),
        fingerprint: identity.fingerprint(),
        name: "peer".to_owned(),
        addresses: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_of_different_libraries_do_not_connect() {
    let (ours, theirs) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let our_node = Node::start_with(
        LibraryId(Uuid::new_v4()),
        ours.clone(),
        Arc::new(MemoryPeerStore::with_peers([pairing_of(&theirs)])),
        loopback(),
        None,
    )
    .await;
    let their_node = Node::start_with(
        LibraryId(Uuid::new_v4()),
        theirs,
        Arc::new(MemoryPeerStore::with_peers([pairing_of(&ours)])),
        loopback(),
        None,
    )
    .await;
    assert_eq!(
        our_node.transport.connect(their_node.address()).await,
        Err(ConnectError::WrongLibrary)
    );
    assert!(our_node.transport.connected_peers().is_empty());
    assert!(their_node.transport.connected_peers().is_empty());
    our_node.transport.shutdown().await;
    their_node.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_fails_the_handshake_clearly() {
    let library = LibraryId(Uuid::new_v4());
    let store = Arc::new(MemoryPeerStore::default());
    let raw = RawPeer::paired_with(&store);
    let server_identity = Identity::generate().unwrap();
    store.add(pairing_of(&server_identity)).unwrap();
    let node = Node::start_with(
        library,
        Identity::generate().unwrap(),
        Arc::clone(&store),
        loopback(),
        None,
    )
    .await;
    let error = raw.connect(&node, b"lsync/2").await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("120") || text.contains("application protocol"), "{text}");

    // The other direction: the transport dials a server that speaks only lsync/2.
    let server = quinn::Endpoint::server(
        raw::server_config(&server_identity, node.transport.fingerprint(), b"lsync/2", &config())
            .unwrap(),
        loopback(),
    )
    .unwrap();
    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            if let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        }
    });
    let result = node.transport.connect(server.local_addr().unwrap()).await;
    assert!(matches!(result, Err(ConnectError::IncompatibleVersion(_))), "{result:?}");
    accept.abort();
    node.transport.shutdown().await;
}

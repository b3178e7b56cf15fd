//! The in-memory twin through the `Transport` trait, on tokio's paused clock: the same contract
//! as QUIC (events, ordered one-way messages, correlated responses, timeouts) under each fault.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::time::Duration;

use lsync_protocol::{
    Ack, Epoch, LibraryId, Message, OriginSeq, SharedCatchUpRequest, SharedCatchUpResponse,
};
use lsync_transport::{
    DeviceId, DisconnectReason, LinkConfig, MemoryHub, MemoryPeer, MemoryTransport, RequestError,
    SendError, Transport, TransportConfig, TransportEvent,
};
use tokio::sync::mpsc;
use uuid::Uuid;

/// Upper bound on waiting for an event (virtual time: the clock is paused and auto-advances).
const WAIT: Duration = Duration::from_secs(60);

struct Device {
    transport: MemoryTransport,
    events: mpsc::Receiver<TransportEvent>,
}

impl Device {
    fn id(&self) -> DeviceId {
        self.transport.local_device()
    }

    async fn next(&mut self) -> TransportEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event within the timeout")
            .expect("events channel open")
    }

    /// Skips heartbeat watermarks and returns the next other event.
    async fn next_significant(&mut self) -> TransportEvent {
        loop {
            match self.next().await {
                TransportEvent::Watermarks { .. } => {}
                event => return event,
            }
        }
    }

    /// Collects `count` one-way messages.
    async fn messages(&mut self, count: usize) -> Vec<Message> {
        let mut messages = Vec::new();
        while messages.len() < count {
            if let TransportEvent::Message { message, .. } = self.next_significant().await {
                messages.push(message);
            }
        }
        messages
    }
}

async fn hub_with(seed: u64, count: u8) -> (MemoryHub, Vec<Device>) {
    let hub = MemoryHub::new(seed, TransportConfig::default()).unwrap();
    let library = LibraryId(Uuid::from_bytes([9; 16]));
    let mut devices = Vec::new();
    for index in 0..count {
        let (transport, events) = hub
            .add_device(
                MemoryPeer {
                    device: DeviceId::from_bytes([index + 1; 16]),
                    library,
                    name: format!("device {index}"),
                    epoch: Epoch(1),
                },
                None,
            )
            .await;
        devices.push(Device { transport, events });
    }
    // Everyone sees everyone connect.
    for device in &mut devices {
        for _ in 1..count {
            assert!(matches!(device.next_significant().await, TransportEvent::Connected { .. }));
        }
    }
    (hub, devices)
}

fn ack(seq: u64) -> Message {
    Message::Ack(Ack {
        shared: vec![OriginSeq { origin: DeviceId::from_bytes([1; 16]), seq }],
        state: Vec::new(),
    })
}

fn seq_of(message: &Message) -> u64 {
    match message {
        Message::Ack(ack) => ack.shared[0].seq,
        other => panic!("unexpected {other:?}"),
    }
}

fn spawn_echo_responder(mut events: mpsc::Receiver<TransportEvent>) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let TransportEvent::Request(request) = event
                && let Message::SharedCatchUpRequest(asked) = request.message
            {
                let _ = request
                    .responder
                    .respond(Message::SharedCatchUpResponse(SharedCatchUpResponse {
                        changes: Vec::new(),
                        complete: true,
                        pruned: vec![OriginSeq {
                            origin: request.peer,
                            seq: u64::from(asked.limit),
                        }],
                    }))
                    .await;
            }
        }
    });
}

fn catch_up(limit: u32) -> Message {
    Message::SharedCatchUpRequest(SharedCatchUpRequest { after: Vec::new(), limit })
}

#[tokio::test(start_paused = true)]
async fn latency_delays_but_keeps_order() {
    let (hub, mut devices) = hub_with(1, 2).await;
    let (a, b) = (devices[0].id(), devices[1].id());
    hub.set_link(
        a,
        b,
        LinkConfig {
            latency_min: Duration::from_millis(20),
            latency_max: Duration::from_millis(80),
            ..LinkConfig::default()
        },
    );
    let sent = tokio::time::Instant::now();
    for seq in 0..50 {
        devices[0].transport.send(b, ack(seq)).await.unwrap();
    }
    let received = devices[1].messages(50).await;
    assert!(sent.elapsed() >= Duration::from_millis(20), "virtual latency elapsed");
    let order: Vec<u64> = received.iter().map(seq_of).collect();
    assert_eq!(order, (0..50).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn loss_drops_messages_silently_and_requests_time_out() {
    let (hub, mut devices) = hub_with(2, 2).await;
    let (a, b) = (devices[0].id(), devices[1].id());
    hub.set_link(a, b, LinkConfig { loss: 1.0, ..LinkConfig::default() });
    // Sending succeeds (the sender cannot know), nothing arrives.
    devices[0].transport.send(b, ack(1)).await.unwrap();
    let request = devices[0].transport.request(b, catch_up(1), Duration::from_secs(2)).await;
    assert_eq!(request, Err(RequestError::Timeout(Duration::from_secs(2))));
    assert!(hub.stats().lost >= 2);
    hub.set_link(a, b, LinkConfig::default());
    devices[0].transport.send(b, ack(2)).await.unwrap();
    assert_eq!(devices[1].messages(1).await, vec![ack(2)]);
}

#[tokio::test(start_paused = true)]
async fn duplication_repeats_messages_but_never_responses() {
    let (hub, mut devices) = hub_with(3, 2).await;
    let (a, b) = (devices[0].id(), devices[1].id());
    hub.set_link(a, b, LinkConfig { duplicate: 1.0, ..LinkConfig::default() });
    devices[0].transport.send(b, ack(7)).await.unwrap();
    assert_eq!(devices[1].messages(2).await, vec![ack(7), ack(7)]);

    let responder = devices.pop().unwrap();
    spawn_echo_responder(responder.events);
    // The request and its response are both duplicated on the link; the requester gets exactly
    // one response per request, each matched to its request.
    for limit in 1..=20 {
        let response = devices[0].transport.request(b, catch_up(limit), WAIT).await.unwrap();
        let Message::SharedCatchUpResponse(response) = response else {
            panic!("{response:?}");
        };
        assert_eq!(response.pruned[0].seq, u64::from(limit));
    }
    assert!(hub.stats().duplicated >= 40);
}

#[tokio::test(start_paused = true)]
async fn reordering_lets_messages_overtake() {
    let (hub, mut devices) = hub_with(4, 2).await;
    let (a, b) = (devices[0].id(), devices[1].id());
    hub.set_link(
        a,
        b,
        LinkConfig {
            latency_min: Duration::from_millis(5),
            latency_max: Duration::from_millis(5),
            reorder: 0.5,
            ..LinkConfig::default()
        },
    );
    for seq in 0..100 {
        devices[0].transport.send(b, ack(seq)).await.unwrap();
    }
    let order: Vec<u64> = devices[1].messages(100).await.iter().map(seq_of).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "nothing lost or repeated");
    assert_ne!(order, sorted, "some messages overtook others");
}

#[tokio::test(start_paused = true)]
async fn partitions_disconnect_and_healing_reconnects() {
    let (hub, mut devices) = hub_with(5, 3).await;
    let (a, b, c) = (devices[0].id(), devices[1].id(), devices[2].id());
    hub.partition(a, b).await;
    assert!(matches!(
        devices[0].next_significant().await,
        TransportEvent::Disconnected { peer, reason: DisconnectReason::Stale } if peer == b
    ));
    assert!(matches!(
        devices[1].next_significant().await,
        TransportEvent::Disconnected { peer, .. } if peer == a
    ));
    assert_eq!(devices[0].transport.send(b, ack(1)).await, Err(SendError::NotConnected(b)));
    // c still reaches both.
    devices[0].transport.send(c, ack(2)).await.unwrap();
    assert_eq!(devices[2].messages(1).await, vec![ack(2)]);
    let peers: Vec<DeviceId> =
        devices[0].transport.connected_peers().iter().map(|peer| peer.device).collect();
    assert_eq!(peers, vec![c]);

    hub.heal(a, b).await;
    assert!(matches!(
        devices[0].next_significant().await,
        TransportEvent::Connected { peer, .. } if peer == b
    ));
    assert!(matches!(
        devices[1].next_significant().await,
        TransportEvent::Connected { peer, .. } if peer == a
    ));
    devices[0].transport.send(b, ack(3)).await.unwrap();
    assert_eq!(devices[1].messages(1).await, vec![ack(3)]);
}

#[tokio::test(start_paused = true)]
async fn a_partition_fails_outstanding_requests() {
    let (hub, devices) = hub_with(6, 2).await;
    let (a, b) = (devices[0].id(), devices[1].id());
    let requester = devices[0].transport.clone();
    // Nobody answers on b: the request stays outstanding until the partition.
    let request = tokio::spawn(async move { requester.request(b, catch_up(1), WAIT).await });
    tokio::task::yield_now().await;
    hub.partition(a, b).await;
    assert!(matches!(
        request.await.unwrap(),
        Err(RequestError::ConnectionLost(_) | RequestError::NotConnected(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn many_concurrent_requests_are_answered_through_a_faulty_link() {
    let (hub, mut devices) = hub_with(7, 2).await;
    let (a, b) = (devices[0].id(), devices[1].id());
    hub.set_link(
        a,
        b,
        LinkConfig {
            latency_min: Duration::from_millis(1),
            latency_max: Duration::from_millis(30),
            duplicate: 0.2,
            reorder: 0.2,
            ..LinkConfig::default()
        },
    );
    let responder = devices.pop().unwrap();
    spawn_echo_responder(responder.events);
    let mut tasks = tokio::task::JoinSet::new();
    for limit in 1..=200u32 {
        let transport = devices[0].transport.clone();
        tasks.spawn(async move { (limit, transport.request(b, catch_up(limit), WAIT).await) });
    }
    while let Some(result) = tasks.join_next().await {
        let (limit, response) = result.unwrap();
        let Ok(Message::SharedCatchUpResponse(response)) = response else {
            panic!("{response:?}");
        };
        assert_eq!(response.pruned[0].seq, u64::from(limit));
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_responder_and_reserved_kinds() {
    let (_hub, mut devices) = hub_with(8, 2).await;
    let b = devices[1].id();
    let requester = devices[0].transport.clone();
    let request = tokio::spawn(async move { requester.request(b, catch_up(1), WAIT).await });
    let TransportEvent::Request(incoming) = devices[1].next_significant().await else {
        panic!("expected a request");
    };
    drop(incoming);
    assert_eq!(request.await.unwrap(), Err(RequestError::NoResponse));
    let heartbeat = Message::Heartbeat(lsync_protocol::Heartbeat { nonce: 1, watermarks: None });
    assert_eq!(
        devices[0].transport.send(b, heartbeat).await,
        Err(SendError::Reserved("Heartbeat"))
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_disconnects_and_refuses_later_sends() {
    let (_hub, mut devices) = hub_with(9, 2).await;
    let (a, b) = (devices[0].id(), devices[1].id());
    devices[0].transport.send(b, ack(1)).await.unwrap();
    let report = devices[0].transport.shutdown().await;
    assert_eq!(report.flushed, vec![b]);
    assert!(report.unsent.is_empty());
    assert_eq!(devices[1].messages(1).await, vec![ack(1)], "flushed before closing");
    assert!(matches!(
        devices[1].next_significant().await,
        TransportEvent::Disconnected { peer, reason: DisconnectReason::ClosedByPeer(_) } if peer == a
    ));
    assert_eq!(devices[0].transport.send(b, ack(2)).await, Err(SendError::ShuttingDown));
}

/// Same seed, same calls: the same sequence of deliveries, event for event.
#[tokio::test(start_paused = true)]
async fn the_twin_is_deterministic_for_a_seed() {
    async fn trace(seed: u64) -> Vec<u64> {
        let (hub, mut devices) = hub_with(seed, 2).await;
        let (a, b) = (devices[0].id(), devices[1].id());
        hub.set_link(
            a,
            b,
            LinkConfig {
                latency_min: Duration::from_millis(1),
                latency_max: Duration::from_millis(40),
                loss: 0.2,
                duplicate: 0.2,
                reorder: 0.3,
            },
        );
        for seq in 0..200 {
            devices[0].transport.send(b, ack(seq)).await.unwrap();
        }
        let delivered = hub.stats().sent - hub.stats().lost + hub.stats().duplicated;
        let count = usize::try_from(delivered).unwrap();
        devices[1].messages(count).await.iter().map(seq_of).collect()
    }
    let first = trace(11).await;
    assert_eq!(first, trace(11).await);
    assert_ne!(first, trace(12).await);
}

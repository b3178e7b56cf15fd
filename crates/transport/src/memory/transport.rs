//! The async adapter: [`MemoryTransport`]s (one per device) implementing [`Transport`] over one
//! shared [`MemoryNetwork`], moved forward by a driver task on tokio's clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use lsync_hlc::DeviceId;
use lsync_protocol::{Epoch, ErrorCode, Heartbeat, HeartbeatAck, Hello, LibraryId, Message};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use super::network::{Delivery, LinkConfig, MemoryNetwork, NetworkStats, SendOutcome};
use crate::config::TransportConfig;
use crate::quic::error_message;
use crate::{
    DisconnectReason, IncomingRequest, PeerInfo, RequestError, Responder, ResponderInner,
    SendError, ShutdownReport, Transport, TransportEvent, WatermarkSource, is_transport_message,
};

/// A device on the in-memory network, as its `Hello` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPeer {
    /// The device.
    pub device: DeviceId,
    /// Its library. Devices of different libraries on one hub never connect.
    pub library: LibraryId,
    /// Its name.
    pub name: String,
    /// Its epoch.
    pub epoch: Epoch,
}

/// What travels through the model: encoded messages (so that the twin refuses exactly what QUIC
/// refuses) with the transport's correlation data.
#[derive(Debug, Clone)]
enum Envelope {
    OneWay(Vec<u8>),
    Request {
        id: u64,
        bytes: Vec<u8>,
    },
    Response {
        id: u64,
        bytes: Vec<u8>,
    },
    /// The responder dropped the request unanswered.
    NoResponse {
        id: u64,
    },
}

struct Pending {
    peer: DeviceId,
    reply: oneshot::Sender<Result<Message, RequestError>>,
}

struct Device {
    hello: Hello,
    events: mpsc::Sender<TransportEvent>,
    watermarks: Option<WatermarkSource>,
    /// Requests this device sent that await a response, by id.
    pending: HashMap<u64, Pending>,
    /// Heartbeats this device sent that await an answer: nonce → (peer, sent at).
    heartbeats: HashMap<u64, (DeviceId, Instant)>,
    /// Connected peers: since when, and the last heartbeat round trip.
    links: BTreeMap<DeviceId, (SystemTime, Option<Duration>)>,
    shut_down: bool,
}

struct HubState {
    network: MemoryNetwork<Envelope>,
    devices: BTreeMap<DeviceId, Device>,
}

impl HubState {
    /// Whether `a` and `b` can talk: both present and running, same library, not partitioned.
    fn reachable(&self, a: DeviceId, b: DeviceId) -> bool {
        match (self.devices.get(&a), self.devices.get(&b)) {
            (Some(one), Some(other)) => {
                a != b
                    && !one.shut_down
                    && !other.shut_down
                    && one.hello.library == other.hello.library
                    && !self.network.is_partitioned(a, b)
            }
            _ => false,
        }
    }

    /// Brings the connection state of every pair in line with reachability, returning the
    /// events to emit, in order.
    fn reconcile(&mut self, reason_for: impl Fn(DeviceId) -> DisconnectReason) -> Vec<Outgoing> {
        let ids: Vec<DeviceId> = self.devices.keys().copied().collect();
        let mut events = Vec::new();
        for &a in &ids {
            for &b in &ids {
                if a == b {
                    continue;
                }
                let reachable = self.reachable(a, b);
                let Some(device) = self.devices.get_mut(&a) else {
                    continue;
                };
                let connected = device.links.contains_key(&b);
                if reachable && !connected {
                    device.links.insert(b, (SystemTime::now(), None));
                    if let Some(peer) = self.devices.get(&b) {
                        events.push((
                            a,
                            TransportEvent::Connected { peer: b, hello: peer.hello.clone() },
                        ));
                    }
                } else if !reachable && connected {
                    device.links.remove(&b);
                    // Requests to the lost peer fail, as over QUIC when the connection dies.
                    let lost: Vec<u64> = device
                        .pending
                        .iter()
                        .filter(|(_, pending)| pending.peer == b)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in lost {
                        if let Some(pending) = device.pending.remove(&id) {
                            let _ = pending.reply.send(Err(RequestError::ConnectionLost(
                                "the peer disconnected".to_owned(),
                            )));
                        }
                    }
                    events
                        .push((a, TransportEvent::Disconnected { peer: b, reason: reason_for(a) }));
                }
            }
        }
        events
    }

    fn sender(&self, device: DeviceId) -> Option<mpsc::Sender<TransportEvent>> {
        self.devices.get(&device).map(|device| device.events.clone())
    }
}

/// An event and the device it is for.
type Outgoing = (DeviceId, TransportEvent);

struct Hub {
    state: Mutex<HubState>,
    /// Serializes everything that emits events (the driver's deliveries and the control
    /// operations), so each device sees them in the order they happened.
    dispatch: tokio::sync::Mutex<()>,
    /// Wakes the driver: something was sent, or the hub is being dropped.
    wake: Notify,
    /// Wakes senders waiting for room on a full link.
    room: Notify,
    start: Instant,
    config: TransportConfig,
    next_id: AtomicU64,
}

impl Hub {
    fn state(&self) -> MutexGuard<'_, HubState> {
        // Each critical section leaves the state consistent before it can panic (map operations),
        // so a poisoned lock still guards consistent state.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> Duration {
        Instant::now() - self.start
    }
}

/// The in-memory network all [`MemoryTransport`]s of a test share, and the handle to its faults.
///
/// Cheap to clone. Its driver task runs until every clone of the hub and every transport is
/// dropped. Control operations are async because they emit `Connected`/`Disconnected` events
/// and wait if a device's channel is full: do not call them from the task that drains those
/// events.
///
/// Connectivity follows the model only: two devices of one library are connected unless
/// partitioned or shut down (a partition is reported as `Disconnected(Stale)`, as a silent peer
/// is over QUIC); loss alone never disconnects. One driver delivers for every device, so a
/// device whose events channel is full holds up deliveries to all (back-pressure, never drops).
#[derive(Clone)]
pub struct MemoryHub {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for MemoryHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHub").finish_non_exhaustive()
    }
}

impl MemoryHub {
    /// A hub whose faults are drawn from `seed`; `config` supplies the event capacity and the
    /// heartbeat interval (heartbeats carry watermarks and measure RTT, as over QUIC). Must be
    /// called inside a tokio runtime (it spawns the driver).
    pub fn new(seed: u64, config: TransportConfig) -> Result<Self, crate::ConfigError> {
        config.validate()?;
        let hub = Arc::new(Hub {
            state: Mutex::new(HubState {
                network: MemoryNetwork::new(seed),
                devices: BTreeMap::new(),
            }),
            dispatch: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            room: Notify::new(),
            start: Instant::now(),
            config,
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(drive(Arc::downgrade(&hub)));
        Ok(Self { hub })
    }

    /// Adds a device; it connects to every reachable device of its library (events on both
    /// sides).
    pub async fn add_device(
        &self,
        peer: MemoryPeer,
        watermarks: Option<WatermarkSource>,
    ) -> (MemoryTransport, mpsc::Receiver<TransportEvent>) {
        let (events, receiver) = mpsc::channel(self.hub.config.event_capacity);
        let device = peer.device;
        self.control(|state| {
            state.devices.insert(
                device,
                Device {
                    hello: Hello {
                        library: peer.library,
                        device,
                        epoch: peer.epoch,
                        name: peer.name,
                    },
                    events,
                    watermarks,
                    pending: HashMap::new(),
                    heartbeats: HashMap::new(),
                    links: BTreeMap::new(),
                    shut_down: false,
                },
            );
        })
        .await;
        (MemoryTransport { hub: Arc::clone(&self.hub), device }, receiver)
    }

    /// Sets both directions of the link between `a` and `b`.
    pub fn set_link(&self, a: DeviceId, b: DeviceId, config: LinkConfig) {
        self.hub.state().network.set_link(a, b, config);
    }

    /// Sets how links without their own configuration behave.
    pub fn set_default_link(&self, config: LinkConfig) {
        self.hub.state().network.set_default_link(config);
    }

    /// Partitions `a` from `b`: both see the other disconnect (as a stale connection), requests
    /// between them fail, messages in flight between them are dropped.
    pub async fn partition(&self, a: DeviceId, b: DeviceId) {
        self.control(|state| state.network.partition(a, b)).await;
    }

    /// Heals the partition between `a` and `b`: both see the other connect.
    pub async fn heal(&self, a: DeviceId, b: DeviceId) {
        self.control(|state| state.network.heal(a, b)).await;
    }

    /// Heals every partition.
    pub async fn heal_all(&self) {
        self.control(|state| state.network.heal_all()).await;
    }

    /// What the network did so far.
    pub fn stats(&self) -> NetworkStats {
        self.hub.state().network.stats()
    }

    async fn control(&self, change: impl FnOnce(&mut HubState)) {
        control(&self.hub, change, |_| DisconnectReason::Stale).await;
    }
}

/// Applies `change` and emits the resulting connectivity events in order.
async fn control(
    hub: &Hub,
    change: impl FnOnce(&mut HubState),
    reason_for: impl Fn(DeviceId) -> DisconnectReason,
) {
    let _order = hub.dispatch.lock().await;
    let outgoing = {
        let mut state = hub.state();
        change(&mut state);
        let events = state.reconcile(reason_for);
        events
            .into_iter()
            .filter_map(|(device, event)| state.sender(device).map(|sender| (sender, event)))
            .collect::<Vec<_>>()
    };
    for (sender, event) in outgoing {
        // A device whose receiver is gone just misses its events.
        let _ = sender.send(event).await;
    }
    hub.wake.notify_one();
}

/// Moves the network forward: delivers what is due, sends heartbeats, sleeps until the next
/// delivery or heartbeat or until woken by a send.
async fn drive(hub: Weak<Hub>) {
    let mut next_heartbeat = Instant::now();
    loop {
        let Some(strong) = hub.upgrade() else {
            return;
        };
        let order = strong.dispatch.lock().await;
        let now = strong.now();
        if Instant::now() >= next_heartbeat {
            send_heartbeats(&strong, now);
            next_heartbeat = Instant::now() + strong.config.heartbeat_interval;
        }
        let (deliveries, next) = {
            let mut state = strong.state();
            let deliveries = state.network.poll_deliveries(now);
            (deliveries, state.network.next_delivery_time())
        };
        if !deliveries.is_empty() {
            strong.room.notify_waiters();
        }
        for delivery in deliveries {
            deliver(&strong, delivery).await;
        }
        drop(order);
        let mut wake_at = next_heartbeat;
        if let Some(at) = next {
            wake_at = wake_at.min(strong.start + at);
        }
        // Hold only a weak reference while sleeping, so dropping the last hub ends the driver;
        // the `Notified` future is created first so a send between here and the sleep is seen.
        let wake = Arc::clone(&strong);
        let notified = wake.wake.notified();
        drop(strong);
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(wake_at) => {}
        }
        drop(wake);
    }
}

/// Each device sends a heartbeat to each connected peer.
fn send_heartbeats(hub: &Hub, now: Duration) {
    let mut state = hub.state();
    let mut outgoing = Vec::new();
    for (&device, slot) in &state.devices {
        for &peer in slot.links.keys() {
            outgoing.push((device, peer, slot.watermarks.as_ref().and_then(|source| source())));
        }
    }
    for (device, peer, watermarks) in outgoing {
        let nonce = hub.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(bytes) =
            lsync_protocol::encode(&Message::Heartbeat(Heartbeat { nonce, watermarks }))
        else {
            continue;
        };
        let id = nonce;
        if let Some(slot) = state.devices.get_mut(&device) {
            slot.heartbeats.insert(nonce, (peer, Instant::now()));
        }
        // A full link just skips this heartbeat; they are periodic.
        let _ = state.network.send(device, peer, Envelope::Request { id, bytes }, now);
    }
}

/// Hands one delivery to its receiver.
async fn deliver(hub: &Arc<Hub>, delivery: Delivery<Envelope>) {
    let Delivery { from, to, payload, .. } = delivery;
    let (connected, sender) = {
        let state = hub.state();
        let connected =
            state.devices.get(&to).is_some_and(|device| device.links.contains_key(&from));
        (connected, state.sender(to))
    };
    // A message that arrives after its connection ended belongs to a dead connection.
    let (true, Some(sender)) = (connected, sender) else {
        return;
    };
    match payload {
        Envelope::OneWay(bytes) => match lsync_protocol::decode(&bytes) {
            Ok(message) => {
                let _ = sender.send(TransportEvent::Message { peer: from, message }).await;
            }
            Err(error) => debug!(%from, %error, "dropping an undecodable one-way message"),
        },
        Envelope::Request { id, bytes } => {
            let responder = MemoryResponder {
                hub: Arc::downgrade(hub),
                from: to,
                to: from,
                id,
                answered: false,
            };
            match lsync_protocol::decode(&bytes) {
                Ok(Message::Heartbeat(heartbeat)) => {
                    let watermarks = {
                        let state = hub.state();
                        state
                            .devices
                            .get(&to)
                            .and_then(|device| device.watermarks.as_ref())
                            .and_then(|source| source())
                    };
                    let _ = responder.respond(Message::HeartbeatAck(HeartbeatAck {
                        nonce: heartbeat.nonce,
                        watermarks,
                    }));
                    if let Some(watermarks) = heartbeat.watermarks {
                        let _ = sender
                            .send(TransportEvent::Watermarks { peer: from, watermarks })
                            .await;
                    }
                }
                Ok(message) if is_transport_message(&message) => {
                    let text =
                        format!("{} is not a request on an established connection", message.name());
                    let _ = responder.respond(error_message(ErrorCode::Unsupported, &text));
                }
                Ok(message) => {
                    let request = IncomingRequest {
                        peer: from,
                        message,
                        responder: Responder { inner: ResponderInner::Memory(responder) },
                    };
                    let _ = sender.send(TransportEvent::Request(request)).await;
                }
                Err(error) => {
                    let _ = responder.respond(error_message(error.code(), &error.to_string()));
                }
            }
        }
        Envelope::Response { id, bytes } => {
            let decoded = lsync_protocol::decode(&bytes);
            let heartbeat = {
                let mut state = hub.state();
                let Some(device) = state.devices.get_mut(&to) else {
                    return;
                };
                if let Some((peer, sent)) = device.heartbeats.remove(&id) {
                    if let Some(link) = device.links.get_mut(&peer) {
                        link.1 = Some(Instant::now() - sent);
                    }
                    true
                } else {
                    // A duplicated or late response finds nothing pending: exactly one response
                    // reaches the requester.
                    if let Some(pending) = device.pending.remove(&id) {
                        let result = match decoded {
                            Ok(Message::Error(error)) => Err(RequestError::Remote(error)),
                            Ok(message) => Ok(message),
                            Err(error) => Err(RequestError::Malformed(error.to_string())),
                        };
                        let _ = pending.reply.send(result);
                    }
                    return;
                }
            };
            if heartbeat
                && let Ok(Message::HeartbeatAck(HeartbeatAck {
                    watermarks: Some(watermarks), ..
                })) = decoded
            {
                let _ = sender.send(TransportEvent::Watermarks { peer: from, watermarks }).await;
            }
        }
        Envelope::NoResponse { id } => {
            let mut state = hub.state();
            if let Some(pending) =
                state.devices.get_mut(&to).and_then(|device| device.pending.remove(&id))
            {
                let _ = pending.reply.send(Err(RequestError::NoResponse));
            }
        }
    }
}

/// Answers a request through the in-memory network (so the response may be delayed or lost like
/// any message; a lost one surfaces as the requester's timeout).
#[derive(Debug)]
pub(crate) struct MemoryResponder {
    hub: Weak<Hub>,
    from: DeviceId,
    to: DeviceId,
    id: u64,
    answered: bool,
}

impl MemoryResponder {
    pub(crate) fn respond(mut self, response: Message) -> Result<(), SendError> {
        let bytes = lsync_protocol::encode(&response)?;
        self.answered = true;
        self.post(Envelope::Response { id: self.id, bytes })
    }

    fn post(&self, envelope: Envelope) -> Result<(), SendError> {
        let Some(hub) = self.hub.upgrade() else {
            return Err(SendError::ShuttingDown);
        };
        let now = hub.now();
        {
            let mut state = hub.state();
            if !state.reachable(self.from, self.to) {
                return Err(SendError::ConnectionLost("the peer disconnected".to_owned()));
            }
            // Lost or partitioned responses surface as the requester's timeout.
            let _ = state.network.send_response(self.from, self.to, envelope, now);
        }
        hub.wake.notify_one();
        Ok(())
    }
}

impl Drop for MemoryResponder {
    fn drop(&mut self) {
        if !self.answered {
            // Tells the requester at once, as a QUIC stream reset does.
            let _ = self.post(Envelope::NoResponse { id: self.id });
        }
    }
}

/// One device's [`Transport`] over a [`MemoryHub`].
#[derive(Clone)]
pub struct MemoryTransport {
    hub: Arc<Hub>,
    device: DeviceId,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport").field("device", &self.device).finish_non_exhaustive()
    }
}

impl MemoryTransport {
    /// Posts `envelope` to `peer`, waiting while the link is full.
    async fn post(&self, peer: DeviceId, envelope: Envelope) -> Result<(), PostError> {
        loop {
            let room = self.hub.room.notified();
            {
                let now = self.hub.now();
                let mut state = self.hub.state();
                match state.devices.get(&self.device) {
                    Some(device) if device.shut_down => return Err(PostError::ShuttingDown),
                    Some(device) if device.links.contains_key(&peer) => {}
                    _ => return Err(PostError::NotConnected),
                }
                match state.network.send(self.device, peer, envelope.clone(), now) {
                    SendOutcome::Full => {}
                    // Lost or dropped messages are the network's business: the sender cannot
                    // know, exactly as over a real network.
                    _ => {
                        drop(state);
                        self.hub.wake.notify_one();
                        return Ok(());
                    }
                }
            }
            room.await;
        }
    }
}

enum PostError {
    NotConnected,
    ShuttingDown,
}

impl Transport for MemoryTransport {
    fn local_device(&self) -> DeviceId {
        self.device
    }

    async fn send(&self, peer: DeviceId, message: Message) -> Result<(), SendError> {
        if is_transport_message(&message) {
            return Err(SendError::Reserved(message.name()));
        }
        let bytes = lsync_protocol::encode(&message)?;
        self.post(peer, Envelope::OneWay(bytes)).await.map_err(|error| match error {
            PostError::NotConnected => SendError::NotConnected(peer),
            PostError::ShuttingDown => SendError::ShuttingDown,
        })
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
        let bytes = lsync_protocol::encode(&message)?;
        let id = self.hub.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, response) = oneshot::channel();
        {
            let mut state = self.hub.state();
            let Some(device) = state.devices.get_mut(&self.device) else {
                return Err(RequestError::NotConnected(peer));
            };
            device.pending.insert(id, Pending { peer, reply });
        }
        let forget = || {
            let mut state = self.hub.state();
            if let Some(device) = state.devices.get_mut(&self.device) {
                device.pending.remove(&id);
            }
        };
        if let Err(error) = self.post(peer, Envelope::Request { id, bytes }).await {
            forget();
            return Err(match error {
                PostError::NotConnected => RequestError::NotConnected(peer),
                PostError::ShuttingDown => RequestError::ShuttingDown,
            });
        }
        match tokio::time::timeout(timeout, response).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RequestError::ConnectionLost("the transport went away".to_owned())),
            Err(_) => {
                forget();
                Err(RequestError::Timeout(timeout))
            }
        }
    }

    fn connected_peers(&self) -> Vec<PeerInfo> {
        let state = self.hub.state();
        let Some(device) = state.devices.get(&self.device) else {
            return Vec::new();
        };
        device
            .links
            .iter()
            .filter_map(|(peer, (since, rtt))| {
                state.devices.get(peer).map(|other| PeerInfo {
                    device: *peer,
                    hello: other.hello.clone(),
                    address: None,
                    rtt: *rtt,
                    connected_since: *since,
                })
            })
            .collect()
    }

    async fn shutdown(&self) -> ShutdownReport {
        let me = self.device;
        let peers: Vec<DeviceId> = {
            let state = self.hub.state();
            match state.devices.get(&me) {
                Some(device) if !device.shut_down => device.links.keys().copied().collect(),
                _ => return ShutdownReport::default(),
            }
        };
        // Like QUIC's flush: wait (at most the close timeout) until what this device sent has
        // left the network, delivered or lost.
        let in_flight = |hub: &Hub| {
            let state = hub.state();
            peers
                .iter()
                .filter(|peer| state.network.in_flight_between(me, **peer) > 0)
                .copied()
                .collect::<Vec<_>>()
        };
        let drained = tokio::time::timeout(self.hub.config.close_timeout, async {
            loop {
                let room = self.hub.room.notified();
                if in_flight(&self.hub).is_empty() {
                    return;
                }
                room.await;
            }
        })
        .await;
        let unsent = if drained.is_ok() { Vec::new() } else { in_flight(&self.hub) };
        control(
            &self.hub,
            |state| {
                if let Some(device) = state.devices.get_mut(&me) {
                    device.shut_down = true;
                }
            },
            |device| {
                if device == me {
                    DisconnectReason::Shutdown
                } else {
                    DisconnectReason::ClosedByPeer("shutting down".to_owned())
                }
            },
        )
        .await;
        ShutdownReport {
            flushed: peers.into_iter().filter(|peer| !unsent.contains(peer)).collect(),
            unsent,
        }
    }
}

//! One live sync connection to a peer: the `Hello` exchange, registration (one connection per
//! peer), and the task that serves its streams and heartbeats.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lsync_hlc::DeviceId;
use lsync_protocol::{ErrorCode, Heartbeat, HeartbeatAck, Hello, Message};
use quinn::{ConnectionError, ReadError, SendStream, VarInt, WriteError};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::stream::{FrameReader, Incoming, close, reset};
use super::{ConnectError, Inner, error_message, lock, start_dialer, tls};
use crate::frame::encode_frame;
use crate::{
    DisconnectReason, IncomingRequest, PeerInfo, RequestError, Responder, ResponderInner,
    SendError, TransportEvent, is_transport_message,
};

/// A live, registered connection.
pub(crate) struct Session {
    pub(crate) peer: DeviceId,
    pub(crate) connection: quinn::Connection,
    /// Which side dialed: decides which connection survives when both dial at once.
    dialer: DeviceId,
    hello: Hello,
    since: SystemTime,
    /// The last heartbeat round trip in nanoseconds; 0 until one is answered.
    rtt_nanos: AtomicU64,
    /// When the last heartbeat answer (or the connection itself) arrived.
    last_heard: Mutex<Instant>,
    /// The ordered stream of one-way messages, opened at the first send. The async mutex
    /// serializes senders (in arrival order: tokio's mutex is fair), which is what keeps one-way
    /// messages ordered.
    outbox: tokio::sync::Mutex<Option<SendStream>>,
    /// How long a one-way send may wait for the peer to take it (`TransportConfig::send_timeout`).
    send_timeout: Duration,
    /// Why this side closed the connection, recorded before closing it.
    close_reason: Mutex<Option<DisconnectReason>>,
}

impl Session {
    pub(crate) fn info(&self) -> PeerInfo {
        let nanos = self.rtt_nanos.load(Ordering::Relaxed);
        PeerInfo {
            device: self.peer,
            hello: self.hello.clone(),
            address: Some(self.connection.remote_address()),
            rtt: (nanos > 0).then(|| Duration::from_nanos(nanos)),
            connected_since: self.since,
        }
    }

    /// Closes the connection, recording `reason` for the disconnection event (the first reason
    /// recorded wins).
    pub(crate) fn close(&self, code: VarInt, reason: DisconnectReason, text: &str) {
        lock(&self.close_reason).get_or_insert(reason);
        self.connection.close(code, text.as_bytes());
    }

    /// Writes one frame on the one-way stream, opening it if needed.
    pub(crate) async fn send_frame(&self, frame: &[u8]) -> Result<(), SendError> {
        let mut outbox = self.outbox.lock().await;
        let stream = match outbox.as_mut() {
            Some(stream) => stream,
            None => {
                let stream = self
                    .connection
                    .open_uni()
                    .await
                    .map_err(|error| SendError::ConnectionLost(error.to_string()))?;
                outbox.insert(stream)
            }
        };
        match tokio::time::timeout(self.send_timeout, stream.write_all(frame)).await {
            Ok(Ok(())) => Ok(()),
            Err(_) => {
                // The peer does not read: part of the frame may be written, so the stream is
                // reset (the peer discards what it holds of it) and the next send opens a new
                // one. The message is reported unsent; its sender's retry or catch-up takes over.
                let _ = stream.reset(VarInt::from_u32(0));
                *outbox = None;
                Err(SendError::TimedOut(self.send_timeout))
            }
            Ok(Err(error)) => {
                // The stream is unusable (stopped by the peer or the connection is gone); the
                // next send opens a new one if the connection still lives.
                *outbox = None;
                Err(SendError::ConnectionLost(match error {
                    WriteError::Stopped(code) => format!("the peer stopped the stream ({code})"),
                    other => other.to_string(),
                }))
            }
        }
    }

    /// Finishes the one-way stream and waits until `deadline` at most for the peer to acknowledge
    /// all of it. `true` if nothing was left unconfirmed. Later sends fail (the transport is shutting
    /// down before this is called).
    pub(crate) async fn flush(&self, deadline: Instant) -> bool {
        // A send blocked on a peer that does not read holds the stream until its timeout: the
        // flush waits for it no longer than the deadline.
        let Ok(mut outbox) = tokio::time::timeout_at(deadline, self.outbox.lock()).await else {
            return false;
        };
        let Some(mut stream) = outbox.take() else {
            return true;
        };
        drop(outbox);
        if stream.finish().is_err() {
            return false;
        }
        matches!(tokio::time::timeout_at(deadline, stream.stopped()).await, Ok(Ok(None)))
    }
}

/// Answers one request on its stream. Dropping it unanswered resets the stream, which the
/// requester sees as [`RequestError::NoResponse`].
#[derive(Debug)]
pub(crate) struct QuicResponder {
    stream: Option<SendStream>,
}

impl QuicResponder {
    pub(crate) async fn respond(mut self, response: Message) -> Result<(), SendError> {
        let frame = encode_frame(&response)?;
        let Some(mut stream) = self.stream.take() else {
            return Err(SendError::ConnectionLost("already answered".to_owned()));
        };
        let result = stream
            .write_all(&frame)
            .await
            .map_err(|error| SendError::ConnectionLost(error.to_string()));
        // Finishing after a failed write fails too; either way the stream is done.
        let _ = stream.finish();
        result
    }
}

impl Drop for QuicResponder {
    fn drop(&mut self) {
        if let Some(mut stream) = self.stream.take() {
            // Fails only if the stream is already closed, when the requester knows anyway.
            let _ = stream.reset(reset::NO_RESPONSE);
        }
    }
}

/// Sends `message` as a request on a new bidirectional stream of `connection` and reads the one
/// response on the same stream, within `timeout`.
pub(crate) async fn request_on(
    connection: &quinn::Connection,
    message: Message,
    timeout: Duration,
) -> Result<Message, RequestError> {
    let frame = encode_frame(&message)?;
    let exchange = async {
        let lost = |error: &dyn std::fmt::Display| RequestError::ConnectionLost(error.to_string());
        let (mut send, recv) = connection.open_bi().await.map_err(|error| lost(&error))?;
        send.write_all(&frame).await.map_err(|error| lost(&error))?;
        // The request is complete; the response comes on the receive half.
        let _ = send.finish();
        let mut reader = FrameReader::new(recv);
        match reader.next_message().await {
            Incoming::Message(Message::Error(error)) => Err(RequestError::Remote(error)),
            Incoming::Message(response) => Ok(response),
            Incoming::End | Incoming::Failed(ReadError::Reset(_)) => Err(RequestError::NoResponse),
            Incoming::UnknownKind(error) => Err(RequestError::Malformed(error.to_string())),
            Incoming::Broken(reason) => Err(RequestError::Malformed(reason)),
            Incoming::Failed(error) => Err(lost(&error)),
        }
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(RequestError::Timeout(timeout)))
}

/// Exchanges `Hello`s on a freshly handshaken sync connection, registers it, and spawns the task
/// that serves it. Returns the peer's device id.
pub(crate) async fn establish(
    inner: &Arc<Inner>,
    connection: quinn::Connection,
    we_dialed: bool,
) -> Result<DeviceId, ConnectError> {
    let fail = |code: VarInt, error: ConnectError| {
        connection.close(code, error.to_string().as_bytes());
        Err(error)
    };
    // The verifier admitted only paired certificates; the lookup also yields the device.
    let Some(paired) = tls::peer_fingerprint(&connection).and_then(|fp| inner.trust.peer(&fp))
    else {
        return fail(close::UNKNOWN_DEVICE, ConnectError::NotPaired);
    };
    let device = paired.device;
    let hello = match tokio::time::timeout(
        inner.config.handshake_timeout,
        exchange_hellos(inner, &connection, we_dialed),
    )
    .await
    {
        Ok(Ok(hello)) => hello,
        Ok(Err((code, error))) => return fail(code, error),
        Err(_) => return fail(close::PROTOCOL, ConnectError::Timeout),
    };
    if hello.device != device {
        return fail(
            close::PROTOCOL,
            ConnectError::Protocol("the Hello's device id does not match the certificate".into()),
        );
    }
    let local = inner.identity.device();
    let session = Arc::new(Session {
        peer: device,
        connection: connection.clone(),
        dialer: if we_dialed { local } else { device },
        hello: hello.clone(),
        since: SystemTime::now(),
        rtt_nanos: AtomicU64::new(0),
        last_heard: Mutex::new(Instant::now()),
        outbox: tokio::sync::Mutex::new(None),
        send_timeout: inner.config.send_timeout,
        close_reason: Mutex::new(None),
    });
    if inner.shutting_down.load(Ordering::Acquire) {
        return fail(close::SHUTDOWN, ConnectError::ShuttingDown);
    }
    // Reserve room for the events first, so that registering and announcing happen together
    // under the lock: the channel then sees connects and disconnects in the order of the map.
    let permits = inner.events.reserve_many(2).await.ok();
    let outcome = {
        let mut sessions = lock(&inner.sessions);
        let keep_new = match sessions.get(&device) {
            None => true,
            Some(existing) => {
                // Both sides apply the same rule: prefer the connection dialed by the smaller
                // device id; between two dialed by the same side, the newer one.
                let preferred = local.min(device);
                existing.dialer != preferred || session.dialer == preferred
            }
        };
        if keep_new {
            let replaced = sessions.insert(device, Arc::clone(&session));
            if let Some(mut permits) = permits {
                if replaced.is_some()
                    && let Some(permit) = permits.next()
                {
                    permit.send(TransportEvent::Disconnected {
                        peer: device,
                        reason: DisconnectReason::Replaced,
                    });
                }
                if let Some(permit) = permits.next() {
                    permit.send(TransportEvent::Connected { peer: device, hello: hello.clone() });
                }
            }
            Some(replaced)
        } else {
            None
        }
    };
    match outcome {
        None => {
            debug!(peer = %device, "keeping the other connection to this peer");
            connection.close(close::DUPLICATE, b"another connection to this device is kept");
            return Ok(device);
        }
        Some(replaced) => {
            if let Some(old) = replaced {
                old.close(close::DUPLICATE, DisconnectReason::Replaced, "replaced");
            }
        }
    }
    let address = connection.remote_address();
    if inner.trust.remember_address(device, address)
        && let Err(error) = inner.store.remember_address(device, address)
    {
        warn!(peer = %device, %error, "cannot store the peer's new address");
    }
    debug!(peer = %device, %address, we_dialed, "connected");
    start_dialer(inner, device, true);
    tokio::spawn(run_session(Arc::clone(inner), session));
    Ok(device)
}

/// The first exchange on a sync connection: the dialer sends its `Hello` as a request, the
/// acceptor checks it and answers with its own (or an `Error` and a close).
async fn exchange_hellos(
    inner: &Arc<Inner>,
    connection: &quinn::Connection,
    we_dialed: bool,
) -> Result<Hello, (VarInt, ConnectError)> {
    let local = Hello {
        library: inner.local.library,
        device: inner.identity.device(),
        epoch: inner.local.epoch,
        name: inner.local.name.clone(),
    };
    let protocol = |text: String| (close::PROTOCOL, ConnectError::Protocol(text));
    if we_dialed {
        let answer =
            request_on(connection, Message::Hello(local), inner.config.handshake_timeout).await;
        return match answer {
            Ok(Message::Hello(hello)) if hello.library == inner.local.library => Ok(hello),
            Ok(Message::Hello(_)) => Err((close::WRONG_LIBRARY, ConnectError::WrongLibrary)),
            Ok(other) => Err(protocol(format!("expected Hello, got {}", other.name()))),
            Err(RequestError::Remote(error)) if error.code == ErrorCode::WrongLibrary => {
                Err((close::WRONG_LIBRARY, ConnectError::WrongLibrary))
            }
            Err(RequestError::ConnectionLost(reason)) => {
                Err((close::PROTOCOL, ConnectError::Failed(reason)))
            }
            Err(error) => Err(protocol(error.to_string())),
        };
    }
    let (mut send, recv) = connection
        .accept_bi()
        .await
        .map_err(|error| (close::PROTOCOL, ConnectError::Failed(error.to_string())))?;
    let mut reader = FrameReader::new(recv);
    let (answer, result) = match reader.next_message().await {
        Incoming::Message(Message::Hello(hello)) if hello.library == inner.local.library => {
            (Message::Hello(local), Ok(hello))
        }
        Incoming::Message(Message::Hello(hello)) => {
            warn!(library = %hello.library, "refusing a connection for another library");
            (
                error_message(
                    ErrorCode::WrongLibrary,
                    &format!("this device syncs library {}", inner.local.library),
                ),
                Err((close::WRONG_LIBRARY, ConnectError::WrongLibrary)),
            )
        }
        Incoming::Message(other) => {
            let text = format!("expected Hello first, got {}", other.name());
            warn!(%text, "refusing a connection");
            (error_message(ErrorCode::Malformed, &text), Err(protocol(text)))
        }
        Incoming::UnknownKind(error) => {
            let text = format!("expected Hello first: {error}");
            (error_message(ErrorCode::Unsupported, &text), Err(protocol(text)))
        }
        Incoming::Broken(reason) => {
            warn!(%reason, "refusing a connection with a broken first frame");
            (error_message(ErrorCode::Malformed, &reason), Err(protocol(reason)))
        }
        Incoming::End => return Err(protocol("the stream ended before a Hello".to_owned())),
        Incoming::Failed(error) => {
            return Err((close::PROTOCOL, ConnectError::Failed(error.to_string())));
        }
    };
    if let Ok(frame) = encode_frame(&answer)
        && send.write_all(&frame).await.is_ok()
        && send.finish().is_ok()
        && result.is_err()
    {
        // Give the refusal a chance to arrive before the connection closes (closing discards
        // unsent stream data); bounded by the caller's handshake timeout.
        let _ = send.stopped().await;
    }
    result
}

/// Serves a registered connection until it closes: accepts request and one-way streams, sends
/// heartbeats, and closes the connection when the peer stops answering them.
async fn run_session(inner: Arc<Inner>, session: Arc<Session>) {
    let connection = session.connection.clone();
    let interval = inner.config.heartbeat_interval;
    let stale_timeout = inner.config.stale_timeout;
    let mut heartbeats = tokio::time::interval_at(Instant::now() + interval, interval);
    heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let error = loop {
        let stale_at = *lock(&session.last_heard) + stale_timeout;
        // Stalled (fault injection): accept nothing and send no heartbeat, as a hung process.
        let reading_now = reading(&inner);
        tokio::select! {
            error = connection.closed() => break error,
            () = reading_changed(&inner, reading_now) => {}
            stream = connection.accept_bi(), if reading_now => match stream {
                Ok((send, recv)) => {
                    tokio::spawn(serve_request(Arc::clone(&inner), Arc::clone(&session), send, recv));
                }
                Err(error) => break error,
            },
            stream = connection.accept_uni(), if reading_now => match stream {
                Ok(recv) => {
                    tokio::spawn(serve_one_way(Arc::clone(&inner), Arc::clone(&session), recv));
                }
                Err(error) => break error,
            },
            _ = heartbeats.tick(), if reading_now => {
                tokio::spawn(send_heartbeat(Arc::clone(&inner), Arc::clone(&session)));
            }
            () = tokio::time::sleep_until(stale_at) => {
                // The deadline may have moved while sleeping; only a real silence counts.
                if Instant::now() >= *lock(&session.last_heard) + stale_timeout {
                    warn!(peer = %session.peer, ?stale_timeout, "no heartbeat answered; closing");
                    session.close(close::STALE, DisconnectReason::Stale, "no heartbeat answered");
                }
            }
        }
    };
    let reason = lock(&session.close_reason).take().unwrap_or_else(|| disconnect_reason(&error));
    let permit = inner.events.reserve().await.ok();
    {
        let mut sessions = lock(&inner.sessions);
        let current =
            sessions.get(&session.peer).is_some_and(|registered| Arc::ptr_eq(registered, &session));
        if current {
            sessions.remove(&session.peer);
            debug!(peer = %session.peer, %reason, "disconnected");
            if let Some(permit) = permit {
                permit.send(TransportEvent::Disconnected { peer: session.peer, reason });
            }
        }
    }
    if let Some(wake) = lock(&inner.dialers).get(&session.peer) {
        wake.notify_one();
    }
}

fn disconnect_reason(error: &ConnectionError) -> DisconnectReason {
    match error {
        ConnectionError::ApplicationClosed(close) => {
            DisconnectReason::ClosedByPeer(String::from_utf8_lossy(&close.reason).into_owned())
        }
        // No packet for the QUIC idle timeout, which is the stale timeout.
        ConnectionError::TimedOut => DisconnectReason::Stale,
        ConnectionError::LocallyClosed => DisconnectReason::Shutdown,
        other => DisconnectReason::Lost(other.to_string()),
    }
}

/// Serves one request stream: reads the request, answers transport requests itself and hands
/// the others to the application.
async fn serve_request(
    inner: Arc<Inner>,
    session: Arc<Session>,
    send: SendStream,
    recv: quinn::RecvStream,
) {
    let peer = session.peer;
    wait_reading(&inner).await;
    let mut reader = FrameReader::new(recv);
    let responder = QuicResponder { stream: Some(send) };
    let message = match reader.next_message().await {
        Incoming::Message(message) => message,
        Incoming::UnknownKind(error) => {
            debug!(%peer, %error, "answering an unknown request kind");
            let _ =
                responder.respond(error_message(ErrorCode::Unsupported, &error.to_string())).await;
            return;
        }
        Incoming::Broken(reason) => {
            warn!(%peer, %reason, "closing a malformed request stream");
            reader.stop(reset::PROTOCOL);
            let _ = responder.respond(error_message(ErrorCode::Malformed, &reason)).await;
            return;
        }
        Incoming::End | Incoming::Failed(_) => return,
    };
    match message {
        Message::Heartbeat(heartbeat) => {
            if !inner.answer_heartbeats.load(Ordering::Relaxed) {
                // Fault injection: hold the request unanswered, as a hung peer would.
                let _ = session.connection.closed().await;
                return;
            }
            let ack = Message::HeartbeatAck(HeartbeatAck {
                nonce: heartbeat.nonce,
                watermarks: inner.watermarks.as_ref().and_then(|source| source()),
            });
            if let Err(error) = responder.respond(ack).await {
                debug!(%peer, %error, "heartbeat answer failed");
            }
            if let Some(watermarks) = heartbeat.watermarks {
                let _ = inner.events.send(TransportEvent::Watermarks { peer, watermarks }).await;
            }
        }
        message if is_transport_message(&message) => {
            warn!(%peer, kind = message.name(), "refusing a transport message as a request");
            let text = format!("{} is not a request on an established connection", message.name());
            let _ = responder.respond(error_message(ErrorCode::Unsupported, &text)).await;
        }
        message => {
            let request = IncomingRequest {
                peer,
                message,
                responder: Responder { inner: ResponderInner::Quic(responder) },
            };
            // Waits while the application is behind; if it is gone the responder is dropped,
            // which tells the requester.
            let _ = inner.events.send(TransportEvent::Request(request)).await;
        }
    }
}

/// Reads one-way messages from a stream in order and hands them to the application.
async fn serve_one_way(inner: Arc<Inner>, session: Arc<Session>, recv: quinn::RecvStream) {
    let peer = session.peer;
    let mut reader = FrameReader::new(recv);
    loop {
        wait_reading(&inner).await;
        match reader.next_message().await {
            Incoming::Message(message) if is_transport_message(&message) => {
                warn!(%peer, kind = message.name(), "closing a one-way stream carrying a transport message");
                reader.stop(reset::PROTOCOL);
                return;
            }
            Incoming::Message(message) => {
                if inner.events.send(TransportEvent::Message { peer, message }).await.is_err() {
                    reader.stop(reset::GOING_AWAY);
                    return;
                }
            }
            Incoming::UnknownKind(error) => {
                // The frame boundary is intact: skip the message, keep the stream.
                debug!(%peer, %error, "skipping a one-way message of an unknown kind");
            }
            Incoming::Broken(reason) => {
                warn!(%peer, %reason, "closing a malformed one-way stream");
                reader.stop(reset::PROTOCOL);
                return;
            }
            Incoming::End => return,
            Incoming::Failed(error) => {
                debug!(%peer, %error, "one-way stream ended");
                return;
            }
        }
    }
}

/// Whether this transport reads from its connections (not stalled by
/// [`crate::QuicTransport::set_reading`]).
fn reading(inner: &Inner) -> bool {
    *inner.reading.borrow()
}

/// Completes when reading is switched from `was` to the other state: wakes the session loop to
/// enable or disable its accept branches.
async fn reading_changed(inner: &Inner, was: bool) {
    let mut reading = inner.reading.subscribe();
    let _ = reading.wait_for(|reading| *reading != was).await;
}

/// Waits until the transport reads again (returns at once when it is not stalled).
async fn wait_reading(inner: &Inner) {
    let mut reading = inner.reading.subscribe();
    let _ = reading.wait_for(|reading| *reading).await;
}

/// Sends one heartbeat and records the answer (liveness, RTT, watermarks).
async fn send_heartbeat(inner: Arc<Inner>, session: Arc<Session>) {
    let nonce = inner.next_nonce.fetch_add(1, Ordering::Relaxed);
    let heartbeat = Message::Heartbeat(Heartbeat {
        nonce,
        watermarks: inner.watermarks.as_ref().and_then(|source| source()),
    });
    let started = Instant::now();
    match request_on(&session.connection, heartbeat, inner.config.stale_timeout).await {
        Ok(Message::HeartbeatAck(ack)) if ack.nonce == nonce => {
            let now = Instant::now();
            *lock(&session.last_heard) = now;
            let rtt = u64::try_from((now - started).as_nanos()).unwrap_or(u64::MAX);
            session.rtt_nanos.store(rtt.max(1), Ordering::Relaxed);
            if let Some(watermarks) = ack.watermarks {
                let _ = inner
                    .events
                    .send(TransportEvent::Watermarks { peer: session.peer, watermarks })
                    .await;
            }
        }
        Ok(other) => {
            warn!(peer = %session.peer, kind = other.name(), "unexpected heartbeat answer");
        }
        Err(error) => debug!(peer = %session.peer, %error, "heartbeat failed"),
    }
}

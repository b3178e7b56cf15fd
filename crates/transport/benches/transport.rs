//! Benchmark of the QUIC transport on loopback, each figure beside raw quinn measured in the
//! same run with the same TLS and QUIC configuration (`lsync_transport::raw`): bulk throughput
//! (64 KiB messages on the one-way stream), small messages per second (about 200 bytes each),
//! and request round-trip latency (p50, p99).
//!
//! Run with `cargo xtask bench transport` (or `cargo bench -p lsync-transport --bench
//! transport`). Set `LSYNC_BENCH_QUICK=1` for a short smoke run; `cargo test --all-targets` also
//! runs it that way (cargo passes `--bench` only when benchmarking). Prints a table, then one
//! `BENCH {json}` line per figure for `cargo xtask bench` to collect.
#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary has no API")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark fails loudly")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lsync_protocol::{
    Ack, Epoch, HlcTime, LibraryId, Message, OriginSeq, StateBatch, StateOp, StateRow, Value,
};
use lsync_transport::frame::{FrameDecoder, encode_frame};
use lsync_transport::{
    DeviceId, Identity, LocalDevice, MemoryPeerStore, PairedPeer, PeerStore, QuicOptions,
    QuicTransport, Transport, TransportConfig, TransportEvent, raw, sync_alpn,
};
use tokio::sync::mpsc;
use uuid::Uuid;

const LOOPBACK: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A 64 KiB device-owned batch: one row holding one blob.
fn bulk_message() -> Message {
    Message::StateBatch(StateBatch {
        owner: DeviceId::from_bytes([1; 16]),
        model: "entries".to_owned(),
        columns: vec!["content".to_owned()],
        rows: vec![StateRow {
            id: Uuid::from_bytes([2; 16]),
            version: HlcTime::from_u64(1),
            op: StateOp::Upsert(vec![Value::Blob(vec![0xab; 64 * 1024])]),
        }],
        since: None,
    })
}

/// An acknowledgement of about 200 bytes: the typical small message.
fn small_message(seq: u64) -> Message {
    Message::Ack(Ack {
        shared: (0..7)
            .map(|origin| OriginSeq { origin: DeviceId::from_bytes([origin; 16]), seq })
            .collect(),
        state: Vec::new(),
    })
}

fn pairing(identity: &Identity) -> PairedPeer {
    PairedPeer {
        device: identity.device(),
        fingerprint: identity.fingerprint(),
        name: "bench".to_owned(),
        addresses: Vec::new(),
    }
}

async fn start(
    identity: Identity,
    library: LibraryId,
    peer: &Identity,
) -> (QuicTransport, mpsc::Receiver<TransportEvent>) {
    QuicTransport::start(QuicOptions {
        identity,
        local: LocalDevice { library, name: "bench".to_owned(), epoch: Epoch(1) },
        listen: LOOPBACK,
        store: Arc::new(MemoryPeerStore::with_peers([pairing(peer)])) as Arc<dyn PeerStore>,
        config: TransportConfig { max_concurrent_requests: 256, ..TransportConfig::default() },
        watermarks: None,
    })
    .await
    .expect("transport starts")
}

/// Two connected transports; the receiver's events go to `receiver`.
async fn transport_pair() -> (QuicTransport, QuicTransport, mpsc::Receiver<TransportEvent>) {
    let library = LibraryId(Uuid::new_v4());
    let (sender_id, receiver_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let (sender, mut sender_events) = start(sender_id.clone(), library, &receiver_id).await;
    let (receiver, mut receiver_events) = start(receiver_id, library, &sender_id).await;
    sender.connect(receiver.local_addr().unwrap()).await.unwrap();
    for events in [&mut sender_events, &mut receiver_events] {
        while !matches!(events.recv().await, Some(TransportEvent::Connected { .. })) {}
    }
    // The sender's events are not needed; keep draining them so it never waits on them.
    tokio::spawn(async move { while sender_events.recv().await.is_some() {} });
    (sender, receiver, receiver_events)
}

/// Two raw quinn endpoints with the transport's TLS and QUIC settings, connected.
async fn raw_pair() -> (quinn::Connection, quinn::Connection, Vec<quinn::Endpoint>) {
    let (client_id, server_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let config = TransportConfig { max_concurrent_requests: 256, ..TransportConfig::default() };
    let alpn = sync_alpn();
    let server = quinn::Endpoint::server(
        raw::server_config(&server_id, client_id.fingerprint(), &alpn, &config).unwrap(),
        LOOPBACK,
    )
    .unwrap();
    let client = quinn::Endpoint::client(LOOPBACK).unwrap();
    let client_config =
        raw::client_config(&client_id, server_id.fingerprint(), &alpn, &config).unwrap();
    let address = server.local_addr().unwrap();
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await.unwrap().await.unwrap() }
    });
    let client_connection =
        client.connect_with(client_config, address, "lsync").unwrap().await.unwrap();
    let server_connection = accept.await.unwrap();
    (client_connection, server_connection, vec![client, server])
}

/// Sends `count` copies of `message` through the transport; returns messages per second.
async fn transport_one_way(count: usize, make: impl Fn(u64) -> Message) -> f64 {
    let (sender, receiver, mut events) = transport_pair().await;
    let to = receiver.local_device();
    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        let mut received = 0;
        while received < count {
            if let Some(TransportEvent::Message { .. }) = events.recv().await {
                received += 1;
            }
        }
    });
    for index in 0..count {
        sender.send(to, make(index as u64)).await.unwrap();
    }
    receiving.await.unwrap();
    let rate = count as f64 / started.elapsed().as_secs_f64();
    sender.shutdown().await;
    receiver.shutdown().await;
    rate
}

/// Writes `count` frames of `message` on one raw uni stream, one write per frame, and decodes
/// them on the other side; returns messages per second.
async fn raw_one_way(count: usize, make: impl Fn(u64) -> Message) -> f64 {
    let (client, server, endpoints) = raw_pair().await;
    let frames: Vec<Vec<u8>> =
        (0..count).map(|index| encode_frame(&make(index as u64)).unwrap()).collect();
    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        let mut stream = server.accept_uni().await.unwrap();
        let mut decoder = FrameDecoder::default();
        let mut buffer = vec![0; 16 * 1024];
        let mut received = 0;
        while received < count {
            let Some(read) = stream.read(&mut buffer).await.unwrap() else {
                break;
            };
            let mut input = &buffer[..read];
            while !input.is_empty() {
                if let Some(body) = decoder.decode(&mut input).unwrap() {
                    std::hint::black_box(lsync_protocol::decode(&body).unwrap());
                    received += 1;
                }
            }
        }
        received
    });
    let mut stream = client.open_uni().await.unwrap();
    for frame in &frames {
        stream.write_all(frame).await.unwrap();
    }
    stream.finish().unwrap();
    assert_eq!(receiving.await.unwrap(), count);
    let rate = count as f64 / started.elapsed().as_secs_f64();
    client.close(0u32.into(), b"done");
    for endpoint in endpoints {
        endpoint.wait_idle().await;
    }
    rate
}

/// The sample at `per_mille`/1000 of the sorted samples (nearest rank).
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    sorted[(sorted.len() - 1) * per_mille / 1000]
}

/// Sequential requests through the transport, answered by an echoing responder.
async fn transport_round_trips(count: usize) -> Vec<Duration> {
    let (sender, receiver, mut events) = transport_pair().await;
    let to = receiver.local_device();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let TransportEvent::Request(request) = event {
                let answer = request.message.clone();
                let _ = request.responder.respond(answer).await;
            }
        }
    });
    let mut samples = Vec::with_capacity(count);
    for index in 0..count {
        let started = Instant::now();
        sender.request(to, small_message(index as u64), Duration::from_secs(10)).await.unwrap();
        samples.push(started.elapsed());
    }
    sender.shutdown().await;
    receiver.shutdown().await;
    samples.sort();
    samples
}

/// Sequential requests on raw bidirectional streams, answered by echoing the frame.
async fn raw_round_trips(count: usize) -> Vec<Duration> {
    let (client, server, endpoints) = raw_pair().await;
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = server.accept_bi().await {
            tokio::spawn(async move {
                let request = recv.read_to_end(1024 * 1024).await.unwrap();
                send.write_all(&request).await.unwrap();
                send.finish().unwrap();
            });
        }
    });
    let mut samples = Vec::with_capacity(count);
    for index in 0..count {
        let frame = encode_frame(&small_message(index as u64)).unwrap();
        let started = Instant::now();
        let (mut send, mut recv) = client.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        send.finish().unwrap();
        std::hint::black_box(recv.read_to_end(1024 * 1024).await.unwrap());
        samples.push(started.elapsed());
    }
    client.close(0u32.into(), b"done");
    for endpoint in endpoints {
        endpoint.wait_idle().await;
    }
    samples.sort();
    samples
}

fn report(name: &str, figure: f64, unit: &str, baseline_name: &str, baseline: f64) {
    let ratio = figure / baseline;
    println!(
        "{name:<34} {figure:>12.1} {unit:<6}  {baseline_name:<26} {baseline:>12.1} {unit:<6}  ratio {ratio:.2}"
    );
    println!(
        "BENCH {{\"name\":\"{name}\",\"figure\":{figure:.1},\"unit\":\"{unit}\",\"baseline\":{baseline:.1},\"baseline_name\":\"{baseline_name}\",\"ratio\":{ratio:.3}}}"
    );
}

fn main() {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let quick = !benchmarking || std::env::var_os("LSYNC_BENCH_QUICK").is_some();
    let (bulk, small, round_trips) =
        if quick { (200, 5_000, 300) } else { (5_000, 200_000, 5_000) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let bulk_bytes = encode_frame(&bulk_message()).unwrap().len() as f64;
        let transport = transport_one_way(bulk, |_| bulk_message()).await;
        let baseline = raw_one_way(bulk, |_| bulk_message()).await;
        report(
            "transport bulk 64 KiB messages",
            transport * bulk_bytes / 1e6,
            "MB/s",
            "raw quinn, same frames",
            baseline * bulk_bytes / 1e6,
        );

        let transport = transport_one_way(small, small_message).await;
        let baseline = raw_one_way(small, small_message).await;
        report(
            "transport small messages",
            transport,
            "msg/s",
            "raw quinn, write per frame",
            baseline,
        );

        let transport = transport_round_trips(round_trips).await;
        let baseline = raw_round_trips(round_trips).await;
        for (label, per_mille) in [("p50", 500), ("p99", 990)] {
            report(
                &format!("transport request round trip {label}"),
                percentile(&transport, per_mille).as_secs_f64() * 1e6,
                "us",
                "raw quinn bi stream",
                percentile(&baseline, per_mille).as_secs_f64() * 1e6,
            );
        }
    });
}

//! Building blocks for talking QUIC with lsync's TLS setup without the transport around it:
//! the benchmark's raw-quinn baseline and the protocol tests that send hand-made frames use
//! them. The configurations are exactly the transport's: TLS 1.3 over ring, Ed25519
//! certificates, fingerprint pinning, no session resumption, the same QUIC windows and limits.

use std::sync::Arc;

use crate::config::{ConfigError, TransportConfig};
use crate::identity::{Fingerprint, Identity};
use crate::peer_store::PairedPeer;

use super::tls::{self, Accept, Trust};
use super::{CONNECTION_WINDOW, MAX_ONE_WAY_STREAMS, STREAM_RECEIVE_WINDOW};

/// The QUIC transport parameters the transport derives from `config`.
pub fn transport_config(config: &TransportConfig) -> Result<quinn::TransportConfig, ConfigError> {
    let mut quic = quinn::TransportConfig::default();
    quic.max_concurrent_bidi_streams(config.max_concurrent_requests.into())
        .max_concurrent_uni_streams(MAX_ONE_WAY_STREAMS.into())
        .stream_receive_window(STREAM_RECEIVE_WINDOW.into())
        .receive_window(CONNECTION_WINDOW.into())
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(config.heartbeat_interval))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.stale_timeout)
                .map_err(|error| ConfigError(format!("stale_timeout: {error}")))?,
        ));
    Ok(quic)
}

/// A trust set holding exactly one pinned certificate.
fn pinned(peer: Fingerprint) -> Arc<Trust> {
    let paired = PairedPeer {
        device: crate::device_id_for(&peer),
        fingerprint: peer,
        name: String::new(),
        addresses: Vec::new(),
    };
    Arc::new(Trust::new(vec![paired], &tls::provider()))
}

/// A client configuration presenting `identity`, accepting only the server certificate
/// `peer`, offering `alpn`.
pub fn client_config(
    identity: &Identity,
    peer: Fingerprint,
    alpn: &[u8],
    config: &TransportConfig,
) -> Result<quinn::ClientConfig, ConfigError> {
    tls::client_config(
        identity,
        &pinned(peer),
        &tls::provider(),
        Arc::new(transport_config(config)?),
        Some(peer),
        alpn.to_vec(),
    )
    .map_err(|error| ConfigError(error.to_string()))
}

/// A server configuration presenting `identity`, accepting only the client certificate `peer`,
/// offering `alpn`.
pub fn server_config(
    identity: &Identity,
    peer: Fingerprint,
    alpn: &[u8],
    config: &TransportConfig,
) -> Result<quinn::ServerConfig, ConfigError> {
    tls::server_config(
        identity,
        &pinned(peer),
        &tls::provider(),
        Arc::new(transport_config(config)?),
        Accept::Paired,
        alpn.to_vec(),
    )
    .map_err(|error| ConfigError(error.to_string()))
}

//! TLS for QUIC: certificate verifiers that pin peers by fingerprint instead of trusting an
//! authority, and the rustls and quinn configurations built around them.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use lsync_hlc::DeviceId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tracing::warn;

use crate::identity::{Fingerprint, Identity};
use crate::pairing::InvitationBook;
use crate::peer_store::PairedPeer;

/// The metrics counter of handshakes refused because the remote certificate is not paired.
pub(crate) const REFUSED_METRIC: &str = "lsync_transport_handshakes_refused_total";

/// The server name a client puts in its handshake. Peers are pinned, so it is never checked; it
/// only has to be a valid DNS name.
pub(crate) const SERVER_NAME: &str = "lsync";

/// What this device trusts, shared between the verifiers (called by rustls inside handshakes)
/// and the transport (which changes it when pairing and unpairing).
pub(crate) struct Trust {
    paired: RwLock<HashMap<Fingerprint, PairedPeer>>,
    invitations: Mutex<InvitationBook>,
    refused: AtomicU64,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust").field("refused", &self.refused).finish_non_exhaustive()
    }
}

impl Trust {
    pub(crate) fn new(paired: Vec<PairedPeer>, provider: &CryptoProvider) -> Self {
        Self {
            paired: RwLock::new(paired.into_iter().map(|peer| (peer.fingerprint, peer)).collect()),
            invitations: Mutex::new(InvitationBook::default()),
            refused: AtomicU64::new(0),
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// The paired peer with this certificate fingerprint.
    pub(crate) fn peer(&self, fingerprint: &Fingerprint) -> Option<PairedPeer> {
        self.read_paired().get(fingerprint).cloned()
    }

    /// The paired peer with this device id.
    pub(crate) fn peer_by_device(&self, device: DeviceId) -> Option<PairedPeer> {
        self.read_paired().values().find(|peer| peer.device == device).cloned()
    }

    pub(crate) fn all(&self) -> Vec<PairedPeer> {
        self.read_paired().values().cloned().collect()
    }

    pub(crate) fn add(&self, peer: PairedPeer) {
        let mut paired = self.write_paired();
        // A device re-paired with a new certificate keeps one entry.
        paired.retain(|_, known| known.device != peer.device);
        paired.insert(peer.fingerprint, peer);
    }

    pub(crate) fn remove(&self, device: DeviceId) {
        self.write_paired().retain(|_, peer| peer.device != device);
    }

    pub(crate) fn remember_address(&self, device: DeviceId, address: std::net::SocketAddr) -> bool {
        self.write_paired()
            .values_mut()
            .find(|peer| peer.device == device)
            .is_some_and(|peer| peer.remember_address(address))
    }

    pub(crate) fn invitations(&self) -> MutexGuard<'_, InvitationBook> {
        // Every book operation completes or leaves the book unchanged, so a poisoned lock still
        // guards a consistent book.
        self.invitations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a handshake refused because the remote certificate is not trusted.
    pub(crate) fn count_refusal(&self, fingerprint: &Fingerprint) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(REFUSED_METRIC).increment(1);
        warn!(%fingerprint, "refused a handshake from an unpaired certificate");
    }

    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn read_paired(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Fingerprint, PairedPeer>> {
        // Every write is one map operation: a poisoned lock still guards a consistent map.
        self.paired.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_paired(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Fingerprint, PairedPeer>> {
        self.paired.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Which remote certificates a verifier accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Accept {
    /// Paired certificates only (dialing a known peer).
    Paired,
    /// Any certificate (the pairing endpoint, where the invitation's proof decides).
    Any,
    /// Exactly this certificate (dialing an inviter).
    Exactly(Fingerprint),
}

/// A rustls verifier for both directions that pins certificates by fingerprint. Whatever it
/// accepts, rustls still checks the handshake signature against the certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    trust: Arc<Trust>,
    accept: Accept,
}

impl PinnedVerifier {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fingerprint = Fingerprint::of_certificate(end_entity);
        let accepted = match self.accept {
            Accept::Paired => self.trust.peer(&fingerprint).is_some(),
            Accept::Any => true,
            Accept::Exactly(pinned) => pinned == fingerprint,
        };
        if accepted {
            Ok(())
        } else {
            self.trust.count_refusal(&fingerprint);
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // This is what proves the peer holds the certificate's private key.
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.trust.algorithms)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only (RFC 9001 section 4.2).
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algorithms.supported_schemes()
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("the TLS configuration has no cipher suite QUIC can use: {0}")]
    NoInitialCipherSuite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The crypto provider: rustls over ring (no aws-lc, no OpenSSL).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: the sync endpoint accepts paired client certificates on `lsync/1`, the
/// pairing endpoint any client certificate on `lsync-pair/1` (the invitation's proof decides).
pub(crate) fn server_config(
    identity: &Identity,
    trust: &Arc<Trust>,
    provider: &Arc<CryptoProvider>,
    transport: Arc<quinn::TransportConfig>,
    accept: Accept,
    alpn: Vec<u8>,
) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = Arc::new(PinnedVerifier { trust: Arc::clone(trust), accept });
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.certificate().clone()], identity.private_key())?;
    tls.alpn_protocols = vec![alpn];
    // No session resumption: a resumed session skips certificate verification, which would let
    // a since-unpaired device back in.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport);
    Ok(config)
}

/// The client side for dialing a paired peer (`pin` `None`) or an inviter (`pin` its
/// fingerprint), offering `alpn`.
pub(crate) fn client_config(
    identity: &Identity,
    trust: &Arc<Trust>,
    provider: &Arc<CryptoProvider>,
    transport: Arc<quinn::TransportConfig>,
    pin: Option<Fingerprint>,
    alpn: Vec<u8>,
) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedVerifier {
        trust: Arc::clone(trust),
        accept: pin.map_or(Accept::Paired, Accept::Exactly),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.certificate().clone()], identity.private_key())?;
    tls.alpn_protocols = vec![alpn];
    tls.resumption = rustls::client::Resumption::disabled();
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport);
    Ok(config)
}

/// The fingerprint of the certificate the peer presented in `connection`'s handshake.
pub(crate) fn peer_fingerprint(connection: &quinn::Connection) -> Option<Fingerprint> {
    let identity = connection.peer_identity()?;
    let certificates = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certificates.first().map(|certificate| Fingerprint::of_certificate(certificate))
}

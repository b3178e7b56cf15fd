//! Pairing by invitation: the token a person carries from one device to another, the proof the
//! joining device computes, and the inviter's book of open invitations (sans-IO: time is passed
//! in).
//!
//! The secret never travels over the network: the joiner sends
//! `HMAC-SHA256(secret, joiner fingerprint || inviter fingerprint)`, which binds the proof to the
//! two certificates of the TLS session it is sent on, so it cannot be replayed by anyone else.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use lsync_hlc::DeviceId;
use lsync_protocol::LibraryId;
use ring::hmac;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::identity::Fingerprint;

/// Bytes of an invitation secret: 256 bits, so guessing is hopeless and a wrong proof need not
/// burn the invitation.
pub const SECRET_BYTES: usize = 32;

/// The most invitations open at once: 16. A person pairs a few devices at a time; the cap bounds
/// memory and the number of windows in which an unknown certificate may complete a handshake
/// (for pairing only).
pub const MAX_OPEN_INVITATIONS: usize = 16;

/// Prefix of an invitation token, naming the format's version.
const TOKEN_PREFIX: &str = "lsync-invite-1:";

/// A short-lived, single-use invitation into a library, issued by a device that is in it.
///
/// Whoever holds it can pair a device into the library until it expires, so it should travel
/// over a trusted channel (shown as a QR code, typed, copied). `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitation {
    /// The invitation's id, named in the joiner's `PairRequest`.
    pub id: Uuid,
    /// The library to join.
    pub library: LibraryId,
    /// The inviting device.
    pub device: DeviceId,
    /// The inviting device's certificate fingerprint: the joiner accepts no other certificate.
    pub fingerprint: Fingerprint,
    /// Where the inviting device listens for sync connections (dialed after pairing).
    pub addresses: Vec<SocketAddr>,
    /// Where the inviting device listens for pairing connections (ALPN `lsync-pair/1`).
    pub pairing_address: SocketAddr,
    /// The shared secret.
    #[serde(with = "secret_bytes")]
    pub secret: [u8; SECRET_BYTES],
    /// When it expires, in milliseconds since the Unix epoch, for display. The inviter enforces
    /// the expiry with its own monotonic clock.
    pub expires_at_ms: u64,
}

impl fmt::Debug for Invitation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invitation")
            .field("id", &self.id)
            .field("library", &self.library)
            .field("device", &self.device)
            .field("fingerprint", &self.fingerprint)
            .field("addresses", &self.addresses)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// Why a token is not an invitation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// It does not start with the expected prefix (another format or version).
    #[error("not an lsync invitation (expected a token starting with {TOKEN_PREFIX:?})")]
    Prefix,
    /// The base64 or MessagePack inside is damaged.
    #[error("damaged invitation token: {0}")]
    Damaged(String),
}

impl Invitation {
    /// The invitation as one line of text: a versioned prefix, then base64url (no padding) of its
    /// MessagePack encoding.
    pub fn to_token(&self) -> String {
        // Serializing a struct of plain fields into a Vec cannot fail.
        let bytes = rmp_serde::to_vec_named(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses [`Invitation::to_token`]'s output; surrounding whitespace is ignored.
    pub fn from_token(token: &str) -> Result<Self, TokenError> {
        let encoded = token.trim().strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|error| TokenError::Damaged(error.to_string()))?;
        rmp_serde::from_slice(&bytes).map_err(|error| TokenError::Damaged(error.to_string()))
    }
}

/// The proof a joiner sends: HMAC-SHA256 under `secret` of the joiner's fingerprint followed by
/// the inviter's.
pub fn pairing_proof(
    secret: &[u8; SECRET_BYTES],
    joiner: &Fingerprint,
    inviter: &Fingerprint,
) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut context = hmac::Context::with_key(&key);
    context.update(&joiner.0);
    context.update(&inviter.0);
    let mut proof = [0; 32];
    proof.copy_from_slice(context.sign().as_ref());
    proof
}

/// Why the inviter refused a pairing request. Sent to the joiner as the message of an
/// `ErrorCode::PairingRefused` error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such invitation was issued (or the inviter restarted since).
    #[error("unknown invitation")]
    Unknown,
    /// The invitation expired.
    #[error("invitation expired")]
    Expired,
    /// The invitation was already used.
    #[error("invitation already used")]
    AlreadyUsed,
    /// The proof does not match the invitation's secret and the session's certificates.
    #[error("wrong invitation secret")]
    WrongSecret,
    /// Already [`MAX_OPEN_INVITATIONS`] open.
    #[error("too many open invitations")]
    TooMany,
}

/// How long an expired or used invitation is remembered: 10 minutes. A joiner arriving in that
/// time is told "expired" or "already used" instead of meeting a closed door, and the pairing
/// endpoint accepts connections only while the book remembers something.
pub const FORGET_AFTER: Duration = Duration::from_secs(10 * 60);

struct Issued {
    secret: [u8; SECRET_BYTES],
    expires: Instant,
    used: bool,
}

/// The inviter's invitations: open ones, and used or expired ones for [`FORGET_AFTER`].
#[derive(Default)]
pub(crate) struct InvitationBook {
    issued: HashMap<Uuid, Issued>,
}

impl InvitationBook {
    /// Records a new invitation.
    pub(crate) fn issue(
        &mut self,
        id: Uuid,
        secret: [u8; SECRET_BYTES],
        expires: Instant,
        now: Instant,
    ) -> Result<(), Refusal> {
        self.forget_old(now);
        let open =
            self.issued.values().filter(|issued| !issued.used && issued.expires > now).count();
        if open >= MAX_OPEN_INVITATIONS {
            return Err(Refusal::TooMany);
        }
        self.issued.insert(id, Issued { secret, expires, used: false });
        Ok(())
    }

    /// Checks a pairing request and, if it is good, marks the invitation used.
    pub(crate) fn redeem(
        &mut self,
        id: Uuid,
        proof: &[u8],
        joiner: &Fingerprint,
        inviter: &Fingerprint,
        now: Instant,
    ) -> Result<(), Refusal> {
        self.forget_old(now);
        let issued = self.issued.get_mut(&id).ok_or(Refusal::Unknown)?;
        if issued.used {
            return Err(Refusal::AlreadyUsed);
        }
        if now >= issued.expires {
            return Err(Refusal::Expired);
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &issued.secret);
        let mut message = [0; 64];
        message[..32].copy_from_slice(&joiner.0);
        message[32..].copy_from_slice(&inviter.0);
        // Constant-time comparison.
        hmac::verify(&key, &message, proof).map_err(|_| Refusal::WrongSecret)?;
        issued.used = true;
        Ok(())
    }

    /// Cancels an open invitation; `false` if it was not open.
    pub(crate) fn revoke(&mut self, id: Uuid) -> bool {
        self.issued.remove(&id).is_some_and(|issued| !issued.used)
    }

    /// Whether the book remembers any invitation: only then does the pairing endpoint accept
    /// connections.
    pub(crate) fn any_remembered(&mut self, now: Instant) -> bool {
        self.forget_old(now);
        !self.issued.is_empty()
    }

    fn forget_old(&mut self, now: Instant) {
        self.issued.retain(|_, issued| issued.expires + FORGET_AFTER > now);
    }
}

mod secret_bytes {
    use serde::{Deserializer, Serializer};

    use super::SECRET_BYTES;

    pub(super) fn serialize<S: Serializer>(
        secret: &[u8; SECRET_BYTES],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(secret)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<[u8; SECRET_BYTES], D::Error> {
        struct BytesVisitor;
        impl serde::de::Visitor<'_> for BytesVisitor {
            type Value = [u8; SECRET_BYTES];
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{SECRET_BYTES} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
                <[u8; SECRET_BYTES]>::try_from(bytes)
                    .map_err(|_| E::invalid_length(bytes.len(), &self))
            }
        }
        deserializer.deserialize_bytes(BytesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invitation() -> Invitation {
        Invitation {
            id: Uuid::new_v4(),
            library: LibraryId(Uuid::new_v4()),
            device: DeviceId::random(),
            fingerprint: Fingerprint([7; 32]),
            addresses: vec![SocketAddr::from(([127, 0, 0, 1], 4433))],
            pairing_address: SocketAddr::from(([127, 0, 0, 1], 4434)),
            secret: [9; SECRET_BYTES],
            expires_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn tokens_round_trip_on_one_line() {
        let invitation = invitation();
        let token = invitation.to_token();
        assert!(!token.contains(char::is_whitespace));
        assert_eq!(Invitation::from_token(&format!(" {token}\n")), Ok(invitation));
        assert_eq!(Invitation::from_token("hello"), Err(TokenError::Prefix));
        assert!(matches!(
            Invitation::from_token(&format!("{TOKEN_PREFIX}AAAA")),
            Err(TokenError::Damaged(_))
        ));
    }

    #[test]
    fn debug_hides_the_secret() {
        let shown = format!("{:?}", invitation());
        assert!(!shown.contains("secret"));
    }

    #[test]
    fn an_invitation_is_redeemed_once() {
        let (joiner, inviter) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
        let now = Instant::now();
        let mut book = InvitationBook::default();
        let id = Uuid::new_v4();
        let secret = [5; SECRET_BYTES];
        book.issue(id, secret, now + Duration::from_secs(60), now).unwrap();
        assert!(book.any_remembered(now));

        let wrong = pairing_proof(&[6; SECRET_BYTES], &joiner, &inviter);
        assert_eq!(book.redeem(id, &wrong, &joiner, &inviter, now), Err(Refusal::WrongSecret));
        // Bound to the certificates: the right secret over swapped fingerprints fails too.
        let swapped = pairing_proof(&secret, &inviter, &joiner);
        assert_eq!(book.redeem(id, &swapped, &joiner, &inviter, now), Err(Refusal::WrongSecret));

        let proof = pairing_proof(&secret, &joiner, &inviter);
        assert_eq!(book.redeem(id, &proof, &joiner, &inviter, now), Ok(()));
        assert_eq!(book.redeem(id, &proof, &joiner, &inviter, now), Err(Refusal::AlreadyUsed));
        assert!(book.any_remembered(now), "a used invitation is remembered for a while");
        assert!(!book.any_remembered(now + FORGET_AFTER + Duration::from_secs(60)));
        assert_eq!(
            book.redeem(Uuid::new_v4(), &proof, &joiner, &inviter, now),
            Err(Refusal::Unknown)
        );
    }

    #[test]
    fn an_expired_invitation_is_refused() {
        let (joiner, inviter) = (Fingerprint([1; 32]), Fingerprint([2; 32]));
        let now = Instant::now();
        let mut book = InvitationBook::default();
        let id = Uuid::new_v4();
        book.issue(id, [5; SECRET_BYTES], now + Duration::from_secs(1), now).unwrap();
        let later = now + Duration::from_secs(1);
        let proof = pairing_proof(&[5; SECRET_BYTES], &joiner, &inviter);
        assert_eq!(book.redeem(id, &proof, &joiner, &inviter, later), Err(Refusal::Expired));
    }

    #[test]
    fn open_invitations_are_capped() {
        let now = Instant::now();
        let mut book = InvitationBook::default();
        let expires = now + Duration::from_secs(60);
        for _ in 0..MAX_OPEN_INVITATIONS {
            book.issue(Uuid::new_v4(), [0; SECRET_BYTES], expires, now).unwrap();
        }
        assert_eq!(
            book.issue(Uuid::new_v4(), [0; SECRET_BYTES], expires, now),
            Err(Refusal::TooMany)
        );
        // Expired ones make room.
        let later = expires + Duration::from_secs(1);
        assert!(
            book.issue(Uuid::new_v4(), [0; SECRET_BYTES], later + Duration::from_secs(1), later)
                .is_ok()
        );
        let id = Uuid::new_v4();
        book.issue(id, [0; SECRET_BYTES], later + Duration::from_secs(1), later).unwrap();
        assert!(book.revoke(id));
        assert!(!book.revoke(id));
    }
}

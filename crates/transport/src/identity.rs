//! A device's long-lived identity: an Ed25519 key pair and a self-signed certificate, created at
//! first start and kept in a directory the caller chooses.
//!
//! The certificate's SHA-256 ([`Fingerprint`]) is what peers pin, and the [`DeviceId`] is derived
//! from it ([`device_id_for`]): the first 16 bytes of the fingerprint as a version-8 UUID. So a
//! device id cannot be claimed without the certificate, and the certificate cannot be used
//! without the private key (the TLS handshake proves possession). The price is that the
//! certificate must never be re-issued: it is valid until the year 4096 (rcgen's default), and
//! validity dates are not checked anyway, since peers are pinned, not chained to an authority.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use lsync_hlc::DeviceId;
use ring::digest;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// File holding the PKCS#8 DER private key, in the identity directory.
pub const KEY_FILE: &str = "device.key";
/// File holding the DER certificate, in the identity directory.
pub const CERT_FILE: &str = "device.crt";

/// Subject name in every lsync certificate. Only the key and the fingerprint matter; the name is
/// never checked, since peers are pinned.
const CERT_SUBJECT: &str = "lsync-device";

/// The SHA-256 of a device's DER certificate: what pairing pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_certificate(der: &[u8]) -> Self {
        let hash = digest::digest(&digest::SHA256, der);
        let mut bytes = [0; 32];
        bytes.copy_from_slice(hash.as_ref());
        Self(bytes)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl serde::de::Visitor<'_> for BytesVisitor {
            type Value = Fingerprint;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Fingerprint, E> {
                <[u8; 32]>::try_from(bytes)
                    .map(Fingerprint)
                    .map_err(|_| E::invalid_length(bytes.len(), &self))
            }
        }
        deserializer.deserialize_bytes(BytesVisitor)
    }
}

/// The device id bound to a certificate fingerprint: its first 16 bytes as a version-8 (custom)
/// UUID, RFC 9562 section 5.8. Six bits go to the version and variant, leaving 122 bits of the
/// hash: collisions are as unlikely as between random (version-4) ids.
pub fn device_id_for(fingerprint: &Fingerprint) -> DeviceId {
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&fingerprint.0[..16]);
    DeviceId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// Why an identity could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing the identity directory failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// Only one of the two files exists: regenerating would silently change the device id, so
    /// the caller must decide.
    #[error(
        "identity directory {dir} holds {present} but not {missing}; restore it or remove both"
    )]
    Incomplete {
        /// The directory.
        dir: PathBuf,
        /// The file found.
        present: &'static str,
        /// The file missing.
        missing: &'static str,
    },
    /// The private key file can be read by other users.
    #[error("{path} is readable by other users (mode {mode:o}); it must be 0600")]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Generating the key or certificate failed.
    #[error("cannot generate the device certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The files exist but do not form a usable identity (corrupt, or key and certificate do not
    /// match).
    #[error("invalid identity in {dir}: {reason}")]
    Invalid {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A device's key pair and certificate. The private key is never logged (`Debug` shows the device
/// id and fingerprint only).
pub struct Identity {
    key: PrivatePkcs8KeyDer<'static>,
    certificate: CertificateDer<'static>,
    fingerprint: Fingerprint,
    device: DeviceId,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone_key(),
            certificate: self.certificate.clone(),
            fingerprint: self.fingerprint,
            device: self.device,
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("device", &self.device)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A new identity that lives only in memory (tests, benchmarks, throwaway devices).
    pub fn generate() -> Result<Self, IdentityError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let certificate =
            rcgen::CertificateParams::new(vec![CERT_SUBJECT.to_owned()])?.self_signed(&key_pair)?;
        Ok(Self::from_parts(
            PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
            certificate.der().clone(),
        ))
    }

    /// Loads the identity kept in `dir`, or creates one there at first start: the directory is
    /// created owner-only (0700) and both files are written owner-only (0600), each through a
    /// temporary file renamed into place so a crash never leaves half a key.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Self::load(dir, &key_path, &cert_path),
            (false, false) => {
                create_private_dir(dir)?;
                let identity = Self::generate()?;
                // The certificate goes last: a crash in between leaves only a key, which
                // `Incomplete` reports instead of silently minting a new device id.
                write_private(&key_path, identity.key.secret_pkcs8_der())?;
                write_private(&cert_path, identity.certificate.as_ref())?;
                Ok(identity)
            }
            (true, false) => Err(IdentityError::Incomplete {
                dir: dir.to_owned(),
                present: KEY_FILE,
                missing: CERT_FILE,
            }),
            (false, true) => Err(IdentityError::Incomplete {
                dir: dir.to_owned(),
                present: CERT_FILE,
                missing: KEY_FILE,
            }),
        }
    }

    fn load(dir: &Path, key_path: &Path, cert_path: &Path) -> Result<Self, IdentityError> {
        check_private(key_path)?;
        let read = |path: &Path| {
            fs::read(path).map_err(|source| IdentityError::Io { path: path.to_owned(), source })
        };
        let identity = Self::from_parts(
            PrivatePkcs8KeyDer::from(read(key_path)?),
            CertificateDer::from(read(cert_path)?),
        );
        // Fails unless the key parses and its public key is the certificate's.
        rustls::sign::CertifiedKey::from_der(
            vec![identity.certificate.clone()],
            identity.private_key(),
            &rustls::crypto::ring::default_provider(),
        )
        .map_err(|error| IdentityError::Invalid {
            dir: dir.to_owned(),
            reason: error.to_string(),
        })?;
        Ok(identity)
    }

    fn from_parts(key: PrivatePkcs8KeyDer<'static>, certificate: CertificateDer<'static>) -> Self {
        let fingerprint = Fingerprint::of_certificate(&certificate);
        Self { key, certificate, fingerprint, device: device_id_for(&fingerprint) }
    }

    /// This device's id, derived from the certificate.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The certificate's SHA-256.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The DER certificate.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IdentityError::Io { path: dir.to_owned(), source })
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(|source| IdentityError::Io { path: dir.to_owned(), source })
}

/// Refuses a key file that group or others may read, as ssh does: such a key may already be
/// copied, and silently going on would hide that.
#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|source| IdentityError::Io { path: path.to_owned(), source })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecurePermissions {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), IdentityError> {
    Ok(())
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename),
/// readable and writable by the owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    write_private_io(path, bytes)
        .map_err(|source| IdentityError::Io { path: path.to_owned(), source })
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename,
/// directory fsync), readable and writable by the owner only (0600 on Unix), returning the bare
/// I/O error. Public as `write_private_file` for applications that keep secrets beside the
/// identity (the CLI's control token).
pub fn write_private_io(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path)?;
    // The rename is durable only once the directory entry is: sync the directory where the
    // platform allows opening one.
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    #[test]
    fn an_identity_is_created_once_and_reloaded() {
        let dir = TempDir::new("identity");
        let created = Identity::load_or_create(&dir.0).unwrap();
        let loaded = Identity::load_or_create(&dir.0).unwrap();
        assert_eq!(created.device(), loaded.device());
        assert_eq!(created.fingerprint(), loaded.fingerprint());
        assert_eq!(created.device(), device_id_for(&created.fingerprint()));
        assert_eq!(created.device().0.get_version_num(), 8);
    }

    #[cfg(unix)]
    #[test]
    fn identity_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("modes");
        Identity::load_or_create(&dir.0).unwrap();
        for file in [KEY_FILE, CERT_FILE] {
            let mode = fs::metadata(dir.0.join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        let mode = fs::metadata(&dir.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        fs::set_permissions(dir.0.join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load_or_create(&dir.0),
            Err(IdentityError::InsecurePermissions { mode: 0o644, .. })
        ));
    }

    #[test]
    fn a_half_identity_is_not_replaced() {
        let dir = TempDir::new("half");
        Identity::load_or_create(&dir.0).unwrap();
        fs::remove_file(dir.0.join(CERT_FILE)).unwrap();
        assert!(matches!(
            Identity::load_or_create(&dir.0),
            Err(IdentityError::Incomplete { missing: CERT_FILE, .. })
        ));
    }

    #[test]
    fn a_mismatched_certificate_is_refused() {
        let dir = TempDir::new("mismatch");
        Identity::load_or_create(&dir.0).unwrap();
        let other = Identity::generate().unwrap();
        write_private(&dir.0.join(CERT_FILE), other.certificate()).unwrap();
        assert!(matches!(Identity::load_or_create(&dir.0), Err(IdentityError::Invalid { .. })));
    }

    #[test]
    fn fingerprints_print_as_hex() {
        let fingerprint = Fingerprint([0xab; 32]);
        assert_eq!(fingerprint.to_string(), "ab".repeat(32));
        let bytes = rmp_serde::to_vec(&fingerprint).unwrap();
        assert_eq!(rmp_serde::from_slice::<Fingerprint>(&bytes).unwrap(), fingerprint);
    }
}

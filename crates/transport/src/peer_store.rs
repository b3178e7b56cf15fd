//! Where pairings live: the [`PeerStore`] trait, which the engine implements over its SQLite
//! `sync_peers` table, and two implementations that make the crate usable on its own
//! ([`MemoryPeerStore`], [`FilePeerStore`]).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lsync_hlc::DeviceId;
use serde::{Deserialize, Serialize};

use crate::identity::{Fingerprint, write_private_io};

/// The most addresses remembered per peer: 8, enough for a laptop's home, office and a few
/// networks, while a peer that roams endlessly cannot grow the record.
pub const MAX_ADDRESSES: usize = 8;

/// A device this device has paired with, in this library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairedPeer {
    /// Its device id (derived from `fingerprint`).
    pub device: DeviceId,
    /// The SHA-256 of its certificate: the only certificate accepted for it.
    pub fingerprint: Fingerprint,
    /// Its human-readable name, as it gave it when pairing.
    pub name: String,
    /// Where it was last reached, most recent first, at most [`MAX_ADDRESSES`].
    pub addresses: Vec<SocketAddr>,
}

impl PairedPeer {
    /// Puts `address` first in the list, removing an older copy and the oldest address beyond
    /// [`MAX_ADDRESSES`]. Returns whether the list changed.
    pub fn remember_address(&mut self, address: SocketAddr) -> bool {
        if self.addresses.first() == Some(&address) {
            return false;
        }
        self.addresses.retain(|known| *known != address);
        self.addresses.insert(0, address);
        self.addresses.truncate(MAX_ADDRESSES);
        true
    }
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file store could not read or write its file.
    #[error("peer store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The file store's file is not a list of peers.
    #[error("peer store {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What failed to parse.
        reason: String,
    },
    /// An implementation's own failure (the engine's database, say).
    #[error("peer store: {0}")]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

/// Durable storage of pairings, implemented by the caller.
///
/// The transport reads [`PeerStore::paired`] once at start and calls the others when a pairing
/// is made or removed and when a peer shows up at a new address. Calls are rare and made from
/// async tasks, so an implementation may do a short blocking write (one small file, one SQLite
/// statement) but must not wait on the network.
pub trait PeerStore: Send + Sync + 'static {
    /// Every paired peer.
    fn paired(&self) -> Result<Vec<PairedPeer>, StoreError>;
    /// Adds a pairing, replacing any previous one of the same device.
    fn add(&self, peer: PairedPeer) -> Result<(), StoreError>;
    /// Removes a pairing; `Ok(false)` if the device was not paired.
    fn remove(&self, device: DeviceId) -> Result<bool, StoreError>;
    /// Records that `device` was reached at `address` (see [`PairedPeer::remember_address`]).
    /// Unknown devices are ignored.
    fn remember_address(&self, device: DeviceId, address: SocketAddr) -> Result<(), StoreError>;
}

/// A [`PeerStore`] in memory: for tests and for devices that pair anew at every start.
#[derive(Debug, Default)]
pub struct MemoryPeerStore {
    peers: Mutex<BTreeMap<DeviceId, PairedPeer>>,
}

impl MemoryPeerStore {
    /// A store holding `peers`.
    pub fn with_peers(peers: impl IntoIterator<Item = PairedPeer>) -> Self {
        Self { peers: Mutex::new(peers.into_iter().map(|peer| (peer.device, peer)).collect()) }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, BTreeMap<DeviceId, PairedPeer>> {
        // A panic while holding this lock cannot leave the map half-updated (every update is one
        // map operation), so a poisoned lock is still consistent.
        self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl PeerStore for MemoryPeerStore {
    fn paired(&self) -> Result<Vec<PairedPeer>, StoreError> {
        Ok(self.peers().values().cloned().collect())
    }

    fn add(&self, peer: PairedPeer) -> Result<(), StoreError> {
        self.peers().insert(peer.device, peer);
        Ok(())
    }

    fn remove(&self, device: DeviceId) -> Result<bool, StoreError> {
        Ok(self.peers().remove(&device).is_some())
    }

    fn remember_address(&self, device: DeviceId, address: SocketAddr) -> Result<(), StoreError> {
        if let Some(peer) = self.peers().get_mut(&device) {
            peer.remember_address(address);
        }
        Ok(())
    }
}

/// A [`PeerStore`] in one MessagePack file, rewritten whole on every change through a temporary
/// file and a rename (so a crash leaves the old or the new list, never a mix), owner-only (0600).
///
/// The whole list is also kept in memory; the file is read once, at [`FilePeerStore::open`].
#[derive(Debug)]
pub struct FilePeerStore {
    path: PathBuf,
    peers: Mutex<BTreeMap<DeviceId, PairedPeer>>,
}

impl FilePeerStore {
    /// Opens the store at `path`; a missing file is an empty store (created at the first change).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let peers = match fs::read(&path) {
            Ok(bytes) => rmp_serde::from_slice::<Vec<PairedPeer>>(&bytes)
                .map_err(|error| StoreError::Corrupt {
                    path: path.clone(),
                    reason: error.to_string(),
                })?
                .into_iter()
                .map(|peer| (peer.device, peer))
                .collect(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        Ok(Self { path, peers: Mutex::new(peers) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `change` to the list and writes the file if it reports a change. The lock is held
    /// across the write so that two changes cannot write their files in the opposite order.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut BTreeMap<DeviceId, PairedPeer>) -> (T, bool),
    ) -> Result<T, StoreError> {
        let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut updated = peers.clone();
        let (result, changed) = change(&mut updated);
        if changed {
            let list: Vec<&PairedPeer> = updated.values().collect();
            let bytes = rmp_serde::to_vec(&list).map_err(|error| StoreError::Corrupt {
                path: self.path.clone(),
                reason: error.to_string(),
            })?;
            write_private_io(&self.path, &bytes)
                .map_err(|source| StoreError::Io { path: self.path.clone(), source })?;
            // Memory follows the file only once the file is written: a failed write changes
            // nothing.
            *peers = updated;
        }
        Ok(result)
    }
}

impl PeerStore for FilePeerStore {
    fn paired(&self) -> Result<Vec<PairedPeer>, StoreError> {
        let peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(peers.values().cloned().collect())
    }

    fn add(&self, peer: PairedPeer) -> Result<(), StoreError> {
        self.update(|peers| {
            let changed = peers.get(&peer.device) != Some(&peer);
            peers.insert(peer.device, peer);
            ((), changed)
        })
    }

    fn remove(&self, device: DeviceId) -> Result<bool, StoreError> {
        self.update(|peers| {
            let removed = peers.remove(&device).is_some();
            (removed, removed)
        })
    }

    fn remember_address(&self, device: DeviceId, address: SocketAddr) -> Result<(), StoreError> {
        self.update(|peers| {
            let changed = peers.get_mut(&device).is_some_and(|peer| peer.remember_address(address));
            ((), changed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn peer(byte: u8) -> PairedPeer {
        PairedPeer {
            device: DeviceId::from_bytes([byte; 16]),
            fingerprint: Fingerprint([byte; 32]),
            name: format!("device {byte}"),
            addresses: vec![SocketAddr::from(([127, 0, 0, 1], 4000 + u16::from(byte)))],
        }
    }

    /// The same scenario against any store.
    fn check_store(store: &dyn PeerStore) {
        store.add(peer(1)).unwrap();
        store.add(peer(2)).unwrap();
        let new_address = SocketAddr::from(([127, 0, 0, 1], 9999));
        store.remember_address(peer(1).device, new_address).unwrap();
        store.remember_address(DeviceId::from_bytes([9; 16]), new_address).unwrap();
        assert!(store.remove(peer(2).device).unwrap());
        assert!(!store.remove(peer(2).device).unwrap());
        let paired = store.paired().unwrap();
        assert_eq!(paired.len(), 1);
        assert_eq!(paired[0].addresses[0], new_address);
        assert_eq!(paired[0].addresses[1], peer(1).addresses[0]);
    }

    #[test]
    fn memory_store_keeps_pairings() {
        check_store(&MemoryPeerStore::default());
    }

    #[test]
    fn file_store_keeps_pairings_across_reopen() {
        let dir = TempDir::new("store");
        fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("peers.msgpack");
        check_store(&FilePeerStore::open(&path).unwrap());
        let reopened = FilePeerStore::open(&path).unwrap();
        let paired = reopened.paired().unwrap();
        assert_eq!(paired.len(), 1);
        assert_eq!(paired[0].device, peer(1).device);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_corrupt_file_is_reported() {
        let dir = TempDir::new("corrupt");
        fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("peers.msgpack");
        fs::write(&path, b"not messagepack").unwrap();
        assert!(matches!(FilePeerStore::open(&path), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn addresses_are_capped_and_most_recent_first() {
        let mut paired = peer(1);
        for port in 0..20 {
            paired.remember_address(SocketAddr::from(([10, 0, 0, 1], port)));
        }
        assert_eq!(paired.addresses.len(), MAX_ADDRESSES);
        assert_eq!(paired.addresses[0].port(), 19);
        assert!(!paired.remember_address(SocketAddr::from(([10, 0, 0, 1], 19))));
    }
}

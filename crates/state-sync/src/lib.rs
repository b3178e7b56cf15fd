//! Device-owned data: rows only their owner writes (locations, file entries, volumes), replicated
//! state-based — the owner's newest version of a row wins wherever it lands.
//!
//! # Model
//! - Every row carries `owner` and `version` (the owner's HLC time at its last write). Applying a
//!   received row is an idempotent, order-independent upsert: a newer version replaces the row, an
//!   older or equal one is a no-op ([`decide`]). A row claimed by a device other than its
//!   established owner is rejected and counted, never applied.
//! - Deletes are tombstones carrying the owner's version, so a late or replayed upsert never undoes
//!   a delete. Deleting a directory of a tree model sends one tombstone for the subtree root; each
//!   receiver removes the subtree it holds, and refuses any older version of a row whose ancestors
//!   include a subtree tombstone newer than that version (the ancestor walk goes through removed
//!   rows via locally kept tombstones, so it survives rows arriving in any order).
//! - There is no log: a peer that missed changes asks for rows with a version above its mark
//!   ([`sql::rows_since`], tombstones included) or, when backfilling, for all rows in key order
//!   ([`sql::rows_by_key`], tombstones included too: the backfilled copy serves catch-ups from
//!   below its new marks, and must hand on the deletes).
//! - Bulk writes (indexing a million files) go through [`sql::write_local`] in large
//!   transactions of multi-row statements; new rows should get time-ordered UUIDv7 keys and arrive
//!   in key order, which SQLite inserts several times faster than random keys.
//!
//! # Invariants
//! - Applying the same rows in any order, any number of times, leaves the same tables.
//! - A row's version never decreases; a tombstone is only replaced by a newer version.
//! - Tombstones are garbage-collected only once every paired device holds them, or past the
//!   retention cap, which marks the devices left behind for a full resync ([`plan_tombstone_gc`]);
//!   and never above this device's own mark for the (owner, model).
//! - A device holds every change of an owner's rows up to its mark, so a row it neither holds nor
//!   remembers at or below the mark was deleted: a late copy is refused ([`decide`]), never
//!   resurrected.
//!
//! # Where the IO is
//! [`decide`], [`coalesce`] and [`plan_tombstone_gc`] are pure. The [`sql`] module reads and writes
//! inside the caller's transaction.

use std::collections::{BTreeMap, HashMap};

use lsync_hlc::{DeviceId, HlcError, HlcTime};
use lsync_protocol::StateRow;
use lsync_store::StoreError;
use lsync_watermark::StateProgress;

pub mod sql;

/// What a device holds for one id, as far as applying a received version is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Current {
    /// Nothing.
    Absent,
    /// A live row.
    Row {
        /// Its owner.
        owner: DeviceId,
        /// Its version.
        version: HlcTime,
    },
    /// A tombstone.
    Tombstone {
        /// The owner of the deleted row.
        owner: DeviceId,
        /// The version of the delete.
        version: HlcTime,
    },
}

/// What to do with a received version of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It is newer than what is held: apply it.
    Apply,
    /// It is not newer: ignore it.
    Stale,
    /// It claims a row owned by another device: reject it.
    WrongOwner {
        /// The row's established owner.
        owner: DeviceId,
    },
}

/// Decides whether `owner`'s version `version` of a row replaces what is held, given this
/// device's mark for the owner's rows of the model (`mark`: it holds every change of them up to
/// that version).
///
/// A row neither held nor remembered by a tombstone, at a version at or below the mark, was
/// deleted here and its tombstone collected since: a late copy (a re-sent batch, a stale peer's
/// page) is stale, or it would come back for good. Likewise a version at or below the mark that
/// is newer than what is held: what is held already reflects every change up to the mark, so
/// that version was superseded by a delete this copy holds no newer tombstone of.
///
/// `mark` is `None` where what arrives is authoritative whatever this device saw (a comparison
/// of rows with a peer): then only versions decide.
pub fn decide(
    current: Current,
    owner: DeviceId,
    version: HlcTime,
    mark: Option<HlcTime>,
) -> Decision {
    match current {
        Current::Absent if Some(version) <= mark => Decision::Stale,
        Current::Absent => Decision::Apply,
        Current::Row { owner: held_by, version: held }
        | Current::Tombstone { owner: held_by, version: held } => {
            if held_by != owner {
                Decision::WrongOwner { owner: held_by }
            } else if version > held && Some(version) <= mark {
                // Every change at or below the mark is reflected in what is held, so a newer
                // one is not missing here: it was superseded by a delete whose tombstone this
                // copy no longer holds (a comparison with a peer that had collected it kept
                // only an older tombstone). A late copy of it (a batch held through a catch-up,
                // a re-sent batch) would bring the row back for good.
                Decision::Stale
            } else if version > held {
                Decision::Apply
            } else {
                Decision::Stale
            }
        }
    }
}

/// The mark a comparison's page is applied against ([`decide`]'s `mark`), given this device's
/// mark for the owner's rows (`mark`) and the peer's, which the comparison raises it to
/// (`target`).
///
/// Where this device's mark is at or below the peer's, the peer applied every deletion this
/// device saw, so a row the peer holds is alive whatever this device's mark says: `None`, the
/// page decides by versions alone (a copy rolled back gets back rows it lost). Where this
/// device's mark rose above the peer's while the comparison ran (live batches from the owner),
/// the peer has not seen the deletions in between: rows it still holds at or below this
/// device's mark are refused as they would be from any late copy, or a row deleted and
/// collected here in the meantime comes back for good.
pub fn comparison_mark(mark: Option<HlcTime>, target: HlcTime) -> Option<HlcTime> {
    mark.filter(|mark| *mark > target)
}

/// The version of a local write of the owner's row: the clock's `now`, or — when the owner's
/// own mark for the model (`after`) is at or past it — just after the mark. Every change of an
/// owner's rows must be newer than the owner's mark, or peers catching up "after the mark" never
/// see it. The clock alone does not ensure it: a copy re-created (or restored) under an identity
/// whose clock once ran far ahead gets back rows stamped beyond the drift bound, which its clock
/// refuses to adopt.
pub fn local_version(now: HlcTime, after: Option<HlcTime>) -> HlcTime {
    match after {
        Some(after) if after >= now => after.successor().unwrap_or(HlcTime::MAX),
        _ => now,
    }
}

/// Keeps the newest version of each row and orders the result by primary key, the order SQLite
/// inserts fastest.
pub fn coalesce(rows: Vec<StateRow>) -> Vec<StateRow> {
    let mut newest: HashMap<uuid::Uuid, StateRow> = HashMap::with_capacity(rows.len());
    for row in rows {
        match newest.get(&row.id) {
            Some(held) if held.version >= row.version => {}
            _ => {
                newest.insert(row.id, row);
            }
        }
    }
    let mut rows: Vec<StateRow> = newest.into_values().collect();
    rows.sort_unstable_by_key(|row| row.id);
    rows
}

/// The tombstones of one (owner, model) as the garbage collector sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TombstoneGroup {
    /// Owner of the deleted rows.
    pub owner: DeviceId,
    /// Model.
    pub model: String,
    /// Newest tombstone version in the group.
    pub newest: HlcTime,
    /// Newest version among tombstones older than the retention cap, if any.
    pub aged_newest: Option<HlcTime>,
}

/// What the tombstone collector may delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TombstoneGc {
    /// Per (owner, model): delete tombstones with a version up to and including this.
    pub collect_through: Vec<(DeviceId, String, HlcTime)>,
    /// Devices that had not caught up with tombstones the cap removed: they need a full resync.
    pub resync: Vec<DeviceId>,
}

/// Decides which tombstones can go: those every paired device (not already marked for resync)
/// holds — its state ack for the (owner, model) is at least the tombstone's version — plus those
/// past the retention cap, marking the devices that had not caught up. Never above this device's
/// own mark (`own`) for the (owner, model): above it a late copy of a deleted row could still
/// arrive, older than the tombstone but newer than the mark, and only the tombstone says it is
/// dead ([`decide`] refuses such copies only at or below the mark).
pub fn plan_tombstone_gc(
    groups: &[TombstoneGroup],
    peers: &[(DeviceId, bool)],
    acks: &BTreeMap<DeviceId, StateProgress>,
    own: &StateProgress,
) -> TombstoneGc {
    let counted: Vec<DeviceId> =
        peers.iter().filter(|(_, needs_resync)| !needs_resync).map(|(device, _)| *device).collect();
    let ack = |peer: &DeviceId, group: &TombstoneGroup| {
        acks.get(peer).and_then(|progress| progress.get(group.owner, &group.model))
    };
    let mut gc = TombstoneGc::default();
    for group in groups {
        // With no peers, every tombstone is held everywhere it needs to be.
        let safe = counted
            .iter()
            .map(|peer| ack(peer, group).unwrap_or(HlcTime::ZERO))
            .min()
            .unwrap_or(group.newest)
            .min(group.newest);
        let Some(mark) = own.get(group.owner, &group.model) else { continue };
        let through = group.aged_newest.map_or(safe, |aged| aged.max(safe)).min(mark);
        if through == HlcTime::ZERO {
            continue;
        }
        gc.collect_through.push((group.owner, group.model.clone(), through));
        for peer in &counted {
            if ack(peer, group).is_none_or(|held| held < through) && !gc.resync.contains(peer) {
                gc.resync.push(*peer);
            }
        }
    }
    gc
}

/// What can go wrong writing device-owned data.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The clock refused to stamp.
    #[error(transparent)]
    Clock(#[from] HlcError),
    /// The write breaks the model's declaration.
    #[error("invalid write: {0}")]
    Invalid(String),
    /// The row belongs to another device.
    #[error("{model} {id} belongs to device {owner}; only its owner may write it")]
    NotOwner {
        /// The model.
        model: String,
        /// The row.
        id: uuid::Uuid,
        /// Its owner.
        owner: DeviceId,
    },
}

impl From<sqlx::Error> for StateError {
    fn from(error: sqlx::Error) -> Self {
        StateError::Store(error.into())
    }
}

#[cfg(test)]
mod tests {
    use lsync_protocol::StateOp;
    use uuid::Uuid;

    use super::*;

    fn device(byte: u8) -> DeviceId {
        DeviceId::from_bytes([byte; 16])
    }

    fn t(ms: u64) -> HlcTime {
        HlcTime::new(ms, 0).unwrap()
    }

    #[test]
    fn newer_versions_win_and_others_are_stale_or_rejected() {
        let owner = device(1);
        assert_eq!(decide(Current::Absent, owner, t(1), None), Decision::Apply);
        let row = Current::Row { owner, version: t(5) };
        assert_eq!(decide(row, owner, t(6), None), Decision::Apply);
        assert_eq!(decide(row, owner, t(5), None), Decision::Stale);
        assert_eq!(decide(row, owner, t(4), None), Decision::Stale);
        assert_eq!(decide(row, device(2), t(9), None), Decision::WrongOwner { owner });
        let tombstone = Current::Tombstone { owner, version: t(5) };
        assert_eq!(
            decide(tombstone, owner, t(4), None),
            Decision::Stale,
            "a replay never undoes a delete"
        );
        assert_eq!(decide(tombstone, owner, t(6), None), Decision::Apply);
    }

    #[test]
    fn a_row_missing_at_or_below_the_mark_was_deleted_and_stays_deleted() {
        let owner = device(1);
        assert_eq!(decide(Current::Absent, owner, t(5), Some(t(5))), Decision::Stale);
        assert_eq!(decide(Current::Absent, owner, t(4), Some(t(5))), Decision::Stale);
        assert_eq!(decide(Current::Absent, owner, t(6), Some(t(5))), Decision::Apply);
        let row = Current::Row { owner, version: t(2) };
        assert_eq!(decide(row, owner, t(6), Some(t(5))), Decision::Apply, "held rows update");
    }

    /// `--faults all --topology full --seed 4796` of the deterministic mode, with live batches
    /// held through a catch-up: a comparison with a peer that had collected a delete left an
    /// older tombstone here and raised the mark over the delete; a batch from before the delete,
    /// applied after, brought the row back on this device for good.
    #[test]
    fn a_version_at_or_below_the_mark_newer_than_what_is_held_was_superseded_and_is_stale() {
        let owner = device(1);
        let tombstone = Current::Tombstone { owner, version: t(2) };
        assert_eq!(decide(tombstone, owner, t(4), Some(t(6))), Decision::Stale);
        assert_eq!(decide(tombstone, owner, t(6), Some(t(6))), Decision::Stale);
        assert_eq!(decide(tombstone, owner, t(7), Some(t(6))), Decision::Apply);
        let row = Current::Row { owner, version: t(2) };
        assert_eq!(decide(row, owner, t(4), Some(t(6))), Decision::Stale);
        assert_eq!(decide(row, owner, t(4), None), Decision::Apply, "a comparison's rows apply");
    }

    /// `--faults all --topology full --seed 9376` of the deterministic mode: live batches from
    /// the owner raised this device's mark past the peer's during a comparison, a delete among
    /// them was collected here, and the comparison's page brought the row back.
    #[test]
    fn a_comparison_refuses_rows_below_a_mark_that_rose_above_the_peers() {
        let owner = device(1);
        assert_eq!(comparison_mark(Some(t(5)), t(7)), None);
        assert_eq!(comparison_mark(Some(t(7)), t(7)), None);
        assert_eq!(comparison_mark(None, t(7)), None);
        let mark = comparison_mark(Some(t(9)), t(7));
        assert_eq!(mark, Some(t(9)));
        assert_eq!(decide(Current::Absent, owner, t(6), mark), Decision::Stale);
        assert_eq!(decide(Current::Absent, owner, t(6), None), Decision::Apply);
    }

    #[test]
    fn coalescing_keeps_the_newest_version_in_key_order() {
        let row = |id: u128, ms: u64| StateRow {
            id: Uuid::from_u128(id),
            version: t(ms),
            op: StateOp::Delete,
        };
        let rows = coalesce(vec![row(2, 1), row(1, 5), row(2, 3), row(1, 4)]);
        assert_eq!(rows, vec![row(1, 5), row(2, 3)]);
    }

    #[test]
    fn tombstones_are_collected_once_every_peer_holds_them_or_past_the_cap() {
        let group = TombstoneGroup {
            owner: device(1),
            model: "entries".into(),
            newest: t(10),
            aged_newest: None,
        };
        let mut acks: BTreeMap<DeviceId, StateProgress> = BTreeMap::new();
        acks.entry(device(2)).or_default().raise(device(1), "entries", t(7));
        let peers = [(device(2), false), (device(3), false)];
        let mut own = StateProgress::default();
        own.raise(device(1), "entries", t(10));
        assert_eq!(
            plan_tombstone_gc(std::slice::from_ref(&group), &peers, &acks, &own),
            TombstoneGc::default()
        );
        acks.entry(device(3)).or_default().raise(device(1), "entries", t(20));
        let gc = plan_tombstone_gc(std::slice::from_ref(&group), &peers, &acks, &own);
        assert_eq!(gc.collect_through, [(device(1), "entries".to_owned(), t(7))]);
        assert!(gc.resync.is_empty());

        let aged = TombstoneGroup { aged_newest: Some(t(9)), ..group };
        let gc = plan_tombstone_gc(&[aged], &peers, &acks, &own);
        assert_eq!(gc.collect_through, [(device(1), "entries".to_owned(), t(9))]);
        assert_eq!(gc.resync, [device(2)]);
    }

    #[test]
    fn tombstones_above_this_devices_own_mark_stay() {
        let group = TombstoneGroup {
            owner: device(1),
            model: "entries".into(),
            newest: t(10),
            aged_newest: Some(t(9)),
        };
        let mut acks: BTreeMap<DeviceId, StateProgress> = BTreeMap::new();
        acks.entry(device(2)).or_default().raise(device(1), "entries", t(20));
        let peers = [(device(2), false)];
        let gc = plan_tombstone_gc(
            std::slice::from_ref(&group),
            &peers,
            &acks,
            &StateProgress::default(),
        );
        assert_eq!(gc, TombstoneGc::default(), "no mark: nothing is known to be complete");
        let mut own = StateProgress::default();
        own.raise(device(1), "entries", t(6));
        let gc = plan_tombstone_gc(std::slice::from_ref(&group), &peers, &acks, &own);
        assert_eq!(gc.collect_through, [(device(1), "entries".to_owned(), t(6))]);
        assert!(gc.resync.is_empty());
    }
}

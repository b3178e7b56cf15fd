//! Watermarks: how far each device has applied each origin's shared changes and each owner's
//! device-owned rows, what every peer has acknowledged, and which epoch each peer is in.
//!
//! # Model
//! - **Shared progress** ([`SharedProgress`]): per origin device, the highest *contiguous*
//!   sequence number applied — every change `1..=seq` of that origin is applied. Changes received
//!   out of order are applied too (merging commutes) but the watermark waits for the gap to close
//!   ([`advance_contiguous`]), so "changes after my watermark" never skips one.
//! - **State progress** ([`StateProgress`]): per (owner, model), the highest owner version held,
//!   raised only by transfers known to cover everything up to it (a live batch that starts at or
//!   below the current mark, or a catch-up page in version order).
//! - **Acks**: per peer, the same two maps as last reported by that peer; the minimum over all
//!   paired peers decides what the peer log and the tombstones may drop.
//! - **Epochs**: each device's copy has a random epoch. A peer announcing an epoch other than the
//!   one remembered was re-created or restored: everything remembered about it is reset
//!   ([`EpochCheck::Changed`]) instead of trusting watermarks that no longer describe it.
//!
//! Comparing two devices' watermarks gives exactly what one lacks from the other
//! ([`shared_needs`], [`state_needs`]).
//!
//! # Invariants
//! - Watermarks and acks never move backwards ([`SharedProgress::raise`] keeps the maximum; the
//!   SQL upserts keep `max(stored, new)`), except for the explicit reset of a peer whose epoch
//!   changed.
//! - A peer that never acknowledged an origin counts as having acknowledged nothing (0) — it holds
//!   pruning back.
//!
//! # Where the IO is
//! The types and functions at the top level are plain data and pure functions. The [`sql`] module
//! persists them in the `sync_progress_*`, `sync_peers` and `sync_peer_acks_*` tables, always
//! inside the caller's transaction, so a watermark commits with the data it describes.

use std::collections::BTreeMap;

use lsync_hlc::{DeviceId, HlcTime};
use lsync_protocol::{Epoch, OriginSeq, StateMark};

pub mod sql;

/// Per origin, the highest contiguous sequence number applied (absent: 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedProgress(BTreeMap<DeviceId, u64>);

impl SharedProgress {
    /// The watermark of `origin` (0 if nothing applied).
    pub fn get(&self, origin: DeviceId) -> u64 {
        self.0.get(&origin).copied().unwrap_or(0)
    }

    /// Raises `origin`'s watermark to `seq`; a lower `seq` changes nothing. Returns whether it rose.
    pub fn raise(&mut self, origin: DeviceId, seq: u64) -> bool {
        let current = self.0.entry(origin).or_insert(0);
        let rose = seq > *current;
        *current = (*current).max(seq);
        rose
    }

    /// Raises every watermark to at least `other`'s.
    pub fn raise_all(&mut self, other: &SharedProgress) {
        for (origin, seq) in other.iter() {
            self.raise(origin, seq);
        }
    }

    /// (origin, watermark) pairs in origin order, zero watermarks omitted.
    pub fn iter(&self) -> impl Iterator<Item = (DeviceId, u64)> + '_ {
        self.0.iter().filter(|(_, seq)| **seq > 0).map(|(origin, seq)| (*origin, *seq))
    }

    /// As wire entries.
    pub fn to_wire(&self) -> Vec<OriginSeq> {
        self.iter().map(|(origin, seq)| OriginSeq { origin, seq }).collect()
    }

    /// From wire entries; a repeated origin keeps its largest value.
    pub fn from_wire(entries: &[OriginSeq]) -> Self {
        let mut progress = Self::default();
        for entry in entries {
            progress.raise(entry.origin, entry.seq);
        }
        progress
    }
}

/// Per (owner, model), the highest owner version held (absent: nothing held).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateProgress(BTreeMap<(DeviceId, String), HlcTime>);

impl StateProgress {
    /// The mark of (`owner`, `model`), if any.
    pub fn get(&self, owner: DeviceId, model: &str) -> Option<HlcTime> {
        self.0.get(&(owner, model.to_owned())).copied()
    }

    /// Raises the mark to `version`; a lower one changes nothing. Returns whether it rose.
    pub fn raise(&mut self, owner: DeviceId, model: &str, version: HlcTime) -> bool {
        match self.0.get_mut(&(owner, model.to_owned())) {
            Some(current) if *current >= version => false,
            Some(current) => {
                *current = version;
                true
            }
            None => {
                self.0.insert((owner, model.to_owned()), version);
                true
            }
        }
    }

    /// (owner, model, version) triples in order.
    pub fn iter(&self) -> impl Iterator<Item = (DeviceId, &str, HlcTime)> + '_ {
        self.0.iter().map(|((owner, model), version)| (*owner, model.as_str(), *version))
    }

    /// As wire entries.
    pub fn to_wire(&self) -> Vec<StateMark> {
        self.iter()
            .map(|(owner, model, version)| StateMark { owner, model: model.to_owned(), version })
            .collect()
    }

    /// From wire entries; a repeated key keeps its largest value.
    pub fn from_wire(entries: &[StateMark]) -> Self {
        let mut progress = Self::default();
        for entry in entries {
            progress.raise(entry.owner, &entry.model, entry.version);
        }
        progress
    }
}

/// The new contiguous watermark, given the current one and the sequence numbers present above it
/// (in any order, duplicates allowed): it advances while `current + 1` is present.
pub fn advance_contiguous(current: u64, present: impl IntoIterator<Item = u64>) -> u64 {
    let mut above: Vec<u64> = present.into_iter().filter(|seq| *seq > current).collect();
    above.sort_unstable();
    above.dedup();
    let mut watermark = current;
    for seq in above {
        if seq == watermark + 1 {
            watermark = seq;
        } else {
            break;
        }
    }
    watermark
}

/// The origins where `theirs` is ahead of `mine`, each with `mine`'s watermark: "send me this
/// origin's changes after this sequence number".
pub fn shared_needs(mine: &SharedProgress, theirs: &SharedProgress) -> Vec<OriginSeq> {
    theirs
        .iter()
        .filter(|(origin, seq)| *seq > mine.get(*origin))
        .map(|(origin, _)| OriginSeq { origin, seq: mine.get(origin) })
        .collect()
}

/// The watermarks a device tells its peers (requests, responses, heartbeats, and the acks made
/// from them), from what it holds: `ready` says whether it may serve a backfill. A copy that may
/// not — a joiner still downloading, or a copy resyncing rows it may have lost (restored from an
/// old file, re-created, pushed past a peer's retention) — claims no device-owned rows: neither
/// marks nor collected marks. Its tables are between two states, and a peer would take them for
/// the owners': a comparison deletes the rows the copy lacks for now, a catch-up raises the
/// peer's mark over deletions the copy lost (the real-mode simulator found both: a peer that
/// compared with a restored copy mid-resync deleted rows everyone else then deleted too, and the
/// copy got them back). Shared progress is told as ever: a change numbered by its origin is the
/// same change wherever it is held.
pub fn told(mut watermarks: lsync_protocol::Watermarks) -> lsync_protocol::Watermarks {
    if !watermarks.ready {
        watermarks.state.clear();
        watermarks.collected.clear();
    }
    watermarks
}

/// The answer a device gives to a request for device-owned rows (a catch-up page, a backfill
/// page, the pages of a comparison) while it claims none ([`told`]: it may not serve a backfill),
/// or `None` when it answers. A request planned from watermarks told before the copy learned it
/// must resync is refused rather than answered from tables the requester would trust; it asks
/// again (or another peer) later.
pub fn refuse_rows(ready: bool) -> Option<lsync_protocol::ErrorMessage> {
    (!ready).then(|| lsync_protocol::ErrorMessage {
        code: lsync_protocol::ErrorCode::Busy,
        message: "this copy is downloading or resyncing its rows: ask again later, or another \
                  peer"
            .into(),
    })
}

/// The answer to a catch-up request for rows of one (owner, model) changed after `since`, when
/// this copy forgot deletions of it through `collected` (its collected mark now), or `None` when
/// it answers. Rows changed after `since` cannot list deletions whose tombstones are gone: a
/// requester whose mark lies below them would raise its mark over them and keep the deleted rows
/// for good. Its watermarks said nothing was forgotten when it planned the catch-up (a retention
/// cap passed, or the other peers acknowledged, since), so the request is refused; the next
/// watermarks it gets show the collected mark, and it compares rows instead
/// ([`CatchUpStep::Compare`]). The deterministic simulator found it (`--faults retention`).
pub fn refuse_rows_since(
    collected: Option<HlcTime>,
    since: Option<HlcTime>,
) -> Option<lsync_protocol::ErrorMessage> {
    (collected > since).then(|| lsync_protocol::ErrorMessage {
        code: lsync_protocol::ErrorCode::NotAvailable,
        message: "deletions after the requested mark were forgotten here (their tombstones \
                  collected): compare rows instead"
            .into(),
    })
}

/// What `mine` lacks of device-owned rows compared with `theirs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateNeed {
    /// Whose rows.
    pub owner: DeviceId,
    /// Which model.
    pub model: String,
    /// Rows with a version above this are needed (`None`: all of them).
    pub since: Option<HlcTime>,
    /// The peer may have forgotten deletions above `since` (it collected their tombstones, or its
    /// copy came from a device that had): rows changed since the mark cannot tell this device
    /// everything, so it compares all its rows of the (owner, model) with the peer's, in key
    /// order, deleting those the peer no longer holds up to the peer's mark.
    pub compare: bool,
}

/// The (owner, model) pairs where `theirs` holds newer versions than `mine`. `their_collected`
/// is the peer's [`Watermarks::collected`](lsync_protocol::Watermarks::collected): where it lies
/// above this device's mark, a catch-up by version would miss deletions, and the need is a
/// comparison ([`StateNeed::compare`]).
pub fn state_needs(
    mine: &StateProgress,
    theirs: &StateProgress,
    their_collected: &StateProgress,
) -> Vec<StateNeed> {
    theirs
        .iter()
        .filter(|(owner, model, version)| {
            mine.get(*owner, model).is_none_or(|held| held < *version)
        })
        .map(|(owner, model, _)| {
            let since = mine.get(owner, model);
            // Without a mark (`None`) this device may still hold rows of the owner (applied from
            // a live batch across a gap): rows changed since "the start" cannot tell it which of
            // them the peer forgot the deletion of either.
            let compare = their_collected.get(owner, model) > since;
            StateNeed { owner, model: model.to_owned(), since, compare }
        })
        .collect()
}

/// One step of a catch-up from a peer ([`catch_up_plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUpStep {
    /// Rows of (`owner`, `model`) changed after this device's mark `since`, in version order,
    /// up to the peer's mark `target` (raised to it when complete, never above).
    Rows {
        /// Whose rows.
        owner: DeviceId,
        /// Which model.
        model: String,
        /// This device's mark (`None`: all rows).
        since: Option<HlcTime>,
        /// The peer's mark.
        target: HlcTime,
    },
    /// All rows of (`owner`, `model`), in key order, compared with this device's: the peer forgot
    /// deletions above this device's mark (`forgotten`, its collected mark), so rows it no longer
    /// holds at or below `target` are deleted here; then the mark rises to `target` and this
    /// device's collected mark to `forgotten`.
    Compare {
        /// Whose rows.
        owner: DeviceId,
        /// Which model.
        model: String,
        /// The peer's mark.
        target: HlcTime,
        /// The peer's collected mark.
        forgotten: HlcTime,
    },
    /// Shared changes of these origins after this device's watermarks, until none is behind.
    Shared {
        /// The origins where the peer is ahead.
        origins: Vec<DeviceId>,
    },
}

/// What this device pulls from a peer whose watermarks are `theirs`, in order: device-owned rows
/// first — shared records refer to rows (tag assignments to entries), never the other way round,
/// so records that come after their rows are never parked waiting for them (the other order can
/// park more than the parking bound, and every page is then refused) — then shared changes.
/// The engine's catch-up and the deterministic simulator both follow this plan.
pub fn catch_up_plan(
    mine_shared: &SharedProgress,
    mine_state: &StateProgress,
    theirs: &lsync_protocol::Watermarks,
) -> Vec<CatchUpStep> {
    let their_state = StateProgress::from_wire(&theirs.state);
    let their_collected = StateProgress::from_wire(&theirs.collected);
    let mut plan = Vec::new();
    for need in state_needs(mine_state, &their_state, &their_collected) {
        let Some(target) = their_state.get(need.owner, &need.model) else { continue };
        let forgotten = their_collected.get(need.owner, &need.model);
        plan.push(match (need.compare, forgotten) {
            (true, Some(forgotten)) => {
                CatchUpStep::Compare { owner: need.owner, model: need.model, target, forgotten }
            }
            _ => CatchUpStep::Rows {
                owner: need.owner,
                model: need.model,
                since: need.since,
                target,
            },
        });
    }
    let shared = shared_needs(mine_shared, &SharedProgress::from_wire(&theirs.shared));
    if !shared.is_empty() {
        plan.push(CatchUpStep::Shared { origins: shared.iter().map(|need| need.origin).collect() });
    }
    plan
}

/// What an announced epoch means for what this device remembers about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochCheck {
    /// The first epoch heard from this peer: remember it.
    FirstContact,
    /// The epoch remembered: the remembered watermarks and acks still describe the peer.
    Same,
    /// A different epoch: the peer's copy was re-created or restored. Its remembered acks and
    /// watermarks are stale and must be reset; it needs a full resync of what it lacks.
    Changed {
        /// The epoch remembered until now.
        previous: Epoch,
    },
}

/// Compares an announced epoch with the remembered one.
pub fn check_epoch(remembered: Option<Epoch>, announced: Epoch) -> EpochCheck {
    match remembered {
        None => EpochCheck::FirstContact,
        Some(previous) if previous == announced => EpochCheck::Same,
        Some(previous) => EpochCheck::Changed { previous },
    }
}

/// Whether a peer fell behind this device's retention cap (`sync_peers.needs_resync`): log
/// entries pruned or tombstones collected before it had them. Such a peer is not counted for
/// pruning until it caught up again ([`caught_up_again`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resync {
    /// Not behind.
    None,
    /// Left behind by the retention cap.
    Required,
    /// Stored by earlier versions (a resync the peer had reported running); read as
    /// [`Resync::Required`] would be: left behind until it caught up again.
    Running,
}

impl Resync {
    /// The stored form (`sync_peers.needs_resync`).
    pub fn to_sql(self) -> i64 {
        match self {
            Resync::None => 0,
            Resync::Required => 1,
            Resync::Running => 2,
        }
    }

    /// From the stored form; unknown values count as [`Resync::Required`] (asking again is safe).
    pub fn from_sql(value: i64) -> Self {
        match value {
            0 => Resync::None,
            2 => Resync::Running,
            _ => Resync::Required,
        }
    }
}

/// Whether a peer left behind by this device's retention cap (log entries pruned, tombstones
/// collected before it had them: it is not counted for pruning meanwhile) has caught up again,
/// so that its acknowledgements count once more: it acknowledged every change this device no
/// longer keeps (`pruned_through`, per origin) and every deletion it no longer remembers
/// (`collected`, per (owner, model)). The peer catches up by itself — a catch-up from below a
/// pruned log brings a snapshot of the shared records, one from below a collected mark compares
/// rows — so nothing here asks it to resync.
pub fn caught_up_again(
    shared_acks: &SharedProgress,
    state_acks: &StateProgress,
    pruned_through: &SharedProgress,
    collected: &StateProgress,
) -> bool {
    pruned_through.iter().all(|(origin, seq)| shared_acks.get(origin) >= seq)
        && collected.iter().all(|(owner, model, version)| {
            state_acks.get(owner, model).is_some_and(|acked| acked >= version)
        })
}

/// Whether this device lost some of its own changes: a peer has applied more of this device's
/// origin (`peer_view`) than this device has written (`own_seq`), which happens when the device
/// is restored from an old copy. The device must then continue numbering after `peer_view`, and
/// fetch its lost changes back from the peer, so that no (origin, sequence) pair is reused for a
/// different change. Returns the sequence number to continue after.
pub fn own_rollback(own_seq: u64, peer_view: u64) -> Option<u64> {
    (peer_view > own_seq).then_some(peer_view)
}

/// Whether a peer holds more of this device's own rows than the device itself: its mark of
/// (`me`, model) in `theirs` lies above this device's own mark in `own`. Only this device writes
/// its rows, so its own mark is never below a peer's unless its file was rolled back to an
/// older copy (a backup restored with its generation file, writes since lost). Rows hold no
/// sequence numbers, so this is the rows' counterpart of [`own_rollback`]: it finds a rollback
/// that lost only row writes, before any heartbeat told the peer the file's write count.
pub fn own_rows_rolled_back(me: DeviceId, own: &StateProgress, theirs: &[StateMark]) -> bool {
    theirs
        .iter()
        .filter(|mark| mark.owner == me)
        .any(|mark| own.get(me, &mark.model).is_none_or(|held| mark.version > held))
}

/// What this file knows of one of its device's incarnations (`sync_incarnations`): `None`,
/// not one of its own (the file never ran it); `Some(None)`, one still running; `Some(Some(n))`,
/// one that ended here at write count `n`.
pub type IncarnationEnd = Option<Option<u64>>;

/// Whether a peer's view of this device — its incarnation `seen.origin` at write count
/// `seen.seq` ([`Watermarks::seen`](lsync_protocol::Watermarks::seen)) — shows the file rolled back to an older copy: the
/// incarnation is not one of the file's (`known` is `None`), or it ended here with fewer writes
/// than the peer saw. The current incarnation (`current`, this run's) never is. The engine's
/// handlers and the deterministic simulator both decide with this.
pub fn copy_rolled_back(current: DeviceId, seen: OriginSeq, known: IncarnationEnd) -> bool {
    if seen.origin == current {
        return false;
    }
    match known {
        None => true,
        Some(None) => false,
        Some(Some(last)) => seen.seq > last,
    }
}

/// What to remember of `peer`'s copy after it announced `announced` (its incarnation and write
/// count, [`Watermarks::incarnation`](lsync_protocol::Watermarks::incarnation)) when `before` was remembered: `None` keeps `before`.
/// The write count only grows within one incarnation. `told`: the caller tells `before` back (a
/// watermark request); a heartbeat does not, and so only raises the write count of the same
/// incarnation — a new one replacing the old there would lose what the peer must hear (its copy
/// was restored or re-created, and this device heard more of the old one).
pub fn seen_after(
    before: Option<OriginSeq>,
    announced: Option<OriginSeq>,
    told: bool,
) -> Option<OriginSeq> {
    let announced = announced?;
    match before {
        Some(before) if before.origin == announced.origin => {
            Some(OriginSeq { origin: announced.origin, seq: before.seq.max(announced.seq) })
        }
        Some(_) if !told => None,
        _ => Some(announced),
    }
}

/// The lowest acknowledgement of `origin` over `peers`: a peer with no ack counts as 0.
pub fn min_ack(
    acks: &BTreeMap<DeviceId, SharedProgress>,
    peers: &[DeviceId],
    origin: DeviceId,
) -> u64 {
    peers
        .iter()
        .map(|peer| acks.get(peer).map_or(0, |progress| progress.get(origin)))
        .min()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(byte: u8) -> DeviceId {
        DeviceId::from_bytes([byte; 16])
    }

    #[test]
    fn a_peer_left_behind_counts_again_once_it_acknowledged_what_was_dropped() {
        let t = |ms| HlcTime::new(ms, 0).unwrap();
        let pruned = SharedProgress::from_wire(&[OriginSeq { origin: device(1), seq: 20 }]);
        let mut collected = StateProgress::default();
        collected.raise(device(1), "entries", t(50));
        let mut shared = SharedProgress::from_wire(&[OriginSeq { origin: device(1), seq: 19 }]);
        let mut state = StateProgress::default();
        state.raise(device(1), "entries", t(60));
        assert!(!caught_up_again(&shared, &state, &pruned, &collected), "a pruned change lacks");
        shared.raise(device(1), 20);
        assert!(caught_up_again(&shared, &state, &pruned, &collected));
        let behind = StateProgress::default();
        assert!(!caught_up_again(&shared, &behind, &pruned, &collected), "a deletion lacks");
        assert!(caught_up_again(
            &SharedProgress::default(),
            &StateProgress::default(),
            &SharedProgress::default(),
            &StateProgress::default()
        ));
        for state in [Resync::None, Resync::Required, Resync::Running] {
            assert_eq!(Resync::from_sql(state.to_sql()), state);
        }
    }

    #[test]
    fn contiguous_watermark_waits_for_gaps() {
        assert_eq!(advance_contiguous(0, [1, 2, 3]), 3);
        assert_eq!(advance_contiguous(0, [2, 3]), 0);
        assert_eq!(advance_contiguous(3, [5, 4, 4, 7]), 5);
        assert_eq!(advance_contiguous(3, [1, 2, 3]), 3);
        assert_eq!(advance_contiguous(0, []), 0);
    }

    #[test]
    fn progress_never_moves_backwards() {
        let mut progress = SharedProgress::default();
        assert!(progress.raise(device(1), 5));
        assert!(!progress.raise(device(1), 3));
        assert_eq!(progress.get(device(1)), 5);
        let mut state = StateProgress::default();
        let t = |ms| HlcTime::new(ms, 0).unwrap();
        assert!(state.raise(device(1), "entries", t(5)));
        assert!(!state.raise(device(1), "entries", t(4)));
        assert_eq!(state.get(device(1), "entries"), Some(t(5)));
    }

    #[test]
    fn needs_are_exactly_what_the_other_side_has_more_of() {
        let mine = SharedProgress::from_wire(&[
            OriginSeq { origin: device(1), seq: 5 },
            OriginSeq { origin: device(2), seq: 9 },
        ]);
        let theirs = SharedProgress::from_wire(&[
            OriginSeq { origin: device(1), seq: 7 },
            OriginSeq { origin: device(2), seq: 9 },
            OriginSeq { origin: device(3), seq: 2 },
        ]);
        assert_eq!(
            shared_needs(&mine, &theirs),
            [OriginSeq { origin: device(1), seq: 5 }, OriginSeq { origin: device(3), seq: 0 }]
        );
        assert!(shared_needs(&theirs, &mine).is_empty());

        let t = |ms| HlcTime::new(ms, 0).unwrap();
        let mut mine = StateProgress::default();
        mine.raise(device(1), "entries", t(10));
        let mut theirs = StateProgress::default();
        theirs.raise(device(1), "entries", t(12));
        theirs.raise(device(2), "entries", t(3));
        theirs.raise(device(1), "volumes", t(1));
        let needs = state_needs(&mine, &theirs, &StateProgress::default());
        assert_eq!(needs.len(), 3);
        assert_eq!(
            needs[0],
            StateNeed {
                owner: device(1),
                model: "entries".into(),
                since: Some(t(10)),
                compare: false
            }
        );
        assert!(needs.iter().any(|need| need.owner == device(2) && need.since.is_none()));
    }

    #[test]
    fn a_peer_that_forgot_deletions_above_my_mark_is_compared_with_not_caught_up_from() {
        let t = |ms| HlcTime::new(ms, 0).unwrap();
        let mut mine = StateProgress::default();
        mine.raise(device(1), "entries", t(10));
        let mut theirs = StateProgress::default();
        theirs.raise(device(1), "entries", t(20));
        theirs.raise(device(2), "entries", t(20));
        let mut collected = StateProgress::default();
        // Forgotten above my mark: compare. No mark here of device 2 (rows of it may still be
        // held, applied from a live batch across a gap): compare too.
        collected.raise(device(1), "entries", t(11));
        collected.raise(device(2), "entries", t(15));
        let needs = state_needs(&mine, &theirs, &collected);
        assert!(needs.iter().any(|need| need.owner == device(1) && need.compare));
        assert!(needs.iter().any(|need| need.owner == device(2) && need.compare));
        // Forgotten only at or below my mark: a catch-up by version misses nothing.
        let mut collected = StateProgress::default();
        collected.raise(device(1), "entries", t(10));
        assert!(state_needs(&mine, &theirs, &collected).iter().all(|need| !need.compare));
    }

    #[test]
    fn a_catch_up_takes_rows_first_then_shared_changes_and_compares_where_deletions_were_forgotten()
    {
        let t = |ms| HlcTime::new(ms, 0).unwrap();
        let mut mine_state = StateProgress::default();
        mine_state.raise(device(1), "entries", t(10));
        let mine_shared = SharedProgress::from_wire(&[OriginSeq { origin: device(1), seq: 3 }]);
        let theirs = lsync_protocol::Watermarks {
            library: lsync_protocol::LibraryId(uuid::Uuid::nil()),
            device: device(9),
            epoch: Epoch(1),
            shared: vec![OriginSeq { origin: device(1), seq: 5 }],
            state: vec![
                StateMark { owner: device(1), model: "entries".into(), version: t(20) },
                StateMark { owner: device(2), model: "entries".into(), version: t(7) },
            ],
            ready: true,
            resync: false,
            collected: vec![StateMark {
                owner: device(1),
                model: "entries".into(),
                version: t(15),
            }],
            incarnation: None,
            seen: None,
            wall_ms: None,
        };
        let plan = catch_up_plan(&mine_shared, &mine_state, &theirs);
        assert_eq!(plan.len(), 3, "{plan:?}");
        assert!(matches!(&plan[0], CatchUpStep::Compare { owner, target, forgotten, .. }
            if *owner == device(1) && *target == t(20) && *forgotten == t(15)));
        assert!(
            matches!(&plan[1], CatchUpStep::Rows { owner, since: None, .. } if *owner == device(2))
        );
        assert_eq!(plan[2], CatchUpStep::Shared { origins: vec![device(1)] });
        // Without a mark this device may still hold rows of the owner (from a live batch across
        // a gap): a peer that forgot deletions makes it compare too, and refuses rows since
        // "the start", as it refuses them since any mark below what it forgot.
        let plan = catch_up_plan(&mine_shared, &StateProgress::default(), &theirs);
        assert!(matches!(&plan[0], CatchUpStep::Compare { owner, .. } if *owner == device(1)));
        assert!(refuse_rows_since(Some(t(15)), None).is_some());
        assert!(refuse_rows_since(Some(t(15)), Some(t(10))).is_some());
        assert!(refuse_rows_since(Some(t(15)), Some(t(15))).is_none());
        assert!(refuse_rows_since(None, None).is_none());
    }

    #[test]
    fn a_copy_that_may_not_serve_claims_no_rows_and_refuses_row_requests() {
        let mark = |owner| StateMark {
            owner: device(owner),
            model: "entries".into(),
            version: HlcTime::new(5, 0).unwrap(),
        };
        let watermarks = |ready| lsync_protocol::Watermarks {
            library: lsync_protocol::LibraryId(uuid::Uuid::nil()),
            device: device(1),
            epoch: Epoch(1),
            shared: vec![OriginSeq { origin: device(2), seq: 3 }],
            state: vec![mark(1), mark(2)],
            ready,
            resync: false,
            collected: vec![mark(2)],
            incarnation: None,
            seen: None,
            wall_ms: None,
        };
        assert_eq!(told(watermarks(true)), watermarks(true));
        let resyncing = told(watermarks(false));
        assert!(resyncing.state.is_empty() && resyncing.collected.is_empty());
        assert_eq!(resyncing.shared, watermarks(false).shared, "shared progress is told");
        assert_eq!(refuse_rows(true), None);
        assert_eq!(
            refuse_rows(false).map(|error| error.code),
            Some(lsync_protocol::ErrorCode::Busy)
        );
    }

    #[test]
    fn epochs() {
        assert_eq!(check_epoch(None, Epoch(1)), EpochCheck::FirstContact);
        assert_eq!(check_epoch(Some(Epoch(1)), Epoch(1)), EpochCheck::Same);
        assert_eq!(
            check_epoch(Some(Epoch(1)), Epoch(2)),
            EpochCheck::Changed { previous: Epoch(1) }
        );
    }

    #[test]
    fn rollback_is_detected_from_a_peers_view_of_my_origin() {
        assert_eq!(own_rollback(10, 10), None);
        assert_eq!(own_rollback(10, 8), None);
        assert_eq!(own_rollback(7, 10), Some(10));
    }

    #[test]
    fn a_peer_without_acks_holds_the_minimum_at_zero() {
        let mut acks = BTreeMap::new();
        acks.insert(
            device(2),
            SharedProgress::from_wire(&[OriginSeq { origin: device(1), seq: 9 }]),
        );
        assert_eq!(min_ack(&acks, &[device(2)], device(1)), 9);
        assert_eq!(min_ack(&acks, &[device(2), device(3)], device(1)), 0);
        assert_eq!(min_ack(&acks, &[], device(1)), u64::MAX);
    }

    #[test]
    fn a_copy_is_rolled_back_when_a_peer_saw_an_incarnation_it_lacks_or_more_writes_of_one() {
        let (current, old) = (device(1), device(2));
        let seen = |origin, seq| OriginSeq { origin, seq };
        // This run's own incarnation never shows a rollback.
        assert!(!copy_rolled_back(current, seen(current, 99), None));
        // An incarnation the file never ran: the file is older than that run.
        assert!(copy_rolled_back(current, seen(old, 1), None));
        // One still open (not ended at a known count) cannot be judged.
        assert!(!copy_rolled_back(current, seen(old, 50), Some(None)));
        // One that ended here at 10 writes: the peer saw 11, so the file lost one.
        assert!(copy_rolled_back(current, seen(old, 11), Some(Some(10))));
        assert!(!copy_rolled_back(current, seen(old, 10), Some(Some(10))));
    }

    #[test]
    fn what_is_remembered_of_a_peer_only_grows_and_a_heartbeat_never_replaces_an_incarnation() {
        let seen = |byte, seq| Some(OriginSeq { origin: device(byte), seq });
        assert_eq!(seen_after(None, None, true), None);
        assert_eq!(seen_after(None, seen(1, 5), false), seen(1, 5));
        // Within one incarnation the write count only grows, however it is told.
        assert_eq!(seen_after(seen(1, 5), seen(1, 3), true), seen(1, 5));
        assert_eq!(seen_after(seen(1, 5), seen(1, 8), false), seen(1, 8));
        // A new incarnation replaces the old only when the old one is told back.
        assert_eq!(seen_after(seen(1, 5), seen(2, 1), false), None);
        assert_eq!(seen_after(seen(1, 5), seen(2, 1), true), seen(2, 1));
    }

    #[test]
    fn a_peer_holding_more_of_a_devices_own_rows_than_the_device_shows_a_rollback() {
        let (me, other) = (device(1), device(2));
        let time = |ms| HlcTime::new(ms, 0).unwrap();
        let mark = |owner, ms| StateMark { owner, model: "entries".into(), version: time(ms) };
        let mut own = StateProgress::default();
        own.raise(me, "entries", time(10));
        assert!(!own_rows_rolled_back(me, &own, &[mark(me, 10)]));
        assert!(!own_rows_rolled_back(me, &own, &[mark(me, 9), mark(other, 50)]));
        assert!(own_rows_rolled_back(me, &own, &[mark(me, 11)]));
        // A model this copy holds no mark of at all, while the peer does.
        let other_model = StateMark { owner: me, model: "volumes".into(), version: time(1) };
        assert!(own_rows_rolled_back(me, &own, &[other_model]));
    }
}

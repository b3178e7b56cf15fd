//! The peer log: every shared change this device made or received, kept until every paired device
//! has it, so that any peer can serve any origin's changes (relay) and a returning peer catches up
//! without gaps.
//!
//! # Model
//! - Entries are keyed by (origin, sequence). An origin numbers its changes 1, 2, 3… without gaps;
//!   receiving the same change twice stores it once.
//! - A change may be pruned once every paired device has acknowledged it (the minimum ack over all
//!   peers, a peer that never acked counting as 0) and this device has applied it contiguously.
//! - A retention cap bounds the log anyway: entries older than `max_age`, or more than
//!   `max_entries_per_origin` behind an origin's newest, are pruned even if unacknowledged, and the
//!   devices that had not acknowledged them are marked as needing a full resync (they no longer
//!   hold pruning back and will receive a snapshot instead).
//!
//! # Invariants
//! - Nothing is pruned above this device's own contiguous watermark, so gaps can still close.
//! - Without the retention cap, nothing is pruned that a paired device (not marked for resync)
//!   has not acknowledged.
//! - Serving catch-up never skips: per origin, changes come in sequence order from the requested
//!   point, and an origin whose wanted changes were pruned is reported as such, never silently
//!   served from a later point.
//!
//! # Where the IO is
//! [`plan_prune`] is a pure function of the log's shape, the acks and the policy. The [`sql`]
//! module reads and writes `sync_peer_log` inside the caller's transaction.

use std::collections::BTreeMap;
use std::time::Duration;

use lsync_hlc::DeviceId;
use lsync_protocol::OriginSeq;
use lsync_watermark::SharedProgress;

pub mod sql;

/// How long and how much the log keeps for devices that do not acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Entries logged longer ago than this are pruned even if unacknowledged. Default 30 days: a
    /// device offline for a month backfills instead of replaying a month of changes.
    pub max_age: Duration,
    /// At most this many entries are kept per origin. Default 1,000,000: about 100 MB of log
    /// for one origin, and a snapshot is cheaper than replaying more.
    pub max_entries_per_origin: u64,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self { max_age: Duration::from_secs(30 * 24 * 3600), max_entries_per_origin: 1_000_000 }
    }
}

/// The shape of one origin's entries in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginLog {
    /// The origin.
    pub origin: DeviceId,
    /// Lowest sequence number held.
    pub first_seq: u64,
    /// Highest sequence number held.
    pub last_seq: u64,
    /// Highest sequence number logged before the age cutoff, if any.
    pub aged_out_through: Option<u64>,
}

/// A paired device as the pruner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunePeer {
    /// The device.
    pub device: DeviceId,
    /// Already marked as needing a full resync: it no longer holds pruning back.
    pub needs_resync: bool,
}

/// What to prune.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrunePlan {
    /// Per origin: delete entries with a sequence number up to and including this.
    pub prune_through: Vec<OriginSeq>,
    /// Devices that lose entries they had not acknowledged: mark them as needing a full resync.
    pub resync: Vec<DeviceId>,
}

/// Decides what may be pruned: per origin, everything every peer acknowledged (and this device
/// applied contiguously), extended by the retention cap, marking the devices the cap leaves
/// behind.
pub fn plan_prune(
    logs: &[OriginLog],
    own: &SharedProgress,
    peers: &[PrunePeer],
    acks: &BTreeMap<DeviceId, SharedProgress>,
    policy: &RetentionPolicy,
) -> PrunePlan {
    let counted: Vec<DeviceId> =
        peers.iter().filter(|peer| !peer.needs_resync).map(|peer| peer.device).collect();
    let ack = |peer: DeviceId, origin: DeviceId| acks.get(&peer).map_or(0, |p| p.get(origin));
    let mut plan = PrunePlan::default();
    for log in logs {
        let applied = own.get(log.origin);
        let safe = lsync_watermark::min_ack(acks, &counted, log.origin).min(applied);
        let forced = log
            .aged_out_through
            .unwrap_or(0)
            .max(log.last_seq.saturating_sub(policy.max_entries_per_origin))
            .min(applied);
        let through = safe.max(forced);
        if through < log.first_seq {
            continue;
        }
        plan.prune_through.push(OriginSeq { origin: log.origin, seq: through });
        for peer in &counted {
            if ack(*peer, log.origin) < through && !plan.resync.contains(peer) {
                plan.resync.push(*peer);
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(byte: u8) -> DeviceId {
        DeviceId::from_bytes([byte; 16])
    }

    fn progress(entries: &[(u8, u64)]) -> SharedProgress {
        SharedProgress::from_wire(
            &entries
                .iter()
                .map(|(origin, seq)| OriginSeq { origin: device(*origin), seq: *seq })
                .collect::<Vec<_>>(),
        )
    }

    fn log(origin: u8, first_seq: u64, last_seq: u64) -> OriginLog {
        OriginLog { origin: device(origin), first_seq, last_seq, aged_out_through: None }
    }

    fn peer(byte: u8) -> PrunePeer {
        PrunePeer { device: device(byte), needs_resync: false }
    }

    /// Runs the planner with `acks` as (peer, origin, seq) triples.
    fn check(
        logs: &[OriginLog],
        own: &[(u8, u64)],
        peers: &[PrunePeer],
        acks: &[(u8, u8, u64)],
        expected: PrunePlan,
    ) {
        let mut by_peer: BTreeMap<DeviceId, SharedProgress> = BTreeMap::new();
        for (peer, origin, seq) in acks {
            by_peer.entry(device(*peer)).or_default().raise(device(*origin), *seq);
        }
        let policy =
            RetentionPolicy { max_age: Duration::from_secs(60), max_entries_per_origin: 100 };
        assert_eq!(plan_prune(logs, &progress(own), peers, &by_peer, &policy), expected);
    }

    fn through(origin: u8, seq: u64) -> OriginSeq {
        OriginSeq { origin: device(origin), seq }
    }

    #[test]
    fn prunes_what_every_peer_acknowledged() {
        check(
            &[log(1, 1, 10)],
            &[(1, 10)],
            &[peer(2), peer(3)],
            &[(2, 1, 8), (3, 1, 6)],
            PrunePlan { prune_through: vec![through(1, 6)], resync: vec![] },
        );
    }

    #[test]
    fn a_peer_that_never_acknowledged_holds_pruning_back() {
        check(
            &[log(1, 1, 10)],
            &[(1, 10)],
            &[peer(2), peer(3)],
            &[(2, 1, 8)],
            PrunePlan::default(),
        );
    }

    #[test]
    fn never_prunes_above_the_own_contiguous_watermark() {
        check(
            &[log(1, 1, 10)],
            &[(1, 4)],
            &[peer(2)],
            &[(2, 1, 9)],
            PrunePlan { prune_through: vec![through(1, 4)], resync: vec![] },
        );
    }

    #[test]
    fn a_peer_marked_for_resync_no_longer_holds_pruning_back() {
        check(
            &[log(1, 1, 10)],
            &[(1, 10)],
            &[peer(2), PrunePeer { device: device(3), needs_resync: true }],
            &[(2, 1, 10)],
            PrunePlan { prune_through: vec![through(1, 10)], resync: vec![] },
        );
    }

    #[test]
    fn the_retention_cap_prunes_anyway_and_marks_the_laggards() {
        // Entries through 7 are older than max_age; peer 3 acknowledged only 2.
        let aged = OriginLog { aged_out_through: Some(7), ..log(1, 1, 10) };
        check(
            &[aged],
            &[(1, 10)],
            &[peer(2), peer(3)],
            &[(2, 1, 9), (3, 1, 2)],
            PrunePlan { prune_through: vec![through(1, 7)], resync: vec![device(3)] },
        );
        // More than 100 entries behind the newest.
        check(
            &[log(1, 1, 250)],
            &[(1, 250)],
            &[peer(2)],
            &[(2, 1, 5)],
            PrunePlan { prune_through: vec![through(1, 150)], resync: vec![device(2)] },
        );
    }

    #[test]
    fn without_peers_everything_applied_can_go() {
        check(
            &[log(1, 1, 10)],
            &[(1, 10)],
            &[],
            &[],
            PrunePlan { prune_through: vec![through(1, 10)], resync: vec![] },
        );
    }
}

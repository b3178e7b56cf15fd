//! What commands answer, as plain serializable data: the same values travel over the control
//! endpoint, are printed as JSON with `--json`, and are rendered for people by `output`.

use std::collections::BTreeMap;

use lsync_hlc::DeviceId;
use lsync_node::{BackfillProgress, Status, SyncState};
use serde::{Deserialize, Serialize};

use crate::index::Counts;

/// The answer of a request to a device.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub(crate) enum Reply {
    Status(Box<StatusView>),
    Peers(PeersView),
    Invitation(InvitationView),
    Joined(JoinedView),
    Unpaired(UnpairedView),
    Indexed(IndexReport),
    Edited(EditReport),
}

/// `lsync status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct StatusView {
    pub(crate) library: String,
    pub(crate) device: String,
    /// This device's name (configuration `device_name`).
    pub(crate) name: String,
    /// Whether a node runs for the device (`lsync run`); without one, only what the library file
    /// holds is known.
    pub(crate) running: bool,
    /// `running`, `disabled` or `not started`.
    pub(crate) sync: String,
    /// The copy's state: `uninitialized` (waiting to backfill), `backfilling`, `catching-up`,
    /// `ready` or `paused`.
    pub(crate) state: String,
    /// Whether this device holds a complete copy (its watermarks say so).
    pub(crate) ready: bool,
    /// The backfill: where it stands while one runs, what it did once finished in this run.
    pub(crate) backfill: BackfillView,
    /// Where the node accepts sync connections, when it runs.
    pub(crate) listen: Option<String>,
    pub(crate) peers: Vec<PeerStatusView>,
    /// Shared changes applied, per origin device.
    pub(crate) shared_watermarks: Vec<SharedMarkView>,
    /// Device-owned rows held, per owner and model.
    pub(crate) state_watermarks: Vec<StateMarkView>,
    /// Entries in the peer log.
    pub(crate) log_entries: u64,
    /// Shared records waiting for a row they reference.
    pub(crate) parked: u64,
    /// Messages awaiting acknowledgement or retry.
    pub(crate) retry_queue: usize,
    /// Local rows and changes waiting in the batching window.
    pub(crate) pending_batch_rows: usize,
    /// How far the clock runs ahead of the wall clock, in milliseconds.
    pub(crate) clock_lead_ms: u64,
    /// Batches sent since the node started (each peer counted).
    pub(crate) batches_sent: u64,
    /// Batches sent again since the node started.
    pub(crate) retries: u64,
    /// Shared changes whose stamps ran ahead of this device's clock beyond the drift bound
    /// since the node started (non-zero: some peer's clock is wrong).
    pub(crate) skewed_changes: u64,
}

/// A backfill's progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct BackfillView {
    pub(crate) phase: String,
    /// The device it fetches from.
    pub(crate) peer: Option<String>,
    pub(crate) peer_name: Option<String>,
    /// Per step (shared records, then each owner's models): rows done and estimated.
    pub(crate) steps: Vec<BackfillStepView>,
    pub(crate) done: u64,
    /// Estimated rows over all steps (steps not started yet count 0 until their first page).
    pub(crate) total: u64,
    /// Rows per second in this run.
    pub(crate) rate: f64,
    /// Estimated seconds left, once a rate is known.
    pub(crate) eta_secs: Option<f64>,
}

/// One step of a backfill.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BackfillStepView {
    pub(crate) step: String,
    pub(crate) done: u64,
    pub(crate) total: u64,
}

impl BackfillView {
    pub(crate) fn new(progress: &BackfillProgress, names: &BTreeMap<DeviceId, String>) -> Self {
        BackfillView {
            phase: progress.phase.to_string(),
            peer: progress.peer.map(|peer| peer.to_string()),
            peer_name: progress.peer.and_then(|peer| names.get(&peer).cloned()),
            steps: progress
                .steps
                .iter()
                .map(|(step, done, total)| BackfillStepView {
                    step: step.clone(),
                    done: *done,
                    total: *total,
                })
                .collect(),
            done: progress.done,
            total: progress.total,
            rate: progress.rate,
            eta_secs: progress.eta_secs,
        }
    }
}

/// One paired device in `lsync status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct PeerStatusView {
    pub(crate) device: String,
    pub(crate) name: String,
    pub(crate) online: bool,
    /// When it was last connected, milliseconds since the Unix epoch.
    pub(crate) last_seen_ms: Option<u64>,
    /// The last measured round trip, in milliseconds.
    pub(crate) rtt_ms: Option<f64>,
    /// This device's own shared changes it has not acknowledged.
    pub(crate) lag: u64,
    /// How far (ms of row versions) its acknowledgement of this device's rows trails the newest
    /// of them; absent when it acknowledged none.
    pub(crate) rows_lag_ms: Option<u64>,
    /// Left behind by this device's retention cap (not counted for pruning until caught up).
    pub(crate) needs_resync: bool,
    /// Its wall clock minus this device's, in milliseconds (last watermark exchange).
    pub(crate) clock_offset_ms: Option<i64>,
    /// What it acknowledged of shared changes, per origin.
    pub(crate) acked_shared: Vec<SharedMarkView>,
}

/// A shared-change watermark.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SharedMarkView {
    pub(crate) origin: String,
    pub(crate) origin_name: Option<String>,
    pub(crate) seq: u64,
}

/// A device-owned-row watermark.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct StateMarkView {
    pub(crate) owner: String,
    pub(crate) owner_name: Option<String>,
    pub(crate) model: String,
    /// The owner's version held: its clock's physical time, ms since the Unix epoch.
    pub(crate) version_ms: u64,
}

impl StatusView {
    /// The view of `status`, with device names from `names`.
    pub(crate) fn new(
        status: &Status,
        name: String,
        running: bool,
        listen: Option<String>,
        names: &BTreeMap<DeviceId, String>,
    ) -> Self {
        let shared = |marks: &[lsync_protocol::OriginSeq]| {
            marks
                .iter()
                .map(|mark| SharedMarkView {
                    origin: mark.origin.to_string(),
                    origin_name: names.get(&mark.origin).cloned(),
                    seq: mark.seq,
                })
                .collect::<Vec<_>>()
        };
        StatusView {
            library: status.library.to_string(),
            device: status.device.to_string(),
            name,
            running,
            sync: match status.sync {
                SyncState::Running => "running",
                SyncState::Disabled => "disabled",
                SyncState::NotStarted => "not started",
            }
            .to_owned(),
            state: status.backfill.phase.to_string(),
            ready: status.watermarks.ready,
            backfill: BackfillView::new(&status.backfill, names),
            listen,
            peers: status
                .peers
                .iter()
                .map(|peer| PeerStatusView {
                    device: peer.device.to_string(),
                    name: peer.name.clone(),
                    online: peer.online,
                    last_seen_ms: peer.last_seen_ms,
                    rtt_ms: peer.rtt_us.map(|us| us as f64 / 1_000.0),
                    lag: peer.lag,
                    rows_lag_ms: peer.rows_lag_ms,
                    needs_resync: peer.needs_resync,
                    clock_offset_ms: peer.clock_offset_ms,
                    acked_shared: shared(&peer.acked_shared),
                })
                .collect(),
            shared_watermarks: shared(&status.watermarks.shared),
            state_watermarks: status
                .watermarks
                .state
                .iter()
                .map(|mark| StateMarkView {
                    owner: mark.owner.to_string(),
                    owner_name: names.get(&mark.owner).cloned(),
                    model: mark.model.clone(),
                    version_ms: mark.version.physical_ms(),
                })
                .collect(),
            log_entries: status.log_entries,
            parked: status.parked,
            retry_queue: status.retry_queue,
            pending_batch_rows: status.pending_batch_rows,
            clock_lead_ms: status.clock_lead_ms,
            batches_sent: status.batches_sent,
            retries: status.retries,
            skewed_changes: status.skewed_changes,
        }
    }
}

/// `lsync peers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PeersView {
    pub(crate) running: bool,
    pub(crate) peers: Vec<PeerView>,
}

/// One paired device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PeerView {
    pub(crate) device: String,
    pub(crate) name: String,
    /// Connected now (always false when the node does not run).
    pub(crate) online: bool,
    /// Where it was last reached (most recent first).
    pub(crate) addresses: Vec<String>,
    /// When it was last connected, milliseconds since the Unix epoch.
    pub(crate) last_seen_ms: Option<u64>,
}

/// `lsync invite`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct InvitationView {
    /// The single-use token to pass to `lsync join`.
    pub(crate) token: String,
    /// When it expires, milliseconds since the Unix epoch.
    pub(crate) expires_at_ms: u64,
    /// Where the joining device will look for this one.
    pub(crate) addresses: Vec<String>,
}

/// `lsync join`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct JoinedView {
    pub(crate) library: String,
    /// This device.
    pub(crate) device: String,
    /// Whether this command created the device.
    pub(crate) created: bool,
    /// The device that invited.
    pub(crate) peer: String,
    pub(crate) peer_name: String,
    /// Whether a node runs for the device (it then connects to the peer at once).
    pub(crate) running: bool,
}

/// `lsync unpair`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct UnpairedView {
    pub(crate) device: String,
    pub(crate) name: String,
}

/// `lsync location add|rescan|remove`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct IndexReport {
    /// `added`, `rescanned` or `removed`.
    pub(crate) action: String,
    pub(crate) location: String,
    pub(crate) path: String,
    #[serde(flatten)]
    pub(crate) counts: Counts,
    /// Symbolic links, special files and names that are not UTF-8, not indexed.
    pub(crate) skipped: u64,
    /// Folders that could not be read (their indexed content was kept).
    pub(crate) unreadable: Vec<String>,
    /// Time spent walking the folder.
    pub(crate) scan_ms: u64,
    /// Time spent writing the index.
    pub(crate) write_ms: u64,
}

/// A change to shared data (tags, albums, metadata).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct EditReport {
    /// What was done, for people.
    pub(crate) message: String,
    /// The model of the record created, changed or deleted.
    pub(crate) model: String,
    /// Its id.
    pub(crate) id: String,
    /// Whether anything changed (false: it already was so).
    pub(crate) changed: bool,
}

//! Real mode: every peer is the real engine — an [`lsync_node::Library`] with its own SQLite
//! file, a QUIC transport on 127.0.0.1, the engine's actors — driven by a seeded workload under
//! scheduled faults, then healed and checked.
//!
//! The run: create the peers and pair every two of them by invitation; each peer indexes a file
//! tree (about a third of the operations, in bulk writes); then edits, moves, subtree deletes,
//! tags, albums, assignments, metadata and conflicting edits from random peers. Faults happen at
//! fixed points of the operation count (the peers they hit are drawn from the seed): a partition
//! between two peers, a peer killed and restarted from its files, a peer going offline while it
//! keeps writing, a new device joining, a wall clock stepping back; clocks are skewed from the
//! start and a share of batches is lost on the wire. At the end every fault is healed, the
//! simulator waits (on events) until every peer holds the same tables, and checks them against the
//! tables the workload expects from its own record of acknowledged writes.
//!
//! A killed peer has its links cut on both sides, then its library is aborted
//! (`Library::abort`: the engine stops where it stands, nothing is flushed, no checkpoint), so
//! nothing it still held in memory (batches in the window, re-send queues) reaches anyone: to the
//! others it vanished. A process dying in the middle of a SQLite commit is not simulated; SQLite's atomic
//! commit is trusted for that.

mod peer;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use lsync_node::config::SyncConfig;
use lsync_node::{Event, LibraryError};
use lsync_protocol::{LibraryId, Value};
use lsync_shared_sync::SharedError;
use lsync_store::{Registry, dump_tables, reference_registry};
use lsync_transport::SplitMix64;
use uuid::Uuid;

use crate::{Faults, Topology};
use peer::{Peer, pair};
use workload::{Op, Workload};

/// The longest the simulator waits for convergence after healing: far beyond what a healthy run
/// needs (seconds), short enough that a stuck run ends.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Share of the operations spent indexing file trees in bulk, in percent.
const INDEXING_PERCENT: u64 = 35;
/// Rows per bulk indexing write: one transaction each, as an indexer would commit.
const INDEX_CHUNK: u64 = 500;
/// The least wall time between two scheduled faults while operations remain, so that a fault
/// lasts long enough to matter (several heartbeats, a stale timeout's worth of writes) even when
/// bulk indexing runs through its share of operations in a fraction of a second.
pub const MIN_FAULT_GAP: Duration = Duration::from_secs(1);
/// How often peers' status (log size, lag) is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The shape of a real run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealConfig {
    /// Devices at the start (a joining device comes on top).
    pub peers: usize,
    /// Write operations (rows and shared edits): at least this many; the workload goes on until
    /// every scheduled fault has happened, at least [`MIN_FAULT_GAP`] apart.
    pub ops: u64,
    /// The seed of the workload and the fault schedule.
    pub seed: u64,
    /// Faults injected.
    pub faults: Faults,
    /// Who is paired with whom (a joining device pairs with its neighbours in it).
    pub topology: Topology,
    /// Where to leave the peers' files (`DIR/peer-<i>/`); a temporary folder otherwise.
    pub keep: Option<PathBuf>,
}

/// Why a real run could not be carried out (as opposed to not converging).
#[derive(Debug)]
pub enum SimError {
    /// Setting up or restarting a peer failed.
    Setup(String),
    /// A write the workload expected to succeed failed.
    Write(String),
}

impl SimError {
    fn io(path: &Path, error: &std::io::Error) -> Self {
        SimError::Setup(format!("{}: {error}", path.display()))
    }
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimError::Setup(message) => write!(f, "setup failed: {message}"),
            SimError::Write(message) => write!(f, "a write failed: {message}"),
        }
    }
}

impl std::error::Error for SimError {}

/// One peer's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerReport {
    /// Its name (`peer-<i>`).
    pub name: String,
    /// Its device id.
    pub device: String,
    /// Encoded bytes of the messages, requests and responses it sent.
    pub bytes_sent: u64,
    /// The largest peer log it held while the workload ran (sampled).
    pub peak_log_entries: u64,
    /// The largest number of its own shared changes some peer had not acknowledged (sampled).
    pub peak_lag: u64,
    /// The same at the end.
    pub final_lag: u64,
    /// Batches its engine sent, and re-sent, in its last run.
    pub batches_sent: u64,
    /// Re-sends in its last run.
    pub retries: u64,
    /// Batches the lossy link dropped.
    pub batches_lost: u64,
    /// Times it was killed and restarted.
    pub restarts: u32,
}

/// How the joining device caught up.
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillReport {
    /// From pairing until it had caught up with every peer, in seconds.
    pub seconds: f64,
    /// Rows it held then (all synced tables).
    pub rows: u64,
    /// Rows per second.
    pub rows_per_second: f64,
}

/// What a real run found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The run's configuration.
    pub config: RealConfig,
    /// Whether every peer ended with the same tables, equal to the expected ones.
    pub converged: bool,
    /// What went wrong, if anything.
    pub failure: Option<String>,
    /// Operations performed.
    pub ops: u64,
    /// Writes the engine refused (an update of a record the writing peer did not hold yet).
    pub refused: u64,
    /// Seconds the workload took.
    pub workload_seconds: f64,
    /// Seconds from healing every fault until every peer held the same tables.
    pub converge_seconds: Option<f64>,
    /// Rows and records peers applied from each other (from the engine's events).
    pub changes_applied: u64,
    /// Every fault, with the second it happened.
    pub faults: Vec<String>,
    /// Each peer's figures.
    pub peers: Vec<PeerReport>,
    /// The joining device's catch-up, if one joined.
    pub backfill: Option<BackfillReport>,
    /// Rows per table at the end (on the first peer).
    pub tables: BTreeMap<String, usize>,
}

impl Report {
    /// Operations per second of the workload.
    pub fn ops_per_second(&self) -> f64 {
        self.ops as f64 / self.workload_seconds.max(1e-9)
    }

    /// Changes applied per second, over the workload and the convergence.
    pub fn changes_per_second(&self) -> f64 {
        let seconds = self.workload_seconds + self.converge_seconds.unwrap_or(0.0);
        self.changes_applied as f64 / seconds.max(1e-9)
    }

    /// The report for a person.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let config = &self.config;
        let mut text = String::new();
        let _ = writeln!(
            text,
            "lsync simulation: seed {}, {} peers ({} topology), {} ops, faults {}",
            config.seed, config.peers, config.topology, config.ops, config.faults
        );
        let _ = writeln!(
            text,
            "  converged: {}{}",
            if self.converged { "yes" } else { "NO" },
            self.converge_seconds
                .map(|seconds| format!(" ({seconds:.2} s after healing)"))
                .unwrap_or_default()
        );
        if let Some(failure) = &self.failure {
            let _ = writeln!(text, "  failure: {failure}");
        }
        let _ = writeln!(
            text,
            "  workload: {} ops in {:.1} s ({:.0} ops/s), {} refused; {} changes applied by peers ({:.0}/s)",
            self.ops,
            self.workload_seconds,
            self.ops_per_second(),
            self.refused,
            self.changes_applied,
            self.changes_per_second()
        );
        for fault in &self.faults {
            let _ = writeln!(text, "  fault: {fault}");
        }
        if let Some(backfill) = &self.backfill {
            let _ = writeln!(
                text,
                "  join: caught up in {:.2} s, {} rows ({:.0} rows/s)",
                backfill.seconds, backfill.rows, backfill.rows_per_second
            );
        }
        let _ = writeln!(
            text,
            "  {:<8} {:>12} {:>10} {:>9} {:>9} {:>9} {:>8} {:>6} {:>8}",
            "peer",
            "bytes sent",
            "peak log",
            "peak lag",
            "end lag",
            "batches",
            "retries",
            "lost",
            "restarts"
        );
        for peer in &self.peers {
            let _ = writeln!(
                text,
                "  {:<8} {:>12} {:>10} {:>9} {:>9} {:>9} {:>8} {:>6} {:>8}",
                peer.name,
                peer.bytes_sent,
                peer.peak_log_entries,
                peer.peak_lag,
                peer.final_lag,
                peer.batches_sent,
                peer.retries,
                peer.batches_lost,
                peer.restarts
            );
        }
        let tables: Vec<String> =
            self.tables.iter().map(|(name, rows)| format!("{name} {rows}")).collect();
        let _ = writeln!(text, "  tables: {}", tables.join(", "));
        text
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let peers: Vec<serde_json::Value> = self
            .peers
            .iter()
            .map(|peer| {
                serde_json::json!({
                    "name": peer.name,
                    "device": peer.device,
                    "bytes_sent": peer.bytes_sent,
                    "peak_log_entries": peer.peak_log_entries,
                    "peak_lag": peer.peak_lag,
                    "final_lag": peer.final_lag,
                    "batches_sent": peer.batches_sent,
                    "retries": peer.retries,
                    "batches_lost": peer.batches_lost,
                    "restarts": peer.restarts,
                })
            })
            .collect();
        serde_json::json!({
            "mode": "real",
            "converged": self.converged,
            "failure": self.failure,
            "seed": self.config.seed,
            "peers": self.config.peers,
            "faults": self.config.faults.to_string(),
            "topology": self.config.topology.to_string(),
            "ops": self.ops,
            "refused": self.refused,
            "workload_seconds": self.workload_seconds,
            "ops_per_second": self.ops_per_second(),
            "converge_seconds": self.converge_seconds,
            "changes_applied": self.changes_applied,
            "changes_per_second": self.changes_per_second(),
            "fault_log": self.faults,
            "per_peer": peers,
            "backfill": self.backfill.as_ref().map(|backfill| serde_json::json!({
                "seconds": backfill.seconds,
                "rows": backfill.rows,
                "rows_per_second": backfill.rows_per_second,
            })),
            "tables": self.tables,
        })
    }
}

/// A scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Cut(usize, usize),
    Heal(usize, usize),
    Kill(usize),
    Restart(usize),
    Offline(usize),
    Online(usize),
    Join,
    ClockStep(usize, i64),
    /// The peer stops reading its connections (`true`) or reads again (`false`).
    Stall(usize, bool),
    /// A backup of the peer's files is taken while it runs.
    BackUp(usize),
    /// The peer is stopped and brought back from its backup (with the generation file: nothing
    /// at open can tell).
    Restore(usize, bool),
    /// The peer's library file is wiped; it joins again under its identity.
    Recreate(usize),
}

/// A clock jump of the `clock-jump` fault: a year.
const CLOCK_JUMP_MS: i64 = 365 * 24 * 3_600_000;

/// Engine settings for the simulation: the defaults, with the intervals shortened so that a run of
/// under a minute sees many heartbeats, prunes, re-sends and reconnects.
fn sim_config(faults: Faults) -> SyncConfig {
    let config = sim_defaults();
    if faults.retention {
        // Small enough that the peer away for 12 % of the run is left behind: log entries
        // pruned and tombstones collected before it had them.
        SyncConfig {
            log_max_entries_per_origin: 200,
            tombstone_retention: Duration::from_secs(2),
            ..config
        }
    } else {
        config
    }
}

fn sim_defaults() -> SyncConfig {
    SyncConfig {
        batch_window: Duration::from_millis(50),
        ack_timeout: Duration::from_secs(1),
        retry_base: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
        heartbeat_interval: Duration::from_millis(500),
        stale_timeout: Duration::from_secs(5),
        reconnect_base: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        prune_interval: Duration::from_secs(1),
        request_timeout: Duration::from_secs(10),
        close_timeout: Duration::from_millis(500),
        ..SyncConfig::default()
    }
}

/// Where the peers' folders live.
enum Root {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl Root {
    fn path(&self) -> &Path {
        match self {
            Root::Temporary(dir) => dir.path(),
            Root::Kept(path) => path,
        }
    }
}

/// The joining device, until its backfill is done.
struct JoinWatch {
    peer: usize,
    started: Instant,
    done: Option<BackfillReport>,
}

struct Sim<'a> {
    config: &'a RealConfig,
    status: &'a (dyn Fn(&str) + Sync),
    rng: SplitMix64,
    root: Root,
    registry: Arc<Registry>,
    sync_config: SyncConfig,
    library: LibraryId,
    peers: Vec<Peer>,
    workload: Workload,
    started: Instant,
    ops_done: u64,
    refused: u64,
    changes_applied: u64,
    fault_log: Vec<String>,
    /// Per peer: links cut by a partition or by going offline (the other side's index).
    cut: BTreeMap<usize, BTreeSet<usize>>,
    peak_log: Vec<u64>,
    peak_lag: Vec<u64>,
    last_sample: Instant,
    last_fault: Instant,
    joiner: Option<JoinWatch>,
    phase: String,
    /// Peers with a backup taken (`restore`).
    backed_up: BTreeSet<usize>,
    /// Restored or re-created peers that take no writes until their copy is ready again.
    resyncing: BTreeSet<usize>,
}

/// Runs a real simulation; `status` receives a live status line now and then.
pub fn run(config: &RealConfig, status: &(dyn Fn(&str) + Sync)) -> Result<Report, SimError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| SimError::Setup(format!("tokio runtime: {error}")))?;
    runtime.block_on(async {
        let mut sim = Sim::new(config, status)?;
        let result = sim.run().await;
        sim.shut_down().await;
        result
    })
}

impl<'a> Sim<'a> {
    fn new(config: &'a RealConfig, status: &'a (dyn Fn(&str) + Sync)) -> Result<Self, SimError> {
        let root = match &config.keep {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|error| SimError::io(dir, &error))?;
                let occupied = std::fs::read_dir(dir)
                    .map_err(|error| SimError::io(dir, &error))?
                    .flatten()
                    .any(|entry| entry.file_name().to_string_lossy().starts_with("peer-"));
                if occupied {
                    return Err(SimError::Setup(format!(
                        "{} already holds peer folders; give an empty or new folder to --keep",
                        dir.display()
                    )));
                }
                Root::Kept(dir.clone())
            }
            None => Root::Temporary(
                tempfile::tempdir()
                    .map_err(|error| SimError::Setup(format!("temporary folder: {error}")))?,
            ),
        };
        let registry = Arc::new(
            reference_registry().map_err(|error| SimError::Setup(format!("schema: {error}")))?,
        );
        let mut rng = SplitMix64::new(config.seed);
        let workload = Workload::new(rng.next_u64());
        let library = LibraryId(Uuid::from_u128(
            (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()),
        ));
        Ok(Self {
            config,
            status,
            rng,
            root,
            registry,
            sync_config: sim_config(config.faults),
            library,
            peers: Vec::new(),
            workload,
            started: Instant::now(),
            ops_done: 0,
            refused: 0,
            changes_applied: 0,
            fault_log: Vec::new(),
            cut: BTreeMap::new(),
            peak_log: Vec::new(),
            peak_lag: Vec::new(),
            last_sample: Instant::now(),
            last_fault: Instant::now(),
            joiner: None,
            phase: "setup".into(),
            backed_up: BTreeSet::new(),
            resyncing: BTreeSet::new(),
        })
    }

    fn log_fault(&mut self, what: String) {
        let at = self.started.elapsed().as_secs_f64();
        tracing::info!(fault = %what, "simulator");
        self.fault_log.push(format!("{at:6.2} s  {what}"));
    }

    /// Peers that run and take writes (a joining device once its backfill is done).
    fn running(&self) -> Vec<usize> {
        let backfilling =
            self.joiner.as_ref().filter(|joiner| joiner.done.is_none()).map(|joiner| joiner.peer);
        (0..self.peers.len())
            .filter(|index| {
                self.peers[*index].running.is_some()
                    && Some(*index) != backfilling
                    && !self.resyncing.contains(index)
            })
            .collect()
    }

    fn indexing_quota(&self) -> u64 {
        let share = self.config.ops.saturating_mul(INDEXING_PERCENT) / 100;
        share / u64::try_from(self.config.peers.max(1)).unwrap_or(1)
    }

    /// Creates and starts a peer (`joining`: a new copy that backfills); returns its index.
    async fn add_peer(&mut self, joining: bool) -> Result<usize, SimError> {
        let index = self.peers.len();
        let name = format!("peer-{index}");
        let dir = self.root.path().join(&name);
        let mut peer =
            Peer::create(name, dir, self.library, &self.registry, &self.sync_config, joining)
                .await?;
        if self.config.faults.skew {
            // Within ±2.5 s of true time: ordinary NTP-less drift.
            let offset = i64::try_from(self.rng.next_u64() % 5_001).unwrap_or(0) - 2_500;
            peer.clock.set_offset_ms(offset);
        }
        // With `LSYNC_SIM_LOG`, the engines' lines name devices: say which peer each one is.
        tracing::info!(peer = %peer.name, device = %peer.device, "simulated device");
        let seed = self.rng.next_u64();
        peer.start(
            &self.registry,
            &self.sync_config,
            &BTreeSet::new(),
            self.config.faults.lossy,
            seed,
        )
        .await?;
        // A joining device indexes a small tree of its own once it is ready.
        let quota = if joining { self.indexing_quota() / 10 } else { self.indexing_quota() };
        self.workload.add_owner(peer.device, quota);
        self.peers.push(peer);
        self.peak_log.push(0);
        self.peak_lag.push(0);
        Ok(index)
    }

    /// The fault schedule: (fraction of the operations done, action).
    fn schedule(&mut self) -> Vec<(f64, Action)> {
        let faults = self.config.faults;
        let n = self.config.peers;
        let pick = |rng: &mut SplitMix64| usize::try_from(rng.next_u64() % n as u64).unwrap_or(0);
        let mut schedule = Vec::new();
        if faults.partition {
            let a = pick(&mut self.rng);
            let b =
                (a + 1 + usize::try_from(self.rng.next_u64() % (n as u64 - 1)).unwrap_or(0)) % n;
            schedule.push((0.15, Action::Cut(a, b)));
            schedule.push((0.30, Action::Heal(a, b)));
        }
        if faults.restart {
            let victim = pick(&mut self.rng);
            schedule.push((0.38, Action::Kill(victim)));
            schedule.push((0.46, Action::Restart(victim)));
        }
        if faults.offline {
            let away = pick(&mut self.rng);
            schedule.push((0.50, Action::Offline(away)));
            schedule.push((0.62, Action::Online(away)));
        }
        if faults.join {
            schedule.push((0.66, Action::Join));
        }
        // The new faults hit peers other than the one that goes offline (its writes could reach
        // no one before a restore or re-creation, and would be lost with its file, as in life).
        let away = schedule.iter().find_map(|(_, action)| match action {
            Action::Offline(away) => Some(*away),
            _ => None,
        });
        let pick_present = |rng: &mut SplitMix64| {
            let mut peer = pick(rng);
            if Some(peer) == away && n > 1 {
                peer = (peer + 1) % n;
            }
            peer
        };
        if faults.stall {
            let hung = pick_present(&mut self.rng);
            schedule.push((0.20, Action::Stall(hung, true)));
            schedule.push((0.27, Action::Stall(hung, false)));
        }
        if faults.restore {
            let victim = pick_present(&mut self.rng);
            let whole_folder = self.rng.next_u64().is_multiple_of(2);
            schedule.push((0.33, Action::BackUp(victim)));
            schedule.push((0.54, Action::Restore(victim, whole_folder)));
        }
        if faults.clock_jump {
            let jumper = pick_present(&mut self.rng);
            schedule.push((0.57, Action::ClockStep(jumper, CLOCK_JUMP_MS)));
            schedule.push((0.60, Action::ClockStep(jumper, -CLOCK_JUMP_MS)));
        }
        if faults.recreate {
            let victim = pick_present(&mut self.rng);
            schedule.push((0.78, Action::Recreate(victim)));
        }
        if faults.skew {
            let stepped = pick(&mut self.rng);
            schedule.push((0.72, Action::ClockStep(stepped, -3_000)));
        }
        schedule.sort_by(|a: &(f64, Action), b| a.0.total_cmp(&b.0));
        schedule
    }

    async fn run(&mut self) -> Result<Report, SimError> {
        for _ in 0..self.config.peers {
            self.add_peer(false).await?;
        }
        let edges = self.config.topology.edges(self.peers.len(), &mut self.rng);
        for (inviter, joiner) in edges {
            pair(&self.peers[inviter], &self.peers[joiner]).await?;
        }
        let mut schedule = self.schedule().into_iter().peekable();
        self.started = Instant::now();
        self.phase = "indexing".into();
        let total = self.config.ops;
        // The workload runs until it made `ops` operations and every scheduled fault happened.
        while self.ops_done < total || schedule.peek().is_some() {
            let done = self.ops_done as f64 / total as f64;
            while let Some((_, action)) = schedule
                .next_if(|(at, _)| *at <= done && self.last_fault.elapsed() >= MIN_FAULT_GAP)
            {
                self.act(action).await?;
                self.last_fault = Instant::now();
            }
            let running = self.running();
            let indexing =
                running.iter().copied().find(|peer| self.workload.indexing_left(*peer) > 0);
            let op = match indexing {
                Some(peer) => self.workload.index(peer, INDEX_CHUNK),
                None => {
                    if self.phase == "indexing" {
                        self.phase = "editing".into();
                    }
                    self.workload.next(&running)
                }
            };
            let Some(op) = op else { continue };
            self.ops_done += op.size();
            self.perform(op).await?;
            self.after_op().await;
        }
        let workload_seconds = self.started.elapsed().as_secs_f64();
        self.phase = "healing".into();
        self.heal_all().await?;
        let healed = Instant::now();
        self.phase = "converging".into();
        let converged = self.converge().await;
        let converge_seconds = converged.is_ok().then(|| healed.elapsed().as_secs_f64());
        let mut failure = converged.err();
        let tables = match self.peers.first().and_then(|peer| peer.running.as_ref()) {
            Some(running) => dump_tables(running.library.reader(), &self.registry).await.ok(),
            None => None,
        };
        if failure.is_none()
            && let Some(tables) = &tables
        {
            failure = self.check_expected(tables);
        }
        let peers = self.peer_reports().await;
        Ok(Report {
            config: self.config.clone(),
            converged: failure.is_none(),
            failure,
            ops: self.ops_done,
            refused: self.refused,
            workload_seconds,
            converge_seconds,
            changes_applied: self.changes_applied,
            faults: self.fault_log.clone(),
            peers,
            backfill: self.joiner.as_ref().and_then(|joiner| joiner.done.clone()),
            tables: tables
                .map(|tables| tables.into_iter().map(|(name, rows)| (name, rows.len())).collect())
                .unwrap_or_default(),
        })
    }

    /// Cuts or heals the link between `a` and `b` on both sides.
    async fn set_link(&mut self, a: usize, b: usize, cut: bool) {
        let (device_a, device_b) = (self.peers[a].device, self.peers[b].device);
        for (side, other, other_index) in [(a, device_b, b), (b, device_a, a)] {
            if cut {
                self.cut.entry(side).or_default().insert(other_index);
            } else if let Some(links) = self.cut.get_mut(&side) {
                links.remove(&other_index);
            }
            if let Some(running) = &self.peers[side].running {
                if cut {
                    running.gate.cut(other).await;
                } else {
                    running.gate.heal(other).await;
                }
            }
        }
    }

    async fn act(&mut self, action: Action) -> Result<(), SimError> {
        match action {
            Action::Cut(a, b) => {
                self.set_link(a, b, true).await;
                self.phase = format!("partition {}|{}", self.peers[a].name, self.peers[b].name);
                self.log_fault(format!(
                    "partition: cut {} from {}",
                    self.peers[a].name, self.peers[b].name
                ));
            }
            Action::Heal(a, b) => {
                self.set_link(a, b, false).await;
                self.phase = "editing".into();
                self.log_fault(format!(
                    "partition healed: {} and {}",
                    self.peers[a].name, self.peers[b].name
                ));
            }
            Action::Kill(victim) => {
                for other in 0..self.peers.len() {
                    if other != victim {
                        self.set_link(victim, other, true).await;
                    }
                }
                self.peers[victim].kill().await;
                self.phase = format!("{} down", self.peers[victim].name);
                self.log_fault(format!(
                    "killed {} (links cut, engine stopped where it stood, nothing flushed)",
                    self.peers[victim].name
                ));
            }
            Action::Restart(victim) => self.restart(victim).await?,
            Action::Offline(away) => {
                for other in 0..self.peers.len() {
                    if other != away {
                        self.set_link(away, other, true).await;
                    }
                }
                self.phase = format!("{} offline", self.peers[away].name);
                self.log_fault(format!("{} offline (still writing)", self.peers[away].name));
            }
            Action::Online(away) => {
                for other in 0..self.peers.len() {
                    if other != away {
                        self.set_link(away, other, false).await;
                    }
                }
                self.phase = "editing".into();
                self.log_fault(format!("{} back online", self.peers[away].name));
            }
            Action::Join => self.join().await?,
            Action::ClockStep(peer, step_ms) => {
                let clock = &self.peers[peer].clock;
                let offset = clock.offset_ms() + step_ms;
                clock.set_offset_ms(offset);
                self.log_fault(format!(
                    "{}'s wall clock stepped by {step_ms} ms",
                    self.peers[peer].name
                ));
            }
            Action::Stall(peer, stalled) => {
                let name = self.peers[peer].name.clone();
                if let Some(running) = &self.peers[peer].running {
                    running.transport.set_reading(!stalled);
                    self.log_fault(if stalled {
                        format!("{name} stopped reading its connections (hung, nothing closed)")
                    } else {
                        format!("{name} reads again")
                    });
                }
            }
            Action::BackUp(peer) => {
                if self.peers[peer].back_up().await? {
                    self.backed_up.insert(peer);
                    self.log_fault(format!("backup of {} taken", self.peers[peer].name));
                }
            }
            Action::Restore(peer, whole_folder) => self.restore(peer, whole_folder).await?,
            Action::Recreate(peer) => self.recreate(peer).await?,
        }
        Ok(())
    }

    /// Waits (60 s at most) until one peer acknowledged every change and row `peer` wrote, so
    /// that losing its file loses no acknowledged write; `false` if that did not happen.
    async fn wait_synced(&mut self, peer: usize) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let device = self.peers[peer].device;
        loop {
            let Some(running) = &mut self.peers[peer].running else { return false };
            if let Ok(status) = running.library.status().await {
                let own: Vec<&lsync_protocol::StateMark> =
                    status.watermarks.state.iter().filter(|mark| mark.owner == device).collect();
                let synced = status.peers.iter().any(|other| {
                    other.online
                        && other.lag == 0
                        && own.iter().all(|mark| {
                            other.acked_state.iter().any(|acked| {
                                acked.owner == device
                                    && acked.model == mark.model
                                    && acked.version >= mark.version
                            })
                        })
                });
                if synced {
                    return true;
                }
            }
            // Acknowledgements arrive as events on the peer (or not at all: then the deadline).
            let next = tokio::time::timeout_at(deadline, running.events.recv()).await;
            if next.is_err() {
                return false;
            }
        }
    }

    /// The `restore` fault: the peer is stopped (once a peer holds everything it wrote) and
    /// brought back from the backup taken earlier.
    async fn restore(&mut self, victim: usize, whole_folder: bool) -> Result<(), SimError> {
        let name = self.peers[victim].name.clone();
        if !self.backed_up.contains(&victim) || self.peers[victim].running.is_none() {
            self.log_fault(format!("restore of {name} skipped: no backup, or not running"));
            return Ok(());
        }
        if !self.wait_synced(victim).await {
            self.log_fault(format!("restore of {name} skipped: its writes reached no peer"));
            return Ok(());
        }
        for other in 0..self.peers.len() {
            if other != victim {
                self.set_link(victim, other, true).await;
            }
        }
        self.peers[victim].stop().await?;
        self.peers[victim].restore_backup(whole_folder)?;
        self.restart(victim).await?;
        self.resyncing.insert(victim);
        self.log_fault(if whole_folder {
            format!("{name} restored from its backup, generation file too (it cannot tell)")
        } else {
            format!("{name}'s library.db restored from its backup (generation file kept)")
        });
        Ok(())
    }

    /// The `recreate` fault: the peer's library file is wiped (once a peer holds everything it
    /// wrote) and it joins again under its identity.
    async fn recreate(&mut self, victim: usize) -> Result<(), SimError> {
        let name = self.peers[victim].name.clone();
        if self.peers[victim].running.is_none() || !self.wait_synced(victim).await {
            self.log_fault(format!("re-creation of {name} skipped: not running, or unsynced"));
            return Ok(());
        }
        for other in 0..self.peers.len() {
            if other != victim {
                self.set_link(victim, other, true).await;
            }
        }
        self.peers[victim].stop().await?;
        self.peers[victim].recreate(self.library, &self.registry, &self.sync_config).await?;
        self.restart(victim).await?;
        self.resyncing.insert(victim);
        self.log_fault(format!("{name} wiped and joined again under its identity, backfilling"));
        Ok(())
    }

    async fn restart(&mut self, victim: usize) -> Result<(), SimError> {
        if self.peers[victim].running.is_some() {
            return Ok(());
        }
        let seed = self.rng.next_u64();
        let lossy = self.config.faults.lossy && self.phase != "healing";
        self.peers[victim]
            .start(&self.registry, &self.sync_config, &BTreeSet::new(), lossy, seed)
            .await?;
        self.peers[victim].restarts += 1;
        for other in 0..self.peers.len() {
            if other != victim {
                self.set_link(victim, other, false).await;
            }
        }
        self.phase = "editing".into();
        self.log_fault(format!("restarted {} from its files", self.peers[victim].name));
        Ok(())
    }

    async fn join(&mut self) -> Result<(), SimError> {
        let index = self.add_peer(true).await?;
        self.joiner = Some(JoinWatch { peer: index, started: Instant::now(), done: None });
        // Its neighbours in the topology that run now; any running peer if none does.
        let running: Vec<usize> =
            (0..index).filter(|other| self.peers[*other].running.is_some()).collect();
        let mut inviters: Vec<usize> = self
            .config
            .topology
            .join_edges(index, &mut self.rng)
            .into_iter()
            .filter(|other| running.contains(other))
            .collect();
        if inviters.is_empty() {
            inviters.extend(running.first());
        }
        for other in inviters {
            pair(&self.peers[other], &self.peers[index]).await?;
        }
        // A device that is offline now sees the new one only when it comes back.
        let offline: Vec<usize> = (0..index)
            .filter(|peer| self.cut.get(peer).is_some_and(|links| links.len() + 1 >= index))
            .collect();
        for away in offline {
            self.set_link(away, index, true).await;
        }
        self.log_fault(format!(
            "{} joined, paired with its running neighbours ({} topology), backfilling",
            self.peers[index].name, self.config.topology
        ));
        Ok(())
    }

    async fn heal_all(&mut self) -> Result<(), SimError> {
        for index in 0..self.peers.len() {
            if self.peers[index].running.is_none() {
                self.restart(index).await?;
            }
        }
        for index in 0..self.peers.len() {
            let links: Vec<usize> = self.cut.get(&index).into_iter().flatten().copied().collect();
            for other in links {
                self.set_link(index, other, false).await;
            }
            if let Some(running) = &self.peers[index].running {
                running.gate.heal_all().await;
                running.gate.set_lossy(false);
                running.transport.set_reading(true);
            }
        }
        self.log_fault("every fault healed".into());
        Ok(())
    }

    async fn perform(&mut self, op: Op) -> Result<(), SimError> {
        match op {
            Op::Rows { peer, model, edits } => {
                let Some(running) = &self.peers[peer].running else { return Ok(()) };
                let rows =
                    running.library.write_rows(model, edits.clone()).await.map_err(|error| {
                        SimError::Write(format!("{}: {model}: {error}", self.peers[peer].name))
                    })?;
                self.workload.rows_written(peer, model, &edits, &rows);
            }
            Op::Shared { peer, edits } => {
                let Some(running) = &self.peers[peer].running else { return Ok(()) };
                let written = running.library.write_shared(edits).await;
                self.shared_result(peer, written)?;
            }
            Op::Conflict { writes } => {
                let mut tasks = tokio::task::JoinSet::new();
                for (peer, edit) in writes {
                    if let Some(running) = &self.peers[peer].running {
                        let library = running.library.clone();
                        tasks.spawn(async move { (peer, library.write_shared(vec![edit]).await) });
                    }
                }
                while let Some(joined) = tasks.join_next().await {
                    let (peer, written) = joined.map_err(|error| {
                        SimError::Write(format!("conflicting write task: {error}"))
                    })?;
                    self.shared_result(peer, written)?;
                }
            }
        }
        Ok(())
    }

    fn shared_result(
        &mut self,
        peer: usize,
        written: Result<Vec<lsync_protocol::SharedChange>, LibraryError>,
    ) -> Result<(), SimError> {
        match written {
            Ok(changes) => self.workload.shared_written(&changes),
            // The writing peer does not hold the record (yet), or already does: the app would be
            // told, and nothing was written.
            Err(LibraryError::Shared(
                SharedError::NotFound { .. } | SharedError::AlreadyExists { .. },
            )) => {
                self.refused += 1;
            }
            // A copy that learned it was restored (from a peer) resyncs: shared writes wait.
            Err(LibraryError::NotReady { .. }) => {
                self.refused += 1;
            }
            Err(error) => {
                return Err(SimError::Write(format!("{}: {error}", self.peers[peer].name)));
            }
        }
        Ok(())
    }

    /// Counts what peers applied, watches the joining device, samples status, shows progress.
    async fn after_op(&mut self) {
        for index in 0..self.peers.len() {
            let mut events = Vec::new();
            if let Some(running) = &mut self.peers[index].running {
                while let Ok(event) = running.events.try_recv() {
                    events.push(event);
                }
            }
            for event in &events {
                self.changes_applied += applied(event);
                self.watch_join(index, event);
                if let Event::Backfill(progress) = event
                    && progress.phase == lsync_node::BackfillPhase::Ready
                    && self.resyncing.remove(&index)
                {
                    let name = self.peers[index].name.clone();
                    self.log_fault(format!(
                        "{name} is ready again ({} rows fetched)",
                        progress.done
                    ));
                }
            }
        }
        if self.last_sample.elapsed() >= SAMPLE_EVERY {
            self.last_sample = Instant::now();
            self.sample().await;
            let up = self.running().len();
            let elapsed = self.started.elapsed().as_secs_f64();
            (self.status)(&format!(
                "sim: {}/{} ops  {:.0} ops/s  {}  peers up {up}/{}  applied {}",
                self.ops_done,
                self.config.ops,
                self.ops_done as f64 / elapsed.max(1e-9),
                self.phase,
                self.peers.len(),
                self.changes_applied
            ));
        }
    }

    fn watch_join(&mut self, index: usize, event: &Event) {
        let Some(joiner) = &mut self.joiner else { return };
        if joiner.peer != index || joiner.done.is_some() {
            return;
        }
        if let Event::Backfill(progress) = event
            && progress.phase == lsync_node::BackfillPhase::Ready
        {
            let seconds = joiner.started.elapsed().as_secs_f64();
            joiner.done = Some(BackfillReport {
                seconds,
                rows: progress.done,
                rows_per_second: progress.done as f64 / seconds.max(1e-9),
            });
            let name = self.peers[index].name.clone();
            self.log_fault(format!("{name} finished its backfill ({} rows)", progress.done));
        }
    }

    async fn sample(&mut self) {
        for index in 0..self.peers.len() {
            let Some(running) = &self.peers[index].running else { continue };
            if let Ok(status) = running.library.status().await {
                self.peak_log[index] = self.peak_log[index].max(status.log_entries);
                let lag = status.peers.iter().map(|peer| peer.lag).max().unwrap_or(0);
                self.peak_lag[index] = self.peak_lag[index].max(lag);
            }
        }
    }

    /// Waits, on events, until every peer holds the same tables.
    async fn converge(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let mut dumps = Vec::new();
            for peer in &self.peers {
                let Some(running) = &peer.running else {
                    return Err(format!("{} is not running", peer.name));
                };
                let tables = dump_tables(running.library.reader(), &self.registry)
                    .await
                    .map_err(|error| format!("{}: reading tables: {error}", peer.name))?;
                dumps.push(tables);
            }
            if dumps.windows(2).all(|pair| pair[0] == pair[1]) {
                return Ok(());
            }
            let next = std::future::poll_fn(|cx| {
                let mut got = None;
                for peer in &mut self.peers {
                    let Some(running) = &mut peer.running else { continue };
                    while let Poll::Ready(Some(event)) = running.events.poll_recv(cx) {
                        got = Some(got.unwrap_or(0) + applied(&event));
                    }
                }
                match got {
                    Some(count) => Poll::Ready(count),
                    None => Poll::Pending,
                }
            });
            match tokio::time::timeout_at(deadline, next).await {
                Ok(count) => self.changes_applied += count,
                Err(_) => return Err(self.divergence(&dumps)),
            }
        }
    }

    /// Which tables differ between peers, with row counts.
    fn divergence(&self, dumps: &[BTreeMap<String, Vec<Vec<Value>>>]) -> String {
        let mut differences = Vec::new();
        if let Some(first) = dumps.first() {
            for (table, rows) in first {
                let counts: Vec<usize> =
                    dumps.iter().map(|dump| dump.get(table).map_or(0, Vec::len)).collect();
                if dumps.iter().any(|dump| dump.get(table) != Some(rows)) {
                    let by_peer: Vec<BTreeMap<Vec<u8>, Vec<Value>>> = dumps
                        .iter()
                        .map(|dump| rows_by_id(dump.get(table).map_or(&[][..], Vec::as_slice)))
                        .collect();
                    let ids: BTreeSet<&Vec<u8>> = by_peer.iter().flat_map(BTreeMap::keys).collect();
                    let example = ids
                        .into_iter()
                        .find(|id| by_peer.iter().any(|rows| rows.get(*id) != by_peer[0].get(*id)))
                        .map(|id| {
                            let held: Vec<String> = by_peer
                                .iter()
                                .map(|rows| {
                                    rows.get(id).map_or("absent".into(), |row| format!("{row:?}"))
                                })
                                .collect();
                            format!(
                                "; e.g. {:?} per peer: {}",
                                Uuid::from_slice(id).ok(),
                                held.join(" | ")
                            )
                        })
                        .unwrap_or_default();
                    differences.push(format!("{table} (rows per peer {counts:?}{example})"));
                }
            }
        }
        format!(
            "peers still differ {} s after healing in {}",
            CONVERGE_TIMEOUT.as_secs(),
            differences.join(", ")
        )
    }

    /// Compares the converged tables with what the workload's acknowledged writes imply.
    fn check_expected(&self, tables: &BTreeMap<String, Vec<Vec<Value>>>) -> Option<String> {
        let expected = self.workload.expected(&self.registry);
        let mut problems = Vec::new();
        for (table, want) in &expected {
            let have = tables.get(table).map(Vec::as_slice).unwrap_or(&[]);
            if have == want.as_slice() {
                continue;
            }
            let (have_ids, want_ids) = (rows_by_id(have), rows_by_id(want));
            let missing = want_ids.keys().filter(|id| !have_ids.contains_key(*id)).count();
            let unexpected = have_ids.keys().filter(|id| !want_ids.contains_key(*id)).count();
            let differing: Vec<(&Vec<u8>, &Vec<Value>)> = want_ids
                .iter()
                .filter(|(id, row)| have_ids.get(*id).is_some_and(|held| held != *row))
                .collect();
            let example = differing
                .first()
                .map(|(id, row)| {
                    format!(
                        "; e.g. {:?}: expected {row:?}, held {:?}",
                        Uuid::from_slice(id).ok(),
                        have_ids.get(*id)
                    )
                })
                .unwrap_or_default();
            problems.push(format!(
                "{table}: {missing} acknowledged rows missing, {unexpected} unexpected, {} differing{example}",
                differing.len()
            ));
        }
        (!problems.is_empty())
            .then(|| format!("converged on the wrong data: {}", problems.join("; ")))
    }

    async fn peer_reports(&mut self) -> Vec<PeerReport> {
        self.sample().await;
        let traffic: Vec<_> = self.peers.iter().map(Peer::traffic).collect();
        let mut reports = Vec::new();
        for (index, peer) in self.peers.iter().enumerate() {
            let responses: u64 =
                traffic.iter().filter_map(|other| other.response_bytes.get(&peer.device)).sum();
            let status = match &peer.running {
                Some(running) => running.library.status().await.ok(),
                None => None,
            };
            reports.push(PeerReport {
                name: peer.name.clone(),
                device: peer.device.to_string(),
                bytes_sent: traffic[index].bytes_sent + responses,
                peak_log_entries: self.peak_log[index],
                peak_lag: self.peak_lag[index],
                final_lag: status.as_ref().map_or(0, |status| {
                    status.peers.iter().map(|peer| peer.lag).max().unwrap_or(0)
                }),
                batches_sent: status.as_ref().map_or(0, |status| status.batches_sent),
                retries: status.as_ref().map_or(0, |status| status.retries),
                batches_lost: traffic[index].dropped,
                restarts: peer.restarts,
            });
        }
        reports
    }

    async fn shut_down(&mut self) {
        for peer in &mut self.peers {
            let _ = peer.stop().await;
        }
    }
}

/// A dumped table's rows by id (the first column).
fn rows_by_id(rows: &[Vec<Value>]) -> BTreeMap<Vec<u8>, Vec<Value>> {
    rows.iter()
        .filter_map(|row| match row.first() {
            Some(Value::Blob(id)) => Some((id.clone(), row.clone())),
            _ => None,
        })
        .collect()
}

/// Rows and records an event says a peer's changes touched.
fn applied(event: &Event) -> u64 {
    let count = match event {
        Event::RowsChanged { upserted, deleted, .. } => upserted.len() + deleted.len(),
        Event::SharedChanged { shown, hidden, .. } => shown.len() + hidden.len(),
        _ => 0,
    };
    u64::try_from(count).unwrap_or(u64::MAX)
}

//! Deterministic mode: N simulated devices built from the sans-IO cores, an in-memory network
//! ([`MemoryNetwork`]) with latency, loss, duplication, reordering and partitions, a virtual clock,
//! and one seeded RNG from which everything random is drawn (device ids, record ids, the workload,
//! the faults, the network's own seed, the retry jitter). A run is a pure function of its seed and
//! its [`DetConfig`]: the same inputs give the same event trace ([`SeedOutcome::trace_hash`]).
//!
//! A run has two phases. In the *workload* phase each step advances virtual time by 1–15 ms,
//! delivers what the network has due, runs every device's timers, maybe injects faults and maybe
//! performs writes; the invariants are checked after every step. In the *liveness* phase every
//! fault is healed (partitions, offline devices, crashed devices, lossy links; clock skew stays)
//! and the devices must converge within [`LIVENESS_STEPS`] steps on exactly the state an
//! independent oracle computes from every write made.

mod device;
mod trace;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lsync_backfill::{Checkpoint, Phase};
use lsync_hlc::{DeviceId, HlcTime};
use lsync_protocol::{SharedChange, SharedOp, Stamped, Value};
use lsync_shared_sync::RecordState;
use lsync_transport::{LinkConfig, MemoryNetwork, NetworkStats, SplitMix64};
use lsync_watermark::{SharedProgress, StateProgress};
use uuid::Uuid;

use crate::{Faults, Topology};
pub use device::Stats;
use device::{Ctx, Device, Held, Refused, STATE_MODEL, Wire, ident};
use trace::{Event, Trace};

/// Steps allowed after healing before a run counts as not converged: 3,000 steps of 1–15 ms are
/// about 24 s of virtual time, some 100 heartbeat rounds — many times what a full catch-up of a
/// run's writes over 16-row pages takes.
pub const LIVENESS_STEPS: u64 = 3_000;
/// How far the `clock-jump` fault moves a wall clock: a year, as the real mode's.
const CLOCK_JUMP_MS: i64 = 365 * 24 * 3_600_000;
/// Messages one directed link holds in flight with the `stall` fault: a stalled device's links
/// fill within a few batch windows and refuse sends (the real transport's flow control).
const STALL_LINK_CAPACITY: usize = 64;

/// The shape of a deterministic run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetConfig {
    /// Devices.
    pub peers: usize,
    /// Writes in the workload phase.
    pub ops: u64,
    /// Faults injected.
    pub faults: Faults,
    /// Who is paired with whom.
    pub topology: Topology,
}

/// What one seed's run found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedOutcome {
    /// The seed.
    pub seed: u64,
    /// Whether every device ended on the oracle's state.
    pub converged: bool,
    /// The first invariant violation, or why the run did not converge.
    pub failure: Option<String>,
    /// The hash of the whole event trace.
    pub trace_hash: u64,
    /// Events traced.
    pub events: u64,
    /// Steps of the workload phase.
    pub steps: u64,
    /// Steps the liveness phase took to converge.
    pub liveness_steps: u64,
    /// Virtual time at the end, in ms.
    pub virtual_ms: u64,
    /// Counters of the devices.
    pub stats: Stats,
    /// Counters of the network.
    pub network: NetworkStats,
}

/// The state every device must end in: computed from every write made, by plain last-writer-wins
/// per register (independently of the merge code under test).
#[derive(Debug, Default)]
struct Oracle {
    records: BTreeMap<Uuid, RecordState>,
    rows: BTreeMap<Uuid, Held>,
    last_seq: BTreeMap<DeviceId, u64>,
    newest_row: BTreeMap<DeviceId, HlcTime>,
}

impl Oracle {
    fn shared(&mut self, change: &SharedChange) {
        let stamp = change.hlc();
        let record = self.records.entry(change.record).or_default();
        let exists = !matches!(change.op, SharedOp::Delete);
        if record.existence.as_ref().is_none_or(|Stamped(held, _)| stamp > *held) {
            record.existence = Some(Stamped(stamp, exists));
        }
        for (name, value) in change.op.fields().into_iter().flatten() {
            if record.fields.get(name).is_none_or(|Stamped(held, _)| stamp > *held) {
                record.fields.insert(name.clone(), Stamped(stamp, value.clone()));
            }
        }
        self.last_seq.insert(change.origin, change.seq);
    }

    /// A row write: the highest version wins, as on every device. A write stamped below one
    /// its owner made before (a copy restored from a backup whose clock was stepped back behind
    /// the writes it lost, writing before any peer told it of them) loses to it.
    fn row(&mut self, owner: DeviceId, id: Uuid, version: HlcTime, value: Option<Value>) {
        if self.rows.get(&id).is_none_or(|held| held.version < version) {
            self.rows.insert(id, Held { owner, version, value });
        }
        let newest = self.newest_row.entry(owner).or_insert(version);
        *newest = (*newest).max(version);
    }
}

/// Per device, the watermarks and the backfill checkpoint after the previous step.
#[derive(Debug, Clone, Default)]
struct Marks {
    shared: SharedProgress,
    state: StateProgress,
    backfill: Option<Checkpoint>,
}

/// A phase's place in a backfill's one-way progress (within one backfill the phase never goes
/// back; a resync starts a new one).
fn phase_rank(phase: Phase) -> u8 {
    match phase {
        Phase::Uninitialized => 0,
        Phase::Backfilling | Phase::Paused => 1,
        Phase::CatchingUp => 2,
        Phase::Ready => 3,
    }
}

/// How a persisted backfill checkpoint may change from one step to the next (a crash and restart
/// in between included: the checkpoint is durable): the phase only moves forward, a plan is
/// never replaced, within it the step index and the cursor only move forward and no step's done
/// count falls, and marks are never raised before their step ends.
fn check_checkpoint(
    device: DeviceId,
    before: Option<&Checkpoint>,
    now: Option<&Checkpoint>,
    durable: &device::Durable,
    violations: &mut Vec<String>,
) {
    let Some(now) = now else {
        if before.is_some() {
            violations.push(format!("{device} lost its backfill checkpoint"));
        }
        return;
    };
    // A resync starts a new backfill over a copy that was complete, or one of a larger scope
    // over a running one: from there, the same rules.
    let restarted = before.is_some_and(|before| {
        now.phase == Phase::Uninitialized
            && now.complete_before
            && (before.phase != Phase::Uninitialized || before.scope != now.scope)
    });
    if let Some(before) = before.filter(|_| !restarted) {
        if phase_rank(now.phase) < phase_rank(before.phase) || now.completed < before.completed {
            violations.push(format!(
                "{device}'s backfill went back from {} to {}",
                before.phase, now.phase
            ));
        }
        if before.phase != Phase::Uninitialized {
            let same_plan = now.steps.len() == before.steps.len()
                && now.steps.iter().zip(&before.steps).all(|(a, b)| a.kind == b.kind);
            if !same_plan {
                violations.push(format!("{device}'s backfill plan was replaced mid-way"));
            } else if (now.current, now.cursor) < (before.current, before.cursor) {
                violations.push(format!(
                    "{device}'s backfill went back from step {} after {:?} to step {} after {:?}",
                    before.current, before.cursor, now.current, now.cursor
                ));
            } else if let Some((step, was)) =
                now.steps.iter().zip(&before.steps).find(|(step, was)| step.done < was.done)
            {
                violations.push(format!(
                    "{device}'s backfill of {} went back from {} done to {}",
                    step.name(),
                    was.done,
                    step.done
                ));
            }
        }
    }
    // Until a step ends, nothing it covers is claimed: a copy that has not caught up yet applies
    // nothing but its backfill, so its marks come only from ended steps. (A resync's copy held
    // its marks before: its steps raise them further.)
    if matches!(now.phase, Phase::Uninitialized | Phase::Backfilling) && !now.complete_before {
        let ended = &now.steps[..now.current.min(now.steps.len())];
        let shared_pending = now.steps[ended.len()..]
            .iter()
            .any(|step| matches!(step.kind, lsync_backfill::StepKind::Shared { .. }));
        if shared_pending && durable.shared.iter().next().is_some() {
            violations.push(format!(
                "{device} raised shared marks before its backfill's shared steps ended"
            ));
        }
        for (owner, model, _) in durable.state.iter() {
            let covered = ended.iter().any(|step| {
                step.kind == lsync_backfill::StepKind::State { owner, model: model.to_owned() }
            });
            if !covered {
                violations.push(format!(
                    "{device} raised its mark of {owner}'s {model} before that backfill step ended"
                ));
            }
        }
    }
}

/// A clean link: 1–5 ms of latency, nothing lost.
fn clean_link() -> LinkConfig {
    LinkConfig {
        latency_min: Duration::from_millis(1),
        latency_max: Duration::from_millis(5),
        ..LinkConfig::default()
    }
}

/// A hostile link: 1–40 ms of latency (delay), 5 % lost, 5 % duplicated, 10 % reordered.
fn lossy_link() -> LinkConfig {
    LinkConfig {
        latency_min: Duration::from_millis(1),
        latency_max: Duration::from_millis(40),
        loss: 0.05,
        duplicate: 0.05,
        reorder: 0.10,
    }
}

/// A number in `[0, n)` (0 when `n` is 0).
fn below(rng: &mut SplitMix64, n: usize) -> usize {
    match u64::try_from(n) {
        Ok(0) | Err(_) => 0,
        Ok(n) => usize::try_from(rng.next_u64() % n).unwrap_or(0),
    }
}

/// A random UUID (version bits left as drawn: only uniqueness matters here).
fn random_uuid(rng: &mut SplitMix64) -> Uuid {
    Uuid::from_u128((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

struct World {
    config: DetConfig,
    rng: SplitMix64,
    now: Duration,
    base: Instant,
    network: MemoryNetwork<Wire>,
    devices: Vec<Device>,
    ids: Vec<DeviceId>,
    /// The devices that exist so far (the paired set): the first `peers`, and with the join
    /// fault one more from the middle of the workload on. Always a prefix of `devices`.
    born: usize,
    /// The first `born` ids.
    paired: Vec<DeviceId>,
    /// When the joining device joins: once this few operations are left.
    join_when_left: Option<u64>,
    /// Paired devices (lower index first): only they ever connect.
    edges: BTreeSet<(usize, usize)>,
    /// Per device index, the devices it is paired with, itself included (what the engine's
    /// `sync_peers` holds, plus itself).
    neighbours: Vec<Vec<DeviceId>>,
    /// Connected pairs (lower index first).
    connected: BTreeSet<(usize, usize)>,
    /// Pairs cut by the partition fault (lower index first).
    cut: BTreeSet<(usize, usize)>,
    /// Devices cut from everyone by the offline fault.
    offline: BTreeSet<usize>,
    /// The device whose clock jumped a year ahead (`clock-jump`), and when it jumps back.
    jumped: Option<(usize, Duration)>,
    /// The device that stopped reading its connections (`stall`), and when it reads again.
    stalled: Option<(usize, Duration)>,
    /// Devices re-created under their identity (`recreate`): like the joining device, they may
    /// lack what was pruned while they had it, and backfill.
    reborn: BTreeSet<usize>,
    trace: Trace,
    violations: Vec<String>,
    next_request: u64,
    stats: Stats,
    oracle: Oracle,
    /// Shared records created, in creation order (the first few are the hot ones).
    records: Vec<Uuid>,
    /// Who created each device-owned row.
    creators: BTreeMap<Uuid, DeviceId>,
    /// Every shared change made, by (origin, seq): what a backfilled watermark must cover.
    changes: BTreeMap<(DeviceId, u64), SharedChange>,
    /// Per device index, its rows.
    owned: Vec<Vec<Uuid>>,
    /// Per owner, its row writes as (version, id), in version order.
    writes: BTreeMap<DeviceId, Vec<(HlcTime, Uuid)>>,
    /// Row writes stamped below a version their owner had already written: a copy restored from
    /// a backup (the whole folder: it cannot tell) resumes its clock from the file, and a wall
    /// clock stepped back since leaves it behind its lost writes until a peer tells it of them.
    /// Its peers' marks already cover such versions, so the rows are not held under those marks
    /// until the rollback resync and the own-rows barrier bring every peer's comparison; the
    /// mark invariant leaves them out, and convergence still requires them everywhere.
    regressed: BTreeSet<(Uuid, HlcTime)>,
    /// Devices restored from a backup whose rows are not repaired yet, with the own-rows
    /// barriers they had set then: until the next one, the marks of their rows are no promise.
    /// The file claims rows it lost until a peer that heard more of it tells it (a whole folder
    /// restored cannot tell by itself), and a write since raises its own mark over them; the
    /// rollback resync and the barrier after it repair that (every peer compares its rows), and
    /// convergence checks the outcome.
    unrepaired: BTreeMap<usize, u64>,
    marks: Vec<Marks>,
    ops_left: u64,
    names: u64,
}

impl World {
    fn new(config: &DetConfig, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut network = MemoryNetwork::new(rng.next_u64());
        network.set_default_link(if config.faults.lossy { lossy_link() } else { clean_link() });
        if config.faults.stall {
            // A stalled device's links fill up and refuse sends, as a peer's flow control does.
            network.set_link_capacity(STALL_LINK_CAPACITY);
        }
        let total = config.peers + usize::from(config.faults.join);
        let ids: Vec<DeviceId> =
            (0..total).map(|_| DeviceId::from_bytes(*random_uuid(&mut rng).as_bytes())).collect();
        // One device in three runs a minute and a half fast, beyond the 60 s drift bound, so
        // refused stamps are exercised; the others are within ±3 s.
        let far_ahead = config.faults.skew && rng.chance(0.3);
        let devices = ids
            .iter()
            .enumerate()
            .map(|(index, id)| {
                let skew_ms = match (config.faults.skew, far_ahead && index == 0) {
                    (false, _) => 0,
                    (true, true) => 90_000,
                    (true, false) => signed_between(&mut rng, 3_000),
                };
                let ready = index < config.peers;
                Device::new(*id, skew_ms, ready, Duration::ZERO, rng.next_u64())
            })
            .collect();
        // `full` draws nothing from the generator, so its seeds replay as before topologies.
        let edges = config.topology.edges(config.peers, &mut rng);
        let mut world = Self {
            config: config.clone(),
            rng,
            edges,
            neighbours: vec![Vec::new(); ids.len()],
            now: Duration::ZERO,
            base: Instant::now(),
            network,
            devices,
            connected: BTreeSet::new(),
            cut: BTreeSet::new(),
            offline: BTreeSet::new(),
            jumped: None,
            stalled: None,
            reborn: BTreeSet::new(),
            trace: Trace::default(),
            violations: Vec::new(),
            next_request: 0,
            stats: Stats::default(),
            oracle: Oracle::default(),
            records: Vec::new(),
            creators: BTreeMap::new(),
            changes: BTreeMap::new(),
            owned: vec![Vec::new(); ids.len()],
            writes: BTreeMap::new(),
            regressed: BTreeSet::new(),
            unrepaired: BTreeMap::new(),
            marks: vec![Marks::default(); ids.len()],
            ops_left: config.ops,
            names: 0,
            born: config.peers,
            paired: ids[..config.peers].to_vec(),
            join_when_left: config.faults.join.then_some(config.ops / 2),
            ids,
        };
        world.update_neighbours();
        world
    }

    /// Recomputes every device's paired set from the edges.
    fn update_neighbours(&mut self) {
        for (index, neighbours) in self.neighbours.iter_mut().enumerate() {
            *neighbours = (0..self.born)
                .filter(|other| {
                    *other == index || self.edges.contains(&(index.min(*other), index.max(*other)))
                })
                .map(|other| self.ids[other])
                .collect();
        }
    }

    /// Runs `work` on device `index` with the context its handlers need.
    fn with_device<R>(
        &mut self,
        index: usize,
        work: impl FnOnce(&mut Device, &mut Ctx<'_>) -> R,
    ) -> R {
        let mut ctx = Ctx {
            now: self.now,
            base: self.base,
            network: &mut self.network,
            trace: &mut self.trace,
            violations: &mut self.violations,
            next_request: &mut self.next_request,
            creators: &self.creators,
            devices: &self.neighbours[index],
            stats: &mut self.stats,
            retention: self.config.faults.retention,
        };
        work(&mut self.devices[index], &mut ctx)
    }

    fn index_of(&self, device: DeviceId) -> Option<usize> {
        self.ids.iter().position(|id| *id == device)
    }

    /// One step: time passes, messages arrive, timers run; in the workload phase faults and
    /// writes happen; then every invariant is checked.
    fn step(&mut self, workload: bool) {
        self.now += Duration::from_millis(1 + self.rng.next_u64() % 15);
        self.trace.at(millis(self.now));
        if workload {
            self.inject_faults();
        }
        for delivery in self.network.poll_deliveries(self.now) {
            let Some(to) = self.index_of(delivery.to).filter(|to| *to < self.born) else {
                continue;
            };
            self.trace.record(Event::Deliver, &[ident(delivery.from), ident(delivery.to)]);
            if self.devices[to].is_up() {
                self.with_device(to, |device, ctx| {
                    device.on_wire(ctx, delivery.from, delivery.payload)
                });
            }
        }
        for index in 0..self.born {
            let peers: Vec<DeviceId> = self
                .connected
                .iter()
                .filter_map(|(a, b)| match (*a == index, *b == index) {
                    (true, _) => Some(self.ids[*b]),
                    (_, true) => Some(self.ids[*a]),
                    _ => None,
                })
                .collect();
            self.with_device(index, |device, ctx| device.on_tick(ctx, &peers));
        }
        if workload {
            self.perform_writes();
        }
        self.check_invariants();
    }

    fn inject_faults(&mut self) {
        let faults = self.config.faults;
        if self.join_when_left.is_some_and(|left| self.ops_left <= left) {
            self.join_when_left = None;
            self.paired.push(self.ids[self.born]);
            let joiner = self.born;
            for peer in self.config.topology.join_edges(joiner, &mut self.rng) {
                self.edges.insert((peer, joiner));
            }
            self.born += 1;
            self.update_neighbours();
            self.trace.record(Event::Fault, &[9, self.born as u64]);
        }
        let n = self.born;
        if faults.partition {
            if self.rng.chance(0.02) {
                let a = below(&mut self.rng, n);
                let b = (a + 1 + below(&mut self.rng, n - 1)) % n;
                self.cut.insert((a.min(b), a.max(b)));
                self.trace.record(Event::Fault, &[1, a as u64, b as u64]);
            }
            if self.rng.chance(0.03) && !self.cut.is_empty() {
                let healed = below(&mut self.rng, self.cut.len());
                if let Some(pair) = self.cut.iter().nth(healed).copied() {
                    self.cut.remove(&pair);
                    self.trace.record(Event::Fault, &[2, pair.0 as u64, pair.1 as u64]);
                }
            }
        }
        if faults.offline {
            if self.rng.chance(0.01) {
                let device = below(&mut self.rng, n);
                self.offline.insert(device);
                self.trace.record(Event::Fault, &[3, device as u64]);
            }
            if self.rng.chance(0.02) && !self.offline.is_empty() {
                let back = below(&mut self.rng, self.offline.len());
                if let Some(device) = self.offline.iter().nth(back).copied() {
                    self.offline.remove(&device);
                    self.trace.record(Event::Fault, &[4, device as u64]);
                }
            }
        }
        if faults.restart {
            let device = below(&mut self.rng, n);
            if self.rng.chance(0.01) && self.devices[device].is_up() {
                self.devices[device].crash();
                self.stats.crashes += 1;
                self.trace.record(Event::Fault, &[5, device as u64]);
            }
            if self.rng.chance(0.04) {
                let down: Vec<usize> =
                    (0..n).filter(|index| !self.devices[*index].is_up()).collect();
                if !down.is_empty() {
                    let device = down[below(&mut self.rng, down.len())];
                    let seed = self.rng.next_u64();
                    self.devices[device].boot(self.now, seed);
                    self.trace.record(Event::Fault, &[6, device as u64]);
                }
            }
        }
        if faults.clock_jump {
            match self.jumped {
                Some((device, until)) if self.now >= until => {
                    self.devices[device].skew_ms -= CLOCK_JUMP_MS;
                    self.jumped = None;
                    self.trace.record(Event::Fault, &[11, device as u64]);
                }
                None if self.rng.chance(0.002) => {
                    let device = below(&mut self.rng, n);
                    let until = self.now + Duration::from_millis(200 + self.rng.next_u64() % 800);
                    self.devices[device].skew_ms += CLOCK_JUMP_MS;
                    self.jumped = Some((device, until));
                    self.stats.clock_jumps += 1;
                    self.trace.record(Event::Fault, &[10, device as u64]);
                }
                _ => {}
            }
        }
        if faults.stall {
            match self.stalled {
                Some((device, until)) if self.now >= until => {
                    self.network.set_reading(self.ids[device], true, self.now);
                    self.stalled = None;
                    self.trace.record(Event::Fault, &[13, device as u64]);
                }
                None if self.rng.chance(0.003) => {
                    let device = below(&mut self.rng, n);
                    let until = self.now + Duration::from_millis(300 + self.rng.next_u64() % 1_200);
                    self.network.set_reading(self.ids[device], false, self.now);
                    self.stalled = Some((device, until));
                    self.stats.stalls += 1;
                    self.trace.record(Event::Fault, &[12, device as u64]);
                }
                _ => {}
            }
        }
        if faults.recreate && self.rng.chance(0.002) {
            let device = below(&mut self.rng, n);
            let seed = self.rng.next_u64();
            // Only once another device holds everything it wrote (a peer acknowledged it, as the
            // real mode waits for): otherwise its writes would be lost with its file, as in life.
            if self.devices[device].is_up()
                && self.devices[device].durable.ready()
                && self.held_elsewhere(device)
            {
                // Stopped first: its links drop, so peers forget what they were doing with the
                // old copy (a backfill served by it rebases), as when the engine stops.
                self.devices[device].crash();
                self.sync_links();
                self.devices[device].recreate(self.now, seed);
                self.marks[device] = Marks::default();
                self.reborn.insert(device);
                self.stats.recreates += 1;
                self.trace.record(Event::Fault, &[14, device as u64]);
            }
        }
        if faults.restore {
            self.restore_fault();
        }
        if faults.skew && self.rng.chance(0.01) {
            // A wall clock steps (NTP correction, a user changing the time): up to 2 s either way.
            let device = below(&mut self.rng, n);
            let step = signed_between(&mut self.rng, 2_000);
            self.devices[device].skew_ms += step;
            self.trace.record(Event::Fault, &[7, device as u64, step.unsigned_abs()]);
        }
        self.apply_partitions();
        self.sync_links();
    }

    /// The `restore` fault: a backup tool copies a running device's file now and then; later the
    /// device is stopped and brought back from that copy — the whole folder (the generation
    /// file too: nothing at open can tell; its peers' watermarks do) or, as the user guide says,
    /// the library file alone (the generation file kept tells at open).
    fn restore_fault(&mut self) {
        let n = self.born;
        if self.rng.chance(0.02) {
            let device = below(&mut self.rng, n);
            let copy = &mut self.devices[device];
            if copy.is_up() {
                copy.backup = Some((copy.durable.clone(), copy.durable.generation));
                self.trace.record(Event::Fault, &[15, device as u64]);
            }
        }
        if !self.rng.chance(0.01) {
            return;
        }
        let device = below(&mut self.rng, n);
        let whole_folder = self.rng.chance(0.5);
        let seed = self.rng.next_u64();
        // Only once another device holds everything it wrote (as the real mode waits for): the
        // writes made since the backup come back from the peers, the rest would be lost with
        // the newer file, as in life.
        let restorable = self.devices[device].is_up()
            && self.devices[device].backup.is_some()
            && self.held_elsewhere(device);
        if !restorable {
            return;
        }
        // Not while its wall clock is behind the stamps it issued (stepped back since): the
        // restored copy would stamp its writes below the ones it lost, before any peer can tell
        // it of them, and those writes lose to the lost ones — a limitation stated in
        // `docs/protocol.md` ("Restored copies"), counted here rather than failed.
        if self.devices[device].clock_behind_its_stamps(self.now) {
            self.stats.restores_skipped += 1;
            return;
        }
        self.devices[device].crash();
        self.sync_links();
        let copy = &mut self.devices[device];
        let Some((file, generation_file)) = copy.backup.clone() else { return };
        let kept = copy.durable.generation;
        copy.durable = file;
        copy.generation_file = Some(if whole_folder { generation_file } else { kept });
        copy.restored();
        copy.boot(self.now, seed);
        self.marks[device] = Marks {
            shared: copy.durable.shared.clone(),
            state: copy.durable.state.clone(),
            backfill: copy.durable.backfill.clone(),
        };
        // Like a re-created device, it may lack what its peers pruned while it had it.
        self.reborn.insert(device);
        self.unrepaired.insert(device, self.devices[device].barriers_set);
        self.stats.restores += 1;
        self.trace.record(Event::Fault, &[16, device as u64, u64::from(whole_folder)]);
    }

    /// Whether some other device holds everything `device` wrote: its rows up to its own mark and
    /// the shared changes of each of its incarnations.
    fn held_elsewhere(&self, device: usize) -> bool {
        let me = &self.devices[device];
        let own = me.durable.state.get(me.id, STATE_MODEL);
        (0..self.born).filter(|other| *other != device).any(|other| {
            let durable = &self.devices[other].durable;
            durable.ready()
                && durable.state.get(me.id, STATE_MODEL) >= own
                && me
                    .durable
                    .incarnations
                    .keys()
                    .all(|origin| durable.shared.get(*origin) >= me.durable.shared.get(*origin))
        })
    }

    /// Makes the network's partitions match the cut links and offline devices.
    fn apply_partitions(&mut self) {
        for a in 0..self.born {
            for b in a + 1..self.born {
                let cut = self.cut.contains(&(a, b))
                    || self.offline.contains(&a)
                    || self.offline.contains(&b);
                if cut {
                    self.network.partition(self.ids[a], self.ids[b]);
                } else {
                    self.network.heal(self.ids[a], self.ids[b]);
                }
            }
        }
    }

    /// Connects the pairs that can reach each other and disconnects the others, telling both
    /// sides (a connection needs both devices up and no partition between them).
    fn sync_links(&mut self) {
        for a in 0..self.born {
            for b in a + 1..self.born {
                let reachable = self.edges.contains(&(a, b))
                    && self.devices[a].is_up()
                    && self.devices[b].is_up()
                    && !self.network.is_partitioned(self.ids[a], self.ids[b]);
                let was = self.connected.contains(&(a, b));
                if reachable == was {
                    continue;
                }
                self.trace.record(Event::Link, &[a as u64, b as u64, u64::from(reachable)]);
                let (id_a, id_b) = (self.ids[a], self.ids[b]);
                if reachable {
                    self.connected.insert((a, b));
                    self.with_device(a, |device, ctx| device.on_connect(ctx, id_b));
                    self.with_device(b, |device, ctx| device.on_connect(ctx, id_a));
                } else {
                    self.connected.remove(&(a, b));
                    self.with_device(a, |device, ctx| device.on_disconnect(ctx, id_b));
                    self.with_device(b, |device, ctx| device.on_disconnect(ctx, id_a));
                }
            }
        }
    }

    /// Devices that take writes: running, complete copies.
    fn up_devices(&self) -> Vec<usize> {
        (0..self.born)
            .filter(|index| self.devices[*index].is_up() && self.devices[*index].durable.ready())
            .collect()
    }

    fn next_name(&mut self, prefix: &str) -> Value {
        self.names += 1;
        Value::from(format!("{prefix}{}", self.names).as_str())
    }

    /// A record to edit: one of the first eight (the hot ones, so edits conflict) half the time.
    fn pick_record(&mut self) -> Option<Uuid> {
        if self.records.is_empty() {
            return None;
        }
        let range =
            if self.rng.chance(0.5) { self.records.len().min(8) } else { self.records.len() };
        Some(self.records[below(&mut self.rng, range)])
    }

    fn perform_writes(&mut self) {
        if self.ops_left == 0 {
            return;
        }
        let up = self.up_devices();
        if up.is_empty() {
            return;
        }
        if up.len() >= 2 && self.rng.chance(0.08) {
            // Concurrent conflicting edits: several devices set the same field of the same record
            // at the same instant.
            let Some(record) = self.pick_record() else { return };
            let writers = 2 + below(&mut self.rng, up.len() - 1);
            for device in up.into_iter().take(writers) {
                let name = self.next_name("rename-");
                let fields = BTreeMap::from([("name".to_owned(), name)]);
                self.write_shared(device, record, SharedOp::Update(fields));
            }
            return;
        }
        if !self.rng.chance(0.7) {
            return;
        }
        let device = up[below(&mut self.rng, up.len())];
        match self.rng.next_u64() % 100 {
            0..15 => {
                let record = random_uuid(&mut self.rng);
                let mut fields = BTreeMap::from([("name".to_owned(), self.next_name("tag-"))]);
                if self.rng.chance(0.5) {
                    fields.insert("color".to_owned(), self.next_name("color-"));
                }
                if self.write_shared(device, record, SharedOp::Insert(fields)) {
                    self.records.push(record);
                }
            }
            15..45 => {
                let Some(record) = self.pick_record() else { return };
                let field = if self.rng.chance(0.5) { "name" } else { "color" };
                let fields = BTreeMap::from([(field.to_owned(), self.next_name("edit-"))]);
                self.write_shared(device, record, SharedOp::Update(fields));
            }
            45..53 => {
                let Some(record) = self.pick_record() else { return };
                self.write_shared(device, record, SharedOp::Delete);
            }
            53..85 => {
                // Mostly one row; one write in four is a burst of up to 30 (an indexer's
                // commit), which the batcher splits into chunks.
                let count = if self.rng.chance(0.25) { 5 + below(&mut self.rng, 26) } else { 1 };
                let mut edits = Vec::with_capacity(count);
                for _ in 0..count {
                    let existing = &self.owned[device];
                    let id = if existing.is_empty() || self.rng.chance(0.3) {
                        random_uuid(&mut self.rng)
                    } else {
                        existing[below(&mut self.rng, existing.len())]
                    };
                    let value =
                        Value::Integer(i64::try_from(self.rng.next_u64() >> 1).unwrap_or(0));
                    edits.push((id, Some(value)));
                }
                self.write_rows(device, edits);
            }
            85..95 => {
                let existing = &self.owned[device];
                if !existing.is_empty() {
                    let id = existing[below(&mut self.rng, existing.len())];
                    self.write_rows(device, vec![(id, None)]);
                }
            }
            _ => {
                // A write to another device's row, which the owner-only rule must refuse.
                let me = self.ids[device];
                let foreign: Vec<Uuid> = self.devices[device]
                    .durable
                    .rows
                    .iter()
                    .filter(|(_, held)| held.owner != me)
                    .map(|(id, _)| *id)
                    .collect();
                if foreign.is_empty() {
                    return;
                }
                let id = foreign[below(&mut self.rng, foreign.len())];
                let written = self.with_device(device, |device, ctx| {
                    device.write_rows(ctx, vec![(id, Some(Value::from("stolen")))])
                });
                if written.is_ok() {
                    self.violations.push(format!("{me} wrote row {id}, which it does not own"));
                }
            }
        }
    }

    fn write_shared(&mut self, device: usize, record: Uuid, op: SharedOp) -> bool {
        self.ops_left = self.ops_left.saturating_sub(1);
        let written = self.with_device(device, |device, ctx| device.write_shared(ctx, record, op));
        match written {
            Ok(change) => {
                self.trace.record(Event::Write, &[ident(change.origin), 0, change.seq]);
                self.oracle.shared(&change);
                self.changes.insert((change.origin, change.seq), change);
                true
            }
            Err(Refused::NotFound | Refused::NotOwner | Refused::Down) => false,
        }
    }

    fn write_rows(&mut self, device: usize, edits: Vec<(Uuid, Option<Value>)>) {
        let count = u64::try_from(edits.len()).unwrap_or(u64::MAX);
        self.ops_left = self.ops_left.saturating_sub(count);
        let owner = self.ids[device];
        let values: Vec<Option<Value>> = edits.iter().map(|(_, value)| value.clone()).collect();
        let written = self.with_device(device, |device, ctx| device.write_rows(ctx, edits));
        let Ok(rows) = written else { return };
        for (row, value) in rows.into_iter().zip(values) {
            self.trace.record(Event::Write, &[ident(owner), 1, row.version.as_u64()]);
            if self.creators.insert(row.id, owner).is_none() {
                self.owned[device].push(row.id);
            }
            self.oracle.row(owner, row.id, row.version, value);
            let writes = self.writes.entry(owner).or_default();
            let at = writes.partition_point(|(written, _)| *written <= row.version);
            if at < writes.len() {
                self.regressed.insert((row.id, row.version));
            }
            writes.insert(at, (row.version, row.id));
        }
    }

    /// Checks every invariant against the state after this step.
    fn check_invariants(&mut self) {
        let mut violations = Vec::new();
        for (index, device) in self.devices.iter().enumerate() {
            let before = &self.marks[index];
            let durable = &device.durable;
            for (origin, seq) in before.shared.iter() {
                if durable.shared.get(origin) < seq {
                    violations.push(format!(
                        "{}'s watermark of {origin} went back from {seq} to {}",
                        device.id,
                        durable.shared.get(origin)
                    ));
                }
            }
            for (origin, seq) in durable.shared.iter() {
                let applied = durable.applied.get(&origin);
                let base = durable.snapshot_base.get(&origin).copied().unwrap_or(0);
                // A change below the marks a backfill raised was never applied here: the
                // snapshot pages brought the records, which must reflect it (applying it again
                // changes no register).
                let reflected = |wanted: u64| {
                    wanted <= base
                        && self.changes.get(&(origin, wanted)).is_some_and(|change| {
                            durable.records.get(&change.record).is_some_and(|record| {
                                !record.clone().apply(change.hlc(), &change.op)
                            })
                        })
                };
                let first_missing = (before.shared.get(origin) + 1..=seq).find(|wanted| {
                    applied.is_none_or(|set| !set.contains(wanted)) && !reflected(*wanted)
                });
                if let Some(missing) = first_missing {
                    let how = if missing <= base {
                        "neither applied nor reflected in the records its backfill brought"
                    } else {
                        "never applied"
                    };
                    let change = self.changes.get(&(origin, missing));
                    let record = change.and_then(|change| durable.records.get(&change.record));
                    violations.push(format!(
                        "{}'s watermark of {origin} rose to {seq} over change {missing}, {how} \
                         (the change: {change:?}; the record here: {record:?})",
                        device.id
                    ));
                }
            }
            for (owner, model, version) in before.state.iter() {
                if durable.state.get(owner, model).is_none_or(|now| now < version) {
                    violations.push(format!("{}'s mark of {owner}'s {model} went back", device.id));
                }
            }
            // A mark at `version` promises that asking for the owner's rows above it (which
            // serves each row's newest version) misses nothing: every row whose newest write is at
            // or below the mark must be held at that write. (A row written again above the mark
            // may lag: it is served by that request.) Checked for the writes the rise covers.
            for (owner, _, version) in durable.state.iter() {
                if self.index_of(owner).is_some_and(|index| self.unrepaired.contains_key(&index)) {
                    continue;
                }
                let from = before.state.get(owner, STATE_MODEL);
                let writes = self.writes.get(&owner).map_or(&[][..], Vec::as_slice);
                let start = writes.partition_point(|(written, _)| Some(*written) <= from);
                let end = writes.partition_point(|(written, _)| *written <= version);
                for (_, id) in writes.get(start..end).unwrap_or(&[]) {
                    let Some(newest) = self.oracle.rows.get(id).map(|held| held.version) else {
                        continue;
                    };
                    // A deleted row may be gone altogether once its tombstone was collected, or
                    // held as the tombstone of an earlier delete of it (a comparison with a peer
                    // that collected the later one cannot bring it): deleted either way.
                    let collected =
                        self.oracle.rows.get(id).is_some_and(|held| held.value.is_none())
                            && durable.rows.get(id).is_none_or(|held| held.value.is_none());
                    if newest <= version
                        && !collected
                        && !self.regressed.contains(&(*id, newest))
                        && durable.rows.get(id).is_none_or(|held| held.version < newest)
                    {
                        violations.push(format!(
                            "{}'s mark of {owner}'s rows rose to {version:?} without row {id} at \
                             {newest:?}",
                            device.id
                        ));
                    }
                }
            }
            for (origin, through) in &durable.pruned {
                if *through > durable.shared.get(*origin) {
                    violations.push(format!(
                        "{} pruned {origin} through {through}, above its own watermark",
                        device.id
                    ));
                }
                // A joining device still backfilling needs nothing from the log: its backfill's
                // pages bring the records, and its catch-up asks for what follows its marks.
                // Pruning waits for the devices paired with this one (the engine knows no
                // others); the rest get the changes through them, checked below. The joining
                // device is left out: paired after this device may have pruned, it backfills
                // (from either of its peers, outside `full`).
                let paired = &self.neighbours[self.index_of(device.id).unwrap_or(0)];
                for (_, other) in self.devices[..self.born.min(self.config.peers)]
                    .iter()
                    .enumerate()
                    .filter(|(index, _)| !self.reborn.contains(index))
                    .filter(|(_, other)| other.durable.ready() && paired.contains(&other.id))
                {
                    let needs_from = other.durable.shared.get(*origin);
                    // Past a retention cap a device is left behind (it catches up from snapshots).
                    if *through > needs_from && !device.durable.left_behind.contains(&other.id) {
                        violations.push(format!(
                            "{} pruned {origin} through {through}; {} has applied only {needs_from}",
                            device.id, other.id
                        ));
                    }
                }
            }
        }
        // Every change a complete copy still lacks is held in some device's log, so that it can
        // travel to that copy (over devices not paired with its origin, outside `full`). Not
        // with retention caps: then a change may be pruned everywhere, and the copies that lack
        // it get the records from snapshots (a shared resync); convergence checks the outcome.
        let newest: BTreeMap<DeviceId, u64> =
            self.changes.keys().fold(BTreeMap::new(), |mut newest, (origin, seq)| {
                let at = newest.entry(*origin).or_insert(0);
                *at = (*at).max(*seq);
                newest
            });
        let ready = |(index, other): &(usize, &Device)| {
            other.durable.ready() && !self.config.faults.retention && !self.reborn.contains(index)
        };
        for (_, other) in self.devices[..self.born].iter().enumerate().filter(ready) {
            for (origin, last) in &newest {
                let next = other.durable.shared.get(*origin) + 1;
                if next <= *last
                    && !self
                        .devices
                        .iter()
                        .any(|holder| holder.durable.log.contains_key(&(*origin, next)))
                {
                    violations.push(format!(
                        "{} lacks change {next} of {origin}, and no device holds it any more",
                        other.id
                    ));
                }
            }
        }
        for (index, device) in self.devices.iter().enumerate() {
            check_checkpoint(
                device.id,
                self.marks[index].backfill.as_ref(),
                device.durable.backfill.as_ref(),
                &device.durable,
                &mut violations,
            );
        }
        self.violations.extend(violations);
        let devices = &self.devices;
        self.unrepaired.retain(|index, barriers| devices[*index].barriers_set == *barriers);
        for (index, device) in self.devices.iter().enumerate() {
            self.marks[index] = Marks {
                shared: device.durable.shared.clone(),
                state: device.durable.state.clone(),
                backfill: device.durable.backfill.clone(),
            };
        }
    }

    /// Heals every fault: partitions, offline devices, crashed devices, lossy links.
    fn heal(&mut self) {
        self.cut.clear();
        self.offline.clear();
        if let Some((device, _)) = self.jumped.take() {
            self.devices[device].skew_ms -= CLOCK_JUMP_MS;
        }
        if let Some((device, _)) = self.stalled.take() {
            self.network.set_reading(self.ids[device], true, self.now);
        }
        self.apply_partitions();
        self.network.set_default_link(clean_link());
        for index in 0..self.born {
            if !self.devices[index].is_up() {
                let seed = self.rng.next_u64();
                self.devices[index].boot(self.now, seed);
            }
        }
        self.trace.record(Event::Fault, &[8]);
        self.sync_links();
    }

    /// Why the devices have not converged on the oracle's state, if they have not.
    fn divergence(&self) -> Option<String> {
        if self.born < self.devices.len() {
            return Some("the joining device never joined".into());
        }
        for device in &self.devices {
            let durable = &device.durable;
            if !durable.ready() {
                let checkpoint = durable.backfill.as_ref();
                return Some(format!(
                    "{} has not finished its backfill ({:?} of scope {:?}, step {:?} of {:?}, from \
                     {:?}; complete before: {:?})",
                    device.id,
                    checkpoint.map(|c| c.phase),
                    checkpoint.map(|c| c.scope),
                    checkpoint.map(|c| c.current),
                    checkpoint.map(|c| c.steps.len()),
                    checkpoint.and_then(|c| c.peer),
                    checkpoint.map(|c| c.complete_before),
                ));
            }
            if let Some((id, expected)) = self
                .oracle
                .records
                .iter()
                .find(|(id, expected)| durable.records.get(*id) != Some(*expected))
            {
                return Some(format!(
                    "{} holds record {id} as {:?}, expected {expected:?}",
                    device.id,
                    durable.records.get(id)
                ));
            }
            if durable.records.len() != self.oracle.records.len() {
                return Some(format!("{} holds records no write made", device.id));
            }
            // Live rows must match; tombstones may have been collected.
            let live = |rows: &BTreeMap<Uuid, Held>| -> BTreeMap<Uuid, Held> {
                rows.iter()
                    .filter(|(_, held)| held.value.is_some())
                    .map(|(id, held)| (*id, held.clone()))
                    .collect()
            };
            let (held, expected) = (live(&durable.rows), live(&self.oracle.rows));
            if held != expected {
                let differing = expected
                    .iter()
                    .find(|(id, row)| held.get(*id) != Some(*row))
                    .map(|(id, _)| *id)
                    .or_else(|| held.keys().find(|id| !expected.contains_key(*id)).copied());
                return Some(format!(
                    "{} holds {} live rows, expected {} (first differing: {differing:?})",
                    device.id,
                    held.len(),
                    expected.len()
                ));
            }
            for (origin, seq) in &self.oracle.last_seq {
                if durable.shared.get(*origin) != *seq {
                    return Some(format!(
                        "{}'s watermark of {origin} is {}, expected {seq}",
                        device.id,
                        durable.shared.get(*origin)
                    ));
                }
            }
            for (owner, version) in &self.oracle.newest_row {
                // The owner's newest row, or its own mark where a barrier raised it past that
                // (a re-created device's: every peer then compares once and takes it).
                let own = self
                    .index_of(*owner)
                    .and_then(|index| self.devices[index].durable.state.get(*owner, STATE_MODEL));
                if durable.state.get(*owner, STATE_MODEL) != Some(*version).max(own) {
                    return Some(format!("{}'s mark of {owner}'s rows is behind", device.id));
                }
            }
        }
        None
    }

    fn outcome(
        &self,
        seed: u64,
        steps: u64,
        liveness_steps: u64,
        failure: Option<String>,
    ) -> SeedOutcome {
        SeedOutcome {
            seed,
            converged: failure.is_none(),
            failure,
            trace_hash: self.trace.hash(),
            events: self.trace.events(),
            steps,
            liveness_steps,
            virtual_ms: millis(self.now),
            stats: self.stats,
            network: self.network.stats(),
        }
    }
}

/// A uniformly random number in `[-bound, bound]`.
fn signed_between(rng: &mut SplitMix64, bound: u32) -> i64 {
    let span = u64::from(bound) * 2 + 1;
    i64::try_from(rng.next_u64() % span).unwrap_or(0) - i64::from(bound)
}

/// Runs one seed: the workload phase with invariants checked after every step, then the liveness
/// phase. Stops at the first violation.
pub fn run_seed(config: &DetConfig, seed: u64) -> SeedOutcome {
    let mut world = World::new(config, seed);
    world.sync_links();
    let mut steps = 0;
    while world.ops_left > 0 {
        world.step(true);
        steps += 1;
        if let Some(violation) = world.violations.first() {
            let failure = format!("step {steps}: {violation}");
            return world.outcome(seed, steps, 0, Some(failure));
        }
    }
    world.heal();
    for liveness in 1..=LIVENESS_STEPS {
        world.step(false);
        if let Some(violation) = world.violations.first() {
            let failure = format!("liveness step {liveness}: {violation}");
            return world.outcome(seed, steps, liveness, Some(failure));
        }
        if world.divergence().is_none() {
            return world.outcome(seed, steps, liveness, None);
        }
    }
    let why = world.divergence().unwrap_or_default();
    let failure = format!("not converged {LIVENESS_STEPS} steps after healing: {why}");
    world.outcome(seed, steps, LIVENESS_STEPS, Some(failure))
}

/// What running many seeds found.
#[derive(Debug, Clone)]
pub struct ManyOutcome {
    /// Seeds run.
    pub runs: u64,
    /// The failed seeds' outcomes, by seed.
    pub failures: Vec<SeedOutcome>,
    /// Wall time taken.
    pub elapsed: Duration,
    /// Steps over all runs.
    pub steps: u64,
    /// Counters summed over all runs.
    pub stats: Stats,
}

/// Runs seeds `first..first + count` on `threads` threads; `progress` is called after each seed
/// with the number done so far.
pub fn run_many(
    config: &DetConfig,
    first: u64,
    count: u64,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> ManyOutcome {
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let steps = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let totals = Mutex::new(Stats::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let offset = next.fetch_add(1, Ordering::Relaxed);
                    if offset >= count {
                        break;
                    }
                    let outcome = run_seed(config, first.wrapping_add(offset));
                    steps.fetch_add(outcome.steps + outcome.liveness_steps, Ordering::Relaxed);
                    totals
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .add(&outcome.stats);
                    let failed = !outcome.converged;
                    if failed {
                        failures
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(outcome);
                    }
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    let failed_so_far =
                        failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
                    progress(finished, u64::try_from(failed_so_far).unwrap_or(u64::MAX));
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    failures.sort_by_key(|outcome| outcome.seed.wrapping_sub(first));
    ManyOutcome {
        runs: count,
        failures,
        elapsed: started.elapsed(),
        steps: steps.into_inner(),
        stats: totals.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner),
    }
}

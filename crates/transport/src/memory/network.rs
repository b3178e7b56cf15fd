//! The sans-IO network model behind the in-memory twin and the simulator.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lsync_hlc::DeviceId;

use crate::config::SplitMix64;

/// The most messages in flight on one directed link by default: 4096. Far above what a
/// simulated peer has outstanding (a few batches and pages), and a bound on the model's memory;
/// a full link refuses sends ([`SendOutcome::Full`]) and the async adapter waits for room.
pub const DEFAULT_LINK_CAPACITY: usize = 4096;

/// How one direction of a link between two devices behaves. Probabilities are in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// The smallest one-way delay.
    pub latency_min: Duration,
    /// The largest one-way delay; each message's delay is uniform in `[latency_min,
    /// latency_max]`.
    pub latency_max: Duration,
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice (the copy with its own delay).
    pub duplicate: f64,
    /// Probability that a message is held back by an extra delay of up to `latency_max` (at least
    /// 1 ms) and exempt from the link's FIFO rule, so later messages may overtake it. Messages
    /// that are not reordered are delivered in the order they were sent, whatever their sampled
    /// delays.
    pub reorder: f64,
}

impl Default for LinkConfig {
    /// A perfect link with 1 ms of latency: a LAN, rounded up so that time visibly passes.
    fn default() -> Self {
        Self {
            latency_min: Duration::from_millis(1),
            latency_max: Duration::from_millis(1),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
        }
    }
}

/// A message handed out by [`MemoryNetwork::poll_deliveries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<P> {
    /// The sender.
    pub from: DeviceId,
    /// The receiver.
    pub to: DeviceId,
    /// What was sent.
    pub payload: P,
    /// When it was sent (virtual time).
    pub sent_at: Duration,
    /// When it is delivered (virtual time).
    pub at: Duration,
}

/// What [`MemoryNetwork::send`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Scheduled for delivery, in `copies` copies (2 when duplicated).
    Scheduled {
        /// 1 or 2.
        copies: u8,
    },
    /// Lost by the link's loss probability.
    Lost,
    /// Dropped: the two devices are partitioned.
    Partitioned,
    /// Refused: the link already holds its capacity of messages in flight; nothing was drawn
    /// from the RNG, so retrying later keeps the run deterministic.
    Full,
}

/// Counters of what the network did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Messages handed to [`MemoryNetwork::send`] and not refused as full.
    pub sent: u64,
    /// Messages (copies included) handed out by [`MemoryNetwork::poll_deliveries`].
    pub delivered: u64,
    /// Messages lost by chance.
    pub lost: u64,
    /// Extra copies scheduled.
    pub duplicated: u64,
    /// Messages held back and exempt from FIFO order.
    pub reordered: u64,
    /// Messages dropped by a partition, at sending or at delivery.
    pub partitioned: u64,
}

struct InFlight<P> {
    from: DeviceId,
    to: DeviceId,
    payload: P,
    sent_at: Duration,
}

/// A deterministic model of the network between devices: a queue of in-flight messages with
/// per-link latency, loss, duplication, reordering, and partitions that can be set and healed at
/// any moment.
///
/// Sans-IO: it never reads a clock or sleeps. Time is passed in (`now`, virtual, since the start
/// of the run) and must never go backwards between calls. Call [`MemoryNetwork::send`] for each
/// message, [`MemoryNetwork::next_delivery_time`] to know when to wake, and
/// [`MemoryNetwork::poll_deliveries`] to take what has arrived. Given the seed and the same
/// sequence of calls, every outcome and delivery is identical.
///
/// A partition drops messages sent while it holds and messages in flight that would be delivered
/// while it holds (like a cut cable); messages in flight across it that arrive after it heals are
/// delivered.
pub struct MemoryNetwork<P> {
    rng: SplitMix64,
    default_link: LinkConfig,
    links: BTreeMap<(DeviceId, DeviceId), LinkConfig>,
    partitions: BTreeSet<(DeviceId, DeviceId)>,
    /// In flight, keyed by (delivery time, sequence number): a priority queue with a
    /// deterministic order among equal times.
    queue: BTreeMap<(Duration, u64), InFlight<P>>,
    /// Per directed link, the delivery time of the last message that keeps FIFO order.
    fifo_tail: BTreeMap<(DeviceId, DeviceId), Duration>,
    in_flight_per_link: BTreeMap<(DeviceId, DeviceId), usize>,
    link_capacity: usize,
    /// Devices that stopped reading ([`MemoryNetwork::set_reading`]), with what arrived for
    /// them since, in arrival order: still counted in flight on their links.
    not_reading: BTreeMap<DeviceId, Vec<InFlight<P>>>,
    next_seq: u64,
    stats: NetworkStats,
}

impl<P> std::fmt::Debug for MemoryNetwork<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNetwork")
            .field("in_flight", &self.queue.len())
            .field("partitions", &self.partitions)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn pair(a: DeviceId, b: DeviceId) -> (DeviceId, DeviceId) {
    (a.min(b), a.max(b))
}

impl<P: Clone> MemoryNetwork<P> {
    /// An empty network with perfect default links ([`LinkConfig::default`]), whose random
    /// choices all come from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            default_link: LinkConfig::default(),
            links: BTreeMap::new(),
            partitions: BTreeSet::new(),
            queue: BTreeMap::new(),
            fifo_tail: BTreeMap::new(),
            in_flight_per_link: BTreeMap::new(),
            link_capacity: DEFAULT_LINK_CAPACITY,
            not_reading: BTreeMap::new(),
            next_seq: 0,
            stats: NetworkStats::default(),
        }
    }

    /// Sets how links without their own configuration behave.
    pub fn set_default_link(&mut self, config: LinkConfig) {
        self.default_link = config;
    }

    /// Sets both directions of the link between `a` and `b`.
    pub fn set_link(&mut self, a: DeviceId, b: DeviceId, config: LinkConfig) {
        self.links.insert((a, b), config.clone());
        self.links.insert((b, a), config);
    }

    /// Sets one direction of a link.
    pub fn set_directed_link(&mut self, from: DeviceId, to: DeviceId, config: LinkConfig) {
        self.links.insert((from, to), config);
    }

    /// Sets how many messages one directed link may hold in flight (at least 1).
    pub fn set_link_capacity(&mut self, capacity: usize) {
        self.link_capacity = capacity.max(1);
    }

    /// The configuration of the link from `from` to `to`.
    pub fn link(&self, from: DeviceId, to: DeviceId) -> &LinkConfig {
        self.links.get(&(from, to)).unwrap_or(&self.default_link)
    }

    /// Cuts `a` off from `b` in both directions.
    pub fn partition(&mut self, a: DeviceId, b: DeviceId) {
        self.partitions.insert(pair(a, b));
    }

    /// Reconnects `a` and `b`.
    pub fn heal(&mut self, a: DeviceId, b: DeviceId) {
        self.partitions.remove(&pair(a, b));
    }

    /// Heals every partition.
    pub fn heal_all(&mut self) {
        self.partitions.clear();
    }

    /// Makes `device` stop reading (`false`) or read again (`true`) at virtual time `now`, as a
    /// hung process that keeps its connections open: what arrives for it meanwhile waits, still
    /// in flight on its links (so a link fills up and refuses sends, [`SendOutcome::Full`]), and
    /// is delivered in arrival order from `now` once it reads again (unless a partition holds).
    pub fn set_reading(&mut self, device: DeviceId, reading: bool, now: Duration) {
        if !reading {
            self.not_reading.entry(device).or_default();
            return;
        }
        for message in self.not_reading.remove(&device).unwrap_or_default() {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.queue.insert((now, seq), message);
        }
    }

    /// Whether `device` reads what arrives for it.
    pub fn is_reading(&self, device: DeviceId) -> bool {
        !self.not_reading.contains_key(&device)
    }

    /// Whether `a` and `b` are partitioned.
    pub fn is_partitioned(&self, a: DeviceId, b: DeviceId) -> bool {
        self.partitions.contains(&pair(a, b))
    }

    /// Sends `payload` from `from` to `to` at virtual time `now`.
    pub fn send(&mut self, from: DeviceId, to: DeviceId, payload: P, now: Duration) -> SendOutcome {
        if self.in_flight_between(from, to) >= self.link_capacity {
            return SendOutcome::Full;
        }
        self.schedule(from, to, payload, now)
    }

    /// Like [`MemoryNetwork::send`], but never refused for a full link: for responses, which
    /// answer a request whose sender is already waiting (the capacity bounds floods of one-way
    /// messages; responses are bounded by the requests outstanding).
    pub fn send_response(
        &mut self,
        from: DeviceId,
        to: DeviceId,
        payload: P,
        now: Duration,
    ) -> SendOutcome {
        self.schedule(from, to, payload, now)
    }

    /// Messages in flight from `from` to `to`.
    pub fn in_flight_between(&self, from: DeviceId, to: DeviceId) -> usize {
        self.in_flight_per_link.get(&(from, to)).copied().unwrap_or(0)
    }

    fn schedule(&mut self, from: DeviceId, to: DeviceId, payload: P, now: Duration) -> SendOutcome {
        let key = (from, to);
        self.stats.sent += 1;
        if self.is_partitioned(from, to) {
            self.stats.partitioned += 1;
            return SendOutcome::Partitioned;
        }
        let link = self.link(from, to).clone();
        if self.rng.chance(link.loss) {
            self.stats.lost += 1;
            return SendOutcome::Lost;
        }
        let copies: u8 = if self.rng.chance(link.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut at = now + self.rng.duration_between(link.latency_min, link.latency_max);
            if self.rng.chance(link.reorder) {
                self.stats.reordered += 1;
                let hold_back = link.latency_max.max(Duration::from_millis(1));
                at += self.rng.duration_between(Duration::from_micros(1), hold_back);
            } else {
                let tail = self.fifo_tail.entry(key).or_default();
                at = at.max(*tail);
                *tail = at;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.queue
                .insert((at, seq), InFlight { from, to, payload: payload.clone(), sent_at: now });
            *self.in_flight_per_link.entry(key).or_default() += 1;
        }
        SendOutcome::Scheduled { copies }
    }

    /// When the next message in flight is due, if any (it may still be dropped by a partition).
    pub fn next_delivery_time(&self) -> Option<Duration> {
        self.queue.keys().next().map(|(at, _)| *at)
    }

    /// Takes every message due at or before `now`, in delivery order (ties in sending order),
    /// dropping those across a partition.
    pub fn poll_deliveries(&mut self, now: Duration) -> Vec<Delivery<P>> {
        let mut deliveries = Vec::new();
        while let Some(entry) = self.queue.first_entry() {
            let (at, _) = *entry.key();
            if at > now {
                break;
            }
            let message = entry.remove();
            if let Some(held) = self.not_reading.get_mut(&message.to) {
                held.push(message);
                continue;
            }
            let key = (message.from, message.to);
            if let Some(count) = self.in_flight_per_link.get_mut(&key) {
                *count = count.saturating_sub(1);
            }
            if self.is_partitioned(message.from, message.to) {
                self.stats.partitioned += 1;
                continue;
            }
            self.stats.delivered += 1;
            deliveries.push(Delivery {
                from: message.from,
                to: message.to,
                payload: message.payload,
                sent_at: message.sent_at,
                at,
            });
        }
        deliveries
    }

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// What happened so far.
    pub fn stats(&self) -> NetworkStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (DeviceId, DeviceId, DeviceId) {
        (
            DeviceId::from_bytes([1; 16]),
            DeviceId::from_bytes([2; 16]),
            DeviceId::from_bytes([3; 16]),
        )
    }

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    /// Sends `count` numbered messages a→b, one per millisecond, then drains the network and
    /// returns (payload, delivery time) in delivery order.
    fn run(network: &mut MemoryNetwork<u32>, count: u32) -> Vec<(u32, Duration)> {
        let (a, b, _) = devices();
        for index in 0..count {
            network.send(a, b, index, ms(u64::from(index)));
        }
        let mut trace = Vec::new();
        while let Some(at) = network.next_delivery_time() {
            trace.extend(
                network
                    .poll_deliveries(at)
                    .into_iter()
                    .map(|delivery| (delivery.payload, delivery.at)),
            );
        }
        trace
    }

    #[test]
    fn latency_delays_delivery_within_the_range() {
        let (a, b, _) = devices();
        let mut network = MemoryNetwork::new(1);
        network.set_link(
            a,
            b,
            LinkConfig { latency_min: ms(10), latency_max: ms(30), ..LinkConfig::default() },
        );
        network.send(a, b, 7u32, ms(100));
        assert!(network.poll_deliveries(ms(109)).is_empty());
        let at = network.next_delivery_time().unwrap();
        assert!(at >= ms(110) && at <= ms(130), "{at:?}");
        let delivered = network.poll_deliveries(ms(130));
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].payload, 7);
        assert_eq!(delivered[0].sent_at, ms(100));
        assert_eq!(network.in_flight(), 0);
    }

    #[test]
    fn without_reordering_a_link_is_fifo_despite_random_latency() {
        let (a, b, _) = devices();
        let mut network = MemoryNetwork::new(2);
        network.set_link(
            a,
            b,
            LinkConfig { latency_min: ms(1), latency_max: ms(50), ..LinkConfig::default() },
        );
        let trace = run(&mut network, 200);
        let order: Vec<u32> = trace.iter().map(|(payload, _)| *payload).collect();
        assert_eq!(order, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn loss_drops_about_the_configured_share() {
        let (a, b, _) = devices();
        let mut network = MemoryNetwork::new(3);
        network.set_link(a, b, LinkConfig { loss: 0.3, ..LinkConfig::default() });
        let delivered = run(&mut network, 2000).len();
        // 1400 expected; the bounds are 8 standard deviations wide, so a correct model never
        // fails them, while a loss of 0 or 1 would.
        assert!((1240..=1560).contains(&delivered), "{delivered}");
        assert_eq!(usize::try_from(network.stats().lost).unwrap(), 2000 - delivered);
    }

    #[test]
    fn duplication_delivers_copies() {
        let (a, b, _) = devices();
        let mut network = MemoryNetwork::new(4);
        network.set_link(a, b, LinkConfig { duplicate: 0.5, ..LinkConfig::default() });
        let trace = run(&mut network, 1000);
        let copies = usize::try_from(network.stats().duplicated).unwrap();
        assert!(copies > 400 && copies < 600, "{copies}");
        assert_eq!(trace.len(), 1000 + copies);
        let mut payloads: Vec<u32> = trace.iter().map(|(payload, _)| *payload).collect();
        payloads.sort_unstable();
        payloads.dedup();
        assert_eq!(payloads.len(), 1000, "every message arrives at least once");
    }

    #[test]
    fn reordering_lets_later_messages_overtake() {
        let (a, b, _) = devices();
        let mut network = MemoryNetwork::new(5);
        network.set_link(
            a,
            b,
            LinkConfig {
                latency_min: ms(5),
                latency_max: ms(5),
                reorder: 0.3,
                ..LinkConfig::default()
            },
        );
        let trace = run(&mut network, 500);
        assert_eq!(trace.len(), 500);
        let inversions = trace.windows(2).filter(|pair| pair[0].0 > pair[1].0).count();
        assert!(inversions > 0, "some messages arrive out of order");
        assert!(network.stats().reordered > 0);

        // The same link with no reordering keeps order.
        let mut ordered = MemoryNetwork::new(5);
        ordered.set_link(
            a,
            b,
            LinkConfig { latency_min: ms(5), latency_max: ms(5), ..LinkConfig::default() },
        );
        let trace = run(&mut ordered, 500);
        assert!(trace.windows(2).all(|pair| pair[0].0 < pair[1].0));
    }

    #[test]
    fn partitions_drop_traffic_until_healed() {
        let (a, b, c) = devices();
        let mut network = MemoryNetwork::new(6);
        network.send(a, b, 1u32, ms(0));
        network.partition(b, a);
        assert!(network.is_partitioned(a, b));
        // In flight across the partition: dropped at delivery.
        assert!(network.poll_deliveries(ms(10)).is_empty());
        assert_eq!(network.send(a, b, 2, ms(10)), SendOutcome::Partitioned);
        assert_eq!(network.send(b, a, 3, ms(10)), SendOutcome::Partitioned);
        // Other links are unaffected.
        assert_eq!(network.send(a, c, 4, ms(10)), SendOutcome::Scheduled { copies: 1 });
        let delivered = network.poll_deliveries(ms(20));
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].to, c);

        // Sent before healing, delivered after: arrives.
        network.heal(a, b);
        network.send(a, b, 5, ms(20));
        network.partition(a, b);
        network.heal_all();
        let delivered = network.poll_deliveries(ms(30));
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].payload, 5);
        assert_eq!(network.stats().partitioned, 3);
    }

    #[test]
    fn a_full_link_refuses_without_drawing_randomness() {
        let (a, b, _) = devices();
        let mut network = MemoryNetwork::new(7);
        network.set_link_capacity(2);
        assert!(matches!(network.send(a, b, 1u32, ms(0)), SendOutcome::Scheduled { .. }));
        assert!(matches!(network.send(a, b, 2, ms(0)), SendOutcome::Scheduled { .. }));
        assert_eq!(network.send(a, b, 3, ms(0)), SendOutcome::Full);
        assert_eq!(network.poll_deliveries(ms(5)).len(), 2);
        assert!(matches!(network.send(a, b, 3, ms(5)), SendOutcome::Scheduled { .. }));
    }

    #[test]
    fn a_device_that_stops_reading_fills_its_links_and_gets_everything_in_order_later() {
        let (a, b, c) = devices();
        let mut network = MemoryNetwork::new(7);
        network.set_link_capacity(3);
        network.set_reading(b, false, ms(0));
        assert!(!network.is_reading(b));
        for payload in 1..=3u32 {
            assert!(matches!(network.send(a, b, payload, ms(0)), SendOutcome::Scheduled { .. }));
        }
        assert!(matches!(network.send(a, c, 9, ms(0)), SendOutcome::Scheduled { .. }));
        // Only the reading device gets anything; the stalled one's link is full.
        let delivered = network.poll_deliveries(ms(10));
        assert_eq!(delivered.iter().map(|d| (d.to, d.payload)).collect::<Vec<_>>(), [(c, 9)]);
        assert_eq!(network.send(a, b, 4, ms(10)), SendOutcome::Full);
        assert_eq!(network.in_flight_between(a, b), 3);
        network.set_reading(b, true, ms(20));
        let delivered = network.poll_deliveries(ms(20));
        assert_eq!(delivered.iter().map(|d| d.payload).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(network.in_flight_between(a, b), 0);
        assert!(matches!(network.send(a, b, 4, ms(20)), SendOutcome::Scheduled { .. }));
    }

    #[test]
    fn same_seed_and_calls_give_the_same_trace() {
        let (a, b, c) = devices();
        let faulty = LinkConfig {
            latency_min: ms(1),
            latency_max: ms(40),
            loss: 0.1,
            duplicate: 0.1,
            reorder: 0.2,
        };
        let trace = |seed: u64| {
            let mut network = MemoryNetwork::new(seed);
            network.set_default_link(faulty.clone());
            let mut trace = Vec::new();
            for step in 0..300u64 {
                let now = ms(step);
                let (from, to) = match step % 3 {
                    0 => (a, b),
                    1 => (b, c),
                    _ => (c, a),
                };
                if step == 100 {
                    network.partition(a, b);
                }
                if step == 200 {
                    network.heal(a, b);
                }
                let outcome = network.send(from, to, step, now);
                trace.push(format!("{step}: {outcome:?}"));
                for delivery in network.poll_deliveries(now) {
                    trace.push(format!(
                        "{:?} {}->{} {}",
                        delivery.at, delivery.from, delivery.to, delivery.payload
                    ));
                }
            }
            trace
        };
        assert_eq!(trace(42), trace(42));
        assert_ne!(trace(42), trace(43));
    }
}

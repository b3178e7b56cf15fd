//! Who is paired with whom: `--topology full|chain|star|random`, shared by both modes.
//!
//! Pairing is by hand and not transitive: a phone paired only with the laptop reaches the rest
//! of the library through it. Every topology is connected, so every change can reach every
//! device, but outside `full` most changes cross devices that are not paired with their origin.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use lsync_transport::SplitMix64;

/// The pairing graph of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Topology {
    /// Every device paired with every other.
    #[default]
    Full,
    /// Device `i` paired with `i + 1` only: a line, the longest paths.
    Chain,
    /// Device 0 paired with every other, and no other pair: everything crosses the hub.
    Star,
    /// A connected random graph of average degree 3 (a random spanning tree, then random edges).
    Random,
}

/// Every name `--topology` accepts.
pub const TOPOLOGY_NAMES: [&str; 4] = ["full", "chain", "star", "random"];

impl Topology {
    /// The pairs (lower index first) of `n` devices.
    pub fn edges(self, n: usize, rng: &mut SplitMix64) -> BTreeSet<(usize, usize)> {
        let mut edges = BTreeSet::new();
        match self {
            Topology::Full => {
                for b in 1..n {
                    for a in 0..b {
                        edges.insert((a, b));
                    }
                }
            }
            Topology::Chain => edges.extend((1..n).map(|b| (b - 1, b))),
            Topology::Star => edges.extend((1..n).map(|b| (0, b))),
            Topology::Random => {
                // A random spanning tree keeps the graph connected ...
                for b in 1..n {
                    edges.insert((below(rng, b), b));
                }
                // ... and random extra pairs bring the average degree to 3 (n · 3 / 2 edges).
                let wanted = (n * 3).div_ceil(2).min(n * n.saturating_sub(1) / 2);
                while edges.len() < wanted {
                    let a = below(rng, n);
                    let b = below(rng, n);
                    if a != b {
                        edges.insert((a.min(b), a.max(b)));
                    }
                }
            }
        }
        edges
    }

    /// The devices among `0..n` that a device joining as number `n` pairs with.
    pub fn join_edges(self, n: usize, rng: &mut SplitMix64) -> Vec<usize> {
        match (self, n) {
            (_, 0) => Vec::new(),
            (Topology::Full, _) => (0..n).collect(),
            (Topology::Chain, _) => vec![n - 1],
            (Topology::Star, _) => vec![0],
            (Topology::Random, 1) => vec![0],
            (Topology::Random, _) => {
                let first = below(rng, n);
                let second = (first + 1 + below(rng, n - 1)) % n;
                vec![first.min(second), first.max(second)]
            }
        }
    }
}

fn below(rng: &mut SplitMix64, n: usize) -> usize {
    usize::try_from(rng.next_u64() % n.max(1) as u64).unwrap_or(0)
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Topology::Full => "full",
            Topology::Chain => "chain",
            Topology::Star => "star",
            Topology::Random => "random",
        })
    }
}

impl FromStr for Topology {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "full" => Ok(Topology::Full),
            "chain" => Ok(Topology::Chain),
            "star" => Ok(Topology::Star),
            "random" => Ok(Topology::Random),
            other => Err(format!(
                "unknown topology {other:?} (expected one of: {})",
                TOPOLOGY_NAMES.join(", ")
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    /// Whether every device reaches every other over `edges`.
    fn connected(n: usize, edges: &BTreeSet<(usize, usize)>) -> bool {
        let mut seen = BTreeSet::from([0]);
        let mut frontier = vec![0];
        while let Some(at) = frontier.pop() {
            for (a, b) in edges {
                let next = match (*a == at, *b == at) {
                    (true, _) => *b,
                    (_, true) => *a,
                    _ => continue,
                };
                if seen.insert(next) {
                    frontier.push(next);
                }
            }
        }
        seen.len() == n
    }

    #[test]
    fn every_topology_is_connected_and_has_its_shape() {
        for seed in 0..200 {
            let mut rng = SplitMix64::new(seed);
            for n in 2..12 {
                for topology in [Topology::Full, Topology::Chain, Topology::Star, Topology::Random]
                {
                    let edges = topology.edges(n, &mut rng);
                    assert!(connected(n, &edges), "{topology} of {n} (seed {seed})");
                    assert!(edges.iter().all(|(a, b)| a < b && *b < n));
                    let expected = match topology {
                        Topology::Full => n * (n - 1) / 2,
                        Topology::Chain | Topology::Star => n - 1,
                        Topology::Random => (n * 3).div_ceil(2).min(n * (n - 1) / 2),
                    };
                    assert_eq!(edges.len(), expected, "{topology} of {n}");
                }
            }
        }
    }

    #[test]
    fn a_joining_device_pairs_with_existing_devices_only() {
        let mut rng = SplitMix64::new(7);
        for n in 1..10 {
            for topology in [Topology::Full, Topology::Chain, Topology::Star, Topology::Random] {
                let with = topology.join_edges(n, &mut rng);
                assert!(!with.is_empty() && with.iter().all(|peer| *peer < n), "{topology} {n}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for name in TOPOLOGY_NAMES {
            assert_eq!(name.parse::<Topology>().unwrap().to_string(), name);
        }
        assert!("ring".parse::<Topology>().unwrap_err().contains("unknown topology"));
    }
}

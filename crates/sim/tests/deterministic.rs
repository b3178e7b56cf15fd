//! The deterministic simulator in CI: a few hundred seeds of 5 devices under every fault must all
//! pass, and a run must be a pure function of its seed.

use lsync_sim::det::{DetConfig, run_many, run_seed};
use lsync_sim::{Faults, Topology};

fn config() -> DetConfig {
    DetConfig { peers: 5, ops: 300, faults: Faults::DETERMINISTIC, topology: Topology::Full }
}

/// Each failed seed of `outcome`, as `seed N: why`.
fn failures(outcome: &lsync_sim::det::ManyOutcome) -> Vec<String> {
    outcome
        .failures
        .iter()
        .map(|failed| {
            format!("seed {}: {}", failed.seed, failed.failure.clone().unwrap_or_default())
        })
        .collect()
}

#[test]
fn the_same_seed_gives_the_same_trace_and_different_seeds_differ() {
    let first = run_seed(&config(), 7);
    let again = run_seed(&config(), 7);
    assert_eq!(first, again, "a run is a pure function of its seed");
    assert!(first.events > 1_000, "the run did something: {first:?}");
    let other = run_seed(&config(), 8);
    assert_ne!(first.trace_hash, other.trace_hash);
}

#[test]
fn every_seed_converges_and_keeps_every_invariant() {
    let seeds = 500;
    let outcome = run_many(&config(), 0, seeds, 2, &|_, _| {});
    let failures = failures(&outcome);
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The joining device drives the backfill machine through every path: paged steps, rebases
    // onto another peer, resumes from the checkpoint after a crash.
    let stats = outcome.stats;
    assert_eq!(stats.backfills, seeds, "every joining device became ready: {stats:?}");
    assert!(stats.backfill_pages > 5 * seeds, "backfills take several pages: {stats:?}");
    assert!(stats.backfill_rebases > 0 && stats.backfill_resumes > 0, "{stats:?}");
    // Clocks jumped a year ahead and back, devices stopped reading for a while, retention caps
    // left devices behind, which resynced their shared records from snapshots.
    assert!(stats.clock_jumps > 50 && stats.stalls > 50, "{stats:?}");
    assert!(stats.resyncs > 50, "{stats:?}");
    // Devices were restored from backups, whole folders among them, and found out from their
    // peers' watermarks.
    assert!(stats.restores > 5 && stats.rollbacks > 5, "{stats:?}");
}

#[test]
fn partial_pairing_graphs_converge_through_devices_not_paired_with_the_origin() {
    for topology in [Topology::Chain, Topology::Star, Topology::Random] {
        let config = DetConfig { topology, ..config() };
        let outcome = run_many(&config, 0, 200, 2, &|_, _| {});
        let failures = failures(&outcome);
        assert!(failures.is_empty(), "{topology}: {}", failures.join("\n"));
    }
}

//! Micro-benchmark of the clock: stamps per second for `now()` and `update()`, each beside the
//! rate of the cheapest thing a stamp must do, reading the wall clock, measured in the same run.
//!
//! Run with `cargo xtask bench hlc` (or `cargo bench -p lsync-hlc --bench hlc`). Set
//! `LSYNC_BENCH_QUICK=1` for a short smoke run; `cargo test --all-targets` also runs it that way
//! (cargo passes `--bench` only when benchmarking). Prints a table, then one `BENCH {json}` line per
//! figure for `cargo xtask bench` to collect.
#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary has no API")]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use lsync_hlc::{Clock, DeviceId, Hlc, HlcConfig, HlcGenerator, HlcTime, Resume, SystemClock};

/// Runs `op` `iterations` times, five rounds, and returns the median rate in operations/second.
fn rate(iterations: u64, mut op: impl FnMut(u64)) -> f64 {
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            for index in 0..iterations {
                op(index);
            }
            iterations as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[2]
}

fn report(name: &str, figure: f64, baseline_name: &str, baseline: f64) {
    let ratio = figure / baseline;
    println!(
        "{name:<28} {:>8.1} M/s   {baseline_name:<26} {:>8.1} M/s   ratio {ratio:.2}",
        figure / 1e6,
        baseline / 1e6
    );
    println!(
        "BENCH {{\"name\":\"{name}\",\"figure\":{figure:.0},\"unit\":\"stamps/s\",\"baseline\":{baseline:.0},\"baseline_name\":\"{baseline_name}\",\"ratio\":{ratio:.3}}}"
    );
}

fn main() {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let quick = !benchmarking || std::env::var_os("LSYNC_BENCH_QUICK").is_some();
    let iterations: u64 = if quick { 200_000 } else { 5_000_000 };
    let generator = HlcGenerator::new(
        DeviceId::random(),
        SystemClock,
        HlcConfig::default(),
        Resume::FirstStart,
    );

    let clock_reads = rate(iterations, |_| {
        black_box(SystemClock.now_ms());
    });
    let now = rate(iterations, |_| {
        black_box(generator.now().ok());
    });
    report("hlc now()", now, "wall clock read", clock_reads);

    let remote_device = DeviceId::random();
    let base = HlcTime::from_physical_saturating(SystemClock.now_ms()).as_u64();
    let update = rate(iterations, |index| {
        // Stamps from a peer slightly behind, as on a healthy network.
        let remote = Hlc::new(HlcTime::from_u64(base + index), remote_device);
        black_box(generator.update(remote).ok());
    });
    report("hlc update()", update, "wall clock read", clock_reads);

    // Two threads stamping at once (the machine has 2 cores): contention on the compare-and-swap,
    // beside two threads bumping a shared atomic counter, the least a shared clock can cost.
    let counter = AtomicU64::new(0);
    let contended_baseline = 2.0
        * std::thread::scope(|scope| {
            let worker = || {
                rate(iterations, |_| {
                    black_box(counter.fetch_add(1, Ordering::AcqRel));
                })
            };
            let other = scope.spawn(worker);
            let mine = worker();
            mine.min(other.join().unwrap_or(mine))
        });
    let contended = 2.0
        * std::thread::scope(|scope| {
            let worker = || {
                rate(iterations, |_| {
                    black_box(generator.now().ok());
                })
            };
            let other = scope.spawn(worker);
            let mine = worker();
            mine.min(other.join().unwrap_or(mine))
        });
    report("hlc now() x2 threads", contended, "shared atomic add x2", contended_baseline);
}

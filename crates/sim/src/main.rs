//! `lsync-sim`: the simulator's command line (`cargo xtask sim [options]` runs it in release
//! mode). See `docs/simulator.md`.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "the simulator reports to a person on a terminal, or as JSON on stdout"
)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use lsync_sim::det::{self, DetConfig, LIVENESS_STEPS};
use lsync_sim::real::{self, RealConfig};
use lsync_sim::{Faults, Topology};

/// Runs a library across several devices under a seeded workload and faults, and checks that
/// every device ends with the same data.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask sim", version)]
struct Cli {
    /// Devices at the start [default: 3, or 5 with --deterministic].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(2..=32))]
    peers: Option<u16>,
    /// Write operations [default: 20000, or 300 per seed with --deterministic].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    ops: Option<u64>,
    /// The seed of the workload and the faults [default: drawn from the time, and printed].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Faults to inject: none, all, or a comma-separated list of partition, restart, offline,
    /// join, skew, lossy, restore, recreate, retention, clock-jump, stall.
    #[arg(long, value_name = "LIST", default_value = "all", value_parser = parse_faults)]
    faults: Faults,
    /// Who is paired with whom: full, chain, star, or random (connected, average degree 3).
    #[arg(long, value_name = "SHAPE", default_value = "full", value_parser = parse_topology)]
    topology: Topology,
    /// Leave each peer's files at DIR/peer-<i>/ (real mode).
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Print the report as one JSON object on the last line of stdout, and no status line.
    #[arg(long)]
    json: bool,
    /// Run the deterministic simulation of the sans-IO cores instead of the real engine.
    #[arg(long)]
    deterministic: bool,
    /// Run this many seeds, from --seed on (deterministic mode).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    seeds: Option<u64>,
}

fn parse_faults(text: &str) -> Result<Faults, String> {
    text.parse()
}

fn parse_topology(text: &str) -> Result<Topology, String> {
    text.parse()
}

/// A seed from the time: runs differ unless a seed is given, and every run prints its seed.
fn time_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or(0)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(error.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{error}");
                return ExitCode::SUCCESS;
            }
            // One line: clap's message without its usage block.
            let rendered = error.render().to_string();
            let line = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("lsync-sim: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    if let Some(filter) = std::env::var_os("LSYNC_SIM_LOG") {
        // The engines' own log lines (real mode), each naming its device, for diagnosing a seed.
        let filter = tracing_subscriber::EnvFilter::new(filter.to_string_lossy());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    let result = if cli.deterministic { run_deterministic(&cli) } else { run_real(&cli) };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("lsync-sim: {message}");
            ExitCode::from(2)
        }
    }
}

/// A status line on stderr, rewritten in place at most ten times a second.
struct Status {
    quiet: bool,
    last: Mutex<Option<Instant>>,
}

impl Status {
    /// A status line, unless `quiet` or stderr is not a terminal (a log file gets no
    /// carriage-return animation).
    fn new(quiet: bool) -> Self {
        let quiet = quiet || !std::io::stderr().is_terminal();
        Self { quiet, last: Mutex::new(None) }
    }

    fn show(&self, line: &str) {
        if self.quiet {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|shown| shown.elapsed() < Duration::from_millis(100)) {
            return;
        }
        *last = Some(Instant::now());
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r\x1b[2K{line}");
        let _ = stderr.flush();
    }

    fn clear(&self) {
        if !self.quiet {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
    }
}

fn run_deterministic(cli: &Cli) -> Result<bool, String> {
    if cli.keep.is_some() {
        return Err("--keep applies to the real mode; the deterministic mode keeps no files".into());
    }
    // The faults the deterministic mode does not model yet are said, not silently dropped.
    let faults = cli.faults.deterministic_part();
    let unmodelled: Vec<&str> =
        cli.faults.names().into_iter().filter(|name| !faults.names().contains(name)).collect();
    if !unmodelled.is_empty() && !cli.json {
        let why = |name: &&str| match *name {
            "recreate" => "recreate (modelled, but only when named: --faults recreate)".to_owned(),
            other => format!("{other} (not modelled yet; the real mode does)"),
        };
        eprintln!(
            "lsync-sim: the deterministic mode runs without {}",
            unmodelled.iter().map(why).collect::<Vec<_>>().join(", ")
        );
    }
    let config = DetConfig {
        peers: usize::from(cli.peers.unwrap_or(5)),
        ops: cli.ops.unwrap_or(300),
        faults,
        topology: cli.topology,
    };
    let first = cli.seed.unwrap_or_else(time_seed);
    let count = cli.seeds.unwrap_or(1);
    let repro = |seed: u64| {
        format!(
            "cargo xtask sim --deterministic --seed {seed} --peers {} --ops {} --faults {} --topology {}",
            config.peers, config.ops, config.faults, config.topology
        )
    };
    let status = Status::new(cli.json);
    if count == 1 {
        let outcome = det::run_seed(&config, first);
        if cli.json {
            println!("{}", det_seed_json(&outcome));
        } else {
            print_seed(&outcome, &config);
            if let Some(failure) = &outcome.failure {
                println!("FAILED: {failure}");
                println!("reproduce: {}", repro(outcome.seed));
            }
        }
        return Ok(outcome.converged);
    }
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let outcome = det::run_many(&config, first, count, threads, &|done, failed| {
        status.show(&format!("deterministic: {done}/{count} seeds, {failed} failed"));
    });
    status.clear();
    let seconds = outcome.elapsed.as_secs_f64().max(1e-9);
    let per_minute = outcome.runs as f64 * 60.0 / seconds;
    let first_failure = outcome.failures.first();
    if cli.json {
        let json = serde_json::json!({
            "mode": "deterministic",
            "converged": outcome.failures.is_empty(),
            "first_seed": first,
            "seeds": outcome.runs,
            "failed": outcome.failures.len(),
            "failed_seeds": outcome.failures.iter().map(|failed| failed.seed).collect::<Vec<_>>(),
            "seeds_to_first_failure": first_failure.map(|failed| failed.seed.wrapping_sub(first) + 1),
            "peers": config.peers,
            "ops_per_seed": config.ops,
            "faults": config.faults.to_string(),
            "topology": config.topology.to_string(),
            "seconds": seconds,
            "seeds_per_minute": per_minute,
            "steps": outcome.steps,
            "crashes": outcome.stats.crashes,
            "backfills": outcome.stats.backfills,
            "backfill_pages": outcome.stats.backfill_pages,
            "backfill_rebases": outcome.stats.backfill_rebases,
            "backfill_resumes": outcome.stats.backfill_resumes,
            "tombstones_collected": outcome.stats.tombstones_collected,
            "late_rows_refused": outcome.stats.late_rows_refused,
            "resyncs": outcome.stats.resyncs,
            "recreates": outcome.stats.recreates,
            "barriers": outcome.stats.barriers,
            "clock_jumps": outcome.stats.clock_jumps,
            "stalls": outcome.stats.stalls,
            "restores": outcome.stats.restores,
            "restores_skipped_clock_behind": outcome.stats.restores_skipped,
            "rollbacks": outcome.stats.rollbacks,
        });
        println!("{json}");
    } else {
        println!(
            "deterministic: {} seeds from {first} ({} peers, {} topology, {} ops each, faults {}) \
             in {seconds:.1} s ({per_minute:.0} seeds/min, {} steps)",
            outcome.runs, config.peers, config.topology, config.ops, config.faults, outcome.steps
        );
        if outcome.failures.is_empty() {
            println!("all {} seeds kept every invariant and converged", outcome.runs);
        }
        for failed in outcome.failures.iter().take(10) {
            println!("FAILED seed {}: {}", failed.seed, failed.failure.as_deref().unwrap_or(""));
            println!("  reproduce: {}", repro(failed.seed));
        }
        if let Some(failed) = first_failure {
            println!(
                "{} of {} seeds failed; the first failing seed was {} ({} seeds into the run)",
                outcome.failures.len(),
                outcome.runs,
                failed.seed,
                failed.seed.wrapping_sub(first) + 1
            );
        }
    }
    Ok(outcome.failures.is_empty())
}

fn print_seed(outcome: &det::SeedOutcome, config: &DetConfig) {
    let stats = &outcome.stats;
    let network = &outcome.network;
    println!(
        "deterministic seed {}: {} peers ({} topology), {} ops, faults {}",
        outcome.seed, config.peers, config.topology, config.ops, config.faults
    );
    println!(
        "  converged: {}  (workload {} steps, liveness {} of at most {LIVENESS_STEPS} steps, \
         {} ms virtual)",
        if outcome.converged { "yes" } else { "no" },
        outcome.steps,
        outcome.liveness_steps,
        outcome.virtual_ms
    );
    println!(
        "  writes: {} shared, {} rows, {} refused;  crashes {};  backfills {};  skewed stamps {};  \
         clock jumps {};  stalls {};  restores {} ({} rollbacks found from peers)",
        stats.shared_writes,
        stats.row_writes,
        stats.refused,
        stats.crashes,
        stats.backfills,
        stats.skewed,
        stats.clock_jumps,
        stats.stalls,
        stats.restores,
        stats.rollbacks
    );
    println!(
        "  network: {} sent, {} delivered, {} lost, {} duplicated, {} reordered, {} cut by partitions",
        network.sent,
        network.delivered,
        network.lost,
        network.duplicated,
        network.reordered,
        network.partitioned
    );
    println!(
        "  sync: {} re-sends, {} catch-up pages, {} pulls abandoned, {} log entries pruned, \
         {} tombstones collected, {} late rows refused, {} resyncs",
        stats.resent,
        stats.pages,
        stats.pulls_abandoned,
        stats.pruned,
        stats.tombstones_collected,
        stats.late_rows_refused,
        stats.resyncs
    );
    println!(
        "  backfill: {} pages, {} rebases onto another peer, {} resumes after a crash, {} failed \
         requests",
        stats.backfill_pages,
        stats.backfill_rebases,
        stats.backfill_resumes,
        stats.backfill_failures
    );
    println!("  trace: {} events, hash {:016x}", outcome.events, outcome.trace_hash);
}

fn det_seed_json(outcome: &det::SeedOutcome) -> serde_json::Value {
    serde_json::json!({
        "mode": "deterministic",
        "converged": outcome.converged,
        "seed": outcome.seed,
        "failure": outcome.failure,
        "trace_hash": format!("{:016x}", outcome.trace_hash),
        "events": outcome.events,
        "steps": outcome.steps,
        "liveness_steps": outcome.liveness_steps,
        "virtual_ms": outcome.virtual_ms,
        "shared_writes": outcome.stats.shared_writes,
        "row_writes": outcome.stats.row_writes,
        "crashes": outcome.stats.crashes,
        "backfill_pages": outcome.stats.backfill_pages,
        "backfill_rebases": outcome.stats.backfill_rebases,
        "backfill_resumes": outcome.stats.backfill_resumes,
        "messages_delivered": outcome.network.delivered,
        "messages_lost": outcome.network.lost,
    })
}

fn run_real(cli: &Cli) -> Result<bool, String> {
    if cli.seeds.is_some() {
        return Err("--seeds applies to the deterministic mode (add --deterministic)".into());
    }
    let seed = cli.seed.unwrap_or_else(time_seed);
    let config = RealConfig {
        peers: usize::from(cli.peers.unwrap_or(3)),
        ops: cli.ops.unwrap_or(20_000),
        seed,
        faults: cli.faults,
        topology: cli.topology,
        keep: cli.keep.clone(),
    };
    let status = Status::new(cli.json);
    let report =
        real::run(&config, &|line| status.show(line)).map_err(|error| error.to_string())?;
    status.clear();
    if cli.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
        if !report.converged {
            println!(
                "reproduce the workload and faults: cargo xtask sim --seed {seed} --peers {} --ops {} --faults {} --topology {}",
                config.peers, config.ops, config.faults, config.topology
            );
        }
    }
    Ok(report.converged)
}

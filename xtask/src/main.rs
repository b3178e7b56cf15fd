//! Project automation, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! Tasks:
//! - `ci`: everything CI checks, in the order that fails fastest: formatting, clippy with warnings
//!   denied, all tests, docs with warnings denied, and `cargo deny` (licenses, bans, sources).
//! - `bench [NAME…] [--quick] [--json] [--report FILE]`: the benchmarks, each figure beside a
//!   baseline measured in the same run; `--report` writes them as markdown with the machine and
//!   date.
//! - `sim [OPTIONS]`: the multi-peer simulator in release mode (`crates/sim`; `docs/simulator.md`).
//!
//! One module per task; no dependencies beyond std, so `cargo xtask` builds in seconds.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "xtask talks to a person on a terminal"
)]

mod bench;
mod ci;
mod sim;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  ci                          fmt check, clippy -D warnings, tests, docs, cargo deny
  bench [NAME...] [--quick] [--json] [--report FILE]
                              run benchmarks (names: hlc, transport, bulk, sync); --quick
                              scales them down, --json prints one JSON object on the last
                              line, --report writes a markdown report to FILE
  sim [OPTIONS]               the multi-peer simulation (real engine, or --deterministic);
                              `cargo xtask sim --help` lists its options
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") if args.len() == 1 => ci::run(),
        Some("ci") => Err(format!("`ci` takes no arguments, got {:?}", &args[1..])),
        Some("bench") => bench::run(&args[1..]),
        Some("sim") => return sim::run(&args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown task {other:?}\n\n{USAGE}")),
        None => Err(format!("no task given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate's folder).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A `cargo` command run from the workspace root, using the cargo that runs xtask.
fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Runs `command`, echoing it first; an error names the command and its exit status.
fn exec(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}").replace('"', "");
    eprintln!("$ {shown}");
    let status = command.status().map_err(|error| format!("cannot start {shown}: {error}"))?;
    if status.success() { Ok(()) } else { Err(format!("{shown} failed ({status})")) }
}

//! The `lsync` command-line node: a reference application of the lsync library, with which a
//! person pairs real devices, indexes real folders, tags files and watches them sync, and with
//! which tests drive lsync from outside, as a user would.
//!
//! # Model
//! - A device is a folder (`DIR`): its library file, keys, pairings and configuration
//!   (`home`). `lsync init` creates one with a new library; `lsync join` creates one that
//!   joins an existing library through an invitation, or pairs an existing one.
//! - `lsync run DIR` is the node: one long-running process that owns the library, syncs with the
//!   paired devices over QUIC, and answers the other commands on a control endpoint on loopback
//!   (`control`), protected by a token in an owner-only file. It serves Prometheus metrics on
//!   a loopback address if configured (`metrics`).
//! - Every other command that changes the library is a `ops::Request`: sent to the running
//!   node if there is one, executed in the command's own process otherwise. Only one process
//!   owns a library at a time (the lock in `home`), so that one clock stamps its writes and one
//!   engine sees them. Read-only commands (`ls`, `tag list`) read the file directly.
//! - Indexing (`index`) walks a folder and compares it with the index in one pure step, so that
//!   adding and rescanning a location are the same code; rows are written in bulk.
//!
//! # Invariants
//! - Bad arguments and bad input end in one line on stderr and a non-zero exit (1; 2 for usage
//!   errors; 3 when the command needs the running node and it does not run), never in a panic.
//! - Answers go to stdout, hints and progress to stderr; `--json` prints one JSON object.
//! - The control endpoint listens on loopback only and refuses requests without the token.
//!
//! # What it does not do
//! It records no volumes, detects no moves (a moved file is deleted and re-added, and loses its
//! tags), follows no symbolic links, and does not watch folders: `lsync location rescan` picks
//! up changes.
//!
//! # Where the IO is
//! `node` (sockets, signals, the terminal), `control` and `metrics` (TCP on loopback),
//! `index::scan` (the file system), `catalog` and `ops` (the library), `output` (stdout
//! and stderr). `index::plan`, `progress` and the renderers in `output` are pure.

mod browse;
mod catalog;
mod cli;
mod commands;
mod control;
mod error;
mod home;
mod index;
mod metrics;
mod node;
mod ops;
mod output;
mod progress;
mod views;

use std::process::ExitCode;

use clap::Parser;

/// Runs `lsync` with the process's arguments and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout with code 0; usage errors to stderr with code 2.
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            output::error(&error::CliError::msg(format!(
                "cannot start the async runtime: {error}"
            )));
            return ExitCode::FAILURE;
        }
    };
    // Commands other than `run` (which sets up its own logging) log nothing unless RUST_LOG
    // asks.
    if !matches!(cli.command, cli::Command::Run { .. })
        && let Err(error) = node::init_logging(cli::LogFormat::Text, None)
    {
        output::error(&error);
        return ExitCode::FAILURE;
    }
    match runtime.block_on(commands::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            output::error(&error);
            error.exit_code()
        }
    }
}

#[cfg(test)]
mod docs_tests {
    use std::path::{Path, PathBuf};

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn user_guide() -> String {
        std::fs::read_to_string(workspace().join("docs/user-guide.md")).unwrap()
    }

    /// Every setting `lsync init` writes is in the user guide's table.
    #[test]
    fn the_user_guide_lists_every_setting() {
        let toml = lsync_node::config::SyncConfig::default().to_commented_toml();
        let keys: Vec<&str> = toml
            .lines()
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .filter_map(|line| line.split_once(" = ").map(|(key, _)| key))
            .filter(|key| key.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        assert!(keys.len() >= 30, "found only {keys:?}");
        let guide = user_guide();
        for key in keys {
            assert!(guide.contains(&format!("| `{key}` |")), "docs/user-guide.md lacks `{key}`");
        }
    }

    /// Every `lsync_*` metric any crate records is in the user guide's table.
    #[test]
    fn the_user_guide_lists_every_metric() {
        fn visit(dir: &Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    visit(&path, found);
                } else if path.extension().is_some_and(|ext| ext == "rs") {
                    for line in std::fs::read_to_string(&path).unwrap().lines() {
                        let records =
                            ["metrics::counter!(", "metrics::gauge!(", "metrics::histogram!("]
                                .iter()
                                .any(|call| line.contains(call));
                        if !(records || line.contains("_METRIC: &str")) {
                            continue;
                        }
                        if let Some(start) = line.find("\"lsync_") {
                            let name: String =
                                line[start + 1..].chars().take_while(|c| *c != '"').collect();
                            found.push(name);
                        }
                    }
                }
            }
        }
        let mut metrics = Vec::new();
        for entry in std::fs::read_dir(workspace().join("crates")).unwrap().flatten() {
            if entry.file_name() != "cli" {
                visit(&entry.path().join("src"), &mut metrics);
            }
        }
        metrics.sort();
        metrics.dedup();
        assert!(metrics.len() >= 25, "found only {metrics:?}");
        let guide = user_guide();
        for metric in metrics {
            assert!(guide.contains(&format!("| `{metric}")), "docs/user-guide.md lacks `{metric}`");
        }
    }
}

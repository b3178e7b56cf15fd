//! `cargo xtask ci`: what CI runs, locally the same.

use crate::{cargo, exec};

/// cargo-deny version installed when missing; pinned so every machine checks with the same rules.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// The simulator smoke run: 5 peers paired in a random graph (so changes cross devices not
/// paired with their origin), a fixed seed, a few thousand operations, every fault (`all`:
/// issue 16's `restore`, `recreate`, `retention`, `clock-jump` and `stall` among them).
const SIM_SMOKE: [&str; 10] =
    ["--ops", "3000", "--seed", "1", "--faults", "all", "--topology", "random", "--peers", "5"];

pub(crate) fn run() -> Result<(), String> {
    exec(cargo().args(["fmt", "--all", "--", "--check"]))?;
    exec(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    exec(cargo().args(["test", "--workspace", "--all-targets", "--locked"]))?;
    // A short run of the real simulator (the deterministic one runs a few hundred seeds inside
    // the tests above). Debug build: it reuses the test build, and dependencies are optimized.
    exec(cargo().args(["run", "--locked", "--package", "lsync-sim", "--"]).args(SIM_SMOKE))?;
    // Doc tests are not covered by --all-targets.
    exec(cargo().args(["test", "--workspace", "--doc", "--locked"]))?;
    exec(
        cargo()
            .args(["doc", "--workspace", "--no-deps", "--locked"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    ensure_cargo_deny()?;
    // The advisory database cannot be downloaded on these machines, so advisories are not checked.
    exec(cargo().args(["deny", "--locked", "check", "licenses", "bans", "sources"]))?;
    eprintln!("xtask ci: all checks passed");
    Ok(())
}

/// Installs cargo-deny from crates.io if this machine lacks it (about two minutes on 2 cores).
fn ensure_cargo_deny() -> Result<(), String> {
    let installed =
        cargo().args(["deny", "--version"]).output().is_ok_and(|output| output.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("xtask ci: cargo-deny is missing; installing {CARGO_DENY_VERSION} from crates.io");
    exec(cargo().args(["install", "--locked", "cargo-deny", "--version", CARGO_DENY_VERSION]))
}

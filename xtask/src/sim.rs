//! `cargo xtask sim [options]`: the multi-peer simulator (`crates/sim`), built in release mode and
//! run with the options given. Its exit status is passed through: non-zero when the devices did not
//! converge or the options were wrong (the simulator prints why, on one line).

use std::process::ExitCode;

use crate::cargo;

pub(crate) fn run(args: &[String]) -> ExitCode {
    let status = cargo()
        .args(["run", "--release", "--locked", "--package", "lsync-sim", "--"])
        .args(args)
        .status();
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        // The simulator (or cargo, if the build failed) already said why.
        Ok(status) => status
            .code()
            .and_then(|code| u8::try_from(code).ok())
            .map_or(ExitCode::FAILURE, ExitCode::from),
        Err(error) => {
            eprintln!("xtask: cannot run cargo: {error}");
            ExitCode::FAILURE
        }
    }
}

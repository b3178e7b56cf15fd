//! The `lsync` binary: everything is in the `lsync_cli` library, so that it is tested there.

fn main() -> std::process::ExitCode {
    lsync_cli::main()
}

//! The one error type of the CLI: a message for a person, shown on one line, and the exit code
//! that goes with it.

use std::fmt;
use std::process::ExitCode;

/// Exit code of an error in the command itself (bad input, a refused edit, a failed database).
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Exit code of a command that needs the running node when none runs for the device. Distinct,
/// so that scripts can tell "start the node first" from a real failure.
pub(crate) const EXIT_NOT_RUNNING: u8 = 3;

/// Why a command failed. Its `Display` is one line, without a trailing period.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// Anything a person has to read and act on.
    #[error("{0}")]
    Message(String),
    /// The command needs the running node (`lsync run DIR`) and there is none.
    #[error("the node of {dir} is not running: start it with `lsync run {dir}` first")]
    NotRunning {
        /// The device folder, as the user named it.
        dir: String,
    },
}

impl CliError {
    /// An error with this message.
    pub(crate) fn msg(message: impl fmt::Display) -> Self {
        CliError::Message(message.to_string())
    }

    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Message(_) => EXIT_FAILURE,
            CliError::NotRunning { .. } => EXIT_NOT_RUNNING,
        })
    }

    /// The message on one line: errors from below may carry line breaks (a TOML excerpt, say).
    pub(crate) fn one_line(&self) -> String {
        let text = self.to_string();
        text.split('\n')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Adds what the CLI was doing to an error from below.
pub(crate) trait Context<T> {
    /// Prefixes the error with `what` (computed only on error): "`what`: `error`".
    fn context(self, what: impl FnOnce() -> String) -> Result<T, CliError>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, CliError> {
        self.map_err(|error| CliError::Message(format!("{}: {error}", what())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line() {
        let error = CliError::msg("bad value\n  at line 3\n\n");
        assert_eq!(error.one_line(), "bad value at line 3");
    }

    #[test]
    fn not_running_names_the_command_to_start_the_node() {
        let error = CliError::NotRunning { dir: "a".into() };
        assert_eq!(
            error.one_line(),
            "the node of a is not running: start it with `lsync run a` first"
        );
        assert_eq!(error.exit_code(), ExitCode::from(EXIT_NOT_RUNNING));
    }
}

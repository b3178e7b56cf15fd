//! A device folder (`DIR`): what lives in it, its configuration, and the lock that makes one
//! process at a time the owner of its library.
//!
//! Layout:
//! - `library.db` (and SQLite's `-wal`/`-shm`): the library.
//! - `identity/`: the device's key and certificate (owner-only), from which its id derives.
//! - `peers`: the paired devices (owner-only, written by the transport).
//! - `config.toml`: every setting, commented (`lsync init` writes it).
//! - `node.lock`: locked (advisory, whole file) by whichever process owns the library: the
//!   running node, or a command working offline. The kernel releases it when that process ends,
//!   however it ends, so a crash never leaves a stale lock.
//! - `control.json`: where the running node's control endpoint listens and its token
//!   (owner-only). Present only while a node runs; a stale one (after a crash) is ignored,
//!   because only the lock says whether a node runs.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use lsync_node::config::{ConfigError, SyncConfig};

use crate::error::{CliError, Context};

/// The library file.
pub(crate) const LIBRARY_FILE: &str = "library.db";
/// The configuration file.
pub(crate) const CONFIG_FILE: &str = "config.toml";
/// The identity folder.
pub(crate) const IDENTITY_DIR: &str = "identity";
/// The pairings file.
pub(crate) const PEERS_FILE: &str = "peers";
/// The lock file.
pub(crate) const LOCK_FILE: &str = "node.lock";
/// The control endpoint's address and token.
pub(crate) const CONTROL_FILE: &str = "control.json";

/// A device folder.
#[derive(Debug, Clone)]
pub(crate) struct Home {
    dir: PathBuf,
}

impl Home {
    /// The folder `dir` (not checked).
    pub(crate) fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    /// The folder as the user named it, for messages.
    pub(crate) fn shown(&self) -> String {
        self.dir.display().to_string()
    }

    /// The folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn library_path(&self) -> PathBuf {
        self.dir.join(LIBRARY_FILE)
    }

    pub(crate) fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    pub(crate) fn identity_dir(&self) -> PathBuf {
        self.dir.join(IDENTITY_DIR)
    }

    pub(crate) fn peers_path(&self) -> PathBuf {
        self.dir.join(PEERS_FILE)
    }

    pub(crate) fn control_path(&self) -> PathBuf {
        self.dir.join(CONTROL_FILE)
    }

    /// Whether the folder holds a device (its library file exists).
    pub(crate) fn has_device(&self) -> bool {
        self.library_path().is_file()
    }

    /// Fails unless the folder holds a device.
    pub(crate) fn require_device(&self) -> Result<(), CliError> {
        if self.has_device() {
            Ok(())
        } else if !self.dir.exists() {
            Err(CliError::msg(format!(
                "{} does not exist: create a device there with `lsync init {0}` or `lsync join {0} TOKEN`",
                self.shown()
            )))
        } else {
            Err(CliError::msg(format!(
                "{} holds no lsync device (no {LIBRARY_FILE}): create one with `lsync init {0}` or `lsync join {0} TOKEN`",
                self.shown()
            )))
        }
    }

    /// The configuration: `config.toml` if present (defaults otherwise), then `LSYNC_*`
    /// environment variables, validated.
    pub(crate) fn load_config(&self) -> Result<SyncConfig, CliError> {
        let path = self.config_path();
        let result = match SyncConfig::from_env_and_file(Some(&path)) {
            Err(ConfigError::Missing { .. }) => SyncConfig::from_env_and_file(None),
            other => other,
        };
        result.map_err(CliError::msg)
    }

    /// Writes `config` as the commented configuration file, owner-only.
    pub(crate) fn write_config(&self, config: &SyncConfig) -> Result<(), CliError> {
        write_private(&self.config_path(), config.to_commented_toml().as_bytes())
    }

    /// Creates the folder (owner-only) if it does not exist.
    pub(crate) fn create_dir(&self) -> Result<(), CliError> {
        create_private_dir(&self.dir).context(|| format!("cannot create {}", self.shown()))
    }

    /// Takes the lock without waiting: `None` if another process holds it (a running node, or a
    /// command working offline).
    pub(crate) fn try_lock(&self) -> Result<Option<DeviceLock>, CliError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(DeviceLock { _file: file })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(error)) => {
                Err(CliError::msg(format!("cannot lock {}: {error}", path.display())))
            }
        }
    }
}

/// Ownership of a device folder's library, held until dropped (or the process ends).
#[derive(Debug)]
pub(crate) struct DeviceLock {
    _file: File,
}

/// Creates `dir` and its parents; the last component owner-only (0700) on Unix.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Writes `bytes` to `path` owner-only (0600 on Unix), atomically: a reader sees the old or the
/// new content, never a mix, and the file is never readable by others.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    lsync_transport::write_private_file(path, bytes)
        .context(|| format!("cannot write {}", path.display()))
}

/// This machine's name, for a new device's default name: the kernel's host name, else
/// `/etc/hostname`, else the `hostname` command, else "lsync device".
pub(crate) fn host_name() -> String {
    let from_file = |path: &str| fs::read_to_string(path).ok();
    let from_command = || {
        std::process::Command::new("hostname")
            .output()
            .ok()
            .filter(|output| output.status.success())
            .and_then(|output| String::from_utf8(output.stdout).ok())
    };
    from_file("/proc/sys/kernel/hostname")
        .or_else(|| from_file("/etc/hostname"))
        .or_else(from_command)
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "lsync device".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_holds_the_lock_and_it_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let held = home.try_lock().unwrap().expect("free at first");
        assert!(home.try_lock().unwrap().is_none(), "a second holder is refused");
        drop(held);
        assert!(home.try_lock().unwrap().is_some(), "free again once dropped");
    }

    #[cfg(unix)]
    #[test]
    fn private_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"token").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"token");
    }

    #[test]
    fn a_folder_without_a_library_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let error = Home::new(dir.path()).require_device().unwrap_err().one_line();
        assert!(error.contains("holds no lsync device"), "{error}");
        let missing = Home::new(&dir.path().join("nope")).require_device().unwrap_err();
        assert!(missing.one_line().contains("does not exist"), "{}", missing.one_line());
    }
}

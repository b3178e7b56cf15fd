//! The command line: every command, argument and option, declared with clap. The command names
//! and their arguments are a contract (scripts and tests rely on them); see
//! `docs/user-guide.md`.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// lsync: keep a library of files, tags and albums in sync between your devices, peer to peer.
#[derive(Debug, Parser)]
#[command(name = "lsync", version, propagate_version = true, max_term_width = 100)]
pub(crate) struct Cli {
    /// Print what the command answers as JSON (one object), for scripts.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create a device and a new library in DIR; prints the device id.
    Init {
        /// The device folder to create (library.db, keys, config.toml).
        dir: PathBuf,
        /// The name other devices see (default: this machine's host name).
        #[arg(long)]
        name: Option<String>,
        /// Where the node accepts sync connections (written to config.toml; default
        /// 0.0.0.0:7788).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Run the node in the foreground until SIGINT or SIGTERM: sync with paired devices, and
    /// serve the other commands.
    Run {
        dir: PathBuf,
        /// Where to accept sync connections, instead of the configured `listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Log lines as text or as JSON objects (filter with RUST_LOG).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Ask the running node for a single-use invitation; prints it as one line (a token).
    Invite {
        dir: PathBuf,
        /// How long the invitation stays valid ("10m", "1h", ...).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The address the joining device should use to reach this one (default: this
        /// machine's address on its default route, then loopback).
        #[arg(long, value_name = "IP")]
        address: Option<IpAddr>,
    },
    /// Join a library with an invitation from one of its devices: creates a device in DIR if
    /// there is none, and pairs it with the inviting device.
    Join {
        dir: PathBuf,
        /// The token `lsync invite` printed on the other device.
        token: String,
        /// The name other devices see, for a new device (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Where the new device's node accepts sync connections (written to config.toml).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Index folders of this device as locations.
    #[command(subcommand)]
    Location(LocationCommand),
    /// Create, rename and delete tags; tag and untag files and folders.
    #[command(subcommand)]
    Tag(TagCommand),
    /// Create, rename and delete albums; add and remove files and folders.
    #[command(subcommand)]
    Album(AlbumCommand),
    /// Set or remove a key/value note on a file or folder.
    #[command(subcommand)]
    Meta(MetaCommand),
    /// Browse the synced index of any device: its locations, folders and files, with tags.
    Ls {
        dir: PathBuf,
        /// A location, folder or file (a path on the device that indexed it).
        path: Option<PathBuf>,
        /// The device whose index to browse (a name, or an id or id prefix).
        #[arg(long)]
        device: Option<String>,
    },
    /// State of the device, its peers, watermarks and queues.
    Status { dir: PathBuf },
    /// The devices this one is paired with.
    Peers { dir: PathBuf },
    /// Remove a pairing: the device is no longer synced with (its data stays).
    Unpair {
        dir: PathBuf,
        /// The paired device (a name, or an id or id prefix).
        device: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum LocationCommand {
    /// Index the folder PATH (and everything in it) as a new location of this device.
    Add { dir: PathBuf, path: PathBuf },
    /// Pick up new, modified and deleted files and folders in the location at PATH.
    Rescan { dir: PathBuf, path: PathBuf },
    /// Remove the location at PATH and its entries from the library (the files stay on disk).
    Remove { dir: PathBuf, path: PathBuf },
}

/// Files or folders named by path, on one device.
#[derive(Debug, Args)]
pub(crate) struct Targets {
    /// Files or folders, by their path on the device that indexed them.
    #[arg(required = true, value_name = "FILE-PATH")]
    pub(crate) paths: Vec<PathBuf>,
    /// The device that indexed them, when several index the same path (a name or an id).
    #[arg(long)]
    pub(crate) device: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TagCommand {
    /// Create a tag.
    Create {
        dir: PathBuf,
        name: String,
        #[arg(long)]
        color: Option<String>,
    },
    /// Rename a tag (named by name or id).
    Rename { dir: PathBuf, tag: String, new_name: String },
    /// Delete a tag, and remove it from every file.
    Delete { dir: PathBuf, tag: String },
    /// Tag files or folders.
    Assign {
        dir: PathBuf,
        tag: String,
        #[command(flatten)]
        targets: Targets,
    },
    /// Remove a tag from files or folders.
    Unassign {
        dir: PathBuf,
        tag: String,
        #[command(flatten)]
        targets: Targets,
    },
    /// List the tags, or the files and folders with TAG.
    List { dir: PathBuf, tag: Option<String> },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AlbumCommand {
    /// Create an album.
    Create {
        dir: PathBuf,
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// Rename an album (named by name or id).
    Rename { dir: PathBuf, album: String, new_name: String },
    /// Delete an album (its files stay).
    Delete { dir: PathBuf, album: String },
    /// Add files or folders to an album.
    Add {
        dir: PathBuf,
        album: String,
        #[command(flatten)]
        targets: Targets,
    },
    /// Remove files or folders from an album.
    Remove {
        dir: PathBuf,
        album: String,
        #[command(flatten)]
        targets: Targets,
    },
    /// List the albums, or the files and folders in ALBUM.
    List { dir: PathBuf, album: Option<String> },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MetaCommand {
    /// Set KEY to VALUE on a file or folder.
    Set {
        dir: PathBuf,
        #[arg(value_name = "FILE-PATH")]
        path: PathBuf,
        key: String,
        value: String,
        #[arg(long)]
        device: Option<String>,
    },
    /// Remove KEY from a file or folder.
    Unset {
        dir: PathBuf,
        #[arg(value_name = "FILE-PATH")]
        path: PathBuf,
        key: String,
        #[arg(long)]
        device: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_commands_parse() {
        for line in [
            "lsync init a --name laptop",
            "lsync run a --listen 127.0.0.1:7789",
            "lsync invite a",
            "lsync join b lsync1:TOKEN --name desktop",
            "lsync location add a /tmp/x",
            "lsync location rescan a /tmp/x",
            "lsync tag create a work",
            "lsync tag rename a work job",
            "lsync tag delete a job",
            "lsync tag assign a work /tmp/x/f",
            "lsync tag unassign a work /tmp/x/f",
            "lsync album create a trip",
            "lsync album add a trip /tmp/x/f /tmp/x/g --device laptop",
            "lsync meta set a /tmp/x/f rating 5",
            "lsync ls a --device laptop /tmp/x",
            "lsync status a --json",
            "lsync peers a",
            "lsync unpair a desktop",
        ] {
            let words = line.split_whitespace();
            if let Err(error) = Cli::try_parse_from(words) {
                panic!("{line}: {error}");
            }
        }
    }
}

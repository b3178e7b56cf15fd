//! Each command: argument checks, then either a request to the device (`dispatch`), a read of
//! the library file (`browse`), or the node itself (`node::run`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lsync_hlc::DeviceId;
use lsync_node::Library;
use lsync_node::config::{SyncConfig, parse_duration};
use lsync_protocol::LibraryId;
use lsync_transport::{Identity, Invitation};
use uuid::Uuid;

use crate::browse;
use crate::catalog::{GroupKind, normalize};
use crate::cli::{AlbumCommand, Cli, Command, LocationCommand, MetaCommand, TagCommand, Targets};
use crate::control::{self, ControlInfo};
use crate::error::{CliError, Context};
use crate::home::{self, Home};
use crate::node;
use crate::ops::{self, Device, EntryRefs, Group, Request};
use crate::output;
use crate::views::Reply;

/// How long a command waits for a device that is in use to answer: 10 s. A node that has just
/// been started needs a moment before its control endpoint is up; a command working offline on
/// the device (another `lsync location add`, say) may take a while.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// How often a command looks again at a busy device: 100 ms.
const BUSY_POLL: Duration = Duration::from_millis(100);

/// Runs the command line.
pub(crate) async fn execute(cli: Cli) -> Result<(), CliError> {
    let json = cli.json;
    let home = |dir: &Path| Home::new(dir);
    match cli.command {
        Command::Init { dir, name, listen } => init(&home(&dir), name, listen, json).await,
        Command::Run { dir, listen, log_format } => {
            node::run(&home(&dir), listen, log_format, json).await
        }
        Command::Invite { dir, ttl, address } => {
            let ttl = parse_duration(&ttl).context(|| format!("--ttl {ttl:?}"))?;
            if ttl.is_zero() {
                return Err(CliError::msg("--ttl must be longer than 0s"));
            }
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            request(&home(&dir), Request::Invite { ttl_ms, advertise: address }, json).await
        }
        Command::Join { dir, token, name, listen } => {
            join(&home(&dir), token, name, listen, json).await
        }
        Command::Location(command) => {
            let (dir, req) = match command {
                LocationCommand::Add { dir, path } => {
                    (dir, Request::LocationAdd { path: existing_folder(&path)? })
                }
                LocationCommand::Rescan { dir, path } => {
                    (dir, Request::LocationRescan { path: existing_folder(&path)? })
                }
                LocationCommand::Remove { dir, path } => {
                    (dir, Request::LocationRemove { path: normalize(&path)? })
                }
            };
            request(&home(&dir), req, json).await
        }
        Command::Tag(command) => {
            let kind = Group::Tag;
            let (dir, req) = match command {
                TagCommand::Create { dir, name, color } => {
                    (dir, Request::GroupCreate { kind, name, note: color })
                }
                TagCommand::Rename { dir, tag, new_name } => {
                    (dir, Request::GroupRename { kind, group: tag, name: new_name })
                }
                TagCommand::Delete { dir, tag } => (dir, Request::GroupDelete { kind, group: tag }),
                TagCommand::Assign { dir, tag, targets } => {
                    (dir, Request::GroupAdd { kind, group: tag, entries: refs(targets)? })
                }
                TagCommand::Unassign { dir, tag, targets } => {
                    (dir, Request::GroupRemove { kind, group: tag, entries: refs(targets)? })
                }
                TagCommand::List { dir, tag } => {
                    return browse::groups(&home(&dir), GroupKind::Tag, tag, json).await;
                }
            };
            request(&home(&dir), req, json).await
        }
        Command::Album(command) => {
            let kind = Group::Album;
            let (dir, req) = match command {
                AlbumCommand::Create { dir, name, description } => {
                    (dir, Request::GroupCreate { kind, name, note: description })
                }
                AlbumCommand::Rename { dir, album, new_name } => {
                    (dir, Request::GroupRename { kind, group: album, name: new_name })
                }
                AlbumCommand::Delete { dir, album } => {
                    (dir, Request::GroupDelete { kind, group: album })
                }
                AlbumCommand::Add { dir, album, targets } => {
                    (dir, Request::GroupAdd { kind, group: album, entries: refs(targets)? })
                }
                AlbumCommand::Remove { dir, album, targets } => {
                    (dir, Request::GroupRemove { kind, group: album, entries: refs(targets)? })
                }
                AlbumCommand::List { dir, album } => {
                    return browse::groups(&home(&dir), GroupKind::Album, album, json).await;
                }
            };
            request(&home(&dir), req, json).await
        }
        Command::Meta(command) => {
            let (dir, req) = match command {
                MetaCommand::Set { dir, path, key, value, device } => {
                    let entry = refs(Targets { paths: vec![path], device })?;
                    (dir, Request::MetaSet { entry, key, value })
                }
                MetaCommand::Unset { dir, path, key, device } => {
                    let entry = refs(Targets { paths: vec![path], device })?;
                    (dir, Request::MetaUnset { entry, key })
                }
            };
            request(&home(&dir), req, json).await
        }
        Command::Ls { dir, path, device } => browse::ls(&home(&dir), path, device, json).await,
        Command::Status { dir } => request(&home(&dir), Request::Status, json).await,
        Command::Peers { dir } => request(&home(&dir), Request::Peers, json).await,
        Command::Unpair { dir, device } => {
            request(&home(&dir), Request::Unpair { device }, json).await
        }
    }
}

/// Paths made absolute and normalized here, where the user's current folder is known (the node
/// runs elsewhere).
fn refs(targets: Targets) -> Result<EntryRefs, CliError> {
    let paths = targets.paths.iter().map(|path| normalize(path)).collect::<Result<_, _>>()?;
    Ok(EntryRefs { paths, device: targets.device })
}

/// A folder that exists here, by its real path.
fn existing_folder(path: &Path) -> Result<PathBuf, CliError> {
    let real = path.canonicalize().context(|| format!("cannot open {}", path.display()))?;
    if real.is_dir() {
        Ok(real)
    } else {
        Err(CliError::msg(format!("{} is not a folder", path.display())))
    }
}

/// Sends `request` to the device and prints the reply.
async fn request(home: &Home, request: Request, json: bool) -> Result<(), CliError> {
    let reply = dispatch(home, request).await?;
    show(home, reply, json)
}

/// Carries out `request` where the device's library is: in its running node (through the
/// control endpoint), or, when no node runs, in this process (holding the device's lock for the
/// duration). A device in use by another command is waited for, up to [`BUSY_WAIT`].
pub(crate) async fn dispatch(home: &Home, request: Request) -> Result<Reply, CliError> {
    home.require_device()?;
    let deadline = Instant::now() + BUSY_WAIT;
    loop {
        if let Some(lock) = home.try_lock()? {
            if request.needs_node() {
                return Err(CliError::NotRunning { dir: home.shown() });
            }
            let reply = offline(home, request).await;
            drop(lock);
            return reply;
        }
        if let Some(info) = ControlInfo::read(home)
            && let Some(reply) = control::call(&info, &request).await?
        {
            return Ok(reply);
        }
        if Instant::now() >= deadline {
            let pid = ControlInfo::read(home).map(|info| format!(" (pid {})", info.pid));
            return Err(CliError::msg(format!(
                "{} is in use by another lsync process{} that does not answer: a node still \
                 starting, or a command still working; try again",
                home.shown(),
                pid.unwrap_or_default()
            )));
        }
        tokio::time::sleep(BUSY_POLL).await;
    }
}

/// Carries out `request` on the library opened in this process (no node runs).
async fn offline(home: &Home, request: Request) -> Result<Reply, CliError> {
    let config = home.load_config()?;
    let library = node::open_library(home, &config).await?;
    let device = Device { home: home.clone(), library: library.clone(), config, transport: None };
    let result = device.execute(request).await;
    drop(device);
    library.close().await.map_err(ops::library_error)?;
    result
}

fn show(home: &Home, reply: Reply, json: bool) -> Result<(), CliError> {
    if json {
        return match &reply {
            Reply::Status(view) => output::json(view),
            Reply::Peers(view) => output::json(view),
            Reply::Invitation(view) => output::json(view),
            Reply::Joined(view) => output::json(view),
            Reply::Unpaired(view) => output::json(view),
            Reply::Indexed(view) => output::json(view),
            Reply::Edited(view) => output::json(view),
        };
    }
    let dir = home.shown();
    match reply {
        Reply::Status(view) => output::answer(&output::status_text(&view, output::now_ms())),
        Reply::Peers(view) => output::answer(&output::peers_text(&view, output::now_ms())),
        Reply::Invitation(view) => {
            output::answer(&view.token);
            output::note(&format!(
                "single use, valid until {} UTC; on the other device run: lsync join DIR TOKEN",
                output::utc(i64::try_from(view.expires_at_ms).unwrap_or(i64::MAX))
            ));
        }
        Reply::Joined(view) => {
            if view.created {
                output::answer(&view.device);
            }
            let then = if view.running {
                "syncing now".to_owned()
            } else {
                format!("start the node with `lsync run {dir}` to sync")
            };
            output::note(&format!(
                "{} device {} paired with {} ({}); {then}",
                if view.created { "new" } else { "this" },
                view.device,
                view.peer_name,
                view.peer
            ));
        }
        Reply::Unpaired(view) => {
            output::answer(&format!("unpaired {} ({})", view.name, view.device));
        }
        Reply::Indexed(view) => output::answer(&output::index_text(&view)),
        Reply::Edited(view) => output::answer(&view.message),
    }
    Ok(())
}

/// `lsync init`.
async fn init(
    home: &Home,
    name: Option<String>,
    listen: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    if home.has_device() {
        return Err(CliError::msg(format!(
            "{} already holds an lsync device: start it with `lsync run {0}`",
            home.shown()
        )));
    }
    let library = LibraryId(Uuid::new_v4());
    let (device, config) = create_device(home, library, name, listen, false).await?;
    if json {
        output::json(&serde_json::json!({
            "device": device.to_string(),
            "library": library.to_string(),
            "name": config.device_name,
        }))
    } else {
        output::answer(&device.to_string());
        output::note(&format!(
            "created device {:?} in a new library {library}; start it with `lsync run {}`",
            config.device_name,
            home.shown()
        ));
        Ok(())
    }
}

/// Creates a device of `library` in the folder: its configuration (kept if the folder has one),
/// identity and library file, and its row in the `devices` table. The library's first device
/// holds a complete copy; a `joining` one starts empty and backfills from its first complete
/// peer when its node runs.
async fn create_device(
    home: &Home,
    library: LibraryId,
    name: Option<String>,
    listen: Option<String>,
    joining: bool,
) -> Result<(DeviceId, SyncConfig), CliError> {
    home.create_dir()?;
    let Some(lock) = home.try_lock()? else {
        return Err(CliError::msg(format!("{} is in use by another lsync process", home.shown())));
    };
    let path = home.config_path();
    let existing = path.exists();
    let mut file_config = if existing {
        SyncConfig::load(&path).map_err(CliError::msg)?
    } else {
        SyncConfig::default()
    };
    if let Some(name) = name {
        file_config.device_name = name;
    } else if file_config.device_name.is_empty() {
        file_config.device_name = home::host_name();
    }
    if let Some(listen) = listen {
        file_config.listen = listen;
    }
    file_config.validate().map_err(CliError::msg)?;
    if !existing || file_config != SyncConfig::load(&path).map_err(CliError::msg)? {
        home.write_config(&file_config)?;
    }
    // The file, then the environment's overrides (which are not written to the file).
    let config = home.load_config()?;
    let identity = Identity::load_or_create(&home.identity_dir()).map_err(CliError::msg)?;
    let registry = Arc::new(lsync_store::reference_registry().map_err(CliError::msg)?);
    let (path, device) = (home.library_path(), identity.device());
    let opened = if joining {
        Library::join(&path, registry, library, device, config.clone()).await
    } else {
        Library::create(&path, registry, library, device, config.clone()).await
    }
    .context(|| format!("cannot create the library in {}", home.shown()))?;
    let written = ops::ensure_device_row(&opened, &config.device_name).await;
    opened.close().await.map_err(ops::library_error)?;
    written?;
    drop(lock);
    Ok((identity.device(), config))
}

/// `lsync join`.
async fn join(
    home: &Home,
    token: String,
    name: Option<String>,
    listen: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let invitation = Invitation::from_token(&token).map_err(CliError::msg)?;
    let existed = home.dir().exists();
    let created = if home.has_device() {
        if name.is_some() || listen.is_some() {
            return Err(CliError::msg(format!(
                "{} already holds a device: --name and --listen apply only to a new one (edit {} instead)",
                home.shown(),
                home.config_path().display()
            )));
        }
        false
    } else {
        create_device(home, invitation.library, name, listen, true).await?;
        true
    };
    match dispatch(home, Request::Join { token }).await {
        Ok(Reply::Joined(mut view)) => {
            view.created = created;
            show(home, Reply::Joined(view), json)
        }
        Ok(other) => Err(CliError::msg(format!("unexpected answer to join: {other:?}"))),
        Err(error) if created => {
            remove_new_device(home, existed);
            Err(CliError::msg(format!(
                "{}; no device was created in {}",
                error.one_line(),
                home.shown()
            )))
        }
        Err(error) => Err(error),
    }
}

/// Removes what `create_device` made, after a failed join: the whole folder if this command
/// created it, else only the device's files.
fn remove_new_device(home: &Home, folder_existed: bool) {
    if !folder_existed {
        let _ = std::fs::remove_dir_all(home.dir());
        return;
    }
    let library = home.library_path();
    for file in [
        library.clone(),
        PathBuf::from(format!("{}-wal", library.display())),
        PathBuf::from(format!("{}-shm", library.display())),
        home.config_path(),
        home.peers_path(),
        home.dir().join(home::LOCK_FILE),
    ] {
        let _ = std::fs::remove_file(file);
    }
    let _ = std::fs::remove_dir_all(home.identity_dir());
}

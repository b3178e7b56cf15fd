//! Requests to a device and how they are carried out on an open library.
//!
//! The same [`Request`] is executed in one of two places, and gives the same result in both:
//! - in the running node (`lsync run`), which received it on its control endpoint: the library,
//!   the engine and the transport are there, and writes are broadcast at once;
//! - in the command's own process when no node runs: it takes the device's lock, opens the
//!   library, executes, and closes it; writes reach peers at the next `lsync run` (catch-up).
//!
//! One process owns a library at a time, so that its clock and its engine see every write. See
//! `dispatch` in `lib.rs` for the choice between the two.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lsync_hlc::DeviceId;
use lsync_node::config::SyncConfig;
use lsync_node::{Edit, Library, LibraryError, RowEdit};
use lsync_protocol::{MAX_TEXT_BYTES, Value};
use lsync_shared_sync::SharedError;
use lsync_store::Registry;
use lsync_transport::{
    FilePeerStore, Identity, Invitation, LocalDevice, PairedPeer, PeerStore, QuicOptions,
    QuicTransport, Transport,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::{Catalog, Found, GroupKind, GroupRow};
use crate::error::{CliError, Context};
use crate::home::Home;
use crate::index::{self, Counts, Plan};
use crate::progress::count;
use crate::views::{
    EditReport, IndexReport, InvitationView, JoinedView, PeerView, PeersView, Reply, StatusView,
    UnpairedView,
};

/// Rows written per transaction when indexing: 10,000. `docs/benchmarks.md` measured 10,000-
/// and 100,000-row transactions equally fast (about 220,000 rows/s), the smaller holding a fifth
/// of the memory; each chunk is also two full batches for peers.
pub(crate) const INDEX_CHUNK_ROWS: usize = 10_000;

/// The longest metadata value: 64 KiB. Metadata is notes and labels, not file content, and a
/// batch of such changes must stay far below the protocol's 8 MiB message limit.
pub(crate) const MAX_META_VALUE_BYTES: usize = 64 * 1024;

/// A request to a device. Serialized as JSON on the control endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    Status,
    Peers,
    Invite { ttl_ms: u64, advertise: Option<IpAddr> },
    Join { token: String },
    Unpair { device: String },
    LocationAdd { path: PathBuf },
    LocationRescan { path: PathBuf },
    LocationRemove { path: PathBuf },
    GroupCreate { kind: Group, name: String, note: Option<String> },
    GroupRename { kind: Group, group: String, name: String },
    GroupDelete { kind: Group, group: String },
    GroupAdd { kind: Group, group: String, entries: EntryRefs },
    GroupRemove { kind: Group, group: String, entries: EntryRefs },
    MetaSet { entry: EntryRefs, key: String, value: String },
    MetaUnset { entry: EntryRefs, key: String },
}

impl Request {
    /// Whether only a running node can carry it out.
    pub(crate) fn needs_node(&self) -> bool {
        matches!(self, Request::Invite { .. })
    }
}

/// Tags or albums, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Group {
    Tag,
    Album,
}

impl From<Group> for GroupKind {
    fn from(group: Group) -> Self {
        match group {
            Group::Tag => GroupKind::Tag,
            Group::Album => GroupKind::Album,
        }
    }
}

/// Files or folders of the index, by path (absolute, normalized by the client), on the device
/// named by `device` (a name or id) or found as `Catalog::find` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EntryRefs {
    pub(crate) paths: Vec<PathBuf>,
    pub(crate) device: Option<String>,
}

/// An open device: its library, and its transport when the node runs.
pub(crate) struct Device {
    pub(crate) home: Home,
    pub(crate) library: Library,
    pub(crate) config: SyncConfig,
    pub(crate) transport: Option<QuicTransport>,
}

impl Device {
    fn catalog(&self) -> Catalog<'_> {
        Catalog::new(self.library.reader())
    }

    fn me(&self) -> DeviceId {
        self.library.identity().device
    }

    /// Carries out `request`.
    pub(crate) async fn execute(&self, request: Request) -> Result<Reply, CliError> {
        match request {
            Request::Status => self.status().await.map(|view| Reply::Status(Box::new(view))),
            Request::Peers => self.peers().await.map(Reply::Peers),
            Request::Invite { ttl_ms, advertise } => {
                self.invite(Duration::from_millis(ttl_ms), advertise).await.map(Reply::Invitation)
            }
            Request::Join { token } => self.join(&token).await.map(Reply::Joined),
            Request::Unpair { device } => self.unpair(&device).await.map(Reply::Unpaired),
            Request::LocationAdd { path } => self.location_add(&path).await.map(Reply::Indexed),
            Request::LocationRescan { path } => {
                self.location_rescan(&path).await.map(Reply::Indexed)
            }
            Request::LocationRemove { path } => {
                self.location_remove(&path).await.map(Reply::Indexed)
            }
            Request::GroupCreate { kind, name, note } => {
                self.group_create(kind.into(), name, note).await.map(Reply::Edited)
            }
            Request::GroupRename { kind, group, name } => {
                self.group_rename(kind.into(), &group, name).await.map(Reply::Edited)
            }
            Request::GroupDelete { kind, group } => {
                self.group_delete(kind.into(), &group).await.map(Reply::Edited)
            }
            Request::GroupAdd { kind, group, entries } => {
                self.group_members(kind.into(), &group, &entries, true).await.map(Reply::Edited)
            }
            Request::GroupRemove { kind, group, entries } => {
                self.group_members(kind.into(), &group, &entries, false).await.map(Reply::Edited)
            }
            Request::MetaSet { entry, key, value } => {
                self.meta(&entry, key, Some(value)).await.map(Reply::Edited)
            }
            Request::MetaUnset { entry, key } => {
                self.meta(&entry, key, None).await.map(Reply::Edited)
            }
        }
    }

    async fn status(&self) -> Result<StatusView, CliError> {
        let status = self.library.status().await.map_err(library_error)?;
        let names = self.catalog().device_names().await?;
        let listen = self
            .transport
            .as_ref()
            .and_then(|transport| transport.local_addr().ok())
            .map(|address| address.to_string());
        Ok(StatusView::new(
            &status,
            self.config.device_name.clone(),
            self.transport.is_some(),
            listen,
            &names,
        ))
    }

    /// Paired devices: the transport's pairings, with what the library knows of each.
    async fn paired(&self) -> Result<Vec<PairedPeer>, CliError> {
        match &self.transport {
            Some(transport) => Ok(transport.paired_peers()),
            None => FilePeerStore::open(self.home.peers_path())
                .and_then(|store| store.paired())
                .map_err(CliError::msg),
        }
    }

    async fn peers(&self) -> Result<PeersView, CliError> {
        let status = self.library.status().await.map_err(library_error)?;
        let mut peers: Vec<PeerView> = self
            .paired()
            .await?
            .into_iter()
            .map(|paired| {
                let known = status.peers.iter().find(|peer| peer.device == paired.device);
                PeerView {
                    device: paired.device.to_string(),
                    name: known.map_or(paired.name.clone(), |peer| peer.name.clone()),
                    online: known.is_some_and(|peer| peer.online),
                    addresses: paired.addresses.iter().map(ToString::to_string).collect(),
                    last_seen_ms: known.and_then(|peer| peer.last_seen_ms),
                }
            })
            .collect();
        peers.sort_by(|a, b| (&a.name, &a.device).cmp(&(&b.name, &b.device)));
        Ok(PeersView { running: self.transport.is_some(), peers })
    }

    async fn invite(
        &self,
        ttl: Duration,
        advertise: Option<IpAddr>,
    ) -> Result<InvitationView, CliError> {
        let Some(transport) = &self.transport else {
            return Err(CliError::NotRunning { dir: self.home.shown() });
        };
        let mut invitation =
            transport.invite(ttl).await.context(|| "cannot issue an invitation".to_owned())?;
        let listen =
            transport.local_addr().context(|| "the transport has no address".to_owned())?;
        let ips = advertised_ips(listen.ip(), advertise);
        invitation.addresses = ips.iter().map(|ip| SocketAddr::new(*ip, listen.port())).collect();
        if let Some(first) = ips.first() {
            invitation.pairing_address.set_ip(*first);
        }
        Ok(InvitationView {
            token: invitation.to_token(),
            expires_at_ms: invitation.expires_at_ms,
            addresses: invitation.addresses.iter().map(ToString::to_string).collect(),
        })
    }

    async fn join(&self, token: &str) -> Result<JoinedView, CliError> {
        let invitation = Invitation::from_token(token).map_err(CliError::msg)?;
        let identity = self.library.identity();
        if invitation.library != identity.library {
            return Err(CliError::msg(format!(
                "the invitation is for library {}, but {} holds library {}",
                invitation.library,
                self.home.shown(),
                identity.library
            )));
        }
        let paired = match &self.transport {
            Some(transport) => transport.join(&invitation).await.map_err(pair_error)?,
            None => self.join_without_node(&invitation).await?,
        };
        Ok(JoinedView {
            library: identity.library.to_string(),
            device: identity.device.to_string(),
            created: false,
            peer: paired.device.to_string(),
            peer_name: paired.name,
            running: self.transport.is_some(),
        })
    }

    /// Pairs through a transport of its own, started for the exchange and stopped after it: the
    /// pairing is stored in the device's peers file, and the next `lsync run` connects.
    async fn join_without_node(&self, invitation: &Invitation) -> Result<PairedPeer, CliError> {
        let (transport, _events) =
            start_transport(&self.home, &self.library, &self.config, true).await?;
        let result = transport.join(invitation).await;
        transport.shutdown().await;
        result.map_err(pair_error)
    }

    async fn unpair(&self, text: &str) -> Result<UnpairedView, CliError> {
        let paired = self.paired().await?;
        let peer = {
            let device = match Uuid::parse_str(text.trim()) {
                Ok(id) => paired.iter().find(|peer| peer.device.0 == id),
                Err(_) => {
                    let named: Vec<&PairedPeer> = paired
                        .iter()
                        .filter(|peer| {
                            peer.name == text
                                || (text.len() >= 4
                                    && peer.device.to_string().starts_with(&text.to_lowercase()))
                        })
                        .collect();
                    if named.len() > 1 {
                        return Err(CliError::msg(format!(
                            "{} paired devices match {text:?}: name one by its id (see `lsync peers`)",
                            named.len()
                        )));
                    }
                    named.first().copied()
                }
            };
            device.cloned().ok_or_else(|| {
                CliError::msg(format!("no paired device is {text:?} (see `lsync peers`)"))
            })?
        };
        match &self.transport {
            Some(transport) => {
                transport.unpair(peer.device).map_err(CliError::msg)?;
            }
            None => {
                FilePeerStore::open(self.home.peers_path())
                    .and_then(|store| store.remove(peer.device))
                    .map_err(CliError::msg)?;
            }
        }
        self.library
            .with_transaction(async |conn| {
                lsync_watermark::sql::remove_peer(conn, peer.device).await
            })
            .await
            .map_err(library_error)?;
        Ok(UnpairedView { device: peer.device.to_string(), name: peer.name })
    }

    async fn location_add(&self, path: &Path) -> Result<IndexReport, CliError> {
        let root = folder(path)?;
        let shown = root.display().to_string();
        let text = location_text(&root)?;
        for location in self.catalog().locations(Some(self.me())).await? {
            let other = Path::new(&location.path);
            if other == root {
                return Err(CliError::msg(format!(
                    "{shown} is already a location: update it with `lsync location rescan`"
                )));
            }
            if root.starts_with(other) || other.starts_with(&root) {
                return Err(CliError::msg(format!(
                    "{shown} overlaps the location {}: a folder is indexed once",
                    location.path
                )));
            }
        }
        let started = Instant::now();
        let scan = scan_folder(&root).await?;
        let scan_ms = elapsed_ms(started);
        let location = Uuid::now_v7();
        let name = root
            .file_name()
            .map_or_else(|| text.clone(), |name| name.to_string_lossy().into_owned());
        let plan = index::plan(location, &[], &scan, Uuid::now_v7);
        let started = Instant::now();
        self.write_rows(
            "locations",
            vec![RowEdit::Upsert {
                id: location,
                values: vec![Value::Null, Value::Text(text.clone()), Value::Text(name)],
            }],
        )
        .await?;
        let counts = self.write_plan(plan).await?;
        Ok(IndexReport {
            action: "added".to_owned(),
            location: location.to_string(),
            path: text,
            counts,
            skipped: scan.skipped,
            unreadable: scan.unreadable.iter().map(|dir| dir.display().to_string()).collect(),
            scan_ms,
            write_ms: elapsed_ms(started),
        })
    }

    /// This device's location at `path` exactly.
    async fn own_location(&self, path: &Path) -> Result<crate::catalog::LocationRow, CliError> {
        let locations = self.catalog().locations(Some(self.me())).await?;
        locations.into_iter().find(|location| Path::new(&location.path) == path).ok_or_else(|| {
            CliError::msg(format!(
                "{} is not a location of this device (see `lsync ls DIR`; add it with `lsync location add`)",
                path.display()
            ))
        })
    }

    async fn location_rescan(&self, path: &Path) -> Result<IndexReport, CliError> {
        let root = folder(path)?;
        let location = self.own_location(&root).await?;
        let existing = self.catalog().location_entries(location.id).await?;
        let started = Instant::now();
        let scan = scan_folder(&root).await?;
        let scan_ms = elapsed_ms(started);
        let plan = index::plan(location.id, &existing, &scan, Uuid::now_v7);
        let started = Instant::now();
        let counts = self.write_plan(plan).await?;
        Ok(IndexReport {
            action: "rescanned".to_owned(),
            location: location.id.to_string(),
            path: location.path,
            counts,
            skipped: scan.skipped,
            unreadable: scan.unreadable.iter().map(|dir| dir.display().to_string()).collect(),
            scan_ms,
            write_ms: elapsed_ms(started),
        })
    }

    async fn location_remove(&self, path: &Path) -> Result<IndexReport, CliError> {
        let location = self.own_location(path).await?;
        let existing = self.catalog().location_entries(location.id).await?;
        let started = Instant::now();
        let deletes: Vec<RowEdit> = existing
            .iter()
            .filter(|entry| entry.parent.is_none())
            .map(|entry| {
                if entry.is_dir() {
                    RowEdit::DeleteSubtree { id: entry.id }
                } else {
                    RowEdit::Delete { id: entry.id }
                }
            })
            .collect();
        for chunk in deletes.chunks(INDEX_CHUNK_ROWS) {
            self.write_rows("entries", chunk.to_vec()).await?;
        }
        self.write_rows("locations", vec![RowEdit::Delete { id: location.id }]).await?;
        Ok(IndexReport {
            action: "removed".to_owned(),
            location: location.id.to_string(),
            path: location.path,
            counts: Counts { deleted: existing.len() as u64, ..Counts::default() },
            skipped: 0,
            unreadable: Vec::new(),
            scan_ms: 0,
            write_ms: elapsed_ms(started),
        })
    }

    async fn write_rows(&self, model: &str, edits: Vec<RowEdit>) -> Result<(), CliError> {
        self.library.write_rows(model, edits).await.map(drop).map_err(library_error)
    }

    /// Writes a plan's deletions, then its upserts (parents first), in chunks.
    async fn write_plan(&self, plan: Plan) -> Result<Counts, CliError> {
        let Plan { deletes, upserts, counts } = plan;
        for chunk in deletes.chunks(INDEX_CHUNK_ROWS) {
            self.write_rows("entries", chunk.to_vec()).await?;
        }
        let mut upserts = upserts.into_iter();
        loop {
            let chunk: Vec<RowEdit> = upserts.by_ref().take(INDEX_CHUNK_ROWS).collect();
            if chunk.is_empty() {
                break;
            }
            self.write_rows("entries", chunk).await?;
        }
        Ok(counts)
    }

    async fn write_shared(&self, edits: Vec<Edit>) -> Result<(), SharedWriteError> {
        match self.library.write_shared(edits).await {
            Ok(_) => Ok(()),
            Err(LibraryError::Shared(SharedError::AlreadyExists { .. })) => {
                Err(SharedWriteError::AlreadyExists)
            }
            Err(LibraryError::Shared(SharedError::NotFound { .. })) => {
                Err(SharedWriteError::NotFound)
            }
            Err(error) => Err(SharedWriteError::Other(library_error(error))),
        }
    }

    async fn group_create(
        &self,
        kind: GroupKind,
        name: String,
        note: Option<String>,
    ) -> Result<EditReport, CliError> {
        check_text(kind.noun(), "name", &name)?;
        if let Some(note) = &note {
            check_text(kind.noun(), kind.note_column(), note)?;
        }
        if let Some(existing) =
            self.catalog().groups(kind).await?.into_iter().find(|group| group.name == name)
        {
            return Err(CliError::msg(format!(
                "a {} named {name:?} exists already (id {})",
                kind.noun(),
                existing.id
            )));
        }
        let id = Uuid::now_v7();
        let mut fields =
            std::collections::BTreeMap::from([("name".to_owned(), Value::Text(name.clone()))]);
        if let Some(note) = note {
            fields.insert(kind.note_column().to_owned(), Value::Text(note));
        }
        self.write_shared(vec![Edit::Insert { model: kind.model().to_owned(), id, fields }])
            .await
            .map_err(SharedWriteError::into_cli)?;
        Ok(EditReport {
            message: format!("created {} {name:?}", kind.noun()),
            model: kind.model().to_owned(),
            id: id.to_string(),
            changed: true,
        })
    }

    async fn group_rename(
        &self,
        kind: GroupKind,
        text: &str,
        name: String,
    ) -> Result<EditReport, CliError> {
        check_text(kind.noun(), "name", &name)?;
        let group = self.catalog().find_group(kind, text).await?;
        if group.name == name {
            return Ok(unchanged(
                kind,
                &group,
                format!("{} {name:?} already has that name", kind.noun()),
            ));
        }
        if self.catalog().groups(kind).await?.iter().any(|other| other.name == name) {
            return Err(CliError::msg(format!("a {} named {name:?} exists already", kind.noun())));
        }
        let fields =
            std::collections::BTreeMap::from([("name".to_owned(), Value::Text(name.clone()))]);
        self.write_shared(vec![Edit::Update {
            model: kind.model().to_owned(),
            id: group.id,
            fields,
        }])
        .await
        .map_err(SharedWriteError::into_cli)?;
        Ok(EditReport {
            message: format!("renamed {} {:?} to {name:?}", kind.noun(), group.name),
            model: kind.model().to_owned(),
            id: group.id.to_string(),
            changed: true,
        })
    }

    async fn group_delete(&self, kind: GroupKind, text: &str) -> Result<EditReport, CliError> {
        let group = self.catalog().find_group(kind, text).await?;
        // Memberships go with their group, so that none is left waiting for it.
        let mut edits: Vec<Edit> = self
            .catalog()
            .members(kind, group.id)
            .await?
            .into_iter()
            .map(|entry| Edit::Delete {
                model: kind.membership().to_owned(),
                id: Registry::membership_id(kind.membership(), group.id, entry),
            })
            .collect();
        let members = edits.len();
        edits.push(Edit::Delete { model: kind.model().to_owned(), id: group.id });
        self.write_shared(edits).await.map_err(SharedWriteError::into_cli)?;
        Ok(EditReport {
            message: format!(
                "deleted {} {:?} ({members} {} removed from it)",
                kind.noun(),
                group.name,
                count(members as u64, "entry", "entries")
            ),
            model: kind.model().to_owned(),
            id: group.id.to_string(),
            changed: true,
        })
    }

    /// Resolves entry paths to entry ids (location roots are refused: they are not entries).
    async fn entries(&self, refs: &EntryRefs) -> Result<Vec<(PathBuf, Uuid)>, CliError> {
        let catalog = self.catalog();
        let device = match &refs.device {
            Some(text) => Some(catalog.resolve_device(text).await?),
            None => None,
        };
        let mut entries = Vec::with_capacity(refs.paths.len());
        for path in &refs.paths {
            match catalog.find(path, device, self.me()).await? {
                Found::Entry(_, entry) => entries.push((path.clone(), entry.id)),
                Found::Location(location) => {
                    return Err(CliError::msg(format!(
                        "{} is the root of a location, not a file or folder in it",
                        location.path
                    )));
                }
            }
        }
        Ok(entries)
    }

    async fn group_members(
        &self,
        kind: GroupKind,
        text: &str,
        refs: &EntryRefs,
        add: bool,
    ) -> Result<EditReport, CliError> {
        let group = self.catalog().find_group(kind, text).await?;
        let entries = self.entries(refs).await?;
        let present: std::collections::BTreeSet<Uuid> =
            self.catalog().members(kind, group.id).await?.into_iter().collect();
        let membership = kind.membership();
        let mut changed = 0usize;
        for (_, entry) in &entries {
            let id = Registry::membership_id(membership, group.id, *entry);
            let edit = if add {
                if present.contains(entry) {
                    continue;
                }
                let fields = std::collections::BTreeMap::from([
                    (kind.member_column().to_owned(), Value::Blob(group.id.as_bytes().to_vec())),
                    ("entry_id".to_owned(), Value::Blob(entry.as_bytes().to_vec())),
                ]);
                Edit::Insert { model: membership.to_owned(), id, fields }
            } else {
                if !present.contains(entry) {
                    continue;
                }
                Edit::Delete { model: membership.to_owned(), id }
            };
            // One change per entry: a membership the projection does not show (waiting for a
            // row) may still exist, and must not fail the others.
            match self.write_shared(vec![edit]).await {
                Ok(()) => changed += 1,
                Err(SharedWriteError::AlreadyExists | SharedWriteError::NotFound) => {}
                Err(SharedWriteError::Other(error)) => return Err(error),
            }
        }
        let what = match entries.as_slice() {
            [(path, _)] => path.display().to_string(),
            _ => format!("{} entries", entries.len()),
        };
        let verb = match (kind, add) {
            (GroupKind::Tag, true) => "tagged",
            (GroupKind::Tag, false) => "untagged",
            (GroupKind::Album, true) => "added",
            (GroupKind::Album, false) => "removed",
        };
        let preposition = match (kind, add) {
            (GroupKind::Tag, true) => "with",
            (GroupKind::Tag, false) | (GroupKind::Album, false) => "from",
            (GroupKind::Album, true) => "to",
        };
        let unchanged = entries.len() - changed;
        let message = if unchanged == 0 {
            format!("{verb} {what} {preposition} {} {:?}", kind.noun(), group.name)
        } else {
            format!(
                "{verb} {changed} of {} {preposition} {} {:?} ({unchanged} already {})",
                count(entries.len() as u64, "entry", "entries"),
                kind.noun(),
                group.name,
                if add { "were" } else { "were not" }
            )
        };
        Ok(EditReport {
            message,
            model: membership.to_owned(),
            id: group.id.to_string(),
            changed: changed > 0,
        })
    }

    async fn meta(
        &self,
        refs: &EntryRefs,
        key: String,
        value: Option<String>,
    ) -> Result<EditReport, CliError> {
        check_text("metadata", "key", &key)?;
        if key.is_empty() {
            return Err(CliError::msg("a metadata key cannot be empty"));
        }
        if let Some(value) = &value
            && value.len() > MAX_META_VALUE_BYTES
        {
            return Err(CliError::msg(format!(
                "a metadata value is at most {MAX_META_VALUE_BYTES} bytes, this one is {}",
                value.len()
            )));
        }
        let entries = self.entries(refs).await?;
        let [(path, entry)] = entries.as_slice() else {
            return Err(CliError::msg("metadata is set on one file or folder at a time"));
        };
        let id = Registry::derived_id("user_metadata", &[entry.as_bytes(), key.as_bytes()]);
        let model = "user_metadata".to_owned();
        let shown = path.display();
        let report = |message: String, changed: bool| EditReport {
            message,
            model: model.clone(),
            id: id.to_string(),
            changed,
        };
        match value {
            Some(value) => {
                let current = self.catalog().metadata(*entry).await?;
                if current.get(&key) == Some(&Some(value.clone())) {
                    return Ok(report(format!("{key} of {shown} is already {value:?}"), false));
                }
                let fields = std::collections::BTreeMap::from([
                    ("entry_id".to_owned(), Value::Blob(entry.as_bytes().to_vec())),
                    ("key".to_owned(), Value::Text(key.clone())),
                    ("value".to_owned(), Value::Text(value.clone())),
                ]);
                let insert = Edit::Insert { model: model.clone(), id, fields };
                match self.write_shared(vec![insert]).await {
                    Ok(()) => {}
                    Err(SharedWriteError::AlreadyExists) => {
                        let fields = std::collections::BTreeMap::from([(
                            "value".to_owned(),
                            Value::Text(value.clone()),
                        )]);
                        self.write_shared(vec![Edit::Update { model: model.clone(), id, fields }])
                            .await
                            .map_err(SharedWriteError::into_cli)?;
                    }
                    Err(error) => return Err(error.into_cli()),
                }
                Ok(report(format!("set {key} of {shown} to {value:?}"), true))
            }
            None => {
                match self.write_shared(vec![Edit::Delete { model: model.clone(), id }]).await {
                    Ok(()) => Ok(report(format!("removed {key} from {shown}"), true)),
                    Err(SharedWriteError::NotFound) => {
                        Ok(report(format!("{shown} has no {key}"), false))
                    }
                    Err(error) => Err(error.into_cli()),
                }
            }
        }
    }
}

/// A shared write's outcome where the CLI treats some refusals as "already so".
enum SharedWriteError {
    AlreadyExists,
    NotFound,
    Other(CliError),
}

impl SharedWriteError {
    fn into_cli(self) -> CliError {
        match self {
            SharedWriteError::AlreadyExists => CliError::msg("the record exists already"),
            SharedWriteError::NotFound => CliError::msg("the record does not exist (any more)"),
            SharedWriteError::Other(error) => error,
        }
    }
}

fn unchanged(kind: GroupKind, group: &GroupRow, message: String) -> EditReport {
    EditReport { message, model: kind.model().to_owned(), id: group.id.to_string(), changed: false }
}

fn check_text(noun: &str, field: &str, text: &str) -> Result<(), CliError> {
    if text.trim().is_empty() && field == "name" {
        return Err(CliError::msg(format!("a {noun} name cannot be empty")));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(CliError::msg(format!(
            "a {noun} {field} is at most {MAX_TEXT_BYTES} bytes, this one is {}",
            text.len()
        )));
    }
    Ok(())
}

/// A library error as one line for a person.
pub(crate) fn library_error(error: LibraryError) -> CliError {
    CliError::msg(error)
}

fn pair_error(error: lsync_transport::PairError) -> CliError {
    CliError::msg(format!("pairing failed: {error}"))
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// `path` as a folder that exists here, by its real path.
fn folder(path: &Path) -> Result<PathBuf, CliError> {
    let real = path.canonicalize().context(|| format!("cannot open {}", path.display()))?;
    if !real.is_dir() {
        return Err(CliError::msg(format!("{} is not a folder", real.display())));
    }
    Ok(real)
}

/// A location's path as the index stores it: UTF-8, within the protocol's text limit.
fn location_text(path: &Path) -> Result<String, CliError> {
    let text = path.to_str().ok_or_else(|| {
        CliError::msg(format!("{} is not valid UTF-8 and cannot be a location", path.display()))
    })?;
    if text.len() > MAX_TEXT_BYTES {
        return Err(CliError::msg(format!(
            "the path {} is longer than {MAX_TEXT_BYTES} bytes",
            path.display()
        )));
    }
    Ok(text.to_owned())
}

async fn scan_folder(root: &Path) -> Result<index::Scan, CliError> {
    let root_owned = root.to_owned();
    tokio::task::spawn_blocking(move || index::scan(&root_owned))
        .await
        .context(|| "the folder walk failed".to_owned())?
        .context(|| format!("cannot read {}", root.display()))
}

/// The addresses an invitation advertises for a device listening on `listen`: `advertise` if
/// given; the listen address if it is a specific one; for a wildcard listen address, this
/// machine's address on its default route (so another machine can reach it) and then loopback
/// (for a device on the same machine, and for machines without a network).
pub(crate) fn advertised_ips(listen: IpAddr, advertise: Option<IpAddr>) -> Vec<IpAddr> {
    if let Some(ip) = advertise {
        return vec![ip];
    }
    if !listen.is_unspecified() {
        return vec![listen];
    }
    let (loopback, probe, any): (IpAddr, SocketAddr, SocketAddr) = match listen {
        IpAddr::V4(_) => (
            Ipv4Addr::LOCALHOST.into(),
            // TEST-NET-1 (RFC 5737): connecting a UDP socket only asks the kernel for a route;
            // nothing is sent.
            SocketAddr::from(([192, 0, 2, 1], 9)),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        ),
        IpAddr::V6(_) => (
            Ipv6Addr::LOCALHOST.into(),
            // The documentation prefix (RFC 3849), for the same route lookup.
            SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9)),
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        ),
    };
    let routed = UdpSocket::bind(any)
        .and_then(|socket| socket.connect(probe).map(|()| socket))
        .and_then(|socket| socket.local_addr())
        .map(|address| address.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback());
    routed.into_iter().chain([loopback]).collect()
}

/// Makes this device's row in the synced `devices` table carry `name` and this platform, so
/// that every device can show who indexed what.
pub(crate) async fn ensure_device_row(library: &Library, name: &str) -> Result<(), CliError> {
    let me = library.identity().device;
    let platform = std::env::consts::OS;
    let current = Catalog::new(library.reader())
        .devices()
        .await?
        .into_iter()
        .find(|device| device.id == me && device.platform.is_some());
    if current.is_some_and(|row| row.name == name && row.platform.as_deref() == Some(platform)) {
        return Ok(());
    }
    let values = vec![Value::Text(name.to_owned()), Value::Text(platform.to_owned())];
    library
        .write_rows("devices", vec![RowEdit::Upsert { id: me.0, values }])
        .await
        .map(drop)
        .map_err(library_error)
}

/// Starts a QUIC transport for `library` on the configured listen address. With
/// `fallback_to_any_port`, a port that is taken (by another device on this machine) is replaced
/// by a free one.
pub(crate) async fn start_transport(
    home: &Home,
    library: &Library,
    config: &SyncConfig,
    fallback_to_any_port: bool,
) -> Result<(QuicTransport, tokio::sync::mpsc::Receiver<lsync_transport::TransportEvent>), CliError>
{
    let listen: SocketAddr = config.listen.parse().map_err(|error| {
        CliError::msg(format!(
            "listen address {:?} is not an address and port: {error}",
            config.listen
        ))
    })?;
    let options = |listen: SocketAddr| -> Result<QuicOptions, CliError> {
        let identity = Identity::load_or_create(&home.identity_dir()).map_err(CliError::msg)?;
        let store: Arc<dyn PeerStore> =
            Arc::new(FilePeerStore::open(home.peers_path()).map_err(CliError::msg)?);
        let identity_library = library.identity();
        Ok(QuicOptions {
            identity,
            local: LocalDevice {
                library: identity_library.library,
                name: config.device_name.clone(),
                epoch: identity_library.epoch,
            },
            listen,
            store,
            config: config.transport_config(),
            watermarks: Some(library.watermark_source()),
        })
    };
    match QuicTransport::start(options(listen)?).await {
        Ok(started) => Ok(started),
        Err(lsync_transport::StartError::Bind { .. }) if fallback_to_any_port => {
            QuicTransport::start(options(SocketAddr::new(listen.ip(), 0))?)
                .await
                .map_err(CliError::msg)
        }
        Err(error) => Err(CliError::msg(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        let requests = [
            Request::Status,
            Request::Invite { ttl_ms: 3_600_000, advertise: Some("10.0.0.2".parse().unwrap()) },
            Request::GroupAdd {
                kind: Group::Tag,
                group: "work".into(),
                entries: EntryRefs { paths: vec!["/a/b".into()], device: Some("laptop".into()) },
            },
            Request::MetaSet {
                entry: EntryRefs { paths: vec!["/a".into()], device: None },
                key: "k".into(),
                value: "v".into(),
            },
        ];
        for request in requests {
            let text = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request, "{text}");
        }
    }

    #[test]
    fn invitations_advertise_a_reachable_address() {
        let any: IpAddr = Ipv4Addr::UNSPECIFIED.into();
        let ips = advertised_ips(any, None);
        assert_eq!(ips.last(), Some(&IpAddr::from(Ipv4Addr::LOCALHOST)));
        assert!(ips.iter().all(|ip| !ip.is_unspecified()));
        let specific: IpAddr = "127.0.0.5".parse().unwrap();
        assert_eq!(advertised_ips(specific, None), [specific]);
        let chosen: IpAddr = "192.168.1.20".parse().unwrap();
        assert_eq!(advertised_ips(any, Some(chosen)), [chosen]);
    }
}

//! The read side: what the synced tables say about devices, locations, entries, tags, albums
//! and metadata, and how the names a person types (a device name, a file path, a tag name) are
//! resolved to rows. Plain queries over any pool of the library file: the running node's readers
//! or a pool a command opens itself.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use lsync_hlc::DeviceId;
use lsync_store::ENTRY_KIND_DIRECTORY;
use lsync_store::sql::read_uuid;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use crate::error::{CliError, Context};

/// A device, from the synced `devices` table (or only known as a paired peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceRow {
    pub(crate) id: DeviceId,
    pub(crate) name: String,
    pub(crate) platform: Option<String>,
}

/// An indexed folder of some device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LocationRow {
    pub(crate) id: Uuid,
    pub(crate) owner: DeviceId,
    pub(crate) path: String,
    pub(crate) name: String,
}

/// A file or folder under a location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryRow {
    pub(crate) id: Uuid,
    pub(crate) parent: Option<Uuid>,
    pub(crate) name: String,
    pub(crate) kind: i64,
    pub(crate) size: i64,
    pub(crate) modified_ms: i64,
}

impl EntryRow {
    pub(crate) fn is_dir(&self) -> bool {
        self.kind == ENTRY_KIND_DIRECTORY
    }
}

/// A tag or an album, with how many entries it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupRow {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    /// A tag's colour, an album's description.
    pub(crate) note: Option<String>,
    pub(crate) entries: u64,
}

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// The root folder of a location.
    Location(LocationRow),
    /// An entry below a location's root.
    Entry(LocationRow, EntryRow),
}

impl Found {
    pub(crate) fn location(&self) -> &LocationRow {
        match self {
            Found::Location(location) | Found::Entry(location, _) => location,
        }
    }
}

/// Which of the two group models a command works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupKind {
    Tag,
    Album,
}

impl GroupKind {
    /// The shared model of the groups.
    pub(crate) fn model(self) -> &'static str {
        match self {
            GroupKind::Tag => "tags",
            GroupKind::Album => "albums",
        }
    }

    /// The membership model joining groups and entries.
    pub(crate) fn membership(self) -> &'static str {
        match self {
            GroupKind::Tag => "tag_assignments",
            GroupKind::Album => "album_entries",
        }
    }

    /// The membership's column naming the group.
    pub(crate) fn member_column(self) -> &'static str {
        match self {
            GroupKind::Tag => "tag_id",
            GroupKind::Album => "album_id",
        }
    }

    /// The optional text field beside the name.
    pub(crate) fn note_column(self) -> &'static str {
        match self {
            GroupKind::Tag => "color",
            GroupKind::Album => "description",
        }
    }

    /// "tag" or "album", for messages.
    pub(crate) fn noun(self) -> &'static str {
        match self {
            GroupKind::Tag => "tag",
            GroupKind::Album => "album",
        }
    }
}

/// Opens a pool on a library file for reading only (a command that does not own the library).
/// The connection is not opened read-only: SQLite needs write access to the WAL index of a file
/// that no other process has open. Nothing here writes.
pub(crate) async fn open_reader(path: &Path) -> Result<SqlitePool, CliError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .busy_timeout(std::time::Duration::from_secs(5));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .context(|| format!("cannot open {}", path.display()))
}

/// Queries over one library file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Catalog<'a> {
    pool: &'a SqlitePool,
}

fn sql_error(error: impl std::fmt::Display) -> CliError {
    CliError::msg(format!("cannot read the library: {error}"))
}

fn uuid_at(row: &SqliteRow, index: usize) -> Result<Uuid, CliError> {
    read_uuid(row, index).map_err(sql_error)
}

fn optional_uuid_at(row: &SqliteRow, index: usize) -> Result<Option<Uuid>, CliError> {
    let bytes: Option<Vec<u8>> = row.try_get(index).map_err(sql_error)?;
    bytes.map(|bytes| Uuid::from_slice(&bytes).map_err(|_| sql_error("a malformed id"))).transpose()
}

fn entry_from(row: &SqliteRow) -> Result<EntryRow, CliError> {
    Ok(EntryRow {
        id: uuid_at(row, 0)?,
        parent: optional_uuid_at(row, 1)?,
        name: row.try_get(2).map_err(sql_error)?,
        kind: row.try_get(3).map_err(sql_error)?,
        size: row.try_get(4).map_err(sql_error)?,
        modified_ms: row.try_get(5).map_err(sql_error)?,
    })
}

const ENTRY_COLUMNS: &str = "id, parent_id, name, kind, size, modified_at";

impl<'a> Catalog<'a> {
    pub(crate) fn new(pool: &'a SqlitePool) -> Self {
        Self { pool }
    }

    /// The device this library file belongs to.
    pub(crate) async fn local_device(&self) -> Result<DeviceId, CliError> {
        let bytes: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM sync_meta WHERE key = 'device'")
                .fetch_optional(self.pool)
                .await
                .map_err(sql_error)?;
        bytes
            .and_then(|bytes| Uuid::from_slice(&bytes).ok())
            .map(DeviceId)
            .ok_or_else(|| sql_error("the library file names no device"))
    }

    /// Every device the library knows: the synced `devices` rows, and paired devices whose row
    /// has not arrived yet (named as they were when paired).
    pub(crate) async fn devices(&self) -> Result<Vec<DeviceRow>, CliError> {
        let rows = sqlx::query("SELECT id, name, platform FROM devices ORDER BY name, id")
            .fetch_all(self.pool)
            .await
            .map_err(sql_error)?;
        let mut devices = rows
            .iter()
            .map(|row| {
                Ok(DeviceRow {
                    id: DeviceId(uuid_at(row, 0)?),
                    name: row.try_get(1).map_err(sql_error)?,
                    platform: row.try_get(2).map_err(sql_error)?,
                })
            })
            .collect::<Result<Vec<_>, CliError>>()?;
        let peers = sqlx::query("SELECT device, name FROM sync_peers ORDER BY name")
            .fetch_all(self.pool)
            .await
            .map_err(sql_error)?;
        for row in &peers {
            let id = DeviceId(uuid_at(row, 0)?);
            if !devices.iter().any(|device| device.id == id) {
                devices.push(DeviceRow {
                    id,
                    name: row.try_get(1).map_err(sql_error)?,
                    platform: None,
                });
            }
        }
        Ok(devices)
    }

    /// Device names by id, for display.
    pub(crate) async fn device_names(&self) -> Result<BTreeMap<DeviceId, String>, CliError> {
        Ok(self.devices().await?.into_iter().map(|device| (device.id, device.name)).collect())
    }

    /// The device `text` names: its full id, a unique prefix of its id (at least 4 characters),
    /// or its exact name if no other device has it.
    pub(crate) async fn resolve_device(&self, text: &str) -> Result<DeviceId, CliError> {
        let devices = self.devices().await?;
        resolve_named(&devices, text, |device| (device.id.0, device.name.as_str()), "device")
            .map(|device| device.id)
    }

    /// Locations, of one owner or of all, in path order.
    pub(crate) async fn locations(
        &self,
        owner: Option<DeviceId>,
    ) -> Result<Vec<LocationRow>, CliError> {
        let rows = sqlx::query("SELECT id, owner, path, name FROM locations ORDER BY path, id")
            .fetch_all(self.pool)
            .await
            .map_err(sql_error)?;
        let mut locations = Vec::with_capacity(rows.len());
        for row in &rows {
            let location = LocationRow {
                id: uuid_at(row, 0)?,
                owner: DeviceId(uuid_at(row, 1)?),
                path: row.try_get(2).map_err(sql_error)?,
                name: row.try_get(3).map_err(sql_error)?,
            };
            if owner.is_none_or(|owner| owner == location.owner) {
                locations.push(location);
            }
        }
        Ok(locations)
    }

    /// Per location: (files, folders, bytes in files).
    pub(crate) async fn location_totals(
        &self,
    ) -> Result<BTreeMap<Uuid, (u64, u64, u64)>, CliError> {
        let rows = sqlx::query(
            "SELECT location_id, kind, count(*), coalesce(sum(size), 0) FROM entries
             GROUP BY location_id, kind",
        )
        .fetch_all(self.pool)
        .await
        .map_err(sql_error)?;
        let mut totals: BTreeMap<Uuid, (u64, u64, u64)> = BTreeMap::new();
        for row in &rows {
            let location = uuid_at(row, 0)?;
            let kind: i64 = row.try_get(1).map_err(sql_error)?;
            let count = u64::try_from(row.try_get::<i64, _>(2).map_err(sql_error)?).unwrap_or(0);
            let bytes = u64::try_from(row.try_get::<i64, _>(3).map_err(sql_error)?).unwrap_or(0);
            let total = totals.entry(location).or_default();
            if kind == ENTRY_KIND_DIRECTORY {
                total.1 += count;
            } else {
                total.0 += count;
                total.2 += bytes;
            }
        }
        Ok(totals)
    }

    /// What `path` names in the index: a location root or an entry below one. `path` is
    /// absolute and normalized (see [`normalize`]). Locations of `device` are searched if given;
    /// otherwise those of `local` first, then those of any device if exactly one device has a
    /// location holding the path.
    pub(crate) async fn find(
        &self,
        path: &Path,
        device: Option<DeviceId>,
        local: DeviceId,
    ) -> Result<Found, CliError> {
        let locations = self.locations(device).await?;
        let containing = |owner: Option<DeviceId>| {
            locations
                .iter()
                .filter(|location| owner.is_none_or(|owner| location.owner == owner))
                .filter(|location| path.starts_with(&location.path))
                // The innermost location wins (a device may index a folder inside another's).
                .max_by_key(|location| location.path.len())
                .cloned()
        };
        let location = match device {
            Some(device) => containing(Some(device)),
            None => match containing(Some(local)) {
                Some(location) => Some(location),
                None => {
                    let mut owners: Vec<DeviceId> = locations
                        .iter()
                        .filter(|location| path.starts_with(&location.path))
                        .map(|location| location.owner)
                        .collect();
                    owners.sort();
                    owners.dedup();
                    match owners.as_slice() {
                        [] => None,
                        [owner] => containing(Some(*owner)),
                        _ => {
                            return Err(CliError::msg(format!(
                                "{} is indexed on {} devices: choose one with --device",
                                path.display(),
                                owners.len()
                            )));
                        }
                    }
                }
            },
        };
        let Some(location) = location else {
            return Err(CliError::msg(format!(
                "{} is not in any indexed location{} (see `lsync ls DIR`)",
                path.display(),
                if device.is_some() { " of that device" } else { "" }
            )));
        };
        let relative = path.strip_prefix(&location.path).unwrap_or(Path::new(""));
        let mut parent: Option<Uuid> = None;
        let mut found: Option<EntryRow> = None;
        for component in relative.components() {
            let Component::Normal(name) = component else { continue };
            let name = name.to_string_lossy();
            if found.as_ref().is_some_and(|entry| !entry.is_dir()) {
                return Err(CliError::msg(format!("{} is not in the index", path.display())));
            }
            let row = sqlx::query(&format!(
                "SELECT {ENTRY_COLUMNS} FROM entries
                 WHERE parent_id IS ?1 AND location_id = ?2 AND name = ?3"
            ))
            .bind(parent.map(|id| id.as_bytes().to_vec()))
            .bind(location.id.as_bytes().as_slice())
            .bind(name.as_ref())
            .fetch_optional(self.pool)
            .await
            .map_err(sql_error)?;
            let Some(row) = row else {
                return Err(CliError::msg(format!(
                    "{} is not in the index (a new file? run `lsync location rescan`)",
                    path.display()
                )));
            };
            let entry = entry_from(&row)?;
            parent = Some(entry.id);
            found = Some(entry);
        }
        Ok(match found {
            Some(entry) => Found::Entry(location, entry),
            None => Found::Location(location),
        })
    }

    /// The entries directly under `parent` (the location root if `None`), folders first, then by
    /// name.
    pub(crate) async fn children(
        &self,
        location: Uuid,
        parent: Option<Uuid>,
    ) -> Result<Vec<EntryRow>, CliError> {
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries WHERE parent_id IS ?1 AND location_id = ?2
             ORDER BY kind DESC, name"
        ))
        .bind(parent.map(|id| id.as_bytes().to_vec()))
        .bind(location.as_bytes().as_slice())
        .fetch_all(self.pool)
        .await
        .map_err(sql_error)?;
        rows.iter().map(entry_from).collect()
    }

    /// Every entry of a location.
    pub(crate) async fn location_entries(&self, location: Uuid) -> Result<Vec<EntryRow>, CliError> {
        let rows =
            sqlx::query(&format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE location_id = ?1"))
                .bind(location.as_bytes().as_slice())
                .fetch_all(self.pool)
                .await
                .map_err(sql_error)?;
        rows.iter().map(entry_from).collect()
    }

    /// Names of the groups (tags or albums) of each entry directly under `parent`, or of the one
    /// entry `parent` itself if `only` is set.
    pub(crate) async fn groups_by_entry(
        &self,
        kind: GroupKind,
        location: Uuid,
        parent: Option<Uuid>,
        only: Option<Uuid>,
    ) -> Result<BTreeMap<Uuid, Vec<String>>, CliError> {
        let (membership, member, groups) = (kind.membership(), kind.member_column(), kind.model());
        let sql = match only {
            Some(_) => format!(
                "SELECT m.entry_id, g.name FROM \"{membership}\" m JOIN \"{groups}\" g ON g.id = m.{member}
                 WHERE m.entry_id = ?1 ORDER BY g.name"
            ),
            None => format!(
                "SELECT m.entry_id, g.name FROM \"{membership}\" m JOIN \"{groups}\" g ON g.id = m.{member}
                 JOIN entries e ON e.id = m.entry_id
                 WHERE e.parent_id IS ?1 AND e.location_id = ?2 ORDER BY g.name"
            ),
        };
        let query = match only {
            Some(entry) => sqlx::query(&sql).bind(entry.as_bytes().to_vec()),
            None => sqlx::query(&sql)
                .bind(parent.map(|id| id.as_bytes().to_vec()))
                .bind(location.as_bytes().to_vec()),
        };
        let rows = query.fetch_all(self.pool).await.map_err(sql_error)?;
        let mut by_entry: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
        for row in &rows {
            by_entry.entry(uuid_at(row, 0)?).or_default().push(row.try_get(1).map_err(sql_error)?);
        }
        Ok(by_entry)
    }

    /// The metadata of one entry, by key.
    pub(crate) async fn metadata(
        &self,
        entry: Uuid,
    ) -> Result<BTreeMap<String, Option<String>>, CliError> {
        let rows =
            sqlx::query("SELECT key, value FROM user_metadata WHERE entry_id = ?1 ORDER BY key")
                .bind(entry.as_bytes().as_slice())
                .fetch_all(self.pool)
                .await
                .map_err(sql_error)?;
        rows.iter()
            .map(|row| Ok((row.try_get(0).map_err(sql_error)?, row.try_get(1).map_err(sql_error)?)))
            .collect()
    }

    /// Every tag or album with its number of entries, by name.
    pub(crate) async fn groups(&self, kind: GroupKind) -> Result<Vec<GroupRow>, CliError> {
        let (groups, note, membership, member) =
            (kind.model(), kind.note_column(), kind.membership(), kind.member_column());
        let rows = sqlx::query(&format!(
            "SELECT g.id, g.name, g.{note},
                    (SELECT count(*) FROM \"{membership}\" m WHERE m.{member} = g.id)
             FROM \"{groups}\" g ORDER BY g.name, g.id"
        ))
        .fetch_all(self.pool)
        .await
        .map_err(sql_error)?;
        rows.iter()
            .map(|row| {
                Ok(GroupRow {
                    id: uuid_at(row, 0)?,
                    name: row.try_get(1).map_err(sql_error)?,
                    note: row.try_get(2).map_err(sql_error)?,
                    entries: u64::try_from(row.try_get::<i64, _>(3).map_err(sql_error)?)
                        .unwrap_or(0),
                })
            })
            .collect()
    }

    /// The tag or album `text` names: its id, a unique id prefix, or its exact name.
    pub(crate) async fn find_group(
        &self,
        kind: GroupKind,
        text: &str,
    ) -> Result<GroupRow, CliError> {
        let groups = self.groups(kind).await?;
        resolve_named(&groups, text, |group| (group.id, group.name.as_str()), kind.noun()).cloned()
    }

    /// The entries in a tag or album.
    pub(crate) async fn members(
        &self,
        kind: GroupKind,
        group: Uuid,
    ) -> Result<Vec<Uuid>, CliError> {
        let rows = sqlx::query(&format!(
            "SELECT entry_id FROM \"{}\" WHERE {} = ?1 ORDER BY entry_id",
            kind.membership(),
            kind.member_column()
        ))
        .bind(group.as_bytes().as_slice())
        .fetch_all(self.pool)
        .await
        .map_err(sql_error)?;
        rows.iter().map(|row| uuid_at(row, 0)).collect()
    }

    /// The entries of a tag or album with the location and path of each, for listings.
    pub(crate) async fn member_paths(
        &self,
        kind: GroupKind,
        group: Uuid,
    ) -> Result<Vec<(DeviceId, PathBuf, EntryRow)>, CliError> {
        let members = self.members(kind, group).await?;
        let mut connection = self.pool.acquire().await.map_err(sql_error)?;
        let mut listed = Vec::new();
        for entry in members {
            if let Some(found) = entry_path(&mut connection, entry).await? {
                listed.push(found);
            }
        }
        listed.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(listed)
    }
}

/// The owner, full path and row of an entry, walking up its parents; `None` if it is not (or no
/// longer) in the index.
async fn entry_path(
    connection: &mut SqliteConnection,
    entry: Uuid,
) -> Result<Option<(DeviceId, PathBuf, EntryRow)>, CliError> {
    let mut names = Vec::new();
    let mut next = Some(entry);
    let mut first: Option<(EntryRow, Uuid)> = None;
    while let Some(id) = next {
        let row =
            sqlx::query(&format!("SELECT {ENTRY_COLUMNS}, location_id FROM entries WHERE id = ?1"))
                .bind(id.as_bytes().as_slice())
                .fetch_optional(&mut *connection)
                .await
                .map_err(sql_error)?;
        let Some(row) = row else { return Ok(None) };
        let row_entry = entry_from(&row)?;
        let location = uuid_at(&row, 6)?;
        names.push(row_entry.name.clone());
        next = row_entry.parent;
        if first.is_none() {
            first = Some((row_entry, location));
        }
        if names.len() > 4_096 {
            return Err(sql_error("an entry tree deeper than 4096 levels"));
        }
    }
    let Some((entry, location)) = first else { return Ok(None) };
    let row = sqlx::query("SELECT owner, path FROM locations WHERE id = ?1")
        .bind(location.as_bytes().as_slice())
        .fetch_optional(&mut *connection)
        .await
        .map_err(sql_error)?;
    let Some(row) = row else { return Ok(None) };
    let owner = DeviceId(uuid_at(&row, 0)?);
    let mut path = PathBuf::from(row.try_get::<String, _>(1).map_err(sql_error)?);
    for name in names.iter().rev() {
        path.push(name);
    }
    Ok(Some((owner, path, entry)))
}

/// The one item `text` names among `items`: by full id, by a unique id prefix of at least four
/// characters, or by exact name when unique.
fn resolve_named<'i, T>(
    items: &'i [T],
    text: &str,
    key: impl Fn(&T) -> (Uuid, &str),
    noun: &str,
) -> Result<&'i T, CliError> {
    let text = text.trim();
    if let Ok(id) = Uuid::parse_str(text) {
        return items
            .iter()
            .find(|item| key(item).0 == id)
            .ok_or_else(|| CliError::msg(format!("no {noun} has the id {id}")));
    }
    let by_name: Vec<&T> = items.iter().filter(|item| key(item).1 == text).collect();
    match by_name.as_slice() {
        [one] => return Ok(one),
        [] => {}
        many => {
            let ids: Vec<String> = many.iter().map(|item| key(item).0.to_string()).collect();
            return Err(CliError::msg(format!(
                "{} {noun}s are named {text:?}: name one by its id ({})",
                many.len(),
                ids.join(", ")
            )));
        }
    }
    let prefix = text.to_ascii_lowercase();
    if prefix.len() >= 4 && prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        let by_prefix: Vec<&T> =
            items.iter().filter(|item| key(item).0.to_string().starts_with(&prefix)).collect();
        match by_prefix.as_slice() {
            [one] => return Ok(one),
            [] => {}
            many => {
                return Err(CliError::msg(format!(
                    "{} {noun}s have ids starting with {prefix}: give more of the id",
                    many.len()
                )));
            }
        }
    }
    Err(CliError::msg(format!("no {noun} is named {text:?}")))
}

/// `path` made absolute (against the current folder) and normalized: `.` removed, `..` applied,
/// no trailing separator. The file need not exist (it may be another device's).
pub(crate) fn normalize(path: &Path) -> Result<PathBuf, CliError> {
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().context(|| "cannot read the current folder".to_owned())?.join(path)
    };
    // A file that exists here is named by its real path (symbolic links resolved), as the index
    // records it.
    if let Ok(real) = absolute.canonicalize() {
        return Ok(real);
    }
    let mut normalized = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                normalized.pop();
            }
            other => normalized.push(other),
        }
    }
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Item(Uuid, &'static str);

    fn items() -> Vec<Item> {
        vec![
            Item(Uuid::parse_str("0192aaaa-0000-7000-8000-000000000001").unwrap(), "work"),
            Item(Uuid::parse_str("0192bbbb-0000-7000-8000-000000000002").unwrap(), "home"),
            Item(Uuid::parse_str("0193cccc-0000-7000-8000-000000000003").unwrap(), "home"),
        ]
    }

    fn check(text: &str, expected: Result<&str, &str>) {
        let items = items();
        let found = resolve_named(&items, text, |item| (item.0, item.1), "tag");
        match (found, expected) {
            (Ok(item), Ok(id_start)) => assert!(item.0.to_string().starts_with(id_start), "{text}"),
            (Err(error), Err(message)) => {
                assert!(error.one_line().contains(message), "{text}: {}", error.one_line())
            }
            (found, expected) => panic!("{text}: found {found:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn names_ids_and_prefixes_resolve_and_ambiguity_is_explained() {
        check("work", Ok("0192aaaa"));
        check("0192bbbb-0000-7000-8000-000000000002", Ok("0192bbbb"));
        check("0193", Ok("0193cccc"));
        check("home", Err("2 tags are named \"home\""));
        check("0192", Err("2 tags have ids starting with 0192"));
        check("nothing", Err("no tag is named \"nothing\""));
        check("0192aaaa-0000-7000-8000-00000000000f", Err("no tag has the id"));
    }

    #[test]
    fn paths_are_normalized_without_touching_the_disk_when_absent() {
        let path = normalize(Path::new("/no/such/./place/../file.txt/")).unwrap();
        assert_eq!(path, PathBuf::from("/no/such/file.txt"));
    }
}

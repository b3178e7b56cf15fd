//! The read-only commands: `ls`, `tag list`, `album list`. They read the library file directly
//! (SQLite lets readers in beside the process that writes), so they work the same whether or not
//! the node runs, and never wait for it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use lsync_hlc::DeviceId;
use serde::Serialize;

use crate::catalog::{self, Catalog, EntryRow, Found, GroupKind};
use crate::error::CliError;
use crate::home::Home;
use crate::output::{self, bytes, short, table, utc};
use crate::progress::{count, group_digits};

/// `lsync ls DIR` without a path: devices and their locations.
#[derive(Debug, Serialize)]
struct DevicesView {
    devices: Vec<DeviceView>,
}

#[derive(Debug, Serialize)]
struct DeviceView {
    device: String,
    name: String,
    platform: Option<String>,
    this_device: bool,
    locations: Vec<LocationView>,
}

#[derive(Debug, Serialize)]
struct LocationView {
    id: String,
    path: String,
    files: u64,
    directories: u64,
    bytes: u64,
}

/// `lsync ls DIR PATH` of a location or folder.
#[derive(Debug, Serialize)]
struct ListingView {
    device: String,
    device_name: String,
    path: String,
    entries: Vec<EntryView>,
}

#[derive(Debug, Serialize)]
struct EntryView {
    id: String,
    name: String,
    kind: &'static str,
    size: u64,
    modified_ms: i64,
    tags: Vec<String>,
}

/// `lsync ls DIR PATH` of a file.
#[derive(Debug, Serialize)]
struct DetailView {
    device: String,
    device_name: String,
    path: String,
    #[serde(flatten)]
    entry: EntryView,
    albums: Vec<String>,
    metadata: BTreeMap<String, Option<String>>,
}

fn kind_name(entry: &EntryRow) -> &'static str {
    if entry.is_dir() { "directory" } else { "file" }
}

fn entry_view(entry: &EntryRow, tags: Vec<String>) -> EntryView {
    EntryView {
        id: entry.id.to_string(),
        name: entry.name.clone(),
        kind: kind_name(entry),
        size: u64::try_from(entry.size).unwrap_or(0),
        modified_ms: entry.modified_ms,
        tags,
    }
}

/// `lsync ls`.
pub(crate) async fn ls(
    home: &Home,
    path: Option<PathBuf>,
    device: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    home.require_device()?;
    let pool = catalog::open_reader(&home.library_path()).await?;
    let result = ls_with(&Catalog::new(&pool), path, device, json).await;
    pool.close().await;
    result
}

async fn ls_with(
    catalog: &Catalog<'_>,
    path: Option<PathBuf>,
    device: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let local = catalog.local_device().await?;
    let device = match device {
        Some(text) => Some(catalog.resolve_device(&text).await?),
        None => None,
    };
    let names = catalog.device_names().await?;
    let name_of =
        |id: DeviceId| names.get(&id).cloned().unwrap_or_else(|| short(&id.to_string()).to_owned());
    let Some(path) = path else {
        return list_devices(catalog, local, device, json).await;
    };
    let path = catalog::normalize(&path)?;
    let found = catalog.find(&path, device, local).await?;
    let location = found.location().clone();
    let parent = match &found {
        Found::Location(_) => None,
        Found::Entry(_, entry) if entry.is_dir() => Some(entry.id),
        Found::Entry(_, entry) => {
            let tags =
                catalog.groups_by_entry(GroupKind::Tag, location.id, None, Some(entry.id)).await?;
            let albums = catalog
                .groups_by_entry(GroupKind::Album, location.id, None, Some(entry.id))
                .await?;
            let detail = DetailView {
                device: location.owner.to_string(),
                device_name: name_of(location.owner),
                path: path.display().to_string(),
                entry: entry_view(entry, tags.get(&entry.id).cloned().unwrap_or_default()),
                albums: albums.get(&entry.id).cloned().unwrap_or_default(),
                metadata: catalog.metadata(entry.id).await?,
            };
            if json {
                return output::json(&detail);
            }
            output::answer(&detail_text(&detail));
            return Ok(());
        }
    };
    let children = catalog.children(location.id, parent).await?;
    let tags = catalog.groups_by_entry(GroupKind::Tag, location.id, parent, None).await?;
    let listing = ListingView {
        device: location.owner.to_string(),
        device_name: name_of(location.owner),
        path: path.display().to_string(),
        entries: children
            .iter()
            .map(|entry| entry_view(entry, tags.get(&entry.id).cloned().unwrap_or_default()))
            .collect(),
    };
    if json {
        return output::json(&listing);
    }
    output::answer(&listing_text(&listing));
    Ok(())
}

async fn list_devices(
    catalog: &Catalog<'_>,
    local: DeviceId,
    only: Option<DeviceId>,
    json: bool,
) -> Result<(), CliError> {
    let totals = catalog.location_totals().await?;
    let mut devices = Vec::new();
    let mut known = catalog.devices().await?;
    if !known.iter().any(|device| device.id == local) {
        known.push(catalog::DeviceRow { id: local, name: String::new(), platform: None });
    }
    for device in known {
        if only.is_some_and(|only| only != device.id) {
            continue;
        }
        let locations = catalog
            .locations(Some(device.id))
            .await?
            .into_iter()
            .map(|location| {
                let (files, directories, size) =
                    totals.get(&location.id).copied().unwrap_or_default();
                LocationView {
                    id: location.id.to_string(),
                    path: location.path,
                    files,
                    directories,
                    bytes: size,
                }
            })
            .collect();
        devices.push(DeviceView {
            device: device.id.to_string(),
            name: device.name,
            platform: device.platform,
            this_device: device.id == local,
            locations,
        });
    }
    let view = DevicesView { devices };
    if json {
        return output::json(&view);
    }
    output::answer(&devices_text(&view));
    Ok(())
}

fn devices_text(view: &DevicesView) -> String {
    let mut out = String::new();
    for device in &view.devices {
        let mut head = format!("{}  {}", device.name, device.device);
        if let Some(platform) = &device.platform {
            head.push_str(&format!("  {platform}"));
        }
        if device.this_device {
            head.push_str("  (this device)");
        }
        out.push_str(&head);
        out.push('\n');
        if device.locations.is_empty() {
            out.push_str("  no locations\n");
        }
        let rows: Vec<Vec<String>> = device
            .locations
            .iter()
            .map(|location| {
                vec![
                    format!("  {}", location.path),
                    count(location.files, "file", "files"),
                    count(location.directories, "folder", "folders"),
                    bytes(location.bytes),
                ]
            })
            .collect();
        out.push_str(&table(&rows));
    }
    out
}

fn listing_text(listing: &ListingView) -> String {
    let mut out = format!("{} on {}\n", listing.path, listing.device_name);
    if listing.entries.is_empty() {
        out.push_str("  (empty)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = listing
        .entries
        .iter()
        .map(|entry| {
            let (size, name) = if entry.kind == "directory" {
                ("-".to_owned(), format!("{}/", entry.name))
            } else {
                (bytes(entry.size), entry.name.clone())
            };
            let tags = if entry.tags.is_empty() {
                String::new()
            } else {
                format!("[{}]", entry.tags.join(", "))
            };
            vec![format!("  {size}"), utc(entry.modified_ms), name, tags]
        })
        .collect();
    out.push_str(&table(&rows));
    out
}

fn detail_text(detail: &DetailView) -> String {
    let entry = &detail.entry;
    let mut rows = vec![
        vec!["path".to_owned(), format!("{} on {}", detail.path, detail.device_name)],
        vec!["kind".to_owned(), entry.kind.to_owned()],
        vec![
            "size".to_owned(),
            format!("{} ({} bytes)", bytes(entry.size), group_digits(entry.size)),
        ],
        vec!["modified".to_owned(), format!("{} UTC", utc(entry.modified_ms))],
        vec!["tags".to_owned(), entry.tags.join(", ")],
        vec!["albums".to_owned(), detail.albums.join(", ")],
    ];
    for (key, value) in &detail.metadata {
        rows.push(vec!["meta".to_owned(), format!("{key} = {}", value.as_deref().unwrap_or(""))]);
    }
    rows.push(vec!["id".to_owned(), entry.id.clone()]);
    table(&rows)
}

/// `lsync tag list` / `lsync album list`.
#[derive(Debug, Serialize)]
struct GroupsView {
    groups: Vec<GroupView>,
}

#[derive(Debug, Serialize)]
struct GroupView {
    id: String,
    name: String,
    note: Option<String>,
    entries: u64,
}

#[derive(Debug, Serialize)]
struct MembersView {
    id: String,
    name: String,
    entries: Vec<MemberView>,
}

#[derive(Debug, Serialize)]
struct MemberView {
    device: String,
    device_name: String,
    path: String,
    kind: &'static str,
}

/// Lists the tags or albums, or the entries of one.
pub(crate) async fn groups(
    home: &Home,
    kind: GroupKind,
    group: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    home.require_device()?;
    let pool = catalog::open_reader(&home.library_path()).await?;
    let catalog = Catalog::new(&pool);
    let result = async {
        match group {
            None => {
                let groups = catalog.groups(kind).await?;
                let view = GroupsView {
                    groups: groups
                        .into_iter()
                        .map(|group| GroupView {
                            id: group.id.to_string(),
                            name: group.name,
                            note: group.note,
                            entries: group.entries,
                        })
                        .collect(),
                };
                if json {
                    return output::json(&view);
                }
                if view.groups.is_empty() {
                    output::answer(&format!("no {}s", kind.noun()));
                    return Ok(());
                }
                let rows: Vec<Vec<String>> = view
                    .groups
                    .iter()
                    .map(|group| {
                        vec![
                            group.name.clone(),
                            short(&group.id).to_owned(),
                            count(group.entries, "entry", "entries"),
                            group.note.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                output::answer(&table(&rows));
                Ok(())
            }
            Some(text) => {
                let group = catalog.find_group(kind, &text).await?;
                let names = catalog.device_names().await?;
                let members = catalog.member_paths(kind, group.id).await?;
                let view = MembersView {
                    id: group.id.to_string(),
                    name: group.name,
                    entries: members
                        .into_iter()
                        .map(|(owner, path, entry)| MemberView {
                            device: owner.to_string(),
                            device_name: names.get(&owner).cloned().unwrap_or_default(),
                            path: path.display().to_string(),
                            kind: kind_name(&entry),
                        })
                        .collect(),
                };
                if json {
                    return output::json(&view);
                }
                let mut out = format!(
                    "{} {:?}: {}\n",
                    kind.noun(),
                    view.name,
                    count(view.entries.len() as u64, "entry", "entries")
                );
                let rows: Vec<Vec<String>> = view
                    .entries
                    .iter()
                    .map(|member| vec![format!("  {}", member.device_name), member.path.clone()])
                    .collect();
                out.push_str(&table(&rows));
                output::answer(&out);
                Ok(())
            }
        }
    }
    .await;
    pool.close().await;
    result
}

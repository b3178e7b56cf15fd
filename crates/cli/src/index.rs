//! Indexing a folder on disk as a location: walk the tree ([`scan`], the IO), then decide which
//! entry rows to write and which to delete ([`plan`], pure), so that `location add` and
//! `location rescan` are the same computation against an empty or a full index.
//!
//! Identity of an entry is its (parent, name) pair: a file keeps its row id (and with it its tags
//! and metadata) across rescans as long as it stays where it is with the same kind. A moved or
//! renamed file is a deletion and a new file. Symbolic links and special files are not indexed
//! (a link could lead out of the location or around in a cycle); names that are not UTF-8 are
//! skipped and counted. A folder that cannot be read keeps whatever the index held below it, so
//! a permission problem never deletes rows.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use lsync_node::RowEdit;
use lsync_protocol::Value;
use lsync_store::{ENTRY_KIND_DIRECTORY, ENTRY_KIND_FILE};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::EntryRow;

/// One file or folder found on disk. Nodes are in pre-order: a folder comes before everything in
/// it, so `parent` always points to an earlier node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanNode {
    /// Index of the folder holding it; `None` directly under the location's root.
    pub(crate) parent: Option<usize>,
    pub(crate) name: String,
    /// `ENTRY_KIND_FILE` or `ENTRY_KIND_DIRECTORY`.
    pub(crate) kind: i64,
    /// Bytes (0 for folders).
    pub(crate) size: i64,
    /// Last modification, milliseconds since the Unix epoch.
    pub(crate) modified_ms: i64,
    /// For folders: whether its content could be listed.
    pub(crate) readable: bool,
}

/// What a walk found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    pub(crate) nodes: Vec<ScanNode>,
    /// Symbolic links, special files and names that are not UTF-8, not indexed.
    pub(crate) skipped: u64,
    /// Folders whose content could not be listed (their indexed content is kept).
    pub(crate) unreadable: Vec<PathBuf>,
}

/// Walks the folder `root` (which must be a readable folder).
pub(crate) fn scan(root: &Path) -> std::io::Result<Scan> {
    let mut scan = Scan::default();
    let mut pending: Vec<(PathBuf, Option<usize>)> = vec![(root.to_owned(), None)];
    while let Some((dir, parent)) = pending.pop() {
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(error) => match parent {
                // The root itself must be readable: that is the caller's error to report.
                None => return Err(error),
                Some(index) => {
                    scan.nodes[index].readable = false;
                    scan.unreadable.push(dir);
                    continue;
                }
            },
        };
        let mut children = Vec::new();
        for item in listing {
            let Ok(item) = item else {
                scan.skipped += 1;
                continue;
            };
            let Ok(name) = item.file_name().into_string() else {
                scan.skipped += 1;
                continue;
            };
            // `DirEntry::metadata` does not follow symbolic links.
            let Ok(metadata) = item.metadata() else {
                scan.skipped += 1;
                continue;
            };
            let kind = if metadata.is_dir() {
                ENTRY_KIND_DIRECTORY
            } else if metadata.is_file() {
                ENTRY_KIND_FILE
            } else {
                scan.skipped += 1;
                continue;
            };
            let modified_ms = metadata
                .modified()
                .ok()
                .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
                .and_then(|since| i64::try_from(since.as_millis()).ok())
                .unwrap_or(0);
            let size = if kind == ENTRY_KIND_FILE {
                i64::try_from(metadata.len()).unwrap_or(i64::MAX)
            } else {
                0
            };
            children.push((name, kind, size, modified_ms));
        }
        // Sorted, so that a walk of the same tree gives the same nodes in the same order.
        children.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind, size, modified_ms) in children {
            let index = scan.nodes.len();
            if kind == ENTRY_KIND_DIRECTORY {
                pending.push((dir.join(&name), Some(index)));
            }
            scan.nodes.push(ScanNode { parent, name, kind, size, modified_ms, readable: true });
        }
    }
    Ok(scan)
}

/// What to write to bring the index of one location in line with a scan.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Deletions: one `DeleteSubtree` per vanished folder (its content goes with it), one
    /// `Delete` per vanished file whose folder stays.
    pub(crate) deletes: Vec<RowEdit>,
    /// New and changed entries, parents before children.
    pub(crate) upserts: Vec<RowEdit>,
    pub(crate) counts: Counts,
}

/// What a plan does, for the report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counts {
    /// Files on disk.
    pub(crate) files: u64,
    /// Folders on disk.
    pub(crate) directories: u64,
    /// Bytes in those files.
    pub(crate) bytes: u64,
    /// Entries new to the index.
    pub(crate) added: u64,
    /// Entries whose size or modification time changed.
    pub(crate) updated: u64,
    /// Entries removed from the index (everything below a vanished folder included).
    pub(crate) deleted: u64,
    /// Entries already indexed as they are.
    pub(crate) unchanged: u64,
}

/// The row values of an entry, in the `entries` model's column order.
pub(crate) fn entry_values(location: Uuid, parent: Option<Uuid>, node: &ScanNode) -> Vec<Value> {
    vec![
        Value::Blob(location.as_bytes().to_vec()),
        parent.map_or(Value::Null, |parent| Value::Blob(parent.as_bytes().to_vec())),
        Value::Text(node.name.clone()),
        Value::Integer(node.kind),
        Value::Integer(node.size),
        Value::Integer(node.modified_ms),
    ]
}

/// Compares `existing` (this location's entries in the index) with `scan` and returns the edits;
/// `new_id` gives the id of each new entry (UUIDv7 in production, so that a bulk insert arrives
/// in key order).
pub(crate) fn plan(
    location: Uuid,
    existing: &[EntryRow],
    scan: &Scan,
    mut new_id: impl FnMut() -> Uuid,
) -> Plan {
    let by_key: HashMap<(Option<Uuid>, &str), usize> = existing
        .iter()
        .enumerate()
        .map(|(index, entry)| ((entry.parent, entry.name.as_str()), index))
        .collect();
    let index_of: HashMap<Uuid, usize> =
        existing.iter().enumerate().map(|(index, entry)| (entry.id, index)).collect();
    let mut children_of: HashMap<Uuid, Vec<usize>> = HashMap::new();
    for (index, entry) in existing.iter().enumerate() {
        if let Some(parent) = entry.parent {
            children_of.entry(parent).or_default().push(index);
        }
    }
    let mut kept = vec![false; existing.len()];
    let mut ids: Vec<Uuid> = Vec::with_capacity(scan.nodes.len());
    let mut plan = Plan::default();
    for node in &scan.nodes {
        let parent = node.parent.map(|index| ids[index]);
        if node.kind == ENTRY_KIND_DIRECTORY {
            plan.counts.directories += 1;
        } else {
            plan.counts.files += 1;
            plan.counts.bytes += u64::try_from(node.size).unwrap_or(0);
        }
        let held = by_key
            .get(&(parent, node.name.as_str()))
            .copied()
            .filter(|index| existing[*index].kind == node.kind);
        let id = match held {
            Some(index) => {
                kept[index] = true;
                let entry = &existing[index];
                if entry.size == node.size && entry.modified_ms == node.modified_ms {
                    plan.counts.unchanged += 1;
                } else {
                    plan.counts.updated += 1;
                    plan.upserts.push(RowEdit::Upsert {
                        id: entry.id,
                        values: entry_values(location, parent, node),
                    });
                }
                entry.id
            }
            None => {
                let id = new_id();
                plan.counts.added += 1;
                plan.upserts
                    .push(RowEdit::Upsert { id, values: entry_values(location, parent, node) });
                id
            }
        };
        ids.push(id);
        if !node.readable {
            // Keep whatever the index holds below a folder that could not be listed.
            let mut below: Vec<usize> = children_of.get(&id).cloned().unwrap_or_default();
            while let Some(index) = below.pop() {
                kept[index] = true;
                below.extend(children_of.get(&existing[index].id).into_iter().flatten());
            }
        }
    }
    for (index, entry) in existing.iter().enumerate() {
        if kept[index] {
            continue;
        }
        plan.counts.deleted += 1;
        // A vanished entry inside a vanished folder goes with the folder's subtree delete.
        let parent_goes =
            entry.parent.and_then(|parent| index_of.get(&parent)).is_some_and(|p| !kept[*p]);
        if !parent_goes {
            plan.deletes.push(if entry.is_dir() {
                RowEdit::DeleteSubtree { id: entry.id }
            } else {
                RowEdit::Delete { id: entry.id }
            });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree written as `path kind size mtime` lines (`d` folder, `f` file), parents first.
    fn scan_of(lines: &[&str]) -> Scan {
        let mut scan = Scan::default();
        let mut paths: Vec<String> = Vec::new();
        for line in lines {
            let parts: Vec<&str> =
                line.split_whitespace().filter(|part| *part != "unreadable").collect();
            let (path, kind) = (parts[0], parts[1]);
            let (parent_path, name) = path.rsplit_once('/').map_or(("", path), |(p, n)| (p, n));
            let parent = paths.iter().position(|known| known == parent_path);
            scan.nodes.push(ScanNode {
                parent,
                name: name.to_owned(),
                kind: if kind == "d" { ENTRY_KIND_DIRECTORY } else { ENTRY_KIND_FILE },
                size: parts.get(2).map_or(0, |s| s.parse().unwrap()),
                modified_ms: parts.get(3).map_or(0, |s| s.parse().unwrap()),
                readable: !line.ends_with("unreadable"),
            });
            paths.push(path.to_owned());
        }
        scan
    }

    /// The row an upsert writes.
    fn row_of(edit: &RowEdit) -> EntryRow {
        let RowEdit::Upsert { id, values } = edit else { panic!("not an upsert: {edit:?}") };
        let blob = |value: &Value| match value {
            Value::Blob(bytes) => Some(Uuid::from_slice(bytes).unwrap()),
            _ => None,
        };
        let int = |value: &Value| match value {
            Value::Integer(n) => *n,
            _ => panic!("not an integer: {value:?}"),
        };
        let Value::Text(name) = &values[2] else { panic!("no name") };
        EntryRow {
            id: *id,
            parent: blob(&values[1]),
            name: name.clone(),
            kind: int(&values[3]),
            size: int(&values[4]),
            modified_ms: int(&values[5]),
        }
    }

    /// The index a plan leaves, as sorted `path kind size mtime` lines.
    fn index_after(existing: &[EntryRow], plan: &Plan) -> Vec<String> {
        let mut rows: HashMap<Uuid, EntryRow> =
            existing.iter().map(|entry| (entry.id, entry.clone())).collect();
        for edit in &plan.deletes {
            let (RowEdit::Delete { id } | RowEdit::DeleteSubtree { id }) = edit else {
                panic!("not a delete")
            };
            let mut gone = vec![*id];
            while let Some(id) = gone.pop() {
                rows.remove(&id);
                gone.extend(rows.values().filter(|row| row.parent == Some(id)).map(|row| row.id));
            }
        }
        for edit in &plan.upserts {
            let row = row_of(edit);
            if let Some(parent) = row.parent {
                assert!(rows.contains_key(&parent), "parent written before {}", row.name);
            }
            rows.insert(row.id, row);
        }
        let path_of = |row: &EntryRow| {
            let mut names = vec![row.name.clone()];
            let mut parent = row.parent;
            while let Some(id) = parent {
                names.push(rows[&id].name.clone());
                parent = rows[&id].parent;
            }
            names.reverse();
            names.join("/")
        };
        let mut lines: Vec<String> = rows
            .values()
            .map(|row| {
                let kind = if row.is_dir() { "d" } else { "f" };
                format!("{} {kind} {} {}", path_of(row), row.size, row.modified_ms)
            })
            .collect();
        lines.sort();
        lines
    }

    /// Indexes `before`, then rescans `after`: checks the index matches `after` and the counts.
    fn check(before: &[&str], after: &[&str], expected: Counts) -> (Vec<EntryRow>, Plan) {
        let location = Uuid::now_v7();
        let first = plan(location, &[], &scan_of(before), Uuid::now_v7);
        let existing = rows_of(&first);
        let second = plan(location, &existing, &scan_of(after), Uuid::now_v7);
        assert_eq!(second.counts, expected);
        let wanted: Vec<&str> =
            after.iter().map(|line| line.trim_end_matches(" unreadable")).collect();
        let mut wanted: Vec<String> = wanted
            .iter()
            .map(|line| {
                let parts: Vec<&str> = line.split_whitespace().collect();
                format!(
                    "{} {} {} {}",
                    parts[0],
                    parts[1],
                    parts.get(2).unwrap_or(&"0"),
                    parts.get(3).unwrap_or(&"0")
                )
            })
            .collect();
        wanted.sort();
        if !after.iter().any(|line| line.ends_with("unreadable")) {
            assert_eq!(index_after(&existing, &second), wanted);
        }
        (existing, second)
    }

    fn rows_of(plan: &Plan) -> Vec<EntryRow> {
        assert_eq!(index_after(&[], plan).len(), plan.upserts.len());
        plan.upserts.iter().map(row_of).collect()
    }

    const TREE: &[&str] =
        &["a d", "a/x f 10 1", "a/y f 20 1", "a/b d", "a/b/z f 30 1", "top f 5 1"];

    fn counts(
        files: u64,
        directories: u64,
        bytes: u64,
        added: u64,
        updated: u64,
        deleted: u64,
        unchanged: u64,
    ) -> Counts {
        Counts { files, directories, bytes, added, updated, deleted, unchanged }
    }

    #[test]
    fn a_first_index_adds_everything_parents_first() {
        let scan = scan_of(TREE);
        let first = plan(Uuid::now_v7(), &[], &scan, Uuid::now_v7);
        assert_eq!(first.counts, counts(4, 2, 65, 6, 0, 0, 0));
        assert!(first.deletes.is_empty());
        assert_eq!(index_after(&[], &first).len(), 6);
    }

    #[test]
    fn an_unchanged_tree_writes_nothing() {
        let (_, second) = check(TREE, TREE, counts(4, 2, 65, 0, 0, 0, 6));
        assert!(second.upserts.is_empty() && second.deletes.is_empty());
    }

    #[test]
    fn new_modified_and_deleted_files_and_folders_are_picked_up() {
        let after = &["a d", "a/x f 11 2", "a/new f 1 1", "top f 5 1", "c d", "c/w f 7 1"];
        // x modified; y, b and b/z deleted (one subtree delete for b); new, c and c/w added.
        let (existing, second) = check(TREE, after, counts(4, 2, 24, 3, 1, 3, 2));
        assert_eq!(second.deletes.len(), 2, "y, and b as one subtree: {:?}", second.deletes);
        let b = existing.iter().find(|entry| entry.name == "b").unwrap();
        assert!(second.deletes.contains(&RowEdit::DeleteSubtree { id: b.id }));
        // The modified file keeps its id.
        let x = existing.iter().find(|entry| entry.name == "x").unwrap();
        assert!(matches!(&second.upserts[0], RowEdit::Upsert { id, .. } if *id == x.id));
    }

    #[test]
    fn a_file_that_became_a_folder_is_replaced() {
        let after = &[
            "a d",
            "a/x d",
            "a/x/inside f 1 1",
            "a/y f 20 1",
            "a/b d",
            "a/b/z f 30 1",
            "top f 5 1",
        ];
        check(TREE, after, counts(4, 3, 56, 2, 0, 1, 5));
    }

    #[test]
    fn an_unreadable_folder_keeps_its_indexed_content() {
        let after = &["a d", "a/x f 10 1", "a/y f 20 1", "a/b d unreadable", "top f 5 1"];
        let (_, second) = check(TREE, after, counts(3, 2, 35, 0, 0, 0, 5));
        assert!(second.deletes.is_empty(), "{:?}", second.deletes);
    }

    #[test]
    fn a_real_tree_is_walked_in_pre_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("photos/2024")).unwrap();
        fs::write(dir.path().join("photos/2024/a.jpg"), b"abc").unwrap();
        fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(dir.path().join("notes.txt"), dir.path().join("link")).unwrap();
        let scan = scan(dir.path()).unwrap();
        let names: Vec<(&str, Option<usize>)> =
            scan.nodes.iter().map(|node| (node.name.as_str(), node.parent)).collect();
        assert_eq!(
            names,
            [("notes.txt", None), ("photos", None), ("2024", Some(1)), ("a.jpg", Some(2))]
        );
        assert_eq!(scan.nodes[3].size, 3);
        assert!(scan.nodes[3].modified_ms > 0);
        #[cfg(unix)]
        assert_eq!(scan.skipped, 1, "the symbolic link is not indexed");
    }
}

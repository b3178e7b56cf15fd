//! The real mode's workload: seeded operations on the reference schema, and the workload's own
//! record of every write the engine acknowledged, from which it computes the tables every peer must
//! end with — independently of the engine's watermarks, logs and merge code.

use std::collections::{BTreeMap, BTreeSet};

use lsync_hlc::{DeviceId, Hlc, HlcTime};
use lsync_node::{Edit, RowEdit};
use lsync_protocol::{SharedChange, SharedOp, StateRow, Value};
use lsync_store::{ENTRY_KIND_DIRECTORY, ENTRY_KIND_FILE, Ownership, Registry};
use lsync_transport::SplitMix64;
use uuid::Uuid;

/// Tags and albums among which conflicting edits are concentrated: the first eight created.
const HOT: usize = 8;
/// Keys of user metadata.
const METADATA_KEYS: [&str; 4] = ["rating", "note", "label", "camera"];

/// What the workload asks a peer to do.
#[derive(Debug, Clone)]
pub(super) enum Op {
    /// Write device-owned rows of `model` on `peer`.
    Rows { peer: usize, model: &'static str, edits: Vec<RowEdit> },
    /// Write shared data on `peer`.
    Shared { peer: usize, edits: Vec<Edit> },
    /// Several peers edit the same field of the same record at the same moment.
    Conflict { writes: Vec<(usize, Edit)> },
}

impl Op {
    /// How many operations this counts as (rows or edits written).
    pub(super) fn size(&self) -> u64 {
        let size = match self {
            Op::Rows { edits, .. } => edits.len(),
            Op::Shared { edits, .. } => edits.len(),
            Op::Conflict { writes } => writes.len(),
        };
        u64::try_from(size).unwrap_or(u64::MAX)
    }
}

/// One of an owner's file entries, as last acknowledged.
#[derive(Debug, Clone)]
struct Entry {
    parent: Option<Uuid>,
    values: Vec<Value>,
    version: HlcTime,
}

/// One device's own rows, as last acknowledged.
#[derive(Debug, Default)]
struct Owner {
    device: Option<DeviceId>,
    location: Option<(Uuid, Vec<Value>, HlcTime)>,
    entries: BTreeMap<Uuid, Entry>,
    directories: Vec<Uuid>,
    files: Vec<Uuid>,
    /// Entries still to create in the indexing phase.
    to_index: u64,
}

/// A shared record's registers, by plain last-writer-wins on HLC stamps.
#[derive(Debug, Default)]
struct Registers {
    existence: Option<(Hlc, bool)>,
    fields: BTreeMap<String, (Hlc, Value)>,
}

/// The seeded workload and its record of acknowledged writes.
pub(super) struct Workload {
    rng: SplitMix64,
    owners: Vec<Owner>,
    registers: BTreeMap<(String, Uuid), Registers>,
    tags: Vec<Uuid>,
    albums: Vec<Uuid>,
    names: u64,
}

fn blob(id: Uuid) -> Value {
    Value::Blob(id.as_bytes().to_vec())
}

fn as_uuid(value: &Value) -> Option<Uuid> {
    match value {
        Value::Blob(bytes) => Uuid::from_slice(bytes).ok(),
        _ => None,
    }
}

fn below(rng: &mut SplitMix64, n: usize) -> usize {
    match u64::try_from(n) {
        Ok(0) | Err(_) => 0,
        Ok(n) => usize::try_from(rng.next_u64() % n).unwrap_or(0),
    }
}

fn pick<T: Copy>(rng: &mut SplitMix64, items: &[T]) -> Option<T> {
    (!items.is_empty()).then(|| items[below(rng, items.len())])
}

impl Workload {
    pub(super) fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
            owners: Vec::new(),
            registers: BTreeMap::new(),
            tags: Vec::new(),
            albums: Vec::new(),
            names: 0,
        }
    }

    /// A new device whose indexing phase creates `to_index` entries.
    pub(super) fn add_owner(&mut self, device: DeviceId, to_index: u64) {
        self.owners.push(Owner { device: Some(device), to_index, ..Owner::default() });
    }

    /// A random UUIDv4-shaped id from the workload's RNG (so a seed fixes every id).
    fn new_id(&mut self) -> Uuid {
        let bits = (u128::from(self.rng.next_u64()) << 64) | u128::from(self.rng.next_u64());
        uuid::Builder::from_random_bytes(bits.to_be_bytes()).into_uuid()
    }

    fn name(&mut self, prefix: &str) -> Value {
        self.names += 1;
        Value::from(format!("{prefix} {}", self.names).as_str())
    }

    /// Entries `peer` still has to index.
    pub(super) fn indexing_left(&self, peer: usize) -> u64 {
        self.owners.get(peer).map_or(0, |owner| owner.to_index)
    }

    /// The next step of `peer`'s indexing: its location first, then entries of its file tree in
    /// chunks of at most `chunk` (parents before children).
    pub(super) fn index(&mut self, peer: usize, chunk: u64) -> Option<Op> {
        let owner = self.owners.get(peer)?;
        if owner.to_index == 0 {
            return None;
        }
        let Some((location, _, _)) = &owner.location else {
            let id = self.new_id();
            let values = vec![
                Value::Null,
                Value::from(format!("/home/peer-{peer}").as_str()),
                Value::from(format!("peer-{peer}").as_str()),
            ];
            return Some(Op::Rows {
                peer,
                model: "locations",
                edits: vec![RowEdit::Upsert { id, values }],
            });
        };
        let location = *location;
        let count = owner.to_index.min(chunk);
        let mut directories = owner.directories.clone();
        let mut edits = Vec::new();
        for _ in 0..count {
            let directory = directories.is_empty() || self.rng.chance(0.08);
            let parent = pick(&mut self.rng, &directories);
            let id = self.new_id();
            edits.push(self.entry_edit(id, location, parent, directory));
            if directory {
                directories.push(id);
            }
        }
        if let Some(owner) = self.owners.get_mut(peer) {
            owner.to_index -= count;
        }
        Some(Op::Rows { peer, model: "entries", edits })
    }

    fn entry_edit(
        &mut self,
        id: Uuid,
        location: Uuid,
        parent: Option<Uuid>,
        directory: bool,
    ) -> RowEdit {
        let kind = if directory { ENTRY_KIND_DIRECTORY } else { ENTRY_KIND_FILE };
        let size = if directory {
            0
        } else {
            i64::try_from(self.rng.next_u64() % 50_000_000).unwrap_or(0)
        };
        let modified =
            1_600_000_000 + i64::try_from(self.rng.next_u64() % 100_000_000).unwrap_or(0);
        let prefix = if directory { "dir" } else { "file" };
        let values = vec![
            blob(location),
            parent.map_or(Value::Null, blob),
            self.name(prefix),
            Value::Integer(kind),
            Value::Integer(size),
            Value::Integer(modified),
        ];
        RowEdit::Upsert { id, values }
    }

    /// Any live entry of any device (known to the workload: the writing peer may not have it yet,
    /// which parks the record referencing it until it arrives).
    fn any_entry(&mut self) -> Option<Uuid> {
        let owners: Vec<usize> =
            (0..self.owners.len()).filter(|index| !self.owners[*index].files.is_empty()).collect();
        let owner = pick(&mut self.rng, &owners)?;
        let files = &self.owners[owner].files;
        pick(&mut self.rng, files)
    }

    fn hot_or_any(&mut self, ids: &[Uuid]) -> Option<Uuid> {
        let range = if self.rng.chance(0.6) { ids.len().min(HOT) } else { ids.len() };
        (range > 0).then(|| ids[below(&mut self.rng, range)])
    }

    /// The next operation after indexing, on one of the `running` peers.
    pub(super) fn next(&mut self, running: &[usize]) -> Option<Op> {
        let peer = pick(&mut self.rng, running)?;
        let roll = self.rng.next_u64() % 100;
        let op = match roll {
            0..25 => self.edit_entries(peer),
            25..33 => self.move_file(peer),
            33..36 => self.delete_subtree(peer),
            36..42 => self.new_files(peer),
            42..55 => self.named_record_op(peer, "tags", "color"),
            55..62 => self.named_record_op(peer, "albums", "description"),
            62..75 => self.membership_op(peer, "tag_assignments", "tag_id"),
            75..80 => self.membership_op(peer, "album_entries", "album_id"),
            80..93 => self.metadata_op(peer),
            _ => self.conflict(running),
        };
        op.or_else(|| self.named_record_op(peer, "tags", "color"))
    }

    fn location_of(&self, peer: usize) -> Option<Uuid> {
        self.owners.get(peer)?.location.as_ref().map(|(id, _, _)| *id)
    }

    fn edit_entries(&mut self, peer: usize) -> Option<Op> {
        let count = 1 + below(&mut self.rng, 16);
        let mut edits = Vec::new();
        let mut seen = BTreeSet::new();
        for _ in 0..count {
            let owner = self.owners.get(peer)?;
            let ids: Vec<Uuid> = owner.files.iter().chain(&owner.directories).copied().collect();
            let id = pick(&mut self.rng, &ids)?;
            if !seen.insert(id) {
                continue;
            }
            let mut values = self.owners[peer].entries.get(&id)?.values.clone();
            values[2] = self.name("renamed");
            if values[3] == Value::Integer(ENTRY_KIND_FILE) {
                values[4] =
                    Value::Integer(i64::try_from(self.rng.next_u64() % 50_000_000).unwrap_or(0));
            }
            values[5] = Value::Integer(1_700_000_000 + i64::try_from(self.names).unwrap_or(0));
            edits.push(RowEdit::Upsert { id, values });
        }
        Some(Op::Rows { peer, model: "entries", edits })
    }

    fn move_file(&mut self, peer: usize) -> Option<Op> {
        let owner = self.owners.get(peer)?;
        let (files, directories) = (owner.files.clone(), owner.directories.clone());
        let id = pick(&mut self.rng, &files)?;
        let target = pick(&mut self.rng, &directories)?;
        let mut values = self.owners[peer].entries.get(&id)?.values.clone();
        values[1] = blob(target);
        Some(Op::Rows { peer, model: "entries", edits: vec![RowEdit::Upsert { id, values }] })
    }

    fn delete_subtree(&mut self, peer: usize) -> Option<Op> {
        let owner = self.owners.get(peer)?;
        // Keep most of the tree: delete only below the top, and only while there is plenty.
        if owner.directories.len() < 6 {
            return None;
        }
        let candidates: Vec<Uuid> = owner
            .directories
            .iter()
            .filter(|id| owner.entries.get(*id).is_some_and(|entry| entry.parent.is_some()))
            .copied()
            .collect();
        let id = pick(&mut self.rng, &candidates)?;
        Some(Op::Rows { peer, model: "entries", edits: vec![RowEdit::DeleteSubtree { id }] })
    }

    fn new_files(&mut self, peer: usize) -> Option<Op> {
        let location = self.location_of(peer)?;
        let directories = self.owners.get(peer)?.directories.clone();
        let count = 1 + below(&mut self.rng, 32);
        let mut edits = Vec::new();
        for _ in 0..count {
            let parent = pick(&mut self.rng, &directories)?;
            let id = self.new_id();
            edits.push(self.entry_edit(id, location, Some(parent), false));
        }
        Some(Op::Rows { peer, model: "entries", edits })
    }

    fn fields(pairs: Vec<(&str, Value)>) -> BTreeMap<String, Value> {
        pairs.into_iter().map(|(name, value)| (name.to_owned(), value)).collect()
    }

    /// Creates, edits or deletes a tag or an album (`optional`: its nullable text field).
    fn named_record_op(&mut self, peer: usize, model: &str, optional: &str) -> Option<Op> {
        let roll = self.rng.next_u64() % 10;
        let ids = if model == "tags" { self.tags.clone() } else { self.albums.clone() };
        let edit = if ids.is_empty() || roll < 3 {
            let id = self.new_id();
            let mut fields = vec![("name", self.name(model))];
            if self.rng.chance(0.5) {
                fields.push((optional, self.name(optional)));
            }
            Edit::Insert { model: model.into(), id, fields: Self::fields(fields) }
        } else if roll < 9 {
            let id = self.hot_or_any(&ids)?;
            let field = if self.rng.chance(0.5) { "name" } else { optional };
            let value = self.name(field);
            Edit::Update { model: model.into(), id, fields: Self::fields(vec![(field, value)]) }
        } else {
            Edit::Delete { model: model.into(), id: pick(&mut self.rng, &ids)? }
        };
        Some(Op::Shared { peer, edits: vec![edit] })
    }

    fn membership_op(&mut self, peer: usize, model: &str, left_column: &str) -> Option<Op> {
        let lefts =
            if model == "tag_assignments" { self.tags.clone() } else { self.albums.clone() };
        let count = 1 + below(&mut self.rng, 8);
        let mut edits = Vec::new();
        let mut seen = BTreeSet::new();
        for _ in 0..count {
            let left = self.hot_or_any(&lefts)?;
            let entry = self.any_entry()?;
            let id = Registry::membership_id(model, left, entry);
            if !seen.insert(id) {
                continue;
            }
            edits.push(if self.rng.chance(0.8) {
                let fields =
                    Self::fields(vec![(left_column, blob(left)), ("entry_id", blob(entry))]);
                Edit::Insert { model: model.into(), id, fields }
            } else {
                Edit::Delete { model: model.into(), id }
            });
        }
        Some(Op::Shared { peer, edits })
    }

    fn metadata_id(entry: Uuid, key: &str) -> Uuid {
        Registry::derived_id("user_metadata", &[entry.as_bytes(), key.as_bytes()])
    }

    fn metadata_op(&mut self, peer: usize) -> Option<Op> {
        let entry = self.any_entry()?;
        let key = METADATA_KEYS[below(&mut self.rng, METADATA_KEYS.len())];
        let id = Self::metadata_id(entry, key);
        let value = self.name("value");
        let known = self.registers.contains_key(&("user_metadata".to_owned(), id));
        let edit = if known && self.rng.chance(0.85) {
            Edit::Update {
                model: "user_metadata".into(),
                id,
                fields: Self::fields(vec![("value", value)]),
            }
        } else if known {
            Edit::Delete { model: "user_metadata".into(), id }
        } else {
            let fields = Self::fields(vec![
                ("entry_id", blob(entry)),
                ("key", Value::from(key)),
                ("value", value),
            ]);
            Edit::Insert { model: "user_metadata".into(), id, fields }
        };
        Some(Op::Shared { peer, edits: vec![edit] })
    }

    /// Every running peer renames the same hot tag at once.
    fn conflict(&mut self, running: &[usize]) -> Option<Op> {
        let tags = self.tags.clone();
        let id = tags.get(below(&mut self.rng, tags.len().min(HOT))).copied()?;
        let writes = running
            .iter()
            .map(|peer| {
                let name = self.name(&format!("conflict from peer-{peer}"));
                (
                    *peer,
                    Edit::Update {
                        model: "tags".into(),
                        id,
                        fields: Self::fields(vec![("name", name)]),
                    },
                )
            })
            .collect();
        Some(Op::Conflict { writes })
    }

    /// Records device-owned edits the engine acknowledged on `peer` (`rows` as it returned them).
    pub(super) fn rows_written(
        &mut self,
        peer: usize,
        model: &str,
        edits: &[RowEdit],
        rows: &[StateRow],
    ) {
        let versions: BTreeMap<Uuid, HlcTime> =
            rows.iter().map(|row| (row.id, row.version)).collect();
        let Some(owner) = self.owners.get_mut(peer) else { return };
        for edit in edits {
            match edit {
                RowEdit::Upsert { id, values } => {
                    let version = versions.get(id).copied().unwrap_or(HlcTime::ZERO);
                    if model == "locations" {
                        owner.location = Some((*id, values.clone(), version));
                        continue;
                    }
                    let directory = values.get(3) == Some(&Value::Integer(ENTRY_KIND_DIRECTORY));
                    let parent = values.get(1).and_then(as_uuid);
                    let entry = Entry { parent, values: values.clone(), version };
                    if owner.entries.insert(*id, entry).is_none() {
                        if directory {
                            owner.directories.push(*id);
                        } else {
                            owner.files.push(*id);
                        }
                    }
                }
                RowEdit::Delete { id } => owner.remove(&BTreeSet::from([*id])),
                RowEdit::DeleteSubtree { id } => {
                    let subtree = owner.subtree(*id);
                    owner.remove(&subtree);
                }
            }
        }
    }

    /// Records shared changes the engine acknowledged.
    pub(super) fn shared_written(&mut self, changes: &[SharedChange]) {
        for change in changes {
            let stamp = change.hlc();
            let key = (change.model.clone(), change.record);
            let registers = self.registers.entry(key).or_default();
            let exists = !matches!(change.op, SharedOp::Delete);
            if registers.existence.as_ref().is_none_or(|(held, _)| stamp > *held) {
                registers.existence = Some((stamp, exists));
            }
            for (name, value) in change.op.fields().into_iter().flatten() {
                if registers.fields.get(name).is_none_or(|(held, _)| stamp > *held) {
                    registers.fields.insert(name.clone(), (stamp, value.clone()));
                }
            }
            if matches!(change.op, SharedOp::Insert(_)) {
                match change.model.as_str() {
                    "tags" if !self.tags.contains(&change.record) => self.tags.push(change.record),
                    "albums" if !self.albums.contains(&change.record) => {
                        self.albums.push(change.record)
                    }
                    _ => {}
                }
            }
        }
    }

    /// The tables every peer must hold, for the models the workload writes: device-owned rows as
    /// their owners last wrote them; shared records that exist, have every NOT NULL field, and
    /// whose referenced rows are present. Same layout as `lsync_store::dump_tables`.
    pub(super) fn expected(&self, registry: &Registry) -> BTreeMap<String, Vec<Vec<Value>>> {
        // Every table the workload writes is listed, empty or not, so that rows a peer holds
        // where none are expected are found.
        let mut tables: BTreeMap<String, Vec<(Uuid, Vec<Value>)>> = ["locations", "entries"]
            .into_iter()
            .map(|name| (name.to_owned(), Vec::new()))
            .collect();
        for owner in &self.owners {
            let Some(device) = owner.device else { continue };
            let system = |id: Uuid, version: HlcTime| {
                vec![
                    blob(id),
                    blob(device.0),
                    Value::Integer(i64::try_from(version.as_u64()).unwrap_or(i64::MAX)),
                ]
            };
            if let Some((id, values, version)) = &owner.location {
                let mut row = system(*id, *version);
                row.extend(values.iter().cloned());
                tables.entry("locations".into()).or_default().push((*id, row));
            }
            for (id, entry) in &owner.entries {
                let mut row = system(*id, entry.version);
                row.extend(entry.values.iter().cloned());
                tables.entry("entries".into()).or_default().push((*id, row));
            }
        }
        for model in registry.in_apply_order().filter(|model| model.ownership == Ownership::Shared)
        {
            let mut rows = Vec::new();
            for ((name, id), registers) in &self.registers {
                if *name != model.name || !matches!(registers.existence, Some((_, true))) {
                    continue;
                }
                let mut row = vec![blob(*id)];
                let mut shown = true;
                for column in &model.columns {
                    let value = match registers.fields.get(&column.name) {
                        Some((_, value)) => value.clone(),
                        None if column.nullable => Value::Null,
                        None => {
                            shown = false;
                            break;
                        }
                    };
                    if let (Some(target), Some(referenced)) = (&column.references, as_uuid(&value))
                    {
                        let present = tables.get(target).is_some_and(|rows| {
                            rows.iter().any(|(row_id, _)| *row_id == referenced)
                        });
                        shown &= present;
                    }
                    row.push(value);
                }
                if shown {
                    rows.push((*id, row));
                }
            }
            tables.insert(model.name.clone(), rows);
        }
        tables
            .into_iter()
            .map(|(name, mut rows)| {
                rows.sort_by_key(|(id, _)| *id);
                (name, rows.into_iter().map(|(_, row)| row).collect())
            })
            .collect()
    }
}

impl Owner {
    /// `root` and every entry below it.
    fn subtree(&self, root: Uuid) -> BTreeSet<Uuid> {
        let mut children: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
        for (id, entry) in &self.entries {
            if let Some(parent) = entry.parent {
                children.entry(parent).or_default().push(*id);
            }
        }
        let mut subtree = BTreeSet::from([root]);
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            for child in children.get(&id).into_iter().flatten() {
                if subtree.insert(*child) {
                    stack.push(*child);
                }
            }
        }
        subtree
    }

    fn remove(&mut self, ids: &BTreeSet<Uuid>) {
        for id in ids {
            self.entries.remove(id);
        }
        self.directories.retain(|id| !ids.contains(id));
        self.files.retain(|id| !ids.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use lsync_hlc::HlcTime;
    use lsync_store::reference_registry;

    use super::*;

    fn device(byte: u8) -> DeviceId {
        DeviceId::from_bytes([byte; 16])
    }

    fn change(origin: u8, ms: u64, model: &str, record: Uuid, op: SharedOp) -> SharedChange {
        SharedChange {
            origin: device(origin),
            seq: ms,
            time: HlcTime::new(ms, 0).unwrap(),
            model: model.into(),
            record,
            op,
        }
    }

    fn text_fields(pairs: &[(&str, &str)]) -> BTreeMap<String, Value> {
        pairs.iter().map(|(name, value)| ((*name).to_owned(), Value::from(*value))).collect()
    }

    /// Indexes a small tree for peer 0 and returns the workload with its entries acknowledged.
    fn indexed() -> Workload {
        let mut workload = Workload::new(7);
        workload.add_owner(device(1), 40);
        let mut version = 0;
        while let Some(Op::Rows { peer, model, edits }) = workload.index(0, 10) {
            let rows: Vec<StateRow> = edits
                .iter()
                .map(|edit| {
                    version += 1;
                    let RowEdit::Upsert { id, values } = edit else { unreachable!() };
                    let version = HlcTime::new(version, 0).unwrap();
                    StateRow {
                        id: *id,
                        version,
                        op: lsync_protocol::StateOp::Upsert(values.clone()),
                    }
                })
                .collect();
            workload.rows_written(peer, model, &edits, &rows);
        }
        workload
    }

    #[test]
    fn a_subtree_delete_removes_every_entry_below_it_and_only_those() {
        let mut workload = indexed();
        let registry = reference_registry().unwrap();
        assert_eq!(workload.expected(&registry)["entries"].len(), 40);
        let owner = &workload.owners[0];
        // A directory below the top with something in it.
        let root = *owner
            .directories
            .iter()
            .find(|id| owner.entries[*id].parent.is_some() && owner.subtree(**id).len() > 1)
            .unwrap();
        let below = owner.subtree(root);
        let edits = [RowEdit::DeleteSubtree { id: root }];
        workload.rows_written(0, "entries", &edits, &[]);
        let left = workload.expected(&registry)["entries"].len();
        assert_eq!(left, 40 - below.len());
        // Deleting everything leaves an expected table that is empty, not absent.
        let top = workload.owners[0].directories[0];
        workload.rows_written(0, "entries", &[RowEdit::DeleteSubtree { id: top }], &[]);
        assert_eq!(workload.expected(&registry)["entries"], Vec::<Vec<Value>>::new());
    }

    #[test]
    fn shared_records_merge_by_stamp_and_show_only_when_complete_and_referenced() {
        let mut workload = indexed();
        let registry = reference_registry().unwrap();
        let (tag, entry) = (Uuid::from_u128(1), workload.owners[0].files[0]);
        let link = Registry::membership_id("tag_assignments", tag, entry);
        let link_fields: BTreeMap<String, Value> =
            [("tag_id".to_owned(), blob(tag)), ("entry_id".to_owned(), blob(entry))].into();
        workload.shared_written(&[
            change(2, 10, "tags", tag, SharedOp::Insert(text_fields(&[("name", "work")]))),
            // A later rename from one device, an earlier one from another: the later stamp wins.
            change(3, 30, "tags", tag, SharedOp::Update(text_fields(&[("name", "job")]))),
            change(2, 20, "tags", tag, SharedOp::Update(text_fields(&[("name", "chore")]))),
            change(2, 40, "tag_assignments", link, SharedOp::Insert(link_fields)),
            // Only an update, never an insert: no NOT NULL name, so not shown.
            change(3, 50, "albums", Uuid::from_u128(2), SharedOp::Update(BTreeMap::new())),
        ]);
        let tables = workload.expected(&registry);
        assert_eq!(tables["tags"], [vec![blob(tag), Value::from("job"), Value::Null]]);
        assert_eq!(tables["tag_assignments"].len(), 1);
        assert!(tables["albums"].is_empty());
        // Deleting the tag hides the assignment that references it.
        workload.shared_written(&[change(3, 60, "tags", tag, SharedOp::Delete)]);
        let tables = workload.expected(&registry);
        assert!(tables["tags"].is_empty() && tables["tag_assignments"].is_empty());
    }
}

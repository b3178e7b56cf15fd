//! Shared data on SQLite: merged registers in `sync_shared_state`, the shared tables as their
//! projection, references in `sync_shared_refs`, waiting records in `sync_parked`. Every function
//! runs inside the caller's transaction.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lsync_hlc::{Clock, DeviceId, HlcError, HlcGenerator};
use lsync_protocol::{OriginSeq, SharedChange, SharedOp, SharedRecord, Value};
use lsync_store::sql::{
    bind_value, ident, in_list, read_uuid, rows_per_statement, seq_to_sql, value_rows,
};
use lsync_store::{ModelDef, Ownership, Registry, SqliteConnection, StoreError, store_clock};
use lsync_watermark::sql::{load_shared_progress, raise_shared_progress};
use sqlx::Row;
use uuid::Uuid;

use crate::{RecordState, SharedError, validate_change};

/// A row of a shared table, named by model and id.
pub type RowKey = (String, Uuid);

/// What applying changes did to the shared tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Projection {
    /// Rows written (appeared or changed), for change events.
    pub shown: Vec<RowKey>,
    /// Rows removed from their table (deleted, or hidden because a referenced row went).
    pub hidden: Vec<RowKey>,
    /// Records that exist but now wait for a referenced row that has not arrived.
    pub parked: Vec<RowKey>,
}

impl Projection {
    /// Adds what `other` showed, hid and parked.
    pub fn absorb(&mut self, other: Projection) {
        self.shown.extend(other.shown);
        self.hidden.extend(other.hidden);
        self.parked.extend(other.parked);
    }
}

/// A received change that was logged (it is part of its origin's sequence) but not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The change's origin.
    pub origin: DeviceId,
    /// Its sequence number.
    pub seq: u64,
    /// Why it was not applied.
    pub reason: String,
}

/// What receiving a batch of shared changes did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received {
    /// Changes seen for the first time (the rest were duplicates).
    pub fresh: usize,
    /// Fresh changes refused by validation (unknown model, bad values, …).
    pub rejected: Vec<Rejected>,
    /// Watermarks that moved.
    pub advanced: Vec<OriginSeq>,
    /// Fresh changes stamped beyond the clock's drift bound: applied (nothing is lost) but not
    /// adopted by the local clock, so one device's wrong clock cannot drag this one ahead.
    pub skewed: usize,
    /// Effect on the shared tables.
    pub projection: Projection,
}

/// Receives changes from a peer (a live batch or a catch-up page): logs the new ones (for relay
/// and watermarks), observes their stamps with the local clock, merges the valid ones, updates
/// the shared tables, and advances this device's watermarks and the clock's resume point.
/// Invalid changes are logged — they are part of their origin's sequence, and skipping them
/// would stall the watermark — but never applied, and reported.
///
/// At most `max_parked` records may wait for a referenced row: a batch that would park more
/// fails with [`SharedError::ParkedOverflow`], so the caller's transaction rolls back, nothing of
/// the batch is kept or acknowledged, and the sender still holds it to send again later. Parked
/// records are durable rows, not memory; the bound keeps a peer sending dangling references from
/// growing them without limit.
pub async fn receive<C: Clock>(
    conn: &mut SqliteConnection,
    registry: &Registry,
    clock: &HlcGenerator<C>,
    changes: &[SharedChange],
    max_parked: u64,
    now_ms: u64,
) -> Result<Received, SharedError> {
    let mut progress = load_shared_progress(conn).await?;
    let fresh = lsync_peer_log::sql::append_new(conn, changes, &progress, now_ms).await?;
    let mut received = Received { fresh: fresh.len(), ..Received::default() };
    let mut valid = Vec::with_capacity(fresh.len());
    for change in &fresh {
        match clock.update(change.hlc()) {
            Ok(_) => {}
            Err(HlcError::DriftExceeded { .. }) => received.skewed += 1,
            // The clock is at its maximum: the change still applies; local writes will fail.
            Err(HlcError::Exhausted { .. }) => {}
        }
        match validate_change(registry, change) {
            Ok(()) => valid.push(change),
            Err(reason) => {
                received.rejected.push(Rejected { origin: change.origin, seq: change.seq, reason })
            }
        }
    }
    received.projection = merge(conn, registry, &valid, now_ms).await?;
    received.advanced = lsync_peer_log::sql::advance_progress(
        conn,
        fresh.iter().map(|change| change.origin),
        &mut progress,
    )
    .await?;
    if !received.projection.parked.is_empty() {
        let parked = parked_count(conn).await?;
        if parked > max_parked {
            return Err(SharedError::ParkedOverflow { parked, max: max_parked });
        }
    }
    if !fresh.is_empty() {
        store_clock(conn, clock.last()).await?;
    }
    Ok(received)
}

/// A local edit of shared data, before it is stamped and numbered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Creates a record (or adds a set member) with all its NOT NULL fields.
    Insert {
        /// The shared model.
        model: String,
        /// The new record's id (for memberships: [`Registry::membership_id`] of the pair).
        id: Uuid,
        /// Its fields.
        fields: BTreeMap<String, Value>,
    },
    /// Sets fields of an existing record.
    Update {
        /// The shared model.
        model: String,
        /// The record.
        id: Uuid,
        /// The fields to set.
        fields: BTreeMap<String, Value>,
    },
    /// Deletes an existing record (or removes a set member).
    Delete {
        /// The shared model.
        model: String,
        /// The record.
        id: Uuid,
    },
}

impl Edit {
    fn key(&self) -> (&str, Uuid) {
        match self {
            Edit::Insert { model, id, .. }
            | Edit::Update { model, id, .. }
            | Edit::Delete { model, id } => (model, *id),
        }
    }

    fn into_op(self) -> (String, Uuid, SharedOp) {
        match self {
            Edit::Insert { model, id, fields } => (model, id, SharedOp::Insert(fields)),
            Edit::Update { model, id, fields } => (model, id, SharedOp::Update(fields)),
            Edit::Delete { model, id } => (model, id, SharedOp::Delete),
        }
    }
}

/// Writes local edits: each is stamped by `clock`, numbered after `origin`'s last change (the
/// device's current incarnation, `Identity::origin`: a new one every time the library is opened,
/// so a copy restored from a backup never reuses a number), merged and shown exactly as a
/// received change would be, and appended to the peer log — all in the caller's transaction,
/// together with the new watermark and the clock's resume point. Returns the changes, ready to
/// broadcast.
pub async fn write_local<C: Clock>(
    conn: &mut SqliteConnection,
    registry: &Registry,
    clock: &HlcGenerator<C>,
    origin: DeviceId,
    edits: Vec<Edit>,
    now_ms: u64,
) -> Result<(Vec<SharedChange>, Projection), SharedError> {
    let device = origin;
    let keys: Vec<RowKey> =
        edits.iter().map(|edit| (edit.key().0.to_owned(), edit.key().1)).collect();
    let stored = load_states(conn, &keys).await?;
    let mut states = stored.clone();
    let progress = load_shared_progress(conn).await?;
    let mut changes = Vec::with_capacity(edits.len());
    for (seq, edit) in (progress.get(device) + 1..).zip(edits) {
        let (model_name, id, op) = edit.into_op();
        let exists = states.get(&(model_name.clone(), id)).is_some_and(RecordState::exists);
        match (&op, exists) {
            (SharedOp::Insert(_), true) => {
                return Err(SharedError::AlreadyExists { model: model_name, id });
            }
            (SharedOp::Update(_) | SharedOp::Delete, false) => {
                return Err(SharedError::NotFound { model: model_name, id });
            }
            _ => {}
        }
        // After every stamp the record holds, even one from a clock far ahead: this edit was
        // made after seeing them, so it must win over them everywhere.
        let time =
            crate::local_stamp_time(clock.now()?.time(), states.get(&(model_name.clone(), id)));
        let change = SharedChange { origin: device, seq, time, model: model_name, record: id, op };
        validate_change(registry, &change).map_err(SharedError::Invalid)?;
        if let SharedOp::Insert(fields) = &change.op {
            let model = registry
                .model(&change.model)
                .ok_or_else(|| SharedError::Invalid(change.model.clone()))?;
            if let Some(missing) =
                model.columns.iter().find(|c| !c.nullable && !fields.contains_key(&c.name))
            {
                return Err(SharedError::Invalid(format!(
                    "{}.{} is required",
                    model.name, missing.name
                )));
            }
        }
        // Apply to the loaded state now, so a later edit in the same call sees this one.
        states
            .entry((change.model.clone(), change.record))
            .or_default()
            .apply(change.hlc(), &change.op);
        changes.push(change);
    }
    let refs: Vec<&SharedChange> = changes.iter().collect();
    let projection = merge_into(conn, registry, &refs, now_ms, stored).await?;
    lsync_peer_log::sql::append_new(conn, &changes, &progress, now_ms).await?;
    if let Some(last) = changes.last() {
        raise_shared_progress(conn, &[OriginSeq { origin: device, seq: last.seq }]).await?;
    }
    store_clock(conn, clock.last()).await?;
    Ok((changes, projection))
}

/// Merges validated changes into the stored registers and updates the shared tables.
async fn merge(
    conn: &mut SqliteConnection,
    registry: &Registry,
    changes: &[&SharedChange],
    now_ms: u64,
) -> Result<Projection, StoreError> {
    let keys: Vec<RowKey> =
        changes.iter().map(|change| (change.model.clone(), change.record)).collect();
    let states = load_states(conn, &keys).await?;
    merge_into(conn, registry, changes, now_ms, states).await
}

/// [`merge`] onto `states`, the stored registers of the changes' records, already loaded.
async fn merge_into(
    conn: &mut SqliteConnection,
    registry: &Registry,
    changes: &[&SharedChange],
    now_ms: u64,
    mut states: HashMap<RowKey, RecordState>,
) -> Result<Projection, StoreError> {
    let mut dirty = BTreeSet::new();
    for change in changes {
        let key = (change.model.clone(), change.record);
        if states.entry(key.clone()).or_default().apply(change.hlc(), &change.op) {
            dirty.insert(key);
        }
    }
    save_states(conn, &states, &dirty).await?;
    project(conn, registry, dirty, &mut states, now_ms, &BTreeSet::new()).await
}

/// Merges snapshot records of `model` (a backfill page) into the stored registers and updates
/// the shared tables.
pub async fn apply_snapshot(
    conn: &mut SqliteConnection,
    registry: &Registry,
    model: &str,
    records: &[SharedRecord],
    now_ms: u64,
) -> Result<Projection, SharedError> {
    let model_def = registry
        .model(model)
        .ok_or_else(|| SharedError::Invalid(format!("unknown model {model}")))?;
    if model_def.ownership != Ownership::Shared {
        return Err(SharedError::Invalid(format!("{model} is not shared")));
    }
    for record in records {
        for (name, register) in &record.fields {
            let column = model_def
                .column(name)
                .ok_or_else(|| SharedError::Invalid(format!("{model} has no column {name}")))?;
            model_def.check_value(column, &register.1).map_err(SharedError::Invalid)?;
        }
    }
    let keys: Vec<RowKey> = records.iter().map(|record| (model.to_owned(), record.id)).collect();
    let mut states = load_states(conn, &keys).await?;
    let mut dirty = BTreeSet::new();
    for record in records {
        let key = (model.to_owned(), record.id);
        if states.entry(key.clone()).or_default().merge(&RecordState::from_record(record)) {
            dirty.insert(key);
        }
    }
    save_states(conn, &states, &dirty).await?;
    Ok(project(conn, registry, dirty, &mut states, now_ms, &BTreeSet::new()).await?)
}

/// One page of a shared model's merged records in id order, for a backfilling peer; the flag
/// says whether more follow.
pub async fn snapshot_page(
    conn: &mut SqliteConnection,
    model: &str,
    after: Option<Uuid>,
    limit: u32,
) -> Result<(Vec<SharedRecord>, bool), StoreError> {
    let after = after.map_or_else(Vec::new, |id| id.as_bytes().to_vec());
    let rows = sqlx::query(
        "SELECT id, state FROM sync_shared_state WHERE model = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
    )
    .bind(model)
    .bind(after.as_slice())
    .bind(i64::from(limit) + 1)
    .fetch_all(conn)
    .await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    let records = rows
        .iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(|row| Ok(decode_state(&row.try_get::<Vec<u8>, _>(1)?)?.to_record(read_uuid(row, 0)?)))
        .collect::<Result<_, StoreError>>()?;
    Ok((records, more))
}

/// Re-projects the shared records that reference rows of `target_model` with these ids, after
/// those rows appeared or were removed (device-owned rows applied by state-sync). Records whose
/// target was `deleted` are hidden as orphans, not parked as waiting.
pub async fn reproject_dependents(
    conn: &mut SqliteConnection,
    registry: &Registry,
    target_model: &str,
    ids: &[Uuid],
    deleted: bool,
    now_ms: u64,
) -> Result<Projection, StoreError> {
    let dependents = dependents_of(conn, target_model, ids).await?;
    if dependents.is_empty() {
        return Ok(Projection::default());
    }
    let mut states = HashMap::new();
    let deleted_targets: BTreeSet<RowKey> = if deleted {
        ids.iter().map(|id| (target_model.to_owned(), *id)).collect()
    } else {
        BTreeSet::new()
    };
    project(conn, registry, dependents, &mut states, now_ms, &deleted_targets).await
}

/// Records waiting for a referenced row (orphans of deleted rows not counted).
pub async fn parked_count(conn: &mut SqliteConnection) -> Result<u64, StoreError> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_parked WHERE orphaned = 0")
        .fetch_one(conn)
        .await?;
    Ok(count.cast_unsigned())
}

/// The merged state of one record, if any change reached it.
pub async fn record_state(
    conn: &mut SqliteConnection,
    model: &str,
    id: Uuid,
) -> Result<Option<RecordState>, StoreError> {
    Ok(load_states(conn, &[(model.to_owned(), id)]).await?.remove(&(model.to_owned(), id)))
}

/// Shows, hides or parks each record in `work`, then does the same for the records referencing
/// any row that appeared or disappeared, until nothing changes. The reference graph between
/// shared models is acyclic (the registry refuses cycles), so this ends.
async fn project(
    conn: &mut SqliteConnection,
    registry: &Registry,
    mut work: BTreeSet<RowKey>,
    states: &mut HashMap<RowKey, RecordState>,
    now_ms: u64,
    deleted_targets: &BTreeSet<RowKey>,
) -> Result<Projection, StoreError> {
    let mut projection = Projection::default();
    while !work.is_empty() {
        let missing: Vec<RowKey> =
            work.iter().filter(|key| !states.contains_key(*key)).cloned().collect();
        states.extend(load_states(conn, &missing).await?);
        let mut by_model: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
        for (model, id) in std::mem::take(&mut work) {
            by_model.entry(model).or_default().push(id);
        }
        let mut transitions = Vec::new();
        for (model_name, ids) in by_model {
            let Some(model) = registry.model(&model_name) else {
                continue;
            };
            let (round, moved) =
                project_model(conn, registry, model, &ids, states, now_ms, deleted_targets).await?;
            projection.absorb(round);
            transitions.extend(moved.into_iter().map(|id| (model_name.clone(), id)));
        }
        let mut by_target: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
        for (model, id) in transitions {
            by_target.entry(model).or_default().push(id);
        }
        for (target_model, ids) in by_target {
            work.extend(dependents_of(conn, &target_model, &ids).await?);
        }
    }
    Ok(projection)
}

/// Projects records of one model; returns the projection and the ids whose presence in the table
/// changed (their dependents must be re-projected).
#[allow(clippy::too_many_lines, reason = "one pass over one model's records, step by step")]
async fn project_model(
    conn: &mut SqliteConnection,
    registry: &Registry,
    model: &ModelDef,
    ids: &[Uuid],
    states: &HashMap<RowKey, RecordState>,
    now_ms: u64,
    deleted_targets: &BTreeSet<RowKey>,
) -> Result<(Projection, Vec<Uuid>), StoreError> {
    let present_before = present_ids(conn, &model.name, ids).await?;
    let reference_columns: Vec<(usize, &str)> = model
        .columns
        .iter()
        .enumerate()
        .filter_map(|(index, column)| column.references.as_deref().map(|target| (index, target)))
        .collect();

    // Rows to show, with the rows they reference.
    let mut rows: Vec<(Uuid, Vec<Value>)> = Vec::new();
    let mut refs: Vec<(Uuid, &str, Uuid)> = Vec::new();
    for id in ids {
        let Some(state) = states.get(&(model.name.clone(), *id)) else {
            continue;
        };
        for (index, target) in &reference_columns {
            if let Some(lsync_protocol::Stamped(_, Value::Blob(bytes))) =
                state.fields.get(&model.columns[*index].name)
                && let Ok(target_id) = Uuid::from_slice(bytes)
            {
                refs.push((*id, target, target_id));
            }
        }
        if let Some(row) = state.row(model) {
            rows.push((*id, row));
        }
    }
    replace_refs(conn, &model.name, ids, &refs).await?;

    // Which referenced rows are present.
    let mut wanted: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
    for (_, target, target_id) in &refs {
        wanted.entry(target).or_default().push(*target_id);
    }
    let mut present_targets: BTreeSet<(String, Uuid)> = BTreeSet::new();
    for (target, target_ids) in wanted {
        if registry.model(target).is_some() {
            for id in present_ids(conn, target, &target_ids).await? {
                present_targets.insert((target.to_owned(), id));
            }
        }
    }
    let missing_target = |id: Uuid| {
        refs.iter()
            .filter(|(record, ..)| *record == id)
            .find(|(_, target, target_id)| {
                !present_targets.contains(&((*target).to_owned(), *target_id))
            })
            .map(|(_, target, target_id)| ((*target).to_owned(), *target_id))
    };

    let mut projection = Projection::default();
    let mut show = Vec::new();
    let mut park = Vec::new();
    for (id, row) in rows {
        match missing_target(id) {
            None => show.push((id, row)),
            Some(target) => park.push((id, target)),
        }
    }
    let shown: BTreeSet<Uuid> = show.iter().map(|(id, _)| *id).collect();
    let removed: Vec<Uuid> = ids.iter().filter(|id| !shown.contains(id)).copied().collect();

    upsert_rows(conn, model, &show).await?;
    delete_rows(conn, &model.name, &removed).await?;
    unpark(conn, &model.name, ids).await?;
    let mut parked_rows = Vec::new();
    for (id, (target_model, target_id)) in &park {
        // A record whose target was deleted, or already hidden as an orphan, stays an orphan.
        let orphaned = deleted_targets.contains(&(target_model.clone(), *target_id));
        parked_rows.push((*id, target_model.as_str(), *target_id, orphaned));
    }
    park_rows(conn, &model.name, &parked_rows, now_ms).await?;

    projection.shown = show.iter().map(|(id, _)| (model.name.clone(), *id)).collect();
    projection.hidden = removed
        .iter()
        .filter(|id| present_before.contains(id))
        .map(|id| (model.name.clone(), *id))
        .collect();
    projection.parked = parked_rows
        .iter()
        .filter(|(.., orphaned)| !orphaned)
        .map(|(id, ..)| (model.name.clone(), *id))
        .collect();
    let moved = ids
        .iter()
        .filter(|id| present_before.contains(id) != shown.contains(id))
        .copied()
        .collect();
    Ok((projection, moved))
}

async fn present_ids(
    conn: &mut SqliteConnection,
    model: &str,
    ids: &[Uuid],
) -> Result<BTreeSet<Uuid>, StoreError> {
    let mut present = BTreeSet::new();
    for chunk in ids.chunks(rows_per_statement(1)) {
        let sql = format!("SELECT id FROM {} WHERE id IN ({})", ident(model), in_list(chunk.len()));
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_bytes().as_slice());
        }
        for row in query.fetch_all(&mut *conn).await? {
            present.insert(read_uuid(&row, 0)?);
        }
    }
    Ok(present)
}

async fn replace_refs(
    conn: &mut SqliteConnection,
    model: &str,
    ids: &[Uuid],
    refs: &[(Uuid, &str, Uuid)],
) -> Result<(), StoreError> {
    for chunk in ids.chunks(rows_per_statement(1) - 1) {
        let sql = format!(
            "DELETE FROM sync_shared_refs WHERE model = ? AND id IN ({})",
            in_list(chunk.len())
        );
        let mut query = sqlx::query(&sql).bind(model);
        for id in chunk {
            query = query.bind(id.as_bytes().as_slice());
        }
        query.execute(&mut *conn).await?;
    }
    for chunk in refs.chunks(rows_per_statement(4)) {
        let sql = format!(
            "INSERT OR IGNORE INTO sync_shared_refs (target_model, target_id, model, id) VALUES {}",
            value_rows(chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for (id, target, target_id) in chunk {
            query = query
                .bind(*target)
                .bind(target_id.as_bytes().as_slice())
                .bind(model)
                .bind(id.as_bytes().as_slice());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn dependents_of(
    conn: &mut SqliteConnection,
    target_model: &str,
    ids: &[Uuid],
) -> Result<BTreeSet<RowKey>, StoreError> {
    let mut dependents = BTreeSet::new();
    // Most rows are referenced by nothing (a backfill page of entries, a bulk index): one range
    // probe spares a lookup per id.
    let (Some(low), Some(high)) = (ids.iter().min(), ids.iter().max()) else {
        return Ok(dependents);
    };
    let any: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sync_shared_refs
                         WHERE target_model = ?1 AND target_id BETWEEN ?2 AND ?3)",
    )
    .bind(target_model)
    .bind(low.as_bytes().as_slice())
    .bind(high.as_bytes().as_slice())
    .fetch_one(&mut *conn)
    .await?;
    if !any {
        return Ok(dependents);
    }
    for chunk in ids.chunks(rows_per_statement(1) - 1) {
        let sql = format!(
            "SELECT model, id FROM sync_shared_refs WHERE target_model = ? AND target_id IN ({})",
            in_list(chunk.len())
        );
        let mut query = sqlx::query(&sql).bind(target_model);
        for id in chunk {
            query = query.bind(id.as_bytes().as_slice());
        }
        for row in query.fetch_all(&mut *conn).await? {
            dependents.insert((row.try_get::<String, _>(0)?, read_uuid(&row, 1)?));
        }
    }
    Ok(dependents)
}

async fn upsert_rows(
    conn: &mut SqliteConnection,
    model: &ModelDef,
    rows: &[(Uuid, Vec<Value>)],
) -> Result<(), StoreError> {
    let columns: Vec<String> = model.columns.iter().map(|column| ident(&column.name)).collect();
    let updates: Vec<String> =
        columns.iter().map(|column| format!("{column} = excluded.{column}")).collect();
    let per_row = columns.len() + 1;
    for chunk in rows.chunks(rows_per_statement(per_row)) {
        let mut sql = format!(
            "INSERT INTO {} (id{}{}) VALUES {}",
            ident(&model.name),
            if columns.is_empty() { "" } else { ", " },
            columns.join(", "),
            value_rows(chunk.len(), per_row)
        );
        if updates.is_empty() {
            sql.push_str(" ON CONFLICT (id) DO NOTHING");
        } else {
            sql.push_str(&format!(" ON CONFLICT (id) DO UPDATE SET {}", updates.join(", ")));
        }
        let mut query = sqlx::query(&sql);
        for (id, values) in chunk {
            query = query.bind(id.as_bytes().as_slice());
            for value in values {
                query = bind_value(query, value);
            }
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn delete_rows(
    conn: &mut SqliteConnection,
    model: &str,
    ids: &[Uuid],
) -> Result<(), StoreError> {
    for chunk in ids.chunks(rows_per_statement(1)) {
        let sql = format!("DELETE FROM {} WHERE id IN ({})", ident(model), in_list(chunk.len()));
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_bytes().as_slice());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn unpark(conn: &mut SqliteConnection, model: &str, ids: &[Uuid]) -> Result<(), StoreError> {
    for chunk in ids.chunks(rows_per_statement(1) - 1) {
        let sql =
            format!("DELETE FROM sync_parked WHERE model = ? AND id IN ({})", in_list(chunk.len()));
        let mut query = sqlx::query(&sql).bind(model);
        for id in chunk {
            query = query.bind(id.as_bytes().as_slice());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn park_rows(
    conn: &mut SqliteConnection,
    model: &str,
    rows: &[(Uuid, &str, Uuid, bool)],
    now_ms: u64,
) -> Result<(), StoreError> {
    let parked_at = seq_to_sql(now_ms)?;
    for chunk in rows.chunks(rows_per_statement(6)) {
        let sql = format!(
            "INSERT INTO sync_parked (model, id, target_model, target_id, orphaned, parked_at) VALUES {}",
            value_rows(chunk.len(), 6)
        );
        let mut query = sqlx::query(&sql);
        for (id, target_model, target_id, orphaned) in chunk {
            query = query
                .bind(model)
                .bind(id.as_bytes().as_slice())
                .bind(*target_model)
                .bind(target_id.as_bytes().as_slice())
                .bind(*orphaned)
                .bind(parked_at);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn load_states(
    conn: &mut SqliteConnection,
    keys: &[RowKey],
) -> Result<HashMap<RowKey, RecordState>, StoreError> {
    let mut by_model: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
    for (model, id) in keys {
        by_model.entry(model).or_default().push(*id);
    }
    let mut states = HashMap::with_capacity(keys.len());
    for (model, ids) in by_model {
        let ids: Vec<Uuid> = ids.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        for chunk in ids.chunks(rows_per_statement(1) - 1) {
            let sql = format!(
                "SELECT id, state FROM sync_shared_state WHERE model = ? AND id IN ({})",
                in_list(chunk.len())
            );
            let mut query = sqlx::query(&sql).bind(model);
            for id in chunk {
                query = query.bind(id.as_bytes().as_slice());
            }
            for row in query.fetch_all(&mut *conn).await? {
                let state = decode_state(&row.try_get::<Vec<u8>, _>(1)?)?;
                states.insert((model.to_owned(), read_uuid(&row, 0)?), state);
            }
        }
    }
    Ok(states)
}

async fn save_states(
    conn: &mut SqliteConnection,
    states: &HashMap<RowKey, RecordState>,
    dirty: &BTreeSet<RowKey>,
) -> Result<(), StoreError> {
    let dirty: Vec<&RowKey> = dirty.iter().collect();
    for chunk in dirty.chunks(rows_per_statement(3)) {
        let encoded: Vec<Vec<u8>> = chunk
            .iter()
            .map(|key| encode_state(key.1, states.get(*key).unwrap_or(&RecordState::default())))
            .collect::<Result<_, _>>()?;
        let sql = format!(
            "INSERT INTO sync_shared_state (model, id, state) VALUES {}
             ON CONFLICT (model, id) DO UPDATE SET state = excluded.state",
            value_rows(chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for (key, state) in chunk.iter().zip(&encoded) {
            query =
                query.bind(key.0.as_str()).bind(key.1.as_bytes().as_slice()).bind(state.as_slice());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

fn encode_state(id: Uuid, state: &RecordState) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec(&state.to_record(id))
        .map_err(|error| StoreError::OutOfRange(format!("record state: {error}")))
}

fn decode_state(bytes: &[u8]) -> Result<RecordState, StoreError> {
    rmp_serde::from_slice::<SharedRecord>(bytes)
        .map(|record| RecordState::from_record(&record))
        .map_err(|error| StoreError::Corrupt(format!("record state: {error}")))
}

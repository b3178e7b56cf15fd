//! `sync_peer_log` queries, inside the caller's transaction.

use std::collections::{BTreeMap, BTreeSet};

use lsync_hlc::DeviceId;
use lsync_protocol::{OriginSeq, SharedChange, SharedOp, Value};
use lsync_store::sql::{
    read_uuid, rows_per_statement, seq_from_sql, seq_to_sql, time_from_sql, time_to_sql, value_rows,
};
use lsync_store::{SqliteConnection, StoreError};
use lsync_watermark::{SharedProgress, advance_contiguous};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use crate::{OriginLog, PrunePlan};

/// Columns of one log entry.
const COLUMNS: &str = "origin, seq, time, model, record, op, fields";

/// Appends the changes not logged yet and returns them (in input order). A change at or below
/// this device's watermark for its origin, or already in the log, is a duplicate.
pub async fn append_new(
    conn: &mut SqliteConnection,
    changes: &[SharedChange],
    progress: &SharedProgress,
    now_ms: u64,
) -> Result<Vec<SharedChange>, StoreError> {
    let candidates: Vec<&SharedChange> =
        changes.iter().filter(|change| change.seq > progress.get(change.origin)).collect();
    let logged = already_logged(conn, &candidates).await?;
    let mut seen = BTreeSet::new();
    let fresh: Vec<SharedChange> = candidates
        .into_iter()
        .filter(|change| {
            let key = (change.origin, change.seq);
            !logged.contains(&key) && seen.insert(key)
        })
        .cloned()
        .collect();
    insert(conn, &fresh, now_ms).await?;
    Ok(fresh)
}

async fn already_logged(
    conn: &mut SqliteConnection,
    changes: &[&SharedChange],
) -> Result<BTreeSet<(DeviceId, u64)>, StoreError> {
    let mut logged = BTreeSet::new();
    for chunk in changes.chunks(rows_per_statement(2)) {
        let sql = format!(
            "SELECT origin, seq FROM sync_peer_log WHERE (origin, seq) IN (VALUES {})",
            value_rows(chunk.len(), 2)
        );
        let mut query = sqlx::query(&sql);
        for change in chunk {
            query = query.bind(change.origin.as_bytes().as_slice()).bind(seq_to_sql(change.seq)?);
        }
        for row in query.fetch_all(&mut *conn).await? {
            logged.insert((DeviceId(read_uuid(&row, 0)?), seq_from_sql(row.try_get(1)?)?));
        }
    }
    Ok(logged)
}

async fn insert(
    conn: &mut SqliteConnection,
    changes: &[SharedChange],
    now_ms: u64,
) -> Result<(), StoreError> {
    let logged_at = seq_to_sql(now_ms)?;
    for chunk in changes.chunks(rows_per_statement(8)) {
        let sql = format!(
            "INSERT OR IGNORE INTO sync_peer_log ({COLUMNS}, logged_at) VALUES {}",
            value_rows(chunk.len(), 8)
        );
        let encoded: Vec<Option<Vec<u8>>> = chunk
            .iter()
            .map(|change| change.op.fields().map(encode_fields).transpose())
            .collect::<Result<_, _>>()?;
        let mut query = sqlx::query(&sql);
        for (change, fields) in chunk.iter().zip(&encoded) {
            query = query
                .bind(change.origin.as_bytes().as_slice())
                .bind(seq_to_sql(change.seq)?)
                .bind(time_to_sql(change.time)?)
                .bind(change.model.as_str())
                .bind(change.record.as_bytes().as_slice())
                .bind(i64::from(op_code(&change.op)))
                .bind(fields.as_deref())
                .bind(logged_at);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Raises this device's watermark of each origin in `origins` as far as the log is contiguous
/// above it, persists the new watermarks, and returns those of the origins that moved. The log
/// above a watermark is read in rounds of 10,000 entries, so a long backlog costs bounded memory.
pub async fn advance_progress(
    conn: &mut SqliteConnection,
    origins: impl IntoIterator<Item = DeviceId>,
    progress: &mut SharedProgress,
) -> Result<Vec<OriginSeq>, StoreError> {
    /// Entries read per origin per round; a backlog larger than this advances in several rounds.
    const SCAN: i64 = 10_000;
    let mut moved = Vec::new();
    for origin in origins.into_iter().collect::<BTreeSet<_>>() {
        let start = progress.get(origin);
        loop {
            let current = progress.get(origin);
            let seqs: Vec<i64> = sqlx::query_scalar(
                "SELECT seq FROM sync_peer_log WHERE origin = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .bind(origin.as_bytes().as_slice())
            .bind(seq_to_sql(current)?)
            .bind(SCAN)
            .fetch_all(&mut *conn)
            .await?;
            let complete_scan = seqs.len() < usize::try_from(SCAN).unwrap_or(usize::MAX);
            let seqs: Vec<u64> = seqs.into_iter().map(seq_from_sql).collect::<Result<_, _>>()?;
            let next = advance_contiguous(current, seqs);
            progress.raise(origin, next);
            if next == current || complete_scan {
                break;
            }
        }
        if progress.get(origin) > start {
            moved.push(OriginSeq { origin, seq: progress.get(origin) });
        }
    }
    lsync_watermark::sql::raise_shared_progress(conn, &moved).await?;
    Ok(moved)
}

/// The answer to a catch-up request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// Changes in (origin, sequence) order, each origin contiguous from the requested point.
    pub changes: Vec<SharedChange>,
    /// Whether every wanted change that is held was returned.
    pub complete: bool,
    /// Origins whose wanted changes were pruned here, with the lowest sequence still held (or the
    /// next one to be written, if none is held).
    pub pruned: Vec<OriginSeq>,
}

/// Changes the requester lacks: for each origin this device has progressed on, those after the
/// requester's watermark (`after`; unlisted origins: from the start), at most `limit` in all.
pub async fn changes_after(
    conn: &mut SqliteConnection,
    after: &SharedProgress,
    own: &SharedProgress,
    limit: usize,
) -> Result<CatchUp, StoreError> {
    let held: BTreeMap<DeviceId, (u64, u64)> =
        sqlx::query("SELECT origin, min(seq), max(seq) FROM sync_peer_log GROUP BY origin")
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|row| {
                Ok((
                    DeviceId(read_uuid(row, 0)?),
                    (seq_from_sql(row.try_get(1)?)?, seq_from_sql(row.try_get(2)?)?),
                ))
            })
            .collect::<Result<_, StoreError>>()?;

    let mut answer = CatchUp { complete: true, ..CatchUp::default() };
    for (origin, applied) in own.iter() {
        let start = after.get(origin);
        if applied <= start {
            continue;
        }
        match held.get(&origin) {
            Some((first, _)) if *first <= start + 1 => {}
            Some((first, _)) => {
                answer.pruned.push(OriginSeq { origin, seq: *first });
                continue;
            }
            None => {
                answer.pruned.push(OriginSeq { origin, seq: applied + 1 });
                continue;
            }
        }
        let room = limit.saturating_sub(answer.changes.len());
        if room == 0 {
            answer.complete = false;
            break;
        }
        // Serve only the contiguous part this device applied: entries above it may have gaps.
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sync_peer_log WHERE origin = ?1 AND seq > ?2 AND seq <= ?3 ORDER BY seq LIMIT ?4"
        ))
        .bind(origin.as_bytes().as_slice())
        .bind(seq_to_sql(start)?)
        .bind(seq_to_sql(applied)?)
        .bind(i64::try_from(room).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?;
        let served = rows.len();
        for row in &rows {
            answer.changes.push(read_change(row)?);
        }
        if u64::try_from(served).unwrap_or(u64::MAX) < applied - start {
            answer.complete = false;
        }
    }
    Ok(answer)
}

/// The shape of the log per origin, with entries logged before `age_cutoff_ms` counted as aged.
pub async fn origin_logs(
    conn: &mut SqliteConnection,
    age_cutoff_ms: u64,
) -> Result<Vec<OriginLog>, StoreError> {
    let rows = sqlx::query(
        "SELECT origin, min(seq), max(seq), max(CASE WHEN logged_at < ?1 THEN seq END)
         FROM sync_peer_log GROUP BY origin ORDER BY origin",
    )
    .bind(seq_to_sql(age_cutoff_ms)?)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(OriginLog {
                origin: DeviceId(read_uuid(row, 0)?),
                first_seq: seq_from_sql(row.try_get(1)?)?,
                last_seq: seq_from_sql(row.try_get(2)?)?,
                aged_out_through: row
                    .try_get::<Option<i64>, _>(3)?
                    .map(seq_from_sql)
                    .transpose()?,
            })
        })
        .collect()
}

/// Deletes what `plan` says; returns the number of entries deleted.
pub async fn prune(conn: &mut SqliteConnection, plan: &PrunePlan) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for through in &plan.prune_through {
        deleted += sqlx::query("DELETE FROM sync_peer_log WHERE origin = ?1 AND seq <= ?2")
            .bind(through.origin.as_bytes().as_slice())
            .bind(seq_to_sql(through.seq)?)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    Ok(deleted)
}

/// Entries in the log.
pub async fn len(conn: &mut SqliteConnection) -> Result<u64, StoreError> {
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync_peer_log").fetch_one(conn).await?;
    seq_from_sql(count)
}

fn op_code(op: &SharedOp) -> u8 {
    match op {
        SharedOp::Insert(_) => 0,
        SharedOp::Update(_) => 1,
        SharedOp::Delete => 2,
    }
}

fn encode_fields(fields: &BTreeMap<String, Value>) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec(fields)
        .map_err(|error| StoreError::OutOfRange(format!("change fields: {error}")))
}

fn read_change(row: &SqliteRow) -> Result<SharedChange, StoreError> {
    let fields = || -> Result<BTreeMap<String, Value>, StoreError> {
        let bytes: Option<Vec<u8>> = row.try_get(6)?;
        let bytes = bytes.ok_or_else(|| StoreError::Corrupt("log entry without fields".into()))?;
        rmp_serde::from_slice(&bytes)
            .map_err(|error| StoreError::Corrupt(format!("log entry fields: {error}")))
    };
    let op = match row.try_get::<i64, _>(5)? {
        0 => SharedOp::Insert(fields()?),
        1 => SharedOp::Update(fields()?),
        2 => SharedOp::Delete,
        other => return Err(StoreError::Corrupt(format!("log entry op {other}"))),
    };
    Ok(SharedChange {
        origin: DeviceId(read_uuid(row, 0)?),
        seq: seq_from_sql(row.try_get(1)?)?,
        time: time_from_sql(row.try_get(2)?)?,
        model: row.try_get(3)?,
        record: Uuid::from_slice(&row.try_get::<Vec<u8>, _>(4)?)
            .map_err(|_| StoreError::Corrupt("log entry record id".into()))?,
        op,
    })
}

//! Persistence of watermarks, peers and acks, inside the caller's transaction.

use std::collections::BTreeMap;

use lsync_hlc::{DeviceId, HlcTime};
use lsync_protocol::{Epoch, OriginSeq, StateMark, Watermarks};
use lsync_store::sql::{
    read_uuid, rows_per_statement, seq_from_sql, seq_to_sql, time_from_sql, time_to_sql, value_rows,
};
use lsync_store::{Identity, SqliteConnection, StoreError};
use sqlx::Row;

use crate::{EpochCheck, Resync, SharedProgress, StateProgress, check_epoch};

/// This device's shared progress.
pub async fn load_shared_progress(
    conn: &mut SqliteConnection,
) -> Result<SharedProgress, StoreError> {
    let mut progress = SharedProgress::default();
    for row in sqlx::query("SELECT origin, seq FROM sync_progress_shared").fetch_all(conn).await? {
        progress.raise(DeviceId(read_uuid(&row, 0)?), seq_from_sql(row.try_get(1)?)?);
    }
    Ok(progress)
}

/// Raises this device's watermarks for the given origins (never lowers them).
pub async fn raise_shared_progress(
    conn: &mut SqliteConnection,
    entries: &[OriginSeq],
) -> Result<(), StoreError> {
    for chunk in entries.chunks(rows_per_statement(2)) {
        let sql = format!(
            "INSERT INTO sync_progress_shared (origin, seq) VALUES {}
             ON CONFLICT (origin) DO UPDATE SET seq = max(seq, excluded.seq)",
            value_rows(chunk.len(), 2)
        );
        let mut query = sqlx::query(&sql);
        for entry in chunk {
            query = query.bind(entry.origin.as_bytes().as_slice()).bind(seq_to_sql(entry.seq)?);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// This device's state progress.
pub async fn load_state_progress(conn: &mut SqliteConnection) -> Result<StateProgress, StoreError> {
    let mut progress = StateProgress::default();
    for row in
        sqlx::query("SELECT owner, model, version FROM sync_progress_state").fetch_all(conn).await?
    {
        let model: String = row.try_get(1)?;
        progress.raise(DeviceId(read_uuid(&row, 0)?), &model, time_from_sql(row.try_get(2)?)?);
    }
    Ok(progress)
}

/// This device's state mark for one (owner, model), if it has one.
pub async fn state_mark(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    model: &str,
) -> Result<Option<HlcTime>, StoreError> {
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT version FROM sync_progress_state WHERE owner = ?1 AND model = ?2",
    )
    .bind(owner.as_bytes().as_slice())
    .bind(model)
    .fetch_optional(&mut *conn)
    .await?;
    version.map(time_from_sql).transpose()
}

/// Raises this device's state marks (never lowers them).
pub async fn raise_state_progress(
    conn: &mut SqliteConnection,
    marks: &[StateMark],
) -> Result<(), StoreError> {
    raise_marks(conn, "sync_progress_state", marks).await
}

/// Per (owner, model), the newest deletion this device may no longer remember (its tombstone
/// collected here, or never received because this copy came from a peer that had collected it).
pub async fn load_collected(conn: &mut SqliteConnection) -> Result<StateProgress, StoreError> {
    let mut progress = StateProgress::default();
    for row in sqlx::query("SELECT owner, model, version FROM sync_collected_state")
        .fetch_all(conn)
        .await?
    {
        let model: String = row.try_get(1)?;
        progress.raise(DeviceId(read_uuid(&row, 0)?), &model, time_from_sql(row.try_get(2)?)?);
    }
    Ok(progress)
}

/// Raises what [`load_collected`] returns (never lowers it).
pub async fn raise_collected(
    conn: &mut SqliteConnection,
    marks: &[StateMark],
) -> Result<(), StoreError> {
    raise_marks(conn, "sync_collected_state", marks).await
}

async fn raise_marks(
    conn: &mut SqliteConnection,
    table: &str,
    marks: &[StateMark],
) -> Result<(), StoreError> {
    for chunk in marks.chunks(rows_per_statement(3)) {
        let sql = format!(
            "INSERT INTO {table} (owner, model, version) VALUES {}
             ON CONFLICT (owner, model) DO UPDATE SET version = max(version, excluded.version)",
            value_rows(chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for mark in chunk {
            query = query
                .bind(mark.owner.as_bytes().as_slice())
                .bind(mark.model.as_str())
                .bind(time_to_sql(mark.version)?);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// This device's watermarks as the wire message.
pub async fn own_watermarks(
    conn: &mut SqliteConnection,
    identity: Identity,
    ready: bool,
) -> Result<Watermarks, StoreError> {
    Ok(Watermarks {
        library: identity.library,
        device: identity.device,
        epoch: identity.epoch,
        shared: load_shared_progress(conn).await?.to_wire(),
        state: load_state_progress(conn).await?.to_wire(),
        ready,
        resync: false,
        collected: load_collected(conn).await?.to_wire(),
        incarnation: Some(OriginSeq {
            origin: identity.origin,
            seq: lsync_store::generation(conn).await?,
        }),
        seen: None,
        wall_ms: None,
    })
}

/// Remembers the incarnation and write count `peer` announced (`Watermarks::incarnation`) as
/// [`seen_after`](crate::seen_after) decides; returns what was remembered before, to tell back
/// to it (`Watermarks::seen`). `told`: the caller tells the previous value back (a watermark
/// request); a heartbeat does not.
pub async fn record_seen(
    conn: &mut SqliteConnection,
    peer: DeviceId,
    announced: Option<OriginSeq>,
    told: bool,
) -> Result<Option<OriginSeq>, StoreError> {
    let before = load_seen(conn, peer).await?;
    if let Some(next) = crate::seen_after(before, announced, told) {
        sqlx::query(
            "UPDATE sync_peers SET seen_origin = ?2, seen_generation = ?3 WHERE device = ?1",
        )
        .bind(peer.as_bytes().as_slice())
        .bind(next.origin.as_bytes().as_slice())
        .bind(seq_to_sql(next.seq)?)
        .execute(&mut *conn)
        .await?;
    }
    Ok(before)
}

/// What this device last heard of `peer`'s incarnation and write count ([`record_seen`]).
pub async fn load_seen(
    conn: &mut SqliteConnection,
    peer: DeviceId,
) -> Result<Option<OriginSeq>, StoreError> {
    let row = sqlx::query(
        "SELECT seen_origin, seen_generation FROM sync_peers
         WHERE device = ?1 AND seen_origin IS NOT NULL AND seen_generation IS NOT NULL",
    )
    .bind(peer.as_bytes().as_slice())
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some(row) => Some(OriginSeq {
            origin: DeviceId(read_uuid(&row, 0)?),
            seq: seq_from_sql(row.try_get(1)?)?,
        }),
        None => None,
    })
}

/// A paired device as remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    /// The device.
    pub device: DeviceId,
    /// Its name.
    pub name: String,
    /// The epoch it last announced (`None` until first contact).
    pub epoch: Option<Epoch>,
    /// When it was paired (ms since the epoch).
    pub paired_at: u64,
    /// When it was last connected (ms since the epoch).
    pub last_seen: Option<u64>,
    /// Whether it fell behind what this device still holds and must be backfilled.
    pub needs_resync: bool,
}

/// Remembers `device` as paired (or renames it).
pub async fn add_peer(
    conn: &mut SqliteConnection,
    device: DeviceId,
    name: &str,
    now_ms: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO sync_peers (device, name, paired_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (device) DO UPDATE SET name = excluded.name",
    )
    .bind(device.as_bytes().as_slice())
    .bind(name)
    .bind(seq_to_sql(now_ms)?)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets `device` and everything it acknowledged; returns whether it was paired.
pub async fn remove_peer(
    conn: &mut SqliteConnection,
    device: DeviceId,
) -> Result<bool, StoreError> {
    reset_peer_acks(conn, device).await?;
    let removed = sqlx::query("DELETE FROM sync_peers WHERE device = ?1")
        .bind(device.as_bytes().as_slice())
        .execute(conn)
        .await?
        .rows_affected();
    Ok(removed > 0)
}

/// All paired devices, in device order.
pub async fn peers(conn: &mut SqliteConnection) -> Result<Vec<PeerRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT device, name, epoch, paired_at, last_seen, needs_resync FROM sync_peers ORDER BY device",
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(PeerRecord {
                device: DeviceId(read_uuid(row, 0)?),
                name: row.try_get(1)?,
                // Epochs are random u64s stored bit for bit in SQLite's signed integers.
                epoch: row.try_get::<Option<i64>, _>(2)?.map(|epoch| Epoch(epoch.cast_unsigned())),
                paired_at: seq_from_sql(row.try_get(3)?)?,
                last_seen: row.try_get::<Option<i64>, _>(4)?.map(seq_from_sql).transpose()?,
                needs_resync: Resync::from_sql(row.try_get(5)?) != Resync::None,
            })
        })
        .collect()
}

/// Records the epoch `peer` announced. If it changed, forgets the peer's acks (they described a
/// copy that no longer exists) before remembering the new epoch.
pub async fn note_epoch(
    conn: &mut SqliteConnection,
    peer: DeviceId,
    announced: Epoch,
) -> Result<EpochCheck, StoreError> {
    let remembered: Option<Option<i64>> =
        sqlx::query_scalar("SELECT epoch FROM sync_peers WHERE device = ?1")
            .bind(peer.as_bytes().as_slice())
            .fetch_optional(&mut *conn)
            .await?;
    let Some(remembered) = remembered else {
        return Err(StoreError::Corrupt(format!("epoch announced by unpaired device {peer}")));
    };
    let check = check_epoch(remembered.map(|epoch| Epoch(epoch.cast_unsigned())), announced);
    if let EpochCheck::Changed { .. } = check {
        reset_peer_acks(conn, peer).await?;
        // A new copy (re-created, or restored and detected). What it announced before (`seen`)
        // is kept and told back to it: the peer it backfilled or resynced from may have heard
        // less of its old copy than this device, and only this tells it to resync from here
        // (the simulator found a restored copy that resynced from a peer which had been away
        // lose, for good, the rows it had written since the backup).
    }
    if check != EpochCheck::Same {
        sqlx::query("UPDATE sync_peers SET epoch = ?2 WHERE device = ?1")
            .bind(peer.as_bytes().as_slice())
            .bind(announced.0.cast_signed())
            .execute(conn)
            .await?;
    }
    Ok(check)
}

/// Marks whether `peer` was left behind by this device's retention cap ([`crate::Resync`]).
pub async fn set_needs_resync(
    conn: &mut SqliteConnection,
    peer: DeviceId,
    needs_resync: bool,
) -> Result<(), StoreError> {
    let state = if needs_resync { Resync::Required } else { Resync::None };
    sqlx::query("UPDATE sync_peers SET needs_resync = ?2 WHERE device = ?1")
        .bind(peer.as_bytes().as_slice())
        .bind(state.to_sql())
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that `peer` was seen at `now_ms`.
pub async fn touch_peer(
    conn: &mut SqliteConnection,
    peer: DeviceId,
    now_ms: u64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE sync_peers SET last_seen = max(coalesce(last_seen, 0), ?2) WHERE device = ?1",
    )
    .bind(peer.as_bytes().as_slice())
    .bind(seq_to_sql(now_ms)?)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records what `peer` acknowledged; acks never move backwards.
pub async fn record_acks(
    conn: &mut SqliteConnection,
    peer: DeviceId,
    shared: &[OriginSeq],
    state: &[StateMark],
) -> Result<(), StoreError> {
    for chunk in shared.chunks(rows_per_statement(3)) {
        let sql = format!(
            "INSERT INTO sync_peer_acks_shared (peer, origin, seq) VALUES {}
             ON CONFLICT (peer, origin) DO UPDATE SET seq = max(seq, excluded.seq)",
            value_rows(chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for entry in chunk {
            query = query
                .bind(peer.as_bytes().as_slice())
                .bind(entry.origin.as_bytes().as_slice())
                .bind(seq_to_sql(entry.seq)?);
        }
        query.execute(&mut *conn).await?;
    }
    for chunk in state.chunks(rows_per_statement(4)) {
        let sql = format!(
            "INSERT INTO sync_peer_acks_state (peer, owner, model, version) VALUES {}
             ON CONFLICT (peer, owner, model) DO UPDATE SET version = max(version, excluded.version)",
            value_rows(chunk.len(), 4)
        );
        let mut query = sqlx::query(&sql);
        for mark in chunk {
            query = query
                .bind(peer.as_bytes().as_slice())
                .bind(mark.owner.as_bytes().as_slice())
                .bind(mark.model.as_str())
                .bind(time_to_sql(mark.version)?);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// What every peer acknowledged of shared changes.
pub async fn load_shared_acks(
    conn: &mut SqliteConnection,
) -> Result<BTreeMap<DeviceId, SharedProgress>, StoreError> {
    let mut acks: BTreeMap<DeviceId, SharedProgress> = BTreeMap::new();
    for row in
        sqlx::query("SELECT peer, origin, seq FROM sync_peer_acks_shared").fetch_all(conn).await?
    {
        acks.entry(DeviceId(read_uuid(&row, 0)?))
            .or_default()
            .raise(DeviceId(read_uuid(&row, 1)?), seq_from_sql(row.try_get(2)?)?);
    }
    Ok(acks)
}

/// What every peer acknowledged of device-owned rows.
pub async fn load_state_acks(
    conn: &mut SqliteConnection,
) -> Result<BTreeMap<DeviceId, StateProgress>, StoreError> {
    let mut acks: BTreeMap<DeviceId, StateProgress> = BTreeMap::new();
    for row in sqlx::query("SELECT peer, owner, model, version FROM sync_peer_acks_state")
        .fetch_all(conn)
        .await?
    {
        let model: String = row.try_get(2)?;
        acks.entry(DeviceId(read_uuid(&row, 0)?)).or_default().raise(
            DeviceId(read_uuid(&row, 1)?),
            &model,
            time_from_sql(row.try_get(3)?)?,
        );
    }
    Ok(acks)
}

async fn reset_peer_acks(conn: &mut SqliteConnection, peer: DeviceId) -> Result<(), StoreError> {
    for table in ["sync_peer_acks_shared", "sync_peer_acks_state"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE peer = ?1"))
            .bind(peer.as_bytes().as_slice())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

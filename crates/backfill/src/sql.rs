//! The checkpoint's home: one row of `sync_meta` (`backfill`), written inside the caller's
//! transaction so a page and the checkpoint that records it commit together.

use lsync_store::{SqliteConnection, StoreError};

use crate::Checkpoint;

const KEY: &str = "backfill";

/// The stored checkpoint; `None` if this copy never stored one (a copy created before backfill
/// existed, which is complete: it was the only kind of copy).
pub async fn load(conn: &mut SqliteConnection) -> Result<Option<Checkpoint>, StoreError> {
    let value: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM sync_meta WHERE key = ?1")
        .bind(KEY)
        .fetch_optional(&mut *conn)
        .await?;
    value
        .map(|bytes| {
            rmp_serde::from_slice(&bytes)
                .map_err(|error| StoreError::Corrupt(format!("backfill checkpoint: {error}")))
        })
        .transpose()
}

/// Stores `checkpoint`, replacing the previous one.
pub async fn store(conn: &mut SqliteConnection, checkpoint: &Checkpoint) -> Result<(), StoreError> {
    let bytes = rmp_serde::to_vec(checkpoint)
        .map_err(|error| StoreError::Corrupt(format!("backfill checkpoint: {error}")))?;
    sqlx::query(
        "INSERT INTO sync_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(KEY)
    .bind(bytes)
    .execute(conn)
    .await?;
    Ok(())
}

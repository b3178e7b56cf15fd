//! The library database on real SQLite files.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]

use std::sync::Arc;

use lsync_hlc::{DeviceId, Hlc, HlcTime};
use lsync_protocol::LibraryId;
use lsync_store::*;
use sqlx::Row;
use uuid::Uuid;

fn registry() -> Arc<Registry> {
    Arc::new(reference_registry().unwrap())
}

async fn create(dir: &tempfile::TempDir) -> Database {
    Database::create(
        &dir.path().join("library.db"),
        registry(),
        LibraryId(Uuid::from_bytes([1; 16])),
        DeviceId::from_bytes([2; 16]),
        &StoreOptions::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn identity_survives_reopen_and_creation_refuses_an_existing_library() {
    let dir = tempfile::tempdir().unwrap();
    let db = create(&dir).await;
    let identity = db.identity();
    assert_eq!(identity.device, DeviceId::from_bytes([2; 16]));
    db.close().await.unwrap();

    let path = dir.path().join("library.db");
    let reopened = Database::open(&path, registry(), &StoreOptions::default()).await.unwrap();
    let again = reopened.identity();
    assert_eq!(
        (again.library, again.device, again.epoch),
        (identity.library, identity.device, identity.epoch)
    );
    assert_ne!(again.origin, identity.origin, "every open is a new incarnation");
    assert_ne!(again.origin, again.device);
    reopened.close().await.unwrap();

    let again = Database::create(
        &path,
        registry(),
        identity.library,
        identity.device,
        &StoreOptions::default(),
    )
    .await;
    assert!(matches!(again, Err(StoreError::AlreadyExists(_))));
}

#[tokio::test]
async fn a_recreated_copy_gets_a_new_epoch() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (create(&first).await, create(&second).await);
    assert_eq!(a.identity().device, b.identity().device);
    assert_ne!(a.identity().epoch, b.identity().epoch);
}

#[tokio::test]
async fn opening_a_missing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let result =
        Database::open(&dir.path().join("nope.db"), registry(), &StoreOptions::default()).await;
    assert!(matches!(result, Err(StoreError::NotFound(_))));
}

#[tokio::test]
async fn the_file_is_in_wal_mode_and_bookkeeping_tables_are_prefixed() {
    let dir = tempfile::tempdir().unwrap();
    let db = create(&dir).await;
    let mode: String =
        sqlx::query_scalar("PRAGMA journal_mode").fetch_one(db.reader()).await.unwrap();
    assert_eq!(mode, "wal");
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(db.reader())
            .await
            .unwrap();
    let models: Vec<String> = reference_models().into_iter().map(|model| model.name).collect();
    for table in tables {
        assert!(table.starts_with("sync_") || models.contains(&table), "unexpected table {table}");
    }
}

#[tokio::test]
async fn a_table_that_differs_from_the_registry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = create(&dir).await;
    db.close().await.unwrap();
    let mut models = reference_models();
    let tags = models.iter_mut().find(|model| model.name == "tags").unwrap();
    tags.columns.push(Column::nullable("icon", ColumnType::Text));
    let changed = Arc::new(Registry::new(models).unwrap());
    let result =
        Database::open(&dir.path().join("library.db"), changed, &StoreOptions::default()).await;
    let Err(StoreError::SchemaMismatch { table, .. }) = result else {
        panic!("opened: {result:?}")
    };
    assert_eq!(table, "tags");
}

#[tokio::test]
async fn the_persisted_clock_only_grows_and_failed_writes_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = create(&dir).await;
    let device = db.identity().device;
    let stamp = |ms| Hlc::new(HlcTime::new(ms, 0).unwrap(), device);
    db.write(async |conn| store_clock(conn, stamp(200)).await).await.unwrap();
    db.write(async |conn| store_clock(conn, stamp(100)).await).await.unwrap();
    let result: Result<(), StoreError> = db
        .write(async |conn| {
            store_clock(conn, stamp(300)).await?;
            Err(StoreError::Corrupt("abandon".into()))
        })
        .await;
    assert!(result.is_err());
    let loaded = db.write(async |conn| load_clock(conn).await).await.unwrap();
    assert_eq!(loaded, Some(stamp(200)));
}

#[tokio::test]
async fn device_owned_tables_carry_owner_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let db = create(&dir).await;
    let columns: Vec<String> = sqlx::query("PRAGMA table_info(entries)")
        .fetch_all(db.reader())
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<String, _>("name"))
        .collect();
    assert_eq!(
        columns,
        [
            "id",
            "owner",
            "version",
            "location_id",
            "parent_id",
            "name",
            "kind",
            "size",
            "modified_at"
        ]
    );
}

//! Reading back every synced table, for convergence checks: two converged devices return equal
//! dumps.

use std::collections::BTreeMap;

use lsync_protocol::Value;
use sqlx::SqlitePool;

use crate::sql::{ident, read_value};
use crate::{ColumnType, Ownership, Registry, StoreError};

/// Every row of every model's table, in primary-key order, all columns (system columns first),
/// keyed by table name.
pub async fn dump_tables(
    pool: &SqlitePool,
    registry: &Registry,
) -> Result<BTreeMap<String, Vec<Vec<Value>>>, StoreError> {
    let mut tables = BTreeMap::new();
    for model in registry.in_apply_order() {
        let mut types = vec![ColumnType::Uuid];
        let mut names = vec!["id".to_owned()];
        if model.ownership == Ownership::DeviceOwned {
            types.extend([ColumnType::Uuid, ColumnType::Integer]);
            names.extend(["owner".to_owned(), "version".to_owned()]);
        }
        types.extend(model.columns.iter().map(|column| column.ty));
        names.extend(model.columns.iter().map(|column| ident(&column.name)));
        let sql = format!("SELECT {} FROM {} ORDER BY id", names.join(", "), ident(&model.name));
        let rows = sqlx::query(&sql).fetch_all(pool).await?;
        let rows = rows
            .iter()
            .map(|row| {
                types
                    .iter()
                    .enumerate()
                    .map(|(index, ty)| read_value(row, index, *ty))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        tables.insert(model.name.clone(), rows);
    }
    Ok(tables)
}

//! Small helpers every SQL shell uses: converting lsync's integers and values to and from SQLite,
//! and sizing multi-row statements.

use lsync_hlc::HlcTime;
use lsync_protocol::Value;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Row, Sqlite};

use crate::{ColumnType, StoreError};

/// A query with positional arguments.
pub type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// SQLite's limit on bound parameters per statement (`SQLITE_MAX_VARIABLE_NUMBER`, 32766 in the
/// bundled SQLite since 3.32).
pub const MAX_VARIABLES: usize = 32_766;

/// The most rows one multi-row statement carries. Measured on these machines (shared/
/// measurements.md): sqlx costs about 140 µs per statement, and 500-row statements already match
/// rusqlite's per-row speed; larger ones gain little and hold more memory.
pub const MAX_ROWS_PER_STATEMENT: usize = 500;

/// How many rows of `params_per_row` parameters fit one statement.
pub fn rows_per_statement(params_per_row: usize) -> usize {
    (MAX_VARIABLES / params_per_row.max(1)).clamp(1, MAX_ROWS_PER_STATEMENT)
}

/// `?, ?, …`: `n` parameters for an `IN (…)` list.
pub fn in_list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `(?, ?, …)` for one row of `n` parameters, repeated `rows` times, comma-separated: the
/// `VALUES` of a multi-row statement.
pub fn value_rows(rows: usize, n: usize) -> String {
    let one = format!("({})", vec!["?"; n].join(", "));
    vec![one; rows].join(", ")
}

/// An HLC time as stored: the packed integer as i64. Times from the year 6429 on do not fit.
pub fn time_to_sql(time: HlcTime) -> Result<i64, StoreError> {
    i64::try_from(time.as_u64()).map_err(|_| StoreError::OutOfRange(format!("HLC time {time:?}")))
}

/// An HLC time read back.
pub fn time_from_sql(value: i64) -> Result<HlcTime, StoreError> {
    u64::try_from(value)
        .map(HlcTime::from_u64)
        .map_err(|_| StoreError::Corrupt(format!("negative HLC time {value}")))
}

/// A sequence number as stored.
pub fn seq_to_sql(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::OutOfRange(format!("sequence number {seq}")))
}

/// A sequence number read back.
pub fn seq_from_sql(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("negative sequence number {value}")))
}

/// Binds a value as its SQLite storage class.
pub fn bind_value<'q>(query: Query<'q>, value: &'q Value) -> Query<'q> {
    match value {
        Value::Null => query.bind(None::<i64>),
        Value::Integer(value) => query.bind(*value),
        Value::Real(value) => query.bind(*value),
        Value::Text(value) => query.bind(value.as_str()),
        Value::Blob(value) => query.bind(value.as_slice()),
    }
}

/// Reads column `index` of `row` as a value of type `ty`.
pub fn read_value(row: &SqliteRow, index: usize, ty: ColumnType) -> Result<Value, sqlx::Error> {
    Ok(match ty {
        ColumnType::Integer => row.try_get::<Option<i64>, _>(index)?.into(),
        ColumnType::Real => row.try_get::<Option<f64>, _>(index)?.into(),
        ColumnType::Text => row.try_get::<Option<String>, _>(index)?.into(),
        ColumnType::Blob | ColumnType::Uuid => row.try_get::<Option<Vec<u8>>, _>(index)?.into(),
    })
}

/// A double-quoted SQL identifier. Names are validated by the registry (`[a-z][a-z0-9_]*`), so
/// quoting is for keywords, not for escaping.
pub fn ident(name: &str) -> String {
    format!("\"{name}\"")
}

/// Reads a 16-byte UUID column.
pub fn read_uuid(row: &SqliteRow, index: usize) -> Result<uuid::Uuid, StoreError> {
    let bytes: Vec<u8> = row.try_get(index)?;
    uuid::Uuid::from_slice(&bytes)
        .map_err(|_| StoreError::Corrupt(format!("{} byte id", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_stay_within_sqlite_parameter_limit() {
        assert_eq!(rows_per_statement(9), MAX_ROWS_PER_STATEMENT);
        assert_eq!(rows_per_statement(200), MAX_VARIABLES / 200);
        assert_eq!(rows_per_statement(0), MAX_ROWS_PER_STATEMENT);
        assert_eq!(value_rows(2, 3), "(?, ?, ?), (?, ?, ?)");
        assert_eq!(in_list(3), "?, ?, ?");
    }

    #[test]
    fn times_beyond_i64_are_refused() {
        assert_eq!(time_to_sql(HlcTime::from_u64(5)).unwrap(), 5);
        assert!(time_to_sql(HlcTime::MAX).is_err());
        assert!(time_from_sql(-1).is_err());
    }
}

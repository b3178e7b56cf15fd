//! Shared data: records any device may write (tags, albums, metadata, set memberships), merged
//! so that every device converges on the same tables whatever order changes arrive in.
//!
//! # Model
//! - Each record's state is a set of last-writer-wins registers keyed by HLC stamp: one per field
//!   and one for existence ([`RecordState`]; the rules are on that type). Concurrent edits of
//!   different fields both survive; concurrent edits of one field resolve by stamp, then device
//!   id; a delete and a concurrent edit resolve by stamp (the later one wins).
//! - Set memberships (a tag on an entry, an entry in an album) are records whose id is derived from
//!   the pair, added by insert and removed by delete: a last-writer-wins element set.
//! - The registers live in `sync_shared_state`, so merges stay correct after the peer log is
//!   pruned, and a backfill can ship them as snapshots ([`sql::snapshot_page`],
//!   [`sql::apply_snapshot`]).
//! - The shared tables are a projection of the registers: a record is shown when it exists, has
//!   every NOT NULL field, and every row it references is present. A record whose referenced row
//!   has not arrived yet is *parked* (durably, in `sync_parked`) and shown when the row arrives; a
//!   record whose referenced row was deleted is hidden as an orphan.
//!
//! # Invariants
//! - Applying changes is a pure function of (stored registers, incoming change): idempotent,
//!   commutative and associative. Replicas that received the same changes hold the same
//!   registers and therefore byte-identical shared tables (property-tested in `tests/`).
//! - A local write and its log entry, watermark and clock resume point commit in one transaction
//!   ([`sql::write_local`]).
//! - Every fresh change from a peer is logged, even one that fails validation (it is reported, not
//!   applied), so its origin's watermark never stalls on it.
//!
//! # Where the IO is
//! [`RecordState`], [`compare_values`] and [`validate_change`] are pure. The [`sql`] module does the
//! reading and writing, always inside the caller's transaction.

mod merge;
pub mod sql;

pub use merge::{RecordState, compare_values, local_stamp_time};

use lsync_hlc::HlcError;
use lsync_protocol::{SharedChange, SharedOp};
use lsync_store::{MergeStrategy, Ownership, Registry, StoreError};
use uuid::Uuid;

/// What can go wrong writing shared data locally.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The clock refused to stamp (it reached its maximum).
    #[error(transparent)]
    Clock(#[from] HlcError),
    /// The edit breaks the model's declaration.
    #[error("invalid edit: {0}")]
    Invalid(String),
    /// An insert of a record that exists.
    #[error("{model} {id} already exists")]
    AlreadyExists {
        /// The model.
        model: String,
        /// The record.
        id: Uuid,
    },
    /// Receiving a batch would leave more records waiting for a referenced row than allowed.
    #[error(
        "{parked} shared records would wait for rows that have not arrived, more than the limit of {max}"
    )]
    ParkedOverflow {
        /// Records that would be parked.
        parked: u64,
        /// The limit.
        max: u64,
    },
    /// An update or delete of a record that does not exist.
    #[error("{model} {id} does not exist")]
    NotFound {
        /// The model.
        model: String,
        /// The record.
        id: Uuid,
    },
}

/// Checks a change against the registry: a known shared model, declared fields with values of the
/// right type, NOT NULL fields never set to NULL, and for memberships an id derived from the pair
/// and members that never change.
pub fn validate_change(registry: &Registry, change: &SharedChange) -> Result<(), String> {
    let model =
        registry.model(&change.model).ok_or_else(|| format!("unknown model {}", change.model))?;
    if model.ownership != Ownership::Shared {
        return Err(format!("{} is device-owned, not shared", model.name));
    }
    if let Some(fields) = change.op.fields() {
        for (name, value) in fields {
            let column =
                model.column(name).ok_or_else(|| format!("{} has no column {name}", model.name))?;
            model.check_value(column, value)?;
        }
    }
    if let MergeStrategy::Membership { left, right } = &model.merge {
        match &change.op {
            SharedOp::Insert(fields) => {
                let member = |name: &str| match fields.get(name) {
                    Some(lsync_protocol::Value::Blob(bytes)) => Uuid::from_slice(bytes).ok(),
                    _ => None,
                };
                let (Some(left_id), Some(right_id)) = (member(left), member(right)) else {
                    return Err(format!("{} insert needs both {left} and {right}", model.name));
                };
                if Registry::membership_id(&model.name, left_id, right_id) != change.record {
                    return Err(format!(
                        "{} id {} is not derived from its pair",
                        model.name, change.record
                    ));
                }
            }
            SharedOp::Update(fields) => {
                if fields.contains_key(left) || fields.contains_key(right) {
                    return Err(format!("the members of a {} record never change", model.name));
                }
            }
            SharedOp::Delete => {}
        }
    }
    Ok(())
}

//! The model registry: the synced tables an app declares, validated once, from which lsync derives
//! the SQL schema, the apply order and the merge strategy of every table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use lsync_protocol::{MAX_COLUMNS, MAX_NAME_BYTES, Value};
use uuid::Uuid;

/// Who may write a model's rows, which decides how they replicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ownership {
    /// Only the owning device writes a row; replicated state-based (newest owner version wins).
    DeviceOwned,
    /// Any device writes; replicated through the peer log and merged.
    Shared,
}

/// How a model's concurrent writes merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeStrategy {
    /// Device-owned: the row with the newest owner version wins; deletes are versioned tombstones.
    OwnerVersion,
    /// Shared records: every field is its own last-writer-wins register keyed by HLC stamp (ties
    /// broken by device id), and so is the record's existence.
    FieldLww,
    /// Shared set membership (e.g. a tag assigned to an entry): the record is the pair
    /// (`left`, `right`), its id derived from the pair ([`Registry::membership_id`]), added and
    /// removed with HLC-stamped operations (a last-writer-wins element set).
    Membership {
        /// The first member column (e.g. `tag_id`).
        left: String,
        /// The second member column (e.g. `entry_id`).
        right: String,
    },
}

/// A column's SQLite storage class, checked on every write and every received value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// 64-bit integer.
    Integer,
    /// 64-bit float.
    Real,
    /// UTF-8 text.
    Text,
    /// Bytes.
    Blob,
    /// A UUID: a 16-byte blob. Columns that reference other rows have this type.
    Uuid,
}

impl ColumnType {
    fn sql(self) -> &'static str {
        match self {
            ColumnType::Integer => "INTEGER",
            ColumnType::Real => "REAL",
            ColumnType::Text => "TEXT",
            ColumnType::Blob | ColumnType::Uuid => "BLOB",
        }
    }

    /// Whether `value` may be stored in a column of this type (NULL is checked separately).
    pub fn admits(self, value: &Value) -> bool {
        match (self, value) {
            (_, Value::Null) => true,
            (ColumnType::Integer, Value::Integer(_)) => true,
            (ColumnType::Real, Value::Real(_) | Value::Integer(_)) => true,
            (ColumnType::Text, Value::Text(_)) => true,
            (ColumnType::Blob, Value::Blob(_)) => true,
            (ColumnType::Uuid, Value::Blob(bytes)) => bytes.len() == 16,
            _ => false,
        }
    }
}

/// One declared column. Every synced table also has the system columns lsync adds itself: `id`
/// (the UUID primary key) and, for device-owned tables, `owner` and `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column name: `[a-z][a-z0-9_]*`, at most 64 bytes.
    pub name: String,
    /// Its storage class.
    pub ty: ColumnType,
    /// Whether it may hold NULL.
    pub nullable: bool,
    /// The model this column references by UUID, if any.
    pub references: Option<String>,
}

impl Column {
    /// A NOT NULL column.
    pub fn new(name: &str, ty: ColumnType) -> Self {
        Self { name: name.to_owned(), ty, nullable: false, references: None }
    }

    /// A nullable column.
    pub fn nullable(name: &str, ty: ColumnType) -> Self {
        Self { name: name.to_owned(), ty, nullable: true, references: None }
    }

    /// A NOT NULL reference to a row of `model`.
    pub fn reference(name: &str, model: &str) -> Self {
        Self {
            name: name.to_owned(),
            ty: ColumnType::Uuid,
            nullable: false,
            references: Some(model.to_owned()),
        }
    }

    /// A nullable reference to a row of `model` (e.g. the parent of a root entry).
    pub fn nullable_reference(name: &str, model: &str) -> Self {
        Self { nullable: true, ..Self::reference(name, model) }
    }
}

/// The declaration of one synced table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDef {
    /// The table name.
    pub name: String,
    /// Who writes it.
    pub ownership: Ownership,
    /// How concurrent writes merge.
    pub merge: MergeStrategy,
    /// The declared columns, in table order (system columns excluded).
    pub columns: Vec<Column>,
    /// For a tree (e.g. a file tree): the column referencing the parent row of the same model.
    /// A subtree is deleted with one tombstone on its root.
    pub tree_parent: Option<String>,
}

impl ModelDef {
    /// A device-owned model.
    pub fn device_owned(name: &str, columns: Vec<Column>) -> Self {
        Self {
            name: name.to_owned(),
            ownership: Ownership::DeviceOwned,
            merge: MergeStrategy::OwnerVersion,
            columns,
            tree_parent: None,
        }
    }

    /// A device-owned tree whose `parent` column references the same model.
    pub fn device_owned_tree(name: &str, parent: &str, columns: Vec<Column>) -> Self {
        Self { tree_parent: Some(parent.to_owned()), ..Self::device_owned(name, columns) }
    }

    /// A shared model of records merged field by field.
    pub fn shared(name: &str, columns: Vec<Column>) -> Self {
        Self {
            name: name.to_owned(),
            ownership: Ownership::Shared,
            merge: MergeStrategy::FieldLww,
            columns,
            tree_parent: None,
        }
    }

    /// A shared set membership relation between two referenced models.
    pub fn membership(name: &str, left: Column, right: Column, extra: Vec<Column>) -> Self {
        let merge =
            MergeStrategy::Membership { left: left.name.clone(), right: right.name.clone() };
        let mut columns = vec![left, right];
        columns.extend(extra);
        Self {
            name: name.to_owned(),
            ownership: Ownership::Shared,
            merge,
            columns,
            tree_parent: None,
        }
    }

    /// The declared column called `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|column| column.name == name)
    }

    /// The position of the declared column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|column| column.name == name)
    }

    /// The declared column names, in table order.
    pub fn column_names(&self) -> Vec<String> {
        self.columns.iter().map(|column| column.name.clone()).collect()
    }

    /// Checks values for this model's columns (in table order): count, types, NOT NULL.
    pub fn check_values(&self, values: &[Value]) -> Result<(), String> {
        if values.len() != self.columns.len() {
            return Err(format!(
                "{} takes {} values, got {}",
                self.name,
                self.columns.len(),
                values.len()
            ));
        }
        for (column, value) in self.columns.iter().zip(values) {
            self.check_value(column, value)?;
        }
        Ok(())
    }

    /// Checks one value for `column`.
    pub fn check_value(&self, column: &Column, value: &Value) -> Result<(), String> {
        if matches!(value, Value::Null) && !column.nullable {
            return Err(format!("{}.{} may not be NULL", self.name, column.name));
        }
        if !column.ty.admits(value) {
            return Err(format!("{}.{} is {:?}, got {value:?}", self.name, column.name, column.ty));
        }
        Ok(())
    }
}

/// Why a set of model declarations was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// A model or column name is not `[a-z][a-z0-9_]*` of at most 64 bytes, or is reserved.
    #[error("bad name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two models, or two columns of one model, share a name.
    #[error("{0:?} is declared twice")]
    Duplicate(String),
    /// A reference names a model that is not declared.
    #[error("{model}.{column} references unknown model {target:?}")]
    UnknownReference {
        /// The referencing model.
        model: String,
        /// The referencing column.
        column: String,
        /// The missing model.
        target: String,
    },
    /// The references between models form a cycle (other than a tree's parent column).
    #[error("references form a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// A model's declaration contradicts itself.
    #[error("model {model}: {reason}")]
    Inconsistent {
        /// The model.
        model: String,
        /// What contradicts.
        reason: String,
    },
}

/// Column names lsync adds to every table itself.
const SYSTEM_COLUMNS: [&str; 3] = ["id", "owner", "version"];

/// A validated set of models with the order in which to apply them (referenced models first).
#[derive(Debug, Clone)]
pub struct Registry {
    models: BTreeMap<String, ModelDef>,
    apply_order: Vec<String>,
}

impl Registry {
    /// Validates the declarations: names, duplicate names, references to declared models, merge
    /// strategies that fit their ownership, and no reference cycles (a tree's parent column, which
    /// references its own model, is the one allowed self-reference).
    pub fn new(models: Vec<ModelDef>) -> Result<Self, SchemaError> {
        let mut by_name = BTreeMap::new();
        for model in models {
            check_name(&model.name)?;
            if model.name.starts_with("sync_") {
                return Err(SchemaError::BadName {
                    name: model.name,
                    reason: "the sync_ prefix is reserved for lsync's bookkeeping",
                });
            }
            check_model(&model)?;
            if by_name.contains_key(&model.name) {
                return Err(SchemaError::Duplicate(model.name));
            }
            by_name.insert(model.name.clone(), model);
        }
        for model in by_name.values() {
            for column in &model.columns {
                if let Some(target) = &column.references
                    && !by_name.contains_key(target)
                {
                    return Err(SchemaError::UnknownReference {
                        model: model.name.clone(),
                        column: column.name.clone(),
                        target: target.clone(),
                    });
                }
            }
        }
        let apply_order = topological_order(&by_name)?;
        Ok(Self { models: by_name, apply_order })
    }

    /// The model called `name`.
    pub fn model(&self, name: &str) -> Option<&ModelDef> {
        self.models.get(name)
    }

    /// All models, referenced models before the models that reference them.
    pub fn in_apply_order(&self) -> impl Iterator<Item = &ModelDef> {
        self.apply_order.iter().filter_map(|name| self.models.get(name))
    }

    /// Models that reference `target` (excluding a tree's reference to itself), with the column.
    pub fn referencing(&self, target: &str) -> impl Iterator<Item = (&ModelDef, &Column)> {
        self.models.values().flat_map(move |model| {
            model
                .columns
                .iter()
                .filter(move |column| {
                    column.references.as_deref() == Some(target)
                        && model.tree_parent.as_deref() != Some(column.name.as_str())
                })
                .map(move |column| (model, column))
        })
    }

    /// The record id of the pair (`left`, `right`) in membership model `model`: every device derives
    /// the same id for the same pair, so adding a pair twice concurrently merges into one record.
    pub fn membership_id(model: &str, left: Uuid, right: Uuid) -> Uuid {
        Self::derived_id(model, &[left.as_bytes(), right.as_bytes()])
    }

    /// A record id derived from its natural key (a UUIDv5 over the model name and the key parts,
    /// each length-prefixed so that different splits of the same bytes differ). Used where two
    /// devices creating "the same" record concurrently must create one record, such as a metadata
    /// key on an entry.
    pub fn derived_id(model: &str, parts: &[&[u8]]) -> Uuid {
        let mut name = Vec::with_capacity(
            model.len() + 1 + parts.iter().map(|part| part.len() + 8).sum::<usize>(),
        );
        name.extend_from_slice(model.as_bytes());
        name.push(0);
        for part in parts {
            name.extend_from_slice(&(part.len() as u64).to_be_bytes());
            name.extend_from_slice(part);
        }
        Uuid::new_v5(&DERIVED_ID_NAMESPACE, &name)
    }

    /// The SQL that creates every model's table and indexes (idempotent).
    pub fn ddl(&self) -> String {
        let mut sql = String::new();
        for model in self.in_apply_order() {
            let _ = write!(
                sql,
                "CREATE TABLE IF NOT EXISTS \"{}\" (id BLOB PRIMARY KEY NOT NULL",
                model.name
            );
            if model.ownership == Ownership::DeviceOwned {
                sql.push_str(", owner BLOB NOT NULL, version INTEGER NOT NULL");
            }
            for column in &model.columns {
                let _ = write!(sql, ", \"{}\" {}", column.name, column.ty.sql());
                if !column.nullable {
                    sql.push_str(" NOT NULL");
                }
            }
            // WITHOUT ROWID: rows live in the primary-key B-tree, so key-ordered bulk inserts append
            // to it and there is no second B-tree for a rowid.
            sql.push_str(") WITHOUT ROWID;\n");
            if model.ownership == Ownership::DeviceOwned {
                // Catch-up serves an owner's rows in version order.
                let _ = writeln!(
                    sql,
                    "CREATE INDEX IF NOT EXISTS \"{0}_owner_version\" ON \"{0}\" (owner, version);",
                    model.name
                );
            }
            if let Some(parent) = &model.tree_parent {
                // Subtree deletes walk children by parent.
                let _ = writeln!(
                    sql,
                    "CREATE INDEX IF NOT EXISTS \"{0}_{1}\" ON \"{0}\" (\"{1}\");",
                    model.name, parent
                );
            }
        }
        sql
    }
}

/// Namespace of derived record ids (a fixed random UUID; changing it changes every derived id).
const DERIVED_ID_NAMESPACE: Uuid = Uuid::from_bytes([
    0x6c, 0x73, 0x79, 0x6e, 0x63, 0x2d, 0x4d, 0x9a, 0x8e, 0x1f, 0x3b, 0x52, 0x0d, 0xc4, 0x77, 0x21,
]);

fn check_name(name: &str) -> Result<(), SchemaError> {
    let bad = |reason| Err(SchemaError::BadName { name: name.to_owned(), reason });
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return bad("must be 1 to 64 bytes");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return bad("must start with a lowercase letter");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return bad("may contain only a-z, 0-9 and _");
    }
    Ok(())
}

fn check_model(model: &ModelDef) -> Result<(), SchemaError> {
    let inconsistent =
        |reason: String| Err(SchemaError::Inconsistent { model: model.name.clone(), reason });
    if model.columns.len() + SYSTEM_COLUMNS.len() > MAX_COLUMNS {
        return inconsistent(format!("more than {} columns", MAX_COLUMNS - SYSTEM_COLUMNS.len()));
    }
    let mut seen = BTreeSet::new();
    for column in &model.columns {
        check_name(&column.name)?;
        if SYSTEM_COLUMNS.contains(&column.name.as_str()) {
            return Err(SchemaError::BadName {
                name: column.name.clone(),
                reason: "id, owner and version are lsync's system columns",
            });
        }
        if !seen.insert(column.name.as_str()) {
            return Err(SchemaError::Duplicate(format!("{}.{}", model.name, column.name)));
        }
        if column.references.is_some() && column.ty != ColumnType::Uuid {
            return inconsistent(format!("reference column {} must have type Uuid", column.name));
        }
    }
    match (&model.ownership, &model.merge) {
        (Ownership::DeviceOwned, MergeStrategy::OwnerVersion) => {}
        (Ownership::Shared, MergeStrategy::FieldLww) => {}
        (Ownership::Shared, MergeStrategy::Membership { left, right }) => {
            for member in [left, right] {
                let Some(column) = model.column(member) else {
                    return inconsistent(format!("membership column {member} is not declared"));
                };
                if column.references.is_none() || column.nullable {
                    return inconsistent(format!(
                        "membership column {member} must be a NOT NULL reference"
                    ));
                }
            }
            if left == right {
                return inconsistent("membership needs two different columns".into());
            }
        }
        (ownership, merge) => {
            return inconsistent(format!("{merge:?} does not fit {ownership:?} data"));
        }
    }
    if let Some(parent) = &model.tree_parent {
        match model.column(parent) {
            Some(column) if column.references.as_deref() == Some(model.name.as_str()) => {}
            _ => {
                return inconsistent(format!(
                    "tree parent column {parent} must be a reference to {} itself",
                    model.name
                ));
            }
        }
        if model.ownership != Ownership::DeviceOwned {
            return inconsistent("only device-owned models can be trees".into());
        }
    }
    Ok(())
}

/// Orders models so that every referenced model comes before the models referencing it.
fn topological_order(models: &BTreeMap<String, ModelDef>) -> Result<Vec<String>, SchemaError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        models: &BTreeMap<String, ModelDef>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), SchemaError> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = path.iter().position(|step| step == name).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(name.to_owned());
                return Err(SchemaError::Cycle(cycle));
            }
            None => {}
        }
        marks.insert(name.to_owned(), Mark::Visiting);
        path.push(name.to_owned());
        if let Some(model) = models.get(name) {
            for column in &model.columns {
                let Some(target) = &column.references else {
                    continue;
                };
                let is_tree_parent = model.tree_parent.as_deref() == Some(column.name.as_str());
                if target == name && is_tree_parent {
                    continue;
                }
                visit(target, models, marks, path, order)?;
            }
        }
        path.pop();
        marks.insert(name.to_owned(), Mark::Done);
        order.push(name.to_owned());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut order = Vec::with_capacity(models.len());
    for name in models.keys() {
        visit(name, models, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(registry: &Registry) -> Vec<&str> {
        registry.in_apply_order().map(|model| model.name.as_str()).collect()
    }

    #[test]
    fn apply_order_puts_referenced_models_first() {
        let registry = Registry::new(vec![
            ModelDef::shared("c", vec![Column::reference("b_id", "b")]),
            ModelDef::shared("b", vec![Column::reference("a_id", "a")]),
            ModelDef::shared("a", vec![Column::new("name", ColumnType::Text)]),
        ])
        .unwrap();
        assert_eq!(order(&registry), ["a", "b", "c"]);
    }

    #[test]
    fn cycles_are_rejected_with_the_cycle_named() {
        let error = Registry::new(vec![
            ModelDef::shared("a", vec![Column::reference("b_id", "b")]),
            ModelDef::shared("b", vec![Column::reference("a_id", "a")]),
        ])
        .unwrap_err();
        assert_eq!(error, SchemaError::Cycle(vec!["a".into(), "b".into(), "a".into()]));
        assert_eq!(error.to_string(), "references form a cycle: a -> b -> a");
    }

    #[test]
    fn a_self_reference_is_allowed_only_as_a_tree_parent() {
        let columns = vec![Column::nullable_reference("parent_id", "nodes")];
        assert!(
            Registry::new(vec![ModelDef::device_owned_tree("nodes", "parent_id", columns.clone())])
                .is_ok()
        );
        assert!(matches!(
            Registry::new(vec![ModelDef::device_owned("nodes", columns)]),
            Err(SchemaError::Cycle(_))
        ));
    }

    #[test]
    fn bad_declarations_are_refused_with_clear_errors() {
        let check = |models: Vec<ModelDef>, expected: &str| {
            let error = Registry::new(models).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} does not mention {expected:?}");
        };
        check(vec![ModelDef::shared("Tags", vec![])], "lowercase");
        check(vec![ModelDef::shared("sync_tags", vec![])], "reserved");
        check(vec![ModelDef::shared("tags", vec![Column::new("id", ColumnType::Text)])], "system");
        check(
            vec![ModelDef::shared(
                "tags",
                vec![Column::new("a", ColumnType::Text), Column::new("a", ColumnType::Text)],
            )],
            "declared twice",
        );
        check(
            vec![ModelDef::shared("tags", vec![Column::reference("x_id", "x")])],
            "unknown model",
        );
        check(
            vec![ModelDef::shared("tags", vec![]), ModelDef::shared("tags", vec![])],
            "declared twice",
        );
        check(
            vec![ModelDef {
                merge: MergeStrategy::FieldLww,
                ..ModelDef::device_owned("volumes", vec![])
            }],
            "does not fit",
        );
    }

    #[test]
    fn membership_ids_are_deterministic_and_distinguish_pairs_and_models() {
        let (a, b) = (Uuid::from_bytes([1; 16]), Uuid::from_bytes([2; 16]));
        let id = Registry::membership_id("tag_assignments", a, b);
        assert_eq!(id, Registry::membership_id("tag_assignments", a, b));
        assert_ne!(id, Registry::membership_id("tag_assignments", b, a));
        assert_ne!(id, Registry::membership_id("album_entries", a, b));
    }

    #[test]
    fn values_are_checked_against_column_types() {
        let model = ModelDef::shared(
            "t",
            vec![Column::new("n", ColumnType::Integer), Column::nullable("u", ColumnType::Uuid)],
        );
        assert!(model.check_values(&[Value::Integer(1), Value::Null]).is_ok());
        assert!(model.check_values(&[Value::Integer(1), Value::Blob(vec![0; 16])]).is_ok());
        assert!(model.check_values(&[Value::Null, Value::Null]).is_err());
        assert!(model.check_values(&[Value::Integer(1), Value::Blob(vec![0; 15])]).is_err());
        assert!(model.check_values(&[Value::Text("1".into()), Value::Null]).is_err());
        assert!(model.check_values(&[Value::Integer(1)]).is_err());
    }
}

//! The reference schema: the file-manager library that the CLI, the simulator, the benchmarks and
//! the tests use. Apps declare their own models the same way.

use crate::{Column, ColumnType, ModelDef, Registry, SchemaError};

/// `entries.kind` of a file.
pub const ENTRY_KIND_FILE: i64 = 0;
/// `entries.kind` of a directory.
pub const ENTRY_KIND_DIRECTORY: i64 = 1;

/// The reference models:
/// - device-owned: `devices` (one row per device, its id the device id), `volumes`, `locations`
///   (an indexed folder), `entries` (a file tree under a location);
/// - shared: `tags`, `albums`, `user_metadata` (a key/value pair on an entry, id derived from the
///   entry and key), and the memberships `tag_assignments` (tag, entry) and `album_entries`
///   (album, entry).
pub fn reference_models() -> Vec<ModelDef> {
    use ColumnType::{Integer, Text};
    vec![
        ModelDef::device_owned(
            "devices",
            vec![Column::new("name", Text), Column::nullable("platform", Text)],
        ),
        ModelDef::device_owned(
            "volumes",
            vec![
                Column::new("name", Text),
                Column::new("mount_point", Text),
                Column::nullable("capacity", Integer),
            ],
        ),
        ModelDef::device_owned(
            "locations",
            vec![
                Column::nullable_reference("volume_id", "volumes"),
                Column::new("path", Text),
                Column::new("name", Text),
            ],
        ),
        ModelDef::device_owned_tree(
            "entries",
            "parent_id",
            vec![
                Column::reference("location_id", "locations"),
                Column::nullable_reference("parent_id", "entries"),
                Column::new("name", Text),
                Column::new("kind", Integer),
                Column::new("size", Integer),
                Column::new("modified_at", Integer),
            ],
        ),
        ModelDef::shared("tags", vec![Column::new("name", Text), Column::nullable("color", Text)]),
        ModelDef::shared(
            "albums",
            vec![Column::new("name", Text), Column::nullable("description", Text)],
        ),
        ModelDef::shared(
            "user_metadata",
            vec![
                Column::reference("entry_id", "entries"),
                Column::new("key", Text),
                Column::nullable("value", Text),
            ],
        ),
        ModelDef::membership(
            "tag_assignments",
            Column::reference("tag_id", "tags"),
            Column::reference("entry_id", "entries"),
            vec![],
        ),
        ModelDef::membership(
            "album_entries",
            Column::reference("album_id", "albums"),
            Column::reference("entry_id", "entries"),
            vec![],
        ),
    ]
}

/// The reference registry.
pub fn reference_registry() -> Result<Registry, SchemaError> {
    Registry::new(reference_models())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_schema_is_valid_and_ordered_by_references() {
        let registry = reference_registry().unwrap();
        let order: Vec<&str> = registry.in_apply_order().map(|model| model.name.as_str()).collect();
        let position = |name| order.iter().position(|model| *model == name).unwrap();
        assert!(position("volumes") < position("locations"));
        assert!(position("locations") < position("entries"));
        assert!(position("entries") < position("tag_assignments"));
        assert!(position("tags") < position("tag_assignments"));
        assert!(position("albums") < position("album_entries"));
        assert_eq!(order.len(), 9);
    }
}

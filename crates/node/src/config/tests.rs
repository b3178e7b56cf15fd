use std::collections::BTreeSet;
use std::fs;

use super::*;

/// A valid configuration in which every key differs from its default.
fn non_default() -> SyncConfig {
    SyncConfig {
        enabled: false,
        device_name: "Ana's \"laptop\" \u{e9}\\ \n#1".to_owned(),
        listen: "[::1]:9000".to_owned(),
        batch_window: Duration::from_millis(250),
        max_batch_rows: 100,
        page_rows: 200,
        ack_timeout: Duration::from_secs(7),
        retry_base: Duration::from_millis(150),
        retry_max: Duration::from_secs(120),
        retry_max_attempts: 3,
        retry_capacity: 10,
        request_timeout: Duration::from_secs(11),
        heartbeat_interval: Duration::from_secs(2),
        stale_timeout: Duration::from_secs(9),
        handshake_timeout: Duration::from_secs(3),
        reconnect_base: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(3600),
        max_concurrent_requests: 4,
        transport_event_capacity: 64,
        close_timeout: Duration::ZERO,
        prune_interval: Duration::from_secs(60),
        log_retention: Duration::from_secs(7 * 86_400),
        log_max_entries_per_origin: 500,
        tombstone_retention: Duration::from_secs(14 * 86_400),
        max_drift: Duration::from_secs(90),
        max_parked: 7,
        durability: Durability::Normal,
        db_readers: 2,
        busy_timeout: Duration::from_millis(1_500),
        event_capacity: 16,
        metrics_listen: Some("127.0.0.1:9100".to_owned()),
    }
}

fn table(config: &SyncConfig) -> toml::Table {
    toml::Table::try_from(config).unwrap()
}

/// The field names as serde sees them, independently of [`KEYS`].
fn serde_field_names() -> BTreeSet<String> {
    table(&non_default()).keys().cloned().collect()
}

fn key_names() -> BTreeSet<String> {
    KEYS.iter().map(|key| key.name.to_owned()).collect()
}

/// `change` applied to the defaults must be refused, naming `key`.
#[track_caller]
fn check_refused(key: &str, change: impl FnOnce(&mut SyncConfig)) {
    let mut config = SyncConfig::default();
    change(&mut config);
    match config.validate() {
        Err(ConfigError::Constraint { key: named, reason }) => {
            assert_eq!(named, key, "{reason}");
            assert!(!reason.is_empty());
        }
        other => panic!("{key}: expected a constraint error, got {other:?}"),
    }
}

/// `text` must be refused as a bad value of `key`.
#[track_caller]
fn check_bad_value(text: &str, key: &str) {
    match SyncConfig::from_toml_str(text) {
        Err(ConfigError::BadValue { key: named, reason, .. }) => assert_eq!(named, key, "{reason}"),
        other => panic!("{text:?}: expected a bad value of {key}, got {other:?}"),
    }
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect()
}

#[test]
fn defaults_validate_and_match_the_crates_defaults() {
    let config = SyncConfig::default();
    config.validate().unwrap();
    assert_eq!(config.transport_config(), TransportConfig::default());
    let store = config.store_options();
    let store_default = StoreOptions::default();
    assert_eq!(store.durability, store_default.durability);
    assert_eq!(store.busy_timeout, store_default.busy_timeout);
    assert_eq!(store.readers, store_default.readers);
    assert_eq!(config.retention(), RetentionPolicy::default());
    assert_eq!(config.hlc_config(), HlcConfig::default());
    assert_eq!(SyncConfig::from_toml_str("").unwrap(), config);
}

#[test]
fn conversions_carry_every_value() {
    let config = non_default();
    let transport = config.transport_config();
    assert_eq!(transport.handshake_timeout, config.handshake_timeout);
    assert_eq!(transport.heartbeat_interval, config.heartbeat_interval);
    assert_eq!(transport.stale_timeout, config.stale_timeout);
    assert_eq!(transport.backoff_base, config.reconnect_base);
    assert_eq!(transport.backoff_cap, config.reconnect_max);
    assert_eq!(transport.max_concurrent_requests, config.max_concurrent_requests);
    assert_eq!(transport.event_capacity, config.transport_event_capacity);
    assert_eq!(transport.close_timeout, config.close_timeout);
    let store = config.store_options();
    assert_eq!(store.durability, Durability::Normal);
    assert_eq!(store.busy_timeout, config.busy_timeout);
    assert_eq!(store.readers, config.db_readers);
    let retention = config.retention();
    assert_eq!(retention.max_age, config.log_retention);
    assert_eq!(retention.max_entries_per_origin, config.log_max_entries_per_origin);
    assert_eq!(config.hlc_config().max_drift, config.max_drift);
}

#[test]
fn the_key_table_lists_every_field() {
    assert_eq!(key_names(), serde_field_names());
    assert_eq!(KEYS.len(), serde_field_names().len(), "a key is listed twice");
}

#[test]
fn every_key_round_trips_through_the_commented_toml() {
    let config = non_default();
    config.validate().unwrap();
    // Every key differs from its default, so a key the TOML dropped would show.
    let changed = table(&config);
    let default = table(&SyncConfig::default());
    for key in KEYS {
        assert_ne!(changed.get(key.name), default.get(key.name), "{} keeps its default", key.name);
    }
    let text = config.to_commented_toml();
    assert_eq!(SyncConfig::from_toml_str(&text).unwrap(), config, "{text}");
    let text = SyncConfig::default().to_commented_toml();
    assert_eq!(SyncConfig::from_toml_str(&text).unwrap(), SyncConfig::default(), "{text}");
}

#[test]
fn every_field_is_documented_in_the_commented_toml() {
    for config in [SyncConfig::default(), non_default()] {
        let text = config.to_commented_toml();
        let lines: Vec<&str> = text.lines().collect();
        for name in serde_field_names() {
            let set = format!("{name} = ");
            let commented = format!("# {name} = ");
            let index = lines
                .iter()
                .position(|line| line.starts_with(&set) || line.starts_with(&commented))
                .unwrap_or_else(|| panic!("{name} is missing from\n{text}"));
            let mut doc = Vec::new();
            for line in lines[..index].iter().rev() {
                match line.strip_prefix('#') {
                    Some(comment) if !line.contains(" = ") => doc.push(comment),
                    _ => break,
                }
            }
            let doc = doc.concat();
            assert!(doc.split_whitespace().count() >= 10, "{name} is barely documented: {doc}");
            assert!(doc.contains("Default"), "the documentation of {name} gives no default: {doc}");
        }
    }
}

#[test]
fn unknown_keys_are_refused_by_name() {
    for (text, unknown) in [
        ("batch_windw = \"5s\"", vec!["batch_windw"]),
        ("enabled = true\nzeta = 1\nalpha = 2", vec!["alpha", "zeta"]),
        ("[transport]\nheartbeat_interval = \"5s\"", vec!["transport"]),
    ] {
        match SyncConfig::from_toml_str(text) {
            Err(error @ ConfigError::UnknownKey { .. }) => {
                let ConfigError::UnknownKey { keys, .. } = &error else { unreachable!() };
                assert_eq!(keys, &unknown);
                for key in unknown {
                    assert!(error.to_string().contains(key), "{error}");
                }
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn malformed_values_are_refused_naming_the_key() {
    for duration in ["5", "5x", "-1s", "99999999999999999999d", "", "1.5s", "5 s"] {
        check_bad_value(&format!("batch_window = \"{duration}\""), "batch_window");
    }
    check_bad_value("batch_window = 5", "batch_window");
    check_bad_value("ack_timeout = 5.0", "ack_timeout");
    check_bad_value("enabled = \"yes\"", "enabled");
    check_bad_value("durability = \"fast\"", "durability");
    check_bad_value("durability = \"FULL\"", "durability");
    check_bad_value("max_batch_rows = -1", "max_batch_rows");
    check_bad_value("page_rows = 5000000000", "page_rows");
    check_bad_value("device_name = 7", "device_name");
    check_bad_value("metrics_listen = [\"127.0.0.1:1\"]", "metrics_listen");
    check_bad_value("listen = { host = \"x\" }", "listen");
    check_bad_value("busy_timeout = 1979-05-27T07:32:00Z", "busy_timeout");
}

#[test]
fn error_messages_name_the_key_and_the_rule() {
    let error = SyncConfig::from_toml_str("retry_base = \"5x\"").unwrap_err().to_string();
    assert!(error.contains("retry_base") && error.contains("unknown unit"), "{error}");
    let error = SyncConfig::from_toml_str("max_batch_rows = 0").unwrap_err().to_string();
    assert!(error.contains("max_batch_rows") && error.contains("from 1 to 10000"), "{error}");
    let error = SyncConfig::from_toml_str("stale_timeout = \"5s\"").unwrap_err().to_string();
    assert!(error.contains("stale_timeout") && error.contains("heartbeat_interval"), "{error}");
}

#[test]
fn syntax_errors_give_line_and_column() {
    let text = "enabled = true\n# a comment\nbatch_window = \n";
    match SyncConfig::from_toml_str(text) {
        Err(ConfigError::Syntax { origin, line, column, message }) => {
            assert_eq!(origin, Origin::Text);
            assert_eq!(line, 3, "{message}");
            assert!(column > 1, "{column}: {message}");
        }
        other => panic!("{other:?}"),
    }
    for text in ["enabled = true\nenabled = false", "= 5", "[", "\u{e9}t\u{e9} = ", "a = \"\\q\""] {
        assert!(
            matches!(SyncConfig::from_toml_str(text), Err(ConfigError::Syntax { .. })),
            "{text:?}"
        );
    }
}

#[test]
fn every_constraint_is_checked_and_names_its_key() {
    let long = Duration::from_secs(36_500 * 86_400 + 1);
    check_refused("device_name", |c| c.device_name = "x".repeat(MAX_TEXT_BYTES + 1));
    check_refused("listen", |c| c.listen = "localhost:7788".to_owned());
    check_refused("listen", |c| c.listen = "0.0.0.0".to_owned());
    check_refused("listen", |c| c.listen = String::new());
    check_refused("batch_window", |c| c.batch_window = long);
    check_refused("batch_window", |c| c.batch_window = Duration::from_micros(1_500));
    check_refused("max_batch_rows", |c| c.max_batch_rows = 0);
    check_refused("max_batch_rows", |c| c.max_batch_rows = 10_001);
    check_refused("max_batch_rows", |c| c.max_batch_rows = usize::MAX);
    check_refused("page_rows", |c| c.page_rows = 0);
    check_refused("page_rows", |c| c.page_rows = MAX_PAGE_ROWS + 1);
    check_refused("ack_timeout", |c| c.ack_timeout = Duration::ZERO);
    check_refused("retry_base", |c| c.retry_base = Duration::ZERO);
    check_refused("retry_max", |c| c.retry_max = Duration::from_millis(199));
    check_refused("retry_max_attempts", |c| c.retry_max_attempts = 0);
    check_refused("retry_capacity", |c| c.retry_capacity = 0);
    check_refused("retry_capacity", |c| c.retry_capacity = MAX_QUEUE_CAPACITY + 1);
    check_refused("request_timeout", |c| c.request_timeout = Duration::ZERO);
    check_refused("heartbeat_interval", |c| c.heartbeat_interval = Duration::ZERO);
    check_refused("stale_timeout", |c| c.stale_timeout = c.heartbeat_interval);
    check_refused("handshake_timeout", |c| c.handshake_timeout = Duration::ZERO);
    check_refused("reconnect_base", |c| c.reconnect_base = Duration::ZERO);
    check_refused("reconnect_max", |c| c.reconnect_max = Duration::from_millis(499));
    check_refused("max_concurrent_requests", |c| c.max_concurrent_requests = 0);
    check_refused("transport_event_capacity", |c| c.transport_event_capacity = 0);
    check_refused("transport_event_capacity", |c| {
        c.transport_event_capacity = MAX_QUEUE_CAPACITY + 1;
    });
    check_refused("close_timeout", |c| c.close_timeout = Duration::MAX);
    check_refused("prune_interval", |c| c.prune_interval = Duration::ZERO);
    check_refused("log_retention", |c| c.log_retention = Duration::ZERO);
    check_refused("log_max_entries_per_origin", |c| c.log_max_entries_per_origin = 0);
    check_refused("log_max_entries_per_origin", |c| c.log_max_entries_per_origin = u64::MAX);
    check_refused("tombstone_retention", |c| c.tombstone_retention = Duration::ZERO);
    check_refused("max_drift", |c| c.max_drift = Duration::ZERO);
    check_refused("max_parked", |c| c.max_parked = 0);
    check_refused("db_readers", |c| c.db_readers = 0);
    check_refused("db_readers", |c| c.db_readers = MAX_DB_READERS + 1);
    check_refused("busy_timeout", |c| c.busy_timeout = Duration::from_nanos(1));
    check_refused("event_capacity", |c| c.event_capacity = 0);
    check_refused("event_capacity", |c| c.event_capacity = MAX_QUEUE_CAPACITY + 1);
    check_refused("metrics_listen", |c| c.metrics_listen = Some("0.0.0.0:9464".to_owned()));
    check_refused("metrics_listen", |c| c.metrics_listen = Some("192.168.1.2:9464".to_owned()));
    check_refused("metrics_listen", |c| c.metrics_listen = Some("localhost:9464".to_owned()));
    check_refused("metrics_listen", |c| c.metrics_listen = Some(String::new()));
}

#[test]
fn zero_is_accepted_where_it_means_something() {
    let config = SyncConfig {
        batch_window: Duration::ZERO,
        close_timeout: Duration::ZERO,
        busy_timeout: Duration::ZERO,
        ..SyncConfig::default()
    };
    config.validate().unwrap();
    let text = "batch_window = \"0s\"\nclose_timeout = \"0ms\"\nbusy_timeout = \"0s\"";
    assert_eq!(SyncConfig::from_toml_str(text).unwrap(), config);
    for key in ["ack_timeout", "retry_base", "max_drift", "log_retention", "prune_interval"] {
        let error = SyncConfig::from_toml_str(&format!("{key} = \"0s\"")).unwrap_err();
        assert!(matches!(&error, ConfigError::Constraint { key: named, .. } if *named == key));
    }
}

#[test]
fn constraints_accept_the_edges_of_their_ranges() {
    let mut config = SyncConfig::default();
    config.max_batch_rows = 10_000;
    config.page_rows = 1;
    config.retry_max = config.retry_base;
    config.reconnect_max = config.reconnect_base;
    config.retry_capacity = MAX_QUEUE_CAPACITY;
    config.db_readers = MAX_DB_READERS;
    config.log_retention = MAX_DURATION;
    config.log_max_entries_per_origin = u64::try_from(i64::MAX).unwrap();
    config.device_name = "x".repeat(MAX_TEXT_BYTES);
    config.metrics_listen = Some("[::1]:0".to_owned());
    config.listen = "[::]:7788".to_owned();
    config.validate().unwrap();
    assert_eq!(SyncConfig::from_toml_str(&config.to_commented_toml()).unwrap(), config);
}

#[test]
fn environment_overrides_apply() {
    let mut config = SyncConfig::default();
    config
        .apply_env(env(&[
            ("LSYNC_BATCH_WINDOW", "250ms"),
            ("LSYNC_ENABLED", "false"),
            ("LSYNC_MAX_PARKED", "5"),
            ("LSYNC_DURABILITY", "normal"),
            ("LSYNC_DEVICE_NAME", "desk"),
            ("LSYNC_METRICS_LISTEN", "127.0.0.1:9000"),
            ("LSYNC_BENCH_QUICK", "1"),
            ("PATH", "/usr/bin"),
            ("lsync_whatever", "x"),
        ]))
        .unwrap();
    let mut expected = SyncConfig {
        batch_window: Duration::from_millis(250),
        enabled: false,
        max_parked: 5,
        durability: Durability::Normal,
        device_name: "desk".to_owned(),
        metrics_listen: Some("127.0.0.1:9000".to_owned()),
        ..SyncConfig::default()
    };
    assert_eq!(config, expected);
    // Untouched keys keep what the file set, and an empty optional key is unset.
    config.apply_env(env(&[("LSYNC_METRICS_LISTEN", "")])).unwrap();
    expected.metrics_listen = None;
    assert_eq!(config, expected);
}

#[test]
fn every_key_can_be_set_from_the_environment() {
    let target = non_default();
    let vars: Vec<(String, String)> = table(&target)
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::String(text) => text,
                other => other.to_string(),
            };
            (format!("LSYNC_{}", key.to_ascii_uppercase()), text)
        })
        .collect();
    assert_eq!(vars.len(), KEYS.len());
    let mut config = SyncConfig::default();
    config.apply_env(vars).unwrap();
    assert_eq!(config, target);
}

#[test]
fn bad_environment_variables_are_refused_by_name() {
    let original = non_default();
    let check = |vars: &[(&str, &str)], expected_key: &str| {
        let mut config = original.clone();
        let error = config.apply_env(env(vars)).unwrap_err();
        assert!(error.to_string().contains(expected_key), "{error}");
        assert_eq!(config, original, "a refused override changed the configuration");
        error
    };
    for (vars, key) in [
        (&[("LSYNC_ENABLED", "yes")][..], "LSYNC_ENABLED"),
        (&[("LSYNC_ENABLED", "")], "LSYNC_ENABLED"),
        (&[("LSYNC_MAX_PARKED", "abc")], "LSYNC_MAX_PARKED"),
        (&[("LSYNC_MAX_PARKED", "-3")], "LSYNC_MAX_PARKED"),
        (&[("LSYNC_BATCH_WINDOW", "5")], "LSYNC_BATCH_WINDOW"),
        (&[("LSYNC_DURABILITY", "fast")], "LSYNC_DURABILITY"),
        (&[("LSYNC_PAGE_ROWS", "99999999999")], "LSYNC_PAGE_ROWS"),
    ] {
        let error = check(vars, key);
        assert!(matches!(error, ConfigError::BadValue { origin: Origin::Environment, .. }));
    }
    for (vars, key) in [
        (&[("LSYNC_BATCH_WINDOWS", "5s")][..], "LSYNC_BATCH_WINDOWS"),
        (&[("LSYNC_batch_window", "5s")], "LSYNC_batch_window"),
        (&[("LSYNC_", "5s")], "LSYNC_"),
        (&[("LSYNC_LOG", "debug"), ("LSYNC_ENABLED", "true")], "LSYNC_LOG"),
    ] {
        let error = check(vars, key);
        assert!(matches!(error, ConfigError::UnknownKey { origin: Origin::Environment, .. }));
    }
    let error = check(&[("LSYNC_STALE_TIMEOUT", "1s")], "stale_timeout");
    assert!(matches!(error, ConfigError::Constraint { key: "stale_timeout", .. }));
}

#[test]
fn files_load_and_missing_or_unreadable_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    match SyncConfig::load(&path) {
        Err(error @ ConfigError::Missing { .. }) => {
            assert!(error.to_string().contains("config.toml"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(SyncConfig::from_env_and_file(Some(&path)), Err(ConfigError::Missing { .. })));
    fs::write(&path, non_default().to_commented_toml()).unwrap();
    assert_eq!(SyncConfig::load(&path).unwrap(), non_default());
    fs::write(&path, "page_rows = 0").unwrap();
    assert!(matches!(
        SyncConfig::load(&path),
        Err(ConfigError::Constraint { key: "page_rows", .. })
    ));
    fs::write(&path, "nope = 1").unwrap();
    match SyncConfig::load(&path) {
        Err(error @ ConfigError::UnknownKey { .. }) => {
            assert!(error.to_string().contains(&path.display().to_string()), "{error}");
        }
        other => panic!("{other:?}"),
    }
    fs::write(&path, b"device_name = \"\xff\"").unwrap();
    assert!(matches!(SyncConfig::load(&path), Err(ConfigError::Unreadable { .. })));
    assert!(matches!(SyncConfig::load(dir.path()), Err(ConfigError::Unreadable { .. })));
}

#[test]
fn the_process_environment_is_read_when_it_holds_no_overrides() {
    // The test environment normally sets no LSYNC_ variables; skip rather than fail if it does.
    let overridden = std::env::vars_os().any(|(name, _)| {
        name.to_string_lossy().starts_with(ENV_PREFIX)
            && !NON_CONFIG_ENV_VARS.contains(&name.to_string_lossy().as_ref())
    });
    if !overridden {
        assert_eq!(SyncConfig::from_env_and_file(None).unwrap(), SyncConfig::default());
    }
}

#[test]
fn invalid_configurations_still_write_without_panicking() {
    let config =
        SyncConfig { max_parked: u64::MAX, batch_window: Duration::MAX, ..SyncConfig::default() };
    let text = config.to_commented_toml();
    assert!(text.contains("not valid"), "{text}");
    for key in KEYS {
        assert!(text.contains(&format!("# {} = ", key.name)), "{text}");
    }
}

#[test]
fn the_configuration_doc_lists_every_key_with_its_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    let doc = fs::read_to_string(path).unwrap();
    let defaults = table(&SyncConfig::default());
    for key in KEYS {
        let row = doc
            .lines()
            .find(|line| line.starts_with(&format!("| `{}` |", key.name)))
            .unwrap_or_else(|| panic!("docs/configuration.md has no row for `{}`", key.name));
        match defaults.get(key.name) {
            Some(value) => {
                let shown = format!("`{value}`");
                assert!(row.contains(&shown), "the row of `{}` does not give {shown}", key.name);
            }
            None => assert!(row.contains("unset"), "the row of `{}` does not say unset", key.name),
        }
        let variable = format!("LSYNC_{}", key.name.to_ascii_uppercase());
        assert!(row.contains(&variable), "the row of `{}` does not name {variable}", key.name);
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,200}") {
        let _ = SyncConfig::from_toml_str(&text);
    }

    #[test]
    fn arbitrary_values_of_known_keys_never_panic(
        key_index in 0..KEYS.len(),
        value in "[\"'\\[\\]{}0-9a-z.:+-]{0,30}",
    ) {
        let text = format!("{} = {value}", KEYS[key_index].name);
        let _ = SyncConfig::from_toml_str(&text);
        let mut config = SyncConfig::default();
        let name = format!("LSYNC_{}", KEYS[key_index].name.to_ascii_uppercase());
        let _ = config.apply_env([(name, value)]);
    }

    #[test]
    fn arbitrary_duration_text_never_panics(text in "(?s).{0,40}") {
        let quoted = toml::Value::String(text.clone()).to_string();
        let _ = SyncConfig::from_toml_str(&format!("batch_window = {quoted}"));
        let _ = parse_duration(&text);
    }
}

#[test]
fn deeply_nested_input_does_not_overflow_the_stack() {
    for text in [
        format!("batch_window = {}", "[".repeat(100_000)),
        format!("batch_window = {}1{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!("listen = {}", "{ a = ".repeat(10_000)),
        "a.".repeat(10_000) + "b = 1",
    ] {
        assert!(SyncConfig::from_toml_str(&text).is_err());
    }
}

//! Tidy checks: architecture rules and repository conventions, written as tests so that
//! `cargo test` (and so `cargo xtask ci`) enforces them.

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use crate::{cargo, workspace_root};

    /// The normal (non-dev) dependency tree of `package`, one crate name per line.
    fn dependencies(package: &str) -> Vec<String> {
        let output = cargo()
            .args(["tree", "--locked", "--offline", "--edges", "normal", "--prefix", "none"])
            .args(["--format", "{p}", "--package", package])
            .output()
            .expect("cargo tree runs");
        assert!(
            output.status.success(),
            "cargo tree -p {package}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// What each crate must not know (docs/architecture.md, "Invariants").
    #[test]
    fn crate_boundaries_hold() {
        let io_and_runtime = ["tokio", "sqlx", "quinn", "rustls", "actix", "libsqlite3-sys"];
        // The storage crates know SQLite (and so sqlx's runtime), but not the network or actors.
        let network_and_actors = ["quinn", "rustls", "actix", "lsync-transport"];
        for (package, forbidden) in [
            ("lsync-hlc", &io_and_runtime[..]),
            ("lsync-protocol", &io_and_runtime[..]),
            ("lsync-store", &network_and_actors[..]),
            ("lsync-watermark", &network_and_actors[..]),
            ("lsync-peer-log", &network_and_actors[..]),
            ("lsync-shared-sync", &network_and_actors[..]),
            ("lsync-state-sync", &network_and_actors[..]),
        ] {
            let found: Vec<_> = dependencies(package)
                .into_iter()
                .filter(|dependency| forbidden.contains(&dependency.as_str()))
                .collect();
            assert!(found.is_empty(), "{package} must not depend on {found:?}");
        }
        only_transport_knows_quic_and_tls();
    }

    /// Only the transport (and the node, which composes it) may name QUIC or TLS crates as their
    /// own dependencies: everything else talks to peers through `lsync_transport::Transport`.
    fn only_transport_knows_quic_and_tls() {
        let network = ["quinn", "rustls", "rcgen"];
        let allowed = ["lsync-transport", "lsync-node"];
        let crates = workspace_root().join("crates");
        for entry in fs::read_dir(&crates).expect("crates/ exists") {
            let manifest = entry.expect("readable").path().join("Cargo.toml");
            let text = fs::read_to_string(&manifest)
                .unwrap_or_else(|error| panic!("{}: {error}", manifest.display()));
            let package = text
                .lines()
                .find_map(|line| line.strip_prefix("name = "))
                .map(|name| name.trim_matches('"').to_owned())
                .unwrap_or_default();
            if allowed.contains(&package.as_str()) {
                continue;
            }
            let named: Vec<&str> = text
                .lines()
                .filter_map(|line| line.split(['=', '.', ' ']).next())
                .filter(|key| network.contains(key))
                .collect();
            assert!(named.is_empty(), "{package} depends on {named:?}; only lsync-transport may");
        }
    }

    /// Every crate opens with a `//!` doc stating its model and invariants.
    #[test]
    fn every_crate_has_a_crate_doc() {
        let crates = workspace_root().join("crates");
        for entry in fs::read_dir(&crates).expect("crates/ exists") {
            let lib = entry.expect("readable").path().join("src/lib.rs");
            let text = fs::read_to_string(&lib)
                .unwrap_or_else(|error| panic!("{}: {error}", lib.display()));
            assert!(text.starts_with("//!"), "{} must start with a //! crate doc", lib.display());
        }
    }

    /// docs/protocol.md describes every message.
    #[test]
    fn protocol_doc_lists_every_message() {
        let doc = fs::read_to_string(workspace_root().join("docs/protocol.md"))
            .expect("docs/protocol.md");
        let source = fs::read_to_string(workspace_root().join("crates/protocol/src/lib.rs"))
            .expect("protocol source");
        let variants: Vec<&str> = source
            .lines()
            .filter_map(|line| line.trim().split_once(" => "))
            .filter(|(kind, _)| kind.parse::<u16>().is_ok())
            .map(|(_, variant)| variant.trim_end_matches(','))
            .collect();
        assert!(variants.len() >= 18, "found only {variants:?}");
        for variant in variants {
            assert!(
                doc.contains(&format!("`{variant}`")),
                "docs/protocol.md does not describe `{variant}`"
            );
        }
    }

    /// No source file leaves unfinished work behind a macro that compiles.
    #[test]
    fn no_unfinished_markers() {
        fn visit(dir: &Path, found: &mut Vec<String>) {
            for entry in fs::read_dir(dir).expect("readable dir").flatten() {
                let path = entry.path();
                let name = entry.file_name();
                if path.is_dir() && name != "target" && name != ".git" {
                    visit(&path, found);
                } else if path.extension().is_some_and(|ext| ext == "rs")
                    && !path.ends_with("tidy.rs")
                {
                    let text = fs::read_to_string(&path).expect("readable file");
                    for marker in ["todo!(", "unimplemented!("] {
                        if text.contains(marker) {
                            found.push(format!("{} contains {marker}", path.display()));
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        visit(&workspace_root(), &mut found);
        assert!(found.is_empty(), "{found:#?}");
    }
}

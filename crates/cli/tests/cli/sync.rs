//! Two, then three devices in separate `lsync` processes: paired by invitation, a folder tree
//! indexed on one, files tagged on another, one device killed with SIGKILL while the others keep
//! writing, then restarted; every table but `sync_*` must end up identical in every library file.

use std::path::Path;

use crate::harness::*;

/// Waits until `node`'s index holds `file` (indexed on another device).
fn wait_for_entry(node: &Node, file: &Path) {
    eventually(
        &format!("{} sees {}", node.name, file.display()),
        || run(&["ls", arg(&node.dir), arg(file)]).status.success().then_some(()),
        || node.log_tail(),
    );
}

fn count(tables: &std::collections::BTreeMap<String, Vec<String>>, table: &str) -> usize {
    tables.get(table).map_or(0, Vec::len)
}

#[test]
fn devices_pair_index_tag_survive_a_crash_and_converge() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = (root.path().join("a"), root.path().join("b"), root.path().join("c"));
    let tree = root.path().join("tree");
    let (files, folders) = make_tree(&tree, 6, 5, 40);

    // Device a: a new library, running.
    let device_a = ok(&["init", arg(&a), "--name", "a", "--listen", "127.0.0.1:0"]);
    assert_eq!(device_a.trim().len(), 36, "init prints the device id: {device_a:?}");
    let node_a = Node::start(&a);

    // Device b joins through an invitation from a's running node.
    let token = ok(&["invite", arg(&a)]);
    assert_eq!(token.lines().count(), 1, "one line: {token:?}");
    ok(&["join", arg(&b), token.trim(), "--name", "b", "--listen", "127.0.0.1:0"]);
    let node_b = Node::start(&b);

    // a indexes the tree (through its node's control endpoint).
    let report = json(&["location", "add", arg(&a), arg(&tree)]);
    assert_eq!(report["files"], files);
    assert_eq!(report["directories"], folders);
    assert_eq!(report["added"], files + folders);

    // b tags a's files, makes an album, notes metadata: shared data written on b.
    let (first, second, third) = (
        tree.join("dir00/sub00/file000.txt"),
        tree.join("dir01/sub02/file010.txt"),
        tree.join("dir05/sub04/file039.txt"),
    );
    wait_for_entry(&node_b, &third);
    ok(&["tag", "create", arg(&b), "favourite", "--color", "red"]);
    ok(&["tag", "assign", arg(&b), "favourite", arg(&first), arg(&second), arg(&third)]);
    ok(&["album", "create", arg(&b), "trip"]);
    ok(&["album", "add", arg(&b), "trip", arg(&tree.join("dir02"))]);
    ok(&["meta", "set", arg(&b), arg(&first), "rating", "5"]);

    let tables = converge(&[&node_a, &node_b]);
    assert_eq!(count(&tables, "entries"), files + folders);
    assert_eq!(count(&tables, "locations"), 1);
    assert_eq!(count(&tables, "devices"), 2);
    assert_eq!(count(&tables, "tag_assignments"), 3);
    assert_eq!(count(&tables, "album_entries"), 1);
    assert_eq!(count(&tables, "user_metadata"), 1);
    let listing = json(&["ls", arg(&a), arg(&first)]);
    assert_eq!(listing["tags"], serde_json::json!(["favourite"]));
    assert_eq!(listing["metadata"]["rating"], "5");

    // A third device, paired with both: with a by a new device's join, with b by joining an
    // existing device while its node is not running.
    ok(&[
        "join",
        arg(&c),
        ok(&["invite", arg(&a)]).trim(),
        "--name",
        "c",
        "--listen",
        "127.0.0.1:0",
    ]);
    let joined = json(&["join", arg(&c), ok(&["invite", arg(&b)]).trim()]);
    assert_eq!(joined["created"], false);
    assert_eq!(joined["peer_name"], "b");
    let node_c = Node::start(&c);
    converge(&[&node_a, &node_b, &node_c]);
    let peers = json(&["peers", arg(&c)]);
    assert_eq!(peers["peers"].as_array().map(Vec::len), Some(2), "{peers}");

    // b crashes. Meanwhile a's tree changes and is rescanned, and c and a edit shared data.
    node_b.kill();
    std::fs::remove_dir_all(tree.join("dir04")).unwrap();
    std::fs::create_dir_all(tree.join("dir06/new")).unwrap();
    std::fs::write(tree.join("dir06/new/added.txt"), "new").unwrap();
    std::fs::write(&second, "changed, and longer than before").unwrap();
    let rescan = json(&["location", "rescan", arg(&a), arg(&tree)]);
    assert_eq!(rescan["deleted"], 5 * 40 + 5 + 1, "dir04, its subfolders and files: {rescan}");
    assert_eq!(rescan["added"], 3);
    ok(&["tag", "rename", arg(&c), "favourite", "best"]);
    let added = tree.join("dir06/new/added.txt");
    wait_for_entry(&node_c, &added);
    ok(&["tag", "assign", arg(&c), "best", arg(&added)]);
    ok(&["tag", "unassign", arg(&c), "best", arg(&first)]);
    ok(&["meta", "set", arg(&a), arg(&second), "rating", "3"]);

    // b comes back and catches up.
    let node_b = Node::start(&b);
    let tables = converge(&[&node_a, &node_b, &node_c]);
    let entries_now = files + folders - (5 * 40 + 5 + 1) + 3;
    assert_eq!(count(&tables, "entries"), entries_now);
    assert_eq!(count(&tables, "tag_assignments"), 3, "second, third and added.txt");
    assert_eq!(count(&tables, "user_metadata"), 2);
    let tags = json(&["tag", "list", arg(&b)]);
    assert_eq!(tags["groups"][0]["name"], "best", "{tags}");

    // c stops; a write to c while no node runs goes into its library file and reaches the
    // others when it runs again.
    node_c.stop();
    ok(&["tag", "create", arg(&c), "written-offline"]);
    let status = json(&["status", arg(&c)]);
    assert_eq!(status["running"], false);
    let node_c = Node::start(&c);
    let tables = converge(&[&node_a, &node_b, &node_c]);
    assert_eq!(count(&tables, "tags"), 2);

    let status = json(&["status", arg(&a)]);
    assert_eq!(status["running"], true);
    assert_eq!(status["state"], "ready");
    let online: Vec<bool> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|peer| peer["online"].as_bool().unwrap())
        .collect();
    assert_eq!(online.len(), 2);

    for node in [node_a, node_b, node_c] {
        node.stop();
    }
}

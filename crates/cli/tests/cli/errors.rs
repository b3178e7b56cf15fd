//! Bad arguments, bad input and a missing node: one clear line on stderr and a non-zero exit,
//! never a panic; commands that need the running node say so.

use crate::harness::*;

#[test]
fn usage_errors_exit_with_2() {
    let output = run(&[]);
    assert_eq!(output.status.code(), Some(2));
    let output = run(&["tag", "assign", "dir", "tag"]);
    assert_eq!(output.status.code(), Some(2), "a file path is required");
    let output = run(&["--help"]);
    assert!(output.status.success());
}

#[test]
fn bad_input_is_one_line_and_a_failure() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dev");
    let missing = root.path().join("missing");

    let (code, message) = fails(&["status", arg(&missing)]);
    assert_eq!(code, 1);
    assert!(message.contains("does not exist"), "{message}");

    ok(&["init", arg(&dir), "--name", "dev", "--listen", "127.0.0.1:0"]);
    let (_, message) = fails(&["init", arg(&dir)]);
    assert!(message.contains("already holds an lsync device"), "{message}");

    let (code, message) = fails(&["invite", arg(&dir)]);
    assert_eq!(code, 3, "needs the running node");
    assert!(message.contains("not running"), "{message}");

    let (_, message) = fails(&["join", arg(&root.path().join("other")), "not-a-token"]);
    assert!(message.contains("not an lsync invitation"), "{message}");
    assert!(!root.path().join("other").exists(), "nothing created for a bad token");

    let (_, message) = fails(&["location", "add", arg(&dir), arg(&missing)]);
    assert!(message.contains("cannot open"), "{message}");
    let (_, message) = fails(&["tag", "assign", arg(&dir), "nope", arg(&missing)]);
    assert!(message.contains("no tag is named"), "{message}");
    let (_, message) = fails(&["invite", arg(&dir), "--ttl", "soon"]);
    assert!(message.contains("--ttl"), "{message}");
    let (_, message) = fails(&["meta", "set", arg(&dir), arg(&missing), "k", "v"]);
    assert!(message.contains("not in any indexed location"), "{message}");

    // A misspelt setting in the environment is refused, naming it.
    let output =
        lsync().args(["status", arg(&dir)]).env("LSYNC_BATCH_WINDOW", "fast").output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("LSYNC_BATCH_WINDOW") && stderr.lines().count() == 1, "{stderr}");
}

#[test]
fn commands_work_without_a_node_and_a_second_node_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dev");
    let tree = root.path().join("photos");
    make_tree(&tree, 2, 2, 3);
    ok(&["init", arg(&dir), "--name", "dev", "--listen", "127.0.0.1:0"]);

    // No node: the command opens the library itself.
    let report = json(&["location", "add", arg(&dir), arg(&tree)]);
    assert_eq!(report["files"], 12);
    let file = tree.join("dir00/sub01/file002.txt");
    ok(&["tag", "create", arg(&dir), "work"]);
    ok(&["tag", "assign", arg(&dir), "work", arg(&file)]);
    let listing = json(&["ls", arg(&dir), arg(&file)]);
    assert_eq!(listing["tags"], serde_json::json!(["work"]));
    let (_, message) = fails(&["location", "add", arg(&dir), arg(&tree.join("dir00"))]);
    assert!(message.contains("overlaps"), "{message}");

    // With a node: the same commands go through it, and a second node is refused.
    let node = Node::start(&dir);
    let (_, message) = fails(&["run", arg(&dir)]);
    assert!(message.contains("in use"), "{message}");
    ok(&["tag", "unassign", arg(&dir), "work", arg(&file)]);
    let listing = json(&["ls", arg(&dir), arg(&file)]);
    assert_eq!(listing["tags"], serde_json::json!([]));
    let status = json(&["status", arg(&dir)]);
    assert_eq!(status["running"], true);
    assert_eq!(status["listen"], node.listen.as_str());
    node.stop();
    assert!(!dir.join("control.json").exists(), "the control file goes with the node");
}

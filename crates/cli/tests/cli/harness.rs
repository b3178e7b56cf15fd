//! Running `lsync` processes: one-shot commands, and nodes (`lsync run`) whose output is read
//! line by line; waiting on output or on polled state with a deadline, never on a sleep.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The longest any test waits for something to happen; reaching it fails the test.
pub(crate) const WAIT: Duration = Duration::from_secs(90);

/// How often polled state is looked at again.
const POLL: Duration = Duration::from_millis(100);

/// Settings that make tests quick without changing behaviour: short windows and intervals.
const FAST: &[(&str, &str)] = &[
    ("LSYNC_BATCH_WINDOW", "20ms"),
    ("LSYNC_ACK_TIMEOUT", "1s"),
    ("LSYNC_RETRY_BASE", "50ms"),
    ("LSYNC_RETRY_MAX", "500ms"),
    ("LSYNC_HEARTBEAT_INTERVAL", "300ms"),
    ("LSYNC_STALE_TIMEOUT", "3s"),
    ("LSYNC_RECONNECT_BASE", "100ms"),
    ("LSYNC_RECONNECT_MAX", "1s"),
    ("LSYNC_PRUNE_INTERVAL", "500ms"),
    ("LSYNC_CLOSE_TIMEOUT", "2s"),
];

/// The `lsync` binary with the test settings.
pub(crate) fn lsync() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lsync"));
    // Only the settings chosen here: nothing inherited from the environment of the test run.
    for (name, _) in std::env::vars() {
        if name.starts_with("LSYNC_") {
            command.env_remove(name);
        }
    }
    command.envs(FAST.iter().copied()).env_remove("RUST_LOG");
    command
}

/// Runs a command to its end.
pub(crate) fn run(args: &[&str]) -> Output {
    lsync().args(args).output().expect("lsync runs")
}

/// Runs a command that must succeed; returns its stdout.
pub(crate) fn ok(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "lsync {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Runs a command with `--json` that must succeed; returns its answer.
pub(crate) fn json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ok(&all);
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("lsync {args:?}: {error}: {text}"))
}

/// Runs a command that must fail: returns its exit code and its stderr, which must be one line
/// saying what went wrong (never a panic).
pub(crate) fn fails(args: &[&str]) -> (i32, String) {
    let output = run(args);
    assert!(!output.status.success(), "lsync {args:?} succeeded");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "lsync {args:?} panicked:\n{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "lsync {args:?}: not one line:\n{stderr}");
    (output.status.code().expect("an exit code"), stderr)
}

/// A running `lsync run` process.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    child: Child,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
    /// Its sync address, from its ready line.
    pub(crate) listen: String,
}

impl Node {
    /// Starts the node of `dir` and waits until it says it is ready.
    pub(crate) fn start(dir: &Path) -> Node {
        let name = dir.file_name().expect("a folder name").to_string_lossy().into_owned();
        let log = dir.with_extension("log");
        let log_file =
            std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut child = lsync()
            .args(["--json", "run"])
            .arg(dir)
            .env("RUST_LOG", "info,lsync_node=debug")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("lsync run starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut node = Node { name, dir: dir.to_owned(), child, lines, log, listen: String::new() };
        let ready = node.next_line();
        let ready: serde_json::Value = serde_json::from_str(&ready)
            .unwrap_or_else(|error| panic!("{}: ready line {ready:?}: {error}", node.name));
        node.listen = ready["listen"].as_str().expect("a listen address").to_owned();
        node
    }

    /// The next line the node prints on stdout.
    fn next_line(&mut self) -> String {
        match self.lines.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(error) => {
                panic!("{}: no output within {WAIT:?} ({error}):\n{}", self.name, self.log_tail())
            }
        }
    }

    /// The last lines of its log, for failure messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills it with SIGKILL: no flush, no goodbye, as a crash or a power cut.
    pub(crate) fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// Stops it with SIGTERM and checks it stops cleanly, saying so.
    pub(crate) fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let stopped = self.next_line();
        assert_eq!(stopped, r#"{"stopped":true}"#, "{}: {}", self.name, self.log_tail());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitable") {
                assert!(
                    status.success(),
                    "{} exited with {status}:\n{}",
                    self.name,
                    self.log_tail()
                );
                return;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A test that failed half-way leaves no process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns `Some`, failing with `what` and `context()` after [`WAIT`].
pub(crate) fn eventually<T>(
    what: &str,
    mut check: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not reached within {WAIT:?}\n{}", context());
        std::thread::sleep(POLL);
    }
}

/// Every table of a library file except lsync's bookkeeping (`sync_*`), each row as the text
/// of its values (SQLite's `quote`), in primary-key order.
pub(crate) fn tables(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.join("library.db"))
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("library file opens");
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table'
             AND name NOT LIKE 'sync\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
             ORDER BY name",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut tables = BTreeMap::new();
        for name in names {
            let columns: Vec<String> =
                sqlx::query_scalar(&format!("SELECT name FROM pragma_table_info('{name}')"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let quoted: Vec<String> =
                columns.iter().map(|column| format!("quote(\"{column}\")")).collect();
            let rows: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT {} FROM \"{name}\" ORDER BY id",
                quoted.join(" || '|' || ")
            ))
            .fetch_all(&pool)
            .await
            .unwrap();
            tables.insert(name, rows);
        }
        pool.close().await;
        tables
    })
}

/// Waits until the devices in `dirs` hold the same rows in every table but `sync_*`; returns
/// them.
pub(crate) fn converge(nodes: &[&Node]) -> BTreeMap<String, Vec<String>> {
    let dumps = || nodes.iter().map(|node| tables(&node.dir)).collect::<Vec<_>>();
    eventually(
        "convergence",
        || {
            let mut all = dumps();
            all.windows(2).all(|pair| pair[0] == pair[1]).then(|| all.remove(0))
        },
        || {
            let counts: Vec<String> = dumps()
                .iter()
                .zip(nodes)
                .map(|(tables, node)| {
                    let counts: BTreeMap<&String, usize> =
                        tables.iter().map(|(name, rows)| (name, rows.len())).collect();
                    format!("{}: {counts:?}\n{}", node.name, node.log_tail())
                })
                .collect();
            counts.join("\n\n")
        },
    )
}

/// Writes a folder tree under `root`: `dirs` folders of `subdirs` folders of `files` files each;
/// returns the number of files and folders.
pub(crate) fn make_tree(root: &Path, dirs: usize, subdirs: usize, files: usize) -> (usize, usize) {
    for d in 0..dirs {
        for s in 0..subdirs {
            let folder = root.join(format!("dir{d:02}")).join(format!("sub{s:02}"));
            std::fs::create_dir_all(&folder).unwrap();
            for f in 0..files {
                std::fs::write(folder.join(format!("file{f:03}.txt")), format!("{d} {s} {f}"))
                    .unwrap();
            }
        }
    }
    (dirs * subdirs * files, dirs + dirs * subdirs)
}

/// A path as a command-line argument.
pub(crate) fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 test paths")
}

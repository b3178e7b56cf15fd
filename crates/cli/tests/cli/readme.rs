//! The README's walkthrough "Try it: two devices in two terminals", pasted as written.
//!
//! The shell blocks of that section are read from `README.md` itself at test time (so the test
//! follows the README, not a copy of it) and run in order, each terminal a long-lived `bash -euo
//! pipefail` fed the blocks on its stdin, as a paste into a terminal: a background node (`&`)
//! keeps running across blocks, its `ready` line and the commands' output arrive on the
//! terminal's output. The only changes are mechanical: `/tmp/lsync-demo` becomes a fresh
//! temporary folder, the ports 7788 and 7789 free ones, and `lsync` is the built binary, found on
//! `PATH` (the text keeps saying `lsync`). The `cargo install` block is not run.
//!
//! As the README asks, after a block that starts a node the test waits for that node's `ready`
//! line before the next block: on the terminal, where a person sees it (the README sends only the
//! node's stderr, its log, to a file; `ready` is on stdout). And when the walkthrough moves to the other terminal it waits, as
//! a person switching windows does, until what was written on one device has reached the other
//! (every running device's changes acknowledged by its peers). Every wait is bounded; none is a
//! sleep. At the end each terminal stops its node with `kill %lsync`, which must print `stopped`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{WAIT, arg, eventually};

/// The README, read at test time.
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");

/// The section's heading.
const SECTION: &str = "## Try it: two devices in two terminals";

/// Where the walkthrough keeps its devices.
const DEMO: &str = "/tmp/lsync-demo";

/// The ports it uses.
const PORTS: [&str; 2] = ["127.0.0.1:7788", "127.0.0.1:7789"];

/// The longest a node may take to print its `ready` line.
const READY_WAIT: Duration = Duration::from_secs(60);

/// How often a running terminal is looked at again while waiting for its output.
const POLL: Duration = Duration::from_millis(50);

/// One shell block of the walkthrough, and the terminal it is pasted into.
#[derive(Debug)]
struct Block {
    terminal: usize,
    text: String,
}

/// The section's `sh` blocks after the `cargo install` one, each with its terminal (from the
/// `**Terminal N**` line before it).
fn walkthrough(readme: &str) -> Vec<Block> {
    let start = readme.find(SECTION).unwrap_or_else(|| panic!("README.md has no {SECTION:?}"));
    let section = &readme[start + SECTION.len()..];
    let section = section.find("\n## ").map_or(section, |end| &section[..end]);
    let mut blocks = Vec::new();
    let mut terminal = None;
    let mut installs = 0;
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("**Terminal ") {
            let number = rest.split("**").next().unwrap();
            terminal = Some(number.parse::<usize>().unwrap_or_else(|error| {
                panic!("{line:?}: terminal {number:?}: {error}");
            }));
        }
        if line.trim_end() != "```sh" {
            continue;
        }
        let mut text = String::new();
        for line in lines.by_ref() {
            if line.trim_end() == "```" {
                break;
            }
            text.push_str(line);
            text.push('\n');
        }
        if text.contains("cargo install") {
            installs += 1;
            assert!(terminal.is_none(), "the install block comes before the terminals");
            continue;
        }
        let terminal = terminal.unwrap_or_else(|| panic!("a block before any terminal:\n{text}"));
        blocks.push(Block { terminal, text });
    }
    assert_eq!(installs, 1, "one `cargo install` block");
    blocks
}

/// What a terminal printed.
#[derive(Debug)]
enum Line {
    Out(String),
    Err(String),
}

/// A terminal: a `bash -euo pipefail` reading what is pasted on its stdin, in a process group of
/// its own with the nodes it starts in the background, all killed when it is dropped.
struct Terminal {
    number: usize,
    bash: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Line>,
    /// Everything it printed so far, stdout and stderr as they came.
    transcript: Vec<String>,
    /// Lines of stdout so far (what `ready` lines are counted in).
    stdout: Vec<String>,
    pasted: usize,
    /// Where stdout stood when the node was asked to stop.
    stopping: usize,
    demo: PathBuf,
    opened: Instant,
}

impl Terminal {
    fn open(number: usize, demo: &Path, bin: &Path) -> Terminal {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin.to_owned()];
        paths.extend(std::env::split_paths(&path));
        let mut command = Command::new("bash");
        command
            .args(["-euo", "pipefail"])
            .env("PATH", std::env::join_paths(paths).unwrap())
            .current_dir(demo.parent().unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // The defaults a user gets: no settings inherited from the environment of the test run.
        for (name, _) in std::env::vars() {
            if name.starts_with("LSYNC_") || name == "RUST_LOG" {
                command.env_remove(name);
            }
        }
        let mut bash = command.spawn().expect("bash starts");
        let (sender, lines) = mpsc::channel();
        let stdout = bash.stdout.take().unwrap();
        let stderr = bash.stderr.take().unwrap();
        read_lines(stdout, sender.clone(), Line::Out);
        read_lines(stderr, sender, Line::Err);
        let stdin = bash.stdin.take();
        Terminal {
            number,
            bash,
            stdin,
            lines,
            transcript: Vec::new(),
            stdout: Vec::new(),
            pasted: 0,
            stopping: 0,
            demo: demo.to_owned(),
            opened: Instant::now(),
        }
    }

    /// Takes what the terminal printed so far, waiting up to `wait` for the first line.
    fn take(&mut self, wait: Duration) -> Option<String> {
        let line = match self.lines.recv_timeout(wait) {
            Ok(line) => line,
            Err(_) => return None,
        };
        let (text, shown) = match line {
            Line::Out(text) => {
                self.stdout.push(text.clone());
                (text.clone(), text)
            }
            Line::Err(text) => (String::new(), format!("(stderr) {text}")),
        };
        self.transcript.push(format!("[{:6.2?}] {shown}", self.opened.elapsed()));
        Some(text)
    }

    /// Fails the test with the transcript and the nodes' logs.
    fn fail(&mut self, what: &str) -> ! {
        // What is still in flight, for the record.
        while self.take(Duration::from_millis(200)).is_some() {}
        panic!(
            "terminal {}: {what}\n--- terminal {0} ---\n{}\n{}",
            self.number,
            self.transcript.join("\n"),
            logs(&self.demo)
        );
    }

    /// Pastes `block` and waits until it has run; returns what it printed on stdout. A failing
    /// command ends the shell (`-e`), which fails the test.
    fn paste(&mut self, block: &str) -> Vec<String> {
        self.pasted += 1;
        let marker = format!("__readme_block_{}_done__", self.pasted);
        let input = format!("{block}\necho {marker}\n");
        let stdin = self.stdin.as_mut().expect("the terminal is open");
        if let Err(error) = stdin.write_all(input.as_bytes()).and_then(|()| stdin.flush()) {
            self.fail(&format!("cannot paste ({error}):\n{block}"));
        }
        let first = self.stdout.len();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.take(POLL) {
                if line == marker {
                    let mut printed = self.stdout[first..].to_vec();
                    printed.pop();
                    return printed;
                }
                continue;
            }
            if let Some(status) = self.bash.try_wait().unwrap() {
                self.fail(&format!("the block failed ({status}):\n{block}"));
            }
            if Instant::now() > deadline {
                self.fail(&format!("the block did not end within {WAIT:?}:\n{block}"));
            }
        }
    }

    /// Waits until `count` `ready` lines were printed since stdout line `since`.
    fn wait_ready(&mut self, since: usize, count: usize) {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            let ready =
                self.stdout[since..].iter().filter(|line| line.starts_with("ready ")).count();
            if ready >= count {
                return;
            }
            if self.take(POLL).is_none() && Instant::now() > deadline {
                self.fail(&format!("no `ready` line within {READY_WAIT:?}"));
            }
        }
    }

    /// Stops the terminal's node as the README says, `kill %lsync`, and closes the terminal.
    fn stop_node(&mut self) {
        self.stopping = self.stdout.len();
        let stdin = self.stdin.as_mut().expect("the terminal is open");
        if let Err(error) = stdin.write_all(b"kill %lsync\nwait\n").and_then(|()| stdin.flush()) {
            self.fail(&format!("cannot paste `kill %lsync` ({error})"));
        }
        drop(self.stdin.take());
    }

    /// Waits until the node stopped, saying `stopped`, and the terminal ended without an error.
    fn wait_stopped(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.bash.try_wait().unwrap();
            let stopped = self.stdout[self.stopping..].iter().any(|line| line == "stopped");
            match status {
                Some(status) if status.success() && stopped => return,
                Some(status) if !status.success() => {
                    self.fail(&format!("the terminal ended with {status}"));
                }
                _ => {}
            }
            if self.take(POLL).is_none() && Instant::now() > deadline {
                self.fail("the node did not stop, or did not print `stopped`");
            }
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // A test that failed half-way leaves no node behind: the shell and everything it started
        // in the background share its process group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.bash.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.bash.wait();
    }
}

/// Forwards the lines of `stream` to `sender`.
fn read_lines(
    stream: impl Read + Send + 'static,
    sender: mpsc::Sender<Line>,
    wrap: fn(String) -> Line,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if sender.send(wrap(line)).is_err() {
                break;
            }
        }
    });
}

/// The walkthrough's node logs (`*.log` in its folder), for failure messages.
fn logs(demo: &Path) -> String {
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(demo) else { return out };
    let mut paths: Vec<PathBuf> =
        entries.filter_map(Result::ok).map(|entry| entry.path()).collect();
    paths.sort();
    for path in paths.into_iter().filter(|path| path.extension().is_some_and(|ext| ext == "log")) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        out.push_str(&format!("--- {} ---\n{tail}\n", path.display()));
    }
    out
}

/// Two UDP ports free on loopback now (QUIC listens on UDP).
fn free_ports() -> [u16; 2] {
    let first = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let second = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    [first.local_addr().unwrap().port(), second.local_addr().unwrap().port()]
}

/// `lsync --json status DIR` (of a device folder the walkthrough made).
fn status(dir: &Path) -> Option<serde_json::Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_lsync"))
        .args(["--json", "status", arg(dir)])
        .env_remove("RUST_LOG")
        .output()
        .ok()?;
    output.status.success().then(|| serde_json::from_slice(&output.stdout).ok()).flatten()
}

/// Waits until every device of the walkthrough whose node runs has had its shared changes
/// acknowledged by every paired device: what one terminal did has reached the other.
fn settle(demo: &Path) {
    let devices: Vec<PathBuf> = std::fs::read_dir(demo)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.join("config.toml").exists())
        .collect();
    eventually(
        "every device's changes acknowledged by its peers",
        || {
            devices
                .iter()
                .all(|dir| {
                    status(dir).is_some_and(|status| {
                        status["running"] == false
                            || status["peers"].as_array().unwrap().iter().all(|peer| {
                                peer["online"] == true && peer["lag"].as_u64() == Some(0)
                            })
                    })
                })
                .then_some(())
        },
        || {
            let states: Vec<String> =
                devices.iter().map(|dir| format!("{}: {:?}", dir.display(), status(dir))).collect();
            format!("{}\n{}", states.join("\n"), logs(demo))
        },
    );
}

/// How many `lsync run ... &` lines a block has: nodes it starts in the background.
fn nodes_started(block: &str) -> usize {
    block
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("lsync run ") && line.ends_with('&'))
        .count()
}

#[test]
fn the_readme_walkthrough_works_as_written() {
    let started = Instant::now();
    let readme = std::fs::read_to_string(README).expect("README.md");
    let blocks = walkthrough(&readme);
    let terminals: Vec<usize> = blocks.iter().map(|block| block.terminal).collect();
    assert_eq!(terminals, [1, 1, 2, 2, 1], "the walkthrough's blocks and terminals: {blocks:#?}");

    let root = tempfile::tempdir().unwrap();
    let demo = root.path().join("lsync-demo");
    let bin = root.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_lsync"), bin.join("lsync")).unwrap();
    let ports = free_ports();
    let pasted: Vec<String> = blocks
        .iter()
        .map(|block| {
            let mut text = block.text.replace(DEMO, arg(&demo));
            for (port, free) in PORTS.iter().zip(ports) {
                text = text.replace(port, &format!("127.0.0.1:{free}"));
            }
            text
        })
        .collect();
    for pattern in [DEMO].iter().chain(&PORTS) {
        assert!(
            blocks.iter().any(|block| block.text.contains(pattern)),
            "the walkthrough no longer uses {pattern:?}: update the test's substitutions"
        );
    }

    let mut terminals = [Terminal::open(1, &demo, &bin), Terminal::open(2, &demo, &bin)];
    let mut outputs = Vec::new();
    let mut previous = None;
    for (block, text) in blocks.iter().zip(&pasted) {
        if previous.is_some_and(|previous| previous != block.terminal) {
            settle(&demo);
        }
        previous = Some(block.terminal);
        let terminal = &mut terminals[block.terminal - 1];
        let since = terminal.stdout.len();
        let printed = terminal.paste(text);
        let nodes = nodes_started(text);
        if nodes > 0 {
            terminal.wait_ready(since, nodes);
        }
        outputs.push(printed);
    }

    // Desktop browses laptop's photos: beach.jpg is there.
    let listing = &outputs[3];
    assert!(
        listing.iter().any(|line| line.contains("beach.jpg")),
        "desktop's `lsync ls` lists beach.jpg:\n{}",
        listing.join("\n")
    );
    // On laptop, the tag desktop assigned, and desktop online.
    let last = &outputs[4];
    assert!(
        last.iter().any(|line| line.contains("beach.jpg") && line.contains("[holiday]")),
        "laptop's `lsync ls` shows beach.jpg tagged holiday:\n{}",
        last.join("\n")
    );
    assert!(
        last.iter().any(|line| line.starts_with("desktop ") && line.contains(" online ")),
        "laptop's `lsync status` shows desktop online:\n{}",
        last.join("\n")
    );

    // Both nodes stop as the README says, at the same time.
    for terminal in &mut terminals {
        terminal.stop_node();
    }
    for terminal in &mut terminals {
        terminal.wait_stopped();
    }
    for terminal in &terminals {
        eprintln!("--- terminal {} ---\n{}", terminal.number, terminal.transcript.join("\n"));
    }
    eprintln!("the walkthrough took {:.1?}", started.elapsed());
}

//! Everything the CLI prints. Answers go to stdout (as text for people, or as one line of JSON
//! with `--json`); hints, progress and errors go to stderr, so that `lsync invite a | ...` and
//! `--json` output stay clean for scripts. The renderers are plain functions from views to text,
//! tested below; printing happens only here.

// A command-line program's output is its interface: printing is the point of this module.
#![allow(clippy::print_stdout, clippy::print_stderr, reason = "the CLI's output module")]

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::error::CliError;
use crate::index::Counts;
use lsync_hlc::{DeviceId, Hlc, HlcTime};
use lsync_node::{BackfillPhase, BackfillProgress};

use crate::progress::{backfill_line, count, group_digits};
use crate::views::{BackfillView, IndexReport, PeersView, StatusView};

/// Prints a line of the answer.
pub(crate) fn answer(text: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (`lsync ... | head`) is not an error worth reporting.
    let _ = writeln!(stdout, "{}", text.trim_end_matches('\n'));
    let _ = stdout.flush();
}

/// Prints `value` as one line of JSON.
pub(crate) fn json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string(value).map_err(CliError::msg)?;
    answer(&text);
    Ok(())
}

/// Prints a hint for people on stderr.
pub(crate) fn note(text: &str) {
    eprintln!("{text}");
}

/// Prints an error on stderr, on one line.
pub(crate) fn error(error: &CliError) {
    eprintln!("lsync: error: {}", error.one_line());
}

/// Whether a progress line is on the terminal now (without a line break after it).
static PROGRESS_SHOWN: AtomicBool = AtomicBool::new(false);

/// Draws (or, with `None`, clears) the progress line at the bottom of the terminal.
pub(crate) fn progress_line(line: Option<&str>) {
    let mut stderr = std::io::stderr().lock();
    let _ = match line {
        Some(line) => write!(stderr, "\r\x1b[2K{line}"),
        None => write!(stderr, "\r\x1b[2K"),
    };
    PROGRESS_SHOWN.store(line.is_some(), Ordering::Release);
    let _ = stderr.flush();
}

/// Where log lines go: stderr, after clearing a progress line that is on the terminal (the next
/// redraw puts it back under the log line), so that the two never share a line.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = std::io::StderrLock<'static>;

    fn make_writer(&'a self) -> Self::Writer {
        let mut stderr = std::io::stderr().lock();
        if PROGRESS_SHOWN.swap(false, Ordering::AcqRel) {
            let _ = write!(stderr, "\r\x1b[2K");
        }
        stderr
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// `2026-03-01 14:05:09` (UTC) for milliseconds since the Unix epoch (times before 1970 show as
/// its start).
pub(crate) fn utc(ms: i64) -> String {
    // A stamp's readable form starts with its time as `2026-03-01T14:05:09.123Z` (a format
    // `Hlc`'s `FromStr` reads back): keep the date and the second, a space for the `T`.
    let time = HlcTime::from_physical_saturating(u64::try_from(ms).unwrap_or(0));
    let text = Hlc::new(time, DeviceId(uuid::Uuid::nil())).to_string();
    text.get(..19).unwrap_or(&text).replacen('T', " ", 1)
}

/// The notes after a peer's row: left behind by retention, a clock off by more than a second.
fn peer_notes(peer: &crate::views::PeerStatusView) -> String {
    let mut notes = Vec::new();
    if peer.needs_resync {
        notes.push("left behind by retention".to_owned());
    }
    if let Some(offset) = peer.clock_offset_ms.filter(|offset| offset.unsigned_abs() >= 1_000) {
        let seconds = offset.unsigned_abs() as f64 / 1_000.0;
        let way = if offset > 0 { "ahead" } else { "behind" };
        notes.push(format!("clock {seconds:.0} s {way}"));
    }
    notes.join(", ")
}

/// `now`, `12 s ago`, `5 min ago`, `3 h ago`, `2 d ago`.
pub(crate) fn ago(ms: u64, now_ms: u64) -> String {
    let seconds = now_ms.saturating_sub(ms) / 1_000;
    match seconds {
        0 => "now".to_owned(),
        1..60 => format!("{seconds} s ago"),
        60..3_600 => format!("{} min ago", seconds / 60),
        3_600..86_400 => format!("{} h ago", seconds / 3_600),
        _ => format!("{} d ago", seconds / 86_400),
    }
}

/// `0 B`, `999 B`, `1.2 kB`, `3.4 MB`, `5.6 GB` (powers of 1000).
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if n < 1_000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1_000.0;
    let mut unit = 0;
    while value >= 1_000.0 && unit < UNITS.len() - 1 {
        value /= 1_000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The first 8 characters of an id, for tables (the full id is in `--json` output).
pub(crate) fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Lays out rows as columns separated by two spaces, the last column unpadded.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[column]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `lsync status` for people.
pub(crate) fn status_text(status: &StatusView, now_ms: u64) -> String {
    let mut out = String::new();
    let backfill = &status.backfill;
    let _ = writeln!(out, "device   {}  {}", status.device, status.name);
    let _ = writeln!(out, "library  {}", status.library);
    if status.running {
        let _ = writeln!(out, "node     running, sync {}", status.sync);
    } else {
        let _ = writeln!(out, "node     not running (start it with `lsync run`)");
    }
    if status.state == "ready" {
        let _ = writeln!(out, "copy     ready");
    } else {
        let peer = backfill.peer_name.clone().or_else(|| backfill.peer.clone());
        let _ = writeln!(out, "copy     {}", backfill_text(backfill, peer.as_deref()));
    }
    if let Some(listen) = &status.listen {
        let _ = writeln!(out, "listen   {listen}");
    }
    if status.state != "ready" && !backfill.steps.is_empty() {
        let rows: Vec<Vec<String>> = backfill
            .steps
            .iter()
            .map(|step| {
                vec![
                    format!("  {}", step.step),
                    format!("{} of {}", group_digits(step.done), group_digits(step.total)),
                ]
            })
            .collect();
        out.push_str(&table(&rows));
    }
    out.push('\n');
    if status.peers.is_empty() {
        out.push_str("no paired devices (pair one with `lsync invite` and `lsync join`)\n");
    } else {
        let mut rows = vec![vec![
            "PEER".to_owned(),
            "DEVICE".to_owned(),
            "STATE".to_owned(),
            "LAST SEEN".to_owned(),
            "RTT".to_owned(),
            "LAG".to_owned(),
            "ROWS LAG".to_owned(),
            String::new(),
        ]];
        for peer in &status.peers {
            rows.push(vec![
                peer.name.clone(),
                short(&peer.device).to_owned(),
                if peer.online { "online" } else { "offline" }.to_owned(),
                peer.last_seen_ms.map_or_else(|| "never".to_owned(), |ms| ago(ms, now_ms)),
                peer.rtt_ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms")),
                group_digits(peer.lag),
                peer.rows_lag_ms.map_or_else(
                    || "none acked".to_owned(),
                    |ms| format!("{:.1} s", ms as f64 / 1_000.0),
                ),
                peer_notes(peer),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "peer log {} entries, parked {}, retry queue {}, waiting in batch {}",
        group_digits(status.log_entries),
        group_digits(status.parked),
        status.retry_queue,
        status.pending_batch_rows
    );
    let _ = writeln!(
        out,
        "batches sent {}, retried {}, clock ahead of wall clock by {} ms",
        group_digits(status.batches_sent),
        group_digits(status.retries),
        status.clock_lead_ms
    );
    if status.skewed_changes > 0 {
        let _ = writeln!(
            out,
            "{} changes came stamped too far ahead of this clock: a peer's clock is wrong",
            group_digits(status.skewed_changes)
        );
    }
    let name =
        |name: &Option<String>, id: &str| name.clone().unwrap_or_else(|| short(id).to_owned());
    if !status.shared_watermarks.is_empty() {
        out.push_str("\nshared changes applied, per origin\n");
        let rows: Vec<Vec<String>> = status
            .shared_watermarks
            .iter()
            .map(|mark| {
                vec![format!("  {}", name(&mark.origin_name, &mark.origin)), group_digits(mark.seq)]
            })
            .collect();
        out.push_str(&table(&rows));
    }
    if !status.state_watermarks.is_empty() {
        out.push_str("\ndevice-owned rows held, per owner and model (owner's clock)\n");
        let rows: Vec<Vec<String>> = status
            .state_watermarks
            .iter()
            .map(|mark| {
                vec![
                    format!("  {}", name(&mark.owner_name, &mark.owner)),
                    mark.model.clone(),
                    utc(i64::try_from(mark.version_ms).unwrap_or(i64::MAX)),
                ]
            })
            .collect();
        out.push_str(&table(&rows));
    }
    out
}

/// A backfill's state on one line, from its view (`backfilling from laptop: ...`).
fn backfill_text(backfill: &BackfillView, peer: Option<&str>) -> String {
    let phase = match backfill.phase.as_str() {
        "uninitialized" => BackfillPhase::Uninitialized,
        "backfilling" => BackfillPhase::Backfilling,
        "catching-up" => BackfillPhase::CatchingUp,
        "paused" => BackfillPhase::Paused,
        _ => BackfillPhase::Ready,
    };
    let progress = BackfillProgress {
        phase,
        peer: None,
        steps: Vec::new(),
        done: backfill.done,
        total: backfill.total,
        rate: backfill.rate,
        eta_secs: backfill.eta_secs,
    };
    backfill_line(&progress, peer)
}

/// `lsync peers` for people.
pub(crate) fn peers_text(peers: &PeersView, now_ms: u64) -> String {
    if peers.peers.is_empty() {
        return "no paired devices (pair one with `lsync invite` and `lsync join`)\n".to_owned();
    }
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "DEVICE".to_owned(),
        "STATE".to_owned(),
        "LAST SEEN".to_owned(),
        "ADDRESSES".to_owned(),
    ]];
    for peer in &peers.peers {
        let state = match (peers.running, peer.online) {
            (false, _) => "-",
            (true, true) => "online",
            (true, false) => "offline",
        };
        rows.push(vec![
            peer.name.clone(),
            peer.device.clone(),
            state.to_owned(),
            peer.last_seen_ms.map_or_else(|| "never".to_owned(), |ms| ago(ms, now_ms)),
            peer.addresses.join(" "),
        ]);
    }
    let mut out = table(&rows);
    if !peers.running {
        out.push_str("(the node is not running: who is online is not known)\n");
    }
    out
}

/// `lsync location add|rescan|remove` for people.
pub(crate) fn index_text(report: &IndexReport) -> String {
    let Counts { files, directories, bytes: size, added, updated, deleted, unchanged } =
        report.counts;
    let mut out = match report.action.as_str() {
        "removed" => {
            format!("removed location {} ({} entries)\n", report.path, group_digits(deleted))
        }
        action => format!(
            "{action} location {}: {}, {}, {}\n  {} added, {} updated, {} deleted, {} unchanged (walk {} ms, write {} ms)\n",
            report.path,
            count(files, "file", "files"),
            count(directories, "folder", "folders"),
            bytes(size),
            group_digits(added),
            group_digits(updated),
            group_digits(deleted),
            group_digits(unchanged),
            report.scan_ms,
            report.write_ms
        ),
    };
    if report.skipped > 0 {
        let _ = writeln!(
            out,
            "  {} skipped (symbolic links, special files, names that are not UTF-8)",
            group_digits(report.skipped)
        );
    }
    for dir in &report.unreadable {
        let _ = writeln!(out, "  could not read {dir} (its indexed content was kept)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::{PeerStatusView, SharedMarkView};

    #[test]
    fn utc_dates_follow_the_calendar() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14 22:13:20");
        assert_eq!(utc(-1_000), "1970-01-01 00:00:00");
    }

    #[test]
    fn sizes_and_ages_read_naturally() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_250), "1.2 kB");
        assert_eq!(bytes(3_400_000_000), "3.4 GB");
        assert_eq!(ago(10_000, 10_400), "now");
        assert_eq!(ago(0, 125_000), "2 min ago");
        assert_eq!(ago(0, 3 * 86_400_000), "3 d ago");
    }

    #[test]
    fn tables_align_columns() {
        let text = table(&[
            vec!["NAME".into(), "STATE".into(), "X".into()],
            vec!["laptop".into(), "on".into(), "".into()],
        ]);
        assert_eq!(text, "NAME    STATE  X\nlaptop  on\n");
    }

    #[test]
    fn status_shows_peers_queues_and_watermarks() {
        let status = StatusView {
            library: "0193aaaa-0000-7000-8000-000000000000".into(),
            device: "0192bbbb-0000-7000-8000-000000000000".into(),
            name: "laptop".into(),
            running: true,
            sync: "running".into(),
            state: "ready".into(),
            ready: true,
            backfill: BackfillView {
                phase: "ready".into(),
                peer: None,
                peer_name: None,
                steps: vec![],
                done: 0,
                total: 0,
                rate: 0.0,
                eta_secs: None,
            },
            listen: Some("0.0.0.0:7788".into()),
            peers: vec![PeerStatusView {
                device: "0194cccc-0000-7000-8000-000000000000".into(),
                name: "desktop".into(),
                online: true,
                last_seen_ms: Some(1_000),
                rtt_ms: Some(0.42),
                lag: 3,
                rows_lag_ms: Some(1_200),
                needs_resync: false,
                clock_offset_ms: None,
                acked_shared: vec![],
            }],
            shared_watermarks: vec![SharedMarkView {
                origin: "0192bbbb-0000-7000-8000-000000000000".into(),
                origin_name: Some("laptop".into()),
                seq: 1_234,
            }],
            state_watermarks: vec![],
            log_entries: 12,
            parked: 0,
            retry_queue: 1,
            pending_batch_rows: 0,
            clock_lead_ms: 0,
            batches_sent: 42,
            retries: 2,
            skewed_changes: 0,
        };
        let text = status_text(&status, 31_000);
        for expected in [
            "node     running, sync running",
            "copy     ready",
            "desktop  0194cccc  online  30 s ago   0.4 ms  3    1.2 s",
            "peer log 12 entries, parked 0, retry queue 1, waiting in batch 0",
            "  laptop  1,234",
        ] {
            assert!(text.lines().any(|line| line == expected), "missing {expected:?} in:\n{text}");
        }
    }
}

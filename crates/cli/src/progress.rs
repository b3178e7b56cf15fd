//! The progress line `lsync run` draws on a terminal while the device pulls from its peers: the
//! backfill of a device that just joined (rows done of the estimated total, rate, time left, as
//! the engine reports them in `Event::Backfill`), and the catch-up after every (re)connect (rows
//! received so far and the rate, counted from change events).
//!
//! Pure: [`Progress`] is fed events and the current time and renders a line; the node's shell
//! decides when to draw it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lsync_hlc::DeviceId;
use lsync_node::{BackfillPhase, BackfillProgress};

/// What the device is pulling from its peers.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// The current catch-up round: when it started and the rows received since.
    started: Instant,
    rows: u64,
    /// Online peers this device has not finished catching up from in this round.
    waiting: BTreeMap<DeviceId, String>,
    /// Names of the peers seen online, for the backfill line.
    names: BTreeMap<DeviceId, String>,
    /// The engine's latest backfill report while the copy is not ready.
    backfill: Option<BackfillProgress>,
}

impl Progress {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            started: now,
            rows: 0,
            waiting: BTreeMap::new(),
            names: BTreeMap::new(),
            backfill: None,
        }
    }

    /// A peer came online: a catch-up from it starts. Starts a new round if none was running.
    pub(crate) fn peer_online(&mut self, peer: DeviceId, name: String, now: Instant) {
        if self.waiting.is_empty() {
            self.started = now;
            self.rows = 0;
        }
        self.names.insert(peer, name.clone());
        self.waiting.insert(peer, name);
    }

    /// A peer went offline: its catch-up will not finish now.
    pub(crate) fn peer_offline(&mut self, peer: DeviceId) {
        self.waiting.remove(&peer);
    }

    /// The catch-up from `peer` finished. Returns the summary line when it was the last one and
    /// rows arrived in the round (a reconnect that brought nothing is not worth a line).
    pub(crate) fn caught_up(&mut self, peer: DeviceId, now: Instant) -> Option<String> {
        let name = self.waiting.remove(&peer)?;
        if !self.waiting.is_empty() || self.rows == 0 {
            return None;
        }
        let seconds = now.saturating_duration_since(self.started).as_secs_f64();
        Some(format!(
            "caught up{}: {} received in {seconds:.1} s",
            if name.is_empty() { String::new() } else { format!(" with {name}") },
            rows(self.rows)
        ))
    }

    /// Rows (or shared records) arrived from peers.
    pub(crate) fn received(&mut self, rows: u64) {
        self.rows = self.rows.saturating_add(rows);
    }

    /// The engine reported backfill progress. Returns the summary line when the backfill
    /// finished.
    pub(crate) fn backfill(&mut self, progress: BackfillProgress) -> Option<String> {
        if progress.phase != BackfillPhase::Ready {
            self.backfill = Some(progress);
            return None;
        }
        let finished = self.backfill.take()?;
        // The backfill's rows are not news again in the catch-up summary that follows.
        self.rows = 0;
        let from = progress.peer.or(finished.peer).map(|peer| self.name(peer)).unwrap_or_default();
        Some(format!(
            "backfill finished: {}{}",
            rows(progress.done.max(finished.done)),
            if from.is_empty() { String::new() } else { format!(" from {from}") }
        ))
    }

    fn name(&self, peer: DeviceId) -> String {
        self.names.get(&peer).cloned().unwrap_or_else(|| peer.to_string()[..8].to_owned())
    }

    /// The line to show now, if something is being pulled.
    pub(crate) fn line(&self, now: Instant) -> Option<String> {
        if let Some(backfill) = &self.backfill {
            let peer = backfill.peer.map(|peer| self.name(peer));
            return Some(backfill_line(backfill, peer.as_deref()));
        }
        if self.waiting.is_empty() {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.started);
        let names: Vec<&str> = self.waiting.values().map(String::as_str).collect();
        Some(format!(
            "catching up with {}: {} rows, {} rows/s",
            names.join(", "),
            group_digits(self.rows),
            group_digits(whole(rate(self.rows, elapsed)))
        ))
    }
}

/// `backfilling from laptop: 12,000 of 48,000 rows (25%), 4,000 rows/s, about 9 s left`.
pub(crate) fn backfill_line(progress: &BackfillProgress, peer: Option<&str>) -> String {
    let mut line = progress.phase.to_string();
    if let Some(peer) = peer {
        line.push_str(&format!(" from {peer}"));
    }
    if progress.phase == BackfillPhase::Uninitialized {
        line.push_str(": waiting for a complete peer to come online");
        return line;
    }
    let total = progress.total.max(progress.done);
    let percent = (progress.done * 100).checked_div(total).unwrap_or(100);
    line.push_str(&format!(
        ": {} of {} rows ({percent}%)",
        group_digits(progress.done),
        group_digits(total)
    ));
    if progress.rate > 0.0 {
        line.push_str(&format!(", {} rows/s", group_digits(whole(progress.rate))));
    }
    match progress.eta_secs.and_then(|secs| Duration::try_from_secs_f64(secs).ok()) {
        Some(left) if left < Duration::from_secs(1) => line.push_str(", almost done"),
        Some(left) => line.push_str(&format!(", about {} left", short_duration(left))),
        None => {}
    }
    line
}

/// Rows per second over `elapsed` (0 before any time passed).
pub(crate) fn rate(rows: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 { rows as f64 / seconds } else { 0.0 }
}

/// `value` rounded to a whole number, 0 for what is not a positive finite number.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "checked positive and finite; `as` saturates at u64::MAX"
)]
fn whole(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 { value.round() as u64 } else { 0 }
}

/// `1 row`, `12,000 rows`.
pub(crate) fn rows(n: u64) -> String {
    count(n, "row", "rows")
}

/// `n` with the noun in the right number: `1 entry`, `2,000 entries`.
pub(crate) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", group_digits(n), if n == 1 { one } else { many })
}

/// `12345678` as `12,345,678`.
pub(crate) fn group_digits(n: u64) -> String {
    let digits = n.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// `42 s`, `3 min 5 s`, `2 h 10 min`.
pub(crate) fn short_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3_600 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ => format!("{} h {} min", seconds / 3_600, (seconds % 3_600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_grouped_by_thousands() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1_000), "1,000");
        assert_eq!(group_digits(12_345_678), "12,345,678");
    }

    #[test]
    fn a_catch_up_round_shows_rows_and_rate_and_ends_with_a_summary() {
        let start = Instant::now();
        let (a, b) = (DeviceId::random(), DeviceId::random());
        let mut progress = Progress::new(start);
        assert_eq!(progress.line(start), None);
        progress.peer_online(a, "laptop".into(), start);
        progress.peer_online(b, "desktop".into(), start);
        progress.received(12_000);
        let names = if a < b { "laptop, desktop" } else { "desktop, laptop" };
        assert_eq!(
            progress.line(start + Duration::from_secs(3)).unwrap(),
            format!("catching up with {names}: 12,000 rows, 4,000 rows/s")
        );
        assert_eq!(progress.caught_up(a, start + Duration::from_secs(3)), None);
        assert_eq!(
            progress.caught_up(b, start + Duration::from_secs(4)).as_deref(),
            Some("caught up with desktop: 12,000 rows received in 4.0 s")
        );
        assert_eq!(progress.line(start), None);
        // A round that brought nothing ends silently.
        progress.peer_online(a, "laptop".into(), start);
        assert_eq!(progress.caught_up(a, start), None);
    }

    fn report(phase: BackfillPhase, peer: DeviceId, done: u64, total: u64) -> BackfillProgress {
        BackfillProgress {
            phase,
            peer: Some(peer),
            steps: vec![("entries".into(), done, total)],
            done,
            total,
            rate: 4_000.0,
            eta_secs: Some(9.2),
        }
    }

    #[test]
    fn a_backfill_shows_its_share_rate_and_time_left() {
        let start = Instant::now();
        let laptop = DeviceId::random();
        let mut progress = Progress::new(start);
        progress.peer_online(laptop, "laptop".into(), start);
        assert_eq!(
            progress.backfill(report(BackfillPhase::Backfilling, laptop, 12_000, 48_000)),
            None
        );
        assert_eq!(
            progress.line(start).unwrap(),
            "backfilling from laptop: 12,000 of 48,000 rows (25%), 4,000 rows/s, about 9 s left"
        );
        assert_eq!(
            progress.backfill(report(BackfillPhase::Ready, laptop, 48_000, 48_000)).as_deref(),
            Some("backfill finished: 48,000 rows from laptop")
        );
        // A copy that was ready all along reports nothing.
        assert_eq!(progress.backfill(report(BackfillPhase::Ready, laptop, 0, 0)), None);
        let waiting = BackfillProgress::idle(false);
        assert_eq!(
            backfill_line(&waiting, None),
            "uninitialized: waiting for a complete peer to come online"
        );
        assert_eq!(short_duration(Duration::from_secs(185)), "3 min 5 s");
        assert_eq!(short_duration(Duration::from_secs(7_800)), "2 h 10 min");
    }
}

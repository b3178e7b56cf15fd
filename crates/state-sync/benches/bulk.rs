//! Benchmark of bulk inserts of `entries` rows (issue 3): the batch API (`sql::write_local`) beside
//! raw sqlx inserts of the same rows into the same schema, measured in the same run.
//!
//! Scenarios, each on a fresh library file made by `Database::create` with the reference registry
//! and default `StoreOptions` (WAL, `synchronous=FULL`) unless it says otherwise:
//! - **batch API**: `write_local` with the rows in `Database::write` transactions of 10,000 and
//!   of 100,000 rows, then the faster of the two again with `Durability::Normal`.
//! - **raw one-per-row**: what a naive app does: one `INSERT` per row, 10,000 rows per
//!   transaction. It is slow, so it runs on fewer rows.
//! - **raw multi-row**: the physical limit of sqlx here: 500-row `INSERT` statements in key order,
//!   100,000 rows per transaction, straight into the library's `entries` table (the table, with
//!   the indexes `Registry::ddl` creates, and nothing of the sync bookkeeping).
//!
//! The rows are the same in every scenario: time-ordered UUIDv7 ids (what the library tells its
//! users to use) in key order, about 1 % directories, each file under one of the 16 directories
//! made last (as a directory walk yields them), names of 12–20 characters. Generating a
//! transaction's rows is not timed; turning them into `RowEdit`s or bound parameters is.
//!
//! Run with `cargo xtask bench bulk` (or `cargo bench -p lsync-state-sync --bench bulk`). Set
//! `LSYNC_BENCH_QUICK=1` for a short smoke run; `cargo test --all-targets` also runs it that way
//! (cargo passes `--bench` only when benchmarking). Prints a table, then one `BENCH {json}` line per
//! figure for `cargo xtask bench` to collect, then the peak RSS of the process.
#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]
#![allow(missing_docs, reason = "a benchmark binary has no API")]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a benchmark fails loudly")]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "row counts and random numbers are far below every limit they are cast to"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lsync_hlc::{Clock, DeviceId, HlcConfig, HlcGenerator, Resume, SystemClock};
use lsync_protocol::{LibraryId, Value};
use lsync_state_sync::sql::{RowEdit, write_local};
use lsync_store::sql::value_rows;
use lsync_store::{
    Database, Durability, ENTRY_KIND_DIRECTORY, ENTRY_KIND_FILE, StoreOptions, reference_registry,
};
use uuid::Uuid;

/// One directory every this many rows: about 1 % of the rows, as in a typical home folder.
const DIRECTORY_EVERY: u64 = 100;
/// Files go under one of the directories made last: a directory walk yields a directory, then
/// its files and subdirectories, so parents are recent.
const RECENT_DIRECTORIES: usize = 16;
/// The first id's time (2023-11-14); each row's id is one millisecond later than the last, so the
/// ids are strictly increasing whatever their random bits.
const BASE_MS: u64 = 1_700_000_000_000;
/// The location every entry belongs to.
const LOCATION: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_010c);
/// The columns of `entries`, system columns first, in table order.
const ENTRY_COLUMNS: &str =
    "id, owner, version, location_id, parent_id, name, kind, size, modified_at";
const ENTRY_PARAMS: usize = 9;
/// Rows per multi-row statement in the best-effort baseline: the library's own statement size
/// (`lsync_store::sql::MAX_ROWS_PER_STATEMENT`, measured in shared/measurements.md).
const BASELINE_STATEMENT_ROWS: usize = 500;
const FILE_EXTENSIONS: [&str; 6] = [".jpg", ".txt", ".pdf", ".mp3", ".png", ".doc"];

/// A small deterministic generator (SplitMix64): the same rows in every scenario and every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn name(&mut self, len: usize) -> String {
        (0..len).map(|_| char::from(b'a' + self.below(26) as u8)).collect()
    }
}

/// One `entries` row as an indexer finds it.
struct Entry {
    id: Uuid,
    parent: Option<Uuid>,
    name: String,
    kind: i64,
    size: i64,
    modified_at: i64,
}

impl Entry {
    /// The values in the model's column order, as `write_local` takes them.
    fn values(self) -> Vec<Value> {
        vec![
            Value::Blob(LOCATION.as_bytes().to_vec()),
            self.parent.map_or(Value::Null, |parent| Value::Blob(parent.as_bytes().to_vec())),
            Value::Text(self.name),
            Value::Integer(self.kind),
            Value::Integer(self.size),
            Value::Integer(self.modified_at),
        ]
    }
}

/// The rows of a file tree in the order a directory walk finds them (which is key order).
struct Entries {
    index: u64,
    random: SplitMix,
    recent_directories: Vec<Uuid>,
}

impl Entries {
    fn new() -> Self {
        Self { index: 0, random: SplitMix(0x6c73_796e_6362_756c), recent_directories: Vec::new() }
    }

    fn next_entry(&mut self) -> Entry {
        let random = &mut self.random;
        let mut tail = [0; 10];
        tail[..8].copy_from_slice(&random.next().to_le_bytes());
        tail[8..].copy_from_slice(&random.next().to_le_bytes()[..2]);
        let id = uuid::Builder::from_unix_timestamp_millis(BASE_MS + self.index, &tail).into_uuid();
        let parent = match self.recent_directories.len() {
            0 => None,
            n => Some(self.recent_directories[random.below(n as u64) as usize]),
        };
        let modified_at = (BASE_MS - random.below(5 * 365 * 86_400_000)) as i64;
        let entry = if self.index.is_multiple_of(DIRECTORY_EVERY) {
            if self.recent_directories.len() == RECENT_DIRECTORIES {
                self.recent_directories.remove(0);
            }
            self.recent_directories.push(id);
            let len = 12 + random.below(9) as usize;
            Entry {
                id,
                parent,
                name: random.name(len),
                kind: ENTRY_KIND_DIRECTORY,
                size: 0,
                modified_at,
            }
        } else {
            let extension = FILE_EXTENSIONS[random.below(FILE_EXTENSIONS.len() as u64) as usize];
            let len = 8 + random.below(9) as usize;
            Entry {
                id,
                parent,
                name: random.name(len) + extension,
                kind: ENTRY_KIND_FILE,
                size: random.below(10 << 20) as i64,
                modified_at,
            }
        };
        self.index += 1;
        entry
    }

    fn take(&mut self, rows: u64) -> Vec<Entry> {
        (0..rows).map(|_| self.next_entry()).collect()
    }
}

/// What one scenario measured.
struct Outcome {
    rows: u64,
    elapsed: Duration,
    /// Peak resident memory during the scenario, in KiB, when the kernel lets it be reset.
    peak_rss_kib: Option<u64>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64()
    }
}

/// A fresh library file (the directory is deleted when dropped).
async fn fresh_library(durability: Durability) -> (Database, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let options = StoreOptions { durability, ..StoreOptions::default() };
    let db = Database::create(
        &dir.path().join("library.db"),
        Arc::new(reference_registry().expect("reference registry")),
        LibraryId(Uuid::new_v4()),
        DeviceId::random(),
        &options,
    )
    .await
    .expect("library created");
    (db, dir)
}

/// Checks that every row landed, then closes the library.
async fn finish(db: Database, rows: u64) {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM entries")
        .fetch_one(db.reader())
        .await
        .expect("count entries");
    assert_eq!(count as u64, rows, "every row is in the table");
    db.close().await.expect("library closed");
}

/// Rows of `Entries` in transactions of `tx_rows`, each written by `write`; only `write` is timed.
async fn measure<F>(rows: u64, tx_rows: u64, mut write: F) -> Duration
where
    F: AsyncFnMut(Vec<Entry>),
{
    let mut entries = Entries::new();
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < rows {
        let batch = entries.take(tx_rows.min(rows - done));
        done += batch.len() as u64;
        let start = Instant::now();
        write(batch).await;
        elapsed += start.elapsed();
    }
    elapsed
}

async fn batch_api(rows: u64, tx_rows: u64, durability: Durability) -> Outcome {
    let (db, _dir) = fresh_library(durability).await;
    let clock = HlcGenerator::new(
        db.identity().device,
        SystemClock,
        HlcConfig::default(),
        Resume::FirstStart,
    );
    let registry = db.registry().clone();
    reset_peak_rss();
    let elapsed = measure(rows, tx_rows, async |batch| {
        let edits: Vec<RowEdit> = batch
            .into_iter()
            .map(|entry| RowEdit::Upsert { id: entry.id, values: entry.values() })
            .collect();
        let now_ms = SystemClock.now_ms();
        let (stamped, applied) = db
            .write(async |conn| {
                write_local(conn, &registry, &clock, "entries", edits, now_ms).await
            })
            .await
            .expect("batch written");
        assert_eq!(stamped.len(), applied.upserted.len(), "every row is new");
    })
    .await;
    let peak_rss_kib = peak_rss_kib_since_reset();
    finish(db, rows).await;
    Outcome { rows, elapsed, peak_rss_kib }
}

/// Binds one entry's nine columns.
fn bind_entry<'q>(
    query: lsync_store::sql::Query<'q>,
    entry: &'q Entry,
    owner: &'q [u8],
    version: i64,
) -> lsync_store::sql::Query<'q> {
    query
        .bind(entry.id.as_bytes().as_slice())
        .bind(owner)
        .bind(version)
        .bind(LOCATION.as_bytes().as_slice())
        .bind(entry.parent.as_ref().map(|parent| parent.as_bytes().as_slice()))
        .bind(entry.name.as_str())
        .bind(entry.kind)
        .bind(entry.size)
        .bind(entry.modified_at)
}

/// A version for raw rows: increasing, shaped like the library's packed HLC times.
fn raw_version(counter: &mut i64) -> i64 {
    *counter += 1;
    ((BASE_MS as i64) << 16) + *counter
}

async fn raw_one_per_row(rows: u64, tx_rows: u64) -> Outcome {
    let (db, _dir) = fresh_library(Durability::Full).await;
    let owner = db.identity().device;
    let sql =
        format!("INSERT INTO entries ({ENTRY_COLUMNS}) VALUES {}", value_rows(1, ENTRY_PARAMS));
    let mut version = 0;
    reset_peak_rss();
    let elapsed = measure(rows, tx_rows, async |batch| {
        db.write(async |conn| {
            for entry in &batch {
                let query = sqlx::query(&sql);
                bind_entry(query, entry, owner.as_bytes(), raw_version(&mut version))
                    .execute(&mut *conn)
                    .await?;
            }
            Ok::<_, lsync_store::StoreError>(())
        })
        .await
        .expect("rows inserted");
    })
    .await;
    let peak_rss_kib = peak_rss_kib_since_reset();
    finish(db, rows).await;
    Outcome { rows, elapsed, peak_rss_kib }
}

async fn raw_multi_row(rows: u64, tx_rows: u64) -> Outcome {
    let (db, _dir) = fresh_library(Durability::Full).await;
    let owner = db.identity().device;
    let statement = |rows| {
        format!("INSERT INTO entries ({ENTRY_COLUMNS}) VALUES {}", value_rows(rows, ENTRY_PARAMS))
    };
    let full = statement(BASELINE_STATEMENT_ROWS);
    let mut version = 0;
    reset_peak_rss();
    let elapsed = measure(rows, tx_rows, async |batch| {
        db.write(async |conn| {
            for chunk in batch.chunks(BASELINE_STATEMENT_ROWS) {
                let partial;
                let sql = if chunk.len() == BASELINE_STATEMENT_ROWS {
                    &full
                } else {
                    partial = statement(chunk.len());
                    &partial
                };
                let mut query = sqlx::query(sql);
                for entry in chunk {
                    query = bind_entry(query, entry, owner.as_bytes(), raw_version(&mut version));
                }
                query.execute(&mut *conn).await?;
            }
            Ok::<_, lsync_store::StoreError>(())
        })
        .await
        .expect("rows inserted");
    })
    .await;
    let peak_rss_kib = peak_rss_kib_since_reset();
    finish(db, rows).await;
    Outcome { rows, elapsed, peak_rss_kib }
}

/// A field of /proc/self/status in KiB (`VmHWM` is the peak resident set).
fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.trim_start_matches(field)
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The process's peak RSS before the first reset, kept to report the whole run's peak.
static PEAK_BEFORE_RESETS: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
static RESET_WORKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Resets the peak RSS to the current RSS (Linux 4.0+: write 5 to /proc/self/clear_refs), so that
/// each scenario's peak is its own.
fn reset_peak_rss() {
    let before = proc_status_kib("VmHWM").unwrap_or(0);
    let mut peak = PEAK_BEFORE_RESETS.lock().expect("peak lock");
    *peak = (*peak).max(before);
    let works = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    RESET_WORKS.store(works, std::sync::atomic::Ordering::Relaxed);
}

fn peak_rss_kib_since_reset() -> Option<u64> {
    let peak = proc_status_kib("VmHWM")?;
    let mut whole_run = PEAK_BEFORE_RESETS.lock().expect("peak lock");
    *whole_run = (*whole_run).max(peak);
    RESET_WORKS.load(std::sync::atomic::Ordering::Relaxed).then_some(peak)
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "n/a".to_owned(), |kib| format!("{:.0} MiB", kib as f64 / 1024.0))
}

/// `1234567` as `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn row(name: &str, tx_rows: u64, outcome: &Outcome) {
    println!(
        "{name:<42} {:>10} {:>8} {:>8.2} s {:>9} rows/s {:>9}",
        thousands(outcome.rows),
        thousands(tx_rows),
        outcome.elapsed.as_secs_f64(),
        thousands(outcome.rate().round() as u64),
        mib(outcome.peak_rss_kib)
    );
}

fn report(name: &str, figure: f64, baseline_name: &str, baseline: f64) {
    let ratio = figure / baseline;
    println!(
        "{name:<48} {figure:>10.0} rows/s   {baseline_name:<30} {baseline:>10.0} rows/s   ratio {ratio:.3}"
    );
    println!(
        "BENCH {{\"name\":\"{name}\",\"figure\":{figure:.0},\"unit\":\"rows/s\",\"baseline\":{baseline:.0},\"baseline_name\":\"{baseline_name}\",\"ratio\":{ratio:.3}}}"
    );
}

fn main() {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let quick = !benchmarking || std::env::var_os("LSYNC_BENCH_QUICK").is_some();
    // The one-per-row baseline runs at about 6,000 rows/s here (shared/measurements.md), so it
    // gets a tenth of the rows: its rate does not depend on the table size at that scale.
    let (rows, one_per_row_rows) = if quick { (50_000, 10_000) } else { (1_000_000, 100_000) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        println!(
            "{:<42} {:>10} {:>8} {:>10} {:>16} {:>9}",
            "scenario (synchronous=FULL unless said)",
            "rows",
            "tx rows",
            "time",
            "rate",
            "peak RSS"
        );
        let batch_small = batch_api(rows, 10_000, Durability::Full).await;
        row("batch API write_local", 10_000, &batch_small);
        let batch_large = batch_api(rows, 100_000, Durability::Full).await;
        row("batch API write_local", 100_000, &batch_large);
        let (best_tx_rows, best) = if batch_large.rate() > batch_small.rate() {
            (100_000, &batch_large)
        } else {
            (10_000, &batch_small)
        };
        let batch_normal = batch_api(rows, best_tx_rows, Durability::Normal).await;
        row("batch API write_local, synchronous=NORMAL", best_tx_rows, &batch_normal);
        let one_per_row = raw_one_per_row(one_per_row_rows, 10_000).await;
        row("raw sqlx, one INSERT per row", 10_000, &one_per_row);
        let multi_row = raw_multi_row(rows, 100_000).await;
        row("raw sqlx, 500-row INSERTs", 100_000, &multi_row);
        println!();
        println!("batch API best: {best_tx_rows} rows per transaction");
        report(
            "bulk batch-api 10k tx vs raw multi-row",
            batch_small.rate(),
            "raw multi-row",
            multi_row.rate(),
        );
        report(
            "bulk batch-api 100k tx vs raw multi-row",
            batch_large.rate(),
            "raw multi-row",
            multi_row.rate(),
        );
        report(
            "bulk batch-api vs raw one-per-row",
            best.rate(),
            "raw one-per-row",
            one_per_row.rate(),
        );
        report("bulk batch-api vs raw multi-row", best.rate(), "raw multi-row", multi_row.rate());
        report(
            "bulk batch-api normal vs batch-api full",
            batch_normal.rate(),
            "batch-api full",
            best.rate(),
        );
    });
    let _ = peak_rss_kib_since_reset();
    let whole_run = *PEAK_BEFORE_RESETS.lock().expect("peak lock");
    println!("peak RSS of the process (VmHWM): {}", mib(Some(whole_run)));
}

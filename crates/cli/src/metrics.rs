//! Prometheus metrics: a `metrics` recorder that keeps every counter, gauge and histogram in
//! memory, the text exposition format (version 0.0.4) it renders, and the small HTTP responder
//! that serves it on a loopback address.
//!
//! Why not `metrics-exporter-prometheus`: without its HTTP listener and push gateway it still
//! brings `metrics-util` and with it about twenty crates (evmap, left-right, crossbeam-epoch,
//! quanta, rand, sketches-ddsketch) to a build that runs on two cores, while what the node needs
//! is three atomic maps and a renderer of a page of text. Histograms are rendered as Prometheus
//! histograms with fixed buckets ([`SECONDS_BUCKETS`] for `*_seconds`, [`COUNT_BUCKETS`]
//! otherwise), which aggregate across devices, unlike client-side quantiles.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bucket bounds of histograms measured in seconds (apply time, round trips, replication lag):
/// from 1 ms (a small transaction, a loopback round trip) to 1 minute (a large backfill page on a
/// slow disk, a peer that was offline), roughly ×2.5 apart.
pub(crate) const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Bucket bounds of the other histograms (rows per batch): 1 row to the protocol's 10,000-row
/// page, by decades with the default 5,000-row batch in between.
pub(crate) const COUNT_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0];

/// How long the responder waits for a scraper's request: 5 s, Prometheus' default scrape
/// timeout is 10 s and a request is one short line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The most bytes of a request read: 8 KiB, more than any `GET /metrics` with its headers.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// One histogram: cumulative-ready bucket counts, the sum and the count.
#[derive(Debug)]
struct Buckets {
    bounds: &'static [f64],
    /// Observations at most `bounds[i]` but above `bounds[i - 1]`; the last slot is above all.
    counts: Vec<AtomicU64>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        let slot =
            self.bounds.iter().position(|bound| value <= *bound).unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let _ = self.sum.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }
}

#[derive(Debug, Default)]
struct Series {
    counters: BTreeMap<Key, Arc<AtomicU64>>,
    /// Gauges hold `f64` bits (the `metrics` crate's `GaugeFn` for `AtomicU64`).
    gauges: BTreeMap<Key, Arc<AtomicU64>>,
    histograms: BTreeMap<Key, Arc<Buckets>>,
    descriptions: BTreeMap<String, String>,
}

/// The recorder: install it with [`metrics::set_global_recorder`], render with
/// [`Recorder::render`] (clones share the same series).
#[derive(Debug, Clone, Default)]
pub(crate) struct Recorder {
    series: Arc<Mutex<Series>>,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, Series> {
        // Every critical section is one map operation: a panic elsewhere leaves the maps whole.
        self.series.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn describe(&self, key: KeyName, description: SharedString) {
        self.lock().descriptions.insert(key.as_str().to_owned(), description.into_owned());
    }

    /// Every series in the Prometheus text format, version 0.0.4.
    pub(crate) fn render(&self) -> String {
        let series = self.lock();
        let mut out = String::new();
        let mut last_name = String::new();
        let mut header = |out: &mut String, name: &str, kind: &str| {
            if last_name != name {
                if let Some(help) = series.descriptions.get(name) {
                    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
                }
                let _ = writeln!(out, "# TYPE {name} {kind}");
                name.clone_into(&mut last_name);
            }
        };
        for (key, value) in &series.counters {
            header(&mut out, key.name(), "counter");
            let _ = writeln!(
                out,
                "{}{} {}",
                key.name(),
                labels(key, None),
                value.load(Ordering::Acquire)
            );
        }
        for (key, value) in &series.gauges {
            header(&mut out, key.name(), "gauge");
            let value = f64::from_bits(value.load(Ordering::Acquire));
            let _ = writeln!(out, "{}{} {}", key.name(), labels(key, None), number(value));
        }
        for (key, buckets) in &series.histograms {
            let name = key.name();
            header(&mut out, name, "histogram");
            let mut cumulative = 0u64;
            for (index, bound) in buckets.bounds.iter().enumerate() {
                cumulative += buckets.counts[index].load(Ordering::Acquire);
                let le = number(*bound);
                let _ = writeln!(out, "{name}_bucket{} {cumulative}", labels(key, Some(&le)));
            }
            cumulative += buckets.counts[buckets.bounds.len()].load(Ordering::Acquire);
            let _ = writeln!(out, "{name}_bucket{} {cumulative}", labels(key, Some("+Inf")));
            let sum = f64::from_bits(buckets.sum.load(Ordering::Acquire));
            let _ = writeln!(out, "{name}_sum{} {}", labels(key, None), number(sum));
            let _ = writeln!(out, "{name}_count{} {cumulative}", labels(key, None));
        }
        out
    }
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.lock().counters.entry(key.clone()).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(
            self.lock()
                .gauges
                .entry(key.clone())
                .or_insert_with(|| Arc::new(AtomicU64::new(0f64.to_bits())))
                .clone(),
        )
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let bounds = if key.name().ends_with("_seconds") { SECONDS_BUCKETS } else { COUNT_BUCKETS };
        Histogram::from_arc(
            self.lock()
                .histograms
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Buckets::new(bounds)))
                .clone(),
        )
    }
}

/// `{a="1",b="2"}` (with `le` last for a bucket), or nothing without labels.
fn labels(key: &Key, le: Option<&str>) -> String {
    let mut pairs: Vec<String> = key
        .labels()
        .map(|label| format!("{}=\"{}\"", label.key(), escape_label(label.value())))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if pairs.is_empty() { String::new() } else { format!("{{{}}}", pairs.join(",")) }
}

/// A sample value as Prometheus writes it: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf".to_owned() } else { "-Inf".to_owned() }
    } else {
        format!("{value}")
    }
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Serves `GET /metrics` on `listener` with `recorder`'s text until the task is dropped; any
/// other path is a 404, any other method a 405.
pub(crate) async fn serve(listener: TcpListener, recorder: Recorder) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, &recorder).await {
                tracing::debug!(%error, "metrics request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, recorder: &Recorder) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    // Only the request line matters; read until the end of the headers (or the limit).
    let read = async {
        while !request.windows(4).any(|window| window == b"\r\n\r\n")
            && request.len() < MAX_REQUEST_BYTES
        {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let line = String::from_utf8_lossy(&request);
    let mut words = line.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let (status, content_type, body) = match (method, path.split('?').next()) {
        ("GET", Some("/metrics")) => {
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", recorder.render())
        }
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "GET only\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Installs a recorder as the process's `metrics` recorder and binds its endpoint on `address`
/// (a loopback address; the configuration refuses others). Returns the bound address and the
/// serving task's future.
pub(crate) async fn start(
    address: SocketAddr,
) -> Result<(SocketAddr, impl Future<Output = ()>), String> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|error| format!("cannot serve metrics on {address}: {error}"))?;
    let bound = listener.local_addr().map_err(|error| error.to_string())?;
    let recorder = Recorder::default();
    metrics::set_global_recorder(recorder.clone())
        .map_err(|_| "a metrics recorder is already installed".to_owned())?;
    Ok((bound, serve(listener, recorder)))
}

#[cfg(test)]
mod tests {
    use metrics::Recorder as _;

    use super::*;

    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<metrics::Label> =
            labels.iter().map(|(k, v)| metrics::Label::new(*k, *v)).collect();
        Key::from_parts(name, labels)
    }

    const META: Metadata<'static> = Metadata::new("test", metrics::Level::INFO, None);

    #[test]
    fn renders_counters_gauges_and_histograms_in_the_text_format() {
        let recorder = Recorder::default();
        recorder.describe_counter(
            KeyName::from_const_str("lsync_retries_total"),
            None,
            SharedString::const_str("Batches sent again"),
        );
        recorder.register_counter(&key("lsync_retries_total", &[]), &META).increment(3);
        recorder
            .register_counter(&key("lsync_changes_applied_total", &[("kind", "shared")]), &META)
            .increment(2);
        recorder
            .register_counter(&key("lsync_changes_applied_total", &[("kind", "state")]), &META)
            .increment(5);
        recorder.register_gauge(&key("lsync_peers_online", &[]), &META).set(2.0);
        let rtt = recorder.register_histogram(&key("lsync_peer_rtt_seconds", &[]), &META);
        rtt.record(0.0004);
        rtt.record(0.02);
        rtt.record(120.0);
        recorder.register_histogram(&key("lsync_batch_rows", &[]), &META).record(4_000.0);

        let text = recorder.render();
        let expected_lines = [
            "# TYPE lsync_changes_applied_total counter",
            "lsync_changes_applied_total{kind=\"shared\"} 2",
            "lsync_changes_applied_total{kind=\"state\"} 5",
            "# HELP lsync_retries_total Batches sent again",
            "# TYPE lsync_retries_total counter",
            "lsync_retries_total 3",
            "# TYPE lsync_peers_online gauge",
            "lsync_peers_online 2",
            "# TYPE lsync_peer_rtt_seconds histogram",
            "lsync_peer_rtt_seconds_bucket{le=\"0.001\"} 1",
            "lsync_peer_rtt_seconds_bucket{le=\"0.01\"} 1",
            "lsync_peer_rtt_seconds_bucket{le=\"0.025\"} 2",
            "lsync_peer_rtt_seconds_bucket{le=\"60\"} 2",
            "lsync_peer_rtt_seconds_bucket{le=\"+Inf\"} 3",
            "lsync_peer_rtt_seconds_sum 120.0204",
            "lsync_peer_rtt_seconds_count 3",
            "lsync_batch_rows_bucket{le=\"1000\"} 0",
            "lsync_batch_rows_bucket{le=\"5000\"} 1",
        ];
        for line in expected_lines {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        // One TYPE line per metric name.
        assert_eq!(text.matches("# TYPE lsync_changes_applied_total").count(), 1);
    }

    #[test]
    fn label_values_are_escaped() {
        let recorder = Recorder::default();
        recorder.register_counter(&key("x_total", &[("actor", "a\"b\\c\nd")]), &META).increment(1);
        assert!(recorder.render().contains("x_total{actor=\"a\\\"b\\\\c\\nd\"} 1"));
    }

    #[tokio::test]
    async fn serves_the_text_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let recorder = Recorder::default();
        recorder.register_counter(&key("lsync_retries_total", &[]), &META).increment(7);
        let server = tokio::spawn(serve(listener, recorder));
        let fetch = |request: &'static str| async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        let ok = fetch("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"));
        assert!(ok.ends_with("lsync_retries_total 7\n"), "{ok}");
        assert!(fetch("GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(fetch("POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        server.abort();
    }
}

//! `lsync run`: the node. Opens the library, starts the QUIC transport and the sync engine,
//! serves the control endpoint and (if configured) Prometheus metrics, says `ready` once its copy
//! of the library is complete (at once, unless it backfills), logs what happens, draws
//! catch-up progress on a terminal, and on SIGINT or SIGTERM stops in order: no new control
//! requests, the ones in progress finish, then the library closes (flush, persist, stop the
//! transport). A second signal while stopping exits at once.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lsync_node::config::SyncConfig;
use lsync_node::{Event, Library};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;
use crate::control::{ControlInfo, ControlServer};
use crate::error::{CliError, Context};
use crate::home::Home;
use crate::ops::{self, Device};
use crate::output;
use crate::progress::Progress;

/// What is logged when `RUST_LOG` is not set: lsync's own news at `info`, everything else only
/// when something is wrong.
pub(crate) const DEFAULT_LOG_FILTER: &str =
    "warn,lsync_cli=info,lsync_node=info,lsync_transport=info";

/// How often the progress line is redrawn: 5 times a second, smooth without flooding a slow
/// terminal.
const PROGRESS_REDRAW: Duration = Duration::from_millis(200);

/// Sets up logging to stderr. `RUST_LOG` filters (an invalid filter is an error, not ignored);
/// without it, `default` applies, or nothing is logged if `default` is `None`.
pub(crate) fn init_logging(format: LogFormat, default: Option<&str>) -> Result<(), CliError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(text) => EnvFilter::try_new(&text).context(|| format!("RUST_LOG={text:?}"))?,
        Err(_) => match default {
            Some(default) => EnvFilter::new(default),
            None => return Ok(()),
        },
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(output::LogWriter);
    // Another subscriber already installed (tests) is fine: its output is used.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

/// What `lsync run` prints once it is ready: its copy is complete (a backfill, if one was needed,
/// finished), so that commands see the whole library and may write shared data.
#[derive(Debug, Serialize)]
struct Ready {
    device: String,
    name: String,
    library: String,
    listen: String,
    control: String,
    metrics: Option<String>,
    pid: u32,
}

/// SIGINT and SIGTERM.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, CliError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt()).context(|| "SIGINT".to_owned())?,
                terminate: signal(SignalKind::terminate()).context(|| "SIGTERM".to_owned())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

/// Opens the device's library with `config`.
pub(crate) async fn open_library(home: &Home, config: &SyncConfig) -> Result<Library, CliError> {
    let registry = Arc::new(lsync_store::reference_registry().map_err(CliError::msg)?);
    Library::open(&home.library_path(), registry, config.clone())
        .await
        .context(|| format!("cannot open the library in {}", home.shown()))
}

/// Runs the node until a signal.
pub(crate) async fn run(
    home: &Home,
    listen: Option<String>,
    log_format: LogFormat,
    json: bool,
) -> Result<(), CliError> {
    home.require_device()?;
    let mut config = home.load_config()?;
    if let Some(listen) = listen {
        config.listen = listen;
        config.validate().map_err(CliError::msg)?;
    }
    init_logging(log_format, Some(DEFAULT_LOG_FILTER))?;
    let Some(lock) = home.try_lock()? else {
        let pid = ControlInfo::read(home).map(|info| format!(" (pid {})", info.pid));
        return Err(CliError::msg(format!(
            "{} is in use: a node already runs for it{}, or another lsync command is working on it",
            home.shown(),
            pid.unwrap_or_default()
        )));
    };
    // Signals are caught from here on, so that a stop request during start-up is not lost.
    let mut signals = Signals::new()?;

    let metrics = match &config.metrics_listen {
        Some(text) => {
            let address: SocketAddr = text.parse().map_err(|error| {
                CliError::msg(format!(
                    "metrics_listen {text:?} is not an address and port: {error}"
                ))
            })?;
            let (bound, serve) = crate::metrics::start(address).await.map_err(CliError::msg)?;
            tokio::spawn(serve);
            Some(bound)
        }
        None => None,
    };

    let library = open_library(home, &config).await?;
    let events = library.subscribe();
    // Taken before sync starts, so that a backfill finishing at once is not missed.
    let completion = library.subscribe();
    ops::ensure_device_row(&library, &config.device_name).await?;
    let (transport, transport_events) =
        ops::start_transport(home, &library, &config, false).await?;
    let listen = transport.local_addr().context(|| "the transport has no address".to_owned())?;
    library.start_sync(transport.clone(), transport_events).await.map_err(ops::library_error)?;
    let identity = library.identity();
    let device = Arc::new(Device {
        home: home.clone(),
        library: library.clone(),
        config: config.clone(),
        transport: Some(transport),
    });
    let (server, control) = ControlServer::start(home).await?;

    let progress = Arc::new(Mutex::new(Progress::new(Instant::now())));
    let terminal = std::io::stderr().is_terminal() && log_format == LogFormat::Text;
    tokio::spawn(watch_events(events, progress.clone(), terminal));
    if terminal {
        tokio::spawn(draw_progress(progress));
    }

    let ready = Ready {
        device: identity.device.to_string(),
        name: config.device_name.clone(),
        library: identity.library.to_string(),
        listen: listen.to_string(),
        control: control.to_string(),
        metrics: metrics.map(|address| format!("http://{address}/metrics")),
        pid: std::process::id(),
    };
    // `ready` means ready to use: the whole library is here and shared data can be written. A
    // copy that is not complete yet (a device that just joined, one resyncing after a restore)
    // backfills first, while the control endpoint already serves `lsync status` and the rest.
    let wait = !library.is_ready() && config.enabled;
    if !json {
        output::answer(&header_text(&ready));
        if !library.is_ready() {
            output::answer(if config.enabled {
                "copy     incomplete: backfilling first (`lsync status` shows how far)"
            } else {
                "copy     not complete, and sync is off (enabled = false): it cannot backfill"
            });
        }
    }
    if wait {
        info!(device = %identity.device, %listen, "node started; the copy backfills");
    }
    let announce = tokio::spawn({
        let library = library.clone();
        async move {
            if wait {
                copy_complete(&library, completion).await;
            }
            if json {
                if let Err(error) = output::json(&ready) {
                    output::error(&error);
                }
            } else {
                output::answer(READY_LINE);
            }
            info!(device = %identity.device, %listen, "node ready");
        }
    });

    let (stop_sender, stop_receiver) = tokio::sync::oneshot::channel::<&'static str>();
    tokio::spawn(async move {
        let signal = signals.next().await;
        let _ = stop_sender.send(signal);
        // A second signal while stopping: the user wants out now. Committed writes are safe
        // (SQLite); what was waiting to be sent goes at the next start, through catch-up.
        let signal = signals.next().await;
        output::note(&format!("lsync: {signal} again: exiting without waiting"));
        std::process::exit(130);
    });
    let stop = async move {
        let signal = stop_receiver.await.unwrap_or("shutdown");
        info!(signal, "stopping");
    };
    server.serve(device.clone(), stop).await;
    // Stopped before the copy was complete: never `ready`.
    announce.abort();

    drop(device);
    let closed = library.close().await;
    let _ = std::fs::remove_file(home.control_path());
    drop(lock);
    closed.map_err(ops::library_error)?;
    if json {
        output::json(&serde_json::json!({ "stopped": true }))?;
    } else {
        output::answer("stopped");
    }
    Ok(())
}

/// The last line `lsync run` prints once it is ready (as text).
const READY_LINE: &str = "ready    (stop with Ctrl-C)";

/// How often the wait for a complete copy looks again when no event came.
const COMPLETE_RECHECK: Duration = Duration::from_secs(1);

/// What `lsync run` prints as text once it is started, before its `ready` line.
fn header_text(ready: &Ready) -> String {
    let mut lines = vec![
        format!("device   {}  {}", ready.device, ready.name),
        format!("library  {}", ready.library),
        format!("sync     {} (QUIC)", ready.listen),
        format!("control  {} (pid {})", ready.control, ready.pid),
    ];
    if let Some(metrics) = &ready.metrics {
        lines.push(format!("metrics  {metrics}"));
    }
    lines.join("\n")
}

/// Waits until the copy is complete: looks again on every engine event (a finished backfill is
/// one) and at least every [`COMPLETE_RECHECK`].
async fn copy_complete(library: &Library, mut events: mpsc::Receiver<Event>) {
    while !library.is_ready() {
        match tokio::time::timeout(COMPLETE_RECHECK, events.recv()).await {
            Ok(Some(_)) | Err(_) => {}
            // No more events (the library is closing): look again on the interval only.
            Ok(None) => tokio::time::sleep(COMPLETE_RECHECK).await,
        }
    }
}

fn lock_progress(progress: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    progress.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Logs what the engine reports and feeds the progress line.
async fn watch_events(
    mut events: mpsc::Receiver<Event>,
    progress: Arc<Mutex<Progress>>,
    terminal: bool,
) {
    while let Some(event) = events.recv().await {
        let now = Instant::now();
        match event {
            Event::PeerOnline { peer, name } => {
                info!(%peer, %name, "peer online");
                lock_progress(&progress).peer_online(peer, name, now);
            }
            Event::PeerOffline { peer, reason } => {
                info!(%peer, %reason, "peer offline");
                lock_progress(&progress).peer_offline(peer);
            }
            Event::CaughtUp { peer, pulled } => {
                let summary = lock_progress(&progress).caught_up(peer, now);
                info!(%peer, pulled, "caught up");
                if let Some(summary) = summary {
                    summarize(&summary, terminal);
                }
            }
            Event::RowsChanged { upserted, deleted, .. } => {
                lock_progress(&progress).received((upserted.len() + deleted.len()) as u64);
            }
            Event::SharedChanged { shown, hidden, .. } => {
                lock_progress(&progress).received((shown.len() + hidden.len()) as u64);
            }
            Event::Backfill(report) => {
                let phase = report.phase;
                let summary = lock_progress(&progress).backfill(report);
                tracing::debug!(%phase, "backfill progress");
                if let Some(summary) = summary {
                    summarize(&summary, terminal);
                }
            }
            Event::Pruned { log_entries, tombstones } => {
                tracing::debug!(log_entries, tombstones, "pruned");
            }
            Event::Error { message } => warn!("{message}"),
            Event::Overflow { missed } => {
                tracing::debug!(missed, "the event subscription fell behind");
            }
        }
    }
}

/// Tells of a finished backfill or catch-up: on a terminal in place of the progress line,
/// elsewhere in the log.
fn summarize(summary: &str, terminal: bool) {
    if terminal {
        output::progress_line(None);
        output::note(summary);
    } else {
        info!("{summary}");
    }
}

/// Redraws the progress line while a catch-up runs.
async fn draw_progress(progress: Arc<Mutex<Progress>>) {
    let mut drawn = false;
    let mut ticks = tokio::time::interval(PROGRESS_REDRAW);
    loop {
        ticks.tick().await;
        let line = lock_progress(&progress).line(Instant::now());
        match line {
            Some(line) => {
                output::progress_line(Some(&line));
                drawn = true;
            }
            None if drawn => {
                output::progress_line(None);
                drawn = false;
            }
            None => {}
        }
    }
}

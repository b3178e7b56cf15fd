//! Events for the app: what sync did to the library, and what happened to peers.
//!
//! Every subscriber has its own bounded queue. A subscriber that falls behind does not slow sync
//! down and does not lose events silently: when its queue is full, events are counted instead of
//! queued, and the next event it can take is [`Event::Overflow`] with that count — the signal to
//! re-read whatever it displays.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use lsync_hlc::DeviceId;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Something the app may want to react to.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Rows of a device-owned model changed because of a peer.
    RowsChanged {
        /// The peer the rows came from.
        from: DeviceId,
        /// Their owner.
        owner: DeviceId,
        /// The model.
        model: String,
        /// Rows written.
        upserted: Vec<Uuid>,
        /// Rows removed.
        deleted: Vec<Uuid>,
    },
    /// Shared records changed because of a peer (or appeared once a referenced row arrived).
    SharedChanged {
        /// The peer the changes came from.
        from: DeviceId,
        /// Rows written, as (model, id).
        shown: Vec<(String, Uuid)>,
        /// Rows removed from their table, as (model, id).
        hidden: Vec<(String, Uuid)>,
    },
    /// A peer connected.
    PeerOnline {
        /// The peer.
        peer: DeviceId,
        /// Its name.
        name: String,
    },
    /// A peer disconnected.
    PeerOffline {
        /// The peer.
        peer: DeviceId,
        /// Why.
        reason: String,
    },
    /// This device exchanged watermarks with a peer and pulled everything it lacked from it (on
    /// connect, when sync is switched back on, or when a heartbeat showed it behind).
    CaughtUp {
        /// The peer.
        peer: DeviceId,
        /// Whether anything was pulled.
        pulled: bool,
    },
    /// A backfill made progress (after every page), started, or finished (phase `Ready`).
    Backfill(crate::library::BackfillProgress),
    /// Acknowledged history was dropped: peer log entries every peer has, or tombstones every
    /// peer holds.
    Pruned {
        /// Log entries removed.
        log_entries: u64,
        /// Tombstones removed.
        tombstones: u64,
    },
    /// Something went wrong that the app should know about (a refused batch, a failed write).
    Error {
        /// What went wrong.
        message: String,
    },
    /// This subscriber's queue was full and this many events were not queued: re-read state.
    Overflow {
        /// Events not delivered.
        missed: u64,
    },
}

struct Subscriber {
    sender: mpsc::Sender<Event>,
    missed: AtomicU64,
}

/// Fans events out to subscribers.
#[derive(Clone)]
pub(crate) struct EventBus {
    subscribers: Arc<Mutex<Vec<Arc<Subscriber>>>>,
    capacity: usize,
}

impl EventBus {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { subscribers: Arc::default(), capacity: capacity.max(2) }
    }

    /// A new subscriber's receiving end.
    pub(crate) fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (sender, receiver) = mpsc::channel(self.capacity);
        let subscriber = Arc::new(Subscriber { sender, missed: AtomicU64::new(0) });
        self.lock().push(subscriber);
        receiver
    }

    /// Delivers `event` to every subscriber without waiting.
    pub(crate) fn emit(&self, event: Event) {
        let mut subscribers = self.lock();
        subscribers.retain(|subscriber| !subscriber.sender.is_closed());
        for subscriber in subscribers.iter() {
            let missed = subscriber.missed.load(Ordering::Acquire);
            if missed > 0 {
                match subscriber.sender.try_send(Event::Overflow { missed }) {
                    Ok(()) => {
                        subscriber.missed.fetch_sub(missed, Ordering::AcqRel);
                    }
                    Err(_) => {
                        subscriber.missed.fetch_add(1, Ordering::AcqRel);
                        metrics::counter!("lsync_events_missed_total").increment(1);
                        continue;
                    }
                }
            }
            if subscriber.sender.try_send(event.clone()).is_err() {
                subscriber.missed.fetch_add(1, Ordering::AcqRel);
                metrics::counter!("lsync_events_missed_total").increment(1);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Subscriber>>> {
        // A panic while holding this lock leaves the list intact; keep using it.
        self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(n: u64) -> Event {
        Event::Error { message: n.to_string() }
    }

    #[test]
    fn a_full_subscriber_gets_an_overflow_marker_instead_of_silent_loss() {
        let bus = EventBus::new(2);
        let mut slow = bus.subscribe();
        let mut fast = bus.subscribe();
        for n in 0..5 {
            bus.emit(error(n));
            assert_eq!(fast.try_recv().unwrap(), error(n));
        }
        assert_eq!(slow.try_recv().unwrap(), error(0));
        assert_eq!(slow.try_recv().unwrap(), error(1));
        assert!(slow.try_recv().is_err());
        bus.emit(error(5));
        assert_eq!(slow.try_recv().unwrap(), Event::Overflow { missed: 3 });
        assert_eq!(slow.try_recv().unwrap(), error(5));
    }

    #[test]
    fn closed_subscribers_are_dropped() {
        let bus = EventBus::new(4);
        drop(bus.subscribe());
        bus.emit(error(1));
        assert!(bus.lock().is_empty());
    }
}

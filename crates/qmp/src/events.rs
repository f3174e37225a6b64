//! Asynchronous events: stamped once, queued to every negotiated client, and offered to
//! in-process subscribers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Events queued for one client beyond this are not queued: the client is told by being
/// disconnected with a logged reason (see [`Outbox::dropped`]). A socket client's events
/// normally move at once to its output queue, which has a byte budget of its own
/// ([`crate::server::CLIENT_OUTPUT_BUDGET`]); this bound only matters when events are
/// emitted faster than the monitor's event loop takes them.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// One event as emitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `RESUME`.
    pub name: String,
    /// The `data` member, if the event has one.
    pub data: Option<Value>,
    /// Seconds since the epoch (`-1` if the clock failed, as the spec says).
    pub seconds: i64,
    /// Microseconds within that second (`-1` if the clock failed).
    pub microseconds: i64,
}

impl Event {
    /// The wire form (without line ending): `{"event": .., "data": .., "timestamp": ..}`.
    pub fn to_json(&self) -> String {
        let mut s = format!(
            "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": ",
            self.seconds, self.microseconds
        );
        crate::json::write_str(&mut s, &self.name);
        if let Some(d) = &self.data {
            s.push_str(", \"data\": ");
            crate::json::write_value(&mut s, d);
        }
        s.push('}');
        s
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an [`Outbox`] calls when it has something new (events, or a request to close).
pub type Waker = Box<dyn Fn() + Send + Sync>;

/// The per-client side of the bus: queued event lines and how to wake the client's server.
pub struct Outbox {
    queue: Mutex<VecDeque<Arc<str>>>,
    negotiated: AtomicBool,
    closing: AtomicBool,
    dropped: AtomicU64,
    waker: Option<Waker>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("queued", &lock(&self.queue).len())
            .field("negotiated", &self.negotiated)
            .field("closing", &self.closing)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl Outbox {
    fn new(waker: Option<Waker>) -> Outbox {
        Outbox {
            queue: Mutex::new(VecDeque::new()),
            negotiated: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            waker,
        }
    }

    /// Marks the client as past capabilities negotiation: from now on it gets events.
    pub fn set_negotiated(&self) {
        self.negotiated.store(true, Ordering::SeqCst);
    }

    /// Whether the server asked this client to finish.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Events not queued because [`MAX_QUEUED_EVENTS`] were waiting already. A server
    /// must not go on serving a client that lost events without telling it; Keel's
    /// disconnects it with a logged reason.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Whether events are waiting.
    pub fn has_events(&self) -> bool {
        !lock(&self.queue).is_empty()
    }

    /// Appends queued event lines (CRLF-terminated) to `out`.
    pub fn drain_into(&self, out: &mut Vec<u8>) {
        let mut q = lock(&self.queue);
        for line in q.drain(..) {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    fn push(&self, line: Arc<str>) {
        if !self.negotiated.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut q = lock(&self.queue);
            if q.len() >= MAX_QUEUED_EVENTS {
                self.dropped.fetch_add(1, Ordering::SeqCst);
            } else {
                q.push_back(line);
            }
        }
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w();
        }
    }
}

#[derive(Debug, Default)]
struct BusInner {
    outboxes: Vec<Weak<Outbox>>,
    subscribers: Vec<Sender<Event>>,
}

/// Fans events out to every negotiated client and every subscriber.
#[derive(Debug, Default)]
pub struct EventBus {
    inner: Mutex<BusInner>,
    active: Mutex<usize>,
    idle: Condvar,
}

impl EventBus {
    /// A bus with no clients.
    pub fn new() -> Arc<EventBus> {
        Arc::new(EventBus::default())
    }

    /// Emits an event now, stamped with the wall clock.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let (seconds, microseconds) = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_micros())),
            Err(_) => (-1, -1),
        };
        let ev = Event {
            name: name.to_owned(),
            data,
            seconds,
            microseconds,
        };
        let line: Arc<str> = ev.to_json().into();
        let mut inner = lock(&self.inner);
        inner.outboxes.retain(|w| match w.upgrade() {
            Some(o) => {
                o.push(line.clone());
                true
            }
            None => false,
        });
        inner.subscribers.retain(|s| s.send(ev.clone()).is_ok());
    }

    /// An in-process event stream (for embedders and tests); it ends when dropped.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        lock(&self.inner).subscribers.push(tx);
        rx
    }

    /// Registers a new client; it receives events once negotiated. Its server polls
    /// [`Outbox::drain_into`]; see [`EventBus::attach_with`] to be woken instead.
    pub fn attach(&self) -> Arc<Outbox> {
        self.attach_outbox(None)
    }

    /// Registers a new client whose server `waker` is called whenever an event is queued
    /// for it or [`EventBus::close_all`] asks it to finish. The waker runs on the
    /// emitting thread, under the emitter's locks: it must only signal.
    pub fn attach_with(&self, waker: Waker) -> Arc<Outbox> {
        self.attach_outbox(Some(waker))
    }

    fn attach_outbox(&self, waker: Option<Waker>) -> Arc<Outbox> {
        let o = Arc::new(Outbox::new(waker));
        lock(&self.inner).outboxes.push(Arc::downgrade(&o));
        *lock(&self.active) += 1;
        o
    }

    /// Unregisters a client whose connection ended.
    pub fn detach(&self, outbox: &Arc<Outbox>) {
        lock(&self.inner)
            .outboxes
            .retain(|w| w.upgrade().is_some_and(|o| !Arc::ptr_eq(&o, outbox)));
        let mut n = lock(&self.active);
        *n = n.saturating_sub(1);
        self.idle.notify_all();
    }

    /// Asks every client to write what is queued and disconnect; waits up to `timeout`
    /// for them. Returns whether all finished.
    pub fn close_all(&self, timeout: Duration) -> bool {
        for w in &lock(&self.inner).outboxes {
            if let Some(o) = w.upgrade() {
                o.closing.store(true, Ordering::SeqCst);
                o.wake();
            }
        }
        let deadline = Instant::now() + timeout;
        let mut n = lock(&self.active);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self
                .idle
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_negotiated_clients_get_events() {
        let bus = EventBus::new();
        let a = bus.attach();
        let b = bus.attach();
        let sub = bus.subscribe();
        a.set_negotiated();
        bus.emit("STOP", None);
        bus.emit("SHUTDOWN", Some(json!({"guest": false})));
        let mut out = Vec::new();
        a.drain_into(&mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 2);
        let v: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["event"], "SHUTDOWN");
        assert_eq!(v["data"]["guest"], false);
        assert!(v["timestamp"]["microseconds"].as_i64().unwrap() < 1_000_000);
        let mut out = Vec::new();
        b.drain_into(&mut out);
        assert!(out.is_empty());
        assert_eq!(sub.try_recv().unwrap().name, "STOP");
        bus.detach(&a);
        bus.detach(&b);
        assert!(bus.close_all(Duration::from_millis(1)));
    }

    #[test]
    fn queue_is_bounded() {
        let bus = EventBus::new();
        let a = bus.attach();
        a.set_negotiated();
        for _ in 0..MAX_QUEUED_EVENTS + 10 {
            bus.emit("X", None);
        }
        let mut out = Vec::new();
        a.drain_into(&mut out);
        assert_eq!(
            out.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count(),
            MAX_QUEUED_EVENTS
        );
        // Nothing is lost silently: the overflow is counted for the server to act on.
        assert_eq!(a.dropped(), 10);
    }
}

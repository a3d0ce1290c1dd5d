//! Pull mode: the loop queues events instead of calling back, and the host
//! takes them with tf_server_poll on its own thread. The queue is bounded:
//! when it is full the loop stops reading sockets (TCP backpressure).

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::conn::CloseReason;
use crate::error::{Error, Result};
use crate::event_loop::Handler;
use crate::shared::Shared;
use crate::sys::Waker;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const EVENT_CONNECT: i32 = 1;
pub const EVENT_MESSAGE: i32 = 2;
pub const EVENT_CLOSE: i32 = 3;
pub const EVENT_WRITABLE: i32 = 4;

/// Reading pauses once this many events wait for the host...
pub const MAX_EVENTS: usize = 4096;
/// ...or this many payload bytes (plus at most one read's worth of frames).
pub const MAX_BYTES: usize = 16 << 20;

/// One event as the host receives it. For CONNECT, `data` holds the peer
/// text and a NUL, and `len` excludes the NUL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledEvent {
    pub kind: i32,
    pub reason: i32,
    pub conn: u64,
    pub data: Vec<u8>,
    pub len: usize,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<PulledEvent>,
    bytes: usize,
    /// Every loop has ended: nothing more will come.
    finished: bool,
    /// Loop threads still producing (one PullHandler each).
    producers: usize,
    /// The loop stopped reading for want of room: wake it once there is.
    producer_waiting: bool,
}

impl Queue {
    fn over_bound(&self) -> bool {
        self.events.len() >= MAX_EVENTS || self.bytes >= MAX_BYTES
    }
}

/// Between the loop (producer) and the host (consumer).
pub struct EventQueue {
    queue: Mutex<Queue>,
    arrived: Condvar,
    /// Readable while events wait: for the host's select/poll/epoll.
    signal: Waker,
}

impl EventQueue {
    pub fn new() -> std::io::Result<Arc<EventQueue>> {
        Ok(Arc::new(EventQueue { queue: Mutex::default(), arrived: Condvar::new(), signal: Waker::new()? }))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn fd(&self) -> i32 {
        self.signal.fd()
    }
}

/// The loop's side: collects events during an iteration and hands them over
/// under one lock at its end.
pub struct PullHandler {
    queue: Arc<EventQueue>,
    batch: Vec<PulledEvent>,
    batch_bytes: usize,
    /// The queue's size at the last look, to decide without locking.
    seen_events: usize,
    seen_bytes: usize,
}

impl PullHandler {
    pub fn new(queue: Arc<EventQueue>) -> PullHandler {
        queue.lock().producers += 1;
        PullHandler { queue, batch: Vec::new(), batch_bytes: 0, seen_events: 0, seen_bytes: 0 }
    }

    fn push(&mut self, kind: i32, reason: i32, conn: u64, data: Vec<u8>, len: usize) {
        self.batch_bytes += data.len();
        self.batch.push(PulledEvent { kind, reason, conn, data, len });
    }

    fn hand_over(&mut self, paused: bool) {
        let mut q = self.queue.lock();
        // Set by any loop that paused; cleared by the host's poll that wakes
        // them all (another loop's "not paused" must not hide it).
        if paused {
            q.producer_waiting = true;
        }
        if !self.batch.is_empty() {
            let was_empty = q.events.is_empty();
            q.events.extend(self.batch.drain(..));
            q.bytes += self.batch_bytes;
            self.batch_bytes = 0;
            if was_empty {
                self.queue.signal.set();
            }
            self.queue.arrived.notify_all();
        }
        self.seen_events = q.events.len();
        self.seen_bytes = q.bytes;
    }
}

impl Handler for PullHandler {
    fn on_connect(&mut self, conn: u64, peer: &str) -> bool {
        let mut data = Vec::with_capacity(peer.len() + 1);
        data.extend_from_slice(peer.as_bytes());
        data.push(0);
        self.push(EVENT_CONNECT, 0, conn, data, peer.len());
        true
    }

    fn on_message(&mut self, conn: u64, payload: &[u8]) -> bool {
        let mut data = Vec::new();
        if data.try_reserve_exact(payload.len()).is_err() || self.batch.try_reserve(1).is_err() {
            return false; // the connection is closed with TF_CLOSE_OVERLOAD
        }
        data.extend_from_slice(payload);
        self.push(EVENT_MESSAGE, 0, conn, data, payload.len());
        true
    }

    fn on_close(&mut self, conn: u64, reason: CloseReason) {
        self.push(EVENT_CLOSE, reason as i32, conn, Vec::new(), 0);
    }

    fn on_writable(&mut self, conn: u64) {
        // Only reached when the host asked for writable events.
        self.push(EVENT_WRITABLE, 0, conn, Vec::new(), 0);
    }

    fn forgets_at_close(&self) -> bool {
        false // PullHost::poll forgets it, one poll after the CLOSE event
    }

    fn wants_input(&mut self) -> bool {
        let within = |e: usize, b: usize| e < MAX_EVENTS && b < MAX_BYTES;
        if within(self.seen_events + self.batch.len(), self.seen_bytes + self.batch_bytes) {
            return true;
        }
        // Over the bound at the last look: the host may have drained since.
        let q = self.queue.lock();
        self.seen_events = q.events.len();
        self.seen_bytes = q.bytes;
        drop(q);
        within(self.seen_events + self.batch.len(), self.seen_bytes + self.batch_bytes)
    }

    fn end_of_iteration(&mut self, paused: bool) {
        if !self.batch.is_empty() || paused {
            self.hand_over(paused);
        }
    }
}

impl Drop for PullHandler {
    fn drop(&mut self) {
        self.hand_over(false);
        let mut q = self.queue.lock();
        q.producers -= 1;
        if q.producers > 0 {
            return; // another loop thread may still produce
        }
        q.finished = true;
        self.queue.signal.set(); // readable: the host learns the end by polling
        self.queue.arrived.notify_all();
        drop(q);
    }
}

/// The host's side of a pull-mode server.
pub struct PullHost {
    queue: Arc<EventQueue>,
    /// Every loop of the server (one queue for all of them).
    loops: Vec<Arc<Shared>>,
    /// The events handed out by the last poll; their data lives until the next.
    last: Mutex<Vec<PulledEvent>>,
}

impl PullHost {
    pub fn new(queue: Arc<EventQueue>, loops: Vec<Arc<Shared>>) -> PullHost {
        PullHost { queue, loops, last: Mutex::new(Vec::new()) }
    }

    pub fn fd(&self) -> i32 {
        self.queue.fd()
    }

    /// Takes up to `max` events, waiting up to `timeout_ms` (-1: forever) for
    /// the first. The returned batch stays valid until the next call.
    /// Err(Stopped) once the server has stopped and every event was taken.
    /// None for a timeout of 0 while another thread is inside poll: a
    /// timeout of 0 never waits, not even for that thread.
    pub fn poll(&self, max: usize, timeout_ms: i32) -> Result<Option<MutexGuard<'_, Vec<PulledEvent>>>> {
        // On a loop thread (a log callback), waiting could wait for ourselves.
        let timeout_ms = if crate::event_loop::on_any_loop_thread() { 0 } else { timeout_ms };
        let mut last = if timeout_ms == 0 {
            match self.last.try_lock() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
            }
        } else {
            self.last.lock().unwrap_or_else(|p| p.into_inner())
        };
        // The CLOSE events handed out by the previous poll: their connections'
        // ids (and user data) are forgotten now, as the contract says.
        if last.iter().any(|ev| ev.kind == EVENT_CLOSE) {
            // One lock per loop, not one per closed connection.
            for (i, sh) in self.loops.iter().enumerate() {
                let mut closed = last
                    .iter()
                    .filter(|ev| ev.kind == EVENT_CLOSE && sh.core.loop_of(ev.conn) == i)
                    .peekable();
                if closed.peek().is_some() {
                    let mut inbox = sh.lock_inbox();
                    for ev in closed {
                        inbox.registry.remove(&ev.conn);
                    }
                }
            }
        }
        last.clear();
        let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64));
        let mut q = self.queue.lock();
        while q.events.is_empty() && !q.finished && timeout_ms != 0 {
            q = match deadline {
                None => self.queue.arrived.wait(q).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.queue.arrived.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
        if q.events.is_empty() && q.finished {
            return Err(Error::stopped());
        }
        let n = max.min(q.events.len());
        last.extend(q.events.drain(..n));
        q.bytes -= last.iter().map(|ev| ev.data.len()).sum::<usize>();
        if q.events.is_empty() && !q.finished {
            self.queue.signal.reset();
        }
        // Set under this lock by the loop when it paused: whichever of the
        // two looks last sees the other's change, so no wake-up is lost.
        let resume = q.producer_waiting && !q.over_bound();
        if resume {
            q.producer_waiting = false;
        }
        drop(q);
        if resume {
            // The loops re-check and read again.
            for sh in &self.loops {
                sh.wake();
            }
        }
        Ok(Some(last))
    }
}

//! What a server's host threads and its loop thread share: the inbox of
//! commands and frames (one mutex), the coalesced wake-up, the counters, and
//! the per-connection registry. Both `server` and `event_loop` use it.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::addr::Address;
use crate::conn::{encoded_len, ConnShared, CLOSED, GONE, OPEN};
use crate::error::{Code, Error, Result};
use crate::frame::Format;
use crate::outq::{Frame, OutOfMemory, OutQueue};
use crate::sys::Waker;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Hashes connection ids (already unique integers) with one multiply.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Counters behind tf_stats. Only the loop thread writes them.
#[derive(Default, Debug)]
pub struct Stats {
    pub connections_active: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub closed_too_large: AtomicU64,
    pub closed_idle: AtomicU64,
}

/// Adds to a counter that only the calling thread writes: a load and a
/// store, no locked read-modify-write on the hot path.
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Drops from a counter that only the calling thread writes.
pub fn drop_count(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).saturating_sub(n), Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connections_active: u64,
    pub connections_accepted: u64,
    pub connections_rejected: u64,
    pub frames_received: u64,
    pub frames_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub closed_too_large: u64,
    pub closed_idle: u64,
}

impl StatsSnapshot {
    /// Adds another loop's counters (tf_stats are totals).
    pub fn add(&mut self, o: &StatsSnapshot) {
        self.connections_active += o.connections_active;
        self.connections_accepted += o.connections_accepted;
        self.connections_rejected += o.connections_rejected;
        self.frames_received += o.frames_received;
        self.frames_sent += o.frames_sent;
        self.bytes_received += o.bytes_received;
        self.bytes_sent += o.bytes_sent;
        self.closed_too_large += o.closed_too_large;
        self.closed_idle += o.closed_idle;
    }
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections_active: g(&self.connections_active),
            connections_accepted: g(&self.connections_accepted),
            connections_rejected: g(&self.connections_rejected),
            frames_received: g(&self.frames_received),
            frames_sent: g(&self.frames_sent),
            bytes_received: g(&self.bytes_received),
            bytes_sent: g(&self.bytes_sent),
            closed_too_large: g(&self.closed_too_large),
            closed_idle: g(&self.closed_idle),
        }
    }
}

/// Command kinds host threads hand to the loop.
pub const CMD_SEND: u8 = 1;
pub const CMD_CLOSE: u8 = 2;
pub const CMD_ABORT: u8 = 3;
pub const CMD_PAUSE: u8 = 4;
pub const CMD_RESUME: u8 = 5;
/// A host thread got TF_ERR_FULL: watch the connection for room.
pub const CMD_WATCH: u8 = 6;
/// tf_connect: start connecting (the address is in `Inbox::connects`).
pub const CMD_CONNECT: u8 = 7;
/// A connection accepted by loop 0 for this loop (in `Inbox::adopted`).
pub const CMD_ADOPT: u8 = 8;

/// What host threads hand to the loop, under one mutex.
///
/// Frames a host thread sends are encoded straight into a per-connection
/// output queue here (`pending`), in the same chunks the connection's own
/// queue uses; the loop then moves those chunks into the connection without
/// copying them. A frame is never held twice, so queued output costs what
/// it is, whichever thread sent it.
#[derive(Default)]
pub struct Inbox {
    /// Every connection the host may name, with its shared half.
    pub registry: IdMap<Arc<ConnShared>>,
    /// Commands in call order: (kind, connection id). A connection's SEND
    /// appears once per batch, where its first frame was sent: the frames are
    /// in `pending` (no frame can follow a close or abort of the same
    /// connection: tf_send refuses them).
    pub cmds: Vec<(u8, u64)>,
    /// Frames sent by host threads, per connection, not yet applied.
    pub pending: IdMap<OutQueue>,
    /// Where tf_connect's connections go, until the loop starts them.
    pub connects: IdMap<Address>,
    /// Connections loop 0 accepted for this loop (CMD_ADOPT).
    pub adopted: IdMap<crate::sys::Accepted>,
    /// Set once by tf_server_stop: when the drain ends.
    pub stop_deadline: Option<Instant>,
}

impl Inbox {
    /// Queues one frame for connection `id`; nothing on failure.
    pub fn push_send(
        &mut self,
        id: u64,
        fmt: Format,
        payload: Frame<'_>,
    ) -> std::result::Result<(), OutOfMemory> {
        self.cmds.try_reserve(1).map_err(|_| OutOfMemory)?;
        self.pending.try_reserve(1).map_err(|_| OutOfMemory)?;
        let q = self.pending.entry(id).or_insert_with(|| OutQueue::new(fmt));
        let first = q.is_empty();
        q.push(payload, &mut || None)?;
        if first {
            self.cmds.push((CMD_SEND, id));
        }
        Ok(())
    }

    /// Queues a command without frames (close, abort).
    pub fn push_cmd(&mut self, kind: u8, id: u64) -> std::result::Result<(), OutOfMemory> {
        self.cmds.try_reserve(1).map_err(|_| OutOfMemory)?;
        self.cmds.push((kind, id));
        Ok(())
    }
}

/// Everything a server's host threads and its loop thread share.
pub struct Shared {
    /// The length prefix of every frame, both directions.
    pub format: Format,
    /// The process this server runs in (see sys::process_epoch).
    pub epoch: u64,
    /// The host wants on_writable / TF_EVENT_WRITABLE.
    pub track_writable: bool,
    pub max_frame: u32,
    pub max_queued_output: u64,
    /// Set when stop begins: sends fail, no more messages are delivered.
    pub stopping: AtomicBool,
    /// Set when the handle was freed from inside a callback: no callback
    /// may run any more (the host may free what user_data points to).
    pub silent: AtomicBool,
    pub inbox: Mutex<Inbox>,
    /// A wake-up is already on its way: later commands need not write the eventfd.
    pub wake_pending: AtomicBool,
    pub waker: Waker,
    pub stats: Stats,
    /// What all loop threads of the server share.
    pub core: Arc<Core>,
    /// This loop's index, 0..n-1 (loop 0 owns the listener).
    pub index: usize,
    /// tf_server_drain asked for the listener to close.
    pub drain_requested: AtomicBool,
    /// The listener is closed (true), or the loop has ended; with its condvar.
    pub drained: Mutex<bool>,
    pub drained_cv: Condvar,
    /// What tf_server_drain does at once, on the calling thread.
    pub early_drain: Mutex<EarlyDrain>,
}

/// tf_server_drain does not wait for loop 0 to stop listening: the call
/// takes the accept queue and stops the listener listening itself, so that
/// no connection attempt after the call succeeds whatever loop 0 is doing
/// (inside a callback, it may be this very thread, or wait for it); loop 0
/// serves what was taken and closes the descriptor at its next turn.
#[derive(Default)]
pub struct EarlyDrain {
    /// The listener the library created (not an inherited one: shutting
    /// down a socket other processes hold would stop theirs too); None once
    /// the loop closed it.
    pub listener: Option<std::os::fd::RawFd>,
    /// Connections taken from the accept queue by the call.
    pub accepted: Vec<crate::sys::Accepted>,
}

impl Shared {
    pub fn lock_inbox(&self) -> MutexGuard<'_, Inbox> {
        // A panic while holding the lock cannot leave the inbox inconsistent
        // (each push is complete or absent), so poisoning is ignored.
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the loop unless a wake-up is already pending.
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            self.waker.set();
        }
    }

    pub fn lock_early_drain(&self) -> MutexGuard<'_, EarlyDrain> {
        self.early_drain.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The loop closed the listener (drain or stop): drain waiters go on.
    pub fn listener_closed(&self) {
        *self.drained.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.drained_cv.notify_all();
    }

    /// Called by the loop thread as it ends.
    pub fn loop_ended(&self) {
        self.listener_closed();
        self.core.loop_ended();
    }

    pub(crate) fn begin_stop(&self, drain: Duration) {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_none() {
            inbox.stop_deadline = Some(Instant::now() + drain);
            self.stopping.store(true, Ordering::Release);
        }
        drop(inbox);
        self.wake_pending.store(true, Ordering::Release);
        self.waker.set();
    }

    /// One send through the inbox: from host threads, and from a loop's own
    /// callbacks for a connection its table does not know yet (tf_connect
    /// from that callback).
    pub(crate) fn send_pending(&self, id: u64, frame: Frame<'_>) -> Result<()> {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_some() {
            return Err(Error::stopped());
        }
        self.send_locked(&mut inbox, id, frame)?;
        drop(inbox);
        self.wake();
        Ok(())
    }

    /// One host-thread send, under the inbox lock (stop already checked).
    pub(crate) fn send_locked(&self, inbox: &mut Inbox, id: u64, payload: Frame<'_>) -> Result<()> {
        let n = encoded_len(self.format, payload.len());
        // Checked and reserved in one borrow of the registry (no reference
        // count taken per frame); None: full, and whether to start watching.
        let reserved = match inbox.registry.get(&id) {
            Some(c) if c.takes_frames() => match c.reserve(n, self.max_queued_output) {
                Ok(()) => None,
                Err(_) => Some(self.track_writable && !c.want_writable.swap(true, Ordering::AcqRel)),
            },
            _ => return Err(Error::no_conn(id)),
        };
        if let Some(watch) = reserved {
            // The loop watches it from now on (it alone knows when it drains).
            if watch && inbox.push_cmd(CMD_WATCH, id).is_ok() {
                self.wake();
            }
            return Err(full_error(id, payload.len(), self.max_queued_output));
        }
        if inbox.push_send(id, self.format, payload).is_err() {
            if let Some(c) = inbox.registry.get(&id) {
                c.release(n);
            }
            return Err(out_of_memory(id, payload.len()));
        }
        Ok(())
    }

    pub(crate) fn close_from_host(&self, id: u64) -> Result<()> {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_some() {
            return Err(Error::stopped());
        }
        match inbox.registry.get(&id) {
            Some(c)
                if c.closing.load(Ordering::Acquire) == OPEN
                    && !c.close_requested.swap(true, Ordering::AcqRel) =>
            {
                if inbox.push_cmd(CMD_CLOSE, id).is_err() {
                    // Rare: retried by the close timeout path is not possible
                    // without the command, so undo and report.
                    if let Some(c) = inbox.registry.get(&id) {
                        c.close_requested.store(false, Ordering::Release);
                    }
                    return Err(Error::new(
                        Code::Full,
                        format!("connection {id}: out of memory for the close"),
                    ));
                }
            }
            _ => return Err(Error::no_conn(id)),
        }
        drop(inbox);
        self.wake();
        Ok(())
    }

    pub(crate) fn abort_from_host(&self, id: u64) -> Result<()> {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_some() {
            return Err(Error::stopped());
        }
        match inbox.registry.get(&id) {
            Some(c) if abortable(c) => c.close_requested.store(true, Ordering::Release),
            _ => return Err(Error::no_conn(id)),
        }
        if inbox.push_cmd(CMD_ABORT, id).is_err() {
            return Err(Error::new(Code::Full, format!("connection {id}: out of memory for the abort")));
        }
        drop(inbox);
        self.wake();
        Ok(())
    }
}

/// What every loop thread of one server shares: connection ids, the
/// connection count, per-IP counts, the log lock, and a handle freed from a
/// callback (dropped when the last loop ends).
pub struct Core {
    /// The next connection id; connection `id` lives on loop (id - 1) % n,
    /// so ids are spread round-robin and host calls find their loop.
    pub next_id: AtomicU64,
    /// Connections open or being established, against max connections.
    pub conns: AtomicUsize,
    pub max_connections: usize,
    pub nloops: usize,
    /// Partial-frame bytes held by every loop together (max_buffered).
    pub buffered: AtomicU64,
    /// Open connections per client IP, when limited.
    pub ip_counts: Mutex<HashMap<std::net::IpAddr, u32>>,
    /// The log callback is never called twice at the same time.
    pub log_lock: Mutex<()>,
    /// (loops ended, a handle to drop once they all have).
    deferred: Mutex<(usize, Option<Box<dyn Send>>)>,
    /// Signalled as each loop ends (with `deferred`'s count).
    ended: Condvar,
}

impl Core {
    pub fn new(max_connections: usize, nloops: usize) -> Core {
        Core {
            next_id: AtomicU64::new(1),
            conns: AtomicUsize::new(0),
            max_connections,
            nloops,
            buffered: AtomicU64::new(0),
            ip_counts: Mutex::new(HashMap::new()),
            log_lock: Mutex::new(()),
            deferred: Mutex::new((0, None)),
            ended: Condvar::new(),
        }
    }

    /// The loop a connection lives on.
    #[inline]
    pub fn loop_of(&self, id: u64) -> usize {
        if self.nloops == 1 {
            return 0; // no division on the single-loop path
        }
        (id.wrapping_sub(1) % self.nloops as u64) as usize
    }

    /// Counts a new connection against max connections; false when full.
    pub fn take_conn_slot(&self) -> bool {
        self.conns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .is_ok()
    }

    /// A connection counted by `take_conn_slot` is gone.
    pub fn give_conn_slot(&self) {
        self.conns.fetch_sub(1, Ordering::AcqRel);
    }

    /// Keeps `handle` alive until every loop thread has ended (a callback on
    /// any of them may still be using it).
    pub fn defer_drop(&self, handle: Box<dyn Send>) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        if d.0 == self.nloops {
            drop(d);
            drop(handle); // they all ended already: nothing uses it
        } else {
            d.1 = Some(handle);
        }
    }

    fn loop_ended(&self) {
        let handle = {
            let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            d.0 += 1;
            self.ended.notify_all();
            if d.0 == self.nloops {
                d.1.take()
            } else {
                None
            }
        };
        drop(handle);
    }

    /// Returns once every loop thread has ended (its last callback has
    /// returned): a stop that found another stop joining the threads must
    /// not return before that one's callbacks are over.
    pub fn wait_loops_ended(&self) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        while d.0 < self.nloops {
            d = self.ended.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Counts a connection from `ip` unless it already has `limit`.
    pub fn count_ip(&self, ip: std::net::IpAddr, limit: u32) -> bool {
        let mut m = self.ip_counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    pub fn forget_ip(&self, ip: std::net::IpAddr) {
        let mut m = self.ip_counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

impl Shared {
    /// tf_connect on this loop, with an id from `Core::next_id` that maps
    /// here and a connection slot already taken: the connection exists (the
    /// host may send to it) from here on; the loop starts connecting within
    /// one iteration.
    pub(crate) fn connect(&self, id: u64, addr: Address) -> Result<()> {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_some() {
            return Err(Error::stopped());
        }
        if inbox.cmds.try_reserve(1).is_err()
            || inbox.connects.try_reserve(1).is_err()
            || inbox.registry.try_reserve(1).is_err()
        {
            return Err(Error::new(Code::Full, "no memory for a new connection"));
        }
        let conn = Arc::new(ConnShared::new(Instant::now()));
        let _ = conn.peer.set(addr.to_string().into());
        conn.outbound.store(true, Ordering::Release);
        inbox.registry.insert(id, conn);
        inbox.connects.insert(id, addr);
        inbox.cmds.push((CMD_CONNECT, id));
        drop(inbox);
        self.wake();
        Ok(())
    }

    /// tf_conn_pause / tf_conn_resume from a thread that is not the loop's:
    /// applied within one loop iteration.
    pub(crate) fn pause_from_host(&self, id: u64, pause: bool) -> Result<()> {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_some() {
            return Err(Error::stopped());
        }
        match inbox.registry.get(&id) {
            // Visible at once (tf_conn_get_info, and delivery stops after the
            // frame being delivered); the loop applies the rest in order.
            Some(c) if c.is_live() => c.paused.store(pause, Ordering::Release),
            _ => return Err(Error::no_conn(id)),
        }
        let kind = if pause { CMD_PAUSE } else { CMD_RESUME };
        inbox.push_cmd(kind, id).map_err(|_| Error::new(Code::Full, "no memory for the command"))?;
        drop(inbox);
        self.wake();
        Ok(())
    }
}

/// tf_conn_abort applies to an open connection, one the host closed, or one
/// whose peer half-closed; not to one closing for a reason of the loop's own.
pub fn abortable(c: &ConnShared) -> bool {
    match c.closing.load(Ordering::Acquire) {
        CLOSED => false,
        GONE => c.close_requested.load(Ordering::Acquire),
        _ => true,
    }
}

pub fn too_large(len: usize, max_frame: u32) -> Error {
    Error::new(Code::TooLarge, format!("payload of {len} bytes is longer than max frame ({max_frame} bytes)"))
}

pub fn out_of_memory(id: u64, len: usize) -> Error {
    Error::new(Code::Full, format!("connection {id}: no memory to queue a frame of {len} bytes"))
}

pub fn full_error(id: u64, len: usize, limit: u64) -> Error {
    Error::new(
        Code::Full,
        format!("connection {id}: queuing {len} more bytes would pass max queued output ({limit} bytes)"),
    )
}

#[cfg(feature = "fault-injection")]
pub const PANIC_PAYLOAD: &[u8] = b"\0tcpframe:panic\0";

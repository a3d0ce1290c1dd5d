//! A running server as host threads see it: start, send, close, stats, stop.
//! Host threads talk to the loop through `Shared`: a command arena behind one
//! mutex, a coalesced wake-up, and counters.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::config::Config;
use crate::conn::{encoded_len, ConnShared, GONE, OPEN};
use crate::error::{Code, Error, Result};
use crate::event_loop::{self, Handler, Starter};
use crate::outq::{OutOfMemory, OutQueue};
use crate::sys::{self, Interest, Poller, Waker};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
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
    /// Set once by tf_server_stop: when the drain ends.
    pub stop_deadline: Option<Instant>,
}

impl Inbox {
    /// Queues one frame for connection `id`; nothing on failure.
    pub fn push_send(&mut self, id: u64, payload: &[u8]) -> std::result::Result<(), OutOfMemory> {
        self.cmds.try_reserve(1).map_err(|_| OutOfMemory)?;
        self.pending.try_reserve(1).map_err(|_| OutOfMemory)?;
        let q = self.pending.entry(id).or_default();
        let first = q.is_empty();
        q.push_frame(payload, &mut || None)?;
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
    /// The process this server runs in (see sys::process_epoch).
    pub epoch: u64,
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
    /// A handle freed while its loop thread could still be running host code
    /// that uses it: the loop thread drops it when it ends.
    pub deferred: Mutex<(bool, Option<Box<dyn Send>>)>,
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

    /// Keeps `handle` alive until the loop thread ends.
    pub fn defer_drop(&self, handle: Box<dyn Send>) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        if d.0 {
            drop(d);
            drop(handle); // the loop has ended already: nothing uses it
        } else {
            d.1 = Some(handle);
        }
    }

    /// Called by the loop thread as it ends: drops a deferred handle.
    pub fn loop_ended(&self) {
        let handle = {
            let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            d.0 = true;
            d.1.take()
        };
        drop(handle);
    }

    fn begin_stop(&self, drain: Duration) {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_none() {
            inbox.stop_deadline = Some(Instant::now() + drain);
            self.stopping.store(true, Ordering::Release);
        }
        drop(inbox);
        self.wake_pending.store(true, Ordering::Release);
        self.waker.set();
    }

    /// tf_send from a thread that is not this server's loop thread.
    fn send_from_host(&self, id: u64, payload: &[u8]) -> Result<()> {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_some() {
            return Err(Error::stopped());
        }
        self.send_locked(&mut inbox, id, payload)?;
        drop(inbox);
        self.wake();
        Ok(())
    }

    /// One host-thread send, under the inbox lock (stop already checked).
    fn send_locked(&self, inbox: &mut Inbox, id: u64, payload: &[u8]) -> Result<()> {
        let conn = match inbox.registry.get(&id) {
            Some(c) if c.takes_frames() => c.clone(),
            _ => return Err(Error::no_conn(id)),
        };
        let n = encoded_len(payload.len());
        conn.reserve(n, self.max_queued_output)
            .map_err(|_| full_error(id, payload.len(), self.max_queued_output))?;
        if inbox.push_send(id, payload).is_err() {
            conn.release(n);
            return Err(out_of_memory(id, payload.len()));
        }
        Ok(())
    }

    fn close_from_host(&self, id: u64) -> Result<()> {
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

    fn abort_from_host(&self, id: u64) -> Result<()> {
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

/// tf_conn_abort applies to an open connection, one the host closed, or one
/// whose peer half-closed; not to one closing for a reason of the loop's own.
pub fn abortable(c: &ConnShared) -> bool {
    c.close_requested.load(Ordering::Acquire) || c.closing.load(Ordering::Acquire) != GONE
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

/// A started server: the handle behind tf_server.
pub struct Server {
    shared: Arc<Shared>,
    /// Holds the loop at its start until the host has its handle (see `open`).
    gate: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    local: SocketAddr,
}

impl Server {
    /// Binds, listens and starts the loop thread. Errors are reported here:
    /// nothing runs when this fails.
    pub fn start<H: Handler + Send + 'static>(config: &Config, handler: H) -> Result<Server> {
        let epoch = sys::process_epoch();
        let (listener, local) = sys::listen(&config.address, 1024)
            .map_err(|e| Error::io(format!("listen on {}", config.address), e))?;
        let backend = config.resolved_backend();
        let mut poller = Poller::new(backend).map_err(|e| Error::io("create poller", e))?;
        let waker = Waker::new().map_err(|e| Error::io("create eventfd", e))?;
        poller
            .add(sys::raw(&listener), event_loop::LISTENER, Interest::READ)
            .map_err(|e| Error::io("register listener", e))?;
        poller
            .add(waker.fd(), event_loop::WAKER, Interest::READ)
            .map_err(|e| Error::io("register waker", e))?;
        let shared = Arc::new(Shared {
            epoch,
            max_frame: config.max_frame,
            max_queued_output: config.max_queued_output,
            stopping: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            inbox: Mutex::new(Inbox::default()),
            wake_pending: AtomicBool::new(false),
            waker,
            stats: Stats::default(),
            deferred: Mutex::new((false, None)),
        });
        let lp = Starter::new(config, shared.clone(), poller, listener, local, backend, handler);
        let (gate, opened) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tcpframe-loop".into())
            .spawn(move || {
                // Wait until tf_server_start has written *out (or gave up):
                // no callback may run before the host holds its handle.
                let _ = opened.recv();
                lp.run()
            })
            .map_err(|e| Error::io("spawn the loop thread", e))?;
        Ok(Server { shared, gate: Mutex::new(Some(gate)), thread: Mutex::new(Some(thread)), local })
    }

    /// Lets the loop run. Called once the host has the handle; dropping the
    /// server without it also opens the gate.
    pub fn open(&self) {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Fails in a child process forked after the server started.
    pub fn check_process(&self) -> Result<()> {
        if sys::process_epoch() != self.shared.epoch {
            Err(Error::forked())
        } else {
            Ok(())
        }
    }

    pub fn port(&self) -> u16 {
        self.local.port()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn send(&self, id: u64, payload: &[u8]) -> Result<()> {
        self.send_with(id, || Ok(payload))
    }

    /// tf_send: the payload is fetched only after the process and stop
    /// checks, which take precedence over argument errors.
    pub fn send_with<'a>(&self, id: u64, payload: impl FnOnce() -> Result<&'a [u8]>) -> Result<()> {
        self.check_process()?;
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(Error::stopped());
        }
        let payload = payload()?;
        if payload.len() > self.shared.max_frame as usize {
            return Err(too_large(payload.len(), self.shared.max_frame));
        }
        #[cfg(feature = "fault-injection")]
        if payload == PANIC_PAYLOAD {
            panic!("fault injection: panic inside tf_send");
        }
        match event_loop::local_send(&self.shared, id, payload) {
            Some(r) => r,
            None => self.shared.send_from_host(id, payload),
        }
    }

    /// Ok while calls may still queue frames: the right process, no stop.
    pub fn check_live(&self) -> Result<()> {
        self.check_process()?;
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(Error::stopped());
        }
        Ok(())
    }

    /// tf_send_batch: each entry as tf_send would treat it, in order; one
    /// code per entry. Err (and nothing queued) once stop has begun.
    pub fn send_batch(&self, entries: &[(u64, Result<&[u8]>)]) -> Result<Vec<i32>> {
        self.check_live()?;
        let max_frame = self.shared.max_frame;
        let check = |p: &Result<&[u8]>| -> Result<()> {
            let p = p.as_ref().map_err(Clone::clone)?;
            if p.len() > max_frame as usize {
                return Err(too_large(p.len(), max_frame));
            }
            Ok(())
        };
        let code = |r: Result<()>| r.map_or_else(|e| e.code as i32, |()| 0);
        let mut codes = Vec::new();
        codes
            .try_reserve_exact(entries.len())
            .map_err(|_| Error::new(Code::Full, "no memory for the batch"))?;
        let local = event_loop::with_state(&self.shared, |st| {
            for (id, p) in entries {
                codes.push(code(check(p).and_then(|()| st.send(*id, p.as_ref().expect("checked")))));
            }
        });
        if local.is_some() {
            return Ok(codes);
        }
        let mut inbox = self.shared.lock_inbox();
        if inbox.stop_deadline.is_some() {
            return Err(Error::stopped());
        }
        for (id, p) in entries {
            let r = check(p)
                .and_then(|()| self.shared.send_locked(&mut inbox, *id, p.as_ref().expect("checked")));
            codes.push(code(r));
        }
        drop(inbox);
        if codes.contains(&0) {
            self.shared.wake();
        }
        Ok(codes)
    }

    pub fn close(&self, id: u64) -> Result<()> {
        self.check_process()?;
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(Error::stopped());
        }
        match event_loop::local_close(&self.shared, id) {
            Some(r) => r,
            None => self.shared.close_from_host(id),
        }
    }

    /// tf_conn_abort: drop what is queued, reset, on_close(LOCAL).
    pub fn abort(&self, id: u64) -> Result<()> {
        self.check_process()?;
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(Error::stopped());
        }
        match event_loop::local_abort(&self.shared, id) {
            Some(r) => r,
            None => self.shared.abort_from_host(id),
        }
    }

    pub fn stats(&self) -> Result<StatsSnapshot> {
        self.check_process()?;
        Ok(self.shared.stats.snapshot())
    }

    /// Stops accepting, drains for up to `drain`, closes everything, joins
    /// the loop thread. Idempotent; refused from inside any callback (of
    /// any server): waiting there for a loop thread could wait for itself,
    /// or for a loop that waits for it.
    pub fn stop(&self, drain: Duration) -> Result<()> {
        self.check_process()?;
        if event_loop::current_loop().is_some() {
            return Err(Error::invalid(
                "tf_server_stop was called from inside a callback (on a tcpframe loop thread): \
                 waiting there could deadlock; call it from another thread",
            ));
        }
        self.join_loop(drain);
        Ok(())
    }

    fn join_loop(&self, drain: Duration) {
        self.shared.begin_stop(drain);
        self.open();
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = thread.take() {
            // The loop catches its own panics; a join error is not expected.
            let _ = handle.join();
        }
    }

    /// tf_server_free's first half: stops the server so that no callback
    /// of it can run again, waiting for its loop thread where that is safe.
    /// Returns Freed::Now when the handle may be dropped at once, or
    /// Freed::ByLoop when the loop thread must drop it (see `Shared::defer_drop`).
    pub fn stop_for_free(&self) -> Freed {
        let mine = Arc::as_ptr(&self.shared) as usize;
        match event_loop::current_loop() {
            // Inside one of its own callbacks: waiting would wait for ourselves.
            Some(here) if here == mine => {
                self.abandon();
                Freed::ByLoop
            }
            // Inside a callback of another server: wait, unless the server
            // being freed is itself waiting (directly or through others) for
            // the server whose callback this is; then waiting would deadlock.
            Some(here) => match waits::enter(here, mine) {
                Some(_guard) => {
                    self.join_loop(Duration::ZERO);
                    Freed::Now
                }
                None => {
                    self.abandon();
                    Freed::ByLoop
                }
            },
            None => {
                self.join_loop(Duration::ZERO);
                Freed::Now
            }
        }
    }

    /// Stop at once, run no callback again, and let the loop thread end on
    /// its own (its current callback, if any, returns first).
    fn abandon(&self) {
        self.shared.silent.store(true, Ordering::Release);
        self.shared.begin_stop(Duration::ZERO);
        self.open();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(handle); // detaches
    }
}

/// How tf_server_free may release the handle.
#[derive(Debug, PartialEq, Eq)]
pub enum Freed {
    Now,
    ByLoop,
}

/// Which loop threads are waiting, inside a callback, for which other
/// server's loop to end: the graph in which two servers freeing each other
/// from their callbacks would deadlock.
mod waits {
    use std::sync::Mutex;

    static WAITING: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

    pub struct Guard(usize);

    impl Drop for Guard {
        fn drop(&mut self) {
            let mut w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
            w.retain(|&(waiter, _)| waiter != self.0);
        }
    }

    /// Records that the loop of server `waiter` is about to wait for the
    /// loop of server `target`; None when that would close a cycle.
    pub fn enter(waiter: usize, target: usize) -> Option<Guard> {
        let mut w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        let mut at = target;
        for _ in 0..=w.len() {
            if at == waiter {
                return None;
            }
            match w.iter().find(|&&(x, _)| x == at) {
                Some(&(_, next)) => at = next,
                None => break,
            }
        }
        w.push((waiter, target));
        Some(Guard(waiter))
    }
}

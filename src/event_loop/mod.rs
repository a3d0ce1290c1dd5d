//! The loop thread: wait, accept, read and dispatch, apply host commands,
//! flush once per iteration, expire idle connections, close, repeat.
//!
//! Callbacks run with no borrow of the loop's state held, so a callback may
//! call tf_send / tf_conn_close on its own server: those reach the state
//! through a thread-local link, with no lock and no system call.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

mod accept;
mod close;
mod commands;
mod connect;
mod control;
mod dispatch;
mod handshake;
mod local;
mod log;
mod read;
mod start;
mod state;
mod write;

pub use commands::stop_listening;
pub use local::{current_loop, current_loop_shared, on_any_loop_thread, with_state};
pub use start::Starter;
pub use state::{State, StateConfig};

use crate::addr::Address;
use crate::config::LogLevel;
use crate::conn::{CloseReason, NIL};
use crate::frame::Format;
use crate::outq::OutQueue;
use crate::shared::{IdMap, Shared};
use crate::sys::{self, Backend, Event, Poller};
use log::{Logger, Topic};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Poller tokens: the listener, the waker, then connection slot + FIRST_CONN.
pub const LISTENER: usize = 0;
pub const WAKER: usize = 1;
const FIRST_CONN: usize = 2;

/// Per-loop read buffer: whole frames are dispatched from it in place. One
/// read per connection per iteration, of at most this much, and at most
/// FRAMES_PER_TURN frames delivered from it per turn (dispatch.rs): bulk
/// transfers move 64 KiB a read, and a peer streaming tiny frames delays the
/// others by a bounded number of callbacks.
const SCRATCH: usize = 64 * 1024;
/// Reads per connection per iteration: one, so that a peer streaming tiny
/// frames delays the others by at most one read's worth of callbacks. More
/// data is reported again by the next (level-triggered) wait.
const READS_PER_WAKE: usize = 1;
/// Accepts per wake-up, for the same reason.
const ACCEPTS_PER_WAKE: usize = 256;
/// How long accepting pauses when descriptors run out and shedding failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Caches are handed back after this long without any event.
const QUIET_TRIM: Duration = Duration::from_secs(1);
/// Flush-and-close passes per iteration (callbacks in on_close may queue more).
const FLUSH_PASSES: usize = 4;
/// While applying host commands, look for a due stop this often (bytes).
const APPLY_CHECK_BYTES: usize = 1 << 20;
/// Log lines per second before the rest are counted, not written.
const LOG_PER_SECOND: u32 = 20;

/// What the loop calls as things happen: C callbacks, or the pull queue.
pub trait Handler {
    /// Return false to refuse the connection.
    fn on_connect(&mut self, conn: u64, peer: &str) -> bool;
    /// A connection that got TF_ERR_FULL has room again (half the limit).
    fn on_writable(&mut self, conn: u64) {
        let _ = conn;
    }
    /// Whether the loop forgets a closed connection's id (and user data) as
    /// soon as on_close returns; pull mode forgets it at the host's next poll.
    fn forgets_at_close(&self) -> bool {
        true
    }
    /// False when the frame could not be taken for want of memory: the
    /// connection is then closed with TF_CLOSE_OVERLOAD.
    fn on_message(&mut self, conn: u64, data: &[u8]) -> bool;
    fn on_close(&mut self, conn: u64, reason: CloseReason);
    /// False while the consumer cannot take more (reading pauses).
    fn wants_input(&mut self) -> bool {
        true
    }
    /// Called once per iteration after every ready connection was read:
    /// frames held for batched delivery go out now (`deliver` false: stop
    /// has begun or the server was freed, so they are dropped).
    fn end_of_reads(&mut self, deliver: bool) {
        let _ = deliver;
    }
    /// Called once per loop iteration, before the loop sleeps; `paused`
    /// says that some connection is not read because wants_input said no.
    fn end_of_iteration(&mut self, paused: bool) {
        let _ = paused;
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE) | Some(libc::ETIMEDOUT))
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

pub struct EventLoop<H: Handler> {
    shared: Arc<Shared>,
    state: Rc<RefCell<State>>,
    poller: Poller,
    listener: Option<OwnedFd>,
    /// Set TCP_NODELAY on each accepted socket (an inherited listener).
    set_nodelay: bool,
    /// The socket file this server created (removed when the listener goes).
    socket_file: Option<sys::SocketFile>,
    /// The listening address, as the host gave it (for the log).
    address: String,
    backend: Backend,
    handler: H,
    scratch: Vec<u8>,
    events: Vec<Event>,
    /// The loop's halves of the inbox's double buffers (see drain_inbox).
    cmds: Vec<(u8, u64)>,
    pending: IdMap<OutQueue>,
    connects: IdMap<Address>,
    /// How long a tf_connect may take.
    connect_timeout: Duration,
    /// PROXY protocol expected on accepted connections.
    proxy: Option<crate::proxy::Mode>,
    /// Open connections per client IP, when limited.
    max_per_ip: Option<u32>,
    /// Every loop of the server (loop 0 hands accepted sockets over).
    peers: Vec<Arc<Shared>>,
    adopted: IdMap<sys::Accepted>,
    /// tf_server_drain was carried out.
    drained: bool,
    max_frame: u32,
    format: Format,
    /// Budget for all partial inbound frames together (all loops).
    max_buffered: u64,
    /// This loop's share of `Core::buffered`, as last added there.
    budget_counted: u64,
    idle_timeout: Option<Duration>,
    /// Shed one pending connection when descriptors run out (libuv's trick).
    spare_fd: Option<File>,
    accept_paused_until: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    /// Connections not read while the pull queue is full.
    paused: Vec<u32>,
    /// The listener is not watched while the pull queue is full.
    accept_blocked: bool,
    /// When the loop last had something to do; after a quiet second the
    /// caches (buffer pool, command arenas, id maps) are handed back.
    last_busy: Instant,
    trimmed: bool,
    log: Logger,
}

impl<H: Handler> EventLoop<H> {
    fn run(&mut self) {
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poller.wait(&mut self.events, timeout) {
                self.log.log(Topic::Internal, LogLevel::Error, || format!("tcpframe: wait failed: {e}"));
                std::thread::sleep(Duration::from_millis(10)); // never spin on a broken poller
            }
            // When the wait returned: deadlines are judged against this, so a
            // slow callback later in the iteration makes no one look idle
            // (what arrived meanwhile is read first, at the next wait).
            let now = Instant::now();
            if self.events.is_empty() {
                if !self.trimmed && now >= self.last_busy + QUIET_TRIM {
                    self.trim();
                }
            } else {
                self.last_busy = now;
                self.trimmed = false;
            }
            self.drain_if_asked();
            let events = std::mem::take(&mut self.events);
            // Host commands first: a close or a stop requested before this
            // wake-up takes effect before any more input is delivered.
            let woken = events.iter().any(|ev| ev.token == WAKER);
            let stop_flagged =
                self.shutdown_deadline.is_none() && self.shared.stopping.load(Ordering::Acquire);
            if woken || stop_flagged {
                self.guarded(None, |lp| lp.drain_inbox());
            }
            let mut accept = false;
            for ev in &events {
                match ev.token {
                    LISTENER => accept = true,
                    WAKER => {}
                    t => {
                        let slot = (t - FIRST_CONN) as u32;
                        self.guarded(Some(slot), |lp| lp.conn_event(slot, ev));
                    }
                }
            }
            self.events = events;
            // What a pause held back goes to the host before anything newer.
            self.guarded(None, |lp| lp.deliver_resumed());
            let deliver =
                !self.shared.stopping.load(Ordering::Acquire) && !self.shared.silent.load(Ordering::Acquire);
            self.handler.end_of_reads(deliver);
            if accept {
                self.guarded(None, |lp| lp.accept_burst(now));
            }
            self.resume_accept(now);
            self.expire_idle(now);
            self.expire_lingering(now);
            self.expire_connects(now);
            self.expire_proxy_headers(now);
            // Frames queued and closes requested from on_close go out now,
            // not at some later unrelated event.
            for _ in 0..FLUSH_PASSES {
                self.flush();
                self.close_phase(now);
                if !self.has_ready_work() {
                    break;
                }
            }
            self.notify_writable();
            self.check_slow(now);
            self.resync_interest();
            // Connections or the listener waiting for room in the pull queue:
            // the host's next poll that makes room must wake the loop.
            self.handler.end_of_iteration(!self.paused.is_empty() || self.accept_blocked);
            self.resume_paused();
            if let Some(deadline) = self.shutdown_deadline {
                if self.state.borrow().len() == 0 || Instant::now() >= deadline {
                    self.close_all();
                    self.handler.end_of_iteration(false);
                    return;
                }
            }
        }
    }

    /// Runs one phase for one connection (or for the loop) and turns a panic
    /// into a closed connection (or a log line): the loop goes on.
    fn guarded(&mut self, slot: Option<u32>, f: impl FnOnce(&mut Self)) {
        if catch_unwind(AssertUnwindSafe(|| f(self))).is_err() {
            self.log.log(Topic::Internal, LogLevel::Error, || {
                "tcpframe: internal error (panic) caught in the loop".into()
            });
            if let Ok(mut st) = self.state.try_borrow_mut() {
                st.current = (0, NIL);
                if let Some(slot) = slot {
                    st.mark_closing(slot, CloseReason::Io);
                }
            }
        }
    }

    /// A quiet second: hand back what busy times left cached, so that a
    /// server that went idle holds no more than its connections need.
    fn trim(&mut self) {
        self.trimmed = true;
        self.events = Vec::new();
        self.cmds = Vec::new();
        self.pending = IdMap::default();
        {
            let mut inbox = self.shared.lock_inbox();
            inbox.cmds.shrink_to_fit();
            inbox.pending.shrink_to_fit();
            inbox.registry.shrink_to_fit();
        }
        let mut st = self.state.borrow_mut();
        st.pool = Vec::new();
        st.ids.shrink_to_fit();
        st.dirty.shrink_to_fit();
        st.closing.shrink_to_fit();
        st.lingering.shrink_to_fit();
    }

    /// Queued frames not yet written, or connections ready to be closed.
    fn has_ready_work(&self) -> bool {
        let st = self.state.borrow();
        !st.dirty.is_empty()
            || !st.resumed.is_empty()
            || !st.resync.is_empty()
            || st.closing.iter().any(|&s| st.get(s).is_some_and(|c| c.ready_to_close()))
    }

    /// Milliseconds until the nearest deadline, rounded up so that a deadline
    /// less than a millisecond away is not a zero-timeout spin. -1: none;
    /// 0 only when work is already waiting.
    fn next_timeout(&self) -> i32 {
        if self.has_ready_work() || (!self.drained && self.shared.drain_requested.load(Ordering::Acquire)) {
            return 0;
        }
        let mut next: Option<Instant> = self.shutdown_deadline;
        if !self.trimmed {
            next = Some(next.map_or(self.last_busy + QUIET_TRIM, |n| n.min(self.last_busy + QUIET_TRIM)));
        }
        let mut consider = |d: Instant| next = Some(next.map_or(d, |n| n.min(d)));
        if let Some(d) = self.accept_paused_until {
            consider(d);
        }
        let st = self.state.borrow();
        if let Some(t) = self.idle_timeout {
            if let Some(c) = st.get(st.idle_head) {
                consider(c.last_frame + t);
            }
        }
        if let Some(d) = st.next_linger_deadline() {
            consider(d);
        }
        if let Some(d) = st.next_slow_deadline() {
            consider(d);
        }
        if let Some(&(d, _, _)) = st.connect_deadlines.front() {
            consider(d);
        }
        if let Some(&(d, _, _)) = st.proxy_deadlines.front() {
            consider(d);
        }
        match next {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                let ms = left.as_nanos().div_ceil(1_000_000);
                ms.min(i32::MAX as u128) as i32
            }
        }
    }
}

//! The loop thread: wait, accept, read and dispatch, apply host commands,
//! flush once per iteration, expire idle connections, close, repeat.
//!
//! Callbacks run with no borrow of the loop's state held, so a callback may
//! call tf_send / tf_conn_close on its own server: those reach the state
//! through a thread-local link, with no lock and no system call.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::config::{Config, LogLevel, LogSink};
use crate::conn::{encoded_len, CloseReason, Conn, NIL};
use crate::error::{Error, Result};
use crate::frame::{DecodeError, Decoder, Flow};
use crate::server::{bump, drop_count, full_error, IdMap, Shared, CMD_CLOSE, CMD_HEADER, CMD_SEND};
use crate::sys::{self, Backend, Event, Interest, Poller};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
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

/// Per-loop read buffer: whole frames are dispatched from it in place.
const SCRATCH: usize = 64 * 1024;
/// Reads per connection per wake-up, so one fast peer cannot starve others.
const READS_PER_WAKE: usize = 16;
/// Accepts per wake-up, for the same reason.
const ACCEPTS_PER_WAKE: usize = 256;
/// How long accepting pauses when descriptors run out and shedding failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Output buffers kept for reuse by the whole loop (each at most
/// RETAIN_OUT bytes: at most 1 MiB in all).
const POOL_MAX: usize = 32;
/// A command arena larger than this is freed after use.
const ARENA_RETAIN: usize = 1 << 20;
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
    fn on_message(&mut self, conn: u64, data: &[u8]);
    fn on_close(&mut self, conn: u64, reason: CloseReason);
    /// False while the consumer cannot take more (reading pauses).
    fn wants_input(&mut self) -> bool {
        true
    }
    /// Called once per loop iteration, before the loop sleeps; `paused`
    /// says that some connection is not read because wants_input said no.
    fn end_of_iteration(&mut self, paused: bool) {
        let _ = paused;
    }
}

/// The loop's connection table and write side. Borrowed only between
/// callbacks, by the loop itself or by tf_send/tf_conn_close on its thread.
pub struct State {
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    ids: IdMap<u32>,
    /// Slots with frames queued this iteration.
    dirty: Vec<u32>,
    /// Slots marked for closing.
    closing: Vec<u32>,
    /// Empty output buffers for reuse: no allocation per frame when busy,
    /// no buffer held by an idle connection.
    pool: Vec<Vec<u8>>,
    idle_head: u32,
    idle_tail: u32,
    track_idle: bool,
    max_queued_output: u64,
    /// The connection whose frames are being dispatched (id 0: none), so
    /// that the common reply to the sender skips the id lookup.
    current: (u64, u32),
}

impl State {
    fn new(track_idle: bool, max_queued_output: u64) -> State {
        State {
            conns: Vec::new(),
            free: Vec::new(),
            ids: IdMap::default(),
            dirty: Vec::new(),
            closing: Vec::new(),
            pool: Vec::new(),
            idle_head: NIL,
            idle_tail: NIL,
            track_idle,
            max_queued_output,
            current: (0, NIL),
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn get(&self, slot: u32) -> Option<&Conn> {
        self.conns.get(slot as usize).and_then(|c| c.as_ref())
    }

    fn get_mut(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).and_then(|c| c.as_mut())
    }

    /// The connection in `slot`, if it is still the one named `id`.
    fn get_id(&mut self, slot: u32, id: u64) -> Option<&mut Conn> {
        self.get_mut(slot).filter(|c| c.id == id)
    }

    fn insert(&mut self, conn: Conn) -> u32 {
        let id = conn.id;
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s as usize] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        self.ids.insert(id, slot);
        if self.track_idle {
            self.idle_push_back(slot);
        }
        slot
    }

    fn remove(&mut self, slot: u32) -> Option<Conn> {
        self.idle_unlink(slot);
        let conn = self.conns.get_mut(slot as usize)?.take()?;
        self.ids.remove(&conn.id);
        self.free.push(slot);
        Some(conn)
    }

    fn conn_mut(&mut self, slot: u32) -> &mut Conn {
        self.conns[slot as usize].as_mut().expect("linked slot holds a connection")
    }

    fn idle_push_back(&mut self, slot: u32) {
        let tail = self.idle_tail;
        {
            let c = self.conn_mut(slot);
            c.idle_prev = tail;
            c.idle_next = NIL;
        }
        if tail == NIL {
            self.idle_head = slot;
        } else {
            self.conn_mut(tail).idle_next = slot;
        }
        self.idle_tail = slot;
    }

    fn idle_unlink(&mut self, slot: u32) {
        let head = self.idle_head;
        let Some(c) = self.get_mut(slot) else { return };
        let (prev, next) = (c.idle_prev, c.idle_next);
        if prev == NIL && next == NIL && head != slot {
            return; // not linked
        }
        c.idle_prev = NIL;
        c.idle_next = NIL;
        if prev == NIL {
            self.idle_head = next;
        } else {
            self.conn_mut(prev).idle_next = next;
        }
        if next == NIL {
            self.idle_tail = prev;
        } else {
            self.conn_mut(next).idle_prev = prev;
        }
    }

    /// A complete frame arrived: the connection moves to the back of the
    /// idle order, which therefore stays sorted by last activity.
    fn idle_touch(&mut self, slot: u32, now: Instant) {
        if let Some(c) = self.get_mut(slot) {
            c.last_frame = now;
        }
        if self.track_idle && self.idle_tail != slot {
            self.idle_unlink(slot);
            self.idle_push_back(slot);
        }
    }

    fn mark_dirty(&mut self, slot: u32) {
        if let Some(c) = self.get_mut(slot) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    fn mark_closing(&mut self, slot: u32, reason: CloseReason) {
        let Some(c) = self.get_mut(slot) else { return };
        c.mark_closing(reason);
        if !c.in_closing_list {
            c.in_closing_list = true;
            self.closing.push(slot);
        }
    }

    fn queue_frame(&mut self, slot: u32, payload: &[u8]) {
        let pool = &mut self.pool;
        if let Some(c) = self.conns.get_mut(slot as usize).and_then(|c| c.as_mut()) {
            c.push_frame(payload, || pool.pop().unwrap_or_default());
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// tf_send on the loop thread: checked and queued synchronously.
    fn send(&mut self, id: u64, payload: &[u8]) -> Result<()> {
        let slot = match self.current {
            (cur, slot) if cur == id => slot,
            _ => *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?,
        };
        let limit = self.max_queued_output;
        let c = self.get_id(slot, id).ok_or_else(|| Error::no_conn(id))?;
        if !c.takes_frames() || c.shared.close_requested.load(Ordering::Acquire) {
            return Err(Error::no_conn(id));
        }
        c.shared
            .reserve(encoded_len(payload.len()), limit)
            .map_err(|_| full_error(id, payload.len(), limit))?;
        self.queue_frame(slot, payload);
        Ok(())
    }

    /// tf_conn_close on the loop thread.
    fn close(&mut self, id: u64) -> Result<()> {
        let slot = *self.ids.get(&id).ok_or_else(|| Error::no_conn(id))?;
        let c = self.get_mut(slot).ok_or_else(|| Error::no_conn(id))?;
        if c.shared.close_requested.swap(true, Ordering::AcqRel) {
            return Err(Error::no_conn(id));
        }
        self.mark_closing(slot, CloseReason::Local);
        Ok(())
    }

    /// Applies one host command; the host already checked and reserved.
    fn apply(&mut self, kind: u8, id: u64, payload: &[u8]) {
        let Some(&slot) = self.ids.get(&id) else { return };
        let Some(c) = self.get_mut(slot) else { return };
        match kind {
            CMD_SEND if c.is_flushing() => {
                // Accepted before tf_conn_close or stop: still written.
                self.queue_frame(slot, payload)
            }
            CMD_SEND => c.shared.release(encoded_len(payload.len())),
            CMD_CLOSE => self.mark_closing(slot, CloseReason::Local),
            _ => {}
        }
    }
}

/// Links this thread to the loop it runs, for tf_send from callbacks.
struct Link {
    shared: *const Shared,
    state: Rc<RefCell<State>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Link>> = const { RefCell::new(None) };
}

fn with_local<R>(shared: &Shared, f: impl FnOnce(&mut State) -> R) -> Option<R> {
    CURRENT.with(|cur| {
        let cur = cur.borrow();
        let link = cur.as_ref().filter(|l| std::ptr::eq(l.shared, shared))?;
        // Busy only when the loop itself calls out while holding the state
        // (the log callback): then the host path, with its lock, is used.
        let mut state = link.state.try_borrow_mut().ok()?;
        Some(f(&mut state))
    })
}

/// True on the loop thread of any server: inside some tcpframe callback.
pub fn on_any_loop_thread() -> bool {
    CURRENT.with(|cur| cur.borrow().is_some())
}

/// tf_send from inside a callback of this server; None on any other thread.
pub fn local_send(shared: &Shared, id: u64, payload: &[u8]) -> Option<Result<()>> {
    with_local(shared, |st| st.send(id, payload))
}

/// tf_conn_close from inside a callback of this server; None elsewhere.
pub fn local_close(shared: &Shared, id: u64) -> Option<Result<()>> {
    with_local(shared, |st| st.close(id))
}

/// What a diagnostic is about. Each kind has its own rate limit, so that a
/// flood of one (over-limit connections, say) cannot hide another.
#[derive(Clone, Copy)]
enum Topic {
    Lifecycle = 0,
    Accept,
    Limit,
    Frame,
    Close,
    Internal,
}

#[derive(Default)]
struct Bucket {
    window: Option<Instant>,
    written: u32,
    suppressed: u64,
}

/// Rate-limited diagnostics for the host's log.
struct Logger {
    sink: Option<LogSink>,
    /// Set when the host freed the server from a callback: no more calls.
    shared: Arc<Shared>,
    buckets: [Bucket; 6],
}

impl Logger {
    fn log(&mut self, topic: Topic, level: LogLevel, msg: impl FnOnce() -> String) {
        let Some(sink) = &self.sink else { return };
        if self.shared.silent.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let b = &mut self.buckets[topic as usize];
        if b.window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1)) {
            if b.suppressed > 0 {
                let note = format!("tcpframe: {} similar log messages suppressed (rate limit)", b.suppressed);
                sink(LogLevel::Warn, &note);
            }
            *b = Bucket { window: Some(now), written: 0, suppressed: 0 };
        }
        if b.written >= LOG_PER_SECOND {
            b.suppressed += 1;
            return;
        }
        b.written += 1;
        sink(level, &msg());
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
    local: SocketAddr,
    backend: Backend,
    handler: H,
    scratch: Vec<u8>,
    events: Vec<Event>,
    /// The other half of the command arena's double buffer.
    cmds: Vec<u8>,
    next_id: u64,
    max_connections: usize,
    max_frame: u32,
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

impl<H: Handler> Starter<H> {
    /// Gathers what the loop needs on the host thread; the loop's own state
    /// (which holds an `Rc`) is created on the loop thread, in `run`.
    pub fn new(
        config: &Config,
        shared: Arc<Shared>,
        poller: Poller,
        listener: OwnedFd,
        local: SocketAddr,
        backend: Backend,
        handler: H,
    ) -> Starter<H> {
        Starter {
            shared,
            poller,
            listener,
            local,
            backend,
            handler,
            max_connections: config.max_connections as usize,
            max_frame: config.max_frame,
            max_queued_output: config.max_queued_output,
            idle_timeout: (config.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(config.idle_timeout_ms as u64)),
            log: config.log.clone(),
        }
    }
}

/// Everything the loop needs, in a form that may move to the new thread.
pub struct Starter<H: Handler> {
    shared: Arc<Shared>,
    poller: Poller,
    listener: OwnedFd,
    local: SocketAddr,
    backend: Backend,
    handler: H,
    max_connections: usize,
    max_frame: u32,
    max_queued_output: u64,
    idle_timeout: Option<Duration>,
    log: Option<LogSink>,
}

impl<H: Handler> Starter<H> {
    /// Runs the loop on the current thread until the server stops.
    pub fn run(self) {
        let state = Rc::new(RefCell::new(State::new(self.idle_timeout.is_some(), self.max_queued_output)));
        let mut lp = EventLoop {
            shared: self.shared.clone(),
            state: state.clone(),
            poller: self.poller,
            listener: Some(self.listener),
            local: self.local,
            backend: self.backend,
            handler: self.handler,
            scratch: vec![0u8; SCRATCH],
            events: Vec::with_capacity(256),
            cmds: Vec::new(),
            next_id: 1,
            max_connections: self.max_connections,
            max_frame: self.max_frame,
            idle_timeout: self.idle_timeout,
            spare_fd: File::open("/dev/null").ok(),
            accept_paused_until: None,
            shutdown_deadline: None,
            paused: Vec::new(),
            accept_blocked: false,
            last_busy: Instant::now(),
            trimmed: true,
            log: Logger { sink: self.log, shared: self.shared.clone(), buckets: Default::default() },
        };
        CURRENT.with(|c| {
            *c.borrow_mut() = Some(Link { shared: Arc::as_ptr(&lp.shared), state });
        });
        let (local, backend) = (lp.local, lp.backend);
        lp.log.log(Topic::Lifecycle, LogLevel::Info, || {
            format!("tcpframe: listening on {local} ({backend:?} backend)")
        });
        lp.run();
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

impl<H: Handler> EventLoop<H> {
    fn run(&mut self) {
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poller.wait(&mut self.events, timeout) {
                self.log.log(Topic::Internal, LogLevel::Error, || format!("tcpframe: wait failed: {e}"));
                std::thread::sleep(Duration::from_millis(10)); // never spin on a broken poller
            }
            let now = Instant::now();
            if self.events.is_empty() {
                if !self.trimmed && now >= self.last_busy + QUIET_TRIM {
                    self.trim();
                }
            } else {
                self.last_busy = now;
                self.trimmed = false;
            }
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
                        self.guarded(Some(slot), |lp| lp.conn_event(slot, ev, now));
                    }
                }
            }
            self.events = events;
            if accept {
                self.guarded(None, |lp| lp.accept_burst(now));
            }
            self.resume_accept(now);
            self.expire_idle(now);
            // Frames queued and closes requested from on_close go out now,
            // not at some later unrelated event.
            for _ in 0..FLUSH_PASSES {
                self.flush();
                self.close_phase(now);
                if !self.has_ready_work() {
                    break;
                }
            }
            self.handler.end_of_iteration(!self.paused.is_empty());
            self.resume_paused(now);
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
            if let (Some(slot), Ok(mut st)) = (slot, self.state.try_borrow_mut()) {
                st.mark_closing(slot, CloseReason::Io);
            }
        }
    }

    /// A quiet second: hand back what busy times left cached, so that a
    /// server that went idle holds no more than its connections need.
    fn trim(&mut self) {
        self.trimmed = true;
        self.cmds = Vec::new();
        self.events = Vec::new();
        {
            let mut inbox = self.shared.lock_inbox();
            if inbox.cmds.is_empty() {
                inbox.cmds = Vec::new();
            }
            inbox.registry.shrink_to_fit();
        }
        let mut st = self.state.borrow_mut();
        st.pool = Vec::new();
        st.ids.shrink_to_fit();
        st.dirty.shrink_to_fit();
        st.closing.shrink_to_fit();
    }

    /// Queued frames not yet written, or connections ready to be closed.
    fn has_ready_work(&self) -> bool {
        let st = self.state.borrow();
        !st.dirty.is_empty() || st.closing.iter().any(|&s| st.get(s).is_some_and(|c| c.ready_to_close()))
    }

    /// Milliseconds until the nearest deadline, rounded up so that a deadline
    /// less than a millisecond away is not a zero-timeout spin. -1: none;
    /// 0 only when work is already waiting.
    fn next_timeout(&self) -> i32 {
        if self.has_ready_work() {
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
        if let Some(t) = self.idle_timeout {
            let st = self.state.borrow();
            if let Some(c) = st.get(st.idle_head) {
                consider(c.last_frame + t);
            }
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

    fn sync_interest(&mut self, slot: u32) {
        let mut st = self.state.borrow_mut();
        let Some(c) = st.get_mut(slot) else { return };
        let want = c.wanted_interest();
        let (fd, token) = (sys::raw(&c.fd), slot as usize + FIRST_CONN);
        let result = if want == Interest::NONE {
            if c.registered {
                self.poller.delete(fd, token);
                c.registered = false;
            }
            Ok(())
        } else if !c.registered {
            c.registered = true;
            c.interest = want;
            self.poller.add(fd, token, want)
        } else if want != c.interest {
            c.interest = want;
            self.poller.modify(fd, token, want)
        } else {
            Ok(())
        };
        {
            if let Err(e) = result {
                drop(st);
                self.log.log(Topic::Internal, LogLevel::Error, || {
                    format!("tcpframe: cannot watch a connection: {e}")
                });
                self.state.borrow_mut().mark_closing(slot, CloseReason::Io);
            }
        }
    }

    fn conn_event(&mut self, slot: u32, ev: &Event, now: Instant) {
        if ev.readable || ev.error {
            self.read_ready(slot, now);
        }
        let mut st = self.state.borrow_mut();
        let Some(c) = st.get_mut(slot) else { return };
        if (ev.writable || ev.error) && c.has_output() {
            st.mark_dirty(slot);
        } else if ev.error && c.eof && !c.has_output() {
            // Hung up with nothing left to say: close, or the level-triggered
            // hang-up would wake us forever.
            st.mark_closing(slot, CloseReason::Peer);
        }
    }

    /// Reads what the peer sent and delivers every whole frame.
    fn read_ready(&mut self, slot: u32, now: Instant) {
        let (fd, id, reading, paused) = {
            let st = self.state.borrow();
            let Some(c) = st.get(slot) else { return };
            if c.eof {
                return;
            }
            let reading = c.is_reading() && !c.shared.close_requested.load(Ordering::Acquire);
            (sys::raw(&c.fd), c.id, reading, c.paused)
        };
        if paused {
            return;
        }
        if !reading {
            return self.discard_ready(slot, fd);
        }
        if !self.handler.wants_input() {
            // Pull mode backpressure: stop watching, resume when drained.
            self.state.borrow_mut().get_mut(slot).expect("checked above").paused = true;
            self.paused.push(slot);
            return self.sync_interest(slot);
        }
        let (mut decoder, cshared) = {
            let mut st = self.state.borrow_mut();
            st.current = (id, slot);
            let c = st.conn_mut(slot);
            (std::mem::replace(&mut c.decoder, Decoder::new(self.max_frame)), c.shared.clone())
        };
        let Self { shared, handler, scratch, .. } = self;
        let stats = &shared.stats;
        let mut delivered = 0u64;
        let mut eof = false;
        let mut failure: Option<(CloseReason, String)> = None;
        for _ in 0..READS_PER_WAKE {
            let n = match sys::recv(fd, scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    let reason = if is_reset(&e) { CloseReason::Peer } else { CloseReason::Io };
                    failure = Some((reason, format!("read: {e}")));
                    break;
                }
            };
            bump(&stats.bytes_received, n as u64);
            let fed = decoder.feed(&scratch[..n], &mut |frame| {
                if shared.stopping.load(Ordering::Relaxed) {
                    return Flow::Stop;
                }
                bump(&stats.frames_received, 1);
                #[cfg(feature = "fault-injection")]
                if frame == crate::server::PANIC_PAYLOAD {
                    panic!("fault injection: panic while dispatching a frame");
                }
                handler.on_message(id, frame);
                delivered += 1;
                // During dispatch a connection stops being read only through
                // tf_conn_close (which sets this flag first, on any thread) or
                // a stop; nothing removes it before the close phase.
                if cshared.close_requested.load(Ordering::Relaxed) {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            });
            match fed {
                Ok(Flow::Continue) if n < scratch.len() => break, // drained
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break,
                Err(DecodeError::TooLarge { announced, max }) => {
                    failure = Some((
                        CloseReason::TooLarge,
                        format!("announced a frame of {announced} bytes (max frame {max})"),
                    ));
                    break;
                }
            }
        }
        let mut st = self.state.borrow_mut();
        st.current = (0, NIL);
        let Some(c) = st.get_id(slot, id) else { return };
        if c.is_reading() {
            c.decoder = decoder;
        }
        if eof {
            c.eof = true;
        }
        if delivered > 0 {
            st.idle_touch(slot, now);
        }
        if eof {
            st.mark_closing(slot, CloseReason::Peer);
        }
        if let Some((reason, why)) = failure {
            let c = st.conn_mut(slot);
            c.eof = true;
            c.discard_output();
            st.mark_closing(slot, reason);
            drop(st);
            let level = if reason == CloseReason::TooLarge { LogLevel::Warn } else { LogLevel::Info };
            let topic = if reason == CloseReason::TooLarge { Topic::Frame } else { Topic::Close };
            self.log.log(topic, level, || format!("tcpframe: connection {id} closed: {why}"));
        } else {
            drop(st);
        }
        self.sync_interest(slot);
    }

    /// A closing connection's input is read and dropped, so that its final
    /// close is not a reset that destroys the replies it is still owed.
    fn discard_ready(&mut self, slot: u32, fd: i32) {
        let mut eof = false;
        let mut failed = false;
        for _ in 0..READS_PER_WAKE {
            match sys::recv(fd, &mut self.scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => bump(&self.shared.stats.bytes_received, n as u64),
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if eof || failed {
            let mut st = self.state.borrow_mut();
            if let Some(c) = st.get_mut(slot) {
                c.eof = true;
                if failed {
                    c.discard_output();
                    st.mark_closing(slot, CloseReason::Io);
                }
            }
            drop(st);
            self.sync_interest(slot);
        }
    }

    fn accept_burst(&mut self, now: Instant) {
        if !self.handler.wants_input() {
            // Pull mode with a full queue: new connections wait in the
            // backlog until the host catches up (resume_paused re-arms).
            if let Some(l) = &self.listener {
                let _ = self.poller.modify(sys::raw(l), LISTENER, Interest::NONE);
            }
            self.accept_blocked = true;
            return;
        }
        for _ in 0..ACCEPTS_PER_WAKE {
            let Some(listener) = self.listener.as_ref().map(sys::raw) else { return };
            match sys::accept(listener) {
                Ok(a) => self.admit(a, now),
                Err(e) if would_block(&e) => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        if !self.shed_one(listener, &e) {
                            self.pause_accept(now, &e);
                            return;
                        }
                    }
                    Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR) => {}
                    _ => {
                        self.pause_accept(now, &e);
                        return;
                    }
                },
            }
        }
    }

    /// Out of descriptors: give back the spare one, accept the waiting
    /// connection and close it at once, take the spare again.
    fn shed_one(&mut self, listener: i32, err: &io::Error) -> bool {
        if self.spare_fd.take().is_none() {
            return false;
        }
        let shed = sys::accept(listener).is_ok();
        self.spare_fd = File::open("/dev/null").ok();
        if shed {
            bump(&self.shared.stats.connections_rejected, 1);
            self.log.log(Topic::Accept, LogLevel::Warn, || {
                format!("tcpframe: out of file descriptors ({err}): a new connection was closed")
            });
        }
        shed && self.spare_fd.is_some()
    }

    fn pause_accept(&mut self, now: Instant, err: &io::Error) {
        if let Some(l) = &self.listener {
            let _ = self.poller.modify(sys::raw(l), LISTENER, Interest::NONE);
        }
        self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
        self.log.log(Topic::Accept, LogLevel::Warn, || {
            format!("tcpframe: accept failed ({err}); pausing accepts for {} ms", ACCEPT_BACKOFF.as_millis())
        });
    }

    fn resume_accept(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            if self.spare_fd.is_none() {
                self.spare_fd = File::open("/dev/null").ok();
            }
            if let Some(l) = &self.listener {
                let _ = self.poller.modify(sys::raw(l), LISTENER, Interest::READ);
            }
        }
    }

    fn admit(&mut self, a: sys::Accepted, now: Instant) {
        let stats = &self.shared.stats;
        if self.shared.stopping.load(Ordering::Acquire) {
            // Stop has begun: no on_connect any more.
            drop(a);
            bump(&stats.connections_rejected, 1);
            return;
        }
        if self.state.borrow().len() >= self.max_connections {
            drop(a);
            bump(&stats.connections_rejected, 1);
            let max = self.max_connections;
            self.log.log(Topic::Limit, LogLevel::Warn, || {
                format!("tcpframe: max connections ({max}) reached: a new connection was closed")
            });
            return;
        }
        let fd = sys::raw(&a.fd);
        debug_assert!(sys::nodelay(fd).unwrap_or(true), "TCP_NODELAY is inherited from the listener");
        let id = self.next_id;
        self.next_id += 1;
        let conn = Conn::new(id, a.fd, self.max_frame, now);
        let cshared = conn.shared.clone();
        let slot = self.state.borrow_mut().insert(conn);
        if let Err(e) = self.poller.add(fd, slot as usize + FIRST_CONN, Interest::READ) {
            self.state.borrow_mut().remove(slot);
            bump(&stats.connections_rejected, 1);
            self.log.log(Topic::Internal, LogLevel::Error, || {
                format!("tcpframe: cannot watch a new connection: {e}")
            });
            return;
        }
        self.shared.lock_inbox().registry.insert(id, cshared);
        let peer = a.peer.map_or_else(|| String::from("unknown"), |p| p.to_string());
        // Counted as active while on_connect runs (stats before callbacks);
        // as accepted once it said yes.
        bump(&self.shared.stats.connections_active, 1);
        if self.handler.on_connect(id, &peer) {
            bump(&self.shared.stats.connections_accepted, 1);
        } else {
            drop_count(&self.shared.stats.connections_active, 1);
            self.shared.lock_inbox().registry.remove(&id);
            if let Some(mut conn) = self.state.borrow_mut().remove(slot) {
                self.poller.delete(fd, slot as usize + FIRST_CONN);
                conn.discard_output();
            }
            bump(&self.shared.stats.connections_rejected, 1);
        }
    }

    /// Applies what host threads queued, and notices a stop request.
    fn drain_inbox(&mut self) {
        self.shared.waker.reset();
        self.shared.wake_pending.store(false, Ordering::SeqCst);
        // Read under the same lock as the swap: a stop seen here comes after
        // every command in the batch, so shutdown begins only once they are applied.
        let stop = {
            let mut inbox = self.shared.lock_inbox();
            std::mem::swap(&mut inbox.cmds, &mut self.cmds);
            inbox.stop_deadline
        };
        let mut give_up_at = stop;
        {
            let mut st = self.state.borrow_mut();
            let mut rest = &self.cmds[..];
            let mut since_check = 0usize;
            while rest.len() >= CMD_HEADER {
                let kind = rest[0];
                let id = u64::from_le_bytes(rest[1..9].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(rest[9..13].try_into().expect("4 bytes")) as usize;
                let (payload, tail) = rest[CMD_HEADER..].split_at(len);
                st.apply(kind, id, payload);
                rest = tail;
                // A huge batch must not hold a stop past its drain time:
                // what is not applied by then could not be written anyway.
                since_check += CMD_HEADER + len;
                if since_check >= APPLY_CHECK_BYTES {
                    since_check = 0;
                    if give_up_at.is_none() && self.shared.stopping.load(Ordering::Acquire) {
                        give_up_at = self.shared.lock_inbox().stop_deadline;
                    }
                    if give_up_at.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                }
            }
        }
        self.cmds.clear();
        if self.cmds.capacity() > ARENA_RETAIN {
            self.cmds = Vec::new();
        }
        if let (Some(deadline), None) = (stop, self.shutdown_deadline) {
            self.begin_shutdown(deadline);
        }
    }

    /// Stop begins: no more accepts or messages; queued output may drain
    /// until the deadline; every connection will close as a shutdown.
    fn begin_shutdown(&mut self, deadline: Instant) {
        self.shutdown_deadline = Some(deadline);
        if let Some(l) = self.listener.take() {
            self.poller.delete(sys::raw(&l), LISTENER);
        }
        self.spare_fd = None;
        self.accept_paused_until = None;
        let mut st = self.state.borrow_mut();
        let slots: Vec<u32> = st.ids.values().copied().collect();
        for slot in slots {
            let c = st.conn_mut(slot);
            c.mark_shutdown();
            c.decoder.clear();
            st.mark_closing(slot, CloseReason::Shutdown);
        }
    }

    fn resume_paused(&mut self, now: Instant) {
        if (self.paused.is_empty() && !self.accept_blocked) || !self.handler.wants_input() {
            return;
        }
        for slot in std::mem::take(&mut self.paused) {
            {
                let mut st = self.state.borrow_mut();
                let Some(c) = st.get_mut(slot) else { continue };
                c.paused = false;
                // Waiting on the host is not the peer being idle.
                st.idle_touch(slot, now);
            }
            self.sync_interest(slot);
            // Data that arrived meanwhile is reported by the next wait.
        }
        if std::mem::take(&mut self.accept_blocked) && self.accept_paused_until.is_none() {
            if let Some(l) = &self.listener {
                let _ = self.poller.modify(sys::raw(l), LISTENER, Interest::READ);
            }
        }
    }

    fn expire_idle(&mut self, now: Instant) {
        let Some(timeout) = self.idle_timeout else { return };
        let mut expired = Vec::new();
        {
            let mut st = self.state.borrow_mut();
            loop {
                let head = st.idle_head;
                let Some(c) = st.get(head) else { break };
                if c.last_frame + timeout > now {
                    break;
                }
                expired.push(c.id);
                st.idle_unlink(head);
                let c = st.conn_mut(head);
                c.eof = true;
                c.discard_output();
                st.mark_closing(head, CloseReason::Idle);
            }
        }
        for id in expired {
            self.log.log(Topic::Close, LogLevel::Info, || {
                format!("tcpframe: connection {id} closed: idle timeout")
            });
        }
    }

    /// One send per connection with queued frames: the write pass before
    /// sleeping. Writability is watched only while bytes remain.
    fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.state.borrow_mut().dirty);
        for &slot in &dirty {
            self.guarded(Some(slot), |lp| lp.flush_one(slot));
        }
        dirty.clear();
        let mut st = self.state.borrow_mut();
        if st.dirty.is_empty() {
            st.dirty = dirty; // keep the allocation
        }
    }

    fn flush_one(&mut self, slot: u32) {
        let stats = &self.shared.stats;
        let mut st = self.state.borrow_mut();
        let Some(c) = st.get_mut(slot) else { return };
        c.dirty = false;
        if !c.has_output() {
            return;
        }
        match sys::send(sys::raw(&c.fd), &c.out[c.out_pos..]) {
            Ok(n) => {
                bump(&stats.bytes_sent, n as u64);
                let (frames, buf) = c.wrote(n);
                bump(&stats.frames_sent, frames);
                c.want_write = c.has_output();
                if let Some(buf) = buf {
                    if st.pool.len() < POOL_MAX {
                        st.pool.push(buf);
                    }
                }
            }
            Err(e) if would_block(&e) => c.want_write = true,
            Err(e) => {
                c.discard_output();
                c.eof = true;
                let reason = if is_reset(&e) { CloseReason::Peer } else { CloseReason::Io };
                st.mark_closing(slot, reason);
            }
        }
        drop(st);
        self.sync_interest(slot);
    }

    /// Closes every connection that is marked and has nothing left to wait
    /// for, then tells the host. Counters change before the callbacks run.
    fn close_phase(&mut self, now: Instant) {
        let force = self.shutdown_deadline.is_some_and(|d| now >= d);
        let list = std::mem::take(&mut self.state.borrow_mut().closing);
        let mut keep = Vec::new();
        let mut done: Vec<(u64, CloseReason)> = Vec::new();
        for slot in list {
            let ready = {
                let st = self.state.borrow();
                match st.get(slot) {
                    None => continue,
                    Some(c) => force || c.ready_to_close(),
                }
            };
            if !ready {
                keep.push(slot);
                continue;
            }
            let conn = self.state.borrow_mut().remove(slot);
            if let Some(conn) = conn {
                done.push(self.finish(slot, conn));
            }
        }
        self.state.borrow_mut().closing.extend(keep);
        self.report_closed(done);
    }

    fn finish(&mut self, slot: u32, mut conn: Conn) -> (u64, CloseReason) {
        let fd = sys::raw(&conn.fd);
        if conn.registered {
            // Always explicit: if the host forked, a child may still hold the
            // socket open, and epoll would keep reporting it under a token
            // that a new connection may reuse.
            self.poller.delete(fd, slot as usize + FIRST_CONN);
        }
        if !conn.eof {
            let (n, _) = sys::discard_input(fd, &mut self.scratch, 4);
            bump(&self.shared.stats.bytes_received, n);
        }
        conn.discard_output();
        let reason = conn.reported_reason(self.shared.stopping.load(Ordering::Acquire));
        (conn.id, reason) // dropping `conn` closes the descriptor
    }

    fn report_closed(&mut self, done: Vec<(u64, CloseReason)>) {
        if done.is_empty() {
            return;
        }
        {
            let mut inbox = self.shared.lock_inbox();
            for (id, _) in &done {
                inbox.registry.remove(id);
            }
        }
        let stats = &self.shared.stats;
        drop_count(&stats.connections_active, done.len() as u64);
        for &(_, reason) in &done {
            match reason {
                CloseReason::TooLarge => bump(&stats.closed_too_large, 1),
                CloseReason::Idle => bump(&stats.closed_idle, 1),
                _ => {}
            }
        }
        for (id, reason) in done {
            // Re-checked each time: a callback may free the server.
            if self.shared.silent.load(Ordering::Acquire) {
                return;
            }
            self.handler.on_close(id, reason);
        }
    }

    /// The drain is over: close whatever is left.
    fn close_all(&mut self) {
        let slots: Vec<u32> = self.state.borrow().ids.values().copied().collect();
        let mut done = Vec::new();
        for slot in slots {
            let conn = self.state.borrow_mut().remove(slot);
            if let Some(conn) = conn {
                done.push(self.finish(slot, conn));
            }
        }
        self.report_closed(done);
    }
}

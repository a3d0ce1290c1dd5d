//! A running server as host threads see it: start, send, close, stats, stop.
//! Host threads talk to the loop through `Shared`: a command arena behind one
//! mutex, a coalesced wake-up, and counters.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::config::Config;
use crate::conn::{encoded_len, ConnShared};
use crate::error::{Code, Error, Result};
use crate::event_loop::{self, Handler, Starter};
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

/// Record kinds in the command arena.
pub const CMD_SEND: u8 = 1;
pub const CMD_CLOSE: u8 = 2;
/// kind (1) + connection id (8) + payload length (4)
pub const CMD_HEADER: usize = 13;

/// What host threads hand to the loop, under one mutex.
#[derive(Default)]
pub struct Inbox {
    /// Every connection the host may name, with its shared half.
    pub registry: IdMap<Arc<ConnShared>>,
    /// Commands as records [kind][id][len][payload]: one memcpy per send,
    /// no allocation per frame once the arena has grown.
    pub cmds: Vec<u8>,
    /// Set once by tf_server_stop: when the drain ends.
    pub stop_deadline: Option<Instant>,
}

pub fn push_cmd(cmds: &mut Vec<u8>, kind: u8, id: u64, payload: &[u8]) {
    cmds.push(kind);
    cmds.extend_from_slice(&id.to_le_bytes());
    cmds.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    cmds.extend_from_slice(payload);
}

/// Everything a server's host threads and its loop thread share.
pub struct Shared {
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
        let conn = match inbox.registry.get(&id) {
            Some(c) if !c.close_requested.load(Ordering::Acquire) => c,
            _ => return Err(Error::no_conn(id)),
        };
        conn.reserve(encoded_len(payload.len()), self.max_queued_output)
            .map_err(|_| full_error(id, payload.len(), self.max_queued_output))?;
        push_cmd(&mut inbox.cmds, CMD_SEND, id, payload);
        drop(inbox);
        self.wake();
        Ok(())
    }

    fn close_from_host(&self, id: u64) -> Result<()> {
        let mut inbox = self.lock_inbox();
        if inbox.stop_deadline.is_some() {
            return Err(Error::stopped());
        }
        match inbox.registry.get(&id) {
            Some(c) if !c.close_requested.swap(true, Ordering::AcqRel) => {}
            _ => return Err(Error::no_conn(id)),
        }
        push_cmd(&mut inbox.cmds, CMD_CLOSE, id, &[]);
        drop(inbox);
        self.wake();
        Ok(())
    }
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
    fork_generation: u64,
}

impl Server {
    /// Binds, listens and starts the loop thread. Errors are reported here:
    /// nothing runs when this fails.
    pub fn start<H: Handler + Send + 'static>(config: &Config, handler: H) -> Result<Server> {
        let fork_generation = sys::fork_generation();
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
            max_frame: config.max_frame,
            max_queued_output: config.max_queued_output,
            stopping: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            inbox: Mutex::new(Inbox::default()),
            wake_pending: AtomicBool::new(false),
            waker,
            stats: Stats::default(),
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
        Ok(Server {
            shared,
            gate: Mutex::new(Some(gate)),
            thread: Mutex::new(Some(thread)),
            local,
            fork_generation,
        })
    }

    /// Lets the loop run. Called once the host has the handle; dropping the
    /// server without it also opens the gate.
    pub fn open(&self) {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Fails in a child process forked after the server started.
    pub fn check_process(&self) -> Result<()> {
        if sys::fork_generation() != self.fork_generation {
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
            return Err(Error::new(
                Code::TooLarge,
                format!(
                    "payload of {} bytes is longer than max frame ({} bytes)",
                    payload.len(),
                    self.shared.max_frame
                ),
            ));
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

    pub fn stats(&self) -> Result<StatsSnapshot> {
        self.check_process()?;
        Ok(self.shared.stats.snapshot())
    }

    /// True inside a callback of any server (on a loop thread), where
    /// waiting for a loop thread to end could wait for ourselves, or for a
    /// loop that waits for us.
    pub fn in_callback(&self) -> bool {
        event_loop::on_any_loop_thread()
    }

    /// Stops accepting, drains for up to `drain`, closes everything, joins
    /// the loop thread. Idempotent; refused from inside a callback.
    pub fn stop(&self, drain: Duration) -> Result<()> {
        self.check_process()?;
        if self.in_callback() {
            return Err(Error::invalid(
                "tf_server_stop was called from inside a callback (on a tcpframe loop thread): \
                 waiting there could deadlock; call it from another thread",
            ));
        }
        self.shared.begin_stop(drain);
        self.open();
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = thread.take() {
            // The loop catches its own panics; a join error is not expected.
            let _ = handle.join();
        }
        Ok(())
    }

    /// Freed from inside one of its own callbacks: stop at once, run no
    /// callback again, and let the loop thread finish on its own.
    pub fn abandon_from_callback(self) {
        self.shared.silent.store(true, Ordering::Release);
        self.shared.begin_stop(Duration::ZERO);
        self.open();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(handle); // detaches
    }
}

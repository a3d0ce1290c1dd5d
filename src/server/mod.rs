//! A running server as host threads see it: start, stop and free (calls.rs
//! has the per-connection calls). Host threads talk to the loop through
//! `crate::shared::Shared`.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

mod calls;

use crate::addr::Address;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::event_loop::{self, Handler, Starter};
use crate::shared::{Inbox, Shared, Stats};
use crate::sys::{self, Interest, Poller, Waker};
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A started server: the handle behind tf_server.
pub struct Server {
    shared: Arc<Shared>,
    /// Holds the loop at its start until the host has its handle (see `open`).
    gate: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The TCP address listened on (None for other transports).
    local: Option<SocketAddr>,
}

/// A server's listening socket as it starts: the descriptor (None with
/// address `none`), the socket file it created, and what to log.
pub struct Listening {
    pub fd: Option<OwnedFd>,
    pub file: Option<sys::SocketFile>,
    pub local: Option<SocketAddr>,
    pub text: String,
    /// fd:N: the host's descriptor, to be given back (left open) if the
    /// start fails after all.
    inherited: bool,
}

impl Listening {
    /// Binds and listens as the address says.
    fn open(config: &Config) -> Result<Listening> {
        let text = config.address.to_string();
        let listen_err = |e| Error::io(format!("listen on {text}"), e);
        let (fd, file, inherited) = match &config.address {
            Address::Tcp(a) => (Some(sys::listen(a, 1024).map_err(listen_err)?.0), None, false),
            Address::Unix(name) => {
                let (fd, file) = sys::listen_unix(name, config.unix_mode, 1024).map_err(listen_err)?;
                (Some(fd), file, false)
            }
            Address::Fd(n) => {
                sys::check_inherited_listener(*n).map_err(|e| {
                    Error::invalid(format!("fd:{n} is not a listening stream socket ({e}); it is left open"))
                })?;
                sys::set_nonblocking_cloexec(*n)
                    .map_err(|e| Error::io(format!("fd:{n}: set non-blocking"), e))?;
                (Some(sys::adopt(*n)), None, true)
            }
            Address::None => (None, None, false),
        };
        let local = fd.as_ref().and_then(|fd| sys::local_addr(sys::raw(fd)));
        Ok(Listening { fd, file, local, text, inherited })
    }

    /// The start failed after all: an inherited descriptor stays open (the
    /// host's again); a socket file we created is removed.
    fn give_back(self) {
        if let Some(fd) = self.fd {
            if self.inherited {
                let _ = fd.into_raw_fd();
            }
        }
        if let Some(f) = &self.file {
            sys::remove_socket_file(f);
        }
    }
}

impl Server {
    /// Binds, listens and starts the loop thread. Errors are reported here:
    /// nothing runs when this fails.
    pub fn start<H: Handler + Send + 'static>(config: &Config, handler: H) -> Result<Server> {
        let epoch = sys::process_epoch();
        let backend = config.resolved_backend();
        let mut poller = Poller::new(backend).map_err(|e| Error::io("create poller", e))?;
        let waker = Waker::new().map_err(|e| Error::io("create eventfd", e))?;
        poller
            .add(waker.fd(), event_loop::WAKER, Interest::READ)
            .map_err(|e| Error::io("register waker", e))?;
        let listening = Listening::open(config)?;
        if let Some(fd) = &listening.fd {
            if let Err(e) = poller.add(sys::raw(fd), event_loop::LISTENER, Interest::READ) {
                listening.give_back();
                return Err(Error::io("register listener", e));
            }
        }
        let local = listening.local;
        let shared = Arc::new(Shared {
            epoch,
            track_writable: config.writable_events,
            max_frame: config.effective_max_frame(),
            format: config.prefix,
            max_queued_output: config.max_queued_output,
            stopping: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            inbox: Mutex::new(Inbox::default()),
            wake_pending: AtomicBool::new(false),
            waker,
            stats: Stats::default(),
            deferred: Mutex::new((false, None)),
            next_id: AtomicU64::new(1),
            conns: AtomicUsize::new(0),
            max_connections: config.max_connections as usize,
            drain_requested: AtomicBool::new(false),
            drained: Mutex::new(false),
            drained_cv: std::sync::Condvar::new(),
        });
        let lp = Starter::new(config, shared.clone(), poller, listening, backend, handler);
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

    /// The bound TCP port; 0 for any other transport.
    pub fn port(&self) -> u16 {
        self.local.map_or(0, |a| a.port())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
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

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
use crate::shared::{Core, Inbox, Shared, Stats};
use crate::sys::{self, Interest, Poller, Waker};
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A started server: the handle behind tf_server. One or more loop threads;
/// connection `id` lives on loop `core.loop_of(id)`.
pub struct Server {
    loops: Vec<Arc<Shared>>,
    core: Arc<Core>,
    /// Holds each loop at its start until the host has its handle (see `open`).
    gates: Mutex<Vec<std::sync::mpsc::Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
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
    pub inherited: bool,
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
        // Logs name the port really bound, not ":0".
        let text = match (&config.address, local) {
            (Address::Tcp(_), Some(bound)) => bound.to_string(),
            _ => text,
        };
        Ok(Listening { fd, file, local, text, inherited })
    }

    /// No listener (loops other than 0).
    fn none(text: &str) -> Listening {
        Listening { fd: None, file: None, local: None, text: text.to_string(), inherited: false }
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
    /// Binds, listens and starts the loop threads (`config.threads`).
    /// Errors are reported here: nothing runs when this fails. `make(i)`
    /// builds loop i's handler (callbacks, or its side of the pull queue).
    pub fn start<H: Handler + Send + 'static>(
        config: &Config,
        mut make: impl FnMut(usize) -> H,
    ) -> Result<Server> {
        let epoch = sys::process_epoch();
        let backend = config.resolved_backend();
        let n = config.resolved_threads();
        let core = Arc::new(Core::new(config.max_connections as usize, n));
        let mut pollers = Vec::with_capacity(n);
        let mut loops = Vec::with_capacity(n);
        for index in 0..n {
            let mut poller = Poller::new(backend).map_err(|e| Error::io("create poller", e))?;
            let waker = Waker::new().map_err(|e| Error::io("create eventfd", e))?;
            poller
                .add(waker.fd(), event_loop::WAKER, Interest::READ)
                .map_err(|e| Error::io("register waker", e))?;
            pollers.push(poller);
            loops.push(Arc::new(Shared {
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
                core: core.clone(),
                index,
                drain_requested: AtomicBool::new(false),
                drained: Mutex::new(false),
                drained_cv: std::sync::Condvar::new(),
                early_drain: Mutex::new(Default::default()),
            }));
        }
        let listening = Listening::open(config)?;
        if let Some(fd) = &listening.fd {
            if let Err(e) = pollers[0].add(sys::raw(fd), event_loop::LISTENER, Interest::READ) {
                listening.give_back();
                return Err(Error::io("register listener", e));
            }
        }
        let local = listening.local;
        let text = listening.text.clone();
        let mut listening = Some(listening);
        let mut gates = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for (index, poller) in pollers.into_iter().enumerate() {
            let l =
                if index == 0 { listening.take().expect("loop 0 listens") } else { Listening::none(&text) };
            let lp =
                Starter::new(config, loops[index].clone(), poller, l, backend, make(index), loops.clone());
            let (gate, opened) = std::sync::mpsc::channel::<()>();
            let spawned =
                std::thread::Builder::new().name(format!("tcpframe-loop-{index}")).spawn(move || {
                    // Wait until tf_server_start has written *out (or gave up):
                    // no callback may run before the host holds its handle.
                    let _ = opened.recv();
                    lp.run()
                });
            match spawned {
                Ok(t) => {
                    gates.push(gate);
                    threads.push(t);
                }
                Err(e) => {
                    // Stop the loops already started, then report.
                    for sh in &loops {
                        sh.begin_stop(Duration::ZERO);
                    }
                    drop(gates);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(Error::io("spawn a loop thread", e));
                }
            }
        }
        Ok(Server { loops, core, gates: Mutex::new(gates), threads: Mutex::new(threads), local })
    }

    /// Lets the loop run. Called once the host has the handle; dropping the
    /// server without it also opens the gate.
    pub fn open(&self) {
        self.gates.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Fails in a child process forked after the server started.
    #[inline]
    pub fn check_process(&self) -> Result<()> {
        if sys::process_epoch() != self.loops[0].epoch {
            Err(forked())
        } else {
            Ok(())
        }
    }

    /// The bound TCP port; 0 for any other transport.
    pub fn port(&self) -> u16 {
        self.local.map_or(0, |a| a.port())
    }

    /// Every loop's shared state, loop 0 first.
    pub fn loops(&self) -> &[Arc<Shared>] {
        &self.loops
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Loop 0: the listener's, and the one for server-wide flags.
    pub(crate) fn first(&self) -> &Arc<Shared> {
        &self.loops[0]
    }

    /// The loop connection `id` lives on.
    pub(crate) fn route(&self, id: u64) -> &Arc<Shared> {
        &self.loops[self.core.loop_of(id)]
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
        for sh in &self.loops {
            sh.begin_stop(drain);
        }
        self.open();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for handle in threads {
            // The loop catches its own panics; a join error is not expected.
            let _ = handle.join();
        }
        // Another stop may have taken the handles first and still be
        // joining them: wait for the loops themselves.
        self.core.wait_loops_ended();
    }

    /// tf_server_free's first half: stops the server so that no callback
    /// of it can run again, waiting for its loop thread where that is safe.
    /// Returns Freed::Now when the handle may be dropped at once, or
    /// Freed::ByLoop when the loop thread must drop it (see `Shared::defer_drop`).
    pub fn stop_for_free(&self) -> Freed {
        let mine = Arc::as_ptr(&self.core) as usize;
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
        for sh in &self.loops {
            sh.silent.store(true, Ordering::Release);
            sh.begin_stop(Duration::ZERO);
        }
        self.open();
        // Detached: each ends on its own.
        self.threads.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// The error of every call in a forked child (out of the hot path).
#[cold]
fn forked() -> Error {
    Error::forked()
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

    /// One edge: a loop thread of server .0 waits for every loop of .1.
    pub struct Guard(usize, usize);

    impl Drop for Guard {
        fn drop(&mut self) {
            let mut w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
            // Only this wait's edge: another loop thread of the same server
            // may be waiting too, for another server.
            if let Some(i) = w.iter().position(|&e| e == (self.0, self.1)) {
                w.swap_remove(i);
            }
        }
    }

    /// Records that a loop of server `waiter` is about to wait for the loops
    /// of server `target`; None when that would close a cycle. A server with
    /// several loop threads can wait for several servers at once: every
    /// edge is followed, not only the first.
    pub fn enter(waiter: usize, target: usize) -> Option<Guard> {
        let mut w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = vec![target];
        let mut i = 0;
        while i < seen.len() {
            let at = seen[i];
            if at == waiter {
                return None;
            }
            for &(x, next) in w.iter() {
                if x == at && !seen.contains(&next) {
                    seen.push(next);
                }
            }
            i += 1;
        }
        w.push((waiter, target));
        Some(Guard(waiter, target))
    }
}

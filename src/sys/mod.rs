//! The operating system behind a small contract: sockets, a waker, the fork
//! generation and the poller backends. Every `unsafe` outside `ffi/` is here.

pub mod epoll;
pub mod poll;
mod socket;
mod waker;

pub use socket::{accept, discard_input, listen, nodelay, raw, recv, send, Accepted};
pub use waker::Waker;

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// What a registered descriptor is watched for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    pub const NONE: Interest = Interest { read: false, write: false };
    pub const READ: Interest = Interest { read: true, write: false };
}

/// One readiness report. `error` covers hang-up and socket errors: the owner
/// reads or writes to find out which.
#[derive(Clone, Copy, Debug, Default)]
pub struct Event {
    pub token: usize,
    pub readable: bool,
    pub writable: bool,
    pub error: bool,
}

/// Which kernel interface waits for readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Poll,
    Epoll,
}

/// The poller contract: register, change, forget, wait. Level-triggered.
pub enum Poller {
    Poll(poll::PollPoller),
    Epoll(epoll::EpollPoller),
}

impl Poller {
    pub fn new(backend: Backend) -> io::Result<Poller> {
        Ok(match backend {
            Backend::Poll => Poller::Poll(poll::PollPoller::new()),
            Backend::Epoll => Poller::Epoll(epoll::EpollPoller::new()?),
        })
    }

    pub fn add(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        match self {
            Poller::Poll(p) => p.add(fd, token, interest),
            Poller::Epoll(p) => p.add(fd, token, interest),
        }
    }

    pub fn modify(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        match self {
            Poller::Poll(p) => p.modify(token, interest),
            Poller::Epoll(p) => p.modify(fd, token, interest),
        }
    }

    pub fn delete(&mut self, fd: RawFd, token: usize) {
        match self {
            Poller::Poll(p) => p.delete(token),
            Poller::Epoll(p) => p.delete(fd),
        }
    }

    /// Waits up to `timeout_ms` (-1: forever) and replaces `events` with what is ready.
    pub fn wait(&mut self, events: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        events.clear();
        match self {
            Poller::Poll(p) => p.wait(events, timeout_ms),
            Poller::Epoll(p) => p.wait(events, timeout_ms),
        }
    }
}

static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::SeqCst);
}

/// How many times this process image has been forked into a child: a server
/// remembers the value at start and is unusable where it differs. Reading it
/// costs an atomic load, not a getpid() system call.
pub fn fork_generation() -> u64 {
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic; it is
        // async-signal-safe, which is what a child-side atfork handler needs.
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
    FORK_GENERATION.load(Ordering::SeqCst)
}

/// Retries a system call wrapper while it fails with EINTR.
pub(crate) fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Converts a libc return value (-1 on error) into an `io::Result`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

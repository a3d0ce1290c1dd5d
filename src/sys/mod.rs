//! The operating system behind a small contract: sockets, a waker, the fork
//! generation and the poller backends. Every `unsafe` outside `ffi/` is here.

pub mod epoll;
mod mapbuf;
pub mod poll;
mod socket;
mod unix;
mod waker;

pub use mapbuf::MapBuf;
pub use socket::{
    accept, discard_input, listen, nodelay, raw, recv, send, sendv, set_linger_zero, set_nodelay,
    stop_listening, Accepted,
};
pub use unix::{
    adopt, check_inherited_listener, connect, connect_result, listen_unix, local_addr, peer_cred,
    remove_socket_file, set_nonblocking_cloexec, SocketFile,
};
pub use waker::Waker;

use once_cell::sync::OnceCell;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// One page marked MADV_WIPEONFORK: the kernel hands a child process a
/// zeroed copy of it, however the child was made (fork(), _Fork(), clone()
/// without CLONE_VM), with no atfork handler to skip. It holds this
/// process's epoch; 0 means "a child that has not looked yet".
struct EpochPage(Option<&'static AtomicU64>);

static EPOCH_PAGE: OnceCell<EpochPage> = OnceCell::new();
/// Epochs handed out so far in this process image (inherited by children,
/// so a child's epoch differs from its parent's even with a reused pid).
static EPOCHS: AtomicU64 = AtomicU64::new(0);

#[inline]
fn epoch_page() -> Option<&'static AtomicU64> {
    EPOCH_PAGE
        .get_or_init(|| {
            // SAFETY: an anonymous private mapping of one page; the result is
            // checked before use and the mapping is never unmapped.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return EpochPage(None);
            }
            // SAFETY: `p` is the page just mapped, and page-aligned.
            if unsafe { libc::madvise(p, 4096, libc::MADV_WIPEONFORK) } != 0 {
                // SAFETY: unmaps the page mapped above, used by nothing.
                unsafe { libc::munmap(p, 4096) };
                return EpochPage(None);
            }
            // SAFETY: the page is zeroed, aligned, lives for the process, and
            // is only ever accessed as this one atomic.
            EpochPage(Some(unsafe { &*(p as *const AtomicU64) }))
        })
        .0
}

fn getpid() -> u64 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u64 }
}

/// Identifies this process: it differs in any child made from it, by any
/// kind of fork. A server remembers the value at start and is unusable where
/// it differs. Costs an atomic load (a getpid() call on kernels before 4.14,
/// which lack MADV_WIPEONFORK).
#[inline]
pub fn process_epoch() -> u64 {
    let Some(page) = epoch_page() else { return getpid() };
    let v = page.load(Ordering::Acquire);
    if v != 0 {
        return v;
    }
    // First look in this process (or in a child, whose page was wiped).
    let new = ((EPOCHS.fetch_add(1, Ordering::AcqRel) + 1) << 32) | (getpid() & 0xFFFF_FFFF);
    match page.compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => new,
        Err(current) => current,
    }
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

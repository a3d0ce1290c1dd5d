//! An eventfd that one thread sets and another waits on: wakes the loop, and
//! in pull mode tells the host that events are waiting.

use super::{cvt, cvt_size};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        // SAFETY: plain eventfd(2) call; the result is checked before use.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` is new and owned by no one else.
        Ok(Waker { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Makes the descriptor readable. Never blocks: a saturated counter is
    /// already readable, so EAGAIN is success.
    pub fn set(&self) {
        let one: u64 = 1;
        // SAFETY: writes exactly 8 bytes from a live u64, as eventfd requires.
        let _ = cvt_size(unsafe {
            libc::write(self.fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8)
        });
    }

    /// Makes the descriptor unreadable again.
    pub fn reset(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads exactly 8 bytes into a live u64, as eventfd requires.
        let _ = cvt_size(unsafe {
            libc::read(self.fd.as_raw_fd(), &mut value as *mut u64 as *mut libc::c_void, 8)
        });
    }
}

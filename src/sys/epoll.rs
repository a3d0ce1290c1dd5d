//! epoll(7) backend, level-triggered: the cost of a wake-up depends on the
//! descriptors that are ready, not on how many are registered.

use super::{cvt, Event, Interest};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BATCH: usize = 1024;

pub struct EpollPoller {
    epfd: OwnedFd,
    buf: Vec<libc::epoll_event>,
}

fn events_of(interest: Interest) -> u32 {
    let mut ev = 0;
    if interest.read {
        ev |= libc::EPOLLIN as u32;
    }
    if interest.write {
        ev |= libc::EPOLLOUT as u32;
    }
    ev
}

impl EpollPoller {
    pub fn new() -> io::Result<EpollPoller> {
        // SAFETY: plain epoll_create1(2); the result is checked before use.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(EpollPoller {
            // SAFETY: `fd` is new and owned by no one else.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            buf: vec![libc::epoll_event { events: 0, u64: 0 }; BATCH],
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: events_of(interest), u64: token as u64 };
        // SAFETY: `ev` is a live epoll_event; the kernel copies it.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    pub fn add(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, interest)
    }

    pub fn modify(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, interest)
    }

    pub fn delete(&mut self, fd: RawFd) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, Interest::NONE);
    }

    pub fn wait(&mut self, events: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: `buf` has room for BATCH events.
        let n = match cvt(unsafe {
            libc::epoll_wait(self.epfd.as_raw_fd(), self.buf.as_mut_ptr(), BATCH as i32, timeout_ms)
        }) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        for ev in &self.buf[..n] {
            let r = ev.events;
            events.push(Event {
                token: ev.u64 as usize,
                readable: r & libc::EPOLLIN as u32 != 0,
                writable: r & libc::EPOLLOUT as u32 != 0,
                error: r & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0,
            });
        }
        Ok(())
    }
}

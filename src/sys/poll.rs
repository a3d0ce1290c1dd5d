//! poll(2) backend: the portable baseline. A dense pollfd array with a
//! token -> position index so add, modify and delete are O(1).

use super::{cvt, Event, Interest};
use std::io;
use std::os::fd::RawFd;

const NIL: u32 = u32::MAX;

#[derive(Default)]
pub struct PollPoller {
    fds: Vec<libc::pollfd>,
    tokens: Vec<usize>,
    /// position in `fds` of each token, NIL when absent
    pos: Vec<u32>,
}

fn events_of(interest: Interest) -> libc::c_short {
    let mut ev = 0;
    if interest.read {
        ev |= libc::POLLIN;
    }
    if interest.write {
        ev |= libc::POLLOUT;
    }
    ev
}

impl PollPoller {
    pub fn new() -> PollPoller {
        PollPoller::default()
    }

    pub fn add(&mut self, fd: RawFd, token: usize, interest: Interest) -> io::Result<()> {
        if token >= self.pos.len() {
            self.pos.resize(token + 1, NIL);
        }
        if self.pos[token] != NIL {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        self.pos[token] = self.fds.len() as u32;
        self.fds.push(libc::pollfd { fd, events: events_of(interest), revents: 0 });
        self.tokens.push(token);
        Ok(())
    }

    pub fn modify(&mut self, token: usize, interest: Interest) -> io::Result<()> {
        match self.pos.get(token) {
            Some(&p) if p != NIL => {
                self.fds[p as usize].events = events_of(interest);
                Ok(())
            }
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    pub fn delete(&mut self, token: usize) {
        let Some(&p) = self.pos.get(token) else { return };
        if p == NIL {
            return;
        }
        let p = p as usize;
        self.fds.swap_remove(p);
        self.tokens.swap_remove(p);
        if p < self.tokens.len() {
            self.pos[self.tokens[p]] = p as u32;
        }
        self.pos[token] = NIL;
    }

    pub fn wait(&mut self, events: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
        let n = match cvt(unsafe {
            libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, timeout_ms)
        }) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(());
        }
        for (pfd, &token) in self.fds.iter().zip(&self.tokens) {
            let r = pfd.revents;
            if r == 0 {
                continue;
            }
            events.push(Event {
                token,
                readable: r & libc::POLLIN != 0,
                writable: r & libc::POLLOUT != 0,
                error: r & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0,
            });
            if events.len() == n {
                break;
            }
        }
        Ok(())
    }
}

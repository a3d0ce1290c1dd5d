//! Accepting: bursts of accepts, shedding and backing off when descriptors
//! run out, and admitting a new connection (on_connect).

#![forbid(unsafe_code)]

use super::log::Topic;
use super::{would_block, EventLoop, Handler, ACCEPTS_PER_WAKE, ACCEPT_BACKOFF, FIRST_CONN, LISTENER};
use crate::config::LogLevel;
use crate::conn::Conn;
use crate::shared::{bump, drop_count};
use crate::sys::{self, Interest};
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl<H: Handler> EventLoop<H> {
    pub(super) fn accept_burst(&mut self, now: Instant) {
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
                Ok(a) => self.admit(a),
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
        self.spare_fd = open_spare();
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

    pub(super) fn resume_accept(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            if self.spare_fd.is_none() {
                self.spare_fd = open_spare();
            }
            if let Some(l) = &self.listener {
                let _ = self.poller.modify(sys::raw(l), LISTENER, Interest::READ);
            }
        }
    }

    fn admit(&mut self, a: sys::Accepted) {
        let stats = &self.shared.stats;
        if self.shared.stopping.load(Ordering::Acquire) {
            // Stop has begun: no on_connect any more.
            drop(a);
            bump(&stats.connections_rejected, 1);
            return;
        }
        if !self.shared.take_conn_slot() {
            drop(a);
            bump(&stats.connections_rejected, 1);
            let max = self.shared.max_connections;
            self.log.log(Topic::Limit, LogLevel::Warn, || {
                format!("tcpframe: max connections ({max}) reached: a new connection was closed")
            });
            return;
        }
        let fd = sys::raw(&a.fd);
        debug_assert!(sys::nodelay(fd).unwrap_or(true), "TCP_NODELAY is inherited from the listener");
        let id = self.shared.next_id.fetch_add(1, Ordering::AcqRel);
        // Its idle clock starts now, however long this iteration has run.
        let conn = Conn::new(id, a.fd, self.max_frame, self.format, Instant::now());
        let cshared = conn.shared.clone();
        let slot = self.state.borrow_mut().insert(conn);
        if let Err(e) = self.poller.add(fd, slot as usize + FIRST_CONN, Interest::READ) {
            self.state.borrow_mut().remove(slot);
            self.shared.give_conn_slot();
            bump(&stats.connections_rejected, 1);
            self.log.log(Topic::Internal, LogLevel::Error, || {
                format!("tcpframe: cannot watch a new connection: {e}")
            });
            return;
        }
        let peer = match a.peer {
            Some(p) => p.to_string(),
            // A Unix socket: who is calling, as the kernel says.
            None => match sys::peer_cred(fd) {
                Ok((pid, uid, gid)) => format!("unix:pid={pid},uid={uid},gid={gid}"),
                Err(_) => String::from("unix:unknown"),
            },
        };
        let _ = cshared.peer.set(peer.as_str().into());
        self.shared.lock_inbox().registry.insert(id, cshared);
        // Counted as active while on_connect runs (stats before callbacks);
        // as accepted once it said yes.
        bump(&self.shared.stats.connections_active, 1);
        if self.handler.on_connect(id, &peer) {
            bump(&self.shared.stats.connections_accepted, 1);
            if let Some(c) = self.state.borrow_mut().get_id(slot, id) {
                c.announced = true;
            }
        } else {
            drop_count(&self.shared.stats.connections_active, 1);
            self.shared.lock_inbox().registry.remove(&id);
            if let Some(mut conn) = self.state.borrow_mut().remove(slot) {
                self.poller.delete(fd, slot as usize + FIRST_CONN);
                conn.discard_output();
                self.shared.give_conn_slot();
            }
            bump(&self.shared.stats.connections_rejected, 1);
        }
    }
}

/// The descriptor kept in reserve to shed a connection when descriptors run
/// out (libuv's trick); None when even that one cannot be had.
pub(super) fn open_spare() -> Option<File> {
    File::open("/dev/null").ok()
}

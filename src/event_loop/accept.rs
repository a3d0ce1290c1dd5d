//! Accepting: bursts of accepts, shedding and backing off when descriptors
//! run out, and admitting a new connection (on_connect).

#![forbid(unsafe_code)]

use super::log::Topic;
use super::{would_block, EventLoop, Handler, ACCEPTS_PER_WAKE, ACCEPT_BACKOFF, FIRST_CONN, LISTENER};
use crate::config::LogLevel;
use crate::conn::Conn;
use crate::shared::{bump, drop_count, CMD_ADOPT};
use crate::sys::{self, Interest};
use std::fs::File;
use std::io;
use std::net::IpAddr;
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
            // A callback (on_connect) may have asked for a drain.
            self.drain_if_asked();
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
                    // A drain on another thread stopped it listening: the
                    // next turn of this loop closes it (drain_if_asked).
                    Some(libc::EINVAL) if self.shared.drain_requested.load(Ordering::Acquire) => return,
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

    pub(super) fn admit(&mut self, a: sys::Accepted) {
        let stats = &self.shared.stats;
        if self.shared.stopping.load(Ordering::Acquire) {
            // Stop has begun: no on_connect any more.
            drop(a);
            bump(&stats.connections_rejected, 1);
            return;
        }
        if !self.shared.core.take_conn_slot() {
            drop(a);
            bump(&stats.connections_rejected, 1);
            let max = self.shared.core.max_connections;
            self.log.log(Topic::Limit, LogLevel::Warn, || {
                format!("tcpframe: max connections ({max}) reached: a new connection was closed")
            });
            return;
        }
        let id = self.shared.core.next_id.fetch_add(1, Ordering::AcqRel);
        let target = self.shared.core.loop_of(id);
        if target != self.shared.index {
            // Another loop thread serves it: hand the socket over.
            let peer_loop = &self.peers[target];
            let mut inbox = peer_loop.lock_inbox();
            if inbox.cmds.try_reserve(1).is_ok() && inbox.adopted.try_reserve(1).is_ok() {
                inbox.adopted.insert(id, a);
                inbox.cmds.push((CMD_ADOPT, id));
                drop(inbox);
                peer_loop.wake();
            } else {
                drop(inbox);
                drop(a);
                self.shared.core.give_conn_slot();
                bump(&stats.connections_rejected, 1);
            }
            return;
        }
        self.adopt(id, a);
    }

    /// Takes on a connection accepted (here or by loop 0) with id `id`, its
    /// connection slot already counted.
    pub(super) fn adopt(&mut self, id: u64, a: sys::Accepted) {
        let stats = &self.shared.stats;
        if self.shared.stopping.load(Ordering::Acquire) {
            drop(a);
            self.shared.core.give_conn_slot();
            bump(&stats.connections_rejected, 1);
            return;
        }
        let fd = sys::raw(&a.fd);
        if self.set_nodelay && a.peer.is_some() {
            // An inherited listener (fd:N) may lack TCP_NODELAY, which ours
            // have (accepted sockets inherit it): small frames must not wait.
            let _ = sys::set_nodelay(fd);
        }
        // Its idle clock starts now, however long this iteration has run.
        let conn = Conn::new(id, a.fd, self.max_frame, self.format, Instant::now());
        let slot = self.state.borrow_mut().insert(conn);
        if let Err(e) = self.poller.add(fd, slot as usize + FIRST_CONN, Interest::READ) {
            self.state.borrow_mut().remove(slot);
            self.shared.core.give_conn_slot();
            bump(&stats.connections_rejected, 1);
            self.log.log(Topic::Internal, LogLevel::Error, || {
                format!("tcpframe: cannot watch a new connection: {e}")
            });
            return;
        }
        let (peer, ip) = match a.peer {
            Some(p) => (p.to_string(), Some(p.ip())),
            // A Unix socket: who is calling, as the kernel says.
            None => match sys::peer_cred(fd) {
                Ok((pid, uid, gid)) => (format!("unix:pid={pid},uid={uid},gid={gid}"), None),
                Err(_) => (String::from("unix:unknown"), None),
            },
        };
        if let Some(mode) = self.proxy {
            // The PROXY header comes first: the host hears of the connection
            // once it is read (read_proxy_header), or never.
            let mut st = self.state.borrow_mut();
            let c = st.conn_mut(slot);
            c.proxy = Some(Box::new(crate::proxy::Parser::new(mode)));
            c.socket_peer = Some((peer, ip));
            st.idle_unlink(slot);
            st.proxy_deadlines.push_back((Instant::now() + PROXY_TIMEOUT, slot, id));
            return;
        }
        self.announce(slot, id, peer, ip);
    }

    /// Tells the host about a connection (on_connect), past the per-IP
    /// limit; refused or over it, the connection is closed at once and
    /// counted as rejected. False when it was.
    pub(super) fn announce(&mut self, slot: u32, id: u64, peer: String, ip: Option<IpAddr>) -> bool {
        if self.shared.stopping.load(Ordering::Acquire) || self.shared.silent.load(Ordering::Acquire) {
            // Stop has begun (or the server was freed from its own callback)
            // since the accept: a PROXY header completing now names no one.
            self.reject(slot, id);
            return false;
        }
        if let (Some(ip), Some(limit)) = (ip, self.max_per_ip) {
            if !self.shared.core.count_ip(ip, limit) {
                self.reject(slot, id);
                self.log.log(Topic::Limit, LogLevel::Warn, || {
                    format!("tcpframe: {limit} connections from {ip} already: a new one was closed")
                });
                return false;
            }
        }
        let cshared = {
            let mut st = self.state.borrow_mut();
            let Some(c) = st.get_id(slot, id) else { return false };
            if let Some(ip) = ip.filter(|_| self.max_per_ip.is_some()) {
                c.ip = Some(ip); // counted above
            }
            let _ = c.shared.peer.set(peer.as_str().into());
            c.shared.clone()
        };
        self.shared.lock_inbox().registry.insert(id, cshared);
        // Counted as active while on_connect runs (stats before callbacks);
        // as accepted once it said yes.
        bump(&self.shared.stats.connections_active, 1);
        if self.handler.on_connect(id, &peer) {
            bump(&self.shared.stats.connections_accepted, 1);
            if let Some(c) = self.state.borrow_mut().get_id(slot, id) {
                c.announced = true;
            }
            true
        } else {
            drop_count(&self.shared.stats.connections_active, 1);
            self.shared.lock_inbox().registry.remove(&id);
            self.reject(slot, id);
            false
        }
    }

    /// Closes a connection the host never heard of (or refused) at once:
    /// counted as rejected, no callback.
    pub(super) fn reject(&mut self, slot: u32, id: u64) {
        let conn = {
            let mut st = self.state.borrow_mut();
            if st.get_id(slot, id).is_none() {
                return;
            }
            st.remove(slot)
        };
        if let Some(mut conn) = conn {
            if conn.registered {
                self.poller.delete(sys::raw(&conn.fd), slot as usize + FIRST_CONN);
            }
            conn.discard_output();
            self.forget_ip(&conn);
            self.shared.core.give_conn_slot();
        }
        bump(&self.shared.stats.connections_rejected, 1);
    }

    /// A connection counted against its IP's limit is gone.
    pub(super) fn forget_ip(&mut self, conn: &Conn) {
        if let Some(ip) = conn.ip {
            self.shared.core.forget_ip(ip);
        }
    }
}

/// A PROXY header must be complete within this long after the accept.
pub(super) const PROXY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The descriptor kept in reserve to shed a connection when descriptors run
/// out (libuv's trick); None when even that one cannot be had.
pub(super) fn open_spare() -> Option<File> {
    File::open("/dev/null").ok()
}

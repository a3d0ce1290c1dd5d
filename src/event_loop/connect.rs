//! Outbound connections (tf_connect): starting the connect on the loop, its
//! completion or failure, the connect timeout; once established a connection
//! is like an accepted one.

#![forbid(unsafe_code)]

use super::close::Closed;
use super::log::Topic;
use super::{EventLoop, Handler, FIRST_CONN};
use crate::addr::Address;
use crate::config::LogLevel;
use crate::conn::{CloseReason, Conn};
use crate::shared::{bump, CMD_SEND};
use crate::sys::{self, Interest};
use std::sync::atomic::Ordering;
use std::time::Instant;

impl<H: Handler> EventLoop<H> {
    /// Starts connecting a tf_connect connection (its id and shared half
    /// exist since the call). Any failure is reported through on_close.
    pub(super) fn start_connect(&mut self, id: u64, addr: &Address) {
        let Some(shared) = self.shared.lock_inbox().registry.get(&id).cloned() else {
            self.shared.core.give_conn_slot();
            return;
        };
        if shared.close_requested.load(Ordering::Acquire) || self.shutdown_deadline.is_some() {
            // Closed (or aborted) before it started: abandoned.
            let reason = if shared.close_requested.load(Ordering::Acquire) {
                CloseReason::Local
            } else {
                CloseReason::Shutdown
            };
            return self.connect_failed_early(id, shared, reason, None);
        }
        let (fd, done) = match sys::connect(addr) {
            Ok(r) => r,
            Err(e) => {
                return self.connect_failed_early(id, shared, CloseReason::ConnectFailed, Some(e.to_string()))
            }
        };
        let raw = sys::raw(&fd);
        let now = Instant::now();
        let mut conn = Conn::with_shared(id, fd, self.max_frame, self.format, now, shared);
        conn.connecting = true;
        conn.interest = Interest { read: false, write: true };
        let slot = {
            let mut st = self.state.borrow_mut();
            let slot = st.insert(conn);
            // Not idle while connecting: its idle clock starts once connected.
            st.idle_unlink(slot);
            let deadline = now + self.connect_timeout;
            st.connect_deadlines.push_back((deadline, slot, id));
            slot
        };
        if let Err(e) =
            self.poller.add(raw, slot as usize + FIRST_CONN, Interest { read: false, write: true })
        {
            self.log.log(Topic::Internal, LogLevel::Error, || {
                format!("tcpframe: cannot watch connection {id}: {e}")
            });
            let mut st = self.state.borrow_mut();
            if let Some(c) = st.get_id(slot, id) {
                c.registered = false;
            }
            st.mark_closing(slot, CloseReason::ConnectFailed);
            return;
        }
        if done {
            // Frames sent before the connect began go first: on_connect,
            // called now, may send more on the loop's own (lock-free) path.
            if let Some(q) = self.pending.remove(&id) {
                self.state.borrow_mut().apply(CMD_SEND, id, Some(q));
            }
            self.connected(slot, id);
        }
    }

    /// A connect that could not even start (or was abandoned before): its
    /// on_close follows at once.
    fn connect_failed_early(
        &mut self,
        id: u64,
        shared: std::sync::Arc<crate::conn::ConnShared>,
        reason: CloseReason,
        why: Option<String>,
    ) {
        self.shared.core.give_conn_slot();
        if let Some(why) = why {
            self.log.log(Topic::Close, LogLevel::Info, || {
                format!("tcpframe: connection {id} failed to connect: {why}")
            });
        }
        let reason = if shared.close_requested.load(Ordering::Acquire) { CloseReason::Local } else { reason };
        self.report_closed(vec![Closed { id, reason, shared, announced: false, outbound: true }]);
    }

    /// Writability (or an error) on a connection still connecting.
    pub(super) fn connect_event(&mut self, slot: u32) {
        let (fd, id) = {
            let st = self.state.borrow();
            let Some(c) = st.get(slot) else { return };
            (sys::raw(&c.fd), c.id)
        };
        match sys::connect_result(fd) {
            Ok(()) => self.connected(slot, id),
            Err(e) => {
                self.log.log(Topic::Close, LogLevel::Info, || {
                    format!("tcpframe: connection {id} failed to connect: {e}")
                });
                let mut st = self.state.borrow_mut();
                if let Some(c) = st.get_id(slot, id) {
                    c.eof = true;
                    c.discard_output();
                }
                st.mark_closing(slot, CloseReason::ConnectFailed);
            }
        }
    }

    /// The connect completed: from here on it is like an accepted connection.
    fn connected(&mut self, slot: u32, id: u64) {
        let peer = {
            let mut st = self.state.borrow_mut();
            let Some(c) = st.get_id(slot, id) else { return };
            if !c.connecting || c.close_reason().is_some() {
                return;
            }
            c.connecting = false;
            c.announced = true;
            let peer = c.shared.peer.get().map(|p| p.to_string()).unwrap_or_default();
            let has_output = c.has_output();
            st.idle_touch(slot, Instant::now());
            if has_output {
                // Frames sent before the connect completed go out now.
                st.mark_dirty(slot);
            }
            peer
        };
        self.sync_interest(slot);
        bump(&self.shared.stats.connections_active, 1);
        if self.shared.stopping.load(Ordering::Acquire) || self.shared.silent.load(Ordering::Acquire) {
            return;
        }
        // Its return value is ignored for outbound connections.
        let _ = self.handler.on_connect(id, &peer);
    }

    /// Connects that did not complete within the connect timeout fail.
    pub(super) fn expire_connects(&mut self, now: Instant) {
        let mut st = self.state.borrow_mut();
        while let Some(&(deadline, slot, id)) = st.connect_deadlines.front() {
            if deadline > now {
                break;
            }
            st.connect_deadlines.pop_front();
            let Some(c) = st.get_id(slot, id) else { continue };
            if !c.connecting || c.close_reason().is_some() {
                continue;
            }
            c.eof = true;
            c.discard_output();
            st.mark_closing(slot, CloseReason::ConnectFailed);
        }
    }
}

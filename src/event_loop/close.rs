//! Closing: idle expiry, the close phase, final teardown of a connection,
//! on_close reports, and closing everything at the end of a stop.

#![forbid(unsafe_code)]

use super::log::Topic;
use super::{EventLoop, Handler, FIRST_CONN};
use crate::config::LogLevel;
use crate::conn::{CloseReason, Conn, ConnShared, CLOSED};
use crate::shared::{bump, drop_count};
use crate::sys;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A connection just closed: its id, the reason reported, its shared half.
type Closed = (u64, CloseReason, Arc<ConnShared>);

impl<H: Handler> EventLoop<H> {
    pub(super) fn expire_idle(&mut self, now: Instant) {
        let Some(timeout) = self.idle_timeout else { return };
        let mut expired = Vec::new();
        {
            let mut st = self.state.borrow_mut();
            loop {
                let head = st.idle_head;
                let Some(c) = st.get(head) else { break };
                if c.last_frame + timeout > now {
                    break;
                }
                expired.push(c.id);
                st.idle_unlink(head);
                let c = st.conn_mut(head);
                c.eof = true;
                c.discard_output();
                st.mark_closing(head, CloseReason::Idle);
            }
        }
        for id in expired {
            self.log.log(Topic::Close, LogLevel::Info, || {
                format!("tcpframe: connection {id} closed: idle timeout")
            });
        }
    }

    /// Graceful closes whose output was not written within the close
    /// timeout are reset.
    pub(super) fn expire_lingering(&mut self, now: Instant) {
        let expired = self.state.borrow_mut().expire_lingering(now);
        for id in expired {
            self.log.log(Topic::Close, LogLevel::Info, || {
                format!("tcpframe: connection {id} reset: its queued output was not read within the close timeout")
            });
        }
    }

    /// Closes every connection that is marked and has nothing left to wait
    /// for, then tells the host. Counters change before the callbacks run.
    pub(super) fn close_phase(&mut self, now: Instant) {
        let force = self.shutdown_deadline.is_some_and(|d| now >= d);
        let list = std::mem::take(&mut self.state.borrow_mut().closing);
        let mut keep = Vec::new();
        let mut done: Vec<Closed> = Vec::new();
        for slot in list {
            let ready = {
                let st = self.state.borrow();
                match st.get(slot) {
                    None => continue,
                    Some(c) => force || c.ready_to_close(),
                }
            };
            if !ready {
                keep.push(slot);
                continue;
            }
            let conn = self.state.borrow_mut().remove(slot);
            if let Some(conn) = conn {
                done.push(self.finish(slot, conn));
            }
        }
        self.state.borrow_mut().closing.extend(keep);
        if !done.is_empty() && self.accept_paused_until.is_some() {
            // Descriptors were freed: serve or shed what waits in the backlog now.
            self.accept_paused_until = Some(now);
        }
        self.report_closed(done);
    }

    fn finish(&mut self, slot: u32, mut conn: Conn) -> Closed {
        let fd = sys::raw(&conn.fd);
        if conn.registered {
            // Always explicit: if the host forked, a child may still hold the
            // socket open, and epoll would keep reporting it under a token
            // that a new connection may reuse.
            self.poller.delete(fd, slot as usize + FIRST_CONN);
        }
        if conn.reset {
            // tf_conn_abort or a close timeout: drop what the kernel still
            // holds for a peer that does not read, and tell it so (RST).
            let _ = sys::set_linger_zero(fd);
        } else if !conn.eof {
            let (n, _) = sys::discard_input(fd, &mut self.scratch, 4);
            bump(&self.shared.stats.bytes_received, n);
        }
        conn.discard_output();
        let reason = conn.reported_reason(self.shared.stopping.load(Ordering::Acquire));
        (conn.id, reason, conn.shared.clone()) // dropping `conn` closes the descriptor
    }

    /// Tells the host. From here every call naming these connections is
    /// TF_ERR_NO_CONN; their user data stays readable until on_close has
    /// returned (in pull mode, until the host's next poll after the CLOSE).
    fn report_closed(&mut self, done: Vec<Closed>) {
        if done.is_empty() {
            return;
        }
        for (_, _, shared) in &done {
            shared.closing.store(CLOSED, Ordering::Release);
        }
        let stats = &self.shared.stats;
        drop_count(&stats.connections_active, done.len() as u64);
        for &(_, reason, _) in &done {
            match reason {
                CloseReason::TooLarge => bump(&stats.closed_too_large, 1),
                CloseReason::Idle => bump(&stats.closed_idle, 1),
                _ => {}
            }
        }
        let ids: Vec<u64> = done.iter().map(|&(id, _, _)| id).collect();
        self.state.borrow_mut().reporting = done.iter().map(|(id, _, s)| (*id, s.clone())).collect();
        for (id, reason, _) in done {
            // Re-checked each time: a callback may free the server.
            if self.shared.silent.load(Ordering::Acquire) {
                break;
            }
            self.handler.on_close(id, reason);
        }
        self.state.borrow_mut().reporting.clear();
        if self.handler.forgets_at_close() {
            let mut inbox = self.shared.lock_inbox();
            for id in &ids {
                inbox.registry.remove(id);
            }
        }
    }

    /// The drain is over: close whatever is left.
    pub(super) fn close_all(&mut self) {
        let slots: Vec<u32> = self.state.borrow().ids.values().copied().collect();
        let mut done = Vec::new();
        for slot in slots {
            let conn = self.state.borrow_mut().remove(slot);
            if let Some(conn) = conn {
                done.push(self.finish(slot, conn));
            }
        }
        self.report_closed(done);
    }
}

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
pub(crate) struct Closed {
    pub id: u64,
    pub reason: CloseReason,
    pub shared: Arc<ConnShared>,
    /// The host was told of it (on_connect ran and said yes): it counted as
    /// active. Outbound connections that never connected get on_close too.
    pub announced: bool,
    pub outbound: bool,
}

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
        self.sync_budget();
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
        self.shared.core.give_conn_slot();
        self.forget_ip(&conn);
        let outbound = conn.shared.outbound.load(Ordering::Relaxed);
        Closed { id: conn.id, reason, shared: conn.shared.clone(), announced: conn.announced, outbound }
        // dropping `conn` closes the descriptor
    }

    /// Tells the host. From here every call naming these connections is
    /// TF_ERR_NO_CONN; their user data stays readable until on_close has
    /// returned (in pull mode, until the host's next poll after the CLOSE).
    pub(super) fn report_closed(&mut self, done: Vec<Closed>) {
        if done.is_empty() {
            return;
        }
        for c in &done {
            c.shared.closing.store(CLOSED, Ordering::Release);
        }
        let stats = &self.shared.stats;
        drop_count(&stats.connections_active, done.iter().filter(|c| c.announced).count() as u64);
        for c in done.iter().filter(|c| c.announced || c.outbound) {
            match c.reason {
                CloseReason::TooLarge => bump(&stats.closed_too_large, 1),
                CloseReason::Idle => bump(&stats.closed_idle, 1),
                _ => {}
            }
        }
        // Never announced (a PROXY header that never came): rejected, silently.
        let unannounced = done.iter().filter(|c| !c.announced && !c.outbound).count() as u64;
        bump(&stats.connections_rejected, unannounced);
        self.state.borrow_mut().reporting = done.iter().map(|c| (c.id, c.shared.clone())).collect();
        let forgets = self.handler.forgets_at_close();
        for c in &done {
            let told = c.announced || c.outbound;
            // Re-checked each time: a callback may free the server.
            if told && !self.shared.silent.load(Ordering::Acquire) {
                self.handler.on_close(c.id, c.reason);
            }
            // Its on_close has returned: the host can no longer name it (in
            // pull mode, from the poll after the one that returns its CLOSE).
            self.state.borrow_mut().reporting.retain(|(id, _)| *id != c.id);
            if forgets || !told {
                self.shared.lock_inbox().registry.remove(&c.id);
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

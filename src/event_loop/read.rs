//! Input: a connection's readiness event, reading and dispatching whole
//! frames, draining a closing peer, and keeping the poller's interest in sync.

#![forbid(unsafe_code)]

use super::log::Topic;
use super::{would_block, EventLoop, Handler, FIRST_CONN, READS_PER_WAKE};
use crate::config::LogLevel;
use crate::conn::CloseReason;
use crate::shared::bump;
use crate::sys::{self, Event, Interest};
use std::sync::atomic::Ordering;

impl<H: Handler> EventLoop<H> {
    pub(super) fn sync_interest(&mut self, slot: u32) {
        let mut st = self.state.borrow_mut();
        let Some(c) = st.get_mut(slot) else { return };
        let want = c.wanted_interest();
        let (fd, token) = (sys::raw(&c.fd), slot as usize + FIRST_CONN);
        let result = if want == Interest::NONE {
            if c.registered {
                self.poller.delete(fd, token);
                c.registered = false;
            }
            Ok(())
        } else if !c.registered {
            c.registered = true;
            c.interest = want;
            self.poller.add(fd, token, want)
        } else if want != c.interest {
            c.interest = want;
            self.poller.modify(fd, token, want)
        } else {
            Ok(())
        };
        {
            if let Err(e) = result {
                drop(st);
                self.log.log(Topic::Internal, LogLevel::Error, || {
                    format!("tcpframe: cannot watch a connection: {e}")
                });
                self.state.borrow_mut().mark_closing(slot, CloseReason::Io);
            }
        }
    }

    /// Applies the interest changes that pauses and resumes made from
    /// inside callbacks (the state has no poller).
    pub(super) fn resync_interest(&mut self) {
        let slots = std::mem::take(&mut self.state.borrow_mut().resync);
        for slot in slots {
            self.sync_interest(slot);
        }
    }

    pub(super) fn conn_event(&mut self, slot: u32, ev: &Event) {
        if self.state.borrow().get(slot).is_some_and(|c| c.connecting) {
            return self.connect_event(slot);
        }
        if ev.readable || ev.error {
            self.read_ready(slot);
        }
        let mut st = self.state.borrow_mut();
        let Some(c) = st.get_mut(slot) else { return };
        if (ev.writable || ev.error) && c.has_output() {
            st.mark_dirty(slot);
        } else if ev.error && c.eof && !c.has_output() {
            // Hung up with nothing left to say: close, or the level-triggered
            // hang-up would wake us forever.
            st.mark_closing(slot, CloseReason::Peer);
        }
    }

    /// Brings the server-wide partial-frame total up to date with this loop's.
    pub(super) fn sync_budget(&mut self) {
        let now = self.state.borrow().buffered;
        if now != self.budget_counted {
            let core = &self.shared.core.buffered;
            if now > self.budget_counted {
                core.fetch_add(now - self.budget_counted, Ordering::AcqRel);
            } else {
                core.fetch_sub(self.budget_counted - now, Ordering::AcqRel);
            }
            self.budget_counted = now;
        }
    }

    /// Partial frames past the server's budget: the connection holding the
    /// most is closed (TF_CLOSE_OVERLOAD), until the total fits again.
    pub(super) fn enforce_budget(&mut self) {
        loop {
            self.sync_budget();
            let mut st = self.state.borrow_mut();
            if self.shared.core.buffered.load(Ordering::Acquire) <= self.max_buffered {
                return;
            }
            let Some(victim) = st.largest_holder() else { return };
            let c = st.conn_mut(victim);
            let (id, held) = (c.id, c.buffered);
            c.eof = true;
            c.discard_output();
            st.drop_partial(victim);
            st.mark_closing(victim, CloseReason::Overload);
            drop(st);
            self.sync_interest(victim);
            let budget = self.max_buffered;
            self.log.log(Topic::Limit, LogLevel::Warn, || {
                format!(
                    "tcpframe: connection {id} closed: partial frames of all connections passed max buffered \
                     ({budget} bytes); it held the most ({held} bytes)"
                )
            });
        }
    }

    /// A closing connection's input is read and dropped, so that its final
    /// close is not a reset that destroys the replies it is still owed.
    pub(super) fn discard_ready(&mut self, slot: u32, fd: i32) {
        let mut eof = false;
        let mut failed = false;
        for _ in 0..READS_PER_WAKE {
            match sys::recv(fd, &mut self.scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => bump(&self.shared.stats.bytes_received, n as u64),
                Err(e) if would_block(&e) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if eof || failed {
            let mut st = self.state.borrow_mut();
            if let Some(c) = st.get_mut(slot) {
                c.eof = true;
                if failed {
                    c.discard_output();
                    st.mark_closing(slot, CloseReason::Io);
                }
            }
            drop(st);
            self.sync_interest(slot);
        }
    }
}

//! Output: one send per connection with queued frames, once per iteration.

#![forbid(unsafe_code)]

use super::log::Topic;
use super::{is_reset, would_block, EventLoop, Handler};
use crate::config::LogLevel;
use crate::conn::CloseReason;
use crate::outq::MAX_IOV;
use crate::shared::bump;
use crate::sys;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl<H: Handler> EventLoop<H> {
    /// One send per connection with queued frames: the write pass before
    /// sleeping. Writability is watched only while bytes remain. (A
    /// connection whose replies were written right after its read is no
    /// longer dirty and is passed over.)
    pub(super) fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.state.borrow_mut().dirty);
        for &slot in &dirty {
            self.guarded(Some(slot), |lp| lp.flush_one(slot));
        }
        dirty.clear();
        let mut st = self.state.borrow_mut();
        if st.dirty.is_empty() {
            st.dirty = dirty; // keep the allocation
        }
    }

    /// Writes a dirty connection's queued frames (one send); nothing for a
    /// connection that is not dirty (flushed already this iteration).
    pub(super) fn flush_one(&mut self, slot: u32) {
        let stats = &self.shared.stats;
        let mut st = self.state.borrow_mut();
        let Some(c) = st.get_mut(slot) else { return };
        if !c.dirty {
            return;
        }
        c.dirty = false;
        if !c.has_output() || c.connecting {
            return;
        }
        let fd = sys::raw(&c.fd);
        let sent = if c.out.chunk_count() <= 1 {
            sys::send(fd, c.out.first_slice())
        } else {
            let mut iov = Vec::with_capacity(c.out.chunk_count().min(MAX_IOV));
            c.out.slices(&mut iov);
            sys::sendv(fd, &iov)
        };
        match sent {
            Ok(n) => {
                bump(&stats.bytes_sent, n as u64);
                bump(&c.shared.bytes_sent, n as u64);
                let frames = st.wrote(slot, n);
                bump(&stats.frames_sent, frames);
                let c = st.conn_mut(slot);
                bump(&c.shared.frames_sent, frames);
                c.want_write = c.has_output();
            }
            Err(e) if would_block(&e) => c.want_write = true,
            Err(e) => {
                c.discard_output();
                c.eof = true;
                let reason = if is_reset(&e) { CloseReason::Peer } else { CloseReason::Io };
                st.mark_closing(slot, reason);
            }
        }
        drop(st);
        self.sync_interest(slot);
    }

    /// on_writable for the connections that got TF_ERR_FULL and now have
    /// room (queued output at half the limit or less), each once.
    pub(super) fn notify_writable(&mut self) {
        let ready = self.state.borrow_mut().take_writable();
        for id in ready {
            if self.shared.stopping.load(Ordering::Acquire) || self.shared.silent.load(Ordering::Acquire) {
                return;
            }
            self.handler.on_writable(id);
        }
    }

    /// Slow consumers: closed once above the soft limit for too long.
    pub(super) fn check_slow(&mut self, now: Instant) {
        let (closed, _) = self.state.borrow_mut().check_slow(now);
        for id in closed {
            self.log.log(Topic::Close, LogLevel::Info, || {
                format!(
                    "tcpframe: connection {id} closed: queued output stayed above the slow-consumer limit"
                )
            });
        }
    }
}

//! Output: one send per connection with queued frames, once per iteration.

#![forbid(unsafe_code)]

use super::{is_reset, would_block, EventLoop, Handler, POOL_MAX};
use crate::conn::CloseReason;
use crate::server::bump;
use crate::sys;

impl<H: Handler> EventLoop<H> {
    /// One send per connection with queued frames: the write pass before
    /// sleeping. Writability is watched only while bytes remain.
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

    fn flush_one(&mut self, slot: u32) {
        let stats = &self.shared.stats;
        let mut st = self.state.borrow_mut();
        let Some(c) = st.get_mut(slot) else { return };
        c.dirty = false;
        if !c.has_output() {
            return;
        }
        match sys::send(sys::raw(&c.fd), &c.out[c.out_pos..]) {
            Ok(n) => {
                bump(&stats.bytes_sent, n as u64);
                let (frames, buf) = c.wrote(n);
                bump(&stats.frames_sent, frames);
                c.want_write = c.has_output();
                if let Some(buf) = buf {
                    if st.pool.len() < POOL_MAX {
                        st.pool.push(buf);
                    }
                }
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
}

//! Host commands and flow control: applying the inbox, beginning a stop,
//! and resuming reads and accepts paused for a full pull queue.

#![forbid(unsafe_code)]

use super::{EventLoop, Handler, APPLY_CHECK_BYTES, LISTENER};
use crate::conn::CloseReason;
use crate::shared::{CMD_ADOPT, CMD_CONNECT, CMD_SEND};
use crate::sys::{self, Interest};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Most queued connections a drain takes before closing the listener (the
/// listen backlog is 1024).
const DRAIN_ACCEPTS: usize = 4096;

/// tf_server_drain, on any thread, holding the lock without which loop 0
/// does not close `listener`: takes the accept queue, then stops the
/// listener listening. Loop 0 admits what was taken and closes it after.
pub fn stop_listening(listener: std::os::fd::RawFd) -> Vec<sys::Accepted> {
    let mut taken = Vec::new();
    for _ in 0..DRAIN_ACCEPTS {
        match sys::accept(listener) {
            Ok(a) => taken.push(a),
            Err(_) => break,
        }
    }
    // A failure leaves it listening: the loop still closes it at once.
    let _ = sys::stop_listening(listener);
    taken
}

impl<H: Handler> EventLoop<H> {
    /// Applies what host threads queued, and notices a stop request.
    pub(super) fn drain_inbox(&mut self) {
        self.shared.waker.reset();
        self.shared.wake_pending.store(false, Ordering::SeqCst);
        // Taken under the same lock as the stop flag is read: a stop seen
        // here comes after every command in the batch, so shutdown begins
        // only once they are applied. The two halves swap with the loop's
        // own (empty) ones, so their allocations are reused.
        let stop = {
            let mut inbox = self.shared.lock_inbox();
            std::mem::swap(&mut inbox.cmds, &mut self.cmds);
            std::mem::swap(&mut inbox.pending, &mut self.pending);
            std::mem::swap(&mut inbox.connects, &mut self.connects);
            std::mem::swap(&mut inbox.adopted, &mut self.adopted);
            inbox.stop_deadline
        };
        let mut give_up_at = stop;
        let mut since_check = 0usize;
        let cmds = std::mem::take(&mut self.cmds);
        for &(kind, id) in &cmds {
            if kind == CMD_ADOPT {
                if let Some(a) = self.adopted.remove(&id) {
                    self.guarded(None, |lp| lp.adopt(id, a));
                }
                continue;
            }
            if kind == CMD_CONNECT {
                if let Some(addr) = self.connects.remove(&id) {
                    self.guarded(None, |lp| lp.start_connect(id, &addr));
                }
                continue;
            }
            let frames = if kind == CMD_SEND { self.pending.remove(&id) } else { None };
            since_check += frames.as_ref().map_or(0, |q| q.unsent());
            self.state.borrow_mut().apply(kind, id, frames);
            // A huge batch must not hold a stop past its drain time:
            // what is not applied by then could not be written anyway.
            if since_check >= APPLY_CHECK_BYTES {
                since_check = 0;
                if give_up_at.is_none() && self.shared.stopping.load(Ordering::Acquire) {
                    give_up_at = self.shared.lock_inbox().stop_deadline;
                }
                if give_up_at.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
        }
        // Left over only when a stop's drain time ran out: release what
        // those frames reserved (they will not be written).
        for (id, q) in self.pending.drain() {
            self.state.borrow_mut().apply(CMD_SEND, id, Some(q));
        }
        self.cmds = cmds;
        self.cmds.clear();
        if let (Some(deadline), None) = (stop, self.shutdown_deadline) {
            self.begin_shutdown(deadline);
        }
    }

    /// Stop begins: no more accepts or messages; queued output may drain
    /// until the deadline; every connection will close as a shutdown.
    fn begin_shutdown(&mut self, deadline: Instant) {
        self.shutdown_deadline = Some(deadline);
        self.close_listener();
        self.spare_fd = None;
        self.accept_paused_until = None;
        let mut st = self.state.borrow_mut();
        let slots: Vec<u32> = st.ids.values().copied().collect();
        for slot in slots {
            st.conn_mut(slot).mark_shutdown();
            st.drop_partial(slot);
            st.mark_closing(slot, CloseReason::Shutdown);
        }
    }

    pub(super) fn resume_paused(&mut self) {
        if (self.paused.is_empty() && !self.accept_blocked) || !self.handler.wants_input() {
            return;
        }
        for slot in std::mem::take(&mut self.paused) {
            {
                let mut st = self.state.borrow_mut();
                let Some(c) = st.get_mut(slot) else { continue };
                c.paused = false;
                let held = !c.stash.is_empty() && !c.host_paused;
                // Waiting on the host is not the peer being idle.
                st.idle_touch(slot, Instant::now());
                if held {
                    // Frames held back at its last turn go first.
                    st.schedule_turn(slot);
                }
            }
            self.sync_interest(slot);
            // Data that arrived meanwhile is reported by the next wait.
        }
        if std::mem::take(&mut self.accept_blocked) && self.accept_paused_until.is_none() {
            if let Some(l) = &self.listener {
                let _ = self.poller.modify(sys::raw(l), LISTENER, Interest::READ);
            }
        }
    }

    /// Stops listening (stop or drain): the descriptor is closed, so that
    /// another server may bind the address at once, and a Unix socket file
    /// we created is removed.
    pub(super) fn close_listener(&mut self) {
        self.shared.lock_early_drain().listener = None;
        if let Some(l) = self.listener.take() {
            self.poller.delete(sys::raw(&l), LISTENER);
        }
        if let Some(f) = self.socket_file.take() {
            sys::remove_socket_file(&f);
        }
        self.spare_fd = None;
        self.accept_paused_until = None;
        self.accept_blocked = false;
        self.shared.listener_closed();
    }

    /// tf_server_drain: the listener goes now; connections are served on.
    pub(super) fn drain_if_asked(&mut self) {
        if self.drained || !self.shared.drain_requested.load(Ordering::Acquire) {
            return;
        }
        self.drained = true;
        // What a drain from a callback took from the queue is served first.
        let taken = std::mem::take(&mut self.shared.lock_early_drain().accepted);
        for a in taken {
            self.admit(a);
        }
        // Connections the kernel completed already are served, not reset:
        // take the whole accept queue (bounded by the backlog) first.
        if let Some(listener) = self.listener.as_ref().map(sys::raw) {
            for _ in 0..DRAIN_ACCEPTS {
                match sys::accept(listener) {
                    Ok(a) => self.admit(a),
                    Err(_) => break,
                }
            }
        }
        let address = self.address.clone();
        self.close_listener();
        // A drain called meanwhile (from an on_connect above, or a host
        // thread) took the rest of the queue: serve that too. None can be
        // added now that the listener is forgotten.
        loop {
            let taken = std::mem::take(&mut self.shared.lock_early_drain().accepted);
            if taken.is_empty() {
                break;
            }
            for a in taken {
                self.admit(a);
            }
        }
        self.log.log(super::log::Topic::Lifecycle, crate::config::LogLevel::Info, || {
            format!("tcpframe: draining: no longer listening on {address}")
        });
    }
}

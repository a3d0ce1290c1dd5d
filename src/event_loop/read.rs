//! Input: a connection's readiness event, reading and dispatching whole
//! frames, draining a closing peer, and keeping the poller's interest in sync.

#![forbid(unsafe_code)]

use super::log::Topic;
use super::{is_reset, would_block, EventLoop, Handler, FIRST_CONN, READS_PER_WAKE};
use crate::config::LogLevel;
use crate::conn::{CloseReason, NIL};
use crate::frame::{DecodeError, Decoder, Flow};
use crate::server::bump;
use crate::sys::{self, Event, Interest};
use std::sync::atomic::Ordering;
use std::time::Instant;

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

    pub(super) fn conn_event(&mut self, slot: u32, ev: &Event) {
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

    /// Reads what the peer sent and delivers every whole frame.
    fn read_ready(&mut self, slot: u32) {
        let (fd, id, reading, paused) = {
            let st = self.state.borrow();
            let Some(c) = st.get(slot) else { return };
            if c.eof {
                return;
            }
            let reading = c.is_reading() && !c.shared.close_requested.load(Ordering::Acquire);
            (sys::raw(&c.fd), c.id, reading, c.paused)
        };
        if paused {
            return;
        }
        if !reading {
            return self.discard_ready(slot, fd);
        }
        if !self.handler.wants_input() {
            // Pull mode backpressure: stop watching, resume when drained.
            // Waiting on the host is not idleness: off the idle list until then.
            let mut st = self.state.borrow_mut();
            st.get_mut(slot).expect("checked above").paused = true;
            st.idle_unlink(slot);
            drop(st);
            self.paused.push(slot);
            return self.sync_interest(slot);
        }
        let (mut decoder, cshared) = {
            let mut st = self.state.borrow_mut();
            st.current = (id, slot);
            let c = st.conn_mut(slot);
            (std::mem::replace(&mut c.decoder, Decoder::new(self.max_frame)), c.shared.clone())
        };
        let Self { shared, handler, scratch, .. } = self;
        let stats = &shared.stats;
        let mut delivered = 0u64;
        let mut eof = false;
        let mut failure: Option<(CloseReason, String)> = None;
        let mut read_at = None;
        for _ in 0..READS_PER_WAKE {
            let n = match sys::recv(fd, scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    let reason = if is_reset(&e) { CloseReason::Peer } else { CloseReason::Io };
                    failure = Some((reason, format!("read: {e}")));
                    break;
                }
            };
            bump(&stats.bytes_received, n as u64);
            // A frame counts as received when its last byte is read, not
            // when this iteration began (callbacks before it may be slow).
            read_at = Some(Instant::now());
            let mut starved = false;
            let fed = decoder.feed(&scratch[..n], &mut |frame| {
                if shared.stopping.load(Ordering::Relaxed) {
                    return Flow::Stop;
                }
                bump(&stats.frames_received, 1);
                #[cfg(feature = "fault-injection")]
                if frame == crate::server::PANIC_PAYLOAD {
                    panic!("fault injection: panic while dispatching a frame");
                }
                if !handler.on_message(id, frame) {
                    starved = true;
                    return Flow::Stop;
                }
                delivered += 1;
                // During dispatch a connection stops being read only through
                // tf_conn_close (which sets this flag first, on any thread) or
                // a stop; nothing removes it before the close phase.
                if cshared.close_requested.load(Ordering::Relaxed) {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            });
            if starved {
                failure = Some((CloseReason::Overload, "no memory to queue a frame for the host".into()));
                break;
            }
            match fed {
                Ok(Flow::Continue) if n < scratch.len() => break, // drained
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break,
                Err(DecodeError::TooLarge { announced, max }) => {
                    failure = Some((
                        CloseReason::TooLarge,
                        format!("announced a frame of {announced} bytes (max frame {max})"),
                    ));
                    break;
                }
                Err(DecodeError::OutOfMemory) => {
                    failure = Some((CloseReason::Overload, "no memory for a partial frame".into()));
                    break;
                }
            }
        }
        let mut st = self.state.borrow_mut();
        st.current = (0, NIL);
        let Some(c) = st.get_id(slot, id) else { return };
        if c.is_reading() {
            c.decoder = decoder;
        }
        if eof {
            c.eof = true;
        }
        if let (true, Some(at)) = (delivered > 0, read_at) {
            st.idle_touch(slot, at);
        }
        st.account_buffered(slot);
        if eof {
            st.mark_closing(slot, CloseReason::Peer);
        }
        if let Some((reason, why)) = failure {
            let c = st.conn_mut(slot);
            c.eof = true;
            c.discard_output();
            st.drop_partial(slot);
            st.mark_closing(slot, reason);
            drop(st);
            let level = if reason == CloseReason::Io || reason == CloseReason::Peer {
                LogLevel::Info
            } else {
                LogLevel::Warn
            };
            let topic = if reason == CloseReason::TooLarge { Topic::Frame } else { Topic::Close };
            self.log.log(topic, level, || format!("tcpframe: connection {id} closed: {why}"));
        } else {
            drop(st);
        }
        self.sync_interest(slot);
        self.enforce_budget();
    }

    /// Partial frames past the server's budget: the connection holding the
    /// most is closed (TF_CLOSE_OVERLOAD), until the total fits again.
    fn enforce_budget(&mut self) {
        loop {
            let mut st = self.state.borrow_mut();
            if st.buffered <= self.max_buffered {
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
    fn discard_ready(&mut self, slot: u32, fd: i32) {
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

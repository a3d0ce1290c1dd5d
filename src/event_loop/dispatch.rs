//! Delivery: one read per ready connection, its whole frames handed to the
//! host, and the bytes a pause left undelivered, handed over at resume.

#![forbid(unsafe_code)]

use super::log::Topic;
use super::{is_reset, would_block, EventLoop, Handler};
use crate::config::LogLevel;
use crate::conn::{CloseReason, ConnShared, NIL};
use crate::frame::{DecodeError, Decoder, Flow};
use crate::shared::{bump, Shared};
use crate::sys;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// What delivering some bytes of one connection came to.
#[derive(Default)]
struct Delivered {
    frames: u64,
    /// The host paused the connection: the bytes from here on were not
    /// delivered (an offset in the bytes given).
    held_from: Option<usize>,
    failure: Option<(CloseReason, String)>,
}

/// Frames one connection delivers per turn (a read, or what a previous turn
/// held back). A peer streaming tiny frames then delays the others by about
/// a thousand callbacks, not by a whole read's worth (13,000 1-byte frames
/// in 64 KiB); what is left is held and delivered at its next turn, before
/// anything newer.
const FRAMES_PER_TURN: u64 = 1024;

/// Feeds `bytes` to the connection's decoder and hands every whole frame to
/// the host, until the host closes or pauses the connection, or stop begins.
fn deliver<H: Handler>(
    shared: &Shared,
    handler: &mut H,
    decoder: &mut Decoder,
    cshared: &ConnShared,
    id: u64,
    bytes: &[u8],
) -> Delivered {
    let stats = &shared.stats;
    let mut out = Delivered::default();
    let mut starved = false;
    let mut turn_over = false;
    let fed = decoder.feed_counted(bytes, &mut |frame| {
        if shared.stopping.load(Ordering::Relaxed) {
            return Flow::Stop;
        }
        bump(&stats.frames_received, 1);
        bump(&cshared.frames_received, 1);
        #[cfg(feature = "fault-injection")]
        if frame == crate::shared::PANIC_PAYLOAD {
            panic!("fault injection: panic while dispatching a frame");
        }
        if !handler.on_message(id, frame) {
            starved = true;
            return Flow::Stop;
        }
        out.frames += 1;
        // During dispatch a connection stops being delivered to only through
        // tf_conn_close / tf_conn_abort (which set the first flag first, on
        // any thread), tf_conn_pause (the second) or a stop.
        if cshared.close_requested.load(Ordering::Relaxed) || cshared.paused.load(Ordering::Relaxed) {
            Flow::Stop
        } else if out.frames >= FRAMES_PER_TURN {
            // Its share of this turn is used: the rest waits for the next.
            turn_over = true;
            Flow::Stop
        } else {
            Flow::Continue
        }
    });
    match fed {
        _ if starved => {
            out.failure = Some((CloseReason::Overload, "no memory to queue a frame for the host".into()));
        }
        Ok((Flow::Stop, used))
            if (turn_over || cshared.paused.load(Ordering::Acquire))
                && !cshared.close_requested.load(Ordering::Acquire)
                && !shared.stopping.load(Ordering::Acquire) =>
        {
            out.held_from = Some(used);
        }
        Ok(_) => {}
        Err(DecodeError::TooLarge { announced, max }) => {
            out.failure = Some((
                CloseReason::TooLarge,
                format!("announced a frame of {announced} bytes (max frame {max})"),
            ));
        }
        Err(DecodeError::Protocol { announced }) => {
            out.failure =
                Some((CloseReason::Protocol, format!("announced an impossible length ({announced})")));
        }
        Err(DecodeError::OutOfMemory) => {
            out.failure = Some((CloseReason::Overload, "no memory for a partial frame".into()));
        }
    }
    out
}

impl<H: Handler> EventLoop<H> {
    /// Reads what the peer sent (one read: a bounded share of the
    /// iteration) and delivers every whole frame.
    pub(super) fn read_ready(&mut self, slot: u32) {
        let (fd, id, reading, paused, was_dirty) = {
            let mut st = self.state.borrow_mut();
            let Some(c) = st.get(slot) else { return };
            if c.eof {
                return;
            }
            if !c.stash.is_empty() {
                // Bytes a pause held back go first: no new read before them.
                if !c.host_paused {
                    st.schedule_turn(slot);
                }
                return;
            }
            let reading = c.is_reading() && !c.shared.close_requested.load(Ordering::Acquire);
            (sys::raw(&c.fd), c.id, reading, c.paused || c.host_paused, c.dirty)
        };
        if paused {
            return;
        }
        if !reading {
            return self.discard_ready(slot, fd);
        }
        if self.state.borrow().get(slot).is_some_and(|c| c.proxy.is_some()) {
            return self.read_proxy_header(slot, id, fd);
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
        let n = match sys::recv(fd, &mut self.scratch) {
            Ok(0) => return self.after_delivery(slot, id, None, Delivered::default(), true),
            Ok(n) => n,
            Err(e) if would_block(&e) => return,
            Err(e) => {
                let reason = if is_reset(&e) { CloseReason::Peer } else { CloseReason::Io };
                let failed =
                    Delivered { failure: Some((reason, format!("read: {e}"))), ..Delivered::default() };
                return self.after_delivery(slot, id, None, failed, false);
            }
        };
        // A frame counts as received when its last byte is read, not when
        // this iteration began (callbacks before it may have been slow).
        let read_at = Instant::now();
        bump(&self.shared.stats.bytes_received, n as u64);
        if let Some(c) = self.state.borrow().get(slot) {
            bump(&c.shared.bytes_received, n as u64);
        }
        self.deliver_read(slot, id, 0..n, read_at);
        // Replies to what was just read go out now, not after every other
        // ready connection was read: the peer waits for one read and one
        // write, not for the whole pass. A connection that other callbacks
        // had already sent to this iteration (a fan-out target) waits for
        // the flush pass instead, so that it still gets one write.
        if !was_dirty {
            self.flush_one(slot);
        }
    }

    /// Moves the decoder out of the connection for a delivery (callbacks
    /// run with no borrow of the loop's state held).
    fn take_decoder(&mut self, slot: u32, id: u64) -> (Decoder, std::sync::Arc<ConnShared>) {
        let mut st = self.state.borrow_mut();
        st.current = (id, slot);
        let c = st.conn_mut(slot);
        (
            std::mem::replace(&mut c.decoder, Decoder::with_format(self.max_frame, self.format)),
            c.shared.clone(),
        )
    }

    /// Puts the decoder back and applies what a delivery found: end of
    /// stream, a failure, the idle clock, the budget, the poller's interest.
    fn after_delivery(
        &mut self,
        slot: u32,
        id: u64,
        decoder: Option<(Decoder, Instant)>,
        out: Delivered,
        eof: bool,
    ) {
        let mut st = self.state.borrow_mut();
        st.current = (0, NIL);
        let Some(c) = st.get_id(slot, id) else { return };
        let read_at = decoder.as_ref().map(|&(_, at)| at);
        if let Some((decoder, _)) = decoder {
            if c.is_reading() {
                c.decoder = decoder;
            }
        }
        if eof {
            c.eof = true;
        }
        if let (true, Some(at)) = (out.frames > 0, read_at) {
            if !st.conn_mut(slot).host_paused {
                st.idle_touch(slot, at);
            }
        }
        st.account_buffered(slot);
        if eof {
            st.mark_closing(slot, CloseReason::Peer);
        }
        if let Some((reason, why)) = out.failure {
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

    /// One connection's turn: delivers `bytes` (a read, bytes held from an
    /// earlier turn, or the first bytes after a PROXY header) and applies
    /// the outcome. What a pause or the end of the turn leaves is held, to be
    /// delivered first at the connection's next turn.
    pub(super) fn deliver_turn(&mut self, slot: u32, id: u64, bytes: &[u8], read_at: Instant) {
        let (mut decoder, cshared) = self.take_decoder(slot, id);
        let Self { shared, handler, .. } = self;
        let mut out = deliver(shared, handler, &mut decoder, &cshared, id, bytes);
        if let Some(from) = out.held_from {
            if !self.hold(slot, id, &bytes[from..]) {
                out.failure = Some((CloseReason::Overload, "no memory to hold undelivered input".into()));
            }
        }
        self.after_delivery(slot, id, Some((decoder, read_at)), out, false);
    }

    /// deliver_turn for bytes of the loop's read buffer, lent out for the
    /// turn and put back even when the turn panics (the loop's panic guard
    /// then closes the connection; a lost buffer would make every later
    /// read look like end of stream).
    pub(super) fn deliver_read(
        &mut self,
        slot: u32,
        id: u64,
        range: std::ops::Range<usize>,
        read_at: Instant,
    ) {
        let scratch = std::mem::take(&mut self.scratch);
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.deliver_turn(slot, id, &scratch[range], read_at)
        }));
        self.scratch = scratch;
        if let Err(panic) = turn {
            std::panic::resume_unwind(panic);
        }
    }

    /// Keeps bytes a turn did not deliver; schedules the next turn unless the
    /// host paused the connection (then tf_conn_resume does). False when
    /// memory for them cannot be had.
    fn hold(&mut self, slot: u32, id: u64, rest: &[u8]) -> bool {
        let mut st = self.state.borrow_mut();
        let Some(c) = st.get_id(slot, id) else { return true };
        if c.stash.try_reserve_exact(rest.len()).is_err() {
            return false;
        }
        c.stash.extend_from_slice(rest);
        if !c.host_paused && !c.shared.paused.load(Ordering::Acquire) {
            st.schedule_turn(slot);
        }
        true
    }

    /// Connections the host resumed: what a pause held back is delivered
    /// first, in order; then they are read again.
    pub(super) fn deliver_resumed(&mut self) {
        let resumed = {
            let mut st = self.state.borrow_mut();
            let resumed = std::mem::take(&mut st.resumed);
            for &(slot, id) in &resumed {
                if let Some(c) = st.get_id(slot, id) {
                    c.turn_due = false;
                }
            }
            resumed
        };
        for (slot, id) in resumed {
            if !self.handler.wants_input() {
                // Pull mode, queue full: parked like a read would be, and
                // back in turn once the host drains (resume_paused).
                let mut st = self.state.borrow_mut();
                if let Some(c) = st.get_id(slot, id) {
                    if !c.paused {
                        c.paused = true;
                        st.idle_unlink(slot);
                        drop(st);
                        self.paused.push(slot);
                        self.sync_interest(slot);
                    }
                }
                continue;
            }
            let stash = {
                let mut st = self.state.borrow_mut();
                match st.get_id(slot, id) {
                    Some(c) if !c.host_paused && !c.paused && c.is_reading() => std::mem::take(&mut c.stash),
                    Some(_) => continue,
                    None => continue,
                }
            };
            if stash.is_empty() || self.shared.stopping.load(Ordering::Acquire) {
                self.sync_interest(slot);
                continue;
            }
            self.deliver_turn(slot, id, &stash, Instant::now());
        }
    }
}

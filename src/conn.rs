//! One connection's state, without sockets: its decoder, its output queue,
//! and where it stands between open and closed. Pure logic, unit-tested.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::frame::{self, Decoder, PREFIX_LEN};
use crate::sys::Interest;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Why a connection ended; the numeric values are the C API's TF_CLOSE_*.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum CloseReason {
    Peer = 0,
    Local = 1,
    Shutdown = 2,
    Io = 3,
    TooLarge = 4,
    Idle = 5,
}

impl CloseReason {
    /// Graceful closes write what is queued before the descriptor is closed.
    pub fn is_graceful(self) -> bool {
        matches!(self, CloseReason::Peer | CloseReason::Local | CloseReason::Shutdown)
    }
}

/// The part of a connection that host threads see: whether a close was
/// requested, and how many output bytes are queued against the limit.
#[derive(Debug, Default)]
pub struct ConnShared {
    pub queued: AtomicU64,
    pub close_requested: AtomicBool,
}

/// Why a frame could not be queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    Full,
}

impl ConnShared {
    /// Reserves `n` bytes of the output limit, or refuses without reserving.
    pub fn reserve(&self, n: u64, limit: u64) -> Result<(), QueueError> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| q.checked_add(n).filter(|&t| t <= limit))
            .map(drop)
            .map_err(|_| QueueError::Full)
    }

    pub fn release(&self, n: u64) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Where a connection stands. Reasons are decided once: the first one wins,
/// except that a server stop turns every close not asked for by the host
/// into a shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Open,
    /// Marked for closing; `flush` says whether queued output goes first.
    Closing {
        reason: CloseReason,
        flush: bool,
    },
}

pub const NIL: u32 = u32::MAX;

/// Output buffers larger than this are freed rather than kept for reuse.
pub const RETAIN_OUT: usize = 32 * 1024;

#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub fd: OwnedFd,
    pub shared: Arc<ConnShared>,
    pub decoder: Decoder,
    /// Encoded frames waiting for the socket; `out[..out_pos]` is written.
    pub out: Vec<u8>,
    pub out_pos: usize,
    /// Start of the first frame not yet fully written (for frames_sent).
    pub out_boundary: usize,
    /// Frames in `out` not yet counted as sent.
    pub out_frames: u64,
    pub phase: Phase,
    /// End of stream or error seen on the read side: never read again.
    pub eof: bool,
    /// The host's event queue is full (pull mode): not reading for now.
    pub paused: bool,
    /// A partial write left bytes behind: watch for writability.
    pub want_write: bool,
    /// In the loop's dirty list (to be flushed this iteration).
    pub dirty: bool,
    /// In the loop's closing list.
    pub in_closing_list: bool,
    /// What the poller watches now, to skip redundant changes.
    pub interest: Interest,
    /// In the poller at all. A connection that wants nothing is removed, so
    /// that a hang-up (always reported) cannot wake the loop in a spin.
    pub registered: bool,
    /// Last complete inbound frame (or accept): the idle clock.
    pub last_frame: Instant,
    pub idle_prev: u32,
    pub idle_next: u32,
}

impl Conn {
    pub fn new(id: u64, fd: OwnedFd, max_frame: u32, now: Instant) -> Conn {
        Conn {
            id,
            fd,
            shared: Arc::new(ConnShared::default()),
            decoder: Decoder::new(max_frame),
            out: Vec::new(),
            out_pos: 0,
            out_boundary: 0,
            out_frames: 0,
            phase: Phase::Open,
            eof: false,
            paused: false,
            want_write: false,
            dirty: false,
            in_closing_list: false,
            interest: Interest::READ,
            registered: true,
            last_frame: now,
            idle_prev: NIL,
            idle_next: NIL,
        }
    }

    /// Inbound frames are still delivered to the host.
    pub fn is_reading(&self) -> bool {
        self.phase == Phase::Open && !self.eof
    }

    /// The host may still queue frames for it (from the loop thread).
    pub fn takes_frames(&self) -> bool {
        match self.phase {
            Phase::Open => true,
            Phase::Closing { reason, flush } => flush && reason == CloseReason::Peer,
        }
    }

    /// Open, or closing gracefully: queued output will still be written.
    pub fn is_flushing(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Closing { flush: true, .. })
    }

    pub fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Marks the connection for closing. Returns false when it already was
    /// (the first reason stands).
    pub fn mark_closing(&mut self, reason: CloseReason) -> bool {
        match self.phase {
            Phase::Open => {
                self.phase = Phase::Closing { reason, flush: reason.is_graceful() };
                true
            }
            Phase::Closing { reason: r, flush } => {
                // An error while flushing ends the wait, not the reason.
                if flush && !reason.is_graceful() {
                    self.phase = Phase::Closing { reason: r, flush: false };
                }
                false
            }
        }
    }

    /// The server is stopping: every close the host did not ask for becomes
    /// a shutdown, and queued output may still drain.
    pub fn mark_shutdown(&mut self) {
        match self.phase {
            Phase::Closing { reason: CloseReason::Local, .. } => {}
            Phase::Closing { flush, .. } => {
                self.phase = Phase::Closing { reason: CloseReason::Shutdown, flush }
            }
            Phase::Open => self.phase = Phase::Closing { reason: CloseReason::Shutdown, flush: true },
        }
    }

    /// Ready for the close phase: marked, and nothing left to wait for.
    pub fn ready_to_close(&self) -> bool {
        match self.phase {
            Phase::Open => false,
            Phase::Closing { flush, .. } => !flush || !self.has_output(),
        }
    }

    /// The reason on_close reports. A host close (tf_conn_close returned OK)
    /// wins over the peer leaving or an I/O error found while flushing; once
    /// stop has begun, everything but a host close is a shutdown.
    pub fn reported_reason(&self, stopping: bool) -> CloseReason {
        let mut reason = self.close_reason().unwrap_or(CloseReason::Io);
        if matches!(reason, CloseReason::Peer | CloseReason::Io)
            && self.shared.close_requested.load(Ordering::Acquire)
        {
            reason = CloseReason::Local;
        }
        if stopping && reason != CloseReason::Local {
            reason = CloseReason::Shutdown;
        }
        reason
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        match self.phase {
            Phase::Open => None,
            Phase::Closing { reason, .. } => Some(reason),
        }
    }

    /// Appends one frame to the output queue; the caller reserved its bytes.
    /// `spare` is an empty buffer to adopt when the queue has none.
    pub fn push_frame(&mut self, payload: &[u8], spare: impl FnOnce() -> Vec<u8>) {
        if self.out.capacity() == 0 {
            self.out = spare();
        }
        self.out.reserve(PREFIX_LEN + payload.len());
        frame::encode_into(&mut self.out, payload);
        self.out_frames += 1;
    }

    /// Records that `n` more bytes reached the socket. Returns the frames
    /// completed by them. When the queue empties its buffer is returned for
    /// reuse (or dropped when large), so an idle connection holds none.
    pub fn wrote(&mut self, n: usize) -> (u64, Option<Vec<u8>>) {
        self.out_pos += n;
        self.shared.release(n as u64);
        if self.out_pos == self.out.len() {
            // Everything went: no need to walk the prefixes (the common case).
            let frames = std::mem::take(&mut self.out_frames);
            self.out_pos = 0;
            self.out_boundary = 0;
            let mut buf = std::mem::take(&mut self.out);
            buf.clear();
            let keep = (buf.capacity() <= RETAIN_OUT).then_some(buf);
            return (frames, keep);
        }
        let frames = frame::frames_completed(&self.out, &mut self.out_boundary, self.out_pos);
        self.out_frames -= frames;
        // Compact once the written part dominates, so the queue stays within
        // about twice its limit and never grows by re-appending.
        if self.out_pos >= RETAIN_OUT && self.out_pos * 2 >= self.out.len() {
            self.out.drain(..self.out_boundary);
            self.out_pos -= self.out_boundary;
            self.out_boundary = 0;
        }
        (frames, None)
    }

    /// Drops unsent output (the connection is going away).
    pub fn discard_output(&mut self) {
        let unsent = (self.out.len() - self.out_pos) as u64;
        self.shared.release(unsent);
        self.out = Vec::new();
        self.out_pos = 0;
        self.out_boundary = 0;
        self.out_frames = 0;
    }

    /// What the poller should watch for this connection now.
    pub fn wanted_interest(&self) -> Interest {
        Interest { read: !self.eof && !self.paused, write: self.want_write && self.has_output() }
    }
}

/// Size of the prefix plus payload, as counted against max queued output.
pub fn encoded_len(payload_len: usize) -> u64 {
    (PREFIX_LEN + payload_len) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn conn() -> Conn {
        // A real descriptor, so that dropping the Conn closes something ours.
        let fd = std::fs::File::open("/dev/null").unwrap();
        let fd: OwnedFd = fd.into();
        Conn::new(1, fd, 1024, Instant::now())
    }

    #[test]
    fn reserve_refuses_past_the_limit_and_reserves_nothing() {
        let s = ConnShared::default();
        assert_eq!(s.reserve(60, 100), Ok(()));
        assert_eq!(s.reserve(41, 100), Err(QueueError::Full));
        assert_eq!(s.queued.load(Ordering::Relaxed), 60);
        assert_eq!(s.reserve(40, 100), Ok(()));
        s.release(100);
        assert_eq!(s.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn writes_count_whole_frames_and_release_the_buffer_when_empty() {
        let mut c = conn();
        for p in [&b"abc"[..], b"", b"hello"] {
            c.shared.reserve(encoded_len(p.len()), 1 << 20).unwrap();
            c.push_frame(p, Vec::new);
        }
        assert_eq!(c.out.len(), 7 + 4 + 9);
        assert_eq!(c.wrote(5).0, 0);
        assert_eq!(c.wrote(6).0, 2);
        let (frames, buf) = c.wrote(9);
        assert_eq!(frames, 1);
        assert!(buf.is_some(), "a small buffer is handed back for reuse");
        assert_eq!(c.out.capacity(), 0, "an idle connection holds no output buffer");
        assert_eq!(c.shared.queued.load(Ordering::Relaxed), 0);
        assert!(!c.has_output());
    }

    #[test]
    fn a_large_output_buffer_is_freed_not_kept() {
        let mut c = conn();
        let big = vec![0u8; RETAIN_OUT * 2];
        c.shared.reserve(encoded_len(big.len()), u64::MAX).unwrap();
        c.push_frame(&big, Vec::new);
        let (_, buf) = c.wrote(big.len() + 4);
        assert!(buf.is_none());
    }

    #[test]
    fn partial_writes_compact_the_queue_at_frame_boundaries() {
        let mut c = conn();
        let p = vec![1u8; 40_000];
        for _ in 0..4 {
            c.shared.reserve(encoded_len(p.len()), u64::MAX).unwrap();
            c.push_frame(&p, Vec::new);
        }
        let total = c.out.len();
        let (frames, _) = c.wrote(100_000);
        assert_eq!(frames, 2);
        assert!(c.out.len() < total, "written whole frames were dropped from the front");
        let rest = c.out.len() - c.out_pos;
        assert_eq!(rest, total - 100_000);
        let (frames, _) = c.wrote(rest);
        assert_eq!(frames, 2);
    }

    #[test]
    fn the_first_close_reason_wins_but_an_error_ends_the_flush() {
        let mut c = conn();
        assert!(c.mark_closing(CloseReason::Local));
        assert!(!c.mark_closing(CloseReason::Peer));
        assert_eq!(c.close_reason(), Some(CloseReason::Local));
        c.shared.reserve(5, 100).unwrap();
        c.push_frame(b"x", Vec::new);
        assert!(!c.ready_to_close(), "a graceful close waits for queued output");
        c.mark_closing(CloseReason::Io);
        assert_eq!(c.close_reason(), Some(CloseReason::Local));
        assert!(c.ready_to_close());
    }

    #[test]
    fn shutdown_overrides_every_reason_but_a_host_close() {
        let mut a = conn();
        a.mark_shutdown();
        assert_eq!(a.close_reason(), Some(CloseReason::Shutdown));
        let mut b = conn();
        b.mark_closing(CloseReason::Peer);
        b.mark_shutdown();
        assert_eq!(b.close_reason(), Some(CloseReason::Shutdown));
        let mut c = conn();
        c.mark_closing(CloseReason::Local);
        c.mark_shutdown();
        assert_eq!(c.close_reason(), Some(CloseReason::Local));
    }

    #[test]
    fn the_reported_reason_prefers_a_host_close_and_then_a_stop() {
        let mut peer_left = conn();
        peer_left.mark_closing(CloseReason::Peer);
        assert_eq!(peer_left.reported_reason(false), CloseReason::Peer);
        assert_eq!(peer_left.reported_reason(true), CloseReason::Shutdown);
        peer_left.shared.close_requested.store(true, Ordering::Relaxed);
        assert_eq!(peer_left.reported_reason(false), CloseReason::Local);
        assert_eq!(peer_left.reported_reason(true), CloseReason::Local);
        let mut too_large = conn();
        too_large.mark_closing(CloseReason::TooLarge);
        too_large.shared.close_requested.store(true, Ordering::Relaxed);
        assert_eq!(too_large.reported_reason(false), CloseReason::TooLarge);
        let mut idle = conn();
        idle.mark_closing(CloseReason::Idle);
        assert_eq!(idle.reported_reason(true), CloseReason::Shutdown);
    }

    #[test]
    fn frames_accepted_before_a_close_or_stop_are_still_written_but_not_after_an_error() {
        let mut c = conn();
        assert!(c.is_flushing());
        c.mark_shutdown();
        assert!(c.is_flushing());
        c.mark_closing(CloseReason::Io);
        assert!(!c.is_flushing());
    }

    #[test]
    fn a_half_closed_peer_still_takes_replies_but_a_closed_one_does_not() {
        let mut c = conn();
        c.mark_closing(CloseReason::Peer);
        assert!(c.takes_frames());
        let mut d = conn();
        d.mark_closing(CloseReason::Local);
        assert!(!d.takes_frames());
        assert!(!d.is_reading());
    }

    #[test]
    fn interest_follows_eof_pause_and_pending_output() {
        let mut c = conn();
        assert_eq!(c.wanted_interest(), Interest::READ);
        c.shared.reserve(5, 100).unwrap();
        c.push_frame(b"x", Vec::new);
        c.want_write = true;
        assert_eq!(c.wanted_interest(), Interest { read: true, write: true });
        c.eof = true;
        assert_eq!(c.wanted_interest(), Interest { read: false, write: true });
        c.discard_output();
        assert_eq!(c.wanted_interest(), Interest::NONE);
        assert_eq!(c.shared.queued.load(Ordering::Relaxed), 0);
    }
}

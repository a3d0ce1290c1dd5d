//! One connection's state, without sockets: its decoder, its output queue,
//! and where it stands between open and closed. Pure logic, unit-tested.
//! (The output queue itself lives in outq.rs.)

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::frame::{Decoder, Format};
use crate::outq::{OutOfMemory, OutQueue};
use crate::sys::Interest;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
    Protocol = 6,
    ConnectFailed = 7,
    Slow = 8,
    Overload = 9,
}

impl CloseReason {
    /// Graceful closes write what is queued before the descriptor is closed.
    pub fn is_graceful(self) -> bool {
        matches!(self, CloseReason::Peer | CloseReason::Local | CloseReason::Shutdown)
    }
}

/// `ConnShared::closing` values: where the loop says the connection stands.
pub const OPEN: u8 = 0;
/// The peer ended its stream: replies are still written (half-close).
pub const HALF_CLOSED: u8 = 1;
/// Closing for a reason of the loop's own: takes no more frames.
pub const GONE: u8 = 2;

/// on_close has been reported (or its pull-mode CLOSE event produced):
/// every call naming it is TF_ERR_NO_CONN; its user data stays readable
/// until the callback has returned.
pub const CLOSED: u8 = 3;

/// The part of a connection that host threads see: whether a close was
/// requested, where the loop says it stands, how many output bytes are
/// queued against the limit, the host's pointer and the counters of
/// tf_conn_get_info. Counters are written by the loop thread only.
#[derive(Debug)]
pub struct ConnShared {
    pub queued: AtomicU64,
    /// tf_conn_close or tf_conn_abort returned TF_OK for it.
    pub close_requested: AtomicBool,
    /// OPEN, HALF_CLOSED, GONE or CLOSED; written by the loop only.
    pub closing: AtomicU8,
    /// tf_conn_set_user_data's pointer (an address: the library never uses it).
    pub user_data: AtomicUsize,
    /// Between tf_conn_pause and tf_conn_resume: no frame is delivered.
    pub paused: AtomicBool,
    /// A tf_send* returned TF_ERR_FULL: tell the host once there is room.
    pub want_writable: AtomicBool,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub frames_sent: AtomicU64,
    /// The peer text on_connect got; set once, before the host can name it.
    pub peer: OnceLock<Box<str>>,
    /// When it was accepted (or, outbound, when tf_connect was called).
    pub born: Instant,
    /// Made by tf_connect.
    pub outbound: AtomicBool,
}

impl Default for ConnShared {
    fn default() -> ConnShared {
        ConnShared::new(Instant::now())
    }
}

/// Why a frame could not be queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    Full,
}

impl ConnShared {
    pub fn new(born: Instant) -> ConnShared {
        ConnShared {
            queued: AtomicU64::new(0),
            close_requested: AtomicBool::new(false),
            closing: AtomicU8::new(OPEN),
            user_data: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            want_writable: AtomicBool::new(false),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            frames_received: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            peer: OnceLock::new(),
            born,
            outbound: AtomicBool::new(false),
        }
    }

    /// Known to the host and its on_close not yet reported.
    pub fn is_live(&self) -> bool {
        self.closing.load(Ordering::Acquire) != CLOSED
    }

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

    /// tf_send may still queue frames for it (as far as host threads can tell).
    pub fn takes_frames(&self) -> bool {
        !self.close_requested.load(Ordering::Acquire) && self.closing.load(Ordering::Acquire) < GONE
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

#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub fd: OwnedFd,
    pub shared: Arc<ConnShared>,
    pub decoder: Decoder,
    /// Partial-frame bytes of this connection counted in the server's budget.
    pub buffered: usize,
    /// Encoded frames waiting for the socket.
    pub out: OutQueue,
    pub phase: Phase,
    /// Closed by tf_conn_abort or a close timeout: reset, not a graceful FIN.
    pub reset: bool,
    /// End of stream or error seen on the read side: never read again.
    pub eof: bool,
    /// The host's event queue is full (pull mode): not reading for now.
    pub paused: bool,
    /// tf_conn_pause: not reading, nothing delivered, no idle clock.
    pub host_paused: bool,
    /// Bytes read but not delivered because the host paused the connection
    /// in the middle of a read: delivered first at resume.
    pub stash: Vec<u8>,
    /// Since when queued output has been above the slow-consumer limit.
    pub above_since: Option<Instant>,
    /// Outbound, and the connect has not completed: nothing is read or
    /// written yet (frames sent meanwhile wait in `out`).
    pub connecting: bool,
    /// The host was told about it (on_connect): on_close will follow.
    pub announced: bool,
    /// PROXY protocol on: the header not read yet (nothing is framed before).
    pub proxy: Option<Box<crate::proxy::Parser>>,
    /// The socket's own peer (text, IP), kept while the PROXY header is read.
    pub socket_peer: Option<(String, Option<IpAddr>)>,
    /// The client IP counted against max connections per IP.
    pub ip: Option<IpAddr>,
    /// A partial write left bytes behind: watch for writability.
    pub want_write: bool,
    /// In the loop's dirty list (to be flushed this iteration).
    pub dirty: bool,
    /// In the loop's `resumed` list (a delivery turn is due for held bytes).
    pub turn_due: bool,
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
    pub fn new(id: u64, fd: OwnedFd, max_frame: u32, fmt: Format, now: Instant) -> Conn {
        Conn::with_shared(id, fd, max_frame, fmt, now, Arc::new(ConnShared::new(now)))
    }

    /// A connection whose shared half exists already (tf_connect made it).
    pub fn with_shared(
        id: u64,
        fd: OwnedFd,
        max_frame: u32,
        fmt: Format,
        now: Instant,
        shared: Arc<ConnShared>,
    ) -> Conn {
        Conn {
            id,
            fd,
            shared,
            decoder: Decoder::with_format(max_frame, fmt),
            buffered: 0,
            out: OutQueue::new(fmt),
            phase: Phase::Open,
            reset: false,
            eof: false,
            paused: false,
            host_paused: false,
            stash: Vec::new(),
            above_since: None,
            connecting: false,
            announced: false,
            proxy: None,
            socket_peer: None,
            ip: None,
            want_write: false,
            dirty: false,
            turn_due: false,
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
        !self.out.is_empty()
    }

    /// Marks the connection for closing. Returns false when it already was
    /// (the first reason stands).
    pub fn mark_closing(&mut self, reason: CloseReason) -> bool {
        let first = match self.phase {
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
        };
        self.publish_phase();
        first
    }

    /// Tells host threads whether the connection still takes frames.
    fn publish_phase(&self) {
        let state = match self.phase {
            Phase::Open => OPEN,
            Phase::Closing { reason: CloseReason::Peer, flush: true } => HALF_CLOSED,
            Phase::Closing { .. } => GONE,
        };
        self.shared.closing.store(state, Ordering::Release);
    }

    /// tf_conn_abort, or a close whose output could not be written in time:
    /// drop what is queued and reset the connection. The reason stays (a
    /// host close is reported as TF_CLOSE_LOCAL through close_requested).
    pub fn abort(&mut self) -> u64 {
        let reason = self.close_reason().unwrap_or(CloseReason::Local);
        self.phase = Phase::Closing { reason, flush: false };
        self.publish_phase();
        self.reset = true;
        self.eof = true;
        self.discard_output()
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
        self.publish_phase();
    }

    /// Ready for the close phase: marked, and nothing left to wait for.
    pub fn ready_to_close(&self) -> bool {
        match self.phase {
            Phase::Open => false,
            // A connect not yet done is abandoned, whatever is queued.
            Phase::Closing { flush, .. } => !flush || !self.has_output() || self.connecting,
        }
    }

    /// The reason on_close reports. A host close (tf_conn_close or
    /// tf_conn_abort returned OK) is reported as such whatever happened
    /// after it; once stop has begun, everything but a host close is a
    /// shutdown.
    pub fn reported_reason(&self, stopping: bool) -> CloseReason {
        let mut reason = self.close_reason().unwrap_or(CloseReason::Io);
        if self.shared.close_requested.load(Ordering::Acquire) {
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
    /// `spare` offers empty buffers to reuse. On failure nothing is queued.
    pub fn push_frame(
        &mut self,
        payload: &[u8],
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<(), OutOfMemory> {
        self.out.push_frame(payload, spare)
    }

    /// Records that `n` more bytes reached the socket. Returns the frames
    /// completed by them; written chunks go to `recycle`.
    pub fn wrote(&mut self, n: usize, recycle: &mut dyn FnMut(Vec<u8>)) -> u64 {
        self.shared.release(n as u64);
        self.out.wrote(n, recycle)
    }

    /// Drops unsent output (the connection is going away); returns its size.
    pub fn discard_output(&mut self) -> u64 {
        let unsent = self.out.discard() as u64;
        self.shared.release(unsent);
        unsent
    }

    /// What the poller should watch for this connection now.
    pub fn wanted_interest(&self) -> Interest {
        if self.connecting {
            return Interest { read: false, write: true };
        }
        Interest {
            read: !self.eof && !self.paused && !self.host_paused,
            write: self.want_write && self.has_output(),
        }
    }
}

/// Size of the prefix plus payload, as counted against max queued output.
pub fn encoded_len(fmt: Format, payload_len: usize) -> u64 {
    (fmt.width() + payload_len) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn conn() -> Conn {
        // A real descriptor, so that dropping the Conn closes something ours.
        let fd = std::fs::File::open("/dev/null").unwrap();
        let fd: OwnedFd = fd.into();
        Conn::new(1, fd, 1024, Format::default(), Instant::now())
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
    fn written_bytes_release_the_reservation() {
        let mut c = conn();
        for p in [&b"abc"[..], b"", b"hello"] {
            c.shared.reserve(encoded_len(Format::default(), p.len()), 1 << 20).unwrap();
            c.push_frame(p, &mut || None).unwrap();
        }
        assert_eq!(c.wrote(11, &mut drop), 2);
        assert_eq!(c.shared.queued.load(Ordering::Relaxed), 9);
        assert_eq!(c.discard_output(), 9);
        assert_eq!(c.shared.queued.load(Ordering::Relaxed), 0);
        assert!(!c.has_output());
    }

    #[test]
    fn the_first_close_reason_wins_but_an_error_ends_the_flush() {
        let mut c = conn();
        assert!(c.mark_closing(CloseReason::Local));
        assert!(!c.mark_closing(CloseReason::Peer));
        assert_eq!(c.close_reason(), Some(CloseReason::Local));
        c.shared.reserve(5, 100).unwrap();
        c.push_frame(b"x", &mut || None).unwrap();
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
        assert_eq!(too_large.reported_reason(false), CloseReason::Local, "tf_conn_close said OK first");
        let mut too_large = conn();
        too_large.mark_closing(CloseReason::TooLarge);
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
    fn host_threads_see_whether_a_connection_takes_frames() {
        let mut c = conn();
        assert!(c.shared.takes_frames());
        c.mark_closing(CloseReason::Peer);
        assert_eq!(c.shared.closing.load(Ordering::Relaxed), HALF_CLOSED);
        assert!(c.shared.takes_frames(), "a half-closed peer still gets replies");
        let mut d = conn();
        d.mark_closing(CloseReason::TooLarge);
        assert!(!d.shared.takes_frames());
        let mut e = conn();
        e.shared.reserve(5, 100).unwrap();
        e.push_frame(b"x", &mut || None).unwrap();
        e.mark_closing(CloseReason::Local);
        assert!(!e.ready_to_close());
        assert_eq!(e.abort(), 5);
        assert!(e.ready_to_close() && e.reset);
        assert_eq!(e.close_reason(), Some(CloseReason::Local));
    }

    #[test]
    fn interest_follows_eof_pause_and_pending_output() {
        let mut c = conn();
        assert_eq!(c.wanted_interest(), Interest::READ);
        c.shared.reserve(5, 100).unwrap();
        c.push_frame(b"x", &mut || None).unwrap();
        c.want_write = true;
        assert_eq!(c.wanted_interest(), Interest { read: true, write: true });
        c.eof = true;
        assert_eq!(c.wanted_interest(), Interest { read: false, write: true });
        c.discard_output();
        assert_eq!(c.wanted_interest(), Interest::NONE);
        assert_eq!(c.shared.queued.load(Ordering::Relaxed), 0);
    }
}

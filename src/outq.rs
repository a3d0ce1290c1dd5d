//! One connection's output queue: encoded frames in chunks of at most CHUNK
//! bytes, each freed as soon as it is written, so memory follows what is queued.
//!
//! Why chunks and not one growing buffer: a single buffer keeps the bytes
//! already written until it is compacted and grows by doubling, so it can
//! cost twice its bound or more. Here a queue holding `q` unsent bytes holds
//! at most `q` plus one partly written head chunk and one partly filled tail
//! chunk: about q + 2 × CHUNK, whatever the frame sizes. Every allocation is
//! fallible: when memory cannot be had the frame is refused, nothing aborts.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::frame::{Format, Walker};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

/// Largest chunk. Frames larger than this are split across chunks.
pub const CHUNK: usize = 32 * 1024;
/// Smallest chunk allocated for a new tail (it grows by doubling to CHUNK).
const MIN_CHUNK: usize = 256;
/// A pending chunk at least this full (and three quarters used) is moved,
/// not copied, when a host thread's frames join a connection's queue.
const MOVE_FROM: usize = 4096;
/// Most chunks handed to one sendmsg.
pub const MAX_IOV: usize = 64;

/// Appends prefix + payload to `buf`, which has room for both.
#[inline]
fn encode(fmt: Format, buf: &mut Vec<u8>, payload: &[u8]) {
    let (prefix, w) = fmt.prefix(payload.len());
    // Constant-size copies of the prefix (no call per frame).
    match w {
        4 => buf.extend_from_slice(&prefix[..4]),
        2 => buf.extend_from_slice(&prefix[..2]),
        1 => buf.extend_from_slice(&prefix[..1]),
        _ => buf.extend_from_slice(&prefix[..8]),
    }
    buf.extend_from_slice(payload);
}

/// Memory for a frame could not be had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfMemory;

/// A payload shared by several queues (tf_send_many): held once.
pub type SharedPayload = Arc<Vec<u8>>;

/// One frame's payload, as a send hands it over.
#[derive(Clone, Copy)]
pub enum Frame<'a> {
    One(&'a [u8]),
    /// Pieces joined into one payload (tf_sendv), `len` bytes in all.
    Parts(&'a [&'a [u8]], usize),
    /// A payload shared with other queues (tf_send_many).
    Shared(&'a SharedPayload),
}

impl Frame<'_> {
    pub fn len(&self) -> usize {
        match self {
            Frame::One(p) => p.len(),
            Frame::Parts(_, len) => *len,
            Frame::Shared(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A piece of the queue: bytes of its own, or a payload shared with other
/// connections' queues (tf_send_many), held once whatever the fan-out.
#[derive(Debug)]
enum Chunk {
    Own(Vec<u8>),
    Shared(SharedPayload),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Own(v) => v,
            Chunk::Shared(a) => a,
        }
    }

    fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Bytes that may still be appended to it.
    fn room(&self) -> usize {
        match self {
            Chunk::Own(v) => v.capacity() - v.len(),
            Chunk::Shared(_) => 0,
        }
    }

    /// Heap bytes this chunk holds (a shared payload counts whole).
    fn held(&self) -> usize {
        match self {
            Chunk::Own(v) => v.capacity(),
            Chunk::Shared(a) => a.len(),
        }
    }
}

#[derive(Debug, Default)]
pub struct OutQueue {
    fmt: Format,
    chunks: VecDeque<Chunk>,
    /// Bytes of the first chunk already written.
    head_pos: usize,
    /// Bytes queued and not yet written.
    unsent: usize,
    /// Frames queued and not yet counted as sent.
    frames: u64,
    /// Where the written part ends in the frame stream.
    walker: Walker,
}

impl OutQueue {
    /// A queue whose frames carry `fmt`'s prefix.
    pub fn new(fmt: Format) -> OutQueue {
        OutQueue { fmt, walker: Walker::new(fmt), ..OutQueue::default() }
    }

    /// Bytes a frame of `len` payload bytes takes in the queue.
    pub fn encoded_len(&self, len: usize) -> usize {
        self.fmt.width() + len
    }

    pub fn is_empty(&self) -> bool {
        self.unsent == 0
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.unsent
    }

    /// Heap bytes held by the queue's chunks (for tests and budgets).
    pub fn held(&self) -> usize {
        self.chunks.iter().map(Chunk::held).sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
    }

    /// Makes room for `n` more bytes, all or nothing, and returns the index
    /// of the chunk where they start. `spare` offers an empty buffer to
    /// reuse (the loop's pool) before a new one is allocated.
    fn reserve(
        &mut self,
        n: usize,
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<usize, OutOfMemory> {
        if n == 0 {
            return Ok(self.chunks.len());
        }
        let tail_room = self.chunks.back().map_or(0, Chunk::room);
        if tail_room >= n {
            return Ok(self.chunks.len() - 1);
        }
        // Grow a small tail first (doubling, up to CHUNK).
        let mut room = tail_room;
        if let Some(Chunk::Own(tail)) = self.chunks.back_mut() {
            if tail.capacity() < CHUNK {
                let target = CHUNK.min((tail.capacity() * 2).max(tail.len() + n));
                tail.try_reserve_exact(target - tail.len()).map_err(|_| OutOfMemory)?;
                room = tail.capacity() - tail.len();
            }
        }
        let start = if room > 0 { self.chunks.len() - 1 } else { self.chunks.len() };
        let before = self.chunks.len();
        let mut missing = n.saturating_sub(room);
        while missing > 0 {
            let want = missing.min(CHUNK);
            let chunk = match spare().filter(|b| b.capacity() >= want) {
                Some(b) => b,
                None => {
                    let mut b = Vec::new();
                    let cap = if missing >= CHUNK { CHUNK } else { want.max(MIN_CHUNK) };
                    if b.try_reserve_exact(cap).is_err() || self.chunks.try_reserve(1).is_err() {
                        self.chunks.truncate(before);
                        return Err(OutOfMemory);
                    }
                    b
                }
            };
            missing -= want.min(chunk.capacity());
            self.chunks.push_back(Chunk::Own(chunk));
        }
        Ok(start)
    }

    /// Copies `bytes` into the room `reserve` made, from chunk `start` on.
    fn fill(&mut self, start: usize, mut bytes: &[u8]) {
        for c in self.chunks.iter_mut().skip(start) {
            if bytes.is_empty() {
                break;
            }
            if let Chunk::Own(v) = c {
                let take = (v.capacity() - v.len()).min(bytes.len());
                v.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
            }
        }
        debug_assert!(bytes.is_empty(), "reserve made room for every byte");
    }

    /// Appends one frame (prefix + payload), or nothing when memory is short.
    #[inline]
    pub fn push_frame(
        &mut self,
        payload: &[u8],
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<(), OutOfMemory> {
        let n = self.fmt.width() + payload.len();
        // The common case: the tail has room for the whole frame.
        if let Some(Chunk::Own(tail)) = self.chunks.back_mut() {
            if tail.capacity() - tail.len() >= n {
                encode(self.fmt, tail, payload);
                self.unsent += n;
                self.frames += 1;
                return Ok(());
            }
        }
        self.push_frame_slow(payload, spare)
    }

    /// push_frame when the tail has no room: the first frame after the
    /// queue was written out takes a whole buffer from `spare` (the loop's
    /// pool) when it fits there; anything else goes the general way.
    #[inline(never)]
    fn push_frame_slow(
        &mut self,
        payload: &[u8],
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<(), OutOfMemory> {
        let n = self.fmt.width() + payload.len();
        if self.chunks.is_empty() && n <= CHUNK && self.chunks.try_reserve(1).is_ok() {
            if let Some(mut b) = spare().filter(|b| b.capacity() >= n) {
                encode(self.fmt, &mut b, payload);
                self.chunks.push_back(Chunk::Own(b));
                self.unsent += n;
                self.frames += 1;
                return Ok(());
            }
        }
        self.push_frame_parts(&[payload], payload.len(), spare)
    }

    /// Appends one frame whose payload is `parts` joined (`len` bytes in
    /// all): one copy, no intermediate buffer. Nothing on failure.
    pub fn push_frame_parts(
        &mut self,
        parts: &[&[u8]],
        len: usize,
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<(), OutOfMemory> {
        let n = self.fmt.width() + len;
        let start = self.reserve(n, spare)?;
        let (prefix, w) = self.fmt.prefix(len);
        self.fill(start, &prefix[..w]);
        for part in parts {
            // `fill` passes over chunks that are already full.
            self.fill(start, part);
        }
        self.unsent += n;
        self.frames += 1;
        Ok(())
    }

    /// Appends one frame whose payload is shared with other queues: only the
    /// prefix is copied here. Nothing on failure.
    pub fn push_shared(
        &mut self,
        payload: &SharedPayload,
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<(), OutOfMemory> {
        if payload.is_empty() {
            return self.push_frame(&[], spare);
        }
        let before = self.chunks.len();
        let (prefix, w) = self.fmt.prefix(payload.len());
        let start = self.reserve(w, spare)?;
        if self.chunks.try_reserve(1).is_err() {
            self.chunks.truncate(before);
            return Err(OutOfMemory);
        }
        self.fill(start, &prefix[..w]);
        self.chunks.push_back(Chunk::Shared(payload.clone()));
        self.unsent += w + payload.len();
        self.frames += 1;
        Ok(())
    }

    /// Appends one frame, whatever form its payload has. Nothing on failure.
    pub fn push(
        &mut self,
        frame: Frame<'_>,
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<(), OutOfMemory> {
        match frame {
            Frame::One(p) => self.push_frame(p, spare),
            Frame::Parts(parts, len) => self.push_frame_parts(parts, len, spare),
            Frame::Shared(p) => self.push_shared(p, spare),
        }
    }

    /// Appends frames already encoded (`frames` of them, whole), or nothing.
    pub fn push_encoded(
        &mut self,
        bytes: &[u8],
        frames: u64,
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<(), OutOfMemory> {
        let start = self.reserve(bytes.len(), spare)?;
        self.fill(start, bytes);
        self.unsent += bytes.len();
        self.frames += frames;
        Ok(())
    }

    /// Appends another queue (frames a host thread queued): its well-filled
    /// and shared chunks move here without a copy; small or half-empty ones
    /// are copied into the tail, so that a trickle of tiny frames does not
    /// keep a chunk each. On failure returns the bytes of `other` that were
    /// not appended (the caller then discards the connection's output).
    pub fn append(
        &mut self,
        mut other: OutQueue,
        spare: &mut dyn FnMut() -> Option<Vec<u8>>,
    ) -> Result<(), usize> {
        debug_assert_eq!(other.head_pos, 0, "nothing of a pending queue is written");
        let mut left = other.unsent;
        self.frames += other.frames;
        while let Some(chunk) = other.chunks.pop_front() {
            let n = chunk.len();
            let moves = match &chunk {
                Chunk::Shared(_) => true,
                Chunk::Own(v) => n >= MOVE_FROM && n * 4 >= v.capacity() * 3,
            };
            if moves {
                if self.chunks.try_reserve(1).is_err() {
                    return Err(left);
                }
                self.chunks.push_back(chunk);
            } else {
                let Ok(start) = self.reserve(n, spare) else { return Err(left) };
                self.fill(start, chunk.bytes());
            }
            self.unsent += n;
            left -= n;
        }
        Ok(())
    }

    /// Chunks holding unsent bytes (1 in the common case of a small queue).
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// The unsent bytes of the first chunk.
    pub fn first_slice(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c.bytes()[self.head_pos..])
    }

    /// The unsent bytes, as at most MAX_IOV slices for one sendmsg.
    pub fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        out.clear();
        for (i, c) in self.chunks.iter().enumerate().take(MAX_IOV) {
            let start = if i == 0 { self.head_pos } else { 0 };
            if c.len() > start {
                out.push(IoSlice::new(&c.bytes()[start..]));
            }
        }
    }

    /// Records that `n` more bytes reached the socket. Returns the frames
    /// they completed; written chunks of its own go to `recycle` (the loop's pool).
    pub fn wrote(&mut self, n: usize, recycle: &mut dyn FnMut(Vec<u8>)) -> u64 {
        debug_assert!(n <= self.unsent);
        if n >= self.unsent {
            // Everything went (the common case): no prefix walk.
            let frames = std::mem::take(&mut self.frames);
            self.unsent = 0;
            self.head_pos = 0;
            self.walker.reset();
            for c in self.chunks.drain(..) {
                if let Chunk::Own(v) = c {
                    recycle(v);
                }
            }
            return frames;
        }
        self.unsent -= n;
        let mut left = n;
        let mut frames = 0;
        while left > 0 {
            let Some(c) = self.chunks.front() else { break };
            let bytes = c.bytes();
            let take = (bytes.len() - self.head_pos).min(left);
            frames += self.walker.advance(&bytes[self.head_pos..self.head_pos + take]);
            self.head_pos += take;
            left -= take;
            if self.head_pos == bytes.len() {
                self.head_pos = 0;
                if let Some(Chunk::Own(v)) = self.chunks.pop_front() {
                    recycle(v);
                }
            }
        }
        self.frames -= frames;
        frames
    }

    /// Drops everything unsent; returns how many bytes that was.
    pub fn discard(&mut self) -> usize {
        let unsent = self.unsent;
        *self = OutQueue::new(self.fmt);
        unsent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;

    fn none() -> Option<Vec<u8>> {
        None
    }

    fn drain_all(q: &mut OutQueue) -> Vec<u8> {
        let mut out = Vec::new();
        let mut v = Vec::new();
        q.slices(&mut v);
        for s in &v {
            out.extend_from_slice(s);
        }
        out
    }

    #[test]
    fn frames_come_out_encoded_in_order() {
        let mut q = OutQueue::default();
        q.push_frame(b"abc", &mut none).unwrap();
        q.push_frame(b"", &mut none).unwrap();
        let big = vec![7u8; CHUNK * 2 + 5];
        q.push_frame(&big, &mut none).unwrap();
        let mut want = Vec::new();
        for p in [&b"abc"[..], b"", &big] {
            frame::encode_into(&mut want, p);
        }
        assert_eq!(q.unsent(), want.len());
        let mut got = Vec::new();
        while !q.is_empty() {
            let bytes = drain_all(&mut q);
            let n = bytes.len().min(1000);
            got.extend_from_slice(&bytes[..n]);
            q.wrote(n, &mut drop);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn partial_writes_count_whole_frames_only() {
        let mut q = OutQueue::default();
        for p in [&b"abc"[..], b"", b"hello"] {
            q.push_frame(p, &mut none).unwrap();
        }
        assert_eq!(q.wrote(5, &mut drop), 0);
        assert_eq!(q.wrote(6, &mut drop), 2);
        assert_eq!(q.wrote(9, &mut drop), 1);
        assert!(q.is_empty());
        assert_eq!(q.held(), q.chunks.capacity() * std::mem::size_of::<Vec<u8>>());
    }

    #[test]
    fn memory_held_stays_near_what_is_queued_for_any_frame_size() {
        for size in [0usize, 1, 63, 1000, 4096, CHUNK - 4, CHUNK, 100_000, 1 << 20] {
            let mut q = OutQueue::default();
            let payload = vec![1u8; size];
            while q.unsent() < (4 << 20) {
                q.push_frame(&payload, &mut none).unwrap();
            }
            // Write an odd amount, as a slow peer would, then refill.
            q.wrote(q.unsent() / 3 + 7, &mut drop);
            while q.unsent() < (4 << 20) {
                q.push_frame(&payload, &mut none).unwrap();
            }
            let bound = q.unsent() + q.unsent() / 8 + 2 * CHUNK;
            assert!(q.held() <= bound, "frame {size}: held {} for {} queued", q.held(), q.unsent());
        }
    }

    #[test]
    fn a_spare_buffer_is_reused_before_allocating() {
        let mut q = OutQueue::default();
        let mut pool = vec![Vec::with_capacity(CHUNK)];
        q.push_frame(&[1u8; 100], &mut || pool.pop()).unwrap();
        assert!(pool.is_empty());
        let mut back = Vec::new();
        q.wrote(104, &mut |b| back.push(b));
        assert_eq!(back.len(), 1);
    }

    #[test]
    fn discard_drops_everything() {
        let mut q = OutQueue::default();
        q.push_frame(&[0u8; 70_000], &mut none).unwrap();
        q.wrote(10, &mut drop);
        assert_eq!(q.discard(), 70_004 - 10);
        assert!(q.is_empty());
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn appended_queues_keep_order_count_and_memory() {
        let mut q = OutQueue::default();
        let mut want = Vec::new();
        let mut sent = 0u64;
        for round in 0..200usize {
            // A "host thread" queue: a mix of tiny and large frames.
            let mut p = OutQueue::default();
            for k in 0..(round % 7) {
                let payload: Vec<u8> =
                    (0..(round * 131 + k * 977) % 40_000).map(|i| (i + round) as u8).collect();
                p.push_frame(&payload, &mut none).unwrap();
                frame::encode_into(&mut want, &payload);
                sent += 1;
            }
            q.append(p, &mut none).unwrap();
            q.push_frame(b"own", &mut none).unwrap();
            frame::encode_into(&mut want, b"own");
            sent += 1;
            let bound = q.unsent() + q.unsent() / 4 + 2 * CHUNK;
            assert!(q.held() <= bound, "round {round}: held {} for {}", q.held(), q.unsent());
        }
        let mut got = Vec::new();
        let mut counted = 0;
        while !q.is_empty() {
            let part = drain_all(&mut q);
            counted += q.wrote(part.len(), &mut drop);
            got.extend_from_slice(&part);
        }
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes in order");
        assert_eq!(counted, sent);
    }

    #[test]
    fn gathered_and_shared_frames_come_out_whole_and_in_order() {
        let mut q = OutQueue::default();
        let shared: SharedPayload = Arc::new(vec![9u8; 50_000]);
        let mut want = Vec::new();
        q.push_frame(b"head", &mut none).unwrap();
        frame::encode_into(&mut want, b"head");
        q.push_frame_parts(&[b"ab", b"", &[7u8; 40_000], b"z"], 40_003, &mut none).unwrap();
        let mut joined = b"ab".to_vec();
        joined.extend_from_slice(&[7u8; 40_000]);
        joined.push(b'z');
        frame::encode_into(&mut want, &joined);
        q.push_shared(&shared, &mut none).unwrap();
        frame::encode_into(&mut want, &shared);
        q.push_frame(b"tail", &mut none).unwrap();
        frame::encode_into(&mut want, b"tail");
        q.push_shared(&Arc::new(Vec::new()), &mut none).unwrap();
        frame::encode_into(&mut want, b"");
        assert_eq!(q.unsent(), want.len());
        let mut got = Vec::new();
        let mut counted = 0;
        while !q.is_empty() {
            let part = drain_all(&mut q);
            let n = part.len().min(7777);
            got.extend_from_slice(&part[..n]);
            counted += q.wrote(n, &mut drop);
        }
        assert!(got == want);
        assert_eq!(counted, 5);
        assert_eq!(Arc::strong_count(&shared), 1, "the shared payload was let go once written");
    }

    #[test]
    fn encoded_runs_keep_their_frame_count() {
        let mut q = OutQueue::default();
        let mut run = Vec::new();
        for p in [&b"x"[..], b"yy", b""] {
            frame::encode_into(&mut run, p);
        }
        q.push_encoded(&run, 3, &mut none).unwrap();
        assert_eq!(q.wrote(run.len(), &mut drop), 3);
    }
}

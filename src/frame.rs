//! Pure framing: an incremental decoder that cuts a byte stream into frames
//! (a length prefix of 1, 2, 4 or 8 bytes, either byte order, counting the
//! payload or the whole frame; 4-byte little-endian payload length by
//! default), and the matching encoder.
//!
//! The announced length is checked against the limit before a single byte is
//! kept for it, so a hostile prefix costs nothing. Bytes are kept only for a
//! frame that is split across reads; whole frames are handed out in place.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use crate::sys::MapBuf;

/// Length of the default prefix: u32, little-endian, payload length only.
pub const PREFIX_LEN: usize = 4;
/// Longest prefix.
pub const MAX_PREFIX: usize = 8;

/// TF_PREFIX_BIG_ENDIAN: network byte order.
pub const BIG_ENDIAN: u32 = 1;
/// TF_PREFIX_INCLUDES_ITSELF: the length counts the prefix bytes too.
pub const INCLUDES_ITSELF: u32 = 2;

/// How a frame's length is written on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    width: u8,
    big_endian: bool,
    includes_itself: bool,
}

impl Default for Format {
    fn default() -> Format {
        Format { width: PREFIX_LEN as u8, big_endian: false, includes_itself: false }
    }
}

impl Format {
    /// A prefix of `width` bytes (1, 2, 4 or 8) with TF_PREFIX_* `flags`;
    /// None for anything else.
    pub fn new(width: u32, flags: u32) -> Option<Format> {
        if !matches!(width, 1 | 2 | 4 | 8) || flags & !(BIG_ENDIAN | INCLUDES_ITSELF) != 0 {
            return None;
        }
        Some(Format {
            width: width as u8,
            big_endian: flags & BIG_ENDIAN != 0,
            includes_itself: flags & INCLUDES_ITSELF != 0,
        })
    }

    /// Prefix bytes.
    pub fn width(&self) -> usize {
        self.width as usize
    }

    /// The largest payload the prefix can express.
    pub fn max_payload(&self) -> u64 {
        let all = if self.width == 8 { u64::MAX } else { (1u64 << (8 * self.width as u32)) - 1 };
        if self.includes_itself {
            all - self.width as u64
        } else {
            all
        }
    }

    /// The prefix announcing a payload of `len` bytes (the caller checked
    /// that it fits): its bytes and how many of them are used.
    #[inline]
    pub fn prefix(&self, len: usize) -> ([u8; MAX_PREFIX], usize) {
        let w = self.width();
        let value = len as u64 + if self.includes_itself { w as u64 } else { 0 };
        let out = if self.big_endian {
            // The low `w` bytes, most significant first, at the start.
            (value << (8 * (MAX_PREFIX - w))).to_be_bytes()
        } else {
            value.to_le_bytes()
        };
        (out, w)
    }

    /// The payload length a complete prefix announces; Err for a value a
    /// well-behaved peer cannot send (shorter than the prefix itself).
    #[inline]
    pub fn payload_len(&self, prefix: &[u8]) -> Result<u64, DecodeError> {
        let w = self.width();
        // Fixed-size reads (no copy of a variable length per frame).
        let value = match w {
            4 => {
                let b = *prefix.first_chunk::<4>().expect("a whole prefix");
                if self.big_endian {
                    u32::from_be_bytes(b) as u64
                } else {
                    u32::from_le_bytes(b) as u64
                }
            }
            2 => {
                let b = *prefix.first_chunk::<2>().expect("a whole prefix");
                if self.big_endian {
                    u16::from_be_bytes(b) as u64
                } else {
                    u16::from_le_bytes(b) as u64
                }
            }
            1 => prefix[0] as u64,
            _ => {
                let b = *prefix.first_chunk::<8>().expect("a whole prefix");
                if self.big_endian {
                    u64::from_be_bytes(b)
                } else {
                    u64::from_le_bytes(b)
                }
            }
        };
        if self.includes_itself {
            value.checked_sub(w as u64).ok_or(DecodeError::Protocol { announced: value })
        } else {
            Ok(value)
        }
    }
}

/// What the frame consumer wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Deliver nothing more from this input: the rest is dropped.
    Stop,
}

/// The stream cannot be framed any further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A prefix announced a payload longer than the limit.
    TooLarge { announced: u64, max: u32 },
    /// A prefix announced something impossible (a length counting the
    /// prefix that is shorter than the prefix).
    Protocol { announced: u64 },
    /// Memory for the partial frame could not be had (the allocator said no).
    OutOfMemory,
}

/// How much a partial frame's buffer may grow beyond the bytes that arrived:
/// growth doubles, but never by more than this, so a peer that announces a
/// large frame costs what it sent plus this constant.
pub const GROW_SLACK: usize = 64 * 1024;

/// Partial frames at least this large live in pages of their own (see
/// sys::MapBuf): freed, they go back to the system at once, so a server that
/// held many large partial frames does not keep their memory in the
/// allocator's heaps afterwards.
const MAP_FROM: usize = 128 * 1024;

/// A partial frame's bytes: on the heap while small, in pages when large.
#[derive(Debug, Default)]
enum Partial {
    #[default]
    Empty,
    Heap(Vec<u8>),
    Map(MapBuf),
}

impl Partial {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn capacity(&self) -> usize {
        match self {
            Partial::Empty => 0,
            Partial::Heap(v) => v.capacity(),
            Partial::Map(m) => m.capacity(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Partial::Empty => &[],
            Partial::Heap(v) => v,
            Partial::Map(m) => m.as_slice(),
        }
    }

    /// Room for `total` bytes in all, fallibly; nothing changes on failure.
    fn reserve_total(&mut self, total: usize) -> Result<(), ()> {
        match self {
            Partial::Map(m) => m.reserve_total(total).map_err(drop),
            _ if total >= MAP_FROM => {
                let mut m = MapBuf::with_capacity(total).map_err(drop)?;
                m.extend_from_slice(self.as_slice());
                *self = Partial::Map(m);
                Ok(())
            }
            Partial::Heap(v) => v.try_reserve_exact(total - v.len()).map_err(drop),
            Partial::Empty => {
                let mut v = Vec::new();
                v.try_reserve_exact(total).map_err(drop)?;
                *self = Partial::Heap(v);
                Ok(())
            }
        }
    }

    /// Appends `bytes`; `reserve_total` made room.
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        match self {
            Partial::Heap(v) => v.extend_from_slice(bytes),
            Partial::Map(m) => m.extend_from_slice(bytes),
            Partial::Empty => debug_assert!(bytes.is_empty(), "room was reserved"),
        }
    }
}

/// Incremental decoder; one per connection.
#[derive(Debug)]
pub struct Decoder {
    /// Largest payload: max frame, or less when the prefix cannot say more.
    max_frame: u32,
    fmt: Format,
    /// Bytes of a frame split across reads: its prefix (or part of it) and
    /// the payload received so far. Empty and unallocated between frames.
    partial: Partial,
}

impl Decoder {
    /// A decoder for the default prefix.
    pub fn new(max_frame: u32) -> Decoder {
        Decoder::with_format(max_frame, Format::default())
    }

    /// A decoder for `fmt`; payloads above min(max_frame, what the prefix
    /// can express) are refused.
    pub fn with_format(max_frame: u32, fmt: Format) -> Decoder {
        let max_frame = (max_frame as u64).min(fmt.max_payload()) as u32;
        Decoder { max_frame, fmt, partial: Partial::default() }
    }

    /// True when no partial frame is held (the stream is at a frame boundary).
    pub fn at_boundary(&self) -> bool {
        self.partial.is_empty()
    }

    /// Bytes of a partial frame received so far (prefix included).
    pub fn held_len(&self) -> usize {
        self.partial.len()
    }

    /// Heap bytes held for a partial frame.
    pub fn held_capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// The payload length the complete prefix at the start of `prefix`
    /// announces, checked against the limit before anything is kept.
    fn check(&self, prefix: &[u8]) -> Result<usize, DecodeError> {
        let len = self.fmt.payload_len(prefix)?;
        // The second test matters only where usize is 32 bits: a frame and
        // its prefix must fit in memory.
        if len > self.max_frame as u64 || len > (isize::MAX as u64).saturating_sub(MAX_PREFIX as u64) {
            Err(DecodeError::TooLarge { announced: len, max: self.max_frame })
        } else {
            Ok(len as usize)
        }
    }

    /// Appends `bytes` to the partial frame (which will be `total` bytes when
    /// complete), growing its buffer fallibly and by at most what arrived
    /// plus GROW_SLACK.
    fn keep(&mut self, bytes: &[u8], total: usize) -> Result<(), DecodeError> {
        let need = self.partial.len() + bytes.len();
        if need > self.partial.capacity() {
            let cap = self.partial.capacity();
            let target = need.max(cap.saturating_mul(2).min(need + GROW_SLACK)).min(total.max(need));
            self.partial.reserve_total(target).map_err(|_| DecodeError::OutOfMemory)?;
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    /// Feeds the next bytes of the stream and calls `on_frame` with each
    /// complete payload, in order. Stops early, dropping the rest of `input`,
    /// when `on_frame` returns [`Flow::Stop`]. An oversize prefix is an error
    /// as soon as its four bytes are known.
    pub fn feed<F: FnMut(&[u8]) -> Flow + ?Sized>(
        &mut self,
        input: &[u8],
        on_frame: &mut F,
    ) -> Result<Flow, DecodeError> {
        self.feed_counted(input, on_frame).map(|(flow, _)| flow)
    }

    /// `feed`, also returning how many bytes of `input` were used: all of
    /// them, unless `on_frame` said Stop; then the bytes after the last
    /// delivered frame were neither delivered nor kept (a caller pausing the
    /// connection keeps them itself and feeds them again later).
    pub fn feed_counted<F: FnMut(&[u8]) -> Flow + ?Sized>(
        &mut self,
        mut input: &[u8],
        on_frame: &mut F,
    ) -> Result<(Flow, usize), DecodeError> {
        let given = input.len();
        let w = self.fmt.width();
        if !self.partial.is_empty() {
            if self.partial.len() < w {
                let take = (w - self.partial.len()).min(input.len());
                self.keep(&input[..take], w)?;
                input = &input[take..];
                if self.partial.len() < w {
                    return Ok((Flow::Continue, given));
                }
            }
            let total = w + self.check(self.partial.as_slice())?;
            let take = (total - self.partial.len()).min(input.len());
            self.keep(&input[..take], total)?;
            input = &input[take..];
            if self.partial.len() < total {
                return Ok((Flow::Continue, given));
            }
            let frame = std::mem::take(&mut self.partial);
            if on_frame(&frame.as_slice()[w..]) == Flow::Stop {
                return Ok((Flow::Stop, given - input.len()));
            }
        }
        while input.len() >= w {
            let len = self.check(input)?;
            if input.len() - w < len {
                break;
            }
            let (frame, rest) = input[w..].split_at(len);
            input = rest;
            if on_frame(frame) == Flow::Stop {
                return Ok((Flow::Stop, given - input.len()));
            }
        }
        if !input.is_empty() {
            let total = if input.len() >= w { w + self.check(input)? } else { w };
            self.keep(input, total)?;
        }
        Ok((Flow::Continue, given))
    }

    /// Drops any partial frame and its memory.
    pub fn clear(&mut self) {
        self.partial = Partial::default();
    }
}

/// The default prefix announcing a payload of `len` bytes (the caller
/// checked that it fits).
pub fn prefix(len: usize) -> [u8; PREFIX_LEN] {
    debug_assert!(len <= u32::MAX as usize);
    (len as u32).to_le_bytes()
}

/// Appends one frame (prefix + payload) to `out`. The caller has checked
/// that `payload.len()` fits the prefix.
pub fn encode_into(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&prefix(payload.len()));
    out.extend_from_slice(payload);
}

/// Follows an encoded frame stream as it is written, across buffer
/// boundaries, to count the frames that were completely written. Reads only
/// the prefixes: payload bytes are skipped by count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Walker {
    fmt: Format,
    prefix: [u8; MAX_PREFIX],
    /// Prefix bytes seen of the current frame.
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: u64,
}

impl Walker {
    pub fn new(fmt: Format) -> Walker {
        Walker { fmt, ..Walker::default() }
    }

    /// Consumes the next written bytes; returns how many frames they completed.
    pub fn advance(&mut self, mut bytes: &[u8]) -> u64 {
        let w = self.fmt.width();
        let mut done = 0;
        while !bytes.is_empty() {
            if self.have < w {
                let take = (w - self.have).min(bytes.len());
                self.prefix[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                self.have += take;
                bytes = &bytes[take..];
                if self.have == w {
                    // Our own encoding: never an impossible value.
                    self.left = self.fmt.payload_len(&self.prefix).unwrap_or(0);
                } else {
                    continue;
                }
            } else {
                let take = (self.left.min(bytes.len() as u64)) as usize;
                self.left -= take as u64;
                bytes = &bytes[take..];
            }
            if self.have == w && self.left == 0 {
                done += 1;
                self.have = 0;
            }
        }
        done
    }

    /// At a frame boundary (after the queue was written out entirely).
    pub fn reset(&mut self) {
        *self = Walker::new(self.fmt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            encode_into(&mut out, f);
        }
        out
    }

    fn decode_in_chunks(bytes: &[u8], cuts: &[usize], max: u32) -> Result<Vec<Vec<u8>>, DecodeError> {
        let mut d = Decoder::new(max);
        let mut got = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            d.feed(&bytes[start..cut], &mut |f| {
                got.push(f.to_vec());
                Flow::Continue
            })?;
            start = cut;
        }
        Ok(got)
    }

    /// xorshift64*: deterministic, dependency-free randomness for tests.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn sample_frames() -> Vec<Vec<u8>> {
        vec![vec![], b"a".to_vec(), b"hello".to_vec(), vec![7u8; 300], vec![], (0..=255u8).collect()]
    }

    #[test]
    fn every_single_split_point_gives_the_same_frames() {
        let frames = sample_frames();
        let bytes = stream(&frames);
        for cut in 0..=bytes.len() {
            assert_eq!(decode_in_chunks(&bytes, &[cut], 1 << 20).unwrap(), frames, "cut at {cut}");
        }
    }

    #[test]
    fn every_pair_of_split_points_gives_the_same_frames() {
        let frames = vec![vec![], b"xy".to_vec(), vec![1u8; 9], vec![]];
        let bytes = stream(&frames);
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                assert_eq!(decode_in_chunks(&bytes, &[a, b], 64).unwrap(), frames);
            }
        }
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_frames() {
        let frames = sample_frames();
        let bytes = stream(&frames);
        let cuts: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(decode_in_chunks(&bytes, &cuts, 1 << 20).unwrap(), frames);
    }

    #[test]
    fn random_streams_in_random_splits_give_the_same_frames() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..500 {
            let n = rng.below(20) as usize;
            let frames: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let len = if rng.below(4) == 0 { rng.below(5000) } else { rng.below(40) };
                    (0..len).map(|_| rng.next() as u8).collect()
                })
                .collect();
            let bytes = stream(&frames);
            let mut cuts: Vec<usize> =
                (0..rng.below(12)).map(|_| rng.below(bytes.len() as u64 + 1) as usize).collect();
            cuts.sort_unstable();
            assert_eq!(decode_in_chunks(&bytes, &cuts, 1 << 16).unwrap(), frames);
        }
    }

    #[test]
    fn zero_length_frames_are_delivered_as_empty_payloads() {
        let bytes = [0u8; 12];
        let got = decode_in_chunks(&bytes, &[], 10).unwrap();
        assert_eq!(got, vec![Vec::<u8>::new(); 3]);
    }

    #[test]
    fn a_frame_of_exactly_max_is_accepted() {
        let frames = vec![vec![9u8; 100]];
        assert_eq!(decode_in_chunks(&stream(&frames), &[50], 100).unwrap(), frames);
    }

    #[test]
    fn an_oversize_prefix_is_rejected_before_anything_is_kept() {
        let mut d = Decoder::new(100);
        let r = d.feed(&101u32.to_le_bytes(), &mut |_| Flow::Continue);
        assert_eq!(r, Err(DecodeError::TooLarge { announced: 101, max: 100 }));
        assert_eq!(d.held_capacity(), 0);
    }

    #[test]
    fn an_all_ones_prefix_is_rejected_without_allocating_even_when_split() {
        let mut d = Decoder::new(8 << 20);
        assert_eq!(d.feed(&[0xFF, 0xFF], &mut |_| Flow::Continue), Ok(Flow::Continue));
        assert!(d.held_capacity() < 64, "only the prefix bytes are kept");
        let r = d.feed(&[0xFF, 0xFF, 1, 2, 3], &mut |_| Flow::Continue);
        assert_eq!(r, Err(DecodeError::TooLarge { announced: 0xFFFF_FFFF, max: 8 << 20 }));
        assert!(d.held_capacity() < 64);
    }

    #[test]
    fn frames_before_an_oversize_prefix_are_still_delivered() {
        let mut bytes = stream(&[b"ok".to_vec()]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut got = Vec::new();
        let r = Decoder::new(10).feed(&bytes, &mut |f| {
            got.push(f.to_vec());
            Flow::Continue
        });
        assert!(r.is_err());
        assert_eq!(got, vec![b"ok".to_vec()]);
    }

    #[test]
    fn stop_drops_the_rest_of_the_input() {
        let bytes = stream(&sample_frames());
        let mut seen = 0;
        let r = Decoder::new(1 << 20).feed(&bytes, &mut |_| {
            seen += 1;
            if seen == 2 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        });
        assert_eq!(r, Ok(Flow::Stop));
        assert_eq!(seen, 2);
    }

    fn formats() -> Vec<Format> {
        let mut v = Vec::new();
        for w in [1, 2, 4, 8] {
            for flags in 0..4 {
                v.push(Format::new(w, flags).unwrap());
            }
        }
        v
    }

    fn stream_in(fmt: Format, frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            let (p, w) = fmt.prefix(f.len());
            out.extend_from_slice(&p[..w]);
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn only_the_listed_widths_and_flags_make_a_format() {
        for w in [0, 3, 5, 6, 7, 9, 16, u32::MAX] {
            assert!(Format::new(w, 0).is_none(), "width {w}");
        }
        assert!(Format::new(4, 4).is_none());
        assert!(Format::new(4, u32::MAX).is_none());
        assert_eq!(Format::new(4, 0).unwrap(), Format::default());
    }

    #[test]
    fn each_format_says_the_largest_payload_it_can_express() {
        let m = |w, f| Format::new(w, f).unwrap().max_payload();
        assert_eq!((m(1, 0), m(2, 0), m(4, 0), m(8, 0)), (255, 65535, u32::MAX as u64, u64::MAX));
        assert_eq!((m(1, 2), m(2, 2), m(4, 2), m(8, 3)), (254, 65533, u32::MAX as u64 - 4, u64::MAX - 8));
    }

    #[test]
    fn prefixes_are_written_in_the_byte_order_asked_for() {
        let be = Format::new(2, BIG_ENDIAN).unwrap();
        assert_eq!(&be.prefix(0x0102).0[..2], &[1, 2]);
        let le = Format::new(2, 0).unwrap();
        assert_eq!(&le.prefix(0x0102).0[..2], &[2, 1]);
        let inc = Format::new(4, BIG_ENDIAN | INCLUDES_ITSELF).unwrap();
        assert_eq!(&inc.prefix(10).0[..4], &[0, 0, 0, 14]);
        assert_eq!(inc.payload_len(&[0, 0, 0, 14]), Ok(10));
        assert_eq!(inc.payload_len(&[0, 0, 0, 3]), Err(DecodeError::Protocol { announced: 3 }));
        assert_eq!(inc.payload_len(&[0, 0, 0, 4]), Ok(0));
    }

    #[test]
    fn every_format_gives_the_same_frames_at_every_split() {
        for fmt in formats() {
            let frames: Vec<Vec<u8>> =
                vec![vec![], b"a".to_vec(), vec![7u8; 200], vec![], (0..=250u8).collect()];
            let bytes = stream_in(fmt, &frames);
            for cut in 0..=bytes.len() {
                let mut d = Decoder::with_format(1 << 20, fmt);
                let mut got = Vec::new();
                for part in [&bytes[..cut], &bytes[cut..]] {
                    d.feed(part, &mut |f| {
                        got.push(f.to_vec());
                        Flow::Continue
                    })
                    .unwrap();
                }
                assert_eq!(got, frames, "{fmt:?} cut {cut}");
            }
        }
    }

    #[test]
    fn a_one_byte_prefix_refuses_more_than_it_can_say_and_an_impossible_length_is_a_protocol_error() {
        // Max frame 8 MiB, but a 1-byte prefix including itself can say 250 at most.
        let fmt = Format::new(1, INCLUDES_ITSELF).unwrap();
        let mut d = Decoder::with_format(8 << 20, fmt);
        assert_eq!(d.feed(&[0], &mut |_| Flow::Continue), Err(DecodeError::Protocol { announced: 0 }));
        let mut d = Decoder::with_format(100, fmt);
        assert_eq!(
            d.feed(&[102], &mut |_| Flow::Continue),
            Err(DecodeError::TooLarge { announced: 101, max: 100 })
        );
        let mut d = Decoder::with_format(8 << 20, Format::new(8, BIG_ENDIAN).unwrap());
        assert!(matches!(d.feed(&[0xFF; 8], &mut |_| Flow::Continue), Err(DecodeError::TooLarge { .. })));
        assert_eq!(d.held_capacity(), 0);
    }

    #[test]
    fn the_walker_counts_frames_in_every_format() {
        for fmt in formats() {
            let frames: Vec<Vec<u8>> = vec![vec![], vec![1u8; 100], b"xy".to_vec()];
            let bytes = stream_in(fmt, &frames);
            let mut w = Walker::new(fmt);
            let n: u64 = bytes.iter().map(|b| w.advance(std::slice::from_ref(b))).sum();
            assert_eq!(n, 3, "{fmt:?}");
        }
    }

    #[test]
    fn a_stop_says_where_the_undelivered_bytes_begin() {
        let frames = sample_frames();
        let bytes = stream(&frames);
        for stop_after in 1..=frames.len() {
            for cut in 0..=bytes.len() {
                // Stop after `stop_after` frames; feeding the rest again later
                // must give exactly the remaining frames.
                let mut d = Decoder::new(1 << 20);
                let mut got = Vec::new();
                let mut held = Vec::new();
                for chunk in [&bytes[..cut], &bytes[cut..]] {
                    let mut input = chunk.to_vec();
                    if !held.is_empty() {
                        held.extend_from_slice(&input);
                        input = std::mem::take(&mut held);
                    }
                    let (flow, used) = d
                        .feed_counted(&input, &mut |f| {
                            got.push(f.to_vec());
                            if got.len() == stop_after {
                                Flow::Stop
                            } else {
                                Flow::Continue
                            }
                        })
                        .unwrap();
                    if flow == Flow::Stop {
                        held = input[used..].to_vec();
                    }
                }
                d.feed(&held, &mut |f| {
                    got.push(f.to_vec());
                    Flow::Continue
                })
                .unwrap();
                assert_eq!(got, frames, "stop after {stop_after}, cut {cut}");
            }
        }
    }

    #[test]
    fn the_partial_buffer_is_released_once_the_frame_completes() {
        let bytes = stream(&[vec![5u8; 10_000]]);
        let mut d = Decoder::new(1 << 20);
        d.feed(&bytes[..6000], &mut |_| Flow::Continue).unwrap();
        assert!(!d.at_boundary());
        let mut n = 0;
        d.feed(&bytes[6000..], &mut |f| {
            assert_eq!(f.len(), 10_000);
            n += 1;
            Flow::Continue
        })
        .unwrap();
        assert_eq!(n, 1);
        assert!(d.at_boundary());
        assert_eq!(d.held_capacity(), 0);
    }

    #[test]
    fn the_walker_counts_whole_frames_across_any_split() {
        let frames = sample_frames();
        let bytes = stream(&frames);
        for cut in 0..=bytes.len() {
            for cut2 in cut..=bytes.len() {
                let mut w = Walker::default();
                let n = w.advance(&bytes[..cut]) + w.advance(&bytes[cut..cut2]) + w.advance(&bytes[cut2..]);
                assert_eq!(n, frames.len() as u64, "cuts {cut} {cut2}");
                assert!(w.have == 0 && w.left == 0, "ends at a boundary");
            }
        }
        let mut w = Walker::default();
        let mut total = 0;
        for b in &bytes {
            total += w.advance(std::slice::from_ref(b));
        }
        assert_eq!(total, frames.len() as u64);
    }

    #[test]
    fn a_partial_frame_grows_with_what_arrived_not_with_what_was_announced() {
        let mut d = Decoder::new(8 << 20);
        let mut bytes = (8u32 << 20).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1u8; 1000]);
        d.feed(&bytes, &mut |_| Flow::Continue).unwrap();
        assert!(d.held_capacity() <= 1004 + GROW_SLACK, "held {}", d.held_capacity());
        let mut sent = bytes.len();
        for _ in 0..200 {
            d.feed(&[2u8; 4096], &mut |_| Flow::Continue).unwrap();
            sent += 4096;
            // (plus a page: large partial frames live in whole pages)
            assert!(d.held_capacity() <= sent + GROW_SLACK + 4096, "held {} for {sent}", d.held_capacity());
        }
    }

    #[test]
    fn a_partial_frame_never_reserves_past_its_own_end() {
        let frame = vec![3u8; 100_000];
        let bytes = stream(std::slice::from_ref(&frame));
        let mut d = Decoder::new(1 << 20);
        d.feed(&bytes[..50_000], &mut |_| Flow::Continue).unwrap();
        d.feed(&bytes[50_000..99_000], &mut |_| Flow::Continue).unwrap();
        assert!(d.held_capacity() <= bytes.len(), "held {}", d.held_capacity());
    }
}

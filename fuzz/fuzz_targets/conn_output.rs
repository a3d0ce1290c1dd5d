//! A connection's output queue under arbitrary frames and arbitrary partial
//! writes: frames are counted exactly once when fully written, the queued
//! byte count returns to zero, what reaches the "socket" is the encoding of
//! the frames in order, and the memory held stays within the queued bytes
//! plus a constant (chunks are freed as soon as they are written).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tcpframe::conn::{encoded_len, Conn};
use tcpframe::frame::{encode_into, Format};
use tcpframe::outq::CHUNK;

fn unsent(c: &Conn) -> Vec<u8> {
    let mut v: Vec<IoSlice<'_>> = Vec::new();
    c.out.slices(&mut v);
    v.iter().flat_map(|s| s.iter().copied()).collect()
}

fuzz_target!(|data: &[u8]| {
    let fd = std::fs::File::open("/dev/null").unwrap();
    let mut c = Conn::new(1, fd.into(), 1 << 20, Format::default(), Instant::now());
    let mut expected = Vec::new();
    let mut wire = Vec::new();
    let (mut frames_in, mut frames_out) = (0u64, 0u64);
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        if op & 1 == 0 {
            // queue a frame of a length taken from the input
            let len = (op as usize >> 1) * 97 % 70_000;
            let payload: Vec<u8> = (0..len).map(|i| i as u8 ^ op).collect();
            c.shared.reserve(encoded_len(Format::default(), len), u64::MAX).unwrap();
            c.push_frame(&payload, &mut || None).unwrap();
            encode_into(&mut expected, &payload);
            frames_in += 1;
        } else if c.has_output() {
            // a partial write of some size (at most what one sendmsg offers)
            let avail = unsent(&c);
            let n = 1 + (op as usize * 4099) % avail.len();
            wire.extend_from_slice(&avail[..n]);
            frames_out += c.wrote(n, &mut drop);
        }
        let bound = c.out.unsent() + c.out.unsent() / 8 + 3 * CHUNK;
        assert!(c.out.held() <= bound, "held {} for {} queued", c.out.held(), c.out.unsent());
    }
    while c.has_output() {
        let avail = unsent(&c);
        wire.extend_from_slice(&avail);
        frames_out += c.wrote(avail.len(), &mut drop);
    }
    assert_eq!(wire, expected);
    assert_eq!(frames_out, frames_in);
    assert_eq!(c.shared.queued.load(Ordering::Relaxed), 0);
});

//! Arbitrary bytes in arbitrary splits: the decoder never panics, never keeps
//! more than one frame's bytes, and yields the same frames (or the same
//! error) whatever the split.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcpframe::frame::{DecodeError, Decoder, Flow};

fn run(max: u32, stream: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, Option<DecodeError>) {
    let mut d = Decoder::new(max);
    let mut frames = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        let r = d.feed(&stream[start..cut], &mut |f| {
            frames.push(f.to_vec());
            Flow::Continue
        });
        assert!(d.held_capacity() <= max as usize + 4 + 64, "kept more than one frame");
        if let Err(e) = r {
            return (frames, Some(e));
        }
        start = cut;
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // byte 0: max frame (small, so that limits are hit); byte 1: cut count
    let max = 1 + (data[0] as u32 % 64) * 16;
    let ncuts = (data[1] % 16) as usize;
    let stream = &data[2..];
    let mut cuts: Vec<usize> = stream.iter().take(ncuts).map(|&b| b as usize * stream.len() / 256).collect();
    cuts.sort_unstable();
    let whole = run(max, stream, &[]);
    let split = run(max, stream, &cuts);
    assert_eq!(whole, split);
    for f in &whole.0 {
        assert!(f.len() <= max as usize);
    }
});

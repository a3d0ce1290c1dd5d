//! Arbitrary bytes in arbitrary splits, in every prefix format (width 1, 2,
//! 4, 8; either byte order; payload or whole-frame length): the decoder
//! never panics, never keeps more than one frame's bytes (plus the growth
//! slack), yields the same frames (or the same error) whatever the split,
//! and re-encoding the frames gives back the bytes it consumed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcpframe::frame::{DecodeError, Decoder, Flow, Format};

fn run(max: u32, fmt: Format, stream: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, Option<DecodeError>) {
    let mut d = Decoder::with_format(max, fmt);
    let mut frames = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        let r = d.feed(&stream[start..cut], &mut |f| {
            frames.push(f.to_vec());
            Flow::Continue
        });
        assert!(d.held_capacity() <= max as usize + fmt.width() + 64, "kept more than one frame");
        if let Err(e) = r {
            return (frames, Some(e));
        }
        start = cut;
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // byte 0: max frame (small, so that limits are hit); byte 1: cut count;
    // byte 2: the format (width from bits 0-1, flags from bits 2-3)
    let max = 1 + (data[0] as u32 % 64) * 16;
    let ncuts = (data[1] % 16) as usize;
    let fmt = Format::new([1, 2, 4, 8][(data[2] & 3) as usize], ((data[2] >> 2) & 3) as u32).expect("valid");
    let stream = &data[3..];
    let mut cuts: Vec<usize> = stream.iter().take(ncuts).map(|&b| b as usize * stream.len() / 256).collect();
    cuts.sort_unstable();
    let whole = run(max, fmt, stream, &[]);
    let split = run(max, fmt, stream, &cuts);
    assert_eq!(whole, split);
    let mut encoded = Vec::new();
    for f in &whole.0 {
        assert!(f.len() <= max as usize);
        let (p, w) = fmt.prefix(f.len());
        encoded.extend_from_slice(&p[..w]);
        encoded.extend_from_slice(f);
    }
    assert_eq!(&stream[..encoded.len()], &encoded[..], "frames re-encode to the bytes they came from");
});

//! Arbitrary bytes in arbitrary splits: the PROXY header parser never panics, never
//! holds more than a v1 line (52 bytes for v2), and gives the same outcome, with the
//! same header length, whatever the split.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tcpframe::proxy::{Mode, Outcome, Parser, MAX_HELD, V2_SIGNATURE};

/// The outcome with `consumed` made absolute (an offset in `stream`).
fn run(mode: Mode, stream: &[u8], cuts: &[usize]) -> Outcome {
    let mut p = Parser::new(mode);
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        let out = p.feed(&stream[start..cut]);
        assert!(p.held() <= MAX_HELD, "held {} bytes", p.held());
        if stream.first() == Some(&b'\r') {
            assert!(p.held() <= 16 + 36, "v2 held {} bytes", p.held());
        }
        match out {
            Outcome::NeedMore => {}
            Outcome::Done { consumed, source } => {
                assert!(consumed <= cut - start);
                // Settled: the next read is all frame data.
                assert_eq!(p.feed(b"x"), Outcome::Done { consumed: 0, source });
                return Outcome::Done { consumed: start + consumed, source };
            }
            Outcome::Invalid(why) => {
                assert_eq!(p.feed(b"x"), Outcome::Invalid(why));
                return out;
            }
        }
        start = cut;
    }
    Outcome::NeedMore
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // byte 0: mode (low 2 bits) and a well-formed start to reach deeper states
    // (bits 2-4); byte 1: cut count; the rest: the stream.
    let mode = [Mode::V1, Mode::V2, Mode::Any, Mode::Any][(data[0] & 3) as usize];
    let prefix: &[u8] = match (data[0] >> 2) & 7 {
        1 => b"PROXY TCP4 ",
        2 => b"PROXY TCP6 ",
        3 => b"PROXY UNKNOWN",
        4 => b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
        5 => b"\r\n\r\n\0\r\nQUIT\n\x21\x21",
        6 => b"\r\n\r\n\0\r\nQUIT\n",
        7 => b"PROXY TCP4 192.0.2.1 198.51.100.2 ",
        _ => b"",
    };
    let ncuts = (data[1] % 16) as usize;
    let stream: Vec<u8> = prefix.iter().chain(&data[2..]).copied().collect();
    let mut cuts: Vec<usize> =
        data[2..].iter().take(ncuts).map(|&b| b as usize * (stream.len() + 1) / 256).collect();
    cuts.sort_unstable();

    let whole = run(mode, &stream, &[]);
    let bytewise: Vec<usize> = (1..stream.len()).collect();
    assert_eq!(run(mode, &stream, &cuts), whole, "cuts {cuts:?}");
    assert_eq!(run(mode, &stream, &bytewise), whole, "byte by byte");

    // What a complete header must look like.
    if let Outcome::Done { consumed, source } = whole {
        let header = &stream[..consumed];
        if header.starts_with(&V2_SIGNATURE) {
            assert!(mode != Mode::V1);
            assert_eq!(consumed, 16 + u16::from_be_bytes([header[14], header[15]]) as usize);
            assert!(source.is_none() || header[12] == 0x21);
        } else {
            assert!(mode != Mode::V2);
            assert!(header.starts_with(b"PROXY ") && header.ends_with(b"\r\n") && consumed <= 107);
            assert_eq!(header.iter().filter(|&&b| b == b'\n').count(), 1);
            if let Some(src) = source {
                // The source address and port are printed back as they were written.
                let text = std::str::from_utf8(header).expect("a TCP4/TCP6 line is ASCII");
                let fields: Vec<&str> = text.trim_end().split(' ').collect();
                assert_eq!(fields.len(), 6);
                assert_eq!(fields[1] == "TCP6", src.is_ipv6());
                assert_eq!(fields[4].parse::<u16>().ok(), Some(src.port()));
                if src.is_ipv4() {
                    assert_eq!(fields[2], src.ip().to_string());
                    assert_eq!(fields[4], src.port().to_string());
                }
            } else {
                assert!(header.starts_with(b"PROXY UNKNOWN"));
            }
        }
    }
});

//! PROXY protocol header parser (v1 text line, v2 binary block), fed incrementally
//! with each read of an accepted connection before framing starts.
//!
//! Pure and allocation-free: the parser is a fixed-size value (a 107-byte line buffer
//! and a few counters), whatever a peer announces. It follows HAProxy's
//! doc/proxy-protocol.txt and judges every byte as it arrives, so a connection that
//! does not start with a valid header is refused at the first byte that proves it.
//!
//! Choices where the spec leaves room (each the strict or the interoperable one):
//! - v1 `TCP6` addresses are whatever `inet_ntop` may print (so `::ffff:1.2.3.4` is
//!   accepted); v1 `TCP4` addresses and all ports are plain decimal without leading
//!   zeroes, as the spec requires.
//! - v1 `UNKNOWN` is followed by CRLF, or by a space and anything up to the first
//!   CRLF; a lone CR or LF in that tail is refused, since the spec forbids either as
//!   a line end and a sender using one would desynchronise the stream.
//! - v2 TLVs are skipped unread (the spec allows it); a LOCAL command ignores the
//!   family byte and the address block; PROXY with AF_UNIX stream or UNSPEC keeps the
//!   socket's peer (the spec's fallback for families a receiver does not use);
//!   datagram families and unassigned values are refused.

// Safe Rust only: unsafe code lives in src/ffi/ and src/sys/.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 line, CRLF included (the spec's worst case: `UNKNOWN` with two full
/// IPv6 addresses and ports).
pub const V1_MAX_LEN: usize = 107;

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Length of the v2 fixed part: signature, version/command, family, length.
const V2_FIXED_LEN: usize = 16;
/// Address bytes kept for TCP over IPv4: two addresses, two ports.
const V2_INET_LEN: usize = 12;
/// Address bytes kept for TCP over IPv6: two addresses, two ports.
const V2_INET6_LEN: usize = 36;

/// Most bytes a parser ever holds: a whole v1 line. A v2 header holds at most its
/// fixed part plus an IPv6 address block (52 bytes); the rest is counted, not kept.
pub const MAX_HELD: usize = V1_MAX_LEN;

const V1_PREFIX: &[u8; 6] = b"PROXY ";
const V1_PROTOCOLS: [&[u8]; 3] = [b"TCP4 ", b"TCP6 ", b"UNKNOWN"];
/// Longest text of an address that `inet_ntop` prints for IPv6
/// (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
const V6_TEXT_MAX: usize = 45;

/// Which header versions a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only the v1 text line (`send-proxy`).
    V1,
    /// Only the v2 binary header (`send-proxy-v2`).
    V2,
    /// Either; the first byte decides (`P`: v1, `\r`: v2).
    Any,
}

/// What the bytes fed so far amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The header is not complete yet: read more and feed it (nothing needs to be kept
    /// by the caller, the parser has taken what it needs).
    NeedMore,
    /// The header is complete and valid. `consumed` is how many bytes of the input
    /// given to this call belong to it; the rest of that input is the first frame
    /// data. `source` is the original client's address, or `None` for a v2 LOCAL
    /// header (health check), a v1 `UNKNOWN` one, or a v2 family we do not use
    /// (UNSPEC, AF_UNIX): keep the socket's own peer then.
    Done { consumed: usize, source: Option<SocketAddr> },
    /// Not a valid header: close the connection. The text says why, for a log line.
    Invalid(&'static str),
}

/// Where a v1 line is, after the bytes seen so far.
#[derive(Clone, Copy, Debug)]
enum V1 {
    /// Within `PROXY ` and the protocol word.
    Literal,
    /// Just after `UNKNOWN`: a space or CR must follow.
    AfterUnknown,
    /// Within the ignored rest of an `UNKNOWN` line.
    UnknownTail,
    /// Within field `index` (0 source address, 1 destination address, 2 source port,
    /// 3 destination port) of a TCP4/TCP6 line, which began at offset `start`.
    Field { v6: bool, index: u8, start: usize },
    /// CR seen; LF must follow.
    Lf,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Nothing fed yet.
    Start,
    /// A v1 line; the source fields are kept once each is complete.
    V1 {
        at: V1,
        src: Option<IpAddr>,
        sport: u16,
    },
    /// A v2 header: `seen` bytes so far, of which the first `held` are kept.
    /// `total` (16 + length) and `keep` (address bytes wanted) are known after the
    /// 16th byte, 0 before.
    V2 {
        seen: usize,
        total: usize,
        keep: usize,
    },
    Done(Option<SocketAddr>),
    Invalid(&'static str),
}

/// What one byte did.
enum Step {
    More,
    Done(Option<SocketAddr>),
    Invalid(&'static str),
}

/// Incremental PROXY header parser; one per accepted connection, fed every read
/// until it returns `Done` or `Invalid`. No heap: its size is all it ever holds.
#[derive(Clone, Debug)]
pub struct Parser {
    mode: Mode,
    state: State,
    /// The v1 line so far, or the v2 fixed part and address block so far.
    buf: [u8; MAX_HELD],
    held: usize,
}

impl Parser {
    pub fn new(mode: Mode) -> Parser {
        Parser { mode, state: State::Start, buf: [0; MAX_HELD], held: 0 }
    }

    /// Bytes of the header kept so far (at most 107 for v1, 52 for v2).
    pub fn held(&self) -> usize {
        self.held
    }

    /// Feed the next bytes read from the socket. Returns as soon as the header is
    /// complete (`Done`, the rest of `input` untouched) or proven invalid, else
    /// `NeedMore`. Once settled, later calls repeat the verdict: `Invalid` again, or
    /// `Done` with `consumed: 0` (none of the new input is header).
    pub fn feed(&mut self, input: &[u8]) -> Outcome {
        match self.state {
            State::Done(source) => return Outcome::Done { consumed: 0, source },
            State::Invalid(why) => return Outcome::Invalid(why),
            _ => {}
        }
        let mut i = 0;
        while i < input.len() {
            // A v2 header's TLVs (and unused address bytes) are counted in bulk.
            if let State::V2 { seen, total, keep } = &mut self.state {
                if *total != 0 && *seen >= V2_FIXED_LEN + *keep {
                    let n = (*total - *seen).min(input.len() - i);
                    *seen += n;
                    i += n;
                    if *seen == *total {
                        return self.settle(Step::Done(self.v2_source()), i);
                    }
                    continue;
                }
            }
            let step = self.step(input[i]);
            i += 1;
            if !matches!(step, Step::More) {
                return self.settle(step, i);
            }
        }
        Outcome::NeedMore
    }

    fn settle(&mut self, step: Step, consumed: usize) -> Outcome {
        match step {
            Step::More => Outcome::NeedMore,
            Step::Done(source) => {
                self.state = State::Done(source);
                Outcome::Done { consumed, source }
            }
            Step::Invalid(why) => {
                self.state = State::Invalid(why);
                Outcome::Invalid(why)
            }
        }
    }

    fn step(&mut self, b: u8) -> Step {
        match self.state {
            State::Start => {
                let v1 = match (self.mode, b) {
                    (Mode::V1 | Mode::Any, b'P') => true,
                    (Mode::V2 | Mode::Any, b'\r') => false,
                    (Mode::V1, b'\r') => return Step::Invalid("PROXY v2 header, but only v1 is accepted"),
                    (Mode::V2, b'P') => return Step::Invalid("PROXY v1 header, but only v2 is accepted"),
                    _ => return Step::Invalid("no PROXY header"),
                };
                self.state = if v1 {
                    State::V1 { at: V1::Literal, src: None, sport: 0 }
                } else {
                    State::V2 { seen: 0, total: 0, keep: 0 }
                };
                self.step(b)
            }
            State::V1 { .. } => self.step_v1(b),
            State::V2 { .. } => self.step_v2(b),
            // feed() returns before stepping a settled parser.
            State::Done(source) => Step::Done(source),
            State::Invalid(why) => Step::Invalid(why),
        }
    }

    fn step_v1(&mut self, b: u8) -> Step {
        let State::V1 { at, src, sport } = self.state else { unreachable!("step_v1 outside a v1 line") };
        // The length check after every byte keeps `held` below the buffer's size.
        let i = self.held;
        self.buf[i] = b;
        self.held += 1;
        let (at, src, sport) = match at {
            V1::Literal if i < V1_PREFIX.len() => {
                if b != V1_PREFIX[i] {
                    return Step::Invalid("v1: line does not start with \"PROXY \"");
                }
                (V1::Literal, src, sport)
            }
            V1::Literal => {
                let word = &self.buf[V1_PREFIX.len()..=i];
                let next = match word {
                    b"TCP4 " => V1::Field { v6: false, index: 0, start: i + 1 },
                    b"TCP6 " => V1::Field { v6: true, index: 0, start: i + 1 },
                    b"UNKNOWN" => V1::AfterUnknown,
                    _ if V1_PROTOCOLS.iter().any(|p| p.starts_with(word)) => V1::Literal,
                    _ => return Step::Invalid("v1: protocol is not TCP4, TCP6 or UNKNOWN"),
                };
                (next, src, sport)
            }
            V1::AfterUnknown => match b {
                b' ' => (V1::UnknownTail, src, sport),
                b'\r' => (V1::Lf, src, sport),
                _ => return Step::Invalid("v1: protocol is not TCP4, TCP6 or UNKNOWN"),
            },
            V1::UnknownTail => match b {
                b'\r' => (V1::Lf, src, sport),
                b'\n' => return Step::Invalid("v1: LF without CR"),
                _ => (V1::UnknownTail, src, sport),
            },
            V1::Lf => {
                if b != b'\n' {
                    return Step::Invalid("v1: CR not followed by LF");
                }
                let source = src.map(|ip| SocketAddr::new(ip, sport));
                return Step::Done(source);
            }
            V1::Field { v6, index, start } => {
                let token = &self.buf[start..i];
                match b {
                    b' ' | b'\r' => {
                        let (mut src, mut sport) = (src, sport);
                        match index {
                            0 | 1 => {
                                let ip = if v6 {
                                    v6_address(token).map(IpAddr::V6)
                                } else {
                                    v4_address(token).ok().flatten().map(IpAddr::V4)
                                };
                                let Some(ip) = ip else { return Step::Invalid(FIELD_ERRORS[index as usize]) };
                                if index == 0 {
                                    src = Some(ip);
                                }
                            }
                            _ => {
                                let Ok(Some(port)) = port(token) else {
                                    return Step::Invalid(FIELD_ERRORS[index as usize]);
                                };
                                if index == 2 {
                                    sport = port;
                                }
                            }
                        }
                        let next = match (b, index) {
                            (b' ', 3) => return Step::Invalid("v1: more than four fields after TCP4/TCP6"),
                            (b' ', _) => V1::Field { v6, index: index + 1, start: i + 1 },
                            (_, 3) => V1::Lf,
                            _ => return Step::Invalid("v1: line ends before the destination port"),
                        };
                        (next, src, sport)
                    }
                    b'\n' => return Step::Invalid("v1: LF without CR"),
                    _ => {
                        let token = &self.buf[start..=i];
                        let viable = match (index, v6) {
                            (0 | 1, false) => v4_address(token).is_ok(),
                            (0 | 1, true) => v6_viable(token),
                            _ => port(token).is_ok(),
                        };
                        if !viable {
                            return Step::Invalid(FIELD_ERRORS[index as usize]);
                        }
                        (V1::Field { v6, index, start }, src, sport)
                    }
                }
            }
        };
        // The line must end by byte 107: refuse as soon as CRLF no longer fits.
        let still_needed = if matches!(at, V1::Lf) { 1 } else { 2 };
        if self.held + still_needed > V1_MAX_LEN {
            return Step::Invalid("v1: no CRLF within 107 bytes");
        }
        self.state = State::V1 { at, src, sport };
        Step::More
    }

    /// One byte of a v2 header, up to the end of the address bytes kept (the rest is
    /// counted in bulk by `feed`).
    fn step_v2(&mut self, b: u8) -> Step {
        let State::V2 { seen, .. } = self.state else { unreachable!("step_v2 outside a v2 header") };
        self.buf[self.held] = b;
        self.held += 1;
        let seen = seen + 1;
        let (mut total, mut keep) = (0, 0);
        match seen {
            1..=12 => {
                if b != V2_SIGNATURE[seen - 1] {
                    return Step::Invalid("v2: bad signature");
                }
            }
            13 => {
                if b >> 4 != 2 {
                    return Step::Invalid("v2: version is not 2");
                }
                if b & 0x0f > 1 {
                    return Step::Invalid("v2: command is neither LOCAL nor PROXY");
                }
            }
            14 => {
                // LOCAL ignores the family (the spec: "discard the protocol block
                // including the family").
                if self.is_proxy_command() {
                    match b {
                        0x00 | 0x11 | 0x21 | 0x31 => {}
                        0x12 | 0x22 | 0x32 => {
                            return Step::Invalid("v2: datagram transport is not supported")
                        }
                        _ => return Step::Invalid("v2: unknown address family or transport"),
                    }
                }
            }
            15 => {}
            16 => {
                let len = u16::from_be_bytes([self.buf[14], self.buf[15]]) as usize;
                keep = match (self.is_proxy_command(), self.buf[13]) {
                    (true, 0x11) => V2_INET_LEN,
                    (true, 0x21) => V2_INET6_LEN,
                    _ => 0,
                };
                if len < keep {
                    return Step::Invalid("v2: length too short for the address family");
                }
                total = V2_FIXED_LEN + len;
                if total == V2_FIXED_LEN {
                    return Step::Done(None);
                }
            }
            _ => {
                let State::V2 { total, keep, .. } = self.state else { unreachable!() };
                self.state = State::V2 { seen, total, keep };
                return if seen == total { Step::Done(self.v2_source()) } else { Step::More };
            }
        }
        self.state = State::V2 { seen, total, keep };
        Step::More
    }

    fn is_proxy_command(&self) -> bool {
        self.buf[12] & 0x0f == 1
    }

    /// The source address of a complete v2 header (its address block is held).
    fn v2_source(&self) -> Option<SocketAddr> {
        let State::V2 { keep, .. } = self.state else { return None };
        let a = &self.buf[V2_FIXED_LEN..V2_FIXED_LEN + keep];
        match keep {
            V2_INET_LEN => {
                let ip: [u8; 4] = a[0..4].try_into().expect("4 bytes");
                Some(SocketAddr::new(Ipv4Addr::from(ip).into(), u16::from_be_bytes([a[8], a[9]])))
            }
            V2_INET6_LEN => {
                let ip: [u8; 16] = a[0..16].try_into().expect("16 bytes");
                Some(SocketAddr::new(Ipv6Addr::from(ip).into(), u16::from_be_bytes([a[32], a[33]])))
            }
            _ => None,
        }
    }
}

const FIELD_ERRORS: [&str; 4] = [
    "v1: bad source address",
    "v1: bad destination address",
    "v1: bad source port",
    "v1: bad destination port",
];

/// A dotted quad, decimal, no leading zeroes. `Err` when no continuation of `text`
/// can be valid, `Ok(None)` while it can but is not yet, `Ok(Some)` when it is.
fn v4_address(text: &[u8]) -> Result<Option<Ipv4Addr>, ()> {
    let mut octets = [0u8; 4];
    let (mut n, mut digits, mut value) = (0, 0, 0u16);
    for &c in text {
        match c {
            b'0'..=b'9' => {
                if digits == 1 && value == 0 {
                    return Err(()); // leading zero
                }
                value = value * 10 + u16::from(c - b'0');
                digits += 1;
                if value > 255 {
                    return Err(());
                }
            }
            b'.' if digits > 0 && n < 3 => {
                octets[n] = value as u8;
                n += 1;
                digits = 0;
                value = 0;
            }
            _ => return Err(()),
        }
    }
    if n == 3 && digits > 0 {
        octets[3] = value as u8;
        return Ok(Some(Ipv4Addr::from(octets)));
    }
    Ok(None)
}

/// A port: decimal 0..=65535, no sign, no leading zeroes. Same contract as
/// `v4_address`.
fn port(text: &[u8]) -> Result<Option<u16>, ()> {
    let mut value = 0u32;
    for (k, &c) in text.iter().enumerate() {
        if !c.is_ascii_digit() || (k == 1 && value == 0) {
            return Err(());
        }
        value = value * 10 + u32::from(c - b'0');
        if value > u32::from(u16::MAX) {
            return Err(());
        }
    }
    Ok(if text.is_empty() { None } else { Some(value as u16) })
}

/// Whether `text` can still grow into an IPv6 address as `inet_ntop` writes it: hex
/// groups of at most 4 digits, colons, an optional dotted IPv4 tail.
fn v6_viable(text: &[u8]) -> bool {
    let mut run = 0;
    for &c in text {
        if c.is_ascii_hexdigit() {
            run += 1;
            if run > 4 {
                return false;
            }
        } else if c == b':' || c == b'.' {
            run = 0;
        } else {
            return false;
        }
    }
    text.len() <= V6_TEXT_MAX
}

fn v6_address(text: &[u8]) -> Option<Ipv6Addr> {
    if !v6_viable(text) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` cut at `cuts` (sorted offsets); returns the outcome with
    /// `consumed` made absolute (an offset in `stream`).
    fn run(mode: Mode, stream: &[u8], cuts: &[usize]) -> Outcome {
        let mut p = Parser::new(mode);
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let out = p.feed(&stream[start..cut]);
            assert!(p.held() <= MAX_HELD);
            match out {
                Outcome::NeedMore => {}
                Outcome::Done { consumed, source } => {
                    assert!(consumed <= cut - start);
                    return Outcome::Done { consumed: start + consumed, source };
                }
                Outcome::Invalid(_) => return out,
            }
            start = cut;
        }
        Outcome::NeedMore
    }

    fn whole(mode: Mode, stream: &[u8]) -> Outcome {
        run(mode, stream, &[])
    }

    /// Feeds one byte at a time; returns the outcome and the index of the byte that
    /// settled it.
    fn bytewise(mode: Mode, stream: &[u8]) -> (Outcome, Option<usize>) {
        let mut p = Parser::new(mode);
        for (i, b) in stream.iter().enumerate() {
            match p.feed(std::slice::from_ref(b)) {
                Outcome::NeedMore => {}
                Outcome::Done { consumed, source } => {
                    assert_eq!(consumed, 1);
                    return (Outcome::Done { consumed: i + 1, source }, Some(i));
                }
                out => return (out, Some(i)),
            }
        }
        (Outcome::NeedMore, None)
    }

    fn done(consumed: usize, source: &str) -> Outcome {
        Outcome::Done { consumed, source: Some(source.parse().unwrap()) }
    }

    fn done_local(consumed: usize) -> Outcome {
        Outcome::Done { consumed, source: None }
    }

    fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_inet(tlvs: &[u8]) -> Vec<u8> {
        let mut body = vec![203, 0, 113, 7, 192, 0, 2, 1];
        body.extend_from_slice(&41000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(0x21, 0x11, &body)
    }

    fn v2_inet6(tlvs: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&41000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(0x21, 0x21, &body)
    }

    /// An ALPN TLV, an authority TLV and a NOOP TLV.
    const TLVS: &[u8] = b"\x01\x00\x02h2\x02\x00\x0bexample.com\x04\x00\x00";

    fn unix_body(tlvs: &[u8]) -> Vec<u8> {
        let mut body = vec![0u8; 216];
        body[..9].copy_from_slice(b"/tmp/a.sk");
        body[108..117].copy_from_slice(b"/tmp/b.sk");
        body.extend_from_slice(tlvs);
        body
    }

    const TCP4: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    const TCP6: &[u8] = b"PROXY TCP6 2001:db8::1 2001:db8::2 41000 443\r\n";

    fn unknown_max() -> Vec<u8> {
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n").into_bytes()
    }

    /// Every valid sample and the outcome it must give.
    fn valid_samples() -> Vec<(Mode, Vec<u8>, Outcome)> {
        let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6_max = format!("PROXY TCP6 {f} {f} 65535 65535\r\n").into_bytes();
        let mut v = vec![
            (Mode::V1, TCP4.to_vec(), done(TCP4.len(), "192.168.0.1:56324")),
            (Mode::Any, TCP4.to_vec(), done(TCP4.len(), "192.168.0.1:56324")),
            (Mode::V1, TCP6.to_vec(), done(TCP6.len(), "[2001:db8::1]:41000")),
            (Mode::V1, tcp6_max.clone(), done(104, &format!("[{f}]:65535"))),
            (Mode::V1, b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n".to_vec(), done(44, "0.0.0.0:0")),
            (Mode::V1, b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n".to_vec(), done(36, "[::ffff:10.0.0.1]:1")),
            (Mode::V1, b"PROXY TCP6 FE80::A 0:0:0:0:0:0:0:1 80 81\r\n".to_vec(), done(42, "[fe80::a]:80")),
            (Mode::V1, b"PROXY UNKNOWN\r\n".to_vec(), done_local(15)),
            (Mode::Any, b"PROXY UNKNOWN\r\n".to_vec(), done_local(15)),
            (Mode::V1, b"PROXY UNKNOWN whatever \x00\xff here\r\n".to_vec(), done_local(32)),
            (Mode::V1, unknown_max(), done_local(107)),
            (Mode::V2, v2_inet(&[]), done(28, "203.0.113.7:41000")),
            (Mode::Any, v2_inet(&[]), done(28, "203.0.113.7:41000")),
            (Mode::V2, v2_inet(TLVS), done(28 + TLVS.len(), "203.0.113.7:41000")),
            (Mode::V2, v2_inet6(&[]), done(52, "[2001:db8::1]:41000")),
            (Mode::Any, v2_inet6(TLVS), done(52 + TLVS.len(), "[2001:db8::1]:41000")),
            // LOCAL: no address, an ignored address block, any family.
            (Mode::V2, v2(0x20, 0x00, &[]), done_local(16)),
            (Mode::V2, v2(0x20, 0x11, &v2_inet(&[])[16..]), done_local(28)),
            (Mode::V2, v2(0x20, 0x22, TLVS), done_local(16 + TLVS.len())),
            (Mode::V2, v2(0x20, 0x21, &[]), done_local(16)),
            // PROXY with UNSPEC and AF_UNIX stream: keep the socket's peer.
            (Mode::V2, v2(0x21, 0x00, &[]), done_local(16)),
            (Mode::V2, v2(0x21, 0x00, TLVS), done_local(16 + TLVS.len())),
            (Mode::V2, v2(0x21, 0x31, &unix_body(&[])), done_local(16 + 216)),
            (Mode::Any, v2(0x21, 0x31, &unix_body(TLVS)), done_local(16 + 216 + TLVS.len())),
        ];
        // An IPv4 header whose length covers 300 bytes of TLVs too.
        v.push((Mode::V2, v2_inet(&[0xee; 300]), done(328, "203.0.113.7:41000")));
        v
    }

    /// Every invalid sample, the reason it must give and the index of the byte that
    /// must prove it (bytes fed one at a time).
    fn invalid_samples() -> Vec<(Mode, Vec<u8>, &'static str, usize)> {
        let bad_src = "v1: bad source address";
        let bad_dst = "v1: bad destination address";
        let bad_sport = "v1: bad source port";
        let bad_dport = "v1: bad destination port";
        let proto = "v1: protocol is not TCP4, TCP6 or UNKNOWN";
        let mut v: Vec<(Mode, Vec<u8>, &'static str, usize)> = vec![
            (Mode::Any, b"GET / HTTP/1.1\r\n".to_vec(), "no PROXY header", 0),
            (Mode::V1, b"\x00\x00\x00\x05hello".to_vec(), "no PROXY header", 0),
            (Mode::V1, b"PROXYTCP4".to_vec(), "v1: line does not start with \"PROXY \"", 5),
            (Mode::V1, b"PRoXY TCP4".to_vec(), "v1: line does not start with \"PROXY \"", 2),
            (Mode::V1, b"PROXY tcp4 1.2.3.4".to_vec(), proto, 6),
            (Mode::V1, b"PROXY TCP5 1.2.3.4".to_vec(), proto, 9),
            (Mode::V1, b"PROXY  TCP4".to_vec(), proto, 6),
            (Mode::V1, b"PROXY TCP4\r\n".to_vec(), proto, 10),
            (Mode::V1, b"PROXY UNKNOWNX\r\n".to_vec(), proto, 13),
            (Mode::V1, b"PROXY UNKNOWN \n".to_vec(), "v1: LF without CR", 14),
            (Mode::V1, b"PROXY UNKNOWN a\rb\r\n".to_vec(), "v1: CR not followed by LF", 16),
            (Mode::V1, b"PROXY UNKNOWN\n".to_vec(), proto, 13),
            (Mode::V1, b"PROXY TCP4 256.1.1.1 1.1.1.1 1 2\r\n".to_vec(), bad_src, 13),
            (Mode::V1, b"PROXY TCP4 01.1.1.1 1.1.1.1 1 2\r\n".to_vec(), bad_src, 12),
            (Mode::V1, b"PROXY TCP4 1.2.3 1.1.1.1 1 2\r\n".to_vec(), bad_src, 16),
            (Mode::V1, b"PROXY TCP4 1.2.3.4.5 1.1.1.1 1 2\r\n".to_vec(), bad_src, 18),
            (Mode::V1, b"PROXY TCP4 1..3.4 1.1.1.1 1 2\r\n".to_vec(), bad_src, 13),
            (Mode::V1, b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(), bad_src, 11),
            (Mode::V1, b"PROXY TCP4  1.2.3.4 1.1.1.1 1 2\r\n".to_vec(), bad_src, 11),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 1.1.1.1a 1 2\r\n".to_vec(), bad_dst, 26),
            (Mode::V1, b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n".to_vec(), bad_src, 18),
            (Mode::V1, b"PROXY TCP6 ::1 2001:db8::12345 1 2\r\n".to_vec(), bad_dst, 29),
            (Mode::V1, b"PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n".to_vec(), bad_dst, 32),
            (Mode::V1, b"PROXY TCP6 ::1 ::1%eth0 1 2\r\n".to_vec(), bad_dst, 18),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n".to_vec(), bad_sport, 31),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n".to_vec(), bad_sport, 27),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n".to_vec(), bad_sport, 28),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n".to_vec(), bad_sport, 27),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x2\r\n".to_vec(), bad_dport, 30),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n".to_vec(), bad_dport, 29),
            (
                Mode::V1,
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(),
                "v1: line ends before the destination port",
                28,
            ),
            (
                Mode::V1,
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(),
                "v1: more than four fields after TCP4/TCP6",
                30,
            ),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(), "v1: LF without CR", 30),
            (Mode::V1, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r".to_vec(), "v1: CR not followed by LF", 31),
            // Only one version accepted.
            (Mode::V1, v2_inet(&[]), "PROXY v2 header, but only v1 is accepted", 0),
            (Mode::V2, TCP4.to_vec(), "PROXY v1 header, but only v2 is accepted", 0),
            // v2 fields after the signature.
            (Mode::V2, v2(0x11, 0x11, &[0; 12]), "v2: version is not 2", 12),
            (Mode::V2, v2(0x31, 0x11, &[0; 12]), "v2: version is not 2", 12),
            (Mode::V2, v2(0x22, 0x11, &[0; 12]), "v2: command is neither LOCAL nor PROXY", 12),
            (Mode::V2, v2(0x21, 0x12, &[0; 12]), "v2: datagram transport is not supported", 13),
            (Mode::V2, v2(0x21, 0x22, &[0; 36]), "v2: datagram transport is not supported", 13),
            (Mode::V2, v2(0x21, 0x32, &[0; 216]), "v2: datagram transport is not supported", 13),
            (Mode::V2, v2(0x21, 0x41, &[0; 12]), "v2: unknown address family or transport", 13),
            (Mode::V2, v2(0x21, 0x13, &[0; 12]), "v2: unknown address family or transport", 13),
            (Mode::V2, v2(0x21, 0x10, &[0; 12]), "v2: unknown address family or transport", 13),
            // Lengths too short for the family (checked at the length's second byte).
            (Mode::V2, v2(0x21, 0x11, &[0; 11]), "v2: length too short for the address family", 15),
            (Mode::V2, v2(0x21, 0x11, &[]), "v2: length too short for the address family", 15),
            (Mode::V2, v2(0x21, 0x21, &[0; 35]), "v2: length too short for the address family", 15),
            (Mode::V2, v2(0x21, 0x21, &[0; 12]), "v2: length too short for the address family", 15),
        ];
        // A v1 line that needs 108 bytes: refused at the 106th, once CRLF cannot fit.
        let mut long = unknown_max();
        long.insert(20, b'f');
        v.push((Mode::V1, long, "v1: no CRLF within 107 bytes", 105));
        let mut endless = b"PROXY UNKNOWN ".to_vec();
        endless.resize(300, b'a');
        v.push((Mode::Any, endless, "v1: no CRLF within 107 bytes", 105));
        // 106 bytes then CR: the LF would be the 108th byte.
        let mut late_cr = b"PROXY UNKNOWN ".to_vec();
        late_cr.resize(106, b'a');
        late_cr.extend_from_slice(b"\r\n");
        v.push((Mode::V1, late_cr, "v1: no CRLF within 107 bytes", 105));
        v
    }

    #[test]
    fn v1_tcp4_gives_the_client_address() {
        assert_eq!(whole(Mode::V1, TCP4), done(TCP4.len(), "192.168.0.1:56324"));
    }

    #[test]
    fn v1_tcp6_gives_the_client_address() {
        assert_eq!(whole(Mode::Any, TCP6), done(TCP6.len(), "[2001:db8::1]:41000"));
    }

    #[test]
    fn v1_unknown_keeps_the_socket_peer() {
        assert_eq!(whole(Mode::V1, b"PROXY UNKNOWN\r\n"), done_local(15));
        assert_eq!(whole(Mode::V1, &unknown_max()), done_local(107));
    }

    #[test]
    fn v2_ipv4_and_ipv6_give_the_client_address_with_or_without_tlvs() {
        assert_eq!(whole(Mode::V2, &v2_inet(&[])), done(28, "203.0.113.7:41000"));
        assert_eq!(whole(Mode::V2, &v2_inet(TLVS)), done(28 + TLVS.len(), "203.0.113.7:41000"));
        assert_eq!(whole(Mode::V2, &v2_inet6(&[])), done(52, "[2001:db8::1]:41000"));
        assert_eq!(whole(Mode::V2, &v2_inet6(TLVS)), done(52 + TLVS.len(), "[2001:db8::1]:41000"));
    }

    #[test]
    fn v2_local_unspec_and_unix_keep_the_socket_peer() {
        assert_eq!(whole(Mode::V2, &v2(0x20, 0x00, &[])), done_local(16));
        assert_eq!(whole(Mode::V2, &v2(0x20, 0x11, &v2_inet(TLVS)[16..])), done_local(28 + TLVS.len()));
        assert_eq!(whole(Mode::V2, &v2(0x21, 0x00, TLVS)), done_local(16 + TLVS.len()));
        assert_eq!(whole(Mode::V2, &v2(0x21, 0x31, &unix_body(&[]))), done_local(232));
        assert_eq!(whole(Mode::V2, &v2(0x21, 0x31, &unix_body(TLVS))), done_local(232 + TLVS.len()));
    }

    #[test]
    fn valid_samples_give_their_outcome() {
        for (mode, bytes, want) in valid_samples() {
            assert_eq!(whole(mode, &bytes), want, "{:?}", String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn header_and_first_frame_in_one_read_consume_only_the_header() {
        for (mode, mut bytes, want) in valid_samples() {
            let Outcome::Done { consumed, .. } = want else { unreachable!() };
            assert_eq!(consumed, bytes.len());
            // A frame (4-byte prefix, "hi") right behind the header, in the same read,
            // including bytes that look like another header.
            bytes.extend_from_slice(b"\x02\x00\x00\x00hiPROXY \r\n\r\n\0\r\nQUIT\n");
            let mut p = Parser::new(mode);
            assert_eq!(p.feed(&bytes), want);
            assert_eq!(&bytes[consumed..consumed + 6], b"\x02\x00\x00\x00hi");
            // Settled: later reads are all frame data.
            let Outcome::Done { source, .. } = want else { unreachable!() };
            assert_eq!(p.feed(b"more"), Outcome::Done { consumed: 0, source });
        }
    }

    #[test]
    fn consumed_is_relative_to_the_last_input() {
        let mut stream = TCP4.to_vec();
        stream.extend_from_slice(b"frame");
        let mut p = Parser::new(Mode::V1);
        assert_eq!(p.feed(&stream[..20]), Outcome::NeedMore);
        assert_eq!(p.feed(&stream[20..]), done(TCP4.len() - 20, "192.168.0.1:56324"));
    }

    #[test]
    fn every_split_gives_the_same_outcome_as_whole() {
        let mut samples: Vec<(Mode, Vec<u8>)> = valid_samples().into_iter().map(|(m, b, _)| (m, b)).collect();
        samples.extend(invalid_samples().into_iter().map(|(m, b, _, _)| (m, b)));
        for (mode, mut bytes) in samples {
            bytes.extend_from_slice(b"\x01\x00\x00\x00z");
            let want = whole(mode, &bytes);
            assert_eq!(bytewise(mode, &bytes).0, want);
            for a in 0..=bytes.len() {
                assert_eq!(run(mode, &bytes, &[a]), want, "cut at {a}");
            }
            // Every pair of cuts, for the short ones (v1 lines and the v2 samples
            // without a UNIX block).
            if bytes.len() <= 120 {
                for a in 0..=bytes.len() {
                    for b in a..=bytes.len() {
                        assert_eq!(run(mode, &bytes, &[a, b]), want, "cuts at {a}, {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn invalid_headers_are_refused_at_the_byte_that_proves_it() {
        for (mode, bytes, why, at) in invalid_samples() {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            assert_eq!(whole(mode, &bytes), Outcome::Invalid(why), "{text:?}");
            assert_eq!(bytewise(mode, &bytes), (Outcome::Invalid(why), Some(at)), "{text:?}");
        }
    }

    #[test]
    fn each_wrong_byte_of_the_v2_signature_is_refused_at_that_byte() {
        let good = v2_inet(&[]);
        for mode in [Mode::V2, Mode::Any] {
            for pos in 0..V2_SIGNATURE.len() {
                for wrong in 0..=255u8 {
                    if wrong == V2_SIGNATURE[pos] || (pos == 0 && mode == Mode::Any && wrong == b'P') {
                        continue;
                    }
                    let mut bytes = good.clone();
                    bytes[pos] = wrong;
                    let (out, at) = bytewise(mode, &bytes);
                    assert!(matches!(out, Outcome::Invalid(_)), "pos {pos} byte {wrong:#x}: {out:?}");
                    assert_eq!(at, Some(pos), "pos {pos} byte {wrong:#x}");
                }
            }
        }
    }

    #[test]
    fn each_wrong_byte_of_the_v1_prefix_is_refused_at_that_byte() {
        for pos in 0..V1_PREFIX.len() {
            for wrong in 0..=255u8 {
                if wrong == V1_PREFIX[pos] {
                    continue;
                }
                let mut bytes = TCP4.to_vec();
                bytes[pos] = wrong;
                let (out, at) = bytewise(Mode::V1, &bytes);
                assert!(matches!(out, Outcome::Invalid(_)), "pos {pos} byte {wrong:#x}: {out:?}");
                assert_eq!(at, Some(pos), "pos {pos} byte {wrong:#x}");
            }
        }
    }

    #[test]
    fn oversized_v1_line_is_refused_once_crlf_cannot_fit() {
        let mut bytes = b"PROXY UNKNOWN ".to_vec();
        bytes.resize(200, b'x');
        let mut p = Parser::new(Mode::V1);
        for (i, b) in bytes.iter().enumerate() {
            let out = p.feed(std::slice::from_ref(b));
            if i < 105 {
                assert_eq!(out, Outcome::NeedMore, "byte {i}");
            } else {
                assert_eq!(out, Outcome::Invalid("v1: no CRLF within 107 bytes"), "byte {i}");
            }
            assert!(p.held() <= V1_MAX_LEN);
        }
        // All at once: refused without waiting for more.
        assert_eq!(
            Parser::new(Mode::V1).feed(&bytes[..108]),
            Outcome::Invalid("v1: no CRLF within 107 bytes")
        );
        assert_eq!(
            Parser::new(Mode::V1).feed(&bytes[..106]),
            Outcome::Invalid("v1: no CRLF within 107 bytes")
        );
        assert_eq!(Parser::new(Mode::V1).feed(&bytes[..105]), Outcome::NeedMore);
    }

    #[test]
    fn short_v2_lengths_for_inet_families_are_invalid() {
        for (fam, need) in [(0x11u8, V2_INET_LEN), (0x21, V2_INET6_LEN)] {
            for len in 0..need {
                let bytes = v2(0x21, fam, &vec![0; len]);
                assert_eq!(
                    bytewise(Mode::V2, &bytes),
                    (Outcome::Invalid("v2: length too short for the address family"), Some(15))
                );
            }
            assert!(matches!(whole(Mode::V2, &v2(0x21, fam, &vec![0; need])), Outcome::Done { .. }));
        }
        // Truncated: a header whose announced bytes never all arrive is not done.
        let full = v2_inet6(TLVS);
        for cut in 0..full.len() {
            assert_eq!(whole(Mode::V2, &full[..cut]), Outcome::NeedMore, "cut {cut}");
        }
    }

    #[test]
    fn modes_refuse_the_other_version() {
        assert_eq!(
            whole(Mode::V1, &v2_inet(&[])),
            Outcome::Invalid("PROXY v2 header, but only v1 is accepted")
        );
        assert_eq!(whole(Mode::V2, TCP4), Outcome::Invalid("PROXY v1 header, but only v2 is accepted"));
        assert_eq!(
            whole(Mode::V2, b"PROXY UNKNOWN\r\n"),
            Outcome::Invalid("PROXY v1 header, but only v2 is accepted")
        );
        assert_eq!(whole(Mode::Any, b"\x00"), Outcome::Invalid("no PROXY header"));
    }

    #[test]
    fn memory_stays_bounded_with_65535_bytes_of_tlvs_fed_byte_by_byte() {
        // No heap anywhere: the value's size is all a parser holds.
        assert!(std::mem::size_of::<Parser>() <= 192, "{}", std::mem::size_of::<Parser>());
        let mut body = v2_inet6(&[])[16..].to_vec();
        body.resize(65535, 0x04);
        let bytes = v2(0x21, 0x21, &body);
        assert_eq!(bytes.len(), 16 + 65535);
        let mut p = Parser::new(Mode::V2);
        let mut most = 0;
        for (i, b) in bytes.iter().enumerate() {
            let out = p.feed(std::slice::from_ref(b));
            most = most.max(p.held());
            if i + 1 < bytes.len() {
                assert_eq!(out, Outcome::NeedMore, "byte {i}");
            } else {
                assert_eq!(out, done(1, "[2001:db8::1]:41000"));
            }
        }
        assert_eq!(most, V2_FIXED_LEN + V2_INET6_LEN);
    }

    #[test]
    fn settled_parser_repeats_its_verdict() {
        let mut p = Parser::new(Mode::V1);
        assert_eq!(p.feed(b""), Outcome::NeedMore);
        assert_eq!(p.feed(b"X"), Outcome::Invalid("no PROXY header"));
        assert_eq!(p.feed(TCP4), Outcome::Invalid("no PROXY header"));
        let mut p = Parser::new(Mode::V2);
        assert_eq!(p.feed(&v2(0x20, 0, &[])), done_local(16));
        assert_eq!(p.feed(b""), done_local(0));
    }
}

//! Behind a load balancer (API.md, "Behind a load balancer"): the PROXY
//! protocol (v1 and v2, read before framing, the client's address in
//! on_connect, bad / missing / late headers rejected before it), max
//! connections per IP (by the PROXY address when on) and tf_server_drain.
//! Real sockets on 127.0.0.1, every wait bounded; the suite runs on both
//! backends (TCPFRAME_TEST_BACKEND=poll for the other). The parser itself is
//! unit-tested and fuzzed in src/proxy.rs; here it is driven through the
//! event loop, as a balancer would.
mod common;
use common::*;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- headers

const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const CMD_LOCAL: u8 = 0x20;
const CMD_PROXY: u8 = 0x21;
const FAM_UNSPEC: u8 = 0x00;
const FAM_TCP4: u8 = 0x11;
const FAM_UDP4: u8 = 0x12;
const FAM_TCP6: u8 = 0x21;

/// A v2 header: signature, version/command byte, family byte, the length
/// of what follows (big-endian) and then `body` (addresses and TLVs).
fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
    v2_len(cmd, fam, body.len() as u16, body)
}

/// As `v2`, with the length field given (to announce more or less than `body`).
fn v2_len(cmd: u8, fam: u8, len: u16, body: &[u8]) -> Vec<u8> {
    let mut v = SIG.to_vec();
    v.push(cmd);
    v.push(fam);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A v2 TCP over IPv4 address block.
fn addr4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&src);
    v.extend_from_slice(&dst);
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v
}

/// A v2 TCP over IPv6 address block.
fn addr6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&src.octets());
    v.extend_from_slice(&dst.octets());
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v
}

fn v2_tcp4(src: [u8; 4], sport: u16) -> Vec<u8> {
    v2(CMD_PROXY, FAM_TCP4, &addr4(src, sport, [192, 0, 2, 1], 5882))
}

fn v2_tcp6(src: &str, sport: u16) -> Vec<u8> {
    v2(CMD_PROXY, FAM_TCP6, &addr6(src.parse().unwrap(), sport, "2001:db8::2".parse().unwrap(), 5882))
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&(value.len() as u16).to_be_bytes());
    v.extend_from_slice(value);
    v
}

fn v1(line: &str) -> Vec<u8> {
    line.as_bytes().to_vec()
}

fn v1_tcp4(src: &str, sport: u16) -> Vec<u8> {
    v1(&format!("PROXY TCP4 {src} 192.0.2.1 {sport} 5882\r\n"))
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------- servers

/// Echo hooks: every frame goes back to its sender.
fn echo_hooks() -> Hooks {
    Hooks {
        on_message: Some(Box::new(|srv, conn, data| {
            // SAFETY: srv is the live server whose callback this is.
            unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
        })),
        ..Hooks::default()
    }
}

fn configure(cfg: *mut tf_config, mode: i32, per_ip: u32) {
    // SAFETY: cfg is live.
    unsafe {
        assert_eq!(tf_config_set_proxy_protocol(cfg, mode), TF_OK);
        assert_eq!(tf_config_set_max_connections_per_ip(cfg, per_ip), TF_OK);
    }
}

/// An echo server on 127.0.0.1 with this PROXY mode and per-IP cap (0: none).
fn start(mode: i32, per_ip: u32) -> HookServer {
    HookServer::start_with(Opts::default(), echo_hooks(), |cfg| configure(cfg, mode, per_ip))
}

fn start_at(addr: &str, mode: i32) -> HookServer {
    HookServer::start_with(Opts { addr: addr.into(), ..Opts::default() }, echo_hooks(), |cfg| {
        configure(cfg, mode, 0)
    })
}

fn stats(srv: *const tf_server) -> tf_stats {
    let mut st = tf_stats::default();
    // SAFETY: srv is live for the caller.
    assert_eq!(unsafe { tf_server_stats(srv, &mut st) }, TF_OK);
    st
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn drain(srv: *mut tf_server) -> i32 {
    // SAFETY: srv is NULL or live for the caller.
    unsafe { tf_server_drain(srv) }
}

/// The peers named by on_connect, in order.
fn peers(s: &HookServer) -> Vec<String> {
    s.rec()
        .snapshot()
        .into_iter()
        .filter_map(|e| if let Ev::Connect(_, p) = e { Some(p) } else { None })
        .collect()
}

/// Sends `bytes` (a header, perhaps with frames after it) in one write and
/// waits for the connection's on_connect; returns the stream, its id and the
/// peer text.
fn announce(s: &HookServer, bytes: &[u8]) -> (TcpStream, u64, String) {
    let before = s.rec().connects().len();
    let mut c = s.connect();
    c.write_all(bytes).unwrap();
    s.rec().wait_connect(before + 1);
    let (id, peer) = s
        .rec()
        .snapshot()
        .into_iter()
        .filter_map(|e| if let Ev::Connect(id, p) = e { Some((id, p)) } else { None })
        .nth(before)
        .unwrap();
    (c, id, peer)
}

fn echo(c: &mut TcpStream, payload: &[u8]) {
    write_frame(c, payload);
    assert_eq!(read_frame(c).as_deref(), Some(payload), "echo of {:?}", String::from_utf8_lossy(payload));
}

/// How long until the server closes `c` (EOF or reset), at most `within`;
/// None when it is still open then. Bytes it sends meanwhile are skipped.
fn closed_within(c: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return None;
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
}

/// Sends `bytes` on a new connection and asserts the server refuses it
/// before on_connect: closed within `within`, counted in
/// connections_rejected, no callback names it.
fn assert_refused(s: &HookServer, bytes: &[u8], within: Duration, what: &str) {
    let connects = s.rec().connects().len();
    let rejected = stats(s.srv).connections_rejected;
    let mut c = s.connect();
    // The server may close (and reset) before the last bytes are written.
    let _ = c.write_all(bytes);
    assert!(closed_within(&mut c, within).is_some(), "{what}: still open after {within:?}");
    wait_until(&format!("{what}: counted as rejected"), || stats(s.srv).connections_rejected > rejected);
    assert_eq!(stats(s.srv).connections_rejected, rejected + 1, "{what}");
    // A connection that was announced would have been recorded before its
    // close: there is none, then or now.
    assert_eq!(s.rec().connects().len(), connects, "{what}: on_connect ran: {:?}", peers(s));
    let named = s.rec().connects();
    let evs = s.rec().snapshot();
    assert!(evs.iter().all(|e| !matches!(e, Ev::Close(c, _) if !named.contains(c))), "{what}: {evs:?}");
}

/// Bound for a refusal the first wrong bytes prove: well under the 5 s a
/// missing header is given.
const PROMPT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------- v1 and v2, the peer text

#[test]
fn v1_tcp4_names_the_client() {
    let s = start(TF_PROXY_V1, 0);
    let (mut c, _, peer) = announce(&s, &v1_tcp4("203.0.113.7", 41000));
    assert_eq!(peer, "203.0.113.7:41000");
    echo(&mut c, b"after the header");
}

#[test]
fn v1_tcp6_names_the_client() {
    let s = start(TF_PROXY_V1, 0);
    let (mut c, _, peer) = announce(&s, &v1("PROXY TCP6 2001:db8::1 2001:db8::2 41000 5882\r\n"));
    assert_eq!(peer, "[2001:db8::1]:41000");
    echo(&mut c, b"v6");
}

#[test]
fn v1_unknown_keeps_the_socket_peer() {
    let s = start(TF_PROXY_V1, 0);
    for line in ["PROXY UNKNOWN\r\n", "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"] {
        let (mut c, _, peer) = announce(&s, &v1(line));
        assert_eq!(peer, c.local_addr().unwrap().to_string(), "{line:?}");
        echo(&mut c, b"unknown");
    }
}

#[test]
fn v2_tcp4_names_the_client() {
    let s = start(TF_PROXY_V2, 0);
    let (mut c, _, peer) = announce(&s, &v2_tcp4([203, 0, 113, 7], 41000));
    assert_eq!(peer, "203.0.113.7:41000");
    echo(&mut c, b"v2");
}

#[test]
fn v2_tcp6_names_the_client() {
    let s = start(TF_PROXY_V2, 0);
    let (mut c, _, peer) = announce(&s, &v2_tcp6("2001:db8::1", 41000));
    assert_eq!(peer, "[2001:db8::1]:41000");
    echo(&mut c, b"v2 v6");
}

#[test]
fn v2_local_keeps_the_socket_peer() {
    let s = start(TF_PROXY_V2, 0);
    // A health check's LOCAL header: no address block, or one that is ignored.
    let with_block = v2(CMD_LOCAL, FAM_TCP4, &addr4([203, 0, 113, 7], 41000, [192, 0, 2, 1], 5882));
    for (what, h) in [("bare", v2(CMD_LOCAL, FAM_UNSPEC, &[])), ("with an address block", with_block)] {
        let (mut c, _, peer) = announce(&s, &h);
        assert_eq!(peer, c.local_addr().unwrap().to_string(), "LOCAL {what}");
        echo(&mut c, b"local");
    }
}

#[test]
fn v2_unspec_and_unix_keep_the_socket_peer() {
    let s = start(TF_PROXY_V2, 0);
    // UNSPEC, and AF_UNIX stream (two 108-byte paths): families we do not use.
    let mut paths = vec![0u8; 216];
    paths[..9].copy_from_slice(b"/run/a.sk");
    for (what, h) in [("UNSPEC", v2(CMD_PROXY, FAM_UNSPEC, &[])), ("AF_UNIX", v2(CMD_PROXY, 0x31, &paths))] {
        let (mut c, _, peer) = announce(&s, &h);
        assert_eq!(peer, c.local_addr().unwrap().to_string(), "{what}");
        echo(&mut c, what.as_bytes());
    }
}

#[test]
fn any_takes_either_version() {
    let s = start(TF_PROXY_ANY, 0);
    let (mut a, _, pa) = announce(&s, &v1_tcp4("198.51.100.1", 1000));
    let (mut b, _, pb) = announce(&s, &v2_tcp4([198, 51, 100, 2], 2000));
    assert_eq!((pa.as_str(), pb.as_str()), ("198.51.100.1:1000", "198.51.100.2:2000"));
    echo(&mut a, b"a");
    echo(&mut b, b"b");
}

#[test]
fn socket_peer_over_ipv6_is_kept_for_local_and_unknown() {
    let Ok(probe) = TcpListener::bind("[::1]:0") else {
        eprintln!("no ::1 on this machine: skipped");
        return;
    };
    drop(probe);
    let s = HookServer::start_with(Opts { addr: "[::1]:0".into(), ..Opts::default() }, echo_hooks(), |cfg| {
        configure(cfg, TF_PROXY_ANY, 0)
    });
    let addr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), s.port);
    for h in [v1("PROXY UNKNOWN\r\n"), v2(CMD_LOCAL, FAM_UNSPEC, &[])] {
        let before = s.rec().connects().len();
        let mut c = TcpStream::connect_timeout(&addr, WAIT).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        c.write_all(&h).unwrap();
        s.rec().wait_connect(before + 1);
        let want = format!("[::1]:{}", c.local_addr().unwrap().port());
        assert_eq!(peers(&s)[before], want);
        echo(&mut c, b"six");
    }
}

// ---------------------------------------------------------------- framing after the header

#[test]
fn header_and_first_frames_in_one_segment() {
    let s = start(TF_PROXY_ANY, 0);
    let headers = [
        v1_tcp4("203.0.113.7", 41000),
        v1("PROXY UNKNOWN\r\n"),
        v2_tcp4([203, 0, 113, 7], 41000),
        v2_tcp6("2001:db8::1", 41000),
        v2(CMD_LOCAL, FAM_UNSPEC, &[]),
    ];
    for h in headers {
        // Frames whose bytes look like a header must not confuse anything.
        let bytes = cat(&[&h, &frame(b"first"), &frame(&h), &frame(b"")]);
        let (mut c, id, _) = announce(&s, &bytes);
        assert_eq!(read_frame(&mut c).as_deref(), Some(&b"first"[..]));
        assert_eq!(read_frame(&mut c).as_deref(), Some(&h[..]));
        assert_eq!(read_frame(&mut c).as_deref(), Some(&b""[..]));
        // on_connect came before the first frame.
        let evs = s.rec().snapshot();
        let connect = evs.iter().position(|e| matches!(e, Ev::Connect(c, _) if *c == id)).unwrap();
        let first = evs.iter().position(|e| matches!(e, Ev::Message(c, d) if *c == id && d == b"first"));
        assert!(connect < first.unwrap());
    }
    let st = stats(s.srv);
    assert_eq!((st.connections_accepted, st.connections_rejected, st.frames_received), (5, 0, 15));
}

/// Writes `bytes` in pieces that end at `cuts`, waiting after each piece
/// until the server has read it (bytes_received), so that the parser is fed
/// exactly those pieces.
fn send_in_pieces(s: &HookServer, c: &mut TcpStream, bytes: &[u8], cuts: &[usize]) {
    let mut from = 0;
    for &to in cuts.iter().chain(std::iter::once(&bytes.len())) {
        if to <= from {
            continue;
        }
        let base = stats(s.srv).bytes_received;
        c.write_all(&bytes[from..to]).unwrap();
        let want = base + (to - from) as u64;
        wait_until("the server to read a piece", || stats(s.srv).bytes_received >= want);
        from = to;
    }
}

fn split_cases() -> Vec<(&'static str, Vec<u8>, String)> {
    let tlvs = cat(&[&tlv(0x01, b"h2"), &tlv(0x02, b"example.com"), &tlv(0x04, &[0; 3])]);
    let mut v2_tlv = addr4([203, 0, 113, 9], 9000, [192, 0, 2, 1], 5882);
    v2_tlv.extend_from_slice(&tlvs);
    vec![
        ("v1 TCP4", v1_tcp4("203.0.113.7", 41000), "203.0.113.7:41000".into()),
        ("v1 TCP6", v1("PROXY TCP6 2001:db8::1 2001:db8::2 41000 5882\r\n"), "[2001:db8::1]:41000".into()),
        ("v1 UNKNOWN", v1("PROXY UNKNOWN\r\n"), String::new()),
        ("v2 TCP4", v2_tcp4([203, 0, 113, 7], 41000), "203.0.113.7:41000".into()),
        ("v2 TCP6", v2_tcp6("2001:db8::1", 41000), "[2001:db8::1]:41000".into()),
        ("v2 TCP4 with TLVs", v2(CMD_PROXY, FAM_TCP4, &v2_tlv), "203.0.113.9:9000".into()),
        ("v2 LOCAL", v2(CMD_LOCAL, FAM_UNSPEC, &[]), String::new()),
    ]
}

/// One connection fed `header + frame` in the pieces `cuts` make: on_connect
/// names `want` (empty: the socket's peer) and the frame is echoed.
fn split_case(s: &HookServer, what: &str, header: &[u8], want: &str, cuts: &[usize]) {
    let bytes = cat(&[header, &frame(b"split")]);
    let before = s.rec().connects().len();
    let mut c = s.connect();
    send_in_pieces(s, &mut c, &bytes, cuts);
    s.rec().wait_connect(before + 1);
    let want = if want.is_empty() { c.local_addr().unwrap().to_string() } else { want.to_string() };
    assert_eq!(peers(s)[before], want, "{what} cut at {cuts:?}");
    assert_eq!(read_frame(&mut c).as_deref(), Some(&b"split"[..]), "{what} cut at {cuts:?}");
}

#[test]
fn header_split_at_every_byte() {
    let s = start(TF_PROXY_ANY, 0);
    let mut n = 0;
    for (what, header, want) in split_cases() {
        // Two pieces, cut at every byte of the header and of the frame.
        for k in 1..header.len() + 9 {
            split_case(&s, what, &header, &want, &[k]);
            n += 1;
        }
    }
    let st = stats(s.srv);
    assert_eq!((st.connections_accepted, st.connections_rejected), (n, 0));
}

#[test]
fn header_one_byte_per_write() {
    let s = start(TF_PROXY_ANY, 0);
    for (what, header, want) in split_cases() {
        let cuts: Vec<usize> = (1..header.len() + 9).collect();
        split_case(&s, what, &header, &want, &cuts);
    }
    assert_eq!(stats(s.srv).connections_rejected, 0);
}

/// The same without waiting between bytes: one write per byte, TCP_NODELAY
/// (the harness sets it), however the kernel and the loop group them.
#[test]
fn header_one_byte_per_write_back_to_back() {
    let s = start(TF_PROXY_ANY, 0);
    for (what, header, want) in split_cases() {
        let bytes = cat(&[&header, &frame(b"split")]);
        let before = s.rec().connects().len();
        let mut c = s.connect();
        for b in &bytes {
            c.write_all(std::slice::from_ref(b)).unwrap();
        }
        s.rec().wait_connect(before + 1);
        let want = if want.is_empty() { c.local_addr().unwrap().to_string() } else { want };
        assert_eq!(peers(&s)[before], want, "{what}");
        assert_eq!(read_frame(&mut c).as_deref(), Some(&b"split"[..]), "{what}");
    }
}

// ---------------------------------------------------------------- bad headers

#[test]
fn bad_signatures_are_refused_at_once() {
    let s = start(TF_PROXY_ANY, 0);
    let mut bad_version = v2_tcp4([203, 0, 113, 7], 41000);
    bad_version[12] = 0x11; // version 1 in the binary form
    let mut bad_command = v2_tcp4([203, 0, 113, 7], 41000);
    bad_command[12] = 0x22;
    let mut bad_sig = v2_tcp4([203, 0, 113, 7], 41000);
    bad_sig[9] = b'X'; // ...QUXT
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an HTTP request", v1("GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
        ("a plain frame, no header", frame(b"hello")),
        ("lower-case proxy", v1("proxy TCP4 203.0.113.7 192.0.2.1 41000 5882\r\n")),
        ("unknown protocol word", v1("PROXY TCP5 203.0.113.7 192.0.2.1 41000 5882\r\n")),
        ("two spaces", v1("PROXY  TCP4 203.0.113.7 192.0.2.1 41000 5882\r\n")),
        ("a bad IPv4 address", v1("PROXY TCP4 203.0.113.777 192.0.2.1 41000 5882\r\n")),
        ("an IPv6 address for TCP4", v1("PROXY TCP4 2001:db8::1 192.0.2.1 41000 5882\r\n")),
        ("a port past 65535", v1("PROXY TCP4 203.0.113.7 192.0.2.1 65536 5882\r\n")),
        ("a lone LF", v1("PROXY TCP4 203.0.113.7 192.0.2.1 41000 5882\n")),
        ("a v2 signature with a wrong byte", bad_sig),
        ("v2 with version 1", bad_version),
        ("v2 with an unknown command", bad_command),
        ("v2 over UDP", v2(CMD_PROXY, FAM_UDP4, &addr4([203, 0, 113, 7], 41000, [192, 0, 2, 1], 5882))),
        ("v2 with an unassigned family", v2(CMD_PROXY, 0x41, &addr4([1, 2, 3, 4], 1, [5, 6, 7, 8], 2))),
    ];
    for (what, bytes) in cases {
        assert_refused(&s, &bytes, PROMPT, what);
    }
    assert_eq!(stats(s.srv).connections_accepted, 0);
}

/// The first byte that proves a header wrong is enough: no more is waited for.
#[test]
fn a_wrong_first_byte_is_refused_without_waiting_for_more() {
    let s = start(TF_PROXY_ANY, 0);
    for prefix in [&b"G"[..], b"PROXY X", b"\r\n\r\n\0\r\nQUIT\n\x11", b"\x00"] {
        let t0 = Instant::now();
        assert_refused(&s, prefix, PROMPT, &format!("{:?}", String::from_utf8_lossy(prefix)));
        assert!(t0.elapsed() < PROMPT);
    }
}

#[test]
fn oversized_v1_lines_are_refused() {
    let s = start(TF_PROXY_V1, 0);
    // The longest line the spec allows is 107 bytes, CRLF included.
    let head = "PROXY UNKNOWN ";
    let line = |len: usize| format!("{head}{}\r\n", "x".repeat(len - head.len() - 2));
    assert_eq!(line(107).len(), 107);
    let (mut c, _, peer) = announce(&s, line(107).as_bytes());
    assert_eq!(peer, c.local_addr().unwrap().to_string());
    echo(&mut c, b"107 is fine");
    assert_refused(&s, line(108).as_bytes(), PROMPT, "a 108-byte line");
    // No CRLF at all: refused once 107 bytes have come, not after 5 s.
    assert_refused(&s, format!("{head}{}", "y".repeat(4000)).as_bytes(), PROMPT, "an endless line");
    assert_refused(
        &s,
        format!("PROXY TCP4 203.0.113.7 192.0.2.1 41000 5882{}\r\n", " ".repeat(80)).as_bytes(),
        PROMPT,
        "trailing spaces",
    );
}

#[test]
fn truncated_v2_lengths_are_refused() {
    let s = start(TF_PROXY_V2, 0);
    let a4 = addr4([203, 0, 113, 7], 41000, [192, 0, 2, 1], 5882);
    let a6 = addr6("2001:db8::1".parse().unwrap(), 41000, "2001:db8::2".parse().unwrap(), 5882);
    // A length too short for the family's address block: known wrong at byte 16.
    for (what, h) in [
        ("TCP4, length 0", v2_len(CMD_PROXY, FAM_TCP4, 0, &[])),
        ("TCP4, length 11", v2_len(CMD_PROXY, FAM_TCP4, 11, &a4[..11])),
        ("TCP6, length 12", v2_len(CMD_PROXY, FAM_TCP6, 12, &a6[..12])),
        ("TCP6, length 35", v2_len(CMD_PROXY, FAM_TCP6, 35, &a6[..35])),
    ] {
        assert_refused(&s, &h, PROMPT, what);
    }
    // Shorter than announced and then the peer is done: refused at its FIN.
    for (what, h) in [
        ("TCP4 cut in its addresses", v2_len(CMD_PROXY, FAM_TCP4, 12, &a4[..6])),
        ("TCP4 announcing TLVs that never come", v2_len(CMD_PROXY, FAM_TCP4, 12 + 100, &a4)),
        ("cut in the fixed part", SIG[..9].to_vec()),
    ] {
        let connects = s.rec().connects().len();
        let rejected = stats(s.srv).connections_rejected;
        let mut c = s.connect();
        c.write_all(&h).unwrap();
        half_close(&c);
        assert!(closed_within(&mut c, PROMPT).is_some(), "{what}");
        wait_until(what, || stats(s.srv).connections_rejected == rejected + 1);
        assert_eq!(s.rec().connects().len(), connects, "{what}");
    }
    // An announced length that holds the block and TLVs is fine.
    let body = cat(&[&a4, &tlv(0xE0, b"x")]);
    let (mut c, _, peer) = announce(&s, &v2(CMD_PROXY, FAM_TCP4, &body));
    assert_eq!(peer, "203.0.113.7:41000");
    echo(&mut c, b"ok");
}

#[test]
fn tlvs_are_skipped() {
    let s = start(TF_PROXY_V2, 0);
    let mut ssl = vec![0x07u8, 0, 0, 0, 0]; // client bits, verify
    ssl.extend_from_slice(&tlv(0x21, b"TLSv1.3"));
    let tlvs = cat(&[
        &tlv(0x01, b"h2"),                     // ALPN
        &tlv(0x02, b"example.com"),            // authority
        &tlv(0x03, &[0xde, 0xad, 0xbe, 0xef]), // CRC32C (not checked)
        &tlv(0x04, &[0; 16]),                  // NOOP
        &tlv(0x05, b"unique-id"),
        &tlv(0x20, &ssl),
        &tlv(0x30, b"netns"),
        // TLV-shaped bytes that look like a frame prefix and a header.
        &tlv(0xE0, &cat(&[&frame(b"not a frame"), SIG])),
    ]);
    let small = cat(&[&addr4([203, 0, 113, 7], 41000, [192, 0, 2, 1], 5882), &tlvs]);
    let (mut c, _, peer) = announce(&s, &cat(&[&v2(CMD_PROXY, FAM_TCP4, &small), &frame(b"after tlvs")]));
    assert_eq!(peer, "203.0.113.7:41000");
    assert_eq!(read_frame(&mut c).as_deref(), Some(&b"after tlvs"[..]));
    // The largest header there is: 65535 bytes after the fixed part, nearly all TLV.
    let a6 = addr6("2001:db8::1".parse().unwrap(), 41000, "2001:db8::2".parse().unwrap(), 5882);
    let big = cat(&[&a6, &tlv(0xE1, &pattern(65535 - 36 - 3, 7))]);
    assert_eq!(big.len(), 65535);
    let (mut c, _, peer) = announce(&s, &cat(&[&v2(CMD_PROXY, FAM_TCP6, &big), &frame(b"after 64 KiB")]));
    assert_eq!(peer, "[2001:db8::1]:41000");
    assert_eq!(read_frame(&mut c).as_deref(), Some(&b"after 64 KiB"[..]));
    let st = stats(s.srv);
    assert_eq!((st.frames_received, st.connections_rejected), (2, 0));
}

#[test]
fn each_version_mode_refuses_the_other() {
    let only_v1 = start(TF_PROXY_V1, 0);
    assert_refused(&only_v1, &v2_tcp4([203, 0, 113, 7], 41000), PROMPT, "v2 to a V1 server");
    assert_refused(&only_v1, &v2(CMD_LOCAL, FAM_UNSPEC, &[]), PROMPT, "v2 LOCAL to a V1 server");
    let (mut c, _, _) = announce(&only_v1, &v1_tcp4("203.0.113.7", 41000));
    echo(&mut c, b"v1 ok");
    let only_v2 = start(TF_PROXY_V2, 0);
    assert_refused(&only_v2, &v1_tcp4("203.0.113.7", 41000), PROMPT, "v1 to a V2 server");
    assert_refused(&only_v2, &v1("PROXY UNKNOWN\r\n"), PROMPT, "v1 UNKNOWN to a V2 server");
    let (mut c, _, _) = announce(&only_v2, &v2_tcp4([203, 0, 113, 7], 41000));
    echo(&mut c, b"v2 ok");
}

#[test]
fn proxy_off_is_the_default_and_modes_are_checked() {
    let cfg = tf_config_new();
    // SAFETY: cfg is live until freed below; NULL is allowed and refused.
    unsafe {
        for bad in [-1, 4, 100, i32::MIN, i32::MAX] {
            assert_eq!(tf_config_set_proxy_protocol(cfg, bad), TF_ERR_INVALID, "mode {bad}");
        }
        for good in [TF_PROXY_OFF, TF_PROXY_V1, TF_PROXY_V2, TF_PROXY_ANY] {
            assert_eq!(tf_config_set_proxy_protocol(cfg, good), TF_OK, "mode {good}");
        }
        assert_eq!(tf_config_set_proxy_protocol(std::ptr::null_mut(), TF_PROXY_V2), TF_ERR_INVALID);
        assert_eq!(tf_config_set_max_connections_per_ip(std::ptr::null_mut(), 1), TF_ERR_INVALID);
        assert_eq!(tf_config_set_max_connections_per_ip(cfg, 0), TF_OK);
        assert_eq!(tf_config_set_max_connections_per_ip(cfg, u32::MAX), TF_OK);
        tf_config_free(cfg);
    }
    assert_eq!((TF_PROXY_OFF, TF_PROXY_V1, TF_PROXY_V2, TF_PROXY_ANY), (0, 1, 2, 3));
    // Off: a header is no header, its bytes are frame bytes ("PROX" is a huge length).
    let s = HookServer::start(Opts { max_frame: Some(1 << 20), ..Opts::default() }, echo_hooks());
    let (mut c, id) = s.connect_id();
    assert_eq!(peers(&s)[0], c.local_addr().unwrap().to_string());
    c.write_all(&v1_tcp4("203.0.113.7", 41000)).unwrap();
    assert_eq!(s.rec().wait_close(id), TF_CLOSE_TOO_LARGE);
}

// ---------------------------------------------------------------- a client that sends nothing

/// The only test that waits out the 5-second header deadline; everything that
/// depends on it is checked in this one window. A header completed late but
/// inside the deadline is served.
#[test]
fn missing_or_late_headers_are_closed_after_five_seconds() {
    let s = start(TF_PROXY_ANY, 0);
    let t0 = Instant::now();
    let mut silent = s.connect();
    let mut half_v1 = s.connect();
    half_v1.write_all(b"PROXY TCP4 203.0.113.7 ").unwrap();
    let mut half_v2 = s.connect();
    half_v2.write_all(&v2_tcp4([203, 0, 113, 7], 41000)[..20]).unwrap();
    let mut slow = s.connect();
    let slow_header = v2_tcp4([198, 51, 100, 3], 3000);
    slow.write_all(&slow_header[..10]).unwrap();
    wait_until("the four connections accepted", || stats(s.srv).bytes_received == 10 + 20 + 23);
    let stamped = t0.elapsed();
    // Meanwhile the loop serves others.
    let (mut busy, _, _) = announce(&s, &v2_tcp4([198, 51, 100, 4], 4000));
    echo(&mut busy, b"not blocked");
    // The slow one completes its header 3.5 s in: it is served, then and after 5 s.
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(t0.elapsed()));
    slow.write_all(&cat(&[&slow_header[10..], &frame(b"late but in time")])).unwrap();
    assert_eq!(read_frame(&mut slow).as_deref(), Some(&b"late but in time"[..]));
    // The three others are closed at 5 s after their accept, give or take.
    let bound = Duration::from_millis(5000 + 2000).saturating_sub(t0.elapsed());
    let mut ends = vec![];
    for (what, c) in
        [("silent", &mut silent), ("half a v1 line", &mut half_v1), ("half a v2 header", &mut half_v2)]
    {
        assert!(closed_within(c, bound).is_some(), "{what}: still open at {:?}", t0.elapsed());
        ends.push((what, t0.elapsed()));
    }
    for (what, at) in &ends {
        // Not before the deadline (the accept came after t0, before `stamped`).
        assert!(*at >= Duration::from_millis(4900), "{what}: closed early, at {at:?}");
        assert!(*at <= stamped + Duration::from_millis(6500), "{what}: closed late, at {at:?}");
    }
    wait_until("three rejections", || stats(s.srv).connections_rejected == 3);
    let st = stats(s.srv);
    assert_eq!((st.connections_rejected, st.connections_accepted), (3, 2));
    let mut p = peers(&s);
    p.sort();
    assert_eq!(p, ["198.51.100.3:3000", "198.51.100.4:4000"]);
    echo(&mut slow, b"still served past 5 s");
    // No close of a connection the host never heard of.
    let evs = s.rec().snapshot();
    assert!(!evs.iter().any(|e| matches!(e, Ev::Close(..))), "{evs:?}");
}

// ---------------------------------------------------------------- max connections per IP

#[test]
fn per_ip_cap_without_proxy() {
    let s = start(TF_PROXY_OFF, 2);
    let (mut a, ida) = s.connect_id();
    let (mut b, _) = s.connect_id();
    let connects = s.rec().connects().len();
    let rejected = stats(s.srv).connections_rejected;
    let mut c = s.connect();
    assert!(closed_within(&mut c, PROMPT).is_some(), "a third connection from 127.0.0.1 was kept");
    wait_until("the third counted as rejected", || stats(s.srv).connections_rejected == rejected + 1);
    assert_eq!(s.rec().connects().len(), connects);
    echo(&mut a, b"a");
    echo(&mut b, b"b");
    // One leaves: room for one more.
    drop(a);
    s.rec().wait_close(ida);
    let (mut d, _) = s.connect_id();
    echo(&mut d, b"d");
    let mut e = s.connect();
    assert!(closed_within(&mut e, PROMPT).is_some());
    wait_until("the fourth counted", || stats(s.srv).connections_rejected == rejected + 2);
    let st = stats(s.srv);
    assert_eq!((st.connections_accepted, st.connections_active), (3, 2));
}

#[test]
fn per_ip_cap_counts_the_proxy_address() {
    let s = start(TF_PROXY_V2, 1);
    // Same socket IP (127.0.0.1), different client IPs: both allowed.
    let (mut a, ida, pa) = announce(&s, &v2_tcp4([198, 51, 100, 1], 1001));
    let (mut b, _, pb) = announce(&s, &v2_tcp4([198, 51, 100, 2], 1002));
    let (mut c6, _, p6) = announce(&s, &v2_tcp6("2001:db8::1", 1003));
    assert_eq!([pa, pb, p6], ["198.51.100.1:1001", "198.51.100.2:1002", "[2001:db8::1]:1003"]);
    // The same client IP again (another port): over the cap.
    assert_refused(
        &s,
        &cat(&[&v2_tcp4([198, 51, 100, 1], 2001), &frame(b"x")]),
        PROMPT,
        "198.51.100.1 again",
    );
    assert_refused(&s, &v2_tcp6("2001:db8::1", 2003), PROMPT, "2001:db8::1 again");
    echo(&mut a, b"a");
    echo(&mut b, b"b");
    echo(&mut c6, b"c");
    drop(a);
    s.rec().wait_close(ida);
    let (mut d, _, pd) = announce(&s, &v2_tcp4([198, 51, 100, 1], 3001));
    assert_eq!(pd, "198.51.100.1:3001");
    echo(&mut d, b"d");
    let st = stats(s.srv);
    assert_eq!((st.connections_accepted, st.connections_rejected, st.connections_active), (4, 2, 3));
}

#[test]
fn per_ip_cap_with_v1_and_the_cap_of_many() {
    let s = start(TF_PROXY_V1, 3);
    let mut kept = vec![];
    for port in 1..=3 {
        kept.push(announce(&s, &v1_tcp4("203.0.113.50", port)).0);
    }
    assert_refused(&s, &v1_tcp4("203.0.113.50", 4), PROMPT, "a fourth from 203.0.113.50");
    kept.push(announce(&s, &v1_tcp4("203.0.113.51", 4)).0);
    for c in &mut kept {
        echo(c, b"kept");
    }
}

// ---------------------------------------------------------------- drain

#[test]
fn drain_then_bind_again_while_old_connections_echo() {
    for mode in [TF_PROXY_OFF, TF_PROXY_V2] {
        let h = |src: [u8; 4]| if mode == TF_PROXY_OFF { vec![] } else { v2_tcp4(src, 5000) };
        let old = start(mode, 0);
        let (mut a, _, _) = announce(&old, &h([198, 51, 100, 1]));
        let (mut b, _, _) = announce(&old, &h([198, 51, 100, 2]));
        echo(&mut a, b"before");
        assert_eq!(drain(old.srv), TF_OK);
        // Nobody listens until the next server binds; then it is that one.
        assert!(refused_within(old.addr, WAIT), "still listening after tf_server_drain returned");
        let new = start_at(&old.addr.to_string(), mode);
        assert_eq!(new.port, old.port);
        let (mut n, _, _) = announce(&new, &h([198, 51, 100, 3]));
        echo(&mut n, b"new server");
        for i in 0..50 {
            let p = format!("old {i}");
            echo(&mut a, p.as_bytes());
            echo(&mut b, p.as_bytes());
        }
        assert_eq!(old.rec().connects().len(), 2, "the drained server took a connection");
        assert_eq!(stats(old.srv).connections_active, 2);
        // The old server's connections end as usual, and it can be stopped.
        let old_ids = old.rec().connects();
        drop(a);
        old.rec().wait_close(old_ids[0]);
        assert_eq!(old.rec().closes_of(old_ids[0]), [TF_CLOSE_PEER]);
        echo(&mut b, b"last");
        drop(b);
        wait_until("the drained server empty", || stats(old.srv).connections_active == 0);
        // SAFETY: old.srv is live.
        assert_eq!(unsafe { tf_server_stop(old.srv, 1000) }, TF_OK);
        echo(&mut n, b"still the new one");
    }
}

#[test]
fn drain_refuses_new_connections_at_once() {
    let s = start(TF_PROXY_OFF, 0);
    let (mut a, _) = s.connect_id();
    assert_eq!(drain(s.srv), TF_OK);
    // Refused by the kernel now: no listener at all.
    match TcpStream::connect_timeout(&s.addr, WAIT) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused),
        Ok(_) => panic!("connected to a drained server"),
    }
    echo(&mut a, b"served on");
    assert_eq!(stats(s.srv).connections_accepted, 1);
}

#[test]
fn drain_is_idempotent_and_stopped_after_stop() {
    let s = start(TF_PROXY_OFF, 0);
    let (mut a, _) = s.connect_id();
    for _ in 0..3 {
        assert_eq!(drain(s.srv), TF_OK);
    }
    echo(&mut a, b"after three drains");
    assert_eq!(drain(std::ptr::null_mut()), TF_ERR_INVALID);
    // SAFETY: s.srv is live.
    assert_eq!(unsafe { tf_server_stop(s.srv, 0) }, TF_OK);
    assert_eq!(drain(s.srv), TF_ERR_STOPPED);
    // Stop after drain and a never-drained server: both still STOPPED.
    let t = start(TF_PROXY_V2, 0);
    // SAFETY: t.srv is live.
    assert_eq!(unsafe { tf_server_stop(t.srv, 0) }, TF_OK);
    assert_eq!(drain(t.srv), TF_ERR_STOPPED);
}

#[test]
fn drain_from_a_callback() {
    let result = Arc::new(Mutex::new(None));
    let r = result.clone();
    let hooks = Hooks {
        on_message: Some(Box::new(move |srv, conn, data| {
            if data == b"drain" {
                // SAFETY: srv is live during its callbacks.
                *r.lock().unwrap() = Some(unsafe { tf_server_drain(srv) });
            }
            // SAFETY: as above.
            unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
        })),
        ..Hooks::default()
    };
    let s = HookServer::start_with(Opts::default(), hooks, |cfg| configure(cfg, TF_PROXY_V1, 0));
    let (mut a, _, _) = announce(&s, &v1_tcp4("203.0.113.7", 1));
    echo(&mut a, b"drain");
    assert_eq!(*result.lock().unwrap(), Some(TF_OK));
    assert!(refused_within(s.addr, WAIT), "listening after a drain from on_message");
    echo(&mut a, b"served on");
    assert_eq!(drain(s.srv), TF_OK);
}

/// A connection accepted before the drain whose header is still due is an
/// open connection: once its header comes it is announced and served.
#[test]
fn drain_keeps_connections_whose_header_is_due() {
    let s = start(TF_PROXY_V2, 0);
    let mut c = s.connect();
    let h = v2_tcp4([203, 0, 113, 7], 41000);
    c.write_all(&h[..5]).unwrap();
    wait_until("the first bytes read", || stats(s.srv).bytes_received == 5);
    assert_eq!(drain(s.srv), TF_OK);
    c.write_all(&cat(&[&h[5..], &frame(b"after drain")])).unwrap();
    s.rec().wait_connect(1);
    assert_eq!(peers(&s), ["203.0.113.7:41000"]);
    assert_eq!(read_frame(&mut c).as_deref(), Some(&b"after drain"[..]));
}

#[test]
fn tf_connect_after_drain() {
    // The target records and does not echo (an echo both ways would bounce forever).
    let target = HookServer::start(Opts::default(), Hooks::default());
    let s = start(TF_PROXY_V2, 0);
    assert_eq!(drain(s.srv), TF_OK);
    let addr = CString::new(target.addr.to_string()).unwrap();
    let mut out = 0u64;
    // SAFETY: s.srv is live; addr is NUL-terminated; out is writable.
    assert_eq!(unsafe { tf_connect(s.srv, addr.as_ptr(), &mut out) }, TF_OK, "{}", last_error());
    // Established: on_connect with the address connected to (no header is
    // expected from the other side of an outbound connection).
    s.rec().wait_connect(1);
    assert_eq!(peers(&s), [target.addr.to_string()]);
    let tid = target.rec().wait_connect(1)[0];
    // SAFETY: s.srv is live.
    assert_eq!(unsafe { tf_send(s.srv, out, b"ping".as_ptr(), 4) }, TF_OK);
    target.rec().wait_for("ping", |e| e.contains(&Ev::Message(tid, b"ping".to_vec())));
    // SAFETY: target.srv is live.
    assert_eq!(unsafe { tf_send(target.srv, tid, b"pong".as_ptr(), 4) }, TF_OK);
    s.rec().wait_for("pong on the outbound connection", |e| e.contains(&Ev::Message(out, b"pong".to_vec())));
    assert!(refused_within(s.addr, WAIT), "the drained server listens again");
}

#[test]
fn outbound_connections_carry_no_header() {
    let s = start(TF_PROXY_V2, 0);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = CString::new(l.local_addr().unwrap().to_string()).unwrap();
    let mut out = 0u64;
    // SAFETY: s.srv is live; addr is NUL-terminated; out is writable.
    assert_eq!(unsafe { tf_connect(s.srv, addr.as_ptr(), &mut out) }, TF_OK);
    // SAFETY: as above.
    assert_eq!(unsafe { tf_send(s.srv, out, b"first".as_ptr(), 5) }, TF_OK);
    let (mut peer, _) = l.accept().unwrap();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = [0u8; 9];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got[..], &frame(b"first")[..], "the first bytes out are the frame");
    // And what comes back is framed from its first byte (not read as a header).
    peer.write_all(&frame(b"PROXY TCP4 reply")).unwrap();
    s.rec().wait_for("the reply", |e| {
        e.iter().any(|e| matches!(e, Ev::Message(c, d) if *c == out && d == b"PROXY TCP4 reply"))
    });
    let st = stats(s.srv);
    assert_eq!((st.connections_rejected, st.connections_accepted), (0, 0));
}

// ---------------------------------------------------------------- drain on a Unix socket

/// A minimal echo host for a Unix-socket server (the harness's servers are TCP).
struct UnixHost {
    srv: AtomicPtr<tf_server>,
    connects: AtomicU64,
    peers: Mutex<Vec<String>>,
}

unsafe extern "C" fn ux_connect(ud: *mut c_void, _conn: u64, peer: *const c_char) -> c_int {
    // SAFETY: ud is the UnixHost the test keeps alive past the server.
    let h = unsafe { &*(ud as *const UnixHost) };
    // SAFETY: peer is a NUL-terminated string valid during the call.
    h.peers.lock().unwrap().push(unsafe { CStr::from_ptr(peer) }.to_string_lossy().into_owned());
    h.connects.fetch_add(1, Ordering::SeqCst);
    0
}

unsafe extern "C" fn ux_message(ud: *mut c_void, conn: u64, data: *const u8, len: usize) {
    // SAFETY: as in ux_connect; data is `len` bytes valid during the call.
    let h = unsafe { &*(ud as *const UnixHost) };
    // SAFETY: srv is live during its callbacks.
    unsafe { tf_send(h.srv.load(Ordering::SeqCst), conn, data, len) };
}

unsafe extern "C" fn ux_close(_ud: *mut c_void, _conn: u64, _reason: i32) {}

fn start_unix(path: &str, host: &UnixHost, mode: i32) -> *mut tf_server {
    let cfg = config(&Opts { addr: format!("unix:{path}"), ..Opts::default() });
    configure(cfg, mode, 1);
    let cb = tf_callbacks {
        user_data: host as *const UnixHost as *mut c_void,
        on_connect: Some(ux_connect),
        on_message: Some(ux_message),
        on_close: Some(ux_close),
    };
    // SAFETY: cfg, cb and the out pointer are live; the host outlives the server.
    let rc = unsafe { tf_server_start(cfg, &cb, host.srv.as_ptr()) };
    // SAFETY: cfg came from tf_config_new.
    unsafe { tf_config_free(cfg) };
    assert_eq!(rc, TF_OK, "tf_server_start on unix:{path}: {}", last_error());
    host.srv.load(Ordering::SeqCst)
}

fn unix_echo(c: &mut UnixStream, payload: &[u8]) {
    c.write_all(&frame(payload)).unwrap();
    let mut len = [0u8; 4];
    c.read_exact(&mut len).unwrap();
    let mut got = vec![0u8; u32::from_le_bytes(len) as usize];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, payload);
}

fn new_host() -> UnixHost {
    UnixHost {
        srv: AtomicPtr::new(std::ptr::null_mut()),
        connects: AtomicU64::new(0),
        peers: Mutex::default(),
    }
}

#[test]
fn drain_on_a_unix_socket_removes_the_file() {
    let dir =
        std::env::temp_dir().join(format!("tcpframe-proxy-{}-{:?}", std::process::id(), Instant::now()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let path_s = path.to_str().unwrap().to_string();
    let old_host = new_host();
    let old = start_unix(&path_s, &old_host, TF_PROXY_V2);
    assert!(path.exists());
    let mut a = UnixStream::connect(&path).unwrap();
    a.set_read_timeout(Some(WAIT)).unwrap();
    // PROXY on a Unix socket too (nginx or HAProxy on the same machine): the
    // per-IP cap (1) counts the header's address; Unix peers have no IP.
    a.write_all(&v2_tcp4([203, 0, 113, 7], 41000)).unwrap();
    unix_echo(&mut a, b"before");
    assert_eq!(drain(old), TF_OK);
    assert!(!path.exists(), "the socket file is still there after tf_server_drain returned");
    assert!(UnixStream::connect(&path).is_err());
    // Another server binds the same path at once; the old connection echoes on.
    let new_host = new_host();
    let new = start_unix(&path_s, &new_host, TF_PROXY_V2);
    let mut b = UnixStream::connect(&path).unwrap();
    b.set_read_timeout(Some(WAIT)).unwrap();
    b.write_all(&v2(CMD_LOCAL, FAM_UNSPEC, &[])).unwrap();
    unix_echo(&mut b, b"new");
    unix_echo(&mut a, b"old, after the drain");
    assert_eq!(old_host.connects.load(Ordering::SeqCst), 1);
    assert_eq!(*old_host.peers.lock().unwrap(), ["203.0.113.7:41000"]);
    let np = new_host.peers.lock().unwrap().clone();
    assert_eq!(np.len(), 1);
    assert!(np[0].starts_with("unix:pid="), "LOCAL keeps the Unix peer text: {np:?}");
    assert_eq!(drain(old), TF_OK, "idempotent");
    // SAFETY: both servers are live; the hosts outlive them.
    unsafe {
        assert_eq!(tf_server_stop(old, 0), TF_OK);
        assert_eq!(tf_server_drain(old), TF_ERR_STOPPED);
        tf_server_free(old);
        // The old server's stop must not remove the new server's file.
        assert!(path.exists(), "stopping the drained server removed the new server's socket");
        assert_eq!(tf_server_stop(new, 0), TF_OK);
        tf_server_free(new);
    }
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- drain and the accept queue

/// A client whose handshake the kernel completed before the drain, while the
/// loop was busy in a callback, is an open connection from its side (its
/// connect() returned, its bytes were taken). The contract says every open
/// connection goes on being served; closing the listener with such a
/// connection still in its accept queue resets it instead. Behind a balancer
/// this is a client's connection, established by the balancer, then reset.
#[test]
fn drain_serves_connections_already_in_the_accept_queue() {
    let hooks = Hooks {
        on_message: Some(Box::new(|srv, conn, data| {
            if data == b"slow" {
                std::thread::sleep(Duration::from_millis(400));
            }
            // SAFETY: srv is live during its callbacks.
            unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
        })),
        ..Hooks::default()
    };
    let s = HookServer::start(Opts::default(), hooks);
    let (mut a, _) = s.connect_id();
    write_frame(&mut a, b"slow");
    wait_until("the loop busy in on_message", || s.rec().messages.load(Ordering::SeqCst) == 1);
    // The loop sleeps: this handshake completes in the kernel's accept queue.
    let mut queued = s.connect();
    write_frame(&mut queued, b"queued before the drain");
    let srv = s.srv as usize;
    let drainer = std::thread::spawn(move || drain(srv as *mut tf_server));
    assert_eq!(drainer.join().unwrap(), TF_OK);
    assert_eq!(read_frame(&mut a).as_deref(), Some(&b"slow"[..]));
    queued.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut len = [0u8; 4];
    let got = queued.read_exact(&mut len);
    assert!(
        got.is_ok(),
        "a connection established before tf_server_drain was dropped ({:?}); stats {:?}",
        got.err(),
        stats(s.srv)
    );
}

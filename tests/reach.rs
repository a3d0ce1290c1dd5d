//! Reach (API.md, "Second set of additions"): every prefix format at its size
//! limits and split at every byte, impossible lengths; Unix sockets (path and
//! abstract, credentials, the file's mode, another uid, the socket-file
//! rules); inherited listeners (fd:N from a parent process); outbound
//! connections (tf_connect: our own listener, refused, missing, timed out,
//! queued before the connect, closed before it, pull mode, a pure client,
//! max connections, stop, argument checks). Real sockets, bounded waits, both
//! backends (TCPFRAME_TEST_BACKEND).
mod common;
use common::*;
use std::ffi::{c_void, CStr, CString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- prefix formats

/// A length prefix as the peer writes it: width, and TF_PREFIX_* flags.
#[derive(Clone, Copy, Debug)]
struct Fmt {
    width: usize,
    flags: u32,
}

const DEFAULT_MAX_FRAME: u32 = 8 * 1024 * 1024;

impl Fmt {
    /// Every width x endianness x includes-prefix combination.
    fn all() -> Vec<Fmt> {
        let mut v = Vec::new();
        for width in [1, 2, 4, 8] {
            for flags in [
                0,
                TF_PREFIX_BIG_ENDIAN,
                TF_PREFIX_INCLUDES_ITSELF,
                TF_PREFIX_BIG_ENDIAN | TF_PREFIX_INCLUDES_ITSELF,
            ] {
                v.push(Fmt { width, flags });
            }
        }
        v
    }

    fn be(&self) -> bool {
        self.flags & TF_PREFIX_BIG_ENDIAN != 0
    }

    fn inc(&self) -> bool {
        self.flags & TF_PREFIX_INCLUDES_ITSELF != 0
    }

    /// The largest payload the prefix can say (API.md's formula).
    fn cap(&self) -> u64 {
        let all = if self.width == 8 { u64::MAX } else { (1u64 << (8 * self.width)) - 1 };
        all - if self.inc() { self.width as u64 } else { 0 }
    }

    fn limit(&self, max_frame: u32) -> u64 {
        self.cap().min(max_frame as u64)
    }

    /// A prefix holding `value` as it is (no adjustment).
    fn raw_prefix(&self, value: u64) -> Vec<u8> {
        if self.be() {
            value.to_be_bytes()[8 - self.width..].to_vec()
        } else {
            value.to_le_bytes()[..self.width].to_vec()
        }
    }

    /// The prefix announcing a payload of `len` bytes.
    fn prefix(&self, len: u64) -> Vec<u8> {
        self.raw_prefix(len + if self.inc() { self.width as u64 } else { 0 })
    }

    fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = self.prefix(payload.len() as u64);
        v.extend_from_slice(payload);
        v
    }

    /// Reads one frame in this format; None at end of stream (or reset).
    fn read(&self, r: &mut impl Read) -> Option<Vec<u8>> {
        let mut p = vec![0u8; self.width];
        match r.read_exact(&mut p) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return None
            }
            Err(e) => panic!("{self:?}: read prefix: {e}"),
        }
        let mut b = [0u8; 8];
        let value = if self.be() {
            b[8 - self.width..].copy_from_slice(&p);
            u64::from_be_bytes(b)
        } else {
            b[..self.width].copy_from_slice(&p);
            u64::from_le_bytes(b)
        };
        let len = value - if self.inc() { self.width as u64 } else { 0 };
        let mut payload = vec![0u8; len as usize];
        r.read_exact(&mut payload).unwrap_or_else(|e| panic!("{self:?}: read {len}-byte payload: {e}"));
        Some(payload)
    }

    fn set(&self, cfg: *mut tf_config) {
        // SAFETY: cfg is live (the start_* closures pass it).
        let rc = unsafe { tf_config_set_prefix(cfg, self.width as u32, self.flags) };
        assert_eq!(rc, TF_OK, "{self:?}: {}", last_error());
    }
}

/// True when the peer ends the stream within WAIT (data before it is skipped).
fn sees_eof(r: &mut impl Read) -> bool {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        match r.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
    false
}

// ---------------------------------------------------------------- servers

/// Hooks that echo every frame to its sender.
fn echo_hooks() -> Hooks {
    Hooks {
        on_message: Some(Box::new(|srv, conn, data| {
            // SAFETY: srv is the live server whose callback this is.
            let rc = unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
            assert!(rc == TF_OK || rc == TF_ERR_NO_CONN, "echo: {rc} {}", last_error());
        })),
        ..Hooks::default()
    }
}

fn opts(addr: &str) -> Opts {
    Opts { addr: addr.to_string(), ..Opts::default() }
}

/// An echo server on `addr` speaking `fmt`.
fn echo_server(addr: &str, fmt: Fmt, max_frame: Option<u32>) -> HookServer {
    HookServer::start_any(Opts { max_frame, ..opts(addr) }, echo_hooks(), |cfg| fmt.set(cfg))
}

unsafe extern "C" fn ignore_message(_: *mut c_void, _: u64, _: *const u8, _: usize) {}

/// tf_server_start's code for `addr` (the server, if one starts, is stopped at once).
fn start_rc(addr: &str, extra: impl FnOnce(*mut tf_config)) -> (i32, String) {
    let cfg = config(&opts("127.0.0.1:0"));
    let a = CString::new(addr).unwrap();
    // SAFETY: cfg is live; strings are NUL-terminated; srv is written on success only.
    unsafe {
        assert_eq!(tf_config_set_address(cfg, a.as_ptr()), TF_OK, "{addr}: {}", last_error());
        extra(cfg);
        let cb = tf_callbacks {
            user_data: std::ptr::null_mut(),
            on_connect: None,
            on_message: Some(ignore_message),
            on_close: None,
        };
        let mut srv: *mut tf_server = std::ptr::null_mut();
        let rc = tf_server_start(cfg, &cb, &mut srv);
        let msg = last_error();
        tf_config_free(cfg);
        if rc == TF_OK {
            tf_server_stop(srv, 0);
            tf_server_free(srv);
        }
        (rc, msg)
    }
}

fn stop(srv: &HookServer) -> i32 {
    // SAFETY: srv is live until drop (stop is idempotent; drop stops again).
    unsafe { tf_server_stop(srv.srv, 0) }
}

fn port_of(srv: *mut tf_server) -> u16 {
    // SAFETY: srv is live for the caller.
    unsafe { tf_server_port(srv) }
}

fn send(srv: *mut tf_server, conn: u64, data: &[u8]) -> i32 {
    // SAFETY: srv is live for the caller.
    unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) }
}

fn conn_close(srv: *mut tf_server, conn: u64) -> i32 {
    // SAFETY: srv is live for the caller.
    unsafe { tf_conn_close(srv, conn) }
}

fn info(srv: *mut tf_server, conn: u64) -> Option<tf_conn_info> {
    let mut i = std::mem::MaybeUninit::<tf_conn_info>::uninit();
    // SAFETY: srv is live for the caller; i is written on success.
    if unsafe { tf_conn_get_info(srv, conn, i.as_mut_ptr()) } != TF_OK {
        return None;
    }
    // SAFETY: written by the TF_OK call above.
    Some(unsafe { i.assume_init() })
}

fn peer_of(i: &tf_conn_info) -> String {
    // SAFETY: the library NUL-terminates peer.
    unsafe { CStr::from_ptr(i.peer.as_ptr()) }.to_string_lossy().into_owned()
}

fn stats(srv: *mut tf_server) -> tf_stats {
    let mut st = tf_stats::default();
    // SAFETY: srv is live for the caller.
    assert_eq!(unsafe { tf_server_stats(srv, &mut st) }, TF_OK);
    st
}

/// tf_connect's code and the id it wrote (`out` starts at a sentinel).
fn try_connect(srv: *mut tf_server, addr: &str) -> (i32, u64) {
    let a = CString::new(addr).unwrap();
    let mut id = u64::MAX;
    // SAFETY: srv is live for the caller; a is NUL-terminated; id is writable.
    let rc = unsafe { tf_connect(srv, a.as_ptr(), &mut id) };
    (rc, id)
}

fn connect_out(srv: *mut tf_server, addr: &str) -> u64 {
    let (rc, id) = try_connect(srv, addr);
    assert_eq!(rc, TF_OK, "tf_connect({addr}): {}", last_error());
    assert!(id != 0 && id != u64::MAX);
    id
}

fn ev_connect_of(rec: &Recorder, conn: u64) -> Option<String> {
    rec.snapshot().into_iter().find_map(|e| match e {
        Ev::Connect(c, p) if c == conn => Some(p),
        _ => None,
    })
}

fn messages_of(rec: &Recorder, conn: u64) -> Vec<Vec<u8>> {
    rec.snapshot()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Message(c, d) if c == conn => Some(d),
            _ => None,
        })
        .collect()
}

fn wait_messages(rec: &Recorder, conn: u64, n: usize) -> Vec<Vec<u8>> {
    rec.wait_for("messages", |evs| {
        evs.iter().filter(|e| matches!(e, Ev::Message(c, _) if *c == conn)).count() >= n
    });
    messages_of(rec, conn)
}

fn my_creds() -> String {
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    format!("unix:pid={},uid={uid},gid={gid}", std::process::id())
}

// ---------------------------------------------------------------- files and sockets

/// A fresh directory under the temp dir, removed at drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "tf-reach-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unix_addr(p: &Path) -> String {
    format!("unix:{}", p.display())
}

fn abstract_name(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("tf-reach-{}-{tag}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn unix_connect(p: &Path) -> UnixStream {
    let s = UnixStream::connect(p).unwrap_or_else(|e| panic!("connect {}: {e}", p.display()));
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

fn abstract_connect(name: &str) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let s = UnixStream::connect_addr(&a)?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    Ok(s)
}

fn file_id(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: stat is plain old data; fstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is writable.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

fn lstat_mode(p: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| m.mode())
}

fn is_socket_file(p: &Path) -> bool {
    lstat_mode(p).is_some_and(|m| m & libc::S_IFMT == libc::S_IFSOCK)
}

/// A free TCP port on 127.0.0.1 with nothing listening on it.
fn refused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A loopback listener whose accept queue is full (listen backlog 0, filled by
/// connections nobody accepts): a new connect gets no answer (its SYN is
/// dropped) until `release` accepts the fillers.
struct FullBacklog {
    listener: TcpListener,
    fillers: Vec<TcpStream>,
    addr: SocketAddr,
}

impl FullBacklog {
    fn new() -> FullBacklog {
        // SAFETY: plain socket calls on a descriptor owned here; sockaddr_in is initialised.
        let listener = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let mut sa: libc::sockaddr_in = std::mem::zeroed();
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr = libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be() };
            let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
            assert_eq!(libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len), 0);
            assert_eq!(libc::listen(fd, 0), 0);
            TcpListener::from_raw_fd(fd)
        };
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        while let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            fillers.push(s);
            assert!(fillers.len() < 64, "the accept queue never filled");
        }
        FullBacklog { listener, fillers, addr }
    }

    fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Accepts the fillers: the next SYN retransmission is answered.
    fn release(&mut self) {
        for _ in 0..self.fillers.len() {
            self.accept_one().expect("accept a filler");
        }
        self.fillers.clear();
    }

    /// Accepts the next connection, waiting at most `WAIT`.
    fn accept_one(&self) -> Option<TcpStream> {
        let mut p = libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: p is a live pollfd.
        if unsafe { libc::poll(&mut p, 1, WAIT.as_millis() as i32) } != 1 {
            return None;
        }
        let (s, _) = self.listener.accept().ok()?;
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        Some(s)
    }
}

// ================================================================ framing

/// Every format echoes payloads up to its limit (min(max frame, what the prefix
/// can say)); tf_send of one byte more is TF_ERR_TOO_LARGE; a peer announcing
/// more is closed with TF_CLOSE_TOO_LARGE, without its payload being read.
#[test]
fn every_prefix_format_echoes_its_largest_payload_and_refuses_one_byte_more() {
    for fmt in Fmt::all() {
        let small = match fmt.width {
            1 => 100,
            2 => 1000,
            _ => 70_000,
        };
        for max_frame in [None, Some(small)] {
            let limit = fmt.limit(max_frame.unwrap_or(DEFAULT_MAX_FRAME));
            let what = format!("{fmt:?} max_frame {max_frame:?} (limit {limit})");
            let srv = echo_server("127.0.0.1:0", fmt, max_frame);
            let (mut s, id) = srv.connect_id();
            let mut sizes = vec![0u64, 1, 2];
            if limit <= 1 << 20 {
                sizes.extend([limit - 1, limit]);
            }
            for (i, len) in sizes.into_iter().enumerate() {
                let p = pattern(len as usize, i as u8);
                s.write_all(&fmt.encode(&p)).unwrap();
                assert_eq!(fmt.read(&mut s).as_deref(), Some(&p[..]), "{what}: echo of {len} bytes");
            }
            // tf_send at the limit, and one byte over it.
            let big = pattern(limit as usize + 1, 9);
            assert_eq!(send(srv.srv, id, &big), TF_ERR_TOO_LARGE, "{what}: tf_send of limit + 1");
            assert!(!last_error().is_empty());
            assert_eq!(
                send(srv.srv, id, &big[..limit as usize]),
                TF_OK,
                "{what}: tf_send of limit: {}",
                last_error()
            );
            assert_eq!(fmt.read(&mut s).as_deref(), Some(&big[..limit as usize]), "{what}: tf_send of limit");
            if limit < fmt.cap() {
                // A peer announcing more than the limit: one more, and the most the prefix holds.
                for announced in [limit + 1, fmt.cap()] {
                    let (mut bad, bad_id) = srv.connect_id();
                    bad.write_all(&fmt.prefix(announced)).unwrap();
                    assert!(sees_eof(&mut bad), "{what}: announcing {announced}: still open");
                    assert_eq!(
                        srv.rec().wait_close(bad_id),
                        TF_CLOSE_TOO_LARGE,
                        "{what}: announcing {announced}"
                    );
                }
                assert_eq!(stats(srv.srv).closed_too_large, 2, "{what}");
            } else {
                assert_eq!(limit, fmt.cap());
            }
            // The first connection was unharmed.
            s.write_all(&fmt.encode(b"still here")).unwrap();
            assert_eq!(fmt.read(&mut s).as_deref(), Some(&b"still here"[..]), "{what}");
        }
    }
}

/// API.md's formula at the two ends of the byte widths: 255 / 254 and 65535 / 65533.
#[test]
fn the_largest_payload_is_what_the_prefix_can_say() {
    let cases = [
        (1, 0, 255u64),
        (1, TF_PREFIX_BIG_ENDIAN, 255),
        (1, TF_PREFIX_INCLUDES_ITSELF, 254),
        (2, TF_PREFIX_BIG_ENDIAN, 65_535),
        (2, TF_PREFIX_INCLUDES_ITSELF, 65_533),
        (2, TF_PREFIX_BIG_ENDIAN | TF_PREFIX_INCLUDES_ITSELF, 65_533),
    ];
    for (width, flags, want) in cases {
        let fmt = Fmt { width, flags };
        assert_eq!(fmt.cap(), want);
        let srv = echo_server("127.0.0.1:0", fmt, None);
        let (mut s, id) = srv.connect_id();
        let p = pattern(want as usize + 1, 3);
        assert_eq!(send(srv.srv, id, &p), TF_ERR_TOO_LARGE, "{fmt:?}");
        assert_eq!(send(srv.srv, id, &p[..want as usize]), TF_OK, "{fmt:?}");
        assert_eq!(fmt.read(&mut s).map(|v| v.len() as u64), Some(want), "{fmt:?}");
    }
}

/// A read-only, never-touched mapping of `len` bytes (the kernel's zero page):
/// a valid `data` for tf_send calls that must be refused before any copy.
struct Huge {
    ptr: *mut c_void,
    len: usize,
}

impl Huge {
    fn new(len: usize) -> Huge {
        // SAFETY: an anonymous private mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap {len}: {}", std::io::Error::last_os_error());
        Huge { ptr, len }
    }
}

impl Drop for Huge {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new().
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// With max frame at its top (2^32 - 1), the 4- and 8-byte prefixes' limits:
/// one byte over is TF_ERR_TOO_LARGE, the limit itself only TF_ERR_FULL (the
/// 16 MiB output limit; nothing copied).
#[test]
fn four_and_eight_byte_prefixes_at_the_top_of_max_frame() {
    let huge = Huge::new((1usize << 32) + 8);
    for fmt in Fmt::all().into_iter().filter(|f| f.width >= 4) {
        let limit = fmt.limit(u32::MAX);
        let want = if fmt.width == 4 && fmt.inc() { (1u64 << 32) - 5 } else { (1u64 << 32) - 1 };
        assert_eq!(limit, want, "{fmt:?}");
        let srv = echo_server("127.0.0.1:0", fmt, Some(u32::MAX));
        let (mut s, id) = srv.connect_id();
        // SAFETY: huge.ptr has huge.len readable bytes.
        let rc = unsafe { tf_send(srv.srv, id, huge.ptr as *const u8, limit as usize + 1) };
        assert_eq!(rc, TF_ERR_TOO_LARGE, "{fmt:?}: limit + 1");
        // SAFETY: as above.
        let rc = unsafe { tf_send(srv.srv, id, huge.ptr as *const u8, limit as usize) };
        assert_eq!(rc, TF_ERR_FULL, "{fmt:?}: the limit itself is not too large: {}", last_error());
        s.write_all(&fmt.encode(b"ok")).unwrap();
        assert_eq!(fmt.read(&mut s).as_deref(), Some(&b"ok"[..]), "{fmt:?}");
    }
}

/// A small stream of frames written one byte at a time, then cut in two at
/// every byte, comes back whole and in order in every format.
#[test]
fn every_prefix_format_reassembles_a_stream_split_at_every_byte() {
    for fmt in Fmt::all() {
        let srv = echo_server("127.0.0.1:0", fmt, None);
        let (mut s, id) = srv.connect_id();
        let payloads: Vec<Vec<u8>> = [0usize, 1, 2, 3, 7, 20].iter().map(|&n| pattern(n, n as u8)).collect();
        let stream: Vec<u8> = payloads.iter().flat_map(|p| fmt.encode(p)).collect();
        // One byte per write (TCP_NODELAY: one segment each).
        for b in &stream {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
        for p in &payloads {
            assert_eq!(fmt.read(&mut s).as_ref(), Some(p), "{fmt:?}: byte at a time");
        }
        // Two writes, cut at every byte.
        for cut in 1..stream.len() {
            s.write_all(&stream[..cut]).unwrap();
            std::thread::sleep(Duration::from_micros(300));
            s.write_all(&stream[cut..]).unwrap();
            for p in &payloads {
                assert_eq!(fmt.read(&mut s).as_ref(), Some(p), "{fmt:?}: cut at {cut}");
            }
        }
        let n = payloads.len() * stream.len();
        let got = wait_messages(srv.rec(), id, n);
        assert_eq!(got.len(), n, "{fmt:?}: exactly the frames sent were delivered");
        assert!(got.chunks(payloads.len()).all(|c| c == &payloads[..]), "{fmt:?}");
    }
}

/// With TF_PREFIX_INCLUDES_ITSELF a value below the width is impossible:
/// the frames before it are delivered, then TF_CLOSE_PROTOCOL and nothing
/// more; the width itself is an empty frame.
#[test]
fn impossible_lengths_close_with_protocol() {
    for fmt in Fmt::all().into_iter().filter(|f| f.inc()) {
        let srv = echo_server("127.0.0.1:0", fmt, None);
        for value in 0..fmt.width as u64 {
            let (mut s, id) = srv.connect_id();
            let mut wire = fmt.encode(b"before");
            wire.extend(fmt.raw_prefix(value));
            wire.extend(fmt.encode(b"after"));
            s.write_all(&wire).unwrap();
            // (The echo of "before" may or may not be written before the close.)
            assert!(sees_eof(&mut s), "{fmt:?} value {value}: still open");
            assert_eq!(srv.rec().wait_close(id), TF_CLOSE_PROTOCOL, "{fmt:?} value {value}");
            assert_eq!(messages_of(srv.rec(), id), vec![b"before".to_vec()], "{fmt:?}: nothing after");
        }
        let mut s = srv.connect();
        s.write_all(&fmt.raw_prefix(fmt.width as u64)).unwrap();
        assert_eq!(fmt.read(&mut s), Some(Vec::new()), "{fmt:?}: the width alone is an empty frame");
    }
    // Without the flag, 0 is an empty frame in every width.
    for fmt in Fmt::all().into_iter().filter(|f| !f.inc()) {
        let srv = echo_server("127.0.0.1:0", fmt, None);
        let mut s = srv.connect();
        s.write_all(&fmt.raw_prefix(0)).unwrap();
        assert_eq!(fmt.read(&mut s), Some(Vec::new()), "{fmt:?}");
    }
}

/// The big-endian prefixes are really big-endian on the wire (and the
/// little-endian ones little-endian): bytes checked, not just round trips.
#[test]
fn prefix_bytes_on_the_wire() {
    let cases: [(u32, u32, &[u8]); 6] = [
        (2, TF_PREFIX_BIG_ENDIAN, &[0x01, 0x02]),
        (2, 0, &[0x02, 0x01]),
        (4, TF_PREFIX_BIG_ENDIAN, &[0, 0, 0x01, 0x02]),
        (4, TF_PREFIX_BIG_ENDIAN | TF_PREFIX_INCLUDES_ITSELF, &[0, 0, 0x01, 0x06]),
        (8, TF_PREFIX_BIG_ENDIAN, &[0, 0, 0, 0, 0, 0, 0x01, 0x02]),
        (8, TF_PREFIX_INCLUDES_ITSELF, &[0x0a, 0x01, 0, 0, 0, 0, 0, 0]),
    ];
    for (width, flags, want) in cases {
        let fmt = Fmt { width: width as usize, flags };
        let srv = echo_server("127.0.0.1:0", fmt, None);
        let (mut s, id) = srv.connect_id();
        let p = pattern(0x0102, 1);
        assert_eq!(send(srv.srv, id, &p), TF_OK);
        let mut got = vec![0u8; want.len() + p.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got[..want.len()], want, "{fmt:?}");
        assert_eq!(&got[want.len()..], &p[..]);
    }
}

#[test]
fn setters_validate_their_arguments() {
    let cfg = tf_config_new();
    // SAFETY: cfg is live until freed below; NULL is allowed to be passed.
    unsafe {
        for width in [1, 2, 4, 8] {
            for flags in 0..4 {
                assert_eq!(tf_config_set_prefix(cfg, width, flags), TF_OK, "{width} {flags}");
            }
        }
        for width in [0, 3, 5, 6, 7, 9, 16, 32, 64, u32::MAX] {
            assert_eq!(tf_config_set_prefix(cfg, width, 0), TF_ERR_INVALID, "width {width}");
            assert!(!last_error().is_empty());
        }
        for flags in [4, 8, 5, 0x100, 0x8000_0000, u32::MAX] {
            assert_eq!(tf_config_set_prefix(cfg, 2, flags), TF_ERR_INVALID, "flags {flags:#x}");
        }
        assert_eq!(tf_config_set_prefix(std::ptr::null_mut(), 2, 0), TF_ERR_INVALID);
        for mode in [0, 0o600, 0o660, 0o666, 0o777] {
            assert_eq!(tf_config_set_unix_mode(cfg, mode), TF_OK, "mode {mode:o}");
        }
        for mode in [0o1000, 0o1777, 0o4755, 0o7777, u32::MAX] {
            assert_eq!(tf_config_set_unix_mode(cfg, mode), TF_ERR_INVALID, "mode {mode:o}");
        }
        assert_eq!(tf_config_set_unix_mode(std::ptr::null_mut(), 0o600), TF_ERR_INVALID);
        assert_eq!(tf_config_set_connect_timeout_ms(cfg, 0), TF_ERR_INVALID);
        for ms in [1, 300, 10_000, u32::MAX] {
            assert_eq!(tf_config_set_connect_timeout_ms(cfg, ms), TF_OK);
        }
        assert_eq!(tf_config_set_connect_timeout_ms(std::ptr::null_mut(), 1), TF_ERR_INVALID);
        let path107 = format!("unix:/{}", "a".repeat(106));
        let path108 = format!("unix:/{}", "a".repeat(107));
        let abs107 = format!("unix:@{}", "b".repeat(107));
        let abs108 = format!("unix:@{}", "b".repeat(108));
        for good in ["unix:/tmp/x.sock", "unix:@x", "fd:0", "fd:3", "none", path107.as_str(), abs107.as_str()]
        {
            let a = CString::new(good).unwrap();
            assert_eq!(tf_config_set_address(cfg, a.as_ptr()), TF_OK, "{good}");
        }
        for bad in [
            "unix:",
            "unix:@",
            "fd:",
            "fd:-1",
            "fd:x",
            "fd:3x",
            "None",
            "localhost:80",
            "example.test:53",
            path108.as_str(),
            abs108.as_str(),
        ] {
            let a = CString::new(bad).unwrap();
            assert_eq!(tf_config_set_address(cfg, a.as_ptr()), TF_ERR_INVALID, "{bad}");
        }
        tf_config_free(cfg);
    }
    // A refused setter leaves the configuration as it was: still 2-byte big-endian.
    let fmt = Fmt { width: 2, flags: TF_PREFIX_BIG_ENDIAN };
    let srv = HookServer::start_any(opts("127.0.0.1:0"), echo_hooks(), |cfg| {
        fmt.set(cfg);
        // SAFETY: cfg is live.
        unsafe {
            assert_eq!(tf_config_set_prefix(cfg, 3, 0), TF_ERR_INVALID);
            assert_eq!(tf_config_set_prefix(cfg, 4, 4), TF_ERR_INVALID);
        }
    });
    let mut s = srv.connect();
    s.write_all(&fmt.encode(b"kept")).unwrap();
    assert_eq!(fmt.read(&mut s).as_deref(), Some(&b"kept"[..]));
}

// ================================================================ Unix sockets

#[test]
fn unix_path_socket_echoes_and_names_the_peer_by_its_credentials() {
    let dir = TempDir::new("path");
    let path = dir.path("echo.sock");
    let fmt = Fmt { width: 2, flags: TF_PREFIX_BIG_ENDIAN };
    let srv = echo_server(&unix_addr(&path), fmt, None);
    assert_eq!(srv.port, 0, "tf_server_port is 0 for a Unix socket");
    assert!(is_socket_file(&path));
    let mut s = unix_connect(&path);
    for p in [&b"over unix"[..], b"", &pattern(5000, 2)] {
        s.write_all(&fmt.encode(p)).unwrap();
        assert_eq!(fmt.read(&mut s).as_deref(), Some(p));
    }
    let ids = srv.rec().wait_connect(1);
    assert_eq!(ev_connect_of(srv.rec(), ids[0]).unwrap(), my_creds());
    assert_eq!(peer_of(&info(srv.srv, ids[0]).unwrap()), my_creds());
    assert_eq!(stats(srv.srv).connections_accepted, 1);
    // A second server on the same live path: TF_ERR_IO, and ours is untouched.
    let (rc, msg) = start_rc(&unix_addr(&path), |_| {});
    assert_eq!(rc, TF_ERR_IO, "{msg}");
    s.write_all(&fmt.encode(b"after")).unwrap();
    assert_eq!(fmt.read(&mut s).as_deref(), Some(&b"after"[..]));
    assert_eq!(stop(&srv), TF_OK);
    assert!(sees_eof(&mut s));
    assert!(lstat_mode(&path).is_none(), "the socket file is removed at stop");
}

#[test]
fn abstract_unix_socket_echoes_and_leaves_no_file() {
    let name = abstract_name("abs");
    let srv = echo_server(&format!("unix:@{name}"), Fmt { width: 4, flags: 0 }, None);
    assert_eq!(srv.port, 0);
    let mut s = abstract_connect(&name).unwrap();
    write_frame_any(&mut s, b"abstract");
    assert_eq!(Fmt { width: 4, flags: 0 }.read(&mut s).as_deref(), Some(&b"abstract"[..]));
    let ids = srv.rec().wait_connect(1);
    assert_eq!(ev_connect_of(srv.rec(), ids[0]).unwrap(), my_creds());
    let (rc, msg) = start_rc(&format!("unix:@{name}"), |_| {});
    assert_eq!(rc, TF_ERR_IO, "the name is taken: {msg}");
    assert_eq!(stop(&srv), TF_OK);
    // Released at stop: connecting is refused and a new server can take the name.
    assert!(abstract_connect(&name).is_err());
    let again = echo_server(&format!("unix:@{name}"), Fmt { width: 4, flags: 0 }, None);
    let mut s = abstract_connect(&name).unwrap();
    write_frame_any(&mut s, b"again");
    assert_eq!(Fmt { width: 4, flags: 0 }.read(&mut s).as_deref(), Some(&b"again"[..]));
    drop(again);
}

/// The longest abstract name the contract allows (107 bytes) listens and
/// is reached, by a peer and by tf_connect's address parser alike.
#[test]
fn a_107_byte_abstract_name_listens_and_echoes() {
    let mut name = abstract_name("long");
    name.push_str(&"n".repeat(107 - name.len()));
    let srv = echo_server(&format!("unix:@{name}"), Fmt { width: 4, flags: 0 }, None);
    let mut s = abstract_connect(&name).unwrap();
    write_frame_any(&mut s, b"107");
    assert_eq!(Fmt { width: 4, flags: 0 }.read(&mut s).as_deref(), Some(&b"107"[..]));
    drop(srv);
}

fn write_frame_any(s: &mut impl Write, payload: &[u8]) {
    s.write_all(&frame(payload)).unwrap();
}

#[test]
fn unix_mode_is_applied_to_the_socket_file() {
    let dir = TempDir::new("mode");
    for mode in [0o600, 0o640, 0o660, 0o666, 0o700, 0o777] {
        let path = dir.path(&format!("m{mode:o}.sock"));
        let srv = HookServer::start_any(opts(&unix_addr(&path)), echo_hooks(), |cfg| {
            // SAFETY: cfg is live.
            assert_eq!(unsafe { tf_config_set_unix_mode(cfg, mode) }, TF_OK);
        });
        let m = lstat_mode(&path).expect("socket file");
        assert_eq!(m & libc::S_IFMT, libc::S_IFSOCK);
        assert_eq!(m & 0o7777, mode, "mode {mode:o}, file has {:o}", m & 0o7777);
        let mut s = unix_connect(&path);
        write_frame_any(&mut s, b"m");
        assert_eq!(read_any(&mut s).as_deref(), Some(&b"m"[..]));
        drop(srv);
        assert!(lstat_mode(&path).is_none());
    }
}

fn read_any(s: &mut impl Read) -> Option<Vec<u8>> {
    Fmt { width: 4, flags: 0 }.read(s)
}

/// The small client run as another user: connects to a Unix socket, sends the
/// frame "who" and prints what happened ("error:ERRNO", "reply:TEXT", "eof"),
/// after its own credentials ("me:pid=..,uid=..,gid=..").
const NOBODY_CLIENT: &str = r#"
import os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("error:%d" % e.errno); sys.exit(0)
print("me:pid=%d,uid=%d,gid=%d" % (os.getpid(), os.getuid(), os.getgid()), flush=True)
def exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b
try:
    s.sendall(struct.pack("<I", 3) + b"who")
    (n,) = struct.unpack("<I", exact(4))
    print("reply:" + exact(n).decode())
except (OSError, EOFError):
    print("eof")
"#;

/// How to run a program as uid/gid 65534, or why not.
fn as_nobody() -> Result<Vec<String>, String> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: cannot switch to another uid".into());
    }
    if !Path::new("/usr/bin/python3").exists() {
        return Err("/usr/bin/python3 (the client run as nobody) is missing".into());
    }
    let have = |p: &str| Path::new(p).exists();
    if have("/usr/bin/setpriv") || have("/bin/setpriv") {
        return Ok(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            .map(String::from)
            .to_vec());
    }
    if have("/usr/sbin/runuser") || have("/sbin/runuser") {
        return Ok(["runuser", "-u", "nobody", "--"].map(String::from).to_vec());
    }
    Err("neither setpriv nor runuser is installed".into())
}

fn run_as_nobody(prefix: &[String], path: &Path) -> (u32, String) {
    let child = Command::new(&prefix[0])
        .args(&prefix[1..])
        .args(["/usr/bin/python3", "-I", "-c", NOBODY_CLIENT])
        .arg(path)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the client as nobody");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "client as nobody: {text} {}", String::from_utf8_lossy(&out.stderr));
    (pid, text)
}

/// A client running as uid 65534 is refused by an on_connect that checks the
/// uid in the peer text, and served once allowed; with mode 0600 it cannot
/// even connect (the kernel checks the file's permission).
#[test]
fn another_uid_is_refused_or_accepted_as_on_connect_decides() {
    let prefix = match as_nobody() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIPPED another_uid_is_refused_or_accepted_as_on_connect_decides: {why}");
            return;
        }
    };
    let dir = TempDir::new("uid");
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let path = dir.path("gate.sock");
    let allow_nobody = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (allow, seen2) = (allow_nobody.clone(), seen.clone());
    let hooks = Hooks {
        on_connect: Some(Box::new(move |srv, conn| {
            let peer = info(srv, conn).map(|i| peer_of(&i)).unwrap_or_default();
            seen2.lock().unwrap().push(peer.clone());
            let nobody = peer.contains(",uid=65534,");
            (nobody && !allow.load(Ordering::SeqCst)) as i32
        })),
        ..echo_hooks()
    };
    let srv = HookServer::start_any(opts(&unix_addr(&path)), hooks, |cfg| {
        // SAFETY: cfg is live.
        assert_eq!(unsafe { tf_config_set_unix_mode(cfg, 0o666) }, TF_OK);
    });

    let (pid, out) = run_as_nobody(&prefix, &path);
    let want = format!("unix:pid={pid},uid=65534,gid=65534");
    assert!(out.contains(&format!("me:pid={pid},uid=65534,gid=65534")), "{out}");
    assert!(out.contains("eof") && !out.contains("reply:"), "refused: {out}");
    assert_eq!(seen.lock().unwrap().as_slice(), [want], "on_connect saw the kernel's credentials");
    assert!(srv.rec().connects().is_empty());
    assert_eq!(stats(srv.srv).connections_rejected, 1);

    allow_nobody.store(true, Ordering::SeqCst);
    let (pid, out) = run_as_nobody(&prefix, &path);
    assert!(out.contains("reply:who"), "accepted: {out}");
    let ids = srv.rec().wait_connect(1);
    assert_eq!(ev_connect_of(srv.rec(), ids[0]).unwrap(), format!("unix:pid={pid},uid=65534,gid=65534"));

    // Our own uid is accepted all along.
    let mut s = unix_connect(&path);
    write_frame_any(&mut s, b"root");
    assert_eq!(read_any(&mut s).as_deref(), Some(&b"root"[..]));
    drop(srv);

    // Mode 0600: the kernel refuses another uid's connect (EACCES) before the library sees it.
    let srv = HookServer::start_any(opts(&unix_addr(&path)), echo_hooks(), |cfg| {
        // SAFETY: cfg is live.
        assert_eq!(unsafe { tf_config_set_unix_mode(cfg, 0o600) }, TF_OK);
    });
    let (_, out) = run_as_nobody(&prefix, &path);
    assert!(out.contains(&format!("error:{}", libc::EACCES)), "mode 0600: {out}");
    assert_eq!(stats(srv.srv).connections_rejected + stats(srv.srv).connections_accepted, 0);
}

#[test]
fn a_socket_file_left_by_a_dead_listener_is_replaced() {
    let dir = TempDir::new("stale");
    let path = dir.path("stale.sock");
    drop(UnixListener::bind(&path).unwrap()); // the file stays, nobody listens
    assert!(is_socket_file(&path));
    let srv = echo_server(&unix_addr(&path), Fmt { width: 4, flags: 0 }, None);
    assert!(is_socket_file(&path));
    let mut s = unix_connect(&path);
    write_frame_any(&mut s, b"fresh");
    assert_eq!(read_any(&mut s).as_deref(), Some(&b"fresh"[..]));
    drop(srv);
    assert!(lstat_mode(&path).is_none());
}

#[test]
fn a_live_socket_and_other_files_are_never_replaced() {
    let dir = TempDir::new("keep");
    // A live listener (not ours).
    let live = dir.path("live.sock");
    let l = UnixListener::bind(&live).unwrap();
    let (rc, msg) = start_rc(&unix_addr(&live), |_| {});
    assert_eq!(rc, TF_ERR_IO, "{msg}");
    assert!(!msg.is_empty());
    assert!(is_socket_file(&live));
    let _c = UnixStream::connect(&live).expect("the other listener still has its file");
    l.set_nonblocking(false).unwrap();
    let (_a, _) = l.accept().unwrap();
    // A regular file, a directory, a FIFO, a symlink to a dead socket.
    let file = dir.path("file.sock");
    std::fs::write(&file, b"precious").unwrap();
    let sub = dir.path("dir.sock");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("inside"), b"x").unwrap();
    let fifo = dir.path("fifo.sock");
    let cf = CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: cf is NUL-terminated.
    assert_eq!(unsafe { libc::mkfifo(cf.as_ptr(), 0o600) }, 0);
    let dead = dir.path("dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    let link = dir.path("link.sock");
    std::os::unix::fs::symlink(&dead, &link).unwrap();
    for p in [&file, &sub, &fifo, &link] {
        let mode = lstat_mode(p).unwrap();
        let (rc, msg) = start_rc(&unix_addr(p), |_| {});
        assert_eq!(rc, TF_ERR_IO, "{}: {msg}", p.display());
        assert_eq!(lstat_mode(p), Some(mode), "{} left as it was", p.display());
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    assert_eq!(std::fs::read(sub.join("inside")).unwrap(), b"x");
    assert!(is_socket_file(&dead), "the symlink's target is not touched either");
}

#[test]
fn the_socket_file_is_removed_at_stop_and_drain_but_only_ours() {
    let dir = TempDir::new("rm");
    let path = dir.path("ours.sock");
    let srv = echo_server(&unix_addr(&path), Fmt { width: 4, flags: 0 }, None);
    assert!(is_socket_file(&path));
    assert_eq!(stop(&srv), TF_OK);
    assert!(lstat_mode(&path).is_none(), "removed at stop");
    drop(srv);

    // tf_server_drain removes it too, and open connections go on.
    let srv = echo_server(&unix_addr(&path), Fmt { width: 4, flags: 0 }, None);
    let mut s = unix_connect(&path);
    srv.rec().wait_connect(1); // accepted: drain does not drop it
                               // SAFETY: srv is live.
    assert_eq!(unsafe { tf_server_drain(srv.srv) }, TF_OK);
    assert!(lstat_mode(&path).is_none(), "removed at drain");
    write_frame_any(&mut s, b"served on");
    assert_eq!(read_any(&mut s).as_deref(), Some(&b"served on"[..]));
    drop(srv);

    // Someone replaced the file after the start: stop leaves theirs alone.
    let srv = echo_server(&unix_addr(&path), Fmt { width: 4, flags: 0 }, None);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"not yours").unwrap();
    assert_eq!(stop(&srv), TF_OK);
    assert_eq!(std::fs::read(&path).unwrap(), b"not yours");
}

// ================================================================ fd:N

/// Not a test of its own: the child process of
/// `fd_n_inherited_from_a_parent_process` (run only with TF_REACH_FD_CHILD set).
/// Serves the inherited descriptor until "stop" on stdin, then says whether
/// the descriptor was closed by tf_server_stop.
#[test]
fn zz_fd_child() {
    let Ok(n) = std::env::var("TF_REACH_FD_CHILD") else { return };
    let fd: RawFd = n.parse().unwrap();
    let srv = HookServer::start_any(opts(&format!("fd:{fd}")), echo_hooks(), |_| {});
    println!("child: port={}", srv.port);
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let peers: Vec<String> = srv
        .rec()
        .snapshot()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Connect(_, p) => Some(p),
            _ => None,
        })
        .collect();
    println!("child: peers={}", peers.join(" "));
    println!("child: stop={}", stop(&srv));
    // SAFETY: fcntl on a descriptor number; -1 (EBADF) once it is closed.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    println!("child: fd_open={open}");
}

/// Starts this test binary's zz_fd_child with `listener` as descriptor 3;
/// returns it and a channel of its "child:" lines.
fn spawn_fd_child(listener: RawFd) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["zz_fd_child", "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env("TF_REACH_FD_CHILD", "3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if listener == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(listener, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn the fd:N child");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("child: ") {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    (child, rx)
}

fn child_line(rx: &mpsc::Receiver<String>, key: &str) -> String {
    let line = rx.recv_timeout(WAIT * 3).unwrap_or_else(|_| panic!("no '{key}' line from the child"));
    line.strip_prefix(&format!("{key}=")).unwrap_or_else(|| panic!("want {key}=..., got {line}")).to_string()
}

fn finish_fd_child(mut child: std::process::Child, rx: &mpsc::Receiver<String>) -> String {
    child.stdin.take().unwrap().write_all(b"stop\n").unwrap();
    let peers = child_line(rx, "peers");
    assert_eq!(child_line(rx, "stop"), TF_OK.to_string());
    assert_eq!(child_line(rx, "fd_open"), "false", "the server closes the descriptor it owns at stop");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "child exit {st}");
            break;
        }
        assert!(Instant::now() < deadline, "the child did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    peers
}

/// A parent binds and listens, a child process serves that descriptor with
/// "fd:3" (socket activation): TCP; the child reports the listener's port.
#[test]
fn fd_n_tcp_listener_inherited_from_a_parent_process() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (child, rx) = spawn_fd_child(l.as_raw_fd());
    drop(l); // the child holds the only copy now
    assert_eq!(child_line(&rx, "port"), port.to_string());
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let me = s.local_addr().unwrap();
    write_frame_any(&mut s, b"served by the child");
    assert_eq!(read_any(&mut s).as_deref(), Some(&b"served by the child"[..]));
    assert_eq!(finish_fd_child(child, &rx), me.to_string());
    assert!(sees_eof(&mut s));
    assert!(
        refused_within(SocketAddr::from(([127, 0, 0, 1], port)), WAIT),
        "listener closed with the child's stop"
    );
}

/// The same with a Unix listener: port 0; the credentials are ours; the file
/// is not the server's to remove.
#[test]
fn fd_n_unix_listener_inherited_from_a_parent_process() {
    let dir = TempDir::new("fdn");
    let path = dir.path("activated.sock");
    let l = UnixListener::bind(&path).unwrap();
    let (child, rx) = spawn_fd_child(l.as_raw_fd());
    drop(l);
    assert_eq!(child_line(&rx, "port"), "0");
    let mut s = unix_connect(&path);
    write_frame_any(&mut s, b"unix child");
    assert_eq!(read_any(&mut s).as_deref(), Some(&b"unix child"[..]));
    assert_eq!(finish_fd_child(child, &rx), my_creds());
    assert!(is_socket_file(&path), "fd:N: the server did not create the file and leaves it");
}

/// fd:N in this process: the server takes the descriptor on a successful start.
#[test]
fn fd_n_listener_of_this_process() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let fd = l.into_raw_fd(); // the server's once started
    let srv = echo_server(&format!("fd:{fd}"), Fmt { width: 4, flags: 0 }, None);
    assert_eq!(srv.port, port, "tf_server_port of an inherited TCP listener");
    let mut s = srv.connect();
    write_frame_any(&mut s, b"in process");
    assert_eq!(read_any(&mut s).as_deref(), Some(&b"in process"[..]));
}

/// Anything but a listening stream socket is TF_ERR_INVALID at start and the
/// descriptor is left open, still the caller's.
#[test]
fn fd_n_must_be_a_listening_stream_socket_and_is_left_open_otherwise() {
    let mut fds: Vec<(&str, RawFd)> = Vec::new();
    // SAFETY: plain socket calls; each descriptor is closed at the end.
    unsafe {
        let t = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr = libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be() };
        assert_eq!(
            libc::bind(t, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32),
            0
        );
        fds.push(("bound TCP socket, not listening", t));
        fds.push((
            "fresh TCP socket",
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
        ));
        let u = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert_eq!(
            libc::bind(u, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32),
            0
        );
        fds.push(("UDP socket", u));
        let mut sp = [0; 2];
        assert_eq!(
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, sp.as_mut_ptr()),
            0
        );
        fds.push(("connected Unix socket", sp[0]));
        libc::close(sp[1]);
        let mut pp = [0; 2];
        assert_eq!(libc::pipe2(pp.as_mut_ptr(), libc::O_CLOEXEC), 0);
        fds.push(("pipe", pp[0]));
        libc::close(pp[1]);
        fds.push(("/dev/null", std::fs::File::open("/dev/null").unwrap().into_raw_fd()));
    }
    let dg = std::os::unix::net::UnixDatagram::unbound().unwrap();
    fds.push(("Unix datagram socket", dg.as_raw_fd()));
    for (what, fd) in &fds {
        let before = file_id(*fd).unwrap();
        let (rc, msg) = start_rc(&format!("fd:{fd}"), |_| {});
        assert_eq!(rc, TF_ERR_INVALID, "{what}: {msg}");
        assert_eq!(file_id(*fd), Some(before), "{what}: the descriptor is left open");
    }
    for (what, fd) in fds {
        if what != "Unix datagram socket" {
            // SAFETY: opened above, still ours.
            unsafe { libc::close(fd) };
        }
    }
    drop(dg);
    // A number that is not open at all.
    let (rc, msg) = start_rc("fd:1000000", |_| {});
    assert_eq!(rc, TF_ERR_INVALID, "{msg}");
}

// ================================================================ outbound

/// tf_connect to our own listener on the same server (TCP, Unix path,
/// abstract), and from a pure client (address "none"): frames both ways.
#[test]
fn tf_connect_to_our_own_listener_carries_frames_both_ways() {
    let dir = TempDir::new("self");
    let path = dir.path("self.sock");
    let abs = abstract_name("self");
    for listen in ["127.0.0.1:0".to_string(), unix_addr(&path), format!("unix:@{abs}")] {
        // Echo on accepted connections only (an echo on both ends would ping-pong forever).
        let outbound = Arc::new(AtomicU64::new(0));
        let ob = outbound.clone();
        let hooks = Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                if conn != ob.load(Ordering::SeqCst) {
                    assert_eq!(send(srv, conn, data), TF_OK);
                }
            })),
            ..Hooks::default()
        };
        let fmt = Fmt { width: 2, flags: TF_PREFIX_BIG_ENDIAN };
        let srv = HookServer::start_any(opts(&listen), hooks, |cfg| fmt.set(cfg));
        let target =
            if listen.starts_with("127.") { format!("127.0.0.1:{}", srv.port) } else { listen.clone() };
        let out = connect_out(srv.srv, &target);
        outbound.store(out, Ordering::SeqCst);
        assert_eq!(send(srv.srv, out, b"queued at once"), TF_OK);
        let ids = srv.rec().wait_connect(2);
        let inbound = *ids.iter().find(|&&c| c != out).expect("the accepted side");
        assert_eq!(ev_connect_of(srv.rec(), out).unwrap(), target, "outbound peer text");
        let accepted_peer = ev_connect_of(srv.rec(), inbound).unwrap();
        if listen.starts_with("unix:") {
            assert_eq!(accepted_peer, my_creds());
        } else {
            assert!(accepted_peer.starts_with("127.0.0.1:"), "{accepted_peer}");
        }
        assert_eq!(send(srv.srv, out, b"ping"), TF_OK);
        assert_eq!(send(srv.srv, inbound, b"from the accepted side"), TF_OK);
        let got = wait_messages(srv.rec(), out, 3);
        assert!(got.contains(&b"queued at once".to_vec()) && got.contains(&b"ping".to_vec()), "{listen}");
        assert!(got.contains(&b"from the accepted side".to_vec()));
        let i = info(srv.srv, out).unwrap();
        assert_eq!((i.outbound, peer_of(&i)), (1, target.clone()));
        assert_eq!(info(srv.srv, inbound).unwrap().outbound, 0);
        let st = stats(srv.srv);
        assert_eq!(
            (st.connections_active, st.connections_accepted),
            (2, 1),
            "{listen}: outbound never counts as accepted"
        );
        assert_eq!(conn_close(srv.srv, out), TF_OK);
        assert_eq!(srv.rec().wait_close(out), TF_CLOSE_LOCAL);
        assert_eq!(srv.rec().wait_close(inbound), TF_CLOSE_PEER);
    }
}

#[test]
fn a_server_with_address_none_is_a_pure_client() {
    let target = echo_server("127.0.0.1:0", Fmt { width: 4, flags: TF_PREFIX_BIG_ENDIAN }, None);
    let cli = HookServer::start_any(opts("none"), Hooks::default(), |cfg| {
        Fmt { width: 4, flags: TF_PREFIX_BIG_ENDIAN }.set(cfg)
    });
    assert_eq!(cli.port, 0, "tf_server_port is 0 without a listener");
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let id = connect_out(cli.srv, &format!("127.0.0.1:{}", target.port));
        assert_eq!(send(cli.srv, id, &[i; 3]), TF_OK);
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(wait_messages(cli.rec(), *id, 1), vec![vec![i as u8; 3]]);
    }
    let st = stats(cli.srv);
    assert_eq!((st.connections_active, st.connections_accepted), (3, 0));
    assert_eq!(stats(target.srv).connections_accepted, 3);
    assert_eq!(stop(&cli), TF_OK);
    for id in ids {
        assert_eq!(cli.rec().closes_of(id), vec![TF_CLOSE_SHUTDOWN]);
    }
    let (rc, id) = try_connect(cli.srv, &format!("127.0.0.1:{}", target.port));
    assert_eq!((rc, id), (TF_ERR_STOPPED, u64::MAX), "after stop; *out untouched");
}

/// Failing to reach the address is reported by on_close(TF_CLOSE_CONNECT_FAILED),
/// never by the return code, and on_connect never runs.
#[test]
fn unreachable_addresses_fail_through_on_close() {
    let dir = TempDir::new("miss");
    let srv = HookServer::start_any(opts("none"), Hooks::default(), |_| {});
    let dead = dir.path("dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    let targets = [
        format!("127.0.0.1:{}", refused_port()),
        unix_addr(&dir.path("missing.sock")),
        unix_addr(&dead),
        format!("unix:@{}", abstract_name("nobody")),
    ];
    for t in &targets {
        let id = connect_out(srv.srv, t);
        let rc = send(srv.srv, id, b"dropped");
        assert!(rc == TF_OK || rc == TF_ERR_NO_CONN, "{t}: queued, or the connect already failed: {rc}");
        assert_eq!(srv.rec().wait_close(id), TF_CLOSE_CONNECT_FAILED, "{t}");
        assert!(ev_connect_of(srv.rec(), id).is_none(), "{t}: no on_connect");
        assert_eq!(send(srv.srv, id, b"x"), TF_ERR_NO_CONN, "{t}: gone after on_close");
    }
    let st = stats(srv.srv);
    assert_eq!((st.connections_active, st.connections_accepted, st.connections_rejected), (0, 0, 0));
    assert!(!dir.path("missing.sock").exists(), "nothing created by a connect");
}

/// A loopback listener whose backlog is full never answers: the connect
/// timeout (300 ms) ends it with TF_CLOSE_CONNECT_FAILED.
#[test]
fn a_connect_that_gets_no_answer_times_out() {
    let backlog = FullBacklog::new();
    let srv = HookServer::start_any(opts("none"), Hooks::default(), |cfg| {
        // SAFETY: cfg is live.
        assert_eq!(unsafe { tf_config_set_connect_timeout_ms(cfg, 300) }, TF_OK);
    });
    let t0 = Instant::now();
    let id = connect_out(srv.srv, &backlog.addr());
    assert_eq!(send(srv.srv, id, b"never written"), TF_OK);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_CONNECT_FAILED);
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(5), "failed after {took:?}");
    assert!(ev_connect_of(srv.rec(), id).is_none());
    assert_eq!(stats(srv.srv).connections_active, 0);
}

/// Frames sent before the connection is established are queued and written
/// once it is, in order and in the server's prefix format; tf_conn_info says
/// outbound and shows them queued meanwhile.
#[test]
fn frames_sent_before_the_connect_completes_are_written_after_it() {
    let mut backlog = FullBacklog::new();
    let fmt = Fmt { width: 2, flags: TF_PREFIX_BIG_ENDIAN };
    let srv = HookServer::start_any(opts("none"), Hooks::default(), |cfg| fmt.set(cfg));
    let id = connect_out(srv.srv, &backlog.addr());
    let frames: Vec<Vec<u8>> = (0..5).map(|i| pattern(100 * i, i as u8)).collect();
    for f in &frames {
        assert_eq!(send(srv.srv, id, f), TF_OK);
    }
    std::thread::sleep(Duration::from_millis(150));
    assert!(ev_connect_of(srv.rec(), id).is_none(), "not established while the backlog is full");
    let i = info(srv.srv, id).expect("tf_conn_get_info while connecting");
    assert_eq!(i.outbound, 1);
    let encoded: usize = frames.iter().map(|f| 2 + f.len()).sum();
    assert_eq!(i.queued_output, encoded as u64, "everything waits in the queue");
    assert_eq!(stats(srv.srv).connections_active, 0, "not active before it is established");
    backlog.release(); // the SYN retransmission is now answered
    let mut s = backlog.accept_one().expect("our connect arrives");
    for f in &frames {
        assert_eq!(fmt.read(&mut s).as_ref(), Some(f));
    }
    srv.rec().wait_connect(1);
    assert_eq!(ev_connect_of(srv.rec(), id).unwrap(), backlog.addr());
    s.write_all(&fmt.encode(b"reply")).unwrap();
    assert_eq!(wait_messages(srv.rec(), id, 1), vec![b"reply".to_vec()]);
    assert_eq!(stats(srv.srv).connections_active, 1);
    drop(s);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_PEER);
}

/// tf_conn_close before the connection is established abandons it:
/// on_close(TF_CLOSE_LOCAL), no on_connect, nothing written.
#[test]
fn tf_conn_close_before_the_connect_completes_abandons_it() {
    let mut backlog = FullBacklog::new();
    let srv = HookServer::start_any(opts("none"), Hooks::default(), |_| {});
    let id = connect_out(srv.srv, &backlog.addr());
    assert_eq!(send(srv.srv, id, b"never"), TF_OK);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(conn_close(srv.srv, id), TF_OK);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_LOCAL);
    assert_eq!(conn_close(srv.srv, id), TF_ERR_NO_CONN);
    // Abandoned at once, also when closed right after the call.
    let id2 = connect_out(srv.srv, &backlog.addr());
    assert_eq!(conn_close(srv.srv, id2), TF_OK);
    assert_eq!(srv.rec().wait_close(id2), TF_CLOSE_LOCAL);
    backlog.release();
    std::thread::sleep(Duration::from_millis(1500)); // past a SYN retransmission
    assert!(ev_connect_of(srv.rec(), id).is_none() && ev_connect_of(srv.rec(), id2).is_none());
    assert_eq!(srv.rec().closes_of(id), vec![TF_CLOSE_LOCAL], "exactly one on_close");
    let st = stats(srv.srv);
    assert_eq!((st.connections_active, st.frames_sent, st.bytes_sent), (0, 0, 0));
}

/// Connections being established count toward max connections.
#[test]
fn connects_in_progress_count_toward_max_connections() {
    let backlog = FullBacklog::new();
    let srv =
        HookServer::start_any(Opts { max_connections: Some(2), ..opts("none") }, Hooks::default(), |_| {});
    let a = connect_out(srv.srv, &backlog.addr());
    let _b = connect_out(srv.srv, &backlog.addr());
    let (rc, id) = try_connect(srv.srv, &backlog.addr());
    assert_eq!((rc, id), (TF_ERR_FULL, u64::MAX), "{}", last_error());
    assert_eq!(conn_close(srv.srv, a), TF_OK);
    assert_eq!(srv.rec().wait_close(a), TF_CLOSE_LOCAL);
    let c = connect_out(srv.srv, &backlog.addr());
    assert_ne!(c, a);
    // And with a listener: an established outbound connection plus an accepted one fill it.
    let target = echo_server("127.0.0.1:0", Fmt { width: 4, flags: 0 }, None);
    let srv2 = HookServer::start_any(
        Opts { max_connections: Some(2), ..opts("127.0.0.1:0") },
        Hooks::default(),
        |_| {},
    );
    let out = connect_out(srv2.srv, &format!("127.0.0.1:{}", target.port));
    let (_s, _) = srv2.connect_id();
    srv2.rec().wait_connect(2);
    assert!(ev_connect_of(srv2.rec(), out).is_some());
    assert_eq!(try_connect(srv2.srv, &format!("127.0.0.1:{}", target.port)).0, TF_ERR_FULL);
}

#[test]
fn tf_connect_checks_its_arguments() {
    let srv = HookServer::start_any(opts("none"), Hooks::default(), |_| {});
    let long = format!("unix:/{}", "a".repeat(107));
    for bad in [
        "localhost:80",
        "example.test:53",
        "127.0.0.1",
        "[::1]",
        "fd:3",
        "none",
        "unix:",
        "unix:@",
        "",
        "tcp://127.0.0.1:1",
        &long,
    ] {
        let (rc, id) = try_connect(srv.srv, bad);
        assert_eq!(rc, TF_ERR_INVALID, "{bad:?}");
        assert_eq!(id, u64::MAX, "{bad:?}: *out untouched");
        assert!(!last_error().is_empty());
    }
    let a = CString::new(format!("127.0.0.1:{}", refused_port())).unwrap();
    // SAFETY: NULL pointers are what is checked; the others are live.
    unsafe {
        assert_eq!(tf_connect(srv.srv, a.as_ptr(), std::ptr::null_mut()), TF_ERR_INVALID);
        let mut id = 0u64;
        assert_eq!(tf_connect(srv.srv, std::ptr::null(), &mut id), TF_ERR_INVALID);
        assert_eq!(tf_connect(std::ptr::null_mut(), a.as_ptr(), &mut id), TF_ERR_INVALID);
        assert_eq!(id, 0);
    }
    assert!(srv.rec().snapshot().is_empty(), "no connection was made");
}

/// tf_connect from inside a callback (on_connect of an accepted connection), as
/// a relay does, and from another thread.
#[test]
fn tf_connect_works_from_callbacks_and_threads() {
    let target = echo_server("127.0.0.1:0", Fmt { width: 4, flags: 0 }, None);
    let target_addr = format!("127.0.0.1:{}", target.port);
    let made = Arc::new(Mutex::new(Vec::new()));
    let (m, t) = (made.clone(), target_addr.clone());
    let hooks = Hooks {
        on_message: Some(Box::new(move |srv, _conn, data| {
            if data == b"dial" {
                m.lock().unwrap().push(connect_out(srv, &t));
            }
        })),
        ..Hooks::default()
    };
    let srv = HookServer::start_any(opts("127.0.0.1:0"), hooks, |_| {});
    let mut s = srv.connect();
    write_frame_any(&mut s, b"dial");
    srv.rec().wait_connect(2);
    let from_cb = made.lock().unwrap()[0];
    assert_eq!(ev_connect_of(srv.rec(), from_cb).unwrap(), target_addr);
    let p = srv.srv as usize;
    let ta = target_addr.clone();
    let from_thread = std::thread::spawn(move || connect_out(p as *mut tf_server, &ta)).join().unwrap();
    srv.rec().wait_connect(3);
    assert_eq!(send(srv.srv, from_thread, b"thread"), TF_OK);
    assert_eq!(wait_messages(srv.rec(), from_thread, 1), vec![b"thread".to_vec()]);
}

// ---------------------------------------------------------------- pull mode

struct Pull(*mut tf_server);

#[derive(Debug, Clone, PartialEq)]
struct Got {
    kind: i32,
    reason: i32,
    conn: u64,
    data: Vec<u8>,
}

impl Pull {
    fn start(addr: &str) -> Pull {
        let cfg = config(&opts(addr));
        let mut srv = std::ptr::null_mut();
        // SAFETY: cfg and srv are live.
        assert_eq!(unsafe { tf_server_start_pull(cfg, &mut srv) }, TF_OK, "{}", last_error());
        // SAFETY: from tf_config_new.
        unsafe { tf_config_free(cfg) };
        Pull(srv)
    }

    /// Polls until an event matching `pred` arrives (bounded); returns all taken.
    fn until(&self, pred: impl Fn(&Got) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + WAIT;
        let mut all = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "no such event; got {all:?}");
            let mut evs = vec![tf_event { kind: 0, reason: 0, conn: 0, data: std::ptr::null(), len: 0 }; 16];
            let mut n = 0usize;
            // SAFETY: evs has room for 16 events.
            let rc = unsafe { tf_server_poll(self.0, evs.as_mut_ptr(), 16, &mut n, 100) };
            assert_eq!(rc, TF_OK);
            for e in &evs[..n] {
                let data = if e.len == 0 {
                    Vec::new()
                } else {
                    // SAFETY: valid until the next poll; copied now.
                    unsafe { std::slice::from_raw_parts(e.data, e.len) }.to_vec()
                };
                all.push(Got { kind: e.kind, reason: e.reason, conn: e.conn, data });
            }
            if all.iter().any(&pred) {
                return all;
            }
        }
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        // SAFETY: from tf_server_start_pull; freed once.
        unsafe {
            tf_server_stop(self.0, 0);
            tf_server_free(self.0);
        }
    }
}

#[test]
fn outbound_connections_in_pull_mode() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap().to_string();
    let p = Pull::start("none");
    let id = connect_out(p.0, &target);
    assert_eq!(send(p.0, id, b"early"), TF_OK);
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let evs = p.until(|g| g.kind == TF_EVENT_CONNECT);
    assert_eq!(
        evs,
        vec![Got { kind: TF_EVENT_CONNECT, reason: 0, conn: id, data: target.clone().into_bytes() }]
    );
    assert_eq!(read_any(&mut s).as_deref(), Some(&b"early"[..]));
    write_frame_any(&mut s, b"to the pull host");
    let evs = p.until(|g| g.kind == TF_EVENT_MESSAGE);
    assert_eq!(
        evs,
        vec![Got { kind: TF_EVENT_MESSAGE, reason: 0, conn: id, data: b"to the pull host".to_vec() }]
    );
    drop(s);
    let evs = p.until(|g| g.kind == TF_EVENT_CLOSE);
    assert_eq!(evs, vec![Got { kind: TF_EVENT_CLOSE, reason: TF_CLOSE_PEER, conn: id, data: Vec::new() }]);

    // A failed connect: one CLOSE event, reason CONNECT_FAILED, no CONNECT.
    let id = connect_out(p.0, &format!("127.0.0.1:{}", refused_port()));
    let evs = p.until(|g| g.kind == TF_EVENT_CLOSE);
    assert_eq!(
        evs,
        vec![Got { kind: TF_EVENT_CLOSE, reason: TF_CLOSE_CONNECT_FAILED, conn: id, data: Vec::new() }]
    );

    // Closed before it is established.
    let backlog = FullBacklog::new();
    let id = connect_out(p.0, &backlog.addr());
    assert_eq!(conn_close(p.0, id), TF_OK);
    let evs = p.until(|g| g.kind == TF_EVENT_CLOSE);
    assert_eq!(evs, vec![Got { kind: TF_EVENT_CLOSE, reason: TF_CLOSE_LOCAL, conn: id, data: Vec::new() }]);
}

/// Pull mode with a Unix listener: the CONNECT event carries the credentials.
#[test]
fn unix_listener_in_pull_mode() {
    let dir = TempDir::new("pull");
    let path = dir.path("pull.sock");
    let p = Pull::start(&unix_addr(&path));
    assert_eq!(port_of(p.0), 0);
    let mut s = unix_connect(&path);
    write_frame_any(&mut s, b"pulled");
    let evs = p.until(|g| g.kind == TF_EVENT_MESSAGE);
    assert_eq!(evs[0].kind, TF_EVENT_CONNECT);
    assert_eq!(String::from_utf8(evs[0].data.clone()).unwrap(), my_creds());
    assert_eq!(evs[1].data, b"pulled");
    drop(p);
    assert!(lstat_mode(&path).is_none());
}

/// User data attached right after tf_connect is still readable in on_close of
/// a connect that failed (the host frees there what it attached).
#[test]
fn user_data_set_at_tf_connect_reaches_on_close_of_a_failed_connect() {
    let backlog = FullBacklog::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let hooks = Hooks {
        on_close: Some(Box::new(move |srv, conn, reason| {
            // SAFETY: srv is live during its callbacks.
            let p = unsafe { tf_conn_user_data(srv, conn) } as usize;
            s2.lock().unwrap().push((conn, reason, p));
        })),
        ..Hooks::default()
    };
    let srv = HookServer::start_any(opts("none"), hooks, |cfg| {
        // SAFETY: cfg is live.
        assert_eq!(unsafe { tf_config_set_connect_timeout_ms(cfg, 200) }, TF_OK);
    });
    let id = connect_out(srv.srv, &backlog.addr());
    // SAFETY: srv is live; the connect is pending for 200 ms.
    assert_eq!(unsafe { tf_conn_set_user_data(srv.srv, id, 0x1234 as *mut c_void) }, TF_OK);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_CONNECT_FAILED);
    assert_eq!(seen.lock().unwrap().as_slice(), [(id, TF_CLOSE_CONNECT_FAILED, 0x1234)]);
    // SAFETY: srv is live.
    assert!(unsafe { tf_conn_user_data(srv.srv, id) }.is_null(), "NULL once on_close returned");
}

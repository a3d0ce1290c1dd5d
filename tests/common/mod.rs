//! Test harness: drives the library through its `extern "C"` functions, as a
//! C host would, and talks to it over real sockets on 127.0.0.1.
#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
pub use tcpframe::ffi::*;

/// Generous bound for any single wait: tests fail instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// TCPFRAME_TEST_BACKEND=poll|epoll runs the whole suite on one backend.
pub fn backend_from_env() -> i32 {
    match std::env::var("TCPFRAME_TEST_BACKEND").as_deref() {
        Ok("poll") => TF_BACKEND_POLL,
        Ok("epoll") => TF_BACKEND_EPOLL,
        _ => TF_BACKEND_AUTO,
    }
}

/// TCPFRAME_TEST_THREADS=n: loop threads for every test server.
pub fn threads_from_env() -> Option<u32> {
    std::env::var("TCPFRAME_TEST_THREADS").ok().and_then(|v| v.parse().ok())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Connect(u64, String),
    Message(u64, Vec<u8>),
    Close(u64, i32),
}

/// What the callbacks do besides recording.
#[derive(Default)]
pub struct Behaviour {
    pub echo: AtomicBool,
    pub refuse: AtomicBool,
    /// Record message payloads (off for big loads, to save memory).
    pub record_messages: AtomicBool,
    /// Call tf_server_stop from on_message and store its result here.
    pub stop_in_callback: AtomicBool,
    pub stop_result: Mutex<Option<i32>>,
    /// Call tf_conn_close on the sender after each message.
    pub close_after_message: AtomicBool,
    /// Call tf_send(conn, b"hi") from on_connect.
    pub greet: AtomicBool,
    /// From on_close, send b"gone" to this connection (0: off).
    pub notify_on_close: AtomicU64,
    /// From on_message, call tf_server_stop on this other server (NULL: off).
    pub stop_other: AtomicPtr<tf_server>,
    pub stop_other_result: Mutex<Option<i32>>,
    /// Sleep this long in on_message.
    pub sleep_in_message_ms: AtomicU64,
    /// connections_active as seen from inside each on_connect.
    pub active_in_connect: Mutex<Vec<u64>>,
}

pub struct Recorder {
    pub events: Mutex<Vec<Ev>>,
    pub changed: Condvar,
    pub srv: AtomicPtr<tf_server>,
    pub behaviour: Behaviour,
    pub messages: AtomicU64,
    pub closes: AtomicU64,
    pub stats_at_close: Mutex<Vec<tf_stats>>,
}

impl Recorder {
    pub fn empty() -> Recorder {
        Recorder {
            events: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            srv: AtomicPtr::new(std::ptr::null_mut()),
            behaviour: Behaviour::default(),
            messages: AtomicU64::new(0),
            closes: AtomicU64::new(0),
            stats_at_close: Mutex::new(Vec::new()),
        }
    }

    fn push(&self, ev: Ev) {
        self.events.lock().unwrap().push(ev);
        self.changed.notify_all();
    }

    /// Waits until `pred` holds over the events, or panics after WAIT.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&[Ev]) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut evs = self.events.lock().unwrap();
        while !pred(&evs) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}; events: {:?}", short(&evs));
            evs = self.changed.wait_timeout(evs, left).unwrap().0;
        }
    }

    pub fn snapshot(&self) -> Vec<Ev> {
        self.events.lock().unwrap().clone()
    }

    pub fn connects(&self) -> Vec<u64> {
        self.snapshot()
            .into_iter()
            .filter_map(|e| if let Ev::Connect(c, _) = e { Some(c) } else { None })
            .collect()
    }

    pub fn closes_of(&self, conn: u64) -> Vec<i32> {
        self.snapshot()
            .into_iter()
            .filter_map(|e| if let Ev::Close(c, r) = e { (c == conn).then_some(r) } else { None })
            .collect()
    }

    /// Waits for the close of `conn` and returns its reason.
    pub fn wait_close(&self, conn: u64) -> i32 {
        self.wait_for("on_close", |e| e.iter().any(|e| matches!(e, Ev::Close(c, _) if *c == conn)));
        self.closes_of(conn)[0]
    }

    pub fn wait_connect(&self, n: usize) -> Vec<u64> {
        self.wait_for("on_connect", |e| e.iter().filter(|e| matches!(e, Ev::Connect(..))).count() >= n);
        self.connects()
    }
}

fn short(evs: &[Ev]) -> Vec<String> {
    evs.iter()
        .rev()
        .take(20)
        .map(|e| match e {
            Ev::Message(c, d) => format!("Message({c}, {} bytes)", d.len()),
            other => format!("{other:?}"),
        })
        .collect()
}

fn rec<'a>(user: *mut c_void) -> &'a Recorder {
    // SAFETY: user_data is the Box<Recorder> owned by the TestServer, which
    // outlives the server's loop thread (freed only after stop).
    unsafe { &*(user as *const Recorder) }
}

unsafe extern "C" fn on_connect(user: *mut c_void, conn: u64, peer: *const c_char) -> c_int {
    let r = rec(user);
    // SAFETY: the library passes a NUL-terminated string valid during the call.
    let peer = unsafe { CStr::from_ptr(peer) }.to_string_lossy().into_owned();
    if r.behaviour.refuse.load(Ordering::SeqCst) {
        return 1;
    }
    let mut st = tf_stats::default();
    // SAFETY: srv is live during its callbacks.
    unsafe { tf_server_stats(r.srv.load(Ordering::SeqCst), &mut st) };
    r.behaviour.active_in_connect.lock().unwrap().push(st.connections_active);
    if r.behaviour.greet.load(Ordering::SeqCst) {
        // SAFETY: srv is the live server whose callback this is.
        let rc = unsafe { tf_send(r.srv.load(Ordering::SeqCst), conn, b"hi".as_ptr(), 2) };
        assert_eq!(rc, TF_OK);
    }
    r.push(Ev::Connect(conn, peer));
    0
}

unsafe extern "C" fn on_message(user: *mut c_void, conn: u64, data: *const u8, len: usize) {
    let r = rec(user);
    let payload: &[u8] = if len == 0 {
        &[]
    } else {
        // SAFETY: the library passes `len` readable bytes valid during the call.
        unsafe { std::slice::from_raw_parts(data, len) }
    };
    let srv = r.srv.load(Ordering::SeqCst);
    r.messages.fetch_add(1, Ordering::SeqCst);
    if r.behaviour.echo.load(Ordering::SeqCst) {
        // SAFETY: srv is the live server whose callback this is.
        let rc = unsafe { tf_send(srv, conn, data, len) };
        assert!(rc == TF_OK || rc == TF_ERR_FULL || rc == TF_ERR_NO_CONN, "tf_send in callback: {rc}");
    }
    let other = r.behaviour.stop_other.load(Ordering::SeqCst);
    if !other.is_null() {
        // SAFETY: the other server is live; the library must refuse, not deadlock.
        let rc = unsafe { tf_server_stop(other, 0) };
        *r.behaviour.stop_other_result.lock().unwrap() = Some(rc);
    }
    let nap = r.behaviour.sleep_in_message_ms.load(Ordering::SeqCst);
    if nap > 0 {
        std::thread::sleep(Duration::from_millis(nap));
    }
    if r.behaviour.stop_in_callback.load(Ordering::SeqCst) {
        // SAFETY: srv is live; the library must refuse, not deadlock.
        let rc = unsafe { tf_server_stop(srv, 0) };
        *r.behaviour.stop_result.lock().unwrap() = Some(rc);
    }
    if r.behaviour.close_after_message.load(Ordering::SeqCst) {
        // SAFETY: srv is live.
        unsafe { tf_conn_close(srv, conn) };
    }
    if r.behaviour.record_messages.load(Ordering::SeqCst) {
        r.push(Ev::Message(conn, payload.to_vec()));
    } else {
        r.changed.notify_all();
    }
}

unsafe extern "C" fn on_close(user: *mut c_void, conn: u64, reason: i32) {
    let r = rec(user);
    let mut st = tf_stats::default();
    // SAFETY: srv is live during its callbacks.
    unsafe { tf_server_stats(r.srv.load(Ordering::SeqCst), &mut st) };
    r.stats_at_close.lock().unwrap().push(st);
    let target = r.behaviour.notify_on_close.load(Ordering::SeqCst);
    if target != 0 && target != conn {
        // SAFETY: srv is live during its callbacks.
        unsafe { tf_send(r.srv.load(Ordering::SeqCst), target, b"gone".as_ptr(), 4) };
    }
    r.closes.fetch_add(1, Ordering::SeqCst);
    r.push(Ev::Close(conn, reason));
}

/// Builder for a server under test.
pub struct Opts {
    pub addr: String,
    pub max_connections: Option<u32>,
    pub max_frame: Option<u32>,
    pub idle_ms: Option<u32>,
    pub max_queued: Option<u64>,
    pub close_timeout_ms: Option<u32>,
    pub max_buffered: Option<u64>,
    /// Loop threads (overrides TCPFRAME_TEST_THREADS): for tests of what
    /// one loop thread guarantees (one callback at a time).
    pub threads: Option<u32>,
    pub echo: bool,
    pub record: bool,
    pub backend: i32,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            addr: "127.0.0.1:0".into(),
            max_connections: None,
            max_frame: None,
            idle_ms: None,
            max_queued: None,
            close_timeout_ms: None,
            max_buffered: None,
            threads: None,
            echo: true,
            record: true,
            backend: backend_from_env(),
        }
    }
}

pub struct TestServer {
    pub srv: *mut tf_server,
    pub rec: Box<Recorder>,
    pub port: u16,
    pub addr: SocketAddr,
    stopped: bool,
}

// SAFETY: the server handle may be used from any thread (the C contract).
unsafe impl Send for TestServer {}
unsafe impl Sync for TestServer {}

pub fn config(o: &Opts) -> *mut tf_config {
    let cfg = tf_config_new();
    assert!(!cfg.is_null());
    let addr = CString::new(o.addr.clone()).unwrap();
    // SAFETY: cfg is live; strings are NUL-terminated.
    unsafe {
        assert_eq!(tf_config_set_address(cfg, addr.as_ptr()), TF_OK);
        if let Some(n) = o.max_connections {
            assert_eq!(tf_config_set_max_connections(cfg, n), TF_OK);
        }
        if let Some(n) = o.max_frame {
            assert_eq!(tf_config_set_max_frame(cfg, n), TF_OK);
        }
        if let Some(n) = o.idle_ms {
            assert_eq!(tf_config_set_idle_timeout_ms(cfg, n), TF_OK);
        }
        if let Some(n) = o.max_queued {
            assert_eq!(tf_config_set_max_queued_output(cfg, n), TF_OK);
        }
        if let Some(n) = o.close_timeout_ms {
            assert_eq!(tf_config_set_close_timeout_ms(cfg, n), TF_OK);
        }
        if let Some(n) = o.max_buffered {
            assert_eq!(tf_config_set_max_buffered(cfg, n), TF_OK);
        }
        assert_eq!(tf_config_set_backend(cfg, o.backend), TF_OK);
        // TCPFRAME_TEST_THREADS=n runs the suite with n loop threads.
        if let Some(n) = o.threads.or_else(threads_from_env) {
            assert_eq!(tf_config_set_threads(cfg, n), TF_OK);
        }
    }
    cfg
}

pub fn last_error() -> String {
    // SAFETY: tf_last_error never returns NULL.
    unsafe { CStr::from_ptr(tf_last_error()) }.to_string_lossy().into_owned()
}

impl TestServer {
    pub fn start(o: Opts) -> TestServer {
        let rec = Box::new(Recorder::empty());
        rec.behaviour.echo.store(o.echo, Ordering::SeqCst);
        rec.behaviour.record_messages.store(o.record, Ordering::SeqCst);
        let cb = tf_callbacks {
            user_data: &*rec as *const Recorder as *mut c_void,
            on_connect: Some(on_connect),
            on_message: Some(on_message),
            on_close: Some(on_close),
        };
        let cfg = config(&o);
        let mut srv: *mut tf_server = std::ptr::null_mut();
        // SAFETY: cfg, cb and srv are live.
        let rc = unsafe { tf_server_start(cfg, &cb, &mut srv) };
        // SAFETY: cfg came from tf_config_new.
        unsafe { tf_config_free(cfg) };
        assert_eq!(rc, TF_OK, "tf_server_start: {}", last_error());
        rec.srv.store(srv, Ordering::SeqCst);
        // SAFETY: srv is live.
        let port = unsafe { tf_server_port(srv) };
        assert_ne!(port, 0);
        let ip = o.addr.rsplit_once(':').unwrap().0.trim_matches(|c| c == '[' || c == ']').to_string();
        let addr = SocketAddr::new(ip.parse().unwrap(), port);
        TestServer { srv, rec, port, addr, stopped: false }
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect_timeout(&self.addr, WAIT).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Connects and waits for on_connect; returns the stream and its id.
    pub fn connect_id(&self) -> (TcpStream, u64) {
        let before = self.rec.connects().len();
        let s = self.connect();
        let ids = self.rec.wait_connect(before + 1);
        (s, ids[before])
    }

    pub fn send(&self, conn: u64, data: &[u8]) -> i32 {
        // SAFETY: srv is live until drop.
        unsafe { tf_send(self.srv, conn, data.as_ptr(), data.len()) }
    }

    pub fn close(&self, conn: u64) -> i32 {
        // SAFETY: srv is live until drop.
        unsafe { tf_conn_close(self.srv, conn) }
    }

    pub fn stats(&self) -> tf_stats {
        let mut st = tf_stats::default();
        // SAFETY: srv is live until drop.
        assert_eq!(unsafe { tf_server_stats(self.srv, &mut st) }, TF_OK);
        st
    }

    pub fn stop(&mut self, drain_ms: u32) -> i32 {
        self.stopped = true;
        // SAFETY: srv is live until drop.
        unsafe { tf_server_stop(self.srv, drain_ms) }
    }

    /// tf_server_free with no tf_server_stop before it; returns the recorder
    /// (the callbacks' user_data), which outlives the server.
    pub fn free_without_stop(mut self) -> Box<Recorder> {
        // SAFETY: srv came from tf_server_start and is freed once here.
        unsafe { tf_server_free(self.srv) };
        self.srv = std::ptr::null_mut();
        self.stopped = true;
        std::mem::replace(&mut self.rec, Box::new(Recorder::empty()))
    }

    /// Polls stats until `pred` holds, or panics after WAIT.
    pub fn wait_stats(&self, what: &str, pred: impl Fn(&tf_stats) -> bool) -> tf_stats {
        let deadline = Instant::now() + WAIT;
        loop {
            let st = self.stats();
            if pred(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {st:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // SAFETY: srv came from tf_server_start; the recorder outlives it.
        unsafe {
            if !self.stopped {
                tf_server_stop(self.srv, 0);
            }
            tf_server_free(self.srv);
        }
    }
}

pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

pub fn write_frame(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(&frame(payload)).expect("write frame");
}

/// Reads one frame; None at end of stream.
pub fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("read frame prefix: {e}"),
    }
    let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut payload).expect("read frame payload");
    Some(payload)
}

/// True when the peer closed: reads until EOF/reset (bounded by WAIT).
pub fn wait_eof(s: &mut TcpStream) -> bool {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
    false
}

pub fn half_close(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
}

/// Deterministic bytes for payload checks.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Closes with a reset (SO_LINGER 0): the peer sees ECONNRESET, not a FIN.
pub fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a live linger struct of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    drop(s);
}

/// CPU time (user + system) this whole process has used.
pub fn cpu_time() -> Duration {
    // SAFETY: a zeroed rusage is valid and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a live rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Callbacks written as closures, for tests whose callbacks do more than the
/// Recorder's fixed behaviours (free or stop a server, abort, sleep on cue).
/// Every event is also recorded in `rec` (messages only when `record`), once
/// the closure for it (if any) has returned.
pub struct Hooks {
    pub rec: Recorder,
    pub record: bool,
    pub on_connect: Option<HookConnect>,
    pub on_message: Option<HookMessage>,
    pub on_close: Option<HookClose>,
    /// Set: the server is started with tf_config_set_on_writable.
    pub on_writable: Option<HookWritable>,
    /// Set: the server is started with tf_config_set_on_messages and a NULL
    /// on_message (frames come in arrays; each is recorded like a message).
    pub on_messages: Option<HookMessages>,
}

/// (server, conn) -> 0 to accept, as the C callback.
pub type HookConnect = Box<dyn Fn(*mut tf_server, u64) -> c_int + Send + Sync>;
/// (server, conn, payload).
pub type HookMessage = Box<dyn Fn(*mut tf_server, u64, &[u8]) + Send + Sync>;
/// (server, conn, reason).
pub type HookClose = Box<dyn Fn(*mut tf_server, u64, i32) + Send + Sync>;
/// (server, conn): tf_config_set_on_writable's callback.
pub type HookWritable = Box<dyn Fn(*mut tf_server, u64) + Send + Sync>;
/// (server, events): tf_config_set_on_messages' callback.
pub type HookMessages = Box<dyn Fn(*mut tf_server, &[tf_event]) + Send + Sync>;

impl Default for Hooks {
    fn default() -> Hooks {
        Hooks {
            rec: Recorder::empty(),
            record: true,
            on_connect: None,
            on_message: None,
            on_close: None,
            on_writable: None,
            on_messages: None,
        }
    }
}

fn hooks<'a>(user: *mut c_void) -> &'a Hooks {
    // SAFETY: user_data is the Arc<Hooks> kept by the HookServer (or leaked by
    // the test), which outlives every callback of the server.
    unsafe { &*(user as *const Hooks) }
}

unsafe extern "C" fn hook_connect(user: *mut c_void, conn: u64, peer: *const c_char) -> c_int {
    let h = hooks(user);
    // SAFETY: the library passes a NUL-terminated string valid during the call.
    let peer = unsafe { CStr::from_ptr(peer) }.to_string_lossy().into_owned();
    let rc = h.on_connect.as_ref().map_or(0, |f| f(h.rec.srv.load(Ordering::SeqCst), conn));
    if rc == 0 {
        h.rec.push(Ev::Connect(conn, peer));
    }
    rc
}

unsafe extern "C" fn hook_message(user: *mut c_void, conn: u64, data: *const u8, len: usize) {
    let h = hooks(user);
    let payload: &[u8] = if len == 0 {
        &[]
    } else {
        // SAFETY: the library passes `len` readable bytes valid during the call.
        unsafe { std::slice::from_raw_parts(data, len) }
    };
    h.rec.messages.fetch_add(1, Ordering::SeqCst);
    if let Some(f) = &h.on_message {
        f(h.rec.srv.load(Ordering::SeqCst), conn, payload);
    }
    if h.record {
        h.rec.push(Ev::Message(conn, payload.to_vec()));
    } else {
        h.rec.changed.notify_all();
    }
}

unsafe extern "C" fn hook_close(user: *mut c_void, conn: u64, reason: i32) {
    let h = hooks(user);
    if let Some(f) = &h.on_close {
        f(h.rec.srv.load(Ordering::SeqCst), conn, reason);
    }
    h.rec.closes.fetch_add(1, Ordering::SeqCst);
    h.rec.push(Ev::Close(conn, reason));
}

unsafe extern "C" fn hook_writable(user: *mut c_void, conn: u64) {
    let h = hooks(user);
    if let Some(f) = &h.on_writable {
        f(h.rec.srv.load(Ordering::SeqCst), conn);
    }
    h.rec.changed.notify_all();
}

unsafe extern "C" fn hook_messages(user: *mut c_void, events: *const tf_event, count: usize) {
    let h = hooks(user);
    let evs: &[tf_event] = if count == 0 {
        &[]
    } else {
        // SAFETY: the library passes `count` events valid during the call.
        unsafe { std::slice::from_raw_parts(events, count) }
    };
    h.rec.messages.fetch_add(evs.len() as u64, Ordering::SeqCst);
    if let Some(f) = &h.on_messages {
        f(h.rec.srv.load(Ordering::SeqCst), evs);
    }
    if h.record {
        let mut recorded = h.rec.events.lock().unwrap();
        for e in evs {
            let payload = if e.len == 0 {
                Vec::new()
            } else {
                // SAFETY: a MESSAGE event's data is `len` readable bytes during the call.
                unsafe { std::slice::from_raw_parts(e.data, e.len) }.to_vec()
            };
            recorded.push(Ev::Message(e.conn, payload));
        }
    }
    h.rec.changed.notify_all();
}

/// A server whose callbacks are `Hooks`. Dropping it stops and frees the
/// server unless the test freed it some other way (`disown`).
pub struct HookServer {
    pub srv: *mut tf_server,
    pub hooks: std::sync::Arc<Hooks>,
    pub port: u16,
    pub addr: SocketAddr,
    owned: bool,
}

// SAFETY: the server handle may be used from any thread (the C contract).
unsafe impl Send for HookServer {}
unsafe impl Sync for HookServer {}

impl HookServer {
    pub fn start(o: Opts, hooks: Hooks) -> HookServer {
        HookServer::start_with(o, hooks, |_| {})
    }

    /// `start`, with `extra` applied to the configuration before the start
    /// (slow consumer, prefix...). on_writable / on_messages are set from
    /// the hooks.
    pub fn start_with(o: Opts, hooks: Hooks, extra: impl FnOnce(*mut tf_config)) -> HookServer {
        let srv = HookServer::start_any(o, hooks, extra);
        assert_ne!(srv.port, 0, "a TCP listener has a port");
        srv
    }

    pub fn rec(&self) -> &Recorder {
        &self.hooks.rec
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect_timeout(&self.addr, WAIT).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Connects and waits for on_connect; returns the stream and its id.
    pub fn connect_id(&self) -> (TcpStream, u64) {
        let before = self.rec().connects().len();
        let s = self.connect();
        let ids = self.rec().wait_connect(before + 1);
        (s, ids[before])
    }

    /// The test frees (or has freed) the server itself: Drop leaves it alone.
    pub fn disown(&mut self) -> *mut tf_server {
        self.owned = false;
        self.srv
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: srv came from tf_server_start; the hooks outlive it.
            unsafe {
                tf_server_stop(self.srv, 0);
                tf_server_free(self.srv);
            }
        }
    }
}

/// Waits (bounded by WAIT) until `flag` is set; panics naming `what`.
pub fn wait_flag(flag: &AtomicBool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !flag.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// True once connecting to `addr` is refused (nobody listens), within `within`.
pub fn refused_within(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ if Instant::now() >= deadline => return false,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Connects with a small receive buffer set before the handshake, so that
/// the kernel absorbs little of what the server queues for a peer that
/// does not read.
pub fn connect_small_rcvbuf(addr: SocketAddr, bytes: i32) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only") };
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // sockaddr_in is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const i32 as *const c_void,
            std::mem::size_of::<i32>() as u32,
        );
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = v4.port().to_be();
        sa.sin_addr = libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() };
        let rc = libc::connect(
            fd,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        let s = TcpStream::from_raw_fd(fd);
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s
    }
}

/// tf_send of `chunk` until TF_ERR_FULL; returns how many were queued.
pub fn fill_until_full(srv: *mut tf_server, conn: u64, chunk: &[u8]) -> usize {
    let mut n = 0;
    loop {
        // SAFETY: srv is live for the caller.
        match unsafe { tf_send(srv, conn, chunk.as_ptr(), chunk.len()) } {
            TF_OK => n += 1,
            TF_ERR_FULL => return n,
            rc => panic!("tf_send while filling: {rc} ({})", last_error()),
        }
        assert!(n * chunk.len() < 1 << 30, "1 GiB queued and still no TF_ERR_FULL");
    }
}

/// Queues 16 KiB frames for a peer that does not read, never past half of
/// `limit` (so never TF_ERR_FULL), until the kernel's buffers are full and
/// stay full: from then on the queue drains only when the peer reads.
/// Returns the bytes queued (prefixes included).
pub fn saturate_kernel(srv: *mut tf_server, conn: u64, limit: u64) -> usize {
    let chunk = vec![0x11u8; 16 * 1024];
    let deadline = Instant::now() + WAIT;
    let (mut total, mut stable, mut last) = (0usize, 0, u64::MAX);
    while stable < 25 {
        assert!(Instant::now() < deadline, "the kernel never stopped taking bytes");
        let mut i = std::mem::MaybeUninit::<tf_conn_info>::uninit();
        // SAFETY: srv is live for the caller; i is written on success.
        assert_eq!(unsafe { tf_conn_get_info(srv, conn, i.as_mut_ptr()) }, TF_OK, "{}", last_error());
        // SAFETY: written by the TF_OK call above.
        let q = unsafe { i.assume_init() }.queued_output;
        if q + (4 + chunk.len()) as u64 <= limit / 2 {
            // SAFETY: srv is live for the caller.
            assert_eq!(unsafe { tf_send(srv, conn, chunk.as_ptr(), chunk.len()) }, TF_OK);
            total += 4 + chunk.len();
            (stable, last) = (0, u64::MAX);
            continue;
        }
        if q == last {
            stable += 1;
        } else {
            (stable, last) = (0, q);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    total
}

impl HookServer {
    /// `start_with` for any listening address, the ones without a port
    /// included ("unix:/path", "unix:@name", "fd:N", "none"): `port` is what
    /// tf_server_port says (0 for those) and `addr` is then 127.0.0.1:0.
    pub fn start_any(o: Opts, hooks: Hooks, extra: impl FnOnce(*mut tf_config)) -> HookServer {
        let hooks = std::sync::Arc::new(hooks);
        let batched = hooks.on_messages.is_some();
        let cb = tf_callbacks {
            user_data: std::sync::Arc::as_ptr(&hooks) as *mut c_void,
            on_connect: Some(hook_connect),
            on_message: if batched { None } else { Some(hook_message) },
            on_close: Some(hook_close),
        };
        let cfg = config(&o);
        // SAFETY: cfg is live.
        unsafe {
            if hooks.on_writable.is_some() {
                assert_eq!(tf_config_set_on_writable(cfg, Some(hook_writable)), TF_OK);
            }
            if batched {
                assert_eq!(tf_config_set_on_messages(cfg, Some(hook_messages)), TF_OK);
            }
        }
        extra(cfg);
        let out = hooks.rec.srv.as_ptr();
        // SAFETY: cfg, cb and out are live.
        let rc = unsafe { tf_server_start(cfg, &cb, out) };
        // SAFETY: cfg came from tf_config_new.
        unsafe { tf_config_free(cfg) };
        assert_eq!(rc, TF_OK, "tf_server_start on {}: {}", o.addr, last_error());
        let srv = hooks.rec.srv.load(Ordering::SeqCst);
        // SAFETY: srv is live.
        let port = unsafe { tf_server_port(srv) };
        let addr = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port);
        HookServer { srv, hooks, port, addr, owned: true }
    }
}

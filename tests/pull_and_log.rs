//! Pull mode (events taken with tf_server_poll) and the log hook.
mod common;
use common::*;
use std::ffi::{c_char, c_void, CStr};
use std::io::Write;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Pull {
    srv: *mut tf_server,
    port: u16,
}

#[derive(Debug, Clone, PartialEq)]
struct Got {
    kind: i32,
    reason: i32,
    conn: u64,
    data: Vec<u8>,
}

impl Pull {
    fn start(o: Opts) -> Pull {
        let cfg = config(&o);
        let mut srv = std::ptr::null_mut();
        // SAFETY: cfg and srv are live.
        assert_eq!(unsafe { tf_server_start_pull(cfg, &mut srv) }, TF_OK, "{}", last_error());
        // SAFETY: from tf_config_new.
        unsafe { tf_config_free(cfg) };
        // SAFETY: srv is live.
        let port = unsafe { tf_server_port(srv) };
        Pull { srv, port }
    }

    fn poll(&self, max: usize, timeout_ms: i32) -> (i32, Vec<Got>) {
        let mut evs = vec![tf_event { kind: 0, reason: 0, conn: 0, data: std::ptr::null(), len: 0 }; max];
        let mut count = 0usize;
        // SAFETY: evs has room for max events.
        let rc = unsafe { tf_server_poll(self.srv, evs.as_mut_ptr(), max, &mut count, timeout_ms) };
        let got = evs[..count]
            .iter()
            .map(|e| Got {
                kind: e.kind,
                reason: e.reason,
                conn: e.conn,
                data: if e.len == 0 {
                    Vec::new()
                } else {
                    // SAFETY: valid until the next poll, and copied now.
                    unsafe { std::slice::from_raw_parts(e.data, e.len) }.to_vec()
                },
            })
            .collect();
        (rc, got)
    }

    /// Polls until `n` events have arrived (bounded).
    fn take(&self, n: usize) -> Vec<Got> {
        let deadline = Instant::now() + WAIT;
        let mut all = Vec::new();
        while all.len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} events: {all:?}", all.len());
            let (rc, got) = self.poll(n - all.len(), 100);
            assert_eq!(rc, TF_OK);
            all.extend(got);
        }
        all
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    fn fd_readable(&self) -> bool {
        // SAFETY: srv is live.
        let fd = unsafe { tf_server_fd(self.srv) };
        assert!(fd >= 0);
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        // SAFETY: from tf_server_start_pull, freed once.
        unsafe { tf_server_free(self.srv) };
    }
}

#[test]
fn pull_mode_delivers_connect_messages_close_in_order_and_the_host_replies() {
    let p = Pull::start(Opts::default());
    assert!(!p.fd_readable(), "nothing waits yet");
    let (rc, none) = p.poll(8, 0);
    assert_eq!((rc, none.len()), (TF_OK, 0));
    let mut s = p.connect();
    write_frame(&mut s, b"one");
    write_frame(&mut s, b"");
    let evs = p.take(3);
    let id = evs[0].conn;
    assert_eq!(evs[0].kind, TF_EVENT_CONNECT);
    assert!(String::from_utf8(evs[0].data.clone()).unwrap().starts_with("127.0.0.1:"));
    assert_eq!(evs[1], Got { kind: TF_EVENT_MESSAGE, reason: 0, conn: id, data: b"one".to_vec() });
    assert_eq!(evs[2], Got { kind: TF_EVENT_MESSAGE, reason: 0, conn: id, data: vec![] });
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_send(p.srv, id, b"reply".as_ptr(), 5) }, TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"reply");
    drop(s);
    let evs = p.take(1);
    assert_eq!(evs[0], Got { kind: TF_EVENT_CLOSE, reason: TF_CLOSE_PEER, conn: id, data: vec![] });
    assert!(!p.fd_readable(), "the descriptor is quiet once drained");
}

#[test]
fn the_pull_descriptor_is_readable_while_events_wait() {
    let p = Pull::start(Opts::default());
    let mut s = p.connect();
    write_frame(&mut s, b"x");
    let deadline = Instant::now() + WAIT;
    while !p.fd_readable() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    let (_, first) = p.poll(1, 0);
    assert_eq!(first.len(), 1);
    assert!(p.fd_readable(), "level-triggered: one more event waits");
    let _ = p.take(1);
    assert!(!p.fd_readable());
}

#[test]
fn a_host_that_does_not_poll_applies_backpressure_instead_of_growing() {
    let p = Pull::start(Opts::default());
    let mut s = p.connect();
    s.set_write_timeout(Some(Duration::from_millis(300))).unwrap();
    // Write small frames until the socket refuses: the loop must stop reading.
    let burst = frame(&[5u8; 1000]).repeat(64);
    let mut written = 0usize;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        // Continue where a partial write stopped: the stream stays framed.
        match s.write(&burst[written % burst.len()..]) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    assert!(Instant::now() < deadline, "the peer was never pushed back");
    let frames_written = written / 1004;
    assert!(frames_written > 4096, "wrote {frames_written} frames before backpressure");
    // Now drain everything that was written, in order, nothing dropped.
    let mut got = 0usize;
    let deadline = Instant::now() + WAIT;
    while got < frames_written && Instant::now() < deadline {
        let (rc, evs) = p.poll(1024, 100);
        assert_eq!(rc, TF_OK);
        got += evs.iter().filter(|e| e.kind == TF_EVENT_MESSAGE && e.data.len() == 1000).count();
    }
    let mut st = tf_stats::default();
    // SAFETY: srv is live.
    unsafe { tf_server_stats(p.srv, &mut st) };
    assert!(got >= frames_written, "got {got} of {frames_written}; {st:?}");
}

#[test]
fn after_stop_the_remaining_events_are_polled_then_stopped() {
    let p = Pull::start(Opts::default());
    let _s = p.connect();
    let evs = p.take(1);
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_server_stop(p.srv, 0) }, TF_OK);
    let (rc, evs2) = p.poll(8, 1000);
    assert_eq!(rc, TF_OK);
    assert_eq!(
        evs2,
        vec![Got { kind: TF_EVENT_CLOSE, reason: TF_CLOSE_SHUTDOWN, conn: evs[0].conn, data: vec![] }]
    );
    let (rc, _) = p.poll(8, -1);
    assert_eq!(rc, TF_ERR_STOPPED, "a forever wait ends when the server has stopped");
}

#[test]
fn a_blocked_poll_wakes_when_an_event_arrives() {
    let p = Pull::start(Opts::default());
    let port = p.port;
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        TcpStream::connect(("127.0.0.1", port)).unwrap()
    });
    let start = Instant::now();
    let (rc, evs) = p.poll(4, 5000);
    assert_eq!(rc, TF_OK);
    assert_eq!(evs[0].kind, TF_EVENT_CONNECT);
    assert!(start.elapsed() < Duration::from_secs(4));
    drop(t.join().unwrap());
}

static LOG: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());

unsafe extern "C" fn log_hook(user: *mut c_void, level: i32, msg: *const c_char) {
    assert_eq!(user as usize, 0xC0FFEE);
    // SAFETY: msg is NUL-terminated and valid during the call.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    LOG.lock().unwrap().push((level, text));
}

#[test]
fn the_log_hook_reports_closes_for_cause_and_is_rate_limited() {
    let o = Opts { max_frame: Some(16), max_connections: Some(1), ..Opts::default() };
    let cfg = config(&o);
    // SAFETY: cfg is live; the hook and its user_data stay valid.
    unsafe { assert_eq!(tf_config_set_log(cfg, Some(log_hook), 0xC0FFEE as *mut c_void), TF_OK) };
    let mut srv = std::ptr::null_mut();
    // SAFETY: live pointers.
    assert_eq!(unsafe { tf_server_start_pull(cfg, &mut srv) }, TF_OK);
    // SAFETY: from tf_config_new.
    unsafe { tf_config_free(cfg) };
    let pull = Pull { srv, port: unsafe { tf_server_port(srv) } };
    let mut first = pull.connect();
    let _ = pull.take(1);
    // 200 over-limit connections: a flood of identical warnings.
    for _ in 0..200 {
        let _ = pull.connect();
    }
    first.write_all(&100u32.to_le_bytes()).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let log = LOG.lock().unwrap().clone();
        if log.iter().any(|(l, m)| *l == TF_LOG_WARN && m.contains("max frame")) {
            break;
        }
        assert!(Instant::now() < deadline, "no too-large warning: {log:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = LOG.lock().unwrap().clone();
    assert!(log.iter().any(|(l, m)| *l == TF_LOG_WARN && m.contains("max connections")), "{log:?}");
    let bound = format!("listening on 127.0.0.1:{} ", pull.port);
    assert!(log.iter().any(|(_, m)| m.contains(&bound)), "the start line names the bound port: {log:?}");
    assert!(log.len() <= 25, "rate limited: {} lines", log.len());
}

#[test]
fn a_paused_connection_whose_peer_resets_does_not_make_the_loop_spin() {
    let p = Pull::start(Opts::default());
    let mut s = p.connect();
    // More than the queue takes: the loop pauses this connection.
    s.write_all(&[0u8; 4 * 6000]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    reset(s);
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time() - before;
    assert!(used < Duration::from_millis(200), "{used:?} of CPU in one idle second: spinning");
    // Drain: every message, then the close.
    let mut msgs = 0;
    let deadline = Instant::now() + WAIT;
    loop {
        let (rc, evs) = p.poll(1024, 100);
        assert_eq!(rc, TF_OK);
        msgs += evs.iter().filter(|e| e.kind == TF_EVENT_MESSAGE).count();
        if evs.iter().any(|e| e.kind == TF_EVENT_CLOSE) {
            break;
        }
        assert!(Instant::now() < deadline, "no close event; {msgs} messages");
    }
    assert!(msgs >= 4096, "{msgs}");
}

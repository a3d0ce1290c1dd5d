//! Per-connection control (API.md, "Per-connection control"): user data,
//! pause and resume, on_writable / TF_EVENT_WRITABLE, tf_sendv,
//! tf_send_many, the slow-consumer policy and tf_conn_get_info. One
//! behaviour per test, real sockets on 127.0.0.1, every wait bounded; the
//! suite runs on both backends (TCPFRAME_TEST_BACKEND=poll for the other).
//! Batched delivery and sends: batch.rs.
mod common;
use common::*;
use std::ffi::{c_void, CStr};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

/// A recognisable pointer for user data (never dereferenced).
fn tag(n: usize) -> *mut c_void {
    (0x10_0000 + n * 16) as *mut c_void
}

fn ud(srv: *const tf_server, conn: u64) -> *mut c_void {
    // SAFETY: srv is NULL or live for the caller.
    unsafe { tf_conn_user_data(srv, conn) }
}

fn set_ud(srv: *mut tf_server, conn: u64, p: *mut c_void) -> i32 {
    // SAFETY: srv is NULL or live for the caller.
    unsafe { tf_conn_set_user_data(srv, conn, p) }
}

fn pause(srv: *mut tf_server, conn: u64) -> i32 {
    // SAFETY: srv is NULL or live for the caller.
    unsafe { tf_conn_pause(srv, conn) }
}

fn resume(srv: *mut tf_server, conn: u64) -> i32 {
    // SAFETY: srv is NULL or live for the caller.
    unsafe { tf_conn_resume(srv, conn) }
}

fn blank_info() -> tf_conn_info {
    tf_conn_info {
        peer: [0x55; 128],
        bytes_received: u64::MAX,
        bytes_sent: u64::MAX,
        frames_received: u64::MAX,
        frames_sent: u64::MAX,
        queued_output: u64::MAX,
        age_ms: u64::MAX,
        outbound: -1,
        paused: -1,
        thread: u32::MAX,
        reserved: u32::MAX,
    }
}

/// tf_conn_get_info's code and what it wrote (blank_info() when nothing).
fn info(srv: *const tf_server, conn: u64) -> (i32, tf_conn_info) {
    let mut out = blank_info();
    // SAFETY: srv is live for the caller; out is a live tf_conn_info.
    let rc = unsafe { tf_conn_get_info(srv, conn, &mut out) };
    (rc, out)
}

fn ok_info(srv: *const tf_server, conn: u64) -> tf_conn_info {
    let (rc, i) = info(srv, conn);
    assert_eq!(rc, TF_OK, "tf_conn_get_info({conn}): {}", last_error());
    i
}

fn peer_text(i: &tf_conn_info) -> String {
    // SAFETY: the library NUL-terminates peer.
    unsafe { CStr::from_ptr(i.peer.as_ptr()) }.to_string_lossy().into_owned()
}

fn sendv(srv: *mut tf_server, conn: u64, pieces: &[&[u8]]) -> i32 {
    let iov: Vec<tf_iovec> = pieces
        .iter()
        .map(|p| tf_iovec { base: if p.is_empty() { std::ptr::null() } else { p.as_ptr() }, len: p.len() })
        .collect();
    // SAFETY: iov holds pieces.len() entries pointing into live slices.
    unsafe { tf_sendv(srv, conn, iov.as_ptr(), iov.len()) }
}

/// tf_send_many's code and *queued (usize::MAX when it was not written).
fn send_many(srv: *mut tf_server, ids: &[u64], data: &[u8]) -> (i32, usize) {
    let mut queued = usize::MAX;
    // SAFETY: ids and data are live slices.
    let rc = unsafe { tf_send_many(srv, ids.as_ptr(), ids.len(), data.as_ptr(), data.len(), &mut queued) };
    (rc, queued)
}

fn send(srv: *mut tf_server, conn: u64, data: &[u8]) -> i32 {
    // SAFETY: srv is live for the caller.
    unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) }
}

/// Waits (bounded) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// True when `f` holds for the whole of `d` (checked every few ms).
fn holds_for(d: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if !f() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// Reads exactly `n` bytes (bounded by the socket's read timeout).
fn read_bytes(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read the bytes the server owes");
    v
}

/// Frames carrying their sequence number in the first 4 bytes.
fn seq_payload(i: u32, len: usize) -> Vec<u8> {
    let mut v = pattern(len.max(4), i as u8);
    v[..4].copy_from_slice(&i.to_le_bytes());
    v
}

fn seq_of(p: &[u8]) -> u32 {
    u32::from_le_bytes(p[..4].try_into().unwrap())
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

/// A peer with a small receive buffer (set before the handshake) on a
/// HookServer, and its id.
fn connect_slow(srv: &HookServer) -> (TcpStream, u64) {
    let before = srv.rec().connects().len();
    let s = connect_small_rcvbuf(srv.addr, 4096);
    let ids = srv.rec().wait_connect(before + 1);
    (s, ids[before])
}

/// True when the peer sees the end of the stream (EOF or reset) within WAIT.
fn ends(s: &mut TcpStream) -> bool {
    wait_eof(s)
}

fn no_hooks() -> Hooks {
    Hooks::default()
}

// ---------------------------------------------------------------- user data

#[test]
fn user_data_is_null_until_set_and_null_again_when_cleared() {
    let srv = HookServer::start(Opts::default(), no_hooks());
    let (_s, id) = srv.connect_id();
    assert!(ud(srv.srv, id).is_null());
    assert_eq!(set_ud(srv.srv, id, tag(1)), TF_OK);
    assert_eq!(ud(srv.srv, id), tag(1));
    assert_eq!(set_ud(srv.srv, id, tag(2)), TF_OK);
    assert_eq!(ud(srv.srv, id), tag(2));
    assert_eq!(set_ud(srv.srv, id, std::ptr::null_mut()), TF_OK);
    assert!(ud(srv.srv, id).is_null());
}

#[test]
fn user_data_of_an_unknown_connection_or_null_server() {
    let srv = HookServer::start(Opts::default(), no_hooks());
    let (_s, id) = srv.connect_id();
    assert_eq!(set_ud(srv.srv, id + 1000, tag(1)), TF_ERR_NO_CONN);
    assert_eq!(set_ud(srv.srv, 0, tag(1)), TF_ERR_NO_CONN);
    assert!(ud(srv.srv, id + 1000).is_null());
    assert!(ud(srv.srv, 0).is_null());
    assert_eq!(set_ud(std::ptr::null_mut(), id, tag(1)), TF_ERR_INVALID);
    assert!(ud(std::ptr::null(), id).is_null());
}

#[test]
fn user_data_set_in_on_connect_is_seen_in_on_message_and_from_other_threads() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_connect: Some(Box::new(|srv, conn| {
                assert_eq!(set_ud(srv, conn, tag(conn as usize)), TF_OK);
                assert_eq!(ud(srv, conn), tag(conn as usize), "readable at once inside on_connect");
                0
            })),
            on_message: Some(Box::new(move |srv, conn, _| {
                s2.lock().unwrap().push((conn, ud(srv, conn) as usize))
            })),
            ..Hooks::default()
        },
    );
    let (mut s, id) = srv.connect_id();
    let srv_ptr = srv.srv as usize;
    let from_thread =
        std::thread::spawn(move || ud(srv_ptr as *const tf_server, id) as usize).join().unwrap();
    assert_eq!(from_thread, tag(id as usize) as usize);
    write_frame(&mut s, b"x");
    srv.rec().wait_for("message", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert_eq!(*seen.lock().unwrap(), vec![(id, tag(id as usize) as usize)]);
}

#[test]
fn user_data_set_from_another_thread_is_seen_inside_callbacks() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, _| s2.lock().unwrap().push(ud(srv, conn) as usize))),
            ..Hooks::default()
        },
    );
    let (mut s, id) = srv.connect_id();
    let srv_ptr = srv.srv as usize;
    let rc = std::thread::spawn(move || set_ud(srv_ptr as *mut tf_server, id, tag(7))).join().unwrap();
    assert_eq!(rc, TF_OK);
    write_frame(&mut s, b"x");
    srv.rec().wait_for("message", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert_eq!(*seen.lock().unwrap(), vec![tag(7) as usize]);
}

#[test]
fn user_data_set_inside_on_message_is_seen_from_another_thread() {
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(|srv, conn, _| {
                assert_eq!(set_ud(srv, conn, tag(99)), TF_OK);
            })),
            ..Hooks::default()
        },
    );
    let (mut s, id) = srv.connect_id();
    write_frame(&mut s, b"set it");
    srv.rec().wait_for("message", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert_eq!(ud(srv.srv, id), tag(99));
}

#[test]
fn user_data_under_concurrent_setters_is_always_one_of_the_values_set() {
    // Four host threads set and read their own connection's pointer while the
    // loop reads it on every frame: each read is a value that was set for
    // that connection (no tearing, no mix-up between connections).
    let bad = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let (b2, r2) = (bad.clone(), reads.clone());
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            record: false,
            on_message: Some(Box::new(move |srv, conn, _| {
                let p = ud(srv, conn) as usize;
                r2.fetch_add(1, Ordering::SeqCst);
                if p != 0 && p >> 32 != conn as usize {
                    b2.fetch_add(1, Ordering::SeqCst);
                }
            })),
            ..Hooks::default()
        },
    );
    let peers: Vec<(TcpStream, u64)> = (0..4).map(|_| srv.connect_id()).collect();
    let srv_ptr = srv.srv as usize;
    std::thread::scope(|scope| {
        for (s, id) in &peers {
            let id = *id;
            let mut s = s.try_clone().unwrap();
            scope.spawn(move || {
                for k in 1..=20_000usize {
                    let p = ((id as usize) << 32 | k) as *mut c_void;
                    assert_eq!(set_ud(srv_ptr as *mut tf_server, id, p), TF_OK);
                    let got = ud(srv_ptr as *const tf_server, id) as usize;
                    assert_eq!(got >> 32, id as usize, "another connection's pointer");
                    if k % 100 == 0 {
                        write_frame(&mut s, b"tick");
                    }
                }
            });
        }
    });
    wait_until("800 frames", || reads.load(Ordering::SeqCst) >= 800);
    assert_eq!(bad.load(Ordering::SeqCst), 0, "on_message read a pointer set for another connection");
}

#[test]
fn user_data_is_readable_in_on_close_and_null_after() {
    let in_close = Arc::new(Mutex::new(Vec::new()));
    let c2 = in_close.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_close: Some(Box::new(move |srv, conn, _| c2.lock().unwrap().push(ud(srv, conn) as usize))),
            ..Hooks::default()
        },
    );
    let (s, id) = srv.connect_id();
    assert_eq!(set_ud(srv.srv, id, tag(5)), TF_OK);
    drop(s);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_PEER);
    assert_eq!(*in_close.lock().unwrap(), vec![tag(5) as usize], "on_close can read (and free) it");
    // The recorder saw the close from inside on_close: give it a moment to return.
    wait_until("the user data to be forgotten", || ud(srv.srv, id).is_null());
    assert_eq!(set_ud(srv.srv, id, tag(6)), TF_ERR_NO_CONN);
    assert!(ud(srv.srv, id).is_null());
}

#[test]
fn user_data_can_be_cleared_inside_on_close() {
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_close: Some(Box::new(|srv, conn, _| {
                assert_eq!(set_ud(srv, conn, std::ptr::null_mut()), TF_OK, "settable during on_close");
                assert!(ud(srv, conn).is_null());
            })),
            ..Hooks::default()
        },
    );
    let (s, id) = srv.connect_id();
    assert_eq!(set_ud(srv.srv, id, tag(5)), TF_OK);
    drop(s);
    srv.rec().wait_close(id);
}

#[test]
fn user_data_is_readable_in_on_close_at_shutdown() {
    let in_close = Arc::new(Mutex::new(Vec::new()));
    let c2 = in_close.clone();
    let mut srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_close: Some(Box::new(move |srv, conn, r| {
                c2.lock().unwrap().push((conn, r, ud(srv, conn) as usize))
            })),
            ..Hooks::default()
        },
    );
    let (_s, id) = srv.connect_id();
    assert_eq!(set_ud(srv.srv, id, tag(8)), TF_OK);
    let p = srv.disown();
    // SAFETY: p is live; stopped and freed once here.
    unsafe {
        assert_eq!(tf_server_stop(p, 0), TF_OK);
        tf_server_free(p);
    }
    assert_eq!(*in_close.lock().unwrap(), vec![(id, TF_CLOSE_SHUTDOWN, tag(8) as usize)]);
}

#[test]
fn user_data_of_a_connection_whose_on_close_returned_is_null_in_a_later_on_close() {
    // A stop closes every connection in one pass: on_close(B) runs after
    // on_close(A) has returned, so A's pointer (which on_close(A) freed)
    // must no longer be returned, neither on the loop thread nor elsewhere.
    #[derive(Default)]
    struct Seen {
        order: Mutex<Vec<u64>>,
        /// (closing conn, earlier conn, its user data as seen then, set's code)
        earlier: Mutex<Vec<(u64, u64, usize, i32)>>,
        second_entered: AtomicBool,
        host_view: Mutex<Vec<(u64, usize)>>,
    }
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    let mut srv = HookServer::start(
        Opts { threads: Some(1), ..Opts::default() }, // both closes in one loop's pass
        Hooks {
            on_close: Some(Box::new(move |srv, conn, _| {
                let before: Vec<u64> = s2.order.lock().unwrap().clone();
                for &e in &before {
                    let p = ud(srv, e) as usize;
                    let rc = set_ud(srv, e, tag(77));
                    s2.earlier.lock().unwrap().push((conn, e, p, rc));
                }
                if !before.is_empty() {
                    // Let a host thread look meanwhile.
                    s2.second_entered.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                }
                s2.order.lock().unwrap().push(conn);
            })),
            ..Hooks::default()
        },
    );
    let (_a, a) = srv.connect_id();
    let (_b, b) = srv.connect_id();
    assert_eq!(set_ud(srv.srv, a, tag(1)), TF_OK);
    assert_eq!(set_ud(srv.srv, b, tag(2)), TF_OK);
    let p = srv.disown() as usize;
    let stopper = std::thread::spawn(move || {
        // SAFETY: p is live; stopped here, freed below after the join.
        unsafe { tf_server_stop(p as *mut tf_server, 0) }
    });
    wait_until("the second on_close", || seen.second_entered.load(Ordering::SeqCst));
    let first = seen.order.lock().unwrap()[0];
    seen.host_view.lock().unwrap().push((first, ud(p as *const tf_server, first) as usize));
    assert_eq!(stopper.join().unwrap(), TF_OK);
    // SAFETY: stopped above; freed once.
    unsafe { tf_server_free(p as *mut tf_server) };
    let order = seen.order.lock().unwrap().clone();
    assert_eq!(order.len(), 2);
    assert!(order.contains(&a) && order.contains(&b));
    let earlier = seen.earlier.lock().unwrap().clone();
    assert_eq!(earlier.len(), 1);
    let (_, e, p_seen, rc) = earlier[0];
    let host = seen.host_view.lock().unwrap()[0].1;
    assert_eq!(
        (p_seen, rc, host),
        (0, TF_ERR_NO_CONN, 0),
        "after on_close({e}) returned, during on_close({}): tf_conn_user_data({e}) on the loop thread gave \
         {p_seen:#x}, tf_conn_set_user_data({e}) returned {rc}, tf_conn_user_data({e}) on a host thread gave \
         {host:#x}",
        order[1]
    );
}

#[test]
fn user_data_set_in_a_refusing_on_connect_is_forgotten_without_on_close() {
    let refused = Arc::new(Mutex::new(Vec::new()));
    let r2 = refused.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_connect: Some(Box::new(move |srv, conn| {
                let rc = set_ud(srv, conn, tag(3));
                let back = ud(srv, conn) as usize;
                r2.lock().unwrap().push((conn, rc, back));
                1 // refuse: the host frees its pointer here
            })),
            ..Hooks::default()
        },
    );
    let mut s = srv.connect();
    wait_until("on_connect", || !refused.lock().unwrap().is_empty());
    let (id, rc, back) = refused.lock().unwrap()[0];
    assert_eq!((rc, back), (TF_OK, tag(3) as usize));
    assert!(ends(&mut s), "a refused connection is closed");
    wait_until("the refusal to be counted", || srv_stats(&srv).connections_rejected == 1);
    assert!(ud(srv.srv, id).is_null());
    assert_eq!(set_ud(srv.srv, id, tag(4)), TF_ERR_NO_CONN);
    std::thread::sleep(Duration::from_millis(100));
    assert!(srv.rec().closes_of(id).is_empty(), "no on_close for a refused connection");
}

fn srv_stats(srv: &HookServer) -> tf_stats {
    let mut st = tf_stats::default();
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_server_stats(srv.srv, &mut st) }, TF_OK);
    st
}

#[test]
fn every_per_connection_call_is_no_conn_after_on_close() {
    let srv = HookServer::start(Opts::default(), no_hooks());
    let (s, id) = srv.connect_id();
    assert_eq!(set_ud(srv.srv, id, tag(1)), TF_OK);
    drop(s);
    srv.rec().wait_close(id);
    wait_until("the connection to be forgotten", || ud(srv.srv, id).is_null());
    assert_eq!(set_ud(srv.srv, id, tag(1)), TF_ERR_NO_CONN);
    assert_eq!(pause(srv.srv, id), TF_ERR_NO_CONN);
    assert_eq!(resume(srv.srv, id), TF_ERR_NO_CONN);
    assert_eq!(info(srv.srv, id).0, TF_ERR_NO_CONN);
    assert_eq!(sendv(srv.srv, id, &[b"x"]), TF_ERR_NO_CONN);
    assert_eq!(send_many(srv.srv, &[id], b"x"), (TF_OK, 0));
}

// ---------------------------------------------------------------- pause and resume

/// on_message pauses the sender at the payload "pause".
fn pausing_hooks(record: bool) -> Hooks {
    Hooks {
        record,
        on_message: Some(Box::new(|srv, conn, data| {
            if data == b"pause" {
                assert_eq!(pause(srv, conn), TF_OK);
            }
        })),
        ..Hooks::default()
    }
}

#[test]
fn pause_inside_on_message_holds_the_frames_already_read_until_resume() {
    let srv = HookServer::start(Opts::default(), pausing_hooks(true));
    let (mut s, id) = srv.connect_id();
    // Ten frames in one segment: the loop reads them all at once.
    let mut wire = frame(b"pause");
    for i in 1..10 {
        wire.extend(frame(format!("frame {i}").as_bytes()));
    }
    s.write_all(&wire).unwrap();
    srv.rec().wait_for("the first frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert!(
        holds_for(Duration::from_millis(300), || srv.rec().messages.load(Ordering::SeqCst) == 1),
        "a frame was delivered after tf_conn_pause: {:?}",
        messages_of(srv.rec(), id)
    );
    assert_eq!(ok_info(srv.srv, id).frames_received, 1, "the held frames are not counted as delivered");
    assert_eq!(resume(srv.srv, id), TF_OK);
    srv.rec().wait_for("ten frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 10);
    let want: Vec<Vec<u8>> = std::iter::once(b"pause".to_vec())
        .chain((1..10).map(|i| format!("frame {i}").into_bytes()))
        .collect();
    assert_eq!(messages_of(srv.rec(), id), want);
}

#[test]
fn pause_inside_on_message_across_many_reads_delivers_everything_in_order() {
    // 3,000 frames of 200 B (about 36 reads of 16 KiB): on_message pauses at
    // every 500th; a host thread resumes. Nothing is delivered while paused.
    let delivered_while_paused = Arc::new(AtomicUsize::new(0));
    let paused = Arc::new(AtomicBool::new(false));
    let (d2, p2) = (delivered_while_paused.clone(), paused.clone());
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                if p2.load(Ordering::SeqCst) {
                    d2.fetch_add(1, Ordering::SeqCst);
                }
                if seq_of(data) % 500 == 499 {
                    p2.store(true, Ordering::SeqCst);
                    assert_eq!(pause(srv, conn), TF_OK);
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut s, id) = srv.connect_id();
    let wire: Vec<u8> = (0..3000u32).flat_map(|i| frame(&seq_payload(i, 200))).collect();
    std::thread::scope(|scope| {
        scope.spawn(move || s.write_all(&wire).expect("the frames are read"));
        for _ in 0..6 {
            wait_until("a pause", || paused.load(Ordering::SeqCst));
            std::thread::sleep(Duration::from_millis(30));
            paused.store(false, Ordering::SeqCst);
            assert_eq!(resume(srv.srv, id), TF_OK);
        }
    });
    srv.rec().wait_for("3000 frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() >= 3000);
    assert_eq!(delivered_while_paused.load(Ordering::SeqCst), 0, "frames were delivered while paused");
    let got: Vec<u32> = messages_of(srv.rec(), id).iter().map(|p| seq_of(p)).collect();
    assert_eq!(got, (0..3000).collect::<Vec<u32>>());
}

#[test]
fn pause_and_resume_inside_the_same_on_message_goes_on_delivering() {
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(|srv, conn, data| {
                if data == b"0" {
                    assert_eq!(pause(srv, conn), TF_OK);
                    assert_eq!(resume(srv, conn), TF_OK);
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut s, id) = srv.connect_id();
    let wire: Vec<u8> = (0..10).flat_map(|i: i32| frame(i.to_string().as_bytes())).collect();
    s.write_all(&wire).unwrap();
    srv.rec().wait_for("ten frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 10);
    let want: Vec<Vec<u8>> = (0..10).map(|i: i32| i.to_string().into_bytes()).collect();
    assert_eq!(messages_of(srv.rec(), id), want);
}

#[test]
fn pause_inside_on_connect_delivers_nothing_until_resume() {
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_connect: Some(Box::new(|srv, conn| {
                assert_eq!(pause(srv, conn), TF_OK);
                0
            })),
            ..Hooks::default()
        },
    );
    let (mut s, id) = srv.connect_id();
    for m in [&b"a"[..], b"b", b"c"] {
        write_frame(&mut s, m);
    }
    assert!(holds_for(Duration::from_millis(300), || srv.rec().messages.load(Ordering::SeqCst) == 0));
    assert_eq!(ok_info(srv.srv, id).paused, 1);
    assert_eq!(resume(srv.srv, id), TF_OK);
    srv.rec().wait_for("three frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 3);
    assert_eq!(messages_of(srv.rec(), id), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
}

#[test]
fn pause_from_another_thread_stops_delivery_and_resume_delivers_in_order() {
    let srv = HookServer::start(Opts::default(), no_hooks());
    let (mut s, id) = srv.connect_id();
    write_frame(&mut s, b"before");
    srv.rec().wait_for("first frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    let srv_ptr = srv.srv as usize;
    assert_eq!(std::thread::spawn(move || pause(srv_ptr as *mut tf_server, id)).join().unwrap(), TF_OK);
    // Within one loop iteration: give it a few.
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..5 {
        write_frame(&mut s, format!("held {i}").as_bytes());
    }
    assert!(
        holds_for(Duration::from_millis(300), || srv.rec().messages.load(Ordering::SeqCst) == 1),
        "delivered while paused: {:?}",
        messages_of(srv.rec(), id)
    );
    assert_eq!(std::thread::spawn(move || resume(srv_ptr as *mut tf_server, id)).join().unwrap(), TF_OK);
    srv.rec().wait_for("six frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 6);
    let want: Vec<Vec<u8>> =
        std::iter::once(b"before".to_vec()).chain((0..5).map(|i| format!("held {i}").into_bytes())).collect();
    assert_eq!(messages_of(srv.rec(), id), want);
}

#[test]
fn pause_slows_the_peer_by_tcp_backpressure() {
    let bad_order = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let (b2, n2) = (bad_order.clone(), next.clone());
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            record: false,
            on_message: Some(Box::new(move |_, _, data| {
                if seq_of(data) as u64 != n2.fetch_add(1, Ordering::SeqCst) {
                    b2.store(true, Ordering::SeqCst);
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut s, id) = srv.connect_id();
    assert_eq!(pause(srv.srv, id), TF_OK);
    wait_until("the pause to apply", || ok_info(srv.srv, id).paused == 1);
    std::thread::sleep(Duration::from_millis(20));
    // Up to 64 MiB of 4 KiB frames, written without blocking until the kernel
    // refuses: the server does not read, so its buffers and ours fill up.
    const N: u32 = 16 * 1024;
    let wire: Vec<u8> = (0..N).flat_map(|i| frame(&seq_payload(i, 4092))).collect();
    s.set_nonblocking(true).unwrap();
    let mut written = 0;
    let started = Instant::now();
    loop {
        match s.write(&wire[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Blocked: check that it stays blocked (not a momentary hiccup).
                std::thread::sleep(Duration::from_millis(50));
                match s.write(&wire[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write: {e}"),
                }
            }
            Err(e) => panic!("write: {e}"),
        }
        assert!(written < wire.len(), "64 MiB went through a paused connection: no backpressure");
        assert!(started.elapsed() < WAIT, "timed out filling the buffers");
    }
    assert_eq!(srv.rec().messages.load(Ordering::SeqCst), 0);
    let before = ok_info(srv.srv, id).bytes_received;
    let st_before = srv_stats(&srv).bytes_received;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ok_info(srv.srv, id).bytes_received, before, "the server went on reading a paused connection");
    assert_eq!(srv_stats(&srv).bytes_received, st_before);
    assert!(before < written as u64, "the server read all {written} bytes while paused");
    // Resume: everything arrives, in order, and the peer can finish writing.
    assert_eq!(resume(srv.srv, id), TF_OK);
    s.set_nonblocking(false).unwrap();
    s.write_all(&wire[written..]).unwrap();
    wait_until("every frame", || next.load(Ordering::SeqCst) == N as u64);
    assert!(!bad_order.load(Ordering::SeqCst), "frames out of order after resume");
}

#[test]
fn the_idle_timeout_does_not_run_while_paused() {
    let srv = HookServer::start(Opts { idle_ms: Some(300), ..Opts::default() }, no_hooks());
    let (_s, id) = srv.connect_id();
    assert_eq!(pause(srv.srv, id), TF_OK);
    assert!(
        holds_for(Duration::from_millis(1200), || srv.rec().closes_of(id).is_empty()),
        "closed while paused: reason {:?}",
        srv.rec().closes_of(id)
    );
    let resumed = Instant::now();
    assert_eq!(resume(srv.srv, id), TF_OK);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_IDLE, "the idle clock runs again after resume");
    let after = resumed.elapsed();
    assert!(after >= Duration::from_millis(250), "closed {after:?} after resume: the clock did not restart");
}

#[test]
fn the_idle_timeout_does_not_run_while_paused_inside_a_callback() {
    let srv = HookServer::start(Opts { idle_ms: Some(300), ..Opts::default() }, pausing_hooks(true));
    let (mut s, id) = srv.connect_id();
    write_frame(&mut s, b"pause");
    srv.rec().wait_for("the frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert!(holds_for(Duration::from_millis(1000), || srv.rec().closes_of(id).is_empty()));
    assert_eq!(resume(srv.srv, id), TF_OK);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_IDLE);
}

#[test]
fn pause_and_resume_are_idempotent_without_nesting() {
    let srv = HookServer::start(Opts::default(), no_hooks());
    let (mut s, id) = srv.connect_id();
    assert_eq!(resume(srv.srv, id), TF_OK, "resume of a connection never paused");
    assert_eq!(pause(srv.srv, id), TF_OK);
    assert_eq!(pause(srv.srv, id), TF_OK);
    wait_until("the pause to apply", || ok_info(srv.srv, id).paused == 1);
    write_frame(&mut s, b"held");
    assert!(holds_for(Duration::from_millis(200), || srv.rec().messages.load(Ordering::SeqCst) == 0));
    assert_eq!(resume(srv.srv, id), TF_OK, "one resume ends two pauses");
    srv.rec().wait_for("the frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert_eq!(resume(srv.srv, id), TF_OK);
    wait_until("paused 0", || ok_info(srv.srv, id).paused == 0);
    write_frame(&mut s, b"after");
    srv.rec().wait_for("two frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 2);
}

#[test]
fn pause_and_resume_codes() {
    let mut srv = TestServer::start(Opts::default());
    let (_s, id) = srv.connect_id();
    assert_eq!(pause(srv.srv, id + 100), TF_ERR_NO_CONN);
    assert_eq!(resume(srv.srv, id + 100), TF_ERR_NO_CONN);
    assert_eq!(pause(srv.srv, 0), TF_ERR_NO_CONN);
    assert_eq!(pause(std::ptr::null_mut(), id), TF_ERR_INVALID);
    assert_eq!(resume(std::ptr::null_mut(), id), TF_ERR_INVALID);
    assert_eq!(srv.stop(0), TF_OK);
    assert_eq!(pause(srv.srv, id), TF_ERR_STOPPED);
    assert_eq!(resume(srv.srv, id), TF_ERR_STOPPED);
}

#[test]
fn a_paused_peer_that_leaves_gets_its_frames_then_on_close_after_resume() {
    let srv = HookServer::start(Opts::default(), no_hooks());
    let (mut s, id) = srv.connect_id();
    assert_eq!(pause(srv.srv, id), TF_OK);
    wait_until("the pause to apply", || ok_info(srv.srv, id).paused == 1);
    for m in [&b"one"[..], b"two", b"three"] {
        write_frame(&mut s, m);
    }
    drop(s);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(srv.rec().messages.load(Ordering::SeqCst), 0);
    assert_eq!(resume(srv.srv, id), TF_OK);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_PEER);
    let evs: Vec<Ev> = srv.rec().snapshot().into_iter().filter(|e| !matches!(e, Ev::Connect(..))).collect();
    assert_eq!(
        evs,
        vec![
            Ev::Message(id, b"one".to_vec()),
            Ev::Message(id, b"two".to_vec()),
            Ev::Message(id, b"three".to_vec()),
            Ev::Close(id, TF_CLOSE_PEER)
        ]
    );
}

#[test]
fn resume_from_another_connections_callback() {
    // A says "hold": A is paused. B says "go": B's on_message resumes A.
    let a_id = Arc::new(AtomicU64::new(0));
    let a2 = a_id.clone();
    let srv = HookServer::start(
        Opts { threads: Some(1), ..Opts::default() }, // "go" recorded before A's frames: one loop's order
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                if data == b"hold" {
                    a2.store(conn, Ordering::SeqCst);
                    assert_eq!(pause(srv, conn), TF_OK);
                } else if data == b"go" {
                    assert_eq!(resume(srv, a2.load(Ordering::SeqCst)), TF_OK);
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut a, a_conn) = srv.connect_id();
    let (mut b, b_conn) = srv.connect_id();
    let mut wire = frame(b"hold");
    for i in 0..5 {
        wire.extend(frame(format!("a{i}").as_bytes()));
    }
    a.write_all(&wire).unwrap();
    srv.rec().wait_for("hold", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    std::thread::sleep(Duration::from_millis(200));
    write_frame(&mut b, b"go");
    srv.rec().wait_for("all", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 7);
    let order: Vec<(u64, Vec<u8>)> = srv
        .rec()
        .snapshot()
        .into_iter()
        .filter_map(|e| if let Ev::Message(c, d) = e { Some((c, d)) } else { None })
        .collect();
    let mut want = vec![(a_conn, b"hold".to_vec()), (b_conn, b"go".to_vec())];
    want.extend((0..5).map(|i| (a_conn, format!("a{i}").into_bytes())));
    assert_eq!(order, want);
}

/// The wire of frames `from..to`, each a 4-byte sequence number and 46 bytes.
fn seq_wire(from: u32, to: u32) -> Vec<u8> {
    (from..to).flat_map(|i| frame(&seq_payload(i, 50))).collect()
}

fn seqs(rec: &Recorder, conn: u64) -> Vec<u32> {
    messages_of(rec, conn).iter().map(|p| seq_of(p)).collect()
}

#[test]
fn resume_from_on_close_delivers_the_held_frames_before_newer_ones() {
    // P's first read holds frames 0..100; on_message pauses P at frame 0, so
    // 1..99 are held back. Then P sends 100..199 (they wait in the socket),
    // and another connection's on_close resumes P.
    let p_id = Arc::new(AtomicU64::new(0));
    let (p1, p2) = (p_id.clone(), p_id.clone());
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                if seq_of(data) == 0 {
                    p1.store(conn, Ordering::SeqCst);
                    assert_eq!(pause(srv, conn), TF_OK);
                }
            })),
            on_close: Some(Box::new(move |srv, _, _| {
                let p = p2.load(Ordering::SeqCst);
                if p != 0 {
                    resume(srv, p);
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut p, pid) = srv.connect_id();
    let (x, _) = srv.connect_id();
    p.write_all(&seq_wire(0, 100)).unwrap(); // 5 KB: one read
    srv.rec().wait_for("frame 0", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    p.write_all(&seq_wire(100, 200)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(x); // its on_close resumes P
    srv.rec().wait_for("200 frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() >= 200);
    let got = seqs(srv.rec(), pid);
    let first_wrong = got.iter().enumerate().find(|(i, &s)| *i as u32 != s);
    assert_eq!(
        got,
        (0..200).collect::<Vec<u32>>(),
        "frames out of order after a resume from on_close; first wrong at {first_wrong:?}"
    );
}

#[test]
fn resume_from_on_close_when_the_held_bytes_end_inside_a_frame() {
    // As above, but P's frames 0..400 (21.6 KB) take two reads: the bytes
    // held back at the pause end in the middle of a frame, and the rest of
    // that frame is still in the socket when another on_close resumes P.
    let p_id = Arc::new(AtomicU64::new(0));
    let (p1, p2) = (p_id.clone(), p_id.clone());
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                if data.len() == 50 && seq_of(data) == 0 {
                    p1.store(conn, Ordering::SeqCst);
                    assert_eq!(pause(srv, conn), TF_OK);
                }
            })),
            on_close: Some(Box::new(move |srv, _, _| {
                let p = p2.load(Ordering::SeqCst);
                if p != 0 {
                    resume(srv, p);
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut p, pid) = srv.connect_id();
    let (x, xid) = srv.connect_id();
    p.write_all(&seq_wire(0, 400)).unwrap();
    srv.rec().wait_for("frame 0", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    std::thread::sleep(Duration::from_millis(100));
    drop(x); // its on_close resumes P
    srv.rec().wait_close(xid);
    let deadline = Instant::now() + WAIT;
    while seqs(srv.rec(), pid).len() < 400 && srv.rec().closes_of(pid).is_empty() {
        assert!(Instant::now() < deadline, "only {} frames", seqs(srv.rec(), pid).len());
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let got = seqs(srv.rec(), pid);
    assert_eq!(
        (srv.rec().closes_of(pid), got.len()),
        (vec![], 400),
        "P closed or frames lost after the resume; frames got: {:?}...",
        &got[..got.len().min(5)]
    );
    assert_eq!(got, (0..400).collect::<Vec<u32>>());
}

#[test]
fn resume_from_on_writable_delivers_the_held_frames_before_newer_ones() {
    // The pipe pattern: P's frame 0 finds consumer C full (its queue filled
    // inside the callback, the kernel's buffers full already): P is paused
    // with frames 1..99 held. P sends 100..199; C reads; on_writable(C)
    // resumes P.
    let w = Arc::new(Writable::default());
    let ids = Arc::new(Mutex::new((0u64, 0u64))); // (P, C)
    let (i1, i2) = (ids.clone(), ids.clone());
    let w2 = w.clone();
    let srv = HookServer::start(
        Opts { max_queued: Some(QMAX), ..Opts::default() },
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                if seq_of(data) == 0 {
                    let c = i1.lock().unwrap().1;
                    i1.lock().unwrap().0 = conn;
                    assert_eq!(pause(srv, conn), TF_OK);
                    let chunk = [6u8; 16 * 1024];
                    while send(srv, c, &chunk) == TF_OK {}
                }
            })),
            on_writable: Some(Box::new(move |srv, conn| {
                w2.calls.lock().unwrap().push((conn, 0));
                let p = i2.lock().unwrap().0;
                resume(srv, p);
            })),
            ..Hooks::default()
        },
    );
    let (mut c, cid) = connect_slow(&srv);
    let (mut p, pid) = srv.connect_id();
    ids.lock().unwrap().1 = cid;
    saturate_kernel(srv.srv, cid, QMAX);
    p.write_all(&seq_wire(0, 100)).unwrap();
    srv.rec().wait_for("frame 0", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    p.write_all(&seq_wire(100, 200)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // C reads until on_writable has come.
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + WAIT;
    while w.count(cid) == 0 {
        assert!(Instant::now() < deadline, "no on_writable");
        let _ = c.read(&mut buf);
    }
    srv.rec().wait_for("200 frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() >= 200);
    let got = seqs(srv.rec(), pid);
    let first_wrong = got.iter().enumerate().find(|(i, &s)| *i as u32 != s);
    assert_eq!(
        got,
        (0..200).collect::<Vec<u32>>(),
        "frames out of order after a resume from on_writable; first wrong at {first_wrong:?}"
    );
}

#[test]
fn writing_to_a_paused_connection_goes_on() {
    let srv = HookServer::start(Opts::default(), no_hooks());
    let (mut s, id) = srv.connect_id();
    assert_eq!(pause(srv.srv, id), TF_OK);
    wait_until("the pause to apply", || ok_info(srv.srv, id).paused == 1);
    assert_eq!(send(srv.srv, id, b"to a paused peer"), TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"to a paused peer");
}

// ---------------------------------------------------------------- on_writable

/// Max queued output of the on_writable tests: well above what the kernel's
/// buffers take after they first look full (they go on growing a little), so
/// that a full queue stays above half until the peer reads.
const QMAX: u64 = 4 << 20;

#[derive(Default)]
struct Writable {
    /// (conn, queued_output seen inside on_writable)
    calls: Mutex<Vec<(u64, u64)>>,
}

impl Writable {
    fn count(&self, conn: u64) -> usize {
        self.calls.lock().unwrap().iter().filter(|c| c.0 == conn).count()
    }
}

fn writable_server(w: &Arc<Writable>, extra: Hooks) -> HookServer {
    let w2 = w.clone();
    HookServer::start(
        Opts { max_queued: Some(QMAX), ..Opts::default() },
        Hooks {
            on_writable: Some(Box::new(move |srv, conn| {
                let q = info(srv, conn).1.queued_output;
                w2.calls.lock().unwrap().push((conn, q));
            })),
            ..extra
        },
    )
}

#[test]
fn on_writable_is_called_once_when_a_full_queue_falls_to_half() {
    let w = Arc::new(Writable::default());
    let srv = writable_server(&w, no_hooks());
    let (mut s, id) = connect_slow(&srv);
    let chunk = vec![7u8; 16 * 1024];
    let before = saturate_kernel(srv.srv, id, QMAX);
    let n = fill_until_full(srv.srv, id, &chunk);
    assert_eq!(send(srv.srv, id, &chunk), TF_ERR_FULL, "a second TF_ERR_FULL in the same episode");
    assert!(holds_for(Duration::from_millis(300), || w.count(id) == 0), "on_writable while still full");
    read_bytes(&mut s, before + n * (4 + chunk.len()));
    wait_until("on_writable", || w.count(id) == 1);
    assert!(holds_for(Duration::from_millis(300), || w.count(id) == 1), "on_writable more than once");
    let (_, q) = w.calls.lock().unwrap()[0];
    assert!(q <= QMAX / 2, "on_writable with {q} bytes queued (limit {QMAX})");
}

#[test]
fn on_writable_after_a_host_thread_full_that_reaches_an_idle_loop() {
    // The queue is filled (without a TF_ERR_FULL) to within one frame of the
    // limit, and the loop is left idle; then one more tf_send from this
    // thread returns TF_ERR_FULL, and the peer reads everything. Nothing
    // else happens on the server: on_writable must still come.
    let w = Arc::new(Writable::default());
    let srv = writable_server(&w, no_hooks());
    let (mut s, id) = connect_slow(&srv);
    let chunk = vec![7u8; 16 * 1024];
    let mut owed = saturate_kernel(srv.srv, id, QMAX);
    while ok_info(srv.srv, id).queued_output + 2 * (4 + chunk.len() as u64) <= QMAX {
        assert_eq!(send(srv.srv, id, &chunk), TF_OK);
        owed += 4 + chunk.len();
    }
    assert_eq!(send(srv.srv, id, &chunk), TF_OK);
    owed += 4 + chunk.len();
    // Each try comes when the loop has applied every send before it and
    // sleeps (the kernel may still take a little more: then try again).
    loop {
        std::thread::sleep(Duration::from_millis(200));
        match send(srv.srv, id, &chunk) {
            TF_OK => owed += 4 + chunk.len(),
            TF_ERR_FULL => break,
            rc => panic!("tf_send: {rc}"),
        }
    }
    read_bytes(&mut s, owed);
    wait_until("the queue to empty", || ok_info(srv.srv, id).queued_output == 0);
    assert!(
        !holds_for(Duration::from_secs(3), || w.count(id) == 0),
        "no on_writable 3 s after the queue of a connection that got TF_ERR_FULL emptied"
    );
}

#[test]
fn on_writable_after_a_full_inside_a_callback() {
    let w = Arc::new(Writable::default());
    let fulls = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let (f2, s2) = (fulls.clone(), sent.clone());
    let srv = writable_server(
        &w,
        Hooks {
            on_message: Some(Box::new(move |srv, conn, _| {
                let chunk = [1u8; 16 * 1024];
                for _ in 0..(2 * QMAX as usize / chunk.len()) {
                    match send(srv, conn, &chunk) {
                        TF_OK => s2.fetch_add(1, Ordering::SeqCst),
                        _ => f2.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut s, id) = connect_slow(&srv);
    write_frame(&mut s, b"fill");
    srv.rec().wait_for("the fill", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert!(fulls.load(Ordering::SeqCst) > 0, "twice the limit never filled the queue");
    read_bytes(&mut s, sent.load(Ordering::SeqCst) * (4 + 16 * 1024));
    wait_until("on_writable", || w.count(id) == 1);
    assert!(holds_for(Duration::from_millis(300), || w.count(id) == 1));
    assert!(w.calls.lock().unwrap()[0].1 <= QMAX / 2);
}

#[test]
fn on_writable_once_per_full_episode() {
    let w = Arc::new(Writable::default());
    let srv = writable_server(&w, no_hooks());
    let (mut s, id) = connect_slow(&srv);
    let chunk = vec![7u8; 16 * 1024];
    for episode in 1..=3 {
        let n = fill_until_full(srv.srv, id, &chunk);
        read_bytes(&mut s, n * (4 + chunk.len()));
        wait_until("on_writable", || w.count(id) == episode);
    }
    assert!(holds_for(Duration::from_millis(300), || w.count(id) == 3));
}

#[test]
fn on_writable_is_not_called_without_a_full() {
    let w = Arc::new(Writable::default());
    let srv = writable_server(&w, no_hooks());
    let (mut s, id) = srv.connect_id();
    for _ in 0..100 {
        assert_eq!(send(srv.srv, id, &[3u8; 1000]), TF_OK);
        assert_eq!(read_frame(&mut s).unwrap().len(), 1000);
    }
    assert!(holds_for(Duration::from_millis(300), || w.calls.lock().unwrap().is_empty()));
}

#[test]
fn on_writable_is_not_called_when_the_connection_is_closed_first() {
    let w = Arc::new(Writable::default());
    let srv = writable_server(&w, no_hooks());
    let (mut s, id) = connect_slow(&srv);
    let chunk = vec![7u8; 16 * 1024];
    let before = saturate_kernel(srv.srv, id, QMAX);
    let n = fill_until_full(srv.srv, id, &chunk);
    assert_eq!(srv.hooks.rec.closes_of(id).len(), 0);
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_conn_close(srv.srv, id) }, TF_OK);
    // The queue still drains (a close writes what is queued) and passes half.
    read_bytes(&mut s, before + n * (4 + chunk.len()));
    assert!(ends(&mut s));
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_LOCAL);
    assert!(
        holds_for(Duration::from_millis(300), || w.count(id) == 0),
        "on_writable for a closed connection"
    );
}

#[test]
fn on_writable_is_not_called_when_the_peer_resets_first() {
    let w = Arc::new(Writable::default());
    let srv = writable_server(&w, no_hooks());
    let (s, id) = connect_slow(&srv);
    saturate_kernel(srv.srv, id, QMAX);
    fill_until_full(srv.srv, id, &[7u8; 16 * 1024]);
    reset(s);
    srv.rec().wait_close(id);
    assert!(holds_for(Duration::from_millis(300), || w.count(id) == 0));
}

#[test]
fn a_full_entry_of_send_many_counts_for_on_writable() {
    let w = Arc::new(Writable::default());
    let srv = writable_server(&w, no_hooks());
    let (mut slow, a) = connect_slow(&srv);
    let (mut fast, b) = srv.connect_id();
    let chunk = vec![9u8; 16 * 1024];
    let before = saturate_kernel(srv.srv, a, QMAX);
    // Fill A with tf_send_many only: its first TF_ERR_FULL is a skipped entry.
    let mut n = 0;
    loop {
        let (rc, q) = send_many(srv.srv, &[a], &chunk);
        assert_eq!(rc, TF_OK);
        if q == 0 {
            break;
        }
        n += 1;
        assert!(n < 65536, "never full");
    }
    assert_eq!(send_many(srv.srv, &[a, b], &chunk), (TF_OK, 1), "the full entry is skipped");
    assert_eq!(read_frame(&mut fast).unwrap(), chunk);
    read_bytes(&mut slow, before + n * (4 + chunk.len()));
    wait_until("on_writable(A)", || w.count(a) == 1);
    assert!(holds_for(Duration::from_millis(300), || w.count(a) == 1 && w.count(b) == 0));
}

// ---------------------------------------------------------------- pull mode

static PULL_WRITABLE_CALLS: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn pull_on_writable(_: *mut c_void, _: u64) {
    PULL_WRITABLE_CALLS.fetch_add(1, Ordering::SeqCst);
}

struct Pull {
    srv: *mut tf_server,
    port: u16,
}

impl Pull {
    fn start(o: Opts, writable: bool) -> Pull {
        let cfg = config(&o);
        let mut srv = std::ptr::null_mut();
        // SAFETY: cfg and srv are live.
        unsafe {
            if writable {
                assert_eq!(tf_config_set_on_writable(cfg, Some(pull_on_writable)), TF_OK);
            }
            assert_eq!(tf_server_start_pull(cfg, &mut srv), TF_OK, "{}", last_error());
            tf_config_free(cfg);
        }
        // SAFETY: srv is live.
        let port = unsafe { tf_server_port(srv) };
        Pull { srv, port }
    }

    /// Events of one poll as (kind, reason, conn, data is NULL, len, payload).
    fn poll(&self, timeout_ms: i32) -> Vec<(i32, i32, u64, bool, usize, Vec<u8>)> {
        let empty = tf_event { kind: 0, reason: 0, conn: 0, data: std::ptr::null(), len: 0 };
        let mut evs = vec![empty; 256];
        let mut n = 0usize;
        // SAFETY: evs has room for 256 events.
        let rc = unsafe { tf_server_poll(self.srv, evs.as_mut_ptr(), evs.len(), &mut n, timeout_ms) };
        assert_eq!(rc, TF_OK);
        evs[..n]
            .iter()
            .map(|e| {
                let data = if e.data.is_null() || e.len == 0 {
                    Vec::new()
                } else {
                    // SAFETY: valid until the next poll.
                    unsafe { std::slice::from_raw_parts(e.data, e.len) }.to_vec()
                };
                (e.kind, e.reason, e.conn, e.data.is_null(), e.len, data)
            })
            .collect()
    }

    fn wait_kind(&self, kind: i32) -> (i32, i32, u64, bool, usize, Vec<u8>) {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no event of kind {kind}");
            if let Some(e) = self.poll(50).into_iter().find(|e| e.0 == kind) {
                return e;
            }
        }
    }

    fn connect_slow(&self) -> (TcpStream, u64) {
        let s = connect_small_rcvbuf(std::net::SocketAddr::from(([127, 0, 0, 1], self.port)), 4096);
        let e = self.wait_kind(TF_EVENT_CONNECT);
        (s, e.2)
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        // SAFETY: from tf_server_start_pull, freed once.
        unsafe { tf_server_free(self.srv) };
    }
}

#[test]
fn pull_mode_gets_tf_event_writable_when_on_writable_is_set() {
    let before = PULL_WRITABLE_CALLS.load(Ordering::SeqCst);
    let p = Pull::start(Opts { max_queued: Some(QMAX), ..Opts::default() }, true);
    let (mut s, id) = p.connect_slow();
    let chunk = vec![5u8; 16 * 1024];
    let n = fill_until_full(p.srv, id, &chunk);
    read_bytes(&mut s, n * (4 + chunk.len()));
    let e = p.wait_kind(TF_EVENT_WRITABLE);
    assert_eq!((e.0, e.1, e.2, e.3, e.4), (TF_EVENT_WRITABLE, 0, id, true, 0));
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        assert!(p.poll(20).iter().all(|e| e.0 != TF_EVENT_WRITABLE), "a second TF_EVENT_WRITABLE");
    }
    assert_eq!(PULL_WRITABLE_CALLS.load(Ordering::SeqCst), before, "the function itself is not called");
}

#[test]
fn pull_mode_never_gets_tf_event_writable_without_on_writable() {
    let p = Pull::start(Opts { max_queued: Some(QMAX), ..Opts::default() }, false);
    let (mut s, id) = p.connect_slow();
    let chunk = vec![5u8; 16 * 1024];
    let n = fill_until_full(p.srv, id, &chunk);
    read_bytes(&mut s, n * (4 + chunk.len()));
    write_frame(&mut s, b"marker");
    let end = Instant::now() + Duration::from_millis(500);
    let mut marker = false;
    while Instant::now() < end || !marker {
        for e in p.poll(20) {
            assert!(e.0 >= TF_EVENT_CONNECT && e.0 <= TF_EVENT_CLOSE, "event of kind {} delivered", e.0);
            marker |= e.0 == TF_EVENT_MESSAGE && e.5 == b"marker";
        }
    }
}

#[test]
fn pull_mode_pause_holds_message_events_until_resume() {
    let p = Pull::start(Opts::default(), false);
    let (mut s, id) = p.connect_slow();
    assert_eq!(pause(p.srv, id), TF_OK);
    wait_until("the pause to apply", || ok_info(p.srv, id).paused == 1);
    for m in [&b"x"[..], b"y"] {
        write_frame(&mut s, m);
    }
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        assert!(p.poll(20).is_empty(), "an event while paused");
    }
    assert_eq!(resume(p.srv, id), TF_OK);
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 2 {
        assert!(Instant::now() < deadline);
        got.extend(p.poll(50).into_iter().filter(|e| e.0 == TF_EVENT_MESSAGE).map(|e| e.5));
    }
    assert_eq!(got, vec![b"x".to_vec(), b"y".to_vec()]);
}

#[test]
fn pull_mode_user_data_is_readable_until_the_poll_after_the_close_event() {
    let p = Pull::start(Opts::default(), false);
    let (s, id) = p.connect_slow();
    assert_eq!(set_ud(p.srv, id, tag(11)), TF_OK);
    drop(s);
    let e = p.wait_kind(TF_EVENT_CLOSE);
    assert_eq!(e.2, id);
    assert_eq!(ud(p.srv, id), tag(11), "readable while the host handles the CLOSE event");
    p.poll(0);
    assert!(ud(p.srv, id).is_null(), "forgotten at the next poll");
    assert_eq!(set_ud(p.srv, id, tag(12)), TF_ERR_NO_CONN);
}

// ---------------------------------------------------------------- tf_sendv

#[test]
fn sendv_with_zero_pieces_sends_an_empty_frame() {
    let srv = TestServer::start(Opts::default());
    let (mut s, id) = srv.connect_id();
    // SAFETY: NULL iov with iovcnt 0 is allowed.
    assert_eq!(unsafe { tf_sendv(srv.srv, id, std::ptr::null(), 0) }, TF_OK);
    let one = tf_iovec { base: b"ignored".as_ptr(), len: 7 };
    // SAFETY: iov is live; iovcnt 0 reads nothing.
    assert_eq!(unsafe { tf_sendv(srv.srv, id, &one, 0) }, TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"");
    assert_eq!(read_frame(&mut s).unwrap(), b"");
}

#[test]
fn sendv_with_one_piece_is_tf_send() {
    let srv = TestServer::start(Opts::default());
    let (mut s, id) = srv.connect_id();
    assert_eq!(sendv(srv.srv, id, &[b"hello"]), TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"hello");
}

#[test]
fn sendv_with_many_pieces_sends_them_joined_as_one_frame() {
    let srv = TestServer::start(Opts::default());
    let (mut s, id) = srv.connect_id();
    let big = pattern(200_000, 3);
    let pieces: Vec<&[u8]> = vec![b"head:", b"", b"mid", &big, b"", b":tail"];
    assert_eq!(sendv(srv.srv, id, &pieces), TF_OK);
    // Many small pieces too.
    let small: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().to_vec()).collect();
    let refs: Vec<&[u8]> = small.iter().map(|v| v.as_slice()).collect();
    assert_eq!(sendv(srv.srv, id, &refs), TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), pieces.concat());
    assert_eq!(read_frame(&mut s).unwrap(), small.concat());
    wait_until("two frames sent", || ok_info(srv.srv, id).frames_sent == 2);
}

#[test]
fn sendv_null_cases_are_invalid_and_queue_nothing() {
    let srv = TestServer::start(Opts::default());
    let (mut s, id) = srv.connect_id();
    // SAFETY: the library must reject the NULL pointer.
    assert_eq!(unsafe { tf_sendv(srv.srv, id, std::ptr::null(), 1) }, TF_ERR_INVALID);
    let iov = [tf_iovec { base: b"ok".as_ptr(), len: 2 }, tf_iovec { base: std::ptr::null(), len: 3 }];
    // SAFETY: iov is live; its second base is NULL with a length, which must be refused.
    assert_eq!(unsafe { tf_sendv(srv.srv, id, iov.as_ptr(), 2) }, TF_ERR_INVALID);
    // SAFETY: as above.
    assert_eq!(unsafe { tf_sendv(std::ptr::null_mut(), id, iov.as_ptr(), 1) }, TF_ERR_INVALID);
    // A NULL base with len 0 is an empty piece.
    let iov = [tf_iovec { base: std::ptr::null(), len: 0 }, tf_iovec { base: b"z".as_ptr(), len: 1 }];
    // SAFETY: iov is live.
    assert_eq!(unsafe { tf_sendv(srv.srv, id, iov.as_ptr(), 2) }, TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"z", "the refused calls queued nothing");
}

#[test]
fn sendv_longer_than_max_frame_is_too_large() {
    let srv = TestServer::start(Opts { max_frame: Some(1000), ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    let a = [1u8; 600];
    assert_eq!(sendv(srv.srv, id, &[&a, &[2u8; 401]]), TF_ERR_TOO_LARGE);
    assert_eq!(sendv(srv.srv, id, &[&a, &[2u8; 400]]), TF_OK);
    assert_eq!(read_frame(&mut s).unwrap().len(), 1000);
}

#[test]
fn sendv_codes_follow_tf_send() {
    let mut srv = TestServer::start(Opts { max_queued: Some(64 * 1024), ..Opts::default() });
    let (_s, id) = srv.connect_id();
    assert_eq!(sendv(srv.srv, id + 100, &[b"x"]), TF_ERR_NO_CONN);
    assert_eq!(sendv(srv.srv, id, &[&[0u8; 40 * 1024], &[0u8; 30 * 1024]]), TF_ERR_FULL, "beyond the limit");
    assert_eq!(srv.close(id), TF_OK);
    assert_eq!(sendv(srv.srv, id, &[b"x"]), TF_ERR_NO_CONN, "after tf_conn_close");
    assert_eq!(srv.stop(0), TF_OK);
    assert_eq!(sendv(srv.srv, id, &[b"x"]), TF_ERR_STOPPED);
}

#[test]
fn sendv_inside_on_message() {
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(|srv, conn, data| {
                assert_eq!(sendv(srv, conn, &[b"echo:", data, b"!"]), TF_OK);
            })),
            ..Hooks::default()
        },
    );
    let (mut s, _) = srv.connect_id();
    write_frame(&mut s, b"ping");
    assert_eq!(read_frame(&mut s).unwrap(), b"echo:ping!");
}

// ---------------------------------------------------------------- tf_send_many

#[test]
fn send_many_reaches_every_listed_connection() {
    let srv = TestServer::start(Opts::default());
    let peers: Vec<(TcpStream, u64)> = (0..5).map(|_| srv.connect_id()).collect();
    let ids: Vec<u64> = peers.iter().map(|p| p.1).collect();
    let small = pattern(64, 1);
    let big = pattern(4096, 2); // held once and shared
    assert_eq!(send_many(srv.srv, &ids, &small), (TF_OK, 5));
    assert_eq!(send_many(srv.srv, &ids, &big), (TF_OK, 5));
    assert_eq!(send_many(srv.srv, &ids[..1], &big), (TF_OK, 1));
    for (i, (mut s, _)) in peers.into_iter().enumerate() {
        assert_eq!(read_frame(&mut s).unwrap(), small);
        assert_eq!(read_frame(&mut s).unwrap(), big);
        if i == 0 {
            assert_eq!(read_frame(&mut s).unwrap(), big);
        }
    }
}

#[test]
fn send_many_skips_unknown_and_closed_ids() {
    let srv = TestServer::start(Opts::default());
    let (mut a, ia) = srv.connect_id();
    let (b, ib) = srv.connect_id();
    let (mut c, ic) = srv.connect_id();
    let (_d, id_closing) = srv.connect_id();
    drop(b);
    srv.rec.wait_close(ib);
    assert_eq!(srv.close(id_closing), TF_OK);
    for payload in [pattern(100, 1), pattern(2000, 2)] {
        let ids = [ia, 0, ib, ic + 1000, id_closing, ic];
        assert_eq!(send_many(srv.srv, &ids, &payload), (TF_OK, 2));
        assert_eq!(read_frame(&mut a).unwrap(), payload);
        assert_eq!(read_frame(&mut c).unwrap(), payload);
    }
}

#[test]
fn send_many_gives_an_id_listed_twice_the_frame_twice() {
    let srv = TestServer::start(Opts::default());
    let (mut a, ia) = srv.connect_id();
    let (mut b, ib) = srv.connect_id();
    for payload in [pattern(10, 1), pattern(1000, 2)] {
        assert_eq!(send_many(srv.srv, &[ia, ib, ia], &payload), (TF_OK, 3));
        assert_eq!(read_frame(&mut a).unwrap(), payload);
        assert_eq!(read_frame(&mut a).unwrap(), payload);
        assert_eq!(read_frame(&mut b).unwrap(), payload);
    }
    // b got exactly one of each: the next frame it sees is this marker.
    assert_eq!(srv.send(ib, b"marker"), TF_OK);
    assert_eq!(read_frame(&mut b).unwrap(), b"marker");
}

#[test]
fn send_many_skips_a_full_connection() {
    let srv = TestServer::start(Opts { max_queued: Some(QMAX), ..Opts::default() });
    let slow = connect_small_rcvbuf(srv.addr, 4096);
    let ia = srv.rec.wait_connect(1)[0];
    let (mut b, ib) = srv.connect_id();
    saturate_kernel(srv.srv, ia, QMAX);
    let payload = pattern(16 * 1024, 4);
    // The loop may move some of a's queue into its socket between the fill
    // and the call (the kernel's buffer grows): then a had room and took it;
    // fill again. A full connection must be skipped.
    let mut skipped = false;
    for _ in 0..50 {
        fill_until_full(srv.srv, ia, &[1u8; 16 * 1024]);
        let (rc, took) = send_many(srv.srv, &[ia, ib], &payload);
        assert_eq!(rc, TF_OK);
        assert_eq!(read_frame(&mut b).unwrap(), payload);
        if took == 1 {
            skipped = true;
            break;
        }
        assert_eq!(took, 2);
    }
    assert!(skipped, "send_many never skipped the full connection");
    drop(slow);
}

#[test]
fn send_many_with_no_entries_is_ok_whatever_conns_is() {
    let srv = TestServer::start(Opts::default());
    let mut q = usize::MAX;
    // SAFETY: n = 0: conns is not read.
    assert_eq!(unsafe { tf_send_many(srv.srv, std::ptr::null(), 0, b"x".as_ptr(), 1, &mut q) }, TF_OK);
    assert_eq!(q, 0);
    let dangling = std::ptr::NonNull::<u64>::dangling().as_ptr();
    // SAFETY: as above.
    assert_eq!(unsafe { tf_send_many(srv.srv, dangling, 0, b"x".as_ptr(), 1, std::ptr::null_mut()) }, TF_OK);
}

#[test]
fn send_many_null_cases() {
    let srv = TestServer::start(Opts::default());
    let (mut a, ia) = srv.connect_id();
    let mut q = usize::MAX;
    // SAFETY: the library must reject the NULL pointers.
    unsafe {
        assert_eq!(tf_send_many(srv.srv, std::ptr::null(), 2, b"x".as_ptr(), 1, &mut q), TF_ERR_INVALID);
        assert_eq!(tf_send_many(srv.srv, &ia, 1, std::ptr::null(), 5, &mut q), TF_ERR_INVALID);
        assert_eq!(tf_send_many(std::ptr::null_mut(), &ia, 1, b"x".as_ptr(), 1, &mut q), TF_ERR_INVALID);
        // NULL data with len 0: an empty frame; NULL queued is fine.
        assert_eq!(tf_send_many(srv.srv, &ia, 1, std::ptr::null(), 0, &mut q), TF_OK);
        assert_eq!(q, 1);
        assert_eq!(tf_send_many(srv.srv, &ia, 1, b"y".as_ptr(), 1, std::ptr::null_mut()), TF_OK);
    }
    assert_eq!(read_frame(&mut a).unwrap(), b"", "the refused calls queued nothing");
    assert_eq!(read_frame(&mut a).unwrap(), b"y");
}

#[test]
fn send_many_too_large_and_stopped() {
    let mut srv = TestServer::start(Opts { max_frame: Some(1000), ..Opts::default() });
    let (mut a, ia) = srv.connect_id();
    assert_eq!(send_many(srv.srv, &[ia], &[0u8; 1001]).0, TF_ERR_TOO_LARGE);
    assert_eq!(send_many(srv.srv, &[ia], &[0u8; 1000]), (TF_OK, 1));
    assert_eq!(read_frame(&mut a).unwrap().len(), 1000, "the refused call queued nothing");
    assert_eq!(srv.stop(0), TF_OK);
    assert_eq!(send_many(srv.srv, &[ia], b"x").0, TF_ERR_STOPPED);
}

#[test]
fn send_many_inside_on_message_broadcasts() {
    let members = Arc::new(Mutex::new(Vec::<u64>::new()));
    let (m1, m2) = (members.clone(), members.clone());
    let queued = Arc::new(Mutex::new(Vec::new()));
    let q2 = queued.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_connect: Some(Box::new(move |_, conn| {
                m1.lock().unwrap().push(conn);
                0
            })),
            on_message: Some(Box::new(move |srv, _, data| {
                let ids = m2.lock().unwrap().clone();
                q2.lock().unwrap().push(send_many(srv, &ids, data));
            })),
            ..Hooks::default()
        },
    );
    let mut peers: Vec<TcpStream> = (0..4).map(|_| srv.connect_id().0).collect();
    let big = pattern(3000, 9);
    write_frame(&mut peers[0], &big);
    for p in &mut peers {
        assert_eq!(read_frame(p).unwrap(), big);
    }
    assert_eq!(*queued.lock().unwrap(), vec![(TF_OK, 4)]);
}

// ---------------------------------------------------------------- slow consumer

#[test]
fn slow_consumer_settings_are_validated() {
    let cfg = tf_config_new();
    // SAFETY: cfg is live; NULL is refused.
    unsafe {
        assert_eq!(tf_config_set_slow_consumer(cfg, 1024, 0), TF_ERR_INVALID);
        assert_eq!(tf_config_set_slow_consumer(cfg, 0, 0), TF_OK);
        assert_eq!(tf_config_set_slow_consumer(cfg, 1024, 1), TF_OK);
        assert_eq!(tf_config_set_slow_consumer(std::ptr::null_mut(), 1024, 1), TF_ERR_INVALID);
        assert_eq!(tf_config_set_on_writable(std::ptr::null_mut(), None), TF_ERR_INVALID);
        assert_eq!(tf_config_set_on_writable(cfg, None), TF_OK);
        tf_config_free(cfg);
    }
}

fn slow_server(soft: u64, secs: u32) -> HookServer {
    HookServer::start_with(Opts { max_queued: Some(64 << 20), ..Opts::default() }, no_hooks(), |cfg| {
        // SAFETY: cfg is live.
        assert_eq!(unsafe { tf_config_set_slow_consumer(cfg, soft, secs) }, TF_OK);
    })
}

/// Queues `total` bytes of 64 KiB frames for conn (from this thread).
fn queue_bytes(srv: *mut tf_server, conn: u64, total: usize) -> usize {
    let chunk = vec![0x5au8; 64 * 1024];
    let n = total / chunk.len();
    for _ in 0..n {
        assert_eq!(send(srv, conn, &chunk), TF_OK);
    }
    n * (4 + chunk.len())
}

#[test]
fn a_slow_consumer_is_closed_after_the_configured_seconds_and_not_before() {
    let srv = slow_server(64 * 1024, 1);
    let (mut s, id) = connect_slow(&srv);
    let t0 = Instant::now();
    let owed = queue_bytes(srv.srv, id, 8 << 20);
    assert!(
        holds_for(Duration::from_millis(800), || srv.rec().closes_of(id).is_empty()),
        "closed {:?} after going above the soft limit (limit: 1 s)",
        t0.elapsed()
    );
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_SLOW);
    let at = t0.elapsed();
    assert!(at >= Duration::from_millis(950), "closed after {at:?}");
    assert!(at < Duration::from_secs(3), "closed only after {at:?}");
    // Its queued output was discarded: the peer gets the end of the stream
    // well before everything it was owed.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    assert!(got < owed, "the peer got all {owed} bytes of a discarded queue");
}

#[test]
fn a_consumer_that_catches_up_in_time_is_not_closed() {
    let srv = slow_server(64 * 1024, 2);
    let (mut s, id) = connect_slow(&srv);
    let owed = queue_bytes(srv.srv, id, 4 << 20);
    std::thread::sleep(Duration::from_millis(1000));
    read_bytes(&mut s, owed);
    assert!(
        holds_for(Duration::from_millis(2500), || srv.rec().closes_of(id).is_empty()),
        "closed although it caught up: {:?}",
        srv.rec().closes_of(id)
    );
    assert_eq!(send(srv.srv, id, b"still here"), TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"still here");
}

#[test]
fn slow_consumer_time_above_the_limit_must_be_without_a_break() {
    // Two episodes of 0.9 s above the soft limit, with the queue drained in
    // between: 1.8 s in all, but never 1.5 s without a break.
    let srv = slow_server(64 * 1024, 2);
    let (mut s, id) = connect_slow(&srv);
    for _ in 0..2 {
        let owed = queue_bytes(srv.srv, id, 4 << 20);
        std::thread::sleep(Duration::from_millis(1200));
        read_bytes(&mut s, owed);
    }
    assert!(holds_for(Duration::from_millis(500), || srv.rec().closes_of(id).is_empty()));
}

#[test]
fn without_the_policy_a_backlog_is_never_closed_as_slow() {
    let srv = HookServer::start(Opts { max_queued: Some(64 << 20), ..Opts::default() }, no_hooks());
    let (mut s, id) = connect_slow(&srv);
    let owed = queue_bytes(srv.srv, id, 4 << 20);
    assert!(holds_for(Duration::from_millis(1500), || srv.rec().closes_of(id).is_empty()));
    read_bytes(&mut s, owed);
}

// ---------------------------------------------------------------- tf_conn_get_info

#[test]
fn conn_info_counters_match_what_the_peer_sent_and_received() {
    let srv = TestServer::start(Opts::default()); // echoes
    let (mut s, id) = srv.connect_id();
    let payloads: Vec<Vec<u8>> = vec![vec![], b"a".to_vec(), pattern(1000, 1), pattern(70_000, 2)];
    let mut wire = Vec::new();
    for p in &payloads {
        wire.extend(frame(p));
    }
    s.write_all(&wire).unwrap();
    for p in &payloads {
        assert_eq!(&read_frame(&mut s).unwrap(), p);
    }
    let n = payloads.len() as u64;
    let bytes = wire.len() as u64;
    wait_until("every frame counted as sent", || ok_info(srv.srv, id).frames_sent == n);
    let i = ok_info(srv.srv, id);
    assert_eq!(i.bytes_received, bytes, "prefixes included, as the peer wrote them");
    assert_eq!(i.frames_received, n);
    assert_eq!(i.bytes_sent, bytes, "what the peer read");
    assert_eq!(i.frames_sent, n);
    assert_eq!(i.queued_output, 0);
    assert_eq!((i.outbound, i.paused, i.reserved), (0, 0, 0));
    let threads = threads_from_env().unwrap_or(1).max(1);
    assert!(i.thread < threads, "thread {} of {threads}", i.thread);
    let connect_peer = match &srv.rec.snapshot()[0] {
        Ev::Connect(c, p) if *c == id => p.clone(),
        other => panic!("first event {other:?}"),
    };
    assert_eq!(peer_text(&i), connect_peer, "the text on_connect got");
    assert_eq!(peer_text(&i), s.local_addr().unwrap().to_string(), "the peer's real address");
}

#[test]
fn conn_info_queued_output_is_what_was_accepted_and_not_written() {
    let srv = HookServer::start(Opts { max_queued: Some(64 << 20), ..Opts::default() }, no_hooks());
    let (mut s, id) = connect_slow(&srv);
    let chunk = vec![1u8; 64 * 1024];
    let frames = 256; // 16 MiB: more than the kernel's buffers take
    for _ in 0..frames {
        assert_eq!(send(srv.srv, id, &chunk), TF_OK);
    }
    let total = frames as u64 * (4 + chunk.len() as u64);
    std::thread::sleep(Duration::from_millis(200));
    let i = ok_info(srv.srv, id);
    assert!(i.queued_output > 0, "a non-reading peer: something must still be queued");
    assert_eq!(i.queued_output + i.bytes_sent, total, "queued + written = accepted");
    assert!(i.frames_sent < frames as u64);
    read_bytes(&mut s, total as usize);
    wait_until("the queue to empty", || ok_info(srv.srv, id).queued_output == 0);
    let i = ok_info(srv.srv, id);
    assert_eq!((i.bytes_sent, i.frames_sent), (total, frames as u64));
}

#[test]
fn conn_info_paused_flag_follows_pause_and_resume() {
    let srv = HookServer::start(Opts::default(), pausing_hooks(true));
    let (mut s, id) = srv.connect_id();
    assert_eq!(ok_info(srv.srv, id).paused, 0);
    // From a host thread (applied by the loop within an iteration).
    assert_eq!(pause(srv.srv, id), TF_OK);
    wait_until("paused = 1", || ok_info(srv.srv, id).paused == 1);
    assert_eq!(resume(srv.srv, id), TF_OK);
    wait_until("paused = 0", || ok_info(srv.srv, id).paused == 0);
    // From inside a callback: at once.
    write_frame(&mut s, b"pause");
    srv.rec().wait_for("the frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert_eq!(ok_info(srv.srv, id).paused, 1);
    assert_eq!(resume(srv.srv, id), TF_OK);
    wait_until("paused = 0", || ok_info(srv.srv, id).paused == 0);
}

#[test]
fn conn_info_paused_is_1_as_soon_as_tf_conn_pause_returns_on_a_host_thread() {
    // "paused: 1 between tf_conn_pause and tf_conn_resume". The loop is kept
    // busy in another connection's on_message, so it cannot apply a host
    // thread's pause or resume before the host looks.
    let busy = Arc::new(AtomicBool::new(false));
    let b2 = busy.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |_, _, data| {
                if data == b"sleep" {
                    b2.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(400));
                    b2.store(false, Ordering::SeqCst);
                }
            })),
            ..Hooks::default()
        },
    );
    let (_a, a) = srv.connect_id();
    let (mut b, _) = srv.connect_id();
    write_frame(&mut b, b"sleep");
    wait_until("the loop to be busy", || busy.load(Ordering::SeqCst));
    assert_eq!(pause(srv.srv, a), TF_OK);
    let after_pause = ok_info(srv.srv, a).paused;
    let still_busy = busy.load(Ordering::SeqCst);
    wait_until("the loop to be free", || !busy.load(Ordering::SeqCst));
    wait_until("the pause to apply", || ok_info(srv.srv, a).paused == 1);
    write_frame(&mut b, b"sleep");
    wait_until("the loop to be busy", || busy.load(Ordering::SeqCst));
    assert_eq!(resume(srv.srv, a), TF_OK);
    let after_resume = ok_info(srv.srv, a).paused;
    assert!(still_busy, "the loop was not busy long enough for the check");
    assert_eq!(
        (after_pause, after_resume),
        (1, 0),
        "tf_conn_get_info().paused right after tf_conn_pause / tf_conn_resume returned on a host thread"
    );
}

#[test]
fn conn_info_age_counts_from_the_accept() {
    let srv = TestServer::start(Opts::default());
    let t0 = Instant::now();
    let (_s, id) = srv.connect_id();
    let a = ok_info(srv.srv, id).age_ms;
    std::thread::sleep(Duration::from_millis(300));
    let b = ok_info(srv.srv, id).age_ms;
    let bound = t0.elapsed().as_millis() as u64;
    assert!(a <= b, "age went backwards: {a} then {b}");
    assert!(b >= 300 && b <= bound, "age {b} ms after sleeping 300 ms ({bound} ms since connect)");
}

#[test]
fn conn_info_codes_and_nothing_written_on_failure() {
    let srv = TestServer::start(Opts::default());
    let (s, id) = srv.connect_id();
    let (rc, i) = info(srv.srv, id + 100);
    assert_eq!(rc, TF_ERR_NO_CONN);
    assert_eq!((i.bytes_received, i.paused, i.peer[0]), (u64::MAX, -1, 0x55), "written on failure");
    // SAFETY: the library must reject the NULL pointers.
    unsafe {
        assert_eq!(tf_conn_get_info(srv.srv, id, std::ptr::null_mut()), TF_ERR_INVALID);
        let mut out = blank_info();
        assert_eq!(tf_conn_get_info(std::ptr::null(), id, &mut out), TF_ERR_INVALID);
    }
    drop(s);
    srv.rec.wait_close(id);
    wait_until("forgotten", || info(srv.srv, id).0 == TF_ERR_NO_CONN);
}

#[test]
fn conn_info_inside_callbacks() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, _| {
                let (rc, i) = info(srv, conn);
                s2.lock().unwrap().push((rc, i.frames_received, i.bytes_received));
            })),
            ..Hooks::default()
        },
    );
    let (mut s, _) = srv.connect_id();
    write_frame(&mut s, b"12345");
    srv.rec().wait_for("the frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    assert_eq!(*seen.lock().unwrap(), vec![(TF_OK, 1, 9)], "counted before the callback runs");
}

//! Batched delivery and sends (API.md, "Batched delivery and sends"):
//! tf_config_set_on_messages, tf_send_batch, and the packed forms
//! tf_events_pack / tf_send_packed. One behaviour per test, real sockets on
//! 127.0.0.1, bounded waits; both backends (TCPFRAME_TEST_BACKEND=poll).
mod common;
use common::*;
use std::ffi::{c_void, CString};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

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

fn messages(rec: &Recorder) -> Vec<(u64, Vec<u8>)> {
    rec.snapshot()
        .into_iter()
        .filter_map(|e| if let Ev::Message(c, d) = e { Some((c, d)) } else { None })
        .collect()
}

fn messages_of(rec: &Recorder, conn: u64) -> Vec<Vec<u8>> {
    messages(rec).into_iter().filter(|m| m.0 == conn).map(|m| m.1).collect()
}

fn count_messages(rec: &Recorder) -> usize {
    rec.snapshot().iter().filter(|e| matches!(e, Ev::Message(..))).count()
}

/// A batched server: on_messages records each call's size; frames are
/// recorded by the harness.
fn batched(o: Opts, sizes: &Arc<Mutex<Vec<usize>>>, more: Option<HookMessages>) -> HookServer {
    let s2 = sizes.clone();
    HookServer::start(
        o,
        Hooks {
            on_messages: Some(Box::new(move |srv, evs| {
                s2.lock().unwrap().push(evs.len());
                if let Some(f) = &more {
                    f(srv, evs);
                }
            })),
            ..Hooks::default()
        },
    )
}

fn out(conn: u64, data: &[u8]) -> tf_out {
    tf_out {
        conn,
        data: if data.is_empty() { std::ptr::null() } else { data.as_ptr() },
        len: data.len(),
        result: -7,
    }
}

fn payload_of(e: &tf_event) -> Vec<u8> {
    if e.len == 0 {
        Vec::new()
    } else {
        // SAFETY: an event's data is `len` readable bytes while it is valid.
        unsafe { std::slice::from_raw_parts(e.data, e.len) }.to_vec()
    }
}

/// One record of tf_events_pack's layout.
#[derive(Debug, PartialEq, Eq)]
struct Packed {
    kind: i32,
    reason: i32,
    conn: u64,
    data: Vec<u8>,
}

/// Parses tf_events_pack's output; panics when it does not parse exactly.
fn unpack(mut b: &[u8]) -> Vec<Packed> {
    let mut v = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 24, "a record header cut short: {} bytes left", b.len());
        let kind = i32::from_le_bytes(b[0..4].try_into().unwrap());
        let reason = i32::from_le_bytes(b[4..8].try_into().unwrap());
        let conn = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let len = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
        assert!(b.len() >= 24 + len, "a record runs past the end");
        v.push(Packed { kind, reason, conn, data: b[24..24 + len].to_vec() });
        b = &b[24 + len..];
    }
    v
}

/// tf_send_packed's input layout.
fn pack_sends(frames: &[(u64, &[u8])]) -> Vec<u8> {
    let mut v = Vec::new();
    for (conn, data) in frames {
        v.extend_from_slice(&conn.to_le_bytes());
        v.extend_from_slice(&(data.len() as u64).to_le_bytes());
        v.extend_from_slice(data);
    }
    v
}

/// tf_send_packed's code, the results it wrote and *count (usize::MAX: not written).
fn send_packed(srv: *mut tf_server, buf: &[u8], max: usize) -> (i32, Vec<i32>, usize) {
    let mut results = vec![-7i32; max];
    let mut count = usize::MAX;
    // SAFETY: buf and results are live; results has room for max codes.
    let rc = unsafe { tf_send_packed(srv, buf.as_ptr(), buf.len(), results.as_mut_ptr(), max, &mut count) };
    (rc, results, count)
}

/// tf_events_pack's code, *needed and the bytes (cap bytes, 0xEE where unwritten).
fn events_pack(events: &[tf_event], cap: usize) -> (i32, usize, Vec<u8>) {
    let mut buf = vec![0xEEu8; cap];
    let mut needed = usize::MAX;
    // SAFETY: events and buf are live.
    let rc = unsafe { tf_events_pack(events.as_ptr(), events.len(), buf.as_mut_ptr(), cap, &mut needed) };
    (rc, needed, buf)
}

// ---------------------------------------------------------------- on_messages

#[test]
fn on_messages_gets_every_frame_in_order_with_count_at_least_one() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let b2 = bad.clone();
    let srv = batched(
        Opts::default(),
        &sizes,
        Some(Box::new(move |_, evs| {
            for e in evs {
                if e.kind != TF_EVENT_MESSAGE || e.reason != 0 || (e.len > 0 && e.data.is_null()) {
                    b2.lock().unwrap().push((e.kind, e.reason, e.len));
                }
            }
        })),
    );
    let peers: Vec<(TcpStream, u64)> = (0..3).map(|_| srv.connect_id()).collect();
    let per = 2000u32;
    let wires: Vec<Vec<u8>> = (0..3u8)
        .map(|k| {
            (0..per)
                .flat_map(|i| {
                    let len = [0usize, 1, 7, 300, 5000][(i % 5) as usize];
                    let mut p = pattern(len.max(5), k);
                    p[..4].copy_from_slice(&i.to_le_bytes());
                    p[4] = k;
                    frame(if len == 0 { &[] } else { &p[..len.max(5)] })
                })
                .collect()
        })
        .collect();
    std::thread::scope(|scope| {
        for ((s, _), w) in peers.iter().zip(&wires) {
            let mut s = s.try_clone().unwrap();
            scope.spawn(move || s.write_all(w).unwrap());
        }
    });
    srv.rec().wait_for("every frame", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 6000);
    assert!(bad.lock().unwrap().is_empty(), "events that are not plain messages: {:?}", bad.lock().unwrap());
    let sizes = sizes.lock().unwrap().clone();
    assert!(sizes.iter().all(|&n| n >= 1), "an on_messages call with count 0");
    assert_eq!(sizes.iter().sum::<usize>(), 6000);
    for (k, (_, id)) in peers.iter().enumerate() {
        let got = messages_of(srv.rec(), *id);
        assert_eq!(got.len(), per as usize);
        for (i, p) in got.iter().enumerate() {
            let len = [0usize, 1, 7, 300, 5000][i % 5];
            if len == 0 {
                assert!(p.is_empty(), "frame {i} of connection {k}");
            } else {
                let mut want = pattern(len.max(5), k as u8);
                want[..4].copy_from_slice(&(i as u32).to_le_bytes());
                want[4] = k as u8;
                assert_eq!(p[..], want[..len.max(5)], "frame {i} of connection {k}: out of order or damaged");
            }
        }
    }
}

#[test]
fn on_messages_carries_many_frames_per_call() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let srv = batched(Opts::default(), &sizes, None);
    let (mut s, _) = srv.connect_id();
    let wire: Vec<u8> = (0..100u32).flat_map(|i| frame(&i.to_le_bytes())).collect();
    s.write_all(&wire).unwrap();
    srv.rec().wait_for("100 frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 100);
    let sizes = sizes.lock().unwrap().clone();
    assert!(sizes.iter().any(|&n| n > 1), "100 frames in one segment came one per call: {sizes:?}");
}

static CB_MESSAGE: AtomicUsize = AtomicUsize::new(0);
static CB_MESSAGES: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn count_message(_: *mut c_void, _: u64, _: *const u8, _: usize) {
    CB_MESSAGE.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "C" fn count_messages_cb(_: *mut c_void, _: *const tf_event, n: usize) {
    CB_MESSAGES.fetch_add(n, Ordering::SeqCst);
}

fn start_raw(with_on_messages: bool, on_message: bool) -> (i32, *mut tf_server) {
    let cfg = config(&Opts::default());
    let cb = tf_callbacks {
        user_data: std::ptr::null_mut(),
        on_connect: None,
        on_message: if on_message { Some(count_message) } else { None },
        on_close: None,
    };
    let mut srv = std::ptr::null_mut();
    // SAFETY: cfg, cb and srv are live.
    let rc = unsafe {
        if with_on_messages {
            assert_eq!(tf_config_set_on_messages(cfg, Some(count_messages_cb)), TF_OK);
        }
        let rc = tf_server_start(cfg, &cb, &mut srv);
        tf_config_free(cfg);
        rc
    };
    (rc, srv)
}

#[test]
fn a_null_on_message_is_allowed_only_with_on_messages() {
    let (rc, srv) = start_raw(false, false);
    assert_eq!(rc, TF_ERR_INVALID, "neither on_message nor on_messages");
    assert!(srv.is_null());
    let (rc, srv) = start_raw(true, false);
    assert_eq!(rc, TF_OK, "on_messages without on_message: {}", last_error());
    // SAFETY: srv is live; stopped and freed once.
    unsafe {
        tf_server_stop(srv, 0);
        tf_server_free(srv);
    }
    // SAFETY: NULL cfg is refused.
    assert_eq!(unsafe { tf_config_set_on_messages(std::ptr::null_mut(), None) }, TF_ERR_INVALID);
}

#[test]
fn with_on_messages_set_on_message_is_never_called() {
    let (rc, srv) = start_raw(true, true);
    assert_eq!(rc, TF_OK);
    let before = (CB_MESSAGE.load(Ordering::SeqCst), CB_MESSAGES.load(Ordering::SeqCst));
    // SAFETY: srv is live.
    let port = unsafe { tf_server_port(srv) };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for i in 0..10u8 {
        write_frame(&mut s, &[i; 3]);
    }
    wait_until("ten frames", || CB_MESSAGES.load(Ordering::SeqCst) >= before.1 + 10);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(CB_MESSAGE.load(Ordering::SeqCst), before.0, "on_message ran although on_messages is set");
    // SAFETY: srv is live; stopped and freed once.
    unsafe {
        tf_server_stop(srv, 0);
        tf_server_free(srv);
    }
}

#[test]
fn on_messages_setting_null_turns_it_off() {
    let cfg = config(&Opts::default());
    let cb = tf_callbacks {
        user_data: std::ptr::null_mut(),
        on_connect: None,
        on_message: Some(count_message),
        on_close: None,
    };
    let mut srv = std::ptr::null_mut();
    // SAFETY: cfg, cb and srv are live.
    unsafe {
        assert_eq!(tf_config_set_on_messages(cfg, Some(count_messages_cb)), TF_OK);
        assert_eq!(tf_config_set_on_messages(cfg, None), TF_OK);
        assert_eq!(tf_server_start(cfg, &cb, &mut srv), TF_OK);
        tf_config_free(cfg);
    }
    let before = CB_MESSAGE.load(Ordering::SeqCst);
    // SAFETY: srv is live.
    let port = unsafe { tf_server_port(srv) };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write_frame(&mut s, b"one by one");
    wait_until("on_message", || CB_MESSAGE.load(Ordering::SeqCst) > before);
    // SAFETY: srv is live; stopped and freed once.
    unsafe {
        tf_server_stop(srv, 0);
        tf_server_free(srv);
    }
}

#[test]
fn on_connect_and_on_close_are_unchanged_with_on_messages() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let srv = batched(Opts::default(), &sizes, None);
    let (mut s, id) = srv.connect_id();
    write_frame(&mut s, b"hello");
    srv.rec().wait_for("the frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    drop(s);
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_PEER);
    let evs = srv.rec().snapshot();
    assert!(matches!(&evs[0], Ev::Connect(c, _) if *c == id));
    assert_eq!(evs[1..], [Ev::Message(id, b"hello".to_vec()), Ev::Close(id, TF_CLOSE_PEER)]);
}

#[test]
fn a_pause_made_during_on_messages_applies_to_the_batches_after_it() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let srv = batched(
        Opts::default(),
        &sizes,
        Some(Box::new(|srv, evs| {
            for e in evs {
                if payload_of(e) == b"pause" {
                    // SAFETY: srv is live during its callbacks.
                    unsafe { tf_conn_pause(srv, e.conn) };
                }
            }
        })),
    );
    let (mut s, id) = srv.connect_id();
    write_frame(&mut s, b"pause");
    srv.rec().wait_for("the frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    write_frame(&mut s, b"a");
    write_frame(&mut s, b"b");
    assert!(
        holds_for(Duration::from_millis(300), || count_messages(srv.rec()) == 1),
        "delivered while paused"
    );
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_conn_resume(srv.srv, id) }, TF_OK);
    srv.rec().wait_for("three frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 3);
    assert_eq!(messages_of(srv.rec(), id), vec![b"pause".to_vec(), b"a".to_vec(), b"b".to_vec()]);
}

#[test]
fn a_close_made_during_on_messages_applies_to_the_batches_after_it() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let codes = Arc::new(Mutex::new(Vec::new()));
    let c2 = codes.clone();
    let srv = batched(
        Opts::default(),
        &sizes,
        Some(Box::new(move |srv, evs| {
            for e in evs {
                if payload_of(e) == b"close" {
                    // SAFETY: srv is live during its callbacks.
                    c2.lock().unwrap().push(unsafe { tf_conn_close(srv, e.conn) });
                }
            }
        })),
    );
    let (mut s, id) = srv.connect_id();
    write_frame(&mut s, b"close");
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_LOCAL);
    assert_eq!(*codes.lock().unwrap(), vec![TF_OK]);
    let _ = s.write_all(&frame(b"late"));
    assert!(holds_for(Duration::from_millis(200), || count_messages(srv.rec()) == 1));
}

#[test]
fn on_messages_has_no_effect_in_pull_mode() {
    let before = CB_MESSAGES.load(Ordering::SeqCst);
    let cfg = config(&Opts::default());
    let mut srv = std::ptr::null_mut();
    // SAFETY: cfg and srv are live.
    unsafe {
        assert_eq!(tf_config_set_on_messages(cfg, Some(count_messages_cb)), TF_OK);
        assert_eq!(tf_server_start_pull(cfg, &mut srv), TF_OK);
        tf_config_free(cfg);
    }
    // SAFETY: srv is live.
    let port = unsafe { tf_server_port(srv) };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write_frame(&mut s, b"pulled");
    let empty = tf_event { kind: 0, reason: 0, conn: 0, data: std::ptr::null(), len: 0 };
    let mut evs = vec![empty; 16];
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while !got.iter().any(|(k, _)| *k == TF_EVENT_MESSAGE) {
        assert!(Instant::now() < deadline, "no MESSAGE event");
        let mut n = 0;
        // SAFETY: evs has room for 16 events.
        assert_eq!(unsafe { tf_server_poll(srv, evs.as_mut_ptr(), 16, &mut n, 50) }, TF_OK);
        got.extend(evs[..n].iter().map(|e| (e.kind, payload_of(e))));
    }
    assert!(got.contains(&(TF_EVENT_MESSAGE, b"pulled".to_vec())));
    // SAFETY: from tf_server_start_pull; freed once.
    unsafe { tf_server_free(srv) };
    assert_eq!(CB_MESSAGES.load(Ordering::SeqCst), before, "on_messages ran in pull mode");
}

// ---------------------------------------------------------------- tf_send_batch

#[test]
fn send_batch_gives_each_entry_the_code_tf_send_would() {
    let srv = TestServer::start(Opts {
        max_frame: Some(100_000),
        max_queued: Some(64 * 1024),
        echo: false,
        ..Opts::default()
    });
    let (mut a, ia) = srv.connect_id();
    let (mut b, ib) = srv.connect_id();
    let (c, ic) = srv.connect_id();
    drop(c);
    srv.rec.wait_close(ic);
    let big = vec![1u8; 70_000]; // fits max frame, not max queued output
    let huge = vec![2u8; 100_001];
    let mut outs = vec![
        out(ia, b"one"),
        out(ia + 1000, b"unknown"),
        out(ia, &big),
        out(ia, &huge),
        tf_out { conn: ia, data: std::ptr::null(), len: 3, result: -7 },
        tf_out { conn: ia, data: std::ptr::null(), len: 0, result: -7 },
        out(ib, b"two"),
        out(ic, b"closed"),
        out(ia, b"three"),
    ];
    // SAFETY: outs is live; the NULL data entries must be handled per entry.
    assert_eq!(unsafe { tf_send_batch(srv.srv, outs.as_mut_ptr(), outs.len()) }, TF_OK);
    let got: Vec<i32> = outs.iter().map(|o| o.result).collect();
    assert_eq!(
        got,
        vec![
            TF_OK,
            TF_ERR_NO_CONN,
            TF_ERR_FULL,
            TF_ERR_TOO_LARGE,
            TF_ERR_INVALID,
            TF_OK,
            TF_OK,
            TF_ERR_NO_CONN,
            TF_OK
        ]
    );
    assert_eq!(read_frame(&mut a).unwrap(), b"one");
    assert_eq!(read_frame(&mut a).unwrap(), b"");
    assert_eq!(read_frame(&mut a).unwrap(), b"three");
    assert_eq!(read_frame(&mut b).unwrap(), b"two");
    assert_eq!(srv.send(ia, b"marker"), TF_OK);
    assert_eq!(read_frame(&mut a).unwrap(), b"marker", "a refused entry was queued after all");
}

#[test]
fn send_batch_full_entry_against_a_peer_that_does_not_read() {
    let limit = 4 << 20;
    let srv = TestServer::start(Opts { max_queued: Some(limit), echo: false, ..Opts::default() });
    let slow = connect_small_rcvbuf(srv.addr, 4096);
    let ia = srv.rec.wait_connect(1)[0];
    let (mut b, ib) = srv.connect_id();
    saturate_kernel(srv.srv, ia, limit); // from here on the queue drains only if the peer reads
    fill_until_full(srv.srv, ia, &[3u8; 16 * 1024]);
    let chunk = vec![4u8; 16 * 1024]; // more than the room left after the fill
    let mut outs = vec![out(ia, &chunk), out(ib, b"fine")];
    // SAFETY: outs is live.
    assert_eq!(unsafe { tf_send_batch(srv.srv, outs.as_mut_ptr(), 2) }, TF_OK);
    assert_eq!((outs[0].result, outs[1].result), (TF_ERR_FULL, TF_OK));
    assert_eq!(read_frame(&mut b).unwrap(), b"fine");
    drop(slow);
}

#[test]
fn send_batch_null_and_empty() {
    let srv = TestServer::start(Opts::default());
    let (_a, ia) = srv.connect_id();
    let mut one = out(ia, b"x");
    // SAFETY: the library must reject NULL outs with n > 0.
    unsafe {
        assert_eq!(tf_send_batch(srv.srv, std::ptr::null_mut(), 1), TF_ERR_INVALID);
        assert_eq!(tf_send_batch(srv.srv, std::ptr::null_mut(), 0), TF_OK);
        assert_eq!(tf_send_batch(srv.srv, &mut one, 0), TF_OK);
        assert_eq!(tf_send_batch(std::ptr::null_mut(), &mut one, 1), TF_ERR_INVALID);
    }
    assert_eq!(one.result, -7, "n = 0 writes no result");
}

#[test]
fn send_batch_after_stop_is_stopped_and_queues_nothing() {
    let mut srv = TestServer::start(Opts::default());
    let (_a, ia) = srv.connect_id();
    assert_eq!(srv.stop(0), TF_OK);
    let mut outs = vec![out(ia, b"x"), out(ia + 5, b"y")];
    // SAFETY: outs is live.
    assert_eq!(unsafe { tf_send_batch(srv.srv, outs.as_mut_ptr(), 2) }, TF_ERR_STOPPED);
    assert_eq!((outs[0].result, outs[1].result), (-7, -7), "results are not written");
}

#[test]
fn send_batch_from_on_messages_echoes_in_order() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicBool::new(false));
    let f2 = failed.clone();
    let srv = batched(
        Opts::default(),
        &sizes,
        Some(Box::new(move |srv, evs| {
            let mut outs: Vec<tf_out> =
                evs.iter().map(|e| tf_out { conn: e.conn, data: e.data, len: e.len, result: -7 }).collect();
            // SAFETY: outs is live; its data points into the events, valid during the call.
            let rc = unsafe { tf_send_batch(srv, outs.as_mut_ptr(), outs.len()) };
            if rc != TF_OK || outs.iter().any(|o| o.result != TF_OK) {
                f2.store(true, Ordering::SeqCst);
            }
        })),
    );
    let mut peers: Vec<TcpStream> = (0..3).map(|_| srv.connect_id().0).collect();
    for (k, p) in peers.iter_mut().enumerate() {
        let wire: Vec<u8> =
            (0..500u32).flat_map(|i| frame(&[&i.to_le_bytes()[..], &[k as u8; 20]].concat())).collect();
        p.write_all(&wire).unwrap();
    }
    for (k, p) in peers.iter_mut().enumerate() {
        for i in 0..500u32 {
            assert_eq!(read_frame(p).unwrap(), [&i.to_le_bytes()[..], &[k as u8; 20]].concat());
        }
    }
    assert!(!failed.load(Ordering::SeqCst), "tf_send_batch refused an entry inside on_messages");
}

// ---------------------------------------------------------------- tf_events_pack

#[test]
fn events_pack_layout() {
    let peer = CString::new("127.0.0.1:4242").unwrap();
    let events = [
        tf_event { kind: TF_EVENT_CONNECT, reason: 0, conn: 7, data: peer.as_ptr() as *const u8, len: 14 },
        tf_event { kind: TF_EVENT_MESSAGE, reason: 0, conn: 7, data: b"hello".as_ptr(), len: 5 },
        tf_event { kind: TF_EVENT_MESSAGE, reason: 0, conn: 8, data: std::ptr::null(), len: 0 },
        tf_event { kind: TF_EVENT_WRITABLE, reason: 0, conn: 9, data: std::ptr::null(), len: 0 },
        tf_event {
            kind: TF_EVENT_CLOSE,
            reason: TF_CLOSE_TOO_LARGE,
            conn: u64::MAX - 1,
            data: std::ptr::null(),
            len: 0,
        },
    ];
    let want_len = 5 * 24 + 14 + 5;
    let (rc, needed, buf) = events_pack(&events, 4096);
    assert_eq!((rc, needed), (TF_OK, want_len));
    assert!(buf[want_len..].iter().all(|&b| b == 0xEE), "wrote past *needed");
    // The bytes, spelled out for the first record.
    assert_eq!(&buf[..24], &[1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 14, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&buf[24..38], b"127.0.0.1:4242", "the peer text, without its NUL");
    assert_eq!(
        unpack(&buf[..needed]),
        vec![
            Packed { kind: TF_EVENT_CONNECT, reason: 0, conn: 7, data: b"127.0.0.1:4242".to_vec() },
            Packed { kind: TF_EVENT_MESSAGE, reason: 0, conn: 7, data: b"hello".to_vec() },
            Packed { kind: TF_EVENT_MESSAGE, reason: 0, conn: 8, data: vec![] },
            Packed { kind: TF_EVENT_WRITABLE, reason: 0, conn: 9, data: vec![] },
            Packed { kind: TF_EVENT_CLOSE, reason: TF_CLOSE_TOO_LARGE, conn: u64::MAX - 1, data: vec![] },
        ]
    );
    // Exactly the size needed is enough.
    let (rc, needed2, buf2) = events_pack(&events, want_len);
    assert_eq!((rc, needed2), (TF_OK, want_len));
    assert_eq!(buf2[..], buf[..want_len]);
}

#[test]
fn events_pack_too_small_is_full_and_says_how_much_is_needed() {
    let events = [
        tf_event { kind: TF_EVENT_MESSAGE, reason: 0, conn: 1, data: b"abc".as_ptr(), len: 3 },
        tf_event { kind: TF_EVENT_MESSAGE, reason: 0, conn: 2, data: b"defg".as_ptr(), len: 4 },
    ];
    let (rc, needed, buf) = events_pack(&events, 24 + 3 + 24 + 3);
    assert_eq!((rc, needed), (TF_ERR_FULL, 55));
    assert!(buf.iter().all(|&b| b == 0xEE), "something was written although it did not fit");
    let mut needed = 0usize;
    // SAFETY: a NULL out with cap 0 is allowed: it asks for the size.
    let rc = unsafe { tf_events_pack(events.as_ptr(), 2, std::ptr::null_mut(), 0, &mut needed) };
    assert_eq!((rc, needed), (TF_ERR_FULL, 55));
}

#[test]
fn events_pack_null_cases() {
    let ev = tf_event { kind: TF_EVENT_MESSAGE, reason: 0, conn: 1, data: b"x".as_ptr(), len: 1 };
    let mut buf = [0u8; 64];
    let mut needed = usize::MAX;
    // SAFETY: the library must reject the NULL pointers.
    unsafe {
        assert_eq!(tf_events_pack(&ev, 1, buf.as_mut_ptr(), 64, std::ptr::null_mut()), TF_ERR_INVALID);
        assert_eq!(tf_events_pack(std::ptr::null(), 1, buf.as_mut_ptr(), 64, &mut needed), TF_ERR_INVALID);
        assert_eq!(tf_events_pack(&ev, 1, std::ptr::null_mut(), 64, &mut needed), TF_ERR_INVALID);
        assert_eq!(tf_events_pack(std::ptr::null(), 0, std::ptr::null_mut(), 0, &mut needed), TF_OK);
    }
    assert_eq!(needed, 0, "no events: nothing needed");
}

#[test]
fn events_pack_inside_on_messages() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let packed = Arc::new(Mutex::new(Vec::new()));
    let p2 = packed.clone();
    let srv = batched(
        Opts::default(),
        &sizes,
        Some(Box::new(move |_, evs| {
            let mut needed = 0usize;
            // SAFETY: asks for the size only.
            let rc = unsafe { tf_events_pack(evs.as_ptr(), evs.len(), std::ptr::null_mut(), 0, &mut needed) };
            assert_eq!(rc, TF_ERR_FULL);
            let (rc, n, buf) = events_pack(evs, needed);
            assert_eq!((rc, n), (TF_OK, needed));
            let want: Vec<Packed> = evs
                .iter()
                .map(|e| Packed { kind: e.kind, reason: e.reason, conn: e.conn, data: payload_of(e) })
                .collect();
            assert_eq!(unpack(&buf), want);
            p2.lock().unwrap().extend(unpack(&buf));
        })),
    );
    let (mut s, id) = srv.connect_id();
    let payloads: Vec<Vec<u8>> = vec![b"a".to_vec(), vec![], pattern(3000, 1), b"z".to_vec()];
    s.write_all(&payloads.iter().flat_map(|p| frame(p)).collect::<Vec<u8>>()).unwrap();
    srv.rec().wait_for("four frames", |e| e.iter().filter(|e| matches!(e, Ev::Message(..))).count() == 4);
    let got: Vec<(i32, u64, Vec<u8>)> =
        packed.lock().unwrap().iter().map(|p| (p.kind, p.conn, p.data.clone())).collect();
    let want: Vec<(i32, u64, Vec<u8>)> = payloads.into_iter().map(|p| (TF_EVENT_MESSAGE, id, p)).collect();
    assert_eq!(got, want);
}

#[test]
fn events_pack_of_pull_mode_events() {
    let cfg = config(&Opts::default());
    let mut srv = std::ptr::null_mut();
    // SAFETY: cfg and srv are live.
    unsafe {
        assert_eq!(tf_server_start_pull(cfg, &mut srv), TF_OK);
        tf_config_free(cfg);
    }
    // SAFETY: srv is live.
    let port = unsafe { tf_server_port(srv) };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write_frame(&mut s, b"pull me");
    drop(s);
    let empty = tf_event { kind: 0, reason: 0, conn: 0, data: std::ptr::null(), len: 0 };
    let mut evs = vec![empty; 16];
    let mut all = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !all.iter().any(|p: &Packed| p.kind == TF_EVENT_CLOSE) {
        assert!(Instant::now() < deadline, "no CLOSE event: {all:?}");
        let mut n = 0;
        // SAFETY: evs has room for 16 events.
        assert_eq!(unsafe { tf_server_poll(srv, evs.as_mut_ptr(), 16, &mut n, 50) }, TF_OK);
        let (rc, _, buf) = events_pack(&evs[..n], 4096);
        assert_eq!(rc, TF_OK);
        let needed = evs[..n].iter().map(|e| 24 + e.len).sum::<usize>();
        all.extend(unpack(&buf[..needed]));
    }
    // SAFETY: from tf_server_start_pull; freed once.
    unsafe { tf_server_free(srv) };
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].kind, TF_EVENT_CONNECT);
    assert!(String::from_utf8(all[0].data.clone()).unwrap().starts_with("127.0.0.1:"));
    assert_eq!((all[1].kind, all[1].data.as_slice()), (TF_EVENT_MESSAGE, &b"pull me"[..]));
    assert_eq!((all[2].kind, all[2].reason), (TF_EVENT_CLOSE, TF_CLOSE_PEER));
    assert!(all.iter().all(|p| p.conn == all[0].conn));
}

// ---------------------------------------------------------------- tf_send_packed

#[test]
fn send_packed_parses_and_sends_each_frame() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut a, ia) = srv.connect_id();
    let (mut b, ib) = srv.connect_id();
    let big = pattern(100_000, 5);
    let buf = pack_sends(&[(ia, b"first"), (ib, b""), (ia, &big), (ib, b"last")]);
    let (rc, results, count) = send_packed(srv.srv, &buf, 8);
    assert_eq!((rc, count), (TF_OK, 4));
    assert_eq!(results[..4], [TF_OK; 4]);
    assert_eq!(results[4..], [-7; 4], "results past *count are not written");
    assert_eq!(read_frame(&mut a).unwrap(), b"first");
    assert_eq!(read_frame(&mut a).unwrap(), big);
    assert_eq!(read_frame(&mut b).unwrap(), b"");
    assert_eq!(read_frame(&mut b).unwrap(), b"last");
}

#[test]
fn send_packed_per_frame_results() {
    let srv = TestServer::start(Opts {
        max_frame: Some(100_000),
        max_queued: Some(64 * 1024),
        echo: false,
        ..Opts::default()
    });
    let (mut a, ia) = srv.connect_id();
    let big = vec![1u8; 70_000];
    let huge = vec![2u8; 100_001];
    let buf = pack_sends(&[(ia, b"ok"), (ia + 100, b"who"), (ia, &big), (ia, &huge), (ia, b"end")]);
    let (rc, results, count) = send_packed(srv.srv, &buf, 5);
    assert_eq!((rc, count), (TF_OK, 5));
    assert_eq!(results, vec![TF_OK, TF_ERR_NO_CONN, TF_ERR_FULL, TF_ERR_TOO_LARGE, TF_OK]);
    assert_eq!(read_frame(&mut a).unwrap(), b"ok");
    assert_eq!(read_frame(&mut a).unwrap(), b"end");
}

/// Sends a marker with tf_send and checks that it is the first frame the
/// peer gets: what came before it queued nothing.
fn nothing_queued_before(srv: &TestServer, s: &mut TcpStream, conn: u64) {
    assert_eq!(srv.send(conn, b"marker"), TF_OK);
    assert_eq!(read_frame(s).unwrap(), b"marker", "a refused tf_send_packed queued frames");
}

#[test]
fn send_packed_malformed_buffers_are_invalid_and_queue_nothing() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut a, ia) = srv.connect_id();
    let good = pack_sends(&[(ia, b"one"), (ia, b"two")]);
    // A record header cut short after whole records.
    let mut cut_header = good.clone();
    cut_header.extend_from_slice(&ia.to_le_bytes()[..5]);
    // A record whose length runs past the end.
    let mut past_end = good.clone();
    past_end.extend_from_slice(&ia.to_le_bytes());
    past_end.extend_from_slice(&10u64.to_le_bytes());
    past_end.extend_from_slice(b"short");
    // A length that cannot be a size.
    let mut absurd = good.clone();
    absurd.extend_from_slice(&ia.to_le_bytes());
    absurd.extend_from_slice(&u64::MAX.to_le_bytes());
    for (what, buf) in [("cut header", &cut_header), ("past the end", &past_end), ("absurd length", &absurd)]
    {
        let (rc, results, _) = send_packed(srv.srv, buf, 8);
        assert_eq!(rc, TF_ERR_INVALID, "{what}");
        assert_eq!(results, vec![-7; 8], "{what}: results written");
    }
    nothing_queued_before(&srv, &mut a, ia);
}

#[test]
fn send_packed_with_more_frames_than_max_results_is_invalid_and_queues_nothing() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut a, ia) = srv.connect_id();
    let buf = pack_sends(&[(ia, b"1"), (ia, b"2"), (ia, b"3")]);
    let (rc, _, _) = send_packed(srv.srv, &buf, 2);
    assert_eq!(rc, TF_ERR_INVALID);
    nothing_queued_before(&srv, &mut a, ia);
    let (rc, results, count) = send_packed(srv.srv, &buf, 3);
    assert_eq!((rc, count, results), (TF_OK, 3, vec![TF_OK; 3]));
    for want in [b"1", b"2", b"3"] {
        assert_eq!(read_frame(&mut a).unwrap(), want);
    }
}

#[test]
fn send_packed_null_cases() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut a, ia) = srv.connect_id();
    let buf = pack_sends(&[(ia, b"x")]);
    let mut results = [-7i32; 4];
    let mut count = usize::MAX;
    // SAFETY: the library must reject the NULL pointers.
    unsafe {
        let p = buf.as_ptr();
        let n = buf.len();
        let r = results.as_mut_ptr();
        assert_eq!(tf_send_packed(srv.srv, p, n, r, 4, std::ptr::null_mut()), TF_ERR_INVALID);
        assert_eq!(tf_send_packed(srv.srv, p, n, std::ptr::null_mut(), 4, &mut count), TF_ERR_INVALID);
        assert_eq!(tf_send_packed(srv.srv, std::ptr::null(), n, r, 4, &mut count), TF_ERR_INVALID);
        assert_eq!(tf_send_packed(std::ptr::null_mut(), p, n, r, 4, &mut count), TF_ERR_INVALID);
        // Nothing to send: NULL buf with len 0, and even NULL results with max 0.
        assert_eq!(tf_send_packed(srv.srv, std::ptr::null(), 0, r, 4, &mut count), TF_OK);
        assert_eq!(count, 0);
        assert_eq!(tf_send_packed(srv.srv, std::ptr::null(), 0, std::ptr::null_mut(), 0, &mut count), TF_OK);
        assert_eq!(count, 0);
    }
    nothing_queued_before(&srv, &mut a, ia);
}

#[test]
fn send_packed_after_stop_is_stopped() {
    let mut srv = TestServer::start(Opts::default());
    let (_a, ia) = srv.connect_id();
    assert_eq!(srv.stop(0), TF_OK);
    let (rc, results, _) = send_packed(srv.srv, &pack_sends(&[(ia, b"x")]), 1);
    assert_eq!(rc, TF_ERR_STOPPED);
    assert_eq!(results, vec![-7]);
}

#[test]
fn send_packed_from_on_messages_echoes() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicBool::new(false));
    let f2 = failed.clone();
    let srv = batched(
        Opts::default(),
        &sizes,
        Some(Box::new(move |srv, evs| {
            let frames: Vec<(u64, Vec<u8>)> = evs.iter().map(|e| (e.conn, payload_of(e))).collect();
            let refs: Vec<(u64, &[u8])> = frames.iter().map(|(c, d)| (*c, d.as_slice())).collect();
            let (rc, results, count) = send_packed(srv, &pack_sends(&refs), evs.len());
            if rc != TF_OK || count != evs.len() || results.iter().any(|&r| r != TF_OK) {
                f2.store(true, Ordering::SeqCst);
            }
        })),
    );
    let (mut s, _) = srv.connect_id();
    let wire: Vec<u8> = (0..300u32).flat_map(|i| frame(&i.to_le_bytes())).collect();
    s.write_all(&wire).unwrap();
    for i in 0..300u32 {
        assert_eq!(read_frame(&mut s).unwrap(), i.to_le_bytes());
    }
    assert!(!failed.load(Ordering::SeqCst));
}

//! Connections and the server from start to stop: limits, refusals, closes,
//! timeouts, cross-thread sends, stop semantics.
mod common;
use common::*;
use std::ffi::CString;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[test]
fn connections_past_max_are_accepted_closed_and_counted() {
    let srv = TestServer::start(Opts { max_connections: Some(3), ..Opts::default() });
    let mut kept: Vec<_> = (0..3).map(|_| srv.connect_id().0).collect();
    let mut extra: Vec<_> = (0..4).map(|_| srv.connect()).collect();
    for s in &mut extra {
        assert!(wait_eof(s), "an over-limit connection is closed at once");
    }
    let st = srv.wait_stats("rejections", |st| st.connections_rejected == 4);
    assert_eq!(st.connections_accepted, 3);
    assert_eq!(st.connections_active, 3);
    assert_eq!(srv.rec.connects().len(), 3, "no callback names a rejected connection");
    for s in &mut kept {
        write_frame(s, b"still served");
        assert_eq!(read_frame(s).unwrap(), b"still served");
    }
    drop(kept);
    srv.wait_stats("slots free again", |st| st.connections_active == 0);
    let mut again = srv.connect();
    write_frame(&mut again, b"room again");
    assert_eq!(read_frame(&mut again).unwrap(), b"room again");
}

#[test]
fn on_connect_refusal_closes_counts_and_never_names_the_connection() {
    let srv = TestServer::start(Opts::default());
    srv.rec.behaviour.refuse.store(true, Ordering::SeqCst);
    let mut s = srv.connect();
    let _ = s.write_all(&frame(b"ignored"));
    assert!(wait_eof(&mut s));
    let st = srv.wait_stats("rejected", |st| st.connections_rejected == 1);
    assert_eq!(st.connections_accepted, 0);
    assert_eq!(st.connections_active, 0);
    assert!(srv.rec.snapshot().is_empty(), "{:?}", srv.rec.snapshot());
}

#[test]
fn on_connect_may_send_a_greeting() {
    let srv = TestServer::start(Opts::default());
    srv.rec.behaviour.greet.store(true, Ordering::SeqCst);
    let mut s = srv.connect();
    assert_eq!(read_frame(&mut s).unwrap(), b"hi");
}

#[test]
fn peers_get_unique_increasing_nonzero_ids() {
    let srv = TestServer::start(Opts::default());
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (s, id) = srv.connect_id();
        drop(s);
        srv.rec.wait_close(id);
        ids.push(id);
    }
    assert!(ids[0] != 0);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[test]
fn the_peer_closing_gives_on_close_peer_exactly_once() {
    let srv = TestServer::start(Opts::default());
    let (s, id) = srv.connect_id();
    drop(s);
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_PEER);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(srv.rec.closes_of(id).len(), 1);
    assert_eq!(srv.send(id, b"late"), TF_ERR_NO_CONN);
    assert_eq!(srv.close(id), TF_ERR_NO_CONN);
}

#[test]
fn idle_timeout_closes_a_silent_connection_and_a_slow_partial_frame() {
    // Margins for a loaded machine: `busy` completes a frame every ~30 ms
    // against a 500 ms timeout (a test thread descheduled for that long
    // would make it idle for real).
    let srv = TestServer::start(Opts { idle_ms: Some(500), ..Opts::default() });
    let (mut quiet, quiet_id) = srv.connect_id();
    let (mut slow, slow_id) = srv.connect_id();
    let (mut busy, busy_id) = srv.connect_id();
    let start = Instant::now();
    // `slow` dribbles a frame it never finishes; `busy` completes frames.
    slow.write_all(&[0xe8, 0x03, 0, 0, b'a']).unwrap(); // 1,000 bytes announced
    while start.elapsed() < Duration::from_millis(1000) {
        let _ = slow.write_all(b"b");
        write_frame(&mut busy, b"ping");
        assert_eq!(read_frame(&mut busy).unwrap(), b"ping");
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(srv.rec.wait_close(quiet_id), TF_CLOSE_IDLE);
    assert_eq!(srv.rec.wait_close(slow_id), TF_CLOSE_IDLE);
    assert!(srv.rec.closes_of(busy_id).is_empty(), "an active connection stays open");
    assert!(wait_eof(&mut quiet));
    let st = srv.stats();
    assert_eq!(st.closed_idle, 2);
    // Counters change before the callback that reports the event.
    let at_close = srv.rec.stats_at_close.lock().unwrap().clone();
    assert!(at_close[0].closed_idle >= 1);
}

#[test]
fn an_oversize_announcement_closes_only_that_connection() {
    let srv = TestServer::start(Opts { max_frame: Some(1024), ..Opts::default() });
    let (mut good, _) = srv.connect_id();
    let (mut bad, bad_id) = srv.connect_id();
    bad.write_all(&0xFFFF_FFFFu32.to_le_bytes()).unwrap();
    assert_eq!(srv.rec.wait_close(bad_id), TF_CLOSE_TOO_LARGE);
    assert!(wait_eof(&mut bad));
    assert_eq!(srv.stats().closed_too_large, 1);
    assert_eq!(srv.rec.stats_at_close.lock().unwrap()[0].closed_too_large, 1);
    write_frame(&mut good, b"fine");
    assert_eq!(read_frame(&mut good).unwrap(), b"fine");
}

#[test]
fn sends_from_another_thread_arrive_in_call_order() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    let srv_ref = &srv;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for i in 0..10_000u32 {
                loop {
                    match srv_ref.send(id, &i.to_le_bytes()) {
                        TF_OK => break,
                        TF_ERR_FULL => std::thread::sleep(Duration::from_micros(200)),
                        rc => panic!("tf_send: {rc}"),
                    }
                }
            }
        });
        for i in 0..10_000u32 {
            assert_eq!(read_frame(&mut s).unwrap(), i.to_le_bytes());
        }
    });
}

#[test]
fn a_client_that_never_reads_gets_full_and_nothing_more_is_queued() {
    let srv = TestServer::start(Opts { echo: false, max_queued: Some(256 * 1024), ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    let chunk = vec![1u8; 60_000];
    let mut accepted = 0u64;
    let deadline = Instant::now() + WAIT;
    loop {
        match srv.send(id, &chunk) {
            TF_OK => accepted += 1,
            TF_ERR_FULL => break,
            rc => panic!("{rc}"),
        }
        assert!(Instant::now() < deadline, "never became full");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(last_error().contains("max queued output"), "{}", last_error());
    // The kernel buffers some; the library holds at most its limit.
    assert!(accepted > 0);
    // Other connections are unaffected.
    let (mut other, other_id) = srv.connect_id();
    assert_eq!(srv.send(other_id, b"you are fine"), TF_OK);
    assert_eq!(read_frame(&mut other).unwrap(), b"you are fine");
    // Once the client reads, everything accepted arrives, whole.
    for _ in 0..accepted {
        assert_eq!(read_frame(&mut s).unwrap().len(), 60_000);
    }
    srv.wait_stats("drained", |st| st.frames_sent == accepted + 1);
    assert_eq!(srv.send(id, &chunk), TF_OK, "room again once drained");
}

#[test]
fn conn_close_writes_queued_frames_first_then_reports_local() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    let big = pattern(3 << 20, 9);
    assert_eq!(srv.send(id, b"first"), TF_OK);
    assert_eq!(srv.send(id, &big), TF_OK);
    assert_eq!(srv.close(id), TF_OK);
    assert_eq!(srv.send(id, b"after close"), TF_ERR_NO_CONN);
    assert_eq!(srv.close(id), TF_ERR_NO_CONN);
    assert_eq!(read_frame(&mut s).unwrap(), b"first");
    assert_eq!(read_frame(&mut s).unwrap(), big);
    assert!(wait_eof(&mut s));
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_LOCAL);
}

#[test]
fn conn_close_from_inside_on_message_stops_delivery_and_flushes_the_reply() {
    let srv = TestServer::start(Opts::default());
    srv.rec.behaviour.close_after_message.store(true, Ordering::SeqCst);
    let (mut s, id) = srv.connect_id();
    let mut two = frame(b"one");
    two.extend(frame(b"two"));
    s.write_all(&two).unwrap();
    assert_eq!(read_frame(&mut s).unwrap(), b"one");
    assert!(wait_eof(&mut s));
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_LOCAL);
    let msgs = srv.rec.snapshot().into_iter().filter(|e| matches!(e, Ev::Message(..))).count();
    assert_eq!(msgs, 1, "no message after tf_conn_close");
}

#[test]
fn stop_closes_every_connection_with_shutdown_and_silences_callbacks() {
    let mut srv = TestServer::start(Opts::default());
    let mut conns: Vec<_> = (0..5).map(|_| srv.connect_id()).collect();
    for (s, _) in &mut conns {
        write_frame(s, b"x");
        assert_eq!(read_frame(s).unwrap(), b"x");
    }
    assert_eq!(srv.stop(500), TF_OK);
    let evs = srv.rec.snapshot();
    for (s, id) in &mut conns {
        assert_eq!(srv.rec.closes_of(*id), vec![TF_CLOSE_SHUTDOWN]);
        assert!(wait_eof(s));
        assert_eq!(srv.send(*id, b"x"), TF_ERR_STOPPED);
        assert_eq!(srv.close(*id), TF_ERR_STOPPED);
    }
    assert_eq!(srv.send(12345, b"x"), TF_ERR_STOPPED, "STOPPED wins over NO_CONN");
    // No callback after stop returned, whatever the peers do.
    for (s, _) in &mut conns {
        let _ = s.write_all(&frame(b"late"));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(srv.rec.snapshot(), evs);
    assert_eq!(srv.stop(0), TF_OK, "stop is idempotent");
    assert_eq!(srv.stats().connections_active, 0);
}

#[test]
fn stop_drains_queued_output_within_the_drain_time() {
    let mut srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    let big = pattern(2 << 20, 3);
    assert_eq!(srv.send(id, &big), TF_OK);
    let reader = std::thread::spawn(move || {
        let got = read_frame(&mut s);
        (got, wait_eof(&mut s))
    });
    assert_eq!(srv.stop(5000), TF_OK);
    let (got, eof) = reader.join().unwrap();
    assert_eq!(got.unwrap(), big);
    assert!(eof);
    assert_eq!(srv.rec.closes_of(id), vec![TF_CLOSE_SHUTDOWN]);
}

#[test]
fn stop_gives_up_on_a_peer_that_never_reads_after_the_drain_time() {
    let mut srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (_s, id) = srv.connect_id();
    assert_eq!(srv.send(id, &vec![0u8; 8 << 20]), TF_OK);
    let t = Instant::now();
    assert_eq!(srv.stop(200), TF_OK);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "stop took {took:?}");
    assert_eq!(srv.rec.closes_of(id), vec![TF_CLOSE_SHUTDOWN]);
}

#[test]
fn stop_from_inside_a_callback_is_refused_not_a_deadlock() {
    let srv = TestServer::start(Opts::default());
    srv.rec.behaviour.stop_in_callback.store(true, Ordering::SeqCst);
    let mut s = srv.connect();
    write_frame(&mut s, b"stop please");
    assert_eq!(read_frame(&mut s).unwrap(), b"stop please");
    assert_eq!(*srv.rec.behaviour.stop_result.lock().unwrap(), Some(TF_ERR_INVALID));
    write_frame(&mut s, b"still alive");
    assert_eq!(read_frame(&mut s).unwrap(), b"still alive");
}

#[test]
fn a_second_server_on_a_busy_address_fails_with_io_and_a_message() {
    let srv = TestServer::start(Opts::default());
    let cfg = config(&Opts { addr: format!("127.0.0.1:{}", srv.port), ..Opts::default() });
    let cb = tf_callbacks {
        user_data: std::ptr::null_mut(),
        on_connect: None,
        on_message: Some(noop_message),
        on_close: None,
    };
    let mut out: *mut tf_server = std::ptr::null_mut();
    // SAFETY: all pointers are live.
    let rc = unsafe { tf_server_start(cfg, &cb, &mut out) };
    // SAFETY: from tf_config_new.
    unsafe { tf_config_free(cfg) };
    assert_eq!(rc, TF_ERR_IO);
    assert!(out.is_null(), "*out is written only on success");
    let msg = last_error();
    assert!(msg.contains(&srv.port.to_string()) && msg.to_lowercase().contains("in use"), "{msg}");
}

unsafe extern "C" fn noop_message(_: *mut std::ffi::c_void, _: u64, _: *const u8, _: usize) {}

#[test]
fn config_setters_validate_their_arguments() {
    let cfg = tf_config_new();
    // SAFETY: cfg is live; strings are NUL-terminated.
    unsafe {
        for bad in ["", "nonsense", "127.0.0.1", "1.2.3.4:70000", "localhost:80"] {
            let c = CString::new(bad).unwrap();
            assert_eq!(tf_config_set_address(cfg, c.as_ptr()), TF_ERR_INVALID, "{bad:?}");
        }
        assert_eq!(tf_config_set_max_connections(cfg, 0), TF_ERR_INVALID);
        assert_eq!(tf_config_set_max_frame(cfg, 0), TF_ERR_INVALID);
        assert_eq!(tf_config_set_max_queued_output(cfg, 0), TF_ERR_INVALID);
        assert_eq!(tf_config_set_backend(cfg, 3), TF_ERR_INVALID);
        assert_eq!(tf_config_set_backend(cfg, -1), TF_ERR_INVALID);
        assert_eq!(tf_config_set_max_frame(cfg, u32::MAX), TF_OK);
        assert_eq!(tf_config_set_idle_timeout_ms(cfg, 0), TF_OK);
        tf_config_free(cfg);
    }
}

#[test]
fn null_arguments_return_invalid_with_a_message() {
    let cb =
        tf_callbacks { user_data: std::ptr::null_mut(), on_connect: None, on_message: None, on_close: None };
    let mut out: *mut tf_server = std::ptr::null_mut();
    let mut st = tf_stats::default();
    let mut count = 0usize;
    let mut evs = [tf_event { kind: 0, reason: 0, conn: 0, data: std::ptr::null(), len: 0 }; 4];
    // SAFETY: NULL is what is being tested; every other pointer is live.
    unsafe {
        assert_eq!(tf_config_set_address(std::ptr::null_mut(), c"1.2.3.4:5".as_ptr()), TF_ERR_INVALID);
        let cfg = tf_config_new();
        assert_eq!(tf_config_set_address(cfg, std::ptr::null()), TF_ERR_INVALID);
        assert_eq!(tf_config_set_max_connections(std::ptr::null_mut(), 1), TF_ERR_INVALID);
        assert_eq!(tf_config_set_max_frame(std::ptr::null_mut(), 1), TF_ERR_INVALID);
        assert_eq!(tf_config_set_idle_timeout_ms(std::ptr::null_mut(), 1), TF_ERR_INVALID);
        assert_eq!(tf_config_set_max_queued_output(std::ptr::null_mut(), 1), TF_ERR_INVALID);
        assert_eq!(tf_config_set_backend(std::ptr::null_mut(), 0), TF_ERR_INVALID);
        assert_eq!(tf_config_set_log(std::ptr::null_mut(), None, std::ptr::null_mut()), TF_ERR_INVALID);
        assert_eq!(tf_server_start(cfg, std::ptr::null(), &mut out), TF_ERR_INVALID);
        assert_eq!(tf_server_start(cfg, &cb, &mut out), TF_ERR_INVALID, "on_message is required");
        assert!(last_error().contains("on_message"));
        assert_eq!(tf_server_start(cfg, &cb, std::ptr::null_mut()), TF_ERR_INVALID);
        assert_eq!(tf_server_start_pull(cfg, std::ptr::null_mut()), TF_ERR_INVALID);
        assert_eq!(tf_server_port(std::ptr::null()), 0);
        assert_eq!(tf_send(std::ptr::null_mut(), 1, b"x".as_ptr(), 1), TF_ERR_INVALID);
        assert_eq!(tf_conn_close(std::ptr::null_mut(), 1), TF_ERR_INVALID);
        assert_eq!(tf_server_stats(std::ptr::null(), &mut st), TF_ERR_INVALID);
        assert_eq!(tf_server_stop(std::ptr::null_mut(), 0), TF_ERR_INVALID);
        assert_eq!(tf_server_fd(std::ptr::null()), -1);
        assert_eq!(tf_server_poll(std::ptr::null_mut(), evs.as_mut_ptr(), 4, &mut count, 0), TF_ERR_INVALID);
        assert!(last_error().contains("srv"), "{}", last_error());
        tf_server_free(std::ptr::null_mut());
        tf_config_free(std::ptr::null_mut());
        tf_config_free(cfg);
    }
    let srv = TestServer::start(Opts::default());
    // SAFETY: srv is live; the NULL pointers are the point.
    unsafe {
        assert_eq!(tf_send(srv.srv, 1, std::ptr::null(), 5), TF_ERR_INVALID);
        assert_eq!(tf_server_stats(srv.srv, std::ptr::null_mut()), TF_ERR_INVALID);
        assert_eq!(tf_server_fd(srv.srv), -1, "not a pull-mode server");
    }
    assert_eq!(srv.send(0, b"x"), TF_ERR_NO_CONN, "id 0 is never a connection");
    assert_eq!(srv.send(999, b""), TF_ERR_NO_CONN);
    assert_eq!(srv.close(999), TF_ERR_NO_CONN);
}

#[test]
fn version_and_last_error_are_never_null() {
    // SAFETY: both return static or thread-owned NUL-terminated strings.
    let v = unsafe { std::ffi::CStr::from_ptr(tf_version()) }.to_str().unwrap().to_string();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    let fresh = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(fresh, "", "a thread with no failure has an empty message");
}

#[test]
fn free_without_stop_stops_first_and_reports_every_close() {
    let srv = TestServer::start(Opts::default());
    let (mut s, id) = srv.connect_id();
    let rec = srv.free_without_stop();
    assert!(wait_eof(&mut s));
    let closes: Vec<_> = rec.snapshot().into_iter().filter(|e| matches!(e, Ev::Close(..))).collect();
    assert_eq!(closes, vec![Ev::Close(id, TF_CLOSE_SHUTDOWN)]);
}

#[test]
fn a_frame_sent_from_on_close_goes_out_at_once() {
    let srv = TestServer::start(Opts::default());
    let (mut a, a_id) = srv.connect_id();
    let (b, b_id) = srv.connect_id();
    srv.rec.behaviour.notify_on_close.store(a_id, Ordering::SeqCst);
    drop(b);
    srv.rec.wait_close(b_id);
    a.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(
        read_frame(&mut a).unwrap(),
        b"gone",
        "nothing else happens: it must not wait for another event"
    );
}

#[test]
fn stopping_any_server_from_inside_a_callback_is_refused() {
    let a = TestServer::start(Opts::default());
    let b = TestServer::start(Opts::default());
    a.rec.behaviour.stop_other.store(b.srv, Ordering::SeqCst);
    let mut s = a.connect();
    write_frame(&mut s, b"x");
    assert_eq!(read_frame(&mut s).unwrap(), b"x");
    assert_eq!(*a.rec.behaviour.stop_other_result.lock().unwrap(), Some(TF_ERR_INVALID));
    let mut t = b.connect();
    write_frame(&mut t, b"b still runs");
    assert_eq!(read_frame(&mut t).unwrap(), b"b still runs");
}

#[test]
fn on_connect_sees_its_connection_counted_as_active() {
    let srv = TestServer::start(Opts::default());
    let _a = srv.connect_id();
    let _b = srv.connect_id();
    assert_eq!(*srv.rec.behaviour.active_in_connect.lock().unwrap(), vec![1, 2]);
}

#[test]
fn no_message_is_delivered_after_conn_close_returns_from_another_thread() {
    let srv = TestServer::start(Opts { echo: false, record: false, ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    let writer = std::thread::spawn(move || {
        let burst = frame(b"stream").repeat(100);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            if s.write_all(&burst).is_err() {
                break;
            }
        }
    });
    srv.rec.wait_for("messages flowing", |_| srv.rec.messages.load(Ordering::SeqCst) > 1000);
    assert_eq!(srv.close(id), TF_OK);
    let at_close = srv.rec.messages.load(Ordering::SeqCst);
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_LOCAL);
    let after = srv.rec.messages.load(Ordering::SeqCst);
    assert!(after <= at_close + 1, "{} messages after tf_conn_close returned", after - at_close);
    writer.join().unwrap();
}

#[test]
fn a_connection_waiting_in_the_backlog_when_stop_begins_gets_no_callback() {
    let mut srv = TestServer::start(Opts::default());
    srv.rec.behaviour.sleep_in_message_ms.store(300, Ordering::SeqCst);
    let (mut a, a_id) = srv.connect_id();
    write_frame(&mut a, b"slow"); // the loop now sleeps in on_message
    std::thread::sleep(Duration::from_millis(50));
    let _late = srv.connect(); // waits in the backlog
    assert_eq!(srv.stop(0), TF_OK);
    assert_eq!(srv.rec.connects(), vec![a_id], "no on_connect once stop has begun");
    assert_eq!(srv.rec.closes_of(a_id), vec![TF_CLOSE_SHUTDOWN]);
}

#[test]
fn stop_drains_every_queued_frame_in_order() {
    for _ in 0..30 {
        let mut srv = TestServer::start(Opts { echo: false, ..Opts::default() });
        let (mut s, id) = srv.connect_id();
        let big = pattern(2 << 20, 5);
        assert_eq!(srv.send(id, &big), TF_OK);
        assert_eq!(srv.send(id, b"tail"), TF_OK);
        let reader = std::thread::spawn(move || (read_frame(&mut s), read_frame(&mut s), wait_eof(&mut s)));
        assert_eq!(srv.stop(3000), TF_OK);
        let (first, second, eof) = reader.join().unwrap();
        assert_eq!(first.as_deref(), Some(&big[..]));
        assert_eq!(second.as_deref(), Some(&b"tail"[..]));
        assert!(eof);
        assert_eq!(srv.rec.closes_of(id), vec![TF_CLOSE_SHUTDOWN]);
    }
}

/// Two threads stop the server at about the same time: the second call must
/// not return while the first one's on_close callbacks still run (a host
/// frees what its callbacks use once its own stop returned).
#[test]
fn a_concurrent_second_stop_returns_only_after_the_last_callback() {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Arc;
    let returned = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (r, l, c) = (returned.clone(), late.clone(), closed.clone());
    let hooks = Hooks {
        on_close: Some(Box::new(move |_, _, _| {
            std::thread::sleep(Duration::from_millis(150));
            if r.load(Ordering::SeqCst) {
                l.fetch_add(1, Ordering::SeqCst);
            }
            c.fetch_add(1, Ordering::SeqCst);
        })),
        ..Hooks::default()
    };
    let s = HookServer::start(Opts::default(), hooks);
    let conns: Vec<_> = (0..3).map(|_| s.connect_id()).collect();
    let srv = s.srv as usize;
    // SAFETY: the server stays live until `s` drops, after both stops.
    let first = std::thread::spawn(move || unsafe { tf_server_stop(srv as *mut tf_server, 0) });
    // The first stop has begun once sends are refused as STOPPED.
    let deadline = Instant::now() + WAIT;
    // SAFETY: s.srv is live; the payload is a valid slice.
    while unsafe { tf_send(s.srv, conns[0].1, b"x".as_ptr(), 1) } != TF_ERR_STOPPED {
        assert!(Instant::now() < deadline, "the first stop never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: as above.
    assert_eq!(unsafe { tf_server_stop(s.srv, 0) }, TF_OK);
    returned.store(true, Ordering::SeqCst);
    assert_eq!(closed.load(Ordering::SeqCst), 3, "the second stop returned before every on_close");
    assert_eq!(first.join().unwrap(), TF_OK);
    assert_eq!(late.load(Ordering::SeqCst), 0, "a callback ran after tf_server_stop returned");
}

/// A length no slice can have (a negative length cast to size_t, SIZE_MAX)
/// is longer than max frame: TF_ERR_TOO_LARGE from every send call, and
/// nothing is read from the pointer.
#[test]
fn a_length_past_any_slice_is_too_large_for_every_send_call() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    let p = b"x".as_ptr();
    for len in [usize::MAX, usize::MAX - 3, isize::MAX as usize + 1] {
        // SAFETY: the call refuses the length before reading through `p`.
        unsafe {
            assert_eq!(tf_send(srv.srv, id, p, len), TF_ERR_TOO_LARGE, "tf_send {len}");
            let iov = [tf_iovec { base: p, len }];
            assert_eq!(tf_sendv(srv.srv, id, iov.as_ptr(), 1), TF_ERR_TOO_LARGE, "tf_sendv {len}");
            let mut queued = 7usize;
            assert_eq!(
                tf_send_many(srv.srv, &id, 1, p, len, &mut queued),
                TF_ERR_TOO_LARGE,
                "send_many {len}"
            );
        }
    }
    assert_eq!(srv.send(id, b"after"), TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"after", "the refused calls queued nothing");
}

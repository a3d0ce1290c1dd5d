//! Robustness rules for connections (API.md, "Robustness: rules and additions
//! from an adversarial review"): tf_conn_abort, the close timeout, the close
//! reason a tf_conn_close cannot override, the partial-frame budget,
//! fairness between connections, and deadlines taken from real event times.
//! Pull mode: robustness_pull.rs; freeing, fork and thread-exit destructors:
//! robustness_host.rs.
mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// More output than the kernel buffers for a peer that does not read (the
/// server's send buffer grows to 4 MiB by default; the peer's receive buffer
/// is kept small), within the default max queued output (16 MiB).
const MORE_THAN_FITS: usize = 12 * MIB;

/// Queues `total` bytes for `id` in 64 KiB frames (the peer does not read).
fn queue_output(srv: &TestServer, id: u64, total: usize) {
    let chunk = vec![7u8; 64 * KIB];
    for _ in 0..total / chunk.len() {
        assert_eq!(srv.send(id, &chunk), TF_OK);
    }
}

/// Reads (and drops) what arrives until the connection ends; true when it
/// ended with a reset (ECONNRESET), false for an orderly end of stream.
fn ends_with_reset(s: &mut TcpStream) -> bool {
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 256 * KIB];
    loop {
        assert!(Instant::now() < deadline, "the connection did not end");
        match s.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Time from now until on_close names `id`, and its reason.
fn time_to_close(rec: &Recorder, id: u64) -> (Duration, i32) {
    let t = Instant::now();
    let reason = rec.wait_close(id);
    (t.elapsed(), reason)
}

// ---------------------------------------------------------------- tf_conn_abort

#[test]
fn abort_discards_queued_output_resets_the_peer_and_closes_local() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    queue_output(&srv, id, MORE_THAN_FITS);
    // Let part of it reach the peer's buffers.
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_conn_abort(srv.srv, id) }, TF_OK);
    assert_eq!(srv.send(id, b"after abort"), TF_ERR_NO_CONN, "no frame is taken after tf_conn_abort");
    let (after, reason) = time_to_close(&srv.rec, id);
    assert_eq!(reason, TF_CLOSE_LOCAL);
    assert!(after < Duration::from_secs(1), "on_close came {after:?} after tf_conn_abort");
    assert!(ends_with_reset(&mut s), "the peer sees a reset, not an orderly end");
    assert_eq!(srv.send(id, b"later"), TF_ERR_NO_CONN);
    assert_eq!(srv.stats().connections_active, 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(srv.rec.closes_of(id).len(), 1, "exactly one on_close");
}

#[test]
fn abort_after_conn_close_gives_up_on_a_peer_that_does_not_read() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let mut s = connect_small_rcvbuf(srv.addr, 4096);
    let id = srv.rec.wait_connect(1)[0];
    queue_output(&srv, id, MORE_THAN_FITS);
    assert_eq!(srv.close(id), TF_OK);
    std::thread::sleep(Duration::from_millis(200));
    assert!(srv.rec.closes_of(id).is_empty(), "tf_conn_close waits for the queued output (10 s default)");
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_conn_abort(srv.srv, id) }, TF_OK, "abort is allowed after tf_conn_close");
    let (after, reason) = time_to_close(&srv.rec, id);
    assert_eq!(reason, TF_CLOSE_LOCAL);
    assert!(after < Duration::from_secs(1), "on_close came {after:?} after tf_conn_abort");
    assert!(ends_with_reset(&mut s));
    assert_eq!(srv.stats().connections_active, 0);
}

#[test]
fn abort_of_an_unknown_or_finished_connection_is_no_conn() {
    let srv = TestServer::start(Opts::default());
    // SAFETY: srv is live; NULL is checked by the library.
    unsafe {
        assert_eq!(tf_conn_abort(srv.srv, 987_654_321), TF_ERR_NO_CONN);
        assert_eq!(tf_conn_abort(std::ptr::null_mut(), 1), TF_ERR_INVALID);
    }
    let (s, id) = srv.connect_id();
    drop(s);
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_PEER);
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_conn_abort(srv.srv, id) }, TF_ERR_NO_CONN, "its on_close has run");
}

#[test]
fn abort_after_stop_is_stopped() {
    let mut srv = TestServer::start(Opts::default());
    let (_s, id) = srv.connect_id();
    assert_eq!(srv.stop(0), TF_OK);
    // SAFETY: srv is live until drop.
    assert_eq!(unsafe { tf_conn_abort(srv.srv, id) }, TF_ERR_STOPPED);
    assert_eq!(srv.rec.closes_of(id), vec![TF_CLOSE_SHUTDOWN]);
}

#[test]
fn abort_from_inside_on_message_closes_the_sender() {
    let results = Arc::new(Mutex::new(Vec::new()));
    let r = results.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                if data == b"abort me" {
                    // SAFETY: srv is live during its callbacks.
                    let queued = unsafe { tf_send(srv, conn, b"never sent".as_ptr(), 10) };
                    // SAFETY: as above.
                    let abort = unsafe { tf_conn_abort(srv, conn) };
                    // SAFETY: as above.
                    let after = unsafe { tf_send(srv, conn, b"x".as_ptr(), 1) };
                    r.lock().unwrap().push((queued, abort, after));
                } else {
                    // SAFETY: as above.
                    unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut other, _) = srv.connect_id();
    let (mut s, id) = srv.connect_id();
    write_frame(&mut s, b"abort me");
    assert_eq!(srv.rec().wait_close(id), TF_CLOSE_LOCAL);
    assert_eq!(*results.lock().unwrap(), vec![(TF_OK, TF_OK, TF_ERR_NO_CONN)]);
    assert!(ends_with_reset(&mut s), "the queued frame is discarded and the peer reset");
    write_frame(&mut other, b"unaffected");
    assert_eq!(read_frame(&mut other).unwrap(), b"unaffected");
}

// ---------------------------------------------------------------- close timeout

#[test]
fn close_timeout_resets_peers_that_never_read_and_frees_their_slots() {
    let srv = TestServer::start(Opts { echo: false, close_timeout_ms: Some(300), ..Opts::default() });
    let mut peers = Vec::new();
    for n in 1..=3 {
        let s = connect_small_rcvbuf(srv.addr, 4096);
        let id = srv.rec.wait_connect(n)[n - 1];
        queue_output(&srv, id, MORE_THAN_FITS);
        peers.push((s, id));
    }
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    for (_, id) in &peers {
        assert_eq!(srv.close(*id), TF_OK);
    }
    for (_, id) in &peers {
        assert_eq!(srv.rec.wait_close(*id), TF_CLOSE_LOCAL);
    }
    let all_closed = t.elapsed();
    assert!(all_closed < Duration::from_secs(2), "on_close for all three took {all_closed:?}");
    assert!(all_closed >= Duration::from_millis(250), "reset before the close timeout: {all_closed:?}");
    assert_eq!(srv.stats().connections_active, 0);
    for (s, _) in &mut peers {
        assert!(ends_with_reset(s), "a peer that did not read in time is reset");
    }
}

#[test]
fn close_timeout_does_not_cut_a_peer_that_reads_everything_in_time() {
    let srv = TestServer::start(Opts { echo: false, close_timeout_ms: Some(2000), ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    for i in 0..32u8 {
        assert_eq!(srv.send(id, &vec![i; 64 * KIB]), TF_OK);
    }
    assert_eq!(srv.close(id), TF_OK);
    for i in 0..32u8 {
        assert_eq!(read_frame(&mut s).expect("every queued frame arrives"), vec![i; 64 * KIB]);
    }
    assert!(wait_eof(&mut s));
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_LOCAL);
}

#[test]
fn without_a_close_timeout_set_conn_close_waits_longer_than_a_second() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let _s = connect_small_rcvbuf(srv.addr, 4096);
    let id = srv.rec.wait_connect(1)[0];
    queue_output(&srv, id, MORE_THAN_FITS);
    assert_eq!(srv.close(id), TF_OK);
    std::thread::sleep(Duration::from_millis(1200));
    assert!(srv.rec.closes_of(id).is_empty(), "the default close timeout is 10 s");
    assert_eq!(srv.stats().connections_active, 1);
    // SAFETY: srv is live.
    assert_eq!(unsafe { tf_conn_abort(srv.srv, id) }, TF_OK);
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_LOCAL);
}

// ------------------------------------------- tf_conn_close while closing for cause

/// Calls tf_conn_close on the `tracked` connections from inside a callback
/// (the first on_connect of a new client when `on_connect` is set, else the
/// first on_close of a tracked connection), then holds the loop there while
/// the test thread calls tf_conn_close and tf_conn_abort on them too. By
/// then they are all closing for a reason of their own: every call must be
/// TF_ERR_NO_CONN, and every on_close must carry that reason.
#[derive(Default)]
struct CloseProbe {
    tracked: Mutex<Vec<u64>>,
    on_connect: AtomicBool,
    /// The connection whose callback probes (not probed itself).
    first: Mutex<Option<u64>>,
    in_callback: Mutex<Vec<(u64, i32)>>,
    holding: AtomicBool,
    released: AtomicBool,
}

impl CloseProbe {
    fn probe(&self, srv: *mut tf_server, from: u64) {
        if self.first.lock().unwrap().replace(from).is_some() {
            return; // once
        }
        for &c in self.tracked.lock().unwrap().iter().filter(|&&c| c != from) {
            // SAFETY: srv is live during its callbacks.
            let rc = unsafe { tf_conn_close(srv, c) };
            self.in_callback.lock().unwrap().push((c, rc));
        }
        self.holding.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + WAIT;
        while !self.released.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn close_probe_server(o: Opts, slow: Duration) -> (HookServer, Arc<CloseProbe>) {
    let probe = Arc::new(CloseProbe::default());
    let (p1, p2) = (probe.clone(), probe.clone());
    let srv = HookServer::start(
        o,
        Hooks {
            on_connect: Some(Box::new(move |srv, conn| {
                if p1.on_connect.load(Ordering::SeqCst) {
                    p1.probe(srv, conn);
                }
                0
            })),
            on_message: Some(Box::new(move |_, _, data| {
                if data == b"slow" {
                    std::thread::sleep(slow);
                }
            })),
            on_close: Some(Box::new(move |srv, conn, _| {
                if !p2.on_connect.load(Ordering::SeqCst) && p2.tracked.lock().unwrap().contains(&conn) {
                    p2.probe(srv, conn);
                }
            })),
            ..Hooks::default()
        },
    );
    (srv, probe)
}

fn check_close_probe(srv: &HookServer, probe: &CloseProbe, want: i32) {
    let deadline = Instant::now() + WAIT;
    while !probe.holding.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the probe did not run: {:?}", srv.rec().snapshot());
        std::thread::sleep(Duration::from_millis(2));
    }
    let first = *probe.first.lock().unwrap();
    let probed: Vec<u64> =
        probe.tracked.lock().unwrap().iter().copied().filter(|&c| Some(c) != first).collect();
    let mut outside = Vec::new();
    for &c in &probed {
        // SAFETY: srv is live.
        let close_rc = unsafe { tf_conn_close(srv.srv, c) };
        // SAFETY: srv is live.
        let abort_rc = unsafe { tf_conn_abort(srv.srv, c) };
        outside.push((c, close_rc, abort_rc));
    }
    probe.released.store(true, Ordering::SeqCst);
    let tracked = probe.tracked.lock().unwrap().clone();
    for &c in &tracked {
        assert_eq!(srv.rec().wait_close(c), want, "on_close of {c} carries the reason it was closing for");
    }
    let inside = probe.in_callback.lock().unwrap().clone();
    assert_eq!(inside.iter().map(|&(c, _)| c).collect::<Vec<_>>(), probed);
    for (c, rc) in inside {
        assert_eq!(rc, TF_ERR_NO_CONN, "tf_conn_close({c}) from a callback");
    }
    for (c, close_rc, abort_rc) in outside {
        assert_eq!(close_rc, TF_ERR_NO_CONN, "tf_conn_close({c}) from the host thread");
        assert_eq!(abort_rc, TF_ERR_NO_CONN, "tf_conn_abort({c}) from the host thread");
    }
}

#[test]
fn conn_close_on_a_connection_closing_as_too_large_is_no_conn_and_keeps_the_reason() {
    // closereason.c. In one loop iteration, reads come before accepts: Y's
    // oversize prefix is read (Y is closing as TOO_LARGE) and then W is
    // accepted; W's on_connect probes Y before the close phase reports it.
    let (srv, probe) = close_probe_server(
        Opts { max_frame: Some(1024), threads: Some(1), ..Opts::default() },
        Duration::from_millis(300),
    );
    let (mut z, _) = srv.connect_id();
    let (mut y, y_id) = srv.connect_id();
    probe.tracked.lock().unwrap().push(y_id);
    probe.on_connect.store(true, Ordering::SeqCst);
    write_frame(&mut z, b"slow"); // holds the loop while Y and W get ready
    std::thread::sleep(Duration::from_millis(100));
    y.write_all(&0xFFFF_FFFFu32.to_le_bytes()).unwrap();
    let _w = srv.connect();
    check_close_probe(&srv, &probe, TF_CLOSE_TOO_LARGE);
}

#[test]
fn conn_close_after_a_too_large_close_was_reported_elsewhere_is_no_conn() {
    // Two connections closed as TOO_LARGE in one iteration: from the first
    // one's on_close, the second's on_close is due.
    let (srv, probe) = close_probe_server(
        Opts { max_frame: Some(1024), threads: Some(1), ..Opts::default() },
        Duration::from_millis(300),
    );
    let (mut z, _) = srv.connect_id();
    let (mut y1, id1) = srv.connect_id();
    let (mut y2, id2) = srv.connect_id();
    probe.tracked.lock().unwrap().extend([id1, id2]);
    write_frame(&mut z, b"slow");
    std::thread::sleep(Duration::from_millis(100));
    y1.write_all(&0xFFFF_FFFFu32.to_le_bytes()).unwrap();
    y2.write_all(&(1025u32).to_le_bytes()).unwrap();
    check_close_probe(&srv, &probe, TF_CLOSE_TOO_LARGE);
}

#[test]
fn conn_close_on_a_connection_closing_as_idle_is_no_conn_and_keeps_the_reason() {
    // Z's slow callback holds the loop past every deadline: all three are
    // found idle in the same iteration; the first on_close probes the others.
    // (No callback runs between the idle decision and the close phase, so
    // this is the latest state of such a connection: its on_close is due.)
    let (srv, probe) = close_probe_server(
        Opts { idle_ms: Some(300), threads: Some(1), ..Opts::default() },
        Duration::from_millis(600),
    );
    let (_y1, id1) = srv.connect_id();
    let (_y2, id2) = srv.connect_id();
    let (mut z, id3) = srv.connect_id();
    probe.tracked.lock().unwrap().extend([id1, id2, id3]);
    write_frame(&mut z, b"slow");
    check_close_probe(&srv, &probe, TF_CLOSE_IDLE);
}

// ---------------------------------------------------------------- max buffered

#[test]
fn the_partial_frame_budget_closes_the_connection_holding_the_most() {
    let srv = TestServer::start(Opts {
        max_frame: Some(4 * MIB as u32),
        max_buffered: Some(2 * MIB as u64),
        record: false,
        // "The connection holding the most": exact within one loop thread.
        threads: Some(1),
        ..Opts::default()
    });
    // Each peer announces 1 MiB and sends part of it, one after another.
    // The fourth peer's reads take the total past 2 MiB (at ~448 KiB of its
    // 1000): the third, holding 900 KiB, is the largest and is closed; once
    // it is gone everything fits again.
    let sizes = [300 * KIB, 400 * KIB, 900 * KIB, 1000 * KIB];
    let mut peers = Vec::new();
    let mut sent = 0u64;
    for &size in &sizes {
        let (mut s, id) = srv.connect_id();
        let mut wire = (MIB as u32).to_le_bytes().to_vec();
        wire.extend(pattern(size, 3));
        s.write_all(&wire).unwrap();
        sent += wire.len() as u64;
        srv.wait_stats("the partial frame read", |st| st.bytes_received == sent);
        peers.push((s, id));
    }
    assert_eq!(srv.rec.wait_close(peers[2].1), TF_CLOSE_OVERLOAD, "the largest holder is closed");
    std::thread::sleep(Duration::from_millis(100));
    let closes: Vec<_> = srv.rec.snapshot().into_iter().filter(|e| matches!(e, Ev::Close(..))).collect();
    assert_eq!(closes, vec![Ev::Close(peers[2].1, TF_CLOSE_OVERLOAD)], "only one connection pays");
    assert!(wait_eof(&mut peers[2].0));
    assert_eq!(srv.stats().connections_active, 3);
    let (mut fresh, _) = srv.connect_id();
    write_frame(&mut fresh, b"still served");
    assert_eq!(read_frame(&mut fresh).unwrap(), b"still served");
}

/// The budget is in bytes held, not in what their buffers reserve: 30,005
/// bytes under a 50,000 budget close nothing; past it, the connection that
/// holds the most bytes pays (not the one whose buffer grew last).
#[test]
fn the_budget_counts_bytes_held_not_buffer_capacity() {
    let srv = TestServer::start(Opts {
        max_buffered: Some(10_000),
        record: false,
        threads: Some(1),
        ..Opts::default()
    });
    let mut sent = 0u64;
    let mut partial = |s: &mut TcpStream, head: bool, n: usize| {
        let mut wire = if head { 100_000u32.to_le_bytes().to_vec() } else { Vec::new() };
        wire.extend(pattern(n, 1));
        s.write_all(&wire).unwrap();
        sent += wire.len() as u64;
        srv.wait_stats("the bytes read", |st| st.bytes_received == sent);
    };
    let (mut a, ia) = srv.connect_id();
    let (mut b, ib) = srv.connect_id();
    partial(&mut a, true, 6_000);
    partial(&mut b, true, 3_000);
    // 9,008 held (prefixes included): under the budget, whatever the
    // buffers reserved to grow.
    partial(&mut b, false, 900);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(srv.stats().connections_active, 2, "closed under the budget");
    // b grows to 3,904 + 1,100 = 5,004, the total to 11,008: a holds the most.
    partial(&mut b, false, 1_100);
    assert_eq!(srv.rec.wait_close(ia), TF_CLOSE_OVERLOAD, "a holds the most");
    assert!(srv.rec.closes_of(ib).is_empty(), "b holds less and stays");
    drop(b);
}

// ---------------------------------------------------------------- fairness

#[test]
fn a_peer_streaming_tiny_frames_does_not_starve_a_ping_pong_peer() {
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            record: false,
            on_message: Some(Box::new(|srv, conn, data| {
                if data.len() > 1 {
                    // SAFETY: srv is live during its callbacks.
                    unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
                }
            })),
            ..Hooks::default()
        },
    );
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut blaster = srv.connect();
        let stop = &stop;
        let flood = scope.spawn(move || {
            let burst: Vec<u8> = (0..13_000).flat_map(|_| frame(b"x")).collect();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                blaster.write_all(&burst).expect("the blaster is read");
                sent += 13_000;
            }
            sent
        });
        // Let the flood build up before the ping-pong starts.
        let deadline = Instant::now() + WAIT;
        while srv.rec().messages.load(Ordering::SeqCst) < 50_000 {
            assert!(Instant::now() < deadline, "the flood did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut pinger = srv.connect();
        for i in 0..100u32 {
            let ping = format!("ping {i}");
            write_frame(&mut pinger, ping.as_bytes());
            assert_eq!(read_frame(&mut pinger).expect("echo within WAIT"), ping.as_bytes());
        }
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().unwrap();
        assert!(sent >= 50_000, "the flood was real: {sent} frames");
    });
}

// ------------------------------------------------ deadlines from real event times

/// When each connection opened (true) and closed (false).
type Times = Arc<Mutex<Vec<(u64, Instant, bool)>>>;

/// on_message sleeps 1 s on b"slow" and echoes anything else; on_connect and
/// on_close times are kept.
fn slow_echo_server(idle_ms: u32) -> (HookServer, Times) {
    let times = Arc::new(Mutex::new(Vec::new()));
    let (t1, t2) = (times.clone(), times.clone());
    let srv = HookServer::start(
        // One loop thread: the slow callback holds the loop the others wait on.
        Opts { idle_ms: Some(idle_ms), threads: Some(1), ..Opts::default() },
        Hooks {
            on_connect: Some(Box::new(move |_, conn| {
                t1.lock().unwrap().push((conn, Instant::now(), true));
                0
            })),
            on_message: Some(Box::new(|srv, conn, data| {
                if data == b"slow" {
                    std::thread::sleep(Duration::from_secs(1));
                } else {
                    // SAFETY: srv is live during its callbacks.
                    unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
                }
            })),
            on_close: Some(Box::new(move |_, conn, _| {
                t2.lock().unwrap().push((conn, Instant::now(), false));
            })),
            ..Hooks::default()
        },
    );
    (srv, times)
}

#[test]
fn a_slow_callback_does_not_make_an_active_connection_look_idle() {
    // repro_idle_stale.c: idle timeout 300 ms, A's frames each hold the loop 1 s.
    let (srv, _) = slow_echo_server(300);
    let (mut a, _) = srv.connect_id();
    let (mut c, c_id) = srv.connect_id();
    std::thread::sleep(Duration::from_millis(100));
    write_frame(&mut a, b"slow");
    std::thread::sleep(Duration::from_millis(200));
    write_frame(&mut a, b"slow");
    write_frame(&mut c, b"ping");
    assert_eq!(read_frame(&mut c).expect("C gets its echo"), b"ping");
    std::thread::sleep(Duration::from_millis(50));
    write_frame(&mut c, b"ping 2");
    assert_eq!(
        read_frame(&mut c),
        Some(b"ping 2".to_vec()),
        "C pinged 50 ms after its echo (idle timeout 300 ms); closes: {:?}",
        srv.rec().closes_of(c_id)
    );
    assert!(srv.rec().closes_of(c_id).is_empty());
}

#[test]
fn a_connection_accepted_after_a_slow_callback_gets_its_full_idle_timeout() {
    let (srv, times) = slow_echo_server(300);
    let (mut a, _) = srv.connect_id();
    write_frame(&mut a, b"slow");
    std::thread::sleep(Duration::from_millis(200));
    // While the loop sleeps: another slow frame from A (read first in the
    // next iteration) and a new client, accepted after that second second.
    write_frame(&mut a, b"slow");
    let _d = srv.connect();
    let d_id = srv.rec().wait_connect(2)[1];
    let reason = srv.rec().wait_close(d_id);
    assert_eq!(reason, TF_CLOSE_IDLE);
    let t = times.lock().unwrap().clone();
    let at = |open: bool| t.iter().find(|&&(c, _, o)| c == d_id && o == open).unwrap().1;
    let lived = at(false) - at(true);
    assert!(
        lived >= Duration::from_millis(250),
        "closed as idle {lived:?} after its on_connect (idle timeout 300 ms)"
    );
}

//! Several loop threads (tf_config_set_threads): affinity, spread, totals,
//! the connection limit as a total, stop and free from any thread, cross-loop
//! sends and closes racing peer closes, pull mode, one address one server,
//! threads = 0, the setter, and the log callback one call at a time.
//!
//! Every test sets its own thread count (TCPFRAME_TEST_THREADS does not
//! apply here); the backend follows TCPFRAME_TEST_BACKEND. Every wait is
//! bounded.
mod common;
use common::*;
use std::collections::{BTreeSet, HashMap};
use std::ffi::{c_char, c_void};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The OS thread id of the calling thread.
fn tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn opts(threads: u32) -> Opts {
    Opts { threads: Some(threads), ..Opts::default() }
}

/// tf_conn_get_info for `conn` (any thread, callbacks included).
fn info(srv: *mut tf_server, conn: u64) -> Result<tf_conn_info, i32> {
    let mut i = std::mem::MaybeUninit::<tf_conn_info>::uninit();
    // SAFETY: srv is live for the caller; i is written on success.
    let rc = unsafe { tf_conn_get_info(srv, conn, i.as_mut_ptr()) };
    if rc == TF_OK {
        // SAFETY: written by the TF_OK call above.
        Ok(unsafe { i.assume_init() })
    } else {
        Err(rc)
    }
}

fn send(srv: *mut tf_server, conn: u64, data: &[u8]) -> i32 {
    // SAFETY: srv is live for the caller.
    unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) }
}

fn stats(srv: *mut tf_server) -> tf_stats {
    let mut st = tf_stats::default();
    // SAFETY: srv is live for the caller.
    assert_eq!(unsafe { tf_server_stats(srv, &mut st) }, TF_OK);
    st
}

/// Polls `pred` until it holds, or panics after WAIT.
fn wait_until(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Burns about `d` of CPU on the calling thread (a busy callback).
fn spin(d: Duration) {
    let end = Instant::now() + d;
    let mut x = 1u64;
    while Instant::now() < end {
        for _ in 0..100 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// What each callback saw: (kind, OS thread, payload), per connection, in order.
type Trace = Arc<Mutex<HashMap<u64, Vec<(char, i32, Vec<u8>)>>>>;

/// Callbacks that echo and trace every callback with its OS thread id; on
/// connect they also note the connection's loop index (tf_conn_get_info).
fn tracing_hooks(trace: &Trace, index: &Arc<Mutex<HashMap<u64, u32>>>) -> Hooks {
    let (t1, t2, t3, idx) = (trace.clone(), trace.clone(), trace.clone(), index.clone());
    Hooks {
        on_connect: Some(Box::new(move |srv, conn| {
            let i = info(srv, conn).expect("info inside on_connect");
            idx.lock().unwrap().insert(conn, i.thread);
            t1.lock().unwrap().entry(conn).or_default().push(('c', tid(), Vec::new()));
            0
        })),
        on_message: Some(Box::new(move |srv, conn, data| {
            t2.lock().unwrap().entry(conn).or_default().push(('m', tid(), data.to_vec()));
            let rc = send(srv, conn, data);
            assert!(rc == TF_OK || rc == TF_ERR_NO_CONN, "echo: {rc}");
        })),
        on_close: Some(Box::new(move |_srv, conn, _reason| {
            t3.lock().unwrap().entry(conn).or_default().push(('x', tid(), Vec::new()));
        })),
        record: false,
        ..Hooks::default()
    }
}

#[test]
fn every_callback_of_a_connection_runs_on_one_thread_in_order() {
    for n in [2u32, 4] {
        let trace: Trace = Arc::default();
        let index = Arc::new(Mutex::new(HashMap::new()));
        let srv = HookServer::start(opts(n), tracing_hooks(&trace, &index));
        let k = 4 * n as usize;
        let mut clients: Vec<TcpStream> = (0..k).map(|_| srv.connect()).collect();
        srv.rec().wait_connect(k);
        // Two bursts per connection, all connections at once, echoes read.
        for burst in 0..2u32 {
            for c in clients.iter_mut() {
                let mut wire = Vec::new();
                for j in 0..10u32 {
                    wire.extend(frame(&(burst * 10 + j).to_le_bytes()));
                }
                c.write_all(&wire).unwrap();
            }
            for c in clients.iter_mut() {
                for j in 0..10u32 {
                    assert_eq!(read_frame(c).unwrap(), (burst * 10 + j).to_le_bytes());
                }
            }
        }
        drop(clients);
        wait_until("every on_close", || srv.rec().closes.load(Ordering::SeqCst) == k as u64);
        let me = tid();
        let trace = trace.lock().unwrap().clone();
        let index = index.lock().unwrap().clone();
        assert_eq!(trace.len(), k);
        let mut tid_of_loop: HashMap<u32, i32> = HashMap::new();
        for (conn, evs) in &trace {
            let tids: BTreeSet<i32> = evs.iter().map(|e| e.1).collect();
            assert_eq!(tids.len(), 1, "n={n}: connection {conn} ran on threads {tids:?}");
            let t = *tids.iter().next().unwrap();
            assert_ne!(t, me, "callbacks run on loop threads, not the host's");
            // In order: connect, the 20 frames, close.
            let kinds: String = evs.iter().map(|e| e.0).collect();
            assert_eq!(kinds, format!("c{}x", "m".repeat(20)), "n={n}: connection {conn}");
            let seqs: Vec<u32> = evs
                .iter()
                .filter(|e| e.0 == 'm')
                .map(|e| u32::from_le_bytes(e.2[..4].try_into().unwrap()))
                .collect();
            assert_eq!(seqs, (0..20).collect::<Vec<_>>());
            // One loop index, one OS thread, and the other way round.
            let l = index[conn];
            assert!(l < n);
            assert_eq!(*tid_of_loop.entry(l).or_insert(t), t, "loop {l} is one thread");
        }
        let distinct: BTreeSet<i32> = tid_of_loop.values().copied().collect();
        assert_eq!(tid_of_loop.len(), n as usize, "n={n}: every loop served some of {k} connections");
        assert_eq!(distinct.len(), n as usize, "n={n}: each loop is its own thread");
    }
}

#[test]
fn every_block_of_10n_connections_gives_each_thread_at_least_3() {
    for n in [2u32, 4] {
        let trace: Trace = Arc::default();
        let index = Arc::new(Mutex::new(HashMap::new()));
        let srv = HookServer::start(opts(n), tracing_hooks(&trace, &index));
        let total = 30 * n as usize;
        let mut clients = Vec::new();
        // Opened one after another; the first half each waits for its on_connect.
        for i in 0..total {
            if i < total / 2 {
                clients.push(srv.connect_id().0);
            } else {
                clients.push(srv.connect());
            }
        }
        let ids = srv.rec().wait_connect(total);
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (1..=total as u64).collect::<Vec<_>>(), "ids stay sequential");
        let index = index.lock().unwrap().clone();
        let trace = trace.lock().unwrap().clone();
        for block in sorted.chunks(10 * n as usize) {
            let mut per_loop = vec![0usize; n as usize];
            let mut per_tid: HashMap<i32, usize> = HashMap::new();
            for id in block {
                per_loop[index[id] as usize] += 1;
                *per_tid.entry(trace[id][0].1).or_default() += 1;
            }
            assert!(per_loop.iter().all(|&c| c >= 3), "n={n}: block {block:?} per loop {per_loop:?}");
            assert_eq!(per_tid.len(), n as usize, "n={n}: OS threads in a block: {per_tid:?}");
            assert!(per_tid.values().all(|&c| c >= 3), "n={n}: per OS thread {per_tid:?}");
        }
        // The host's view from outside any callback agrees.
        for id in &sorted {
            assert_eq!(info(srv.srv, *id).unwrap().thread, index[id]);
        }
        drop(clients);
    }
}

#[test]
fn stats_are_totals_over_every_loop() {
    let srv = TestServer::start(Opts { threads: Some(3), record: false, ..Opts::default() });
    let mut clients: Vec<TcpStream> = (0..9).map(|_| srv.connect()).collect();
    srv.rec.wait_connect(9);
    for c in clients.iter_mut() {
        for j in 0..5u8 {
            write_frame(c, &[j; 10]);
        }
    }
    for c in clients.iter_mut() {
        for j in 0..5u8 {
            assert_eq!(read_frame(c).unwrap(), [j; 10]);
        }
    }
    let st = srv.wait_stats("45 frames each way", |s| s.frames_sent == 45);
    assert_eq!(st.connections_accepted, 9);
    assert_eq!(st.connections_active, 9);
    assert_eq!(st.connections_rejected, 0);
    assert_eq!(st.frames_received, 45);
    assert_eq!(st.bytes_received, 45 * 14);
    assert_eq!(st.bytes_sent, 45 * 14);
    // Per connection, the counters add up to the totals too.
    let ids = srv.rec.connects();
    let per: Vec<tf_conn_info> = ids.iter().map(|&id| info(srv.srv, id).unwrap()).collect();
    assert_eq!(per.iter().map(|i| i.frames_received).sum::<u64>(), 45);
    assert_eq!(per.iter().map(|i| i.bytes_sent).sum::<u64>(), 45 * 14);
    let loops: BTreeSet<u32> = per.iter().map(|i| i.thread).collect();
    assert_eq!(loops, (0..3).collect(), "the connections are on every loop");
    drop(clients);
    let st = srv.wait_stats("every close", |s| s.connections_active == 0);
    assert_eq!(st.connections_accepted, 9);
}

#[test]
fn max_connections_is_a_total_across_loops() {
    let srv = TestServer::start(Opts { threads: Some(4), max_connections: Some(6), ..Opts::default() });
    let mut kept: Vec<TcpStream> = (0..6).map(|_| srv.connect()).collect();
    // Accept order is connect order: kept[i] is id i + 1 (on_connects of
    // different loops may be recorded in another order).
    let mut ids = srv.rec.wait_connect(6);
    ids.sort_unstable();
    assert_eq!(ids, (1..=6).collect::<Vec<u64>>());
    let loops: BTreeSet<u32> = ids.iter().map(|&id| info(srv.srv, id).unwrap().thread).collect();
    assert_eq!(loops.len(), 4, "6 connections over 4 loops: {loops:?}");
    // Four more: each closed at once, no on_connect, counted as rejected.
    for _ in 0..4 {
        let mut s = srv.connect();
        assert!(wait_eof(&mut s), "a connection past the total limit is closed");
    }
    srv.wait_stats("4 rejected", |s| s.connections_rejected == 4);
    assert_eq!(srv.rec.connects().len(), 6);
    assert_eq!(srv.stats().connections_active, 6);
    // Two leave (whatever loops they were on): two may come in, not three.
    let gone: Vec<u64> = ids[..2].to_vec();
    kept.drain(..2);
    for id in gone {
        srv.rec.wait_close(id);
    }
    let mut newer: Vec<TcpStream> = (0..2).map(|_| srv.connect()).collect();
    srv.rec.wait_connect(8);
    let mut s = srv.connect();
    assert!(wait_eof(&mut s));
    srv.wait_stats("5 rejected", |s| s.connections_rejected == 5);
    assert_eq!(srv.stats().connections_active, 6);
    for c in kept.iter_mut().chain(newer.iter_mut()) {
        write_frame(c, b"still served");
        assert_eq!(read_frame(c).unwrap(), b"still served");
    }
}

#[test]
fn stop_from_another_thread_while_every_loop_is_busy_is_bounded() {
    let n = 4u32;
    let busy = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let (b1, c1, c2) = (busy.clone(), calls.clone(), calls.clone());
    let srv = HookServer::start(
        opts(n),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                c1.fetch_add(1, Ordering::SeqCst);
                b1.fetch_add(1, Ordering::SeqCst);
                spin(Duration::from_millis(2));
                let _ = send(srv, conn, data);
            })),
            on_close: Some(Box::new(move |_, _, _| {
                c2.fetch_add(1, Ordering::SeqCst);
            })),
            record: false,
            ..Hooks::default()
        },
    );
    let k = 2 * n as usize;
    let clients: Vec<TcpStream> = (0..k).map(|_| srv.connect()).collect();
    let ids = srv.rec().wait_connect(k);
    let loops: BTreeSet<u32> = ids.iter().map(|&id| info(srv.srv, id).unwrap().thread).collect();
    assert_eq!(loops.len(), n as usize);
    // Each client streams frames (8 in flight) and reads echoes until the end.
    let (done_tx, done_rx) = mpsc::channel();
    for mut c in clients {
        let tx = done_tx.clone();
        std::thread::spawn(move || {
            let wire: Vec<u8> = (0..8).flat_map(|_| frame(b"work")).collect();
            let mut buf = [0u8; 4096];
            'out: loop {
                if c.write_all(&wire).is_err() {
                    break;
                }
                let mut got = 0;
                while got < wire.len() {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break 'out,
                        Ok(r) => got += r,
                    }
                }
            }
            let _ = tx.send(());
        });
    }
    drop(done_tx);
    wait_until("every loop busy", || busy.load(Ordering::SeqCst) >= 50);
    std::thread::sleep(Duration::from_millis(100));
    let raw = srv.srv as usize;
    let t0 = Instant::now();
    let stopper = std::thread::spawn(move || {
        // SAFETY: the server stays live until the HookServer is dropped, after this join.
        unsafe { tf_server_stop(raw as *mut tf_server, 200) }
    });
    let rc = stopper.join().unwrap();
    let took = t0.elapsed();
    assert_eq!(rc, TF_OK);
    assert!(took < Duration::from_secs(3), "tf_server_stop took {took:?} with every loop busy");
    // Every connection was told once; nothing runs after stop returned.
    let closes = srv.rec().snapshot().iter().filter(|e| matches!(e, Ev::Close(..))).count();
    assert_eq!(closes, k);
    let after = calls.load(Ordering::SeqCst);
    for _ in 0..k {
        done_rx.recv_timeout(WAIT).expect("every client sees the end");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(calls.load(Ordering::SeqCst), after, "a callback ran after tf_server_stop returned");
    let mut per_conn: HashMap<u64, usize> = HashMap::new();
    for e in srv.rec().snapshot() {
        if let Ev::Close(c, r) = e {
            assert_eq!(r, TF_CLOSE_SHUTDOWN);
            *per_conn.entry(c).or_default() += 1;
        }
    }
    assert!(per_conn.values().all(|&c| c == 1), "{per_conn:?}");
    assert_eq!(srv.rec().closes.load(Ordering::SeqCst), k as u64);
    // SAFETY: live until drop; a second stop is a no-op.
    assert_eq!(unsafe { tf_server_stop(srv.srv, 0) }, TF_OK);
}

#[test]
fn a_send_and_close_for_another_loops_connection_work_from_a_callback() {
    // Pairs (odd id on loop 0, the next even id on loop 1): a frame "to
    // partner: X" makes the callback send X to the partner, "close partner"
    // closes it, from the other loop's thread.
    let srv = HookServer::start(
        opts(2),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                let partner = if conn % 2 == 1 { conn + 1 } else { conn - 1 };
                if let Some(x) = data.strip_prefix(b"to partner: ") {
                    assert_eq!(send(srv, partner, x), TF_OK);
                } else if data == b"close partner" {
                    // SAFETY: srv is live during its callbacks.
                    assert_eq!(unsafe { tf_conn_close(srv, partner) }, TF_OK);
                }
            })),
            ..Hooks::default()
        },
    );
    let (mut a, a_id) = srv.connect_id();
    let (mut b, b_id) = srv.connect_id();
    assert_eq!((a_id % 2, b_id), (1, a_id + 1));
    assert_eq!((info(srv.srv, a_id).unwrap().thread, info(srv.srv, b_id).unwrap().thread), (0, 1));
    write_frame(&mut a, b"to partner: hello b");
    assert_eq!(read_frame(&mut b).unwrap(), b"hello b");
    write_frame(&mut b, b"to partner: hello a");
    assert_eq!(read_frame(&mut a).unwrap(), b"hello a");
    // Frames queued just before the close are still written, then EOF.
    write_frame(&mut a, b"to partner: last");
    write_frame(&mut a, b"close partner");
    assert_eq!(read_frame(&mut b).unwrap(), b"last");
    assert!(wait_eof(&mut b));
    assert_eq!(srv.rec().wait_close(b_id), TF_CLOSE_LOCAL);
    write_frame(&mut a, b"still here");
    srv.rec().wait_for("a still served", |e| {
        e.iter().any(|e| matches!(e, Ev::Message(_, d) if d == b"still here"))
    });
}

#[test]
fn cross_loop_sends_and_closes_racing_peer_closes_give_one_on_close_each() {
    let codes: Arc<Mutex<HashMap<i32, u64>>> = Arc::default();
    let closes: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let (c1, c2, cl) = (codes.clone(), codes.clone(), closes.clone());
    let srv = HookServer::start(
        opts(2),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                let partner = if conn % 2 == 1 { conn + 1 } else { conn - 1 };
                let mut rcs = vec![send(srv, partner, data), send(srv, conn, data)];
                if data[0] % 3 == 2 {
                    // SAFETY: srv is live during its callbacks.
                    rcs.push(unsafe { tf_conn_close(srv, partner) });
                }
                if data[0] % 5 == 4 {
                    // SAFETY: srv is live during its callbacks.
                    rcs.push(unsafe { tf_conn_abort(srv, partner) });
                }
                rcs.push(info(srv, partner).err().unwrap_or(TF_OK));
                let mut m = c1.lock().unwrap();
                for rc in rcs {
                    *m.entry(rc).or_default() += 1;
                }
            })),
            on_close: Some(Box::new(move |srv, conn, _| {
                *cl.lock().unwrap().entry(conn).or_default() += 1;
                // A send to a connection of the other loop from on_close, too.
                let partner = if conn % 2 == 1 { conn + 1 } else { conn - 1 };
                let rc = send(srv, partner, b"bye");
                *c2.lock().unwrap().entry(rc).or_default() += 1;
            })),
            record: false,
            ..Hooks::default()
        },
    );
    let mut total = 0u64;
    for round in 0..4u8 {
        let pairs = 20;
        let before = srv.rec().connects().len();
        let clients: Vec<TcpStream> = (0..2 * pairs).map(|_| srv.connect()).collect();
        let ids = srv.rec().wait_connect(before + 2 * pairs);
        total += 2 * pairs as u64;
        let mut ids: Vec<u64> = ids[before..].to_vec();
        ids.sort_unstable();
        assert_eq!(ids[0] % 2, 1, "pairs start on loop 0");
        // Every client, in its own thread: a few frames, then a close
        // (every third one a reset), racing the partner's callbacks.
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                std::thread::spawn(move || {
                    for j in 0..(1 + (i % 4) as u8) {
                        if c.write_all(&frame(&[round.wrapping_add(j).wrapping_add(i as u8); 8])).is_err() {
                            break;
                        }
                    }
                    if i % 3 == 0 {
                        reset(c);
                    } else {
                        drop(c);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        wait_until("an on_close for every connection", || srv.rec().closes.load(Ordering::SeqCst) == total);
    }
    std::thread::sleep(Duration::from_millis(100));
    let closes = closes.lock().unwrap();
    assert_eq!(closes.len() as u64, total);
    assert!(closes.values().all(|&c| c == 1), "exactly one on_close each: {closes:?}");
    assert_eq!(srv.rec().closes.load(Ordering::SeqCst), total);
    let codes = codes.lock().unwrap();
    for rc in codes.keys() {
        assert!([TF_OK, TF_ERR_NO_CONN].contains(rc), "unexpected code {rc}: {codes:?}");
    }
    assert!(codes.get(&TF_OK).copied().unwrap_or(0) > 0, "{codes:?}");
    assert_eq!(stats(srv.srv).connections_active, 0);
}

/// A pull-mode server on `threads` loops.
struct Pull {
    srv: *mut tf_server,
    port: u16,
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

    /// (kind, reason, conn, data) of up to `max` events.
    fn poll(&self, max: usize, timeout_ms: i32) -> Vec<(i32, i32, u64, Vec<u8>)> {
        let mut evs = vec![tf_event { kind: 0, reason: 0, conn: 0, data: std::ptr::null(), len: 0 }; max];
        let mut count = 0usize;
        // SAFETY: evs has room for max events.
        let rc = unsafe { tf_server_poll(self.srv, evs.as_mut_ptr(), max, &mut count, timeout_ms) };
        assert_eq!(rc, TF_OK);
        evs[..count]
            .iter()
            .map(|e| {
                let data = if e.len == 0 || e.data.is_null() {
                    Vec::new()
                } else {
                    // SAFETY: valid until the next poll; copied now.
                    unsafe { std::slice::from_raw_parts(e.data, e.len) }.to_vec()
                };
                (e.kind, e.reason, e.conn, data)
            })
            .collect()
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        // SAFETY: from tf_server_start_pull; freed once.
        unsafe { tf_server_free(self.srv) };
    }
}

#[test]
fn pull_mode_with_several_loops_has_one_queue_and_keeps_each_connections_order() {
    let p = Pull::start(opts(3));
    let k = 9;
    let per = 40u32;
    let clients: Vec<TcpStream> = (0..k)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s
        })
        .collect();
    // Every client writes its frames from its own thread, all at once.
    let writers: Vec<_> = clients
        .iter()
        .map(|c| {
            let mut c = c.try_clone().unwrap();
            std::thread::spawn(move || {
                for i in 0..per {
                    write_frame(&mut c, &i.to_le_bytes());
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut seen: HashMap<u64, Vec<i32>> = HashMap::new();
    let mut seqs: HashMap<u64, Vec<u32>> = HashMap::new();
    let want = k * (1 + per as usize);
    let mut got = 0;
    let deadline = Instant::now() + WAIT;
    while got < want {
        assert!(Instant::now() < deadline, "{got} of {want} events");
        for (kind, _, conn, data) in p.poll(64, 100) {
            got += 1;
            seen.entry(conn).or_default().push(kind);
            if kind == TF_EVENT_MESSAGE {
                seqs.entry(conn).or_default().push(u32::from_le_bytes(data[..4].try_into().unwrap()));
                // Replies from this host thread go to whichever loop owns it.
                assert_eq!(send(p.srv, conn, &data), TF_OK);
            }
        }
    }
    assert_eq!(seen.len(), k);
    let loops: BTreeSet<u32> = seen.keys().map(|&c| info(p.srv, c).unwrap().thread).collect();
    assert_eq!(loops, (0..3).collect(), "connections on every loop, events in one queue");
    for (conn, kinds) in &seen {
        assert_eq!(kinds[0], TF_EVENT_CONNECT, "connection {conn}: CONNECT first");
        assert!(kinds[1..].iter().all(|&x| x == TF_EVENT_MESSAGE));
        assert_eq!(seqs[conn], (0..per).collect::<Vec<_>>(), "connection {conn}: order kept");
    }
    let mut clients = clients;
    for c in clients.iter_mut() {
        for i in 0..per {
            assert_eq!(read_frame(c).unwrap(), i.to_le_bytes());
        }
    }
    drop(clients);
    let mut closed = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while closed.len() < k {
        assert!(Instant::now() < deadline, "{} of {k} CLOSE events", closed.len());
        for (kind, reason, conn, _) in p.poll(64, 100) {
            assert_eq!((kind, reason), (TF_EVENT_CLOSE, TF_CLOSE_PEER));
            assert!(closed.insert(conn), "one CLOSE per connection");
        }
    }
    assert!(p.poll(64, 50).is_empty());
}

/// tf_server_start on `addr` with `threads` loops; the code and the server.
fn try_start(addr: &str, threads: u32) -> (i32, *mut tf_server) {
    let o = Opts { addr: addr.into(), threads: Some(threads), ..Opts::default() };
    let cfg = config(&o);
    unsafe extern "C" fn on_message(_: *mut c_void, _: u64, _: *const u8, _: usize) {}
    let cb = tf_callbacks {
        user_data: std::ptr::null_mut(),
        on_connect: None,
        on_message: Some(on_message),
        on_close: None,
    };
    let mut srv = std::ptr::null_mut();
    // SAFETY: live pointers.
    let rc = unsafe { tf_server_start(cfg, &cb, &mut srv) };
    // SAFETY: from tf_config_new.
    unsafe { tf_config_free(cfg) };
    (rc, srv)
}

fn stop_free(srv: *mut tf_server) {
    // SAFETY: a live server, freed once.
    unsafe {
        tf_server_stop(srv, 0);
        tf_server_free(srv);
    }
}

/// Binds a socket with SO_REUSEPORT (a stranger that would like to share the
/// port) to 127.0.0.1:port; the errno of the bind, 0 when it succeeded.
fn stranger_bind(port: u16) -> i32 {
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let one: i32 = 1;
        for opt in [libc::SO_REUSEPORT, libc::SO_REUSEADDR] {
            libc::setsockopt(fd, libc::SOL_SOCKET, opt, &one as *const i32 as *const c_void, 4);
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = port.to_be();
        sa.sin_addr = libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be() };
        let rc = libc::bind(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32);
        let err = if rc == 0 { 0 } else { *libc::__errno_location() };
        libc::close(fd);
        err
    }
}

#[test]
fn a_second_server_on_a_used_address_fails_whatever_the_thread_counts() {
    for (a, b) in [(1u32, 2u32), (2, 1), (2, 2), (4, 3), (3, 0), (0, 4)] {
        let (rc, first) = try_start("127.0.0.1:0", a);
        assert_eq!(rc, TF_OK, "{}", last_error());
        // SAFETY: live.
        let port = unsafe { tf_server_port(first) };
        let (rc2, second) = try_start(&format!("127.0.0.1:{port}"), b);
        assert_eq!(rc2, TF_ERR_IO, "threads {a} then {b}: {}", last_error());
        assert!(second.is_null(), "*out untouched on failure");
        assert_eq!(stranger_bind(port), libc::EADDRINUSE, "threads {a}: no SO_REUSEPORT group to join");
        // The first one still accepts.
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        drop(s);
        stop_free(first);
    }
}

#[test]
fn zero_threads_means_one_loop_per_cpu_the_process_may_run_on() {
    let cpus = std::thread::available_parallelism().unwrap().get() as u32;
    let trace: Trace = Arc::default();
    let index = Arc::new(Mutex::new(HashMap::new()));
    let srv = HookServer::start(opts(0), tracing_hooks(&trace, &index));
    let k = (10 * cpus) as usize;
    let mut clients: Vec<TcpStream> = (0..k).map(|_| srv.connect()).collect();
    srv.rec().wait_connect(k);
    for c in clients.iter_mut().take(3) {
        write_frame(c, b"ping");
        assert_eq!(read_frame(c).unwrap(), b"ping");
    }
    let loops: BTreeSet<u32> = index.lock().unwrap().values().copied().collect();
    assert_eq!(loops, (0..cpus).collect(), "{cpus} CPUs");
    let tids: BTreeSet<i32> = trace.lock().unwrap().values().map(|v| v[0].1).collect();
    assert_eq!(tids.len(), cpus as usize);
    drop(clients);
    drop(srv);

    // Started from a thread allowed on one CPU only: one loop.
    if cpus > 1 {
        let handle = std::thread::spawn(|| {
            // Allowed on the first CPU this thread may run on, only.
            // SAFETY: zeroed cpu_set_t values are valid; the calls write inside them.
            unsafe {
                let mut now: libc::cpu_set_t = std::mem::zeroed();
                assert_eq!(libc::sched_getaffinity(0, std::mem::size_of_val(&now), &mut now), 0);
                let first = (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &now)).unwrap();
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(first, &mut set);
                assert_eq!(libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set), 0);
            }
            let index = Arc::new(Mutex::new(HashMap::new()));
            let srv = HookServer::start(opts(0), tracing_hooks(&Trace::default(), &index));
            let clients: Vec<TcpStream> = (0..6).map(|_| srv.connect()).collect();
            srv.rec().wait_connect(6);
            let loops: BTreeSet<u32> = index.lock().unwrap().values().copied().collect();
            drop(clients);
            loops
        });
        assert_eq!(handle.join().unwrap(), [0].into_iter().collect(), "one CPU allowed: one loop");
    }
}

#[test]
fn the_thread_count_setter_is_validated() {
    let cfg = tf_config_new();
    // SAFETY: cfg is live; NULL is a documented error.
    unsafe {
        assert_eq!(tf_config_set_threads(std::ptr::null_mut(), 2), TF_ERR_INVALID);
        for ok in [0u32, 1, 2, 255, 256] {
            assert_eq!(tf_config_set_threads(cfg, ok), TF_OK, "{ok}");
        }
        for bad in [257u32, 1000, u32::MAX] {
            assert_eq!(tf_config_set_threads(cfg, bad), TF_ERR_INVALID, "{bad}");
            assert!(last_error().contains("256"), "{}", last_error());
        }
        tf_config_free(cfg);
    }
    // A refused value leaves the last good one: 3 loops.
    let o = opts(3);
    let cfg = config(&o);
    // SAFETY: cfg is live.
    assert_eq!(unsafe { tf_config_set_threads(cfg, 300) }, TF_ERR_INVALID);
    let mut srv: *mut tf_server = std::ptr::null_mut();
    unsafe extern "C" fn on_message(_: *mut c_void, _: u64, _: *const u8, _: usize) {}
    unsafe extern "C" fn on_connect(_: *mut c_void, _: u64, _: *const c_char) -> i32 {
        0
    }
    let cb = tf_callbacks {
        user_data: std::ptr::null_mut(),
        on_connect: Some(on_connect),
        on_message: Some(on_message),
        on_close: None,
    };
    // SAFETY: live pointers.
    assert_eq!(unsafe { tf_server_start(cfg, &cb, &mut srv) }, TF_OK);
    // SAFETY: from tf_config_new.
    unsafe { tf_config_free(cfg) };
    // SAFETY: live.
    let port = unsafe { tf_server_port(srv) };
    let clients: Vec<TcpStream> = (0..9).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    wait_until("9 connections", || stats(srv).connections_active == 9);
    let loops: BTreeSet<u32> = (1..=9).map(|id| info(srv, id).unwrap().thread).collect();
    assert_eq!(loops, (0..3).collect());
    drop(clients);
    stop_free(srv);
}

struct LogProbe {
    inside: AtomicI32,
    overlaps: AtomicU64,
    lines: AtomicU64,
    tids: Mutex<BTreeSet<i32>>,
}

unsafe extern "C" fn probe_log(user: *mut c_void, _level: i32, _msg: *const c_char) {
    // SAFETY: user is the leaked LogProbe.
    let p = unsafe { &*(user as *const LogProbe) };
    if p.inside.fetch_add(1, Ordering::SeqCst) != 0 {
        p.overlaps.fetch_add(1, Ordering::SeqCst);
    }
    p.tids.lock().unwrap().insert(tid());
    // Long enough for another loop's line to arrive meanwhile, if it could.
    spin(Duration::from_millis(2));
    p.lines.fetch_add(1, Ordering::SeqCst);
    p.inside.fetch_sub(1, Ordering::SeqCst);
}

#[test]
fn the_log_callback_is_never_called_twice_at_the_same_time() {
    let n = 4u32;
    let probe: &'static LogProbe = Box::leak(Box::new(LogProbe {
        inside: AtomicI32::new(0),
        overlaps: AtomicU64::new(0),
        lines: AtomicU64::new(0),
        tids: Mutex::new(BTreeSet::new()),
    }));
    let srv = HookServer::start_with(
        Opts { threads: Some(n), max_frame: Some(16), ..Opts::default() },
        Hooks { record: false, ..Hooks::default() },
        |cfg| {
            // SAFETY: cfg is live; the probe is leaked (outlives the server).
            let rc = unsafe { tf_config_set_log(cfg, Some(probe_log), probe as *const _ as *mut c_void) };
            assert_eq!(rc, TF_OK);
        },
    );
    // Rounds of connections on every loop, each announcing a frame over max
    // frame at the same moment: each loop logs a warning for each.
    let go = Arc::new(AtomicBool::new(false));
    for _ in 0..3 {
        let k = 4 * n as usize;
        let before = srv.rec().connects().len();
        let clients: Vec<TcpStream> = (0..k).map(|_| srv.connect()).collect();
        srv.rec().wait_connect(before + k);
        go.store(false, Ordering::SeqCst);
        let hs: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                let go = go.clone();
                std::thread::spawn(move || {
                    while !go.load(Ordering::SeqCst) {
                        std::hint::spin_loop();
                    }
                    let _ = c.write_all(&1000u32.to_le_bytes());
                    wait_eof(&mut c);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        go.store(true, Ordering::SeqCst);
        for h in hs {
            h.join().unwrap();
        }
    }
    wait_until("log lines", || probe.lines.load(Ordering::SeqCst) >= 12);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(probe.overlaps.load(Ordering::SeqCst), 0, "the log callback ran twice at once");
    let tids = probe.tids.lock().unwrap().clone();
    assert!(tids.len() >= 2, "lines came from several loop threads: {tids:?}");
    drop(srv);
    assert_eq!(probe.overlaps.load(Ordering::SeqCst), 0);
}

#[test]
fn tf_server_stop_inside_a_callback_of_any_loop_is_invalid() {
    let results: Arc<Mutex<Vec<(u32, i32)>>> = Arc::default();
    let r = results.clone();
    let srv = HookServer::start(
        opts(3),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, data| {
                let l = info(srv, conn).unwrap().thread;
                // SAFETY: srv is live during its callbacks; refused, not a deadlock.
                let rc = unsafe { tf_server_stop(srv, 0) };
                r.lock().unwrap().push((l, rc));
                assert_eq!(send(srv, conn, data), TF_OK);
            })),
            ..Hooks::default()
        },
    );
    let mut clients: Vec<TcpStream> = (0..6).map(|_| srv.connect()).collect();
    srv.rec().wait_connect(6);
    for c in clients.iter_mut() {
        write_frame(c, b"stop?");
        assert_eq!(read_frame(c).unwrap(), b"stop?", "the server goes on");
    }
    let results = results.lock().unwrap().clone();
    assert_eq!(results.len(), 6);
    assert!(results.iter().all(|&(_, rc)| rc == TF_ERR_INVALID), "{results:?}");
    let loops: BTreeSet<u32> = results.iter().map(|r| r.0).collect();
    assert_eq!(loops, (0..3).collect());
}

#[test]
fn tf_server_free_from_a_callback_of_one_loop_ends_every_callback() {
    for free_on in [0u64, 1, 2] {
        let calls = Arc::new(AtomicU64::new(0));
        let freed = Arc::new(AtomicBool::new(false));
        let (c1, c2, c3, f1) = (calls.clone(), calls.clone(), calls.clone(), freed.clone());
        let mut srv = HookServer::start(
            opts(3),
            Hooks {
                on_connect: Some(Box::new(move |_, _| {
                    c3.fetch_add(1, Ordering::SeqCst);
                    0
                })),
                on_message: Some(Box::new(move |srv, conn, data| {
                    c1.fetch_add(1, Ordering::SeqCst);
                    if data == b"free" {
                        // SAFETY: the server's own handle, freed once, from its callback.
                        unsafe { tf_server_free(srv) };
                        f1.store(true, Ordering::SeqCst);
                        return;
                    }
                    spin(Duration::from_micros(20));
                    let _ = conn;
                })),
                on_close: Some(Box::new(move |_, _, _| {
                    c2.fetch_add(1, Ordering::SeqCst);
                })),
                record: false,
                ..Hooks::default()
            },
        );
        // Leaked: callbacks may still be returning when the test ends.
        std::mem::forget(srv.hooks.clone());
        let port = srv.port;
        let clients: Vec<TcpStream> = (0..6).map(|_| srv.connect()).collect();
        srv.rec().wait_connect(6);
        let _ = srv.disown();
        // Every connection streams frames (a busy loop each) until the end.
        let (tx, rx) = mpsc::channel();
        let mut freer = None;
        for (i, c) in clients.into_iter().enumerate() {
            // ids are 1..=6: connection id i+1 lives on loop i % 3.
            if i as u64 == free_on + 3 {
                freer = Some(c);
                continue;
            }
            let tx = tx.clone();
            let mut c = c;
            std::thread::spawn(move || {
                let wire: Vec<u8> = (0..16).flat_map(|_| frame(&[7u8; 64])).collect();
                while c.write_all(&wire).is_ok() {}
                let _ = tx.send(());
            });
        }
        drop(tx);
        wait_until("traffic on every loop", || calls.load(Ordering::SeqCst) > 300);
        let mut f = freer.unwrap();
        write_frame(&mut f, b"free");
        wait_until("the free", || freed.load(Ordering::SeqCst));
        // Loops close their connections as they end: every writer stops.
        for _ in 0..5 {
            rx.recv_timeout(WAIT).expect("every connection is closed after the free");
        }
        assert!(wait_eof(&mut f));
        std::thread::sleep(Duration::from_millis(100));
        let settled = calls.load(Ordering::SeqCst);
        // New connections are refused (the listener is gone), and nothing is called.
        assert!(refused_within(std::net::SocketAddr::from(([127, 0, 0, 1], port)), WAIT));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            settled,
            "a callback ran after tf_server_free (loop {free_on})"
        );
    }
}

//! tf_server_drain from inside a callback: the listener stops listening
//! during the call (an attempt after it returns is refused, even while the
//! callback goes on), and what the kernel had queued before it is served.
mod common;
use common::*;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One connection attempt, no retry: true when the kernel refused it.
fn refused_now(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
            true
        }
        Ok(_) => false,
    }
}

/// The callback drains, then keeps working: an attempt made meanwhile (the
/// listener descriptor still open, the loop busy) must not be accepted.
#[test]
fn an_attempt_after_a_drain_in_on_message_is_refused_while_the_callback_runs() {
    let drained = Arc::new(AtomicBool::new(false));
    let result = Arc::new(AtomicI32::new(i32::MIN));
    let (d, r) = (drained.clone(), result.clone());
    let hooks = Hooks {
        on_message: Some(Box::new(move |srv, conn, data| {
            if data == b"drain" {
                // SAFETY: srv is live during its callbacks.
                r.store(unsafe { tf_server_drain(srv) }, Ordering::SeqCst);
                d.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(300));
            }
            // SAFETY: as above.
            unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
        })),
        ..Hooks::default()
    };
    let s = HookServer::start(Opts::default(), hooks);
    let (mut a, _) = s.connect_id();
    write_frame(&mut a, b"drain");
    wait_flag(&drained, "the drain call to return");
    assert_eq!(result.load(Ordering::SeqCst), TF_OK);
    assert!(refused_now(s.addr), "a connection attempt after tf_server_drain returned was accepted");
    assert_eq!(read_frame(&mut a).as_deref(), Some(&b"drain"[..]));
    write_frame(&mut a, b"served on");
    assert_eq!(read_frame(&mut a).as_deref(), Some(&b"served on"[..]));
    assert!(refused_now(s.addr), "listening again after the callback returned");
    assert_eq!(s.rec().connects().len(), 1);
}

/// Drain from on_connect while other handshakes wait in the kernel's queue:
/// those were established before the call and are served; an attempt after
/// it is refused.
#[test]
fn a_drain_in_on_connect_serves_the_queue_and_refuses_what_comes_after() {
    let drained = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let (d, g) = (drained.clone(), go.clone());
    let started = Arc::new(AtomicBool::new(false));
    let st = started.clone();
    let hooks = Hooks {
        on_connect: Some(Box::new(move |srv, _| {
            if !st.swap(true, Ordering::SeqCst) {
                // The test queues two handshakes while this callback runs
                // (no panic in a callback: past the deadline it goes on and
                // the test fails on what it sees).
                let deadline = Instant::now() + WAIT;
                while !g.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                // SAFETY: srv is live during its callbacks.
                assert_eq!(unsafe { tf_server_drain(srv) }, TF_OK);
                d.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
            0
        })),
        on_message: Some(Box::new(|srv, conn, data| {
            // SAFETY: srv is live during its callbacks.
            unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
        })),
        ..Hooks::default()
    };
    let s = HookServer::start(Opts::default(), hooks);
    let mut first_conn = s.connect();
    wait_flag(&started, "on_connect of the first connection");
    let mut queued: Vec<TcpStream> = (0..2).map(|_| s.connect()).collect();
    go.store(true, Ordering::SeqCst);
    wait_flag(&drained, "the drain call to return");
    assert!(refused_now(s.addr), "a connection attempt after tf_server_drain returned was accepted");
    for (i, q) in queued.iter_mut().enumerate() {
        let p = format!("queued {i}");
        write_frame(q, p.as_bytes());
        assert_eq!(read_frame(q).as_deref(), Some(p.as_bytes()), "a queued connection was not served");
    }
    write_frame(&mut first_conn, b"first");
    assert_eq!(read_frame(&mut first_conn).as_deref(), Some(&b"first"[..]));
    assert_eq!(s.rec().connects().len(), 3);
}

/// A host thread drains while connections wait in the accept queue, and
/// on_connect drains too: every queued connection is served, none is left
/// accepted but never announced.
#[test]
fn drains_from_a_host_thread_and_from_on_connect_serve_the_whole_queue() {
    let armed = Arc::new(AtomicBool::new(false));
    let a = armed.clone();
    let hooks = Hooks {
        on_connect: Some(Box::new(move |srv, _| {
            if a.load(Ordering::SeqCst) {
                // SAFETY: srv is live during its callbacks.
                unsafe { tf_server_drain(srv) };
            }
            0
        })),
        on_message: Some(Box::new(|srv, conn, data| {
            if data == b"busy" {
                std::thread::sleep(Duration::from_millis(300));
            }
            // SAFETY: as above.
            unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
        })),
        ..Hooks::default()
    };
    let s = HookServer::start(Opts { threads: Some(1), ..Opts::default() }, hooks);
    let (mut first, _) = s.connect_id();
    armed.store(true, Ordering::SeqCst);
    write_frame(&mut first, b"busy");
    s.rec().wait_for("the busy frame", |e| e.iter().any(|e| matches!(e, Ev::Message(..))));
    // The loop sleeps: these handshakes complete in the kernel's queue
    // (connect() returns at the SYN-ACK; the server side joins the queue
    // when the last ACK is processed: a moment is left for that).
    let mut queued: Vec<TcpStream> = (0..6).map(|_| s.connect()).collect();
    std::thread::sleep(Duration::from_millis(50));
    let srv = s.srv as usize;
    // SAFETY: the server outlives the thread (joined below).
    let drainer = std::thread::spawn(move || unsafe { tf_server_drain(srv as *mut tf_server) });
    assert_eq!(drainer.join().unwrap(), TF_OK);
    assert_eq!(read_frame(&mut first).as_deref(), Some(&b"busy"[..]));
    for (i, q) in queued.iter_mut().enumerate() {
        let p = format!("queued {i}");
        write_frame(q, p.as_bytes());
        assert_eq!(read_frame(q).as_deref(), Some(p.as_bytes()), "queued connection {i} was not served");
    }
    assert!(refused_now(s.addr));
}

/// Two servers drain each other from their callbacks at the same time, and
/// a third is freed from a callback of one while it drains the other: a
/// drain inside a callback never waits, so nothing deadlocks.
#[test]
fn servers_draining_or_freeing_each_other_from_callbacks_all_return() {
    use std::sync::atomic::AtomicPtr;
    #[derive(Default)]
    struct Two {
        srv: [AtomicPtr<tf_server>; 2],
        entered: [AtomicBool; 2],
        returned: [AtomicBool; 2],
    }
    for free_one in [false, true] {
        let t = Arc::new(Two::default());
        let hooks_for = |me: usize| {
            let t = t.clone();
            Hooks {
                on_message: Some(Box::new(move |_, _, _| {
                    let other = 1 - me;
                    t.entered[me].store(true, Ordering::SeqCst);
                    let deadline = Instant::now() + WAIT;
                    while !t.entered[other].load(Ordering::SeqCst) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let target = t.srv[other].load(Ordering::SeqCst);
                    if free_one && me == 0 {
                        // SAFETY: server 1 is live and freed once, here.
                        unsafe { tf_server_free(target) };
                    } else {
                        // SAFETY: the other server is live (freed, if at all,
                        // only by this test after both callbacks returned).
                        unsafe { tf_server_drain(target) };
                    }
                    t.returned[me].store(true, Ordering::SeqCst);
                })),
                ..Hooks::default()
            }
        };
        let mut servers = [
            HookServer::start(Opts::default(), hooks_for(0)),
            HookServer::start(Opts::default(), hooks_for(1)),
        ];
        for (i, s) in servers.iter_mut().enumerate() {
            t.srv[i].store(s.srv, Ordering::SeqCst);
        }
        if free_one {
            servers[1].disown();
            std::mem::forget(servers[1].hooks.clone());
        }
        let mut peers: Vec<TcpStream> = servers.iter().map(|s| s.connect()).collect();
        for p in &mut peers {
            write_frame(p, b"go");
        }
        wait_flag(&t.returned[0], "server 0's call to return");
        wait_flag(&t.returned[1], "server 1's call to return");
        assert!(refused_within(servers[0].addr, WAIT), "server 0 still listens");
    }
}

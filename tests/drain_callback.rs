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

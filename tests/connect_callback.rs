//! tf_connect from inside a callback: the new id takes sends (every send
//! call), close, abort and pause at once, like one made on a host thread,
//! and frames keep their order with what on_connect sends once connected.
mod common;
use common::*;
use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn echo_hooks() -> Hooks {
    Hooks {
        on_message: Some(Box::new(|srv, conn, data| {
            // SAFETY: srv is live during its callbacks.
            unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) };
        })),
        ..Hooks::default()
    }
}

fn abstract_addr(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("unix:@tf-cc-{}-{tag}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// What the dialing server saw.
#[derive(Default)]
struct Dial {
    target: Mutex<String>,
    id: AtomicU64,
    codes: Mutex<Vec<i32>>,
    back: Mutex<Vec<Vec<u8>>>,
    /// The call to make right after tf_connect: "send", "close", "abort", "pause".
    then: Mutex<&'static str>,
}

fn dialer(d: &Arc<Dial>) -> HookServer {
    let (d1, d2) = (d.clone(), d.clone());
    let hooks = Hooks {
        on_connect: Some(Box::new(move |srv, conn| {
            if conn == d1.id.load(Ordering::SeqCst) {
                // SAFETY: srv is live during its callbacks.
                d1.codes.lock().unwrap().push(unsafe { tf_send(srv, conn, b"fifth".as_ptr(), 5) });
            }
            0
        })),
        on_message: Some(Box::new(move |srv, conn, data| {
            if data != b"dial" {
                if conn == d2.id.load(Ordering::SeqCst) {
                    d2.back.lock().unwrap().push(data.to_vec());
                }
                return;
            }
            let addr = CString::new(d2.target.lock().unwrap().as_str()).unwrap();
            let mut id = 0u64;
            // SAFETY: srv is live during its callbacks; the arguments are valid.
            unsafe {
                assert_eq!(tf_connect(srv, addr.as_ptr(), &mut id), TF_OK);
                d2.id.store(id, Ordering::SeqCst);
                let mut codes = d2.codes.lock().unwrap();
                match *d2.then.lock().unwrap() {
                    "send" => {
                        codes.push(tf_send(srv, id, b"first".as_ptr(), 5));
                        let iov = [
                            tf_iovec { base: b"sec".as_ptr(), len: 3 },
                            tf_iovec { base: b"ond".as_ptr(), len: 3 },
                        ];
                        codes.push(tf_sendv(srv, id, iov.as_ptr(), 2));
                        let mut queued = 0usize;
                        codes.push(tf_send_many(srv, &id, 1, b"third".as_ptr(), 5, &mut queued));
                        codes.push(queued as i32);
                        let mut out = [tf_out { conn: id, data: b"fourth".as_ptr(), len: 6, result: -1 }];
                        codes.push(tf_send_batch(srv, out.as_mut_ptr(), 1));
                        codes.push(out[0].result);
                    }
                    "close" => codes.push(tf_conn_close(srv, id)),
                    "abort" => codes.push(tf_conn_abort(srv, id)),
                    "pause" => codes.push(tf_conn_pause(srv, id)),
                    other => panic!("{other}"),
                }
            }
        })),
        ..Hooks::default()
    };
    // One loop thread: the new connection lives on the calling loop (the
    // case of its lock-free path), and nothing of it can happen before the
    // callback that made it returns. With several, its whole life may run
    // on another loop before tf_connect even returns.
    HookServer::start(Opts { threads: Some(1), ..Opts::default() }, hooks)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends, sendv, send_many and send_batch right after tf_connect in
/// on_message, then a send from on_connect: all accepted, echoed in order.
/// TCP (the connect completes later) and an abstract Unix socket (it
/// completes at once, on_connect in the same pass).
#[test]
fn every_send_call_takes_an_id_just_made_in_a_callback_in_order() {
    for target in ["tcp", "unix"] {
        let unix = abstract_addr("echo");
        let echo = if target == "tcp" {
            HookServer::start(Opts::default(), echo_hooks())
        } else {
            HookServer::start_any(Opts { addr: unix.clone(), ..Opts::default() }, echo_hooks(), |_| {})
        };
        let d = Arc::new(Dial::default());
        *d.target.lock().unwrap() = if target == "tcp" { format!("127.0.0.1:{}", echo.port) } else { unix };
        *d.then.lock().unwrap() = "send";
        let a = dialer(&d);
        let mut c = a.connect();
        write_frame(&mut c, b"dial");
        wait_until("five frames echoed back", || d.back.lock().unwrap().len() == 5);
        let want: Vec<&[u8]> = vec![b"first", b"second", b"third", b"fourth", b"fifth"];
        assert_eq!(*d.back.lock().unwrap(), want, "{target}");
        assert_eq!(*d.codes.lock().unwrap(), vec![TF_OK, TF_OK, TF_OK, 1, TF_OK, TF_OK, TF_OK], "{target}");
    }
}

/// Close, abort and pause right after tf_connect in a callback: accepted;
/// a closed or aborted one is abandoned (on_close LOCAL, no on_connect).
#[test]
fn close_abort_and_pause_take_an_id_just_made_in_a_callback() {
    let echo = HookServer::start(Opts::default(), echo_hooks());
    for then in ["close", "abort", "pause"] {
        let d = Arc::new(Dial::default());
        *d.target.lock().unwrap() = format!("127.0.0.1:{}", echo.port);
        *d.then.lock().unwrap() = then;
        let a = dialer(&d);
        let mut c = a.connect();
        write_frame(&mut c, b"dial");
        wait_until("the call after tf_connect", || !d.codes.lock().unwrap().is_empty());
        assert_eq!(d.codes.lock().unwrap()[0], TF_OK, "{then} right after tf_connect");
        let id = d.id.load(Ordering::SeqCst);
        if then != "pause" {
            assert_eq!(a.rec().wait_close(id), TF_CLOSE_LOCAL, "{then}");
            assert!(!a.rec().connects().contains(&id), "{then}: an abandoned connect was announced");
        }
    }
}

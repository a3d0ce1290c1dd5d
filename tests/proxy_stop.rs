//! A PROXY header that completes after stop began (or after the server was
//! freed from its own callback) names no one: no on_connect, no on_message.
mod common;
use common::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const HEADER: &[u8] = b"PROXY TCP4 203.0.113.7 198.51.100.1 41000 5882\r\n";

/// X's callback runs 300 ms; Y's header completed in the same wake-up, and a
/// host thread begins stop meanwhile: Y must never be announced.
#[test]
fn a_header_completing_while_stop_begins_gets_no_on_connect() {
    let stopping = Arc::new(AtomicBool::new(false));
    let in_callback = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicUsize::new(0));
    let (s1, s2, l1, l2, ic) =
        (stopping.clone(), stopping.clone(), late.clone(), late.clone(), in_callback.clone());
    let hooks = Hooks {
        on_connect: Some(Box::new(move |_, _| {
            if s1.load(Ordering::SeqCst) {
                l1.fetch_add(1, Ordering::SeqCst);
            }
            0
        })),
        on_message: Some(Box::new(move |_, _, data| {
            if s2.load(Ordering::SeqCst) {
                l2.fetch_add(1, Ordering::SeqCst);
            }
            if data == b"busy" {
                // Holds the loop while the test readies X and Y together.
                std::thread::sleep(Duration::from_millis(300));
            }
            if data == b"slow" {
                ic.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(300));
            }
        })),
        ..Hooks::default()
    };
    let s = HookServer::start_with(Opts { threads: Some(1), ..Opts::default() }, hooks, |cfg| {
        // SAFETY: cfg is live.
        assert_eq!(unsafe { tf_config_set_proxy_protocol(cfg, TF_PROXY_V1) }, TF_OK);
    });
    let mut x = s.connect();
    x.write_all(HEADER).unwrap();
    s.rec().wait_connect(1);
    let mut y = s.connect();
    y.write_all(&HEADER[..HEADER.len() - 2]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Both ready in one wake-up (the loop is busy with X's first frame
    // meanwhile): X's slow frame first, then the end of Y's header.
    write_frame(&mut x, b"busy");
    std::thread::sleep(Duration::from_millis(100));
    write_frame(&mut x, b"slow");
    y.write_all(b"\r\n").unwrap();
    wait_flag(&in_callback, "X's slow callback");
    stopping.store(true, Ordering::SeqCst);
    // SAFETY: s.srv is live.
    assert_eq!(unsafe { tf_server_stop(s.srv, 500) }, TF_OK);
    assert_eq!(late.load(Ordering::SeqCst), 0, "a callback after tf_server_stop began");
    assert_eq!(s.rec().connects().len(), 1, "Y was announced after stop began");
}

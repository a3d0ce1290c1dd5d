//! A panic inside the library never crashes the host: at the boundary it
//! becomes TF_ERR_INTERNAL, in the loop it closes the one connection
//! concerned. Needs `--features fault-injection`, which compiles a trigger:
//! the payload PANIC_PAYLOAD makes the library panic on purpose.
#![cfg(feature = "fault-injection")]
mod common;
use common::*;
use tcpframe::shared::PANIC_PAYLOAD;

#[test]
fn a_panic_inside_tf_send_returns_internal_with_a_message() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    assert_eq!(srv.send(id, PANIC_PAYLOAD), TF_ERR_INTERNAL);
    assert!(last_error().contains("internal error"), "{}", last_error());
    assert_eq!(srv.send(id, b"after the panic"), TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"after the panic");
}

#[test]
fn a_panic_in_the_loop_closes_that_connection_and_the_loop_goes_on() {
    let srv = TestServer::start(Opts::default());
    let (mut good, _) = srv.connect_id();
    let (mut bad, bad_id) = srv.connect_id();
    write_frame(&mut bad, PANIC_PAYLOAD);
    assert_eq!(srv.rec.wait_close(bad_id), TF_CLOSE_IO);
    assert!(wait_eof(&mut bad));
    write_frame(&mut good, b"unaffected");
    assert_eq!(read_frame(&mut good).unwrap(), b"unaffected");
    let (mut later, _) = srv.connect_id();
    write_frame(&mut later, b"new connections too");
    assert_eq!(read_frame(&mut later).unwrap(), b"new connections too");
}

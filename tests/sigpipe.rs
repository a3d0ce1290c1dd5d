//! A host that keeps SIGPIPE's default action (terminate) survives peers
//! that reset while the library writes to them. Own test binary: it changes
//! the process-wide signal disposition.
mod common;
use common::*;
use std::time::Duration;

#[test]
fn writing_to_reset_peers_never_raises_sigpipe_in_the_host() {
    // SAFETY: restores the default action; a SIGPIPE would kill this process.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    for _ in 0..10 {
        let (s, id) = srv.connect_id();
        assert_eq!(srv.send(id, &vec![1u8; 4 << 20]), TF_OK);
        std::thread::sleep(Duration::from_millis(5));
        reset(s);
        // Keep queueing while the library discovers the reset.
        for _ in 0..20 {
            let _ = srv.send(id, &[2u8; 65536]);
        }
        let reason = srv.rec.wait_close(id);
        assert!(reason == TF_CLOSE_PEER || reason == TF_CLOSE_IO, "{reason}");
    }
    // Still alive, still serving.
    let (mut s, id) = srv.connect_id();
    assert_eq!(srv.send(id, b"alive"), TF_OK);
    assert_eq!(read_frame(&mut s).unwrap(), b"alive");
}

//! Bad peers and careless hosts: the server and every other connection go on.
mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn hostile_lengths_close_only_the_offender_without_reading_the_payload() {
    let srv = TestServer::start(Opts { max_frame: Some(64 * 1024), ..Opts::default() });
    let (mut good, _) = srv.connect_id();
    let cases: Vec<Vec<u8>> = vec![
        (64 * 1024 + 1u32).to_le_bytes().to_vec(),
        0xFFFF_FFFFu32.to_le_bytes().to_vec(),
        0x8000_0000u32.to_le_bytes().to_vec(),
    ];
    for wire in cases {
        let (mut bad, id) = srv.connect_id();
        bad.write_all(&wire).unwrap();
        assert_eq!(srv.rec.wait_close(id), TF_CLOSE_TOO_LARGE);
        assert!(wait_eof(&mut bad));
    }
    // A prefix split across reads, announced after a valid frame.
    let (mut bad, id) = srv.connect_id();
    let mut wire = frame(b"valid first");
    wire.extend_from_slice(&[0xFF, 0xFF]);
    bad.write_all(&wire).unwrap();
    assert_eq!(read_frame(&mut bad).unwrap(), b"valid first");
    std::thread::sleep(Duration::from_millis(30));
    bad.write_all(&[0xFF, 0x7F]).unwrap();
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_TOO_LARGE);
    assert_eq!(srv.stats().closed_too_large, 4);
    write_frame(&mut good, b"unaffected");
    assert_eq!(read_frame(&mut good).unwrap(), b"unaffected");
}

#[test]
fn hundreds_of_garbage_connections_never_disturb_a_well_behaved_client() {
    let srv = TestServer::start(Opts { max_frame: Some(1 << 16), record: false, ..Opts::default() });
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (srv, stop) = (&srv, &stop);
            scope.spawn(move || {
                let mut rng = Rng(0x1234_5678 + t);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 100 {
                    n += 1;
                    let Ok(mut s) = TcpStream::connect(srv.addr) else { continue };
                    for _ in 0..rng.below(5) {
                        let len = rng.below(70_000) as usize;
                        let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                        if s.write_all(&junk).is_err() {
                            break;
                        }
                    }
                    if rng.below(2) == 0 {
                        reset(s);
                    }
                }
            });
        }
        let mut good = srv.connect();
        let start = Instant::now();
        let mut i = 0u32;
        while start.elapsed() < Duration::from_secs(2) {
            let p = pattern((i as usize * 131) % 5000, i as u8);
            write_frame(&mut good, &p);
            assert_eq!(read_frame(&mut good).unwrap(), p);
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
        assert!(i > 100, "only {i} round trips");
    });
    // The server still accepts and serves.
    let mut after = srv.connect();
    write_frame(&mut after, b"still up");
    assert_eq!(read_frame(&mut after).unwrap(), b"still up");
}

#[test]
fn a_slow_loris_dribbling_forever_is_closed_by_the_idle_timeout() {
    let srv = TestServer::start(Opts { idle_ms: Some(200), ..Opts::default() });
    let (mut loris, id) = srv.connect_id();
    loris.write_all(&1_000_000u32.to_le_bytes()).unwrap();
    let start = Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(5) {
        if loris.write_all(b"z").is_err() || !srv.rec.closes_of(id).is_empty() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(closed);
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_IDLE);
}

#[test]
fn sends_and_closes_racing_a_peer_close_from_many_threads_only_return_codes() {
    let srv = TestServer::start(Opts { echo: false, record: false, ..Opts::default() });
    for round in 0..20 {
        let (s, id) = srv.connect_id();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let srv = &srv;
                scope.spawn(move || {
                    for i in 0..200 {
                        let rc =
                            if (i + t) % 50 == 49 { srv.close(id) } else { srv.send(id, &[t as u8; 100]) };
                        assert!(matches!(rc, TF_OK | TF_ERR_NO_CONN | TF_ERR_FULL), "round {round}: {rc}");
                    }
                });
            }
            if round % 2 == 0 {
                reset(s);
            } else {
                drop(s);
            }
        });
        srv.rec.wait_for("close", |_| srv.rec.closes.load(Ordering::SeqCst) > round as u64);
    }
    srv.wait_stats("all closed", |st| st.connections_active == 0);
    assert_eq!(srv.rec.closes.load(Ordering::SeqCst), 20, "exactly one on_close each");
}

#[test]
fn a_peer_that_resets_while_megabytes_are_written_closes_as_peer_or_io() {
    let srv = TestServer::start(Opts { echo: false, ..Opts::default() });
    let (s, id) = srv.connect_id();
    let big = vec![3u8; 4 << 20];
    assert_eq!(srv.send(id, &big), TF_OK);
    assert_eq!(srv.send(id, &big), TF_OK);
    std::thread::sleep(Duration::from_millis(20));
    reset(s);
    let reason = srv.rec.wait_close(id);
    assert!(reason == TF_CLOSE_PEER || reason == TF_CLOSE_IO, "{reason}");
    let (mut other, other_id) = srv.connect_id();
    assert_eq!(srv.send(other_id, b"fine"), TF_OK);
    assert_eq!(read_frame(&mut other).unwrap(), b"fine", "other connections are still served");
}

//! Many connections at once: a flood past max connections, and a stop under
//! load. Own test binary: these use thousands of descriptors.
mod common;
use common::*;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a live rlimit struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(lim.rlim_cur >= 8192, "this test needs 8192 descriptors, the hard limit is {}", lim.rlim_max);
}

#[test]
fn five_thousand_connects_against_a_limit_of_one_thousand() {
    raise_nofile();
    let srv = TestServer::start(Opts { max_connections: Some(1000), record: false, ..Opts::default() });
    let mut clients: Vec<TcpStream> = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let s = TcpStream::connect_timeout(&srv.addr, WAIT).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        clients.push(s);
    }
    let st = srv.wait_stats("every connection decided", |st| {
        st.connections_accepted + st.connections_rejected == 5000
    });
    assert_eq!(st.connections_accepted, 1000);
    assert_eq!(st.connections_rejected, 4000);
    assert_eq!(st.connections_active, 1000);
    // Exactly the accepted ones work; the rejected ones see end of stream.
    let (mut served, mut closed) = (0, 0);
    for s in clients.iter_mut() {
        s.set_nonblocking(false).unwrap();
        if std::io::Write::write_all(s, &frame(b"ping")).is_err() {
            closed += 1;
            continue;
        }
        match read_frame(s) {
            Some(p) => {
                assert_eq!(p, b"ping");
                served += 1
            }
            None => closed += 1,
        }
    }
    assert_eq!((served, closed), (1000, 4000));
}

#[test]
fn stop_under_load_returns_within_the_drain_time_with_every_close_once() {
    raise_nofile();
    let mut srv = TestServer::start(Opts { echo: false, record: true, ..Opts::default() });
    let clients: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(srv.addr).unwrap()).collect();
    let ids = srv.rec.wait_connect(1000);
    // Queue more than the peers will read: they never read at all.
    let chunk = vec![7u8; 256 * 1024];
    for &id in &ids {
        for _ in 0..4 {
            assert_eq!(srv.send(id, &chunk), TF_OK);
        }
    }
    let t = Instant::now();
    assert_eq!(srv.stop(200), TF_OK);
    let took = t.elapsed();
    assert!(took < Duration::from_millis(200) + Duration::from_secs(2), "stop took {took:?}");
    assert_eq!(srv.rec.closes.load(Ordering::SeqCst), 1000);
    for &id in &ids {
        assert_eq!(srv.rec.closes_of(id), vec![TF_CLOSE_SHUTDOWN]);
    }
    assert_eq!(srv.stats().connections_active, 0);
    drop(clients);
}

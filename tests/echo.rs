//! Framing over real sockets: whatever the split, the frames sent come back whole and in order.
mod common;
use common::*;
use std::io::Write;
use std::time::Duration;

#[test]
fn echoes_frames_from_zero_bytes_to_several_mebibytes() {
    let srv = TestServer::start(Opts { record: false, ..Opts::default() });
    let mut s = srv.connect();
    for (i, len) in
        [0usize, 1, 3, 4, 5, 100, 4096, 65_535, 65_536, 65_537, 1 << 20, 5 << 20].iter().enumerate()
    {
        let p = pattern(*len, i as u8);
        write_frame(&mut s, &p);
        assert_eq!(read_frame(&mut s).expect("reply"), p, "payload of {len} bytes");
    }
}

#[test]
fn a_frame_of_exactly_max_frame_is_accepted_and_one_more_byte_is_not() {
    let srv = TestServer::start(Opts { max_frame: Some(1000), record: false, ..Opts::default() });
    let (mut s, id) = srv.connect_id();
    write_frame(&mut s, &[7u8; 1000]);
    assert_eq!(read_frame(&mut s).unwrap().len(), 1000);
    assert_eq!(srv.send(id, &[0u8; 1001]), TF_ERR_TOO_LARGE);
    assert!(!last_error().is_empty());
}

#[test]
fn two_thousand_frames_in_one_write_come_back_in_order() {
    let srv = TestServer::start(Opts { record: false, ..Opts::default() });
    let mut s = srv.connect();
    let mut all = Vec::new();
    for i in 0..2000u32 {
        all.extend_from_slice(&frame(&i.to_le_bytes()));
    }
    s.write_all(&all).unwrap();
    for i in 0..2000u32 {
        assert_eq!(read_frame(&mut s).unwrap(), i.to_le_bytes());
    }
    let st = srv.wait_stats("frames counted", |st| st.frames_sent == 2000);
    assert_eq!(st.frames_received, 2000);
    assert_eq!(st.bytes_received, 2000 * 8);
    assert_eq!(st.bytes_sent, 2000 * 8);
}

#[test]
fn a_frame_dribbled_one_byte_at_a_time_arrives_whole_once() {
    let srv = TestServer::start(Opts::default());
    let (mut s, id) = srv.connect_id();
    let wire = frame(b"dribbled slowly");
    for b in &wire {
        s.write_all(&[*b]).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_frame(&mut s).unwrap(), b"dribbled slowly");
    let msgs: Vec<_> = srv.rec.snapshot().into_iter().filter(|e| matches!(e, Ev::Message(..))).collect();
    assert_eq!(msgs, vec![Ev::Message(id, b"dribbled slowly".to_vec())]);
}

#[test]
fn zero_length_frames_are_delivered_and_echoed() {
    let srv = TestServer::start(Opts::default());
    let (mut s, id) = srv.connect_id();
    s.write_all(&[0u8; 12]).unwrap();
    for _ in 0..3 {
        assert_eq!(read_frame(&mut s).unwrap(), b"");
    }
    srv.rec.wait_for("three messages", |e| e.iter().filter(|e| **e == Ev::Message(id, vec![])).count() == 3);
}

#[test]
fn two_hundred_parallel_clients_each_get_their_own_echoes() {
    let srv = TestServer::start(Opts { record: false, ..Opts::default() });
    std::thread::scope(|scope| {
        for t in 0..200u32 {
            let srv = &srv;
            scope.spawn(move || {
                let mut s = srv.connect();
                for i in 0..20u32 {
                    let p = pattern(16 + (t as usize * 7 + i as usize) % 3000, t as u8);
                    write_frame(&mut s, &p);
                    assert_eq!(read_frame(&mut s).unwrap(), p);
                }
            });
        }
    });
    let st = srv.wait_stats("all frames", |st| st.frames_sent == 4000);
    assert_eq!(st.connections_accepted, 200);
    assert_eq!(st.frames_received, 4000);
}

#[test]
fn ipv6_loopback_echoes_and_reports_a_bracketed_peer() {
    let srv = TestServer::start(Opts { addr: "[::1]:0".into(), ..Opts::default() });
    let mut s = srv.connect();
    write_frame(&mut s, b"six");
    assert_eq!(read_frame(&mut s).unwrap(), b"six");
    let peers: Vec<String> = srv
        .rec
        .snapshot()
        .into_iter()
        .filter_map(|e| if let Ev::Connect(_, p) = e { Some(p) } else { None })
        .collect();
    assert!(peers[0].starts_with("[::1]:"), "{peers:?}");
}

#[test]
fn replies_reach_a_client_that_half_closed_after_sending() {
    let srv = TestServer::start(Opts::default());
    let (mut s, id) = srv.connect_id();
    let mut all = Vec::new();
    for i in 0..50u8 {
        all.extend(frame(&[i; 100]));
    }
    s.write_all(&all).unwrap();
    half_close(&s);
    for i in 0..50u8 {
        assert_eq!(read_frame(&mut s).unwrap(), vec![i; 100]);
    }
    assert!(wait_eof(&mut s));
    assert_eq!(srv.rec.wait_close(id), TF_CLOSE_PEER);
}

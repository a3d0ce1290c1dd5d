//! With several loop threads, stop marks the loops one after another: a
//! tf_send_batch / tf_send_many spanning loops can meet it half-way. The
//! call is TF_ERR_STOPPED only when it queued nothing; otherwise it is
//! TF_OK and its results (or `*queued`) say which entries took the frame.
mod common;
use common::*;
use std::net::TcpStream;
use std::time::Duration;

const PEERS: usize = 3;

/// What one call reported: its tag, its code, and how many entries took it
/// (per the results or `*queued`).
struct Call {
    tag: u64,
    code: i32,
    took: usize,
}

/// Sends tagged frames to every peer (one entry per peer, on every loop)
/// until stop refuses a whole call; returns every call's report.
fn send_until_stopped(srv: usize, ids: [u64; PEERS], many: bool) -> Vec<Call> {
    let srv = srv as *mut tf_server;
    let mut calls = Vec::new();
    for tag in 1u64.. {
        let data = tag.to_le_bytes();
        let (code, took) = if many {
            let mut queued = usize::MAX;
            // SAFETY: srv is live until the test frees it after this thread ends.
            let rc = unsafe { tf_send_many(srv, ids.as_ptr(), PEERS, data.as_ptr(), 8, &mut queued) };
            (rc, if rc == TF_OK { queued } else { 0 })
        } else {
            let mut outs: Vec<tf_out> =
                ids.iter().map(|&conn| tf_out { conn, data: data.as_ptr(), len: 8, result: -1 }).collect();
            // SAFETY: as above; outs holds PEERS entries.
            let rc = unsafe { tf_send_batch(srv, outs.as_mut_ptr(), PEERS) };
            (rc, outs.iter().filter(|o| rc == TF_OK && o.result == TF_OK).count())
        };
        calls.push(Call { tag, code, took });
        if code != TF_OK {
            return calls;
        }
    }
    unreachable!()
}

fn one_round(many: bool, backend: i32) {
    let mut srv = TestServer::start(Opts {
        threads: Some(PEERS as u32),
        echo: false,
        record: false,
        max_queued: Some(1 << 32),
        backend,
        ..Opts::default()
    });
    let mut peers: Vec<(TcpStream, u64)> = (0..PEERS).map(|_| srv.connect_id()).collect();
    peers.sort_by_key(|p| p.1);
    let ids: [u64; PEERS] = std::array::from_fn(|i| peers[i].1);
    // Each peer reads every tag until the server closes it.
    let readers: Vec<_> = peers
        .into_iter()
        .map(|(mut s, _)| {
            std::thread::spawn(move || {
                let mut tags = Vec::new();
                while let Some(f) = read_frame(&mut s) {
                    tags.push(u64::from_le_bytes(f[..8].try_into().unwrap()));
                }
                tags
            })
        })
        .collect();
    let ptr = srv.srv as usize;
    let sender = std::thread::spawn(move || send_until_stopped(ptr, ids, many));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(srv.stop(5000), TF_OK);
    let calls = sender.join().unwrap();
    let received: Vec<Vec<u64>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let last = calls.last().unwrap();
    assert_eq!(last.code, TF_ERR_STOPPED);
    let got = |tag: u64| received.iter().filter(|tags| tags.contains(&tag)).count();
    assert_eq!(got(last.tag), 0, "call {} returned STOPPED but its frame was written", last.tag);
    for c in &calls[..calls.len() - 1] {
        assert_eq!(
            got(c.tag),
            c.took,
            "call {}: {} entries took it, {} peers got it",
            c.tag,
            c.took,
            got(c.tag)
        );
    }
}

#[test]
fn a_batch_meeting_stop_half_way_is_stopped_only_when_nothing_was_queued() {
    for round in 0..10 {
        one_round(false, 1 + round % 2);
    }
}

#[test]
fn a_fan_out_meeting_stop_half_way_counts_what_it_queued() {
    for round in 0..10 {
        one_round(true, 1 + round % 2);
    }
}

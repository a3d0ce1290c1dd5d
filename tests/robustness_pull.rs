//! Robustness rules for pull mode with a slow or busy host (API.md,
//! "Robustness: rules and additions from an adversarial review"): waiting on
//! the host is never idleness, accepting resumes as soon as the host drains,
//! tf_server_poll(timeout 0) never waits, and the queue stays within its
//! bound plus one read. Other robustness rules: robustness.rs and
//! robustness_host.rs.
mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Largest event count one tf_server_poll may see: the queue's 4096 events
/// plus one 64 KiB read of empty (4-byte) frames.
const PULL_BOUND: usize = 4096 + 64 * 1024 / 4;

struct Pull {
    srv: *mut tf_server,
    port: u16,
}

// SAFETY: the server handle may be used from any thread (the C contract).
unsafe impl Send for Pull {}
unsafe impl Sync for Pull {}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    connects: usize,
    messages: usize,
    closes: usize,
    close_reason: Option<i32>,
}

impl Pull {
    fn start(o: Opts) -> Pull {
        let cfg = config(&o);
        let mut srv = std::ptr::null_mut();
        // SAFETY: cfg and srv are live.
        assert_eq!(unsafe { tf_server_start_pull(cfg, &mut srv) }, TF_OK, "{}", last_error());
        // SAFETY: from tf_config_new.
        unsafe { tf_config_free(cfg) };
        // SAFETY: srv is live.
        let port = unsafe { tf_server_port(srv) };
        Pull { srv, port }
    }

    /// One tf_server_poll; returns its code and what kinds of events came.
    fn poll(&self, max: usize, timeout_ms: i32) -> (i32, usize, Counts) {
        let empty = tf_event { kind: 0, reason: 0, conn: 0, data: std::ptr::null(), len: 0 };
        let mut evs = vec![empty; max];
        let mut n = 0usize;
        // SAFETY: evs has room for max events.
        let rc = unsafe { tf_server_poll(self.srv, evs.as_mut_ptr(), max, &mut n, timeout_ms) };
        let mut c = Counts::default();
        for e in &evs[..n] {
            match e.kind {
                TF_EVENT_CONNECT => c.connects += 1,
                TF_EVENT_MESSAGE => c.messages += 1,
                TF_EVENT_CLOSE => {
                    c.closes += 1;
                    c.close_reason.get_or_insert(e.reason);
                }
                k => panic!("unexpected event kind {k}"),
            }
        }
        (rc, n, c)
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        // SAFETY: from tf_server_start_pull, freed once.
        unsafe { tf_server_free(self.srv) };
    }
}

fn empty_frames(n: usize) -> Vec<u8> {
    vec![0u8; 4 * n]
}

#[test]
fn pull_mode_a_slow_host_is_not_idleness_and_nothing_is_lost() {
    // repro_pull_idle.c: 20,000 frames sent at once, idle timeout 500 ms,
    // the host busy for 2 s before it polls.
    let p = Pull::start(Opts { idle_ms: Some(500), ..Opts::default() });
    let mut s = p.connect();
    let wire: Vec<u8> = (0..20_000u32).flat_map(|i| frame(&[i as u8; 10])).collect();
    std::thread::scope(|scope| {
        // The writer hands its stream back: the peer stays connected.
        let writer = scope.spawn(move || {
            s.write_all(&wire).expect("the peer's frames are read");
            s
        });
        std::thread::sleep(Duration::from_secs(2));
        let deadline = Instant::now() + WAIT;
        let mut total = Counts::default();
        while total.messages < 20_000 {
            assert!(Instant::now() < deadline, "only {} of 20000 frames", total.messages);
            let (rc, _, c) = p.poll(1024, 100);
            assert_eq!(rc, TF_OK);
            assert_eq!(c.closes, 0, "closed (reason {:?}) after {} frames", c.close_reason, total.messages);
            total.messages += c.messages;
        }
        assert_eq!(total.messages, 20_000);
        let _peer = writer.join().unwrap();
    });
}

#[test]
fn pull_mode_a_client_arriving_while_the_queue_is_full_is_accepted_after_the_drain() {
    // repro_pull_accept.c / pullstall.c
    let p = Pull::start(Opts::default());
    let mut a = p.connect();
    // 4,096 empty frames: with A's CONNECT the queue reaches its bound, and
    // A has nothing more to send (no connection is paused).
    a.write_all(&empty_frames(4096)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut b = p.connect(); // arrives while the queue is full

    // Longer than the loop's quiet-time housekeeping (1 s): nothing but the
    // drain itself can wake the loop afterwards.
    std::thread::sleep(Duration::from_millis(1500));
    let drained = Instant::now();
    let mut total = Counts::default();
    loop {
        let (rc, n, c) = p.poll(100_000, 0);
        assert_eq!(rc, TF_OK);
        total.connects += c.connects;
        total.messages += c.messages;
        if n == 0 {
            break;
        }
    }
    write_frame(&mut b, b"hello");
    while total.connects < 2 || total.messages < 4097 {
        assert!(
            drained.elapsed() < Duration::from_secs(3),
            "3 s after the drain: {} CONNECT, {} MESSAGE (want 2 and 4097)",
            total.connects,
            total.messages
        );
        let (rc, _, c) = p.poll(100_000, 100);
        assert_eq!(rc, TF_OK);
        total.connects += c.connects;
        total.messages += c.messages;
    }
}

#[test]
fn pull_poll_with_timeout_zero_never_waits_behind_a_blocked_poll() {
    let p = Pull::start(Opts::default());
    std::thread::scope(|scope| {
        let blocked = scope.spawn(|| {
            let t = Instant::now();
            let (rc, n, _) = p.poll(4, 1500);
            (rc, n, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let (rc, n, _) = p.poll(64, 0);
        let took = t.elapsed();
        assert_eq!((rc, n), (TF_OK, 0));
        assert!(took < Duration::from_millis(100), "poll(timeout 0) took {took:?}");
        let (rc, n, waited) = blocked.join().unwrap();
        assert_eq!((rc, n), (TF_OK, 0));
        assert!(waited >= Duration::from_millis(1400), "the other poll waited only {waited:?}");
    });
}

#[test]
fn pull_queue_never_holds_more_than_its_bound_plus_one_read() {
    // pull_overshoot2.py: two peers stream empty frames while the host takes
    // events only now and then; each poll may see at most the bound.
    let p = Pull::start(Opts::default());
    let per_peer = 100_000;
    std::thread::scope(|scope| {
        // Each writer hands its stream back: the peers stay connected.
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let mut s = p.connect();
                scope.spawn(move || {
                    s.write_all(&empty_frames(per_peer)).expect("the frames are read");
                    s
                })
            })
            .collect();
        let deadline = Instant::now() + WAIT;
        let mut total = Counts::default();
        let mut largest = 0;
        while total.messages < 2 * per_peer {
            assert!(Instant::now() < deadline, "only {} of {} frames", total.messages, 2 * per_peer);
            std::thread::sleep(Duration::from_millis(100)); // the loop fills the queue meanwhile
            let (rc, n, c) = p.poll(100_000, 0);
            assert_eq!(rc, TF_OK);
            assert!(n <= PULL_BOUND, "one poll took {n} events (bound {PULL_BOUND})");
            largest = largest.max(n);
            total.messages += c.messages;
            assert_eq!(c.closes, 0);
        }
        assert_eq!(total.messages, 2 * per_peer, "nothing lost, nothing duplicated");
        let _peers: Vec<TcpStream> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        assert!(largest >= 4096, "the queue really filled up: largest poll {largest}");
    });
}

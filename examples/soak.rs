//! Soak: a bounded mixed load through the C API, checking that every frame a
//! surviving client sent comes back exactly once and in order, and that the
//! process's memory does not creep.
//!
//! 300 client slots on 12 threads (in a child process) connect and disconnect at random and send
//! frames of random sizes up to 1 MiB. Each connection picks how it is
//! served: echoed from the callback, echoed from a host thread, or echoed
//! and then closed by the host (tf_conn_close). RSS is read, with every
//! client paused and free heap pages returned (malloc_trim), after the
//! warm-up and at the end; the end may exceed the warm-up figure by at most 10%.
//!
//! Run: `SOAK_SECS=60 cargo run --release --example soak` (default 60 s).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};
use tcpframe::ffi::*;

const SLOTS: usize = 300;
const THREADS: usize = 12;
const MODE_CALLBACK: u8 = 0;
const MODE_HOST_THREAD: u8 = 1;
const MODE_CLOSE_AFTER: u8 = 2;

/// Replies waiting for a host thread: (connection, payload).
type ReplyQueue = (Mutex<VecDeque<(u64, Vec<u8>)>>, Condvar);

struct Host {
    srv: AtomicPtr<tf_server>,
    queues: [ReplyQueue; 2],
    done: AtomicBool,
    closes: AtomicU64,
}

unsafe extern "C" fn on_message(user: *mut c_void, conn: u64, data: *const u8, len: usize) {
    // SAFETY: user_data is the Host, alive until after tf_server_stop.
    let host = unsafe { &*(user as *const Host) };
    // SAFETY: `len` readable bytes valid during the call.
    let payload = if len == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(data, len) } };
    let srv = host.srv.load(Ordering::Acquire);
    match payload.first().copied().unwrap_or(MODE_CALLBACK) {
        MODE_HOST_THREAD => {
            let (q, cv) = &host.queues[(conn % 2) as usize];
            q.lock().unwrap().push_back((conn, payload.to_vec()));
            cv.notify_one();
        }
        mode => {
            // SAFETY: srv is live during its callbacks.
            let rc = unsafe { tf_send(srv, conn, data, len) };
            assert!(rc == TF_OK || rc == TF_ERR_NO_CONN, "tf_send in callback: {rc}");
            if mode == MODE_CLOSE_AFTER {
                // SAFETY: as above.
                unsafe { tf_conn_close(srv, conn) };
            }
        }
    }
}

unsafe extern "C" fn on_close(user: *mut c_void, _conn: u64, _reason: i32) {
    // SAFETY: user_data is the Host.
    unsafe { &*(user as *const Host) }.closes.fetch_add(1, Ordering::Relaxed);
}

fn host_sender(host: &Host, which: usize) {
    let (q, cv) = &host.queues[which];
    loop {
        let mut g = q.lock().unwrap();
        while g.is_empty() && !host.done.load(Ordering::Acquire) {
            g = cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
        }
        let Some((conn, data)) = g.pop_front() else { return };
        drop(g);
        let srv = host.srv.load(Ordering::Acquire);
        loop {
            // SAFETY: srv stays live until the senders have been joined.
            match unsafe { tf_send(srv, conn, data.as_ptr(), data.len()) } {
                TF_ERR_FULL => std::thread::sleep(Duration::from_millis(1)),
                TF_OK | TF_ERR_NO_CONN | TF_ERR_STOPPED => break,
                rc => panic!("tf_send from a host thread: {rc}"),
            }
        }
    }
}

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
    fn frame_len(&mut self) -> usize {
        match self.below(100) {
            0 => 65_536 + self.below((1 << 20) - 65_536 + 1) as usize,
            1..=9 => 1024 + self.below(64 * 1024) as usize,
            _ => 5 + self.below(1020) as usize,
        }
    }
}

#[derive(Default)]
struct Totals {
    frames: AtomicU64,
    bytes: AtomicU64,
    connects: AtomicU64,
    host_closes: AtomicU64,
}

struct Slot {
    stream: Option<(TcpStream, u8)>,
    seq: u32,
}

fn read_exact_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut p = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut p)?;
    Ok(p)
}

/// One exchange on one slot: maybe connect, send 1-4 frames, check replies.
fn exchange(slot: &mut Slot, port: u16, rng: &mut Rng, totals: &Totals) {
    if slot.stream.is_none() {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        let mode = match rng.below(10) {
            0..=5 => MODE_CALLBACK,
            6..=8 => MODE_HOST_THREAD,
            _ => MODE_CLOSE_AFTER,
        };
        slot.stream = Some((s, mode));
        totals.connects.fetch_add(1, Ordering::Relaxed);
    }
    let (s, mode) = slot.stream.as_mut().unwrap();
    let mode = *mode;
    let n = if mode == MODE_CLOSE_AFTER { 1 } else { 1 + rng.below(4) as usize };
    let mut sent = Vec::with_capacity(n);
    let mut wire = Vec::new();
    for _ in 0..n {
        let len = rng.frame_len();
        let mut p = Vec::with_capacity(len);
        p.push(mode);
        p.extend_from_slice(&slot.seq.to_le_bytes());
        slot.seq = slot.seq.wrapping_add(1);
        let seed = rng.next() as u8;
        p.extend((0..len - 5).map(|i| (i as u8).wrapping_mul(7) ^ seed));
        wire.extend_from_slice(&(p.len() as u32).to_le_bytes());
        wire.extend_from_slice(&p);
        sent.push(p);
    }
    s.write_all(&wire).expect("write frames");
    for p in &sent {
        let got = read_exact_frame(s).expect("read echo");
        assert!(got == *p, "echo mismatch: {} bytes sent, {} received", p.len(), got.len());
        totals.frames.fetch_add(1, Ordering::Relaxed);
        totals.bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
    }
    if mode == MODE_CLOSE_AFTER {
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0)), "the host closed it: end of stream expected");
        totals.host_closes.fetch_add(1, Ordering::Relaxed);
        slot.stream = None;
    } else if rng.below(8) == 0 {
        slot.stream = None; // the client leaves
    }
}

/// RSS after handing free heap pages back (glibc's malloc_trim), so that the
/// figure is memory in use, not what the allocator keeps cached.
fn rss_kib() -> u64 {
    // SAFETY: malloc_trim only releases free memory.
    unsafe { libc::malloc_trim(0) };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The client process: runs the two phases, pausing after each until the
/// server process (its parent) has read its RSS.
fn client_main(port: u16, warm: Duration, main_phase: Duration) {
    // A failed check in any client thread ends the process at once (the
    // others would wait at the barrier forever), and so does overrunning.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(1);
    }));
    let limit = warm + main_phase + Duration::from_secs(120);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("soak client: still running after {limit:?}: giving up");
        std::process::exit(2);
    });
    let totals = Totals::default();
    let barrier = Barrier::new(THREADS + 1);
    let phase_end = Mutex::new(Instant::now() + warm);
    let stdin = std::io::stdin();
    let mut line = String::new();
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..THREADS)
            .map(|t| {
                let (totals, barrier, phase_end) = (&totals, &barrier, &phase_end);
                scope.spawn(move || {
                    let mut rng = Rng(0x9E37_79B9 ^ ((t as u64 + 1) * 0x1234_5677));
                    let mut slots: Vec<Slot> =
                        (0..SLOTS / THREADS).map(|_| Slot { stream: None, seq: 0 }).collect();
                    for _phase in 0..2 {
                        let end = *phase_end.lock().unwrap();
                        while Instant::now() < end {
                            let i = rng.below(slots.len() as u64) as usize;
                            exchange(&mut slots[i], port, &mut rng, totals);
                        }
                        barrier.wait(); // paused: the server reads its RSS
                        barrier.wait(); // resumed
                    }
                })
            })
            .collect();
        for phase in 0..2 {
            barrier.wait();
            println!("paused");
            line.clear();
            stdin.read_line(&mut line).unwrap();
            if phase == 0 {
                *phase_end.lock().unwrap() = Instant::now() + main_phase;
            }
            barrier.wait();
        }
        for c in clients {
            c.join().expect("a client thread failed");
        }
    });
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "totals {} {} {} {}",
        g(&totals.connects),
        g(&totals.frames),
        g(&totals.bytes),
        g(&totals.host_closes)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 5 && args[1] == "--client" {
        let ms = |s: &str| Duration::from_millis(s.parse().unwrap());
        return client_main(args[2].parse().unwrap(), ms(&args[3]), ms(&args[4]));
    }
    // Fix glibc's mmap threshold at its default (128 KiB) instead of letting
    // it adapt upwards: frames of up to 1 MiB are then always mapped and
    // unmapped, and the RSS figures measure what the library keeps, not
    // where the allocator happened to place large blocks.
    // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let warm = Duration::from_secs((secs / 4).clamp(2, 15));
    let main_phase = Duration::from_secs(secs).saturating_sub(warm);
    let host: &'static Host = Box::leak(Box::new(Host {
        srv: AtomicPtr::new(std::ptr::null_mut()),
        queues: Default::default(),
        done: AtomicBool::new(false),
        closes: AtomicU64::new(0),
    }));
    let cfg = tf_config_new();
    let mut srv = std::ptr::null_mut();
    // SAFETY: live pointers; host outlives the server.
    unsafe {
        assert_eq!(tf_config_set_address(cfg, c"127.0.0.1:0".as_ptr()), TF_OK);
        assert_eq!(tf_config_set_max_frame(cfg, 2 << 20), TF_OK);
        let cb = tf_callbacks {
            user_data: host as *const Host as *mut c_void,
            on_connect: None,
            on_message: Some(on_message),
            on_close: Some(on_close),
        };
        assert_eq!(tf_server_start(cfg, &cb, &mut srv), TF_OK);
        tf_config_free(cfg);
    }
    host.srv.store(srv, Ordering::Release);
    // SAFETY: srv is live.
    let port = unsafe { tf_server_port(srv) };
    // Clients run in a child process, so that RSS here is the server's alone.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--client",
            &port.to_string(),
            &warm.as_millis().to_string(),
            &main_phase.as_millis().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the client process");
    let mut to_child = child.stdin.take().unwrap();
    let mut from_child = BufReader::new(child.stdout.take().unwrap());
    let mut rss = Vec::new();
    let mut totals = Vec::new();
    std::thread::scope(|scope| {
        let senders: Vec<_> = (0..2).map(|i| scope.spawn(move || host_sender(host, i))).collect();
        let mut line = String::new();
        loop {
            line.clear();
            if from_child.read_line(&mut line).unwrap() == 0 {
                break;
            }
            if line.trim() == "paused" {
                // Longer than the loop's quiet-second trim: caches handed back.
                std::thread::sleep(Duration::from_millis(1500));
                rss.push(rss_kib());
                writeln!(to_child, "go").unwrap();
            } else if let Some(t) = line.strip_prefix("totals ") {
                totals = t.split_whitespace().map(|v| v.parse::<u64>().unwrap()).collect();
            }
        }
        host.done.store(true, Ordering::Release);
        for s in senders {
            s.join().unwrap();
        }
    });
    let status = child.wait().unwrap();
    assert!(status.success(), "the client process failed: a frame was lost, duplicated or reordered");
    let mut st = tf_stats::default();
    // SAFETY: srv is live until freed below.
    unsafe {
        assert_eq!(tf_server_stop(srv, 1000), TF_OK);
        assert_eq!(tf_server_stats(srv, &mut st), TF_OK);
        tf_server_free(srv);
    }
    let [connects, frames, bytes, host_closes] = totals[..] else { panic!("no totals from the clients") };
    let (rss_warm, rss_end) = (rss[0], rss[1]);
    let growth = (rss_end as f64 - rss_warm as f64) / rss_warm as f64 * 100.0;
    println!(
        "soak: {secs} s, {connects} connections, {frames} frames ({} MiB) echoed exactly and in order, {host_closes} host closes",
        bytes >> 20
    );
    println!("soak: server stats: {st:?}");
    println!("soak: server RSS after warm-up {rss_warm} KiB, at the end {rss_end} KiB ({growth:+.1}%)");
    assert_eq!(st.connections_accepted, connects);
    assert_eq!(host.closes.load(Ordering::Relaxed), st.connections_accepted, "one on_close per connection");
    assert!(st.frames_received >= frames && st.frames_sent >= frames);
    assert!(frames > 1000, "too little traffic to judge");
    assert!(growth <= 10.0, "RSS grew {growth:.1}% after warm-up (limit 10%)");
    println!("soak: 1 passed, 0 failed");
}

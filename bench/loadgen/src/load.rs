//! The load scenarios. Every byte that comes back is checked; every loop is
//! bounded by a deadline.

use crate::sys::{self, Epoll};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- payloads

const PATTERN_LEN: usize = 65536;
const PATTERN_PAD: usize = 1 << 20; // frames up to 1 MiB

fn pattern() -> &'static [u8] {
    use std::sync::OnceLock;
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..PATTERN_LEN + PATTERN_PAD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

fn pat_off(conn: u32, seq: u64) -> usize {
    ((seq.wrapping_mul(2_654_435_761) ^ (conn as u64).wrapping_mul(40_503)) % PATTERN_LEN as u64) as usize
}

/// Append frame `seq` of connection `conn` (prefix + payload) to `out`.
/// Payload: bytes 0..4 = seq (LE, truncated), the rest a slice of a random pattern
/// chosen by (conn, seq), so a lost, repeated, reordered or corrupted frame shows.
pub fn push_frame(out: &mut Vec<u8>, conn: u32, seq: u64, size: usize) {
    out.extend_from_slice(&(size as u32).to_le_bytes());
    let p = &pattern()[pat_off(conn, seq)..];
    if size >= 4 {
        out.extend_from_slice(&(seq as u32).to_le_bytes());
        out.extend_from_slice(&p[4..size]);
    } else {
        out.extend_from_slice(&p[..size]);
    }
}

/// Check a payload against what `push_frame` generated.
pub fn check_payload(data: &[u8], conn: u32, seq: u64, size: usize) -> bool {
    if data.len() != size {
        return false;
    }
    let p = &pattern()[pat_off(conn, seq)..];
    if size >= 4 {
        data[..4] == (seq as u32).to_le_bytes() && data[4..] == p[4..size]
    } else {
        data == &p[..size]
    }
}

/// push_host's frames: bytes 0..8 = k LE, byte i >= 8 = (k*7 + i*13) & 0xff.
fn check_push(data: &[u8], k: u64, size: usize) -> bool {
    if data.len() != size || size < 8 || data[..8] != k.to_le_bytes() {
        return false;
    }
    data[8..].iter().enumerate().all(|(j, &b)| b == (k.wrapping_mul(7).wrapping_add(((j + 8) * 13) as u64)) as u8)
}

// ---------------------------------------------------------------- measurement

/// What one scenario run measured (window = after warm-up).
#[derive(Default, Debug, Clone)]
pub struct Outcome {
    pub ok: bool,
    pub error: String,
    pub frames: u64, // or connections for churn
    pub secs: f64,
    pub cpu_us: f64,       // server utime+stime over the window (ticks -> us)
    pub sched_us: f64,     // server on-CPU time from schedstat (cross-check)
    pub foreign_pct: f64,  // CPU used by other processes, % of one core
    pub foreign_top: String, // who, when foreign_pct is notable
    pub core_us: f64,      // busy time of the server's core (incl. softirq), if pinned
    pub client_core_pct: f64, // busy % of the load generator's core, if pinned
    pub lat_ns: Vec<u32>,  // request/response latencies (RR only)
    pub extra: Vec<(String, String)>,
}

#[derive(Clone)]
struct Snap {
    t: Instant,
    count: u64,
    ticks: u64,
    sched: u64,
    core: Option<u64>,
    client_core: Option<u64>,
    foreign: std::collections::HashMap<i32, (String, u64)>,
}

pub struct Meter {
    pub server_pid: i32,
    tck: u64,
    start: Option<Snap>,
}

impl Meter {
    pub fn new(server_pid: i32) -> Meter {
        Meter { server_pid, tck: sys::clk_tck(), start: None }
    }
    fn snap(&self, count: u64) -> Snap {
        let me = std::process::id() as i32;
        let foreign = sys::foreign_cpu_ticks(&[self.server_pid, me]);
        Snap {
            t: Instant::now(),
            count,
            ticks: sys::proc_cpu_ticks(self.server_pid).unwrap_or(0),
            sched: sys::proc_sched_ns(self.server_pid).unwrap_or(0),
            core: sys::server_cpu().and_then(sys::cpu_busy_ticks),
            client_core: sys::pinned_cpu().and_then(sys::cpu_busy_ticks),
            foreign,
        }
    }
    pub fn begin(&mut self, count: u64) {
        self.start = Some(self.snap(count));
    }
    pub fn end(&self, count: u64, out: &mut Outcome) {
        let e = self.snap(count);
        let s = self.start.clone().unwrap_or_else(|| e.clone());
        out.secs = e.t.duration_since(s.t).as_secs_f64();
        out.frames = e.count - s.count;
        out.cpu_us = (e.ticks.saturating_sub(s.ticks)) as f64 * 1e6 / self.tck as f64;
        out.sched_us = (e.sched.saturating_sub(s.sched)) as f64 / 1e3;
        out.core_us = match (s.core, e.core) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 * 1e6 / self.tck as f64,
            _ => f64::NAN,
        };
        out.client_core_pct = match (s.client_core, e.client_core) {
            (Some(a), Some(b)) if out.secs > 0.0 => b.saturating_sub(a) as f64 * 1e6 / self.tck as f64 / (out.secs * 1e6) * 100.0,
            _ => f64::NAN,
        };
        // per-pid growth (processes that appeared count from 0; ones that exited are
        // visible through their parent's cutime/cstime)
        let mut who: Vec<(u64, String)> = e
            .foreign
            .iter()
            .map(|(pid, (comm, t))| (t.saturating_sub(s.foreign.get(pid).map_or(0, |x| x.1)), format!("{comm}[{pid}]")))
            .filter(|(d, _)| *d > 0)
            .collect();
        who.sort_by(|a, b| b.0.cmp(&a.0));
        let f_ticks: u64 = who.iter().map(|w| w.0).sum();
        let f_us = f_ticks as f64 * 1e6 / self.tck as f64;
        out.foreign_pct = if out.secs > 0.0 { f_us / (out.secs * 1e6) * 100.0 } else { 0.0 };
        if out.foreign_pct >= 5.0 {
            out.foreign_top = who
                .iter()
                .take(3)
                .map(|(d, n)| format!("{n}:{}ms", d * 1000 / self.tck))
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_nodelay(true)?;
    Ok(s)
}

// ---------------------------------------------------------------- idle connections

/// Open `n` connections, each exchanging one frame (so the server has surely
/// accepted it and handled data on it), then left idle. Connections the server
/// refuses (e.g. over its max connections) are counted and dropped.
pub struct IdleSet {
    pub conns: Vec<TcpStream>,
    pub attempted: usize,
    pub rejected: usize,
    pub connect_errors: usize,
}

pub fn open_idle(addr: SocketAddr, n: usize, budget: Duration) -> IdleSet {
    let deadline = Instant::now() + budget;
    let mut set = IdleSet { conns: Vec::with_capacity(n), attempted: 0, rejected: 0, connect_errors: 0 };
    let batch = 100;
    let mut frame = Vec::new();
    let mut buf = [0u8; 256];
    while set.attempted < n && Instant::now() < deadline {
        let mut pending = Vec::new();
        for _ in 0..batch.min(n - set.attempted) {
            set.attempted += 1;
            match connect(addr) {
                Ok(s) => pending.push(s),
                Err(_) => set.connect_errors += 1,
            }
        }
        if pending.is_empty() && set.connect_errors > 0 {
            break; // out of descriptors or ports: stop trying
        }
        for (i, s) in pending.iter_mut().enumerate() {
            frame.clear();
            push_frame(&mut frame, 1_000_000 + i as u32, 0, 64);
            let _ = s.write_all(&frame);
        }
        for (i, mut s) in pending.into_iter().enumerate() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let good = s.read_exact(&mut buf[..68]).is_ok()
                && buf[..4] == 64u32.to_le_bytes()
                && check_payload(&buf[4..68], 1_000_000 + i as u32, 0, 64);
            if good {
                set.conns.push(s);
            } else {
                set.rejected += 1;
            }
        }
    }
    set
}

// ---------------------------------------------------------------- scenario: request/response

pub fn run_rr(addr: SocketAddr, size: usize, t: Timing, meter: &mut Meter) -> Outcome {
    let mut out = Outcome::default();
    let mut s = match connect(addr) {
        Ok(s) => s,
        Err(e) => {
            out.error = format!("connect: {e}");
            return out;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let start = Instant::now();
    let warm_end = start + t.warmup;
    let end = warm_end + t.measure;
    let mut measuring = false;
    let mut seq = 0u64;
    let mut count = 0u64;
    let mut frame = Vec::with_capacity(size + 4);
    let mut rbuf = vec![0u8; size + 4];
    out.lat_ns.reserve(2_000_000);
    loop {
        let now = Instant::now();
        if !measuring && now >= warm_end {
            meter.begin(count);
            measuring = true;
        }
        if now >= end {
            break;
        }
        frame.clear();
        push_frame(&mut frame, 0, seq, size);
        let t0 = Instant::now();
        if let Err(e) = s.write_all(&frame) {
            out.error = format!("write: {e}");
            return out;
        }
        if let Err(e) = s.read_exact(&mut rbuf) {
            out.error = format!("read: {e}");
            return out;
        }
        let dt = t0.elapsed().as_nanos().min(u32::MAX as u128) as u32;
        if rbuf[..4] != (size as u32).to_le_bytes() || !check_payload(&rbuf[4..], 0, seq, size) {
            out.error = format!("verify: frame {seq} differs");
            return out;
        }
        seq += 1;
        count += 1;
        if measuring && out.lat_ns.len() < 20_000_000 {
            out.lat_ns.push(dt);
        }
    }
    meter.end(count, &mut out);
    out.ok = true;
    out
}

// ---------------------------------------------------------------- scenario: pipelined flows

struct Flow {
    s: TcpStream,
    id: u32,
    sent: u64,
    recvd: u64,
    /// When frames not yet echoed were handed to the socket, oldest first:
    /// (time, how many frames then), for per-frame latency.
    stamps: std::collections::VecDeque<(Instant, u32)>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    woff: usize,
    out_armed: bool,
    dead: bool,
}

pub struct PipeSpec {
    pub conns: usize,
    pub inflight: usize,
    pub size: usize,
    pub idle: usize,
}

pub fn run_pipe(addr: SocketAddr, spec: &PipeSpec, t: Timing, meter: &mut Meter) -> Outcome {
    let mut out = Outcome::default();
    let ep = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            out.error = format!("epoll: {e}");
            return out;
        }
    };
    // Active connections first (a server with a connection cap must not refuse them).
    let mut flows = Vec::with_capacity(spec.conns);
    for i in 0..spec.conns {
        match connect(addr) {
            Ok(s) => {
                let _ = s.set_nonblocking(true);
                flows.push(Flow {
                    s,
                    id: i as u32,
                    sent: 0,
                    recvd: 0,
                    stamps: std::collections::VecDeque::new(),
                    rbuf: vec![0u8; (64 * 1024).max(4 * (spec.size + 4))],
                    rstart: 0,
                    rend: 0,
                    wbuf: Vec::with_capacity(spec.inflight * (spec.size + 4) * 2),
                    woff: 0,
                    out_armed: false,
                    dead: false,
                })
            }
            Err(e) => {
                out.error = format!("connect: {e}");
                return out;
            }
        }
    }
    let idle = if spec.idle > 0 { Some(open_idle(addr, spec.idle, Duration::from_secs(30))) } else { None };
    if let Some(set) = &idle {
        out.extra.push(("idle_ok".into(), set.conns.len().to_string()));
        if set.rejected + set.connect_errors > 0 {
            out.extra.push(("idle_refused".into(), (set.rejected + set.connect_errors).to_string()));
        }
    }
    for (i, f) in flows.iter_mut().enumerate() {
        let _ = ep.add(f.s.as_raw_fd(), libc::EPOLLIN as u32, i as u64);
        for _ in 0..spec.inflight {
            push_frame(&mut f.wbuf, f.id, f.sent, spec.size);
            f.sent += 1;
        }
        f.stamps.push_back((Instant::now(), spec.inflight as u32));
    }
    out.lat_ns.reserve(4_000_000);
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let start = Instant::now();
    let warm_end = start + t.warmup;
    let end = warm_end + t.measure;
    let mut measuring = false;
    let mut total = 0u64;
    let mut last_progress = Instant::now();
    let mut last_total = 0u64;
    let fsz = spec.size + 4;
    // initial writes
    let mut first = true;
    loop {
        let now = Instant::now();
        if !measuring && now >= warm_end {
            meter.begin(total);
            measuring = true;
        }
        if now >= end {
            break;
        }
        if total != last_total {
            last_total = total;
            last_progress = now;
        } else if now.duration_since(last_progress) > Duration::from_secs(3) {
            out.error = format!("stalled: no echo for 3 s after {total} frames");
            return out;
        }
        let n = if first { 0 } else { ep.wait(&mut evs, 10) };
        let ready: Vec<(usize, u32)> = if first {
            first = false;
            (0..flows.len()).map(|i| (i, libc::EPOLLOUT as u32)).collect()
        } else {
            evs[..n].iter().map(|e| (e.u64 as usize, e.events)).collect()
        };
        for (i, ev) in ready {
            let f = &mut flows[i];
            if f.dead {
                continue;
            }
            // One clock read per event: when these echoes arrived, and when
            // the frames sent in reply are handed to the socket.
            let at = Instant::now();
            if ev & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                if f.rend == f.rbuf.len() {
                    f.rbuf.copy_within(f.rstart..f.rend, 0);
                    f.rend -= f.rstart;
                    f.rstart = 0;
                }
                match f.s.read(&mut f.rbuf[f.rend..]) {
                    Ok(0) => {
                        out.error = format!("conn {i}: server closed the connection after {} frames", f.recvd);
                        return out;
                    }
                    Ok(k) => f.rend += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        out.error = format!("conn {i}: read: {e}");
                        return out;
                    }
                }
                let mut got = 0;
                while f.rend - f.rstart >= fsz {
                    let fr = &f.rbuf[f.rstart..f.rstart + fsz];
                    if fr[..4] != (spec.size as u32).to_le_bytes() || !check_payload(&fr[4..], f.id, f.recvd, spec.size) {
                        out.error = format!("conn {i}: verify: frame {} differs", f.recvd);
                        return out;
                    }
                    f.rstart += fsz;
                    f.recvd += 1;
                    got += 1;
                }
                if f.rstart == f.rend {
                    f.rstart = 0;
                    f.rend = 0;
                }
                total += got;
                // Latency of each echoed frame: arrival - when it was sent.
                let mut left = got;
                while left > 0 {
                    let Some(front) = f.stamps.front_mut() else { break };
                    let take = (front.1 as u64).min(left);
                    if measuring && out.lat_ns.len() < 20_000_000 {
                        let dt = at.saturating_duration_since(front.0).as_nanos().min(u32::MAX as u128) as u32;
                        out.lat_ns.extend(std::iter::repeat(dt).take(take as usize));
                    }
                    front.1 -= take as u32;
                    left -= take;
                    if front.1 == 0 {
                        f.stamps.pop_front();
                    }
                }
                for _ in 0..got {
                    push_frame(&mut f.wbuf, f.id, f.sent, spec.size);
                    f.sent += 1;
                }
                if got > 0 {
                    f.stamps.push_back((at, got as u32));
                }
            }
            // one write per batch
            if f.woff < f.wbuf.len() {
                match f.s.write(&f.wbuf[f.woff..]) {
                    Ok(k) => f.woff += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        out.error = format!("conn {i}: write: {e}");
                        f.dead = true;
                        return out;
                    }
                }
                if f.woff == f.wbuf.len() {
                    f.wbuf.clear();
                    f.woff = 0;
                } else if f.woff > f.wbuf.capacity() / 2 {
                    f.wbuf.drain(..f.woff);
                    f.woff = 0;
                }
            }
            let want_out = f.woff < f.wbuf.len();
            if want_out != f.out_armed {
                let evm = libc::EPOLLIN as u32 | if want_out { libc::EPOLLOUT as u32 } else { 0 };
                let _ = ep.modify(f.s.as_raw_fd(), evm, i as u64);
                f.out_armed = want_out;
            }
        }
    }
    meter.end(total, &mut out);
    drop(idle);
    out.ok = true;
    out
}

// ---------------------------------------------------------------- scenario: churn

/// connect, send one frame, read its echo, close; `conc` of these at a time.
pub fn run_churn(addr: SocketAddr, conc: usize, size: usize, rst: bool, t: Timing, meter: &mut Meter) -> Outcome {
    let mut out = Outcome::default();
    let ep = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            out.error = format!("epoll: {e}");
            return out;
        }
    };
    struct Slot {
        s: Option<TcpStream>,
        id: u32,
        got: usize,
    }
    let fsz = size + 4;
    let mut frame = Vec::with_capacity(fsz);
    let mut next_id = 0u32;
    let mut connect_errors = 0u64;
    let open = |slot: &mut Slot, i: usize, next_id: &mut u32, frame: &mut Vec<u8>| -> io::Result<()> {
        let s = connect(addr)?;
        s.set_nonblocking(true)?;
        if rst {
            sys::set_linger0(s.as_raw_fd());
        }
        frame.clear();
        push_frame(frame, *next_id, 0, size);
        (&s).write_all(frame)?; // 68 bytes into an empty socket buffer: never blocks
        ep.add(s.as_raw_fd(), libc::EPOLLIN as u32, i as u64)?;
        slot.id = *next_id;
        *next_id = next_id.wrapping_add(1);
        slot.got = 0;
        slot.s = Some(s);
        Ok(())
    };
    let mut slots: Vec<Slot> = (0..conc).map(|_| Slot { s: None, id: 0, got: 0 }).collect();
    let mut bufs: Vec<Vec<u8>> = (0..conc).map(|_| vec![0u8; fsz]).collect();
    for i in 0..conc {
        if let Err(e) = open(&mut slots[i], i, &mut next_id, &mut frame) {
            out.error = format!("connect: {e}");
            return out;
        }
    }
    let mut evs = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let start = Instant::now();
    let warm_end = start + t.warmup;
    let end = warm_end + t.measure;
    let mut measuring = false;
    let mut total = 0u64;
    let mut last_progress = Instant::now();
    let mut last_total = 0u64;
    loop {
        let now = Instant::now();
        if !measuring && now >= warm_end {
            meter.begin(total);
            measuring = true;
        }
        if now >= end {
            break;
        }
        if total != last_total {
            last_total = total;
            last_progress = now;
        } else if now.duration_since(last_progress) > Duration::from_secs(3) {
            out.error = format!("stalled after {total} connections");
            return out;
        }
        let n = ep.wait(&mut evs, 10);
        for e in &evs[..n] {
            let i = e.u64 as usize;
            let slot = &mut slots[i];
            let Some(s) = slot.s.as_mut() else { continue };
            let b = &mut bufs[i];
            match s.read(&mut b[slot.got..]) {
                Ok(0) => {
                    out.error = format!("server closed a churn connection early ({} of {fsz} bytes)", slot.got);
                    return out;
                }
                Ok(k) => slot.got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    out.error = format!("churn read: {e}");
                    return out;
                }
            }
            if slot.got < fsz {
                continue;
            }
            if b[..4] != (size as u32).to_le_bytes() || !check_payload(&b[4..], slot.id, 0, size) {
                out.error = "churn verify failed".into();
                return out;
            }
            total += 1;
            slot.s = None; // close
            // open a replacement (bounded retries on a transient connect error)
            let mut tries = 0;
            loop {
                match open(slot, i, &mut next_id, &mut frame) {
                    Ok(()) => break,
                    Err(e) => {
                        connect_errors += 1;
                        tries += 1;
                        if tries > 50 {
                            out.error = format!("connect keeps failing: {e}");
                            return out;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        }
    }
    meter.end(total, &mut out);
    if connect_errors > 0 {
        out.extra.push(("connect_retries".into(), connect_errors.to_string()));
    }
    out.ok = true;
    out
}

// ---------------------------------------------------------------- scenario: host-thread push

pub fn run_push(addr: SocketAddr, size: usize, t: Timing, meter: &mut Meter) -> Outcome {
    let mut out = Outcome::default();
    let mut s = match connect(addr) {
        Ok(s) => s,
        Err(e) => {
            out.error = format!("connect: {e}");
            return out;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let fsz = size + 4;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut a, mut b) = (0usize, 0usize);
    let start = Instant::now();
    let warm_end = start + t.warmup;
    let end = warm_end + t.measure;
    let mut measuring = false;
    let mut k = 0u64;
    loop {
        let now = Instant::now();
        if !measuring && now >= warm_end {
            meter.begin(k);
            measuring = true;
        }
        if now >= end {
            break;
        }
        if b == buf.len() {
            buf.copy_within(a..b, 0);
            b -= a;
            a = 0;
        }
        match s.read(&mut buf[b..]) {
            Ok(0) => {
                out.error = format!("push: server closed after {k} frames");
                return out;
            }
            Ok(n) => b += n,
            Err(e) => {
                out.error = format!("push: read: {e} after {k} frames");
                return out;
            }
        }
        while b - a >= fsz {
            let fr = &buf[a..a + fsz];
            if fr[..4] != (size as u32).to_le_bytes() || !check_push(&fr[4..], k, size) {
                out.error = format!("push: verify: frame {k} differs");
                return out;
            }
            a += fsz;
            k += 1;
        }
        if a == b {
            a = 0;
            b = 0;
        }
    }
    meter.end(k, &mut out);
    out.ok = true;
    out
}

// ---------------------------------------------------------------- scenario: RSS per idle connection

pub fn run_rss(addr: SocketAddr, n: usize, pid: i32) -> Outcome {
    let mut out = Outcome::default();
    // a few warm connections first so one-time allocations are in the baseline
    let warm = open_idle(addr, 16, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let Some(rss0) = sys::proc_rss_bytes(pid) else {
        out.error = "cannot read VmRSS".into();
        return out;
    };
    let t0 = Instant::now();
    let set = open_idle(addr, n, Duration::from_secs(60));
    let open_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let rss1 = sys::proc_rss_bytes(pid).unwrap_or(rss0);
    let ok = set.conns.len();
    out.frames = ok as u64;
    out.secs = open_secs;
    out.extra.push(("rss_before_kib".into(), (rss0 / 1024).to_string()));
    out.extra.push(("rss_after_kib".into(), (rss1 / 1024).to_string()));
    out.extra.push(("idle_ok".into(), ok.to_string()));
    if set.rejected + set.connect_errors > 0 {
        out.extra.push(("idle_refused".into(), (set.rejected + set.connect_errors).to_string()));
    }
    if ok == 0 {
        out.error = "no idle connection was accepted".into();
        return out;
    }
    let per = (rss1 as f64 - rss0 as f64) / ok as f64;
    out.extra.push(("rss_bytes_per_conn".into(), format!("{per:.0}")));
    drop(warm);
    out.ok = true;
    out
}

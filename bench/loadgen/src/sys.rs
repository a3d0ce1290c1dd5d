//! Thin OS helpers: epoll, /proc readings, rlimits, signals.

use std::io;
use std::os::unix::io::RawFd;

pub struct Epoll {
    fd: RawFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll { fd })
    }
    fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        let rc = unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }
    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }
    pub fn wait(&self, evs: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        let n = unsafe { libc::epoll_wait(self.fd, evs.as_mut_ptr(), evs.len() as i32, timeout_ms) };
        if n < 0 {
            0
        } else {
            n as usize
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

pub fn clk_tck() -> u64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t <= 0 {
        100
    } else {
        t as u64
    }
}

/// Fields after the ")" of /proc/<pid>/stat (field 3 = index 0).
fn stat_fields(path: &str) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().skip(1).map(|f| f.parse::<i64>().unwrap_or(0) as u64).collect())
}

/// utime + stime of a whole process (all threads), in clock ticks.
pub fn proc_cpu_ticks(pid: i32) -> Option<u64> {
    let f = stat_fields(&format!("/proc/{pid}/stat"))?;
    // after skipping state: index 0 = ppid (field 4) ... utime = field 14 -> index 10
    Some(f.get(10)? + f.get(11)?)
}

/// Sum over the process's threads of the on-CPU nanoseconds (schedstat), a
/// finer-grained cross-check of the tick-based reading.
pub fn proc_sched_ns(pid: i32) -> Option<u64> {
    let mut total = 0u64;
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let e = e.ok()?;
        let p = e.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            total += s.split_whitespace().next().and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(total)
}

/// CPU ticks (utime+stime+cutime+cstime) of every process on the machine
/// except the listed pids, per pid with its name: "somebody else was busy" detector.
pub fn foreign_cpu_ticks(exclude: &[i32]) -> std::collections::HashMap<i32, (String, u64)> {
    let mut m = std::collections::HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return m };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if exclude.contains(&pid) {
            continue;
        }
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let (Some(a), Some(b)) = (s.find('('), s.rfind(')')) else { continue };
        let comm = s[a + 1..b].to_string();
        let f: Vec<u64> = s[b + 1..].split_whitespace().skip(1).map(|x| x.parse::<i64>().unwrap_or(0) as u64).collect();
        let t = f.get(10).unwrap_or(&0) + f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0) + f.get(13).unwrap_or(&0);
        m.insert(pid, (comm, t));
    }
    m
}

/// VmRSS of a process in bytes.
pub fn proc_rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix("VmRSS:") {
            let kb: u64 = v.split_whitespace().next()?.parse().ok()?;
            return Some(kb * 1024);
        }
    }
    None
}

pub fn loadavg1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    unsafe {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur as u64
    }
}

pub fn kill(pid: i32, sig: i32) {
    if pid > 0 {
        unsafe { libc::kill(pid, sig) };
    }
}

pub fn set_linger0(fd: RawFd) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

/// Busy jiffies (user+nice+system+irq+softirq+steal) of the whole machine.
pub fn machine_busy_ticks() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else { return 0 };
    let Some(line) = s.lines().next() else { return 0 };
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal
    [0usize, 1, 2, 5, 6, 7].iter().map(|&i| f.get(i).copied().unwrap_or(0)).sum()
}

/// How many cores the machine kept busy over `d` (while we ourselves are idle).
pub fn machine_busy_cores(d: std::time::Duration) -> f64 {
    let a = machine_busy_ticks();
    std::thread::sleep(d);
    let b = machine_busy_ticks();
    (b.saturating_sub(a)) as f64 / clk_tck() as f64 / d.as_secs_f64()
}

/// Busy jiffies (user+nice+system+irq+softirq+steal) of one CPU: unlike a
/// process's utime+stime this includes softirq work (loopback TCP processing)
/// done on that core.
pub fn cpu_busy_ticks(cpu: usize) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let tag = format!("cpu{cpu} ");
    let line = s.lines().find(|l| l.starts_with(&tag))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    Some([0usize, 1, 2, 5, 6, 7].iter().map(|&i| f.get(i).copied().unwrap_or(0)).sum())
}

/// The single CPU this process is pinned to, if it is pinned to exactly one.
pub fn pinned_cpu() -> Option<usize> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect();
        (cpus.len() == 1).then(|| cpus[0])
    }
}

static SERVER_CPU: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();

pub fn set_server_cpu(cpu: Option<usize>) {
    let _ = SERVER_CPU.set(cpu);
}

pub fn server_cpu() -> Option<usize> {
    SERVER_CPU.get().copied().flatten()
}

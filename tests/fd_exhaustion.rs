//! Out of file descriptors: the loop sheds new connections instead of
//! spinning, and serves again once descriptors are free. Own test binary:
//! it lowers this process's RLIMIT_NOFILE. Clients live in a child process
//! (this same binary, re-run with TCPFRAME_FD_CLIENT set) so that only the
//! server is short of descriptors.
mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The client process: on "go", opens N connections, reports, and holds
/// them until stdin closes.
fn client_main(port: u16, n: usize) {
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            held.push(s);
        }
    }
    println!("connected {}", held.len());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn running_out_of_descriptors_never_spins_and_service_resumes() {
    if let Ok(spec) = std::env::var("TCPFRAME_FD_CLIENT") {
        let (port, n) = spec.split_once(':').unwrap();
        return client_main(port.parse().unwrap(), n.parse().unwrap());
    }
    let srv = TestServer::start(Opts { record: false, ..Opts::default() });
    // The client process starts before the limit drops: it must not inherit it.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "running_out_of_descriptors_never_spins_and_service_resumes", "--nocapture"])
        .env("TCPFRAME_FD_CLIENT", format!("{}:200", srv.port))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn client process");
    let mut to_child = child.stdin.take().unwrap();
    // Leave room for about ten more descriptors in this process.
    let limit = (open_fds() + 10) as u64;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: live rlimit structs.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let low = libc::rlimit { rlim_cur: limit, rlim_max: lim.rlim_max };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
    }
    writeln!(to_child, "go").unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("connected") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "client process ended early");
    }
    assert_eq!(line.trim(), "connected 200");
    srv.wait_stats("shedding", |st| st.connections_rejected > 0);
    // Now measure the whole process's CPU over a second of exhaustion.
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time() - before;
    assert!(used < Duration::from_millis(100), "the loop used {used:?} of CPU in one second: spinning");
    let st = srv.stats();
    assert!(st.connections_accepted >= 1, "{st:?}");
    assert_eq!(st.connections_accepted + st.connections_rejected, 200, "{st:?}");
    // Free the descriptors: close the client process's connections.
    drop(to_child);
    let _ = child.wait();
    srv.wait_stats("all closed", |st| st.connections_active == 0);
    // SAFETY: restore the old limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let start = Instant::now();
    let mut s = loop {
        if let Ok(s) = TcpStream::connect(srv.addr) {
            break s;
        }
        assert!(start.elapsed() < WAIT);
        std::thread::sleep(Duration::from_millis(10));
    };
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&frame(b"served again")).unwrap();
    assert_eq!(read_frame(&mut s).unwrap(), b"served again");
}

//! Robustness rules on the host's side (API.md, "Robustness: rules and
//! additions from an adversarial review"): freeing servers from callbacks,
//! stop from callbacks, forked children, and calls from thread-exit
//! destructors. Connection-level rules: robustness.rs; pull mode:
//! robustness_pull.rs.
mod common;
use common::*;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Forked children allocate (error messages) and a raw clone() skips the
/// atfork handlers that make malloc safe in the child: while a fork test
/// runs, no other test of this file runs (they take this lock shared).
static QUIET: RwLock<()> = RwLock::new(());

fn shared_lock() -> RwLockReadGuard<'static, ()> {
    QUIET.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive_lock() -> RwLockWriteGuard<'static, ()> {
    QUIET.write().unwrap_or_else(|e| e.into_inner())
}

/// Keeps a server's hooks (its callbacks' closures) alive for good: a
/// callback that is still returning, or stuck, never runs freed code.
fn keep_hooks(srv: &HookServer) {
    std::mem::forget(srv.hooks.clone());
}

// ---------------------------------------------------------------- freeing from callbacks

#[derive(Default)]
struct CrossFree {
    b_srv: AtomicPtr<tf_server>,
    b_entered: AtomicBool,
    b_finished: AtomicBool,
    b_late_send: AtomicI32,
    finished_when_free_returned: Mutex<Option<bool>>,
}

#[test]
fn free_from_another_servers_callback_returns_after_the_running_callback_ends() {
    let _shared = shared_lock();
    // xfree.c: A's callback frees B while B's callback sleeps 300 ms.
    let x = Arc::new(CrossFree::default());
    let (xa, xb) = (x.clone(), x.clone());
    let mut b = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, conn, _| {
                xb.b_entered.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(300));
                // SAFETY: B is live during its own callbacks.
                let rc = unsafe { tf_send(srv, conn, b"late".as_ptr(), 4) };
                xb.b_late_send.store(rc, Ordering::SeqCst);
                xb.b_finished.store(true, Ordering::SeqCst);
            })),
            ..Hooks::default()
        },
    );
    x.b_srv.store(b.disown(), Ordering::SeqCst);
    keep_hooks(&b);
    let a = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |_, _, _| {
                let deadline = Instant::now() + WAIT;
                while !xa.b_entered.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // SAFETY: B is live and freed once, here.
                unsafe { tf_server_free(xa.b_srv.load(Ordering::SeqCst)) };
                *xa.finished_when_free_returned.lock().unwrap() = Some(xa.b_finished.load(Ordering::SeqCst));
            })),
            ..Hooks::default()
        },
    );
    let mut to_b = b.connect();
    let mut to_a = a.connect();
    write_frame(&mut to_b, b"x");
    write_frame(&mut to_a, b"y");
    let deadline = Instant::now() + WAIT;
    while x.finished_when_free_returned.lock().unwrap().is_none() {
        assert!(Instant::now() < deadline, "tf_server_free(B) did not return");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        *x.finished_when_free_returned.lock().unwrap(),
        Some(true),
        "tf_server_free(B) returned while B's callback was still running"
    );
    assert_eq!(
        x.b_late_send.load(Ordering::SeqCst),
        TF_ERR_STOPPED,
        "B's handle still answers in its running callback: stop has begun"
    );
    assert!(refused_within(b.addr, Duration::from_secs(2)), "B's port is closed");
}

#[test]
fn two_servers_freeing_each_other_from_their_callbacks_both_return() {
    let _shared = shared_lock();
    struct Pair {
        srv: [AtomicPtr<tf_server>; 2],
        entered: [AtomicBool; 2],
        returned: [AtomicBool; 2],
    }
    let pair =
        Arc::new(Pair { srv: Default::default(), entered: Default::default(), returned: Default::default() });
    let hooks_for = |me: usize| {
        let pair = pair.clone();
        Hooks {
            on_message: Some(Box::new(move |_, _, _| {
                let other = 1 - me;
                pair.entered[me].store(true, Ordering::SeqCst);
                let deadline = Instant::now() + WAIT;
                while !pair.entered[other].load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // SAFETY: the other server is live; each is freed once, here.
                unsafe { tf_server_free(pair.srv[other].load(Ordering::SeqCst)) };
                pair.returned[me].store(true, Ordering::SeqCst);
            })),
            ..Hooks::default()
        }
    };
    let mut servers =
        [HookServer::start(Opts::default(), hooks_for(0)), HookServer::start(Opts::default(), hooks_for(1))];
    for (i, s) in servers.iter_mut().enumerate() {
        pair.srv[i].store(s.disown(), Ordering::SeqCst);
        keep_hooks(s);
    }
    let mut peers: Vec<TcpStream> = servers.iter().map(|s| s.connect()).collect();
    for p in &mut peers {
        write_frame(p, b"free the other one");
    }
    wait_flag(&pair.returned[0], "server 0's tf_server_free(1) to return");
    wait_flag(&pair.returned[1], "server 1's tf_server_free(0) to return");
    for s in &servers {
        assert!(refused_within(s.addr, Duration::from_secs(2)), "port {} still accepts", s.port);
    }
}

/// Server A (two loop threads) waits on loop 0 for B (freed from A's
/// callback) and on loop 1 for C, while C's callback frees A: A and C free
/// each other, which must not deadlock, whatever A's other loop waits for.
/// `b_ms` / `c_ms`: how long B's and C's callbacks run before that.
fn three_servers_one_waiting_on_two_loops(b_ms: u64, c_ms: u64) {
    let _shared = shared_lock();
    #[derive(Default)]
    struct Three {
        srv: [AtomicPtr<tf_server>; 3],
        busy: [AtomicBool; 3],
        freed: [AtomicBool; 3],
    }
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    let t = Arc::new(Three::default());
    let hooks_for = |me: usize| {
        let t = t.clone();
        Hooks {
            on_message: Some(Box::new(move |_, _, data| {
                let free = |which: usize| {
                    // SAFETY: each server is live and freed once, here.
                    unsafe { tf_server_free(t.srv[which].load(Ordering::SeqCst)) };
                    t.freed[which].store(true, Ordering::SeqCst);
                };
                match (me, data) {
                    (A, b"B") => free(B),
                    (A, b"C") => free(C),
                    (B, _) => {
                        t.busy[B].store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(b_ms));
                    }
                    (C, _) => {
                        t.busy[C].store(true, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(c_ms));
                        free(A);
                    }
                    _ => {}
                }
            })),
            ..Hooks::default()
        }
    };
    let one = |me| {
        HookServer::start(
            Opts { threads: Some(if me == A { 2 } else { 1 }), ..Opts::default() },
            hooks_for(me),
        )
    };
    let mut servers = [one(A), one(B), one(C)];
    for (i, s) in servers.iter_mut().enumerate() {
        t.srv[i].store(s.disown(), Ordering::SeqCst);
        keep_hooks(s);
    }
    // Connection ids 1 and 2 of A live on its loops 0 and 1.
    let (mut a0, id0) = servers[A].connect_id();
    let (mut a1, id1) = servers[A].connect_id();
    assert_eq!((id0, id1), (1, 2));
    let mut b = servers[B].connect();
    let mut c = servers[C].connect();
    write_frame(&mut b, b"busy");
    wait_flag(&t.busy[B], "B's callback");
    write_frame(&mut a0, b"B"); // A's loop 0 now waits for B
    write_frame(&mut c, b"busy, then free A");
    wait_flag(&t.busy[C], "C's callback");
    write_frame(&mut a1, b"C"); // A's loop 1 now waits for C, which frees A
    wait_flag(&t.freed[B], "A's tf_server_free(B) to return");
    wait_flag(&t.freed[C], "A's tf_server_free(C) to return");
    wait_flag(&t.freed[A], "C's tf_server_free(A) to return");
}

#[test]
fn a_server_waiting_on_two_loops_and_freed_by_one_it_waits_for_does_not_deadlock() {
    // A's wait for B is found first: the cycle through its wait for C must
    // still be seen.
    three_servers_one_waiting_on_two_loops(2000, 500);
}

#[test]
fn one_wait_of_a_server_ending_leaves_its_other_wait_known() {
    // A's wait for B ends before C frees A: A's wait for C must still count.
    three_servers_one_waiting_on_two_loops(300, 1000);
}

#[test]
fn free_from_a_servers_own_callback_runs_no_more_callbacks_and_closes_everything() {
    let _shared = shared_lock();
    // selffree.c
    let freed = Arc::new(AtomicBool::new(false));
    let f = freed.clone();
    let mut srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, _, _| {
                // SAFETY: srv is live; freed once, here.
                unsafe { tf_server_free(srv) };
                f.store(true, Ordering::SeqCst);
            })),
            ..Hooks::default()
        },
    );
    srv.disown();
    keep_hooks(&srv);
    let mut peers: Vec<TcpStream> = (0..3).map(|_| srv.connect_id().0).collect();
    write_frame(&mut peers[0], b"bye");
    wait_flag(&freed, "tf_server_free(own) to return");
    let t = Instant::now();
    assert!(refused_within(srv.addr, Duration::from_secs(2)), "the listener is closed");
    for p in &mut peers {
        assert!(wait_eof(p), "every connection is closed");
    }
    assert!(t.elapsed() < Duration::from_secs(2), "closed {:?} after the free", t.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    let closes: Vec<_> = srv.rec().snapshot().into_iter().filter(|e| matches!(e, Ev::Close(..))).collect();
    assert!(closes.is_empty(), "no callback after tf_server_free from its own callback: {closes:?}");
}

#[test]
fn stop_from_inside_on_connect_or_on_close_of_any_server_is_invalid() {
    let _shared = shared_lock();
    let other = TestServer::start(Opts::default());
    let results = Arc::new(Mutex::new(Vec::new()));
    let (r1, r2) = (results.clone(), results.clone());
    let other_ptr = Arc::new(AtomicPtr::new(other.srv));
    let (o1, o2) = (other_ptr.clone(), other_ptr.clone());
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_connect: Some(Box::new(move |srv, _| {
                // SAFETY: both servers are live; the library must refuse.
                let own = unsafe { tf_server_stop(srv, 0) };
                // SAFETY: as above.
                let other = unsafe { tf_server_stop(o1.load(Ordering::SeqCst), 0) };
                r1.lock().unwrap().push(("on_connect", own, other));
                0
            })),
            on_close: Some(Box::new(move |srv, _, _| {
                // SAFETY: both servers are live; the library must refuse.
                let own = unsafe { tf_server_stop(srv, 0) };
                // SAFETY: as above.
                let other = unsafe { tf_server_stop(o2.load(Ordering::SeqCst), 0) };
                r2.lock().unwrap().push(("on_close", own, other));
            })),
            ..Hooks::default()
        },
    );
    let (s, id) = srv.connect_id();
    drop(s);
    srv.rec().wait_close(id);
    assert_eq!(
        *results.lock().unwrap(),
        vec![("on_connect", TF_ERR_INVALID, TF_ERR_INVALID), ("on_close", TF_ERR_INVALID, TF_ERR_INVALID)]
    );
    let (_again, _) = srv.connect_id(); // still accepting: not stopped
    let mut t = other.connect();
    write_frame(&mut t, b"other still echoes");
    assert_eq!(read_frame(&mut t).unwrap(), b"other still echoes");
}

// ---------------------------------------------------------------- fork and clone

/// In the child: the calls on the parent's server, as an exit status
/// (0: all TF_ERR_STOPPED; 10·k + code: call k returned code).
fn child_calls(srv: *mut tf_server) -> i32 {
    // SAFETY: srv is the parent's server, copied into this process; the
    // library must answer TF_ERR_STOPPED without touching the parent's state.
    unsafe {
        libc::alarm(5); // a hang ends in SIGALRM, which the parent reports
        let mut st = tf_stats::default();
        let codes = [
            tf_send(srv, 1, std::ptr::null(), 0),
            tf_conn_close(srv, 1),
            tf_conn_abort(srv, 1),
            tf_server_stats(srv, &mut st),
            tf_server_stop(srv, 0),
        ];
        for (k, &rc) in codes.iter().enumerate() {
            if rc != TF_ERR_STOPPED {
                return 10 * (k as i32 + 1) + rc;
            }
        }
        tf_server_free(srv); // frees nothing the parent uses
        0
    }
}

/// Waits for the child (bounded by its alarm) and describes how it ended.
fn child_status(pid: libc::pid_t) -> Result<(), String> {
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: pid is our child; status is a live int.
    let got = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(got, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        return Err(format!(
            "the child was killed by signal {} (a hang ends in SIGALRM)",
            libc::WTERMSIG(status)
        ));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        code => Err(format!("in the child, call {} returned {} (want TF_ERR_STOPPED)", code / 10, code % 10)),
    }
}

fn check_server_after_child(srv: &TestServer) {
    let mut s = srv.connect();
    write_frame(&mut s, b"parent unaffected");
    assert_eq!(read_frame(&mut s).unwrap(), b"parent unaffected");
}

#[test]
fn a_child_made_by_fork_gets_stopped_from_every_call_on_the_parents_server() {
    let _alone = exclusive_lock();
    let srv = TestServer::start(Opts::default());
    let (_peer, _) = srv.connect_id();
    // SAFETY: the child only makes library calls and exits with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = child_calls(srv.srv);
        // SAFETY: leave at once, running nothing of the parent's (no atexit, no test harness).
        unsafe { libc::_exit(code) };
    }
    child_status(pid).unwrap();
    check_server_after_child(&srv);
}

#[test]
fn a_child_made_by_a_raw_clone_gets_stopped_from_every_call_on_the_parents_server() {
    // clone() without CLONE_VM skips every atfork handler, like _Fork().
    let _alone = exclusive_lock();
    let srv = TestServer::start(Opts::default());
    let (_peer, _) = srv.connect_id();
    // SAFETY: the child only makes library calls and exits with _exit.
    let pid =
        unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) } as libc::pid_t;
    if pid == 0 {
        let code = child_calls(srv.srv);
        // SAFETY: leave at once, as above.
        unsafe { libc::_exit(code) };
    }
    child_status(pid).unwrap();
    check_server_after_child(&srv);
}

unsafe extern "C" fn nop_message(_: *mut libc::c_void, _: u64, _: *const u8, _: usize) {}

/// In a child forked inside a callback: a server it starts itself works and
/// can be stopped (the child is not "in a callback"); the parent's server
/// answers TF_ERR_STOPPED.
fn child_in_callback(parent: *mut tf_server) -> i32 {
    // SAFETY: library calls with live arguments; see child_calls.
    unsafe {
        libc::alarm(5);
        let cb = tf_callbacks {
            user_data: std::ptr::null_mut(),
            on_connect: None,
            on_message: Some(nop_message),
            on_close: None,
        };
        let cfg = tf_config_new();
        tf_config_set_address(cfg, c"127.0.0.1:0".as_ptr());
        let mut mine = std::ptr::null_mut();
        let rc = tf_server_start(cfg, &cb, &mut mine);
        tf_config_free(cfg);
        if rc != TF_OK {
            return 10 + rc;
        }
        let rc = tf_server_stop(mine, 0);
        if rc != TF_OK {
            return 20 + rc;
        }
        tf_server_free(mine);
        let rc = tf_send(parent, 1, std::ptr::null(), 0);
        if rc != TF_ERR_STOPPED {
            return 30 + rc;
        }
        0
    }
}

#[test]
fn a_child_forked_inside_a_callback_can_start_and_stop_its_own_server() {
    // forkcb.c
    let _alone = exclusive_lock();
    let outcome = Arc::new(Mutex::new(None));
    let o = outcome.clone();
    let srv = HookServer::start(
        Opts::default(),
        Hooks {
            on_message: Some(Box::new(move |srv, _, _| {
                // SAFETY: the child only makes library calls and exits with _exit.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let code = child_in_callback(srv);
                    // SAFETY: leave at once, as above.
                    unsafe { libc::_exit(code) };
                }
                *o.lock().unwrap() = Some(child_status(pid));
            })),
            ..Hooks::default()
        },
    );
    let (mut s, _) = srv.connect_id();
    write_frame(&mut s, b"fork now");
    let deadline = Instant::now() + WAIT;
    while outcome.lock().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the callback did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    outcome.lock().unwrap().take().unwrap().unwrap();
}

// ---------------------------------------------------------------- thread-exit destructors

/// What the destructor saw: tf_send(NULL), tf_send(unknown conn), free done.
#[derive(Default)]
struct DtorResults {
    srv: AtomicPtr<tf_server>,
    send_null: AtomicI32,
    send_unknown: AtomicI32,
    last_error_ok: AtomicBool,
    freed: AtomicBool,
}

impl DtorResults {
    fn new(srv: *mut tf_server) -> DtorResults {
        DtorResults {
            srv: AtomicPtr::new(srv),
            send_null: AtomicI32::new(-1),
            send_unknown: AtomicI32::new(-1),
            ..Default::default()
        }
    }

    /// The calls, from inside a destructor.
    fn run(&self) {
        let srv = self.srv.load(Ordering::SeqCst);
        // SAFETY: NULL is checked; srv is live until the free below.
        unsafe {
            self.send_null.store(tf_send(std::ptr::null_mut(), 1, std::ptr::null(), 0), Ordering::SeqCst);
            self.send_unknown.store(tf_send(srv, 987_654_321, b"x".as_ptr(), 1), Ordering::SeqCst);
            self.last_error_ok.store(!tf_last_error().is_null(), Ordering::SeqCst);
            tf_server_free(srv);
        }
        self.freed.store(true, Ordering::SeqCst);
    }

    fn check(&self, srv: &TestServer) {
        assert_eq!(self.send_null.load(Ordering::SeqCst), TF_ERR_INVALID, "tf_send(NULL) in a destructor");
        assert_eq!(
            self.send_unknown.load(Ordering::SeqCst),
            TF_ERR_NO_CONN,
            "tf_send(unknown) in a destructor"
        );
        assert!(self.last_error_ok.load(Ordering::SeqCst), "tf_last_error() in a destructor is not NULL");
        assert!(self.freed.load(Ordering::SeqCst), "tf_server_free returned");
        assert!(refused_within(srv.addr, Duration::from_secs(2)), "the freed server's port is closed");
    }
}

/// A server the test frees itself: its recorder stays with `TestServer`.
fn server_freed_elsewhere() -> (TestServer, *mut tf_server) {
    let mut srv = TestServer::start(Opts::default());
    let raw = srv.srv;
    srv.srv = std::ptr::null_mut(); // Drop then stops and frees NULL: nothing
    (srv, raw)
}

static TLS_DTOR: AtomicPtr<DtorResults> = AtomicPtr::new(std::ptr::null_mut());

struct CallsOnDrop;
impl Drop for CallsOnDrop {
    fn drop(&mut self) {
        // SAFETY: the DtorResults outlives the thread (joined before it is dropped).
        unsafe { &*TLS_DTOR.load(Ordering::SeqCst) }.run();
    }
}

thread_local! {
    static ON_EXIT: std::cell::RefCell<Option<CallsOnDrop>> = const { std::cell::RefCell::new(None) };
}

#[test]
fn calls_from_a_thread_local_destructor_return_codes() {
    let _shared = shared_lock();
    let (holder, srv) = server_freed_elsewhere();
    let results = DtorResults::new(srv);
    TLS_DTOR.store(&results as *const DtorResults as *mut DtorResults, Ordering::SeqCst);
    let srv_addr = srv as usize;
    std::thread::spawn(move || {
        // Ours first, the library's thread-locals after: at exit the library's
        // are destroyed before ours runs.
        ON_EXIT.with(|d| *d.borrow_mut() = Some(CallsOnDrop));
        // SAFETY: srv is live.
        assert_eq!(unsafe { tf_send(srv_addr as *mut tf_server, 12_345, b"x".as_ptr(), 1) }, TF_ERR_NO_CONN);
        assert!(!last_error().is_empty());
    })
    .join()
    .expect("the thread exits normally");
    results.check(&holder);
}

static KEY_DTOR: AtomicPtr<DtorResults> = AtomicPtr::new(std::ptr::null_mut());

unsafe extern "C" fn key_destructor(_: *mut libc::c_void) {
    // SAFETY: the DtorResults outlives the thread (joined before it is dropped).
    unsafe { &*KEY_DTOR.load(Ordering::SeqCst) }.run();
}

#[test]
fn calls_from_a_pthread_key_destructor_return_codes() {
    let _shared = shared_lock();
    // tlsdtor.c: pthread key destructors run after every thread-local is gone.
    let (holder, srv) = server_freed_elsewhere();
    let results = DtorResults::new(srv);
    KEY_DTOR.store(&results as *const DtorResults as *mut DtorResults, Ordering::SeqCst);
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: a live key and a destructor of the right signature.
    assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(key_destructor)) }, 0);
    let srv_addr = srv as usize;
    std::thread::spawn(move || {
        // SAFETY: key is live; a non-NULL value makes the destructor run.
        unsafe { libc::pthread_setspecific(key, 1 as *const libc::c_void) };
        // SAFETY: srv is live.
        assert_eq!(unsafe { tf_send(srv_addr as *mut tf_server, 12_345, b"x".as_ptr(), 1) }, TF_ERR_NO_CONN);
        assert!(!last_error().is_empty());
    })
    .join()
    .expect("the thread exits normally");
    // SAFETY: the key is ours and no thread uses it any more.
    unsafe { libc::pthread_key_delete(key) };
    results.check(&holder);
}

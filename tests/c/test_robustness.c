/* test_robustness: regression tests, over real sockets on 127.0.0.1, for the
 * lifecycle defects of the adversarial review (../shared/repro): freeing from
 * callbacks, thread-exit destructors, fork/_Fork/clone children, close reasons,
 * the close timeout and tf_conn_abort. Time, fairness, pull-mode backpressure,
 * descriptor and memory cases are in test_robustness_load.c.
 *
 *   TF_TEST_BACKEND=poll|epoll test_robustness [--list] [NAME...]
 *
 * One line per test ("ok"/"FAIL"), a summary, exit status 0 only if all passed. */
#include "robust.h"

#include <sys/syscall.h>

extern pid_t _Fork(void); /* glibc >= 2.34: fork without atfork handlers */

/* ---- freeing from callbacks (xfree.c, repro_cross_free.c, selffree.c) ------------ */

struct bdata {
    int magic;
    char pad[60];
};

static struct {
    tf_server *a, *b;
    struct bdata *bud;
    int b_entered, b_finished, b_magic, b_closes, b_close_magic, b_late;
    int32_t b_send_rc, b_close_reason;
    double b_finished_at, free_returned_at;
    int b_finished_when_free_returned, free_returned, a_done;
} X;

static void x_b_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    struct bdata *u = ud;
    (void)d, (void)n;
    LOCKED(X.b_entered = 1);
    sleep_ms(300); /* A's callback frees B meanwhile */
    int m = u->magic;
    memset(u->pad, 'x', sizeof u->pad); /* B's user data, still ours until free returns */
    int32_t rc = tf_send(X.b, c, (const uint8_t *)"late", 4);
    LOCKED(X.b_magic = m; X.b_send_rc = rc; X.b_finished = 1; X.b_finished_at = now_ms());
}

static void x_b_close(void *ud, tf_conn_id c, int32_t reason) {
    struct bdata *u = ud;
    (void)c;
    int m = u->magic; /* after the free returned, this would be a use-after-free */
    LOCKED(X.b_closes++; X.b_close_magic = m; X.b_close_reason = reason;
           if (X.free_returned) X.b_late++);
}

static void x_a_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    int ok;
    (void)ud, (void)c, (void)d, (void)n;
    WAIT_FOR(X.b_entered, 2000, ok);
    (void)ok;
    tf_server_free(X.b);
    LOCKED(X.free_returned_at = now_ms(); X.b_finished_when_free_returned = X.b_finished;
           X.free_returned = 1);
    free(X.bud); /* the contract: once free returns, B's user data may go */
    LOCKED(X.a_done = 1);
}

static void test_free_from_other_servers_callback_waits(void) {
    int fa = -1, fb = -1, ok;
    uint16_t port_b = 0;
    memset(&X, 0, sizeof X);
    X.bud = calloc(1, sizeof *X.bud);
    X.bud->magic = 4242;
    tf_callbacks ca = {NULL, NULL, x_a_message, NULL};
    tf_callbacks cb = {X.bud, NULL, x_b_message, x_b_close};
    REQUIRE(start_cb(NULL, &ca, &X.a) && start_cb(NULL, &cb, &X.b));
    port_b = tf_server_port(X.b);
    REQUIRE((fb = cli_connect(port_b)) >= 0 && (fa = cli_connect(tf_server_port(X.a))) >= 0);
    REQUIRE(send_frame(fb, "x", 1) == 0);
    WAIT_FOR(X.b_entered, SC(3000), ok);
    REQUIRE(ok);
    REQUIRE(send_frame(fa, "y", 1) == 0); /* A's callback: tf_server_free(B) */
    WAIT_FOR(X.a_done, SC(5000), ok);
    REQUIRE(ok);
    CHECKF(X.b_finished_when_free_returned,
           "tf_server_free(B) returned while B's on_message was still running");
    CHECKF(X.b_finished_at <= X.free_returned_at, "B's callback ended %.1f ms after free returned",
           X.b_finished_at - X.free_returned_at);
    CHECK(X.b_magic == 4242);
    CHECKF(X.b_send_rc == TF_OK || X.b_send_rc == TF_ERR_STOPPED, "tf_send in B = %d",
           (int)X.b_send_rc);
    /* B's open connection got on_close(SHUTDOWN) before the free returned, none after. */
    CHECKF(X.b_closes == 1 && X.b_close_reason == TF_CLOSE_SHUTDOWN, "closes %d reason %d",
           X.b_closes, (int)X.b_close_reason);
    CHECK(X.b_close_magic == 4242);
    CHECK(port_refuses(port_b, SC(1000)));
    CHECK(peer_end(fb, SC(2000)) != 0);
    sleep_ms(100);
    LOCKED(ok = X.b_late);
    CHECK(ok == 0);
    tf_stats st;
    CHECK_RC(tf_server_stats(X.a, &st), TF_OK); /* A is still alive */
done:
    tf_server_free(X.a);
    if (!X.free_returned && X.b && !X.b_entered)
        tf_server_free(X.b);
    close_fd(&fa);
    close_fd(&fb);
}

static struct {
    tf_server *a, *b;
    int32_t stop_b_rc, stop_a_rc;
    char err[256];
    int done;
} O;

static void o_a_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)ud, (void)c, (void)d, (void)n;
    int32_t rb = tf_server_stop(O.b, 0);
    char err[256];
    snprintf(err, sizeof err, "%s", tf_last_error());
    int32_t ra = tf_server_stop(O.a, 0);
    LOCKED(O.stop_b_rc = rb; O.stop_a_rc = ra; snprintf(O.err, sizeof O.err, "%s", err);
           O.done = 1);
}

static void test_stop_other_server_from_callback_is_invalid(void) {
    struct host hb;
    int fa = -1, fb = -1, ok;
    memset(&O, 0, sizeof O);
    memset(&hb, 0, sizeof hb);
    hb.echo = 1;
    tf_callbacks ca = {NULL, NULL, o_a_message, NULL};
    REQUIRE(start_cb(NULL, &ca, &O.a) && (O.b = host_start(&hb, NULL)) != NULL);
    REQUIRE((fa = cli_connect(tf_server_port(O.a))) >= 0);
    REQUIRE((fb = cli_connect(tf_server_port(O.b))) >= 0);
    REQUIRE(send_frame(fa, "stop B", 6) == 0);
    WAIT_FOR(O.done, SC(3000), ok);
    REQUIRE(ok);
    CHECKF(O.stop_b_rc == TF_ERR_INVALID, "tf_server_stop(B) from A's callback = %d",
           (int)O.stop_b_rc);
    CHECK(O.err[0] != '\0');
    CHECK(O.stop_a_rc == TF_ERR_INVALID);
    CHECK(echo_ok(fb, "B still serves")); /* nothing was stopped */
    CHECK_RC(tf_server_stop(O.b, 0), TF_OK); /* and from the main thread it works */
    CHECK_RC(tf_server_stop(O.a, 0), TF_OK);
done:
    tf_server_free(O.a);
    tf_server_free(O.b);
    close_fd(&fa);
    close_fd(&fb);
}

static struct {
    tf_server *srv[2];
    int in[2], ret[2], late, closes[2];
} M;

static int m_both_returned(void) { return M.ret[0] && M.ret[1]; }

static void m_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    int i = ud == &M.in[0] ? 0 : 1, ok;
    (void)c, (void)d, (void)n;
    LOCKED(if (m_both_returned()) M.late++; M.in[i] = 1);
    WAIT_FOR(M.in[1 - i], 2000, ok); /* both inside a callback at once */
    (void)ok;
    tf_server_free(M.srv[1 - i]);
    LOCKED(M.ret[i] = 1);
}

static int m_connect(void *ud, tf_conn_id c, const char *p) {
    (void)ud, (void)c, (void)p;
    LOCKED(if (m_both_returned()) M.late++);
    return 0;
}

static void m_close(void *ud, tf_conn_id c, int32_t r) {
    (void)c, (void)r;
    LOCKED(if (m_both_returned()) M.late++; M.closes[ud == &M.in[0] ? 0 : 1]++);
}

static void test_two_servers_freeing_each_other_do_not_deadlock(void) {
    int f[2] = {-1, -1}, ok;
    uint16_t port[2] = {0, 0};
    memset(&M, 0, sizeof M);
    for (int i = 0; i < 2; i++) {
        tf_callbacks cb = {&M.in[i], m_connect, m_message, m_close};
        REQUIRE(start_cb(NULL, &cb, &M.srv[i]));
        port[i] = tf_server_port(M.srv[i]);
        REQUIRE((f[i] = cli_connect(port[i])) >= 0);
    }
    REQUIRE(send_frame(f[0], "a", 1) == 0 && send_frame(f[1], "b", 1) == 0);
    WAIT_FOR(m_both_returned(), SC(5000), ok);
    REQUIRE(ok); /* else: a deadlock (the alarm ends the program) */
    for (int i = 0; i < 2; i++) {
        CHECKF(port_refuses(port[i], SC(2000)), "server %d still accepts", i);
        CHECKF(peer_end(f[i], SC(2000)) != 0, "server %d's connection still open", i);
    }
    sleep_ms(200);
    LOCKED(ok = M.late);
    CHECKF(ok == 0, "%d callbacks ran after both frees returned", ok);
done:
    /* Both servers were freed by each other (or the test failed before: then
     * leave them; the process ends anyway). */
    if (!m_both_returned()) {
        if (M.srv[0] && !M.in[0] && !M.in[1]) {
            tf_server_free(M.srv[0]);
            tf_server_free(M.srv[1]);
        }
    }
    close_fd(&f[0]);
    close_fd(&f[1]);
}

static struct {
    tf_server *srv;
    int connects, messages, closes, freed, late;
    double free_ms;
} S;

static int s_connect(void *ud, tf_conn_id c, const char *p) {
    (void)ud, (void)c, (void)p;
    LOCKED(S.connects++; if (S.freed) S.late++);
    return 0;
}

static void s_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    int first;
    (void)ud, (void)c, (void)d, (void)n;
    LOCKED(first = S.messages++ == 0; if (!first) S.late++);
    if (!first)
        return;
    double t = now_ms();
    tf_server_free(S.srv);
    LOCKED(S.free_ms = now_ms() - t; S.freed = 1);
    sleep_ms(20); /* still inside the callback: nothing else of this server runs */
}

static void s_close(void *ud, tf_conn_id c, int32_t r) {
    (void)ud, (void)c, (void)r;
    LOCKED(S.closes++; if (S.freed) S.late++);
}

static void test_free_from_own_callback_returns_at_once(void) {
    int fd[4] = {-1, -1, -1, -1}, ok;
    uint16_t port = 0;
    memset(&S, 0, sizeof S);
    tf_callbacks cb = {NULL, s_connect, s_message, s_close};
    REQUIRE(start_cb(NULL, &cb, &S.srv));
    port = tf_server_port(S.srv);
    for (int i = 0; i < 3; i++)
        REQUIRE((fd[i] = cli_connect(port)) >= 0);
    WAIT_FOR(S.connects == 3, SC(3000), ok);
    REQUIRE(ok);
    /* Two frames at once: the first callback frees, the second must never run. */
    REQUIRE(send_frame(fd[0], "bye", 3) == 0 && send_frame(fd[1], "late", 4) == 0);
    WAIT_FOR(S.freed, SC(3000), ok);
    REQUIRE(ok);
    CHECKF(S.free_ms < SC(500), "tf_server_free(own) took %.0f ms", S.free_ms);
    fd[3] = cli_connect(port); /* may still reach the backlog: no on_connect for it */
    (void)send_frame(fd[2], "more", 4);
    CHECKF(port_refuses(port, SC(2500)), "the freed server's port still accepts");
    for (int i = 0; i < 4; i++)
        if (fd[i] >= 0)
            CHECKF(peer_end(fd[i], SC(2500)) != 0, "connection %d still open", i);
    sleep_ms(100);
    LOCKED(ok = S.late);
    CHECKF(ok == 0, "%d callbacks ran after tf_server_free(own) returned", ok);
    CHECKF(S.closes == 0, "on_close ran %d times", S.closes);
    CHECK(S.messages == 1);
done:
    for (int i = 0; i < 4; i++)
        close_fd(&fd[i]);
}

/* ---- calls from thread-exit destructors (tlsdtor.c) ----------------------------- */

static struct {
    pthread_key_t key;
    int mode;
    tf_server *srv;
    struct host h;
    int32_t worker_rc, rc[3];
    int err_null, ran, closes_when_freed;
} T;

static void t_dtor(void *p) {
    (void)p;
    if (T.mode == 0) {
        tf_stats st;
        T.rc[0] = tf_send(NULL, 1, NULL, 0);
        T.err_null = tf_last_error() == NULL;
        T.rc[1] = tf_send(T.srv, 12345, (const uint8_t *)"x", 1);
        T.rc[2] = tf_server_stats(T.srv, &st);
    } else {
        tf_server_free(T.srv);
        LOCKED(T.closes_when_freed = T.h.closes);
    }
    T.ran = 1;
}

static void *t_worker(void *p) {
    (void)p;
    pthread_setspecific(T.key, (void *)1);
    /* Use the library on this thread first: its thread-locals exist, and are
     * destroyed before the key destructor runs. */
    T.worker_rc = tf_send(T.srv, 12345, (const uint8_t *)"x", 1);
    (void)tf_last_error();
    return NULL;
}

static int is_code(int32_t rc) { return rc >= TF_OK && rc <= TF_ERR_INTERNAL; }

static void tls_case(int mode) {
    pthread_t t;
    int fd = -1, ok;
    uint16_t port = 0;
    memset(&T.h, 0, sizeof T.h);
    T.mode = mode, T.ran = 0, T.err_null = 0, T.closes_when_freed = -1;
    REQUIRE(pthread_key_create(&T.key, t_dtor) == 0);
    REQUIRE((T.srv = host_start(&T.h, NULL)) != NULL);
    port = tf_server_port(T.srv);
    REQUIRE((fd = cli_connect(port)) >= 0);
    WAIT_FOR(T.h.connects == 1, SC(3000), ok);
    REQUIRE(ok);
    REQUIRE(pthread_create(&t, NULL, t_worker, NULL) == 0);
    pthread_join(t, NULL); /* the process is still alive: no abort in the destructor */
    CHECK(T.ran);
    CHECK(T.worker_rc == TF_ERR_NO_CONN);
    if (mode == 0) {
        CHECKF(T.rc[0] == TF_ERR_INVALID || T.rc[0] == TF_ERR_INTERNAL, "tf_send(NULL) = %d",
               (int)T.rc[0]);
        CHECKF(T.rc[1] == TF_ERR_NO_CONN || T.rc[1] == TF_ERR_INTERNAL, "tf_send(unknown) = %d",
               (int)T.rc[1]);
        CHECKF(is_code(T.rc[2]), "tf_server_stats = %d", (int)T.rc[2]);
        CHECK(!T.err_null);
        printf("    from the destructor: tf_send(NULL) %d, tf_send(unknown) %d, stats %d\n",
               (int)T.rc[0], (int)T.rc[1], (int)T.rc[2]);
        tf_server_free(T.srv);
    } else {
        /* tf_server_free worked there: the connection was closed (SHUTDOWN) before
         * it returned, and the port no longer accepts. */
        CHECKF(T.closes_when_freed == 1, "on_close calls when free returned: %d",
               T.closes_when_freed);
        CHECK(host_reason(&T.h, T.h.conn[0]) == TF_CLOSE_SHUTDOWN);
        CHECK(port_refuses(port, SC(1000)));
        CHECK(peer_end(fd, SC(2000)) != 0);
    }
    T.srv = NULL;
done:
    if (T.srv && !T.ran)
        tf_server_free(T.srv);
    pthread_key_delete(T.key);
    close_fd(&fd);
}

static void test_calls_in_thread_key_destructor_return_codes(void) { tls_case(0); }
static void test_server_free_in_thread_key_destructor_works(void) { tls_case(1); }

/* ---- children: _Fork(), fork() in a callback, clone() (forkbypass.c, forkcb.c) -------- */

enum {
    K_SEND = 1, K_CLOSE = 2, K_STATS = 4, K_STOP = 8, K_MSG = 16, K_PORT = 32, K_ABORT = 64,
    K_START = 128, K_OWN_ECHO = 256, K_OWN_STOP = 512
};

/* In a child: every call on the parent's server is TF_ERR_STOPPED, saying fork. */
static int child_checks(tf_server *srv, tf_conn_id id) {
    int bad = 0;
    tf_stats st;
    if (tf_send(srv, id, (const uint8_t *)"c", 1) != TF_ERR_STOPPED)
        bad |= K_SEND;
    if (!contains_nocase(tf_last_error(), "fork"))
        bad |= K_MSG;
    if (tf_conn_close(srv, id) != TF_ERR_STOPPED)
        bad |= K_CLOSE;
    if (tf_conn_abort(srv, id) != TF_ERR_STOPPED)
        bad |= K_ABORT;
    if (tf_server_stats(srv, &st) != TF_ERR_STOPPED)
        bad |= K_STATS;
    if (tf_server_port(srv) != 0)
        bad |= K_PORT;
    if (tf_server_stop(srv, 0) != TF_ERR_STOPPED)
        bad |= K_STOP;
    tf_server_free(srv); /* frees nothing of the parent's; must return */
    return bad;
}

/* Waits (bounded) for a child; returns its exit code, or -signal, or -999 (hung: killed). */
static int reap(pid_t pid, int ms) {
    double end = now_ms() + ms;
    int st;
    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
        if (r < 0 || now_ms() >= end) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return -999;
        }
        sleep_ms(5);
    }
}

/* In a child: reports the K_* bits through the pipe, exits. */
static void child_report(int fd, int bad) {
    (void)!write(fd, &bad, sizeof bad);
    _exit(0);
}

/* In the parent: the child's K_* bits (>= 0), or -signal / -999 (hung) / -1000
 * (exited without a report). */
static int child_result(pid_t pid, int p[2], int ms) {
    int bad = -1;
    close_fd(&p[1]);
    int code = reap(pid, ms);
    if (read(p[0], &bad, sizeof bad) != (ssize_t)sizeof bad)
        bad = -1;
    close_fd(&p[0]);
    return code < 0 ? code : bad < 0 ? -1000 : bad;
}

static void report_child(const char *what, int code) {
    if (code == 0)
        return;
    if (code == -999 || code == -SIGALRM)
        check_failed(__FILE__, __LINE__, "%s: the child hung (killed)", what);
    else if (code == -1000)
        check_failed(__FILE__, __LINE__, "%s: the child exited without a report", what);
    else if (code < 0)
        check_failed(__FILE__, __LINE__, "%s: the child died of signal %d", what, -code);
    else
        check_failed(__FILE__, __LINE__, "%s: broken in the child (bits 0x%x: 1 send, 2 close, "
                     "4 stats, 8 stop, 16 message, 32 port, 64 abort, 128 start, 256 own echo, "
                     "512 own stop)", what, code);
}

static void test_fork_without_atfork_child_gets_stopped(void) {
    struct host h;
    int fd = -1, ok, p[2] = {-1, -1};
    memset(&h, 0, sizeof h);
    h.echo = 1;
    REQUIRE(host_start(&h, NULL));
    REQUIRE((fd = cli_connect(tf_server_port(h.srv))) >= 0);
    WAIT_FOR(h.connects == 1, SC(3000), ok);
    REQUIRE(ok && echo_ok(fd, "before") && pipe(p) == 0);
    fflush(NULL);
    pid_t pid = _Fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        signal(SIGALRM, SIG_DFL);
        alarm(3);
        child_report(p[1], child_checks(h.srv, h.conn[0]));
    }
    report_child("_Fork", child_result(pid, p, SC(5000)));
    CHECK(echo_ok(fd, "parent unharmed"));
done:
    tf_server_free(h.srv);
    close_fd(&fd);
    close_fd(&p[0]);
    close_fd(&p[1]);
}

static void test_clone_without_vm_child_gets_stopped(void) {
    struct host h;
    int fd = -1, ok, p[2] = {-1, -1};
    memset(&h, 0, sizeof h);
    h.echo = 1;
    REQUIRE(host_start(&h, NULL));
    REQUIRE((fd = cli_connect(tf_server_port(h.srv))) >= 0);
    WAIT_FOR(h.connects == 1, SC(3000), ok);
    REQUIRE(ok && pipe(p) == 0);
    fflush(NULL);
    /* A raw clone() without CLONE_VM: a fork that libc knows nothing about. */
    pid_t pid = (pid_t)syscall(SYS_clone, (long)SIGCHLD, 0L, 0L, 0L, 0L);
    REQUIRE(pid >= 0);
    if (pid == 0) {
        signal(SIGALRM, SIG_DFL);
        alarm(3);
        child_report(p[1], child_checks(h.srv, h.conn[0]));
    }
    report_child("clone", child_result(pid, p, SC(5000)));
    CHECK(echo_ok(fd, "parent unharmed"));
done:
    tf_server_free(h.srv);
    close_fd(&fd);
    close_fd(&p[0]);
    close_fd(&p[1]);
}

static struct {
    tf_server *parent, *mine;
    int code, done;
} F;

static void f_child_echo(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)ud;
    (void)tf_send(F.mine, c, d, n);
}

static void f_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    int p[2] = {-1, -1}, code;
    (void)ud, (void)d, (void)n;
    fflush(NULL);
    pid_t pid = pipe(p) == 0 ? fork() : -1; /* from inside a callback, on the loop thread */
    if (pid == 0) {
        int bad = 0, fd;
        signal(SIGALRM, SIG_DFL);
        alarm(5);
        tf_callbacks cb = {NULL, NULL, f_child_echo, NULL};
        if (!start_cb(NULL, &cb, &F.mine))
            child_report(p[1], K_START);
        fd = cli_connect(tf_server_port(F.mine));
        if (fd < 0 || !echo_ok(fd, "child's own server"))
            bad |= K_OWN_ECHO;
        if (tf_server_stop(F.mine, 0) != TF_OK) /* not "inside a callback": TF_OK */
            bad |= K_OWN_STOP;
        tf_server_free(F.mine);
        child_report(p[1], bad | child_checks(F.parent, c));
    }
    code = pid < 0 ? -2000 : child_result(pid, p, SC(8000));
    if (pid < 0) {
        close_fd(&p[0]);
        close_fd(&p[1]);
    }
    LOCKED(F.code = code; F.done = 1);
}

static void test_fork_in_callback_child_runs_own_server(void) {
    int fd = -1, ok;
    memset(&F, 0, sizeof F);
    tf_callbacks cb = {NULL, NULL, f_message, NULL};
    REQUIRE(start_cb(NULL, &cb, &F.parent));
    REQUIRE((fd = cli_connect(tf_server_port(F.parent))) >= 0);
    REQUIRE(send_frame(fd, "fork", 4) == 0);
    WAIT_FOR(F.done, SC(10000), ok);
    REQUIRE(ok);
    CHECK(F.code != -2000); /* pipe or fork failed */
    report_child("fork() in on_message", F.code);
    tf_stats st;
    CHECK_RC(tf_server_stats(F.parent, &st), TF_OK);
    CHECK(st.frames_received == 1 && st.connections_active == 1);
done:
    tf_server_free(F.parent);
    close_fd(&fd);
}

/* ---- close reasons, close timeout, abort (closereason.c, close_linger.py) -------- */

static struct {
    tf_server *srv;
    tf_conn_id z, y;
    int32_t close_rc, abort_rc, send_rc;
    int done;
} CR;

static void cr_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)d, (void)n;
    if (c == CR.z) {
        sleep_ms(300); /* holds the loop while Y and X get ready */
        return;
    }
    int32_t rc = tf_conn_close(CR.srv, CR.y); /* X's message: Y is already closing */
    int32_t ra = tf_conn_abort(CR.srv, CR.y);
    int32_t rs = tf_send(CR.srv, CR.y, (const uint8_t *)"y", 1);
    LOCKED(CR.close_rc = rc; CR.abort_rc = ra; CR.send_rc = rs; CR.done = 1);
    host_on_message(ud, c, d, n);
}

static void test_conn_close_on_conn_closing_as_too_large_is_no_conn(void) {
    struct host h;
    int z = -1, y = -1, x = -1, ok;
    static const uint8_t bad[4] = {0xff, 0xff, 0xff, 0xff};
    memset(&h, 0, sizeof h);
    memset(&CR, 0, sizeof CR);
    tf_callbacks cb = {&h, host_on_connect, cr_message, host_on_close};
    tf_config *cfg = cfg_new();
    REQUIRE(cfg && tf_config_set_max_frame(cfg, 1024) == TF_OK);
    REQUIRE(start_cb(cfg, &cb, &CR.srv));
    tf_config_free(cfg);
    cfg = NULL;
    h.srv = CR.srv;
    uint16_t port = tf_server_port(CR.srv);
    REQUIRE((z = cli_connect(port)) >= 0 && (y = cli_connect(port)) >= 0 &&
            (x = cli_connect(port)) >= 0);
    WAIT_FOR(h.connects == 3, SC(3000), ok);
    REQUIRE(ok);
    CR.z = h.conn[0], CR.y = h.conn[1];
    REQUIRE(send_frame(z, "z", 1) == 0);
    sleep_ms(50);
    REQUIRE(send_all(y, bad, 4) == 0); /* over max frame: Y closes as TOO_LARGE */
    sleep_ms(50);
    REQUIRE(send_frame(x, "x", 1) == 0); /* X's callback calls tf_conn_close(Y) */
    WAIT_FOR(CR.done && reason_of(&h, CR.y) >= 0, SC(3000), ok);
    REQUIRE(ok);
    CHECK_RC(CR.close_rc, TF_ERR_NO_CONN);
    CHECK_RC(CR.abort_rc, TF_ERR_NO_CONN);
    CHECK_RC(CR.send_rc, TF_ERR_NO_CONN);
    CHECKF(host_reason(&h, CR.y) == TF_CLOSE_TOO_LARGE, "on_close(Y) reason %d",
           (int)host_reason(&h, CR.y));
    CHECK(peer_end(y, SC(2000)) != 0);
done:
    tf_config_free(cfg);
    tf_server_free(CR.srv);
    close_fd(&x);
    close_fd(&y);
    close_fd(&z);
}

#define NEVER_READERS 4

static void test_close_timeout_resets_peers_that_never_read(void) {
    struct host h;
    int fd[NEVER_READERS], ok;
    uint8_t *blob = calloc(1, 64 * 1024);
    for (int i = 0; i < NEVER_READERS; i++)
        fd[i] = -1;
    memset(&h, 0, sizeof h);
    tf_config *cfg = cfg_new();
    REQUIRE(blob && cfg && tf_config_set_close_timeout_ms(cfg, 300) == TF_OK);
    /* More than the kernel takes from a peer that never reads (about 3 MB). */
    REQUIRE(tf_config_set_max_queued_output(cfg, 8u << 20) == TF_OK);
    REQUIRE(host_start(&h, cfg));
    for (int i = 0; i < NEVER_READERS; i++)
        REQUIRE((fd[i] = cli_connect_rcvbuf(tf_server_port(h.srv), 4096)) >= 0);
    WAIT_FOR(h.connects == NEVER_READERS, SC(3000), ok);
    REQUIRE(ok);
    for (int i = 0; i < NEVER_READERS; i++) {
        int32_t rc;
        size_t q = fill_queue(h.srv, h.conn[i], blob, 64 * 1024, &rc);
        CHECK(rc == TF_ERR_FULL && q >= (6u << 20));
    }
    double t0 = now_ms();
    for (int i = 0; i < NEVER_READERS; i++)
        CHECK_RC(tf_conn_close(h.srv, h.conn[i]), TF_OK);
    sleep_ms(100);
    LOCKED(ok = h.closes);
    CHECKF(ok == 0, "on_close before the close timeout: %d", ok); /* they wait for output */
    WAIT_FOR(h.closes == NEVER_READERS, SC(2000), ok);
    CHECKF(ok, "on_close calls %d of %d, %.0f ms after tf_conn_close (close timeout 300 ms)",
           h.closes, NEVER_READERS, now_ms() - t0);
    for (int i = 0; i < h.closes && i < NEVER_READERS; i++)
        CHECK(h.reason[i] == TF_CLOSE_LOCAL);
    CHECK(wait_active(h.srv, 0, SC(1000)));
    for (int i = 0; i < NEVER_READERS; i++)
        CHECK(peer_end(fd[i], SC(3000)) != 0);
done:
    tf_server_free(h.srv);
    for (int i = 0; i < NEVER_READERS; i++)
        close_fd(&fd[i]);
    free(blob);
}

static void test_abort_after_close_resets_at_once(void) {
    struct host h;
    int fd = -1, ok;
    uint8_t *blob = calloc(1, 64 * 1024);
    memset(&h, 0, sizeof h);
    tf_config *cfg = cfg_new();
    REQUIRE(blob && cfg && tf_config_set_max_queued_output(cfg, 8u << 20) == TF_OK);
    REQUIRE(host_start(&h, cfg)); /* default close timeout: 10 s */
    REQUIRE((fd = cli_connect_rcvbuf(tf_server_port(h.srv), 4096)) >= 0);
    WAIT_FOR(h.connects == 1, SC(3000), ok);
    REQUIRE(ok);
    int32_t rc;
    (void)fill_queue(h.srv, h.conn[0], blob, 64 * 1024, &rc);
    CHECK(rc == TF_ERR_FULL);
    CHECK_RC(tf_conn_close(h.srv, h.conn[0]), TF_OK);
    sleep_ms(200);
    LOCKED(ok = h.closes);
    CHECKF(ok == 0, "on_close ran before the abort (the queue was written?)"); /* lingering */
    double t0 = now_ms();
    CHECK_RC(tf_conn_abort(h.srv, h.conn[0]), TF_OK);
    WAIT_FOR(h.closes == 1, SC(1000), ok);
    CHECKF(ok, "no on_close %.0f ms after tf_conn_abort", now_ms() - t0);
    CHECK(host_reason(&h, h.conn[0]) == TF_CLOSE_LOCAL);
    CHECK(wait_active(h.srv, 0, SC(1000)));
    int end = peer_end(fd, SC(2000));
    CHECKF(end == 2, "the peer saw %s, want a reset (ECONNRESET)",
           end == 1 ? "EOF" : end == 0 ? "nothing" : "another error");
    CHECK_RC(tf_conn_abort(h.srv, h.conn[0]), TF_ERR_NO_CONN);
done:
    tf_server_free(h.srv);
    close_fd(&fd);
    free(blob);
}

static void test_abort_open_conn_with_queued_output(void) {
    struct host h;
    int fd = -1, fd2 = -1, ok;
    uint8_t *blob = calloc(1, 64 * 1024);
    memset(&h, 0, sizeof h);
    h.echo = 1;
    REQUIRE(blob && host_start(&h, NULL));
    REQUIRE((fd = cli_connect_rcvbuf(tf_server_port(h.srv), 4096)) >= 0);
    REQUIRE((fd2 = cli_connect(tf_server_port(h.srv))) >= 0);
    WAIT_FOR(h.connects == 2, SC(3000), ok);
    REQUIRE(ok);
    for (int i = 0; i < 96; i++) /* 6 MiB queued: more than the socket takes */
        CHECK_RC(tf_send(h.srv, h.conn[0], blob, 64 * 1024), TF_OK);
    sleep_ms(50);
    CHECK_RC(tf_conn_abort(h.srv, h.conn[0]), TF_OK);
    CHECK_RC(tf_send(h.srv, h.conn[0], blob, 1), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_close(h.srv, h.conn[0]), TF_ERR_NO_CONN);
    WAIT_FOR(h.closes == 1, SC(1000), ok);
    CHECK(ok);
    CHECK(host_reason(&h, h.conn[0]) == TF_CLOSE_LOCAL);
    CHECK(peer_end(fd, SC(2000)) == 2);
    CHECK_RC(tf_conn_abort(h.srv, h.conn[0]), TF_ERR_NO_CONN);
    CHECK(echo_ok(fd2, "the other connection goes on"));
done:
    tf_server_free(h.srv);
    close_fd(&fd);
    close_fd(&fd2);
    free(blob);
}

static void test_abort_codes_and_new_setters_validate(void) {
    struct host h;
    memset(&h, 0, sizeof h);
    tf_config *cfg = tf_config_new();
    REQUIRE(cfg);
    CHECK_RC(tf_config_set_close_timeout_ms(cfg, 0), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_max_buffered(cfg, 0), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_close_timeout_ms(NULL, 300), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_max_buffered(NULL, 1u << 20), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_close_timeout_ms(cfg, 1), TF_OK);
    CHECK_RC(tf_config_set_close_timeout_ms(cfg, UINT32_MAX), TF_OK);
    CHECK_RC(tf_config_set_max_buffered(cfg, 1), TF_OK);
    CHECK_RC(tf_config_set_max_buffered(cfg, UINT64_MAX), TF_OK);
    tf_config_free(cfg);
    REQUIRE(host_start(&h, NULL));
    CHECK_RC(tf_conn_abort(h.srv, 987654321u), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_abort(h.srv, 0), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_abort(NULL, 1), TF_ERR_INVALID);
    CHECK_RC(tf_server_stop(h.srv, 0), TF_OK);
    CHECK_RC(tf_conn_abort(h.srv, 1), TF_ERR_STOPPED);
    CHECK_RC(tf_conn_abort(h.srv, 987654321u), TF_ERR_STOPPED);
done:
    tf_server_free(h.srv);
}

static const struct test tests[] = {
    TEST(test_free_from_other_servers_callback_waits, 15, "va"),
    TEST(test_stop_other_server_from_callback_is_invalid, 10, "va"),
    TEST(test_two_servers_freeing_each_other_do_not_deadlock, 15, "va"),
    TEST(test_free_from_own_callback_returns_at_once, 15, "va"),
    TEST(test_calls_in_thread_key_destructor_return_codes, 10, "va"),
    TEST(test_server_free_in_thread_key_destructor_works, 10, "va"),
    TEST(test_fork_without_atfork_child_gets_stopped, 10, ""),
    TEST(test_clone_without_vm_child_gets_stopped, 10, ""),
    TEST(test_fork_in_callback_child_runs_own_server, 15, ""),
    TEST(test_conn_close_on_conn_closing_as_too_large_is_no_conn, 10, "va"),
    TEST(test_close_timeout_resets_peers_that_never_read, 15, "a"),
    TEST(test_abort_after_close_resets_at_once, 10, "va"),
    TEST(test_abort_open_conn_with_queued_output, 10, "va"),
    TEST(test_abort_codes_and_new_setters_validate, 10, "va"),
};

int main(int argc, char **argv) {
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}

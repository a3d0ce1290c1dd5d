/* test_robustness_load: regression tests, over real sockets on 127.0.0.1, for
 * the time, fairness, memory and descriptor defects of the adversarial review
 * (../shared/repro): idle deadlines after slow callbacks, a streaming peer
 * next to a ping-pong one, pull mode with a slow host, running out of
 * descriptors, the partial-frame budget and the memory of queued output.
 * Behaviour only: latency figures belong to the benchmarks.
 *
 *   TF_TEST_BACKEND=poll|epoll test_robustness_load [--list] [NAME...]
 *
 * Memory figures are read from /proc/self/status, so each memory test should
 * run in a process of its own (test_robustness.py runs every test that way). */
#include "robust.h"

#include <fcntl.h>

/* ---- time: idle deadlines from when things really happen (repro_idle_stale.c) ------- */

static tf_server *idle_server(struct host *h) {
    tf_config *cfg = cfg_new();
    memset(h, 0, sizeof *h);
    h->echo = 1;
    h->slow_ms = 800; /* the payload "slow" holds the loop this long */
    if (cfg == NULL || tf_config_set_idle_timeout_ms(cfg, 400) != TF_OK) {
        tf_config_free(cfg);
        return NULL;
    }
    return host_start(h, cfg);
}

static void test_slow_callback_does_not_make_active_conn_idle(void) {
    struct host h;
    int a = -1, c = -1, ok;
    REQUIRE(idle_server(&h));
    uint16_t port = tf_server_port(h.srv);
    REQUIRE((a = cli_connect(port)) >= 0 && (c = cli_connect(port)) >= 0);
    WAIT_FOR(h.connects == 2, SC(3000), ok);
    REQUIRE(ok);
    REQUIRE(send_frame(a, "slow", 4) == 0); /* the loop sleeps 800 ms in A's callback */
    sleep_ms(150);
    /* Both ready for the next iteration, whose first callback (A's) is slow again. */
    REQUIRE(send_frame(a, "slow", 4) == 0 && send_frame(c, "ping", 4) == 0);
    REQUIRE(expect_frame(c, "ping")); /* after A's second slow callback */
    sleep_ms(50);
    CHECKF(echo_ok(c, "ping 2"), "C was closed (reason %d) 50 ms after its frame was echoed "
           "(idle timeout 400 ms)", (int)host_reason(&h, h.conn[1]));
    CHECK(host_reason(&h, h.conn[1]) == -1);
    /* The idle timeout itself still works: a quiet C goes, as IDLE. */
    WAIT_FOR(h.closes >= 2, SC(3000), ok);
    CHECK(host_reason(&h, h.conn[1]) == TF_CLOSE_IDLE);
done:
    tf_server_free(h.srv);
    close_fd(&a);
    close_fd(&c);
}

static void test_conn_accepted_after_slow_callback_gets_full_idle_timeout(void) {
    struct host h;
    int a = -1, b = -1, ok;
    REQUIRE(idle_server(&h));
    uint16_t port = tf_server_port(h.srv);
    REQUIRE((a = cli_connect(port)) >= 0);
    WAIT_FOR(h.connects == 1, SC(3000), ok);
    REQUIRE(ok);
    REQUIRE(send_frame(a, "slow", 4) == 0);
    sleep_ms(150);
    /* A's second slow frame and B's connection are ready at the same wait: B is
     * accepted after an 800 ms callback in that iteration. */
    REQUIRE(send_frame(a, "slow", 4) == 0);
    REQUIRE((b = cli_connect(port)) >= 0);
    WAIT_FOR(h.connects == 2, SC(5000), ok);
    REQUIRE(ok);
    sleep_ms(100); /* well within its 400 ms */
    CHECKF(echo_ok(b, "ping"), "B was closed (reason %d) 100 ms after on_connect "
           "(idle timeout 400 ms)", (int)host_reason(&h, h.conn[1]));
    WAIT_FOR(reason_of(&h, h.conn[1]) >= 0, SC(3000), ok);
    CHECK(host_reason(&h, h.conn[1]) == TF_CLOSE_IDLE);
done:
    tf_server_free(h.srv);
    close_fd(&a);
    close_fd(&b);
}

/* ---- fairness (fair.c): a peer streaming tiny frames does not starve another -------- */

static struct {
    int fd;
    volatile int stop;
    long long sent, got;
} BL;

static void *bl_blast(void *p) {
    size_t fl = 5, n = (1u << 20) / fl;
    uint8_t *b = malloc(n * fl);
    (void)p;
    for (size_t i = 0; b && i < n; i++) {
        put_le32(b + i * fl, 1);
        b[i * fl + 4] = 'a';
    }
    while (b && !BL.stop) {
        ssize_t w = send(BL.fd, b, n * fl, MSG_NOSIGNAL);
        if (w <= 0)
            break;
        LOCKED(BL.sent += w);
    }
    free(b);
    return NULL;
}

static void *bl_drain(void *p) {
    char buf[65536];
    ssize_t n;
    (void)p;
    while (!BL.stop && (n = recv(BL.fd, buf, sizeof buf, 0)) > 0)
        LOCKED(BL.got += n);
    return NULL;
}

static void test_pingpong_is_served_while_another_conn_streams_tiny_frames(void) {
    enum { PINGS = 200 };
    struct host h;
    pthread_t t1, t2;
    int b = -1, ok, started = 0, answered = 0;
    long long sent0 = 0, sent1 = 0;
    memset(&h, 0, sizeof h);
    memset(&BL, 0, sizeof BL);
    BL.fd = -1;
    h.echo = 1;
    REQUIRE(host_start(&h, NULL));
    REQUIRE((BL.fd = cli_connect(tf_server_port(h.srv))) >= 0);
    REQUIRE(pthread_create(&t1, NULL, bl_blast, NULL) == 0);
    if (pthread_create(&t2, NULL, bl_drain, NULL) != 0) {
        BL.stop = 1;
        shutdown(BL.fd, SHUT_RDWR);
        pthread_join(t1, NULL);
        REQUIRE(0);
    }
    started = 1;
    WAIT_FOR(BL.got >= (1 << 20), SC(5000), ok); /* the stream is flowing both ways */
    REQUIRE(ok);
    REQUIRE((b = cli_connect(tf_server_port(h.srv))) >= 0);
    char ping[64];
    LOCKED(sent0 = BL.sent);
    double t0 = now_ms();
    for (int i = 0; i < PINGS; i++) {
        snprintf(ping, sizeof ping, "ping %d", i);
        if (!echo_ok(b, ping)) /* each reply bounded by SO_RCVTIMEO */
            break;
        answered++;
        sleep_ms(0.2);
    }
    double ms = now_ms() - t0;
    LOCKED(sent1 = BL.sent);
    printf("    %d of %d pings answered in %.0f ms while the other connection sent %.1f MB "
           "of 1-byte frames\n", answered, PINGS, ms, (double)(sent1 - sent0) / 1e6);
    CHECKF(answered == PINGS, "only %d of %d pings answered", answered, PINGS);
    CHECKF(sent1 - sent0 > 1000000, "the stream stalled: %lld bytes sent during the pings",
           sent1 - sent0);
    LOCKED(ok = h.closes);
    CHECK(ok == 0);
done:
    if (started) {
        BL.stop = 1;
        shutdown(BL.fd, SHUT_RDWR);
        pthread_join(t1, NULL);
        pthread_join(t2, NULL);
    }
    tf_server_free(h.srv);
    close_fd(&BL.fd);
    close_fd(&b);
}

/* ---- pull mode (pullstall.c, repro_pull_accept.c, repro_pull_idle.c, pullmisc.c) ----- */

static tf_event g_ev[8192];

static tf_server *pull_start(uint32_t idle_ms) {
    tf_config *cfg = cfg_new();
    tf_server *srv = NULL;
    if (cfg && idle_ms)
        tf_config_set_idle_timeout_ms(cfg, idle_ms);
    if (cfg == NULL || tf_server_start_pull(cfg, &srv) != TF_OK) {
        fprintf(stderr, "    tf_server_start_pull: %s\n", tf_last_error());
        srv = NULL;
    }
    tf_config_free(cfg);
    return srv;
}

struct tally {
    int connects, messages, closes, close_before_last_msg;
    int32_t reason;
};

/* One tf_server_poll; counts events. Returns the poll's code. */
static int32_t pull_once(tf_server *srv, int timeout_ms, struct tally *t, size_t *n) {
    int32_t rc = tf_server_poll(srv, g_ev, 8192, n, timeout_ms);
    for (size_t i = 0; rc == TF_OK && i < *n; i++) {
        if (g_ev[i].kind == TF_EVENT_CONNECT)
            t->connects++;
        else if (g_ev[i].kind == TF_EVENT_MESSAGE)
            t->messages++;
        else if (g_ev[i].kind == TF_EVENT_CLOSE)
            t->closes++, t->reason = g_ev[i].reason;
    }
    return rc;
}

static void test_pull_accepts_client_that_came_while_queue_full(void) {
    tf_server *srv = NULL;
    int c1 = -1, c2 = -1, c3 = -1;
    struct tally t;
    size_t n;
    static uint8_t zeros[4 * 5000]; /* 5000 empty frames: more than the 4096-event bound */
    memset(&t, 0, sizeof t);
    REQUIRE((srv = pull_start(0)) != NULL);
    uint16_t port = tf_server_port(srv);
    REQUIRE((c1 = cli_connect(port)) >= 0);
    REQUIRE(send_all(c1, zeros, sizeof zeros) == 0);
    sleep_ms(300);                  /* the queue is over its bound; c1 goes quiet */
    REQUIRE((c2 = cli_connect(port)) >= 0); /* arrives while the queue is full */
    sleep_ms(1500);                 /* the host is busy */
    do /* the host drains everything, without waiting */
        REQUIRE(pull_once(srv, 0, &t, &n) == TF_OK);
    while (n > 0);
    /* No other traffic: c2 must be accepted soon after the drain. */
    double end = now_ms() + SC(2000);
    while (t.connects < 2 && now_ms() < end)
        REQUIRE(pull_once(srv, 100, &t, &n) == TF_OK);
    CHECKF(t.connects == 2, "CONNECT events 2 s after the drain: %d (want c1 and c2)", t.connects);
    REQUIRE((c3 = cli_connect(port)) >= 0);
    end = now_ms() + SC(2000);
    while (t.connects < 3 && now_ms() < end)
        REQUIRE(pull_once(srv, 100, &t, &n) == TF_OK);
    CHECKF(t.connects == 3, "CONNECT events: %d (want 3)", t.connects);
    CHECKF(t.messages == 5000, "MESSAGE events: %d of 5000", t.messages);
    CHECK(t.closes == 0);
done:
    tf_server_free(srv);
    close_fd(&c1);
    close_fd(&c2);
    close_fd(&c3);
}

static struct {
    int fd;
    uint8_t *buf;
    size_t len;
    int rc;
} PS;

static void *ps_sender(void *p) {
    (void)p;
    PS.rc = send_all(PS.fd, PS.buf, PS.len);
    return NULL;
}

static void test_pull_slow_host_is_not_idleness(void) {
    enum { N = 20000, L = 10 };
    tf_server *srv = NULL;
    pthread_t th;
    int started = 0;
    struct tally t;
    size_t n;
    memset(&t, 0, sizeof t);
    memset(&PS, 0, sizeof PS);
    PS.fd = -1;
    PS.len = (size_t)N * (4 + L);
    REQUIRE((PS.buf = calloc(1, PS.len)) != NULL);
    for (size_t i = 0; i < N; i++)
        put_le32(PS.buf + i * (4 + L), L);
    REQUIRE((srv = pull_start(500)) != NULL);
    REQUIRE((PS.fd = cli_connect(tf_server_port(srv))) >= 0);
    REQUIRE(pthread_create(&th, NULL, ps_sender, NULL) == 0); /* may block: TCP backpressure */
    started = 1;
    sleep_ms(1300); /* the host is slow: longer than the idle timeout */
    double end = now_ms() + SC(10000);
    while (t.messages < N && t.closes == 0 && now_ms() < end)
        REQUIRE(pull_once(srv, 200, &t, &n) == TF_OK);
    CHECKF(t.messages == N, "frames delivered: %d of %d", t.messages, N);
    CHECKF(t.closes == 0, "the connection was closed (reason %d) while frames waited on the host",
           (int)t.reason);
done:
    if (started) {
        shutdown(PS.fd, SHUT_RDWR);
        pthread_join(th, NULL);
        CHECK(PS.rc == 0);
    }
    tf_server_free(srv);
    close_fd(&PS.fd);
    free(PS.buf);
}

static struct {
    tf_server *srv;
    int32_t rc;
    size_t n;
    double ms;
    int done;
} PB;

static void *pb_blocker(void *p) {
    (void)p;
    tf_event ev[4];
    size_t n = 99;
    double t = now_ms();
    int32_t rc = tf_server_poll(PB.srv, ev, 4, &n, 1500);
    LOCKED(PB.rc = rc; PB.n = n; PB.ms = now_ms() - t; PB.done = 1);
    return NULL;
}

static void test_pull_poll_timeout_0_never_waits(void) {
    pthread_t th;
    int started = 0;
    memset(&PB, 0, sizeof PB);
    REQUIRE((PB.srv = pull_start(0)) != NULL);
    REQUIRE(pthread_create(&th, NULL, pb_blocker, NULL) == 0);
    started = 1;
    sleep_ms(150); /* the other thread is inside tf_server_poll(…, 1500) */
    for (int i = 0; i < 3; i++) {
        tf_event ev[64];
        size_t n = 99;
        double t = now_ms();
        CHECK_RC(tf_server_poll(PB.srv, ev, 64, &n, 0), TF_OK);
        double ms = now_ms() - t;
        CHECKF(ms < SC(200), "tf_server_poll(timeout 0) took %.0f ms", ms);
        CHECK(n == 0);
        sleep_ms(50);
    }
    int blocked;
    LOCKED(blocked = !PB.done);
    CHECK(blocked); /* the test really overlapped the 1500 ms poll */
done:
    if (started) {
        pthread_join(th, NULL);
        CHECK(PB.rc == TF_OK && PB.n == 0);
    }
    tf_server_free(PB.srv);
}

static struct {
    int fd, rc;
} PO;

static void *po_pump(void *p) {
    size_t len = 4u << 20; /* 1,048,576 empty frames */
    uint8_t *zeros = calloc(1, len);
    (void)p;
    PO.rc = zeros ? send_all(PO.fd, zeros, len) : -1;
    free(zeros);
    return NULL;
}

/* pull_overshoot2.py: a connection resumed with a full socket buffer behind it
 * adds one read's worth, not everything the kernel holds. */
static void test_pull_queue_stays_bounded_after_resume(void) {
    enum { BOUND = 4096, ONE_READ = 65536 / 4 }; /* a 64 KiB read of empty frames */
    static tf_event evs[100000];
    static uint8_t zeros[4 * 5000];
    tf_server *srv = NULL;
    int a = -1, started = 0;
    size_t n = 0;
    pthread_t th;
    PO.fd = -1;
    REQUIRE((srv = pull_start(0)) != NULL);
    uint16_t port = tf_server_port(srv);
    REQUIRE((PO.fd = cli_connect(port)) >= 0);
    sleep_ms(100);
    REQUIRE((a = cli_connect(port)) >= 0 && send_all(a, zeros, sizeof zeros) == 0);
    sleep_ms(300); /* the queue is over its bound: reading pauses */
    int big = 4 << 20;
    (void)setsockopt(PO.fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    REQUIRE(pthread_create(&th, NULL, po_pump, NULL) == 0);
    started = 1;
    sleep_ms(500); /* B's frames pile up in the kernel while the loop is paused */
    REQUIRE(tf_server_poll(srv, evs, 1000, &n, 0) == TF_OK && n == 1000); /* room again */
    sleep_ms(400); /* the loop resumes and reads */
    REQUIRE(tf_server_poll(srv, evs, sizeof evs / sizeof evs[0], &n, 0) == TF_OK);
    printf("    events waiting after one resume: %zu (bound %d + one read, %d)\n", n, BOUND,
           ONE_READ);
    CHECKF(n <= BOUND + ONE_READ + 8, "%zu events waiting, more than %d + one read's %d", n, BOUND,
           ONE_READ);
    CHECK(n > BOUND - 1000); /* the loop did resume */
done:
    if (started) {
        shutdown(PO.fd, SHUT_RDWR);
        pthread_join(th, NULL);
    }
    tf_server_free(srv);
    close_fd(&a);
    close_fd(&PO.fd);
}

/* ---- running out of descriptors (nofile.c 6) ----------------------------------------- */

#define NOFILE_CLIENTS 8

static int highest_fd(void) {
    int hi = 2;
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    if (d == NULL)
        return 64;
    while ((e = readdir(d)) != NULL)
        if (atoi(e->d_name) > hi)
            hi = atoi(e->d_name);
    closedir(d);
    return hi; /* the directory's own descriptor included: harmless */
}

static int set_nofile(rlim_t soft, rlim_t hard) {
    struct rlimit rl = {soft, hard};
    return setrlimit(RLIMIT_NOFILE, &rl);
}

/* Starts h's server quietly under RLIMIT_NOFILE = lim; NULL when it cannot. */
static tf_server *start_with_nofile(struct host *h, struct logcap *lc, rlim_t lim, rlim_t hard) {
    tf_callbacks cb = {h, host_on_connect, host_on_message, host_on_close};
    tf_config *cfg = cfg_new();
    tf_server *srv = NULL;
    memset(lc, 0, sizeof *lc);
    if (cfg == NULL)
        return NULL;
    tf_config_set_log(cfg, logcap_fn, lc);
    if (set_nofile(lim, hard) == 0 && tf_server_start(cfg, &cb, &h->srv) == TF_OK)
        srv = h->srv;
    tf_config_free(cfg);
    return srv;
}

/* The client side, in a child process (it has descriptors to spare): connects,
 * sends a frame on each connection, says 'c', then reports how each ended. */
static void nofile_clients(uint16_t port, int out, struct rlimit orig) {
    int s[NOFILE_CLIENTS], counts[3] = {0, 0, 0}; /* echoed, closed (shed), no answer */
    signal(SIGALRM, SIG_DFL);
    alarm(30);
    setrlimit(RLIMIT_NOFILE, &orig);
    for (int i = 0; i < NOFILE_CLIENTS; i++) {
        s[i] = cli_connect(port); /* completes in the kernel's backlog */
        if (s[i] >= 0)
            (void)send_frame(s[i], "x", 1);
    }
    (void)!write(out, "c", 1);
    double end = now_ms() + SC(9000);
    for (int i = 0; i < NOFILE_CLIENTS; i++) {
        int left = (int)(end - now_ms());
        if (s[i] < 0) {
            counts[1]++;
            continue;
        }
        set_timeouts(s[i], left > 1 ? left : 1);
        uint8_t r[5];
        if (recv_all(s[i], r, 5) == 0 && r[0] == 1 && r[4] == 'x')
            counts[0]++;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            counts[2]++;
        else
            counts[1]++; /* EOF or reset: shed */
    }
    (void)!write(out, counts, sizeof counts);
    _exit(0);
}

static int read_bounded(int fd, void *buf, size_t len, int ms) {
    size_t got = 0;
    double end = now_ms() + ms;
    while (got < len) {
        struct pollfd p = {fd, POLLIN, 0};
        int left = (int)(end - now_ms());
        if (left <= 0 || poll(&p, 1, left) <= 0)
            return -1;
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return 0;
}

/* spare = 0: the limit leaves no room even for the spare descriptor (nofile.c 6):
 * connections wait in the backlog, without a spin, until descriptors free up.
 * spare = 1: one more; the spare exists but nothing else: connections are shed. */
static void nofile_case(int spare) {
    struct host h;
    struct logcap lc;
    struct rlimit orig;
    int p[2] = {-1, -1}, ok, fd = -1, counts[3] = {-1, -1, -1};
    pid_t pid = -1;
    rlim_t lim = 0;
    int pad[1024], npad = 0;
    memset(&h, 0, sizeof h);
    h.echo = 1;
    REQUIRE(getrlimit(RLIMIT_NOFILE, &orig) == 0 && pipe(p) == 0);
    /* Fill the gaps below the highest open descriptor: then the limit alone
     * says how many descriptors the server can have. */
    int hi = highest_fd();
    for (int f; npad < (int)(sizeof pad / sizeof pad[0]) && (f = open("/dev/null", O_RDONLY)) >= 0;) {
        if (f > hi) {
            close(f);
            break;
        }
        pad[npad++] = f;
    }
    rlim_t base = (rlim_t)hi + 1;
    for (lim = base; lim < base + 10 && !start_with_nofile(&h, &lc, lim, orig.rlim_max); lim++) {
    }
    REQUIRE(h.srv != NULL); /* lim: the lowest limit the server starts under */
    if (spare) {
        tf_server_free(h.srv);
        memset(&h, 0, sizeof h);
        h.echo = 1;
        REQUIRE(start_with_nofile(&h, &lc, lim + 1, orig.rlim_max));
        sleep_ms(100);
        LOCKED(ok = !contains_nocase(lc.text, "no spare"));
        REQUIRE(ok); /* the scenario: the spare descriptor exists */
    } else {
        WAIT_FOR(contains_nocase(lc.text, "descriptor"), SC(2000), ok);
        CHECKF(ok, "no log line about descriptors; log:\n%s", lc.text);
    }
    uint16_t port = tf_server_port(h.srv);
    fflush(NULL);
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0)
        nofile_clients(port, p[1], orig);
    char c;
    REQUIRE(read_bounded(p[0], &c, 1, SC(5000)) == 0);
    double c0 = cpu_s();
    sleep_ms(2000);
    double used = cpu_s() - c0;
    tf_stats st;
    CHECK_RC(tf_server_stats(h.srv, &st), TF_OK);
    printf("    RLIMIT_NOFILE %lu%s: %.3f s CPU in 2 s; accepted %" PRIu64 ", rejected %" PRIu64
           "\n", (unsigned long)(spare ? lim + 1 : lim), spare ? " (spare)" : " (no spare)", used,
           st.connections_accepted, st.connections_rejected);
    CHECKF(used < 0.2, "the loop spins: %.3f s of CPU in 2 s", used);
    if (spare)
        CHECKF(st.connections_rejected >= NOFILE_CLIENTS, "shed: %" PRIu64,
               st.connections_rejected);
    REQUIRE(setrlimit(RLIMIT_NOFILE, &orig) == 0); /* descriptors free up */
    REQUIRE(read_bounded(p[0], counts, sizeof counts, SC(15000)) == 0);
    printf("    clients: %d echoed, %d shed, %d without an answer\n", counts[0], counts[1],
           counts[2]);
    CHECKF(counts[2] == 0, "%d connections were neither served nor shed", counts[2]);
    if (spare)
        CHECK(counts[1] == NOFILE_CLIENTS);
    else
        CHECK(counts[0] + counts[1] == NOFILE_CLIENTS);
    REQUIRE((fd = cli_connect(port)) >= 0);
    CHECK(echo_ok(fd, "served again"));
    LOCKED(ok = contains_nocase(lc.text, spare ? "out of file descriptors" : "descriptor"));
    CHECKF(ok, "no log line about descriptors; log:\n%s", lc.text);
done:
    setrlimit(RLIMIT_NOFILE, &orig);
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    tf_server_free(h.srv);
    close_fd(&fd);
    close_fd(&p[0]);
    close_fd(&p[1]);
    while (npad > 0)
        close(pad[--npad]);
}

static void test_nofile_without_spare_waits_without_spin_then_serves(void) { nofile_case(0); }
static void test_nofile_with_spare_sheds_without_spin(void) { nofile_case(1); }

/* ---- memory: the partial-frame budget (amp2.py) ---------------------------------------- */

#define AMP_PEERS 12
#define AMP_HELD (1000u * 1024) /* partial-frame bytes each peer sends */

static void test_partial_frame_budget_closes_largest_holder(void) {
    struct host h;
    int fd[AMP_PEERS], fresh = -1, ok, overload = 0, other = 0;
    uint8_t *buf = malloc(4 + AMP_HELD);
    for (int i = 0; i < AMP_PEERS; i++)
        fd[i] = -1;
    memset(&h, 0, sizeof h);
    h.echo = 1;
    tf_config *cfg = cfg_new();
    REQUIRE(buf && cfg && tf_config_set_max_buffered(cfg, 4u << 20) == TF_OK);
    memset(buf, 0xab, 4 + AMP_HELD);
    put_le32(buf, AMP_HELD + 1); /* one byte short of a whole frame */
    REQUIRE(host_start(&h, cfg));
    long base = status_kb("VmRSS:");
    tf_stats st;
    for (int i = 0; i < AMP_PEERS; i++) {
        REQUIRE((fd[i] = cli_connect(tf_server_port(h.srv))) >= 0);
        WAIT_FOR(h.connects == i + 1, SC(3000), ok);
        REQUIRE(ok);
        (void)send_all(fd[i], buf, 4 + AMP_HELD);
        /* The sender holds less than the others while it sends: it is never the
         * one closed, and all its bytes are read. */
        double end = now_ms() + SC(3000);
        while (tf_server_stats(h.srv, &st) == TF_OK &&
               st.bytes_received < (uint64_t)(i + 1) * (4 + AMP_HELD) && now_ms() < end)
            sleep_ms(2);
    }
    sleep_ms(100);
    long peak = status_kb("VmHWM:"), now = status_kb("VmRSS:");
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < h.closes && i < LIST_MAX; i++)
        h.reason[i] == TF_CLOSE_OVERLOAD ? overload++ : other++;
    pthread_mutex_unlock(&g_mu);
    printf("    %d peers holding %u KiB each, budget 4096 KiB: %d closed OVERLOAD; RSS +%ld KiB "
           "(peak +%ld KiB)\n", AMP_PEERS, AMP_HELD / 1024, overload, now - base, peak - base);
    /* 4 partial frames fit the budget, 5 do not: each new one costs one other. */
    CHECKF(overload == AMP_PEERS - 4, "%d closed with TF_CLOSE_OVERLOAD, want %d", overload,
           AMP_PEERS - 4);
    CHECK(other == 0);
    CHECK(wait_active(h.srv, (uint64_t)(AMP_PEERS - overload), SC(1000)));
    CHECKF(host_reason(&h, h.conn[AMP_PEERS - 1]) == -1, "the last peer (holding less) was "
           "closed, reason %d", (int)host_reason(&h, h.conn[AMP_PEERS - 1]));
    CHECKF(peak - base < 4096 + 4096, "RSS grew by %ld KiB (budget 4096 KiB)", peak - base);
    for (int i = 0; i < h.closes && i < LIST_MAX; i++)
        for (int j = 0; j < AMP_PEERS; j++)
            if (h.conn[j] == h.closed[i])
                CHECK(peer_end(fd[j], SC(2000)) != 0);
    /* The others go on: the last peer completes its frame; a new peer is echoed. */
    REQUIRE(send_all(fd[AMP_PEERS - 1], "!", 1) == 0);
    WAIT_FOR(h.messages >= 1, SC(3000), ok);
    CHECKF(ok && h.last_len == AMP_HELD + 1, "the completed frame was not delivered");
    REQUIRE((fresh = cli_connect(tf_server_port(h.srv))) >= 0);
    CHECK(echo_ok(fresh, "still serving"));
done:
    tf_server_free(h.srv);
    for (int i = 0; i < AMP_PEERS; i++)
        close_fd(&fd[i]);
    close_fd(&fresh);
    free(buf);
}

/* ---- memory: an allocation that fails closes a connection (oom_repro.sh) ---------- */

#define OOM_PEERS 16
#define OOM_HELD (6u << 20) /* partial-frame bytes each peer sends; it announces 8 MiB */

static void test_address_space_limit_closes_with_overload_not_abort(void) {
    struct host h;
    struct rlimit orig;
    int fd[OOM_PEERS], fresh = -1, ok, overload = 0, other = 0, limited = 0;
    uint8_t *buf = malloc(4 + OOM_HELD);
    tf_stats st;
    for (int i = 0; i < OOM_PEERS; i++)
        fd[i] = -1;
    memset(&h, 0, sizeof h);
    h.echo = 1;
    REQUIRE(buf && getrlimit(RLIMIT_AS, &orig) == 0);
    memset(buf, 0xcd, 4 + OOM_HELD);
    put_le32(buf, 8u << 20); /* the default max frame: allowed */
    REQUIRE(host_start(&h, NULL));
    REQUIRE((fresh = cli_connect(tf_server_port(h.srv))) >= 0 && echo_ok(fresh, "warm"));
    long vm = status_kb("VmSize:");
    REQUIRE(vm > 0);
    /* 16 MiB of address space to spare (plus what malloc has reserved and not
     * used yet, up to 64 MiB per arena), for 96 MiB of partial frames. */
    struct rlimit rl = {(rlim_t)(vm + 16 * 1024) * 1024, orig.rlim_max};
    REQUIRE(setrlimit(RLIMIT_AS, &rl) == 0);
    limited = 1;
    uint64_t want = 0;
    for (int i = 0; i < OOM_PEERS; i++) {
        if ((fd[i] = cli_connect(tf_server_port(h.srv))) < 0)
            break;
        WAIT_FOR(h.connects == i + 2, SC(3000), ok);
        REQUIRE(ok);
        (void)send_all(fd[i], buf, 4 + OOM_HELD); /* fails for a peer already closed */
        want += 4 + OOM_HELD;
        double end = now_ms() + SC(3000);
        int closes;
        do {
            sleep_ms(2);
            LOCKED(closes = h.closes);
        } while (tf_server_stats(h.srv, &st) == TF_OK && closes == 0 &&
                 st.bytes_received < want && now_ms() < end);
    }
    sleep_ms(100);
    setrlimit(RLIMIT_AS, &orig);
    limited = 0;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < h.closes && i < LIST_MAX; i++)
        h.reason[i] == TF_CLOSE_OVERLOAD ? overload++ : other++;
    pthread_mutex_unlock(&g_mu);
    printf("    %d peers x %u MiB of 8 MiB frames with 16 MiB of address space to spare: "
           "%d closed OVERLOAD, %d otherwise\n", OOM_PEERS, OOM_HELD >> 20, overload, other);
    CHECKF(overload >= 1, "no connection was closed with TF_CLOSE_OVERLOAD");
    CHECKF(other == 0, "%d connections closed for another reason", other);
    CHECK(echo_ok(fresh, "the process and the others go on"));
done:
    if (limited)
        setrlimit(RLIMIT_AS, &orig);
    tf_server_free(h.srv);
    for (int i = 0; i < OOM_PEERS; i++)
        close_fd(&fd[i]);
    close_fd(&fresh);
    free(buf);
}

/* ---- memory: queued output (outmem.c, outmem_never.c) ----------------------------------- */

#define OUT_PEERS 4
#define OUT_MAX (4u << 20) /* max queued output per connection */

static void outmem_case(size_t frame) {
    struct host h;
    int fd[OUT_PEERS], ok;
    uint8_t *buf = calloc(1, frame);
    size_t queued[OUT_PEERS];
    for (int i = 0; i < OUT_PEERS; i++)
        fd[i] = -1, queued[i] = 0;
    memset(&h, 0, sizeof h);
    tf_config *cfg = cfg_new();
    REQUIRE(buf && cfg && tf_config_set_max_queued_output(cfg, OUT_MAX) == TF_OK);
    REQUIRE(host_start(&h, cfg));
    for (int i = 0; i < OUT_PEERS; i++) /* never read; small receive buffers */
        REQUIRE((fd[i] = cli_connect_rcvbuf(tf_server_port(h.srv), 4096)) >= 0);
    WAIT_FOR(h.connects == OUT_PEERS, SC(3000), ok);
    REQUIRE(ok);
    sleep_ms(100);
    long base = status_kb("VmRSS:");
    for (int round = 0; round < 4; round++) { /* fill, let the loop write what it can, refill */
        for (int i = 0; i < OUT_PEERS; i++) {
            int32_t rc;
            queued[i] += fill_queue(h.srv, h.conn[i], buf, frame, &rc);
            CHECK_RC(rc, TF_ERR_FULL);
        }
        sleep_ms(30);
    }
    long grown = status_kb("VmRSS:") - base;
    /* The contract: 1.25 x max queued output + 64 KiB per connection; 4 MiB more for the
     * process around it (malloc arenas, the loop thread). */
    long limit = (long)(1.25 * OUT_PEERS * (OUT_MAX / 1024)) + OUT_PEERS * 64 + 4 * 1024;
    printf("    %zu-byte frames: %d peers x %u MiB max queued output: RSS +%ld KiB "
           "(limit %ld KiB); %zu KiB taken by the first peer\n", frame, OUT_PEERS, OUT_MAX >> 20,
           grown, limit, queued[0] / frame * (frame + 4) / 1024);
    for (int i = 0; i < OUT_PEERS; i++) /* prefixes count in max queued output */
        CHECKF(queued[i] / frame * (frame + 4) >= OUT_MAX, "peer %d took only %zu bytes", i,
               queued[i] / frame * (frame + 4));
    CHECKF(grown <= limit, "queued output costs %ld KiB of RSS for %u KiB allowed", grown,
           OUT_PEERS * (OUT_MAX / 1024));
    LOCKED(ok = h.closes);
    CHECK(ok == 0);
done:
    tf_server_free(h.srv);
    for (int i = 0; i < OUT_PEERS; i++)
        close_fd(&fd[i]);
    free(buf);
}

static void test_queued_output_memory_is_bounded_1b_frames(void) { outmem_case(1); }
static void test_queued_output_memory_is_bounded_64b_frames(void) { outmem_case(64); }
static void test_queued_output_memory_is_bounded_4k_frames(void) { outmem_case(4096); }
static void test_queued_output_memory_is_bounded_1m_frames(void) { outmem_case(1u << 20); }

static const struct test tests[] = {
    TEST(test_slow_callback_does_not_make_active_conn_idle, 15, ""),
    TEST(test_conn_accepted_after_slow_callback_gets_full_idle_timeout, 15, ""),
    TEST(test_pingpong_is_served_while_another_conn_streams_tiny_frames, 30, ""),
    TEST(test_pull_accepts_client_that_came_while_queue_full, 15, "va"),
    TEST(test_pull_slow_host_is_not_idleness, 20, "a"),
    TEST(test_pull_poll_timeout_0_never_waits, 10, "va"),
    TEST(test_pull_queue_stays_bounded_after_resume, 15, "a"),
    TEST(test_nofile_without_spare_waits_without_spin_then_serves, 30, ""),
    TEST(test_nofile_with_spare_sheds_without_spin, 30, ""),
    TEST(test_partial_frame_budget_closes_largest_holder, 20, ""),
    TEST(test_address_space_limit_closes_with_overload_not_abort, 30, ""),
    TEST(test_queued_output_memory_is_bounded_1b_frames, 20, ""),
    TEST(test_queued_output_memory_is_bounded_64b_frames, 20, ""),
    TEST(test_queued_output_memory_is_bounded_4k_frames, 20, ""),
    TEST(test_queued_output_memory_is_bounded_1m_frames, 20, ""),
};

int main(int argc, char **argv) {
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}

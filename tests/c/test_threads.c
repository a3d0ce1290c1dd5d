/* test_threads.c: several loop threads (tf_config_set_threads) as a C host
 * sees them: affinity (every callback of a connection on one OS thread),
 * spread, totals and the connection limit across loops, sends and closes for
 * another loop's connection from a callback racing peer closes, stop from
 * another thread while every loop is busy, stop inside a callback, free from
 * a callback of one loop, pull mode, one address one server, and the log
 * callback one call at a time. Run by test_c_threads.py on both backends and
 * under valgrind (no error, nothing definitely lost).
 *
 *   test_threads [--list] [NAME...]        TF_TEST_THREADS (default 2) loops
 */
#include "robust.h"

#include <sys/syscall.h>

#define MAXC 256

static uint32_t g_threads = 2;

static long os_tid(void) { return (long)syscall(SYS_gettid); }

/* Busy for about us microseconds (a callback doing real work). */
static void burn_us(double us) {
    double end = now_ms() + us / 1000.0;
    volatile uint64_t x = 1;
    while (now_ms() < end)
        for (int i = 0; i < 64; i++)
            x = x * 6364136223846793005ull + 1;
}

static tf_config *cfg_threads(uint32_t n) {
    tf_config *cfg = cfg_new();
    if (cfg != NULL && tf_config_set_threads(cfg, n) != TF_OK) {
        tf_config_free(cfg);
        return NULL;
    }
    return cfg;
}

/* ---- a host that records the OS thread of every callback ---------------------- */

enum { ECHO = 1, PARTNER = 2, STOP_INSIDE = 4, FREE_ON_CUE = 8, BUSY = 16 };

struct conn_rec {
    long tid;           /* on_connect's thread */
    uint32_t loop;      /* tf_conn_get_info's thread, from on_connect */
    int msgs, closes;
    int32_t reason;
    int wrong_thread;   /* a callback on another thread than on_connect's */
    int out_of_order;   /* a message or close before on_connect, or after on_close */
};

struct thost {
    tf_server *srv;
    int mode;
    int connects, messages, closes;
    struct conn_rec c[MAXC];
    int codes[16];          /* return codes seen by PARTNER / STOP_INSIDE calls */
    int freed;              /* FREE_ON_CUE: tf_server_free returned */
    int calls;              /* every callback */
};

static int code_slot(int32_t rc) { return rc >= 0 && rc < 16 ? rc : 15; }

/* A message or close of r: on on_connect's thread, between on_connect and on_close. */
static void note_thread(struct conn_rec *r) {
    if (r->tid == 0 || r->closes > 0)
        r->out_of_order++;
    else if (r->tid != os_tid())
        r->wrong_thread++;
}

static int th_on_connect(void *ud, tf_conn_id c, const char *peer) {
    struct thost *h = ud;
    tf_conn_info info;
    (void)peer;
    int32_t rc = tf_conn_get_info(h->srv, c, &info);
    long me = os_tid();
    LOCKED({
        h->calls++;
        h->connects++;
        if (c < MAXC) {
            h->c[c].tid = me;
            h->c[c].loop = rc == TF_OK ? info.thread : 999;
        }
    });
    return 0;
}

static void th_on_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    struct thost *h = ud;
    int32_t rcs[4];
    int nrc = 0;
    if (h->mode & FREE_ON_CUE && n == 4 && memcmp(d, "free", 4) == 0) {
        tf_server_free(h->srv);
        LOCKED(h->freed = 1; h->calls++);
        return;
    }
    if (h->mode & BUSY)
        burn_us(300);
    if (h->mode & ECHO)
        rcs[nrc++] = tf_send(h->srv, c, d, n);
    if (h->mode & PARTNER) {
        tf_conn_id p = c % 2 ? c + 1 : c - 1;
        rcs[nrc++] = tf_send(h->srv, p, d, n);
        if (n > 0 && d[0] % 3 == 2)
            rcs[nrc++] = tf_conn_close(h->srv, p);
        if (n > 0 && d[0] % 5 == 4)
            rcs[nrc++] = tf_conn_abort(h->srv, p);
    }
    if (h->mode & STOP_INSIDE)
        rcs[nrc++] = tf_server_stop(h->srv, 0);
    LOCKED({
        h->calls++;
        h->messages++;
        if (c < MAXC) {
            note_thread(&h->c[c]);
            h->c[c].msgs++;
        }
        for (int i = 0; i < nrc; i++)
            h->codes[code_slot(rcs[i])]++;
    });
}

static void th_on_close(void *ud, tf_conn_id c, int32_t reason) {
    struct thost *h = ud;
    int32_t rc = -1;
    if (h->mode & PARTNER) /* a send to the other loop's partner from on_close */
        rc = tf_send(h->srv, c % 2 ? c + 1 : c - 1, (const uint8_t *)"bye", 3);
    LOCKED({
        h->calls++;
        h->closes++;
        if (c < MAXC) {
            note_thread(&h->c[c]);
            h->c[c].closes++;
            h->c[c].reason = reason;
        }
        if (rc != -1)
            h->codes[code_slot(rc)]++;
    });
}

static tf_server *th_start(struct thost *h, tf_config *cfg) {
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = h;
    cb.on_connect = th_on_connect;
    cb.on_message = th_on_message;
    cb.on_close = th_on_close;
    if (cfg == NULL)
        cfg = cfg_threads(g_threads);
    if (cfg == NULL)
        return NULL;
    start_cb(cfg, &cb, &h->srv);
    tf_config_free(cfg);
    return h->srv;
}

static int frame_u32(int fd, uint32_t v) {
    uint8_t b[4];
    put_le32(b, v);
    return send_frame(fd, b, 4);
}

static int expect_u32(int fd, uint32_t v) {
    uint8_t b[8];
    if (recv_all(fd, b, 8) != 0)
        return 0;
    return b[0] == 4 && b[1] == 0 && b[2] == 0 && b[3] == 0 && b[4] == (uint8_t)v &&
           b[5] == (uint8_t)(v >> 8) && b[6] == (uint8_t)(v >> 16) && b[7] == (uint8_t)(v >> 24);
}

/* ---- tests ----------------------------------------------------------------------- */

static struct thost g_h;

static void test_affinity_spread_and_order(void) {
    enum { K = 20 };
    int fds[K];
    int ok = 0;
    uint16_t port;
    memset(&g_h, 0, sizeof g_h);
    g_h.mode = ECHO;
    for (int i = 0; i < K; i++)
        fds[i] = -1;
    REQUIRE(th_start(&g_h, NULL) != NULL);
    port = tf_server_port(g_h.srv);
    for (int i = 0; i < K; i++) /* opened one after another */
        REQUIRE((fds[i] = cli_connect(port)) >= 0);
    WAIT_FOR(g_h.connects == K, SC(5000), ok);
    REQUIRE(ok);
    for (int i = 0; i < K; i++)
        for (uint32_t j = 0; j < 5; j++)
            CHECK(frame_u32(fds[i], j) == 0);
    for (int i = 0; i < K; i++)
        for (uint32_t j = 0; j < 5; j++)
            CHECK(expect_u32(fds[i], j));
    for (int i = 0; i < K; i++)
        close_fd(&fds[i]);
    WAIT_FOR(g_h.closes == K, SC(5000), ok);
    CHECK(ok);
    pthread_mutex_lock(&g_mu);
    {
        long tid_of_loop[8] = {0};
        int per_loop[8] = {0};
        for (tf_conn_id id = 1; id <= K; id++) {
            struct conn_rec *r = &g_h.c[id];
            CHECKF(r->msgs == 5 && r->closes == 1, "conn %" PRIu64 ": %d msgs %d closes", id, r->msgs,
                   r->closes);
            CHECKF(r->wrong_thread == 0 && r->out_of_order == 0, "conn %" PRIu64 ": %d %d", id,
                   r->wrong_thread, r->out_of_order);
            CHECKF(r->loop < g_threads && r->loop < 8, "conn %" PRIu64 " loop %u", id, r->loop);
            if (r->loop >= 8)
                continue;
            per_loop[r->loop]++;
            if (tid_of_loop[r->loop] == 0)
                tid_of_loop[r->loop] = r->tid;
            CHECKF(tid_of_loop[r->loop] == r->tid, "loop %u ran on two threads", r->loop);
        }
        for (uint32_t l = 0; l < g_threads && l < 8; l++) {
            CHECKF(per_loop[l] >= 3 * (K / (10 * (int)g_threads)), "loop %u: %d of %d", l, per_loop[l], K);
            CHECK(tid_of_loop[l] != 0 && tid_of_loop[l] != os_tid());
            for (uint32_t m = 0; m < l; m++)
                CHECKF(tid_of_loop[l] != tid_of_loop[m], "loops %u and %u share a thread", l, m);
        }
    }
    pthread_mutex_unlock(&g_mu);
done:
    for (int i = 0; i < K; i++)
        close_fd(&fds[i]);
    if (g_h.srv) {
        CHECK_RC(tf_server_stop(g_h.srv, 0), TF_OK);
        tf_server_free(g_h.srv);
    }
}

static void test_totals_and_the_limit_across_loops(void) {
    enum { K = 6 };
    int fds[K + 2];
    int ok = 0;
    tf_stats st;
    tf_config *cfg = cfg_threads(g_threads);
    memset(&g_h, 0, sizeof g_h);
    g_h.mode = ECHO;
    for (int i = 0; i < K + 2; i++)
        fds[i] = -1;
    REQUIRE(cfg != NULL && tf_config_set_max_connections(cfg, K) == TF_OK);
    REQUIRE(th_start(&g_h, cfg) != NULL);
    for (int i = 0; i < K; i++)
        REQUIRE((fds[i] = cli_connect(tf_server_port(g_h.srv))) >= 0);
    WAIT_FOR(g_h.connects == K, SC(5000), ok);
    REQUIRE(ok);
    for (int i = K; i < K + 2; i++) { /* past the total: closed at once */
        REQUIRE((fds[i] = cli_connect(tf_server_port(g_h.srv))) >= 0);
        CHECKF(peer_end(fds[i], SC(5000)) != 0, "connection %d past the limit stays open", i);
    }
    for (int i = 0; i < K; i++)
        CHECK(echo_ok(fds[i], "total"));
    ok = 0;
    for (double end = now_ms() + SC(5000); now_ms() < end && !ok; sleep_ms(5))
        ok = tf_server_stats(g_h.srv, &st) == TF_OK && st.frames_sent == K;
    CHECK(ok);
    CHECK(st.connections_active == K && st.connections_accepted == K);
    CHECK(st.connections_rejected == 2);
    CHECK(st.frames_received == K && st.bytes_received == K * 9 && st.bytes_sent == K * 9);
    CHECK(g_h.connects == K);
done:
    for (int i = 0; i < K + 2; i++)
        close_fd(&fds[i]);
    if (g_h.srv) {
        CHECK_RC(tf_server_stop(g_h.srv, 0), TF_OK);
        tf_server_free(g_h.srv);
    }
}

struct racer {
    int fd;
    int idx;
};

static void *race_client(void *arg) {
    struct racer *r = arg;
    for (int j = 0; j < 1 + r->idx % 4; j++) {
        uint8_t b[8];
        memset(b, (uint8_t)(r->idx + j), sizeof b);
        if (send_frame(r->fd, b, sizeof b) != 0)
            break;
    }
    if (r->idx % 3 == 0) { /* a reset */
        struct linger l = {1, 0};
        (void)setsockopt(r->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    }
    close(r->fd);
    r->fd = -1;
    return NULL;
}

static void test_cross_loop_sends_and_closes_racing_peer_closes(void) {
    enum { PAIRS = 12, K = 2 * PAIRS };
    struct racer rs[K];
    pthread_t th[K];
    int started = 0, ok = 0;
    memset(&g_h, 0, sizeof g_h);
    g_h.mode = PARTNER;
    for (int i = 0; i < K; i++)
        rs[i].fd = -1;
    REQUIRE(g_threads == 2);
    REQUIRE(th_start(&g_h, NULL) != NULL);
    /* First, deterministically: conn 1 (loop 0) sends to conn 2 (loop 1). */
    for (int i = 0; i < 2; i++)
        REQUIRE((rs[i].fd = cli_connect(tf_server_port(g_h.srv))) >= 0);
    WAIT_FOR(g_h.connects == 2, SC(5000), ok);
    REQUIRE(ok);
    CHECK(g_h.c[1].loop == 0 && g_h.c[2].loop == 1 && g_h.c[1].tid != g_h.c[2].tid);
    {
        uint8_t one[1] = {1}; /* 1 % 3 != 2, 1 % 5 != 4: just the send */
        uint8_t buf[5];
        CHECK(send_frame(rs[0].fd, one, 1) == 0);
        CHECK(recv_all(rs[1].fd, buf, 5) == 0 && buf[0] == 1 && buf[4] == 1);
        uint8_t two[1] = {2}; /* closes the partner after the send */
        CHECK(send_frame(rs[1].fd, two, 1) == 0);
        CHECK(recv_all(rs[0].fd, buf, 5) == 0 && buf[0] == 1 && buf[4] == 2);
        CHECK(peer_end(rs[0].fd, SC(5000)) == 1);
    }
    WAIT_FOR(g_h.c[1].closes == 1, SC(5000), ok);
    CHECK(ok && g_h.c[1].reason == TF_CLOSE_LOCAL);
    close_fd(&rs[0].fd);
    close_fd(&rs[1].fd);
    WAIT_FOR(g_h.closes == 2, SC(5000), ok);
    REQUIRE(ok);
    /* Then the race: ids 3..K+2, pairs (odd on loop 0, even on loop 1). */
    for (int i = 0; i < K; i++) {
        REQUIRE((rs[i].fd = cli_connect(tf_server_port(g_h.srv))) >= 0);
        rs[i].idx = i;
    }
    WAIT_FOR(g_h.connects == K + 2, SC(5000), ok);
    REQUIRE(ok);
    for (; started < K; started++)
        REQUIRE(pthread_create(&th[started], NULL, race_client, &rs[started]) == 0);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    started = 0;
    WAIT_FOR(g_h.closes == K + 2, SC(10000), ok);
    CHECKF(ok, "%d of %d on_close", g_h.closes, K + 2);
    sleep_ms(100);
    pthread_mutex_lock(&g_mu);
    for (tf_conn_id id = 1; id <= K + 2; id++)
        CHECKF(g_h.c[id].closes == 1 && g_h.c[id].wrong_thread == 0 && g_h.c[id].out_of_order == 0,
               "conn %" PRIu64 ": %d on_close, %d wrong thread, %d out of order", id, g_h.c[id].closes,
               g_h.c[id].wrong_thread, g_h.c[id].out_of_order);
    for (int rc = 0; rc < 16; rc++)
        CHECKF(g_h.codes[rc] == 0 || rc == TF_OK || rc == TF_ERR_NO_CONN, "code %d seen %d times", rc,
               g_h.codes[rc]);
    pthread_mutex_unlock(&g_mu);
done:
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < K; i++)
        close_fd(&rs[i].fd);
    if (g_h.srv) {
        CHECK_RC(tf_server_stop(g_h.srv, 0), TF_OK);
        tf_server_free(g_h.srv);
    }
}

static void *stream_echoes(void *arg) {
    int fd = *(int *)arg;
    uint8_t wire[8 * 8], buf[4096];
    for (int i = 0; i < 8; i++) {
        put_le32(wire + 8 * i, 4);
        memcpy(wire + 8 * i + 4, "work", 4);
    }
    for (;;) {
        if (send_all(fd, wire, sizeof wire) != 0)
            break;
        size_t got = 0;
        while (got < sizeof wire) {
            ssize_t n = recv(fd, buf, sizeof buf, 0);
            if (n <= 0)
                return NULL;
            got += (size_t)n;
        }
    }
    return NULL;
}

struct stopper {
    tf_server *srv;
    int32_t rc;
    double took_ms;
};

static void *stop_thread(void *arg) {
    struct stopper *s = arg;
    double t0 = now_ms();
    s->rc = tf_server_stop(s->srv, 200);
    s->took_ms = now_ms() - t0;
    return NULL;
}

static void test_stop_from_another_thread_while_every_loop_is_busy(void) {
    enum { K = 4 };
    int fds[K];
    pthread_t th[K], st;
    int started = 0, ok = 0, calls_after;
    struct stopper s = {NULL, -1, 0};
    memset(&g_h, 0, sizeof g_h);
    g_h.mode = ECHO | BUSY;
    for (int i = 0; i < K; i++)
        fds[i] = -1;
    REQUIRE(th_start(&g_h, NULL) != NULL);
    for (int i = 0; i < K; i++)
        REQUIRE((fds[i] = cli_connect(tf_server_port(g_h.srv))) >= 0);
    WAIT_FOR(g_h.connects == K, SC(5000), ok);
    REQUIRE(ok);
    for (; started < K; started++)
        REQUIRE(pthread_create(&th[started], NULL, stream_echoes, &fds[started]) == 0);
    WAIT_FOR(g_h.messages >= 40, SC(5000), ok);
    CHECK(ok);
    s.srv = g_h.srv;
    REQUIRE(pthread_create(&st, NULL, stop_thread, &s) == 0);
    pthread_join(st, NULL);
    CHECK_RC(s.rc, TF_OK);
    CHECKF(s.took_ms < SC(3000), "tf_server_stop took %.0f ms with every loop busy", s.took_ms);
    pthread_mutex_lock(&g_mu);
    calls_after = g_h.calls;
    CHECKF(g_h.closes == K, "%d of %d on_close", g_h.closes, K);
    for (tf_conn_id id = 1; id <= K; id++)
        CHECK(g_h.c[id].closes == 1 && g_h.c[id].reason == TF_CLOSE_SHUTDOWN && g_h.c[id].wrong_thread == 0);
    pthread_mutex_unlock(&g_mu);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL); /* each sees the end (or its timeout) */
    started = 0;
    sleep_ms(50);
    CHECKF(g_h.calls == calls_after, "%d callbacks after tf_server_stop returned", g_h.calls - calls_after);
done:
    for (int i = 0; i < started; i++) {
        shutdown(fds[i], SHUT_RDWR);
        pthread_join(th[i], NULL);
    }
    for (int i = 0; i < K; i++)
        close_fd(&fds[i]);
    if (g_h.srv)
        tf_server_free(g_h.srv);
}

static void test_stop_inside_a_callback_of_every_loop_is_invalid(void) {
    enum { K = 4 };
    int fds[K];
    int ok = 0;
    memset(&g_h, 0, sizeof g_h);
    g_h.mode = ECHO | STOP_INSIDE;
    for (int i = 0; i < K; i++)
        fds[i] = -1;
    REQUIRE(th_start(&g_h, NULL) != NULL);
    for (int i = 0; i < K; i++)
        REQUIRE((fds[i] = cli_connect(tf_server_port(g_h.srv))) >= 0);
    WAIT_FOR(g_h.connects == K, SC(5000), ok);
    REQUIRE(ok);
    for (int i = 0; i < K; i++)
        CHECK(echo_ok(fds[i], "stop?")); /* the server goes on */
    pthread_mutex_lock(&g_mu);
    CHECKF(g_h.codes[TF_ERR_INVALID] == K, "%d of %d stops refused", g_h.codes[TF_ERR_INVALID], K);
    CHECK(g_h.c[1].loop != g_h.c[2].loop || g_threads == 1);
    pthread_mutex_unlock(&g_mu);
done:
    for (int i = 0; i < K; i++)
        close_fd(&fds[i]);
    if (g_h.srv) {
        CHECK_RC(tf_server_stop(g_h.srv, 0), TF_OK);
        tf_server_free(g_h.srv);
    }
}

static void *stream_writes(void *arg) {
    int fd = *(int *)arg;
    uint8_t wire[16 * 68];
    for (int i = 0; i < 16; i++) {
        put_le32(wire + 68 * i, 64);
        memset(wire + 68 * i + 4, 7, 64);
    }
    while (send_all(fd, wire, sizeof wire) == 0) {
    }
    return NULL;
}

static void test_free_from_a_callback_of_one_loop_ends_every_callback(void) {
    enum { K = 4 };
    int fds[K];
    pthread_t th[K];
    int started = 0, ok = 0, settled;
    uint16_t port = 0;
    memset(&g_h, 0, sizeof g_h);
    g_h.mode = FREE_ON_CUE;
    for (int i = 0; i < K; i++)
        fds[i] = -1;
    REQUIRE(th_start(&g_h, NULL) != NULL);
    port = tf_server_port(g_h.srv);
    for (int i = 0; i < K; i++)
        REQUIRE((fds[i] = cli_connect(port)) >= 0);
    WAIT_FOR(g_h.connects == K, SC(5000), ok);
    REQUIRE(ok);
    /* ids 1..3 stream frames; id 4 (loop 1 with two loops) asks for the free. */
    for (; started < K - 1; started++)
        REQUIRE(pthread_create(&th[started], NULL, stream_writes, &fds[started]) == 0);
    WAIT_FOR(g_h.messages >= 100, SC(5000), ok);
    CHECK(ok);
    CHECK(send_frame(fds[K - 1], "free", 4) == 0);
    WAIT_FOR(g_h.freed, SC(5000), ok);
    REQUIRE(ok);
    g_h.srv = NULL; /* freed by the callback */
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL); /* the loops close every connection as they end */
    started = 0;
    CHECK(peer_end(fds[K - 1], SC(5000)) != 0);
    CHECK(port_refuses(port, SC(5000)));
    sleep_ms(SC(100));
    pthread_mutex_lock(&g_mu);
    settled = g_h.calls;
    pthread_mutex_unlock(&g_mu);
    sleep_ms(SC(200));
    CHECKF(g_h.calls == settled, "%d callbacks after tf_server_free", g_h.calls - settled);
done:
    for (int i = 0; i < started; i++) {
        shutdown(fds[i], SHUT_RDWR);
        pthread_join(th[i], NULL);
    }
    for (int i = 0; i < K; i++)
        close_fd(&fds[i]);
    if (g_h.srv) {
        tf_server_stop(g_h.srv, 0);
        tf_server_free(g_h.srv);
    }
}

static void test_pull_mode_one_queue_per_connection_order(void) {
    enum { K = 4, PER = 20 };
    int fds[K];
    tf_server *srv = NULL;
    tf_config *cfg = cfg_threads(g_threads);
    uint32_t next[MAXC] = {0};
    int connected[MAXC] = {0}, closed[MAXC] = {0};
    int msgs = 0, conns = 0, closes = 0, bad = 0;
    uint32_t loops_seen = 0;
    tf_event ev[32];
    for (int i = 0; i < K; i++)
        fds[i] = -1;
    REQUIRE(cfg != NULL);
    REQUIRE(tf_server_start_pull(cfg, &srv) == TF_OK);
    for (int i = 0; i < K; i++)
        REQUIRE((fds[i] = cli_connect(tf_server_port(srv))) >= 0);
    for (int i = 0; i < K; i++)
        for (uint32_t j = 0; j < PER; j++)
            CHECK(frame_u32(fds[i], j) == 0);
    for (double end = now_ms() + SC(10000); (conns < K || msgs < K * PER) && now_ms() < end;) {
        size_t n = 0;
        REQUIRE(tf_server_poll(srv, ev, 32, &n, 100) == TF_OK);
        for (size_t i = 0; i < n; i++) {
            tf_conn_id c = ev[i].conn;
            if (c >= MAXC) {
                bad++;
                continue;
            }
            if (ev[i].kind == TF_EVENT_CONNECT) {
                tf_conn_info info;
                conns++;
                bad += connected[c]++ != 0;
                if (tf_conn_get_info(srv, c, &info) == TF_OK && info.thread < 32)
                    loops_seen |= 1u << info.thread;
            } else if (ev[i].kind == TF_EVENT_MESSAGE) {
                uint32_t v = 0;
                msgs++;
                if (ev[i].len == 4)
                    v = (uint32_t)ev[i].data[0] | (uint32_t)ev[i].data[1] << 8 |
                        (uint32_t)ev[i].data[2] << 16 | (uint32_t)ev[i].data[3] << 24;
                bad += !connected[c] || ev[i].len != 4 || v != next[c];
                next[c] = v + 1;
                CHECK_RC(tf_send(srv, c, ev[i].data, ev[i].len), TF_OK);
            } else {
                bad++;
            }
        }
    }
    CHECKF(conns == K && msgs == K * PER && bad == 0, "%d connects, %d messages, %d out of order", conns,
           msgs, bad);
    CHECKF(loops_seen == (g_threads >= 32 ? ~0u : (1u << g_threads) - 1), "loops seen %#x", loops_seen);
    for (int i = 0; i < K; i++)
        for (uint32_t j = 0; j < PER; j++)
            CHECK(expect_u32(fds[i], j));
    for (int i = 0; i < K; i++)
        close_fd(&fds[i]);
    for (double end = now_ms() + SC(10000); closes < K && now_ms() < end;) {
        size_t n = 0;
        REQUIRE(tf_server_poll(srv, ev, 32, &n, 100) == TF_OK);
        for (size_t i = 0; i < n; i++) {
            tf_conn_id c = ev[i].conn;
            CHECK(ev[i].kind == TF_EVENT_CLOSE && ev[i].reason == TF_CLOSE_PEER);
            if (c < MAXC)
                CHECK(closed[c]++ == 0);
            closes++;
        }
    }
    CHECKF(closes == K, "%d of %d CLOSE events", closes, K);
done:
    for (int i = 0; i < K; i++)
        close_fd(&fds[i]);
    if (cfg)
        tf_config_free(cfg);
    if (srv) {
        CHECK_RC(tf_server_stop(srv, 0), TF_OK);
        tf_server_free(srv);
    }
}

static void nop_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)ud, (void)c, (void)d, (void)n;
}

static void test_a_second_server_on_the_address_fails_whatever_the_threads(void) {
    static const uint32_t counts[][2] = {{1, 2}, {2, 1}, {2, 2}, {4, 3}};
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.on_message = nop_message;
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        tf_server *first = NULL, *second = NULL;
        char addr[64];
        tf_config *a = cfg_threads(counts[i][0]), *b = cfg_threads(counts[i][1]);
        if (a == NULL || b == NULL || tf_server_start(a, &cb, &first) != TF_OK) {
            CHECK(0);
        } else {
            snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)tf_server_port(first));
            CHECK_RC(tf_config_set_address(b, addr), TF_OK);
            CHECK_RC(tf_server_start(b, &cb, &second), TF_ERR_IO);
            CHECK(second == NULL);
            int fd = cli_connect(tf_server_port(first));
            CHECK(fd >= 0);
            close_fd(&fd);
            CHECK_RC(tf_server_stop(first, 0), TF_OK);
            tf_server_free(first);
        }
        if (a)
            tf_config_free(a);
        if (b)
            tf_config_free(b);
    }
}

struct logprobe {
    int inside, overlaps, lines;
};

static void probe_log(void *ud, int32_t level, const char *msg) {
    struct logprobe *p = ud;
    (void)level, (void)msg;
    if (__atomic_fetch_add(&p->inside, 1, __ATOMIC_SEQ_CST) != 0)
        __atomic_fetch_add(&p->overlaps, 1, __ATOMIC_SEQ_CST);
    burn_us(1000);
    __atomic_fetch_add(&p->lines, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_sub(&p->inside, 1, __ATOMIC_SEQ_CST);
}

static void test_the_log_callback_is_never_called_twice_at_once(void) {
    enum { K = 8 };
    static struct logprobe probe;
    int fds[K];
    int ok = 0;
    tf_config *cfg = cfg_threads(g_threads);
    memset(&g_h, 0, sizeof g_h);
    memset(&probe, 0, sizeof probe);
    for (int i = 0; i < K; i++)
        fds[i] = -1;
    REQUIRE(cfg != NULL && tf_config_set_max_frame(cfg, 16) == TF_OK);
    REQUIRE(tf_config_set_log(cfg, probe_log, &probe) == TF_OK);
    REQUIRE(th_start(&g_h, cfg) != NULL);
    for (int i = 0; i < K; i++)
        REQUIRE((fds[i] = cli_connect(tf_server_port(g_h.srv))) >= 0);
    WAIT_FOR(g_h.connects == K, SC(5000), ok);
    REQUIRE(ok);
    { /* every connection announces a frame over max frame at once: a warning each */
        uint8_t big[4];
        put_le32(big, 1000);
        for (int i = 0; i < K; i++)
            CHECK(send_all(fds[i], big, 4) == 0);
    }
    WAIT_FOR(g_h.closes == K, SC(5000), ok);
    CHECK(ok);
    for (double end = now_ms() + SC(5000); __atomic_load_n(&probe.lines, __ATOMIC_SEQ_CST) < K && now_ms() < end;)
        sleep_ms(5);
    CHECKF(__atomic_load_n(&probe.lines, __ATOMIC_SEQ_CST) >= K, "%d log lines", probe.lines);
    CHECKF(__atomic_load_n(&probe.overlaps, __ATOMIC_SEQ_CST) == 0, "%d overlapping calls", probe.overlaps);
done:
    for (int i = 0; i < K; i++)
        close_fd(&fds[i]);
    if (g_h.srv) {
        CHECK_RC(tf_server_stop(g_h.srv, 0), TF_OK);
        tf_server_free(g_h.srv);
    }
    CHECK(__atomic_load_n(&probe.overlaps, __ATOMIC_SEQ_CST) == 0);
}

static const struct test tests[] = {
    TEST(test_affinity_spread_and_order, 20, "v"),
    TEST(test_totals_and_the_limit_across_loops, 20, "v"),
    TEST(test_cross_loop_sends_and_closes_racing_peer_closes, 30, "v"),
    TEST(test_stop_from_another_thread_while_every_loop_is_busy, 30, "v"),
    TEST(test_stop_inside_a_callback_of_every_loop_is_invalid, 20, "v"),
    TEST(test_free_from_a_callback_of_one_loop_ends_every_callback, 30, "v"),
    TEST(test_pull_mode_one_queue_per_connection_order, 30, "v"),
    TEST(test_a_second_server_on_the_address_fails_whatever_the_threads, 20, "v"),
    TEST(test_the_log_callback_is_never_called_twice_at_once, 20, "v"),
};

int main(int argc, char **argv) {
    const char *t = getenv("TF_TEST_THREADS");
    if (t && atoi(t) >= 1)
        g_threads = (uint32_t)atoi(t);
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}

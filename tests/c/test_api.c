/* test_api: drives the real libtcpframe through its C API over real sockets on
 * 127.0.0.1, one behaviour per test, every wait bounded. Prints one line per
 * test and "N passed, M failed" at the end; exits non-zero on any failure.
 *
 *   test_api [NAME_SUBSTRING]      runs only the tests whose name contains it */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

/* Long enough for valgrind on a loaded 2-core machine; only waits for things
 * that should happen use it, so a passing run never sleeps this long. */
#define WAIT_MS 10000
/* How long we watch for something that must NOT happen. */
#define QUIET_MS 300
#define UNKNOWN_ID ((tf_conn_id)987654321u)

/* ---- checks --------------------------------------------------------------- */

static int g_check_failures; /* in the current test */

static void check_failed(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "    %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    g_check_failures++;
}

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond))                                                                          \
            check_failed(__FILE__, __LINE__, "CHECK(%s) failed", #cond);                      \
    } while (0)

#define CHECK_RC(expr, want)                                                                  \
    do {                                                                                      \
        int32_t rc_ = (int32_t)(expr);                                                        \
        if (rc_ != (int32_t)(want))                                                           \
            check_failed(__FILE__, __LINE__, "%s returned %d, want %d (%s); last error: '%s'", \
                         #expr, (int)rc_, (int)(want), #want, tf_last_error());               \
    } while (0)

#define CHECK_U64(got, want)                                                                  \
    do {                                                                                      \
        uint64_t g_ = (uint64_t)(got), w_ = (uint64_t)(want);                                 \
        if (g_ != w_)                                                                         \
            check_failed(__FILE__, __LINE__, "%s is %" PRIu64 ", want %" PRIu64, #got, g_, w_); \
    } while (0)

/* A failed precondition: record it and leave the test (after its cleanup label). */
#define REQUIRE(cond)                                                                         \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            check_failed(__FILE__, __LINE__, "REQUIRE(%s) failed", #cond);                    \
            goto done;                                                                        \
        }                                                                                     \
    } while (0)

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int contains_nocase(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (strncasecmp(hay, needle, n) == 0)
            return 1;
    return 0;
}

/* ---- a recording host ------------------------------------------------------ */

#define MAX_RECORDS 64

struct rec {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* The server handle, published by the test after tf_server_start returns. */
    int published;
    tf_server *srv;
    /* What the callbacks do. Set before start. */
    int refuse;           /* on_connect returns this */
    int echo;             /* on_message echoes with tf_send */
    int stop_in_callback; /* on_message calls tf_server_stop and records the result */
    int fill_queue;       /* on_message sends two 50-byte frames (the queue holds one) */
    int stats_in_close;   /* on_close takes a stats snapshot */
    int close_in_connect; /* on_connect accepts, then calls tf_conn_close on it */
    int send_in_close;    /* on_close tries tf_send on the closing connection */
    /* What happened, under mu. */
    int connects, messages, closes, logs, bad_logs;
    tf_conn_id connect_ids[MAX_RECORDS];
    char last_peer[128];
    tf_conn_id message_ids[MAX_RECORDS];
    size_t message_lens[MAX_RECORDS];
    tf_conn_id close_ids[MAX_RECORDS];
    int32_t close_reasons[MAX_RECORDS];
    int32_t cb_rc[2];
    char cb_error[256];
    tf_stats close_stats;
    int32_t close_stats_rc;
    int32_t connect_close_rc;
    int32_t close_send_rc;
    int threads_seen; /* callbacks ran on a thread other than the first one */
    pthread_t loop_thread;
    int have_loop_thread;
};

static void rec_init(struct rec *r) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
}

static void rec_destroy(struct rec *r) {
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
}

/* Called with mu held at the start of every callback. */
static void rec_enter(struct rec *r) {
    while (!r->published)
        pthread_cond_wait(&r->cv, &r->mu);
    if (!r->have_loop_thread) {
        r->loop_thread = pthread_self();
        r->have_loop_thread = 1;
    } else if (!pthread_equal(r->loop_thread, pthread_self())) {
        r->threads_seen++;
    }
}

static int rec_on_connect(void *ud, tf_conn_id conn, const char *peer) {
    struct rec *r = ud;
    pthread_mutex_lock(&r->mu);
    rec_enter(r);
    if (r->connects < MAX_RECORDS)
        r->connect_ids[r->connects] = conn;
    r->connects++;
    snprintf(r->last_peer, sizeof r->last_peer, "%s", peer ? peer : "(null)");
    int refuse = r->refuse, close_now = r->close_in_connect;
    tf_server *srv = r->srv;
    pthread_mutex_unlock(&r->mu);
    int32_t rc = close_now ? tf_conn_close(srv, conn) : TF_OK;
    pthread_mutex_lock(&r->mu);
    r->connect_close_rc = rc;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    return refuse;
}

static void rec_on_message(void *ud, tf_conn_id conn, const uint8_t *data, size_t len) {
    struct rec *r = ud;
    pthread_mutex_lock(&r->mu);
    rec_enter(r);
    tf_server *srv = r->srv;
    int echo = r->echo, stop = r->stop_in_callback, fill = r->fill_queue;
    pthread_mutex_unlock(&r->mu);

    /* Library calls are made without holding mu. */
    int32_t rc0 = TF_OK, rc1 = TF_OK;
    char err[256] = "";
    if (stop) {
        rc0 = tf_server_stop(srv, 0);
        snprintf(err, sizeof err, "%s", tf_last_error());
    }
    if (fill) {
        uint8_t block[50];
        memset(block, 'q', sizeof block);
        rc0 = tf_send(srv, conn, block, sizeof block);
        rc1 = tf_send(srv, conn, block, sizeof block);
    }
    if (echo)
        (void)tf_send(srv, conn, data, len);

    pthread_mutex_lock(&r->mu);
    if (r->messages < MAX_RECORDS) {
        r->message_ids[r->messages] = conn;
        r->message_lens[r->messages] = len;
    }
    r->messages++;
    if (stop || fill) {
        r->cb_rc[0] = rc0;
        r->cb_rc[1] = rc1;
        snprintf(r->cb_error, sizeof r->cb_error, "%s", err);
    }
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static void rec_on_close(void *ud, tf_conn_id conn, int32_t reason) {
    struct rec *r = ud;
    pthread_mutex_lock(&r->mu);
    rec_enter(r);
    int want_stats = r->stats_in_close, try_send = r->send_in_close;
    tf_server *srv = r->srv;
    pthread_mutex_unlock(&r->mu);

    tf_stats st;
    memset(&st, 0, sizeof st);
    int32_t st_rc = want_stats ? tf_server_stats(srv, &st) : TF_OK;
    int32_t send_rc = try_send ? tf_send(srv, conn, (const uint8_t *)"x", 1) : TF_OK;

    pthread_mutex_lock(&r->mu);
    if (r->closes < MAX_RECORDS) {
        r->close_ids[r->closes] = conn;
        r->close_reasons[r->closes] = reason;
    }
    r->closes++;
    if (want_stats) {
        r->close_stats = st;
        r->close_stats_rc = st_rc;
    }
    r->close_send_rc = send_rc;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static void rec_on_log(void *ud, int32_t level, const char *msg) {
    struct rec *r = ud;
    pthread_mutex_lock(&r->mu);
    r->logs++;
    if (level < TF_LOG_ERROR || level > TF_LOG_DEBUG || msg == NULL)
        r->bad_logs++;
    pthread_mutex_unlock(&r->mu);
}

static tf_callbacks rec_callbacks(struct rec *r) {
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = r;
    cb.on_connect = rec_on_connect;
    cb.on_message = rec_on_message;
    cb.on_close = rec_on_close;
    return cb;
}

static void rec_publish(struct rec *r, tf_server *srv) {
    pthread_mutex_lock(&r->mu);
    r->srv = srv;
    r->published = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

/* Waits, at most ms, until cond (an expression over r's fields) holds. Yields
 * whether it does. mu is held while cond is evaluated. */
#define WAIT_UNTIL(r, cond, ms, ok)                                                          \
    do {                                                                                     \
        int64_t end_ = now_ms() + (ms);                                                      \
        pthread_mutex_lock(&(r)->mu);                                                        \
        while (!(cond)) {                                                                    \
            int64_t left_ = end_ - now_ms();                                                 \
            if (left_ <= 0)                                                                  \
                break;                                                                       \
            struct timespec ts_;                                                             \
            clock_gettime(CLOCK_REALTIME, &ts_);                                             \
            int64_t step_ = left_ < 50 ? left_ : 50;                                         \
            ts_.tv_nsec += (long)(step_ * 1000000);                                          \
            if (ts_.tv_nsec >= 1000000000L) {                                                \
                ts_.tv_sec++;                                                                \
                ts_.tv_nsec -= 1000000000L;                                                  \
            }                                                                                \
            pthread_cond_timedwait(&(r)->cv, &(r)->mu, &ts_);                                \
        }                                                                                    \
        (ok) = (cond);                                                                       \
        pthread_mutex_unlock(&(r)->mu);                                                      \
    } while (0)

/* Starts a push-mode server for r on 127.0.0.1:0 (or cfg, when given). */
static tf_server *start_rec_server(struct rec *r, tf_config *cfg) {
    tf_config *own = NULL;
    if (cfg == NULL) {
        own = tf_config_new();
        if (own == NULL || tf_config_set_address(own, "127.0.0.1:0") != TF_OK) {
            tf_config_free(own);
            return NULL;
        }
        cfg = own;
    }
    tf_callbacks cb = rec_callbacks(r);
    tf_server *srv = NULL;
    int32_t rc = tf_server_start(cfg, &cb, &srv);
    tf_config_free(own);
    if (rc != TF_OK) {
        fprintf(stderr, "    tf_server_start: %d: %s\n", (int)rc, tf_last_error());
        srv = NULL;
    }
    rec_publish(r, srv);
    return srv;
}

static tf_config *config_on(const char *addr) {
    tf_config *cfg = tf_config_new();
    if (cfg != NULL && tf_config_set_address(cfg, addr) != TF_OK) {
        tf_config_free(cfg);
        return NULL;
    }
    return cfg;
}

/* Polls tf_server_stats until pred holds for the snapshot, at most ms. */
static int wait_stats(tf_server *srv, tf_stats *st, int (*pred)(const tf_stats *, uint64_t),
                      uint64_t arg, int ms) {
    int64_t end = now_ms() + ms;
    for (;;) {
        if (tf_server_stats(srv, st) == TF_OK && pred(st, arg))
            return 1;
        if (now_ms() >= end)
            return 0;
        sleep_ms(10);
    }
}

static int frames_sent_at_least(const tf_stats *st, uint64_t n) { return st->frames_sent >= n; }
static int active_is(const tf_stats *st, uint64_t n) { return st->connections_active == n; }
static int rejected_at_least(const tf_stats *st, uint64_t n) {
    return st->connections_rejected >= n;
}

/* ---- a plain-socket client ---------------------------------------------------- */

static void set_timeouts(int fd, int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int cli_connect_family(int family, uint16_t port) {
    int fd = socket(family, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    set_timeouts(fd, WAIT_MS);
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rc;
    if (family == AF_INET6) {
        struct sockaddr_in6 a;
        memset(&a, 0, sizeof a);
        a.sin6_family = AF_INET6;
        a.sin6_port = htons(port);
        a.sin6_addr = in6addr_loopback;
        rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    } else {
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons(port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    }
    if (rc != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int cli_connect(uint16_t port) { return cli_connect_family(AF_INET, port); }

static int send_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static int send_frame(int fd, const void *data, size_t len) {
    uint8_t prefix[4];
    put_le32(prefix, (uint32_t)len);
    if (send_all(fd, prefix, 4) != 0)
        return -1;
    return len ? send_all(fd, data, len) : 0;
}

static int recv_all(int fd, void *buf, size_t len) {
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = recv(fd, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1; /* error, timeout (SO_RCVTIMEO) or EOF */
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Receives one frame into buf (cap bytes); 0 on success. */
static int recv_frame(int fd, void *buf, size_t cap, size_t *len) {
    uint8_t prefix[4];
    if (recv_all(fd, prefix, 4) != 0)
        return -1;
    uint32_t n = (uint32_t)prefix[0] | (uint32_t)prefix[1] << 8 | (uint32_t)prefix[2] << 16 |
                 (uint32_t)prefix[3] << 24;
    if (n > cap)
        return -1;
    *len = n;
    return n ? recv_all(fd, buf, n) : 0;
}

/* Expects exactly `text` as the next frame. */
static int expect_frame(int fd, const char *text) {
    char buf[512];
    size_t len = 0;
    if (recv_frame(fd, buf, sizeof buf, &len) != 0)
        return 0;
    return len == strlen(text) && memcmp(buf, text, len) == 0;
}

/* 1 when the peer closes (EOF or reset) within ms; data before that is skipped. */
static int expect_closed(int fd, int ms) {
    int64_t end = now_ms() + ms;
    for (;;) {
        int left = (int)(end - now_ms());
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
        int n = poll(&p, 1, left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        char buf[4096];
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && (errno == ECONNRESET || errno == EPIPE)))
            return 1;
        if (r < 0 && errno != EAGAIN && errno != EINTR)
            return 1;
    }
}

/* 1 when nothing at all (no data, no EOF) arrives within ms. */
static int expect_silence(int fd, int ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    return poll(&p, 1, ms) == 0;
}

static void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_version_and_last_error_never_null(void) {
    const char *v = tf_version();
    REQUIRE(v != NULL);
    CHECK(v[0] >= '0' && v[0] <= '9');
    CHECK(strchr(v, '.') != NULL);
    CHECK(tf_last_error() != NULL);
done:;
}

static void *read_last_error(void *out) {
    const char *e = tf_last_error();
    snprintf(out, 256, "%s", e ? e : "(NULL)");
    return NULL;
}

static void test_last_error_is_per_thread(void) {
    tf_config *cfg = tf_config_new();
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_max_connections(cfg, 0), TF_ERR_INVALID);
    CHECK(tf_last_error()[0] != '\0');
    char other[256] = "unset";
    pthread_t t;
    REQUIRE(pthread_create(&t, NULL, read_last_error, other) == 0);
    pthread_join(t, NULL);
    CHECK(strcmp(other, "") == 0); /* a fresh thread has had no failure */
    CHECK(tf_last_error()[0] != '\0'); /* and ours is still there */
done:
    tf_config_free(cfg);
}

static void test_config_setters_validate(void) {
    tf_config *cfg = tf_config_new();
    REQUIRE(cfg != NULL);
    const char *good[] = {"127.0.0.1:5882", "0.0.0.0:9000", "[::1]:0", "127.0.0.1:0",
                          "127.0.0.1:65535"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        CHECK_RC(tf_config_set_address(cfg, good[i]), TF_OK);
    const char *bad[] = {"",           "nonsense",        "127.0.0.1",     "127.0.0.1:",
                         ":5882",      "127.0.0.1:65536", "127.0.0.1:-1",  "999.0.0.1:80",
                         "[::1",       "[::1]",           "::1:80",        "127.0.0.1:80x",
                         "127.0.0.1:80:80"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int32_t rc = tf_config_set_address(cfg, bad[i]);
        if (rc != TF_ERR_INVALID)
            check_failed(__FILE__, __LINE__, "set_address(\"%s\") = %d, want INVALID", bad[i],
                         (int)rc);
        CHECK(tf_last_error()[0] != '\0');
    }
    CHECK_RC(tf_config_set_max_connections(cfg, 0), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_max_connections(cfg, 1), TF_OK);
    CHECK_RC(tf_config_set_max_connections(cfg, 4096), TF_OK);
    CHECK_RC(tf_config_set_max_frame(cfg, 0), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_max_frame(cfg, 1), TF_OK);
    CHECK_RC(tf_config_set_max_frame(cfg, UINT32_MAX), TF_OK); /* 2^32-1 is the 4-byte max */
    CHECK_RC(tf_config_set_max_queued_output(cfg, 0), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_max_queued_output(cfg, 1u << 20), TF_OK);
    CHECK_RC(tf_config_set_idle_timeout_ms(cfg, 0), TF_OK); /* 0 means never */
    CHECK_RC(tf_config_set_idle_timeout_ms(cfg, 250), TF_OK);
    CHECK_RC(tf_config_set_backend(cfg, TF_BACKEND_AUTO), TF_OK);
    CHECK_RC(tf_config_set_backend(cfg, TF_BACKEND_POLL), TF_OK);
    CHECK_RC(tf_config_set_backend(cfg, TF_BACKEND_EPOLL), TF_OK); /* Linux */
    CHECK_RC(tf_config_set_backend(cfg, 3), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_backend(cfg, -1), TF_ERR_INVALID);
    CHECK_RC(tf_config_set_backend(cfg, 1000), TF_ERR_INVALID);
    struct rec r;
    rec_init(&r);
    CHECK_RC(tf_config_set_log(cfg, rec_on_log, &r), TF_OK);
    rec_destroy(&r);
done:
    tf_config_free(cfg);
    tf_config_free(NULL); /* fine */
}

/* Each NULL-argument call runs on a fresh thread, so the message it leaves in
 * tf_last_error cannot be one left over from an earlier failure. */
struct null_case {
    int which;
    tf_config *cfg;
    tf_server *srv;  /* a running push server */
    tf_server *pull; /* a running pull server */
    int32_t rc;
    char err[256];
};

static void noop_log(void *ud, int32_t level, const char *msg) {
    (void)ud;
    (void)level;
    (void)msg;
}

static void noop_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    (void)ud;
    (void)c;
    (void)d;
    (void)n;
}

static const char *const null_case_names[] = {
    "tf_config_set_address(NULL, addr)",
    "tf_config_set_address(cfg, NULL)",
    "tf_config_set_max_connections(NULL, 10)",
    "tf_config_set_max_frame(NULL, 10)",
    "tf_config_set_idle_timeout_ms(NULL, 10)",
    "tf_config_set_max_queued_output(NULL, 10)",
    "tf_config_set_backend(NULL, AUTO)",
    "tf_config_set_log(NULL, fn, NULL)",
    "tf_server_start(cfg, NULL, &out)",
    "tf_server_start(cfg, &cb, NULL)",
    "tf_server_start(cfg, cb without on_message, &out)",
    "tf_server_start_pull(cfg, NULL)",
    "tf_send(NULL, id, data, 1)",
    "tf_send(srv, id, NULL, 1)",
    "tf_conn_close(NULL, id)",
    "tf_server_stats(NULL, &st)",
    "tf_server_stats(srv, NULL)",
    "tf_server_stop(NULL, 0)",
    "tf_server_poll(NULL, ev, 4, &count, 0)",
    "tf_server_poll(srv, NULL, 4, &count, 0)",
    "tf_server_poll(srv, ev, 4, NULL, 0)",
};

static void *run_null_case(void *arg) {
    struct null_case *c = arg;
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.on_message = noop_message;
    tf_server *out = NULL;
    tf_stats st;
    tf_event ev[4];
    size_t count = 0;
    const uint8_t one = 'x';
    switch (c->which) {
    case 0: c->rc = tf_config_set_address(NULL, "127.0.0.1:0"); break;
    case 1: c->rc = tf_config_set_address(c->cfg, NULL); break;
    case 2: c->rc = tf_config_set_max_connections(NULL, 10); break;
    case 3: c->rc = tf_config_set_max_frame(NULL, 10); break;
    case 4: c->rc = tf_config_set_idle_timeout_ms(NULL, 10); break;
    case 5: c->rc = tf_config_set_max_queued_output(NULL, 10); break;
    case 6: c->rc = tf_config_set_backend(NULL, TF_BACKEND_AUTO); break;
    case 7: c->rc = tf_config_set_log(NULL, noop_log, NULL); break;
    case 8: c->rc = tf_server_start(c->cfg, NULL, &out); break;
    case 9: c->rc = tf_server_start(c->cfg, &cb, NULL); break;
    case 10:
        cb.on_message = NULL;
        c->rc = tf_server_start(c->cfg, &cb, &out);
        break;
    case 11: c->rc = tf_server_start_pull(c->cfg, NULL); break;
    case 12: c->rc = tf_send(NULL, 1, &one, 1); break;
    case 13: c->rc = tf_send(c->srv, 1, NULL, 1); break;
    case 14: c->rc = tf_conn_close(NULL, 1); break;
    case 15: c->rc = tf_server_stats(NULL, &st); break;
    case 16: c->rc = tf_server_stats(c->srv, NULL); break;
    case 17: c->rc = tf_server_stop(NULL, 0); break;
    case 18: c->rc = tf_server_poll(NULL, ev, 4, &count, 0); break;
    case 19: c->rc = tf_server_poll(c->pull, NULL, 4, &count, 0); break;
    case 20: c->rc = tf_server_poll(c->pull, ev, 4, NULL, 0); break;
    default: c->rc = -1; break;
    }
    if (out != NULL) /* must not happen; do not leak a server if it does */
        tf_server_free(out);
    snprintf(c->err, sizeof c->err, "%s", tf_last_error());
    return NULL;
}

static void test_null_arguments_are_invalid(void) {
    struct rec r;
    rec_init(&r);
    tf_server *srv = start_rec_server(&r, NULL);
    tf_config *cfg = config_on("127.0.0.1:0");
    tf_server *pull = NULL;
    REQUIRE(srv != NULL && cfg != NULL);
    CHECK_RC(tf_server_start_pull(cfg, &pull), TF_OK);
    REQUIRE(pull != NULL);
    for (int i = 0; i < (int)(sizeof null_case_names / sizeof null_case_names[0]); i++) {
        struct null_case c;
        memset(&c, 0, sizeof c);
        c.which = i;
        c.cfg = cfg;
        c.srv = srv;
        c.pull = pull;
        pthread_t t;
        REQUIRE(pthread_create(&t, NULL, run_null_case, &c) == 0);
        pthread_join(t, NULL);
        if (c.rc != TF_ERR_INVALID)
            check_failed(__FILE__, __LINE__, "%s = %d, want TF_ERR_INVALID", null_case_names[i],
                         (int)c.rc);
        if (c.err[0] == '\0')
            check_failed(__FILE__, __LINE__, "%s left tf_last_error() empty", null_case_names[i]);
    }
    CHECK(tf_server_port(NULL) == 0);
    CHECK(tf_server_fd(NULL) == -1);
    tf_server_free(NULL);
    tf_config_free(NULL);
    /* Both servers still work after all that. */
    CHECK(tf_server_port(srv) != 0);
    tf_stats st;
    CHECK_RC(tf_server_stats(srv, &st), TF_OK);
done:
    tf_server_free(pull);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

static void test_start_on_port_0_and_echo(void) {
    struct rec r;
    rec_init(&r);
    r.echo = 1;
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    uint16_t port = tf_server_port(srv);
    CHECK(port != 0);
    fd = cli_connect(port);
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    CHECK(r.connect_ids[0] != 0);
    CHECK(strncmp(r.last_peer, "127.0.0.1:", 10) == 0);

    /* one frame; an empty frame; two frames in one write; a frame in 3 pieces */
    REQUIRE(send_frame(fd, "hello", 5) == 0);
    CHECK(expect_frame(fd, "hello"));
    REQUIRE(send_frame(fd, NULL, 0) == 0);
    CHECK(expect_frame(fd, ""));
    uint8_t two[4 + 3 + 4 + 4];
    put_le32(two, 3);
    memcpy(two + 4, "one", 3);
    put_le32(two + 7, 4);
    memcpy(two + 11, "four", 4);
    REQUIRE(send_all(fd, two, sizeof two) == 0);
    CHECK(expect_frame(fd, "one"));
    CHECK(expect_frame(fd, "four"));
    uint8_t split[4 + 6];
    put_le32(split, 6);
    memcpy(split + 4, "pieces", 6);
    REQUIRE(send_all(fd, split, 2) == 0);
    sleep_ms(20);
    REQUIRE(send_all(fd, split + 2, 5) == 0);
    sleep_ms(20);
    REQUIRE(send_all(fd, split + 7, 3) == 0);
    CHECK(expect_frame(fd, "pieces"));

    /* a large frame comes back byte for byte */
    size_t big_len = 300000;
    uint8_t *big = malloc(big_len), *back = malloc(big_len);
    REQUIRE(big != NULL && back != NULL);
    for (size_t i = 0; i < big_len; i++)
        big[i] = (uint8_t)(i * 7 + 3);
    size_t got = 0;
    int sent_ok = send_frame(fd, big, big_len) == 0;
    int recv_ok = sent_ok && recv_frame(fd, back, big_len, &got) == 0;
    CHECK(sent_ok && recv_ok && got == big_len && memcmp(big, back, big_len) == 0);
    free(big);
    free(back);

    /* 6 frames in, 6 out: 5+0+3+4+6+300000 payload bytes plus 6 prefixes */
    uint64_t bytes = 6 * 4 + 5 + 0 + 3 + 4 + 6 + 300000;
    tf_stats st;
    CHECK(wait_stats(srv, &st, frames_sent_at_least, 6, WAIT_MS));
    CHECK_U64(st.frames_received, 6);
    CHECK_U64(st.frames_sent, 6);
    CHECK_U64(st.bytes_received, bytes);
    CHECK_U64(st.bytes_sent, bytes);
    CHECK_U64(st.connections_accepted, 1);
    CHECK_U64(st.connections_active, 1);
    pthread_mutex_lock(&r.mu);
    int all_same_conn = r.messages == 6;
    for (int i = 0; i < r.messages && i < MAX_RECORDS; i++)
        all_same_conn = all_same_conn && r.message_ids[i] == r.connect_ids[0];
    CHECK(all_same_conn);
    CHECK(r.message_lens[1] == 0);
    pthread_mutex_unlock(&r.mu);

    /* the peer leaves: on_close(PEER) once, and the stats say so */
    close_fd(&fd);
    WAIT_UNTIL(&r, r.closes == 1, WAIT_MS, ok);
    CHECK(ok);
    CHECK(r.close_ids[0] == r.connect_ids[0]);
    CHECK(r.close_reasons[0] == TF_CLOSE_PEER);
    CHECK(wait_stats(srv, &st, active_is, 0, WAIT_MS));
    CHECK_RC(tf_server_stop(srv, 1000), TF_OK);
    CHECK(r.closes == 1);
    CHECK(r.threads_seen == 0); /* every callback on one thread */
    CHECK(!pthread_equal(r.loop_thread, pthread_self()));
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void echo_once_with_backend(int32_t backend, const char *addr, const char *peer_prefix) {
    struct rec r;
    rec_init(&r);
    r.echo = 1;
    int fd = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on(addr);
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_backend(cfg, backend), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    fd = cli_connect_family(addr[0] == '[' ? AF_INET6 : AF_INET, tf_server_port(srv));
    REQUIRE(fd >= 0);
    for (int i = 0; i < 20; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "frame %d", i);
        REQUIRE(send_frame(fd, msg, strlen(msg)) == 0);
        CHECK(expect_frame(fd, msg));
    }
    CHECK(strncmp(r.last_peer, peer_prefix, strlen(peer_prefix)) == 0);
done:
    close_fd(&fd);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

static void test_echo_with_poll_backend(void) {
    echo_once_with_backend(TF_BACKEND_POLL, "127.0.0.1:0", "127.0.0.1:");
}

static void test_echo_with_epoll_backend(void) {
    echo_once_with_backend(TF_BACKEND_EPOLL, "127.0.0.1:0", "127.0.0.1:");
}

static void test_echo_over_ipv6_loopback(void) {
    int probe = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a;
    memset(&a, 0, sizeof a);
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_loopback;
    int usable = probe >= 0 && bind(probe, (struct sockaddr *)&a, sizeof a) == 0;
    if (probe >= 0)
        close(probe);
    if (!usable) {
        fprintf(stderr, "    (no IPv6 loopback on this machine; not tested)\n");
        return;
    }
    echo_once_with_backend(TF_BACKEND_AUTO, "[::1]:0", "[::1]:");
}

static void test_conn_ids_are_unique_and_not_reused(void) {
    struct rec r;
    rec_init(&r);
    int fds[3] = {-1, -1, -1};
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    for (int i = 0; i < 3; i++) {
        fds[i] = cli_connect(tf_server_port(srv));
        REQUIRE(fds[i] >= 0);
        int ok;
        WAIT_UNTIL(&r, r.connects == i + 1, WAIT_MS, ok);
        REQUIRE(ok);
        close_fd(&fds[i]); /* closed before the next one: its slot is free again */
        WAIT_UNTIL(&r, r.closes == i + 1, WAIT_MS, ok);
        REQUIRE(ok);
    }
    CHECK(r.connect_ids[0] != 0 && r.connect_ids[1] != 0 && r.connect_ids[2] != 0);
    CHECK(r.connect_ids[0] != r.connect_ids[1]);
    CHECK(r.connect_ids[1] != r.connect_ids[2]);
    CHECK(r.connect_ids[0] != r.connect_ids[2]);
done:
    for (int i = 0; i < 3; i++)
        close_fd(&fds[i]);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_send_from_host_thread_keeps_order(void) {
    struct rec r;
    rec_init(&r);
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    tf_conn_id id = r.connect_ids[0];
    for (int i = 0; i < 200; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "n%d", i);
        CHECK_RC(tf_send(srv, id, (const uint8_t *)msg, strlen(msg)), TF_OK);
    }
    int in_order = 1;
    for (int i = 0; i < 200 && in_order; i++) {
        char msg[32];
        snprintf(msg, sizeof msg, "n%d", i);
        in_order = expect_frame(fd, msg);
    }
    CHECK(in_order);
    CHECK(r.messages == 0);
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_send_too_large_is_refused(void) {
    struct rec r;
    rec_init(&r);
    int fd = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_max_frame(cfg, 16), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    tf_conn_id id = r.connect_ids[0];
    const uint8_t seventeen[17] = "0123456789abcdef";
    CHECK_RC(tf_send(srv, id, seventeen, 17), TF_ERR_TOO_LARGE);
    CHECK(tf_last_error()[0] != '\0');
    CHECK_RC(tf_send(srv, id, seventeen, 16), TF_OK);
    CHECK(expect_frame(fd, "0123456789abcdef")); /* the 16-byte one, and only it */
    CHECK(expect_silence(fd, QUIET_MS));
done:
    close_fd(&fd);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

static void test_peer_frame_over_max_closes_only_that_conn(void) {
    struct rec r;
    rec_init(&r);
    r.echo = 1;
    r.stats_in_close = 1;
    int bad = -1, good = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_max_frame(cfg, 16), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    good = cli_connect(tf_server_port(srv));
    bad = cli_connect(tf_server_port(srv));
    REQUIRE(good >= 0 && bad >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 2, WAIT_MS, ok);
    REQUIRE(ok);
    uint8_t prefix[4];
    put_le32(prefix, 17); /* announces 17 bytes and sends none: no payload is awaited */
    REQUIRE(send_all(bad, prefix, 4) == 0);
    CHECK(expect_closed(bad, WAIT_MS));
    WAIT_UNTIL(&r, r.closes == 1, WAIT_MS, ok);
    CHECK(ok);
    CHECK(r.close_reasons[0] == TF_CLOSE_TOO_LARGE);
    /* stats before callbacks: on_close already saw the connection counted */
    CHECK_RC(r.close_stats_rc, TF_OK);
    CHECK_U64(r.close_stats.closed_too_large, 1);
    CHECK_U64(r.close_stats.connections_active, 1);
    tf_stats st;
    CHECK_RC(tf_server_stats(srv, &st), TF_OK);
    CHECK_U64(st.closed_too_large, 1);
    CHECK_U64(st.frames_received, 0);
    /* a frame of exactly max is fine, and the other connection never noticed */
    REQUIRE(send_frame(good, "exactly sixteen!", 16) == 0);
    CHECK(expect_frame(good, "exactly sixteen!"));
    CHECK(r.messages == 1);
done:
    close_fd(&bad);
    close_fd(&good);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

static void test_unknown_conn_id_is_no_conn(void) {
    struct rec r;
    rec_init(&r);
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    CHECK_RC(tf_send(srv, UNKNOWN_ID, (const uint8_t *)"x", 1), TF_ERR_NO_CONN);
    CHECK(tf_last_error()[0] != '\0');
    CHECK_RC(tf_conn_close(srv, UNKNOWN_ID), TF_ERR_NO_CONN);
    CHECK(tf_last_error()[0] != '\0');
done:
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_conn_close_flushes_then_closes(void) {
    struct rec r;
    rec_init(&r);
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    tf_conn_id id = r.connect_ids[0];
    CHECK_RC(tf_send(srv, id, (const uint8_t *)"bye", 3), TF_OK);
    CHECK_RC(tf_conn_close(srv, id), TF_OK);
    /* closed for new frames at once */
    CHECK_RC(tf_send(srv, id, (const uint8_t *)"late", 4), TF_ERR_NO_CONN);
    CHECK_RC(tf_conn_close(srv, id), TF_ERR_NO_CONN);
    /* what was queued before the close still arrives, then EOF */
    CHECK(expect_frame(fd, "bye"));
    CHECK(expect_closed(fd, WAIT_MS));
    WAIT_UNTIL(&r, r.closes == 1, WAIT_MS, ok);
    CHECK(ok);
    CHECK(r.close_ids[0] == id);
    CHECK(r.close_reasons[0] == TF_CLOSE_LOCAL);
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_stop_twice_then_calls_are_stopped(void) {
    struct rec r;
    rec_init(&r);
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    tf_conn_id id = r.connect_ids[0];
    CHECK_RC(tf_server_stop(srv, 100), TF_OK);
    /* when stop returns, every open connection has had its SHUTDOWN close */
    pthread_mutex_lock(&r.mu);
    CHECK(r.closes == 1);
    CHECK(r.close_ids[0] == id);
    CHECK(r.close_reasons[0] == TF_CLOSE_SHUTDOWN);
    pthread_mutex_unlock(&r.mu);
    CHECK_RC(tf_server_stop(srv, 100), TF_OK); /* idempotent */
    tf_stats st;
    CHECK_RC(tf_server_stats(srv, &st), TF_OK); /* stats stay readable after stop */
    CHECK_U64(st.connections_active, 0);
    CHECK_U64(st.connections_accepted, 1);
    CHECK_RC(tf_send(srv, id, (const uint8_t *)"x", 1), TF_ERR_STOPPED);
    CHECK(tf_last_error()[0] != '\0');
    CHECK_RC(tf_send(srv, UNKNOWN_ID, (const uint8_t *)"x", 1), TF_ERR_STOPPED); /* wins */
    CHECK_RC(tf_conn_close(srv, id), TF_ERR_STOPPED);
    CHECK_RC(tf_conn_close(srv, UNKNOWN_ID), TF_ERR_STOPPED);
    CHECK(expect_closed(fd, WAIT_MS));
    /* the port is closed: nobody accepts any more */
    int again = cli_connect(tf_server_port(srv) ? tf_server_port(srv) : 1);
    if (again >= 0) {
        CHECK(expect_closed(again, WAIT_MS));
        close(again);
    }
    CHECK(r.closes == 1 && r.connects == 1); /* nothing after stop */
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_stop_inside_callback_is_invalid(void) {
    struct rec r;
    rec_init(&r);
    r.stop_in_callback = 1;
    r.echo = 1;
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    REQUIRE(send_frame(fd, "stop?", 5) == 0);
    int ok;
    WAIT_UNTIL(&r, r.messages == 1, WAIT_MS, ok);
    REQUIRE(ok);
    CHECK_RC(r.cb_rc[0], TF_ERR_INVALID);
    CHECK(r.cb_error[0] != '\0');
    /* the server did not stop: the echo sent after the refused stop arrives */
    CHECK(expect_frame(fd, "stop?"));
    pthread_mutex_lock(&r.mu);
    r.stop_in_callback = 0;
    pthread_mutex_unlock(&r.mu);
    REQUIRE(send_frame(fd, "still here", 10) == 0);
    CHECK(expect_frame(fd, "still here"));
    CHECK_RC(tf_server_stop(srv, 100), TF_OK);
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_address_in_use_is_io_with_message(void) {
    struct rec a, b;
    rec_init(&a);
    rec_init(&b);
    tf_server *first = start_rec_server(&a, NULL), *second = NULL;
    tf_config *cfg = NULL;
    REQUIRE(first != NULL);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", (unsigned)tf_server_port(first));
    cfg = config_on(addr);
    REQUIRE(cfg != NULL);
    tf_callbacks cb = rec_callbacks(&b);
    CHECK_RC(tf_server_start(cfg, &cb, &second), TF_ERR_IO);
    const char *msg = tf_last_error();
    CHECK(contains_nocase(msg, "in use"));
    if (!contains_nocase(msg, "in use"))
        fprintf(stderr, "    message was: '%s'\n", msg);
    CHECK(second == NULL);
    /* pull mode reports it the same way */
    tf_server *third = NULL;
    CHECK_RC(tf_server_start_pull(cfg, &third), TF_ERR_IO);
    CHECK(contains_nocase(tf_last_error(), "in use"));
    tf_server_free(third);
    rec_publish(&b, NULL);
done:
    if (second != NULL)
        tf_server_free(second);
    tf_server_free(first);
    tf_config_free(cfg);
    rec_destroy(&a);
    rec_destroy(&b);
}

static void test_bad_start_address_is_invalid_or_io(void) {
    /* 192.0.2.1 (TEST-NET-1) is never a local address: bind fails, no traffic is sent. */
    tf_config *cfg = config_on("192.0.2.1:0");
    REQUIRE(cfg != NULL);
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.on_message = noop_message;
    tf_server *srv = NULL;
    int32_t rc = tf_server_start(cfg, &cb, &srv);
    CHECK(rc == TF_ERR_IO || rc == TF_ERR_INVALID);
    CHECK(tf_last_error()[0] != '\0');
    if (rc == TF_OK)
        tf_server_free(srv);
done:
    tf_config_free(cfg);
}

static void test_refused_connection_is_rejected_silently(void) {
    struct rec r;
    rec_init(&r);
    r.refuse = 1;
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    (void)send_frame(fd, "ignored", 7); /* may fail if the reset came first */
    CHECK(expect_closed(fd, WAIT_MS));
    tf_stats st;
    CHECK(wait_stats(srv, &st, rejected_at_least, 1, WAIT_MS));
    CHECK_U64(st.connections_rejected, 1);
    CHECK_U64(st.connections_accepted, 0);
    CHECK_U64(st.connections_active, 0);
    sleep_ms(QUIET_MS);
    CHECK(r.connects == 1);
    CHECK(r.messages == 0); /* no other callback names it */
    CHECK(r.closes == 0);
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_over_max_connections_is_rejected(void) {
    struct rec r;
    rec_init(&r);
    r.echo = 1;
    int first = -1, second = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_max_connections(cfg, 1), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    first = cli_connect(tf_server_port(srv));
    REQUIRE(first >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    second = cli_connect(tf_server_port(srv));
    REQUIRE(second >= 0); /* the kernel completes the handshake; the server then drops it */
    CHECK(expect_closed(second, WAIT_MS));
    tf_stats st;
    CHECK(wait_stats(srv, &st, rejected_at_least, 1, WAIT_MS));
    CHECK_U64(st.connections_rejected, 1);
    CHECK_U64(st.connections_accepted, 1);
    CHECK(r.connects == 1); /* on_connect is not asked about the extra one */
    REQUIRE(send_frame(first, "first", 5) == 0);
    CHECK(expect_frame(first, "first"));
done:
    close_fd(&first);
    close_fd(&second);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

static void test_idle_timeout_closes_quiet_conn_only(void) {
    struct rec r;
    rec_init(&r);
    r.echo = 1;
    r.stats_in_close = 1;
    int quiet = -1, busy = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_idle_timeout_ms(cfg, 400), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    quiet = cli_connect(tf_server_port(srv));
    busy = cli_connect(tf_server_port(srv));
    REQUIRE(quiet >= 0 && busy >= 0);
    CHECK(expect_silence(quiet, 150)); /* not closed before its time */
    /* busy sends a frame every 100 ms for 1.2 s: never idle for 400 ms */
    for (int i = 0; i < 12; i++) {
        REQUIRE(send_frame(busy, "ping", 4) == 0);
        CHECK(expect_frame(busy, "ping"));
        sleep_ms(100);
    }
    CHECK(expect_closed(quiet, WAIT_MS));
    int ok;
    WAIT_UNTIL(&r, r.closes >= 1, WAIT_MS, ok);
    CHECK(ok);
    CHECK(r.closes == 1);
    CHECK(r.close_reasons[0] == TF_CLOSE_IDLE);
    CHECK_U64(r.close_stats.closed_idle, 1); /* counted before on_close ran */
    REQUIRE(send_frame(busy, "alive", 5) == 0);
    CHECK(expect_frame(busy, "alive"));
done:
    close_fd(&quiet);
    close_fd(&busy);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

static void test_full_output_queue_refuses_and_queues_nothing(void) {
    struct rec r;
    rec_init(&r);
    r.fill_queue = 1;
    int fd = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    /* one 50-byte frame (54 with its prefix) fits; a second does not */
    CHECK_RC(tf_config_set_max_queued_output(cfg, 64), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    REQUIRE(send_frame(fd, "go", 2) == 0);
    int ok;
    WAIT_UNTIL(&r, r.messages == 1, WAIT_MS, ok);
    REQUIRE(ok);
    CHECK_RC(r.cb_rc[0], TF_OK);
    CHECK_RC(r.cb_rc[1], TF_ERR_FULL);
    char buf[64];
    size_t len = 0;
    CHECK(recv_frame(fd, buf, sizeof buf, &len) == 0 && len == 50);
    CHECK(expect_silence(fd, QUIET_MS)); /* the refused frame was not queued */
    /* too big for even an empty queue */
    uint8_t block[100];
    memset(block, 'z', sizeof block);
    CHECK_RC(tf_send(srv, r.message_ids[0], block, sizeof block), TF_ERR_FULL);
    CHECK(tf_last_error()[0] != '\0');
done:
    close_fd(&fd);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

static void test_log_callback_is_well_formed(void) {
    struct rec r, logr;
    rec_init(&r);
    rec_init(&logr);
    r.echo = 1;
    int fd = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_max_frame(cfg, 8), TF_OK);
    CHECK_RC(tf_config_set_log(cfg, rec_on_log, &logr), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    uint8_t prefix[4];
    put_le32(prefix, 1000); /* something a server may well log about */
    REQUIRE(send_all(fd, prefix, 4) == 0);
    CHECK(expect_closed(fd, WAIT_MS));
    CHECK_RC(tf_server_stop(srv, 0), TF_OK);
    pthread_mutex_lock(&logr.mu);
    CHECK(logr.bad_logs == 0);
    pthread_mutex_unlock(&logr.mu);
done:
    close_fd(&fd);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
    rec_destroy(&logr);
}

/* Takes pull events until one of `kind` arrives (others are kept in *seen). */
static int pull_until(tf_server *srv, int32_t kind, tf_event *out, char *peer, size_t peer_cap) {
    int64_t end = now_ms() + WAIT_MS;
    while (now_ms() < end) {
        struct pollfd p = {.fd = tf_server_fd(srv), .events = POLLIN, .revents = 0};
        if (poll(&p, 1, 100) < 0 && errno != EINTR)
            return 0;
        tf_event ev[8];
        size_t count = 99;
        if (tf_server_poll(srv, ev, 8, &count, 0) != TF_OK || count > 8)
            return 0;
        for (size_t i = 0; i < count; i++) {
            if (ev[i].kind == kind) {
                *out = ev[i];
                if (peer != NULL && kind == TF_EVENT_CONNECT) {
                    size_t n = ev[i].len < peer_cap - 1 ? ev[i].len : peer_cap - 1;
                    memcpy(peer, ev[i].data, n);
                    peer[n] = '\0';
                    if (ev[i].data[ev[i].len] != '\0') /* promised NUL terminator */
                        peer[0] = '!';
                }
                return i + 1 == count; /* the event must be the last one: nothing else due */
            }
        }
    }
    return 0;
}

static int fd_readable(int fd, int ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN, .revents = 0};
    return poll(&p, 1, ms) > 0;
}

static void test_pull_mode_basics(void) {
    tf_server *srv = NULL;
    int fd = -1;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_server_start_pull(cfg, &srv), TF_OK);
    REQUIRE(srv != NULL);
    int sfd = tf_server_fd(srv);
    CHECK(sfd >= 0);
    CHECK(tf_server_port(srv) != 0);
    CHECK(!fd_readable(sfd, 50)); /* nothing waits yet */
    tf_event ev[4];
    size_t count = 99;
    CHECK_RC(tf_server_poll(srv, ev, 4, &count, 0), TF_OK);
    CHECK(count == 0);
    int64_t t0 = now_ms();
    count = 99;
    CHECK_RC(tf_server_poll(srv, ev, 4, &count, 150), TF_OK); /* waits, then nothing */
    int64_t waited = now_ms() - t0;
    CHECK(count == 0);
    CHECK(waited >= 100 && waited < WAIT_MS);

    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    CHECK(fd_readable(sfd, WAIT_MS));
    tf_event got;
    char peer[128] = "";
    REQUIRE(pull_until(srv, TF_EVENT_CONNECT, &got, peer, sizeof peer));
    tf_conn_id id = got.conn;
    CHECK(id != 0);
    CHECK(got.reason == 0);
    CHECK(strncmp(peer, "127.0.0.1:", 10) == 0);
    CHECK(got.len == strlen(peer));
    CHECK(!fd_readable(sfd, 50)); /* level-triggered: drained means not readable */

    REQUIRE(send_frame(fd, "pulled", 6) == 0);
    REQUIRE(pull_until(srv, TF_EVENT_MESSAGE, &got, NULL, 0));
    CHECK(got.conn == id);
    CHECK(got.len == 6 && memcmp(got.data, "pulled", 6) == 0);
    CHECK_RC(tf_send(srv, id, got.data, got.len), TF_OK);
    CHECK(expect_frame(fd, "pulled"));
    REQUIRE(send_frame(fd, NULL, 0) == 0);
    REQUIRE(pull_until(srv, TF_EVENT_MESSAGE, &got, NULL, 0));
    CHECK(got.len == 0);

    /* a blocking poll (timeout -1) returns when the close comes */
    close_fd(&fd);
    int64_t t1 = now_ms();
    count = 0;
    CHECK_RC(tf_server_poll(srv, ev, 4, &count, -1), TF_OK);
    CHECK(now_ms() - t1 < WAIT_MS);
    CHECK(count == 1 && ev[0].kind == TF_EVENT_CLOSE && ev[0].conn == id &&
          ev[0].reason == TF_CLOSE_PEER);
    CHECK_RC(tf_server_stop(srv, 100), TF_OK);
    CHECK_RC(tf_send(srv, id, (const uint8_t *)"x", 1), TF_ERR_STOPPED);
done:
    close_fd(&fd);
    tf_server_free(srv);
    tf_config_free(cfg);
}

static void test_pull_mode_stop_reports_shutdown_close(void) {
    tf_server *srv = NULL;
    int fd = -1;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_server_start_pull(cfg, &srv), TF_OK);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    tf_event got;
    REQUIRE(pull_until(srv, TF_EVENT_CONNECT, &got, NULL, 0));
    CHECK_RC(tf_server_stop(srv, 100), TF_OK);
    CHECK(expect_closed(fd, WAIT_MS));
    /* The contract does not say whether the SHUTDOWN close of a pull server can still
     * be taken after stop; if events come, they must be that close and nothing else. */
    tf_event ev[4];
    size_t count = 0;
    int32_t rc = tf_server_poll(srv, ev, 4, &count, 0);
    CHECK(rc == TF_OK || rc == TF_ERR_STOPPED);
    if (rc == TF_OK)
        for (size_t i = 0; i < count; i++)
            CHECK(ev[i].kind == TF_EVENT_CLOSE && ev[i].reason == TF_CLOSE_SHUTDOWN);
done:
    close_fd(&fd);
    tf_server_free(srv);
    tf_config_free(cfg);
}

struct drain_reader {
    int fd;
    size_t want;
    int got_frame; /* the whole frame arrived intact */
    int got_eof;   /* and then the connection closed */
};

static void *drain_reader_main(void *arg) {
    struct drain_reader *d = arg;
    uint8_t *buf = malloc(d->want);
    size_t len = 0;
    if (buf != NULL && recv_frame(d->fd, buf, d->want, &len) == 0 && len == d->want) {
        int intact = 1;
        for (size_t i = 0; i < len && intact; i++)
            intact = buf[i] == (uint8_t)(i % 251);
        d->got_frame = intact;
    }
    free(buf);
    d->got_eof = expect_closed(d->fd, WAIT_MS);
    return NULL;
}

static void test_stop_drains_queued_output(void) {
    struct rec r;
    rec_init(&r);
    int fd = -1, reader_started = 0;
    pthread_t reader;
    struct drain_reader d;
    memset(&d, 0, sizeof d);
    uint8_t *big = NULL;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    d.fd = fd;
    d.want = 4u << 20; /* more than loopback socket buffers hold: it must really drain */
    big = malloc(d.want);
    REQUIRE(big != NULL);
    for (size_t i = 0; i < d.want; i++)
        big[i] = (uint8_t)(i % 251);
    CHECK_RC(tf_send(srv, r.connect_ids[0], big, d.want), TF_OK);
    REQUIRE(pthread_create(&reader, NULL, drain_reader_main, &d) == 0);
    reader_started = 1;
    CHECK_RC(tf_server_stop(srv, 5000), TF_OK);
    pthread_join(reader, NULL);
    reader_started = 0;
    CHECK(d.got_frame);
    CHECK(d.got_eof);
    CHECK(r.closes == 1 && r.close_reasons[0] == TF_CLOSE_SHUTDOWN);
    tf_stats st;
    CHECK_RC(tf_server_stats(srv, &st), TF_OK);
    CHECK_U64(st.frames_sent, 1);
    CHECK_U64(st.bytes_sent, 4 + d.want);
done:
    if (reader_started)
        pthread_join(reader, NULL);
    free(big);
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_conn_close_inside_on_connect(void) {
    struct rec r;
    rec_init(&r);
    r.close_in_connect = 1;
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    CHECK(expect_closed(fd, WAIT_MS));
    int ok;
    WAIT_UNTIL(&r, r.closes == 1, WAIT_MS, ok);
    CHECK(ok);
    CHECK_RC(r.connect_close_rc, TF_OK);
    CHECK(r.close_ids[0] == r.connect_ids[0]);
    CHECK(r.close_reasons[0] == TF_CLOSE_LOCAL);
    sleep_ms(QUIET_MS);
    CHECK(r.closes == 1); /* exactly once */
    tf_stats st;
    CHECK(wait_stats(srv, &st, active_is, 0, WAIT_MS));
    CHECK_U64(st.connections_accepted, 1);
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_send_inside_on_close_is_no_conn(void) {
    struct rec r;
    rec_init(&r);
    r.send_in_close = 1;
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    close_fd(&fd);
    WAIT_UNTIL(&r, r.closes == 1, WAIT_MS, ok);
    REQUIRE(ok);
    CHECK_RC(r.close_send_rc, TF_ERR_NO_CONN);
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_send_empty_frame_with_null_data(void) {
    struct rec r;
    rec_init(&r);
    int fd = -1;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    /* a zero-length frame is valid, and on_message may hand out NULL for one:
     * the same (NULL, 0) must be accepted going out */
    CHECK_RC(tf_send(srv, r.connect_ids[0], NULL, 0), TF_OK);
    CHECK(expect_frame(fd, ""));
done:
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_idle_timeout_needs_complete_frames(void) {
    /* A peer that trickles bytes of a frame it never completes is idle. */
    struct rec r;
    rec_init(&r);
    int fd = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_idle_timeout_ms(cfg, 300), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    uint8_t prefix[4];
    put_le32(prefix, 1000);
    REQUIRE(send_all(fd, prefix, 4) == 0);
    int closed = 0;
    for (int i = 0; i < 60 && !closed; i++) { /* 1 byte per 50 ms: 3 s, far from 1000 bytes */
        if (send(fd, "z", 1, MSG_NOSIGNAL) != 1)
            break;
        closed = expect_closed(fd, 50);
    }
    CHECK(closed || expect_closed(fd, WAIT_MS));
    int ok;
    WAIT_UNTIL(&r, r.closes == 1, WAIT_MS, ok);
    CHECK(ok);
    CHECK(r.close_reasons[0] == TF_CLOSE_IDLE);
done:
    close_fd(&fd);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

struct sender {
    tf_server *srv;
    tf_conn_id conn;
    char tag;
    int count;
    int sent;          /* frames accepted with TF_OK */
    int unexpected_rc; /* a code other than OK (or STOPPED, when stopping) */
    int until_stopped; /* keep sending until tf_send says STOPPED */
};

static void *sender_main(void *arg) {
    struct sender *t = arg;
    for (int i = 0; t->until_stopped || i < t->count; i++) {
        char msg[32];
        int n = snprintf(msg, sizeof msg, "%c%d", t->tag, i);
        int32_t rc = tf_send(t->srv, t->conn, (const uint8_t *)msg, (size_t)n);
        if (rc == TF_OK) {
            t->sent++;
        } else if (t->until_stopped && rc == TF_ERR_STOPPED) {
            break;
        } else if (t->until_stopped && rc == TF_ERR_FULL) {
            sleep_ms(1); /* the client reads slower than we send: that is fine */
        } else {
            t->unexpected_rc = rc;
            break;
        }
        if (t->until_stopped && i > 10000000)
            break; /* bounded even if stop never lands */
    }
    return NULL;
}

static void test_sends_from_two_threads_keep_each_threads_order(void) {
    struct rec r;
    rec_init(&r);
    int fd = -1, started = 0;
    pthread_t th[2];
    struct sender snd[2];
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    for (int i = 0; i < 2; i++) {
        memset(&snd[i], 0, sizeof snd[i]);
        snd[i].srv = srv;
        snd[i].conn = r.connect_ids[0];
        snd[i].tag = (char)('a' + i);
        snd[i].count = 2000;
        REQUIRE(pthread_create(&th[i], NULL, sender_main, &snd[i]) == 0);
        started++;
    }
    int next[2] = {0, 0}, bad = 0;
    for (int k = 0; k < 4000 && !bad; k++) {
        char buf[64];
        size_t len = 0;
        if (recv_frame(fd, buf, sizeof buf - 1, &len) != 0) {
            bad = 1;
            break;
        }
        buf[len] = '\0';
        int who = buf[0] - 'a';
        if (who < 0 || who > 1 || atoi(buf + 1) != next[who]) {
            check_failed(__FILE__, __LINE__, "frame '%s' out of order (expected %c%d)", buf,
                         who == 1 ? 'b' : 'a', next[who == 1]);
            bad = 1;
            break;
        }
        next[who]++;
    }
    CHECK(!bad && next[0] == 2000 && next[1] == 2000);
done:
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        CHECK(snd[i].unexpected_rc == 0);
    }
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_stop_while_host_threads_send(void) {
    struct rec r;
    rec_init(&r);
    int fd = -1, started = 0;
    pthread_t th[2];
    struct sender snd[2];
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    int ok;
    WAIT_UNTIL(&r, r.connects == 1, WAIT_MS, ok);
    REQUIRE(ok);
    for (int i = 0; i < 2; i++) {
        memset(&snd[i], 0, sizeof snd[i]);
        snd[i].srv = srv;
        snd[i].conn = r.connect_ids[0];
        snd[i].tag = (char)('a' + i);
        snd[i].until_stopped = 1;
        REQUIRE(pthread_create(&th[i], NULL, sender_main, &snd[i]) == 0);
        started++;
    }
    sleep_ms(100);
    CHECK_RC(tf_server_stop(srv, 200), TF_OK);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < started; i++) {
        CHECK(snd[i].unexpected_rc == 0);
        CHECK(snd[i].sent > 0);
    }
    started = 0;
    CHECK(expect_closed(fd, WAIT_MS));
    CHECK(r.closes == 1 && r.close_reasons[0] == TF_CLOSE_SHUTDOWN);
done:
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    close_fd(&fd);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_free_without_stop_closes_everything(void) {
    struct rec r;
    rec_init(&r);
    r.echo = 1;
    int fds[3] = {-1, -1, -1};
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    for (int i = 0; i < 3; i++) {
        fds[i] = cli_connect(tf_server_port(srv));
        REQUIRE(fds[i] >= 0);
    }
    int ok;
    WAIT_UNTIL(&r, r.connects == 3, WAIT_MS, ok);
    REQUIRE(ok);
    tf_server_free(srv); /* stops (drain 0) first */
    srv = NULL;
    /* after free returns no callback runs: every connection had its close */
    CHECK(r.closes == 3);
    for (int i = 0; i < 3 && i < r.closes; i++)
        CHECK(r.close_reasons[i] == TF_CLOSE_SHUTDOWN);
    for (int i = 0; i < 3; i++)
        CHECK(expect_closed(fds[i], WAIT_MS));
done:
    for (int i = 0; i < 3; i++)
        close_fd(&fds[i]);
    tf_server_free(srv);
    rec_destroy(&r);
}

static void test_many_clients_over_max_connections(void) {
    enum { MAXC = 5, CLIENTS = 30 };
    struct rec r;
    rec_init(&r);
    int fds[CLIENTS];
    for (int i = 0; i < CLIENTS; i++)
        fds[i] = -1;
    tf_server *srv = NULL;
    tf_config *cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_config_set_max_connections(cfg, MAXC), TF_OK);
    srv = start_rec_server(&r, cfg);
    REQUIRE(srv != NULL);
    for (int i = 0; i < CLIENTS; i++) {
        fds[i] = cli_connect(tf_server_port(srv));
        REQUIRE(fds[i] >= 0);
    }
    tf_stats st;
    CHECK(wait_stats(srv, &st, rejected_at_least, CLIENTS - MAXC, WAIT_MS));
    CHECK_U64(st.connections_accepted, MAXC);
    CHECK_U64(st.connections_rejected, CLIENTS - MAXC);
    CHECK_U64(st.connections_active, MAXC);
    int open_ones = 0;
    for (int i = 0; i < CLIENTS; i++)
        if (!expect_closed(fds[i], i < MAXC ? 50 : WAIT_MS))
            open_ones++;
    CHECK(open_ones == MAXC);
    CHECK(r.connects == MAXC);
done:
    for (int i = 0; i < CLIENTS; i++)
        close_fd(&fds[i]);
    tf_server_free(srv);
    tf_config_free(cfg);
    rec_destroy(&r);
}

/* fork(): child codes, one bit per broken promise. */
enum {
    CHILD_SEND_NOT_STOPPED = 1,
    CHILD_NO_FORK_MESSAGE = 2,
    CHILD_CLOSE_NOT_STOPPED = 4,
    CHILD_STATS_NOT_STOPPED = 8,
    CHILD_STOP_NOT_STOPPED = 16,
    CHILD_POLL_NOT_STOPPED = 32
};

static int child_checks(tf_server *srv, tf_conn_id id, tf_server *pull) {
    int bad = 0;
    alarm(20); /* a hang in here kills the child, and the parent reports it */
    if (tf_send(srv, id, (const uint8_t *)"child", 5) != TF_ERR_STOPPED)
        bad |= CHILD_SEND_NOT_STOPPED;
    if (!contains_nocase(tf_last_error(), "fork")) {
        bad |= CHILD_NO_FORK_MESSAGE;
        fprintf(stderr, "    child: tf_last_error() = '%s'\n", tf_last_error());
    }
    if (tf_conn_close(srv, id) != TF_ERR_STOPPED)
        bad |= CHILD_CLOSE_NOT_STOPPED;
    tf_stats st;
    if (tf_server_stats(srv, &st) != TF_ERR_STOPPED)
        bad |= CHILD_STATS_NOT_STOPPED;
    tf_event ev[4];
    size_t count = 0;
    if (tf_server_poll(pull, ev, 4, &count, 0) != TF_ERR_STOPPED)
        bad |= CHILD_POLL_NOT_STOPPED;
    if (tf_server_stop(srv, 0) != TF_ERR_STOPPED || tf_server_stop(pull, 0) != TF_ERR_STOPPED)
        bad |= CHILD_STOP_NOT_STOPPED;
    /* and the handles can be freed without touching the parent's sockets */
    tf_server_free(srv);
    tf_server_free(pull);
    return bad;
}

static void test_fork_child_gets_stopped_parent_unharmed(void) {
    struct rec r;
    rec_init(&r);
    r.echo = 1;
    int fd = -1;
    tf_server *pull = NULL;
    tf_config *cfg = NULL;
    tf_server *srv = start_rec_server(&r, NULL);
    REQUIRE(srv != NULL);
    cfg = config_on("127.0.0.1:0");
    REQUIRE(cfg != NULL);
    CHECK_RC(tf_server_start_pull(cfg, &pull), TF_OK);
    REQUIRE(pull != NULL);
    fd = cli_connect(tf_server_port(srv));
    REQUIRE(fd >= 0);
    REQUIRE(send_frame(fd, "before", 6) == 0);
    CHECK(expect_frame(fd, "before"));
    tf_conn_id id = r.connect_ids[0];

    /* The child reports through a pipe, not its exit code: under valgrind the
     * child's exit code is valgrind's, which counts the loop thread's memory as
     * lost in a child where that thread does not exist. */
    int report[2];
    REQUIRE(pipe(report) == 0);
    fflush(NULL);
    pid_t child = fork();
    if (child == 0) {
        close(report[0]);
        unsigned char bad = (unsigned char)child_checks(srv, id, pull);
        ssize_t w = write(report[1], &bad, 1);
        _exit(w == 1 ? 0 : 99);
    }
    close(report[1]);
    if (child < 0) {
        close(report[0]);
        REQUIRE(child >= 0);
    }

    int got_report = 0;
    unsigned char bad = 0;
    struct pollfd pr = {.fd = report[0], .events = POLLIN, .revents = 0};
    if (poll(&pr, 1, 3 * WAIT_MS) == 1)
        got_report = read(report[0], &bad, 1) == 1;
    close(report[0]);
    int status = 0, exited = 0;
    for (int64_t end = now_ms() + WAIT_MS; now_ms() < end;) {
        pid_t w = waitpid(child, &status, WNOHANG);
        if (w == child || (w < 0 && errno != EINTR)) {
            exited = w == child;
            break;
        }
        sleep_ms(10);
    }
    if (!exited) {
        kill(child, SIGKILL);
        waitpid(child, &status, 0);
        check_failed(__FILE__, __LINE__, "the child hung");
    } else if (WIFSIGNALED(status)) {
        check_failed(__FILE__, __LINE__, "the child died of signal %d", WTERMSIG(status));
    } else if (!got_report) {
        check_failed(__FILE__, __LINE__, "the child exited (%d) without a report",
                     WEXITSTATUS(status));
    } else {
        if (bad & CHILD_SEND_NOT_STOPPED) check_failed(__FILE__, __LINE__, "child: tf_send not STOPPED");
        if (bad & CHILD_NO_FORK_MESSAGE) check_failed(__FILE__, __LINE__, "child: message does not mention fork");
        if (bad & CHILD_CLOSE_NOT_STOPPED) check_failed(__FILE__, __LINE__, "child: tf_conn_close not STOPPED");
        if (bad & CHILD_STATS_NOT_STOPPED) check_failed(__FILE__, __LINE__, "child: tf_server_stats not STOPPED");
        if (bad & CHILD_STOP_NOT_STOPPED) check_failed(__FILE__, __LINE__, "child: tf_server_stop not STOPPED");
        if (bad & CHILD_POLL_NOT_STOPPED) check_failed(__FILE__, __LINE__, "child: tf_server_poll not STOPPED");
    }
    /* the parent's server and its connection are untouched */
    REQUIRE(send_frame(fd, "after", 5) == 0);
    CHECK(expect_frame(fd, "after"));
    CHECK_RC(tf_send(srv, id, (const uint8_t *)"direct", 6), TF_OK);
    CHECK(expect_frame(fd, "direct"));
    int fd2 = cli_connect(tf_server_port(srv));
    CHECK(fd2 >= 0);
    if (fd2 >= 0) {
        CHECK(send_frame(fd2, "new", 3) == 0 && expect_frame(fd2, "new"));
        close(fd2);
    }
    CHECK(r.closes == 0 || r.close_ids[0] != id);
    tf_stats st;
    CHECK_RC(tf_server_stats(pull, &st), TF_OK);
    CHECK_RC(tf_server_stop(srv, 100), TF_OK);
done:
    close_fd(&fd);
    tf_server_free(srv);
    tf_server_free(pull);
    tf_config_free(cfg);
    rec_destroy(&r);
}

/* ---- runner ------------------------------------------------------------------------ */

struct test {
    const char *name;
    void (*fn)(void);
};

#define TEST(f) {#f, f}

static const struct test tests[] = {
    TEST(test_version_and_last_error_never_null),
    TEST(test_last_error_is_per_thread),
    TEST(test_config_setters_validate),
    TEST(test_null_arguments_are_invalid),
    TEST(test_start_on_port_0_and_echo),
    TEST(test_echo_with_poll_backend),
    TEST(test_echo_with_epoll_backend),
    TEST(test_echo_over_ipv6_loopback),
    TEST(test_conn_ids_are_unique_and_not_reused),
    TEST(test_send_from_host_thread_keeps_order),
    TEST(test_send_too_large_is_refused),
    TEST(test_peer_frame_over_max_closes_only_that_conn),
    TEST(test_unknown_conn_id_is_no_conn),
    TEST(test_conn_close_flushes_then_closes),
    TEST(test_stop_twice_then_calls_are_stopped),
    TEST(test_stop_inside_callback_is_invalid),
    TEST(test_address_in_use_is_io_with_message),
    TEST(test_bad_start_address_is_invalid_or_io),
    TEST(test_refused_connection_is_rejected_silently),
    TEST(test_over_max_connections_is_rejected),
    TEST(test_idle_timeout_closes_quiet_conn_only),
    TEST(test_full_output_queue_refuses_and_queues_nothing),
    TEST(test_log_callback_is_well_formed),
    TEST(test_pull_mode_basics),
    TEST(test_pull_mode_stop_reports_shutdown_close),
    TEST(test_stop_drains_queued_output),
    TEST(test_conn_close_inside_on_connect),
    TEST(test_send_inside_on_close_is_no_conn),
    TEST(test_send_empty_frame_with_null_data),
    TEST(test_idle_timeout_needs_complete_frames),
    TEST(test_sends_from_two_threads_keep_each_threads_order),
    TEST(test_stop_while_host_threads_send),
    TEST(test_free_without_stop_closes_everything),
    TEST(test_many_clients_over_max_connections),
    TEST(test_fork_child_gets_stopped_parent_unharmed),
};

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : NULL;
    int passed = 0, failed = 0;
    /* A test that breaks a connection must not kill us with SIGPIPE; sends use
     * MSG_NOSIGNAL anyway, this is belt and braces for the harness itself. */
    signal(SIGPIPE, SIG_IGN);
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        if (filter != NULL && strstr(tests[i].name, filter) == NULL)
            continue;
        g_check_failures = 0;
        int64_t t0 = now_ms();
        tests[i].fn();
        int64_t ms = now_ms() - t0;
        if (g_check_failures == 0) {
            passed++;
            printf("ok   %s (%" PRId64 " ms)\n", tests[i].name, ms);
        } else {
            failed++;
            printf("FAIL %s (%d checks failed)\n", tests[i].name, g_check_failures);
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 && passed > 0 ? 0 : 1;
}

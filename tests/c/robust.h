/* robust.h: what test_robustness.c and test_robustness_load.c share: checks,
 * clocks, a recording host, plain-socket clients, /proc readings and the runner.
 *
 * Every wait is bounded. TF_TEST_BACKEND=poll|epoll|auto picks the backend of
 * every server a test starts (cfg_new); TF_TEST_SCALE (default 1) stretches
 * the bounds for slow runs (valgrind). Functions are static inline so that a
 * program that does not use one gets no unused-function warning. */
#ifndef ROBUST_H
#define ROBUST_H

#define _GNU_SOURCE

#include <arpa/inet.h>
#include <dirent.h>
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tcpframe.h"

/* ---- checks ----------------------------------------------------------------- */

static int g_failures;        /* checks failed in the current test */
static double g_scale = 1.0;  /* TF_TEST_SCALE */
static int32_t g_backend = TF_BACKEND_AUTO;
static const char *g_backend_name = "auto";
static const char *g_test_name = "";
static int g_test_secs;

static inline void check_failed(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "    %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    g_failures++;
}

#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond))                                                                      \
            check_failed(__FILE__, __LINE__, "CHECK(%s) failed", #cond);                  \
    } while (0)

/* CHECK with an explanation (printf-style) of what was seen. */
#define CHECKF(cond, ...)                                                                 \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            check_failed(__FILE__, __LINE__, "CHECK(%s) failed", #cond);                  \
            fprintf(stderr, "      seen: ");                                              \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fputc('\n', stderr);                                                          \
        }                                                                                 \
    } while (0)

#define CHECK_RC(expr, want)                                                              \
    do {                                                                                  \
        int32_t rc_ = (int32_t)(expr);                                                    \
        if (rc_ != (int32_t)(want))                                                       \
            check_failed(__FILE__, __LINE__, "%s returned %d, want %d (%s); last error '%s'", \
                         #expr, (int)rc_, (int)(want), #want, tf_last_error());           \
    } while (0)

/* A failed precondition: record it and go to the test's cleanup (label done). */
#define REQUIRE(cond)                                                                     \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            check_failed(__FILE__, __LINE__, "REQUIRE(%s) failed", #cond);                \
            goto done;                                                                    \
        }                                                                                 \
    } while (0)

/* ---- time --------------------------------------------------------------------- */

static inline double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static inline void sleep_ms(double ms) {
    struct timespec ts;
    ts.tv_sec = (time_t)(ms / 1000);
    ts.tv_nsec = (long)((ms - (double)ts.tv_sec * 1000) * 1e6);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* A bound (ms) for something that should happen, stretched for slow runs. */
static inline int SC(double ms) { return (int)(ms * g_scale); }

/* CPU seconds used by the whole process (every thread, the loop threads too). */
static inline double cpu_s(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
           (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

/* A /proc/self/status field in KiB ("VmRSS:", "VmHWM:"); -1 when missing. */
static inline long status_kb(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, strlen(field)) == 0)
            v = atol(line + strlen(field));
    fclose(f);
    return v;
}

static inline int contains_nocase(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (strncasecmp(hay, needle, n) == 0)
            return 1;
    return 0;
}

/* ---- one lock for every test's shared state -------------------------------------- */

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;

/* Runs stmt under g_mu and wakes every waiter. */
#define LOCKED(stmt)                                                                      \
    do {                                                                                  \
        pthread_mutex_lock(&g_mu);                                                        \
        stmt;                                                                             \
        pthread_cond_broadcast(&g_cv);                                                    \
        pthread_mutex_unlock(&g_mu);                                                      \
    } while (0)

/* Waits at most ms until cond (evaluated under g_mu) holds; ok says whether it does. */
#define WAIT_FOR(cond, ms, ok)                                                            \
    do {                                                                                  \
        double end_ = now_ms() + (ms);                                                    \
        pthread_mutex_lock(&g_mu);                                                        \
        while (!(cond) && now_ms() < end_) {                                              \
            struct timespec ts_;                                                          \
            clock_gettime(CLOCK_REALTIME, &ts_);                                          \
            ts_.tv_nsec += 10 * 1000000L;                                                 \
            if (ts_.tv_nsec >= 1000000000L) {                                             \
                ts_.tv_sec++;                                                             \
                ts_.tv_nsec -= 1000000000L;                                               \
            }                                                                             \
            pthread_cond_timedwait(&g_cv, &g_mu, &ts_);                                   \
        }                                                                                 \
        (ok) = (cond);                                                                    \
        pthread_mutex_unlock(&g_mu);                                                      \
    } while (0)

/* ---- a recording host ---------------------------------------------------------------- */

#define LIST_MAX 128

struct host {
    tf_server *srv;        /* written by tf_server_start before any callback runs */
    int echo;              /* on_message echoes with tf_send */
    int slow_ms;           /* on_message sleeps this long for the payload "slow" */
    int connects, messages, closes;
    tf_conn_id conn[LIST_MAX];
    double conn_t[LIST_MAX];
    tf_conn_id closed[LIST_MAX];
    int32_t reason[LIST_MAX];
    double close_t[LIST_MAX];
    size_t last_len;
    tf_conn_id last_conn;
};

static inline int host_on_connect(void *ud, tf_conn_id c, const char *peer) {
    struct host *h = ud;
    (void)peer;
    LOCKED(if (h->connects < LIST_MAX) {
        h->conn[h->connects] = c;
        h->conn_t[h->connects] = now_ms();
    } h->connects++);
    return 0;
}

static inline void host_on_message(void *ud, tf_conn_id c, const uint8_t *d, size_t n) {
    struct host *h = ud;
    if (h->slow_ms && n == 4 && memcmp(d, "slow", 4) == 0)
        sleep_ms(h->slow_ms);
    else if (h->echo)
        (void)tf_send(h->srv, c, d, n);
    LOCKED(h->messages++; h->last_len = n; h->last_conn = c);
}

static inline void host_on_close(void *ud, tf_conn_id c, int32_t reason) {
    struct host *h = ud;
    LOCKED(if (h->closes < LIST_MAX) {
        h->closed[h->closes] = c;
        h->reason[h->closes] = reason;
        h->close_t[h->closes] = now_ms();
    } h->closes++);
}

/* The on_close reason recorded for c, or -1 (none yet). Called with g_mu held
 * (inside WAIT_FOR conditions). */
static inline int32_t reason_of(const struct host *h, tf_conn_id c) {
    int32_t r = -1;
    for (int i = 0; i < h->closes && i < LIST_MAX; i++)
        if (h->closed[i] == c)
            r = h->reason[i];
    return r;
}

/* reason_of, taking g_mu. */
static inline int32_t host_reason(const struct host *h, tf_conn_id c) {
    pthread_mutex_lock(&g_mu);
    int32_t r = reason_of(h, c);
    pthread_mutex_unlock(&g_mu);
    return r;
}

/* A config on 127.0.0.1:0 with the backend under test. */
static inline tf_config *cfg_new(void) {
    tf_config *cfg = tf_config_new();
    if (cfg == NULL)
        return NULL;
    if (tf_config_set_address(cfg, "127.0.0.1:0") != TF_OK ||
        tf_config_set_backend(cfg, g_backend) != TF_OK) {
        tf_config_free(cfg);
        return NULL;
    }
    return cfg;
}

/* Starts a callback server for h with cfg (NULL: cfg_new()); cfg is freed. */
static inline tf_server *host_start(struct host *h, tf_config *cfg) {
    tf_callbacks cb;
    memset(&cb, 0, sizeof cb);
    cb.user_data = h;
    cb.on_connect = host_on_connect;
    cb.on_message = host_on_message;
    cb.on_close = host_on_close;
    if (cfg == NULL)
        cfg = cfg_new();
    if (cfg == NULL)
        return NULL;
    int32_t rc = tf_server_start(cfg, &cb, &h->srv);
    if (rc != TF_OK) {
        fprintf(stderr, "    tf_server_start: %d %s\n", (int)rc, tf_last_error());
        h->srv = NULL;
    }
    tf_config_free(cfg);
    return h->srv;
}

static inline tf_server *start_cb(tf_config *cfg, tf_callbacks *cb, tf_server **out) {
    int free_cfg = cfg == NULL;
    if (cfg == NULL)
        cfg = cfg_new();
    int32_t rc = cfg ? tf_server_start(cfg, cb, out) : TF_ERR_INVALID;
    if (rc != TF_OK) {
        fprintf(stderr, "    tf_server_start: %d %s\n", (int)rc, tf_last_error());
        *out = NULL;
    }
    if (free_cfg)
        tf_config_free(cfg);
    return *out;
}

/* ---- log capture -------------------------------------------------------------------- */

struct logcap {
    char text[16384];
    size_t len;
    int lines;
};

static inline void logcap_fn(void *ud, int32_t level, const char *msg) {
    struct logcap *l = ud;
    LOCKED({
        int n = snprintf(l->text + l->len, sizeof l->text - l->len, "%d: %s\n", (int)level,
                         msg ? msg : "(null)");
        if (n > 0 && l->len + (size_t)n < sizeof l->text)
            l->len += (size_t)n;
        l->lines++;
    });
}

/* ---- plain-socket clients --------------------------------------------------------------- */

static inline void set_timeouts(int fd, int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* Connects to 127.0.0.1:port (rcvbuf > 0: SO_RCVBUF set first); -1 on failure. */
static inline int cli_connect_rcvbuf(uint16_t port, int rcvbuf) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    if (rcvbuf > 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    set_timeouts(fd, SC(10000));
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static inline int cli_connect(uint16_t port) { return cli_connect_rcvbuf(port, 0); }

static inline int send_all(int fd, const void *buf, size_t len) {
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

static inline void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline int send_frame(int fd, const void *data, size_t len) {
    uint8_t prefix[4];
    put_le32(prefix, (uint32_t)len);
    if (send_all(fd, prefix, 4) != 0)
        return -1;
    return len ? send_all(fd, data, len) : 0;
}

static inline int recv_all(int fd, void *buf, size_t len) {
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

/* 1 when the next frame on fd is exactly `text`. */
static inline int expect_frame(int fd, const char *text) {
    uint8_t prefix[4];
    char buf[512];
    if (recv_all(fd, prefix, 4) != 0)
        return 0;
    uint32_t n = (uint32_t)prefix[0] | (uint32_t)prefix[1] << 8 | (uint32_t)prefix[2] << 16 |
                 (uint32_t)prefix[3] << 24;
    if (n != strlen(text) || n > sizeof buf || (n && recv_all(fd, buf, n) != 0))
        return 0;
    return memcmp(buf, text, n) == 0;
}

/* Sends `text` as a frame and expects it back. */
static inline int echo_ok(int fd, const char *text) {
    return send_frame(fd, text, strlen(text)) == 0 && expect_frame(fd, text);
}

/* How the peer ends within ms (data before that is skipped): 1 EOF, 2 reset
 * (ECONNRESET), 3 another error, 0 still open. */
static inline int peer_end(int fd, int ms) {
    double end = now_ms() + ms;
    char buf[65536];
    for (;;) {
        int left = (int)(end - now_ms());
        if (left <= 0)
            return 0;
        struct pollfd p = {fd, POLLIN, 0};
        int n = poll(&p, 1, left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return 0;
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r == 0)
            return 1;
        if (r < 0 && errno == ECONNRESET)
            return 2;
        if (r < 0 && errno != EAGAIN && errno != EINTR)
            return 3;
    }
}

/* 1 when connecting to the port is refused within ms (the listener is gone). */
static inline int port_refuses(uint16_t port, int ms) {
    double end = now_ms() + ms;
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons(port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int rc = connect(fd, (struct sockaddr *)&a, sizeof a);
        int err = errno;
        close(fd);
        if (rc != 0 && err == ECONNREFUSED)
            return 1;
        if (now_ms() >= end)
            return 0;
        sleep_ms(20);
    }
}

static inline void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* Polls the stats until connections_active == n, at most ms. */
static inline int wait_active(tf_server *srv, uint64_t n, int ms) {
    double end = now_ms() + ms;
    tf_stats st;
    for (;;) {
        if (tf_server_stats(srv, &st) == TF_OK && st.connections_active == n)
            return 1;
        if (now_ms() >= end)
            return 0;
        sleep_ms(5);
    }
}

/* tf_send until it refuses; returns the payload bytes queued, *last_rc the refusal. */
static inline size_t fill_queue(tf_server *srv, tf_conn_id c, const uint8_t *buf, size_t len,
                                int32_t *last_rc) {
    size_t total = 0;
    int32_t rc;
    while ((rc = tf_send(srv, c, buf, len)) == TF_OK)
        total += len;
    *last_rc = rc;
    return total;
}

/* ---- the runner ------------------------------------------------------------------------- */

struct test {
    const char *name;
    void (*fn)(void);
    int secs;          /* the bound of the whole test (times TF_TEST_SCALE) */
    const char *flags; /* read by test_robustness.py: v = cheap under valgrind, a = ASan */
};

#define TEST(fn, secs, flags) {#fn, fn, secs, flags}

static inline void on_alarm(int sig) {
    char msg[256];
    (void)sig;
    int n = snprintf(msg, sizeof msg, "FAIL %s: timed out after %d s (a hang)\n", g_test_name,
                     (int)(g_test_secs * g_scale));
    if (n > 0)
        (void)!write(1, msg, (size_t)n);
    _exit(3);
}

/* test_x [--list] [NAME...]: runs the named tests (all without names), in
 * order, each bounded by alarm(); prints one line per test and a summary. */
static inline int run_tests(const struct test *tests, size_t count, int argc, char **argv) {
    const char *b = getenv("TF_TEST_BACKEND");
    const char *s = getenv("TF_TEST_SCALE");
    if (s && atof(s) >= 1)
        g_scale = atof(s);
    if (b && strcmp(b, "poll") == 0)
        g_backend = TF_BACKEND_POLL, g_backend_name = "poll";
    else if (b && strcmp(b, "epoll") == 0)
        g_backend = TF_BACKEND_EPOLL, g_backend_name = "epoll";
    if (argc > 1 && strcmp(argv[1], "--list") == 0) {
        for (size_t i = 0; i < count; i++)
            printf("%s %s\n", tests[i].name, tests[i].flags);
        return 0;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    int passed = 0, failed = 0;
    for (int a = 1; a < argc; a++) {
        int found = 0;
        for (size_t i = 0; i < count; i++)
            found |= strcmp(argv[a], tests[i].name) == 0;
        if (!found) {
            printf("FAIL %s: no such test\n", argv[a]);
            failed++;
        }
    }
    for (size_t i = 0; i < count; i++) {
        int wanted = argc <= 1;
        for (int a = 1; a < argc; a++)
            wanted |= strcmp(argv[a], tests[i].name) == 0;
        if (!wanted)
            continue;
        g_failures = 0;
        g_test_name = tests[i].name;
        g_test_secs = tests[i].secs;
        printf("run  %s (backend %s)\n", tests[i].name, g_backend_name);
        fflush(stdout);
        double t0 = now_ms();
        alarm((unsigned)(tests[i].secs * g_scale + 0.5));
        tests[i].fn();
        alarm(0);
        if (g_failures == 0) {
            passed++;
            printf("ok   %s (%.0f ms)\n", tests[i].name, now_ms() - t0);
        } else {
            failed++;
            printf("FAIL %s (%d checks failed)\n", tests[i].name, g_failures);
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 && passed > 0 ? 0 : 1;
}

#endif /* ROBUST_H */
